"""generation_config.json in checkpoints and bundles as the editable default
of generate, and num_return_sequences on both runtimes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import images, make_model

from composer.checkpoint import load_pretrained
from composer.errors import InputError
from composer.export.runtime import OnnxPipeline


def _prompts(model, texts):
    return [model.format_prompt(t) for t in texts]


def test_checkpoint_generation_config_json_is_the_default_a_user_edits(tmp_path):
    """save_pretrained writes generation_config.json (transformers' format) from the spec's
    generation section; an edited file changes generate's defaults after loading (and the spec the
    model re-saves); an unsupported setting is one error naming the file and key."""
    from transformers import GenerationConfig

    model = make_model("llama", 1)
    model.spec.generation.max_new_tokens = 7
    out = model.save_pretrained(tmp_path / "ck")
    cfg = GenerationConfig.from_pretrained(out)
    assert (
        cfg.max_new_tokens == 7
        and cfg.eos_token_id == model.eos_token_ids[0]
        or cfg.eos_token_id == model.eos_token_ids
    )
    raw = json.loads((out / "generation_config.json").read_text())
    raw.update(max_new_tokens=3, num_beams=1)  # a transformers default is accepted
    (out / "generation_config.json").write_text(json.dumps(raw))
    loaded = load_pretrained(out)
    batch = loaded.prepare(_prompts(loaded, ["hi"]), image=list(images(1)))
    assert loaded.generate(**batch, eos_token_id=[]).shape[1] == 3
    assert loaded.spec.generation.max_new_tokens == 3
    raw["num_beams"] = 4
    (out / "generation_config.json").write_text(json.dumps(raw))
    with pytest.raises(InputError, match=r"generation_config.json: num_beams = 4 is not supported"):
        load_pretrained(out)
    raw.pop("num_beams")
    raw["top_p"] = 3.0
    (out / "generation_config.json").write_text(json.dumps(raw))
    with pytest.raises(InputError, match=r"generation_config.json: top_p"):
        load_pretrained(out)


def test_bundle_generation_config_json_is_its_default(llama_k1_export, tmp_path):
    """A bundle carries generation_config.json; editing it changes OnnxPipeline.generate's default
    length and EOS ids."""
    bundle = tmp_path / "b"
    shutil.copytree(llama_k1_export[1], bundle)
    pipe = OnnxPipeline(bundle)
    batch = pipe.prepare(_prompts(pipe, ["hi"]), image=list(images(1)))
    raw = json.loads((bundle / "generation_config.json").read_text())
    assert raw["max_new_tokens"] == pipe.manifest.generation.max_new_tokens
    raw.update(max_new_tokens=4, eos_token_id=[])
    (bundle / "generation_config.json").write_text(json.dumps(raw))
    edited = OnnxPipeline(bundle)
    assert edited.eos_token_ids == [] and edited.generate(**batch).shape[1] == 4


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_num_return_sequences_repeats_each_prompt_with_its_media(runtime, llama_k1_export):
    """n = 3 sampled sequences per prompt: rows grouped per prompt, equal to sampling the batch with
    each prompt (and its picture) written out three times; greedy with n > 1 is refused."""
    model = make_model("llama", 1) if runtime == "torch" else OnnxPipeline(llama_k1_export[1])
    pics = images(2)
    texts = ["What is it?", "And this longer question here?"]
    batch = model.prepare(_prompts(model, texts), image=list(pics))
    got = model.generate(
        **batch, num_return_sequences=3, do_sample=True, max_new_tokens=6, generator=torch.Generator().manual_seed(0)
    )
    rep = model.prepare(_prompts(model, [t for t in texts for _ in range(3)]), image=list(pics.repeat_interleave(3, 0)))
    want = model.generate(**rep, do_sample=True, max_new_tokens=6, generator=torch.Generator().manual_seed(0))
    assert got.shape[0] == 6 and torch.equal(got, want)
    with pytest.raises(InputError, match="num_return_sequences: 2 sequences per prompt need do_sample"):
        model.generate(**batch, num_return_sequences=2, do_sample=False)


def test_min_new_tokens_above_max_new_tokens_is_refused_by_name():
    from composer.generation import resolve_generation
    from composer.spec import GenerationSpec

    with pytest.raises(InputError, match=r"^min_new_tokens: 5 is more than max_new_tokens \(4\)$"):
        resolve_generation(GenerationSpec(), max_new_tokens=4, min_new_tokens=5)
    assert resolve_generation(GenerationSpec(), max_new_tokens=4, min_new_tokens=4).min_new_tokens == 4
