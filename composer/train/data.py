"""Training data: JSONL records -> tokenised conversations -> padded batches.

Three record formats (one JSON object per line); media paths resolve against ``media_root``
(default: the data file's directory):

- LLaVA: ``{"image": "a.png", "conversations": [{"from": "human", "value": "<image>\\nQ"},
  {"from": "gpt", "value": "A"}, ...]}``
- LTU: ``{"audio_id": "a.wav", "instruction": "Q", "output": "A"}``
- generic: ``{"<modality>": path | [paths], "prompt": "Q", "response": "A"}``

Each user turn is wrapped in the spec's prompt template. Media placeholders written in a
turn (LLaVA data: ``"<image>\nQ"``) stay where they are and the template's are dropped;
otherwise the first turn takes the template's placeholders. The loss covers the responses
(each followed by EOS) and nothing else. A bad record is reported with file and line, and
skipped or fatal (``on_bad``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from composer.errors import InputError, unencodable
from composer.prompting import has_chat_template

log = logging.getLogger("composer.train.data")
MAX_RECORD_CHARS = 1_000_000  # one JSONL record (a conversation); media are files, not inline
MAX_RECORD_BYTES = 4 * MAX_RECORD_CHARS  # UTF-8 spends at most 4 bytes on a character
IGNORE_INDEX = -100
_SKIP_CHUNK = 1 << 20  # an over-long line is skipped this many bytes at a time


def jsonl_lines(f):
    """``(line number, bytes)`` for each line of the binary file ``f``, read with a bounded
    ``readline``: a line over ``MAX_RECORD_BYTES`` comes as ``(n, None)`` and is skipped in 1 MiB
    chunks, never held whole (a 1 GB line costs 4 MB, not 2.4 GB)."""
    n = 0
    while True:
        raw = f.readline(MAX_RECORD_BYTES + 1)
        if not raw:
            return
        n += 1
        if len(raw) > MAX_RECORD_BYTES and not raw.endswith(b"\n"):
            del raw
            while not (chunk := f.readline(_SKIP_CHUNK)).endswith(b"\n") and chunk:
                pass
            yield n, None
            continue
        yield n, raw


def decode_record(raw: bytes | None) -> Any:
    """One JSONL line -> its JSON value; ValueError (UnicodeDecodeError, RecursionError: a record
    nested too deeply) naming what is wrong: too long, not UTF-8, not JSON, or a lone surrogate
    (a ``\\ud800`` escape decodes to a string no file system, tokenizer or UTF-8 writer takes)."""
    if raw is None:
        raise ValueError(f"record longer than {MAX_RECORD_BYTES} bytes exceeds the {MAX_RECORD_CHARS}-character limit")
    line = raw.decode("utf-8")
    if len(line) > MAX_RECORD_CHARS:
        raise ValueError(f"record of {len(line)} characters exceeds {MAX_RECORD_CHARS}")
    rec = json.loads(line)
    if "\\u" in line and (bad := unencodable(rec)) is not None:  # only an escape can make a surrogate
        char = next(c for c in bad[1] if "\ud800" <= c <= "\udfff").encode("unicode_escape").decode()
        raise ValueError(f"a lone surrogate {char} is not text (\\u escapes must pair to one character)")
    return rec


def media_file(p: str, m: str, shown: str | None = None) -> None:
    """ValueError naming the ``m`` path (``shown``, default ``p``) unless ``p`` is a file; a path
    the OS refuses (a 256-byte component, a NUL byte) is the same one-line error, not an OSError."""
    shown = p if shown is None else shown
    try:
        ok = Path(p).is_file()
    except (OSError, ValueError) as e:  # ENAMETOOLONG, EACCES ...; embedded NUL
        raise ValueError(f"{m} path {_clip(shown)}: {getattr(e, 'strerror', None) or e}") from None
    if not ok:
        raise ValueError(f"{m} file not found: {shown}")


def confined_path(root: Path, p: str, m: str) -> Path:
    """``p`` (relative to ``root``, or absolute) resolved; ValueError naming the ``m`` path unless it
    lies inside ``root`` (no absolute path, ``../`` or link out of it) or when the OS cannot resolve
    it (a loop of links, a component too long)."""
    try:
        full, inside = (root / p).resolve(), root.resolve()
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{m} path {_clip(p)}: {getattr(e, 'strerror', None) or e}") from None
    if not full.is_relative_to(inside):
        raise ValueError(f"{m} path {_clip(p)} leaves the media root {inside}")
    return full


def _clip(p: str, limit: int = 80) -> str:
    s = repr(p)
    return s if len(s) <= limit else s[: limit - 3] + "..."


@dataclass
class Example:
    turns: list[tuple[str, str]]  # (user text, response)
    items: dict[str, list[Any]] = field(default_factory=dict)  # modality -> media items, prompt order
    where: str = ""


def _media(value, root: Path, confine: bool = False) -> list:
    values = value if isinstance(value, list) else [value]
    out = []
    for v in values:
        if not isinstance(v, str) or not v:
            raise ValueError(f"media must be a path string, got {v!r}")
        p = Path(v) if Path(v).is_absolute() else root / v
        if confine:  # as batch generation confines media to --media-root
            confined_path(root, v, "media")
        out.append(str(p))
    return out


def _text_items(value, m: str) -> list[str]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str) and v.strip() for v in values):
        raise ValueError(f"`{m}` must be a non-empty string or a list of them (e.g. SMILES), got {value!r}")
    return list(values)


def parse_record(
    rec: Any, modalities: dict[str, str], root: Path, confine: bool = False, text: frozenset[str] = frozenset()
) -> Example:
    """One JSON object -> Example. ``modalities``: name -> placeholder. Raises ValueError.
    ``confine``: media paths must resolve inside ``root``. ``text``: the modalities whose items are
    text as written (SMILES strings for a molecule encoder), not file paths."""
    if not isinstance(rec, dict):
        raise ValueError(f"a record must be a JSON object, got {type(rec).__name__}")
    items = {m: _text_items(rec[m], m) if m in text else _media(rec[m], root, confine) for m in modalities if m in rec}
    if "conversations" in rec:  # LLaVA
        conv = rec["conversations"]
        if not isinstance(conv, list) or len(conv) < 2:
            raise ValueError("`conversations` must be a list of at least two turns")
        turns = []
        for i in range(0, len(conv) - 1, 2):
            h, g = conv[i], conv[i + 1]
            if not (isinstance(h, dict) and isinstance(g, dict)) or h.get("from") != "human" or g.get("from") != "gpt":
                raise ValueError(f"turns {i} and {i + 1} must be from 'human' then 'gpt'")
            if not isinstance(h.get("value"), str) or not isinstance(g.get("value"), str):
                raise ValueError(f"turns {i} and {i + 1} need string `value`s")
            turns.append((h["value"], g["value"]))
    elif "audio_id" in rec or "instruction" in rec:  # LTU
        if "audio" in modalities and "audio_id" in rec:
            items["audio"] = _media(rec["audio_id"], root, confine)
        for k in ("instruction", "output"):
            if not isinstance(rec.get(k), str):
                raise ValueError(f"`{k}` must be a string")
        turns = [(rec["instruction"], rec["output"])]
    elif "prompt" in rec and "response" in rec:
        if not isinstance(rec["prompt"], str) or not isinstance(rec["response"], str):
            raise ValueError("`prompt` and `response` must be strings")
        turns = [(rec["prompt"], rec["response"])]
    else:
        raise ValueError(
            "unknown record format: expected `conversations` (LLaVA), `instruction`/`output` (LTU) "
            "or `prompt`/`response`"
        )
    return Example(turns, items)


def read_jsonl(
    path: str | Path,
    modalities: dict[str, str],
    *,
    on_bad: str = "fail",
    media_root: str | Path | None = None,
    limit: int | None = None,
    confine: bool = False,
    text: frozenset[str] = frozenset(),
) -> list[Example]:
    """The records of a JSONL file (``limit``: the first that many good ones; the rest of the
    file is not read). ``on_bad``: "fail" raises InputError naming file:line; "skip" logs a
    warning and drops the record. ``confine``: media paths must resolve inside the media root.
    ``text``: modalities whose items are strings as written (``adapters.text_modalities``), e.g.
    ``{"molecule": "CCO"}``; they are checked by the encoder's preprocessing, not as files."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: data file not found")
    root = Path(media_root) if media_root else path.parent
    out: list[Example] = []
    with path.open("rb") as f:  # bytes: a line of invalid UTF-8 is one bad record, not a crash mid-file
        for n, raw in jsonl_lines(f):
            if raw is not None and not raw.strip():
                continue
            try:
                ex = parse_record(decode_record(raw), modalities, root, confine, text)
                for m, paths in ex.items.items():
                    for p in paths if m not in text else ():
                        media_file(p, m)
            except (ValueError, UnicodeDecodeError, RecursionError) as e:
                reason = "JSON nested too deeply" if isinstance(e, RecursionError) else str(e)
                msg = f"{path}:{n}: {reason}"
                if on_bad == "fail":
                    raise InputError(msg) from None
                log.warning("skipping bad record %s", msg)
                continue
            ex.where = f"{path}:{n}"
            out.append(ex)
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise InputError(f"{path}: no usable records")
    return out


