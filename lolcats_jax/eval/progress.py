"""What the `evaluate` stage has already measured, on disk, so that a killed or interrupted stage resumes.

Every measurement of one model (held-out perplexity, attention MSE, one benchmark task) is written, once done, to
`<run.dir>/evaluate/parts/<model key>.<item>.json` (atomically, by the main process) with a fingerprint of what
it depends on: the model (base weights path, attention and LoRA settings, the `done.json` of the stages whose
parameters it loads) and the item's own settings (task and size, perplexity files and token cap, ...). A re-run
reuses a part whose fingerprint matches and measures the rest; a model whose parts all match is not even loaded.
Retraining a stage rewrites its `done.json`, so every part of the models built on it is measured again.

Every process reads the parts before any of them measures anything (a barrier when there are several), so all
processes take the same decisions and run the same collectives.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from lolcats_jax.distributed import barrier
from lolcats_jax.fsio import write_json_atomic


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]


class EvalProgress:
    """The finished parts of one evaluate stage; `get` returns a part's result when its fingerprint matches."""

    def __init__(self, stage_dir: Path, is_main: bool, process_count: int = 1):
        self.dir = stage_dir / "parts"
        self.is_main = is_main
        self._parts: dict[str, dict] = {}
        if self.dir.is_dir():
            for p in sorted(self.dir.glob("*.json")):
                try:
                    self._parts[p.stem] = json.loads(p.read_text())
                except (OSError, ValueError):  # unreadable: measured again (writes are atomic, so not expected)
                    continue
        if process_count > 1:
            barrier("evaluate: parts read")

    def get(self, model_key: str, item: str, fp: str) -> Any | None:
        part = self._parts.get(f"{model_key}.{item}")
        return part["result"] if part is not None and part.get("fingerprint") == fp else None

    def put(self, model_key: str, item: str, fp: str, result: Any) -> None:
        self._parts[f"{model_key}.{item}"] = {"fingerprint": fp, "result": result}
        if self.is_main:
            write_json_atomic(self.dir / f"{model_key}.{item}.json", {"fingerprint": fp, "result": result})
