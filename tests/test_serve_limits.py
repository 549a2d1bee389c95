"""`compose serve` limits that hold before any work is done for a request: stop strings are
length-limited and held back in time linear in their length, media parts are counted before any
is decoded, audio is refused from its header's length before its samples are read."""

from __future__ import annotations

import base64
import json
import socket
import time
import tracemalloc
import urllib.request

import numpy as np
import pytest
from helpers import ROOT, data_url, serving
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("uvicorn")

from composer.errors import InputError  # noqa: E402
from composer.serve import (
    Limits,  # noqa: E402
    protocol,  # noqa: E402
)
from composer.serve.protocol import TextStream  # noqa: E402

ASSETS = ROOT / "specs/tiny/assets"


def hi() -> list[dict]:  # the tiny twin's prompt template takes one image
    red = {"type": "image_url", "image_url": {"url": data_url(ASSETS / "red_circle.png")}}
    return [{"role": "user", "content": [red, {"type": "text", "text": "hi"}]}]


def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        url + "/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def pipe(llama_k1_export):
    from composer.export.runtime import OnnxPipeline

    return OnnxPipeline(llama_k1_export[1])


class _Chars:
    """A tokenizer whose token ids are code points: decode is exact, so TextStream's text is known."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


def _brute_hold(text: str, stops: list[str]) -> int:  # the definition: the longest end of text that starts a stop
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


@settings(max_examples=300, deadline=None)
@given(st.text("ab", max_size=30), st.lists(st.text("ab", min_size=1, max_size=8), min_size=1, max_size=4))
def test_stream_holds_back_exactly_the_possible_start_of_a_stop_string(text, stops):
    stream = TextStream(_Chars(), stops)
    assert stream._held(text) == _brute_hold(text, stops)


def test_long_stop_strings_are_refused_before_generation_and_the_server_stays_responsive(pipe):
    """A stop string longer than --max-stop-chars is a 400 naming it; at the limit, 16 stop strings
    that keep matching cost the stream a bounded amount per token (each candidate end is one
    `startswith`), checked as a generous ratio against a stream without stops."""
    with serving(pipe, limits=Limits(max_stop_chars=128)) as (url, _):
        t0 = time.monotonic()
        status, err = post(url, {"model": "tiny-test", "messages": [{"role": "user", "content": "hi"}],
                                 "stop": ["x", "y" * 600_000]})  # fmt: skip
        assert status == 400 and err["error"]["param"] == "stop[1]", err
        assert "a stop string of 600000 characters exceeds this server's limit of 128" in err["error"]["message"]
        with urllib.request.urlopen(url + "/health", timeout=10) as r:
            assert r.status == 200
        assert time.monotonic() - t0 < 10
    # worst case for the hold-back: text and stops all of one character, each stop one longer
    stops = ["a" * 127 + "b"] * 16
    text = "a" * 2000

    def feed(stream) -> float:
        t = time.perf_counter()
        for ch in text:
            stream.push(ord(ch))
        return time.perf_counter() - t

    plain = feed(TextStream(_Chars(), []))
    held = feed(TextStream(_Chars(), stops))
    assert held < 200 * plain + 0.5, (held, plain)  # tokenizer.decode of the whole text per token dominates both


def test_media_parts_are_counted_before_any_is_decoded(pipe, monkeypatch):
    """40 image parts, each a 71-byte PNG declaring 4096 x 4096 pixels: one 400 naming the count
    and the limit, and no image was opened (each would decode to 64 MiB)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (4096, 4096)).save(buf, "PNG", optimize=True)
    opened = []
    real = protocol.load_image
    monkeypatch.setattr(protocol, "load_image", lambda *a, **k: opened.append(1) or real(*a, **k))
    part = {"type": "image_url", "image_url": {"url": data_url(buf.getvalue())}}
    msg = [{"role": "user", "content": [part] * 40 + [{"type": "text", "text": "hi"}]}]
    with serving(pipe, limits=Limits(max_media_items=8)) as (url, _):
        status, err = post(url, {"model": "tiny-test", "messages": msg})
        assert status == 400 and err["error"]["param"] == "messages", err
        assert "40 image/audio parts exceed this server's limit of 8 per request" in err["error"]["message"]
        assert opened == []
        red = {"type": "image_url", "image_url": {"url": data_url(ASSETS / "red_circle.png")}}
        one = [{"role": "user", "content": [red, {"type": "text", "text": "hi"}]}]
        status, out = post(url, {"model": "tiny-test", "messages": one, "max_tokens": 2})
        assert status == 200 and opened == [1], out


