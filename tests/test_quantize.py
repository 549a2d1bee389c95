"""`compose export --quantize int8|int4|w8a8`: the LLM graphs' weight MatMuls become
ONNX Runtime MatMulNBits (block-wise, symmetric), the token embedding int8 in blocks of 32
(GatherBlockQuantized) unless --keep-embedding, the encoders stay fp32, the manifest records the
scheme; `--verify` gates a quantized bundle on top-1 agreement with the fp32 torch model
(`--min-top1`, default 0.95) and optionally the max logit difference (`--atol`). `--quantize w8a8`:
int8 weights x per-token int8 activations (MatMulIntegerToFloat), SmoothQuant + fp32 outlier
channels, calibrated on built-in prompts or a --calibration file.

Accuracy bounds on the tiny random model (``make_model``): its logits are small (|z| < 1) and its
top two tokens often near-tied (median top-two gap 0.03), so top-1 agreement is fragile where the
gap is below the quantization error. A CPU changes a quantized bundle's logits only where an fp32
difference upstream flips an activation to the adjacent int8 level (the integer products are
exact, where the GEMM does not saturate: ``composer.export.quantize.u8s8_gemm_saturates``); the
largest such change seen, ONNX Runtime against the torch emulation of the same w8a8 arithmetic on
an AVX-512 VNNI CPU, was 9.3e-4 (3.6e-7 here). The 95% gates below hold with room for that: on --verify's 372 positions,
w8a8 disagrees at 5 here and int8 at 3 (18 allowed), and only 10 / 9 positions have their two top
quantized logits within 2e-3, the most a change of 1e-3 per logit can reorder.
Max logit differences are held to 0.05, --verify's fp16 tolerance (an 8-bit bundle must be as
close as an fp16 one), 6x the quantization error measured (0.0067 w8a8, 0.0086 int8)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import images, make_model

from composer.errors import InputError
from composer.export.exporter import export_onnx
from composer.export.runtime import OnnxPipeline
from composer.export.verify import verify_bundle

pytestmark = pytest.mark.slow  # quantized exports and their accuracy


def _ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]


def _weight_matmuls(path) -> list:
    from composer.export.quantize import weight_matmuls

    return weight_matmuls(onnx.load(str(path), load_external_data=False))


@pytest.fixture(scope="module")
def model():
    return make_model("llama", insert_at=1)


@pytest.fixture(scope="module")
def int8(model, tmp_path_factory):
    return export_onnx(model, tmp_path_factory.mktemp("q") / "int8", quantize="int8")


def test_int8_bundle_quantizes_every_llm_linear_and_nothing_else(model, int8, llama_k1_export):
    _, fp32 = llama_k1_export  # the same model (same seed), not quantized
    man = json.loads((int8 / "manifest.json").read_text())
    q = man["quantization"]
    assert (q["scheme"], q["bits"], q["block_size"], q["accuracy_level"], q["lm_head"]) == ("int8", 8, 32, 4, "int8")
    n_layers = {"early_text.onnx": 1, "late_multimodal.onnx": model.num_layers - 1}
    for graph, layers in n_layers.items():
        assert _weight_matmuls(int8 / graph) == []  # no fp32 weight MatMul left
        head = graph == "late_multimodal.onnx"
        # per layer q, k, v, o, gate, up, down (+ the LM head); q|k|v and gate|up packed into one each
        assert len(_weight_matmuls(fp32 / graph)) == 7 * layers + head
        want = 4 * layers + head
        assert _ops(int8 / graph).count("MatMulNBits") == want == q["graphs"][graph]["quantized"]
        assert q["graphs"][graph]["packed"] == 3 * layers and _ops(int8 / graph).count("Split") == 2 * layers
    assert "MatMulNBits" not in _ops(int8 / "encoder.image.onnx")
    assert json.loads((fp32 / "manifest.json").read_text())["quantization"] is None


def test_int8_logits_agree_with_fp32_torch(model, int8):
    """Teacher-forced prefill on two prompts with images: top-1 agreement >= 95% of text positions and
    logits within 0.05 of fp32 torch (module docstring: 69 positions, 0 disagree, 3 allowed, and 1
    has its top two quantized logits within 2e-3); greedy decoding runs to the requested length."""
    pipe = OnnxPipeline(int8)
    batch = model.prepare(
        [model.format_prompt("tell me a long story about it"), model.format_prompt("hi")],
        image=list(images(2, seed=3)),
        padding_side="left",
    )
    logits, _ = pipe.prefill(batch["input_ids"], batch["attention_mask"], {"image": batch["image"]}, all_logits=True)
    with torch.no_grad():
        want = model(**batch).logits.numpy()
    text = (batch["attention_mask"].bool() & (batch["input_ids"] != model.placeholder_ids["image"])).numpy()
    assert (logits.argmax(-1) == want.argmax(-1))[text].mean() >= 0.95
    assert np.abs(logits - want)[text].max() < 0.05
    assert pipe.generate(**batch, max_new_tokens=6, eos_token_id=[]).shape == (2, 6)
    report = verify_bundle(model, int8)
    assert report["ok"] and report["top1_agreement"] >= 0.95 and report["positions"] > 100


def test_the_token_embedding_is_int8_in_blocks_of_32(model, int8, llama_k1_export):
    """The early graph looks token ids up in an int8 table (GatherBlockQuantized, one fp32 scale per
    32 weights, stored as uint8 = int8 + 128), whose rows are the fp32 embedding's rounded to
    nearest per block: within half a step (scale / 2) of fp32, and exactly (to fp32 rounding of
    q x scale) what ONNX Runtime returns for them; no (vocab, hidden) fp32 table is left."""
    import onnxruntime as ort
    from onnx import numpy_helper

    from composer.export.quantize import EMBEDDING_BLOCK

    q = json.loads((int8 / "manifest.json").read_text())["quantization"]
    assert (q["embedding"], q["embedding_block_size"]) == ("int8", EMBEDDING_BLOCK) and EMBEDDING_BLOCK == 32
    g = onnx.load(str(int8 / "early_text.onnx")).graph
    (node,) = [n for n in g.node if n.op_type == "GatherBlockQuantized"]
    assert "Gather" not in _ops(int8 / "early_text.onnx") and node.input[1] == "input_ids"
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    vocab, hidden = model.adapter.shape.vocab_size, model.adapter.shape.hidden_size
    assert not any(a.dtype == np.float32 and a.shape == (vocab, hidden) for a in inits.values())
    table, scales = inits[node.input[0]], inits[node.input[2]]
    assert table.dtype == np.uint8 and table.shape == (vocab, hidden) and scales.shape == (vocab, hidden // 32)
    w = model.llm.get_input_embeddings().weight.detach().float().numpy()
    deq = (table.astype(np.float32) - 128).reshape(vocab, -1, 32) * scales[..., None]
    assert np.all(np.abs(deq.reshape(vocab, hidden) - w) <= scales.repeat(32, 1) / 2 * (1 + 1e-6))
    one = onnx.helper.make_model(
        onnx.helper.make_graph(
            [node],
            "lookup",
            [onnx.helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, [None])],
            [onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None)],
            [numpy_helper.from_array(table, node.input[0]), numpy_helper.from_array(scales, node.input[2])],
        ),
        opset_imports=[onnx.helper.make_opsetid("", 21), onnx.helper.make_opsetid("com.microsoft", 1)],
    )
    ids = np.array([0, 1, vocab - 1, 7], np.int64)
    (got,) = ort.InferenceSession(one.SerializeToString()).run(None, {"input_ids": ids})
    np.testing.assert_allclose(got, deq.reshape(vocab, hidden)[ids], rtol=1e-6, atol=0)
    _, fp32 = llama_k1_export  # not quantized: the fp32 table, gathered
    assert "Gather" in _ops(fp32 / "early_text.onnx") and "GatherBlockQuantized" not in _ops(fp32 / "early_text.onnx")


def test_keep_head_leaves_the_lm_head_in_fp32(model, tmp_path):
    """--keep-head keeps the LM head's fp32 MatMul, --keep-embedding the fp32 token embedding."""
    b = export_onnx(model, tmp_path / "b", quantize="int4", keep_head=True, keep_embedding=True, block_size=16)
    q = json.loads((b / "manifest.json").read_text())["quantization"]
    assert (q["lm_head"], q["bits"], q["block_size"]) == ("full precision", 4, 16)
    assert (q["embedding"], q["embedding_block_size"]) == ("full precision", None)
    assert "Gather" in _ops(b / "early_text.onnx") and "GatherBlockQuantized" not in _ops(b / "early_text.onnx")
    left = _weight_matmuls(b / "late_multimodal.onnx")
    assert [n.name for n in left] == q["graphs"]["late_multimodal.onnx"]["kept"] and len(left) == 1
    shapes = {i.name: list(i.dims) for i in onnx.load(str(b / "late_multimodal.onnx")).graph.initializer}
    assert shapes[left[0].input[1]][-1] == model.adapter.shape.vocab_size
    assert _weight_matmuls(b / "early_text.onnx") == []


