"""Prompts in, padded model inputs out; shared by the torch model and the ONNX pipeline."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from composer.errors import InputError, first_line


class Prepared(NamedTuple):
    """``prepare(..., errors="collect")``: ``batch`` holds the prompts at indices ``rows`` (None
    when none could be prepared); ``errors`` maps each failed prompt's index to a one-line message."""

    batch: dict[str, Any] | None
    rows: list[int]
    errors: dict[int, str]


def prepare_batch(
    tokenizer,
    prompts: str | list[str],
    *,
    placeholder_ids: dict[str, int],
    num_tokens: dict[str, int],
    placeholders: dict[str, str],
    preprocess: dict[str, Callable[[list], torch.Tensor]],
    padding_side: str = "left",
    max_positions: int | None = None,
    errors: str = "raise",
    add_special_tokens: bool = True,
    **modality_items,
) -> dict[str, Any] | Prepared:
    """Tokenise, expand each placeholder to ``num_tokens[m]`` slots, pad, preprocess media.

    Items of a modality are given in prompt order, row after row. Raises ``InputError`` when
    the number of placeholders and items differ, a modality is unknown, an item cannot be read
    or a prompt is longer than ``max_positions`` (the LLM's context) once expanded.

    ``errors="collect"`` (batch generation that must not stop at one bad item): each prompt and
    its items are checked on their own; returns ``Prepared(batch, rows, errors)`` where ``batch``
    holds the good prompts (at indices ``rows``) and ``errors`` maps a failed prompt's index to
    its message. Placeholder/item counts that differ over the whole batch still raise (the
    items cannot be assigned to prompts then). ``add_special_tokens=False`` for prompts a chat
    template formatted (they hold their special tokens already, as ``apply_chat_template``). Example::

        batch, rows, errors = model.prepare(prompts, image=paths, errors="collect")
        texts = model.decode(model.generate(**batch)) if batch else []   # texts[j] answers prompts[rows[j]]
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise InputError("no prompts given")
    if padding_side not in ("left", "right"):
        raise InputError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if errors not in ("raise", "collect"):
        raise InputError(f"errors must be 'raise' or 'collect', got {errors!r}")
    extra = sorted(set(modality_items) - set(placeholder_ids))
    if extra:
        raise InputError(f"unknown modality {extra}; this model has {sorted(placeholder_ids)}")
    rows, row_counts, counts = _tokenize(tokenizer, prompts, placeholder_ids, num_tokens, add_special_tokens)
    items_of = _items_of(counts, modality_items, placeholders)
    if errors == "collect":
        return _collect(
            tokenizer,
            prompts,
            rows,
            row_counts,
            items_of,
            placeholder_ids=placeholder_ids,
            num_tokens=num_tokens,
            placeholders=placeholders,
            preprocess=preprocess,
            padding_side=padding_side,
            max_positions=max_positions,
            add_special_tokens=add_special_tokens,
        )
    for i, r in enumerate(rows):
        _check_length(i, r, row_counts[i], num_tokens, placeholders, max_positions)
    batch: dict[str, Any] = {}
    for m, n in counts.items():
        if n:
            batch[m] = preprocess[m](items_of[m])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return {**_pad(rows, pad, padding_side), **batch}


def _tokenize(
    tokenizer, prompts: list[str], placeholder_ids: dict[str, int], num_tokens: dict[str, int], add_special_tokens: bool
):
    """Each prompt's token ids with every placeholder expanded to its modality's ``num_tokens``
    slots -> (rows, placeholders per modality of each row, placeholders per modality in all)."""
    modality_of = {pid: m for m, pid in placeholder_ids.items()}
    counts = {m: 0 for m in placeholder_ids}
    row_counts: list[dict[str, int]] = []
    rows = []
    for prompt in prompts:
        row, mine = [], dict.fromkeys(placeholder_ids, 0)
        for t in tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]:
            m = modality_of.get(t)
            if m is None:
                row.append(t)
            else:
                counts[m] += 1
                mine[m] += 1
                row.extend([t] * num_tokens[m])
        rows.append(row)
        row_counts.append(mine)
    return rows, row_counts, counts


def _items_of(counts: dict[str, int], modality_items: dict, placeholders: dict[str, str]) -> dict[str, list]:
    """The items given per modality as lists, one per placeholder of the prompts, or an ``InputError``."""
    items_of: dict[str, list] = {}
    for m, n in counts.items():
        items = modality_items.get(m)
        items_of[m] = [] if items is None else list(items) if isinstance(items, (list, tuple)) else [items]
        if len(items_of[m]) != n:
            raise InputError(
                f"{m}: the prompts contain {n} {placeholders[m]!r} placeholder(s) but {len(items_of[m])} {m} item(s) "
                "were given"
            )
    return items_of


def _pad(rows: list[list[int]], pad: int, padding_side: str) -> dict[str, torch.Tensor]:
    """Token rows padded with ``pad`` on ``padding_side`` -> {"input_ids", "attention_mask"}."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if padding_side == "left" else slice(0, len(r))
        ids[i, sl] = torch.tensor(r, dtype=torch.long)
        mask[i, sl] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _check_length(
    i: int,
    row: list[int],
    counts: dict[str, int],
    num_tokens: dict[str, int],
    placeholders: dict[str, str],
    max_positions: int | None,
) -> None:
    if max_positions is None or len(row) <= max_positions:
        return
    mm = ", ".join(f"{n} x {num_tokens[m]} for {placeholders[m]!r}" for m, n in counts.items() if n)
    raise InputError(
        f"prompt {i}: {len(row)} tokens"
        + (f" ({mm})" if mm else "")
        + f" exceed the LLM's context of {max_positions} positions (max_position_embeddings)"
    )


