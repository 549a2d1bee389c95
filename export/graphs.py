"""The torch modules that become the bundle's ONNX graphs.

Attention masks are built inside the graphs from slot ids (``composer.layout.additive_mask``),
so the runtime passes small integer tensors, never (B, 1, T, S) float masks. Every input
has only independent dynamic sizes (B, T, M, S, R): lengths such as T+M are formed inside.

The KV cache crosses the graph boundary as preallocated buffers: ``past_key.{i}`` /
``past_value.{i}`` of shape (B, kv_heads, S, head_dim) in, with absolute layer indices ``i``.
A graph writes its new tokens' keys and values at rows ``write_index[b] ..`` of the buffer
(ONNX ``TensorScatter``, opset 24) and attends over the whole buffer, ``cache_slots`` /
``cache_valid`` (B, S) giving the slot id and validity of every row after the write (rows not
written yet are invalid). ``present_key.{i}`` / ``present_value.{i}`` are the updated buffers,
of the same shape: ONNX Runtime writes them in place when the runtime binds each present
output to its past input's memory (IO binding), so a decode step copies no earlier token.

Graphs:
- ``encoder.<m>``: raw modality input -> projected tokens (n, T_m, d)
- ``early_text``: embeddings (+ learned positions) and layers [0, k1) over text tokens only
- ``late_multimodal`` (one per distinct insertion layer k_j): layers [k_j, k_{j+1}); the
  previous hidden states and the MM tokens entering at k_j are concatenated inside the
  graph. Causality follows slot ids and RoPE the baseline position ids, so the order of rows
  in the compact sequence does not matter and a concat is an exact splice. The last one ends
  with the final norm and LM head, evaluated only at ``logit_rows``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from composer.errors import ComposerError
from composer.layout import additive_mask

# Dynamic axes, one symbol each. Example sizes for tracing all differ, so that no two dynamic
# sizes get merged into one symbol (the traced graph would then fail at run time).
# "cache" (the KV buffer length) must hold the seq + mm rows written at index 0.
EXAMPLE_SIZES = {"batch": 2, "seq": 5, "mm": 3, "cache": 11, "rows": 4, "items": 3}


@dataclass(frozen=True)
class Tensor:
    """One graph input or output: ``shape`` names dynamic axes (keys of ``EXAMPLE_SIZES``) or
    fixed ones (``hidden``, ``kv_heads``, ``head_dim``, ``vocab``, from the LLM's shape);
    ``dtype`` is ``int64``, ``bool``, ``float32`` or ``model`` (the bundle's float dtype); ``example`` says
    how a tracing example is made (``ids``, ``ones``, ``zeros``, ``randn``, ``slots``: the
    positions after the cached ones, ``arange``: 0.. along the last axis)."""

    name: str
    dtype: str
    shape: tuple[str, ...]
    example: str = "zeros"


def kv_tensors(prefix: str, start: int, end: int) -> list[Tensor]:
    """``{prefix}_key.{i}`` / ``{prefix}_value.{i}`` (batch, kv_heads, cache, head_dim), absolute ``i``."""
    return [Tensor(name, "model", ("batch", "kv_heads", "cache", "head_dim")) for name in kv_names(prefix, start, end)]


def kv_names(prefix: str, start: int, end: int) -> list[str]:
    return [f"{prefix}_{w}.{i}" for i in range(start, end) for w in ("key", "value")]


@dataclass(frozen=True)
class GraphIO:
    """The inputs and outputs of one bundle graph, declared once: the exporter traces from it
    (names, dynamic shapes, examples), the manifest records it, the runtime builds its feeds
    through ``feeds``. The ``kv_inputs`` trailing inputs are the KV buffers, passed to the forward
    as one list (empty for a graph of no layers)."""

    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    kv_inputs: int = 0

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def feeds(self, **values) -> dict:
        """The runtime's feeds, checked against the declaration (every input, nothing else)."""
        missing = [n for n in self.input_names if n not in values]
        extra = sorted(set(values) - set(self.input_names))
        if missing or extra:
            raise ComposerError(f"graph feeds do not match the declared inputs: missing {missing}, unexpected {extra}")
        return values

    def manifest_entry(self, sizes: dict[str, int], float_dtype: str, in_graph: set[str]) -> dict:
        """What the manifest records for this graph: every declared input and output with its
        dtype and shape (dynamic axes by name, fixed ones as numbers); ``used: false`` marks an
        input the exported graph does not read (the exporter prunes it; the runtime skips it)."""

        def entry(t: Tensor) -> dict:
            shape = [a if a in EXAMPLE_SIZES or a == "total" else sizes[a] for a in t.shape]
            dtype = {"model": float_dtype, "float32": "float"}.get(t.dtype, t.dtype)  # ONNX's names
            return {"name": t.name, "dtype": dtype, "shape": shape}

        return {
            "inputs": [{**entry(t), "used": t.name in in_graph} for t in self.inputs],
            "outputs": [entry(t) for t in self.outputs],
        }

    def args(self, values: dict) -> tuple:
        """Named values -> the forward's argument layout (the KV inputs as one list)."""
        out = [values[n] for n in self.input_names]
        n = len(out) - self.kv_inputs
        return (*out[:n], out[n:])

    def dynamic_shapes(self, dims: dict) -> tuple:
        """torch.export dynamic shapes: {axis: Dim} per input, the KV inputs as one list."""
        return self.args(
            {t.name: {i: dims[a] for i, a in enumerate(t.shape) if a in EXAMPLE_SIZES} for t in self.inputs}
        )

    def examples(self, sizes: dict[str, int], dtype: torch.dtype, vocab: int) -> tuple:
        """Tracing examples in the forward's argument layout (the KV inputs as one list)."""
        out = {}
        for t in self.inputs:
            shape = tuple(sizes[a] for a in t.shape)
            if t.example == "ids":
                x = torch.randint(3, vocab, shape)
            elif t.example == "slots":  # slot ids / positions after the cached ones
                x = torch.arange(sizes["cache"], sizes["cache"] + shape[-1]).expand(shape).clone()
            elif t.example == "arange":
                x = torch.arange(shape[-1]).expand(shape).clone()
            elif t.example == "randn":
                x = torch.randn(shape)
            else:
                x = torch.ones(shape) if t.example == "ones" else torch.zeros(shape)
            out[t.name] = x.to(
                {"int64": torch.long, "bool": torch.bool, "float32": torch.float32, "model": dtype}[t.dtype]
            )
        return self.args(out)


# The KV buffer's bookkeeping, the same in every LLM graph: slot id and validity of every
# buffer row after this call's write, and the row each batch row's new tokens are written at.
CACHE_INPUTS = (
    Tensor("cache_slots", "int64", ("batch", "cache"), "arange"),
    Tensor("cache_valid", "bool", ("batch", "cache"), "ones"),
    Tensor("write_index", "int64", ("batch",), "zeros"),
)


def early_io(end: int) -> GraphIO:
    """``early_text``: layers [0, end) over text tokens."""
    seq = ("batch", "seq")
    return GraphIO(
        inputs=(
            Tensor("input_ids", "int64", seq, "ids"),
            Tensor("position_ids", "int64", seq, "slots"),
            Tensor("slots", "int64", seq, "slots"),
            *CACHE_INPUTS,
            *kv_tensors("past", 0, end),
        ),
        outputs=(Tensor("hidden", "model", ("batch", "seq", "hidden")), *kv_tensors("present", 0, end)),
        kv_inputs=2 * end,
    )


def late_io(start: int, end: int, last: bool) -> GraphIO:
    """``late_multimodal``: layers [start, end) over the previous hidden states + entering MM tokens."""
    seq, mm = ("batch", "seq"), ("batch", "mm")
    head = (
        Tensor("logits", "float32", ("batch", "rows", "vocab"))
        if last
        else Tensor("hidden_out", "model", ("batch", "total", "hidden"))
    )
    return GraphIO(
        inputs=(
            Tensor("hidden", "model", ("batch", "seq", "hidden"), "randn"),
            Tensor("hidden_slots", "int64", seq, "slots"),
            Tensor("hidden_positions", "int64", seq, "slots"),
            Tensor("mm_tokens", "model", ("batch", "mm", "hidden"), "randn"),
            Tensor("mm_slots", "int64", mm, "arange"),
            Tensor("mm_positions", "int64", mm, "arange"),
            *CACHE_INPUTS,
            Tensor("logit_rows", "int64", ("batch", "rows"), "zeros"),
            *kv_tensors("past", start, end),
        ),
        outputs=(head, *kv_tensors("present", start, end)),
        kv_inputs=2 * (end - start),
    )


KV_OPSET = 24  # TensorScatter


@torch.library.custom_op("composer::kv_write", mutates_args=())
def kv_write(cache: torch.Tensor, new: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``cache`` (B, h, S, hd) with ``new`` (B, h, T, hd) written at rows ``index[b]`` ..
    ``index[b] + T - 1`` of each batch row ``b``. Exported as ONNX ``TensorScatter`` (opset 24),
    which ONNX Runtime runs in place when the output is bound to the input's memory."""
    B, H, _, D = cache.shape
    T = new.shape[2]
    rows = (index[:, None] + torch.arange(T, device=index.device))[:, None, :, None].expand(B, H, T, D)
    return cache.scatter(2, rows, new.to(cache.dtype))


@kv_write.register_fake
def _kv_write_fake(cache, new, index):
    return torch.empty_like(cache)


def _kv_write_onnx(cache, new, index):
    from onnxscript import values

    return values.Opset("", KV_OPSET).TensorScatter(cache, new, index, axis=2)


@torch.library.custom_op("composer::gqa", mutates_args=())
def gqa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    past_key: torch.Tensor,
    past_value: torch.Tensor,
    seqlens_k: torch.Tensor,
    total: torch.Tensor,
    bias: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    kv_heads: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer's attention as ONNX Runtime's ``com.microsoft.GroupQueryAttention`` computes it
    (rotary, the KV write and grouped attention in one node), in eager torch for the parity tests.

    query (B, T, H*D), key/value (B, T, KV*D) before rotary; past_key/past_value (B, KV, S, D)
    buffers; seqlens_k (B,) int32: the last row written, so the new rows go to ``seqlens_k - T + 1``
    .. ``seqlens_k``; total: int32 scalar, S; bias (B, 1, T, S) additive; positions (B, T) int64
    rotary positions; cos/sin (P, D/2) tables (non-interleaved halves). A query at new row t sees
    buffer rows up to ``seqlens_k - T + 1 + t`` where ``bias`` allows. -> output (B, T, H*D),
    the updated buffers."""
    B, T, _ = query.shape
    D = past_key.shape[-1]

    def heads(x: torch.Tensor, n: int, rotate: bool) -> torch.Tensor:
        x = x.view(B, T, n, D).transpose(1, 2)
        if not rotate:
            return x
        c, s = cos[positions][:, None], sin[positions][:, None]  # (B, 1, T, D/2)
        x1, x2 = x.chunk(2, -1)
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)

    q, k, v = heads(query, num_heads, True), heads(key, kv_heads, True), heads(value, kv_heads, False)
    first = seqlens_k.long() - T + 1
    present_key, present_value = kv_write(past_key, k, first), kv_write(past_value, v, first)
    rows = torch.arange(past_key.shape[2], device=query.device)
    seen = rows[None, None, :] <= (first[:, None] + torch.arange(T, device=query.device))[:, :, None]
    mask = bias + torch.where(seen, 0.0, float("-inf")).to(bias.dtype)[:, None]
    group = num_heads // kv_heads
    keys, vals = present_key.repeat_interleave(group, 1), present_value.repeat_interleave(group, 1)
    probs = torch.softmax((q @ keys.transpose(-1, -2)) * scale + mask, dim=-1)
    out = (probs @ vals).transpose(1, 2).reshape(B, T, num_heads * D)
    return out, present_key, present_value


@gqa.register_fake
def _gqa_fake(query, key, value, past_key, past_value, *args):
    return torch.empty_like(query), torch.empty_like(past_key), torch.empty_like(past_value)


GQA_INPUTS = {  # ONNX Runtime's com.microsoft.GroupQueryAttention (opset 1), in order: name -> (type, optional)
    "query": ("T", False), "key": ("T", True), "value": ("T", True), "past_key": ("T", True),
    "past_value": ("T", True), "seqlens_k": ("M", False), "total_sequence_length": ("M", False),
    "cos_cache": ("T", True), "sin_cache": ("T", True), "position_ids": ("P", True), "attention_bias": ("T", True),
}  # fmt: skip


def _register_contrib_schemas() -> None:
    """The ``onnx`` package knows only the standard ops; the exporter builds nodes from schemas,
    so ONNX Runtime's contrib ops are declared here (their inputs, outputs and attributes as
    ONNX Runtime's ``contrib_defs.cc`` / ``bert_defs.cc`` define them, the ones the bundles use)."""
    from onnx import defs

    if defs.has("GroupQueryAttention", "com.microsoft"):
        return
    Param, Attr = defs.OpSchema.FormalParameter, defs.OpSchema.Attribute
    opt, single = defs.OpSchema.FormalParameterOption.Optional, defs.OpSchema.FormalParameterOption.Single
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    schema = defs.OpSchema(
        "GroupQueryAttention",
        "com.microsoft",
        1,
        inputs=[Param(n, t, param_option=opt if optional else single) for n, (t, optional) in GQA_INPUTS.items()],
        outputs=[Param("output", "T"), Param("present_key", "T"), Param("present_value", "T")],
        type_constraints=[
            ("T", floats, "float activations"),
            ("M", ["tensor(int32)"], "lengths"),
            ("P", ["tensor(int64)"], "positions"),
        ],
        attributes=[
            Attr("num_heads", defs.OpSchema.AttrType.INT, "query heads"),
            Attr("kv_num_heads", defs.OpSchema.AttrType.INT, "key/value heads"),
            Attr("scale", defs.OpSchema.AttrType.FLOAT, "score scale", required=False),
            Attr("do_rotary", defs.OpSchema.AttrType.INT, "rotary inside", required=False),
            Attr("rotary_interleaved", defs.OpSchema.AttrType.INT, "rotary layout", required=False),
        ],
    )
    defs.register_schema(schema)
    skip_norm = defs.OpSchema(
        "SkipSimplifiedLayerNormalization",
        "com.microsoft",
        1,
        inputs=[Param("input", "T"), Param("skip", "T"), Param("gamma", "T"), Param("bias", "T", param_option=opt)],
        outputs=[
            Param("output", "T"),
            Param("mean", "U", param_option=opt),
            Param("inv_std_var", "U", param_option=opt),
            Param("input_skip_bias_sum", "T", param_option=opt),
        ],
        type_constraints=[("T", floats, "activations"), ("U", ["tensor(float)"], "statistics")],
        attributes=[Attr("epsilon", defs.OpSchema.AttrType.FLOAT, "added to the mean square", required=False)],
    )
    defs.register_schema(skip_norm)


def _gqa_onnx(
    query, key, value, past_key, past_value, seqlens_k, total, bias, positions, cos, sin, num_heads, kv_heads, scale
):
    from onnxscript import values

    _register_contrib_schemas()
    ms = values.Opset("com.microsoft", 1)
    return ms.GroupQueryAttention(
        query, key, value, past_key, past_value, seqlens_k, total, cos, sin, positions, bias,
        num_heads=num_heads, kv_num_heads=kv_heads, scale=scale, do_rotary=1, rotary_interleaved=0, _outputs=3,
    )  # fmt: skip


# torch.onnx.export(custom_translation_table=...) for the LLM graphs
ONNX_TRANSLATIONS = {
    torch.ops.composer.kv_write.default: _kv_write_onnx,
    torch.ops.composer.gqa.default: _gqa_onnx,
}


def fused_attention_supported(adapter) -> str | None:
    """Why ``adapter``'s layers cannot run as ``FusedLayers`` (None: they can): llama-style
    layers (rotary, grouped KV heads) with full attention only."""
    if adapter.family != "llama":
        return f"{adapter.config.model_type} layers (learned positions) are not llama-style"
    if adapter.sliding_window is not None:
        return f"sliding-window attention ({adapter.sliding_window})"
    rope = getattr(adapter.config, "rope_parameters", None) or getattr(adapter.config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") not in ("default", "linear", "llama3", "yarn"):  # static tables
        return f"rope_type {rope.get('rope_type')!r}"
    return None


class FusedLayers:
    """Llama-style decoder layers [start, end) with each layer's attention as one ``composer::gqa``
    (ONNX: ``GroupQueryAttention``): the same arithmetic as the HF layers (parity tests:
    tests/test_fused_decode.py) in far fewer ONNX nodes, for the bundle's decode graphs."""

    def __init__(self, adapter):
        self.adapter = adapter
        shape = adapter.shape
        self.heads, self.kv_heads, self.head_dim = shape.num_heads, shape.num_kv_heads, shape.head_dim
        n = adapter.config.max_position_embeddings
        rotary = adapter.model.model.rotary_emb
        x = torch.zeros(1, 1, self.head_dim, dtype=torch.float32)
        cos, sin = rotary(x, position_ids=torch.arange(n)[None])  # (1, n, D), attention scaling included
        half = self.head_dim // 2
        if not (torch.equal(cos[..., :half], cos[..., half:]) and torch.equal(sin[..., :half], sin[..., half:])):
            raise ComposerError("fused attention: the rotary tables are not two equal halves (non-interleaved RoPE)")
        self.cos, self.sin = cos[0, :, :half].contiguous(), sin[0, :, :half].contiguous()

    def __call__(self, hidden, start, end, positions, mask, write_index, cache: BufferCache):
        """hidden (B, T, d), positions (B, T), mask (B, 1, T, S) additive, write_index (B,), the
        stage's ``BufferCache`` (its buffers replaced by the updated ones) -> hidden (B, T, d)."""
        B, T, _ = hidden.shape
        seqlens = (write_index + (T - 1)).to(torch.int32)
        total = torch.ones_like(mask[0, 0, 0], dtype=torch.int32).sum().to(torch.int32)
        cos, sin = self.cos.to(hidden.dtype), self.sin.to(hidden.dtype)
        pending = None  # the last sublayer's output, added to the residual stream by the next norm
        for i in range(start, end):
            layer = self.adapter.layers[i]
            attn = layer.self_attn
            x, hidden = _add_rms_norm(layer.input_layernorm, hidden, pending)
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
            if getattr(attn, "q_norm", None) is not None:  # Qwen3: RMSNorm per head before rotary
                q = _rms_norm(attn.q_norm, q.view(B, T, -1, self.head_dim)).reshape(B, T, -1)
                k = _rms_norm(attn.k_norm, k.view(B, T, -1, self.head_dim)).reshape(B, T, -1)
            kv = cache.kv[i]
            out, kv[0], kv[1] = gqa(
                q, k, v, kv[0], kv[1], seqlens, total, mask, positions, cos, sin,
                self.heads, self.kv_heads, float(attn.scaling),
            )  # fmt: skip
            x, hidden = _add_rms_norm(layer.post_attention_layernorm, hidden, attn.o_proj(out))
            pending = layer.mlp(x)
        return hidden if pending is None else hidden + pending


def _add_rms_norm(norm: nn.Module, hidden: torch.Tensor, pending: torch.Tensor | None):
    """(``norm(hidden + pending)``, ``hidden + pending``): the residual add and the next RMSNorm
    as one ``composer::skip_rms_norm`` (ONNX Runtime's ``SkipSimplifiedLayerNormalization``)."""
    if pending is None:
        return _rms_norm(norm, hidden), hidden
    return skip_rms_norm(pending, hidden, norm.weight, float(norm.variance_epsilon))


@torch.library.custom_op("composer::skip_rms_norm", mutates_args=())
def skip_rms_norm(
    x: torch.Tensor, skip: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + skip) * weight, x + skip), as ONNX Runtime's ``SkipSimplifiedLayerNormalization``."""
    total = x + skip
    return F.rms_norm(total, (total.shape[-1],), weight, eps), total


@skip_rms_norm.register_fake
def _skip_rms_norm_fake(x, skip, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


def _skip_rms_norm_onnx(x, skip, weight, eps):
    from onnxscript import values

    _register_contrib_schemas()
    out, _, _, total = values.Opset("com.microsoft", 1).SkipSimplifiedLayerNormalization(
        x, skip, weight, epsilon=eps, _outputs=4
    )
    return out, total


ONNX_TRANSLATIONS[torch.ops.composer.skip_rms_norm.default] = _skip_rms_norm_onnx


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An HF RMSNorm module's arithmetic (float32 statistics, then the weight) as ``F.rms_norm``:
    one ONNX ``RMSNormalization`` node (opset 23) where HF's code traces to six (fp32 graphs)."""
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)


class BufferCache:
    """The KV cache inside an LLM graph, in the shape HF attention layers call: per layer a
    buffer (B, h, S, hd); ``update`` writes the layer's new keys and values at ``index`` and
    returns the whole buffers to attend over (the mask hides rows not written yet)."""

    def __init__(self, past: list[torch.Tensor], start: int, index: torch.Tensor):
        self.kv = {start + j: [past[2 * j], past[2 * j + 1]] for j in range(len(past) // 2)}
        self.index = index

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):  # HF passes cache kwargs
        kv = self.kv[layer_idx]
        kv[0] = kv_write(kv[0], key_states, self.index)
        kv[1] = kv_write(kv[1], value_states, self.index)
        return kv[0], kv[1]

    def present(self) -> list[torch.Tensor]:
        return [t for i in sorted(self.kv) for t in self.kv[i]]


class EncoderGraph(nn.Module):
    def __init__(self, encoder: nn.Module, projector: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.encoder, self.projector, self.out_dtype = encoder, projector, dtype

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(**dict(zip(self.encoder.input_names, inputs, strict=True)))
        return self.projector(feats.to(next(self.projector.parameters()).dtype)).to(self.out_dtype)


EARLY_GRAPH = "early_text.onnx"  # the first stage's graph (at k = 0 the first late stage starts at layer 0 too)


def stage_module(model, stage, fused: FusedLayers | None = None) -> nn.Module:
    """The torch module a manifest ``stage``'s graph is traced from (``fused``: its fused decode graph)."""
    if stage.graph == EARLY_GRAPH:
        return EarlyText(model, stage.end, fused)
    return LateStage(model, stage.start, stage.end, stage.last, fused)


class EarlyText(nn.Module):
    """input_ids, position_ids, slots (B, T); cache_slots, cache_valid (B, S), write_index (B,);
    KV buffers of layers [0, end) (B, h, S, hd) -> hidden (B, T, d), updated buffers."""

    def __init__(self, model, end: int, fused: FusedLayers | None = None):
        super().__init__()
        self.llm = model.llm  # registers the weights
        self.adapter, self.end, self.fused = model.adapter, end, fused
        self.io = early_io(end)

    def forward(self, input_ids, position_ids, slots, cache_slots, cache_valid, write_index, past: list[torch.Tensor]):
        h = self.adapter.embed(input_ids, position_ids)
        if self.end == 0:
            return (h,)
        mask = additive_mask(slots, cache_slots, cache_valid, h.dtype)
        cache = BufferCache(past, 0, write_index)
        if self.fused is not None:
            h = self.fused(h, 0, self.end, position_ids, mask, write_index, cache)
        else:
            h = self.adapter.run_layers(h, 0, self.end, position_ids, mask, cache)
        return (h, *cache.present())


class LateStage(nn.Module):
    """hidden (B, Tp, d) with hidden_slots/hidden_positions (B, Tp); mm_tokens (B, M, d) with
    mm_slots/mm_positions (B, M); cache_slots/cache_valid (B, S), write_index (B,); logit_rows
    (B, R); KV buffers of layers [start, end) (B, h, S, hd) -> hidden (B, Tp+M, d) or logits
    (B, R, V) float32, updated buffers."""

    def __init__(self, model, start: int, end: int, last: bool, fused: FusedLayers | None = None):
        super().__init__()
        self.llm = model.llm
        self.adapter, self.start, self.end, self.last, self.fused = model.adapter, start, end, last, fused
        self.io = late_io(start, end, last)

    def forward(
        self,
        hidden,
        hidden_slots,
        hidden_positions,
        mm_tokens,
        mm_slots,
        mm_positions,
        cache_slots,
        cache_valid,
        write_index,
        logit_rows,
        past: list[torch.Tensor],
    ):
        pe = self.adapter.position_embedding(mm_positions)
        mm = mm_tokens if pe is None else mm_tokens + pe
        h = torch.cat([hidden, mm.to(hidden.dtype)], dim=1)
        slots = torch.cat([hidden_slots, mm_slots], 1)
        position_ids = torch.cat([hidden_positions, mm_positions], 1)
        mask = additive_mask(slots, cache_slots, cache_valid, h.dtype)
        cache = BufferCache(past, self.start, write_index)
        if self.fused is not None:
            h = self.fused(h, self.start, self.end, position_ids, mask, write_index, cache)
        else:
            h = self.adapter.run_layers(h, self.start, self.end, position_ids, mask, cache)
        present = cache.present()
        if not self.last:
            return (h, *present)
        rows = h.gather(1, logit_rows[..., None].expand(-1, -1, h.shape[-1]))
        return (self.adapter.head(rows).float(), *present)
