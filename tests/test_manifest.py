"""The typed records composer writes and reads back: a bundle's manifest.json (``Manifest``) and a
checkpoint's composer.json (``CheckpointMeta``). Written and read back they are equal and the JSON
text is the writer's; a bad field is one InputError naming the file and the field path; files
written before optional keys existed still load, with the same defaults."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import make_model, manifest_data

from composer.checkpoint import CheckpointMeta, read_checkpoint_meta, write_checkpoint_meta
from composer.errors import InputError
from composer.export.manifest import Manifest, read_manifest, write_manifest
from composer.records import dump_record


def _bundle(tmp_path, data: dict):
    bundle = tmp_path / "bundle"
    bundle.mkdir(exist_ok=True)
    (bundle / "manifest.json").write_text(json.dumps(data, indent=2))
    return bundle


# -- manifest.json --------------------------------------------------------------------------------------
def test_an_exported_manifest_reads_and_writes_back_the_same_text(llama_k1_export, tmp_path):
    """The exporter's manifest.json, read and written again: an equal model, the same text."""
    bundle = llama_k1_export[1]
    manifest = read_manifest(bundle)
    assert isinstance(manifest, Manifest) and manifest.format_version == 2
    assert [st.graph for st in manifest.stages] == ["early_text.onnx", "late_multimodal.onnx"]
    assert manifest.kv.num_kv_heads == 2 and manifest.llm.max_position_embeddings == 512
    assert manifest.encoders["image"].insert_at == 1 and manifest.quantization is None
    out = tmp_path / "again"
    out.mkdir()
    write_manifest(manifest, out)
    assert (out / "manifest.json").read_text() == (bundle / "manifest.json").read_text()
    assert read_manifest(out, check_files=False) == manifest


def test_a_manifest_round_trip(tmp_path):
    data = manifest_data(prompt_template="{instruction}")
    manifest = Manifest.model_validate(data)
    path = write_manifest(manifest, tmp_path)
    assert path.read_text() == json.dumps(data, indent=2)  # the exporter's layout: indented, keys in order
    assert read_manifest(tmp_path, check_files=False) == manifest


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m: m["kv"].update(num_kv_heads=-1), "kv.num_kv_heads: must be a positive integer, got -1"),
        (lambda m: m["llm"].update(hidden_size=True), "llm.hidden_size: must be a positive integer, got True"),
        (lambda m: m["stages"][0].update(start="0"), "stages[0].start: must be an integer >= 0, got '0'"),
        (lambda m: m["stages"][1].update(last=False), "stages: the last stage must have last: true"),
        (lambda m: m["stages"][1].pop("enter"), "stages[1].enter: missing"),
        (lambda m: m["encoders"]["image"].update(inputs="pixel_values"), "encoders.image.inputs: must be a list"),
        (lambda m: m["encoders"].clear(), "encoders: must name at least one encoder"),
        (
            lambda m: m["graphs"]["encoder.image.onnx"]["inputs"][0].update(shape=["batch", 1.5]),
            "graphs['encoder.image.onnx'].inputs[0].shape[1]: must be an axis size or name, got 1.5",
        ),
        (lambda m: m["generation"].update(pad_token_id=None), "generation.pad_token_id: must be an integer, got None"),
        (lambda m: m["generation"].update(max_new_tokens=0), "generation.max_new_tokens: must be > 0, got 0"),
        (lambda m: m.update(quantization={"scheme": "int8"}), "quantization.bits: missing"),
        (lambda m: m.update(extra=1), "extra: unknown key"),
        (lambda m: m["stages"][1].update(enter=["audio"]), "stages[1].enter: modalities without an encoder"),
        (
            lambda m: m["stages"][1].update(graph="late_multimodal.k9.onnx"),
            "stages/encoders name graphs the manifest does not list: ['late_multimodal.k9.onnx']",
        ),
        (
            lambda m: m["stages"][1].update(decode_graph="late_multimodal.decode.onnx"),
            "stages/encoders name graphs the manifest does not list: ['late_multimodal.decode.onnx']",
        ),
        (
            lambda m: (
                m["graphs"].update({"late_multimodal.decode.onnx": m["graphs"]["late_multimodal.onnx"]}),
                m["stages"][1].update(decode_graph="late_multimodal.decode.onnx"),
            ),
            "decode graphs come with decode_quantization or decode_attention fused (and those with decode graphs): "
            "one is missing",
        ),
        (
            lambda m: m.update(decode_attention="fused"),
            "decode graphs come with decode_quantization or decode_attention fused",
        ),
        (lambda m: m.update(decode_attention="flash"), "decode_attention: "),
        (
            lambda m: m["stages"][1].update(decode_graph="late_multimodal.onnx"),
            "stages[1].decode_graph: the stage's own graph; leave it out",
        ),
    ],
)
def test_a_bad_manifest_field_is_named_by_its_path(tmp_path, edit, message):
    data = manifest_data()
    edit(data)
    bundle = _bundle(tmp_path, data)
    with pytest.raises(InputError) as e:
        read_manifest(bundle, check_files=False)
    assert str(e.value).startswith(f"{bundle / 'manifest.json'}: {message}")
    assert "\n" not in str(e.value)


