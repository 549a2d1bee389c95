"""Where a bundle's prefill (or decode) time goes: ONNX Runtime's own per-node profile, summed per op type.

Builds the spec's model at ``--insert-at``, exports one bundle (fp32, or ``--quantize``d), runs
``--repeats`` prefills (``max_new_tokens=1``) of ``--text-tokens`` text tokens plus one item per
modality after one warm-up, with ONNX Runtime's profiler on, and prints per graph the mean kernel
time per prefill and the op types that take it. ``--no-flush-denormals`` runs the sessions with
denormals kept, as ONNX Runtime does by default (composer flushes them to zero: see
``composer.export.runtime.default_session_options``).

``--decode D`` profiles decode instead: two pipelines on the same bundle, one running prefills
alone, one prefills plus D decode steps, the same number of times; their per-op difference divided
by the D steps is what one decode step after the prompt costs, with the number of kernels it runs
(each kernel launch is a fixed per-token overhead, however small its tensors); a third, unprofiled
pipeline gives the wall time per step (the profiler adds its own per-node cost), and the rest of
that wall time is spent outside ONNX Runtime's kernels.

    python benchmarks/ort_profile.py benchmarks/smol_llava_576.yaml --insert-at 0 --threads 2
    python benchmarks/ort_profile.py benchmarks/smol_llava_576.yaml --insert-at 15 --quantize int8 --decode 32
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path

import torch

from composer.export.quantize import DECODE_SCHEMES, SCHEMES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec")
    ap.add_argument("--insert-at", type=int, default=0)
    ap.add_argument("--quantize", choices=sorted(SCHEMES), default=None)
    ap.add_argument("--decode-quantize", choices=sorted(DECODE_SCHEMES), default=None, help="as compose export's")
    ap.add_argument("--decode-attention", choices=["plain", "fused"], default="plain", help="as compose export's")
    ap.add_argument("--fp32-channels", type=int, default=None, help="w8a8: as compose export --fp32-channels")
    ap.add_argument("--smooth-alpha", type=float, default=None, help="w8a8: as compose export --smooth-alpha")
    ap.add_argument("--text-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--top", type=int, default=8, help="op types listed per graph")
    ap.add_argument("--no-flush-denormals", action="store_true")
    ap.add_argument("--decode", type=int, default=0, metavar="D", help="profile D decode steps after the prompt")
    args = ap.parse_args()

    import composer
    from composer.analysis.bench import bench_inputs
    from composer.export.exporter import export_onnx
    from composer.export.runtime import OnnxPipeline, default_session_options

    torch.set_num_threads(args.threads)
    model = composer.build(args.spec).eval().with_insert_at(args.insert_at)
    batch = bench_inputs(model, args.text_tokens, 1)
    mm = {m: batch[m] for m in model.encoders if m in batch}
    with tempfile.TemporaryDirectory(prefix="ort-profile-") as tmp:
        w8a8 = {"fp32_channels": args.fp32_channels, "smooth_alpha": args.smooth_alpha}
        bundle = export_onnx(
            model,
            Path(tmp) / "bundle",
            dtype="fp32",
            quantize=args.quantize,
            decode_quantize=args.decode_quantize,
            decode_attention=args.decode_attention,
            **{k: v for k, v in w8a8.items() if v is not None},
        )

        def pipeline(prefix: str | None) -> OnnxPipeline:
            so = default_session_options(False, args.threads)
            if args.no_flush_denormals:
                so.add_session_config_entry("session.set_denormal_as_zero", "0")
            if prefix is not None:  # profiled (None: not, for wall times the profiler does not inflate)
                so.enable_profiling = True
                so.profile_file_prefix = str(Path(tmp) / prefix)
            return OnnxPipeline(bundle, session_options=so)

        def timed(pipe: OnnxPipeline, new_tokens: int) -> float:
            t = time.perf_counter()
            pipe.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=new_tokens, eos_token_id=[], **mm)
            return time.perf_counter() - t

        header = (
            f"{args.spec} k={args.insert_at} {args.quantize or 'fp32'}"
            + (f" + {args.decode_quantize} decode ({args.decode_attention} attention)" if args.decode_quantize else "")
            + f", {args.threads} threads, denormals "
            f"{'kept' if args.no_flush_denormals else 'flushed'}"
        )
        n = args.repeats + 1  # the warm-up's nodes are in the profile too: per-graph means are over repeats + 1
        if not args.decode:
            pipe = pipeline("profile")
            timed(pipe, 1)
            walls = [timed(pipe, 1) for _ in range(args.repeats)]
            print(f"{header}: prefill wall " + ", ".join(f"{w:.3f}" for w in walls) + " s")
            for name, (per_op, _) in node_times(pipe).items():
                total = sum(per_op.values()) / n / 1e3
                top = ", ".join(f"{op} {us / n / 1e3:.1f}" for op, us in per_op.most_common(args.top))
                print(f"  {name}: {total:.1f} ms per run (incl. warm-up, mean of {n}): {top}")
            return
        pre, dec, plain = pipeline("prefill"), pipeline("decode"), pipeline(None)
        walls = {"prefill": [], "decode": []}
        for _ in range(n):  # interleaved: the machine's drift lands on both
            timed(pre, 1)
            timed(dec, 1 + args.decode)
            walls["prefill"].append(timed(plain, 1))
            walls["decode"].append(timed(plain, 1 + args.decode))
        step_ms = [(d - p) / args.decode * 1e3 for p, d in zip(walls["prefill"][1:], walls["decode"][1:], strict=True)]
        print(
            f"{header}: decode step after {batch['input_ids'].shape[1]} prompt tokens, wall (unprofiled) "
            + ", ".join(f"{w:.2f}" for w in step_ms)
            + f" ms ({1e3 / sorted(step_ms)[len(step_ms) // 2]:.1f} tokens/s at the median)"
        )
        a, b = node_times(pre), node_times(dec)
        in_kernels = 0.0
        for name in b:
            if b[name][1] == a[name][1]:  # runs in the prefill only (the encoders)
                continue
            diff = b[name][0].copy()
            diff.subtract(a[name][0])
            kernels = (b[name][1] - a[name][1]) / n / args.decode
            total = sum(diff.values()) / n / args.decode / 1e3
            top = ", ".join(f"{op} {us / n / args.decode / 1e3:.2f}" for op, us in diff.most_common(args.top))
            print(f"  {name}: {total:.2f} ms per decode step in {kernels:.0f} kernels: {top}")
            in_kernels += total
        rest = sorted(step_ms)[len(step_ms) // 2] - in_kernels
        print(
            f"  outside ONNX Runtime's kernels (Python loop, feeds, session overhead): {rest:.2f} ms"
            + (" (below zero: the profiler's own cost per kernel is larger than that)" if rest < 0 else "")
        )


def node_times(pipe) -> dict[str, tuple[collections.Counter, int]]:
    """Per graph of ``pipe``: (kernel microseconds per op type, number of kernel runs), from its
    profile (which ends profiling)."""
    out = {}
    for name, sess in pipe.sessions.items():
        per_op: collections.Counter = collections.Counter()
        runs = 0
        for e in json.loads(Path(sess.end_profiling()).read_text()):
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                per_op[e["args"]["op_name"]] += e["dur"]
                runs += 1
        out[name] = (per_op, runs)
    return out


if __name__ == "__main__":
    main()
