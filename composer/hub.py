"""Hugging Face Hub: push composer checkpoints and ONNX bundles, pull them back, load a
``ComposedModel`` from a Hub id, and resolve the ``owner/name@revision`` pins of a spec.

Everything goes through huggingface_hub, so its settings apply as usual: the token comes from
``token=``, else ``HF_TOKEN``, else the login cache (``hf auth login``); ``HF_ENDPOINT`` is read
when a call is made (huggingface_hub reads it once, at import); with ``HF_HUB_OFFLINE=1``
pulls and pinned revisions are served from the HF cache (``HF_HUB_CACHE``).

A push is one commit: the directory's files (large ones through huggingface_hub's large-file
path: xet, or LFS with ``HF_HUB_DISABLE_XET=1``), a generated ``README.md`` model card unless the
directory has a card of its own (one composer generated, e.g. in a pulled dir, is regenerated),
and deletions of files the revision had but the directory does not; the local directory is never
written to. A checkpoint pushes its format's files only (``spec.yaml``, ``composer.json``,
``model.safetensors``, ``tokenizer/``, ``processors/``, plus ``metrics.jsonl`` of a training run);
a bundle pushes every file. Pickled files are never pushed, pulled or loaded as a checkpoint.

Example::

    push_to_hub("out/tiny-llava", "alice/tiny-llava")
    pull("alice/tiny-llava", "models/tiny-llava")
    model = ComposedModel.from_pretrained("alice/tiny-llava")
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from composer.errors import ComposerError, InputError
from composer.spec import split_revision

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
CHECKPOINT_FILES = ("spec.yaml", "composer.json", "model.safetensors", "metrics.jsonl", "README.md")
CHECKPOINT_DIRS = ("tokenizer", "processors")
# Component repos (`llm.model: owner/name@rev`): top-level files a loader may read; of the weights,
# safetensors when the repo has them, else torch pickles (read with weights_only by the loaders).
CONFIG_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja", ".vocab", ".yaml")
KEEP_REMOTE = (".gitattributes",)

_COMMIT = re.compile(r"[0-9a-f]{40}")  # a Hub commit hash
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
_FILES_AT: dict[tuple[str, str], list[str]] = {}  # (repo, commit hash) -> its files (a commit never changes)


# -- huggingface_hub settings, read at call time ------------------------------------------------------
def endpoint() -> str | None:
    """``HF_ENDPOINT`` as it is now (None: huggingface_hub's default)."""
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or None


def cache_dir() -> str | None:
    return os.environ.get("HF_HUB_CACHE") or None


def is_offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _endpoint_name() -> str:
    from huggingface_hub import constants

    return endpoint() or constants.ENDPOINT


def _api(token: str | None = None):
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint(), token=token)


def _storage(repo_id: str) -> Path:
    from huggingface_hub import constants

    return Path(cache_dir() or constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))  # the cache layout


def hub_error(e: Exception, what: str, *, write: bool = False) -> ComposerError:
    """One line for a huggingface_hub / HTTP failure; ``what`` names the operation and the repo
    (``write``: a push). Permission, missing repo or revision, and offline misses are input
    errors (exit 2); anything else is a runtime failure (exit 1)."""
    from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    status = getattr(getattr(e, "response", None), "status_code", None)
    detail = (getattr(e, "server_message", None) or "").strip().splitlines()
    detail = f": {detail[0]}" if detail else ""
    host = _endpoint_name()
    if status in (401, 403) and write:
        return InputError(f"{what}: permission denied by {host} (HTTP {status}{detail}); log in with `hf auth login` "
                          "or set HF_TOKEN to a token with write access to the repo")
    if status in (401, 403):
        return InputError(f"{what}: access denied by {host} (HTTP {status}{detail}): no such repo, or it is private "
                          "or gated and the token cannot read it (`hf auth login` or HF_TOKEN)")
    if isinstance(e, RevisionNotFoundError):
        return InputError(f"{what}: revision not found on {host}")
    if isinstance(e, RepositoryNotFoundError):
        return InputError(f"{what}: no such repo on {host} (or it is private and the token cannot read it)")
    if isinstance(e, (OfflineModeIsEnabled, LocalEntryNotFoundError)):
        return InputError(f"{what}: not in the Hugging Face cache ({cache_dir() or 'default'}) and offline mode is on"
                          if is_offline() else f"{what}: not in the Hugging Face cache and {host} cannot be reached")
    if isinstance(e, HfHubHTTPError):
        return ComposerError(f"{what}: HTTP {status} from {host}{detail}")
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return ComposerError(f"{what}: {type(e).__name__}: {first}")


def is_hub_ref(value: str) -> bool:
    """``owner/name`` or ``owner/name@rev`` that is not an existing local path."""
    return bool(_HUB_ID.fullmatch(split_revision(value)[0])) and not Path(value).exists()


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise InputError(f"{repo_id!r}: not a Hub repo id (want owner/name): {str(e).splitlines()[0]}") from None


