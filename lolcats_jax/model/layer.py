"""One decoder layer as a pure function of its (sliced) parameters, in the modes the project runs it in.

Notation: B batch, T tokens, E hidden, H query heads, K kv heads, D head dim, M MLP hidden, R LoRA rank.

Modes:
    forward   plain forward (softmax or LoLCATS attention, LoRA if present); aux = {}
    distill   teacher forcing for attention transfer: the layer returns the *teacher's* output (so every layer
              sees the softmax model's hidden stream) and aux holds the per-layer losses of the student
              attention against the teacher (MSE on per-head outputs before o_proj, optional attention xent) and
              their weighted sum, the layer's objective, whose gradient is taken inside the layer
              (`layer_local_grad`); make_body takes the weights as `mse_factor`, `xent_factor`
    collect   forward that also returns the layer's input hidden states (aux = {"input": x})
    teacher   the softmax teacher inside a linearized (and LoRA-adapted) model: softmax attention in every layer,
              no LoRA; aux = {}
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from lolcats_jax.model.llama import LOLCATS_PARAMS, LayerContext, apply_rope_ctx, causal_softmax_attention, rms_norm
from lolcats_jax.sharding import constrain


def _w(p: dict, name: str, dtype) -> jax.Array:
    return p[name].astype(dtype)


LORA_TARGET_IDS = {t: i for i, t in enumerate(("q", "k", "v", "o", "gate", "up", "down"))}


def lora_input(ctx: LayerContext, p: dict, target: str, x: jax.Array) -> jax.Array:
    """The adapter's input: x, or — in training steps with LoRA dropout — inverted dropout of x with this layer's
    key folded with the target (each adapter draws its own mask, as PEFT's per-module `lora_dropout`)."""
    key = p.get("lora_dropout_key")
    if key is None or ctx.lora_dropout <= 0:
        return x
    keep = 1.0 - ctx.lora_dropout
    mask = jax.random.bernoulli(jax.random.fold_in(key, LORA_TARGET_IDS[target]), keep, x.shape)
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


def _lora(ctx: LayerContext, p: dict, target: str, x: jax.Array, spec_in: str, spec_out: str) -> jax.Array | None:
    """Low-rank update (α/r)·B(A dropout(x)) for `target`, or None. x's contraction dims are `spec_in`."""
    if target not in ctx.lora_targets:
        return None
    x = lora_input(ctx, p, target, x)
    a = p[f"lora_{target}_a"].astype(x.dtype)
    b = p[f"lora_{target}_b"].astype(x.dtype)
    h = jnp.einsum(f"{spec_in},{spec_in[2:]}r->btr", x, a)
    return ctx.lora_scale * jnp.einsum(f"btr,r{spec_out}->bt{spec_out}", h, b)


def _proj(ctx, p, name, target, x, spec_in, spec_out):
    dt = x.dtype
    y = jnp.einsum(f"{spec_in},{spec_in[2:]}{spec_out}->bt{spec_out}", x, _w(p, name, dt))
    delta = _lora(ctx, p, target, x, spec_in, spec_out)
    return y if delta is None else y + delta.astype(dt)


def qkv(ctx: LayerContext, p: dict, x_BTE: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Post-RoPE q (B,T,H,D) and k, v (B,T,K,D) from the layer input (before the input norm)."""
    h = rms_norm(x_BTE, p["attn_norm"], ctx.cfg.rms_norm_eps)
    q = _proj(ctx, p, "wq", "q", h, "bte", "hd")
    k = _proj(ctx, p, "wk", "k", h, "bte", "kd")
    v = _proj(ctx, p, "wv", "v", h, "bte", "kd")
    if ctx.cfg.qkv_bias:  # Qwen2
        q, k, v = (x + _w(p, b, x.dtype) for x, b in ((q, "bq"), (k, "bk"), (v, "bv")))
    if ctx.cfg.qk_norm:  # Qwen3: per-head RMSNorm over head_dim, before RoPE
        q = rms_norm(q, p["q_norm"], ctx.cfg.rms_norm_eps)
        k = rms_norm(k, p["k_norm"], ctx.cfg.rms_norm_eps)
    q = constrain(apply_rope_ctx(ctx, q), ("batch", "seq", "act_heads", None))
    k = constrain(apply_rope_ctx(ctx, k), ("batch", "seq", "act_kv_heads", None))
    v = constrain(v, ("batch", "seq", "act_kv_heads", None))
    return q, k, v


def attn_out(ctx: LayerContext, p: dict, y_BTHD: jax.Array) -> jax.Array:
    dt = y_BTHD.dtype
    o = jnp.einsum("bthd,hde->bte", y_BTHD, _w(p, "wo", dt))
    if "o" in ctx.lora_targets:
        a = p["lora_o_a"].astype(dt)
        b = p["lora_o_b"].astype(dt)
        y_in = lora_input(ctx, p, "o", y_BTHD)
        o = o + ctx.lora_scale * jnp.einsum("btr,re->bte", jnp.einsum("bthd,hdr->btr", y_in, a), b)
    return constrain(o, ("batch", "seq", "act_embed"))


def mlp(ctx: LayerContext, p: dict, x_BTE: jax.Array) -> jax.Array:
    h = rms_norm(x_BTE, p["mlp_norm"], ctx.cfg.rms_norm_eps)
    if ctx.cfg.is_moe:  # Mixtral: routed experts
        from lolcats_jax.model.moe import moe_mlp

        return moe_mlp(ctx, p, h)
    gate = _proj(ctx, p, "w_gate", "gate", h, "bte", "m")
    up = _proj(ctx, p, "w_up", "up", h, "bte", "m")
    act = constrain(jax.nn.silu(gate) * up, ("batch", "seq", "act_mlp"))
    return _proj(ctx, p, "w_down", "down", act, "btm", "e")


def fmap_params(p: dict):
    from kernels.lolcats import FeatureMapParams

    return FeatureMapParams(wq=p["fmap_q"], wk=p["fmap_k"], bq=p.get("fbias_q"), bk=p.get("fbias_k"))


def lolcats_attention_fn(ctx: LayerContext, p: dict, q, k, v):
    """LoLCATS attention of one layer; kernels that XLA cannot partition (Pallas, Triton) run per shard."""
    from kernels.lolcats import Backend, resolve_backend
    from lolcats_jax.model.kernel_shards import OPAQUE_BACKENDS, per_shard

    lo = ctx.opts.lolcats
    spec, fmap = lo.spec(), fmap_params(p)
    feature_dim = 0 if spec.form == "softmax" else fmap.wq.shape[-1]
    backend = resolve_backend(Backend(lo.backend), spec, (q.shape, v.shape, feature_dim))
    attend = functools.partial(_attend, spec=spec, backend=backend)
    args = (q, k, v, fmap, p["window_logit"])  # k, v keep their K heads: every backend reads them grouped
    return per_shard(attend, *args) if backend in OPAQUE_BACKENDS else attend(*args)


def _attend(q, k, v, fmap, theta_H, *, spec, backend):
    from kernels.lolcats import lolcats_attention

    return lolcats_attention(q, k, v, fmap, theta_H, spec, backend=backend)


def student_objective(ctx: LayerContext, p: dict, teacher: dict, *, mse_factor: float,
                      xent_factor: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One layer's attention-transfer objective, mse_factor × MSE of the per-head outputs + xent_factor × the
    attention-map cross-entropy (left out when 0), from its student parameters `p` (feature maps, window factors) and
    the teacher's `q`, `k`, `v` and attention output `y` (`teacher`); and the two terms unscaled."""
    q, k, v = teacher["q"], teacher["k"], teacher["v"]
    y_student = lolcats_attention_fn(ctx, p, q, k, v)
    diff = y_student.astype(jnp.float32) - teacher["y"].astype(jnp.float32)
    terms = {"mse": jnp.mean(diff * diff)}
    objective = mse_factor * terms["mse"]
    if xent_factor > 0:
        from kernels.lolcats import attention_xent

        terms["xent"] = attention_xent(q, k, v, fmap_params(p), p["window_logit"], ctx.opts.lolcats.spec())
        objective = objective + xent_factor * terms["xent"]
    return objective, terms


def layer_local_grad(loss_fn: Callable[[dict, dict], tuple[jax.Array, dict]], params: dict,
                     consts: dict) -> tuple[jax.Array, dict]:
    """`loss_fn(params, consts)` → (scalar, aux), with the scalar's gradient in `params` taken at once, in the forward
    pass; aux is returned without gradient.

    In attention transfer a layer's objective depends on nothing trainable but its own student parameters (the
    teacher's q, k, v and output are constants), so its gradient can be computed right after its forward, inside the
    layer scan; the backward pass then only scales that gradient by the objective's cotangent. Nothing but the (small)
    parameter gradients is kept across layers, where plain autodiff of the scan would stack every layer's student
    activations for a reverse scan. Same value and gradient. `consts` get zero cotangents: the caller stops their
    gradients."""
    const_shapes = jax.tree.map(lambda c: jax.ShapeDtypeStruct(c.shape, c.dtype), consts)

    @jax.custom_vjp
    def f(pp, cc):
        return loss_fn(pp, cc)

    def fwd(pp, cc):
        (value, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(pp, cc)
        return (value, aux), grads

    def bwd(grads, ct):
        ct_value, _ = ct  # aux leaves f only through stop_gradient below: its cotangents are zero
        return (jax.tree.map(lambda g: (ct_value * g).astype(g.dtype), grads),
                jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), const_shapes))

    f.defvjp(fwd, bwd)
    value, aux = f(params, consts)
    return value, jax.lax.stop_gradient(aux)


def make_body(ctx: LayerContext, kind: str, mode: str, **kw) -> Callable[[jax.Array, dict], tuple[jax.Array, Any]]:
    if mode not in ("forward", "distill", "collect", "teacher"):
        raise ValueError(f"unknown layer mode {mode!r}")
    if mode == "teacher":
        ctx = dataclasses.replace(ctx, lora_targets=())
        kind = "softmax"

    def body(x_BTE: jax.Array, p: dict):
        aux: dict[str, jax.Array] = {}
        if mode == "collect":
            aux["input"] = x_BTE
        if mode == "distill":
            x_BTE = jax.lax.stop_gradient(x_BTE)
        q, k, v = qkv(ctx, p, x_BTE)
        if kind == "softmax":
            y = causal_softmax_attention(q, k, v)
        elif mode == "distill":
            y_teacher = jax.lax.stop_gradient(causal_softmax_attention(q, k, v))
            q_s, k_s, v_s = (jax.lax.stop_gradient(t) for t in (q, k, v))
            student = {name: p[name] for name in LOLCATS_PARAMS if name in p}
            teacher = {"q": q_s, "k": k_s, "v": v_s, "y": y_teacher}
            objective = functools.partial(student_objective, ctx, mse_factor=kw["mse_factor"], xent_factor=kw["xent_factor"])
            aux["objective"], terms = layer_local_grad(objective, student, teacher)
            aux.update(terms)
            y = y_teacher
        else:
            y = lolcats_attention_fn(ctx, p, q, k, v)
        x_BTE = x_BTE + attn_out(ctx, p, y.astype(x_BTE.dtype))
        x_BTE = x_BTE + mlp(ctx, p, x_BTE)
        return x_BTE, aux

    return body
