"""`compose serve` limits that hold before any work is done for a request: stop strings are
length-limited and held back in time linear in their length, media parts are counted before any
is decoded, audio is refused from its header's length before its samples are read."""

from __future__ import annotations

import base64
import json
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
