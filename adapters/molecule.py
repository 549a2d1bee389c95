"""Molecules: SMILES -> RDKit graph -> GIN node features, as in MolCA (Liu et al. 2023).

Featurisation follows pretrain-gnns' ``mol_to_graph_data_obj_simple`` (Hu et al. 2020), which
MolCA's data loader uses: per atom (atomic number - 1, chirality tag), per bond (bond type,
bond direction), hydrogens implicit. A batch of molecules is padded to its largest one:

    atom_features  (items, atoms, 2)         int64  [atomic_num - 1, chirality]; 0 on padding
    bond_features  (items, atoms, atoms, 2)  int64  [bond type, bond dir] of bond i-j; 0 elsewhere
    adjacency      (items, atoms, atoms)     int64  1 where atoms i and j are bonded
    atom_mask      (items, atoms)            int64  1 for real atoms, 0 for padding

The GIN is pretrain-gnns' ``GNN(gnn_type="gin", JK="last")`` in dense form (plain torch, no
torch_geometric), with its module names, so its ``.pth`` state dicts (GraphCL's
``graphcl_80.pth``, which MolCA starts from) load as-is: ``x_embedding1/2`` (atom type,
chirality), per layer ``gnns.{i}.edge_embedding1/2`` (bond type, bond direction) and
``gnns.{i}.mlp`` (Linear, ReLU, Linear), ``batch_norms.{i}``. A layer adds self-loops with
their own bond type (4 in pretrain-gnns) and sums neighbour + edge embeddings:

    h_i' = MLP( h_i + e(self) + sum_{j ~ i} (h_j + e(bond_ij)) ),  then batch norm, ReLU (not on the last)

Output (MolCA's ``GNN.forward`` with ``cat_grep`` + ``ln_graph``): with ``select: all`` the
mean-pooled graph token is prepended to the per-atom features, then MolCA's LayerNorm
``ln_graph`` -> (items, 1 + atoms, emb_dim); ``select: patch`` gives the atoms only. Padded rows
are exactly zero: the Q-Former projector masks all-zero rows out of its cross-attention (MolCA
passes the same mask as ``encoder_attention_mask``), so padding never reaches the queries.
``feature_layer`` indexes [embeddings, layer 1, ..., layer n] (-1: the last, pretrain-gnns'
``JK="last"``). A frozen GIN (no trainable parameter) keeps its batch-norm running statistics
and skips dropout in training, as MolCA's ``disabled_train``; a trained one normalises with the
statistics of the real atoms of the batch (padding excluded).

Spec: ``encoder: {type: gin, config: {num_layers: 5, emb_dim: 300, ...}}`` (random init, see
``GinConfig``) or ``encoder: {type: gin, model: SRC}`` with SRC a pretrain-gnns ``.pth`` state
dict (read with ``torch.load(weights_only=True)``; config inferred from the tensors), a
``.safetensors`` file, a dir with one of those and optionally ``config.json``, or a Hub repo
with ``config.json`` and ``model.safetensors``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from composer.adapters.encoder import EncoderAdapter, hidden_state_index
from composer.errors import ComposerError, InputError, first_line

# pretrain-gnns vocabularies (model.py / loader.py of snap-stanford/pretrain-gnns)
NUM_ATOM_TYPE = 120  # atomic numbers 1..118 -> 0..117, plus unused and mask entries
NUM_CHIRALITY_TAG = 3  # CHI_UNSPECIFIED, CHI_TETRAHEDRAL_CW, CHI_TETRAHEDRAL_CCW
NUM_BOND_TYPE = 6  # SINGLE, DOUBLE, TRIPLE, AROMATIC, self-loop (4), mask
NUM_BOND_DIRECTION = 3  # NONE, ENDUPRIGHT, ENDDOWNRIGHT
SELF_LOOP_BOND_TYPE = 4
PROCESSOR_FILE = "preprocessor_config.json"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def rdkit_modules():
    try:
        from rdkit import Chem, rdBase
    except ImportError:
        raise ComposerError("the molecule encoder needs RDKit: pip install 'rdkit>=2023.9'") from None
    return Chem, rdBase


# -- featurisation --------------------------------------------------------------------------------
def parse_smiles(item):
    """A SMILES string (or an RDKit ``Mol``) -> (RDKit ``Mol``, its name for messages): what every
    molecule encoder checks first. One-line ``InputError`` for a string RDKit cannot parse, an
    item that is not a string, a molecule without atoms."""
    Chem, rdBase = rdkit_modules()
    if isinstance(item, str):
        block = rdBase.BlockLogs()  # RDKit prints parse errors to stderr; ours is one line
        mol = Chem.MolFromSmiles(item)
        del block
        if mol is None:
            raise InputError(f"invalid SMILES {item!r}: RDKit cannot parse it")
        name = item
    elif isinstance(item, Chem.Mol):
        mol, name = item, Chem.MolToSmiles(item)
    else:
        raise InputError(f"a molecule must be a SMILES string, got {type(item).__name__}")
    if mol.GetNumAtoms() == 0:
        raise InputError(f"SMILES {name!r} has no atoms")
    return mol, name


def featurize(item) -> tuple[list[tuple[int, int]], list[tuple[int, int, int, int]]]:
    """A SMILES string (or an RDKit ``Mol``) -> (atoms [(type, chirality)], bonds [(i, j, type, dir)]).

    Example::

        atoms, bonds = featurize("CCO")   # [(5, 0), (5, 0), (7, 0)], [(0, 1, 0, 0), (1, 2, 0, 0)]
    """
    Chem, _ = rdkit_modules()
    mol, name = parse_smiles(item)
    chirality = {
        Chem.ChiralType.CHI_UNSPECIFIED: 0,
        Chem.ChiralType.CHI_TETRAHEDRAL_CW: 1,
        Chem.ChiralType.CHI_TETRAHEDRAL_CCW: 2,
    }
    bond_types = {Chem.BondType.SINGLE: 0, Chem.BondType.DOUBLE: 1, Chem.BondType.TRIPLE: 2, Chem.BondType.AROMATIC: 3}
    bond_dirs = {Chem.BondDir.NONE: 0, Chem.BondDir.ENDUPRIGHT: 1, Chem.BondDir.ENDDOWNRIGHT: 2}
    atoms = []
    for a in mol.GetAtoms():
        z, tag = a.GetAtomicNum(), a.GetChiralTag()
        if not 1 <= z <= 118:
            raise InputError(f"SMILES {name!r}: atom {a.GetIdx()} has atomic number {z}, which the GIN does not encode")
        if tag not in chirality:
            raise InputError(f"SMILES {name!r}: atom {a.GetIdx()} has chirality {tag}, which the GIN does not encode")
        atoms.append((z - 1, chirality[tag]))
    bonds = []
    for b in mol.GetBonds():
        t, d = b.GetBondType(), b.GetBondDir()
        if t not in bond_types or d not in bond_dirs:
            raise InputError(
                f"SMILES {name!r}: bond {b.GetIdx()} ({t}, {d}) is not a bond type/direction the GIN encodes"
            )
        bonds.append((b.GetBeginAtomIdx(), b.GetEndAtomIdx(), bond_types[t], bond_dirs[d]))
    return atoms, bonds


DEFAULT_MAX_ATOMS = 512


@dataclasses.dataclass
class MoleculeProcessor:
    """SMILES strings -> padded dense graph tensors (see the module docstring).

    ``max_atoms``: refuse larger molecules (the bond tensors grow with atoms squared; RDKit's
    parse time with the string): default 512 atoms (MolCA's molecules have tens), null = the
    default. A SMILES string longer than 16 characters per allowed atom is refused unparsed.
    """

    max_atoms: int | None = None

    def __post_init__(self):
        if self.max_atoms is not None and (not isinstance(self.max_atoms, int) or self.max_atoms < 1):
            raise ValueError(f"max_atoms must be a positive integer or null, got {self.max_atoms!r}")

    @property
    def atom_limit(self) -> int:
        return self.max_atoms or DEFAULT_MAX_ATOMS

    def __call__(self, items: list) -> dict[str, torch.Tensor]:
        for x in items:
            if isinstance(x, str) and len(x) > 16 * self.atom_limit:
                raise InputError(
                    f"SMILES of {len(x)} characters: longer than any molecule of at most {self.atom_limit} atoms "
                    "(max_atoms)"
                )
        graphs = [featurize(x) for x in items]
        n, width = len(graphs), max(len(atoms) for atoms, _ in graphs)
        if width > self.atom_limit:
            i = next(i for i, (atoms, _) in enumerate(graphs) if len(atoms) == width)
            raise InputError(
                f"molecule {str(items[i])[:60]!r} has {width} atoms; "
                f"this processor allows {self.atom_limit} (max_atoms)"
            )
        atom_features = torch.zeros(n, width, 2, dtype=torch.long)
        bond_features = torch.zeros(n, width, width, 2, dtype=torch.long)
        adjacency = torch.zeros(n, width, width, dtype=torch.long)
        atom_mask = torch.zeros(n, width, dtype=torch.long)
        for k, (atoms, bonds) in enumerate(graphs):
            atom_features[k, : len(atoms)] = torch.tensor(atoms, dtype=torch.long)
            atom_mask[k, : len(atoms)] = 1
            if bonds:  # undirected: both directions, as pretrain-gnns' edge list
                b = torch.tensor(bonds, dtype=torch.long)  # (E, 4): i, j, type, dir
                for i, j in ((b[:, 0], b[:, 1]), (b[:, 1], b[:, 0])):
                    bond_features[k, i, j] = b[:, 2:]
                    adjacency[k, i, j] = 1
        return {
            "atom_features": atom_features,
            "bond_features": bond_features,
            "adjacency": adjacency,
            "atom_mask": atom_mask,
        }

    def save_pretrained(self, path: str | Path) -> None:
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        cfg = {"processor_class": "MoleculeProcessor", "featurization": "pretrain-gnns", **dataclasses.asdict(self)}
        (p / PROCESSOR_FILE).write_text(json.dumps(cfg, indent=2))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> MoleculeProcessor:
        f = Path(path) / PROCESSOR_FILE
        try:
            cfg = json.loads(f.read_text())
            cfg.pop("processor_class"), cfg.pop("featurization")
            return cls(**cfg)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise InputError(f"{f}: not a molecule processor config ({type(e).__name__}: {e})") from None


# -- the GIN ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class GinConfig:
    """pretrain-gnns GIN hyper-parameters; the defaults are MolCA's (5 layers, 300 wide, no dropout).

    ``self_loop_bond_type``: the bond type of the self-loop edges; 4 in pretrain-gnns (GraphCL's
    weights were trained so). MolCA's own ``GINConv`` adds self-loops with ``fill_value=0``, i.e.
    bond type 0: set 0 to run weights trained with MolCA's code. ``layer_norm``: MolCA's
    ``ln_graph`` on the output (fresh, weight 1 and bias 0, when a weights file has none).
    """

    num_layers: int = 5
    emb_dim: int = 300
    drop_ratio: float = 0.0
    self_loop_bond_type: int = SELF_LOOP_BOND_TYPE
    layer_norm: bool = True
    num_atom_type: int = NUM_ATOM_TYPE
    num_chirality_tag: int = NUM_CHIRALITY_TAG
    num_bond_type: int = NUM_BOND_TYPE
    num_bond_direction: int = NUM_BOND_DIRECTION

    def __post_init__(self):
        for f in ("num_layers", "emb_dim", "num_atom_type", "num_chirality_tag", "num_bond_type", "num_bond_direction"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"gin config {f} must be a positive integer, got {v!r}")
        if not 0 <= self.drop_ratio < 1:
            raise ValueError(f"gin config drop_ratio must be in [0, 1), got {self.drop_ratio!r}")
        if not 0 <= self.self_loop_bond_type < self.num_bond_type:
            raise ValueError(
                f"gin config self_loop_bond_type must be in [0, {self.num_bond_type}), got {self.self_loop_bond_type!r}"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GinConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown gin config key(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], where: str) -> GinConfig:
        """Infer the shape hyper-parameters of a pretrain-gnns state dict (other fields: defaults)."""
        try:
            atom, chir = state["x_embedding1.weight"].shape, state["x_embedding2.weight"].shape
            bond, bdir = state["gnns.0.edge_embedding1.weight"].shape, state["gnns.0.edge_embedding2.weight"].shape
        except KeyError as e:
            raise ValueError(f"{where}: not a pretrain-gnns GIN state dict (no {e.args[0]})") from None
        layers = {int(k.split(".")[1]) for k in state if k.startswith("gnns.")}
        return cls(
            num_layers=max(layers) + 1,
            emb_dim=atom[1],
            num_atom_type=atom[0],
            num_chirality_tag=chir[0],
            num_bond_type=bond[0],
            num_bond_direction=bdir[0],
        )


class GINConv(nn.Module):
    """One pretrain-gnns GIN layer over a dense padded batch (sum aggregation with edge embeddings)."""

    def __init__(self, emb_dim: int, num_bond_type: int, num_bond_direction: int, self_loop_bond_type: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(emb_dim, 2 * emb_dim), nn.ReLU(), nn.Linear(2 * emb_dim, emb_dim))
        self.edge_embedding1 = nn.Embedding(num_bond_type, emb_dim)
        self.edge_embedding2 = nn.Embedding(num_bond_direction, emb_dim)
        nn.init.xavier_uniform_(self.edge_embedding1.weight)
        nn.init.xavier_uniform_(self.edge_embedding2.weight)
        self.self_loop_bond_type = self_loop_bond_type

    def forward(
        self, h: torch.Tensor, adjacency: torch.Tensor, type_counts: torch.Tensor, dir_counts: torch.Tensor
    ) -> torch.Tensor:
        # h (n, N, d); adjacency (n, N, N); *_counts (n, N, vocab): bonds of each type/direction per atom
        w1, w2 = self.edge_embedding1.weight, self.edge_embedding2.weight
        self_loop = w1[self.self_loop_bond_type] + w2[0]  # (d,)
        aggr = h + self_loop + adjacency @ h + type_counts @ w1 + dir_counts @ w2  # sum_j (h_j + e_ij), j incl. i
        return self.mlp(aggr)


def _count(index: torch.Tensor, adjacency: torch.Tensor, vocab: int) -> torch.Tensor:
    """(n, N, N) category of each pair -> (n, N, vocab): how many bonds of each category an atom has.
    A one-hot comparison and a sum: dense ops that export to ONNX."""
    onehot = (index[..., None] == torch.arange(vocab, device=index.device)).to(adjacency.dtype)  # (n, N, N, V)
    return (onehot * adjacency[..., None]).sum(2)


class GinEncoder(EncoderAdapter):
    """MolCA's graph encoder: a pretrain-gnns GIN (+ graph token, + ``ln_graph``).

    Attribute names equal pretrain-gnns' state-dict keys. Output: (items, [1 +] atoms, emb_dim)
    with padded rows exactly zero.
    """

    input_names = ("atom_features", "bond_features", "adjacency", "atom_mask")
    takes_text = True  # items are SMILES strings, not files (`compose generate --molecule CCO`)

    def __init__(self, config: GinConfig, *, feature_layer: int = -1, select: str = "all"):
        super().__init__()
        n = config.num_layers
        self.config = config
        self.feature_layer = hidden_state_index(feature_layer, n, "GIN")  # into [embeddings, layer 1, ..., layer n]
        self.select = select
        d = config.emb_dim
        self.x_embedding1 = nn.Embedding(config.num_atom_type, d)
        self.x_embedding2 = nn.Embedding(config.num_chirality_tag, d)
        nn.init.xavier_uniform_(self.x_embedding1.weight)
        nn.init.xavier_uniform_(self.x_embedding2.weight)
        self.gnns = nn.ModuleList(
            GINConv(d, config.num_bond_type, config.num_bond_direction, config.self_loop_bond_type) for _ in range(n)
        )
        self.batch_norms = nn.ModuleList(nn.BatchNorm1d(d) for _ in range(n))
        self.ln_graph = nn.LayerNorm(d) if config.layer_norm else None

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def load_config(cls, src: str) -> GinConfig:
        if (Path(src) / CONFIG_FILE).is_file():  # a dir with a config (the weights may be absent: inspect)
            cfg_file, weights = str(Path(src) / CONFIG_FILE), None
        else:
            cfg_file, weights = _resolve(src)
        if cfg_file is not None:
            try:
                return GinConfig.from_dict(json.loads(Path(cfg_file).read_text()))
            except (OSError, json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as e:
                raise ValueError(f"{cfg_file}: not a GIN config ({first_line(e)})") from None
        return GinConfig.from_state_dict(_map_keys(read_gin_weights(weights)), weights)

    @classmethod
    def config_from_dict(cls, d: dict[str, Any]) -> GinConfig:
        return GinConfig.from_dict(d)

    @classmethod
    def create(
        cls, config: GinConfig, spec, *, src: str | None, dtype: torch.dtype | None, load_weights: bool
    ) -> GinEncoder:
        enc = cls(config, feature_layer=spec.feature_layer, select=spec.select)
        if src is not None and load_weights:
            load_gin_weights(enc, _resolve(src)[1])
        return enc.to(dtype) if dtype is not None else enc

    @classmethod
    def make_processor(cls, config, src, overrides: dict[str, Any]) -> MoleculeProcessor:
        return MoleculeProcessor(**overrides)

    @classmethod
    def load_processor(cls, path: str) -> MoleculeProcessor:
        return MoleculeProcessor.from_pretrained(path)

    @staticmethod
    def preprocess(processor: MoleculeProcessor, items: list) -> dict[str, torch.Tensor]:
        return processor(items)

    # -- facts -------------------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.config.emb_dim

    @property
    def num_tokens(self) -> None:
        """Variable: one token per atom (+ the graph token); the spec pairs this encoder with a Q-Former."""
        return None

    def config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    def example_inputs(self, n: int) -> dict[str, torch.Tensor]:
        """``n`` chain molecules padded to ``n + 4`` atoms (never equal to ``n``: distinct export sizes)."""
        g = torch.Generator().manual_seed(n)
        width = n + 4
        atom_features = torch.zeros(n, width, 2, dtype=torch.long)
        bond_features = torch.zeros(n, width, width, 2, dtype=torch.long)
        adjacency = torch.zeros(n, width, width, dtype=torch.long)
        atom_mask = torch.zeros(n, width, dtype=torch.long)
        for k in range(n):
            m = width - k % 3  # some items padded
            atom_mask[k, :m] = 1
            atom_features[k, :m, 0] = torch.randint(0, 118, (m,), generator=g)
            atom_features[k, :m, 1] = torch.randint(0, self.config.num_chirality_tag, (m,), generator=g)
            for i in range(m - 1):
                t = torch.randint(0, 4, (), generator=g)
                bond_features[k, i, i + 1, 0] = bond_features[k, i + 1, i, 0] = t
                adjacency[k, i, i + 1] = adjacency[k, i + 1, i] = 1
        return {
            "atom_features": atom_features,
            "bond_features": bond_features,
            "adjacency": adjacency,
            "atom_mask": atom_mask,
        }

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {
            "atom_features": {0: "items", 1: "atoms"},
            "bond_features": {0: "items", 1: "atoms", 2: "atoms"},
            "adjacency": {0: "items", 1: "atoms", 2: "atoms"},
            "atom_mask": {0: "items", 1: "atoms"},
        }

    # -- forward -------------------------------------------------------------------------------------------
    def _batch_norm(self, bn: nn.BatchNorm1d, h: torch.Tensor, mask: torch.Tensor, train: bool) -> torch.Tensor:
        if not train:  # running statistics: a per-channel affine map, padding cannot leak
            return F.batch_norm(
                h.flatten(0, 1), bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps
            ).view(h.shape)
        out = torch.zeros_like(h)  # batch statistics over real atoms only, as over pretrain-gnns' node list
        out[mask] = bn(h[mask])
        return out

    def forward(
        self, atom_features: torch.Tensor, bond_features: torch.Tensor, adjacency: torch.Tensor, atom_mask: torch.Tensor
    ) -> torch.Tensor:  # -> (n, [1 +] N, d)
        dt = self.dtype
        c = self.config
        # A frozen GIN keeps its running statistics and no dropout in training (MolCA's `disabled_train`).
        train = self.training and any(p.requires_grad for p in self.parameters())
        mask = atom_mask.bool()  # (n, N)
        adj = adjacency.to(dt)  # (n, N, N)
        type_counts = _count(bond_features[..., 0], adj, c.num_bond_type)  # (n, N, num_bond_type)
        dir_counts = _count(bond_features[..., 1], adj, c.num_bond_direction)
        h = self.x_embedding1(atom_features[..., 0]) + self.x_embedding2(atom_features[..., 1])  # (n, N, d)
        for i in range(self.feature_layer):
            h = self.gnns[i](h, adj, type_counts, dir_counts)
            h = self._batch_norm(self.batch_norms[i], h, mask, train)
            if i < c.num_layers - 1:  # pretrain-gnns: no ReLU after the last layer
                h = F.relu(h)
            h = F.dropout(h, c.drop_ratio, training=train)
        keep = mask.to(dt)[..., None]  # (n, N, 1)
        if self.select == "all":  # MolCA prepends the mean-pooled graph token (global_mean_pool)
            graph = (h * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True)  # (n, 1, d)
            h = torch.cat([graph, h], 1)
            keep = F.pad(keep, (0, 0, 1, 0), value=1.0)
        if self.ln_graph is not None:
            h = self.ln_graph(h)
        return h * keep  # padded rows exactly zero: the Q-Former masks them out


# -- weights ---------------------------------------------------------------------------------------------------
# Prefixes under which GIN weights appear: MolCA modules (`graph_encoder.`), pretrain-gnns'
# GNN_graphpred (`gnn.`), DataParallel (`module.`).
_PREFIXES = ("module.", "blip2opt.", "blip2qformer.", "graph_encoder.", "gnn.")


def _resolve(src: str) -> tuple[str | None, str]:
    """Where the config and the weights of ``src`` are: (config.json or None, weights file).

    ``src``: a weights file (``.safetensors``, or a pretrain-gnns ``.pth``/``.pt`` state dict);
    a local dir with ``model.safetensors`` or a single ``.pth``/``.pt`` file, and optionally
    ``config.json``; or a Hub repo with ``config.json`` and ``model.safetensors``.
    """
    p = Path(src)
    if p.is_file():
        return None, str(p)
    if p.is_dir():
        cfg = p / CONFIG_FILE
        if (p / WEIGHTS_FILE).is_file():
            weights = [p / WEIGHTS_FILE]
        else:
            weights = sorted(f for f in p.iterdir() if f.suffix in (".pth", ".pt") and f.is_file())
        if len(weights) != 1:
            found = [f.name for f in weights]
            raise ValueError(f"the dir needs {WEIGHTS_FILE} or exactly one .pth/.pt GIN state dict, found {found}")
        return (str(cfg) if cfg.is_file() else None), str(weights[0])
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(src, CONFIG_FILE), hf_hub_download(src, WEIGHTS_FILE)
    except Exception as e:  # hub errors come in many types; name the source
        raise ValueError(
            f"not a local GIN weights file or dir, and not loadable from the Hub ({type(e).__name__}: {first_line(e)})"
        ) from None


def read_gin_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file, or a ``.pth`` state dict read with ``torch.load(weights_only=True)``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: GIN weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt/truncated files and pickled objects raise many types
        raise ValueError(f"{path}: cannot read GIN weights ({type(e).__name__}: {first_line(e)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return state


def _map_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        stripped = True
        while stripped:
            stripped = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, stripped = k[len(p) :], True
        out[k] = v
    return out


def load_gin_weights(encoder: GinEncoder, path: str | Path) -> None:
    """Load pretrain-gnns/MolCA GIN weights into ``encoder``, strictly (else ``ValueError``, which the
    builder reports with the spec field): every GIN key present with its shape, nothing
    unexpected. Allowed absent: ``ln_graph.*`` (pretrain-gnns files have none;
    MolCA creates it fresh: weight 1, bias 0, as here) and ``num_batches_tracked`` (older torch)."""
    from composer.hf_weights import load_strict

    state = _map_keys(read_gin_weights(path))
    optional = {k for k in encoder.state_dict() if k.startswith("ln_graph.") or k.endswith("num_batches_tracked")}
    load_strict(encoder, state, str(path), "GIN", optional=optional, show=5)
