"""``composer.pipeline(TARGET)``: text and media in, generated text out, whatever TARGET is.

    import composer

    pipe = composer.pipeline("out/smol-demo.onnx")          # an ONNX bundle (ONNX Runtime)
    pipe("What shape is it?", image="specs/smol/assets/red_circle.png")   # -> "circle"
    composer.pipeline("out/smol-demo")                        # a composed checkpoint (torch)
    composer.pipeline("alice/smol-demo@v1")                   # a checkpoint on the Hub
    composer.pipeline("specs/tiny/llava.yaml")                # a spec, built (random weights unless sourced)

The prompt goes through the model's prompt template (the spec's, else the tokenizer's chat
template), with the media placeholders where the template puts them; ``raw=True`` passes it as
written. Greedy by default; any generation setting (a ``GenerationSpec`` field), a transformers
``generation_config`` and ``seed`` as in ``generate`` (``composer.frontend``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from composer.errors import InputError


class Pipeline:
    """A loaded model (``model``: a ``ComposedModel`` or an ``OnnxPipeline``) as a callable."""

    def __init__(self, target: str | Path, *, provider: str = "cpu", revision: str | None = None):
        from composer.targets import resolve

        t = resolve(target)
        if revision is not None and t.kind != "hub":
            raise InputError(f"{target}: revision={revision!r} applies to Hub repos; this is a local {t.kind}")
        if t.kind == "bundle":
            from composer.export.runtime import OnnxPipeline

            self.model = OnnxPipeline(t.path, provider=provider)
        elif t.kind == "spec":
            from composer.builder import build

            self.model = build(t.path).eval()
        else:  # a checkpoint dir or a Hub repo
            from composer.model import ComposedModel

            self.model = ComposedModel.from_pretrained(t.path or t.ref, revision=revision)

    def __call__(
        self,
        text: str | list[str],
        *,
        raw: bool = False,
        generation_config=None,
        seed: int = 0,
        **kwargs: Any,
    ) -> str | list[str] | list[list[str]]:
        """Generate for ``text`` (one prompt, or a list: one answer each). ``kwargs``: per modality
        the items in prompt order (one item, or a list; for a list of prompts, one flat list over
        all of them), e.g. ``image="a.png"`` or ``audio=["a.wav", "b.wav"]``; and any generation
        setting (a ``GenerationSpec`` field: ``max_new_tokens``, ``do_sample``, ``stop_strings``,
        ``num_return_sequences``, ...). With ``num_return_sequences`` n > 1 each prompt's answer is
        a list of n."""
        import torch

        from composer.generation import GENERATION_FIELDS

        settings = {k: kwargs.pop(k) for k in list(kwargs) if k in GENERATION_FIELDS}
        texts = [text] if isinstance(text, str) else list(text)
        items = {m: v if isinstance(v, (list, tuple)) else [v] for m, v in kwargs.items()}
        # one prompt: a placeholder per item given; several: one per given modality each (the items
        # are one flat list over the prompts); a modality without items gets no placeholder
        counts = {m: len(v) if isinstance(text, str) else 1 for m, v in items.items()}
        prompts = texts if raw else [self.model.format_prompt(t, items=counts) for t in texts]
        batch = self.model.prepare(prompts, **items)
        ids = self.model.generate(
            **batch, generation_config=generation_config, generator=torch.Generator().manual_seed(seed), **settings
        )
        out = [s.strip() for s in self.model.decode(ids)]
        n = len(out) // len(texts)
        answers = out if n == 1 else [out[i * n : (i + 1) * n] for i in range(len(texts))]
        return answers[0] if isinstance(text, str) else answers


def pipeline(target: str | Path, *, provider: str = "cpu", revision: str | None = None) -> Pipeline:
    """``Pipeline(target)``: a composed checkpoint dir, an ONNX bundle dir, a Hub id
    (``owner/name``, ``owner/name@rev``), a spec file or a shipped spec name (``tiny/llava``), as a
    text-generation callable; ``composer.targets`` says how TARGET is read."""
    return Pipeline(target, provider=provider, revision=revision)
