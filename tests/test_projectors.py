"""Projectors: LLaVA's mm_projector layout loads as-is; Q-Former (BLIP-2) runs; bad files fail clearly."""

from __future__ import annotations

import pytest
import torch
from helpers import images, spec_dict

from composer.builder import build
from composer.errors import InputError
from composer.projectors import MLPProjector, QFormerProjector
from composer.spec import parse_spec


def _llava_projector_state(in_dim=32, out_dim=64, prefix="model.mm_projector."):
    g = torch.Generator().manual_seed(7)
    return {
        f"{prefix}0.weight": torch.randn(out_dim, in_dim, generator=g),
        f"{prefix}0.bias": torch.randn(out_dim, generator=g),
        f"{prefix}2.weight": torch.randn(out_dim, out_dim, generator=g),
        f"{prefix}2.bias": torch.randn(out_dim, generator=g),
    }


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_llava_mm_projector_file_loads(tmp_path, fmt):
    state = _llava_projector_state()
    path = tmp_path / f"mm_projector.{fmt}"
    if fmt == "bin":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file(state, str(path))
    d = spec_dict("llama", 2)
    d["modalities"]["image"]["projector"]["weights"] = str(path)
    model = build(parse_spec(d))
    proj = model.projectors["image"]
    assert isinstance(proj, MLPProjector)
    assert torch.equal(proj[0].weight, state["model.mm_projector.0.weight"])
    assert torch.equal(proj[2].bias, state["model.mm_projector.2.bias"])


def test_projector_weights_with_wrong_shape_or_keys(tmp_path):
    from safetensors.torch import save_file

    bad_shape = _llava_projector_state(in_dim=48)
    save_file(bad_shape, str(tmp_path / "shape.safetensors"))
    d = spec_dict("llama", 2)
    d["modalities"]["image"]["projector"]["weights"] = str(tmp_path / "shape.safetensors")
    with pytest.raises(InputError, match=r"modalities.image.projector.weights: .*0.weight has shape \(64, 48\)"):
        build(parse_spec(d))
    save_file({"foo": torch.zeros(1)}, str(tmp_path / "keys.safetensors"))
    d["modalities"]["image"]["projector"]["weights"] = str(tmp_path / "keys.safetensors")
    with pytest.raises(InputError, match="keys do not match"):
        build(parse_spec(d))
    (tmp_path / "trunc.safetensors").write_bytes(b"\x10\x00\x00")
    d["modalities"]["image"]["projector"]["weights"] = str(tmp_path / "trunc.safetensors")
    with pytest.raises(InputError, match="cannot read projector weights"):
        build(parse_spec(d))
    d["modalities"]["image"]["projector"]["weights"] = str(tmp_path / "absent.bin")
    with pytest.raises(InputError, match="not found"):
        build(parse_spec(d))


def test_pickled_objects_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"0.weight": Evil()}, tmp_path / "evil.bin")
    d = spec_dict("llama", 2)
    d["modalities"]["image"]["projector"]["weights"] = str(tmp_path / "evil.bin")
    with pytest.raises(InputError, match="cannot read projector weights"):
        build(parse_spec(d))


def test_qformer_projector_generates_with_deepinsert():
    d = spec_dict("opt", 2)
    d["modalities"]["image"]["projector"] = {
        "type": "qformer",
        "num_queries": 8,
        "num_layers": 2,
        "hidden_size": 32,
        "num_heads": 4,
        "intermediate_size": 64,
    }
    model = build(parse_spec(d)).eval()
    assert isinstance(model.projectors["image"], QFormerProjector)
    assert model.num_tokens("image") == 8
    batch = model.prepare([model.format_prompt("q"), model.format_prompt("longer question")], image=list(images(2)))
    assert int((batch["input_ids"] == model.placeholder_ids["image"]).sum()) == 16
    a = model.generate(**batch, max_new_tokens=6, eos_token_id=[])
    b = model.generate(**batch, max_new_tokens=6, eos_token_id=[], use_cache=False)
    assert torch.equal(a, b)
