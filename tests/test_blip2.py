"""BLIP-2 seed system (specs/tiny/blip2.yaml): the tiny twin trains and generates; at insert_at 0
it equals transformers' Blip2ForConditionalGeneration built from the same weights; a whole
BLIP-2 checkpoint feeds the vision tower and the Q-Former; the ONNX bundle verifies."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ATTENTION, eager, images, positions_ref

from composer.builder import build
from composer.errors import InputError
from composer.spec import parse_spec

ROOT = Path(__file__).resolve().parents[1]
TINY = yaml.safe_load((ROOT / "specs/tiny/blip2.yaml").read_text())
# fp32, max abs logit difference: both sides compute the same function in other operation orders;
# fp32 rounds each operation to 2^-24 (6e-8) relative, these tiny random models' dot products are <=
# 128 long (a typical sum's rounding ~sqrt(128) * 6e-8 = 7e-7 of its size) and their logits are
# below 1, so a handful of layers stays near 1e-6, 10x under the bound
TOL = 1e-5


def _spec(insert_at: int | None = None, attn: str = "eager", **image) -> dict:
    """The tiny twin as a dict (eager attention, as the reference, unless ``attn``); ``image``
    overrides ``modalities.image.{encoder,projector}`` fields."""
    d = copy.deepcopy(TINY)
    d["llm"]["attn_implementation"] = attn
    mod = d["modalities"]["image"]
    if insert_at is not None:
        mod["insert_at"] = insert_at
    for part, fields in image.items():
        mod[part] = {**mod[part], **fields}
    return d


def _hf_config(image_token_id: int):
    """Blip2Config with the tiny twin's architecture."""
    from transformers import Blip2Config

    mod = TINY["modalities"]["image"]
    q = mod["projector"]
    qformer = {
        "hidden_size": q["hidden_size"],
        "num_hidden_layers": q["num_layers"],
        "num_attention_heads": q["num_heads"],
        "intermediate_size": q["intermediate_size"],
        "cross_attention_frequency": q["cross_attention_frequency"],
        "encoder_hidden_size": mod["encoder"]["config"]["hidden_size"],
    }
    cfg = Blip2Config(
        vision_config=mod["encoder"]["config"],
        qformer_config=qformer,
        text_config=TINY["llm"]["config"],
        num_query_tokens=q["num_queries"],
        image_token_index=image_token_id,
    )
    cfg.text_config._attn_implementation = "eager"
    return cfg


def _hf_blip2(model):
    """Blip2ForConditionalGeneration holding ``model``'s weights (keys renamed, loaded strictly)."""
    from transformers import Blip2ForConditionalGeneration

    ref = Blip2ForConditionalGeneration(_hf_config(model.placeholder_ids["image"])).eval()
    rename = {"encoders.image.model.": "vision_model.", "projectors.image.": "", "llm.": "language_model."}
    state = {}
    for k, v in model.state_dict().items():
        a = next(a for a in rename if k.startswith(a))
        state[rename[a] + k[len(a) :]] = v
    missing, unexpected = ref.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    return ref


def _batch(model, padding_side: str = "left"):
    prompts = [model.format_prompt("What shape is in the picture?"), model.format_prompt("Hi")]
    batch = model.prepare(prompts, image=list(images(2, seed=5)), padding_side=padding_side)
    assert (batch["attention_mask"] == 0).any(), "the batch must contain padding"
    return batch


def _hf_logits(ref, batch) -> torch.Tensor:
    mask = batch["attention_mask"]
    with torch.no_grad(), eager(ref):
        return ref(
            input_ids=batch["input_ids"],
            attention_mask=mask,
            pixel_values=batch["image"],
            position_ids=positions_ref(mask),
        ).logits


def _max_diff(ours, theirs, mask) -> float:
    return (ours - theirs).abs()[mask.bool()].max().item()


