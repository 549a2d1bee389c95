"""The OpenAI chat-completions protocol as composer serves it: request schema, message -> prompt
and media, limits, response objects and streamed text.

A request's ``messages`` are OpenAI's: ``content`` a string or parts ``{"type": "text", "text"}``,
``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`` and
``{"type": "input_audio", "input_audio": {"data": <base64>, "format": "wav"}}``. Image URLs are
``data:`` URLs or, when the server was given a media root, local files under it (``file://`` URLs
or plain paths); nothing is fetched from the network. Each bad field is one ``RequestError``
whose ``param`` names it as OpenAI does (``messages[0].content[1].image_url``).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from composer.errors import InputError, first_line, unencodable, validation_message
from composer.spec import AUDIO_ENCODERS, IMAGE_ENCODERS, MIN_TEMPERATURE


class RequestError(Exception):
    """A request the server refuses: HTTP ``status``, OpenAI error ``type``, the field (``param``)."""

    def __init__(self, message: str, *, param: str | None = None, status: int = 400, kind: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


# -- request schema ----------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted, ignored: the encoder fixes the resolution


class InputAudio(_Strict):
    data: str
    format: str = "wav"


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class AudioPart(_Strict):
    type: Literal["input_audio"]
    input_audio: InputAudio


Part = Annotated[TextPart | ImagePart | AudioPart, Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part]
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    """``POST /v1/chat/completions``. Sampling: ``temperature`` 0 is greedy, > 0 samples;
    unset, the model's spec ``generation`` settings apply. ``top_k`` and ``repetition_penalty`` are
    the vLLM extensions of the same name."""

    model: StrictStr
    messages: list[Message] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)  # strict: "5", true and 5.0 are refused, not coerced
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: StrictInt | None = Field(None, ge=1)
    repetition_penalty: float | None = Field(None, gt=0, allow_inf_nan=False)
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = Field(None, ge=-(2**63), lt=2**63)  # OpenAI's seed is an int64
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = 1
    user: str | None = None
    frequency_penalty: float | None = Field(None, allow_inf_nan=False)
    presence_penalty: float | None = Field(None, allow_inf_nan=False)

    @property
    def stops(self) -> list[str]:
        """``stop`` as a list (OpenAI takes a string or a list)."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


def parse_request(raw: Any) -> ChatRequest:
    """A decoded JSON body -> ChatRequest; the first invalid field as one RequestError naming it."""
    bad = unencodable(raw)
    if bad is not None:
        raise RequestError(f"{bad[0]}: not valid Unicode text (a lone surrogate code point)", param=bad[0])
    try:
        req = ChatRequest.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [p for p in err["loc"] if not (isinstance(p, str) and p in _UNION_TAGS)]
        param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field (not supported by this server)"
        elif err["type"] == "missing":
            msg = "required"
        raise RequestError(f"{param or 'body'}: {msg}", param=param) from None
    if req.n != 1:
        raise RequestError("n: only n = 1 is supported", param="n")
    if req.temperature is not None and 0 < req.temperature < MIN_TEMPERATURE:
        raise RequestError(
            f"temperature: must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {req.temperature!r}",
            param="temperature",
        )
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(req, name) not in (None, 0, 0.0):
            raise RequestError(f"{name}: not supported (use repetition_penalty)", param=name)
    if len(req.stops) > MAX_STOPS or any(not s for s in req.stops):
        raise RequestError(f"stop: at most {MAX_STOPS} non-empty strings", param="stop")
    return req


MAX_STOPS = 16  # stop strings per request (OpenAI takes up to 4)


# pydantic puts a union member's name in an error's location (``content.list[...]``, ``str``)
_UNION_TAGS = {"str", "list[tagged-union[TextPart,ImagePart,AudioPart]]", "text", "image_url", "input_audio"}


