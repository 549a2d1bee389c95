"""Train the demo model that ``specs/smol/llava_demo.yaml`` ships: a small ViT + mlp2x_gelu projector on
SmolLM2-135M-Instruct (frozen), image tokens entering at layer 15 of 30.

The task is benchmarks/deepinsert_quality.py's (pictures of one to three coloured shapes in columns;
colour, shape, position and count questions with one-word answers), with a stronger recipe than the
benchmark's equal-budget comparison, because a demo has to answer its own pictures right:

1. the ViT is pretrained to say what each column holds (as in the benchmark, for longer);
2. the encoder and projector then train together through the frozen LLM at k = 15 on multi-turn
   LLaVA-format records (several questions about one picture per record), LLM frozen.

The held-out accuracy (layouts never seen in training, one question per record) and every answer on
the shipped pictures are printed and written to OUT/demo_results.json. The weights go to
``--demo-out`` (default specs/smol/demo; ``--spec`` trains another single-image spec, the tests use
the 4-layer twin): ``vision/`` (an HF CLIPVisionModel dir with its image
processor) and ``projector.safetensors``; the pictures to specs/smol/assets/ (with ``--quick``, both
under OUT).

    python benchmarks/train_demo.py --out out/demo --threads 2        # ~40 min on 2 cores
    python benchmarks/train_demo.py --out out/demo --quick            # a smoke run (minutes)

``--pretrained`` trains ``specs/smol/llava_dinov2_demo.yaml`` instead (DINOv2 frozen, no encoder
pretraining), in LLaVA's two stages: without ``--lora`` the projector alone (stage 1, written to
specs/smol/demo_dinov2/projector.safetensors), then with ``--lora 8`` that projector together with
rank-8 LoRA on the LLM's layers k..N-1 (stage 2; projector.safetensors and llm_lora.safetensors):

    python benchmarks/train_demo.py --pretrained --out out/demo-dinov2 --records 3200 --steps 800 --threads 2
    python benchmarks/train_demo.py --pretrained --lora 8 --lr 5e-4 --out out/s2 --records 3200 --steps 800 --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deepinsert_quality as dq  # noqa: E402

ROOT = dq.ROOT
DEMO_OUT = ROOT / "specs" / "smol" / "demo"
DINOV2_SPEC = ROOT / "specs" / "smol" / "llava_dinov2_demo.yaml"
DINOV2_OUT = ROOT / "specs" / "smol" / "demo_dinov2"
ASSETS = ROOT / "specs" / "smol" / "assets"
TEXT_CACHE = ROOT / "out" / "smollm2_text_answers.json"  # base_answers' cache, per LLM
TEXT_PROBE = "What is the capital of France?"  # the README's text-only question
# The shipped pictures: (file name, scene, seed of the drawing). Both layouts are in the training split.
PICTURES = (
    ("red_circle.png", dq.DEMO_SCENE, 1),
    ("two_shapes.png", ((0, "square", "blue"), (2, "triangle", "yellow")), 2),
)


WHERE = {"left": "on the left", "middle": "in the middle", "right": "on the right"}


def caption(scene) -> str:
    """A one-sentence description of a layout, every object with its colour, shape and column, left
    to right: "A blue square on the left and a yellow triangle on the right." """
    parts = [f"a {colour} {shape} {WHERE[dq.COLUMNS[col]]}" for col, shape, colour in scene]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + "."


DESCRIBE = "Describe the picture."


def by_position(scene) -> list[tuple[str, str, str]]:
    """Questions that name an object by its column and ask its shape or colour ("What shape is on
    the left?"): binding in the direction the held-out questions leave out (they name an object by
    colour or shape and ask its column). Pictures of several shapes only; training records only."""
    if len(scene) < 2:
        return []
    qs = []
    for col, shape, colour in scene:
        where = WHERE[dq.COLUMNS[col]]
        qs += [("shape", f"What shape is {where}?", shape), ("colour", f"What colour is the shape {where}?", colour)]
    return qs


def conversations(
    scenes,
    n: int,
    turns: int,
    rng: random.Random,
    describe: float = 0.0,
    by_count: tuple[float, ...] | None = None,
    position_questions: bool = False,
) -> list[dict]:
    """n multi-turn records: a layout (the number of shapes uniform in 1-3, or weighted by
    ``by_count``), up to ``turns`` of its questions in random order, the picture's own drawing seed.
    ``describe``: the share of records whose last turn asks for the picture's ``caption`` (every
    binding of colour, shape and column in one answer, as LLaVA's stage 1 trains on captions).
    ``position_questions``: the questions drawn from also include ``by_position``'s."""
    by_n = {m: [sc for sc in scenes if len(sc) == m] for m in (1, 2, 3)}
    out = []
    for _ in range(n):
        group = by_n[rng.choice((1, 2, 3)) if by_count is None else rng.choices((1, 2, 3), by_count)[0]]
        scene = group[rng.randrange(len(group))]
        qs = dq.questions(scene) + (by_position(scene) if position_questions else [])
        rng.shuffle(qs)
        qa = [(q, a) for _, q, a in qs[:turns]]
        if describe and rng.random() < describe:
            qa.append((DESCRIBE, caption(scene)))  # last: the questions before it read the picture, not the caption
        out.append({"scene": scene, "qa": qa, "draw_seed": rng.randrange(2**31)})
    return out


