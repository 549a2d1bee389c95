"""The composer spec: a YAML file validated into pydantic models.

This module imports no torch: loading and validating a spec is instant, and its errors name
the field path and the bad value, e.g.::

    specs/x.yaml: modalities.audio.insert_at: must be < llm layers (32), got 40

Example::

    spec = load_spec("specs/tiny/llava.yaml")
    spec.modalities["image"].insert_at   # 2
"""

from __future__ import annotations

import os
import re
import reprlib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from composer.errors import SpecError, first_line, requirement

TrainMode = Literal["frozen", "lora", "full"]
DType = Literal["float32", "bfloat16", "float16"]

# Closed registries: a spec names a type from these lists, never a dotted import path.
LLM_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "opt")
ENCODER_TYPES = (
    "clip_vision",
    "siglip_vision",
    "blip2_vision",
    "dinov2_vision",
    "ast_audio",
    "whisper_audio",
    "gin",
    "smiles_bert",
)
# what each encoder type reads (model cards' pipeline_tag, the server's content parts)
IMAGE_ENCODERS = frozenset({"clip_vision", "siglip_vision", "blip2_vision", "dinov2_vision"})
AUDIO_ENCODERS = frozenset({"ast_audio", "whisper_audio"})
MOLECULE_ENCODERS = frozenset({"gin", "smiles_bert"})  # items are SMILES strings
# HF `model_type` of an inline/saved config -> encoder type (used when `type` is omitted).
ENCODER_MODEL_TYPES = {
    "clip_vision_model": "clip_vision",
    "clip": "clip_vision",
    "siglip_vision_model": "siglip_vision",
    "siglip": "siglip_vision",
    "blip_2_vision_model": "blip2_vision",
    "blip-2": "blip2_vision",  # a whole BLIP-2 checkpoint: its vision_config and vision_model.* tensors
    "audio-spectrogram-transformer": "ast_audio",
    "whisper": "whisper_audio",  # a whole Whisper checkpoint: its model.encoder.* tensors
    "dinov2": "dinov2_vision",
}
# Encoders with their own small config dict (no HF `model_type`: an inline `config` needs `type`).
OWN_CONFIG_ENCODERS = ("gin",)
# Encoders with a variable number of tokens per item (atoms, SMILES tokens), padded rows zero: the
# projector must be a Q-Former, which masks the padding out.
VARIABLE_TOKEN_ENCODERS = ("gin", "smiles_bert")
# Encoders whose `feature_layer` may list several layers, concatenated along the width (as
# transformers' Llava does with a list `vision_feature_layer`).
MULTI_LAYER_ENCODERS = ("clip_vision", "siglip_vision", "dinov2_vision")


def one_layer_only(etype: str) -> str:
    """The refusal of a list ``feature_layer`` on an encoder type that reads one layer."""
    return f"a list of layers is for the {', '.join(MULTI_LAYER_ENCODERS)} encoders, not {etype}"


# Encoder types an HF `model_type` is too general to name (a BERT is not always over SMILES): an
# inline config of the type has this model_type, but the type is never inferred from it.
EXPLICIT_MODEL_TYPES = {"smiles_bert": "bert"}
PROJECTOR_TYPES = ("linear", "mlp", "qformer", "pool")
ACTIVATIONS = ("gelu", "gelu_new", "relu", "silu", "tanh", "quick_gelu")
# Names a modality may not take: they are ComposedModel.forward/generate keyword arguments.
RESERVED_MODALITY_NAMES = {"input_ids", "attention_mask", "labels", "position_ids", "cache", "max_new_tokens"}

# A Hub repo id as the Hub spells them, `owner/name`: the one pattern every reader of sources uses.
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
# `owner/name@revision` pins a Hub id to a branch, tag or commit hash (`llm.model`,
# `llm.tokenizer.model`, `encoder.model`, `projector.weights`); a build resolves the revision to
# its commit hash and saves `owner/name@<hash>`. A local path of the same spelling wins.
_PINNED = re.compile(r"(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]*(?:/[A-Za-z0-9][A-Za-z0-9_.-]*)?)@(?P<rev>.*)", re.S)
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(?:/[A-Za-z0-9_.-]+)*")


