"""Training checkpoints: sharded, pickle-free, and loadable on another number of ranks.

``OUT/checkpoints/step-NNNNNN/``::

    trainer_state.json      step/epoch/data position, world size and batch sizes, trainable
                            parameter names, optimizer hyper-parameters, scheduler (rank 0)
    rng-rank00000.json ...  each rank's torch/Python/NumPy RNG states (JSON)
    state/*.safetensors     trainable weights and optimizer tensors, written by
                            torch.distributed.checkpoint (DCP) in Hugging Face safetensors form:
                            every rank writes its own shard, offsets in the files' metadata

Loading goes through DCP too, which reads whatever slices this run's sharding needs: a
checkpoint of 2 FSDP ranks resumes in 1 process, on 8 ranks, or under DDP. No file is read
with pickle (DCP's default ``.metadata`` file is a pickle; the safetensors reader does not use one).
Under DeepSpeed (whose ZeRO optimizer keeps flat partitions of its own) each parameter's full
weight and Adam moments are gathered with DeepSpeed's accessors and written, whole, by one rank
(parameter i by rank i % world), under the same names: checkpoints move freely between
DeepSpeed, FSDP, DDP and a single process.

A checkpoint is written into ``.step-NNNNNN.tmp`` and renamed by rank 0 after every rank has
finished, so ``latest`` never sees a partial one (the directory must be on a
filesystem that all nodes share).
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from composer.errors import InputError, first_line
from composer.train.distributed import Engine

CKPT_FORMAT = 2
STATE_DIR = "state"


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, flatten_optimizer_state_dict=True, **kw)


def _split(osd: dict) -> tuple[dict, dict]:
    tensors = {k: v for k, v in osd.items() if torch.is_tensor(v)}
    return tensors, {k: v for k, v in osd.items() if not torch.is_tensor(v)}


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


def rng_state() -> dict:
    np_state = np.random.get_state()
    st = {
        "python": _jsonable(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state().tolist()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(_tuplify(st["python"]))
    npst = st["numpy"]
    np.random.set_state((npst[0], np.array(npst[1], dtype=np.uint32), *npst[2:]))
    torch.set_rng_state(torch.tensor(st["torch"], dtype=torch.uint8))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(st["cuda"], dtype=torch.uint8))


def save(path: Path, eng: Engine, model, opt, sched, state: dict, extra: dict) -> None:
    """Every rank calls this (DCP is collective). ``model`` is the wrapped module."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from composer.checkpoint import signals_deferred

    tmp = path.parent / f".{path.name}.tmp"
    if eng.main:
        shutil.rmtree(tmp, ignore_errors=True)  # a killed run's leftover
        (tmp / STATE_DIR).mkdir(parents=True)
    eng.barrier()
    try:
        if eng.strategy == "deepspeed":
            names, scalars = _ds_save(tmp / STATE_DIR, eng, model, opt)
        else:
            msd, osd = get_state_dict(model, opt, options=_options())
            tensors, scalars = _split(osd)
            names = sorted(msd)
            with _quiet():
                dcp.save(
                    {"model": msd, "optim": tensors},
                    storage_writer=HuggingFaceStorageWriter(str(tmp / STATE_DIR), save_distributed=eng.distributed),
                    no_dist=not eng.distributed,
                )
        (tmp / f"rng-rank{eng.rank:05d}.json").write_text(json.dumps(rng_state()))
        if eng.main:
            meta = {
                "format_version": CKPT_FORMAT,
                "state": state,
                "world_size": eng.world,
                "strategy": eng.strategy,
                "param_names": names,
                "optimizer_scalars": {k: _jsonable(v) for k, v in scalars.items()},
                "scheduler": sched.state_dict(),
                **extra,
            }
            (tmp / "trainer_state.json").write_text(json.dumps(meta))
        eng.barrier()
    except BaseException:
        if eng.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if eng.main:
        with signals_deferred():
            if path.exists():
                shutil.rmtree(path)
            tmp.rename(path)
    eng.barrier()


