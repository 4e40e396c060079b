"""Quadratic reference implementation of every attention form (the ground truth other backends are tested against).

Notation: B batch, T tokens (queries i, keys j), H query heads, K key/value heads, D head dim, F' feature dim (see
spec.py). Grouped-query inputs are expanded here, literally: query head h uses kv head h // (H/K)
(`repeat_kv_heads`) — the ground truth that the backends, which never repeat k and v, are tested against.
Materialises (B, H, T, T) maps: for tests and short sequences only. Computes in float32 (float64 for float64
inputs, e.g. under `jax.enable_x64`); outputs are cast back to the input dtype. Plain JAX, differentiable by
autodiff wrt q, k, v, feature-map parameters and θ. Supports spec.compat (original end-aligned tk masks).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from kernels.lolcats.feature_maps import compute_dtype, query_key_features, window_factors
from kernels.lolcats.spec import LINEAR_DENOM_EPS, FeatureMapParams, LolcatsSpec, key_set_masks, kv_group


def repeat_kv_heads(x_BTKD, num_heads: int) -> Array:
    """(B, T, K, X) → (B, T, H, X): head h is kv head h // (H/K) (the reference's reading of grouped-query inputs)."""
    G = kv_group(num_heads, x_BTKD.shape[2], f"k/v {x_BTKD.shape}")
    return x_BTKD if G == 1 else jnp.repeat(x_BTKD, G, axis=2)


def _scores(q_BTHD, k_BTHD) -> Array:
    """s_BHij = q_i·k_j/√D in the compute dtype."""
    dtype = compute_dtype(q_BTHD.dtype)
    scale = 1.0 / jnp.sqrt(jnp.asarray(q_BTHD.shape[-1], dtype))
    return jnp.einsum("bihd,bjhd->bhij", q_BTHD.astype(dtype), k_BTHD.astype(dtype)) * scale


def _teacher_weights(q_BTHD, k_BTHD) -> Float[Array, "B H T T"]:
    """Causal softmax weights with 1/√D (the teacher, reference §3.1), compute dtype."""
    s_BHTT = _scores(q_BTHD, k_BTHD)
    T = s_BHTT.shape[-1]
    causal_TT = jnp.tril(jnp.ones((T, T), bool))
    s_BHTT = jnp.where(causal_TT, s_BHTT, -jnp.inf)
    return jax.nn.softmax(s_BHTT, axis=-1)


def _student_unnormalised(q_BTHD, k_BTHD, fmap, theta_H, spec) -> tuple[Array, Array]:
    """(P_BHTT, extra_denominator): P_ij = γ e^{s_ij−c_i}[j∈𝒲_i] + λ f_q,i·f_k,j [j∈𝓛_i] for hybrid,
    f_q,i·f_k,j [j≤i] for linear; the normalised weights are P / (Σ_j P + extra)."""
    dtype = compute_dtype(q_BTHD.dtype)
    T = q_BTHD.shape[1]
    win_TT, lin_TT = key_set_masks(T, spec)
    f_q, f_k = query_key_features(q_BTHD, k_BTHD, fmap, spec)
    lin_BHTT = jnp.einsum("bihf,bjhf->bhij", f_q, f_k)
    if spec.form == "linear":
        return jnp.where(lin_TT, lin_BHTT, 0.0), LINEAR_DENOM_EPS
    if theta_H is None:
        raise ValueError(f"form='hybrid' needs the window logits theta_H (H,) = ({q_BTHD.shape[2]},), got None")
    gamma_H, lam_H = window_factors(theta_H, spec, dtype)
    s_BHTT = _scores(q_BTHD, k_BTHD)
    s_win = jnp.where(win_TT, s_BHTT, -jnp.inf)
    c_BHT1 = jnp.max(s_win, axis=-1, keepdims=True)  # window max; every causal row has its diagonal in 𝒲_i
    sm_BHTT = jnp.where(win_TT, jnp.exp(s_win - c_BHT1), 0.0)
    p_BHTT = gamma_H[:, None, None] * sm_BHTT + lam_H[:, None, None] * jnp.where(lin_TT, lin_BHTT, 0.0)
    return p_BHTT, 0.0


def lolcats_attention_reference(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B T K D"],
    v: Float[Array, "B T K Dv"],
    fmap: FeatureMapParams,
    theta_H: Float[Array, "H"] | None,
    spec: LolcatsSpec,
) -> Float[Array, "B T H Dv"]:
    """y (B, T, H, Dv) of spec.form ("hybrid" | "linear" | "softmax"), quadratic in T, in q's dtype."""
    dtype = compute_dtype(q.dtype)
    H = q.shape[2]
    k, v = repeat_kv_heads(k, H), repeat_kv_heads(v, H)
    v_BTHD = v.astype(dtype)
    if spec.form == "softmax":
        a_BHTT = _teacher_weights(q, k)
        return jnp.einsum("bhij,bjhd->bihd", a_BHTT, v_BTHD).astype(q.dtype)
    p_BHTT, extra = _student_unnormalised(q, k, fmap, theta_H, spec)
    num_BTHD = jnp.einsum("bhij,bjhd->bihd", p_BHTT, v_BTHD)
    den_BTH = jnp.einsum("bhij->bih", p_BHTT) + extra
    return (num_BTHD / den_BTH[..., None]).astype(q.dtype)


def attention_weights_reference(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B T K D"],
    fmap: FeatureMapParams,
    theta_H: Float[Array, "H"] | None,
    spec: LolcatsSpec,
) -> tuple[Float[Array, "B H T T"], Float[Array, "B H T T"]]:
    """(teacher, student) row-normalised attention maps, (B, H, T_query, T_key), in the compute dtype.

    teacher = causal softmax with 1/√D; student = the normalised weights of spec.form (reference §3.3 `a`).
    """
    k = repeat_kv_heads(k, q.shape[2])
    teacher_BHTT = _teacher_weights(q, k)
    if spec.form == "softmax":
        return teacher_BHTT, teacher_BHTT
    p_BHTT, extra = _student_unnormalised(q, k, fmap, theta_H, spec)
    return teacher_BHTT, p_BHTT / (jnp.sum(p_BHTT, axis=-1, keepdims=True) + extra)
