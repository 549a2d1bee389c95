"""`compose build` / `compose inspect`: output, files, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import images, run_cli, spec_dict

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "specs/tiny/llava.yaml"


def compose(*args, cwd=None):
    return run_cli(*args, cwd=cwd)


def compose_subprocess(*args, cwd=None):  # the entry point itself, in a fresh interpreter
    return subprocess.run(
        [sys.executable, "-m", "composer.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd
    )


def test_spec_overrides_on_the_command_line(tmp_path):
    """Torchtune-style `dotted.key=value` overrides (YAML values) after a spec,
    validated like the file; the saved spec.yaml records the result; a bad override is one line
    naming it, exit 2, nothing written; a built checkpoint takes none."""
    from composer.errors import SpecError
    from composer.spec import apply_overrides

    out = tmp_path / "k3"
    r = compose("build", TINY, "modalities.image.insert_at=3", "llm.dtype=bfloat16", "name=tiny k3", "-o", out)
    assert r.returncode == 0, r.stderr
    saved = yaml.safe_load((out / "spec.yaml").read_text())
    assert (saved["modalities"]["image"]["insert_at"], saved["llm"]["dtype"], saved["name"]) == (
        3,
        "bfloat16",
        "tiny k3",
    )
    r = compose("inspect", TINY, "modalities.image.insert_at=1", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["insert_at"] == {"image": 1}
    cases = {
        "modalities.image.insert_at=99": "modalities.image.insert_at: must be < the LLM's 4 layers, got 99 "
        "(set by the override 'modalities.image.insert_at=99')",
        "llm.bogus=1": "llm.bogus: unknown field (set by the override 'llm.bogus=1')",
        "insert_at": "override 'insert_at': expected dotted.key=value",
        "name.first=x": "override 'name.first=x': name is not a mapping in the spec",
        "llm.lora={r: 4": "override 'llm.lora={r: 4': the value is not YAML",
    }
    for override, msg in cases.items():
        r = compose("build", TINY, override, "-o", tmp_path / "bad")
        assert r.returncode == 2 and msg in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert not (tmp_path / "bad").exists()
    r = compose("inspect", out, "llm.dtype=float32")
    assert r.returncode == 2 and "overrides (llm.dtype=float32) apply to spec files" in r.stderr
    tree = {"llm": {"lora": {"r": 4}}}
    assert apply_overrides(tree, ["llm.lora.target_modules=[q_proj, v_proj]", "llm.train=lora"], "s") == {
        "llm": {"lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}, "train": "lora"}
    } and tree == {"llm": {"lora": {"r": 4}}}  # a copy
    with pytest.raises(SpecError, match="expected dotted.key=value"):
        apply_overrides(tree, ["llm..r=1"], "s")


def test_build_and_inspect_tiny_spec(tmp_path):
    out = tmp_path / "ckpt"
    r = compose("build", TINY, "-o", out)
    assert r.returncode == 0, r.stderr
    for word in ("llm", "image.encoder", "image.projector", "insert_at", "FLOPs saving"):
        assert word in r.stdout
    assert (out / "model.safetensors").is_file() and (out / "composer.json").is_file()
    r = compose("inspect", out, "--json")
    assert r.returncode == 0, r.stderr
    facts = json.loads(r.stdout)
    assert facts["insert_at"] == {"image": 2} and facts["mm_tokens_per_item"] == {"image": 16}
    # the FLOPs line follows the FLOPs formula of docs/architecture.md (checked by hand for this spec)
    d, f, L_text, M, N, k = 64, 128, 64, 16, 4, 2
    q_width, kv_width = 4 * 16, 2 * 16  # 4 query heads, 2 KV heads, head_dim 16 (GQA)
    layer = lambda L: 4 * L * d * q_width + 4 * L * d * kv_width + 4 * L * L * q_width + 6 * L * d * f  # noqa: E731
    expected = 1 - (k * layer(L_text) + (N - k) * layer(L_text + M)) / (N * layer(L_text + M))
    assert facts["prefill_flops_saving_vs_insert_at_0"] == pytest.approx(expected, rel=1e-12)
    # a spec inspects on the meta device with the same numbers
    r2 = compose("inspect", TINY, "--json")
    assert json.loads(r2.stdout)["params"] == facts["params"]
    # the saved checkpoint generates
    from composer.model import ComposedModel

    model = ComposedModel.from_pretrained(out)
    batch = model.prepare([model.format_prompt("hi")], image=[images(1)[0]])
    assert model.generate(**batch, max_new_tokens=3, eos_token_id=[]).shape == (1, 3)


@pytest.mark.parametrize(
    "content,expected",
    [
        ("name: [oops", "invalid YAML at line 1"),
        (None, "modalities.image.insert_at: must be < the LLM's 4 layers, got 9"),
    ],
)
def test_bad_spec_is_one_line_exit_2_and_writes_nothing(tmp_path, content, expected):
    spec = tmp_path / "bad.yaml"
    if content is None:
        d = spec_dict("llama", 1)
        d["modalities"]["image"]["insert_at"] = 9
        content = yaml.safe_dump(d)
    spec.write_text(content)
    out = tmp_path / "out"
    r = compose("build", spec, "-o", out)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("error")]
    assert errors == [errors[0]] and r.stderr.startswith("error: ") and expected in errors[0]
    assert "Traceback" not in r.stderr and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]
    r = compose_subprocess("--debug", "build", spec, "-o", out)  # the traceback the entry point prints
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_build_refuses_non_empty_output(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep")
    r = compose("build", TINY, "-o", tmp_path / "out")
    assert r.returncode == 2 and "--overwrite" in r.stderr
    assert (tmp_path / "out" / "x").read_text() == "keep"


def test_inspect_missing_target_and_usage_errors(tmp_path):
    r = compose("inspect", tmp_path / "nope.yaml")
    assert r.returncode == 2 and "nope.yaml: no such file or directory; expected a spec file" in r.stderr
    r = compose("inspect", tmp_path)
    assert r.returncode == 2 and "neither a composer checkpoint" in r.stderr
    r = compose("build", TINY)  # missing -o
    assert r.returncode == 2 and "Missing option" in r.stderr


def test_build_is_deterministic(tmp_path):
    from safetensors.torch import load_file

    for name in ("a", "b"):
        assert compose("build", TINY, "-o", tmp_path / name).returncode == 0
    a, b = load_file(tmp_path / "a/model.safetensors"), load_file(tmp_path / "b/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_main_job_build_export_verify_generate(tmp_path):
    """The README's main job: build -> export --verify -> generate from the bundle and the checkpoint."""
    ckpt, bundle = tmp_path / "ckpt", tmp_path / "bundle"
    image = ROOT / "specs/tiny/assets/red_circle.png"
    r = compose_subprocess("build", TINY, "-o", ckpt)  # `python -m composer.cli`, a fresh interpreter
    assert r.returncode == 0 and "image.projector" in r.stdout, r.stderr
    r = compose("export", ckpt, "-o", bundle, "--verify")
    assert r.returncode == 0, r.stderr
    assert "verified: every difference within 0.0001 x max(1, largest |value|)" in r.stdout
    assert "late_multimodal.onnx" in r.stdout and "layers [2, 4)" in r.stdout
    args = ["--image", image, "--prompt", "What shape is it?", "--max-new-tokens", "8"]
    onnx_out = compose("generate", bundle, *args)
    torch_out = compose("generate", ckpt, *args)
    assert onnx_out.returncode == 0 and torch_out.returncode == 0, onnx_out.stderr + torch_out.stderr
    assert onnx_out.stdout == torch_out.stdout and onnx_out.stdout.strip()
    r = compose("generate", bundle, "--image", tmp_path / "none.png", "--prompt", "x")
    assert r.returncode == 2 and "file not found" in r.stderr
