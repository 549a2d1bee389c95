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


def test_patch_pool_averages_each_block_of_the_patch_grid():
    """``patch_pool: k`` is k x k average pooling of the row-major patch grid (stride k) before the
    MLP: equal to torch's ``avg_pool2d`` on the grid, then the same MLP (fp32; a mean of 4 values and
    two layers of width 64 on O(1) inputs: rounding ~1e-6, bound 1e-5). No parameters: same keys."""
    torch.manual_seed(0)
    pooled, plain = MLPProjector(32, 64, patch_pool=2), MLPProjector(32, 64)
    plain.load_state_dict(pooled.state_dict())
    assert pooled.num_tokens(64) == 16 and list(pooled.state_dict()) == list(plain.state_dict())
    x = torch.randn(3, 64, 32)  # an 8 x 8 patch grid
    grid = x.transpose(1, 2).reshape(3, 32, 8, 8)
    want = plain(torch.nn.functional.avg_pool2d(grid, 2).reshape(3, 32, 16).transpose(1, 2))
    torch.testing.assert_close(pooled(x), want, rtol=0, atol=1e-5)


def test_patch_pool_model_generates_and_its_bundle_verifies(tmp_path):
    """The tiny LLaVA twin (4 x 4 CLIP patches) with ``patch_pool: 2``: 4 image tokens per image,
    cached and uncached greedy tokens equal, and its ONNX bundle passes --verify's checks."""
    from composer.export.exporter import export_onnx
    from composer.export.verify import verify_bundle

    d = spec_dict("llama", 2)
    d["modalities"]["image"]["projector"] = {"type": "mlp", "patch_pool": 2}
    model = build(parse_spec(d)).eval()
    assert model.encoders["image"].num_tokens == 16 and model.num_tokens("image") == 4
    batch = model.prepare([model.format_prompt("q"), model.format_prompt("longer question")], image=list(images(2)))
    assert int((batch["input_ids"] == model.placeholder_ids["image"]).sum()) == 8
    a = model.generate(**batch, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(a, model.generate(**batch, max_new_tokens=6, eos_token_id=[], use_cache=False))
    report = verify_bundle(model, export_onnx(model, tmp_path / "b"))
    assert report["ok"] and report["greedy_match"], report


@pytest.mark.parametrize(
    ("pool", "select", "tokens"), [(3, "patch", 16), (2, "all", 17)], ids=["side-not-divisible", "with-cls"]
)
def test_patch_pool_needs_a_square_grid_its_side_divides(pool, select, tokens):
    from composer.errors import SpecError

    d = spec_dict("llama", 2)
    d["modalities"]["image"]["projector"] = {"type": "mlp", "patch_pool": pool}
    d["modalities"]["image"]["encoder"]["select"] = select
    with pytest.raises(SpecError, match=rf"projector\.patch_pool: {pool} needs .* gives {tokens} tokens"):
        build(parse_spec(d))
    d["modalities"]["image"]["projector"]["patch_pool"] = 1
    with pytest.raises(Exception, match=r"patch_pool: must be >= 2, got 1"):
        parse_spec(d)
