"""What `compose build` and `compose inspect` print: components, parameters, insertion layers
and the analytic prefill FLOPs saving of DeepInsert vs inserting every modality at layer 0."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from composer.analysis.flops import saving

DEFAULT_TEXT_TOKENS = 64  # a typical instruction; the table says which length it assumes


@dataclass
class Row:
    component: str
    kind: str
    params: int
    trainable: int
    insert_at: str = ""
    tokens: str = ""


def _count(module) -> tuple[int, int]:
    total = sum(p.numel() for p in module.parameters())
    train = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return total, train


def summarize(model, text_tokens: int = DEFAULT_TEXT_TOKENS) -> tuple[list[Row], dict]:
    """-> (rows, facts). ``facts`` holds the numbers behind the FLOPs line (for JSON output)."""
    shape = model.adapter.shape
    from composer.adapters import encoder_type_of

    rows = [
        Row(
            "llm",
            f"{model.llm.config.model_type}, {shape.num_layers} layers, d={shape.hidden_size}",
            *_count(model.llm),
        )
    ]
    mm_tokens = {}
    for m in model.encoders:
        enc, proj = model.encoders[m], model.projectors[m]
        mm_tokens[m] = model.num_tokens(m)
        k = model.insert_at[m]
        rows.append(Row(f"{m}.encoder", encoder_type_of(enc), *_count(enc), insert_at=str(k)))
        rows.append(
            Row(
                f"{m}.projector",
                model.spec.modalities[m].projector.type,
                *_count(proj),
                insert_at=str(k),
                tokens=str(mm_tokens[m]),
            )
        )
    rows.append(Row("total", "", *_count(model)))
    save = saving(shape, text_tokens, mm_tokens, model.insert_at)
    facts = {
        "name": model.spec.name,
        "num_layers": shape.num_layers,
        "insert_at": model.insert_at,
        "mm_tokens_per_item": mm_tokens,
        "text_tokens_assumed": text_tokens,
        "prefill_flops_saving_vs_insert_at_0": save,
        "params": {r.component: {"total": r.params, "trainable": r.trainable} for r in rows},
    }
    return rows, facts


def summary_record(model, text_tokens: int = DEFAULT_TEXT_TOKENS) -> dict:
    """``summarize`` as plain JSON facts (``{"rows": [...], **facts}``), recorded in a checkpoint's
    ``composer.json`` and a bundle's manifest so that a model card needs no model."""
    rows, facts = summarize(model, text_tokens)
    return {"rows": [asdict(r) for r in rows], **facts}


def from_record(record: dict) -> tuple[list[Row], dict]:
    """The inverse of ``summary_record``: -> (rows, facts)."""
    facts = {k: v for k, v in record.items() if k != "rows"}
    return [Row(**r) for r in record["rows"]], facts


def human(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def render(rows: list[Row], facts: dict, console) -> None:
    from rich.table import Table

    t = Table(title=f"{facts['name']}", title_justify="left")
    for col in ("component", "kind", "params", "trainable", "insert_at", "tokens/item"):
        t.add_column(col, justify="right" if col in ("params", "trainable", "insert_at", "tokens/item") else "left")
    for r in rows:
        t.add_row(r.component, r.kind, human(r.params), human(r.trainable), r.insert_at, r.tokens)
    console.print(t)
    console.print(
        f"estimated prefill FLOPs saving vs insert_at 0: {facts['prefill_flops_saving_vs_insert_at_0']:.1%} "
        f"(LLM layers only; {facts['text_tokens_assumed']} text tokens + one item per modality)"
    )
