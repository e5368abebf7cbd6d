"""Shared by the decoding tests: spread-out random weights and greedy decoding by full recompute (no cache)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from llmjax import model
from llmjax.config import ModelConfig

apply = jax.jit(model.apply, static_argnames="cfg")


def random_params(cfg: ModelConfig, seed: int = 0) -> model.Params:
    """Weights of std 0.3 so logits are spread out and greedy choices are never near-ties."""
    rng = np.random.default_rng(seed)

    def make(spec: model.ParamSpec) -> jax.Array:
        base, std = {"ones": (1.0, 0.1), "zeros": (0.0, 0.1)}.get(spec.init, (0.0, 0.3))
        return jnp.asarray(base + std * rng.standard_normal(spec.shape), jnp.float32)

    return jax.tree.map(make, model.param_specs(cfg), is_leaf=lambda x: isinstance(x, model.ParamSpec))


def recompute_greedy(params: model.Params, prompt: list[int], n: int, cfg: ModelConfig) -> list[int]:
    """Greedy decoding without a cache: rerun the whole right-padded sequence every step (causal, and windowed when
    the config has a sliding window, through `apply`'s mask)."""
    seq = list(prompt)
    for _ in range(n):
        buf = np.zeros((1, cfg.block_size), np.int32)
        buf[0, : len(seq)] = seq
        seq.append(int(jnp.argmax(apply(params, jnp.asarray(buf), cfg)[0, len(seq) - 1])))
    return seq[len(prompt):]
