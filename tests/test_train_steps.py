"""One attention-transfer step and one LoRA step against independent reference computations (transformers/PyTorch
for the teacher stream, the projections and LoRA; the float64 quadratic LoLCATS reference for the student), and
sharded (8 fake devices) vs single-device steps."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from lolcats_jax import compat
from lolcats_jax.config import OptimizerConfig, load_config
from lolcats_jax.model import FeatureMapParam, LlamaConfig, LoraParam, WindowParam
from lolcats_jax.model.build import model_options
from lolcats_jax.sharding import MeshShape, make_mesh
from lolcats_jax.train.losses import distill_loss, finetune_loss, lm_loss
from lolcats_jax.train.optim import make_optimizer
from lolcats_jax.train.step import build_steps, split_model
from tests.train_fixtures import write_tiny_model

LR = 1e-2


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir):
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model", smollm2_dir)


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3", "mixtral"])
def family_dir(request, tmp_path_factory, smollm2_dir):
    """The tiny model of each supported family (Qwen2: q/k/v biases; Qwen3: q/k RMSNorm; Mixtral: 4 experts, top 2)."""
    if request.param == "llama":
        return request.getfixturevalue("tiny_dir")
    return write_tiny_model(tmp_path_factory.mktemp(request.param) / "model", smollm2_dir, family=request.param)


def _cfg(tiny_dir, *extra):
    return load_config("configs/smollm2_demo.yaml", [
        f"model.path={tiny_dir}", "model.param_dtype=float32", "attention.window_size=8", "attention.feature_dim=8",
        "attention.chunk_size=8", "attention.feature_init=kaiming", "attention.softmax_layers=[1]", *extra,
    ])


def _load(cfg, mesh, lora=None):
    from convert.hf_to_flax import load_hf_params

    lc = LlamaConfig.from_hf_dir(cfg.model.path)
    return load_hf_params(cfg.model.path, mesh, param_dtype="float32", opts=model_options(cfg, lc.num_layers, lora=lora), seed=3)


def _tokens(B, T, seed=0):
    return np.random.RandomState(seed).randint(0, 40000, (B, T)).astype(np.int32)


def _torch_model(path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager",
                                                             local_files_only=True).eval()


def _torch_qkv_and_teacher(tm, tokens, layer):
    """Post-RoPE q, k, v (B,T,H,D) with k/v repeated to H heads and the teacher's per-head attention output
    (before o_proj) of `layer`, from transformers' own modules and hidden states."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    ids = torch.tensor(tokens, dtype=torch.long)
    with torch.no_grad():
        hs = tm(ids, output_hidden_states=True).hidden_states[layer]
        L = tm.model.layers[layer]
        h = L.input_layernorm(hs)
        B, T, _ = h.shape
        cfg = tm.config
        H, K, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q = L.self_attn.q_proj(h).view(B, T, H, D)
        k = L.self_attn.k_proj(h).view(B, T, K, D)
        if hasattr(L.self_attn, "q_norm"):  # Qwen3: transformers' own per-head norms, before RoPE
            q, k = L.self_attn.q_norm(q), L.self_attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = L.self_attn.v_proj(h).view(B, T, K, D).transpose(1, 2)
        pos = torch.arange(T)[None].expand(B, T)
        cos, sin = tm.model.rotary_emb(v, pos)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = repeat_kv(k, H // K), repeat_kv(v, H // K)
        scores = (q @ k.transpose(-1, -2)) / D**0.5
        scores = scores.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool)), float("-inf"))
        y = torch.softmax(scores, -1) @ v
    t = lambda x: np.asarray(x.transpose(1, 2).double().numpy())  # (B,T,H,D)
    return t(q), t(k), t(v), t(y)


