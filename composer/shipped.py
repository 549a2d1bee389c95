"""Specs and configs that ship inside the package: ``compose ls``, ``compose cp NAME DEST``, and a
shipped name wherever a spec path is accepted (``compose build tiny/llava -o out/x``).

Names are paths relative to the shipped ``specs/`` directory without ``.yaml`` (``llava``,
``tiny/llava``, ``smol/llava_demo``); accelerate configs are ``accelerate/<name>``. A file on disk
wins over a shipped name: ``specs/tiny/llava.yaml`` in a checkout is that file.
"""

from __future__ import annotations

import os
import shutil
from importlib import resources
from pathlib import Path

from composer.errors import InputError

PACKAGES = {"spec": "composer.specs", "config": "composer.configs"}


def root(kind: str) -> Path:
    """The directory of the shipped specs (``kind="spec"``) or configs (``"config"``)."""
    return Path(str(resources.files(PACKAGES[kind])))


def catalog() -> list[tuple[str, str, Path, str]]:
    """Every shipped file: (kind, name, path, one-line description), sorted by kind and name."""
    out = []
    for kind in PACKAGES:
        base = root(kind)
        for path in sorted(base.rglob("*.yaml")):
            name = path.relative_to(base).with_suffix("").as_posix()
            out.append((kind, name, path, describe(path)))
    return out


def describe(path: Path) -> str:
    """The file's first comment line (what the shipped files open with), else its ``name:``."""
    name = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        s = line.strip()
        if s.startswith("#") and s.lstrip("#").strip():
            text = s.lstrip("#").strip().rstrip(",;:")
            return text if len(text) <= 110 else text[:107].rstrip() + "..."
        if s.startswith("name:") and not name:
            name = s.removeprefix("name:").strip()
    return name


def find(name: str) -> Path | None:
    """A shipped file's path for ``name`` (``tiny/llava``, ``tiny/llava.yaml``,
    ``specs/tiny/llava.yaml``, ``accelerate/ddp_8gpu``), else None."""
    key = name.strip().removesuffix(".yaml").removesuffix(".yml")
    for prefix in ("specs/", "configs/"):
        key = key.removeprefix(prefix)
    for _, n, path, _ in catalog():
        if n == key:
            return path
    return None


def spec_path(name: str) -> Path | None:
    """A spec argument as given if it is a file, else the shipped spec it names (None: neither)."""
    p = Path(name)
    if p.is_file():
        return p
    found = find(name)
    return found if found is not None and found.is_relative_to(root("spec")) else None


def copy(name: str, dest: str | Path, overwrite: bool = False) -> list[Path]:
    """Copy a shipped spec or config to ``dest`` (a file, or a directory to put it in) with the
    local files it names by relative path (``demo/vision``, ``assets/*.png``...), keeping their
    layout so that the copy builds as the original does; -> the paths written.

    Never writes through a symbolic link: a link where a file goes (dangling or not) is an
    existing file (``overwrite`` replaces the link itself, not what it points to), and a link
    where one of the copied directories goes is refused. Each file is written to a temporary
    file and renamed into place."""
    src = find(name)
    if src is None:
        raise InputError(f"{name!r} is not a shipped spec or config (`compose ls` lists them)")
    dest = Path(dest)
    if dest.is_symlink() and dest.is_dir():
        raise InputError(f"{dest}: is a symbolic link to a directory; name the directory itself")
    target = dest / src.name if dest.is_dir() else dest
    files = [(src, target)]
    for rel in _local_references(src):
        s, t = src.parent / rel, target.parent / rel
        if s.is_dir():
            files += [(f, t / f.relative_to(s)) for f in sorted(s.rglob("*")) if f.is_file()]
        else:
            files.append((s, t))
    base = target.parent
    for _, t in files:
        for d in list(reversed(t.relative_to(base).parents))[1:]:  # the directories the copy puts under DEST
            if (base / d).is_symlink():
                raise InputError(f"{base / d}: is a symbolic link; compose cp does not write through links")
        if t.is_dir() and not t.is_symlink():
            raise InputError(f"{t}: is a directory where the file {t.name} goes")
    clash = [str(t) for _, t in files if os.path.lexists(t)]
    if clash and not overwrite:
        raise InputError(f"{clash[0]} exists (pass --overwrite to replace it)")
    written = []
    for s, t in files:
        t.parent.mkdir(parents=True, exist_ok=True)
        _copy_file(s, t)
        written.append(t)
    return written


def _copy_file(src: Path, dst: Path) -> None:
    """``src``'s bytes to ``dst`` through a new temp file (O_EXCL: the mode the umask gives, no
    link followed) renamed over it: a link at ``dst`` is replaced, never written through."""
    import secrets

    tmp = dst.parent / f".{dst.name}.{secrets.token_hex(6)}.tmp"
    try:
        with open(tmp, "xb") as out, open(src, "rb") as f:
            shutil.copyfileobj(f, out)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _local_references(spec_file: Path) -> list[str]:
    """Relative paths inside the spec that name files or directories next to it."""
    import yaml

    refs: list[str] = []

    def walk(x) -> None:
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif (
            isinstance(x, str)
            and x not in ("", ".", "..")
            and not x.startswith(("/", "package:", "~"))
            and "\n" not in x
        ):
            p = spec_file.parent / x
            if p.exists() and p.resolve().is_relative_to(spec_file.parent.resolve()) and x not in refs:
                refs.append(x)

    walk(yaml.safe_load(spec_file.read_text(encoding="utf-8")))
    return refs