def test_packing_merges_matmuls_that_share_an_input_and_keeps_their_outputs(tmp_path):
    """Three MatMuls over one input and two over another become one MatMul + Split each; a weight
    another node also reads, a MatMul named in ``exclude`` and a lone MatMul stay as they are; the
    outputs agree with the unpacked graph's to float32 rounding (K = 16 products per output)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from composer.export.packing import pack_shared_matmuls

    rng = np.random.default_rng(0)
    w = {f"w{i}": rng.standard_normal((16, n)).astype(np.float32) for i, n in enumerate((8, 4, 4, 12, 12, 6, 5, 3))}
    mm = lambda x, i, out: helper.make_node("MatMul", [x, f"w{i}"], [out], name=f"mm{i}")  # noqa: E731
    nodes = [
        mm("x", 0, "q"), mm("x", 1, "k"), mm("x", 2, "v"),  # packed: q|k|v
        helper.make_node("Relu", ["x"], ["h"]),
        mm("h", 3, "g"), mm("h", 4, "u"),  # packed: g|u
        mm("h", 5, "e"),  # named in exclude
        mm("y", 6, "s1"), helper.make_node("Identity", ["w6"], ["w6_copy"]),  # w6 read by another node
        mm("y", 7, "s2"),  # alone once s1 is out
    ]  # fmt: skip
    outs = ["q", "k", "v", "g", "u", "e", "s1", "s2", "w6_copy"]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 16]) for n in "xy"],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, None]) for n in outs],
        [numpy_helper.from_array(a, k) for k, a in w.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    feeds = {"x": rng.standard_normal((2, 16)).astype(np.float32), "y": rng.standard_normal((2, 16)).astype(np.float32)}
    run = lambda m: ort.InferenceSession(m.SerializeToString()).run(outs, feeds)  # noqa: E731
    want = run(model)
    assert pack_shared_matmuls(model, exclude=["mm5"]) == 3
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMul") == 2 + 3 and ops.count("Split") == 2  # the packed two + mm5, mm6, mm7
    assert {n.name for n in model.graph.node if n.op_type == "MatMul"} >= {"mm5", "mm6", "mm7"}
    assert not {"w0", "w1", "w2", "w3", "w4"} & {i.name for i in model.graph.initializer}
    for name, a, b in zip(outs, want, run(model), strict=True):
        np.testing.assert_allclose(b, a, rtol=0, atol=16 * np.finfo(np.float32).eps * np.abs(a).max(), err_msg=name)


def test_packed_int8_graphs_compute_what_unpacked_ones_do(model, llama_k1_export, tmp_path):
    """Packing before MatMulNBits quantizes every output column's weights as it was alone (blocks
    run along the input dimension), so the packed int8 bundle's logits equal the unpacked one's up
    to float32 rounding (bound: 1e-5 of the largest logit) and its greedy tokens are the same."""
    import shutil

    from composer.export.quantize import quantize_graph

    _, fp32 = llama_k1_export  # the same model (same seed), not quantized
    logits, tokens = {}, {}
    for pack in (False, True):
        b = shutil.copytree(fp32, tmp_path / f"pack{pack}")
        for graph in ("early_text.onnx", "late_multimodal.onnx"):
            rec = quantize_graph(b / graph, bits=8, block_size=32, accuracy_level=4, pack=pack)
            assert rec["packed"] == (3 * (1 if graph == "early_text.onnx" else model.num_layers - 1) if pack else 0)
        pipe = OnnxPipeline(b)
        batch = model.prepare([model.format_prompt("describe it"), model.format_prompt("hi")], image=list(images(2)))
        ids, mask, img = batch["input_ids"], batch["attention_mask"], {"image": batch["image"]}
        logits[pack] = pipe.prefill(ids, mask, img, all_logits=True)[0]
        tokens[pack] = pipe.generate(**batch, max_new_tokens=8, eos_token_id=[]).tolist()
    scale = np.abs(logits[False]).max()
    np.testing.assert_allclose(logits[True], logits[False], rtol=0, atol=1e-5 * scale)
    assert tokens[True] == tokens[False]


def test_cli_quantized_verify_gates_on_top1_and_atol(model, tmp_path, capsys):
    from composer.cli import main

    ckpt = model.save_pretrained(tmp_path / "ckpt")
    args = ["export", str(ckpt), "--quantize", "int8", "--verify"]
    with pytest.raises(SystemExit) as e:
        main([*args, "-o", str(tmp_path / "ok")])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "top-1 agreement" in out and "verified: top-1 >= 95.0%" in out
    agree, total = map(int, re.search(r"\((\d+) of (\d+)\)", out).groups())
    if agree < total:  # a threshold one position above the agreement this bundle reached: the gate fails
        with pytest.raises(SystemExit) as e:
            main([*args, "-o", str(tmp_path / "strict"), "--min-top1", str((agree + 1) / total)])
        assert e.value.code == 1 and "verification failed" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # a threshold no agreement can reach is refused by name
        main([*args, "-o", str(tmp_path / "strict"), "--min-top1", "1.01"])
    assert e.value.code == 2 and "--min-top1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([*args, "-o", str(tmp_path / "atol"), "--atol", "0"])
    assert e.value.code == 1 and "logit difference <= 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"quantize": "int8", "dtype": "fp16"}, "use it with --dtype fp32"),
        ({"quantize": "int3"}, "--quantize must be one of"),
        ({"quantize": "int4", "block_size": 24}, "--block-size must be a power of two"),
        ({"quantize": "int4", "accuracy_level": 7}, "--accuracy-level must be 0-4"),
        ({"quantize": "int8", "calibration": "data.jsonl"}, "use them with --quantize w8a8"),
        ({"calibration_samples": 4}, "use them with --quantize w8a8"),
        ({"quantize": "w8a8", "calibration": "missing.jsonl"}, "missing.jsonl: data file not found"),
        ({"quantize": "int4", "smooth_alpha": 0.5}, "--smooth-alpha: options of w8a8"),
        ({"quantize": "w8a8", "fp32_channels": -1}, "--fp32-channels must be an integer >= 0"),
        ({"quantize": "w8a8", "smooth_alpha": 1.5}, r"--smooth-alpha must be in \[0, 1\]"),
        ({"quantize": "int8", "reduce_range": True}, "--reduce-range: options of w8a8"),
        ({"quantize": "w8a8", "reduce_range": 1}, "--reduce-range is true or false"),
        ({"quantize": "w8a8", "decode_quantize": "w8a8"}, "--decode-quantize must be one of"),
        (
            {"quantize": "int8", "decode_quantize": "int8", "decode_attention": "plain"},
            "--decode-quantize int8 is --quantize's scheme: with --decode-attention plain",
        ),
        ({"decode_quantize": "int8", "decode_attention": "flash"}, "--decode-attention must be one of"),
        ({"decode_quantize": "int8", "dtype": "fp16"}, "--decode-quantize quantizes fp32 weights"),
    ],
)
def test_bad_quantize_options_are_refused_before_writing(model, tmp_path, kwargs, match):
    with pytest.raises(InputError, match=match):
        export_onnx(model, tmp_path / "b", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_a_manifest_with_an_unknown_quantization_scheme_is_refused(int8, tmp_path):
    import shutil

    b = shutil.copytree(int8, tmp_path / "b")
    man = json.loads((b / "manifest.json").read_text())
    man["quantization"]["scheme"] = "int3"
    (b / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(InputError, match=r"quantization.scheme: must be 'int8' or 'int4' or 'w8a8', got 'int3'"):
        OnnxPipeline(b)


def _xfail_where_the_int8_gemm_saturates() -> None:
    from composer.export.quantize import u8s8_gemm_saturates

    if u8s8_gemm_saturates():
        pytest.xfail(
            "ONNX Runtime's u8 x s8 GEMM on this CPU (no VNNI/AMX) saturates 16-bit pair sums: "
            "the w8a8 graphs do not compute w8a8's arithmetic here (see composer.export.quantize.u8s8_gemm_saturates)"
        )


def _two_matmul_graph(tmp_path, w1, w2):
    """x (B, T, K) -> x @ w1, x @ w2: two weight MatMuls reading one activation, as q/k/v do."""
    from onnx import TensorProto
    from onnx import helper as oh
    from onnx import numpy_helper as nh

    K = w1.shape[0]
    graph = oh.make_graph(
        [
            oh.make_node("MatMul", ["x", "w1"], ["y1"], name="mm1"),
            oh.make_node("MatMul", ["x", "w2"], ["y2"], name="mm2"),
        ],
        "g",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", K])],
        [oh.make_tensor_value_info(y, TensorProto.FLOAT, None) for y in ("y1", "y2")],
        [nh.from_array(w1, "w1"), nh.from_array(w2, "w2")],
    )
    path = tmp_path / "g.onnx"
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)]), str(path), save_as_external_data=True)
    return path


def _emulate_w8a8(x, w, smooth, outl=()):
    """numpy reference of one rewritten MatMul: the input channels ``outl`` in fp32; the rest as
    x / s quantized per row (round half to even, zero point 128) times s * w per column
    (symmetric, +-127): integer product, both scales applied."""
    keep = np.ones(x.shape[-1], bool)
    keep[list(outl)] = False
    xs = (x * np.where(keep, 1 / smooth, 0)).reshape(-1, x.shape[-1]).astype(np.float32)
    a_scale = np.maximum(np.abs(xs).max(1) * np.float32(1 / 127), np.float32(1e-30))
    xq = np.clip(np.round(xs / a_scale[:, None]) + 128, 0, 255)
    ws = w * (smooth * keep)[:, None]
    w_scale = np.abs(ws).max(0) / 127
    wq = np.clip(np.round(ws / w_scale), -127, 127)
    y = ((xq - 128) @ wq) * w_scale * a_scale[:, None] + x.reshape(-1, x.shape[-1])[:, ~keep] @ w[~keep]
    return y.reshape(*x.shape[:-1], w.shape[1])


def test_w8a8_graph_matches_a_numpy_emulation_and_smoothing_tames_an_outlier_channel(tmp_path):
    """The rewrite against an independent numpy emulation of the same arithmetic, within 1e-5 of
    the output range: both sides compute the same integers on every CPU whose int8 GEMM does not
    saturate (the elementwise fp32 steps, Mul by the same float32 constants, ReduceMax, x 1/127,
    QuantizeLinear's division and round-half-to-even, are correctly rounded IEEE operations; the
    integer products are exact), then apply the two scales and add the fp32 share with <= 4 fp32
    roundings each (2^-24 relative) of values below ~2x the output range: <= 16 * 2^-24 = 1e-6
    of it, 10x under the bound (0 measured here). With two input channels 60x / 20x larger than
    the rest, SmoothQuant cuts the error against the fp32 product, and keeping the largest
    channel in fp32 cuts it further, each by more than 0.8x (0.019 unsmoothed, 0.0071 smoothed,
    0.0036 with 1 fp32 channel, of the output range: the errors are fixed by the integers, so the
    same on every such CPU); an all-zero row (padding) gives zeros, not NaN."""
    import onnxruntime as ort

    from composer.export.quantize import _weight_key, quantize_graph_w8a8

    rng = np.random.default_rng(0)
    K, N = 64, 48
    w1, w2 = (rng.standard_normal((K, N)).astype(np.float32) * 0.1 for _ in range(2))
    calib = rng.standard_normal((1, 32, K)).astype(np.float32)
    x = rng.standard_normal((2, 7, K)).astype(np.float32)
    for a in (calib, x):  # the outlier channels
        a[..., 5] *= 60
        a[..., 9] *= 20
    x[1, 3] = 0.0
    act = np.abs(calib).reshape(-1, K).max(0)
    ranges = {_weight_key(w1): act, _weight_key(w2): act}
    errs = {}
    for smoothed, outliers in ((False, 0), (True, 0), (True, 1)):
        where = tmp_path / f"{smoothed}{outliers}"
        where.mkdir()
        path = _two_matmul_graph(where, w1, w2)
        rec = quantize_graph_w8a8(path, ranges=ranges if smoothed else {}, alpha=0.5, fp32_channels=outliers)
        assert rec == {"quantized": 2, "kept": [], "smoothed": 2 * smoothed, "fp32_channels": 2 * outliers}
        ops = _ops(path)
        assert ops.count("MatMulIntegerToFloat") == 2 and ops.count("QuantizeLinear") == 1
        assert ops.count("MatMul") == 2 * bool(outliers)  # the outlier channels' fp32 share
        _xfail_where_the_int8_gemm_saturates()
        y1, y2 = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
        wmax = np.abs(np.stack([w1, w2])).max(2).max(0)
        wmax[[5][:outliers]] = 0
        smooth = (np.maximum(act, 1e-5) ** 0.5 / np.maximum(wmax, 1e-5) ** 0.5).astype(np.float32)
        for got, w in ((y1, w1), (y2, w2)):
            want = _emulate_w8a8(x, w, smooth if smoothed else np.ones(K, np.float32), [5][:outliers])
            assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
            assert np.all(np.isfinite(got)) and np.all(got[1, 3] == 0)
        errs[smoothed, outliers] = max(np.abs(y - x @ w).max() / np.abs(x @ w).max() for y, w in ((y1, w1), (y2, w2)))
    assert errs[True, 0] < 0.8 * errs[False, 0] and errs[True, 1] < 0.8 * errs[True, 0], errs


@pytest.fixture(scope="module")
def w8a8(model, tmp_path_factory):
    return export_onnx(model, tmp_path_factory.mktemp("q") / "w8a8", quantize="w8a8")


def test_w8a8_bundle_rewrites_every_llm_linear_and_passes_verify(model, w8a8):
    """Every weight MatMul of the LLM graphs (7 per layer + the head) becomes MatMulIntegerToFloat,
    each smoothed by the calibration pass, with its 16 largest input channels in fp32; the encoders
    keep fp32; ORT prefill logits within 0.05 of fp32 torch and --verify's top-1 gate passes (bounds:
    module docstring)."""
    q = json.loads((w8a8 / "manifest.json").read_text())["quantization"]
    assert (q["scheme"], q["bits"], q["block_size"]) == ("w8a8", 8, None)
    assert q["smoothing"] == {
        "alpha": 0.5,
        "fp32_channels": 16,
        "calibration": {"data": "built-in prompts", "samples": 8},
    }
    for graph, layers in {"early_text.onnx": 1, "late_multimodal.onnx": model.num_layers - 1}.items():
        want = 7 * layers + (graph == "late_multimodal.onnx")
        assert all(n.name.endswith("/w8a8/outliers") for n in _weight_matmuls(w8a8 / graph))
        assert _ops(w8a8 / graph).count("MatMulIntegerToFloat") == want
        # every input is >= 64 wide: 16 channels of each stay fp32 (one fp32 MatMul per rewritten one)
        assert q["graphs"][graph] == {"quantized": want, "kept": [], "smoothed": want, "fp32_channels": 16 * want}
        assert len(_weight_matmuls(w8a8 / graph)) == want
    assert "MatMulIntegerToFloat" not in _ops(w8a8 / "encoder.image.onnx")
    _xfail_where_the_int8_gemm_saturates()
    report = verify_bundle(model, w8a8)
    assert report["ok"] and report["top1_agreement"] >= 0.95 and report["max_logit_diff"] < 0.05


def test_w8a8_bundle_agrees_with_the_torch_emulation_of_its_arithmetic(model, w8a8):
    """benchmarks/w8a8_emulation.py (where docs/export.md's w8a8 error breakdown comes from) computes
    what the exported graphs compute: over the prefill logits, r = rms(ort - emulated) /
    rms(ort - fp32 torch) < 0.5, the difference under half of the quantization error itself.

    Why the RMS: the same arithmetic differs only where an fp32 difference upstream (ONNX
    Runtime's and torch's fp32 kernels round differently, differently per CPU) moves an
    activation across a rounding boundary onto the adjacent int8 level; that flip and what it
    changes downstream are a full quantization step at a few places. The max over the logits is
    at the mercy of one such flip (0.14 of the max error seen on an AVX-512 VNNI CPU, 5e-5
    here); the RMS is not: flips at a fraction f of the activations weigh ~sqrt(12 f) of the
    error (one step against the half-step rounding error every element carries, variance 1/12
    step^2). Emulated with relative noise at every quantizer input: 1 fp32 ulp gives r = 0.04,
    8 ulps 0.33, 64 ulps 0.49. Why 0.5: r^2 < 1/4 leaves the emulation at least 3/4 of the
    error's energy to account for, which only the same error source can; an emulation with an
    independent error of the same size gives r ~ sqrt(2), and each piece of the scheme counts:
    alpha 0.4 or 0.8 instead of 0.5 give 1.38, 15 / 8 / 0 fp32 channels instead of 16 give
    0.77 / 1.09 / 1.38, fp32 activations 0.67, fp32 weights 1.08; the token embedding's int8 table
    emulated in fp32 gives 0.85, in blocks of 16 or 64 instead of 32 0.81 / 0.83 (0.11 as exported)."""
    import sys
    from pathlib import Path

    from composer.export.examples import PROMPTS, sample_batch
    from composer.export.exporter import merged_for_export
    from composer.export.quantize import CALIBRATION_PROMPTS, EMBEDDING_BLOCK, FP32_CHANNELS, SMOOTH_ALPHA

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import w8a8_emulation as emu

    ref = merged_for_export(model, torch.float32)
    batch = sample_batch(ref, PROMPTS[:3])
    amax = emu.calibrate(ref, CALIBRATION_PROMPTS)
    emulated = emu.emulate(
        ref, batch, amax, alpha=SMOOTH_ALPHA, fp32_channels=FP32_CHANNELS, embedding_block=EMBEDDING_BLOCK
    ).numpy()
    logits, _ = OnnxPipeline(w8a8).prefill(
        batch["input_ids"], batch["attention_mask"], {"image": batch["image"]}, all_logits=True
    )
    with torch.no_grad():
        fp32 = ref(**batch).logits.numpy()
    real = batch["attention_mask"].bool().numpy()
    error = np.sqrt(np.mean((logits - fp32)[real] ** 2))
    assert error > 1e-4  # quantized: the comparison below means something
    _xfail_where_the_int8_gemm_saturates()
    assert np.sqrt(np.mean((logits - emulated)[real] ** 2)) < 0.5 * error


def _calibration_file(tmp_path, lines: list[str]) -> Path:
    from PIL import Image

    for i in range(3):
        rgb = np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(tmp_path / f"img{i}.png")
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _calibration_records(n: int) -> list[str]:
    return [
        json.dumps({"image": f"img{i}.png", "prompt": f"What is in picture {i}?", "response": "A shape."})
        for i in range(n)
    ]


def _inv_smooth(bundle) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    g = onnx.load(str(bundle / "late_multimodal.onnx")).graph
    return {i.name: numpy_helper.to_array(i) for i in g.initializer if i.name.endswith("inv_smooth")}


def test_w8a8_calibrates_on_a_training_format_file_with_its_images(model, w8a8, tmp_path):
    """--calibration: the first N records of a JSONL file (training formats, media relative to the
    file) replace the built-in prompts: the manifest names the file and the count, the smoothing
    factors differ from the built-in calibration's (the file's images and text were used), and
    the bundle passes --verify."""
    data = _calibration_file(tmp_path, _calibration_records(3))
    b = export_onnx(model, tmp_path / "b", quantize="w8a8", calibration=data, calibration_samples=2)
    q = json.loads((b / "manifest.json").read_text())["quantization"]
    assert q["smoothing"]["calibration"] == {"data": "calib.jsonl", "samples": 2}
    mine, builtin = _inv_smooth(b), _inv_smooth(w8a8)
    assert mine.keys() == builtin.keys() and len(mine) == 4 * (model.num_layers - 1) + 1
    assert any(not np.array_equal(mine[k], builtin[k]) for k in mine)
    _xfail_where_the_int8_gemm_saturates()
    report = verify_bundle(model, b)
    assert report["ok"] and report["top1_agreement"] >= 0.95


def test_w8a8_options_reach_the_graphs_and_the_manifest(model, tmp_path):
    """--fp32-channels 0 --smooth-alpha 0.8: SmoothQuant alone, as recorded; no fp32 MatMul left."""
    b = export_onnx(model, tmp_path / "b", quantize="w8a8", fp32_channels=0, smooth_alpha=0.8)
    q = json.loads((b / "manifest.json").read_text())["quantization"]
    assert (q["smoothing"]["alpha"], q["smoothing"]["fp32_channels"]) == (0.8, 0)
    assert all(g["fp32_channels"] == 0 for g in q["graphs"].values())
    assert _weight_matmuls(b / "late_multimodal.onnx") == []


def test_cli_bad_calibration_data_is_one_error_and_no_bundle(model, tmp_path, capsys):
    """A bad record or a missing image in --calibration: exit 2 naming file and line, nothing written."""
    from composer.cli import main

    ckpt = model.save_pretrained(tmp_path / "ckpt")
    bad = _calibration_records(2) + ['{"image": "img9.png", "prompt": "q", "response": "a"}']
    for lines, want in ((bad, "calib.jsonl:3: image file not found"), (["{not json"], "calib.jsonl:1:")):
        data = _calibration_file(tmp_path, lines)
        with pytest.raises(SystemExit) as e:
            main(["export", str(ckpt), "-o", str(tmp_path / "out"), "--quantize", "w8a8", "--calibration", str(data)])
        assert e.value.code == 2 and want in capsys.readouterr().err
        assert not (tmp_path / "out").exists()


def test_a_w8a8_bundle_warns_on_a_cpu_whose_int8_gemm_saturates(w8a8, monkeypatch):
    """Loading a w8a8 bundle where ONNX Runtime's u8 x s8 GEMM saturates (CPUs without VNNI/AMX)
    warns that its answers drift from the verified ones; where it does not, loading is silent."""
    import warnings

    from composer.export import quantize

    monkeypatch.setattr(quantize, "u8s8_gemm_saturates", lambda: True)
    with pytest.warns(RuntimeWarning, match="w8a8 bundle on a CPU without VNNI or AMX"):
        OnnxPipeline(w8a8)
    monkeypatch.setattr(quantize, "u8s8_gemm_saturates", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        OnnxPipeline(w8a8)


def _int8_weights(bundle) -> list[np.ndarray]:
    """The int8 weights of every MatMulIntegerToFloat in the bundle's LLM graphs."""
    from onnx import numpy_helper as nh

    out = []
    for graph in ("early_text.onnx", "late_multimodal.onnx"):
        m = onnx.load(str(bundle / graph))
        inits = {i.name: i for i in m.graph.initializer}
        out += [nh.to_array(inits[n.input[1]]) for n in m.graph.node if n.op_type == "MatMulIntegerToFloat"]
    return out


