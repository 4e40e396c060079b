"""Pallas kernels (kernels/lolcats/pallas_hybrid*.py): interpret-mode runs against the quadratic reference
(outputs and every gradient with a random cotangent), also with grouped-query inputs (k, v with K < H heads; the
reference repeats them, the kernels do not), mask tiles against spec.key_sets, config errors, and the CUDA lowering
check (Triton custom calls, forward and backward, realistic sizes, k / v operands with K heads, no GPU needed).

Interpret mode costs ~10-20 s per case on 2 idle CPU cores (compiling five kernels, forward and backward), so shapes
stay small (B ≤ 2, H ≤ 8, T ≤ 100).
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lolcats_testutil import cast_tree, grad_errors, make_inputs, rel_rms

from kernels.lolcats import Backend, FeatureMapParams, LolcatsSpec, lolcats_attention, lolcats_attention_reference
from kernels.lolcats.pallas_hybrid import PallasConfig, make_layout, pallas_lolcats_attention, unsupported_reason
from kernels.lolcats.pallas_tiles import KernelLayout, key_set_tile
from kernels.lolcats.spec import key_sets
from lolcats_jax import compat

# (output, gradient) relative-RMS tolerances; θ's gradient sums window and linear terms that cancel row by row
# (Σ_j P_ij dP_ij = 0), so it is measured separately with a looser bound.
TOL = {jnp.float32: (1e-5, 1e-5, 1e-4), jnp.bfloat16: (1e-2, 1e-2, 3e-2)}

CASES = [  # (spec kwargs, chunk C or None, chunks per segment G, B, T, D, F)
    (dict(window="tk", window_size=16), None, 16, 1, 100, 16, 8),  # C = 64 = 4W: linear pairs inside the span
    (dict(window="tk", window_size=16), 16, 2, 2, 70, 16, 8),  # C = W, batch > 1, 3 segments
    (dict(window="sw", window_size=16), 16, 1, 1, 100, 32, 16),  # C = W, one chunk per segment
    (dict(window="sw", window_size=8), 32, 2, 1, 77, 16, 8),  # C = 4W
    (dict(window="tk", window_size=32), None, 2, 1, 20, 32, 8),  # T < W
    (dict(window="sw", window_size=16), None, 2, 1, 1, 16, 8),  # T = 1
    (dict(form="linear"), 16, 3, 1, 100, 16, 8),
    (dict(window="sw", window_size=16, feature_map="exp_dim", affine=True), 16, 2, 1, 50, 16, 8),
    (dict(window="tk", window_size=16, feature_map="relu"), 16, 2, 1, 50, 16, 8),
    (dict(window="sw", window_size=16, feature_map="pos_elu"), 32, 1, 1, 50, 16, 8),
    (dict(window="tk", window_size=16, feature_map="softmax_dim", fullspace=False), 16, 2, 1, 50, 16, 8),
]


# grouped-query cases (spec kwargs, chunk C or None, chunks per segment, H query heads, K kv heads, T); B=1, D=16, F=8
GQA_CASES = [
    (dict(window="tk", window_size=16), 16, 2, 8, 2, 70),  # H/K = 4, C = W, 3 segments
    (dict(window="sw", window_size=8, feature_map="relu"), 32, 1, 6, 2, 70),  # H/K = 3, C = 4W, per-head biases
    (dict(form="linear"), 16, 3, 8, 1, 50),  # H/K = 8: one kv head for all query heads
    (dict(window="tk", window_size=16), None, 16, 2, 2, 70),  # H/K = 1, C = 4W
]


def _ids(case):
    kw, chunk, seg, B, T, D, F = case
    return "-".join(str(v) for v in kw.values()) + f"-C{chunk}-G{seg}-B{B}T{T}D{D}F{F}"


def _gqa_ids(case):
    kw, chunk, seg, H, K, T = case
    return "-".join(str(v) for v in kw.values()) + f"-C{chunk}-G{seg}-H{H}K{K}T{T}"


def _output_and_grads(fn, inputs, spec, ct_dtype):
    """(y, grads wrt (q, k, v, fmap, θ)) with a fixed random cotangent rounded through `ct_dtype`."""

    @jax.jit
    def run(inputs):
        y, vjp = jax.vjp(lambda *a: fn(*a, spec), *inputs)
        ct = jax.random.normal(jax.random.PRNGKey(0), y.shape, jnp.float32).astype(ct_dtype).astype(y.dtype)
        return y, vjp(ct)

    return run(inputs)


def _check(case, dtype, seed=0, heads=(2, 2)):
    """Kernel in `dtype` (interpret mode) against the reference evaluated in float64 on the same inputs; heads =
    (H query heads, K kv heads): k, v have K heads, their gradients too (the reference repeats k, v to H heads)."""
    kw, chunk, seg, B, T, D, F = case
    H, K = heads
    spec = LolcatsSpec(**kw)
    bias = spec.feature_map in ("relu", "pos_elu")
    inputs = make_inputs(seed, B, T, H, D, F, dtype, bias=bias, K=K)
    config = PallasConfig(chunk=chunk, seg_chunks=seg, interpret=True)
    kernel = functools.partial(pallas_lolcats_attention, config=config)
    y, grads = _output_and_grads(kernel, inputs, spec, dtype)
    with compat.enable_x64():
        y_ref, grads_ref = _output_and_grads(lolcats_attention_reference, cast_tree(inputs, jnp.float64), spec, dtype)
    assert y.shape == (B, T, H, D) and y.dtype == dtype
    assert [g.shape for g in grads[:3]] == [x.shape for x in inputs[:3]]  # no silent broadcast against K heads
    assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in jax.tree.leaves(grads))
    errs = grad_errors(grads, grads_ref)
    tol_y, tol_g, tol_theta = TOL[dtype]
    assert rel_rms(y, y_ref) < tol_y, rel_rms(y, y_ref)
    theta_err = errs.pop("theta") if spec.form == "hybrid" else 0.0
    assert max(errs.values()) < tol_g, errs
    if theta_err >= tol_theta:  # dθ ≈ 0 (e.g. T ≤ W: γ cancels): allow the rounding noise of the reference itself
        _, grads_same_dtype = _output_and_grads(lolcats_attention_reference, inputs, spec, dtype)
        noise = grad_errors(grads_same_dtype, grads_ref)["theta"]
        assert theta_err < 10 * noise, (theta_err, noise)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_pallas_interpret_matches_reference_float32(case):
    _check(case, jnp.float32)


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[6]], ids=_ids)
def test_pallas_interpret_matches_reference_bfloat16(case):
    _check(case, jnp.bfloat16)


@pytest.mark.parametrize("case", GQA_CASES, ids=_gqa_ids)
def test_pallas_gqa_matches_reference_float32(case):
    """Grouped-query attention: query head h reads kv head h // (H/K); dk, dv sum the group's query heads."""
    kw, chunk, seg, H, K, T = case
    _check((kw, chunk, seg, 1, T, 16, 8), jnp.float32, heads=(H, K))


