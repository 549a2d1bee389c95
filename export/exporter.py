"""torch -> split ONNX bundle (``compose export DIR -o BUNDLE``).

    BUNDLE/
      manifest.json                 single source of truth for the runtime (see ``manifest.py``)
      encoder.<m>.onnx              raw input -> projected tokens
      early_text.onnx               embeddings + layers [0, k1) over text tokens
      late_multimodal.onnx          layers [k1, N) + LM head (one insertion layer), or
      late_multimodal.k<K>.onnx     one per distinct insertion layer K (several modalities at
                                    different layers): layers [K, next K), the last with the head
      *.onnx.data                   weights as ONNX external data
      tokenizer/, processors/<m>/, spec.yaml

Each graph's inputs and outputs are declared once (``composer.export.graphs``: ``early_io``,
``late_io``; encoders declare theirs on the adapter). Every graph is traced from that
declaration with an example whose dynamic sizes all differ (``EXAMPLE_SIZES``), checked with
``onnx.checker``, and has dynamic batch, sequence, MM count (0 for decode) and past length (0
for prefill).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from composer.adapters import encoder_type_of
from composer.analysis.summary import summary_record
from composer.checkpoint import atomic_dir
from composer.errors import ComposerError, InputError
from composer.export.graphs import (
    EARLY_GRAPH,
    EXAMPLE_SIZES,
    KV_OPSET,
    ONNX_TRANSLATIONS,
    EncoderGraph,
    FusedLayers,
    fused_attention_supported,
    stage_module,
)
from composer.export.manifest import (
    FORMAT_VERSION,
    EncoderEntry,
    Generation,
    GraphRecord,
    KVFacts,
    LLMFacts,
    Manifest,
    Quantization,
    Stage,
    late_graph_name,
    write_manifest,
)
from composer.generation import write_generation_config
from composer.layout import graph_stages
from composer.records import Summary

# torch.onnx logs a warning per missing torchvision op at its first use: not our concern.
logging.getLogger("torch.onnx").setLevel(logging.ERROR)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
# The LLM graphs write their KV buffers with TensorScatter (opset 24); torch.onnx's dynamo exporter
# writes opset 18 and later (an older request became 18 silently). Every graph gets the same opset.
MIN_OPSET = KV_OPSET
ONNX_DTYPES = {"fp32": "float", "fp16": "float16"}  # as onnx.TensorProto names them (lower case)
DECODE_ATTENTION = ("plain", "fused")  # --decode-attention
KV_LAYOUT = (
    "past_key.{i}/past_value.{i}: buffers (batch, kv_heads, cache, head_dim), layer index i absolute;"
    " new rows written at write_index, present_* = the updated buffers (in place under IO binding)"
)


def merged_for_export(model, dtype: torch.dtype):
    """A copy with LoRA merged into the base weights and cast to the export dtype."""
    m = copy.deepcopy(model).eval()
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        LoraLayer = ()
    for mod in m.modules():
        if isinstance(mod, LoraLayer):
            mod.merge()
    return m.to(dtype)


@contextlib.contextmanager
def _gqa_in_attention():
    """Trace grouped-query attention as one ONNX ``Attention`` node over the KV heads as they are
    (SDPA's ``enable_gqa``) instead of HF's ``repeat_kv``, which writes the KV buffers out again
    once per query head group in every layer and decode step. transformers turns it on only
    without a mask, unless ``TRANSFORMERS_SDPA_FORCE_GQA=1`` (read at call time)."""
    old = os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA")
    os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TRANSFORMERS_SDPA_FORCE_GQA"]
        else:
            os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] = old


def _export(module, args, path: Path, input_names, output_names, dynamic_shapes, opset: int | None) -> None:
    import onnx

    with warnings.catch_warnings(), _gqa_in_attention():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        prog = torch.onnx.export(
            module,
            args,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            input_names=input_names,
            output_names=output_names,
            opset_version=opset,
            custom_translation_table=ONNX_TRANSLATIONS,
            optimize=True,
            verbose=False,
        )
    prog.save(str(path), external_data=True)
    onnx.checker.check_model(str(path), full_check=False)


def _graph_io(path: Path) -> dict:
    """Inputs/outputs of a saved graph as the runtime sees them (unused inputs are pruned)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    type_name = {v: k.lower() for k, v in onnx.TensorProto.DataType.items()}

    def io(vals):
        out = []
        for v in vals:
            t = v.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": type_name[t.elem_type], "shape": dims})
        return out

    return {"inputs": io(m.graph.input), "outputs": io(m.graph.output), "opset": m.opset_import[0].version}


def _check_declared(fname: str, io, saved: dict) -> None:
    """The traced graph has the declared outputs and a subset of the declared inputs, in order."""
    got_in = [t["name"] for t in saved["inputs"]]
    if got_in != [n for n in io.input_names if n in got_in] or [t["name"] for t in saved["outputs"]] != io.output_names:
        raise ComposerError(
            f"{fname}: the exported graph's inputs/outputs differ from its declaration "
            f"(graphs.py): {got_in} -> {[t['name'] for t in saved['outputs']]}"
        )


def export_onnx(
    model,
    out_dir: str | Path,
    *,
    dtype: str = "fp32",
    opset: int | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
    quantize: str | None = None,
    block_size: int = 32,
    accuracy_level: int = 4,
    keep_head: bool = False,
    keep_embedding: bool = False,
    calibration: str | Path | None = None,
    calibration_samples: int | None = None,
    fp32_channels: int | None = None,
    smooth_alpha: float | None = None,
    reduce_range: bool = False,
    decode_quantize: str | None = None,
    decode_attention: str = "plain",
    check: Callable[[Path], None] | None = None,
) -> Path:
    """Export ``model`` (a ``ComposedModel``) as a split ONNX bundle; returns the bundle path.

    ``quantize`` ("int8" or "int4"): the LLM graphs' weight MatMuls become block-wise quantized
    ``MatMulNBits`` (``composer.export.quantize``; ``block_size``, ``accuracy_level``, and
    ``keep_head`` to leave the LM head in full precision), recorded in the manifest; "w8a8": int8
    weights x per-token int8 activations (fast prefill GEMMs on CPU), calibrated on built-in prompts
    or on the first ``calibration_samples`` records of ``calibration`` (a training-format JSONL file
    with real media); ``fp32_channels`` (16) largest channels per input kept in fp32, SmoothQuant
    ``smooth_alpha`` (0.5) on the rest; ``reduce_range``: 7-bit weights (-63..63), which ONNX
    Runtime's u8 x s8 GEMM cannot saturate on CPUs without VNNI (docs/export.md). Every scheme
    also stores the token embedding as int8 (``GatherBlockQuantized``, blocks of 32) unless
    ``keep_embedding``.

    ``decode_quantize`` ("int8" or "int4"): the bundle also holds a copy of each LLM graph quantized
    so (``MatMulNBits``, the fast one-row GEMVs), which decode steps run, while the prompt's prefill
    runs the graphs of ``quantize`` (e.g. w8a8's fast prefill GEMMs); the manifest records it as
    ``decode_quantization`` and each stage's ``decode_graph``. ``decode_attention`` "plain": the
    decode graphs are copies of the prefill graphs; "fused": traced with each layer's attention as
    one ONNX Runtime ``GroupQueryAttention`` node (rotary, the in-place KV write and grouped
    attention) and RMSNorm as ``RMSNormalization`` (llama-style LLMs with full attention, fp32
    bundles; refused for others), far fewer nodes per decode step; without ``decode_quantize`` the
    fused decode graphs keep the bundle's fp32 weights (the bundle holds the LLM twice).

    ``check``: called with the complete bundle in its temporary directory before it replaces
    ``out_dir`` (``compose export --verify``); when it raises, the temporary bundle is removed and
    ``out_dir`` (a previous bundle, with ``overwrite``) is left as it was.

    Example::

        model = ComposedModel.from_pretrained("out/tiny-llava")
        export_onnx(model, "out/tiny-llava.onnx")
    """
    opset, w8a8 = _checked_options(
        dtype,
        opset,
        quantize,
        block_size,
        accuracy_level,
        calibration,
        calibration_samples,
        fp32_channels,
        smooth_alpha,
        reduce_range,
        decode_quantize,
        decode_attention,
    )
    say = progress or (lambda s: None)
    m = merged_for_export(model, DTYPES[dtype])
    fused = decode_attention == "fused"
    if fused and (why := fused_attention_supported(m.adapter)) is not None:
        raise InputError(f"--decode-attention fused: not for this LLM ({why}); leave it out (plain)")
    calib = _read_calibration(m, calibration, calibration_samples, say)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite) as tmp, torch.no_grad():
        graphs: dict[str, GraphRecord] = {}
        encoders = _export_encoders(m, tmp, dtype, opset, graphs, say)
        stages = _export_llm_graphs(m, tmp, dtype, opset, graphs, say)
        has_decode = decode_quantize is not None or fused
        decode_stages = _decode_graphs(m, tmp, dtype, opset, stages, graphs, fused, say) if has_decode else []
        keep = {"keep_head": keep_head, "keep_embedding": keep_embedding}
        quantization = _quantize(m, tmp, stages, quantize, block_size, accuracy_level, keep, calib, w8a8, say)
        decode = _quantize(m, tmp, decode_stages, decode_quantize, block_size, accuracy_level, keep, None, {}, say)
        _write_model_files(m, tmp)
        attention = decode_attention if has_decode else None
        write_manifest(_manifest(m, dtype, stages, quantization, encoders, graphs, decode, attention), tmp)
        write_generation_config(tmp, m.spec.generation, _eos(m), m.pad_token_id, m.tokenizer.bos_token_id)
        if check is not None:
            say("checking the bundle")
            check(tmp)
    say(f"wrote {out_dir}")
    return out_dir


