"""Shared fixtures: tiny random-weight components from inline configs (no network, CPU)."""

from __future__ import annotations

import copy
import os

# Tests never reach the network: everything is built from inline configs or saved to tmp dirs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

from composer.spec import parse_spec

LLAMA = {
    "model_type": "llama", "vocab_size": 272, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
}
OPT = {
    "model_type": "opt", "vocab_size": 272, "hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 4,
    "num_attention_heads": 4, "max_position_embeddings": 512, "word_embed_proj_dim": 64,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "dropout": 0.0, "attention_dropout": 0.0,
}
QWEN2 = {**LLAMA, "model_type": "qwen2"}
QWEN3 = {**LLAMA, "model_type": "qwen3", "head_dim": 16}
MISTRAL = {**LLAMA, "model_type": "mistral", "sliding_window": None}
LLMS = {"llama": LLAMA, "opt": OPT, "qwen2": QWEN2, "qwen3": QWEN3, "mistral": MISTRAL}

CLIP = {
    "model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "image_size": 32, "patch_size": 8,
}


def spec_dict(llm: str = "llama", insert_at: int | dict[str, int] = 0, modalities=("image",), **llm_extra) -> dict:
    """A tiny LLaVA-shaped spec as a dict; ``insert_at`` per modality when a dict."""
    mods = {}
    for m in modalities:
        k = insert_at[m] if isinstance(insert_at, dict) else insert_at
        mods[m] = {
            "encoder": {"config": copy.deepcopy(CLIP), "feature_layer": -2, "select": "patch"},
            "projector": {"type": "mlp", "depth": 2, "activation": "gelu"},
            "insert_at": k,
        }
    template = "USER: " + " ".join(f"<{m}>" for m in modalities) + "\n{instruction} ASSISTANT:"
    return {
        "name": "tiny-test", "seed": 0,
        "llm": {"config": copy.deepcopy(LLMS[llm]), "attn_implementation": "eager", **llm_extra},
        "modalities": mods,
        "prompt": {"template": template},
    }


def make_model(llm: str = "llama", insert_at=0, modalities=("image",), **llm_extra):
    from composer.builder import build

    model = build(parse_spec(spec_dict(llm, insert_at, modalities, **llm_extra)))
    return model.eval()


def images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g)


@pytest.fixture
def tiny_llava():
    return make_model("llama", insert_at=0)
