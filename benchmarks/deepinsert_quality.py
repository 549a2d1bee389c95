"""DeepInsert's quality claim measured on a pretrained LLM: held-out accuracy vs the insertion layer k.

The task (generated here, offline, from a fixed seed): pictures of one to three coloured shapes
(circle, square, triangle; red, green, blue, yellow, purple), each in its own column (left,
middle, right), and one question per picture about a colour, a shape, a position or the count.
Answers are single words. The held-out split is disjoint from the training split in *scene
layouts* (which shape of which colour in which column), not only in pictures, so a test scene
never appeared during training.

The model is ``specs/smol/llava.yaml``: SmolLM2-135M-Instruct (30 layers) frozen; a small CLIP-shaped
ViT and the mlp2x_gelu projector trained from scratch (LLaVA stage 1, with the encoder trained
too). For every k the run uses the same records, steps, batch order, seed, initial weights and
learning-rate schedule; only ``insert_at`` differs. Per k it reports held-out exact-match accuracy
(Wilson 95% interval), the median training step time and the analytic training FLOPs relative to
k = 0, and the prefill latency relative to k = 0. ``compose probe``'s recommendation (on the
k = 0 model before and after training) is reported next to the measured curve.

    python benchmarks/deepinsert_quality.py --out out/quality            # the full run (~1 h, 2 cores)
    python benchmarks/deepinsert_quality.py --out out/quality --quick    # a smoke run (minutes)

Writes OUT/results.json, OUT/quality.png, OUT/data/ (the task) and, per k, OUT/k<k>/trainable.safetensors
(the trained encoder + projector weights). ``--demo-k K --demo-out DIR`` also saves that k's trained
encoder (an HF ``CLIPVisionModel`` dir with its image processor) and projector weights into DIR, in the
layout a spec loads with ``encoder.model: DIR/vision`` and ``projector.weights: DIR/projector.safetensors``.
``--spec`` runs the same experiment on another single-image spec (the tests use the 4-layer twin).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "specs" / "smol" / "llava.yaml"

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 60, 180),
}
SHAPES = ("circle", "square", "triangle")
COLUMNS = ("left", "middle", "right")
COUNTS = ("one", "two", "three")
SIZE = 64  # pixels; the spec's ViT sees 8 x 8 patches of 8 pixels = 64 image tokens


# -- the task -----------------------------------------------------------------------------------------
Scene = tuple[tuple[int, str, str], ...]  # ((column, shape, colour), ...) sorted by column


def all_scenes() -> list[Scene]:
    """Every layout: 1-3 objects in distinct columns, with distinct shapes and distinct colours."""
    import itertools

    out: list[Scene] = []
    for n in (1, 2, 3):
        for cols in itertools.combinations(range(3), n):
            for shapes in itertools.permutations(SHAPES, n):
                for colours in itertools.permutations(COLOURS, n):
                    out.append(tuple(zip(cols, shapes, colours, strict=True)))
    return out


def split_scenes(seed: int, test_share: float = 0.2, keep_in_train: tuple[Scene, ...] = ()) -> tuple[list, list]:
    """-> (train scenes, held-out scenes), disjoint, the same for a given seed."""
    scenes = all_scenes()
    random.Random(seed).shuffle(scenes)
    n_test = round(len(scenes) * test_share)
    test = [s for s in scenes if s not in keep_in_train][:n_test]
    held = set(test)
    return [s for s in scenes if s not in held], test


DEMO_SCENE: Scene = ((1, "circle", "red"),)  # the README's picture: one red circle in the middle


def draw(scene: Scene, rng: random.Random):
    """A scene -> a PIL picture: jittered sizes, heights, colours and background."""
    from PIL import Image, ImageDraw

    g = rng.randint(200, 245)
    img = Image.new("RGB", (SIZE, SIZE), (g + rng.randint(-8, 8), g + rng.randint(-8, 8), g + rng.randint(-8, 8)))
    d = ImageDraw.Draw(img)
    for col, shape, colour in scene:
        s = rng.randint(12, 16)  # side, pixels; each shape stays inside its column (SIZE / 3 wide)
        cx = round(SIZE * (2 * col + 1) / 6) + rng.randint(-1, 1)
        cy = rng.randint(s // 2 + 4, SIZE - s // 2 - 4)
        fill = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLOURS[colour])
        box = (cx - s // 2, cy - s // 2, cx + s // 2, cy + s // 2)
        if shape == "circle":
            d.ellipse(box, fill=fill)
        elif shape == "square":
            d.rectangle(box, fill=fill)
        else:
            d.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    return img


def questions(scene: Scene, relations: bool = False) -> list[tuple[str, str, str]]:
    """Every question the scene answers unambiguously -> [(kind, question, answer)]. ``relations``:
    also "What shape is left of the blue square?" (the nearest shape to its left: binding two
    objects and their order, the harder axis)."""
    qs = [("count", "How many shapes are there?", COUNTS[len(scene) - 1])]
    if relations:
        for i, (_, shape, colour) in enumerate(scene):  # scenes are sorted by column
            if i > 0:
                qs.append(("relation", f"What shape is left of the {colour} {shape}?", scene[i - 1][1]))
    if len(scene) == 1:
        col, shape, colour = scene[0]
        return qs + [
            ("shape", "What shape is it?", shape),
            ("colour", "What colour is it?", colour),
            ("position", "Where is it?", COLUMNS[col]),
        ]
    for col, shape, colour in scene:
        qs += [
            ("colour", f"What colour is the {shape}?", colour),
            ("shape", f"What shape is the {colour} one?", shape),
            ("position", f"Where is the {colour} {shape}?", COLUMNS[col]),
        ]
    return qs


KINDS = ("colour", "shape", "position", "count")
WITH_RELATIONS = (*KINDS, "relation")


def make_records(scenes: list[Scene], n: int, rng: random.Random, kinds: tuple[str, ...] = KINDS) -> list[dict]:
    """n records: question kinds balanced (round robin); the number of shapes uniform in 1-3, then a
    layout drawn uniformly among the split's layouts with that many."""
    by_n = {m: [sc for sc in scenes if len(sc) == m] for m in (1, 2, 3)}
    out = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        while True:
            group = by_n[rng.choice((1, 2, 3))]
            scene = group[rng.randrange(len(group))]
            qs = [q for q in questions(scene, "relation" in kinds) if q[0] == kind]
            if qs:
                break
        _, q, a = qs[rng.randrange(len(qs))]
        out.append({"scene": scene, "kind": kind, "prompt": q, "response": a, "draw_seed": rng.randrange(2**31)})
    return out


