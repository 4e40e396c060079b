"""Bands and windows of the loss by position (eval.position_loss); its numbers against transformers are in
test_eval.py (test_smollm2_loss_by_position_equals_transformers)."""

import numpy as np
import pytest

from lolcats_jax.eval.position_loss import position_bands, position_loss, windows_of


def test_bands_double_from_64_and_end_at_the_length():
    assert position_bands(4096) == [(0, 64), (64, 128), (128, 256), (256, 512), (512, 1024), (1024, 2048), (2048, 4096)]
    assert position_bands(100) == [(0, 64), (64, 100)]
    assert position_bands(40) == [(0, 40)]
    with pytest.raises(ValueError, match="length=0"):
        position_bands(0)


def test_windows_are_whole_and_do_not_overlap():
    ids = list(range(25))
    assert windows_of(ids, 7) == [list(range(0, 8)), list(range(8, 16)), list(range(16, 24))]
    assert windows_of(ids, 7, max_windows=2) == [list(range(0, 8)), list(range(8, 16))]
    assert windows_of(ids, 30) == []


class _Fixed:
    """A scorer whose log-probability at position t of every window is −(t + 1) / 100."""

    def token_logprobs(self, windows):
        L = len(windows[0]) - 1
        return -np.tile((np.arange(L) + 1) / 100.0, (len(windows), 1))


def test_band_means_are_means_of_their_positions():
    res = position_loss(_Fixed(), list(range(300)), 100)
    assert res.windows == 2  # 300 // 101
    (lo0, hi0, a), (lo1, hi1, b) = res.bands
    assert (lo0, hi0, lo1, hi1) == (0, 64, 64, 100)
    assert a == pytest.approx(np.mean(np.arange(1, 65)) / 100) and b == pytest.approx(np.mean(np.arange(65, 101)) / 100)
    assert res.nll == pytest.approx(np.mean(np.arange(1, 101)) / 100)
    with pytest.raises(ValueError, match="fewer than one window"):
        position_loss(_Fixed(), list(range(50)), 100)


def test_window_problem_names_the_callers_setting_and_text():
    from lolcats_jax.eval.position_loss import window_problem

    kw = dict(length_name="--long-context-length 100", text_name="book.txt")
    assert window_problem(101, 100, 100, **kw) is None
    assert window_problem(500, 101, 100, length_name="--long-context-length 101", text_name="book.txt") == \
        "--long-context-length 101 exceeds the model's context (100 positions)"
    assert window_problem(100, 100, 2048, **kw) == \
        "book.txt: 100 tokens, fewer than one window of --long-context-length 100 + 1 = 101"
