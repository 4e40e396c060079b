"""Multi-token continuation of a decode state: N new tokens per row attend in parallel to the state and to each other
(chunked prefill of a long prompt, a conversation turn appended to a cached one).

Notation as in recurrent.py: B batch, N new tokens, H query heads, K key/value heads (query head h = k·G + g reads
kv head k, G = H/K), D head dim, Dv value dim, F' feature dim, W window, R ring length; candidate keys C = R + N (the
ring, oldest first, then the new tokens). Per-token tensors are q [B, N, H, D], k [B, N, K, D], v [B, N, K, Dv],
post-RoPE, never repeated to H heads; row b consumes its first lengths_b tokens at
positions pos_b, pos_b + 1, … (right padding, as everywhere).

Default mode (no compat) — exact: the output at every new position equals the parallel form over the whole sequence
(and so `decode_tokens`), because the state holds exactly the keys that are linear for every later query and the ring
holds the others with their positions; each candidate key is classified by the parallel form's key-set rule at
absolute positions. Cost O(N·(R + N)) per row and head: callers chunk long prompts.

Compat (hybrid form) — the original's "stateful" branch (reference §3.7-3, §3.8), reproduced with its quirks: the
new tokens attend to each other with the original's masks for a call of their own length (tk: blocks aligned to the
end of the call, every causal key in both sets when it is at most W long; sw: the sliding window), and to every
earlier token only through the call state (s_all, z_all = Σ over the tokens of earlier multi-token calls; tokens that
were decoded one at a time are not in it; a call of one token is a decode step). Then s_all += Σ new, the decode state (S, z) += Σ of the new tokens except
the last W, and the ring is replaced by the new tokens' last W (older ring keys are dropped, via start_B).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from kernels.lolcats.feature_maps import feature_map, window_factors
from kernels.lolcats.recurrent import (DecodeState, _decode_spec, _slot_positions, decode_step, keeps_call_state, ring_len,
                                      select_rows, weighted_kv_sum)
from kernels.lolcats.spec import LINEAR_DENOM_EPS, FeatureMapParams, LolcatsSpec, key_sets


def extend_state(
    state: DecodeState,
    q: Float[Array, "B N H D"],
    k: Float[Array, "B N K D"],
    v: Float[Array, "B N K Dv"],
    fmap: FeatureMapParams,
    theta_H: Float[Array, "H"] | None,
    spec: LolcatsSpec,
    lengths: Int[Array, "B"] | None = None,
) -> tuple[Float[Array, "B N H Dv"], DecodeState]:
    """Consume lengths_b (default N) new tokens per row; returns their outputs (q's dtype; rows past lengths_b are
    unspecified) and the new state. A row with lengths_b = 0 is left as it was."""
    B, N, H, D = q.shape
    n_B = jnp.full((B,), N, jnp.int32) if lengths is None else jnp.clip(jnp.asarray(lengths, jnp.int32), 0, N)
    fq_BNHF = feature_map(q, fmap.wq, fmap.bq, spec)
    fk_BNHF = feature_map(k, fmap.wk, fmap.bk, spec)
    real_BN = jnp.arange(N)[None, :] < n_B[:, None]
    if keeps_call_state(spec):
        y, new = _extend_compat(state, q, k, v, fq_BNHF, fk_BNHF, theta_H, spec, n_B, real_BN)
        # the original takes a one-token call on a cache as a decode step
        y1, one = decode_step(state, q[:, 0], k[:, 0], v[:, 0], fmap, theta_H, spec)
        y = y.at[:, 0].set(jnp.where((n_B == 1)[:, None, None], y1.astype(y.dtype), y[:, 0]))
        new = select_rows(n_B == 1, one, new)
    elif spec.form == "linear":
        y, new = _extend_linear(state, v, fq_BNHF, fk_BNHF, n_B, real_BN)
    else:
        y, new = _extend_exact(state, q, k, v, fq_BNHF, fk_BNHF, theta_H, spec, n_B, real_BN)
    return y.astype(q.dtype), select_rows(n_B > 0, new, state)


def _sum_kv(w_BN, fk_BNHF, v_BNKD):
    """(Σ_n w f_k v_nᵀ, Σ_n w f_k) over the new tokens with per-token weights w (B, N)."""
    return weighted_kv_sum(w_BN, fk_BNHF, v_BNKD)


def _per_kv(x_BHX, K: int) -> Array:
    """(B, H, …) → (B, K, G, …): query head h = k·G + g."""
    return x_BHX.reshape((x_BHX.shape[0], K, x_BHX.shape[1] // K) + x_BHX.shape[2:])


def _combine(q, k_BCKD, v_BCKD, fq_BNHF, fk_BCHF, win_BNC, lin_BNC, theta_H, spec, s_BHFD, z_BHF):
    """y (B, N, H, Dv) of the hybrid form over candidate keys with masks (B, N, C), plus λ·(state S, z)."""
    cdt = fq_BNHF.dtype
    if theta_H is None:
        raise ValueError(f"form='hybrid' needs theta_H of shape (H,) = ({q.shape[2]},), got None")
    gamma_H, lam_H = window_factors(theta_H, spec, cdt)
    g, l = gamma_H[None, :, None, None], lam_H[None, :, None, None]
    win, lin = win_BNC[:, None], lin_BNC[:, None]  # (B, 1, N, C)
    B, N, H, D = q.shape
    K = k_BCKD.shape[2]
    q_BKGND = _per_kv(q.astype(cdt).transpose(0, 2, 1, 3), K)
    s_BHNC = jnp.einsum("bkgnd,bckd->bkgnc", q_BKGND, k_BCKD.astype(cdt)).reshape(B, H, N, -1) / np.sqrt(D)
    s_BHNC = jnp.where(win, s_BHNC, -jnp.inf)
    c_BHN1 = jnp.max(s_BHNC, axis=-1, keepdims=True)  # every real query has its own key in its window
    c_BHN1 = jnp.where(jnp.isfinite(c_BHN1), c_BHN1, 0.0)  # padded queries: keep them finite
    p_BHNC = g * jnp.where(win, jnp.exp(s_BHNC - c_BHN1), 0.0) \
        + l * jnp.where(lin, jnp.einsum("bnhf,bchf->bhnc", fq_BNHF, fk_BCHF), 0.0)
    num_BKGND = jnp.einsum("bkgnc,bckd->bkgnd", _per_kv(p_BHNC, K), v_BCKD.astype(cdt))
    num = num_BKGND.reshape(B, H, N, -1).transpose(0, 2, 1, 3) \
        + lam_H[None, None, :, None] * jnp.einsum("bnhf,bhfd->bnhd", fq_BNHF, s_BHFD)
    den = jnp.einsum("bhnc->bnh", p_BHNC) + lam_H[None, None, :] * jnp.einsum("bnhf,bhf->bnh", fq_BNHF, z_BHF)
    den = jnp.where(den > 0, den, 1.0)  # padded queries only
    return num / den[..., None]


def _linear_new(state, v, fq_BNHF, fk_BNHF, see_BNN):
    """Linear-form outputs of N new tokens: the state (every earlier key) plus the new keys m that query n sees."""
    cdt = fq_BNHF.dtype
    B, N, H, _ = fq_BNHF.shape
    K = v.shape[2]
    a_BHNN = jnp.where(see_BNN[:, None], jnp.einsum("bnhf,bmhf->bhnm", fq_BNHF, fk_BNHF), 0.0)
    near_BKGND = jnp.einsum("bkgnm,bmkd->bkgnd", _per_kv(a_BHNN, K), v.astype(cdt))
    num = near_BKGND.reshape(B, H, N, -1).transpose(0, 2, 1, 3) + jnp.einsum("bnhf,bhfd->bnhd", fq_BNHF, state.s_BHFD)
    den = jnp.einsum("bhnm->bnh", a_BHNN) + jnp.einsum("bnhf,bhf->bnh", fq_BNHF, state.z_BHF) + LINEAR_DENOM_EPS
    return num / den[..., None]


def _extend_linear(state, v, fq_BNHF, fk_BNHF, n_B, real_BN):
    N = fq_BNHF.shape[1]
    see_BNN = jnp.tril(jnp.ones((N, N), bool))[None] & real_BN[:, None, :]
    y = _linear_new(state, v, fq_BNHF, fk_BNHF, see_BNN)
    ds, dz = _sum_kv(real_BN, fk_BNHF, v)
    return y, state._replace(s_BHFD=state.s_BHFD + ds, z_BHF=state.z_BHF + dz, pos_B=state.pos_B + n_B)


def _ring_in_order(state: DecodeState, R: int):
    """The ring's keys, values, features and positions oldest first: (B, R, …) each, positions pos−R … pos−1."""
    pos_BR = state.pos_B[:, None] - R + jnp.arange(R)[None, :]
    idx_BR11 = jnp.mod(pos_BR, R)[:, :, None, None]
    take = lambda x: jnp.take_along_axis(x, idx_BR11, axis=1)  # noqa: E731
    return take(state.k_BRKD), take(state.v_BRKD), take(state.fk_BRHF), pos_BR