def _collect(tokenizer, prompts, rows, row_counts, items_of, *, max_positions, **kw) -> Prepared:
    """Check each prompt and its items alone, then prepare the good ones together."""
    start = dict.fromkeys(items_of, 0)
    failed: dict[int, str] = {}
    mine_of: list[dict[str, list]] = []
    for i, (row, counts) in enumerate(zip(rows, row_counts, strict=True)):
        mine = {m: items_of[m][start[m] : start[m] + n] for m, n in counts.items()}
        for m, n in counts.items():
            start[m] += n
        mine_of.append(mine)
        try:
            _check_length(i, row, counts, kw["num_tokens"], kw["placeholders"], max_positions)
            for m, its in mine.items():
                if its:
                    kw["preprocess"][m](its)
        except Exception as e:  # one bad item must not stop the batch: report it with its prompt
            msg = first_line(e)
            failed[i] = msg if isinstance(e, InputError) else f"{type(e).__name__}: {msg}"
    keep = [i for i in range(len(prompts)) if i not in failed]
    if not keep:
        return Prepared(None, [], failed)
    items = {m: [x for i in keep for x in mine_of[i][m]] for m in items_of}
    batch = prepare_batch(
        tokenizer,
        [prompts[i] for i in keep],
        max_positions=max_positions,
        **kw,
        **{m: v for m, v in items.items() if v},
    )
    return Prepared(batch, keep, failed)


