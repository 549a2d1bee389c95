"""Dynamic batching: concurrent requests generate together, each with its own settings.

One worker thread owns the model (an ``OnnxPipeline`` or a ``ComposedModel``). It takes the
oldest waiting request, waits up to ``batch_wait_s`` for more (at most ``max_batch`` in all),
left-pads their prepared rows into one batch and runs one prefill and one decode loop for it
(``composer.generation.decode_loop`` with one ``GenerationSpec`` and one generator per row, so a row's
tokens do not depend on its neighbours). A batch runs to its last row's end; requests that
arrive meanwhile wait for the next batch (at most ``max_queue`` of them: ``QueueFull`` past it).
Tokens go back to each request as they are chosen (``Job.emit``); a cancelled job (its client
went away) stops generating at the next step. A batch that fails is retried one request at a
time, so an error fails only the request that causes it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from composer.generation import decode_loop
from composer.spec import GenerationSpec

log = logging.getLogger("composer.serve")


class QueueFull(Exception):
    """More requests are waiting than the server's ``max_queue``."""


@dataclass
class Job:
    """One request: its prepared row (``prepare``'s one-row batch), settings, and where events go.
    ``emit`` receives ``("token", id)`` per new token, then ``("end", "stop" | "length")`` or
    ``("error", message)``; it is called from the worker thread."""

    batch: dict[str, Any]
    sampling: GenerationSpec
    emit: Callable[[tuple], None]
    generator: torch.Generator | None = None
    cancelled: bool = False
    emitted: int = 0
    finished: bool = False
    queued_at: float = field(default_factory=time.monotonic)

    @property
    def prompt_tokens(self) -> int:
        return int(self.batch["attention_mask"].sum())


def merge_rows(batches: list[dict[str, Any]], pad: int) -> dict[str, Any]:
    """One-row ``prepare`` batches -> one left-padded batch (media concatenated in row order)."""
    width = max(b["input_ids"].shape[1] for b in batches)
    ids = torch.full((len(batches), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batches), width), dtype=torch.long)
    media: dict[str, list] = {}
    for i, b in enumerate(batches):
        n = b["input_ids"].shape[1]
        ids[i, width - n :], mask[i, width - n :] = b["input_ids"][0], b["attention_mask"][0]
        for m, v in b.items():
            if m not in ("input_ids", "attention_mask"):
                media.setdefault(m, []).append(v)
    return {"input_ids": ids, "attention_mask": mask, **{m: torch.cat(v) for m, v in media.items()}}


def batchable(batch: dict[str, Any]) -> bool:
    """Rows whose media are plain tensors merge; multi-input encoders (graphs) run alone."""
    return all(isinstance(v, torch.Tensor) for v in batch.values())


class Batcher:
    """The worker thread and its queue. ``max_batch=1`` turns batching off."""

    def __init__(self, runtime, *, max_batch: int = 8, batch_wait_s: float = 0.01, max_queue: int = 64):
        if max_batch < 1 or max_queue < 1 or batch_wait_s < 0:
            raise ValueError("max_batch and max_queue must be >= 1, batch_wait_s >= 0")
        self.runtime = runtime
        self.max_batch, self.batch_wait_s, self.max_queue = max_batch, batch_wait_s, max_queue
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.batches = 0  # batches run, and rows in them (GET /health reports them)
        self.rows = 0

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="composer-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        if self._queue.qsize() >= self.max_queue:
            raise QueueFull(f"{self._queue.qsize()} requests are waiting (the server's --max-queue)")
        self._queue.put(job)

    def close(self, timeout: float | None = None) -> None:
        """Finish the waiting and running requests, then stop the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    # -- the worker thread ----------------------------------------------------------------------------
    def _loop(self) -> None:
        stopping = False
        while not stopping:
            job = self._queue.get()
            if job is None:
                break
            group = [job]
            deadline = time.monotonic() + self.batch_wait_s
            while len(group) < self.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:  # close(): run what was taken, then stop
                    stopping = True
                    break
                group.append(nxt)
            live = [j for j in group if not j.cancelled]
            for j in group:
                if j.cancelled:
                    self._end(j, ("end", "cancelled"))
            solo = [j for j in live if not batchable(j.batch)]
            for batch in [[j for j in live if batchable(j.batch)]] + [[j] for j in solo]:
                if batch:
                    self._run(batch)

    def _run(self, jobs: list[Job]) -> None:
        window = self.runtime.sliding_window
        if len(jobs) > 1 and window is not None:
            width = max(j.batch["input_ids"].shape[1] for j in jobs)
            if width + max(j.sampling.max_new_tokens for j in jobs) > window:  # padding would leave the window
                for j in jobs:
                    self._run([j])
                return
        try:
            self._generate(jobs)
        except Exception as e:  # noqa: BLE001 - one request's failure must not take the server down
            if len(jobs) > 1:
                log.warning("a batch of %d failed (%s); retrying its requests one at a time", len(jobs), e)
                for j in jobs:
                    if j.emitted == 0 and not j.finished:
                        self._run([j])
                    elif not j.finished:
                        self._end(j, ("error", f"generation failed: {type(e).__name__}: {e}"))
                return
            log.exception("request failed")
            self._end(jobs[0], ("error", f"generation failed: {type(e).__name__}: {e}"))

    def _generate(self, jobs: list[Job]) -> None:
        rt = self.runtime
        batch = merge_rows([j.batch for j in jobs], rt.pad_token_id)
        ids, mask = batch.pop("input_ids"), batch.pop("attention_mask")
        samplings = [j.sampling for j in jobs]
        eos = rt.eos_token_ids
        self.batches += 1
        self.rows += len(jobs)

        def on_step(tokens: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
            for i, j in enumerate(jobs):
                if j.finished:
                    continue
                tok = int(tokens[i])
                j.emitted += 1
                j.emit(("token", tok))
                if bool(done[i]):
                    long = j.emitted >= j.sampling.max_new_tokens and tok not in eos
                    self._end(j, ("end", "length" if long else "stop"))
            return torch.tensor([j.cancelled for j in jobs])

        with torch.inference_mode():
            step = rt.decoder(ids, mask, batch, reserve=max(s.max_new_tokens for s in samplings))
            decode_loop(
                step,
                ids,
                samplings,
                eos=eos,
                pad=rt.pad_token_id,
                banned=rt.banned_token_ids,
                generator=[j.generator for j in jobs],
                tokenizer=rt.tokenizer,
                on_step=on_step,
                attention_mask=mask,
            )
        for j in jobs:  # cancelled rows
            if not j.finished:
                self._end(j, ("end", "cancelled"))

    @staticmethod
    def _end(job: Job, event: tuple) -> None:
        job.finished = True
        job.emit(event)
