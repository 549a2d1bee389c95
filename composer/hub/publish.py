"""Publish to the Hugging Face Hub: push composer checkpoints and ONNX bundles, pull them back,
load a ``ComposedModel`` from a Hub id. Settings, errors and snapshots: ``composer.hub.sources``.

A push is one commit: the directory's files (large ones through huggingface_hub's large-file
path: xet, or LFS with ``HF_HUB_DISABLE_XET=1``), a generated ``README.md`` model card unless the
directory has a card of its own (one composer generated, e.g. in a pulled dir, is regenerated),
and deletions of files the revision had but the directory does not; the local directory is never
written to. A checkpoint pushes its format's files only (``spec.yaml``, ``composer.json``,
``model.safetensors``, ``tokenizer/``, ``processors/``, plus ``metrics.jsonl`` of a training run);
a bundle pushes every file. Pickled files are never pushed, pulled or loaded as a checkpoint; a
directory holding a symbolic link anywhere is refused before anything is sent.

Example::

    push_to_hub("out/tiny-llava", "alice/tiny-llava")
    pull("alice/tiny-llava", "models/tiny-llava")
    model = ComposedModel.from_pretrained("alice/tiny-llava")
"""

from __future__ import annotations

import os
import shutil
import tempfile
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from composer.errors import ComposerError, InputError
from composer.hub.sources import PICKLE_SUFFIXES, api, check_repo_id, hub_error, snapshot
from composer.spec import split_revision

CHECKPOINT_FILES = (
    "spec.yaml",
    "composer.json",
    "generation_config.json",
    "model.safetensors",
    "metrics.jsonl",
    "README.md",
)
CHECKPOINT_DIRS = ("tokenizer", "processors")
OPTIONAL_FILES = ("metrics.jsonl", "README.md", "generation_config.json", "train_config.json")
KEEP_REMOTE = (".gitattributes",)


# -- push ------------------------------------------------------------------------------------------------
def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def upload_files(
    root: Path, include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()
) -> tuple[str, dict[str, Path]]:
    """-> ("checkpoint" | "bundle", {path in repo: local file}) for a composer directory: its
    format's files, plus the other files matching an ``include`` glob (``"eval/*.json"``), less
    the optional ones matching an ``exclude`` glob (``metrics.jsonl``, ``README.md``); excluding
    a file the format needs is an error. Pickles and hidden files are never pushed."""
    from composer.checkpoint import WEIGHTS, WEIGHTS_INDEX, weight_files
    from composer.export.manifest import read_manifest
    from composer.targets import resolve

    if not root.is_dir():
        raise InputError(f"{root}: no such directory (push a composer checkpoint or an ONNX bundle)")
    _refuse_links(root)
    kind = resolve(root, accept=("checkpoint", "bundle")).kind  # the one reading of what a directory is
    if kind == "checkpoint":
        _check_sources_portable(root)
        shards = weight_files(root)  # model.safetensors, or the index's shards (all present)
        candidates = [root / f for f in CHECKPOINT_FILES] + [f for d in CHECKPOINT_DIRS for f in (root / d).rglob("*")]
        candidates += [*shards, root / WEIGHTS_INDEX] if shards[0].name != WEIGHTS else []
    else:
        read_manifest(root)  # every graph and its external data present and complete
        candidates = list(root.rglob("*"))
    if include:
        candidates += [f for f in root.rglob("*") if any(fnmatch(f.relative_to(root).as_posix(), g) for g in include)]
    files = {}
    for f in candidates:
        rel = f.relative_to(root)
        if f.is_file() and not _hidden(rel) and f.suffix not in PICKLE_SUFFIXES:
            files[rel.as_posix()] = f
    for path in [p for p in files if any(fnmatch(p, g) for g in exclude)]:
        if path not in OPTIONAL_FILES:
            raise InputError(f"--exclude {path}: the {kind} needs it (only {list(OPTIONAL_FILES)} may be left out)")
        del files[path]
    return kind, files


