"""ONNX Runtime's thread pools side by side on one bundle: decode tokens/s and prefill time with

- ``session``: one intra-op pool per graph, spinning off (what ``OnnxPipeline`` does by default);
- ``session-spin``: one pool per graph, its threads spinning (ONNX Runtime's own default);
- ``session-spin-stop``: one pool per graph, spinning while its graph runs and stopping when the run
  returns (``session.force_spinning_stop``), so an idle pool does not take cores from the next graph;
- ``global``: one pool for every graph of the process (``onnxruntime.set_global_thread_pool_sizes``
  before the first session, then ``use_per_session_threads = False`` for every session), whose
  threads spin between kernels, as llama.cpp's do.

A decode step runs ~1,500 small kernels over two graphs (docs/performance.md); with spinning off
every parallel kernel wakes the pool's sleeping threads. Each mode runs in its own process (the
global pool is set once per process), the modes round-robin per round, so a change in the
machine's load hits every mode alike.

    python benchmarks/ort_threads.py out/b576-int8.onnx --threads 2 --rounds 5

(``compose build benchmarks/smol_llava_576.yaml -o out/b576 && compose export out/b576 -o
out/b576-int8.onnx --quantize int8``: SmolLM2 at k = 15, 576 image tokens.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("session", "session-spin", "session-spin-stop", "global")


def child(bundle: Path, mode: str, threads: int, text_words: int, new_tokens: int, runs: int) -> dict:
    import numpy as np
    from PIL import Image

    from composer.analysis.bench import TokenClock
    from composer.export.runtime import OnnxPipeline, default_session_options

    if mode == "global":  # before any session: the process's environment is created with the pools
        import onnxruntime as ort

        ort.set_global_thread_pool_sizes(threads, 1)
        so = default_session_options()
        so.use_per_session_threads = False
    else:
        so = default_session_options(mode != "session", threads)
        if mode == "session-spin-stop":
            so.add_session_config_entry("session.force_spinning_stop", "1")
    pipe = OnnxPipeline(bundle, session_options=so)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (336, 336, 3), dtype=np.uint8))
    batch = pipe.prepare([pipe.format_prompt("the " * text_words)], image=[image])

    out = {"prefill_s": [], "decode_tps": [], "prompt_tokens": int(batch["input_ids"].shape[1])}
    for i in range(runs + 1):  # the first: warm-up
        clock = TokenClock(skip_prompt=False)  # compose bench's: a timestamp per new token
        t0 = time.perf_counter()
        ids = pipe.generate(**batch, max_new_tokens=new_tokens, eos_token_id=[], streamer=clock)
        t = clock.times
        if i:
            out["prefill_s"].append(t[0] - t0)
            out["decode_tps"].append((len(t) - 1) / (t[-1] - t[0]))
        out["tokens"] = [int(x) for x in np.asarray(ids)[0]]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path, nargs="+", help="one or more bundles (each mode runs on each)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5, help="processes per mode, round-robin")
    ap.add_argument("--runs", type=int, default=2, help="timed generate calls per process (after one warm-up)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--text-words", type=int, default=32, help="words of filler text (32: 64 text tokens, 640 in all)")
    ap.add_argument("--mode", choices=MODES, action="append", help=f"default: all of {MODES}")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    if a.child:
        (bundle,) = a.bundle
        print(json.dumps(child(bundle, a.child, a.threads, a.text_words, a.new_tokens, a.runs)))
        return 0
    runs = [(b, m) for b in a.bundle for m in (a.mode or MODES)]
    got = {r: {"prefill_s": [], "decode_tps": []} for r in runs}
    tokens = {}
    for i in range(a.rounds):
        for b, m in runs:
            cmd = [sys.executable, __file__, str(b), "--child", m, "--threads", str(a.threads)]
            cmd += ["--runs", str(a.runs), "--new-tokens", str(a.new_tokens), "--text-words", str(a.text_words)]
            res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            got[b, m]["prefill_s"] += res["prefill_s"]
            got[b, m]["decode_tps"] += res["decode_tps"]
            tokens[b, m] = res["tokens"]
            pre, dec = (", ".join(f"{x:.{n}f}" for x in res[k]) for k, n in (("prefill_s", 3), ("decode_tps", 1)))
            print(
                f"round {i + 1}/{a.rounds} {b} {m}: prefill {pre} s, decode {dec} tok/s, {res['prompt_tokens']} tokens",
                file=sys.stderr,
                flush=True,
            )
    base = runs[0]
    b0 = statistics.median(got[base]["decode_tps"])
    print(f"{a.threads} threads, {a.new_tokens} new tokens; medians of {a.rounds} x {a.runs} runs")
    ref = f"{base[0].name} {base[1]}"
    print(f"| bundle | mode | prefill s (min-max) | decode tok/s (min-max) | decode vs {ref} | same tokens |")
    print("|---|---|---|---|---|---|")
    for r in runs:
        p, d = got[r]["prefill_s"], got[r]["decode_tps"]
        print(
            f"| {r[0].name} | {r[1]} | {statistics.median(p):.3f} ({min(p):.3f}-{max(p):.3f}) | "
            f"{statistics.median(d):.1f} ({min(d):.1f}-{max(d):.1f}) | {statistics.median(d) / b0:.2f} | "
            f"{tokens[r] == tokens[base]} |"
        )
    if a.json:
        out = [{"bundle": str(b), "mode": m, **got[b, m]} for b, m in runs]
        a.json.write_text(json.dumps({"threads": a.threads, "new_tokens": a.new_tokens, "runs": out}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