def _checked_options(
    dtype,
    opset,
    quantize,
    block_size,
    accuracy_level,
    calibration,
    calibration_samples,
    fp32_channels,
    smooth_alpha,
    reduce_range=False,
    decode_quantize=None,
    decode_attention="plain",
) -> tuple[int, dict]:
    """Refuse bad export options before anything is built or written; -> (the opset, w8a8's
    keyword arguments to ``quantize_bundle_graphs`` with their defaults filled in, {} for other
    schemes)."""
    if dtype not in DTYPES:
        raise InputError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if quantize is not None:
        from composer.export.quantize import check_options

        check_options(quantize, dtype, block_size, accuracy_level)
    if decode_quantize is not None:
        from composer.export.quantize import DECODE_SCHEMES, check_options

        if decode_quantize not in DECODE_SCHEMES:
            raise InputError(f"--decode-quantize must be one of {list(DECODE_SCHEMES)}, got {decode_quantize!r}")
        if decode_quantize == quantize and decode_attention != "fused":
            raise InputError(
                f"--decode-quantize {decode_quantize} is --quantize's scheme: with --decode-attention plain the "
                "prefill graphs already decode so; leave it out"
            )
        check_options(decode_quantize, dtype, block_size, accuracy_level, "--decode-quantize")
    if decode_attention not in DECODE_ATTENTION:
        raise InputError(f"--decode-attention must be one of {list(DECODE_ATTENTION)}, got {decode_attention!r}")
    if decode_attention == "fused" and dtype != "fp32":
        raise InputError(
            f"--decode-attention fused: fp32 bundles only (ONNX Runtime's CPU kernels), got --dtype {dtype}"
        )
    w8a8_options = {
        "calibration": calibration,
        "calibration_samples": calibration_samples,
        "fp32_channels": fp32_channels,
        "smooth_alpha": smooth_alpha,
        "reduce_range": reduce_range if reduce_range is not False else None,  # False: the default, not given
    }
    if quantize != "w8a8" and any(v is not None for v in w8a8_options.values()):
        given = ", ".join("--" + k.replace("_", "-") for k, v in w8a8_options.items() if v is not None)
        raise InputError(f"{given}: options of w8a8, use them with --quantize w8a8")
    if calibration_samples is not None and calibration is None:
        raise InputError("--calibration-samples: counts records of --calibration FILE; give the file too")
    if calibration_samples is not None and (isinstance(calibration_samples, bool) or calibration_samples < 1):
        raise InputError(f"--calibration-samples must be >= 1, got {calibration_samples!r}")
    w8a8 = {}
    if quantize == "w8a8":
        from composer.export.quantize import FP32_CHANNELS, SMOOTH_ALPHA, check_w8a8_options

        fp32_channels = FP32_CHANNELS if fp32_channels is None else fp32_channels
        smooth_alpha = SMOOTH_ALPHA if smooth_alpha is None else smooth_alpha
        check_w8a8_options(fp32_channels, smooth_alpha, reduce_range)
        w8a8 = {"fp32_channels": fp32_channels, "smooth_alpha": smooth_alpha, "reduce_range": bool(reduce_range)}
    if opset is not None:
        import onnx

        top = onnx.defs.onnx_opset_version()
        if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= top:
            raise InputError(
                f"--opset must be in [{MIN_OPSET}, {top}] (the KV buffers' TensorScatter and onnx), got {opset!r}"
            )
    return (MIN_OPSET if opset is None else opset), w8a8