def test_pallas_gqa_matches_reference_bfloat16():
    kw, chunk, seg, H, K, T = GQA_CASES[0]
    _check((kw, chunk, seg, 1, T, 16, 8), jnp.bfloat16, heads=(H, K))


def test_value_dim_differs_from_head_dim():
    """Dv = 32 ≠ D = 16, two value tiles in the forward, two segments."""
    spec = LolcatsSpec(window="sw", window_size=16)
    q, k, _, fmap, theta = make_inputs(6, 1, 70, 2, 16, 8)
    v = jax.random.normal(jax.random.PRNGKey(7), (1, 70, 2, 32))
    kernel = functools.partial(pallas_lolcats_attention,
                               config=PallasConfig(chunk=16, seg_chunks=2, block_v=16, interpret=True))
    y, grads = _output_and_grads(kernel, (q, k, v, fmap, theta), spec, jnp.float32)
    y_ref, grads_ref = _output_and_grads(lolcats_attention_reference, (q, k, v, fmap, theta), spec, jnp.float32)
    assert y.shape == (1, 70, 2, 32) and rel_rms(y, y_ref) < 1e-5
    errs = grad_errors(grads, grads_ref)
    assert errs.pop("theta") < 1e-4 and max(errs.values()) < 1e-5, errs


def test_triton_backend_refuses_clearly_without_gpu():
    from kernels.lolcats.triton_hybrid import triton_lolcats_attention

    q, k, v, fmap, theta = make_inputs(5, 1, 8, 2, 16, 8)
    with pytest.raises(RuntimeError, match="needs an NVIDIA GPU.*jax-triton"):
        triton_lolcats_attention(q, k, v, fmap, theta, LolcatsSpec())


