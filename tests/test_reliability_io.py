"""Reliability, point 3: every command that writes goes through a temporary sibling and a
rename. Interrupted for real (SIGINT/SIGTERM to a `compose` subprocess while it writes) or
failing mid-write, it leaves either the previous output intact or nothing, and no temp dirs.
(`compose export` interrupted for real: test_reliability_files.py, next to its bundle.)"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_model

from composer.checkpoint import atomic_dir, signals_deferred
from composer.errors import InputError
from composer.model import ComposedModel

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "specs/tiny/llava.yaml"

# Runs `compose ARGS` with one write made slow: the hook writes its part, touches the marker file
# and sleeps, so that the test can signal the process while the output is half-written.
DRIVER = r'''
import os, signal, sys, time

# A shell running CI in the background starts its children with SIGINT ignored (a terminal does
# not): give the CLI the Ctrl-C a user has.
signal.signal(signal.SIGINT, signal.default_int_handler)

marker, hook = os.environ["COMPOSER_TEST_MARKER"], os.environ["COMPOSER_TEST_HOOK"]


def stall():
    open(marker, "w").close()
    time.sleep(300)


if hook == "save_model":  # build: model.safetensors is written, tokenizer and processors are not
    import safetensors.torch as st

    real = st.save_model

    def save_model(*a, **k):
        real(*a, **k)
        stall()

    st.save_model = save_model
elif hook == "export":  # export: the first graph is written, the others and the manifest are not
    import composer.export.exporter as ex

    real = ex._export

    def _export(*a, **k):
        real(*a, **k)
        stall()

    ex._export = _export
from composer.cli import main

main(sys.argv[1:])
'''


def _tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir())


def _interrupt(tmp_path: Path, hook: str, sig: int, *args) -> tuple[int, str]:
    """Start `compose *args` with ``hook`` stalling a write; once it stalls, check that the partial
    output lies in a temp sibling of OUT (the last arg after -o), send ``sig``, wait for the exit."""
    driver, marker = tmp_path / "driver.py", tmp_path / "stalled"
    driver.write_text(DRIVER)
    env = {**os.environ, "COMPOSER_TEST_MARKER": str(marker), "COMPOSER_TEST_HOOK": hook, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, str(driver), *map(str, args)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = Path(args[list(args).index("-o") + 1])
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, f"exited early ({proc.returncode}): {proc.stderr.read()}"
            assert time.monotonic() < deadline, "the write never started"
            time.sleep(0.05)
        temps = list(out.parent.glob(f".{out.name}.tmp-*"))
        assert len(temps) == 1 and any(temps[0].iterdir()), _siblings(out)  # half-written, in the temp dir
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_build_interrupted_while_writing_leaves_nothing_or_the_previous_output(tmp_path, sig):
    out = tmp_path / "work" / "ckpt"
    previous = None
    if sig == signal.SIGTERM:  # --overwrite onto a previous output: it must survive the interruption
        out.mkdir(parents=True)
        (out / "old.txt").write_text("previous output")
        previous = _tree(out)
    args = ["build", TINY, "-o", out] + (["--overwrite"] if previous else [])
    code, err = _interrupt(tmp_path, "save_model", sig, *args)
    expected = ("error: terminated (SIGTERM)", 143) if sig == signal.SIGTERM else ("error: interrupted", 130)
    assert (err.strip().splitlines()[-1], code) == expected, err
    assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
    if previous is None:
        assert _siblings(out) == [], "no partial output and no temp dir"
    else:
        assert _siblings(out) == ["ckpt"] and _tree(out) == previous


# -- failures mid-write (in process) --------------------------------------------------------------------------
def test_save_failing_mid_write_leaves_nothing_or_the_previous_checkpoint(tmp_path, monkeypatch):
    model = make_model("llama", 1)
    out = tmp_path / "ckpt"

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(type(model.tokenizer), "save_pretrained", boom)  # after model.safetensors was written
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(out)
    assert _siblings(out) == []
    monkeypatch.undo()
    model.save_pretrained(out)
    before = _tree(out)
    monkeypatch.setattr(type(model.tokenizer), "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(out, overwrite=True)
    assert _siblings(out) == ["ckpt"] and _tree(out) == before
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
    assert _siblings(out) == []


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

    def swap_with_a_signal(tmp, out_dir):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        real(tmp, out_dir)

    monkeypatch.setattr(ck, "_swap_into_place", swap_with_a_signal)
    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "a").write_text("new")
            (tmp / "b").write_text("new")
    assert _siblings(out) == ["out"] and sorted(p.name for p in out.iterdir()) == ["a", "b"]  # swapped whole


def _train_data(tmp_path: Path) -> Path:
    from PIL import Image

    for i in range(4):
        Image.new("RGB", (32, 32), ["red", "green", "blue", "red"][i]).save(tmp_path / f"img{i}.png")
    recs = [{"image": f"img{i}.png", "prompt": "What colour is it?", "response": c}
            for i, c in enumerate(["red", "green", "blue", "red"])]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return tmp_path / "train.jsonl"


def _model():
    return make_model("llama", 2).train()


def test_train_checkpoints_and_final_save_are_atomic(tmp_path, monkeypatch):
    import composer.train as tr

    cfg = tr.TrainConfig(data=str(_train_data(tmp_path)), output=str(tmp_path / "run"), max_steps=2, save_every=1,
                         batch_size=2, progress=False, stage=1)
    out = Path(cfg.output)
    tr.train(_model(), cfg)
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000001", "step-000002"]
    assert {p.suffix for p in ckpts.rglob("*") if p.is_file()} == {".safetensors", ".json"}  # no pickles
    before, final = _tree(ckpts), _tree(out)
    # a fresh run into the same dir needs --overwrite (or --resume)
    with pytest.raises(InputError, match=r"exists and is not empty \(pass --overwrite"):
        tr.train(_model(), cfg)
    # a checkpoint write that fails half-way: no step dir, no temp dir, earlier checkpoints intact
    from composer import train_checkpoint as tc
    from composer.distributed import Engine

    def fail(*a, **k):  # the shards are written, the RNG and trainer state are not
        raise OSError("disk full")

    monkeypatch.setattr(tc, "rng_state", fail)
    m = _model()
    with pytest.raises(OSError, match="disk full"):
        tc.save(ckpts / "step-000003", Engine(), m, *_opt_sched(m), {"step": 3, "epoch": 0, "seen": 0}, {})
    monkeypatch.undo()
    assert _tree(ckpts) == before and not list(ckpts.glob(".*"))
    # the final save failing before the swap: the previous final model stays, loadable
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ComposedModel, "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        tr._save_final(_model(), out)
    monkeypatch.undo()
    assert _tree(out) == final and not list(out.glob(".final.tmp-*"))
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
    before = _tree(out)
    copied.clear()
    monkeypatch.setattr(shutil, "copyfile", fail_third)
    with pytest.raises(OSError, match="connection reset"):
        hub.pull("alice/tiny", out, overwrite=True)
    assert _tree(out) == before and not list(tmp_path.glob(".pulled.*"))
