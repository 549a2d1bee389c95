"""ONNX Runtime inference over a split bundle: preprocessing, encoders, prefill, decode loop.

The host side lays the prompt out as ``composer.layout`` does (slots, baseline positions) and
passes each graph small integer tensors; the graphs build their own masks. Per LLM graph it keeps
a KV cache of preallocated buffers (``StageCache``): the prefill writes the prompt's rows, every
decode step one row, in place under IO binding (the default), so a step copies no earlier token;
generate() reserves room for ``max_new_tokens`` after the prefill, and a buffer that fills up
grows (one copy). With the CUDA provider the buffers and hidden states stay on the device.

Example::

    pipe = OnnxPipeline("out/tiny-llava.onnx")
    batch = pipe.prepare([pipe.format_prompt("What is it?")], image=["cat.png"])
    ids = pipe.generate(**batch, max_new_tokens=16)
    print(pipe.decode(ids))
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from composer.errors import ComposerError, InputError, first_line
from composer.export.graphs import early_io, kv_names, late_io
from composer.export.manifest import Stage, read_manifest
from composer.frontend import FrontEnd
from composer.layout import baseline_positions_np, compact_np

_NP = {"fp32": np.float32, "fp16": np.float16}


def default_session_options(spinning: bool = False, threads: int | None = None):
    """Session options for the bundle's graphs. Each graph is its own session with its own
    intra-op thread pool; with spinning on (ONNX Runtime's default) the threads of the graph that
    just ran busy-wait while the next graph runs and take cores from it, so composer turns it off.
    Measured on 2 cores with another process busy on one (24 layers, d=1024, k=12, default
    threads): about 3 decode tokens/s with spinning, 9 without (``compose bench --ort-spinning``
    compares). ``threads``: intra-op threads per session (None: ONNX Runtime's default).

    Denormal floats are flushed to zero: a masked attention score (the mask adds the float32
    minimum) makes ``exp`` underflow through the denormal range, which x86 computes ~100x slower;
    ONNX Runtime's CPU softmax took 6.1 ms instead of 1.0 ms on SmolLM2's (9, 640, 656) prefill
    scores, and its attention half of the prefill (``benchmarks/ort_profile.py``). The values
    flushed are below 1.2e-38, so the outputs do not change beyond float32 rounding."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.add_session_config_entry("session.set_denormal_as_zero", "1")
    so.intra_op_num_threads = threads or 0  # 0: ONNX Runtime's default (the physical cores)
    return so


def _flushes_denormals() -> bool:
    """Whether the calling thread flushes denormal float results to zero (x86 FTZ)."""
    return float(np.float32(1e-38) / np.float32(10.0)) == 0.0


@contextlib.contextmanager
def _denormal_mode(flush: bool | None):
    """Run the block with the calling thread flushing denormals (``flush``; None: as it is) and put
    the thread's mode back afterwards. ONNX Runtime sets flush-to-zero on the thread that creates a
    session with ``set_denormal_as_zero`` and leaves it set, which would change every later float
    computation of the caller's thread (torch, numpy); its session runs, where the calling thread
    does part of the work, need it set again."""
    before = _flushes_denormals()
    if flush is not None and flush != before:
        torch.set_flush_denormal(flush)
    try:
        yield
    finally:
        if _flushes_denormals() != before:
            torch.set_flush_denormal(before)


class StageCache:
    """One LLM graph's KV cache between calls: per layer a key and a value buffer (B, h, cap,
    head_dim), the slot id and validity of every row, and how many rows are written
    (``length``). With ``device`` set ("cpu" or "cuda": IO binding) the buffers are OrtValues
    the graph updates in place; without, numpy arrays replaced by the graph's outputs."""

    def __init__(self, names: list[str], shape: tuple[int, int, int], cap: int, dtype, device: str | None):
        self.names, self.dtype, self.device = names, dtype, device
        B, self.heads, self.head_dim = shape
        self.length = 0
        self.slots = np.zeros((B, 0), np.int64)
        self.valid = np.zeros((B, 0), bool)
        self.host: dict[str, np.ndarray] = {}  # the numpy arrays behind CPU OrtValues (kept alive)
        self.bufs: dict[str, Any] = {}
        self.index = np.zeros((B,), np.int64)  # write_index, updated in place
        self.feeds: dict[str, Any] = {}  # cache_slots / cache_valid / write_index as the graph is fed them
        self._resize(cap)

    @property
    def capacity(self) -> int:
        return self.slots.shape[1]

    def _resize(self, cap: int) -> None:
        B = self.slots.shape[0]
        n = self.length
        slots, valid = np.zeros((B, cap), np.int64), np.zeros((B, cap), bool)
        slots[:, :n], valid[:, :n] = self.slots[:, :n], self.valid[:, :n]
        self.slots, self.valid = slots, valid
        for name in self.names:
            new = np.zeros((B, self.heads, cap, self.head_dim), self.dtype)  # zeros: a masked row adds 0 * value
            if name in self.bufs:  # a CPU buffer's rows are read in place, a device one's copied back once
                old = self.host[name] if name in self.host else _to_numpy(self.bufs[name])
                new[:, :, :n] = old[:, :, :n]
            self.bufs[name] = new
            if self.device is not None:
                import onnxruntime as ort

                self.bufs[name] = ort.OrtValue.ortvalue_from_numpy(new, self.device, 0)
                if self.device == "cpu":  # the OrtValue shares the array's memory: keep the array alive
                    self.host[name] = new
        self.feeds = {"cache_slots": self.slots, "cache_valid": self.valid, "write_index": self.index}
        if self.device == "cpu":  # OrtValues over the same memory: written in place, bound once per resize
            import onnxruntime as ort

            self.feeds = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in self.feeds.items()}

    def reserve(self, rows: int) -> None:
        """Room for ``rows`` more rows (one copy of the written rows when the buffers grow)."""
        if self.length + rows > self.capacity:
            self._resize(self.length + rows)

    def write(self, slots: np.ndarray, valid: np.ndarray) -> dict[str, Any]:
        """Record T new rows (their slot ids and validity) at ``length``; -> the graph's cache feeds."""
        T = slots.shape[1]
        if self.length + T > self.capacity:
            self._resize(self.length + max(T, 256, self.capacity // 2))
        at = self.length
        self.slots[:, at : at + T], self.valid[:, at : at + T] = slots, valid
        self.index[:] = at
        self.length += T
        return {**self.feeds, **self.bufs}

    def update(self, present: dict[str, Any]) -> None:
        """Take the graph's present buffers; under IO binding they are the same memory, updated in place."""
        if self.device is None:
            self.bufs.update({k.replace("present_", "past_", 1): v for k, v in present.items()})


class OnnxPipeline(FrontEnd):
    """Generation with ONNX Runtime over ``BUNDLE``; ``provider`` is "cpu" or "cuda";
    ``io_binding`` (default: on) keeps the KV buffers (updated in place) and hidden states as
    OrtValues on the device; off, every graph call returns new numpy arrays (each decode step
    then copies the whole cache). ``session_options`` default: ``default_session_options()``
    (intra-op spinning off). ``format_prompt``, ``prepare``, ``generate`` and ``decode`` come
    from ``composer.frontend.FrontEnd``, shared with the torch model."""

    runtime = "onnxruntime"
    input_device = torch.device("cpu")

    def __init__(self, bundle: str | Path, provider: str = "cpu", session_options=None, io_binding: bool | None = None):
        import onnxruntime as ort

        self.root = Path(bundle)
        self.manifest = read_manifest(self.root)
        if provider not in ("cpu", "cuda"):
            raise InputError(f"provider must be 'cpu' or 'cuda', got {provider!r}")
        quantization = self.manifest.quantization
        if provider == "cpu" and quantization is not None and quantization.saturates_without_vnni:
            from composer.export.quantize import u8s8_gemm_saturates

            if u8s8_gemm_saturates():
                warnings.warn(
                    f"{self.root}: a w8a8 bundle on a CPU without VNNI or AMX: ONNX Runtime's uint8 x int8 GEMM "
                    "saturates 16-bit sums here, so its answers drift from the verified ones (docs/export.md); "
                    "export with --reduce-range (7-bit weights) or an int8 bundle for this CPU",
                    RuntimeWarning,
                    stacklevel=2,
                )
        if provider == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ComposerError(
                "provider 'cuda' needs onnxruntime-gpu (pip install 'mm-composer[gpu]') and a CUDA device"
            )
        self.provider = provider
        # IO binding keeps hidden states and the KV buffers as OrtValues on the device between
        # graphs and steps, the buffers updated in place (TensorScatter); on by default.
        self.io_binding = True if io_binding is None else io_binding
        self.device = "cuda" if provider == "cuda" else "cpu"
        providers = (
            ["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "cuda" else ["CPUExecutionProvider"]
        )
        self.sessions = {}
        if session_options is None:
            session_options = default_session_options()
        entries = session_options.get_session_config_entry  # raises for a key never set
        with contextlib.suppress(Exception):
            self._flush_denormals = entries("session.set_denormal_as_zero") == "1" or None
        for name in self.manifest.graphs:
            try:
                with _denormal_mode(None):
                    self.sessions[name] = ort.InferenceSession(
                        str(self.root / name), sess_options=session_options, providers=providers
                    )
            except Exception as e:  # ORT raises its own exception types for corrupt graphs/data
                raise InputError(f"{self.root / name}: cannot load ({first_line(e)[:200]})") from None
        self.inputs = {n: {i.name for i in s.get_inputs()} for n, s in self.sessions.items()}
        self.outputs = {n: [o.name for o in s.get_outputs()] for n, s in self.sessions.items()}
        # each LLM graph's declared inputs: every feed is built through them (graphs.GraphIO.feeds)
        self.io = {}
        for i, st in enumerate(self.manifest.stages):
            io = early_io(st.end) if i == 0 else late_io(st.start, st.end, st.last)
            self.io[st.graph] = io
            if st.decode_graph:  # the same layers quantized for decode steps: the same inputs and outputs
                self.io[st.decode_graph] = io
        self.dtype = _NP[self.manifest.dtype]
        self.d = self.manifest.llm.hidden_size
        self.kv = self.manifest.kv
        self.encoders = self.manifest.encoders
        self.placeholder_ids = {m: e.placeholder_id for m, e in self.encoders.items()}
        self._tokenizer = None
        self._processors: dict[str, Any] = {}
        self.recorder: list | None = None

    # -- text and media ----------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from composer.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(str(self.root / self.manifest.tokenizer), "tokenizer", local=True)
        return self._tokenizer

    def processor(self, m: str):
        if m not in self._processors:
            from composer.adapters import ENCODER_ADAPTERS

            adapter = ENCODER_ADAPTERS[self.encoders[m].type]
            self._processors[m] = adapter.load_processor(str(self.root / self.encoders[m].processor))
        return self._processors[m]

    @property
    def placeholders(self) -> dict[str, str]:
        return {m: e.placeholder for m, e in self.encoders.items()}

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def encoder_types(self) -> dict[str, str]:
        """Modality -> encoder type (registry name)."""
        return {m: e.type for m, e in self.encoders.items()}

    def num_tokens(self, m: str) -> int:
        """MM tokens per item of ``m`` (what one placeholder expands to)."""
        return self.encoders[m].tokens_per_item

    @property
    def prompt_template(self) -> str | None:
        """The spec's ``prompt.template``; None: prompts use the tokenizer's chat template."""
        return self.manifest.prompt_template

    @property
    def context_length(self) -> int | None:
        """The LLM's ``max_position_embeddings`` (None for bundles written before it was recorded)."""
        return self.manifest.llm.max_position_embeddings

    # -- graphs ----------------------------------------------------------------------------------------
    def _run(self, graph: str, feeds: dict[str, Any], bindings: dict | None = None) -> dict[str, Any]:
        if self.recorder is None:
            return self._run_session(graph, feeds, bindings)
        before = {k: np.array(_to_numpy(v)) for k, v in feeds.items()}  # in-place writes change the buffers
        out = self._run_session(graph, feeds, bindings)
        kept = {k: _to_numpy(v) for k, v in out.items() if not k.startswith("present_")}  # --verify checks these
        self.recorder.append((graph, before, kept))  # --verify replays the call through torch
        return out

    _flush_denormals: bool | None = None  # the sessions' set_denormal_as_zero (None: not set)

    def _run_session(self, graph: str, feeds: dict[str, Any], bindings: dict | None = None) -> dict[str, Any]:
        with _denormal_mode(self._flush_denormals):
            return self._run_session_now(graph, feeds, bindings)

    def _run_session_now(self, graph: str, feeds: dict[str, Any], bindings: dict | None = None) -> dict[str, Any]:
        """One graph call. Under IO binding, ``bindings`` (a generation's, kept in its decode
        state) holds each graph's ``IOBinding`` between calls and what is bound to it: a decode step
        then rebinds only the few feeds that are new each step, not the KV buffers and cache feeds
        that stay the same objects (~130 binding calls a step on SmolLM2). The bindings hold the
        buffers, so they live and die with the generation's state."""
        sess = self.sessions[graph]
        feeds = {k: v for k, v in feeds.items() if k in self.inputs[graph]}
        names = self.outputs[graph]
        if not self.io_binding:
            return dict(zip(names, sess.run(names, feeds), strict=True))
        import onnxruntime as ort

        if bindings is None:
            binding, bound = sess.io_binding(), {}
        else:
            binding, bound = bindings.setdefault(graph, (sess.io_binding(), {}))
        for k, v in feeds.items():
            if isinstance(v, ort.OrtValue):
                if bound.get(k) is not v:  # the KV buffers and cache feeds: bound once, updated in place
                    binding.bind_ortvalue_input(k, v)
                    bound[k] = v
            else:
                binding.bind_cpu_input(k, np.ascontiguousarray(v))
                bound[k] = None
        for n in names:
            past = feeds.get(n.replace("present_", "past_", 1)) if n.startswith("present_") else None
            if isinstance(past, ort.OrtValue):
                if bound.get(n) is not past:
                    binding.bind_ortvalue_output(n, past)  # the buffer is updated in place
                    bound[n] = past
            else:
                binding.bind_output(n, "cpu" if n == "logits" else self.device)  # a new tensor each run
                bound[n] = None
        sess.run_with_iobinding(binding)
        outs = binding.get_outputs_as_ortvaluevector()  # wrapping all ~31 outputs costs ~0.3 ms a call
        result = {}
        for i, n in enumerate(names):
            if bound.get(n) is not None:  # a KV buffer, written in place: the bound OrtValue itself
                result[n] = bound[n]
            else:
                v = ort.OrtValue(outs[i])
                result[n] = v.numpy() if n == "logits" else v
        return result

    def encode(self, m: str, features) -> Any:
        """Preprocessed inputs (a tensor, or a dict for multi-input encoders) -> tokens (n, T, d)."""
        names = self.encoders[m].inputs
        if not isinstance(features, dict):
            (name,) = names
            features = {name: features}
        feeds = {}
        for k in names:
            x = features[k].numpy() if isinstance(features[k], torch.Tensor) else np.asarray(features[k])
            feeds[k] = x.astype(self.dtype) if np.issubdtype(x.dtype, np.floating) else x
        out = self._run(self.encoders[m].graph, feeds)
        tok = out["tokens"]
        return tok if isinstance(tok, np.ndarray) else tok.numpy()

    def _new_cache(self, B: int, stage: Stage, rows: int) -> StageCache:
        names = kv_names("past", stage.start, stage.end)
        shape = (B, self.kv.num_kv_heads, self.kv.head_dim)
        return StageCache(names, shape, rows, self.dtype, self.device if self.io_binding else None)

    # -- the split forward pass ------------------------------------------------------------------------------
    def prefill(
        self,
        input_ids,
        attention_mask,
        modality_inputs: dict[str, Any],
        *,
        all_logits: bool = False,
        reserve: int = 0,
    ):
        """-> (logits, state). ``logits`` (B, V) at the last slot, or (B, L, V) in slot order
        when ``all_logits`` (used by ``--verify``); ``state`` holds one ``StageCache`` per LLM
        graph, with room for ``reserve`` decode steps."""
        ids = np.asarray(input_ids.cpu() if isinstance(input_ids, torch.Tensor) else input_ids, dtype=np.int64)
        mask = np.asarray(attention_mask.cpu() if isinstance(attention_mask, torch.Tensor) else attention_mask).astype(
            bool
        )
        slot_masks = {m: ids == pid for m, pid in self.placeholder_ids.items()}
        prompt = _Prompt(
            ids, mask, baseline_positions_np(mask), slot_masks, self._mm_tokens(slot_masks, modality_inputs)
        )
        state = {"caches": [], "next_slot": ids.shape[1], "next_pos": prompt.pos[:, -1] + 1}
        rows, hidden, cache = self._prefill_early(prompt)
        state["caches"].append(cache)
        logits = None
        for st in self.manifest.stages[1:]:
            rows, out, cache = self._prefill_late(st, prompt, rows, hidden, all_logits)
            if st.last:
                logits = out
            else:
                hidden = out
            state["caches"].append(cache)
        for cache in state["caches"]:
            cache.reserve(reserve)
        logits = logits if all_logits else logits[:, 0]
        return logits, state

    def _prefill_early(self, prompt: _Prompt) -> tuple[tuple, Any, StageCache]:
        """The early text graph over the text slots only (composer.layout's compaction, in its numpy
        twin); -> (its rows: slots, validity, positions), hidden states, its cache."""
        is_mm = prompt.is_mm()
        slots, valid, pos = compact_np(~is_mm, prompt.mask, prompt.pos)
        early = self.manifest.stages[0]
        cache = self._new_cache(prompt.ids.shape[0], early, slots.shape[1])
        out = self._run(
            early.graph,
            self.io[early.graph].feeds(
                input_ids=_take(np.where(is_mm, 0, prompt.ids), slots, 0),
                position_ids=pos,
                slots=slots,
                **cache.write(slots, valid),
            ),
        )
        hidden = out.pop("hidden")
        cache.update(out)
        return (slots, valid, pos), hidden, cache

    def _prefill_late(self, st: Stage, prompt: _Prompt, rows: tuple, hidden, all_logits: bool):
        """One late graph: the hidden ``rows`` (slots, validity, positions) so far plus the tokens of
        the modalities entering at its first layer; -> (the rows after it, its logits if it is the
        last graph else its hidden states, its cache)."""
        cur_slots, cur_valid, cur_pos = rows
        B, L = prompt.ids.shape
        midx, mm_valid, mm_pos, mm = prompt.entering(st.enter, self.d, self.dtype)
        all_slots = np.concatenate([cur_slots, midx], 1)
        if all_logits:
            logit_rows = np.argsort(all_slots, axis=1, kind="stable")[:, :L]
        else:
            logit_rows = np.argmax(all_slots == L - 1, axis=1)[:, None]
        valid = np.concatenate([cur_valid, mm_valid], 1)
        cache = self._new_cache(B, st, all_slots.shape[1])
        out = self._run(
            st.graph,
            self.io[st.graph].feeds(
                hidden=hidden,
                hidden_slots=cur_slots,
                hidden_positions=cur_pos,
                mm_tokens=mm,
                mm_slots=midx,
                mm_positions=mm_pos,
                logit_rows=logit_rows.astype(np.int64),
                **cache.write(all_slots, valid),
            ),
        )
        result = out.pop("logits" if st.last else "hidden_out")
        cache.update(out)
        return (all_slots, valid, np.concatenate([cur_pos, mm_pos], 1)), result, cache

    def decode_step(self, tokens: np.ndarray, state: dict) -> np.ndarray:
        """One new token per row through every stage (its ``decode_graph`` where the bundle has
        one); -> logits (B, V)."""
        B = tokens.shape[0]
        slot = np.full((B, 1), state["next_slot"], np.int64)
        pos = state["next_pos"][:, None].astype(np.int64)
        one = np.ones((B, 1), bool)
        hidden = None
        logits = None
        bindings = state.setdefault("bindings", {})  # this generation's IO bindings, reused step to step
        for s, st in enumerate(self.manifest.stages):
            cache = state["caches"][s]
            graph = st.decode_graph or st.graph  # --decode-quantize's graphs where the bundle has them
            io = self.io[graph]
            if s == 0:
                out = self._run(
                    graph,
                    io.feeds(input_ids=tokens.astype(np.int64), position_ids=pos, slots=slot, **cache.write(slot, one)),
                    bindings,
                )
                hidden = out.pop("hidden")
            else:
                out = self._run(
                    graph,
                    io.feeds(
                        hidden=hidden,
                        hidden_slots=slot,
                        hidden_positions=pos,
                        mm_tokens=np.zeros((B, 0, self.d), self.dtype),
                        mm_slots=np.zeros((B, 0), np.int64),
                        mm_positions=np.zeros((B, 0), np.int64),
                        logit_rows=np.zeros((B, 1), np.int64),
                        **cache.write(slot, one),
                    ),
                    bindings,
                )
                if st.last:
                    logits = out.pop("logits")[:, 0]
                else:
                    hidden = out.pop("hidden_out")
            cache.update(out)
        state["next_slot"] += 1
        state["next_pos"] = state["next_pos"] + 1
        return logits

    def decoder(
        self, input_ids, attention_mask, modality_inputs: dict[str, Any], *, use_cache: bool = True, reserve: int = 0
    ):
        """``decode_loop``'s ``step`` over one left-padded batch: its first call (no new tokens yet)
        runs the prefill (KV buffers with room for ``reserve`` decode steps), each later call one
        decode step; -> logits (B, V). ``use_cache=False`` runs the prefill over the whole sequence
        every call (the reference the cached path is tested against)."""
        state: dict = {}

        def step(out: torch.Tensor) -> torch.Tensor:
            if not use_cache:
                ids = torch.cat([torch.as_tensor(input_ids), out], 1)
                am = torch.cat([torch.as_tensor(attention_mask), torch.ones_like(out)], 1)
                return torch.from_numpy(np.asarray(self.prefill(ids, am, modality_inputs)[0]))
            if out.shape[1] == 0:
                logits, st = self.prefill(input_ids, attention_mask, modality_inputs, reserve=reserve)
                state.update(st)
                return torch.from_numpy(np.asarray(logits))
            return torch.from_numpy(np.asarray(self.decode_step(out[:, -1:].numpy(), state)))

        return step

    @functools.cached_property
    def _generation(self):
        from composer.generation import read_generation_config

        return read_generation_config(self.root, self.manifest.generation.spec())

    @property
    def generation_spec(self):
        """The defaults of ``generate``: the spec's ``generation`` section as the manifest records it,
        under the bundle's ``generation_config.json`` (edit it to change them)."""
        return self._generation[0]

    @property
    def sliding_window(self) -> int | None:
        return self.manifest.llm.sliding_window

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self._generation[1]
        return list(self.manifest.generation.eos_token_id) if eos is None else eos

    @property
    def pad_token_id(self) -> int:
        return self.manifest.generation.pad_token_id

    @property
    def banned_token_ids(self) -> list[int]:
        return list(self.manifest.generation.banned_token_ids)

    def _mm_tokens(self, slot_masks, modality_inputs) -> dict[str, np.ndarray]:
        out = {}
        for m in self.check_modality_inputs(slot_masks, modality_inputs):
            tok = self.encode(m, modality_inputs[m])
            self.check_token_count(m, int(slot_masks[m].sum()), tok)
            out[m] = tok.reshape(-1, tok.shape[-1]).astype(self.dtype)
        return out


@dataclasses.dataclass
class _Prompt:
    """A prefill's batch as the graphs take it: ids and mask (B, L), baseline positions, each
    modality's placeholder slots and its encoded tokens (flat, in row-major slot order)."""

    ids: np.ndarray
    mask: np.ndarray
    pos: np.ndarray
    slot_masks: dict[str, np.ndarray]
    tokens: dict[str, np.ndarray]

    def is_mm(self) -> np.ndarray:
        out = np.zeros_like(self.mask)
        for sm in self.slot_masks.values():
            out |= sm
        return out

    def entering(self, modalities: list[str], d: int, dtype) -> tuple[np.ndarray, ...]:
        """The slots of ``modalities`` compacted per row -> (slots, validity, positions, tokens (B, T, d))."""
        B, L = self.ids.shape
        enter = np.zeros_like(self.mask)
        for m in modalities:
            enter |= self.slot_masks[m]
        midx, mm_valid, mm_pos = compact_np(enter, self.mask, self.pos)
        filled, safe = midx < L, np.minimum(midx, L - 1)
        mm = np.zeros((B, midx.shape[1], d), dtype=dtype)
        for m in modalities:
            if m in self.tokens:
                rows, cols = np.nonzero(self.slot_masks[m][np.arange(B)[:, None], safe] & filled)
                mm[rows, cols] = self.tokens[m][_flat_rank(self.slot_masks[m])[rows, safe[rows, cols]]]
        return midx, mm_valid, mm_pos, mm


def _take(a: np.ndarray, idx: np.ndarray, fill) -> np.ndarray:
    L = a.shape[1]
    got = np.take_along_axis(a, np.minimum(idx, L - 1), 1)
    return np.where(idx < L, got, fill).astype(a.dtype)


def _flat_rank(mask: np.ndarray) -> np.ndarray:
    """Row-major rank of each True entry (the order of the flat per-modality token list)."""
    return (np.cumsum(mask.reshape(-1)) - 1).reshape(mask.shape)


def _to_numpy(v) -> np.ndarray:
    return v if isinstance(v, np.ndarray) else v.numpy()
