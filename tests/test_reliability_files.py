"""Reliability: corrupt or mismatched weights and bundles. Truncated safetensors, wrong
shapes, missing keys, weights or files of another model, trainer checkpoints of another spec,
bundles with missing parts or malformed manifests: each is one `InputError` (exit 2 on the CLI)
naming the file, raised before any weight is copied. Also `compose export` interrupted for real,
with one real bundle (exported once per session, conftest.llama_k1_export) as the previous output."""

from __future__ import annotations

import json
import shutil
import signal
import struct

import pytest
import torch
from helpers import ROOT, interrupt, make_model, siblings, spec_dict, tree
from safetensors.torch import load_file, save_file

from composer.builder import build
from composer.errors import InputError, SpecError
from composer.model import ComposedModel
from composer.spec import parse_spec


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A 4-layer and a 3-layer checkpoint of the same tiny spec."""
    root = tmp_path_factory.mktemp("ckpts")
    four = make_model("llama", 1).save_pretrained(root / "four")
    d = spec_dict("llama", 1)
    d["llm"]["config"]["num_hidden_layers"] = 3
    three = build(parse_spec(d)).save_pretrained(root / "three")
    return four, three


@pytest.fixture
def no_load(monkeypatch):
    """Fails the test if any weight is copied into a model (safetensors' load_model)."""
    import safetensors.torch as st

    def forbidden(*a, **k):
        raise AssertionError("weights were loaded before the file was checked")

    monkeypatch.setattr(st, "load_model", forbidden)


def _copy(src, tmp_path, name="c"):
    return shutil.copytree(src, tmp_path / name)


def _error(path) -> str:
    with pytest.raises((InputError, SpecError)) as e:  # both: exit 2 on the CLI
        ComposedModel.from_pretrained(path)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_truncated_weights_name_the_file(saved, tmp_path, no_load):
    c = _copy(saved[0], tmp_path)
    w = c / "model.safetensors"
    data = w.read_bytes()
    header = 8 + struct.unpack("<Q", data[:8])[0]
    for cut in (header - 10, header + (len(data) - header) // 2, len(data) - 1):  # in the header, the data, the end
        w.write_bytes(data[:cut])
        assert _error(c).startswith(f"{w}: cannot load ("), cut


def test_wrong_shapes_and_missing_keys_name_the_tensor(saved, tmp_path, no_load):
    c = _copy(saved[0], tmp_path)
    w = c / "model.safetensors"
    state = load_file(w)
    key = "projectors.image.0.weight"
    state[key] = torch.zeros(8, 8)
    save_file(state, w)
    assert _error(c) == (
        f"{w}: {key} has shape (8, 8), the model needs {tuple(load_file(saved[0] / 'model.safetensors')[key].shape)} "
        "(weights of another model?)"
    )
    del state[key]
    save_file(state, w)
    assert _error(c) == f"{w}: does not match the spec (missing ['{key}'], unexpected []; weights of another model?)"


def test_weights_of_a_four_layer_model_under_a_three_layer_spec(saved, tmp_path, no_load):
    four, three = saved
    c = _copy(three, tmp_path)
    shutil.copyfile(four / "model.safetensors", c / "model.safetensors")
    msg = _error(c)
    assert msg.startswith(
        f"{c / 'model.safetensors'}: does not match the spec (missing [], unexpected ['llm.model.layers.3."
    ), msg
    # spec.yaml of one checkpoint next to composer.json of the other: refused before building
    c2 = _copy(four, tmp_path, "c2")
    shutil.copyfile(three / "spec.yaml", c2 / "spec.yaml")
    assert _error(c2) == f"{c2 / 'composer.json'}: llm_config has 4 layers but spec.yaml's llm.config has 3"


def test_broken_metadata_files_name_the_file(saved, tmp_path, no_load):
    c = _copy(saved[0], tmp_path)
    (c / "spec.yaml").unlink()
    assert _error(c).startswith(f"{c / 'spec.yaml'}: cannot read (FileNotFoundError")
    shutil.copyfile(saved[0] / "spec.yaml", c / "spec.yaml")
    meta = json.loads((c / "composer.json").read_text())
    (c / "composer.json").write_text("[1, 2]")
    assert _error(c) == f"{c / 'composer.json'}: unknown format_version None (this composer reads 1)"
    (c / "composer.json").write_text(json.dumps({**meta, "encoder_types": {}}))
    assert _error(c).startswith(f"{c / 'composer.json'}: cannot rebuild the configs (KeyError")
    (c / "composer.json").write_text(json.dumps({**meta, "insert_at": {"image": 3}}))
    assert _error(c) == f"{c / 'composer.json'}: insert_at {{'image': 3}} differs from spec.yaml's {{'image': 1}}"
    (c / "composer.json").write_text(json.dumps(meta)[:-20])
    assert _error(c).startswith(f"{c / 'composer.json'}: invalid JSON")
    (c / "composer.json").write_text(json.dumps(meta))
    (c / "spec.yaml").write_text("name: &a [*a]\n")
    assert _error(c) == f"{c / 'spec.yaml'}: recursive YAML alias *a at line 1"  # the guarded YAML loader


@pytest.mark.parametrize(
    "content, reason",
    [
        ('{"model": {"type": "BPE"}}', "a tokenizer file lacks the key 'added_tokens'"),
        ('{"version": "1.0", "added_tokens": [], "model": {"type": "Nope"}}', "Exception: data did not match"),
        ("[1, 2]", "TypeError"),
    ],
)
def test_a_tokenizer_json_of_the_wrong_schema_names_the_tokenizer(saved, tmp_path, content, reason):
    """Valid JSON that is not a tokenizer is one error naming the directory."""
    c = _copy(saved[0], tmp_path)
    (c / "tokenizer" / "tokenizer.json").write_text(content)
    msg = _error(c)
    assert msg.startswith(f"tokenizer: cannot load tokenizer '{c / 'tokenizer'}': {reason}")


def test_cli_reports_a_corrupt_checkpoint_on_one_line(saved, tmp_path, capsys):
    from composer.cli import main

    c = _copy(saved[0], tmp_path)
    w = c / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(SystemExit) as e:
        main(["generate", str(c), "--prompt", "hi", "--image", str(ROOT / "specs/tiny/assets/red_circle.png")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: {w}: cannot load (") and err.count("\n") == 1, err


def test_resume_from_another_specs_checkpoint_changes_nothing(tmp_path):
    """A trainer checkpoint whose tensors have other shapes (same names) or are truncated is refused
    before any parameter, optimizer or RNG state is touched."""
    from helpers import train_data

    import composer.train as tr

    cfg = tr.TrainConfig(
        data=str(train_data(tmp_path)),
        output=str(tmp_path / "run"),
        max_steps=1,
        save_every=1,
        batch_size=2,
        progress=False,
        stage=1,
    )
    tr.train(make_model("llama", 1).train(), cfg)
    step = tmp_path / "run" / "checkpoints" / "step-000001"
    d = spec_dict("llama", 1)
    d["llm"]["config"].update(hidden_size=32)  # same parameter names, other shapes
    other = build(parse_spec(d)).train()
    before = {k: v.clone() for k, v in other.state_dict().items()}
    cfg.resume = True
    with pytest.raises(InputError) as e:
        tr.train(other, cfg)
    assert str(e.value) == (
        f"{step / 'state'}: model.projectors.image.0.weight is shape (64, 32), this run "
        "needs (32, 32) (a checkpoint of another spec?)"
    )
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())
    same = make_model("llama", 1).train()
    before = {k: v.clone() for k, v in same.state_dict().items()}
    shard = next((step / "state").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:200])
    with pytest.raises(InputError, match=rf"^{step / 'state'}: cannot load the trainer state \("):
        tr.train(same, cfg)
    assert all(torch.equal(v, same.state_dict()[k]) for k, v in before.items())
    (step / "trainer_state.json").write_text("{}")
    with pytest.raises(
        InputError, match=r"trainer_state.json: not a trainer state of this composer version \(needs the keys"
    ):
        tr.train(same, cfg)


# -- bundles ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(llama_k1_export):
    """The session's one real export (llama, image at layer 1), and the checkpoint it came from."""
    return make_model("llama", insert_at=1), *llama_k1_export


def _manifest_error(bundle) -> str:
    from composer.export.runtime import OnnxPipeline

    with pytest.raises(InputError) as e:
        OnnxPipeline(bundle)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bundle_missing_parts_and_malformed_manifests(exported, tmp_path):
    _, _, bundle = exported
    b = _copy(bundle, tmp_path)
    man = json.loads((b / "manifest.json").read_text())
    assert man["llm"]["max_position_embeddings"] == 512  # recorded for the runtime's context check
    shutil.rmtree(b / "processors" / "image")
    assert _manifest_error(b) == f"{b / 'processors/image'}: missing from the bundle"
    shutil.copytree(bundle / "processors", b / "processors", dirs_exist_ok=True)
    shutil.rmtree(b / "tokenizer")
    assert _manifest_error(b) == f"{b / 'tokenizer'}: missing from the bundle"
    shutil.copytree(bundle / "tokenizer", b / "tokenizer")
    bad = {**man, "stages": [*man["stages"][:1], {**man["stages"][1], "graph": "late_multimodal.k9.onnx"}]}
    (b / "manifest.json").write_text(json.dumps(bad))
    assert _manifest_error(b) == (
        f"{b / 'manifest.json'}: stages/encoders name graphs the manifest does not list: ['late_multimodal.k9.onnx']"
    )
    (b / "manifest.json").write_text(json.dumps({**man, "stages": ["early_text.onnx"]}))
    assert _manifest_error(b) == f"{b / 'manifest.json'}: stages[0]: must be an object, got 'early_text.onnx'"
    (b / "manifest.json").write_text(json.dumps({k: v for k, v in man.items() if k != "kv"}))
    assert _manifest_error(b) == f"{b / 'manifest.json'}: kv: missing"
    (b / "manifest.json").write_text(json.dumps(man)[:100])
    assert _manifest_error(b).startswith(f"{b / 'manifest.json'}: invalid JSON")


@pytest.mark.parametrize(
    "damage,expected",
    [
        (
            lambda b: (b / "manifest.json").write_text(
                json.dumps({**json.loads((b / "manifest.json").read_text()), "format_version": 7})
            ),
            "manifest.json: unknown format_version 7 (this composer reads 2)",
        ),
        (  # a bundle of the concatenating KV layout
            lambda b: (b / "manifest.json").write_text(
                json.dumps({**json.loads((b / "manifest.json").read_text()), "format_version": 1})
            ),
            "manifest.json: unknown format_version 1 (this composer reads 2): export the model again with this"
            " composer (compose export)",
        ),
        (
            lambda b: (b / "early_text.onnx.data").write_bytes((b / "early_text.onnx.data").read_bytes()[:64]),
            "early_text.onnx.data: external data of early_text.onnx is truncated",
        ),
        (lambda b: (b / "encoder.image.onnx").unlink(), "encoder.image.onnx: graph file missing from the bundle"),
    ],
)
def test_cli_generate_on_a_broken_bundle_is_one_line_exit_2(exported, tmp_path, capsys, damage, expected):
    from composer.cli import main

    b = _copy(exported[2], tmp_path)
    damage(b)
    with pytest.raises(SystemExit) as e:
        main(["generate", str(b), "--prompt", "hi", "--image", str(ROOT / "specs/tiny/assets/red_circle.png")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith(f"error: {b}/") and expected in err, err


@pytest.mark.slow
def test_export_interrupted_while_writing_keeps_the_previous_bundle(exported, tmp_path, capsys):
    """`compose export` stopped by SIGTERM after writing its first graph: the previous bundle (a real,
    complete one) is left byte for byte, and no temp dir remains."""
    from composer.cli import main
    from composer.export.runtime import OnnxPipeline

    _, ckpt, bundle = exported
    out = tmp_path / "bundles" / "b.onnx"
    shutil.copytree(bundle, out)
    previous = tree(out)
    with pytest.raises(SystemExit) as e:
        main(["export", str(ckpt), "-o", str(out)])
    assert (
        e.value.code == 2 and capsys.readouterr().err == f"error: {out}: exists and is not empty (pass --overwrite)\n"
    )
    code, err = interrupt(tmp_path, "export", signal.SIGTERM, "export", ckpt, "-o", out, "--overwrite")
    assert code == 143 and err.strip().splitlines() == ["error: terminated (SIGTERM)"], err
    assert siblings(out) == ["b.onnx"] and tree(out) == previous
    OnnxPipeline(out)  # still a loadable bundle


def test_onnx_pipeline_checks_the_context_and_collects_bad_items(exported, tmp_path):
    """The runtime reads the context from the manifest: long prompts fail before any graph runs,
    and `prepare(errors="collect")` behaves as the torch model's."""
    from composer.export.runtime import OnnxPipeline

    model, _, bundle = exported
    pipe = OnnxPipeline(bundle)
    assert pipe.context_length == model.context_length == 512
    png = str(ROOT / "specs/tiny/assets/red_circle.png")
    with pytest.raises(
        InputError, match=r"^prompt 0: \d+ tokens \(1 x 16 for '<image>'\) exceed the LLM's context of 512"
    ):
        pipe.prepare([pipe.format_prompt("x" * 600)], image=[png])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    prompts = [pipe.format_prompt(q) for q in ("a", "b", "c")]
    batch, rows, errors = pipe.prepare(prompts, image=[png, bad, png], errors="collect")
    assert rows == [0, 2] and list(errors) == [1] and errors[1].startswith(f"{bad}: cannot read image")
    want = model.generate(
        **model.prepare([prompts[0], prompts[2]], image=[png, png]), max_new_tokens=4, eos_token_id=[]
    )
    assert torch.equal(pipe.generate(**batch, max_new_tokens=4, eos_token_id=[]), want)
    long = pipe.prepare([pipe.format_prompt("x" * 470)], image=[png])
    with pytest.raises(InputError, match=r"with max_new_tokens=40 it exceeds the LLM's context of 512"):
        pipe.generate(**long, max_new_tokens=40)


# -- the write paths leave no pickles -----------------------------------------------------------------------------
def test_checkpoint_and_bundle_hold_no_pickles(saved, exported):
    for root in (saved[0], exported[2]):
        suffixes = {p.suffix for p in root.rglob("*") if p.is_file()}
        assert not suffixes & {".bin", ".pt", ".pth", ".pkl", ".pickle"}, (root, suffixes)


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda m: m["state"].update(step="x"), r"state.step must be a non-negative integer .*got 'x'"),
        (lambda m: m["state"].update(seen=-3), r"state.seen must be a non-negative integer .*got -3"),
        (lambda m: m.update(world_size=0), r"world_size must be a non-negative integer .*got 0"),
        (lambda m: m.update(param_names="all"), r"param_names must be a list of parameter names"),
        (lambda m: m.update(scheduler=[1]), r"scheduler must be a JSON object, got list"),
    ],
)
def test_a_tampered_trainer_state_names_the_field(tmp_path, edit, match):
    """A trainer_state.json with wrong types is one error naming the field, not a traceback."""
    import json

    from composer.train.checkpoints import CKPT_FORMAT, read_meta

    meta = {
        "format_version": CKPT_FORMAT,
        "state": {"step": 2, "epoch": 0, "seen": 4},
        "world_size": 1,
        "param_names": ["a"],
        "optimizer_scalars": {},
        "scheduler": {},
    }
    read_meta_dir = tmp_path / "step"
    read_meta_dir.mkdir()
    (read_meta_dir / "trainer_state.json").write_text(json.dumps(meta))
    assert read_meta(read_meta_dir)["state"]["step"] == 2
    edit(meta)
    (read_meta_dir / "trainer_state.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match=match):
        read_meta(read_meta_dir)