def repeat_rows(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    modality_inputs: dict[str, Any],
    placeholder_ids: dict[str, int],
    num_tokens: dict[str, int],
    n: int,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Each row ``n`` times in a row (``num_return_sequences``), with its media items: -> the
    batch of B * n rows, rows of a prompt together (as transformers groups them)."""
    if n == 1:
        return input_ids, attention_mask, modality_inputs
    out = {}
    for m, x in modality_inputs.items():
        if not isinstance(x, torch.Tensor):
            raise InputError(f"num_return_sequences > 1 with {m} inputs (a multi-input encoder): repeat the prompt")
        per_row = ((input_ids == placeholder_ids[m]).sum(1) // num_tokens[m]).tolist()
        starts = [sum(per_row[:i]) for i in range(len(per_row))]
        idx = [j for s, c in zip(starts, per_row, strict=True) for _ in range(n) for j in range(s, s + c)]
        out[m] = x[torch.tensor(idx, dtype=torch.long, device=x.device)]
    return input_ids.repeat_interleave(n, 0), attention_mask.repeat_interleave(n, 0), out


def check_window(width: int, max_new_tokens: int, window: int | None) -> None:
    """Sliding-window attention (Mistral v0.1's 4096, Qwen2/3 with ``use_sliding_window``) lets a
    token see only the last ``window`` positions of the padded sequence. composer's layers attend
    to the whole causal prefix, which equals the windowed attention as long as the padded
    sequence, generated tokens included, fits the window; past it, refuse rather than differ."""
    if window is None or width + max_new_tokens <= window:
        return
    raise InputError(
        f"the padded sequence has {width} slots; with max_new_tokens={max_new_tokens} it exceeds the LLM's "
        f"sliding attention window of {window} (config.sliding_window), which composer does not "
        "implement: shorten the input, or set `llm.config.sliding_window: null` in the spec if the "
        "checkpoint attends fully (Mistral v0.2 and later)"
    )


def check_context(attention_mask: torch.Tensor, max_new_tokens: int, max_positions: int | None) -> None:
    """Before generating: the longest prompt (real tokens) plus ``max_new_tokens`` must fit the
    LLM's context; past it, learned position tables (OPT) index out of range mid-generation and
    RoPE models run outside what they were trained on."""
    if max_positions is None:
        return
    longest = int(attention_mask.sum(1).max()) if attention_mask.numel() else 0
    if longest + max_new_tokens > max_positions:
        raise InputError(
            f"the longest prompt has {longest} tokens; with max_new_tokens={max_new_tokens} it exceeds the "
            f"LLM's context of {max_positions} positions (max_position_embeddings): shorten the prompt or "
            "lower max_new_tokens"
        )


# -- chat prompts -------------------------------------------------------------------------------------
def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def content_text(content: str | list, placeholders: dict[str, str], where: str) -> str:
    """A message's content -> text. ``content`` is a string, or HF-processor-style parts
    ``{"type": "text", "text": ...}`` and ``{"type": "<modality>"}``; a modality part becomes its
    placeholder, followed by a newline when text follows (LLaVA's ``<image>\\n...``), and text
    parts are joined with a space."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InputError(f"{where}.content: must be a string or a list of parts, got {type(content).__name__}")
    pieces: list[tuple[bool, str]] = []  # (is a placeholder, text)
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            pieces.append((False, part["text"]))
        elif kind in placeholders:
            pieces.append((True, placeholders[kind]))
        else:
            raise InputError(
                f"{where}.content[{j}]: want {{'type': 'text', 'text': str}} or {{'type': <modality>}} with a "
                f"modality of this model {sorted(placeholders)}, got {part!r}"
            )
    out = ""
    for j, (is_ph, text) in enumerate(pieces):
        if j and not pieces[j - 1][0]:
            out += " " if not is_ph else "\n"
        out += text + ("\n" if is_ph and j + 1 < len(pieces) and not pieces[j + 1][0] else "")
    return out


def special_strings(tokenizer, placeholders: dict[str, str]) -> list[str]:
    """The tokenizer's special-token strings other than the modality placeholders (``</s>``,
    ``<|im_end|>``, ...), sorted."""
    names = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(tok, "special", False):
            names.add(str(tok))
    names -= set(placeholders.values())
    return sorted(n for n in names if n)


def refuse_special_tokens(tokenizer, text: str, placeholders: dict[str, str], where: str) -> None:
    """User text (a message's content, a CLI instruction) may not carry special tokens: the chat
    template and the tokenizer place those (a ``<|im_end|>`` typed in a message would end the turn
    and let the text forge another role's turn). The modality placeholders are allowed. The error
    names the first special token in the text."""
    found = [(text.find(name), -len(name), name) for name in special_strings(tokenizer, placeholders) if name in text]
    if found:
        name = min(found)[2]
        raise InputError(
            f"{where}: contains the special token {name!r}; user text may not carry special tokens "
            "(the chat template places them)"
        )


def render_chat(tokenizer, messages: list, placeholders: dict[str, str], *, where: str = "messages") -> str:
    """One conversation (a list of ``{"role", "content"}`` messages) -> prompt text formatted with the
    tokenizer's chat template, ending with the generation prompt (the assistant turn to fill)."""
    if not has_chat_template(tokenizer):
        raise InputError(
            f"{where}: this model's tokenizer has no chat template; give prompt strings (the spec's prompt.template)"
        )
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where}: must be a non-empty list of messages")
    flat = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "user", "assistant"):
            raise InputError(f"{where}[{i}].role: must be 'system', 'user' or 'assistant'")
        text = content_text(msg.get("content", ""), placeholders, f"{where}[{i}]")
        refuse_special_tokens(tokenizer, text, placeholders, f"{where}[{i}].content")
        flat.append({"role": msg["role"], "content": text})
    try:
        return tokenizer.apply_chat_template(flat, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # jinja2 errors, e.g. a template that raises on the order of roles
        raise InputError(f"{where}: the chat template refused the messages: {first_line(e)}") from None


def format_instruction(
    tokenizer,
    template: str | None,
    placeholders: dict[str, str],
    instruction: str,
    items: dict[str, int] | None = None,
) -> str:
    """An instruction -> a full prompt with each modality's placeholder once per item: the spec's
    ``prompt.template`` when it has one, else the tokenizer's chat template (one user message:
    the modality parts, then the text), else the placeholders on a line each, then the text.
    ``items``: per modality, how many items go with this prompt (default: one of each); a modality
    with none gets no placeholder, so a text-only question works on a multimodal model (a spec
    template's placeholder for it is left out, with the line break after it; a template's single
    placeholder is repeated for several items). The instruction is user text: special tokens in it
    are refused (``refuse_special_tokens``)."""
    refuse_special_tokens(tokenizer, instruction, placeholders, "instruction")
    counts = {m: 1 for m in placeholders} if items is None else {m: items.get(m, 0) for m in placeholders}
    if template is not None:
        for m, ph in placeholders.items():
            if counts[m] == 0:
                template = template.replace(ph + "\n", "").replace(ph, "")
            elif counts[m] > 1 and template.count(ph) == 1:  # several items where the template has one
                template = template.replace(ph, ph * counts[m])
        return template.replace("{instruction}", instruction)
    if has_chat_template(tokenizer):
        parts = [{"type": m} for m in placeholders for _ in range(counts[m])]
        parts.append({"type": "text", "text": instruction})
        return render_chat(tokenizer, [{"role": "user", "content": parts}], placeholders)
    return "".join(ph + "\n" for m, ph in placeholders.items() for _ in range(counts[m])) + instruction


def placeholder_mismatch(prompt: str, placeholders: dict[str, str], items: dict[str, int]) -> str | None:
    """Why ``prompt`` cannot take ``items`` (per modality, a count) on its own, or None: each
    modality's placeholder must appear once per item. Checked per prompt before prompts are batched
    together, where only the totals are checked and one prompt's extra placeholder would take the
    next prompt's item."""
    for m, ph in placeholders.items():
        want, got = prompt.count(ph), items.get(m, 0)
        if want != got:
            return f"the prompt has {want} {ph!r} placeholder(s) but {got} {m} item(s) were given"
    return None


def resolve_prompts(
    tokenizer, prompts, messages, template: str | None, placeholders: dict[str, str]
) -> tuple[list[str], bool]:
    """``prepare``'s prompts from either ``prompts`` (strings) or ``messages`` (one conversation per
    row) -> (prompt strings, add_special_tokens). Chat-formatted text carries its special tokens:
    it is tokenized without adding any (as ``apply_chat_template`` does), and so are prompt strings
    of a model that formats with its chat template (no ``prompt.template`` in the spec)."""
    if (prompts is None) == (messages is None):
        raise InputError("give exactly one of prompts or messages")
    if messages is not None:
        if not isinstance(messages, list) or not messages:
            raise InputError("messages: must be a non-empty list of conversations (lists of messages)")
        if isinstance(messages[0], dict):
            messages = [messages]  # one conversation
        return [
            render_chat(tokenizer, conv, placeholders, where=f"messages[{i}]") for i, conv in enumerate(messages)
        ], False
    return ([prompts] if isinstance(prompts, str) else prompts), adds_special_tokens(tokenizer, template)


def adds_special_tokens(tokenizer, template: str | None) -> bool:
    """Whether prompt strings are tokenized with the tokenizer's special tokens added (BOS...):
    yes for a spec's ``prompt.template``; no when prompts come from the chat template."""
    return template is not None or not has_chat_template(tokenizer)