def _read_calibration(m, calibration, calibration_samples, say) -> tuple[str, list[dict]] | None:
    """w8a8's calibration data (file name, batches), read and checked before anything is written."""
    if calibration is None:
        return None
    from composer.export.quantize import CALIBRATION_SAMPLES, calibration_batches

    say(f"reading calibration data {calibration}")
    n = CALIBRATION_SAMPLES if calibration_samples is None else calibration_samples
    return Path(calibration).name, calibration_batches(m, calibration, n)


def _export_encoders(m, tmp: Path, dtype: str, opset: int, graphs: dict, say) -> dict[str, EncoderEntry]:
    """One graph per modality, raw input -> projected tokens; records each in ``graphs``."""
    from torch.export import Dim

    tdt = DTYPES[dtype]
    encoders = {}
    for name, enc in m.encoders.items():
        fname = f"encoder.{name}.onnx"
        say(f"exporting {fname}")
        example = {
            k: (v.to(enc.dtype) if v.is_floating_point() else v)
            for k, v in enc.example_inputs(EXAMPLE_SIZES["items"]).items()
        }
        names = list(enc.input_names)
        enc_dims: dict = {}  # one torch Dim per axis name, shared across inputs
        dyn = tuple(
            {ax: enc_dims.setdefault(label, Dim(label)) for ax, label in enc.dynamic_axes()[k].items()} for k in names
        )
        _export(
            EncoderGraph(enc, m.projectors[name], tdt),
            tuple(example[k] for k in names),
            tmp / fname,
            names,
            ["tokens"],
            (dyn,),
            opset,
        )  # forward(*inputs): one varargs entry
        graphs[fname] = GraphRecord.model_validate(_graph_io(tmp / fname))
        encoders[name] = EncoderEntry(
            graph=fname,
            type=encoder_type_of(enc),
            inputs=list(enc.input_names),
            tokens_per_item=m.num_tokens(name),
            placeholder=m.spec.modalities[name].placeholder,
            placeholder_id=m.placeholder_ids[name],
            insert_at=m.insert_at[name],
            processor=f"processors/{name}",
        )
    return encoders


