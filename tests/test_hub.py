"""Hub push and pull against a local fake Hub (tests/fake_hub.py, 127.0.0.1 only): checkpoints
and ONNX bundles round-trip bit-identically (same logits, same greedy tokens), model cards carry
the metadata, a push without write permission is one clear error and leaves the local model
untouched, `owner/name@rev` pins resolve to the commit the server reports and are saved, and
HF_HUB_OFFLINE=1 serves pulls and pinned builds from the cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from fake_hub import FakeHub
from helpers import CLIP, LLAMA, ROOT, images, make_model, spec_dict, write_tiny_gguf

from composer.builder import build
from composer.cli import main
from composer.errors import InputError, SpecError
from composer.hub import pull, push_to_hub
from composer.model import ComposedModel
from composer.spec import parse_spec

TOKEN = "hf_composer_test_token"
pytestmark = pytest.mark.filterwarnings(
    "ignore:Use 'content=:DeprecationWarning"
)  # inside huggingface_hub's LFS upload


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """huggingface_hub pointed at a fake Hub for this module: online, a token in HF_TOKEN, LFS
    uploads (``HF_HUB_DISABLE_XET``: with hf_xet installed every large file would go through xet)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    bars_were_off = are_progress_bars_disabled()
    disable_progress_bars()
    with FakeHub() as server, pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest turns it on for the other tests
        mp.setattr(constants, "HF_HUB_DISABLE_XET", True)
        mp.setenv("HF_HUB_OFFLINE", "0")
        mp.setenv("HF_ENDPOINT", server.url)  # read by composer.hub at call time
        mp.setenv("HF_TOKEN", TOKEN)
        mp.setenv("HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf-cache")))
        yield server
    if not bars_were_off:
        enable_progress_bars()


