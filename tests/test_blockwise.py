"""Block-wise ("trenchcoat") attention transfer: collect → distill_block → stitch on a tiny random Llama.

The tiny model (4 layers, hidden 64, layer 1 kept softmax so block offsets in the stacked LoLCATS parameters are
exercised) is written as a Hugging Face directory by transformers; the text data is generated here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import yaml
from flax import nnx

from lolcats_jax import compat
from lolcats_jax.blockwise import collect as collect_mod
from lolcats_jax.blockwise.collect import distill_samples, run_collect
from lolcats_jax.blockwise.layout import block_dir, partition
from lolcats_jax.blockwise.model import full_options, initial_attention, load_block_model
from lolcats_jax.blockwise.plan import blockwise_plan
from lolcats_jax.blockwise.stitch import run_stitch
from lolcats_jax.blockwise.store import BlockInputStore
from lolcats_jax.blockwise.train import block_distill_loss, run_distill_block
from lolcats_jax.config import load_config
from lolcats_jax.errors import UserError
from lolcats_jax.model.llama import FeatureMapParam, WindowParam
from lolcats_jax.train.ckpt import load_params
from lolcats_jax.train.losses import distill_loss
from lolcats_jax.train.runner import build_context, run
from lolcats_jax.train.stages import load_base, load_stage_params
from lolcats_jax.train.step import split_model

REPO = Path(__file__).resolve().parent.parent
T = 32  # tokens per sample
WORDS = "the a cat dog sat ran on under tree house red blue quickly slowly and but then river stone light old new".split()


def _text(seed: int, n_docs: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(40, 80)))) + "." for _ in range(n_docs)]


@pytest.fixture(scope="module")
def env(tmp_path_factory, smollm2_dir):
    """A tiny HF Llama directory, train/validation text files and a config file."""
    import torch
    from transformers import LlamaConfig as HFConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("blockwise")
    model_dir = root / "tiny"
    torch.manual_seed(0)
    hf_cfg = HFConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=True, rms_norm_eps=1e-5,
    )
    LlamaForCausalLM(hf_cfg).to(torch.float32).save_pretrained(model_dir)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (smollm2_dir / f).is_file():
            shutil.copy(smollm2_dir / f, model_dir / f)
    data = root / "data"
    data.mkdir()
    for name, seed, n in (("train", 0, 12), ("val", 1, 4)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in _text(seed, n)))
    cfg = {
        "run": {"dir": str(root / "run"), "seed": 0, "stages": ["collect", "distill_block", "stitch", "finetune"]},
        "model": {"path": str(model_dir), "param_dtype": "float32", "compute_dtype": "float32", "remat": False},
        "attention": {"window_size": 8, "feature_dim": 8, "feature_init": "kaiming", "softmax_layers": [1]},
        "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
        "block": {"size": 2, "max_train_samples": 8, "max_val_samples": 4},
        "distill": {
            "data": {"format": "text", "train": [str(data / "train.jsonl")], "validation": [str(data / "val.jsonl")], "chunk_size": T},
            "batch_size": 2, "max_steps": 2, "eval_every": 2, "checkpoint_every": 2, "eval_batches": 1,
            "optim": {"lr": 0.01, "schedule": "constant"},
        },
    }
    cfg_path = root / "blockwise.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    cache = root / "data_cache"
    os.environ["LOLCATS_DATA_CACHE"] = str(cache)
    return {"root": root, "config": cfg_path, "data": data, "cache": cache}


def _ctx(env, *overrides):
    cfg = load_config(env["config"], list(overrides))
    Path(cfg.run.dir).mkdir(parents=True, exist_ok=True)
    return build_context(cfg)


def _run(ctx, fn):
    with compat.set_mesh(ctx.mesh):
        return fn(ctx)


@pytest.fixture(scope="module")
def collected(env):
    """The reference store: a complete collect into <run.dir>/block_inputs."""
    ctx = _ctx(env)
    summary = _run(ctx, run_collect)
    return ctx, summary


def _stored(store: BlockInputStore, split: str, start: int) -> np.ndarray:
    return np.asarray(store.array(split, start).read().result())


def _files_bytes(root: Path, chunks_only: bool = False) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and (not chunks_only or p.name.startswith("c.")))


def test_collect_round_trip_and_disk_estimate(collected):
    ctx, summary = collected
    store = BlockInputStore.open(Path(summary["store"]))
    assert store.meta["complete"] and store.meta["completed"] == {"train": 8, "validation": 4}
    assert list(store.layout.starts) == [0, 2]
    samples = distill_samples(ctx)
    with compat.set_mesh(ctx.mesh):
        model = load_base(ctx, linearize=False)
        for split in ("train", "validation"):
            tokens = jnp.asarray(samples[split])
            pos = jnp.broadcast_to(jnp.arange(T), tokens.shape)
            _, aux = jax.jit(lambda m, t, p: m.run_layers(m.embed_tokens(t), p, mode="collect"))(model, tokens, pos)
            for start in (0, 2):
                direct = np.asarray(aux[start]["input"], np.float32)
                stored = _stored(store, split, start)
                assert stored.dtype == ml_dtypes.bfloat16 and stored.shape == direct.shape
                # within bf16 rounding (8 significant bits) of the raw residual stream, not its normalised form
                np.testing.assert_allclose(stored.astype(np.float32), direct, rtol=2**-8, atol=1e-6)
    # the printed estimate (2 B × tokens × d × L/k) is the size of the chunk files; the rest is small metadata
    estimate = 2 * (8 + 4) * T * 64 * 2
    assert summary["bytes"] == estimate
    assert _files_bytes(store.root, chunks_only=True) == estimate
    assert 0 < _files_bytes(store.root) - estimate < 32 * 1024


def test_collect_resumes_after_a_kill(env, collected, monkeypatch):
    ref = BlockInputStore.open(Path(collected[1]["store"]))
    # batches of 2 on one device's worth of rows (the reference collected 8 rows at once, one per fake device)
    ctx = _ctx(env, f"block.store={env['root'] / 'resumed'}", "block.collect_batch_size=2")
    calls = {"n": 0}
    real_write = BlockInputStore.write

    def dying_write(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated kill")
        return real_write(self, *a, **kw)

    monkeypatch.setattr(BlockInputStore, "write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        _run(ctx, run_collect)
    partial = BlockInputStore.open(env["root"] / "resumed")
    assert partial.completed("train") == 2 and not partial.meta["complete"] and partial.meta["completed"]["train"] == 2
    with pytest.raises(UserError, match="collect is unfinished"):
        partial.check_complete()
    monkeypatch.setattr(BlockInputStore, "write", real_write)
    summary = _run(ctx, run_collect)
    assert summary["written_samples"] == 8 + 4 - 2  # continued at the first unwritten sample
    done = BlockInputStore.open(env["root"] / "resumed")
    for split in ("train", "validation"):
        for start in (0, 2):
            # batches of 8 split over 8 devices vs batches of 2: the fp32 sums may round differently, so a stored
            # bf16 value may differ by one ulp (a sample written to the wrong place differs by far more)
            np.testing.assert_allclose(_stored(done, split, start).astype(np.float32),
                                       _stored(ref, split, start).astype(np.float32), rtol=2**-7, atol=1e-7)
    assert _run(ctx, run_collect)["written_samples"] == 0  # complete: nothing left


def test_store_from_other_data_is_refused(env, collected):
    other = env["data"] / "other_train.jsonl"
    other.write_text("".join(json.dumps({"text": t}) + "\n" for t in _text(7, 12)))
    ctx = _ctx(env, f"distill.data.train=[{other}]")
    with pytest.raises(UserError, match=r"block_inputs: this block-input store was collected from different data \(data\.") as e:
        _run(ctx, run_collect)
    assert "tokens_sha256" in str(e.value) and "train_files" in str(e.value)


def test_disk_check_refuses_and_can_be_overridden(env, collected, monkeypatch):
    monkeypatch.setattr(collect_mod, "free_bytes", lambda path: 1000)
    ctx = _ctx(env, f"block.store={env['root'] / 'small_disk'}")
    with pytest.raises(UserError, match=r"small_disk has 1000 B free but the block inputs still need 96\.00 KiB \(98,304 bytes\).*ignore_disk_check"):
        _run(ctx, run_collect)
    ctx = _ctx(env, f"block.store={env['root'] / 'small_disk'}", "block.ignore_disk_check=true", "block.max_train_samples=2", "block.max_val_samples=2")
    assert _run(ctx, run_collect)["written_samples"] == 4


def _trainable_grads(model, loss_fn, batch):
    """(trainable params, metrics, grads) of `loss_fn` at the model's current parameters (traceable)."""
    split = split_model(model, nnx.Any(FeatureMapParam, WindowParam))

    def f(trainable):
        return loss_fn(split.merge(trainable), batch)

    (_, metrics), grads = jax.value_and_grad(f, has_aux=True)(split.trainable)
    return split.trainable, metrics, grads


