"""Fixtures and test-session settings; the helpers they use live in helpers.py."""

from __future__ import annotations

import os

# Tests never reach the network: everything is built from inline configs or saved to tmp dirs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
from helpers import GGUF, make_model


@pytest.fixture(scope="session", autouse=True)
def composer_cache(tmp_path_factory):
    """A fresh ``COMPOSER_CACHE`` per test session: package sources are converted by the tests
    themselves (once per session), never taken from the user's cache."""
    old = os.environ.get("COMPOSER_CACHE")
    os.environ["COMPOSER_CACHE"] = str(tmp_path_factory.mktemp("composer-cache"))
    yield os.environ["COMPOSER_CACHE"]
    if old is None:
        os.environ.pop("COMPOSER_CACHE", None)
    else:
        os.environ["COMPOSER_CACHE"] = old


@pytest.fixture(scope="session")
def smol_dir(tmp_path_factory):
    """SmolLM2 dequantized once, saved as a plain HF checkpoint (config, safetensors, tokenizer)."""
    import torch

    from composer.gguf import load_gguf_llm, load_gguf_tokenizer, resolve_gguf

    path = resolve_gguf(GGUF, None, "llm.model")
    out = tmp_path_factory.mktemp("smollm2")
    load_gguf_llm(path, "llm.model", dtype=torch.float32, attn_implementation="sdpa").save_pretrained(out)
    load_gguf_tokenizer(path, "llm.model").save_pretrained(out)
    return out


@pytest.fixture
def tiny_llava():
    return make_model("llama", insert_at=0)


@pytest.fixture(scope="session")
def llama_k1_export(tmp_path_factory):
    """``make_model("llama", insert_at=1)`` saved and exported once per test session (the export takes
    seconds; three modules use it): -> (checkpoint dir, bundle dir). Tests copy them before damaging
    them, and build their own model object with ``make_model`` (the same seed: the same weights)."""
    from composer.export.exporter import export_onnx

    root = tmp_path_factory.mktemp("llama-k1")
    model = make_model("llama", insert_at=1)
    return model.save_pretrained(root / "ckpt"), export_onnx(model, root / "bundle")
