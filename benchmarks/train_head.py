"""Training step time with the LM head over every position vs over the labelled positions only,
measured side by side in one run on the real-LLM spec.

``forward(..., labels=..., return_logits=False)`` (what ``compose train`` runs) applies the LM head
(576 x 49152 on SmolLM2) to the positions that have a label; ``return_logits=True`` (the classic
model, and what the loop ran before) applies it to every position, MM slots and prompt included,
and then picks the labelled ones for the loss. Both give the same loss and gradients (checked
here); only the cost differs. Per setting: median wall time of a full step (forward, backward,
AdamW) over ``--repeats`` steps after one warm-up, the two settings interleaved, stage 1
(the encoder and projector train, SmolLM2 frozen), at the spec's insert_at and at 0.

    python benchmarks/train_head.py --threads 2 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=str(ROOT / "specs/smol/llava.yaml"))
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    from composer.builder import build
    from composer.train.data import Collator, read_jsonl
    from composer.train.loop import apply_stage

    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args.spec)
    apply_stage(model, 1)
    questions = [("What shape is it?", "A circle."), ("What colour is the shape?", "It is red.")]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "d.jsonl"
        recs = [
            {"image": str(ROOT / "specs/smol/assets/red_circle.png"), "prompt": q, "response": a}
            for q, a in questions * args.batch_size
        ][: args.batch_size]
        data.write_text("".join(json.dumps(r) + "\n" for r in recs))
        batch = Collator(model)(read_jsonl(data, {"image": "<image>"}))
    rows = int(batch["attention_mask"].sum())
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    variants = {}
    for k in sorted({model.insert_at["image"], 0}, reverse=True):
        m = model.with_insert_at({"image": k})
        m.train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-6)
        for full in (True, False):
            variants[(k, full)] = (m, opt)
    # same loss and gradients either way
    m, _ = variants[(model.insert_at["image"], True)]
    grads = {}
    for full in (True, False):
        m.zero_grad(set_to_none=True)
        loss = m(**batch, return_logits=full).loss
        loss.backward()
        grads[full] = (float(loss.detach()), [p.grad.clone() for p in m.parameters() if p.requires_grad])
    m.zero_grad(set_to_none=True)
    same = grads[True][0] == grads[False][0] and all(
        torch.allclose(a, b, atol=1e-6, rtol=1e-5) for a, b in zip(grads[True][1], grads[False][1], strict=True)
    )

    def step(key) -> float:
        m, opt = variants[key]
        t = time.perf_counter()
        loss = m(**batch, return_logits=key[1]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    for key in variants:  # warm-up
        step(key)
    times = {key: [] for key in variants}
    for _ in range(args.repeats):
        for key in variants:
            times[key].append(step(key))
    print(
        f"\n{args.spec}: batch {args.batch_size} ({rows} positions, {labelled} labelled), "
        f"torch threads {torch.get_num_threads()}, median of {args.repeats}; same loss and gradients: {same}"
    )
    print(f"{'k':>3} {'LM head over':<20} {'step s':>8} {'(min-max)':>16} {'vs all':>7}")
    for (k, full), ts in times.items():
        base = statistics.median(times[(k, True)])
        med = statistics.median(ts)
        print(
            f"{k:>3} {'every position' if full else 'labelled positions':<20} {med:>8.3f} "
            f"({min(ts):.3f}-{max(ts):.3f}) {base / med:>6.2f}x"
        )


if __name__ == "__main__":
    main()
