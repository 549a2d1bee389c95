"""Fused normalization kernels in the exported LLM graphs.

``torch.onnx`` writes a Llama-style RMSNorm (``x * rsqrt(mean(x^2) + eps) * w``) as seven
elementwise nodes (Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul, Mul), which ONNX Runtime's own
graph optimizer does not fuse (its ``SimplifiedLayerNormFusion`` matches ``Div``, not
``Reciprocal`` + ``Mul``). Two per layer is ~420 of the ~1,500 kernels a SmolLM2 decode step runs
(docs/performance.md). ``fuse_norms`` rewrites them with onnxscript's ONNX Runtime fusion rules
(``onnxscript.rewriter.ort_fusions``, the rules onnxruntime-genai's model builder output matches):

- the residual ``Add`` followed by an RMSNorm -> ``com.microsoft.SkipSimplifiedLayerNormalization``
  (one kernel computes the sum, which the next residual reads, and its normalization);
- every other RMSNorm -> ONNX's own ``RMSNormalization`` (opset 23; the same attributes as ONNX
  Runtime's ``SimplifiedLayerNormalization``, which the rules emit, and valid for ``onnx.checker``).

Both compute the mean square in float32 (``stash_type``), as transformers' RMSNorm does for fp16.
Families whose norms are LayerNorms (OPT, GPT-2) have nothing to fuse here; ONNX Runtime fuses
those itself.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

FUSED_OPS = ("RMSNormalization", "SkipSimplifiedLayerNormalization")


def fuse_norms(path: Path) -> dict[str, int]:
    """Rewrite the RMSNorms of the ONNX graph at ``path`` (with its external data ``path.name +
    '.data'``) in place, as above; -> {fused op type: nodes written}."""
    import onnx_ir as ir
    from onnx_ir.passes.common import RemoveUnusedNodesPass
    from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
    from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_rms_normalization

    model = ir.load(str(path))
    if not fuse_rms_normalization(model):
        return {}
    fuse_skip_rms_normalization(model)
    counts = dict.fromkeys(FUSED_OPS, 0)
    for node in model.graph:
        if node.domain == "" and node.op_type == "SimplifiedLayerNormalization":
            node.op_type = "RMSNormalization"  # same inputs and attributes (axis, epsilon, stash_type)
        if node.op_type in counts:
            counts[node.op_type] += 1
    RemoveUnusedNodesPass()(model)  # and the constants only the unfused nodes read (epsilon, the exponent 2)
    if counts["SkipSimplifiedLayerNormalization"] and "com.microsoft" not in model.opset_imports:
        model.opset_imports["com.microsoft"] = 1
    _save_over(model, path)
    return {k: v for k, v in counts.items() if v}


def _save_over(model, path: Path) -> None:
    """Write ``model`` (an onnx_ir model whose tensors may still be read from ``path``'s data file)
    under a temporary folder, then rename its graph and data over the old ones."""
    import onnx_ir as ir

    tmp = path.parent / f".fuse.{path.stem}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        ir.save(model, str(tmp / path.name), external_data=path.name + ".data")
        for f in tmp.iterdir():
            os.replace(f, path.parent / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
