"""Reliability: no pickles (torch files only with ``weights_only=True``), no remote code
(configs and tokenizers asking for ``auto_map`` code get the built-in classes or a clear error,
and the code never runs), and a spec that came from the Hub (it lies in the HF cache) may only
name files inside its repo: absolute paths and ``..`` that leave it are refused."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
import yaml
from helpers import CLIP, LLAMA, manifest_data, spec_dict
from safetensors.torch import load_file, save_file

from composer.builder import build
from composer.errors import InputError, SpecError
from composer.spec import load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("composer", "adapters", "export") for p in sorted((ROOT / d).rglob("*.py"))]


def _calls(text: str, name: str) -> list[str]:
    """The argument text of every ``name(...)`` call (balanced parentheses, across lines)."""
    out = []
    for m in re.finditer(re.escape(name) + r"\(", text):
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        out.append(text[m.end() : i - 1])
    return out


def test_sources_never_unpickle_nor_run_remote_code():
    loads = 0
    for path in SOURCES:
        text = path.read_text()
        for args in _calls(text, "torch.load"):
            loads += 1
            assert "weights_only=True" in args, f"{path}: torch.load({args})"
        assert not re.search(r"^\s*(import pickle|from pickle|import dill|import cloudpickle)", text, re.M), path
        assert "pickle.load" not in text and "trust_remote_code=True" not in text, path
        assert not re.search(r"yaml\.(load|unsafe_load|full_load)\(|yaml\.(Full|Unsafe)?Loader\b", text), path
        for args in _calls(text, "from_pretrained"):  # Auto* loaders say it explicitly
            if "trust_remote_code" in args:
                assert "trust_remote_code=False" in args, f"{path}: from_pretrained({args})"
    assert loads >= 3  # projectors, GIN weights, HF .bin shards: all weights_only


# -- remote code ---------------------------------------------------------------------------------------------
EVIL = """
import pathlib
pathlib.Path({marker!r}).write_text("remote code ran")
"""


def _evil_dir(tmp_path: Path, name: str, config: dict, marker: Path) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "evil.py").write_text(EVIL.format(marker=str(marker)))
    (d / "config.json").write_text(json.dumps(config))
    return d


def test_auto_map_in_configs_and_tokenizers_is_ignored_or_refused(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from composer.tokenizer import byte_tokenizer

    marker = tmp_path / "pwned"
    auto_map = {
        "AutoConfig": "evil.EvilConfig",
        "AutoModelForCausalLM": "evil.EvilForCausalLM",
        "AutoModel": "evil.EvilModel",
        "AutoTokenizer": ["evil.EvilTokenizer", None],
    }
    # a known model_type asking for remote code: transformers' own Llama is built, evil.py never runs
    llm_cfg = {k: v for k, v in LLAMA.items() if k != "model_type"}
    llm = _evil_dir(tmp_path, "llm", {**LlamaConfig(**llm_cfg).to_dict(), "auto_map": auto_map}, marker)
    AutoModelForCausalLM.from_config(LlamaConfig(**llm_cfg)).save_pretrained(tmp_path / "weights")
    (tmp_path / "weights" / "model.safetensors").rename(llm / "model.safetensors")
    byte_tokenizer().save_pretrained(llm)
    tok_cfg = json.loads((llm / "tokenizer_config.json").read_text())
    (llm / "tokenizer_config.json").write_text(json.dumps({**tok_cfg, "auto_map": auto_map["AutoTokenizer"]}))
    vit = _evil_dir(tmp_path, "vit", {**CLIP, "auto_map": auto_map}, marker)
    d = spec_dict("llama", 1)
    d["llm"] = {"model": "llm", "attn_implementation": "eager"}
    d["modalities"]["image"]["encoder"] = {"config": CLIP, "feature_layer": -2}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(d))
    model = build(tmp_path / "spec.yaml")
    assert type(model.llm).__name__ == "LlamaForCausalLM" and type(model.tokenizer).__module__.startswith(
        "transformers"
    )
    assert not marker.exists()
    # an unknown model_type that only remote code could build: a clear error, and still no code ran
    _evil_dir(tmp_path, "unknown", {"model_type": "evil_lm", "auto_map": auto_map}, marker)
    d["llm"] = {"model": "unknown", "tokenizer": {"type": "byte"}}
    (tmp_path / "spec2.yaml").write_text(yaml.safe_dump(d))
    with pytest.raises(InputError, match=r"^llm.model: cannot load '.*unknown'") as e:
        build(tmp_path / "spec2.yaml")
    assert "\n" not in str(e.value) and not marker.exists()
    # the encoder's loader is a concrete transformers class: auto_map is never consulted
    d["llm"] = {"config": LLAMA, "attn_implementation": "eager"}
    d["modalities"]["image"]["encoder"] = {"model": str(vit), "feature_layer": -2}
    with pytest.raises(InputError):  # the dir has a config but no weights: a load error, not code
        build(parse_spec(d))
    assert not marker.exists()


# -- specs from the Hub stay inside their repo -----------------------------------------------------------------
COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


def _hub_spec(tmp_path: Path, monkeypatch, weights: str) -> Path:
    """A spec with projector weights in a fake HF cache snapshot laid out as huggingface_hub does
    (files are symlinks into blobs/); returns the snapshot's spec.yaml."""
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    repo = cache / "models--alice--tiny-spec"
    snap, blobs = repo / "snapshots" / COMMIT, repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    d = spec_dict("llama", 1)
    model = build(parse_spec(d))
    save_file({k: v.clone() for k, v in model.projectors["image"].state_dict().items()}, blobs / "b1")
    os.symlink("../../blobs/b1", snap / "proj.safetensors")
    d["modalities"]["image"]["projector"]["weights"] = weights
    (blobs / "b2").write_text(yaml.safe_dump(d))
    os.symlink("../../blobs/b2", snap / "spec.yaml")
    return snap / "spec.yaml"


