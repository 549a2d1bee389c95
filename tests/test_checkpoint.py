"""save_pretrained -> from_pretrained reloads bit-identically; real HF loading code paths work
on locally saved tiny checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import CLIP, LLAMA, images, make_model, spec_dict

from composer.builder import build
from composer.errors import InputError
from composer.model import ComposedModel
from composer.spec import parse_spec


def _logits(model, seed=0):
    batch = model.prepare(
        [model.format_prompt("what is it"), model.format_prompt("and this?")], image=list(images(2, seed=seed))
    )
    with torch.no_grad():
        return model(**batch).logits, model.generate(**batch, max_new_tokens=6, eos_token_id=[])


@pytest.mark.parametrize("family,k", [("llama", 2), ("opt", 1), ("qwen3", 0)])
def test_round_trip_is_bit_identical(tmp_path, family, k):
    model = make_model(family, insert_at=k)
    model.save_pretrained(tmp_path / "ckpt")
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == [
        "composer.json",
        "generation_config.json",
        "model.safetensors",
        "processors",
        "spec.yaml",
        "tokenizer",
    ]
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in (tmp_path / "ckpt").rglob("*"))
    again = ComposedModel.from_pretrained(tmp_path / "ckpt")
    for (a_name, a), (b_name, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert a_name == b_name and torch.equal(a, b), a_name
    (l1, g1), (l2, g2) = _logits(model), _logits(again)
    assert torch.equal(l1, l2) and torch.equal(g1, g2)


def test_lora_model_round_trip(tmp_path):
    d = spec_dict("llama", 2)
    d["llm"].update(train="lora", lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]})
    model = build(parse_spec(d)).eval()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable)
    assert not any(n.startswith("llm.") and "lora_" not in n for n in trainable)
    with torch.no_grad():  # make LoRA matter (B is zero-initialised)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    model.save_pretrained(tmp_path / "c")
    again = ComposedModel.from_pretrained(tmp_path / "c")
    assert torch.equal(_logits(model)[0], _logits(again)[0])


def test_save_refuses_non_empty_dir_and_overwrite_replaces(tmp_path):
    model = make_model("llama", 1)
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        model.save_pretrained(out)
    assert (out / "keep.txt").exists()
    model.save_pretrained(out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp dirs left behind


def test_corrupt_or_foreign_checkpoints_give_clear_errors(tmp_path):
    model = make_model("llama", 1)
    model.save_pretrained(tmp_path / "a")
    w = tmp_path / "a" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(InputError, match="model.safetensors"):
        ComposedModel.from_pretrained(tmp_path / "a")
    with pytest.raises(InputError, match="not a composer checkpoint"):
        ComposedModel.from_pretrained(tmp_path)
    model.save_pretrained(tmp_path / "b")
    meta = json.loads((tmp_path / "b" / "composer.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "b" / "composer.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="format_version"):
        ComposedModel.from_pretrained(tmp_path / "b")


def _local_sources(tmp_path, **llm):
    """HF checkpoints of a tiny Llama (byte tokenizer) and CLIP ViT saved in ``tmp_path``, and a
    spec file there naming them as relative `llm.model` / `encoder.model` dirs."""
    from transformers import AutoModelForCausalLM, CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel, LlamaConfig

    from composer.tokenizer import byte_tokenizer

    torch.manual_seed(0)
    hf_llm = AutoModelForCausalLM.from_config(LlamaConfig(**{k: v for k, v in LLAMA.items() if k != "model_type"}))
    hf_llm.save_pretrained(tmp_path / "llm")
    byte_tokenizer().save_pretrained(tmp_path / "llm")
    hf_vit = CLIPVisionModel(CLIPVisionConfig(**{k: v for k, v in CLIP.items() if k != "model_type"}))
    hf_vit.save_pretrained(tmp_path / "vit")
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "vit"
    )
    d = spec_dict("llama", 2)
    d["llm"] = {"model": "llm", "attn_implementation": "eager", **llm}
    d["modalities"]["image"]["encoder"] = {"model": "vit", "feature_layer": -2}
    (tmp_path / "spec.yaml").write_text(__import__("yaml").safe_dump(d))
    return tmp_path / "spec.yaml", hf_llm, hf_vit


def test_builds_from_locally_saved_hf_checkpoints(tmp_path):
    """`llm.model` / `encoder.model` as local dirs (the real loading path, here offline)."""
    spec, hf_llm, hf_vit = _local_sources(tmp_path)
    model = build(spec)  # relative dirs resolve against the spec file
    assert torch.equal(
        model.llm.model.layers[0].self_attn.q_proj.weight, hf_llm.model.layers[0].self_attn.q_proj.weight
    )
    assert torch.equal(
        model.encoders["image"].model.embeddings.patch_embedding.weight, hf_vit.embeddings.patch_embedding.weight
    )
    model.save_pretrained(tmp_path / "out")
    again = ComposedModel.from_pretrained(tmp_path / "out")
    assert torch.equal(_logits(model.eval())[0], _logits(again)[0])


def test_trainable_only_checkpoint_rebuilds_the_frozen_parts_from_their_sources(tmp_path):
    """`weights="trainable"` saves the LoRA adapters and the projector only
    (the LLM and ViT come from their local sources, named relative to the original spec's dir);
    loading rebuilds the model from the sources and is bit-identical to the saved model, with
    changed (trained) LoRA and projector weights; removing a source is an error naming it."""
    spec, _, _ = _local_sources(
        tmp_path, train="lora", lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    )
    model = build(spec).eval()
    with torch.no_grad():  # stand-in for training: every trainable tensor moves
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    full = model.save_pretrained(tmp_path / "full")
    small = model.save_pretrained(tmp_path / "small", weights="trainable")
    from safetensors import safe_open

    with safe_open(str(small / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys and all("lora_" in k or k.startswith("projectors.") for k in keys)
    assert keys == {n for n, p in model.named_parameters() if p.requires_grad}
    assert (small / "model.safetensors").stat().st_size < 0.2 * (full / "model.safetensors").stat().st_size
    again = ComposedModel.from_pretrained(small)
    sa, sb = model.state_dict(), again.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(_logits(model)[1], _logits(again)[1])
    import shutil

    shutil.rmtree(tmp_path / "vit")
    with pytest.raises(InputError, match=r"modalities.image.encoder"):
        ComposedModel.from_pretrained(small)


def test_missing_local_model_dir_is_a_clear_error(tmp_path):
    d = spec_dict("llama", 1)
    d["llm"] = {"model": str(tmp_path / "nope")}
    with pytest.raises(InputError, match=r"llm.model: cannot load"):
        build(parse_spec(d))


def test_tied_embeddings_llama_round_trip(tmp_path):
    d = spec_dict("llama", 2)
    d["llm"]["config"]["tie_word_embeddings"] = True
    model = build(parse_spec(d)).eval()
    assert model.llm.lm_head.weight is model.llm.model.embed_tokens.weight
    model.save_pretrained(tmp_path / "c")
    again = ComposedModel.from_pretrained(tmp_path / "c")
    assert again.llm.lm_head.weight is again.llm.model.embed_tokens.weight
    assert torch.equal(_logits(model)[0], _logits(again)[0])


def test_sharded_save_reloads_bit_identically_and_bad_indexes_are_named(tmp_path):
    """Past max_shard_size the weights are written as Hugging Face shards
    (model-0000i-of-0000N.safetensors + model.safetensors.index.json, huggingface_hub's writer),
    reload bit-identically (tied embeddings included), and a broken index is one error naming it."""
    d = spec_dict("llama", 2)
    d["llm"]["config"]["tie_word_embeddings"] = True
    model = build(parse_spec(d)).eval()
    out = model.save_pretrained(tmp_path / "c", max_shard_size="100KB")
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    again = ComposedModel.from_pretrained(out)
    assert again.llm.lm_head.weight is again.llm.model.embed_tokens.weight
    for (a_name, a), (b_name, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert a_name == b_name and torch.equal(a, b), a_name
    assert torch.equal(_logits(model)[1], _logits(again)[1])

    def broken(name: str, edit) -> str:
        c = tmp_path / name
        import shutil

        shutil.copytree(out, c)
        edit(c)
        with pytest.raises(InputError) as e:
            ComposedModel.from_pretrained(c)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert (
        broken("gone", lambda c: (c / shards[1]).unlink())
        == f"{tmp_path / 'gone' / shards[1]}: missing (listed in model.safetensors.index.json)"
    )

    def escape(c):
        idx = json.loads((c / "model.safetensors.index.json").read_text())
        idx["weight_map"][next(iter(idx["weight_map"]))] = "../../etc/passwd"
        (c / "model.safetensors.index.json").write_text(json.dumps(idx))

    assert "'../../etc/passwd' is not a shard name" in broken("escape", escape)
    assert "not a weights index" in broken("garbled", lambda c: (c / "model.safetensors.index.json").write_text("{"))

    def dropped(c):  # a shard left out of the index: its tensors are missing
        idx = json.loads((c / "model.safetensors.index.json").read_text())
        idx["weight_map"] = {k: v for k, v in idx["weight_map"].items() if v != shards[0]}
        (c / "model.safetensors.index.json").write_text(json.dumps(idx))

    assert "does not match the spec (missing" in broken("dropped", dropped)
    with pytest.raises(InputError, match="max_shard_size"):
        model.save_pretrained(tmp_path / "bad", max_shard_size="lots")
    assert not (tmp_path / "bad").exists()
