"""Recurrent decoding: prefill a state from a prompt, then one token at a time, equal to the parallel form.

Notation: B batch, T tokens, H query heads, K key/value heads (grouped-query attention: query head h reads kv head
h // (H/K)), D head dim, Dv value dim, F' feature dim, W window, R ring length (see spec.py). Per-token tensors are
q [B, H, D], k [B, K, D], v [B, K, Dv], post-RoPE; keys and values are never repeated to H heads.

State (O(1) in T, per-row positions so rows of a batch may be at different positions):
  s_BHFD, z_BHF   linear state Σ f_k v_jᵀ, Σ f_k over the keys that left the ring (compute dtype, ≥ float32)
  k_BRKD, v_BRKD  ring of the R most recent raw keys/values, K heads (input dtype); slot r holds position p ≡ r
                  (mod R)
  fk_BRHF         their features f_k, one per query head (compute dtype; the key feature maps are per query head):
                  f_k is computed once per key, when it enters the ring
  pos_B           tokens consumed per row (the position of the next token), int32

Ring length and exact equivalence with the parallel form at every position t:
  sw:  R = W. Before writing token t the key t−W (slot t mod W) is folded into (S, z); the ring then holds
       t−W+1..t = 𝒲_t and the state holds 𝓛_t = {j ≤ t−W}.
  tk:  R = 2W (previous + current block). Before writing token t the key t−2W (block blk(t)−2) is folded into
       (S, z); the ring holds t−2W+1..t, and each ring key is classified per step by the same key-set rule as the
       parallel form (blocks ≥ blk(t)−1 → window; the rest of block blk(t)−2 → linear, through its stored f_k).
       So a whole block has entered (S, z) by the time every key of it must be linear, one key per step.
  tk with spec.compat: the original decoder (reference §3.8), i.e. the sw rule with R = W.
  linear form: no ring; (S, z) include the current token, y = f_q S / (f_q·z + LINEAR_DENOM_EPS).
  softmax form: not supported (needs a growing KV cache).

Under spec.compat (hybrid form) the state also carries what the original's cache keeps for multi-token calls on a
cache (its "stateful" branch, reference §3.7-3, §3.8; see continuation.py):
  s_all_BHFD, z_all_BHF   Σ over every token of the multi-token calls (its kv_states / k_states; decoding does not
                          add to them)
  start_B                 the oldest position the ring may still hold: a multi-token call replaces the original's
                          window cache by its own last W tokens, so older ring keys that never reached (S, z) are
                          dropped. 0 until such a call.
Without compat these three are None.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float, Int

from kernels.lolcats.feature_maps import compute_dtype, feature_map, window_factors
from kernels.lolcats.spec import LINEAR_DENOM_EPS, FeatureMapParams, LolcatsSpec, key_sets


class DecodeState(NamedTuple):
    s_BHFD: Array  # (B, H, F', Dv) compute dtype
    z_BHF: Array  # (B, H, F')
    k_BRKD: Array  # (B, R, K, D) input dtype
    v_BRKD: Array  # (B, R, K, Dv)
    fk_BRHF: Array  # (B, R, H, F') compute dtype
    pos_B: Array  # (B,) int32
    s_all_BHFD: Array | None = None  # compat only (see above)
    z_all_BHF: Array | None = None
    start_B: Array | None = None


def select_rows(take_B, a: DecodeState, b: DecodeState) -> DecodeState:
    """Row-wise `a` where take_B (B,) is True, else `b` (for rows that consume nothing in a batched call)."""
    pick = lambda x, y: None if x is None else jnp.where(take_B.reshape((-1,) + (1,) * (x.ndim - 1)), x, y)  # noqa: E731
    return type(a)(*(pick(x, y) for x, y in zip(a, b)))


def keeps_call_state(spec: LolcatsSpec) -> bool:
    """True when the state follows the original's cache (spec.compat, hybrid form): see the module docstring."""
    return spec.compat and spec.form == "hybrid"


