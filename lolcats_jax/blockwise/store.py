"""The on-disk store of block inputs: one bf16 zarr3 array (n, T, E) per block start and split.

Notation: n samples of a split, T tokens per sample (the distill chunk size), E hidden size, L layers, k block size.

    <store>/meta.json                          fingerprint, layout, attention config, completed-sample counts
    <store>/<split>/layer_<start>/             zarr3 array (tensorstore, file kvstore), one chunk = one sample
    <store>/progress/<split>.<lo>-<hi>.json    {"lo", "hi", "next"}: samples [lo, next) of range [lo, hi) are
                                               written (one marker per writing process, replaced after each
                                               flushed batch)

Samples of a process's range are written in order and a marker is replaced only after the batch's writes have
finished, so the union of the markers' [lo, next) is always a set of fully written samples; a restarted collect
continues at the first sample not in that union (whatever the number of processes was before). Size on disk:
2 bytes × T × E per sample and block start — 2·tokens·E·⌈L/k⌉ for a whole split.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lolcats_jax.blockwise.fingerprint import describe_difference, differences, fingerprint_id
from lolcats_jax.errors import UserError
from lolcats_jax.fsio import write_json_atomic

STORE_VERSION = 1
SPLITS = ("train", "validation")
BYTES_PER_VALUE = 2  # bfloat16


@dataclasses.dataclass(frozen=True)
class StoreLayout:
    seq_len: int  # T
    hidden: int  # E
    starts: tuple[int, ...]  # block starts (layers whose input is stored)
    samples: dict[str, int]  # split -> n

    def sample_bytes(self) -> int:
        """Bytes of one sample at one block start."""
        return BYTES_PER_VALUE * self.seq_len * self.hidden

    def total_bytes(self, samples: int | None = None) -> int:
        """Bytes of `samples` samples (default: every sample of every split) over all block starts."""
        n = sum(self.samples.values()) if samples is None else samples
        return self.sample_bytes() * len(self.starts) * n

    def to_json(self) -> dict[str, Any]:
        return {"seq_len": self.seq_len, "hidden": self.hidden, "starts": list(self.starts), "samples": dict(self.samples), "dtype": "bfloat16"}

    @staticmethod
    def from_json(d: dict[str, Any]) -> "StoreLayout":
        return StoreLayout(int(d["seq_len"]), int(d["hidden"]), tuple(int(s) for s in d["starts"]), {k: int(v) for k, v in d["samples"].items()})


def _array_spec(path: Path, shape: tuple[int, ...] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}
    if shape is not None:
        spec["metadata"] = {
            "shape": list(shape),
            "data_type": "bfloat16",
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [1, *shape[1:]]}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "."}},
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
        }
    return spec


def free_bytes(path: Path) -> int:
    """Free space of the file system that holds (or will hold) `path`."""
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def human_bytes(n: int) -> str:
    """1536 → '1.50 KiB' (binary units)."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


