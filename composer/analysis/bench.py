"""``compose bench``: DeepInsert at k vs k = 0, measured side by side in one process.

Runtimes (the same weights and the same inputs everywhere):

- ``onnx``: the split ONNX bundle under ONNX Runtime (``OnnxPipeline``), exported once per k
  to a temporary directory;
- ``torch``: composer's eager path (``ComposedModel.generate``);
- ``hf``: the Hugging Face reference a user would otherwise pick,
  ``LlavaForConditionalGeneration.generate``, built on the composer model's own tensors
  (k = 0 only; needs a llama-family LLM, one CLIP/SigLIP image encoder and a 2-layer MLP
  projector, else it is skipped with the reason).

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

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` above the allocation before the
runs (torch and hf) or the device memory in use sampled every 5 ms (ONNX Runtime, whose
allocations torch does not see). On a CPU ``tracemalloc`` sees nothing of torch's or ONNX
Runtime's native allocations, so the peak resident set size (RSS) is read instead: Linux's
``/proc/self/clear_refs`` resets the peak (VmHWM) to the current RSS before the warm-up runs
and VmHWM is read after them, after ``malloc_trim`` hands freed heap memory back. The number
is the working memory of inference above the loaded weights (activations, KV cache, ONNX
Runtime's arena). Where ``clear_refs`` is not available the ``ru_maxrss`` increase is
reported, a lower bound (it only grows past the process's earlier peak).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from composer.analysis.flops import saving
from composer.errors import ComposerError, InputError
from composer.export.quantize import SCHEMES as QUANT_SCHEMES

RUNTIMES = ("onnx", "torch", "hf")
LABELS = {
    "onnx": "ONNX Runtime",
    **{f"onnx-{scheme}": f"ONNX Runtime {scheme}" for scheme in QUANT_SCHEMES},
    "torch": "torch eager",
    "hf": "HF Llava",
}


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
    # also bench ONNX bundles quantized so (QUANT_SCHEMES: "int8", ...; runtime "onnx-int8", ...)
    quantize: tuple[str, ...] = ()


@dataclass
class Layout:
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


# -- the Hugging Face reference ------------------------------------------------------------------------
def hf_reference_unsupported(model) -> str | None:
    """Why ``LlavaForConditionalGeneration`` cannot reproduce ``model`` at k = 0 (None: it can)."""
    from composer.adapters import encoder_type_of

    if len(model.encoders) != 1:
        return f"LlavaForConditionalGeneration takes one image modality; this model has {sorted(model.encoders)}"
    (m,) = model.encoders
    et = encoder_type_of(model.encoders[m])
    if et not in ("clip_vision", "siglip_vision"):
        return f"LlavaForConditionalGeneration has no reference for a {et} encoder (CLIP or SigLIP vision only)"
    p = model.spec.modalities[m].projector
    if p.type != "mlp" or p.depth != 2:
        return f"LlavaForConditionalGeneration's projector is a 2-layer MLP; this model's is {p.type}" + (
            f" of depth {p.depth}" if p.type == "mlp" else ""
        )
    if model.adapter.family != "llama":
        return f"no LlavaForConditionalGeneration reference for a {model.llm.config.model_type} LLM (llama-family only)"
    if any("lora_" in n for n, _ in model.named_parameters()):
        return "the model has unmerged LoRA adapters"
    return None


def llava_state_dict(model, modality: str = "image") -> dict:
    """``model``'s weights under ``LlavaForConditionalGeneration``'s names (same tensors)."""
    rename = {
        f"projectors.{modality}.0.": "model.multi_modal_projector.linear_1.",
        f"projectors.{modality}.2.": "model.multi_modal_projector.linear_2.",
        f"encoders.{modality}.model.": "model.vision_tower.",
        "llm.model.": "model.language_model.",
        "llm.lm_head.": "lm_head.",
    }
    state = {}
    for k, v in model.state_dict().items():
        for a, b in rename.items():
            if k.startswith(a):
                state[b + k[len(a) :]] = v
                break
    return state


def hf_suppress_tokens(model) -> list[int]:
    """Token ids ``hf_reference(model).generate`` must not produce: composer's banned placeholder
    ids and the zero rows added past the LLM's vocabulary."""
    vocab = model.adapter.shape.vocab_size
    extra = range(vocab, max(vocab, *(pid + 1 for pid in model.placeholder_ids.values())))
    return sorted({*model.banned_token_ids, *extra})