# General questions whose answers by the pretrained LLM (adapters off) stage 2 mixes into its records,
# so that the adapters keep the LLM's text answers (LLaVA-1.5 mixes ShareGPT text chats for the same
# reason). Templates x fillers; the split into training and held-out prompts is by seed.
_COUNTRIES = (
    "France Germany Italy Spain Portugal Japan China India Brazil Canada Mexico Egypt Kenya Norway Sweden Poland "
    "Greece Turkey Russia Australia Argentina Chile Peru Ireland Austria Belgium Netherlands Denmark Finland "
    "Thailand Vietnam Morocco Nigeria Cuba Iceland"
).split()
_THINGS = (
    "a volcano|a computer|photosynthesis|gravity|a rainbow|democracy|an atom|a glacier|the internet|a vaccine|"
    "an eclipse|a bicycle|a library|electricity|a desert|the moon|a hurricane|a telescope|an orchestra|a bridge|"
    "a battery|a cloud|a river|a piano|a museum|friction|a magnet|a forest|an earthquake|a calendar"
).split("|")
_TOPICS = (
    "the ocean|autumn|coffee|a busy city|mountains|friendship|the night sky|a garden|winter|music|a train journey|"
    "a rainy day|books|the sea|breakfast|a quiet village|summer holidays|a football match|the stars|cooking"
).split("|")
_WORDS = "hot|big|fast|happy|light|early|strong|open|young|rich|full|hard|loud|high|old|wet|clean|near".split("|")
_TEMPLATES = (
    ("What is the capital of {}?", _COUNTRIES),
    ("Explain what {} is in one sentence.", _THINGS),
    ("Write one sentence about {}.", _TOPICS),
    ("What is the opposite of '{}'?", _WORDS),
    ("Give me a short fact about {}.", _COUNTRIES),
    ("Why is {} useful?", _THINGS),
    ("Describe {} in a few words.", _TOPICS),
    ("What language do people speak in {}?", _COUNTRIES),
)


def general_prompts(seed: int) -> tuple[list[str], list[str]]:
    """Text-only questions, shuffled by ``seed`` -> (training prompts, 40 held-out prompts)."""
    prompts = [t.format(x) for t, fill in _TEMPLATES for x in fill]
    prompts += [f"What is {a} plus {b}?" for a, b in ((2, 3), (7, 5), (12, 9), (20, 22), (6, 7), (15, 30))]
    random.Random(seed).shuffle(prompts)
    return prompts[40:], prompts[:40]


def greedy_text(model, prompts: list[str], max_new_tokens: int, batch: int = 16, progress=None) -> list[str]:
    """The model's greedy answers to text-only ``prompts``; an answer the token limit cut ends at its
    last full sentence."""
    import torch

    answers = []
    with torch.inference_mode():
        for i in range(0, len(prompts), batch):
            inputs = model.prepare([model.format_prompt(q, items={}) for q in prompts[i : i + batch]])
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            for ids, text in zip(out.tolist(), model.decode(out), strict=True):
                text = text.strip()
                cut = len(ids) == max_new_tokens and model.pad_token_id not in ids and "." in text
                answers.append(text[: text.rfind(".") + 1] if cut else text)
            if progress:
                progress(f"text answers {min(i + batch, len(prompts))}/{len(prompts)}")
    return answers