def test_hub_spec_may_name_files_inside_its_repo(tmp_path, monkeypatch):
    spec_file = _hub_spec(tmp_path, monkeypatch, "proj.safetensors")
    spec = load_spec(spec_file)
    assert spec.source_dir == spec_file.parent  # the snapshot dir, not blobs/ (no symlink resolution)
    model = build(spec)
    want = load_file(spec_file.parent / "proj.safetensors")
    assert all(torch.equal(v, want[k]) for k, v in model.projectors["image"].state_dict().items())


@pytest.mark.parametrize("weights", ["../../../../outside.safetensors", "sub/../../proj.safetensors", "ABSOLUTE"])
def test_hub_spec_paths_that_leave_the_repo_are_refused(tmp_path, monkeypatch, weights):
    outside = tmp_path / "outside.safetensors"
    spec_file = _hub_spec(tmp_path, monkeypatch, str(outside) if weights == "ABSOLUTE" else weights)
    save_file({"x": torch.zeros(1)}, outside)
    value = str(outside) if weights == "ABSOLUTE" else weights
    with pytest.raises(SpecError) as e:
        build(spec_file)
    assert str(e.value) == (
        f"modalities.image.projector.weights: {value!r} points outside the Hub repo the spec came "
        f"from ({spec_file.parent}); a spec from the Hub may only name files inside its repo, or Hub ids"
    )


def test_hub_spec_llm_dir_outside_the_repo_is_refused_and_local_specs_are_trusted(tmp_path, monkeypatch):
    spec_file = _hub_spec(tmp_path, monkeypatch, "proj.safetensors")
    d = yaml.safe_load(spec_file.read_text())
    d["llm"] = {"model": "../../../../llm"}
    hub_copy = spec_file.parent / "other.yaml"
    hub_copy.write_text(yaml.safe_dump(d))
    with pytest.raises(SpecError, match=r"^llm.model: '../../../../llm' points outside the Hub repo"):
        build(hub_copy)
    # the same `..` in a spec of the user's own (outside the HF cache) is resolved against the spec file
    local = tmp_path / "mine" / "spec.yaml"
    local.parent.mkdir()
    d["llm"] = {"model": "../llm-dir"}
    local.write_text(yaml.safe_dump(d))
    with pytest.raises(InputError, match=r"^llm.model: cannot load '"):  # looked up, not refused: no such dir
        build(local)


