"""Batch generation over a JSONL file (``compose generate TARGET --input FILE -o OUT``).

One record per line: ``{"prompt": "What is it?", "<modality>": path | [paths], ...}`` (media paths
relative to ``media_root``, default: the input file's directory; other keys, e.g. an ``id``, are
copied to the answer). Each output line is the record's ``index`` (its 0-based position among
the input's records), its other keys, and ``answer`` (the generated text) or ``error`` (one line
naming what is wrong with that record: bad JSON, no prompt, a missing or unreadable file, a
prompt too long). A bad record costs only its own row: the others still run, in batches of
``batch_size`` (left-padded together). The output is written to a temporary file and renamed
when complete, so an interrupted run leaves no partial file; it replaces an existing file only
with ``overwrite``, and is never the input file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from composer.adapters import encoder_types, text_modalities
from composer.errors import InputError, first_line
from composer.prompting import placeholder_mismatch
from composer.train.data import confined_path, decode_record, jsonl_lines, media_file


def read_requests(
    path: Path, modalities: list[str], media_root: Path | None, text_modalities: frozenset[str] = frozenset()
) -> list[dict[str, Any]]:
    """-> one entry per non-blank line: ``{"record": {...}}`` with its prompt and media resolved,
    or ``{"record": {...}, "error": "..."}``. Values of ``text_modalities`` (encoders that read
    text, e.g. SMILES strings) are items as written, not file paths."""
    if not path.is_file():
        raise InputError(f"{path}: input file not found")
    root = (media_root or path.parent).resolve()
    out: list[dict[str, Any]] = []
    with path.open("rb") as f:
        for n, raw in jsonl_lines(f):  # a bounded readline: an over-long line is refused unread
            if raw is not None and not raw.strip():
                continue
            where = f"{path}:{n}"
            try:
                rec = decode_record(raw)
                if not isinstance(rec, dict):
                    raise ValueError("a record must be a JSON object")
            except (ValueError, UnicodeDecodeError, RecursionError) as e:
                out.append({"record": {}, "error": f"{where}: {first_line(e)}"})
                continue
            try:
                prompt = rec.get("prompt")
                if not isinstance(prompt, str) or not prompt.strip():
                    raise ValueError("needs a non-empty string `prompt`")
                media: dict[str, list[str]] = {}
                for m in modalities:
                    v = rec.get(m)
                    if v is None:
                        continue
                    paths = v if isinstance(v, list) else [v]
                    if m in text_modalities:
                        if not all(isinstance(p, str) and p for p in paths):
                            raise ValueError(f"`{m}` must be a non-empty string or a list of them")
                        media[m] = list(paths)
                        continue
                    if not all(isinstance(p, str) for p in paths):
                        raise ValueError(f"`{m}` must be a path or a list of paths")
                    resolved = []
                    for p in paths:
                        full = confined_path(root, p, m)
                        media_file(str(full), m, shown=p)
                        resolved.append(str(full))
                    media[m] = resolved
                out.append({"record": rec, "prompt": prompt, "media": media, "where": where})
            except ValueError as e:
                out.append({"record": rec, "error": f"{where}: {e}"})
    if not out:
        raise InputError(f"{path}: no records")
    return out


def generate_jsonl(
    model,
    input_path: str | Path,
    output_path: str | Path,
    *,
    batch_size: int = 8,
    raw: bool = False,
    media_root: str | Path | None = None,
    progress: bool = True,
    overwrite: bool = False,
    **generate_kwargs,
) -> dict[str, int]:
    """Answer every record of ``input_path`` with ``model`` (a ``ComposedModel`` or an
    ``OnnxPipeline``), writing ``output_path`` (an existing one only with ``overwrite``; never
    the input itself); -> ``{"answered": n, "failed": m}``."""
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    input_path, output_path = Path(input_path), Path(output_path)
    check_output(input_path, output_path, overwrite)
    requests = read_requests(
        input_path,
        list(model.encoders),
        Path(media_root) if media_root else None,
        text_modalities(encoder_types(model)),
    )
    results: list[dict[str, Any]] = [{} for _ in requests]
    for i, r in enumerate(requests):
        extra = {k: v for k, v in r["record"].items() if k not in ("index", "answer", "error")}
        results[i] = {"index": i, **extra}
        if "error" in r:
            results[i]["error"] = r["error"]
    todo = [i for i, r in enumerate(requests) if "error" not in r]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(requests), initial=len(requests) - len(todo), desc="generate", unit="prompt")
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        keep, prompts = [], []
        for i in chunk:
            text, counts = requests[i]["prompt"], {m: len(v) for m, v in requests[i]["media"].items()}
            try:
                prompt = text if raw else model.format_prompt(text, items=counts)
            except InputError as e:  # e.g. special tokens in the prompt
                results[i]["error"] = f"{requests[i]['where']}: {e}"
                continue
            wrong = placeholder_mismatch(prompt, model.placeholders, counts)
            if wrong is not None:  # checked per record: batched, only the totals would be
                results[i]["error"] = f"{requests[i]['where']}: {wrong}"
                continue
            prompts.append(prompt)
            keep.append(i)
        if keep:
            _run_chunk(model, requests, results, keep, prompts, generate_kwargs)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    check_output(input_path, output_path, overwrite)  # again: it may have appeared while the model ran
    _write_atomic(output_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results))
    failed = sum("error" in r for r in results)
    return {"answered": len(results) - failed, "failed": failed}


def _run_chunk(model, requests, results, rows: list[int], prompts: list[str], generate_kwargs) -> None:
    items: dict[str, list[str]] = {}
    for i in rows:
        for m, paths in requests[i]["media"].items():
            items.setdefault(m, []).extend(paths)
    try:
        prepared = model.prepare(prompts, errors="collect", **items)
    except InputError as e:  # counts that cannot be matched to prompts: each record on its own
        if len(rows) == 1:
            results[rows[0]]["error"] = f"{requests[rows[0]]['where']}: {e}"
            return
        for i, p in zip(rows, prompts, strict=True):
            _run_chunk(model, requests, results, [i], [p], generate_kwargs)
        return
    for j, msg in prepared.errors.items():
        results[rows[j]]["error"] = f"{requests[rows[j]]['where']}: {msg}"
    if prepared.batch is None:
        return
    ids = model.generate(**prepared.batch, **generate_kwargs)
    texts = [t.strip() for t in model.tokenizer.batch_decode(ids, skip_special_tokens=True)]
    n = len(texts) // len(prepared.rows)  # num_return_sequences: a record's n answers are together
    for j, r in enumerate(prepared.rows):
        if n == 1:
            results[rows[r]]["answer"] = texts[j]
        else:
            results[rows[r]]["answers"] = texts[j * n : (j + 1) * n]


def check_output(input_path: Path, output_path: Path, overwrite: bool) -> None:
    """-o OUT must not be the input (by path, link or hard link: replacing it would destroy the
    records), nor a directory, nor an existing file (a dangling link included) without overwrite."""
    same = os.path.realpath(output_path) == os.path.realpath(input_path)
    if not same and output_path.exists() and input_path.exists():
        same = os.path.samefile(output_path, input_path)
    if same:
        raise InputError(f"-o {output_path}: is the input file {input_path}; write the answers elsewhere")
    if output_path.is_dir():
        raise InputError(f"-o {output_path}: is a directory (want the answers' JSONL file)")
    if os.path.lexists(output_path) and not overwrite:
        raise InputError(f"-o {output_path}: exists (pass --overwrite to replace it)")


def _write_atomic(path: Path, text: str) -> None:
    from composer.checkpoint import current_umask

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o666 & ~current_umask())  # mkstemp's 0600: the mode open() gives
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
