"""Multiple-choice metrics, as lm-evaluation-harness computes them (`ConfigurableTask.process_results`):

    acc        argmax_i  loglik_i                       == gold
    acc_norm   argmax_i  loglik_i / len(choice_i)       == gold   (length in characters)
    acc_bytes  argmax_i  loglik_i / len(choice_i.encode("utf-8")) == gold

where choice_i is the choice text WITHOUT the target delimiter (" Paris" is scored, "Paris" normalises).
Ties go to the first maximum (numpy's argmax). Aggregates are means with the harness's standard error
(sample standard deviation / √n); a task reported as a mean over groups (MMLU subjects) gives the unweighted
mean of the per-group accuracies, plus the document-weighted mean as `<metric>_weighted`.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from lolcats_jax.eval.tasks import MultipleChoiceDoc, Task

ALL_METRICS = ("acc", "acc_norm", "acc_bytes")


def doc_metrics(logliks: Sequence[float], choices: Sequence[str], gold: int) -> dict[str, float]:
    """acc, acc_norm and acc_bytes (1.0 / 0.0) of one document from its per-choice summed log-likelihoods."""
    if len(logliks) != len(choices):
        raise ValueError(f"{len(logliks)} log-likelihoods for {len(choices)} choices")
    ll = np.asarray(logliks, np.float64)
    chars = np.array([max(len(c), 1) for c in choices], np.float64)
    nbytes = np.array([max(len(c.encode("utf-8")), 1) for c in choices], np.float64)
    return {
        "acc": float(np.argmax(ll) == gold),
        "acc_norm": float(np.argmax(ll / chars) == gold),
        "acc_bytes": float(np.argmax(ll / nbytes) == gold),
    }


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of the mean (sample std, ddof=1); NaN for fewer than 2 values."""
    n = len(values)
    if n < 2:
        return float("nan")
    return float(np.std(np.asarray(values, np.float64), ddof=1) / math.sqrt(n))


def task_metrics(task: Task, per_doc: Sequence[dict[str, float]]) -> dict:
    """The task's reported numbers: each metric, its stderr, n, and per-group results for group-mean tasks."""
    if len(per_doc) != len(task.docs):
        raise ValueError(f"{task.name}: {len(per_doc)} results for {len(task.docs)} documents")
    out: dict = {"n": len(per_doc)}
    # each document's acc as "0"/"1" in document order: two models scored on the same documents compare paired
    # (`paired_difference`), with a much smaller standard error than their two stderrs give
    out["acc_per_doc"] = "".join("1" if d["acc"] else "0" for d in per_doc)
    if not task.group_mean:
        for m in task.metrics:
            vals = [d[m] for d in per_doc]
            out[m], out[f"{m}_stderr"] = float(np.mean(vals)), mean_stderr(vals)
        return out
    groups: dict[str, list[dict[str, float]]] = {}
    for doc, res in zip(task.docs, per_doc):
        groups.setdefault(doc.group, []).append(res)
    out["groups"] = {g: {"n": len(rs), **{m: float(np.mean([r[m] for r in rs])) for m in task.metrics}} for g, rs in sorted(groups.items())}
    for m in task.metrics:
        out[m] = float(np.mean([g[m] for g in out["groups"].values()]))
        # the unweighted mean of independent group means: √(Σ stderr²) / #groups
        group_err = [mean_stderr([r[m] for r in rs]) for rs in groups.values()]
        out[f"{m}_stderr"] = math.sqrt(sum(e * e for e in group_err)) / len(groups)  # NaN if a group has 1 document
        out[f"{m}_weighted"] = float(np.mean([d[m] for d in per_doc]))
    return out


def paired_difference(model: str, reference: str) -> tuple[float, float]:
    """(mean of model − reference, its standard error) from two per-document 0/1 strings of the same documents:
    the paired difference d_j ∈ {−1, 0, 1}, stderr = std(d, ddof=1) / √n."""
    if len(model) != len(reference) or not model:
        raise ValueError(f"paired difference needs per-document results of the same documents: {len(model)} vs {len(reference)}")
    d = np.array([int(a) - int(b) for a, b in zip(model, reference)], np.float64)
    return float(d.mean()), mean_stderr(d)


def score_docs(docs: Sequence[MultipleChoiceDoc], logliks: Sequence[Sequence[float]]) -> list[dict[str, float]]:
    """Per-document metrics from per-document lists of choice log-likelihoods."""
    return [doc_metrics(ll, doc.choices, doc.gold) for doc, ll in zip(docs, logliks, strict=True)]
