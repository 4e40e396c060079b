"""Backward Pallas kernels of LoLCATS hybrid / linear attention (Triton lowering).

Notation as in pallas_hybrid_fwd.py. With den_i the forward denominator, dy the output cotangent:
  g_i = dy_i / den_i,  δ_i = dy_i·y_i / den_i,  dP_ij = g_i·v_j − δ_i,
  window: E_ij = e^{s_ij−c_i}, ds_ij = γ E_ij dP_ij + [j = argmax_i] dc_i / ties_i with dc_i = −γ Σ_j E_ij dP_ij,
  linear: df_q,i = λ Σ_{j∈𝓛_i} dP_ij f_k,j,  df_k,j = λ Σ_{i: j∈𝓛_i} dP_ij f_q,i,  dv_j = Σ_i P_ij g_i.
The far linear terms (key chunks ≤ n − lag) go through states, so every kernel is linear in T:
  kernel 1 (`dq`, forward loop over query chunks): S = Σ f_k v_jᵀ, z = Σ f_k  → df_q,i += λ (S g_i − δ_i z);
    it also emits du_q (feature-map pre-activation cotangent), per-row Σ E dP (→ dγ) and Σ f_q·f_k dP (→ dλ), and
    the arg-max part of dk split into a "same chunk" and a "previous chunk" array (each chunk written once);
  kernel 2 (`dkv`, reverse loop over key chunks): G = Σ f_q,i g_iᵀ, Z = Σ δ_i f_q,i over query chunks ≥ m + lag
    → dv_j += λ Gᵀ f_k,j, df_k,j += λ (G v_j − Z); it emits dk, dv, du_k.
Both run one program per (batch, query head, segment of G chunks): the dq kernel starts from the forward's segment
states, the dk/dv kernel from G, Z summed over later segments (pallas_hybrid_state.query_states).
Grouped-query attention (K kv heads, H/K query heads each): the program of query head h reads k, v of kv head
h // (H/K) (index maps, no repeated copies); the dk/dv kernel's dk, dv are then the contributions of query head h
alone, written as float32 partials (B, Tp, H, ·) and summed over each group of H/K query heads in XLA,
dk_j = Σ_{h: h // (H/K) = kv head} dk_j^(h) (as FlashAttention-2 does for GQA with its expanded dk, dv).
Weight/bias gradients (dW = Σ_t xᵀ du, db = Σ du) are formed outside from du (one large XLA matmul).
Reference: jax.vjp of kernels.lolcats.reference.lolcats_attention_reference (tests/kernels/test_pallas.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.lolcats.pallas_hybrid_state import query_states
from kernels.lolcats.pallas_tiles import (
    BIAS_K,
    BIAS_Q,
    GAMMA,
    LAMBDA,
    NEG_INF,
    KernelLayout,
    features,
    features_bwd,
    key_set_tile,
    kv_head,
    load_state,
    mm,
    mm_t,
    mm_tn,
    query_side,
    row_guard,
    rowsum,
    softmax_scale,
)
from lolcats_jax import compat


def _dq_kernel(q_ref, k_ref, v_ref, dy_ref, y_ref, wq_ref, wk_ref, hs_ref, den_ref, S0_ref, z0_ref,
               dq_ref, duq_ref, rw_ref, rl_ref, *dkmax_refs, lay: KernelLayout):
    """Refs: q/k/dq/dkmax (Tp, D), v/dy/y (Tp, Dv), wq/wk (D, F), hs (4,), den/rw/rl (Tp,), S0 (P·F, Dv),
    z0 (P·F,), duq (Tp, F); dkmax_refs = (same-chunk, previous-chunk) arg-max parts of dk (of query head h's
    scores), window forms only; k, v those of kv head h // (H/K).
    One program per (b, h, segment program_id(2)), a forward loop over the segment's query chunks."""
    C, N, dt = lay.chunk, lay.num_chunks, q_ref.dtype
    scale = softmax_scale(q_ref.shape[-1])
    gamma, lam = hs_ref[GAMMA], hs_ref[LAMBDA]
    state_block = "prev" if lay.has_window else "cur"

    def body(n, carry):
        S_PFD, z_PF = carry
        i0 = n * C
        q_CD, g_CD, delta_C = query_side(n, q_ref, dy_ref, y_ref, den_ref, lay)
        uq_CF, aq, fq = features(q_CD, wq_ref[...], hs_ref[BIAS_Q], lay, dt)
        tiles = {}
        for blk in lay.blocks:
            kn = n if blk == "cur" else jnp.maximum(n - 1, 0)
            k_CD, v_CV = k_ref[pl.ds(kn * C, C), :], v_ref[pl.ds(kn * C, C), :]
            win, lin = key_set_tile(i0, i0 if blk == "cur" else i0 - C, lay, blk)
            fk = features(k_CD, wk_ref[...], hs_ref[BIAS_K], lay, dt)[2] \
                if (lin is not None or blk == state_block) else None
            s_CC = mm_t(q_CD, k_CD, dt) * scale if win is not None else None
            dP_CC = mm_t(g_CD, v_CV, dt) - delta_C[:, None]
            tiles[blk] = (k_CD, v_CV, fk, win, lin, s_CC, dP_CC)

        dq_CD = jnp.zeros(q_CD.shape, jnp.float32)
        dfq = [jnp.zeros(f.shape, jnp.float32) for f in fq]
        rw_C = jnp.zeros((C,), jnp.float32)
        rl_C = jnp.zeros((C,), jnp.float32)
        if lay.has_window:
            c_C = jnp.full((C,), NEG_INF, jnp.float32)
            for t in tiles.values():
                c_C = jnp.maximum(c_C, jnp.max(jnp.where(t[3], t[5], NEG_INF), axis=1))
            ties_C = jnp.zeros((C,), jnp.float32)
            E = {}
            for blk, (_, _, _, win, _, s_CC, dP_CC) in tiles.items():
                E[blk] = jnp.where(win, jnp.exp(s_CC - c_C[:, None]), 0.0)
                rw_C += rowsum(E[blk] * dP_CC)
                ties_C += rowsum(jnp.where(win & (s_CC == c_C[:, None]), 1.0, 0.0))
            dmax_C = -gamma * rw_C / ties_C  # dc_i shared by the tied arg-max keys (jnp.max semantics)
            for blk, (k_CD, _, _, win, _, s_CC, dP_CC) in tiles.items():
                at_max_CC = jnp.where(win & (s_CC == c_C[:, None]), dmax_C[:, None], 0.0)
                dq_CD += mm(gamma * E[blk] * dP_CC + at_max_CC, k_CD, dt) * scale
                out = dkmax_refs[0] if blk == "cur" else dkmax_refs[1]
                # chunk −1 → its (all-zero) tile goes to chunk N−1 (integer arithmetic: the Triton lowering mistypes
                # a scalar jnp.where with a Python constant)
                dst = n if blk == "cur" else n - 1 + N * (n == 0).astype(jnp.int32)
                out[pl.ds(dst * C, C), :] = (mm_tn(at_max_CC, q_CD, dt) * scale).astype(out.dtype)
        for blk, (_, _, fk, _, lin, _, dP_CC) in tiles.items():
            if lin is None:
                continue
            dots_CC = sum(mm_t(a, b, dt) for a, b in zip(fq, fk))
            rl_C += rowsum(jnp.where(lin, dots_CC * dP_CC, 0.0))
            dPl_CC = jnp.where(lin, dP_CC, 0.0)
            dfq = [d + lam * mm(dPl_CC, f, dt) for d, f in zip(dfq, fk)]
        for p, (f_CF, S_FD, z_F) in enumerate(zip(fq, S_PFD, z_PF)):
            far_CF = mm_t(g_CD, S_FD, dt) - delta_C[:, None] * z_F[None, :]
            rl_C += rowsum(f_CF * far_CF)
            dfq[p] = dfq[p] + lam * far_CF
        duq_CF = features_bwd(uq_CF, aq, dfq, lay)
        dq_CD += mm_t(duq_CF, wq_ref[...], dt)

        rows = pl.ds(i0, C)
        dq_ref[rows, :] = dq_CD.astype(dq_ref.dtype)
        duq_ref[rows, :] = duq_CF
        rw_ref[rows] = rw_C
        rl_ref[rows] = rl_C

        _, v_CV, fk, *_ = tiles[state_block]
        keep = (n > 0).astype(jnp.float32) if state_block == "prev" else 1.0
        fk = tuple(f * keep for f in fk)
        S_PFD = tuple(S + mm_tn(f, v_CV, dt) for S, f in zip(S_PFD, fk))
        z_PF = tuple(z + jnp.sum(f, axis=0) for z, f in zip(z_PF, fk))
        return S_PFD, z_PF

    n0, n1 = lay.segment(pl.program_id(2))
    jax.lax.fori_loop(n0, n1, body, load_state(S0_ref, z0_ref, lay, wq_ref.shape[-1]))


