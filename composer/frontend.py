"""The front end both runtimes share: prompts, media, generation settings and EOS in, token ids out.

``ComposedModel`` (torch) and ``OnnxPipeline`` (ONNX Runtime) subclass ``FrontEnd``; each provides
only the facts it reads from its own artifact (a module tree, a bundle manifest) and its three
steps: ``encode`` (modality inputs -> projected tokens), and ``decoder`` (a prefill on its first
call, one decode step per later call). Everything a user touches — ``format_prompt``, ``prepare``,
``generate`` and its settings, EOS and banned ids, the modality checks, ``decode`` — is written
once here, so the two runtimes cannot drift (tests/test_runtime_contract.py runs the same cases
over both).

Generation settings are one type, the spec's ``GenerationSpec``: ``generate(**batch, **overrides)``
takes any of its fields as keyword arguments (as transformers' ``generate`` takes a
``GenerationConfig``'s), over the spec's ``generation`` section and an optional transformers
``generation_config``; ``composer.generation.resolve_generation`` validates them.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import numpy as np
import torch

from composer.errors import InputError
from composer.generation import GENERATION_FIELDS, decode_loop, eos_ids, resolve_generation
from composer.prompting import (
    check_context,
    check_window,
    format_instruction,
    prepare_batch,
    repeat_rows,
    resolve_prompts,
)


class FrontEnd:
    """What a runtime shares. Subclasses provide (as attributes or properties):

    - ``runtime``: "torch" or "onnxruntime"; ``name``: the model's name
    - ``tokenizer``; ``placeholder_ids`` {modality: token id}; ``placeholders`` {modality: string}
    - ``encoder_types`` {modality: encoder type}; ``num_tokens(m)``: tokens per item; ``processor(m)``
    - ``prompt_template``, ``context_length``, ``sliding_window``, ``generation_spec``,
      ``eos_token_ids``, ``pad_token_id``, ``banned_token_ids``
    - ``encode(m, inputs)`` -> (n, T, d) tokens; ``decoder(input_ids, attention_mask,
      modality_inputs, use_cache=, reserve=)`` -> ``step(new_ids) -> logits (B, V)``
    - ``input_device``: where ``generate`` puts its tensors
    """

    runtime: ClassVar[str]

    # -- prompts and media ------------------------------------------------------------------------------
    @property
    def modalities(self) -> list[str]:
        return list(self.encoder_types)

    def format_prompt(self, instruction: str, items: dict[str, int] | None = None) -> str:
        """An instruction -> a full prompt with each modality's placeholder once per item: the spec's
        ``prompt.template`` (e.g. ``"USER: <image>\\n{instruction} ASSISTANT:"``) when it has one,
        else the tokenizer's chat template (one user message: the modality parts, then the text).
        ``items``: per modality, the number of items (default: one of each; a modality left out gets
        no placeholder, so ``items={}`` formats a text-only question)."""
        return format_instruction(self.tokenizer, self.prompt_template, self.placeholders, instruction, items)

    def preprocessor(self, m: str):
        """``items -> encoder inputs`` for modality ``m`` (the encoder type's ``preprocess``)."""
        from composer.adapters import ENCODER_ADAPTERS

        return functools.partial(ENCODER_ADAPTERS[self.encoder_types[m]].preprocess, self.processor(m))

    def prepare(
        self,
        prompts: str | list[str] | None = None,
        *,
        messages: list | None = None,
        padding_side: str = "left",
        errors: str = "raise",
        **modality_items,
    ) -> dict[str, Any]:
        """Tokenise prompts (each placeholder once per item, as a user writes it), expand each
        placeholder to its modality's token count, pad, and preprocess the media.

        ``prompts``: strings; or ``messages``: one conversation per row in the HF chat format,
        formatted with the tokenizer's chat template, a modality item as a ``{"type": "<modality>"}``
        content part::

            batch = model.prepare(messages=[[{"role": "user", "content": [
                {"type": "image"}, {"type": "text", "text": "What is it?"}]}]], image=["cat.png"])

        ``modality_items``: per modality, a list (in prompt order, row after row) of file paths,
        PIL images, or already-preprocessed tensors. Returns ``input_ids``, ``attention_mask``
        and one tensor per modality, ready for ``forward``/``generate``. A prompt longer than the
        LLM's context, or an unreadable item, raises ``InputError``.

        ``errors="collect"``: a bad prompt or item does not stop the batch; returns
        ``Prepared(batch, rows, errors)`` (``composer.prompting``): the batch of the good prompts,
        their indices, and {index: message} for the others::

            batch, rows, errors = model.prepare(prompts, image=paths, errors="collect")
        """
        prompts, special = resolve_prompts(self.tokenizer, prompts, messages, self.prompt_template, self.placeholders)
        return prepare_batch(
            self.tokenizer,
            prompts,
            placeholder_ids=self.placeholder_ids,
            num_tokens={m: self.num_tokens(m) for m in self.modalities},
            placeholders=self.placeholders,
            preprocess={m: self.preprocessor(m) for m in self.modalities},
            padding_side=padding_side,
            max_positions=self.context_length,
            errors=errors,
            add_special_tokens=special,
            **modality_items,
        )

    def decode(self, ids) -> list[str]:
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    # -- modality inputs ----------------------------------------------------------------------------------
    def check_modality_inputs(self, slot_masks: dict[str, Any], modality_inputs: dict[str, Any]) -> list[str]:
        """The modalities to encode: every one whose placeholder occurs. An unknown modality, items
        without a placeholder, or placeholders without items are one ``InputError`` each."""
        unknown = sorted(set(modality_inputs) - set(self.modalities))
        if unknown:
            raise InputError(f"unknown modality input(s) {unknown}; this model has {sorted(self.modalities)}")
        todo = []
        for m, mask in slot_masks.items():
            x = modality_inputs.get(m)
            if int(mask.sum()) == 0:
                n = len(next(iter(x.values()))) if isinstance(x, dict) else len(x) if x is not None else 0
                if n:
                    raise InputError(f"{n} {m} input(s) given but the prompts have no {m} placeholder")
                continue
            if x is None:
                raise InputError(f"the prompts have {m} placeholder slots but no `{m}` input was given")
            todo.append(m)
        return todo

    @staticmethod
    def check_token_count(m: str, slots: int, tokens) -> None:
        """``tokens`` (n, T, d) fill exactly the ``slots`` placeholder slots of modality ``m``."""
        n, T = tokens.shape[0], tokens.shape[1]
        if n * T != slots:
            raise InputError(
                f"{m}: the prompts have {slots} placeholder slots ({slots / T:g} items of {T} tokens) "
                f"but {n} {m} input(s) were given"
            )

    # -- generation -------------------------------------------------------------------------------------
    def generate(
        self,
        input_ids,
        attention_mask=None,
        *,
        generation_config=None,
        eos_token_id: int | list[int] | None = None,
        generator: torch.Generator | None = None,
        streamer=None,
        use_cache: bool = True,
        **kwargs,
    ) -> torch.Tensor:
        """Greedy or sampled generation; returns the new token ids (B, n), padded after EOS.

        ``kwargs``: the modality inputs ``prepare`` returned, and any field of ``GenerationSpec``
        (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``,
        ``repetition_penalty``, ``no_repeat_ngram_size``, ``min_new_tokens``, ``stop_strings``,
        ``num_return_sequences``). Settings: the spec's ``generation`` section, then a transformers
        ``GenerationConfig`` (``generation_config``: the values it sets), then these keyword
        arguments; ``repetition_penalty``, ``no_repeat_ngram_size`` and ``min_new_tokens`` run
        through transformers' own logits processors (as ``generate`` orders them).
        ``num_return_sequences`` n (sampling): B * n rows out, a prompt's n together.

        ``use_cache=False`` recomputes the whole sequence every step (the reference the cached
        path is tested against). Inputs must be left-padded. ``streamer`` follows HF's
        ``BaseStreamer`` (``put``/``end``). Sampling uses ``generator`` (CPU) for repeatability.
        """
        settings = {k: kwargs.pop(k) for k in list(kwargs) if k in GENERATION_FIELDS}
        unknown = sorted(set(kwargs) - set(self.modalities))
        if unknown:
            raise InputError(
                f"generate(): unknown argument(s) {unknown}: neither a modality of this model "
                f"({sorted(self.modalities)}) nor a generation setting ({sorted(GENERATION_FIELDS)})"
            )
        g = resolve_generation(self.generation_spec, generation_config, **settings)
        device = self.input_device
        input_ids = torch.as_tensor(input_ids).to(device)
        attention_mask = (
            torch.ones_like(input_ids) if attention_mask is None else torch.as_tensor(attention_mask).to(device)
        )
        if not bool(attention_mask[:, -1].all()):
            raise InputError("generate() needs left-padded inputs (the last column of attention_mask must be 1)")
        modality_inputs = {m: torch.as_tensor(x) if isinstance(x, np.ndarray) else x for m, x in kwargs.items()}
        input_ids, attention_mask, modality_inputs = repeat_rows(
            input_ids,
            attention_mask,
            modality_inputs,
            self.placeholder_ids,
            {m: self.num_tokens(m) for m in self.modalities},
            g.num_return_sequences,
        )
        check_context(attention_mask, g.max_new_tokens, self.context_length)
        check_window(input_ids.shape[1], g.max_new_tokens, self.sliding_window)
        step = self.decoder(input_ids, attention_mask, modality_inputs, use_cache=use_cache, reserve=g.max_new_tokens)
        with torch.no_grad():
            return decode_loop(
                step,
                input_ids,
                g,
                eos=self.eos_token_ids if eos_token_id is None else eos_ids(eos_token_id, None, self.tokenizer),
                pad=self.pad_token_id,
                banned=self.banned_token_ids,
                generator=generator,
                streamer=streamer,
                tokenizer=self.tokenizer,
            ).to(device)
