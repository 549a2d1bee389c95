"""`compose ls`, `compose cp`: the specs and accelerate configs shipped with composer."""

from __future__ import annotations

from pathlib import Path

import click


@click.command(name="ls")
def ls_() -> None:
    """List the specs and accelerate configs shipped with composer, with what each is. Any command
    that takes a spec takes a shipped name (`compose build tiny/llava -o out/x`)."""
    from composer import shipped

    for kind, name, _, about in shipped.catalog():
        click.echo(f"{kind:<6} {name:<32} {about}")


@click.command(name="cp")
@click.argument("name")
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace files that exist at DEST.")
def cp_(name: str, dest: Path, overwrite: bool) -> None:
    """Copy the shipped spec or config NAME (see `compose ls`) to DEST (a file or a directory) to
    edit, with the local files it names (trained weights, assets) next to it.

    \b
    Example:
      compose cp tiny/llava my_spec.yaml
      compose cp accelerate/fsdp_8gpu configs/
    """
    from composer import shipped

    for path in shipped.copy(name, dest, overwrite=overwrite):
        click.echo(f"wrote {path}")
