"""Tokenizers: SentencePiece model files, ``tokenizer.json`` files (the
``tokenizers`` package: CLIP's BPE, BERT WordPiece, ...), and bytes.

Each maps a string to a fixed-length int32 vector: the tokenizer's own
leading special tokens (``prefix``: CLIP's start-of-text, BERT's [CLS]), the
ids, its trailing ones (``suffix``: EOS / [SEP]), then PAD up to ``max_len``.
A caption too long for the context is cut before the suffix, so the suffix
(EOS) always survives and EOS pooling always finds it.

Padding is id 0 everywhere (the text tower masks id 0). A vocabulary whose
id 0 is a real token (CLIP's "!", SentencePiece's <unk>) is shifted up by one
(``vocab_size`` grows by one); a published embedding table then maps to rows
1.. of ours, and row 0 is never read.
"""

from __future__ import annotations

import html
import io
import os
from typing import Iterable, Protocol, Sequence

import numpy as np

PAD_ID = 0


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int
    prefix: tuple[int, ...]  # ids before the text (BOS / [CLS]); () for none
    suffix: tuple[int, ...]  # ids after it (EOS / [SEP])

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...  # ids as ``encode`` gives them (no special tokens)


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
        self.prefix, self.suffix = (), (self.eos_id,)

    def encode(self, text: str) -> list[int]:
        return [i + self._offset for i in self._sp.encode(text)]

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode([i - self._offset for i in ids if i >= self._offset])


class ByteTokenizer:
    """UTF-8 bytes shifted by 2: 0 = PAD, 1 = EOS."""

    vocab_size = 258
    eos_id = 1
    prefix, suffix = (), (1,)

    def encode(self, text: str) -> list[int]:
        return [b + 2 for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 2 for i in ids if 2 <= i < 258).decode("utf-8", errors="replace")


_PAD_NAMES = ("[pad]", "<pad>", "<|pad|>", "<|padding|>")


def clean_text(text: str) -> str:
    """The cleaning CLIP-style tokenizers expect before their own normaliser:
    HTML entities unescaped (twice, as scraped alt-text is often double-
    escaped), runs of whitespace collapsed, ends stripped."""
    return " ".join(html.unescape(html.unescape(text)).split())


class JsonTokenizer:
    """A ``tokenizer.json`` file read by the ``tokenizers`` package.

    Its own normaliser (lower-casing, accent stripping, NFC...) and
    pre-tokeniser run as the file says, after ``clean_text``. The special
    tokens its post-processor puts around a text become ``prefix`` and
    ``suffix`` (CLIP: <|startoftext|> … <|endoftext|>; BERT: [CLS] … [SEP]).
    Ids shift up by one unless the file's id 0 is a padding token."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer as _HF

        if not os.path.isfile(path):
            raise FileNotFoundError(f"config.data.tokenizer_path: no tokenizer.json at {path!r}")
        try:
            tok = _HF.from_file(path)
        except Exception as e:  # the Rust loader raises a bare Exception for a malformed file
            raise ValueError(f"config.data.tokenizer_path: {path!r} is not a tokenizer.json file ({e})") from None
        tok.no_padding()
        tok.no_truncation()
        self._tok = tok
        zero = tok.id_to_token(0)
        self._offset = 0 if zero is not None and zero.lower() in _PAD_NAMES else 1
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True) + self._offset
        marker = "a"
        bare = tok.encode(marker, add_special_tokens=False).ids
        full = tok.encode(marker, add_special_tokens=True).ids
        start = next((i for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare), None)
        if start is None:
            raise ValueError(f"config.data.tokenizer_path: {path!r}: cannot locate the text between its special tokens")
        self.prefix = tuple(i + self._offset for i in full[:start])
        self.suffix = tuple(i + self._offset for i in full[start + len(bare):])
        # EOS: the last trailing special token, else the file's end-of-text token.
        eos = self.suffix[-1] if self.suffix else None
        if eos is None:
            for name in ("<|endoftext|>", "</s>", "[SEP]", "<eos>"):
                if tok.token_to_id(name) is not None:
                    eos = tok.token_to_id(name) + self._offset
                    break
        if eos is None:
            raise ValueError(f"config.data.tokenizer_path: {path!r} defines no end-of-text token")
        self.eos_id = eos

    def encode(self, text: str) -> list[int]:
        ids = self._tok.encode(clean_text(text), add_special_tokens=False).ids
        return [i + self._offset for i in ids]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([i - self._offset for i in ids if i >= self._offset], skip_special_tokens=True)


KINDS = ("sentencepiece", "tokenizer_json", "bytes")


def make_tokenizer(kind: str, path: str | None) -> Tokenizer:
    if kind in ("sentencepiece", "tokenizer_json") and not path:
        hint = " (or fit one with python -m vlm_jax.data.ingest --fit_tokenizer VOCAB)" if kind == "sentencepiece" else ""
        raise ValueError(f"config.data.tokenizer_path must name a file for config.data.tokenizer={kind!r}{hint}")
    if kind == "sentencepiece":
        return SentencePieceTokenizer(path)
    if kind == "tokenizer_json":
        return JsonTokenizer(path)
    if kind == "bytes":
        return ByteTokenizer()
    raise ValueError(f"config.data.tokenizer must be one of {KINDS}, got {kind!r}")


def tokenize(tok: Tokenizer, texts: Iterable[str], max_len: int) -> np.ndarray:
    """Fixed-length rows: prefix, ids (cut to fit), suffix, then PAD_ID."""
    return rows_of_ids(tok, (tok.encode(t) for t in texts), max_len)


def rows_of_ids(tok: Tokenizer, id_lists: Iterable[Sequence[int]], max_len: int) -> np.ndarray:
    """``tokenize``'s rows from already-encoded texts."""
    room = max_len - len(tok.prefix) - len(tok.suffix)
    if room < 0:
        raise ValueError(f"config.model.text.max_len={max_len} cannot hold the tokenizer's special tokens")
    rows = []
    for ids in id_lists:
        ids = [*tok.prefix, *list(ids)[:room], *tok.suffix]
        rows.append(ids + [PAD_ID] * (max_len - len(ids)))
    return np.asarray(rows, dtype=np.int32).reshape(-1, max_len)


def detokenize(tok: Tokenizer, row) -> str:
    """The text of one token row (``tokenize``'s layout, or a decoder's output):
    cut at the first EOS or padding after the prefix, special tokens dropped."""
    ids = [int(i) for i in row]
    if tuple(ids[:len(tok.prefix)]) == tok.prefix:
        ids = ids[len(tok.prefix):]
    end = next((k for k, i in enumerate(ids) if i in (PAD_ID, tok.eos_id)), len(ids))
    return tok.decode(ids[:end])


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