def split_revision(value: str) -> tuple[str, str | None]:
    """``"owner/name@v1"`` -> ``("owner/name", "v1")``; a value without a pin -> ``(value, None)``."""
    m = _PINNED.fullmatch(value)
    return (m["repo"], m["rev"]) if m else (value, None)


def _check_pin(value: str | None) -> str | None:
    if value is not None:
        rev = split_revision(value)[1]
        if rev is not None and (not _REVISION.fullmatch(rev) or ".." in rev or rev.endswith(".lock")):
            raise ValueError("bad revision after '@' (want a branch, tag or commit hash, e.g. owner/name@v1.0)")
    return value


HubRef = Annotated[str | None, AfterValidator(_check_pin)]  # a Hub id (optionally @revision) or a local path


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, protected_namespaces=())


class LoraSpec(_Strict):
    """peft LoRA settings (https://huggingface.co/docs/peft)."""

    r: int = Field(8, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)
    # the decoder (or encoder) layers that get adapters (peft's `layers_to_transform`); None: all.
    # DeepInsert at k: `layers: [k, ..., N-1]` adapts only the layers the modality's tokens pass
    # through, so the early text-only layers stay the pretrained model's
    layers: list[Annotated[int, Field(ge=0)]] | None = Field(None, min_length=1)
    # trained adapter weights: a peft adapter file (`adapter_model.safetensors` as peft's
    # `save_pretrained` writes it, or a directory or Hub repo holding one), loaded strictly on build
    weights: HubRef = None


class TokenizerSpec(_Strict):
    """Where the tokenizer comes from.

    `model`: a Hub id or local dir (defaults to `llm.model`). `type: byte`: a built-in byte-level
    tokenizer (256 byte tokens + specials) that needs no files, for inline-config models.
    """

    type: Literal["pretrained", "byte"] = "pretrained"
    model: HubRef = None

    @model_validator(mode="after")
    def _check(self) -> TokenizerSpec:
        if self.type == "byte" and self.model is not None:
            raise ValueError("`model` is not used with `type: byte`")
        return self


class LLMSpec(_Strict):
    """The language model. Exactly one of `model` (Hub id or local dir) or `config` (inline HF config)."""

    model: HubRef = None
    config: dict[str, Any] | None = None
    dtype: DType = "float32"
    train: TrainMode = "frozen"
    lora: LoraSpec | None = None
    tokenizer: TokenizerSpec | None = None
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"

    @model_validator(mode="after")
    def _check(self) -> LLMSpec:
        if (self.model is None) == (self.config is None):
            raise ValueError("give exactly one of `model` (Hub id or local dir) or `config` (inline HF config)")
        if self.config is not None:
            _check_inline_config(self.config, LLM_FAMILIES, "llm.config")
        if self.train == "lora" and self.lora is None:
            self.lora = LoraSpec()
        if self.train != "lora" and self.lora is not None:
            raise _FieldError("lora", "is set but `train` is not `lora`", self.train)
        if self.tokenizer is None:
            self.tokenizer = TokenizerSpec(type="pretrained" if self.model else "byte")
        if self.tokenizer.type == "pretrained" and self.tokenizer.model is None and self.model is None:
            raise ValueError("an inline-config LLM needs `tokenizer: {model: ...}` or `tokenizer: {type: byte}`")
        return self

    @property
    def num_layers(self) -> int | None:
        """Number of decoder layers when known without loading anything (inline config)."""
        return None if self.config is None else int(self.config["num_hidden_layers"])

    @property
    def hidden_size(self) -> int | None:
        return None if self.config is None else int(self.config["hidden_size"])


