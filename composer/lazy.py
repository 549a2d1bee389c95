"""Lazy package attributes: ``from composer.train import train`` imports ``composer.train.loop`` on
first use, so that importing the package alone loads no torch, onnx or FastAPI.

    _LAZY = {"train": "composer.train.loop", "TrainConfig": "composer.train.config"}
    __all__ = sorted(_LAZY)
    __getattr__ = lazy_attributes(__name__, _LAZY)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_attributes(package: str, table: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: each name in ``table`` comes from the module it maps to."""

    def __getattr__(name: str) -> Any:
        if name in table:
            return getattr(importlib.import_module(table[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
