"""The training loop shared by every stage: resumable, evaluated, checkpointed, logged.

Resuming: the latest committed checkpoint restores trainable parameters, optimizer state, the data iterator and
the host-side loop state (plateau scheduler, best eval, step), so an interrupted stage ends with exactly the
parameters of an uninterrupted run. The host never waits on the device every step: a step's metrics are read
after the next step has been dispatched (except at evaluation/checkpoint steps).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from lolcats_jax.config import OptimizerConfig
from lolcats_jax.errors import UserError
from lolcats_jax.train.ckpt import StageCheckpointer, save_params
from lolcats_jax.train.metrics import MetricsWriter, fmt_eta, plot_losses
from lolcats_jax.train.optim import PlateauState, learning_rate, make_optimizer
from lolcats_jax.train.step import LossFn, Split, batch_sharding, build_steps, count_params


class NonFiniteLossError(UserError):
    pass


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    max_steps: int
    eval_every: int
    checkpoint_every: int
    log_every: int
    grad_accum: int
    batch_size: int  # per optimizer micro-step, global
    eval_batches: int | None
    optim: OptimizerConfig
    snapshot_every: int | None = None  # keep the trainable parameters of every N-th step (quality-vs-tokens curves)
    seed: int = 0  # step s draws its dropout masks from fold_in(PRNGKey(seed), s): the same after a resume


@dataclasses.dataclass
class LoopResult:
    trainable: dict
    steps: int
    initial_eval: float | None
    best_eval: float | None
    final_eval: float | None
    tokens_per_s: float
    trainable_params: int
    resumed_from: int | None


BATCH_KEYS = ("input_ids", "labels", "hidden")  # "hidden": (…, T, E) block inputs of the block-wise stage


def to_global_batch(batch: dict[str, np.ndarray], mesh, accumulate: int | None = None) -> dict[str, jax.Array]:
    """This process's rows of a batch as global arrays sharded by `batch_sharding`; with `accumulate=A` the rows are
    reshaped to (A, B, ...) micro-batches."""
    arrays = {k: np.asarray(batch[k]) for k in BATCH_KEYS if k in batch}
    if accumulate is not None:
        arrays = {k: x.reshape(accumulate, -1, *x.shape[1:]) for k, x in arrays.items()}
    rows = next(iter(arrays.values())).shape[0 if accumulate is None else 1]  # this process's sequences
    sharding = batch_sharding(mesh, accumulate is not None, rows * jax.process_count())
    return {k: jax.make_array_from_process_local_data(sharding, x) for k, x in arrays.items()}


def evaluate_loss(evaluate, trainable, frozen, val_batches: Callable[[], Iterable[dict]], mesh, max_batches: int | None) -> dict:
    sums: dict[str, float] = {}
    n = 0
    for i, batch in enumerate(val_batches()):
        if max_batches is not None and i >= max_batches:
            break
        metrics = evaluate(trainable, frozen, to_global_batch(batch, mesh))
        for k, v in jax.device_get(metrics).items():
            if np.asarray(v).size == 1:
                sums[k] = sums.get(k, 0.0) + float(np.asarray(v).reshape(()))  # (1,) per-layer metrics too
        n += 1
    if n == 0:
        raise UserError("the validation split produced no batch (too little validation data for one batch?)")
    return {k: v / n for k, v in sums.items()}


def train_loop(
    *,
    name: str,
    split: Split,
    loss_fn: LossFn,
    mesh,
    cfg: LoopConfig,
    train_iter: Iterator[dict],
    val_batches: Callable[[], Iterable[dict]],
    stage_dir: Path,
    run_dir: Path,
    tokens_per_batch: int,
    is_main: bool = True,
) -> LoopResult:
    tx = make_optimizer(cfg.optim)
    init_opt, train, evaluate, (t_shard, o_shard, _) = build_steps(split, tx, loss_fn, mesh)
    ckpt = StageCheckpointer(stage_dir)
    writer = MetricsWriter(run_dir, name, enabled=is_main)
    trainable = jax.device_put(split.trainable, t_shard)
    opt_state = init_opt(trainable)
    plateau = PlateauState()
    meta: dict[str, Any] = {"best_eval": None, "initial_eval": None, "last_eval": None}
    n_params = count_params(trainable)
    start = ckpt.latest_step()
    resumed_from = start
    if start is not None:
        trainable, opt_state, meta = ckpt.restore(start, trainable, opt_state, (t_shard, o_shard), train_iter)
        plateau = PlateauState(**meta["plateau"])
        _log(is_main, f"[{name}] resuming from step {start} ({ckpt.dir / 'checkpoints'})")
    else:
        start = 0
        _log(is_main, f"[{name}] {n_params:,} trainable parameters; {cfg.max_steps} steps of {cfg.grad_accum}×{cfg.batch_size} sequences")
        ev = evaluate_loss(evaluate, trainable, split.frozen, val_batches, mesh, cfg.eval_batches)
        meta["initial_eval"] = ev["loss"]
        writer.write("eval", 0, ev)
        _log(is_main, f"[{name}] step 0 eval loss {ev['loss']:.5g}")

    base_key = jax.random.PRNGKey(cfg.seed)
    pending: tuple[int, Any] | None = None
    t0 = time.perf_counter()
    steps_done = 0
    bar = _progress(is_main, name, start, cfg.max_steps)

    def settle(p: tuple[int, Any]) -> dict:
        step_no, metrics = p
        m = jax.device_get(metrics)
        if not math.isfinite(float(m["loss"])):
            if bar is not None:
                bar.close()  # the error line goes below the bar, not into it
            last = ckpt.latest_step()
            kept = (f"the last good checkpoint (step {last}) is kept in {ckpt.dir / 'checkpoints'}" if last is not None
                    else "no checkpoint was written before it")
            raise NonFiniteLossError(
                f"[{name}] the training loss became {float(m['loss'])} at step {step_no}; stopped ({kept}). "
                "Lower the learning rate or enable optim.clip_norm"
            )
        if step_no % cfg.log_every == 0 or step_no == cfg.max_steps:
            writer.write("train", step_no, {k: v for k, v in m.items() if np.asarray(v).size == 1})
        return m

    for step in range(start, cfg.max_steps):
        try:
            batch = next(train_iter)
        except StopIteration:
            raise UserError(f"[{name}] the training data ran out at step {step}") from None
        lr = learning_rate(cfg.optim, step, cfg.max_steps, plateau)
        gbatch = to_global_batch(batch, mesh, accumulate=cfg.grad_accum)
        key = jax.random.fold_in(base_key, step)
        trainable, opt_state, metrics = train(trainable, opt_state, split.frozen, gbatch, jnp.float32(lr), key)
        steps_done += 1
        if pending is not None:
            m = settle(pending)
            _update_bar(bar, m, steps_done, t0, tokens_per_batch)
        pending = (step + 1, metrics)
        at_eval = (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.max_steps
        at_ckpt = (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.max_steps
        if at_eval or at_ckpt:
            m = settle(pending)
            _update_bar(bar, m, steps_done, t0, tokens_per_batch)
            pending = None
        if at_eval:
            ev = evaluate_loss(evaluate, trainable, split.frozen, val_batches, mesh, cfg.eval_batches)
            writer.write("eval", step + 1, ev)
            meta["last_eval"] = ev["loss"]
            if cfg.optim.schedule == "plateau":
                plateau.step(ev["loss"], cfg.optim)
            improved = meta["best_eval"] is None or ev["loss"] < meta["best_eval"]
            if improved:
                meta["best_eval"] = ev["loss"]
                ckpt.save_best(step + 1, trainable, {"step": step + 1, "eval_loss": ev["loss"]})
            _log(is_main, f"\n[{name}] step {step + 1} eval loss {ev['loss']:.5g}{' (best)' if improved else ''} lr {lr:.3g}")
        if cfg.snapshot_every and (step + 1) % cfg.snapshot_every == 0:
            # a replay after a kill rewrites the same parameters (save_params replaces), so resume needs nothing here
            save_params(stage_dir / "snapshots" / str(step + 1), trainable, {"step": step + 1})
        if at_ckpt:
            meta["plateau"] = dataclasses.asdict(plateau)
            ckpt.save(step + 1, trainable, opt_state, meta, train_iter)
        if bar is not None:
            bar.update(1)
    if pending is not None:
        settle(pending)
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t0
    tps = steps_done * tokens_per_batch / elapsed if steps_done and elapsed > 0 else float("nan")
    # the best evaluated parameters are the stage's result (as the original's load_best_model_at_end)
    if ckpt.best_step() is not None:
        trainable, best_meta = ckpt.restore_best(trainable, t_shard)
        _log(is_main, f"[{name}] loaded the best parameters (step {best_meta['step']}, eval loss {best_meta['eval_loss']:.5g})")
    ckpt.close()
    writer.close()
    if is_main:
        plot_losses(run_dir, name)
    return LoopResult(
        trainable=trainable,
        steps=cfg.max_steps,
        initial_eval=meta.get("initial_eval"),
        best_eval=meta.get("best_eval"),
        final_eval=meta.get("last_eval"),
        tokens_per_s=tps,
        trainable_params=n_params,
        resumed_from=resumed_from,
    )


def _log(is_main: bool, msg: str) -> None:
    if is_main:
        print(msg, file=sys.stderr, flush=True)


def _progress(is_main: bool, name: str, start: int, total: int):
    if not is_main:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc=name, unit="step", file=sys.stderr, dynamic_ncols=True, mininterval=1.0)


def _update_bar(bar, m: dict, steps_done: int, t0: float, tokens_per_batch: int) -> None:
    if bar is None:
        return
    elapsed = time.perf_counter() - t0
    bar.set_postfix(loss=f"{float(m['loss']):.4g}", tok_s=f"{steps_done * tokens_per_batch / max(elapsed, 1e-9):.0f}", refresh=False)


__all__ = ["train_loop", "LoopConfig", "LoopResult", "evaluate_loss", "to_global_batch", "NonFiniteLossError", "fmt_eta"]
