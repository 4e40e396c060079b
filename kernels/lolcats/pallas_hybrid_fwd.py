"""Forward Pallas kernel of LoLCATS hybrid / linear attention (Triton lowering), one program per
(batch, head, value tile, segment), a `fori_loop` over the segment's chunks inside the program.

Notation: B batch, Tp padded tokens, H query heads, K key/value heads, D head dim, Dv value dim, V value tile
(block_v), F feature dim, P feature parts, C chunk, N = Tp / C (see pallas_tiles.py). The program of query head h
reads k, v of kv head h // (H/K) (grouped-query attention; k, v are never repeated to H heads). Per query i of
chunk n (rows r, i = nC + r):
  s_ij = q_i·k_j/√D over the key chunks n ("cur") and n−1 ("prev"), c_i = max over the window keys,
  P_ij = γ e^{s_ij−c_i}[j∈𝒲_i] + λ f_q,i·f_k,j [j∈𝓛_i],
  y_i = (Σ_{j∈chunks n−1,n} P_ij v_j + λ f_q,i S) / (Σ_j P_ij + λ f_q,i·z),
with the linear state S = Σ_{j∈chunks ≤ n−2} f_k,j v_jᵀ (F'×V, as P parts of F×V) and z = Σ f_k,j, carried in
float32 across the loop (for the linear form: chunks ≤ n−1 and only the "cur" tile). The Hedgehog feature map is
fused: f = max(act(±(x·W_h + b_h)), eps) is computed per chunk from q/k tiles and the per-head weights.

Residual outputs for the backward: c (row max of window logits) and den (row denominators), float32 (B, H, Tp).
Parallelism: one program per (batch, head, value tile, segment of G chunks); each segment starts from the state
of all earlier chunks (pallas_hybrid_state.key_states).
Reference: kernels.lolcats.reference.lolcats_attention_reference (quadratic), tests/kernels/test_pallas.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.lolcats.pallas_hybrid_state import key_states
from kernels.lolcats.pallas_tiles import (
    BIAS_K,
    BIAS_Q,
    GAMMA,
    LAMBDA,
    NEG_INF,
    KernelLayout,
    features,
    key_set_tile,
    kv_head,
    load_state,
    mm,
    mm_t,
    mm_tn,
    row_guard,
    rowsum,
    softmax_scale,
)
from lolcats_jax import compat


def _forward_kernel(q_ref, k_ref, v_ref, wq_ref, wk_ref, hs_ref, S0_ref, z0_ref, y_ref, c_ref, den_ref, *,
                    lay: KernelLayout):
    """Refs: q/k (Tp, D), v/y (Tp, V), wq/wk (D, F), hs (4,), S0 (P·F, V), z0 (P·F,), c/den (Tp,) (k, v those of kv
    head h // (H/K)); program (b, h, value tile, segment program_id(3)) loops over the segment's chunks from the
    state S0, z0."""
    C, dt = lay.chunk, q_ref.dtype
    scale = softmax_scale(q_ref.shape[-1])
    gamma, lam = hs_ref[GAMMA], hs_ref[LAMBDA]
    bq, bk = hs_ref[BIAS_Q], hs_ref[BIAS_K]
    state_block = "prev" if lay.has_window else "cur"

    def body(n, carry):
        S_PFV, z_PF = carry
        i0 = n * C
        q_CD = q_ref[pl.ds(i0, C), :]
        fq = features(q_CD, wq_ref[...], bq, lay, dt)[2]
        tiles = {}
        for blk in lay.blocks:
            kn = n if blk == "cur" else jnp.maximum(n - 1, 0)  # chunk −1 is loaded as chunk 0, fully masked
            j0 = i0 if blk == "cur" else i0 - C
            k_CD, v_CV = k_ref[pl.ds(kn * C, C), :], v_ref[pl.ds(kn * C, C), :]
            win, lin = key_set_tile(i0, j0, lay, blk)
            fk = features(k_CD, wk_ref[...], bk, lay, dt)[2] if (lin is not None or blk == state_block) else None
            s_CC = mm_t(q_CD, k_CD, dt) * scale if win is not None else None
            tiles[blk] = (v_CV, fk, win, lin, s_CC)

        c_C = jnp.zeros((C,), jnp.float32)
        if lay.has_window:
            c_C = jnp.full((C,), NEG_INF, jnp.float32)
            for _, _, win, _, s_CC in tiles.values():
                c_C = jnp.maximum(c_C, jnp.max(jnp.where(win, s_CC, NEG_INF), axis=1))
        num_CV = jnp.zeros((C, v_ref.shape[-1]), jnp.float32)
        den_C = jnp.zeros((C,), jnp.float32)
        for v_CV, fk, win, lin, s_CC in tiles.values():
            p_CC = jnp.zeros((C, C), jnp.float32)
            if win is not None:
                p_CC += jnp.where(win, gamma * jnp.exp(s_CC - c_C[:, None]), 0.0)
            if lin is not None:
                dots_CC = sum(mm_t(a, b, dt) for a, b in zip(fq, fk))
                p_CC += jnp.where(lin, lam * dots_CC, 0.0)
            num_CV += mm(p_CC, v_CV, dt)
            den_C += rowsum(p_CC)
        for f_CF, S_FV, z_F in zip(fq, S_PFV, z_PF):
            num_CV += lam * mm(f_CF, S_FV, dt)
            den_C += lam * rowsum(f_CF * z_F[None, :])
        den_C = jnp.where(row_guard(n, lay), den_C + lay.den_eps, 1.0)  # padding rows stay finite
        y_ref[pl.ds(i0, C), :] = (num_CV / den_C[:, None]).astype(y_ref.dtype)
        c_ref[pl.ds(i0, C)] = c_C
        den_ref[pl.ds(i0, C)] = den_C

        # the state absorbs the chunk that is "prev" now and older than the window for chunk n + 1
        v_CV, fk, _, _, _ = tiles[state_block]
        keep = (n > 0).astype(jnp.float32) if state_block == "prev" else 1.0
        fk = tuple(f * keep for f in fk)
        S_PFV = tuple(S + mm_tn(f, v_CV, dt) for S, f in zip(S_PFV, fk))
        z_PF = tuple(z + jnp.sum(f, axis=0) for z, f in zip(z_PF, fk))
        return S_PFV, z_PF

    n0, n1 = lay.segment(pl.program_id(3))
    jax.lax.fori_loop(n0, n1, body, load_state(S0_ref, z0_ref, lay, wq_ref.shape[-1]))


def forward_call(q_BTHD, k_BTKD, v_BTKD, wq_HDF, wk_HDF, hs_H4, lay: KernelLayout, interpret: bool):
    """(y (B,Tp,H,Dv) in q's dtype, c (B,H,Tp) f32, den (B,H,Tp) f32, S0 (B,H,NS,P·F,Dv), z0 (B,H,NS,P·F)) for
    padded inputs (Tp = N·C; k, v with K heads dividing H); S0/z0 are the segment start states (residuals for the dq
    kernel)."""
    B, Tp, H, D = q_BTHD.shape
    Dv, F, V, NS = v_BTKD.shape[-1], wq_HDF.shape[-1], lay.block_v, lay.num_segments
    PF, group = lay.num_parts * F, H // k_BTKD.shape[2]
    if Dv % V:
        raise ValueError(f"value dim {Dv=} must be a multiple of block_v={V}")
    S0, z0 = key_states(k_BTKD, v_BTKD, wk_HDF, hs_H4, lay, interpret)
    q_spec = pl.BlockSpec((None, Tp, None, D), lambda b, h, j, s: (b, 0, h, 0))
    k_spec = pl.BlockSpec((None, Tp, None, D), lambda b, h, j, s: (b, 0, kv_head(h, group), 0))
    v_spec = pl.BlockSpec((None, Tp, None, V), lambda b, h, j, s: (b, 0, kv_head(h, group), j))
    y_spec = pl.BlockSpec((None, Tp, None, V), lambda b, h, j, s: (b, 0, h, j))
    w_spec = pl.BlockSpec((None, D, F), lambda b, h, j, s: (h, 0, 0))
    hs_spec = pl.BlockSpec((None, 4), lambda b, h, j, s: (h, 0))
    S_spec = pl.BlockSpec((None, None, None, PF, V), lambda b, h, j, s: (b, h, s, 0, j))
    z_spec = pl.BlockSpec((None, None, None, PF), lambda b, h, j, s: (b, h, s, 0))
    row_spec = pl.BlockSpec((None, None, Tp), lambda b, h, j, s: (b, h, 0))
    row_shape = jax.ShapeDtypeStruct((B, H, Tp), jnp.float32)
    y, c, den = pl.pallas_call(
        functools.partial(_forward_kernel, lay=lay),
        grid=(B, H, Dv // V, NS),
        in_specs=[q_spec, k_spec, v_spec, w_spec, w_spec, hs_spec, S_spec, z_spec],
        out_specs=[y_spec, row_spec, row_spec],
        out_shape=[jax.ShapeDtypeStruct((B, Tp, H, Dv), q_BTHD.dtype), row_shape, row_shape],
        compiler_params=compat.triton_compiler_params(num_warps=lay.num_warps_fwd, num_stages=lay.num_stages),
        interpret=interpret,
        name=f"lolcats_{lay.form}_{lay.window}_fwd",
    )(q_BTHD, k_BTKD, v_BTKD, wq_HDF, wk_HDF, hs_H4, S0, z0)
    return y, c, den, S0, z0