def test_tiny_twin_trains_generates_and_reloads(tmp_path):
    from composer.model import ComposedModel

    model = build(parse_spec(_spec())).eval()
    assert model.insert_at == {"image": 1}
    assert model.encoders["image"].num_tokens == 17 and model.num_tokens("image") == 8  # CLS kept; 8 queries
    batch = _batch(model)
    out = model(**batch, labels=batch["input_ids"])
    assert torch.isfinite(out.loss) and out.logits.shape == (*batch["input_ids"].shape, 272)
    out.loss.backward()
    assert model.projectors["image"].query_tokens.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.encoders["image"].parameters())  # frozen tower
    cached = model.generate(**batch, max_new_tokens=8, eos_token_id=[])
    uncached = model.generate(**batch, max_new_tokens=8, eos_token_id=[], use_cache=False)
    assert cached.shape == (2, 8) and torch.equal(cached, uncached)
    reloaded = ComposedModel.from_pretrained(model.save_pretrained(tmp_path / "ckpt"))
    assert torch.equal(reloaded.generate(**batch, max_new_tokens=8, eos_token_id=[]), cached)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("attn", ATTENTION)
def test_insert_at_0_matches_hf_blip2(padding_side, attn):
    model = build(parse_spec(_spec(insert_at=0, attn=attn))).eval()
    assert model.llm.config._attn_implementation == attn  # the reference runs eager
    ref = _hf_blip2(model)
    batch = _batch(model, padding_side)
    with torch.no_grad():
        feats = model.encoders["image"](batch["image"])
        assert torch.equal(
            feats, ref.vision_model(pixel_values=batch["image"]).last_hidden_state
        )  # the Q-Former's input
        ours = model(**batch).logits
    diff = _max_diff(ours, _hf_logits(ref, batch), batch["attention_mask"])
    assert diff < TOL, diff


@pytest.fixture(scope="module")
def blip2_checkpoint(tmp_path_factory):
    """A tiny Blip2ForConditionalGeneration saved as BLIP-2 publishes it (weights, config,
    preprocessor) in one file (``blip2/``) and in 10 shards (``sharded/``), as a torch state
    dict (``whole.bin``), and its OPT language model saved on its own (``opt/``)."""
    from transformers import Blip2ForConditionalGeneration, BlipImageProcessorPil

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(11)
    ref = Blip2ForConditionalGeneration(_hf_config(image_token_id=260)).eval()
    with torch.no_grad():
        ref.query_tokens.normal_()  # transformers initialises them to zeros
    size = TINY["modalities"]["image"]["encoder"]["config"]["image_size"]
    for name, shard in (("blip2", "5GB"), ("sharded", "100KB")):
        ref.save_pretrained(root / name, max_shard_size=shard)
        BlipImageProcessorPil(size={"height": size, "width": size}).save_pretrained(root / name)
    assert (root / "sharded/model.safetensors.index.json").is_file()
    torch.save(ref.state_dict(), root / "whole.bin")
    ref.language_model.save_pretrained(root / "opt")
    return root, ref


def _from_checkpoint(root: Path, encoder: str, weights: str, **projector) -> dict:
    """Encoder from ``root/encoder``, projector weights from ``root/weights`` (or a Hub id)."""
    d = _spec(
        insert_at=0, projector={"weights": str(root / weights) if (root / weights).exists() else weights, **projector}
    )
    enc = d["modalities"]["image"]["encoder"]
    d["modalities"]["image"]["encoder"] = {
        "model": str(root / encoder),
        "feature_layer": enc["feature_layer"],
        "train": "frozen",
    }
    d["llm"] = {"model": str(root / "opt"), "tokenizer": {"type": "byte"}, "attn_implementation": "eager"}
    return d


