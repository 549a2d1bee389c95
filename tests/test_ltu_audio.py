"""LTU audio seed system: AST encoder adapter, WAV reading and resampling, the pool projector,
the tiny twin (specs/tiny/ltu_audio.yaml) end to end (training steps, cached generation, ONNX),
and the real spec (specs/ltu_audio.yaml) inspected offline with the published sizes."""

from __future__ import annotations

import json
import struct
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from composer.adapters.audio import ASTAudioEncoder, read_wav, resample
from composer.builder import build
from composer.errors import InputError, SpecError
from composer.projectors import PoolProjector
from composer.spec import load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "specs/tiny/ltu_audio.yaml"
TONE = ROOT / "specs/tiny/assets/tone.wav"


def write_wav(path: Path, x: np.ndarray, rate: int, width: int = 2) -> Path:
    """Float samples in [-1, 1], (samples,) or (samples, channels) -> PCM WAV of ``width`` bytes."""
    x = x.reshape(-1, 1) if x.ndim == 1 else x
    if width == 1:
        data = (128 + np.round(x * 127)).astype(np.uint8).tobytes()
    elif width == 3:
        v = np.round(x * (2**23 - 1)).astype("<i4")
        data = v.view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    else:
        data = np.round(x * (2 ** (8 * width - 1) - 1)).astype(f"<i{width}").tobytes()
    with wave.open(str(path), "wb") as f:
        f.setnchannels(x.shape[1])
        f.setsampwidth(width)
        f.setframerate(rate)
        f.writeframes(data)
    return path


def tone(rate: int, hz: float = 1000.0, seconds: float = 1.0) -> np.ndarray:
    return 0.5 * np.sin(2 * np.pi * hz * np.arange(int(rate * seconds)) / rate)


@pytest.fixture(scope="module")
def model():
    return build(load_spec(TINY)).eval()


def _batch(model, tmp_path: Path):
    a = write_wav(tmp_path / "a.wav", tone(16000, 440.0), 16000)
    b = write_wav(tmp_path / "b.wav", tone(16000, 1500.0, 0.6), 16000)
    prompts = [model.format_prompt("Describe the sound in detail."), model.format_prompt("Hi")]
    return model.prepare(prompts, padding_side="left", audio=[a, b])


# -- the tiny twin ------------------------------------------------------------------------------------------
def test_tiny_twin_builds_with_ltu_components(model):
    enc, proj = model.encoders["audio"], model.projectors["audio"]
    assert isinstance(enc, ASTAudioEncoder) and isinstance(proj, PoolProjector)
    assert enc.grid == (3, 25) and enc.num_tokens == 75 and model.num_tokens("audio") == 8
    assert model.insert_at == {"audio": 2}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    llm = {n for n in trainable if n.startswith("llm.")}
    assert llm and all("lora_" in n for n in llm)
    assert len(llm) == 4 * 2 * 2  # 4 layers x (q_proj, v_proj) x (A, B)
    assert not any(n.startswith("encoders.") for n in trainable)
    assert {n for n in trainable if n.startswith("projectors.")} == {
        "projectors.audio.1.weight",
        "projectors.audio.1.bias",
    }
    lora = model.llm.model.layers[0].self_attn.q_proj
    assert lora.r["default"] == 8 and lora.scaling["default"] == 16 / 8


def test_prepare_reads_wav_and_matches_the_feature_extractor(model, tmp_path):
    x = tone(16000, 440.0)
    batch = model.prepare([model.format_prompt("q")], audio=[write_wav(tmp_path / "t.wav", x, 16000)])
    assert batch["audio"].shape == (1, 104, 16)
    assert (batch["input_ids"] == model.placeholder_ids["audio"]).sum() == 8
    wav = np.round(x * 32767).astype(np.int16).astype(np.float32) / 32768  # what the 16-bit file holds
    want = model.processors["audio"](wav, sampling_rate=16000, return_tensors="pt")["input_values"]
    assert torch.equal(batch["audio"], want)
    # numpy waveforms and (waveform, rate) tuples give the same features; 2-D tensors pass through
    same = model.prepare([model.format_prompt("q")] * 3, audio=[wav, (wav, 16000), want[0]])["audio"]
    assert all(torch.equal(same[i], want[0]) for i in range(3))
    # the committed asset (8-bit PCM) works too
    assert model.prepare([model.format_prompt("q")], audio=[str(TONE)])["audio"].shape == (1, 104, 16)


