"""Packing samples into fixed-length chunks (LoLCATS ``ConcatDataset``, ``utils/packing.py``).

Samples are concatenated in order into one running buffer; **while the buffer is longer than**
``chunk_size`` its first ``chunk_size`` tokens are emitted. The final remainder (1..chunk_size tokens) is
dropped, and so are chunks whose labels are all ``IGNORE`` (nothing to train on). There is no separator and no
position or attention reset: samples straddle chunk boundaries and positions are ``0..chunk_size-1``.

Labels stay aligned with ``input_ids`` (label ``t`` is token ``t``); the loss does the next-token shift.

Notation: n = chunks, l = chunk_size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lolcats_jax.data.tokenize import IGNORE, Sample
from lolcats_jax.errors import DataError


def check_chunk_size(chunk_size: int, max_context: int) -> None:
    """Refuse a chunk that the model cannot attend over (or a non-positive one)."""
    if chunk_size <= 0:
        raise DataError(f"data.chunk_size must be positive, got {chunk_size}")
    if chunk_size > max_context:
        raise DataError(
            f"data.chunk_size {chunk_size} is larger than the model's context "
            f"(max_position_embeddings {max_context}); expected chunk_size <= {max_context}"
        )


def num_emitted_chunks(total_tokens: int, chunk_size: int) -> int:
    """Chunks the streaming rule emits from ``total_tokens`` tokens.

    Emitting only while ``len(buffer) > chunk_size`` always leaves a remainder of 1..chunk_size tokens, so
    the count depends only on the total: ``(total - 1) // chunk_size`` (0 for an empty stream).
    """
    return max(total_tokens - 1, 0) // chunk_size


def pack(samples: Sequence[Sample], chunk_size: int, max_context: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pack ``(input_ids, labels)`` samples into ``input_ids_nxl``, ``labels_nxl`` (both int32).

    Equivalent to the streaming buffer loop, computed on one concatenated array. When ``max_context`` is
    given, a ``chunk_size`` above it raises ``DataError``.
    """
    if max_context is not None:
        check_chunk_size(chunk_size, max_context)
    else:
        check_chunk_size(chunk_size, chunk_size)
    if samples:
        ids_t = np.concatenate([np.asarray(ids, dtype=np.int32) for ids, _ in samples])
        labels_t = np.concatenate([np.asarray(labels, dtype=np.int32) for _, labels in samples])
    else:
        ids_t = labels_t = np.zeros((0,), np.int32)
    if ids_t.shape != labels_t.shape:
        raise DataError(f"packing: {ids_t.shape[0]} token ids but {labels_t.shape[0]} labels (expected equal lengths)")
    n = num_emitted_chunks(ids_t.shape[0], chunk_size)
    ids_nxl = ids_t[: n * chunk_size].reshape(n, chunk_size)
    labels_nxl = labels_t[: n * chunk_size].reshape(n, chunk_size)
    trainable_n = (labels_nxl != IGNORE).any(axis=1)
    return np.ascontiguousarray(ids_nxl[trainable_n]), np.ascontiguousarray(labels_nxl[trainable_n])