def strip_placeholders(text: str, placeholders: list[str]) -> str:
    for ph in placeholders:
        text = text.replace(ph + "\n", "").replace(ph, "")
    return text.strip()


def tokenize_example(ex: Example, model) -> tuple[list[int], list[int]]:
    """-> (input_ids with placeholders expanded, labels with prompts masked). Prompts follow the
    spec's ``prompt.template``, or the tokenizer's chat template when the spec has none."""
    if model.prompt_template is None and has_chat_template(model.tokenizer):
        return _expand(*_chat_ids(ex, model), model)
    tok = model.tokenizer
    phs = list(model.placeholders.values())
    template = model.prompt_template or "".join(ph + "\n" for ph in phs) + "{instruction}"
    later = strip_placeholders(template, phs)
    ids: list[int] = [tok.bos_token_id] if tok.bos_token_id is not None else []
    labels: list[int] = [IGNORE_INDEX] * len(ids)
    eos = tok.eos_token_id
    for i, (user, response) in enumerate(ex.turns):
        if i == 0 and not any(ph in user for ph in phs):
            prompt = template.replace("{instruction}", user.strip())  # the template places the media
        else:  # media placeholders written in the turn itself (LLaVA data) stay where they are
            prompt = ("" if i == 0 else " ") + later.replace("{instruction}", user.strip())
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tok(
            " " + response.strip() if not prompt.endswith((" ", "\n")) else response.strip(), add_special_tokens=False
        )["input_ids"] + ([eos] if eos is not None else [])
        ids += p_ids + r_ids
        labels += [IGNORE_INDEX] * len(p_ids) + r_ids
    return _expand(ids, labels, model)


