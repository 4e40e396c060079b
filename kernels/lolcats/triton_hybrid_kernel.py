"""Hand-written Triton kernel (triton.language) for the LoLCATS hybrid / linear forward with the Hedgehog
softmax_dim feature map fused. Imported only by triton_hybrid.py, lazily, on a machine that has `triton`.

Notation as in pallas_tiles.py: B batch, TP padded tokens, H query heads, KH key/value heads (KH divides H: query head
h reads kv head h // (H/KH), grouped-query attention without repeated k, v), D head dim, DV value dim, BV value tile,
F feature dim, P parts (2 = fullspace [softmax(u); softmax(−u)]), C chunk, N chunks, G chunks per segment,
NS segments.
Same math, layout and residuals as the Pallas forward (pallas_hybrid_fwd.py): one program per
(batch·head, value tile, segment); the segment's start state (S0 (P·F, DV), z0 (P·F)) comes from the Pallas key-state
kernel; per chunk n the window tiles (key chunks n, n − 1) are exact, older keys go through the float32 state.
Inputs q (B, TP, H, D), k (B, TP, KH, D), v (B, TP, KH, DV), wq/wk (H, D, F), hs (H, 4); outputs y (B, TP, H, DV),
c and den (B, H, TP) float32. Reference: kernels.lolcats.reference.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _mm(a, b, IEEE: tl.constexpr):
    """a @ b, float32 accumulation; IEEE float32 products for float32 inputs (no TF32)."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _features(x, w, bias, NEG: tl.constexpr, EPS: tl.constexpr, IEEE: tl.constexpr):
    """max(softmax(±(x·w + bias)), EPS) over the feature axis: (C, D) × (D, F) → (C, F) float32."""
    u = _mm(x, w, IEEE) + bias
    if NEG:
        u = -u
    e = tl.exp(u - tl.max(u, axis=1)[:, None])
    return tl.maximum(e / tl.sum(e, axis=1)[:, None], EPS)


@triton.jit
def _key_sets(i0, j0, C: tl.constexpr, W: tl.constexpr, HAS_WINDOW: tl.constexpr, TK: tl.constexpr):
    """(window, linear) (C, C) masks of queries i0 + r, keys j0 + c (negative keys masked)."""
    i = i0 + tl.arange(0, C)[:, None]
    j = j0 + tl.arange(0, C)[None, :]
    causal = (j <= i) & (j >= 0)
    if HAS_WINDOW:
        if TK:
            bi = i // W
            bj = tl.maximum(j, 0) // W
            win = causal & (bj >= bi - 1)
            lin = causal & (bj <= bi - 2)
        else:
            win = causal & (j > i - W)
            lin = causal & (j <= i - W)
    else:
        win = causal & (j < 0)
        lin = causal
    return win, lin


