"""The `compose` command line: thin commands over the library.

Errors print one line on stderr and exit 2 (bad input) or 1 (runtime failure); `--debug`
shows the traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from composer.checkpoint import load_any
from composer.errors import ComposerError, InputError, first_line
from composer.export.quantize import SCHEMES as QUANT_SCHEMES
from composer.generation import resolve_generation
from composer.options import collect, flag_of, model_options
from composer.spec import GenerationSpec

# compose generate's spellings of GenerationSpec fields (the others: --max-new-tokens, --top-p, ...)
GENERATION_FLAGS = {"do_sample": "--sample/--greedy", "stop_strings": "--stop"}


def _console(stderr: bool = False):
    from rich.console import Console

    con = Console(stderr=stderr, highlight=False, markup=False)  # names from specs are text, not rich markup
    if not con.is_terminal:
        con.width = max(con.width, 120)  # logs and pipes: do not wrap the tables
    return con


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.version_option(package_name="mm-composer", prog_name="compose")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Compose multimodal LMs from a YAML spec (DeepInsert: modality tokens enter at layer k).

    \b
    Example:
      compose build specs/tiny/llava.yaml -o out/tiny-llava
      compose inspect out/tiny-llava
    """
    ctx.obj = {"debug": debug}


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("overrides", nargs=-1)
@click.option(
    "-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Checkpoint directory to write."
)
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists and is not empty.")
@click.option(
    "--max-shard-size",
    default="50GB",
    show_default=True,
    help="Weights past this size are written as model-0000i-of-0000N.safetensors shards with an index.",
)
def build(spec: Path, overrides: tuple[str, ...], out: Path, overwrite: bool, max_shard_size: str) -> None:
    """Resolve SPEC (with OVERRIDES: `dotted.key=value` settings, YAML values), instantiate the
    model, save a composed checkpoint to OUTPUT (its spec.yaml records the overrides' result).

    \b
    Example:
      compose build specs/tiny/llava.yaml -o out/tiny-llava
      compose build specs/tiny/llava.yaml modalities.image.insert_at=3 llm.dtype=bfloat16 -o out/tiny-k3
    """
    from composer.analysis.summary import render, summarize
    from composer.builder import build as build_model
    from composer.checkpoint import atomic_dir  # noqa: F401  (fail early on a non-empty OUTPUT)
    from composer.spec import load_spec

    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise InputError(f"{out}: exists and is not empty (pass --overwrite)")
    con = _console()
    with con.status(f"building {spec}"):
        model = build_model(load_spec(spec, overrides))
    render(*summarize(model), con)
    with con.status(f"saving to {out}"):
        model.save_pretrained(out, overwrite=overwrite, max_shard_size=max_shard_size)
    con.print(f"saved composed checkpoint to {out}")


@cli.command()
@click.argument("target")
@click.argument("overrides", nargs=-1)
@click.option("--text-tokens", default=64, show_default=True, help="Text length assumed by the FLOPs estimate.")
@click.option("--json", "as_json", is_flag=True, help="Print the facts as JSON.")
@click.option(
    "--offline", is_flag=True, help="No network: configs from local dirs, the HF cache or composer's embedded configs."
)
def inspect(target: str, overrides: tuple[str, ...], text_tokens: int, as_json: bool, offline: bool) -> None:
    """Components, parameters (trainable/frozen), insertion layers, FLOPs saving of TARGET
    (a spec file or a composed checkpoint). A spec is inspected on the meta device: no weights load.

    \b
    Example:
      compose inspect specs/tiny/llava.yaml
      compose inspect specs/llava.yaml --offline
    """
    from composer.analysis.summary import render, summarize

    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    model = load_any(target, shape_only=True, offline=offline, overrides=overrides)
    rows, facts = summarize(model, text_tokens)
    if as_json:
        click.echo(json.dumps(facts, indent=2))
    else:
        render(rows, facts, _console())


@cli.command()
@click.argument("target")
@click.argument("overrides", nargs=-1)
@click.option("--text-tokens", default=64, show_default=True, help="Text tokens in the prompt.")
@click.option("--mm-tokens", type=int, default=None, help="MM tokens in the prompt (default: one item per modality).")
@click.option("--offline", is_flag=True, help="No network: configs from local dirs, the HF cache or embedded configs.")
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write a PNG of the savings (needs matplotlib; else a text sparkline is printed).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
def plan(
    target: str,
    overrides: tuple[str, ...],
    text_tokens: int,
    mm_tokens: int | None,
    offline: bool,
    plot_path: str | None,
    as_json: bool,
) -> None:
    """Analytic prefill FLOPs, per-token decode FLOPs and KV-cache memory for every insertion
    layer k of TARGET (a spec or checkpoint), with the saving vs k = 0.

    \b
    Example:
      compose plan specs/llava.yaml --offline --text-tokens 64
    """
    from composer.analysis.plan import DTYPE_BYTES, as_dicts, plot_png, sparkline
    from composer.analysis.plan import plan as make_plan

    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    model = load_any(target, shape_only=True, offline=offline, overrides=overrides)
    shape = model.adapter.shape
    mm = mm_tokens if mm_tokens is not None else sum(model.num_tokens(m) for m in model.encoders)
    rows = make_plan(shape, text_tokens, mm, DTYPE_BYTES[model.spec.llm.dtype])
    if as_json:
        click.echo(
            json.dumps(
                {
                    "name": model.spec.name,
                    "text_tokens": text_tokens,
                    "mm_tokens": mm,
                    "num_layers": shape.num_layers,
                    "rows": as_dicts(rows),
                },
                indent=2,
            )
        )
        return
    from rich.table import Table

    con = _console()
    t = Table(
        title=f"{model.spec.name}: {text_tokens} text + {mm} MM tokens, {shape.num_layers} layers", title_justify="left"
    )
    for col in ("k", "prefill GFLOPs", "saving", "decode GFLOPs/token", "saving", "KV cache MiB", "saving"):
        t.add_column(col, justify="right")
    current = set(model.insert_at.values())
    for r in rows:
        t.add_row(
            f"{r.k}{' *' if r.k in current else ''}",
            f"{r.prefill_flops / 1e9:.2f}",
            f"{r.prefill_saving:.1%}",
            f"{r.decode_flops / 1e9:.3f}",
            f"{r.decode_saving:.1%}",
            f"{r.kv_bytes / 2**20:.1f}",
            f"{r.kv_saving:.1%}",
        )
    con.print(t)
    con.print("* the spec's insert_at")
    if plot_path and plot_png(rows, plot_path, model.spec.name):
        con.print(f"wrote {plot_path}")
    else:
        if plot_path:
            con.print("matplotlib is not installed: text plot instead")
        con.print(f"prefill saving by k: |{sparkline([r.prefill_saving for r in rows])}|")