@pytest.mark.slow
def test_distill_step_matches_reference(family_dir):
    from kernels.lolcats import FeatureMapParams, lolcats_attention_reference

    tiny_dir = family_dir
    cfg = _cfg(tiny_dir)
    mesh = make_mesh(MeshShape(1, 1, 1), devices=jax.devices()[:1])
    tokens = _tokens(2, 24)
    with compat.set_mesh(mesh):
        model = _load(cfg, mesh)
        split = split_model(model, nnx.Any(FeatureMapParam, WindowParam))
        loss_fn = functools.partial(distill_loss, mse_factor=1000.0, xent_factor=0.0)
        batch = {"input_ids": jnp.asarray(tokens), "labels": jnp.asarray(tokens)}
        (loss, _), grads = jax.value_and_grad(lambda t: loss_fn(split.merge(t), batch), has_aux=True)(split.trainable)
        tx = make_optimizer(OptimizerConfig(lr=LR, weight_decay=0.0))
        init_opt, train, _, _ = build_steps(split, tx, loss_fn, mesh)
        before = jax.tree.map(np.asarray, split.trainable)
        after, _, metrics = train(split.trainable, init_opt(split.trainable), split.frozen, jax.tree.map(lambda x: x[None], batch), jnp.float32(LR),
                                jax.random.PRNGKey(0))
    # independent reference: teacher stream + projections from transformers, student from the float64 reference
    tm = _torch_model(tiny_dir)
    lin_layers = [0, 2]  # layer 1 stays softmax
    spec = model.opts.lolcats.spec()
    with compat.enable_x64():
        def ref_loss(fq, fk, th):
            total = 0.0
            for n, layer in enumerate(lin_layers):
                q, k, v, y_t = (jnp.asarray(a) for a in _torch_qkv_and_teacher(tm, tokens, layer))
                fm = FeatureMapParams(wq=fq[n], wk=fk[n])
                y_s = lolcats_attention_reference(q, k, v, fm, th[n], spec)
                total = total + jnp.mean((y_s - y_t) ** 2)
            return 1000.0 * total / len(lin_layers)

        args = [jnp.asarray(before[k], jnp.float64) for k in ("lolcats/fmap_q", "lolcats/fmap_k", "lolcats/window_logit")]
        r_loss, r_grads = jax.value_and_grad(ref_loss, argnums=(0, 1, 2))(*args)
    assert abs(float(loss) - float(r_loss)) / float(r_loss) < 1e-4, (float(loss), float(r_loss))
    assert abs(float(metrics["loss"]) - float(r_loss)) / float(r_loss) < 1e-4
    for key, rg in zip(("lolcats/fmap_q", "lolcats/fmap_k", "lolcats/window_logit"), r_grads):
        g = np.asarray(grads[key], np.float64)
        rel = np.linalg.norm(g - np.asarray(rg)) / np.linalg.norm(np.asarray(rg))
        assert rel < 1e-3, (key, rel)
        # first AdamW step (wd 0): p - lr * m̂/(√v̂ + eps) with m̂ = g, v̂ = g²
        expected = before[key] - LR * g / (np.abs(g) + 1e-8)
        np.testing.assert_allclose(np.asarray(after[key]), expected, rtol=1e-5, atol=1e-6)
    assert set(after) == {"lolcats/fmap_q", "lolcats/fmap_k", "lolcats/window_logit"}  # nothing else is trainable


