"""Shared helpers for the LoLCATS kernel tests: random inputs, error metric, and an INDEPENDENT naive float64
implementation written directly from the formulas (per-query Python loops over the key sets), including a literal
port of the original's terraced-mask construction (reference §3.4).

Notation: B batch, T tokens, H heads, D head dim, F learned feature dim (see kernels/lolcats/spec.py).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from kernels.lolcats import FeatureMapParams, LolcatsSpec, attention_weights_reference, lolcats_attention_reference

ref_attention = jax.jit(lolcats_attention_reference, static_argnums=5)
ref_weights = jax.jit(attention_weights_reference, static_argnums=4)

# --------------------------------------------------------------------------------------------- inputs / metric


def make_inputs(seed, B, T, H, D, F, dtype=jnp.float32, bias=False, qk_scale=1.0, theta_scale=1.0, K=None):
    """Random q (B,T,H,D), k, v (B,T,K,D) (K = H unless given: grouped-query attention), feature maps with random
    (not identity) weights (H,D,F), θ (H,), as `dtype` jax arrays.

    Drawn with numpy (same values whatever the JAX precision mode, and no per-shape compilation)."""
    rng = np.random.default_rng(seed)
    arr = lambda x: jnp.asarray(np.asarray(x, np.float32), dtype)  # noqa: E731
    K = H if K is None else K
    q = arr(qk_scale * rng.standard_normal((B, T, H, D)))
    k = arr(qk_scale * rng.standard_normal((B, T, K, D)))
    v = arr(rng.standard_normal((B, T, K, D)))
    wq = arr(rng.standard_normal((H, D, F)) / math.sqrt(D))
    wk = arr(rng.standard_normal((H, D, F)) / math.sqrt(D))
    bq = arr(rng.standard_normal(H)) if bias else None
    bk = arr(rng.standard_normal(H)) if bias else None
    theta = arr(theta_scale * rng.standard_normal(H))
    return q, k, v, FeatureMapParams(wq, wk, bq, bk), theta


def cast_tree(tree, dtype):
    """Cast every array leaf (None stays None)."""
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x, np.float64), dtype), tree)


def rel_rms(actual, expected) -> float:
    """‖actual − expected‖_rms / ‖expected‖_rms (in float64)."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    denom = math.sqrt(float(np.mean(e**2))) or 1.0
    return math.sqrt(float(np.mean((a - e) ** 2))) / denom


def to64(tree):
    return jax.tree.map(lambda x: None if x is None else np.asarray(x, np.float64), tree,
                        is_leaf=lambda x: x is None)


# --------------------------------------------------------------------------------------------- naive masks


