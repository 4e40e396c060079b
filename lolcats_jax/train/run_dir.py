"""The run directory's record of its config (`<run.dir>/config.yaml`) and the guard that keeps it true.

A re-run may change what does not shape any result (paths, the stage list, evaluation and logging settings, the
mesh, the process layout); a change of anything a finished or checkpointed stage was computed with is refused
before the directory is touched, naming the keys, unless `--force-config` is given. The saved config holds
absolute paths, so inference and export on the directory work from any working directory.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lolcats_jax.config import Config, ConfigError, absolute_paths, dump_config, load_config, to_dict

# keys whose change never invalidates a result ("*" matches any first component)
FREE_KEYS = (
    "run.dir", "run.stages", "run.coordinator", "run.num_processes", "run.process_id",
    "model.path", "model.checkpoint", "model.architecture", "model.remat",
    "attention.backend", "mesh", "evaluate", "generate",
    "*.log_every", "*.checkpoint_every", "*.snapshot_every", "*.data.train", "*.data.validation", "*.data.tokenizer",
    "block.index", "block.store", "block.ignore_disk_check", "block.collect_batch_size",
)
# key prefix → the stages whose results depend on it (anything not listed here or in FREE_KEYS: every stage)
DEPENDS = {
    "distill": ("collect", "distill", "distill_block", "stitch", "finetune", "evaluate", "export"),
    "finetune": ("finetune", "evaluate", "export"),
    "block": ("collect", "distill_block", "stitch", "finetune", "evaluate", "export"),
}
STAGE_DIRS = ("collect", "distill", "distill_block", "stitch", "finetune", "evaluate", "export")


def _matches(key: str, pattern: str) -> bool:
    k, p = key.split("."), pattern.split(".")
    return len(k) >= len(p) and all(pp in ("*", kk) for kk, pp in zip(k, p))


def changed_keys(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old, new) for every leaf that differs between two config dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += changed_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [(prefix.rstrip("."), a, b)]


def stages_with_state(run_dir: Path) -> list[str]:
    """Stages that have written anything (a checkpoint, a result, a done marker) into the run directory."""
    return [s for s in STAGE_DIRS if (run_dir / s).is_dir() and any((run_dir / s).iterdir())]


def blocking_changes(old: Config, new: Config, run_dir: Path) -> tuple[list[tuple[str, Any, Any]], list[str]]:
    """The changes that would contradict results already in `run_dir`, and the stages holding those results."""
    have = set(stages_with_state(run_dir))
    bad, hit = [], set()
    for key, a, b in changed_keys(to_dict(absolute_paths(old)), to_dict(new)):
        if any(_matches(key, p) for p in FREE_KEYS):
            continue
        section = key.split(".")[0]
        affected = have & set(DEPENDS.get(section, STAGE_DIRS))
        if affected:
            bad.append((key, a, b))
            hit |= affected
    return bad, [s for s in STAGE_DIRS if s in hit]


def prepare_run_dir(cfg: Config, *, is_main: bool, force_config: bool = False) -> tuple[Path, Config]:
    """Checks `cfg` against the run directory's record, then creates the directory and records the config
    (absolute paths). Returns the directory and the config with absolute paths."""
    cfg = absolute_paths(cfg)
    run_dir = Path(cfg.run.dir)
    saved = run_dir / "config.yaml"
    if saved.is_file():
        try:
            previous = load_config(saved)
        except ConfigError as e:
            raise ConfigError(f"{saved}: the run directory's config record is unreadable ({e}); use a new run.dir") from None
        bad, stages = blocking_changes(previous, cfg, run_dir)
        if bad:
            what = ", ".join(f"{k} ({a!r} → {b!r})" for k, a, b in bad)
            if not force_config:
                raise ConfigError(
                    f"{saved}: this run directory's {', '.join(stages)} results were made with another config; "
                    f"changed: {what}. Use a new run.dir, or --force-config to record the new config anyway "
                    "(results already there are kept as they are)"
                )
            print(f"[run] warning: --force-config: recording a config that differs from the one {', '.join(stages)} "
                  f"used in {what}", file=sys.stderr)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if is_main:
            dump_config(cfg, saved)
    except OSError as e:
        raise ConfigError(f"run.dir={run_dir}: cannot write there ({e.strerror or e})") from None
    return run_dir, cfg