def write_task(out: Path, n_train: int, n_test: int, seed: int, kinds: tuple[str, ...] = KINDS) -> tuple[Path, Path]:
    """Pictures and JSONL (``prompt``/``response``/``image`` records) under OUT/data."""
    train_scenes, test_scenes = split_scenes(seed, keep_in_train=(DEMO_SCENE,))
    rng = random.Random(seed + 1)
    files = {}
    for split, scenes, n in (("train", train_scenes, n_train), ("test", test_scenes, n_test)):
        (out / split).mkdir(parents=True, exist_ok=True)
        path = out / f"{split}.jsonl"
        with path.open("w") as f:
            for i, rec in enumerate(make_records(scenes, n, rng, kinds)):
                name = f"{split}/{i:05d}.png"
                draw(rec["scene"], random.Random(rec["draw_seed"])).save(out / name)
                row = {"image": name, "prompt": rec["prompt"], "response": rec["response"], "kind": rec["kind"]}
                row["scene"] = [list(o) for o in rec["scene"]]
                f.write(json.dumps(row) + "\n")
        files[split] = path
    return files["train"], files["test"]


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def normalise(text: str) -> str:
    return text.strip().strip(".!").strip().lower()


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


# -- measurement --------------------------------------------------------------------------------------
# -- the vision encoder's pretraining (the role CLIP plays for LLaVA) ----------------------------------
CELL_CLASSES = ["empty"] + [f"{c} {sh}" for c in COLOURS for sh in SHAPES]  # what one column holds


