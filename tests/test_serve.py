"""`compose serve`: the OpenAI-compatible server, driven by the real `openai` client on
127.0.0.1. The tiny LLaVA twin's bundle (random weights, byte tokenizer) keeps it fast; the
trained SmolLM2 demo's bundle is served in test_real_llm.py."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, client, data_url, run_cli, serving

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from composer.export.runtime import OnnxPipeline  # noqa: E402
from composer.serve import Limits  # noqa: E402
from composer.serve.protocol import TextStream  # noqa: E402

NAME = "tiny-test"  # helpers.spec_dict's name: the model id clients send
ASSETS = ROOT / "specs/tiny/assets"


def image_message(text: str, picture: str | Path = "red_circle.png") -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url(ASSETS / picture)}},
                {"type": "text", "text": text},
            ],
        }
    ]


def post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/v1/chat/completions", data=body, headers=headers or {}, method="POST")
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class Slow:
    """A runtime whose every decode step takes ``delay`` seconds more and never stops at EOS: a
    long generation whose length the test controls."""

    eos_token_ids: list[int] = []

    def __init__(self, runtime, delay: float):
        self.runtime, self.delay = runtime, delay
        self.steps = 0  # decode steps run so far (each one step of the whole batch)

    def __getattr__(self, name):
        return getattr(self.runtime, name)

    def decoder(self, *args, **kwargs):
        step = self.runtime.decoder(*args, **kwargs)

        def slow(out):
            self.steps += 1
            time.sleep(self.delay)
            return step(out)

        return slow


@pytest.fixture(scope="module")
def pipe(llama_k1_export):
    return OnnxPipeline(llama_k1_export[1])


def reference(pipe, text: str, picture: str, **gen) -> str:
    """The bundle's own answer through OnnxPipeline (what `compose generate` runs)."""
    batch = pipe.prepare([pipe.format_prompt(text)], image=[str(ASSETS / picture)])
    return pipe.decode(pipe.generate(**batch, **gen))[0]


