"""`compose bench`, `compose probe`: measuring a model at its insertion layer k against k = 0."""

from __future__ import annotations

import json
from pathlib import Path

import click

from composer.cli.common import console
from composer.errors import InputError
from composer.export.quantize import BUNDLE_SCHEMES


@click.command()
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
    type=click.Choice(list(BUNDLE_SCHEMES)),
    multiple=True,
    help="Also bench ONNX bundles quantized so (repeatable; see compose export --quantize; P+D: --quantize P "
    "--decode-quantize D, e.g. w8a8+int8; P+D:fused adds --decode-attention fused, e.g. int8+int8:fused).",
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
    from composer.checkpoint import load_any

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
    con = console()
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


@click.command()
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
    from composer.checkpoint import load_any

    cfg = ProbeConfig(
        layers=_int_list(layers, "--layers"),
        max_records=max_records,
        batch_size=batch_size,
        max_loss_increase=max_loss_increase,
        media_root=media_root,
        rule=rule,
        align_fraction=align_fraction,
    )
    con = console()
    with con.status(f"loading {target}") as status:
        model = load_any(target, overrides=overrides)
        result = run_probe(model, data, cfg, progress=status.update)
    render(result, con)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
        con.print(f"wrote {json_path}")
