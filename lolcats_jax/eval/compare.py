"""Task scores of several models side by side, the first one (the softmax teacher) as the reference.

Three tables: per task acc / acc_norm ± standard error; the mean acc over the plain tasks (not MMLU's mean over
subjects) with each later model's share of the first's; and each later model's paired difference in acc from the
first on the same documents. Paired is what tells a linearized model from its teacher: the two agree on most
documents, so the standard error of the per-document differences is far smaller than their separate ones.

The evaluate stage's report uses the tables. As a command they compare the result files of
`python -m lolcats_jax.evaluate --out`, several files per model when its tasks were scored separately:

    python -m lolcats_jax.eval.compare --model teacher=t_piqa.json,t_arc.json --model student=s_piqa.json,s_arc.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from lolcats_jax.eval.metrics import paired_difference


def fmt_err(x) -> str:
    return "–" if x is None or x != x else f"{x:.3f}"  # NaN: a group of one document


def plain_tasks(models: dict, names: list[str]) -> list[str]:
    """The tasks that every model with task scores scored and that are plain means over documents (not MMLU's mean
    over subjects)."""
    scored = [m["tasks"] for m in models.values() if m.get("tasks")]
    return [t for t in names if scored and all(t in ts and "groups" not in ts[t] for ts in scored)]


def task_tables(models: dict, labels: list[str], mmlu_shots: int | None = None) -> list[str]:
    """Markdown lines: the per-task table, the mean row and the paired differences (nothing without task scores).
    `models` maps each label to a dict with a "tasks" entry as `evaluate_tasks` returns it."""
    names = sorted({t for lab in labels for t in models[lab].get("tasks", {})})
    if not names:
        return []
    lines = ["| task | n | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for t in names:
        cells, n = [], None
        for lab in labels:
            r = models[lab].get("tasks", {}).get(t)
            if r is None:
                cells.append("–")
                continue
            n = r.get("n")
            cells.append(" / ".join(f"{r[m]:.3f} ± {fmt_err(r.get(m + '_stderr'))}" for m in ("acc", "acc_norm")
                                    if r.get(m) is not None))
        groups = next((models[lab]["tasks"][t]["groups"] for lab in labels if "groups" in models[lab].get("tasks", {}).get(t, {})), None)
        shots = f", {mmlu_shots}-shot" if mmlu_shots is not None else ""
        label = f"{t} ({len(groups)} subjects{shots}, mean over subjects)" if groups else t
        lines.append(f"| {label} | {n} | " + " | ".join(cells) + " |")
    lines += mean_row(models, labels, names)
    lines.append("")
    return lines + paired_table(models, labels, names)


def mean_row(models: dict, labels: list[str], names: list[str]) -> list[str]:
    """A row with each model's mean acc over the plain tasks, ± √(Σ stderr²) / #tasks, and for the other models the
    mean as a share of the first model's (the teacher's)."""
    plain = plain_tasks(models, names)
    if len(plain) < 2:
        return []
    cells, ref = [], None
    for lab in labels:
        if not models[lab].get("tasks"):
            cells.append("–")
            continue
        rs = [models[lab]["tasks"][t] for t in plain]
        mean = sum(r["acc"] for r in rs) / len(rs)
        err = math.sqrt(sum((r.get("acc_stderr") or 0.0) ** 2 for r in rs)) / len(rs)
        cells.append(f"{mean:.3f} ± {fmt_err(err)}" + (f" ({100 * mean / ref:.1f} %)" if ref else ""))
        ref = ref if ref is not None else mean
    return [f"| mean acc ({', '.join(plain)}) | | " + " | ".join(cells) + " |"]


def paired_table(models: dict, labels: list[str], names: list[str]) -> list[str]:
    """Each later model's acc minus the first model's (the teacher's) on the same documents, ± the paired standard
    error, per task and for the mean over the plain tasks (± √(Σ paired stderr²) / #tasks)."""
    labels = [lab for lab in labels if models[lab].get("tasks")]
    plain = [t for t in plain_tasks(models, names) if all("acc_per_doc" in models[lab]["tasks"][t] for lab in labels)]
    grouped = [t for t in names if t not in plain and _equal_groups(models, labels, t)]
    if not (plain or grouped) or len(labels) < 2:
        return []
    ref = models[labels[0]]["tasks"]
    lines = [f"Paired difference in acc from the {labels[0]} (same documents; the standard error is that of the "
             "per-document differences, which two models that agree on most documents make far smaller than their "
             "separate standard errors):", "", "| task | " + " | ".join(labels[1:]) + " |", "|---|" + "---|" * (len(labels) - 1)]
    diffs = {lab: [paired_difference(models[lab]["tasks"][t]["acc_per_doc"], ref[t]["acc_per_doc"]) for t in plain + grouped]
             for lab in labels[1:]}
    for i, t in enumerate(plain + grouped):
        groups = ref[t].get("groups")
        name = f"{t} ({len(groups)} subjects × {ref[t]['n'] // len(groups)}; the mean over subjects)" if groups else t
        lines.append(f"| {name} | " + " | ".join(f"{diffs[lab][i][0]:+.3f} ± {fmt_err(diffs[lab][i][1])}" for lab in labels[1:]) + " |")
    if len(plain) > 1:
        diffs = {lab: d[: len(plain)] for lab, d in diffs.items()}  # the mean is over the plain tasks only
        cells = []
        for lab in labels[1:]:
            d = sum(x for x, _ in diffs[lab]) / len(plain)
            e = math.sqrt(sum(v * v for _, v in diffs[lab])) / len(plain)
            cells.append(f"{d:+.3f} ± {fmt_err(e)}")
        lines.append(f"| mean of {len(plain)} | " + " | ".join(cells) + " |")
    return lines + [""]


def _equal_groups(models: dict, labels: list[str], task: str) -> bool:
    """Whether every model scored `task` per document and its groups (MMLU's subjects) all hold the same number of
    documents: then the mean over subjects is the mean over documents, and the paired difference over documents is
    that of the subject means."""
    for lab in labels:
        r = models[lab]["tasks"].get(task) or {}
        sizes = {g["n"] for g in (r.get("groups") or {}).values()}
        if "acc_per_doc" not in r or len(sizes) != 1:
            return False
    return True


# ------------------------------------------------------------------------------------------------ the command


class CompareError(ValueError):
    """A result file that cannot be compared (missing, not an evaluate result, scored on other documents)."""


def load_model_results(files: list[Path]) -> dict:
    """One model's task results from the evaluate result files it was scored in (a task in two files is an error)."""
    tasks: dict = {}
    for f in files:
        try:
            data = json.loads(Path(f).read_text())
        except FileNotFoundError:
            raise CompareError(f"{f}: result file not found") from None
        except json.JSONDecodeError as e:
            raise CompareError(f"{f}: not JSON ({e})") from None
        if not isinstance(data, dict) or not isinstance(data.get("tasks"), dict):
            raise CompareError(f"{f}: expected the JSON that `python -m lolcats_jax.evaluate --out` writes (a 'tasks' object)")
        for name, r in data["tasks"].items():
            if name in tasks:
                raise CompareError(f"{f}: task {name} was already read from another file of the same model")
            tasks[name] = r
    return {"tasks": tasks}


def check_same_documents(models: dict) -> None:
    """A task every model scored must have the same number of documents in each (the same --limit)."""
    labels = list(models)
    for t in sorted({t for m in models.values() for t in m["tasks"]}):
        ns = {lab: models[lab]["tasks"][t].get("n") for lab in labels if t in models[lab]["tasks"]}
        if len(set(ns.values())) > 1:
            raise CompareError(f"task {t} was scored on different numbers of documents: {ns} (use the same --limit)")
        per_doc = {lab: len(models[lab]["tasks"][t].get("acc_per_doc", "")) for lab in ns}
        if any(v and v != ns[lab] for lab, v in per_doc.items()):
            raise CompareError(f"task {t}: acc_per_doc lengths {per_doc} do not match n = {ns}")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m lolcats_jax.eval.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", required=True, metavar="LABEL=FILE[,FILE...]",
                    help="a model's label and its evaluate result files; the first --model is the reference")
    ap.add_argument("--out", metavar="compare.md", help="also write the tables to this file")
    args = ap.parse_args(argv)
    args.models = []
    for spec in args.model:
        label, sep, files = spec.partition("=")
        if not sep or not label.strip() or not files.strip():
            ap.error(f"--model {spec!r}: expected LABEL=FILE[,FILE...]")
        args.models.append((label.strip(), [Path(f) for f in files.split(",") if f.strip()]))
    if len(args.models) < 2:
        ap.error("give at least two --model (the first is the reference)")
    if len({lab for lab, _ in args.models}) != len(args.models):
        ap.error("each --model needs its own label")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        models = {label: load_model_results(files) for label, files in args.models}
        check_same_documents(models)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lines = task_tables(models, list(models))
    if not lines:
        print("error: none of the files holds task scores", file=sys.stderr)
        return 2
    text = "\n".join(lines).rstrip() + "\n"
    print(text, end="")
    if args.out:
        from lolcats_jax.fsio import write_text_atomic

        write_text_atomic(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
