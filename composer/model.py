"""ComposedModel: encoders + projectors + an HF causal LM, with DeepInsert splicing.

Text tokens run through layers [0, k); each modality's projected tokens are spliced into the
hidden states at their placeholder slots at layer k (its ``insert_at``); layers [k, N) see the
full sequence. ``insert_at: 0`` is the classic LLaVA-style model. See ``composer.layout`` and
docs/architecture.md ("DeepInsert semantics", "Structure is fixed at build time").

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
from composer.frontend import FrontEnd
from composer.generation import eos_ids
from composer.layout import KVState, Layout, additive_mask
from composer.prompting import check_context, check_window

IGNORE_INDEX = -100


class ComposedModel(nn.Module, FrontEnd):
    """A multimodal LM composed from a spec. Build with ``composer.build(spec)``.

    Submodules (and so state-dict prefixes): ``llm`` (the HF ``*ForCausalLM``),
    ``encoders.<modality>``, ``projectors.<modality>``. ``format_prompt``, ``prepare``,
    ``generate`` and ``decode`` come from ``composer.frontend.FrontEnd``, shared with the ONNX
    pipeline.
    """

    runtime = "torch"

    def __init__(
        self,
        spec,
        llm: nn.Module,
        encoders: dict[str, nn.Module],
        projectors: dict[str, nn.Module],
        tokenizer,
        processors: dict[str, Any],
        placeholder_ids: dict[str, int],
    ):
        super().__init__()
        self.spec = spec
        self.llm = llm
        self.encoders = nn.ModuleDict(encoders)
        self.projectors = nn.ModuleDict(projectors)
        self.tokenizer = tokenizer
        self.processors = processors
        self.placeholder_ids = placeholder_ids  # modality -> token id
        self.adapter: LLMAdapter = llm_adapter_for(llm)
        # The insertion layers are fixed here, at build time; `with_insert_at` is the one way to
        # get other ones (a new model over the same modules). Writing into `spec` changes nothing.
        self._insert_at = dict(spec.insert_layers())

    # -- facts -----------------------------------------------------------------------------
    @property
    def insert_at(self) -> dict[str, int]:
        """Modality -> the LLM layer where its tokens enter (a copy; see ``with_insert_at``)."""
        return dict(self._insert_at)

    def with_insert_at(self, insert_at: dict[str, int] | int) -> ComposedModel:
        """This model with other insertion layers: a new ``ComposedModel`` over the *same*
        modules (weights shared, nothing copied), whose spec records the new ``insert_at``.

        ``insert_at``: one layer for every modality, or {modality: layer} for some of them (the
        others keep theirs). Each layer must be in [0, num_layers). Example::

            at0 = model.with_insert_at(0)             # the classic layer-0 model, same weights
            mixed = model.with_insert_at({"image": 12})
        """
        new = {m: insert_at for m in self.encoders} if isinstance(insert_at, int) else dict(insert_at)
        unknown = sorted(set(new) - set(self.encoders))
        if unknown:
            raise InputError(f"insert_at: unknown modalities {unknown}; this model has {sorted(self.encoders)}")
        for m, k in new.items():
            if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < self.num_layers:
                raise InputError(
                    f"modalities.{m}.insert_at: must be an integer in [0, {self.num_layers}) "
                    f"for this {self.num_layers}-layer LLM, got {k!r}"
                )
        spec = self.spec.model_copy(deep=True)  # keeps the spec's source dir (relative paths)
        for m, k in new.items():
            spec.modalities[m] = spec.modalities[m].model_copy(update={"insert_at": k})
        out = ComposedModel(
            spec,
            self.llm,
            dict(self.encoders),
            dict(self.projectors),
            self.tokenizer,
            self.processors,
            self.placeholder_ids,
        )
        return out.train(self.training)

    @property
    def context_length(self) -> int | None:
        """The LLM's ``max_position_embeddings`` (None when its config has none)."""
        return getattr(self.llm.config, "max_position_embeddings", None)

    @property
    def num_layers(self) -> int:
        return self.adapter.shape.num_layers

    def num_tokens(self, modality: str) -> int:
        """MM tokens per item of ``modality`` (what one placeholder expands to)."""
        return self.projectors[modality].num_tokens(self.encoders[modality].num_tokens)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def encoder_types(self) -> dict[str, str]:
        """Modality -> encoder type (registry name)."""
        from composer.adapters import encoder_type_of

        return {m: encoder_type_of(enc) for m, enc in self.encoders.items()}

    def processor(self, m: str):
        """Modality ``m``'s preprocessor (e.g. an HF image processor)."""
        return self.processors[m]

    @property
    def input_device(self) -> torch.device:
        return self.device

    @property
    def device(self) -> torch.device:
        return next(self.llm.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.get_input_embeddings().weight.dtype

    # -- encoding --------------------------------------------------------------------------
    def encode(self, modality: str, inputs: torch.Tensor) -> torch.Tensor:
        """Raw modality inputs (n items) -> projected tokens (n, T, d_llm)."""
        enc = self.encoders[modality]
        feats = enc(**{k: v.to(self.device) for k, v in enc.as_inputs(inputs).items()})
        proj = self.projectors[modality]
        feats = feats.to(next(proj.parameters()).dtype)
        return proj(feats).to(self.dtype)

    def _slot_masks(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {m: input_ids == pid for m, pid in self.placeholder_ids.items()}

    def _mm_tokens(
        self, slot_masks: dict[str, torch.Tensor], modality_inputs: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        out = {}
        for m in self.check_modality_inputs(slot_masks, modality_inputs):
            tok = self.encode(m, modality_inputs[m])  # (n, T, d)
            self.check_token_count(m, int(slot_masks[m].sum()), tok)
            out[m] = tok.reshape(-1, tok.shape[-1])
        return out

    # -- the DeepInsert pass -------------------------------------------------------------------
    def _prefill(self, input_ids, attention_mask, modality_inputs, state: KVState | None = None) -> torch.Tensor:
        """Run all layers over a laid-out prompt; returns final hidden states (B, L, d)."""
        B, L = input_ids.shape
        check_context(attention_mask, 0, self.context_length)
        check_window(L, 0, self.sliding_window)
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
        for _i, st in enumerate(layout.stages):
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

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        return_logits: bool = True,
        **modality_inputs,
    ) -> CausalLMOutputWithPast:
        """Logits (B, L, V) over every slot (as the classic model), and the LM loss when ``labels``
        are given (labels at MM slots and padding are ignored; shifted inside): the mean over this
        batch's label tokens, or their sum divided by ``num_items_in_batch`` (the label tokens of a
        whole optimizer step, across micro-batches and ranks; as in transformers).

        ``return_logits=False`` (with ``labels``; what training uses) runs the LM head on the
        labelled positions only and returns no logits: with a 49k-token vocabulary the head over
        every slot costs as much as several decoder layers, and it is not skipped by DeepInsert."""
        input_ids = input_ids.to(self.device)
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.device)
        if labels is None and not return_logits:
            raise InputError("return_logits=False needs labels (it computes the loss only)")
        hidden = self._prefill(input_ids, attention_mask, modality_inputs)
        logits = self.adapter.head(hidden) if return_logits else None
        loss = None
        if labels is not None:
            labels = labels.to(self.device)
            is_mm = torch.zeros_like(input_ids, dtype=torch.bool)
            for m in self._slot_masks(input_ids).values():
                is_mm |= m
            target = labels.masked_fill(is_mm | ~attention_mask.bool(), IGNORE_INDEX)[:, 1:]
            keep = target != IGNORE_INDEX
            scores = logits[:, :-1][keep] if logits is not None else self.adapter.head(hidden[:, :-1][keep])
            loss = F.cross_entropy(
                scores.float(), target[keep], reduction="mean" if num_items_in_batch is None else "sum"
            )
            if num_items_in_batch is not None:
                loss = loss / num_items_in_batch
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

    def decoder(
        self, input_ids, attention_mask, modality_inputs: dict[str, Any], *, use_cache: bool = True, reserve: int = 0
    ):
        """``decode_loop``'s ``step`` over one left-padded batch: its first call (no new tokens yet)
        runs the prefill and fills this batch's KV caches, each later call one decode step;
        -> logits (B, V). ``use_cache=False`` recomputes the whole sequence every call.
        ``reserve`` (decode steps to make room for) is the ONNX pipeline's; the torch caches grow."""
        state = KVState(cache=_new_cache(), key_slot=[], key_ok=[], next_slot=0, next_pos=None)

        @torch.no_grad()
        def step(out: torch.Tensor) -> torch.Tensor:
            out = out.to(self.device)
            if not use_cache:
                ids = torch.cat([input_ids, out], 1)
                am = torch.cat([attention_mask, torch.ones_like(out)], 1)
                return self.adapter.head(self._prefill(ids, am, modality_inputs)[:, -1])
            if out.shape[1] == 0:
                return self.adapter.head(self._prefill(input_ids, attention_mask, modality_inputs, state)[:, -1])
            return self._decode_step(out[:, -1:], state)

        return step

    @property
    def generation_spec(self):
        """The spec's ``generation`` section (the defaults of ``generate``)."""
        return self.spec.generation

    @property
    def sliding_window(self) -> int | None:
        """The LLM's sliding attention window (None: full attention); see ``check_window``."""
        return self.adapter.sliding_window

    @property
    def eos_token_ids(self) -> list[int]:
        """The ids that end generation: the LLM's generation config's, else the tokenizer's EOS."""
        return eos_ids(None, self.llm.generation_config, self.tokenizer)

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    @property
    def banned_token_ids(self) -> list[int]:
        """Placeholder ids inside the LLM vocabulary: never generated."""
        return [i for i in self.placeholder_ids.values() if i < self.adapter.shape.vocab_size]

    # -- text and media in, text out ---------------------------------------------------------------
    @property
    def placeholders(self) -> dict[str, str]:
        """Modality -> its placeholder string (e.g. ``"<image>"``)."""
        return {m: self.spec.modalities[m].placeholder for m in self.encoders}

    @property
    def prompt_template(self) -> str | None:
        """The spec's ``prompt.template``; None: prompts use the tokenizer's chat template."""
        return self.spec.prompt.template if self.spec.prompt is not None else None

    # -- persistence -----------------------------------------------------------------------------------
    def save_pretrained(
        self,
        out_dir: str | Path,
        *,
        overwrite: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
        max_shard_size: int | str | None = None,
        weights: str = "full",
    ) -> Path:
        """Write a composer checkpoint. ``state_dict``: full weights to write instead of this
        module's own (gathered from FSDP shards). ``max_shard_size`` (bytes or "5GB"; default
        transformers' 50GB): larger weights are written as shards with an index file.
        ``weights="trainable"``: only what the spec's pretrained sources do not provide (LoRA,
        projectors, trained or randomly built components); loading rebuilds the rest from them."""
        from composer.checkpoint import MAX_SHARD_SIZE, save_pretrained

        return save_pretrained(
            self,
            out_dir,
            overwrite=overwrite,
            state_dict=state_dict,
            max_shard_size=max_shard_size or MAX_SHARD_SIZE,
            weights=weights,
        )

    @classmethod
    def from_pretrained(cls, path: str | Path, *, revision: str | None = None) -> ComposedModel:
        """A composer checkpoint: a local dir, or a Hub repo id (``owner/name``, ``owner/name@rev``
        or ``revision=``) that is not a local path: downloaded to the HF cache (safetensors only;
        ``HF_HUB_OFFLINE=1``: from the cache), then loaded."""
        from composer.checkpoint import load_pretrained
        from composer.hub.publish import load_from_hub
        from composer.refs import is_hub_repo

        if not is_hub_repo(str(path)):
            if revision is not None:
                raise InputError(f"{path}: revision={revision!r} applies to Hub repos; this is a local path")
            return load_pretrained(path)
        try:
            return load_from_hub(str(path), revision=revision)
        except InputError as e:
            raise InputError(f"{path}: no such local directory; {e}") from None

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool = False,
        revision: str | None = None,
        token: str | None = None,
        commit_message: str | None = None,
    ):
        """Save this model with a generated model card and push it to ``repo_id`` (one commit);
        returns huggingface_hub's ``CommitInfo``. See ``composer.hub.publish.push_to_hub``."""
        from composer.hub.publish import push_to_hub

        return push_to_hub(
            self, repo_id, private=private, revision=revision, token=token, commit_message=commit_message
        )


def _new_cache():
    from transformers import DynamicCache

    return DynamicCache()
