"""The encoder adapter contract, and its Hugging Face implementation.

An encoder adapter is an ``nn.Module`` that turns preprocessed modality inputs into features
``(items, T_enc, d_enc)``; a projector then maps them to LLM tokens. To add an encoder family,
subclass ``EncoderAdapter`` (or ``HFEncoder`` for a transformers model) in its own file and
register it in ``ENCODER_ADAPTERS`` (``adapters/__init__.py``) and ``composer.spec.ENCODER_TYPES``.

Inputs: ``input_names`` names the tensors ``preprocess`` returns and ``forward`` takes, each
with the item axis first. With one input, the batch may hold the bare tensor.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn


class EncoderAdapter(nn.Module):
    """Base class: what the builder, the checkpoint code and the ONNX exporter rely on."""

    input_names: tuple[str, ...] = ("pixel_values",)

    # -- construction (classmethods: the builder calls them before an instance exists) ----------
    @classmethod
    def load_config(cls, src: str):
        """Config of a pretrained encoder in a Hub repo or local dir."""
        raise NotImplementedError

    @classmethod
    def config_from_dict(cls, d: dict[str, Any]):
        """Config from an inline spec dict or from ``composer.json``."""
        raise NotImplementedError

    @classmethod
    def convert_package_source(cls, src, out_dir) -> None:
        """Write a directory that ``load_config``/``create``/``make_processor`` read (the HF layout:
        config.json, model.safetensors, preprocessor files) converted from ``src``, a file or
        directory an installed package ships (``package:`` sources, see composer.packages). Raise
        ValueError (or OSError) for a source this type cannot read."""
        raise ValueError(f"the {cls.__name__} encoder does not read package: sources")

    @classmethod
    def package_source_files(cls, src) -> list:
        """Every file or directory the conversion of ``src`` reads (their SHA-256 keys the cache);
        ``[src]`` unless the format spreads over several places."""
        return [src]

    @classmethod
    def check_config(cls, config) -> None:
        """Raise ValueError (naming the ``config.`` field) for sizes the encoder cannot run with; the
        builder calls it before ``create``, so the error is the spec's, not a failure deep in torch."""

    @classmethod
    def create(cls, config, spec, *, src: str | None, dtype: torch.dtype | None, load_weights: bool) -> EncoderAdapter:
        """An instance: pretrained weights from ``src`` when ``load_weights``, else random/no init."""
        raise NotImplementedError

    @classmethod
    def make_processor(cls, config, src: str | None, overrides: dict[str, Any]):
        """The preprocessor for raw items (from ``src`` if given, else from the config)."""
        raise NotImplementedError

    @classmethod
    def load_processor(cls, path: str):
        raise NotImplementedError

    @staticmethod
    def preprocess(processor, items: list) -> torch.Tensor | dict[str, torch.Tensor]:
        """Raw items (file paths, arrays, ...) -> batched inputs, item axis first."""
        raise NotImplementedError

    # -- facts -----------------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        raise NotImplementedError

    @property
    def num_tokens(self) -> int:
        """Feature tokens per item (before the projector)."""
        raise NotImplementedError

    def config_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def example_inputs(self, n: int) -> dict[str, torch.Tensor]:
        """Random inputs for ``n`` items (ONNX tracing, ``--verify``)."""
        raise NotImplementedError

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Dynamic axes of each input for export; the item axis by default."""
        return {name: {0: "items"} for name in self.input_names}

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def as_inputs(self, x) -> dict[str, torch.Tensor]:
        """Accept the bare tensor for single-input encoders."""
        if isinstance(x, dict):
            missing = set(self.input_names) - set(x)
            if missing:
                from composer.errors import InputError

                raise InputError(f"encoder inputs missing: {sorted(missing)} (expected {list(self.input_names)})")
            return {k: x[k] for k in self.input_names}
        (name,) = self.input_names
        return {name: x}


def hidden_state_index(feature_layer: int, n: int, what: str = "encoder") -> int:
    """``feature_layer`` (LLaVA's convention: -1 the last, -2 the penultimate) as an index into
    ``[embeddings, layer 1, ..., layer n]``; ValueError naming the range outside ``[-(n+1), n]``."""
    if not -(n + 1) <= feature_layer <= n:
        raise ValueError(f"feature_layer must be in [-{n + 1}, {n}] for a {n}-layer {what}, got {feature_layer}")
    return feature_layer % (n + 1)


@contextlib.contextmanager
def maybe_no_init(skip: bool):
    """Skip weight initialisation when the weights are loaded right after."""
    if not skip:
        yield
        return
    from transformers.initialization import no_init_weights

    with no_init_weights():
        yield


class HFEncoder(EncoderAdapter):
    """An encoder backed by a transformers model; subclasses give ``hf_classes()``:
    (config class, model class, processor class)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @staticmethod
    def hf_classes() -> tuple[type, type, type]:
        raise NotImplementedError

    @staticmethod
    def default_processor_kwargs(config) -> dict[str, Any]:
        return {}

    @classmethod
    def _own_config(cls, config):
        config_cls = cls.hf_classes()[0]
        if isinstance(config, config_cls):
            return config
        for sub in ("vision_config", "audio_config", "encoder_config"):  # full checkpoints nest the tower's config
            if isinstance(getattr(config, sub, None), config_cls):
                return getattr(config, sub)
        return config_cls(**{k: v for k, v in config.to_dict().items() if k != "model_type"})

    @classmethod
    def load_config(cls, src: str):
        from transformers import AutoConfig

        return cls._own_config(AutoConfig.from_pretrained(src, trust_remote_code=False))

    @classmethod
    def config_from_dict(cls, d: dict[str, Any]):
        return cls.hf_classes()[0](**{k: v for k, v in d.items() if k != "model_type"})

    @classmethod
    def _wrap(cls, hf: nn.Module, spec) -> HFEncoder:
        return cls(hf)

    @classmethod
    def create(cls, config, spec, *, src, dtype, load_weights):
        model_cls = cls.hf_classes()[1]
        if src is not None and load_weights:
            hf = model_cls.from_pretrained(src, dtype=dtype or torch.float32)
        else:
            with maybe_no_init(not load_weights):
                hf = model_cls(config)
            if dtype is not None:
                hf = hf.to(dtype)
        return cls._wrap(hf, spec)

    @classmethod
    def make_processor(cls, config, src, overrides):
        proc_cls = cls.hf_classes()[2]
        if src is not None:
            return proc_cls.from_pretrained(src, **overrides)
        return proc_cls(**{**cls.default_processor_kwargs(config), **overrides})

    @classmethod
    def load_processor(cls, path: str):
        """A saved processor dir of this machine (never looked up on the Hub)."""
        return cls.hf_classes()[2].from_pretrained(path, local_files_only=True)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def config_dict(self) -> dict[str, Any]:
        return self.model.config.to_dict()