# -- push ------------------------------------------------------------------------------------------------
def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def upload_files(root: Path) -> tuple[str, dict[str, Path]]:
    """-> ("checkpoint" | "bundle", {path in repo: local file}) for a composer directory."""
    from composer.checkpoint import WEIGHTS, is_checkpoint
    from composer.export.manifest import is_bundle, read_manifest

    if not root.is_dir():
        raise InputError(f"{root}: no such directory (push a composer checkpoint or an ONNX bundle)")
    if is_checkpoint(root):
        if not (root / WEIGHTS).is_file():
            raise InputError(f"{root}: composer checkpoint without {WEIGHTS}")
        kind = "checkpoint"
        candidates = [root / f for f in CHECKPOINT_FILES] + [f for d in CHECKPOINT_DIRS for f in (root / d).rglob("*")]
    elif is_bundle(root):
        read_manifest(root)  # every graph and its external data present and complete
        kind = "bundle"
        candidates = list(root.rglob("*"))
    else:
        raise InputError(f"{root}: neither a composer checkpoint (composer.json) nor an ONNX bundle (manifest.json)")
    files = {}
    for f in candidates:
        rel = f.relative_to(root)
        if f.is_file() and not _hidden(rel) and f.suffix not in PICKLE_SUFFIXES:
            files[rel.as_posix()] = f
    return kind, files


def push_to_hub(path_or_model: Any, repo_id: str, *, private: bool = False, revision: str | None = None,
                token: str | None = None, commit_message: str | None = None):
    """Push a composer checkpoint dir, an ONNX bundle dir or a ``ComposedModel`` to ``repo_id``
    (created if needed; ``private`` applies to a new repo) at ``revision`` (a branch, created
    from main if needed; default main). Returns huggingface_hub's ``CommitInfo``.

    Errors (no write permission, unreachable endpoint, not a composer directory) are one-line
    ``ComposerError``s naming the repo; the local directory is never modified.
    """
    _check_repo_id(repo_id)
    if isinstance(path_or_model, (str, os.PathLike)):
        return _push_dir(Path(path_or_model), repo_id, private=private, revision=revision, token=token,
                         commit_message=commit_message)
    with tempfile.TemporaryDirectory(prefix="composer-push-") as tmp:
        root = path_or_model.save_pretrained(Path(tmp) / "model")
        return _push_dir(root, repo_id, private=private, revision=revision, token=token,
                         commit_message=commit_message, model=path_or_model)


def _push_dir(root: Path, repo_id: str, *, private: bool, revision: str | None, token: str | None,
              commit_message: str | None, model=None):
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    from composer.card import GENERATED, model_card

    kind, files = upload_files(root)
    if "README.md" in files and GENERATED in files["README.md"].read_text(errors="replace"):
        del files["README.md"]  # a card composer wrote (e.g. a pulled repo): write a fresh one
    card = None if "README.md" in files else model_card(root, repo_id, model=model).encode()
    api = _api(token)
    what = f"push to {repo_id}" + (f"@{revision}" if revision else "")
    try:
        if not api.repo_exists(repo_id):  # (create_repo's own exists check on 401/403 needs HF_ENDPOINT at import)
            api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        remote = set(api.list_repo_files(repo_id, revision=revision))
        ops: list = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(f)) for p, f in sorted(files.items())]
        if card is not None:
            ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card))
        stale = remote - set(files) - {"README.md", *KEEP_REMOTE}
        ops += [CommitOperationDelete(path_in_repo=p) for p in sorted(stale)]
        name = root.name if model is None else model.spec.name
        return api.create_commit(repo_id, ops, revision=revision,
                                 commit_message=commit_message or f"Upload composer {kind} {name}")
    except ComposerError:
        raise
    except Exception as e:  # huggingface_hub and its HTTP client raise many types: one line naming the repo
        raise hub_error(e, what, write=True) from None


# -- pull --------------------------------------------------------------------------------------------------
def _parse_ref(repo_id: str, revision: str | None) -> tuple[str, str | None]:
    repo, rev = split_revision(repo_id)
    if rev is not None and revision is not None and rev != revision:
        raise InputError(f"{repo_id}: revision given twice ({rev!r} in the id and {revision!r})")
    _check_repo_id(repo)
    return repo, rev or revision


def snapshot(repo_id: str, *, revision: str | None = None, what: str | None = None) -> Path:
    """The repo's files at ``revision`` in the HF cache (downloaded when missing; from the cache
    alone when offline), pickles left out. Returns the snapshot dir (named by the commit hash)."""
    from huggingface_hub import snapshot_download

    what = what or f"pull {repo_id}" + (f"@{revision}" if revision else "")
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir(), endpoint=endpoint(),
                                      ignore_patterns=[f"*{s}" for s in PICKLE_SUFFIXES], local_files_only=is_offline()))
    except Exception as e:
        raise hub_error(e, what) from None


def _check_pulled(snap: Path, what: str) -> str:
    from composer.checkpoint import WEIGHTS, is_checkpoint
    from composer.export.manifest import is_bundle, read_manifest

    if is_checkpoint(snap):
        if not (snap / WEIGHTS).is_file():
            raise InputError(f"{what}: the repo has no {WEIGHTS}; composer loads safetensors only, never pickled weights")
        return "checkpoint"
    if is_bundle(snap):
        read_manifest(snap)
        return "bundle"
    raise InputError(f"{what}: the repo is neither a composer checkpoint (composer.json) nor an ONNX bundle (manifest.json)")