def _grads_fn(loss_fn):
    """Jitted (model, batch) → (trainable params, metrics, grads)."""
    return jax.jit(lambda model, batch: _trainable_grads(model, loss_fn, batch))


def test_blockwise_equals_joint_attention_transfer_at_step_0(collected):
    """Per-layer losses and gradients of each block from its stored inputs equal the joint stage's."""
    ctx, summary = collected
    cfg = ctx.cfg
    store = BlockInputStore.open(Path(summary["store"]))
    tokens = jnp.asarray(distill_samples(ctx)["train"][:2])
    positions = jnp.broadcast_to(jnp.arange(T), tokens.shape)
    kw = {"mse_factor": 1000.0, "xent_factor": 0.0}
    with compat.set_mesh(ctx.mesh):
        joint = load_base(ctx, linearize=True)
        j_params, j_metrics, j_grads = _grads_fn(lambda m, b: distill_loss(m, b, **kw))(joint, {"input_ids": tokens})
        softmax = load_base(ctx, linearize=False)
        _, aux = jax.jit(lambda m: m.run_layers(m.embed_tokens(tokens), positions, mode="collect"))(softmax)
        blocks = partition(full_options(cfg, ctx.llama_cfg).layer_kinds, cfg.block.size)
        assert [(b.lin_start, b.lin_stop) for b in blocks] == [(0, 1), (1, 3)]  # layer 1 stays softmax
        N = 3
        j_mse = np.asarray(j_metrics["layer_mse"])
        for b in blocks:
            model = load_block_model(cfg, ctx.llama_cfg, b, ctx.mesh)
            b_init = split_model(model, nnx.Any(FeatureMapParam, WindowParam)).trainable
            for key in j_params:  # the block starts from the joint model's initialisation of its layers
                np.testing.assert_array_equal(np.asarray(b_init[key]), np.asarray(j_params[key])[b.lin_start : b.lin_stop])
            rows, n = slice(b.lin_start, b.lin_stop), b.num_linear
            stored = _stored(store, "train", b.start)[:2].astype(np.float32)  # bf16 values, exactly
            direct = np.asarray(aux[b.start]["input"])  # float32 residual stream of the same forward
            grads_of = _grads_fn(lambda m, bt: block_distill_loss(m, bt, **kw))
            # float32 inputs: equal to float precision; the stored bf16 inputs: within their rounding (seen: ~3e-3)
            for x, rtol_mse, rtol_grad in ((direct, 1e-5, 1e-4), (stored, 5e-3, 2e-2)):
                _, b_metrics, b_grads = grads_of(model, {"hidden": x})
                np.testing.assert_allclose(np.asarray(b_metrics["layer_mse"]), j_mse[rows], rtol=rtol_mse)
                # the joint loss averages over N layers, the block's over its n: gradients differ by exactly n / N
                for key in j_grads:
                    g_j = np.asarray(j_grads[key])[rows] * N
                    g_b = np.asarray(b_grads[key]) * n
                    assert np.linalg.norm(g_b - g_j) <= rtol_grad * np.linalg.norm(g_j), (key, b.index)


