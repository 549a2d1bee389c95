"""Typed JSON records that composer writes and reads back (a checkpoint's ``composer.json``, a
bundle's ``manifest.json``): the strict base model, one ``InputError`` naming the file and the
field path when a file does not match it, and the summary facts both files record.

A record is dumped with the keys it was given (``dump_record``): the writers give every key, and
a record read from an older file, which lacks keys added since, is written back as it was read.

Example::

    meta = read_record(CheckpointMeta, path, data)  # InputError "path: insert_at.image: ..."
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, PlainValidator, ValidationError

from composer.errors import InputError, quote_value, validation_message

R = TypeVar("R", bound="Record")


class Record(BaseModel):
    """A JSON record: unknown keys refused, no coercion (``"64"`` is not an integer, ``1`` not
    ``true``; an integer is a number)."""

    model_config = ConfigDict(extra="forbid", strict=True, protected_namespaces=())


def checked(kind: type | tuple[type, ...], ok, want: str) -> PlainValidator:
    """A validator taking a value of ``kind`` (never a bool unless ``kind`` is bool) for which
    ``ok(value)`` holds; otherwise the error says the field must be ``want`` and quotes the value."""

    def check(value):
        is_bool = isinstance(value, bool) and kind is not bool
        if is_bool or not isinstance(value, kind) or not ok(value):
            raise ValueError(f"must be {want}, got {quote_value(value)}")
        return value

    return PlainValidator(check, json_schema_input_type=Any)


PositiveInt = Annotated[int, checked(int, lambda v: 0 < v < 2**31, "a positive integer")]
Index = Annotated[int, checked(int, lambda v: v >= 0, "an integer >= 0")]


def read_record(cls: type[R], path: Path, data: Any) -> R:
    """``data`` (a decoded JSON object read from ``path``) as a ``cls``; one InputError naming
    ``path`` and the first bad field otherwise."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise InputError(f"{path}: {validation_message(e)}") from None


def dump_record(record: Record) -> dict:
    """``record`` as JSON data, with the keys it was built or read with."""
    return record.model_dump(exclude_unset=True)


def write_record(record: Record, path: Path, *, sort_keys: bool = False) -> None:
    """``record`` as indented JSON at ``path``."""
    Path(path).write_text(json.dumps(dump_record(record), indent=2, sort_keys=sort_keys))


class SummaryRow(Record):
    """One row of the component table (``composer.analysis.summary.Row``)."""

    component: str
    kind: str
    params: int
    trainable: int
    insert_at: str = ""
    tokens: str = ""


class ParamCount(Record):
    total: int
    trainable: int


class Summary(Record):
    """``composer.analysis.summary.summary_record``: what a model card shows, without a model."""

    rows: list[SummaryRow]
    name: str
    num_layers: int
    insert_at: dict[str, int]
    mm_tokens_per_item: dict[str, int]
    text_tokens_assumed: int
    prefill_flops_saving_vs_insert_at_0: float
    params: dict[str, ParamCount]


__all__ = [
    "Index",
    "PositiveInt",
    "Record",
    "Summary",
    "checked",
    "dump_record",
    "read_record",
    "write_record",
]
