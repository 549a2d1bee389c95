"""Training step time with the batches collated in the training process vs in DataLoader workers,
measured side by side in one run.

A media-heavy tiny run: the 4-layer LLaVA twin (``specs/tiny/llava.yaml``, a 32-pixel ViT) on
records whose pictures are large noise PNGs (``--size`` pixels square; decoding and resizing one
costs far more than the model's step), ``--steps`` optimizer steps of ``--batch-size`` records,
once per ``--workers`` value, same data, seed and order. Prints the median step time (the first
two steps, warm-up and worker start, excluded) and the wall time of the whole run, and checks that
the losses are bit-identical across worker counts.

    python benchmarks/train_workers.py --workers 0 --workers 2 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def make_data(root: Path, n: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    recs = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"img{i}.png")
        recs.append({"image": f"img{i}.png", "prompt": "What is in the picture?", "response": "noise"})
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, action="append", default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--size", type=int, default=1024, help="picture side in pixels")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    from composer.builder import build
    from composer.train.loop import TrainConfig, train

    if args.threads:
        torch.set_num_threads(args.threads)
    workers = args.workers or [0, 2]
    rows = []
    with tempfile.TemporaryDirectory(prefix="train-workers-") as tmp:
        data = make_data(Path(tmp), args.steps * args.batch_size, args.size)
        for w in workers:
            model = build(str(ROOT / "specs/tiny/llava.yaml"))
            cfg = TrainConfig(
                data=str(data),
                output=str(Path(tmp) / f"w{w}"),
                max_steps=args.steps,
                batch_size=args.batch_size,
                num_workers=w,
                lr=1e-3,
                warmup_ratio=0.0,
                progress=False,
            )
            t0 = time.perf_counter()
            summary = train(model, cfg)
            wall = time.perf_counter() - t0
            times = [
                json.loads(ln)["step_time_s"] for ln in (Path(cfg.output) / "metrics.jsonl").read_text().splitlines()
            ]
            rows.append({"workers": w, "median_step_s": statistics.median(times[2:]), "wall_s": wall, **summary})
    base = rows[0]
    print(
        f"\n{args.steps} steps x {args.batch_size} records of {args.size}x{args.size} PNGs, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"{'workers':>7} {'median step s':>14} {'vs first':>9} {'run wall s':>11}  losses equal")
    for r in rows:
        print(
            f"{r['workers']:>7} {r['median_step_s']:>14.3f} {base['median_step_s'] / r['median_step_s']:>8.2f}x "
            f"{r['wall_s']:>11.1f}  {r['losses'] == base['losses']}"
        )


if __name__ == "__main__":
    main()
