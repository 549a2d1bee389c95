"""Distributed training on the CPU: 2 ranks (gloo on 127.0.0.1, launched by torchrun or accelerate
launch with the shipped configs) under DDP, FSDP and DeepSpeed ZeRO-2/3 match a 1-process run with
the same global batch; checkpoints move between world sizes and engines (1 process -> 2 DDP
ranks, 2 FSDP ranks -> 1 process, DeepSpeed ZeRO-2 -> 1 process, FSDP -> DeepSpeed ZeRO-3); data
sharding covers every record once; accelerate configs map to options.

Tolerance: losses within 2e-5 (absolute) and final weights within 2e-5 of the 1-process run;
the runs differ only in fp32 summation order (per-rank partial sums, all-reduce), which moves
a gradient by ~1e-7 of its size. 2e-5 is 40 fp32 ulps of the losses (~5.5) and, for weights,
AdamW turns a relative gradient difference e into an update difference of ~e * lr (1e-9 here);
only an element whose gradient is within that noise of zero could differ by a step of lr, and
the zero gradients here are exact zeros (LoRA B starts at 0), the same on every rank layout.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SMOL_VISION, spec_dict
from PIL import Image
from safetensors.torch import load_file

from composer.builder import build
from composer.checkpoint import load_pretrained
from composer.errors import InputError
from composer.spec import parse_spec
from composer.train.distributed import DeepSpeedOptions, FsdpOptions, rank_share, resolve_strategy, wrap_class_names
from composer.train.loop import TrainConfig, micro_batches, train

pytestmark = pytest.mark.slow  # distributed launches: 2 ranks under torchrun / accelerate launch
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
TOL = 2e-5
N_RECORDS = 7  # odd: the epoch's last global micro-batch leaves a rank without records


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spec(**llm) -> dict:
    d = spec_dict("llama", 2, **llm)
    d["llm"]["train"] = "lora"  # LoRA inside FSDP units: frozen base weights and trainable adapters share a unit
    d["llm"]["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    return d


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    build(parse_spec(_spec())).save_pretrained(root / "init")
    rng = np.random.default_rng(0)
    recs = []
    for i in range(N_RECORDS):
        img = np.zeros((32, 32, 3), np.uint8)
        img[..., i % 3] = 150 + rng.integers(0, 100)
        Image.fromarray(img).save(root / f"img{i}.png")
        recs.append(
            {
                "image": f"img{i}.png",
                "prompt": "What colour is it?",
                "response": ["red", "green", "blue"][i % 3] + " and" * (i % 4),
            }
        )  # unequal label counts
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return root


def _cfg(root: Path, out: str, **kw) -> TrainConfig:
    base = dict(
        data=str(root / "train.jsonl"),
        output=str(root / out),
        batch_size=4,
        max_steps=4,
        lr=1e-2,
        warmup_ratio=0.0,
        scheduler="constant",
        progress=False,
        seed=0,
        eval_data=str(root / "train.jsonl"),
        eval_every=2,
    )
    return TrainConfig(**{**base, **kw})


def _eval_losses(out: Path) -> list[float]:
    return [
        r["eval_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r
    ]


def _reference(root: Path) -> tuple[list[float], dict]:
    """1 process, 4 records per step; eval loss (over the 7 records) after steps 2 and 4."""
    if not (root / "ref" / "composer.json").exists():
        losses = train(load_pretrained(root / "init"), _cfg(root, "ref", save_every=2))["losses"]
        (root / "ref_losses.json").write_text(json.dumps(losses))
    return json.loads((root / "ref_losses.json").read_text()), load_file(str(root / "ref" / "model.safetensors"))


# A ``patch`` runs in each rank's process before ``compose train`` starts; it may write lines to
# ``log``, that rank's log file (read back with ``_rank_logs``).
DRIVER = """
import os, sys

from composer.cli import main

