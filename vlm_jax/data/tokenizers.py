"""Tokenizers: SentencePiece (any model file) and a byte-level fallback.

Both map a string to a fixed-length int32 vector: ids, then EOS, then PAD (0)
up to ``max_len``; a caption too long for the context keeps EOS in the last
slot so that EOS pooling always finds it.
"""

from __future__ import annotations

import io
import os
from typing import Iterable, Protocol

import numpy as np

PAD_ID = 0


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...


class SentencePieceTokenizer:
    def __init__(self, model_path: str):
        import sentencepiece as spm

        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"config.data.tokenizer_path: no SentencePiece model at {model_path!r}")
        self._sp = spm.SentencePieceProcessor(model_file=model_path)
        self.vocab_size = int(self._sp.get_piece_size())
        self.eos_id = int(self._sp.eos_id())
        if self._sp.pad_id() != PAD_ID:
            # Models trained elsewhere often have pad = -1 and unk = 0; id 0 is
            # then a real token, and we reserve one extra id for padding.
            self._offset = 1
            self.vocab_size += 1
            self.eos_id += 1
        else:
            self._offset = 0
        if self.eos_id < self._offset:
            raise ValueError(f"SentencePiece model {model_path!r} has no EOS piece")

    def encode(self, text: str) -> list[int]:
        return [i + self._offset for i in self._sp.encode(text)]


class ByteTokenizer:
    """UTF-8 bytes shifted by 2: 0 = PAD, 1 = EOS."""

    vocab_size = 258
    eos_id = 1

    def encode(self, text: str) -> list[int]:
        return [b + 2 for b in text.encode("utf-8")]


def make_tokenizer(kind: str, path: str | None) -> Tokenizer:
    if kind == "sentencepiece":
        if not path:
            raise ValueError("config.data.tokenizer_path must name a SentencePiece model file")
        return SentencePieceTokenizer(path)
    if kind == "bytes":
        return ByteTokenizer()
    raise ValueError(f"config.data.tokenizer must be 'sentencepiece' or 'bytes', got {kind!r}")


def tokenize(tok: Tokenizer, texts: Iterable[str], max_len: int) -> np.ndarray:
    rows = []
    for t in texts:
        ids = tok.encode(t)[: max_len - 1] + [tok.eos_id]
        rows.append(ids + [PAD_ID] * (max_len - len(ids)))
    return np.asarray(rows, dtype=np.int32).reshape(-1, max_len)


def train_sentencepiece(sentences: Iterable[str], path: str, vocab_size: int) -> None:
    """Fits a small BPE model on ``sentences`` and writes it to ``path`` atomically."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        pad_id=0,
        unk_id=1,
        bos_id=-1,
        eos_id=2,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)
