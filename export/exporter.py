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

Every graph is traced with an example whose dynamic sizes all differ (batch 2, text 5, MM 3,
past 7, logit rows 4), checked with ``onnx.checker``, and has dynamic batch, sequence, MM
count (0 for decode) and past length (0 for prefill).
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from composer.adapters import encoder_type_of
from composer.checkpoint import atomic_dir
from composer.errors import InputError
from composer.export.graphs import EarlyText, EncoderGraph, LateStage
from composer.export.manifest import FORMAT_VERSION, MANIFEST, late_graph_name

# torch.onnx logs a warning per missing torchvision op at its first use: not our concern.
logging.getLogger("torch.onnx").setLevel(logging.ERROR)

# Example sizes for tracing: all different, so no two dynamic sizes get merged into one symbol.
EX_B, EX_T, EX_M, EX_P, EX_R, EX_ITEMS = 2, 5, 3, 7, 4, 3
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def stage_plan(insert_at: dict[str, int], num_layers: int) -> tuple[int, list[dict]]:
    """-> (k1, late stages [{start, end, enter}]) for distinct insertion layers k1 < k2 < ..."""
    ks = sorted(set(insert_at.values()))
    late = []
    for j, k in enumerate(ks):
        end = ks[j + 1] if j + 1 < len(ks) else num_layers
        late.append({"start": k, "end": end, "enter": sorted(m for m, v in insert_at.items() if v == k)})
    return ks[0], late


def _merged_for_export(model, dtype: torch.dtype):
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


def _kv(n_layers: int, shape, B: int, P: int, dtype) -> list[torch.Tensor]:
    return [torch.zeros(B, shape.num_kv_heads, P, shape.head_dim, dtype=dtype) for _ in range(2 * n_layers)]


def _kv_names(prefix: str, start: int, end: int) -> list[str]:
    return [f"{prefix}_{w}.{i}" for i in range(start, end) for w in ("key", "value")]


