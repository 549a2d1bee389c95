"""Audio encoder adapters: AST (Audio Spectrogram Transformer) over log-mel filterbanks, as in
LTU (Gong et al. 2023, "Listen, Think, and Understand").

Raw audio in, patch tokens out::

    audio file (WAV, FLAC, OGG) / waveform (any rate) --mono, resample to 16 kHz--> ASTFeatureExtractor
        --> input_values (items, max_length frames, num_mel_bins)      e.g. (n, 1024, 128)
        --> ASTModel --> hidden states (n, 2 + F * T, d)               F = 12 frequency rows,
                                                                       T = 101 time columns
Token layout: transformers' ``ASTEmbeddings`` puts the CLS and distillation tokens first, then
the patches in frequency-major order (patch ``f * T + t``). ``select: patch`` drops the first
two (``F * T`` tokens, 1212 for the MIT AudioSet checkpoint), ``select: all`` keeps them.

``feature_layer``: -1 (or ``num_hidden_layers``) is ``last_hidden_state``, i.e. after AST's
final LayerNorm, which is what AST's own classifier and LTU's audio encoder feed on; any other
value indexes ``hidden_states`` (0 = patch + position embeddings, i = output of layer i, -2 =
the penultimate layer).

Audio input (``preprocess``): audio file paths (``read_audio``: WAV of every common encoding
(PCM 8/16/24/32-bit, IEEE float, WAVE_FORMAT_EXTENSIBLE), FLAC, OGG/Vorbis/Opus, AIFF, any
channel count, read through ``soundfile``/libsndfile; the stdlib ``wave`` reader ``read_wav``
(PCM only) when soundfile is unavailable), 1-D numpy waveforms at the feature extractor's rate, or
``(waveform, sampling_rate)`` tuples; 2-D torch tensors are taken as already computed features
``(max_length, num_mel_bins)``. Channels are averaged to mono; other rates are resampled with
``resample`` (windowed-sinc, see there). No torchaudio: transformers' ``ASTFeatureExtractor``
computes the Kaldi-style filterbank with numpy when torchaudio is absent.
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
import warnings
import wave
from typing import Any

import numpy as np
import torch

from composer.adapters.encoder import HFEncoder, hidden_state_index
from composer.errors import InputError

# ASTFeatureExtractor's frame and hop in samples (25 ms and 10 ms at 16 kHz; fixed in transformers).
WINDOW, HOP = 400, 160

# -- reading and resampling audio --------------------------------------------------------------------


def read_audio(path: str | os.PathLike[str], max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """An audio file -> (mono float32 waveform, sampling rate), through ``soundfile`` (libsndfile,
    whose wheels bundle the library): WAV of every common encoding (PCM 8/16/24/32-bit, IEEE
    float 32/64, A-law/mu-law, WAVE_FORMAT_EXTENSIBLE), FLAC, OGG/Vorbis/Opus, AIFF. Channels are
    averaged. Without soundfile (or its library), ``read_wav`` reads PCM WAV.

    Raises ``InputError`` naming the file when it is missing, unreadable, truncated (a WAV whose
    data chunk declares more frames than the file holds; libsndfile alone would read the rest
    silently), empty, outside [MIN_RATE, MAX_RATE] Hz, or holds NaN/infinite samples; and, with
    ``max_seconds``, longer than that: refused from the header's frame count before any sample is
    decoded, and never more than ``max_seconds`` of samples read (a header may lie or say nothing).
    """
    if not os.path.isfile(path):
        raise InputError(f"{path}: audio file not found")
    try:
        import soundfile as sf
    except (ImportError, OSError):  # OSError: the wheel's libsndfile cannot be loaded
        wave, rate = read_wav(path)
        if max_seconds is not None and len(wave) > max_seconds * rate:
            _too_long(path, len(wave) / rate, max_seconds)
        return wave, rate
    try:
        with sf.SoundFile(str(path)) as f:
            rate = f.samplerate
            if max_seconds is not None:
                if not MIN_RATE <= rate <= MAX_RATE:
                    raise InputError(
                        f"{path}: sampling rate {rate} Hz in the file header is outside [{MIN_RATE}, {MAX_RATE}] Hz"
                    )
                limit = int(max_seconds * rate)
                if f.frames > limit:  # libsndfile reports the header's count (unknown: a huge one or 0)
                    _too_long(path, f.frames / rate, max_seconds)
                data = f.read(frames=limit + 1, dtype="float32", always_2d=True)
                if len(data) > limit:
                    _too_long(path, None, max_seconds)
            else:
                data = f.read(dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[-1].replace(f"Error opening {str(path)!r}: ", "")
        raise InputError(f"{path}: cannot read audio ({reason})") from None
    declared = _riff_frames(path)
    if declared is not None and declared > len(data):
        raise InputError(f"{path}: truncated WAV (the header says {declared} frames, the file holds {len(data)})")
    if data.size == 0:
        raise InputError(f"{path}: empty audio (0 samples)")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise InputError(f"{path}: sampling rate {rate} Hz in the file header is outside [{MIN_RATE}, {MAX_RATE}] Hz")
    if not np.isfinite(data).all():
        raise InputError(f"{path}: audio contains NaN or infinite samples")
    return data.mean(axis=1, dtype=np.float64).astype(np.float32), rate


def _too_long(path, seconds: float | None, limit: float):
    held = f"{seconds:.1f} s of audio" if seconds is not None else "audio longer than the limit"
    raise InputError(f"{path}: {held} exceeds the limit of {float(limit):g} s")


def _riff_frames(path: str | os.PathLike[str]) -> int | None:
    """The frame count a RIFF/WAVE file's ``data`` chunk declares (its bytes / the ``fmt ``
    block align); None for other files, streamed WAVs (size 0 or 0xFFFFFFFF) and odd headers."""
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        align = None
        while len(chunk := f.read(8)) == 8:
            cid, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if cid == b"data":
                return size // align if align and size not in (0, 0xFFFFFFFF) else None
            body = f.read(size + (size & 1))
            if cid == b"fmt " and len(body) >= 14:
                align = struct.unpack("<H", body[12:14])[0]
        return None


def read_wav(path: str | os.PathLike[str]) -> tuple[np.ndarray, int]:
    """A PCM WAV file -> (mono float32 waveform in [-1, 1], sampling rate).

    8-bit WAV is unsigned, 16/24/32-bit signed little-endian (the WAV convention). Channels
    are averaged. Raises ``InputError`` naming the file when it is missing, not a PCM WAV
    (e.g. IEEE-float or compressed WAV), truncated, or holds no samples.
    """
    try:
        with wave.open(str(path), "rb") as f:
            channels, width, rate, frames = f.getnchannels(), f.getsampwidth(), f.getframerate(), f.getnframes()
            data = f.readframes(frames)
    except FileNotFoundError:
        raise InputError(f"{path}: audio file not found") from None
    except (wave.Error, EOFError, OSError) as e:
        reason = str(e) or type(e).__name__
        raise InputError(f"{path}: cannot read audio: not a PCM WAV file ({reason})") from None
    frame_bytes = width * channels
    if frames == 0 or not data:
        raise InputError(f"{path}: empty audio (0 samples)")
    if len(data) != frames * frame_bytes:
        raise InputError(
            f"{path}: truncated WAV (the header says {frames} frames, the file holds {len(data) // frame_bytes})"
        )
    if not MIN_RATE <= rate <= MAX_RATE:
        raise InputError(f"{path}: sampling rate {rate} Hz in the WAV header is outside [{MIN_RATE}, {MAX_RATE}] Hz")
    samples = _pcm_to_float(data, width, str(path)).reshape(-1, channels)
    return samples.mean(axis=1, dtype=np.float64).astype(np.float32), rate


def _pcm_to_float(data: bytes, width: int, where: str) -> np.ndarray:
    if width == 1:  # unsigned 8-bit, silence at 128
        return (np.frombuffer(data, np.uint8).astype(np.float32) - 128.0) / 128.0
    if width == 2:
        return np.frombuffer(data, "<i2").astype(np.float32) / 32768.0
    if width == 3:  # 24-bit: assemble little-endian bytes into the top of an int32, shift back to sign-extend
        b = np.frombuffer(data, np.uint8).reshape(-1, 3).astype(np.int32)
        x = (b[:, 0] << 8) | (b[:, 1] << 16) | (b[:, 2] << 24)
        return (x >> 8).astype(np.float32) / float(1 << 23)
    if width == 4:
        return (np.frombuffer(data, "<i4").astype(np.float64) / float(1 << 31)).astype(np.float32)
    raise InputError(f"{where}: unsupported WAV sample width of {8 * width} bits (PCM 8/16/24/32-bit are read)")


def resample(
    x: np.ndarray, orig_sr: int, target_sr: int, *, zeros: int = 32, rolloff: float = 0.94, beta: float = 8.6
) -> np.ndarray:
    """Band-limited resampling of a 1-D waveform (windowed-sinc interpolation, polyphase).

    Output sample ``n`` sits at input time ``n * orig_sr / target_sr``; it is a weighted sum of
    the input samples within ``zeros`` zero crossings of a sinc low-pass at ``rolloff`` times
    the lower of the two Nyquist frequencies (anti-aliasing when downsampling), tapered by a
    Kaiser window (``beta``). With ``up / down = target_sr / orig_sr`` in lowest terms the
    fractional offsets repeat every ``up`` outputs, so the filter bank has ``up`` phases; each
    phase is normalised to unit DC gain. Samples beyond the ends count as zeros. The same
    construction as Smith's bandlimited interpolation / ``resampy``. Measured: max error 3e-6 on a
    1 kHz tone from 44.1 (or 8, 22.05, 48) to 16 kHz; a 12 kHz tone (above the new Nyquist) comes
    out > 100 dB down instead of aliasing to 4 kHz.
    """
    if orig_sr == target_sr:
        return x
    for sr in (orig_sr, target_sr):
        if not MIN_RATE <= sr <= MAX_RATE:
            raise InputError(f"sampling rate {sr} Hz is outside [{MIN_RATE}, {MAX_RATE}] Hz")
    g = math.gcd(orig_sr, target_sr)
    up, down = target_sr // g, orig_sr // g
    fc = 0.5 * min(1.0, up / down) * rolloff  # cut-off, cycles per input sample
    half = math.ceil(zeros / (2 * fc))  # taps each side of the output time
    j = np.arange(-half + 1, half + 1)  # tap offsets from floor(t)
    n_out = -(-len(x) * up // down)  # ceil
    xp = np.pad(x.astype(np.float64), (half, half + 1))
    windows = np.lib.stride_tricks.sliding_window_view(xp, len(j))  # windows[s] = xp[s : s + taps]
    out = np.empty(n_out, np.float64)
    if up <= MAX_PHASES:  # every fractional offset exactly: `up` phases, each output row a strided view
        bank = _sinc_bank(np.arange(up) / up, j, fc, zeros, beta)
        for p in range(min(up, n_out)):  # outputs p, p + up, ...: input base (p * down) // up + m * down
            rows = windows[(p * down) // up + 1 :: down][: len(range(p, n_out, up))]
            out[p::up] = rows @ bank[(p * down) % up]  # fractional offset of output p
        return out.astype(np.float32)
    # An odd ratio (e.g. 44,101 Hz: 16,000 phases): offsets rounded to MAX_PHASES phases (error
    # < 1 / (2 * MAX_PHASES) of a sample), outputs in chunks, so memory stays bounded whatever the rates.
    bank = _sinc_bank(np.arange(MAX_PHASES + 1) / MAX_PHASES, j, fc, zeros, beta)
    for start in range(0, n_out, 4096):
        n = np.arange(start, min(n_out, start + 4096))
        base, frac = np.divmod(n * down, up)  # input time n * down / up = base + frac / up
        phase = np.rint(frac * MAX_PHASES / up).astype(np.int64)
        out[n] = np.einsum("nt,nt->n", windows[base + 1], bank[phase])
    return out.astype(np.float32)


MIN_RATE, MAX_RATE = 1_000, 768_000  # Hz: what audio files and devices use; the resampler refuses others
MAX_PHASES = 1024  # filter-bank rows computed exactly; past it, fractional offsets are rounded


def _sinc_bank(offsets: np.ndarray, j: np.ndarray, fc: float, zeros: int, beta: float) -> np.ndarray:
    """(len(offsets), taps) Kaiser-windowed sinc low-pass taps at ``offsets`` (fractions of a
    sample past each tap's base), each row normalised to unit DC gain."""
    d = offsets[:, None] - j[None, :]  # distance t - k per phase
    u = np.clip(d * (2 * fc) / zeros, -1.0, 1.0)
    bank = 2 * fc * np.sinc(2 * fc * d) * np.i0(beta * np.sqrt(1.0 - u**2)) / np.i0(beta)
    return bank / bank.sum(axis=1, keepdims=True)


def mono_waveform(item: Any, index: int, rate: int, keep: int) -> np.ndarray:
    """One raw audio item -> mono float32 waveform at ``rate``, at most ``keep`` samples."""
    where = f"audio item {index}"
    if isinstance(item, (str, os.PathLike)):
        where = str(item)
        wav, sr = read_audio(item)
    elif isinstance(item, tuple):
        if len(item) != 2 or not isinstance(item[1], (int, np.integer)) or isinstance(item[1], bool):
            raise InputError(f"{where}: a tuple must be (waveform, sampling_rate: int)")
        wav, sr = _array(item[0], where), int(item[1])
        if not MIN_RATE <= sr <= MAX_RATE:
            raise InputError(f"{where}: sampling rate must be in [{MIN_RATE}, {MAX_RATE}] Hz, got {sr}")
    elif isinstance(item, np.ndarray):
        wav, sr = _array(item, where), rate
    else:
        raise InputError(
            f"{where}: expected an audio file path, a numpy waveform or (waveform, sampling_rate), "
            f"got {type(item).__name__}"
        )
    # The extractor keeps the first `keep` samples; resample only those (plus 100 ms for the filter).
    return resample(wav[: -(-keep * sr // rate) + sr // 10], sr, rate)[:keep]


def _array(a: Any, where: str) -> np.ndarray:
    """A numpy waveform -> mono float32. Integer PCM is scaled to [-1, 1] (unsigned with its
    midpoint as silence); 2-D arrays are multi-channel, the shorter axis being the channels."""
    a = np.asarray(a)
    if a.ndim not in (1, 2):
        raise InputError(f"{where}: a waveform must be 1-D (samples) or 2-D (samples x channels), got shape {a.shape}")
    if a.size == 0:
        raise InputError(f"{where}: empty audio (0 samples)")
    if a.dtype.kind == "i":
        x = a.astype(np.float64) / -float(np.iinfo(a.dtype).min)
    elif a.dtype.kind == "u":
        half = (float(np.iinfo(a.dtype).max) + 1.0) / 2.0
        x = (a.astype(np.float64) - half) / half
    elif a.dtype.kind == "f":
        x = a.astype(np.float64)
    else:
        raise InputError(f"{where}: waveform dtype must be float or integer PCM, got {a.dtype}")
    if x.ndim == 2:
        x = x.mean(axis=int(np.argmin(x.shape)))
    if not np.isfinite(x).all():
        raise InputError(f"{where}: waveform contains NaN or infinite samples")
    return x.astype(np.float32)


def load_audio(processor, items: list) -> torch.Tensor:
    """Audio items -> ``input_values`` (n, max_length, num_mel_bins) for AST.

    Each item: an audio file path (``read_audio``), a numpy waveform (at the extractor's rate), ``(waveform, rate)``,
    or a 2-D tensor of already computed features.
    """
    rate = processor.sampling_rate
    shape = (processor.max_length, processor.num_mel_bins)
    keep = (shape[0] - 1) * HOP + WINDOW  # the samples that make max_length frames; the rest is cut
    feats = []
    for i, x in enumerate(items):
        if isinstance(x, torch.Tensor):
            if tuple(x.shape) != shape:
                raise InputError(f"audio item {i}: a tensor must hold features of shape {shape}, got {tuple(x.shape)}")
            feats.append(x.float())
            continue
        wav = mono_waveform(x, i, rate, keep)
        wav = np.pad(wav, (0, max(0, WINDOW - len(wav))))  # a clip shorter than one frame: pad with silence
        out = processor(wav, sampling_rate=rate, return_tensors="pt")["input_values"]
        feats.append(out[0])
    return torch.stack(feats)


# -- the encoder ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_empty_mel_filters():
    """transformers' numpy filterbank warns that 128 mel filters over a 512-point FFT leave some of
    the narrowest low-frequency filters empty. Kaldi's fbank, which AST was trained on, has the same
    empty filters, so there is nothing to act on; the warning is silenced while the extractor is built."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="At least one mel filter has all zero values")
        yield


class ASTAudioEncoder(HFEncoder):
    """Wraps transformers ``ASTModel``; attribute ``model`` keeps the HF keys below
    ``encoders.<m>.model``. Output: (items, F * T (+2 with ``select: all``), hidden_size)."""

    input_names = ("input_values",)
    num_special_tokens = 2  # CLS and distillation token, ahead of the patches

    def __init__(self, model, feature_layer: int = -1, select: str = "patch"):
        super().__init__(model)
        n = model.config.num_hidden_layers
        self.layer = hidden_state_index(feature_layer, n)  # index into hidden_states; n = the final (normed) output
        self.feature_layer = feature_layer
        self.select = select

    @staticmethod
    def hf_classes():
        from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

        return ASTConfig, ASTModel, ASTFeatureExtractor

    @classmethod
    def _wrap(cls, hf, spec):
        return cls(hf, feature_layer=spec.feature_layer, select=spec.select)

    @classmethod
    def check_config(cls, config) -> None:
        for size in ("num_mel_bins", "max_length"):  # the spectrogram must hold one patch each way
            if getattr(config, size) < config.patch_size:
                raise ValueError(
                    f"config.{size} ({getattr(config, size)}) must be at least config.patch_size ({config.patch_size})"
                )

    @staticmethod
    def default_processor_kwargs(config) -> dict[str, Any]:
        return {"num_mel_bins": config.num_mel_bins, "max_length": config.max_length, "sampling_rate": 16000}

    @classmethod
    def make_processor(cls, config, src, overrides):
        with _quiet_empty_mel_filters():
            proc = super().make_processor(config, src, overrides)
        cls._check_processor(proc, config)
        return proc

    @classmethod
    def load_processor(cls, path: str):
        with _quiet_empty_mel_filters():
            return super().load_processor(path)

    @staticmethod
    def _check_processor(proc, config) -> None:
        want = (config.max_length, config.num_mel_bins)
        got = (proc.max_length, proc.num_mel_bins)
        if got != want:
            raise ValueError(
                f"the feature extractor makes (max_length, num_mel_bins) = {got}, the AST config expects {want}"
            )

    preprocess = staticmethod(load_audio)

    @property
    def grid(self) -> tuple[int, int]:
        """(frequency rows, time columns) of the patch grid (transformers ``ASTEmbeddings.get_shape``)."""
        c = self.model.config
        return (
            (c.num_mel_bins - c.patch_size) // c.frequency_stride + 1,
            (c.max_length - c.patch_size) // c.time_stride + 1,
        )

    @property
    def num_tokens(self) -> int:
        f, t = self.grid
        return f * t + (self.num_special_tokens if self.select == "all" else 0)

    def example_inputs(self, n: int) -> dict[str, torch.Tensor]:
        c = self.model.config
        return {"input_values": torch.randn(n, c.max_length, c.num_mel_bins)}

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:  # (n, frames, mel) -> (n, T, d_enc)
        c = self.model.config
        if tuple(input_values.shape[1:]) != (c.max_length, c.num_mel_bins):
            raise InputError(
                f"input_values: expected (items, {c.max_length}, {c.num_mel_bins}), got {tuple(input_values.shape)}"
            )
        last = self.layer == c.num_hidden_layers
        out = self.model(input_values=input_values.to(self.dtype), output_hidden_states=not last)
        feats = out.last_hidden_state if last else out.hidden_states[self.layer]
        if self.select == "patch":
            feats = feats[:, self.num_special_tokens :]
        return feats
