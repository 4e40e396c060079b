"""Where benchmark tables go: `FILE.md` (the printed table) and `FILE.json` (every figure) side by side, each
written atomically."""

from __future__ import annotations

import json

import numpy as np

from lolcats_jax.fsio import write_text_atomic


def write_table(result: dict, markdown: str, out: str) -> None:
    """`markdown` to `out` (a .md path, or any stem) and `result` as JSON beside it (NaN → null)."""
    stem = out[:-3] if out.endswith(".md") else out
    text = json.dumps(result, indent=1, default=lambda x: None if isinstance(x, float) and np.isnan(x) else x)
    for suffix, body in ((".md", markdown), (".json", text)):
        write_text_atomic(stem + suffix, body)
