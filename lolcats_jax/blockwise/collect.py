"""Stage `collect`: run the softmax model over the distill data and store the residual stream entering every block.

Notation: B global batch, b per-process batch, P processes, T tokens, E hidden size, S block starts.

The samples are the distill data's packed chunks in a fixed order (train, then validation; no shuffle), capped by
`block.max_train_samples` / `block.max_val_samples`. Each process owns a contiguous range of every split and
writes only its own samples; all processes step through the (same number of) global batches together, a process
whose range is exhausted feeding padding that nobody writes.

The collect has its own batch size (`block.collect_batch_size`, default: one sequence per data × fsdp × expert device — the
training batch size of a block job is 1, which would leave all but one device idle). A batch is split over the
batch mesh axes like a training batch, every block input comes back with the same split, and each process reads
only the rows its own devices hold: nothing is gathered to every device.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from lolcats_jax.blockwise.fingerprint import block_fingerprint, data_fingerprint, model_fingerprint
from lolcats_jax.blockwise.layout import block_starts, store_dir
from lolcats_jax.blockwise.store import SPLITS, BlockInputStore, StoreLayout, free_bytes, human_bytes
from lolcats_jax.config import to_dict
from lolcats_jax.distributed import AlignedJit, barrier
from lolcats_jax.errors import UserError
from lolcats_jax.model.llama import Llama
from lolcats_jax.train.stages import RunContext, load_base
from lolcats_jax.train.step import BATCH_AXES, batch_axes, batch_sharding


def _log(ctx: RunContext, msg: str) -> None:
    if ctx.is_main:
        print(f"[collect] {msg}", file=sys.stderr, flush=True)


def distill_samples(ctx: RunContext) -> dict[str, np.ndarray]:
    """{split: int32 (n, T)}: the packed distill chunks, in order, capped by block.max_*_samples."""
    from lolcats_jax.data.pipeline import build_datasets

    d, blk = ctx.cfg.distill.data, ctx.cfg.block
    train_ds, val_ds = build_datasets(d, ctx.tokenizer, max_context=ctx.llama_cfg.max_position_embeddings)
    if val_ds is None:
        raise UserError("collect: the distill data has no validation split (set distill.data.validation or distill.data.val_size > 0)")
    out = {}
    for split, ds, cap in (("train", train_ds, blk.max_train_samples), ("validation", val_ds, blk.max_val_samples)):
        n = len(ds) if cap is None else min(len(ds), cap)
        if n <= 0:
            raise UserError(f"collect: the {split} split has no sample (block.max_{'train' if split == 'train' else 'val'}_samples={cap})")
        out[split] = np.stack([np.asarray(ds[i]["input_ids"], np.int32) for i in range(n)])
    return out


def store_fingerprint(ctx: RunContext, samples: dict[str, np.ndarray]) -> dict[str, Any]:
    cfg, L = ctx.cfg, ctx.llama_cfg.num_layers
    rows = (row for split in SPLITS for row in samples[split])
    return {
        "model": model_fingerprint(cfg),
        "block": block_fingerprint(L, cfg.block.size, block_starts(L, cfg.block.size)),
        "data": data_fingerprint(cfg.distill.data, ctx.tokenizer, rows),
    }


def make_collect_fn(model: Llama, starts: list[int], mesh: jax.sharding.Mesh, batch_size: int) -> tuple[Callable, Any]:
    """(fn, state): fn(state, tokens_BT) → tuple of S bf16 arrays (B, T, E), the raw residual stream entering
    each block start, split over the mesh's batch axes as the (B, T) tokens are (`collect_batch_sharding`). The last
    block itself is not run (its output is not needed)."""
    graphdef, state = nnx.split(model)
    L = model.cfg.num_layers
    bounds = list(starts) + [L]

    def fn(state, tokens_BT):
        m = nnx.merge(graphdef, state)
        B, T = tokens_BT.shape
        positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        x_BTE = m.embed_tokens(tokens_BT)
        outs = []
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            outs.append(x_BTE.astype(jnp.bfloat16))
            if i + 1 < len(starts):
                x_BTE, _ = m.run_layers(x_BTE, positions_BT, layers=(a, b))
        return tuple(outs)

    rows = batch_axes(mesh, batch_size) or None
    out = NamedSharding(mesh, P(rows, None, None))
    jitted = jax.jit(fn, in_shardings=(None, collect_batch_sharding(mesh, batch_size)), out_shardings=tuple(out for _ in starts))
    return AlignedJit(jitted, "collect"), state


def collect_batch_sharding(mesh: jax.sharding.Mesh, batch_size: int) -> NamedSharding:
    return batch_sharding(mesh, False, batch_size)


def collect_batch_size(ctx: RunContext) -> int:
    """`block.collect_batch_size`, default one sequence per device of the batch axes (data × fsdp × expert); a multiple of the
    process count."""
    B = ctx.cfg.block.collect_batch_size or math.prod(ctx.mesh.shape[a] for a in BATCH_AXES)
    if B <= 0 or B % ctx.process_count:
        raise UserError(f"block.collect_batch_size={B} must be a positive multiple of the {ctx.process_count} processes")
    batch_axes(ctx.mesh, B)  # refuses a batch the processes cannot split
    return B


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a global array split along its first axis (in global row order — the order in which
    `make_array_from_process_local_data` placed them); a replicated array gives all its rows."""
    shards: dict[int, Any] = {}
    for sh in x.addressable_shards:
        start = sh.index[0].start or 0
        shards.setdefault(start, sh)
    return np.concatenate([np.asarray(shards[k].data) for k in sorted(shards)], axis=0)


