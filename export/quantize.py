"""Weight quantization of a bundle's LLM graphs (``compose export --quantize int8|int4|w8a8``).

``int8`` / ``int4``: every weight MatMul of the early and late LLM graphs (attention and MLP
projections, and the LM head unless ``keep_head``) becomes ONNX Runtime's ``MatMulNBits``: symmetric
round-to-nearest weights in blocks of ``block_size`` along the input dimension, one fp32 scale per
block, through ONNX Runtime's own ``MatMulNBitsQuantizer``. ``accuracy_level`` picks the kernel's
activation precision (4: int8 activations per block, the fast kernels on x86 with VNNI/AMX;
1: fp32, exact but far slower on CPU). Encoders, embeddings and norms stay in the bundle's dtype.

``w8a8``: int8 weights (one scale per output channel) times int8 activations with one scale per
token, computed at run time, as ``MatMulIntegerToFloat`` (ONNX Runtime's u8 x s8 GEMM, which runs
on AMX/VNNI): on SmolLM2's 640-row prefill its GEMMs ran ~7x faster than fp32 ``MatMul``, where
8-bit ``MatMulNBits`` is no faster than fp32 (its CPU kernel is tuned for one-row decode steps).
One activation scale per token (not per block of 32) is coarse where a few input channels are
much larger than the rest (LLMs' outlier channels), so a calibration pass of the fp32 model over
``CALIBRATION_PROMPTS`` (one at a time, each with the encoders' example inputs) records each
input channel's largest |x|, and per shared activation (q/k/v; gate/up; o; down; the head):

- its ``FP32_CHANNELS`` (16) largest channels stay fp32: gathered and multiplied by their fp32
  weight rows in a small ``MatMul`` added to the int8 product, and zeroed in the int8 path (the
  mixed-precision decomposition of LLM.int8(), Dettmers et al., 2022, with the channels fixed at
  calibration instead of found per batch);
- the other channels get SmoothQuant (Xiao et al., 2023) with alpha 0.5: ``s_j = max|x_j|^alpha /
  max|W_j|^(1-alpha)``, weights multiplied by ``s``, activations divided by it before
  quantization (``x W = (x / s)(s W)``, exact in real numbers).

Measured on SmolLM2-135M (the demo checkpoint, ``--verify``'s 8 prompts, 298 positions; mean KL of
the quantized next-token distribution from fp32's): int8 ``MatMulNBits`` (block 32) 97.99% top-1 (292 of 298),
KL 0.014; w8a8 as shipped 97.65% (291), KL 0.011 (32 fp32 channels: 291, 0.0086); SmoothQuant alone
(alpha 0.8, no fp32 channels) 87.6%, KL 0.066. ``benchmarks/w8a8_emulation.py`` (the arithmetic in
torch, one piece switched at a time) puts the pieces apart (KL): per-token activations alone (fp32
weights, alpha 0.8) 0.008, per-channel weights alone 0.010, both at alpha 0.8 0.059 (smoothing a
few huge channels into the weights spoils their per-output-channel scales), at alpha 0.5 0.038;
8 / 16 / 32 fp32 channels at alpha 0.5: 0.012 / 0.010 / 0.010. The fp32 channels cost ~15% of the
late graph's time at k = 15 (``benchmarks/ort_profile.py``: ``MatMul`` + ``Add`` + ``Gather``
~50 of 390 ms); accumulating them with ``Gemm`` instead was slower.
The fused ``MatMulIntegerToFloat`` (int32 product scaled per column in the GEMM's output stage)
beat ``MatMulInteger`` + ``Cast`` + ``Mul`` on the SmolLM2 shape at k = 15 in prefill (0.278 vs
0.308 s) and in decode (45.8 vs 41.7 tokens/s; 2 threads, median of 4).

Why not ``quantize_dynamic`` (``MatMulInteger``, one activation scale per tensor): measured on
SmolLM2-135M, whose MLP inputs reach ~3,000 in two layers (massive activations) against an RMS
below 1, per-tensor int8 activations destroyed the model (0-55% top-1 agreement on plain text,
with or without per-channel weights, reduced range or those layers left out); block-wise weights with
per-block activation scales kept ~98% (int8). ``compose export --verify`` checks a quantized
bundle by top-1 agreement with the fp32 torch model (``composer.export.verify``).
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

from composer.errors import InputError
from composer.export.manifest import SCHEMES
from composer.export.packing import feed_packed_qkv, pack_shared_matmuls, value_uses, weight_matmuls

METHOD = "MatMulNBits, symmetric round-to-nearest, block-wise (onnxruntime.quantization.matmul_nbits_quantizer)"
W8A8_METHOD = (
    "MatMulIntegerToFloat: int8 weights per output channel x uint8 activations per token (dynamic, zero point 128), "
    "SmoothQuant-calibrated, the largest calibration channels of each input in fp32"
)
SMOOTH_ALPHA = 0.5  # SmoothQuant's migration strength (module docstring)
FP32_CHANNELS = 16  # per shared activation: its largest calibration channels stay fp32 (module docstring)
# Calibration prompts of w8a8's smoothing pass: not the prompts --verify checks (composer.export.examples.PROMPTS)
CALIBRATION_SAMPLES = 32  # records of a --calibration file used (the first ones)
CALIBRATION_PROMPTS = (
    "What do you see in this picture?",
    "Tell me a short story about a dragon.",
    "How many legs does a spider have?",
    "Translate 'good morning' into Spanish.",
    "What is 17 times 23?",
    "Name a famous painter.",
    "Why is the sky blue?",
    "Summarize the plot of Romeo and Juliet.",
)


# --decode-quantize: the schemes whose one-row GEMVs are fast (MatMulNBits), for a bundle's decode graphs
DECODE_SCHEMES = ("int8", "int4")
# what `compose bench --quantize` takes: a scheme, PREFILL+DECODE (--quantize P --decode-quantize D), or
# PREFILL+DECODE:fused (and --decode-attention fused; then P may equal D)
BUNDLE_SCHEMES = (
    *SCHEMES,
    *(f"{p}+{d}" for p in SCHEMES for d in DECODE_SCHEMES if p != d),
    *(f"{p}+{d}:fused" for p in SCHEMES for d in DECODE_SCHEMES),
)


def split_scheme(label: str) -> tuple[str, str | None, str]:
    """A ``BUNDLE_SCHEMES`` label -> (``quantize``, ``decode_quantize``, ``decode_attention``):
    "w8a8+int8" -> ("w8a8", "int8", "plain"), "int8+int8:fused" -> ("int8", "int8", "fused")."""
    label, _, attention = label.partition(":")
    prefill, _, decode = label.partition("+")
    return prefill, decode or None, attention or "plain"


def check_options(scheme: str, dtype: str, block_size: int, accuracy_level: int, option: str = "--quantize") -> None:
    """One InputError naming the option, before anything is exported."""
    if scheme not in SCHEMES:
        raise InputError(f"{option} must be one of {sorted(SCHEMES)}, got {scheme!r}")
    if dtype != "fp32":
        raise InputError(f"{option} quantizes fp32 weights; use it with --dtype fp32, got --dtype {dtype}")
    if (
        isinstance(block_size, bool)
        or not isinstance(block_size, int)
        or block_size < 16
        or block_size & (block_size - 1)
    ):
        raise InputError(f"--block-size must be a power of two >= 16, got {block_size!r}")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise InputError(f"--accuracy-level must be 0-4 (ONNX Runtime's MatMulNBits), got {accuracy_level!r}")


def head_nodes(model, vocab_size: int) -> list[str]:
    """The LM head: the weight MatMul whose output width is the vocabulary."""
    shapes = {i.name: list(i.dims) for i in model.graph.initializer}
    return [n.name for n in weight_matmuls(model) if shapes[n.input[1]][-1] == vocab_size]


def _quantizer():
    """ONNX Runtime's block-wise quantizer classes. Importing the module runs ``logging.basicConfig``
    at INFO, which would print every later INFO record of every library (a line per node here, and
    onnx_ir's passes at the next export); the root logger is put back as it was."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger(mnq.__name__).setLevel(logging.WARNING)
    return mnq.DefaultWeightOnlyQuantConfig, mnq.MatMulNBitsQuantizer


def quantize_graph(
    path: Path, *, bits: int, block_size: int, accuracy_level: int, exclude: list[str] | None = None, pack: bool = True
) -> dict:
    """Quantize the weight MatMuls of ``path`` (an ONNX graph with external data) in place, those
    that read the same input packed into one first (``packing.pack_shared_matmuls``: a layer's q, k
    and v; its gate and up; ``pack=False``: each alone). -> {"quantized": n, "kept": [names left in
    full precision], "packed": MatMuls merged away}."""
    import onnx

    DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer = _quantizer()
    model = onnx.load(str(path))
    exclude = list(exclude or [])
    candidates = [n.name for n in weight_matmuls(model)]
    packed = pack_shared_matmuls(model, exclude) if pack else 0
    feed_packed_qkv(model)  # fused decode graphs: GroupQueryAttention reads the packed q|k|v itself
    cfg = DefaultWeightOnlyQuantConfig(
        block_size=block_size,
        is_symmetric=True,
        accuracy_level=accuracy_level,
        bits=bits,
        op_types_to_quantize=("MatMul",),
    )
    q = MatMulNBitsQuantizer(model, nodes_to_exclude=exclude, algo_config=cfg)
    q.process()
    done = sum(n.op_type == "MatMulNBits" for n in q.model.model.graph.node)
    _save_over(q.model.model, path)
    return {"quantized": done, "kept": [n for n in candidates if n in exclude], "packed": packed}


EMBEDDING_BLOCK = 32  # weights per scale of the quantized token embedding (as llama.cpp's Q8_0)


def quantize_embedding(model, vocab_size: int, block_size: int = EMBEDDING_BLOCK) -> int:
    """Rewrite, in place, every ``Gather`` of token ids from a (vocab, hidden) fp32 initializer (the
    LLM's token embedding) as ONNX Runtime's ``GatherBlockQuantized``: int8 weights, symmetric, in
    blocks of ``block_size`` along the hidden dimension with one fp32 scale each, stored as
    ``MatMulNBits`` stores 8-bit weights (uint8 = int8 + 128, the op's default zero point). A
    lookup reads one row, so the int8 table costs nothing in time and shrinks the table 3.6x
    (SmolLM2: 113 MB -> 32 MB per graph that embeds tokens). An initializer that another node also
    reads stays as well; a hidden size that is not a multiple of ``block_size`` keeps fp32.
    -> how many Gathers were rewritten."""
    import numpy as np
    from onnx import TensorProto
    from onnx import helper as oh
    from onnx import numpy_helper as nh

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    uses = value_uses(graph)
    done = 0
    for pos, n in enumerate(graph.node):
        table = inits.get(n.input[0]) if n.op_type == "Gather" else None
        axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
        if (
            table is None
            or axis != 0
            or n.input[1] in inits
            or table.data_type != TensorProto.FLOAT
            or len(table.dims) != 2
            or table.dims[0] != vocab_size
            or table.dims[1] % block_size
        ):
            continue
        w = nh.to_array(table).astype(np.float32)
        blocks = w.reshape(w.shape[0], -1, block_size)
        scale = np.abs(blocks).max(-1) / 127
        scale[scale == 0] = 1.0
        q = np.clip(np.round(blocks / scale[..., None]), -127, 127).astype(np.int16) + 128
        name = f"{table.name}.int8"
        graph.initializer.extend(
            [
                nh.from_array(q.astype(np.uint8).reshape(w.shape), name),
                nh.from_array(scale.astype(np.float32), f"{table.name}.int8_scales"),
            ]
        )
        graph.node.remove(n)
        graph.node.insert(
            pos,
            oh.make_node(
                "GatherBlockQuantized",
                [name, n.input[1], f"{table.name}.int8_scales"],
                list(n.output),
                name=n.name,
                domain="com.microsoft",
                gather_axis=0,
                quantize_axis=1,
                block_size=block_size,
                bits=8,
            ),
        )
        if uses[table.name] == 1:
            graph.initializer.remove(table)
        done += 1
    if done and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(oh.make_opsetid("com.microsoft", 1))
    return done


def quantize_graph_embedding(path: Path, vocab_size: int) -> int:
    """``quantize_embedding`` on the graph at ``path`` (external data), in place. -> how many."""
    import onnx

    model = onnx.load(str(path))
    done = quantize_embedding(model, vocab_size)
    if done:
        _save_over(model, path)
    return done


def _weight_key(w) -> str:
    """A (in, out) float32 weight matrix -> the key its calibration statistics are stored under:
    the exported graphs name their constant-folded weights ``val_N``, so they are matched to the
    torch ``nn.Linear`` they came from by content."""
    import hashlib

    import numpy as np

    return hashlib.sha1(np.ascontiguousarray(w, dtype=np.float32).tobytes()).hexdigest()


def check_w8a8_options(fp32_channels, smooth_alpha, reduce_range=None) -> None:
    """One InputError naming the option, before anything is exported."""
    if reduce_range is not None and not isinstance(reduce_range, bool):
        raise InputError(f"--reduce-range is true or false, got {reduce_range!r}")
    if isinstance(fp32_channels, bool) or not isinstance(fp32_channels, int) or fp32_channels < 0:
        raise InputError(f"--fp32-channels must be an integer >= 0, got {fp32_channels!r}")
    if isinstance(smooth_alpha, bool) or not isinstance(smooth_alpha, int | float) or not 0 <= smooth_alpha <= 1:
        raise InputError(f"--smooth-alpha must be in [0, 1], got {smooth_alpha!r}")


def calibration_batches(model, path: str | Path, samples: int = CALIBRATION_SAMPLES) -> list[dict]:
    """The first ``samples`` records of a JSONL file in the training formats (``composer.train.data``:
    LLaVA, LTU or generic records, media paths relative to the file and inside its directory), one
    batch each: prompt and response in the spec's template, with the records' own images or audio.
    Read and preprocessed up front (those records only: the rest of the file is not read), so a bad
    record or missing media file is an InputError before anything is exported."""
    from composer.train.data import Collator, read_jsonl

    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise InputError(f"--calibration-samples must be a positive integer, got {samples!r}")
    collate = Collator(model)
    batches = []
    # only the records used are read and checked; media paths stay inside the file's directory
    from composer.adapters import encoder_types, text_modalities

    text = text_modalities(encoder_types(model))
    for ex in read_jsonl(path, dict(model.placeholders), limit=samples, confine=True, text=text):
        batch = collate([ex])
        batch.pop("labels")
        batches.append(batch)
    return batches


def activation_ranges(model, prompts=CALIBRATION_PROMPTS, *, batches=None, progress=lambda s: None) -> dict:
    """Per ``nn.Linear`` of the LLM, the largest |input| per input channel over fp32 forward
    passes of ``prompts`` (each with the encoders' seeded example inputs), or of ``batches``
    (``calibration_batches``) when given: {weight key: (in,) numpy array}.
    ``model``: the model being exported (LoRA merged), whose weights the graphs hold."""
    import numpy as np
    import torch

    from composer.export.examples import sample_batch

    if batches is None:
        batches = [sample_batch(model, [prompt]) for prompt in prompts]  # one at a time: no padding rows

    ranges: dict[str, np.ndarray] = {}
    hooks = []
    for mod in model.llm.modules():
        if isinstance(mod, torch.nn.Linear):
            key = _weight_key(mod.weight.detach().float().T.numpy())

            def hook(m, inputs, out, key=key):
                x = inputs[0].detach().float().abs().reshape(-1, inputs[0].shape[-1]).amax(0).numpy()
                ranges[key] = np.maximum(ranges[key], x) if key in ranges else x

            hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                progress(f"calibrating w8a8: {i + 1}/{len(batches)}")
                model(**batch)
    finally:
        for h in hooks:
            h.remove()
    return ranges


def quantize_graph_w8a8(
    path: Path,
    *,
    ranges: dict,
    alpha: float = SMOOTH_ALPHA,
    fp32_channels: int = FP32_CHANNELS,
    weight_max: int = 127,
    exclude: list[str] | None = None,
) -> dict:
    """Rewrite the weight MatMuls of ``path`` (an ONNX graph with external data) in place as int8
    x int8 GEMMs with per-token activation scales (module docstring), the weights rounded to
    -``weight_max``..``weight_max`` per output channel (127; 63: ``reduce_range``, exact where the
    GEMM saturates 16-bit pair sums, ``u8s8_gemm_saturates``). The MatMuls reading the same
    activation (q/k/v; gate/up) share its smoothing, quantization and ``fp32_channels`` channels
    (the activation's largest in ``ranges``; none where the input is narrower than 4 x
    ``fp32_channels``). A weight without calibration statistics in ``ranges`` (``activation_ranges``)
    is quantized unsmoothed, with no fp32 channels.
    -> {"quantized": n, "kept": [names left in full precision], "smoothed": n, "fp32_channels":
    fp32 input channels summed over the rewritten MatMuls}."""
    import numpy as np
    import onnx
    from onnx import helper as oh
    from onnx import numpy_helper as nh

    model = onnx.load(str(path))
    g = model.graph
    exclude = set(exclude or [])
    inits = {i.name: i for i in g.initializer}
    candidates = weight_matmuls(model)
    targets = [n for n in candidates if n.name not in exclude]
    uses = value_uses(g)
    groups: dict[str, list] = {}
    for n in targets:
        groups.setdefault(n.input[0], []).append(n)
    weights = {n.name: nh.to_array(inits[n.input[1]]).astype(np.float32) for n in targets}
    new_inits = _w8a8_shared()
    first = {ns[0].name: x for x, ns in groups.items()}
    target_names = {n.name for n in targets}
    nodes, drop, smoothed, fp32_rows = [], set(), 0, {}
    for n in g.node:
        if n.name not in target_names:
            nodes.append(n)
            continue
        if n.name in first:  # the group's activation: flatten, smooth, scale per row, quantize
            x = n.input[0]
            more_nodes, more_inits, was_smoothed = _w8a8_activation(
                x, groups[x], weights, ranges, alpha, fp32_channels, fp32_rows
            )
            nodes += more_nodes
            new_inits += more_inits
            smoothed += len(groups[x]) if was_smoothed else 0
        if uses[n.input[1]] == 1:
            drop.add(n.input[1])
        more_nodes, more_inits = _w8a8_matmul(n, weights[n.name], fp32_rows.get(n.name), weight_max)
        nodes += more_nodes
        new_inits += more_inits
    kept = [i for i in g.initializer if i.name not in drop]
    del g.node[:]
    g.node.extend(nodes)
    del g.initializer[:]
    g.initializer.extend(kept + new_inits)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(oh.make_opsetid("com.microsoft", 1))
    _save_over(model, path)
    return {
        "quantized": len(targets),
        "kept": [n.name for n in candidates if n.name in exclude],
        "smoothed": smoothed,
        "fp32_channels": sum(len(r) for r in fp32_rows.values()),
    }


# w8a8's weights with --reduce-range: a u8 activation (<= 255) times such a weight, summed in pairs,
# stays within 16 bits (2 x 255 x 63 = 32,130 <= 32,767), so CPUs whose u8 x s8 GEMM saturates
# there (vpmaddubsw: AVX2, AVX-512 without VNNI) compute it exactly.
REDUCED_WEIGHT_MAX = 63
W8A8_SHARED = "w8a8."  # the prefix of the constants all rewritten MatMuls share (zero point, 1/127, ...)


def _w8a8_shared() -> list:
    """The constants every rewritten MatMul shares, as initializers."""
    import numpy as np
    from onnx import numpy_helper as nh

    c = W8A8_SHARED
    return [
        nh.from_array(np.array(128, np.uint8), c + "zero_point"),
        nh.from_array(np.array([1], np.int64), c + "axis1"),
        nh.from_array(np.array(1 / 127, np.float32), c + "inv127"),
        nh.from_array(np.array(1e-30, np.float32), c + "tiny"),  # an all-zero row: scale > 0
        nh.from_array(np.array(1.0, np.float32), c + "one"),
    ]


def _w8a8_activation(x: str, group: list, weights: dict, ranges: dict, alpha, fp32_channels: int, fp32_rows: dict):
    """The nodes (and initializers) that quantize activation ``x``, which the MatMuls ``group``
    read, once for all of them: flattened to rows, smoothed and its fp32 channels gathered (when
    each weight has calibration statistics in ``ranges``), then int8 with one scale per row. The
    group's ``weights`` are smoothed in place, and their fp32 channels' rows go to ``fp32_rows``.
    -> (nodes, initializers, whether it was smoothed)."""
    import numpy as np
    from onnx import helper as oh
    from onnx import numpy_helper as nh

    c, p = W8A8_SHARED, f"w8a8/{x}/"
    K = weights[group[0].name].shape[0]
    stats = [ranges.get(_weight_key(weights[m.name])) for m in group]
    nodes = [
        oh.make_node("Constant", [], [p + "flat_shape"], value=nh.from_array(np.array([-1, K], np.int64))),
        oh.make_node("Reshape", [x, p + "flat_shape"], [p + "flat"]),
        oh.make_node("Shape", [x], [p + "lead"], end=-1),
    ]
    inits = []
    src = p + "flat"
    smoothed = all(r is not None for r in stats)
    if smoothed:
        act = np.maximum(np.max(stats, 0), 1e-5)
        outl = np.sort(np.argsort(-act, kind="stable")[: fp32_channels if K >= 4 * fp32_channels else 0])
        keep = np.ones(K, bool)
        keep[outl] = False
        wmax = np.max([np.abs(weights[m.name]).max(1) for m in group], 0)
        wmax = np.maximum(np.where(keep, wmax, 0), 1e-5)
        smooth = np.clip(act**alpha / wmax ** (1 - alpha), 1e-4, 1e4).astype(np.float32)
        for m in group:
            if len(outl):
                fp32_rows[m.name] = weights[m.name][outl]
            weights[m.name] = weights[m.name] * (smooth * keep)[:, None]
        inv = np.where(keep, 1 / smooth, 0).astype(np.float32)  # outlier channels: 0 in the int8 GEMM
        inits.append(nh.from_array(inv, p + "inv_smooth"))
        nodes.append(oh.make_node("Mul", [src, p + "inv_smooth"], [p + "smoothed"]))
        if len(outl):
            inits.append(nh.from_array(np.asarray(outl, np.int64), p + "outlier_channels"))
            nodes.append(oh.make_node("Gather", [src, p + "outlier_channels"], [p + "outliers"], axis=1))
        src = p + "smoothed"
    nodes += [
        oh.make_node("Abs", [src], [p + "abs"]),
        oh.make_node("ReduceMax", [p + "abs", c + "axis1"], [p + "max"], keepdims=0),
        oh.make_node("Mul", [p + "max", c + "inv127"], [p + "scale0"]),
        oh.make_node("Max", [p + "scale0", c + "tiny"], [p + "scale"]),
        oh.make_node("Shape", [p + "scale"], [p + "rows"]),
        oh.make_node("Expand", [c + "zero_point", p + "rows"], [p + "zero_points"]),
        oh.make_node("QuantizeLinear", [src, p + "scale", p + "zero_points"], [p + "q"], axis=0),
        oh.make_node("Unsqueeze", [p + "scale", c + "axis1"], [p + "row_scale"]),
    ]
    return nodes, inits, smoothed


def _w8a8_matmul(n, w, fp32_rows, weight_max: int = 127):
    """MatMul ``n`` over its (smoothed) weight ``w`` as ``MatMulIntegerToFloat`` on its quantized
    activation (int8 weights in -weight_max..weight_max, one scale per output channel), plus the fp32 channels' product
    (``fp32_rows``: their weight rows, or None), reshaped back to ``n``'s output.
    -> (nodes, initializers)."""
    import numpy as np
    from onnx import helper as oh
    from onnx import numpy_helper as nh

    c, p, q = W8A8_SHARED, f"w8a8/{n.input[0]}/", f"{n.name}/w8a8"
    w_scale = np.abs(w).max(0) / weight_max
    w_scale[w_scale == 0] = 1.0
    inits = [
        nh.from_array(np.clip(np.round(w / w_scale), -weight_max, weight_max).astype(np.int8), q + ".weight"),
        nh.from_array(w_scale.astype(np.float32), q + ".scale"),
        nh.from_array(np.array([w.shape[1]], np.int64), q + ".width"),
    ]
    nodes = [
        oh.make_node(
            "MatMulIntegerToFloat",
            [p + "q", q + ".weight", c + "one", q + ".scale", c + "zero_point"],
            [q + "/cols"],
            domain="com.microsoft",
            name=q,
        ),
    ]
    if fp32_rows is not None:  # the outlier channels' share, in fp32
        inits.append(nh.from_array(fp32_rows.astype(np.float32), q + ".outlier_weight"))
        nodes += [
            oh.make_node("Mul", [q + "/cols", p + "row_scale"], [q + "/int8"]),
            oh.make_node("MatMul", [p + "outliers", q + ".outlier_weight"], [q + "/fp32"], name=q + "/outliers"),
            oh.make_node("Add", [q + "/int8", q + "/fp32"], [q + "/flat"]),
        ]
    else:
        nodes.append(oh.make_node("Mul", [q + "/cols", p + "row_scale"], [q + "/flat"]))
    nodes += [
        oh.make_node("Concat", [p + "lead", q + ".width"], [q + "/shape"], axis=0),
        oh.make_node("Reshape", [q + "/flat", q + "/shape"], [n.output[0]]),
    ]
    return nodes, inits


def _save_over(model, path: Path) -> None:
    """Write ``model`` with its external data next to ``path``, then rename over the old files
    (the graph names its data file by base name)."""
    import onnx

    tmp = path.parent / f".quantize.{path.stem}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    onnx.save(model, str(tmp / path.name), save_as_external_data=True, location=path.name + ".data")
    for f in tmp.iterdir():
        os.replace(f, path.parent / f.name)
    tmp.rmdir()


def quantize_bundle_graphs(
    root: Path,
    stages: list[dict],
    vocab_size: int,
    *,
    scheme: str,
    block_size: int = 32,
    accuracy_level: int = 4,
    keep_head: bool = False,
    keep_embedding: bool = False,
    model=None,
    calibration: tuple[str, list[dict]] | None = None,
    fp32_channels: int = FP32_CHANNELS,
    smooth_alpha: float = SMOOTH_ALPHA,
    reduce_range: bool = False,
    say=lambda s: None,
) -> dict:
    """Quantize every LLM graph of a bundle being written under ``root``; -> the manifest's
    ``quantization`` record. ``model`` (the merged model being exported): w8a8's calibration pass,
    over ``calibration`` = (file name, ``calibration_batches``) or else ``CALIBRATION_PROMPTS``."""
    import onnx

    bits = SCHEMES[scheme]
    ranges = None
    if scheme == "w8a8":
        if model is None:
            raise ValueError("w8a8 needs the model for its calibration pass")
        source, batches = calibration or ("built-in prompts", None)
        ranges = activation_ranges(model, batches=batches, progress=say)
        samples = len(batches) if batches is not None else len(CALIBRATION_PROMPTS)
    weight_max = REDUCED_WEIGHT_MAX if reduce_range else 127
    graphs = {}
    embedded = 0
    for st in stages:
        path = root / st["graph"]
        if not keep_embedding:
            say(f"quantizing {st['graph']}'s token embedding (int8)")
            embedded += quantize_graph_embedding(path, vocab_size)
        if st["end"] == st["start"]:  # a graph of no layers (k = 0's early graph): embeddings only
            continue
        say(f"quantizing {st['graph']} ({scheme})")
        head = head_nodes(onnx.load(str(path), load_external_data=False), vocab_size) if st["last"] else []
        exclude = head if keep_head else []
        if ranges is not None:
            graphs[st["graph"]] = quantize_graph_w8a8(
                path,
                ranges=ranges,
                alpha=smooth_alpha,
                fp32_channels=fp32_channels,
                weight_max=weight_max,
                exclude=exclude,
            )
        else:
            graphs[st["graph"]] = quantize_graph(
                path, bits=bits, block_size=block_size, accuracy_level=accuracy_level, exclude=exclude
            )
    record = {
        "scheme": scheme,
        "bits": bits,
        "block_size": block_size,
        "accuracy_level": accuracy_level,
        "lm_head": "full precision" if keep_head else scheme,
        "embedding": "int8" if embedded else "full precision",
        "embedding_block_size": EMBEDDING_BLOCK if embedded else None,
        "method": METHOD,
        "graphs": graphs,
    }
    if ranges is not None:  # per-channel weights, per-token activations: no blocks, no accuracy level
        record.update(
            block_size=None,
            accuracy_level=None,
            method=W8A8_METHOD,
            weight_max=weight_max,
            smoothing={
                "alpha": smooth_alpha,
                "fp32_channels": fp32_channels,
                "calibration": {"data": source, "samples": samples},
            },
        )
    return record


@functools.cache
def u8s8_gemm_saturates() -> bool:
    """Whether ONNX Runtime's uint8 x int8 GEMM (``MatMulIntegerToFloat``, w8a8's) on this CPU sums
    each pair of neighbouring products in saturating 16-bit arithmetic, as its x86 kernels without
    VNNI or AMX do (``vpmaddubsw``: AVX2, and AVX-512 without VNNI); VNNI (``vpdpbusd``) and AMX sum
    in 32 bits. w8a8's activations are uint8 with zero point 128 (1..255) and its weights int8 in
    [-127, 127], so a pair reaches 2 x 255 x 127 = 64,770 > 32,767: on such a CPU a w8a8 graph does
    not compute w8a8's arithmetic. Probed once per process: 255 x 127 everywhere, K = 64, whose
    exact result is 64 x 127 x 127 (a few milliseconds)."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto
    from onnx import helper as oh
    from onnx import numpy_helper as nh

    k = 64
    graph = oh.make_graph(
        [oh.make_node("MatMulIntegerToFloat", ["a", "b", "one", "one", "zp"], ["y"], domain="com.microsoft")],
        "probe",
        [oh.make_tensor_value_info("a", TensorProto.UINT8, [4, k])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            nh.from_array(np.full((k, 16), 127, np.int8), "b"),
            nh.from_array(np.array(1, np.float32), "one"),
            nh.from_array(np.array(128, np.uint8), "zp"),
        ],
    )
    m = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21), oh.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"a": np.full((4, k), 255, np.uint8)})
    return not bool(np.all(y == k * 127 * 127))
