"""Claims of the user guide (README.md and docs/) checked against the code: gradient accumulation
equals the larger batch, --merge-lora, --media-root (docs/training.md), the SigLIP encoder
(docs/formats.md), bf16/fp16 models (the README's spec). Each claim's sentence is looked up where the
guide states it, so a claim that moves or changes wording is noticed here along with its test."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from helpers import CLIP, ROOT, images, spec_dict
from PIL import Image

from composer.builder import build
from composer.model import ComposedModel
from composer.spec import parse_spec
from composer.train.loop import TrainConfig, train

# (file, the claim's text as written there, the test below that checks it)
CLAIMS = [
    (
        "docs/training.md",
        "`--grad-accum 2 --batch-size 2` trains exactly like `--batch-size 4` (tested to 1e-5 on the losses "
        "of records with different answer lengths)",
        "test_grad_accum_2_of_batch_2_trains_like_batch_4",
    ),
    (
        "docs/training.md",
        "`--merge-lora` for the saved model",
        "test_merge_lora_saves_a_plain_model_with_the_same_outputs",
    ),
    (
        "docs/training.md",
        "Media paths are relative to the data file (or `--media-root`)",
        "test_media_root_resolves_record_paths",
    ),
    ("docs/formats.md", "`siglip_vision`", "test_siglip_vision_encoder_builds_trains_and_generates"),
    (
        "README.md",
        "dtype: float32             # float32 | bfloat16 | float16",
        "test_half_precision_models_forward_and_generate_close_to_fp32",
    ),
]


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


@pytest.mark.parametrize(("path", "claim", "test"), CLAIMS, ids=[c[2] for c in CLAIMS])
def test_the_guide_still_states_each_checked_claim(path, claim, test):
    """The sentence a test below backs is still in the guide, at the place the guide states it (line
    breaks and indentation ignored), and that test still exists."""
    assert callable(globals().get(test)), test
    assert _flat(claim) in _flat((ROOT / path).read_text()), f"{path} no longer says: {claim}"


def _data(tmp_path, n=8, prefix=""):
    rng = np.random.default_rng(1)
    recs = []
    for i in range(n):
        img = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(img).save(tmp_path / f"p{i}.png")
        recs.append(
            {"image": f"{prefix}p{i}.png", "prompt": "What is it?", "response": ["red", "blue"][i % 2] * (1 + i % 3)}
        )
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def _model(llm_train="full", **lora):
    d = spec_dict("llama", 2)
    d["llm"]["train"] = llm_train
    if lora:
        d["llm"]["lora"] = lora
    return build(parse_spec(d))


def _cfg(tmp_path, data, name, **kw):
    base = dict(data=str(data), output=str(tmp_path / name), lr=1e-2, warmup_ratio=0.0, progress=False, seed=0)
    return TrainConfig(**{**base, **kw})


def test_grad_accum_2_of_batch_2_trains_like_batch_4(tmp_path):
    """docs/training.md. Records of different lengths (so micro-batches hold different label counts):
    the loss of a step is the mean over all its label tokens, however the step is split."""
    data = _data(tmp_path)
    a, b = _model(), _model()
    sa = train(a, _cfg(tmp_path, data, "a", batch_size=4, max_steps=4))
    sb = train(b, _cfg(tmp_path, data, "b", batch_size=2, grad_accum=2, max_steps=4))
    assert sa["steps"] == sb["steps"] == 4
    np.testing.assert_allclose(sa["losses"], sb["losses"], rtol=1e-5)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        # fp32 sums in another order, amplified by Adam's normalisation over 4 steps at lr 1e-2:
        # observed up to 6e-5 on weights of magnitude ~0.1
        torch.testing.assert_close(p, q, rtol=1e-4, atol=2e-4, msg=name)
    assert sa["losses"][-1] < sa["losses"][0]


def test_merge_lora_saves_a_plain_model_with_the_same_outputs(tmp_path):
    """docs/training.md: `--merge-lora` folds LoRA into the saved model's weights."""
    data = _data(tmp_path, n=4)
    model = _model("lora", r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    train(model, _cfg(tmp_path, data, "run", batch_size=2, max_steps=2, merge_lora=True))
    merged = ComposedModel.from_pretrained(tmp_path / "run")
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    batch = model.prepare([model.format_prompt("What is it?")], image=list(images(1)))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, model(**batch).logits, rtol=1e-4, atol=1e-4)