# -- limits and media ----------------------------------------------------------------------------------
class Limits(BaseModel):
    """What one request may ask for (``compose serve``'s limit options: ``max_tokens`` is
    ``--max-tokens``; ``max_body_bytes`` is ``--max-body-mb``, in MiB). Each is checked before the
    work it bounds. ``media_root``: the directory local image/audio paths must lie under (None:
    local paths refused, data: URLs only)."""

    model_config = ConfigDict(extra="forbid")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:  # one InputError naming the field, as TrainConfig's
            raise InputError(validation_message(e, unknown="unknown setting")) from None

    max_queue: int = Field(64, ge=1, description="Waiting requests; 429 past.")
    max_tokens: int = Field(1024, ge=1, description="Most tokens a request gets.")
    max_body_bytes: int = Field(20 * 2**20, ge=0, description="Request body limit, in bytes.")
    max_image_pixels: int = Field(
        4096 * 4096, ge=1, description="Pixels (width x height) of one image, checked before it is decoded."
    )
    max_audio_seconds: float = Field(30.0, ge=0, description="Seconds of one audio clip.")
    max_media_items: int = Field(8, ge=0, description="Image/audio parts per request (counted before any is decoded).")
    max_stop_chars: int = Field(128, ge=1, description="Characters per stop string.")
    body_timeout_s: float = Field(30.0, gt=0, description="A request body not received within it: 408.")
    media_root: Path | None = Field(
        None, description="Local image/audio paths in requests must lie under it (default: data: URLs only)."
    )
    max_pending_body_bytes: int | None = Field(
        None,
        ge=0,
        description="Request bodies being received at once, all requests together (default: 4 x "
        "`max_body_bytes`): 503 past it.",
    )


def check_limits(req: ChatRequest, limits: Limits, max_text_chars: int | None = None) -> None:
    """What a request asks for, against ``limits``, before anything is decoded or tokenized: the
    stop strings' lengths, the number of media parts (each decoded image may hold
    ``max_image_pixels`` x 4 bytes) and the text's length (``max_text_chars``: more characters
    than the context can hold however they tokenize, see ``max_text_chars``)."""
    for i, stop in enumerate(req.stops):
        if len(stop) > limits.max_stop_chars:
            param = "stop" if isinstance(req.stop, str) else f"stop[{i}]"
            raise RequestError(
                f"{param}: a stop string of {len(stop)} characters exceeds this server's limit of "
                f"{limits.max_stop_chars}",
                param=param,
            )
    items = sum(
        not isinstance(part, TextPart) for msg in req.messages if isinstance(msg.content, list) for part in msg.content
    )
    chars = sum(
        len(msg.content)
        if isinstance(msg.content, str)
        else sum(len(p.text) for p in msg.content if isinstance(p, TextPart))
        for msg in req.messages
    )
    if max_text_chars is not None and chars > max_text_chars:
        raise RequestError(
            f"messages: {chars} characters of text cannot fit this model's context (at most {max_text_chars}: "
            "the context length x the longest token's characters)",
            param="messages",
        )
    if items > limits.max_media_items:
        raise RequestError(
            f"messages: {items} image/audio parts exceed this server's limit of {limits.max_media_items} per request",
            param="messages",
        )


def max_text_chars(tokenizer, context_length: int | None) -> int | None:
    """The most characters of text that can fit ``context_length`` tokens: no token decodes to
    more characters than its own string has (byte-level BPE: one character per byte;
    SentencePiece: the piece itself; WordPiece: less, without ``##``), so a text longer than
    context_length x the longest token string needs more tokens than the context holds."""
    if not context_length:
        return None
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    longest = max((len(t) for t in vocab), default=0)
    return context_length * max(longest, 4)  # 4: a UTF-8 byte tokenizer (no vocab strings) takes >= 1 token per 4 bytes


def _data_url(url: str, where: str) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or ";base64" not in head:
        raise RequestError(f"{where}: want a base64 data URL (data:<type>;base64,<data>)", param=where)
    return _b64(payload, where)


