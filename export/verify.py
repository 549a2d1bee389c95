"""``compose export --verify``: ONNX Runtime vs torch on the same inputs.

Every graph call made by the pipeline during a prefill and a few decode steps is replayed
through the torch module the graph was exported from; the report gives, per graph, the max
abs difference of its outputs (logits, hidden states, tokens; KV excluded), plus the
end-to-end prefill logits vs ``ComposedModel.forward`` and the greedy tokens vs ``generate``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from composer.errors import InputError
from composer.export.examples import PROMPTS, sample_batch
from composer.export.exporter import DTYPES, merged_for_export
from composer.export.graphs import EncoderGraph, stage_module
from composer.export.manifest import Manifest
from composer.export.runtime import OnnxPipeline

TOLERANCE = {"fp32": 1e-4, "fp16": 5e-2}


MIN_TOP1 = 0.95  # default --min-top1 for a quantized bundle


def _torch_graphs(model, manifest: Manifest) -> dict[str, torch.nn.Module]:
    out = {}
    for m, e in manifest.encoders.items():
        out[e.graph] = EncoderGraph(model.encoders[m], model.projectors[m], model.dtype)
    for st in manifest.stages:
        out[st.graph] = stage_module(model, st)
        if st.decode_graph:  # the same layers (fp32 fused decode graphs): replayed through HF's layers
            out[st.decode_graph] = out[st.graph]
    return out


def _replay(module, graph: str, feeds: dict, manifest: Manifest) -> list[np.ndarray]:
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in feeds.items()}
    with torch.no_grad():
        if isinstance(module, EncoderGraph):
            return [module(*[t[k] for k in module.encoder.input_names]).numpy()]
        outs = module(*module.io.args(t))
    return [o.float().numpy() for o in outs[:1]]  # the main output; KV agrees when it does


def _real_rows(name: str, feeds: dict, out: np.ndarray) -> np.ndarray | None:
    """(B, T) mask of the rows of an LLM graph's main output that belong to real tokens (None
    for an encoder): a padding row attends to no key, so its value is arbitrary. Output row
    ``j`` is the token written at buffer row ``write_index + j`` (``logit_rows`` pick among them)."""
    if "write_index" not in feeds:
        return None
    B, T = out.shape[:2]
    rows = feeds["logit_rows"] if name == "logits" else np.broadcast_to(np.arange(T), (B, T))
    return np.take_along_axis(feeds["cache_valid"], feeds["write_index"][:, None] + rows, 1)


def verify_bundle(
    model, bundle: str | Path, *, steps: int = 4, min_top1: float | None = None, atol: float | None = None
) -> dict:
    """-> {"graphs": {graph: max abs diff}, "scales": {graph: largest |value|}, "prefill_logits":
    diff, "logits_scale": ..., "greedy_match": bool, "tolerance": tol, "ok": bool}.

    A difference passes when it is at most ``tol * max(1, largest |value| of the torch output)``:
    absolute for outputs of order one (the tiny models), relative for a pretrained LLM's hidden
    states, whose largest activations reach the thousands (SmolLM2: float32 rounding alone then
    differs in the 1e-2s over 15 layers).

    A quantized bundle (``manifest.quantization``) is checked by ``verify_quantized`` instead:
    top-1 agreement with the fp32 torch model at least ``min_top1`` (default ``MIN_TOP1``) and,
    when ``atol`` is given, the max logit difference at most ``atol``."""
    if min_top1 is not None and not 0 <= min_top1 <= 1:
        raise InputError(f"--min-top1 is a fraction in [0, 1], got {min_top1!r}")
    if atol is not None and not 0 <= atol < float("inf"):
        raise InputError(f"--atol must be a finite number >= 0, got {atol!r}")
    pipe = OnnxPipeline(bundle)
    manifest = pipe.manifest
    if manifest.quantization is not None or manifest.decode_quantization is not None:
        return verify_quantized(
            model, pipe, steps=steps, min_top1=MIN_TOP1 if min_top1 is None else min_top1, atol=atol
        )
    ref = merged_for_export(model, DTYPES[manifest.dtype])
    batch = sample_batch(ref)
    mm = {m: batch[m] for m in model.encoders if m in batch}
    pipe.recorder = []
    ort_ids = pipe.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=steps, eos_token_id=[], **mm)
    calls, pipe.recorder = pipe.recorder, None
    graphs = _torch_graphs(ref, manifest)
    per_graph: dict[str, float] = {}
    scales: dict[str, float] = {}
    for graph, feeds, outs in calls:
        name, main = next(iter(outs.items()))
        want = _replay(graphs[graph], graph, feeds, manifest)[0]
        real = _real_rows(name, feeds, main)
        main, want = (main, want) if real is None else (main[real], want[real])
        diff = float(np.abs(main.astype(np.float32) - want.astype(np.float32)).max()) if main.size else 0.0
        per_graph[graph] = max(per_graph.get(graph, 0.0), diff)
        scales[graph] = max(scales.get(graph, 1.0), float(np.abs(want).max()) if want.size else 0.0)
    logits, _ = pipe.prefill(batch["input_ids"], batch["attention_mask"], mm, all_logits=True)
    with torch.no_grad():
        want = ref(**batch).logits.float().numpy()
    real = batch["attention_mask"].bool().numpy()
    prefill = float(np.abs(logits - want)[real].max())
    logits_scale = max(1.0, float(np.abs(want[real]).max()))
    torch_ids = ref.generate(**batch, max_new_tokens=steps, eos_token_id=[])
    tol = TOLERANCE[manifest.dtype]
    greedy = bool(torch.equal(torch_ids.cpu(), ort_ids))
    ok = greedy and prefill <= tol * logits_scale and all(v <= tol * scales[g] for g, v in per_graph.items())
    return {
        "graphs": per_graph,
        "scales": scales,
        "prefill_logits": prefill,
        "logits_scale": logits_scale,
        "greedy_match": greedy,
        "greedy_tokens": steps,
        "tolerance": tol,
        "ok": ok,
    }


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(p || q) in nats per position, from logits (float64 log-softmax)."""
    lp = torch.from_numpy(p_logits).double().log_softmax(-1)
    lq = torch.from_numpy(q_logits).double().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1).numpy()