def _subprocess_env(env) -> dict:
    e = dict(os.environ, LOLCATS_DATA_CACHE=str(env["cache"]), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", JAX_PLATFORMS="cpu")
    e.pop("XLA_FLAGS", None)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def test_concurrent_block_jobs_then_stitch(env, collected):
    ctx = collected[0]
    run_dir = Path(ctx.cfg.run.dir)
    cmd = [sys.executable, "-m", "lolcats_jax.train", "--config", str(env["config"]), "--stage", "distill_block"]
    procs = [
        subprocess.Popen(cmd + [f"block.index={i}"], cwd=REPO, env=_subprocess_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in (0, 1)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"block {i} job failed:\n{out[-3000:]}"
        assert (block_dir(run_dir, i) / "done.json").is_file() and (block_dir(run_dir, i) / "metrics.jsonl").is_file()
    # the job finishing last saw every block done and marked the stage finished
    assert json.loads((run_dir / "distill_block" / "done.json").read_text())["missing_blocks"] == []

    # block.index=all now finds both blocks finished and completes the stage without training
    summary = _run(ctx, run_distill_block)
    assert summary["partial"] is False and summary["missing_blocks"] == []

    _run(ctx, run_stitch)
    full_keys = {"lolcats/fmap_q": (3, 4, 16, 8), "lolcats/fmap_k": (3, 4, 16, 8), "lolcats/window_logit": (3, 4)}
    target = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in full_keys.items()}
    rep = jax.sharding.NamedSharding(ctx.mesh, jax.sharding.PartitionSpec())
    stitched, meta = load_params(run_dir / "stitch" / "final", target, {k: rep for k in full_keys})
    for i, (lo, hi) in enumerate([(0, 1), (1, 3)]):
        part = {k: jax.ShapeDtypeStruct((hi - lo, *s[1:]), jnp.float32) for k, s in full_keys.items()}
        block_final, _ = load_params(block_dir(run_dir, i) / "final", part, {k: rep for k in full_keys})
        for k in full_keys:
            np.testing.assert_array_equal(np.asarray(stitched[k])[lo:hi], np.asarray(block_final[k]))
    with compat.set_mesh(ctx.mesh):  # the full linearized model takes the stitched parameters (as finetune does)
        model = load_base(ctx, linearize=True)
        load_stage_params(ctx, model, "stitch")
        np.testing.assert_array_equal(np.asarray(model.lolcats.fmap_q[...]), np.asarray(stitched["lolcats/fmap_q"]))

    # a duplicated block (a stray copy covering layers 0-1) and a missing one are refused by name
    shutil.copytree(block_dir(run_dir, 0), block_dir(run_dir, 2))
    with pytest.raises(UserError, match=r"layer 0 is covered twice, by block 0 .* and by block 2"):
        _run(ctx, run_stitch)
    shutil.rmtree(block_dir(run_dir, 2))
    shutil.move(block_dir(run_dir, 1), run_dir / "block_1_away")
    with pytest.raises(UserError, match=r"no trained result for block 1 \(layers 2-3\).*block\.index=1"):
        _run(ctx, run_stitch)
    # a job of one block while another is missing leaves the stage unfinished (the runner writes no done.json)
    (run_dir / "distill_block" / "done.json").unlink()
    result = run(load_config(env["config"], ["block.index=0"]), only_stage="distill_block")
    assert result["distill_block"]["partial"] and result["distill_block"]["missing_blocks"] == [1]
    assert not (run_dir / "distill_block" / "done.json").exists()
    shutil.move(run_dir / "block_1_away", block_dir(run_dir, 1))


def test_plan_matches_block_model(collected):
    ctx = collected[0]
    plan = blockwise_plan(ctx.cfg, ctx.llama_cfg, tokens=1_000_000)
    assert plan["num_blocks"] == 2 and plan["block_starts"] == [0, 2]
    assert plan["collect_disk_bytes"] == 2 * 1_000_000 * 64 * 2
    blocks = partition(full_options(ctx.cfg, ctx.llama_cfg).layer_kinds, 2)
    with compat.set_mesh(ctx.mesh):
        for b, row in list(zip(blocks, plan["blocks"]))[1:]:  # block 1: two linearized layers after a softmax one
            model = load_block_model(ctx.cfg, ctx.llama_cfg, b, ctx.mesh)
            layers = nnx.state(model.layers)
            assert row["param_bytes"] == sum(x.nbytes for x in jax.tree.leaves(layers))
            trainable = split_model(model, nnx.Any(FeatureMapParam, WindowParam)).trainable
            assert row["trainable_bytes"] == sum(x.nbytes for x in trainable.values())
            assert row["optimizer_bytes"] >= 2 * row["trainable_bytes"]  # Adam's two moments
            assert row["activation_bytes_per_sample"] > 0
    init = initial_attention(ctx.cfg, ctx.llama_cfg, blocks[1], seed=0)
    assert init["lolcats/fmap_q"].shape == (2, 4, 16, 8)


@pytest.mark.multiprocess
def test_two_process_collect_writes_own_ranges(env, collected):
    """2 local processes (jax.distributed on 127.0.0.1): each writes its own sample range; the store equals the
    one-process store."""
    import portpicker

    ref = BlockInputStore.open(Path(collected[1]["store"]))
    store = env["root"] / "two_process_store"
    port = portpicker.pick_unused_port()
    cmd = [sys.executable, "-m", "lolcats_jax.train", "--config", str(env["config"]), "--stage", "collect", f"block.store={store}",
           f"run.dir={env['root'] / 'run2'}", f"run.coordinator=127.0.0.1:{port}", "run.num_processes=2"]
    procs = [
        subprocess.Popen(cmd + [f"run.process_id={i}"], cwd=REPO, env=_subprocess_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    markers = sorted(p.name for p in (store / "progress").iterdir())
    assert markers == ["train.0-4.json", "train.4-8.json", "validation.0-2.json", "validation.2-4.json"]
    two = BlockInputStore.open(store)
    assert two.meta["complete"] and two.fingerprint_id == ref.fingerprint_id
    for split in ("train", "validation"):
        for start in (0, 2):
            a, b = _stored(two, split, start).astype(np.float32), _stored(ref, split, start).astype(np.float32)
            np.testing.assert_allclose(a, b, rtol=2**-7, atol=1e-6)  # other sharding: at most a bf16 rounding apart