def test_44k_stereo_wav_is_resampled_to_16k(model, tmp_path):
    x44 = np.stack([tone(44100), tone(44100)], 1)  # stereo, both channels the same tone
    wav, rate = read_wav(write_wav(tmp_path / "t44.wav", x44, 44100))
    assert rate == 44100 and wav.shape == (44100,)
    y = resample(wav, 44100, 16000)
    assert y.shape == (16000,)
    ref = tone(16000)
    assert np.abs(y - ref)[100:-100].max() < 1e-3  # 16-bit quantisation dominates
    f44 = model.prepare([model.format_prompt("q")], audio=[tmp_path / "t44.wav"])["audio"][0]
    f16 = model.prepare([model.format_prompt("q")], audio=[write_wav(tmp_path / "t16.wav", ref, 16000)])["audio"][0]
    frames = 1 + (16000 - 400) // 160  # 98 frames of audio, then padding
    assert torch.equal(f44[frames:], f16[frames:])
    loud = f16[:frames] > -0.5  # mel bins with energy (the rest sit at the log floor, where noise dominates)
    assert loud.any(1).all() and (f44[:frames] - f16[:frames])[loud].abs().max() < 1e-2


def test_resampling_rejects_aliases():
    # a 12 kHz tone at 44.1 kHz lies above the 8 kHz Nyquist of 16 kHz: it must vanish, not fold to 4 kHz
    y = resample(tone(44100, 12000.0).astype(np.float32), 44100, 16000)
    assert np.sqrt(np.mean(y[200:-200] ** 2)) < 1e-4
    up = resample(tone(8000, 1000.0).astype(np.float32), 8000, 16000)
    assert np.abs(up - tone(16000, 1000.0))[100:-100].max() < 1e-4


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_pcm_sample_widths(tmp_path, width):
    x = tone(16000, 440.0, 0.1)
    wav, rate = read_wav(write_wav(tmp_path / f"w{width}.wav", x, 16000, width))
    assert rate == 16000 and wav.dtype == np.float32
    assert np.abs(wav - x).max() < max(1.5 / 2 ** (8 * width - 1), 1e-7)  # quantisation, float32 for 32-bit


# (soundfile format, subtype, max |error| vs the float signal): every common WAV encoding, FLAC, OGG
FILE_FORMATS = [
    ("WAV", "PCM_U8", 1 / 64),
    ("WAV", "PCM_16", 1 / 16384),
    ("WAV", "PCM_24", 1e-6),
    ("WAV", "PCM_32", 1e-7),
    ("WAV", "FLOAT", 1e-7),
    ("WAV", "DOUBLE", 1e-7),
    ("WAV", "ULAW", 0.02),
    ("WAVEX", "PCM_16", 1 / 16384),  # WAVE_FORMAT_EXTENSIBLE
    ("WAVEX", "FLOAT", 1e-7),
    ("FLAC", "PCM_24", 1e-6),
    ("OGG", "VORBIS", None),  # lossy: mean |error| instead
]


@pytest.mark.parametrize("fmt,subtype,tol", FILE_FORMATS, ids=[f"{f}-{s}" for f, s, _ in FILE_FORMATS])
def test_audio_file_formats_are_read(model, tmp_path, fmt, subtype, tol):
    """WAV of every common encoding (float WAV included), FLAC and OGG are read through soundfile
    to float32 at the file's rate, within each encoding's resolution; stereo files are averaged
    to mono."""
    import soundfile as sf

    from composer.adapters.audio import read_audio

    x = tone(16000, 440.0, 0.5)
    path = tmp_path / f"a.{'ogg' if fmt == 'OGG' else 'flac' if fmt == 'FLAC' else 'wav'}"
    sf.write(path, np.stack([x, x], 1), 16000, format=fmt, subtype=subtype)
    wav, rate = read_audio(path)
    assert rate == 16000 and wav.dtype == np.float32 and wav.shape == x.shape
    err = np.abs(wav - x)
    assert err.mean() < 0.01 if tol is None else err.max() <= tol
    # a file path gives the features of the waveform it holds
    feats = model.prepare([model.format_prompt("q")], audio=[path])["audio"]
    assert torch.equal(feats, model.prepare([model.format_prompt("q")], audio=[(wav, rate)])["audio"])


