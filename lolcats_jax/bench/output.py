"""Where benchmark tables go: `FILE.md` (the printed table) and `FILE.json` (every figure) side by side, each
written atomically."""

from __future__ import annotations

import json
import os

import numpy as np


def write_table(result: dict, markdown: str, out: str) -> None:
    """`markdown` to `out` (a .md path, or any stem) and `result` as JSON beside it (NaN → null)."""
    stem = out[:-3] if out.endswith(".md") else out
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    text = json.dumps(result, indent=1, default=lambda x: None if isinstance(x, float) and np.isnan(x) else x)
    for suffix, body in ((".md", markdown), (".json", text)):
        tmp = f"{stem}{suffix}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(body)
        os.replace(tmp, stem + suffix)