def _ranges(n: int, count: int) -> list[tuple[int, int]]:
    """Contiguous sample ranges of `n` samples over `count` processes."""
    return [(n * p // count, n * (p + 1) // count) for p in range(count)]


def _allgather_ints(values: list[int]) -> np.ndarray:
    """(P, len(values)) array of every process's `values`."""
    local = np.asarray(values, np.int64)
    if jax.process_count() == 1:
        return local[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(local)).reshape(jax.process_count(), -1)


def check_disk(ctx: RunContext, store_root, layout: StoreLayout, remaining: int) -> int:
    """Prints the disk the collect needs; refuses (UserError) when the file system has less free space."""
    k, L, T, E = ctx.cfg.block.size, ctx.llama_cfg.num_layers, layout.seq_len, layout.hidden
    total = layout.total_bytes()
    need = layout.total_bytes(remaining)
    free = free_bytes(store_root)
    n_tr, n_va = layout.samples["train"], layout.samples["validation"]
    _log(
        ctx,
        f"block inputs need {human_bytes(total)} = 2 B × {(n_tr + n_va) * T:,} tokens ({n_tr} train + {n_va} validation samples of {T}) "
        f"× d={E} × {len(layout.starts)} block starts (L={L}, k={k}); still to write {human_bytes(need)}; free at {store_root}: {human_bytes(free)}",
    )
    if need > free and not ctx.cfg.block.ignore_disk_check:
        raise UserError(
            f"collect: {store_root} has {human_bytes(free)} free but the block inputs still need {human_bytes(need)} "
            f"({need:,} bytes); free space, point block.store elsewhere, lower block.max_train_samples, or set "
            "block.ignore_disk_check=true"
        )
    return need


def run_collect(ctx: RunContext) -> dict:
    cfg = ctx.cfg
    L, E = ctx.llama_cfg.num_layers, ctx.llama_cfg.hidden_size
    starts = block_starts(L, cfg.block.size)
    samples = distill_samples(ctx)
    T = samples["train"].shape[1]
    layout = StoreLayout(T, E, tuple(starts), {s: int(samples[s].shape[0]) for s in SPLITS})
    root = store_dir(ctx.run_dir, cfg.block.store)
    fingerprint = store_fingerprint(ctx, samples)
    remaining = sum(layout.samples.values())
    if BlockInputStore.meta_path(root).is_file():  # resuming: refuse a foreign store before anything else
        existing = BlockInputStore.open(root)
        existing.check_matches(fingerprint, layout)
        remaining -= sum(existing.completed(s) for s in layout.samples)
    check_disk(ctx, root, layout, remaining)
    if ctx.is_main:
        root.mkdir(parents=True, exist_ok=True)
    store = BlockInputStore.prepare(
        root, fingerprint, layout, to_dict(cfg.attention), is_main=ctx.is_main, barrier=lambda: barrier("blockwise-collect-create")
    )
    summary: dict[str, Any] = {"store": str(root), "fingerprint_id": store.fingerprint_id, "samples": dict(layout.samples)}
    summary.update(seq_len=T, hidden=E, block_starts=starts, bytes=layout.total_bytes())
    if remaining == 0:
        _log(ctx, f"{root} is complete; nothing to do")
        if ctx.is_main:
            store.refresh_meta()
        return dict(summary, written_samples=0, tokens_per_s=None)

    B = collect_batch_size(ctx)
    b = B // ctx.process_count
    model = load_base(ctx, linearize=False)
    fn, state = make_collect_fn(model, starts, ctx.mesh, B)
    t0 = time.perf_counter()
    written, timer = 0, {"compile_s": 0.0}
    for split in SPLITS:
        written += _collect_split(ctx, store, fn, state, split, samples[split], b, timer)
    seconds = time.perf_counter() - t0
    barrier("blockwise-collect-done")
    counts = store.refresh_meta() if ctx.is_main else {}
    run_s = seconds - timer["compile_s"]
    tps = written * ctx.process_count * T / run_s if run_s > 0 else float("nan")
    _log(ctx, f"wrote {written} samples on this process in {seconds:.1f}s ({timer['compile_s']:.1f}s compiling; then "
              f"{tps:,.0f} tokens/s over all processes, {human_bytes(int(tps * layout.total_bytes(1) / T))}/s); completed {counts}")
    return dict(summary, written_samples=written, collect_seconds=round(seconds, 2), compile_s=round(timer["compile_s"], 2), tokens_per_s=tps, completed=counts)


def _collect_split(ctx: RunContext, store: BlockInputStore, fn, state, split: str, tokens_nT: np.ndarray, b: int, timer: dict) -> int:
    """Collects this process's unwritten samples of `split`; returns how many it wrote (adds the first call's
    compilation time to timer["compile_s"])."""
    n, T = tokens_nT.shape
    ranges = _ranges(n, ctx.process_count)
    lo, hi = ranges[ctx.process_index]
    first = _allgather_ints([store.first_unwritten(split, lo, hi)])[:, 0]  # every process's resume point
    steps = max(math.ceil((ranges[p][1] - first[p]) / b) for p in range(ctx.process_count))
    if steps == 0:
        return 0
    _log(ctx, f"{split}: {n} samples, resuming at {first.tolist()} (per process), {steps} batches of {b}×{ctx.process_count}")
    sharding = collect_batch_sharding(ctx.mesh, b * ctx.process_count)
    me = ctx.process_index

    def batch_tokens(step: int) -> jax.Array:
        ids = first[me] + step * b + np.arange(b)
        rows = tokens_nT[np.minimum(ids, max(hi - 1, 0))]  # padding rows repeat the range's last sample
        return jax.make_array_from_process_local_data(sharding, rows)

    def flush(step: int, outs) -> int:
        s0 = int(first[me]) + step * b
        valid = max(0, min(b, hi - s0))
        if valid:
            rows = {start: local_rows(o)[:valid] for start, o in zip(store.layout.starts, outs)}
            store.write(split, s0, rows)
            store.mark(split, lo, hi, s0 + valid)
        if ctx.is_main:
            store.refresh_meta()
        return valid

    written = 0
    pending = None
    for step in range(steps):
        t = time.perf_counter()
        outs = fn(state, batch_tokens(step))  # dispatched; the previous batch is written meanwhile
        if timer["compile_s"] == 0.0:
            timer["compile_s"] = time.perf_counter() - t  # the first call compiles (later calls only dispatch)
        if pending is not None:
            written += flush(*pending)
        pending = (step, outs)
    written += flush(*pending)
    return written