def _long_flac(path, seconds: int, channels: int, rate: int = 16000) -> None:
    import soundfile as sf

    with sf.SoundFile(str(path), "w", samplerate=rate, channels=channels, format="FLAC") as f:
        block = np.zeros((rate, channels), np.float32)
        for _ in range(seconds):
            f.write(block)


def test_audio_past_the_limit_is_refused_from_its_header(tmp_path):
    """A FLAC of 600 s x 8 channels (a few hundred KB of silence; 300 MiB of float32 samples):
    refused naming its length before its samples are read (peak Python-tracked memory, numpy
    arrays included, stays under 8 MiB); a file within the limit reads as before."""
    from composer.adapters.audio import read_audio

    flac = tmp_path / "long.flac"
    _long_flac(flac, 600, 8)
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match=r"long.flac: 600.0 s of audio exceeds the limit of 30 s"):
            read_audio(flac, max_seconds=30.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, peak
    short = tmp_path / "short.flac"
    _long_flac(short, 2, 2)
    wave, rate = read_audio(short, max_seconds=30.0)
    assert rate == 16000 and wave.shape == (32000,)
    with pytest.raises(InputError, match="2.0 s of audio exceeds the limit of 1.5 s"):
        read_audio(short, max_seconds=1.5)


def test_served_audio_past_the_limit_is_a_400_from_the_header(tmp_path):
    from composer.builder import build
    from composer.spec import load_spec

    model = build(load_spec(ROOT / "specs/tiny/ltu_audio.yaml")).eval()
    flac = tmp_path / "long.flac"
    _long_flac(flac, 600, 8)
    part = {
        "type": "input_audio",
        "input_audio": {"data": base64.b64encode(flac.read_bytes()).decode(), "format": "flac"},
    }
    msg = [{"role": "user", "content": [part, {"type": "text", "text": "What do you hear?"}]}]
    with serving(model, limits=Limits(max_audio_seconds=30)) as (url, _):
        status, err = post(url, {"model": "tiny-ltu-audio", "messages": msg})
    assert status == 400 and err["error"]["param"] == "messages[0].content[0].input_audio", err
    assert "600.0 s of audio exceeds this server's limit of 30 s" in err["error"]["message"]


# -- formats, disconnects, bodies, text -------------------------------------------------------------------
def test_images_open_as_raster_formats_only(pipe):
    """An EPS data URL (PIL would hand PostScript to Ghostscript) is a 400 naming the allowed
    formats; the message carries no command line or temp path."""
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto 8 8 lineto stroke\nshowpage\n"
    url_ = "data:image/png;base64," + base64.b64encode(eps).decode()
    msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url_}}]}]
    with serving(pipe) as (url, _):
        status, err = post(url, {"model": "tiny-test", "messages": msg})
    assert status == 400 and err["error"]["param"] == "messages[0].content[0].image_url", err
    message = err["error"]["message"]
    assert "not a PNG, JPEG, WEBP, GIF, BMP or TIFF image" in message
    assert "/tmp" not in message and "gs" not in message.split("(")[-1], message


def _raw_request(port: int, body: bytes, declared: int | None = None, headers: str = "") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {declared if declared is not None else len(body)}\r\n{headers}\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


def _status(sock: socket.socket) -> int:
    data = b""
    while b"\r\n" not in data:
        piece = sock.recv(4096)
        if not piece:
            break
        data += piece
    return int(data.split(b" ", 2)[1])


