"""``compose bench``: DeepInsert at k vs k = 0, measured side by side in one process.

Runtimes (the same weights and the same inputs everywhere):

- ``onnx``: the split ONNX bundle under ONNX Runtime (``OnnxPipeline``), exported once per k
  to a temporary directory;
- ``torch``: composer's eager path (``ComposedModel.generate``);
- ``hf``: the Hugging Face reference a user would otherwise pick,
  ``LlavaForConditionalGeneration.generate``, built on the composer model's own tensors
  (k = 0 only; needs a llama-family LLM, one CLIP/SigLIP image encoder and a 2-layer MLP
  projector, else it is skipped with the reason). It is built in ``composer.analysis.reference``,
  which the parity tests share.

Every k runs on the same weights: ``insert_at`` only changes the layout, so each k is the
model's ``with_insert_at(k)`` (the same modules) and each bundle is exported from it.

One measurement is one greedy ``generate`` of ``new_tokens`` tokens (EOS ignored) with a
streamer that timestamps every token: *prefill* is the time to the first token (encoders,
projectors, all LLM layers, the head and the token choice), *decode* is tokens per second
over the following ``new_tokens - 1`` steps. Each configuration first runs ``warmup`` times
(peak memory is taken over these runs), then the ``repeats`` timed runs go round-robin over
all configurations, so that a change in machine load hits every configuration alike.

ONNX Runtime runs one session per graph, each with its own intra-op thread pool; the bench
turns the pools' spinning off by default, as ``OnnxPipeline`` does (``--ort-spinning`` turns it on), since idle pools
that busy-wait take cores from the graph that runs (see ``_ort_options``). ``threads`` sets
the intra-op threads of torch and ONNX Runtime alike (on a shared machine, 1 thread each
keeps other processes' load from skewing one runtime more than another).

Peak memory (``composer.analysis.memory.PeakMemory``): on CUDA, ``torch.cuda.max_memory_allocated``
above the allocation before the runs (torch and hf) or the device memory in use sampled every
5 ms (ONNX Runtime, whose allocations torch does not see). On a CPU ``tracemalloc`` sees nothing
of torch's or ONNX Runtime's native allocations, so the peak resident set size (RSS) is read
instead: Linux's ``/proc/self/clear_refs`` resets the peak (VmHWM) to the current RSS before the
warm-up runs and VmHWM is read after them, after ``malloc_trim`` hands freed heap memory back.
The number is the working memory of inference above the loaded weights (activations, KV cache,
ONNX Runtime's arena). Where ``clear_refs`` is not available the ``ru_maxrss`` increase is
reported, a lower bound (it only grows past the process's earlier peak).

The table and the run's header facts (CPU, library versions) come from
``composer.analysis.report``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import torch

from composer.analysis.flops import saving
from composer.analysis.memory import PeakMemory
from composer.analysis.reference import hf_reference, hf_reference_unsupported, hf_suppress_tokens
from composer.analysis.report import cpu_info, render, versions  # the CLI imports render, cpu_info from here
from composer.errors import ComposerError, InputError

RUNTIMES = ("onnx", "torch", "hf")


@dataclass
class BenchConfig:
    insert_at: list[int] | None = None  # None: the model's own insert_at
    runtimes: tuple[str, ...] = RUNTIMES
    text_tokens: int = 64
    batch: int = 1
    new_tokens: int = 16
    warmup: int = 1
    repeats: int = 5
    provider: str = "cpu"  # cpu | cuda: ONNX Runtime's provider; torch and hf run on the same device
    ort_spinning: bool = False  # ONNX Runtime's intra-op threads busy-wait after each graph run (its default)
    threads: int | None = None  # intra-op threads of torch and ONNX Runtime (None: their defaults)
    seed: int = 0
    # also bench ONNX bundles quantized so (composer.export.quantize.BUNDLE_SCHEMES: "int8", ...,
    # "w8a8+int8" for w8a8 prefill graphs with int8 decode graphs; runtime "onnx-int8", ...)
    quantize: tuple[str, ...] = ()


@dataclass
class BenchLayout:
    """One insertion layout the bench measures (not ``composer.layout.Layout``, the model's own)."""

    label: str  # "0", "12", or "image=2,audio=3" for a spec with several insertion layers
    insert_at: dict[str, int]


# -- inputs -------------------------------------------------------------------------------------
def example_items(model, modality: str, n: int) -> Any:
    """Random encoder inputs for ``n`` items (the tensor for single-input encoders)."""
    x = model.encoders[modality].example_inputs(n)
    return next(iter(x.values())) if len(x) == 1 else x


def bench_inputs(model, text_tokens: int, batch: int, seed: int = 0) -> dict[str, Any]:
    """A prompt of exactly ``text_tokens`` text tokens (the template's own tokens, then filler
    where the instruction goes) plus one item per placeholder in the template, repeated
    ``batch`` times (no padding). Modality inputs are random, from ``seed``."""
    from composer.prompting import adds_special_tokens, prepare_batch

    tok = model.tokenizer
    prompt = model.format_prompt("")
    counts = {m: prompt.count(model.spec.modalities[m].placeholder) for m in model.encoders}
    torch.manual_seed(seed)
    base = prepare_batch(
        tok,
        [prompt],
        placeholder_ids=model.placeholder_ids,
        num_tokens={m: model.num_tokens(m) for m in model.encoders},
        placeholders={m: model.spec.modalities[m].placeholder for m in model.encoders},
        preprocess={m: (lambda items, m=m: example_items(model, m, len(items) * batch)) for m in model.encoders},
        add_special_tokens=adds_special_tokens(tok, model.prompt_template),
        **{m: [None] * n for m, n in counts.items() if n},
    )
    row = base["input_ids"][0].tolist()
    is_mm = [t in model.placeholder_ids.values() for t in row]
    have = len(row) - sum(is_mm)
    if text_tokens < have:
        raise InputError(f"--text-tokens {text_tokens}: the prompt template alone has {have} text tokens")
    filler = tok(" the", add_special_tokens=False)["input_ids"] or [tok.pad_token_id or 0]
    extra = [filler[i % len(filler)] for i in range(text_tokens - have)]
    at = max((i + 1 for i, mm in enumerate(is_mm) if mm), default=len(row))  # after the last MM slot
    row = row[:at] + extra + row[at:]
    ids = torch.tensor([row] * batch)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out.update({m: v for m, v in base.items() if m in model.encoders})
    return out


def token_counts(model, batch: dict[str, Any]) -> tuple[int, dict[str, int]]:
    """(text tokens, {modality: MM tokens}) of the first row."""
    row = batch["input_ids"][0]
    mm = {m: int((row == pid).sum()) for m, pid in model.placeholder_ids.items()}
    return int(row.numel()) - sum(mm.values()), mm


# -- timing ------------------------------------------------------------------------------------------
class TokenClock:
    """A generation streamer that timestamps every new token (HF also ``put``s the prompt first)."""

    def __init__(self, skip_prompt: bool):
        self.skip = skip_prompt
        self.times: list[float] = []

    def put(self, value) -> None:
        if self.skip:
            self.skip = False
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@dataclass
class Run:
    prefill_s: float
    decode_tps: float
    tokens: list[list[int]]


class Runner:
    """One (runtime, layout): ``run()`` generates once and times it."""

    def __init__(self, runtime: str, layout: BenchLayout, fn, skip_prompt: bool):
        self.runtime, self.layout, self.fn, self.skip_prompt = runtime, layout, fn, skip_prompt

    def run(self, batch_size: int, new_tokens: int) -> Run:
        clock = TokenClock(self.skip_prompt)
        t0 = time.perf_counter()
        with torch.no_grad():
            ids = self.fn(clock)
        t = clock.times
        if len(t) != new_tokens:
            raise ComposerError(f"{self.runtime}: generated {len(t)} tokens, expected {new_tokens}")
        return Run(t[0] - t0, batch_size * (len(t) - 1) / (t[-1] - t[0]), torch.as_tensor(ids).tolist())


# -- the benchmark ---------------------------------------------------------------------------------
def layouts_for(model, ks: list[int] | None) -> list[BenchLayout]:
    """k = 0 first, then each requested k (every modality at k), or the model's own insert_at."""
    n = model.num_layers
    mods = list(model.encoders)
    out = [BenchLayout("0", {m: 0 for m in mods})]
    if ks is None:
        own = dict(model.insert_at)
        vals = set(own.values())
        if vals != {0}:
            label = str(vals.pop()) if len(vals) == 1 else ",".join(f"{m}={k}" for m, k in own.items())
            out.append(BenchLayout(label, own))
        return out
    for k in ks:
        if not 0 <= k < n:
            raise InputError(f"--insert-at {k}: must be in [0, {n}) for this {n}-layer LLM")
        if k and str(k) not in {lay.label for lay in out}:
            out.append(BenchLayout(str(k), {m: k for m in mods}))
    return out


def run_bench(model, cfg: BenchConfig, progress=None) -> dict:
    """Measure every runtime in ``cfg.runtimes`` at k = 0 and each layout; -> a JSON-able dict.

    Example::

        model = composer.build("specs/tiny/llava.yaml").eval()
        result = run_bench(model, BenchConfig(insert_at=[2], repeats=3))
    """
    _check_config(model, cfg)
    threads_before = torch.get_num_threads()
    s = _setup(model, cfg, progress or (lambda _: None))
    m = _Measured()
    tmp = tempfile.TemporaryDirectory(prefix="compose-bench-")
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        # one untracked run first: torch's one-off allocations (thread pools, kernel caches)
        # would otherwise land in the memory of whichever configuration runs first
        with torch.no_grad():
            s.model.generate(**s.dev_batch, max_new_tokens=2, eos_token_id=[])
        built = chain(_onnx_runners(s, Path(tmp.name), m.skipped), _torch_runners(s), _hf_runners(s, m.skipped))
        runners = [_warm(s, r, m) for r in built]  # each warmed as soon as it is built, in this order
        _timed_rounds(s, runners, m)
        threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads_before)
        tmp.cleanup()
    shape = s.model.adapter.shape
    analytic = {lay.label: saving(shape, s.text_tokens, s.mm_tokens, lay.insert_at) for lay in s.layouts}
    rows = _rows(runners, m)
    _add_ratios(rows, analytic)
    return _result_dict(s, threads, analytic, m, rows)


