"""Reliability: fuzzed specs. Random mutations of the seed specs (wrong types, missing
and unknown fields, out-of-range layers, mismatched widths), random bytes, non-UTF-8, huge files,
YAML alias bombs and object-building tags never raise anything but `SpecError`, whose message is
one line that starts with the file and names a field path (or is a YAML-level error)."""

from __future__ import annotations

import copy
import os
import re
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from composer.errors import SpecError
from composer.spec import MAX_SPEC_BYTES, MAX_YAML_DEPTH, MAX_YAML_NODES, Spec, _loc, load_spec, load_yaml

ROOT = Path(__file__).resolve().parents[1]
SPEC_FILES = sorted(ROOT.glob("specs/*.yaml")) + sorted(ROOT.glob("specs/tiny/*.yaml"))
SEEDS = {p.name if p.parent.name == "specs" else f"tiny/{p.name}": yaml.safe_load(p.read_text()) for p in SPEC_FILES}
# COMPOSER_FUZZ_EXAMPLES=5000 runs a longer, random (not derandomised) search.
N_EXAMPLES = int(os.environ.get("COMPOSER_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=N_EXAMPLES,
    deadline=None,  # real builds on a busy 2-core machine: no wall-clock limit per example
    derandomize="COMPOSER_FUZZ_EXAMPLES" not in os.environ,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# Errors about the file itself rather than a field.
FILE_LEVEL = (
    "invalid YAML",
    "not UTF-8",
    "YAML ",
    "recursive YAML alias",
    "the spec must be a YAML mapping",
    "spec file is larger",
)

_TMP = tempfile.TemporaryDirectory(prefix="composer-fuzz-")


def _write(content: bytes | str, name: str = "spec.yaml") -> Path:
    p = Path(_TMP.name) / name
    p.write_bytes(content.encode() if isinstance(content, str) else content)
    return p


def _check(p: Path) -> str | None:
    """Load ``p``; anything but a Spec or a well-formed SpecError fails the test. -> the message."""
    try:
        spec = load_spec(p)
    except SpecError as e:
        msg = str(e)
        assert "\n" not in msg and "\r" not in msg, msg
        assert msg.startswith(f"{p}: "), msg
        rest = msg[len(str(p)) + 2 :]
        if rest.startswith(FILE_LEVEL):
            return msg
        # a field path: `path: message`, whose first segment is a Spec field or a key of the file
        field = rest.split(": ", 1)[0]
        assert ": " in rest and field, msg
        keys = set(Spec.model_fields) | {_loc((k,)) for k in load_yaml(p.read_text(), str(p))}
        odd_key = field.startswith(("'", '"'))  # a key that is not a plain word, quoted
        assert odd_key or any(field == k or field.startswith(k + ".") for k in keys), msg
        return msg
    assert isinstance(spec, Spec)
    return None


# -- structural mutations of the seed specs --------------------------------------------------------------
def _paths(tree, prefix=()):
    """Every (path, value) in a YAML tree; the root is ()."""
    yield prefix, tree
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _paths(v, (*prefix, i))


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=12)
    | st.sampled_from(["", "llama", "mlp", "qformer", "<image>", "{instruction}", "../x"])
)
values = st.recursive(
    scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=6
)
field_names = st.sampled_from(
    [
        "type",
        "model",
        "config",
        "insert_at",
        "weights",
        "depth",
        "lora",
        "extra",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "placeholder",
    ]
) | st.text(max_size=8)
OPS = ("delete", "replace", "unknown_field", "layer", "width", "wrong_type")


@st.composite
def mutated_specs(draw):
    name = draw(st.sampled_from(sorted(SEEDS)))
    tree = copy.deepcopy(SEEDS[name])
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p, _ in _paths(tree)]
        path = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(OPS))
        node = _get(tree, path)
        parent = _get(tree, path[:-1]) if path else None
        if op == "delete" and path:
            del parent[path[-1]]
        elif op == "replace" and path:
            parent[path[-1]] = draw(values)
        elif op == "unknown_field" and isinstance(node, dict):
            node[draw(field_names)] = draw(values)
        elif op == "layer":  # an insertion or feature layer anywhere in range, out of range, or absurd
            mods = tree.get("modalities") if isinstance(tree, dict) else None
            if isinstance(mods, dict) and mods:
                m = mods[draw(st.sampled_from(sorted(mods, key=str)))]
                if isinstance(m, dict):
                    key = draw(st.sampled_from(["insert_at", "feature_layer"]))
                    target = m if key == "insert_at" else m.get("encoder")
                    if isinstance(target, dict):
                        target[key] = draw(st.integers(-40, 40) | st.sampled_from([2**63, -(2**63), 10**30]))
        elif op == "width" and isinstance(node, dict):  # break the width/heads arithmetic of a config
            for key in (
                "hidden_size",
                "num_attention_heads",
                "num_heads",
                "emb_dim",
                "intermediate_size",
                "num_key_value_heads",
                "head_dim",
            ):
                if key in node:
                    node[key] = draw(st.integers(-3, 200))
        elif op == "wrong_type" and path and not isinstance(node, (dict, list)):
            parent[path[-1]] = draw(st.sampled_from([[node], {"x": node}, str(node), None, True, 1.5]))
    return name, tree


