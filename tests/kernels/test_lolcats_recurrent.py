"""Prefill + token-by-token decoding equals the parallel form at every position (sw, tk, linear, compat)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lolcats_testutil import cast_tree, make_inputs, ref_attention, rel_rms

from kernels.lolcats import LolcatsSpec
from kernels.lolcats.recurrent import decode_step, decode_tokens, init_decode_state, prefill_state, ring_len
from lolcats_jax.compat import enable_x64


@jax.jit
def _shift_rows(x_BTHD, start_B):
    """Row b of the result is x[b, start_b:] followed by zeros (the tokens row b still has to decode)."""
    T = x_BTHD.shape[1]
    idx_BT = start_B[:, None] + jnp.arange(T)[None, :]
    got = jnp.take_along_axis(x_BTHD, jnp.clip(idx_BT, 0, T - 1)[:, :, None, None], axis=1)
    return jnp.where((idx_BT < T)[:, :, None, None], got, 0)


def _prefill_then_decode(inputs, spec, prefill_lengths):
    """Outputs (B, T, H, D): parallel reference up to each row's prefill length, decoded after it."""
    q, k, v, fmap, theta = inputs
    T = q.shape[1]
    len_B = jnp.asarray(prefill_lengths, jnp.int32)

    @jax.jit
    def run(q, k, v, fmap, theta, len_B):
        state = prefill_state(k, v, fmap, spec, len_B)
        ys, state = decode_tokens(state, *(_shift_rows(x, len_B) for x in (q, k, v)), fmap, theta, spec)
        return ys, state

    ys, state = run(q, k, v, fmap, theta, len_B)
    np.testing.assert_array_equal(state.pos_B, len_B + T)
    y_par = np.asarray(ref_attention(q, k, v, fmap, theta, spec), np.float64)
    out = y_par.copy()
    for b, L0 in enumerate(prefill_lengths):
        out[b, L0:] = np.asarray(ys[b, : T - L0], np.float64)
    return out, y_par


CASES = [  # spec kwargs, T, prefill lengths per row
    (dict(window="sw", window_size=4), 19, [0, 7]),
    (dict(window="sw", window_size=3, feature_map="exp_dim", affine=True), 14, [1, 5, 13]),
    (dict(window="tk", window_size=4), 21, [0, 6]),
    (dict(window="tk", window_size=3, feature_map="relu"), 17, [1, 8, 3]),
    (dict(window="tk", window_size=4, feature_map="pos_elu", affine=True), 13, [13, 2]),
    (dict(window="tk", window_size=1), 6, [0, 3]),
    (dict(form="linear"), 11, [0, 4]),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[0].values())) + f"-T{c[1]}-L{c[2]}")
