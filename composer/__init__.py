"""composer: compose multimodal LMs from a YAML spec, with DeepInsert.

import composer
spec = composer.load_spec("specs/tiny/llava.yaml")
model = composer.build(spec)
"""

from composer.errors import ComposerError, InputError, SpecError
from composer.spec import Spec, load_spec, parse_spec

__version__ = "0.1.0"


def build(spec, **kwargs):
    """Build a ``ComposedModel`` from a ``Spec`` or a spec file path (see ``composer.builder.build``)."""
    from composer.builder import build as _build

    return _build(spec, **kwargs)


def pipeline(target, **kwargs):
    """Text and media in, generated text out: ``composer.pipeline("out/model.onnx")("What is it?",
    image="a.png")``, for a checkpoint dir, an ONNX bundle, a Hub id or a spec file (see
    ``composer.text_pipeline.Pipeline``)."""
    from composer.text_pipeline import pipeline as _pipeline

    return _pipeline(target, **kwargs)


def __getattr__(name):
    # torch-heavy names load lazily so `import composer` and spec validation stay instant
    if name == "ComposedModel":
        from composer.model import ComposedModel

        return ComposedModel
    raise AttributeError(f"module 'composer' has no attribute {name!r}")


__all__ = [
    "ComposedModel",
    "ComposerError",
    "InputError",
    "Spec",
    "SpecError",
    "build",
    "load_spec",
    "parse_spec",
    "pipeline",
]
