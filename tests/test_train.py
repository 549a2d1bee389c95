"""Training: loss decreases, exact resume, frozen weights untouched, LoRA merge, data formats."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import spec_dict
from PIL import Image

from composer.builder import build
from composer.errors import InputError
from composer.model import ComposedModel
from composer.spec import parse_spec
from composer.train.data import Collator, read_jsonl
from composer.train.loop import TrainConfig, merge_lora, train


def _model(llm_train="lora", k=2):
    d = spec_dict("llama", k)
    d["llm"]["train"] = llm_train
    if llm_train == "lora":
        d["llm"]["lora"] = {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}
    return build(parse_spec(d))


def _data(tmp_path, n=6, name="train.jsonl"):
    rng = np.random.default_rng(0)
    recs = []
    for i in range(n):
        colour = ["red", "green", "blue"][i % 3]
        img = np.zeros((32, 32, 3), np.uint8)
        img[..., i % 3] = 200 + rng.integers(0, 50)
        Image.fromarray(img).save(tmp_path / f"img{i}.png")
        if i % 3 == 0:
            recs.append(
                {
                    "image": f"img{i}.png",
                    "conversations": [
                        {"from": "human", "value": "<image>\nWhat colour is it?"},
                        {"from": "gpt", "value": colour},
                        {"from": "human", "value": "Sure?"},
                        {"from": "gpt", "value": "yes"},
                    ],
                }
            )
        else:
            recs.append({"image": f"img{i}.png", "prompt": "What colour is it?", "response": colour})
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def _cfg(tmp_path, data, **kw):
    base = dict(
        data=str(data),
        output=str(tmp_path / "out"),
        batch_size=3,
        lr=5e-3,
        warmup_ratio=0.0,
        scheduler="constant",
        progress=False,
        seed=0,
    )
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_each_epoch_visits_every_record_once(tmp_path, monkeypatch, grad_accum):
    """The loop's own batches (spied as it takes them): each epoch is a permutation of the records, epochs
    are reshuffled, and the metrics count epochs as steps go by."""
    from composer.train import loop

    seen: list[list[int]] = []
    real = loop.batch_stream

    def spy(examples, micro, collate, eng, *args):
        for chunk, out in zip(micro, real(examples, micro, collate, eng, *args), strict=True):
            seen.append(list(chunk))  # a micro-batch the loop took
            yield out

    monkeypatch.setattr(loop, "batch_stream", spy)
    data = _data(tmp_path, n=10)
    summary = train(_model("frozen"), _cfg(tmp_path, data, batch_size=2, grad_accum=grad_accum, epochs=3))
    steps_per_epoch = -(-5 // grad_accum)  # 10 records in micro-batches of 2, grad_accum of them per step
    assert summary["steps"] == 3 * steps_per_epoch
    flat = [i for c in seen for i in c]
    epochs = [flat[e * 10 : (e + 1) * 10] for e in range(3)]
    assert len(flat) == 30 and all(sorted(e) == list(range(10)) for e in epochs)
    assert epochs[0] != epochs[1]
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [s // steps_per_epoch for s in range(3 * steps_per_epoch)]


def test_labels_cover_responses_only(tmp_path):
    model = _model()
    ex = read_jsonl(_data(tmp_path), {"image": "<image>"})
    batch = Collator(model)(ex[:2])
    tok = model.tokenizer
    for row in range(2):
        lab = batch["labels"][row]
        assert (lab[batch["input_ids"][row] == model.placeholder_ids["image"]] == -100).all()
        assert (lab[lab != -100] == tok.eos_token_id).sum() == (2 if row == 0 else 1)  # each response ends with EOS
    first = batch["labels"][0]
    assert tok.decode(first[first != -100].tolist(), skip_special_tokens=True).split() == ["red", "yes"]
    assert (
        tok.decode(batch["labels"][1][batch["labels"][1] != -100].tolist(), skip_special_tokens=True).strip() == "green"
    )


def test_lora_training_keeps_frozen_weights_bit_identical(tmp_path):
    model = _model("lora")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert any(n.startswith("encoders.") for n in frozen) and any("q_proj.base_layer" in n for n in frozen)
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
    summary = train(model, _cfg(tmp_path, _data(tmp_path, n=3), max_steps=4))
    assert summary["losses"][-1] < summary["losses"][0]
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
        if n in lora:
            assert not torch.equal(p, lora[n]), n


def test_loss_decreases_on_a_fixed_batch(tmp_path):
    model = _model("full")
    summary = train(model, _cfg(tmp_path, _data(tmp_path, n=3), max_steps=12, lr=1e-2))
    assert summary["losses"][-1] < 0.5 * summary["losses"][0], summary["losses"]
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == list(range(1, 13))
    again = ComposedModel.from_pretrained(tmp_path / "out")  # the trained output reloads and generates
    batch = again.prepare([again.format_prompt("What colour is it?")], image=[str(tmp_path / "img0.png")])
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, model.eval()(**batch).logits)
    assert again.generate(**batch, max_new_tokens=3).shape[0] == 1


def test_resume_continues_the_same_loss_curve(tmp_path):
    data = _data(tmp_path)
    kw = dict(max_steps=6, save_every=2, grad_accum=2, batch_size=2)
    full = train(_model(), _cfg(tmp_path / "a", data, **kw))["losses"]
    part = _cfg(tmp_path / "b", data, stop_after=3, **kw)
    first = train(_model(), part)["losses"]
    rest = train(_model(), _cfg(tmp_path / "b", data, resume=True, **kw))["losses"]  # resumes from step 2
    assert first == full[:3]
    assert rest == full[2:], (rest, full)  # bit-identical, including LoRA dropout's RNG
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "b" / "out" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_save_total_limit_keeps_the_newest_checkpoints_and_shards_the_final_model(tmp_path):
    """--save-total-limit 2 keeps the two newest training checkpoints (the run
    still resumes from the newest), and --max-shard-size shards the final model."""
    data = _data(tmp_path)
    kw = dict(max_steps=4, save_every=1, save_total_limit=2, max_shard_size="200KB")
    model = _model()
    train(model, _cfg(tmp_path, data, **kw))
    ckpts = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    assert ckpts == ["step-000003", "step-000004"]
    out = tmp_path / "out"
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    again = ComposedModel.from_pretrained(out).state_dict()
    assert all(torch.equal(again[k], v) for k, v in model.state_dict().items())
    more = train(_model(), _cfg(tmp_path, data, **{**kw, "max_steps": 5}, resume=True))
    assert len(more["losses"]) == 1  # resumed at step 4
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000004", "step-000005"]


def test_train_saves_trainable_only_and_it_reloads(tmp_path):
    """`--save trainable` after a stage-1 run on a spec whose LLM and ViT come
    from local HF checkpoints writes the projector and LoRA tensors only; the output reloads (the
    frozen parts from the sources) equal to the trained model; with --merge-lora it is refused."""
    from test_checkpoint import _local_sources

    spec, _, _ = _local_sources(
        tmp_path, train="lora", lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    )
    data = _data(tmp_path)
    model = build(spec)
    train(model, _cfg(tmp_path, data, max_steps=2, stage=1, save_weights="trainable"))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys and all(k.startswith("projectors.") or "lora_" in k for k in keys)
    again = ComposedModel.from_pretrained(tmp_path / "out").state_dict()
    assert all(torch.equal(again[k], v) for k, v in model.state_dict().items())
    with pytest.raises(InputError, match="merge_lora: folds LoRA"):
        train(build(spec), _cfg(tmp_path / "m", data, max_steps=1, save_weights="trainable", merge_lora=True))


def test_lora_merge_matches_unmerged(tmp_path):
    model = _model().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    batch = model.prepare(
        [model.format_prompt("q"), model.format_prompt("longer q")],
        image=[torch.randn(3, 32, 32), torch.randn(3, 32, 32)],
    )
    with torch.no_grad():
        before = model(**batch).logits
        merge_lora(model)
        after = model(**batch).logits
    assert not any("lora_" in n for n, _ in model.named_parameters())
    assert (before - after).abs().max() < 1e-5
    model.save_pretrained(tmp_path / "merged")
    again = ComposedModel.from_pretrained(tmp_path / "merged")
    assert again.spec.llm.train == "full"
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, after)


def _snapshot(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _changed(module, before: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(p, before[n]) for n, p in module.named_parameters())


def test_stage_1_trains_projector_only(tmp_path):
    model = _model(llm_train="full")
    llm_before, proj_before = _snapshot(model.llm), _snapshot(model.projectors)
    train(model, _cfg(tmp_path, _data(tmp_path, n=3), max_steps=2, stage=1))
    assert not _changed(model.llm, llm_before)
    assert _changed(model.projectors, proj_before)  # something did train
    assert all(p.requires_grad for p in model.projectors.parameters())


def test_stage_2_trains_projector_and_llm_not_the_frozen_encoder(tmp_path):
    model = _model(llm_train="full")
    assert model.spec.modalities["image"].encoder.train == "frozen"
    before = {k: _snapshot(getattr(model, k)) for k in ("llm", "projectors", "encoders")}
    train(model, _cfg(tmp_path, _data(tmp_path, n=3), max_steps=2, stage=2))
    assert _changed(model.llm, before["llm"]) and _changed(model.projectors, before["projectors"])
    assert not _changed(model.encoders, before["encoders"])


def test_bad_records_named_by_file_and_line(tmp_path):
    data = _data(tmp_path, n=3)
    with data.open("a") as f:
        f.write('{"image": "missing.png", "prompt": "q", "response": "a"}\n')
        f.write("not json\n")
    with pytest.raises(InputError, match=r"train.jsonl:4: image file not found"):
        read_jsonl(data, {"image": "<image>"})
    ok = read_jsonl(data, {"image": "<image>"}, on_bad="skip")
    assert len(ok) == 3


def test_ltu_record_format(tmp_path):
    from composer.train.data import parse_record

    ex = parse_record(
        {"audio_id": "a.wav", "instruction": "What is it?", "output": "a dog"}, {"audio": "<audio>"}, tmp_path
    )
    assert ex.turns == [("What is it?", "a dog")] and ex.items == {"audio": [str(tmp_path / "a.wav")]}


def test_cli_train_resume_and_profile(tmp_path):
    from helpers import ROOT, run_cli

    data = _data(tmp_path, n=4)
    out = tmp_path / "run"

    def run(*a):
        return run_cli("train", ROOT / "specs/tiny/llava.yaml", "--data", data, *a)

    r = run("-o", out, "--max-steps", "2", "--batch-size", "2", "--save-every", "1")
    assert r.returncode == 0, r.stderr
    assert "trained 2 steps" in r.stdout and (out / "checkpoints" / "step-000002").is_dir()
    r = run("-o", out, "--max-steps", "3", "--batch-size", "2", "--resume")
    assert r.returncode == 0, r.stderr
    assert "trained 3 steps" in r.stdout, r.stdout
    assert ComposedModel.from_pretrained(out).spec.name == "tiny-llava"
    r = run("-o", tmp_path / "p", "--profile", "--batch-size", "2")
    assert r.returncode == 0, r.stderr
    assert "ratio k/0: time" in r.stdout and "insert_at image=2" in r.stdout
    r = run("-o", tmp_path / "bad", "--stage", "2")  # the tiny spec trains the LLM fully: fine; a bad flag value:
    assert r.returncode == 0, r.stderr
    r = run("-o", tmp_path / "bad2", "--precision", "fp16")  # bf16 autocast runs on CPU; fp16 does not
    assert r.returncode == 2 and "--precision fp16 needs a CUDA device" in r.stderr


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"batch_size": 0}, "batch_size: must be >= 1, got 0"),
        ({"grad_accum": 0}, "grad_accum: must be >= 1, got 0"),
        ({"max_steps": -1}, "max_steps: must be >= 1, got -1"),
        ({"max_steps": 0}, "max_steps: must be >= 1, got 0"),
        ({"batch_size": True}, "batch_size: must be an integer, got True"),
        ({"lr": float("nan")}, "lr: must be a finite number, got nan"),
        ({"lr": 0.0}, "lr: must be > 0, got 0.0"),
        ({"scheduler": "wobbly"}, "scheduler: must be .*, got 'wobbly'"),
        ({"warmup_ratio": 1.5}, r"warmup_ratio: must be < 1, got 1.5"),
        ({"log_every": 0}, "log_every: must be >= 1, got 0"),
        ({"precision": "fp8"}, "precision: must be 'auto', 'fp32', 'bf16' or 'fp16', got 'fp8'"),
        ({"bogus": 1}, "bogus: unknown setting"),
    ],
)
def test_bad_training_options_are_refused_before_any_output(tmp_path, bad, match):
    """Options that would train nothing or wrongly are one error naming the field, when the config is
    made; one set afterwards is refused when the run starts, before any output."""
    data = _data(tmp_path, n=3)
    with pytest.raises(InputError, match=match):
        _cfg(tmp_path, data, **bad)
    if "bogus" in bad:
        return
    cfg = _cfg(tmp_path, data)
    for k, v in bad.items():
        setattr(cfg, k, v)
    with pytest.raises(InputError, match=match):
        train(_model(), cfg)
    assert not (tmp_path / "out").exists()


def test_collator_pickles_without_the_model(tmp_path):
    """The collator DataLoader workers run holds no module (no weights) and
    collates the same batch after a pickle round trip (what spawn-started workers get)."""
    import pickle

    model = _model()
    ex = read_jsonl(_data(tmp_path), {"image": "<image>"})
    collate = Collator(model)
    assert not [k for k, v in vars(collate).items() if isinstance(v, torch.nn.Module)]
    blob = pickle.dumps(collate)
    assert len(blob) < 2_000_000  # tokenizer + processor; the tiny model alone is larger
    want, got = collate(ex[:3]), pickle.loads(blob)(ex[:3])
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_dataloader_workers_train_the_same_run(tmp_path):
    """With 2 DataLoader workers the run is bit-identical to in-process
    collation (same precomputed order, so resume and sharding are unchanged), and a record whose
    image cannot be decoded is still one error naming it, raised in the training process."""
    data = _data(tmp_path)
    kw = dict(max_steps=4, batch_size=2, eval_data=str(data), eval_every=2)
    ref = train(_model(), _cfg(tmp_path / "w0", data, **kw))
    two = train(_model(), _cfg(tmp_path / "w2", data, num_workers=2, prefetch_factor=1, **kw))
    assert two["losses"] == ref["losses"] and two["eval_loss"] == ref["eval_loss"]
    (tmp_path / "img4.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match=r"img4\.png") as e:
        train(_model(), _cfg(tmp_path / "bad", data, num_workers=2, **kw))
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)


def _bf16_model(llm_train="lora"):
    d = spec_dict("llama", 2, dtype="bfloat16", train=llm_train)
    if llm_train == "lora":
        d["llm"]["lora"] = {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}
    return build(parse_spec(d))


def test_bf16_training_keeps_fp32_master_weights(tmp_path):
    """In a bf16 model the trainable weights train as fp32 masters, so an update far below bf16's
    resolution still moves them; the frozen LLM stays bf16 and bit-identical; the saved model
    stores the spec's dtype (bf16), or the fp32 masters with save_dtype float32. At lr 1e-6,
    AdamW's step t moves a weight by at most c_t * lr (c_1 = 1, c_2 = 1.0014: see
    test_distributed._adamw_bound), <= 2.0014e-6 over the 2 steps, and by ~lr wherever the
    gradient is well above its eps (1e-8): ~16 fp32 spacings at |w| < 1 (2^-24 there), so more
    than half of each tensor's masters move (elements with no gradient stay). Rounded back to
    bf16, every weight with |w| >= 2^-9 is unchanged: its bf16 neighbours are >= 2^-17 away
    on either side (8 significant bits), so a move below 2^-18 = 3.8e-6 rounds back to it; those
    weights are most of each projector tensor (a fixed property of the seeded init)."""
    from safetensors.torch import load_file

    data = _data(tmp_path, n=3)
    for save_dtype, stored in (("spec", torch.bfloat16), ("float32", torch.float32)):
        model = _bf16_model()
        proj0 = {n: p.detach().clone() for n, p in model.projectors.named_parameters()}
        lora0 = {n: p.detach().clone() for n, p in model.llm.named_parameters() if "lora_" in n}
        frozen0 = {n: p.detach().clone() for n, p in model.llm.named_parameters() if "lora_" not in n}
        assert {p.dtype for p in proj0.values()} == {torch.bfloat16} and lora0
        out = tmp_path / save_dtype
        summary = train(model, _cfg(out, data, max_steps=2, lr=1e-6, save_dtype=save_dtype))  # 2: lora_B is 0 at first
        assert summary["precision"] == "bf16"  # auto on CPU for a bf16 model
        for n, p in [*model.projectors.named_parameters(), *model.llm.named_parameters()]:
            before = proj0.get(n, lora0.get(n))
            if before is None:  # frozen
                assert p.dtype == torch.bfloat16 and torch.equal(p, frozen0[n]), n
                continue
            assert p.dtype == torch.float32, n
            assert (p.detach() != before.float()).float().mean() > 0.5, n  # the fp32 master moved
            if n in proj0:  # a bf16 weight would not have: rounded back, each |w| >= 2^-9 is unchanged
                kept = before.float().abs() >= 2**-9
                assert kept.float().mean() > 0.9, n
                assert torch.equal(p.detach().to(torch.bfloat16)[kept], before[kept]), n
        saved = load_file(out / "out" / "model.safetensors")
        trained = [k for k in saved if k.startswith("projectors.") or "lora_" in k]
        assert trained and {saved[k].dtype for k in trained} == {stored}
        assert {saved[k].dtype for k in saved if k.startswith("llm.") and "lora_" not in k} == {torch.bfloat16}
        params = dict(model.named_parameters())
        assert all(torch.equal(saved[k], params[k].detach().to(stored)) for k in trained)
        if save_dtype == "spec":  # reloads as saved (a float32 save loads into the bf16 spec's model cast)
            again = ComposedModel.from_pretrained(out / "out").state_dict()
            assert all(torch.equal(again[k], saved[k]) for k in trained)


def test_bf16_loss_curve_tracks_fp32(tmp_path):
    """The same run (same weights rounded to bf16, data, seed) in fp32 and as a bf16 model with
    bf16 autocast: the loss curves agree within 2e-3 relative per step, and both fall. 2e-3 is
    half of bf16's rounding unit (2^-8 = 3.9e-3 relative): the bf16 run's fp32 loss, a mean over
    tokens of cross-entropies from bf16 logits, must come out closer to fp32's than bf16 could
    even store it. A token's cross-entropy moves by at most 2 max|dz| when its logits move by dz,
    and these logits are below 1, so that is a few bf16 roundings' worth. It still fails a
    curve that is off by a step: the loss falls ~0.7% per step here (5.60 -> 5.26 over 8)."""
    data = _data(tmp_path)
    curves = {}
    for name, model in (("fp32", _model()), ("bf16", _bf16_model())):
        curves[name] = train(model, _cfg(tmp_path / name, data, max_steps=8, batch_size=2))["losses"]
    fp32, bf16 = np.array(curves["fp32"]), np.array(curves["bf16"])
    rel = np.abs(bf16 - fp32) / fp32
    assert rel.max() < 2e-3, (curves, rel)
    assert fp32[-1] < fp32[0] and bf16[-1] < bf16[0]


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"max_new_tokens": 0}, "max_new_tokens: must be > 0, got 0"),
        ({"max_new_tokens": -1}, "max_new_tokens: must be > 0, got -1"),
        ({"temperature": float("nan")}, "temperature: .*got nan"),
        ({"top_p": 5.0}, "top_p: must be <= 1, got 5.0"),
        ({"top_k": -5}, "top_k: must be > 0, got -5"),
    ],
)
def test_bad_generation_settings_are_refused(kw, match):
    model = _model().eval()
    batch = model.prepare([model.format_prompt("q")], image=[torch.randn(3, 32, 32)])
    with pytest.raises(InputError, match=match):
        model.generate(**batch, **kw)


@pytest.mark.parametrize("skip", [False, True])
def test_invalid_utf8_and_deep_nesting_are_bad_records(tmp_path, skip):
    """Invalid UTF-8 and JSON nested 200,000 deep are bad records like any other: one error naming
    file and line, or skipped with --skip-bad-records, never a traceback."""
    data = _data(tmp_path, n=3)
    with data.open("ab") as f:
        f.write(b'{"image": "img0.png", "prompt": "\\xff\\xfe", "response": "a"}\n'.replace(b"\\xff\\xfe", b"\xff\xfe"))
        f.write(b"[" * 200_000 + b"]" * 200_000 + b"\n")
    if skip:
        assert len(read_jsonl(data, {"image": "<image>"}, on_bad="skip")) == 3
        return
    with pytest.raises(InputError, match=r"train.jsonl:4: 'utf-8' codec can't decode byte 0xff"):
        read_jsonl(data, {"image": "<image>"})
    lines = data.read_bytes().splitlines(keepends=True)
    data.write_bytes(b"".join(lines[:3] + lines[4:]))
    with pytest.raises(InputError, match=r"train.jsonl:4: JSON nested too deeply"):
        read_jsonl(data, {"image": "<image>"})


def test_overwrite_with_bad_data_keeps_the_old_run(tmp_path):
    """`--overwrite` with data that turns out bad keeps the old run's checkpoints: nothing is
    removed before the data has been read."""
    data = _data(tmp_path, n=3)
    train(_model(), _cfg(tmp_path, data, max_steps=1, save_every=1))
    ckpts = tmp_path / "out" / "checkpoints"
    before = sorted(p.name for p in ckpts.iterdir())
    assert before == ["step-000001"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    with pytest.raises(InputError, match="bad.jsonl:1"):
        train(_model(), _cfg(tmp_path, bad, max_steps=1, overwrite=True))
    assert sorted(p.name for p in ckpts.iterdir()) == before


def test_a_failed_run_leaves_no_output_that_blocks_the_rerun(tmp_path):
    """A run that fails before its first checkpoint (here: a picture that exists but
    is not an image, met at step 3 with seed 0) removes what it wrote; the same command then runs, no --overwrite."""
    data = _data(tmp_path, n=6)
    (tmp_path / "img4.png").write_bytes(b"not a png")
    cfg = _cfg(tmp_path, data, batch_size=2, epochs=1, seed=0)
    with pytest.raises(InputError, match="img4.png"):
        train(_model(), cfg)
    assert not (tmp_path / "out").exists()
    # a run with checkpoints keeps everything for --resume when it fails later
    good = tmp_path / "img4.png"
    Image.new("RGB", (32, 32), "red").save(good)
    train(_model(), _cfg(tmp_path, data, batch_size=2, max_steps=1, seed=0, save_every=1))
    good.write_bytes(b"not a png")
    with pytest.raises(InputError, match="img4.png"):
        train(_model(), _cfg(tmp_path, data, batch_size=2, epochs=1, seed=0, save_every=1, resume=True))
    assert [p.name for p in (tmp_path / "out" / "checkpoints").iterdir()][:1] == ["step-000001"]
    Image.new("RGB", (32, 32), "red").save(good)
    summary = train(_model(), _cfg(tmp_path, data, batch_size=2, epochs=1, seed=0, save_every=1, resume=True))
    assert summary["steps"] == 3
