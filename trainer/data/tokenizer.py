"""Tokenizers: the built-in byte tokenizer, or any Hugging Face ``tokenizer.json``.

``data.tokenizer`` names one: ``bytes`` (the 256 byte values plus an end-of-document token:
no file, nothing to download, every input encodable; the default), or the path of a
``tokenizer.json`` (BLOOM's, GPT-2's, Llama's, or one trained by ``yoto tokenizer train``).
A run copies its tokenizer file into the run directory and records its digest, so resume,
``yoto sample`` and evaluation use exactly the tokenizer it trained with.

Token ids are stored as uint16 when the vocabulary fits (the byte tokenizer, GPT-2's
50,257), else uint32 (BLOOM's 250,680). The model's embedding may have more rows than the
vocabulary (padding to a multiple of 64).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from yoto.errors import DataError

BYTES = "bytes"  # data.tokenizer of the built-in byte tokenizer

# the byte tokenizer's end-of-document token and vocabulary
EOS = 256
VOCAB_SIZE = 257
TOKEN_DTYPE = np.uint16

# end-of-document tokens looked for in a tokenizer.json when data.eos is unset:
# GPT-2/GPT-NeoX/yoto, Llama/T5/BLOOM, Llama 3, Gemma
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
TRAINED_EOS = "<|endoftext|>"


def dtype_for(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a vocabulary."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def padded(vocab_size: int, multiple: int = 64) -> int:
    return -(-vocab_size // multiple) * multiple


class Tokenizer(Protocol):
    """What the data path, sampling and evaluation need of a tokenizer."""

    spec: str  # data.tokenizer as given: "bytes" or a path
    vocab_size: int  # ids are in [0, vocab_size)
    eos_id: int  # appended after every document
    dtype: np.dtype  # of stored token ids
    digest: str  # "bytes", or "sha256:<hex>" of the tokenizer file

    def encode(self, data: bytes | str) -> np.ndarray: ...
    def encode_batch(self, docs: Sequence[bytes | str]) -> list[np.ndarray]: ...
    def decode(self, ids: np.ndarray | Sequence[int]) -> str: ...
    def file_bytes(self) -> bytes | None: ...  # what a run directory keeps (None: nothing)


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, EOS 256. Bytes in, so any file is encodable (Latin-1 too)."""

    spec = BYTES
    vocab_size = VOCAB_SIZE
    eos_id = EOS
    dtype = np.dtype(TOKEN_DTYPE)
    digest = BYTES

    def encode(self, data: bytes | str) -> np.ndarray:
        return encode(data)

    def encode_batch(self, docs: Sequence[bytes | str]) -> list[np.ndarray]:
        return [encode(d) for d in docs]

    def decode(self, ids: np.ndarray | Sequence[int]) -> str:
        return decode(ids)

    def file_bytes(self) -> bytes | None:
        return None


class FileTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer loaded from a ``tokenizer.json``.

    Documents are encoded without the file's own special tokens (no BOS from a Llama
    post-processor); the data path appends ``eos_id`` after each. Bytes that are not UTF-8
    are replaced by U+FFFD first: these tokenizers take text, not bytes."""

    def __init__(self, path: str | Path, eos_token: str | None = None) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        file = Path(path).expanduser()
        if file.is_dir():
            file = file / "tokenizer.json"
        if not file.is_file():
            raise DataError(
                f"data.tokenizer {str(path)!r} is not a tokenizer file: give 'bytes', the "
                "path of a Hugging Face tokenizer.json (or a folder holding one), or train "
                "one with `yoto tokenizer train --vocab N --out tok.json`"
            )
        raw = file.read_bytes()
        try:
            self._tok = HFTokenizer.from_str(raw.decode("utf-8"))
        except Exception as exc:  # tokenizers raises a bare Exception for a bad file
            raise DataError(
                f"data.tokenizer {str(file)!r} is not a Hugging Face tokenizer.json "
                f"({str(exc).splitlines()[0][:200]})"
            ) from None
        self.spec = str(path)
        self.path = file
        self._raw = raw
        self.digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.dtype = dtype_for(self.vocab_size)
        self.eos_token, self.eos_id = self._eos(eos_token)

    def _eos(self, wanted: str | None) -> tuple[str, int]:
        names = (wanted,) if wanted else EOS_CANDIDATES
        for name in names:
            i = self._tok.token_to_id(name)
            if i is not None:
                return name, int(i)
        if wanted:
            raise DataError(
                f"data.eos {wanted!r} is not in the vocabulary of {str(self.path)!r}; "
                "give one of its special tokens"
            )
        specials = [t.content for t in self._tok.get_added_tokens_decoder().values()][:12]
        raise DataError(
            f"{str(self.path)!r} has none of the usual end-of-document tokens "
            f"({', '.join(EOS_CANDIDATES)}); set data.eos to one of its tokens"
            + (f" (its special tokens: {', '.join(specials)})" if specials else "")
        )

    @staticmethod
    def _text(data: bytes | str) -> str:
        return data if isinstance(data, str) else data.decode("utf-8", errors="replace")

    def encode(self, data: bytes | str) -> np.ndarray:
        ids = self._tok.encode(self._text(data), add_special_tokens=False).ids
        return np.asarray(ids, dtype=self.dtype)

    def encode_batch(self, docs: Sequence[bytes | str]) -> list[np.ndarray]:
        encoded = self._tok.encode_batch([self._text(d) for d in docs], add_special_tokens=False)
        return [np.asarray(e.ids, dtype=self.dtype) for e in encoded]

    def decode(self, ids: np.ndarray | Sequence[int]) -> str:
        """Ids to text; end-of-document tokens become newlines, ids past the vocabulary
        (padding rows the model should never emit) are dropped."""
        flat = [i for i in np.asarray(ids).reshape(-1).tolist() if 0 <= i < self.vocab_size]
        pieces, current = [], []
        for i in flat:
            if i == self.eos_id:
                pieces.append(current)
                current = []
            else:
                current.append(i)
        pieces.append(current)
        return "\n".join(self._tok.decode(p, skip_special_tokens=False) for p in pieces)

    def file_bytes(self) -> bytes | None:
        return self._raw


def load(spec: str, eos_token: str | None = None) -> Tokenizer:
    """``data.tokenizer`` (and ``data.eos``) as a tokenizer."""
    if spec == BYTES:
        if eos_token:
            raise DataError("data.eos applies to a tokenizer file, not 'bytes'")
        return ByteTokenizer()
    return FileTokenizer(spec, eos_token)


@functools.lru_cache(maxsize=8)
def _cached(spec: str, eos: str | None, stamp: tuple[int, int] | None) -> Tokenizer:
    return load(spec, eos)


def cached(spec: str, eos: str | None = None) -> Tokenizer:
    """:func:`load`, remembered while the file is unchanged (a sweep sizes many configs)."""
    path = Path(spec).expanduser()
    if spec != BYTES and path.is_dir():
        path = path / "tokenizer.json"
    stamp = None
    if spec != BYTES and path.is_file():
        st = path.stat()
        stamp = (st.st_mtime_ns, st.st_size)
    return _cached(spec, eos, stamp)


RUN_FILE = "tokenizer.json"  # a run directory's copy of its tokenizer file


def for_run(run_dir: str | Path, eos: str | None = None) -> Tokenizer:
    """The tokenizer a run trained with: its own copy, or bytes when it has none."""
    copy = Path(run_dir) / RUN_FILE
    return FileTokenizer(copy, eos) if copy.is_file() else ByteTokenizer()


def describe(tok: Tokenizer) -> dict[str, object]:
    """What a manifest records of a tokenizer."""
    return {
        "spec": tok.spec,
        "digest": tok.digest,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "dtype": tok.dtype.name,
    }


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    out: str | Path,
    *,
    length: int | None = None,
    show_progress: bool = True,
    min_frequency: int = 2,
) -> FileTokenizer:
    """A byte-level BPE (GPT-2's construction: any UTF-8 text encodable, no unknown token)
    with ``<|endoftext|>`` as its end-of-document token, trained on ``texts`` and written
    to ``out`` as a tokenizer.json. ``length`` (documents) drives the progress bar."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise DataError(
            f"a byte-level BPE needs a vocabulary of at least 258 (256 bytes, the "
            f"end-of-document token and one merge); got --vocab {vocab_size}"
        )
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[TRAINED_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(iter(texts), trainer=trainer, length=length)
    path = Path(out).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tok.save(str(tmp))
    tmp.replace(path)
    return FileTokenizer(path)


def texts_of(docs: Iterable[object]) -> Iterator[str]:
    """Documents' text for training a tokenizer (bytes decoded as UTF-8, bad bytes replaced)."""
    for doc in docs:
        yield doc.data.decode("utf-8", errors="replace")  # type: ignore[attr-defined]


# --- the byte tokenizer as functions (a run without a tokenizer file) ----------------------


def encode(text: str | bytes) -> np.ndarray:
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, dtype=np.uint8).astype(TOKEN_DTYPE)


def decode(ids: np.ndarray | list[int]) -> str:
    """Bytes to text; end-of-document tokens become newlines, ids past 255 other than EOS
    (padding rows the model should never emit) are dropped."""
    out = bytearray()
    for i in np.asarray(ids).reshape(-1).tolist():
        if i < 256:
            out.append(i)
        elif i == EOS:
            out.extend(b"\n")
    return out.decode("utf-8", errors="replace")


def padded_vocab_size(multiple: int = 64) -> int:
    return padded(VOCAB_SIZE, multiple)
