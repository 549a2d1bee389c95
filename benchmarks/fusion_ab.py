"""Fused against traced RMSNorms (``compose export --no-fuse``), side by side in one run.

Builds SPEC's model at ``--insert-at``, exports it twice with the same ``--quantize`` scheme
(fused: ``RMSNormalization`` / ``SkipSimplifiedLayerNormalization``; traced: seven elementwise
nodes per norm, ``composer.export.fusion``), and times both interleaved: the prompt's prefill
(one new token) and decode tokens/s after it (``--new-tokens`` steps, EOS ignored). Prints the
nodes per LLM graph and medians with their ratio.

    python benchmarks/fusion_ab.py benchmarks/smol_llava_576.yaml --insert-at 15 --quantize int8 --threads 2
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from composer.export.quantize import SCHEMES


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec")
    ap.add_argument("--insert-at", type=int, default=0)
    ap.add_argument("--quantize", choices=sorted(SCHEMES), default=None)
    ap.add_argument("--text-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)

    import onnx

    import composer
    from composer.analysis.bench import bench_inputs
    from composer.export.exporter import export_onnx
    from composer.export.runtime import OnnxPipeline, default_session_options

    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    torch.set_num_threads(a.threads)
    model = composer.build(a.spec).eval().with_insert_at(a.insert_at)
    batch = bench_inputs(model, a.text_tokens, 1)
    mm = {m: batch[m] for m in model.encoders if m in batch}
    with tempfile.TemporaryDirectory(prefix="fusion-ab-") as tmp:
        pipes, nodes = {}, {}
        for fused in (True, False):
            name = "fused" if fused else "traced"
            say(f"exporting the {name} bundle")
            bundle = export_onnx(model, Path(tmp) / name, quantize=a.quantize, fuse=fused)
            pipes[name] = OnnxPipeline(bundle, session_options=default_session_options(False, a.threads))
            nodes[name] = {
                st.graph: len(onnx.load(str(bundle / st.graph), load_external_data=False).graph.node)
                for st in pipes[name].manifest.stages
            }

        def run(pipe: OnnxPipeline, new: int) -> float:
            t = time.perf_counter()
            pipe.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=new, eos_token_id=[], **mm)
            return time.perf_counter() - t

        times = collections.defaultdict(list)
        for r in range(a.repeats + 1):  # the first round warms up
            for name, pipe in pipes.items():
                prefill, full = run(pipe, 1), run(pipe, a.new_tokens + 1)
                if r:
                    times[name, "prefill"].append(prefill)
                    times[name, "decode"].append(a.new_tokens / (full - prefill))
            say(f"round {r + 1}/{a.repeats + 1}")
    print(
        f"{a.spec} k={a.insert_at} {a.quantize or 'fp32'}, {a.threads} threads, {a.text_tokens} text tokens, "
        f"medians of {a.repeats}"
    )
    for name in pipes:
        med = {k: statistics.median(times[name, k]) for k in ("prefill", "decode")}
        print(
            f"  {name:6s}: nodes {nodes[name]}; prefill {med['prefill']:.3f} s; decode {med['decode']:.1f} tok/s "
            f"({min(times[name, 'decode']):.1f}-{max(times[name, 'decode']):.1f})"
        )
    ratio = statistics.median(times["fused", "decode"]) / statistics.median(times["traced", "decode"])
    pre = statistics.median(times["fused", "prefill"]) / statistics.median(times["traced", "prefill"])
    print(f"  fused / traced: decode tok/s {ratio:.2f}x, prefill time {pre:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
