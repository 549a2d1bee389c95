"""Reliability: media and prompts. Unreadable images and WAVs, resampled rates, empty
audio, invalid SMILES, prompts with no or too many placeholders and prompts longer than the
LLM's context give one-line `InputError`s before any model runs; with `errors="collect"` a batch
reports its bad prompts and prepares (and generates) the others."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import images, make_model, spec_dict
from PIL import Image

from composer.builder import build
from composer.errors import InputError
from composer.spec import parse_spec

ROOT = Path(__file__).resolve().parents[1]
PNG = ROOT / "specs/tiny/assets/red_circle.png"


@pytest.fixture(scope="module")
def model():
    return make_model("llama", insert_at=1)  # context: max_position_embeddings 512


def _raises(fn, match: str) -> str:
    with pytest.raises(InputError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


def _bad_images(tmp_path: Path) -> dict[Path, str]:
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(PNG.read_bytes()[:200])
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    (tmp_path / "adir.png").mkdir()
    return {
        truncated: "cannot read image",
        text: "cannot read image (UnidentifiedImageError",
        tmp_path / "adir.png": "cannot read image (IsADirectoryError",
        tmp_path / "missing.png": "cannot read image",
    }


def test_unreadable_images_name_the_file(model, tmp_path):
    for path, msg in _bad_images(tmp_path).items():
        got = _raises(lambda path=path: model.prepare([model.format_prompt("q")], image=[path]), "cannot read image")
        assert got.startswith(f"{path}: {msg}"), got


def test_placeholder_counts(model):
    _raises(
        lambda: model.prepare(["no placeholder here"], image=[PNG]),
        r"^image: the prompts contain 0 '<image>' placeholder\(s\) but 1 image item\(s\) were given$",
    )
    _raises(
        lambda: model.prepare(["<image> and <image>"], image=[PNG]),
        r"^image: the prompts contain 2 '<image>' placeholder\(s\) but 1 image item\(s\) were given$",
    )
    # over the whole batch the items cannot be assigned to prompts: raised in collect mode too
    _raises(
        lambda: model.prepare([model.format_prompt("a"), "none"], image=[PNG, PNG], errors="collect"),
        r"^image: the prompts contain 1 '<image>' placeholder\(s\) but 2 image item\(s\)",
    )
    _raises(lambda: model.prepare(["x"], errors="ignore"), r"^errors must be 'raise' or 'collect', got 'ignore'$")
    text_only = model.prepare(["just text"])  # no placeholder and no item: a text-only prompt
    assert set(text_only) == {"input_ids", "attention_mask"}


def test_prompt_longer_than_the_context_is_refused_before_the_model_runs(model, monkeypatch):
    def never(*a, **k):
        raise AssertionError("the model ran")

    long = model.format_prompt("x" * 520)  # 520 bytes + template + 16 image tokens > 512 positions
    n = len(model.tokenizer(long)["input_ids"]) - 1 + 16
    _raises(
        lambda: model.prepare([long], image=[PNG]),
        rf"^prompt 0: {n} tokens \(1 x 16 for '<image>'\) exceed the LLM's context of 512 positions "
        r"\(max_position_embeddings\)$",
    )
    ok = model.prepare([model.format_prompt("x" * 470)], image=[PNG])
    monkeypatch.setattr(model.adapter, "embed", never)
    width = int(ok["attention_mask"].sum())
    _raises(
        lambda: model.generate(**ok, max_new_tokens=40),
        rf"^the longest prompt has {width} tokens; with max_new_tokens=40 it exceeds the LLM's context of 512",
    )
    ids = torch.ones(1, 600, dtype=torch.long)
    _raises(lambda: model(input_ids=ids), r"the longest prompt has 600 tokens; with max_new_tokens=0 it exceeds")


def test_opt_past_its_learned_positions_is_a_clear_error_not_an_index_error():
    """OPT's position table has max_position_embeddings rows: a generation that fits uses them all,
    and one that would run past them is refused up front, naming the context length, instead of
    dying mid-batch with an IndexError."""
    d = spec_dict("opt", 1)
    d["llm"]["config"]["max_position_embeddings"] = 48
    opt = build(parse_spec(d)).eval()
    batch = opt.prepare([opt.format_prompt("hi")], image=list(images(1)))
    n = int(batch["attention_mask"].sum())
    assert opt.generate(**batch, max_new_tokens=48 - n, eos_token_id=[]).shape == (1, 48 - n)  # fits exactly
    _raises(
        lambda: opt.generate(**batch, max_new_tokens=49 - n),
        rf"with max_new_tokens={49 - n} it exceeds the "
        "LLM's context of 48 positions",
    )


def test_collect_reports_bad_items_and_generates_the_rest(model, tmp_path):
    bad = _bad_images(tmp_path)
    truncated = next(iter(bad))
    prompts = [
        model.format_prompt("first"),
        model.format_prompt("second"),
        model.format_prompt("third"),
        model.format_prompt("x" * 600),
        "text only",
        model.format_prompt("sixth"),
    ]
    items = [PNG, truncated, Image.open(PNG), PNG, tmp_path / "missing.png"]
    batch, rows, errors = model.prepare(prompts, image=items, errors="collect")
    assert rows == [0, 2, 4]
    assert errors[1].startswith(f"{truncated}: cannot read image")
    assert errors[3].startswith("prompt 3: ") and "exceed the LLM's context of 512" in errors[3]
    assert errors[5].startswith(f"{tmp_path / 'missing.png'}: cannot read image")
    # the good rows are exactly what preparing them alone gives, and generate as they would alone
    alone = model.prepare([prompts[i] for i in rows], image=[PNG, Image.open(PNG)])
    assert batch.keys() == alone.keys() and all(torch.equal(batch[k], alone[k]) for k in batch)
    got = model.generate(**batch, max_new_tokens=5, eos_token_id=[])
    assert torch.equal(got, model.generate(**alone, max_new_tokens=5, eos_token_id=[]))
    # nothing good: no batch, every error reported
    none, rows, errors = model.prepare([model.format_prompt("a")], image=[truncated], errors="collect")
    assert none is None and rows == [] and list(errors) == [0]


def _wav(path: Path, x: np.ndarray, rate: int) -> Path:
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def test_audio_batch_with_an_empty_and_a_truncated_wav(tmp_path):
    audio = build(ROOT / "specs/tiny/ltu_audio.yaml").eval()
    t = np.arange(8000) / 8000
    wav8k = _wav(tmp_path / "a8k.wav", 0.5 * np.sin(2 * np.pi * 440 * t), 8000)  # resampled to 16 kHz
    empty = _wav(tmp_path / "empty.wav", np.zeros(0), 16000)
    truncated = tmp_path / "cut.wav"
    truncated.write_bytes(wav8k.read_bytes()[:3000])
    tone16 = (0.5 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)).astype(np.float32)
    prompts = [audio.format_prompt(q) for q in ("a", "b", "c", "d")]
    batch, rows, errors = audio.prepare(prompts, audio=[wav8k, empty, truncated, (tone16, 16000)], errors="collect")
    assert rows == [0, 3] and errors == {
        1: f"{empty}: empty audio (0 samples)",
        2: f"{truncated}: truncated WAV (the header says 8000 frames, the file holds 1478)",
    }
    alone = audio.prepare([prompts[0], prompts[3]], audio=[wav8k, (tone16, 16000)])
    assert torch.equal(batch["audio"], alone["audio"])
    # the 8 kHz file was resampled: its features match the 16 kHz tone's within quantisation noise
    frames = 1 + (16000 - 400) // 160
    loud = alone["audio"][1][:frames] > -0.5
    assert (alone["audio"][0][:frames] - alone["audio"][1][:frames])[loud].abs().max() < 0.05
    _raises(
        lambda: audio.prepare([prompts[0]], audio=[(tone16, 0)]),
        r"^audio item[ ]0: sampling rate must be in \[1000, 768000\] Hz, got 0$",
    )


def test_smiles_batch_with_an_invalid_molecule(tmp_path):
    mol = build(ROOT / "specs/tiny/molca.yaml").eval()
    prompts = [mol.format_prompt(s) for s in ("CCO", "C1CC", "c1ccccc1", "")]
    batch, rows, errors = mol.prepare(prompts, molecule=["CCO", "C1CC", "c1ccccc1", ""], errors="collect")
    assert rows == [0, 2] and errors == {1: "invalid SMILES 'C1CC': RDKit cannot parse it", 3: "SMILES '' has no atoms"}
    out = mol.generate(**batch, max_new_tokens=4, eos_token_id=[])
    assert out.shape == (2, 4)


def test_cli_generate_with_a_prompt_longer_than_the_context(model, tmp_path, capsys):
    from composer.cli import main

    ckpt = model.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(SystemExit) as e:
        main(["generate", str(ckpt), "--prompt", "x" * 600, "--image", str(PNG)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: prompt 0: ") and "exceed the LLM's context of 512 positions" in err


def test_16_bit_pngs_are_scaled_not_clipped(model, tmp_path):
    """16-bit greyscale is scaled to 8 bits (value // 257), not clipped to white: the same
    pixels as the 8-bit file."""
    import numpy as np
    from PIL import Image

    from composer.adapters.vision import to_rgb

    ramp = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")
        rgb = np.asarray(to_rgb(im))
    assert np.array_equal(rgb[..., 0], (ramp.astype(np.int64) // 257).astype(np.uint8))
    Image.fromarray((ramp // 257).astype(np.uint8), "L").convert("RGB").save(tmp_path / "g8.png")
    a = model.prepare([model.format_prompt("q")], image=[str(tmp_path / "g16.png")])["image"]
    b = model.prepare([model.format_prompt("q")], image=[str(tmp_path / "g8.png")])["image"]
    assert torch.equal(a, b)


def test_an_image_past_the_pixel_limit_is_refused_by_name(model, tmp_path, monkeypatch):
    """An image past the pixel limit is refused by name from its header, before decoding."""
    from PIL import Image

    import composer.adapters.vision as vision

    Image.new("RGB", (40, 30)).save(tmp_path / "big.png")
    monkeypatch.setattr(vision, "MAX_IMAGE_PIXELS", 1000)
    got = _raises(lambda: model.prepare([model.format_prompt("q")], image=[str(tmp_path / "big.png")]), "exceeds")
    assert got == f"{tmp_path / 'big.png'}: image of 40 x 30 pixels exceeds the limit of 1000 pixels"


def test_absurd_wav_rates_are_refused_and_odd_ratios_stay_small(tmp_path):
    """A WAV header's rate outside [1 kHz, 768 kHz] (1,000,003 Hz, 4,294,967,291 Hz, 0) is
    refused by name, before a resampler could allocate gigabytes for it; an odd ratio inside the
    range resamples with bounded memory and stays accurate."""
    import struct
    import tracemalloc

    import numpy as np

    from composer.adapters.audio import read_wav, resample

    for rate in (1_000_003, 4_294_967_291, 0):
        path = tmp_path / f"r{rate}.wav"
        data = np.zeros(2000, "<i2").tobytes()
        header = (
            b"RIFF"
            + struct.pack("<I", 36 + len(data))
            + b"WAVEfmt "
            + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2 % 2**32, 2, 16)
            + b"data"
            + struct.pack("<I", len(data))
        )
        path.write_bytes(header + data)
        with pytest.raises(InputError, match=rf"{path}: (sampling rate {rate} Hz in the WAV header is outside|cannot)"):
            read_wav(path)
    sr = 44_101  # gcd(44101, 16000) = 1: 16,000 phases exactly
    t = np.arange(sr) / sr
    tone = np.sin(2 * np.pi * 1000 * t).astype(np.float32)
    tracemalloc.start()
    out = resample(tone, sr, 16000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 200e6, peak
    want = np.sin(2 * np.pi * 1000 * np.arange(len(out)) / 16000)
    inner = slice(200, len(out) - 200)  # away from the zero-padded ends
    assert np.abs(out[inner] - want[inner]).max() < 2e-3
