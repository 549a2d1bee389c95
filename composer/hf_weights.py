"""Selected tensors out of a whole Hugging Face checkpoint, without loading the rest.

Seed systems publish one checkpoint for the whole model: ``Salesforce/blip2-opt-2.7b`` holds
``vision_model.*``, ``query_tokens``, ``qformer.*``, ``language_projection.*`` and
``language_model.*`` (3.7B parameters). A component reads only its own tensors from it.

A source is one of:

- a weights file: ``.safetensors``, or a torch ``.bin`` read with ``weights_only=True``;
- a model directory: ``model.safetensors``, sharded ``model-*-of-*.safetensors`` with their
  ``model.safetensors.index.json``, or the ``pytorch_model.bin`` equivalents;
- a Hub repo id (``owner/name``): only the index and the shards holding the wanted tensors
  are downloaded (or taken from the local cache).

Errors are ``ValueError`` with one line that names the file or repo; callers prefix the spec
field. Example::

    ckpt = CheckpointFiles("Salesforce/blip2-opt-2.7b")
    vision = ckpt.read(k for k in ckpt.keys() if k.startswith("vision_model."))
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

from composer.errors import InputError, first_line

INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
# Top-level names of the other components in the seed systems' whole-model checkpoints (BLIP-2).
OTHER_COMPONENTS = ("vision_model.", "language_model.")


def is_hub_id(source: str) -> bool:
    """``owner/name`` that is neither an existing local path nor a weights file name (``composer.refs``)."""
    from composer.refs import parse_source

    ref = parse_source(source)
    return ref.kind == "hub" and ref.revision is None


def read_component(source: Path, own: set[str], where: str) -> dict[str, torch.Tensor] | None:
    """Tensors whose first name part is in ``own`` (e.g. ``{"query_tokens", "qformer",
    "language_projection"}``) when ``source`` is a whole-model checkpoint: a directory, a Hub
    id, or a file that also holds ``OTHER_COMPONENTS``. Tensors of other components are
    skipped unread. None when ``source`` is a plain file of one component (or unreadable, or
    absent): the caller's own reader handles and reports it. Errors name ``where`` and the file.
    """
    if source.is_file():
        try:
            keys = _file_keys(source)
        except ValueError:
            return None
        if not any(k.startswith(OTHER_COMPONENTS) for k in keys):
            return None
    elif not source.is_dir() and not is_hub_id(str(source)):
        return None
    try:
        ckpt = CheckpointFiles(source)
        return ckpt.read(k for k in ckpt.keys() if k.split(".", 1)[0] in own)
    except ValueError as e:
        raise InputError(f"{where}: {e}") from None


class CheckpointFiles:
    """The weight files of one checkpoint: which file holds each tensor, read on demand."""

    def __init__(self, source: str | Path):
        self.source = str(source)
        self._repo = self.source if is_hub_id(self.source) else None
        self._local: dict[str, Path] = {}  # file name -> local path (downloaded on first use)
        self.key_file = self._index()  # tensor name -> file name

    # -- locating files ------------------------------------------------------------------------
    def _index(self) -> dict[str, str]:
        path = Path(self.source)
        if self._repo is None and path.is_file():
            self._local[path.name] = path
            return dict.fromkeys(_file_keys(path), path.name)
        if self._repo is None and not path.is_dir():
            raise ValueError(f"{path}: no such file or directory")
        for name in INDEX_FILES:
            index = self._find(name)
            if index is not None:
                return read_index(index)
        for name in SINGLE_FILES:
            single = self._find(name)
            if single is not None:
                return dict.fromkeys(_file_keys(single), name)
        where = "(not a local path) in that Hub repo or the local cache" if self._repo else "in the directory"
        raise ValueError(
            f"{self.source}: no weights found {where} (looked for {', '.join(INDEX_FILES + SINGLE_FILES)})"
        )

    def _find(self, name: str) -> Path | None:
        """Local path of ``name`` in the directory / repo, or None when it has no such file."""
        if name in self._local:
            return self._local[name]
        if self._repo is None:
            p = Path(self.source) / name
            found = p if p.is_file() else None
        else:
            found = _hub_file(self._repo, name)
        if found is not None:
            self._local[name] = found
        return found

    def path(self, name: str) -> Path:
        found = self._find(name)
        if found is None:
            raise ValueError(f"{self.source}: {name} is listed in the index but missing")
        return found

    # -- reading -------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.key_file)

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors (CPU), opening only the files that hold them."""
        by_file: dict[str, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.key_file[k], []).append(k)
        out: dict[str, torch.Tensor] = {}
        for name, names in by_file.items():
            out.update(_read_file(self.path(name), names))
        return out


