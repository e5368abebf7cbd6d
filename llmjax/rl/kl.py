"""Per-token estimators of KL(π ‖ π_ref) from tokens sampled from π (Schulman, "Approximating KL divergence", 2020).

With log r = log π_ref(x) − log π(x) at a sample x ~ π:
  k1 = −log r             unbiased, high variance, can be negative per token;
  k2 = ½ (log r)²         biased (its mean is the χ²-like second-order term), low variance, ≥ 0;
  k3 = (r − 1) − log r    unbiased and ≥ 0 (GRPO's choice: E_π[r] = 1, and r − 1 − log r ≥ 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def k1(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    return logp - ref_logp


def k2(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    return 0.5 * (ref_logp - logp) ** 2


def k3(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    log_r = ref_logp - logp
    return jnp.expm1(log_r) - log_r
