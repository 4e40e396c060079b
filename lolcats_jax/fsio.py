"""Atomic file and directory writes (docs/crash_consistency.md): everything a run directory holds is written to a
temporary sibling and renamed into place, so a reader — or a re-run after a kill — sees either the old state or
the complete new one, never a half-written file or directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

from lolcats_jax.crashpoints import crashpoint

STAGING_MARK = ".staging-"


def fsync_dir(path: Path) -> None:
    """fsync a directory (its entries: renames into it); best effort where the file system refuses."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path` (same suffix, for writers that look at it); on success the file is
    fsynced and renamed to `path`; on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        crashpoint(f"write {_stable_name(path.parent)}/{path.name}")
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def copy_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def _stable_name(directory: Path) -> str:
    """The directory's name with a staging suffix removed (`.hf.staging-1a2b3c4d` → `hf`): crash-point names must
    be the same in every run."""
    name = directory.name
    if name.startswith(".") and STAGING_MARK in name:
        return name[1:name.index(STAGING_MARK)]
    return name


def staging_dir(final: str | os.PathLike) -> Path:
    """A new, empty sibling of `final` to build a directory in before `commit_dir` renames it into place."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f".{final.name}{STAGING_MARK}{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    return staging


def commit_dir(staging: Path, final: str | os.PathLike) -> Path:
    """Replaces `final` (if any) by the complete directory `staging`. A kill at any moment leaves either the old
    `final`, no `final` (the old one removed, the new one still under its staging name) or the new one."""
    final = Path(final)
    fsync_dir(staging)
    crashpoint(f"commit {final.parent.name}/{final.name}")
    remove_dir(final)
    os.replace(staging, final)
    fsync_dir(final.parent)
    return final


def remove_dir(path: str | os.PathLike) -> None:
    """Removes a directory at once as far as readers see: renamed to a hidden sibling first, then deleted."""
    path = Path(path)
    if not path.exists():
        return
    retired = path.with_name(f".{path.name}.retired-{uuid.uuid4().hex[:8]}")
    os.replace(path, retired)
    crashpoint(f"retire {path.parent.name}/{path.name}")
    shutil.rmtree(retired, ignore_errors=True)


def remove_stale(final: str | os.PathLike) -> None:
    """Removes what an interrupted `staging_dir`/`commit_dir` or `atomic_path` of `final` left beside it."""
    final = Path(final)
    if not final.parent.is_dir():
        return
    for p in final.parent.glob(f".{final.name}{STAGING_MARK}*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in final.parent.glob(f".{final.name}.retired-*"):
        shutil.rmtree(p, ignore_errors=True)