@pytest.mark.slow
def test_distill_gradient_with_attention_xent_matches_reference(tiny_dir):
    """mse_factor × MSE + xent_factor × attention-map cross-entropy: each layer's gradient is taken inside the layer
    (`layer.layer_local_grad`); loss, metrics and gradients against transformers' teacher stream and the float64
    full-map formulas (`lolcats_attention_reference`, `attention_xent_reference`)."""
    from kernels.lolcats import FeatureMapParams, lolcats_attention_reference
    from kernels.lolcats.xent import attention_xent_reference

    cfg = _cfg(tiny_dir)
    mesh = make_mesh(MeshShape(1, 1, 1), devices=jax.devices()[:1])
    tokens = _tokens(2, 24, seed=3)
    with compat.set_mesh(mesh):
        model = _load(cfg, mesh)
        split = split_model(model, nnx.Any(FeatureMapParam, WindowParam))
        loss_fn = functools.partial(distill_loss, mse_factor=1000.0, xent_factor=0.5)
        batch = {"input_ids": jnp.asarray(tokens), "labels": jnp.asarray(tokens)}
        (loss, metrics), grads = jax.jit(jax.value_and_grad(lambda t: loss_fn(split.merge(t), batch), has_aux=True))(split.trainable)
        before = jax.tree.map(np.asarray, split.trainable)
    tm = _torch_model(tiny_dir)
    lin_layers = [0, 2]  # layer 1 stays softmax
    spec = model.opts.lolcats.spec()
    teacher_np = [_torch_qkv_and_teacher(tm, tokens, layer) for layer in lin_layers]
    with compat.enable_x64():
        teacher = [[jnp.asarray(a, jnp.float64) for a in arrays] for arrays in teacher_np]

        def ref_terms(fq, fk, th):
            mse = xent = 0.0
            for n, (q, k, v, y_t) in enumerate(teacher):
                fm = FeatureMapParams(wq=fq[n], wk=fk[n])
                mse = mse + jnp.mean((lolcats_attention_reference(q, k, v, fm, th[n], spec) - y_t) ** 2)
                xent = xent + attention_xent_reference(q, k, fm, th[n], spec)
            return 1000.0 * mse / len(lin_layers), 0.5 * xent / len(lin_layers)

        args = [jnp.asarray(before[k], jnp.float64) for k in ("lolcats/fmap_q", "lolcats/fmap_k", "lolcats/window_logit")]
        r_mse, r_xent = ref_terms(*args)
        r_grads = jax.grad(lambda *a: sum(ref_terms(*a)), argnums=(0, 1, 2))(*args)
    assert float(r_xent) > 0.05 * float(r_mse)  # both terms matter to the gradient
    for got, want in ((metrics["mse"], r_mse), (metrics["xent"], r_xent), (loss, r_mse + r_xent)):
        assert abs(float(got) - float(want)) < 1e-4 * abs(float(want)), (float(got), float(want))
    for key, rg in zip(("lolcats/fmap_q", "lolcats/fmap_k", "lolcats/window_logit"), r_grads):
        g = np.asarray(grads[key], np.float64)
        rel = np.linalg.norm(g - np.asarray(rg)) / np.linalg.norm(np.asarray(rg))
        assert rel < 1e-3, (key, rel)


def _lora_weights(split, rng):
    """Random nonzero LoRA B (B starts at 0, which would hide the A gradient)."""
    out = dict(split.trainable)
    for k in out:
        if k.endswith("_b"):
            out[k] = jnp.asarray(rng.normal(0, 0.05, out[k].shape).astype(np.float32))
    return out


