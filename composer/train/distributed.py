"""Data-parallel and sharded training under ``torchrun`` or ``accelerate launch``.

One process per device. The launcher's environment says how many (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``: both launchers set them) and an accelerate
config says how to wrap the model (``ACCELERATE_USE_FSDP`` and the ``FSDP_*`` variables that
``accelerate launch --config_file`` exports). The engines are PyTorch's own:

- ``ddp``: ``DistributedDataParallel`` (gradients all-reduced; every rank holds the model).
- ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``, what accelerate runs for
  ``fsdp_version: 2``): parameters, gradients and optimizer state sharded over the ranks. Each
  LLM decoder layer, each encoder layer (the classes its transformers model lists in
  ``_no_split_modules``), each projector and each encoder is its own unit, then the root;
  frozen parameters are sharded too and get no gradients. ``reshard_after_forward=False``
  (accelerate's ``SHARD_GRAD_OP``) is the ZeRO-2 analogue, the default full shard ZeRO-3's.

Backends: NCCL on CUDA, gloo on CPU (what the tests use, on 127.0.0.1).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from composer.errors import InputError

log = logging.getLogger("composer.train.distributed")
STRATEGIES = ("auto", "ddp", "fsdp", "deepspeed")


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


@dataclass
class FsdpOptions:
    reshard_after_forward: bool = True  # False: gradients and optimizer state sharded, params kept (ZeRO-2)
    offload_params: bool = False  # parameters and optimizer state on the CPU between uses
    wrap_classes: list[str] = field(default_factory=list)  # extra/override layer class names to wrap
    activation_checkpointing: bool = False  # recompute each decoder layer's activations in backward

    @classmethod
    def from_env(cls) -> FsdpOptions:
        """The options an accelerate FSDP config exports (``accelerate launch --config_file``)."""
        o = cls()
        strategy = os.environ.get("FSDP_SHARDING_STRATEGY", "").strip().upper()
        # accelerate writes names (FULL_SHARD) or, in old configs, their numbers (1 = FULL_SHARD, 2 = SHARD_GRAD_OP)
        named = {
            "1": "FULL_SHARD",
            "2": "SHARD_GRAD_OP",
            "3": "NO_SHARD",
            "4": "HYBRID_SHARD",
            "5": "_HYBRID_SHARD_ZERO2",
        }
        strategy = named.get(strategy, strategy)
        if strategy in ("NO_SHARD", "HYBRID_SHARD", "_HYBRID_SHARD_ZERO2"):
            raise InputError(
                f"FSDP_SHARDING_STRATEGY={strategy} is not supported: use FULL_SHARD (ZeRO-3), "
                "SHARD_GRAD_OP (ZeRO-2), or plain DDP (no accelerate FSDP config)"
            )
        if "FSDP_RESHARD_AFTER_FORWARD" in os.environ:
            o.reshard_after_forward = _flag("FSDP_RESHARD_AFTER_FORWARD")
        elif strategy == "SHARD_GRAD_OP":
            o.reshard_after_forward = False
        o.offload_params = _flag("FSDP_OFFLOAD_PARAMS")
        o.activation_checkpointing = _flag("FSDP_ACTIVATION_CHECKPOINTING")
        policy = os.environ.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP").strip().upper()
        if policy not in ("TRANSFORMER_BASED_WRAP", ""):
            log.warning(
                "FSDP_AUTO_WRAP_POLICY=%s: composer shards by layer class (TRANSFORMER_BASED_WRAP) always", policy
            )
        o.wrap_classes = [c.strip() for c in os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if c.strip()]
        return o


@dataclass
class DeepSpeedOptions:
    zero_stage: int = 2
    offload_optimizer: str = "none"  # none | cpu
    offload_param: str = "none"  # none | cpu (ZeRO-3)
    config_file: str | None = None

    @classmethod
    def from_env(cls) -> DeepSpeedOptions:
        """What an accelerate DeepSpeed config exports; a ``deepspeed_config_file``'s
        ``zero_optimization`` section, when given, overrides the stage and offload devices."""
        import json

        o = cls()
        o.config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or None
        zero: dict = {}
        if o.config_file:
            try:
                zero = json.loads(Path(o.config_file).read_text(encoding="utf-8")).get("zero_optimization", {})
            except (OSError, ValueError, AttributeError) as e:
                raise InputError(f"{o.config_file}: not a readable DeepSpeed JSON config ({e})") from None
        try:
            o.zero_stage = int(zero.get("stage", os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")))
        except (TypeError, ValueError):
            raise InputError("DeepSpeed zero stage must be 0, 1, 2 or 3") from None
        if o.zero_stage not in (0, 1, 2, 3):
            raise InputError(f"DeepSpeed zero stage must be 0, 1, 2 or 3, got {o.zero_stage}")
        dev = lambda section, var: str((zero.get(section) or {}).get("device", os.environ.get(var, "none"))).lower()  # noqa: E731
        o.offload_optimizer = dev("offload_optimizer", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE")
        o.offload_param = dev("offload_param", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE")
        for what, v in (("offload_optimizer", o.offload_optimizer), ("offload_param", o.offload_param)):
            if v not in ("none", "cpu"):
                raise InputError(
                    f"DeepSpeed {what} device must be none or cpu, got {v!r} (NVMe offload is not supported)"
                )
        return o

    def config(
        self, *, micro_batch: int, grad_accum: int, world: int, max_grad_norm: float, bf16: bool = False
    ) -> dict:
        """The DeepSpeed config of a run: batch sizes and clipping are compose train's. ``bf16``
        (a bf16 run): DeepSpeed's own ``bf16`` block, i.e. the module held in bf16 and the
        optimizer's fp32 master weights in ZeRO's partitions (``safe_get_full_fp32_param``);
        compose train's autocast still wraps the forward. Otherwise the trainable weights reach
        DeepSpeed as fp32 (``loop.keep_master_weights``; frozen ones in the spec's dtype). fp16
        runs are refused under DeepSpeed (its loss scaler is not wired)."""
        zero: dict = {"stage": self.zero_stage}
        if self.offload_optimizer == "cpu":
            zero["offload_optimizer"] = {"device": "cpu"}
        if self.offload_param == "cpu":
            zero["offload_param"] = {"device": "cpu"}
        return {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": grad_accum,
            "train_batch_size": micro_batch * grad_accum * world,
            "gradient_clipping": max_grad_norm,
            "zero_optimization": zero,
            "bf16": {"enabled": bf16},
            "fp16": {"enabled": False},
            "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False,  # composer's torch AdamW, also with optimizer offload
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }


@dataclass
class Engine:
    """This process's place in the job and the strategy that wraps the model."""

    strategy: str = "none"  # none | ddp | fsdp | deepspeed
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    fsdp: FsdpOptions = field(default_factory=FsdpOptions)
    deepspeed: DeepSpeedOptions = field(default_factory=DeepSpeedOptions)
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    # -- collectives (no-ops in one process) ------------------------------------------------
    def sum(self, values: list[float]) -> list[float]:
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, value: float) -> list[float]:
        """``value`` of every rank, in rank order (on every rank)."""
        if not self.distributed:
            return [value]
        t = torch.zeros(self.world, dtype=torch.float64, device=self._comm_device)
        t[self.rank] = value
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    @property
    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def close(self, ok: bool = True) -> None:
        """Destroy the process group this engine made. After a failure it is left alone: other
        ranks may be inside a collective, and destroying it could hang; the launcher ends them."""
        if self.owns_group and dist.is_initialized():
            if ok:
                import gc

                gc.collect()  # wrapped modules and pending works go before the group they use
                dist.barrier()  # no rank tears down while another still talks to it
                dist.destroy_process_group()
            self.owns_group = False

    # -- the model ----------------------------------------------------------------------------
    def wrap(
        self, model: nn.Module, *, find_unused: bool = False, compute_dtype: torch.dtype | None = None
    ) -> nn.Module:
        """Move ``model`` to this rank's device, make every rank start from rank 0's weights, and
        wrap it for the strategy. Returns the module to call for training (``model`` itself when
        not distributed). Build the optimizer after this (FSDP swaps the parameters).
        ``compute_dtype`` (bf16/fp16 training): FSDP gathers the parameters in it and reduces
        gradients in fp32 (``MixedPrecisionPolicy``)."""
        if not self.distributed:
            return model.to(self.device)
        # A low-memory load (``rank_zero_loads``): only rank 0 read the weights, the other ranks hold
        # the architecture on the meta device. Every rank must take the same path.
        from_rank0 = max(self.gather(float(any(t.is_meta for t in [*model.parameters(), *model.buffers()])))) > 0
        if from_rank0 and any(t.is_meta for t in model.parameters()) == self.main:
            raise RuntimeError("a low-memory load needs rank 0's model in memory and the others' on the meta device")
        if from_rank0 and self.strategy == "fsdp":
            return self._fully_shard_from_rank0(model, compute_dtype)
        if from_rank0 and not self.main:
            to_empty(model, self.device)  # filled by the broadcast below
        model.to(self.device)
        with torch.no_grad():  # rank 0's weights everywhere (random projectors and LoRA; all of them
            for t in [*model.parameters(), *model.buffers()]:  # after a low-memory load)
                dist.broadcast(t.data, src=0)
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)
        if self.strategy == "deepspeed":
            return model  # deepspeed.initialize wraps it together with the optimizer (``wrap_deepspeed``)
        return self._fully_shard(model, compute_dtype)

    def wrap_deepspeed(self, model: nn.Module, opt: torch.optim.Optimizer, **config):
        """``deepspeed.initialize`` with composer's optimizer (its param groups keep the
        learning rate the scheduler sets) and the config of ``DeepSpeedOptions.config``."""
        try:
            import deepspeed
        except ImportError:
            raise InputError(
                "the accelerate config selects DeepSpeed but it is not installed: pip install 'mm-composer[deepspeed]'"
            ) from None
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=opt, config=self.deepspeed.config(world=self.world, **config)
        )
        return engine

    def _fully_shard_from_rank0(self, model: nn.Module, compute_dtype: torch.dtype | None) -> nn.Module:
        """FSDP without a full copy per rank: shard the architecture on the meta device, allocate
        each rank's shards, then fill them from rank 0's weights one tensor at a time
        (``set_model_state_dict(broadcast_from_rank0=True)``). Buffers (rotary frequencies,
        position ids: some are not in the state dict) are broadcast from rank 0 as they are."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        full = model.state_dict() if self.main else {}  # rank 0's tensors, kept past the meta move below
        buffers = list(model.buffers()) if self.main else []
        to_empty(model, torch.device("meta"))  # rank 0 drops its copy too: its shards are allocated like the others'
        self._fully_shard(model, compute_dtype)
        to_empty(model, self.device)
        with torch.no_grad():
            for i, b in enumerate(model.buffers()):
                if self.main:
                    b.copy_(buffers[i])
                dist.broadcast(b, src=0)
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        return model

    def _fully_shard(self, model: nn.Module, compute_dtype: torch.dtype | None = None) -> nn.Module:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        # FSDP2 warns when a unit returns a view (nn.Linear on 3-D input does); the warning is about
        # later in-place ops on that output, and composer applies none (the FSDP tests check the
        # gradients against a 1-process run)
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(.*\) returned a view tensor")

        kw = {"reshard_after_forward": self.fsdp.reshard_after_forward}
        if self.fsdp.offload_params:
            kw["offload_policy"] = CPUOffloadPolicy()
        if compute_dtype is not None:  # the fp32 masters gathered in bf16/fp16, gradients reduced in fp32
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        names = set(self.fsdp.wrap_classes) or wrap_class_names(model)
        units = [m for m in model.modules() if type(m).__name__ in names and m is not model]
        # own units for the projectors and encoders (their leftovers: embeddings, heads), whose
        # dtypes may differ from the LLM's
        units += [*getattr(model, "projectors", {}).values(), *getattr(model, "encoders", {}).values()]
        done: set[int] = set()
        for m in units:  # modules() is pre-order: inner layers are sharded before their parents
            if id(m) in done or not any(True for _ in m.parameters()):
                continue
            fully_shard(m, **kw)
            done.add(id(m))
        fully_shard(model, **kw)
        log.info(
            "FSDP: %d units (%s) + root, reshard_after_forward=%s",
            len(done),
            ", ".join(sorted(names)),
            self.fsdp.reshard_after_forward,
        )
        return model

    def no_sync(self, module: nn.Module, sync: bool):
        """Skip the gradient reduction of a micro-batch that is not the step's last."""
        if sync or not self.distributed:
            return contextlib.nullcontext()
        if self.strategy == "ddp":
            return module.no_sync()
        if self.strategy == "deepspeed":
            return contextlib.nullcontext()  # the boundary is set per micro-batch (``backward``)

        @contextlib.contextmanager
        def fsdp_no_sync():
            module.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                module.set_requires_gradient_sync(True)

        return fsdp_no_sync()

    def backward(self, net, loss: torch.Tensor, last: bool, scaler=None) -> None:
        """Backward of one micro-batch; ``last``: the step's last (gradients are reduced)."""
        if self.strategy == "deepspeed":
            net.set_gradient_accumulation_boundary(last)
            net.backward(loss, scale_wrt_gas=False)  # composer normalises by the step's label tokens
        else:
            (scaler.scale(loss) if scaler else loss).backward()


