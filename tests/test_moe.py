"""Mixture-of-experts MLP (Mixtral): routing and grouped dispatch against a dense float64 definition, LoRA on the
experts against transformers' own MixtralForCausalLM, and the expert-parallel step equal to one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lolcats_jax import compat
from lolcats_jax.config import OptimizerConfig, load_config
from lolcats_jax.model import LlamaConfig, LoraParam
from lolcats_jax.model.build import model_options
from lolcats_jax.model.moe import experts_local, route
from lolcats_jax.sharding import MeshShape, make_mesh
from lolcats_jax.train.losses import lm_loss
from lolcats_jax.train.optim import make_optimizer
from lolcats_jax.train.step import build_steps, split_model
from tests.train_fixtures import write_tiny_model

EXPERT_TARGETS = "[q,v,gate,up,down]"


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory, smollm2_dir):
    return write_tiny_model(tmp_path_factory.mktemp("mixtral") / "model", smollm2_dir, family="mixtral")


def _dense_reference(h, router, wg, wu, wd, k):
    """float64 numpy: every expert on every token, combined with the renormalised top-k softmax weights."""
    logits = h @ router
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    top = np.argsort(-p, axis=-1, kind="stable")[:, :k]
    w = np.zeros_like(p)
    np.put_along_axis(w, top, np.take_along_axis(p, top, -1), -1)
    w /= w.sum(-1, keepdims=True)
    silu = lambda x: x / (1 + np.exp(-x))  # noqa: E731
    per_expert = np.stack([(silu(h @ wg[x]) * (h @ wu[x])) @ wd[x] for x in range(len(wg))], 1)  # (N, X, E)
    return np.einsum("nx,nxe->ne", w, per_expert)


@pytest.mark.parametrize("k,skew", [(2, 0.0), (1, 0.0), (2, 3.0)], ids=["top2", "top1", "top2_skewed"])
def test_grouped_dispatch_equals_the_dense_definition(k, skew):
    """Every (token, choice) pair computed once by its expert, nothing dropped — also when the router sends most
    tokens to one expert and leaves others empty (`skew`); local expert slices add up to the whole."""
    rng = np.random.default_rng(0)
    N, E, M, X = 37, 16, 24, 4
    h = rng.standard_normal((N, E))
    router = rng.standard_normal((E, X))
    if skew:  # every token to expert 0, none to expert 3
        h[:, 0] = np.abs(h[:, 0]) + 1.0
        router[0, 0] += 10 * skew
        router[0, 3] -= 10 * skew
    wg, wu = rng.standard_normal((X, E, M)) / 4, rng.standard_normal((X, E, M)) / 4
    wd = rng.standard_normal((X, M, E)) / 5
    ref = _dense_reference(h, router, wg, wu, wd, k)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    w, idx = route(f32(h)[None], f32(router), k)
    w, idx = w[0], idx[0]
    whole = experts_local(f32(h), idx, w, {"w_gate": f32(wg), "w_up": f32(wu), "w_down": f32(wd)}, 0)
    np.testing.assert_allclose(np.asarray(whole), ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())
    halves = sum(experts_local(f32(h), idx, w, {"w_gate": f32(wg[s]), "w_up": f32(wu[s]), "w_down": f32(wd[s])}, s.start)
                 for s in (slice(0, 2), slice(2, 4)))
    np.testing.assert_allclose(np.asarray(halves), np.asarray(whole), rtol=1e-6, atol=1e-6)
    if skew:
        counts = np.bincount(np.asarray(idx).ravel(), minlength=X)
        assert counts[0] == N and counts[3] == 0, counts


def _cfg(model_dir, *extra):
    return load_config("configs/smollm2_demo.yaml", [
        f"model.path={model_dir}", "model.param_dtype=float32", "attention.kind=softmax",
        f"finetune.lora.targets={EXPERT_TARGETS}", *extra])


def _load(cfg, mesh):
    from convert.hf_to_flax import load_hf_params

    lc = LlamaConfig.from_hf_dir(cfg.model.path)
    opts = model_options(cfg, lc.num_layers, lora=cfg.finetune.lora)
    return load_hf_params(cfg.model.path, mesh, param_dtype="float32", opts=opts, seed=3)


def _tokens(B, T, seed):
    return np.random.RandomState(seed).randint(0, 40000, (B, T)).astype(np.int32)


def test_expert_lora_step_matches_torch(mixtral_dir):
    """LoRA on q, v and every expert's gate / up / down: loss and gradients equal transformers' MixtralForCausalLM
    with W + (α/r)·B A folded into its (fused) expert weights as differentiable functions of the adapters."""
    import transformers

    cfg = _cfg(mixtral_dir)
    mesh = make_mesh(MeshShape(1, 1, 1), devices=jax.devices()[:1])
    tokens = _tokens(2, 20, seed=1)
    labels = tokens.copy()
    labels[:, :4] = -100
    rng = np.random.RandomState(0)
    with compat.set_mesh(mesh):
        split = split_model(_load(cfg, mesh), LoraParam)
        weights = {k: (jnp.asarray(rng.normal(0, 0.05, v.shape).astype(np.float32)) if k.endswith("_b") else v)
                   for k, v in split.trainable.items()}
        batch = {"input_ids": jnp.asarray(tokens), "labels": jnp.asarray(labels)}
        (loss, _), grads = jax.value_and_grad(lambda t: lm_loss(split.merge(t), batch), has_aux=True)(weights)

    tm = transformers.AutoModelForCausalLM.from_pretrained(str(mixtral_dir), dtype=torch.float32, local_files_only=True,
                                                           attn_implementation="eager").eval()
    scale = cfg.finetune.lora.alpha / cfg.finetune.lora.rank
    params = dict(tm.named_parameters())
    leaf = lambda a: torch.tensor(np.ascontiguousarray(a), requires_grad=True)  # noqa: E731
    leaves = {}
    for i in range(tm.config.num_hidden_layers):
        for t in ("q", "v"):
            a, b = leaf(np.asarray(weights[f"lora/{t}_a"][i]).T), leaf(np.asarray(weights[f"lora/{t}_b"][i]).reshape(cfg.finetune.lora.rank, -1).T)
            leaves[(t, i)] = (a, b)
            name = f"model.layers.{i}.self_attn.{t}_proj.weight"
            params[name] = params[name].detach() + scale * (b @ a)
        gu, dn = f"model.layers.{i}.mlp.experts.gate_up_proj", f"model.layers.{i}.mlp.experts.down_proj"
        assert params[gu].shape[1] == 2 * tm.config.intermediate_size  # (X, 2M, E): gate rows, then up rows
        deltas = {}
        for t in ("gate", "up", "down"):  # ours per expert: A (in, R), B (R, out); HF matrices are (out, in)
            a = leaf(np.asarray(weights[f"lora/{t}_a"][i]).transpose(0, 2, 1))  # (X, R, in)
            b = leaf(np.asarray(weights[f"lora/{t}_b"][i]).transpose(0, 2, 1))  # (X, out, R)
            leaves[(t, i)] = (a, b)
            deltas[t] = scale * (b @ a)
        params[gu] = params[gu].detach() + torch.cat([deltas["gate"], deltas["up"]], dim=1)
        params[dn] = params[dn].detach() + deltas["down"]
    logits = torch.func.functional_call(tm, params, (torch.tensor(tokens, dtype=torch.long),)).logits
    tgt = torch.tensor(labels[:, 1:], dtype=torch.long)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100)
    ref.backward()
    assert abs(float(loss) - ref.item()) / ref.item() < 1e-5
    for (t, i), (a, b) in leaves.items():
        ga, gb = np.asarray(grads[f"lora/{t}_a"][i]), np.asarray(grads[f"lora/{t}_b"][i])
        if t in ("q", "v"):
            ga, gb = ga.T, gb.reshape(gb.shape[0], -1).T
        else:
            ga, gb = ga.transpose(0, 2, 1), gb.transpose(0, 2, 1)
        for mine, want in ((ga, a.grad.numpy()), (gb, b.grad.numpy())):
            rel = np.linalg.norm(mine - want) / max(np.linalg.norm(want), 1e-12)
            assert rel < 1e-4, (t, i, rel)


@pytest.mark.parametrize("shape", [MeshShape(1, 2, 2, 2), MeshShape(2, 1, 1, 4)], ids=["fsdp2_tensor2_expert2", "data2_expert4"])
def test_expert_parallel_lora_step_equals_one_device(mixtral_dir, shape):
    """Two LoRA steps (expert adapters included) with experts split over the `expert` axis and the batch over
    data × fsdp × expert give the losses and adapters of one device."""
    cfg = _cfg(mixtral_dir)
    tokens = _tokens(8, 24, seed=2)
    batch = {"input_ids": jnp.asarray(tokens)[None], "labels": jnp.asarray(tokens)[None]}
    runs = []
    for mesh in (make_mesh(MeshShape(1, 1, 1), devices=jax.devices()[:1]), make_mesh(shape)):
        with compat.set_mesh(mesh):
            split = split_model(_load(cfg, mesh), LoraParam)
            assert split.trainable["lora/gate_b"].ndim == 4  # (L, X, R, M): one adapter per expert
            tx = make_optimizer(OptimizerConfig(lr=1e-2))
            init_opt, train, _, _ = build_steps(split, tx, lm_loss, mesh)
            t, o, losses = split.trainable, init_opt(split.trainable), []
            for _ in range(2):
                t, o, m = train(t, o, split.frozen, batch, jnp.float32(1e-2), jax.random.PRNGKey(0))
                losses.append(float(m["loss"]))
            if mesh.size > 1:
                assert "expert" in str(split.frozen["layers"]["w_gate"].get_value().sharding.spec)
            runs.append((losses, jax.tree.map(np.asarray, t)))
    np.testing.assert_allclose(runs[0][0], runs[1][0], rtol=2e-5)
    for key in runs[0][1]:  # Adam's first steps are ±lr where a gradient is near 0: 1% of one step (lr 1e-2)
        np.testing.assert_allclose(runs[1][1][key], runs[0][1][key], rtol=1e-3, atol=1e-4, err_msg=key)


def test_expert_lora_dropout_is_refused(mixtral_dir):
    cfg = _cfg(mixtral_dir, "finetune.lora.dropout=0.1")
    with pytest.raises(ValueError, match="lora.dropout=0.1 with expert MLP targets"):
        _load(cfg, make_mesh(MeshShape(1, 1, 1), devices=jax.devices()[:1]))


def test_experts_stay_split_over_the_expert_axis(mixtral_dir):
    """The compiled sharded LoRA step never materialises a layer's full expert stack: each device gathers only the
    fsdp shards of its own experts (X/|expert| of them) — proof from XLA's partitioned program, not from timing."""
    cfg = _cfg(mixtral_dir)
    mesh = make_mesh(MeshShape(1, 2, 1, 2), devices=jax.devices()[:4])
    lc = LlamaConfig.from_hf_dir(mixtral_dir)
    X, E, M = lc.num_experts, lc.hidden_size, lc.intermediate_size
    tokens = jnp.asarray(_tokens(4, 16, seed=3))[None]
    with compat.set_mesh(mesh):
        split = split_model(_load(cfg, mesh), LoraParam)
        init_opt, train, _, _ = build_steps(split, make_optimizer(OptimizerConfig(lr=1e-2)), lm_loss, mesh)
        o = init_opt(split.trainable)
        hlo = train.lower(split.trainable, o, split.frozen, {"input_ids": tokens, "labels": tokens}, jnp.float32(1e-2),
                          jax.random.PRNGKey(0)).compile().as_text()
    local = f"f32[{X // 2},{E},{M}]"
    assert local in hlo  # a device's own experts, fsdp-gathered
    assert f"f32[{X},{E},{M}]" not in hlo and f"f32[{X},{M},{E}]" not in hlo
    assert f"f32[{lc.num_layers},{X},{E},{M}]" not in hlo