def _export_llm_graphs(m, tmp: Path, dtype: str, opset: int, graphs: dict, say) -> list[Stage]:
    """The early text graph (layers [0, k1)) and one late graph per distinct insertion layer;
    records each in ``graphs``; -> the stages in order."""

    shape = m.adapter.shape
    (_, k1, _), *late = graph_stages(m.insert_at, shape.num_layers)
    stages = [Stage(graph=EARLY_GRAPH, start=0, end=k1, enter=[], last=False)]
    for j, (start, end, enter) in enumerate(late):
        fname = late_graph_name(start, len(late))
        stages.append(Stage(graph=fname, start=start, end=end, enter=list(enter), last=j == len(late) - 1))
    for stage in stages:
        fname = stage.graph
        say(f"exporting {fname}" + ("" if fname == EARLY_GRAPH else f" (layers {stage.start}..{stage.end - 1})"))
        graphs[fname] = _export_llm_graph(stage_module(m, stage), tmp / fname, shape, dtype, opset)
    return stages


def _export_llm_graph(module, path: Path, shape, dtype: str, opset: int) -> GraphRecord:
    """Trace one LLM graph from its declared IO (examples of ``EXAMPLE_SIZES`` and the LLM's
    ``shape``, every ``EXAMPLE_SIZES`` axis dynamic), check it against the declaration; -> its record."""
    from torch.export import Dim

    sizes = {**EXAMPLE_SIZES, "hidden": shape.hidden_size, "kv_heads": shape.num_kv_heads, "head_dim": shape.head_dim}
    dims = {name: Dim(name) for name in EXAMPLE_SIZES}
    vocab = shape.vocab_size
    io = module.io  # the graph's declared inputs and outputs
    _export(
        module,
        io.examples(sizes, DTYPES[dtype], vocab),
        path,
        io.input_names,
        io.output_names,
        io.dynamic_shapes(dims),
        opset,
    )
    saved = _graph_io(path)
    _check_declared(path.name, io, saved)
    entry = io.manifest_entry({**sizes, "vocab": vocab}, ONNX_DTYPES[dtype], {t["name"] for t in saved["inputs"]})
    return GraphRecord.model_validate({**entry, "opset": saved["opset"]})


