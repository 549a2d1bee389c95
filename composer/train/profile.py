"""`compose train --profile`: a training step at the spec's insert_at vs at 0, side by side.

Both models hold the same weights (a deep copy, ``with_insert_at(0)``) and see the
same batches. Reported: median wall time of a full step (forward, backward, optimizer) after
a warm-up step, and the analytic FLOPs per step of the LLM layers (3x the forward FLOPs of
docs/architecture.md's FLOPs model: forward + backward). Under torchrun/accelerate launch, a row per rank.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from composer.analysis.flops import prefill_flops
from composer.train.data import Collator, read_jsonl


def _step_flops(model, batch) -> float:
    s = model.adapter.shape
    total = 0.0
    for row in range(batch["input_ids"].shape[0]):
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()]
        mm = {m: int((ids == pid).sum()) for m, pid in model.placeholder_ids.items()}
        text = int(ids.numel()) - sum(mm.values())
        total += prefill_flops(s, text, mm, model.insert_at)
    return 3 * total


def _time_steps(model, batches, steps: int, eng, find_unused: bool, batch_size: int) -> list[float]:
    """Wall time of ``steps`` full steps (after one warm-up) on this rank, wrapped as ``compose
    train`` would wrap it; ranks start each step together (a barrier), so a rank's time includes
    its waits in the step's collectives."""
    from composer.train.loop import optimizer_step

    net = eng.wrap(model, find_unused=find_unused)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    if eng.strategy == "deepspeed":
        net = eng.wrap_deepspeed(model, opt, micro_batch=batch_size, grad_accum=1, max_grad_norm=1.0)
    net.train()
    times = []
    for i in range(steps + 1):  # the first step warms up
        batch, real = batches[i % len(batches)]
        eng.barrier()
        t = time.perf_counter()
        loss = net(**batch, return_logits=False).loss
        eng.backward(net, loss if real else loss * 0.0, last=True)
        optimizer_step(net, opt, params, None, 1.0, eng)
        if i:
            times.append(time.perf_counter() - t)
    return times


def profile_training(target: str, cfg, steps: int = 5) -> list[str]:
    """Lines to print (on rank 0; other ranks get none). Under torchrun/accelerate launch each
    rank times its own steps of the same global batches, wrapped as the run would be (DDP/FSDP),
    and the report has a row per rank."""
    from composer.checkpoint import load_any
    from composer.train import distributed
    from composer.train.loop import apply_stage, batch_stream, chunks

    eng = distributed.setup(cfg.strategy)
    ok = False
    try:
        model = load_any(target)
        apply_stage(model, cfg.stage)
        insert_at = model.insert_at
        base = copy.deepcopy(model).with_insert_at(0)  # its own copy: the timed steps update weights
        placeholders = {m: model.spec.modalities[m].placeholder for m in model.encoders}
        from composer.adapters import encoder_types, text_modalities

        examples = read_jsonl(
            cfg.data,
            placeholders,
            on_bad=cfg.on_bad_record,
            media_root=cfg.media_root,
            text=text_modalities(encoder_types(model)),
        )
        collate = Collator(model, cfg.max_length)
        groups = chunks(list(range(len(examples))), cfg.batch_size * eng.world)[:steps]
        batches = list(batch_stream(examples, groups, collate, eng))
        mine_only = [b for b, real in batches if real] or [batches[0][0]]
        f_k = statistics.mean(_step_flops(model, b) for b in mine_only)
        f_0 = statistics.mean(_step_flops(base, b) for b in mine_only)
        torch.manual_seed(cfg.seed + eng.rank)
        partial = any(set(ex.items) != set(model.encoders) for ex in examples)
        t_k = statistics.median(_time_steps(model, batches, steps, eng, partial, cfg.batch_size))
        torch.manual_seed(cfg.seed + eng.rank)
        t_0 = statistics.median(_time_steps(base, batches, steps, eng, partial, cfg.batch_size))
        per_rank = list(zip(eng.gather(t_k), eng.gather(t_0), eng.gather(f_k), eng.gather(f_0), strict=True))
        del model, base, collate  # (FSDP-)wrapped, with works on the group: freed before it is destroyed
        ok = True
    finally:
        eng.close(ok)
    if not eng.main:
        return []
    ks = ", ".join(f"{m}={k}" for m, k in insert_at.items())
    if eng.world == 1:
        return [
            f"training step, batch {cfg.batch_size}, median of {steps} after 1 warm-up, same weights and batches:",
            f"  insert_at {ks:<20} {t_k * 1e3:9.1f} ms/step  {f_k / 1e9:10.3f} GFLOPs/step (LLM layers, fwd+bwd)",
            f"  insert_at 0{'':<19} {t_0 * 1e3:9.1f} ms/step  {f_0 / 1e9:10.3f} GFLOPs/step",
            f"  ratio k/0: time {t_k / t_0:.2f}, FLOPs {f_k / f_0:.2f}",
        ]
    lines = [
        f"training step on {eng.world} ranks ({eng.strategy}), batch {cfg.batch_size} per rank, median of {steps} "
        "after 1 warm-up, same weights and batches; per rank (its own records' FLOPs, LLM layers, fwd+bwd):",
        f"  {'rank':>4}  {'ms/step @' + ks:>22}  {'ms/step @0':>11}  {'time k/0':>8}  {'FLOPs k/0':>9}",
    ]
    for r, (tk, t0, fk, f0) in enumerate(per_rank):
        lines.append(f"  {r:>4}  {tk * 1e3:>22.1f}  {t0 * 1e3:>11.1f}  {tk / t0:>8.2f}  {fk / f0:>9.2f}")
    slow_k, slow_0 = max(r[0] for r in per_rank), max(r[1] for r in per_rank)
    lines.append(f"  slowest rank: time k/0 {slow_k / slow_0:.2f} (a synchronous step takes the slowest rank's time)")
    return lines