def _refuse_links(root: Path) -> None:
    """One InputError naming the first symbolic link anywhere under ``root`` (hidden and pickled
    files included): a push uploads what it finds in the directory, and a link would upload a
    file from outside it (``tokenizer/x -> ~/.ssh/id_rsa``). Links are not followed while looking."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            if p.is_symlink():
                raise InputError(
                    f"{p}: a symbolic link in {root} (to {os.readlink(p)!r}); push does not follow links out of the "
                    "directory: replace it with the file itself"
                )


def _check_sources_portable(root: Path) -> None:
    """A trainable-only checkpoint loads its frozen weights from the spec's sources: refuse to push
    one whose sources are local paths (they would not exist where it is pulled)."""
    from composer.builder import hub_fields
    from composer.checkpoint import read_checkpoint_meta
    from composer.refs import parse_source
    from composer.spec import load_yaml, parse_spec

    try:
        meta = read_checkpoint_meta(root)
    except InputError:
        return  # reported where the checkpoint is read (the model card, load_pretrained)
    if meta.weights != "trainable":
        return
    spec = parse_spec(load_yaml((root / "spec.yaml").read_text(), str(root / "spec.yaml")), str(root / "spec.yaml"))
    for field, obj, attr in hub_fields(spec):
        value = getattr(obj, attr)
        if value and parse_source(value, root).kind == "local":
            raise InputError(
                f"{root}: a trainable-only checkpoint whose {field} is the local path {value!r} would not load "
                "where it is pulled; save the full weights (compose train --save full) or name Hub ids in the spec"
            )


def push_to_hub(
    path_or_model: Any,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    license: str | None = None,
    datasets: list[str] | None = None,
):
    """Push a composer checkpoint dir, an ONNX bundle dir or a ``ComposedModel`` to ``repo_id``
    (created if needed; ``private`` applies to a new repo) at ``revision`` (a branch, created
    from main if needed; default main), or as a pull request against it (``create_pr``: the
    returned ``CommitInfo.pr_url`` names it). ``include``/``exclude``: see ``upload_files``;
    ``license``/``datasets``: the model card's metadata. A ``config.json`` describing the model
    (architecture, LLM, modalities and their insert_at) goes to the repo root, as the Hub expects
    of a model repo. Returns huggingface_hub's ``CommitInfo``.

    Errors (no write permission, unreachable endpoint, not a composer directory) are one-line
    ``ComposerError``s naming the repo; the local directory is never modified.
    """
    check_repo_id(repo_id)
    opts = dict(
        private=private,
        revision=revision,
        token=token,
        commit_message=commit_message,
        create_pr=create_pr,
        include=tuple(include),
        exclude=tuple(exclude),
        license=license,
        datasets=datasets,
    )
    if isinstance(path_or_model, (str, os.PathLike)):
        return _push_dir(Path(path_or_model), repo_id, **opts)
    with tempfile.TemporaryDirectory(prefix="composer-push-") as tmp:
        root = path_or_model.save_pretrained(Path(tmp) / "model")
        return _push_dir(root, repo_id, model=path_or_model, **opts)


def _push_dir(
    root: Path,
    repo_id: str,
    *,
    private: bool,
    revision: str | None,
    token: str | None,
    commit_message: str | None,
    create_pr: bool,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    license: str | None,
    datasets: list[str] | None,
    model=None,
):
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    from composer.hub.card import GENERATED, hub_config, model_card

    kind, files = upload_files(root, include, exclude)
    if "README.md" in files and GENERATED in files["README.md"].read_text(errors="replace"):
        del files["README.md"]  # a card composer wrote (e.g. a pulled repo): write a fresh one
    skip_card = any(fnmatch("README.md", g) for g in exclude)
    card = None if "README.md" in files or skip_card else model_card(root, repo_id, license=license, datasets=datasets)
    generated = {} if card is None else {"README.md": card.encode()}
    if "config.json" not in files:
        generated["config.json"] = hub_config(root, kind).encode()
    hub = api(token)
    what = f"push to {repo_id}" + (f"@{revision}" if revision else "")
    try:
        if not hub.repo_exists(repo_id):  # (create_repo's own exists check on 401/403 needs HF_ENDPOINT at import)
            hub.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main" and not create_pr:
            hub.create_branch(repo_id, branch=revision, exist_ok=True)
        remote = set(hub.list_repo_files(repo_id, revision=revision))
        ops: list = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(f)) for p, f in sorted(files.items())]
        ops += [CommitOperationAdd(path_in_repo=p, path_or_fileobj=data) for p, data in generated.items()]
        stale = remote - set(files) - set(generated) - {"README.md", *KEEP_REMOTE}
        ops += [CommitOperationDelete(path_in_repo=p) for p in sorted(stale)]
        name = root.name if model is None else model.spec.name
        return hub.create_commit(
            repo_id,
            ops,
            revision=revision,
            commit_message=commit_message or f"Upload composer {kind} {name}",
            create_pr=create_pr,
        )
    except ComposerError:
        raise
    except Exception as e:  # huggingface_hub and its HTTP client raise many types: one line naming the repo
        raise hub_error(e, what, write=True) from None


# -- pull --------------------------------------------------------------------------------------------------
def _parse_ref(repo_id: str, revision: str | None) -> tuple[str, str | None]:
    repo, rev = split_revision(repo_id)
    if rev is not None and revision is not None and rev != revision:
        raise InputError(f"{repo_id}: revision given twice ({rev!r} in the id and {revision!r})")
    check_repo_id(repo)
    return repo, rev or revision


def _check_pulled(snap: Path, what: str) -> str:
    from composer.checkpoint import WEIGHTS, WEIGHTS_INDEX, is_checkpoint
    from composer.export.manifest import is_bundle, read_manifest

    if is_checkpoint(snap):
        if not (snap / WEIGHTS).is_file() and not (snap / WEIGHTS_INDEX).is_file():
            raise InputError(
                f"{what}: the repo has no {WEIGHTS} (nor {WEIGHTS_INDEX}); composer loads safetensors only, "
                "never pickled weights"
            )
        return "checkpoint"
    if is_bundle(snap):
        read_manifest(snap)
        return "bundle"
    raise InputError(
        f"{what}: the repo is neither a composer checkpoint (composer.json) nor an ONNX bundle (manifest.json)"
    )


def pull(
    repo_id: str, out_dir: str | Path, *, revision: str | None = None, overwrite: bool = False
) -> tuple[Path, str]:
    """Download a composer checkpoint or ONNX bundle (``repo_id``, or ``owner/name@rev``) into
    ``out_dir``: straight into it with ``snapshot_download(local_dir=...)`` (no second copy in the
    HF cache), or offline (``HF_HUB_OFFLINE=1``) copied from the cache. The dir appears complete
    or not at all. Returns ``(out_dir, commit hash)``."""
    from composer.checkpoint import atomic_dir
    from composer.hub.sources import is_offline

    repo, rev = _parse_ref(repo_id, revision)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise InputError(f"{out_dir}: exists and is not empty (pass overwrite=True / --overwrite)")
    what = f"pull {repo}" + (f"@{rev}" if rev else "")
    if not is_offline():
        with atomic_dir(out_dir, overwrite) as tmp:
            sha = _download_to(repo, rev, tmp, what)
            _check_pulled(tmp, what)
        return out_dir, sha
    snap = snapshot(repo, revision=rev, what=what)
    _check_pulled(snap, what)
    with atomic_dir(out_dir, overwrite) as tmp:
        for f in sorted(snap.rglob("*")):
            rel = f.relative_to(snap)
            if f.is_file() and not _hidden(rel):
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, tmp / rel)  # follows the cache's symlinks to blobs
    return out_dir, snap.name


def _download_to(repo: str, rev: str | None, local_dir: Path, what: str) -> str:
    """The repo's files at ``rev`` (pinned to its commit first) into ``local_dir``, pickles left
    out, without huggingface_hub's bookkeeping folder; -> the commit hash."""
    from huggingface_hub import snapshot_download

    from composer.hub.sources import endpoint

    try:
        sha = api().model_info(repo, revision=rev).sha
        snapshot_download(
            repo,
            revision=sha,
            local_dir=str(local_dir),
            endpoint=endpoint(),
            ignore_patterns=[f"*{s}" for s in PICKLE_SUFFIXES] + [".*", "*/.*"],  # hidden: .gitattributes...
        )
    except Exception as e:
        raise hub_error(e, what) from None
    shutil.rmtree(local_dir / ".cache", ignore_errors=True)  # .cache/huggingface: download metadata
    return sha


def load_from_hub(repo_id: str, *, revision: str | None = None):
    """``ComposedModel`` from a Hub repo holding a composer checkpoint (safetensors only)."""
    from composer.checkpoint import load_pretrained

    repo, rev = _parse_ref(repo_id, revision)
    what = f"load {repo}" + (f"@{rev}" if rev else "")
    snap = snapshot(repo, revision=rev, what=what)
    if _check_pulled(snap, what) != "checkpoint":
        raise InputError(
            f"{what}: the repo holds an ONNX bundle; run it with `compose pull` + OnnxPipeline / `compose generate`"
        )
    return load_pretrained(snap)
