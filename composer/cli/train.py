"""`compose train`: its training options are generated from ``TrainConfig``'s fields
(``composer.options``); only TARGET, OVERRIDES and the options that are no training settings
(``--profile``, ``--low-memory``) are written here."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from composer.cli.common import console
from composer.errors import InputError
from composer.options import collect, flag_of, model_options
from composer.train.config import TrainConfig

# compose train's spellings and click types of TrainConfig fields (the others: --batch-size, --lr, ...)
TRAIN_FLAGS = {"output": ("-o", "--output"), "save_weights": "--save", "on_bad_record": "--skip-bad-records=skip"}
TRAIN_TYPES = {
    "data": click.Path(dir_okay=False),
    "output": click.Path(file_okay=False),
    "eval_data": click.Path(dir_okay=False),
    "media_root": click.Path(file_okay=False),
    "stage": click.IntRange(1, 2),
}
# TrainConfig fields that are no options: for tests and library callers
NOT_OPTIONS = ("stop_after", "progress", "extra")


@click.command()
@click.argument("target")
@click.argument("overrides", nargs=-1)
@model_options(TrainConfig, flags=TRAIN_FLAGS, types=TRAIN_TYPES, skip=NOT_OPTIONS, defaults=True)
@click.option(
    "--profile", is_flag=True, help="Measure a training step at the spec's insert_at vs 0 and print time and FLOPs."
)
@click.option(
    "--low-memory/--no-low-memory",
    default=True,
    show_default=True,
    help="Under torchrun/accelerate launch: only rank 0 reads the weights; the other ranks build the model on "
    "the meta device and receive them (under FSDP, straight into their shards: no rank but 0 holds the full model).",
)
def train(target: str, overrides: tuple[str, ...], profile: bool, low_memory: bool, **settings: Any) -> None:
    """Train TARGET (a spec or a composed checkpoint) on --data; the result in OUTPUT reloads
    with `ComposedModel.from_pretrained(OUTPUT)` and exports with `compose export OUTPUT`.

    \b
    Example:
      compose train specs/tiny/llava.yaml --data data/train.jsonl -o out/trained --max-steps 100 --save-every 50

    \b
    On several devices or machines, launch the same command on every rank (--batch-size is per rank):
      torchrun --nproc-per-node 8 -m composer.cli train ...
      accelerate launch --config_file configs/accelerate/fsdp_8gpu.yaml -m composer.cli train ...
    """
    from composer.checkpoint import check_output_apart, load_any
    from composer.train.loop import train as run_train

    try:  # checked before the model loads; messages name the flags
        cfg = TrainConfig(**collect(TrainConfig, settings, skip=NOT_OPTIONS))
    except InputError as e:
        raise InputError(flag_of(str(e), TrainConfig, TRAIN_FLAGS)) from None
    if Path(target).is_dir():  # a checkpoint trained into itself would be overwritten as it is read
        check_output_apart(cfg.output, {"checkpoint": target})
    con = console()
    if profile:
        from composer.train.profile import profile_training

        for line in profile_training(target, cfg):
            con.print(line)
        return
    from composer.train.distributed import rank_zero_loads

    model = load_any(target, overrides=overrides, meta_weights=low_memory and not rank_zero_loads())
    summary = run_train(model, cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        _print_summary(con, summary, cfg.output)


def _print_summary(con, summary: dict, out: str) -> None:
    """Rank 0's report of a finished run: the loss from first to last step, peak host memory, where it went."""
    losses = summary["losses"]
    if losses:
        ranks = f" on {summary['world_size']} ranks" if summary["world_size"] > 1 else ""
        con.print(
            f"trained {summary['steps']} steps{ranks} ({summary['precision']}): "
            f"loss {losses[0]:.4f} -> {losses[-1]:.4f}"
            + (f", eval loss {summary['eval_loss']:.4f}" if "eval_loss" in summary else "")
        )
    peaks = summary.get("peak_host_memory_mib")
    if peaks:
        per_rank = lambda ms: ", ".join(f"{m:,.0f}" for m in ms)  # noqa: E731
        con.print(f"peak host memory per rank: loading {per_rank(peaks['load'])} MiB; run {per_rank(peaks['run'])} MiB")
    con.print(f"saved the trained model to {out} (metrics: {out}/metrics.jsonl)")