def _check_config(model, cfg: BenchConfig) -> None:
    """Raise ``InputError`` naming the first setting of ``cfg`` the bench cannot run."""
    unknown = sorted(set(cfg.runtimes) - set(RUNTIMES))
    if unknown or not cfg.runtimes:
        raise InputError(f"--runtime must be among {list(RUNTIMES)}, got {list(cfg.runtimes)}")
    if cfg.new_tokens < 2:
        raise InputError(
            f"--new-tokens must be >= 2 (decode speed needs a step after the first token), got {cfg.new_tokens}"
        )
    if cfg.batch < 1 or cfg.repeats < 1 or cfg.warmup < 0:
        raise InputError(
            f"need --batch >= 1, --repeats >= 1, --warmup >= 0; got {cfg.batch}, {cfg.repeats}, {cfg.warmup}"
        )
    if cfg.provider not in ("cpu", "cuda"):
        raise InputError(f"--provider must be cpu or cuda, got {cfg.provider!r}")
    if cfg.provider == "cuda" and not torch.cuda.is_available():
        raise InputError("--provider cuda: torch sees no CUDA device")
    if cfg.threads is not None and cfg.threads < 1:
        raise InputError(f"--threads must be >= 1, got {cfg.threads}")
    from composer.spec import MAX_SEED

    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or not 0 <= cfg.seed <= MAX_SEED:
        raise InputError(f"--seed must be an integer in [0, 2**64 - 1] (torch's seeds), got {cfg.seed!r}")
    if cfg.quantize:
        from composer.export.quantize import BUNDLE_SCHEMES

        if (
            "onnx" not in cfg.runtimes
            or any(q not in BUNDLE_SCHEMES for q in cfg.quantize)
            or model.dtype != torch.float32
        ):
            raise InputError(
                f"--quantize takes {list(BUNDLE_SCHEMES)} with the onnx runtime and a float32 model, "
                f"got {list(cfg.quantize)} ({model.dtype}, runtimes {list(cfg.runtimes)})"
            )


