"""Cached generation (two KV caches: text-only for [0,k), full for [k,N)) equals full
recomputation token for token; sampling and stopping behave."""

from __future__ import annotations

import pytest
import torch
from helpers import ROOT, images, make_model

from composer.model import ComposedModel

N_NEW = 12


def _batch(model, two_modalities=False):
    prompts = [model.format_prompt("tell me a long story about it"), model.format_prompt("hi")]
    items = {"image": list(images(2, seed=5))}
    if two_modalities:
        items["image2"] = list(images(2, seed=6))
    return model.prepare(prompts, padding_side="left", **items)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "opt"])
@pytest.mark.parametrize("k", [0, 2, 3])
def test_cached_equals_uncached_greedy(family, k):
    model = make_model(family, insert_at=k)
    batch = _batch(model)
    assert (batch["attention_mask"] == 0).any()
    cached = model.generate(**batch, max_new_tokens=N_NEW, eos_token_id=[])
    full = model.generate(**batch, max_new_tokens=N_NEW, eos_token_id=[], use_cache=False)
    assert cached.shape == (2, N_NEW)
    assert torch.equal(cached, full)


def test_cached_equals_uncached_two_modalities_at_different_layers():
    model = make_model("llama", insert_at={"image": 1, "image2": 3}, modalities=("image", "image2"))
    batch = _batch(model, two_modalities=True)
    cached = model.generate(**batch, max_new_tokens=N_NEW, eos_token_id=[])
    full = model.generate(**batch, max_new_tokens=N_NEW, eos_token_id=[], use_cache=False)
    assert torch.equal(cached, full)


def test_batched_generation_equals_one_prompt_at_a_time():
    model = make_model("llama", insert_at=2)
    batch = _batch(model)
    both = model.generate(**batch, max_new_tokens=N_NEW, eos_token_id=[])
    for i in range(2):
        one = model.prepare(
            [[model.format_prompt("tell me a long story about it"), model.format_prompt("hi")][i]],
            image=[batch["image"][i]],
        )
        assert torch.equal(model.generate(**one, max_new_tokens=N_NEW, eos_token_id=[])[0], both[i])


def test_cache_lengths_per_stage():
    """Layers < k cache text tokens only; layers >= k cache everything."""
    from composer.layout import KVState
    from composer.model import _new_cache

    k = 2
    model = make_model("llama", insert_at=k)
    batch = model.prepare([model.format_prompt("q")], image=[images(1)[0]])
    state = KVState(cache=_new_cache(), key_slot=[], key_ok=[], next_slot=0, next_pos=None)
    with torch.no_grad():
        model._prefill(batch["input_ids"], batch["attention_mask"], {"image": batch["image"]}, state)
    L = batch["input_ids"].shape[1]
    n_mm = model.num_tokens("image")
    for i in range(model.num_layers):
        assert state.cache.get_seq_length(i) == (L - n_mm if i < k else L)


