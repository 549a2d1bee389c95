"""LLM family adapters: llama-style (Llama, Mistral, Qwen2, Qwen3: RoPE, GQA) and OPT.

An adapter is a thin view over a Hugging Face ``*ForCausalLM`` module; it owns no weights, so
the composed model's state dict keeps the HF checkpoint keys (``llm.model.layers.0...``).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from torch import nn

from composer.errors import SpecError


@functools.cache
def cache_kwarg(layer_class: type) -> str:
    """The name a decoder layer takes its KV cache by: ``cache`` (transformers >= 5.24, where
    ``past_key_values`` is deprecated with a warning on every call), else ``past_key_values``."""
    params = inspect.signature(layer_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@dataclass(frozen=True)
class LLMShape:
    """What the FLOPs model and the exporter need to know about an LLM."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    gated_mlp: bool


class LLMAdapter:
    """Base class; subclasses bind one HF family's module names."""

    family: str = ""

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # -- structure -----------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        raise NotImplementedError

    @property
    def shape(self) -> LLMShape:
        raise NotImplementedError

    @property
    def layer_class(self) -> type[nn.Module]:
        return type(self.layers[0])

    @property
    def sliding_window(self) -> int | None:
        """The attention window HF applies in at least one layer (None: full attention).
        Mistral windows every layer when ``sliding_window`` is set; Qwen2/Qwen3 the layers that
        ``layer_types`` marks ``sliding_attention`` (with ``use_sliding_window``)."""
        c = self.config
        w = getattr(c, "sliding_window", None)
        if not w or c.model_type not in ("mistral", "qwen2", "qwen3"):
            return None
        types = getattr(c, "layer_types", None)
        if c.model_type == "mistral" and types is None:
            return int(w)
        return int(w) if types is not None and "sliding_attention" in types else None

    # -- the DeepInsert contract -----------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def position_embedding(self, positions: torch.Tensor) -> torch.Tensor | None:
        """Added to MM tokens when they are spliced in (learned absolute positions only)."""
        return None

    def run_layers(
        self,
        hidden: torch.Tensor,  # (B, T, d)
        start: int,
        end: int,
        positions: torch.Tensor,  # (B, T) baseline position ids
        mask: torch.Tensor,  # (B, 1, T, P+T) additive
        cache=None,
    ) -> torch.Tensor:
        raise NotImplementedError

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class LlamaAdapter(LLMAdapter):
    """Llama / Mistral / Qwen2 / Qwen3: ``model.embed_tokens``, ``model.layers``, ``model.norm``,
    ``model.rotary_emb``, ``lm_head`` (tied embeddings are handled by HF itself)."""

    family = "llama"

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    @property
    def shape(self) -> LLMShape:
        c = self.config
        heads = c.num_attention_heads
        return LLMShape(
            num_layers=c.num_hidden_layers,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_heads=heads,
            num_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
            vocab_size=c.vocab_size,
            gated_mlp=True,
        )

    def embed(self, input_ids, positions):
        return self.model.model.embed_tokens(input_ids)

    def run_layers(self, hidden, start, end, positions, mask, cache=None):
        rope = self.model.model.rotary_emb(hidden, position_ids=positions)
        for layer in self.layers[start:end]:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=positions,
                use_cache=cache is not None,
                position_embeddings=rope,
                **{cache_kwarg(type(layer)): cache},
            )
        return hidden

    def head(self, hidden):
        return self.model.lm_head(self.model.model.norm(hidden))


class OPTAdapter(LLMAdapter):
    """OPT / Galactica: learned absolute positions (offset 2) added at layer 0; MM tokens inserted
    at k > 0 get the embedding of their (baseline) position added when they are spliced in."""

    family = "opt"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        dec = model.model.decoder
        if dec.project_in is not None or dec.project_out is not None:
            raise SpecError(
                "llm.config.word_embed_proj_dim: OPT variants with project_in/out (word_embed_proj_dim != hidden_size,"
                f" e.g. opt-350m) are not supported, got {self.config.word_embed_proj_dim}"
            )

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.model.decoder.layers

    @property
    def shape(self) -> LLMShape:
        c = self.config
        return LLMShape(
            num_layers=c.num_hidden_layers,
            hidden_size=c.hidden_size,
            intermediate_size=c.ffn_dim,
            num_heads=c.num_attention_heads,
            num_kv_heads=c.num_attention_heads,
            head_dim=c.hidden_size // c.num_attention_heads,
            vocab_size=c.vocab_size,
            gated_mlp=False,
        )

    def position_embedding(self, positions):
        pe = self.model.model.decoder.embed_positions
        return pe.weight[positions + pe.offset]

    def embed(self, input_ids, positions):
        dec = self.model.model.decoder
        return dec.embed_tokens(input_ids) + self.position_embedding(positions)

    def run_layers(self, hidden, start, end, positions, mask, cache=None):
        for layer in self.layers[start:end]:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=positions,
                use_cache=cache is not None,
                **{cache_kwarg(type(layer)): cache},
            )
        return hidden

    def head(self, hidden):
        dec = self.model.model.decoder
        if dec.final_layer_norm is not None:
            hidden = dec.final_layer_norm(hidden)
        return self.model.lm_head(hidden)


# HF `model_type` -> adapter. Closed: a spec cannot name anything else.
LLM_ADAPTERS: dict[str, type[LLMAdapter]] = {
    "llama": LlamaAdapter,
    "mistral": LlamaAdapter,
    "qwen2": LlamaAdapter,
    "qwen3": LlamaAdapter,
    "opt": OPTAdapter,
}


def llm_adapter_for(model: nn.Module) -> LLMAdapter:
    mt = model.config.model_type
    if mt not in LLM_ADAPTERS:
        raise SpecError(f"llm: model_type {mt!r} is not supported; supported: {sorted(LLM_ADAPTERS)}")
    return LLM_ADAPTERS[mt](model)