@cli.command()
@click.argument("target")
@click.argument("overrides", nargs=-1)
@click.option(
    "--data", required=True, type=click.Path(dir_okay=False), help="Training JSONL (LLaVA, LTU or generic records)."
)
@click.option(
    "-o",
    "--output",
    "out",
    required=True,
    type=click.Path(file_okay=False),
    help="Output dir: final model, checkpoints/, metrics.jsonl.",
)
@click.option("--eval-data", type=click.Path(dir_okay=False), default=None, help="Held-out JSONL for eval loss.")
@click.option(
    "--stage",
    type=click.IntRange(1, 2),
    default=None,
    help="1: projectors only; 2: projectors + LLM (the spec's lora/full).",
)
@click.option("--epochs", type=int, default=1, show_default=True)
@click.option("--max-steps", type=int, default=None, help="Optimizer steps (overrides --epochs).")
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option(
    "--grad-accum",
    type=int,
    default=None,
    help="Micro-batches per optimizer step (default: the accelerate config's gradient_accumulation_steps, else 1).",
)
@click.option("--lr", type=float, default=2e-4, show_default=True)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--warmup-ratio", type=float, default=0.03, show_default=True)
@click.option(
    "--scheduler",
    default="cosine",
    show_default=True,
    help="transformers scheduler name (cosine, linear, constant, ...).",
)
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
    default="auto",
    show_default=True,
    help="Autocast compute dtype (trainable weights stay fp32); auto = the accelerate config's, else bf16 on "
    "CUDA where supported, bf16 on CPU for a bf16 model, else fp32. fp16: CUDA only.",
)
@click.option(
    "--save-dtype",
    type=click.Choice(["spec", "float32"]),
    default="spec",
    show_default=True,
    help="The saved model's trainable weights: in the spec's dtype, or the fp32 master weights.",
)
@click.option(
    "--num-workers",
    type=int,
    default=0,
    show_default=True,
    help="DataLoader worker processes that collate batches (tokenise, decode and preprocess media) ahead of "
    "the training step (0: in the training process).",
)
@click.option("--prefetch-factor", type=int, default=2, show_default=True, help="Batches each worker prepares ahead.")
@click.option("--grad-checkpointing", is_flag=True, help="Recompute activations in backward (less memory).")
@click.option("--save-every", type=int, default=0, show_default=True, help="Checkpoint every N steps (0: none).")
@click.option(
    "--save",
    "save_weights",
    type=click.Choice(["full", "trainable"]),
    default="full",
    show_default=True,
    help="The saved model: every weight, or only what the spec's pretrained sources do not provide (LoRA, "
    "projectors, trained encoders); the frozen weights are then loaded from the spec's sources.",
)
@click.option(
    "--save-total-limit", type=int, default=None, help="Keep only the newest N training checkpoints (default: all)."
)
@click.option(
    "--max-shard-size",
    default="50GB",
    show_default=True,
    help="The saved model's weights are split into model-0000i-of-0000N.safetensors shards (with an index) "
    "past this size.",
)
@click.option("--eval-every", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in OUTPUT/checkpoints.")
@click.option(
    "--overwrite", is_flag=True, help="Train from scratch into a non-empty OUTPUT (its old checkpoints/ are removed)."
)
@click.option("--skip-bad-records", is_flag=True, help="Warn and skip bad records instead of failing.")
@click.option(
    "--media-root",
    type=click.Path(file_okay=False),
    default=None,
    help="Resolve media paths here (default: next to --data).",
)
@click.option("--merge-lora", is_flag=True, help="Fold LoRA into the weights of the saved model.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--profile", is_flag=True, help="Measure a training step at the spec's insert_at vs 0 and print time and FLOPs."
)
@click.option(
    "--strategy",
    type=click.Choice(["auto", "ddp", "fsdp", "deepspeed"]),
    default="auto",
    show_default=True,
    help="Under torchrun/accelerate launch: DDP, FSDP or DeepSpeed (auto: the accelerate config's, else DDP).",
)
@click.option(
    "--low-memory/--no-low-memory",
    default=True,
    show_default=True,
    help="Under torchrun/accelerate launch: only rank 0 reads the weights; the other ranks build the model on "
    "the meta device and receive them (under FSDP, straight into their shards: no rank but 0 holds the full model).",
)
def train(
    target: str,
    overrides: tuple[str, ...],
    data: str,
    out: str,
    eval_data: str | None,
    stage: int | None,
    epochs: int,
    max_steps: int | None,
    batch_size: int,
    grad_accum: int | None,
    lr: float,
    weight_decay: float,
    warmup_ratio: float,
    scheduler: str,
    precision: str,
    save_dtype: str,
    num_workers: int,
    prefetch_factor: int,
    grad_checkpointing: bool,
    save_every: int,
    save_weights: str,
    save_total_limit: int | None,
    max_shard_size: str,
    eval_every: int,
    resume: bool,
    overwrite: bool,
    skip_bad_records: bool,
    media_root: str | None,
    merge_lora: bool,
    seed: int,
    profile: bool,
    strategy: str,
    low_memory: bool,
) -> None:
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
    from composer.checkpoint import check_output_apart
    from composer.train.loop import TrainConfig
    from composer.train.loop import train as run_train

    if Path(target).is_dir():  # a checkpoint trained into itself would be overwritten as it is read
        check_output_apart(out, {"checkpoint": target})

    cfg = TrainConfig(
        data=data,
        output=out,
        eval_data=eval_data,
        stage=stage,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        weight_decay=weight_decay,
        warmup_ratio=warmup_ratio,
        scheduler=scheduler,
        precision=precision,
        save_dtype=save_dtype,
        num_workers=num_workers,
        prefetch_factor=prefetch_factor,
        grad_checkpointing=grad_checkpointing,
        save_every=save_every,
        save_weights=save_weights,
        save_total_limit=save_total_limit,
        max_shard_size=max_shard_size,
        eval_every=eval_every,
        resume=resume,
        overwrite=overwrite,
        on_bad_record="skip" if skip_bad_records else "fail",
        media_root=media_root,
        merge_lora=merge_lora,
        seed=seed,
        strategy=strategy,
    )
    con = _console()
    if profile:
        from composer.train.profile import profile_training

        for line in profile_training(target, cfg):
            con.print(line)
        return
    from composer.train.distributed import rank_zero_loads

    model = load_any(target, overrides=overrides, meta_weights=low_memory and not rank_zero_loads())
    summary = run_train(model, cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return
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


@cli.command()
@click.argument("checkpoint", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Bundle directory to write."
)
@click.option(
    "--verify",
    is_flag=True,
    help="Compare ONNX Runtime with torch before the bundle replaces OUTPUT; past tolerance: exit 1, OUTPUT unchanged.",
)
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--opset", type=int, default=None, help="ONNX opset (default: the exporter's).")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists and is not empty.")
@click.option(
    "--quantize",
    type=click.Choice(list(QUANT_SCHEMES)),
    default=None,
    help="Quantize the LLM graphs' linear layers: int8/int4 weights block-wise (ONNX Runtime MatMulNBits); "
    "w8a8 int8 weights x per-token int8 activations, calibrated (SmoothQuant, top channels fp32; fast CPU prefill).",
)
@click.option(
    "--block-size", type=int, default=32, show_default=True, help="With --quantize int8/int4: weights per scale."
)
@click.option(
    "--accuracy-level",
    type=int,
    default=4,
    show_default=True,
    help="With --quantize int8/int4: MatMulNBits activation precision (4: int8, fast on CPU; 1: fp32, slow).",
)
@click.option("--keep-head", is_flag=True, help="With --quantize: leave the LM head in full precision.")
@click.option(
    "--calibration",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="With --quantize w8a8: calibrate on this JSONL file (the training formats, with real images/audio) "
    "instead of the built-in prompts.",
)
@click.option(
    "--calibration-samples",
    type=click.IntRange(1),
    default=None,
    help="With --calibration: how many of its first records to run (default 32).",
)
@click.option(
    "--fp32-channels",
    type=int,
    default=None,
    help="With --quantize w8a8: the largest calibration channels of each input kept in fp32 (default 16; 0: none).",
)
@click.option(
    "--smooth-alpha",
    type=float,
    default=None,
    help="With --quantize w8a8: SmoothQuant's migration strength on the other channels, 0-1 (default 0.5).",
)
@click.option(
    "--min-top1",
    type=click.FloatRange(0, 1),
    default=None,
    help="With --verify on a quantized bundle: least top-1 agreement with fp32 torch (default 0.95).",
)
@click.option(
    "--atol",
    type=click.FloatRange(0),
    default=None,
    help="With --verify on a quantized bundle: largest logit difference allowed.",
)
def export(
    checkpoint: Path,
    out: Path,
    verify: bool,
    dtype: str,
    opset: int | None,
    overwrite: bool,
    quantize: str | None,
    block_size: int,
    accuracy_level: int,
    keep_head: bool,
    calibration: Path | None,
    calibration_samples: int | None,
    fp32_channels: int | None,
    smooth_alpha: float | None,
    min_top1: float | None,
    atol: float | None,
) -> None:
    """Export a composed CHECKPOINT as a split ONNX bundle (encoders, early text, late multimodal).

    \b
    Examples:
      compose export out/tiny-llava -o out/tiny-llava.onnx --verify
      compose export out/tiny-llava -o out/tiny-llava.int8.onnx --quantize int8 --verify
      compose export out/tiny-llava -o out/tiny-llava.w8a8.onnx --quantize w8a8 --calibration data.jsonl --verify
    """
    from composer.checkpoint import load_pretrained
    from composer.export.exporter import export_onnx
    from composer.targets import resolve

    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise InputError(f"{out}: exists and is not empty (pass --overwrite)")
    con = _console()
    from composer.checkpoint import check_output_apart

    check_output_apart(out, {"checkpoint": checkpoint})
    model = load_pretrained(resolve(checkpoint, accept=("checkpoint",)).path)
    previous = out.exists() and (not out.is_dir() or any(out.iterdir()))
    with con.status("exporting") as status:

        def verify_before_replacing(tmp: Path) -> None:
            """--verify on the complete bundle in its temp dir: a failure leaves OUTPUT as it was."""
            from composer.export.verify import verify_bundle

            status.update("verifying against torch")
            report = verify_bundle(model, tmp, min_top1=min_top1, atol=atol)
            try:
                _print_verify_report(con, report)
            except ComposerError as e:
                kept = f"the previous {out} is left as it was" if previous else f"nothing was written to {out}"
                raise ComposerError(f"{e}; the unverified bundle was removed and {kept}") from None

        export_onnx(
            model,
            out,
            dtype=dtype,
            opset=opset,
            overwrite=overwrite,
            progress=lambda s: status.update(s),
            quantize=quantize,
            block_size=block_size,
            accuracy_level=accuracy_level,
            keep_head=keep_head,
            calibration=calibration,
            calibration_samples=calibration_samples,
            fp32_channels=fp32_channels,
            smooth_alpha=smooth_alpha,
            check=verify_before_replacing if verify else None,
        )
    from composer.export.manifest import read_manifest

    manifest = read_manifest(out)
    for st in manifest["stages"]:
        con.print(
            f"  {st['graph']:<28} layers [{st['start']}, {st['end']})"
            + (f"  + {', '.join(st['enter'])}" if st["enter"] else "")
        )
    for _m, e in manifest["encoders"].items():
        con.print(f"  {e['graph']:<28} {e['tokens_per_item']} tokens per item")
    con.print(f"wrote ONNX bundle to {out}" + (" (verified)" if verify else ""))


def _print_verify_report(con, report: dict) -> None:
    """--verify's report; ComposerError (exit 1) past tolerance."""
    if "top1_agreement" in report:
        _print_quantized_report(con, report)
        return
    for g, diff in report["graphs"].items():
        con.print(f"  max abs diff {g:<28} {diff:.3g}  (largest |value| {report['scales'][g]:.3g})")
    con.print(
        f"  max abs diff prefill logits (end to end)  {report['prefill_logits']:.3g}  "
        f"(largest |value| {report['logits_scale']:.3g})"
    )
    con.print(f"  greedy tokens ({report['greedy_tokens']}) equal torch: {report['greedy_match']}")
    tol = report["tolerance"]
    if not report["ok"]:
        raise ComposerError(
            f"verification failed: a difference exceeds {tol:g} x max(1, largest |value|) or greedy tokens differ"
        )
    con.print(f"verified: every difference within {tol:g} x max(1, largest |value|)")


def _print_quantized_report(con, r: dict) -> None:
    con.print(
        f"  {r['quantization']} vs fp32 torch on {r['prompts']} prompts ({r['positions']} text positions): "
        f"top-1 agreement {r['top1_agreement']:.2%} ({round(r['top1_agreement'] * r['positions'])} of "
        f"{r['positions']}), max logit difference {r['max_logit_diff']:.3g}, "
        f"mean KL {r['mean_kl']:.2g} nats, "
        f"greedy tokens equal {r['greedy_agreement']:.1%} ({r['greedy_tokens']} per prompt)"
    )
    limits = f"top-1 >= {r['min_top1']:.1%}" + (f", logit difference <= {r['atol']:g}" if r["atol"] is not None else "")
    if not r["ok"]:
        raise ComposerError(f"verification failed: want {limits} (set --min-top1 / --atol)")
    con.print(f"verified: {limits}")


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("target")
@click.option("--prompt", default=None, help="Instruction; wrapped in the spec's prompt template unless --raw.")
@click.option(
    "--input",
    "input_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help='JSONL of {"prompt": ..., "<modality>": path} records to answer (instead of --prompt).',
)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None, help="With --input.")
@click.option("--overwrite", is_flag=True, help="With --input: replace OUTPUT if it exists.")
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True, help="Records per batch (--input).")
@click.option(
    "--media-root",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Media paths of --input records resolve under it (default: the input file's directory).",
)
@click.option("--raw", is_flag=True, help="Use PROMPT as the full prompt (it must contain the placeholders).")
@model_options(GenerationSpec, flags=GENERATION_FLAGS)
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed.")
@click.option(
    "--provider",
    type=click.Choice(["cpu", "cuda"]),
    default="cpu",
    show_default=True,
    help="ONNX Runtime provider (bundles only).",
)
@click.option("--device", default=None, help="cpu, cuda or cuda:N (checkpoints only; default cpu).")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default=None,
    help="Run a checkpoint in this dtype (default: as saved).",
)
@click.pass_context
def generate(
    ctx: click.Context,
    target: str,
    prompt: str | None,
    input_file: Path | None,
    output: Path | None,
    overwrite: bool,
    batch_size: int,
    media_root: Path | None,
    raw: bool,
    seed: int,
    provider: str,
    device: str | None,
    dtype: str | None,
    **generation: Any,
) -> None:
    """Generate text from TARGET, a composed checkpoint (torch) or an ONNX bundle (ONNX Runtime);
    one `--<modality> FILE` per item (a SMILES string for a molecule encoder: `--molecule CCO`).
    Tokens are printed as they are produced. With `--input FILE -o OUT`, every record of a JSONL
    file is answered in batches (`--batch-size`) and written to OUT, one line per record: its
    `answer`, or the `error` that record has (the other records still run).

    \b
    Example:
      compose generate out/tiny-llava --image specs/tiny/assets/red_circle.png --prompt "What shape is it?"
      compose generate out/tiny-llava.onnx --image specs/tiny/assets/red_circle.png --prompt "What shape is it?"
      compose generate out/tiny-llava --input questions.jsonl -o answers.jsonl --batch-size 16
    """
    import torch
    from transformers import TextStreamer

    from composer.checkpoint import load_pretrained
    from composer.targets import resolve

    if (prompt is None) == (input_file is None):
        raise InputError("give --prompt, or --input FILE with -o OUT")
    if prompt is not None:
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:  # bytes the locale could not decode arrive as lone surrogates
            raise InputError("--prompt: not valid UTF-8 text") from None
    if input_file is not None and output is None:
        raise InputError("--input needs -o OUT (the answers' JSONL file)")
    if input_file is None and (output is not None or overwrite):
        raise InputError("-o/--overwrite go with --input FILE (a --prompt's answer is printed)")
    if input_file is not None:
        from composer.batch import check_output

        check_output(input_file, output, overwrite)  # before the model loads
    from composer.spec import MAX_SEED

    if not 0 <= seed <= MAX_SEED:
        raise InputError(f"--seed {seed}: must be in [0, 2**64 - 1]")
    kind = resolve(target, accept=("checkpoint", "bundle")).kind
    items = _modality_args(ctx.args, text_ok=_text_modalities(target))
    if kind == "bundle":
        from composer.export.runtime import OnnxPipeline

        if device is not None or dtype is not None:
            raise InputError("--device/--dtype apply to checkpoints; a bundle runs on --provider in its exported dtype")
        model = OnnxPipeline(target, provider=provider)
    else:
        model = load_pretrained(target)
        model = model.to(device=_torch_device(device), dtype=getattr(torch, dtype) if dtype else None)
    overrides = collect(GenerationSpec, generation)
    try:  # checked before any input is read; messages name the flags
        g = resolve_generation(model.generation_spec, **overrides)
    except InputError as e:
        raise InputError(flag_of(str(e), GenerationSpec, GENERATION_FLAGS)) from None
    settings = dict(overrides, generator=torch.Generator().manual_seed(seed))
    if input_file is not None:
        from composer.batch import generate_jsonl

        if items:
            raise InputError("with --input, media come from the records, not --<modality> options")
        counts = generate_jsonl(
            model,
            input_file,
            output,
            batch_size=batch_size,
            raw=raw,
            media_root=media_root,
            overwrite=overwrite,
            **settings,
        )
        click.echo(f"wrote {output}: {counts['answered']} answered, {counts['failed']} failed", err=True)
        return
    unknown = sorted(set(items) - set(model.encoders))
    if unknown:
        raise InputError(
            f"unknown option(s) {['--' + u for u in unknown]}; this model takes {['--' + m for m in model.encoders]}"
        )
    text = prompt if raw else model.format_prompt(prompt, items={m: len(v) for m, v in items.items()})
    batch = model.prepare([text], **items)
    if g.num_return_sequences == 1:  # streamed as the tokens come
        model.generate(**batch, streamer=TextStreamer(model.tokenizer, skip_special_tokens=True), **settings)
        return
    for i, answer in enumerate(model.decode(model.generate(**batch, **settings)), 1):
        click.echo(f"[{i}] {answer.strip()}")


def _torch_device(device: str | None):
    import torch

    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {device!r}: want cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"--device {device!r}: want cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine")
    return dev