@FUZZ
@given(mutated_specs())
def test_mutated_seed_specs_give_only_spec_errors_naming_a_field(case):
    name, tree = case
    _check(_write(yaml.safe_dump(tree, allow_unicode=True, sort_keys=False)))


SIZE_KEYS = (
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "ffn_dim",
    "head_dim",
    "num_hidden_layers",
    "vocab_size",
    "image_size",
    "patch_size",
    "max_position_embeddings",
    "num_mel_bins",
    "max_length",
    "frequency_stride",
    "time_stride",
    "emb_dim",
    "num_layers",
    "num_queries",
    "num_heads",
    "num_tokens",
    "rows",
    "depth",
    "cross_attention_frequency",
    "feature_layer",
    "insert_at",
)


@st.composite
def resized_tiny_specs(draw):
    """A tiny spec with 1-3 sizes, layer counts or layer indices set to small random integers."""
    name = draw(st.sampled_from([n for n in SEEDS if n.startswith("tiny/")]))
    tree = copy.deepcopy(SEEDS[name])
    paths = [p for p, _ in _paths(tree) if p and p[-1] in SIZE_KEYS]
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths))
        _get(tree, path[:-1])[path[-1]] = draw(st.integers(-2, 70))
    return tree


@settings(FUZZ, max_examples=max(10, N_EXAMPLES // 5))  # builds: slower per example
@given(resized_tiny_specs(), st.booleans())
def test_mismatched_widths_and_layers_fail_as_field_errors_when_building(tree, shape_only):
    """Width/layer arithmetic that only the builder can check (the encoder's token grid, a projector
    over it, a vocabulary the tokenizer does not fit) fails as one-line spec or input errors."""
    from composer.builder import build
    from composer.errors import InputError
    from composer.spec import parse_spec

    try:
        spec = parse_spec(tree, "s.yaml")
    except SpecError as e:
        assert "\n" not in str(e) and str(e).startswith("s.yaml: ")
        return
    try:
        model = build(spec, shape_only=shape_only)
    except (SpecError, InputError) as e:
        msg = str(e)
        assert "\n" not in msg and msg.split(".", 1)[0].split(":", 1)[0] in ("llm", "modalities", "projector"), msg
        return
    if not shape_only:  # a spec that builds also runs: one forward pass over a 2-row batch
        _forward_once(model.eval())


def _forward_once(model) -> None:
    from composer.analysis.bench import bench_inputs
    from composer.errors import InputError

    for text_tokens in (8, 32, 128, 512):  # the shortest prompt the template allows
        try:
            batch = bench_inputs(model, text_tokens, batch=2)
            break
        except InputError as e:
            assert "the prompt template alone has" in str(e), e
    with torch.no_grad():
        try:
            logits = model(**batch).logits
        except InputError as e:  # e.g. a context (max_position_embeddings) too short for the prompt
            assert "\n" not in str(e) and "max_position_embeddings" in str(e), e
            return
    assert logits.shape == (*batch["input_ids"].shape, model.llm.config.vocab_size)
    assert torch.isfinite(logits).all()


# -- text and byte mutations -------------------------------------------------------------------------------
@st.composite
def mutated_texts(draw):
    text = draw(st.sampled_from(SPEC_FILES)).read_bytes()
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(text)))
        j = draw(st.integers(i, min(len(text), i + 40)))
        insert = draw(
            st.binary(max_size=12)
            | st.sampled_from(
                [
                    b"&a ",
                    b"*a",
                    b"!!python/object/apply:os.system ['true'] ",
                    b"\xff\xfe",
                    b"\x00",
                    b"{",
                    b"[",
                    b"- ",
                    b": ",
                    b"\n  ",
                    b"\t",
                    b"'",
                    b'"',
                    b"? ",
                    b"%YAML 1.1\n---\n",
                    b"!!binary AAAA",
                    b"2001-13-45",
                    b"9" * 5000,
                ]
            )
        )
        text = text[:i] + insert + text[j:]
    return text


@FUZZ
@given(mutated_texts())
def test_mutated_spec_text_gives_only_spec_errors(content):
    _check(_write(content))


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_give_only_spec_errors(content):
    _check(_write(content))