@dataclass
class _Setup:
    """What every runner of one bench shares."""

    model: Any  # on the bench's device, in eval mode
    cfg: BenchConfig
    device: torch.device
    layouts: list[BenchLayout]
    variants: dict[str, Any]  # layout label -> the model with that insert_at (the same weights)
    batch: dict[str, Any]  # the inputs, on the CPU
    dev_batch: dict[str, Any]  # the same on the device
    text_tokens: int  # per row
    mm_tokens: dict[str, int]  # per row and modality
    gen: dict[str, Any]  # generate's settings common to every runtime
    say: Callable[[str], None]


def _setup(model, cfg: BenchConfig, say: Callable[[str], None]) -> _Setup:
    """The model on ``cfg.provider``'s device, its variant at each layout and the inputs."""
    device = torch.device(cfg.provider)
    model = model.to(device).eval()
    layouts = layouts_for(model, cfg.insert_at)
    variants = {lay.label: model.with_insert_at(lay.insert_at) for lay in layouts}  # same weights, each k
    batch = bench_inputs(model, cfg.text_tokens, cfg.batch, cfg.seed)
    text, mm = token_counts(model, batch)
    dev_batch = {k: _to(v, device) for k, v in batch.items()}
    gen = {"max_new_tokens": cfg.new_tokens, "do_sample": False}
    return _Setup(model, cfg, device, layouts, variants, batch, dev_batch, text, mm, gen, say)


