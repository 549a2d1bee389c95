"""The bundle manifest: what the exporter writes and the runtime reads (cf. onnxruntime-genai's
``genai_config.json``), as a typed record (``Manifest``). Reading it checks every field the
runtime uses, with one ``InputError`` naming the file and the field path, then the files it names.

Example::

    manifest = read_manifest("out/tiny-llava.onnx")
    manifest.kv.num_kv_heads, [st.graph for st in manifest.stages]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import ConfigDict, field_validator, model_validator

from composer.errors import InputError, read_versioned_json
from composer.records import Index, PositiveInt, Record, Summary, checked, dump_record, read_record
from composer.spec import GenerationSpec

# 2: the LLM graphs take KV buffers written in place (write_index, cache_slots/cache_valid);
# 1 (concatenating past + new KV) bundles must be exported again.
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
# quantization schemes a bundle may record -> weight bits (composer.export.quantize makes them)
SCHEMES = {"int8": 8, "int4": 4, "w8a8": 8}

Dtype = Literal["fp32", "fp16"]
# an axis of a recorded graph tensor: a fixed size or a dynamic axis' name
Axis = Annotated[int | str, checked((int, str), lambda v: v != "", "an axis size or name")]


class LLMFacts(Record):
    family: str  # the HF model_type
    num_layers: PositiveInt
    hidden_size: PositiveInt
    vocab_size: PositiveInt
    max_position_embeddings: PositiveInt | None = None  # None in bundles written before it was recorded
    sliding_window: PositiveInt | None = None  # None: full attention


class KVFacts(Record):
    layout: str  # the KV buffers' layout, in words
    num_kv_heads: PositiveInt
    head_dim: PositiveInt
    dtype: Dtype


class Stage(Record):
    """One LLM graph: layers [start, end), the modalities whose tokens enter at ``start``; the
    ``last`` one ends with the LM head. ``decode_graph``: the same layers quantized another way
    (``--decode-quantize``) and/or with fused attention (``--decode-attention fused``), which decode
    steps run instead of ``graph`` (None: ``graph``)."""

    graph: str
    start: Index
    end: Index
    enter: list[str]
    last: bool
    decode_graph: str | None = None


class Calibration(Record):
    data: str  # the calibration file's name, or "built-in prompts"
    samples: PositiveInt


class Smoothing(Record):
    """w8a8's SmoothQuant settings (the two older keys: w8a8 bundles written before they were renamed)."""

    alpha: float
    fp32_channels: Index | None = None
    calibration: Calibration | None = None
    outlier_channels: Index | None = None  # older name of fp32_channels
    calibration_prompts: Index | None = None  # before calibration data could be given


class QuantizedGraph(Record):
    quantized: Index  # weight MatMuls rewritten
    kept: list[str]  # left in full precision
    packed: Index | None = None  # MatMuls merged into a shared-input one (None: w8a8, older bundles)
    smoothed: Index | None = None  # w8a8 only
    fp32_channels: Index | None = None  # w8a8 only
    outlier_channels: Index | None = None  # older name of fp32_channels


class Quantization(Record):
    """What ``composer.export.quantize.quantize_bundle_graphs`` did to the LLM graphs."""

    scheme: Annotated[str, checked(str, lambda v: v in SCHEMES, " or ".join(repr(k) for k in SCHEMES))]
    bits: PositiveInt
    block_size: PositiveInt | None  # None for w8a8 (per-channel)
    accuracy_level: Index | None  # None for w8a8
    lm_head: str
    # the token embedding: "int8" (GatherBlockQuantized, embedding_block_size weights per scale) or
    # "full precision"; None in bundles written before it was quantized (full precision)
    embedding: str | None = None
    embedding_block_size: PositiveInt | None = None
    method: str
    graphs: dict[str, QuantizedGraph]
    smoothing: Smoothing | None = None  # w8a8 only
    weight_max: PositiveInt | None = None  # w8a8: its weights' range, 127 (63: --reduce-range); None: 127

    @property
    def saturates_without_vnni(self) -> bool:
        """Whether ONNX Runtime's u8 x s8 GEMM can saturate on this bundle on a CPU without VNNI:
        w8a8 whose weights let a pair of u8 x s8 products (activations up to 255) pass 16 bits."""
        return self.scheme == "w8a8" and 2 * 255 * (self.weight_max or 127) > 32767


