"""Adapters: the only code that knows Hugging Face model internals. One file per family.

LLM adapters expose the DeepInsert contract over an HF causal LM (weights and layer classes
are reused as-is, nothing is re-implemented):

- ``embed(input_ids, positions)``: token embeddings (+ learned absolute positions, if any)
- ``position_embedding(positions)``: what a token inserted at layer k > 0 gets added (or None)
- ``run_layers(hidden, start, end, positions, mask, cache)``: decoder layers [start, end)
- ``head(hidden)``: final norm + LM head -> logits
"""

from composer.adapters.llm import LLM_ADAPTERS, LLMAdapter, llm_adapter_for
from composer.adapters.vision import ENCODER_ADAPTERS, VisionEncoder

__all__ = ["ENCODER_ADAPTERS", "LLM_ADAPTERS", "LLMAdapter", "VisionEncoder", "llm_adapter_for"]