@triton.jit
def lolcats_fwd_kernel(
    q_ptr, k_ptr, v_ptr, wq_ptr, wk_ptr, hs_ptr, s0_ptr, z0_ptr,  # inputs
    y_ptr, c_ptr, den_ptr,  # outputs
    T: tl.constexpr, TP: tl.constexpr, H: tl.constexpr, KH: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    F: tl.constexpr, P: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, N: tl.constexpr, G: tl.constexpr,
    NS: tl.constexpr, W: tl.constexpr, HAS_WINDOW: tl.constexpr, TK: tl.constexpr, LIN_CUR: tl.constexpr,
    LIN_PREV: tl.constexpr, FM_EPS: tl.constexpr, DEN_EPS: tl.constexpr, SCALE: tl.constexpr, IEEE: tl.constexpr,
):
    bh = tl.program_id(0)
    jv = tl.program_id(1)
    s = tl.program_id(2)
    b = bh // H
    h = bh % H
    DT = q_ptr.dtype.element_ty
    r = tl.arange(0, C)
    dd = tl.arange(0, D)
    ff = tl.arange(0, F)
    vv = jv * BV + tl.arange(0, BV)
    hk = h // (H // KH)  # the kv head of query head h
    q_base = (b * TP * H + h) * D  # element (t, d) at q_base + t·H·D + d
    k_base = (b * TP * KH + hk) * D  # element (t, d) at k_base + t·KH·D + d
    v_base = (b * TP * KH + hk) * DV  # element (t, e) at v_base + t·KH·DV + e
    y_base = (b * TP * H + h) * DV
    w_offs = h * D * F + dd[:, None] * F + ff[None, :]
    gamma = tl.load(hs_ptr + h * 4 + 0)
    lam = tl.load(hs_ptr + h * 4 + 1)
    bq = tl.load(hs_ptr + h * 4 + 2)
    bk = tl.load(hs_ptr + h * 4 + 3)

    st_base = (bh * NS + s) * P * F
    Sa = tl.load(s0_ptr + (st_base + ff[:, None]) * DV + vv[None, :])  # (F, BV) positive half
    za = tl.load(z0_ptr + st_base + ff)
    Sb = tl.zeros((F, BV), tl.float32)
    zb = tl.zeros((F,), tl.float32)
    if P == 2:
        Sb = tl.load(s0_ptr + (st_base + F + ff[:, None]) * DV + vv[None, :])
        zb = tl.load(z0_ptr + st_base + F + ff)

    n0 = s * G
    n1 = tl.minimum(n0 + G, N)
    for n in range(n0, n1):
        i0 = n * C
        wq = tl.load(wq_ptr + w_offs).to(DT)
        wk = tl.load(wk_ptr + w_offs).to(DT)
        q = tl.load(q_ptr + q_base + (i0 + r)[:, None] * (H * D) + dd[None, :])
        fqa = _features(q, wq, bq, False, FM_EPS, IEEE)
        fqb = fqa
        if P == 2:
            fqb = _features(q, wq, bq, True, FM_EPS, IEEE)
        k = tl.load(k_ptr + k_base + (i0 + r)[:, None] * (KH * D) + dd[None, :])
        v = tl.load(v_ptr + v_base + (i0 + r)[:, None] * (KH * DV) + vv[None, :])
        win, lin = _key_sets(i0, i0, C, W, HAS_WINDOW, TK)
        p_cur = tl.zeros((C, C), tl.float32)
        c_row = tl.zeros((C,), tl.float32)
        if LIN_CUR:  # always true for the linear form, whose state update uses these features
            fka = _features(k, wk, bk, False, FM_EPS, IEEE)
            dots = _mm(fqa.to(DT), tl.trans(fka.to(DT)), IEEE)
            fkb = fka
            if P == 2:
                fkb = _features(k, wk, bk, True, FM_EPS, IEEE)
                dots += _mm(fqb.to(DT), tl.trans(fkb.to(DT)), IEEE)
            p_cur += tl.where(lin, lam * dots, 0.0)
        if HAS_WINDOW:
            kn = tl.maximum(n - 1, 0)  # chunk −1 is loaded as chunk 0 and fully masked
            kp = tl.load(k_ptr + k_base + (kn * C + r)[:, None] * (KH * D) + dd[None, :])
            vp = tl.load(v_ptr + v_base + (kn * C + r)[:, None] * (KH * DV) + vv[None, :])
            winp, linp = _key_sets(i0, i0 - C, C, W, HAS_WINDOW, TK)
            s_cur = _mm(q, tl.trans(k), IEEE) * SCALE
            s_prev = _mm(q, tl.trans(kp), IEEE) * SCALE
            c_row = tl.maximum(tl.max(tl.where(win, s_cur, float("-inf")), axis=1),
                               tl.max(tl.where(winp, s_prev, float("-inf")), axis=1))
            p_cur += tl.where(win, gamma * tl.exp(s_cur - c_row[:, None]), 0.0)
            p_prev = tl.where(winp, gamma * tl.exp(s_prev - c_row[:, None]), 0.0)
            # the previous chunk's key features: linear pairs (sw, or C ≥ 2W) and the state update below
            keep = tl.where(n > 0, 1.0, 0.0)
            fkpa = _features(kp, wk, bk, False, FM_EPS, IEEE)
            fkpb = fkpa
            if P == 2:
                fkpb = _features(kp, wk, bk, True, FM_EPS, IEEE)
            if LIN_PREV:
                dots_p = _mm(fqa.to(DT), tl.trans(fkpa.to(DT)), IEEE)
                if P == 2:
                    dots_p += _mm(fqb.to(DT), tl.trans(fkpb.to(DT)), IEEE)
                p_prev += tl.where(linp, lam * dots_p, 0.0)
            num = _mm(p_cur.to(DT), v, IEEE) + _mm(p_prev.to(DT), vp, IEEE)
            den = tl.sum(p_cur, axis=1) + tl.sum(p_prev, axis=1)
        else:
            num = _mm(p_cur.to(DT), v, IEEE)
            den = tl.sum(p_cur, axis=1)
        num += lam * _mm(fqa.to(DT), Sa.to(DT), IEEE)
        den += lam * tl.sum(fqa * za[None, :], axis=1)
        if P == 2:
            num += lam * _mm(fqb.to(DT), Sb.to(DT), IEEE)
            den += lam * tl.sum(fqb * zb[None, :], axis=1)
        den = tl.where(i0 + r < T, den + DEN_EPS, 1.0)  # padding rows stay finite
        tl.store(y_ptr + y_base + (i0 + r)[:, None] * (H * DV) + vv[None, :],
                 (num / den[:, None]).to(y_ptr.dtype.element_ty))
        if jv == 0:
            tl.store(c_ptr + bh * TP + i0 + r, c_row)
            tl.store(den_ptr + bh * TP + i0 + r, den)
        # state update: the chunk that becomes older than every window of chunk n + 1
        if HAS_WINDOW:
            Sa += _mm(tl.trans((fkpa * keep).to(DT)), vp, IEEE)
            za += tl.sum(fkpa * keep, axis=0)
            if P == 2:
                Sb += _mm(tl.trans((fkpb * keep).to(DT)), vp, IEEE)
                zb += tl.sum(fkpb * keep, axis=0)
        else:
            Sa += _mm(tl.trans(fka.to(DT)), v, IEEE)
            za += tl.sum(fka, axis=0)
            if P == 2:
                Sb += _mm(tl.trans(fkb.to(DT)), v, IEEE)
                zb += tl.sum(fkb, axis=0)