@pytest.mark.parametrize(
    ("encoder", "weights"),
    [("blip2", "blip2"), ("blip2", "blip2/model.safetensors"), ("sharded", "sharded"), ("sharded", "whole.bin")],
)
def test_whole_blip2_checkpoint_loads(blip2_checkpoint, encoder, weights):
    root, ref = blip2_checkpoint
    model = build(parse_spec(_from_checkpoint(root, encoder, weights))).eval()
    assert model.placeholder_ids["image"] == ref.config.image_token_index
    tower, proj = model.encoders["image"].model.state_dict(), model.projectors["image"].state_dict()
    assert tower.keys() == ref.vision_model.state_dict().keys()
    assert all(torch.equal(v, ref.vision_model.state_dict()[k]) for k, v in tower.items())
    assert all(
        torch.equal(v, ref.state_dict()[k]) for k, v in proj.items()
    )  # query_tokens, qformer.*, language_projection.*
    batch = _batch(model)
    with torch.no_grad():
        ours = model(**batch).logits
    diff = _max_diff(ours, _hf_logits(ref, batch), batch["attention_mask"])
    assert diff < TOL, diff


def test_projector_weights_from_a_hub_repo_take_only_the_needed_shards(blip2_checkpoint, tmp_path, monkeypatch):
    """A Hub id (here served offline from a local HF cache) reads the index, then only the
    shards that hold query_tokens / qformer.* / language_projection.*."""
    import shutil

    from huggingface_hub import constants

    root, ref = blip2_checkpoint
    snapshot = tmp_path / "models--tiny--blip2" / "snapshots" / ("0" * 40)
    shutil.copytree(root / "sharded", snapshot)
    (tmp_path / "models--tiny--blip2" / "refs").mkdir()
    (tmp_path / "models--tiny--blip2" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    weight_map = json.loads((snapshot / "model.safetensors.index.json").read_text())["weight_map"]
    needed = {f for k, f in weight_map.items() if k.split(".")[0] in ("query_tokens", "qformer", "language_projection")}
    unneeded = set(weight_map.values()) - needed
    assert unneeded
    for f in unneeded:
        (snapshot / f).unlink()  # a download of these would fail: the cache lacks them
    model = build(parse_spec(_from_checkpoint(root, "blip2", "tiny/blip2")))
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in model.projectors["image"].state_dict().items())


def test_checkpoint_errors_name_the_file(blip2_checkpoint, tmp_path):
    root, _ = blip2_checkpoint
    with pytest.raises(
        InputError, match=r"modalities.image.projector.weights: .*opt.*missing \['language_projection.bias'"
    ):
        build(parse_spec(_from_checkpoint(root, "blip2", "opt")))  # an OPT checkpoint holds no Q-Former
    with pytest.raises(
        InputError,
        match=r"projector.weights: .*blip2.*query_tokens has shape \(1, 8, 32\), the projector needs \(1, 4, 32\)",
    ):
        build(parse_spec(_from_checkpoint(root, "blip2", "blip2", num_queries=4)))
    # a whole-model checkpoint without its vision tower
    from safetensors.torch import load_file, save_file

    (tmp_path / "config.json").write_text((root / "blip2/config.json").read_text())
    state = load_file(str(root / "blip2/model.safetensors"))
    save_file(
        {k: v for k, v in state.items() if not k.startswith("vision_model.")}, str(tmp_path / "model.safetensors")
    )
    d = _from_checkpoint(root, "blip2", "blip2")
    d["modalities"]["image"]["encoder"]["model"] = str(tmp_path)
    with pytest.raises(
        InputError, match=r"modalities.image.encoder.model: .*no vision tower tensors \['vision_model\."
    ):
        build(parse_spec(d))
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "blip-2"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from composer.export.exporter import export_onnx

    model = build(parse_spec(_spec())).eval()
    return model, export_onnx(model, tmp_path_factory.mktemp("onnx") / "bundle")


@pytest.mark.slow
def test_onnx_bundle_verifies(exported):
    from composer.export.verify import verify_bundle

    model, bundle = exported
    assert (bundle / "encoder.image.onnx").is_file()
    report = verify_bundle(model, bundle)
    assert report["ok"] and report["greedy_match"], report
    assert max(report["graphs"].values()) < 1e-4 and report["prefill_logits"] < 1e-4