def _new_ring(cand_k, cand_v, cand_fk, cand_pos_BC, new_pos_B, R: int, oldest_B):
    """Ring of the positions new_pos−R … new_pos−1 (slot p mod R) gathered from candidates whose positions run
    contiguously from cand_pos[:, 0]; slots below `oldest_B` (or negative) are zeroed."""
    slot_pos_BR = _slot_positions(new_pos_B, R)
    idx_BR = jnp.clip(slot_pos_BR - cand_pos_BC[:, :1], 0, cand_k.shape[1] - 1)
    valid_BR11 = (slot_pos_BR >= jnp.maximum(oldest_B, 0)[:, None])[:, :, None, None]

    def gather(x):
        return jnp.where(valid_BR11, jnp.take_along_axis(x, idx_BR[:, :, None, None], axis=1), 0).astype(x.dtype)

    return gather(cand_k), gather(cand_v), gather(cand_fk)


def _candidates(state: DecodeState, k, v, fk_BNHF, pos_BN, R: int):
    """Candidate keys of N new tokens: the ring (oldest first) then the new tokens — keys, values, features and
    positions (B, C = R + N, …), and which ring slots hold a real key (B, R)."""
    ring_k, ring_v, ring_fk, ring_pos_BR = _ring_in_order(state, R)
    return (jnp.concatenate([ring_k, k.astype(ring_k.dtype)], axis=1),
            jnp.concatenate([ring_v, v.astype(ring_v.dtype)], axis=1),
            jnp.concatenate([ring_fk, fk_BNHF], axis=1),
            jnp.concatenate([ring_pos_BR, pos_BN], axis=1),
            ring_pos_BR >= 0)


