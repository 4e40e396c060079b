"""How the layers are cut into blocks, and where each block's results live.

A block is k consecutive layers [start, stop); its linearized layers are a contiguous range [lin_start, lin_stop)
of the full model's stacked LoLCATS parameters (layers kept as softmax are skipped in that stacking).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lolcats_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Block:
    index: int
    start: int  # first layer (global index)
    stop: int  # one past the last layer
    lin_start: int  # first index into the stacked LoLCATS parameters of the full model
    lin_stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def num_linear(self) -> int:
        return self.lin_stop - self.lin_start

    def describe(self) -> str:
        return f"block {self.index} (layers {self.start}-{self.stop - 1})"


def partition(kinds: tuple[str, ...], size: int) -> list[Block]:
    """Blocks of `size` consecutive layers over a model whose per-layer attention kinds are `kinds`."""
    if size <= 0:
        raise UserError(f"block.size must be positive, got {size}")
    blocks = []
    lin = 0
    for index, start in enumerate(range(0, len(kinds), size)):
        stop = min(start + size, len(kinds))
        n_lin = sum(k == "lolcats" for k in kinds[start:stop])
        blocks.append(Block(index, start, stop, lin, lin + n_lin))
        lin += n_lin
    return blocks


def block_starts(num_layers: int, size: int) -> list[int]:
    """The first layer of every block: 0, k, 2k, …"""
    if size <= 0:
        raise UserError(f"block.size must be positive, got {size}")
    return list(range(0, num_layers, size))


def selected_blocks(blocks: list[Block], index: str) -> list[Block]:
    """The blocks `block.index` names: "all", one index ("3"), an inclusive range ("0-6") or a comma list of
    those ("0-3,7") — a job of a SLURM array may train several blocks one after the other."""
    n = len(blocks)
    if index.strip().lower() == "all":
        return list(blocks)
    chosen: list[int] = []
    for part in filter(None, (p.strip() for p in index.split(","))):
        lo_text, dash, hi_text = part.partition("-")
        try:
            lo, hi = int(lo_text), int(hi_text) if dash else int(lo_text)
        except ValueError:
            raise UserError(f"block.index={index!r} must be 'all', a block number 0..{n - 1}, a range like 0-{n - 1} or a comma list of those") from None
        for i in (lo, hi):
            if not 0 <= i < n:
                raise UserError(f"block.index={i} is out of range: the model has {n} blocks (0..{n - 1})")
        if hi < lo:
            raise UserError(f"block.index={part!r}: an empty range (write it low-high)")
        chosen.extend(i for i in range(lo, hi + 1) if i not in chosen)
    if not chosen:
        raise UserError(f"block.index={index!r} names no block")
    return [blocks[i] for i in chosen]


def store_dir(run_dir: Path, store: str | None) -> Path:
    """Where collected block inputs live: `block.store`, else `<run.dir>/block_inputs`."""
    return Path(store) if store else Path(run_dir) / "block_inputs"


def block_dir(run_dir: Path, index: int) -> Path:
    return Path(run_dir) / "distill_block" / f"block_{index}"
