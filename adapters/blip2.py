"""BLIP-2 vision tower (EVA ViT-g/14 in the published checkpoints) as an encoder adapter.

Output: exactly what transformers' ``Blip2ForConditionalGeneration`` feeds its Q-Former, the
last layer's hidden states *after* ``post_layernorm``, every token, CLS included:
(n, 1 + (image_size / patch_size)^2, width), i.e. (n, 257, 1408) for blip2-opt-2.7b.

Spec fields:

- ``feature_layer`` is honoured. ``-1`` (the default) is the output above. Any other index
  takes ``hidden_states[i]`` as LLaVA does (``-2`` penultimate layer), before any layernorm,
  for experiments; BLIP-2's Q-Former was trained on ``-1``.
- ``select`` is ignored: the Q-Former cross-attends to all tokens, CLS included (the spec's
  default ``patch`` is LLaVA's choice and would drop it).

Weights: ``encoder.model`` names a vision-tower checkpoint (``model_type:
blip_2_vision_model``) or a whole BLIP-2 checkpoint (``model_type: blip-2``, e.g.
``Salesforce/blip2-opt-2.7b``): its ``vision_config`` and only its ``vision_model.*`` tensors
are read. (``Blip2VisionModel.from_pretrained`` on a whole checkpoint does not fit: its keys
carry the ``vision_model.`` prefix, and transformers 5.23 initialises the tower at random with
a warning.) The image processor is BLIP's (``BlipImageProcessorPil``: bicubic resize to a
square, CLIP mean/std), from ``preprocessor_config.json`` next to the weights.
"""

from __future__ import annotations

import torch

from composer.adapters.encoder import maybe_no_init
from composer.adapters.vision import VisionEncoder

TOWER_PREFIX = "vision_model."  # where a whole BLIP-2 checkpoint keeps the vision tower
# Key prefixes that mark a whole BLIP-2 checkpoint (a tower-only one has bare keys).
WHOLE_MODEL_KEYS = (TOWER_PREFIX, "query_tokens", "qformer.", "language_projection.", "language_model.")


class Blip2VisionEncoder(VisionEncoder):
    """Wraps ``Blip2VisionModel``; keys below ``encoders.<m>.model`` are the tower's own."""

    has_cls_token = True

    @staticmethod
    def hf_classes():
        from transformers import Blip2VisionConfig, Blip2VisionModel, BlipImageProcessorPil

        return Blip2VisionConfig, Blip2VisionModel, BlipImageProcessorPil

    @staticmethod
    def default_processor_kwargs(config) -> dict:
        s = config.image_size
        return {"size": {"height": s, "width": s}}

    @classmethod
    def create(cls, config, spec, *, src, dtype, load_weights):
        if src is None or not load_weights:
            return super().create(config, spec, src=None, dtype=dtype, load_weights=load_weights)
        model_cls = cls.hf_classes()[1]
        with maybe_no_init(True):
            hf = model_cls(config)
        load_tower(hf, src)
        return cls._wrap(hf.to(dtype or torch.float32), spec)

    @property
    def num_tokens(self) -> int:
        c = self.model.config
        return (c.image_size // c.patch_size) ** 2 + 1  # CLS + patches, whatever `select` says

    def example_inputs(self, n: int) -> dict[str, torch.Tensor]:
        s = self.model.config.image_size  # RGB only: Blip2VisionConfig has no num_channels
        return {"pixel_values": torch.randn(n, 3, s, s)}

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (n, 3, H, W) -> (n, 1 + P, d_enc)
        if self.feature_layer == -1:
            return self.model(pixel_values=pixel_values.to(self.dtype)).last_hidden_state  # post-layernorm
        out = self.model(pixel_values=pixel_values.to(self.dtype), output_hidden_states=True)
        return out.hidden_states[self.feature_layer]


def load_tower(hf: torch.nn.Module, src: str) -> None:
    """Load ``hf`` (a ``Blip2VisionModel``) strictly from a tower or whole-model checkpoint.

    Raises ``ValueError`` naming ``src`` when tensors are missing or have other shapes.
    """
    from composer.hf_weights import CheckpointFiles

    ckpt = CheckpointFiles(src)
    prefix = TOWER_PREFIX if any(k.startswith(WHOLE_MODEL_KEYS) for k in ckpt.key_file) else ""
    own = hf.state_dict()
    missing = [prefix + k for k in own if prefix + k not in ckpt.key_file]
    if missing:
        raise ValueError(f"{src}: no vision tower tensors {missing[:3]} ({len(missing)} of {len(own)} missing)")
    state = {k[len(prefix) :]: v for k, v in ckpt.read(prefix + k for k in own).items()}
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise ValueError(f"{src}: {prefix}{k} has shape {tuple(v.shape)}, the config needs {tuple(own[k].shape)}")
    hf.load_state_dict(state, strict=True)
