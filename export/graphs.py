"""The torch modules that become the bundle's ONNX graphs.

Attention masks are built inside the graphs from slot ids (``composer.layout.additive_mask``),
so the runtime passes small integer tensors, never (B, 1, T, P+T) float masks. Every input
has only independent dynamic sizes (B, T, M, P, R): lengths such as P+T are formed inside. The KV cache
crosses the graph boundary as flat tensors: ``past_key.{i}`` / ``past_value.{i}`` of shape
(B, kv_heads, P, head_dim) in, ``present_key.{i}`` / ``present_value.{i}`` (B, kv_heads,
P+T, head_dim) out, with absolute layer indices ``i``; a ``DynamicCache`` is rebuilt inside.

Graphs:
- ``encoder.<m>``: raw modality input -> projected tokens (n, T_m, d)
- ``early_text``: embeddings (+ learned positions) and layers [0, k1) over text tokens only
- ``late_multimodal`` (one per distinct insertion layer k_j): layers [k_j, k_{j+1}); the
  previous hidden states and the MM tokens entering at k_j are concatenated inside the
  graph. Causality follows slot ids and RoPE the baseline position ids, so the order of rows
  in the compact sequence does not matter and a concat is an exact splice. The last one ends
  with the final norm and LM head, evaluated only at ``logit_rows``.
"""

from __future__ import annotations

import torch
from torch import nn

from composer.layout import additive_mask


def _cache_from(past: list[torch.Tensor], start: int):
    from transformers import DynamicCache

    cache = DynamicCache()
    for j in range(len(past) // 2):
        cache.update(past[2 * j], past[2 * j + 1], start + j)
    return cache


def _present(cache, start: int, end: int) -> list[torch.Tensor]:
    out = []
    for i in range(start, end):
        out += [cache.layers[i].keys, cache.layers[i].values]
    return out


class EncoderGraph(nn.Module):
    def __init__(self, encoder: nn.Module, projector: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.encoder, self.projector, self.out_dtype = encoder, projector, dtype

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(**dict(zip(self.encoder.input_names, inputs, strict=True)))
        return self.projector(feats.to(next(self.projector.parameters()).dtype)).to(self.out_dtype)


class EarlyText(nn.Module):
    """input_ids, position_ids, slots, valid (B, T); past_slots, past_valid (B, P); past KV of
    layers [0, end) -> hidden (B, T, d), present KV (B, h, P+T, hd)."""

    def __init__(self, model, end: int):
        super().__init__()
        self.llm = model.llm  # registers the weights
        self.adapter, self.end = model.adapter, end

    def forward(self, input_ids, position_ids, slots, valid, past_slots, past_valid, past: list[torch.Tensor]):
        h = self.adapter.embed(input_ids, position_ids)
        if self.end == 0:
            return (h,)
        keys, ok = torch.cat([past_slots, slots], 1), torch.cat([past_valid, valid], 1)
        mask = additive_mask(slots, keys, ok, h.dtype)
        cache = _cache_from(past, 0)
        h = self.adapter.run_layers(h, 0, self.end, position_ids, mask, cache)
        return (h, *_present(cache, 0, self.end))


class LateStage(nn.Module):
    """hidden (B, Tp, d) with hidden_slots/hidden_valid/hidden_positions (B, Tp); mm_tokens
    (B, M, d) with mm_slots/mm_valid/mm_positions (B, M); past_slots/past_valid (B, P);
    [logit_rows (B, R)]; past KV of layers [start, end) -> hidden (B, Tp+M, d) or logits
    (B, R, V) float32, present KV (B, h, P+Tp+M, hd)."""

    def __init__(self, model, start: int, end: int, last: bool):
        super().__init__()
        self.llm = model.llm
        self.adapter, self.start, self.end, self.last = model.adapter, start, end, last

    def forward(self, hidden, hidden_slots, hidden_valid, hidden_positions, mm_tokens, mm_slots, mm_valid,
                mm_positions, past_slots, past_valid, logit_rows, past: list[torch.Tensor]):
        pe = self.adapter.position_embedding(mm_positions)
        mm = mm_tokens if pe is None else mm_tokens + pe
        h = torch.cat([hidden, mm.to(hidden.dtype)], dim=1)
        slots = torch.cat([hidden_slots, mm_slots], 1)
        position_ids = torch.cat([hidden_positions, mm_positions], 1)
        keys = torch.cat([past_slots, slots], 1)
        ok = torch.cat([past_valid, hidden_valid, mm_valid], 1)
        mask = additive_mask(slots, keys, ok, h.dtype)
        cache = _cache_from(past, self.start)
        h = self.adapter.run_layers(h, self.start, self.end, position_ids, mask, cache)
        present = _present(cache, self.start, self.end)
        if not self.last:
            return (h, *present)
        rows = h.gather(1, logit_rows[..., None].expand(-1, -1, h.shape[-1]))
        return (self.adapter.head(rows).float(), *present)
