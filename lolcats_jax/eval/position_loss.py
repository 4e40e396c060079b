"""Loss by position over long windows: how much a model gains from distant context.

Held-out text is cut into non-overlapping windows of L + 1 tokens (only whole windows); in each, the token at
position t + 1 is predicted from the t + 1 tokens before it (t = 0 … L − 1), so position t has a context of t + 1
tokens. The mean NLL is reported per band of positions — [0, 64), [64, 128), [128, 256), … doubling up to L — and
over all positions. A linearized model keeps exact softmax attention only inside its sliding window; beyond it
everything goes through the linear state, so the bands past the window show what the linear part keeps of the
teacher's use of long context (the short tasks and 1K-token perplexity lie mostly inside a 256-token window).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence


FIRST_BAND = 64


def position_bands(length: int, first: int = FIRST_BAND) -> list[tuple[int, int]]:
    """[0, first), [first, 2·first), [2·first, 4·first), … the last band ending at `length`."""
    if length < 1:
        raise ValueError(f"{length=} must be ≥ 1")
    bands, lo, hi = [], 0, min(first, length)
    while lo < length:
        bands.append((lo, hi))
        lo, hi = hi, min(2 * hi, length)
    return bands


@dataclasses.dataclass(frozen=True)
class PositionLoss:
    length: int  # L, positions per window
    windows: int
    bands: tuple[tuple[int, int, float], ...]  # (first position, end, mean NLL) per band
    nll: float  # mean NLL over every position of every window

    def as_dict(self) -> dict:
        return {"length": self.length, "windows": self.windows, "tokens": self.length * self.windows,
                "nll": self.nll, "bands": [list(b) for b in self.bands]}


def windows_of(token_ids: Sequence[int], length: int, max_windows: int | None = None) -> list[list[int]]:
    """Whole non-overlapping windows of length + 1 tokens from the start of `token_ids` (at most `max_windows`)."""
    ids = list(token_ids)
    n = len(ids) // (length + 1)
    if max_windows is not None:
        n = min(n, max_windows)
    return [ids[i * (length + 1) : (i + 1) * (length + 1)] for i in range(n)]


def window_problem(n_tokens: int, length: int, max_positions: int, *, length_name: str, text_name: str) -> str | None:
    """Why windows of `length` positions cannot be scored from a text of `n_tokens` tokens by a model of
    `max_positions` positions, or None; the message names the caller's setting (`length_name`, e.g. a flag and its
    value) and text (`text_name`)."""
    if length > max_positions:
        return f"{length_name} exceeds the model's context ({max_positions} positions)"
    if n_tokens < length + 1:
        return f"{text_name}: {n_tokens} tokens, fewer than one window of {length_name} + 1 = {length + 1}"
    return None


def position_loss(scorer, token_ids: Sequence[int], length: int, max_windows: int | None = None) -> PositionLoss:
    """Mean NLL per position band of `scorer`'s model (an `eval.scoring.Scorer`) over windows of `token_ids`."""
    windows = windows_of(token_ids, length, max_windows)
    if not windows:
        raise ValueError(f"the text has {len(token_ids)} tokens: fewer than one window of {length} + 1")
    nll_NL = -scorer.token_logprobs(windows)
    per_pos = nll_NL.mean(axis=0)
    bands = tuple((lo, hi, float(per_pos[lo:hi].mean())) for lo, hi in position_bands(length))
    return PositionLoss(length, len(windows), bands, float(nll_NL.mean()))
