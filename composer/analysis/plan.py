"""``compose plan``: the analytic cost of every insertion layer k, from the FLOPs model of docs/architecture.md.

For a prompt of ``T`` text tokens and ``M`` MM tokens (all modalities entering at the same
k), per layer with L query tokens over C context tokens, width d, FFN width f:

    projections 6·L·d² + attention 4·L·C·d + output 2·L·d² + FFN 4·L·d·f (6·L·d·f gated)

Prefill has L = C = tokens in that layer (T below k, T+M from k). A decoded token has L = 1
and C = the layer's cache length + 1. The KV cache holds 2 · kv_heads · head_dim values per
token per layer, in the LLM's dtype.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from composer.adapters.llm import LLMShape
from composer.analysis.flops import layer_flops

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class PlanRow:
    k: int
    prefill_flops: float
    decode_flops: float  # the first generated token
    kv_bytes: int  # cache after prefill
    prefill_saving: float
    decode_saving: float
    kv_saving: float


def plan(shape: LLMShape, text_tokens: int, mm_tokens: int, dtype_bytes: int) -> list[PlanRow]:
    """One row per k in [0, N): cost with every modality inserted at k, and savings vs k = 0."""
    N = shape.num_layers
    per_token_kv = 2 * shape.num_kv_heads * shape.head_dim * dtype_bytes
    rows = []
    for k in range(N):
        tokens = [text_tokens if layer < k else text_tokens + mm_tokens for layer in range(N)]
        prefill = sum(layer_flops(shape, L) for L in tokens)
        decode = sum(layer_flops(shape, 1, L + 1) for L in tokens)
        kv = per_token_kv * sum(tokens)
        rows.append(PlanRow(k, prefill, decode, kv, 0.0, 0.0, 0.0))
    base = rows[0]
    for r in rows:
        r.prefill_saving = 1 - r.prefill_flops / base.prefill_flops
        r.decode_saving = 1 - r.decode_flops / base.decode_flops
        r.kv_saving = 1 - r.kv_bytes / base.kv_bytes
    return rows


def as_dicts(rows: list[PlanRow]) -> list[dict]:
    return [asdict(r) for r in rows]


SPARK = " ▁▂▃▄▅▆▇█"


def sparkline(values: list[float]) -> str:
    """A text plot for terminals without matplotlib."""
    hi = max(values) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, round(v / hi * (len(SPARK) - 1)))] for v in values)


def plot_png(rows: list[PlanRow], path: str, title: str) -> bool:
    """Savings vs k as a PNG; returns False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ks = [r.k for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(ks, [100 * r.prefill_saving for r in rows], label="prefill FLOPs")
    ax.plot(ks, [100 * r.decode_saving for r in rows], label="decode FLOPs / token")
    ax.plot(ks, [100 * r.kv_saving for r in rows], label="KV cache")
    ax.set_xlabel("insert_at k")
    ax.set_ylabel("saving vs k = 0 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