def test_media_root_resolves_record_paths(tmp_path):
    """docs/training.md: media paths resolve next to the data file, or under `--media-root`."""
    media = tmp_path / "media"
    media.mkdir()
    data = _data(media, n=2)
    moved = tmp_path / "data.jsonl"
    moved.write_text(data.read_text())  # the records name p0.png, p1.png: under media/, not next to the file
    from composer.errors import InputError

    with pytest.raises(InputError, match="image file not found"):
        train(_model(), _cfg(tmp_path, moved, "x", batch_size=2, max_steps=1))
    summary = train(_model(), _cfg(tmp_path, moved, "y", batch_size=2, max_steps=1, media_root=str(media)))
    assert summary["steps"] == 1


def test_siglip_vision_encoder_builds_trains_and_generates(tmp_path):
    """docs/formats.md: `siglip_vision` is one of the registered encoders."""
    d = spec_dict("llama", 1)
    d["modalities"]["image"]["encoder"] = {
        "config": {**CLIP, "model_type": "siglip_vision_model"},  # the tiny CLIP's sizes
        "feature_layer": -1,
        "train": "full",
    }
    model = build(parse_spec(d))
    assert model.num_tokens("image") == 16  # SigLIP has no CLS token: 4 x 4 patches
    batch = model.prepare([model.format_prompt("hi")], image=list(images(1)))
    out = model.generate(**batch, max_new_tokens=3, eos_token_id=[])
    assert out.shape == (1, 3)
    data = _data(tmp_path, n=2)
    before = {n: p.detach().clone() for n, p in model.encoders["image"].named_parameters()}
    train(model, _cfg(tmp_path, data, "run", batch_size=2, max_steps=1))
    assert any(not torch.equal(p, before[n]) for n, p in model.encoders["image"].named_parameters())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_models_forward_and_generate_close_to_fp32(dtype):
    """README.md (the spec's `llm.dtype`). The same weights in fp32 and half precision: logits within
    the half type's resolution, and cached generation equals uncached generation in that dtype."""
    d = spec_dict("llama", 2)
    full = build(parse_spec(d)).eval()
    d["llm"]["dtype"] = dtype
    half = build(parse_spec(d)).eval()
    half.load_state_dict({k: v.to(getattr(torch, dtype)) for k, v in full.state_dict().items()})
    assert half.dtype == getattr(torch, dtype)
    batch = full.prepare([full.format_prompt("hello there"), full.format_prompt("hi")], image=list(images(2)))
    with torch.no_grad():
        ref = full(**batch).logits
        got = half(**batch).logits
    assert got.dtype == getattr(torch, dtype)
    err = (got.float() - ref).abs().max().item()
    assert err < 0.1 * max(1.0, ref.abs().max().item()), err
    cached = half.generate(**batch, max_new_tokens=4, eos_token_id=[])
    assert torch.equal(cached, half.generate(**batch, max_new_tokens=4, eos_token_id=[], use_cache=False))


GUIDE = [
    "README.md",
    "CONTRIBUTING.md",
    "CHANGELOG.md",
    *(f"docs/{p.name}" for p in sorted((ROOT / "docs").glob("*.md"))),
]


def _anchor(heading: str) -> str:  # GitHub's heading ids: lower case, punctuation dropped, spaces to -
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("path", GUIDE)
def test_guide_pages_render_their_tables_and_their_links_resolve(path):
    """Every block of `|` lines renders as one table with all its rows (a missing separator or a
    stray `|` renders as a paragraph on GitHub), every image exists, and every relative link names
    an existing file and, with `#anchor`, one of that page's headings; no line names a development
    session or a tracker item (that history is the changelog's, and it names commits)."""
    from markdown_it import MarkdownIt

    text = (ROOT / path).read_text()
    html = MarkdownIt("commonmark").enable("table").render(text)
    blocks, run = [], 0
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            run += 1
        elif run:
            blocks.append(run)
            run = 0
    assert html.count("<table>") == len(blocks), path
    assert html.count("<tr>") == sum(n - 1 for n in blocks), path  # the separator line is no row
    for target in re.findall(r'(?:href|src)="([^"]+)"', html):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        file, _, anchor = target.partition("#")
        page = (ROOT / path).parent / file if file else ROOT / path
        assert page.exists(), f"{path}: link to {target}"
        if anchor and page.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", page.read_text(), re.M)
            assert anchor in {_anchor(h) for h in headings}, f"{path}: no heading for #{anchor} in {file or path}"
    assert not re.search(r"(?i)\b(session|issue|item) \d", text), path
