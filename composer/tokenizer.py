"""Tokenizers: pretrained (AutoTokenizer, no remote code) or the built-in byte-level one.

The byte tokenizer needs no files, so inline-config models build offline: ids 0-3 are
``<pad> <s> </s> <unk>``, ids 4-259 the 256 bytes; BOS is prepended. It is a real
``PreTrainedTokenizerFast`` and saves/loads like any other.
"""

from __future__ import annotations

from composer.errors import InputError, first_line

BYTE_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
BYTE_VOCAB_SIZE = len(BYTE_SPECIALS) + 256


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    alphabet = ByteLevel.alphabet()  # the 256 printable stand-ins of GPT-2's byte-level BPE
    vocab = {t: i for i, t in enumerate(BYTE_SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def load_tokenizer(source: str, where: str, *, local: bool = False):
    """``local``: ``source`` is a directory of this machine; never look it up on the Hub."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=False, local_files_only=local)
    except (OSError, ValueError) as e:
        raise InputError(f"{where}: cannot load tokenizer {source!r}: {first_line(e)}") from None
    except KeyError as e:  # valid JSON of another schema, e.g. a tokenizer.json without `added_tokens`
        raise InputError(f"{where}: cannot load tokenizer {source!r}: a tokenizer file lacks the key {e}") from None
    except Exception as e:  # the `tokenizers` parser raises bare Exceptions ("data did not match ...")
        raise InputError(f"{where}: cannot load tokenizer {source!r}: {type(e).__name__}: {first_line(e)}") from None


def add_placeholders(tokenizer, placeholders: list[str]) -> dict[str, int]:
    """Register each placeholder as one special token; returns placeholder -> id."""
    tokenizer.add_tokens(placeholders, special_tokens=True)
    if tokenizer.pad_token is None:
        # LLaMA-style tokenizers ship without a pad token; padding is masked anyway
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return {p: tokenizer.convert_tokens_to_ids(p) for p in placeholders}
