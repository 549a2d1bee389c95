"""Reliability: every command that writes goes through a temporary sibling and a
rename. Interrupted for real (SIGINT/SIGTERM to a `compose` subprocess while it writes) or
failing mid-write, it leaves either the previous output intact or nothing, and no temp dirs.
(`compose export` interrupted for real: test_reliability_files.py, next to its bundle.)"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY, interrupt, make_model, siblings, train_data, tree

from composer.checkpoint import atomic_dir, signals_deferred
from composer.errors import InputError
from composer.model import ComposedModel


def test_train_interrupted_by_a_real_signal_keeps_its_last_checkpoint_and_resumes(tmp_path):
    """SIGINT to `compose train` while it writes its second checkpoint: exit 130
    with one line, the first checkpoint intact, the half-written second one gone, and `--resume`
    finishes the run with the same losses as an uninterrupted run."""
    data = train_data(tmp_path)
    out = tmp_path / "run"
    args = ["train", TINY, "--data", data, "--max-steps", "3", "--batch-size", "2", "--save-every", "1"]

    def half_written(out: Path):
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [".step-000002.tmp", "step-000001"]

    code, err = interrupt(tmp_path, "train_save", signal.SIGINT, *args, "-o", out, partial=half_written)
    assert (code, err.strip().splitlines()[-1]) == (130, "error: interrupted"), err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001"]
    from composer.cli import main

    with pytest.raises(SystemExit) as e:
        main([*map(str, args), "-o", str(out), "--resume"])
    assert e.value.code == 0
    with pytest.raises(SystemExit) as e:
        main([*map(str, args), "-o", str(tmp_path / "straight")])
    assert e.value.code == 0

    def losses(run: Path) -> list[float]:
        return [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines()]

    assert losses(out) == losses(tmp_path / "straight") and len(losses(out)) == 3


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_build_interrupted_while_writing_leaves_nothing_or_the_previous_output(tmp_path, sig):
    out = tmp_path / "work" / "ckpt"
    previous = None
    if sig == signal.SIGTERM:  # --overwrite onto a previous output: it must survive the interruption
        out.mkdir(parents=True)
        (out / "old.txt").write_text("previous output")
        previous = tree(out)
    args = ["build", TINY, "-o", out] + (["--overwrite"] if previous else [])
    code, err = interrupt(tmp_path, "save_model", sig, *args)
    expected = ("error: terminated (SIGTERM)", 143) if sig == signal.SIGTERM else ("error: interrupted", 130)
    assert (err.strip().splitlines()[-1], code) == expected, err
    assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
    if previous is None:
        assert siblings(out) == [], "no partial output and no temp dir"
    else:
        assert siblings(out) == ["ckpt"] and tree(out) == previous


# -- failures mid-write (in process) --------------------------------------------------------------------------
def test_save_failing_mid_write_leaves_nothing_or_the_previous_checkpoint(tmp_path, monkeypatch):
    model = make_model("llama", 1)
    out = tmp_path / "ckpt"

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(type(model.tokenizer), "save_pretrained", boom)  # after model.safetensors was written
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(out)
    assert siblings(out) == []
    monkeypatch.undo()
    model.save_pretrained(out)
    before = tree(out)
    monkeypatch.setattr(type(model.tokenizer), "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(out, overwrite=True)
    assert siblings(out) == ["ckpt"] and tree(out) == before
    assert ComposedModel.from_pretrained(out).spec.name == model.spec.name


def test_export_failing_mid_write_leaves_nothing(tmp_path, monkeypatch):
    import composer.export.exporter as ex

    def half_written(module, args, path, *a, **k):
        Path(path).write_bytes(b"partial graph")
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(ex, "_export", half_written)
    out = tmp_path / "bundle"
    with pytest.raises(RuntimeError, match="exporter crashed"):
        ex.export_onnx(make_model("llama", 1), out)
    assert siblings(out) == []


def test_signals_are_deferred_during_the_swap(tmp_path, monkeypatch):
    """A signal that arrives while the finished output is renamed into place waits for the rename."""
    # as in a terminal, even where CI's background shell started us with SIGINT ignored
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _deferred_swap_checks(tmp_path, monkeypatch)
    finally:
        signal.signal(signal.SIGINT, old)


def _deferred_swap_checks(tmp_path, monkeypatch):
    with pytest.raises(KeyboardInterrupt):
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # Python runs handlers between bytecodes: it would have fired here
            reached = True
    assert reached
    import composer.checkpoint as ck

    real = ck._swap_into_place

    def swap_with_a_signal(tmp, out_dir, overwrite):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        real(tmp, out_dir, overwrite)

    monkeypatch.setattr(ck, "_swap_into_place", swap_with_a_signal)
    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "a").write_text("new")
            (tmp / "b").write_text("new")
    assert siblings(out) == ["out"] and sorted(p.name for p in out.iterdir()) == ["a", "b"]  # swapped whole


def _model():
    return make_model("llama", 2).train()


def test_train_checkpoints_and_final_save_are_atomic(tmp_path, monkeypatch):
    import composer.train.loop as tr

    cfg = tr.TrainConfig(
        data=str(train_data(tmp_path)),
        output=str(tmp_path / "run"),
        max_steps=2,
        save_every=1,
        batch_size=2,
        progress=False,
        stage=1,
    )
    out = Path(cfg.output)
    tr.train(_model(), cfg)
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000001", "step-000002"]
    assert {p.suffix for p in ckpts.rglob("*") if p.is_file()} == {".safetensors", ".json"}  # no pickles
    before, final = tree(ckpts), tree(out)
    # a fresh run into the same dir needs --overwrite (or --resume)
    with pytest.raises(InputError, match=r"exists and is not empty \(pass --overwrite"):
        tr.train(_model(), cfg)
    # a checkpoint write that fails half-way: no step dir, no temp dir, earlier checkpoints intact
    from composer.train import checkpoints as tc
    from composer.train.distributed import Engine

    def fail(*a, **k):  # the shards are written, the RNG and trainer state are not
        raise OSError("disk full")

    monkeypatch.setattr(tc, "rng_state", fail)
    m = _model()
    with pytest.raises(OSError, match="disk full"):
        tc.save(ckpts / "step-000003", Engine(), m, *_opt_sched(m), {"step": 3, "epoch": 0, "seen": 0}, {})
    monkeypatch.undo()
    assert tree(ckpts) == before and not list(ckpts.glob(".*"))

    # the final save failing before the swap: the previous final model stays, loadable
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ComposedModel, "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        tr._save_final(_model(), out)
    monkeypatch.undo()
    assert tree(out) == final and not list(out.glob(".final.tmp-*"))
    assert ComposedModel.from_pretrained(out).spec.name == "tiny-test"
    # --overwrite: trains from scratch, the other run's checkpoints are gone
    cfg.overwrite, cfg.save_every = True, 0
    tr.train(_model(), cfg)
    assert list(ckpts.iterdir()) == [] and json.loads((out / "composer.json").read_text())["format_version"] == 1


def _opt_sched(model):
    from transformers import get_scheduler

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return opt, get_scheduler("constant", opt)


def test_pull_failing_mid_copy_leaves_nothing_or_the_previous_output(tmp_path, monkeypatch):
    """`compose pull` copies a cached snapshot into OUT through atomic_dir (offline: a cache made here)."""
    hub = pytest.importorskip("composer.hub")
    import shutil

    cache = tmp_path / "hf-cache"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = cache / "models--alice--tiny" / "snapshots" / commit
    make_model("llama", 1).save_pretrained(snap)
    (cache / "models--alice--tiny" / "refs").mkdir()
    (cache / "models--alice--tiny" / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    real, copied = shutil.copyfile, []

    def fail_third(src, dst, *a, **k):
        copied.append(dst)
        if len(copied) == 3:
            raise OSError("connection reset")
        return real(src, dst, *a, **k)

    out = tmp_path / "pulled"
    monkeypatch.setattr(shutil, "copyfile", fail_third)
    with pytest.raises(OSError, match="connection reset"):
        hub.pull("alice/tiny", out)
    assert not out.exists() and not list(tmp_path.glob(".pulled.*"))
    monkeypatch.setattr(shutil, "copyfile", real)
    hub.pull("alice/tiny", out)
    before = tree(out)
    copied.clear()
    monkeypatch.setattr(shutil, "copyfile", fail_third)
    with pytest.raises(OSError, match="connection reset"):
        hub.pull("alice/tiny", out, overwrite=True)
    assert tree(out) == before and not list(tmp_path.glob(".pulled.*"))


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_outputs_honour_the_umask(tmp_path, mask):
    """A checkpoint's dir and files get the modes of any file the user writes."""
    import os
    import stat

    old = os.umask(mask)
    try:
        out = make_model("llama", 1).save_pretrained(tmp_path / "ckpt")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    for p in out.rglob("*"):
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        assert stat.S_IMODE(p.stat().st_mode) == want, p


