"""`compose serve`: a bundle or checkpoint behind OpenAI's chat-completions API (needs the serve extra).

Its limit options are generated from ``Limits``' fields (``composer.options``); ``--max-body-mb``
(``max_body_bytes`` in MiB) and the options that are no request limits are written here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from composer.errors import ComposerError, InputError
from composer.options import collect, model_options
from composer.serve.protocol import Limits  # no torch, no FastAPI: the options are made from it

# Limits fields that are no options of their own: the body limit is --max-body-mb (MiB, below)
NOT_LIMIT_OPTIONS = ("max_body_bytes", "max_pending_body_bytes")
MIB = 2**20


def _range(field) -> click.ParamType:
    """A ``Limits`` field's constraints (``ge``/``gt``) as click's range type: checked, and shown in
    the help, as the options say them (``[default: 64; x>=1]``)."""
    bounds = {}
    for m in field.metadata:
        if getattr(m, "ge", None) is not None:
            bounds["min"] = m.ge
        if getattr(m, "gt", None) is not None:
            bounds.update(min=m.gt, min_open=True)
    kind = click.IntRange if field.annotation is int else click.FloatRange
    return kind(**bounds)


def _limit_types() -> dict[str, click.ParamType]:
    """The click types of ``Limits``' options: their ranges, and ``--media-root`` an existing directory."""
    types = {n: _range(f) for n, f in Limits.model_fields.items() if n not in NOT_LIMIT_OPTIONS and n != "media_root"}
    return types | {"media_root": click.Path(exists=True, file_okay=False, path_type=Path)}


def _limit_options(f):
    """``Limits``' fields as options (``composer.options``), with --max-body-mb for ``max_body_bytes``."""
    f = model_options(Limits, skip=NOT_LIMIT_OPTIONS, types=_limit_types(), defaults=True)(f)
    default_mb = Limits.model_fields["max_body_bytes"].default / MIB
    return click.option(
        "--max-body-mb", default=default_mb, show_default=True, type=click.FloatRange(0), help="Request body limit."
    )(f)


@click.command()
@click.argument("target")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (0.0.0.0: all).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--model-name", default=None, help="The model id clients send (default: the spec's name).")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1), help="Requests per batch (1: off).")
@click.option("--batch-wait-ms", default=10.0, show_default=True, type=click.FloatRange(0), help="Wait for more.")
@_limit_options
@click.option(
    "--api-key", envvar="COMPOSE_API_KEY", default=None, show_envvar=True,
    help="Require `Authorization: Bearer KEY` on /v1/ routes (as OpenAI clients send api_key).",
)  # fmt: skip
@click.option(
    "--allowed-host", "allowed_hosts", multiple=True,
    help="Host header values accepted (repeatable; '*': any). Default: localhost names when --host is a "
    "loopback address, else any.",
)  # fmt: skip
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="Bundles only.")
@click.option(
    "--threads", type=click.IntRange(1), default=None, help="ONNX Runtime intra-op threads per graph (bundles only)."
)
@click.option(
    "--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"])
)
def serve(
    target: str,
    host: str,
    port: int,
    model_name: str | None,
    max_batch: int,
    batch_wait_ms: float,
    max_body_mb: float,
    api_key: str | None,
    allowed_hosts: tuple[str, ...],
    provider: str,
    threads: int | None,
    log_level: str,
    **limit_settings: Any,
) -> None:
    """Serve TARGET (an ONNX bundle, or a composed checkpoint run with torch) over HTTP with
    OpenAI's chat-completions API, batching concurrent requests. SIGTERM or Ctrl-C finish the
    requests in flight, then exit. Needs the serve extra: pip install 'mm-composer[serve]'.

    \b
    Example:
      compose serve out/smol-demo.onnx --port 8000
      curl localhost:8000/v1/models
    """
    try:
        import uvicorn

        from composer.serve.app import create_app
    except ImportError as e:
        raise ComposerError(f"compose serve needs {e.name}: pip install 'mm-composer[serve]'") from None
    runtime = _runtime(target, provider, threads)
    limits = Limits(max_body_bytes=int(max_body_mb * MIB), **collect(Limits, limit_settings, skip=NOT_LIMIT_OPTIONS))
    loopback = host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")
    hosts = list(allowed_hosts) or (["localhost", "127.0.0.1", "::1", host] if loopback else None)
    app = create_app(
        runtime,
        name=model_name,
        limits=limits,
        max_batch=max_batch,
        batch_wait_s=batch_wait_ms / 1000,
        api_key=api_key or None,
        allowed_hosts=hosts,
    )
    _check_port_free(host, port)
    _run(uvicorn, app, host, port, log_level)


def _run(uvicorn, app, host: str, port: int, log_level: str) -> None:
    """Serve ``app`` until SIGINT/SIGTERM. uvicorn handles them (stop accepting, finish in-flight
    requests) and raises the signal again once done: a no-op handler then lets `compose serve`
    exit 0 after a clean drain."""
    import signal
    import threading

    main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _runtime(target: str, provider: str, threads: int | None):
    """TARGET as the runtime the server batches over: ONNX Runtime for a bundle, torch for a checkpoint."""
    from composer.targets import resolve

    if resolve(target, accept=("checkpoint", "bundle")).kind == "bundle":
        from composer.export.runtime import OnnxPipeline, default_session_options

        return OnnxPipeline(target, provider=provider, session_options=default_session_options(threads=threads))
    from composer.checkpoint import load_pretrained

    return load_pretrained(target).eval()


def _check_port_free(host: str, port: int) -> None:
    """--host/--port as one error (exit 2) when the address cannot be bound, before uvicorn starts."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind((host, port))
        except OSError as e:
            raise InputError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None
