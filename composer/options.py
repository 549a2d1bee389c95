"""Command-line options generated from a pydantic model's fields: one owner per option set.

A field's name gives the flag (``max_new_tokens`` -> ``--max-new-tokens``), its type the click
type, its ``description`` the help; a bool field is a ``--x/--no-x`` switch, a list field a
repeatable option. Every generated option defaults to None ("not given"), so the model's own
default (or the spec's value) applies; ``collect`` takes the given ones back out of click's
keyword arguments. ``flags`` maps fields to other spellings, e.g. ``{"do_sample":
"--sample/--greedy", "stop_strings": "--stop"}``; ``flag_of`` turns a field name in a
validation message back into its flag.

Example::

    @click.command()
    @model_options(GenerationSpec, flags={"stop_strings": "--stop"})
    def generate(**kwargs):
        overrides = collect(GenerationSpec, kwargs)   # {"max_new_tokens": 8, ...} as given
"""

from __future__ import annotations

import types
import typing
from typing import Any

import click


def _base(annotation):
    """``int | None`` -> int; ``list[str] | None`` -> list[str]."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return annotation


def _help(text: str, note: str) -> str:
    return f"{text.rstrip('.')} ({note})."


def _flag(name: str, flags: dict[str, str]) -> str:
    return flags.get(name, "--" + name.replace("_", "-"))


def model_options(model: type, *, flags: dict[str, str] | None = None, skip: tuple[str, ...] = ()):
    """A decorator adding one click option per field of ``model`` (a pydantic model class)."""
    flags = flags or {}

    def decorate(f):
        for name, field in reversed(list(model.model_fields.items())):
            if name in skip:
                continue
            t = _base(field.annotation)
            flag = _flag(name, flags)
            help_ = field.description or ""
            if t is bool:
                decl = flag if "/" in flag else f"{flag}/--no-{flag[2:]}"
                f = click.option(decl, name, default=None, help=_help(help_, "default: the spec's"))(f)
            elif typing.get_origin(t) is list:
                item = typing.get_args(t)[0]
                item = _base(typing.get_args(item)[0]) if typing.get_origin(item) is typing.Annotated else item
                f = click.option(flag, name, multiple=True, type=item, help=_help(help_, "repeatable"))(f)
            else:
                f = click.option(flag, name, type=t, default=None, help=_help(help_, "default: the spec's"))(f)
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


def flag_of(message: str, model: type, flags: dict[str, str] | None = None) -> str:
    """A validation message that starts with a field name (``top_p: ...``) -> the same message
    naming the command-line flag (``--top-p: ...``)."""
    field, sep, rest = message.partition(":")
    if sep and field in model.model_fields:
        return _flag(field, flags or {}).split("/")[0] + sep + rest
    return message
