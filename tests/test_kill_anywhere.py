"""Kill anywhere, re-run, same result (docs/crash_consistency.md).

A tiny run is SIGKILLed once at every distinct crash point it reaches (`lolcats_jax/crashpoints.py`: before and
after every checkpoint, best and final save, every atomic file write, the export's directory commit), re-run with
the same command after each kill until it finishes; its results must be bit-identical to an uninterrupted run:
the joint recipe (distill with `eval_every` not a multiple of `checkpoint_every`, finetune with equal intervals,
export) and the block-wise stages (collect, distill_block, stitch).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.train_fixtures import tiny_overrides, write_tiny_data, write_tiny_model

REPO = Path(__file__).resolve().parent.parent
KILLED = -9  # a subprocess's return code after SIGKILL


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_dir):
    from lolcats_jax.assets import shakespeare_dir

    root = tmp_path_factory.mktemp("kill_anywhere")
    return write_tiny_model(root / "model", smollm2_dir), write_tiny_data(root / "data", shakespeare_dir()), root


def _env(root: Path, **extra) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               # the many re-runs share compiled programs (the same executables: results are unaffected)
               JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    for k in ("XLA_FLAGS", "LOLCATS_CRASH_LOG", "LOLCATS_CRASH_SKIP"):
        env.pop(k, None)
    env.update(extra)
    return env


def _cmd(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "lolcats_jax.train", "--config", str(REPO / "configs" / "smollm2_demo.yaml"), *overrides]


def _points(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _reference(root: Path, overrides: list[str]) -> list[str]:
    """Runs uninterrupted, returning the crash points it passed."""
    log = root / "reference_points.txt"
    res = subprocess.run(_cmd(overrides), env=_env(root, LOLCATS_CRASH_LOG=str(log)), cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    return _points(log)


def _kill_chain(root: Path, overrides: list[str], max_runs: int) -> list[str]:
    """Re-runs the command, each run killed at the first crash point no earlier run was killed at, until one
    finishes; returns the points killed at, in order."""
    skip = root / "killed_points.txt"
    for _ in range(max_runs):
        res = subprocess.run(_cmd(overrides), env=_env(root, LOLCATS_CRASH_SKIP=str(skip)), cwd=REPO, capture_output=True, text=True)
        if res.returncode == 0:
            return _points(skip)
        assert res.returncode == KILLED, f"a re-run failed instead of completing (exit {res.returncode}) after kills at " \
                                         f"{_points(skip)}:\n{res.stderr[-3000:]}"
    pytest.fail(f"no run finished after {max_runs} runs; killed at {_points(skip)}")


def _final_params(run_dir: Path, stage: str) -> dict[str, np.ndarray]:
    import orbax.checkpoint as ocp

    mngr = ocp.CheckpointManager((run_dir / stage / "final").absolute())
    out = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return {k: np.asarray(v) for k, v in out["state"].items()}


def _assert_same_params(ref_dir: Path, run_dir: Path, stage: str) -> None:
    ref, got = _final_params(ref_dir, stage), _final_params(run_dir, stage)
    assert ref.keys() == got.keys()
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=f"{stage}: {k}")


def _digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def _check_killed_everywhere(reference: list[str], killed: list[str]) -> None:
    assert len(killed) == len(set(killed)), "a point was killed at twice"
    missed = sorted(set(reference) - set(killed))
    assert not missed, f"crash points of the uninterrupted run never killed at: {missed}"


@pytest.mark.slow
@pytest.mark.multiprocess
def test_joint_recipe_killed_at_every_point(tiny):
    model_dir, data_dir, root = tiny
    base = ["run.stages=[distill,finetune,export]",
            "distill.max_steps=4", "distill.eval_every=3", "distill.checkpoint_every=2",  # misaligned intervals
            "finetune.max_steps=2", "finetune.eval_every=2", "finetune.checkpoint_every=2"]  # aligned
    ref_dir, run_dir = root / "joint_ref" / "run", root / "joint_killed" / "run"  # same name: same point names
    (root / "joint").mkdir()
    reference = _reference(root / "joint", tiny_overrides(model_dir, data_dir, ref_dir) + base)
    assert {"best distill/3", "checkpoint distill/4", "best finetune/2", "save finetune/final", "commit export/hf"} <= set(reference)
    killed = _kill_chain(root / "joint", tiny_overrides(model_dir, data_dir, run_dir) + base, max_runs=len(reference) + 12)
    _check_killed_everywhere(reference, killed)
    # resumed runs reach points an uninterrupted one never does: replacing a final result, replaying a best
    assert any(p.startswith("replace ") for p in killed), killed
    _assert_same_params(ref_dir, run_dir, "distill")
    _assert_same_params(ref_dir, run_dir, "finetune")
    assert _digests(run_dir / "export" / "hf") == _digests(ref_dir / "export" / "hf")
    assert not list((run_dir / "export").glob(".hf.*")), "a staging or retired export directory was left behind"
    for stage in ("distill", "finetune", "export"):
        assert json.loads((run_dir / stage / "done.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()[:1] == "{"]
    assert {(r["stage"], r["kind"], r["step"]) for r in records if r["kind"] == "eval"} >= {("distill", "eval", 3), ("finetune", "eval", 2)}
    print(f"\njoint recipe: killed at {len(killed)} of {len(killed)} points, each re-run completed; "
          f"{len(reference)} points in an uninterrupted run")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_blockwise_stages_killed_at_every_point(tiny):
    model_dir, data_dir, root = tiny
    base = ["run.stages=[collect,distill_block,stitch]", "block.size=2", "block.max_train_samples=4",
            "block.max_val_samples=2", "distill.max_steps=3", "distill.eval_every=2", "distill.checkpoint_every=3",
            "distill.eval_batches=1", "attention.softmax_layers=[1]"]
    ref_dir, run_dir = root / "block_ref" / "run", root / "block_killed" / "run"
    (root / "block").mkdir()
    reference = _reference(root / "block", tiny_overrides(model_dir, data_dir, ref_dir) + base)
    assert {"best block_0/2", "checkpoint block_1/3", "save stitch/final"} <= set(reference), reference
    killed = _kill_chain(root / "block", tiny_overrides(model_dir, data_dir, run_dir) + base, max_runs=len(reference) + 12)
    _check_killed_everywhere(reference, killed)
    _assert_same_params(ref_dir, run_dir, "stitch")
    print(f"\nblock-wise: killed at {len(killed)} of {len(killed)} points, each re-run completed; "
          f"{len(reference)} points in an uninterrupted run")
