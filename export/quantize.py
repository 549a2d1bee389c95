"""Weight quantization of a bundle's LLM graphs (``compose export --quantize int8|int4``).

Every weight MatMul of the early and late LLM graphs (attention and MLP projections, and the
LM head unless ``keep_head``) becomes ONNX Runtime's ``MatMulNBits``: symmetric round-to-nearest
weights in blocks of ``block_size`` along the input dimension, one fp32 scale per block,
through ONNX Runtime's own ``MatMulNBitsQuantizer``. ``accuracy_level`` picks the kernel's
activation precision (4: int8 activations per block, the fast kernels on x86 with VNNI/AMX;
1: fp32, exact but far slower on CPU). Encoders, embeddings and norms stay in the bundle's dtype.

Why not ``quantize_dynamic`` (``MatMulInteger``, one activation scale per tensor): measured on
SmolLM2-135M, whose MLP inputs reach ~3,000 in two layers (massive activations) against an RMS
below 1, per-tensor int8 activations destroyed the model (0-55% top-1 agreement on plain text,
with or without per-channel weights, reduced range or those layers left out); block-wise weights with
per-block activation scales kept ~99% (int8). ``compose export --verify`` checks a quantized
bundle by top-1 agreement with the fp32 torch model (``composer.export.verify``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from composer.errors import InputError

SCHEMES = {"int8": 8, "int4": 4}
METHOD = "MatMulNBits, symmetric round-to-nearest, block-wise (onnxruntime.quantization.matmul_nbits_quantizer)"


def check_options(scheme: str, dtype: str, block_size: int, accuracy_level: int) -> None:
    """One InputError naming the option, before anything is exported."""
    if scheme not in SCHEMES:
        raise InputError(f"--quantize must be one of {sorted(SCHEMES)}, got {scheme!r}")
    if dtype != "fp32":
        raise InputError(f"--quantize quantizes fp32 weights; use it with --dtype fp32, got --dtype {dtype}")
    if (
        isinstance(block_size, bool)
        or not isinstance(block_size, int)
        or block_size < 16
        or block_size & (block_size - 1)
    ):
        raise InputError(f"--block-size must be a power of two >= 16, got {block_size!r}")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise InputError(f"--accuracy-level must be 0-4 (ONNX Runtime's MatMulNBits), got {accuracy_level!r}")


def weight_matmuls(model) -> list:
    """MatMul nodes whose second input is a 2-D initializer (the LLM's linear layers)."""
    shapes = {i.name: list(i.dims) for i in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "MatMul" and len(shapes.get(n.input[1], [])) == 2]


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
    path: Path, *, bits: int, block_size: int, accuracy_level: int, exclude: list[str] | None = None
) -> dict:
    """Quantize the weight MatMuls of ``path`` (an ONNX graph with external data) in place.
    -> {"quantized": n, "kept": [names left in full precision]}."""
    import onnx

    DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer = _quantizer()
    model = onnx.load(str(path))
    exclude = list(exclude or [])
    candidates = [n.name for n in weight_matmuls(model)]
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
    # written next to the graph, then renamed over it (the graph names its data file by base name)
    tmp = path.parent / f".quantize.{path.stem}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    q.model.save_model_to_file(str(tmp / path.name), use_external_data_format=True)
    for f in tmp.iterdir():
        os.replace(f, path.parent / f.name)
    tmp.rmdir()
    return {"quantized": done, "kept": [n for n in candidates if n in exclude]}


def quantize_bundle_graphs(
    root: Path,
    stages: list[dict],
    vocab_size: int,
    *,
    scheme: str,
    block_size: int = 32,
    accuracy_level: int = 4,
    keep_head: bool = False,
    say=lambda s: None,
) -> dict:
    """Quantize every LLM graph of a bundle being written under ``root``; -> the manifest's
    ``quantization`` record."""
    import onnx

    bits = SCHEMES[scheme]
    graphs = {}
    for st in stages:
        path = root / st["graph"]
        if st["end"] == st["start"]:  # a graph of no layers (k = 0's early graph): embeddings only
            continue
        say(f"quantizing {st['graph']} ({scheme})")
        head = head_nodes(onnx.load(str(path), load_external_data=False), vocab_size) if st["last"] else []
        graphs[st["graph"]] = quantize_graph(
            path, bits=bits, block_size=block_size, accuracy_level=accuracy_level, exclude=head if keep_head else []
        )
    return {
        "scheme": scheme,
        "bits": bits,
        "block_size": block_size,
        "accuracy_level": accuracy_level,
        "lm_head": "full precision" if keep_head else scheme,
        "method": METHOD,
        "graphs": graphs,
    }
