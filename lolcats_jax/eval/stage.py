"""The `evaluate` stage: the softmax teacher, the model right after attention transfer and the finetuned model,
side by side — held-out perplexity, benchmark accuracies (subsets on CPU, sizes stated), training figures —
written to `<run.dir>/report.md`, `<run.dir>/evaluate/results.json` and a bar chart PNG. Each finished measurement
is kept under `evaluate/parts` (`eval.progress`): an interrupted stage resumes at the first unfinished one."""

from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path

import jax

from lolcats_jax.config import perplexity_chunk_len, to_dict
from lolcats_jax.errors import UserError
from lolcats_jax.eval.compare import task_tables
from lolcats_jax.fsio import atomic_path, write_text_atomic
from lolcats_jax.train.stages import RunContext, attention_source_stage, load_base, load_stage_params, stage_done

SMOKE_N = 100  # below this many documents per task the report calls its benchmark table a smoke test


def _models(ctx: RunContext):
    """(label, key, loader) for every model this run can provide, in report order; they read the base weights once."""
    cfg = ctx.cfg
    cache: dict = {}
    base = functools.partial(load_base, ctx, base_cache=cache)
    out = [("softmax teacher", "teacher", lambda: base(linearize=False))]
    if cfg.attention.kind == "lolcats" and (ctx.stage_dir(attention_source_stage(ctx)) / "final").exists():
        def distilled():
            m = base(linearize=True)
            load_stage_params(ctx, m, attention_source_stage(ctx))
            return m

        out.append((f"after attention transfer ({attention_source_stage(ctx)})", "distill", distilled))
    if (ctx.stage_dir("finetune") / "final").exists():
        def finetuned():
            m = base(linearize=cfg.attention.kind == "lolcats", lora=cfg.finetune.lora)
            if cfg.attention.kind == "lolcats":
                load_stage_params(ctx, m, attention_source_stage(ctx))
            load_stage_params(ctx, m, "finetune")
            return m

        out.append(("after LoRA finetuning", "finetune", finetuned))
    return out


def _text_ids(ctx: RunContext, files, key: str) -> list[int]:
    ids: list[int] = []
    for f in files:
        p = Path(f)
        if not p.is_file():
            raise UserError(f"evaluate.{key}: {p} not found")
        ids += ctx.tokenizer(p.read_text(encoding="utf-8"))["input_ids"]
    return ids


def heldout_ids(ctx: RunContext, max_tokens: int | None = None) -> list[int]:
    """Token ids of the `evaluate.perplexity` files, concatenated, cut to `max_tokens` (default
    `evaluate.max_perplexity_tokens`)."""
    ids = _text_ids(ctx, ctx.cfg.evaluate.perplexity, "perplexity")
    return ids[: ctx.cfg.evaluate.max_perplexity_tokens if max_tokens is None else max_tokens]


def long_context_ids(ctx: RunContext) -> list[int]:
    """Token ids of the `evaluate.long_context` files: as many as `long_context_windows` whole windows of
    `long_context_length` + 1 tokens need; a clear error if the model's context or the text is too short."""
    from lolcats_jax.eval.position_loss import window_problem

    ev = ctx.cfg.evaluate
    L, n = ev.long_context_length, ev.long_context_windows
    ids = _text_ids(ctx, ev.long_context, "long_context")
    problem = window_problem(len(ids), L, ctx.llama_cfg.max_position_embeddings,
                             length_name=f"evaluate.long_context_length={L}",
                             text_name=f"evaluate.long_context {list(ev.long_context)}")
    if problem:
        raise UserError(f"{problem}; model {ctx.cfg.model.path}")
    return ids[: n * (L + 1)]


def _model_fingerprint(ctx: RunContext, key: str) -> dict:
    """What a model's scores depend on: the base weights and dtypes, and for a linearized or finetuned model its
    settings and the summaries of the stages whose parameters it loads (rewritten whenever such a stage re-runs)."""
    cfg = ctx.cfg
    fp: dict = {"key": key, "model": to_dict(cfg.model)}
    if key in ("distill", "finetune") and cfg.attention.kind == "lolcats":
        src = attention_source_stage(ctx)
        fp.update(attention=to_dict(cfg.attention), source=src, source_done=stage_done(ctx, src))
    if key == "finetune":
        fp.update(lora=to_dict(cfg.finetune.lora), finetune_done=stage_done(ctx, "finetune"))
    return fp


