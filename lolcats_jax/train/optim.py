"""Optimizer and learning-rate schedules.

The learning rate is computed on the host each step and passed into the jitted step (optax.inject_hyperparams),
so every schedule — including reduce-on-plateau, which is stepped only at evaluations as in the original —
is a few lines of plain Python whose state is saved with the checkpoint.
"""

from __future__ import annotations

import dataclasses
import math

import optax

from lolcats_jax.config import OptimizerConfig


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """AdamW (optionally after global-norm clipping) with an injectable learning rate."""

    def build(learning_rate):
        parts = []
        if cfg.clip_norm is not None:
            parts.append(optax.clip_by_global_norm(cfg.clip_norm))
        parts.append(optax.adamw(learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay))
        return optax.chain(*parts)

    return optax.inject_hyperparams(build)(learning_rate=cfg.lr)


@dataclasses.dataclass
class PlateauState:
    """torch.optim.lr_scheduler.ReduceLROnPlateau(mode='min', threshold_mode='rel'), stepped at evaluations."""

    scale: float = 1.0
    best: float = math.inf
    bad_evals: int = 0

    def step(self, metric: float, cfg: OptimizerConfig) -> None:
        if metric < self.best * (1.0 - cfg.plateau_threshold):
            self.best = metric
            self.bad_evals = 0
            return
        self.bad_evals += 1
        if self.bad_evals > cfg.plateau_patience:
            new_scale = max(self.scale * cfg.plateau_factor, cfg.min_lr / cfg.lr)
            if cfg.lr * (self.scale - new_scale) > 1e-8 * cfg.lr:  # torch's eps: ignore negligible changes
                self.scale = new_scale
            self.bad_evals = 0


def learning_rate(cfg: OptimizerConfig, step: int, total_steps: int, plateau: PlateauState | None) -> float:
    """The learning rate for optimizer step `step` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        warm = (step + 1) / cfg.warmup_steps
    else:
        warm = 1.0
    if cfg.schedule == "constant":
        return cfg.lr * warm
    if cfg.schedule == "cosine":
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, max(0.0, (step - cfg.warmup_steps) / span))
        cos = 0.5 * (1.0 + math.cos(math.pi * progress))
        return warm * (cfg.min_lr + (cfg.lr - cfg.min_lr) * cos)
    if cfg.schedule == "plateau":
        return cfg.lr * warm * (plateau.scale if plateau is not None else 1.0)
    raise ValueError(f"unknown schedule {cfg.schedule!r}")
