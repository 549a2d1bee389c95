"""What a TARGET argument names: one resolver for every command and API that takes a spec, a
checkpoint, a bundle or a Hub repo (``compose build/inspect/plan/train/bench/probe/generate/serve``,
``composer.load_spec``, ``composer.pipeline``).

In order, the first that applies:

1. a directory: an ONNX bundle if it holds ``manifest.json``, a composed checkpoint if it holds
   ``composer.json``, otherwise an error naming both;
2. a file: a spec file;
3. a shipped spec name (``tiny/llava``, ``smol/llava_demo``, ``llava``; ``compose ls`` lists them);
4. a Hub repo id (``owner/name``, ``owner/name@rev``), where the caller accepts one.

So a path on disk always wins, and a shipped name wins over a Hub repo of the same spelling (a
Hub repo called ``tiny/llava`` is reached as ``tiny/llava@main``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from composer.errors import InputError

Kind = Literal["spec", "checkpoint", "bundle", "hub"]
KINDS: tuple[Kind, ...] = ("spec", "checkpoint", "bundle", "hub")
_NAMES = {
    "spec": "a spec file or shipped spec name",
    "checkpoint": "a composer checkpoint directory",
    "bundle": "an ONNX bundle directory",
    "hub": "a Hub repo id",
}


def _wanted(accept: tuple[Kind, ...]) -> str:
    names = [_NAMES[k] for k in accept]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


@dataclass(frozen=True)
class Target:
    """A resolved TARGET: ``kind`` and, for local kinds, the ``path`` to read (for a shipped spec,
    the file inside the installed package); ``ref`` is the argument as given."""

    kind: Kind
    ref: str
    path: Path | None = None


def resolve(target: str | Path, accept: tuple[Kind, ...] = KINDS) -> Target:
    """Resolve ``target`` (module docstring) to one of the kinds in ``accept``; anything else is an
    ``InputError`` naming the argument and what was accepted."""
    from composer import shipped

    ref = str(target)
    p = Path(ref)
    found: Target | None = None
    if p.is_dir():
        if (p / "manifest.json").is_file():
            found = Target("bundle", ref, p)
        elif (p / "composer.json").is_file():
            found = Target("checkpoint", ref, p)
        else:
            raise InputError(
                f"{ref}: neither a composer checkpoint (no composer.json) nor an ONNX bundle (no manifest.json)"
            )
    elif p.is_file():
        found = Target("spec", ref, p)
    elif (s := shipped.spec_path(ref)) is not None:
        found = Target("spec", ref, s)
    elif "hub" in accept:
        from composer.refs import is_hub_repo

        if is_hub_repo(ref):
            found = Target("hub", ref)
    if found is None:
        hint = " (`compose ls` lists the shipped specs)" if "spec" in accept else ""
        raise InputError(f"{ref}: no such file or directory; expected {_wanted(accept)}{hint}")
    if found.kind not in accept:
        what = _NAMES[found.kind]
        if found.kind == "spec":
            what = "a shipped spec" if found.path.is_relative_to(shipped.root("spec")) else "a spec file"
            if "checkpoint" in accept:
                what += f" (build it first: compose build {ref} -o DIR)"
        raise InputError(f"{ref}: expected {_wanted(accept)}; this is {what}")
    return found