class EncoderSpec(_Strict):
    """A modality encoder: a pretrained model (`model`) or an inline config (`config`, random init)."""

    type: str | None = None
    model: HubRef = None
    config: dict[str, Any] | None = None
    feature_layer: int | list[int] = -1  # a list: those layers' features side by side (MULTI_LAYER_ENCODERS)
    select: Literal["patch", "all"] = "patch"
    train: TrainMode = "frozen"
    lora: LoraSpec | None = None
    dtype: DType | None = None
    processor: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> EncoderSpec:
        if (self.model is None) == (self.config is None):
            raise ValueError("give exactly one of `model` (Hub id or local dir) or `config` (inline HF config)")
        if self.config is not None and self.type not in OWN_CONFIG_ENCODERS:
            mt = self.config.get("model_type")
            inferred = ENCODER_MODEL_TYPES.get(mt) if isinstance(mt, str) else None
            if self.type in EXPLICIT_MODEL_TYPES:
                want = EXPLICIT_MODEL_TYPES[self.type]
                if mt != want:
                    raise _FieldError("config.model_type", f"must be {want!r} for the {self.type} encoder", mt)
                inferred = self.type
            if inferred is None:
                raise _FieldError(
                    "config.model_type",
                    f"not a supported encoder; known: {sorted(ENCODER_MODEL_TYPES)} "
                    f"(or set `type` to one of {list(OWN_CONFIG_ENCODERS)})",
                    mt,
                )
            if self.type is None:
                self.type = inferred
            _check_heads(self.config)
        if isinstance(self.feature_layer, list):
            layers = self.feature_layer
            if not layers or len(set(layers)) != len(layers):
                raise _FieldError("feature_layer", "a list must name one or more distinct layers", layers)
            if self.type is not None and self.type not in MULTI_LAYER_ENCODERS:
                raise _FieldError("feature_layer", one_layer_only(self.type), layers)
        if self.config is not None:
            n = self.config.get("num_layers" if self.type in OWN_CONFIG_ENCODERS else "num_hidden_layers")
            for i in self.feature_layers:
                if _pos_int(n) and not -(n + 1) <= i <= n:
                    raise _FieldError(
                        "feature_layer", f"must be in [-{n + 1}, {n}] for a {n}-layer encoder", self.feature_layer
                    )
        if self.model is not None and self.model.startswith("package:") and self.type is None:
            raise _FieldError("type", "required for a package: source (the file's format says no model type)", None)
        if self.type is not None and self.type not in ENCODER_TYPES:
            raise _FieldError("type", f"not a known encoder type; known: {list(ENCODER_TYPES)}", self.type)
        if self.train == "lora" and self.lora is None:
            self.lora = LoraSpec()
        return self

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """``feature_layer`` as a tuple (one element for a single layer)."""
        fl = self.feature_layer
        return tuple(fl) if isinstance(fl, list) else (fl,)


class _ProjectorBase(_Strict):
    weights: HubRef = None  # safetensors (or LLaVA .bin, loaded with weights_only) in the seed layouts
    train: TrainMode = "full"


class LinearProjectorSpec(_ProjectorBase):
    type: Literal["linear"]


class MLPProjectorSpec(_ProjectorBase):
    """LLaVA's `mlp{depth}x_{activation}`: Linear(enc, d) then (act, Linear(d, d)) * (depth - 1)."""

    type: Literal["mlp"]
    depth: int = Field(2, ge=1, le=8)
    activation: str = "gelu"
    # Average each `patch_pool` x `patch_pool` block of neighbouring patch tokens first (stride
    # `patch_pool`): an s x s patch grid becomes (s / patch_pool)^2 tokens, as LLaVA-NeXT-style
    # token downsampling does. The encoder's tokens must form a square grid whose side it divides.
    patch_pool: int | None = Field(None, ge=2)

    @field_validator("activation")
    @classmethod
    def _act(cls, v: str) -> str:
        if v not in ACTIVATIONS:
            raise ValueError(f"unknown activation {v!r}; known: {list(ACTIVATIONS)}")
        return v


class QFormerProjectorSpec(_ProjectorBase):
    """BLIP-2 Q-Former: learned queries cross-attend to encoder features, then Linear to the LLM."""

    type: Literal["qformer"]
    num_queries: int = Field(32, gt=0)
    num_layers: int = Field(12, gt=0)
    hidden_size: int = Field(768, gt=0)
    num_heads: int = Field(12, gt=0)
    intermediate_size: int = Field(3072, gt=0)
    cross_attention_frequency: int = Field(2, gt=0)

    @model_validator(mode="after")
    def _check(self) -> QFormerProjectorSpec:
        if self.hidden_size % self.num_heads:
            raise _FieldError("hidden_size", f"must be divisible by num_heads ({self.num_heads})", self.hidden_size)
        return self


