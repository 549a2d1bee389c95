"""Analytic FLOPs model of DeepInsert (docs/architecture.md, "FLOPs"), per layer with L tokens, width d, FFN f:

    projections 6·L·d² + attention 4·L²·d + output 2·L·d² + FFN 4·L·d·f (6·L·d·f gated)

Layers < k see the text tokens only; layers >= k see text + MM tokens.
"""

from __future__ import annotations


def layer_flops(tokens: int, d: int, f: int, gated: bool) -> float:
    L = tokens
    return 6 * L * d * d + 4 * L * L * d + 2 * L * d * d + (6 if gated else 4) * L * d * f


def prefill_flops(
    num_layers: int, d: int, f: int, gated: bool, text_tokens: int, mm_tokens: dict[str, int], insert_at: dict[str, int]
) -> float:
    """FLOPs of one prefill through all decoder layers (no LM head, no encoders)."""
    total = 0.0
    for layer in range(num_layers):
        L = text_tokens + sum(n for m, n in mm_tokens.items() if insert_at[m] <= layer)
        total += layer_flops(L, d, f, gated)
    return total


def saving(
    num_layers: int, d: int, f: int, gated: bool, text_tokens: int, mm_tokens: dict[str, int], insert_at: dict[str, int]
) -> float:
    """Fraction of prefill FLOPs saved vs inserting every modality at layer 0."""
    base = prefill_flops(num_layers, d, f, gated, text_tokens, mm_tokens, {m: 0 for m in mm_tokens})
    deep = prefill_flops(num_layers, d, f, gated, text_tokens, mm_tokens, insert_at)
    return 1.0 - deep / base
