"""Spec -> ComposedModel. Small builders turn each spec section into ready modules.

Components come from closed registries (``LLM_ADAPTERS``, ``ENCODER_ADAPTERS``,
``build_projector``); a spec can never name code. ``trust_remote_code`` is always off.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from composer.adapters import ENCODER_ADAPTERS
from composer.adapters.encoder import maybe_no_init
from composer.adapters.llm import LLM_ADAPTERS, llm_adapter_for
from composer.errors import InputError, SpecError, first_line
from composer.gguf import gguf_config, is_gguf, load_gguf_llm, load_gguf_tokenizer, resolve_gguf
from composer.model import ComposedModel
from composer.packages import converted_source, is_package_ref
from composer.projectors import build_projector, load_projector_weights
from composer.refs import is_hub_repo, parse_source
from composer.spec import (
    ENCODER_MODEL_TYPES,
    MULTI_LAYER_ENCODERS,
    EncoderSpec,
    LLMSpec,
    LoraSpec,
    Spec,
    load_spec,
    one_layer_only,
    split_revision,
)
from composer.tokenizer import add_placeholders, byte_tokenizer, load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_source(
    value: str, base_dir: Path | None, *, weights: bool = True, where: str | None = None, offline: bool = False
) -> str:
    """A local dir relative to the spec file wins over a Hub id of the same spelling (as HF does
    with the working directory). A pinned Hub id ``owner/name@<commit>`` (``pin_revisions`` has
    resolved the revision) becomes its snapshot dir in the HF cache: configs and tokenizer files,
    plus the weights when ``weights`` (``offline``: the cached snapshot as it is). A spec inside
    the HF cache (a Hub repo's snapshot) may only name files inside that snapshot."""
    root = hub_snapshot_root(base_dir) if base_dir is not None else None
    if base_dir is not None:
        check_confined(value, base_dir, where)
    if base_dir is not None and not Path(value).is_absolute() and (base_dir / value).exists():
        return os.path.abspath(base_dir / value)  # not resolve(): HF cache files are symlinks to suffix-less blobs
    if root is not None and not is_hub_repo(value):
        # a spec from the Hub naming a file its repo does not have: never fall back to the CWD
        raise SpecError(
            f"{where or 'spec'}: {value!r} is not in the Hub repo the spec came from ({root}); a spec from the "
            "Hub may only name files inside its repo, or Hub ids"
        )
    repo, rev = split_revision(value)
    if rev is not None and not Path(value).exists():
        from composer.hub.sources import pinned_snapshot

        return str(pinned_snapshot(repo, rev, where=where or value, weights=weights, offline=offline))
    return value


def hub_snapshot_root(base_dir: Path) -> Path | None:
    """The snapshot dir (``<HF cache>/models--o--n/snapshots/<commit>``) holding ``base_dir``, or
    None when ``base_dir`` is not inside the Hugging Face cache. Directories are compared by their
    real paths (a cache reached through a symlink is still the cache); the snapshot dirs are real
    directories, only the files in them are symlinks into ``blobs/``."""
    from huggingface_hub import constants

    base = Path(os.path.realpath(base_dir))
    for cache in {os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE, constants.HF_HUB_CACHE}:
        try:
            parts = base.relative_to(os.path.realpath(cache)).parts
        except ValueError:
            continue
        if len(parts) >= 3 and parts[1] == "snapshots":
            return Path(os.path.realpath(cache), *parts[:3])
        return base
    return None


def check_confined(value: str, base_dir: Path, where: str | None) -> None:
    """Refuse an absolute path, or a relative one that leaves the repo with ``..``, in a spec
    that came from the Hub (whose ``base_dir`` is in the HF cache): a downloaded spec must not
    read the user's other files. Local specs are trusted as the user's own files."""
    root = hub_snapshot_root(base_dir)
    if root is None:
        return
    target = os.path.normpath(os.path.join(os.path.realpath(base_dir), value))
    if Path(value).is_absolute() or os.path.commonpath([target, str(root)]) != str(root):
        raise SpecError(
            f"{where or 'spec'}: {value!r} points outside the Hub repo the spec came from ({root}); "
            "a spec from the Hub may only name files inside its repo, or Hub ids"
        )


def _config_error(where: str, e: Exception) -> SpecError:
    """An inline config that transformers refuses -> one line naming the field when it can."""
    import re

    text = str(e).strip() or type(e).__name__
    field = re.search(r"field '(\w+)'", text)
    path = f"{where}.{field.group(1)}" if field else where
    return SpecError(f"{path}: {text.splitlines()[-1].strip()}")


def hub_fields(spec: Spec):
    """(field path, owning section, attribute) of every spec field that may name a Hub id."""
    yield "llm.model", spec.llm, "model"
    if spec.llm.tokenizer is not None:
        yield "llm.tokenizer.model", spec.llm.tokenizer, "model"
    if spec.llm.lora is not None:
        yield "llm.lora.weights", spec.llm.lora, "weights"
    for name, mod in spec.modalities.items():
        yield f"modalities.{name}.encoder.model", mod.encoder, "model"
        yield f"modalities.{name}.projector.weights", mod.projector, "weights"
        if mod.encoder.lora is not None:
            yield f"modalities.{name}.encoder.lora.weights", mod.encoder.lora, "weights"


def pin_revisions(spec: Spec, offline: bool = False) -> Spec:
    """Resolve every ``owner/name@revision`` of ``spec`` to ``owner/name@<commit hash>`` (the Hub's
    answer, or the HF cache's offline), in a copy: the saved spec.yaml then names exactly what was
    loaded. ``spec`` itself when nothing is pinned. A local path of the same spelling is not a pin."""
    base = spec.source_dir

    def pin(value: str | None) -> tuple[str, str, str] | None:
        """(repo, revision, what follows the revision: "" or "/file.gguf") of a pinned Hub value."""
        ref = parse_source(value, base) if value is not None else None
        if ref is None or not ref.is_hub or ref.revision is None:
            return None  # a local path of the same spelling is not a pin
        return ref.repo, ref.revision, f"/{ref.filename}" if ref.filename else ""

    if not any(pin(getattr(obj, attr)) for _, obj, attr in hub_fields(spec)):
        return spec
    from composer.hub.sources import resolve_revision

    spec = spec.model_copy(deep=True)  # keeps the source dir
    seen: dict[str, str] = {}
    for where, obj, attr in hub_fields(spec):
        value = getattr(obj, attr)
        parts = pin(value)
        if parts is not None:
            if value not in seen:
                repo, rev, rest = parts
                seen[value] = f"{repo}@{resolve_revision(repo, rev, where=where, offline=offline)}{rest}"
            setattr(obj, attr, seen[value])
    return spec


EMBEDDED_CONFIGS = Path(__file__).parent / "hf_configs"


def config_source(src: str, where: str, offline: bool) -> str:
    """Where to read a component's config from. Offline: a local dir, else the HF cache, else
    the config embedded in composer for the seed specs (``composer/hf_configs/<org>/<name>``)."""
    if not offline or Path(src).is_dir():
        return src
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(src, "config.json", cache_dir=os.environ.get("HF_HUB_CACHE"))
    if isinstance(cached, str):
        return str(Path(cached).parent)
    if (EMBEDDED_CONFIGS / src / "config.json").is_file():
        return str(EMBEDDED_CONFIGS / src)
    raise InputError(
        f"{where}: {src!r} is not in the local Hugging Face cache and composer embeds no config for it"
        " (inspect needs the network or a cached copy)"
    )


def _hf_error(where: str, source: str, e: Exception) -> InputError:
    first = first_line(e)
    return InputError(f"{where}: cannot load {source!r}: {first}")


# -- LLM ----------------------------------------------------------------------------------------
def llm_config(spec: LLMSpec, base_dir: Path | None, offline: bool = False):
    from transformers import AutoConfig

    if spec.config is not None:
        cfg = dict(spec.config)
        mt = cfg.pop("model_type")
        try:
            return AutoConfig.for_model(mt, **cfg)
        except Exception as e:  # ValueError/TypeError, or huggingface_hub's strict-dataclass errors
            raise _config_error("llm.config", e) from None
    if is_gguf(spec.model):
        return gguf_config(resolve_gguf(spec.model, base_dir, "llm.model", offline=offline), "llm.model")
    src = resolve_source(spec.model, base_dir, weights=False, where="llm.model", offline=offline)
    src = config_source(src, "llm.model", offline)
    try:
        return AutoConfig.from_pretrained(src, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise _hf_error("llm.model", src, e) from None


def build_llm(
    spec: LLMSpec, base_dir: Path | None, *, config=None, load_weights: bool = True, offline: bool = False
) -> nn.Module:
    """The HF causal LM: pretrained (``llm.model``) or from a config (random init, or no init
    when the weights come from a composed checkpoint)."""
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[spec.dtype]
    cfg = config if config is not None else llm_config(spec, base_dir, offline)
    if cfg.model_type not in LLM_ADAPTERS:
        raise SpecError(f"llm: model_type {cfg.model_type!r} is not supported; supported: {sorted(LLM_ADAPTERS)}")
    if spec.model is not None and load_weights and is_gguf(spec.model):
        path = resolve_gguf(spec.model, base_dir, "llm.model")
        return load_gguf_llm(path, "llm.model", dtype=dtype, attn_implementation=spec.attn_implementation)
    if spec.model is not None and load_weights:
        src = resolve_source(spec.model, base_dir, where="llm.model")
        try:
            return AutoModelForCausalLM.from_pretrained(
                src, dtype=dtype, attn_implementation=spec.attn_implementation, trust_remote_code=False
            )
        except (OSError, ValueError, RuntimeError) as e:
            raise _hf_error("llm.model", src, e) from None
    try:
        with maybe_no_init(not load_weights):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=spec.attn_implementation)
    except (ValueError, TypeError, RuntimeError) as e:  # e.g. negative or inconsistent sizes in an inline config
        raise _config_error("llm.config", e) from None
    model.tie_weights()  # skipped by no_init_weights; tied weights are saved once
    return model


# -- encoders ----------------------------------------------------------------------------------
def encoder_type(spec: EncoderSpec, where: str, config=None) -> str:
    if spec.type is not None:
        return spec.type
    mt = config.model_type if config is not None else None
    if mt not in ENCODER_MODEL_TYPES:
        raise SpecError(
            f"{where}.type: cannot infer the encoder type from model_type {mt!r}; "
            f"set `type` to one of {sorted(ENCODER_ADAPTERS)}"
        )
    return ENCODER_MODEL_TYPES[mt]


def build_encoder(
    spec: EncoderSpec,
    where: str,
    base_dir: Path | None,
    *,
    config=None,
    load_weights: bool = True,
    processor_dir: Path | None = None,
    load_processor: bool = True,
    etype: str | None = None,
    offline: bool = False,
):
    """-> (encoder adapter module, preprocessor or None). ``config``/``etype`` given: a saved
    checkpoint's, and nothing is looked up at ``encoder.model``."""
    if spec.model and config is None and is_package_ref(spec.model):
        # a file a Python package ships (spec validation requires `type`): converted once into the
        # type's HF layout and cached (composer.packages)
        adapter = ENCODER_ADAPTERS[spec.type]
        src = converted_source(
            spec.model,
            spec.type,
            adapter.convert_package_source,
            f"{where}.model",
            files=adapter.package_source_files,
        )
    elif spec.model and config is None:
        src = resolve_source(spec.model, base_dir, weights=load_weights, where=f"{where}.model", offline=offline)
    else:
        src = None
    if src is not None and not load_weights:
        src = config_source(src, f"{where}.model", offline)
    if etype is not None:
        pass
    elif spec.type is not None:
        etype = spec.type
    elif src is not None:
        etype = encoder_type(spec, where, _hub_config(src, f"{where}.model"))
    else:
        etype = encoder_type(spec, where, _InlineType(spec.config))
    if isinstance(spec.feature_layer, list) and etype not in MULTI_LAYER_ENCODERS:
        raise SpecError(f"{where}.feature_layer: {one_layer_only(etype)} (got {spec.feature_layer})")
    adapter = ENCODER_ADAPTERS[etype]
    if config is None:
        try:
            config = adapter.load_config(src) if src is not None else adapter.config_from_dict(spec.config)
        except Exception as e:  # OSError/ValueError/TypeError, or huggingface_hub's strict-dataclass errors
            if src is None:
                raise _config_error(f"{where}.config", e) from None
            if not isinstance(e, (OSError, ValueError, TypeError)):
                raise
            raise _hf_error(f"{where}.model", src, e) from None
    dtype = DTYPES[spec.dtype] if spec.dtype else None
    try:
        adapter.check_config(config)
    except ValueError as e:
        raise SpecError(f"{where}: {e}" if src is None else f"{where}.model: {src}: {e}") from None
    try:
        enc = adapter.create(config, spec, src=src, dtype=dtype, load_weights=load_weights)
    except ValueError as e:
        if src is not None and load_weights:
            raise _hf_error(f"{where}.model", src, e) from None
        raise SpecError(f"{where}: {e}") from None
    except (OSError, RuntimeError) as e:
        if src is None:  # an inline config torch cannot build (e.g. a negative size it derives)
            raise _config_error(f"{where}.config", e) from None
        raise _hf_error(f"{where}.model", str(src), e) from None
    if not load_processor:
        return enc, None
    try:
        if processor_dir is not None:
            proc = adapter.load_processor(str(processor_dir))
        else:
            proc = adapter.make_processor(config, src, dict(spec.processor or {}))
    except (OSError, ValueError, TypeError) as e:
        raise _hf_error(f"{where}.processor", str(processor_dir or src or "inline"), e) from None
    return enc, proc


def _hub_config(src: str, where: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(src, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise _hf_error(where, src, e) from None


class _InlineType:
    def __init__(self, cfg: dict | None):
        self.model_type = (cfg or {}).get("model_type")


# -- training modes -----------------------------------------------------------------------------
def apply_lora(module: nn.Module, lora: LoraSpec, where: str) -> nn.Module:
    """Inject peft LoRA layers in place (module names and the HF key layout are kept)."""
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        layers_to_transform=list(lora.layers) if lora.layers else None,
    )
    try:
        module = inject_adapter_in_model(cfg, module)
    except ValueError as e:
        field = "layers" if lora.layers else "target_modules"
        raise SpecError(f"{where}.lora.{field}: {first_line(e)}, got {getattr(lora, field)}") from None
    return module


PEFT_ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # what peft's save_pretrained writes


def load_lora_weights(module: nn.Module, value: str, base_dir: Path | None, where: str) -> None:
    """Load trained LoRA adapters (``lora.weights``) into ``module``, whose adapters ``apply_lora``
    injected: a peft adapter file, or a directory (a Hub repo) holding ``adapter_model.safetensors``.
    Keys as peft writes them (``base_model.model.`` prefix or none, no adapter name); every adapter
    tensor of the spec must be there with its shape, and nothing else (a different ``r``,
    ``target_modules`` or ``layers`` names the first difference)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from composer.hf_weights import check_state
    from composer.projectors import read_weights

    path = Path(resolve_source(value, base_dir, where=where))
    if path.is_dir():
        path = next((path / f for f in PEFT_ADAPTER_FILES if (path / f).is_file()), path / PEFT_ADAPTER_FILES[0])
    state = {k.removeprefix("base_model.model."): v for k, v in read_weights(path, "LoRA weights").items()}
    want = get_peft_model_state_dict(module)
    try:
        hint = "; check r, target_modules and layers"
        check_state(want, dict(sorted(state.items())), f"{where}: {path}", "spec's LoRA", show=3, hint=hint)
    except ValueError as e:
        raise InputError(str(e)) from None
    set_peft_model_state_dict(module, {k: v.to(want[k].dtype) for k, v in state.items()})


def set_trainable(module: nn.Module, mode: str) -> None:
    for name, p in module.named_parameters():
        p.requires_grad_(mode == "full" or (mode == "lora" and "lora_" in name))


# -- the whole model ------------------------------------------------------------------------------
def build(
    spec: Spec | str | Path,
    *,
    saved: dict[str, Any] | None = None,
    shape_only: bool = False,
    offline: bool = False,
    meta_weights: bool = False,
) -> ComposedModel:
    """Build a trainable ``ComposedModel`` from a spec (or a spec file path).

    ``saved`` (internal, from ``from_pretrained``): resolved component configs and file dirs of a
    composed checkpoint; then nothing is downloaded and no weights are initialised.
    ``shape_only``: the architecture on the meta device (no weights, no tokenizer download), for
    counting parameters and FLOPs (``compose inspect``); with ``offline`` configs come from a
    local dir, the HF cache or composer's embedded configs (``config_source``).
    ``meta_weights``: the architecture on the meta device with the real tokenizer and processors,
    no weights read: the ranks but 0 of a low-memory distributed load (``Engine.wrap`` fills them).
    """
    if not isinstance(spec, Spec):
        spec = load_spec(spec)
    if saved is None:
        spec = pin_revisions(spec, offline=offline)  # `owner/name@rev` -> `owner/name@<commit hash>`
    if shape_only or meta_weights:
        with torch.device("meta"):
            return _build(spec, saved, load=False, shape_only=shape_only, offline=offline)
    return _build(spec, saved, load=saved is None, shape_only=False, offline=False)


def _build(spec: Spec, saved: dict[str, Any] | None, *, load: bool, shape_only: bool, offline: bool) -> ComposedModel:
    base_dir = spec.source_dir
    torch.manual_seed(spec.seed)

    llm = build_llm(
        spec.llm, base_dir, config=saved["llm_config"] if saved else None, load_weights=load, offline=offline
    )
    adapter = llm_adapter_for(llm)
    n_layers, width = adapter.shape.num_layers, adapter.shape.hidden_size
    if spec.llm.lora is not None and spec.llm.lora.layers and max(spec.llm.lora.layers) >= n_layers:
        raise SpecError(f"llm.lora.layers: must be < the LLM's {n_layers} layers, got {spec.llm.lora.layers}")
    for name, mod in spec.modalities.items():
        if mod.insert_at >= n_layers:
            raise SpecError(f"modalities.{name}.insert_at: must be < the LLM's {n_layers} layers, got {mod.insert_at}")

    if saved:
        tokenizer = load_tokenizer(str(saved["tokenizer_dir"]), "tokenizer", local=True)
    elif spec.llm.tokenizer.type == "byte" or shape_only:
        tokenizer = byte_tokenizer()
    elif is_gguf(spec.llm.tokenizer.model or spec.llm.model):
        where = "llm.tokenizer.model" if spec.llm.tokenizer.model else "llm.model"
        tokenizer = load_gguf_tokenizer(
            resolve_gguf(spec.llm.tokenizer.model or spec.llm.model, base_dir, where), where
        )
    else:
        src = resolve_source(spec.llm.tokenizer.model or spec.llm.model, base_dir, weights=False, where="llm.tokenizer")
        tokenizer = load_tokenizer(src, "llm.tokenizer")

    encoders, projectors, processors = {}, {}, {}
    for name, mod in spec.modalities.items():
        where = f"modalities.{name}"
        enc, proc = build_encoder(
            mod.encoder,
            f"{where}.encoder",
            base_dir,
            config=saved["encoder_configs"][name] if saved else None,
            load_weights=load,
            processor_dir=saved["processor_dirs"][name] if saved else None,
            load_processor=not shape_only,
            etype=saved["encoder_types"][name] if saved else None,
            offline=offline,
        )
        proj = build_projector(mod.projector, enc.hidden_size, width)
        if mod.projector.weights and load:
            src = resolve_source(mod.projector.weights, base_dir, where=f"{where}.projector.weights")
            load_projector_weights(proj, Path(src), f"{where}.projector.weights")
        proj = proj.to(DTYPES[mod.encoder.dtype or spec.llm.dtype])
        encoders[name], projectors[name], processors[name] = enc, proj, proc

    placeholders = [m.placeholder for m in spec.modalities.values()]
    ids = add_placeholders(tokenizer, placeholders)
    placeholder_ids = {name: ids[m.placeholder] for name, m in spec.modalities.items()}

    if spec.llm.train == "lora":
        llm = apply_lora(llm, spec.llm.lora, "llm")
        if spec.llm.lora.weights and load:
            load_lora_weights(llm, spec.llm.lora.weights, base_dir, "llm.lora.weights")
    set_trainable(llm, spec.llm.train)
    for name, mod in spec.modalities.items():
        if mod.encoder.train == "lora":
            where = f"modalities.{name}.encoder"
            encoders[name] = apply_lora(encoders[name], mod.encoder.lora, where)
            if mod.encoder.lora.weights and load:
                load_lora_weights(encoders[name], mod.encoder.lora.weights, base_dir, f"{where}.lora.weights")
        set_trainable(encoders[name], mod.encoder.train)
        set_trainable(projectors[name], mod.projector.train)

    model = ComposedModel(spec, llm, encoders, projectors, tokenizer, processors, placeholder_ids)
    for name in spec.modalities:
        if model.num_tokens(name) < 1:  # fail now, not at the first batch, if the shapes do not compose
            raise SpecError(
                f"modalities.{name}: the encoder and projector give no tokens per item "
                "(e.g. encoder image_size smaller than patch_size)"
            )
    n_ids = len(tokenizer) - len(placeholders)  # placeholders may lie past the vocabulary: never embedded
    if spec.llm.tokenizer.type == "byte" and not saved and n_ids > adapter.shape.vocab_size:
        raise SpecError(
            f"llm.config.vocab_size: must be >= the byte tokenizer's {n_ids} ids, got {adapter.shape.vocab_size}"
        )
    return model