def _decode_spec(spec: LolcatsSpec) -> LolcatsSpec:
    """The key-set rule used in decoding (compat tk decodes with the original's sliding window)."""
    if spec.form == "softmax":
        raise NotImplementedError("recurrent decoding of form='softmax' needs a growing KV cache; "
                                  "LoLCATS decoding supports form='hybrid' and form='linear'")
    if spec.uses_compat_masks:
        return dataclasses.replace(spec, window="sw", compat=False)
    return spec


def ring_len(spec: LolcatsSpec) -> int:
    """R: W for sw (and compat tk), 2W for tk, 0 for the linear form."""
    spec = _decode_spec(spec)
    if spec.form == "linear":
        return 0
    return spec.window_size * (2 if spec.window == "tk" else 1)


def init_decode_state(batch: int, num_heads: int, head_dim: int, feature_out_dim: int, spec: LolcatsSpec,
                      dtype=jnp.float32, value_dim: int | None = None, num_kv_heads: int | None = None) -> DecodeState:
    """The empty state (no token consumed). feature_out_dim is F' (`spec.feature_out_dim(F)`); num_kv_heads is K
    (default H)."""
    R, Dv, cdt = ring_len(spec), value_dim or head_dim, compute_dtype(dtype)
    K = num_heads if num_kv_heads is None else num_kv_heads
    s = jnp.zeros((batch, num_heads, feature_out_dim, Dv), cdt)
    z = jnp.zeros((batch, num_heads, feature_out_dim), cdt)
    pos = jnp.zeros((batch,), jnp.int32)
    extra = (s, z, pos) if keeps_call_state(spec) else (None, None, None)
    return DecodeState(s, z, jnp.zeros((batch, R, K, head_dim), dtype), jnp.zeros((batch, R, K, Dv), dtype),
                       jnp.zeros((batch, R, num_heads, feature_out_dim), cdt), pos, *extra)


def _slot_positions(pos_B, R: int) -> Array:
    """(B, R) position held by each slot when the ring's newest key is pos_B − 1 (negative = empty slot)."""
    last_B1 = pos_B[:, None] - 1
    return last_B1 - jnp.mod(last_B1 - jnp.arange(R)[None, :], R)