def hf_reference(model):
    """``LlavaForConditionalGeneration`` holding ``model``'s own tensors (no copy), in eval mode,
    set up to generate like the bench's other runtimes: no EOS stop (pass
    ``suppress_tokens=hf_suppress_tokens(model)`` to ban the placeholder ids as composer does).
    Raises ``InputError`` when ``hf_reference_unsupported(model)``."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from composer.adapters.encoder import maybe_no_init

    why = hf_reference_unsupported(model)
    if why:
        raise InputError(f"no HF reference: {why}")
    (m,) = model.encoders
    enc = model.encoders[m]
    spec = model.spec.modalities[m]
    has_cls = enc.has_cls_token and spec.encoder.select == "patch"
    llm_cfg, vis_cfg = model.llm.config, enc.model.config
    # A placeholder id past the LLM's vocabulary (composer never embeds it): HF Llava embeds every
    # input id, so its embedding (and head) get zero rows up to that id, whose logits are
    # suppressed (``hf_suppress_tokens``): the same weights, the same outputs on the real vocabulary.
    vocab = model.adapter.shape.vocab_size
    ref_vocab = max(vocab, model.placeholder_ids[m] + 1)
    cfg = LlavaConfig(
        text_config={**llm_cfg.to_dict(), "vocab_size": ref_vocab},
        vision_config=vis_cfg.to_dict(),
        image_token_index=model.placeholder_ids[m],
        image_seq_length=model.num_tokens(m),
        vision_feature_layer=enc.feature_layer,
        vision_feature_select_strategy="default" if has_cls else "full",
        projector_hidden_act=spec.projector.activation,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(llm_cfg, "tie_word_embeddings", False)),
    )
    cfg.text_config._attn_implementation = llm_cfg._attn_implementation
    cfg.vision_config._attn_implementation = vis_cfg._attn_implementation
    with maybe_no_init(True):
        ref = LlavaForConditionalGeneration(cfg)
    state = llava_state_dict(model, m)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        if ref_vocab > vocab and key in state:
            w = state[key]
            state[key] = torch.cat([w, w.new_zeros(ref_vocab - vocab, w.shape[1])])
    ref.load_state_dict(state, strict=not cfg.tie_word_embeddings, assign=True)  # shares the tensors
    if cfg.tie_word_embeddings:
        ref.tie_weights()
    ref = ref.to(model.device).eval()
    gc_ = ref.generation_config
    gc_.eos_token_id = None  # run exactly max_new_tokens, as the other runtimes do here
    gc_.pad_token_id = model.pad_token_id
    gc_.do_sample = False
    return ref


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

    def __init__(self, runtime: str, layout: Layout, fn, skip_prompt: bool):
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


# -- memory -----------------------------------------------------------------------------------------
def _proc_status(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _trim() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak memory above the current level while the block runs; ``.bytes`` after it.
    ``kind``: "cpu", "cuda-torch" (torch's allocator) or "cuda-device" (all device memory)."""

    def __init__(self, kind: str):
        self.kind = kind
        self.bytes: int | None = None
        self.method = ""

    def __enter__(self):
        _trim()
        if self.kind == "cuda-torch":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            self.method = "torch.cuda.max_memory_allocated above the allocation before the runs"
        elif self.kind == "cuda-device":
            free, total = torch.cuda.mem_get_info()
            self.base, self.peak, self.stop = total - free, total - free, threading.Event()

            def sample():
                while not self.stop.wait(0.005):
                    f, t = torch.cuda.mem_get_info()
                    self.peak = max(self.peak, t - f)

            self.thread = threading.Thread(target=sample, daemon=True)
            self.thread.start()
            self.method = "device memory in use (cudaMemGetInfo, sampled every 5 ms) above the level before the runs"
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
                self.base = _proc_status("VmRSS")
                self.method = "peak RSS (VmHWM, reset through /proc/self/clear_refs) above the RSS before the runs"
            except OSError:
                self.base = None
            if self.base is None:
                import resource

                self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                self.method = "ru_maxrss increase (a lower bound: it only grows past the process's earlier peak)"
        return self

    def __exit__(self, *exc):
        if self.kind == "cuda-torch":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.base
        elif self.kind == "cuda-device":
            self.stop.set()
            self.thread.join()
            self.bytes = self.peak - self.base
        elif self.method.startswith("peak RSS"):
            self.bytes = (_proc_status("VmHWM") or 0) - self.base
        else:
            import resource

            self.bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base
        self.bytes = max(0, self.bytes)
        return False