def test_prefill_then_decode_equals_parallel_float32(case):
    kw, T, lengths = case
    spec = LolcatsSpec(**kw)
    inputs = make_inputs(T, len(lengths), T, 2, 8, 4, bias=spec.feature_map == "relu")
    got, want = _prefill_then_decode(inputs, spec, lengths)
    assert rel_rms(got, want) < 1e-5
    for b, L0 in enumerate(lengths):  # every decoded position of every row, not only on average
        np.testing.assert_allclose(got[b, L0:], want[b, L0:], rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("heads", [(2, 2), (3, 1), (8, 2), (8, 1)], ids=["G1", "G3", "G4", "G8"])
@pytest.mark.parametrize("window", ["sw", "tk"])
def test_prefill_then_decode_equals_parallel_float64(window, heads):
    """Grouped kv heads (G query heads per kv head) decode from a ring of the K raw heads, equal to the parallel
    form, which reads kv head h // G for query head h."""
    spec = LolcatsSpec(window=window, window_size=3)
    H, K = heads
    with enable_x64():
        inputs = cast_tree(make_inputs(5, 2, 16, H, 8, 4, K=K), jnp.float64)
        got, want = _prefill_then_decode(inputs, spec, [0, 5])
    assert rel_rms(got, want) < 1e-12


def test_compat_tk_decodes_as_original_sliding_window():
    """compat tk: the original decoder — decoded positions equal the sw parallel form (reference §3.8)."""
    spec = LolcatsSpec(window="tk", window_size=4, compat=True)
    sw = dataclasses.replace(spec, window="sw", compat=False)
    assert ring_len(spec) == 4
    inputs = make_inputs(1, 1, 14, 2, 8, 4)
    q, k, v, fmap, theta = inputs
    state = prefill_state(k[:, :6], v[:, :6], fmap, spec)
    ys, _ = decode_tokens(state, q[:, 6:], k[:, 6:], v[:, 6:], fmap, theta, spec)
    want = ref_attention(q, k, v, fmap, theta, sw)[:, 6:]
    assert rel_rms(ys, want) < 1e-5
    assert rel_rms(ys, ref_attention(q, k, v, fmap, theta, spec)[:, 6:]) > 1e-3  # and differs from tk parallel


@pytest.mark.parametrize("window", ["sw", "tk"])
def test_prefill_state_equals_decoded_state(window):
    """prefill(L + n) == prefill(L) then n decode steps (same sums and ring contents)."""
    spec = LolcatsSpec(window=window, window_size=3)
    q, k, v, fmap, theta = make_inputs(2, 2, 15, 2, 8, 4)
    lengths = jnp.asarray([2, 9])
    full = prefill_state(k, v, fmap, spec, lengths + 5)
    state = prefill_state(k, v, fmap, spec, lengths)
    _, state = decode_tokens(state, *(_shift_rows(x, lengths)[:, :5] for x in (q, k, v)), fmap, theta, spec)
    for name, a, b in zip(full._fields, full, state):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-5, atol=1e-6,
                                   err_msg=name)


def test_state_sizes_dtypes_and_errors():
    spec = LolcatsSpec(window="tk", window_size=4)
    q, k, v, fmap, theta = cast_tree(make_inputs(0, 2, 9, 3, 8, 4), jnp.bfloat16)
    state = prefill_state(k, v, fmap, spec)
    assert state.s_BHFD.shape == (2, 3, 8, 8) and state.s_BHFD.dtype == jnp.float32
    assert state.k_BRKD.shape == (2, 8, 3, 8) and state.k_BRKD.dtype == jnp.bfloat16
    assert state.fk_BRHF.dtype == jnp.float32 and state.pos_B.dtype == jnp.int32
    y, state2 = jax.jit(decode_step, static_argnums=6)(state, q[:, 0], k[:, 0], v[:, 0], fmap, theta, spec)
    assert y.dtype == jnp.bfloat16 and y.shape == (2, 3, 8)
    assert jax.tree.map(lambda a: a.shape, state2) == jax.tree.map(lambda a: a.shape, state)  # O(1) in T
    empty = init_decode_state(2, 3, 8, 8, spec, jnp.bfloat16)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), empty) == jax.tree.map(lambda a: (a.shape, a.dtype), state)
    with pytest.raises(NotImplementedError, match="softmax"):
        prefill_state(k, v, fmap, LolcatsSpec(form="softmax"))
    with pytest.raises(ValueError, match="ring length"):
        decode_step(state, q[:, 0], k[:, 0], v[:, 0], fmap, theta, dataclasses.replace(spec, window="sw"))


def test_grouped_state_keeps_the_kv_heads_raw():
    """H = 8 query heads over K = 2 kv heads: the ring holds K raw keys/values (4× less than repeated heads), the
    linear state and the key features stay per query head; init_decode_state builds the same layout."""
    spec = LolcatsSpec(window="tk", window_size=4)
    q, k, v, fmap, theta = make_inputs(0, 2, 9, 8, 16, 4, K=2)
    state = prefill_state(k, v, fmap, spec)
    assert state.k_BRKD.shape == (2, 8, 2, 16) and state.v_BRKD.shape == (2, 8, 2, 16)
    assert state.fk_BRHF.shape == (2, 8, 8, 8) and state.s_BHFD.shape == (2, 8, 8, 16)
    empty = init_decode_state(2, 8, 16, 8, spec, num_kv_heads=2)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), empty) == jax.tree.map(lambda a: (a.shape, a.dtype), state)
    y, _ = decode_step(state, q[:, 0], k[:, 0], v[:, 0], fmap, theta, spec)
    assert y.shape == (2, 8, 16)
