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
