"""ComposedModel: encoders + projectors + an HF causal LM, with DeepInsert splicing.

Text tokens run through layers [0, k); each modality's projected tokens are spliced into the
hidden states at their placeholder slots at layer k (its ``insert_at``); layers [k, N) see the
full sequence. ``insert_at: 0`` is the classic LLaVA-style model. See ``composer.layout``.

Example::

    model = composer.build(composer.load_spec("specs/tiny/llava.yaml"))
    batch = model.prepare(["USER: <image>\\nWhat is it? ASSISTANT:"], image=["cat.png"])
    ids = model.generate(**batch, max_new_tokens=16)   # (B, n) new tokens only
    print(model.decode(ids))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from composer.adapters.llm import LLMAdapter, llm_adapter_for
from composer.errors import InputError
from composer.layout import KVState, Layout, additive_mask

IGNORE_INDEX = -100


class ComposedModel(nn.Module):
    """A multimodal LM composed from a spec. Build with ``composer.build(spec)``.

    Submodules (and so state-dict prefixes): ``llm`` (the HF ``*ForCausalLM``),
    ``encoders.<modality>``, ``projectors.<modality>``.
    """

    def __init__(self, spec, llm: nn.Module, encoders: dict[str, nn.Module], projectors: dict[str, nn.Module],
                 tokenizer, processors: dict[str, Any], placeholder_ids: dict[str, int]):
        super().__init__()
        self.spec = spec
        self.llm = llm
        self.encoders = nn.ModuleDict(encoders)
        self.projectors = nn.ModuleDict(projectors)
        self.tokenizer = tokenizer
        self.processors = processors
        self.placeholder_ids = placeholder_ids  # modality -> token id
        self.adapter: LLMAdapter = llm_adapter_for(llm)

    # -- facts -----------------------------------------------------------------------------
    @property
    def insert_at(self) -> dict[str, int]:
        return self.spec.insert_layers()

    @property
    def num_layers(self) -> int:
        return self.adapter.shape.num_layers

    def num_tokens(self, modality: str) -> int:
        """MM tokens per item of ``modality`` (what one placeholder expands to)."""
        return self.projectors[modality].num_tokens(self.encoders[modality].num_tokens)

    @property
    def device(self) -> torch.device:
        return next(self.llm.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.get_input_embeddings().weight.dtype

    # -- encoding --------------------------------------------------------------------------
    def encode(self, modality: str, inputs: torch.Tensor) -> torch.Tensor:
        """Raw modality inputs (n items) -> projected tokens (n, T, d_llm)."""
        feats = self.encoders[modality](inputs.to(self.device))
        proj = self.projectors[modality]
        feats = feats.to(next(proj.parameters()).dtype)
        return proj(feats).to(self.dtype)

    def _slot_masks(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {m: input_ids == pid for m, pid in self.placeholder_ids.items()}

    def _mm_tokens(self, slot_masks: dict[str, torch.Tensor], modality_inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        unknown = sorted(set(modality_inputs) - set(self.encoders))
        if unknown:
            raise InputError(f"unknown modality input(s) {unknown}; this model has {sorted(self.encoders)}")
        out = {}
        for m, mask in slot_masks.items():
            slots = int(mask.sum())
            x = modality_inputs.get(m)
            if slots == 0:
                if x is not None and len(x):
                    raise InputError(f"{len(x)} {m} input(s) given but the prompts have no {m} placeholder")
                continue
            if x is None:
                raise InputError(f"the prompts have {m} placeholder slots but no `{m}` input was given")
            tok = self.encode(m, x)  # (n, T, d)
            if tok.shape[0] * tok.shape[1] != slots:
                raise InputError(
                    f"{m}: the prompts have {slots} placeholder slots ({slots / tok.shape[1]:g} items of "
                    f"{tok.shape[1]} tokens) but {tok.shape[0]} {m} input(s) were given"
                )
            out[m] = tok.reshape(-1, tok.shape[-1])
        return out

    # -- the DeepInsert pass -------------------------------------------------------------------
    def _prefill(self, input_ids, attention_mask, modality_inputs, state: KVState | None = None) -> torch.Tensor:
        """Run all layers over a laid-out prompt; returns final hidden states (B, L, d)."""
        B, L = input_ids.shape
        slot_masks = self._slot_masks(input_ids)
        mm = self._mm_tokens(slot_masks, modality_inputs)
        layout = Layout.build(attention_mask, slot_masks, self.insert_at, self.num_layers)
        is_mm = torch.zeros_like(input_ids, dtype=torch.bool)
        for m in slot_masks.values():
            is_mm |= m
        text_ids = input_ids.masked_fill(is_mm, 0)  # MM slots are never embedded as text
        canvas = self.adapter.embed(text_ids, layout.positions)  # (B, L, d)
        canvas = F.pad(canvas, (0, 0, 0, 1))  # (B, L+1, d): slot L is the dummy
        pos_emb = self.adapter.position_embedding(layout.positions)
        d = canvas.shape[-1]
        for i, st in enumerate(layout.stages):
            for m in st.enter:
                if m not in mm:
                    continue
                tok = mm[m] if pos_emb is None else mm[m] + pos_emb[slot_masks[m]]
                canvas = canvas.masked_scatter(F.pad(slot_masks[m], (0, 1))[..., None], tok)
            idx = st.index[..., None].expand(-1, -1, d)
            h = canvas.gather(1, idx)  # (B, T_s, d) active slots only
            mask = additive_mask(st.index, st.index, st.key_ok, h.dtype)
            h = self.adapter.run_layers(h, st.start, st.end, st.positions, mask, state.cache if state else None)
            canvas = canvas.scatter(1, idx, h)
            if state is not None:
                state.key_slot.append(st.index)
                state.key_ok.append(st.key_ok)
                state.bounds.append((st.start, st.end))
        if state is not None:
            state.next_slot = L
            state.next_pos = layout.positions[:, -1] + 1
        return canvas[:, :L]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **modality_inputs) -> CausalLMOutputWithPast:
        """Logits (B, L, V) over every slot (as the classic model), and the LM loss when ``labels``
        are given (labels at MM slots and padding are ignored; shifted inside)."""
        input_ids = input_ids.to(self.device)
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.device)
        hidden = self._prefill(input_ids, attention_mask, modality_inputs)
        logits = self.adapter.head(hidden)
        loss = None
        if labels is not None:
            labels = labels.to(self.device)
            is_mm = torch.zeros_like(input_ids, dtype=torch.bool)
            for m in self._slot_masks(input_ids).values():
                is_mm |= m
            labels = labels.masked_fill(is_mm | ~attention_mask.bool(), IGNORE_INDEX)
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    # -- generation ------------------------------------------------------------------------------
    def _decode_step(self, tokens: torch.Tensor, state: KVState) -> torch.Tensor:
        """One new token per row through all N layers, with each stage's cache. -> logits (B, V)"""
        B = tokens.shape[0]
        pos = state.next_pos[:, None]
        h = self.adapter.embed(tokens, pos)
        slot = torch.full((B, 1), state.next_slot, device=tokens.device, dtype=torch.long)
        ok = torch.ones((B, 1), device=tokens.device, dtype=torch.bool)
        for s, (start, end) in enumerate(state.bounds):
            state.append(s, slot, ok)
            mask = additive_mask(slot, state.key_slot[s], state.key_ok[s], h.dtype)
            h = self.adapter.run_layers(h, start, end, pos, mask, state.cache)
        state.next_slot += 1
        state.next_pos = state.next_pos + 1
        return self.adapter.head(h[:, -1])

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int | None = None, do_sample: bool | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id: int | list[int] | None = None,
                 generator: torch.Generator | None = None, use_cache: bool = True, streamer=None,
                 **modality_inputs) -> torch.Tensor:
        """Greedy or sampled generation; returns the new token ids (B, n), padded after EOS.

        ``use_cache=False`` recomputes the whole sequence every step (the reference the cached
        path is tested against). Inputs must be left-padded. ``streamer`` follows HF's
        ``BaseStreamer`` (``put``/``end``).
        """
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        g = self.spec.generation
        max_new_tokens = g.max_new_tokens if max_new_tokens is None else max_new_tokens
        do_sample = g.do_sample if do_sample is None else do_sample
        temperature = g.temperature if temperature is None else temperature
        top_k = g.top_k if top_k is None else top_k
        top_p = g.top_p if top_p is None else top_p
        input_ids = input_ids.to(self.device)
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.device)
        if not bool(attention_mask[:, -1].all()):
            raise InputError("generate() needs left-padded inputs (the last column of attention_mask must be 1)")
        warpers = LogitsProcessorList()
        if do_sample:
            if temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(temperature))
            if top_k:
                warpers.append(TopKLogitsWarper(top_k))
            if top_p is not None and top_p < 1.0:
                warpers.append(TopPLogitsWarper(top_p))
        eos = self._eos_ids(eos_token_id)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        vocab = self.adapter.shape.vocab_size
        banned = [i for i in self.placeholder_ids.values() if i < vocab]  # never generate a placeholder

        B = input_ids.shape[0]
        out = torch.empty((B, 0), dtype=torch.long, device=self.device)
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        state = None
        for step in range(max_new_tokens):
            if not use_cache:
                ids = torch.cat([input_ids, out], 1)
                am = torch.cat([attention_mask, torch.ones_like(out)], 1)
                logits = self.adapter.head(self._prefill(ids, am, modality_inputs)[:, -1])
            elif state is None:
                state = KVState(cache=_new_cache(), key_slot=[], key_ok=[], next_slot=0, next_pos=None)
                logits = self.adapter.head(self._prefill(input_ids, attention_mask, modality_inputs, state)[:, -1])
            else:
                logits = self._decode_step(out[:, -1:], state)
            logits = logits.float()
            if banned:
                logits[:, banned] = float("-inf")
            if do_sample:
                scores = warpers(torch.cat([input_ids, out], 1), logits)
                nxt = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
            else:
                nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            out = torch.cat([out, nxt[:, None]], 1)
            if streamer is not None:
                streamer.put(nxt.cpu())
            if eos:
                done |= torch.isin(nxt, torch.tensor(eos, device=nxt.device))
                if bool(done.all()):
                    break
        if streamer is not None:
            streamer.end()
        return out

    def _eos_ids(self, eos_token_id) -> list[int]:
        if eos_token_id is None:
            eos_token_id = getattr(self.llm.generation_config, "eos_token_id", None) or self.tokenizer.eos_token_id
        if eos_token_id is None:
            return []
        return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)

    # -- text and media in, text out ---------------------------------------------------------------
    def format_prompt(self, instruction: str) -> str:
        """Fill the spec's prompt template, e.g. ``"USER: <image>\\n{instruction} ASSISTANT:"``."""
        return self.spec.prompt.template.replace("{instruction}", instruction)

    def prepare(self, prompts: str | list[str], *, padding_side: str = "left", **modality_items) -> dict[str, Any]:
        """Tokenise prompts (each placeholder once per item, as a user writes it), expand each
        placeholder to its modality's token count, pad, and preprocess the media.

        ``modality_items``: per modality, a list (in prompt order, row after row) of file paths,
        PIL images, or already-preprocessed tensors. Returns ``input_ids``, ``attention_mask``
        and one tensor per modality, ready for ``forward``/``generate``.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if padding_side not in ("left", "right"):
            raise InputError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        counts = {m: 0 for m in self.placeholder_ids}
        rows = []
        for i, prompt in enumerate(prompts):
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
            row = []
            for t in ids:
                m = self._modality_of_id.get(t)
                if m is None:
                    row.append(t)
                else:
                    counts[m] += 1
                    row.extend([t] * self.num_tokens(m))
            rows.append(row)
        batch: dict[str, Any] = {}
        for m, n in counts.items():
            items = modality_items.get(m)
            items = [] if items is None else list(items) if isinstance(items, (list, tuple)) else [items]
            if len(items) != n:
                ph = self.spec.modalities[m].placeholder
                raise InputError(f"{m}: the prompts contain {n} {ph!r} placeholder(s) but {len(items)} {m} item(s) were given")
            if n:
                batch[m] = self.encoders[m].preprocess(self.processors[m], items)
        extra = sorted(set(modality_items) - set(counts))
        if extra:
            raise InputError(f"unknown modality {extra}; this model has {sorted(counts)}")
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            sl = slice(width - len(r), width) if padding_side == "left" else slice(0, len(r))
            ids[i, sl] = torch.tensor(r, dtype=torch.long)
            mask[i, sl] = 1
        return {"input_ids": ids, "attention_mask": mask, **batch}

    @property
    def _modality_of_id(self) -> dict[int, str]:
        return {pid: m for m, pid in self.placeholder_ids.items()}

    def decode(self, ids: torch.Tensor) -> list[str]:
        return self.tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)

    # -- persistence -----------------------------------------------------------------------------------
    def save_pretrained(self, out_dir: str | Path, *, overwrite: bool = False) -> Path:
        from composer.checkpoint import save_pretrained

        return save_pretrained(self, out_dir, overwrite=overwrite)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ComposedModel:
        from composer.checkpoint import load_pretrained

        return load_pretrained(path)


def _new_cache():
    from transformers import DynamicCache

    return DynamicCache()
