"""Composed checkpoints: a directory that reloads bit-identically, offline, with no pickle.

    DIR/
      spec.yaml           the spec as written (validated), for provenance and rebuilding
      composer.json       format version, resolved component configs (LLM, encoders),
                          placeholder token ids, MM token counts, insertion layers
      model.safetensors   every weight of the ComposedModel (shared/tied tensors handled)
      tokenizer/          tokenizer files, placeholders included
      processors/<m>/     each modality's preprocessor config

Writes go to a temporary sibling directory that is renamed into place when complete.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from composer.errors import InputError
from composer.spec import parse_spec

if TYPE_CHECKING:
    from composer.model import ComposedModel

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"


def atomic_dir(out_dir: Path, overwrite: bool):
    """Context manager yielding a temp dir that replaces ``out_dir`` on success."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
            raise InputError(f"{out_dir}: exists and is not empty (pass overwrite=True / --overwrite)")
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)

    return cm()


def save_pretrained(model: ComposedModel, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    from safetensors.torch import save_model

    from composer.adapters import encoder_type_of

    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite) as tmp:
        (tmp / "spec.yaml").write_text(model.spec.to_yaml())
        meta = {
            "format_version": FORMAT_VERSION,
            "name": model.spec.name,
            "llm_config": model.llm.config.to_dict(),
            "encoder_configs": {m: e.config_dict() for m, e in model.encoders.items()},
            "encoder_types": {m: encoder_type_of(e) for m, e in model.encoders.items()},
            "placeholder_ids": model.placeholder_ids,
            "num_tokens": {m: model.num_tokens(m) for m in model.encoders},
            "insert_at": model.insert_at,
        }
        (tmp / "composer.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        save_model(model, str(tmp / WEIGHTS), metadata={"format": "pt", "composer_format": str(FORMAT_VERSION)})
        model.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        for m, proc in model.processors.items():
            proc.save_pretrained(str(tmp / "processors" / m))
    return out_dir


def _untied(model, missing: list[str]) -> list[str]:
    """Drop missing keys that share storage with a loaded tensor (tied embeddings are saved once)."""
    state = model.state_dict()
    loaded = {state[k].data_ptr() for k in state if k not in set(missing)}
    return [k for k in missing if state[k].data_ptr() not in loaded]


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / "composer.json").is_file()


def load_pretrained(path: str | Path) -> ComposedModel:
    """Rebuild the architecture from the saved configs (no download, no weight init), then load
    ``model.safetensors`` strictly."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model
    from transformers import AutoConfig

    from composer.adapters import ENCODER_ADAPTERS
    from composer.builder import build

    root = Path(path)
    meta_file = root / "composer.json"
    if not meta_file.is_file():
        raise InputError(f"{root}: not a composer checkpoint (no composer.json)")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{meta_file}: invalid JSON ({e})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{meta_file}: unknown format_version {meta.get('format_version')!r} (this composer reads {FORMAT_VERSION})")
    import yaml

    spec = parse_spec(yaml.safe_load((root / "spec.yaml").read_text()), str(root / "spec.yaml"))
    llm_cfg = dict(meta["llm_config"])
    enc_cfgs = {}
    for m, cfg in meta["encoder_configs"].items():
        enc_cfgs[m] = ENCODER_ADAPTERS[meta["encoder_types"][m]].config_from_dict(cfg)
    saved = {
        "llm_config": AutoConfig.for_model(llm_cfg.pop("model_type"), **llm_cfg),
        "encoder_configs": enc_cfgs,
        "encoder_types": meta["encoder_types"],
        "tokenizer_dir": root / "tokenizer",
        "processor_dirs": {m: root / "processors" / m for m in spec.modalities},
    }
    model = build(spec, saved=saved)
    weights = root / WEIGHTS
    if not weights.is_file():
        raise InputError(f"{weights}: missing")
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise InputError(f"{weights}: cannot load ({str(e).splitlines()[0]})") from None
    missing = _untied(model, missing)
    if missing or unexpected:
        raise InputError(f"{weights}: does not match the spec (missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    if model.placeholder_ids != meta["placeholder_ids"]:
        raise InputError(f"{root / 'tokenizer'}: placeholder ids {model.placeholder_ids} differ from composer.json {meta['placeholder_ids']}")
    return model.eval()