@pytest.mark.parametrize("part", ["tokenizer", "processors/image"])
def test_a_local_checkpoint_missing_a_part_never_reaches_the_network(tmp_path, monkeypatch, part):
    """With HF_HUB_OFFLINE unset and every socket connect failing loudly, a
    checkpoint without tokenizer/ (or a processor dir) is one error naming the missing dir."""
    import shutil
    import socket

    from helpers import make_model

    from composer.errors import InputError
    from composer.model import ComposedModel

    ckpt = make_model("llama", 1).save_pretrained(tmp_path / "ckpt")
    shutil.rmtree(ckpt / part)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    attempts = []

    def no_network(self, address, *a, **k):
        attempts.append(address)
        raise AssertionError(f"network access to {address}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(InputError, match=rf"{ckpt / part}: missing from the checkpoint"):
        ComposedModel.from_pretrained(ckpt)
    assert attempts == []


def _manifest(tmp_path, **over):
    bundle = tmp_path / "bundle"
    bundle.mkdir(exist_ok=True)
    (bundle / "manifest.json").write_text(json.dumps(manifest_data(**over)))
    return bundle


_stages = manifest_data()["stages"]
_graph = manifest_data()["graphs"]["early_text.onnx"]
_encoder = manifest_data()["encoders"]["image"]


@pytest.mark.parametrize(
    "over,named",
    [
        ({"tokenizer": "../tok"}, "'../tok'"),
        ({"tokenizer": "/etc"}, "'/etc'"),
        (
            {
                "stages": [{**_stages[0], "graph": "../early.onnx"}, _stages[1]],
                "graphs": {"../early.onnx": _graph, "encoder.image.onnx": _graph, "late_multimodal.onnx": _graph},
            },
            "'../early.onnx'",
        ),
        ({"encoders": {"image": {**_encoder, "processor": "../../p"}}}, "'../../p'"),
    ],
)
def test_a_bundle_names_only_its_own_files(tmp_path, over, named):
    """A manifest naming graphs, tokenizer or processors with `..` or absolute paths is refused,
    naming the entry."""
    from composer.errors import InputError
    from composer.export.manifest import read_manifest

    bundle = _manifest(tmp_path, **over)
    with pytest.raises(InputError, match=rf"{bundle / 'manifest.json'}: names {named}: "):
        read_manifest(bundle, check_files=False)


def test_a_symlink_out_of_the_bundle_and_outside_external_data_are_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from composer.errors import InputError
    from composer.export.manifest import check_graph_file, read_manifest

    (tmp_path / "elsewhere").mkdir()
    bundle = _manifest(tmp_path)
    (bundle / "tokenizer").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(InputError, match="'tokenizer': points outside the bundle"):
        read_manifest(bundle, check_files=False)
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"x" * 1000)
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[2], data_location=TensorProto.EXTERNAL)
    for k, v in (("location", "../secret.bin"), ("offset", "0"), ("length", "8")):
        w.external_data.add(key=k, value=v)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["y"])], "g", [], [helper.make_tensor_value_info("y", 1, [2])], [w]
    )
    onnx.save(helper.make_model(graph), str(bundle / "g.onnx"))
    with pytest.raises(InputError, match=r"external data '../secret.bin': points outside the bundle") as e:
        check_graph_file(bundle / "g.onnx")
    assert "1000" not in str(e.value)  # nothing about the outside file leaks


def test_hub_spec_naming_a_file_its_repo_lacks_never_reads_the_cwd(tmp_path, monkeypatch):
    """A Hub spec naming `private/mm_projector.safetensors`, absent from its repo, is refused: the
    file of that name in the user's working directory is never read."""
    spec_file = _hub_spec(tmp_path, monkeypatch, "private/mm_projector.safetensors")
    cwd = tmp_path / "work"
    (cwd / "private").mkdir(parents=True)
    save_file({"x": torch.zeros(1)}, cwd / "private" / "mm_projector.safetensors")
    monkeypatch.chdir(cwd)
    with pytest.raises(SpecError) as e:
        build(spec_file)
    assert str(e.value) == (
        "modalities.image.projector.weights: 'private/mm_projector.safetensors' is not in the Hub repo the spec "
        f"came from ({spec_file.parent}); a spec from the Hub may only name files inside its repo, or Hub ids"
    )


def test_hub_spec_in_a_cache_reached_through_a_symlink_is_still_confined(tmp_path, monkeypatch):
    """With HF_HUB_CACHE reached through a symlink, a Hub spec is still confined to its repo:
    naming /etc/passwd is refused."""
    real = tmp_path / "real"
    real.mkdir()
    spec_file = _hub_spec(real, monkeypatch, "/etc/passwd")
    link = tmp_path / "link"
    link.symlink_to(real)
    via_link = link / spec_file.relative_to(real)  # HF_HUB_CACHE names the real dir; the spec path the link
    with pytest.raises(SpecError, match=r"'/etc/passwd' points outside the Hub repo the spec came from"):
        build(via_link)


