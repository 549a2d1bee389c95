"""Split ONNX export: ONNX Runtime vs torch logits (1e-4, fp32) for prefill and decode steps,
greedy tokens equal to torch generate() for k = 0, middle, N-1, batch 1 and 2 (left padding),
two modalities at different layers; clear errors for broken bundles."""

from __future__ import annotations

import gc
import json
import shutil
import weakref

import numpy as np
import pytest
import torch
from helpers import images, make_model

from composer.errors import InputError
from composer.export.exporter import export_onnx
from composer.export.runtime import OnnxPipeline
from composer.export.verify import verify_bundle

# ONNX Runtime vs torch, fp32, max abs logit difference: both sides compute the same function in
# other operation orders; fp32 rounds each operation to 2^-24 (6e-8) relative, these tiny random
# models' dot products are <= 128 long (a typical sum's rounding ~sqrt(128) * 6e-8 = 7e-7 of its
# size) and their logits are below 1, so a handful of layers stays near 1e-6, 100x under the bound
TOL = 1e-4
N_NEW = 8

CASES = {
    "llama-k2": ("llama", 2, ("image",)),
    "llama-k0": ("llama", 0, ("image",)),
    "opt-k3": ("opt", 3, ("image",)),  # k = N-1
    "qwen3-two-modalities": ("qwen3", {"image": 1, "image2": 3}, ("image", "image2")),
}


# llama-k2 in the fast tier; the other families' exports (~10 s each on 2 cores) are slow
@pytest.fixture(
    scope="module", params=[pytest.param(c, marks=() if c == "llama-k2" else pytest.mark.slow) for c in CASES]
)
def exported(request, tmp_path_factory):
    family, k, mods = CASES[request.param]
    model = make_model(family, insert_at=k, modalities=mods)
    bundle = export_onnx(model, tmp_path_factory.mktemp(request.param) / "bundle")
    return model, bundle, OnnxPipeline(bundle)


def _batch(model, n: int):
    prompts = [model.format_prompt("tell me a long story about it"), model.format_prompt("hi")][:n]
    items = {m: list(images(n, seed=i + 3)) for i, m in enumerate(model.encoders)}
    return model.prepare(prompts, padding_side="left", **items)


def test_bundle_files_and_manifest(exported):
    model, bundle, pipe = exported
    names = {p.name for p in bundle.iterdir()}
    assert {"manifest.json", "early_text.onnx", "tokenizer", "processors", "spec.yaml"} <= names
    assert all(f"encoder.{m}.onnx" in names for m in model.encoders)
    assert any(n.endswith(".onnx.data") for n in names)
    man = pipe.manifest
    ks = sorted(set(model.insert_at.values()))
    late = [s for s in man.stages if s.graph != "early_text.onnx"]
    assert [s.start for s in late] == ks and late[-1].end == model.num_layers and late[-1].last
    assert man.stages[0].end == ks[0]
    if len(ks) == 1:
        assert "late_multimodal.onnx" in names
    else:
        assert {f"late_multimodal.k{k}.onnx" for k in ks} <= names
    for g, io in man.graphs.items():
        assert io.inputs and io.outputs, g


def test_graph_io_is_declared_once(exported):
    """Each LLM graph in the file has the declared outputs and the declared inputs it uses, in the
    declared order, with the declared dtypes; the manifest records the declaration."""
    import onnx

    from composer.export.graphs import early_io, late_io

    _, bundle, pipe = exported
    type_name = {v: k.lower() for k, v in onnx.TensorProto.DataType.items()}
    for i, st in enumerate(pipe.manifest.stages):
        io = early_io(st.end) if i == 0 else late_io(st.start, st.end, st.last)
        g = onnx.load(str(bundle / st.graph), load_external_data=False).graph
        file_in = [(v.name, type_name[v.type.tensor_type.elem_type]) for v in g.input]
        file_out = [(v.name, type_name[v.type.tensor_type.elem_type]) for v in g.output]
        recorded = pipe.manifest.graphs[st.graph]
        assert [t.name for t in recorded.inputs] == io.input_names
        assert [(t.name, t.dtype) for t in recorded.inputs if t.used] == file_in
        assert [(t.name, t.dtype) for t in recorded.outputs] == file_out
        assert io.output_names == [n for n, _ in file_out]
        with pytest.raises(Exception, match="missing"):
            io.feeds(**{n: None for n in io.input_names[1:]})  # the runtime cannot drop an input


