"""`compose train`: a small, exact-resume training loop over a ComposedModel.

Per-component train modes come from the spec (frozen | lora | full); ``stage`` presets
follow the seed systems: stage 1 trains the projectors only (LLaVA pre-training), stage 2 the
projectors and the LLM as the spec says (LoRA or full). Gradient accumulation, bf16/fp16
autocast on CUDA, gradient checkpointing, an eval loop, a progress bar and metrics as JSONL
(and TensorBoard when installed).

Checkpoints (``OUT/checkpoints/step-NNNNNN/``) hold no pickles: trainable weights and the
optimizer's tensors as safetensors, everything else (scheduler, data position, Python/NumPy
RNG) as JSON, the torch RNG state as a uint8 tensor. Resuming restores all of it, so the loss
curve continues exactly as an uninterrupted run's would (same seed, same machine).
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from composer.data import Collator, read_jsonl
from composer.errors import InputError, SpecError

log = logging.getLogger("composer.train")
CKPT_DIR = "checkpoints"
METRICS = "metrics.jsonl"


@dataclass
class TrainConfig:
    data: str
    output: str
    eval_data: str | None = None
    stage: int | None = None  # 1: projectors only; 2: projectors + LLM (spec's lora/full); None: spec's modes
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    scheduler: str = "cosine"
    max_grad_norm: float = 1.0
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (autocast; CUDA only)
    grad_checkpointing: bool = False
    save_every: int = 0  # optimizer steps; 0: only at the end
    eval_every: int = 0
    log_every: int = 1
    seed: int = 0
    resume: bool = False
    overwrite: bool = False  # train from scratch into a non-empty output dir (its old checkpoints/ are removed)
    on_bad_record: str = "fail"  # fail | skip
    media_root: str | None = None
    max_length: int | None = None
    merge_lora: bool = False
    stop_after: int | None = None  # stop (as if interrupted) after this many steps; for tests and dry runs
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


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
        raise SpecError("llm.train: stage 2 trains the LLM; set `llm.train` to `lora` or `full` in the spec, got 'frozen'")
    else:
        set_trainable(model.llm, model.spec.llm.train)


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


# -- checkpoints without pickle ------------------------------------------------------------------------
def _save_checkpoint(path: Path, model, opt, sched, state: dict) -> None:
    """Write ``path`` through ``atomic_dir``: an interrupted save leaves the previous checkpoints
    and no partial one (``latest_checkpoint`` never sees a half-written dir)."""
    from safetensors.torch import save_file

    from composer.checkpoint import atomic_dir

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    with atomic_dir(path, overwrite=True) as tmp:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        osd = opt.state_dict()
        tensors, scalars = {}, {}
        for idx, st in osd["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"{idx}.{k}"] = v.contiguous()
                else:
                    scalars[f"{idx}.{k}"] = v
        tensors["rng.torch"] = torch.get_rng_state()
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        np_state = np.random.get_state()
        meta = {
            "state": state,
            "param_names": names,
            "param_groups": osd["param_groups"],
            "optimizer_scalars": scalars,
            "scheduler": sched.state_dict(),
            "rng": {"python": _jsonable(random.getstate()), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]},
        }
        (tmp / "trainer_state.json").write_text(json.dumps(meta))


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


def latest_checkpoint(out: Path) -> Path | None:
    ckpts = sorted((out / CKPT_DIR).glob("step-*")) if (out / CKPT_DIR).is_dir() else []
    return ckpts[-1] if ckpts else None


def _load_checkpoint(path: Path, model, opt, sched) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    def tensors_of(f: Path) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(f))
        except (SafetensorError, OSError) as e:
            raise InputError(f"{f}: cannot load ({str(e).strip().splitlines()[0]})") from None

    # Read and check everything first: a bad checkpoint changes nothing in the model or optimizer.
    state_file = path / "trainer_state.json"
    try:
        meta = json.loads(state_file.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{state_file}: not a readable trainer state ({type(e).__name__}: {e})") from None
    keys = ("state", "param_names", "param_groups", "optimizer_scalars", "scheduler", "rng")
    if not isinstance(meta, dict) or any(k not in meta for k in keys):
        raise InputError(f"{state_file}: not a trainer state (needs the keys {list(keys)})")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if names != meta["param_names"]:
        raise InputError(f"{path}: checkpoint's trainable parameters differ from this run's (different spec or --stage?)")
    weights = tensors_of(path / "trainable.safetensors")
    params = dict(model.named_parameters())
    for n in names:
        if n not in weights or weights[n].shape != params[n].shape:
            got = "missing" if n not in weights else f"shape {tuple(weights[n].shape)}"
            raise InputError(f"{path / 'trainable.safetensors'}: {n} is {got}, this run needs {tuple(params[n].shape)} "
                             "(a checkpoint of another spec?)")
    tensors = tensors_of(path / "optimizer.safetensors")
    if "rng.torch" not in tensors:
        raise InputError(f"{path / 'optimizer.safetensors'}: no rng.torch state")
    with torch.no_grad():
        for n in names:
            params[n].copy_(weights[n])
    torch.set_rng_state(tensors.pop("rng.torch"))
    state: dict[int, dict] = {}
    for key, v in {**tensors, **meta["optimizer_scalars"]}.items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    sched.load_state_dict(meta["scheduler"])
    random.setstate(_tuplify(meta["rng"]["python"]))
    npst = meta["rng"]["numpy"]
    np.random.set_state((npst[0], np.array(npst[1], dtype=np.uint32), *npst[2:]))
    return meta["state"]


# -- the loop -----------------------------------------------------------------------------------------
def _autocast(model, precision: str):
    dev = model.device.type
    if precision == "auto":
        precision = "bf16" if dev == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp32":
        return torch.autocast(dev, enabled=False), None, precision
    if dev != "cuda":
        raise InputError(f"--precision {precision} needs a CUDA device (this run is on {dev}); use fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    return torch.autocast("cuda", dtype=dtype), scaler, precision


def _batches(n: int, bs: int, seed: int, epoch: int) -> list[list[int]]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    return [order[i: i + bs] for i in range(0, n, bs)]


def evaluate(model, examples, collate, batch_size: int, autocast) -> float:
    """Mean token loss over ``examples``."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = collate(examples[i: i + batch_size])
            n = int((batch["labels"][:, 1:] != -100).sum())
            with autocast:
                loss = model(**batch).loss
            total += float(loss) * n
            count += n
    model.train(was)
    return total / max(count, 1)


