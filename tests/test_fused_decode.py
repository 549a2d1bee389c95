"""Decode graphs with fused attention (``composer::gqa`` -> ONNX Runtime's ``GroupQueryAttention``).

Tolerances: every comparison is float32 against float32 doing the same arithmetic in another order
(rotary as halves instead of ``rotate_half``, softmax over the same masked rows, one scatter per
buffer): each value is a sum of at most a few hundred products of O(1) terms, so its rounding is
a few hundred float32 ulps (1.2e-7 each) per layer, over 4 layers: atol 1e-4 bounds it with
margin and still fails on any wrong row, position or head (those move values by O(0.1-1)).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from composer.export.graphs import EarlyText, FusedLayers, LateStage, fused_attention_supported
from tests.helpers import make_model

ATOL = 1e-4
S = 12  # KV buffer rows


def _decode_feeds(model, T: int, seed: int = 0) -> dict:
    """A batch of 2 in the middle of generation: row 0 has buffer rows 0..7 written and writes its
    T new tokens at 8; row 1 was left-padded (rows 0..2 never valid), has 3..5 written, writes at 6;
    rows past each write are garbage. Rotary positions run ahead of the rows (DeepInsert: the media
    tokens count in positions but never enter the early layers' buffers)."""
    g = torch.Generator().manual_seed(seed)
    shape = model.adapter.shape
    write = torch.tensor([8, 6])
    valid = torch.zeros(2, S, dtype=torch.bool)
    valid[0, : 8 + T] = True
    valid[1, 3 : 6 + T] = True
    slots = torch.arange(S).expand(2, S).clone()
    new_slots = write[:, None] + torch.arange(T)
    return {
        "input_ids": torch.randint(3, shape.vocab_size, (2, T), generator=g),
        "position_ids": torch.tensor([[40], [17]]) + torch.arange(T),
        "slots": new_slots,
        "cache_slots": slots,
        "cache_valid": valid,
        "write_index": write,
        "past": [
            torch.randn(2, shape.num_kv_heads, S, shape.head_dim, generator=g) for _ in range(2 * shape.num_layers)
        ],
    }


def _close(got, want, what):
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        err = (a - b).abs().max().item()
        assert err <= ATOL, f"{what}: output {i} differs by {err:.3g} (atol {ATOL})"


@pytest.mark.parametrize("llm", ["llama", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("T", [1, 3])
def test_fused_layers_match_the_hf_layers(llm, T):
    """Early (layers 0-1) and late (layers 2-3, with the head) stages, fused vs HF's layers on the
    same buffers: hidden states / logits and every updated buffer, rows not written left as they were."""
    model = make_model(llm, insert_at=2)
    assert fused_attention_supported(model.adapter) is None
    fused = FusedLayers(model.adapter)
    f = _decode_feeds(model, T)
    args = [f[k] for k in ("input_ids", "position_ids", "slots", "cache_slots", "cache_valid", "write_index")]
    with torch.no_grad():
        early = [EarlyText(model, 2, fused=x) for x in (None, fused)]
        ref, got = (e(*args, [t.clone() for t in f["past"][:4]]) for e in early)
        _close(got, ref, f"{llm} early graph, T={T}")
        hidden = ref[0]
        late_args = [
            hidden,
            f["slots"],
            f["position_ids"],
            hidden.new_zeros(2, 0, hidden.shape[-1]),  # no media tokens in a decode step
            f["slots"].new_zeros(2, 0),
            f["slots"].new_zeros(2, 0),
            f["cache_slots"],
            f["cache_valid"],
            f["write_index"],
            torch.full((2, 1), T - 1),
        ]
        late = [LateStage(model, 2, 4, True, fused=x) for x in (None, fused)]
        ref, got = (m(*late_args, [t.clone() for t in f["past"][4:]]) for m in late)
        _close(got, ref, f"{llm} late graph, T={T}")
    untouched = ~f["cache_valid"].clone()
    for i, t in enumerate(got[1:]):
        assert torch.equal(
            t[untouched[:, None].expand_as(t[..., 0])], f["past"][4 + i][untouched[:, None].expand_as(t[..., 0])]
        )


def test_fused_attention_is_refused_where_it_would_differ(tmp_path):
    from composer.errors import InputError
    from composer.export.exporter import export_onnx

    opt = make_model("opt")
    assert "not llama-style" in fused_attention_supported(opt.adapter)
    with pytest.raises(InputError, match=r"--decode-attention fused: not for this LLM \(opt layers"):
        export_onnx(opt, tmp_path / "b", decode_quantize="int8", decode_attention="fused")
    assert not (tmp_path / "b").exists()
    from composer.builder import build
    from composer.spec import parse_spec
    from tests.helpers import spec_dict

    spec = spec_dict("mistral")
    spec["llm"]["config"]["sliding_window"] = 8
    assert "sliding-window" in fused_attention_supported(build(parse_spec(spec)).adapter)


def _export(module, path, model):
    from composer.export.exporter import _export_llm_graph

    with torch.no_grad():
        _export_llm_graph(module, path, model.adapter.shape, "fp32", 24)
    return path


def _run_in_place(path, feeds: dict, past: list[np.ndarray]):
    """One ONNX Runtime call with each present buffer bound to its past buffer's memory, as the
    runtime's decode steps run: -> the graph's first output, the (updated) buffers."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    binding = sess.io_binding()
    binding.bind_output(sess.get_outputs()[0].name, "cpu")  # bound first: get_outputs()[0] below
    bufs, arrays = [], [a.copy() for a in past]  # the OrtValues are views of these arrays
    for name, arr in zip([n for n in names if n.startswith("past_")], arrays, strict=True):
        buf = ort.OrtValue.ortvalue_from_numpy(arr)
        binding.bind_ortvalue_input(name, buf)
        binding.bind_ortvalue_output(name.replace("past_", "present_"), buf)
        bufs.append(buf)
    for name in names:
        if not name.startswith("past_"):
            binding.bind_cpu_input(name, np.ascontiguousarray(feeds[name]))
    sess.run_with_iobinding(binding)
    return binding.get_outputs()[0].numpy(), arrays


@pytest.mark.parametrize("llm", ["llama", "qwen3"])
def test_fused_graphs_in_onnx_runtime_match_torch_writing_the_buffers_in_place(llm, tmp_path):
    """The exported ``GroupQueryAttention`` graphs (early and late) vs the fused torch layers, one
    decode step with the KV buffers bound in place: the hidden states / logits, the rows written,
    and every other buffer row left as it was."""
    model = make_model(llm, insert_at=2)
    fused = FusedLayers(model.adapter)
    early, late = EarlyText(model, 2, fused=fused), LateStage(model, 2, 4, True, fused=fused)
    f = _decode_feeds(model, 1)
    feeds = {k: v.numpy() for k, v in f.items() if k != "past"}
    hidden_ref, *early_ref = early(*[f[k] for k in list(feeds)], [t.clone() for t in f["past"][:4]])
    hidden, bufs = _run_in_place(
        _export(early, tmp_path / "early.onnx", model), feeds, [t.numpy() for t in f["past"][:4]]
    )
    late_feeds = {
        "hidden": hidden_ref.numpy(),
        "hidden_slots": feeds["slots"],
        "hidden_positions": feeds["position_ids"],
        "mm_tokens": np.zeros((2, 0, hidden_ref.shape[-1]), np.float32),
        "mm_slots": np.zeros((2, 0), np.int64),
        "mm_positions": np.zeros((2, 0), np.int64),
        **{k: feeds[k] for k in ("cache_slots", "cache_valid", "write_index")},
        "logit_rows": np.zeros((2, 1), np.int64),
    }
    logits_ref, *late_ref = late(
        *[torch.from_numpy(v) for v in late_feeds.values()], [t.clone() for t in f["past"][4:]]
    )
    logits, late_bufs = _run_in_place(
        _export(late, tmp_path / "late.onnx", model), late_feeds, [t.numpy() for t in f["past"][4:]]
    )
    _close([torch.from_numpy(hidden), torch.from_numpy(logits)], [hidden_ref, logits_ref], f"{llm} ONNX Runtime")
    for got, want in zip(bufs + late_bufs, early_ref + late_ref, strict=True):  # rows <= the write: as torch
        for b, last in enumerate(f["write_index"].tolist()):
            assert np.abs(got[b, :, : last + 1] - want[b, :, : last + 1].numpy()).max() <= ATOL
    for got, past in zip(bufs + late_bufs, f["past"], strict=True):  # rows after the write: untouched
        for b, last in enumerate(f["write_index"].tolist()):
            assert np.array_equal(got[b, :, last + 1 :], past[b, :, last + 1 :].numpy())
    if llm == "llama":  # q|k|v packed into one MatMul whose output GroupQueryAttention reads itself
        import onnx

        from composer.export.packing import feed_packed_qkv, pack_shared_matmuls

        graph = onnx.load(str(tmp_path / "early.onnx"))
        pack_shared_matmuls(graph)
        assert feed_packed_qkv(graph) == 2
        onnx.save(graph, str(tmp_path / "packed.onnx"))
        packed, packed_bufs = _run_in_place(tmp_path / "packed.onnx", feeds, [t.numpy() for t in f["past"][:4]])
        _close([torch.from_numpy(packed)], [torch.from_numpy(hidden)], "packed q|k|v")
        _close([torch.from_numpy(b) for b in packed_bufs], [torch.from_numpy(b) for b in bufs], "packed q|k|v buffers")


def test_bench_scheme_labels_name_the_decode_attention():
    from composer.export.quantize import BUNDLE_SCHEMES, split_scheme

    assert split_scheme("w8a8") == ("w8a8", None, "plain")
    assert split_scheme("w8a8+int8") == ("w8a8", "int8", "plain")
    assert split_scheme("int8+int8:fused") == ("int8", "int8", "fused")
    assert "int8+int8" not in BUNDLE_SCHEMES and "int8+int8:fused" in BUNDLE_SCHEMES


def test_fp32_bundle_with_fused_decode_graphs_verifies_exactly(tmp_path):
    """--decode-attention fused without --decode-quantize: fp32 decode graphs with one
    GroupQueryAttention per layer, run by every decode step over the KV buffers in place; --verify's
    fp32 check replays each decode-graph call through HF's layers (the bundle's fp32 tolerance) and
    wants torch's greedy tokens exactly."""
    import onnx

    from composer.export.exporter import export_onnx
    from composer.export.runtime import OnnxPipeline
    from composer.export.verify import verify_bundle
    from tests.helpers import images

    model = make_model("llama", insert_at=2)
    b = export_onnx(model, tmp_path / "b", decode_attention="fused")
    pipe = OnnxPipeline(b)
    man = pipe.manifest
    assert man.decode_attention == "fused" and man.decode_quantization is None and man.quantization is None
    for st in man.stages:
        ops = [n.op_type for n in onnx.load(str(b / st.decode_graph), load_external_data=False).graph.node]
        assert ops.count("GroupQueryAttention") == st.end - st.start and "TensorScatter" not in ops
    batch = model.prepare([model.format_prompt("describe it"), model.format_prompt("hi")], image=list(images(2, 5)))
    pipe.recorder = []
    _, state = pipe.prefill(batch["input_ids"], batch["attention_mask"], {"image": batch["image"]}, reserve=3)
    caches = [c for c in state["caches"] if c.names]
    ptr = {(i, n): c.bufs[n].data_ptr() for i, c in enumerate(caches) for n in c.names}
    pipe.recorder = []
    for t in range(3):
        pipe.decode_step(np.full((2, 1), 5 + t), state)
    assert [g for g, _, _ in pipe.recorder] == ["early_text.decode.onnx", "late_multimodal.decode.onnx"] * 3
    assert {(i, n): c.bufs[n].data_ptr() for i, c in enumerate(caches) for n in c.names} == ptr
    report = verify_bundle(model, b)
    assert report["ok"] and report["greedy_match"], report
    assert {"early_text.decode.onnx", "late_multimodal.decode.onnx"} <= set(report["graphs"])
