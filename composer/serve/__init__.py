"""An OpenAI-compatible server over a bundle or a checkpoint (``compose serve``); needs the
``serve`` extra (``pip install 'mm-composer[serve]'``: FastAPI and uvicorn)."""

from composer.serve.engine import Batcher, Job, QueueFull
from composer.serve.protocol import Limits, RequestError

__all__ = ["Batcher", "Job", "Limits", "QueueFull", "RequestError", "create_app"]


def create_app(runtime, **kwargs):
    """See ``composer.serve.app.create_app``."""
    from composer.serve.app import create_app as _create

    return _create(runtime, **kwargs)