# -- hostile YAML ------------------------------------------------------------------------------------------
def _billion_laughs(levels: int = 9) -> str:
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + f"\nname: *a{levels - 1}\n"


@pytest.mark.parametrize(
    "content,expected",
    [
        (_billion_laughs(), f"YAML expands to more than {MAX_YAML_NODES} nodes (alias bomb?)"),
        ("name: &a [x, *a]\n", "recursive YAML alias *a at line 1"),
        ("llm: &a {config: *a}\n", "recursive YAML alias *a at line 1"),
        ("name: " + "[" * 10_000 + "]" * 10_000 + "\n", f"YAML nested deeper than {MAX_YAML_DEPTH} levels at line 1"),
        (
            "x:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 200)),
            f"YAML nested deeper than {MAX_YAML_DEPTH} levels",
        ),
        (
            "name: [" + ", ".join(["1"] * (MAX_YAML_NODES + 10)) + "]\n",
            f"YAML expands to more than {MAX_YAML_NODES} nodes",
        ),
        ("seed: " + "9" * 5000 + "\n", "invalid YAML value (ValueError: Exceeds the limit"),
        ("name: 2001-13-45\n", "invalid YAML value (ValueError: month must be in 1..12)"),
        ("name: a\x00b\n", "invalid YAML: unacceptable character #x0000"),
        ("a: 1\n---\nb: 2\n", "invalid YAML at line 2, column 1: but found another document"),
        ("name: *nowhere\n", "invalid YAML at line 1, column 7: found undefined alias 'nowhere'"),
        ('"a\\nb": 1\nname: x\n', "'a\\nb': unknown field"),  # a newline in a key stays escaped
    ],
)
def test_hostile_yaml_is_refused_fast_and_on_one_line(content, expected):
    p = _write(content)
    msg = _check(p)  # the bombs' messages come from the guard, which runs before anything is expanded
    assert msg is not None and expected in msg, msg


def test_small_alias_use_is_still_allowed(tmp_path):
    """Anchors/aliases are plain YAML: sharing one encoder config between two modalities loads."""
    d = copy.deepcopy(SEEDS["tiny/llava.yaml"])
    text = yaml.safe_dump(d, sort_keys=False)
    text = text.replace("modalities:\n  image:\n    encoder:\n", "modalities:\n  image:\n    encoder: &enc\n", 1)
    assert "&enc" in text
    p = tmp_path / "s.yaml"
    p.write_text(text + "x_shared: *enc\n")
    with pytest.raises(SpecError, match=r"x_shared: unknown field"):
        load_spec(p)  # the alias expanded fine; the unknown field is the only complaint
    p.write_text(text)
    assert load_spec(p).modalities["image"].insert_at == d["modalities"]["image"]["insert_at"]