def _b64(payload: str, where: str) -> bytes:
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{where}: invalid base64 data", param=where) from None


def _local_file(url: str, limits: Limits, where: str) -> Path:
    if url.startswith(("http://", "https://", "ftp://")):
        raise RequestError(
            f"{where}: this server fetches nothing from the network; send the file as a data: URL", param=where
        )
    if limits.media_root is None:
        raise RequestError(
            f"{where}: local files are not allowed (start the server with --media-root DIR); send a data: URL",
            param=where,
        )
    name = url.removeprefix("file://")
    if "\x00" in name or name.startswith("~"):
        raise RequestError(f"{where}: not a usable path (a NUL character, or a ~ home directory)", param=where)
    path = Path(name)
    try:
        full = (path if path.is_absolute() else limits.media_root / path).resolve()
        root = limits.media_root.resolve()
        if not full.is_relative_to(root):
            raise RequestError(f"{where}: the path is outside the allowed media root", param=where)
        if not full.is_file():
            raise RequestError(f"{where}: no such file under the media root", param=where)
    except OSError as e:  # a component too long, a loop of links, ...: named without the server's paths
        raise RequestError(f"{where}: not a usable path ({e.strerror or type(e).__name__})", param=where) from None
    return full


def load_image(url: str, limits: Limits, where: str):
    """An ``image_url`` -> an RGB PIL image; refused past ``limits.max_image_pixels`` before decoding."""
    from PIL import Image

    from composer.adapters.vision import open_image, to_rgb

    if url.startswith("data:"):
        src: Any = io.BytesIO(_data_url(url, where))
    else:
        src = _local_file(url, limits, where)
    try:
        with open_image(src) as im:
            w, h = im.size
            if w * h > limits.max_image_pixels:
                raise RequestError(
                    f"{where}: image of {w} x {h} pixels exceeds this server's limit of {limits.max_image_pixels} "
                    "pixels",
                    param=where,
                )
            return to_rgb(im)
    except RequestError:
        raise
    except (OSError, ValueError, TypeError, Image.DecompressionBombError) as e:
        raise RequestError(f"{where}: cannot read image ({first_line(e)})", param=where) from None


