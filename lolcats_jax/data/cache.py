"""On-disk cache of packed chunks, so re-runs and resumed runs skip tokenisation.

Each entry is a folder ``<cache_dir>/<key>/`` with ``input_ids.npy``, ``labels.npy`` (int32, [n, l]) and
``meta.json``. The key is a fingerprint of everything the arrays depend on: the files (path, size, mtime),
their order, the format, template and chunk size, the tokenizer (its serialized vocabulary/merges, special
tokens and chat template) and :data:`PACKING_VERSION`. Entries are written into a temporary folder and
renamed into place, so a reader never sees a half-written entry and concurrent writers (several hosts) are
safe: the first rename wins, the others discard their copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

PACKING_VERSION = 1  # bump when tokenisation or packing rules change
_ARRAYS = ("input_ids", "labels")


def default_cache_dir() -> Path:
    """``$LOLCATS_DATA_CACHE``, else ``$XDG_CACHE_HOME/lolcats_jax/packed`` (``~/.cache`` by default)."""
    if os.environ.get("LOLCATS_DATA_CACHE"):
        return Path(os.environ["LOLCATS_DATA_CACHE"])
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return root / "lolcats_jax" / "packed"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash identifying a tokenizer's behaviour (vocabulary, merges, normaliser, specials, chat template)."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__qualname__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # slow or custom tokenizers: the vocabulary, when exposed
        get_vocab = getattr(tokenizer, "get_vocab", None)
        if callable(get_vocab):
            h.update(json.dumps(sorted(get_vocab().items())).encode())
    for attr in ("name_or_path", "bos_token", "eos_token", "chat_template"):
        h.update(f"{attr}={getattr(tokenizer, attr, None)!r};".encode())
    return h.hexdigest()


def cache_key(files: list[Path], *, fmt: str, template: str, chunk_size: int, tokenizer: Any) -> str:
    """The fingerprint of a packed dataset (hex, 24 characters)."""
    parts: dict[str, Any] = {
        "version": PACKING_VERSION,
        "format": fmt,
        "template": template,
        "chunk_size": chunk_size,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "files": [],
    }
    for path in files:
        stat = Path(path).stat()
        parts["files"].append([str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns])
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def load_packed(cache_dir: Path, key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached ``(input_ids_nxl, labels_nxl)`` (memory-mapped, read-only), or ``None`` when absent."""
    entry = Path(cache_dir) / key
    if not all((entry / f"{name}.npy").is_file() for name in _ARRAYS):
        return None
    try:
        ids, labels = (np.load(entry / f"{name}.npy", mmap_mode="r") for name in _ARRAYS)
    except (OSError, ValueError):  # unreadable entry: treat as a miss, it will be rewritten
        return None
    if ids.shape != labels.shape or ids.ndim != 2:
        return None
    return ids, labels


def save_packed(cache_dir: Path, key: str, ids_nxl: np.ndarray, labels_nxl: np.ndarray, meta: dict[str, Any]) -> Path:
    """Write an entry atomically (temp folder + rename); returns its folder."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / key
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=cache_dir))
    try:
        for name, array in zip(_ARRAYS, (ids_nxl, labels_nxl), strict=True):
            np.save(tmp / f"{name}.npy", np.asarray(array, dtype=np.int32))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        if final.exists():
            if load_packed(cache_dir, key) is not None:
                return final  # another process wrote the same entry meanwhile
            shutil.rmtree(final, ignore_errors=True)  # a stale, unreadable entry
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
        # another process renamed its identical copy first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
