"""Error types. Each carries the CLI exit code it maps to.

`ComposerError` subclasses are expected failures with a one-line message that names what
and where; the CLI prints the message alone (no traceback unless --debug).
"""

from __future__ import annotations


class ComposerError(Exception):
    """Base class; `exit_code` 2 = bad input, 1 = runtime failure."""

    exit_code = 1


class SpecError(ComposerError):
    """The spec is malformed or inconsistent (names the field path and the bad value)."""

    exit_code = 2


class InputError(ComposerError):
    """Bad user input: missing/corrupt files, wrong shapes, prompts without placeholders, ..."""

    exit_code = 2


def read_versioned_json(path, version: int, what: str, hint: str = "") -> dict:
    """``path`` as a JSON object whose ``format_version`` is ``version``; one InputError naming the
    file otherwise (``what``: what the file is, for the message; ``hint``: what to do about an
    older version)."""
    import json
    from pathlib import Path

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: invalid JSON ({e})") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read {what} ({type(e).__name__}: {e})") from None
    found = data.get("format_version") if isinstance(data, dict) else None
    if found != version:
        older = hint and isinstance(found, int) and found < version
        raise InputError(
            f"{path}: unknown format_version {found!r} (this composer reads {version})" + (f": {hint}" if older else "")
        )
    return data


def unencodable(value, path: str = "") -> tuple[str, str] | None:
    """The first string in a decoded JSON value (keys included) that is not valid Unicode text -
    a lone surrogate such as ``"\\ud800"``, which JSON escapes allow and no tokenizer, file system
    or UTF-8 writer takes - as ``(where, the string)``; ``where`` is its path (``messages[0].content``,
    ``body`` at the top; for a key, the object holding it). None when every string is text."""
    stack = [(value, path)]
    while stack:
        v, p = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return p or "body", v
        elif isinstance(v, dict):
            stack.extend((w, f"{p}.{k}".lstrip(".")) for k, w in v.items())
            stack.extend((k, p) for k in v)
        elif isinstance(v, list):
            stack.extend((w, f"{p}[{i}]") for i, w in enumerate(v))
    return None


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty): what a
    one-line error quotes from a library's multi-line one."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# pydantic's error types -> what the value must be (else pydantic's "Input should be ..." as "must be ...")
_MUST = {
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "finite_number": "must be a finite number",
    "literal_error": "must be {expected}",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_parsing": "must be a number",
    "bool_parsing": "must be true or false",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
    "dict_type": "must be an object",
    "list_type": "must be a list",
}


def field_path(loc: tuple) -> str:
    """pydantic's error location as a field path: ``stages[0].start``, ``graphs['encoder.image.onnx']``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier():
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out


def quote_value(value) -> str:
    """``repr(value)``, cut to 100 characters: how an error message quotes what it got."""
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


def requirement(error: dict) -> str:
    """What a pydantic error says the value must be, in composer's words (``must be > 0``,
    ``must be 'a' or 'b'``); pydantic's own message for kinds without a wording here."""
    must = _MUST.get(error["type"])
    ctx = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in error.get("ctx", {}).items()}
    return must.format(**ctx) if must else error["msg"].replace("Input should be", "must be", 1)


def describe_error(error: dict, unknown: str = "unknown key") -> str:
    """One pydantic error as ``field.path: what is wrong, got value`` (``lr: must be > 0, got -1.0``;
    a missing field: ``missing``; a field the model does not have: ``unknown``)."""
    kind = error["type"]
    if kind == "missing":
        text = "missing"
    elif kind == "extra_forbidden":
        text = unknown
    elif kind == "value_error":  # ours: the message says it all (and quotes the value where it helps)
        text = error["msg"].removeprefix("Value error, ")
    else:
        text = f"{requirement(error)}, got {quote_value(error['input'])}"
    where = field_path(error["loc"])
    return f"{where}: {text}" if where else text


def validation_message(e, unknown: str = "unknown key") -> str:
    """A pydantic ``ValidationError`` as one line naming the field (its first error, ``describe_error``):
    what the configs built from command-line options, the generation settings and the records
    composer reads back report."""
    return describe_error(e.errors()[0], unknown)
