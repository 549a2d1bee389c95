"""One contract, two runtimes: every case here runs over the torch model (``ComposedModel``) and
its ONNX bundle (``OnnxPipeline``) — the same calls, the same answers, the same errors.

The model is the session's ``make_model("llama", insert_at=1)`` (tiny, fp32, random weights);
greedy token ids are compared exactly: the two runtimes' logits agree to ~1e-5 on this model
(tests/test_export.py), and a greedy step only differs where two logits tie that closely, which
the assertions below would show as a failure, not hide.
"""

from __future__ import annotations

import pytest
import torch
from helpers import ROOT, images

from composer.errors import InputError

IMG = str(ROOT / "specs/tiny/assets/red_circle.png")
RUNTIMES = ["torch", "onnxruntime"]


@pytest.fixture(scope="module")
def runtimes(llama_k1_export):
    from composer.export.runtime import OnnxPipeline
    from composer.model import ComposedModel

    ckpt, bundle = llama_k1_export
    return {"torch": ComposedModel.from_pretrained(ckpt).eval(), "onnxruntime": OnnxPipeline(bundle)}


@pytest.fixture(params=RUNTIMES)
def rt(request, runtimes):
    return runtimes[request.param]


def _ids(x) -> torch.Tensor:
    return torch.as_tensor(x).cpu()


def test_the_same_facts(runtimes):
    t, o = runtimes["torch"], runtimes["onnxruntime"]
    assert (t.runtime, o.runtime) == ("torch", "onnxruntime")
    for name in ("name", "encoder_types", "placeholders", "placeholder_ids", "prompt_template", "context_length"):
        assert getattr(t, name) == getattr(o, name), name
    assert t.modalities == o.modalities == ["image"]
    assert t.num_tokens("image") == o.num_tokens("image")
    assert t.eos_token_ids == o.eos_token_ids and t.pad_token_id == o.pad_token_id
    assert t.banned_token_ids == o.banned_token_ids
    assert t.generation_spec == o.generation_spec


def test_prompts_get_placeholders_only_for_items_given(rt):
    assert rt.format_prompt("Hi?", items={}).count("<image>") == 0
    assert rt.format_prompt("Hi?").count("<image>") == 1
    assert rt.format_prompt("Hi?", items={"image": 2}).count("<image>") == 2


def test_greedy_ids_equal_across_runtimes_with_and_without_media(runtimes):
    t, o = runtimes["torch"], runtimes["onnxruntime"]
    prompts = [t.format_prompt("What shape is it?"), t.format_prompt("And this one, please?")]
    for kw in ({"image": [IMG, IMG]}, {}):
        ps = prompts if kw else [t.format_prompt("What is two and two?", items={})] * 2
        want = t.generate(**t.prepare(ps, **kw), max_new_tokens=6)
        got = o.generate(**o.prepare(ps, **kw), max_new_tokens=6)
        assert torch.equal(_ids(got), _ids(want))
        assert o.decode(got) == t.decode(want)


def test_cached_equals_uncached(rt):
    batch = rt.prepare([rt.format_prompt("What shape?"), rt.format_prompt("Colour?")], image=list(images(2)))
    assert torch.equal(
        _ids(rt.generate(**batch, max_new_tokens=5)), _ids(rt.generate(**batch, max_new_tokens=5, use_cache=False))
    )


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda rt: rt.generate(**rt.prepare([rt.format_prompt("x", items={})]), image=images(1)),
            "no image placeholder",
        ),
        (
            lambda rt: rt.generate(
                **{k: v for k, v in rt.prepare([rt.format_prompt("x")], image=[IMG]).items() if k != "image"}
            ),
            "no `image` input",
        ),
        (
            lambda rt: rt.generate(**rt.prepare([rt.format_prompt("x")], image=[IMG]), audio=images(1)),
            "unknown argument",
        ),
        (
            lambda rt: rt.generate(**rt.prepare([rt.format_prompt("x")], image=[IMG]), max_new_tokns=3),
            "neither a modality",
        ),
        (lambda rt: rt.generate(**rt.prepare([rt.format_prompt("x")], image=[IMG]), top_p=2.0), "top_p"),
        (
            lambda rt: rt.generate(**rt.prepare([rt.format_prompt("x")], image=[IMG]), num_return_sequences=2),
            "need do_sample",
        ),
        (lambda rt: rt.prepare([rt.format_prompt("x")], image=[IMG, IMG]), "image"),
    ],
    ids=[
        "items-without-placeholder",
        "placeholder-without-items",
        "unknown-modality",
        "misspelt-setting",
        "bad-top-p",
        "n-greedy",
        "count",
    ],
)
def test_the_same_errors(runtimes, call, message):
    """Each bad call is one InputError, with the same message from both runtimes (a misspelt
    setting is named as neither a modality nor a setting)."""
    msgs = []
    for name in RUNTIMES:
        with pytest.raises(InputError, match=message) as e:
            call(runtimes[name])
        msgs.append(str(e.value).replace("bundle", "model"))
    assert msgs[0] == msgs[1]


def test_eos_override_and_stop_strings(runtimes):
    """``eos_token_id`` overrides the model's EOS (generation ends on that token); a stop string
    ends a row once its text is generated, the row keeping the tokens that spell it."""
    t = runtimes["torch"]
    batch = t.prepare([t.format_prompt("What shape?")], image=[IMG])
    free = _ids(t.generate(**batch, max_new_tokens=12))[0].tolist()
    first = free[0]
    # the first later token that decodes to a printable ASCII character of its own: the stop string
    chars = [t.decode([[x]])[0] for x in free]
    at = next(i for i, c in enumerate(chars) if i > 0 and len(c) == 1 and c.isascii() and c.isalnum())
    stop = chars[at]
    for rt in runtimes.values():
        b = rt.prepare([rt.format_prompt("What shape?")], image=[IMG])
        out = _ids(rt.generate(**b, max_new_tokens=12, eos_token_id=first))
        assert out.shape[1] == 1 and int(out[0, 0]) == first
        stopped = _ids(rt.generate(**b, max_new_tokens=12, stop_strings=stop))
        assert stopped[0].tolist() == free[: at + 1]


def test_num_return_sequences_groups_a_prompts_samples(runtimes):
    outs = []
    for rt in runtimes.values():
        b = rt.prepare([rt.format_prompt("What shape?"), rt.format_prompt("Colour?")], image=[IMG, IMG])
        out = _ids(
            rt.generate(
                **b,
                max_new_tokens=4,
                do_sample=True,
                num_return_sequences=3,
                generator=torch.Generator().manual_seed(5),
            )
        )
        assert out.shape[0] == 6
        outs.append(out)
    assert torch.equal(outs[0], outs[1])  # same logits, same generator: the same samples


def test_right_padding_is_refused(rt):
    batch = rt.prepare(
        [rt.format_prompt("What shape?"), rt.format_prompt("What colour is the big one?")],
        image=[IMG, IMG],
        padding_side="right",
    )
    with pytest.raises(InputError, match="left-padded"):
        rt.generate(**batch, max_new_tokens=2)