def weighted_kv_sum(w_BT, fk_BTHF, v_BTKD) -> tuple[Array, Array]:
    """(Σ_t w f_k v_tᵀ (B, H, F', Dv), Σ_t w f_k (B, H, F')) with per-token weights w (B, T); v has K ≤ H heads
    (query head h = k·G + g pairs its features with kv head k)."""
    B, T, H, Fp = fk_BTHF.shape
    K = v_BTKD.shape[2]
    cdt = fk_BTHF.dtype
    w = w_BT.astype(cdt)
    fk_BTKGF = fk_BTHF.reshape(B, T, K, H // K, Fp)
    s = jnp.einsum("bt,btkgf,btkd->bkgfd", w, fk_BTKGF, v_BTKD.astype(cdt)).reshape(B, H, Fp, v_BTKD.shape[-1])
    return s, jnp.einsum("bt,bthf->bhf", w, fk_BTHF)


def prefill_state(
    k: Float[Array, "B T K D"],
    v: Float[Array, "B T K Dv"],
    fmap: FeatureMapParams,
    spec: LolcatsSpec,
    lengths: Int[Array, "B"] | None = None,
) -> DecodeState:
    """State after consuming tokens [0, lengths_b) of each (right-padded) row; tokens at ≥ lengths_b are ignored.

    lengths default to T and must lie in [0, T] (values outside are clipped). The query-head count H is that of
    the feature maps (fmap.wk (H, D, F)).
    """
    B, T, K, _ = k.shape
    H = fmap.wk.shape[0]
    R = ring_len(spec)
    len_B = jnp.full((B,), T, jnp.int32) if lengths is None else jnp.clip(jnp.asarray(lengths, jnp.int32), 0, T)
    fk_BTHF = feature_map(k, fmap.wk, fmap.bk, spec)
    pos_T = jnp.arange(T)
    in_state_BT = pos_T[None, :] < (len_B - R)[:, None]  # keys that already left the ring
    s_BHFD, z_BHF = weighted_kv_sum(in_state_BT, fk_BTHF, v)
    if keeps_call_state(spec):  # the prompt is the first multi-token call: Σ over all of its tokens
        s_all, z_all = weighted_kv_sum(pos_T[None, :] < len_B[:, None], fk_BTHF, v)
        extra = {"s_all_BHFD": s_all, "z_all_BHF": z_all, "start_B": jnp.zeros((B,), jnp.int32)}
    else:
        extra = {}
    if T == 0 or R == 0:
        empty = init_decode_state(B, H, k.shape[-1], fk_BTHF.shape[-1], spec, k.dtype, v.shape[-1], K)
        return empty._replace(s_BHFD=s_BHFD, z_BHF=z_BHF, pos_B=len_B, **extra)
    slot_pos_BR = _slot_positions(len_B, R)
    idx_BR = jnp.clip(slot_pos_BR, 0, T - 1)
    valid_BR11 = (slot_pos_BR >= 0)[:, :, None, None]

    def gather(x_BTHX):
        return jnp.where(valid_BR11, jnp.take_along_axis(x_BTHX, idx_BR[:, :, None, None], axis=1), 0)

    return DecodeState(s_BHFD, z_BHF, gather(k), gather(v), gather(fk_BTHF), len_B)._replace(**extra)


def _outer(fk_BHF, v_BKD, K: int) -> Array:
    """f_k v_ᵀ per query head (B, H, F', Dv), query head h = k·G + g pairing with kv head k."""
    B, H, Fp = fk_BHF.shape
    return jnp.einsum("bkgf,bkd->bkgfd", fk_BHF.reshape(B, K, H // K, Fp), v_BKD).reshape(B, H, Fp, v_BKD.shape[-1])


def decode_step(
    state: DecodeState,
    q_t: Float[Array, "B H D"],
    k_t: Float[Array, "B K D"],
    v_t: Float[Array, "B K Dv"],
    fmap: FeatureMapParams,
    theta_H: Float[Array, "H"] | None,
    spec: LolcatsSpec,
) -> tuple[Float[Array, "B H Dv"], DecodeState]:
    """Consume one token per row (at that row's position state.pos_B) and return its output y_t (q_t's dtype)."""
    dspec = _decode_spec(spec)
    B, H, D = q_t.shape
    K = k_t.shape[1]
    G = H // K
    fq_BHF = feature_map(q_t[:, None], fmap.wq, fmap.bq, spec)[:, 0]
    fk_BHF = feature_map(k_t[:, None], fmap.wk, fmap.bk, spec)[:, 0]
    cdt = fq_BHF.dtype
    per_kv = lambda x_BH_: x_BH_.reshape((B, K, G) + x_BH_.shape[2:])  # noqa: E731 (query head h = k·G + g)
    if dspec.form == "linear":
        s_BHFD = state.s_BHFD + _outer(fk_BHF, v_t.astype(cdt), K)
        z_BHF = state.z_BHF + fk_BHF
        num = jnp.einsum("bhf,bhfd->bhd", fq_BHF, s_BHFD)
        den = jnp.einsum("bhf,bhf->bh", fq_BHF, z_BHF) + LINEAR_DENOM_EPS
        new = state._replace(s_BHFD=s_BHFD, z_BHF=z_BHF, pos_B=state.pos_B + 1)
        return (num / den[..., None]).astype(q_t.dtype), new
    if theta_H is None:
        raise ValueError(f"form='hybrid' needs theta_H of shape (H,) = ({H},), got None")
    R = state.k_BRKD.shape[1]
    if R != ring_len(spec):
        raise ValueError(f"state ring length {R} does not match {ring_len(spec)=} for this spec")
    t_B = state.pos_B
    start_B = jnp.zeros_like(t_B) if state.start_B is None else state.start_B
    slot_BR = jnp.arange(R)[None, :] == jnp.mod(t_B, R)[:, None]
    # 1. fold the key leaving the ring (position t − R) into the linear state (unless it was dropped, compat)
    # select the leaving slot's features and value first (one-hot or all-zero weights, so this is exact), then one
    # outer product: the three-operand einsum materialised (B, R, H, F') products, ~17× slower on CPU
    evict_BR = (slot_BR & (t_B - R >= start_B)[:, None]).astype(cdt)
    fk_out_BHF = jnp.einsum("br,brhf->bhf", evict_BR, state.fk_BRHF)
    v_out_BKD = jnp.einsum("br,brkd->bkd", evict_BR, state.v_BRKD.astype(cdt))
    s_BHFD = state.s_BHFD + _outer(fk_out_BHF, v_out_BKD, K)
    z_BHF = state.z_BHF + fk_out_BHF
    # 2. write token t into its slot
    put = lambda buf, x: jnp.where(slot_BR[:, :, None, None], x[:, None].astype(buf.dtype), buf)  # noqa: E731
    k_BRKD, v_BRKD, fk_BRHF = put(state.k_BRKD, k_t), put(state.v_BRKD, v_t), put(state.fk_BRHF, fk_BHF)
    # 3. attend: ring keys by the parallel form's key-set rule, older keys through (S, z)
    slot_pos_BR = _slot_positions(t_B + 1, R)
    win_BR, lin_BR = key_sets(t_B[:, None], slot_pos_BR, 0, dspec)
    valid_BR = slot_pos_BR >= start_B[:, None]
    win_B1R, lin_B1R = (win_BR & valid_BR)[:, None], (lin_BR & valid_BR)[:, None]
    gamma_H, lam_H = window_factors(theta_H, spec, cdt)
    g, l = gamma_H[None, :, None], lam_H[None, :, None]
    s_BHR = jnp.einsum("bkgd,brkd->bkgr", per_kv(q_t.astype(cdt)), k_BRKD.astype(cdt)).reshape(B, H, R) / np.sqrt(D)
    s_BHR = jnp.where(win_B1R, s_BHR, -jnp.inf)
    c_BH1 = jnp.max(s_BHR, axis=-1, keepdims=True)  # the current token is always a window key
    p_BHR = g * jnp.where(win_B1R, jnp.exp(s_BHR - c_BH1), 0.0) \
        + l * jnp.where(lin_B1R, jnp.einsum("bhf,brhf->bhr", fq_BHF, fk_BRHF), 0.0)
    num_BHD = jnp.einsum("bkgr,brkd->bkgd", per_kv(p_BHR), v_BRKD.astype(cdt)).reshape(B, H, -1)
    num = num_BHD + l * jnp.einsum("bhf,bhfd->bhd", fq_BHF, s_BHFD)
    den = jnp.sum(p_BHR, axis=-1) + l[..., 0] * jnp.einsum("bhf,bhf->bh", fq_BHF, z_BHF)
    new = state._replace(s_BHFD=s_BHFD, z_BHF=z_BHF, k_BRKD=k_BRKD, v_BRKD=v_BRKD, fk_BRHF=fk_BRHF, pos_B=t_B + 1)
    return (num / den[..., None]).astype(q_t.dtype), new


def decode_tokens(
    state: DecodeState,
    q: Float[Array, "B N H D"],
    k: Float[Array, "B N K D"],
    v: Float[Array, "B N K Dv"],
    fmap: FeatureMapParams,
    theta_H: Float[Array, "H"] | None,
    spec: LolcatsSpec,
) -> tuple[Float[Array, "B N H Dv"], DecodeState]:
    """`decode_step` over N tokens per row (a `lax.scan`): row b consumes its tokens at positions pos_b, pos_b+1, …"""

    def step(st, xs):
        y, st = decode_step(st, *xs, fmap, theta_H, spec)
        return st, y

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v))
    state, y_NBHD = lax.scan(step, state, xs)
    return jnp.moveaxis(y_NBHD, 0, 1), state
