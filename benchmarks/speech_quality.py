"""DeepInsert's quality claim at a strong operating point: the speech demo's task (Whisper tiny.en,
SmolLM2-135M-Instruct, ``specs/smol/ltu_whisper_demo.yaml``) trained at k in {0, 8, 15, 22} with the
same budget, plus a harder axis (``audio_demo.py --pitch-axis``: "Is the voice high or low?", which
depends on the speaker's own range).

Per k, ``benchmarks/audio_demo.py --pitch-axis --insert-at K`` trains the projector and rank-8 LoRA on
q/v of layers K..29 (the layers the audio tokens pass through) from the same records, seed, initial
projector and learning-rate schedule, and writes RUNS/kK/results.json (held-out accuracy per kind,
Wilson interval) and RUNS/kK/weights. This script trains the k's whose results are missing (one after
the other; two can run side by side with ``audio_demo.py`` directly, ``--threads 1`` each), then, in
one process and with the same threads for every k, measures what must be compared side by side:

- the median training step time (``--timing-steps`` steps on the same records),
- the prefill latency (``generate(max_new_tokens=1)`` on one held-out clip, trained weights),
- the analytic training FLOPs (``composer.analysis.flops.frozen_llm_training_flops``),
- ``compose probe``'s recommendation (alignment rule) on the k = 0 model before and after training,

and writes RUNS/results.json, RUNS/quality.png and prints the table (``deepinsert_quality.table``).

    python benchmarks/speech_quality.py --runs out/speech-quality --threads 2
    python benchmarks/speech_quality.py --runs /tmp/sq --quick        # a smoke run (minutes)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import audio_demo as ad  # noqa: E402
import deepinsert_quality as dq  # noqa: E402
import train_demo as td  # noqa: E402

KINDS = (*ad.KINDS, "pitch")


def train_missing(runs: Path, ks: list[int], threads: int, quick: bool) -> None:
    """``audio_demo.py --pitch-axis --insert-at K`` for every k without RUNS/kK/results.json."""
    for k in ks:
        out = runs / f"k{k}"
        if (out / "results.json").exists():
            continue
        cmd = [sys.executable, str(Path(__file__).with_name("audio_demo.py")), "--pitch-axis", "--insert-at", str(k)]
        cmd += ["--out", str(out), "--demo-out", str(out / "weights"), "--threads", str(threads)]
        print(f"training k = {k}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        subprocess.run(cmd + (["--quick"] if quick else []), check=True)


def audio_records(train_file: Path, n: int, out: Path) -> Path:
    """The first ``n`` audio records of a training file, for the probe."""
    rows = [r for r in map(json.loads, train_file.read_text().splitlines()) if "audio" in r][:n]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def step_time(model, train_file: Path, steps: int, batch_size: int) -> float:
    """Median step time of ``steps`` training steps on ``train_file`` (the spec's train modes)."""
    from composer.train import TrainConfig, train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(
            data=str(train_file), output=tmp, stage=None, max_steps=steps, batch_size=batch_size, lr=1e-4,
            overwrite=True, log_every=max(steps, 1), progress=False,
        )  # fmt: skip
        return train(model, cfg)["median_step_time_s"]


def measure(runs: Path, ks: list[int], a) -> dict:
    import torch

    from composer.analysis.flops import frozen_llm_training_flops
    from composer.analysis.probe import ProbeConfig, run_probe

    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    train_file = runs / f"k{ks[0]}" / "train_chat.jsonl"
    clip = next(iter(sorted((runs / f"k{ks[0]}" / "data" / "test").glob("*.wav"))))
    probe_file = audio_records(train_file, a.probe_records, runs / "probe.jsonl")
    probe_cfg = ProbeConfig(layers=ks, max_records=a.probe_records, batch_size=4)
    say("probe on the untrained k = 0 model")
    probe_before = run_probe(td.build_demo_model(ad.SPEC, "audio", a.threads, 0), str(probe_file), probe_cfg)
    rows, probe_after, ref_settings = [], None, {}
    for k in ks:
        trained = json.loads((runs / f"k{k}" / "results.json").read_text())
        if k == 0:
            ref_settings = trained["settings"]
        model = td.build_demo_model(ad.SPEC, "audio", a.threads, k, weights=runs / f"k{k}" / "weights")
        model.eval()
        mm = model.num_tokens("audio")
        sample = model.prepare([model.format_prompt(ad.QUESTIONS["colour"])], audio=[str(clip)])
        text = int(sample["input_ids"].shape[1]) - mm
        if k == 0:
            say("probe on the trained k = 0 model")
            probe_after = run_probe(model, str(probe_file), probe_cfg)
        say(f"k = {k}: prefill and {a.timing_steps} timed training steps")
        row = {
            "k": k,
            "accuracy": trained["held_out_accuracy"],
            "ci95": trained["ci95"],
            "by_kind": trained["by_kind"],
            "held_out": len(trained["by_kind"]) * int(trained["settings"]["per_kind"]),
            "text_only_agreement": trained["text_only"]["agreement_first_8_tokens"],
            "final_loss": trained["final_loss"],
            "train_minutes": trained["train_seconds"] / 60,
            "prefill_s": dq.prefill_time(model, ad.QUESTIONS["colour"], "audio", str(clip), a.prefill_repeats),
            "train_flops": frozen_llm_training_flops(model.adapter.shape, text, {"audio": mm}, {"audio": k}),
        }
        model.train()
        row["step_time_s"] = step_time(model, train_file, a.timing_steps, a.batch_size)
        rows.append(row)
        say(f"k = {k}: {100 * row['accuracy']:.1f}%, step {row['step_time_s']:.2f} s, prefill {row['prefill_s']:.3f} s")
    ref = next(r for r in rows if r["k"] == 0)
    for r in rows:
        for ratio, name in (
            ("step_time_vs_k0", "step_time_s"),
            ("train_flops_vs_k0", "train_flops"),
            ("prefill_vs_k0", "prefill_s"),
        ):
            r[ratio] = r[name] / ref[name]
    return {
        "spec": str(ad.SPEC.relative_to(ad.ROOT)),
        "name": "speech task (Whisper tiny.en, SmolLM2-135M)",
        "modality": "audio",
        "settings": {"kinds": list(KINDS), **ref_settings},
        "tokens": {"mm": mm, "text": text},
        "num_layers": model.num_layers,
        "threads": torch.get_num_threads(),
        "timing_steps": a.timing_steps,
        "rows": rows,
        "probe": {
            "before_training": dq._probe_summary(probe_before),
            "after_training": dq._probe_summary(probe_after) if probe_after else None,
        },
        "best_within_2_points": max(r["k"] for r in rows if r["accuracy"] >= ref["accuracy"] - 0.02),
        "versions": {"torch": torch.__version__},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=Path, default=Path("out/speech-quality"))
    ap.add_argument("--ks", type=int, nargs="+", default=[0, 8, 15, 22])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timing-steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=4, help="of the timed steps (the demo's)")
    ap.add_argument("--prefill-repeats", type=int, default=10)
    ap.add_argument("--probe-records", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="a smoke run: k in {0, 15}, the demo's --quick")
    a = ap.parse_args(argv)
    if a.quick:
        a.ks, a.timing_steps, a.prefill_repeats, a.probe_records = [0, 15], 3, 2, 4
    ks = sorted(set(a.ks) | {0})
    runs = a.runs.resolve()
    train_missing(runs, ks, a.threads, a.quick)
    result = measure(runs, ks, a)
    (runs / "results.json").write_text(json.dumps(result, indent=2))
    dq.plot(result, runs / "quality.png")
    print(dq.table(result))
    p = result["probe"]
    after = p["after_training"]["recommended_k"] if p["after_training"] else None
    print(f"probe recommends k = {p['before_training']['recommended_k']} before training, k = {after} after")
    print(f"largest k within 2 points of k = 0: {result['best_within_2_points']}; threads {result['threads']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
