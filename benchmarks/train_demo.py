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
processor) and ``projector.safetensors``; the pictures to specs/smol/assets/.

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
import json
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
# The shipped pictures: (file name, scene, seed of the drawing). Both layouts are in the training split.
PICTURES = (
    ("red_circle.png", dq.DEMO_SCENE, 1),
    ("two_shapes.png", ((0, "square", "blue"), (2, "triangle", "yellow")), 2),
)


def conversations(scenes, n: int, turns: int, rng: random.Random) -> list[dict]:
    """n multi-turn records: a layout (the number of shapes uniform in 1-3), up to ``turns`` of its
    questions in random order, the picture's own drawing seed."""
    by_n = {m: [sc for sc in scenes if len(sc) == m] for m in (1, 2, 3)}
    out = []
    for _ in range(n):
        group = by_n[rng.choice((1, 2, 3))]
        scene = group[rng.randrange(len(group))]
        qs = dq.questions(scene)
        rng.shuffle(qs)
        out.append({"scene": scene, "qa": [(q, a) for _, q, a in qs[:turns]], "draw_seed": rng.randrange(2**31)})
    return out


def write_conversations(out: Path, records: list[dict]) -> Path:
    (out / "train").mkdir(parents=True, exist_ok=True)
    path = out / "train_chat.jsonl"
    with path.open("w") as f:
        for i, rec in enumerate(records):
            name = f"train/c{i:05d}.png"
            dq.draw(rec["scene"], random.Random(rec["draw_seed"])).save(out / name)
            conv = []
            for j, (q, a) in enumerate(rec["qa"]):
                conv += [{"from": "human", "value": ("<image>\n" if j == 0 else "") + q}, {"from": "gpt", "value": a}]
            f.write(json.dumps({"image": name, "conversations": conv}) + "\n")
    return path


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


def save_projector(model, out: Path) -> None:
    """OUT/projector.safetensors, the weights ``llava_dinov2_demo.yaml`` loads (temp file, then renamed)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.projectors["image"].state_dict().items()}
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
        "--demo-out", type=Path, default=None, help="default: specs/smol/demo (demo_dinov2 with --pretrained)"
    )
    ap.add_argument("--assets", type=Path, default=ASSETS)
    a = ap.parse_args(argv)
    if a.lora and not a.pretrained:
        ap.error("--lora trains stage 2 of the --pretrained demo")
    if a.quick:
        a.records, a.steps, a.encoder_steps, a.test = 16, 3, 20, 8
    if a.pretrained:
        a.spec = DINOV2_SPEC if a.spec == dq.SPEC else a.spec
    a.demo_out = a.demo_out or (DINOV2_OUT if a.pretrained else DEMO_OUT)

    import torch

    import composer
    from composer.train import TrainConfig, train

    if a.threads:
        torch.set_num_threads(a.threads)
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    out = a.out.resolve()
    data = out / "data"
    train_scenes, test_scenes = dq.split_scenes(a.seed, keep_in_train=tuple(sc for _, sc, _ in PICTURES))
    rng = random.Random(a.seed + 1)
    say(f"writing {a.records} training conversations and {a.test} held-out questions under {data}")
    train_file = write_conversations(data, conversations(train_scenes, a.records, a.turns, rng))
    _, test_file = dq.write_task(data, 1, a.test, a.seed)  # held-out records as in the benchmark
    test = dq.read_records(test_file)
    a.assets.mkdir(parents=True, exist_ok=True)
    for name, scene, seed in PICTURES:
        dq.draw(scene, random.Random(seed)).save(a.assets / name)

    spec = composer.load_spec(a.spec)
    if a.lora:  # stage 2: from the stage-1 projector the spec loads, with LoRA on the LLM
        spec = dq.with_llm_lora(spec, a.k, a.lora)
    else:  # stage 1: the projector from its random init, the LLM as pretrained (no adapters)
        spec.modalities["image"].projector.weights = None
        spec.llm.train, spec.llm.lora = "frozen", None
    model = composer.build(spec).with_insert_at(a.k)
    t0 = time.perf_counter()
    if a.pretrained:  # LLaVA stage 1 on a pretrained encoder: the spec keeps it frozen
        pre = {"skipped": "pretrained encoder, frozen"}
    else:
        say(f"pretraining the vision encoder ({a.encoder_steps} steps)")
        pre = dq.pretrain_encoder(model, train_scenes, a.encoder_steps, a.seed, say)
        pre["seconds"] = time.perf_counter() - t0
        pre["held_out_cell_accuracy"] = dq.cell_accuracy(model, test_scenes, 400, a.seed + 11)
        say(f"encoder: held-out column readout accuracy {pre['held_out_cell_accuracy']:.1%}")
    cfg = TrainConfig(
        data=str(train_file),
        output=str(out / "run"),
        stage=None,  # the spec's modes: encoder (or, pretrained, LoRA) and projector train
        max_steps=a.steps,
        batch_size=a.batch_size,
        lr=a.lr,
        warmup_ratio=0.05,
        seed=a.seed,
        overwrite=True,
        log_every=10,
        progress=sys.stderr.isatty(),
    )
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
    lo, hi = dq.wilson(sum(right), len(right))
    by_kind = {
        kind: statistics.mean(ok for ok, r in zip(right, test, strict=True) if r["kind"] == kind)
        for kind in dq.KINDS
        if any(r["kind"] == kind for r in test)
    }
    pictures = answer_pictures(model, a.assets)
    result = {
        "k": a.k,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
        "encoder_pretraining": pre,
        "final_loss": statistics.mean(summary["losses"][-10:]),
        "step_time_s": summary["median_step_time_s"],
        "train_seconds": train_s,
        "held_out_accuracy": sum(right) / len(right),
        "ci95": [lo, hi],
        "by_kind": by_kind,
        "pictures": pictures,
        "threads": torch.get_num_threads(),
    }
    (out / "demo_results.json").write_text(json.dumps(result, indent=2))
    if a.pretrained:
        save_projector(model, a.demo_out)
        if a.lora:
            save_lora(model, a.demo_out)
    else:
        dq.save_demo(model, a.demo_out)
    print(f"held-out accuracy {100 * result['held_out_accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]", end="")
    print(" (" + ", ".join(f"{kind} {100 * v:.0f}%" for kind, v in by_kind.items()) + ")")
    for p in pictures:
        print(f"{p['picture']}: {p['question']} -> {p['answer']!r} ({'right' if p['right'] else 'WRONG'})")
    print(f"wrote {a.demo_out} and {out / 'demo_results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
