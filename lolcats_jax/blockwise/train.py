"""Stage `distill_block`: attention transfer of one block (or of all, one after another) from its stored inputs.

Notation: B batch, T tokens, E hidden size, k layers of a block.

Each block is an independent job: it reads only `<store>/<split>/layer_<start>` and the block's k layers of the
HF weights, and writes only `<run.dir>/distill_block/block_<i>/` (resumable checkpoints, best parameters,
`metrics.jsonl`, `final/`, `block.json` describing the block, `done.json`). Several processes may therefore train
different blocks at the same time, sharing nothing but the file system. The loss is stage 1's restricted to the
block: mse_factor × mean over the block's linearized layers of the per-layer attention MSE (+ xent), every layer
teacher-forced on the softmax stream.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lolcats_jax.blockwise.fingerprint import attention_signature, describe_difference, differences, model_fingerprint
from lolcats_jax.blockwise.layout import Block, block_dir, partition, selected_blocks, store_dir
from lolcats_jax.blockwise.model import full_options, load_block_model
from lolcats_jax.blockwise.store import BlockInputStore
from lolcats_jax.errors import UserError
from lolcats_jax.fsio import write_json_atomic
from lolcats_jax.model.llama import FeatureMapParam, Llama, WindowParam
from lolcats_jax.sharding import constrain
from lolcats_jax.train.ckpt import save_params
from lolcats_jax.train.loop import train_loop
from lolcats_jax.train.losses import distill_objective
from lolcats_jax.train.stages import RunContext, loop_config
from lolcats_jax.train.step import split_model


def block_distill_loss(model: Llama, batch: dict, key: jax.Array | None = None, *, mse_factor: float,
                       xent_factor: float) -> tuple[jax.Array, dict]:
    """Stage 1's loss on a block model whose input is the stored residual stream `batch["hidden"]` (B, T, E)."""
    del key  # attention transfer has no dropout
    x_BTE = constrain(batch["hidden"].astype(model.compute_dtype), ("batch", "seq", "act_embed"))
    B, T = x_BTE.shape[:2]
    positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    _, per_layer = model.run_layers(x_BTE, positions_BT, mode="distill", mse_factor=mse_factor, xent_factor=xent_factor)
    return distill_objective(per_layer, mse_factor=mse_factor, xent_factor=xent_factor)


def block_info(ctx: RunContext, store: BlockInputStore, block: Block) -> dict[str, Any]:
    """What a block result is: which layers, from which collect, with which attention."""
    return {
        "index": block.index,
        "layers": [block.start, block.stop],
        "linear_layers": [block.lin_start, block.lin_stop],
        "block_size": ctx.cfg.block.size,
        "num_layers": ctx.llama_cfg.num_layers,
        "store": str(store.root),
        "store_fingerprint_id": store.fingerprint_id,
        "attention": attention_signature(ctx.cfg.attention),
    }


def _check_block_dir(bdir: Path, info: dict[str, Any]) -> None:
    path = bdir / "block.json"
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    keys = ("layers", "linear_layers", "store_fingerprint_id", "attention")
    changed = [k for k in keys if old.get(k) != info[k]]
    if changed:
        raise UserError(
            f"{bdir}: holds a block trained with other {changed} ({ {k: old.get(k) for k in changed} } vs now "
            f"{ {k: info[k] for k in changed} }); delete the directory or use another run.dir"
        )


def block_data(ctx: RunContext, store: BlockInputStore, block: Block):
    """(train iterator, validation batches factory, optimizer steps, training samples) of a block."""
    import grain

    from lolcats_jax.data.pipeline import make_eval_iterator, make_train_iterator

    d, P, p = ctx.cfg.distill, ctx.process_count, ctx.process_index
    if d.batch_size % P:
        raise UserError(f"distill.batch_size={d.batch_size} must be a multiple of the {P} processes")
    local = d.batch_size // P
    train_ds = grain.MapDataset.source(store.source("train", block.start))
    val_ds = grain.MapDataset.source(store.source("validation", block.start))
    usable = len(val_ds) // P * P
    if usable == 0:
        raise UserError(f"{store.root}: {len(val_ds)} validation samples, fewer than the {P} processes")
    val_ds = val_ds[:usable][p::P]
    train_iter = make_train_iterator(train_ds, local * d.optim.grad_accum, ctx.cfg.run.seed, process_index=p, process_count=P, num_epochs=d.epochs)
    steps = d.max_steps
    if d.epochs is not None:
        steps = len(train_ds) * d.epochs // (d.batch_size * d.optim.grad_accum)
    val_batches = functools.partial(make_eval_iterator, val_ds, local, max_batches=d.eval_batches)
    return train_iter, val_batches, steps, len(train_ds)