@dataclass
class _Measured:
    """What the runs found, per (runtime, layout label); and the runtimes skipped, with the reason."""

    warm_runs: dict[tuple[str, str], list[Run]] = field(default_factory=dict)
    times: dict[tuple[str, str], list[Run]] = field(default_factory=dict)
    memory: dict[tuple[str, str], int | None] = field(default_factory=dict)
    memory_method: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def _onnx_runners(s: _Setup, tmp: Path, skipped: dict[str, str]) -> Iterator[Runner]:
    """One runner per (quantization, layout), each bundle exported to ``tmp`` when its turn comes."""
    if "onnx" not in s.cfg.runtimes:
        return
    why = _onnx_unavailable(s.cfg.provider)
    if why:
        skipped["onnx"] = why
        return
    from composer.export.exporter import export_onnx
    from composer.export.quantize import split_scheme
    from composer.export.runtime import OnnxPipeline

    model, batch, gen = s.model, s.batch, s.gen
    dtype = "fp16" if model.dtype == torch.float16 else "fp32"
    for scheme, lay in ((q, lay) for q in (None, *s.cfg.quantize) for lay in s.layouts):
        name = "onnx" if scheme is None else f"onnx-{scheme}"
        s.say(f"exporting the ONNX bundle at k={lay.label}" + (f" ({scheme})" if scheme else ""))
        variant = s.variants[lay.label]
        quantize, decode_quantize, decode_attention = split_scheme(scheme) if scheme else (None, None, "plain")
        bundle = export_onnx(
            variant.cpu() if s.device.type != "cpu" else variant,
            tmp / f"k{lay.label}{'' if scheme is None else '-' + scheme.replace(':', '-')}",
            dtype=dtype,
            quantize=quantize,
            decode_quantize=decode_quantize,
            decode_attention=decode_attention,
        )
        model.to(s.device)
        so = _ort_options(s.cfg.ort_spinning, s.cfg.threads)
        pipe = OnnxPipeline(bundle, provider=s.cfg.provider, session_options=so)
        mm_in = {m: batch[m] for m in model.encoders if m in batch}

        def fn(clock, pipe=pipe, mm_in=mm_in):
            return pipe.generate(
                batch["input_ids"], batch["attention_mask"], eos_token_id=[], streamer=clock, **gen, **mm_in
            )

        yield Runner(name, lay, fn, skip_prompt=False)