def _text_modalities(target: str) -> frozenset[str]:
    """Modalities of TARGET whose encoder takes text items, not files (`--molecule CCO`), read from
    its composer.json or manifest.json before the model loads, so that a mistyped file fails fast
    (unreadable: none; loading TARGET reports the error)."""
    from composer.adapters import text_modalities

    p = Path(target)
    try:
        if (p / "manifest.json").is_file():
            types = {m: e["type"] for m, e in json.loads((p / "manifest.json").read_text())["encoders"].items()}
        else:
            types = json.loads((p / "composer.json").read_text())["encoder_types"]
        return text_modalities(types)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return frozenset()


def _modality_args(args: list[str], text_ok: set[str] = frozenset()) -> dict[str, list[str]]:
    """`--image a.png --image b.png` -> {"image": ["a.png", "b.png"]} (modality names come from the model);
    values of the modalities in ``text_ok`` are text (e.g. SMILES), not files."""
    items: dict[str, list[str]] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or i + 1 >= len(args):
            raise InputError(f"unexpected argument {a!r}; expected --<modality> FILE")
        name, value = a[2:].replace("-", "_"), args[i + 1]
        if name not in text_ok and not Path(value).is_file():
            raise InputError(f"--{a[2:]} {value}: file not found")
        items.setdefault(name, []).append(value)
        i += 2
    return items


