"""The decoding loop shared by the torch model and the ONNX Runtime pipeline.

A backend supplies ``step(out) -> logits (B, V)`` (prefill on the first call, one decode step
after); this module chooses tokens (greedy, or sampling through transformers' logits
warpers, after transformers' logits processors for ``repetition_penalty``,
``no_repeat_ngram_size`` and ``min_new_tokens``, in the order ``generate`` applies them), bans
placeholder ids, stops at EOS / ``max_new_tokens`` and pads finished rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def _fields() -> frozenset[str]:
    from composer.spec import GenerationSpec

    return frozenset(GenerationSpec.model_fields)


GENERATION_FIELDS = _fields()  # the keyword arguments generate() takes as settings


def resolve_generation(gen, generation_config=None, **overrides):
    """-> a ``GenerationSpec``: the spec's ``generation`` settings ``gen``, then what a
    transformers ``GenerationConfig`` sets (its values that differ from GenerationConfig's
    defaults), then the call's keyword overrides (None: not set), validated as the spec is
    (``max_new_tokens > 0``, ``temperature >= 1e-6`` and finite, ``top_k > 0``, ``0 < top_p <= 1``,
    ``repetition_penalty > 0``, ...). A GenerationConfig setting composer does not implement, or an
    unknown keyword, is one error naming it. ``stop_strings`` may be one string."""
    from pydantic import ValidationError

    from composer.errors import InputError, validation_message
    from composer.spec import GenerationSpec

    unknown = sorted(set(overrides) - GENERATION_FIELDS)
    if unknown:
        raise InputError(f"unknown generation setting(s) {unknown}; known: {sorted(GENERATION_FIELDS)}")
    fields = list(GenerationSpec.model_fields)
    values = {k: getattr(gen, k) for k in fields}
    if generation_config is not None:
        set_ = generation_config.to_diff_dict()
        ignored = {"transformers_version", "eos_token_id", "pad_token_id", "bos_token_id", "_from_model_config"}
        unknown = sorted(k for k in set_ if k not in fields and k not in ignored)
        if unknown:
            raise InputError(f"generation_config: {unknown} not supported (composer implements {fields})")
        values.update({k: v for k, v in set_.items() if k in fields and v is not None})
    if isinstance(overrides.get("stop_strings"), str):
        overrides["stop_strings"] = [overrides["stop_strings"]]
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        g = GenerationSpec.model_validate(values)
    except ValidationError as e:
        raise InputError(validation_message(e, unknown="unknown setting")) from None
    if g.min_new_tokens > g.max_new_tokens:
        raise InputError(f"min_new_tokens: {g.min_new_tokens} is more than max_new_tokens ({g.max_new_tokens})")
    if g.num_return_sequences > 1 and not g.do_sample:
        raise InputError(
            f"num_return_sequences: {g.num_return_sequences} sequences per prompt need do_sample "
            "(greedy decoding gives the same one each time)"
        )
    return g


def warpers(g):
    """transformers' logits warpers for a ``GenerationSpec`` (sampling only)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    w = LogitsProcessorList()
    if g.do_sample:
        if g.temperature != 1.0:
            w.append(TemperatureLogitsWarper(g.temperature))
        if g.top_k:
            w.append(TopKLogitsWarper(g.top_k))
        if g.top_p is not None and g.top_p < 1.0:
            w.append(TopPLogitsWarper(g.top_p))
    return w


def processors(g, prompt_length: int, eos: list[int]):
    """transformers' logits processors for the settings that apply to greedy and sampled decoding
    alike (before the warpers, as ``generate`` orders them)."""
    from transformers import (
        LogitsProcessorList,
        MinNewTokensLengthLogitsProcessor,
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
    )

    p = LogitsProcessorList()
    if g.min_new_tokens and eos:
        p.append(MinNewTokensLengthLogitsProcessor(prompt_length, g.min_new_tokens, eos))
    if g.repetition_penalty != 1.0:
        p.append(RepetitionPenaltyLogitsProcessor(g.repetition_penalty))
    if g.no_repeat_ngram_size:
        p.append(NoRepeatNGramLogitsProcessor(g.no_repeat_ngram_size))
    return p