class PoolProjectorSpec(_ProjectorBase):
    """LTU's projector: pool the encoder tokens to `num_tokens`, LayerNorm, Linear to the LLM.

    `rows`: the encoder's tokens form a row-major (rows, T_enc / rows) grid, e.g. AST's 12
    frequency rows x 101 time columns; the rows are pooled away first, then the columns are
    pooled to `num_tokens` (LTU: mean over frequency, average over time). Unset: the token axis
    is pooled as it is (adaptive pooling, as torch's `adaptive_avg_pool1d`).
    """

    type: Literal["pool"]
    num_tokens: int = Field(32, gt=0)
    pooling: Literal["avg", "max"] = "avg"
    rows: int | None = Field(None, gt=0)


ProjectorSpec = Annotated[
    LinearProjectorSpec | MLPProjectorSpec | QFormerProjectorSpec | PoolProjectorSpec, Field(discriminator="type")
]


class ModalitySpec(_Strict):
    encoder: EncoderSpec
    projector: ProjectorSpec
    insert_at: int = Field(0, ge=0)
    placeholder: str | None = None

    @model_validator(mode="after")
    def _check(self) -> ModalitySpec:
        if self.encoder.type in VARIABLE_TOKEN_ENCODERS and self.projector.type != "qformer":
            raise _FieldError(
                "projector.type",
                f"the {self.encoder.type} encoder gives a variable number of tokens per item; use `qformer`",
                self.projector.type,
            )
        return self


class PromptSpec(_Strict):
    """A plain-text prompt template for tokenizers without a chat template, e.g. LLaVA-1.5's
    ``"USER: <image>\\n{instruction} ASSISTANT:"``. Without a ``prompt`` section, prompts use the
    tokenizer's chat template (``model.format_prompt``, ``prepare(messages=...)``)."""

    template: str


# Below this temperature sampling is greedy in all but name (logits 1e-4 apart, about fp32's resolution
# near 30, differ by 100 after division: a probability ratio of e^100), and 1e-300 overflows the
# divided logits to inf (NaN probabilities).
MIN_TEMPERATURE = 1e-6
MAX_SEED = 2**64 - 1  # torch.manual_seed takes a 64-bit seed


class GenerationSpec(_Strict):
    """Generation settings: the spec's ``generation`` section, ``generate(**overrides)``'s keyword
    arguments and ``compose generate``'s options (generated from these fields and descriptions)."""

    max_new_tokens: int = Field(32, gt=0, description="New tokens at most.")
    do_sample: bool = Field(False, description="Sample (else greedy).")
    temperature: float = Field(1.0, ge=MIN_TEMPERATURE, allow_inf_nan=False, description="Sampling temperature.")
    top_k: int | None = Field(None, gt=0, description="Sample from the k likeliest tokens.")
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False, description="Nucleus sampling mass.")
    repetition_penalty: float = Field(
        1.0, gt=0, allow_inf_nan=False, description="> 1 discourages repeats (transformers' processor)."
    )
    no_repeat_ngram_size: int = Field(0, ge=0, description="Never repeat an n-gram of this size.")
    min_new_tokens: int = Field(0, ge=0, description="EOS is banned before this many new tokens.")
    stop_strings: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, description="Stop once this text is generated (transformers' StopStringCriteria)."
    )
    num_return_sequences: int = Field(1, gt=0, description="Sampled sequences per prompt (rows grouped per prompt).")


