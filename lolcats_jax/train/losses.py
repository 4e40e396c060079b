"""Training objectives.

Notation: B batch, T tokens, V vocabulary.

* attention transfer (reference §4.3): mse_factor × mean over linearized layers of MSE(student, teacher) on the
  per-head attention outputs before o_proj, + xent_factor × mean over layers of the attention-map cross-entropy.
  Every layer is teacher-forced (it receives and returns the softmax model's hidden stream), so the loss of layer ℓ
  depends only on layer ℓ's feature maps and window factors.
* finetuning: xent_factor × next-token cross-entropy on unmasked labels (labels == -100 are ignored) + kl_factor ×
  KL(teacher ‖ student) of the next-token distributions at the same positions, each a mean over counted tokens. The
  teacher is the model's own base weights with softmax attention and no LoRA, so the KL term pulls the linearized
  model towards the softmax model it replaces rather than towards the finetuning text.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lolcats_jax.model.llama import Llama

IGNORE = -100


def distill_loss(model: Llama, batch: dict, key: jax.Array | None = None, *, mse_factor: float,
                 xent_factor: float) -> tuple[jax.Array, dict]:
    del key  # attention transfer has no dropout
    tokens_BT = batch["input_ids"]
    B, T = tokens_BT.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    _, per_layer = model.run_layers(model.embed_tokens(tokens_BT), positions, mode="distill", mse_factor=mse_factor,
                                    xent_factor=xent_factor)
    return distill_objective(per_layer, mse_factor=mse_factor, xent_factor=xent_factor)


def distill_objective(per_layer: list, *, mse_factor: float, xent_factor: float) -> tuple[jax.Array, dict]:
    """The attention-transfer loss and metrics from the per-layer `aux` of a teacher-forced ("distill") run whose
    layers were given the same factors (shared by the joint stage and the block-wise one, which runs only a block's
    layers): the loss is the mean over linearized layers of each layer's objective, mse_factor × MSE + xent_factor ×
    attention cross-entropy (its gradient taken inside the layer); the metrics are the factor-scaled means of the two
    terms and the per-layer MSE."""
    lin = [a for a in per_layer if "objective" in a]
    loss = jnp.mean(jnp.stack([a["objective"] for a in lin]))
    mse_L = jnp.stack([a["mse"] for a in lin])
    metrics = {"loss": loss, "mse": mse_factor * jnp.mean(mse_L), "layer_mse": mse_L}
    if xent_factor > 0:
        metrics["xent"] = xent_factor * jnp.mean(jnp.stack([a["xent"] for a in lin]))
    return loss, metrics


def token_nll(logits_BTV: jax.Array, tokens_BT: jax.Array, labels_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-position negative log-likelihood of the next label and its validity mask, both (B, T-1)."""
    del tokens_BT
    logits = logits_BTV[:, :-1].astype(jnp.float32)
    targets = labels_BT[:, 1:]
    valid = targets != IGNORE
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return (logz - picked) * valid, valid


def lm_loss(model: Llama, batch: dict, key: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Next-token cross-entropy; `key` enables LoRA dropout (training steps pass one, evaluation does not)."""
    logits = model(batch["input_ids"], lora_dropout_key=key)
    nll, valid = token_nll(logits, batch["input_ids"], batch["labels"])
    n = jnp.sum(valid)
    loss = jnp.sum(nll) / jnp.maximum(n, 1)
    return loss, {"loss": loss, "tokens": n.astype(jnp.float32)}


def token_kl(student_BTV: jax.Array, teacher_BTV: jax.Array, labels_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-position KL(teacher ‖ student) of the next-token distributions, Σ_v p_t (log p_t − log p_s), and the
    validity mask (the positions `token_nll` counts), both (B, T-1)."""
    logp_s = jax.nn.log_softmax(student_BTV[:, :-1].astype(jnp.float32), axis=-1)
    logp_t = jax.nn.log_softmax(teacher_BTV[:, :-1].astype(jnp.float32), axis=-1)
    valid = labels_BT[:, 1:] != IGNORE
    kl = jnp.sum(jnp.exp(logp_t) * (logp_t - logp_s), axis=-1)
    return kl * valid, valid


def finetune_loss(model: Llama, batch: dict, key: jax.Array | None = None, *, xent_factor: float = 1.0,
                  kl_factor: float = 0.0) -> tuple[jax.Array, dict]:
    """xent_factor × next-token cross-entropy + kl_factor × KL(teacher ‖ student); metrics carry both terms unscaled
    ("xent" is the perplexity-bearing one whatever the factors)."""
    if kl_factor == 0:
        loss, metrics = lm_loss(model, batch, key)
        return xent_factor * loss, dict(metrics, loss=xent_factor * loss, xent=loss)
    logits = model(batch["input_ids"], lora_dropout_key=key)
    nll, valid = token_nll(logits, batch["input_ids"], batch["labels"])
    kl, _ = token_kl(logits, model.teacher_logits(batch["input_ids"]), batch["labels"])
    n = jnp.maximum(jnp.sum(valid), 1)
    xent, kl_mean = jnp.sum(nll) / n, jnp.sum(kl) / n
    loss = xent_factor * xent + kl_factor * kl_mean
    return loss, {"loss": loss, "xent": xent, "kl": kl_mean, "tokens": jnp.sum(valid).astype(jnp.float32)}


def finetune_loss_fn(section) -> functools.partial:
    """The finetune stage's loss from its config section (`FinetuneConfig`)."""
    return functools.partial(finetune_loss, xent_factor=section.xent_factor, kl_factor=section.kl_factor)
