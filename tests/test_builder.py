"""composer.builder, unit by unit: source resolution, revision pins, configs, train modes, and
what a built model holds (dtypes, trainable parameters, placeholder ids, the seed)."""

from __future__ import annotations

import pytest
import torch
from helpers import spec_dict

from composer.builder import build, pin_revisions, resolve_source, set_trainable
from composer.errors import InputError, SpecError
from composer.spec import parse_spec


def test_resolve_source_prefers_a_local_dir_next_to_the_spec(tmp_path):
    (tmp_path / "org" / "model").mkdir(parents=True)
    assert resolve_source("org/model", tmp_path) == str(tmp_path / "org" / "model")
    assert resolve_source("org/other", tmp_path) == "org/other"  # not local: a Hub id, left as it is
    assert resolve_source("org/model", None) == "org/model"


def test_pin_revisions_leaves_an_unpinned_spec_alone():
    spec = parse_spec(spec_dict())
    assert pin_revisions(spec) is spec


def test_inline_config_errors_name_the_field():
    d = spec_dict()
    d["llm"]["config"]["num_attention_heads"] = 5  # 64 is not divisible by 5
    with pytest.raises(SpecError, match=r"llm\.config"):
        build(parse_spec(d))


def test_train_modes_and_dtypes():
    d = spec_dict(insert_at=1)
    d["llm"]["train"] = "lora"
    d["llm"]["dtype"] = "bfloat16"
    d["modalities"]["image"]["encoder"]["train"] = "frozen"
    model = build(parse_spec(d))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("projectors.") or "lora_" in n for n in trainable)
    assert any("lora_" in n for n in trainable)
    assert model.llm.get_input_embeddings().weight.dtype == torch.bfloat16
    assert next(model.projectors["image"].parameters()).dtype == torch.bfloat16
    set_trainable(model.llm, "full")
    assert all(p.requires_grad for p in model.llm.parameters())
    set_trainable(model.llm, "frozen")
    assert not any(p.requires_grad for p in model.llm.parameters())


def test_placeholders_get_their_own_ids_and_the_seed_fixes_the_weights():
    a = build(parse_spec(spec_dict(modalities=("image", "audio"))))
    b = build(parse_spec(spec_dict(modalities=("image", "audio"))))
    ids = a.placeholder_ids
    assert len(set(ids.values())) == 2 and all(a.tokenizer.convert_ids_to_tokens(i) == f"<{m}>" for m, i in ids.items())
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(p, q), n


def test_insert_at_past_the_llm_is_refused_with_the_field():
    d = spec_dict(insert_at=4)
    with pytest.raises(SpecError, match=r"modalities\.image\.insert_at: must be < the LLM's 4 layers, got 4"):
        parse_spec(d)


def test_a_missing_local_llm_dir_is_an_input_error(tmp_path):
    d = spec_dict()
    del d["llm"]["config"]
    d["llm"]["model"] = str(tmp_path / "nowhere")
    with pytest.raises(InputError, match=r"llm\.model"):
        build(parse_spec(d))
