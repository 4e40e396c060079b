"""Reference attention, key sets and feature maps against the independent naive float64 implementation."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from lolcats_testutil import (
    cast_tree,
    make_inputs,
    naive_attention,
    naive_features,
    naive_sets,
    naive_teacher_weights,
    ref_attention,
    ref_weights,
    rel_rms,
)

from kernels.lolcats import (
    LolcatsSpec,
    feature_map,
    init_feature_maps,
    init_window_logit,
    key_set_masks,
)
from lolcats_jax.compat import enable_x64

FMAPS = [("softmax_dim", True), ("softmax_dim", False), ("exp_dim", True), ("exp_dim", False), ("relu", True),
         ("pos_elu", True)]


def test_spec_validation_names_values():
    with pytest.raises(ValueError, match="form='cubic'"):
        LolcatsSpec(form="cubic")
    with pytest.raises(ValueError, match="window='xx'"):
        LolcatsSpec(window="xx")
    with pytest.raises(ValueError, match="window_size=0"):
        LolcatsSpec(window_size=0)
    with pytest.raises(ValueError, match="feature_map='tanh'"):
        LolcatsSpec(feature_map="tanh")
    assert hash(LolcatsSpec()) == hash(LolcatsSpec())  # usable as a jit static argument


def test_chunk_len_rules():
    assert LolcatsSpec(window="tk", window_size=64, chunk_size=64).chunk_len() == 64
    assert LolcatsSpec(window="tk", window_size=4, chunk_size=6).chunk_len() == 8
    assert LolcatsSpec(window="sw", window_size=8, chunk_size=5).chunk_len() == 8
    assert LolcatsSpec(window="sw", window_size=3, chunk_size=5).chunk_len() == 5
    assert LolcatsSpec(form="linear", window_size=64, chunk_size=5).chunk_len() == 5


@pytest.mark.parametrize("window,compat", [("sw", False), ("tk", False), ("tk", True)])
def test_key_set_masks_match_naive(window, compat):
    for W, L in itertools.product([1, 2, 3, 4, 5], range(1, 18)):
        spec = LolcatsSpec(window=window, window_size=W, compat=compat)
        win, lin = key_set_masks(L, spec)
        nwin, nlin = naive_sets(L, spec)
        np.testing.assert_array_equal(win, nwin, err_msg=f"{window=} {compat=} {W=} {L=}")
        np.testing.assert_array_equal(lin, nlin, err_msg=f"{window=} {compat=} {W=} {L=}")


def test_compat_masks_golden_facts():
    """Facts stated by the reference (§3.4) about the original's masks, hard-coded."""
    spec = LolcatsSpec(window="tk", window_size=4, compat=True)
    causal = np.tril(np.ones((4, 4), bool))
    for L in (2, 3, 4):  # L <= W: every causal key in both sets
        win, lin = key_set_masks(L, spec)
        np.testing.assert_array_equal(win, causal[:L, :L])
        np.testing.assert_array_equal(lin, causal[:L, :L])
    for L in (5, 8):  # W < L <= 2W: all softmax
        win, lin = key_set_masks(L, spec)
        np.testing.assert_array_equal(win, np.tril(np.ones((L, L), bool)))
        assert not lin.any()
    win, lin = key_set_masks(10, spec)  # rows 0-5 all softmax; rows 6-9 softmax on 2..i, linear on 0-1
    assert not lin[:6].any()
    for i in range(6, 10):
        assert list(np.nonzero(lin[i])[0]) == [0, 1] and list(np.nonzero(win[i])[0]) == list(range(2, i + 1))
    # start-aligned (project) tk for L=10, W=4: row 8 (block 2) is linear on block 0
    win, lin = key_set_masks(10, LolcatsSpec(window="tk", window_size=4))
    assert list(np.nonzero(lin[8])[0]) == [0, 1, 2, 3] and list(np.nonzero(win[8])[0]) == [4, 5, 6, 7, 8]


@pytest.mark.parametrize("name,fullspace", FMAPS)
@pytest.mark.parametrize("bias", [False, True])
def test_feature_map_matches_naive(name, fullspace, bias):
    with enable_x64():
        q, _, _, fmap, _ = make_inputs(0, 2, 5, 3, 6, 4, jnp.float64, bias=bias)
        spec = LolcatsSpec(feature_map=name, fullspace=fullspace, eps=1e-3)  # eps large enough to bite
        got = feature_map(q, fmap.wq, fmap.bq, spec)
        want = naive_features(np.asarray(q), np.asarray(fmap.wq), None if fmap.bq is None else np.asarray(fmap.bq),
                              spec)
        assert got.shape == (2, 5, 3, spec.feature_out_dim(4)) and got.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-15)


def test_feature_map_dtypes_and_errors():
    q, _, _, fmap, _ = make_inputs(0, 1, 3, 2, 4, 4, jnp.bfloat16)
    assert feature_map(q, fmap.wq, None, LolcatsSpec()).dtype == jnp.float32
    with pytest.raises(ValueError, match=r"dividing the H=1 query heads.*K=2"):
        feature_map(q, fmap.wq[:1], None, LolcatsSpec())
    with pytest.raises(ValueError, match="matching D"):
        feature_map(q, fmap.wq[:, :3], None, LolcatsSpec())


