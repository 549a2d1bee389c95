"""ONNX graph optimizations measured, not assumed.

One fp32 bundle per k is exported once; then, side by side in one run and on the same inputs,
each variant below generates ``--new-tokens`` greedy tokens ``--repeats`` times:

- ``all``: the bundle as exported, ONNX Runtime's session optimizations at ORT_ENABLE_ALL
  (what ``OnnxPipeline`` uses by default);
- ``extended`` / ``basic``: the same graphs at ORT_ENABLE_EXTENDED / ORT_ENABLE_BASIC;
- ``fused``: every LLM graph rewritten by ``onnxscript.rewriter.ort_fusions.optimize_for_ort``
  (RMSNorm, skip-RMSNorm, rotary, attention fusions into ONNX Runtime contrib ops), then
  ORT_ENABLE_ALL;
- ``fused-basic``: the rewritten graphs at ORT_ENABLE_BASIC.

Per variant it prints the fusions applied, prefill latency (median of repeats), decode tokens/s
(median), the max |logit| difference of the prefill against ``all`` (all positions of the real
tokens) and whether the greedy tokens are equal to ``all``'s.

    python benchmarks/ort_fusions.py benchmarks/smol_llava_576.yaml --insert-at 0 --insert-at 15 \
        --threads 2 --repeats 3 --json out/ort_fusions.json
    python benchmarks/ort_fusions.py benchmarks/smol_llava_576.yaml --insert-at 15 --quantize int8 \
        --new-tokens 64 --threads 2 --repeats 5        # the int8 decode bundle

Run it on a quiet machine: the variants are timed in turn, round-robin per repeat.

``--accuracy`` takes a trained checkpoint instead of a spec and times nothing: it exports one
bundle (``--quantize``), and reports each variant's ``--verify`` numbers against the fp32 torch
model on the gate's real prompts (top-1 agreement, mean KL, max logit difference, greedy tokens):

    compose build specs/smol/llava_demo.yaml -o out/smol-demo
    python benchmarks/ort_fusions.py out/smol-demo --accuracy --quantize int8 --threads 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

VARIANTS = ("all", "extended", "basic", "fused", "fused-basic")


def fuse_bundle(src: Path, dst: Path) -> dict[str, dict[str, int]]:
    """Copy the bundle ``src`` to ``dst`` with every LLM graph rewritten by ``optimize_for_ort``;
    -> {graph: {fusion: count}} (the non-zero counts)."""
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    from composer.export.manifest import read_manifest

    shutil.copytree(src, dst)
    manifest = read_manifest(dst)
    applied = {}
    for stage in manifest.stages:
        name = stage.graph
        model = ir.load(str(src / name))
        model, counts = optimize_for_ort(model)
        for f in dst.iterdir():  # the old graph and its external data
            if f.name == name or f.name.startswith(name + "."):
                f.unlink()
        ir.save(model, str(dst / name), external_data=name + ".data")
        applied[name] = {k: v for k, v in counts.items() if v}
    return applied


def split_variant(variant: str) -> tuple[bool, str]:
    """``VARIANTS`` entry -> (on the fused graphs, ONNX Runtime optimization level)."""
    fused = variant.startswith("fused")
    return fused, (variant.partition("-")[2] or "all") if fused else variant


def session_options(level: str, threads: int | None):
    import onnxruntime as ort

    from composer.export.runtime import default_session_options

    so = default_session_options(False, threads)
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    }[level]
    return so


def accuracy(checkpoint: str, scheme: str | None, threads: int | None) -> None:
    """Each variant's ``--verify`` numbers (the quantized gate's) on the checkpoint's bundle."""
    from composer.checkpoint import load_pretrained
    from composer.export.exporter import export_onnx
    from composer.export.runtime import OnnxPipeline
    from composer.export.verify import verify_quantized

    model = load_pretrained(checkpoint).eval()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = export_onnx(model, Path(tmp) / "bundle", quantize=scheme)
        print("fusions applied:", fuse_bundle(bundle, Path(tmp) / "fused"))
        print("| variant | top-1 agreement | mean KL | max logit diff | greedy tokens agreeing |")
        print("|---|---|---|---|---|")
        for v in VARIANTS:
            fused, level = split_variant(v)
            pipe = OnnxPipeline(
                Path(tmp) / ("fused" if fused else "bundle"), session_options=session_options(level, threads)
            )
            r = verify_quantized(model, pipe, steps=16, min_top1=0.95, atol=None)
            top1, n = r["top1_agreement"], r["positions"]
            cells = [f"{top1 * 100:.2f}% ({round(top1 * n)} of {n})", f"{r['mean_kl']:.4f}"]
            cells += [f"{r['max_logit_diff']:.2f}", f"{r['greedy_agreement'] * 100:.1f}%"]
            print(f"| {v} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec")
    ap.add_argument("--insert-at", type=int, action="append", default=None)
    ap.add_argument("--text-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--quantize", choices=("int8", "int4", "w8a8"), default=None, help="export quantized bundles (default fp32)"
    )
    ap.add_argument(
        "--accuracy", action="store_true", help="SPEC is a trained checkpoint: --verify numbers per variant"
    )
    args = ap.parse_args()
    if args.accuracy:
        accuracy(args.spec, args.quantize, args.threads)
        return

    from composer.analysis.bench import Runner, bench_inputs
    from composer.builder import build
    from composer.export.exporter import export_onnx
    from composer.export.runtime import OnnxPipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args.spec).eval()
    batch = bench_inputs(model, args.text_tokens, 1)
    mm = {m: batch[m] for m in model.encoders if m in batch}
    real = batch["attention_mask"].bool().numpy()
    ks = args.insert_at or [model.insert_at[next(iter(model.encoders))]]
    rows = []
    with tempfile.TemporaryDirectory(prefix="ort-fusions-") as tmp:
        runners, fusions = [], {}
        for k in ks:
            print(f"exporting k={k}", flush=True)
            t0 = time.perf_counter()
            bundle = export_onnx(
                model.with_insert_at({m: k for m in model.encoders}), Path(tmp) / f"k{k}", quantize=args.quantize
            )
            print(f"  exported in {time.perf_counter() - t0:.0f} s; fusing", flush=True)
            t0 = time.perf_counter()
            fusions[k] = fuse_bundle(bundle, Path(tmp) / f"k{k}-fused")
            print(f"  fused in {time.perf_counter() - t0:.0f} s: {fusions[k]}", flush=True)
            for v in VARIANTS:
                fused, level = split_variant(v)
                path = Path(tmp) / f"k{k}-fused" if fused else bundle
                pipe = OnnxPipeline(path, session_options=session_options(level, args.threads))
                logits, _ = pipe.prefill(batch["input_ids"], batch["attention_mask"], mm, all_logits=True)

                def fn(clock, pipe=pipe):
                    return pipe.generate(
                        batch["input_ids"],
                        batch["attention_mask"],
                        max_new_tokens=args.new_tokens,
                        eos_token_id=[],
                        streamer=clock,
                        **mm,
                    )

                r = Runner(v, None, fn, skip_prompt=False)
                r.k, r.logits = k, logits[real]
                r.run(1, args.new_tokens)  # warm-up
                runners.append(r)
        times = {id(r): [] for r in runners}
        for i in range(args.repeats):
            print(f"timed round {i + 1} of {args.repeats}", flush=True)
            for r in runners:
                times[id(r)].append(r.run(1, args.new_tokens))
        base = {r.k: r for r in runners if r.runtime == "all"}
        for r in runners:
            runs = times[id(r)]
            b = base[r.k]
            rows.append(
                {
                    "k": r.k,
                    "variant": r.runtime,
                    "prefill_s": statistics.median(x.prefill_s for x in runs),
                    "prefill_spread_s": [min(x.prefill_s for x in runs), max(x.prefill_s for x in runs)],
                    "decode_tps": statistics.median(x.decode_tps for x in runs),
                    "max_logit_diff_vs_all": float(np.abs(r.logits - b.logits).max()),
                    "greedy_equal_to_all": runs[0].tokens == times[id(b)][0].tokens,
                    "fusions": fusions[r.k] if r.runtime.startswith("fused") else {},
                }
            )
    print(f"\nthreads {torch.get_num_threads()}, {args.repeats} repeats, {args.new_tokens} new tokens")
    print(
        f"{'k':>3} {'variant':<9} {'prefill s':>10} {'vs all':>7} {'decode tok/s':>13} {'vs all':>7} "
        f"{'max |dlogit|':>13} greedy="
    )
    for row in rows:
        b = next(x for x in rows if x["k"] == row["k"] and x["variant"] == "all")
        print(
            f"{row['k']:>3} {row['variant']:<9} {row['prefill_s']:>10.3f} {b['prefill_s'] / row['prefill_s']:>6.2f}x "
            f"{row['decode_tps']:>13.1f} {row['decode_tps'] / b['decode_tps']:>6.2f}x "
            f"{row['max_logit_diff_vs_all']:>13.2e} {row['greedy_equal_to_all']}"
        )
    for k, f in fusions.items():
        print(f"k={k} fusions applied: {json.dumps(f)}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out = {"rows": rows, "threads": torch.get_num_threads(), "quantize": args.quantize or "fp32"}
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