class Spec(_Strict):
    """A whole composed model."""

    name: str = Field(min_length=1)
    seed: int = Field(0, ge=0, le=MAX_SEED)  # random init of inline-config components (torch.manual_seed's range)
    llm: LLMSpec
    modalities: dict[str, ModalitySpec] = Field(min_length=1)
    prompt: PromptSpec | None = None  # None: the tokenizer's chat template
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    _source_dir: Path | None = PrivateAttr(default=None)

    @property
    def source_dir(self) -> Path | None:
        """Directory of the spec file: relative local paths in the spec resolve against it."""
        return self._source_dir

    @model_validator(mode="after")
    def _cross_field(self) -> Spec:
        placeholders: dict[str, str] = {}
        for name, mod in self.modalities.items():
            where = f"modalities.{name}"
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or name in RESERVED_MODALITY_NAMES:
                raise _FieldError(
                    where, f"modality name must be an identifier and not one of {sorted(RESERVED_MODALITY_NAMES)}", name
                )
            if mod.placeholder is None:
                mod.placeholder = f"<{name}>"
            if mod.placeholder in placeholders:
                raise _FieldError(
                    f"{where}.placeholder",
                    f"already used by modality {placeholders[mod.placeholder]!r}",
                    mod.placeholder,
                )
            placeholders[mod.placeholder] = name
            n = self.llm.num_layers
            if n is not None and mod.insert_at >= n:
                raise _FieldError(f"{where}.insert_at", f"must be < the LLM's {n} layers", mod.insert_at)
        if self.prompt is None:
            return self
        tpl = self.prompt.template
        if "{instruction}" not in tpl:
            raise _FieldError("prompt.template", "must contain '{instruction}'", tpl)
        for ph in placeholders:
            if tpl.count(ph) > 1:
                raise _FieldError("prompt.template", f"placeholder {ph!r} appears more than once", tpl)
        if not any(ph in tpl for ph in placeholders):
            raise _FieldError("prompt.template", f"contains none of the placeholders {list(placeholders)}", tpl)
        return self

    def insert_layers(self) -> dict[str, int]:
        return {name: m.insert_at for name, m in self.modalities.items()}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)


class _FieldError(ValueError):
    """A cross-field error that knows its field path (pydantic would report the model's root)."""

    def __init__(self, path: str, msg: str, value: Any):
        self.path, self.msg, self.value = path, msg, value
        super().__init__(f"{path}: {msg}, got {_short(value)}")


def _check_inline_config(config: dict[str, Any], families: tuple[str, ...], where: str) -> None:
    mt = config.get("model_type")
    if mt not in families:
        raise _FieldError("config.model_type", f"must be one of {list(families)}", mt)
    for key in ("num_hidden_layers", "hidden_size", "vocab_size"):
        v = config.get(key)
        if not _pos_int(v):
            raise _FieldError(f"config.{key}", f"must be a positive integer up to {MAX_SIZE}", v)
    _check_heads(config)


MAX_SIZE = 2**31 - 1  # past any real model size, and what torch's int32 indexing can reach


def _pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_SIZE


def _check_heads(config: dict[str, Any]) -> None:
    """Sizes and attention arithmetic of an inline HF config, checked here rather than deep inside
    torch: sizes are positive, heads divide the width (unless ``head_dim`` is set) and KV heads
    divide the heads (GQA)."""
    for key in (
        "hidden_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "intermediate_size",
        "ffn_dim",
        "max_position_embeddings",
        "num_hidden_layers",
        "image_size",
        "patch_size",
        "num_channels",
        "num_mel_bins",
        "max_length",
        "frequency_stride",
        "time_stride",
    ):
        v = config.get(key)
        if v is not None and not _pos_int(v):
            raise _FieldError(f"config.{key}", f"must be a positive integer up to {MAX_SIZE}", v)
    h, n, kv = config.get("hidden_size"), config.get("num_attention_heads"), config.get("num_key_value_heads")
    if n is None:
        return
    if kv is not None and n % kv:
        raise _FieldError("config.num_attention_heads", f"must be divisible by num_key_value_heads ({kv})", n)
    if h is not None and config.get("head_dim") is None and h % n:
        raise _FieldError("config.hidden_size", f"must be divisible by num_attention_heads ({n})", h)


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, 200, 200, 200
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 40


def _short(value: Any, limit: int = 80) -> str:
    s = _REPR.repr(value)  # bounded even for huge or alias-shared values
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _loc(loc: tuple[Any, ...]) -> str:
    # pydantic puts the tag of a discriminated union into the location: drop it. Keys that are
    # not plain words (spaces, newlines, ...) are quoted so the message stays one readable line.
    parts = [
        p if isinstance(p, str) and re.fullmatch(r"[\w\-<>\[\]]+", p) else _short(p, 40)
        for i, p in enumerate(loc)
        if not (i and loc[i - 1] == "projector" and p in PROJECTOR_TYPES)
    ]
    return ".".join(parts) or "<root>"


def _one_line(s: str) -> str:
    return s.replace("\r", "\\r").replace("\n", "\\n")


MAX_REPORTED_ERRORS = 5


