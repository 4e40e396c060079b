"""Learned Hedgehog feature maps φ(x) = act(x·W_h + b_h) (reference §2) and their initialisers.

Notation: B batch, T tokens, H heads, D head dim, F learned feature dim, F' output feature dim (see spec.py).
Features are computed in the compute dtype (float32, or float64 for float64 inputs) whatever the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from kernels.lolcats.spec import FeatureMapParams, LolcatsSpec, kv_group

DEFAULT_WINDOW_LOGIT = -2.1972245773362196  # logit(0.1): γ = sigmoid(θ) ≈ 0.1 at init


def compute_dtype(dtype) -> jnp.dtype:
    """float32 for bf16/f16/f32 inputs, float64 for float64 inputs."""
    return jnp.promote_types(jnp.dtype(dtype), jnp.float32)


def init_feature_maps(
    key: jax.Array,
    num_heads: int,
    head_dim: int,
    feature_dim: int,
    init: str = "identity",
    bias: bool = False,
    dtype=jnp.float32,
) -> FeatureMapParams:
    """φ_q and φ_k parameters, identical at init (one draw, copied — reference §2.1/§2.2).

    init="identity": w[h] = eye(D, F) for every head (the released 8B/70B "--lk_zero_init" runs);
    init="kaiming":  w ~ U(±√(6/(D·F))) (torch kaiming_uniform_ on the 3-D (H, D, F) tensor).
    bias=True adds one scalar per head, b ~ U(±√(6/H)), drawn for both inits (identity init leaves it alone).
    """
    w_key, b_key = jax.random.split(key)
    shape = (num_heads, head_dim, feature_dim)
    if init == "identity":
        w_HDF = jnp.broadcast_to(jnp.eye(head_dim, feature_dim, dtype=jnp.float32), shape)
    elif init == "kaiming":
        bound = (6.0 / (head_dim * feature_dim)) ** 0.5
        w_HDF = jax.random.uniform(w_key, shape, jnp.float32, -bound, bound)
    else:
        raise ValueError(f"{init=} must be 'identity' or 'kaiming'")
    w_HDF = w_HDF.astype(dtype)
    b_H = None
    if bias:
        bound = (6.0 / num_heads) ** 0.5
        b_H = jax.random.uniform(b_key, (num_heads,), jnp.float32, -bound, bound).astype(dtype)
    return FeatureMapParams(wq=w_HDF, wk=w_HDF, bq=b_H, bk=b_H)


def init_window_logit(num_heads: int, value: float = DEFAULT_WINDOW_LOGIT, dtype=jnp.float32) -> Float[Array, "H"]:
    """Per-head window logit θ (γ = sigmoid(θ)); the default gives γ ≈ 0.1 (reference §3.6)."""
    return jnp.full((num_heads,), value, dtype=dtype)


def window_factors(theta_H: Float[Array, "H"], spec: LolcatsSpec, dtype) -> tuple[Array, Array]:
    """(γ_H, λ_H) in `dtype`: γ = sigmoid(θ); λ = 1−γ if spec.affine else 1."""
    gamma_H = jax.nn.sigmoid(theta_H.astype(dtype))
    lam_H = 1.0 - gamma_H if spec.affine else jnp.ones_like(gamma_H)
    return gamma_H, lam_H


def feature_map(
    x_BTKD: Float[Array, "B T K D"],
    w_HDF: Float[Array, "H D F"],
    b_H: Float[Array, "H"] | None,
    spec: LolcatsSpec,
) -> Float[Array, "B T H Fp"]:
    """φ(x) per head (reference §2.3), last axis = F' features, in the compute dtype.

    x may have fewer heads K than the H maps (keys under grouped-query attention, H a multiple of K): head h's map
    reads x head h // (H/K), through a grouped einsum, without repeating x.

    softmax_dim: [softmax(u); softmax(−u)] (fullspace) or softmax(u); exp_dim: [exp(u − max u); exp(min u − u)] or
    exp(u − max u) (the max/min are differentiated, as torch does); relu: relu(u); pos_elu: 1 + elu(u);
    every value clamped below at spec.eps.
    """
    if x_BTKD.ndim != 4 or w_HDF.ndim != 3 or x_BTKD.shape[3] != w_HDF.shape[1]:
        raise ValueError(f"feature_map needs x (B,T,K,D) and w (H,D,F) with matching D: "
                         f"{x_BTKD.shape=}, {w_HDF.shape=}")
    B, T, K, D = x_BTKD.shape
    H, _, F = w_HDF.shape
    G = kv_group(H, K, f"feature_map's x {x_BTKD.shape} (for w {w_HDF.shape})")
    dtype = compute_dtype(x_BTKD.dtype)
    w_KGDF = w_HDF.astype(dtype).reshape(K, G, D, F)
    u_BTHF = jnp.einsum("btkd,kgdf->btkgf", x_BTKD.astype(dtype), w_KGDF).reshape(B, T, H, F)
    if b_H is not None:
        if b_H.shape != (w_HDF.shape[0],):
            raise ValueError(f"feature-map bias must be per head (H,)={w_HDF.shape[:1]}: {b_H.shape=}")
        u_BTHF = u_BTHF + b_H.astype(dtype)[:, None]
    name = spec.feature_map
    if name == "softmax_dim":
        parts = [jax.nn.softmax(u_BTHF, axis=-1)]
        if spec.fullspace:
            parts.append(jax.nn.softmax(-u_BTHF, axis=-1))
    elif name == "exp_dim":
        parts = [jnp.exp(u_BTHF - jnp.max(u_BTHF, axis=-1, keepdims=True))]
        if spec.fullspace:
            parts.append(jnp.exp(jnp.min(u_BTHF, axis=-1, keepdims=True) - u_BTHF))
    elif name == "relu":
        parts = [jax.nn.relu(u_BTHF)]
    elif name == "pos_elu":
        parts = [1.0 + jax.nn.elu(u_BTHF)]
    else:  # spec validation makes this unreachable
        raise ValueError(f"unknown feature map {name!r}")
    phi_BTHF = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)
    return jnp.maximum(phi_BTHF, jnp.asarray(spec.eps, dtype))


def query_key_features(q_BTHD, k_BTKD, fmap: FeatureMapParams, spec: LolcatsSpec) -> tuple[Array, Array]:
    """(f_q, f_k), each (B, T, H, F') in the compute dtype (keys with K ≤ H heads: one key map per query head)."""
    return feature_map(q_BTHD, fmap.wq, fmap.bq, spec), feature_map(k_BTKD, fmap.wk, fmap.bk, spec)