def decode_loop(
    step: Callable[[torch.Tensor], torch.Tensor],
    input_ids: torch.Tensor,
    sampling,
    *,
    eos: list[int],
    pad: int,
    banned: list[int],
    generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
    streamer=None,
    tokenizer=None,
    on_step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run ``step`` until every row hit EOS, one of its stop strings (transformers'
    ``StopStringCriteria`` over ``tokenizer``; the row keeps the tokens that spell it) or its
    ``max_new_tokens``; -> new ids (B, n), finished rows padded with ``pad``.

    ``sampling`` is one ``GenerationSpec`` for the whole batch, or a list of one per row (a server's batch of
    independent requests: each row its own settings, stop strings, length and ``generator``, so
    that a row's tokens do not depend on the rows batched with it). ``on_step(tokens, done)``, if
    given, sees each step's tokens (B,) and the rows done after it, and may return a (B,) bool
    mask of rows to stop now (a client that went away)."""
    B, L = input_ids.shape
    if not isinstance(sampling, (list, tuple)):  # one group: all rows share settings and one generator
        groups = [_Group(list(range(B)), sampling, generator, 0, L, eos, tokenizer)]
    else:
        if len(sampling) != B:
            raise ValueError(f"{len(sampling)} sampling settings for {B} rows")
        gens = list(generator) if isinstance(generator, (list, tuple)) else [generator] * B
        lead = [0] * B if attention_mask is None else (attention_mask == 0).sum(1).tolist()
        groups = [_Group([i], s, gens[i], lead[i], L, eos, tokenizer) for i, s in enumerate(sampling)]
    limit = torch.zeros(B, dtype=torch.long)
    for g in groups:
        limit[g.rows] = g.sampling.max_new_tokens
    out = torch.empty((B, 0), dtype=torch.long)
    done = torch.zeros(B, dtype=torch.bool)
    eos_t = torch.tensor(eos, dtype=torch.long)
    for i in range(int(limit.max())):
        logits = step(out).float().cpu().clone()  # the backend may hand out its own buffer
        bad = torch.isnan(logits).any(-1) & ~done  # rows still generating
        if bool(bad.any()):
            from composer.errors import ComposerError

            raise ComposerError(
                f"the model produced NaN logits at new token {i} (rows {bad.nonzero().flatten().tolist()}): "
                "its weights or inputs hold NaN or overflow in this dtype"
            )
        seq = torch.cat([input_ids.cpu(), out], 1)
        nxt = torch.empty(B, dtype=torch.long)
        stopped = torch.zeros(B, dtype=torch.bool)
        for g in groups:
            nxt[g.rows], stopped[g.rows] = g.choose(seq[g.rows], logits[g.rows], banned)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        out = torch.cat([out, nxt[:, None]], 1)
        if streamer is not None:
            streamer.put(nxt)
        if eos:
            done |= torch.isin(nxt, eos_t)
        done |= stopped | (limit <= i + 1)
        if on_step is not None:
            cancel = on_step(nxt, done.clone())
            if cancel is not None:
                done |= cancel
        if bool(done.all()):
            break
    if streamer is not None:
        streamer.end()
    return out


class _Group:
    """Rows of a batch that share sampling settings: their logits processors, warpers, stop
    criteria and generator."""

    def __init__(self, rows: list[int], sampling, generator, lead: int, width: int, eos, tokenizer):
        self.rows, self.sampling, self.generator, self.lead = rows, sampling, generator, lead  # lead: padding
        self.processors = processors(sampling, width - lead, eos)
        self.warpers = warpers(sampling)
        self.stop = None
        if sampling.stop_strings:
            from transformers import StopStringCriteria

            self.stop = StopStringCriteria(tokenizer, sampling.stop_strings)

    def choose(self, seq: torch.Tensor, logits: torch.Tensor, banned: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (the next token of each row, whether a stop string ends the row with it)."""
        seq = seq[:, self.lead :]
        if self.processors:
            logits = self.processors(seq, logits)
        if banned:
            logits[:, banned] = float("-inf")
        if self.sampling.do_sample:
            scores = self.warpers(seq, logits)
            nxt = torch.multinomial(scores.softmax(-1), 1, generator=self.generator).squeeze(1)
        else:
            nxt = logits.argmax(-1)
        if self.stop is None:
            return nxt, torch.zeros_like(nxt, dtype=torch.bool)
        return nxt, self.stop(torch.cat([seq, nxt[:, None]], 1), None).cpu()


def eos_ids(eos_token_id, generation_config, tokenizer) -> list[int]:
    if eos_token_id is None:
        eos_token_id = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
        if eos_token_id is None:
            eos_token_id = tokenizer.eos_token_id
    if eos_token_id is None:
        return []
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


# -- generation_config.json ----------------------------------------------------------------------------
GENERATION_CONFIG = "generation_config.json"
_IDS = ("eos_token_id", "pad_token_id", "bos_token_id")


def write_generation_config(directory, gen, eos: list[int], pad: int | None, bos: int | None) -> None:
    """The spec's ``generation`` section and the special-token ids as transformers'
    ``generation_config.json`` (what checkpoints and bundles carry, as HF models do)."""
    from transformers import GenerationConfig

    values = {k: v for k, v in gen.model_dump().items() if v is not None}
    cfg = GenerationConfig(**values, eos_token_id=eos or None, pad_token_id=pad, bos_token_id=bos)
    cfg.save_pretrained(str(directory))


def read_generation_config(directory, gen):
    """``directory``'s ``generation_config.json`` over the spec's ``generation`` section (it is the
    default a user edits, as with transformers) -> (GenerationSpec, its EOS ids or None). Without
    the file: (``gen``, None). A setting composer does not implement (other than at its
    transformers default) or an invalid value is one InputError naming the file and the key."""
    import json
    from pathlib import Path

    from pydantic import ValidationError
    from transformers import GenerationConfig

    from composer.errors import InputError, validation_message
    from composer.spec import GenerationSpec

    path = Path(directory) / GENERATION_CONFIG
    if not path.is_file():
        return gen, None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read ({e})") from None
    fields = set(GenerationSpec.model_fields)
    defaults = GenerationConfig().to_dict()
    values = gen.model_dump()
    for k, v in raw.items():
        if k in fields:
            values[k] = v
        elif k not in (*_IDS, "transformers_version", "_from_model_config") and not _neutral(k, v, defaults):
            raise InputError(f"{path}: {k} = {v!r} is not supported (composer implements {sorted(fields)})")
    try:
        out = GenerationSpec.model_validate(values)
    except ValidationError as e:
        raise InputError(f"{path}: {validation_message(e, unknown='unknown setting')}") from None
    eos = raw.get("eos_token_id")
    eos = None if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return out, eos


# settings that leave transformers' generate as it is without them (what saved configs often spell out)
_NEUTRAL = {
    "num_beams": 1,
    "num_beam_groups": 1,
    "use_cache": True,
    "length_penalty": 1.0,
    "early_stopping": False,
    "diversity_penalty": 0.0,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "encoder_repetition_penalty": 1.0,
    "output_scores": False,
    "output_logits": False,
    "output_attentions": False,
    "output_hidden_states": False,
    "return_dict_in_generate": False,
    "renormalize_logits": False,
    "remove_invalid_values": False,
}


def _neutral(key: str, value, defaults: dict) -> bool:
    return value is None or (key in defaults and defaults[key] == value) or _NEUTRAL.get(key, object()) == value
