"""Molecules as text: a BERT over SMILES tokens, as rxnfp's ``bert_pretrained`` (Schwaller et al.,
"Mapping the space of chemical reactions using attention-based neural networks", 2021).

rxnfp's wheel (``pip install --no-deps rxnfp==0.1.0``) ships ``models/transformers/bert_pretrained``:
a 12-layer, 256-wide BERT masked-LM-pretrained on reaction SMILES (``config.json``,
``pytorch_model.bin`` with ``bert.*``/``cls.*`` keys, ``vocab.txt`` of 591 tokens). A spec names it
``model: package:rxnfp/models/transformers/bert_pretrained``; ``convert_package_source`` turns it
once into the HF layout of a ``BertModel`` (encoder only: the MLM and NSP heads and the pooler are
dropped) plus the tokenizer files. Any HF BERT dir or Hub id with ``vocab.txt`` loads the same way.

Tokenization reproduces rxnfp's ``SmilesTokenizer`` (rxnfp/tokenization.py) without importing
rxnfp: the SMILES regex of Schwaller et al. (``SMI_REGEX_PATTERN``, copied verbatim) splits the
string into atoms, bonds, branches and ring closures; each token is looked up in ``vocab.txt``
(``[UNK]`` when absent) and the sequence is framed ``[CLS] ... [SEP]``. (rxnfp subclasses the slow
``BertTokenizer``; transformers 5's ``BertTokenizer`` is WordPiece-only and no longer runs a
subclass's ``_tokenize``, so composer does the split itself.) Every item is first parsed by RDKit
(the GIN encoder's checks and messages, ``molecule.parse_smiles``); with ``canonicalize`` (the
default) the RDKit canonical SMILES, atom-map numbers removed, is what is tokenized, as rxnfp's
``process_reaction`` prepared its training data; ``processor: {canonicalize: false}`` tokenizes
the string as given (a string with characters the regex does not split is refused, where rxnfp
would drop them silently). A batch is right-padded with ``[PAD]``:

    input_ids       (items, tokens)  int64  [CLS] SMILES tokens [SEP], then [PAD]
    attention_mask  (items, tokens)  int64  1 for [CLS], the SMILES tokens and [SEP]; 0 on padding

Output: ``hidden_states[feature_layer]`` (-1: the last layer, what rxnfp's fingerprints read).
``select: all`` keeps every token, [CLS] and [SEP] included, (items, tokens, hidden); ``select:
patch`` the SMILES tokens only, (items, tokens - 1, hidden): [CLS] dropped, [SEP] zeroed. As the
GIN's, the number of tokens varies with the item and padded rows are exactly zero: the Q-Former
projector masks all-zero rows out of its cross-attention, so padding never reaches the queries,
in torch and in the ONNX bundle alike (the spec requires ``projector.type: qformer``).

Spec: ``encoder: {type: smiles_bert, model: SRC}``, or an inline ``config: {model_type: bert, ...}``
(random init) tokenized with ``BASIC_VOCAB`` (special tokens, organic-subset atoms, bonds,
digits; anything else is ``[UNK]``). ``processor: {max_length, canonicalize}``: ``max_length``
counts [CLS] and [SEP] and defaults to the config's ``max_position_embeddings``; a longer SMILES
is refused (rxnfp truncates).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from composer.adapters.encoder import HFEncoder, hidden_state_index, maybe_no_init
from composer.errors import InputError, first_line

# rxnfp/tokenization.py, SMI_REGEX_PATTERN (rxnfp 0.1.0), verbatim
SMI_REGEX_PATTERN = (
    r"(\%\([0-9]{3}\)|\[[^\]]+]|Br?|Cl?|N|O|S|P|F|I|b|c|n|o|s|p|\||\(|\)|\.|=|#|-|\+|\\|\/|:|~|@|\?|>>?|\*|\$"
    r"|\%[0-9]{2}|[0-9])"
)
_SMI_REGEX = re.compile(SMI_REGEX_PATTERN)
PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
# The vocabulary of an inline-config (random init) SMILES BERT: special tokens, then what the regex
# yields outside brackets and ring closures past 9.
BASIC_VOCAB = (
    *SPECIAL_TOKENS,
    *("B", "C", "N", "O", "P", "S", "F", "Cl", "Br", "I", "b", "c", "n", "o", "s", "p"),
    *("(", ")", ".", "=", "#", "-", "+", "\\", "/", ":", "~", "@", "?", ">", ">>", "*", "$", "|"),
    *"0123456789",
)
VOCAB_FILE = "vocab.txt"
PROCESSOR_FILE = "preprocessor_config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MAX_CHARS_PER_TOKEN = 16  # a SMILES longer than this many characters per allowed token is refused unparsed


def smiles_tokens(smiles: str) -> list[str]:
    """rxnfp's ``RegexTokenizer.tokenize``: the regex's matches, in order.

    Example::

        smiles_tokens("CC(=O)Cl")   # ['C', 'C', '(', '=', 'O', ')', 'Cl']
    """
    return _SMI_REGEX.findall(smiles)


def read_vocab(path: str | Path) -> list[str]:
    """The lines of a BERT ``vocab.txt`` (a token per line; line i is id i, as transformers'
    ``load_vocab`` reads it)."""
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


@dataclasses.dataclass
class SmilesProcessor:
    """SMILES strings (or RDKit ``Mol``\\ s) -> ``input_ids``/``attention_mask`` (module docstring).

    ``vocab``: the lines of ``vocab.txt``; ``max_length``: tokens per item, [CLS] and [SEP]
    included; ``canonicalize``: tokenize RDKit's canonical SMILES (atom maps removed), else the
    string as given."""

    vocab: list[str] = dataclasses.field(repr=False)
    max_length: int = 512
    canonicalize: bool = True

    def __post_init__(self):
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 3:
            raise ValueError(f"max_length must be an integer >= 3 ([CLS], a token, [SEP]), got {self.max_length!r}")
        if not isinstance(self.canonicalize, bool):
            raise ValueError(f"canonicalize must be true or false, got {self.canonicalize!r}")
        self.vocab = list(self.vocab)
        self.ids = {t: i for i, t in enumerate(self.vocab)}  # a repeated line: the last wins, as in load_vocab
        missing = [t for t in (PAD, UNK, CLS, SEP) if t not in self.ids]
        if missing:
            raise ValueError(f"the SMILES vocabulary has no {', '.join(missing)} token")

    def tokenize(self, item) -> list[str]:
        """One molecule -> its SMILES tokens (no [CLS]/[SEP]); ``InputError`` for a bad item."""
        from composer.adapters.molecule import parse_smiles, rdkit_modules

        if isinstance(item, str) and len(item) > MAX_CHARS_PER_TOKEN * self.max_length:
            raise InputError(
                f"SMILES of {len(item)} characters: longer than any of at most {self.max_length} tokens (max_length)"
            )
        mol, name = parse_smiles(item)
        if self.canonicalize or not isinstance(item, str):
            Chem, _ = rdkit_modules()
            mol = Chem.Mol(mol)
            for atom in mol.GetAtoms():  # rxnfp's canonicalize_smi(remove_atom_mapping=True)
                atom.SetAtomMapNum(0)
            smiles = Chem.MolToSmiles(mol)
        else:
            smiles = item
        tokens = smiles_tokens(smiles)
        if sum(map(len, tokens)) != len(smiles):
            rest = _SMI_REGEX.sub("", smiles)
            raise InputError(f"SMILES {name!r}: the SMILES tokenizer does not split {rest[:20]!r}")
        return tokens

    def encode(self, item) -> list[int]:
        """One molecule -> ``[CLS] ids [SEP]``; ``InputError`` when longer than ``max_length``."""
        tokens = self.tokenize(item)
        if len(tokens) + 2 > self.max_length:
            raise InputError(
                f"molecule {str(item)[:60]!r} has {len(tokens)} SMILES tokens; "
                f"this processor allows {self.max_length - 2} (max_length {self.max_length} with [CLS] and [SEP])"
            )
        unk = self.ids[UNK]
        return [self.ids[CLS], *(self.ids.get(t, unk) for t in tokens), self.ids[SEP]]

    def __call__(self, items: list) -> dict[str, torch.Tensor]:
        rows = [self.encode(x) for x in items]
        width = max(map(len, rows))
        input_ids = torch.full((len(rows), width), self.ids[PAD], dtype=torch.long)
        attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
        for k, row in enumerate(rows):
            input_ids[k, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[k, : len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def save_pretrained(self, path: str | Path) -> None:
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        (p / VOCAB_FILE).write_text("".join(t + "\n" for t in self.vocab), encoding="utf-8")
        cfg = {
            "processor_class": "SmilesProcessor",
            "tokenization": "rxnfp SMILES regex + vocab.txt",
            "smiles_regex": SMI_REGEX_PATTERN,
            "max_length": self.max_length,
            "canonicalize": self.canonicalize,
        }
        (p / PROCESSOR_FILE).write_text(json.dumps(cfg, indent=2))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> SmilesProcessor:
        """A dir ``save_pretrained`` wrote (a checkpoint's or an ONNX bundle's ``processors/<m>``)."""
        f = Path(path) / PROCESSOR_FILE
        try:
            cfg = json.loads(f.read_text())
            if cfg.pop("processor_class") != "SmilesProcessor" or cfg.pop("smiles_regex") != SMI_REGEX_PATTERN:
                raise ValueError("another processor or SMILES regex")
            cfg.pop("tokenization")
            return cls(read_vocab(Path(path) / VOCAB_FILE), **cfg)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise InputError(f"{f}: not a SMILES processor config ({type(e).__name__}: {first_line(e)})") from None


# -- the encoder ---------------------------------------------------------------------------------------
class SmilesBertEncoder(HFEncoder):
    """Wraps transformers ``BertModel`` (no pooler); attribute ``model`` keeps the HF keys below
    ``encoders.<m>.model``. Output: (items, tokens [- 1 with ``select: patch``], hidden_size),
    padded rows exactly zero."""

    input_names = ("input_ids", "attention_mask")
    takes_text = True  # items are SMILES strings, not files (`compose generate --molecule CCO`)

    def __init__(self, model, feature_layer: int = -1, select: str = "patch"):
        super().__init__(model)
        n = model.config.num_hidden_layers
        self.layer = hidden_state_index(feature_layer, n)  # into hidden_states: [embeddings, layer 1, ..., layer n]
        self.feature_layer = feature_layer
        self.select = select

    @staticmethod
    def hf_classes():
        from transformers import BertConfig, BertModel

        return BertConfig, BertModel, SmilesProcessor

    @classmethod
    def _wrap(cls, hf, spec):
        return cls(hf, feature_layer=spec.feature_layer, select=spec.select)

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def load_config(cls, src: str):
        """``config.json`` of a BERT dir or Hub repo (rxnfp's has no ``model_type``: read as a BERT)."""
        from transformers import BertConfig

        config = BertConfig.from_pretrained(src)
        mt = BertConfig.get_config_dict(src)[0].get("model_type", "bert")
        if mt != "bert":
            raise ValueError(f"config.json: model_type {mt!r} is not a BERT")
        return config

    @classmethod
    def config_from_dict(cls, d: dict[str, Any]):
        from transformers import BertConfig

        return BertConfig(**{k: v for k, v in d.items() if k != "model_type"})

    @classmethod
    def convert_package_source(cls, src, out_dir) -> None:
        """rxnfp's ``bert_pretrained`` dir (or any BERT dir with ``vocab.txt``) -> ``config.json``,
        ``model.safetensors`` (``BertModel`` keys, no pooler, no heads), ``vocab.txt`` and
        ``tokenizer_config.json`` (what rxnfp's ``SmilesTokenizer`` is built with). The weights
        are read with ``torch.load(weights_only=True)``."""
        src, out = Path(src), Path(out_dir)
        if not (src / CONFIG_FILE).is_file() or not (src / VOCAB_FILE).is_file():
            raise ValueError(f"{src}: want a BERT directory with {CONFIG_FILE} and {VOCAB_FILE}")
        config = cls.load_config(str(src))
        vocab = read_vocab(src / VOCAB_FILE)
        SmilesProcessor(vocab)  # the special tokens are there
        if len(vocab) > config.vocab_size:
            raise ValueError(f"{VOCAB_FILE} has {len(vocab)} tokens, config.json's vocab_size is {config.vocab_size}")
        from safetensors.torch import save_file

        with torch.device("cpu"):  # real tensors even inside a meta-device build (`compose inspect`)
            hf = cls._new_model(config)
        load_bert_weights(hf, str(src))
        config.architectures = ["BertModel"]
        config.save_pretrained(str(out))
        save_file(hf.state_dict(), str(out / WEIGHTS_FILE), metadata={"format": "pt"})
        shutil.copyfile(src / VOCAB_FILE, out / VOCAB_FILE)
        tok = {
            "do_lower_case": False,  # SMILES are case-sensitive (c: aromatic carbon)
            "unk_token": UNK,
            "sep_token": SEP,
            "pad_token": PAD,
            "cls_token": CLS,
            "mask_token": MASK,
            "model_max_length": config.max_position_embeddings,
            "smiles_regex": SMI_REGEX_PATTERN,  # the pre-tokenizer (rxnfp's SmilesTokenizer), not WordPiece
        }
        (out / TOKENIZER_CONFIG_FILE).write_text(json.dumps(tok, indent=2))

    @staticmethod
    def _new_model(config) -> nn.Module:
        from transformers import BertModel

        with maybe_no_init(True):
            return BertModel(config, add_pooling_layer=False)

    @classmethod
    def create(cls, config, spec, *, src, dtype, load_weights):
        from transformers import BertModel

        if src is not None and load_weights:
            hf = cls._new_model(config)
            load_bert_weights(hf, src)
        else:
            with maybe_no_init(not load_weights):
                hf = BertModel(config, add_pooling_layer=False)
        return cls._wrap(hf.to(dtype) if dtype is not None else hf, spec)

    @classmethod
    def make_processor(cls, config, src, overrides: dict[str, Any]) -> SmilesProcessor:
        """``vocab.txt`` next to the weights (``BASIC_VOCAB`` for an inline config); ``overrides``:
        the spec's ``processor:`` (``max_length``, ``canonicalize``)."""
        unknown = sorted(set(overrides) - {"max_length", "canonicalize"})
        if unknown:
            raise ValueError(f"unknown SMILES processor setting(s) {unknown}; known: ['canonicalize', 'max_length']")
        vocab = list(BASIC_VOCAB) if src is None else read_vocab(_vocab_file(src))
        if len(vocab) > config.vocab_size:
            where = "the built-in SMILES vocabulary" if src is None else VOCAB_FILE
            raise ValueError(f"{where} has {len(vocab)} tokens; config.vocab_size is {config.vocab_size}")
        max_length = overrides.get("max_length", config.max_position_embeddings)
        if isinstance(max_length, int) and max_length > config.max_position_embeddings:
            raise ValueError(
                f"max_length {max_length} is past the encoder's max_position_embeddings "
                f"({config.max_position_embeddings})"
            )
        return SmilesProcessor(vocab, **{**overrides, "max_length": max_length})

    @classmethod
    def load_processor(cls, path: str) -> SmilesProcessor:
        return SmilesProcessor.from_pretrained(path)

    @staticmethod
    def preprocess(processor: SmilesProcessor, items: list) -> dict[str, torch.Tensor]:
        return processor(items)

    # -- facts -------------------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> None:
        """Variable: one token per SMILES token (+ [CLS], [SEP]); the spec pairs this encoder with a Q-Former."""
        return None

    def example_inputs(self, n: int) -> dict[str, torch.Tensor]:
        """``n`` items padded to ``n + 4`` tokens (never equal to ``n``: distinct export sizes), some
        shorter than that."""
        g = torch.Generator().manual_seed(n)
        width = n + 4
        input_ids = torch.randint(1, self.model.config.vocab_size, (n, width), generator=g)
        attention_mask = torch.zeros(n, width, dtype=torch.long)
        for k in range(n):
            attention_mask[k, : width - k % 3] = 1
        return {"input_ids": input_ids * attention_mask, "attention_mask": attention_mask}

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {"input_ids": {0: "items", 1: "tokens"}, "attention_mask": {0: "items", 1: "tokens"}}

    # -- forward -------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(n, T) ids and mask -> (n, T, d) with ``select: all``, (n, T - 1, d) with ``patch``."""
        n, t = input_ids.shape
        positions = torch.arange(t, device=input_ids.device)
        last = self.layer == self.model.config.num_hidden_layers
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=torch.zeros_like(input_ids),  # what BertModel fills in; explicit for export
            position_ids=positions.expand(n, t),
            output_hidden_states=not last,
        )
        h = out.last_hidden_state if last else out.hidden_states[self.layer]
        keep = attention_mask.to(h.dtype)
        if self.select == "patch":  # the SMILES tokens: [SEP] (the last real token) zeroed, [CLS] dropped
            sep = attention_mask.sum(1, keepdim=True) - 1  # (n, 1)
            keep = keep * (positions[None] != sep).to(h.dtype)
            return (h * keep[..., None])[:, 1:]
        return h * keep[..., None]  # padded rows exactly zero: the Q-Former masks them out


