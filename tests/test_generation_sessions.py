"""Chunked prefill and conversation sessions (`decode.extend`, `Generator.start / extend / reply`) on a tiny model
with a softmax layer between two LoLCATS layers: for default-mode models every session state equals one parallel
forward over the tokens each row has consumed (ragged rows, empty turns, rows that stop at EOS)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lolcats_jax.inference.generation import Generator
from lolcats_jax.model import decode
from tests.test_export import jax_logits, make_model, rel_err, tokens

PROMPTS = [tokens(1, 13, seed=11)[0].tolist(), tokens(1, 7, seed=12)[0].tolist()]
TURN = [tokens(1, 6, seed=13)[0].tolist(), []]  # row 1 gets no new tokens


def parallel_last_logits(model, rows: list[list[int]]) -> np.ndarray:
    """(B, V): the parallel forward's logits at each row's last token (each row alone, no padding)."""
    return np.stack([jax_logits(model, np.asarray([r]))[0, -1] for r in rows])


@pytest.fixture(scope="module", params=["tk", "linear"])  # sw: kernel-level float64 tests and the HF export test
def model(request):
    return make_model(request.param)


@pytest.fixture(scope="module")
def gen(model):
    return Generator(model)  # compiled programs shared by the tests of one model


def test_session_equals_parallel_forward(model, gen):
    rows = [list(p) for p in PROMPTS]
    session = gen.start(PROMPTS, max_len=48, chunk=4)  # 4 + 4 + 4 + 1 tokens for row 0, 4 + 3 for row 1
    assert session.lengths.tolist() == [13, 7]
    assert rel_err(session.logits, parallel_last_logits(model, rows)) <= 1e-4
    session = gen.extend(session, TURN)
    rows[0] += TURN[0]
    assert session.lengths.tolist() == [19, 7]
    assert rel_err(session.logits, parallel_last_logits(model, rows)) <= 1e-4
    reply, session = gen.reply(session, 5)
    for b in range(2):  # greedy: each reply token is the argmax of the parallel logits before it
        full = rows[b] + reply[b]
        ref = jax_logits(model, np.asarray([full]))[0]
        np.testing.assert_array_equal(ref[len(rows[b]) - 1:-1].argmax(-1), reply[b])
        rows[b] = full
    assert session.lengths.tolist() == [24, 12]
    assert rel_err(session.logits, parallel_last_logits(model, rows)) <= 1e-4
    session = gen.extend(session, [[3, 4], [5, 6, 7]], chunk=2)
    rows[0] += [3, 4]
    rows[1] += [5, 6, 7]
    assert rel_err(session.logits, parallel_last_logits(model, rows)) <= 1e-4


def test_chunked_generate_equals_one_shot(gen):
    assert gen.generate(PROMPTS, 6, prefill_chunk=3) == gen.generate(PROMPTS, 6)


def test_inactive_rows_keep_their_cache(model):
    """decode_step with active_B: the inactive row's cache is bit-identical, the active row advances as alone."""
    toks = jnp.asarray([[5, 6, 7, 0], [8, 9, 10, 11]], jnp.int32)
    lengths = jnp.asarray([3, 4], jnp.int32)
    prefill = jax.jit(lambda t, n: decode.prefill(model, t, n, 8))
    step = jax.jit(lambda c, t, a: decode.decode_step(model, c, t, a))
    _, cache = prefill(toks, lengths)
    nxt = jnp.asarray([1, 2], jnp.int32)
    _, after = step(cache, nxt, jnp.asarray([False, True]))
    _, both = step(cache, nxt, jnp.asarray([True, True]))
    leaves = [jax.tree.leaves(c.segments) for c in (cache, after, both)]  # (layers, B, …) each
    for old, new, moved in zip(*leaves):
        np.testing.assert_array_equal(np.asarray(new)[:, 0], np.asarray(old)[:, 0])
        np.testing.assert_array_equal(np.asarray(new)[:, 1], np.asarray(moved)[:, 1])
    assert np.asarray(after.pos).tolist() == [3, 5]


def test_reply_stops_rows_at_eos_and_keeps_them_consistent(model, gen):
    """A row that emits EOS early stops consuming: its session state is that of prompt + reply up to the EOS."""
    free, _ = gen.reply(gen.start(PROMPTS, 40), 6)
    eos = next((t for t in free[1][:3] if t not in free[0]), None)
    if eos is None:
        pytest.fail(f"no usable EOS candidate in {free}: pick other prompts for this test")
    session = gen.start(PROMPTS, 40)
    reply, session = gen.reply(session, 6, eos_ids=[eos])
    stop = free[1].index(eos) + 1
    assert reply[1] == free[1][:stop] and reply[0] == free[0]
    assert session.lengths.tolist() == [13 + 6, 7 + stop]
    rows = [PROMPTS[0] + reply[0], PROMPTS[1] + reply[1]]
    assert rel_err(session.logits, parallel_last_logits(model, rows)) <= 1e-4


def test_session_errors(gen):
    with pytest.raises(ValueError, match="max_len"):
        gen.start(PROMPTS, max_len=10)
    session = gen.start(PROMPTS, max_len=16)
    with pytest.raises(ValueError, match="exceeds its max_len"):
        gen.extend(session, [[1] * 4, []])
    with pytest.raises(ValueError, match="room left"):
        gen.reply(session, 4)
    with pytest.raises(ValueError, match="rows"):
        gen.extend(session, [[1]])