def test_lora_step_matches_torch(family_dir):
    tiny_dir = family_dir
    cfg = _cfg(tiny_dir, "attention.kind=softmax")
    mesh = make_mesh(MeshShape(1, 1, 1), devices=jax.devices()[:1])
    tokens = _tokens(2, 20, seed=1)
    labels = tokens.copy()
    labels[:, :5] = -100
    with compat.set_mesh(mesh):
        model = _load(cfg, mesh, lora=cfg.finetune.lora)
        split = split_model(model, LoraParam)
        weights = _lora_weights(split, np.random.RandomState(0))
        batch = {"input_ids": jnp.asarray(tokens), "labels": jnp.asarray(labels)}
        (loss, _), grads = jax.value_and_grad(lambda t: lm_loss(split.merge(t), batch), has_aux=True)(weights)
    # torch: W + (α/r)·B_t A_t as a differentiable function of leaf A_t, B_t
    tm = _torch_model(tiny_dir)
    scale = cfg.finetune.lora.alpha / cfg.finetune.lora.rank
    E = tm.config.hidden_size
    leaves, params = {}, dict(tm.named_parameters())
    for t in ("q", "k", "v", "o"):
        A = np.asarray(weights[f"lora/{t}_a"])
        Bm = np.asarray(weights[f"lora/{t}_b"])
        for i in range(tm.config.num_hidden_layers):
            if t == "o":
                a_t, b_t = A[i].reshape(-1, A.shape[-1]).T, Bm[i].T  # (R, H·D), (E, R)
            else:
                a_t, b_t = A[i].T, Bm[i].reshape(Bm.shape[1], -1).T  # (R, E), (out, R)
            a = torch.tensor(np.ascontiguousarray(a_t), requires_grad=True)
            b = torch.tensor(np.ascontiguousarray(b_t), requires_grad=True)
            leaves[(t, i)] = (a, b)
            name = f"model.layers.{i}.self_attn.{t}_proj.weight"
            params[name] = params[name].detach() + scale * (b @ a)
    logits = torch.func.functional_call(tm, params, (torch.tensor(tokens, dtype=torch.long),)).logits
    tgt = torch.tensor(labels[:, 1:], dtype=torch.long)
    ref_loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100)
    ref_loss.backward()
    assert abs(float(loss) - float(ref_loss)) / float(ref_loss) < 1e-5
    assert E == 64
    for (t, i), (a, b) in leaves.items():
        ga, gb = np.asarray(grads[f"lora/{t}_a"][i]), np.asarray(grads[f"lora/{t}_b"][i])
        ga_t = ga.reshape(-1, ga.shape[-1]).T if t == "o" else ga.T
        gb_t = gb.T if t == "o" else gb.reshape(gb.shape[0], -1).T
        for mine, ref in ((ga_t, a.grad.numpy()), (gb_t, b.grad.numpy())):
            rel = np.linalg.norm(mine - ref) / max(np.linalg.norm(ref), 1e-12)
            assert rel < 1e-4, (t, i, rel)


def test_kl_finetune_loss_against_the_transformers_teacher(tiny_dir):
    """finetune.kl_factor: KL(teacher ‖ student) with transformers' softmax model (no LoRA) as the teacher, worked out
    in float64 from its logits and ours; its gradient reaches LoRA only through the student (the teacher is constant)."""

    cfg = _cfg(tiny_dir)  # linearized layers + one softmax layer, T beyond the window so the linear part counts
    mesh = make_mesh(MeshShape(1, 1, 1), devices=jax.devices()[:1])
    tokens = _tokens(2, 24, seed=4)
    labels = tokens.copy()
    labels[:, :6] = -100
    batch = {"input_ids": jnp.asarray(tokens), "labels": jnp.asarray(labels)}
    with compat.set_mesh(mesh):
        model = _load(cfg, mesh, lora=cfg.finetune.lora)
        split = split_model(model, LoraParam)
        weights = _lora_weights(split, np.random.RandomState(1))
        loss_of = functools.partial(finetune_loss, xent_factor=0.5, kl_factor=2.0)
        (loss, metrics), grads = jax.value_and_grad(lambda t: loss_of(split.merge(t), batch), has_aux=True)(weights)
        student = np.asarray(split.merge(weights)(batch["input_ids"]), np.float64)
    with torch.no_grad():
        teacher = _torch_model(tiny_dir)(torch.tensor(tokens, dtype=torch.long)).logits.double().numpy()

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    ls, lt = log_softmax(student[:, :-1]), log_softmax(teacher[:, :-1])
    valid = labels[:, 1:] != -100
    kl = (np.exp(lt) * (lt - ls)).sum(-1)[valid].mean()
    nll = -np.take_along_axis(ls, np.where(valid, labels[:, 1:], 0)[..., None], -1)[..., 0][valid].mean()
    assert kl > 1e-3  # the linear attention and LoRA do move the student off the teacher here
    np.testing.assert_allclose(float(metrics["kl"]), kl, rtol=1e-4)
    np.testing.assert_allclose(float(metrics["xent"]), nll, rtol=1e-5)
    np.testing.assert_allclose(float(loss), 0.5 * nll + 2.0 * kl, rtol=1e-4)

    # the same loss with the teacher's logits as a constant: equal gradients, so nothing flows through the teacher
    t_logits = jnp.asarray(teacher, jnp.float32)
    mask = jnp.asarray(valid)

    def const_teacher(t):
        s = split.merge(t)(batch["input_ids"])[:, :-1]
        lps, lpt = jax.nn.log_softmax(s, -1), jax.nn.log_softmax(t_logits[:, :-1], -1)
        kl_t = jnp.sum(jnp.exp(lpt) * (lpt - lps), -1)
        nll_t = -jnp.take_along_axis(lps, jnp.where(mask, batch["labels"][:, 1:], 0)[..., None], -1)[..., 0]
        return (0.5 * jnp.sum(nll_t * mask) + 2.0 * jnp.sum(kl_t * mask)) / jnp.sum(mask)

    with compat.set_mesh(mesh):
        ref_grads = jax.grad(const_teacher)(weights)
    for k in grads:
        np.testing.assert_allclose(np.asarray(grads[k]), np.asarray(ref_grads[k]), rtol=2e-3, atol=1e-6, err_msg=k)


