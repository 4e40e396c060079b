"""What the user sees of a training stage: a progress bar, one line per evaluation, metrics.jsonl, TensorBoard
events and loss-curve PNGs."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from lolcats_jax.fsio import atomic_path


class MetricsWriter:
    def __init__(self, run_dir: str | Path, stage: str, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.stage = stage
        self.enabled = enabled
        self._tb = None
        if enabled:
            _end_partial_line(self.run_dir / "metrics.jsonl")
            try:
                SummaryWriter = _tensorboardx_writer()
                self._tb = SummaryWriter(str(self.run_dir / "tensorboard" / stage))
            except Exception as e:  # pragma: no cover - tensorboardX is a dependency
                print(f"[{stage}] TensorBoard disabled: {e}", file=sys.stderr)

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: _scalar(v) for k, v in values.items() if _scalar(v) is not None}
        rec = {"stage": self.stage, "kind": kind, "step": int(step), "time": time.time(), **clean}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")  # one write of one line: a kill leaves at most a partial last line
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(f"{self.stage}/{kind}/{k}", v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def _tensorboardx_writer():
    """tensorboardX's SummaryWriter, imported without torch unless torch is already loaded: tensorboardX only
    probes for it (to accept torch tensors, which this project never logs), and the probe costs ~4 s per process."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError during the import
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def _end_partial_line(path: Path) -> None:
    """Terminates a record a killed run left half-written, so the next record starts on its own line."""
    try:
        with open(path, "rb+") as f:
            f.seek(0, 2)
            if f.tell() and (f.seek(-1, 2), f.read(1))[1] != b"\n":
                f.write(b"\n")
    except FileNotFoundError:
        pass


def _scalar(v: Any) -> float | None:
    arr = np.asarray(v)
    if arr.size != 1:
        return None
    return float(arr.reshape(()))


def read_metrics(run_dir: str | Path, stage: str | None = None, kind: str | None = None) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # the partial record of a killed run
        if (stage is None or rec["stage"] == stage) and (kind is None or rec["kind"] == kind):
            out.append(rec)
    return out


def plot_losses(run_dir: str | Path, stage: str) -> Path | None:
    """<run_dir>/plots/<stage>_loss.png with the train loss per step and the eval losses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = read_metrics(run_dir, stage, "train")
    evals = read_metrics(run_dir, stage, "eval")
    if not train and not evals:
        return None
    # a resumed run re-logs steps after its last checkpoint: keep the last record of each step
    train = list({r["step"]: r for r in train}.values())
    evals = list({r["step"]: r for r in evals}.values())
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label="train")
    if evals:
        ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="eval")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    if all(r.get("loss", 1) > 0 for r in train + evals):
        ax.set_yscale("log")
    ax.set_title(f"{stage} loss")
    ax.legend()
    fig.tight_layout()
    out = Path(run_dir) / "plots" / f"{stage}_loss.png"
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return out


def fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
