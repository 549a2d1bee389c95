"""`compose push`, `compose pull`: checkpoints and bundles to and from the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("target", type=click.Path(file_okay=False, path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--revision", default=None, help="Branch to push to (created from main if needed).")
@click.option("-m", "--message", default=None, help="Commit message.")
@click.option("--create-pr", is_flag=True, help="Open a pull request against REVISION (default main) instead.")
@click.option("--include", multiple=True, help="Also push the files matching this glob (repeatable).")
@click.option(
    "--exclude", multiple=True, help="Leave out optional files matching this glob (metrics.jsonl, README.md)."
)
@click.option("--license", "license_", default=None, help="Model-card license (an SPDX-style Hub id: apache-2.0).")
@click.option(
    "--dataset", "datasets", multiple=True, help="Model-card training dataset (a Hub dataset id; repeatable)."
)
def push(
    target: Path,
    repo_id: str,
    private: bool,
    revision: str | None,
    message: str | None,
    create_pr: bool,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    license_: str | None,
    datasets: tuple[str, ...],
) -> None:
    """Push TARGET (a composer checkpoint or an ONNX bundle) to the Hub repo REPO_ID in one commit,
    with a generated model card and a config.json the Hub reads. Token: HF_TOKEN or `hf auth
    login`; HF_ENDPOINT is respected.

    \b
    Example:
      compose push out/tiny-llava alice/tiny-llava --license apache-2.0
      compose push out/tiny-llava.onnx alice/tiny-llava-onnx --private
      compose push out/tiny-llava alice/tiny-llava --create-pr --exclude metrics.jsonl
    """
    from composer.hub.publish import push_to_hub

    info = push_to_hub(
        target,
        repo_id,
        private=private,
        revision=revision,
        commit_message=message,
        create_pr=create_pr,
        include=include,
        exclude=exclude,
        license=license_,
        datasets=list(datasets),
    )
    where = f"{repo_id}" + (f"@{revision}" if revision else "")
    if create_pr:
        click.echo(f"opened a pull request on {where}: {info.pr_url} (commit {info.oid})")
    else:
        click.echo(f"pushed {target} to {where} (commit {info.oid})")


@click.command()
@click.argument("repo_id")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Directory to write.")
@click.option("--revision", default=None, help="Branch, tag or commit hash (or write REPO_ID@REV).")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists and is not empty.")
def pull(repo_id: str, out: Path, revision: str | None, overwrite: bool) -> None:
    """Download a composer checkpoint or ONNX bundle from the Hub into OUTPUT (through the HF
    cache; with HF_HUB_OFFLINE=1 from the cache alone). Pickled weights are never downloaded.

    \b
    Example:
      compose pull alice/tiny-llava -o models/tiny-llava
      compose generate models/tiny-llava --image cat.png --prompt "What is it?"
    """
    from composer.hub.publish import pull as hub_pull

    path, sha = hub_pull(repo_id, out, revision=revision, overwrite=overwrite)
    click.echo(f"pulled {repo_id} (commit {sha}) to {path}")