def _torch_runners(s: _Setup) -> Iterator[Runner]:
    """One runner per layout: composer's ``generate`` on that layout's variant."""
    if "torch" not in s.cfg.runtimes:
        return
    dev_batch, gen = s.dev_batch, s.gen
    for lay in s.layouts:

        def fn(clock, variant=s.variants[lay.label]):
            return variant.generate(**dev_batch, eos_token_id=[], streamer=clock, **gen)

        yield Runner("torch", lay, fn, skip_prompt=False)


def _hf_runners(s: _Setup, skipped: dict[str, str]) -> Iterator[Runner]:
    """The HF reference at k = 0 (none, with the reason in ``skipped``, where it does not apply)."""
    if "hf" not in s.cfg.runtimes:
        return
    model, batch, device = s.model, s.batch, s.device
    why = hf_reference_unsupported(model)
    if why:
        skipped["hf"] = why
        return
    s.say("building the HF reference")
    ref = hf_reference(model)
    (m,) = model.encoders
    hb = {
        "input_ids": batch["input_ids"].to(device),
        "attention_mask": batch["attention_mask"].to(device),
        "pixel_values": batch[m].to(device, model.encoders[m].dtype),
    }
    banned = hf_suppress_tokens(model) or None
    L = hb["input_ids"].shape[1]
    gen = s.gen

    def fn(clock):
        return ref.generate(**hb, suppress_tokens=banned, streamer=clock, **gen)[:, L:]

    yield Runner("hf", s.layouts[0], fn, skip_prompt=True)


def _warm(s: _Setup, r: Runner, m: _Measured) -> Runner:
    """``cfg.warmup`` runs of ``r``, its peak memory taken over them; -> ``r``."""
    kind = "cpu" if s.device.type == "cpu" else ("cuda-device" if r.runtime.startswith("onnx") else "cuda-torch")
    s.say(f"warming up {r.runtime} at k={r.layout.label}")
    key = (r.runtime, r.layout.label)
    with PeakMemory(kind) as pm:
        m.warm_runs[key] = [r.run(s.cfg.batch, s.cfg.new_tokens) for _ in range(s.cfg.warmup)]
    m.memory[key] = pm.bytes if s.cfg.warmup else None
    m.memory_method[r.runtime] = pm.method
    return r


def _timed_rounds(s: _Setup, runners: list[Runner], m: _Measured) -> None:
    """``cfg.repeats`` rounds, each timing every runner once (round-robin: a change in the
    machine's load hits every configuration alike)."""
    m.times = {(r.runtime, r.layout.label): [] for r in runners}
    for i in range(s.cfg.repeats):
        s.say(f"timed round {i + 1} of {s.cfg.repeats}")
        for r in runners:
            m.times[(r.runtime, r.layout.label)].append(r.run(s.cfg.batch, s.cfg.new_tokens))


def _rows(runners: list[Runner], m: _Measured) -> list[dict]:
    """One result row per runner: time and speed statistics, peak memory, the first run's tokens."""
    rows = []
    for r in runners:
        key = (r.runtime, r.layout.label)
        runs = m.times[key]
        first = (m.warm_runs[key] or runs)[0]
        rows.append(
            {
                "runtime": r.runtime,
                "k": r.layout.label,
                "insert_at": r.layout.insert_at,
                "prefill_s": _stats([x.prefill_s for x in runs]),
                "decode_tokens_per_s": _stats([x.decode_tps for x in runs]),
                "peak_memory_mib": None if m.memory[key] is None else m.memory[key] / 2**20,
                "tokens": first.tokens,
            }
        )
    return rows