def _hybrid_new(state, q, cands, fq_BNHF, theta_H, spec, pos_BN, see_BNN):
    """Hybrid-form outputs of N new tokens at absolute positions pos_BN: the state, the ring, and the new keys m that
    query n may see (see_BNN), each candidate classified window / linear by the parallel form's rule."""
    cand_k, cand_v, cand_fk, cand_pos_BC, ring_ok_BR = cands
    win, lin = key_sets(pos_BN[:, :, None], cand_pos_BC[:, None, :], 0, _decode_spec(spec))
    ring_ok = jnp.broadcast_to(ring_ok_BR[:, None, :], see_BNN.shape[:2] + ring_ok_BR.shape[1:])
    ok = jnp.concatenate([ring_ok, see_BNN], axis=2)
    return _combine(q, cand_k, cand_v, fq_BNHF, cand_fk, win & ok, lin & ok, theta_H, spec, state.s_BHFD, state.z_BHF)


def _extend_exact(state, q, k, v, fq_BNHF, fk_BNHF, theta_H, spec, n_B, real_BN):
    R, N = ring_len(spec), q.shape[1]
    if state.k_BRKD.shape[1] != R:
        raise ValueError(f"state ring length {state.k_BRKD.shape[1]} does not match {R=} for this spec")
    pos_BN = state.pos_B[:, None] + jnp.arange(N)[None, :]
    cands = _candidates(state, k, v, fk_BNHF, pos_BN, R)
    see_BNN = jnp.broadcast_to(real_BN[:, None, :], (q.shape[0], N, N))  # causality: the key-set rule
    y = _hybrid_new(state, q, cands, fq_BNHF, theta_H, spec, pos_BN, see_BNN)
    cand_k, cand_v, cand_fk, cand_pos_BC, ring_ok_BR = cands
    cand_ok_BC = jnp.concatenate([ring_ok_BR, real_BN], axis=1)
    new_pos_B = state.pos_B + n_B
    fold_BC = cand_ok_BC & (cand_pos_BC < (new_pos_B - R)[:, None])  # keys every later query sees as linear
    ds, dz = _sum_kv(fold_BC, cand_fk, cand_v)
    k_r, v_r, fk_r = _new_ring(cand_k, cand_v, cand_fk, cand_pos_BC, new_pos_B, R, jnp.zeros_like(new_pos_B))
    return y, state._replace(s_BHFD=state.s_BHFD + ds, z_BHF=state.z_BHF + dz, k_BRKD=k_r, v_BRKD=v_r, fk_BRHF=fk_r,
                             pos_B=new_pos_B)


