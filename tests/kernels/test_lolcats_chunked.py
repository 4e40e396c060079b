"""Chunked backend (custom VJP) against the reference: outputs and every gradient, several dtypes and shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lolcats_testutil import grad_errors, make_inputs, output_and_grads, rel_rms

from kernels.lolcats import Backend, LolcatsSpec, lolcats_attention, lolcats_attention_reference, resolve_backend
from kernels.lolcats import chunked
from kernels.lolcats.chunked import lolcats_attention_chunked
from lolcats_jax.compat import enable_x64

TOL = {jnp.float64: (1e-12, 1e-11), jnp.float32: (1e-5, 2e-5), jnp.bfloat16: (1e-2, 2e-2)}  # (output, grads)

CASES = [  # (spec kwargs, B, T, H)
    (dict(window="tk", window_size=4, chunk_size=4), 2, 13, 3),
    (dict(window="tk", window_size=4, chunk_size=8, feature_map="relu"), 1, 21, 2),  # C = 2W
    (dict(window="tk", window_size=4, chunk_size=4, feature_map="exp_dim", affine=True), 2, 16, 2),
    (dict(window="tk", window_size=8, chunk_size=8), 1, 3, 2),  # T < W
    (dict(window="tk", window_size=4, chunk_size=4, feature_map="pos_elu"), 2, 1, 2),  # T = 1
    (dict(window="sw", window_size=3, chunk_size=5), 2, 17, 3),  # C ≥ W, not a multiple
    (dict(window="sw", window_size=4, chunk_size=4, feature_map="softmax_dim", fullspace=False), 1, 11, 2),
    (dict(window="sw", window_size=5, chunk_size=2, feature_map="exp_dim", fullspace=False, affine=True), 2, 12, 2),
    (dict(window="sw", window_size=1, chunk_size=3), 1, 7, 1),  # W = 1: window = self only
    (dict(form="linear", chunk_size=4, feature_map="relu"), 2, 10, 2),
    (dict(form="linear", chunk_size=3), 1, 1, 1),
    (dict(form="softmax", chunk_size=4), 2, 11, 2),
]


def _ids(case):
    kw, B, T, H = case
    return "-".join(f"{v}" for v in kw.values()) + f"-B{B}T{T}H{H}"


def _compare(kw, B, T, H, dtype, seed=0):
    spec = LolcatsSpec(**kw)
    bias = spec.feature_map in ("relu", "pos_elu") or seed % 2 == 1
    inputs = make_inputs(seed, B, T, H, 8, 4, dtype, bias=bias)
    y_ref, g_ref = output_and_grads(lolcats_attention_reference, inputs, spec)
    y, g = output_and_grads(lolcats_attention_chunked, inputs, spec)
    assert y.dtype == dtype and y.shape == (B, T, H, 8)
    return rel_rms(y, y_ref), grad_errors(g, g_ref)


@pytest.fixture(params=["unrolled", "loop"])
def chunk_scan(request, monkeypatch):
    """Both forms of the chunk scans: unrolled in full (every case here has ≤ 16 chunks) and a while loop."""
    if request.param == "loop":
        monkeypatch.setattr(chunked, "UNROLL_MAX_CHUNKS", 0)
    return request.param


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_chunked_matches_reference_float32(case, chunk_scan):
    y_err, g_err = _compare(*case, jnp.float32)
    tol_y, tol_g = TOL[jnp.float32]
    assert y_err < tol_y and max(g_err.values()) < tol_g, (y_err, g_err)


@pytest.mark.parametrize("case", [CASES[0], CASES[9]], ids=_ids)
def test_chunked_matches_reference_float64(case):
    with enable_x64():
        y_err, g_err = _compare(*case, jnp.float64, seed=1)
    tol_y, tol_g = TOL[jnp.float64]
    assert y_err < tol_y and max(g_err.values()) < tol_g, (y_err, g_err)


@pytest.mark.parametrize("case", [CASES[1], CASES[5]], ids=_ids)
def test_chunked_matches_reference_bfloat16(case):
    y_err, g_err = _compare(*case, jnp.bfloat16)
    tol_y, tol_g = TOL[jnp.bfloat16]
    assert y_err < tol_y and max(g_err.values()) < tol_g, (y_err, g_err)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(window=st.sampled_from(["sw", "tk"]), W=st.integers(1, 6), chunk=st.integers(1, 9), T=st.integers(1, 30),
       B=st.integers(1, 2), H=st.integers(1, 2), affine=st.booleans(), seed=st.integers(0, 2**16))
def test_chunked_matches_reference_random_shapes(window, W, chunk, T, B, H, affine, seed):
    with enable_x64():
        y_err, g_err = _compare(dict(window=window, window_size=W, chunk_size=chunk, affine=affine), B, T, H,
                                jnp.float64, seed=seed)
    assert y_err < 1e-11 and max(g_err.values()) < 1e-10, (y_err, g_err)


@pytest.mark.parametrize("heads", [(2, 2), (3, 1), (8, 2), (8, 1)], ids=["G1", "G3", "G4", "G8"])
@pytest.mark.parametrize("kw", [dict(window="tk", window_size=4, chunk_size=8), dict(window="sw", window_size=3,
                                chunk_size=5), dict(form="linear", chunk_size=4), dict(form="softmax", chunk_size=4)],
                         ids=["tk", "sw", "linear", "softmax"])
def test_chunked_grouped_kv_heads_match_reference_float64(kw, heads):
    """Grouped-query inputs (G = H/K query heads per kv head, k and v never repeated): outputs and every gradient
    (dk, dv summed over each group) equal the reference, which expands the kv heads literally."""
    H, K = heads
    spec = LolcatsSpec(**kw)
    with enable_x64():
        inputs = make_inputs(4, 2, 13, H, 8, 4, jnp.float64, bias=True, K=K)
        y_ref, g_ref = output_and_grads(lolcats_attention_reference, inputs, spec)
        y, g = output_and_grads(lolcats_attention_chunked, inputs, spec)
    assert y.shape == (2, 13, H, 8) and g[1].shape == (2, 13, K, 8) and g[2].shape == (2, 13, K, 8)
    assert rel_rms(y, y_ref) < 1e-12 and max(grad_errors(g, g_ref).values()) < 1e-11, grad_errors(g, g_ref)


def test_chunked_backward_memory_is_linear_in_T():
    """Compiled temp memory of value-and-grad grows ~linearly with T (the reference's grows quadratically)."""
    spec = LolcatsSpec(window="tk", window_size=16, chunk_size=16)

    def temp_bytes(fn, T):
        inputs = make_inputs(0, 1, T, 2, 32, 16)
        grad = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a, spec) ** 2), argnums=(0, 1, 2, 3, 4)))
        analysis = grad.lower(*inputs).compile().memory_analysis()
        assert analysis is not None, "XLA gave no memory analysis on this platform"
        return analysis.temp_size_in_bytes

    small, large = temp_bytes(lolcats_attention_chunked, 256), temp_bytes(lolcats_attention_chunked, 1024)
    assert large / small < 5.0, (small, large)  # ×4 tokens → ≈×4 memory (quadratic would be ×16)
    ref_small, ref_large = temp_bytes(lolcats_attention_reference, 256), temp_bytes(lolcats_attention_reference, 1024)
    assert ref_large / ref_small > 10.0 and large < ref_large / 5, (ref_small, ref_large, large)


