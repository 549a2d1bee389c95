"""`compose build`, `compose inspect`, `compose plan`: a spec into a checkpoint, and what a model is."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from composer.cli.common import console, refuse_non_empty


@click.command()
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

    refuse_non_empty(out, overwrite)
    con = console()
    with con.status(f"building {spec}"):
        model = build_model(load_spec(spec, overrides))
    render(*summarize(model), con)
    with con.status(f"saving to {out}"):
        model.save_pretrained(out, overwrite=overwrite, max_shard_size=max_shard_size)
    con.print(f"saved composed checkpoint to {out}")


@click.command()
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
    from composer.checkpoint import load_any

    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    model = load_any(target, shape_only=True, offline=offline, overrides=overrides)
    rows, facts = summarize(model, text_tokens)
    if as_json:
        click.echo(json.dumps(facts, indent=2))
    else:
        render(rows, facts, console())


@click.command()
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
    from composer.checkpoint import load_any

    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    model = load_any(target, shape_only=True, offline=offline, overrides=overrides)
    shape = model.adapter.shape
    mm = mm_tokens if mm_tokens is not None else sum(model.num_tokens(m) for m in model.encoders)
    rows = make_plan(shape, text_tokens, mm, DTYPE_BYTES[model.spec.llm.dtype])
    if as_json:
        facts = {"name": model.spec.name, "text_tokens": text_tokens, "mm_tokens": mm}
        click.echo(json.dumps({**facts, "num_layers": shape.num_layers, "rows": as_dicts(rows)}, indent=2))
        return
    con = console()
    con.print(_plan_table(model, rows, text_tokens, mm))
    con.print("* the spec's insert_at")
    if plot_path and plot_png(rows, plot_path, model.spec.name):
        con.print(f"wrote {plot_path}")
    else:
        if plot_path:
            con.print("matplotlib is not installed: text plot instead")
        con.print(f"prefill saving by k: |{sparkline([r.prefill_saving for r in rows])}|")


def _plan_table(model, rows, text_tokens: int, mm: int):
    """`compose plan`'s table: one row per k, the spec's insert_at starred."""
    from rich.table import Table

    layers = model.adapter.shape.num_layers
    t = Table(title=f"{model.spec.name}: {text_tokens} text + {mm} MM tokens, {layers} layers", title_justify="left")
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
    return t
