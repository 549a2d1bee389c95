"""DeepInsert at k > 0 against a straightforward reference written here, independently of
composer.layout: per prompt, no padding, text alone through layers [0, k), splice, [k, N). The
model runs eager or sdpa attention (sdpa is the default); the reference always runs eager."""

from __future__ import annotations

import pytest
import torch
from helpers import ATTENTION, images, make_model, positions_ref, reference_logits, split_rows

# fp32, max abs logit difference: both sides compute the same function in other operation orders;
# fp32 rounds each operation to 2^-24 (6e-8) relative, these tiny random models' dot products are <=
# 128 long (a typical sum's rounding ~sqrt(128) * 6e-8 = 7e-7 of its size) and their logits are
# below 1, so a handful of layers stays near 1e-6, 10x under the bound
TOL = 1e-5


CASES = [
    ("llama", {"image": 2}, ("image",)),
    ("llama", {"image": 3}, ("image",)),
    ("opt", {"image": 2}, ("image",)),
    ("qwen3", {"image": 1}, ("image",)),
    ("llama", {"image": 1, "image2": 3}, ("image", "image2")),
    ("opt", {"image": 0, "image2": 2}, ("image", "image2")),
]


@pytest.mark.parametrize("family,insert_at,mods", CASES)
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("attn", ATTENTION)
def test_matches_reference(family, insert_at, mods, padding_side, attn):
    model = make_model(family, insert_at=insert_at, modalities=mods, attn_implementation=attn)
    assert model.llm.config._attn_implementation == attn  # the reference below always runs eager
    # row 0: every modality once; row 1: no second modality but two images, shorter text
    p0 = model.format_prompt("describe both")
    p1 = "USER: <image> and <image> please"
    items = {"image": list(images(3, seed=1))}
    if len(mods) == 2:
        items["image2"] = list(images(1, seed=2))
    batch = model.prepare([p0, p1], padding_side=padding_side, **items)
    with torch.no_grad():
        ours = model(**batch).logits
        for b, (real, ids, rows) in enumerate(split_rows(model, batch)):
            ref = reference_logits(model, family, ids, rows)
            diff = (ours[b][real] - ref).abs().max().item()
            assert diff < TOL, (b, diff)


def test_mm_tokens_do_not_touch_early_layers_and_positions_are_baseline():
    k = 2
    model = make_model("llama", insert_at=k)
    seen = {}

    def hook(i):
        def f(mod, args, kwargs, out):
            seen.setdefault(i, []).append((args[0].shape[1], kwargs["position_ids"].clone(), out.clone()))

        return f

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(model.llm.model.layers)]
    prompt = model.format_prompt("what colour?")
    b1 = model.prepare([prompt], image=[images(1, seed=1)[0]])
    b2 = model.prepare([prompt], image=[images(1, seed=2)[0]])
    with torch.no_grad():
        l1 = model(**b1).logits
        l2 = model(**b2).logits
    for h in handles:
        h.remove()
    slots = b1["input_ids"][0] == model.placeholder_ids["image"]
    n_text, n_mm = int((~slots).sum()), int(slots.sum())
    base = positions_ref(b1["attention_mask"])[0]
    for i in range(model.num_layers):
        (t1, p1, o1), (t2, p2, o2) = seen[i]
        if i < k:  # text only, baseline positions with a gap, and bit-identical whatever the image
            assert t1 == n_text
            assert torch.equal(p1[0], base[~slots])
            assert torch.equal(o1, o2)
        else:
            assert t1 == n_text + n_mm
            assert torch.equal(p1[0], base)
            assert not torch.equal(o1, o2)
    text_pos = base[~slots]
    assert (text_pos.diff() > 1).sum() == 1  # exactly one gap, where the image will go
    assert not torch.allclose(l1, l2)


def test_no_autograd_path_from_image_to_early_layers():
    """With a frozen LLM, layer k-1's output requires grad only if the image reaches it."""
    model = make_model("llama", insert_at=2)
    batch = model.prepare([model.format_prompt("x")], image=[images(1)[0]])
    pix = batch["image"].clone().requires_grad_(True)
    captured = {}
    hooks = [
        model.llm.model.layers[i].register_forward_hook(lambda m, a, o, i=i: captured.setdefault(i, o)) for i in (1, 2)
    ]
    logits = model(**{**batch, "image": pix}).logits
    for h in hooks:
        h.remove()
    assert not captured[1].requires_grad  # layers [0, 2): no path from the image
    assert captured[2].requires_grad and logits.requires_grad  # from layer 2 on: there is
    grad = torch.autograd.grad(logits.sum(), pix)[0]
    assert torch.count_nonzero(grad) > 0
