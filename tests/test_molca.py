"""MolCA: RDKit featurisation, the GIN against a per-molecule pretrain-gnns reference, padding
never reaching the Q-Former, pretrain-gnns weights, the tiny twin (training, cached generation,
CLI) and its ONNX bundle (verify_bundle, ONNX Runtime on molecules of other sizes)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from composer.adapters.molecule import GinConfig, GinEncoder, MoleculeProcessor, featurize
from composer.builder import build, build_encoder
from composer.errors import InputError, SpecError
from composer.spec import EncoderSpec, load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "specs/tiny/molca.yaml"
ASPIRIN = "CC(=O)Oc1ccccc1C(=O)O"
MOLECULES = ["CCO", "c1ccccc1", ASPIRIN, "F/C=C/F", "C[C@H](N)O", "[Na+].[Cl-]"]


def tiny_model():
    return build(load_spec(TINY))


# -- featurisation --------------------------------------------------------------------------------
def test_featurize_known_molecules():
    atoms, bonds = featurize("CCO")  # C, C, O: atomic number - 1; all single bonds, no direction
    assert atoms == [(5, 0), (5, 0), (7, 0)] and bonds == [(0, 1, 0, 0), (1, 2, 0, 0)]
    atoms, bonds = featurize("c1ccccc1")
    assert len(atoms) == 6 and len(bonds) == 6 and {b[2] for b in bonds} == {3}  # aromatic
    _, bonds = featurize("F/C=C/F")
    assert [b[2:] for b in bonds] == [(0, 1), (1, 0), (0, 1)]  # single ENDUPRIGHT, double, single ENDUPRIGHT
    atoms, _ = featurize("C[C@H](N)O")
    assert [a[1] for a in atoms] == [0, 2, 0, 0]  # CHI_TETRAHEDRAL_CCW
    atoms, bonds = featurize("[Na+].[Cl-]")  # two fragments, no bonds
    assert atoms == [(10, 0), (16, 0)] and bonds == []

    batch = MoleculeProcessor()(["CCO", "c1ccccc1", "[Na+].[Cl-]"])
    assert batch["atom_features"].shape == (3, 6, 2) and batch["bond_features"].shape == (3, 6, 6, 2)
    assert batch["atom_mask"].sum(1).tolist() == [3, 6, 2]
    adj = batch["adjacency"]
    assert torch.equal(adj, adj.transpose(1, 2)) and adj.sum((1, 2)).tolist() == [4, 12, 0]
    assert adj[1].sum(1).tolist() == [2] * 6 and (batch["bond_features"][1, ..., 0][adj[1].bool()] == 3).all()
    assert batch["atom_features"][0, 3:].abs().sum() == 0 and batch["bond_features"][0, 3:].abs().sum() == 0


@pytest.mark.parametrize(
    "item,match",
    [
        ("C1CC", r"^invalid SMILES 'C1CC': RDKit cannot parse it$"),
        ("not a molecule", r"^invalid SMILES 'not a molecule'"),
        ("*CC", r"^SMILES '\*CC': atom 0 has atomic number 0"),
        ("", r"^SMILES '' has no atoms$"),
        (42, r"^a molecule must be a SMILES string, got int$"),
    ],
)
def test_bad_molecules_are_one_line_input_errors(item, match):
    with pytest.raises(InputError, match=match) as e:
        MoleculeProcessor()(["CCO", item])
    assert "\n" not in str(e.value)


def test_max_atoms():
    with pytest.raises(InputError, match=re.escape(f"molecule {ASPIRIN!r} has 13 atoms; this processor allows 8")):
        MoleculeProcessor(max_atoms=8)(["CCO", ASPIRIN])
    # a default limit: a 120k-atom SMILES would take minutes to parse and hundreds of GB to encode
    with pytest.raises(InputError, match="has 600 atoms; this processor allows 512 .max_atoms."):
        MoleculeProcessor()(["C" * 600])
    with pytest.raises(InputError, match="SMILES of 120000 characters: longer than any molecule of at most 512"):
        MoleculeProcessor()(["C" * 120_000])


# -- the GIN against an independent pretrain-gnns reference -------------------------------------------
def reference_gin(enc: GinEncoder, smiles: list[str], train: bool) -> list[torch.Tensor]:
    """pretrain-gnns ``GNN.forward`` + MolCA's graph token and ``ln_graph``, written as PyG runs
    it: all molecules' atoms in one list, an edge list with both directions and self-loops,
    messages summed edge by edge, batch norm over the atom list."""
    c = enc.config
    xs, graph_of, edges = [], [], []
    for g, s in enumerate(smiles):
        atoms, bonds = featurize(s)
        off = len(xs)
        xs += atoms
        graph_of += [g] * len(atoms)
        for i, j, t, d in bonds:
            edges += [(off + i, off + j, t, d), (off + j, off + i, t, d)]
    edges += [(v, v, c.self_loop_bond_type, 0) for v in range(len(xs))]
    x = torch.tensor(xs)
    h = enc.x_embedding1.weight[x[:, 0]] + enc.x_embedding2.weight[x[:, 1]]
    for layer in range(c.num_layers):
        conv, bn = enc.gnns[layer], enc.batch_norms[layer]
        aggr = torch.zeros_like(h)
        for src, dst, t, d in edges:
            aggr[dst] = aggr[dst] + h[src] + conv.edge_embedding1.weight[t] + conv.edge_embedding2.weight[d]
        h = conv.mlp(aggr)
        h = F.batch_norm(h, bn.running_mean.clone(), bn.running_var.clone(), bn.weight, bn.bias, train, 0.1, bn.eps)
        if layer < c.num_layers - 1:
            h = torch.relu(h)
    out = []
    for g in range(len(smiles)):
        nodes = h[torch.tensor(graph_of) == g]
        tokens = torch.cat([nodes.mean(0, keepdim=True), nodes])
        out.append(F.layer_norm(tokens, (c.emb_dim,), enc.ln_graph.weight, enc.ln_graph.bias, enc.ln_graph.eps))
    return out


def _random_gin() -> GinEncoder:
    torch.manual_seed(0)
    enc = GinEncoder(GinConfig(num_layers=3, emb_dim=16), feature_layer=-1, select="all")
    with torch.no_grad():
        for bn in enc.batch_norms:
            bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(), bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2)
        enc.ln_graph.weight.uniform_(0.5, 1.5), enc.ln_graph.bias.normal_()
    return enc


@pytest.mark.parametrize("train", [False, True])
def test_gin_equals_per_molecule_reference(train):
    # float64 in training: batch statistics over ~30 atoms amplify float32 rounding to ~5e-6
    enc = _random_gin().train(train).to(torch.float64 if train else torch.float32)
    batch = MoleculeProcessor()(MOLECULES)
    with torch.no_grad():
        want = reference_gin(enc, MOLECULES, train)
        got = enc(**batch)  # (6, 1 + 13, 16)
    assert got.shape == (len(MOLECULES), 1 + 13, 16)
    for g, ref in enumerate(want):
        n = ref.shape[0]
        assert (got[g, :n] - ref).abs().max() < 1e-5, MOLECULES[g]
        assert (got[g, n:] == 0).all()  # padding rows exactly zero


def test_frozen_gin_keeps_running_statistics_in_training():
    enc = _random_gin()
    batch = MoleculeProcessor()(MOLECULES[:3])
    with torch.no_grad():
        want = enc.eval()(**batch)
    enc.requires_grad_(False).train()
    with torch.no_grad():
        got = enc(**batch)
    assert torch.equal(got, want)


def test_select_patch_and_feature_layer():
    enc = _random_gin().eval()
    batch = MoleculeProcessor()(["CCO", ASPIRIN])
    patch = GinEncoder(enc.config, feature_layer=2, select="patch").eval()
    patch.load_state_dict(enc.state_dict())
    with torch.no_grad():
        out = patch(**batch)
    assert out.shape == (2, 13, 16) and (out[0, 3:] == 0).all() and (out[0, :3] != 0).any(-1).all()
    with pytest.raises(ValueError, match="feature_layer must be in"):
        GinEncoder(enc.config, feature_layer=5)


# -- padding never reaches the Q-Former --------------------------------------------------------------------
def test_padded_atoms_do_not_change_qformer_tokens(twin):
    model = twin.eval()
    alone = model.encoders["molecule"].preprocess(model.processors["molecule"], ["CCO"])
    batched = model.encoders["molecule"].preprocess(model.processors["molecule"], ["CCO", ASPIRIN])
    with torch.no_grad():
        a = model.encode("molecule", alone)  # (1, 8, 64): 4 encoder rows
        b = model.encode("molecule", batched)  # (2, 8, 64): 14 encoder rows, 10 of them padding for CCO
        feats = model.encoders["molecule"](**batched)
        unmasked = model.projectors["molecule"](feats, torch.ones(feats.shape[:2]))
    assert a.shape == (1, 8, 64) and (a[0] - b[0]).abs().max() < 1e-5
    assert (unmasked[0] - a[0]).abs().max() > 1e-3  # the mask is what keeps the padding out


# -- pretrain-gnns / MolCA weights -----------------------------------------------------------------------------
def pretrain_gnns_state(num_layers: int = 3, d: int = 32, prefix: str = "") -> dict[str, torch.Tensor]:
    """A state dict with pretrain-gnns' ``GNN`` keys and shapes (as GraphCL's graphcl_80.pth)."""
    g = torch.Generator().manual_seed(5)
    s = {"x_embedding1.weight": torch.randn(120, d, generator=g), "x_embedding2.weight": torch.randn(3, d, generator=g)}
    for i in range(num_layers):
        s |= {
            f"gnns.{i}.mlp.0.weight": torch.randn(2 * d, d, generator=g),
            f"gnns.{i}.mlp.0.bias": torch.randn(2 * d, generator=g),
            f"gnns.{i}.mlp.2.weight": torch.randn(d, 2 * d, generator=g),
            f"gnns.{i}.mlp.2.bias": torch.randn(d, generator=g),
            f"gnns.{i}.edge_embedding1.weight": torch.randn(6, d, generator=g),
            f"gnns.{i}.edge_embedding2.weight": torch.randn(3, d, generator=g),
            f"batch_norms.{i}.weight": torch.rand(d, generator=g),
            f"batch_norms.{i}.bias": torch.randn(d, generator=g),
            f"batch_norms.{i}.running_mean": torch.randn(d, generator=g),
            f"batch_norms.{i}.running_var": torch.rand(d, generator=g) + 0.5,
            f"batch_norms.{i}.num_batches_tracked": torch.tensor(1000),
        }
    return {prefix + k: v for k, v in s.items()}


def test_pretrain_gnns_pth_loads_through_the_spec(tmp_path):
    state = pretrain_gnns_state()
    torch.save(state, tmp_path / "graphcl_80.pth")
    spec = yaml.safe_load(TINY.read_text())
    spec["modalities"]["molecule"]["encoder"] = {"type": "gin", "model": str(tmp_path / "graphcl_80.pth")}
    model = build(parse_spec(spec))
    enc = model.encoders["molecule"]
    assert enc.config == GinConfig(num_layers=3, emb_dim=32)  # inferred from the tensors
    own = enc.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items())
    assert torch.equal(own["ln_graph.weight"], torch.ones(32)) and torch.equal(own["ln_graph.bias"], torch.zeros(32))


def test_molca_prefixed_safetensors_dir_with_config(tmp_path):
    from safetensors.torch import save_file

    state = pretrain_gnns_state(num_layers=2, d=16, prefix="graph_encoder.")
    state |= {"ln_graph.weight": torch.full((16,), 2.0), "ln_graph.bias": torch.full((16,), 0.5)}
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text('{"num_layers": 2, "emb_dim": 16, "self_loop_bond_type": 0}')
    enc, proc = build_encoder(EncoderSpec(type="gin", model=str(tmp_path), select="all"), "molecule.encoder", None)
    assert enc.config.self_loop_bond_type == 0 and isinstance(proc, MoleculeProcessor)
    assert torch.equal(enc.gnns[1].edge_embedding2.weight, state["graph_encoder.gnns.1.edge_embedding2.weight"])
    assert torch.equal(enc.ln_graph.weight, torch.full((16,), 2.0))


def test_bad_gin_weights(tmp_path):
    spec = EncoderSpec(type="gin", model=str(tmp_path / "w.pth"))
    state = pretrain_gnns_state()
    torch.save({k: v for k, v in state.items() if k != "gnns.1.mlp.2.bias"}, tmp_path / "w.pth")
    with pytest.raises(
        InputError,
        match=r"^modalities.molecule.encoder.model: cannot load '.*w.pth': .*w.pth: "
        r"keys do not match the GIN \(missing \['gnns.1.mlp.2.bias'\], unexpected \[\]\)$",
    ):
        build_encoder(spec, "modalities.molecule.encoder", None)
    torch.save(state | {"gnns.0.mlp.0.bias": torch.zeros(3)}, tmp_path / "w.pth")
    with pytest.raises(InputError, match=r"gnns.0.mlp.0.bias has shape \(3,\), the GIN needs \(64,\)"):
        build_encoder(spec, "e", None)
    torch.save({"linear.weight": torch.zeros(2, 2)}, tmp_path / "w.pth")
    with pytest.raises(InputError, match="not a pretrain-gnns GIN state dict"):
        build_encoder(spec, "e", None)
    (tmp_path / "w.pth").write_bytes(b"PK\x03\x04truncated")
    with pytest.raises(InputError, match="w.pth: cannot read GIN weights"):
        build_encoder(spec, "e", None)


# -- spec ---------------------------------------------------------------------------------------------------------
def test_specs_validate():
    real = load_spec(ROOT / "specs/molca.yaml")
    mol = real.modalities["molecule"]
    assert real.llm.model == "facebook/galactica-1.3b" and real.llm.train == "lora"
    assert mol.encoder.type == "gin" and mol.projector.type == "qformer" and mol.projector.num_queries == 32
    tiny = load_spec(TINY)
    assert tiny.modalities["molecule"].encoder.config == {"num_layers": 3, "emb_dim": 32}
    bad = yaml.safe_load(TINY.read_text())
    bad["modalities"]["molecule"]["projector"] = {"type": "mlp"}
    with pytest.raises(SpecError, match=r"modalities.molecule.projector.type: the gin encoder gives a variable number"):
        parse_spec(bad, "bad.yaml")
    bad = yaml.safe_load(TINY.read_text())
    del bad["modalities"]["molecule"]["encoder"]["type"]
    with pytest.raises(SpecError, match=r"config.model_type: not a supported encoder.*set `type` to one of \['gin'\]"):
        parse_spec(bad, "bad.yaml")


# -- the tiny twin -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def twin():
    return tiny_model().eval()


def _batch(model, padding_side="left"):
    prompts = [model.format_prompt("CCO"), model.format_prompt(ASPIRIN)]
    return model.prepare(prompts, molecule=["CCO", ASPIRIN], padding_side=padding_side)


def test_tiny_twin_trains():
    model = tiny_model().train()
    batch = _batch(model, "right")
    assert batch["molecule"]["atom_features"].shape == (2, 13, 2)
    params = [p for p in model.parameters() if p.requires_grad]
    trained = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"llm", "encoders", "projectors"}
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for _ in range(4):
        loss = model(**batch, labels=batch["input_ids"]).loss
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


def test_compose_train_reads_smiles_records(tmp_path):
    """Training data names molecules by SMILES (`{"molecule": "CCO", ...}`), not by file: `compose train`
    on the tiny MolCA twin reads them and trains; an empty molecule string is that record's error,
    naming file:line."""
    from helpers import run_cli

    data = tmp_path / "train.jsonl"
    named = [("CCO", "ethanol"), ("c1ccccc1", "benzene"), (ASPIRIN, "aspirin"), ("CC(=O)O", "acetic acid")]
    rows = [{"molecule": smi, "prompt": "What is it?", "response": name} for smi, name in named]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run_cli("train", TINY, "--data", data, "-o", tmp_path / "run", "--max-steps", "2", "--batch-size", "2")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "run" / "composer.json").is_file()
    data.write_text(data.read_text() + json.dumps({"molecule": "", "prompt": "x", "response": "y"}) + "\n")
    r = run_cli("train", TINY, "--data", data, "-o", tmp_path / "run2", "--max-steps", "2")
    assert r.returncode == 2 and f"{data}:5: `molecule` must be a non-empty string" in r.stderr


def test_cached_generation_equals_uncached(twin):
    model = twin.eval()
    batch = _batch(model)
    assert batch["attention_mask"][0, 0] == 0  # left padding
    cached = model.generate(**batch, max_new_tokens=5, eos_token_id=[])
    uncached = model.generate(**batch, max_new_tokens=5, eos_token_id=[], use_cache=False)
    assert cached.shape == (2, 5) and torch.equal(cached, uncached)


def test_cli_generate_takes_smiles(twin, tmp_path, capsys):
    from composer.cli import main

    ckpt = twin.save_pretrained(tmp_path / "ckpt")
    batch = twin.prepare([twin.format_prompt("CCO")], molecule=["CCO"])
    want = twin.decode(twin.generate(**batch, max_new_tokens=3))[0]
    with pytest.raises(SystemExit) as e:
        main(["generate", str(ckpt), "--molecule", "CCO", "--prompt", "CCO", "--max-new-tokens", "3"])
    out = capsys.readouterr()
    assert e.value.code == 0 and out.out == want + "\n", out.err
    with pytest.raises(SystemExit) as e:
        main(["generate", str(ckpt), "--molecule", "C1CC", "--prompt", "CCO"])
    assert e.value.code == 2 and capsys.readouterr().err == "error: invalid SMILES 'C1CC': RDKit cannot parse it\n"


# -- ONNX ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(twin, tmp_path_factory):
    from composer.export.exporter import export_onnx

    return export_onnx(twin.eval(), tmp_path_factory.mktemp("molca") / "bundle")


@pytest.mark.slow
def test_onnx_bundle_verifies(twin, exported):
    from composer.cli.generate import _text_modalities
    from composer.export.verify import verify_bundle

    report = verify_bundle(twin.eval(), exported)
    assert report["ok"], report
    assert _text_modalities(str(exported)) == {"molecule"}


@pytest.mark.slow
def test_onnx_encoder_and_generation_on_other_sizes(twin, exported):
    from composer.export.runtime import OnnxPipeline

    model, pipe = twin.eval(), OnnxPipeline(exported)
    for smiles in (["[Na+].[Cl-]"], MOLECULES):  # 1 item, 2 atoms; 6 items, 13 atoms (traced: 3 items, 7 atoms)
        feats = pipe.prepare([pipe.format_prompt("x")] * len(smiles), molecule=smiles)["molecule"]
        with torch.no_grad():
            want = model.encode("molecule", feats).numpy()
        assert np.abs(pipe.encode("molecule", feats) - want).max() < 1e-4
    batch = _batch(model)
    assert torch.equal(
        pipe.generate(**batch, max_new_tokens=6, eos_token_id=[]),
        model.generate(**batch, max_new_tokens=6, eos_token_id=[]),
    )