def run_evaluate(ctx: RunContext) -> dict:
    from lolcats_jax.eval.progress import EvalProgress, fingerprint
    from lolcats_jax.eval.runner import evaluate_tasks
    from lolcats_jax.eval.scoring import Scorer
    from lolcats_jax.eval.tasks import Task, load_task

    ev = ctx.cfg.evaluate
    chunk = perplexity_chunk_len(ctx.cfg)
    heldout = heldout_ids(ctx) if ev.perplexity else []
    long_ids = long_context_ids(ctx) if ev.long_context else []
    tasks = [load_task(name, limit=(ev.mmlu_limit or ev.limit) if name == "mmlu" else ev.limit,
                       mmlu_subjects=ev.mmlu_subjects, mmlu_shots=ev.mmlu_shots) for name in ev.tasks]
    progress = EvalProgress(ctx.stage_dir("evaluate"), ctx.is_main, ctx.process_count)
    results: dict[str, dict] = {}
    keys: dict[str, str] = {}
    for label, key, load in _models(ctx):
        keys[label] = key
        model_fp = _model_fingerprint(ctx, key)
        # (item, fingerprint, what) for every measurement of this model: `what` measures it, or is a Task that is
        # scored together with the model's other unfinished tasks in one pass (`evaluate_tasks`)
        items: list = []
        if heldout:
            items.append(("perplexity", fingerprint([model_fp, fingerprint(heldout), chunk]),
                          lambda scorer, model: _perplexity(scorer, heldout, chunk, ev.batch_size)))
        if long_ids:
            items.append(("long_context", fingerprint([model_fp, fingerprint(long_ids), ev.long_context_length]),
                          lambda scorer, model: _long_context(scorer, long_ids, ev.long_context_length)))
        if key == "distill" and ev.attention_mse_batches > 0:
            items.append(("attention_mse", fingerprint([model_fp, ev.attention_mse_batches, to_dict(ctx.cfg.distill.data),
                                                        ctx.cfg.distill.batch_size]),
                          lambda scorer, model: _attention_mse(ctx, model)))
        if key in ev.task_models:
            for task in tasks:
                items.append((f"task.{task.name}", fingerprint([model_fp, task.name, len(task.docs), ev.limit, ev.mmlu_limit,
                                                                ev.mmlu_subjects, ev.mmlu_shots]), task))
        done = {item: progress.get(key, item, fp) for item, fp, _ in items}
        todo = [(item, fp, what) for item, fp, what in items if done[item] is None]
        print(f"[evaluate] {label}" + (f" ({len(items) - len(todo)} of {len(items)} measurements from an earlier run)"
                                       if len(todo) < len(items) else ""), file=sys.stderr, flush=True)
        if todo:
            model = load()
            scorer = Scorer(model)
            for item, fp, what in todo:
                if not isinstance(what, Task):
                    done[item] = what(scorer, model)
                    progress.put(key, item, fp, done[item])
            todo_tasks = [(item, fp, what) for item, fp, what in todo if isinstance(what, Task)]
            if todo_tasks:
                scores = evaluate_tasks(scorer, ctx.tokenizer, [t for _, _, t in todo_tasks], ev.batch_size)
                for item, fp, task in todo_tasks:
                    done[item] = scores[task.name]
                    progress.put(key, item, fp, done[item])
            del model, scorer
            jax.clear_caches()
        entry: dict = {}
        for item, _, _ in items:
            if item.startswith("task."):
                entry.setdefault("tasks", {})[item[len("task."):]] = done[item]
            else:
                entry[item] = done[item]
        results[label] = entry
    summary = {"models": results, "keys": keys,
               "attention_source": attention_source_stage(ctx) if ctx.cfg.attention.kind == "lolcats" else None,
               "training": _training(ctx)}
    if ctx.is_main:
        out = ctx.stage_dir("evaluate")
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "results.json", json.dumps(summary, indent=2, default=float))
        report = render_report(ctx, summary)
        write_text_atomic(ctx.run_dir / "report.md", report)
        _bar_chart(ctx.run_dir / "plots" / "eval_tasks.png", results)
        print("\n" + report, flush=True)
    return {"report": str(ctx.run_dir / "report.md"), **{k: _short(v) for k, v in results.items()}}


def _perplexity(scorer, ids: list[int], chunk: int, batch_size: int) -> dict:
    ppl = scorer.perplexity(ids, chunk, None, batch_size)
    return {"ppl": ppl.ppl, "nll": ppl.nll_per_token, "tokens": ppl.n_tokens, "windows": ppl.n_windows}


def _long_context(scorer, ids: list[int], length: int) -> dict:
    from lolcats_jax.eval.position_loss import position_loss

    out = position_loss(scorer, ids, length).as_dict()
    print(f"[evaluate] loss by position: {out['windows']} windows of {length}, mean NLL {out['nll']:.4f}",
          file=sys.stderr, flush=True)
    return out