def _chat_ids(ex: Example, model) -> tuple[list[int], list[int]]:
    """A record as a chat: each turn's user text (the record's media placeholders first, one
    per item, unless the text places them) and the assistant's answer, rendered by the chat
    template; labels on the assistant's tokens (answer and end-of-turn), the rest masked."""
    tok = model.tokenizer
    phs = model.placeholders
    messages: list[dict] = []
    done = ""  # the rendered conversation so far
    ids: list[int] = []
    labels: list[int] = []
    for i, (user, response) in enumerate(ex.turns):
        if i == 0 and not any(ph in user for ph in phs.values()):
            user = "".join((phs[m] + "\n") * len(ex.items.get(m, [])) for m in phs) + user.strip()
        messages.append({"role": "user", "content": user})
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        messages.append({"role": "assistant", "content": response.strip()})
        full = tok.apply_chat_template(messages, tokenize=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise InputError(f"{ex.where}: the chat template does not render turns incrementally; cannot mask labels")
        p_ids = tok(prompt[len(done) :], add_special_tokens=False)["input_ids"]
        r_ids = tok(full[len(prompt) :], add_special_tokens=False)["input_ids"]
        ids += p_ids + r_ids
        labels += [IGNORE_INDEX] * len(p_ids) + r_ids
        done = full
    return ids, labels


def _expand(ids: list[int], labels: list[int], model) -> tuple[list[int], list[int]]:
    of_id = {pid: m for m, pid in model.placeholder_ids.items()}
    out_ids, out_labels = [], []
    for t, lab in zip(ids, labels, strict=True):
        m = of_id.get(t)
        n = model.num_tokens(m) if m else 1
        out_ids += [t] * n
        out_labels += [IGNORE_INDEX if m else lab] * n
    return out_ids, out_labels


class Collator:
    """Examples -> a right-padded batch with labels and one tensor (or dict) per modality.

    Holds what collating needs and not the model: the tokenizer, prompt template, placeholders,
    MM tokens per item, pad id, and each modality's processor and preprocessing function. It
    pickles, so ``DataLoader`` workers run it (fork or spawn) without a copy of the weights; it
    quacks like the model for ``tokenize_example``."""

    def __init__(self, model, max_length: int | None = None):
        self.tokenizer = model.tokenizer
        self.prompt_template = model.prompt_template
        self.placeholders = dict(model.placeholders)
        self.placeholder_ids = dict(model.placeholder_ids)
        self.tokens_per_item = {m: model.num_tokens(m) for m in model.encoders}
        self.pad_token_id = model.pad_token_id
        self.processors = {m: model.processors[m] for m in model.encoders}
        self.preprocessors = {m: type(model.encoders[m]).preprocess for m in model.encoders}
        self.max_length = max_length

    def num_tokens(self, modality: str) -> int:
        return self.tokens_per_item[modality]

    def __call__(self, examples: list[Example]) -> dict[str, Any]:
        rows = []
        items: dict[str, list] = {m: [] for m in self.processors}
        for ex in examples:
            ids, labels = tokenize_example(ex, self)
            for m, pid in self.placeholder_ids.items():
                n_ph = ids.count(pid) // self.num_tokens(m)
                have = len(ex.items.get(m, []))
                if n_ph != have:
                    raise InputError(
                        f"{ex.where}: the prompt has {n_ph} {m} placeholder(s) but the record gives {have} item(s)"
                    )
                items[m] += ex.items.get(m, [])
            if self.max_length and len(ids) > self.max_length:
                raise InputError(f"{ex.where}: {len(ids)} tokens exceed max_length {self.max_length}")
            rows.append((ids, labels))
        width = max(len(r[0]) for r in rows)
        pad = self.pad_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (ids, lab) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
            mask[i, : len(ids)] = 1
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
        for m, its in items.items():
            if its:
                batch[m] = self.preprocessors[m](self.processors[m], its)
        return batch