class _Metrics:
    def __init__(self, out: Path, resume_step: int):
        self.path = out / METRICS
        if self.path.exists():  # drop what a resumed run will write again
            keep = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= resume_step]
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
    model (a composer checkpoint: ``ComposedModel.from_pretrained(cfg.output)``)."""
    from transformers import get_scheduler

    out = Path(cfg.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not (cfg.resume or cfg.overwrite):
        raise InputError(f"{out}: exists and is not empty (pass --overwrite to train into it from scratch, or --resume)")
    if cfg.overwrite and not cfg.resume and (out / CKPT_DIR).is_dir():
        shutil.rmtree(out / CKPT_DIR)  # another run's: --resume must never pick them up
    out.mkdir(parents=True, exist_ok=True)
    (out / CKPT_DIR).mkdir(exist_ok=True)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    apply_stage(model, cfg.stage)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise SpecError("nothing to train: every component is frozen (set `train:` in the spec or use --stage)")
    placeholders = {m: model.spec.modalities[m].placeholder for m in model.encoders}
    examples = read_jsonl(cfg.data, placeholders, on_bad=cfg.on_bad_record, media_root=cfg.media_root)
    evals = read_jsonl(cfg.eval_data, placeholders, on_bad=cfg.on_bad_record, media_root=cfg.media_root) if cfg.eval_data else None
    collate = Collator(model, cfg.max_length)
    if cfg.grad_checkpointing:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    autocast, scaler, precision = _autocast(model, cfg.precision)
    per_epoch = math.ceil(math.ceil(len(examples) / cfg.batch_size) / cfg.grad_accum)
    total = cfg.max_steps or cfg.epochs * per_epoch
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_scheduler(cfg.scheduler, opt, num_warmup_steps=int(cfg.warmup_ratio * total), num_training_steps=total)
    state = {"step": 0, "epoch": 0, "batch": 0}
    ckpt = latest_checkpoint(out) if cfg.resume else None
    if cfg.resume and ckpt is None:
        log.warning("--resume: no checkpoint in %s; starting from scratch", out / CKPT_DIR)
    if ckpt is not None:
        state = _load_checkpoint(ckpt, model, opt, sched)
    metrics = _Metrics(out, state["step"])
    model.train()
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=state["step"], desc="train", unit="step", dynamic_ncols=True)
    step_times: list[float] = []
    losses: list[float] = []
    try:
        while state["step"] < total:
            batches = _batches(len(examples), cfg.batch_size, cfg.seed, state["epoch"])
            acc, acc_loss, t0, n_tok = 0, 0.0, time.perf_counter(), 0
            while state["batch"] < len(batches) and state["step"] < total:
                batch = collate([examples[i] for i in batches[state["batch"]]])
                state["batch"] += 1
                with autocast:
                    loss = model(**batch).loss
                scaled = loss / cfg.grad_accum
                (scaler.scale(scaled) if scaler else scaled).backward()
                acc += 1
                acc_loss += float(loss.detach()) / cfg.grad_accum
                n_tok += int(batch["attention_mask"].sum())
                if acc < cfg.grad_accum and state["batch"] < len(batches):
                    continue
                if scaler:
                    scaler.unscale_(opt)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
                if scaler:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                state["step"] += 1
                dt = time.perf_counter() - t0
                step_times.append(dt)
                losses.append(acc_loss * cfg.grad_accum / acc)
                rec = {"step": state["step"], "epoch": state["epoch"], "loss": losses[-1], "lr": sched.get_last_lr()[0],
                       "grad_norm": grad_norm, "tokens": n_tok, "step_time_s": dt}
                if evals is not None and cfg.eval_every and state["step"] % cfg.eval_every == 0:
                    rec["eval_loss"] = evaluate(model, evals, collate, cfg.batch_size, autocast)
                if state["step"] % cfg.log_every == 0 or "eval_loss" in rec:
                    metrics.write(rec)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.4f}")
                if cfg.save_every and state["step"] % cfg.save_every == 0:
                    _save_checkpoint(out / CKPT_DIR / f"step-{state['step']:06d}", model, opt, sched, dict(state))
                acc, acc_loss, t0, n_tok = 0, 0.0, time.perf_counter(), 0
                if cfg.stop_after is not None and state["step"] >= cfg.stop_after:
                    return {"stopped_at": state["step"], "losses": losses}
            if state["batch"] >= len(batches):
                state["epoch"] += 1
                state["batch"] = 0
    finally:
        if bar is not None:
            bar.close()
        metrics.close()
    summary = {"steps": state["step"], "losses": losses, "precision": precision,
               "median_step_time_s": statistics.median(step_times) if step_times else None}
    if evals is not None:
        summary["eval_loss"] = evaluate(model, evals, collate, cfg.batch_size, autocast)
    model.eval()
    if cfg.merge_lora:
        merge_lora(model)
    _save_final(model, out)
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    return summary


def _save_final(model, out: Path) -> None:
    """The final model as a composer checkpoint in ``out`` itself (next to checkpoints/ and
    metrics.jsonl): written to a temp dir, then each entry moved into place with SIGINT/SIGTERM
    deferred. ``composer.json`` (what makes ``out`` a checkpoint) is removed first and moved in
    last, so even a hard kill between the moves leaves no loadable mix of old and new files."""
    from composer.checkpoint import signals_deferred

    tmp = Path(tempfile.mkdtemp(prefix=".final.tmp-", dir=out))
    try:
        model.save_pretrained(tmp / "m")
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