def test_sampling_cached_equals_uncached_with_same_generator():
    model = make_model("llama", insert_at=2)
    batch = _batch(model)
    kw = dict(max_new_tokens=N_NEW, eos_token_id=[], do_sample=True, temperature=0.7, top_k=50, top_p=0.9)
    a = model.generate(**batch, generator=torch.Generator().manual_seed(1), **kw)
    b = model.generate(**batch, generator=torch.Generator().manual_seed(1), use_cache=False, **kw)
    c = model.generate(**batch, generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_top_k_1_sampling_is_greedy():
    model = make_model("llama", insert_at=2)
    batch = _batch(model)
    greedy = model.generate(**batch, max_new_tokens=N_NEW, eos_token_id=[])
    sampled = model.generate(
        **batch,
        max_new_tokens=N_NEW,
        eos_token_id=[],
        do_sample=True,
        top_k=1,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(greedy, sampled)


def test_stops_at_eos_and_pads_finished_rows():
    model = make_model("llama", insert_at=2)
    batch = _batch(model)
    free = model.generate(**batch, max_new_tokens=N_NEW, eos_token_id=[])
    eos = int(free[0, 3])  # pretend the 4th token of row 0 is EOS
    out = model.generate(**batch, max_new_tokens=N_NEW, eos_token_id=eos)
    pad = model.tokenizer.pad_token_id
    for row in range(free.shape[0]):  # each row stops at its own first EOS (or runs to the end)
        hits = (free[row] == eos).nonzero()
        first = hits[0].item() if len(hits) else free.shape[1] - 1
        assert torch.equal(out[row, : first + 1], free[row, : first + 1]), row
        assert (out[row, first + 1 :] == pad).all(), row


def test_right_padding_is_refused():
    from composer.errors import InputError

    model = make_model("llama", insert_at=2)
    prompts = [model.format_prompt("long question"), model.format_prompt("q")]
    batch = model.prepare(prompts, image=list(images(2)), padding_side="right")
    with pytest.raises(InputError, match="left-padded"):
        model.generate(**batch, max_new_tokens=2)


def test_nan_weights_are_an_error_not_empty_text():
    """A model whose weights are NaN is an error naming the token step and rows, not empty text."""
    from composer.errors import ComposerError

    model = make_model("llama", insert_at=2)
    with torch.no_grad():
        model.llm.lm_head.weight.fill_(float("nan"))
    with pytest.raises(ComposerError, match=r"NaN logits at new token 0 \(rows \[0, 1\]\)"):
        model.generate(**_batch(model), max_new_tokens=3)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_generate_and_train_step_print_no_warnings(family):
    """Normal use is quiet: the decoder layers are called the way the installed transformers expects
    (`cache=` since 5.24; `past_key_values=` warns "deprecated" on every call)."""
    import warnings

    model = make_model(family, 2)
    batch = _batch(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.generate(**batch, max_new_tokens=3)
        labels = batch["input_ids"].clone()
        model(**batch, labels=labels, return_logits=False).loss.backward()
    assert [str(w.message) for w in caught] == []


def test_pipeline_one_liner_over_checkpoint_bundle_and_spec(llama_k1_export, tmp_path):
    """composer.pipeline(TARGET)(text, image=...) gives the decoded greedy answer
    of the model's own generate, for a checkpoint dir (torch), its ONNX bundle (the same text)
    and a spec file; a list of prompts gives a list."""
    import composer

    ckpt, bundle = llama_k1_export
    img = str(ROOT / "specs/tiny/assets/red_circle.png")
    model = ComposedModel.from_pretrained(ckpt)
    batch = model.prepare([model.format_prompt("What shape is it?")], image=[img])
    want = model.tokenizer.decode(model.generate(**batch, max_new_tokens=6)[0], skip_special_tokens=True).strip()
    torch_pipe, onnx_pipe = composer.pipeline(ckpt), composer.pipeline(bundle)
    assert torch_pipe("What shape is it?", image=img, max_new_tokens=6) == want
    assert onnx_pipe("What shape is it?", image=img, max_new_tokens=6) == want
    both = onnx_pipe(["What shape is it?", "And this?"], image=[img, img], max_new_tokens=6)
    assert isinstance(both, list) and len(both) == 2 and both[0] == want
    spec_pipe = composer.pipeline(ROOT / "specs/tiny/llava.yaml")
    assert isinstance(spec_pipe("hi", image=img, max_new_tokens=2), str)


SETTINGS = [
    {"repetition_penalty": 1.5},
    {"no_repeat_ngram_size": 2},
    {"min_new_tokens": 8, "repetition_penalty": 0.7},
]


@pytest.mark.parametrize("kw", SETTINGS, ids=["repetition", "ngram", "min_new+penalty"])
def test_generation_settings_equal_transformers_generate(kw, llama_k1_export):
    """repetition_penalty, no_repeat_ngram_size and min_new_tokens run through
    transformers' logits processors: on a text-only batch (left-padded) composer's greedy tokens
    equal the HF LLM's own `generate` with the same settings; the ONNX bundle gives the torch
    tokens with an image too; a transformers GenerationConfig gives the same as the keywords."""
    from transformers import GenerationConfig

    from composer.export.runtime import OnnxPipeline

    model = make_model("llama", insert_at=1)
    tok = model.tokenizer
    prompts = ["abab abab abab", "the cat sat on the mat, the cat"]
    batch = model.prepare(prompts)  # no template: text only
    eos = tok.eos_token_id
    ours = model.generate(**batch, max_new_tokens=N_NEW, eos_token_id=eos, **kw)
    with torch.no_grad():
        hf = model.llm.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=N_NEW,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=model.pad_token_id,
            suppress_tokens=model.banned_token_ids or None,
            **kw,
        )[:, batch["input_ids"].shape[1] :]
    assert torch.equal(ours, hf[:, : ours.shape[1]]) and not bool((hf[:, ours.shape[1] :] != model.pad_token_id).any())
    assert not torch.equal(ours, model.generate(**batch, max_new_tokens=N_NEW, eos_token_id=eos))  # settings bite
    cfg = GenerationConfig(max_new_tokens=N_NEW, **kw)
    assert torch.equal(model.generate(**batch, generation_config=cfg, eos_token_id=eos), ours)
    with_image = model.prepare([model.format_prompt(p) for p in prompts], image=list(images(2)))
    pipe = OnnxPipeline(llama_k1_export[1])
    assert torch.equal(
        torch.as_tensor(pipe.generate(**with_image, max_new_tokens=N_NEW, eos_token_id=eos, **kw)),
        model.generate(**with_image, max_new_tokens=N_NEW, eos_token_id=eos, **kw),
    )


def test_unsupported_generation_config_settings_are_named():
    from transformers import GenerationConfig

    from composer.errors import InputError

    model = make_model("llama", insert_at=1)
    batch = model.prepare(["hi"])
    with pytest.raises(InputError, match=r"generation_config: \['num_beams'\] not supported"):
        model.generate(**batch, generation_config=GenerationConfig(num_beams=4))
    with pytest.raises(InputError, match="repetition_penalty: must be > 0"):
        model.generate(**batch, repetition_penalty=0.0)