class EncoderEntry(Record):
    graph: str
    type: str  # the encoder's registry name
    inputs: list[str]
    tokens_per_item: PositiveInt
    placeholder: str
    placeholder_id: Index
    insert_at: Index
    processor: str  # its processor's directory in the bundle


class GraphTensor(Record):
    name: str
    dtype: str  # as onnx.TensorProto names it, lower case
    shape: list[Axis]
    used: bool | None = None  # LLM graphs: false for a declared input the exported graph does not read


class GraphRecord(Record):
    inputs: list[GraphTensor]
    outputs: list[GraphTensor]
    opset: PositiveInt


class Generation(GenerationSpec):
    """The spec's ``generation`` section (keys added to it since a bundle was written take their
    defaults) and the token ids generation needs."""

    model_config = ConfigDict(Record.model_config)

    eos_token_id: list[int]
    pad_token_id: int
    bos_token_id: int | None = None
    banned_token_ids: list[int]

    def spec(self) -> GenerationSpec:
        return GenerationSpec(**self.model_dump(include=set(GenerationSpec.model_fields)))


class Manifest(Record):
    """``BUNDLE/manifest.json``; the keys in the order the exporter writes them."""

    format_version: Annotated[int, checked(int, lambda v: v == FORMAT_VERSION, str(FORMAT_VERSION))] = FORMAT_VERSION
    name: str
    dtype: Dtype
    llm: LLMFacts
    kv: KVFacts
    insert_at: dict[str, Index]
    stages: list[Stage]
    quantization: Quantization | None = None  # None: the LLM graphs keep the bundle's dtype
    decode_quantization: Quantization | None = None  # the stages' decode graphs (--decode-quantize)
    # how the decode graphs attend: "fused" (GroupQueryAttention), "plain" (the prefill graphs' ops);
    # None: no decode graphs, or a bundle from before the field (then plain, quantized)
    decode_attention: Literal["plain", "fused"] | None = None
    encoders: dict[str, EncoderEntry]
    graphs: dict[str, GraphRecord]
    tokenizer: str = "tokenizer"
    prompt_template: str | None = None  # None: the tokenizer's chat template
    summary: Summary | None = None
    generation: Generation

    @field_validator("stages")
    @classmethod
    def _two_stages_the_last_last(cls, stages: list[Stage]) -> list[Stage]:
        if len(stages) < 2:
            raise ValueError(f"must be a list of at least two stages, got {len(stages)}")
        if not stages[-1].last:
            raise ValueError("the last stage must have last: true")
        return stages

    @field_validator("encoders")
    @classmethod
    def _an_encoder(cls, encoders: dict) -> dict:
        if not encoders:
            raise ValueError("must name at least one encoder")
        return encoders

    @model_validator(mode="after")
    def _names_known(self) -> Manifest:
        unknown = sorted(g for g in self.graph_names() if g not in self.graphs)
        if unknown:
            raise ValueError(f"stages/encoders name graphs the manifest does not list: {unknown}")
        for i, st in enumerate(self.stages):
            strangers = [m for m in st.enter if m not in self.encoders]
            if strangers:
                raise ValueError(f"stages[{i}].enter: modalities without an encoder: {strangers}")
            if st.decode_graph == st.graph:
                raise ValueError(f"stages[{i}].decode_graph: the stage's own graph; leave it out")
        decode = self.decode_quantization is not None or self.decode_attention == "fused"
        if any(st.decode_graph for st in self.stages) != decode:
            raise ValueError(
                "decode graphs come with decode_quantization or decode_attention fused (and those with decode "
                "graphs): one is missing"
            )
        return self

    def graph_names(self) -> list[str]:
        """The graphs the stages (prefill, then decode) and encoders run, in that order."""
        decode = [st.decode_graph for st in self.stages if st.decode_graph]
        return [st.graph for st in self.stages] + decode + [e.graph for e in self.encoders.values()]

    def directories(self) -> list[str]:
        """The tokenizer's and the processors' directories in the bundle."""
        return [self.tokenizer] + [e.processor for e in self.encoders.values()]