def verify_quantized(model, pipe: OnnxPipeline, *, steps: int, min_top1: float, atol: float | None) -> dict:
    """A quantized bundle vs the fp32 torch model on ``PROMPTS`` (teacher-forced prefill): the
    share of text positions whose top-1 next token agrees, the max logit difference there, the
    mean KL divergence of the quantized next-token distribution from the fp32 one (a smoother
    measure than top-1, which flips wherever the top two tokens are near-tied), and the share of
    ``steps`` greedy tokens per prompt that agree (reported, not gated). A bundle with decode
    graphs (``--decode-quantize``) is also gated on them: ``decode_check``'s top-1 agreement, over
    the prompts' text after their media fed one decode step at a time, at least ``min_top1``."""
    ref = merged_for_export(model, torch.float32)
    batch = sample_batch(ref, PROMPTS)
    mm = {m: batch[m] for m in model.encoders if m in batch}
    logits, _ = pipe.prefill(batch["input_ids"], batch["attention_mask"], mm, all_logits=True)
    with torch.no_grad():
        want = ref(**batch).logits.float().numpy()
    ids = batch["input_ids"].numpy()
    text = batch["attention_mask"].bool().numpy() & ~np.isin(ids, list(model.placeholder_ids.values()))
    agree = float((logits.argmax(-1) == want.argmax(-1))[text].mean())
    diff = float(np.abs(logits - want)[text].max())
    kl = float(_kl(want, logits)[text].mean())
    ort_ids = pipe.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=steps, eos_token_id=[], **mm)
    torch_ids = ref.generate(**batch, max_new_tokens=steps, eos_token_id=[]).cpu().numpy()
    greedy = float((np.asarray(ort_ids) == torch_ids).mean())  # both: the new tokens only
    manifest = pipe.manifest
    report = {
        "quantization": manifest.quantization.scheme if manifest.quantization else manifest.dtype,
        "prompts": len(PROMPTS),
        "positions": int(text.sum()),
        "top1_agreement": agree,
        "max_logit_diff": diff,
        "mean_kl": kl,
        "greedy_agreement": greedy,
        "greedy_tokens": steps,
        "min_top1": min_top1,
        "atol": atol,
        "ok": agree >= min_top1 and (atol is None or diff <= atol),
    }
    if any(st.decode_graph for st in manifest.stages):
        report.update(decode_check(ref, pipe, batch, mm, want))
        report["ok"] = report["ok"] and report["decode_top1_agreement"] >= min_top1
    return report


def decode_check(ref, pipe: OnnxPipeline, batch: dict, mm: dict, want: np.ndarray) -> dict:
    """The decode graphs (``--decode-quantize``) on the same kind of positions as the prefill gate:
    per prompt, the prefill graphs read it up to its last media token, then its remaining text
    tokens are fed one decode step at a time, and each step's next-token logits are compared with
    the fp32 torch model's at the same position (``want``: ``ref``'s teacher-forced logits of the
    batch) -> {"decode_quantization", "decode_positions", "decode_top1_agreement", "decode_mean_kl"}."""
    ids, mask = batch["input_ids"].numpy(), batch["attention_mask"].bool().numpy()
    placeholders = {m: pid for m, pid in ref.placeholder_ids.items() if m in mm}
    taken = dict.fromkeys(mm, 0)  # items of each modality used by the rows so far
    got, ref_logits = [], []
    for b in range(ids.shape[0]):
        row, want_row = ids[b, mask[b]], want[b, mask[b]]
        media = np.flatnonzero(np.isin(row, list(placeholders.values())))
        cut = int(media[-1]) + 1 if media.size else 1  # the prefill reads row[:cut]
        items = {}
        for m, pid in placeholders.items():
            n = int((row == pid).sum()) // ref.num_tokens(m)
            if n:
                items[m] = _take_items(mm[m], taken[m], n)
                taken[m] += n
        _, state = pipe.prefill(row[None, :cut], np.ones((1, cut), np.int64), items, reserve=len(row) - cut)
        for t in range(cut, len(row) - 1):  # the logits after token t predict token t + 1
            got.append(pipe.decode_step(row[None, t : t + 1], state)[0])
            ref_logits.append(want_row[t])
    got, ref_logits = np.stack(got), np.stack(ref_logits)
    return {
        "decode_quantization": getattr(pipe.manifest.decode_quantization, "scheme", pipe.manifest.dtype),
        "decode_positions": len(got),
        "decode_top1_agreement": float((got.argmax(-1) == ref_logits.argmax(-1)).mean()),
        "decode_mean_kl": float(_kl(ref_logits, got).mean()),
    }


def _take_items(items, start: int, n: int):
    """Items ``start .. start + n`` of a modality's batched inputs (a tensor, or a dict of them)."""
    if isinstance(items, dict):
        return {k: v[start : start + n] for k, v in items.items()}
    return items[start : start + n]
