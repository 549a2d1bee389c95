"""insert_at: 0 reproduces the classic models of Hugging Face built from the same weights."""

from __future__ import annotations

import pytest
import torch
from helpers import ATTENTION, CLIP, LLAMA, OPT, eager, images, make_model, positions_ref

from composer.analysis.reference import hf_reference

# fp32, max abs logit difference: both sides compute the same function in other operation orders;
# fp32 rounds each operation to 2^-24 (6e-8) relative, these tiny random models' dot products are <=
# 128 long (a typical sum's rounding ~sqrt(128) * 6e-8 = 7e-7 of its size) and their logits are
# below 1, so a handful of layers stays near 1e-6, 10x under the bound
TOL = 1e-5


def _check_llava_config(cfg) -> None:
    """The reference's config, read from the composed model, is the test models' own (helpers'
    LLAMA and CLIP, the spec's feature layer -2 with its CLS token dropped, a GELU projector)."""
    assert {k: getattr(cfg.text_config, k) for k in LLAMA if k != "model_type"} == {
        k: v for k, v in LLAMA.items() if k != "model_type"
    }
    assert {k: getattr(cfg.vision_config, k) for k in CLIP if k != "model_type"} == {
        k: v for k, v in CLIP.items() if k != "model_type"
    }
    assert (cfg.vision_feature_layer, cfg.vision_feature_select_strategy) == (-2, "default")
    assert cfg.projector_hidden_act == "gelu"


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("attn", ATTENTION)
def test_insert_at_0_matches_hf_llava(padding_side, attn):
    model = make_model("llama", insert_at=0, attn_implementation=attn)
    assert model.llm.config._attn_implementation == attn  # the reference runs eager
    ref = hf_reference(model, attn_implementation="eager")
    _check_llava_config(ref.config)
    prompts = [model.format_prompt("What is in the picture?"), model.format_prompt("Hi")]
    batch = model.prepare(prompts, image=list(images(2)), padding_side=padding_side)
    mask = batch["attention_mask"]
    assert (mask == 0).any(), "the batch must contain padding"
    with torch.no_grad(), eager(ref):
        ours = model(**batch).logits
        theirs = ref(
            input_ids=batch["input_ids"],
            attention_mask=mask,
            pixel_values=batch["image"],
            position_ids=positions_ref(mask),
        ).logits
    real = mask.bool()
    diff = (ours - theirs).abs()[real].max().item()
    assert diff < TOL, diff


@pytest.mark.parametrize("attn", ATTENTION)
def test_insert_at_0_opt_matches_hf_opt_with_spliced_embeddings(attn):
    """OPT (learned positions): our k=0 equals OPTForCausalLM fed the spliced input embeddings."""
    from transformers import OPTConfig, OPTForCausalLM

    model = make_model("opt", insert_at=0, attn_implementation=attn)
    ref = OPTForCausalLM(OPTConfig(**{k: v for k, v in OPT.items() if k != "model_type"})).eval()
    ref.config._attn_implementation = "eager"
    ref.load_state_dict({k[len("llm.") :]: v for k, v in model.state_dict().items() if k.startswith("llm.")})
    batch = model.prepare(
        [model.format_prompt("a longer question here"), model.format_prompt("q")], image=list(images(2, seed=3))
    )
    ids, mask = batch["input_ids"], batch["attention_mask"]
    slots = ids == model.placeholder_ids["image"]
    with torch.no_grad(), eager(ref):
        emb = ref.get_input_embeddings()(ids.masked_fill(slots, 0))
        emb[slots] = model.encode("image", batch["image"]).reshape(-1, emb.shape[-1])
        theirs = ref(inputs_embeds=emb, attention_mask=mask).logits
        ours = model(**batch).logits
    diff = (ours - theirs).abs()[mask.bool()].max().item()
    assert diff < TOL, diff


def test_a_list_of_feature_layers_matches_hf_llava():
    """``feature_layer: [0, -2]`` (CLIP's embeddings and penultimate layer side by side, the
    projector twice as wide in) equals HF Llava with the same ``vision_feature_layer`` list."""
    from helpers import parse_spec, spec_dict

    from composer.builder import build

    d = spec_dict("llama", 0)
    d["modalities"]["image"]["encoder"]["feature_layer"] = [0, -2]
    model = build(parse_spec(d)).eval()
    enc = model.encoders["image"]
    assert enc.hidden_size == 2 * CLIP["hidden_size"]
    ref = hf_reference(model, attn_implementation="eager")
    assert ref.config.vision_feature_layer == [0, -2]
    batch = model.prepare([model.format_prompt("What is in the picture?")], image=list(images(1)))
    with torch.no_grad(), eager(ref):
        ours = model(**batch).logits
        theirs = ref(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["image"],
            position_ids=positions_ref(batch["attention_mask"]),
        ).logits
    diff = (ours - theirs).abs().max().item()
    assert diff < TOL, diff
