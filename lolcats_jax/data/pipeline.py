"""Assembling packed datasets and their grain iterators.

``build_datasets`` reads, tokenises and packs the configured files ONCE into numpy arrays (cached on disk,
see :mod:`lolcats_jax.data.cache`) and wraps them as grain ``MapDataset``s of chunks
``{"input_ids": int32[l], "labels": int32[l]}``. Validation comes from the ``validation`` files, or — when
none are configured — from the LAST ``val_size`` packed chunks, which are then removed from training.

``make_train_iterator`` turns the (global, identical on every host) training dataset into this process's
stream of batches: a deterministic shuffle that changes every epoch, repetition, this process's slice
``[process_index::process_count]`` of the global order, then batches of ``batch_size`` (the per-process batch;
the global batch is ``process_count * batch_size``). Its iterator's ``get_state()/set_state()`` round-trip and
it can be saved with Orbax through ``grain.checkpoint.CheckpointSave`` / ``CheckpointRestore``.

Notation: n = chunks, l = chunk_size, b = per-process batch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np

from lolcats_jax.config import DataConfig
from lolcats_jax.data.cache import cache_key, default_cache_dir, load_packed, save_packed
from lolcats_jax.data.packing import check_chunk_size, pack
from lolcats_jax.data.sources import load_records, resolve_paths
from lolcats_jax.data.tokenize import TEMPLATES, tokenize_records
from lolcats_jax.errors import DataError

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]  # {"input_ids": int32[b, l], "labels": int32[b, l]}


class PackedChunks(Sequence):
    """Random-access source over packed arrays; element ``i`` is a dict of two int32 ``[l]`` rows."""

    def __init__(self, input_ids_nxl: np.ndarray, labels_nxl: np.ndarray):
        if input_ids_nxl.shape != labels_nxl.shape or input_ids_nxl.ndim != 2:
            raise ValueError(f"expected two equal [n, l] arrays, got {input_ids_nxl.shape} and {labels_nxl.shape}")
        self.input_ids = input_ids_nxl
        self.labels = labels_nxl

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:  # type: ignore[override]
        return {
            "input_ids": np.array(self.input_ids[index], dtype=np.int32),
            "labels": np.array(self.labels[index], dtype=np.int32),
        }


def pack_files(
    files: list[Path],
    data_cfg: DataConfig,
    tokenizer: Any,
    *,
    max_context: int,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Packed ``(input_ids_nxl, labels_nxl)`` of ``files``, from the cache when an entry matches."""
    check_chunk_size(data_cfg.chunk_size, max_context)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = cache_key(
        files, fmt=data_cfg.format, template=data_cfg.template, chunk_size=data_cfg.chunk_size, tokenizer=tokenizer
    )
    if use_cache and (hit := load_packed(root, key)) is not None:
        log.info("packed data: cache hit %s (%d chunks)", root / key, hit[0].shape[0])
        return hit
    records = load_records(files, data_cfg.format)
    samples = tokenize_records(records, tokenizer, data_cfg.template)
    total = sum(int(ids.shape[0]) for ids, _ in samples)
    ids_nxl, labels_nxl = pack(samples, data_cfg.chunk_size, max_context)
    if ids_nxl.shape[0] == 0:
        names = ", ".join(map(str, files))
        raise DataError(
            f"empty dataset after packing: {names} give {len(records)} records, {total} tokens, no chunk of "
            f"{data_cfg.chunk_size} tokens with a trainable label (expected more than {data_cfg.chunk_size} tokens)"
        )
    n = int(ids_nxl.shape[0])
    log.info("packed data: %d records, %d tokens -> %d chunks of %d", len(records), total, n, data_cfg.chunk_size)
    if use_cache:
        meta = {"files": [str(f) for f in files], "records": len(records), "tokens": total, "chunks": n}
        save_packed(root, key, ids_nxl, labels_nxl, meta)
    return ids_nxl, labels_nxl


def _as_dataset(ids_nxl: np.ndarray, labels_nxl: np.ndarray) -> grain.MapDataset:
    return grain.MapDataset.source(PackedChunks(ids_nxl, labels_nxl))