# Llama and Mixtral (the expert axis) both ways; Qwen2's q/k/v biases on the LoRA step and Qwen3's q/k norms on the
# distill step — the families share every other sharding rule, and each pair costs ~30-45 s of compilation; the LoRA
# step with KL to the softmax teacher (a second forward in the teacher's layer mode, a KL over the vocabulary) on Llama
@pytest.mark.parametrize("family_dir,kind", [("llama", "distill"), ("llama", "lora"), ("llama", "lora_kl"), ("qwen2", "lora"),
                                             ("qwen3", "distill"), ("mixtral", "distill"), ("mixtral", "lora")],
                         indirect=["family_dir"])
@pytest.mark.slow
def test_sharded_step_equals_single_device(family_dir, kind):
    cfg = _cfg(family_dir)
    tokens = _tokens(8, 40, seed=2)  # > 2W, so the linear part of the tk window is exercised
    batch = {"input_ids": jnp.asarray(tokens)[None], "labels": jnp.asarray(tokens)[None]}
    losses = []
    moe = LlamaConfig.from_hf_dir(family_dir).is_moe  # experts over 2 devices, rows over fsdp × expert
    sharded = MeshShape(1, 2, 2, 2) if moe else MeshShape(1, 4, 2)
    for mesh in (make_mesh(MeshShape(1, 1, 1), devices=jax.devices()[:1]), make_mesh(sharded)):
        with compat.set_mesh(mesh):
            if kind == "distill":
                model = _load(cfg, mesh)
                split = split_model(model, nnx.Any(FeatureMapParam, WindowParam))
                loss_fn = functools.partial(distill_loss, mse_factor=1000.0, xent_factor=0.0)
            else:
                model = _load(cfg, mesh, lora=cfg.finetune.lora)
                split = split_model(model, LoraParam)
                loss_fn = functools.partial(finetune_loss, xent_factor=0.5, kl_factor=2.0) if kind == "lora_kl" else lm_loss
            tx = make_optimizer(OptimizerConfig(lr=LR))
            init_opt, train, _, _ = build_steps(split, tx, loss_fn, mesh)
            t, o = split.trainable, init_opt(split.trainable)
            step_losses = []
            for _ in range(2):
                t, o, m = train(t, o, split.frozen, batch, jnp.float32(LR), jax.random.PRNGKey(0))
                step_losses.append(float(m["loss"]))
            losses.append(step_losses)
    np.testing.assert_allclose(losses[0], losses[1], rtol=2e-5)