def _hub_file(repo: str, name: str) -> Path | None:
    """Download (or take from the cache) one file of a Hub repo; None when the repo lacks it."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(repo, name))
    except EntryNotFoundError:  # absent from the repo, or (offline) from the cache
        return None
    except Exception as e:  # network, auth, unknown repo: many types; name the repo
        raise ValueError(f"{repo}: cannot fetch {name} from the Hub ({type(e).__name__}: {first_line(e)})") from None


def read_index(path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a weights index ({type(e).__name__}: {first_line(e)})") from None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{path}: weight_map is not a mapping")
    return {str(k): str(v) for k, v in weight_map.items()}


def _file_keys(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                return list(f.keys())
        except Exception as e:  # truncated/corrupt headers raise several types
            raise ValueError(f"{path}: cannot read safetensors header ({type(e).__name__}: {first_line(e)})") from None
    return list(_load_bin(path))


def _read_file(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                return {k: f.get_tensor(k) for k in names}
        except Exception as e:
            raise ValueError(f"{path}: cannot read tensors ({type(e).__name__}: {first_line(e)})") from None
    state = _load_bin(path)
    missing = [k for k in names if k not in state]
    if missing:
        raise ValueError(f"{path}: does not hold {missing[:3]} listed in its index")
    return {k: state[k] for k in names}


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A torch checkpoint, tensors only (``weights_only``: never pickled objects), memory-mapped
    unless it is in torch's legacy (pre-1.6, not zip) format, which cannot be mapped."""
    import zipfile

    try:
        mmap = zipfile.is_zipfile(path)
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # corrupt files and refused pickles raise many types
        raise ValueError(f"{path}: cannot read weights ({type(e).__name__}: {first_line(e)})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return state


def check_state(
    own: dict[str, torch.Tensor],
    state: dict[str, torch.Tensor],
    source: str,
    what: str,
    *,
    optional: set[str] = frozenset(),
    show: int | None = None,
    hint: str = "",
) -> None:
    """Check that ``state`` holds exactly the keys of ``own`` (less ``optional`` ones it may lack),
    each with ``own``'s shape (checked in ``state``'s order). Raises ``ValueError`` naming
    ``source`` and ``what`` the tensors are (at most ``show`` keys listed per kind; None: all;
    ``hint`` ends the key message, e.g. "; check r")."""
    missing = sorted(set(own) - set(state) - optional)
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{source}: keys do not match the {what} (missing {missing[:show]}, unexpected {unexpected[:show]}{hint})"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"{source}: {k} has shape {tuple(v.shape)}, the {what} needs {tuple(own[k].shape)}")


def load_strict(
    module: torch.nn.Module,
    state: dict[str, torch.Tensor],
    source: str,
    what: str,
    *,
    optional: set[str] = frozenset(),
    show: int | None = None,
) -> None:
    """Load ``state`` into ``module`` after ``check_state`` against the module's own tensors; cast
    to the module's dtypes. Raises ``ValueError`` naming ``source`` and ``what`` the module is."""
    own = module.state_dict()
    check_state(own, state, source, what, optional=optional, show=show)
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=not optional)