def test_cuda_lowering_runs_grouped_gemms_on_local_experts(mixtral_dir):
    """Lowered for CUDA (no GPU needed), the expert-parallel bf16 LoRA step runs its experts as XLA's native
    `chlo.ragged_dot` (a grouped GEMM, not a dense masked product) on each device's 2 of 4 experts, over the
    rows of its expert group: 1 local sequence × 2 devices × 16 tokens × top-2 = 64 rows."""
    import re

    cfg = _cfg(mixtral_dir, "model.param_dtype=bfloat16", "model.compute_dtype=bfloat16")
    mesh = make_mesh(MeshShape(1, 2, 1, 2), devices=jax.devices()[:4])
    tokens = jnp.asarray(_tokens(4, 16, seed=3))[None]
    with compat.set_mesh(mesh):
        split = split_model(_load(cfg, mesh), LoraParam)
        init_opt, train, _, _ = build_steps(split, make_optimizer(OptimizerConfig(lr=1e-2)), lm_loss, mesh)
        args = (split.trainable, init_opt(split.trainable), split.frozen, {"input_ids": tokens, "labels": tokens},
                jnp.float32(1e-2), jax.random.PRNGKey(0))
        with compat.cuda_lowering_context():
            text = train.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    sigs = [re.search(r":\s*\(tensor<([^>]*)>, tensor<([^>]*)>, tensor<([^>]*)>\)", line).groups()
            for line in text.splitlines() if '"chlo.ragged_dot"' in line]
    assert len(sigs) >= 3 * 2 * 2  # gate / up / down and their adapters, forward and backward
    assert {g for _, _, g in sigs} == {"2xi32"}  # the groups are the 2 local experts
    assert {lhs.split("x")[0] for lhs, _, _ in sigs} == {"64"}
    assert {rhs.split("x")[0] for _, rhs, _ in sigs if rhs.count("x") == 3} == {"2"}