def original_tk_masks(L: int, W: int) -> tuple[np.ndarray, np.ndarray]:
    """Literal port of the original `get_masks` for q_len = k_len = L: blockdiag(ones(W,W) × ⌈L/W⌉), plus its
    roll by −W along keys, keep the last L rows/cols, window = tril(M), linear = tril(1 − M), as booleans."""
    m = -(-L // W)
    M = np.kron(np.eye(m), np.ones((W, W)))
    M = M + np.roll(M, -W, axis=-1)
    M = M[-L:, -L:]
    return np.tril(M).astype(bool), np.tril(1 - M).astype(bool)


def naive_sets(L: int, spec: LolcatsSpec) -> tuple[np.ndarray, np.ndarray]:
    """(window, linear) (L, L) from the set definitions, one pair at a time."""
    W = spec.window_size
    if spec.compat and spec.window == "tk" and spec.form == "hybrid":
        return original_tk_masks(L, W)
    win = np.zeros((L, L), bool)
    lin = np.zeros((L, L), bool)
    for i in range(L):
        for j in range(i + 1):
            if spec.form == "linear":
                lin[i, j] = True
            elif spec.form == "softmax":
                win[i, j] = True
            elif spec.window == "sw":
                win[i, j] = i - W < j
                lin[i, j] = j <= i - W
            else:
                win[i, j] = j // W >= i // W - 1
                lin[i, j] = j // W <= i // W - 2
    return win, lin


# --------------------------------------------------------------------------------------------- naive math


def naive_feature(x_D, w_DF, b, spec: LolcatsSpec) -> np.ndarray:
    """φ of one head vector (D,) → (F',), float64."""
    u = x_D @ w_DF + (0.0 if b is None else b)
    name = spec.feature_map
    if name == "softmax_dim":
        sm = lambda a: np.exp(a - a.max()) / np.exp(a - a.max()).sum()  # noqa: E731
        parts = [sm(u), sm(-u)] if spec.fullspace else [sm(u)]
    elif name == "exp_dim":
        parts = [np.exp(u - u.max()), np.exp(u.min() - u)] if spec.fullspace else [np.exp(u - u.max())]
    elif name == "relu":
        parts = [np.maximum(u, 0.0)]
    else:
        parts = [np.where(u > 0, 1.0 + u, np.exp(u))]
    return np.maximum(np.concatenate(parts), spec.eps)


def naive_features(x_BTKD, w_HDF, b_H, spec) -> np.ndarray:
    """(B, T, H, F'): query head h's map applied to x head h // (H/K) (keys with K ≤ H heads)."""
    B, T, K, _ = x_BTKD.shape
    H = w_HDF.shape[0]
    out = [[[naive_feature(x_BTKD[b, t, h // (H // K)], w_HDF[h], None if b_H is None else b_H[h], spec)
             for h in range(H)] for t in range(T)] for b in range(B)]
    return np.asarray(out)


def naive_attention(q, k, v, fmap, theta, spec: LolcatsSpec, return_weights=False):
    """y (B,T,H,D) (and the student weights (B,H,T,T)) in float64 by explicit loops over queries and key sets;
    k, v may have K ≤ H heads (query head h reads kv head h // (H/K))."""
    q, k, v, fmap, theta = to64((q, k, v, fmap, theta))
    B, T, H, D = q.shape
    G = H // k.shape[2]
    y = np.zeros(q.shape[:3] + v.shape[-1:])
    win, lin = naive_sets(T, spec)
    weights = np.zeros((B, H, T, T))
    if spec.form != "softmax":
        fq = naive_features(q, fmap.wq, fmap.bq, spec)
        fk = naive_features(k, fmap.wk, fmap.bk, spec)
    for b in range(B):
        for h in range(H):
            if spec.form == "hybrid":
                gamma = 1.0 / (1.0 + math.exp(-theta[h]))
                lam = 1.0 - gamma if spec.affine else 1.0
            for i in range(T):
                a = np.zeros(T)
                if spec.form == "softmax":
                    s = np.array([q[b, i, h] @ k[b, j, h // G] / math.sqrt(D) for j in range(i + 1)])
                    a[: i + 1] = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
                    extra = 0.0
                elif spec.form == "linear":
                    for j in range(i + 1):
                        a[j] = fq[b, i, h] @ fk[b, j, h]
                    extra = 1e-12
                else:
                    wins = [j for j in range(T) if win[i, j]]
                    s = {j: q[b, i, h] @ k[b, j, h // G] / math.sqrt(D) for j in wins}
                    c = max(s.values())
                    for j in wins:
                        a[j] += gamma * math.exp(s[j] - c)
                    for j in range(T):
                        if lin[i, j]:
                            a[j] += lam * (fq[b, i, h] @ fk[b, j, h])
                    extra = 0.0
                den = a.sum() + extra
                y[b, i, h] = (a[:, None] * v[b, :, h // G]).sum(0) / den
                weights[b, h, i] = a / den
    return (y, weights) if return_weights else y


def naive_teacher_weights(q, k) -> np.ndarray:
    """Causal softmax maps (B, H, T, T) in float64; k may have K ≤ H heads (query head h reads kv head h // G)."""
    q, k = to64((q, k))
    B, T, H, D = q.shape
    G = H // k.shape[2]
    out = np.zeros((B, H, T, T))
    for b in range(B):
        for h in range(H):
            for i in range(T):
                s = np.array([q[b, i, h] @ k[b, j, h // G] / math.sqrt(D) for j in range(i + 1)])
                out[b, h, i, : i + 1] = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
    return out


# --------------------------------------------------------------------------------------------- outputs + gradients


def output_and_grads(fn, inputs, spec, cotangent_seed=0):
    """(y, grads wrt (q, k, v, fmap, θ)) of fn(q, k, v, fmap, θ, spec) with a random output cotangent, jitted."""
    q, _, v = inputs[:3]
    ct = np.random.default_rng(cotangent_seed).standard_normal(q.shape[:3] + v.shape[-1:])
    ct = jnp.asarray(ct.astype(np.float32), q.dtype)

    @jax.jit
    def run(inputs, ct):
        y, vjp = jax.vjp(lambda *a: fn(*a, spec), *inputs)
        return y, vjp(ct)

    return run(inputs, ct)


def grad_errors(got, want) -> dict[str, float]:
    """Relative-RMS error per gradient leaf; a leaf whose true gradient is ~0 (e.g. the per-head bias of shift-
    invariant softmax features, or θ when no query has a linear key) is measured against 0.1 × the largest leaf's RMS instead of its own."""
    names = ["q", "k", "v", "wq", "wk", "bq", "bk", "theta"]
    flat_got = [got[0], got[1], got[2], got[3].wq, got[3].wk, got[3].bq, got[3].bk, got[4]]
    flat_want = [want[0], want[1], want[2], want[3].wq, want[3].wk, want[3].bq, want[3].bk, want[4]]
    rms = lambda x: math.sqrt(float(np.mean(np.asarray(x, np.float64) ** 2)))  # noqa: E731
    scale = max(rms(w) for w in flat_want if w is not None)
    out = {}
    for name, g, w in zip(names, flat_got, flat_want):
        if w is None:
            continue
        diff = rms(np.asarray(g, np.float64) - np.asarray(w, np.float64))
        out[name] = diff / max(rms(w), 0.1 * scale, 1e-300)
    return out
