"""Adapters: the only code that knows Hugging Face model internals. One file per family.

LLM adapters expose the DeepInsert contract over an HF causal LM (weights and layer classes
are reused as-is, nothing is re-implemented):

- ``embed(input_ids, positions)``: token embeddings (+ learned absolute positions, if any)
- ``position_embedding(positions)``: what a token inserted at layer k > 0 gets added (or None)
- ``run_layers(hidden, start, end, positions, mask, cache)``: decoder layers [start, end)
- ``head(hidden)``: final norm + LM head -> logits

Encoder adapters follow ``EncoderAdapter`` (``encoder.py``).
"""

from composer.adapters.audio import ASTAudioEncoder
from composer.adapters.blip2 import Blip2VisionEncoder
from composer.adapters.dinov2 import Dinov2VisionEncoder
from composer.adapters.encoder import EncoderAdapter, HFEncoder
from composer.adapters.llm import LLM_ADAPTERS, LLMAdapter, llm_adapter_for
from composer.adapters.molecule import GinEncoder
from composer.adapters.smiles_bert import SmilesBertEncoder
from composer.adapters.vision import ClipVisionEncoder, SiglipVisionEncoder
from composer.adapters.whisper import WhisperAudioEncoder

# spec `encoder.type` -> adapter class (closed registry; mirrored by composer.spec.ENCODER_TYPES).
ENCODER_ADAPTERS: dict[str, type[EncoderAdapter]] = {
    "clip_vision": ClipVisionEncoder,
    "siglip_vision": SiglipVisionEncoder,
    "blip2_vision": Blip2VisionEncoder,
    "dinov2_vision": Dinov2VisionEncoder,
    "ast_audio": ASTAudioEncoder,
    "whisper_audio": WhisperAudioEncoder,
    "gin": GinEncoder,
    "smiles_bert": SmilesBertEncoder,
}


def encoder_types(runtime) -> dict[str, str]:
    """Modality -> encoder type (registry name) of a ``ComposedModel`` or an ``OnnxPipeline``."""
    return runtime.encoder_types


def text_modalities(types: dict[str, str]) -> frozenset[str]:
    """The modalities (of ``{modality: encoder type}``) whose encoders take text items (SMILES
    strings), not files."""
    return frozenset(m for m, t in types.items() if getattr(ENCODER_ADAPTERS.get(t), "takes_text", False))


def encoder_type_of(encoder: EncoderAdapter) -> str:
    """The registry name of ``encoder``'s class (the nearest registered class in its MRO: FSDP
    re-classes a sharded module as a subclass of its own class)."""
    by_cls = {cls: k for k, cls in ENCODER_ADAPTERS.items()}
    for cls in type(encoder).__mro__:
        if cls in by_cls:
            return by_cls[cls]
    raise TypeError(f"{type(encoder).__name__} is not a registered encoder adapter")


__all__ = [
    "ENCODER_ADAPTERS",
    "EncoderAdapter",
    "HFEncoder",
    "LLM_ADAPTERS",
    "LLMAdapter",
    "encoder_type_of",
    "encoder_types",
    "llm_adapter_for",
    "text_modalities",
]