def _export(module, args, path: Path, input_names, output_names, dynamic_shapes, opset: int | None) -> None:
    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        prog = torch.onnx.export(
            module, args, dynamo=True, dynamic_shapes=dynamic_shapes, input_names=input_names,
            output_names=output_names, opset_version=opset, optimize=True, verbose=False,
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


def export_onnx(model, out_dir: str | Path, *, dtype: str = "fp32", opset: int | None = None, overwrite: bool = False,
                progress: Callable[[str], None] | None = None) -> Path:
    """Export ``model`` (a ``ComposedModel``) as a split ONNX bundle; returns the bundle path.

    Example::

        model = ComposedModel.from_pretrained("out/tiny-llava")
        export_onnx(model, "out/tiny-llava.onnx")
    """
    from torch.export import Dim

    if dtype not in DTYPES:
        raise InputError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    say = progress or (lambda s: None)
    tdt = DTYPES[dtype]
    m = _merged_for_export(model, tdt)
    shape = m.adapter.shape
    N = shape.num_layers
    k1, late = stage_plan(m.insert_at, N)
    out_dir = Path(out_dir)
    b, t, mm, p, r = Dim("batch"), Dim("seq"), Dim("mm"), Dim("past"), Dim("rows")
    graphs: dict[str, dict] = {}
    with atomic_dir(out_dir, overwrite) as tmp, torch.no_grad():
        # encoders: raw input -> tokens
        encoders = {}
        for name, enc in m.encoders.items():
            fname = f"encoder.{name}.onnx"
            say(f"exporting {fname}")
            example = {k: (v.to(enc.dtype) if v.is_floating_point() else v) for k, v in enc.example_inputs(EX_ITEMS).items()}
            names = list(enc.input_names)
            dims = {}  # one torch Dim per axis name, shared across inputs
            dyn = tuple({ax: dims.setdefault(label, Dim(label)) for ax, label in enc.dynamic_axes()[k].items()} for k in names)
            _export(EncoderGraph(enc, m.projectors[name], tdt), tuple(example[k] for k in names), tmp / fname, names,
                    ["tokens"], (dyn,), opset)  # forward(*inputs): one varargs entry
            graphs[fname] = _graph_io(tmp / fname)
            encoders[name] = {
                "graph": fname, "type": encoder_type_of(enc), "inputs": list(enc.input_names),
                "tokens_per_item": m.num_tokens(name), "placeholder": m.spec.modalities[name].placeholder,
                "placeholder_id": m.placeholder_ids[name], "insert_at": m.insert_at[name],
                "processor": f"processors/{name}",
            }
        # early text graph: layers [0, k1)
        say("exporting early_text.onnx")
        ids = torch.randint(3, shape.vocab_size, (EX_B, EX_T))
        slots = torch.arange(EX_P, EX_P + EX_T).repeat(EX_B, 1)
        args = (ids, slots.clone(), slots, torch.ones(EX_B, EX_T, dtype=torch.bool),
                torch.arange(EX_P).repeat(EX_B, 1), torch.ones(EX_B, EX_P, dtype=torch.bool), _kv(k1, shape, EX_B, EX_P, tdt))
        seq2, past2, kv = {0: b, 1: t}, {0: b, 1: p}, {0: b, 2: p}
        _export(EarlyText(m, k1), args, tmp / "early_text.onnx",
                ["input_ids", "position_ids", "slots", "valid", "past_slots", "past_valid", *_kv_names("past", 0, k1)],
                ["hidden", *_kv_names("present", 0, k1)],
                (seq2, seq2, seq2, seq2, past2, past2, [kv] * (2 * k1)), opset)
        graphs["early_text.onnx"] = _graph_io(tmp / "early_text.onnx")
        # late graphs: one per distinct insertion layer
        stages = [{"graph": "early_text.onnx", "start": 0, "end": k1, "enter": [], "last": False}]
        for j, st in enumerate(late):
            fname = late_graph_name(st["start"], len(late))
            last = j == len(late) - 1
            say(f"exporting {fname} (layers {st['start']}..{st['end'] - 1})")
            d = shape.hidden_size
            args = (
                torch.randn(EX_B, EX_T, d, dtype=tdt), slots, torch.ones(EX_B, EX_T, dtype=torch.bool), slots.clone(),
                torch.randn(EX_B, EX_M, d, dtype=tdt), torch.arange(EX_M).repeat(EX_B, 1),
                torch.ones(EX_B, EX_M, dtype=torch.bool), torch.arange(EX_M).repeat(EX_B, 1),
                torch.arange(EX_P).repeat(EX_B, 1), torch.ones(EX_B, EX_P, dtype=torch.bool),
                torch.zeros(EX_B, EX_R, dtype=torch.long), _kv(st["end"] - st["start"], shape, EX_B, EX_P, tdt),
            )
            mm2 = {0: b, 1: mm}
            _export(
                LateStage(m, st["start"], st["end"], last), args, tmp / fname,
                ["hidden", "hidden_slots", "hidden_valid", "hidden_positions", "mm_tokens", "mm_slots", "mm_valid",
                 "mm_positions", "past_slots", "past_valid", "logit_rows", *_kv_names("past", st["start"], st["end"])],
                ["logits" if last else "hidden_out", *_kv_names("present", st["start"], st["end"])],
                ({0: b, 1: t}, seq2, seq2, seq2, {0: b, 1: mm}, mm2, mm2, mm2, past2, past2, {0: b, 1: r},
                 [kv] * (2 * (st["end"] - st["start"]))), opset)
            graphs[fname] = _graph_io(tmp / fname)
            stages.append({"graph": fname, **st, "last": last})
        # tokenizer, processors, spec, manifest
        m.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        for name, proc in m.processors.items():
            proc.save_pretrained(str(tmp / "processors" / name))
        (tmp / "spec.yaml").write_text(m.spec.to_yaml())
        tok = m.tokenizer
        g = m.spec.generation
        manifest = {
            "format_version": FORMAT_VERSION,
            "name": m.spec.name,
            "dtype": dtype,
            "llm": {"family": m.llm.config.model_type, "num_layers": N, "hidden_size": shape.hidden_size,
                    "vocab_size": shape.vocab_size, "max_position_embeddings": m.context_length,
                    "sliding_window": m.adapter.sliding_window},
            "kv": {"layout": "past_key.{i}/past_value.{i}: (batch, kv_heads, past, head_dim); layer index i absolute",
                   "num_kv_heads": shape.num_kv_heads, "head_dim": shape.head_dim, "dtype": dtype},
            "insert_at": m.insert_at,
            "stages": stages,
            "encoders": encoders,
            "graphs": graphs,
            "tokenizer": "tokenizer",
            "prompt_template": m.spec.prompt.template,
            "generation": {**g.model_dump(), "eos_token_id": _eos(m), "pad_token_id": m.pad_token_id,
                           "bos_token_id": tok.bos_token_id, "banned_token_ids": m.banned_token_ids},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    say(f"wrote {out_dir}")
    return out_dir


def _eos(model) -> list[int]:
    from composer.generation import eos_ids

    return eos_ids(None, model.llm.generation_config, model.tokenizer)


def bundle_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


__all__ = ["bundle_size", "export_onnx", "stage_plan"]
