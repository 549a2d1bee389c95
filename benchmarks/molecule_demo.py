"""Train the molecule demo that ``specs/smol/molca_bert_demo.yaml`` ships: rxnfp's pretrained SMILES BERT
(frozen) read by a 16-query Q-Former, molecule tokens entering SmolLM2-135M-Instruct at layer 8 of 30,
with rank-16 LoRA on the query and value projections of layers 8-29 (the layers the molecule tokens
pass through; layers 0-7 stay the pretrained model's).

The task is offline and its answers are computed by RDKit: molecules are built from scaffolds (chains,
saturated and aromatic rings, fused rings) with zero to three substituents, and each gets six
questions with one-word answers: how many rings (zero to three), aromatic, nitrogen, halogen, a
hydroxyl group, a carboxylic acid (yes/no). A fifth of the distinct molecules are held out; the held-
out questions are balanced per kind (as many "yes" as "no"; ring counts as they come), so chance is
50% on the yes/no kinds.

Training records are multi-turn (several questions about one molecule), mixed with text-only
questions answered by the pretrained LLM itself (``--text-mix``) so the adapters keep its text
answers. The held-out accuracy per kind, with the majority-answer baseline, goes to
OUT/results.json; the weights to ``--demo-out`` (default specs/smol/demo_molecule, the shipped ones):
``projector.safetensors`` and ``llm_lora.safetensors``.

    python benchmarks/molecule_demo.py --out out/molecule-demo --threads 2
    python benchmarks/molecule_demo.py --out /tmp/m --quick        # a smoke run
"""

from __future__ import annotations

import argparse
import functools
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deepinsert_quality as dq  # noqa: E402
import train_demo as td  # noqa: E402

ROOT = dq.ROOT
SPEC = ROOT / "specs" / "smol" / "molca_bert_demo.yaml"
DEMO_OUT = ROOT / "specs" / "smol" / "demo_molecule"
SCAFFOLDS = (  # (SMILES, weight): acyclic chains, one ring, two rings, three rings
    *[(s, 1) for s in ("C", "CC", "CCC", "CCCC", "CCCCC", "CC(C)C", "CCOCC", "CC(C)CC")],
    *[(s, 1) for s in ("c1ccccc1", "C1CCCCC1", "c1ccncc1", "C1CCOC1", "c1ccoc1", "c1ccsc1", "C1CC1", "C1CCNCC1")],
    *[(s, 2) for s in ("c1ccc2ccccc2c1", "C1CCC2CCCCC2C1", "c1ccc(cc1)-c1ccccc1", "c1ccc2[nH]ccc2c1")],
    *[(s, 2) for s in ("C1CCC(CC1)C1CCCCC1", "c1ccc(cc1)C1CCCC1", "c1ccc2ncccc2c1")],
    *[(s, 3) for s in ("c1ccc2cc3ccccc3cc2c1", "c1ccc2c(c1)Cc1ccccc1-2", "C1CCC2C(C1)CCC1CCCCC12")],
)
SUBSTITUENTS = (  # (SMILES, weight): alkyl, hydroxyl, amine, halogens, acid, ketone, ether, nitrile, ...
    ("C", 2), ("CC", 1), ("O", 3), ("N", 2), ("Cl", 2), ("F", 1), ("Br", 1),
    ("C(=O)O", 3), ("C(=O)C", 1), ("OC", 1), ("C#N", 1), ("C=C", 1), ("S", 1),
)  # fmt: skip
RING_WORDS = ("zero", "one", "two", "three")
QUESTIONS = {  # kind -> question
    "rings": "How many rings does this molecule have?",
    "aromatic": "Is this molecule aromatic?",
    "nitrogen": "Does it contain nitrogen?",
    "halogen": "Does it contain a halogen?",
    "hydroxyl": "Does it have a hydroxyl group?",
    "acid": "Is it a carboxylic acid?",
}
KINDS = tuple(QUESTIONS)


def _rdkit():
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    return Chem