def _attention_mse(ctx: RunContext, model) -> dict:
    from lolcats_jax.train.attention_mse import attention_mse

    out = attention_mse(ctx, model)
    print(f"[evaluate] attention MSE {out['mse']:.4g} (mean over layers, {out['tokens']} validation tokens)",
          file=sys.stderr, flush=True)
    return out


def _training(ctx: RunContext) -> dict[str, dict]:
    """The training stages' summaries in run order: joint `distill`, or one row per trained block, then `finetune`."""
    out = {}
    if stage_done(ctx, "distill"):
        out["distill"] = stage_done(ctx, "distill")
    blocks = (stage_done(ctx, "distill_block") or {}).get("blocks", {})
    for i, b in sorted(blocks.items(), key=lambda kv: int(kv[0])):
        lo, hi = b.get("layers", (None, None))
        out[f"distill_block {i} (layers {lo}-{hi - 1})" if lo is not None else f"distill_block {i}"] = b
    if stage_done(ctx, "finetune"):
        out["finetune"] = stage_done(ctx, "finetune")
    return out


def _short(entry: dict) -> dict:
    out = {}
    if "perplexity" in entry:
        out["ppl"] = entry["perplexity"]["ppl"]
    for name, r in entry.get("tasks", {}).items():
        out[name] = r.get("acc")
    return out


def render_report(ctx: RunContext, summary: dict) -> str:
    models = summary["models"]
    labels = list(models)
    lines = [f"# LoLCATS run report — {ctx.cfg.model.path}", ""]
    lines += [f"Attention: {ctx.cfg.attention.kind} ({ctx.cfg.attention.window}, W={ctx.cfg.attention.window_size}, "
              f"{ctx.cfg.attention.feature_map}, F={ctx.cfg.attention.feature_dim}).", ""]
    if any("perplexity" in m for m in models.values()):
        lines += ["## Held-out perplexity", "", f"Non-overlapping windows of {perplexity_chunk_len(ctx.cfg)} tokens "
                  "(`evaluate.perplexity_chunk_len`), the context reset at each.", "",
                  "| model | perplexity | NLL/token | tokens | attention MSE (mean over layers) |", "|---|---|---|---|---|"]
        for lab in labels:
            p = models[lab].get("perplexity")
            mse = models[lab].get("attention_mse")
            if p:
                lines.append(f"| {lab} | {p['ppl']:.3f} | {p['nll']:.4f} | {p['tokens']} | "
                             f"{_f(mse['mse']) if mse else '–'} |")
        if any("attention_mse" in m for m in models.values()):
            lines += ["", "Attention MSE: teacher-forced, per-head outputs before o_proj vs the softmax teacher, on "
                      "the first distillation validation batches (`evaluate.attention_mse_batches`)."]
        lines.append("")
    lines += _position_table(ctx, models)
    task_names = sorted({t for m in models.values() for t in m.get("tasks", {})})
    if task_names:
        lines += ["## Benchmarks (acc / acc_norm ± standard error, n = documents scored)", ""]
        sizes = [r.get("n") or 0 for m in models.values() for r in m.get("tasks", {}).values()]
        if sizes and max(sizes) < SMOKE_N:
            lines += [f"**Smoke test only:** at most {max(sizes)} documents per task; a standard error of ~0.05 needs "
                      f"~100 and telling a 1-point loss from noise needs thousands. For scores that mean something: "
                      f"`python -m lolcats_jax.evaluate --model {ctx.run_dir} --limit 300` (or raise `evaluate.limit`).",
                      ""]
        lines += task_tables(models, labels, ctx.cfg.evaluate.mmlu_shots)
    lines += _comparison(ctx, summary)
    tr = summary.get("training", {})
    if tr:
        lines += ["## Training", "", "| stage | steps | trainable params | eval loss start → best | tokens/s | seconds |", "|---|---|---|---|---|---|"]
        for s, d in tr.items():
            init, best = d.get("initial_eval_loss"), d.get("best_eval_loss")
            ratio = f" ({init / best:.1f}× lower)" if init and best else ""
            lines.append(
                f"| {s} | {d.get('steps')} | {d.get('trainable_params', 0):,} | {_f(init)} → {_f(best)}{ratio} | "
                f"{_f(d.get('tokens_per_s'))} | {d.get('seconds', '–')} |"
            )
        lines.append("")
    lines.append("Plots: `plots/*_loss.png`, `plots/eval_tasks.png`; metrics: `metrics.jsonl`, `tensorboard/`.")
    return "\n".join(lines) + "\n"


