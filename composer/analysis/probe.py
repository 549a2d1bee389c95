"""``compose probe``: a quick heuristic for choosing the insertion layer k of a trained k = 0 model.

Two measurements on the records of a JSONL data file (``composer.train.data`` formats):

1. *Alignment per layer* (IMA-style): the model runs at ``insert_at: 0`` and forward pre-hooks
   on the LLM decoder layers capture the hidden states *entering* each layer l (l = 0: the
   embeddings with the projected MM tokens spliced in), i.e. what the MM tokens would be
   spliced into if they were inserted at k = l. Per record and layer: the cosine similarity
   between the mean-pooled MM token states and the mean-pooled text token states, and the
   max and the (lower) median of the MM x text token-pair cosine matrix; averaged over the
   records. Text tokens are the record's real non-MM tokens (prompt and response) except a
   leading BOS token, whose states are outliers (attention sink) in most LLMs.
2. *Quality drop without retraining*: the same weights run with every modality inserted at
   each candidate k; the loss on the responses (the labels ``composer.train.data.Collator`` builds)
   at k vs k = 0, as a relative increase ``loss_k / loss_0 - 1``.

Two rules recommend k (``rule``):

- ``alignment`` (default): the first candidate layer l > 0 whose mean-pooled alignment reaches
  ``align_fraction`` (0.9) of the best probed layer's, i.e. where alignment has (nearly) reached
  its plateau; MM tokens inserted there skip the layers that still move them toward the text.
- ``loss``: the largest candidate whose loss increase *without retraining* is at most
  ``max_loss_increase`` (k = 0 always qualifies); conservative: it asks the weights trained at
  k = 0 to work at k unchanged, while DeepInsert retrains at k.

Measured on SmolLM2 (benchmarks/deepinsert_quality.py, docs/quality.md): retrained at
k in {0, 8, 15, 22}, held-out accuracy held at every k, while the loss rule said k = 0 before and
after training (the loss without retraining rose 10-60x at every k > 0); the alignment rule says
8 (alignment 0.71, 0.72, 0.78 at 8, 15, 22), where the measured accuracy held. The best-aligned
layer is reported as well.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from composer.errors import InputError
from composer.train.data import IGNORE_INDEX, Collator, read_jsonl


@dataclass
class ProbeConfig:
    layers: list[int] | None = None  # candidate k / probed layers; None: every layer
    max_records: int = 64
    batch_size: int = 4
    max_loss_increase: float = 0.05
    media_root: str | None = None
    rule: str = "alignment"  # alignment | loss (see the module docstring)
    align_fraction: float = 0.9


class LayerInputs:
    """Forward pre-hooks that keep the hidden states entering the chosen decoder layers."""

    def __init__(self, model, layers: list[int]):
        self.states: dict[int, torch.Tensor] = {}
        self.handles = []
        for i in layers:
            self.handles.append(model.adapter.layers[i].register_forward_pre_hook(self._keep(i)))

    def _keep(self, i: int):
        def hook(module, args):
            self.states[i] = args[0].detach()

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def alignment(hidden: torch.Tensor, mm: torch.Tensor, text: torch.Tensor) -> tuple[float, float, float]:
    """One record's states (L, d) and its MM / text token masks (L,) -> (cosine of the mean-pooled
    MM and text states, max and lower median of the MM x text token-pair cosine matrix)."""
    h = hidden.float()
    a, b = h[mm], h[text]
    pooled = torch.nn.functional.cosine_similarity(a.mean(0), b.mean(0), dim=0)
    pairs = torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T
    return float(pooled), float(pairs.max()), float(pairs.median())


def _masks(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    ids, real = batch["input_ids"], batch["attention_mask"].bool()
    is_mm = torch.zeros_like(ids, dtype=torch.bool)
    for pid in model.placeholder_ids.values():
        is_mm |= ids == pid
    text = real & ~is_mm
    bos = model.tokenizer.bos_token_id
    if bos is not None:  # the first real token, when it is BOS
        first = real.long().argmax(1)
        rows = torch.arange(ids.shape[0])
        drop = ids[rows, first] == bos
        text[rows[drop], first[drop]] = False
    return real & is_mm, text


def _loss_sum(model, batch) -> tuple[float, int]:
    out = model(**batch, return_logits=False)
    n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return float(out.loss) * n, n


@torch.no_grad()
def run_probe(model, data: str, cfg: ProbeConfig, progress=None) -> dict:
    """Alignment per layer and loss at each candidate k; -> a JSON-able dict.

    Example::

        model = ComposedModel.from_pretrained("out/trained")
        result = run_probe(model, "data/val.jsonl", ProbeConfig(layers=[0, 4, 8, 12]))
    """
    say = progress or (lambda s: None)
    N = model.num_layers
    layers = _probed_layers(cfg, N)
    examples, batches = _batches(model, data, cfg)
    candidates = sorted(set(layers) | {0})
    model.eval()
    original = model.insert_at
    losses = {k: [0.0, 0] for k in candidates}
    align = _align_at_0(model, batches, examples, layers, cfg.batch_size, losses[0], say)
    for k in candidates[1:]:
        at_k = model.with_insert_at(k)
        for j, batch in enumerate(batches):
            say(f"loss at k={k}: batch {j + 1} of {len(batches)}")
            s, n = _loss_sum(at_k, batch)
            losses[k][0] += s
            losses[k][1] += n
    if losses[0][1] == 0:
        raise InputError(f"{data}: the records have no response tokens to score")
    loss = {k: s / n for k, (s, n) in losses.items()}
    records = align["records"]
    rows = _rows(candidates, loss, align["sums"], records, cfg.max_loss_increase)
    by_loss = max(r["layer"] for r in rows if r["eligible"])
    aligned = [r for r in rows if "cos_mean_pooled" in r and r["layer"] > 0]
    recommended = by_loss
    if cfg.rule == "alignment" and aligned:
        top = max(r["cos_mean_pooled"] for r in aligned)
        plateau = top - (1 - cfg.align_fraction) * abs(top)
        recommended = min(r["layer"] for r in aligned if r["cos_mean_pooled"] >= plateau)
    return {
        "name": model.spec.name,
        "data": str(data),
        "records": records,
        "tokens_per_record": {"mm": align["n_mm"] / records, "text": align["n_text"] / records},
        "num_layers": N,
        "trained_insert_at": original,
        "max_loss_increase": cfg.max_loss_increase,
        "loss_k0": loss[0],
        "rows": rows,
        "rule": cfg.rule,
        "align_fraction": cfg.align_fraction,
        "recommended_k": recommended,
        "loss_rule_k": by_loss,
        "best_aligned_layer": max(aligned, key=lambda r: r["cos_mean_pooled"])["layer"] if aligned else None,
    }


def _probed_layers(cfg: ProbeConfig, N: int) -> list[int]:
    """``cfg`` checked against an ``N``-layer LLM -> the layers to probe, sorted."""
    layers = sorted(set(cfg.layers)) if cfg.layers else list(range(N))
    bad = [k for k in layers if not 0 <= k < N]
    if bad:
        raise InputError(f"--layers {bad}: must be in [0, {N}) for this {N}-layer LLM")
    if cfg.max_records < 1 or cfg.batch_size < 1:
        raise InputError(f"--max-records and --batch-size must be >= 1, got {cfg.max_records}, {cfg.batch_size}")
    if cfg.max_loss_increase < 0:
        raise InputError(f"--max-loss-increase must be >= 0, got {cfg.max_loss_increase}")
    if cfg.rule not in ("alignment", "loss") or not 0 < cfg.align_fraction <= 1:
        raise InputError(
            f"--rule must be alignment or loss and --align-fraction in (0, 1], got {cfg.rule!r}, {cfg.align_fraction}"
        )
    return layers


def _batches(model, data: str, cfg: ProbeConfig) -> tuple[list, list[dict]]:
    """The first ``max_records`` records of ``data`` -> (the records, their batches on the model's device)."""
    placeholders = {m: model.spec.modalities[m].placeholder for m in model.encoders}
    from composer.adapters import encoder_types, text_modalities

    text = text_modalities(encoder_types(model))
    examples = read_jsonl(data, placeholders, media_root=cfg.media_root, text=text)[: cfg.max_records]
    collate = Collator(model)
    batches = [collate(examples[i : i + cfg.batch_size]) for i in range(0, len(examples), cfg.batch_size)]
    dev = model.device
    return examples, [{k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in b.items()} for b in batches]


def _align_at_0(model, batches: list[dict], examples: list, layers: list[int], batch_size: int, loss0: list, say):
    """The model at ``insert_at: 0`` over ``batches``, the states entering ``layers`` kept: the
    loss added to ``loss0`` ([sum, tokens]) -> {"sums": {layer: summed alignment}, "records",
    "n_mm", "n_text"} (MM and text tokens of all records)."""
    sums = {k: [0.0, 0.0, 0.0] for k in layers}
    records = n_mm = n_text = 0
    at0 = model.with_insert_at(0)  # the same weights, every modality at layer 0
    hooks = LayerInputs(at0, layers)
    try:
        for j, batch in enumerate(batches):
            say(f"k=0 with hidden states: batch {j + 1} of {len(batches)}")
            s, n = _loss_sum(at0, batch)
            loss0[0] += s
            loss0[1] += n
            mm, text = _masks(at0, batch)
            for row in range(mm.shape[0]):
                if not mm[row].any() or not text[row].any():
                    raise InputError(
                        f"{examples[j * batch_size + row].where}: the record needs both MM and text "
                        "tokens for the alignment probe"
                    )
                records += 1
                n_mm += int(mm[row].sum())
                n_text += int(text[row].sum())
                for k in layers:
                    h = hooks.states[k]
                    if h.shape[1] != mm.shape[1]:  # at k = 0 every slot is active, in order
                        raise RuntimeError(f"layer {k} saw {h.shape[1]} tokens, expected {mm.shape[1]}")
                    for i, v in enumerate(alignment(h[row], mm[row], text[row])):
                        sums[k][i] += v
    finally:
        hooks.close()
    return {"sums": sums, "records": records, "n_mm": n_mm, "n_text": n_text}


def _rows(candidates: list[int], loss: dict, sums: dict, records: int, max_loss_increase: float) -> list[dict]:
    """One row per candidate k: its loss and increase over k = 0, the mean alignment of a probed
    layer, and whether the loss rule allows it."""
    rows = []
    for k in candidates:
        row = {"layer": k, "loss": loss[k], "loss_increase": loss[k] / loss[0] - 1 if k else 0.0}
        if k in sums:
            row.update(
                {
                    "cos_mean_pooled": sums[k][0] / records,
                    "pair_max": sums[k][1] / records,
                    "pair_median": sums[k][2] / records,
                }
            )
        row["eligible"] = row["loss_increase"] <= max_loss_increase
        rows.append(row)
    return rows


def render(result: dict, console) -> None:
    from rich.table import Table

    t = Table(
        title=f"{result['name']}: {result['records']} records of {result['data']}, "
        f"{result['tokens_per_record']['mm']:.0f} MM + {result['tokens_per_record']['text']:.0f} text "
        "tokens per record; alignment of the states entering layer l, at insert_at 0",
        title_justify="left",
    )
    for col in ("k = l", "cos(mean MM, mean text)", "pair max", "pair median", "loss at k", "increase vs 0", "ok"):
        t.add_column(col, justify="right")
    f = lambda r, key: f"{r[key]:.3f}" if key in r else ""  # noqa: E731
    for r in result["rows"]:
        t.add_row(
            str(r["layer"]),
            f(r, "cos_mean_pooled"),
            f(r, "pair_max"),
            f(r, "pair_median"),
            f"{r['loss']:.4f}",
            f"{r['loss_increase']:+.1%}",
            "✓" if r["eligible"] else "",
        )
    console.print(t)
    trained = set(result["trained_insert_at"].values())
    if trained != {0}:
        console.print(
            f"note: this model was built with insert_at {result['trained_insert_at']}; the probe assumes "
            "weights trained at k = 0"
        )
    loss_rule = f"the largest k whose loss increase without retraining is at most {result['max_loss_increase']:.0%}"
    if result["rule"] == "alignment" and result["best_aligned_layer"]:
        console.print(
            f"recommended k = {result['recommended_k']}: the first layer whose alignment reaches "
            f"{result['align_fraction']:.0%} of the best (layer {result['best_aligned_layer']}); "
            f"{loss_rule}: {result['loss_rule_k']}"
        )
    else:
        console.print(
            f"recommended k = {result['recommended_k']}: {loss_rule}"
            + (f"; best-aligned layer > 0: {result['best_aligned_layer']}" if result["best_aligned_layer"] else "")
        )


__all__ = ["ProbeConfig", "alignment", "render", "run_probe"]