def test_pallas_backend_registered_and_runs_interpreted_on_cpu():
    """Backend.PALLAS resolves to these kernels (interpret mode off-GPU) and agrees with the reference."""
    spec = LolcatsSpec(window="tk", window_size=16)
    q, k, v, fmap, theta = make_inputs(3, 1, 40, 2, 16, 8)
    y = lolcats_attention(q, k, v, fmap, theta, spec, backend=Backend.PALLAS)
    assert rel_rms(y, lolcats_attention_reference(q, k, v, fmap, theta, spec)) < 1e-5


def test_softmax_form_is_delegated():
    spec = LolcatsSpec(form="softmax")
    q, k, v, fmap, theta = make_inputs(4, 1, 33, 2, 16, 8)
    y = pallas_lolcats_attention(q, k, v, fmap, theta, spec)
    assert rel_rms(y, lolcats_attention_reference(q, k, v, fmap, theta, spec)) < 1e-5


# --------------------------------------------------------------------------------------------- masks


@settings(max_examples=30, deadline=None)
@given(window=st.sampled_from(["sw", "tk", "linear"]), log_w=st.integers(0, 4), ratio=st.integers(1, 4),
       n=st.integers(0, 5))
def test_mask_tiles_match_key_sets(window, log_w, ratio, n):
    """Tiles of (query chunk n, key chunk n or n−1) equal spec.key_sets; statically skipped linear tiles are
    empty; and every key of chunks ≤ n − lag is linear (what the state assumes)."""
    W = 2**log_w
    C = W * (2 ** (ratio - 1)) if window == "tk" else W + ratio * 3
    form = "linear" if window == "linear" else "hybrid"
    spec = LolcatsSpec(form=form, window="sw" if window == "linear" else window, window_size=W)
    lay = KernelLayout(form=form, window=spec.window, window_size=W, chunk=C, seq_len=10**6, num_chunks=10**4,
                       feature_map="softmax_dim", fullspace=True, fm_eps=0.0, den_eps=0.0, block_v=C)
    i = n * C + np.arange(C)[:, None]
    for blk, j0 in zip(lay.blocks, (n * C, (n - 1) * C)):
        j = j0 + np.arange(C)[None, :]
        want_win, want_lin = key_sets(i, j, 10**6, spec)
        want_win, want_lin = want_win & (j >= 0), want_lin & (j >= 0)
        win, lin = jax.jit(key_set_tile, static_argnums=(2, 3))(n * C, j0, lay, blk)
        np.testing.assert_array_equal(np.zeros_like(want_win) if win is None else np.asarray(win), want_win)
        np.testing.assert_array_equal(np.zeros_like(want_lin) if lin is None else np.asarray(lin), want_lin)
    old = np.arange(max(0, (n - lay.lag + 1) * C))[None, :]
    if old.size:
        win_old, lin_old = key_sets(i, old, 10**6, spec)
        assert not win_old.any() and lin_old.all()


# --------------------------------------------------------------------------------------------- configuration


