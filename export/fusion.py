"""Fused normalization and rotary kernels in the exported LLM graphs.

``torch.onnx`` writes a Llama-style RMSNorm (``x * rsqrt(mean(x^2) + eps) * w``) as seven
elementwise nodes (Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul, Mul), which ONNX Runtime's own
graph optimizer does not fuse (its ``SimplifiedLayerNormFusion`` matches ``Div``, not
``Reciprocal`` + ``Mul``), and a rotary embedding (``x * cos + rotate_half(x) * sin``) as seven
more per q and k (Slice, Slice, Neg, Concat, Mul, Mul, Add). On SmolLM2 that is about 850 of the
~1,500 kernels a decode step runs (docs/performance.md). ``fuse_norms`` rewrites them with
onnxscript's ONNX Runtime fusion rules (``onnxscript.rewriter.ort_fusions``):

- the residual ``Add`` followed by an RMSNorm -> ``com.microsoft.SkipSimplifiedLayerNormalization``
  (one kernel computes the sum, which the next residual reads, and its normalization);
- every other RMSNorm -> ONNX's own ``RMSNormalization`` (opset 23; the same attributes as ONNX
  Runtime's ``SimplifiedLayerNormalization``, which the rules emit, and valid for ``onnx.checker``);
- each rotary embedding -> ONNX's own ``RotaryEmbedding`` (opset 23) on per-token cos/sin of the
  angles the graph already computes from its position inputs (``_standard_rotary``), so DeepInsert's
  positions need no position cache.

The norms compute the mean square in float32 (``stash_type``), as transformers' RMSNorm does for
fp16. A form the rules do not match (LayerNorm families such as OPT, which ONNX Runtime fuses
itself; rotary variants with scaled or partial cos/sin) keeps its traced nodes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

FUSED_OPS = ("RMSNormalization", "SkipSimplifiedLayerNormalization", "RotaryEmbedding")


def fuse_norms(path: Path) -> dict[str, int]:
    """Rewrite the RMSNorms and rotary embeddings of the ONNX graph at ``path`` (with its external
    data ``path.name + '.data'``) in place, as above; -> {fused op type: nodes written}."""
    import onnx_ir as ir
    from onnx_ir.passes.common import RemoveUnusedFunctionsPass, RemoveUnusedNodesPass, RemoveUnusedOpsetsPass
    from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
    from onnxscript.rewriter.ort_fusions.rotary_embedding import fuse_rotary_embedding
    from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_rms_normalization

    model = ir.load(str(path))
    rotary = fuse_rotary_embedding(model) and _standard_rotary(model)
    if not rotary:
        model = ir.load(str(path))  # none, or a form _standard_rotary does not know: the traced nodes stay
    if not fuse_rms_normalization(model) and not rotary:
        return {}
    fuse_skip_rms_normalization(model)
    counts = dict.fromkeys(FUSED_OPS, 0)
    for node in model.graph:
        if node.domain == "" and node.op_type == "SimplifiedLayerNormalization":
            node.op_type = "RMSNormalization"  # same inputs and attributes (axis, epsilon, stash_type)
        if node.op_type in counts:
            counts[node.op_type] += 1
    # the constants only the unfused nodes read (epsilon, the exponent 2), the rules' helper functions
    for cleanup in (RemoveUnusedNodesPass(), RemoveUnusedFunctionsPass(), RemoveUnusedOpsetsPass()):
        cleanup(model)
    if counts["SkipSimplifiedLayerNormalization"] and "com.microsoft" not in model.opset_imports:
        model.opset_imports["com.microsoft"] = 1
    _save_over(model, path)
    return {k: v for k, v in counts.items() if v}


def _standard_rotary(model) -> bool:
    """Turn the rotary rule's intermediate nodes (``ai.onnxruntime._fusion::RotaryEmbedding(x,
    Unsqueeze(Cos(Concat(f, f)), 1), Unsqueeze(Sin(...), 1))``, ``f`` the (B, S, D/2) angles of
    the token positions) into ONNX ``RotaryEmbedding(x, Cos(f), Sin(f))`` (opset 23: per-token
    cos/sin, no position cache, so any position the graph computes works). Cos(f) and Sin(f) are
    computed once per ``f`` for all layers. -> False if a node has another form (then nothing here
    is kept: the caller reloads the graph)."""
    import onnx_ir as ir

    halves: dict[tuple[int, str], ir.Value] = {}

    def half(v, fn: str):
        """``v`` = Unsqueeze(fn(Concat(f, f, axis=-1)), [1]) -> fn(f) (made once per f), else None."""
        u = v.producer()
        if u is None or u.op_type != "Unsqueeze" or u.inputs[1].const_value is None:
            return None
        if u.inputs[1].const_value.numpy().tolist() != [1]:
            return None
        c = u.inputs[0].producer()
        if c is None or c.op_type != fn or (cat := c.inputs[0].producer()) is None or cat.op_type != "Concat":
            return None
        f = cat.inputs[0]
        if len(cat.inputs) != 2 or cat.inputs[1] is not f or cat.attributes["axis"].value not in (-1, 2):
            return None
        key = (id(f), fn)
        if key not in halves:
            node = ir.node(fn, [f])
            model.graph.insert_after(f.producer(), node) if f.producer() else model.graph.insert_before(c, node)
            halves[key] = node.outputs[0]
        return halves[key]

    fused = [n for n in model.graph if n.domain == "ai.onnxruntime._fusion" and n.op_type == "RotaryEmbedding"]
    for n in fused:
        if n.attributes["interleaved"].value != 0 or len(n.inputs) != 3:
            return False
        cos, sin = half(n.inputs[1], "Cos"), half(n.inputs[2], "Sin")
        if cos is None or sin is None:
            return False
        new = ir.node("RotaryEmbedding", [n.inputs[0], cos, sin], attributes={"interleaved": 0})
        model.graph.insert_before(n, new)
        ir.convenience.replace_all_uses_with(n.outputs[0], new.outputs[0])
        model.graph.remove(n, safe=True)
    return bool(fused)


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