@contextlib.contextmanager
def adapters_off(module):
    """peft's LoRA layers inside ``module`` bypassed for the ``with`` block (``enable_adapters``)."""
    layers = [m for m in module.modules() if hasattr(m, "enable_adapters") and hasattr(m, "lora_A")]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


def base_answers(model, prompts: list[str], cache: Path | None = None, progress=None) -> list[str]:
    """The pretrained LLM's greedy answers (64 tokens at most): ``greedy_text`` with the LLM's LoRA
    adapters off. ``cache``: a JSON file of {prompt: answer} read first and updated (same LLM only)."""
    known = json.loads(cache.read_text()) if cache and cache.is_file() else {}
    todo = [q for q in dict.fromkeys(prompts) if q not in known]
    if todo:
        with adapters_off(model.llm):
            known.update(zip(todo, greedy_text(model, todo, 64, progress=progress), strict=True))
        if cache:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")  # concurrent runs: no shared temp file
            tmp.write_text(json.dumps(known, indent=1, ensure_ascii=False))
            tmp.replace(cache)
    return [known[q] for q in prompts]


def text_agreement(answers: list[str], reference: list[str], tokenizer, tokens: int = 8) -> float:
    """Share of answers whose first ``tokens`` tokens equal the reference answer's."""
    ids = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"][:tokens]  # noqa: E731
    return sum(ids(a) == ids(r) for a, r in zip(answers, reference, strict=True)) / len(answers)


def text_mix(model, n_records: int, share: float, seed: int, cache: Path | None, say=print, quick: bool = False):
    """The text-only side of a stage-2 mix -> (LLaVA-format text-only records, held-out prompts, the
    pretrained LLM's answers to them). ``share`` of all records are text-only: the training prompts
    in turn, each answered by the pretrained LLM (``base_answers``)."""
    text_train, text_test = general_prompts(seed)
    if quick:
        text_train, text_test = text_train[:8], text_test[:3]
    text_test.append(TEXT_PROBE)
    say(f"the pretrained LLM's answers to {len(text_train) + len(text_test)} text-only questions")
    base_test = base_answers(model, text_test, cache)
    records = []
    if share:
        base_train = base_answers(model, text_train, cache, progress=say)
        n = round(n_records * share / (1 - share))
        records = [
            {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": ans}]}
            for q, ans in ((text_train[i % len(text_train)], base_train[i % len(text_train)]) for i in range(n))
        ]
    return records, text_test, base_test


def text_report(model, text_test: list[str], base_test: list[str]) -> dict:
    """How far training moved the text-only answers: agreement with the pretrained LLM's on the
    held-out prompts, and the last few (the README's probe last) side by side."""
    now = greedy_text(model, text_test, 64)
    return {
        "held_out_prompts": len(text_test),
        "agreement_first_8_tokens": text_agreement(now, base_test, model.tokenizer),
        "examples": [
            {"prompt": q, "pretrained": b, "trained": t}
            for q, b, t in zip(text_test[-6:], base_test[-6:], now[-6:], strict=True)
        ],
    }


def write_jsonl(path: Path, records: list[dict], seed: int) -> Path:
    """``records`` shuffled (by ``seed``) into a JSONL file, written to a temp name, then renamed."""
    lines = [json.dumps(r) for r in records]
    random.Random(seed).shuffle(lines)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    tmp.replace(path)
    return path


def item_demo_args(ap: argparse.ArgumentParser, out: str, spec: Path, demo_out: Path, **defaults) -> None:
    """The options every one-item-per-record demo (molecules, speech) shares."""
    d = {"records": 4000, "turns": 3, "steps": 800, "batch_size": 8, "lr": 5e-4, "per_kind": 60} | defaults
    ap.add_argument("--out", type=Path, default=Path(out))
    ap.add_argument("--records", type=int, default=d["records"], help="multi-turn training records")
    ap.add_argument("--turns", type=int, default=d["turns"], help="questions per training record")
    ap.add_argument("--steps", type=int, default=d["steps"])
    ap.add_argument("--batch-size", type=int, default=d["batch_size"])
    ap.add_argument("--lr", type=float, default=d["lr"])
    ap.add_argument("--text-mix", type=float, default=0.2, metavar="F", help="share of text-only records")
    ap.add_argument("--per-kind", type=int, default=d["per_kind"], help="held-out questions per kind")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="a smoke run: few records and steps")
    ap.add_argument("--spec", type=Path, default=spec, help="default: %(default)s")
    ap.add_argument(
        "--demo-out",
        type=Path,
        default=None,
        help=f"where the weights go (default: {demo_out}, the shipped ones; with --quick, OUT/weights)",
    )
    ap.set_defaults(shipped_out=demo_out)
    ap.add_argument(
        "--insert-at",
        type=int,
        default=None,
        metavar="K",
        help="insert the item's tokens at layer K instead of the spec's (LoRA then on layers K..N-1)",
    )