@pytest.mark.parametrize("n", [1, 2])
def test_prefill_and_decode_logits_match_torch(exported, n):
    model, _, pipe = exported
    batch = _batch(model, n)
    mm = {m: batch[m] for m in model.encoders}
    logits, state = pipe.prefill(batch["input_ids"], batch["attention_mask"], mm, all_logits=True)
    with torch.no_grad():
        ref = model(**batch).logits.numpy()
    real = batch["attention_mask"].bool().numpy()
    assert np.abs(logits - ref)[real].max() < TOL
    # decode steps: feed torch's greedy tokens, compare each step's logits to a full recomputation
    ids, am = batch["input_ids"], batch["attention_mask"]
    _, state = pipe.prefill(ids, am, mm)
    for _ in range(3):
        with torch.no_grad():
            full = model(input_ids=ids, attention_mask=am, **mm).logits[:, -1]
        nxt = full.argmax(-1, keepdim=True)
        ids, am = torch.cat([ids, nxt], 1), torch.cat([am, torch.ones_like(nxt)], 1)
        step = pipe.decode_step(nxt.numpy(), state)
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=am, **mm).logits[:, -1].numpy()
        assert np.abs(step - want).max() < TOL


def test_decode_writes_the_kv_buffers_in_place(exported):
    """After a prefill with room reserved, decode steps write one row each into
    the same buffers (same memory, same capacity: nothing copied or reallocated), the rows before
    stay byte for byte, and the logits equal a full torch recomputation. Past the reserve the
    buffers grow once, keeping every row."""
    model, _, pipe = exported
    batch = _batch(model, 2)
    mm = {m: batch[m] for m in model.encoders}
    ids, am = batch["input_ids"], batch["attention_mask"]
    _, state = pipe.prefill(ids, am, mm, reserve=3)
    caches = [c for c in state["caches"] if c.names]
    ptr = {(i, n): c.bufs[n].data_ptr() for i, c in enumerate(caches) for n in c.names}
    cap = [c.capacity for c in caches]
    start = [c.length for c in caches]
    before = [{n: c.bufs[n].numpy()[:, :, : c.length].copy() for n in c.names} for c in caches]
    for step in range(5):  # 3 within the reserve, then growth
        with torch.no_grad():
            nxt = model(input_ids=ids, attention_mask=am, **mm).logits[:, -1].argmax(-1, keepdim=True)
        ids, am = torch.cat([ids, nxt], 1), torch.cat([am, torch.ones_like(nxt)], 1)
        got = pipe.decode_step(nxt.numpy(), state)
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=am, **mm).logits[:, -1].numpy()
        assert np.abs(got - want).max() < TOL
        for i, c in enumerate(caches):
            assert c.length == start[i] + step + 1
            same = all(c.bufs[n].data_ptr() == ptr[i, n] for n in c.names)
            assert same == (step < 3) and (c.capacity == cap[i]) == (step < 3)
            for n in c.names:
                assert np.array_equal(c.bufs[n].numpy()[:, :, : start[i]], before[i][n])
    assert all(c.capacity >= c.length for c in caches)


def test_decode_step_rebinds_only_the_new_feeds(exported, monkeypatch):
    """The KV buffers and cache feeds stay bound across decode steps (updated in place); a step
    binds only the token, its position and slot, and the graph outputs that are new tensors.
    Two generations decoded in turn on one pipeline each get the tokens they get alone, and a
    finished generation's buffers are freed with its state."""
    import onnxruntime as ort

    model, _, pipe = exported
    kv = {n for st in pipe.manifest.stages for n in pipe.inputs[st.graph] if n.startswith("past_")}
    assert kv
    bound: list[str] = []
    for method in ("bind_ortvalue_input", "bind_cpu_input", "bind_ortvalue_output", "bind_output"):
        real = getattr(ort.IOBinding, method)
        monkeypatch.setattr(
            ort.IOBinding,
            method,
            lambda self, name, *a, _real=real, **k: (bound.append(name), _real(self, name, *a, **k))[1],
        )
    batches = [_batch(model, 1), _batch(model, 2)]

    def start(b):
        _, state = pipe.prefill(b["input_ids"], b["attention_mask"], {m: b[m] for m in model.encoders}, reserve=4)
        return state, b["input_ids"][:, -1:].numpy()

    alone = []
    for b in batches:
        state, tok = start(b)
        got = []
        for step in range(4):
            bound.clear()
            tok = pipe.decode_step(tok, state).argmax(-1)[:, None]
            got.append(tok)
            if step > 0:  # the first step binds the buffers the prefill's graphs did not
                assert not kv & set(bound), sorted(kv & set(bound))[:4]
                assert len(bound) <= 10 * len(pipe.manifest.stages), bound
        alone.append(got)
    runs = [start(b) for b in batches]  # in turn: each generation keeps its own bindings
    for step in range(4):
        for (state, tok), want in zip(runs, alone, strict=True):
            tok[:] = pipe.decode_step(tok, state).argmax(-1)[:, None]
            assert np.array_equal(tok, want[step])
    state, tok = start(batches[0])  # the bindings live in the state: nothing else keeps its cache alive
    pipe.decode_step(tok, state)
    held = weakref.ref(next(iter(next(c for c in state["caches"] if c.names).host.values())))
    del state
    gc.collect()
    assert held() is None