@pytest.mark.parametrize("T, loops", [(16, 0), (64, 0), (68, 3)])  # C = 4: 4, 16, 17 chunks
def test_chunk_scans_unroll_up_to_the_limit(T, loops):
    """Value-and-grad holds no while loop up to UNROLL_MAX_CHUNKS chunks and one per chunk scan (forward
    recomputation, span backward, state backward) beyond it."""
    spec = LolcatsSpec(window="tk", window_size=4, chunk_size=4)
    inputs = make_inputs(0, 1, T, 2, 8, 4)
    grad = jax.jit(jax.grad(lambda *a: jnp.sum(lolcats_attention_chunked(*a, spec) ** 2), argnums=(0, 1, 2, 3, 4)))
    hlo = grad.lower(*inputs).as_text()
    assert chunked.UNROLL_MAX_CHUNKS == 16 and hlo.count("stablehlo.while") == loops


def test_spans_without_linear_pairs_skip_the_linear_terms():
    """tk with C = W: a span (chunks n−1, n) is all window, so the span's linear products are skipped (the cases above
    with C = W check that branch against the reference); C = 2W and sw spans hold linear pairs."""
    from kernels.lolcats.chunked import _make_static

    assert not _make_static(LolcatsSpec(window="tk", window_size=4, chunk_size=4)).has_linear_span
    assert _make_static(LolcatsSpec(window="tk", window_size=4, chunk_size=8)).has_linear_span
    assert _make_static(LolcatsSpec(window="sw", window_size=3, chunk_size=5)).has_linear_span


def test_api_dispatch_and_errors():
    spec = LolcatsSpec(window_size=4, chunk_size=4)
    assert resolve_backend(Backend.AUTO, spec) is Backend.CHUNKED  # CPU default
    assert resolve_backend("reference", spec) is Backend.REFERENCE
    compat = LolcatsSpec(window_size=4, compat=True)
    assert resolve_backend(Backend.AUTO, compat) is Backend.REFERENCE
    with pytest.raises(ValueError, match="only implemented by Backend.REFERENCE"):
        resolve_backend(Backend.CHUNKED, compat)
    with pytest.raises(ValueError, match="compat=True"):
        lolcats_attention_chunked(*make_inputs(0, 1, 5, 1, 4, 2), compat)
    with pytest.raises(RuntimeError, match="TRITON"):
        resolve_backend(Backend.TRITON, spec)
    q, k, v, fmap, theta = make_inputs(0, 1, 6, 2, 4, 2)
    y_auto = lolcats_attention(q, k, v, fmap, theta, spec)
    y_ref = lolcats_attention(q, k, v, fmap, theta, spec, backend="reference")
    assert rel_rms(y_auto, y_ref) < 1e-5
    with pytest.raises(ValueError, match="k.shape"):
        lolcats_attention(q, k[:, :5], v, fmap, theta, spec)
    q3, k3, v3, fmap3, theta3 = make_inputs(0, 1, 6, 3, 4, 2, K=3)
    with pytest.raises(ValueError, match="dividing the H=3 query heads"):
        lolcats_attention(q3, k3[:, :, :2], v3[:, :, :2], fmap3, theta3, spec)
    with pytest.raises(ValueError, match="theta_H"):
        lolcats_attention(q, k, v, fmap, None, spec)
    with pytest.raises(ValueError, match="fmap.wq"):
        lolcats_attention(q, k, v, fmap._replace(wq=fmap.wq[:1]), theta, spec)
    assert lolcats_attention(q, k, v, fmap, None, LolcatsSpec(form="linear")).shape == q.shape
