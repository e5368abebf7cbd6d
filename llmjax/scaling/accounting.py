"""Parameter and training-FLOP accounting under the conventions scaling-law papers use.

The exponent one measures depends on what N and C mean, most of all for tiny models whose embeddings are a large
share of the parameters, so every fit is reported per convention:

- `kaplan`:     C = 6·N_non-embedding·D (Kaplan et al. 2020 drop embeddings and position tables);
- `chinchilla`: C = 6·N_total·D (Hoffmann et al. 2022 count every parameter);
- `attention`:  C = (6·N_total + 12·L·ctx·d)·D, adding the attention-score and value-mixing matmuls per token.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmjax.config import ModelConfig

CONVENTIONS = ("kaplan", "chinchilla", "attention")


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of one model; `embedding` holds the token and position tables, `head` an untied lm head."""

    total: int
    embedding: int
    head: int

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding - self.head


def param_counts(cfg: ModelConfig) -> ParamCounts:
    """Counts from the config alone (no arrays), matching `model.param_specs` exactly (tested)."""
    L, D, V, F = cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.hidden_dim
    H, K, E = cfg.n_head, cfg.kv_heads, cfg.head_dim
    layernorm_bias = cfg.bias and cfg.norm == "layernorm"
    norm = D * (2 if layernorm_bias else 1)
    per_layer = 2 * norm + D * (H + 2 * K) * E + H * E * D + D * F * (3 if cfg.mlp == "swiglu" else 2)
    if cfg.bias:
        per_layer += (H + 2 * K) * E + D + F + D
    embedding = V * D + (cfg.block_size * D if cfg.position == "learned" else 0)
    head = 0 if cfg.tie_embeddings else D * V
    return ParamCounts(total=L * per_layer + norm + embedding + head, embedding=embedding, head=head)


def n_params(cfg: ModelConfig, convention: str) -> int:
    """The N of a convention: non-embedding parameters for Kaplan, all parameters otherwise."""
    counts = param_counts(cfg)
    return counts.non_embedding if convention == "kaplan" else counts.total


def flops_per_token(cfg: ModelConfig, convention: str) -> float:
    """Training FLOPs per token (forward + backward) under `convention`; see the module docstring."""
    if convention == "kaplan":
        return 6.0 * param_counts(cfg).non_embedding
    if convention == "chinchilla":
        return 6.0 * param_counts(cfg).total
    if convention == "attention":
        return 6.0 * param_counts(cfg).total + 12.0 * cfg.n_layer * cfg.block_size * cfg.n_embd
    raise ValueError(f"unknown FLOP convention {convention!r}; one of {CONVENTIONS}")
