"""A reader for CTranslate2's ``model.bin``, without the ctranslate2 package.

CTranslate2 (OpenNMT) saves a converted model as a directory: ``config.json`` (the model's
settings), the vocabulary, and ``model.bin``, every weight in one binary file. Its layout, as
``python/ctranslate2/specs/model_spec.py`` (``ModelSpec._serialize``) writes it and
``src/models/model.cc`` (``Model::load``) reads it, all integers little-endian::

    uint32   binary version                      (4 to 6 read here; 6 is the current one)
    string   spec name                           e.g. "WhisperSpec"
    uint32   spec revision                       e.g. 3
    uint32   number of variables
    per variable:
      string   name                              e.g. "encoder/layer_0/self_attention/linear_0/weight"
      uint8    rank
      uint32   dimension x rank
      uint8    dtype id                          0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16
      uint32   payload bytes                     = product of the dimensions x the dtype's size
      bytes    payload                           row-major
    uint32   number of aliases
    per alias: string alias, string target       a variable stored once under two names

    string = uint16 length (the NUL included), the UTF-8 bytes, a NUL byte

Scalars (rank 0) hold settings (``encoder/num_heads`` as int16, flags as int8). Quantized weights
(``int8``, ``int16``) come with a float32 ``<name>_scale`` variable: CTranslate2 stores
``round(w * scale)``, per output row for int8 (``scale = 127 / max |row|``), one scale for int16;
``dequantize`` undoes it. Binary versions before 4 (an item size instead of a dtype id) predate
every model a current converter writes and are refused, as are newer versions.

Every defect is one ``ValueError`` naming the file and the field (the caller names the spec
field): a truncated file, a bad string, an unknown dtype id, a payload size that does not match
the shape, bytes left after the aliases, an alias to nothing.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

READ_VERSIONS = range(4, 7)  # binary versions with dtype ids; 6 is CTranslate2's current one
DTYPES = (torch.float32, torch.int8, torch.int16, torch.int32, torch.float16, torch.bfloat16)  # by dtype id
MAX_RANK = 8


@dataclass
class CT2Model:
    """The content of a ``model.bin``: ``variables`` (tensors and scalars) and ``aliases``
    (alias -> the variable it names)."""

    spec: str
    revision: int
    binary_version: int
    variables: dict[str, torch.Tensor] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> torch.Tensor | None:
        """A variable by name or alias; an alias's ``_scale``/``_zero`` follow it, as in CTranslate2."""
        if name in self.variables:
            return self.variables[name]
        if name in self.aliases:
            return self.variables[self.aliases[name]]
        for suffix in ("_scale", "_zero"):
            base = name.removesuffix(suffix)
            if base != name and base in self.aliases:
                return self.variables.get(self.aliases[base] + suffix)
        return None


def read_model_bin(paths: Path | list[Path], where: str | None = None) -> CT2Model:
    """Parse ``model.bin`` (or the parts of one split across files, concatenated in order).
    ``where`` names the file in messages (default: the first path)."""
    paths = [paths] if isinstance(paths, Path) else list(paths)
    where = where or str(paths[0])
    sizes = [p.stat().st_size for p in paths]
    buf = bytearray(sum(sizes))
    view, at = memoryview(buf), 0
    for p, n in zip(paths, sizes, strict=True):
        with open(p, "rb") as f:
            if f.readinto(view[at : at + n]) != n:
                raise ValueError(f"{p}: changed size while being read")
        at += n
    return parse_model_bin(buf, where)


