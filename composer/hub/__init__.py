"""composer.hub: the Hugging Face Hub side of composer.

- ``sources``: huggingface_hub settings, Hub errors, ``owner/name@rev`` pins and snapshots of
  component repos (what the builder reads; imports no other composer module but spec/errors)
- ``publish``: ``push_to_hub``, ``pull``, ``load_from_hub`` for checkpoints and bundles
- ``card``: the generated model card, from the facts a checkpoint or bundle records

``from composer.hub import push_to_hub, pull`` works; each submodule loads on first use.
"""

from __future__ import annotations

from composer.lazy import lazy_attributes

_LAZY = {
    "push_to_hub": "composer.hub.publish",
    "pull": "composer.hub.publish",
    "load_from_hub": "composer.hub.publish",
    "is_hub_ref": "composer.hub.sources",
}

__all__ = sorted(_LAZY)

__getattr__ = lazy_attributes(__name__, _LAZY)
