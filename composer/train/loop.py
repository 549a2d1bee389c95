"""`compose train`: a small, exact-resume training loop over a ComposedModel.

Per-component train modes come from the spec (frozen | lora | full); ``stage`` presets
follow the seed systems: stage 1 trains the projectors only (LLaVA pre-training), stage 2 the
projectors and the LLM as the spec says (LoRA or full). Gradient accumulation, bf16/fp16
autocast (bf16 also on CPU), gradient checkpointing, an eval loop, a progress bar and metrics as
JSONL (and TensorBoard when installed).

Precision: trainable parameters (projectors, trainable encoders, LoRA adapters, a fully trained
LLM) are held in fp32 for the whole run (the master weights AdamW updates; an update below
bf16's resolution still moves them), frozen parts stay in the spec's dtype, and the compute runs
under autocast. FSDP2 shards with a ``MixedPrecisionPolicy`` (params gathered in the compute
dtype, gradients reduced in fp32). The final model stores the trainable weights in the spec's
dtype again (``save_dtype="float32"`` keeps the fp32 masters); training checkpoints keep fp32.

The same loop runs on many ranks under ``torchrun`` or ``accelerate launch`` (DDP or FSDP,
``composer.train.distributed``): each global micro-batch is split over the ranks, the loss of a step
is normalised by the label tokens of the whole step, and metrics, progress and the final model
come from rank 0.

Checkpoints (``OUT/checkpoints/step-NNNNNN/``, ``composer.train.checkpoints``) hold no
pickles: trainable weights and optimizer tensors as sharded safetensors, everything else as
JSON. Resuming restores all of it, so the loss curve continues exactly as an uninterrupted
run's would (same seed, same machine, same world size), and a checkpoint also resumes on a
different number of ranks.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from composer.errors import InputError, SpecError
from composer.train.config import PRECISIONS, SAVE_DTYPES, TrainConfig, launcher_grad_accum  # noqa: F401 (re-exported)
from composer.train.data import Collator, read_jsonl

log = logging.getLogger("composer.train")
CKPT_DIR = "checkpoints"
METRICS = "metrics.jsonl"


def apply_stage(model, stage: int | None) -> None:
    """Set ``requires_grad`` for a stage preset (None: keep the spec's modes)."""
    from composer.builder import set_trainable

    if stage is None:
        return
    if stage not in (1, 2):
        raise InputError(f"--stage must be 1 or 2, got {stage}")
    for m in model.encoders:
        set_trainable(model.encoders[m], "frozen" if stage == 1 else model.spec.modalities[m].encoder.train)
        set_trainable(model.projectors[m], "full")
    if stage == 1:
        set_trainable(model.llm, "frozen")
    elif model.spec.llm.train == "frozen":
        raise SpecError(
            "llm.train: stage 2 trains the LLM; set `llm.train` to `lora` or `full` in the spec, got 'frozen'"
        )
    else:
        set_trainable(model.llm, model.spec.llm.train)


# -- the loop -----------------------------------------------------------------------------------------
def _autocast(model, precision: str, device: torch.device | None = None):
    """-> (autocast context, grad scaler or None, the precision resolved, the compute dtype or None).

    ``auto``: on CUDA the accelerate config's ``mixed_precision`` (ACCELERATE_MIXED_PRECISION),
    else bf16 where supported; on CPU bf16 when the model's weights are bf16, else fp32."""
    import os

    dev = (device or model.device).type
    if precision == "auto":
        launcher = {"bf16": "bf16", "fp16": "fp16", "no": "fp32"}.get(os.environ.get("ACCELERATE_MIXED_PRECISION", ""))
        if dev == "cuda":
            precision = launcher or ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
        else:
            precision = "bf16" if model.dtype == torch.bfloat16 else "fp32"
    if precision == "fp32":
        return torch.autocast(dev, enabled=False), None, precision, None
    if precision == "fp16" and dev != "cuda":
        raise InputError(f"--precision fp16 needs a CUDA device (this run is on {dev}); use bf16 or fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    return torch.autocast(dev, dtype=dtype), scaler, precision, dtype


def keep_master_weights(model) -> dict[str, torch.dtype]:
    """Hold every trainable floating-point parameter in fp32 (the master weights the optimizer
    updates); frozen parameters keep the spec's dtype. -> {name: dtype before} of those upcast."""
    was = {}
    for name, p in model.named_parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            was[name] = p.dtype
            p.data = p.data.float()
    return was


def micro_batches(n: int, bs: int, world: int, seed: int, epoch: int, seen: int = 0) -> list[list[int]]:
    """The rest of an epoch (after its first ``seen`` records) as global micro-batches of
    ``bs * world`` record indices; every rank computes the same list (same seed), then takes its
    share (``rank_share``). Positions count records, not batches, so a run resumes on another
    number of ranks without repeating or skipping a record."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()[seen:]
    return chunks(order, bs * world)


def chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)  # seed + rank + 7919 * step may pass numpy's 32 bits


def _label_count(batch) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


@dataclass
class _Failed:
    message: str


class _WorkerCollate:
    """The collator as DataLoader workers run it: a bad record comes back as its one-line message
    (raised again in the training process as ``InputError``), not as a worker's traceback."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, examples):
        try:
            return self.collate(examples)
        except InputError as e:
            return _Failed(str(e))


def batch_stream(examples, micro: list[list[int]], collate, eng, workers: int = 0, prefetch: int = 2):
    """(batch, real) for each global micro-batch of ``micro``, in order: this rank's part of each
    (``rank_share``; a rank whose part is empty, in an epoch's last, short micro-batch, runs the
    micro-batch's first record, to be weighted 0, so that every rank takes part in the collectives
    and nothing counts twice), collated by a ``DataLoader``: in ``workers`` processes that prepare
    ``prefetch`` batches each ahead while the model trains (0: in this process, on demand), into
    pinned memory on CUDA. The order is the precomputed one, so resuming and the record-exact
    sharding over ranks do not depend on the number of workers."""
    from torch.utils.data import DataLoader

    from composer.train.distributed import rank_share

    shares = [rank_share(chunk, eng.rank, eng.world) for chunk in micro]
    loader = DataLoader(
        examples,
        batch_sampler=[mine or chunk[:1] for mine, chunk in zip(shares, micro, strict=True)],
        collate_fn=_WorkerCollate(collate),
        num_workers=workers,
        prefetch_factor=prefetch if workers else None,
        pin_memory=eng.device.type == "cuda",
    )
    for batch, mine in zip(loader, shares, strict=True):
        if isinstance(batch, _Failed):
            raise InputError(batch.message)
        yield batch, bool(mine)


def evaluate(model, examples, collate, batch_size: int, autocast, eng=None, workers: int = 0) -> float:
    """Mean token loss over ``examples`` (sharded over the ranks when distributed)."""
    from composer.train.distributed import Engine

    eng = eng or Engine()
    was = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        micro = chunks(list(range(len(examples))), batch_size * eng.world)
        for batch, real in batch_stream(examples, micro, collate, eng, workers):
            n = _label_count(batch)
            with autocast:
                loss = model(**batch, num_items_in_batch=max(n, 1), return_logits=False).loss
            if real:
                total += float(loss) * max(n, 1)
                count += n
    model.train(was)
    total, count = eng.sum([total, count])
    return total / max(count, 1)


class _Metrics:
    def __init__(self, out: Path, resume_step: int):
        self.path = out / METRICS
        if self.path.exists():  # drop what a resumed run will write again
            keep = [
                ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= resume_step
            ]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:  # tensorboard is optional
            pass

    def write(self, rec: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, rec["step"])

    def close(self):
        if self.tb is not None:
            self.tb.close()


def train(model, cfg: TrainConfig) -> dict:
    """Train ``model`` in place; returns a summary. Writes checkpoints, metrics and the final
    model (a composer checkpoint: ``ComposedModel.from_pretrained(cfg.output)``).

    Under ``torchrun``/``accelerate launch`` every rank runs this with the same arguments:
    ``batch_size`` is per rank, so an optimizer step sees ``batch_size * grad_accum * world``
    records; the loss is the mean over all label tokens of the step, whatever the split over
    micro-batches and ranks (a 2-rank run matches a 1-rank run of the same global batch)."""
    from composer.train import distributed

    eng = distributed.setup(cfg.strategy)
    existed = Path(cfg.output).exists()
    ok = False
    try:
        out = _train(model, cfg, eng)
        ok = True
        return out
    except BaseException:
        if eng.main:
            _discard_unresumable(Path(cfg.output), existed)
        raise
    finally:
        eng.close(ok)


def _discard_unresumable(out: Path, existed: bool) -> None:
    """A run that failed (or was interrupted) before writing any checkpoint leaves nothing to resume:
    remove what it wrote (empty ``checkpoints/``, metrics, TensorBoard logs, and OUT itself when the
    run created it), so that a rerun does not find a non-empty output. A run with checkpoints keeps
    everything for ``--resume``."""
    ckpt = out / CKPT_DIR
    if not ckpt.is_dir() or any(ckpt.iterdir()):
        return
    ckpt.rmdir()
    (out / METRICS).unlink(missing_ok=True)
    shutil.rmtree(out / "tensorboard", ignore_errors=True)
    if not existed and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def _train(model, cfg: TrainConfig, eng) -> dict:
    """The run ``train`` guards: inputs checked, the model wrapped, resumed, stepped, saved."""
    from composer.train.distributed import peak_host_memory_mib

    out, examples, evals = _prepare(model, cfg, eng)
    run = _setup(model, cfg, eng, examples, evals)
    global_batch = cfg.batch_size * cfg.grad_accum * eng.world
    state = _resume(run, cfg, eng, out, global_batch)
    extra = {"batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "global_batch": global_batch, "seed": cfg.seed}
    losses, step_times, stopped = _loop(run, cfg, eng, out, state, extra)
    if stopped:
        return {"stopped_at": state["step"], "losses": losses}
    summary = {
        "steps": state["step"],
        "losses": losses,
        "precision": run.precision,
        "world_size": eng.world,
        "median_step_time_s": statistics.median(step_times) if step_times else None,
    }
    if evals is not None:
        summary["eval_loss"] = evaluate(run.net, evals, run.collate, cfg.batch_size, run.autocast, eng, cfg.num_workers)
    _save_run(model, run, cfg, eng, out)
    summary["peak_host_memory_mib"] = {"load": eng.gather(run.load_peak), "run": eng.gather(peak_host_memory_mib())}
    eng.barrier()
    return summary


@dataclass
class _Run:
    """What a run's steps share: the wrapped model, its optimizer and schedule, precision, data."""

    net: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: object
    params: list
    autocast: object
    scaler: object
    precision: str
    collate: Collator
    examples: list
    evals: list | None
    total: int  # optimizer steps of the whole run
    master: dict  # the fp32 master weights' spec dtypes (keep_master_weights)
    ds_bf16: bool  # DeepSpeed's own bf16 mode
    load_peak: float  # peak host memory through loading, wrapping and sharding


def _prepare(model, cfg: TrainConfig, eng) -> tuple[Path, list, list | None]:
    """Check the config, the output dir, the stage and the data before any output is touched;
    then (rank 0) make ``OUT/checkpoints``. -> (OUT, training records, eval records or None)."""
    cfg.check()
    out = Path(cfg.output)
    if eng.main:
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not (cfg.resume or cfg.overwrite):
            raise InputError(
                f"{out}: exists and is not empty (pass --overwrite to train into it from scratch, or --resume)"
            )
    _seed_all(cfg.seed + eng.rank)  # per-rank dropout; data order uses its own generator
    apply_stage(model, cfg.stage)
    if not any(p.requires_grad for p in model.parameters()):
        raise SpecError("nothing to train: every component is frozen (set `train:` in the spec or use --stage)")
    placeholders = {m: model.spec.modalities[m].placeholder for m in model.encoders}
    from composer.adapters import encoder_types, text_modalities

    text = text_modalities(encoder_types(model))  # SMILES strings, not files
    examples = read_jsonl(cfg.data, placeholders, on_bad=cfg.on_bad_record, media_root=cfg.media_root, text=text)
    evals = (
        read_jsonl(cfg.eval_data, placeholders, on_bad=cfg.on_bad_record, media_root=cfg.media_root, text=text)
        if cfg.eval_data
        else None
    )
    if eng.main:  # only once every input was read and checked: a bad run must not cost the old one
        if cfg.overwrite and not cfg.resume and (out / CKPT_DIR).is_dir():
            shutil.rmtree(out / CKPT_DIR)  # another run's: --resume must never pick them up
        (out / CKPT_DIR).mkdir(parents=True, exist_ok=True)
    eng.barrier()
    return out, examples, evals


def _setup(model, cfg: TrainConfig, eng, examples: list, evals: list | None) -> _Run:
    """Precision, fp32 master weights, the model wrapped for the strategy, AdamW and the schedule."""
    from transformers import get_scheduler

    from composer.train.distributed import peak_host_memory_mib

    collate = Collator(model, cfg.max_length)
    if cfg.grad_checkpointing or eng.fsdp.activation_checkpointing:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    autocast, scaler, precision, compute_dtype = _autocast(model, cfg.precision, eng.device)
    # DeepSpeed's own bf16 mode (bf16 module, fp32 masters in its optimizer) when the frozen weights are
    # bf16 already; on an fp32 model it would round them, so autocast over fp32 masters as elsewhere
    ds_bf16 = (
        eng.strategy == "deepspeed"
        and compute_dtype == torch.bfloat16
        and all(p.dtype == torch.bfloat16 for p in model.parameters() if p.is_floating_point() and not p.requires_grad)
    )
    master = keep_master_weights(model)  # before wrapping: DDP/FSDP/DeepSpeed see the fp32 masters
    # DDP must be told when a step can leave a trainable module unused (a record without some modality)
    partial = any(set(ex.items) != set(model.encoders) for ex in examples)
    net = eng.wrap(model, find_unused=partial, compute_dtype=compute_dtype)
    load_peak = peak_host_memory_mib()  # through loading, wrapping and sharding: before any step
    if scaler is not None and eng.strategy == "deepspeed":
        raise InputError("--precision fp16 (with a loss scaler) is not supported under DeepSpeed: use bf16")
    params = [p for p in net.parameters() if p.requires_grad]
    per_epoch = math.ceil(math.ceil(len(examples) / (cfg.batch_size * eng.world)) / cfg.grad_accum)
    total = cfg.max_steps or cfg.epochs * per_epoch
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if eng.strategy == "deepspeed":
        net = eng.wrap_deepspeed(
            model,
            opt,
            micro_batch=cfg.batch_size,
            grad_accum=cfg.grad_accum,
            max_grad_norm=cfg.max_grad_norm,
            bf16=ds_bf16,
        )
    sched = get_scheduler(cfg.scheduler, opt, num_warmup_steps=int(cfg.warmup_ratio * total), num_training_steps=total)
    return _Run(
        net,
        opt,
        sched,
        params,
        autocast,
        scaler,
        precision,
        collate,
        examples,
        evals,
        total,
        master,
        ds_bf16,
        load_peak,
    )


def _resume(run: _Run, cfg: TrainConfig, eng, out: Path, global_batch: int) -> dict:
    """The loop's state ({"step", "epoch", "seen"}): the latest checkpoint's under ``resume``
    (weights, optimizer, schedule and RNG restored from it), else a fresh start."""
    from composer.train import checkpoints as ckpts

    state = {"step": 0, "epoch": 0, "seen": 0}
    ckpt = ckpts.latest(out / CKPT_DIR) if cfg.resume else None
    if cfg.resume and ckpt is None and eng.main:
        log.warning("--resume: no checkpoint in %s; starting from scratch", out / CKPT_DIR)
    if ckpt is not None:
        meta = ckpts.load(ckpt, eng, run.net, run.opt, run.sched)
        state = meta["state"]
        if meta["world_size"] != eng.world:  # the saved RNG streams belong to other ranks: fresh ones
            _seed_all(cfg.seed + eng.rank + 7919 * state["step"])
        if eng.main:
            log.info("resumed from %s (written by %d rank(s); this run has %d)", ckpt, meta["world_size"], eng.world)
            if meta.get("global_batch", global_batch) != global_batch:
                log.warning(
                    "--resume: the checkpoint's global batch was %s records per step, this run's is %d",
                    meta.get("global_batch"),
                    global_batch,
                )
    return state


def _loop(run: _Run, cfg: TrainConfig, eng, out: Path, state: dict, extra: dict) -> tuple[list, list, bool]:
    """The optimizer steps from ``state`` (updated in place) to the run's last, epoch by epoch,
    with metrics, progress and checkpoints. -> (losses, step times, stopped by ``stop_after``)."""
    metrics = _Metrics(out, state["step"]) if eng.main else None
    run.net.train()
    bar = None
    if cfg.progress and eng.main:
        from tqdm.auto import tqdm

        bar = tqdm(total=run.total, initial=state["step"], desc="train", unit="step", dynamic_ncols=True)
    step_times: list[float] = []
    losses: list[float] = []
    stream = None
    try:
        while state["step"] < run.total:
            micro = micro_batches(len(run.examples), cfg.batch_size, eng.world, cfg.seed, state["epoch"], state["seen"])
            if stream is not None:
                stream.close()  # the last epoch's loader (and its workers)
            stream = batch_stream(run.examples, micro, run.collate, eng, cfg.num_workers, cfg.prefetch_factor)
            i = 0
            while i < len(micro) and state["step"] < run.total:
                t0 = time.perf_counter()
                group = micro[i : i + cfg.grad_accum]
                i += len(group)
                loss, grad_norm, n_tok = _step(run, cfg, eng, [next(stream) for _ in group])
                state["step"] += 1
                state["seen"] += sum(len(c) for c in group)
                losses.append(loss)
                dt = time.perf_counter() - t0
                step_times.append(dt)
                rec = {
                    "step": state["step"],
                    "epoch": state["epoch"],
                    "loss": loss,
                    "lr": run.sched.get_last_lr()[0],
                    "grad_norm": grad_norm,
                    "tokens": n_tok,
                    "step_time_s": dt,
                }
                _report(run, cfg, eng, rec, metrics, bar)
                if i >= len(micro):  # the epoch is done: a checkpoint here resumes at the next one
                    state["epoch"] += 1
                    state["seen"] = 0
                _checkpoint(run, cfg, eng, out, state, extra)
                if cfg.stop_after is not None and state["step"] >= cfg.stop_after:
                    return losses, step_times, True
    finally:
        if stream is not None:
            stream.close()
        if bar is not None:
            bar.close()
        if metrics is not None:
            metrics.close()
    return losses, step_times, False


def _step(run: _Run, cfg: TrainConfig, eng, batches: list) -> tuple[float, float, int]:
    """One optimizer step over ``batches`` ((batch, real) pairs: this rank's micro-batches of it).
    The loss is the mean over the label tokens of the whole step, all ranks together.
    -> (loss, gradient norm, tokens of the step)."""
    n_labels, n_tok = eng.sum(
        [
            sum(_label_count(b) for b, real in batches if real),
            sum(int(b["attention_mask"].sum()) for b, real in batches if real),
        ]
    )
    denom = max(int(n_labels), 1)
    loss_sum = 0.0
    for j, (batch, real) in enumerate(batches):
        with eng.no_sync(run.net, sync=j == len(batches) - 1):
            with run.autocast:
                loss = run.net(**batch, num_items_in_batch=denom, return_logits=False).loss
            # DDP and FSDP average gradients over the ranks: scale back to a sum
            eng.backward(run.net, loss * (eng.world if real else 0.0), last=j == len(batches) - 1, scaler=run.scaler)
        if real:
            loss_sum += float(loss.detach()) * denom
    grad_norm = optimizer_step(run.net, run.opt, run.params, run.scaler, cfg.max_grad_norm, eng)
    run.sched.step()
    return eng.sum([loss_sum])[0] / denom, grad_norm, int(n_tok)


def _report(run: _Run, cfg: TrainConfig, eng, rec: dict, metrics: _Metrics | None, bar) -> None:
    """A step's record, with the eval loss when due and the slowest rank's time, to metrics.jsonl
    (every ``log_every`` steps and at each eval) and the progress bar."""
    if run.evals is not None and cfg.eval_every and rec["step"] % cfg.eval_every == 0:
        rec["eval_loss"] = evaluate(run.net, run.evals, run.collate, cfg.batch_size, run.autocast, eng, cfg.num_workers)
    if eng.distributed:
        rec["world_size"] = eng.world
        rec["step_time_s_max_rank"] = max(eng.gather(rec["step_time_s"]))
    if metrics is not None and (rec["step"] % cfg.log_every == 0 or "eval_loss" in rec):
        metrics.write(rec)
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.4f}")


def _checkpoint(run: _Run, cfg: TrainConfig, eng, out: Path, state: dict, extra: dict) -> None:
    """Every ``save_every`` steps: a trainer checkpoint (all ranks), then the oldest past ``save_total_limit`` go."""
    from composer.train import checkpoints as ckpts

    if cfg.save_every and state["step"] % cfg.save_every == 0:
        ckpts.save(out / CKPT_DIR / f"step-{state['step']:06d}", eng, run.net, run.opt, run.sched, dict(state), extra)
        if cfg.save_total_limit and eng.main:
            ckpts.rotate(out / CKPT_DIR, cfg.save_total_limit)


def _save_run(model, run: _Run, cfg: TrainConfig, eng, out: Path) -> None:
    """The final model in OUT: gathered from the shards (FSDP, ZeRO-3) or DeepSpeed's buffers (a
    collective: every rank), written by rank 0 with train_config.json."""
    from composer.train import checkpoints as ckpts

    run.net.eval()
    full = None
    if eng.strategy == "fsdp":  # gather the shards (a collective); rank 0 writes them
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(run.net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    elif eng.strategy == "deepspeed":  # ZeRO-3 partitions the weights; ZeRO-1/2 views them into flat buffers
        if eng.deepspeed.zero_stage == 3:
            full = run.net._zero3_consolidated_16bit_state_dict()  # gathered layer by layer (a collective), on rank 0
        elif eng.main:
            full = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if run.ds_bf16:  # the module holds bf16 copies: the fp32 masters are the optimizer's
            masters = ckpts.deepspeed_fp32_masters(run.net)  # a collective: every rank
            if eng.main:
                full.update(masters)
    if eng.main:
        cast = run.master if cfg.save_dtype == "spec" else {}
        _save_final(
            model,
            out,
            state_dict=full,
            merge=cfg.merge_lora,
            cast=cast,
            max_shard_size=cfg.max_shard_size,
            weights=cfg.save_weights,
        )
        (out / "train_config.json").write_text(json.dumps(cfg.model_dump(), indent=2))


def optimizer_step(net, opt, params, scaler, max_grad_norm: float, eng) -> float:
    """Clip, step, zero the gradients; returns the gradient norm before clipping."""
    if eng.strategy == "deepspeed":
        net.step()  # DeepSpeed clips (config gradient_clipping), steps and zeroes itself
        return float(net.get_global_grad_norm() or 0.0)
    if scaler:
        scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    if scaler:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return grad_norm


def _save_final(
    model,
    out: Path,
    state_dict: dict | None = None,
    merge: bool = False,
    cast: dict | None = None,
    max_shard_size: str | int | None = None,
    weights: str = "full",
) -> None:
    """The final model as a composer checkpoint in ``out`` itself (next to checkpoints/ and
    metrics.jsonl): written to a temp dir, then each entry moved into place with SIGINT/SIGTERM
    deferred. ``composer.json`` (what makes ``out`` a checkpoint) is removed first and moved in
    last, so even a hard kill between the moves leaves no loadable mix of old and new files.
    ``state_dict``: full weights gathered from FSDP shards (``model`` holds only this rank's).
    ``cast``: {parameter name: dtype} to store in (the spec's dtype of the fp32 master weights)."""
    from composer.checkpoint import load_pretrained, signals_deferred

    tmp = Path(tempfile.mkdtemp(prefix=".final.tmp-", dir=out))
    try:
        if merge and state_dict is None:
            merge_lora(model)
        if cast:
            state_dict = cast_weights(model, state_dict, cast)
        model.save_pretrained(tmp / "m", state_dict=state_dict, max_shard_size=max_shard_size, weights=weights)
        if merge and state_dict is not None:  # a sharded model cannot merge in place: merge the saved one
            full = load_pretrained(tmp / "m")
            merge_lora(full)
            full.save_pretrained(tmp / "m", overwrite=True, max_shard_size=max_shard_size)
        entries = sorted((tmp / "m").iterdir(), key=lambda e: e.name == "composer.json")
        with signals_deferred():
            (out / "composer.json").unlink(missing_ok=True)
            for entry in entries:
                dst = out / entry.name
                if dst.is_dir():
                    shutil.rmtree(dst)
                elif dst.exists():
                    dst.unlink()
                entry.rename(dst)
    finally:
        with signals_deferred():
            shutil.rmtree(tmp, ignore_errors=True)


def cast_weights(model, state_dict: dict | None, cast: dict[str, torch.dtype]) -> dict:
    """``state_dict`` (default: the model's) with the tensors named in ``cast`` (and their tied
    aliases) in the dtype given there; names that no longer exist (merged LoRA) are skipped."""
    if state_dict is None:
        state_dict = model.state_dict()
    params = dict(model.named_parameters(remove_duplicate=False))
    alias = {}  # a tied parameter's other names
    for name, p in params.items():
        alias.setdefault(id(p), []).append(name)
    want = {n: dt for name, dt in cast.items() if name in params for n in alias[id(params[name])]}
    return {k: v.to(want[k]) if k in want and v.is_floating_point() else v for k, v in state_dict.items()}


def merge_lora(model) -> None:
    """Fold every LoRA adapter into its base weight and remove the LoRA modules; the spec's
    ``train: lora`` becomes ``full`` (the weights are ordinary weights now)."""
    from peft.tuners.lora import LoraLayer

    for name, mod in list(model.named_modules()):
        if isinstance(mod, LoraLayer):
            mod.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, mod.get_base_layer())
    if model.spec.llm.train == "lora":
        model.spec.llm.train, model.spec.llm.lora = "full", None
    for m in model.spec.modalities.values():
        if m.encoder.train == "lora":
            m.encoder.train, m.encoder.lora = "full", None