def cell_targets(scene: Scene) -> list[int]:
    cells = [0, 0, 0]
    for col, shape, colour in scene:
        cells[col] = CELL_CLASSES.index(f"{colour} {shape}")
    return cells


def pretrain_encoder(model, scenes: list[Scene], steps: int, seed: int, say, batch: int = 64) -> dict:
    """Supervised pretraining of the spec's randomly initialised ViT on freshly drawn pictures of the
    training layouts: a linear probe over all patch features predicts what each column holds (empty
    or one of 15 colour-shape pairs). Plays the part of LLaVA's pretrained CLIP encoder, which its
    stage 1 keeps frozen; the same pretrained encoder serves every k. -> {"steps", "cell_accuracy"}
    (held-out layouts)."""
    import torch

    enc, proc = model.encoders["image"], model.processors["image"]
    preprocess = type(enc).preprocess
    torch.manual_seed(seed)
    head = torch.nn.Linear(enc.num_tokens * enc.hidden_size, 3 * len(CELL_CLASSES))
    params = list(enc.parameters()) + list(head.parameters())
    for p in enc.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    rng = random.Random(seed + 7)

    def sample(pool, n):
        chosen = [pool[rng.randrange(len(pool))] for _ in range(n)]
        x = preprocess(proc, [draw(sc, rng) for sc in chosen])
        return x, torch.tensor([cell_targets(sc) for sc in chosen])

    def logits(x):
        return head(enc(x).flatten(1)).view(-1, 3, len(CELL_CLASSES))

    enc.train()
    for step in range(steps):
        x, y = sample(scenes, batch)
        loss = torch.nn.functional.cross_entropy(logits(x).reshape(-1, len(CELL_CLASSES)), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0:
            say(f"encoder pretraining: step {step + 1}/{steps}, loss {float(loss.detach()):.3f}")
    enc.eval()
    return {"steps": steps, "batch": batch, "final_loss": float(loss.detach())}


def cell_accuracy(model, scenes: list[Scene], n: int, seed: int) -> float:
    """Fraction of columns whose content a nearest-class-mean readout of the frozen encoder's features
    gets right on pictures of ``scenes`` (fit on the first half, scored on the second)."""
    import torch

    enc, proc = model.encoders["image"], model.processors["image"]
    rng = random.Random(seed)
    chosen = [scenes[rng.randrange(len(scenes))] for _ in range(n)]
    with torch.no_grad():
        x = type(enc).preprocess(proc, [draw(sc, rng) for sc in chosen])
        f = enc(x)  # (n, T, d)
    side = int(math.isqrt(f.shape[1]))
    f = f.view(n, side, side, -1)
    y = torch.tensor([cell_targets(sc) for sc in chosen])
    right = total = 0
    for col in range(3):
        lo, hi = round(col * side / 3), round((col + 1) * side / 3)
        feats = f[:, :, lo:hi].mean((1, 2))
        half = n // 2
        means = {c: feats[:half][y[:half, col] == c].mean(0) for c in set(y[:half, col].tolist())}
        classes = list(means)
        dists = torch.stack([(feats[half:] - means[c]).norm(dim=-1) for c in classes], 1)
        pred = torch.tensor(classes)[dists.argmin(1)]
        right += int((pred == y[half:, col]).sum())
        total += n - half
    return right / total


@dataclass
class Settings:
    ks: list[int]
    n_train: int
    n_test: int
    steps: int
    batch_size: int
    lr: float
    seed: int
    encoder_steps: int = 600  # 0: the spec's encoder is pretrained (frozen, as LLaVA stage 1 keeps it)
    kinds: tuple[str, ...] = KINDS
    eval_batch: int = 16
    probe_records: int = 32
    prefill_repeats: int = 5
    lora: int = 0  # > 0: LLaVA stage 2 shape, rank-`lora` LoRA on the LLM's layers k..N-1 trains with the projector


def trainable_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def training_flops(model, text_tokens: int, mm_tokens: int, k: int) -> float:
    """Analytic FLOPs of one training step's decoder part with the LLM frozen (``composer.analysis.flops``)."""
    from composer.analysis.flops import frozen_llm_training_flops

    return frozen_llm_training_flops(model.adapter.shape, text_tokens, {"image": mm_tokens}, {"image": k})


def evaluate(model, records: list[dict], root: Path, batch: int, progress=None) -> list[bool]:
    """The task's single-question records (pictures under ``root``): ``evaluate_items`` on images."""
    items = [{"item": str(root / r["image"]), "prompt": r["prompt"], "response": r["response"]} for r in records]
    return evaluate_items(model, items, "image", batch, progress)


def evaluate_items(model, records: list[dict], modality: str, batch: int = 16, progress=None) -> list[bool]:
    """Single questions about one item each (``item``, ``prompt``, ``response``) -> exact match of the
    normalised greedy answer, per record."""
    import torch

    right = []
    with torch.inference_mode():
        for i in range(0, len(records), batch):
            rows = records[i : i + batch]
            inputs = model.prepare(
                [model.format_prompt(r["prompt"]) for r in rows], **{modality: [r["item"] for r in rows]}
            )
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            right += [normalise(t) == r["response"] for r, t in zip(rows, model.decode(out), strict=True)]
            if progress:
                progress(f"eval {min(i + batch, len(records))}/{len(records)}")
    return right


def accuracy_by_kind(right: list[bool], records: list[dict], kinds) -> tuple[dict, dict]:
    """Per question kind: held-out accuracy, and the majority answer's share (the baseline)."""
    by_kind, majority = {}, {}
    for kind in kinds:
        rows = [(ok, r["response"]) for ok, r in zip(right, records, strict=True) if r["kind"] == kind]
        if rows:
            by_kind[kind] = statistics.mean(ok for ok, _ in rows)
            answers = [a for _, a in rows]
            majority[kind] = max(answers.count(x) for x in set(answers)) / len(answers)
    return by_kind, majority


def prefill_time(model, prompt: str, modality: str, item, repeats: int) -> float:
    """Median time to the first token of one question about one item (encoder, projector, prefill
    through every layer, the LM head on the last position): ``generate(max_new_tokens=1)``, after a
    warm-up."""
    import torch

    inputs = model.prepare([model.format_prompt(prompt)], **{modality: [item]})
    times = []
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=1, do_sample=False)  # warm up
        for _ in range(repeats):
            t = time.perf_counter()
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def with_llm_lora(spec, k: int, r: int):
    """``spec`` with LoRA (rank ``r``) on every linear layer of the LLM's layers k..N-1: the layers
    the image tokens pass through (LLaVA stage 2, DeepInsert-shaped); the early layers stay the
    pretrained model's."""
    import composer
    from composer.spec import LoraSpec

    n = composer.build(spec, shape_only=True, offline=True).llm.config.num_hidden_layers
    spec.llm.train = "lora"
    spec.llm.lora = LoraSpec(
        r=r,
        alpha=2 * r,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        layers=list(range(k, n)),
    )
    return spec