def train_block(ctx: RunContext, store: BlockInputStore, block: Block) -> dict[str, Any]:
    """Trains one block (resuming from its checkpoints) unless it is done; returns its summary."""
    bdir = block_dir(ctx.run_dir, block.index)
    info = block_info(ctx, store, block)
    _check_block_dir(bdir, info)
    if (bdir / "done.json").is_file():
        print(f"[distill_block] {block.describe()} already finished ({bdir / 'done.json'}); skipping", file=sys.stderr)
        return json.loads((bdir / "done.json").read_text())
    if ctx.is_main:
        write_json_atomic(bdir / "block.json", info)
    name = f"distill_block_{block.index}"
    if block.num_linear == 0:
        summary = dict(info, stage=name, steps=0, note="every layer of the block keeps softmax attention; nothing to train")
    else:
        d = ctx.cfg.distill
        model = load_block_model(ctx.cfg, ctx.llama_cfg, block, ctx.mesh)
        split = split_model(model, nnx.Any(FeatureMapParam, WindowParam))
        train_iter, val_batches, steps, n_train = block_data(ctx, store, block)
        if steps <= 0:
            raise UserError(f"{name}: {n_train} training samples give no optimizer step (batch {d.batch_size} × accum {d.optim.grad_accum})")
        print(f"[distill_block] {block.describe()}: {n_train} training samples from {store.array_path('train', block.start)}", file=sys.stderr)
        loss_fn = functools.partial(block_distill_loss, mse_factor=d.mse_factor, xent_factor=d.xent_factor)
        res = train_loop(
            name=name, split=split, loss_fn=loss_fn, mesh=ctx.mesh, cfg=loop_config(d, steps, ctx.cfg.run.seed), train_iter=train_iter,
            val_batches=val_batches, stage_dir=bdir, run_dir=bdir,
            tokens_per_batch=d.batch_size * d.optim.grad_accum * store.layout.seq_len, is_main=ctx.is_main,
        )
        summary = dict(
            info, stage=name, steps=res.steps, trainable_params=res.trainable_params, initial_eval_loss=res.initial_eval,
            best_eval_loss=res.best_eval, final_eval_loss=res.final_eval, tokens_per_s=res.tokens_per_s,
            train_samples=n_train, resumed_from=res.resumed_from,
        )
        save_params(bdir / "final", res.trainable, summary)
    if ctx.is_main:
        write_json_atomic(bdir / "done.json", summary)
    return summary


def run_distill_block(ctx: RunContext) -> dict:
    cfg = ctx.cfg
    if cfg.attention.kind != "lolcats":
        raise UserError("distill_block: attention.kind is 'softmax' — nothing to linearize")
    blocks = partition(full_options(cfg, ctx.llama_cfg).layer_kinds, cfg.block.size)
    chosen = selected_blocks(blocks, cfg.block.index)
    store = BlockInputStore.open(store_dir(ctx.run_dir, cfg.block.store))
    if list(store.layout.starts) != [b.start for b in blocks] or store.layout.hidden != ctx.llama_cfg.hidden_size:
        raise UserError(
            f"{store.root}: collected for block starts {list(store.layout.starts)} (hidden {store.layout.hidden}), but "
            f"block.size={cfg.block.size} on this model gives {[b.start for b in blocks]} (hidden {ctx.llama_cfg.hidden_size})"
        )
    diffs = differences({"model": store.meta["fingerprint"]["model"]}, {"model": model_fingerprint(cfg)})
    if diffs:
        raise UserError(f"{store.root}: collected from {describe_difference(diffs)} than model.path={cfg.model.path} now")
    store.check_complete()
    results = {str(b.index): train_block(ctx, store, b) for b in chosen}
    missing = [b.index for b in blocks if not (block_dir(ctx.run_dir, b.index) / "done.json").is_file()]
    if missing:
        print(f"[distill_block] blocks still to train: {missing}", file=sys.stderr)
    return {"blocks": results, "num_blocks": len(blocks), "missing_blocks": missing, "partial": bool(missing)}
