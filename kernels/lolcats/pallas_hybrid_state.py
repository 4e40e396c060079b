"""Segment states of the LoLCATS Pallas kernels: the sequence of N chunks is split into NS segments of G chunks so
that the main kernels run one program per (batch, head, segment) in parallel instead of one long loop per head.

Notation as in pallas_tiles.py (B, H, K, Tp, D, Dv, V, F, P, C, G, NS; lag = 2 for hybrid, 1 for linear, shift =
lag − 1). The states are per query head h (its own key feature map, applied to the keys of kv head h // (H/K)).
A program of segment s needs the linear state of everything its first chunk sees only through the state:
  forward / dq kernels:  S_s = Σ_{key chunks < sG − shift} f_kᵀ v   (P·F × Dv),  z_s = Σ f_k            (P·F)
  dk/dv kernel:          G_s = Σ_{query chunks ≥ (s+1)G + shift} f_qᵀ g (P·F × Dv), Z_s = Σ δ f_q         (P·F)
Two small kernels sum each segment's own contribution (keys of chunks [sG − shift, (s+1)G − shift), queries of
chunks [sG + shift, (s+1)G + shift)), and a cumulative sum over segments in XLA turns the sums into the states. Only
the NS − 1 sums that some state uses are computed (not the last segment's keys, not the first segment's queries);
with one segment neither kernel runs. Reference: the chunked sums of kernels.lolcats.chunked, and tests/kernels/test_pallas.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.lolcats.pallas_tiles import BIAS_K, BIAS_Q, KernelLayout, features, kv_head, mm_tn, query_side, store_state
from lolcats_jax import compat


def _key_sum_kernel(k_ref, v_ref, wk_ref, hs_ref, dS_ref, dz_ref, *, lay: KernelLayout):
    """Refs: k (Tp, D), v (Tp, V), wk (D, F), hs (4,) → dS (P·F, V), dz (P·F,) of segment program_id(3) (segments
    0 … NS − 2: the last one's sum would only feed a state after the end)."""
    C, dt, F = lay.chunk, k_ref.dtype, wk_ref.shape[-1]
    s = pl.program_id(3)
    lo = jnp.maximum(s * lay.seg_chunks - lay.shift, 0)
    hi = jnp.minimum((s + 1) * lay.seg_chunks - lay.shift, lay.num_chunks)

    def body(n, carry):
        S, z = carry
        rows = pl.ds(n * C, C)
        fk = features(k_ref[rows, :], wk_ref[...], hs_ref[BIAS_K], lay, dt)[2]
        v_CV = v_ref[rows, :]
        return (tuple(S_p + mm_tn(f, v_CV, dt) for S_p, f in zip(S, fk)),
                tuple(z_p + jnp.sum(f, axis=0) for z_p, f in zip(z, fk)))

    init = (tuple(jnp.zeros((F, v_ref.shape[-1]), jnp.float32) for _ in range(lay.num_parts)),
            tuple(jnp.zeros((F,), jnp.float32) for _ in range(lay.num_parts)))
    S, z = jax.lax.fori_loop(lo, jnp.maximum(hi, lo), body, init)
    store_state(dS_ref, dz_ref, S, z, F)


def _query_sum_kernel(q_ref, dy_ref, y_ref, den_ref, wq_ref, hs_ref, dG_ref, dZ_ref, *, lay: KernelLayout):
    """Refs: q (Tp, D), dy/y (Tp, Dv), den (Tp,), wq (D, F), hs (4,) → dG (P·F, Dv), dZ (P·F,) of segment
    program_id(2) + 1 (segment 0's sum is never used: no state lies before it)."""
    dt, F = q_ref.dtype, wq_ref.shape[-1]
    s = pl.program_id(2) + 1
    lo = jnp.minimum(s * lay.seg_chunks + lay.shift, lay.num_chunks)
    hi = jnp.minimum((s + 1) * lay.seg_chunks + lay.shift, lay.num_chunks)

    def body(n, carry):
        G, Z = carry
        q_CD, g_CD, delta_C = query_side(n, q_ref, dy_ref, y_ref, den_ref, lay)
        fq = features(q_CD, wq_ref[...], hs_ref[BIAS_Q], lay, dt)[2]
        return (tuple(G_p + mm_tn(f, g_CD, dt) for G_p, f in zip(G, fq)),
                tuple(Z_p + jnp.sum(f * delta_C[:, None], axis=0) for Z_p, f in zip(Z, fq)))

    init = (tuple(jnp.zeros((F, dy_ref.shape[-1]), jnp.float32) for _ in range(lay.num_parts)),
            tuple(jnp.zeros((F,), jnp.float32) for _ in range(lay.num_parts)))
    G, Z = jax.lax.fori_loop(lo, hi, body, init)
    store_state(dG_ref, dZ_ref, G, Z, F)


def states_before(sums, axis: int, reverse: bool = False):
    """The NS states from the NS − 1 sums that feed one: state s = Σ of the sums of the segments before s (after s if
    reverse; then sums[p] belongs to segment p + 1) — zero for the first (last) segment."""
    zero = jnp.zeros_like(jax.lax.slice_in_dim(sums, 0, 1, axis=axis))
    if reverse:
        return jnp.concatenate([jnp.flip(jnp.cumsum(jnp.flip(sums, axis), axis=axis), axis), zero], axis=axis)
    return jnp.concatenate([zero, jnp.cumsum(sums, axis=axis)], axis=axis)


def key_states(k_BTKD, v_BTKD, wk_HDF, hs_H4, lay: KernelLayout, interpret: bool):
    """(S (B, H, NS, P·F, Dv), z (B, H, NS, P·F)) float32: the forward state at the start of every segment, per
    query head h (features of wk[h] over the keys of kv head h // (H/K); k, v have K heads)."""
    B, Tp, K, D = k_BTKD.shape
    H, _, F = wk_HDF.shape
    Dv, V, NS, group = v_BTKD.shape[-1], lay.block_v, lay.num_segments, H // K
    PF = lay.num_parts * F
    if NS == 1:  # one segment starts from the empty state: nothing to sum
        return jnp.zeros((B, H, 1, PF, Dv), jnp.float32), jnp.zeros((B, H, 1, PF), jnp.float32)
    dS, dz = pl.pallas_call(
        functools.partial(_key_sum_kernel, lay=lay),
        grid=(B, H, Dv // V, NS - 1),
        in_specs=[pl.BlockSpec((None, Tp, None, D), lambda b, h, j, s: (b, 0, kv_head(h, group), 0)),
                  pl.BlockSpec((None, Tp, None, V), lambda b, h, j, s: (b, 0, kv_head(h, group), j)),
                  pl.BlockSpec((None, D, F), lambda b, h, j, s: (h, 0, 0)),
                  pl.BlockSpec((None, 4), lambda b, h, j, s: (h, 0))],
        out_specs=[pl.BlockSpec((None, None, None, PF, V), lambda b, h, j, s: (b, h, s, 0, j)),
                   pl.BlockSpec((None, None, None, PF), lambda b, h, j, s: (b, h, s, 0))],
        out_shape=[jax.ShapeDtypeStruct((B, H, NS - 1, PF, Dv), jnp.float32),
                   jax.ShapeDtypeStruct((B, H, NS - 1, PF), jnp.float32)],
        compiler_params=compat.triton_compiler_params(num_warps=lay.num_warps_fwd, num_stages=lay.num_stages),
        interpret=interpret,
        name=f"lolcats_{lay.form}_key_states",
    )(k_BTKD, v_BTKD, wk_HDF, hs_H4)
    return states_before(dS, axis=2), states_before(dz, axis=2)


def query_states(q, dy, y, den_BHT, wq, hs_H4, lay: KernelLayout, interpret: bool):
    """(G (B, H, NS, P·F, Dv), Z (B, H, NS, P·F)) float32: the dk/dv kernel's state at the end of every segment."""
    B, Tp, H, D = q.shape
    Dv, F, NS = dy.shape[-1], wq.shape[-1], lay.num_segments
    PF = lay.num_parts * F
    if NS == 1:  # one segment ends with the empty state: nothing to sum
        return jnp.zeros((B, H, 1, PF, Dv), jnp.float32), jnp.zeros((B, H, 1, PF), jnp.float32)
    seq = functools.partial(pl.BlockSpec, index_map=lambda b, h, s: (b, 0, h, 0))
    dG, dZ = pl.pallas_call(
        functools.partial(_query_sum_kernel, lay=lay),
        grid=(B, H, NS - 1),
        in_specs=[seq((None, Tp, None, D)), seq((None, Tp, None, Dv)), seq((None, Tp, None, Dv)),
                  pl.BlockSpec((None, None, Tp), lambda b, h, s: (b, h, 0)),
                  pl.BlockSpec((None, D, F), lambda b, h, s: (h, 0, 0)),
                  pl.BlockSpec((None, 4), lambda b, h, s: (h, 0))],
        out_specs=[pl.BlockSpec((None, None, None, PF, Dv), lambda b, h, s: (b, h, s, 0, 0)),
                   pl.BlockSpec((None, None, None, PF), lambda b, h, s: (b, h, s, 0))],
        out_shape=[jax.ShapeDtypeStruct((B, H, NS - 1, PF, Dv), jnp.float32),
                   jax.ShapeDtypeStruct((B, H, NS - 1, PF), jnp.float32)],
        compiler_params=compat.triton_compiler_params(num_warps=lay.num_warps_bwd, num_stages=lay.num_stages),
        interpret=interpret,
        name=f"lolcats_{lay.form}_query_states",
    )(q, dy, y, den_BHT, wq, hs_H4)
    return states_before(dG, axis=2, reverse=True), states_before(dZ, axis=2, reverse=True)