def format_validation_error(err: ValidationError) -> str:
    """One line: `path: message, got value` for each error (the first few), joined with '; '."""
    out = []
    errors = err.errors()
    for e in errors[:MAX_REPORTED_ERRORS]:
        ctx_err = (e.get("ctx") or {}).get("error")
        loc = _loc(tuple(e["loc"]))
        if isinstance(ctx_err, _FieldError):
            path = ctx_err.path if loc == "<root>" else f"{loc}.{ctx_err.path}"
            out.append(f"{path}: {ctx_err.msg}, got {_short(ctx_err.value)}")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            out.append(f"{loc}: unknown field")
        elif e["type"] == "missing":
            out.append(f"{loc}: required field is missing")
        elif isinstance(e.get("input"), dict):  # a whole section: the message says what is wrong
            out.append(f"{loc}: {msg}")
        elif e["type"] == "value_error":
            out.append(f"{loc}: {msg}, got {_short(e.get('input'))}")
        else:  # a value of the wrong type or out of range: composer's wording (``errors.requirement``)
            out.append(f"{loc}: {requirement(e)}, got {_short(e.get('input'))}")
    if len(errors) > MAX_REPORTED_ERRORS:
        out.append(f"and {len(errors) - MAX_REPORTED_ERRORS} more error(s)")
    return _one_line("; ".join(out))


def parse_spec(data: Any, source: str = "<spec>") -> Spec:
    """Validate an already-parsed mapping into a `Spec`; raise `SpecError` naming `source`."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: the spec must be a YAML mapping, got {type(data).__name__}")
    try:
        return Spec.model_validate(data)
    except ValidationError as e:
        raise SpecError(f"{source}: {format_validation_error(e)}") from None
    except (TypeError, KeyError, AttributeError, OverflowError, RecursionError) as e:  # a validator's blind spot
        raise SpecError(_one_line(f"{source}: <root>: invalid spec ({type(e).__name__}: {str(e)[:200]})")) from None


MAX_SPEC_BYTES = 1 << 20  # a spec is a short text file; refuse anything bigger before parsing it
MAX_YAML_DEPTH = 64  # nesting; PyYAML composes recursively
MAX_YAML_NODES = 20_000  # nodes after expanding aliases ("billion laughs": 9 aliases of 9 aliases of ...)


def _check_yaml_shape(text: str, source: str) -> None:
    """Bound a YAML document before it is constructed: nesting depth, and the number of nodes it
    expands to when every alias is replaced by its anchor's node (an alias bomb is a few hundred
    bytes that expand to billions of nodes). Recursive aliases are refused. Walks PyYAML's event
    stream, which is iterative and linear in the text."""
    fast = getattr(yaml, "CSafeLoader", None)  # libyaml's events: fast
    if fast is not None:
        try:
            return _scan_events(yaml.parse(text, Loader=fast), source)
        except yaml.YAMLError:
            pass  # malformed: scan again with PyYAML, whose error messages safe_load's match
    _scan_events(yaml.parse(text, Loader=yaml.SafeLoader), source)


def _scan_events(events, source: str) -> None:
    sizes: dict[str, int] = {}  # anchor -> expanded nodes of its node
    stack: list[list] = []  # open collections: [anchor, expanded nodes so far]
    total = 0
    for ev in events:
        if isinstance(ev, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            if len(stack) >= MAX_YAML_DEPTH:
                raise SpecError(
                    f"{source}: YAML nested deeper than {MAX_YAML_DEPTH} levels at line {ev.start_mark.line + 1}"
                )
            stack.append([ev.anchor, 1])
            total += 1
            continue
        if isinstance(ev, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            anchor, n = stack.pop()
            if anchor is not None:
                sizes[anchor] = n
        elif isinstance(ev, yaml.ScalarEvent):
            n = 1
            total += 1
            if ev.anchor is not None:
                sizes[ev.anchor] = 1
        elif isinstance(ev, yaml.AliasEvent):
            if any(a == ev.anchor for a, _ in stack):
                raise SpecError(
                    f"{source}: recursive YAML alias *{_one_line(ev.anchor)} at line {ev.start_mark.line + 1}"
                )
            n = sizes.get(ev.anchor, 1)  # an undefined alias: composing reports it
            total += n
        else:
            continue
        if stack:
            stack[-1][1] += n
        if total > MAX_YAML_NODES:
            raise SpecError(
                f"{source}: YAML expands to more than {MAX_YAML_NODES} nodes (alias bomb?); a spec is a short file"
            )


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with the same key twice (PyYAML keeps the last
    one silently: a spec with two ``insert_at:`` lines would build something the reader did not see)."""

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue  # unhashable keys fail in construct_mapping with their own error
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, source: str, invalid: str = "invalid YAML") -> Any:
    """``yaml.safe_load`` (plain data: tags that construct Python objects are refused; a key
    given twice in one mapping is refused) behind ``_check_yaml_shape``; every failure is a
    one-line ``SpecError`` naming ``source`` (``invalid``: how it calls text that is not YAML)."""
    try:
        _check_yaml_shape(text, source)
        loader = _UniqueKeyLoader(text)  # a SafeLoader: what yaml.safe_load runs, plus the duplicate check
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or first_line(e)
        if isinstance(e, yaml.constructor.ConstructorError) and "constructor for the tag" in problem:
            tag = problem.split("tag", 1)[1].strip()
            problem = f"{tag} is not allowed: a spec is plain data (no YAML tags that build objects)"
            problem = f"YAML tag {problem}"
        raise SpecError(_one_line(f"{source}: {invalid}{where}: {problem}")) from None
    except (ValueError, OverflowError, RecursionError) as e:  # e.g. a 5000-digit int, a 13th month
        raise SpecError(_one_line(f"{source}: invalid YAML value ({type(e).__name__}: {str(e)[:120]})")) from None


