"""Command-line options generated from a pydantic model's fields: one owner per option set.

A field's name gives the flag (``max_new_tokens`` -> ``--max-new-tokens``), its type the click
type (a ``Literal`` of strings a ``click.Choice``), its ``description`` the help; a bool field is
a switch, a list field a repeatable option. A field named in a description or a message in
backticks (```epochs```) reads as its flag (``--epochs``).

Two ways to default:

- ``defaults=False`` (``compose generate``): every option defaults to None ("not given"), so the
  model's own default (or the spec's value) applies; bools are ``--x/--no-x``.
- ``defaults=True`` (``compose train``): the option's default is the field's, shown in the help; a
  field without a default is a required option; a bool that defaults to False is a plain flag.

``collect`` takes the given ones back out of click's keyword arguments. ``flags`` maps fields to
other spellings: one flag (``"stop_strings": "--stop"``), several (``"output": ("-o",
"--output")``), an on/off pair for a bool (``"do_sample": "--sample/--greedy"``), or a flag that
sets the field to one value (``"on_bad_record": "--skip-bad-records=skip"``). ``types`` gives a
field another click type (``click.Path(dir_okay=False)``). ``flag_of`` turns a field name in a
validation message back into its flag.

Example::

    @click.command()
    @model_options(GenerationSpec, flags={"stop_strings": "--stop"})
    def generate(**kwargs):
        overrides = collect(GenerationSpec, kwargs)   # {"max_new_tokens": 8, ...} as given
"""

from __future__ import annotations

import re
import types
import typing
from typing import Any

import click

Flags = dict[str, str | tuple[str, ...]]


def _base(annotation):
    """``int | None`` -> int; ``list[str] | None`` -> list[str]; ``Annotated[str, ...]`` -> str."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _help(text: str, note: str) -> str:
    return f"{text.rstrip('.')} ({note})."


def _decls(name: str, flags: Flags) -> tuple[str, ...]:
    spelling = flags.get(name, "--" + name.replace("_", "-"))
    return (spelling,) if isinstance(spelling, str) else tuple(spelling)


def _flag(name: str, flags: Flags) -> str:
    """The flag that names field ``name`` in messages: ``--output`` for ``("-o", "--output")``,
    ``--sample`` for ``--sample/--greedy``, ``--skip-bad-records`` for ``--skip-bad-records=skip``."""
    decls = _decls(name, flags)
    long = [d for d in decls if d.startswith("--")] or list(decls)
    return long[-1].split("/")[0].split("=")[0]


def _in_flags(text: str, model: type, flags: Flags) -> str:
    """```field``` -> ``--field`` for each field of ``model`` named in backticks in ``text``."""
    return re.sub(
        r"`([A-Za-z_][A-Za-z0-9_]*)`", lambda m: _flag(m[1], flags) if m[1] in model.model_fields else m[0], text
    )


def _option(model: type, name: str, field, flags: Flags, types_: dict, defaults: bool):
    """The ``click.option`` decorator of one field."""
    t = _base(field.annotation)
    decls = _decls(name, flags)
    help_ = _in_flags(field.description or "", model, flags)
    kw: dict[str, Any] = {"default": None}
    if defaults and field.is_required():
        kw = {"required": True}  # no default at all: click takes an explicit None for one
    elif defaults:
        kw["default"] = field.get_default(call_default_factory=True)
    if len(decls) == 1 and "=" in decls[0]:  # a flag that sets the field to one value
        flag, value = decls[0].split("=", 1)
        default = kw.get("default")
        note = f"this flag: {value}" + (f"; default: {default}" if default is not None else "")
        return click.option(flag, name, flag_value=value, default=default, help=_help(help_, note))
    if t is bool:
        if defaults and "/" not in decls[0] and not kw.get("default"):
            return click.option(*decls, name, is_flag=True, default=False, help=help_)
        decl = decls[0] if "/" in decls[0] else f"{decls[0]}/--no-{decls[0][2:]}"
        if defaults:
            return click.option(decl, name, show_default=True, help=help_, **kw)
        return click.option(decl, name, default=None, help=_help(help_, "default: the spec's"))
    if typing.get_origin(t) is list:
        item = typing.get_args(t)[0]
        item = _base(typing.get_args(item)[0]) if typing.get_origin(item) is typing.Annotated else item
        return click.option(*decls, name, multiple=True, type=types_.get(name, item), help=_help(help_, "repeatable"))
    if typing.get_origin(t) is typing.Literal:
        t = click.Choice([str(a) for a in typing.get_args(t)])
    t = types_.get(name, t)
    if defaults:
        return click.option(*decls, name, type=t, show_default=kw.get("default") is not None, help=help_, **kw)
    return click.option(*decls, name, type=t, default=None, help=_help(help_, "default: the spec's"))


def model_options(
    model: type,
    *,
    flags: Flags | None = None,
    skip: tuple[str, ...] = (),
    types: dict[str, click.ParamType] | None = None,
    defaults: bool = False,
):
    """A decorator adding one click option per field of ``model`` (a pydantic model class), in
    field order; ``skip``: fields that are no options."""
    flags, types_ = flags or {}, types or {}

    def decorate(f):
        for name, field in reversed(list(model.model_fields.items())):
            if name not in skip:
                f = _option(model, name, field, flags, types_, defaults)(f)
        return f

    return decorate


def collect(model: type, kwargs: dict[str, Any], *, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Pop ``model``'s fields out of click's ``kwargs``: -> the ones given (None and () dropped)."""
    out = {}
    for name in model.model_fields:
        if name in skip or name not in kwargs:
            continue
        v = kwargs.pop(name)
        if isinstance(v, tuple):
            v = list(v) or None
        if v is not None:
            out[name] = v
    return out


def flag_of(message: str, model: type, flags: Flags | None = None) -> str:
    """A validation message that starts with a field name (``top_p: ...``) -> the same message
    naming the command-line flag (``--top-p: ...``), and the fields it names in backticks too."""
    field, sep, rest = message.partition(":")
    if sep and field in model.model_fields:
        return _flag(field, flags or {}) + sep + _in_flags(rest, model, flags or {})
    return message
