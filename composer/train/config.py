"""``TrainConfig``: the settings of a training run, ``composer.train.train``'s argument.

One pydantic model owns each setting's name, type, default, constraint and description: the
library validates them when a config is made (one ``InputError`` naming the field: ``lr: must be
> 0, got -1.0``), and ``compose train`` generates its options from the fields
(``composer.options``), naming the flag instead (``--lr: must be > 0, got -1.0``). Imports no
torch.
"""

from __future__ import annotations

import logging
import os
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from composer.errors import InputError, validation_message

log = logging.getLogger("composer.train")

Precision = Literal["auto", "fp32", "bf16", "fp16"]
SaveDtype = Literal["spec", "float32"]
PRECISIONS = typing.get_args(Precision)
SAVE_DTYPES = typing.get_args(SaveDtype)


class TrainConfig(BaseModel):
    """A training run's settings (``compose train``'s options: ``batch_size`` is ``--batch-size``).
    Validated when made and again when the run starts (``check``): a value that would train
    nothing, or silently wrong, is one ``InputError`` naming the field, before any output is
    touched. Paths may be given as ``os.PathLike``; they are kept as strings."""

    model_config = ConfigDict(extra="forbid", strict=True)

    data: str = Field(description="Training JSONL (LLaVA, LTU or generic records).")
    output: str = Field(description="Output dir: final model, checkpoints/, metrics.jsonl.")
    eval_data: str | None = Field(None, description="Held-out JSONL for eval loss.")
    stage: int | None = Field(
        None, ge=1, le=2, description="1: projectors only; 2: projectors + LLM (the spec's lora/full)."
    )
    epochs: int = Field(1, ge=1, description="Passes over the data.")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps (overrides `epochs`).")
    batch_size: int = Field(4, ge=1, description="Records per micro-batch, per rank.")
    grad_accum: int | None = Field(
        None,
        ge=1,
        description="Micro-batches per optimizer step (default: the accelerate config's "
        "gradient_accumulation_steps, else 1).",
    )
    lr: float = Field(2e-4, gt=0, allow_inf_nan=False, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False, description="AdamW weight decay.")
    warmup_ratio: float = Field(
        0.03, ge=0, lt=1, allow_inf_nan=False, description="Share of the steps that warm the learning rate up."
    )
    scheduler: str = Field("cosine", description="transformers scheduler name (cosine, linear, constant, ...).")
    max_grad_norm: float = Field(1.0, ge=0, allow_inf_nan=False, description="Clip the gradient norm to this.")
    precision: Precision = Field(
        "auto",
        description="Autocast compute dtype (trainable weights stay fp32); auto = the accelerate config's, else "
        "bf16 on CUDA where supported, bf16 on CPU for a bf16 model, else fp32. fp16: CUDA only.",
    )
    save_dtype: SaveDtype = Field(
        "spec", description="The saved model's trainable weights: in the spec's dtype, or the fp32 master weights."
    )
    num_workers: int = Field(
        0,
        ge=0,
        description="DataLoader worker processes that collate batches (tokenise, decode and preprocess media) "
        "ahead of the training step (0: in the training process).",
    )
    prefetch_factor: int = Field(2, ge=1, description="Batches each worker prepares ahead.")
    grad_checkpointing: bool = Field(False, description="Recompute activations in backward (less memory).")
    save_every: int = Field(0, ge=0, description="Checkpoint every N steps (0: none).")
    save_weights: Literal["full", "trainable"] = Field(
        "full",
        description="The saved model: every weight, or only what the spec's pretrained sources do not provide "
        "(LoRA, projectors, trained encoders); the frozen weights are then loaded from the spec's sources.",
    )
    save_total_limit: int | None = Field(
        None, ge=1, description="Keep only the newest N training checkpoints (default: all)."
    )
    max_shard_size: str = Field(
        "50GB",
        description="The saved model's weights are split into model-0000i-of-0000N.safetensors shards (with an "
        "index) past this size.",
    )
    eval_every: int = Field(0, ge=0, description="Eval loss on `eval_data` every N steps (0: at the end only).")
    log_every: int = Field(1, ge=1, description="A metrics.jsonl record every N steps (and at each eval).")
    resume: bool = Field(False, description="Continue from the latest checkpoint in the output dir's checkpoints/.")
    overwrite: bool = Field(
        False, description="Train from scratch into a non-empty output dir (its old checkpoints/ are removed)."
    )
    on_bad_record: Literal["fail", "skip"] = Field(
        "fail", description="A bad record (unreadable, or its media missing): fail the run, or skip it with a warning."
    )
    media_root: str | None = Field(None, description="Resolve media paths here (default: next to `data`).")
    max_length: int | None = Field(
        None, ge=1, description="Most tokens an example may have; a longer one is an error (default: no limit)."
    )
    merge_lora: bool = Field(False, description="Fold LoRA into the weights of the saved model.")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of the data order and dropout, in [0, 2**32 - 1].")
    strategy: Literal["auto", "ddp", "fsdp", "deepspeed"] = Field(
        "auto",
        description="Under torchrun/accelerate launch: DDP, FSDP or DeepSpeed (auto: the accelerate config's, "
        "else DDP).",
    )
    stop_after: int | None = Field(
        None, ge=1, description="Stop (as if interrupted) after this many steps: tests and dry runs."
    )
    progress: bool = Field(True, description="Show a progress bar.")
    extra: dict[str, Any] = Field(default_factory=dict, description="Anything else to record in train_config.json.")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise InputError(validation_message(e, unknown="unknown setting")) from None

    @field_validator("data", "output", "eval_data", "media_root", mode="before")
    @classmethod
    def _path_as_str(cls, v: Any) -> Any:
        return os.fspath(v) if isinstance(v, os.PathLike) else v

    @model_validator(mode="after")
    def _cross_field(self) -> TrainConfig:
        if self.save_weights == "trainable" and self.merge_lora:
            raise InputError(
                "merge_lora: folds LoRA into the LLM's weights, which `save_weights` trainable leaves to their "
                "source: use one or the other"
            )
        from transformers import SchedulerType  # here: only once the fields are valid

        names = [t.value for t in SchedulerType]
        if self.scheduler not in names:
            raise InputError(f"scheduler: must be one of {names}, got {self.scheduler!r}")
        return self

    def check(self) -> None:
        """Resolve ``grad_accum`` from the launcher, then validate every field again (a field set
        after the config was made too); called before a run touches any output."""
        self.grad_accum = launcher_grad_accum(self.grad_accum)
        type(self)(**self.model_dump())


def launcher_grad_accum(flag: int | None) -> int:
    """``--grad-accum`` when given, else what ``accelerate launch`` exports from its config
    (``ACCELERATE_GRADIENT_ACCUMULATION_STEPS``: a DeepSpeed config's ``gradient_accumulation_steps``),
    else 1. A flag that disagrees with the config wins, with a warning."""
    raw = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "").strip()
    env = None
    if raw and raw.lower() != "auto":
        try:
            env = int(raw)
        except ValueError:
            raise InputError(
                f"ACCELERATE_GRADIENT_ACCUMULATION_STEPS={raw!r} (the accelerate config's gradient_accumulation_steps) "
                "is not an integer"
            ) from None
    if flag is None:
        return 1 if env is None else env
    if env is not None and env != flag:
        log.warning("--grad-accum %d overrides the accelerate config's gradient_accumulation_steps %d", flag, env)
    return flag
