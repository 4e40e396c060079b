"""Task → token requests → one scoring pass → metrics; the results dict and its markdown table."""

from __future__ import annotations

import logging
import math
import time
from typing import Sequence

from lolcats_jax.eval.encoding import PairEncoder
from lolcats_jax.eval.metrics import score_docs, task_metrics
from lolcats_jax.eval.scoring import Scorer
from lolcats_jax.eval.tasks import Task

log = logging.getLogger(__name__)


def task_logliks(scorer: Scorer, tokenizer, task: Task, batch_size: int = 8) -> list[list[float]]:
    """Per document, the summed log-likelihood of each choice's continuation."""
    pairs = [req for doc in task.docs for req in doc.requests]
    scored = scorer.loglikelihoods(PairEncoder(tokenizer).encode_all(pairs), batch_size)
    out, i = [], 0
    for doc in task.docs:
        out.append([lp for lp, _ in scored[i : i + len(doc.choices)]])
        i += len(doc.choices)
    return out


def evaluate_task(scorer: Scorer, tokenizer, task: Task, batch_size: int = 8) -> dict:
    """The task's metrics (see `metrics.task_metrics`) plus its wall time."""
    t0 = time.perf_counter()
    per_doc = score_docs(task.docs, task_logliks(scorer, tokenizer, task, batch_size))
    res = task_metrics(task, per_doc)
    res["seconds"] = round(time.perf_counter() - t0, 2)
    log.info("%s: n=%d %s (%.1fs)", task.name, res["n"], " ".join(f"{m}={res[m]:.4f}" for m in task.metrics), res["seconds"])
    return res


def evaluate_tasks(scorer: Scorer, tokenizer, tasks: Sequence[Task], batch_size: int = 8) -> dict[str, dict]:
    return {t.name: evaluate_task(scorer, tokenizer, t, batch_size) for t in tasks}


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.4f}"


def markdown_table(results: dict[str, dict]) -> str:
    """| task | n | acc | acc_norm | — one row per task (MMLU: the unweighted mean over subjects)."""
    lines = ["| task | n | acc | ± | acc_norm | ± |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['n']} | {_fmt(r.get('acc'))} | {_fmt(r.get('acc_stderr'))} | "
                     f"{_fmt(r.get('acc_norm'))} | {_fmt(r.get('acc_norm_stderr'))} |")
    return "\n".join(lines)
