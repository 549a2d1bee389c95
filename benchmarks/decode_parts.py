"""What one decode step's parts cost in ONNX Runtime alone, at SmolLM2-135M's shapes, one graph per
part (no composer code): the int8 weight GEMVs (``MatMulNBits``, 8-bit, block 32, accuracy level 4,
one row; q, k, v packed into "qkv" and gate, up into "gate_up", as the int8 bundles pack them) and
the attention over the KV buffers of 15 layers, as the bundles compute it (``TensorScatter`` of the
new key and value rows, then ONNX ``Attention`` with an additive mask; rotary applied before it) and
as ONNX Runtime's fused ``GroupQueryAttention`` contrib op would (rotary, the in-place write and
attention in one node).

Each graph repeats its part ``--reps`` times (independent nodes on one input), so the time per part
is the run's median divided by the repeats; GB/s is weight bytes over that time.

    python benchmarks/decode_parts.py --threads 1 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

H, KV, D, HIDDEN, FFN, VOCAB, LAYERS = 9, 3, 64, 576, 1536, 49152, 15
GEMVS = {  # name: (K, N)
    "qkv": (HIDDEN, (H + 2 * KV) * D),
    "o": (H * D, HIDDEN),
    "gate_up": (HIDDEN, 2 * FFN),
    "down": (FFN, HIDDEN),
    "lm head": (HIDDEN, VOCAB),
}


def _session(model_bytes: bytes, threads: int, spinning: bool):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def _median_ms(run, warm: int = 10, n: int = 40) -> float:
    for _ in range(warm):
        run()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        run()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def gemv_model(K: int, N: int, reps: int) -> bytes:
    import onnx
    from onnx import TensorProto as TP
    from onnx import helper as h
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    rng = np.random.default_rng(0)
    inits = [
        onnx.numpy_helper.from_array((rng.standard_normal((K, N)) * 0.02).astype(np.float32), f"w{i}")
        for i in range(reps)
    ]
    nodes = [h.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]) for i in range(reps)]
    outs = [h.make_tensor_value_info(f"y{i}", TP.FLOAT, [1, N]) for i in range(reps)]
    g = h.make_graph(nodes, "gemv", [h.make_tensor_value_info("x", TP.FLOAT, [1, K])], outs, inits)
    cfg = mnq.DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, accuracy_level=4, bits=8)
    q = mnq.MatMulNBitsQuantizer(h.make_model(g, opset_imports=[h.make_opsetid("", 21)]), algo_config=cfg)
    q.process()
    return q.model.model.SerializeToString()


def attention_models(S: int) -> dict[str, bytes]:
    """LAYERS attention parts over (1, KV, S, D) buffers: the bundles' way and GroupQueryAttention."""
    import onnx
    from onnx import TensorProto as TP
    from onnx import helper as h

    def kv_io(i):
        ins = [
            h.make_tensor_value_info(f"pk{i}", TP.FLOAT, [1, KV, S, D]),
            h.make_tensor_value_info(f"pv{i}", TP.FLOAT, [1, KV, S, D]),
        ]
        outs = [h.make_tensor_value_info(f"{n}{i}", TP.FLOAT, None) for n in ("o", "k", "v")]
        return ins, outs

    inv = 1.0 / (10000 ** (np.arange(0, D, 2) / D))
    ang = np.arange(8192)[:, None] * inv[None]
    rope = [
        onnx.numpy_helper.from_array(np.cos(ang).astype(np.float32), "cos"),
        onnx.numpy_helper.from_array(np.sin(ang).astype(np.float32), "sin"),
    ]
    ins = [
        h.make_tensor_value_info("qkv", TP.FLOAT, [1, 1, (H + 2 * KV) * D]),
        h.make_tensor_value_info("seqlens_k", TP.INT32, [1]),
        h.make_tensor_value_info("total", TP.INT32, []),
        h.make_tensor_value_info("pos", TP.INT64, [1, 1]),
        h.make_tensor_value_info("bias", TP.FLOAT, [1, 1, 1, S]),
    ]
    outs, nodes = [], []
    for i in range(LAYERS):
        a, b = kv_io(i)
        ins, outs = ins + a, outs + b
        gqa_in = ["qkv", "", "", f"pk{i}", f"pv{i}", "seqlens_k", "total", "cos", "sin", "pos", "bias"]
        nodes.append(
            h.make_node(
                "GroupQueryAttention", gqa_in, [f"o{i}", f"k{i}", f"v{i}"],
                domain="com.microsoft", num_heads=H, kv_num_heads=KV, do_rotary=1,
            )
        )  # fmt: skip
    gqa = h.make_model(
        h.make_graph(nodes, "gqa", ins, outs, rope),
        opset_imports=[h.make_opsetid("", 21), h.make_opsetid("com.microsoft", 1)],
    )
    ins = [
        h.make_tensor_value_info("q", TP.FLOAT, [1, H, 1, D]),
        h.make_tensor_value_info("k", TP.FLOAT, [1, KV, 1, D]),
        h.make_tensor_value_info("v", TP.FLOAT, [1, KV, 1, D]),
        h.make_tensor_value_info("index", TP.INT64, [1]),
        h.make_tensor_value_info("bias", TP.FLOAT, [1, 1, 1, S]),
    ]
    outs, nodes = [], []
    for i in range(LAYERS):
        a, b = kv_io(i)
        ins, outs = ins + a, outs + b
        nodes += [
            h.make_node("TensorScatter", [f"pk{i}", "k", "index"], [f"k{i}"], axis=2),
            h.make_node("TensorScatter", [f"pv{i}", "v", "index"], [f"v{i}"], axis=2),
            h.make_node("Attention", ["q", f"k{i}", f"v{i}", "bias"], [f"o{i}"], q_num_heads=H, kv_num_heads=KV),
        ]
    ours = h.make_model(h.make_graph(nodes, "ours", ins, outs), opset_imports=[h.make_opsetid("", 24)])
    return {"TensorScatter x2 + Attention (the bundles; rotary not included)": ours.SerializeToString(),
            "GroupQueryAttention (rotary included)": gqa.SerializeToString()}  # fmt: skip


