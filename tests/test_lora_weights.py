"""Trained LoRA adapters in a spec (`lora.weights`, `lora.layers`): a peft adapter written by peft's
own ``save_pretrained`` loads into the composed LLM and computes what peft's ``PeftModel`` computes;
bad files are refused naming the field, the file and the first difference."""

from __future__ import annotations

import pytest
import torch
from helpers import run_cli, spec_dict
from safetensors.torch import save_file

from composer.builder import build
from composer.errors import InputError, SpecError
from composer.spec import parse_spec

# peft's get_peft_model asks transformers a deprecated question (`is_gradient_checkpointing`)
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"], "layers": [2, 3]}


def lora_spec(**lora) -> dict:
    d = spec_dict(insert_at=2)
    d["llm"]["train"] = "lora"
    d["llm"]["lora"] = {**LORA, **lora}
    return d


@pytest.fixture
def peft_adapter(tmp_path):
    """A peft ``PeftModel`` over the tiny spec's LLM (same seed: same base weights), its adapters
    random (B nonzero, so they change the output), saved by peft into tmp_path/adapter."""
    from peft import LoraConfig, get_peft_model

    base = build(parse_spec(spec_dict(insert_at=2))).llm
    cfg = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA["target_modules"], layers_to_transform=[2, 3]
    )
    ref = get_peft_model(base, cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ref.save_pretrained(str(tmp_path / "adapter"))
    return ref, tmp_path / "adapter"


def test_lora_layers_restrict_the_adapters_to_those_layers():
    model = build(parse_spec(lora_spec()))
    layers = {int(n.split("layers.")[1].split(".")[0]) for n, _ in model.llm.named_parameters() if "lora_" in n}
    assert layers == {2, 3}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or n.startswith("projectors.") for n in trainable)


def test_lora_layers_past_the_llm_are_refused_with_the_field():
    with pytest.raises(SpecError, match=r"llm\.lora\.layers: must be < the LLM's 4 layers, got \[2, 7\]"):
        build(parse_spec(lora_spec(layers=[2, 7])))


@pytest.mark.parametrize("form", ["dir", "file"])
def test_adapter_saved_by_peft_loads_and_matches_peft(peft_adapter, tmp_path, form):
    ref, adapter_dir = peft_adapter
    where = adapter_dir if form == "dir" else adapter_dir / "adapter_model.safetensors"
    model = build(parse_spec(lora_spec(weights=str(where)))).eval()
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model.llm(input_ids=ids).logits, ref(input_ids=ids).logits
        untrained = build(parse_spec(lora_spec())).eval().llm(input_ids=ids).logits
    # the same fp32 operations in the same order; 1e-6 leaves room only for kernel choice
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (got - untrained).abs().max() > 1e-3  # the adapters were loaded, not left at B = 0


def test_relative_weights_path_resolves_next_to_the_spec(peft_adapter, tmp_path):
    import yaml

    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(lora_spec(weights="adapter")))
    model = build(tmp_path / "spec.yaml")
    ref, _ = peft_adapter
    want = {n: p for n, p in ref.named_parameters() if "lora_" in n}
    got = {n: p for n, p in model.llm.named_parameters() if "lora_" in n}
    assert len(got) == len(want) == 12
    for n, p in got.items():
        assert torch.equal(p, want[f"base_model.model.{n}"]), n


@pytest.mark.parametrize(
    ("lora", "message"),
    [
        (  # a different rank: the first misshapen tensor, by name
            {"r": 8},
            r"llm\.lora\.weights: .*adapter_model\.safetensors: model\.layers\.2\.mlp\.down_proj\.lora_A\.weight "
            r"has shape \(4, 128\), the spec's LoRA needs \(8, 128\)",
        ),
        (  # other layers: the missing and the unexpected keys
            {"layers": [1, 2]},
            r"keys do not match the spec's LoRA \(missing \['model\.layers\.1\..*"
            r"unexpected \['model\.layers\.3\..*check r, target_modules and layers",
        ),
    ],
    ids=["rank", "layers"],
)
def test_an_adapter_for_another_lora_is_refused_naming_the_difference(peft_adapter, lora, message):
    _, adapter_dir = peft_adapter
    with pytest.raises(InputError, match=message):
        build(parse_spec(lora_spec(**lora, weights=str(adapter_dir))))


def test_missing_and_corrupt_files_are_refused(tmp_path):
    with pytest.raises(InputError, match=r"nothing\.safetensors: LoRA weights file not found"):
        build(parse_spec(lora_spec(weights=str(tmp_path / "nothing.safetensors"))))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty/adapter_model\.safetensors: LoRA weights file not found"):
        build(parse_spec(lora_spec(weights=str(tmp_path / "empty"))))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(InputError, match=r"bad\.safetensors: cannot read LoRA weights"):
        build(parse_spec(lora_spec(weights=str(bad))))


def test_compose_build_exits_2_on_a_mismatched_adapter(tmp_path):
    import yaml

    save_file({"model.layers.2.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64)}, str(tmp_path / "a.safetensors"))
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(lora_spec(weights="a.safetensors")))
    r = run_cli("build", tmp_path / "spec.yaml", "-o", tmp_path / "out")
    assert r.returncode == 2, r.stderr
    assert "llm.lora.weights" in r.stderr and "missing" in r.stderr
    assert not (tmp_path / "out").exists()
