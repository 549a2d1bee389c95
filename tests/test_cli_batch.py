"""Shipped specs (`compose ls`, `compose cp`, shipped names where a spec
path goes) and batch generation from the CLI (`compose generate --input FILE -o OUT`, `--device`,
`--dtype`, `--batch-size`)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import ROOT, run_cli

from composer import shipped

TINY_PNG = ROOT / "specs/tiny/assets/red_circle.png"


# -- shipped specs ------------------------------------------------------------------------------------------
def test_ls_lists_every_shipped_spec_and_config_with_a_description():
    r = run_cli("ls")
    assert r.returncode == 0, r.stderr
    names = {line.split()[1] for line in r.stdout.splitlines() if line.startswith(("spec ", "config "))}
    want = {p.relative_to(ROOT / "specs").with_suffix("").as_posix() for p in (ROOT / "specs").rglob("*.yaml")}
    want |= {p.relative_to(ROOT / "configs").with_suffix("").as_posix() for p in (ROOT / "configs").rglob("*.yaml")}
    assert names == want
    assert "Tiny offline twin of LLaVA-1.5" in r.stdout


def test_cp_copies_a_spec_with_the_files_it_names_and_the_copy_builds_the_same_model(tmp_path):
    """`compose cp smol/llava_demo DIR` brings demo/vision and demo/projector.safetensors along, so the
    copy resolves as the original; `cp tiny/llava x.yaml` then `build x.yaml` = `build tiny/llava`
    (a shipped name where a spec path goes); an existing destination needs --overwrite."""
    r = run_cli("cp", "smol/llava_demo", tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "llava_demo.yaml").is_file() and (tmp_path / "demo/projector.safetensors").is_file()
    assert (tmp_path / "demo/vision/model.safetensors").is_file()
    r = run_cli("cp", "smol/llava_dinov2_demo", tmp_path)  # the README's demo: its projector and LLM adapters
    assert r.returncode == 0, r.stderr
    for name in ("projector.safetensors", "llm_lora.safetensors"):
        assert (tmp_path / "demo_dinov2" / name).read_bytes() == (ROOT / "specs/smol/demo_dinov2" / name).read_bytes()
    r = run_cli("cp", "tiny/llava", tmp_path / "mine.yaml")
    assert r.returncode == 0, r.stderr
    again = run_cli("cp", "tiny/llava", tmp_path / "mine.yaml")
    assert again.returncode == 2 and "--overwrite" in again.stderr
    a = run_cli("build", tmp_path / "mine.yaml", "-o", tmp_path / "a")
    b = run_cli("build", "tiny/llava", "-o", tmp_path / "b")
    assert a.returncode == b.returncode == 0, a.stderr + b.stderr
    from safetensors.torch import load_file

    wa, wb = load_file(tmp_path / "a/model.safetensors"), load_file(tmp_path / "b/model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    unknown = run_cli("build", "tiny/nope", "-o", tmp_path / "c")
    assert unknown.returncode == 2 and "compose ls" in unknown.stderr


def test_shipped_files_are_package_data():
    """The wheel carries them: the shipped roots resolve through importlib.resources to the
    package's specs/ and configs/ (here, the checkout the editable install maps)."""
    assert (shipped.root("spec") / "tiny/llava.yaml").is_file()
    assert (shipped.root("config") / "accelerate/ddp_8gpu.yaml").is_file()
    assert shipped.find("specs/tiny/llava.yaml") == shipped.root("spec") / "tiny/llava.yaml"


# -- batch generation --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    r = run_cli("build", "tiny/llava", "-o", out)
    assert r.returncode == 0, r.stderr
    return out


def _records(tmp_path):
    shutil.copy(TINY_PNG, tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    recs = [
        {"id": "q1", "prompt": "What shape is it?", "image": "a.png"},
        {"id": "q2", "prompt": "Longer question about the colour of it?", "image": "a.png"},
        {"id": "q3", "prompt": "Missing picture?", "image": "nope.png"},
        {"id": "q4", "prompt": "Corrupt picture?", "image": "bad.png"},
        {"id": "q5", "image": "a.png"},
        {"id": "q6", "prompt": "Escape?", "image": "../../etc/passwd"},
        {"id": "q7", "prompt": "Last one?", "image": "a.png"},
    ]
    lines = [json.dumps(r) for r in recs]
    lines.insert(3, "{not json")
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "in.jsonl"


def test_generate_input_jsonl_answers_each_record_and_reports_bad_ones_in_their_rows(ckpt, tmp_path):
    """Each good record's answer equals `compose generate` on it alone (batches of 3, left-padded
    together); each bad record (missing file, corrupt image, no prompt, a path leaving the media
    root, bad JSON) has an error naming its line, and the rest still run."""
    from composer.checkpoint import load_pretrained

    data = _records(tmp_path)
    r = run_cli("generate", ckpt, "--input", data, "-o", tmp_path / "out.jsonl", "--batch-size", "3",
                "--max-new-tokens", "6")  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [row["index"] for row in rows] == list(range(8))
    by_id = {row.get("id"): row for row in rows}
    model = load_pretrained(ckpt)
    for q, text in [
        ("q1", "What shape is it?"),
        ("q2", "Longer question about the colour of it?"),
        ("q7", "Last one?"),
    ]:
        batch = model.prepare([model.format_prompt(text)], image=[str(tmp_path / "a.png")])
        want = model.decode(model.generate(**batch, max_new_tokens=6))[0].strip()
        assert by_id[q]["answer"] == want and "error" not in by_id[q]
    assert "nope.png" in by_id["q3"]["error"] and "in.jsonl:" in by_id["q3"]["error"]
    assert "bad.png" in by_id["q4"]["error"] and "answer" not in by_id["q4"]
    assert "prompt" in by_id["q5"]["error"]
    assert "media root" in by_id["q6"]["error"]
    assert "in.jsonl:4" in rows[3]["error"]
    assert "5 answered, 3 failed" not in r.stdout and "3 answered, 5 failed" in r.stderr + r.stdout


def test_generate_device_and_dtype_for_a_checkpoint(ckpt):
    """`--dtype bfloat16` runs the checkpoint in bf16 (its answer may differ from fp32's, but it runs and
    prints); an unknown device or a bundle with --dtype is one error."""
    r = run_cli("generate", ckpt, "--image", TINY_PNG, "--prompt", "Hi?", "--dtype", "bfloat16", "--device", "cpu",
                "--max-new-tokens", "3")  # fmt: skip
    assert r.returncode == 0, r.stderr
    bad = run_cli("generate", ckpt, "--image", TINY_PNG, "--prompt", "Hi?", "--device", "tpu")
    assert bad.returncode == 2 and "--device" in bad.stderr
    if not torch.cuda.is_available():
        nocuda = run_cli("generate", ckpt, "--image", TINY_PNG, "--prompt", "Hi?", "--device", "cuda")
        assert nocuda.returncode == 2 and "CUDA" in nocuda.stderr
