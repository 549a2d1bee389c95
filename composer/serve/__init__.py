"""An OpenAI-compatible server over a bundle or a checkpoint (``compose serve``); needs the
``serve`` extra (``pip install 'mm-composer[serve]'``: FastAPI and uvicorn).

``from composer.serve import create_app, Limits`` works; each submodule loads on first use
(``composer.serve.protocol``, where ``Limits`` lives, loads neither torch nor FastAPI).
"""

from __future__ import annotations

from composer.lazy import lazy_attributes

_LAZY = {
    "Batcher": "composer.serve.engine",
    "Job": "composer.serve.engine",
    "QueueFull": "composer.serve.engine",
    "Limits": "composer.serve.protocol",
    "RequestError": "composer.serve.protocol",
    "create_app": "composer.serve.app",
}

__all__ = sorted(_LAZY)

__getattr__ = lazy_attributes(__name__, _LAZY)
