"""Sliding-window LLMs (Mistral v0.1, Qwen2/3 with use_sliding_window): composer equals HF while
the padded sequence fits the window, and refuses (one InputError) instead of differing past it."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import images, spec_dict

from composer.builder import build
from composer.errors import InputError
from composer.spec import parse_spec

WINDOW = 48  # a tiny-spec prompt with one image (16 tokens) and "hi" is 37 slots


def _model(llm: str = "mistral", k: int = 0, **extra):
    d = spec_dict(llm, k)
    d["llm"]["config"].update(extra)
    return build(parse_spec(d)).eval()


def test_window_read_from_each_family():
    assert _model("mistral", sliding_window=WINDOW).adapter.sliding_window == WINDOW
    assert _model("mistral").adapter.sliding_window is None  # conftest's MISTRAL: sliding_window None
    assert (
        _model("qwen2", sliding_window=WINDOW, use_sliding_window=True, max_window_layers=2).adapter.sliding_window
        == WINDOW
    )
    assert _model("qwen2", sliding_window=WINDOW, use_sliding_window=False).adapter.sliding_window is None
    assert _model("llama").adapter.sliding_window is None


def test_within_the_window_logits_equal_hf_mistral():
    """Text only, width = window: HF's sliding mask excludes nothing yet, so the logits agree."""
    model = _model("mistral", sliding_window=WINDOW)
    ids = torch.randint(3, 250, (2, WINDOW), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids).logits
        hf = model.llm(input_ids=ids).logits
    assert float((ours - hf).abs().max()) < 1e-5
    # one slot more: HF's window would now hide the first token from the last one
    with pytest.raises(InputError, match=rf"exceeds the LLM's sliding attention window of {WINDOW}"):
        model(torch.cat([ids, ids[:, :1]], 1))


@pytest.mark.parametrize("k", [0, 2])
def test_generation_past_the_window_is_refused_before_it_starts(k):
    model = _model("mistral", k, sliding_window=WINDOW)
    batch = model.prepare([model.format_prompt("hi")], image=[images(1)[0]])
    width = batch["input_ids"].shape[1]
    assert width < WINDOW
    out = model.generate(**batch, max_new_tokens=WINDOW - width, do_sample=False)  # exactly fills it
    assert out.shape[1] == WINDOW - width
    with pytest.raises(InputError, match=r"max_new_tokens=\d+ it exceeds the LLM's sliding attention window"):
        model.generate(**batch, max_new_tokens=WINDOW - width + 1, do_sample=False)


@pytest.mark.slow
def test_onnx_bundle_records_and_enforces_the_window(tmp_path):
    from composer.export import OnnxPipeline, export_onnx  # the public names the README uses

    model = _model("mistral", 1, sliding_window=WINDOW)
    bundle = export_onnx(model, tmp_path / "bundle")
    assert json.loads((bundle / "manifest.json").read_text())["llm"]["sliding_window"] == WINDOW
    pipe = OnnxPipeline(bundle)
    batch = model.prepare([model.format_prompt("hi")], image=[images(1)[0]])
    width = batch["input_ids"].shape[1]
    assert pipe.generate(**batch, max_new_tokens=WINDOW - width, do_sample=False).shape[1] == WINDOW - width
    with pytest.raises(InputError, match="sliding attention window"):
        pipe.generate(**batch, max_new_tokens=WINDOW - width + 1, do_sample=False)
