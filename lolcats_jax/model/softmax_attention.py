"""Causal softmax attention with grouped-query heads (the teacher), parallel and cached-decode forms.

Notation: B batch, T query tokens, S key tokens, H query heads, K kv heads, G = H/K group size, D head dim.
Softmax is computed in float32 whatever the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -1e30


DENSE_MAX_T = 1024  # longer sequences never materialise a (T, T) score map (off GPU: query blocks, on GPU: cuDNN)
QUERY_BLOCK = 512


def causal_softmax_attention(q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array,
                             *, query_block: int | None = None) -> jax.Array:
    """y_i = softmax_j≤i(q_i·k_j/√D) v_j over all earlier keys (T == S, positions 0..T-1); float32 softmax.

    T ≤ DENSE_MAX_T: causal blocks of queries with unnormalised weights (`_dense_causal`). Longer: on GPU with
    bf16/f16 inputs `jax.nn.dot_product_attention` (cuDNN flash attention, grouped heads, float32 accumulation);
    otherwise exact softmax over blocks of
    `query_block` queries (each block against all keys, rematerialised in the backward pass), so memory grows as
    block × T, not T × T."""
    T = q_BTHD.shape[1]
    if query_block is None:
        if T <= DENSE_MAX_T:
            return _dense_causal(q_BTHD, k_BSKD, v_BSKD)
        if jax.default_backend() == "gpu" and q_BTHD.dtype in (jnp.bfloat16, jnp.float16):
            return jax.nn.dot_product_attention(q_BTHD, k_BSKD.astype(q_BTHD.dtype), v_BSKD.astype(q_BTHD.dtype),
                                                is_causal=True)
        query_block = QUERY_BLOCK
    return _query_blocked_causal(q_BTHD, k_BSKD, v_BSKD, int(query_block))


CAUSAL_BLOCK = 128  # query rows per block of the T ≤ DENSE_MAX_T path


def _dense_causal(q_BTHD, k_BSKD, v_BSKD, block: int = CAUSAL_BLOCK):
    """Exact causal softmax, one block of `block` queries at a time (unrolled: T ≤ DENSE_MAX_T), each block against
    only the keys up to its last query — the causal upper triangle beyond the block is never computed (about half
    the exp / dot work of one masked (T, T) map at T = 1024). The weights are not normalised: y = (Σ e_ij v_j) / Σ e_ij
    with e_ij = exp(s_ij − max_j s_ij), so the division runs over (T, D) values, not the (T, T) map. The row max is a
    constant of the softmax (its gradient is exactly zero), hence `stop_gradient`."""
    B, T, H, D = q_BTHD.shape
    K = k_BSKD.shape[2]
    G = H // K
    q = q_BTHD.reshape(B, T, K, G, D).astype(jnp.float32) * (1.0 / np.sqrt(D))
    k, v = k_BSKD.astype(jnp.float32), v_BSKD.astype(jnp.float32)
    out = []
    for start in range(0, T, block):
        stop = min(start + block, T)
        s_BKGts = jnp.einsum("btkgd,bskd->bkgts", q[:, start:stop], k[:, :stop])
        causal_ts = np.arange(stop)[None, :] <= np.arange(start, stop)[:, None]
        s_BKGts = jnp.where(causal_ts, s_BKGts, NEG_INF)
        e = jnp.exp(s_BKGts - jax.lax.stop_gradient(jnp.max(s_BKGts, axis=-1, keepdims=True)))
        num = jnp.einsum("bkgts,bskd->btkgd", e, v[:, :stop])
        den = jnp.einsum("bkgts->btkg", e)
        out.append(num / den[..., None])
    y = out[0] if len(out) == 1 else jnp.concatenate(out, axis=1)
    return y.reshape(B, T, H, D).astype(q_BTHD.dtype)


def _query_blocked_causal(q_BTHD, k_BSKD, v_BSKD, block: int):
    """The dense formula one block of queries at a time (lax.map; each block rematerialised for its gradient)."""
    B, T, H, D = q_BTHD.shape
    n = -(-T // block)
    pad = n * block - T
    q = jnp.pad(q_BTHD, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(B, n, block, H, D)
    key_pos_S = jnp.arange(k_BSKD.shape[1])
    S = k_BSKD.shape[1]

    @jax.checkpoint
    def one(args):
        q_BbHD, start = args
        pos_b = start + jnp.arange(block)
        valid = (key_pos_S[None, :] <= pos_b[:, None])[None]  # (1, b, S): causal over absolute positions
        return cached_softmax_attention(q_BbHD, k_BSKD, v_BSKD, jnp.broadcast_to(valid, (B, block, S)))

    y = jax.lax.map(one, (jnp.moveaxis(q, 1, 0), jnp.arange(n) * block))  # (n, B, block, H, D)
    return jnp.moveaxis(y, 0, 1).reshape(B, n * block, H, D)[:, :T]


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