def test_a_non_streaming_client_that_leaves_frees_its_row(pipe):
    """A non-streaming request for 400 tokens whose client closes the connection after 0.3 s: its row
    stops while tokens are still coming (checked every 0.25 s), so the requests sent after it are
    answered in a few steps, not after its 400 (counted in decode steps, not seconds)."""
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    from test_serve import NAME, Slow, image_message

    slow = Slow(pipe, 0.01)
    with serving(slow, max_batch=1, batch_wait_s=0.0) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        body = json.dumps({"model": NAME, "messages": image_message("long"), "max_tokens": 400, "temperature": 0})
        sock = _raw_request(port, body.encode())
        time.sleep(0.3)
        sock.close()
        status, out = post(url, {"model": NAME, "messages": image_message("a?"), "max_tokens": 3, "temperature": 0})
        steps = slow.steps
    assert status == 200, out
    assert steps < 200, f"{steps} decode steps: the abandoned request ran on toward its 400 tokens"


def test_request_bodies_time_out_and_share_a_memory_budget(pipe):
    """A body that stops arriving is a 408 after --body-timeout-s; bodies being received together may
    hold at most max_pending_body_bytes: a second one past it is a 503 at once."""
    limits = Limits(max_body_bytes=1000, max_pending_body_bytes=1500, body_timeout_s=1.0)
    with serving(pipe, limits=limits) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        t0 = time.monotonic()
        first = _raw_request(port, b"{" + b" " * 899, declared=1000)  # 900 of 1000 bytes, then nothing
        time.sleep(0.2)
        second = _raw_request(port, b"{" + b" " * 899, declared=1000)
        assert _status(second) == 503
        assert _status(first) == 408
        assert time.monotonic() - t0 < 10
        first.close(), second.close()
        status, _ = post(url, {"model": "tiny-test", "messages": hi(), "max_tokens": 1})
        assert status == 200  # the budget was given back


def test_text_longer_than_the_context_can_hold_is_refused_before_tokenizing(pipe, monkeypatch):
    """More characters than context length x the longest token string cannot fit however they
    tokenize: a 400 before the prompt reaches the tokenizer."""
    calls = []
    monkeypatch.setattr(pipe, "prepare", lambda *a, **k: calls.append(1))
    bound = protocol.max_text_chars(pipe.tokenizer, pipe.context_length)
    assert bound is not None
    with serving(pipe) as (url, _):
        t0 = time.monotonic()
        status, err = post(url, {"model": "tiny-test", "messages": [{"role": "user", "content": "x" * (bound + 1)}]})
    assert status == 400 and "cannot fit this model's context" in err["error"]["message"], err
    assert calls == [] and time.monotonic() - t0 < 10


