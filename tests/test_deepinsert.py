"""DeepInsert at k > 0 against a straightforward reference written here, independently of
composer.layout: per prompt, no padding, text alone through layers [0, k), splice, [k, N)."""

from __future__ import annotations

import pytest
import torch
from helpers import images, make_model

from composer.layout import baseline_positions

TOL = 1e-5


def _causal(n: int) -> torch.Tensor:
    m = torch.full((n, n), torch.finfo(torch.float32).min).triu(1)
    return m[None, None]


def _run(llm, family, h, start, end, pos):
    layers = llm.model.layers if family != "opt" else llm.model.decoder.layers
    kw = {}
    if family != "opt":
        kw["position_embeddings"] = llm.model.rotary_emb(h, position_ids=pos[None])
    for layer in layers[start:end]:
        h = layer(h, attention_mask=_causal(h.shape[1]), position_ids=pos[None], **kw)
    return h


def reference_logits(model, family, ids, mm_rows):
    """ids: (L,) one unpadded prompt; mm_rows: modality -> (n_slots, d) tokens for this prompt."""
    llm = model.llm
    L = ids.shape[0]
    pos = torch.arange(L)
    slot_of = {m: ids == pid for m, pid in model.placeholder_ids.items()}
    present = torch.zeros(L, dtype=torch.bool)  # slots already in the sequence
    present |= ~torch.stack(list(slot_of.values())).any(0)
    if family == "opt":
        dec = llm.model.decoder
        pe = dec.embed_positions.weight[pos + 2]
        full = dec.embed_tokens(ids.masked_fill(~present, 0)) + pe
    else:
        pe = torch.zeros(L, llm.config.hidden_size)
        full = llm.model.embed_tokens(ids.masked_fill(~present, 0))
    ks = sorted({0, *model.insert_at.values()})
    for i, k in enumerate(ks):
        end = ks[i + 1] if i + 1 < len(ks) else llm.config.num_hidden_layers
        full = full.clone()
        for m, km in model.insert_at.items():
            if km == k and slot_of[m].any():
                full[slot_of[m]] = mm_rows[m] + pe[slot_of[m]]
                present |= slot_of[m]
        idx = present.nonzero().squeeze(1)
        h = _run(llm, family, full[idx][None], k, end, pos[idx])
        full[idx] = h[0]
    if family == "opt":
        full = llm.model.decoder.final_layer_norm(full)
    else:
        full = llm.model.norm(full)
    return llm.lm_head(full)


def _rows(model, batch):
    """Split the flat per-modality tokens back into prompts."""
    out = []
    mm = {
        m: model.encode(m, batch[m]).reshape(-1, model.llm.config.hidden_size)
        for m in model.placeholder_ids
        if m in batch
    }
    used = {m: 0 for m in mm}
    for b in range(batch["input_ids"].shape[0]):
        real = batch["attention_mask"][b].bool()
        ids = batch["input_ids"][b][real]
        rows = {}
        for m, pid in model.placeholder_ids.items():
            n = int((ids == pid).sum())
            if n:
                rows[m] = mm[m][used[m] : used[m] + n]
                used[m] += n
        out.append((real, ids, rows))
    return out


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
def test_matches_reference(family, insert_at, mods, padding_side):
    model = make_model(family, insert_at=insert_at, modalities=mods)
    # row 0: every modality once; row 1: no second modality but two images, shorter text
    p0 = model.format_prompt("describe both")
    p1 = "USER: <image> and <image> please"
    items = {"image": list(images(3, seed=1))}
    if len(mods) == 2:
        items["image2"] = list(images(1, seed=2))
    batch = model.prepare([p0, p1], padding_side=padding_side, **items)
    with torch.no_grad():
        ours = model(**batch).logits
        for b, (real, ids, rows) in enumerate(_rows(model, batch)):
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
    base = baseline_positions(b1["attention_mask"])[0]
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
