"""What ``compose bench`` prints and records about its run: the results table (``render``), the
CPU and its kernel-relevant flags (``cpu_info``) and the library versions (``versions``)."""

from __future__ import annotations

import contextlib

import torch

from composer.export.quantize import BUNDLE_SCHEMES

# the runtimes' names in the table (composer.analysis.bench.RUNTIMES and the quantized bundles)
LABELS = {
    "onnx": "ONNX Runtime",
    **{f"onnx-{scheme}": f"ONNX Runtime {scheme}" for scheme in BUNDLE_SCHEMES},
    "torch": "torch eager",
    "hf": "HF Llava",
}


# The CPU features that decide which kernels the quantized and fp32 paths run (docs/export.md).
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_info(cpuinfo: str | None = None) -> dict:
    """The CPU model, its kernel-relevant flags (``CPU_FLAGS``) and whether ONNX Runtime's u8 x s8
    GEMM saturates here (w8a8's accuracy depends on it), for the bench header and its JSON.
    ``cpuinfo``: the text of /proc/cpuinfo (read from Linux when None; elsewhere: platform only)."""
    import platform

    from composer.export.quantize import u8s8_gemm_saturates

    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    model, flags = platform.processor() or platform.machine(), set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
    return {
        "model": model,
        "flags": [f for f in CPU_FLAGS if f in flags],
        "u8s8_gemm_saturates": u8s8_gemm_saturates(),
    }


def versions() -> dict[str, str]:
    """The versions of the libraries the numbers depend on (torch, transformers, onnxruntime)."""
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__}
    with contextlib.suppress(ImportError):
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    return out


def render(result: dict, console) -> None:
    """The table: per runtime and k, prefill and decode (median, min–max) with ratios, memory;
    then the measured vs analytic prefill saving."""
    from rich.table import Table

    st = result["settings"]
    mm = sum(st["mm_tokens"].values())
    t = Table(
        title=f"{result['name']}: {result['model']['num_layers']} layers, d={result['model']['hidden_size']}, "
        f"{st['text_tokens']} text + {mm} MM tokens, batch {st['batch']}, {result['device']}, "
        f"{result['threads']} threads; median (min–max) of {st['repeats']} after {st['warmup']} warm-up",
        title_justify="left",
    )
    for col in ("runtime", "k", "prefill s", "k/0", "vs torch", "decode tok/s", "k/0", "vs torch", "peak MiB"):
        t.add_column(col, justify="left" if col == "runtime" else "right")
    for r in result["results"]:
        mem = "" if r["peak_memory_mib"] is None else f"{r['peak_memory_mib']:.0f}"
        t.add_row(
            LABELS[r["runtime"]],
            r["k"],
            _span(r["prefill_s"], ".3f"),
            _ratio(r["prefill_ratio_vs_k0"]),
            _ratio(r["prefill_ratio_vs_torch"]),
            _span(r["decode_tokens_per_s"], ".1f"),
            _ratio(r["decode_ratio_vs_k0"]),
            _ratio(r["decode_ratio_vs_torch"]),
            mem,
        )
    cpu = result.get("cpu")
    if cpu:
        sat = (
            " (its u8 x s8 GEMM saturates: w8a8 is inexact here unless --reduce-range)"
            if cpu["u8s8_gemm_saturates"]
            else ""
        )
        console.print(f"CPU: {cpu['model']}; {' '.join(cpu['flags']) or 'none of ' + ', '.join(CPU_FLAGS)}{sat}")
    console.print(t)
    for r in result["results"]:
        if r["measured_over_analytic"] is not None:
            console.print(
                f"{LABELS[r['runtime']]} at k={r['k']}: prefill saving {r['measured_prefill_saving']:.1%} "
                f"measured vs {r['analytic_prefill_saving']:.1%} analytic (LLM-layer FLOPs): "
                f"{r['measured_over_analytic']:.0%} of it"
            )
    mismatched = [
        f"{r['runtime']} k={r['k']} ({r['token_agreement_vs_torch']:.0%} equal)"
        for r in result["results"]
        if r["tokens_match_torch"] is False
    ]
    if mismatched:
        console.print(f"greedy tokens differ from torch for: {', '.join(mismatched)}")
    for rt, why in result["skipped"].items():
        console.print(f"skipped {rt}: {why}")
    if any(r["runtime"].startswith("onnx") for r in result["results"]):
        spin = result["onnxruntime_session"]["session.intra_op.allow_spinning"] == "1"
        console.print(f"ONNX Runtime: one session per graph, intra-op thread spinning {'on' if spin else 'off'}")
    console.print(
        "HF Llava = transformers' LlavaForConditionalGeneration.generate on the same tensors (k = 0 only); "
        "prefill = time to the first token (encoders, all LLM layers, head); decode = tokens/s over the next "
        f"{st['new_tokens'] - 1} tokens; peak MiB = {'; '.join(sorted(set(result['memory_method'].values())))}"
    )


def _span(s: dict, fmt: str) -> str:
    return f"{s['median']:{fmt}} ({s['min']:{fmt}}–{s['max']:{fmt}})"


def _ratio(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"


__all__ = ["CPU_FLAGS", "LABELS", "cpu_info", "render", "versions"]