def build_datasets(
    data_cfg: DataConfig,
    tokenizer: Any,
    *,
    max_context: int,
    process_index: int = 0,
    process_count: int = 1,
    base_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> tuple[grain.MapDataset, grain.MapDataset | None]:
    """``(train, validation)`` datasets of packed chunks; validation is ``None`` when there is none.

    ``train`` is the global training set (identical on every process; :func:`make_train_iterator` shards it
    after shuffling). ``validation`` is already this process's share: the chunks are cut to a multiple of
    ``process_count`` and process ``p`` keeps ``[p::process_count]``, so every host runs the same number of
    eval batches. Relative paths are resolved against ``base_dir`` (default: the working directory).
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} must lie in [0, process_count={process_count})")
    if data_cfg.template not in TEMPLATES:
        expected = ", ".join(TEMPLATES)
        raise DataError(f"data.template: unknown template {data_cfg.template!r} (expected one of {expected})")
    check_chunk_size(data_cfg.chunk_size, max_context)
    pack_kw = dict(max_context=max_context, cache_dir=cache_dir, use_cache=use_cache)
    train_files = resolve_paths(data_cfg.train, data_cfg.format, base_dir)
    train_ids, train_labels = pack_files(train_files, data_cfg, tokenizer, **pack_kw)

    if data_cfg.validation:
        val_files = resolve_paths(data_cfg.validation, data_cfg.format, base_dir)
        shared = sorted(set(val_files) & set(train_files))
        if shared:
            raise DataError(f"{shared[0]}: listed in both data.train and data.validation (expected disjoint files)")
        val_ids, val_labels = pack_files(val_files, data_cfg, tokenizer, **pack_kw)
    elif data_cfg.val_size > 0:
        n = train_ids.shape[0]
        if data_cfg.val_size >= n:
            raise DataError(
                f"data.val_size {data_cfg.val_size} leaves no training chunks: {', '.join(map(str, train_files))} "
                f"pack into only {n} chunks of {data_cfg.chunk_size} (expected val_size < {n})"
            )
        val_ids, val_labels = train_ids[n - data_cfg.val_size :], train_labels[n - data_cfg.val_size :]
        train_ids, train_labels = train_ids[: n - data_cfg.val_size], train_labels[: n - data_cfg.val_size]
    else:
        val_ids = val_labels = None

    if data_cfg.max_train_chunks is not None:
        train_ids, train_labels = train_ids[: data_cfg.max_train_chunks], train_labels[: data_cfg.max_train_chunks]
    train = _as_dataset(train_ids, train_labels)
    if val_ids is None:
        return train, None
    usable = val_ids.shape[0] // process_count * process_count
    if usable == 0:
        raise DataError(
            f"validation has {val_ids.shape[0]} chunks, fewer than the {process_count} processes (expected one each)"
        )
    val = _as_dataset(val_ids[:usable], val_labels[:usable])[process_index::process_count]
    return train, val


def steps_per_epoch(num_chunks: int, batch_size: int, process_count: int = 1) -> int:
    """Optimizer steps in one pass over ``num_chunks`` with a global batch of ``process_count * batch_size``."""
    return num_chunks // (batch_size * process_count)


def make_train_iterator(
    train_ds: grain.MapDataset,
    batch_size: int,
    seed: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    worker_count: int = 0,
) -> grain.DatasetIterator:
    """This process's iterator of shuffled training batches ``{"input_ids", "labels"}: int32[b, l]``.

    The global order is a permutation of all chunks, a new one each epoch (``seed + epoch``); ``num_epochs=None``
    repeats forever. Process ``p`` takes global positions ``p, p + process_count, ...``, so the processes
    together read every chunk of an epoch exactly once. With a finite ``num_epochs`` the stream is cut to a
    multiple of the global batch so every process yields the same number of batches. ``worker_count > 0``
    prefetches in that many worker processes (grain multiprocessing; needs a ``__main__`` guard).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} must lie in [0, process_count={process_count})")
    global_batch = batch_size * process_count
    if len(train_ds) < global_batch:
        raise DataError(f"training data has {len(train_ds)} chunks, fewer than one global batch of {global_batch}")
    ds = train_ds.shuffle(seed=seed % 2**32).repeat(num_epochs)
    if num_epochs is not None:
        ds = ds[: len(ds) // global_batch * global_batch]
    ds = ds[process_index::process_count].batch(batch_size, drop_remainder=True)
    iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0))
    if worker_count > 0:
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(iter_ds)


def make_eval_iterator(
    val_ds: grain.MapDataset, batch_size: int, *, max_batches: int | None = None
) -> grain.DatasetIterator:
    """Unshuffled validation batches in a fixed order (the last partial batch is dropped), at most ``max_batches``."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if len(val_ds) < batch_size:
        raise DataError(f"validation has {len(val_ds)} chunks on this process, fewer than one batch of {batch_size}")
    ds = val_ds.batch(batch_size, drop_remainder=True)
    if max_batches is not None:
        ds = ds[:max_batches]
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0)))