def _result_dict(s: _Setup, threads: int, analytic: dict[str, float], m: _Measured, rows: list[dict]) -> dict:
    """The bench's JSON: the machine, the model, the settings, the layouts and the rows."""
    cfg, model = s.cfg, s.model
    shape = model.adapter.shape
    return {
        "name": model.spec.name,
        "device": cfg.provider,
        "cpu": cpu_info(),
        "threads": threads,
        "onnxruntime_session": {
            "session.intra_op.allow_spinning": "1" if cfg.ort_spinning else "0",
            "intra_op_num_threads": cfg.threads or 0,
        },
        "versions": versions(),
        "model": {
            "family": model.llm.config.model_type,
            "num_layers": shape.num_layers,
            "hidden_size": shape.hidden_size,
            "intermediate_size": shape.intermediate_size,
            "dtype": str(model.dtype).replace("torch.", ""),
        },
        "settings": {
            "text_tokens": s.text_tokens,
            "mm_tokens": s.mm_tokens,
            "batch": cfg.batch,
            "new_tokens": cfg.new_tokens,
            "warmup": cfg.warmup,
            "repeats": cfg.repeats,
            "seed": cfg.seed,
        },
        "layouts": [{"k": lay.label, "insert_at": lay.insert_at} for lay in s.layouts],
        "analytic_prefill_saving": analytic,
        "memory_method": m.memory_method,
        "skipped": m.skipped,
        "results": rows,
    }


def _add_ratios(rows: list[dict], analytic: dict[str, float]) -> None:
    """Per row: time and speed ratios vs the same runtime at k = 0 and vs torch at the same k,
    the measured prefill saving, and its ratio to the analytic one (LLM-layer FLOPs)."""
    by = {(r["runtime"], r["k"]): r for r in rows}
    for r in rows:
        p, d = r["prefill_s"]["median"], r["decode_tokens_per_s"]["median"]
        base = by.get((r["runtime"], "0"))
        torch_row = by.get(("torch", r["k"]))
        r["prefill_ratio_vs_k0"] = p / base["prefill_s"]["median"] if base else None
        r["decode_ratio_vs_k0"] = d / base["decode_tokens_per_s"]["median"] if base else None
        r["prefill_ratio_vs_torch"] = p / torch_row["prefill_s"]["median"] if torch_row else None
        r["decode_ratio_vs_torch"] = d / torch_row["decode_tokens_per_s"]["median"] if torch_row else None
        r["tokens_match_torch"] = (r["tokens"] == torch_row["tokens"]) if torch_row else None
        r["token_agreement_vs_torch"] = _agreement(r["tokens"], torch_row["tokens"]) if torch_row else None
        a = analytic[r["k"]]
        r["measured_prefill_saving"] = 1 - r["prefill_ratio_vs_k0"] if base else None
        r["analytic_prefill_saving"] = a
        r["measured_over_analytic"] = r["measured_prefill_saving"] / a if base and a > 0 else None


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of greedy tokens equal position by position (a quantized runtime vs torch fp32)."""
    pairs = [(x, y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)]
    return sum(x == y for x, y in pairs) / len(pairs)


def _ort_options(spinning: bool, threads: int | None):
    from composer.export.runtime import default_session_options

    return default_session_options(spinning, threads)


def _onnx_unavailable(provider: str) -> str | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed"
    if provider == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        return "onnxruntime has no CUDAExecutionProvider (pip install 'mm-composer[gpu]')"
    return None


def _to(v, device):
    if isinstance(v, dict):
        return {k: _to(x, device) for k, x in v.items()}
    return v.to(device) if isinstance(v, torch.Tensor) else v


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


__all__ = ["RUNTIMES", "BenchConfig", "BenchLayout", "bench_inputs", "cpu_info", "render", "run_bench"]
