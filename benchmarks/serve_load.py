"""Load on `compose serve`: requests/s, time to first token and end-to-end latency
at several client concurrencies, with dynamic batching on and off, measured side by side in one run.

For each ``--max-batch`` value (1 = batching off) a `compose serve BUNDLE` process starts on a free
127.0.0.1 port; for each ``--concurrency`` C, C clients (threads with the `openai` client) each send
``--requests`` streaming chat requests one after another (a picture as a data: URL and one of the
demo's questions, greedy, ``--max-tokens``). Per request: time to the first content chunk (TTFT)
and to the end of the stream; per cell: completed requests / wall time, p50 and p95 of both, and
the generated tokens/s. ``--workload shapes`` asks the demo's picture questions (one-word answers:
prefill-bound), ``chat`` text-only prompts answered at length (decode-bound). Every answer is
checked against the same request's answer at concurrency 1
without batching (an answer that differs is counted and printed).

    python benchmarks/serve_load.py out/smol-demo.onnx --max-batch 1 --max-batch 8 --concurrency 1 4 16
    python benchmarks/serve_load.py out/smol-demo.onnx --workload chat --max-tokens 32
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    ("red_circle.png", "What shape is it?"),
    ("red_circle.png", "What colour is it?"),
    ("two_shapes.png", "How many shapes are there?"),
    ("two_shapes.png", "What colour is the square?"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(bundle: str, max_batch: int, wait_ms: float, threads: int | None, log: Path):
    port = free_port()
    cmd = [sys.executable, "-m", "composer.cli", "serve", bundle, "--port", str(port), "--max-batch", str(max_batch)]
    cmd += ["--batch-wait-ms", str(wait_ms), "--log-level", "warning", "--max-queue", "256"]
    if threads:
        cmd += ["--threads", str(threads)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start: {log.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                name = json.loads(urllib.request.urlopen(url + "/v1/models", timeout=2).read())["data"][0]["id"]
                break
            time.sleep(0.3)
        yield url, name
    finally:
        proc.terminate()
        proc.wait(120)


CHAT = [  # text-only prompts with long answers: decode-bound requests
    "Write a short poem about the sea.",
    "Explain what a CPU does.",
    "Give three tips for learning to cook.",
    "Describe a sunny day in a park.",
]


def messages(i: int, workload: str) -> list[dict]:
    if workload == "chat":
        return [{"role": "user", "content": CHAT[i % len(CHAT)]}]
    picture, question = QUESTIONS[i % len(QUESTIONS)]
    raw = (ROOT / "specs/smol/assets" / picture).read_bytes()
    url = "data:image/png;base64," + base64.b64encode(raw).decode()
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}],
        }
    ]


def one(client, name: str, i: int, max_tokens: int, workload: str) -> dict:
    t0 = time.perf_counter()
    first, text, tokens = None, "", 0
    stream = client.chat.completions.create(
        model=name,
        messages=messages(i, workload),
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for ch in stream:
        if ch.usage is not None:
            tokens = ch.usage.completion_tokens
        if ch.choices and ch.choices[0].delta.content:
            first = first or time.perf_counter()
            text += ch.choices[0].delta.content
    end = time.perf_counter()
    return {"i": i, "ttft": (first or end) - t0, "e2e": end - t0, "text": text, "tokens": tokens}


def load(url: str, name: str, concurrency: int, requests: int, max_tokens: int, workload: str):
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    one(client, name, 0, max_tokens, workload)  # warm-up: first-call allocations
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        futures = [ex.submit(one, client, name, i, max_tokens, workload) for i in range(concurrency * requests)]
        results = [f.result() for f in futures]
    return results, time.perf_counter() - t0


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--max-batch", type=int, action="append", default=None, help="1 = batching off (repeatable)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument(
        "--workload",
        choices=["shapes", "chat"],
        default="shapes",
        help="shapes: the demo's picture questions (one-word answers, prefill-bound); chat: text-only prompts "
        "answered at length (decode-bound)",
    )
    ap.add_argument("--batch-wait-ms", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads per graph")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    rows, answers = [], {}
    log = Path(os.environ.get("TMPDIR", "/tmp")) / "serve_load.log"
    for mb in args.max_batch or [1, 8]:
        with server(args.bundle, mb, args.batch_wait_ms, args.threads, log) as (url, name):
            for c in args.concurrency:
                results, wall = load(url, name, c, args.requests, args.max_tokens, args.workload)
                differ = 0
                for r in results:
                    key = r["i"] % 4
                    answers.setdefault(key, r["text"])
                    differ += r["text"] != answers[key]
                row = {
                    "max_batch": mb,
                    "concurrency": c,
                    "requests": len(results),
                    "req_per_s": len(results) / wall,
                    "tok_per_s": sum(r["tokens"] for r in results) / wall,
                    "ttft_p50": statistics.median(r["ttft"] for r in results),
                    "ttft_p95": pct([r["ttft"] for r in results], 0.95),
                    "e2e_p50": statistics.median(r["e2e"] for r in results),
                    "e2e_p95": pct([r["e2e"] for r in results], 0.95),
                    "answers_differ": differ,
                }
                rows.append(row)
                print(
                    f"max_batch {mb:>2}  clients {c:>2}: {row['req_per_s']:6.2f} req/s {row['tok_per_s']:7.1f} tok/s  "
                    f"TTFT p50 {row['ttft_p50'] * 1000:7.0f} ms p95 {row['ttft_p95'] * 1000:7.0f} ms  "
                    f"e2e p50 {row['e2e_p50'] * 1000:7.0f} ms p95 {row['e2e_p95'] * 1000:7.0f} ms  "
                    f"differ {differ}",
                    flush=True,
                )
    print("answers:", dict(sorted(answers.items())))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "cpus": os.cpu_count(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