# -- weights ----------------------------------------------------------------------------------------------
MLM_PREFIX = "bert."  # BertForMaskedLM / BertForPreTraining keep the encoder under `bert.`


def _vocab_file(src: str) -> Path:
    p = Path(src)
    if p.is_dir():
        if not (p / VOCAB_FILE).is_file():
            raise ValueError(f"{src}: no {VOCAB_FILE} (a SMILES BERT needs its token vocabulary)")
        return p / VOCAB_FILE
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(src, VOCAB_FILE))
    except Exception as e:  # hub errors come in many types; name the source
        raise ValueError(f"cannot fetch {VOCAB_FILE} ({type(e).__name__}: {first_line(e)})") from None


def load_bert_weights(hf: nn.Module, src: str) -> None:
    """Load a ``BertModel`` (no pooler) strictly from ``src``: a dir, file or Hub id holding a
    ``BertModel`` or a ``BertForMaskedLM``/``BertForPreTraining`` checkpoint (``bert.*`` keys;
    the heads and the pooler are not read). ``.bin`` files are read with ``weights_only=True``.
    Raises ``ValueError`` naming ``src`` for missing tensors or other shapes."""
    from composer.hf_weights import CheckpointFiles, load_strict

    ckpt = CheckpointFiles(src)
    prefix = MLM_PREFIX if any(k.startswith(MLM_PREFIX) for k in ckpt.key_file) else ""
    own = hf.state_dict()
    found = [k for k in own if prefix + k in ckpt.key_file]
    state = {k[len(prefix) :]: v for k, v in ckpt.read(prefix + k for k in found).items()}
    load_strict(hf, state, src, "BERT encoder", show=3)
