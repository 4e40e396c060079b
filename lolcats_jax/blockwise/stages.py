"""The block-wise stages, registered with `python -m lolcats_jax.train` (see `lolcats_jax.train.runner`)."""

from __future__ import annotations

from typing import Callable

from lolcats_jax.blockwise.collect import run_collect
from lolcats_jax.blockwise.stitch import run_stitch
from lolcats_jax.blockwise.train import run_distill_block
from lolcats_jax.train.stages import RunContext

BLOCKWISE_STAGES: dict[str, Callable[[RunContext], dict]] = {
    "collect": run_collect,
    "distill_block": run_distill_block,
    "stitch": run_stitch,
}