# -- the protocol -------------------------------------------------------------------------------------
def test_greedy_answer_streamed_and_not_equals_the_bundles_own(pipe, llama_k1_export):
    """Non-streaming and streaming (server-sent events) give the text OnnxPipeline.generate gives the
    same prompt and image (greedy, temperature 0), `compose generate` prints it too; usage counts the
    prompt's tokens (its 16 image slots included) and the new tokens; /v1/models and /health answer."""
    want = reference(pipe, "What shape is it?", "red_circle.png", max_new_tokens=12)
    with serving(pipe) as (url, _):
        c = client(url)
        assert [m.id for m in c.models.list().data] == [NAME]
        r = c.chat.completions.create(
            model=NAME, messages=image_message("What shape is it?"), max_tokens=12, temperature=0
        )
        chunks = list(
            c.chat.completions.create(
                model=NAME,
                messages=image_message("What shape is it?"),
                max_tokens=12,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        health = json.loads(urllib.request.urlopen(url + "/health", timeout=10).read())
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    batch = pipe.prepare([pipe.format_prompt("What shape is it?")], image=[str(ASSETS / "red_circle.png")])
    assert r.usage.prompt_tokens == int(batch["attention_mask"].sum()) and r.usage.completion_tokens <= 12
    assert r.choices[0].finish_reason == ("length" if r.usage.completion_tokens == 12 else "stop")
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == want
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens and not chunks[-1].choices
    assert health["status"] == "ok" and health["model"] == NAME
    cli = run_cli(
        "generate", llama_k1_export[1], "--image", ASSETS / "red_circle.png", "--prompt", "What shape is it?",
        "--max-new-tokens", "12",
    )  # fmt: skip
    assert cli.returncode == 0 and cli.stdout.strip() == want.strip()


def test_stop_strings_end_the_text_before_them():
    """OpenAI's `stop`: the text ends before the first stop string, which is never streamed, even
    when its first characters arrive in an earlier token; incomplete UTF-8 waits for its rest."""

    class Chars:  # token id = one byte
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    def run(text: bytes, stops):
        s = TextStream(Chars(), stops)
        pieces = [s.push(b) for b in text]
        return pieces, s.finish(), s.stopped

    pieces, rest, stopped = run(b"Hello. END more", ["END"])
    assert "".join(pieces) + rest == "Hello. " and stopped
    assert all("E" not in p for p in pieces)
    pieces, rest, stopped = run(b"an EN", ["END"])  # a prefix at the end is text after all
    assert "".join(pieces) + rest == "an EN" and not stopped and pieces[-1] == ""
    pieces, _, _ = run("é!".encode(), [])
    assert pieces == ["", "é", "!"]


def test_sampling_settings_and_seed(pipe):
    """temperature > 0 samples with the request's seed: the same seed gives the same text, another
    seed (almost surely) another; top_p/top_k are taken; temperature 0 is greedy."""
    msgs = image_message("Say something.")
    with serving(pipe) as (url, _):
        c = client(url)

        def ask(**kw):
            return c.chat.completions.create(model=NAME, messages=msgs, max_tokens=16, **kw).choices[0].message.content

        a, b = ask(temperature=1.5, seed=1), ask(temperature=1.5, seed=1)
        others = {ask(temperature=1.5, seed=s) for s in range(2, 6)}
        greedy = ask(temperature=0)
        top1 = ask(temperature=1.0, seed=3, extra_body={"top_k": 1})
    assert a == b and others - {a}
    assert top1 == greedy == reference(pipe, "Say something.", "red_circle.png", max_new_tokens=16)


# -- batching -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_16_concurrent_clients_get_their_sequential_answers(pipe):
    """16 clients x 3 requests at once (different prompt lengths, pictures, lengths, greedy and
    seeded sampling, stop strings, a repetition penalty that sees only the row's own tokens, not
    the batch's left padding): zero errors, every answer equal to the same request sent alone
    (batch of one), and the server did batch them."""
    pictures = [
        ASSETS / "red_circle.png",
        ROOT / "specs/smol/assets/red_circle.png",
        ROOT / "specs/smol/assets/two_shapes.png",
    ]
    jobs = []
    for i in range(48):
        kw: dict = {"max_tokens": 4 + i % 9}
        kw.update({"temperature": 0} if i % 3 else {"temperature": 1.2, "seed": i})
        if i % 5 == 0:
            kw["stop"] = ["a", "e"]
        if i % 4 == 1:
            kw["extra_body"] = {"repetition_penalty": 1.3}
        jobs.append((image_message("Q" * (1 + i % 7) + " what is it?", pictures[i % 3]), kw))
    with serving(pipe, max_batch=8, batch_wait_s=0.05) as (url, app):
        c = client(url, timeout=120)

        def ask(job):
            msgs, kw = job
            r = c.chat.completions.create(model=NAME, messages=msgs, **kw)
            return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens

        alone = [ask(j) for j in jobs]
        batches_before = app.state.batcher.batches
        with ThreadPoolExecutor(16) as ex:
            together = list(ex.map(ask, jobs))
        batches = app.state.batcher.batches - batches_before
    assert together == alone
    assert batches < len(jobs) / 2, f"{batches} batches for {len(jobs)} concurrent requests"


def test_a_failing_request_fails_alone(pipe):
    """A batch whose generation raises is retried one request at a time: only the request that
    breaks the model gets a 500 error; its neighbours in the batch get their answers."""

    bang = pipe.tokenizer("!", add_special_tokens=False)["input_ids"][-1]

    class Fragile:
        def __init__(self, runtime):
            self.runtime = runtime

        def __getattr__(self, name):
            return getattr(self.runtime, name)

        def decoder(self, ids, mask, media, **kw):
            if bool((ids == bang).any()):
                raise RuntimeError("boom")
            return self.runtime.decoder(ids, mask, media, **kw)

    with serving(Fragile(pipe), max_batch=4, batch_wait_s=0.2) as (url, _):
        c = client(url)

        def ask(text):
            try:
                return c.chat.completions.create(model=NAME, messages=image_message(text), max_tokens=4, temperature=0)
            except openai.InternalServerError as e:
                return e

        with ThreadPoolExecutor(4) as ex:
            out = list(ex.map(ask, ["fine?", "boom!", "fine too?", "also fine?"]))
    assert isinstance(out[1], openai.InternalServerError) and "boom" in str(out[1])
    for o, text in [(out[0], "fine?"), (out[2], "fine too?"), (out[3], "also fine?")]:
        assert o.choices[0].message.content == reference(pipe, text, "red_circle.png", max_new_tokens=4)


def test_a_client_that_leaves_mid_stream_does_not_stall_the_others(pipe):
    """A streaming client reads two chunks and disconnects: its row stops (the batch does not run on
    to its 400 tokens), and requests sent meanwhile are answered correctly. Counted in decode
    steps, not seconds: had the row run on, the requests behind it would be answered only after
    its 400 steps; stopped, the whole exchange takes a few steps (2 chunks, the disconnect, 2 x 3
    tokens)."""
    slow = Slow(pipe, 0.01)
    with serving(slow, max_batch=4, batch_wait_s=0.0) as (url, app):
        c = client(url)
        stream = c.chat.completions.create(
            model=NAME, messages=image_message("long"), max_tokens=400, temperature=0, stream=True
        )
        it = iter(stream)
        next(it), next(it)
        stream.close()
        answers = [
            c.chat.completions.create(model=NAME, messages=image_message(q), max_tokens=3, temperature=0)
            for q in ("a?", "b?")
        ]
        steps = slow.steps
    assert steps < 400, f"{steps} decode steps: the abandoned stream ran on to its 400 tokens"
    want = [reference(slow, q, "red_circle.png", max_new_tokens=3, eos_token_id=[]) for q in ("a?", "b?")]
    assert [a.choices[0].message.content for a in answers] == want


# -- bad requests -----------------------------------------------------------------------------------------
def test_bad_requests_get_the_documented_4xx(pipe, tmp_path):
    """Malformed JSON, a missing or unknown field, an unknown model, too many tokens, an oversize
    image, a body over the limit, a network or out-of-root image URL: each a JSON error whose
    message (and `param`) names the field; the server keeps serving."""
    from PIL import Image

    big = io.BytesIO()
    Image.new("RGB", (300, 300)).save(big, "PNG")
    inside = tmp_path / "media"
    inside.mkdir()
    (inside / "pic.png").write_bytes((ASSETS / "red_circle.png").read_bytes())
    ok = {"model": NAME, "messages": image_message("hi"), "max_tokens": 2}

    def part(url):
        return {**ok, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}

    limits = Limits(max_tokens=64, max_image_pixels=256 * 256, max_body_bytes=200_000, media_root=inside)
    with serving(pipe, limits=limits) as (url, _):
        cases = [
            (b"{not json", 400, None, "invalid JSON"),
            (json.dumps({**ok, "model": "gpt-4"}).encode(), 404, "model", "not served"),
            (json.dumps({k: v for k, v in ok.items() if k != "messages"}).encode(), 400, "messages", "required"),
            (json.dumps({**ok, "logit_bias": {"1": 2}}).encode(), 400, "logit_bias", "unknown field"),
            (json.dumps({**ok, "max_tokens": 65}).encode(), 400, "max_tokens", "limit of 64"),
            (json.dumps({**ok, "temperature": -1}).encode(), 400, "temperature", "greater than or equal"),
            (json.dumps({**ok, "n": 2}).encode(), 400, "n", "n = 1"),
            (json.dumps(part(data_url(big.getvalue()))).encode(), 400, "messages[0].content[0].image_url", "300 x 300"),
            (json.dumps(part("data:image/png;base64,@@@")).encode(), 400, "messages[0].content[0].image_url", "base64"),
            (
                json.dumps(part("https://example.com/a.png")).encode(),
                400,
                "messages[0].content[0].image_url",
                "network",
            ),
            (json.dumps(part(str(ROOT / "README.md"))).encode(), 400, "messages[0].content[0].image_url", "outside"),
            (json.dumps(part(data_url(b"not a png"))).encode(), 400, "messages[0].content[0].image_url", "cannot read"),
            (json.dumps({**ok, "messages": [{"role": "robot", "content": "x"}]}).encode(), 400, "messages[0].role", ""),
            (b"{" + b" " * 300_000 + b"}", 413, None, "exceeds the limit"),
            (b"[" * 100_000 + b"]" * 100_000, 400, None, "nested too deeply"),
            (b"[1, 2]", 400, None, "valid dictionary"),
        ]
        for body, status, param, words in cases:
            got, err = post(url, body)
            assert got == status, (body[:80], got, err)
            assert err["error"]["param"] == param and words in err["error"]["message"], err
        under_root = post(url, json.dumps(part("file://pic.png")).encode())  # a file under the media root
        status, good = post(url, json.dumps(ok).encode())
    assert under_root[0] == 200, under_root
    assert status == 200 and good["choices"][0]["message"]["content"] is not None


def test_a_full_queue_is_429(pipe):
    """With the batcher not running, the first request waits in the queue (max 1) and the next one
    is refused with 429 at once."""
    with serving(pipe, lifespan="off", limits=Limits(max_queue=1)) as (url, app):
        body = json.dumps({"model": NAME, "messages": image_message("hi"), "max_tokens": 2}).encode()
        threading.Thread(target=post_quiet, args=(url, body), daemon=True).start()
        deadline = time.monotonic() + 20
        while app.state.batcher.waiting < 1:
            assert time.monotonic() < deadline, "the first request never reached the queue"
            time.sleep(0.02)
        status, err = post(url, body)
    assert status == 429 and err["error"]["type"] == "rate_limit_error" and "--max-queue" in err["error"]["message"]


def post_quiet(url, body):
    with contextlib.suppress(Exception):
        urllib.request.urlopen(
            urllib.request.Request(
                url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}, method="POST"
            ),
            timeout=2,
        ).read()


# -- checkpoints, audio -------------------------------------------------------------------------------------
def test_a_checkpoint_serves_audio_with_torch(tmp_path):
    """A composed checkpoint (torch) with an audio encoder: `input_audio` (base64 WAV) gives the
    model's own greedy answer for the file; audio past --max-audio-seconds is refused naming the part."""
    import soundfile as sf

    from composer.builder import build
    from composer.spec import load_spec

    model = build(load_spec(ROOT / "specs/tiny/ltu_audio.yaml")).eval()
    wav = tmp_path / "a.wav"
    t = np.arange(16000) / 16000
    sf.write(wav, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    batch = model.prepare([model.format_prompt("What do you hear?")], audio=[str(wav)])
    want = model.decode(model.generate(**batch, max_new_tokens=6))[0]
    msg = [
        {
            "role": "user",
            "content": [
                {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav.read_bytes()).decode()}},
                {"type": "text", "text": "What do you hear?"},
            ],
        }
    ]
    with serving(model, limits=Limits(max_audio_seconds=0.5)) as (url, _):
        status, err = post(url, json.dumps({"model": "tiny-ltu-audio", "messages": msg}).encode())
        assert status == 400 and err["error"]["param"] == "messages[0].content[0].input_audio", err
        assert "limit of 0.5 s" in err["error"]["message"]
    with serving(model) as (url, _):
        r = client(url).chat.completions.create(model="tiny-ltu-audio", messages=msg, max_tokens=6, temperature=0)
    assert r.choices[0].message.content == want


