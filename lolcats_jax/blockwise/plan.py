"""Resource plan of the block-wise path (what `python -m lolcats_jax.plan` prints for a block-wise config).

Notation: L layers, k block size, T tokens per sample (distill chunk size), E hidden, H query heads, K kv heads,
D head dim, M MLP hidden, F' = 2F (fullspace) or F feature dim, W window, C kernel chunk, c compute-dtype bytes.

Parameter, trainable and optimizer bytes are exact (`nnx.eval_shape` of each distinct block model and
`jax.eval_shape` of the optimizer's init). The activation figure is an analytic estimate for ONE sample of T
tokens through a block with teacher forcing (the hidden stream between the k layers, plus the peak of one layer:
projections, the teacher's float32 T×T softmax, the student's feature maps, window scores and chunk states, the
MLP), ×2 for the student's backward; scale it by the per-device batch.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from flax import nnx

from lolcats_jax.blockwise.layout import Block, block_starts, partition
from lolcats_jax.blockwise.model import block_config, block_options, full_options, is_attention_param
from lolcats_jax.blockwise.store import BYTES_PER_VALUE
from lolcats_jax.config import Config
from lolcats_jax.model.llama import Llama
from lolcats_jax.model.llama_config import LlamaConfig
from lolcats_jax.model.options import to_dtype
from lolcats_jax.train.optim import make_optimizer
from lolcats_jax.train.step import path_key


def _nbytes(tree: Any) -> int:
    return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def activation_estimate(cfg: Config, llama_cfg: LlamaConfig, block_size: int, seq_len: int) -> dict[str, int]:
    """Bytes of activations of one sample (batch 1) of `seq_len` tokens through `block_size` teacher-forced layers."""
    a, T, k = cfg.attention, seq_len, block_size
    E, H, K, D, M = llama_cfg.hidden_size, llama_cfg.num_heads, llama_cfg.num_kv_heads, llama_cfg.head_dim, llama_cfg.intermediate_size
    c = np.dtype(to_dtype(cfg.model.compute_dtype)).itemsize
    Fp = a.feature_dim * (2 if a.fullspace else 1)
    W, C = a.window_size, max(a.chunk_size, 1)
    parts = {
        "hidden_stream": k * T * E * c,  # each layer's input, kept for the backward
        "projections": T * (H + 2 * K) * D * c + 2 * T * H * D * c,  # q, k, v and k, v repeated to H heads
        "teacher_softmax": 2 * 4 * H * T * T,  # float32 scores and probabilities (one layer at a time)
        "student_attention": 2 * (2 * 4 * T * H * Fp + 4 * H * T * min(W + C, T) + 4 * H * math.ceil(T / C) * Fp * D + 4 * T * H * D),
        "mlp": 3 * T * M * c,
    }
    if not cfg.model.remat:  # without rematerialisation every layer's student intermediates stay alive
        parts["student_attention"] *= k
    parts["total"] = sum(parts.values())
    return parts


def _block_sizes(cfg: Config, llama_cfg: LlamaConfig, block: Block) -> dict[str, int]:
    bcfg, bopts = block_config(llama_cfg, block), block_options(cfg, llama_cfg, block)
    abstract = nnx.eval_shape(lambda: Llama(bcfg, bopts, rngs=nnx.Rngs(0)))
    flat = dict(nnx.to_flat_state(nnx.state(abstract)))
    base = {path_key(p): v.get_value() for p, v in flat.items() if p[0] == "layers"}
    trainable = {path_key(p): v.get_value() for p, v in flat.items() if is_attention_param(p, v)}
    opt = jax.eval_shape(make_optimizer(cfg.distill.optim).init, trainable) if trainable else {}
    return {"param_bytes": _nbytes(base), "trainable_bytes": _nbytes(trainable), "optimizer_bytes": _nbytes(opt),
            "trainable_params": int(sum(math.prod(x.shape) for x in trainable.values()))}


DEFAULT_TOKENS = 20_000_000  # the paper's attention-transfer budget per stage (reference §6.8)


def blockwise_plan(cfg: Config, llama_cfg: LlamaConfig, tokens: int | None = None) -> dict[str, Any]:
    """Per-block memory and the collect's disk for `tokens` training tokens (default: block.max_train_samples ×
    chunk size when set, else 20M); see the module docstring."""
    k, L, E, T = cfg.block.size, llama_cfg.num_layers, llama_cfg.hidden_size, cfg.distill.data.chunk_size
    if tokens is None:
        tokens = cfg.block.max_train_samples * T if cfg.block.max_train_samples is not None else DEFAULT_TOKENS
    blocks = partition(full_options(cfg, llama_cfg).layer_kinds, k)
    starts = block_starts(L, k)
    cache: dict[tuple, dict[str, int]] = {}
    per_block = []
    for b in blocks:
        key = (b.size, full_options(cfg, llama_cfg).layer_kinds[b.start : b.stop])
        if key not in cache:
            cache[key] = dict(_block_sizes(cfg, llama_cfg, b), activation_bytes_per_sample=activation_estimate(cfg, llama_cfg, b.size, T)["total"])
        per_block.append({"index": b.index, "layers": [b.start, b.stop - 1], "linearized_layers": b.num_linear, **cache[key]})
    bytes_per_token = BYTES_PER_VALUE * E * len(starts)
    val_tokens = 0 if cfg.distill.data.validation else cfg.distill.data.val_size * T
    if cfg.block.max_val_samples is not None and not cfg.distill.data.validation:
        val_tokens = min(val_tokens, cfg.block.max_val_samples * T)
    local_batch = max(1, cfg.distill.batch_size)
    for r in per_block:  # one block job on ONE device: weights, trainables + grads, Adam state, activations
        r["one_device_bytes"] = (r["param_bytes"] + 2 * r["trainable_bytes"] + r["optimizer_bytes"]
                                 + local_batch * r["activation_bytes_per_sample"])
    largest = max(per_block, key=lambda r: r["one_device_bytes"])
    return {
        "tokens": tokens,
        "num_blocks": len(blocks),
        "block_size": k,
        "block_starts": starts,
        "seq_len": T,
        "blocks": per_block,
        "largest_block": {
            "index": largest["index"],
            "param_bytes": largest["param_bytes"],
            "trainable_bytes": largest["trainable_bytes"],
            "optimizer_bytes": largest["optimizer_bytes"],
            "activation_bytes_per_sample": largest["activation_bytes_per_sample"],
            "one_device_bytes": largest["one_device_bytes"],
            "fits_one_device": largest["one_device_bytes"] <= cfg.mesh.device_memory_gb * 2**30,
            "activation_parts": activation_estimate(cfg, llama_cfg, max(b.size for b in blocks), T),
        },
        "collect_bytes_per_token": bytes_per_token,
        "collect_disk_bytes": bytes_per_token * tokens,  # 2·T·d·L/k
        "collect_validation_disk_bytes": bytes_per_token * val_tokens,  # unknown (0) when validation files are given
        "collect_disk_formula": f"2 B × {tokens:,} tokens × d={E} × {len(starts)} block starts (L={L}, k={k})",
        "per_block_store_read_bytes": BYTES_PER_VALUE * E * tokens,
    }