@pytest.mark.parametrize(
    "tag",
    [
        "!!python/object/apply:os.system ['touch {marker}']",
        "!!python/object/new:os.system ['touch {marker}']",
        "!!python/name:os.system",
        "!!python/module:os",
        "!!python/object:composer.spec.Spec {{}}",
        "!composer/eval 'touch {marker}'",
    ],
)
def test_object_building_tags_are_refused(tmp_path, tag):
    marker = tmp_path / "pwned"
    p = tmp_path / "s.yaml"
    p.write_text(f"name: {tag.format(marker=marker)}\n")
    with pytest.raises(SpecError) as e:
        load_spec(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: invalid YAML at line 1") and "is not allowed: a spec is plain data" in msg, msg
    assert "\n" not in msg and not marker.exists()


def test_huge_and_non_utf8_files(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_bytes(b"name: x\n" + b"# padding\n" * (MAX_SPEC_BYTES // 10 + 1))
    with pytest.raises(SpecError, match=rf"^{re.escape(str(big))}: spec file is larger than {MAX_SPEC_BYTES} bytes$"):
        load_spec(big)
    for i, content in enumerate([b"name: caf\xe9\n", "name: x\n".encode("utf-16"), b"\xff\xfe\xfd"]):
        p = tmp_path / f"enc{i}.yaml"
        p.write_bytes(content)
        with pytest.raises(SpecError, match=rf"^{re.escape(str(p))}: not UTF-8 text"):
            load_spec(p)


def test_cli_reports_a_fuzzed_spec_on_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    from composer.cli import main

    cases = {
        "bomb.yaml": _billion_laughs(),
        "tag.yaml": "name: !!python/name:os.system\n",
        "field.yaml": yaml.safe_dump(
            {**SEEDS["tiny/llava.yaml"], "llm": {**SEEDS["tiny/llava.yaml"]["llm"], "dtype": [1]}}
        ),
    }
    for name, content in cases.items():
        (tmp_path / name).write_text(content)
        with pytest.raises(SystemExit) as e:
            main(["build", str(tmp_path / name), "-o", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and err.startswith(f"error: {tmp_path / name}: "), err
        assert not (tmp_path / "out").exists()
    assert "llm.dtype: must be" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(cases)


def test_mismatched_widths_and_layers_are_field_errors():
    """Width and layer arithmetic of inline configs is checked when the spec loads, not deep in torch."""
    base = SEEDS["tiny/llava.yaml"]
    cases = [
        (
            ("llm", "config", "hidden_size"),
            66,
            "llm.config.hidden_size: must be divisible by num_attention_heads (4), got 66",
        ),
        (
            ("llm", "config", "num_key_value_heads"),
            3,
            "llm.config.num_attention_heads: must be divisible by num_key_value_heads (3), got 4",
        ),
        (
            ("modalities", "image", "encoder", "config", "hidden_size"),
            30,
            "modalities.image.encoder.config.hidden_size: must be divisible by num_attention_heads (4), got 30",
        ),
        (
            ("modalities", "image", "encoder", "feature_layer"),
            7,
            "modalities.image.encoder.feature_layer: must be in [-3, 2] for a 2-layer encoder, got 7",
        ),
        (
            ("modalities", "image", "encoder", "feature_layer"),
            [1, 7],
            "modalities.image.encoder.feature_layer: must be in [-3, 2] for a 2-layer encoder, got [1, 7]",
        ),
        (
            ("modalities", "image", "encoder", "feature_layer"),
            [1, 1],
            "modalities.image.encoder.feature_layer: a list must name one or more distinct layers, got [1, 1]",
        ),
        (
            ("modalities", "image", "encoder", "feature_layer"),
            [],
            "modalities.image.encoder.feature_layer: a list must name one or more distinct layers, got []",
        ),
        (("modalities", "image", "insert_at"), 4, "modalities.image.insert_at: must be < the LLM's 4 layers, got 4"),
    ]
    for path, value, expected in cases:
        d = copy.deepcopy(base)
        _get(d, path[:-1])[path[-1]] = value
        msg = _check(_write(yaml.safe_dump(d)))
        assert msg is not None and expected in msg, (path, msg)


def test_a_key_given_twice_is_refused_with_its_line(tmp_path):
    """A key given twice is refused with its line: PyYAML would keep the last of the two, and a
    spec must not build what its reader did not see."""
    import yaml as _yaml
    from helpers import spec_dict

    text = _yaml.safe_dump(spec_dict(insert_at=1), sort_keys=False).replace(
        "    insert_at: 1\n", "    insert_at: 1\n    insert_at: 3\n"
    )
    assert text.count("insert_at") == 2
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=rf"{path}: invalid YAML at line \d+, column 5: duplicate key 'insert_at'"):
        load_spec(path)


def test_rich_markup_in_a_name_is_printed_as_text(tmp_path, capsys):
    """`name: "x[/bold] [red]y"` is printed as text by the table printer (no markup error), and
    the command succeeds."""
    import yaml as _yaml
    from helpers import spec_dict

    from composer.cli import main

    d = spec_dict(insert_at=1)
    d["name"] = "x[/bold] [red]y"
    spec = tmp_path / "s.yaml"
    spec.write_text(_yaml.safe_dump(d))
    with pytest.raises(SystemExit) as e:
        main(["inspect", str(spec)])
    assert e.value.code == 0
    assert "x[/bold] [red]y" in capsys.readouterr().out


@pytest.mark.parametrize(
    "seed,path,value,expected",
    [
        (  # found by the fuzzer: a Q-Former over the CLS token alone built, then the patch conv failed
            "tiny/blip2.yaml",
            ("modalities", "image", "encoder", "config", "image_size"),
            1,
            "modalities.image.encoder: config.image_size (1) must be at least config.patch_size (8)",
        ),
        (
            "tiny/ltu_audio.yaml",
            ("modalities", "audio", "encoder", "config", "num_mel_bins"),
            2,
            "modalities.audio.encoder: config.num_mel_bins (2) must be at least config.patch_size",
        ),
    ],
)
def test_an_input_smaller_than_one_patch_is_a_build_error(seed, path, value, expected):
    from composer.builder import build
    from composer.spec import parse_spec

    d = copy.deepcopy(SEEDS[seed])
    _get(d, path[:-1])[path[-1]] = value
    with pytest.raises(SpecError) as e:
        build(parse_spec(d, "s.yaml"))
    assert expected in str(e.value) and "\n" not in str(e.value)
