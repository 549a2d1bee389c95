"""Where a spec's components come from on the Hugging Face Hub: huggingface_hub's settings read
at call time, one-line errors for Hub failures, ``owner/name@revision`` pins resolved to commit
hashes, and the snapshot dirs of component repos and composer repos in the HF cache.

The builder reads component sources through this module; publishing (push/pull, model cards)
lives in ``composer.hub.publish`` and ``composer.hub.card``. See docs/architecture.md.

The token comes from ``token=``, else ``HF_TOKEN``, else the login cache (``hf auth login``);
``HF_ENDPOINT`` is read when a call is made (huggingface_hub reads it once, at import); with
``HF_HUB_OFFLINE=1`` pinned revisions and snapshots are served from the HF cache (``HF_HUB_CACHE``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from composer.errors import ComposerError, InputError, first_line

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Component repos (`llm.model: owner/name@rev`): top-level files a loader may read; of the weights,
# safetensors when the repo has them, else torch pickles (read with weights_only by the loaders).
CONFIG_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja", ".vocab", ".yaml")

_COMMIT = re.compile(r"[0-9a-f]{40}")  # a Hub commit hash
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


def api(token: str | None = None):
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint(), token=token)


def _storage(repo_id: str) -> Path:
    from huggingface_hub import constants

    return Path(cache_dir() or constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))  # the cache layout


def hub_error(e: Exception, what: str, *, write: bool = False) -> ComposerError:
    """One line for a huggingface_hub / HTTP failure; ``what`` names the operation and the repo
    (``write``: a push). Permission, missing repo or revision, and offline misses are input
    errors (exit 2); anything else is a runtime failure (exit 1)."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    status = getattr(getattr(e, "response", None), "status_code", None)
    detail = (getattr(e, "server_message", None) or "").strip().splitlines()
    detail = f": {detail[0]}" if detail else ""
    host = _endpoint_name()
    if status in (401, 403) and write:
        return InputError(
            f"{what}: permission denied by {host} (HTTP {status}{detail}); log in with `hf auth login` "
            "or set HF_TOKEN to a token with write access to the repo"
        )
    if status in (401, 403):
        return InputError(
            f"{what}: access denied by {host} (HTTP {status}{detail}): no such repo, or it is private "
            "or gated and the token cannot read it (`hf auth login` or HF_TOKEN)"
        )
    if isinstance(e, RevisionNotFoundError):
        return InputError(f"{what}: revision not found on {host}")
    if isinstance(e, RepositoryNotFoundError):
        return InputError(f"{what}: no such repo on {host} (or it is private and the token cannot read it)")
    if isinstance(e, RemoteEntryNotFoundError):
        return InputError(f"{what}: no such file in the repo on {host}")
    if isinstance(e, (OfflineModeIsEnabled, LocalEntryNotFoundError)):
        return InputError(
            f"{what}: not in the Hugging Face cache ({cache_dir() or 'default'}) and offline mode is on"
            if is_offline()
            else f"{what}: not in the Hugging Face cache and {host} cannot be reached"
        )
    if isinstance(e, HfHubHTTPError):
        return ComposerError(f"{what}: HTTP {status} from {host}{detail}")
    return ComposerError(f"{what}: {type(e).__name__}: {first_line(e)}")


def is_hub_ref(value: str) -> bool:
    """``owner/name`` or ``owner/name@rev`` that is not an existing local path (``composer.refs``)."""
    from composer.refs import is_hub_repo

    return is_hub_repo(value)


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise InputError(f"{repo_id!r}: not a Hub repo id (want owner/name): {first_line(e)}") from None


# -- snapshots ---------------------------------------------------------------------------------------------
def snapshot(repo_id: str, *, revision: str | None = None, what: str | None = None) -> Path:
    """The repo's files at ``revision`` in the HF cache (downloaded when missing; from the cache
    alone when offline), pickles left out. Returns the snapshot dir (named by the commit hash)."""
    from huggingface_hub import snapshot_download

    what = what or f"pull {repo_id}" + (f"@{revision}" if revision else "")
    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=cache_dir(),
                endpoint=endpoint(),
                ignore_patterns=[f"*{s}" for s in PICKLE_SUFFIXES],
                local_files_only=is_offline(),
            )
        )
    except Exception as e:
        raise hub_error(e, what) from None


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
        raise InputError(
            f"{where}: {repo_id}@{revision} is not in the Hugging Face cache ({storage}) and offline mode is on"
        )
    try:
        info = api().model_info(repo_id, revision=revision)
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
        return Path(
            snapshot_download(
                repo_id, revision=commit, allow_patterns=wanted, cache_dir=cache_dir(), endpoint=endpoint()
            )
        )
    except Exception as e:
        raise hub_error(e, f"{where}: {repo_id}@{commit}") from None
