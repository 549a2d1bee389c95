"""composer.train: training a ComposedModel (``compose train``).

- ``config``: ``TrainConfig``, a run's settings (pydantic; imports no torch)
- ``loop``: ``train(model, TrainConfig)``, stages, LoRA merge, the optimizer step
- ``data``: JSONL records, masked labels, the collator
- ``distributed``: DDP / FSDP2 / DeepSpeed engines under torchrun or accelerate launch
- ``checkpoints``: pickle-free trainer checkpoints with exact resume
- ``profile``: ``compose train --profile``, a step at the spec's insert_at vs 0

``from composer.train import train, TrainConfig, merge_lora`` is the public face (imported on
first use: ``import composer.train`` alone, or ``composer.train.config``, loads no torch).
"""

from __future__ import annotations

from composer.lazy import lazy_attributes

_LAZY = {
    "TrainConfig": "composer.train.config",
    "apply_stage": "composer.train.loop",
    "merge_lora": "composer.train.loop",
    "train": "composer.train.loop",
}

__all__ = sorted(_LAZY)

__getattr__ = lazy_attributes(__name__, _LAZY)