def read_meta(path: Path) -> dict:
    state_file = path / "trainer_state.json"
    try:
        meta = json.loads(state_file.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{state_file}: not a readable trainer state ({type(e).__name__}: {e})") from None
    keys = ("format_version", "state", "world_size", "param_names", "optimizer_scalars", "scheduler")
    if not isinstance(meta, dict) or any(k not in meta for k in keys):
        raise InputError(f"{state_file}: not a trainer state of this composer version (needs the keys {list(keys)})")
    if meta["format_version"] != CKPT_FORMAT:
        raise InputError(f"{state_file}: checkpoint format {meta['format_version']}, this composer reads {CKPT_FORMAT}")
    state = meta["state"]
    fields = {f"state.{k}": state.get(k) if isinstance(state, dict) else None for k in ("step", "epoch", "seen")}
    fields["world_size"] = meta["world_size"]
    for name, v in fields.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "world_size" else 0):
            raise InputError(f"{state_file}: {name} must be a non-negative integer (world_size >= 1), got {v!r}")
    if not isinstance(meta["param_names"], list) or not all(isinstance(n, str) for n in meta["param_names"]):
        raise InputError(f"{state_file}: param_names must be a list of parameter names")
    for key in ("optimizer_scalars", "scheduler"):
        if not isinstance(meta[key], dict):
            raise InputError(f"{state_file}: {key} must be a JSON object, got {type(meta[key]).__name__}")
    return meta


def load(path: Path, eng: Engine, model, opt, sched) -> dict:
    """Restore weights, optimizer, scheduler and RNG from ``path`` into this run, whatever its
    world size. Everything is read and checked before the model changes: a bad checkpoint
    raises InputError and leaves the model and optimizer as they were. Returns the metadata."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    meta = read_meta(path)
    if eng.strategy == "deepspeed":
        _ds_load(path, meta, eng, model, opt)
        sched.load_state_dict(meta["scheduler"])
        _load_rng(path, meta, eng)
        return meta
    msd, osd = get_state_dict(model, opt, options=_options())
    if sorted(msd) != meta["param_names"]:
        ours, theirs = set(msd), set(meta["param_names"])
        diff = sorted(ours ^ theirs)[:3]
        raise InputError(
            f"{path}: checkpoint's trainable parameters differ from this run's (different spec or "
            f"--stage?), e.g. {diff}"
        )
    tensors, scalars = _split(osd)
    # load into copies: DCP fills tensors in place, and a failure half-way must not touch the model
    target = {
        "model": {k: v.detach().clone() for k, v in msd.items()},
        "optim": {k: v.detach().clone() for k, v in tensors.items()},
    }
    state_dir = path / STATE_DIR
    if not state_dir.is_dir() or not any(state_dir.glob("*.safetensors")):
        raise InputError(f"{state_dir}: no safetensors shards")
    reader = HuggingFaceStorageReader(str(state_dir))
    _check_saved(state_dir, reader, {f"{g}.{k}": v.shape for g, ts in target.items() for k, v in ts.items()})
    with _quiet():
        _guard(state_dir, lambda: dcp.load(target, storage_reader=reader, no_dist=not eng.distributed))
    saved_scalars = meta["optimizer_scalars"]
    missing = sorted(set(scalars) - set(saved_scalars))
    if missing:
        raise InputError(f"{path / 'trainer_state.json'}: optimizer settings missing for {missing[:3]}")
    optim = {**target["optim"], **{k: _tuplify(saved_scalars[k]) for k in scalars}}
    set_state_dict(model, opt, model_state_dict=target["model"], optim_state_dict=optim, options=_options(strict=False))
    sched.load_state_dict(meta["scheduler"])
    _load_rng(path, meta, eng)
    return meta


def _load_rng(path: Path, meta: dict, eng: Engine) -> None:
    rng_file = path / f"rng-rank{eng.rank:05d}.json"
    if meta["world_size"] == eng.world and rng_file.is_file():
        try:
            set_rng_state(json.loads(rng_file.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"{rng_file}: not a readable RNG state ({type(e).__name__}: {e})") from None


def _check_saved(state_dir: Path, reader, wanted: dict[str, tuple]) -> None:
    """Every key of ``wanted`` (flattened name -> full shape) is in the shards with that shape."""
    with _quiet():
        saved = _guard(state_dir, reader.read_metadata).state_dict_metadata
    for key, shape in wanted.items():
        if key not in saved:
            raise InputError(f"{state_dir}: no {key} (a checkpoint of another spec or optimizer?)")
        if tuple(saved[key].size) != tuple(shape):
            raise InputError(
                f"{state_dir}: {key} is shape {tuple(saved[key].size)}, this run needs "
                f"{tuple(shape)} (a checkpoint of another spec?)"
            )


# -- DeepSpeed: ZeRO keeps flat partitions of its own, so tensors go through DeepSpeed's full-parameter
# accessors, in the same flattened names as DCP's (checkpoints move between DeepSpeed, DDP and FSDP)
_MOMENTS = ("exp_avg", "exp_avg_sq")


def _ds_trainable(net) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in sorted(net.module.named_parameters()) if p.requires_grad}


def deepspeed_fp32_masters(net) -> dict[str, torch.Tensor]:
    """The trainable parameters' full fp32 master weights of a DeepSpeed engine, by state-dict name
    (on the CPU; gathered from ZeRO's partitions: every rank must call it)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {
        n: safe_get_full_fp32_param(p).detach().to("cpu", torch.float32).reshape(_full_shape(p)).contiguous()
        for n, p in _ds_trainable(net).items()
    }


