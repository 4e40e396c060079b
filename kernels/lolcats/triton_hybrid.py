"""LoLCATS attention forward as a hand-written Triton kernel called through `jax_triton.triton_call` (GPU only).

Notation as in pallas_hybrid.py (B, T, Tp, H, K, D, Dv, F, C, G, NS): q has H heads, k and v K heads dividing H
(grouped-query attention; the kernel reads kv head h // (H/K) for query head h, k and v are never repeated).
Optional extra: needs an NVIDIA GPU, `triton` and the project's `gpu` extra (jax-triton); both are imported lazily,
so importing this module is safe anywhere and calling it without them raises a RuntimeError saying so. Scope: form
"hybrid" (sw | tk) and "linear" with the softmax_dim feature map (the Hedgehog configuration); other maps raise
NotImplementedError (use Backend.PALLAS).

The forward is triton_hybrid_kernel.lolcats_fwd_kernel, started from the segment states of the Pallas key-state
kernel; it returns the same residuals as the Pallas forward, so the backward is the Pallas backward (custom_vjp).
Reference: kernels.lolcats.reference.lolcats_attention_reference.
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp

from kernels.lolcats.pallas_hybrid import PallasConfig, check_shapes, lolcats_padded_bwd, make_layout, prepare_inputs
from kernels.lolcats.pallas_hybrid_state import key_states
from kernels.lolcats.pallas_tiles import KernelLayout, softmax_scale
from kernels.lolcats.spec import FeatureMapParams, LolcatsSpec

GPU_EXTRA_HINT = ("the Triton backend needs an NVIDIA GPU with jax[cuda], `triton` and jax-triton "
                  "(pip install 'lolcats-jax[gpu]', or the jax-triton 0.3.1 wheel next to triton 3.6)")


def _jax_triton():
    """The jax_triton module, or a RuntimeError naming what is missing."""
    if jax.default_backend() != "gpu":
        raise RuntimeError(f"{GPU_EXTRA_HINT}; this process runs on {jax.default_backend()!r}")
    try:
        return importlib.import_module("jax_triton")
    except ImportError as err:
        raise RuntimeError(f"{GPU_EXTRA_HINT}; import failed: {err}") from err


def _forward(q, k, v, wq, wk, hs_H4, lay: KernelLayout):
    """(y, c, den, S0, z0) like pallas_hybrid_fwd.forward_call (k, v with K heads), with the main loop in the
    Triton kernel."""
    jt = _jax_triton()
    from kernels.lolcats import triton_hybrid_kernel as tk  # imports triton

    B, Tp, H, D = q.shape
    Dv, F, V, NS = v.shape[-1], wq.shape[-1], lay.block_v, lay.num_segments
    S0, z0 = key_states(k, v, wk, hs_H4, lay, interpret=False)
    rows = jax.ShapeDtypeStruct((B, H, Tp), jnp.float32)
    y, c, den = jt.triton_call(
        q, k, v, wq, wk, hs_H4, S0, z0,
        kernel=tk.lolcats_fwd_kernel,
        out_shape=[jax.ShapeDtypeStruct((B, Tp, H, Dv), q.dtype), rows, rows],
        grid=(B * H, Dv // V, NS),
        num_warps=lay.num_warps_fwd,
        num_stages=lay.num_stages,
        T=lay.seq_len, TP=Tp, H=H, KH=k.shape[2], D=D, DV=Dv, F=F, P=lay.num_parts, C=lay.chunk, BV=V,
        N=lay.num_chunks, G=lay.seg_chunks, NS=NS, W=lay.window_size, HAS_WINDOW=lay.has_window, TK=lay.window == "tk",
        LIN_CUR=lay.linear_in("cur"), LIN_PREV=lay.has_window and lay.linear_in("prev"), FM_EPS=lay.fm_eps,
        DEN_EPS=lay.den_eps, SCALE=softmax_scale(D), IEEE=q.dtype == jnp.float32,
    )
    return y, c, den, S0, z0


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _triton_padded(q, k, v, wq, wk, hs_H4, lay: KernelLayout):
    return _forward(q, k, v, wq, wk, hs_H4, lay)[0]


def _triton_padded_fwd(q, k, v, wq, wk, hs_H4, lay):
    y, *stats = _forward(q, k, v, wq, wk, hs_H4, lay)
    return y, (q, k, v, wq, wk, hs_H4, y, *stats)


def _triton_padded_bwd(lay, res, dy):
    return lolcats_padded_bwd(lay, False, res, dy)


_triton_padded.defvjp(_triton_padded_fwd, _triton_padded_bwd)


def triton_lolcats_attention(q, k, v, fmap: FeatureMapParams, theta_H, spec: LolcatsSpec,
                             config: PallasConfig = PallasConfig()):
    """y (B, T, H, Dv) in q's dtype for q (B, T, H, D), k (B, T, K, D), v (B, T, K, Dv); differentiable (Pallas
    backward). GPU + `gpu` extra only."""
    _jax_triton()
    check_shapes(q, k, v)
    if spec.form not in ("hybrid", "linear") or spec.feature_map != "softmax_dim":
        raise NotImplementedError(f"the Triton kernel covers form hybrid/linear with feature_map 'softmax_dim', "
                                  f"not {spec.form=} {spec.feature_map=}; use Backend.PALLAS")
    lay = make_layout(spec, q.shape[1], q.shape[-1], v.shape[-1], fmap.wq.shape[-1], config, interpret=False,
                      batch_heads=q.shape[0] * q.shape[2])
    qp, kp, vp, hs_H4 = prepare_inputs(q, k, v, fmap, theta_H, spec, lay)
    return _triton_padded(qp, kp, vp, fmap.wq, fmap.wk, hs_H4, lay)[:, : q.shape[1]]


def lolcats_attention_triton(q, k, v, fmap, theta_H, spec):
    """Backend function registered as Backend.TRITON (platform "gpu")."""
    return triton_lolcats_attention(q, k, v, fmap, theta_H, spec)
