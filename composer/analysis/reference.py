"""The Hugging Face reference of a composed model at k = 0: ``LlavaForConditionalGeneration``
built on the model's own tensors.

``compose bench`` times it as its ``hf`` runtime (``composer.analysis.bench``) and the parity
tests (tests/test_parity_hf.py, tests/test_bench_probe.py, tests/test_real_llm.py) compare
composer's logits and greedy tokens with it: one conversion, shared from here. It needs a
llama-family LLM, one CLIP/SigLIP image encoder and a 2-layer MLP projector
(``hf_reference_unsupported`` names what is missing).
"""

from __future__ import annotations

import torch

from composer.errors import InputError


def hf_reference_unsupported(model) -> str | None:
    """Why ``LlavaForConditionalGeneration`` cannot reproduce ``model`` at k = 0 (None: it can)."""
    from composer.adapters import encoder_type_of

    if len(model.encoders) != 1:
        return f"LlavaForConditionalGeneration takes one image modality; this model has {sorted(model.encoders)}"
    (m,) = model.encoders
    et = encoder_type_of(model.encoders[m])
    if et not in ("clip_vision", "siglip_vision"):
        return f"LlavaForConditionalGeneration has no reference for a {et} encoder (CLIP or SigLIP vision only)"
    p = model.spec.modalities[m].projector
    if p.type != "mlp" or p.depth != 2:
        return f"LlavaForConditionalGeneration's projector is a 2-layer MLP; this model's is {p.type}" + (
            f" of depth {p.depth}" if p.type == "mlp" else ""
        )
    if p.patch_pool:
        return "LlavaForConditionalGeneration's projector reads every patch token; this model's pools them (patch_pool)"
    if model.adapter.family != "llama":
        return f"no LlavaForConditionalGeneration reference for a {model.llm.config.model_type} LLM (llama-family only)"
    if any("lora_" in n for n, _ in model.named_parameters()):
        return "the model has unmerged LoRA adapters"
    return None


def llava_state_dict(model, modality: str = "image") -> dict:
    """``model``'s weights under ``LlavaForConditionalGeneration``'s names (same tensors)."""
    rename = {
        f"projectors.{modality}.0.": "model.multi_modal_projector.linear_1.",
        f"projectors.{modality}.2.": "model.multi_modal_projector.linear_2.",
        f"encoders.{modality}.model.": "model.vision_tower.",
        "llm.model.": "model.language_model.",
        "llm.lm_head.": "lm_head.",
    }
    state = {}
    for k, v in model.state_dict().items():
        for a, b in rename.items():
            if k.startswith(a):
                state[b + k[len(a) :]] = v
                break
    return state


def hf_suppress_tokens(model) -> list[int]:
    """Token ids ``hf_reference(model).generate`` must not produce: composer's banned placeholder
    ids and the zero rows added past the LLM's vocabulary."""
    vocab = model.adapter.shape.vocab_size
    extra = range(vocab, max(vocab, *(pid + 1 for pid in model.placeholder_ids.values())))
    return sorted({*model.banned_token_ids, *extra})


def hf_reference(model, attn_implementation: str | None = None):
    """``LlavaForConditionalGeneration`` holding ``model``'s own tensors (no copy), in eval mode,
    set up to generate like the bench's other runtimes: no EOS stop (pass
    ``suppress_tokens=hf_suppress_tokens(model)`` to ban the placeholder ids as composer does).
    ``attn_implementation``: the attention of the reference's LLM and encoder ("eager": plain
    matmul + softmax, as the parity tests want it); None: the model's own.
    Raises ``InputError`` when ``hf_reference_unsupported(model)``."""
    from transformers import LlavaForConditionalGeneration

    from composer.adapters.encoder import maybe_no_init

    why = hf_reference_unsupported(model)
    if why:
        raise InputError(f"no HF reference: {why}")
    (m,) = model.encoders
    cfg = _llava_config(model, m, attn_implementation)
    with maybe_no_init(True):
        ref = LlavaForConditionalGeneration(cfg)
    state = llava_state_dict(model, m)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    vocab, ref_vocab = model.adapter.shape.vocab_size, cfg.text_config.vocab_size
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        if ref_vocab > vocab and key in state:
            w = state[key]
            state[key] = torch.cat([w, w.new_zeros(ref_vocab - vocab, w.shape[1])])
    ref.load_state_dict(state, strict=not cfg.tie_word_embeddings, assign=True)  # shares the tensors
    if cfg.tie_word_embeddings:
        ref.tie_weights()
    ref = ref.to(model.device).eval()
    gc_ = ref.generation_config
    gc_.eos_token_id = None  # run exactly max_new_tokens, as the other runtimes do here
    gc_.pad_token_id = model.pad_token_id
    gc_.do_sample = False
    return ref


def _llava_config(model, modality: str, attn_implementation: str | None):
    """The ``LlavaConfig`` of ``model`` (its LLM's and encoder's own configs) for ``hf_reference``."""
    from transformers import LlavaConfig

    enc = model.encoders[modality]
    spec = model.spec.modalities[modality]
    has_cls = enc.has_cls_token and spec.encoder.select == "patch"
    llm_cfg, vis_cfg = model.llm.config, enc.model.config
    # A placeholder id past the LLM's vocabulary (composer never embeds it): HF Llava embeds every
    # input id, so its embedding (and head) get zero rows up to that id, whose logits are
    # suppressed (``hf_suppress_tokens``): the same weights, the same outputs on the real vocabulary.
    ref_vocab = max(model.adapter.shape.vocab_size, model.placeholder_ids[modality] + 1)
    cfg = LlavaConfig(
        text_config={**llm_cfg.to_dict(), "vocab_size": ref_vocab},
        vision_config=vis_cfg.to_dict(),
        image_token_index=model.placeholder_ids[modality],
        image_seq_length=model.num_tokens(modality),
        vision_feature_layer=enc.feature_layer,
        vision_feature_select_strategy="default" if has_cls else "full",
        projector_hidden_act=spec.projector.activation,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(llm_cfg, "tie_word_embeddings", False)),
    )
    cfg.text_config._attn_implementation = attn_implementation or llm_cfg._attn_implementation
    cfg.vision_config._attn_implementation = attn_implementation or vis_cfg._attn_implementation
    return cfg
