"""Attention-map cross-entropy between the softmax teacher and the LoLCATS student (stage-1 `xent` loss, §4.3).

Notation: B batch, T tokens (queries i, keys j), H query heads, K key/value heads (query head h = k·G + g reads kv
head k; keys are never repeated), D head dim, F' feature dim, Cq query-chunk length.

  xent = mean over (b, h, i) of −Σ_j A_teacher[i, j] · log max(a_student[i, j], 1e-12)

teacher = causal softmax of q·k/√D; student = the row-normalised weights of spec.form (window + linear parts,
no prior state). The original applies `log_softmax` to the clamped log-weights (CrossEntropyLoss with probability
targets); since student rows sum to 1 this only differs by log(1 + O(T·1e-12)), which is dropped here.
`attention_xent` works on query chunks (`lax.map` of a rematerialised block), so at most a (B, H, Cq, T) map
exists at once, forward or backward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float

from kernels.lolcats.feature_maps import compute_dtype, query_key_features, window_factors
from kernels.lolcats.reference import attention_weights_reference
from kernels.lolcats.spec import LINEAR_DENOM_EPS, FeatureMapParams, LolcatsSpec, key_sets

LOG_CLAMP = 1e-12


def _row_xent(teacher, student) -> Array:
    """−Σ_j teacher · log max(student, 1e-12) over the last axis."""
    return -jnp.sum(teacher * jnp.log(jnp.maximum(student, LOG_CLAMP)), axis=-1)


def attention_xent_reference(q, k, fmap: FeatureMapParams, theta_H, spec: LolcatsSpec) -> Array:
    """The same loss from the full (B, H, T, T) maps of `attention_weights_reference` (tests / short T)."""
    teacher_BHTT, student_BHTT = attention_weights_reference(q, k, fmap, theta_H, spec)
    return jnp.mean(_row_xent(teacher_BHTT, student_BHTT))


def attention_xent(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B T K D"],
    v: Float[Array, "B T K Dv"] | None,
    fmap: FeatureMapParams,
    theta_H: Float[Array, "H"] | None,
    spec: LolcatsSpec,
    query_chunk: int = 64,
) -> Float[Array, ""]:
    """Blockwise attention cross-entropy (scalar, compute dtype), differentiable wrt q, k, fmap and θ.

    `v` is accepted for signature symmetry with `lolcats_attention` and is not used (the maps do not depend on it).
    Supports every form and compat masks (the key sets are evaluated per block from positions).
    """
    del v
    if query_chunk < 1:
        raise ValueError(f"{query_chunk=} must be >= 1")
    B, T, H, D = q.shape
    K = k.shape[2]
    dtype = compute_dtype(q.dtype)
    Cq = min(int(query_chunk), T)
    N = -(-T // Cq)
    pad = ((0, 0), (0, N * Cq - T), (0, 0), (0, 0))
    q_BTHD, k_BTKD = q.astype(dtype), k.astype(dtype)
    q_NBCHD = jnp.pad(q_BTHD, pad).reshape(B, N, Cq, H, D).swapaxes(0, 1)
    if spec.form != "softmax":
        fq, fk_BTHF = query_key_features(q, k, fmap, spec)
        fq_NBCHF = jnp.pad(fq, pad).reshape(B, N, Cq, H, fq.shape[-1]).swapaxes(0, 1)
    else:
        fq_NBCHF = jnp.zeros((N, B, Cq, H, 1), dtype)
    if spec.form == "hybrid":
        if theta_H is None:
            raise ValueError(f"form='hybrid' needs theta_H of shape (H,) = ({H},), got None")
        gamma_H, lam_H = window_factors(theta_H, spec, dtype)
    scale = 1.0 / np.sqrt(D)
    key_pos_T = jnp.arange(T)

    @jax.checkpoint
    def block(args):
        n, q_BCHD, fq_BCHF = args
        row_C = n * Cq + jnp.arange(Cq)
        qpos_C1 = jnp.minimum(row_C, T - 1)[:, None]  # padded rows reuse row T−1's masks (finite; excluded below)
        q_BCKGD = q_BCHD.reshape(B, Cq, K, H // K, D)
        s_BHCT = jnp.einsum("bikgd,bjkd->bkgij", q_BCKGD, k_BTKD).reshape(B, H, Cq, T) * scale
        causal_CT = key_pos_T[None, :] <= qpos_C1
        teacher = jax.nn.softmax(jnp.where(causal_CT, s_BHCT, -jnp.inf), axis=-1)
        if spec.form == "softmax":
            student = teacher
        else:
            win_CT, lin_CT = key_sets(qpos_C1, key_pos_T[None, :], T, spec)
            lin_part = jnp.where(lin_CT, jnp.einsum("bihf,bjhf->bhij", fq_BCHF, fk_BTHF), 0.0)
            if spec.form == "linear":
                p, extra = lin_part, LINEAR_DENOM_EPS
            else:
                s_win = jnp.where(win_CT, s_BHCT, -jnp.inf)
                e = jnp.where(win_CT, jnp.exp(s_win - jnp.max(s_win, -1, keepdims=True)), 0.0)
                p, extra = gamma_H[:, None, None] * e + lam_H[:, None, None] * lin_part, 0.0
            student = p / (jnp.sum(p, -1, keepdims=True) + extra)
        return jnp.sum(jnp.where(row_C < T, _row_xent(teacher, student), 0.0))

    sums_N = lax.map(block, (jnp.arange(N), q_NBCHD, fq_NBCHF))
    return jnp.sum(sums_N) / (B * H * T)