log = open(os.environ["COMPOSER_TEST_RANK_LOG"] + "-rank" + os.environ["RANK"], "w")
{patch}
sys.argv[0] = "compose"
main()
"""


def _rank_logs(root: Path, out: str) -> list[list[str]]:
    """The lines each rank of run ``out`` wrote to its ``log`` (rank 0, rank 1)."""
    return [(root / f"{out}-log-rank{r}").read_text().splitlines() for r in (0, 1)]


def _launch(
    root: Path,
    out: str,
    *args: str,
    config: str | None = None,
    init: str = "init",
    first_rank_step: int = 1,
    patch: str | None = None,
    output: bool = False,
    steps: int = 4,
) -> list[float]:
    """2 ranks on this machine: torchrun, or accelerate launch with one of the shipped configs;
    each rank runs ``compose train``, after ``patch`` when given (see ``DRIVER``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    entry = ["-m", "composer.cli"]
    if patch is not None:
        driver = root / f"{out}-driver.py"
        driver.write_text(DRIVER.replace("{patch}", patch))
        env["COMPOSER_TEST_RANK_LOG"] = str(root / f"{out}-log")
        entry = [str(driver)]
    if config is None:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(_free_port()),
        ]
    else:  # the config's 8 GPUs and bf16 become 2 CPU processes in fp32; everything else is the config's
        launcher = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(CONFIGS / config),
            "--num_processes",
            "2",
            "--mixed_precision",
            "no",
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            str(_free_port()),
        ]
    cmd = [
        *launcher,
        *entry,
        "train",
        str(root / init),
        "--data",
        str(root / "train.jsonl"),
        "-o",
        str(root / out),
        "--max-steps",
        str(steps),
        "--lr",
        "1e-2",
        "--warmup-ratio",
        "0",
        "--scheduler",
        "constant",
        "--eval-data",
        str(root / "train.jsonl"),
        "--eval-every",
        "2",
        *args,
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    if "--profile" in args or output:
        return r.stdout
    recs = [json.loads(ln) for ln in (root / out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs] == list(range(1, steps + 1))  # logged once (rank 0), not once per rank
    assert all(x["world_size"] == 2 for x in recs if x["step"] >= first_rank_step)  # earlier: a resumed run's
    return [x["loss"] for x in recs]


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_ddp_two_ranks_match_one_process(setup):
    """2 ranks x 1 record x 2 accumulated micro-batches = the reference's 4 records per step."""
    ref, ref_w = _reference(setup)
    losses = _launch(setup, "ddp", "--strategy", "ddp", "--batch-size", "1", "--grad-accum", "2")
    np.testing.assert_allclose(losses, ref, atol=TOL, rtol=0)
    # eval sharded over the ranks (a rank idle in the last micro-batch): the same mean token loss
    np.testing.assert_allclose(_eval_losses(setup / "ddp"), _eval_losses(setup / "ref"), atol=TOL, rtol=0)
    assert len(_eval_losses(setup / "ref")) == 2
    assert _max_diff(load_file(str(setup / "ddp" / "model.safetensors")), ref_w) < TOL
    assert ref[-1] < ref[0]


def _fsdp_run(root: Path) -> list[float]:
    """The 2-rank FSDP run (accelerate's fsdp_8gpu.yaml, 2 records per rank, checkpoints after steps
    2 and 4), launched by whichever test needs it first (the tests run in any order). -> losses"""
    if not (root / "fsdp" / "model.safetensors").is_file():
        _launch(root, "fsdp", "--batch-size", "2", "--save-every", "2", config="fsdp_8gpu.yaml")
    return [json.loads(ln)["loss"] for ln in (root / "fsdp" / "metrics.jsonl").read_text().splitlines()]


def test_fsdp_two_ranks_match_one_process_and_resume_in_one(setup):
    ref, ref_w = _reference(setup)
    losses = _fsdp_run(setup)
    np.testing.assert_allclose(losses, ref, atol=TOL, rtol=0)
    np.testing.assert_allclose(_eval_losses(setup / "fsdp"), _eval_losses(setup / "ref"), atol=TOL, rtol=0)
    # the final model: gathered from the shards, written once by rank 0, a normal checkpoint
    assert _max_diff(load_file(str(setup / "fsdp" / "model.safetensors")), ref_w) < TOL
    ckpt = setup / "fsdp" / "checkpoints" / "step-000002"
    meta = json.loads((ckpt / "trainer_state.json").read_text())
    assert meta["world_size"] == 2 and meta["strategy"] == "fsdp" and meta["state"]["seen"] == 0
    shards = sorted(p.name for p in (ckpt / "state").glob("*.safetensors"))
    assert len(shards) == 2, shards  # one per rank
    # resume the 2-rank checkpoint in 1 process, 4 records per step: steps 3-4 as the reference's
    resumed = _from_step_2(setup, "fsdp", "resumed")
    rest = train(load_pretrained(setup / "init"), _cfg(setup, "resumed", resume=True))["losses"]
    np.testing.assert_allclose(rest, ref[2:], atol=TOL, rtol=0)
    assert _max_diff(load_file(str(resumed / "model.safetensors")), ref_w) < TOL


def _adamw_bound(*, lr: float, steps: int, betas: tuple[float, float] = (0.9, 0.999)) -> float:
    """How far two AdamW runs from the same weights can end apart, per element, whatever their
    gradients: 2 * sum over steps t of lr * c_t. ``compose train`` uses ``torch.optim.AdamW``'s
    default betas and eps, weight decay 0 (the default) and here a constant lr, no warmup.
    At step t the update is lr * m_hat / (sqrt(v_hat) + eps) with m_t = (1-b1) sum_i b1^(t-i) g_i,
    v_t = (1-b2) sum_i b2^(t-i) g_i^2 and bias corrections 1-b1^t, 1-b2^t; Cauchy-Schwarz on
    sum_i (b1^(t-i) / b2^((t-i)/2)) (b2^((t-i)/2) g_i) gives the largest |m_hat / sqrt(v_hat)|,
    c_t = (1-b1)/(1-b1^t) * sqrt((1-b2^t)/(1-b2) * sum_{k<t} (b1^2/b2)^k), reached when
    g_i ~ (b1/b2)^(t-i): 1, 1.0014, 1.0036, 1.0068 for t = 1..4. Gradient clipping rescales
    g, which leaves c_t as it is."""
    b1, b2 = betas
    c = [
        (1 - b1) / (1 - b1**t) * math.sqrt((1 - b2**t) / (1 - b2) * sum((b1 * b1 / b2) ** k for k in range(t)))
        for t in range(1, steps + 1)
    ]
    return 2 * lr * sum(c)


def test_fsdp_bf16_mixed_precision_tracks_one_process(setup):
    """A bf16 model (LoRA adapters and projector trainable, held as fp32 master weights) under
    FSDP2 with a MixedPrecisionPolicy (parameters gathered in bf16, gradients reduced in fp32)
    follows the 1-process bf16-autocast run, and the saved trainable weights are bf16, the spec's
    dtype. The two runs compute the same steps but round at different points (FSDP casts the
    gathered weights, autocast the matmul inputs; the ranks sum gradients in another order), so:

    - losses and eval losses within 2e-3: a token's cross-entropy moves by at most 2 max|dz| when
      its logits move by dz (its gradient in z has l1 norm <= 2); this model's logits are below 1,
      where one bf16 rounding is <= 2^-9, so one rounding of every logit moves a token's loss by
      <= 2^-8 = 3.9e-3 at worst, and a step's loss averages such terms of mixed sign over its
      tokens. 2e-3 is still 8x below the smallest change of the loss from one step to the next
      (~0.017, steps 3 -> 4), so a skipped, repeated or unsynchronised step fails.
    - every saved weight within the hard bound ``_adamw_bound``: AdamW moves a weight by at most
      c_t * lr at step t whatever its gradient, so two runs from the same init end at most
      2 * sum(c_t) * lr apart (0.080 here), plus the two bf16 roundings of the saved values.
      An element whose gradient is within the rounding noise of zero can use all of it (Adam
      scales that noise up to a whole step of lr), so the bound is loose by design;
    - hence also: at least half of the saved elements equal or one bf16 ulp apart. An element
      whose gradient is far above the runs' rounding noise gets the same Adam update from
      nearly the same gradients, so its fp32 masters agree far below bf16's resolution and their
      bf16 roundings are equal or adjacent; only the near-zero-gradient elements can differ by
      whole steps of lr. How many elements sit that close to zero is a property of the model and
      data (7.5% here differ by more than 1 ulp, at 1 and 2 threads alike); the CPU's rounding
      only decides which way those go. Saved weights of another step, another rank's shard
      only or the init differ by >= lr = ~40 ulps of |w| ~ 0.04 at nearly every element."""
    build(parse_spec(_spec(dtype="bfloat16"))).save_pretrained(setup / "init_bf16")
    ref = train(load_pretrained(setup / "init_bf16"), _cfg(setup, "ref_bf16", precision="bf16"))["losses"]
    losses = _launch(
        setup, "fsdp_bf16", "--batch-size", "2", "--precision", "bf16", config="fsdp_8gpu.yaml", init="init_bf16"
    )
    np.testing.assert_allclose(losses, ref, atol=2e-3, rtol=0)
    np.testing.assert_allclose(_eval_losses(setup / "fsdp_bf16"), _eval_losses(setup / "ref_bf16"), atol=2e-3, rtol=0)
    assert losses[-1] < losses[0]
    saved = load_file(str(setup / "fsdp_bf16" / "model.safetensors"))
    trained = [k for k in saved if k.startswith("projectors.") or "lora_" in k]
    assert trained and {saved[k].dtype for k in trained} == {torch.bfloat16}
    ref_w = load_file(str(setup / "ref_bf16" / "model.safetensors"))
    got = torch.cat([saved[k].float().flatten() for k in trained])
    want = torch.cat([ref_w[k].float().flatten() for k in trained])
    diff, big = (got - want).abs(), torch.maximum(got.abs(), want.abs())
    bound = _adamw_bound(lr=1e-2, steps=4) + 2**-7 * big  # two bf16 roundings (2^-8 |w| each), fp32 slack
    assert bool((diff <= bound).all()), float((diff - bound).max())
    ulp = torch.ldexp(torch.ones_like(big), torch.frexp(big).exponent - 8)  # bf16: 8 significant bits
    assert float((diff <= ulp).float().mean()) >= 0.5


# Each rank logs the dtype of the projector's weights that each training forward pass computes with.
DTYPE_PATCH = """
from composer.model import ComposedModel

forward = ComposedModel.forward


def logged(self, *args, **kwargs):
    if self.training:
        log.write(str(next(self.projectors.parameters()).dtype) + "\\n")
        log.flush()
    return forward(self, *args, **kwargs)


ComposedModel.forward = logged
"""


def test_deepspeed_bf16_keeps_fp32_masters_and_tracks_one_process(setup):
    """A bf16 model under DeepSpeed ZeRO-2 with ``--precision bf16`` runs in
    DeepSpeed's own bf16 mode (the module in bf16, fp32 master weights in ZeRO's partitions) and
    follows the 1-process bf16-autocast run (losses within 2e-3: the bound of FSDP's bf16 run,
    test_fsdp_bf16_mixed_precision_tracks_one_process, derived there); the saved
    trainable weights come from the fp32 masters (``--save-dtype float32``), not from the
    module's bf16 copies; the checkpoint resumes in 1 process."""
    pytest.importorskip("deepspeed")
    d = _spec(dtype="bfloat16")
    d["modalities"]["image"]["encoder"]["dtype"] = "bfloat16"  # every frozen weight bf16
    build(parse_spec(d)).save_pretrained(setup / "init_all_bf16")
    ref = train(load_pretrained(setup / "init_all_bf16"), _cfg(setup, "ref_all_bf16", precision="bf16"))["losses"]
    losses = _launch(
        setup,
        "ds_bf16",
        "--strategy",
        "deepspeed",
        "--batch-size",
        "2",
        "--precision",
        "bf16",
        "--save-dtype",
        "float32",
        "--save-every",
        "2",
        init="init_all_bf16",
        patch=DTYPE_PATCH,
    )
    np.testing.assert_allclose(losses, ref, atol=2e-3, rtol=0)
    for dtypes in _rank_logs(setup, "ds_bf16"):  # DeepSpeed's bf16 mode: the module computes with bf16 copies
        assert set(dtypes) == {"torch.bfloat16"}
    saved = load_file(str(setup / "ds_bf16" / "model.safetensors"))
    trained = [k for k in saved if k.startswith("projectors.") or "lora_" in k]
    assert trained and {saved[k].dtype for k in trained} == {torch.float32}
    # the fp32 masters moved by less than bf16 can hold: not all of them are bf16 values
    assert any(not torch.equal(saved[k], saved[k].bfloat16().float()) for k in trained)
    frozen = [k for k in saved if k not in trained and saved[k].is_floating_point()]
    assert {saved[k].dtype for k in frozen} == {torch.bfloat16}
    # resumed in 1 process from DeepSpeed's step-2 checkpoint: steps 3-4 as the bf16 reference
    _from_step_2(setup, "ds_bf16", "ds_bf16_resumed")
    cfg = _cfg(setup, "ds_bf16_resumed", precision="bf16", resume=True)
    rest = train(load_pretrained(setup / "init_all_bf16"), cfg)["losses"]
    np.testing.assert_allclose(rest, ref[2:], atol=2e-3, rtol=0)


def test_real_llm_stage_1_under_ddp_and_fsdp_resumes_exactly(setup, smol_dir):
    """A stage-1 run (ViT + projector trained, SmolLM2-135M frozen, image tokens
    at layer 15 of 30) on 2 CPU ranks under DDP and under FSDP (accelerate's fsdp_8gpu.yaml)
    matches the 1-process run step by step and its loss falls; the FSDP run's step-2 checkpoint
    resumes in 1 process into the reference's steps 3-4. Losses (fp32, 5-7.5) agree within 2^-12
    relative, 4,096 fp32 rounding units (2^-24): the ranks sum in another order (and run 1 thread
    against the reference's 2) through 30 layers whose residual stream peaks near 4,400 against
    logits <= 42, which alone puts ~1e-4 of rounding difference on SmolLM2's logits
    (test_real_llm: 1.5e-4 to 2.6e-4); 4 AdamW steps at lr 1e-3 on a fully trained ViT then move
    near-zero-gradient weights by up to whole steps, which changes the loss only to second order
    (their gradient is near zero). Measured 3.1e-5 DDP, 2.5e-5 FSDP and resumed on one machine,
    1.1e-4 DDP at step 4 on another: 10x under 2^-12 * 5 = 1.2e-3, while consecutive losses
    (6.77, 7.50, 5.00, 6.53) differ by >= 0.7, so a skipped or repeated step fails. The final
    model gathered from FSDP shards is written by huggingface_hub's safetensors writer, which
    refuses views into the gathered buffers (``checkpoint._owning`` hands it tensors that own
    their memory)."""
    import yaml

    spec = {
        "name": "smol-dist",
        "seed": 0,
        "llm": {"model": str(smol_dir), "attn_implementation": "sdpa"},
        "modalities": {
            "image": {
                "encoder": {"config": dict(SMOL_VISION), "feature_layer": -2, "select": "patch", "train": "full"},
                "projector": {"type": "mlp", "depth": 2, "activation": "gelu"},
                "insert_at": 15,
            }
        },
    }
    (setup / "smol.yaml").write_text(yaml.safe_dump(spec))
    kw = dict(stage=1, lr=1e-3, save_every=2)
    ref = train(build(setup / "smol.yaml"), _cfg(setup, "smol_ref", **kw))["losses"]
    assert ref[-1] < ref[0], ref
    common = ("--stage", "1", "--lr", "1e-3", "--batch-size", "2")
    ddp = _launch(setup, "smol_ddp", *common, "--strategy", "ddp", init="smol.yaml")
    np.testing.assert_allclose(ddp, ref, atol=0, rtol=2**-12)
    fsdp = _launch(setup, "smol_fsdp", *common, "--save-every", "2", config="fsdp_8gpu.yaml", init="smol.yaml")
    np.testing.assert_allclose(fsdp, ref, atol=0, rtol=2**-12)
    _from_step_2(setup, "smol_fsdp", "smol_resumed")
    rest = train(build(setup / "smol.yaml"), _cfg(setup, "smol_resumed", resume=True, **kw))["losses"]
    np.testing.assert_allclose(rest, ref[2:], atol=0, rtol=2**-12)


def _from_step_2(root: Path, src: str, dst: str) -> Path:
    """A copy of run ``src`` as it was after step 2 (its last checkpoint and metrics up to there)."""
    shutil.copytree(root / src, root / dst)
    shutil.rmtree(root / dst / "checkpoints" / "step-000004")
    (root / dst / "model.safetensors").unlink()
    return root / dst


def test_deepspeed_zero2_two_ranks_match_and_resume_in_one_process(setup):
    """accelerate launch with configs/accelerate/deepspeed_zero2_8gpu.yaml, 1 record x 2
    accumulated micro-batches per rank; its checkpoint (each parameter's full tensors, written by
    one rank) resumes in 1 process through the DCP reader."""
    pytest.importorskip("deepspeed")
    ref, ref_w = _reference(setup)
    losses = _launch(
        setup,
        "zero2",
        "--batch-size",
        "1",
        "--grad-accum",
        "2",
        "--save-every",
        "2",
        config="deepspeed_zero2_8gpu.yaml",
    )
    np.testing.assert_allclose(losses, ref, atol=TOL, rtol=0)
    np.testing.assert_allclose(_eval_losses(setup / "zero2"), _eval_losses(setup / "ref"), atol=TOL, rtol=0)
    assert _max_diff(load_file(str(setup / "zero2" / "model.safetensors")), ref_w) < TOL
    meta = json.loads((setup / "zero2" / "checkpoints" / "step-000002" / "trainer_state.json").read_text())
    assert meta["strategy"] == "deepspeed" and meta["world_size"] == 2
    resumed = _from_step_2(setup, "zero2", "zero2-resumed")
    rest = train(load_pretrained(setup / "init"), _cfg(setup, "zero2-resumed", resume=True))["losses"]
    np.testing.assert_allclose(rest, ref[2:], atol=TOL, rtol=0)
    assert _max_diff(load_file(str(resumed / "model.safetensors")), ref_w) < TOL


def test_deepspeed_zero3_with_offload_resumes_an_fsdp_checkpoint(setup):
    """configs/accelerate/deepspeed_zero3_8gpu.yaml (weights partitioned, optimizer state on the
    CPU), with gradient checkpointing, picks up the 2-rank FSDP run's step-2 checkpoint and
    finishes it as the reference does."""
    pytest.importorskip("deepspeed")
    ref, ref_w = _reference(setup)
    _fsdp_run(setup)
    out = _from_step_2(setup, "fsdp", "zero3")
    losses = _launch(
        setup, "zero3", "--batch-size", "2", "--resume", "--grad-checkpointing", config="deepspeed_zero3_8gpu.yaml"
    )  # recomputed activations: the same numbers
    np.testing.assert_allclose(losses[2:], ref[2:], atol=TOL, rtol=0)
    assert _max_diff(load_file(str(out / "model.safetensors")), ref_w) < TOL


def test_a_one_process_checkpoint_resumes_on_two_ranks(setup):
    """The 1-process reference's step-2 checkpoint resumes under DDP on 2 ranks
    (1 record x 2 accumulated micro-batches each: the same 4 records per step) and finishes as the
    reference does."""
    ref, ref_w = _reference(setup)
    out = _from_step_2(setup, "ref", "one_to_two")
    losses = _launch(
        setup,
        "one_to_two",
        "--strategy",
        "ddp",
        "--batch-size",
        "1",
        "--grad-accum",
        "2",
        "--resume",
        first_rank_step=3,
    )  # steps 1-2 were logged by the 1-process run
    np.testing.assert_allclose(losses[2:], ref[2:], atol=TOL, rtol=0)
    assert _max_diff(load_file(str(out / "model.safetensors")), ref_w) < TOL


# Each rank records its LoRA dropout masks: the first 256 keep/drop bits of every dropout call
# (one line per call: step-independent order, so two runs can be compared call by call).
DROPOUT_PATCH = """
import torch
import torch.nn.functional as F

orig = F.dropout


def dropout(x, p=0.5, training=True, inplace=False):
    y = orig(x, p, training, inplace)
    if training and p > 0:
        dropped = ((y == 0) & (x != 0)).flatten()[:256]
        log.write(str(torch.initial_seed()) + " " + "".join("01"[int(b)] for b in dropped) + "\\n")
        log.flush()
    return y


F.dropout = dropout
"""


def test_lora_dropout_draws_per_rank_masks_and_resumes_exactly(setup):
    """With LoRA dropout 0.3 on 2 DDP ranks, each rank draws its own dropout
    masks (seeded ``seed + rank``, not one stream copied to every rank), and a run resumed from
    its step-2 checkpoint on 2 ranks restores each rank's RNG stream: the same masks and the
    same losses (within 1e-6, 2 fp32 ulps at these losses: the resumed run repeats the same
    operations in the same processes) as the uninterrupted run."""
    d = _spec()
    d["llm"]["lora"]["dropout"] = 0.3
    build(parse_spec(d)).save_pretrained(setup / "init_dropout")
    common = ("--strategy", "ddp", "--batch-size", "1", "--grad-accum", "2", "--save-every", "2")

    def run(out, *extra, first_rank_step=1):
        losses = _launch(
            setup, out, *common, *extra, init="init_dropout", patch=DROPOUT_PATCH, first_rank_step=first_rank_step
        )
        return losses, [[ln.split() for ln in lines] for lines in _rank_logs(setup, out)]

    losses, (m0, m1) = run("dropout")
    assert {s for s, _ in m0} == {"0"} and {s for s, _ in m1} == {"1"}  # seed + rank
    assert len(m0) == len(m1) > 0 and all("1" in bits for _, bits in m0 + m1)  # dropout is on
    assert m0[0][1] != m1[0][1]  # the first masks differ: one stream per rank
    assert not set(bits for _, bits in m0) & set(bits for _, bits in m1)

    _from_step_2(setup, "dropout", "dropout_resumed")
    rest, (r0, r1) = run("dropout_resumed", "--resume", first_rank_step=3)
    np.testing.assert_allclose(rest[2:], losses[2:], atol=1e-6, rtol=0)
    half = len(m0) // 2  # steps 3-4 draw the second half of each rank's masks
    assert len(r0) == len(r1) == half
    assert [b for _, b in r0] == [b for _, b in m0[half:]] and [b for _, b in r1] == [b for _, b in m1[half:]]


# Each rank logs the name of every tensor it reads from a safetensors file (headers are not counted).
READS_PATCH = """
import safetensors

real = safetensors.safe_open


class Counting:
    def __init__(self, *args, **kwargs):
        self.f = real(*args, **kwargs)

    def __enter__(self):
        self.f.__enter__()
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)

    def __getattr__(self, name):  # keys, get_slice, metadata
        return getattr(self.f, name)

    def get_tensor(self, key):
        log.write(key + "\\n")
        log.flush()
        return self.f.get_tensor(key)


safetensors.safe_open = Counting
"""


def test_low_memory_load_keeps_the_full_model_off_the_other_ranks(setup):
    """Under FSDP only rank 0 reads the checkpoint; rank 1 builds on the meta device
    and receives its shards: it reads no tensor, and its peak host memory while loading is about
    half a model lower than with --no-low-memory, where it loads the whole checkpoint as rank 0
    does. Both runs train alike. The model: a 65k-token vocabulary (untied 512-wide embedding and
    head) makes the LLM ~70M parameters (~300 MiB in fp32), next to ~0.5 GB of Python and torch."""
    import re

    d = _spec()
    d["llm"]["config"].update(vocab_size=65536, hidden_size=512, intermediate_size=1024, num_attention_heads=8)
    d["llm"]["config"]["num_key_value_heads"] = 8
    model = build(parse_spec(d))
    mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    model.save_pretrained(setup / "init_big")
    del model

    n_tensors = len(load_file(str(setup / "init_big" / "model.safetensors")))

    def run(out, *extra):
        text = _launch(
            setup,
            out,
            "--strategy",
            "fsdp",
            "--batch-size",
            "2",
            *extra,
            init="init_big",
            output=True,
            steps=2,
            patch=READS_PATCH,
        )
        peaks = re.search(r"peak host memory per rank: loading ([\d,]+), ([\d,]+) MiB", text)
        assert peaks, text
        losses = [json.loads(ln)["loss"] for ln in (setup / out / "metrics.jsonl").read_text().splitlines()]
        reads = [len(lines) for lines in _rank_logs(setup, out)]
        return [float(p.replace(",", "")) for p in peaks.groups()], losses, reads

    (low0, low1), losses, low_reads = run("big_low")
    (full0, full1), full_losses, full_reads = run("big_full", "--no-low-memory")
    np.testing.assert_allclose(losses, full_losses, atol=TOL, rtol=0)
    assert low_reads == [n_tensors, 0] and full_reads == [n_tensors, n_tensors]  # rank 1 read no weights
    # rank 1 holds its half of the model, not the whole: its loading peak drops by the other half
    # (mib / 2); 0.3 * mib leaves 0.2 * mib (~60 MiB) for allocator slack (measured 658 vs 794 MiB,
    # a drop of 0.46 * mib; the model 297 MiB)
    assert full1 - low1 > 0.3 * mib, (low1, full1, mib)


def test_profile_reports_each_rank_under_fsdp(setup):
    out = _launch(setup, "prof", "--profile", "--strategy", "fsdp", "--batch-size", "2")
    assert "training step on 2 ranks (fsdp)" in out, out
    rows = [ln.split() for ln in out.splitlines() if ln.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["0", "1"], out  # printed once, by rank 0
    assert all(0.0 < float(r[4]) < 1.0 for r in rows)  # FLOPs k/0: image tokens skip layers 0-1
    assert "slowest rank: time k/0" in out


def test_data_sharding_covers_every_record_once():
    for n, bs, world in [(7, 1, 2), (7, 2, 2), (10, 3, 4), (5, 4, 3), (1, 2, 2)]:
        for seen in (0, bs * world):
            chunks = micro_batches(n, bs, world, seed=3, epoch=1, seen=min(seen, n))
            got = [i for c in chunks for r in range(world) for i in rank_share(c, r, world)]
            order = micro_batches(n, 1, 1, seed=3, epoch=1)
            flat = [i for c in order for i in c]
            assert sorted(flat) == list(range(n))  # the epoch's order is a permutation of the records
            assert got == flat[min(seen, n) :]
            if not seen:
                assert sorted(got) == list(range(n))  # every record once, on exactly one rank
            assert all(len(rank_share(c, r, world)) <= bs for c in chunks for r in range(world))


def test_grad_accum_from_the_accelerate_config(monkeypatch, caplog):
    """Without --grad-accum, accelerate's exported gradient_accumulation_steps
    (ACCELERATE_GRADIENT_ACCUMULATION_STEPS) is used; a flag that disagrees wins, with a warning;
    a non-integer is one error naming the variable."""
    from composer.train.loop import launcher_grad_accum

    monkeypatch.delenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", raising=False)
    assert launcher_grad_accum(None) == 1 and launcher_grad_accum(3) == 3
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    cfg = TrainConfig(data="d.jsonl", output="o")
    cfg.check()
    assert cfg.grad_accum == 4
    with caplog.at_level("WARNING", logger="composer.train"):
        assert launcher_grad_accum(2) == 2
    assert "--grad-accum 2 overrides the accelerate config's gradient_accumulation_steps 4" in caplog.text
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "auto")
    assert launcher_grad_accum(None) == 1
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "four")
    with pytest.raises(InputError, match="ACCELERATE_GRADIENT_ACCUMULATION_STEPS='four'"):
        launcher_grad_accum(None)


def test_strategy_from_accelerate_config(monkeypatch):
    for var in (
        "ACCELERATE_USE_FSDP",
        "ACCELERATE_USE_DEEPSPEED",
        "FSDP_SHARDING_STRATEGY",
        "ACCELERATE_DEEPSPEED_ZERO_STAGE",
        "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE",
        "ACCELERATE_DEEPSPEED_CONFIG_FILE",
        "FSDP_RESHARD_AFTER_FORWARD",
        "FSDP_OFFLOAD_PARAMS",
        "FSDP_TRANSFORMER_CLS_TO_WRAP",
    ):
        monkeypatch.delenv(var, raising=False)
    assert resolve_strategy("auto", 1) == "none"
    assert resolve_strategy("auto", 2) == "ddp"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert resolve_strategy("auto", 2) == "fsdp"
    assert resolve_strategy("ddp", 2) == "ddp"  # an explicit --strategy wins
    monkeypatch.setenv("FSDP_SHARDING_STRATEGY", "SHARD_GRAD_OP")
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "LlamaDecoderLayer, CLIPEncoderLayer")
    o = FsdpOptions.from_env()
    assert (o.reshard_after_forward, o.offload_params, o.wrap_classes) == (
        False,
        True,
        ["LlamaDecoderLayer", "CLIPEncoderLayer"],
    )
    monkeypatch.setenv("FSDP_SHARDING_STRATEGY", "1")  # old configs write numbers
    assert FsdpOptions.from_env().reshard_after_forward is True
    monkeypatch.setenv("FSDP_SHARDING_STRATEGY", "HYBRID_SHARD")
    with pytest.raises(InputError, match="HYBRID_SHARD"):
        FsdpOptions.from_env()
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert resolve_strategy("auto", 2) == "deepspeed"
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "5")
    with pytest.raises(InputError, match="zero stage must be 0, 1, 2 or 3, got 5"):
        DeepSpeedOptions.from_env()
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "nvme")
    with pytest.raises(InputError, match="NVMe offload is not supported"):
        DeepSpeedOptions.from_env()
    with pytest.raises(InputError, match="--strategy"):
        resolve_strategy("zero3", 2)