def apply_overrides(data: Any, overrides: Sequence[str], source: str) -> Any:
    """torchtune-style overrides on a spec's YAML tree: each ``dotted.key=value`` sets that key
    (intermediate mappings are created), the value parsed as YAML (``4``, ``bfloat16``,
    ``[q_proj, v_proj]``, ``{r: 8}``). Returns a new tree; ``SpecError`` naming the override for
    a malformed one. The result is validated like the file (``parse_spec``)."""
    import copy

    if not overrides:
        return data
    if not isinstance(data, dict):
        raise SpecError(f"{source}: the spec must be a mapping to take overrides")
    data = copy.deepcopy(data)
    for item in overrides:
        key, eq, raw = item.partition("=")
        parts = key.strip().split(".")
        if not eq or not all(part.strip() for part in parts):
            raise SpecError(f"override {_short(item)}: expected dotted.key=value, e.g. modalities.image.insert_at=4")
        # the value is parsed as a spec file is (load_yaml: size, nesting and alias-expansion limits,
        # plain data only): an override is as hostile as a file
        if len(raw) > MAX_SPEC_BYTES:
            raise SpecError(f"override {_short(item)}: the value is longer than {MAX_SPEC_BYTES} characters")
        value = load_yaml(raw, f"override {_short(item)}", "the value is not YAML") if raw.strip() else None
        node = data
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SpecError(f"override {_short(item)}: {'.'.join(parts[: i + 1])} is not a mapping in the spec")
        node[parts[-1]] = value
    return data


def load_spec(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Spec:
    """Read and validate a YAML spec file (`yaml.safe_load`: no Python object tags), with
    ``apply_overrides`` applied first; an invalid overridden field's error names the override."""
    from composer import shipped

    p = shipped.spec_path(str(path))
    if p is None:
        raise SpecError(f"{path}: spec file not found (nor a shipped spec: `compose ls` lists them)")
    if p.stat().st_size > MAX_SPEC_BYTES:
        raise SpecError(f"{p}: spec file is larger than {MAX_SPEC_BYTES} bytes")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    data = apply_overrides(load_yaml(text, str(p)), overrides, str(p))
    try:
        spec = parse_spec(data, str(p))
    except SpecError as e:
        field = str(e).removeprefix(f"{p}: ").split(":", 1)[0]
        hit = [o for o in overrides if field == (k := o.partition("=")[0].strip()) or field.startswith(k + ".")]
        if hit:
            raise SpecError(f"{e} (set by the override {_short(hit[-1])})") from None
        raise
    spec._source_dir = Path(os.path.abspath(p)).parent  # not resolve(): HF cache files are symlinks into blobs/
    return spec
