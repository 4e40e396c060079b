"""Causal softmax attention with grouped-query heads (the teacher), parallel and cached-decode forms.

Notation: B batch, T query tokens, S key tokens, H query heads, K kv heads, G = H/K group size, D head dim.
Softmax is computed in float32 whatever the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -1e30


DENSE_MAX_T = 1024  # up to here no block is rematerialised; longer: each block recomputed in the backward pass
CAUSAL_BLOCK = 128  # query rows per block up to DENSE_MAX_T, and the least block size beyond it
MAX_BLOCKS = 32  # beyond DENSE_MAX_T the block grows with T so that at most this many blocks are unrolled


def long_block(T: int) -> int:
    """Query rows per block for T > DENSE_MAX_T: CAUSAL_BLOCK, or larger (a multiple of it) so that at most
    MAX_BLOCKS blocks cover T (compile time grows with the number of unrolled blocks)."""
    per_block = -(-T // MAX_BLOCKS)
    return CAUSAL_BLOCK * max(1, -(-per_block // CAUSAL_BLOCK))


def causal_softmax_attention(q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array,
                             *, query_block: int | None = None) -> jax.Array:
    """y_i = softmax_j≤i(q_i·k_j/√D) v_j over all earlier keys (T == S, positions 0..T-1); float32 softmax.

    Exact causal softmax one block of queries at a time, each block against only the keys up to its last query
    (`_causal_blocks`: the upper triangle beyond the diagonal blocks is never computed). T ≤ DENSE_MAX_T: blocks of
    CAUSAL_BLOCK rows, kept for the backward pass. Longer: on GPU with bf16/f16 inputs `jax.nn.dot_product_attention`
    (cuDNN flash attention, grouped heads, float32 accumulation); otherwise blocks of `query_block` rows (default
    `long_block(T)`), each rematerialised in the backward pass, so memory grows as block × T, not T × T."""
    T = q_BTHD.shape[1]
    if query_block is None:
        if T <= DENSE_MAX_T:
            return _causal_blocks(q_BTHD, k_BSKD, v_BSKD, CAUSAL_BLOCK, remat=False)
        if jax.default_backend() == "gpu" and q_BTHD.dtype in (jnp.bfloat16, jnp.float16):
            return jax.nn.dot_product_attention(q_BTHD, k_BSKD.astype(q_BTHD.dtype), v_BSKD.astype(q_BTHD.dtype),
                                                is_causal=True)
        query_block = long_block(T)
    return _causal_blocks(q_BTHD, k_BSKD, v_BSKD, int(query_block), remat=True)


def _causal_blocks(q_BTHD, k_BSKD, v_BSKD, block: int, *, remat: bool):
    """Exact causal softmax, one block of `block` queries at a time (unrolled), each block against only the keys
    up to its last query — about half the exp / dot work of a masked (T, T) map. The weights are not normalised:
    y = (Σ e_ij v_j) / Σ e_ij with e_ij = exp(s_ij − max_j s_ij), so the division runs over (T, D) values, not over
    the scores. The row max is a constant of the softmax (its gradient is exactly zero), hence `stop_gradient`.
    remat: each block is recomputed in the backward pass instead of keeping its (block, keys) weights."""
    B, T, H, D = q_BTHD.shape
    K = k_BSKD.shape[2]
    G = H // K
    q = q_BTHD.reshape(B, T, K, G, D).astype(jnp.float32) * (1.0 / np.sqrt(D))
    k, v = k_BSKD.astype(jnp.float32), v_BSKD.astype(jnp.float32)

    def one_block(q_BtKGD, k_BsKD, v_BsKD, start: int):
        t, s = q_BtKGD.shape[1], k_BsKD.shape[1]
        s_BKGts = jnp.einsum("btkgd,bskd->bkgts", q_BtKGD, k_BsKD)
        causal_ts = np.arange(s)[None, :] <= np.arange(start, start + t)[:, None]
        s_BKGts = jnp.where(causal_ts, s_BKGts, NEG_INF)
        e = jnp.exp(s_BKGts - jax.lax.stop_gradient(jnp.max(s_BKGts, axis=-1, keepdims=True)))
        num = jnp.einsum("bkgts,bskd->btkgd", e, v_BsKD)
        den = jnp.einsum("bkgts->btkg", e)
        return num / den[..., None]

    if remat:
        one_block = jax.checkpoint(one_block, static_argnums=(3,))
    out = []
    for start in range(0, T, block):
        stop = min(start + block, T)
        out.append(one_block(q[:, start:stop], k[:, :stop], v[:, :stop], start))
    y = out[0] if len(out) == 1 else jnp.concatenate(out, axis=1)
    return y.reshape(B, T, H, D).astype(q_BTHD.dtype)


def cached_softmax_attention(q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, valid_BTS: jax.Array) -> jax.Array:
    """Attention of T new queries over a key cache of S slots; `valid_BTS` says which keys each query may see."""
    B, T, H, D = q_BTHD.shape
    K = k_BSKD.shape[2]
    G = H // K
    q = q_BTHD.reshape(B, T, K, G, D).astype(jnp.float32)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k_BSKD.astype(jnp.float32)) / jnp.sqrt(jnp.float32(D))
    scores = jnp.where(valid_BTS[:, None, None, :, :], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    y = jnp.einsum("bkgts,bskd->btkgd", probs, v_BSKD.astype(jnp.float32))
    return y.reshape(B, T, H, D).astype(q_BTHD.dtype)