def test_default_segments_fill_the_sms():
    """seg_chunks=None sizes segments from the SM count: B·H·segments backward programs cover 132 SMs at B = 1,
    H = 32 (T = 1024: 16 chunks → 6 segments of 3; T = 8192: 128 chunks → 6 of 25), and a batch whose B·H alone
    covers them gets one segment (no state pass at all)."""
    from kernels.lolcats.pallas_hybrid import default_seg_chunks

    for N, BH, want_seg in ((16, 32, 3), (128, 32, 25), (16, 256, 16), (1, 32, 1), (16, 1, 1)):
        seg = default_seg_chunks(N, BH, 132)
        segments = -(-N // seg)
        assert seg == want_seg and (BH * segments >= 132 or segments == N or BH >= 132), (N, BH, seg)
    lay = make_layout(LolcatsSpec(window="tk", window_size=64), 1024, 128, 128, 64, PallasConfig(), False,
                      batch_heads=32)
    assert lay.num_segments == 6 and lay.seg_chunks == 3
    assert make_layout(LolcatsSpec(), 1024, 128, 128, 64, PallasConfig(seg_chunks=4), False).seg_chunks == 4


def test_layout_errors_name_values():
    with pytest.raises(ValueError, match="W=48"):
        make_layout(LolcatsSpec(window="tk", window_size=48), 100, 128, 128, 64, PallasConfig(), interpret=False)
    with pytest.raises(ValueError, match="C=24"):
        make_layout(LolcatsSpec(window="sw", window_size=8), 100, 128, 128, 64, PallasConfig(chunk=24), False)
    with pytest.raises(ValueError, match="head dim D=96"):
        make_layout(LolcatsSpec(), 100, 96, 128, 64, PallasConfig(), interpret=False)
    with pytest.raises(ValueError, match="compat"):
        make_layout(LolcatsSpec(compat=True), 100, 128, 128, 64, PallasConfig(), interpret=False)
    assert unsupported_reason(LolcatsSpec(), (1, 100, 4, 128), (1, 100, 4, 128), 64) is None
    assert "F=8" in unsupported_reason(LolcatsSpec(), (1, 100, 4, 64), (1, 100, 4, 64), 8)
    lay = make_layout(LolcatsSpec(window="sw", window_size=48), 100, 128, 128, 64, PallasConfig(), False)
    assert (lay.chunk, lay.num_chunks, lay.block_v, lay.num_segments) == (64, 2, 64, 2)  # B·H = 1: a segment each


def test_grouped_query_shapes_checked():
    """k, v may have K heads dividing H (reported by unsupported_reason, raised by the kernels naming the shapes)."""
    assert unsupported_reason(LolcatsSpec(), (1, 100, 32, 128), (1, 100, 8, 128), 64) is None
    assert "K=3" in unsupported_reason(LolcatsSpec(), (1, 100, 32, 128), (1, 100, 3, 128), 64)
    q, k, v, fmap, theta = make_inputs(0, 1, 20, 4, 16, 8, K=2)
    with pytest.raises(ValueError, match=r"\(1, 20, 3, 16\).*K=3"):
        pallas_lolcats_attention(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2), fmap, theta,
                                 LolcatsSpec())
    with pytest.raises(ValueError, match=r"k.shape=\(1, 20, 2, 16\), v.shape=\(1, 20, 1, 16\)"):
        pallas_lolcats_attention(q, k, v[:, :, :1], fmap, theta, LolcatsSpec())


# --------------------------------------------------------------------------------------------- CUDA lowering

TRITON_CALL = "__gpu$xla.gpu.triton"


def _triton_call_operands(text: str) -> dict[str, list[str]]:
    """{kernel name: operand tensor types} of the Triton custom calls in StableHLO text."""
    calls = {}
    for line in text.splitlines():
        if TRITON_CALL in line:
            name = re.search(r'name = "([^"]+)"', line).group(1)
            calls[name] = re.findall(r"tensor<[^>]*>", line[line.rindex(": (") : line.rindex(") -> ")])
    return calls


