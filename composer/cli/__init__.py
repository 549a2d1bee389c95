"""The `compose` command line: thin commands over the library.

Errors print one line on stderr and exit 2 (bad input) or 1 (runtime failure); `--debug`
shows the traceback. The group and the error handling live here; each command module
(``build``, ``train``, ``export``, ``generate``, ``shipped``, ``serve``, ``hub``, ``analysis``)
defines its commands, added to the group below. Heavy modules load inside the commands.
"""

from __future__ import annotations

import os
import sys

import click

from composer.cli import analysis, build, export, generate, hub, serve, shipped, train
from composer.errors import ComposerError, first_line


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.version_option(package_name="mm-composer", prog_name="compose")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Compose multimodal LMs from a YAML spec (DeepInsert: modality tokens enter at layer k).

    \b
    Example:
      compose build specs/tiny/llava.yaml -o out/tiny-llava
      compose inspect out/tiny-llava
    """
    ctx.obj = {"debug": debug}


for _command in (
    build.build,
    build.inspect,
    build.plan,
    train.train,
    export.export,
    generate.generate,
    shipped.ls_,
    shipped.cp_,
    serve.serve,
    hub.push,
    hub.pull,
    analysis.bench,
    analysis.probe,
):
    cli.add_command(_command)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C, so that temp outputs are removed on the way out."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated()


def main(argv: list[str] | None = None) -> None:
    import signal
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        _main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _printable(text: str) -> str:
    """``text`` with control and other non-printable characters escaped (``\\x1b``): an error message
    quotes file names and file contents, and a terminal must not run their escape sequences."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _main(argv: list[str] | None) -> None:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:]) or os.environ.get("COMPOSER_DEBUG") == "1"
    try:
        cli.main(args=argv, prog_name="compose", standalone_mode=False)
    except click.exceptions.Abort as e:  # click turns KeyboardInterrupt (Ctrl-C, and SIGTERM here) into Abort
        if isinstance(e.__cause__, _Terminated):
            click.echo("error: terminated (SIGTERM)", err=True)
            sys.exit(143)
        click.echo("error: interrupted" if isinstance(e.__cause__, KeyboardInterrupt) else "error: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except ComposerError as e:
        if debug:
            raise
        click.echo(f"error: {_printable(str(e))}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt as e:
        click.echo("error: terminated (SIGTERM)" if isinstance(e, _Terminated) else "error: interrupted", err=True)
        sys.exit(143 if isinstance(e, _Terminated) else 130)
    except Exception as e:  # a runtime failure: one line unless --debug
        if debug:
            raise
        click.echo(
            f"error: {type(e).__name__}: {_printable(first_line(e))} (run with --debug for the traceback)", err=True
        )
        sys.exit(1)
    sys.exit(0)
