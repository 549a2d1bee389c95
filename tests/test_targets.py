"""One resolver for TARGET arguments (composer.targets): shipped spec names work in every command and
API that takes a spec; a path on disk wins over a shipped name, a shipped name over a Hub id; a
target of the wrong kind is one line naming what was expected, exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import make_model, run_cli, train_data

from composer.errors import InputError
from composer.targets import resolve

ROOT = Path(__file__).resolve().parents[1]


def test_resolution_order_and_kinds(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = resolve("tiny/llava")
    assert shipped.kind == "spec" and shipped.path.name == "llava.yaml" and shipped.path.is_file()
    assert resolve("specs/tiny/llava.yaml").path == shipped.path  # the repository-relative spelling too
    # a file on disk with a shipped name's spelling is that file
    (tmp_path / "tiny").mkdir()
    mine = tmp_path / "tiny" / "llava"
    mine.write_text("name: mine\n")
    assert resolve("tiny/llava").path == Path("tiny/llava")
    mine.unlink()
    (tmp_path / "tiny").rmdir()
    # directories: a bundle (manifest.json) or a checkpoint (composer.json), else an error naming both
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "composer.json").write_text("{}")
    (tmp_path / "bu").mkdir()
    (tmp_path / "bu" / "manifest.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    assert resolve("ck").kind == "checkpoint" and resolve("bu").kind == "bundle"
    with pytest.raises(InputError, match=r"empty: neither a composer checkpoint \(no composer.json\) nor an ONNX"):
        resolve("empty")
    # a Hub id that is neither a path nor a shipped name, where Hub repos are accepted
    assert resolve("alice/model@v1").kind == "hub"
    with pytest.raises(InputError, match="no such file or directory; expected a spec file or shipped spec name or"):
        resolve("alice/model", accept=("spec", "checkpoint"))
    # the wrong kind names the expected kinds and what the target is
    with pytest.raises(InputError, match=r"this is a shipped spec \(build it first: compose build tiny/llava"):
        resolve("tiny/llava", accept=("checkpoint", "bundle"))
    with pytest.raises(InputError, match="ck: expected an ONNX bundle directory; this is a composer checkpoint"):
        resolve("ck", accept=("bundle",))


@pytest.mark.parametrize(
    "args",
    [
        ("inspect", "tiny/llava"),
        ("inspect", "tiny/llava", "modalities.image.insert_at=2", "--json"),
        ("plan", "tiny/llava"),
        ("inspect", "llava", "--offline"),
        ("plan", "smol/llava", "--offline", "--text-tokens", "16"),
    ],
)
def test_analysis_commands_take_shipped_names(args, tmp_path):
    r = run_cli(*args, cwd=tmp_path)  # away from the checkout: the name, not a relative path, resolves
    assert r.returncode == 0, r.stderr
    if "--json" in args:
        assert json.loads(r.stdout)["insert_at"] == {"image": 2}


def test_train_bench_and_probe_take_shipped_names(tmp_path):
    data = train_data(tmp_path)
    r = run_cli("train", "tiny/llava", "--data", data, "-o", tmp_path / "t", "--max-steps", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load((tmp_path / "t" / "spec.yaml").read_text())["name"] == "tiny-llava"
    out = tmp_path / "bench.json"
    r = run_cli(
        "bench", "tiny/llava", "--insert-at", "1", "--runtime", "torch", "--repeats", "1", "--warmup", "0",
        "--text-tokens", "24", "--new-tokens", "2", "--json", out, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["results"]
    r = run_cli("probe", "tiny/llava", "--data", data, "--json", tmp_path / "probe.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "probe.json").read_text())["records"] == 4


def test_commands_refuse_the_wrong_kind_of_target_in_one_line(tmp_path):
    cases = {
        ("generate", "tiny/llava", "--prompt", "hi"): "tiny/llava: expected a composer checkpoint directory or an "
        "ONNX bundle directory; this is a shipped spec (build it first: compose build tiny/llava -o DIR)",
        ("inspect", "no/such-spec"): "no/such-spec: no such file or directory; expected a spec file or shipped spec "
        "name or a composer checkpoint directory (`compose ls` lists the shipped specs)",
        ("inspect", tmp_path): f"{tmp_path}: neither a composer checkpoint",
    }
    for args, msg in cases.items():
        r = run_cli(*args, cwd=tmp_path)
        assert r.returncode == 2 and msg in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_pipeline_takes_a_shipped_name_and_checks_revision(tmp_path):
    import composer

    pipe = composer.pipeline("tiny/llava")
    answer = pipe("What is it?", image=str(ROOT / "specs/tiny/assets/red_circle.png"), max_new_tokens=2)
    assert isinstance(answer, str)
    ckpt = make_model("llama").save_pretrained(tmp_path / "ck")
    with pytest.raises(InputError, match="revision='v1' applies to Hub repos; this is a local checkpoint"):
        composer.pipeline(ckpt, revision="v1")
    shutil.rmtree(ckpt)