def test_init_feature_maps():
    fm = init_feature_maps(jax.random.PRNGKey(0), 3, 8, 4, init="identity")
    assert fm.wq.shape == (3, 8, 4) and fm.bq is None
    np.testing.assert_array_equal(fm.wq[1], np.eye(8, 4))
    np.testing.assert_array_equal(fm.wq, fm.wk)
    fm = init_feature_maps(jax.random.PRNGKey(1), 32, 128, 64, init="kaiming", bias=True, dtype=jnp.bfloat16)
    bound = (6 / (128 * 64)) ** 0.5
    w = np.asarray(fm.wq, np.float32)
    assert fm.wq.dtype == jnp.bfloat16 and abs(w).max() <= bound * 1.01 and abs(w).max() > 0.9 * bound
    np.testing.assert_array_equal(np.asarray(fm.wq, np.float32), np.asarray(fm.wk, np.float32))
    b = np.asarray(fm.bq, np.float32)
    assert b.shape == (32,) and abs(b).max() <= (6 / 32) ** 0.5 * 1.01 and np.array_equal(b, np.asarray(fm.bk,
                                                                                                        np.float32))
    with pytest.raises(ValueError, match="init='normal'"):
        init_feature_maps(jax.random.PRNGKey(0), 1, 2, 2, init="normal")
    theta = init_window_logit(4)
    np.testing.assert_allclose(jax.nn.sigmoid(theta), 0.1, rtol=1e-6)


REF_CASES = (
    [dict(form="hybrid", window="tk", compat=True, T=T) for T in range(2, 18)]
    + [dict(form="hybrid", window="sw", T=T) for T in (2, 5, 9, 13, 17)]
    + [dict(form="hybrid", window="tk", T=T) for T in (1, 3, 8, 11, 17)]
    + [dict(form="hybrid", window="tk", T=13, affine=True), dict(form="hybrid", window="sw", T=10, affine=True)]
    + [dict(form="linear", T=9), dict(form="softmax", T=9)]
)


@functools.partial(jax.jit, static_argnums=5)
def _ref_output_and_maps(q, k, v, fmap, theta, spec):
    return ref_attention(q, k, v, fmap, theta, spec), ref_weights(q, k, fmap, theta, spec)


@pytest.mark.parametrize("case", REF_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_reference_matches_naive_float64(case):
    case = dict(case)
    T = case.pop("T")
    spec = LolcatsSpec(window_size=4, **case)
    with enable_x64():
        q, k, v, fmap, theta = make_inputs(T, 1, T, 2, 6, 4, jnp.float64, bias=True)
        y, (teacher, student) = _ref_output_and_maps(q, k, v, fmap, theta, spec)
    assert y.dtype == jnp.float64 and y.shape == (1, T, 2, 6)
    want, want_w = naive_attention(q, k, v, fmap, theta, spec, return_weights=True)
    assert rel_rms(y, want) < 1e-12
    np.testing.assert_allclose(np.asarray(student), want_w, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(np.asarray(teacher), naive_teacher_weights(q, k), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("heads", [(3, 1), (8, 2), (8, 1)], ids=["G3", "G4", "G8"])
@pytest.mark.parametrize("form", ["hybrid", "linear", "softmax"])
def test_reference_grouped_kv_heads_match_naive_float64(form, heads):
    """Query head h reads kv head h // G (G = H/K): the reference's expansion equals the naive loops, which index
    the kv head per query head."""
    H, K = heads
    spec = LolcatsSpec(form=form, window="sw", window_size=3)
    with enable_x64():
        q, k, v, fmap, theta = make_inputs(1, 1, 9, H, 6, 4, jnp.float64, bias=True, K=K)
        y, (teacher, student) = _ref_output_and_maps(q, k, v, fmap, theta, spec)
    want, want_w = naive_attention(q, k, v, fmap, theta, spec, return_weights=True)
    assert y.shape == (1, 9, H, 6) and rel_rms(y, want) < 1e-12
    np.testing.assert_allclose(np.asarray(student), want_w, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("spec", [LolcatsSpec(window="tk", window_size=3, feature_map="softmax_dim"),
                                  LolcatsSpec(window="sw", window_size=2, feature_map="exp_dim", affine=True),
                                  LolcatsSpec(form="linear", feature_map="pos_elu")],
                         ids=["tk", "sw-affine", "linear"])
def test_reference_gradients_match_finite_differences(spec):
    with enable_x64():
        q, k, v, fmap, theta = make_inputs(3, 1, 7, 2, 4, 3, jnp.float64, bias=True)

        @jax.jit
        def f(q, k, v, wq, wk, bq, bk, theta):
            return ref_attention(q, k, v, fmap._replace(wq=wq, wk=wk, bq=bq, bk=bk), theta, spec)

        check_grads(f, (q, k, v, fmap.wq, fmap.wk, fmap.bq, fmap.bk, theta), order=1, modes=["rev"],
                    atol=1e-6, rtol=1e-6)


def test_reference_low_precision_inputs_compute_in_fp32():
    q, k, v, fmap, theta = make_inputs(0, 2, 9, 2, 8, 4, jnp.float32)
    spec = LolcatsSpec(window_size=4)
    y32 = ref_attention(q, k, v, fmap, theta, spec)
    y16 = ref_attention(*cast_tree((q, k, v, fmap, theta), jnp.bfloat16), spec)
    assert y16.dtype == jnp.bfloat16 and y32.dtype == jnp.float32
    assert rel_rms(y16, y32) < 2e-2
    with enable_x64():
        y64 = ref_attention(*cast_tree((q, k, v, fmap, theta), jnp.float64), spec)
    assert y64.dtype == jnp.float64 and rel_rms(y32, y64) < 1e-5
