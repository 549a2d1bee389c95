"""Projectors: encoder features (n, T_enc, d_enc) -> LLM tokens (n, T, d_llm).

Built from the spec's tagged union by a closed registry. Module layouts follow the seed
systems so their published weights load as-is:

- ``mlp``: ``nn.Sequential`` with keys ``0.weight, 0.bias, 2.weight, 2.bias`` = LLaVA's
  ``mm_projector`` (mlp2x_gelu).
- ``qformer``: BLIP-2's ``query_tokens``, ``qformer`` (transformers ``Blip2QFormerModel``) and
  ``language_projection``.
- ``pool``: pooling, then ``nn.Sequential(LayerNorm, Linear)`` with keys ``1.weight, 1.bias`` =
  LTU's ``audio_proj``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from composer.errors import InputError, first_line

# Prefixes under which the seed systems store projector weights in their checkpoints.
_KNOWN_PREFIXES = ("model.mm_projector.", "mm_projector.", "model.multi_modal_projector.", "multi_modal_projector.")


class LinearProjector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)

    def num_tokens(self, encoder_tokens: int) -> int:
        return encoder_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class MLPProjector(nn.Sequential):
    """LLaVA ``mlp{depth}x_{act}``: Linear(in, out), then (act, Linear(out, out)) * (depth-1).

    With ``patch_pool`` k, the encoder's tokens (a row-major s x s patch grid) are first averaged
    over each k x k block (stride k): (s / k)^2 tokens, row-major. No parameters: the keys stay
    LLaVA's."""

    def __init__(
        self, in_dim: int, out_dim: int, depth: int = 2, activation: str = "gelu", patch_pool: int | None = None
    ):
        from transformers.activations import ACT2FN

        mods: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(depth - 1):
            mods += [ACT2FN[activation], nn.Linear(out_dim, out_dim)]
        super().__init__(*mods)
        self.patch_pool = patch_pool

    def num_tokens(self, encoder_tokens: int) -> int:
        if not self.patch_pool:
            return encoder_tokens
        from composer.errors import SpecError

        side, k = math.isqrt(encoder_tokens), self.patch_pool
        if side * side != encoder_tokens or side % k:
            raise SpecError(
                f"projector.patch_pool: {k} needs the encoder's tokens to form a square grid whose side it divides; "
                f"the encoder gives {encoder_tokens} tokens (check encoder.select: patch tokens only, no CLS)"
            )
        return (side // k) ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (n, T_enc, d_enc) -> (n, T, d_llm)
        if self.patch_pool:
            k, d = self.patch_pool, x.shape[-1]
            g = math.isqrt(x.shape[1]) // k
            x = x.reshape(-1, g, k, g, k, d).mean((2, 4)).reshape(-1, g * g, d)
        return super().forward(x)


class QFormerProjector(nn.Module):
    """BLIP-2 Q-Former: ``num_queries`` learned queries cross-attend to the encoder features."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        num_queries: int,
        num_layers: int,
        hidden_size: int,
        num_heads: int,
        intermediate_size: int,
        cross_attention_frequency: int,
    ):
        super().__init__()
        from transformers import Blip2QFormerConfig, Blip2QFormerModel

        cfg = Blip2QFormerConfig(
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            intermediate_size=intermediate_size,
            cross_attention_frequency=cross_attention_frequency,
            encoder_hidden_size=in_dim,
        )
        self.query_tokens = nn.Parameter(torch.zeros(1, num_queries, hidden_size))
        nn.init.normal_(self.query_tokens, std=cfg.initializer_range)
        self.qformer = Blip2QFormerModel(cfg)
        self.language_projection = nn.Linear(hidden_size, out_dim)

    def num_tokens(self, encoder_tokens: int) -> int:
        return self.query_tokens.shape[1]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (n, T_enc, d_enc); mask (n, T_enc), 1 = attend. Without a mask, rows that are exactly
        zero are padding: encoders of variable-size items (the GIN over molecules) zero their
        padded rows; features of fixed-size items (images) never are, so there it is all ones."""
        q = self.query_tokens.expand(x.shape[0], -1, -1)
        mask = (x != 0).any(-1) if mask is None else mask
        out = self.qformer(query_embeds=q, encoder_hidden_states=x, encoder_attention_mask=mask.long())
        return self.language_projection(out.last_hidden_state[:, : q.shape[1]])


class PoolProjector(nn.Sequential):
    """LTU's audio projector: pool the encoder tokens to ``tokens``, then LayerNorm (no affine)
    and Linear(in, out); keys ``1.weight, 1.bias`` = LTU's ``audio_proj``.

    With ``rows``, the (n, rows * cols, d) tokens are a row-major grid (AST: frequency rows x
    time columns): pool over the rows, then adaptively over the columns to ``tokens``, as LTU
    does (mean over frequency, then average pooling in time). Without, pool the token axis.
    Bins follow ``adaptive_avg_pool1d`` (bin i covers [floor(i*L/T), ceil((i+1)*L/T))), which
    also exports to ONNX for a fixed input length.
    """

    def __init__(self, in_dim: int, out_dim: int, *, tokens: int, pooling: str = "avg", rows: int | None = None):
        super().__init__(nn.LayerNorm(in_dim, elementwise_affine=False), nn.Linear(in_dim, out_dim))
        self.tokens, self.pooling, self.rows = tokens, pooling, rows

    def num_tokens(self, encoder_tokens: int) -> int:
        from composer.errors import SpecError

        rows = self.rows or 1
        if encoder_tokens % rows or encoder_tokens // rows < self.tokens:
            raise SpecError(
                f"projector: pool needs the encoder's {encoder_tokens} tokens to form {rows} row(s) of at least "
                f"num_tokens ({self.tokens}) columns; check projector.rows/num_tokens and encoder.select"
            )
        return self.tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (n, T_enc, d_enc) -> (n, tokens, d_llm)
        import torch.nn.functional as F

        n, t, d = x.shape
        if self.rows:
            grid = x.reshape(n, self.rows, t // self.rows, d)
            x = grid.mean(1) if self.pooling == "avg" else grid.amax(1)  # (n, cols, d)
        pool = F.adaptive_avg_pool1d if self.pooling == "avg" else F.adaptive_max_pool1d
        x = pool(x.transpose(1, 2), self.tokens).transpose(1, 2)  # (n, tokens, d)
        return super().forward(x)


def build_projector(spec, in_dim: int, out_dim: int) -> nn.Module:
    """Closed registry from the spec's ``type`` tag to a builder."""
    if spec.type == "linear":
        return LinearProjector(in_dim, out_dim)
    if spec.type == "mlp":
        return MLPProjector(in_dim, out_dim, depth=spec.depth, activation=spec.activation, patch_pool=spec.patch_pool)
    if spec.type == "qformer":
        return QFormerProjector(
            in_dim,
            out_dim,
            num_queries=spec.num_queries,
            num_layers=spec.num_layers,
            hidden_size=spec.hidden_size,
            num_heads=spec.num_heads,
            intermediate_size=spec.intermediate_size,
            cross_attention_frequency=spec.cross_attention_frequency,
        )
    if spec.type == "pool":
        return PoolProjector(in_dim, out_dim, tokens=spec.num_tokens, pooling=spec.pooling, rows=spec.rows)
    raise AssertionError(f"unreachable: projector type {spec.type!r}")  # the spec's union is closed


def read_weights(path: Path, what: str = "projector weights") -> dict[str, torch.Tensor]:
    """Read a safetensors file, or a torch ``.bin`` with ``weights_only=True`` (never pickle objects)."""
    if not path.is_file():
        raise InputError(f"{path}: {what} file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt/truncated files raise many types; name the file
        raise InputError(f"{path}: cannot read {what} ({type(e).__name__}: {first_line(e)})") from None


def load_projector_weights(projector: nn.Module, path: Path, where: str) -> None:
    """Load seed-layout weights (e.g. LLaVA ``mm_projector.bin``) into ``projector``, strictly."""
    from composer.hf_weights import load_strict, read_component  # whole-model checkpoints (BLIP-2): own tensors only

    raw = read_component(path, {k.split(".", 1)[0] for k in projector.state_dict()}, where)
    raw = read_weights(path) if raw is None else raw
    state = {}
    for k, v in raw.items():
        for p in _KNOWN_PREFIXES:
            if k.startswith(p):
                k = k[len(p) :]
                break
        state[k] = v
    if isinstance(projector, LinearProjector) and set(state) == {"weight", "bias"}:
        state = {f"proj.{k}": v for k, v in state.items()}
    try:
        load_strict(projector, state, f"{where}: {path}", "projector")
    except ValueError as e:
        raise InputError(str(e)) from None