@cli.command(name="ls")
def ls_() -> None:
    """List the specs and accelerate configs shipped with composer, with what each is. Any command
    that takes a spec takes a shipped name (`compose build tiny/llava -o out/x`)."""
    from composer import shipped

    for kind, name, _, about in shipped.catalog():
        click.echo(f"{kind:<6} {name:<32} {about}")


@cli.command(name="cp")
@click.argument("name")
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace files that exist at DEST.")
def cp_(name: str, dest: Path, overwrite: bool) -> None:
    """Copy the shipped spec or config NAME (see `compose ls`) to DEST (a file or a directory) to
    edit, with the local files it names (trained weights, assets) next to it.

    \b
    Example:
      compose cp tiny/llava my_spec.yaml
      compose cp accelerate/fsdp_8gpu configs/
    """
    from composer import shipped

    for path in shipped.copy(name, dest, overwrite=overwrite):
        click.echo(f"wrote {path}")


@cli.command()
@click.argument("target")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (0.0.0.0: all).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--model-name", default=None, help="The model id clients send (default: the spec's name).")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1), help="Requests per batch (1: off).")
@click.option("--batch-wait-ms", default=10.0, show_default=True, type=click.FloatRange(0), help="Wait for more.")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(1), help="Waiting requests; 429 past.")
@click.option(
    "--max-tokens", default=1024, show_default=True, type=click.IntRange(1), help="Most tokens a request gets."
)
@click.option("--max-body-mb", default=20.0, show_default=True, type=click.FloatRange(0), help="Request body limit.")
@click.option("--max-image-pixels", default=4096 * 4096, show_default=True, type=click.IntRange(1))
@click.option("--max-audio-seconds", default=30.0, show_default=True, type=click.FloatRange(0))
@click.option(
    "--max-media-items", default=8, show_default=True, type=click.IntRange(0), help="Image/audio parts per request."
)
@click.option("--max-stop-chars", default=128, show_default=True, type=click.IntRange(1), help="Per stop string.")
@click.option(
    "--body-timeout-s", default=30.0, show_default=True, type=click.FloatRange(0, min_open=True),
    help="A request body not received within it: 408.",
)  # fmt: skip
@click.option(
    "--api-key", envvar="COMPOSE_API_KEY", default=None, show_envvar=True,
    help="Require `Authorization: Bearer KEY` on /v1/ routes (as OpenAI clients send api_key).",
)  # fmt: skip
@click.option(
    "--allowed-host", "allowed_hosts", multiple=True,
    help="Host header values accepted (repeatable; '*': any). Default: localhost names when --host is a "
    "loopback address, else any.",
)  # fmt: skip
@click.option(
    "--media-root",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Local image/audio paths in requests must lie under it (default: data: URLs only).",
)
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="Bundles only.")
@click.option(
    "--threads", type=click.IntRange(1), default=None, help="ONNX Runtime intra-op threads per graph (bundles only)."
)
@click.option(
    "--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"])
)
def serve(
    target: str,
    host: str,
    port: int,
    model_name: str | None,
    max_batch: int,
    batch_wait_ms: float,
    max_queue: int,
    max_tokens: int,
    max_body_mb: float,
    max_image_pixels: int,
    max_audio_seconds: float,
    max_media_items: int,
    max_stop_chars: int,
    body_timeout_s: float,
    api_key: str | None,
    allowed_hosts: tuple[str, ...],
    media_root: Path | None,
    provider: str,
    threads: int | None,
    log_level: str,
) -> None:
    """Serve TARGET (an ONNX bundle, or a composed checkpoint run with torch) over HTTP with
    OpenAI's chat-completions API, batching concurrent requests. SIGTERM or Ctrl-C finish the
    requests in flight, then exit. Needs the serve extra: pip install 'mm-composer[serve]'.

    \b
    Example:
      compose serve out/smol-demo.onnx --port 8000
      curl localhost:8000/v1/models
    """
    import signal
    import threading

    from composer.serve.protocol import Limits

    try:
        import uvicorn

        from composer.serve.app import create_app
    except ImportError as e:
        raise ComposerError(f"compose serve needs {e.name}: pip install 'mm-composer[serve]'") from None
    from composer.targets import resolve

    if resolve(target, accept=("checkpoint", "bundle")).kind == "bundle":
        from composer.export.runtime import OnnxPipeline, default_session_options

        runtime = OnnxPipeline(target, provider=provider, session_options=default_session_options(threads=threads))
    else:
        from composer.checkpoint import load_pretrained

        runtime = load_pretrained(target).eval()
    limits = Limits(
        max_body_bytes=int(max_body_mb * 2**20),
        max_image_pixels=max_image_pixels,
        max_audio_seconds=max_audio_seconds,
        max_media_items=max_media_items,
        max_stop_chars=max_stop_chars,
        body_timeout_s=body_timeout_s,
        max_tokens=max_tokens,
        max_queue=max_queue,
        media_root=media_root,
    )
    loopback = host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")
    hosts = list(allowed_hosts) or (["localhost", "127.0.0.1", "::1", host] if loopback else None)
    app = create_app(
        runtime,
        name=model_name,
        limits=limits,
        max_batch=max_batch,
        batch_wait_s=batch_wait_ms / 1000,
        api_key=api_key or None,
        allowed_hosts=hosts,
    )
    _check_port_free(host, port)
    # uvicorn handles SIGINT/SIGTERM (stop accepting, finish in-flight requests) and raises the
    # signal again once done: a no-op handler then lets `compose serve` exit 0 after a clean drain
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _check_port_free(host: str, port: int) -> None:
    """--host/--port as one error (exit 2) when the address cannot be bound, before uvicorn starts."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind((host, port))
        except OSError as e:
            raise InputError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None


@cli.command()
@click.argument("target", type=click.Path(file_okay=False, path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--revision", default=None, help="Branch to push to (created from main if needed).")
@click.option("-m", "--message", default=None, help="Commit message.")
@click.option("--create-pr", is_flag=True, help="Open a pull request against REVISION (default main) instead.")
@click.option("--include", multiple=True, help="Also push the files matching this glob (repeatable).")
@click.option(
    "--exclude", multiple=True, help="Leave out optional files matching this glob (metrics.jsonl, README.md)."
)
@click.option("--license", "license_", default=None, help="Model-card license (an SPDX-style Hub id: apache-2.0).")
@click.option(
    "--dataset", "datasets", multiple=True, help="Model-card training dataset (a Hub dataset id; repeatable)."
)
def push(
    target: Path,
    repo_id: str,
    private: bool,
    revision: str | None,
    message: str | None,
    create_pr: bool,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    license_: str | None,
    datasets: tuple[str, ...],
) -> None:
    """Push TARGET (a composer checkpoint or an ONNX bundle) to the Hub repo REPO_ID in one commit,
    with a generated model card and a config.json the Hub reads. Token: HF_TOKEN or `hf auth
    login`; HF_ENDPOINT is respected.

    \b
    Example:
      compose push out/tiny-llava alice/tiny-llava --license apache-2.0
      compose push out/tiny-llava.onnx alice/tiny-llava-onnx --private
      compose push out/tiny-llava alice/tiny-llava --create-pr --exclude metrics.jsonl
    """
    from composer.hub.publish import push_to_hub

    info = push_to_hub(
        target,
        repo_id,
        private=private,
        revision=revision,
        commit_message=message,
        create_pr=create_pr,
        include=include,
        exclude=exclude,
        license=license_,
        datasets=list(datasets),
    )
    where = f"{repo_id}" + (f"@{revision}" if revision else "")
    if create_pr:
        click.echo(f"opened a pull request on {where}: {info.pr_url} (commit {info.oid})")
    else:
        click.echo(f"pushed {target} to {where} (commit {info.oid})")


@cli.command()
@click.argument("repo_id")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Directory to write.")
@click.option("--revision", default=None, help="Branch, tag or commit hash (or write REPO_ID@REV).")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists and is not empty.")
def pull(repo_id: str, out: Path, revision: str | None, overwrite: bool) -> None:
    """Download a composer checkpoint or ONNX bundle from the Hub into OUTPUT (through the HF
    cache; with HF_HUB_OFFLINE=1 from the cache alone). Pickled weights are never downloaded.

    \b
    Example:
      compose pull alice/tiny-llava -o models/tiny-llava
      compose generate models/tiny-llava --image cat.png --prompt "What is it?"
    """
    from composer.hub.publish import pull as hub_pull

    path, sha = hub_pull(repo_id, out, revision=revision, overwrite=overwrite)
    click.echo(f"pulled {repo_id} (commit {sha}) to {path}")


@cli.command()
@click.argument("target")
@click.argument("overrides", nargs=-1)
@click.option(
    "--insert-at",
    "insert_at",
    type=int,
    multiple=True,
    help="Insertion layer k to compare with 0 (repeatable; default: the model's insert_at).",
)
@click.option(
    "--runtime",
    "runtimes",
    type=click.Choice(["onnx", "torch", "hf"]),
    multiple=True,
    help="Runtime to measure (repeatable; default: all three).",
)
@click.option("--text-tokens", default=64, show_default=True, help="Text tokens in the prompt.")
@click.option("--batch", default=1, show_default=True, help="Rows per generate call (identical prompts).")
@click.option("--new-tokens", default=16, show_default=True, help="Tokens generated per run (EOS ignored).")
@click.option(
    "--warmup", default=1, show_default=True, help="Untimed runs per configuration (peak memory is taken over them)."
)
@click.option("--repeats", default=5, show_default=True, help="Timed runs per configuration (round-robin).")
@click.option(
    "--provider",
    type=click.Choice(["cpu", "cuda"]),
    default="cpu",
    show_default=True,
    help="ONNX Runtime provider; torch and hf run on the same device.",
)
@click.option(
    "--ort-spinning/--no-ort-spinning",
    default=False,
    show_default=True,
    help="Let ONNX Runtime's idle intra-op threads busy-wait (its default; off here: with one session per "
    "graph the spinning threads take cores from the graph that runs).",
)
@click.option("--threads", type=int, default=None, help="Intra-op threads of torch and ONNX Runtime (default: theirs).")
@click.option("--seed", default=0, show_default=True, help="Seed of the random modality inputs.")
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the results as JSON here."
)
@click.option(
    "--quantize",
    type=click.Choice(list(QUANT_SCHEMES)),
    multiple=True,
    help="Also bench ONNX bundles quantized so (repeatable; see compose export --quantize).",
)
def bench(
    target: str,
    overrides: tuple[str, ...],
    insert_at: tuple[int, ...],
    runtimes: tuple[str, ...],
    text_tokens: int,
    batch: int,
    new_tokens: int,
    warmup: int,
    repeats: int,
    provider: str,
    ort_spinning: bool,
    threads: int | None,
    seed: int,
    json_path: str | None,
    quantize: tuple[str, ...],
) -> None:
    """Prefill latency, decode tokens/s and peak memory of TARGET (a spec or a checkpoint) with
    its MM tokens inserted at k vs 0: ONNX Runtime, composer's torch path and the HF reference
    (LlavaForConditionalGeneration), same weights and inputs, in one process.

    \b
    Example:
      compose bench specs/tiny/llava.yaml --insert-at 2 --repeats 3 --json bench.json
      compose bench benchmarks/mid_llava.yaml --insert-at 12
      compose bench benchmarks/mid_llava.yaml --insert-at 12 --quantize int8 --quantize int4
    """
    from composer.analysis.bench import RUNTIMES, BenchConfig, render, run_bench

    cfg = BenchConfig(
        insert_at=list(insert_at) or None,
        runtimes=tuple(runtimes) or RUNTIMES,
        text_tokens=text_tokens,
        batch=batch,
        new_tokens=new_tokens,
        warmup=warmup,
        repeats=repeats,
        provider=provider,
        ort_spinning=ort_spinning,
        threads=threads,
        seed=seed,
        quantize=tuple(quantize),
    )
    con = _console()
    with con.status(f"loading {target}") as status:
        model = load_any(target, overrides=overrides)
        result = run_bench(model, cfg, progress=status.update)
    render(result, con)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
        con.print(f"wrote {json_path}")


def _int_list(values: tuple[str, ...], option: str) -> list[int] | None:
    """`--layers 0,4 --layers 8` -> [0, 4, 8]."""
    out = []
    for v in values:
        for part in v.split(","):
            try:
                out.append(int(part))
            except ValueError:
                raise InputError(f"{option} {v}: expected integers separated by commas") from None
    return out or None


@cli.command()
@click.argument("target")
@click.argument("overrides", nargs=-1)
@click.option("--data", required=True, type=click.Path(dir_okay=False), help="JSONL records (LLaVA, LTU or generic).")
@click.option("--layers", multiple=True, help="Layers to probe and candidate k, e.g. 0,4,8,12 (default: every layer).")
@click.option("--max-records", default=64, show_default=True, help="Use the first N records.")
@click.option("--batch-size", default=4, show_default=True)
@click.option(
    "--max-loss-increase",
    default=0.05,
    show_default=True,
    help="Largest relative loss increase vs k = 0 that a recommended k may have.",
)
@click.option(
    "--media-root",
    type=click.Path(file_okay=False),
    default=None,
    help="Resolve media paths here (default: next to --data).",
)
@click.option(
    "--rule",
    type=click.Choice(["alignment", "loss"]),
    default="alignment",
    show_default=True,
    help="alignment: the first layer whose alignment reaches --align-fraction of the best; "
    "loss: the largest k within --max-loss-increase without retraining.",
)
@click.option("--align-fraction", default=0.9, show_default=True, help="With --rule alignment: the plateau fraction.")
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the results as JSON here."
)
def probe(
    target: str,
    overrides: tuple[str, ...],
    data: str,
    layers: tuple[str, ...],
    max_records: int,
    batch_size: int,
    max_loss_increase: float,
    media_root: str | None,
    rule: str,
    align_fraction: float,
    json_path: str | None,
) -> None:
    """Per-layer alignment of MM and text hidden states (IMA-style cosine) of a model trained at
    k = 0, and its loss on --data's responses with the MM tokens inserted at each candidate k
    without retraining; recommends k (--rule: where alignment plateaus, or the loss bound).

    \b
    Example:
      compose probe out/trained --data data/val.jsonl --layers 0,2,4,8,12 --json probe.json
    """
    from composer.analysis.probe import ProbeConfig, render, run_probe

    cfg = ProbeConfig(
        layers=_int_list(layers, "--layers"),
        max_records=max_records,
        batch_size=batch_size,
        max_loss_increase=max_loss_increase,
        media_root=media_root,
        rule=rule,
        align_fraction=align_fraction,
    )
    con = _console()
    with con.status(f"loading {target}") as status:
        model = load_any(target, overrides=overrides)
        result = run_probe(model, data, cfg, progress=status.update)
    render(result, con)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
        con.print(f"wrote {json_path}")


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C, so that temp outputs are removed on the way out."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated()


def main(argv: list[str] | None = None) -> None:
    import signal
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        _main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _printable(text: str) -> str:
    """``text`` with control and other non-printable characters escaped (``\\x1b``): an error message
    quotes file names and file contents, and a terminal must not run their escape sequences."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _main(argv: list[str] | None) -> None:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:]) or os.environ.get("COMPOSER_DEBUG") == "1"
    try:
        cli.main(args=argv, prog_name="compose", standalone_mode=False)
    except click.exceptions.Abort as e:  # click turns KeyboardInterrupt (Ctrl-C, and SIGTERM here) into Abort
        if isinstance(e.__cause__, _Terminated):
            click.echo("error: terminated (SIGTERM)", err=True)
            sys.exit(143)
        click.echo("error: interrupted" if isinstance(e.__cause__, KeyboardInterrupt) else "error: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except ComposerError as e:
        if debug:
            raise
        click.echo(f"error: {_printable(str(e))}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt as e:
        click.echo("error: terminated (SIGTERM)" if isinstance(e, _Terminated) else "error: interrupted", err=True)
        sys.exit(143 if isinstance(e, _Terminated) else 130)
    except Exception as e:  # a runtime failure: one line unless --debug
        if debug:
            raise
        click.echo(
            f"error: {type(e).__name__}: {_printable(first_line(e))} (run with --debug for the traceback)", err=True
        )
        sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":
    main()