# -- the benchmark ---------------------------------------------------------------------------------
def layouts_for(model, ks: list[int] | None) -> list[Layout]:
    """k = 0 first, then each requested k (every modality at k), or the model's own insert_at."""
    n = model.num_layers
    mods = list(model.encoders)
    out = [Layout("0", {m: 0 for m in mods})]
    if ks is None:
        own = dict(model.insert_at)
        vals = set(own.values())
        if vals != {0}:
            label = str(vals.pop()) if len(vals) == 1 else ",".join(f"{m}={k}" for m, k in own.items())
            out.append(Layout(label, own))
        return out
    for k in ks:
        if not 0 <= k < n:
            raise InputError(f"--insert-at {k}: must be in [0, {n}) for this {n}-layer LLM")
        if k and str(k) not in {lay.label for lay in out}:
            out.append(Layout(str(k), {m: k for m in mods}))
    return out


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def run_bench(model, cfg: BenchConfig, progress=None) -> dict:
    """Measure every runtime in ``cfg.runtimes`` at k = 0 and each layout; -> a JSON-able dict.

    Example::

        model = composer.build("specs/tiny/llava.yaml").eval()
        result = run_bench(model, BenchConfig(insert_at=[2], repeats=3))
    """
    say = progress or (lambda s: None)
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
        from composer.export.quantize import SCHEMES

        if "onnx" not in cfg.runtimes or any(q not in SCHEMES for q in cfg.quantize) or model.dtype != torch.float32:
            raise InputError(
                f"--quantize takes {sorted(SCHEMES)} with the onnx runtime and a float32 model, "
                f"got {list(cfg.quantize)} ({model.dtype}, runtimes {list(cfg.runtimes)})"
            )
    threads_before = torch.get_num_threads()
    device = torch.device(cfg.provider)
    model = model.to(device).eval()
    layouts = layouts_for(model, cfg.insert_at)
    at = {lay.label: model.with_insert_at(lay.insert_at) for lay in layouts}  # same weights, each k
    batch = bench_inputs(model, cfg.text_tokens, cfg.batch, cfg.seed)
    text, mm = token_counts(model, batch)
    shape = model.adapter.shape
    skipped: dict[str, str] = {}
    runners: list[Runner] = []
    memory: dict[tuple[str, str], int | None] = {}
    memory_method: dict[str, str] = {}
    warm_runs: dict[tuple[str, str], list[Run]] = {}
    N = cfg.new_tokens
    gen = {"max_new_tokens": N, "do_sample": False}

    def warm(r: Runner) -> None:
        kind = "cpu" if device.type == "cpu" else ("cuda-device" if r.runtime == "onnx" else "cuda-torch")
        say(f"warming up {r.runtime} at k={r.layout.label}")
        with PeakMemory(kind) as pm:
            warm_runs[(r.runtime, r.layout.label)] = [r.run(cfg.batch, N) for _ in range(cfg.warmup)]
        memory[(r.runtime, r.layout.label)] = pm.bytes if cfg.warmup else None
        memory_method[r.runtime] = pm.method

    dev_batch = {k: _to(v, device) for k, v in batch.items()}
    tmp = tempfile.TemporaryDirectory(prefix="compose-bench-")
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        # one untracked run first: torch's one-off allocations (thread pools, kernel caches)
        # would otherwise land in the memory of whichever configuration runs first
        with torch.no_grad():
            model.generate(**dev_batch, max_new_tokens=2, eos_token_id=[])
        if "onnx" in cfg.runtimes:
            why = _onnx_unavailable(cfg.provider)
            if why:
                skipped["onnx"] = why
            else:
                from composer.export.exporter import export_onnx
                from composer.export.runtime import OnnxPipeline

                dtype = "fp16" if model.dtype == torch.float16 else "fp32"
                for scheme, lay in ((q, lay) for q in (None, *cfg.quantize) for lay in layouts):
                    name = "onnx" if scheme is None else f"onnx-{scheme}"
                    say(f"exporting the ONNX bundle at k={lay.label}" + (f" ({scheme})" if scheme else ""))
                    variant = at[lay.label]
                    bundle = export_onnx(
                        variant.cpu() if device.type != "cpu" else variant,
                        Path(tmp.name) / f"k{lay.label}{'' if scheme is None else '-' + scheme}",
                        dtype=dtype,
                        quantize=scheme,
                    )
                    model.to(device)
                    so = _ort_options(cfg.ort_spinning, cfg.threads)
                    pipe = OnnxPipeline(bundle, provider=cfg.provider, session_options=so)
                    mm_in = {m: batch[m] for m in model.encoders if m in batch}

                    def fn(clock, pipe=pipe, mm_in=mm_in):
                        return pipe.generate(
                            batch["input_ids"], batch["attention_mask"], eos_token_id=[], streamer=clock, **gen, **mm_in
                        )

                    runners.append(Runner(name, lay, fn, skip_prompt=False))
                    warm(runners[-1])
        if "torch" in cfg.runtimes:
            for lay in layouts:

                def fn(clock, variant=at[lay.label]):
                    return variant.generate(**dev_batch, eos_token_id=[], streamer=clock, **gen)

                runners.append(Runner("torch", lay, fn, skip_prompt=False))
                warm(runners[-1])
        if "hf" in cfg.runtimes:
            why = hf_reference_unsupported(model)
            if why:
                skipped["hf"] = why
            else:
                say("building the HF reference")
                ref = hf_reference(model)
                (m,) = model.encoders
                hb = {
                    "input_ids": batch["input_ids"].to(device),
                    "attention_mask": batch["attention_mask"].to(device),
                    "pixel_values": batch[m].to(device, model.encoders[m].dtype),
                }
                banned = hf_suppress_tokens(model) or None
                L = hb["input_ids"].shape[1]

                def fn(clock):
                    return ref.generate(**hb, suppress_tokens=banned, streamer=clock, **gen)[:, L:]

                runners.append(Runner("hf", layouts[0], fn, skip_prompt=True))
                warm(runners[-1])
        times: dict[tuple[str, str], list[Run]] = {(r.runtime, r.layout.label): [] for r in runners}
        for i in range(cfg.repeats):
            say(f"timed round {i + 1} of {cfg.repeats}")
            for r in runners:
                times[(r.runtime, r.layout.label)].append(r.run(cfg.batch, N))
        threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads_before)
        tmp.cleanup()

    analytic = {lay.label: saving(shape, text, mm, lay.insert_at) for lay in layouts}
    rows = []
    for r in runners:
        key = (r.runtime, r.layout.label)
        runs = times[key]
        first = (warm_runs[key] or runs)[0]
        rows.append(
            {
                "runtime": r.runtime,
                "k": r.layout.label,
                "insert_at": r.layout.insert_at,
                "prefill_s": _stats([x.prefill_s for x in runs]),
                "decode_tokens_per_s": _stats([x.decode_tps for x in runs]),
                "peak_memory_mib": None if memory[key] is None else memory[key] / 2**20,
                "tokens": first.tokens,
            }
        )
    _add_ratios(rows, analytic)
    return {
        "name": model.spec.name,
        "device": cfg.provider,
        "cpu": cpu_info(),
        "threads": threads,
        "onnxruntime_session": {
            "session.intra_op.allow_spinning": "1" if cfg.ort_spinning else "0",
            "intra_op_num_threads": cfg.threads or 0,
        },
        "versions": _versions(),
        "model": {
            "family": model.llm.config.model_type,
            "num_layers": shape.num_layers,
            "hidden_size": shape.hidden_size,
            "intermediate_size": shape.intermediate_size,
            "dtype": str(model.dtype).replace("torch.", ""),
        },
        "settings": {
            "text_tokens": text,
            "mm_tokens": mm,
            "batch": cfg.batch,
            "new_tokens": N,
            "warmup": cfg.warmup,
            "repeats": cfg.repeats,
            "seed": cfg.seed,
        },
        "layouts": [{"k": lay.label, "insert_at": lay.insert_at} for lay in layouts],
        "analytic_prefill_saving": analytic,
        "memory_method": memory_method,
        "skipped": skipped,
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


def _versions() -> dict[str, str]:
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__}
    with contextlib.suppress(ImportError):
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    return out


# -- output ------------------------------------------------------------------------------------------
def _span(s: dict, fmt: str) -> str:
    return f"{s['median']:{fmt}} ({s['min']:{fmt}}–{s['max']:{fmt}})"


def _ratio(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"


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
        sat = " (its u8 x s8 GEMM saturates: w8a8 is inexact here)" if cpu["u8s8_gemm_saturates"] else ""
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


__all__ = ["BenchConfig", "bench_inputs", "hf_reference", "hf_reference_unsupported", "render", "run_bench"]
