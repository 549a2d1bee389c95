"""composer.train: training a ComposedModel (``compose train``).

- ``loop``: ``train(model, TrainConfig)``, stages, LoRA merge, the optimizer step
- ``data``: JSONL records, masked labels, the collator
- ``distributed``: DDP / FSDP2 / DeepSpeed engines under torchrun or accelerate launch
- ``checkpoints``: pickle-free trainer checkpoints with exact resume
- ``profile``: ``compose train --profile``, a step at the spec's insert_at vs 0

``from composer.train.loop import train, TrainConfig, merge_lora`` is the public face.
"""

from composer.train.loop import TrainConfig, apply_stage, merge_lora, train

__all__ = ["TrainConfig", "apply_stage", "merge_lora", "train"]