def test_fsdp_units_know_the_decoder_and_encoder_layers(tiny_llava):
    names = wrap_class_names(tiny_llava)
    assert {"LlamaDecoderLayer", "CLIPEncoderLayer"} <= names


def test_world_size_without_rendezvous_is_one_clear_error(monkeypatch, tmp_path):
    from composer.train.distributed import setup

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(InputError, match="MASTER_ADDR"):
        setup("auto")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(InputError, match="WORLD_SIZE"):
        setup("auto")


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_accelerate_configs_map_to_strategies(config, monkeypatch):
    """Each config under configs/accelerate, read by accelerate's own launcher code, exports the
    environment that composer turns into the strategy the config's comment promises."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import (
        prepare_deepspeed_cmd_env,
        prepare_multi_gpu_env,
        prepare_simple_launcher_cmd_env,
    )

    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / config), "-m", "composer.cli", "train"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:  # as accelerate's launch_command does before its DeepSpeed launcher
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        env = prepare_deepspeed_cmd_env(args)[1]
    elif args.use_fsdp or args.multi_gpu:
        env = prepare_multi_gpu_env(args)
    else:
        env = prepare_simple_launcher_cmd_env(args)[1]
    for k in [k for k in os.environ if k.startswith(("FSDP_", "ACCELERATE_"))]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        if k.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(k, v)
    world = args.num_processes
    expected = {
        "single_gpu.yaml": ("none", None),
        "ddp_8gpu.yaml": ("ddp", None),
        "deepspeed_zero2_8gpu.yaml": ("deepspeed", None),
        "deepspeed_zero3_8gpu.yaml": ("deepspeed", None),
        "fsdp_8gpu.yaml": ("fsdp", True),
        "fsdp_zero2_8gpu.yaml": ("fsdp", False),
        "fsdp_2node_16gpu.yaml": ("fsdp", True),
    }[config]
    assert resolve_strategy("auto", world) == expected[0]
    if expected[0] == "fsdp":
        o = FsdpOptions.from_env()
        assert o.reshard_after_forward is expected[1] and not o.offload_params
        assert o.activation_checkpointing is (config == "fsdp_2node_16gpu.yaml")
    if config == "fsdp_2node_16gpu.yaml":
        assert (args.num_machines, world) == (2, 16)
    if expected[0] == "deepspeed":
        o = DeepSpeedOptions.from_env()
        stage = 2 if "zero2" in config else 3
        assert (o.zero_stage, o.offload_optimizer, o.offload_param) == (stage, "none" if stage == 2 else "cpu", "none")
        ds = o.config(micro_batch=2, grad_accum=4, world=8, max_grad_norm=1.0)
        assert ds["train_batch_size"] == 64 and ds["zero_optimization"]["stage"] == stage