def make_molecule(rng: random.Random) -> str:
    """A scaffold with zero to three substituents on its carbons that carry hydrogens -> canonical SMILES."""
    Chem = _rdkit()
    scaffolds, sw = zip(*SCAFFOLDS, strict=True)
    subs, uw = zip(*SUBSTITUENTS, strict=True)
    mol = Chem.MolFromSmiles(rng.choices(scaffolds, sw)[0])
    for _ in range(rng.choice((0, 1, 1, 2, 2, 3))):
        sites = [a.GetIdx() for a in mol.GetAtoms() if a.GetSymbol() == "C" and a.GetTotalNumHs() > 0]
        if not sites:
            break
        rw = Chem.RWMol(Chem.CombineMols(mol, Chem.MolFromSmiles(rng.choices(subs, uw)[0])))
        rw.AddBond(rng.choice(sites), mol.GetNumAtoms(), Chem.BondType.SINGLE)
        mol = rw.GetMol()
        Chem.SanitizeMol(mol)
    return Chem.MolToSmiles(mol)


@functools.cache  # the training molecules' facts serve both the records and the Q-Former's pretraining
def facts(smiles: str) -> dict[str, str]:
    """RDKit's answers to every question about one molecule (a shared dict: read it, do not change it)."""
    Chem = _rdkit()
    from rdkit.Chem import rdMolDescriptors

    mol = Chem.MolFromSmiles(smiles)
    has = lambda smarts: mol.HasSubstructMatch(Chem.MolFromSmarts(smarts))  # noqa: E731
    yes = lambda b: "yes" if b else "no"  # noqa: E731
    return {
        "rings": RING_WORDS[min(rdMolDescriptors.CalcNumRings(mol), 3)],
        "aromatic": yes(any(a.GetIsAromatic() for a in mol.GetAtoms())),
        "nitrogen": yes(any(a.GetSymbol() == "N" for a in mol.GetAtoms())),
        "halogen": yes(any(a.GetSymbol() in ("F", "Cl", "Br", "I") for a in mol.GetAtoms())),
        "hydroxyl": yes(has("[OX2H1][#6;!$([#6]=O)]")),  # alcohol or phenol O-H, not an acid's
        "acid": yes(has("[CX3](=O)[OX2H1]")),
    }


def split_molecules(n: int, seed: int, test_share: float = 0.2) -> tuple[list[str], list[str]]:
    """About ``n`` distinct molecules (RDKit-canonical) -> (training, held-out), split by molecule."""
    rng = random.Random(seed)
    seen: dict[str, None] = {}
    for _ in range(4 * n):
        seen.setdefault(make_molecule(rng), None)
        if len(seen) >= n:
            break
    pool = list(seen)
    rng.shuffle(pool)
    k = round(len(pool) * test_share)
    return pool[k:], pool[:k]


def conversations(molecules: list[str], n: int, turns: int, rng: random.Random, balanced: bool = True) -> list[dict]:
    """n multi-turn LLaVA-format records: a molecule and ``turns`` of its questions. ``balanced``: each
    record's first question is of a random kind and its answer is drawn uniformly from that kind's
    answers (then a molecule with that answer), so no kind is learned as "always no"; otherwise the
    molecule is drawn uniformly and the answers come as the molecules have them."""
    table = {smi: facts(smi) for smi in molecules}
    by_answer: dict[str, dict[str, list[str]]] = {kind: {} for kind in KINDS}
    for smi, f in table.items():
        for kind in KINDS:
            by_answer[kind].setdefault(f[kind], []).append(smi)
    out = []
    for _ in range(n):
        if balanced:
            first = rng.choice(KINDS)
            smi = rng.choice(by_answer[first][rng.choice(sorted(by_answer[first]))])
            kinds = [first, *rng.sample([k for k in KINDS if k != first], turns - 1)]
        else:
            smi = rng.choice(molecules)
            kinds = rng.sample(KINDS, turns)
        f = table[smi]
        conv = []
        for j, kind in enumerate(kinds):
            q = ("<molecule>\n" if j == 0 else "") + QUESTIONS[kind]
            conv += [{"from": "human", "value": q}, {"from": "gpt", "value": f[kind]}]
        out.append({"molecule": smi, "conversations": conv})
    return out


