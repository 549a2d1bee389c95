"""What the command modules share: the console and the output-directory check."""

from __future__ import annotations

from pathlib import Path

from composer.errors import InputError


def console(stderr: bool = False):
    """A rich console that prints spec-provided names as text, and does not wrap tables in logs and pipes."""
    from rich.console import Console

    con = Console(stderr=stderr, highlight=False, markup=False)  # names from specs are text, not rich markup
    if not con.is_terminal:
        con.width = max(con.width, 120)  # logs and pipes: do not wrap the tables
    return con


def refuse_non_empty(out: Path, overwrite: bool) -> None:
    """OUTPUT exists and is not empty (a file, or a directory with something in it) without --overwrite: one error."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise InputError(f"{out}: exists and is not empty (pass --overwrite)")