def pull(repo_id: str, out_dir: str | Path, *, revision: str | None = None, overwrite: bool = False) -> tuple[Path, str]:
    """Download a composer checkpoint or ONNX bundle (``repo_id``, or ``owner/name@rev``) into
    ``out_dir`` (through the HF cache, then copied; the dir appears complete or not at all).
    Returns ``(out_dir, commit hash)``."""
    from composer.checkpoint import atomic_dir

    repo, rev = _parse_ref(repo_id, revision)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise InputError(f"{out_dir}: exists and is not empty (pass overwrite=True / --overwrite)")
    what = f"pull {repo}" + (f"@{rev}" if rev else "")
    snap = snapshot(repo, revision=rev, what=what)
    _check_pulled(snap, what)
    with atomic_dir(out_dir, overwrite) as tmp:
        for f in sorted(snap.rglob("*")):
            rel = f.relative_to(snap)
            if f.is_file() and not _hidden(rel):
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, tmp / rel)  # follows the cache's symlinks to blobs
    return out_dir, snap.name


def load_from_hub(repo_id: str, *, revision: str | None = None):
    """``ComposedModel`` from a Hub repo holding a composer checkpoint (safetensors only)."""
    from composer.checkpoint import load_pretrained

    repo, rev = _parse_ref(repo_id, revision)
    what = f"load {repo}" + (f"@{rev}" if rev else "")
    snap = snapshot(repo, revision=rev, what=what)
    if _check_pulled(snap, what) != "checkpoint":
        raise InputError(f"{what}: the repo holds an ONNX bundle; run it with `compose pull` + OnnxPipeline / `compose generate`")
    return load_pretrained(snap)


# -- pinned component revisions (spec fields `owner/name@rev`) ---------------------------------------------------
def resolve_revision(repo_id: str, revision: str, *, where: str, offline: bool = False) -> str:
    """The commit hash of ``repo_id`` at ``revision`` (a branch, tag or hash): from the Hub
    (``model_info``), or offline from the HF cache (``refs/<revision>``, or a snapshot named so)."""
    storage = _storage(repo_id)
    if offline or is_offline():
        if _COMMIT.fullmatch(revision) and (storage / "snapshots" / revision).is_dir():
            return revision
        ref = storage / "refs" / revision
        if ref.is_file():
            return ref.read_text().strip()
        raise InputError(f"{where}: {repo_id}@{revision} is not in the Hugging Face cache ({storage}) and offline mode is on")
    try:
        info = _api().model_info(repo_id, revision=revision)
    except Exception as e:
        raise hub_error(e, f"{where}: {repo_id}@{revision}") from None
    _FILES_AT[(repo_id, info.sha)] = [s.rfilename for s in info.siblings or []]
    if revision != info.sha:  # as huggingface_hub records a branch/tag, so offline builds find it
        try:
            (storage / "refs" / revision).parent.mkdir(parents=True, exist_ok=True)
            (storage / "refs" / revision).write_text(info.sha)
        except OSError:  # a read-only cache: offline builds then need the hash itself
            pass
    return info.sha


def component_files(files: list[str], *, weights: bool) -> list[str]:
    """The files of a component repo a loader needs: top-level configs/tokenizer files and, with
    ``weights``, one weights format (safetensors, else torch pickles read with weights_only)."""
    top = [f for f in files if "/" not in f]
    out = [f for f in top if f.endswith(CONFIG_SUFFIXES)]
    if weights:
        st = [f for f in top if f.endswith(".safetensors")]
        if any(f.startswith("model") for f in st):  # Mistral repos also carry consolidated.safetensors
            st = [f for f in st if not f.startswith("consolidated")]
        out += st or [f for f in top if f.endswith((".bin", ".pt", ".pth"))]
    return out


def pinned_snapshot(repo_id: str, commit: str, *, where: str, weights: bool, offline: bool = False) -> Path:
    """Local snapshot dir of a component repo at ``commit`` (see ``component_files``); offline,
    the cached snapshot as it is."""
    from huggingface_hub import snapshot_download

    if offline or is_offline():
        snap = _storage(repo_id) / "snapshots" / commit
        if not snap.is_dir():
            raise InputError(f"{where}: {repo_id}@{commit} is not in the Hugging Face cache and offline mode is on")
        return snap
    if (repo_id, commit) not in _FILES_AT:
        resolve_revision(repo_id, commit, where=where)
    wanted = component_files(_FILES_AT[(repo_id, commit)], weights=weights)
    if not wanted:
        raise InputError(f"{where}: {repo_id}@{commit} has no config or weights files at its top level")
    try:
        return Path(snapshot_download(repo_id, revision=commit, allow_patterns=wanted, cache_dir=cache_dir(),
                                      endpoint=endpoint()))
    except Exception as e:
        raise hub_error(e, f"{where}: {repo_id}@{commit}") from None
