"""Reading raw training data: Alpaca instruction records and plain-text documents.

Supported files (the reader is chosen by the file name; the record kind by the configured format):

* ``*.json``  — a JSON list of objects (Alpaca: ``instruction``, optional ``input``, ``output``;
  text: ``text``).
* ``*.jsonl`` — one JSON object per line, same fields; blank lines are skipped.
* ``*.txt``   — plain text, **one document per file**. Splitting on blank lines would cut plays, poems and
  dialogue into many tiny "documents", each with its own BOS/EOS; to feed several documents, use several
  files or a JSONL file with one ``text`` record per document.
* ``*.arrow`` — Hugging Face ``save_to_disk`` shards (``data-*.arrow`` IPC streams) with a ``text`` column
  or the Alpaca columns. A directory given for the ``arrow`` format means the ``data-*.arrow`` files directly
  inside it (point at one split's folder, e.g. ``my_ds/train``).

Paths may be files, directories (their supported files, recursively, sorted) or glob patterns. Every problem
raises :class:`~lolcats_jax.errors.DataError` naming the file (and line or record) and what was expected.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lolcats_jax.errors import DataError

FORMATS = ("alpaca", "text", "arrow")
_EXTENSIONS = {
    "alpaca": (".json", ".jsonl", ".arrow"),
    "text": (".txt", ".json", ".jsonl", ".arrow"),
    "arrow": (".arrow",),
}
_ALPACA_FIELDS = ("instruction", "input", "output")


@dataclasses.dataclass(frozen=True)
class AlpacaRecord:
    """One instruction-following example; ``input`` is ``""`` when the record has none."""

    instruction: str
    input: str
    output: str


Record = AlpacaRecord | str  # a text document is a plain string


def resolve_paths(
    specs: Sequence[str | os.PathLike], fmt: str, base_dir: str | os.PathLike | None = None
) -> list[Path]:
    """Expand files, directories and globs into a sorted, de-duplicated list of data files.

    Relative specs are taken relative to ``base_dir`` (default: the working directory).
    """
    _check_format(fmt)
    if not specs:
        raise DataError(f"no data files configured for format {fmt!r} (expected a list of files, directories or globs)")
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    out: list[Path] = []
    for spec in specs:
        path = Path(spec).expanduser()
        path = path if path.is_absolute() else base / path
        if glob.has_magic(str(path)):
            matches = [Path(m) for m in sorted(glob.glob(str(path), recursive=True)) if Path(m).is_file()]
            if not matches:
                raise DataError(f"{spec}: no files match this pattern (looked under {base})")
            out.extend(matches)
        elif path.is_dir():
            out.extend(_files_in_dir(path, fmt))
        elif path.is_file():
            out.append(path)
        else:
            raise DataError(f"{path}: data file not found (expected a file, a directory or a glob)")
    seen: set[Path] = set()
    unique = [p for p in out if not (p in seen or seen.add(p))]
    for path in unique:
        if not _supported(path, fmt):
            expected = ", ".join(_EXTENSIONS[fmt])
            raise DataError(f"{path}: unsupported file type for format {fmt!r} (expected one of {expected})")
    return unique


def load_records(files: Sequence[Path], fmt: str) -> list[Record]:
    """All records of ``files`` in order: :class:`AlpacaRecord` for ``alpaca``, ``str`` for ``text``.

    For the ``arrow`` format the kind follows each file's columns (``text`` → documents, else Alpaca).
    Whitespace-only text documents are skipped. Raises ``DataError`` when nothing is left.
    """
    _check_format(fmt)
    records: list[Record] = []
    for path in files:
        records.extend(_read_file(Path(path), fmt))
    if not records:
        names = ", ".join(str(f) for f in files) or "(no files)"
        expects = {"alpaca": "JSON/JSONL records with instruction/input/output fields",
                   "text": "non-blank .txt files or JSONL records with a 'text' field",
                   "arrow": "Arrow tables with a 'text' column or Alpaca columns"}[fmt]
        raise DataError(f"{names}: no records (data.format={fmt!r} expects {expects})")
    kinds = {type(r) for r in records}
    if len(kinds) > 1:
        raise DataError(f"{', '.join(map(str, files))}: mixes text documents and Alpaca records (expected one kind)")
    return records


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise DataError(f"data.format: unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")


def _supported(path: Path, fmt: str) -> bool:
    return path.name.endswith(_EXTENSIONS[fmt])


def _files_in_dir(path: Path, fmt: str) -> list[Path]:
    if fmt == "arrow":
        files = sorted(path.glob("data-*.arrow"))
        expected = "data-*.arrow shards (a save_to_disk split folder)"
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and _supported(p, fmt))
        expected = f"{', '.join(_EXTENSIONS[fmt])} files"
    if not files:
        raise DataError(f"{path}: directory holds no {expected}")
    return files


def _read_file(path: Path, fmt: str) -> list[Record]:
    if path.name.endswith(".arrow"):
        return [r for r in _records_from_rows(_arrow_rows(path), path, fmt) if not _blank(r)]
    if path.suffix == ".txt":
        text = _read_text(path)
        return [] if not text.strip() else [text]
    if path.suffix == ".jsonl":
        rows = _jsonl_rows(path)
    else:
        rows = _json_rows(path)
    return [r for r in _records_from_rows(rows, path, fmt) if not _blank(r)]


def _blank(record: Record) -> bool:
    return isinstance(record, str) and not record.strip()


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}); expected a UTF-8 encoded file") from err
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from err


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"line {number}", json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}: invalid JSON at line {number} ({err.msg}); expected one JSON object per line"
            ) from err


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}: invalid JSON at line {err.lineno} ({err.msg}); expected a JSON list of objects"
        ) from err
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    for index, row in enumerate(data):
        yield f"record {index}", row


def _arrow_rows(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow as pa
    except ImportError as err:  # pragma: no cover - pyarrow is pinned in requirements/lock.txt
        raise DataError(f"{path}: reading .arrow files needs pyarrow (pip install -r requirements/lock.txt)") from err
    try:
        with pa.OSFile(str(path), "rb") as source:
            table = pa.ipc.open_stream(source).read_all()
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{path}: not an Arrow IPC stream ({err}); expected a save_to_disk data-*.arrow shard") from err
    for index, row in enumerate(table.to_pylist()):
        yield f"row {index}", row


def _records_from_rows(rows: Iterator[tuple[str, Any]], path: Path, fmt: str) -> Iterator[Record]:
    kind = None if fmt == "arrow" else fmt
    for where, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{path}: {where}: expected a JSON object, got {type(row).__name__}")
        if kind is None:  # arrow: decided by the first row's columns
            kind = "text" if "text" in row else "alpaca"
        yield _text_record(row, path, where) if kind == "text" else _alpaca_record(row, path, where)


def _field(row: dict, name: str, path: Path, where: str, required: bool) -> str:
    value = row.get(name)
    if value is None:
        if required:
            have = ", ".join(sorted(map(str, row))) or "none"
            raise DataError(f"{path}: {where}: missing field {name!r} (fields present: {have})")
        return ""
    if not isinstance(value, str):
        raise DataError(f"{path}: {where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def _alpaca_record(row: dict, path: Path, where: str) -> AlpacaRecord:
    instruction, input_, output = (
        _field(row, name, path, where, required=name != "input") for name in _ALPACA_FIELDS
    )
    return AlpacaRecord(instruction=instruction, input=input_, output=output)


def _text_record(row: dict, path: Path, where: str) -> str:
    return _field(row, "text", path, where, required=True)