@pytest.mark.parametrize("n", [1, 2])
def test_greedy_tokens_equal_torch_generate(exported, n):
    model, _, pipe = exported
    batch = _batch(model, n)
    want = model.generate(**batch, max_new_tokens=N_NEW, eos_token_id=[])
    got = pipe.generate(**batch, max_new_tokens=N_NEW, eos_token_id=[])
    assert torch.equal(want, got)


def test_sampling_equals_torch_with_same_generator(exported):
    model, _, pipe = exported
    batch = _batch(model, 2)
    kw = dict(max_new_tokens=N_NEW, eos_token_id=[], do_sample=True, temperature=0.8, top_k=20)
    want = model.generate(**batch, generator=torch.Generator().manual_seed(3), **kw)
    got = pipe.generate(**batch, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(want, got)


def test_verify_report(exported):
    model, bundle, _ = exported
    report = verify_bundle(model, bundle)
    assert report["ok"] and report["greedy_match"]
    assert set(report["graphs"]) == set(OnnxPipeline(bundle).manifest.graphs)
    assert max(report["graphs"].values()) < TOL and report["prefill_logits"] < TOL


def test_pipeline_prepare_matches_model(exported):
    model, _, pipe = exported
    prompts = [pipe.format_prompt("q")]
    items = {m: [images(1)[0]] for m in model.encoders}
    a, b = model.prepare(prompts, **items), pipe.prepare(prompts, **items)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- broken bundles ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_bundle(llama_k1_export):
    return llama_k1_export[1]


def _copy(src, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(src, dst)
    return dst


def test_missing_graph(small_bundle, tmp_path):
    b = _copy(small_bundle, tmp_path)
    (b / "late_multimodal.onnx").unlink()
    with pytest.raises(InputError, match=r"late_multimodal.onnx: graph file missing"):
        OnnxPipeline(b)


def test_truncated_graph(small_bundle, tmp_path):
    b = _copy(small_bundle, tmp_path)
    g = b / "early_text.onnx"
    g.write_bytes(g.read_bytes()[: g.stat().st_size // 2])
    with pytest.raises(InputError, match=r"early_text.onnx: cannot parse ONNX graph"):
        OnnxPipeline(b)


def test_missing_and_truncated_external_data(small_bundle, tmp_path):
    b = _copy(small_bundle, tmp_path)
    data = b / "late_multimodal.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(
        InputError, match=r"late_multimodal.onnx.data: external data of late_multimodal.onnx is truncated"
    ):
        OnnxPipeline(b)
    data.unlink()
    with pytest.raises(InputError, match=r"late_multimodal.onnx.data: external data of late_multimodal.onnx missing"):
        OnnxPipeline(b)


def test_unknown_format_version_and_not_a_bundle(small_bundle, tmp_path):
    b = _copy(small_bundle, tmp_path)
    man = json.loads((b / "manifest.json").read_text())
    man["format_version"] = 42
    (b / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(InputError, match="unknown format_version 42"):
        OnnxPipeline(b)
    with pytest.raises(InputError, match="not an ONNX bundle"):
        OnnxPipeline(tmp_path)


def test_verify_fails_when_bundle_and_model_differ(small_bundle):
    model = make_model("llama", insert_at=1)  # same seed: the exported weights
    assert verify_bundle(model, small_bundle)["ok"]
    with torch.no_grad():
        model.llm.model.layers[2].mlp.down_proj.weight.add_(0.05)
    report = verify_bundle(model, small_bundle)
    assert not report["ok"] and report["graphs"]["late_multimodal.onnx"] > TOL
    assert report["graphs"]["early_text.onnx"] < TOL  # layer 2 is in the late graph only


def test_path_without_io_binding_equals_torch(exported):
    """Without IO binding every call returns new numpy arrays (no in-place KV writes): same tokens."""
    model, bundle, _ = exported
    pipe = OnnxPipeline(bundle, io_binding=False)
    batch = _batch(model, 2)
    assert torch.equal(
        pipe.generate(**batch, max_new_tokens=N_NEW, eos_token_id=[]),
        model.generate(**batch, max_new_tokens=N_NEW, eos_token_id=[]),
    )


def test_cuda_provider_without_gpu_is_a_clear_error(small_bundle):
    import onnxruntime as ort

    from composer.errors import ComposerError

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("a CUDA build of onnxruntime is installed")
    with pytest.raises(ComposerError, match="onnxruntime-gpu"):
        OnnxPipeline(small_bundle, provider="cuda")


def test_sessions_do_not_spin_between_graphs_and_flush_denormals(llama_k1_export):
    """Each graph has its own intra-op pool; spinning pools would take cores from the graph that
    runs next, so the pipeline turns spinning off unless given other session options. Denormals
    are flushed to zero (masked attention scores underflow through them, ~6x slower softmax), but
    only inside the pipeline's calls: ONNX Runtime leaves the creating thread flushing, which the
    pipeline undoes (found by hypothesis refusing to draw subnormal floats in a later test)."""
    import onnxruntime as ort

    from composer.export.runtime import _flushes_denormals

    small_bundle = llama_k1_export[1]
    model = make_model("llama", insert_at=1)  # the bundle's model (same seed)
    assert not _flushes_denormals()
    pipe = OnnxPipeline(small_bundle)
    assert not _flushes_denormals()
    for key, want in (("session.intra_op.allow_spinning", "0"), ("session.set_denormal_as_zero", "1")):
        assert {s.get_session_options().get_session_config_entry(key) for s in pipe.sessions.values()} == {want}
    pipe.generate(**_batch(model, 2), max_new_tokens=3)
    assert not _flushes_denormals()
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "1")
    spinning = OnnxPipeline(small_bundle, session_options=so)
    assert {
        s.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
        for s in spinning.sessions.values()
    } == {"1"}


@pytest.mark.parametrize("opset", [5, 23, 99])
def test_an_unsupported_opset_is_refused_before_writing(tmp_path, opset):
    """An opset outside the supported range (5, 23: too old; 99: unknown) is one InputError
    naming the range, and nothing is written (not a bundle of another opset, not a traceback)."""
    from composer.errors import InputError

    with pytest.raises(InputError, match=rf"--opset must be in \[24, \d+\] .*got {opset}"):
        export_onnx(make_model("llama", 1), tmp_path / "b", opset=opset)
    assert not (tmp_path / "b").exists() and list(tmp_path.iterdir()) == []


# -- the CLI's --verify --------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_export_fp16_verify_and_a_failing_verify_exits_1(tmp_path, capsys, monkeypatch):
    """`compose export --dtype fp16 --verify` passes within the fp16 tolerance (the fp16 bundle path);
    a verification past tolerance exits 1 and says so, before the bundle is put in place: with
    --overwrite the previous bundle stays byte for byte, and no unverified bundle is left. Why it
    passes on any CPU: --verify's fp16 tolerance, 0.05 at this model's logit scale (< 1), is 100
    fp16 rounding units (2^-11), where ONNX Runtime's fp16 graphs and torch's fp16 model differ by
    6e-4; its greedy check needs the same 4 tokens per prompt, and the smallest gap between the
    top two logits along those steps is 0.009, 15x that difference."""
    from composer.cli import main
    from composer.export import verify

    ckpt = make_model("llama", insert_at=2).save_pretrained(tmp_path / "ckpt")
    with pytest.raises(SystemExit) as e:
        main(["export", str(ckpt), "-o", str(tmp_path / "fp16"), "--dtype", "fp16", "--verify"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "verified: every difference within 0.05" in out
    assert json.loads((tmp_path / "fp16" / "manifest.json").read_text())["dtype"] == "fp16"
    pipe = OnnxPipeline(tmp_path / "fp16")
    assert any(i.type == "tensor(float16)" for i in pipe.sessions["late_multimodal.onnx"].get_inputs())
    monkeypatch.setitem(verify.TOLERANCE, "fp32", 0.0)  # any rounding difference is now a failure
    before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "fp16").rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as e:  # an fp32 bundle over the fp16 one, failing its verification
        main(["export", str(ckpt), "-o", str(tmp_path / "fp16"), "--verify", "--overwrite"])
    captured = capsys.readouterr()
    assert e.value.code == 1 and "verification failed" in captured.err and "left as it was" in captured.err
    after = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "fp16").rglob("*") if p.is_file()}
    assert after == before and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "fp16"]
