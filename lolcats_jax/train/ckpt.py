"""Orbax checkpoints of a training stage: trainable parameters, optimizer state, host-side loop state (step,
schedule, best eval, history) and the grain iterator state, saved together and atomically (Orbax writes to a
temporary directory and renames it on commit; an uncommitted step is never restored).

    <stage_dir>/checkpoints/<step>/   latest few states, for resuming
    <stage_dir>/best/<step>/          trainable parameters with the best evaluation loss

Every save is idempotent, so a re-run that replays steps after a kill never trips over what the killed run already
committed (docs/crash_consistency.md): a best step at or before the newest committed best is a replay of it and is
skipped; `save_params` replaces an earlier result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from lolcats_jax.crashpoints import crashpoint
from lolcats_jax.errors import CheckpointError


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class StageCheckpointer:
    def __init__(self, stage_dir: str | Path, max_to_keep: int = 2):
        self.dir = Path(stage_dir).absolute()
        opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True)
        self.mngr = ocp.CheckpointManager(self.dir / "checkpoints", options=opts)
        best_opts = ocp.CheckpointManagerOptions(max_to_keep=1, create=True, cleanup_tmp_directories=True)
        self.best = ocp.CheckpointManager(self.dir / "best", options=best_opts)

    # ------------------------------------------------------------------------------------------ resume state

    def latest_step(self) -> int | None:
        return self.mngr.latest_step()

    def save(self, step: int, trainable: dict, opt_state: Any, meta: dict, data_iter: Any | None) -> None:
        import grain

        items = {
            "state": ocp.args.StandardSave({"trainable": trainable, "opt": opt_state}),
            "meta": ocp.args.JsonSave(meta),
        }
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        crashpoint(f"checkpoint {self.dir.name}/{step}")
        self.mngr.save(step, args=ocp.args.Composite(**items), force=True)
        self.mngr.wait_until_finished()
        crashpoint(f"checkpoint {self.dir.name}/{step} saved")

    def restore(self, step: int, trainable: dict, opt_state: Any, shardings: tuple, data_iter: Any | None):
        """Restores (trainable, opt_state, meta) of `step` onto the given shardings; `data_iter` in place."""
        import grain

        t_shard, o_shard = shardings
        target = {"trainable": _abstract(trainable, t_shard), "opt": _abstract(opt_state, o_shard)}
        items = {"state": ocp.args.StandardRestore(target), "meta": ocp.args.JsonRestore()}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            out = self.mngr.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax raises many types; the user needs the path and the cause
            raise CheckpointError(f"{self.dir / 'checkpoints' / str(step)}: cannot restore ({type(e).__name__}: {e})") from e
        return out["state"]["trainable"], out["state"]["opt"], dict(out["meta"])

    # ------------------------------------------------------------------------------------------ best params

    def save_best(self, step: int, trainable: dict, meta: dict) -> bool:
        """Saves the best parameters of `step`; False (nothing written) when a best of this or a later step is
        already committed — a resumed run replaying its evaluations (the replay is deterministic, so the committed
        one is what it would write)."""
        latest = self.best.latest_step()
        if latest is not None and latest >= step:
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(trainable), meta=ocp.args.JsonSave(meta))
        crashpoint(f"best {self.dir.name}/{step}")
        self.best.save(step, args=args, force=True)
        self.best.wait_until_finished()
        crashpoint(f"best {self.dir.name}/{step} saved")
        return True

    def best_step(self) -> int | None:
        return self.best.latest_step()

    def restore_best(self, trainable: dict, t_shard: Any) -> tuple[dict, dict]:
        step = self.best.latest_step()
        if step is None:
            raise CheckpointError(f"{self.dir / 'best'}: no best checkpoint was saved")
        args = ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(trainable, t_shard)), meta=ocp.args.JsonRestore())
        out = self.best.restore(step, args=args)
        return out["state"], dict(out["meta"])

    def close(self) -> None:
        self.mngr.close()
        self.best.close()


def _params_manager(path: Path, create: bool) -> ocp.CheckpointManager:
    """A manager of `save_params` checkpoints with both items' handlers declared (so reading one item, or the
    metadata, does not warn about the other)."""
    return ocp.CheckpointManager(
        path, options=ocp.CheckpointManagerOptions(max_to_keep=1, create=create),
        item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
    )


def save_params(path: str | Path, params: dict, meta: dict) -> None:
    """A stage's final trainable parameters (e.g. run_dir/distill/final), atomically; replaces an earlier result (a
    re-run after a kill between this save and the stage's done marker)."""
    path = Path(path).absolute()
    mngr = _params_manager(path, create=True)
    meta = dict(meta, param_keys=sorted(params))
    if 0 in mngr.all_steps():
        crashpoint(f"replace {path.parent.name}/{path.name}")
        mngr.delete(0)
    crashpoint(f"save {path.parent.name}/{path.name}")
    mngr.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)), force=True)
    mngr.wait_until_finished()
    mngr.close()
    crashpoint(f"save {path.parent.name}/{path.name} done")


def load_params(path: str | Path, target: dict, shardings: dict | None = None) -> tuple[dict, dict]:
    """Loads parameters saved by `save_params` onto `shardings` (or the target arrays' shardings)."""
    path = Path(path).absolute()
    mngr = _params_manager(path, create=False)
    step = mngr.latest_step()
    if step is None:
        raise CheckpointError(f"{path}: no finished parameter checkpoint here")
    shardings = shardings if shardings is not None else jax.tree.map(lambda x: x.sharding, target)
    abstract = _abstract(target, shardings)
    saved = mngr.item_metadata(step)
    try:
        out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    except Exception as e:
        have = sorted(saved["state"].keys()) if saved is not None and "state" in saved else "?"
        raise CheckpointError(
            f"{path}: parameters do not match the model (expected keys {sorted(target)}; checkpoint has {have}): {e}"
        ) from e
    mngr.close()
    return out["state"], dict(out["meta"])


def saved_keys(path: str | Path) -> list[str]:
    """Names of the parameters stored by `save_params` at `path`."""
    path = Path(path).absolute()
    mngr = _params_manager(path, create=False)
    step = mngr.latest_step()
    if step is None:
        raise CheckpointError(f"{path}: no finished parameter checkpoint here")
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    mngr.close()
    if "param_keys" not in meta:
        raise CheckpointError(f"{path}: checkpoint metadata lists no parameters (not written by save_params?)")
    return list(meta["param_keys"])