def save_demo(model, out: Path) -> None:
    """The trained vision side as ``specs/smol/llava_demo.yaml`` loads it: OUT/vision (HF model dir with
    its image processor) and OUT/projector.safetensors; written next to OUT, then renamed into place."""
    from safetensors.torch import save_file

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.encoders["image"].model.save_pretrained(tmp / "vision")
    model.processors["image"].save_pretrained(tmp / "vision")
    state = {k: v.detach().contiguous() for k, v in model.projectors["image"].state_dict().items()}
    save_file(state, str(tmp / "projector.safetensors"))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def run(out: Path, s: Settings, demo_k: int | None = None, demo_out: Path | None = None, spec: Path = SPEC) -> dict:
    import torch
    from safetensors.torch import save_file

    import composer
    from composer.analysis.probe import ProbeConfig, run_probe
    from composer.builder import set_trainable
    from composer.train import TrainConfig, train
    from composer.train.loop import apply_stage

    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    out = out.resolve()  # the probe's JSONL names pictures by absolute path
    data = out / "data"
    say(f"writing the task: {s.n_train} training and {s.n_test} held-out records under {data}")
    train_file, test_file = write_task(data, s.n_train, s.n_test, s.seed, s.kinds)
    test = read_records(test_file)
    t0 = time.perf_counter()
    say(f"building {spec}")
    spec_ = composer.load_spec(spec)
    spec_.modalities["image"].projector.weights = None  # the projector trains from its random init
    spec_.llm.train, spec_.llm.lora = "frozen", None  # the pretrained LLM (the demo spec's adapters: not loaded)
    if s.lora:  # fresh adapters on every layer; each k trains those of layers k..N-1 (the others stay B = 0)
        spec_ = with_llm_lora(spec_, 0, s.lora)
    base = composer.build(spec_)
    say(f"built in {time.perf_counter() - t0:.0f} s")
    base_k = base.insert_at["image"]
    train_scenes, test_scenes = split_scenes(s.seed, keep_in_train=(DEMO_SCENE,))
    if s.encoder_steps:
        say(f"pretraining the vision encoder ({s.encoder_steps} steps on pictures of the training layouts)")
        t0 = time.perf_counter()
        pre = pretrain_encoder(base, train_scenes, s.encoder_steps, s.seed, say)
        pre["seconds"] = time.perf_counter() - t0
        pre["held_out_cell_accuracy"] = cell_accuracy(base, test_scenes, 400, s.seed + 11)
        say(f"encoder: held-out column readout accuracy {pre['held_out_cell_accuracy']:.1%}")
    else:
        pre = {"skipped": "pretrained encoder"}
    apply_stage(base, 1)  # LLaVA stage 1: encoder and LLM frozen, the projector trains
    if s.lora:
        set_trainable(base.llm, "lora")
    init = trainable_state(base)
    probe_file = out / "probe.jsonl"
    probe_file.write_text("".join(json.dumps({**r, "image": str(data / r["image"])}) + "\n" for r in test))
    probe_cfg = ProbeConfig(layers=s.ks, max_records=s.probe_records, batch_size=4)
    say("probe on the k = 0 model before training")
    probe_before = run_probe(base.with_insert_at(0), str(probe_file), probe_cfg)

    # token counts of one record, for FLOPs
    sample = base.prepare([base.format_prompt(test[0]["prompt"])], image=[str(data / test[0]["image"])])
    mm_tokens = base.num_tokens("image")
    text_tokens = int(sample["input_ids"].shape[1]) - mm_tokens

    rows = []
    for k in s.ks:
        with torch.no_grad():
            for name, p in base.named_parameters():
                if name in init:
                    p.copy_(init[name])
        if s.lora:  # only the layers the image tokens pass through adapt: nothing trains before k
            for i, layer in enumerate(base.adapter.layers):  # the LLM family's decoder layers, in order
                for name, p in layer.named_parameters():
                    if "lora_" in name:
                        p.requires_grad_(i >= k)
        model = base.with_insert_at(k)
        say(f"k = {k}: training {s.steps} steps of {s.batch_size} records")
        cfg = TrainConfig(
            data=str(train_file),
            output=str(out / f"k{k}"),
            stage=None,  # as set above: the projector (and LoRA from k on)
            max_steps=s.steps,
            batch_size=s.batch_size,
            lr=s.lr,
            warmup_ratio=0.05,
            seed=s.seed,
            overwrite=True,
            log_every=10,
            progress=sys.stderr.isatty(),
        )
        summary = train(model, cfg)
        trained = trainable_state(model)
        if k == demo_k and demo_out is not None:
            save_demo(model, demo_out)
        save_file({n: t.contiguous() for n, t in trained.items()}, str(out / f"k{k}" / "trainable.safetensors"))
        (out / f"k{k}" / "model.safetensors").unlink(missing_ok=True)  # the frozen LLM: rebuilt from the spec
        say(f"k = {k}: evaluating on {len(test)} held-out records")
        model.eval()
        right = evaluate(model, test, data, s.eval_batch)
        by_kind = accuracy_by_kind(right, test, s.kinds)[0]
        lo, hi = wilson(sum(right), len(right))
        row = {
            "k": k,
            "accuracy": sum(right) / len(right),
            "ci95": [lo, hi],
            "by_kind": by_kind,
            "final_loss": statistics.mean(summary["losses"][-10:]),
            "step_time_s": summary["median_step_time_s"],
            "train_flops": training_flops(model, text_tokens, mm_tokens, k),
            "prefill_s": prefill_time(
                model, test[0]["prompt"], "image", str(data / test[0]["image"]), s.prefill_repeats
            ),
        }
        if k == 0:
            say("probe on the trained k = 0 model")
            row["probe_after"] = run_probe(model, str(probe_file), probe_cfg)
        rows.append(row)
        say(f"k = {k}: accuracy {row['accuracy']:.1%} [{lo:.1%}, {hi:.1%}], step {row['step_time_s']:.2f} s")
    rows.sort(key=lambda r: r["k"])  # trained in the order given (--ks), reported by k
    ref = next((r for r in rows if r["k"] == 0), rows[0])
    for r in rows:
        r["step_time_vs_k0"] = r["step_time_s"] / ref["step_time_s"]
        r["train_flops_vs_k0"] = r["train_flops"] / ref["train_flops"]
        r["prefill_vs_k0"] = r["prefill_s"] / ref["prefill_s"]
    after = ref.get("probe_after")
    result = {
        "spec": str(spec),
        "name": base.spec.name,
        "spec_insert_at": base_k,
        "settings": s.__dict__,
        "tokens": {"mm": mm_tokens, "text": text_tokens},
        "num_layers": base.num_layers,
        "threads": torch.get_num_threads(),
        "rows": rows,
        "encoder_pretraining": pre,
        "probe": {
            "before_training": _probe_summary(probe_before),
            "after_training": _probe_summary(after) if after else None,
        },
        "best_within_2_points": max(r["k"] for r in rows if r["accuracy"] >= ref["accuracy"] - 0.02),
        "versions": {"torch": torch.__version__},
    }
    (out / "results.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "quality.png")
    return result


def _probe_summary(p: dict) -> dict:
    return {
        "recommended_k": p["recommended_k"],
        "rule": p.get("rule"),
        "loss_rule_k": p.get("loss_rule_k"),
        "best_aligned_layer": p["best_aligned_layer"],
        "rows": [
            {key: r.get(key) for key in ("layer", "loss", "loss_increase", "cos_mean_pooled", "pair_max")}
            for r in p["rows"]
        ],
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    ks = [r["k"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    acc = [100 * r["accuracy"] for r in rows]
    err = [[100 * (r["accuracy"] - r["ci95"][0]) for r in rows], [100 * (r["ci95"][1] - r["accuracy"]) for r in rows]]
    ax.errorbar(ks, acc, yerr=err, marker="o", color="tab:blue", capsize=3, label="held-out accuracy (95% CI)")
    ax.set_xlabel(f"insertion layer k (of {result['num_layers']})")
    ax.set_ylabel("exact-match accuracy, %", color="tab:blue")
    ax.set_ylim(0, 100)
    ax2 = ax.twinx()
    ax2.plot(ks, [r["step_time_vs_k0"] for r in rows], marker="s", color="tab:orange", label="training step time")
    ax2.plot(ks, [r["prefill_vs_k0"] for r in rows], marker="^", color="tab:green", label="prefill latency")
    ax2.plot(ks, [r["train_flops_vs_k0"] for r in rows], ls="--", color="tab:gray", label="training FLOPs (analytic)")
    ax2.set_ylabel("relative to k = 0")
    ax2.set_ylim(0, 1.1)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    ax.legend(lines, labels, loc="lower left", fontsize=8)
    probe = result["probe"]["after_training"] or result["probe"]["before_training"]
    tokens = f"{result['tokens']['mm']} {result.get('modality', 'image')} tokens"
    ax.set_title(f"{result['name']}, {tokens}\nprobe recommends k = {probe['recommended_k']}", fontsize=10)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def table(result: dict) -> str:
    names = list(result["settings"].get("kinds", KINDS))
    lines = [
        "| k | held-out accuracy (95% CI) | " + " | ".join(names) + " | step time vs k=0 | "
        "training FLOPs vs k=0 | prefill vs k=0 |",
        "|---|---|" + "---|" * len(names) + "---|---|---|",
    ]
    for r in result["rows"]:
        kinds = " | ".join(f"{100 * r['by_kind'].get(kind, float('nan')):.0f}%" for kind in names)
        lines.append(
            f"| {r['k']} | {100 * r['accuracy']:.1f}% [{100 * r['ci95'][0]:.1f}, {100 * r['ci95'][1]:.1f}] | {kinds} | "
            f"{r['step_time_vs_k0']:.2f}× ({r['step_time_s']:.2f} s) | {r['train_flops_vs_k0']:.2f}× | "
            f"{r['prefill_vs_k0']:.2f}× ({1000 * r['prefill_s']:.0f} ms) |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="out/quality")
    ap.add_argument("--spec", type=Path, default=SPEC, help="a spec with one `image` modality (random init)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: k in {0, 15}, few records and steps")
    ap.add_argument("--ks", type=int, nargs="+", default=None)
    ap.add_argument("--train", type=int, default=None, help="training records")
    ap.add_argument("--test", type=int, default=None, help="held-out records")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--encoder-steps", type=int, default=None, help="vision encoder pretraining steps")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--demo-k", type=int, default=None, help="copy this k's trained weights to --demo-out")
    ap.add_argument("--demo-out", type=Path, default=None)
    ap.add_argument(
        "--pretrained",
        action="store_true",
        help="the pretrained-encoder model: specs/smol/llava_dinov2_demo.yaml (DINOv2 frozen; no encoder pretraining)",
    )
    ap.add_argument("--relations", action="store_true", help='add the harder axis: "What shape is left of the X?"')
    ap.add_argument(
        "--lora", type=int, default=0, metavar="R", help="also train rank-R LoRA on the LLM's layers k..N-1 (0: none)"
    )
    a = ap.parse_args(argv)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    quick = a.quick
    s = Settings(
        ks=a.ks or ([0, 15] if quick else [0, 8, 15, 22]),
        n_train=a.train or (32 if quick else 3000),
        n_test=a.test or (16 if quick else 400),
        steps=a.steps or (3 if quick else 300),
        batch_size=a.batch_size,
        lr=a.lr,
        seed=a.seed,
        encoder_steps=0 if a.pretrained else a.encoder_steps or (20 if quick else 600),
        kinds=WITH_RELATIONS if a.relations else KINDS,
        probe_records=8 if quick else 32,
        prefill_repeats=1 if quick else 5,
        lora=a.lora,
    )
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.demo_k is not None and a.demo_k not in s.ks:
        ap.error(f"--demo-k {a.demo_k} is not one of --ks {s.ks}")
    spec = ROOT / "specs" / "smol" / "llava_dinov2_demo.yaml" if a.pretrained and a.spec == SPEC else a.spec
    result = run(out, s, a.demo_k, a.demo_out, spec)
    print(table(result))
    pb, pa = result["probe"]["before_training"], result["probe"]["after_training"]
    print(
        f"probe recommends k = {pb['recommended_k']} before training"
        + (f", k = {pa['recommended_k']} after training" if pa else "")
        + f"; the largest k within 2 points of k = 0 measured: {result['best_within_2_points']}"
    )
    print(f"wrote {out / 'results.json'} and {out / 'quality.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
