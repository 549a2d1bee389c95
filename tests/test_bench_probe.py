"""`compose bench` and `compose probe` on tiny models: valid JSON, consistent numbers, and a
Hugging Face baseline that generates exactly what composer's torch path generates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import images, make_model, run_cli

from composer.analysis.reference import hf_reference, hf_reference_unsupported
from composer.cli import main
from composer.train.data import Collator, read_jsonl

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "specs/tiny/llava.yaml"


def compose(capsys, *args) -> tuple[int, str, str]:
    """Run the CLI in this process (no re-import of torch); -> (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def _row(result: dict, runtime: str, k: str) -> dict:
    (row,) = [r for r in result["results"] if r["runtime"] == runtime and r["k"] == k]
    return row


def _check_numbers(result: dict) -> None:
    """Positive times and speeds, medians inside min-max, ratios equal to the medians' ratios."""
    rows = {(r["runtime"], r["k"]): r for r in result["results"]}
    reps, new = result["settings"]["repeats"], result["settings"]["new_tokens"]
    for (rt, k), r in rows.items():
        for key in ("prefill_s", "decode_tokens_per_s"):
            s = r[key]
            assert len(s["values"]) == reps and all(v > 0 for v in s["values"])
            assert s["min"] <= s["median"] <= s["max"] and s["median"] == pytest.approx(float(np.median(s["values"])))
        assert r["peak_memory_mib"] is None or r["peak_memory_mib"] >= 0
        assert len(r["tokens"][0]) == new
        base, ref = rows[(rt, "0")], rows[("torch", k)]
        p, d = r["prefill_s"]["median"], r["decode_tokens_per_s"]["median"]
        assert r["prefill_ratio_vs_k0"] == pytest.approx(p / base["prefill_s"]["median"], rel=1e-12)
        assert r["decode_ratio_vs_k0"] == pytest.approx(d / base["decode_tokens_per_s"]["median"], rel=1e-12)
        assert r["prefill_ratio_vs_torch"] == pytest.approx(p / ref["prefill_s"]["median"], rel=1e-12)
        assert r["decode_ratio_vs_torch"] == pytest.approx(d / ref["decode_tokens_per_s"]["median"], rel=1e-12)
        assert r["measured_prefill_saving"] == pytest.approx(1 - r["prefill_ratio_vs_k0"], rel=1e-12)
        if k != "0":
            assert r["measured_over_analytic"] == pytest.approx(
                r["measured_prefill_saving"] / r["analytic_prefill_saving"]
            )


def test_bench_torch_and_hf_on_the_tiny_twin(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code, stdout, err = compose(
        capsys,
        "bench",
        TINY,
        "--runtime",
        "torch",
        "--runtime",
        "hf",
        "--new-tokens",
        5,
        "--warmup",
        1,
        "--repeats",
        2,
        "--json",
        out,
    )
    assert code == 0, err
    assert "k/0" in stdout and "measured vs" in stdout
    result = json.loads(out.read_text())
    assert [lay["k"] for lay in result["layouts"]] == ["0", "2"]  # default: the spec's insert_at, vs 0
    assert {(r["runtime"], r["k"]) for r in result["results"]} == {("torch", "0"), ("torch", "2"), ("hf", "0")}
    assert result["skipped"] == {}
    assert result["settings"]["text_tokens"] == 64 and result["settings"]["mm_tokens"] == {"image": 16}
    # the analytic saving is the FLOPs model of docs/architecture.md for 64 text + 16 MM tokens, 4 layers, k = 2,
    # width 64, FFN 128 (gated), 4 query heads and 2 KV heads of 16 (computed here, independently)
    layer = lambda L: 4 * L * 64 * 64 + 4 * L * 64 * 32 + 4 * L * L * 64 + 6 * L * 64 * 128  # noqa: E731
    expected = 1 - (2 * layer(64) + 2 * layer(80)) / (4 * layer(80))
    assert result["analytic_prefill_saving"]["2"] == pytest.approx(expected, rel=1e-12)
    _check_numbers(result)
    # the HF baseline is like-for-like: the same greedy tokens as composer's torch path at k = 0
    hf, torch0 = _row(result, "hf", "0"), _row(result, "torch", "0")
    assert hf["tokens"] == torch0["tokens"] and hf["tokens_match_torch"] is True
    assert _row(result, "torch", "2")["tokens"] != torch0["tokens"]  # k = 2 is a different model (untrained)


@pytest.mark.slow
def test_bench_onnx_runtime(tmp_path, capsys):
    """ONNX Runtime fp32, int8, w8a8 and w8a8 prefill with int8 decode graphs next to torch at k = 0."""
    out = tmp_path / "bench.json"
    code, _, err = compose(
        capsys,
        "bench",
        TINY,
        "--insert-at",
        0,
        "--runtime",
        "onnx",
        "--runtime",
        "torch",
        "--new-tokens",
        4,
        "--warmup",
        1,
        "--repeats",
        2,
        "--text-tokens",
        40,
        "--quantize",
        "int8",
        "--quantize",
        "w8a8",
        "--quantize",
        "w8a8+int8:fused",
        "--json",
        out,
    )
    assert code == 0, err
    result = json.loads(out.read_text())
    assert {(r["runtime"], r["k"]) for r in result["results"]} == {
        ("onnx", "0"),
        ("onnx-int8", "0"),
        ("onnx-w8a8", "0"),
        ("onnx-w8a8+int8:fused", "0"),
        ("torch", "0"),
    }
    assert result["settings"]["text_tokens"] == 40
    _check_numbers(result)
    assert _row(result, "onnx", "0")["tokens_match_torch"] is True
    assert _row(result, "onnx", "0")["token_agreement_vs_torch"] == 1.0
    for scheme in ("int8", "w8a8", "w8a8+int8:fused"):
        assert 0.0 <= _row(result, f"onnx-{scheme}", "0")["token_agreement_vs_torch"] <= 1.0


def test_hf_reference_generates_like_torch_at_k0():
    """Two left-padded prompts, 8 greedy tokens: LlavaForConditionalGeneration on the same tensors
    gives composer's tokens."""
    model = make_model("llama", insert_at=0)
    ref = hf_reference(model)
    assert ref.lm_head.weight.data_ptr() == model.llm.lm_head.weight.data_ptr()  # shared, not copied
    batch = model.prepare(
        [model.format_prompt("What is in the picture?"), model.format_prompt("Hi")], image=list(images(2, seed=1))
    )
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        ours = model.generate(**batch, max_new_tokens=8, eos_token_id=[])
        theirs = ref.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["image"],
            max_new_tokens=8,
            do_sample=False,
            suppress_tokens=model.banned_token_ids,
        )[:, batch["input_ids"].shape[1] :]
    assert torch.equal(ours, theirs)


def test_hf_reference_unsupported_names_the_reason():
    assert "opt" in hf_reference_unsupported(make_model("opt", insert_at=0))
    assert "one image modality" in hf_reference_unsupported(
        make_model("llama", insert_at=0, modalities=("image", "photo"))
    )
    assert hf_reference_unsupported(make_model("qwen2", insert_at=0)) is None


def _probe_data(tmp_path: Path) -> Path:
    from PIL import Image

    colours = {"red": (220, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 230)}
    recs = []
    for i, (name, rgb) in enumerate(colours.items()):
        img = np.zeros((32, 32, 3), np.uint8)
        img[...] = rgb
        img[8:24, 8:24] = 255 - np.array(rgb, np.uint8)
        Image.fromarray(img).save(tmp_path / f"img{i}.png")
        recs.append({"image": f"img{i}.png", "prompt": "What colour is it?", "response": f"It is {name}."})
    recs.append(
        {
            "image": "img0.png",
            "conversations": [
                {"from": "human", "value": "<image>\nDescribe it."},
                {"from": "gpt", "value": "A square on red."},
            ],
        }
    )
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def _direct_alignment(model, examples, layer: int) -> tuple[float, float, float]:
    """Recompute layer ``layer``'s alignment with HF's own forward (output_hidden_states), one record
    at a time: hidden_states[l] is what enters decoder layer l."""
    collate = Collator(model)
    sums = np.zeros(3)
    for ex in examples:
        b = collate([ex])
        ids = b["input_ids"]
        is_mm = ids == model.placeholder_ids["image"]
        with torch.no_grad():
            emb = model.llm.get_input_embeddings()(ids.masked_fill(is_mm, 0))
            emb[is_mm] = model.encode("image", b["image"]).reshape(-1, emb.shape[-1])
            hs = model.llm(inputs_embeds=emb, output_hidden_states=True).hidden_states[layer][0]
        text = ~is_mm[0]
        text[0] = False  # BOS
        a, t = hs[is_mm[0]], hs[text]
        sums[0] += float(F.cosine_similarity(a.mean(0), t.mean(0), dim=0))
        m = (a / a.norm(dim=-1, keepdim=True)) @ (t / t.norm(dim=-1, keepdim=True)).T
        sums[1] += float(m.max())
        sums[2] += float(m.flatten().sort().values[(m.numel() - 1) // 2])  # lower median
    return tuple(sums / len(examples))


def test_probe_on_a_tiny_k0_model(tmp_path, capsys):
    model = make_model("llama", insert_at=0)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    data = _probe_data(tmp_path)
    out = tmp_path / "probe.json"
    code, stdout, err = compose(capsys, "probe", ckpt, "--data", data, "--json", out)
    assert code == 0, err
    assert "recommended k" in stdout
    result = json.loads(out.read_text())
    rows = {r["layer"]: r for r in result["rows"]}
    assert sorted(rows) == [0, 1, 2, 3] and result["records"] == 4
    assert rows[0]["loss_increase"] == 0.0 and rows[0]["eligible"]
    for r in rows.values():
        for key in ("cos_mean_pooled", "pair_max", "pair_median"):
            assert -1.0 <= r[key] <= 1.0
        assert r["pair_median"] <= r["pair_max"]
        assert r["loss_increase"] == pytest.approx(r["loss"] / result["loss_k0"] - 1)
        assert r["eligible"] == (r["loss_increase"] <= 0.05)
    # the default rule: the first layer > 0 whose alignment reaches 90% of the best layer's
    top = max(rows[k]["cos_mean_pooled"] for k in (1, 2, 3))
    plateau = top - 0.1 * abs(top)
    assert result["rule"] == "alignment"
    assert result["recommended_k"] == min(k for k in (1, 2, 3) if rows[k]["cos_mean_pooled"] >= plateau)
    assert result["loss_rule_k"] == max(k for k, r in rows.items() if r["eligible"])
    # the numbers equal a direct recomputation
    examples = read_jsonl(data, {"image": "<image>"})
    direct = _direct_alignment(model, examples, layer=2)
    assert (rows[2]["cos_mean_pooled"], rows[2]["pair_max"], rows[2]["pair_median"]) == pytest.approx(direct, abs=1e-5)
    with torch.no_grad():
        loss0 = model(**Collator(model)(examples)).loss.item()  # one batch of 4 = the probe's batch
    assert result["loss_k0"] == pytest.approx(loss0, rel=1e-5)
    # --layers restricts the probed layers; k = 0 stays as the baseline
    code, _, err = compose(
        capsys, "probe", ckpt, "--data", data, "--layers", "3", "--max-loss-increase", "10", "--json", out
    )
    assert code == 0, err
    result = json.loads(out.read_text())
    assert [r["layer"] for r in result["rows"]] == [0, 3] and result["recommended_k"] == 3
    assert "cos_mean_pooled" not in result["rows"][0] and "cos_mean_pooled" in result["rows"][1]
    # --rule loss: the largest k within --max-loss-increase (0 qualifies: a negative bound is refused)
    code, stdout, err = compose(
        capsys, "probe", ckpt, "--data", data, "--rule", "loss", "--max-loss-increase", "0", "--json", out
    )
    assert code == 0, err
    result = json.loads(out.read_text())
    want = max(r["layer"] for r in result["rows"] if r["loss_increase"] <= 0)
    assert result["rule"] == "loss" and result["recommended_k"] == result["loss_rule_k"] == want
    assert "without retraining is at most 0%" in stdout


def test_bad_input_is_one_line(tmp_path, capsys):
    code, _, err = compose(capsys, "bench", TINY, "--insert-at", 9, "--runtime", "torch")
    assert code == 2 and err.count("\n") == 1 and "--insert-at 9: must be in [0, 4)" in err
    code, _, err = compose(capsys, "bench", TINY, "--new-tokens", 1, "--runtime", "torch")
    assert code == 2 and "--new-tokens" in err
    code, _, err = compose(capsys, "probe", TINY, "--data", tmp_path / "missing.jsonl")
    assert code == 2 and err.count("\n") == 1 and "data file not found" in err
    code, _, err = compose(capsys, "probe", TINY, "--data", _probe_data(tmp_path), "--layers", "0,x")
    assert code == 2 and "--layers" in err
    code, _, err = compose(capsys, "probe", TINY, "--data", _probe_data(tmp_path), "--align-fraction", 0)
    assert code == 2 and err.count("\n") == 1 and "--align-fraction in (0, 1], got 'alignment', 0.0" in err


def test_bench_names_the_cpu_and_the_flags_that_pick_its_kernels(tmp_path):
    """The bench header and JSON name the CPU model, its kernel-relevant flags (AVX2, AVX-512,
    VNNI, AMX) and whether ONNX Runtime's u8 x s8 GEMM saturates there."""
    from composer.analysis.report import cpu_info

    text = "processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu sse avx2 avx512f avx512_vnni avx512_bf16\n"
    info = cpu_info(text)
    assert info["model"] == "AMD EPYC 9R14"
    assert info["flags"] == ["avx2", "avx512f", "avx512_vnni", "avx512_bf16"]
    assert isinstance(info["u8s8_gemm_saturates"], bool)
    out = tmp_path / "b.json"
    r = run_cli(
        "bench", "tiny/llava", "--runtime", "torch", "--repeats", "1", "--warmup", "0", "--text-tokens", "24",
        "--new-tokens", "2", "--json", out,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "CPU: " in r.stdout and json.loads(out.read_text())["cpu"]["model"]


def test_llamacpp_anchor_pairs_are_checked_and_its_prompt_has_the_exact_length(llama_k1_export, capsys):
    """benchmarks/llamacpp_anchor.py (opt-in): a malformed --pair is refused before anything is built
    or downloaded, and the prompt it times composer on has exactly the requested number of tokens."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import llamacpp_anchor
    from PIL import Image

    from composer.export.runtime import OnnxPipeline

    _, bundle = llama_k1_export
    for bad in ("Q9_9=" + str(bundle), "Q8_0=/no/such/bundle", "Q8_0"):
        with pytest.raises(SystemExit) as e:
            llamacpp_anchor.main(["--pair", bad, "--cache", "/no/such/cache"])
        assert e.value.code == 2
        assert "--pair" in capsys.readouterr().err
    pipe = OnnxPipeline(bundle)
    picture = Image.fromarray(np.zeros((32, 32, 3), np.uint8))
    shortest = pipe.prepare([pipe.format_prompt("")], image=[picture])["input_ids"].shape[1]
    for n in (shortest + 1, shortest + 7):
        assert llamacpp_anchor.prompt_of(pipe, n)["input_ids"].shape[1] == n