def _dkv_kernel(q_ref, k_ref, v_ref, dy_ref, y_ref, wq_ref, wk_ref, hs_ref, den_ref, G0_ref, Z0_ref, c_ref,
                *refs, lay: KernelLayout):
    """Refs as in `_dq_kernel`; G0 (P·F, Dv), Z0 (P·F,) = state after the segment; c (Tp,) = forward window row
    max; refs = (*dkmax_refs (window forms), dk (Tp, D), dv (Tp, Dv), duk (Tp, F)): dk, dv are query head h's
    contributions to the gradients of kv head h // (H/K). One program per (b, h, segment program_id(2)), a reverse
    loop over the segment's key chunks."""
    *dkmax_refs, dk_ref, dv_ref, duk_ref = refs
    C, N, dt = lay.chunk, lay.num_chunks, q_ref.dtype
    scale = softmax_scale(q_ref.shape[-1])
    gamma, lam = hs_ref[GAMMA], hs_ref[LAMBDA]
    # query chunks seen directly by key chunk m: m ("cur" relation) and m + 1 ("prev" relation, hybrid only)
    state_block = "prev" if lay.has_window else "cur"

    n0, n1 = lay.segment(pl.program_id(2))

    def body(it, carry):
        G_PFD, Z_PF = carry
        m = n1 - 1 - it
        j0 = m * C
        k_CD, v_CV = k_ref[pl.ds(j0, C), :], v_ref[pl.ds(j0, C), :]
        uk_CF, ak, fk = features(k_CD, wk_ref[...], hs_ref[BIAS_K], lay, dt)
        dk_CD = jnp.zeros(k_CD.shape, jnp.float32)
        dv_CV = jnp.zeros(v_CV.shape, jnp.float32)
        dfk = [jnp.zeros(f.shape, jnp.float32) for f in fk]
        state_feats = None
        for blk in lay.blocks:
            qn = m if blk == "cur" else m + 1  # chunk N is past the end: its rows are padding (g = δ = 0)
            qn_load = jnp.minimum(qn, N - 1)
            q_CD, g_CD, delta_C = query_side(qn_load, q_ref, dy_ref, y_ref, den_ref, lay)
            valid_C = row_guard(qn, lay)
            g_CD = jnp.where(valid_C[:, None], g_CD, 0.0)
            delta_C = jnp.where(valid_C, delta_C, 0.0)
            win, lin = key_set_tile(qn * C, j0, lay, blk)
            fq = features(q_CD, wq_ref[...], hs_ref[BIAS_Q], lay, dt)[2] \
                if (lin is not None or blk == state_block) else None
            dP_CC = mm_t(g_CD, v_CV, dt) - delta_C[:, None]
            p_CC = jnp.zeros((C, C), jnp.float32)
            if win is not None:
                c_C = c_ref[pl.ds(qn_load * C, C)]
                s_CC = mm_t(q_CD, k_CD, dt) * scale
                pw_CC = jnp.where(win & valid_C[:, None], gamma * jnp.exp(s_CC - c_C[:, None]), 0.0)
                dk_CD += mm_tn(pw_CC * dP_CC, q_CD, dt) * scale
                p_CC += pw_CC
            if lin is not None:
                dots_CC = sum(mm_t(a, b, dt) for a, b in zip(fq, fk))
                p_CC += jnp.where(lin, lam * dots_CC, 0.0)
                dPl_CC = jnp.where(lin, dP_CC, 0.0)
                dfk = [d + lam * mm_tn(dPl_CC, f, dt) for d, f in zip(dfk, fq)]
            dv_CV += mm_tn(p_CC, g_CD, dt)
            if blk == state_block:
                state_feats = (fq, g_CD, delta_C)

        for p, (f_CF, G_FD, Z_F) in enumerate(zip(fk, G_PFD, Z_PF)):
            dv_CV += lam * mm(f_CF, G_FD, dt)
            dfk[p] = dfk[p] + lam * (mm_t(v_CV, G_FD, dt) - Z_F[None, :])
        duk_CF = features_bwd(uk_CF, ak, dfk, lay)
        dk_CD += mm_t(duk_CF, wk_ref[...], dt)
        if lay.has_window:
            rows = pl.ds(j0, C)
            dk_CD += sum(r[rows, :].astype(jnp.float32) for r in dkmax_refs)

        rows = pl.ds(j0, C)
        dk_ref[rows, :] = dk_CD.astype(dk_ref.dtype)
        dv_ref[rows, :] = dv_CV.astype(dv_ref.dtype)
        duk_ref[rows, :] = duk_CF

        fq, g_CD, delta_C = state_feats  # padding rows carry g = δ = 0, so they add nothing
        G_PFD = tuple(G + mm_tn(f, g_CD, dt) for G, f in zip(G_PFD, fq))
        Z_PF = tuple(Z + jnp.sum(f * delta_C[:, None], axis=0) for Z, f in zip(Z_PF, fq))
        return G_PFD, Z_PF

    jax.lax.fori_loop(0, n1 - n0, body, load_state(G0_ref, Z0_ref, lay, wq_ref.shape[-1]))


