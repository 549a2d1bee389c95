"""The real seed-system specs validate and inspect offline from composer's embedded configs,
with the published architecture numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from composer.builder import build
from composer.errors import InputError
from composer.spec import load_spec, parse_spec
from composer.summary import summarize

ROOT = Path(__file__).resolve().parents[1]

# spec -> (LLM params, encoder params, MM tokens per item, insert_at); published sizes
EXPECTED = {
    "llava.yaml": (6_738_415_616, 303_507_456, 576, 8),  # LLaMA/Vicuna-7B, CLIP ViT-L/14-336 vision tower
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
