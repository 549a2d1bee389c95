"""DeepInsert sequence layout: which tokens each group of LLM layers sees.

A prompt is laid out once, as the classic (layer-0) model would see it: ``input_ids`` of shape
(B, L) in which every multimodal (MM) token occupies a *slot* holding its modality's
placeholder id. Slots keep the baseline's order and position ids; DeepInsert only changes
which slots are *active* in which layers:

    stage 0: layers [0, k1)   text slots (+ modalities with insert_at 0)
    stage 1: layers [k1, k2)  + modalities with insert_at k1
    ...

Each stage gathers its active slots into a compact (B, T_s, d) tensor, so the skipped MM
tokens cost nothing in the early layers. Rows with fewer active slots than the longest row
are filled with a *dummy* slot (index L) that is masked out as a key. Causality uses the slot
order; RoPE/learned positions use the baseline position ids (``cumsum(mask) - 1``), so
text tokens in early stages simply have gaps where the MM tokens will go.

This module is the only definition of stages and compaction: ``ComposedModel`` runs them in
torch, the exporter derives its graph plan from ``graph_stages``, and the ONNX Runtime host
side uses the numpy twins at the bottom (tested equal). See docs/architecture.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


def baseline_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of the layer-0 sequence: 0.. over real tokens, padding pinned to 0. (B, L)"""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class Stage:
    """One contiguous group of layers and the slots it sees."""

    start: int
    end: int
    enter: list[str]  # modalities spliced in at `start`
    index: torch.Tensor  # (B, T) slot ids, L = dummy
    key_ok: torch.Tensor  # (B, T) bool: a real, attendable token
    positions: torch.Tensor  # (B, T) baseline position ids


def stage_bounds(insert_at: dict[str, int], num_layers: int) -> list[tuple[int, int, list[str]]]:
    """[(start, end, modalities entering at start)], covering [0, num_layers)."""
    starts = sorted({0, *insert_at.values()})
    bounds = []
    for i, s in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else num_layers
        bounds.append((s, end, sorted(m for m, k in insert_at.items() if k == s)))
    return bounds


def graph_stages(insert_at: dict[str, int], num_layers: int) -> list[tuple[int, int, list[str]]]:
    """The split export's graphs, derived from ``stage_bounds``: the early text graph over
    [0, k1) (k1 the lowest insertion layer; an embedding-only graph when k1 = 0), then one late
    graph per distinct insertion layer K over [K, next K) with the modalities entering at K."""
    stages = stage_bounds(insert_at, num_layers)
    k1 = min(insert_at.values())
    return [(0, k1, []), *[st for st in stages if st[0] >= k1 and st[2]]]


def compact(active: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor):
    """Gather the active slots of each row, in order; pad rows with the dummy slot L.

    Returns (index, key_ok, positions), each (B, T) with T = max active count.
    """
    B, L = active.shape
    counts = active.sum(-1)
    T = int(counts.max()) if B else 0
    # stable sort puts active slots first, keeping their order
    order = torch.sort((~active).to(torch.int8), dim=-1, stable=True).indices[:, :T]
    filled = torch.arange(T, device=active.device)[None, :] < counts[:, None]
    index = torch.where(filled, order, torch.full_like(order, L))
    safe = order.clamp(max=L - 1)
    key_ok = filled & attention_mask.bool().gather(1, safe)
    pos = torch.where(filled, positions.gather(1, safe), torch.zeros_like(order))
    return index, key_ok, pos


@dataclass
class Layout:
    """The stages of one batch. Built from placeholder masks; holds no hidden states."""

    stages: list[Stage]
    slot_masks: dict[str, torch.Tensor]  # modality -> (B, L) bool
    positions: torch.Tensor  # (B, L)
    length: int  # L

    @classmethod
    def build(
        cls,
        attention_mask: torch.Tensor,
        slot_masks: dict[str, torch.Tensor],
        insert_at: dict[str, int],
        num_layers: int,
    ) -> Layout:
        positions = baseline_positions(attention_mask)
        is_mm = torch.zeros_like(attention_mask, dtype=torch.bool)
        for m in slot_masks.values():
            is_mm |= m
        active = ~is_mm
        stages = []
        for start, end, enter in stage_bounds(insert_at, num_layers):
            for m in enter:
                active = active | slot_masks[m]
            index, key_ok, pos = compact(active, attention_mask, positions)
            stages.append(Stage(start, end, enter, index, key_ok, pos))
        return cls(stages, slot_masks, positions, attention_mask.shape[1])


def additive_mask(q_slot: torch.Tensor, k_slot: torch.Tensor, k_ok: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, Tq, Tk) additive attention mask: a query sees real keys at or before its slot."""
    allowed = k_ok[:, None, :] & (k_slot[:, None, :] <= q_slot[:, :, None])
    zero = torch.zeros((), dtype=dtype, device=q_slot.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=q_slot.device)
    return torch.where(allowed, zero, neg)[:, None]


@dataclass
class KVState:
    """Generation state: one HF cache (absolute layer indices; each layer holds only the tokens
    its stage saw) plus, per stage, the slot ids and validity of every cached key."""

    cache: object
    key_slot: list[torch.Tensor]  # per stage (B, P_s)
    key_ok: list[torch.Tensor]  # per stage (B, P_s)
    next_slot: int  # slot id of the next token
    next_pos: torch.Tensor  # (B,) position id of the next token
    bounds: list[tuple[int, int]] = field(default_factory=list)

    def append(self, stage: int, slots: torch.Tensor, ok: torch.Tensor) -> None:
        self.key_slot[stage] = torch.cat([self.key_slot[stage], slots], 1)
        self.key_ok[stage] = torch.cat([self.key_ok[stage], ok], 1)


# -- numpy twins for the ONNX Runtime host side (tests/test_layout.py holds them equal) --------------------
def baseline_positions_np(attention_mask: np.ndarray) -> np.ndarray:
    """``baseline_positions`` in numpy. (B, L) int64"""
    return np.clip(np.cumsum(attention_mask.astype(np.int64), 1) - 1, 0, None)


def compact_np(active: np.ndarray, attention_mask: np.ndarray, positions: np.ndarray):
    """``compact`` in numpy: the active slots of each row in order, padded with the dummy slot L.
    Returns (index, key_ok, positions), each (B, T) with T = max active count."""
    B, L = active.shape
    counts = active.sum(1)
    T = int(counts.max()) if B else 0
    order = np.argsort(~active, axis=1, kind="stable")[:, :T]  # active slots first, in order
    filled = np.arange(T)[None, :] < counts[:, None]
    index = np.where(filled, order, L).astype(np.int64)
    safe = np.minimum(order, L - 1)
    key_ok = filled & np.take_along_axis(attention_mask.astype(bool), safe, 1)
    pos = np.where(filled, np.take_along_axis(positions, safe, 1), 0).astype(np.int64)
    return index, key_ok, pos
