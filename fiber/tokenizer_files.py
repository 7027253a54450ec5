"""Tokenizer files that travel with a checkpoint (official FIBER: roberta-base's byte-level BPE).

``roberta_tokenizer_json(folder)`` turns a RoBERTa-style ``vocab.json`` + ``merges.txt`` (what
``RobertaTokenizer`` saves) into a Hugging Face ``tokenizer.json`` equivalent to
``RobertaTokenizerFast`` (byte-level pre-tokenizer without a prefix space, ``<s> ... </s>``
post-processing with trimmed offsets), or reads a ``tokenizer.json`` that the folder already holds.
The runtime only reads ``tokenizer.json`` (``tokenizers``, no transformers).
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

TOKENIZER_FILE = "tokenizer.json"
ROBERTA_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")


class TokenizerFileError(ValueError):
    """A tokenizer folder that cannot serve the checkpoint; the message names the file."""


def roberta_tokenizer(folder: str | Path) -> Tokenizer:
    """The folder's tokenizer: its ``tokenizer.json``, else ``vocab.json`` + ``merges.txt``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TokenizerFileError(f"tokenizer folder {folder} does not exist")
    if (folder / TOKENIZER_FILE).is_file():
        try:
            return Tokenizer.from_file(str(folder / TOKENIZER_FILE))
        except Exception as e:  # tokenizers raises plain Exception
            raise TokenizerFileError(f"{folder / TOKENIZER_FILE}: not a usable tokenizer.json ({e})") from None
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    missing = [p.name for p in (vocab_file, merges_file) if not p.is_file()]
    if missing:
        raise TokenizerFileError(f"tokenizer folder {folder}: missing {' and '.join(missing)} (give a "
                                 f"RoBERTa-style vocab.json + merges.txt, or a tokenizer.json)")
    try:
        vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
        bpe = models.BPE.from_file(str(vocab_file), str(merges_file), unk_token="<unk>")
    except Exception as e:
        raise TokenizerFileError(f"{folder}: cannot read vocab.json/merges.txt ({e})") from None
    absent = [t for t in ("<s>", "</s>", "<pad>") if t not in vocab]
    if absent:
        raise TokenizerFileError(f"{vocab_file}: no {', '.join(absent)} token (not a RoBERTa vocabulary)")
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.RobertaProcessing(("</s>", vocab["</s>"]), ("<s>", vocab["<s>"]),
                                                      trim_offsets=True, add_prefix_space=False)
    tok.add_special_tokens([t for t in ROBERTA_SPECIALS if t in vocab])
    return tok


def tokenizer_vocab_size(tok: Tokenizer) -> int:
    """Rows of the embedding table the tokenizer can index: max id + 1."""
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


def write_tokenizer(tok: Tokenizer, path: str | Path) -> None:
    tok.save(str(path))
