"""Fixtures and test-session settings; the helpers they use live in helpers.py."""

from __future__ import annotations

import os

# Tests never reach the network: everything is built from inline configs or saved to tmp dirs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
from helpers import make_model


@pytest.fixture
def tiny_llava():
    return make_model("llama", insert_at=0)
