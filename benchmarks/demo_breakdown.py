"""Where the picture demo's held-out answers fail: accuracy per question kind and number of shapes.

Builds the demo spec with the projector and LLM adapters of ``--weights`` (what
``benchmarks/train_demo.py --pretrained`` writes; default: the shipped ones), draws the same 400
held-out questions as train_demo (``deepinsert_quality.write_task`` with its seed) and prints a
table: per number of shapes in the picture, the questions, the share answered right and the
right/asked count per kind.

    python benchmarks/demo_breakdown.py --threads 2
    python benchmarks/demo_breakdown.py --weights out/s5/weights --out out/breakdown --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deepinsert_quality as dq  # noqa: E402
import train_demo as td  # noqa: E402


def breakdown(right: list[bool], records: list[dict]) -> dict[int, dict]:
    """{number of shapes: {"questions", "right", kind: [right, asked]}} over ``records``."""
    table: dict[int, dict] = {}
    for ok, r in zip(right, records, strict=True):
        row = table.setdefault(len(r["scene"]), {"questions": 0, "right": 0} | {k: [0, 0] for k in dq.KINDS})
        row["questions"] += 1
        row["right"] += ok
        row[r["kind"]][0] += ok
        row[r["kind"]][1] += 1
    return dict(sorted(table.items()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", type=Path, default=td.DINOV2_SPEC)
    ap.add_argument("--weights", type=Path, default=td.DINOV2_OUT, help="default: the shipped weights")
    ap.add_argument("--test", type=int, default=400, help="held-out questions (train_demo's --test)")
    ap.add_argument("--seed", type=int, default=0, help="train_demo's --seed")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="also write OUT/breakdown.json")
    a = ap.parse_args(argv)

    model = td.build_demo_model(a.spec, "image", a.threads, weights=a.weights).eval()
    with tempfile.TemporaryDirectory(prefix="demo-breakdown-") as tmp:
        _, test_file = dq.write_task(Path(tmp), 1, a.test, a.seed)
        test = dq.read_records(test_file)
        right = dq.evaluate(model, test, Path(tmp), 16)
    table = breakdown(right, test)
    lo, hi = dq.wilson(sum(right), len(right))
    print(f"{a.weights}: {sum(right)}/{len(right)} = {sum(right) / len(right):.1%} [{lo:.1%}, {hi:.1%}]")
    print("| pictures of | questions | right | " + " | ".join(dq.KINDS) + " |")
    print("|---|---|---|" + "---|" * len(dq.KINDS))
    for n, row in table.items():
        cells = " | ".join(f"{row[k][0]}/{row[k][1]}" for k in dq.KINDS)
        share = row["right"] / row["questions"]
        print(f"| {n} shape{'s' if n > 1 else ''} | {row['questions']} | {share:.0%} | {cells} |")
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "breakdown.json").write_text(json.dumps({"weights": str(a.weights), "by_shapes": table}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