def test_a_dir_created_at_output_during_the_write_is_not_clobbered(tmp_path):
    """Without --overwrite, whatever appears at -o while the command writes is kept: the swap is
    refused, naming the path, and the new output is not left beside it."""
    out = tmp_path / "out"
    with pytest.raises(InputError, match=rf"{out}: was created while this command ran; not replaced"):
        with atomic_dir(out, overwrite=False) as tmp:
            (tmp / "model").write_text("new")
            out.mkdir()
            (out / "theirs").write_text("keep me")  # another process wrote here in the meantime
    assert (out / "theirs").read_text() == "keep me" and siblings(out) == ["out"]


def test_export_and_train_refuse_an_output_that_overlaps_their_input(tmp_path):
    """An -o that is, contains or lies inside the command's input (even with --overwrite) is
    refused with exit 2, and the input is left byte for byte as it was."""
    from composer.cli import main

    ckpt = make_model("llama", 1).save_pretrained(tmp_path / "m")
    before = tree(ckpt)
    for args in (
        ["export", str(ckpt), "-o", str(ckpt), "--overwrite"],
        ["export", str(ckpt), "-o", str(ckpt / "bundle"), "--overwrite"],
        ["export", str(ckpt / "tokenizer"), "-o", str(tmp_path), "--overwrite"],
        ["train", str(ckpt), "--data", "x.jsonl", "-o", str(ckpt), "--overwrite"],
    ):
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 2, args
    assert tree(ckpt) == before