def build_demo_model(
    spec_path: Path,
    modality: str,
    threads: int | None,
    insert_at: int | None = None,
    feature_layer: int | None = None,
    weights: Path | None = None,
):
    """The demo spec's model with its projector and LLM adapters from their random init, or, with
    ``weights``, from that folder's ``projector.safetensors`` and ``llm_lora.safetensors`` (what
    ``item_demo`` writes); with ``insert_at``, the item's tokens enter at that layer and the LLM's
    LoRA (if any) covers the layers from there to the last, as the spec's own adapters cover those
    from its ``insert_at``; with ``feature_layer``, the encoder's output is read from that layer."""
    import torch

    import composer

    if threads:
        torch.set_num_threads(threads)
    spec = composer.load_spec(spec_path)
    spec.modalities[modality].projector.weights = str(weights / "projector.safetensors") if weights else None
    if spec.llm.lora is not None:
        spec.llm.lora.weights = str(weights / "llm_lora.safetensors") if weights else None
    if feature_layer is not None:
        spec.modalities[modality].encoder.feature_layer = feature_layer
    if insert_at is not None:
        spec.modalities[modality].insert_at = insert_at
        if spec.llm.lora is not None and spec.llm.lora.layers:
            spec.llm.lora.layers = list(range(insert_at, max(spec.llm.lora.layers) + 1))
    return composer.build(spec)


def demo_config(a, train_file: Path, out: Path):
    """The demos' training settings: ``a``'s steps, batch size, learning rate and seed; warm-up 5%,
    cosine; the spec's train modes (``stage=None``); OUT/run."""
    from composer.train import TrainConfig

    return TrainConfig(
        data=str(train_file),
        output=str(out / "run"),
        stage=None,
        max_steps=a.steps,
        batch_size=a.batch_size,
        lr=a.lr,
        warmup_ratio=0.05,
        seed=a.seed,
        overwrite=True,
        log_every=10,
        progress=sys.stderr.isatty(),
    )


def run_results(a, summary: dict, train_s: float, right: list[bool], **fields) -> dict:
    """The results every demo run writes: its settings, ``fields``, training loss and time, held-out
    accuracy with its Wilson interval, threads."""
    import torch

    lo, hi = dq.wilson(sum(right), len(right))
    return {
        "settings": {key: str(v) if isinstance(v, Path) else v for key, v in vars(a).items()},
        **fields,
        "final_loss": statistics.mean(summary["losses"][-10:]),
        "step_time_s": summary["median_step_time_s"],
        "train_seconds": train_s,
        "held_out_accuracy": sum(right) / len(right),
        "ci95": [lo, hi],
        "threads": torch.get_num_threads(),
    }


def smoke_safe(given: Path | None, a, name: str, shipped: Path) -> Path:
    """Where a demo writes something the repository ships: ``given`` (its option); else the shipped
    folder, but OUT/``name`` for a ``--quick`` smoke run, which must never overwrite shipped files."""
    return given or (a.out.resolve() / name if a.quick else shipped)


def weights_dir(a, shipped: Path) -> Path:
    """Where a demo's trained weights go: ``--demo-out``, else ``smoke_safe``'s rule."""
    return smoke_safe(a.demo_out, a, "weights", shipped)