def _largest_pair_sum(w: np.ndarray) -> int:
    """The largest |a0 w0 + a1 w1| a saturating u8 x s8 kernel (vpmaddubsw: AVX2, AVX-512 without
    VNNI) forms over neighbouring input channels of ``w`` (K, N), activations a in 0..255."""
    w = np.abs(w.astype(np.int64))
    return int(255 * (w[0::2] + w[1::2]).max())


def test_reduce_range_bundle_cannot_saturate_and_passes_verify(model, w8a8, tmp_path, monkeypatch):
    """--reduce-range: every w8a8 weight in -63..63 (per column, the largest at +-63), so every
    pair sum a saturating u8 x s8 GEMM forms fits in 16 bits (<= 2 x 255 x 63 = 32,130 <= 32,767)
    where the full-range bundle's exceed it; the manifest records it, the bundle passes --verify on
    this CPU whatever its GEMM (no xfail), and loading it where the GEMM saturates is silent."""
    import warnings

    from composer.export import quantize

    b = export_onnx(model, tmp_path / "b", quantize="w8a8", reduce_range=True)
    assert json.loads((b / "manifest.json").read_text())["quantization"]["weight_max"] == 63
    reduced, full = _int8_weights(b), _int8_weights(w8a8)
    assert len(reduced) == len(full) == 7 * model.num_layers + 1  # 7 per layer and the head
    assert all(np.abs(w).max() == 63 for w in reduced)
    assert max(_largest_pair_sum(w) for w in reduced) <= 32767 < max(_largest_pair_sum(w) for w in full)
    report = verify_bundle(model, b)
    assert report["ok"] and report["top1_agreement"] >= 0.95
    monkeypatch.setattr(quantize, "u8s8_gemm_saturates", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        OnnxPipeline(b)


@pytest.mark.parametrize("attention", ["plain", "fused"])
def test_decode_graphs_run_the_decode_steps_in_place_and_pass_verify(model, tmp_path, attention):
    """--quantize w8a8 --decode-quantize int8: the prefill runs the w8a8 graphs and every decode step
    the int8 decode graphs (MatMulNBits; copies, or with --decode-attention fused one
    GroupQueryAttention per layer), which write the same KV buffers in place (same memory, nothing
    reallocated within the reserve); --verify gates both: prefill top-1 and, feeding each prompt's
    text after its image one decode step at a time, the decode graphs' top-1 (bounds: module
    docstring)."""
    b = export_onnx(model, tmp_path / "mixed", quantize="w8a8", decode_quantize="int8", decode_attention=attention)
    pipe = OnnxPipeline(b)
    man = pipe.manifest
    assert man.quantization.scheme == "w8a8" and man.decode_quantization.scheme == "int8"
    for st in man.stages:
        layers = st.end - st.start
        want = 7 * layers + st.last
        assert st.decode_graph == st.graph.replace(".onnx", ".decode.onnx")
        assert _ops(b / st.graph).count("MatMulIntegerToFloat") == want
        packed = 4 * layers + st.last  # q|k|v and gate|up packed before MatMulNBits
        assert _ops(b / st.decode_graph).count("MatMulNBits") == packed and not _weight_matmuls(b / st.decode_graph)
        ops = _ops(b / st.decode_graph)
        if attention == "fused":  # one GroupQueryAttention per layer, no TensorScatter/Attention left
            assert ops.count("GroupQueryAttention") == layers and "TensorScatter" not in ops and "Attention" not in ops
            # ... reading the packed q|k|v MatMul's output itself: the only Split left is gate|up's
            graph = onnx.load(str(b / st.decode_graph), load_external_data=False).graph
            gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
            producer = {o: n.op_type for n in graph.node for o in n.output}
            assert all(producer[n.input[0]] == "MatMulNBits" and list(n.input[1:3]) == ["", ""] for n in gqa)
            assert ops.count("Split") == layers
        else:
            assert ops.count("TensorScatter") == 2 * layers and "GroupQueryAttention" not in ops
        assert man.graphs[st.decode_graph] == man.graphs[st.graph]
    batch = model.prepare([model.format_prompt("describe it"), model.format_prompt("hi")], image=list(images(2, 5)))
    mm = {"image": batch["image"]}
    pipe.recorder = []
    _, state = pipe.prefill(batch["input_ids"], batch["attention_mask"], mm, reserve=3)
    prefill_graphs = [g for g, _, _ in pipe.recorder]
    caches = [c for c in state["caches"] if c.names]
    ptr = {(i, n): c.bufs[n].data_ptr() for i, c in enumerate(caches) for n in c.names}
    pipe.recorder = []
    for t in range(3):
        pipe.decode_step(np.full((2, 1), 5 + t), state)
    assert prefill_graphs == ["encoder.image.onnx", "early_text.onnx", "late_multimodal.onnx"]
    assert [g for g, _, _ in pipe.recorder] == ["early_text.decode.onnx", "late_multimodal.decode.onnx"] * 3
    assert {(i, n): c.bufs[n].data_ptr() for i, c in enumerate(caches) for n in c.names} == ptr
    _xfail_where_the_int8_gemm_saturates()
    report = verify_bundle(model, b)
    # the decode steps cover each prompt's text after its image: all but the prefill's last position
    ids = _verify_rows(model)
    after_image = sum(len(r) - 1 - int(np.flatnonzero(r == model.placeholder_ids["image"])[-1]) - 1 for r in ids)
    assert report["decode_quantization"] == "int8" and report["decode_positions"] == after_image > 50
    assert report["ok"] and report["decode_top1_agreement"] >= 0.95 and report["decode_mean_kl"] < 1e-3
    from rich.console import Console

    from composer.cli.export import _print_bundle, _print_quantized_report

    con = Console(record=True, width=300, markup=False)
    _print_quantized_report(con, report)
    _print_bundle(con, b, True)
    text = con.export_text()
    assert "decode graphs (int8), the prompts' text after their media fed one step at a time: top-1 agreement" in text
    assert "(decode steps: late_multimodal.decode.onnx)" in text


def _verify_rows(model) -> list[np.ndarray]:
    """--verify's prompts for ``model``: each row's real token ids."""
    from composer.export.examples import PROMPTS, sample_batch

    batch = sample_batch(model, PROMPTS)
    mask = batch["attention_mask"].bool().numpy()
    return [batch["input_ids"].numpy()[b, mask[b]] for b in range(len(mask))]
