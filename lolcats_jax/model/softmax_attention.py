"""Causal softmax attention with grouped-query heads (the teacher), parallel and cached-decode forms.

Notation: B batch, T query tokens, S key tokens, H query heads, K kv heads, G = H/K group size, D head dim.
Softmax is computed in float32 whatever the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def causal_softmax_attention(q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array) -> jax.Array:
    """y_i = softmax_j≤i(q_i·k_j/√D) v_j over all earlier keys (T == S, positions 0..T-1)."""
    B, T, H, D = q_BTHD.shape
    K = k_BSKD.shape[2]
    G = H // K
    q = q_BTHD.reshape(B, T, K, G, D).astype(jnp.float32)
    scores_BKGTS = jnp.einsum("btkgd,bskd->bkgts", q, k_BSKD.astype(jnp.float32)) / jnp.sqrt(jnp.float32(D))
    causal_TS = jnp.tril(jnp.ones((T, T), dtype=bool))
    scores_BKGTS = jnp.where(causal_TS, scores_BKGTS, NEG_INF)
    probs = jax.nn.softmax(scores_BKGTS, axis=-1)
    y = jnp.einsum("bkgts,bskd->btkgd", probs, v_BSKD.astype(jnp.float32))
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


def repeat_kv(x_BTKD: jax.Array, group_size: int) -> jax.Array:
    """(B,T,K,D) → (B,T,K·G,D): query head h uses kv head h // G (transformers' repeat_kv)."""
    if group_size == 1:
        return x_BTKD
    return jnp.repeat(x_BTKD, group_size, axis=2)