@pytest.mark.slow
def test_lora_dropout_matches_torch_with_the_same_masks(tiny_dir):
    """h = W x + (α/r)·B A (m ⊙ x)/(1-p) (PEFT's lora_dropout) on every adapter, masks independent per layer and
    target, base path untouched: the JAX loss and LoRA gradients equal a torch computation that applies the same
    masks (read back from `lora_input` on ones) through forward hooks on transformers' projections."""
    from lolcats_jax.model.layer import lora_input

    p_drop = 0.3
    cfg = _cfg(tiny_dir, "attention.kind=softmax", f"finetune.lora.dropout={p_drop}")
    mesh = make_mesh(MeshShape(1, 1, 1), devices=jax.devices()[:1])
    tokens = _tokens(2, 12, seed=4)
    key = jax.random.PRNGKey(7)
    with compat.set_mesh(mesh):
        model = _load(cfg, mesh, lora=cfg.finetune.lora)
        split = split_model(model, LoraParam)
        weights = _lora_weights(split, np.random.RandomState(1))
        batch = {"input_ids": jnp.asarray(tokens), "labels": jnp.asarray(tokens)}
        loss_of = lambda t, k: lm_loss(split.merge(t), batch, k)[0]  # noqa: E731
        loss, grads = jax.value_and_grad(loss_of)(weights, key)
        assert float(loss_of(weights, key)) == float(loss)  # the same key, the same masks
        assert float(loss_of(weights, jax.random.PRNGKey(8))) != float(loss)
        no_drop = float(loss_of(weights, None))
        assert no_drop != float(loss)
        ctx = split.merge(weights)._ctx(jnp.zeros((2, 12), jnp.int32))
    tm = _torch_model(tiny_dir)
    H, D, E = tm.config.num_attention_heads, tm.config.head_dim, tm.config.hidden_size
    scale = cfg.finetune.lora.alpha / cfg.finetune.lora.rank
    leaves, handles, zeros = {}, [], 0
    for i, layer in enumerate(tm.model.layers):
        layer_key = jax.random.fold_in(key, i)
        for t in ("q", "k", "v", "o"):
            shape = (2, 12, H, D) if t == "o" else (2, 12, E)
            mask = np.asarray(lora_input(ctx, {"lora_dropout_key": layer_key}, t, jnp.ones(shape, jnp.float32)))
            assert set(np.unique(mask)) <= {0.0, np.float32(1 / (1 - p_drop))}
            zeros += int((mask == 0).sum())
            A, Bm = np.asarray(weights[f"lora/{t}_a"][i]), np.asarray(weights[f"lora/{t}_b"][i])
            a_t, b_t = (A.reshape(-1, A.shape[-1]).T, Bm.T) if t == "o" else (A.T, Bm.reshape(Bm.shape[0], -1).T)
            a = torch.tensor(np.ascontiguousarray(a_t), requires_grad=True)
            b = torch.tensor(np.ascontiguousarray(b_t), requires_grad=True)
            leaves[(t, i)] = (a, b)
            m = torch.tensor(mask.reshape(2, 12, -1))

            def hook(module, inputs, out, a=a, b=b, m=m):
                return out + scale * ((inputs[0] * m) @ a.T) @ b.T

            handles.append(getattr(layer.self_attn, f"{t}_proj").register_forward_hook(hook))
    assert 0.2 < zeros / (4 * len(tm.model.layers) * 2 * 12 * E) < 0.4  # about p of the inputs dropped
    logits = tm(torch.tensor(tokens, dtype=torch.long)).logits
    for h in handles:
        h.remove()
    tgt = torch.tensor(tokens[:, 1:], dtype=torch.long)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tgt.reshape(-1))
    ref.backward()
    assert abs(float(loss) - float(ref)) / float(ref) < 1e-5
    for (t, i), (a, b) in leaves.items():
        ga, gb = np.asarray(grads[f"lora/{t}_a"][i]), np.asarray(grads[f"lora/{t}_b"][i])
        ga_t = ga.reshape(-1, ga.shape[-1]).T if t == "o" else ga.T
        gb_t = gb.T if t == "o" else gb.reshape(gb.shape[0], -1).T
        for mine, theirs in ((ga_t, a.grad.numpy()), (gb_t, b.grad.numpy())):
            assert np.linalg.norm(mine - theirs) / max(np.linalg.norm(theirs), 1e-12) < 1e-4, (t, i)


