"""Option sets with one owner: `compose train`'s options are TrainConfig's fields, `compose
generate`'s generation options GenerationSpec's, `compose export`'s ExportOptions' (which are
export_onnx's keyword arguments), `compose serve`'s limit options Limits', so none can drift from
the other; a bad value names its flag,
exits 2 and starts nothing."""

from __future__ import annotations

import inspect

import click
import pytest
from helpers import ROOT, run_cli

from composer.cli.export import ExportOptions
from composer.cli.export import export as export_command
from composer.cli.generate import GENERATION_FLAGS
from composer.cli.generate import generate as generate_command
from composer.cli.serve import MIB, NOT_LIMIT_OPTIONS
from composer.cli.serve import serve as serve_command
from composer.cli.train import NOT_OPTIONS, TRAIN_FLAGS
from composer.cli.train import train as train_command
from composer.options import flag_of
from composer.serve.protocol import Limits
from composer.spec import GenerationSpec
from composer.train import TrainConfig

TINY = ROOT / "specs/tiny/llava.yaml"


def _options(command: click.Command) -> dict[str, click.Option]:
    return {p.name: p for p in command.params if isinstance(p, click.Option) and p.name != "help"}


def test_every_train_config_field_is_a_train_option_and_back():
    """TrainConfig's fields, less the three that are no settings a user gives, are exactly `compose
    train`'s options, less the two that are no training settings; each option's default is the
    field's (a field without one is a required option), and messages name the option's flag."""
    options = _options(train_command)
    assert set(NOT_OPTIONS) == {"stop_after", "progress", "extra"}
    assert set(options) - {"profile", "low_memory"} == set(TrainConfig.model_fields) - set(NOT_OPTIONS)
    for name, field in TrainConfig.model_fields.items():
        if name in NOT_OPTIONS:
            continue
        opt = options[name]
        if field.is_required():
            assert opt.required, name
        else:
            assert opt.default == field.default, name
        assert flag_of(f"{name}: bad", TrainConfig, TRAIN_FLAGS).split(":")[0] in opt.opts, name
    assert options["output"].opts == ["-o", "--output"] and options["save_weights"].opts == ["--save"]
    assert options["on_bad_record"].is_flag and options["on_bad_record"].flag_value == "skip"
    assert list(options["precision"].type.choices) == ["auto", "fp32", "bf16", "fp16"]


def test_every_generation_setting_is_a_generate_option_and_back():
    options = _options(generate_command)
    own = {"prompt", "input_file", "output", "overwrite", "batch_size", "media_root", "raw", "seed", "provider"}
    assert set(options) - own - {"device", "dtype"} == set(GenerationSpec.model_fields)
    for name in GenerationSpec.model_fields:
        assert options[name].multiple or options[name].default is None, name  # not given: the spec's value applies
        assert flag_of(f"{name}: bad", GenerationSpec, GENERATION_FLAGS).split(":")[0] in options[name].opts, name


