"""The real seed-system specs validate and inspect offline from composer's embedded configs,
with the published architecture numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from composer.analysis.summary import summarize
from composer.builder import build
from composer.errors import InputError
from composer.spec import load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]

# spec -> (LLM params incl. LoRA, encoder params, MM tokens per item, insert_at); published sizes
EXPECTED = {
    "llava.yaml": (6_738_415_616, 303_507_456, 576, 8),  # LLaMA/Vicuna-7B, CLIP ViT-L/14-336 vision tower
    "blip2.yaml": (2_651_596_800, 985_952_256, 32, 8),  # OPT-2.7B, EVA ViT-g/14 (BLIP-2 total 3.74B)
    "ltu_audio.yaml": (6_738_415_616 + 4_194_304, 86_187_264, 32, 16),  # Vicuna-7B + LoRA r8 q,v; AST base
    "molca.yaml": (1_327_783_936, 1_858_500, 32, 6),  # Galactica-1.3B + LoRA r16; GraphCL GIN 5x300
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_seed_spec_inspects_offline(name, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache: only embedded configs can answer
    llm_params, enc_params, tokens, k = EXPECTED[name]
    spec = load_spec(ROOT / "specs" / name)
    model = build(spec, shape_only=True, offline=True)
    rows, facts = summarize(model)
    (m,) = spec.modalities
    assert facts["params"]["llm"]["total"] == llm_params
    assert facts["params"][f"{m}.encoder"]["total"] == enc_params
    assert facts["mm_tokens_per_item"] == {m: tokens}
    assert facts["insert_at"] == {m: k}
    assert 0 < facts["prefill_flops_saving_vs_insert_at_0"] < 1


def test_offline_inspect_of_unknown_hub_id_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    d = load_spec(ROOT / "specs/llava.yaml").model_dump(exclude_none=True)
    d["llm"]["model"] = "nobody/no-such-model"
    with pytest.raises(InputError, match=r"llm.model: 'nobody/no-such-model' is not in the local Hugging Face cache"):
        build(parse_spec(d), shape_only=True, offline=True)


TINY_ITEMS = {  # one raw item per encoder type, as a user gives it
    "clip_vision": ROOT / "specs/tiny/assets/red_circle.png",
    "blip2_vision": ROOT / "specs/tiny/assets/red_circle.png",
    "ast_audio": ROOT / "specs/tiny/assets/tone.wav",
    "gin": "CC(=O)Oc1ccccc1C(=O)O",
}


@pytest.mark.parametrize("name", ["llava", "blip2", "ltu_audio", "molca"])
def test_tiny_twin_trains_and_generates(name):
    """Every tiny twin builds from its file, a few steps on a fixed batch lower the loss, and
    cached greedy generation equals full recomputation."""
    import torch

    from composer.adapters import encoder_type_of

    model = build(ROOT / "specs/tiny" / f"{name}.yaml")
    items = {m: [str(TINY_ITEMS[encoder_type_of(e)])] * 2 for m, e in model.encoders.items()}
    batch = model.prepare([model.format_prompt("what is this?"), model.format_prompt("describe it")], **items)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params
    opt = torch.optim.AdamW(params, lr=5e-3)
    model.train()
    losses = []
    for _ in range(5):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    model.eval()
    a = model.generate(**batch, max_new_tokens=5, eos_token_id=[])
    b = model.generate(**batch, max_new_tokens=5, eos_token_id=[], use_cache=False)
    assert torch.equal(a, b)