@pytest.mark.parametrize("K", [32, 8], ids=lambda K: f"K{K}")
@pytest.mark.parametrize("kw", [dict(window="tk"), dict(window="sw"), dict(form="linear")], ids=str)
def test_kernels_lower_for_cuda_at_llama_sizes(kw, K):
    """Forward and backward lower to Triton custom calls for B=1, H=32, T=8192, D=128, F=64, W=64 (no GPU), with
    K = H or K = 8 kv heads (Llama-3.1-8B): every kernel that reads k, v gets them with K heads (never repeated)."""
    B, T, H, D, F = 1, 8192, 32, 128, 64
    spec = LolcatsSpec(window_size=64, **kw)
    x = jax.ShapeDtypeStruct((B, T, H, D), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((B, T, K, D), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((H, D, F), jnp.float32)
    fmap = FeatureMapParams(w, w, None, None)
    theta = jax.ShapeDtypeStruct((H,), jnp.float32)
    cfg = PallasConfig(interpret=False)

    def forward(q, k, v, fmap, theta):
        return pallas_lolcats_attention(q, k, v, fmap, theta, spec, cfg)

    def loss(q, k, v, fmap, theta):
        return jnp.sum(forward(q, k, v, fmap, theta).astype(jnp.float32) ** 2)

    fwd_text = compat.lower_for_cuda(forward, x, kv, kv, fmap, theta)
    assert fwd_text.count(TRITON_CALL) == 2
    bwd_text = compat.lower_for_cuda(jax.grad(loss, argnums=(0, 1, 2, 3, 4)), x, kv, kv, fmap, theta)
    # forward: segment key states + main kernel; backward adds the dq, segment query states and dk/dv kernels
    assert bwd_text.count(TRITON_CALL) == 5
    calls = _triton_call_operands(bwd_text)
    kv_type, window = f"tensor<{B}x{T}x{K}x{D}xbf16>", spec.window
    kv_at = {f"lolcats_{spec.form}_key_states": 0, f"lolcats_{spec.form}_{window}_fwd": 1,
             f"lolcats_{spec.form}_{window}_bwd_dq": 1, f"lolcats_{spec.form}_{window}_bwd_dkv": 1}
    assert set(kv_at) < set(calls), calls.keys()
    for name, at in kv_at.items():
        assert calls[name][at : at + 2] == [kv_type, kv_type], (name, calls[name])
    assert calls[f"lolcats_{spec.form}_{window}_fwd"][0] == f"tensor<{B}x{T}x{H}x{D}xbf16>"  # q: H heads


def test_auto_falls_back_to_chunked_for_shapes_pallas_cannot_take(monkeypatch, caplog):
    """On a GPU, Backend.AUTO picks PALLAS only for shapes its Triton lowering takes (`unsupported_reason`), else
    CHUNKED with the reason logged — instead of an error. Simulated on CPU by reporting the platform as "gpu"."""
    import logging

    from kernels.lolcats import api

    monkeypatch.setattr(api, "_platform", lambda: "gpu")
    spec = LolcatsSpec(window_size=16, chunk_size=16)
    assert unsupported_reason(spec, (1, 64, 2, 16), (1, 64, 2, 16), 16) is None
    assert "head dim D=24" in unsupported_reason(spec, (1, 64, 2, 24), (1, 64, 2, 24), 16)
    assert api.resolve_backend(Backend.AUTO, spec, ((1, 64, 2, 16), (1, 64, 2, 16), 16)) is Backend.PALLAS
    with caplog.at_level(logging.WARNING, logger="kernels.lolcats"):
        assert api.resolve_backend(Backend.AUTO, spec, ((1, 64, 2, 24), (1, 64, 2, 24), 16)) is Backend.CHUNKED
    assert any("pallas cannot run" in r.getMessage() and "head dim D=24" in r.getMessage() for r in caplog.records)
    # through the public entry point the shapes are checked too: a result, not an error
    q, k, v, fmap, theta = make_inputs(0, 1, 40, 2, 24, 8)
    y = lolcats_attention(q, k, v, fmap, theta, LolcatsSpec(window_size=8, chunk_size=8))
    ref = lolcats_attention_reference(q, k, v, fmap, theta, LolcatsSpec(window_size=8, chunk_size=8))
    assert rel_rms(y, ref) < 1e-5