def parse_model_bin(buf: bytearray, where: str) -> CT2Model:
    """``model.bin`` bytes -> ``CT2Model`` (its tensors are copies: ``buf`` may be dropped)."""
    r = _Reader(buf, where)
    version = r.unpack("I", "binary version")
    if version not in READ_VERSIONS:
        raise ValueError(
            f"{where}: binary version {version} is not read (CTranslate2 model.bin versions "
            f"{READ_VERSIONS.start} to {READ_VERSIONS.stop - 1} are)"
        )
    model = CT2Model(spec=r.string("spec name"), revision=r.unpack("I", "spec revision"), binary_version=version)
    count = r.unpack("I", "number of variables")
    for i in range(count):
        name = r.string(f"name of variable {i}")
        rank = r.unpack("B", f"{name}: rank")
        if rank > MAX_RANK:
            raise ValueError(f"{where}: {name}: rank {rank} (at most {MAX_RANK} is read)")
        shape = tuple(r.unpack("I", f"{name}: dimension {d}") for d in range(rank))
        type_id = r.unpack("B", f"{name}: dtype id")
        if type_id >= len(DTYPES):
            raise ValueError(f"{where}: {name}: unknown dtype id {type_id} (0 to {len(DTYPES) - 1} are defined)")
        dtype = DTYPES[type_id]
        nbytes = r.unpack("I", f"{name}: payload size")
        numel = 1
        for d in shape:
            numel *= d
        if nbytes != numel * dtype.itemsize:
            raise ValueError(
                f"{where}: {name}: payload size {nbytes} bytes does not match its shape {list(shape)} of {dtype}"
            )
        if name in model.variables:
            raise ValueError(f"{where}: variable {name!r} appears twice")
        model.variables[name] = r.tensor(nbytes, dtype, shape, name)
    for i in range(r.unpack("I", "number of aliases")):
        alias, target = r.string(f"alias {i}"), r.string(f"target of alias {i}")
        if target not in model.variables:
            raise ValueError(f"{where}: alias {alias!r} names no variable ({target!r})")
        model.aliases[alias] = target
    if r.at != len(buf):
        raise ValueError(f"{where}: {len(buf) - r.at} bytes after the aliases (not one model.bin, or a damaged one)")
    return model


class _Reader:
    def __init__(self, buf: bytearray, where: str):
        self.buf, self.where, self.at = buf, where, 0

    def _take(self, n: int, what: str) -> int:
        start = self.at
        if start + n > len(self.buf):
            raise ValueError(
                f"{self.where}: truncated: {what} needs {n} bytes at offset {start}, the file ends at {len(self.buf)}"
            )
        self.at += n
        return start

    def unpack(self, fmt: str, what: str) -> int:
        size = struct.calcsize("<" + fmt)
        return struct.unpack_from("<" + fmt, self.buf, self._take(size, what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("H", f"{what} (length)")
        start = self._take(n, what)
        raw = bytes(self.buf[start : start + n])
        if n == 0 or raw[-1] != 0:
            raise ValueError(f"{self.where}: {what}: not a NUL-terminated string at offset {start}")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{self.where}: {what}: not UTF-8 at offset {start}") from None

    def tensor(self, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...], name: str) -> torch.Tensor:
        start = self._take(nbytes, f"{name}: payload")
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        # the bytes reinterpreted (little-endian, as on every host CTranslate2 runs on), copied into
        # memory of its own: payloads sit at odd offsets after the names
        count = nbytes // dtype.itemsize
        return torch.frombuffer(self.buf, dtype=dtype, count=count, offset=start).clone().reshape(shape)


def dequantize(model: CT2Model, name: str) -> torch.Tensor:
    """Variable ``name`` as a float tensor: float variables as stored (float16 stays float16),
    int8/int16 weights divided by their ``<name>_scale`` (float32). Raises ``ValueError`` for an
    integer weight without a scale, and for zero-point (AWQ) quantization, not read here."""
    value = model.get(name)
    if value is None:
        raise ValueError(f"no variable {name!r}")
    if value.is_floating_point():
        return value
    if model.get(name + "_zero") is not None:
        raise ValueError(f"{name}: quantized with zero points (AWQ); only CTranslate2's int8/int16 scales are read")
    scale = model.get(name + "_scale")
    if scale is None or not scale.is_floating_point():
        raise ValueError(f"{name}: {value.dtype} weight without a float {name}_scale")
    scale = scale.float()
    if scale.dim() == 1 and value.dim() >= 1 and scale.shape[0] == value.shape[0]:  # int8: one scale per row
        scale = scale.reshape(-1, *[1] * (value.dim() - 1))
    elif scale.numel() != 1:
        raise ValueError(f"{name}_scale: shape {list(scale.shape)} does not fit the weight's {list(value.shape)}")
    return value.float() / scale
