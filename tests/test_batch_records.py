"""Prompts get a placeholder per item actually given: a text-only question works on a multimodal
model (CLI, batch, pipeline), and batch generation checks each record's placeholders against its
own items before records are batched together, so one record cannot take another's picture;
molecule records (SMILES strings, not files) are answered in batch mode."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import ROOT, run_cli

from composer.checkpoint import load_pretrained

TINY_PNG = ROOT / "specs/tiny/assets/red_circle.png"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("llava") / "tiny"
    assert run_cli("build", "tiny/llava", "-o", out).returncode == 0
    return out


def _alone(model, text: str, images: list[str]) -> str:
    items = {"image": images} if images else {}
    batch = model.prepare([model.format_prompt(text, items={m: len(v) for m, v in items.items()})], **items)
    return model.decode(model.generate(**batch, max_new_tokens=5))[0].strip()


def test_a_text_only_question_is_formatted_without_placeholders(ckpt):
    model = load_pretrained(ckpt)
    assert model.format_prompt("Hi?") == "USER: <image>\nHi? ASSISTANT:"  # the spec's template, one image
    assert model.format_prompt("Hi?", items={}) == "USER: Hi? ASSISTANT:"  # no image: no placeholder
    r = run_cli("generate", ckpt, "--prompt", "What is the capital of France?", "--max-new-tokens", "3")
    assert r.returncode == 0, r.stderr
    import composer

    assert isinstance(composer.pipeline(ckpt)("What is the capital of France?", max_new_tokens=3), str)


def test_batch_records_are_checked_one_by_one_and_answer_about_their_own_media(ckpt, tmp_path):
    """Record 0 writes an extra placeholder (two, with one picture); record 1 asks about two
    pictures. Batched, the totals balance (3 placeholders, 3 pictures) and checked only in total,
    record 0 would take record 1's first picture. Checked per record, record 0 gets its own error,
    and record 1 (its two pictures, two placeholders) and the text-only record 2 answer as each
    does alone."""
    shutil.copy(TINY_PNG, tmp_path / "a.png")
    from PIL import Image

    Image.new("RGB", (32, 32), "blue").save(tmp_path / "b.png")
    recs = [
        {"prompt": "<image> and this one?", "image": "a.png"},
        {"prompt": "What colours are they?", "image": ["b.png", "a.png"]},
        {"prompt": "What is the capital of France?"},
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "out.jsonl"
    r = run_cli("generate", ckpt, "--input", tmp_path / "in.jsonl", "-o", out, "--batch-size", "3",
                "--max-new-tokens", "5")  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert "the prompt has 2 '<image>' placeholder(s) but 1 image item(s) were given" in rows[0]["error"]
    assert "answer" not in rows[0]
    model = load_pretrained(ckpt)
    assert rows[1]["answer"] == _alone(model, "What colours are they?", [str(tmp_path / "b.png"), str(TINY_PNG)])
    assert rows[2]["answer"] == _alone(model, "What is the capital of France?", [])


def test_molecule_records_are_answered_in_batch_mode(tmp_path):
    """A molecule item is a SMILES string, not a file: batch records answer as `compose generate
    --molecule` does; a record whose molecule is not a string is its own error."""
    ck = tmp_path / "molca"
    assert run_cli("build", "tiny/molca", "-o", ck).returncode == 0
    recs = [
        {"prompt": "CCO", "molecule": "CCO"},
        {"prompt": "c1ccccc1", "molecule": "c1ccccc1"},
        {"prompt": "x", "molecule": 3},
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    r = run_cli("generate", ck, "--input", tmp_path / "in.jsonl", "-o", tmp_path / "out.jsonl", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    for row, smiles in zip(rows[:2], ["CCO", "c1ccccc1"], strict=True):
        alone = run_cli("generate", ck, "--molecule", smiles, "--prompt", smiles, "--max-new-tokens", "4")
        assert alone.returncode == 0, alone.stderr
        assert "error" not in row and row["answer"] == alone.stdout.strip()
    assert "`molecule` must be a non-empty string" in rows[2]["error"]


def test_stop_strings_from_the_cli_and_the_pipeline_equal_generate(ckpt):
    """`compose generate --stop S` and `composer.pipeline(...)(..., stop_strings=[S])` stop where
    `model.generate(stop_strings=[S])` stops (transformers' StopStringCriteria)."""
    import composer

    model = load_pretrained(ckpt)
    items = {"image": [str(TINY_PNG)]}
    batch = model.prepare([model.format_prompt("Go on", items={"image": 1})], **items)
    free = model.decode(model.generate(**batch, max_new_tokens=12))[0]
    stop = free[3:5]
    assert len(stop) == 2 and stop.strip()
    want = model.decode(model.generate(**batch, max_new_tokens=12, stop_strings=[stop]))[0]
    assert len(want) < len(free)
    r = run_cli("generate", ckpt, "--image", TINY_PNG, "--prompt", "Go on", "--max-new-tokens", "12", "--stop", stop)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == want.strip()
    got = composer.pipeline(ckpt)("Go on", image=str(TINY_PNG), max_new_tokens=12, stop_strings=[stop])
    assert got == want.strip()


def test_num_return_sequences_from_the_cli_the_pipeline_and_batch_mode(ckpt, tmp_path):
    """`--num-return-sequences N --sample` prints N answers, the pipeline returns a list of N per
    prompt, batch records get `answers` (N each); all equal `generate`'s rows for the same seed.
    Generation flags come from GenerationSpec's fields, and a bad value is named by its flag."""
    import composer

    model = load_pretrained(ckpt)
    kw = dict(max_new_tokens=4, do_sample=True, num_return_sequences=3)
    batch = model.prepare([model.format_prompt("Go on", items={"image": 1})], image=[str(TINY_PNG)])
    import torch

    want = [t.strip() for t in model.decode(model.generate(**batch, **kw, generator=torch.Generator().manual_seed(7)))]
    assert len(want) == 3
    assert composer.pipeline(ckpt)("Go on", image=str(TINY_PNG), seed=7, **kw) == want
    r = run_cli(
        "generate", ckpt, "--image", TINY_PNG, "--prompt", "Go on", "--max-new-tokens", "4", "--sample",
        "--num-return-sequences", "3", "--seed", "7",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"[{i}] {t}" for i, t in enumerate(want, 1)]
    src = tmp_path / "in.jsonl"
    shutil.copy(TINY_PNG, tmp_path / "a.png")
    src.write_text(json.dumps({"prompt": "Go on", "image": "a.png"}) + "\n")
    r = run_cli(
        "generate", ckpt, "--input", src, "-o", tmp_path / "out.jsonl", "--max-new-tokens", "4", "--sample",
        "--num-return-sequences", "3", "--seed", "7",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    row = json.loads((tmp_path / "out.jsonl").read_text())
    assert row["answers"] == want and "answer" not in row
    r = run_cli("generate", ckpt, "--image", TINY_PNG, "--prompt", "Go on", "--top-p", "2")
    assert r.returncode == 2 and "--top-p:" in r.stderr and "must be <= 1, got 2.0" in r.stderr
    r = run_cli("generate", ckpt, "--image", TINY_PNG, "--prompt", "Go on", "--num-return-sequences", "2")
    assert r.returncode == 2 and "--num-return-sequences: 2 sequences per prompt need do_sample" in r.stderr
