"""Offline demo: does DeepInsert hold quality? Train the tiny LLaVA twin on generated images of
coloured shapes at insert_at 0 and at N/2 for the same steps; report held-out accuracy
(exact match of the greedy caption) and wall time, side by side.

    python benchmarks/demo_shapes.py --steps 600 --train 2000

Images (32x32) are drawn here with PIL: a red/green/blue/yellow circle/square/triangle at a
random position and size on a random dark background. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch
import yaml
from PIL import Image, ImageDraw

from composer.builder import build
from composer.spec import parse_spec
from composer.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
QUESTION = "What is in the image?"


def draw(colour: str, shape: str, rng: random.Random) -> Image.Image:
    bg = tuple(rng.randint(0, 60) for _ in range(3))
    im = Image.new("RGB", (32, 32), bg)
    d = ImageDraw.Draw(im)
    s = rng.randint(12, 22)
    x, y = rng.randint(1, 31 - s), rng.randint(1, 31 - s)
    c = COLOURS[colour]
    if shape == "circle":
        d.ellipse((x, y, x + s, y + s), fill=c)
    elif shape == "square":
        d.rectangle((x, y, x + s, y + s), fill=c)
    else:
        d.polygon([(x + s // 2, y), (x, y + s), (x + s, y + s)], fill=c)
    return im


def make_data(root: Path, n_train: int, n_test: int, seed: int) -> tuple[Path, list[tuple[str, str]]]:
    rng = random.Random(seed)
    records, test = [], []
    for i in range(n_train + n_test):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        path = root / f"img{i:04d}.png"
        draw(colour, shape, rng).save(path)
        if i < n_train:
            records.append({"image": path.name, "prompt": QUESTION, "response": f"{colour} {shape}"})
        else:
            test.append((str(path), f"{colour} {shape}"))
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return data, test


def accuracy(model, test: list[tuple[str, str]], batch: int = 32) -> float:
    hits = 0
    for i in range(0, len(test), batch):
        chunk = test[i : i + batch]
        b = model.prepare([model.format_prompt(QUESTION)] * len(chunk), image=[p for p, _ in chunk])
        out = model.decode(model.generate(**b, max_new_tokens=16))
        hits += sum(o.strip() == want for o, (_, want) in zip(out, chunk, strict=False))
    return hits / len(test)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--train", type=int, default=600)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    spec = yaml.safe_load((ROOT / "specs/tiny/llava.yaml").read_text())
    spec["modalities"]["image"]["encoder"]["train"] = "full"  # random tiny ViT: let it learn too
    n_layers = spec["llm"]["config"]["num_hidden_layers"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data, test = make_data(Path(tmp), args.train, args.test, args.seed)
        for k in (0, n_layers // 2):
            spec["modalities"]["image"]["insert_at"] = k
            model = build(parse_spec(spec))
            t, c = time.perf_counter(), time.process_time()
            summary = train(
                model,
                TrainConfig(
                    data=str(data),
                    output=f"{tmp}/k{k}",
                    max_steps=args.steps,
                    batch_size=args.batch_size,
                    lr=args.lr,
                    warmup_ratio=0.05,
                    seed=args.seed,
                    progress=False,
                ),
            )
            wall, cpu = time.perf_counter() - t, time.process_time() - c
            model.eval()
            results[k] = {
                "accuracy": accuracy(model, test),
                "train_s": wall,
                "train_cpu_s": cpu,
                "final_loss": sum(summary["losses"][-20:]) / 20,
            }
    print(
        f"tiny LLaVA twin ({n_layers} layers, d=64), {args.train} train / {args.test} held-out images, "
        f"{args.steps} steps of batch {args.batch_size}, lr {args.lr}, seed {args.seed}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"{'insert_at':<10}{'held-out accuracy':>20}{'train wall':>12}{'train CPU':>12}{'final loss':>12}")
    for k, r in results.items():
        print(f"{k:<10}{r['accuracy']:>20.1%}{r['train_s']:>11.1f}s{r['train_cpu_s']:>11.1f}s{r['final_loss']:>12.3f}")
    a, b = results[0], results[n_layers // 2]
    print(
        f"ratio k={n_layers // 2} / k=0: wall {b['train_s'] / a['train_s']:.2f}, "
        f"CPU {b['train_cpu_s'] / a['train_cpu_s']:.2f} "
        "(CPU time is the fairer measure when other processes share the machine)"
    )


if __name__ == "__main__":
    main()
