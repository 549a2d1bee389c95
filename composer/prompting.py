"""Prompts in, padded model inputs out; shared by the torch model and the ONNX pipeline."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from composer.errors import InputError


def prepare_batch(tokenizer, prompts: str | list[str], *, placeholder_ids: dict[str, int], num_tokens: dict[str, int],
                  placeholders: dict[str, str], preprocess: dict[str, Callable[[list], torch.Tensor]],
                  padding_side: str = "left", **modality_items) -> dict[str, Any]:
    """Tokenise, expand each placeholder to ``num_tokens[m]`` slots, pad, preprocess media.

    Items of a modality are given in prompt order, row after row. Raises ``InputError`` when
    the number of placeholders and items differ or a modality is unknown.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise InputError("no prompts given")
    if padding_side not in ("left", "right"):
        raise InputError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    extra = sorted(set(modality_items) - set(placeholder_ids))
    if extra:
        raise InputError(f"unknown modality {extra}; this model has {sorted(placeholder_ids)}")
    modality_of = {pid: m for m, pid in placeholder_ids.items()}
    counts = {m: 0 for m in placeholder_ids}
    rows = []
    for prompt in prompts:
        row = []
        for t in tokenizer(prompt, add_special_tokens=True)["input_ids"]:
            m = modality_of.get(t)
            if m is None:
                row.append(t)
            else:
                counts[m] += 1
                row.extend([t] * num_tokens[m])
        rows.append(row)
    batch: dict[str, Any] = {}
    for m, n in counts.items():
        items = modality_items.get(m)
        items = [] if items is None else list(items) if isinstance(items, (list, tuple)) else [items]
        if len(items) != n:
            raise InputError(f"{m}: the prompts contain {n} {placeholders[m]!r} placeholder(s) but {len(items)} {m} item(s) were given")
        if n:
            batch[m] = preprocess[m](items)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if padding_side == "left" else slice(0, len(r))
        ids[i, sl] = torch.tensor(r, dtype=torch.long)
        mask[i, sl] = 1
    return {"input_ids": ids, "attention_mask": mask, **batch}