def item_demo(model, modality: str, records: list[dict], test: list[dict], kinds, a, info: dict) -> dict:
    """Train ``model``'s projector and LLM adapters (the spec's modes) on LLaVA-format ``records`` mixed
    with ``a.text_mix`` text-only records, evaluate on the single-question ``test`` records, write
    OUT/results.json and the weights to ``a.demo_out``, print the summary -> the results."""
    from composer.train import train

    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    a.demo_out = weights_dir(a, a.shipped_out)
    text_records, text_test, base_test = text_mix(model, len(records), a.text_mix, a.seed, TEXT_CACHE, say, a.quick)
    train_file = write_jsonl(out / "train_chat.jsonl", records + text_records, a.seed + 1)
    k = model.spec.modalities[modality].insert_at
    say(
        f"training at k = {k}: {a.steps} steps of {a.batch_size}"
        f" from {len(records)} records (+{len(text_records)} text)"
    )
    cfg = demo_config(a, train_file, out)  # the spec's modes: the projector and LoRA train, the encoder is frozen
    t0 = time.perf_counter()
    summary = train(model, cfg)
    train_s = time.perf_counter() - t0
    (out / "run" / "model.safetensors").unlink(missing_ok=True)
    model.eval()
    say(f"evaluating on {len(test)} held-out questions")
    right = dq.evaluate_items(model, test, modality)
    by_kind, majority = dq.accuracy_by_kind(right, test, kinds)
    text = text_report(model, text_test, base_test)
    result = run_results(
        a, summary, train_s, right, **info, insert_at=k, by_kind=by_kind, majority_baseline=majority, text_only=text
    )
    lo, hi = result["ci95"]
    (out / "results.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    save_projector(model, a.demo_out, modality)
    if model.spec.llm.lora is not None:
        save_lora(model, a.demo_out)
    print(f"held-out accuracy {100 * result['held_out_accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] on {len(test)}")
    for kind in by_kind:
        print(f"  {kind:9s} {100 * by_kind[kind]:5.1f}%  (majority answer {100 * majority[kind]:.0f}%)")
    t = result["text_only"]
    probe = t["examples"][-1]
    print(f"text-only: {100 * t['agreement_first_8_tokens']:.0f}% of {t['held_out_prompts']} held-out questions")
    print(f"  start as the pretrained LLM's; {probe['prompt']} -> {probe['trained']!r}")
    print(f"trained {a.steps} steps in {train_s / 60:.1f} min; wrote {a.demo_out} and {out / 'results.json'}")
    return result


def write_conversations(out: Path, records: list[dict], text: list[dict] = ()) -> Path:
    """The picture records (their drawings under OUT/train) and the text-only records, shuffled
    together into OUT/train_chat.jsonl."""
    (out / "train").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, rec in enumerate(records):
        name = f"train/c{i:05d}.png"
        dq.draw(rec["scene"], random.Random(rec["draw_seed"])).save(out / name)
        conv = []
        for j, (q, a) in enumerate(rec["qa"]):
            conv += [{"from": "human", "value": ("<image>\n" if j == 0 else "") + q}, {"from": "gpt", "value": a}]
        lines.append({"image": name, "conversations": conv})
    return write_jsonl(out / "train_chat.jsonl", lines + list(text), len(lines) + len(text))


def answer_pictures(model, folder: Path) -> list[dict]:
    """Every question each shipped picture answers -> [{picture, question, expected, answer, right}]."""
    import torch

    rows = []
    with torch.inference_mode():
        for name, scene, _ in PICTURES:
            for _, q, a in dq.questions(scene):
                inputs = model.prepare([model.format_prompt(q)], image=[str(folder / name)])
                text = model.decode(model.generate(**inputs, max_new_tokens=4, do_sample=False))[0]
                rows.append({"picture": name, "question": q, "expected": a, "answer": text})
                rows[-1]["right"] = dq.normalise(text) == a
    return rows


def save_projector(model, out: Path, modality: str = "image") -> None:
    """OUT/projector.safetensors, the weights the demo spec's ``projector.weights`` loads (temp file, then renamed)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.projectors[modality].state_dict().items()}
    tmp = out / ".projector.safetensors.tmp"
    save_file(state, str(tmp))
    tmp.replace(out / "projector.safetensors")


def save_lora(model, out: Path) -> None:
    """OUT/llm_lora.safetensors: the LLM's LoRA adapters in peft's layout (``llm.lora.weights``)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous() for k, v in get_peft_model_state_dict(model.llm).items()}
    tmp = out / ".llm_lora.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / "llm_lora.safetensors")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("out/demo"))
    ap.add_argument("--k", type=int, default=15, help="insertion layer")
    ap.add_argument("--records", type=int, default=2400, help="multi-turn training records")
    ap.add_argument("--turns", type=int, default=4, help="questions per training record")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--encoder-steps", type=int, default=1200)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--test", type=int, default=400, help="held-out single-question records")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="a smoke run: few records and steps")
    ap.add_argument("--spec", type=Path, default=dq.SPEC, help="a spec with one `image` modality (random init)")
    ap.add_argument(
        "--pretrained",
        action="store_true",
        help=f"the real-encoder demo: {DINOV2_SPEC.relative_to(ROOT)} (DINOv2 frozen, only the projector trains)",
    )
    ap.add_argument(
        "--lora",
        type=int,
        default=0,
        metavar="R",
        help="LLaVA stage 2 with --pretrained: the spec's trained projector goes on training together with "
        "rank-R LoRA on the LLM's layers k..N-1 (saved as llm_lora.safetensors); 0: stage 1",
    )
    ap.add_argument(
        "--text-mix",
        type=float,
        default=0.0,
        metavar="F",
        help="stage 2: this share of the training records are text-only questions answered by the pretrained "
        "LLM itself (adapters off), so the adapters keep its text answers; e.g. 0.2",
    )
    ap.add_argument(
        "--text-cache",
        type=Path,
        default=TEXT_CACHE,
        help="the pretrained LLM's answers to the text-only questions, computed once (default: %(default)s)",
    )
    ap.add_argument(
        "--describe",
        type=float,
        default=0.0,
        metavar="P",
        help="this share of the training records end with 'Describe the picture.' answered by a caption "
        "naming every shape's colour and column; e.g. 0.5",
    )
    ap.add_argument(
        "--by-count",
        type=float,
        nargs=3,
        default=None,
        metavar=("W1", "W2", "W3"),
        help="weights of pictures of one, two and three shapes among the training records (default: equal)",
    )
    ap.add_argument(
        "--position-questions",
        action="store_true",
        help="training records also ask the shape and colour of the object in a named column "
        "('What shape is on the left?'; pictures of several shapes)",
    )
    ap.add_argument(
        "--keep-lora",
        action="store_true",
        help="stage 2 goes on from the spec's trained adapters (llm.lora.weights) instead of fresh ones",
    )
    ap.add_argument(
        "--demo-out",
        type=Path,
        default=None,
        help="default: specs/smol/demo (demo_dinov2 with --pretrained), the shipped ones; with --quick, OUT/weights",
    )
    ap.add_argument(
        "--assets",
        type=Path,
        default=None,
        help="where the example pictures are drawn (default: specs/smol/assets; with --quick, OUT/assets)",
    )
    a = ap.parse_args(argv)
    if a.lora and not a.pretrained:
        ap.error("--lora trains stage 2 of the --pretrained demo")
    if (a.text_mix or a.keep_lora) and not a.lora:
        ap.error("--text-mix and --keep-lora are for stage 2 (--lora R)")
    if not 0 <= a.text_mix < 1:
        ap.error(f"--text-mix must be in [0, 1), got {a.text_mix}")
    if not 0 <= a.describe <= 1:
        ap.error(f"--describe must be in [0, 1], got {a.describe}")
    if a.by_count is not None and (min(a.by_count) < 0 or sum(a.by_count) <= 0):
        ap.error(f"--by-count needs three weights >= 0, not all 0; got {a.by_count}")
    if a.quick:
        a.records, a.steps, a.encoder_steps, a.test = 16, 3, 20, 8
    if a.pretrained:
        a.spec = DINOV2_SPEC if a.spec == dq.SPEC else a.spec
    a.demo_out = weights_dir(a, DINOV2_OUT if a.pretrained else DEMO_OUT)
    a.assets = smoke_safe(a.assets, a, "assets", ASSETS)

    import torch

    import composer
    from composer.train import train

    if a.threads:
        torch.set_num_threads(a.threads)
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    out = a.out.resolve()
    data = out / "data"
    train_scenes, test_scenes = dq.split_scenes(a.seed, keep_in_train=tuple(sc for _, sc, _ in PICTURES))
    spec = composer.load_spec(a.spec)
    if a.keep_lora:  # stage 2 goes on from the spec's projector and adapters
        if spec.llm.lora is None or not spec.llm.lora.weights or spec.llm.lora.r != a.lora:
            ap.error(f"--keep-lora: {a.spec} has no trained rank-{a.lora} adapters (llm.lora.weights)")
    elif a.lora:  # stage 2: from the stage-1 projector the spec loads, with fresh LoRA on the LLM
        spec = dq.with_llm_lora(spec, a.k, a.lora)
    else:  # stage 1: the projector from its random init, the LLM as pretrained (no adapters)
        spec.modalities["image"].projector.weights = None
        spec.llm.train, spec.llm.lora = "frozen", None
    model = composer.build(spec).with_insert_at(a.k)

    text_records, text_test, base_test = text_mix(model, a.records, a.text_mix, a.seed, a.text_cache, say)
    rng = random.Random(a.seed + 1)
    say(
        f"writing {a.records} training conversations (+{len(text_records)} text-only) "
        f"and {a.test} held-out questions under {data}"
    )
    train_file = write_conversations(
        data,
        conversations(train_scenes, a.records, a.turns, rng, a.describe, a.by_count, a.position_questions),
        text_records,
    )
    _, test_file = dq.write_task(data, 1, a.test, a.seed)  # held-out records as in the benchmark
    test = dq.read_records(test_file)
    a.assets.mkdir(parents=True, exist_ok=True)
    for name, scene, seed in PICTURES:
        dq.draw(scene, random.Random(seed)).save(a.assets / name)
    t0 = time.perf_counter()
    if a.pretrained:  # LLaVA stage 1 on a pretrained encoder: the spec keeps it frozen
        pre = {"skipped": "pretrained encoder, frozen"}
    else:
        say(f"pretraining the vision encoder ({a.encoder_steps} steps)")
        pre = dq.pretrain_encoder(model, train_scenes, a.encoder_steps, a.seed, say)
        pre["seconds"] = time.perf_counter() - t0
        pre["held_out_cell_accuracy"] = dq.cell_accuracy(model, test_scenes, 400, a.seed + 11)
        say(f"encoder: held-out column readout accuracy {pre['held_out_cell_accuracy']:.1%}")
    cfg = demo_config(a, train_file, out)  # the spec's modes: encoder (or, pretrained, LoRA) and projector train
    what = "projector" if a.pretrained else "encoder + projector"
    what += f" + rank-{a.lora} LoRA on the LLM" if a.lora else ""
    say(f"training the {what} at k = {a.k}: {a.steps} steps of {a.batch_size} conversations")
    t1 = time.perf_counter()
    summary = train(model, cfg)
    train_s = time.perf_counter() - t1
    (out / "run" / "model.safetensors").unlink(missing_ok=True)  # the frozen LLM: rebuilt from the spec
    model.eval()
    say(f"evaluating on {len(test)} held-out questions")
    right = dq.evaluate(model, test, data, 16)
    by_kind = dq.accuracy_by_kind(right, test, dq.KINDS)[0]
    pictures = answer_pictures(model, a.assets)
    text = text_report(model, text_test, base_test)
    result = run_results(
        a, summary, train_s, right, k=a.k, encoder_pretraining=pre, by_kind=by_kind, pictures=pictures, text_only=text
    )
    lo, hi = result["ci95"]
    (out / "demo_results.json").write_text(json.dumps(result, indent=2))
    if a.pretrained:
        save_projector(model, a.demo_out, "image")
        if a.lora:
            save_lora(model, a.demo_out)
    else:
        dq.save_demo(model, a.demo_out)
    print(f"held-out accuracy {100 * result['held_out_accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]", end="")
    print(" (" + ", ".join(f"{kind} {100 * v:.0f}%" for kind, v in by_kind.items()) + ")")
    for p in pictures:
        print(f"{p['picture']}: {p['question']} -> {p['answer']!r} ({'right' if p['right'] else 'WRONG'})")
    print(
        f"text-only answers: {100 * text['agreement_first_8_tokens']:.0f}% of {len(text_test)} held-out "
        "questions start as the pretrained LLM's (first 8 tokens)"
    )
    for ex in text["examples"][-2:]:
        print(f"{ex['prompt']} -> {ex['trained'][:80]!r} (pretrained: {ex['pretrained'][:80]!r})")
    print(f"wrote {a.demo_out} and {out / 'demo_results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
