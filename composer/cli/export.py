"""`compose export`: a checkpoint as an ONNX bundle, optionally quantized and verified.

The options ``export_onnx`` takes are generated from ``ExportOptions`` (same names and defaults as
``export_onnx``'s keyword arguments, tests/test_cli_options.py), which export_onnx validates; the
others (OUTPUT, --overwrite, --verify and its tolerances) are written here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import click
from pydantic import BaseModel, ConfigDict, Field

from composer.cli.common import console, refuse_non_empty
from composer.errors import ComposerError
from composer.export.quantize import DECODE_SCHEMES
from composer.export.quantize import SCHEMES as QUANT_SCHEMES
from composer.options import collect, model_options


class ExportOptions(BaseModel):
    """``compose export``'s options that are ``export_onnx``'s keyword arguments (its help texts)."""

    model_config = ConfigDict(extra="forbid")

    dtype: Literal["fp32", "fp16"] = Field("fp32", description="Float type of the graphs' weights and activations.")
    opset: int | None = Field(None, description="ONNX opset (default: the exporter's).")
    quantize: str | None = Field(
        None,
        description="Quantize the LLM graphs' linear layers: int8/int4 weights block-wise (ONNX Runtime "
        "MatMulNBits); w8a8 int8 weights x per-token int8 activations, calibrated (SmoothQuant, top channels fp32; "
        "fast CPU prefill).",
    )
    block_size: int = Field(32, description="With `quantize` int8/int4: weights per scale.")
    accuracy_level: int = Field(
        4,
        description="With `quantize` int8/int4: MatMulNBits activation precision (4: int8, fast on CPU; 1: fp32, "
        "slow).",
    )
    keep_head: bool = Field(False, description="With `quantize`: leave the LM head in full precision.")
    keep_embedding: bool = Field(
        False,
        description="With `quantize`: leave the token embedding in full precision (else int8 in blocks of 32, "
        "ONNX Runtime GatherBlockQuantized: 3.6x smaller, as fast).",
    )
    calibration: Path | None = Field(
        None,
        description="With `quantize` w8a8: calibrate on this JSONL file (the training formats, with real "
        "images/audio) instead of the built-in prompts.",
    )
    calibration_samples: int | None = Field(
        None, description="With `calibration`: how many of its first records to run (default 32)."
    )
    fp32_channels: int | None = Field(
        None,
        description="With `quantize` w8a8: the largest calibration channels of each input kept in fp32 (default 16; "
        "0: none).",
    )
    smooth_alpha: float | None = Field(
        None,
        description="With `quantize` w8a8: SmoothQuant's migration strength on the other channels, 0-1 (default 0.5).",
    )
    reduce_range: bool = Field(
        False,
        description="With `quantize` w8a8: 7-bit weights (-63..63), so that ONNX Runtime's u8 x s8 GEMM cannot "
        "saturate on CPUs without VNNI (AVX2, AVX-512 without VNNI); a little less accurate.",
    )
    decode_quantize: str | None = Field(
        None,
        description="Also write the LLM graphs quantized so (int8/int4 MatMulNBits, the fast one-row kernels) for "
        "decode steps, next to the prefill graphs of `quantize`; e.g. `quantize` w8a8 with this int8.",
    )
    decode_attention: Literal["plain", "fused"] = Field(
        "plain",
        description="plain: decode graphs (`decode_quantize`) are the prefill graphs' copies; fused: decode graphs "
        "with each layer's attention as one ONNX Runtime GroupQueryAttention node (rotary, in-place KV write, "
        "attention) and each RMSNorm one node, ~3x fewer nodes per decode step (CPU, fp32; llama-style LLMs with "
        "full attention); without `decode_quantize` they keep fp32 weights.",
    )


EXPORT_TYPES = {
    "quantize": click.Choice(list(QUANT_SCHEMES)),
    "decode_quantize": click.Choice(list(DECODE_SCHEMES)),
    "calibration": click.Path(dir_okay=False, path_type=Path),
    "calibration_samples": click.IntRange(1),
}


@click.command()
@click.argument("checkpoint", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Bundle directory to write."
)
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists and is not empty.")
@click.option(
    "--verify",
    is_flag=True,
    help="Compare ONNX Runtime with torch before the bundle replaces OUTPUT; past tolerance: exit 1, OUTPUT unchanged.",
)
@model_options(ExportOptions, types=EXPORT_TYPES, defaults=True)
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
    overwrite: bool,
    verify: bool,
    min_top1: float | None,
    atol: float | None,
    **options: Any,
) -> None:
    """Export a composed CHECKPOINT as a split ONNX bundle (encoders, early text, late multimodal).

    \b
    Examples:
      compose export out/tiny-llava -o out/tiny-llava.onnx --verify
      compose export out/tiny-llava -o out/tiny-llava.int8.onnx --quantize int8 --verify
      compose export out/tiny-llava -o out/tiny-llava.w8a8.onnx --quantize w8a8 --calibration data.jsonl --verify
    """
    from composer.checkpoint import check_output_apart, load_pretrained
    from composer.export.exporter import export_onnx
    from composer.targets import resolve

    refuse_non_empty(out, overwrite)
    con = console()
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
            overwrite=overwrite,
            progress=lambda s: status.update(s),
            check=verify_before_replacing if verify else None,
            **collect(ExportOptions, options),
        )
    _print_bundle(con, out, verify)


def _print_bundle(con, out: Path, verified: bool) -> None:
    """The written bundle's graphs: each stage's layers and the modalities entering it, each encoder's tokens."""
    from composer.export.manifest import read_manifest

    manifest = read_manifest(out)
    for st in manifest.stages:
        con.print(
            f"  {st.graph:<28} layers [{st.start}, {st.end})"
            + (f"  + {', '.join(st.enter)}" if st.enter else "")
            + (f"  (decode steps: {st.decode_graph})" if st.decode_graph else "")
        )
    for e in manifest.encoders.values():
        con.print(f"  {e.graph:<28} {e.tokens_per_item} tokens per item")
    con.print(f"wrote ONNX bundle to {out}" + (" (verified)" if verified else ""))


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
    if "decode_top1_agreement" in r:
        n = r["decode_positions"]
        con.print(
            f"  decode graphs ({r['decode_quantization']}), the prompts' text after their media fed one step at a "
            f"time: top-1 agreement {r['decode_top1_agreement']:.2%} ({round(r['decode_top1_agreement'] * n)} of {n}), "
            f"mean KL {r['decode_mean_kl']:.2g} nats"
        )
    limits = f"top-1 >= {r['min_top1']:.1%}" + (f", logit difference <= {r['atol']:g}" if r["atol"] is not None else "")
    if not r["ok"]:
        raise ComposerError(f"verification failed: want {limits} (set --min-top1 / --atol)")
    con.print(f"verified: {limits}")