def test_hand_written_float_wav_and_the_stdlib_fallback(tmp_path, monkeypatch):
    """A minimal IEEE-float WAV (format 3) written byte by byte reads exactly; without soundfile
    the stdlib reader takes PCM WAV and names what it cannot read."""
    from composer.adapters import audio as audio_mod

    x = np.linspace(-0.5, 0.5, 100, dtype="<f4")
    float_wav = tmp_path / "float.wav"
    float_wav.write_bytes(
        b"RIFF"
        + struct.pack("<I", 36 + x.nbytes)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 3, 1, 16000, 64000, 4, 32)
        + b"data"
        + struct.pack("<I", x.nbytes)
        + x.tobytes()
    )
    wav, rate = audio_mod.read_audio(float_wav)
    assert rate == 16000 and np.array_equal(wav, x)
    pcm = write_wav(tmp_path / "pcm.wav", tone(16000, 440.0, 0.1), 16000)
    with_sf = audio_mod.read_audio(pcm)
    monkeypatch.setitem(__import__("sys").modules, "soundfile", None)  # import soundfile -> ImportError
    without = audio_mod.read_audio(pcm)
    assert without[1] == with_sf[1] and np.abs(without[0] - with_sf[0]).max() <= 1 / 32768
    with pytest.raises(InputError, match=r"float\.wav: cannot read audio: not a PCM WAV file \(unknown format: 3\)"):
        audio_mod.read_audio(float_wav)


def test_bad_audio_is_a_one_line_input_error(model, tmp_path):
    good = write_wav(tmp_path / "good.wav", tone(16000), 16000)
    truncated = tmp_path / "truncated.wav"
    truncated.write_bytes(good.read_bytes()[:10000])
    not_wav = tmp_path / "image.wav"
    not_wav.write_bytes((ROOT / "specs/tiny/assets/red_circle.png").read_bytes())
    header_only = tmp_path / "header.wav"
    header_only.write_bytes(good.read_bytes()[:20])
    empty = write_wav(tmp_path / "empty.wav", np.zeros(0), 16000)
    cases = {
        truncated: r"truncated\.wav: truncated WAV \(the header says 16000 frames, the file holds 4978\)",
        not_wav: r"image\.wav: cannot read audio \(Format not recognised\.\)$",
        header_only: r"header\.wav: cannot read audio \(.+\)$",
        empty: r"empty\.wav: empty audio \(0 samples\)",
        tmp_path / "missing.wav": r"missing\.wav: audio file not found",
    }
    for path, msg in cases.items():
        with pytest.raises(InputError, match=msg) as e:
            model.prepare([model.format_prompt("q")], audio=[path])
        assert "\n" not in str(e.value)
    with pytest.raises(InputError, match=r"audio item[ ]0: empty audio \(0 samples\)"):
        model.prepare([model.format_prompt("q")], audio=[np.zeros(0, np.float32)])
    with pytest.raises(InputError, match=r"audio item[ ]1: waveform contains NaN"):
        model.prepare([model.format_prompt("q")] * 2, audio=[tone(16000), np.full(100, np.nan)])


def test_forward_loss_and_lora_training_steps(model, tmp_path):
    batch = _batch(model, tmp_path)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    try:
        for _ in range(5):
            out = model(**batch, labels=batch["input_ids"])
            assert torch.isfinite(out.loss) and out.logits.shape == (*batch["input_ids"].shape, 272)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            losses.append(out.loss.item())
        assert all(b < a for a, b in zip(losses, losses[1:], strict=False)) and losses[-1] < losses[0] - 0.05, losses
        assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    finally:
        model.load_state_dict(state)  # the module-scoped model stays as built


def test_cached_generation_equals_recomputation_batch_of_two(model, tmp_path):
    batch = _batch(model, tmp_path)
    assert batch["attention_mask"][1, 0] == 0  # the short prompt is left-padded
    cached = model.generate(**batch, max_new_tokens=6, eos_token_id=[])
    full = model.generate(**batch, max_new_tokens=6, eos_token_id=[], use_cache=False)
    assert cached.shape == (2, 6) and torch.equal(cached, full)
    # each row equals its own unpadded run
    for i in range(2):
        row = {k: v[i : i + 1] for k, v in batch.items()}
        keep = row["attention_mask"][0].bool()
        row["input_ids"], row["attention_mask"] = row["input_ids"][:, keep], row["attention_mask"][:, keep]
        assert torch.equal(model.generate(**row, max_new_tokens=6, eos_token_id=[]), cached[i : i + 1])


def test_checkpoint_round_trip_keeps_the_audio_processor(model, tmp_path):
    from composer.model import ComposedModel

    out = model.save_pretrained(tmp_path / "ckpt")
    again = ComposedModel.from_pretrained(out)
    batch = model.prepare([model.format_prompt("q")], audio=[TONE])
    batch2 = again.prepare([again.format_prompt("q")], audio=[TONE])
    assert all(torch.equal(batch[k], batch2[k]) for k in batch)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, again(**batch2).logits)