def late_graph_name(start: int, n_late: int) -> str:
    """``late_multimodal.onnx`` for one insertion layer, ``late_multimodal.k<K>.onnx`` for several."""
    return "late_multimodal.onnx" if n_late == 1 else f"late_multimodal.k{start}.onnx"


def is_bundle(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(bundle: str | Path, *, check_files: bool = True) -> Manifest:
    """Load and check ``BUNDLE/manifest.json``: known format version, every field the runtime
    reads (``Manifest``), every name inside the bundle; with ``check_files``, every graph and its
    external-data files present and readable, the tokenizer and processor directories present."""
    root = Path(bundle)
    path = root / MANIFEST
    if not path.is_file():
        raise InputError(f"{root}: not an ONNX bundle (no {MANIFEST})")
    data = read_versioned_json(
        path, FORMAT_VERSION, "the bundle manifest", hint="export the model again with this composer (compose export)"
    )
    manifest = read_record(Manifest, path, data)
    dirs = manifest.directories()
    for name in [*manifest.graphs, *dirs]:
        inside(root, name, f"{path}: names")
    if check_files:
        for name in manifest.graphs:
            check_graph_file(root / name)
        for d in dirs:
            if not (root / d).is_dir():
                raise InputError(f"{root / d}: missing from the bundle")
    return manifest


def write_manifest(manifest: Manifest, bundle: str | Path) -> Path:
    """Write ``BUNDLE/manifest.json`` (indented, keys in the model's order); -> its path."""
    path = Path(bundle) / MANIFEST
    path.write_text(json.dumps(dump_record(manifest), indent=2))
    return path


def inside(root: Path, name: object, what: str) -> Path:
    """``root / name``, refused unless ``name`` is a relative path that stays inside ``root``
    (resolved: no ``..``, no absolute path, no symlink out; in the HF cache, the repo's blobs/
    are inside): a bundle only names its own files."""
    if not isinstance(name, str) or not name or Path(name).is_absolute():
        raise InputError(f"{what} {name!r}: not a relative path inside the bundle")
    target = (root / name).resolve()
    allowed = [root.resolve()]
    if root.parent.name == "snapshots":  # a bundle in the HF cache: its files are symlinks into ../../blobs
        allowed.append((root.parent.parent / "blobs").resolve())
    if not any(target.is_relative_to(a) for a in allowed):
        raise InputError(f"{what} {name!r}: points outside the bundle")
    return root / name


def check_graph_file(path: Path) -> None:
    """The graph parses and every external-data file it names exists and is large enough."""
    import onnx

    if not path.is_file():
        raise InputError(f"{path}: graph file missing from the bundle")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError and friends
        raise InputError(f"{path}: cannot parse ONNX graph ({type(e).__name__}); the file may be truncated") from None
    needed: dict[str, int] = {}
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in init.external_data}
            end = int(info.get("offset", 0)) + int(info.get("length", 0))
            loc = info["location"]
            needed[loc] = max(needed.get(loc, 0), end)
    for loc, end in needed.items():
        data = inside(path.parent, loc, f"{path}: external data")
        if not data.is_file():
            raise InputError(f"{data}: external data of {path.name} missing from the bundle")
        if data.stat().st_size < end:
            raise InputError(f"{data}: external data of {path.name} is truncated ({data.stat().st_size} < {end} bytes)")
