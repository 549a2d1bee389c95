"""`compose plan`: numbers follow the FLOPs formula of docs/architecture.md, computed independently here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import run_cli

from composer.adapters.llm import LLMShape
from composer.analysis.flops import saving
from composer.analysis.plan import plan, sparkline

ROOT = Path(__file__).resolve().parents[1]


def test_rows_follow_the_formula():
    shape = LLMShape(
        num_layers=4,
        hidden_size=64,
        intermediate_size=128,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        vocab_size=272,
        gated_mlp=True,
    )
    T, M, d, f = 10, 16, 64, 128
    q_width, kv_width = 4 * 16, 2 * 16  # grouped-query attention: 2 KV heads of 16
    rows = plan(shape, T, M, dtype_bytes=4)
    assert [r.k for r in rows] == [0, 1, 2, 3]

    def lf(L, C):  # per layer: Q, O 2·L·d·q_width each; K, V 2·L·d·kv_width each; 4·L·C·q_width; 6·L·d·f (gated)
        return 4 * L * d * q_width + 4 * L * d * kv_width + 4 * L * C * q_width + 6 * L * d * f

    for r in rows:
        k = r.k
        assert r.prefill_flops == k * lf(T, T) + (4 - k) * lf(T + M, T + M)
        assert r.decode_flops == k * lf(1, T + 1) + (4 - k) * lf(1, T + M + 1)
        assert r.kv_bytes == 2 * 2 * 16 * 4 * (k * T + (4 - k) * (T + M))
        assert r.prefill_saving == pytest.approx(1 - r.prefill_flops / rows[0].prefill_flops)
    # the same model as composer.analysis.flops, which `compose build` reports
    assert rows[2].prefill_saving == pytest.approx(saving(shape, T, {"image": M}, {"image": 2}))
    assert rows[0].prefill_saving == 0 and all(
        a.prefill_saving < b.prefill_saving for a, b in zip(rows, rows[1:], strict=False)
    )


def test_sparkline():
    assert sparkline([0.0, 0.5, 1.0]) == " ▄█"


def test_cli_plan_json_and_table(tmp_path):
    def run(*a):
        return run_cli("plan", *a)

    r = run(ROOT / "specs/tiny/llava.yaml", "--json", "--text-tokens", "10")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["mm_tokens"] == 16 and out["num_layers"] == 4 and len(out["rows"]) == 4
    r = run(ROOT / "specs/llava.yaml", "--offline", "--plot", tmp_path / "p.png")
    assert r.returncode == 0, r.stderr
    assert "8 *" in r.stdout  # the spec's insert_at is marked
    assert (tmp_path / "p.png").exists() or "prefill saving by k" in r.stdout
