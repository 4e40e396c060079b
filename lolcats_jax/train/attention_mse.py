"""Attention MSE of a linearized model on the distillation validation split, for the report.

The quantity stage 1 minimises, measured the same way for every run (joint `distill` or block-wise `stitch`), so
runs can be compared: every linearized layer is teacher-forced (it receives the softmax model's hidden stream) and
the MSE between its hybrid-attention output and the softmax attention output (per head, before o_proj) is
averaged over tokens, heads and dimensions; reported per layer and as the mean over layers (no `mse_factor`).
Batches: the first `evaluate.attention_mse_batches` validation batches of `distill.batch_size` chunks, in order —
with several processes rounded up to a multiple of the data × fsdp × expert devices, so that every process has rows (the
block-wise configs train with batches of one sequence, but evaluate on several hosts).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx

from lolcats_jax.errors import UserError
from lolcats_jax.model.llama import Llama
from lolcats_jax.train.losses import distill_loss
from lolcats_jax.train.step import BATCH_AXES


def attention_mse(ctx, model: Llama) -> dict:
    """{"mse": mean over layers, "layer_mse": [per layer], "batches": n, "tokens": n} — averages over batches."""
    from lolcats_jax.data.pipeline import build_datasets, make_eval_iterator
    from lolcats_jax.train.loop import to_global_batch

    d, n_batches = ctx.cfg.distill, ctx.cfg.evaluate.attention_mse_batches
    _, val_ds = build_datasets(d.data, ctx.tokenizer, max_context=ctx.llama_cfg.max_position_embeddings,
                               process_index=ctx.process_index, process_count=ctx.process_count)
    if val_ds is None:
        raise UserError("evaluate.attention_mse_batches > 0 needs distill.data.validation (or distill.data.val_size)")
    P = ctx.process_count
    global_batch = d.batch_size
    if P > 1:  # several processes feed their own rows: a multiple of the data × fsdp × expert devices (see train.step.batch_axes)
        dp = math.prod(ctx.mesh.shape[a] for a in BATCH_AXES)
        global_batch = -(-d.batch_size // dp) * dp
    local = global_batch // P
    graphdef, state = nnx.split(model)

    @jax.jit
    def measure(state, batch):
        _, metrics = distill_loss(nnx.merge(graphdef, state), batch, mse_factor=1.0, xent_factor=0.0)
        return metrics["mse"], metrics["layer_mse"]

    total, layers, n, tokens = 0.0, None, 0, 0
    for batch in make_eval_iterator(val_ds, local, max_batches=n_batches):
        ids = {"input_ids": np.asarray(batch["input_ids"])}
        mse, layer_mse = jax.device_get(measure(state, to_global_batch(ids, ctx.mesh)))
        total += float(mse)
        layers = np.asarray(layer_mse, np.float64) + (0.0 if layers is None else layers)
        n += 1
        tokens += global_batch * ids["input_ids"].shape[1]
    if n == 0:
        raise UserError("evaluate: the distillation validation split produced no batch for the attention MSE")
    return {"mse": total / n, "layer_mse": (layers / n).tolist(), "batches": n, "tokens": tokens}
