"""Byte-level tokenizer: the 256 byte values plus one end-of-document token.

No vocabulary file, nothing to download, every input encodable; the model's embedding may
have more rows than this (padding to a multiple of 64, or GPT-2's 50304 for its shape).
"""

from __future__ import annotations

import numpy as np

EOS = 256
VOCAB_SIZE = 257
TOKEN_DTYPE = np.uint16


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
    return -(-VOCAB_SIZE // multiple) * multiple