def load_audio(part: InputAudio, limits: Limits, where: str):
    """``input_audio`` -> (mono waveform, rate), through composer's audio reader; refused past
    ``limits.max_audio_seconds``."""
    from composer.adapters.audio import read_audio

    data = _b64(part.data, f"{where}.data")
    fmt = "".join(c for c in part.format.lower() if c.isalnum())[:8] or "wav"
    fd, tmp = tempfile.mkstemp(suffix=f".{fmt}", prefix="composer-audio-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        wave, rate = read_audio(tmp, max_seconds=limits.max_audio_seconds)
    except InputError as e:
        msg = str(e).replace(tmp + ": ", "").replace("exceeds the limit", "exceeds this server's limit")
        raise RequestError(f"{where}: {msg}", param=where) from None
    finally:
        os.unlink(tmp)
    return wave, rate


# -- messages -> prompt ----------------------------------------------------------------------------------
def _modality(types: dict[str, str], accepted: frozenset[str], part: str, where: str) -> str:
    found = [m for m, t in types.items() if t in accepted]
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise RequestError(f"{where}: this model has {what} modality for {part} parts", param=where)
    return found[0]


def to_inputs(req: ChatRequest, runtime, limits: Limits) -> tuple[dict, dict[str, list]]:
    """The request's messages -> (``prepare`` keywords: ``messages`` for a model with a chat template,
    ``prompts`` for one with a spec ``prompt.template``; media per modality, in prompt order)."""
    from composer.adapters import encoder_types
    from composer.prompting import format_instruction

    types = encoder_types(runtime)
    media: dict[str, list] = {}
    convo = []
    for i, msg in enumerate(req.messages):
        parts: list[dict] = []
        if isinstance(msg.content, str):
            parts.append({"type": "text", "text": msg.content})
        for j, part in enumerate(msg.content if isinstance(msg.content, list) else []):
            where = f"messages[{i}].content[{j}]"
            if isinstance(part, TextPart):
                parts.append({"type": "text", "text": part.text})
                continue
            if msg.role != "user":
                raise RequestError(f"{where}: media parts are allowed in user messages only", param=where)
            if isinstance(part, ImagePart):
                m = _modality(types, IMAGE_ENCODERS, "image_url", where)
                media.setdefault(m, []).append(load_image(part.image_url.url, limits, f"{where}.image_url"))
            else:
                m = _modality(types, AUDIO_ENCODERS, "input_audio", where)
                media.setdefault(m, []).append(load_audio(part.input_audio, limits, f"{where}.input_audio"))
            parts.append({"type": m})
        convo.append({"role": "system" if msg.role == "developer" else msg.role, "content": parts})
    template = runtime.prompt_template
    if template is None:
        return {"messages": [convo]}, media
    # a spec prompt.template: one user message; its media fill the template's placeholders
    if len(convo) != 1 or convo[0]["role"] != "user":
        raise RequestError(
            "messages: this model formats prompts with its spec's prompt.template: send one user message",
            param="messages",
        )
    for m, ph in runtime.placeholders.items():
        want, got = template.count(ph), len(media.get(m, []))
        if want != got:
            raise RequestError(
                f"messages[0].content: this model's prompt template takes {want} {m} item(s), the message has {got}",
                param="messages[0].content",
            )
    text = " ".join(p["text"] for p in convo[0]["content"] if p["type"] == "text")
    try:
        prompt = format_instruction(runtime.tokenizer, template, runtime.placeholders, text)
    except InputError as e:
        raise RequestError(f"messages[0].content: {e}", param="messages[0].content") from None
    return {"prompts": [prompt]}, media


# -- responses -----------------------------------------------------------------------------------------
def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(cid: str, model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": None}
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk(cid: str, model: str, delta: dict, finish: str | None = None, usage_: dict | None = None) -> dict:
    out = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [] if usage_ is not None else [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if usage_ is not None:
        out["usage"] = usage_
    return out


class TextStream:
    """Token ids in, text out as it becomes final: a piece is held back while it ends in an
    incomplete UTF-8 sequence or could be the start of a stop string; the text ends before the
    first stop string (OpenAI's ``stop``: the stop sequence is not returned)."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.sent = 0  # characters handed out
        self.stopped = False

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        """-> the new text that is final (may be empty)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        text = self._text()
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens
            return ""
        cut = self._stop_at(text)
        if cut is not None:
            self.stopped = True
            return self._emit(text, cut)
        return self._emit(text, len(text) - self._held(text))

    def finish(self) -> str:
        """-> the rest of the text, once generation ended."""
        if self.stopped:
            return ""
        text = self._text()
        cut = self._stop_at(text)
        self.stopped = cut is not None
        return self._emit(text, len(text) if cut is None else cut)

    def _held(self, text: str) -> int:
        """The length of the longest end of ``text`` that is a proper prefix of a stop string (it
        may become that stop string): at most len(stop) - 1 candidate ends per stop, each compared
        by ``str.startswith`` (stop strings are length-limited by the server's ``Limits``)."""
        hold = 0
        for s in self.stops:
            n = min(len(s) - 1, len(text))
            tail = text[len(text) - n :]
            for i in range(n - hold):  # longest first; shorter than the current hold cannot matter
                if s.startswith(tail[i:]):
                    hold = n - i
                    break
        return hold

    def _stop_at(self, text: str) -> int | None:
        hits = [i for s in self.stops if (i := text.find(s)) >= 0]
        return min(hits) if hits else None

    def _emit(self, text: str, upto: int) -> str:
        if upto <= self.sent:
            return ""
        piece, self.sent = text[self.sent : upto], upto
        return piece
