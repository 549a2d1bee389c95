"""Analytic FLOPs model of DeepInsert (docs/architecture.md, "FLOPs"). One decoder layer, ``q`` query
tokens attending over ``ctx`` keys, width d, query width d_q = heads·head_dim, key/value width
d_kv = kv_heads·head_dim (grouped-query attention), FFN f:

    Q and O projections 2·q·d·d_q each, K and V projections 2·q·d·d_kv each,
    attention scores and values 4·q·ctx·d_q, FFN 4·q·d·f (6·q·d·f gated)

Layers < k see the text tokens only; layers >= k see text + MM tokens. The LM head, the
embeddings and the encoders are not counted.
"""

from __future__ import annotations

from composer.adapters.llm import LLMShape


def layer_flops(shape: LLMShape, q: int, ctx: int | None = None) -> float:
    """FLOPs of one decoder layer for ``q`` query tokens over ``ctx`` keys (default: ``q``, a prefill)."""
    ctx = q if ctx is None else ctx
    d, f = shape.hidden_size, shape.intermediate_size
    d_q = shape.num_heads * shape.head_dim
    d_kv = shape.num_kv_heads * shape.head_dim
    proj = 2 * q * d * d_q * 2 + 2 * q * d * d_kv * 2
    return proj + 4 * q * ctx * d_q + (6 if shape.gated_mlp else 4) * q * d * f


def tokens_per_layer(shape: LLMShape, text_tokens: int, mm_tokens: dict[str, int], insert_at: dict[str, int]):
    """Active tokens at each layer: text, plus each modality's tokens from its insertion layer on."""
    return [
        text_tokens + sum(n for m, n in mm_tokens.items() if insert_at[m] <= layer) for layer in range(shape.num_layers)
    ]


def prefill_flops(shape: LLMShape, text_tokens: int, mm_tokens: dict[str, int], insert_at: dict[str, int]) -> float:
    """FLOPs of one prefill through all decoder layers (no LM head, no encoders)."""
    return sum(layer_flops(shape, L) for L in tokens_per_layer(shape, text_tokens, mm_tokens, insert_at))


def saving(shape: LLMShape, text_tokens: int, mm_tokens: dict[str, int], insert_at: dict[str, int]) -> float:
    """Fraction of prefill FLOPs saved vs inserting every modality at layer 0."""
    base = prefill_flops(shape, text_tokens, mm_tokens, {m: 0 for m in mm_tokens})
    return 1.0 - prefill_flops(shape, text_tokens, mm_tokens, insert_at) / base


def frozen_llm_training_flops(
    shape: LLMShape, text_tokens: int, mm_tokens: dict[str, int], insert_at: dict[str, int]
) -> float:
    """One training step's decoder FLOPs when the LLM is frozen and only the modality side trains:
    every layer forward, and a backward (input gradients only: about the forward's FLOPs) through
    the layers from the lowest insertion layer on; the layers below it see text only, which no
    trainable weight reaches, so autograd skips them."""
    per_layer = [layer_flops(shape, L) for L in tokens_per_layer(shape, text_tokens, mm_tokens, insert_at)]
    low = min(insert_at.values(), default=0)
    return sum(per_layer) + sum(per_layer[low:])
