"""Where a bundle's prefill time goes: ONNX Runtime's own per-node profile, summed per op type.

Builds the spec's model at ``--insert-at``, exports one bundle (fp32, or ``--quantize``d), runs
``--repeats`` prefills (``max_new_tokens=1``) of ``--text-tokens`` text tokens plus one item per
modality after one warm-up, with ONNX Runtime's profiler on, and prints per graph the mean kernel
time per prefill and the op types that take it. ``--no-flush-denormals`` runs the sessions with
denormals kept, as ONNX Runtime does by default (composer flushes them to zero: see
``composer.export.runtime.default_session_options``).

    python benchmarks/ort_profile.py benchmarks/smol_llava_576.yaml --insert-at 0 --threads 2
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path

import torch

from composer.export.quantize import SCHEMES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec")
    ap.add_argument("--insert-at", type=int, default=0)
    ap.add_argument("--quantize", choices=sorted(SCHEMES), default=None)
    ap.add_argument("--fp32-channels", type=int, default=None, help="w8a8: as compose export --fp32-channels")
    ap.add_argument("--smooth-alpha", type=float, default=None, help="w8a8: as compose export --smooth-alpha")
    ap.add_argument("--text-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--top", type=int, default=8, help="op types listed per graph")
    ap.add_argument("--no-flush-denormals", action="store_true")
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
            **{k: v for k, v in w8a8.items() if v is not None},
        )
        so = default_session_options(False, args.threads)
        if args.no_flush_denormals:
            so.add_session_config_entry("session.set_denormal_as_zero", "0")
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "profile")
        pipe = OnnxPipeline(bundle, session_options=so)

        def prefill() -> float:
            t = time.perf_counter()
            pipe.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=1, eos_token_id=[], **mm)
            return time.perf_counter() - t

        prefill()  # warm-up: its nodes are in the profile too, so the per-graph means below are over repeats + 1
        walls = [prefill() for _ in range(args.repeats)]
        n = args.repeats + 1
        print(
            f"{args.spec} k={args.insert_at} {args.quantize or 'fp32'}, {args.threads} threads, denormals "
            f"{'kept' if args.no_flush_denormals else 'flushed'}: prefill wall "
            + ", ".join(f"{w:.3f}" for w in walls)
            + " s"
        )
        for name, sess in pipe.sessions.items():
            per_op: collections.Counter = collections.Counter()
            for e in json.loads(Path(sess.end_profiling()).read_text()):
                if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                    per_op[e["args"]["op_name"]] += e["dur"]
            total = sum(per_op.values()) / n / 1e3
            top = ", ".join(f"{op} {us / n / 1e3:.1f}" for op, us in per_op.most_common(args.top))
            print(f"  {name}: {total:.1f} ms per run (incl. warm-up, mean of {n}): {top}")


if __name__ == "__main__":
    main()
