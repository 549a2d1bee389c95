"""`compose generate`: text from a checkpoint (torch) or a bundle (ONNX Runtime), for one prompt or
a JSONL file of records. The generation settings' options are generated from ``GenerationSpec``'s
fields (``composer.options``); the media options (``--<modality> FILE``) from the model's modalities."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from composer.errors import InputError
from composer.options import collect, flag_of, model_options
from composer.spec import GenerationSpec

# compose generate's spellings of GenerationSpec fields (the others: --max-new-tokens, --top-p, ...)
GENERATION_FLAGS = {"do_sample": "--sample/--greedy", "stop_strings": "--stop"}


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
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

    from composer.generation import resolve_generation
    from composer.targets import resolve

    _check_arguments(prompt, input_file, output, overwrite, seed)
    kind = resolve(target, accept=("checkpoint", "bundle")).kind
    items = _modality_args(ctx.args, text_ok=_text_modalities(target))
    model = _load(target, kind, provider, device, dtype)
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


def _check_arguments(prompt: str | None, input_file: Path | None, output: Path | None, overwrite: bool, seed: int):
    """The argument combinations and values `compose generate` refuses, before the model loads."""
    from composer.spec import MAX_SEED

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

        check_output(input_file, output, overwrite)
    if not 0 <= seed <= MAX_SEED:
        raise InputError(f"--seed {seed}: must be in [0, 2**64 - 1]")


def _load(target: str, kind: str, provider: str, device: str | None, dtype: str | None):
    """TARGET as the runtime that generates: an ONNX pipeline for a bundle, a torch model for a checkpoint."""
    if kind == "bundle":
        from composer.export.runtime import OnnxPipeline

        if device is not None or dtype is not None:
            raise InputError("--device/--dtype apply to checkpoints; a bundle runs on --provider in its exported dtype")
        return OnnxPipeline(target, provider=provider)
    import torch

    from composer.checkpoint import load_pretrained

    model = load_pretrained(target)
    return model.to(device=_torch_device(device), dtype=getattr(torch, dtype) if dtype else None)


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
    from composer.checkpoint import read_checkpoint_meta
    from composer.export.manifest import is_bundle, read_manifest

    try:
        if is_bundle(target):
            types = {m: e.type for m, e in read_manifest(target, check_files=False).encoders.items()}
        else:
            types = read_checkpoint_meta(target).encoder_types
        return text_modalities(types)
    except (InputError, OSError):
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
