"""composer.layout, the one definition of DeepInsert's stages and slot compaction: the torch
functions against an independent per-row reference, the numpy twins (ONNX Runtime host side)
against the torch ones on random masks, and the export graph plan derived from the stages."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from composer.layout import (
    Layout,
    additive_mask,
    baseline_positions,
    baseline_positions_np,
    compact,
    compact_np,
    graph_stages,
    stage_bounds,
)


def _random_batch(seed: int, B: int = 5, L: int = 23, modalities=("image", "audio")):
    """Masks with left and right padding (per row) and several modalities' slots in runs."""
    g = np.random.default_rng(seed)
    mask = np.ones((B, L), bool)
    slot_masks = {m: np.zeros((B, L), bool) for m in modalities}
    for b in range(B):
        left, right = int(g.integers(0, 5)), int(g.integers(0, 5))
        if b % 2:
            mask[b, :left] = False
        else:
            mask[b, L - right :] = False
        real = np.flatnonzero(mask[b])
        for m in modalities:
            if g.random() < 0.2:  # some rows have no item of this modality
                continue
            start = int(g.choice(real[:-3]))
            run = real[start - real[0] : start - real[0] + int(g.integers(1, 4))]
            free = run[~np.any([slot_masks[o][b, run] for o in modalities], axis=0)]
            slot_masks[m][b, free] = True
    return mask, slot_masks


def test_baseline_positions_count_real_tokens_only():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert baseline_positions(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]  # padding pinned to 0 or the last
    # the reference: count of real tokens before each slot, clamped at 0
    ref = [[max(0, sum(row[: i + 1]) - 1) for i in range(len(row))] for row in mask.tolist()]
    assert baseline_positions(mask).tolist() == ref


def test_stage_bounds_and_graph_stages():
    assert stage_bounds({"image": 2}, 4) == [(0, 2, []), (2, 4, ["image"])]
    assert stage_bounds({"image": 0}, 4) == [(0, 4, ["image"])]
    assert stage_bounds({"a": 3, "b": 1, "c": 3}, 6) == [(0, 1, []), (1, 3, ["b"]), (3, 6, ["a", "c"])]
    # export: an early text graph over [0, k1), then one late graph per distinct insertion layer
    assert graph_stages({"image": 2}, 4) == [(0, 2, []), (2, 4, ["image"])]
    assert graph_stages({"image": 0}, 4) == [(0, 0, []), (0, 4, ["image"])]  # embedding-only early graph
    assert graph_stages({"a": 3, "b": 1, "c": 3}, 6) == [(0, 1, []), (1, 3, ["b"]), (3, 6, ["a", "c"])]
    assert graph_stages({"a": 0, "b": 2}, 5) == [(0, 0, []), (0, 2, ["a"]), (2, 5, ["b"])]


@pytest.mark.parametrize("seed", range(6))
def test_layout_matches_a_per_row_reference(seed):
    mask, slot_masks = _random_batch(seed)
    insert_at = {"image": 1, "audio": 3}
    lay = Layout.build(torch.from_numpy(mask), {m: torch.from_numpy(v) for m, v in slot_masks.items()}, insert_at, 5)
    B, L = mask.shape
    assert [(s.start, s.end, s.enter) for s in lay.stages] == [(0, 1, []), (1, 3, ["image"]), (3, 5, ["audio"])]
    for st in lay.stages:
        entered = [m for m, k in insert_at.items() if k <= st.start]
        for b in range(B):
            want = [
                i
                for i in range(L)
                if not any(slot_masks[m][b, i] for m in slot_masks) or any(slot_masks[m][b, i] for m in entered)
            ]
            n = len(want)
            assert st.index[b, :n].tolist() == want and (st.index[b, n:] == L).all()  # dummy slot L after
            assert st.key_ok[b, :n].tolist() == [bool(mask[b, i]) for i in want] and not st.key_ok[b, n:].any()
            pos = [max(0, int(mask[b, : i + 1].sum()) - 1) for i in want]
            assert st.positions[b, :n].tolist() == pos


@pytest.mark.parametrize("seed", range(10))
def test_numpy_twins_equal_the_torch_layout(seed):
    """The runtime's numpy compaction gives the torch stages' slots, validity and positions, for
    text-only and entering-modality selections, padding on both sides, two modalities."""
    mask, slot_masks = _random_batch(seed, B=4 + seed % 3, L=17 + seed)
    tmask = torch.from_numpy(mask)
    pos_t = baseline_positions(tmask)
    pos_n = baseline_positions_np(mask)
    assert np.array_equal(pos_t.numpy(), pos_n)
    is_mm = np.zeros_like(mask)
    for v in slot_masks.values():
        is_mm |= v
    selections = [~is_mm, slot_masks["image"], slot_masks["audio"], ~is_mm | slot_masks["image"], np.zeros_like(mask)]
    for active in selections:
        got = compact_np(active, mask, pos_n)
        want = compact(torch.from_numpy(active), tmask, pos_t)
        for g, w in zip(got, want, strict=True):
            assert g.shape == tuple(w.shape) and np.array_equal(g, w.numpy())


@pytest.mark.parametrize("seed", range(4))
def test_runtime_stage_keys_are_the_torch_stage_keys(seed):
    """The ONNX Runtime host side builds each late stage as (previous keys) + (entering slots);
    as a set per row (causality follows slot ids) that is the torch stage's compacted slots."""
    mask, slot_masks = _random_batch(seed)
    insert_at = {"image": 2, "audio": 2} if seed % 2 else {"image": 1, "audio": 3}
    N = 5
    lay = Layout.build(torch.from_numpy(mask), {m: torch.from_numpy(v) for m, v in slot_masks.items()}, insert_at, N)
    pos = baseline_positions_np(mask)
    is_mm = np.zeros_like(mask)
    for v in slot_masks.values():
        is_mm |= v
    slots, valid, p = compact_np(~is_mm, mask, pos)
    graphs = graph_stages(insert_at, N)
    per_graph = [(slots, valid, p)]
    for _, _, enter in graphs[1:]:
        act = np.zeros_like(mask)
        for m in enter:
            act |= slot_masks[m]
        s2, v2, p2 = compact_np(act, mask, pos)
        slots, valid, p = (np.concatenate([slots, s2], 1), np.concatenate([valid, v2], 1), np.concatenate([p, p2], 1))
        per_graph.append((slots, valid, p))
    L = mask.shape[1]
    torch_by_start = {st.start: st for st in lay.stages}
    for (start, _, _), (s, v, p) in zip(graphs, per_graph, strict=True):
        st = torch_by_start[start]
        for b in range(mask.shape[0]):
            real = s[b] < L
            got = sorted(zip(s[b][real].tolist(), v[b][real].tolist(), p[b][real].tolist(), strict=False))
            n = int((st.index[b] < L).sum())
            want = list(
                zip(st.index[b, :n].tolist(), st.key_ok[b, :n].tolist(), st.positions[b, :n].tolist(), strict=False)
            )
            assert got == want


def test_additive_mask_is_causal_over_slots_and_hides_invalid_keys():
    q = torch.tensor([[1, 4]])
    k = torch.tensor([[0, 1, 3, 4, 6]])
    ok = torch.tensor([[True, False, True, True, True]])
    m = additive_mask(q, k, ok, torch.float32)
    assert m.shape == (1, 1, 2, 5)
    allowed = (m[0, 0] == 0).tolist()
    assert allowed == [[True, False, False, False, False], [True, False, True, True, False]]
    assert (m[0, 0][~(m[0, 0] == 0)] == torch.finfo(torch.float32).min).all()