def test_gradient_accumulation_traces_the_model_once_and_equals_one_big_batch(tiny_dir):
    """A=2 micro-batches of 2 sequences: the step's program holds one copy of forward+backward (the scan body, not a
    peeled first micro-batch beside it), and its gradient is that of the batch of 4 (equal token counts)."""
    cfg = _cfg(tiny_dir)
    mesh = make_mesh(MeshShape(1, 1, 1), devices=jax.devices()[:1])
    tokens = _tokens(4, 24, seed=5)
    with compat.set_mesh(mesh):
        split = split_model(_load(cfg, mesh, lora=cfg.finetune.lora), LoraParam)
        tx = make_optimizer(OptimizerConfig(lr=LR))
        init_opt, train, _, _ = build_steps(split, tx, lm_loss, mesh)
        opt = init_opt(split.trainable)

        def batch(A):
            x = jnp.asarray(tokens).reshape(A, 4 // A, 24)
            return {"input_ids": x, "labels": x}

        dots = {}
        for A in (1, 2):
            hlo = train.lower(split.trainable, opt, split.frozen, batch(A), jnp.float32(LR), jax.random.PRNGKey(0)).as_text()
            dots[A] = hlo.count("dot_general")
        assert dots[2] == dots[1], dots  # peeling the first micro-batch would double the model's dots
        fresh = lambda: jax.tree.map(jnp.copy, split.trainable)  # the step donates its parameters
        m = {A: train(fresh(), init_opt(fresh()), split.frozen, batch(A), jnp.float32(LR), jax.random.PRNGKey(0))[2]
             for A in (1, 2)}
    np.testing.assert_allclose(float(m[2]["loss"]), float(m[1]["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m[2]["grad_norm"]), float(m[1]["grad_norm"]), rtol=1e-4)


def test_batches_that_do_not_divide_the_mesh_degrade_to_what_divides(tiny_dir):
    """The 8B recipe's batch of 1 on an 8-device FSDP mesh: the batch is split over the axes it divides (here none),
    the step runs and equals the one-device step."""
    from lolcats_jax.train.loop import to_global_batch
    from lolcats_jax.train.step import batch_axes

    mesh8 = make_mesh(MeshShape(2, 4, 1))
    assert [batch_axes(mesh8, b) for b in (8, 2, 4, 1, 3)] == [("data", "fsdp"), ("data",), ("fsdp",), (), ()]
    cfg = _cfg(tiny_dir)
    tokens = _tokens(1, 24, seed=7)
    losses = []
    for mesh in (make_mesh(MeshShape(1, 1, 1), devices=jax.devices()[:1]), make_mesh(MeshShape(1, 8, 1))):
        with compat.set_mesh(mesh):
            split = split_model(_load(cfg, mesh), nnx.Any(FeatureMapParam, WindowParam))
            tx = make_optimizer(OptimizerConfig(lr=LR))
            init_opt, train, evaluate, _ = build_steps(split, tx, functools.partial(distill_loss, mse_factor=1000.0, xent_factor=0.0), mesh)
            batch = to_global_batch({"input_ids": tokens, "labels": tokens}, mesh, accumulate=1)
            assert batch["input_ids"].shape == (1, 1, 24)
            t, o = jax.tree.map(jnp.copy, split.trainable), init_opt(split.trainable)
            t, o, m = train(t, o, split.frozen, batch, jnp.float32(LR), jax.random.PRNGKey(0))
            ev = evaluate(t, split.frozen, to_global_batch({"input_ids": tokens, "labels": tokens}, mesh))
            losses.append((float(m["loss"]), float(ev["loss"])))
    np.testing.assert_allclose(losses[0], losses[1], rtol=2e-5)