def held_out_questions(molecules: list[str], per_kind: int, seed: int) -> list[dict]:
    """``per_kind`` single questions per kind on held-out molecules, yes and no balanced per kind."""
    rng = random.Random(seed)
    table = [(smi, facts(smi)) for smi in molecules]
    out = []
    for kind in KINDS:
        by_answer: dict[str, list[str]] = {}
        for smi, f in table:
            by_answer.setdefault(f[kind], []).append(smi)
        if kind != "rings":  # as many yes as no
            m = min(per_kind // 2, *(len(v) for v in by_answer.values()))
            picked = [(smi, a) for a, v in by_answer.items() for smi in rng.sample(v, m)]
        else:
            picked = [(smi, f[kind]) for smi, f in rng.sample(table, min(per_kind, len(table)))]
        out += [{"item": smi, "kind": kind, "prompt": QUESTIONS[kind], "response": a} for smi, a in picked]
    return out


def pretrain_qformer(model, molecules: list[str], steps: int, seed: int, say, batch: int = 32) -> dict:
    """BLIP-2's and MolCA's stage 1 in small: the Q-Former alone learns to represent molecules before
    it meets the LLM. A linear readout of its mean output token predicts the training molecules'
    RDKit facts (the yes/no kinds, and the ring count); the readout is then dropped. Connected to
    the LLM from its random init, the Q-Former's output barely varied between molecules (its
    between-molecule spread ~1% of its size after 800 steps) and the answers fell to the majority;
    trained alone it reads every fact of held-out molecules at 98-100% in a few hundred steps.
    -> the readout's loss at the start and the end."""
    import torch

    torch.manual_seed(seed)
    encoder, processor, qformer = (d["molecule"] for d in (model.encoders, model.processors, model.projectors))
    with torch.no_grad():
        chunks = [encoder(**processor(molecules[i : i + 64])) for i in range(0, len(molecules), 64)]
    width = max(c.shape[1] for c in chunks)  # padded rows are exactly zero: the Q-Former masks them
    feats = torch.cat([torch.nn.functional.pad(c, (0, 0, 0, width - c.shape[1])) for c in chunks])
    table = [facts(smi) for smi in molecules]
    binary = [kind for kind in KINDS if kind != "rings"]
    yes = torch.tensor([[f[kind] == "yes" for kind in binary] for f in table], dtype=torch.float32)
    rings = torch.tensor([RING_WORDS.index(f["rings"]) for f in table])
    head = torch.nn.Linear(model.adapter.shape.hidden_size, len(binary) + len(RING_WORDS))
    params = [p for p in qformer.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=5e-4)
    qformer.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(molecules), (batch,))
        logits = head(qformer(feats[idx]).mean(1))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, : len(binary)], yes[idx])
        loss = loss + torch.nn.functional.cross_entropy(logits[:, len(binary) :], rings[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    say(f"Q-Former pretrained {steps} steps: readout loss {losses[0]:.3f} -> {sum(losses[-20:]) / 20:.3f}")
    return {"steps": steps, "loss_first": losses[0], "loss_last_20": sum(losses[-20:]) / 20}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    td.item_demo_args(ap, "out/molecule-demo", SPEC, DEMO_OUT)
    ap.add_argument("--molecules", type=int, default=2000, help="distinct molecules (a fifth held out)")
    ap.add_argument("--qformer-steps", type=int, default=300, help="Q-Former pretraining steps (0: none)")
    ap.add_argument("--unbalanced", action="store_true", help="draw training molecules uniformly (see conversations)")
    ap.add_argument("--feature-layer", type=int, default=None, help="read this BERT layer (default: the spec's)")
    a = ap.parse_args(argv)
    if a.quick:
        a.molecules, a.records, a.steps, a.per_kind = 200, 24, 3, 4
    model = td.build_demo_model(a.spec, "molecule", a.threads, a.insert_at, a.feature_layer)
    train_mols, test_mols = split_molecules(a.molecules, a.seed)
    records = conversations(train_mols, a.records, a.turns, random.Random(a.seed + 1), not a.unbalanced)
    test = held_out_questions(test_mols, a.per_kind, a.seed + 2)
    print(f"{len(train_mols)} training / {len(test_mols)} held-out molecules", file=sys.stderr)
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    stage1 = (
        pretrain_qformer(model, train_mols, 3 if a.quick else a.qformer_steps, a.seed, say) if a.qformer_steps else None
    )
    td.item_demo(
        model,
        "molecule",
        records,
        test,
        KINDS,
        a,
        {"molecules": {"train": len(train_mols), "held_out": len(test_mols)}, "qformer_pretraining": stage1},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