def _full_shape(p) -> tuple:
    return tuple(getattr(p, "ds_shape", p.shape))


def _ds_adam_step(opt) -> float:
    for st in opt.state.values():
        if "step" in st:
            return float(st["step"])
    return 0.0


def _ds_save(state_dir: Path, eng: Engine, net, opt) -> tuple[list[str], dict]:
    """Each parameter's full fp32 weight and Adam moments, gathered by all ranks (collectives)
    and written by rank ``i % world`` for the i-th parameter: one safetensors file per rank."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from safetensors.torch import save_file

    params = _ds_trainable(net)
    step = torch.tensor(_ds_adam_step(opt), dtype=torch.float32)
    mine: dict[str, torch.Tensor] = {}
    for i, (n, p) in enumerate(params.items()):
        full = {f"model.{n}": safe_get_full_fp32_param(p)}
        for k in _MOMENTS:
            full[f"optim.state.{n}.{k}"] = safe_get_full_optimizer_state(p, k)
        if i % eng.world == eng.rank:
            for key, t in full.items():
                mine[key] = t.detach().to("cpu", torch.float32).reshape(_full_shape(p)).contiguous()
            mine[f"optim.state.{n}.step"] = step.clone()
    if mine:
        save_file(
            mine,
            str(state_dir / f"shard-{eng.rank + 1:05d}-model-00001-of-00001.safetensors"),
            metadata={"format": "pt"},
        )
    group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    scalars = {f"param_groups.{n}.{k}": v for n in params for k, v in group.items()}
    return list(params), scalars


def _ds_init_optimizer_state(net, opt) -> None:
    """Give the optimizer its state tensors before they are overwritten (Adam creates them at its
    first step, and DeepSpeed no longer does one at start): one step with zero gradients and
    learning rate 0 per flat partition, which changes no weight."""
    zero3 = getattr(net.optimizer, "fp32_partitioned_groups_flat", None)
    flat = zero3 if zero3 is not None else [p for g in opt.param_groups for p in g["params"]]
    todo = [i for i, p in enumerate(flat) if not opt.state.get(p)]
    if not todo:
        return
    lrs = [g["lr"] for g in opt.param_groups]
    grads = {i: flat[i].grad for i in todo}  # ZeRO-3 with offload keeps persistent grad buffers
    for g in opt.param_groups:
        g["lr"] = 0.0
    for i in todo:
        flat[i].grad = torch.zeros_like(flat[i])
    if zero3 is not None:
        for i in todo:
            net.optimizer._optimizer_step(i)  # ZeRO-3 hands the optimizer one sub-group at a time
    else:
        opt.step()
    for i in todo:
        flat[i].grad = grads[i]
    for g, lr in zip(opt.param_groups, lrs, strict=True):
        g["lr"] = lr


def _ds_load(path: Path, meta: dict, eng: Engine, net, opt) -> None:
    import deepspeed
    import torch.distributed.checkpoint as dcp
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    params = _ds_trainable(net)
    if list(params) != meta["param_names"]:
        diff = sorted(set(params) ^ set(meta["param_names"]))[:3]
        raise InputError(
            f"{path}: checkpoint's trainable parameters differ from this run's (different spec or "
            f"--stage?), e.g. {diff}"
        )
    state_dir = path / STATE_DIR
    if not state_dir.is_dir() or not any(state_dir.glob("*.safetensors")):
        raise InputError(f"{state_dir}: no safetensors shards")
    wanted = {}
    for n, p in params.items():
        wanted[f"model.{n}"] = _full_shape(p)
        wanted.update({f"optim.state.{n}.{k}": _full_shape(p) for k in _MOMENTS})
    _check_saved(state_dir, HuggingFaceStorageReader(str(state_dir)), wanted)
    names = list(params)
    budget, chunks, cur, size = 1 << 27, [], [], 0  # elements per read (x3 tensors): bounded host memory
    for n in names:
        cur.append(n)
        size += params[n].ds_numel if hasattr(params[n], "ds_numel") else params[n].numel()
        if size >= budget:
            chunks.append(cur)
            cur, size = [], 0
    chunks += [cur] if cur else []
    _ds_init_optimizer_state(net, opt)
    step = None
    for chunk in chunks:
        target = {
            "model": {n: torch.empty(_full_shape(params[n])) for n in chunk},
            "optim": {f"state.{n}.{k}": torch.empty(_full_shape(params[n])) for n in chunk for k in _MOMENTS},
        }
        target["optim"][f"state.{chunk[0]}.step"] = torch.zeros(())
        with _quiet():
            _guard(
                state_dir,
                lambda t=target: dcp.load(t, storage_reader=HuggingFaceStorageReader(str(state_dir)), no_dist=True),
            )
        step = float(target["optim"][f"state.{chunk[0]}.step"]) if step is None else step
        for n in chunk:
            p, w = params[n], target["model"][n]
            safe_set_full_fp32_param(p, w)
            for k in _MOMENTS:
                safe_set_full_optimizer_state(p, target["optim"][f"state.{n}.{k}"], k)
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():  # the module's copy
                p.data.copy_(w.to(p.device, p.dtype).reshape(p.shape))
    for st in opt.state.values():
        if "step" in st:
            st["step"] = torch.tensor(step, dtype=st["step"].dtype) if torch.is_tensor(st["step"]) else int(step)
    first = names[0]
    for group in opt.param_groups:
        for k in group:
            key = f"param_groups.{first}.{k}"
            if k != "params" and key in meta["optimizer_scalars"]:
                group[k] = _tuplify(meta["optimizer_scalars"][key])


def _guard(where: Path, fn):
    """Run ``fn``; any failure reading the shards becomes one InputError naming ``where``."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - DCP and safetensors raise many types (CheckpointException, SafetensorError, ...)
        first = first_line(e)
        raise InputError(f"{where}: cannot load the trainer state ({first[:300]})") from None


@contextlib.contextmanager
def _quiet():
    """DCP warns that it assumes a single process when there is no process group: we mean that."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def rotate(ckpt_dir: Path, keep: int) -> list[Path]:
    """Remove all but the newest ``keep`` checkpoints (rank 0, after a save completed: the newest
    is always whole); -> the removed dirs."""
    ckpts = sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir())
    gone = ckpts[: max(0, len(ckpts) - keep)]
    for old in gone:
        shutil.rmtree(old)
    return gone


def latest(ckpt_dir: Path) -> Path | None:
    ckpts = sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir()) if ckpt_dir.is_dir() else []
    return ckpts[-1] if ckpts else None
