"""Spec validation: valid specs load; every error names the field path and the bad value."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import spec_dict

from composer.errors import SpecError
from composer.spec import LLM_FAMILIES, load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_spec_loads():
    spec = load_spec(ROOT / "specs/tiny/llava.yaml")
    assert spec.modalities["image"].insert_at == 2
    assert spec.modalities["image"].projector.type == "mlp"
    assert spec.llm.tokenizer.type == "byte"
    assert spec.source_dir == (ROOT / "specs/tiny").resolve()


def test_spec_module_imports_no_torch():
    code = "import sys, composer.spec; composer.spec.load_spec(sys.argv[1]); print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code, str(ROOT / "specs/tiny/llava.yaml")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_registries_agree():
    from composer.adapters import ENCODER_ADAPTERS
    from composer.adapters.llm import LLM_ADAPTERS
    from composer.spec import ENCODER_TYPES

    assert set(LLM_FAMILIES) == set(LLM_ADAPTERS)
    assert set(ENCODER_TYPES) == set(ENCODER_ADAPTERS)


def _err(d) -> str:
    with pytest.raises(SpecError) as e:
        parse_spec(d, "s.yaml")
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def _mut(fn):
    d = spec_dict("llama", 1)
    fn(d)
    return d


@pytest.mark.parametrize(
    "mutate,expected",
    [
        (
            lambda d: d["modalities"]["image"].update(insert_at=4),
            "modalities.image.insert_at: must be < the LLM's 4 layers, got 4",
        ),
        (
            lambda d: d["modalities"]["image"].update(insert_at=-1),
            "modalities.image.insert_at: must be >= 0, got -1",
        ),
        (
            lambda d: d["modalities"]["image"].update(insert_at="two"),
            "modalities.image.insert_at: must be an integer",
        ),
        (lambda d: d.update(colour="red"), "colour: unknown field"),
        (lambda d: d["llm"].update(lora_r=3), "llm.lora_r: unknown field"),
        (
            lambda d: d["modalities"]["image"]["projector"].update(type="transformer"),
            "modalities.image.projector: Input tag 'transformer'",
        ),
        (
            lambda d: d["modalities"]["image"]["projector"].update(depth=0),
            "modalities.image.projector.depth: must be >= 1, got 0",
        ),
        (
            lambda d: d["modalities"]["image"]["projector"].update(activation="swish2"),
            "modalities.image.projector.activation: unknown activation 'swish2'",
        ),
        (
            lambda d: d["modalities"]["image"].update(
                projector={"type": "qformer", "hidden_size": 100, "num_heads": 12}
            ),
            "modalities.image.projector.hidden_size: must be divisible by num_heads (12), got 100",
        ),
        (
            lambda d: d.update(prompt={"template": "{instruction}"}),
            "prompt.template: contains none of the placeholders ['<image>']",
        ),
        (
            lambda d: d.update(prompt={"template": "<image> <image> {instruction}"}),
            "prompt.template: placeholder '<image>' appears more than once",
        ),
        (lambda d: d.update(prompt={"template": "<image>"}), "prompt.template: must contain '{instruction}'"),
        (lambda d: d["llm"].update(model="x/y"), "llm: give exactly one of `model`"),
        (
            lambda d: d["llm"]["config"].update(model_type="gpt_neox"),
            "llm.config.model_type: must be one of ['llama', 'mistral', 'qwen2', 'qwen3', 'opt'], got 'gpt_neox'",
        ),
        (
            lambda d: d["llm"]["config"].update(num_hidden_layers=0),
            "llm.config.num_hidden_layers: must be a positive integer up to 2147483647, got 0",
        ),
        (
            lambda d: d["llm"].update(dtype="float64"),
            "llm.dtype: must be 'float32', 'bfloat16' or 'float16', got 'float64'",
        ),
        (lambda d: d["llm"].update(train="sometimes"), "llm.train: must be 'frozen', 'lora' or 'full'"),
        (lambda d: d["llm"].update(lora={"r": 4}), "llm.lora: is set but `train` is not `lora`, got 'frozen'"),
        (
            lambda d: d["modalities"]["image"]["encoder"]["config"].update(model_type="bert"),
            "modalities.image.encoder.config.model_type: not a supported encoder",
        ),
        (
            lambda d: d["modalities"]["image"]["encoder"].update(select="cls"),
            "modalities.image.encoder.select: must be 'patch' or 'all', got 'cls'",
        ),
        (
            lambda d: d["modalities"].update(labels=d["modalities"]["image"]),
            "modalities.labels: modality name must be an identifier",
        ),
        (lambda d: d.update(modalities={}), "modalities: Dictionary should have at least 1 item"),
        (lambda d: d.pop("llm"), "llm: required field is missing"),
    ],
)
def test_errors_name_field_and_value(mutate, expected):
    assert expected in _err(_mut(mutate))


def test_two_modalities_may_not_share_a_placeholder():
    d = spec_dict("llama", 1, modalities=("image", "image2"))
    d["modalities"]["image2"]["placeholder"] = "<image>"
    assert "modalities.image2.placeholder: already used by modality 'image'" in _err(d)


def test_file_errors(tmp_path):
    cases = {
        "missing.yaml": (None, "spec file not found"),
        "bad.yaml": (b"name: [unclosed\n", "invalid YAML at line"),
        "list.yaml": (b"- a\n- b\n", "the spec must be a YAML mapping, got list"),
        "latin1.yaml": ("name: caf\xe9\n".encode("latin-1"), "not UTF-8"),
        "tag.yaml": (b"name: !!python/object/apply:os.system ['echo hi']\n", "invalid YAML"),
        "big.yaml": (b"# " + b"x" * (1 << 20) + b"\n", "larger than"),
    }
    for name, (content, expected) in cases.items():
        p = tmp_path / name
        if content is not None:
            p.write_bytes(content)
        with pytest.raises(SpecError) as e:
            load_spec(p)
        assert expected in str(e.value) and str(p) in str(e.value), (name, str(e.value))


def test_round_trip_through_yaml(tmp_path):
    spec = parse_spec(spec_dict("opt", 2))
    p = tmp_path / "s.yaml"
    p.write_text(spec.to_yaml())
    again = load_spec(p)
    assert again.model_dump() == spec.model_dump()
    assert yaml.safe_load(p.read_text())["modalities"]["image"]["insert_at"] == 2


def test_a_spec_without_a_prompt_section_is_valid_and_formats_without_a_template():
    from composer.builder import build

    d = spec_dict()
    d.pop("prompt")
    spec = parse_spec(d)
    assert spec.prompt is None
    model = build(spec)
    assert model.prompt_template is None
    assert model.format_prompt("What is it?") == "<image>\nWhat is it?"  # the byte tokenizer has no chat template
    batch = model.prepare([model.format_prompt("What is it?")], image=[torch.zeros(3, 32, 32)])
    assert int((batch["input_ids"] == model.placeholder_ids["image"]).sum()) == model.num_tokens("image")


def test_an_absurd_size_names_the_field():
    """vocab_size 10**30 is one error naming llm.config.vocab_size and its allowed range."""
    d = spec_dict()
    d["llm"]["config"]["vocab_size"] = 10**30
    with pytest.raises(SpecError, match=r"llm.config.vocab_size: must be a positive integer up to 2147483647, got 1"):
        parse_spec(d)
