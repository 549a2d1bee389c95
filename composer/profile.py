"""`compose train --profile`: a training step at the spec's insert_at vs at 0, side by side.

Both models hold the same weights (a deep copy with every ``insert_at`` set to 0) and see the
same batches. Reported: median wall time of a full step (forward, backward, optimizer) after
a warm-up step, and the analytic FLOPs per step of the LLM layers (3x the forward FLOPs of
DESIGN.md's model: forward + backward).
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from composer.data import Collator, read_jsonl
from composer.flops import prefill_flops


def _step_flops(model, batch) -> float:
    s = model.adapter.shape
    total = 0.0
    for row in range(batch["input_ids"].shape[0]):
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()]
        mm = {m: int((ids == pid).sum()) for m, pid in model.placeholder_ids.items()}
        text = int(ids.numel()) - sum(mm.values())
        total += prefill_flops(s.num_layers, s.hidden_size, s.intermediate_size, s.gated_mlp, text, mm, model.insert_at)
    return 3 * total


def _time_steps(model, batches, steps: int) -> list[float]:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    times = []
    for i in range(steps + 1):  # the first step warms up
        batch = batches[i % len(batches)]
        t = time.perf_counter()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t)
    return times


def profile_training(target: str, cfg, steps: int = 5) -> list[str]:
    from composer.cli import _load_any
    from composer.train import apply_stage

    model = _load_any(target)
    apply_stage(model, cfg.stage)
    base = copy.deepcopy(model)
    for m in base.spec.modalities.values():
        m.insert_at = 0
    placeholders = {m: model.spec.modalities[m].placeholder for m in model.encoders}
    examples = read_jsonl(cfg.data, placeholders, on_bad=cfg.on_bad_record, media_root=cfg.media_root)
    collate = Collator(model, cfg.max_length)
    batches = [collate(examples[i: i + cfg.batch_size]) for i in range(0, len(examples), cfg.batch_size)][:steps]
    torch.manual_seed(cfg.seed)
    t_k = _time_steps(model, batches, steps)
    torch.manual_seed(cfg.seed)
    t_0 = _time_steps(base, batches, steps)
    f_k = statistics.mean(_step_flops(model, b) for b in batches)
    f_0 = statistics.mean(_step_flops(base, b) for b in batches)
    ks = ", ".join(f"{m}={k}" for m, k in model.insert_at.items())
    med_k, med_0 = statistics.median(t_k), statistics.median(t_0)
    return [
        f"training step, batch {cfg.batch_size}, median of {steps} after 1 warm-up, same weights and batches:",
        f"  insert_at {ks:<20} {med_k * 1e3:9.1f} ms/step  {f_k / 1e9:10.3f} GFLOPs/step (LLM layers, fwd+bwd)",
        f"  insert_at 0{'':<19} {med_0 * 1e3:9.1f} ms/step  {f_0 / 1e9:10.3f} GFLOPs/step",
        f"  ratio k/0: time {med_k / med_0:.2f}, FLOPs {f_k / f_0:.2f}",
    ]