def to_empty(model: nn.Module, device: torch.device) -> None:
    """``model.to_empty(device=...)`` that keeps tied parameters tied: moving a plain tensor between
    the meta device and another makes a new ``Parameter`` per module, which would turn a tied
    embedding and LM head into two parameters (and the ranks' parameter lists would differ)."""
    places: dict[int, list[tuple[nn.Module, str]]] = {}
    for m in model.modules():
        for name, p in m._parameters.items():
            if p is not None:
                places.setdefault(id(p), []).append((m, name))
    model.to_empty(device=device)
    for (m0, n0), *rest in places.values():
        for m, n in rest:
            m._parameters[n] = m0._parameters[n0]


def wrap_class_names(model: nn.Module) -> set[str]:
    """Layer classes FSDP shards as units: the LLM's decoder layer and every class that the
    transformers models inside ``model`` list in ``_no_split_modules`` (CLIP/SigLIP/AST encoder
    layers, Q-Former layers, ...)."""
    names: set[str] = set()
    adapter = getattr(model, "adapter", None)
    if adapter is not None and len(adapter.layers):
        names.add(type(adapter.layers[0]).__name__)
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return names


def resolve_strategy(strategy: str, world: int) -> str:
    if strategy not in STRATEGIES:
        raise InputError(f"--strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    if strategy == "auto":
        if _flag("ACCELERATE_USE_DEEPSPEED"):
            return "deepspeed"  # also on one rank: ZeRO offload is useful there
        if world == 1:
            return "none"
        return "fsdp" if _flag("ACCELERATE_USE_FSDP") else "ddp"
    if world == 1 and strategy != "deepspeed":
        log.warning(
            "--strategy %s: this is a single process (launch with torchrun or accelerate launch for several); "
            "training without it",
            strategy,
        )
        return "none"
    return strategy


def _launch_env() -> tuple[int, int, int]:
    """(world size, rank, local rank) from the launcher's environment; (1, 0, 0) without one."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        return world, rank, int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise InputError(f"WORLD_SIZE/RANK/LOCAL_RANK must be integers ({e})") from None


def setup(strategy: str = "auto") -> Engine:
    """The engine for this process: from the launcher's environment, or a single process."""
    world, rank, local_rank = _launch_env()
    strategy = resolve_strategy(strategy, world)
    cuda = torch.cuda.is_available() and not _flag("ACCELERATE_USE_CPU")
    device = torch.device("cuda", local_rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    eng = Engine(strategy=strategy, rank=rank, world=world, local_rank=local_rank, device=device)
    if strategy == "fsdp":
        eng.fsdp = FsdpOptions.from_env()
    if strategy == "deepspeed":
        eng.deepspeed = DeepSpeedOptions.from_env()
    if world == 1 and strategy != "deepspeed":
        if cuda:
            eng.device = torch.device("cuda", torch.cuda.current_device())
        return eng
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise InputError(f"WORLD_SIZE={world} but {var} is not set: launch with torchrun or accelerate launch")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = timedelta(seconds=int(os.environ.get("COMPOSER_DIST_TIMEOUT", "1800")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
        eng.owns_group = True
    if dist.get_world_size() != world:
        raise InputError(f"WORLD_SIZE={world} but the process group has {dist.get_world_size()} ranks")
    return eng


def rank_zero_loads() -> bool:
    """False on the ranks but 0 of a distributed launch (``WORLD_SIZE`` > 1): they build the model
    on the meta device and get rank 0's weights when it is wrapped (``Engine.wrap``), so that the
    checkpoint is read once and, under FSDP, no rank but 0 ever holds the full model."""
    world, rank, _ = _launch_env()
    return world <= 1 or rank == 0


def peak_host_memory_mib() -> float:
    """This process's peak resident set size so far (``getrusage``), in MiB."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def rank_share(chunk: list[int], rank: int, world: int) -> list[int]:
    """Rank ``rank``'s contiguous part of a global micro-batch: sizes differ by at most one, and
    the parts of all ranks are exactly ``chunk`` (nothing duplicated, nothing dropped)."""
    n = len(chunk)
    return chunk[rank * n // world : (rank + 1) * n // world]
