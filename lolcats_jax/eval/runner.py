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


def tasks_logliks(scorer: Scorer, tokenizer, tasks: Sequence[Task], batch_size: int = 8) -> list[list[list[float]]]:
    """Per task, per document, the summed log-likelihood of each choice's continuation. The requests of all the
    tasks go through one scoring pass, so that a length bucket's compiled program serves every task that has
    inputs of that length (one compilation per bucket instead of one per task and bucket: at 70B–405B each is
    minutes). A request's score does not depend on what it is batched with (`Scorer.loglikelihoods`)."""
    pairs = [req for task in tasks for doc in task.docs for req in doc.requests]
    scored = scorer.loglikelihoods(PairEncoder(tokenizer).encode_all(pairs), batch_size)
    out, i = [], 0
    for task in tasks:
        per_doc = []
        for doc in task.docs:
            per_doc.append([lp for lp, _ in scored[i : i + len(doc.choices)]])
            i += len(doc.choices)
        out.append(per_doc)
    assert i == len(scored)
    return out


def task_logliks(scorer: Scorer, tokenizer, task: Task, batch_size: int = 8) -> list[list[float]]:
    """Per document, the summed log-likelihood of each choice's continuation."""
    return tasks_logliks(scorer, tokenizer, [task], batch_size)[0]


def evaluate_task(scorer: Scorer, tokenizer, task: Task, batch_size: int = 8) -> dict:
    """The task's metrics (see `metrics.task_metrics`) plus its scoring seconds."""
    return evaluate_tasks(scorer, tokenizer, [task], batch_size)[task.name]


def evaluate_tasks(scorer: Scorer, tokenizer, tasks: Sequence[Task], batch_size: int = 8) -> dict[str, dict]:
    """{task name: metrics} of every task, scored in one pass (`tasks_logliks`). Each task's "seconds" is its share
    of the pass's wall time, in proportion to its requests."""
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"tasks {names}: a task name appears twice")
    t0 = time.perf_counter()
    logliks = tasks_logliks(scorer, tokenizer, tasks, batch_size)
    seconds = time.perf_counter() - t0
    n_req = [sum(len(d.choices) for d in t.docs) for t in tasks]
    out = {}
    for task, lls, n in zip(tasks, logliks, n_req):
        res = task_metrics(task, score_docs(task.docs, lls))
        res["seconds"] = round(seconds * n / max(1, sum(n_req)), 2)
        log.info("%s: n=%d %s", task.name, res["n"], " ".join(f"{m}={res[m]:.4f}" for m in task.metrics))
        out[task.name] = res
    log.info("%d tasks scored in one pass in %.1fs", len(tasks), seconds)
    return out


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