class BlockInputStore:
    """A collect's output directory: open for writing (`prepare`) or reading (`open`)."""

    def __init__(self, root: Path, meta: dict[str, Any]):
        self.root = Path(root)
        self.meta = meta
        self.layout = StoreLayout.from_json(meta["layout"])
        self._arrays: dict[tuple[str, int], Any] = {}

    # ------------------------------------------------------------------------------------------ opening

    @staticmethod
    def meta_path(root: Path) -> Path:
        return Path(root) / "meta.json"

    @classmethod
    def open(cls, root: Path) -> "BlockInputStore":
        path = cls.meta_path(root)
        if not path.is_file():
            raise UserError(f"{root}: no block-input store here ({path.name} missing) — run the 'collect' stage first")
        meta = json.loads(path.read_text())
        if meta.get("version") != STORE_VERSION:
            raise UserError(f"{path}: store version {meta.get('version')} is not {STORE_VERSION}; collect again into a new block.store")
        return cls(root, meta)

    @classmethod
    def prepare(cls, root: Path, fingerprint: dict, layout: StoreLayout, attention: dict, *, is_main: bool, barrier=None) -> "BlockInputStore":
        """Opens the store at `root` for writing, creating it (main process) when absent. A store written from a
        different fingerprint or with other sample counts is refused."""
        root = Path(root)
        path = cls.meta_path(root)
        if is_main and not path.is_file():
            meta = {
                "version": STORE_VERSION,
                "fingerprint": fingerprint,
                "fingerprint_id": fingerprint_id(fingerprint),
                "layout": layout.to_json(),
                "attention": attention,
                "completed": {s: 0 for s in layout.samples},
                "complete": False,
            }
            store = cls(root, meta)
            for split, n in layout.samples.items():
                for start in layout.starts:
                    store._create(split, start, (n, layout.seq_len, layout.hidden))
            write_json_atomic(path, meta)  # last: its presence means the arrays exist
        if barrier is not None:
            barrier()  # every process, whichever branch it took
        store = cls.open(root)
        store.check_matches(fingerprint, layout)
        return store

    def check_matches(self, fingerprint: dict, layout: StoreLayout) -> None:
        """Refuses (UserError) a store whose layout or fingerprint differs from what the config would write."""
        if self.layout != layout:
            raise UserError(
                f"{self.root}: the store holds {self.layout.samples} samples of {self.layout.seq_len}×{self.layout.hidden} "
                f"at layers {list(self.layout.starts)}, the config asks for {layout.samples} of {layout.seq_len}×{layout.hidden} "
                f"at {list(layout.starts)} (block.max_train_samples / max_val_samples changed?); delete it or set block.store"
            )
        diffs = differences(self.meta["fingerprint"], fingerprint)
        if diffs:
            raise UserError(
                f"{self.root}: this block-input store was collected from {describe_difference(diffs)} than the current "
                "config; delete it or set block.store to another directory"
            )

    @property
    def fingerprint_id(self) -> str:
        return self.meta["fingerprint_id"]

    def array_path(self, split: str, start: int) -> Path:
        return self.root / split / f"layer_{start:04d}"

    def _create(self, split: str, start: int, shape: tuple[int, ...]) -> None:
        import tensorstore as ts

        ts.open(_array_spec(self.array_path(split, start), shape), create=True, open=True).result()

    def array(self, split: str, start: int):
        """The tensorstore array (n, T, E) of `split` at block start `start`."""
        import tensorstore as ts

        if start not in self.layout.starts:
            raise UserError(f"{self.root}: no stored inputs for layer {start} (stored block starts: {list(self.layout.starts)})")
        key = (split, start)
        if key not in self._arrays:
            self._arrays[key] = ts.open(_array_spec(self.array_path(split, start)), open=True).result()
        return self._arrays[key]

    # ------------------------------------------------------------------------------------------ writing

    def write(self, split: str, first: int, rows: dict[int, np.ndarray]) -> None:
        """Writes samples [first, first + b) of `split` for every block start in `rows` ({start: (b, T, E)}) and
        waits until they are on disk."""
        futures = []
        for start, x in rows.items():
            futures.append(self.array(split, start)[first : first + x.shape[0]].write(x))
        for f in futures:
            f.result()

    def _marker(self, split: str, lo: int, hi: int) -> Path:
        return self.root / "progress" / f"{split}.{lo}-{hi}.json"

    def mark(self, split: str, lo: int, hi: int, next_sample: int) -> None:
        """Records that samples [lo, next_sample) of range [lo, hi) are written."""
        write_json_atomic(self._marker(split, lo, hi), {"lo": lo, "hi": hi, "next": next_sample})

    def written_intervals(self, split: str) -> list[tuple[int, int]]:
        out = []
        for p in sorted((self.root / "progress").glob(f"{split}.*.json")):
            try:
                m = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError):
                continue  # a marker being replaced; the previous content is covered by the others or rewritten
            out.append((int(m["lo"]), int(m["next"])))
        return out

    def first_unwritten(self, split: str, lo: int, hi: int) -> int:
        """The first sample of [lo, hi) that is not known to be written (hi when all are)."""
        intervals = self.written_intervals(split)
        pos, moved = lo, True
        while moved and pos < hi:
            moved = False
            for a, b in intervals:
                if a <= pos < b:
                    pos, moved = b, True
        return min(pos, hi)

    def completed(self, split: str) -> int:
        """How many samples of `split` are written."""
        n = self.layout.samples[split]
        covered = np.zeros(n, bool)
        for a, b in self.written_intervals(split):
            covered[max(a, 0) : min(b, n)] = True
        return int(covered.sum())

    def refresh_meta(self) -> dict[str, int]:
        """Updates the completed-sample counts (and `complete`) in meta.json; returns the counts."""
        counts = {s: self.completed(s) for s in self.layout.samples}
        self.meta["completed"] = counts
        self.meta["complete"] = all(counts[s] == n for s, n in self.layout.samples.items())
        write_json_atomic(self.meta_path(self.root), self.meta)
        return counts

    # ------------------------------------------------------------------------------------------ reading

    def check_complete(self) -> None:
        missing = {s: n - self.completed(s) for s, n in self.layout.samples.items() if self.completed(s) < n}
        if missing:
            raise UserError(f"{self.root}: the collect is unfinished ({missing} samples missing) — run the 'collect' stage again to complete it")

    def source(self, split: str, start: int, limit: int | None = None) -> "BlockInputSource":
        return BlockInputSource(self, split, start, limit)


class BlockInputSource(Sequence):
    """Random access to one split's stored inputs at one block start; element i is {"hidden": bf16 (T, E)}."""

    def __init__(self, store: BlockInputStore, split: str, start: int, limit: int | None = None):
        self.store, self.split, self.start = store, split, start
        n = store.layout.samples[split]
        self.n = n if limit is None else min(n, limit)
        store.array(split, start)  # fail early when absent

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:  # type: ignore[override]
        if not 0 <= index < self.n:
            raise IndexError(f"sample {index} out of range 0..{self.n - 1} ({self.store.array_path(self.split, self.start)})")
        return {"hidden": np.asarray(self.store.array(self.split, self.start)[index].read().result())}