def run_attention(model_bytes: bytes, S: int, at: int, threads: int, spinning: bool) -> float:
    import onnxruntime as ort

    sess = _session(model_bytes, threads, spinning)
    rng = np.random.default_rng(0)
    binding = sess.io_binding()
    bufs = {}
    for i in range(LAYERS):  # the KV buffers bound in and out: written in place, as in the bundles
        for c in "kv":
            bufs[c, i] = ort.OrtValue.ortvalue_from_numpy(rng.standard_normal((1, KV, S, D)).astype(np.float32))
            binding.bind_ortvalue_input(f"p{c}{i}", bufs[c, i])
            binding.bind_ortvalue_output(f"{c}{i}", bufs[c, i])
        binding.bind_output(f"o{i}", "cpu")
    bias = np.where(np.arange(S) <= at, 0, -np.inf).astype(np.float32)[None, None, None]
    names = {i.name for i in sess.get_inputs()}
    feeds = {
        "qkv": rng.standard_normal((1, 1, (H + 2 * KV) * D)).astype(np.float32),
        "seqlens_k": np.array([at], np.int32),
        "total": np.array(S, np.int32),
        "pos": np.array([[at]], np.int64),
        "q": rng.standard_normal((1, H, 1, D)).astype(np.float32),
        "k": rng.standard_normal((1, KV, 1, D)).astype(np.float32),
        "v": rng.standard_normal((1, KV, 1, D)).astype(np.float32),
        "index": np.array([at], np.int64),
        "bias": bias,
    }
    for k, v in feeds.items():
        if k in names:
            binding.bind_cpu_input(k, v)
    return _median_ms(lambda: sess.run_with_iobinding(binding), n=100)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--threads", type=int, action="append", help="ONNX Runtime intra-op threads (repeatable; default 1 and 2)"
    )
    ap.add_argument(
        "--spinning", action="store_true", help="let the pool's threads spin (the bundles' sessions do not)"
    )
    ap.add_argument("--reps", type=int, default=30, help="GEMV nodes per graph (2 for the LM head)")
    ap.add_argument("--cache", type=int, default=720, help="KV buffer rows (640 prompt + 80 reserved)")
    ap.add_argument("--context", type=int, action="append", help="rows written (default 640 and 64)")
    a = ap.parse_args(argv)
    threads = a.threads or [1, 2]
    from composer.analysis.report import cpu_info

    print(f"CPU: {cpu_info().get('model')}; ONNX Runtime threads {threads}; spinning {'on' if a.spinning else 'off'}")
    print("| part | " + " | ".join(f"{t} thread{'s' if t > 1 else ''}" for t in threads) + " |")
    print("|---|" + "---|" * len(threads))
    step = dict.fromkeys(threads, 0.0)
    for name, (K, N) in GEMVS.items():
        reps = 2 if N > 10_000 else a.reps
        mb = gemv_model(K, N, reps)
        cells = []
        for t in threads:
            sess = _session(mb, t, a.spinning)
            x = np.random.default_rng(1).standard_normal((1, K)).astype(np.float32)
            ms = _median_ms(lambda sess=sess, x=x: sess.run(None, {"x": x})) / reps
            step[t] += ms * (1 if name == "lm head" else 2 * LAYERS)
            cells.append(f"{ms * 1e3:.1f} us ({K * N / ms / 1e6:.1f} GB/s)")
        print(f"| MatMulNBits {name} ({K}x{N}) | " + " | ".join(cells) + " |", flush=True)
    print("| every GEMV of a step (30 layers + head) | " + " | ".join(f"{step[t]:.2f} ms" for t in threads) + " |")
    for at in a.context or [640, 64]:
        S = a.cache if at == 640 else at + (a.cache - 640)
        for name, mb in attention_models(S).items():
            cells = [f"{run_attention(mb, S, at, t, a.spinning):.3f} ms" for t in threads]
            print(f"| {LAYERS} layers' attention over {at} rows: {name} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