@pytest.fixture
def cache(hub, tmp_path, monkeypatch):
    """An empty HF cache for this test."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    hub.deny.clear()
    return tmp_path / "hf-cache"


@pytest.fixture
def deny(hub):
    """The fake Hub's refusals for this test only: the server is shared by the module, so a refusal
    left behind would make a later test fail with 403."""
    hub.deny.clear()
    yield hub.deny
    hub.deny.clear()


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _outputs(model, generate: bool = True):
    batch = model.prepare([model.format_prompt("what is it"), model.format_prompt("and this?")], image=list(images(2)))
    with torch.no_grad():
        return model(**batch).logits, model.generate(**batch, max_new_tokens=6, eos_token_id=[]) if generate else None


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _card(text: str):
    from huggingface_hub import ModelCard

    return ModelCard(text)


@pytest.fixture(scope="module")
def pushed(hub, tmp_path_factory):
    """A tiny checkpoint (llama, image at layer 2), pushed to alice/tiny-llava."""
    model = make_model("llama", insert_at=2)
    ckpt = model.save_pretrained(tmp_path_factory.mktemp("ckpt") / "tiny-llava")
    before = tree(ckpt)
    info = push_to_hub(ckpt, "alice/tiny-llava")
    return model, ckpt, before, info


def test_checkpoint_push_card_and_pull_round_trip(pushed, hub, cache, tmp_path, capsys):
    model, ckpt, before, info = pushed
    assert tree(ckpt) == before  # the local model is not touched (the card is written remotely only)
    repo = hub.repos["alice/tiny-llava"]
    assert repo.refs["main"] == info.oid
    files = hub.files("alice/tiny-llava")
    assert set(files) == set(before) | {"README.md", ".gitattributes", "config.json"}
    config = json.loads(files["config.json"])  # what the Hub shows as the architecture
    assert config["architectures"] == ["ComposedModel"] and config["modalities"]["image"]["insert_at"] == 2
    assert config["llm"]["model_type"] == "llama" and config["llm"]["num_hidden_layers"] == 4
    assert all(files[p] == before[p] for p in before)
    assert "model.safetensors" in repo.lfs_paths[info.oid]  # the large-file path (LFS batch + PUT + verify)
    writes = [
        (m, p, auth) for m, p, auth in hub.requests if "/commit/" in p or "/preupload/" in p or p.endswith("/create")
    ]
    assert writes and all(auth == f"Bearer {TOKEN}" for _, _, auth in writes)  # HF_TOKEN, as huggingface_hub reads it

    card = _card(files["README.md"].decode())
    assert card.data.library_name == "mm-composer" and card.data.pipeline_tag == "image-text-to-text"
    assert {"composer", "deepinsert", "multimodal", "image"} <= set(card.data.tags)
    assert card.data.base_model is None  # inline configs: no Hub base models
    assert (
        "| image.projector | mlp |" in card.text and "`image` enters at layer 2 of 4 (16 tokens per item)" in card.text
    )
    assert "prefill FLOPs saving" in card.text and 'ComposedModel.from_pretrained("alice/tiny-llava")' in card.text

    again = ComposedModel.from_pretrained("alice/tiny-llava")  # an empty cache: downloaded, then loaded
    (l1, g1), (l2, g2) = _outputs(model), _outputs(again)
    assert torch.equal(l1, l2) and torch.equal(g1, g2)
    assert (cache / "models--alice--tiny-llava" / "snapshots" / info.oid / "model.safetensors").is_file()
    import composer  # the one-liner takes Hub ids too

    img = str(ROOT / "specs/tiny/assets/red_circle.png")
    hub_answer = composer.pipeline("alice/tiny-llava")("What is it?", image=img, max_new_tokens=4)
    assert hub_answer == composer.pipeline(ckpt)("What is it?", image=img, max_new_tokens=4)

    out = tmp_path / "pulled"
    shutil.rmtree(cache)  # the pull writes into OUT only: no second copy in the HF cache
    with pytest.raises(SystemExit) as e:
        main(["pull", "alice/tiny-llava", "-o", str(out)])
    assert e.value.code == 0, capsys.readouterr().err
    assert info.oid in capsys.readouterr().out
    assert tree(out) == {**before, "README.md": files["README.md"], "config.json": files["config.json"]}
    assert not [p for p in cache.rglob("*") if p.is_file()]
    assert sorted(p.name for p in tmp_path.iterdir()) in (["pulled"], ["hf-cache", "pulled"])  # no temp dirs left
    with pytest.raises(InputError, match="exists and is not empty"):
        pull("alice/tiny-llava", out)

    # re-pushing a pulled dir regenerates composer's card; a card of one's own is pushed as written
    push_to_hub(out, "alice/copy")
    assert 'from_pretrained("alice/copy")' in hub.files("alice/copy")["README.md"].decode()
    (out / "README.md").write_text("---\nlicense: mit\n---\n# my notes\n")
    push_to_hub(out, "alice/copy")
    assert hub.files("alice/copy")["README.md"] == b"---\nlicense: mit\n---\n# my notes\n"


def test_model_push_to_branch_with_training_card_and_stale_files(hub, cache, tmp_path):
    from composer.train import TrainConfig

    model = make_model("opt", insert_at=1)
    ckpt = model.save_pretrained(tmp_path / "trained")
    cfg = TrainConfig(data=str(tmp_path / "data" / "train.jsonl"), output=str(ckpt), max_steps=3, stage=1)
    (ckpt / "train_config.json").write_text(json.dumps(cfg.model_dump()))
    (ckpt / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 5.0 - s}) + "\n" for s in (1, 2, 3)))
    (ckpt / "checkpoints").mkdir()
    (ckpt / "checkpoints" / "optimizer.safetensors").write_bytes(b"resume state stays local")
    info = push_to_hub(ckpt, "alice/trained", revision="v2", private=True)
    hub_repo = hub.repos["alice/trained"]
    assert hub_repo.private and hub_repo.refs["v2"] == info.oid and hub_repo.refs["main"] != info.oid
    files = hub.files("alice/trained", "v2")
    assert "metrics.jsonl" in files and not any(p.startswith("checkpoints/") or p == "train_config.json" for p in files)
    text = files["README.md"].decode()
    assert "on `train.jsonl`: stage 1 (projectors only), 3 steps" in text and "loss 4.0000 -> 2.0000" in text
    assert str(tmp_path) not in text  # the card names the data file, not local paths

    # a model object pushes the same way; files the revision had but the new push lacks are removed
    model.push_to_hub("alice/trained", revision="v2", commit_message="replace")
    files = hub.files("alice/trained", "v2")
    assert "metrics.jsonl" not in files and "No training record" in files["README.md"].decode()
    again = ComposedModel.from_pretrained("alice/trained@v2")
    assert _same_weights(model, again) and torch.equal(_outputs(model, False)[0], _outputs(again, False)[0])
    with pytest.raises(InputError, match="revision not found"):
        ComposedModel.from_pretrained("alice/trained", revision="v3")


def test_trainable_only_checkpoint_over_hub_sources(hub, cache, tmp_path):
    """A spec whose LLM and ViT are Hub repos (pinned to a revision) saves a
    trainable-only checkpoint (LoRA + projector), which pushes, pulls into a fresh dir and loads
    bit-identically, its frozen weights fetched from the pinned sources; the same checkpoint over
    local sources is refused at push (it would not load where pulled)."""
    from huggingface_hub import HfApi
    from test_checkpoint import _local_sources

    spec_file, _, _ = _local_sources(tmp_path / "src")
    api = HfApi(endpoint=hub.url)
    for name in ("llm", "vit"):
        api.create_repo(f"alice/tiny-{name}")
        api.upload_folder(folder_path=str(tmp_path / "src" / name), repo_id=f"alice/tiny-{name}")
    d = yaml.safe_load(spec_file.read_text())
    d["llm"].update(model="alice/tiny-llm@main", train="lora", lora={"r": 4, "alpha": 8, "target_modules": ["q_proj"]})
    d["modalities"]["image"]["encoder"]["model"] = "alice/tiny-vit@main"
    model = build(parse_spec(d)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    ckpt = model.save_pretrained(tmp_path / "small", weights="trainable")
    push_to_hub(ckpt, "alice/adapter")
    out, _ = pull("alice/adapter", tmp_path / "pulled")
    assert _same_weights(model, ComposedModel.from_pretrained(out))
    d["llm"]["model"] = str(tmp_path / "src" / "llm")
    local = build(parse_spec(d)).save_pretrained(tmp_path / "local", weights="trainable")
    with pytest.raises(InputError, match=r"llm.model is the local path .* would not load where it is pulled"):
        push_to_hub(local, "alice/adapter-local")


def test_pickles_are_left_out_of_pushes(hub, cache, tmp_path):
    """Torch pickles lying in a checkpoint's or a bundle's folders (a stray
    optimizer.pt, a tokenizer's .bin) are never uploaded; everything else is."""
    from composer.hub.sources import PICKLE_SUFFIXES

    model = make_model("llama", insert_at=1)
    ckpt = model.save_pretrained(tmp_path / "ckpt")
    stray = [f"tokenizer/extra{s}" for s in PICKLE_SUFFIXES] + [f"processors/image/state{s}" for s in PICKLE_SUFFIXES]
    for rel in stray:
        (ckpt / rel).write_bytes(b"\x80\x04 pickled")
    push_to_hub(ckpt, "alice/no-pickles")
    files = set(hub.files("alice/no-pickles"))
    assert not files & set(stray) and not any(f.endswith(PICKLE_SUFFIXES) for f in files)
    assert {"model.safetensors", "spec.yaml", "composer.json"} <= files and any(
        f.startswith("tokenizer/") for f in files
    )


def test_sharded_checkpoint_pushes_and_pulls(hub, cache, tmp_path):
    """A checkpoint saved in shards pushes every shard and the index, and pulls
    and loads back bit-identically."""
    model = make_model("llama", insert_at=2)
    ckpt = model.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    shards = sorted(p.name for p in ckpt.glob("model-*.safetensors"))
    assert len(shards) > 1
    push_to_hub(ckpt, "alice/sharded")
    files = hub.files("alice/sharded", "main")
    assert {*shards, "model.safetensors.index.json"} <= set(files) and "model.safetensors" not in files
    out, _ = pull("alice/sharded", tmp_path / "pulled")
    assert _same_weights(model, ComposedModel.from_pretrained(out))
    assert _same_weights(model, ComposedModel.from_pretrained("alice/sharded"))


@pytest.fixture(scope="module")
def bundle(llama_k1_export):
    return make_model("llama", insert_at=1), llama_k1_export[1]


def test_bundle_push_pull_same_greedy_tokens(hub, cache, bundle, tmp_path, capsys):
    from composer.export.runtime import OnnxPipeline

    model, path = bundle
    before = tree(path)
    with pytest.raises(SystemExit) as e:
        main(["push", str(path), "alice/tiny-llava-onnx"])
    assert e.value.code == 0, capsys.readouterr().err
    assert tree(path) == before
    repo = hub.repos["alice/tiny-llava-onnx"]
    assert {"late_multimodal.onnx.data", "early_text.onnx.data"} <= repo.lfs_paths[repo.refs["main"]]
    card = _card(hub.files("alice/tiny-llava-onnx")["README.md"].decode())
    assert "onnx" in card.data.tags and "OnnxPipeline" in card.text and "FLOPs saving" in card.text

    out, sha = pull("alice/tiny-llava-onnx", tmp_path / "pulled")
    assert sha == repo.refs["main"]
    assert {k: v for k, v in tree(out).items() if k not in ("README.md", "config.json")} == before
    assert json.loads((out / "config.json").read_text())["composer_format"] == "bundle"

    # a pull request with card metadata; excluding a file the bundle needs is refused
    main_before = repo.refs["main"]
    with pytest.raises(SystemExit) as e:
        main(["push", str(path), "alice/tiny-llava-onnx", "--create-pr", "--license", "apache-2.0",
              "--dataset", "alice/shapes", "--exclude", "README.md"])  # fmt: skip
    assert e.value.code == 0
    assert "opened a pull request on alice/tiny-llava-onnx: " in capsys.readouterr().out
    assert repo.refs["main"] == main_before and "refs/pr/1" in repo.refs
    pr_files, main_files = hub.files("alice/tiny-llava-onnx", "refs/pr/1"), hub.files("alice/tiny-llava-onnx")
    assert pr_files["README.md"] == main_files["README.md"]  # --exclude README.md: no new card
    push_to_hub(path, "alice/tiny-llava-onnx", create_pr=True, license="apache-2.0", datasets=["alice/shapes"])
    pr_card = _card(hub.files("alice/tiny-llava-onnx", "refs/pr/2")["README.md"].decode())
    assert pr_card.data.license == "apache-2.0" and pr_card.data.datasets == ["alice/shapes"]
    with pytest.raises(InputError, match=r"--exclude \S+\.onnx: the bundle needs it"):
        push_to_hub(path, "alice/tiny-llava-onnx", exclude=("*.onnx",))
    batch = model.prepare([model.format_prompt("tell me about it"), model.format_prompt("hi")], image=list(images(2)))
    want = model.generate(**batch, max_new_tokens=8, eos_token_id=[])
    got = OnnxPipeline(out).generate(**batch, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(got, want) and torch.equal(
        got, OnnxPipeline(path).generate(**batch, max_new_tokens=8, eos_token_id=[])
    )
    with pytest.raises(InputError, match="holds an ONNX bundle"):
        ComposedModel.from_pretrained("alice/tiny-llava-onnx")


@pytest.mark.parametrize("status", [401, 403])
def test_push_without_write_permission(hub, cache, deny, tmp_path, capsys, status):
    model = make_model("llama", insert_at=1)
    ckpt = model.save_pretrained(tmp_path / "ckpt")
    before = tree(ckpt)
    push_to_hub(ckpt, f"alice/locked-{status}")  # exists now; then the token loses write access
    deny.update(create=status, preupload=status, commit=status, lfs=status, branch=status)
    for repo_id in (f"alice/locked-{status}", f"bob/new-{status}"):  # an existing repo; a repo to create
        with pytest.raises(InputError) as e:
            push_to_hub(ckpt, repo_id)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"push to {repo_id}: permission denied") and f"HTTP {status}" in msg
    assert "bob/new-401" not in hub.repos and "bob/new-403" not in hub.repos
    with pytest.raises(SystemExit) as e:
        main(["push", str(ckpt), f"alice/locked-{status}", "--revision", "dev"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith(f"error: push to alice/locked-{status}@dev")
    assert tree(ckpt) == before and [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # untouched, nothing left over


def test_pickle_only_repo_is_refused(hub, cache):
    from huggingface_hub import HfApi

    model = make_model("llama", insert_at=1)
    api = HfApi(endpoint=hub.url)
    api.create_repo("mallory/pickled")
    api.upload_file(
        path_or_fileobj=json.dumps({"format_version": 1}).encode(),
        path_in_repo="composer.json",
        repo_id="mallory/pickled",
    )
    api.upload_file(path_or_fileobj=model.spec.to_yaml().encode(), path_in_repo="spec.yaml", repo_id="mallory/pickled")
    api.upload_file(
        path_or_fileobj=b"\x80\x04 pickled weights" * 400, path_in_repo="pytorch_model.bin", repo_id="mallory/pickled"
    )
    with pytest.raises(
        InputError, match=r"has no model.safetensors \(nor model.safetensors.index.json\); composer loads"
    ):
        ComposedModel.from_pretrained("mallory/pickled")
    assert not list(cache.rglob("pytorch_model.bin"))  # never downloaded


def _compose(*args, env):
    return subprocess.run(
        [sys.executable, "-m", "composer.cli", *map(str, args)], capture_output=True, text=True, env=env, timeout=120
    )


def test_cli_pull_with_env_and_offline_from_cache(pushed, hub, tmp_path):
    """A fresh process: HF_ENDPOINT is read by huggingface_hub at import; the online pull writes OUT
    alone (snapshot_download(local_dir=...)), leaving the HF cache empty; once the repo is in the
    cache (here: huggingface_hub's own download), HF_HUB_OFFLINE=1 pulls from the cache alone (no
    request reaches the server)."""
    _, _, before, info = pushed
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HUB_CACHE": str(tmp_path / "cache"),
        "HF_HOME": str(tmp_path / "home"),
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",
        "HF_TOKEN": TOKEN,
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    r = _compose("pull", f"alice/tiny-llava@{info.oid}", "-o", tmp_path / "a", env=env)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "cache").exists() or not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    fill = "from huggingface_hub import snapshot_download as s; s('alice/tiny-llava', revision=" + f"'{info.oid}')"
    r = subprocess.run([sys.executable, "-c", fill], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    n = len(hub.requests)
    r = _compose(
        "pull", "alice/tiny-llava", "--revision", info.oid, "-o", tmp_path / "b", env={**env, "HF_HUB_OFFLINE": "1"}
    )
    assert r.returncode == 0, r.stderr
    assert len(hub.requests) == n
    assert tree(tmp_path / "a") == tree(tmp_path / "b") and before.items() <= tree(tmp_path / "b").items()
    r = _compose("pull", "alice/never-pulled", "-o", tmp_path / "c", env={**env, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and [line for line in r.stderr.splitlines() if line.startswith("error")] == [
        r.stderr.splitlines()[0]
    ]
    assert (
        r.stderr.startswith("error: pull alice/never-pulled: not in the Hugging Face cache") and "offline" in r.stderr
    )


def _hf_components(seed: int, tmp: Path) -> tuple[Path, Path]:
    """A tiny HF llama (safetensors, plus a pickle copy that must not be downloaded) and a CLIP tower."""
    from transformers import AutoModelForCausalLM, CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel, LlamaConfig

    from composer.tokenizer import byte_tokenizer

    torch.manual_seed(seed)
    llm = AutoModelForCausalLM.from_config(LlamaConfig(**{k: v for k, v in LLAMA.items() if k != "model_type"}))
    llm.save_pretrained(tmp / f"llm{seed}")
    torch.save(llm.state_dict(), tmp / f"llm{seed}" / "pytorch_model.bin")
    byte_tokenizer().save_pretrained(tmp / f"llm{seed}")
    vit = CLIPVisionModel(CLIPVisionConfig(**{k: v for k, v in CLIP.items() if k != "model_type"}))
    vit.save_pretrained(tmp / "vit")
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp / "vit"
    )
    return tmp / f"llm{seed}", tmp / "vit"


def test_pinned_revisions_resolve_and_are_saved(hub, cache, tmp_path, monkeypatch):
    from huggingface_hub import HfApi, constants
    from safetensors.torch import load_file

    from composer.builder import build

    api = HfApi(endpoint=hub.url)
    llm_v1, vit = _hf_components(0, tmp_path)
    llm_v2, _ = _hf_components(1, tmp_path)
    api.create_repo("org/tiny-llm")
    api.upload_folder(folder_path=llm_v1, repo_id="org/tiny-llm")
    api.create_tag("org/tiny-llm", tag="v1")
    api.upload_folder(folder_path=llm_v2, repo_id="org/tiny-llm")  # main moves on
    api.create_repo("org/tiny-vit")
    api.upload_folder(folder_path=vit, repo_id="org/tiny-vit")
    sha_v1, sha_vit = hub.repos["org/tiny-llm"].refs["v1"], hub.repos["org/tiny-vit"].refs["main"]
    assert sha_v1 != hub.repos["org/tiny-llm"].refs["main"]

    d = spec_dict("llama", 2)
    d["llm"] = {"model": "org/tiny-llm@v1", "attn_implementation": "eager"}
    d["modalities"]["image"]["encoder"] = {"model": "org/tiny-vit@main", "feature_layer": -2}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(d))
    model = build(tmp_path / "spec.yaml")
    assert model.spec.llm.model == f"org/tiny-llm@{sha_v1}"
    assert model.spec.modalities["image"].encoder.model == f"org/tiny-vit@{sha_vit}"
    want = load_file(llm_v1 / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(model.llm.model.layers[0].self_attn.q_proj.weight, want)  # v1's weights, not main's
    assert not list(cache.rglob("pytorch_model.bin"))  # safetensors present: the pickle copy is not fetched
    saved = yaml.safe_load(model.save_pretrained(tmp_path / "out").joinpath("spec.yaml").read_text())
    assert saved["llm"]["model"] == f"org/tiny-llm@{sha_v1}"
    assert saved["modalities"]["image"]["encoder"]["model"] == f"org/tiny-vit@{sha_vit}"
    model.push_to_hub("alice/pinned")  # the card names the components' Hub repos, pins dropped
    assert _card(hub.files("alice/pinned")["README.md"].decode()).data.base_model == ["org/tiny-llm", "org/tiny-vit"]

    # offline: the same pins resolve from the cache (refs/v1, refs/main) without a request
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    n = len(hub.requests)
    offline = build(tmp_path / "spec.yaml")
    assert len(hub.requests) == n and offline.spec.llm.model == f"org/tiny-llm@{sha_v1}"
    assert _same_weights(offline, model)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")

    d["llm"]["model"] = "org/tiny-llm@nope"
    with pytest.raises(InputError, match=r"^llm.model: org/tiny-llm@nope: revision not found on http://127.0.0.1"):
        build(parse_spec(d))


def test_gguf_llm_from_a_hub_repo_file(hub, cache, tmp_path, monkeypatch):
    """``owner/name/file.gguf`` downloads the file into the HF cache and builds the same
    model as the local file; ``owner/name@v1/file.gguf`` takes the tagged commit's file and is
    saved pinned to its hash; offline, both build from the cache without a request; a file the
    repo lacks is one error naming the field."""
    from huggingface_hub import HfApi, constants

    from composer.builder import build

    pytest.importorskip("gguf")
    v1, v2 = write_tiny_gguf(tmp_path / "v1.gguf", seed=0), write_tiny_gguf(tmp_path / "v2.gguf", seed=1)
    api = HfApi(endpoint=hub.url)
    api.create_repo("org/tiny-gguf")
    api.upload_file(path_or_fileobj=v1, path_in_repo="tiny.F32.gguf", repo_id="org/tiny-gguf")
    api.create_tag("org/tiny-gguf", tag="v1")
    api.upload_file(path_or_fileobj=v2, path_in_repo="tiny.F32.gguf", repo_id="org/tiny-gguf")  # main moves on
    sha_v1 = hub.repos["org/tiny-gguf"].refs["v1"]

    def spec(model: str):
        d = spec_dict("llama", 1)
        d["llm"] = {"model": model}
        return parse_spec(d)

    main = build(spec("org/tiny-gguf/tiny.F32.gguf"))
    assert _same_weights(main, build(spec(str(v2))))
    assert main.tokenizer.chat_template.startswith("{% for m in messages %}")
    tagged = build(spec("org/tiny-gguf@v1/tiny.F32.gguf"))
    assert _same_weights(tagged, build(spec(str(v1)))) and not _same_weights(tagged, main)
    assert tagged.spec.llm.model == f"org/tiny-gguf@{sha_v1}/tiny.F32.gguf"
    assert main.spec.llm.model == "org/tiny-gguf/tiny.F32.gguf"
    assert len(list(cache.rglob("tiny.F32.gguf"))) == 2  # one snapshot per commit, in the HF cache
    tagged.push_to_hub("alice/from-gguf")  # the card names the GGUF's repo as the base model
    assert _card(hub.files("alice/from-gguf")["README.md"].decode()).data.base_model == ["org/tiny-gguf"]

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    n = len(hub.requests)
    assert _same_weights(build(spec("org/tiny-gguf@v1/tiny.F32.gguf")), tagged)
    assert _same_weights(build(spec("org/tiny-gguf/tiny.F32.gguf")), main)
    assert len(hub.requests) == n
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(InputError, match=r"^llm.model: org/tiny-gguf/other.gguf"):
        build(spec("org/tiny-gguf/other.gguf"))


@pytest.mark.parametrize(
    "field,value,path",
    [
        ("llm", "org/x@", "llm.model"),
        ("llm", "org/x@two words", "llm.model"),
        ("encoder", "org/v@a..b", "modalities.image.encoder.model"),
        ("weights", "org/w@", "modalities.image.projector.weights"),
        ("tokenizer", "org/t@x@y", "llm.tokenizer.model"),
    ],
)
def test_revision_syntax_errors_name_the_field(field, value, path):
    d = spec_dict("llama", 1)
    if field == "llm":
        d["llm"] = {"model": value}
    elif field == "encoder":
        d["modalities"]["image"]["encoder"] = {"model": value}
    elif field == "weights":
        d["modalities"]["image"]["projector"]["weights"] = value
    else:
        d["llm"]["tokenizer"] = {"model": value}
    with pytest.raises(SpecError) as e:
        parse_spec(d, "s.yaml")
    assert str(e.value).startswith(f"s.yaml: {path}: bad revision after '@'") and repr(value) in str(e.value)
    d2 = spec_dict("llama", 1)
    d2["llm"] = {"model": "org/x@refs/pr/1"}  # branches with slashes are fine
    assert parse_spec(d2).llm.model == "org/x@refs/pr/1"


def test_a_mistyped_local_path_says_neither_a_local_path_nor_a_hub_repo(hub, cache, tmp_path, monkeypatch):
    """`composer.pipeline("pl/nonexistent")`: not a local path, so a Hub repo id; the Hub answers 404
    and the error says both: no such local directory, no such repo (not "cannot be reached")."""
    import composer

    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError) as e:
        composer.pipeline("pl/nonexistent")
    msg = str(e.value)
    assert "pl/nonexistent: no such local directory" in msg and "no such repo" in msg, msg
    assert "cannot be reached" not in msg