def _decode_graphs(m, tmp: Path, dtype: str, opset: int, stages: list[Stage], graphs: dict, fused: bool, say):
    """Each LLM graph with layers again as ``<name>.decode.onnx`` (its own external data), for
    ``--decode-quantize``: traced with ``FusedLayers`` (attention as ``GroupQueryAttention``) when
    ``fused``, else a copy; sets each stage's ``decode_graph`` and records the graphs in ``graphs``
    (same inputs and outputs as the prefill graphs); -> stages naming them as their graphs (what to
    quantize)."""
    import onnx

    layers = FusedLayers(m.adapter) if fused else None
    copies = []
    for st in stages:
        if st.end == st.start:  # k = 0's early graph: embeddings only, nothing to quantize
            continue
        name = st.graph.removesuffix(".onnx") + ".decode.onnx"
        if layers is None:
            say(f"copying {st.graph} for the decode graphs")
            graph = onnx.load(str(tmp / st.graph))
            onnx.save(graph, str(tmp / name), save_as_external_data=True, location=name + ".data")
            graphs[name] = graphs[st.graph]
        else:
            say(f"exporting {name} (attention as GroupQueryAttention)")
            graphs[name] = _export_llm_graph(stage_module(m, st, layers), tmp / name, m.adapter.shape, dtype, opset)
            if graphs[name].inputs != graphs[st.graph].inputs or graphs[name].outputs != graphs[st.graph].outputs:
                raise ComposerError(f"{name}: its inputs and outputs differ from {st.graph}'s (a composer bug)")
        st.decode_graph = name
        copies.append(st.model_copy(update={"graph": name, "decode_graph": None}))
    return copies


def _quantize(
    m, tmp: Path, stages: list[Stage], scheme, block_size, accuracy_level, keep: dict, calib, w8a8: dict, say
) -> Quantization | None:
    """Quantize the LLM graphs written under ``tmp`` (``scheme`` None: none; ``keep``: ``keep_head``,
    ``keep_embedding``); -> the manifest's record."""
    if scheme is None or not stages:
        return None
    from composer.export.quantize import quantize_bundle_graphs

    record = quantize_bundle_graphs(
        tmp,
        [st.model_dump() for st in stages],
        m.adapter.shape.vocab_size,
        scheme=scheme,
        block_size=block_size,
        accuracy_level=accuracy_level,
        **keep,
        model=m,
        calibration=calib,
        **w8a8,
        say=say,
    )
    return Quantization.model_validate(record)


def _manifest(m, dtype: str, stages, quantization, encoders, graphs, decode=None, decode_attention=None) -> Manifest:
    """The bundle's manifest: the model's facts and what the export wrote."""
    shape = m.adapter.shape
    return Manifest(
        format_version=FORMAT_VERSION,
        name=m.spec.name,
        dtype=dtype,
        llm=LLMFacts(
            family=m.llm.config.model_type,
            num_layers=shape.num_layers,
            hidden_size=shape.hidden_size,
            vocab_size=shape.vocab_size,
            max_position_embeddings=m.context_length,
            sliding_window=m.adapter.sliding_window,
        ),
        kv=KVFacts(layout=KV_LAYOUT, num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim, dtype=dtype),
        insert_at=m.insert_at,
        stages=stages,
        quantization=quantization,
        decode_quantization=decode,
        decode_attention=decode_attention,
        encoders=encoders,
        graphs=graphs,
        tokenizer="tokenizer",
        prompt_template=m.prompt_template,
        summary=Summary.model_validate(summary_record(m)),
        generation=Generation(
            **m.spec.generation.model_dump(),
            eos_token_id=_eos(m),
            pad_token_id=m.pad_token_id,
            bos_token_id=m.tokenizer.bos_token_id,
            banned_token_ids=m.banned_token_ids,
        ),
    )


def _write_model_files(m, tmp: Path) -> None:
    """The tokenizer, the processors and the spec."""
    m.tokenizer.save_pretrained(str(tmp / "tokenizer"))
    for name, proc in m.processors.items():
        proc.save_pretrained(str(tmp / "processors" / name))
    (tmp / "spec.yaml").write_text(m.spec.to_yaml())


def _eos(model) -> list[int]:
    return model.eos_token_ids


def bundle_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


__all__ = ["bundle_size", "export_onnx", "merged_for_export"]
