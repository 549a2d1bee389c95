"""Example inputs for checking a bundle against its torch model: the fixed prompt set and a seeded
batch of random media items. Below the exporter, the quantizer and the verifier, which all use it."""

from __future__ import annotations

import torch

# The fixed prompt set a quantized bundle is checked on (each with the bundle's media placeholders).
PROMPTS = (
    "Describe this in detail, please.",
    "Hi",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "List three prime numbers.",
    "Who wrote Hamlet, and when?",
    "Give me one tip for learning to cook.",
)


def sample_batch(model, instructions=PROMPTS[:2]):
    """Left-padded prompts of different lengths (``model.format_prompt``), each placeholder with a
    random example item (seeded: the same batch every call)."""
    from composer.prompting import adds_special_tokens, prepare_batch

    torch.manual_seed(0)
    prompts = [model.format_prompt(text) for text in instructions]
    placeholders = model.placeholders
    counts = {m: sum(p.count(ph) for p in prompts) for m, ph in placeholders.items()}
    return prepare_batch(
        model.tokenizer,
        prompts,
        placeholder_ids=model.placeholder_ids,
        num_tokens={m: model.num_tokens(m) for m in model.encoders},
        placeholders=placeholders,
        preprocess={
            m: (lambda items, enc=enc: _single(enc, enc.example_inputs(len(items))))
            for m, enc in model.encoders.items()
        },
        add_special_tokens=adds_special_tokens(model.tokenizer, model.prompt_template),
        **{m: [None] * n for m, n in counts.items()},
    )


def _single(enc, inputs: dict):
    return inputs[enc.input_names[0]] if len(enc.input_names) == 1 else inputs
