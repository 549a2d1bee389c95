"""benchmarks/deepinsert_quality.py: the shapes task is deterministic, its held-out split is disjoint
in scene layouts, every answer is right for its picture, and the script runs end to end (--quick, on
the 4-layer twin)."""

from __future__ import annotations

import hashlib
import json
import random
import sys

import numpy as np
import pytest
from helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import deepinsert_quality as dq  # noqa: E402


def _digest(root) -> dict[str, str]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_the_task_is_deterministic_and_the_held_out_split_disjoint(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    dq.write_task(a, 40, 20, seed=0)
    dq.write_task(b, 40, 20, seed=0)
    dq.write_task(c, 40, 20, seed=1)
    assert _digest(a) == _digest(b)  # pictures and records, byte for byte
    assert _digest(a) != _digest(c)
    train = dq.read_records(a / "train.jsonl")
    test = dq.read_records(a / "test.jsonl")
    layouts = lambda recs: {tuple(map(tuple, r["scene"])) for r in recs}  # noqa: E731
    assert layouts(train).isdisjoint(layouts(test))
    # the split of every layout is disjoint and complete, and the demo layout trains
    tr, te = dq.split_scenes(0, keep_in_train=(dq.DEMO_SCENE,))
    assert set(tr).isdisjoint(te) and len(set(tr) | set(te)) == len(dq.all_scenes()) == 765
    assert dq.DEMO_SCENE in tr
    # question kinds are balanced, answers are single words from the task's vocabulary
    kinds = [r["kind"] for r in train]
    assert {k: kinds.count(k) for k in dq.KINDS} == {k: 10 for k in dq.KINDS}
    vocab = set(dq.COLOURS) | set(dq.SHAPES) | set(dq.COLUMNS) | set(dq.COUNTS)
    assert all(r["response"] in vocab for r in train + test)


def test_the_relation_axis_names_the_nearest_shape_to_the_left(tmp_path):
    """``--relations``: "What shape is left of the X?" answers the shape in the nearest occupied column
    left of X's, asked only where there is one; the five kinds are balanced."""
    scene = ((0, "square", "blue"), (2, "triangle", "yellow"))
    rel = [(q, a) for k, q, a in dq.questions(scene, relations=True) if k == "relation"]
    assert rel == [("What shape is left of the yellow triangle?", "square")]
    assert not any(k == "relation" for k, _, _ in dq.questions(((1, "circle", "red"),), relations=True))
    assert not any(k == "relation" for k, _, _ in dq.questions(scene))
    three = ((0, "circle", "red"), (1, "square", "green"), (2, "circle", "blue"))
    rel = {q: a for k, q, a in dq.questions(three, relations=True) if k == "relation"}
    assert rel == {
        "What shape is left of the green square?": "circle",
        "What shape is left of the blue circle?": "square",
    }
    dq.write_task(tmp_path, 50, 10, seed=0, kinds=dq.WITH_RELATIONS)
    kinds = [r["kind"] for r in dq.read_records(tmp_path / "train.jsonl")]
    assert {k: kinds.count(k) for k in dq.WITH_RELATIONS} == {k: 10 for k in dq.WITH_RELATIONS}


def _colour_at(img: np.ndarray, column: int) -> str:
    """The named colour nearest to the most saturated pixels of a column of the picture."""
    w = img.shape[1] // 3
    part = img[:, column * w : (column + 1) * w].reshape(-1, 3).astype(int)
    sat = part.max(1) - part.min(1)
    if (sat > 80).sum() < 20:
        return ""
    mean = part[sat > 0.7 * sat.max()].mean(0)
    return min(dq.COLOURS, key=lambda c: np.abs(mean - np.array(dq.COLOURS[c])).sum())


def test_answers_match_the_pictures(tmp_path):
    """Read back from the pixels (independently of the generator's scene list): the colour in each
    column and the number of coloured columns agree with every record's answer."""
    dq.write_task(tmp_path, 60, 0, seed=3)
    from PIL import Image

    for r in dq.read_records(tmp_path / "train.jsonl"):
        img = np.asarray(Image.open(tmp_path / r["image"]).convert("RGB"))
        seen = {col: _colour_at(img, col) for col in range(3)}
        objects = {col: colour for col, colour in seen.items() if colour}
        q, a = r["prompt"], r["response"]
        if r["kind"] == "count":
            assert dq.COUNTS[len(objects) - 1] == a, r
        elif r["kind"] == "colour":
            assert a in objects.values(), r
        elif r["kind"] == "position":
            words = q.rstrip("?").split()
            colour = words[-2] if len(objects) > 1 else next(iter(objects.values()))
            assert objects.get(dq.COLUMNS.index(a)) == colour, r
        elif len(objects) > 1:  # "What shape is the <colour> one?": that colour is in the picture
            assert q.split()[-2] in objects.values(), r


def test_wilson_interval():
    lo, hi = dq.wilson(80, 100)
    assert lo == pytest.approx(0.7112, abs=1e-4) and hi == pytest.approx(0.8666, abs=1e-4)
    assert dq.wilson(0, 10)[0] == 0.0 and dq.wilson(10, 10)[1] == 1.0


def test_quick_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "q"
    code = dq.main(["--quick", "--spec", str(ROOT / "specs/tiny/llava.yaml"), "--out", str(out), "--ks", "0", "2"])
    assert code == 0
    result = json.loads((out / "results.json").read_text())
    assert [r["k"] for r in result["rows"]] == [0, 2]
    for r in result["rows"]:
        assert 0 <= r["ci95"][0] <= r["accuracy"] <= r["ci95"][1] <= 1
        assert r["step_time_s"] > 0 and r["prefill_s"] > 0
    # analytic training FLOPs: k = 2 of 4 skips both the forward and the backward of 2 layers for MM tokens
    assert 0 < result["rows"][1]["train_flops_vs_k0"] < 1
    assert result["probe"]["before_training"]["recommended_k"] in (0, 2)
    assert (out / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| k | held-out accuracy" in capsys.readouterr().out
    assert (out / "k2" / "trainable.safetensors").is_file()


def test_draw_is_seeded():
    a = dq.draw(dq.DEMO_SCENE, random.Random(5))
    b = dq.draw(dq.DEMO_SCENE, random.Random(5))
    assert a.tobytes() == b.tobytes() and a.size == (dq.SIZE, dq.SIZE)


def test_train_demo_quick_run_writes_weights_a_spec_loads(tmp_path, capsys):
    """benchmarks/train_demo.py end to end on the 4-layer twin (--quick): it reports held-out accuracy and
    an answer per question on each shipped picture, and writes the layout the demo spec loads
    (`encoder.model: demo/vision`, `projector.weights: demo/projector.safetensors`): a spec naming it
    builds with exactly the trained projector and encoder weights."""
    import copy

    import torch
    import yaml
    from safetensors.torch import load_file

    import composer
    from composer.spec import parse_spec

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import train_demo

    demo, assets = tmp_path / "demo", tmp_path / "assets"
    args = ["--quick", "--spec", str(ROOT / "specs/tiny/llava.yaml"), "--k", "2", "--out", str(tmp_path / "o")]
    assert train_demo.main([*args, "--demo-out", str(demo), "--assets", str(assets)]) == 0
    result = json.loads((tmp_path / "o" / "demo_results.json").read_text())
    assert 0 <= result["held_out_accuracy"] <= 1 and result["k"] == 2
    asked = [(p["picture"], p["question"]) for p in result["pictures"]]
    assert asked == [(name, q) for name, scene, _ in train_demo.PICTURES for _, q, _ in dq.questions(scene)]
    assert {p.name for p in assets.iterdir()} == {"red_circle.png", "two_shapes.png"}
    assert "held-out accuracy" in capsys.readouterr().out
    raw = yaml.safe_load((ROOT / "specs/tiny/llava.yaml").read_text())
    spec = copy.deepcopy(raw)
    enc = spec["modalities"]["image"]["encoder"]
    del enc["config"]
    enc["model"] = "demo/vision"
    spec["modalities"]["image"]["projector"]["weights"] = "demo/projector.safetensors"
    parsed = parse_spec(spec, str(tmp_path / "spec.yaml"))
    parsed._source_dir = tmp_path
    model = composer.build(parsed)
    saved = load_file(str(demo / "projector.safetensors"))
    for name, t in model.projectors["image"].state_dict().items():
        assert torch.equal(t, saved[name]), name
    vision = load_file(str(demo / "vision" / "model.safetensors"))
    got = model.encoders["image"].model.state_dict()
    assert vision and all(torch.equal(got[n], t) for n, t in vision.items())


def test_train_demo_quick_run_leaves_the_shipped_files_alone(tmp_path, monkeypatch):
    """A --quick smoke run without --demo-out or --assets writes its weights to OUT/weights and
    its pictures to OUT/assets, never over the shipped ones (specs/smol/demo, specs/smol/assets)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import train_demo

    shipped = {p: p.stat().st_mtime_ns for d in (train_demo.ASSETS, train_demo.DEMO_OUT) for p in d.rglob("*")}
    out = tmp_path / "o"
    args = ["--quick", "--spec", str(ROOT / "specs/tiny/llava.yaml"), "--k", "2", "--out", str(out)]
    assert train_demo.main(args) == 0
    assert {p.name for p in (out / "assets").iterdir()} == {"red_circle.png", "two_shapes.png"}
    assert (out / "weights" / "projector.safetensors").is_file()
    assert {p: p.stat().st_mtime_ns for p in shipped} == shipped