def _position_table(ctx: RunContext, models: dict) -> list[str]:
    """Mean NLL per position band of each model, and each linearized model's perplexity there as a multiple of the
    teacher's (exp of the NLL difference)."""
    have = {lab: m["long_context"] for lab, m in models.items() if "long_context" in m}
    if not have:
        return []
    first = next(iter(have.values()))
    teacher = next((v for lab, v in have.items() if lab == "softmax teacher"), None)
    att = ctx.cfg.attention
    lines = ["## Loss by position (long context)", "",
             f"{first['windows']} windows of {first['length']} tokens of `{', '.join(Path(f).name for f in ctx.cfg.evaluate.long_context)}`; "
             f"mean NLL per token at each band of positions (position t is predicted from t + 1 tokens); in brackets "
             f"the perplexity there as a multiple of the teacher's. Attention window: {att.window} {att.window_size}"
             + (" (tk blocks: a query sees its own and the previous block exactly, everything older through the linear "
                "state)" if att.window == "tk" else "")
             + f". Training sequences: distill {ctx.cfg.distill.data.chunk_size}, finetune "
             f"{ctx.cfg.finetune.data.chunk_size} tokens (the linear part is fitted to the number of keys it summed "
             "there; beyond the training length expect it to degrade).", "",
             "| positions | " + " | ".join(have) + " |", "|---|" + "---|" * len(have)]
    rows = [(f"{lo}–{hi - 1}", i) for i, (lo, hi, _) in enumerate(first["bands"])] + [("all", None)]
    for name, i in rows:
        cells = []
        for lab, v in have.items():
            nll = v["nll"] if i is None else v["bands"][i][2]
            ref = None if teacher is None or lab == "softmax teacher" else (teacher["nll"] if i is None else teacher["bands"][i][2])
            cells.append(f"{nll:.4f}" + (f" ({math.exp(nll - ref):.3f}×)" if ref is not None else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def _by_key(summary: dict) -> dict[str, dict]:
    """results.json "models" (keyed by label) → {"teacher"|"distill"|"finetune": entry}."""
    keys = summary.get("keys") or {}
    return {keys.get(label, label): entry for label, entry in summary["models"].items()}


def _comparison(ctx: RunContext, summary: dict) -> list[str]:
    """This run beside the runs of `evaluate.compare_runs` (e.g. block-wise vs joint attention transfer): held-out
    perplexity of each stage's model and the attention MSE after attention transfer, measured by the same code."""
    if not ctx.cfg.evaluate.compare_runs:
        return []
    runs = [(str(ctx.run_dir), summary, None)]
    for other in ctx.cfg.evaluate.compare_runs:
        path = Path(other) / "evaluate" / "results.json"
        if not path.is_file():
            runs.append((other, None, f"no {path} — run that config's evaluate stage first"))
            continue
        try:
            runs.append((other, json.loads(path.read_text()), None))
        except (OSError, json.JSONDecodeError) as e:
            runs.append((other, None, f"{path} unreadable: {e}"))
    lines = ["## Comparison with other runs", "",
             "Same held-out text and attention-MSE batches only if the runs share `evaluate.perplexity` and "
             "`distill.data.validation` (token counts shown).", "",
             "| run | attention from | teacher ppl | ppl after attention transfer | ppl after LoRA | attention MSE "
             "(mean over layers) | held-out tokens | MSE tokens |", "|---|---|---|---|---|---|---|---|"]
    for name, res, problem in runs:
        if res is None:
            lines.append(f"| {name} | {problem} |")
            continue
        m = _by_key(res)
        ppl = lambda k: _f(m.get(k, {}).get("perplexity", {}).get("ppl"))  # noqa: E731
        mse = m.get("distill", {}).get("attention_mse") or {}
        tokens = next((e["perplexity"]["tokens"] for e in m.values() if "perplexity" in e), None)
        lines.append(f"| {name} | {res.get('attention_source') or '–'} | {ppl('teacher')} | {ppl('distill')} | "
                     f"{ppl('finetune')} | {_f(mse.get('mse'))} | {tokens or '–'} | {mse.get('tokens', '–')} |")
    return lines + [""]


def _f(x) -> str:
    return "–" if x is None else f"{x:.4g}"


def _bar_chart(path: Path, models: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = sorted({t for m in models.values() for t in m.get("tasks", {})})
    if not tasks:
        return
    labels = list(models)
    x = np.arange(len(tasks))
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(1.4 * len(tasks) + 2, 3.5))
    for i, lab in enumerate(labels):
        vals = [models[lab].get("tasks", {}).get(t, {}).get("acc", np.nan) for t in tasks]
        ax.bar(x + i * width, vals, width, label=lab)
    ax.set_xticks(x + width * (len(labels) - 1) / 2, tasks, rotation=20)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