# -- the process ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigterm_drains_the_requests_in_flight(pipe, llama_k1_export, tmp_path):
    """`compose serve` as a process: SIGTERM while a stream is running lets it finish (its whole
    answer), refuses new connections, and the process exits 0."""
    want = reference(pipe, "go", "red_circle.png", max_new_tokens=400)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "composer.cli", "serve", str(llama_k1_export[1]), "--port", str(port),
        ],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            with contextlib.suppress(OSError):
                urllib.request.urlopen(url + "/health", timeout=2).read()
                break
            time.sleep(0.2)
        stream = client(url).chat.completions.create(
            model=NAME, messages=image_message("go"), max_tokens=400, temperature=0, stream=True
        )
        it = iter(stream)
        next(it)
        proc.send_signal(signal.SIGTERM)
        rest = list(it)
        time.sleep(0.5)
        with pytest.raises(OSError):
            urllib.request.urlopen(url + "/health", timeout=5).read()
        assert proc.wait(60) == 0, (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "".join(c.choices[0].delta.content or "" for c in rest if c.choices) == want
    assert "Waiting for connections to close" in (tmp_path / "serve.log").read_text()


def test_serve_refuses_a_target_that_is_neither_a_checkpoint_nor_a_bundle(tmp_path):
    r = run_cli("serve", tmp_path)
    assert r.returncode == 2 and "neither a composer checkpoint" in r.stderr and r.stderr.count("\n") == 1
