"""ComposedModel's structure is fixed at build time: ``insert_at`` changes only through
``with_insert_at``, which returns a model over the same modules, validated like the spec."""

from __future__ import annotations

import pytest
import torch
from helpers import images, make_model

from composer.errors import InputError


def test_with_insert_at_shares_weights_and_equals_a_model_built_at_k():
    model = make_model("llama", insert_at=0)
    at2 = model.with_insert_at(2)
    assert model.insert_at == {"image": 0} and at2.insert_at == {"image": 2}
    assert at2.spec.modalities["image"].insert_at == 2 and model.spec.modalities["image"].insert_at == 0
    ours = dict(model.named_parameters())
    for name, p in at2.named_parameters():
        assert p is ours[name]  # shared, not copied
    built = make_model("llama", insert_at=2)  # same seed, so the same weights
    batch = built.prepare([built.format_prompt("what is it?")], image=[images(1)[0]])
    with torch.no_grad():
        want = built(**batch).logits
        got = at2(**batch).logits
        at0 = model(**batch).logits
    assert torch.equal(got, want)
    assert (got - at0).abs().max() > 1e-4  # k changes the computation


def test_with_insert_at_per_modality_and_validation():
    model = make_model("llama", insert_at={"image": 1, "audio": 2}, modalities=("image", "audio"))
    mixed = model.with_insert_at({"audio": 3})
    assert mixed.insert_at == {"image": 1, "audio": 3}
    assert model.insert_at == {"image": 1, "audio": 2}
    with pytest.raises(InputError, match=r"modalities.image.insert_at: must be an integer in \[0, 4\).*got 4"):
        model.with_insert_at({"image": 4})
    with pytest.raises(InputError, match=r"got -1"):
        model.with_insert_at(-1)
    with pytest.raises(InputError, match=r"unknown modalities \['video'\]"):
        model.with_insert_at({"video": 1})
    with pytest.raises(InputError, match="got True"):
        model.with_insert_at({"image": True})


def test_writing_into_the_spec_does_not_change_the_structure():
    model = make_model("llama", insert_at=1)
    model.spec.modalities["image"].insert_at = 3
    assert model.insert_at == {"image": 1}
    model.insert_at["image"] = 2  # a copy
    assert model.insert_at == {"image": 1}


def test_with_insert_at_keeps_train_mode_and_saves_the_new_spec(tmp_path):
    from composer.model import ComposedModel

    model = make_model("llama", insert_at=0).train()
    at3 = model.with_insert_at(3)
    assert at3.training
    at3.save_pretrained(tmp_path / "m")
    back = ComposedModel.from_pretrained(tmp_path / "m")
    assert back.insert_at == {"image": 3}
