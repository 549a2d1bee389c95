"""CPU prefill latency of a split ONNX bundle at insert_at k vs 0, measured side by side.

A mid-size random model: Llama-style LLM with 24 layers, width 1024 (FFN 2816, 16 heads),
576 MM tokens per image (CLIP-shaped encoder: 336px, 14px patches, kept tiny so the LLM
dominates), 64 text tokens. Both bundles get the same weights and the same inputs.

    python benchmarks/onnx_prefill.py --insert-at 12 --repeats 5

Prints median and spread of ONNX Runtime (CPU) and torch eager prefill, the measured ratio
k vs 0, and the analytic FLOPs ratio (the FLOPs model of docs/architecture.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from composer.analysis.flops import prefill_flops
from composer.builder import build
from composer.export.exporter import export_onnx
from composer.export.runtime import OnnxPipeline
from composer.spec import parse_spec


def spec(k: int, layers: int, width: int, ffn: int) -> dict:
    return {
        "name": f"bench-k{k}",
        "seed": 0,
        "llm": {
            "config": {
                "model_type": "llama",
                "vocab_size": 32000,
                "hidden_size": width,
                "intermediate_size": ffn,
                "num_hidden_layers": layers,
                "num_attention_heads": 16,
                "num_key_value_heads": 16,
                "max_position_embeddings": 4096,
                "bos_token_id": 1,
                "eos_token_id": 2,
                "pad_token_id": 0,
            },
            "tokenizer": {"type": "byte"},
        },
        "modalities": {
            "image": {
                "encoder": {
                    "config": {
                        "model_type": "clip_vision_model",
                        "hidden_size": 64,
                        "intermediate_size": 128,
                        "num_hidden_layers": 1,
                        "num_attention_heads": 4,
                        "image_size": 336,
                        "patch_size": 14,
                    }
                },
                "projector": {"type": "mlp", "depth": 2},
                "insert_at": k,
            }
        },
        "prompt": {"template": "<image>{instruction}"},
    }


def timed(fn, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _time_graphs(pipe) -> dict[str, list[float]]:
    """Wrap the pipeline's session calls to record each graph's wall time."""
    times: dict[str, list[float]] = {}
    run = pipe._run_session

    def wrapped(graph, feeds, bindings=None):
        t = time.perf_counter()
        out = run(graph, feeds, bindings)
        times.setdefault(graph, []).append(time.perf_counter() - t)
        return out

    pipe._run_session = wrapped
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--insert-at", type=int, default=12)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--text-tokens", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    results = {}
    shapes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in (0, args.insert_at):
            model = build(parse_spec(spec(k, args.layers, args.width, args.ffn))).eval()
            shapes[k] = model.adapter.shape
            n_text = args.text_tokens
            text = "x" * (n_text - 1)  # byte tokenizer: one token per byte, + BOS
            batch = model.prepare(
                [f"<image>{text}"], image=[model.encoders["image"].example_inputs(1)["pixel_values"][0]]
            )
            mm = {"image": batch["image"]}
            t0 = time.perf_counter()
            bundle = export_onnx(model, Path(tmp) / f"k{k}")
            export_s = time.perf_counter() - t0
            pipe = OnnxPipeline(bundle)
            per_graph = _time_graphs(pipe)
            ort_s = timed(
                lambda pipe=pipe, batch=batch, mm=mm: pipe.prefill(batch["input_ids"], batch["attention_mask"], mm),
                args.warmup,
                args.repeats,
            )
            per_graph = {g: statistics.median(v[args.warmup :]) for g, v in per_graph.items()}
            with torch.no_grad():
                torch_s = timed(
                    lambda model=model, batch=batch: model.generate(**batch, max_new_tokens=1, eos_token_id=[]),
                    args.warmup,
                    args.repeats,
                )
            results[k] = {
                "onnxruntime_s": ort_s,
                "torch_s": torch_s,
                "export_s": export_s,
                "per_graph_s": per_graph,
                "tokens": {
                    "text": int((batch["input_ids"] != model.placeholder_ids["image"]).sum()),
                    "mm": model.num_tokens("image"),
                },
            }
            pipe = model = None  # free both before the next k
    k = args.insert_at
    tok = results[0]["tokens"]
    shape = shapes[0]
    flops = {kk: prefill_flops(shape, tok["text"], {"image": tok["mm"]}, {"image": kk}) for kk in (0, k)}
    med = {kk: {r: statistics.median(results[kk][r]) for r in ("onnxruntime_s", "torch_s")} for kk in (0, k)}
    print(
        f"model: {args.layers} layers, width {args.width}, FFN {args.ffn}; {tok['text']} text + {tok['mm']} MM tokens; "
        f"batch 1; {torch.get_num_threads()} threads; median of {args.repeats} after {args.warmup} warm-up"
    )
    print(f"{'runtime':<14}{'k=0 (s)':>12}{f'k={k} (s)':>12}{'k/0':>8}   spread k=0 / k={k}")
    for r, label in (("onnxruntime_s", "onnxruntime"), ("torch_s", "torch eager")):
        a, b = results[0][r], results[k][r]
        print(
            f"{label:<14}{med[0][r]:>12.3f}{med[k][r]:>12.3f}{med[k][r] / med[0][r]:>8.2f}   "
            f"{min(a):.3f}-{max(a):.3f} / {min(b):.3f}-{max(b):.3f}"
        )
    for kk in (0, k):
        print(
            f"onnxruntime per graph at k={kk}: "
            + ", ".join(f"{g} {v:.3f}s" for g, v in results[kk]["per_graph_s"].items())
        )
    print(f"analytic prefill FLOPs ratio k/0 (LLM layers): {flops[k] / flops[0]:.2f}")
    print(f"onnxruntime vs torch eager at k=0: {med[0]['onnxruntime_s'] / med[0]['torch_s']:.2f}x the time")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "flops": flops}, indent=2))


if __name__ == "__main__":
    main()
