"""Direct preference optimisation (Rafailov et al. 2023) and its conservative (label-smoothed) and IPO variants.

With h = [log π(y_w) − log π_ref(y_w)] − [log π(y_l) − log π_ref(y_l)] (log-probs summed over each response's
tokens, EOS included), per pair:

  dpo   −log σ(β·h)                                  the Bradley–Terry likelihood of the implicit reward β·log π/π_ref;
  cdpo  −(1 − ε)·log σ(β·h) − ε·log σ(−β·h)          the labels are flipped with probability ε (label smoothing);
  ipo   (h − 1/(2β))²                                Azar et al. 2023: regress the margin to a finite target, so
                                                     deterministic preferences do not push h to infinity.

An optional SFT term adds `sft_coef` × the token-mean NLL of the chosen responses. The reference policy's summed
log-probs are computed once for the whole dataset (`reference_logprobs`) and travel with the batch: training needs
no reference model and no sampling.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from llmjax import model
from llmjax.config import ModelConfig
from llmjax.errors import UserError
from llmjax.rl.rollout import aggregation_weights, response_mask, token_logprobs
from llmjax.train import Batch, LossFn

LOSSES = ("dpo", "ipo")


@dataclass(frozen=True)
class DPOConfig:
    beta: float = 0.1
    loss: str = "dpo"  # dpo | ipo
    label_smoothing: float = 0.0  # ε of conservative DPO (dpo loss only)
    sft_coef: float = 0.0

    def validate(self) -> DPOConfig:
        if self.loss not in LOSSES:
            raise UserError(f"loss={self.loss!r} is not one of {', '.join(LOSSES)}")
        if self.beta <= 0:
            raise UserError(f"beta={self.beta} must be > 0")
        if not 0 <= self.label_smoothing < 0.5:
            raise UserError(f"label_smoothing={self.label_smoothing} must be in [0, 0.5)")
        if self.label_smoothing and self.loss != "dpo":
            raise UserError("label_smoothing is conservative DPO: use it with loss=dpo")
        if self.sft_coef < 0:
            raise UserError(f"sft_coef={self.sft_coef} must be ≥ 0")
        return self


def pair_loss(h_B: jax.Array, dc: DPOConfig) -> jax.Array:
    """The per-pair loss of a log-ratio margin h_B (see the module docstring)."""
    if dc.loss == "ipo":
        return (h_B - 1.0 / (2.0 * dc.beta)) ** 2
    eps = dc.label_smoothing
    return (1 - eps) * jax.nn.softplus(-dc.beta * h_B) + eps * jax.nn.softplus(dc.beta * h_B)


def _both_logprobs(params: model.Params, batch: Batch, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """Per-token log-probs of the chosen and rejected responses, one forward pass over the 2B rows."""
    logp_RN, _ = token_logprobs(
        params, jnp.concatenate([batch["prompt_BP"]] * 2), jnp.concatenate([batch["prompt_lens_B"]] * 2),
        jnp.concatenate([batch["chosen_BN"], batch["rejected_BN"]]), cfg,
    )
    B = batch["prompt_BP"].shape[0]
    return logp_RN[:B], logp_RN[B:]


def _masks(batch: Batch) -> tuple[jax.Array, jax.Array]:
    N = batch["chosen_BN"].shape[1]
    return response_mask(batch["chosen_len_B"], N), response_mask(batch["rejected_len_B"], N)


def margins(params: model.Params, batch: Batch, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """(h_B, logp_chosen_BN): the policy's log-ratio margin of chosen over rejected relative to the reference's, and
    the chosen responses' per-token log-probs (for the SFT term)."""
    logp_chosen_BN, logp_rejected_BN = _both_logprobs(params, batch, cfg)
    mask_chosen_BN, mask_rejected_BN = _masks(batch)
    h_B = (jnp.sum(logp_chosen_BN * mask_chosen_BN, 1) - batch["ref_chosen_B"]) - (
        jnp.sum(logp_rejected_BN * mask_rejected_BN, 1) - batch["ref_rejected_B"])
    return h_B, logp_chosen_BN


def dpo_loss(cfg: ModelConfig, dc: DPOConfig) -> LossFn:
    """Σ_b weight_b·loss(h_b) (+ sft_coef · token-mean NLL of the chosen); weight_B = n_micro / B."""

    def loss_fn(params: model.Params, batch: Batch, key: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        h_B, logp_chosen_BN = margins(params, batch, cfg)
        loss = jnp.sum(batch["weight_B"] * pair_loss(h_B, dc))
        if dc.sft_coef:
            loss = loss - dc.sft_coef * jnp.sum(batch["sft_weight_BN"] * logp_chosen_BN)
        return loss, {}

    return loss_fn


BATCH_KEYS = ("prompt_BP", "prompt_lens_B", "chosen_BN", "rejected_BN", "chosen_len_B", "rejected_len_B",
              "ref_chosen_B", "ref_rejected_B")


def make_batch(pairs: dict[str, np.ndarray | jax.Array], rows: np.ndarray | jax.Array, n_micro: int = 1) -> Batch:
    """The loss's inputs for `rows` of a pair dataset with reference log-probs: weights over these rows."""
    batch = {k: jnp.asarray(pairs[k])[rows] for k in BATCH_KEYS}
    B, N = batch["chosen_BN"].shape
    batch["weight_B"] = jnp.full((B,), n_micro / B)
    batch["sft_weight_BN"] = aggregation_weights(response_mask(batch["chosen_len_B"], N), "token_mean", n_micro)
    return batch


@functools.partial(jax.jit, static_argnames="cfg")
def _summed_logprobs(params, prompt_BP, prompt_lens_B, tokens_BN, lengths_B, cfg):
    logp_BN, _ = token_logprobs(params, prompt_BP, prompt_lens_B, tokens_BN, cfg)
    return jnp.sum(logp_BN * response_mask(lengths_B, tokens_BN.shape[1]), axis=1)


def reference_logprobs(
    ref_params: model.Params, pairs: dict[str, np.ndarray], cfg: ModelConfig, chunk: int = 256
) -> dict[str, np.ndarray]:
    """ref_chosen_B, ref_rejected_B: the reference policy's summed response log-probs, computed once."""
    n = len(pairs["prompt_BP"])
    out: dict[str, list] = {"ref_chosen_B": [], "ref_rejected_B": []}
    for i in range(0, n, chunk):
        rows = np.arange(i, i + chunk) % n  # fixed-size chunks: one compile
        for side in ("chosen", "rejected"):
            out[f"ref_{side}_B"].append(np.asarray(_summed_logprobs(
                ref_params, pairs["prompt_BP"][rows], pairs["prompt_lens_B"][rows], pairs[f"{side}_BN"][rows],
                pairs[f"{side}_len_B"][rows], cfg=cfg)))
    return {k: np.concatenate(v)[:n] for k, v in out.items()}