def test_export_options_are_export_onnx_keyword_arguments():
    """ExportOptions' fields, with their defaults, are export_onnx's keyword arguments (less those
    the command sets itself), and exactly `compose export`'s options less its own."""
    from composer.export.exporter import export_onnx

    params = inspect.signature(export_onnx).parameters
    keywords = {n: p.default for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    for own in ("overwrite", "progress", "check"):
        keywords.pop(own)
    assert {n: f.default for n, f in ExportOptions.model_fields.items()} == keywords
    options = _options(export_command)
    assert set(options) - {"out", "overwrite", "verify", "min_top1", "atol"} == set(ExportOptions.model_fields)


def test_every_limit_is_a_serve_option_and_back():
    """Limits' fields, less the body limits that are no options of their own, are exactly `compose
    serve`'s limit options (--max-body-mb is max_body_bytes in MiB); each option's default is the
    field's and its range the field's constraint."""
    options = _options(serve_command)
    own = {"host", "port", "model_name", "max_batch", "batch_wait_ms", "max_body_mb", "api_key", "allowed_hosts"}
    own |= {"provider", "threads", "log_level"}
    assert set(NOT_LIMIT_OPTIONS) == {"max_body_bytes", "max_pending_body_bytes"}
    assert set(options) - own == set(Limits.model_fields) - set(NOT_LIMIT_OPTIONS)
    for name, field in Limits.model_fields.items():
        if name in NOT_LIMIT_OPTIONS:
            continue
        opt = options[name]
        assert opt.default == field.default and opt.opts == ["--" + name.replace("_", "-")], name
        bounds = {type(m).__name__: m for m in field.metadata}
        if "Ge" in bounds:
            assert opt.type.min == bounds["Ge"].ge and not opt.type.min_open, name
        if "Gt" in bounds:
            assert opt.type.min == bounds["Gt"].gt and opt.type.min_open, name
    assert options["max_body_mb"].default * MIB == Limits.model_fields["max_body_bytes"].default
    assert options["body_timeout_s"].opts == ["--body-timeout-s"] and options["media_root"].type.exists


def test_serve_options_make_the_limits(tmp_path, monkeypatch):
    """What `compose serve` is given reaches the server's Limits; the rest keep Limits' defaults."""
    from click.testing import CliRunner

    import composer.cli.serve as cli_serve

    made = {}
    monkeypatch.setattr(cli_serve, "_runtime", lambda *a: "runtime")
    monkeypatch.setattr(cli_serve, "_check_port_free", lambda *a: None)
    monkeypatch.setattr(cli_serve, "_run", lambda *a: None)
    monkeypatch.setattr("composer.serve.app.create_app", lambda runtime, **kw: made.update(kw))
    args = ["x", "--max-queue", "3", "--max-body-mb", "0.5", "--body-timeout-s", "2", "--media-root", str(tmp_path)]
    r = CliRunner().invoke(serve_command, args)
    assert r.exit_code == 0, r.output
    assert made["limits"] == Limits(max_queue=3, max_body_bytes=2**19, body_timeout_s=2.0, media_root=tmp_path)
    r = CliRunner().invoke(serve_command, ["x", "--max-stop-chars", "0"])
    assert r.exit_code == 2 and "Invalid value for '--max-stop-chars': 0 is not in the range x>=1." in r.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["--lr", "-1"], "--lr: must be > 0, got -1.0"),
        (["--lr", "nan"], "--lr: must be a finite number, got nan"),
        (["--warmup-ratio", "2"], "--warmup-ratio: must be < 1, got 2.0"),
        (["--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
        (["--max-length", "0"], "--max-length: must be >= 1, got 0"),
        (["--seed", str(2**32)], "--seed: must be <= 4294967295, got 4294967296"),
        (["--scheduler", "wobbly"], "--scheduler: must be one of ["),
        (["--save", "trainable", "--merge-lora"], "--merge-lora: folds LoRA into the LLM's weights, which --save"),
        (["--stage", "3"], "Invalid value for '--stage': 3 is not in the range 1<=x<=2."),  # click's own check
        (["--precision", "fp8"], "Invalid value for '--precision': 'fp8' is not one of"),
    ],
)
def test_a_bad_training_option_names_its_flag_and_starts_nothing(tmp_path, monkeypatch, args, message):
    """Checked before the model loads: exit 2, one message naming the flag, no output."""

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("composer.checkpoint.load_any", no_load)
    out = tmp_path / "out"
    r = run_cli("train", TINY, "--data", tmp_path / "train.jsonl", "-o", out, *args)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not out.exists()


def test_train_help_shows_the_fields_defaults_and_descriptions():
    r = run_cli("train", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    for piece in (
        "--lr FLOAT Peak learning rate (AdamW). [default: 0.0002]",
        "--max-steps INTEGER Optimizer steps (overrides --epochs).",
        "--precision [auto|fp32|bf16|fp16]",
        "--skip-bad-records A bad record",
        "--media-root DIRECTORY Resolve media paths here (default: next to --data).",
        "--low-memory / --no-low-memory",
    ):
        assert piece in text, piece
    assert "--stop-after" not in text and "--progress" not in text and "--extra" not in text