def branch_outputs(
    state: DecodeState,
    q: Float[Array, "B M H D"],
    k: Float[Array, "B M K D"],
    v: Float[Array, "B M K Dv"],
    fmap: FeatureMapParams,
    theta_H: Float[Array, "H"] | None,
    spec: LolcatsSpec,
    pos_BM: Int[Array, "B M"],
    branch_BM: Int[Array, "B M"],
    real_BM: Array,
) -> Float[Array, "B M H Dv"]:
    """Outputs of M new tokens per row that continue the row's state along several branches at once (the choices of
    a multiple-choice question after one shared context): token m of row b is at absolute position pos_BM[b, m] of
    branch branch_BM[b, m] and sees the state (every key before the row's position), the ring, and the earlier real
    tokens of its own branch only. Each output equals `extend_state` of that branch alone (and the parallel form over
    context + branch); nothing is copied per branch and the state is not advanced. Default mode only."""
    if keeps_call_state(spec) or spec.uses_compat_masks:
        raise ValueError("branch_outputs: compat caches follow the original's call order; continue each branch with "
                         "extend_state instead")
    if spec.form not in ("hybrid", "linear"):
        raise ValueError(f"branch_outputs needs form 'hybrid' or 'linear', not {spec.form!r}")
    fq = feature_map(q, fmap.wq, fmap.bq, spec)
    fk = feature_map(k, fmap.wk, fmap.bk, spec)
    own_BMM = (branch_BM[:, :, None] == branch_BM[:, None, :]) & real_BM[:, None, :]
    if spec.form == "linear":
        see_BMM = own_BMM & (pos_BM[:, None, :] <= pos_BM[:, :, None])
        return _linear_new(state, v, fq, fk, see_BMM).astype(q.dtype)
    cands = _candidates(state, k, v, fk, pos_BM, ring_len(spec))
    return _hybrid_new(state, q, cands, fq, theta_H, spec, pos_BM, own_BMM).astype(q.dtype)


def _call_key_sets(n_B, spec: LolcatsSpec, N: int):
    """The original's (window, linear) masks (B, N, N) for a call of n_b tokens (positions 0 … n_b−1 of the call)."""
    i, j = jnp.arange(N)[None, :, None], jnp.arange(N)[None, None, :]
    causal = (j <= i) & (j < n_B[:, None, None])
    w = int(spec.window_size)
    if spec.window == "sw":
        return causal & (j > i - w), causal & (j <= i - w)
    blocks = -(-n_B // w)[:, None, None]
    offset = blocks * w - n_B[:, None, None]
    blk_i, blk_j = (i + offset) // w, (j + offset) // w
    one = blocks <= 1  # roll(blockdiag, −W) is the identity: every causal key in both sets
    return causal & (one | (blk_j >= blk_i - 1)), causal & (one | (blk_j <= blk_i - 2))


def _extend_compat(state, q, k, v, fq_BNHF, fk_BNHF, theta_H, spec, n_B, real_BN):
    R, N = ring_len(spec), q.shape[1]
    W = int(spec.window_size)
    win, lin = _call_key_sets(n_B, spec, N)
    y = _combine(q, k, v, fq_BNHF, fk_BNHF, win, lin, theta_H, spec, state.s_all_BHFD, state.z_all_BHF)
    ds_all, dz_all = _sum_kv(real_BN, fk_BNHF, v)
    before_window_BN = jnp.arange(N)[None, :] < (n_B - W)[:, None]
    ds, dz = _sum_kv(before_window_BN, fk_BNHF, v)
    new_pos_B = state.pos_B + n_B
    start_B = state.pos_B + jnp.maximum(n_B - W, 0)
    cand_pos_BN = state.pos_B[:, None] + jnp.arange(N)[None, :]
    k_r, v_r, fk_r = _new_ring(k.astype(state.k_BRKD.dtype), v.astype(state.v_BRKD.dtype), fk_BNHF, cand_pos_BN,
                               new_pos_B, R, start_B)
    return y, state._replace(s_BHFD=state.s_BHFD + ds, z_BHF=state.z_BHF + dz, k_BRKD=k_r, v_BRKD=v_r, fk_BRHF=fk_r,
                             pos_B=new_pos_B, s_all_BHFD=state.s_all_BHFD + ds_all, z_all_BHF=state.z_all_BHF + dz_all,
                             start_B=start_B)


__all__ = ["extend_state", "branch_outputs"]