def backward_call(q, k, v, wq, wk, hs_H4, y, c_BHT, den_BHT, S0, z0, dy, lay: KernelLayout, interpret: bool):
    """(dq, dk, dv, duq (B,Tp,H,F) f32, duk (B,Tp,H,F) f32, rw (B,H,Tp), rl (B,H,Tp)) for padded inputs (q, y, dy
    with H heads, k, v with K heads dividing H; dk, dv in k's, v's shape and dtype); S0/z0 are the forward's segment
    start states. duk is per query head (query head h's key feature map over kv head h // (H/K)'s keys)."""
    B, Tp, H, D = q.shape
    K = k.shape[2]
    Dv, F, NS, group = v.shape[-1], wq.shape[-1], lay.num_segments, H // K
    PF = lay.num_parts * F
    grid = (B, H, NS)

    def seq(width):
        return pl.BlockSpec((None, Tp, None, width), lambda b, h, s: (b, 0, h, 0))

    def kv_seq(width):
        return pl.BlockSpec((None, Tp, None, width), lambda b, h, s: (b, 0, kv_head(h, group), 0))

    w_spec = pl.BlockSpec((None, D, F), lambda b, h, s: (h, 0, 0))
    hs_spec = pl.BlockSpec((None, 4), lambda b, h, s: (h, 0))
    row_spec = pl.BlockSpec((None, None, Tp), lambda b, h, s: (b, h, 0))
    S_spec = pl.BlockSpec((None, None, None, PF, Dv), lambda b, h, s: (b, h, s, 0, 0))
    z_spec = pl.BlockSpec((None, None, None, PF), lambda b, h, s: (b, h, s, 0))
    sds = jax.ShapeDtypeStruct
    rows = sds((B, H, Tp), jnp.float32)
    params = compat.triton_compiler_params(num_warps=lay.num_warps_bwd, num_stages=lay.num_stages)
    in_specs = [seq(D), kv_seq(D), kv_seq(Dv), seq(Dv), seq(Dv), w_spec, w_spec, hs_spec, row_spec, S_spec, z_spec]
    # arg-max part of dk (window forms only), in q's dtype (float32 for float32 inputs)
    dkmax = [sds(q.shape, q.dtype)] * 2 if lay.has_window else []
    dq, duq, rw, rl, *dkmax = pl.pallas_call(
        functools.partial(_dq_kernel, lay=lay),
        grid=grid,
        in_specs=in_specs,
        out_specs=[seq(D), seq(F), row_spec, row_spec] + [seq(D)] * len(dkmax),
        out_shape=[sds(q.shape, q.dtype), sds((B, Tp, H, F), jnp.float32), rows, rows] + dkmax,
        compiler_params=params,
        interpret=interpret,
        name=f"lolcats_{lay.form}_{lay.window}_bwd_dq",
    )(q, k, v, dy, y, wq, wk, hs_H4, den_BHT, S0, z0)
    G0, Z0 = query_states(q, dy, y, den_BHT, wq, hs_H4, lay, interpret)
    # per-query-head dk, dv: in k's / v's dtype without groups, else float32 partials summed below
    dk_dtype, dv_dtype = (k.dtype, v.dtype) if group == 1 else (jnp.float32, jnp.float32)
    dk, dv, duk = pl.pallas_call(
        functools.partial(_dkv_kernel, lay=lay),
        grid=grid,
        in_specs=in_specs + [row_spec] + [seq(D)] * len(dkmax),
        out_specs=[seq(D), seq(Dv), seq(F)],
        out_shape=[sds((B, Tp, H, D), dk_dtype), sds((B, Tp, H, Dv), dv_dtype), sds((B, Tp, H, F), jnp.float32)],
        compiler_params=params,
        interpret=interpret,
        name=f"lolcats_{lay.form}_{lay.window}_bwd_dkv",
    )(q, k, v, dy, y, wq, wk, hs_H4, den_BHT, G0, Z0, c_BHT, *dkmax)
    return dq, _sum_groups(dk, K).astype(k.dtype), _sum_groups(dv, K).astype(v.dtype), duq, duk, rw, rl


def _sum_groups(x_BTHX, num_kv_heads: int):
    """(B, T, H, X) → (B, T, K, X): Σ over the H/K consecutive query heads of each kv head (identity for K = H)."""
    B, T, H, X = x_BTHX.shape
    if num_kv_heads == H:
        return x_BTHX
    return x_BTHX.reshape(B, T, num_kv_heads, H // num_kv_heads, X).sum(3)