# -- the AST adapter -----------------------------------------------------------------------------------------
TINY_AST = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    patch_size=8,
    frequency_stride=4,
    time_stride=4,
    num_mel_bins=16,
    max_length=104,
)


@pytest.mark.parametrize("feature_layer,select", [(-1, "patch"), (-2, "patch"), (0, "all"), (2, "all")])
def test_ast_features_equal_transformers_hidden_states(model, feature_layer, select):
    enc = model.encoders["audio"]
    adapter = ASTAudioEncoder(enc.model, feature_layer=feature_layer, select=select)
    x = torch.randn(2, 104, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = adapter(x)
        ref = enc.model(input_values=x, output_hidden_states=True)
    want = ref.last_hidden_state if feature_layer in (-1, 2) else ref.hidden_states[feature_layer]
    want = want[:, 2:] if select == "patch" else want
    assert got.shape == (2, adapter.num_tokens, 32) and torch.equal(got, want)
    with pytest.raises(ValueError, match=r"feature_layer must be in \[-3, 2\]"):
        ASTAudioEncoder(enc.model, feature_layer=3)


def _old_ast_key(k: str) -> str:
    """transformers 5 AST key -> the layout of the published checkpoints (ViT-style names)."""
    for new, old in [
        ("layers.", "encoder.layer."),
        ("attention.q_proj", "attention.attention.query"),
        ("attention.k_proj", "attention.attention.key"),
        ("attention.v_proj", "attention.attention.value"),
        ("attention.o_proj", "attention.output.dense"),
        ("mlp.fc1", "intermediate.dense"),
        ("mlp.fc2", "output.dense"),
    ]:
        k = k.replace(new, old)
    return k


@pytest.mark.filterwarnings("ignore:At least one mel filter has all zero values")  # the 128-bin extractor below
@pytest.mark.parametrize("layout", ["ast_model", "hub_classifier"])
def test_encoder_loads_from_a_local_checkpoint_dir(tmp_path, layout):
    """A saved ASTModel dir, and a dir in the layout of MIT/ast-finetuned-audioset-10-10-0.4593
    (ASTForAudioClassification, pre-transformers-5 key names): weights arrive exactly."""
    from safetensors.torch import save_file
    from transformers import ASTConfig, ASTFeatureExtractor, ASTForAudioClassification, ASTModel

    torch.manual_seed(1)
    cfg = ASTConfig(**TINY_AST, num_labels=3)
    src = tmp_path / "ast"
    if layout == "ast_model":
        hf = ASTModel(cfg)
        hf.save_pretrained(src)
    else:
        full = ASTForAudioClassification(cfg)
        hf = full.audio_spectrogram_transformer
        src.mkdir()
        save_file(
            {_old_ast_key(k): v.contiguous() for k, v in full.state_dict().items()},
            src / "model.safetensors",
            metadata={"format": "pt"},
        )
        (src / "config.json").write_text(json.dumps({**cfg.to_dict(), "architectures": ["ASTForAudioClassification"]}))
    ASTFeatureExtractor(num_mel_bins=16, max_length=104).save_pretrained(src)
    d = load_spec(TINY).model_dump(exclude_none=True)
    d["modalities"]["audio"]["encoder"] = {"model": str(src), "feature_layer": -1, "select": "patch"}
    m = build(parse_spec(d))
    got, want = m.encoders["audio"].model.state_dict(), hf.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert m.num_tokens("audio") == 8
    # a feature extractor that does not fit the config is refused at build time
    ASTFeatureExtractor(num_mel_bins=128, max_length=1024).save_pretrained(src)
    with pytest.raises(
        InputError, match=r"modalities.audio.encoder.processor: .*\(1024, 128\), the AST config expects \(104, 16\)"
    ):
        build(parse_spec(d))


# -- the pool projector --------------------------------------------------------------------------------------
def test_pool_projector_is_ltu_pooling():
    torch.manual_seed(0)
    proj = PoolProjector(32, 64, tokens=32, rows=12)
    x = torch.randn(2, 12 * 101, 32)  # AST: 12 frequency rows x 101 time columns
    assert proj.num_tokens(1212) == 32
    out = proj(x)
    # LTU: mean over frequency, then average over time; bins of adaptive_avg_pool1d
    cols = x.reshape(2, 12, 101, 32).mean(1)
    bins = [(i * 101 // 32, -(-(i + 1) * 101 // 32)) for i in range(32)]
    pooled = torch.stack([cols[:, a:b].mean(1) for a, b in bins], 1)
    want = F.linear(F.layer_norm(pooled, (32,)), proj[1].weight, proj[1].bias)
    assert out.shape == (2, 32, 64) and (out - want).abs().max() < 1e-5
    mx = PoolProjector(32, 64, tokens=4, pooling="max")
    assert torch.equal(mx(x[:, :8]), mx[1](mx[0](x[:, :8].reshape(2, 4, 2, 32).amax(2))))
    with pytest.raises(SpecError, match=r"projector: pool needs the encoder's 1214 tokens to form 12 row\(s\)"):
        proj.num_tokens(1214)  # select: all adds CLS + distillation: no longer a 12-row grid


def test_pool_projector_spec_fields():
    d = load_spec(TINY).model_dump(exclude_none=True)
    d["modalities"]["audio"]["projector"]["pooling"] = "median"
    with pytest.raises(SpecError, match=r"modalities.audio.projector.pooling: must be 'avg' or 'max'"):
        parse_spec(d)
    d["modalities"]["audio"]["projector"] = {"type": "pool", "num_tokens": 0}
    with pytest.raises(SpecError, match=r"modalities.audio.projector.num_tokens: must be > 0"):
        parse_spec(d)


# -- the real spec -------------------------------------------------------------------------------------------
def test_real_ltu_spec_inspects_offline(monkeypatch, tmp_path):
    from composer.analysis.summary import summarize

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache: only embedded configs can answer
    spec = load_spec(ROOT / "specs/ltu_audio.yaml")
    assert spec.llm.train == "lora" and (spec.llm.lora.r, spec.llm.lora.alpha) == (8, 16)
    assert spec.llm.lora.target_modules == ["q_proj", "v_proj"]
    model = build(spec, shape_only=True, offline=True)
    _, facts = summarize(model)
    lora = 32 * 2 * 8 * (4096 + 4096)  # 32 layers x (q, v) x r x (in + out)
    assert facts["params"]["llm"] == {"total": 6_738_415_616 + lora, "trainable": lora}
    assert facts["params"]["audio.encoder"] == {"total": 86_187_264, "trainable": 0}  # AST base, 12 x 101 patches
    assert facts["params"]["audio.projector"]["total"] == 768 * 4096 + 4096
    assert facts["mm_tokens_per_item"] == {"audio": 32} and facts["insert_at"] == {"audio": 16}
    assert model.encoders["audio"].grid == (12, 101)


# -- ONNX export (one export for the file) -------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from composer.export.exporter import export_onnx

    m = build(load_spec(TINY)).eval()
    return m, export_onnx(m, tmp_path_factory.mktemp("ltu") / "bundle")


@pytest.mark.slow
def test_onnx_bundle_verifies_and_generates_from_a_wav(bundle, tmp_path):
    from composer.export.runtime import OnnxPipeline
    from composer.export.verify import verify_bundle

    m, path = bundle
    report = verify_bundle(m, path)
    assert report["ok"] and report["greedy_match"], report
    assert report["graphs"]["encoder.audio.onnx"] < 1e-4
    pipe = OnnxPipeline(path)
    assert pipe.encoders["audio"].tokens_per_item == 8 and pipe.encoders["audio"].inputs == ["input_values"]
    batch = _batch(m, tmp_path)
    assert torch.equal(
        pipe.prepare([pipe.format_prompt("Hi")], audio=[TONE])["audio"],
        m.prepare([m.format_prompt("Hi")], audio=[TONE])["audio"],
    )
    want = m.generate(**batch, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(pipe.generate(**batch, max_new_tokens=6, eos_token_id=[]), want)


@pytest.mark.slow
def test_cli_generate_with_audio(bundle, capsys):
    from composer.cli import main

    _, path = bundle
    with pytest.raises(SystemExit) as e:
        main(["generate", str(path), "--audio", str(TONE), "--prompt", "What do you hear?", "--max-new-tokens", "4"])
    assert e.value.code == 0 and capsys.readouterr().out.strip()
    with pytest.raises(SystemExit) as e:
        main(["generate", str(path), "--audio", str(ROOT / "specs/tiny/assets/red_circle.png"), "--prompt", "q"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0
    assert err.startswith("error: ") and "red_circle.png: cannot read audio (Format not recognised.)" in err
