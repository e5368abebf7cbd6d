"""AdamW with weight decay on matrices only, linear warmup + cosine decay (nanoGPT's schedule), global-norm clipping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from llmjax.config import TrainConfig


def learning_rate(step: jax.Array, tc: TrainConfig) -> jax.Array:
    """Linear warmup to `learning_rate`, cosine decay to `min_lr` at `lr_decay_iters`, then constant."""
    decay_iters = tc.lr_decay_iters or tc.max_iters
    step = jnp.asarray(step, jnp.float32)
    warmup = tc.learning_rate * (step + 1) / (tc.warmup_iters + 1)
    progress = jnp.clip((step - tc.warmup_iters) / max(decay_iters - tc.warmup_iters, 1), 0.0, 1.0)
    cosine = tc.min_lr + 0.5 * (1.0 + jnp.cos(jnp.pi * progress)) * (tc.learning_rate - tc.min_lr)
    return jnp.where(step < tc.warmup_iters, warmup, cosine)


def decay_mask(param_axes: dict) -> dict:
    """Decay weight matrices and embeddings, not norms or biases (a stacked layer axis doesn't make a matrix).

    A matrix maps to or from the model width or MLA's latent, so it has an "embed" or "latent" axis; the QKV bias
    [L, K, G+2, E] has three axes but neither of them.
    """
    def is_matrix(axes: tuple) -> bool:
        return ("embed" in axes or "latent" in axes) and sum(a != "layers" for a in axes) >= 2

    return jax.tree.map(is_matrix, param_axes, is_leaf=lambda x: isinstance(x, tuple))


def make_optimizer(tc: TrainConfig, param_axes: dict) -> optax.GradientTransformation:
    adamw = optax.adamw(
        lambda step: learning_rate(step, tc), b1=tc.beta1, b2=tc.beta2, weight_decay=tc.weight_decay,
        mask=decay_mask(param_axes),
    )
    if tc.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(tc.grad_clip), adamw)
    return adamw