def test_a_float_tensor_whose_header_says_int_is_refused(tmp_path):
    """A safetensors header edited from F32 to I32 is refused, naming the tensor and both
    dtypes, instead of loading the bytes as integers (a norm weight of ~1e9)."""
    import json
    import struct

    from helpers import make_model

    from composer.errors import InputError
    from composer.model import ComposedModel

    ckpt = make_model("llama", 1).save_pretrained(tmp_path / "ckpt")
    weights = ckpt / "model.safetensors"
    raw = weights.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    key = "llm.model.norm.weight"
    assert header[key]["dtype"] == "F32"
    header[key]["dtype"] = "I32"  # same width: the byte offsets stay valid
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    weights.write_bytes(raw[:8] + text + raw[8 + n :])
    with pytest.raises(InputError, match=rf"{weights}: {key} is stored as I32, the model holds torch.float32"):
        ComposedModel.from_pretrained(ckpt)


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda m: m["llm"].pop("num_layers"), r"llm.num_layers: missing"),
        (lambda m: m.update(stages=[]), r"stages: must be a list of at least two stages, got 0"),
        (lambda m: m.update(dtype="fp8"), r"dtype: must be 'fp32' or 'fp16', got 'fp8'"),
        (lambda m: m["kv"].update(head_dim="64"), r"kv.head_dim: must be a positive integer, got '64'"),
        (lambda m: m["kv"].update(num_kv_heads=-1), r"kv.num_kv_heads: must be a positive integer, got -1"),
        (lambda m: m["stages"][-1].update(last=1), r"stages\[1\].last: must be true or false, got 1"),
        (lambda m: m["llm"].update(layers=4), r"llm.layers: unknown key"),
    ],
)
def test_a_malformed_manifest_names_the_field(tmp_path, edit, match, llama_k1_export):
    """`llm: {}`, empty `stages`, an unknown dtype: each one error naming the field, not a traceback."""
    import json
    import shutil

    from composer.errors import InputError
    from composer.export.manifest import read_manifest

    bundle = Path(shutil.copytree(llama_k1_export[1], tmp_path / "b"))
    read_manifest(bundle)  # the exported manifest passes
    m = json.loads((bundle / "manifest.json").read_text())
    edit(m)
    (bundle / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(InputError, match=rf"{bundle / 'manifest.json'}: {match}"):
        read_manifest(bundle)


def test_user_text_cannot_inject_special_tokens(tmp_path, capsys):
    """An instruction (or a chat message) with a special-token string is refused:
    `</s>` typed by a user would end the sequence early, `<|im_end|>` would forge another role's turn.
    The modality placeholder is allowed; a fully formatted prompt string is tokenized as written."""
    from helpers import make_model

    from composer.cli import main

    model = make_model("llama", insert_at=1)
    with pytest.raises(InputError, match=r"^instruction: contains the special token '</s>'"):
        model.format_prompt("say </s> and stop")
    assert "<image>" in model.format_prompt("what is in <image>?")
    ids = model.prepare([model.format_prompt("hi") + "</s>"], image=[torch.zeros(3, 32, 32)])["input_ids"]
    assert (ids == model.tokenizer.eos_token_id).sum() == 1  # the caller's own formatted string
    ckpt = model.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(SystemExit) as e:
        main(
            ["generate", str(ckpt), "--prompt", "a <pad> b", "--image", str(ROOT / "specs/tiny/assets/red_circle.png")]
        )
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: instruction: contains the special token '<pad>'")


def test_error_messages_escape_terminal_control_sequences(tmp_path):
    """A file name (or file content) quoted in an error is printed with its control characters
    escaped: an OSC title sequence or a colour code from a data file never reaches the terminal."""
    from helpers import run_cli

    name = tmp_path / "x\x1b]0;pwned\x07\x1b[31m.yaml"
    r = run_cli("inspect", name)
    assert r.returncode == 2 and "\x1b" not in r.stderr and "\x07" not in r.stderr, r.stderr
    assert "x\\x1b]0;pwned\\x07\\x1b[31m.yaml" in r.stderr and r.stderr.count("\n") == 1


def test_a_chat_template_raising_an_empty_message_is_one_clear_error():
    """A chat template that raises with an empty message (``raise_exception('')``) is an InputError
    naming the messages and the exception's type, not an IndexError while formatting the error."""
    from composer.prompting import render_chat

    class Tok:
        chat_template = "{{ raise_exception('') }}"

        def apply_chat_template(self, messages, **kw):
            from jinja2 import TemplateError

            raise TemplateError("")

        def get_vocab(self):
            return {}

        all_special_tokens: list[str] = []

    with pytest.raises(InputError, match=r"^messages: the chat template refused the messages: TemplateError$"):
        render_chat(Tok(), [{"role": "user", "content": "hi"}], {})