# -- access and strict input ---------------------------------------------------------------------------------
def test_api_key_content_type_host_and_no_docs(pipe):
    import openai

    with serving(pipe, api_key="sekret", allowed_hosts=["localhost", "127.0.0.1"]) as (url, _):
        ok = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
        r = ok.chat.completions.create(model="tiny-test", messages=hi(), max_tokens=1)
        assert r.choices[0].message.content is not None
        for key in ("wrong", None):
            h = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
            req = urllib.request.Request(url + "/v1/models", headers=h)
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=10)
            assert e.value.code == 401
        auth = {"Authorization": "Bearer sekret"}
        form = urllib.request.Request(
            url + "/v1/chat/completions", data=b"a=b", headers={**auth, "Content-Type": "text/plain"}
        )
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(form, timeout=10)
        assert e.value.code == 415
        rebind = urllib.request.Request(url + "/health", headers={"Host": "evil.example:8000"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(rebind, timeout=10)
        assert e.value.code == 400
        for path in ("/docs", "/openapi.json", "/redoc"):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(url + path, timeout=10)
            assert e.value.code == 404


def test_wrong_types_and_values_are_400_naming_the_field(pipe, tmp_path):
    media = tmp_path / "media"
    media.mkdir()

    def image(path):
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": path}}]}]

    cases = [
        ({"max_tokens": "5"}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 5.0}, "max_tokens"),
        ({"seed": 2**64}, "seed"),
        ({"temperature": 1e-300}, "temperature"),
        ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content"),
        ({"messages": image("a\x00b.png")}, "messages[0].content[0].image_url"),
        ({"messages": image("~nosuchuser/x.png")}, "messages[0].content[0].image_url"),
        ({"messages": image("x" * 256 + "/a.png")}, "messages[0].content[0].image_url"),
    ]
    with serving(pipe, limits=Limits(media_root=media)) as (url, _):
        for extra, param in cases:
            status, err = post(url, {"model": "tiny-test", "messages": hi(), "max_tokens": 2} | extra)
            assert status == 400 and err["error"]["param"] == param, (extra, err)
            assert str(media) not in err["error"]["message"], err
        for raw, want in (
            (b'{"model": "tiny-test", "messages": [{"role": "user", "content": "hi"}], "seed": ' + b"9" * 5000 + b"}",
             "invalid JSON body: Exceeds the limit"),
            (b'{"model": "tiny-test", "messages": [{"role": "user", "content": "hi"}], "repetition_penalty": Infinity}',
             "repetition_penalty: Input should be a finite number"),
        ):  # fmt: skip
            req = urllib.request.Request(
                url + "/v1/chat/completions", data=raw, headers={"Content-Type": "application/json"}
            )
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=30)
            assert e.value.code == 400
            assert want in json.loads(e.value.read())["error"]["message"]


def test_serve_port_errors_exit_2(llama_k1_export):
    from helpers import run_cli

    r = run_cli("serve", llama_k1_export[1], "--port", "70000")
    assert r.returncode == 2 and "70000" in r.stderr
    r = run_cli("serve", llama_k1_export[1], "--threads", "-3")
    assert r.returncode == 2 and "--threads" in r.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = run_cli("serve", llama_k1_export[1], "--port", str(port))
    assert r.returncode == 2 and f"--port {port}: cannot listen there" in r.stderr and r.stderr.count("\n") == 1


@pytest.mark.slow
def test_32_concurrent_clients_are_all_answered_while_one_client_attacks(pipe):
    """One client sends the attacks above one after another (a 600,000-character stop, 40 large
    image headers, text past the context, an EPS image, a body that stops arriving) while 32 clients
    ask ordinary questions: every attack gets its 4xx, every ordinary request its 200, and each
    answer equals the same question asked alone (greedy)."""
    import io
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    big = io.BytesIO()
    Image.new("L", (4096, 4096)).save(big, "PNG", optimize=True)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"
    bound = protocol.max_text_chars(pipe.tokenizer, pipe.context_length)
    attacks = [
        {"model": "tiny-test", "messages": hi(), "stop": ["y" * 600_000]},
        {"model": "tiny-test", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(big.getvalue())}}] * 40}]},
        {"model": "tiny-test", "messages": [{"role": "user", "content": "x" * (bound + 1)}]},
        {"model": "tiny-test", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(eps).decode()}}]}]},
    ]  # fmt: skip
    limits = Limits(body_timeout_s=2.0)
    with serving(pipe, max_batch=8, limits=limits) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        want = post(url, {"model": "tiny-test", "messages": hi(), "max_tokens": 4, "temperature": 0})[1]
        want = want["choices"][0]["message"]["content"]
        statuses: list[int] = []

        def attack():
            for body in attacks:
                statuses.append(post(url, body)[0])
            stalled = _raw_request(port, b"{", declared=1000)
            statuses.append(_status(stalled))
            stalled.close()

        attacker = threading.Thread(target=attack)
        attacker.start()
        with ThreadPoolExecutor(32) as pool:
            answers = list(
                pool.map(
                    lambda _: post(url, {"model": "tiny-test", "messages": hi(), "max_tokens": 4, "temperature": 0}),
                    range(32),
                )
            )
        attacker.join(60)
    assert [s for s, _ in answers] == [200] * 32
    assert {a["choices"][0]["message"]["content"] for _, a in answers} == {want}
    assert statuses == [400, 400, 400, 400, 408], statuses