def test_a_manifest_without_the_optional_keys_loads_with_their_defaults(tmp_path):
    """Bundles written before quantization, the context length, the sliding window, the prompt
    template, the summary or the later generation settings were recorded still load; written
    back, they keep their keys."""
    data = manifest_data()
    for key in ("quantization", "tokenizer", "prompt_template", "summary"):
        data.pop(key, None)
    data["generation"] = {"max_new_tokens": 8, "eos_token_id": [2], "pad_token_id": 0, "banned_token_ids": []}
    bundle = _bundle(tmp_path, data)
    manifest = read_manifest(bundle, check_files=False)
    assert manifest.quantization is None and manifest.prompt_template is None and manifest.summary is None
    assert manifest.tokenizer == "tokenizer"
    assert manifest.llm.max_position_embeddings is None and manifest.llm.sliding_window is None
    assert manifest.generation.bos_token_id is None and manifest.graphs["early_text.onnx"].inputs[0].used is None
    spec = manifest.generation.spec()
    assert spec.max_new_tokens == 8 and spec.repetition_penalty == 1.0 and spec.num_return_sequences == 1
    assert dump_record(manifest) == data


def test_w8a8_records_of_earlier_versions_load(tmp_path):
    """w8a8 bundles written before the smoothing keys were renamed (outlier_channels,
    calibration_prompts) still load."""
    quantization = {
        "scheme": "w8a8",
        "bits": 8,
        "block_size": None,
        "accuracy_level": None,
        "lm_head": "w8a8",
        "method": "MatMulIntegerToFloat",
        "graphs": {"late_multimodal.onnx": {"quantized": 7, "kept": [], "smoothed": 7, "outlier_channels": 16}},
        "smoothing": {"alpha": 0.5, "calibration_prompts": 8},
    }
    manifest = read_manifest(_bundle(tmp_path, manifest_data(quantization=quantization)), check_files=False)
    assert manifest.quantization.scheme == "w8a8" and manifest.quantization.smoothing.calibration is None
    assert dump_record(manifest.quantization) == quantization


def test_the_runtime_reads_an_old_manifest(llama_k1_export, tmp_path):
    """The exported bundle with its optional keys removed still runs, with the defaults."""
    from composer.export.runtime import OnnxPipeline

    bundle = shutil.copytree(llama_k1_export[1], tmp_path / "b")
    data = json.loads((bundle / "manifest.json").read_text())
    for key in ("quantization", "prompt_template", "summary"):
        del data[key]
    del data["llm"]["max_position_embeddings"], data["llm"]["sliding_window"]
    (bundle / "manifest.json").write_text(json.dumps(data))
    pipe = OnnxPipeline(bundle)
    assert pipe.context_length is None and pipe.sliding_window is None and pipe.prompt_template is None
    assert pipe.num_tokens("image") == data["encoders"]["image"]["tokens_per_item"]


# -- composer.json ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A full and a trainable-only checkpoint of the same model."""
    root = tmp_path_factory.mktemp("meta")
    model = make_model("llama", insert_at=1)
    return model.save_pretrained(root / "full"), model.save_pretrained(root / "trainable", weights="trainable")


def test_checkpoint_meta_round_trip(checkpoints, tmp_path):
    full, trainable = checkpoints
    for ckpt in (full, trainable):
        meta = read_checkpoint_meta(ckpt)
        assert isinstance(meta, CheckpointMeta) and meta.insert_at == {"image": 1}
        out = tmp_path / ckpt.name
        out.mkdir()
        write_checkpoint_meta(meta, out)
        assert (out / "composer.json").read_text() == (ckpt / "composer.json").read_text()
        assert read_checkpoint_meta(out) == meta
    assert read_checkpoint_meta(full).weights == "full"
    assert "weights" not in json.loads((full / "composer.json").read_text())  # written for trainable-only ones
    meta = read_checkpoint_meta(trainable)
    assert meta.weights == "trainable" and meta.source_dir is None  # an inline spec: no directory


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m: m["placeholder_ids"].update(image="x"), "placeholder_ids.image: must be an integer, got 'x'"),
        (lambda m: m.update(weights="some"), "weights: must be 'full' or 'trainable', got 'some'"),
        (lambda m: m.pop("llm_config"), "llm_config: missing"),
        (lambda m: m.update(encoder_configs=[]), "encoder_configs: must be an object, got []"),
        (lambda m: m["summary"]["rows"][0].pop("kind"), "summary.rows[0].kind: missing"),
        (lambda m: m.update(colour="blue"), "colour: unknown key"),
    ],
)
def test_a_bad_checkpoint_meta_field_is_named_by_its_path(checkpoints, tmp_path, edit, message):
    ckpt = shutil.copytree(checkpoints[0], tmp_path / "c")
    data = json.loads((ckpt / "composer.json").read_text())
    edit(data)
    (ckpt / "composer.json").write_text(json.dumps(data))
    with pytest.raises(InputError) as e:
        read_checkpoint_meta(ckpt)
    assert str(e.value) == f"{ckpt / 'composer.json'}: {message}"


def test_a_checkpoint_without_the_optional_keys_loads(checkpoints, tmp_path):
    """composer.json written before the summary was recorded (and without insert_at) still loads:
    the insertion layers are spec.yaml's."""
    from composer.hub.card import base_model_relation
    from composer.model import ComposedModel

    ckpt = shutil.copytree(checkpoints[0], tmp_path / "c")
    data = json.loads((ckpt / "composer.json").read_text())
    del data["summary"], data["insert_at"]
    (ckpt / "composer.json").write_text(json.dumps(data, indent=2, sort_keys=True))
    meta = read_checkpoint_meta(ckpt)
    assert meta.summary is None and meta.insert_at is None and meta.weights == "full"
    assert dump_record(meta) == data
    assert ComposedModel.from_pretrained(ckpt).insert_at == {"image": 1}
    assert base_model_relation(ckpt, bundle=False) == "finetune"
