"""Reward model: the LM trunk with a scalar head read at the last response token, trained on preference pairs.

Bradley–Terry: P(chosen ≻ rejected) = σ(r(chosen) − r(rejected)), so the loss is −log σ(margin) per pair. Only
differences are learned; `normalizer` fixes the offset and scale so rewards have mean 0 and std 1 over reference
policy samples (Ziegler et al. 2019), which makes a KL coefficient mean the same thing for every reward model.

Params are `{"trunk": LM params, "head": {"w_D", "b"}}`; the trunk starts from the pretrained LM (its unembedding
is unused). The value model of PPO has the same shape (`values` reads the head at every response state).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from llmjax import model
from llmjax.config import ModelConfig
from llmjax.rl.rollout import row_hidden
from llmjax.train import Batch, LossFn

Pairs = dict[str, np.ndarray]  # prompt_BP, prompt_lens_B, {chosen,rejected}_BN, {chosen,rejected}_len_B, ...


def init(lm_params: model.Params, cfg: ModelConfig, key: jax.Array, head_std: float = 0.0) -> model.Params:
    """A scalar model on a copy of `lm_params`; head_std = 0 starts it at 0 everywhere (a value model's start)."""
    head = {"w_D": head_std * jax.random.normal(key, (cfg.n_embd,)), "b": jnp.zeros(())}
    return {"trunk": jax.tree.map(jnp.copy, lm_params), "head": head}


def _head(params: model.Params, h_xD: jax.Array) -> jax.Array:
    return h_xD.astype(jnp.float32) @ params["head"]["w_D"] + params["head"]["b"]


def scores(
    params: model.Params,
    prompt_BP: jax.Array,
    prompt_lens_B: jax.Array,
    tokens_BN: jax.Array,
    lengths_B: jax.Array,
    cfg: ModelConfig,
) -> jax.Array:
    """r_B: the head at each row's last response token (its EOS, or the last slot of a truncated response)."""
    h_BSD = row_hidden(params["trunk"], prompt_BP, prompt_lens_B, tokens_BN, cfg)
    last_B = prompt_BP.shape[1] + jnp.maximum(lengths_B, 1) - 1
    return _head(params, jnp.take_along_axis(h_BSD, last_B[:, None, None], axis=1)[:, 0])


def values(
    params: model.Params, prompt_BP: jax.Array, prompt_lens_B: jax.Array, tokens_BN: jax.Array, cfg: ModelConfig
) -> jax.Array:
    """V_BN: the head at the state before each response token (slot P − 1 + t)."""
    P, N = prompt_BP.shape[1], tokens_BN.shape[1]
    h_BSD = row_hidden(params["trunk"], prompt_BP, prompt_lens_B, tokens_BN, cfg)
    return _head(params, h_BSD[:, P - 1: P + N - 1])


def pair_scores(params: model.Params, batch: Batch, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """(r_chosen_B, r_rejected_B) in one forward pass over the 2B rows."""
    both = scores(
        params,
        jnp.concatenate([batch["prompt_BP"]] * 2),
        jnp.concatenate([batch["prompt_lens_B"]] * 2),
        jnp.concatenate([batch["chosen_BN"], batch["rejected_BN"]]),
        jnp.concatenate([batch["chosen_len_B"], batch["rejected_len_B"]]),
        cfg,
    )
    B = batch["prompt_BP"].shape[0]
    return both[:B], both[B:]


def bt_loss(cfg: ModelConfig) -> LossFn:
    """Σ_b weight_b · −log σ(r(chosen_b) − r(rejected_b)); weight_B = n_micro / B gives the mean over the batch."""

    def loss_fn(params: model.Params, batch: Batch, key: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        r_chosen_B, r_rejected_B = pair_scores(params, batch, cfg)
        return jnp.sum(batch["weight_B"] * jax.nn.softplus(r_rejected_B - r_chosen_B)), {}

    return loss_fn


_pair_scores = jax.jit(pair_scores, static_argnames="cfg")
PAIR_KEYS = ("prompt_BP", "prompt_lens_B", "chosen_BN", "rejected_BN", "chosen_len_B", "rejected_len_B")


def margins(params: model.Params, pairs: Pairs, cfg: ModelConfig, chunk: int = 256) -> np.ndarray:
    """r(chosen) − r(rejected) for every pair, in fixed-size chunks (one compile)."""
    n = len(pairs["prompt_BP"])
    out = []
    for i in range(0, n, chunk):
        rows = np.arange(i, i + chunk) % n
        part = {k: v[rows] for k, v in pairs.items() if k in PAIR_KEYS}
        r_chosen_B, r_rejected_B = _pair_scores(params, part, cfg=cfg)
        out.append(np.asarray(r_chosen_B - r_rejected_B))
    return np.concatenate(out)[:n]


def pairwise_accuracy(members: list[model.Params], pairs: Pairs, cfg: ModelConfig) -> dict[str, float]:
    """Agreement of an ensemble's mean score with the labels (chosen above rejected) and, where r* is known, with
    the true ordering."""
    m_B = np.mean([margins(params, pairs, cfg) for params in members], axis=0)
    out = {"acc_labels": float(np.mean(m_B > 0))}
    if "chosen_true_B" in pairs:
        true_B = pairs["chosen_true_B"] - pairs["rejected_true_B"]
        strict = true_B != 0
        out["acc_true"] = float(np.mean((m_B[strict] > 0) == (true_B[strict] > 0)))
    return out


def normalizer(scores_B: np.ndarray) -> dict[str, float]:
    """Offset and scale that give reference-policy samples mean 0 and std 1."""
    return {"mean": float(np.mean(scores_B)), "std": float(np.std(scores_B) + 1e-6)}


def normalized(scores_B: jax.Array, norm: dict[str, float]) -> jax.Array:
    return (scores_B - norm["mean"]) / norm["std"]
