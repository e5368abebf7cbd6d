"""Model and training configs: frozen dataclasses, named presets, validation at the edge.

Every architectural variant (GPT-2, Llama, GQA/MQA, ...) is a field of `ModelConfig`, never a copy of the model.
`validate()` raises `UserError` with a one-line message before any compute happens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from llmjax.errors import UserError

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer. Defaults are GPT-2 small's architecture at nanoGPT's char scale."""

    vocab_size: int = 65
    block_size: int = 256  # context length T
    n_layer: int = 6
    n_head: int = 6
    n_kv_head: int | None = None  # None: = n_head (MHA); 1: MQA; in between: GQA
    n_embd: int = 384
    mlp_hidden: int | None = None  # None: 4·d for GELU; for SwiGLU Llama's ⅔·4·d rounded up to mlp_multiple_of
    mlp_multiple_of: int = 32
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    bias: bool = False  # biases in linear layers and LayerNorm (GPT-2: True)
    mlp: str = "gelu"  # gelu | swiglu
    position: str = "learned"  # learned | rope
    rope_theta: float = 10000.0
    sliding_window: int | None = None  # Mistral: attend only to the last `sliding_window` positions
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    scan_layers: bool = False  # lax.scan over the stacked layers (fast compiles) or a Python loop (faster on CPU)
    remat: str = "none"  # none | full | dots (save only matmul outputs)
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    attention: str = "xla"  # xla | pallas (kernels_pallas flash attention; interpret mode off-GPU)
    matmul: str = "default"  # default | fp8 (kernels_pallas block-scaled FP8 matmul in the transformer blocks)
    # Mixture of experts (Mixtral; DeepSeek's fine-grained + shared experts): 0 experts = a dense MLP.
    n_experts: int = 0  # routed SwiGLU experts per layer
    moe_top_k: int = 2  # experts per token; their gates are the softmax over the top-k router logits
    n_shared_experts: int = 0  # always-on experts (DeepSeek), one SwiGLU of n_shared_experts · expert width
    expert_hidden: int | None = None  # None: the dense MLP's hidden width; fine-grained experts use less
    capacity_factor: float = 1.25  # slots per expert = capacity_factor · tokens · top_k / n_experts (per sequence)
    moe_aux_coef: float = 0.01  # weight of the Switch load-balancing loss
    router_z_coef: float = 1e-3  # weight of the router z-loss (ST-MoE)
    # Multi-head latent attention (DeepSeek-V2/V3): 0 = off; else K and V come from a latent of this rank.
    mla_kv_rank: int = 0
    mla_rope_dim: int = 16  # the decoupled RoPE key, one per token shared by all heads
    mla_q_rank: int = 0  # 0: full-rank queries; else queries also pass through a latent of this rank

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def hidden_dim(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp == "gelu":
            return 4 * self.n_embd
        hidden = int(2 * 4 * self.n_embd / 3)
        return self.mlp_multiple_of * -(-hidden // self.mlp_multiple_of)

    @property
    def expert_dim(self) -> int:
        return self.hidden_dim if self.expert_hidden is None else self.expert_hidden

    def validate(self) -> ModelConfig:
        _check_choice("norm", self.norm, ("layernorm", "rmsnorm"))
        _check_choice("mlp", self.mlp, ("gelu", "swiglu"))
        _check_choice("position", self.position, ("learned", "rope"))
        _check_choice("remat", self.remat, ("none", "full", "dots"))
        _check_choice("param_dtype", self.param_dtype, DTYPES)
        _check_choice("compute_dtype", self.compute_dtype, DTYPES)
        _check_choice("attention", self.attention, ("xla", "pallas"))
        _check_choice("matmul", self.matmul, ("default", "fp8"))
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.n_embd % self.n_head:
            suggestion = self.n_head * max(1, self.n_embd // self.n_head)
            raise UserError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: "
                f"choose n_embd as a multiple of n_head (e.g. --n_embd={suggestion})"
            )
        if self.kv_heads < 1 or self.n_head % self.kv_heads:
            raise UserError(
                f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head} (1 = MQA, n_head = MHA)"
            )
        if self.position == "rope" and self.head_dim % 2:
            raise UserError(f"RoPE needs an even head dim, got n_embd/n_head={self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout={self.dropout} must be in [0, 1)")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise UserError(f"sliding_window={self.sliding_window} must be ≥ 1 (or unset for full attention)")
        if self.n_experts < 0 or self.mla_kv_rank < 0 or self.mla_q_rank < 0:
            raise UserError("n_experts, mla_kv_rank and mla_q_rank must be ≥ 0 (0 turns the feature off)")
        if self.n_experts:
            self._validate_moe()
        if self.mla_kv_rank:
            self._validate_mla()
        return self

    def _validate_moe(self) -> None:
        if self.mlp != "swiglu":
            raise UserError(f"n_experts={self.n_experts} uses SwiGLU experts: set --mlp=swiglu")
        if not 1 <= self.moe_top_k <= self.n_experts:
            raise UserError(f"moe_top_k={self.moe_top_k} must be between 1 and n_experts={self.n_experts}")
        if self.n_shared_experts < 0 or (self.expert_hidden is not None and self.expert_hidden < 1):
            raise UserError("n_shared_experts must be ≥ 0 and expert_hidden ≥ 1 (or unset for the dense width)")
        if self.capacity_factor <= 0:
            raise UserError(f"capacity_factor={self.capacity_factor} must be > 0 (1.25 is usual)")
        if self.moe_aux_coef < 0 or self.router_z_coef < 0:
            raise UserError("moe_aux_coef and router_z_coef must be ≥ 0")

    def _validate_mla(self) -> None:
        if self.position != "rope":
            raise UserError(f"mla_kv_rank={self.mla_kv_rank} carries positions in a decoupled RoPE key: "
                            "set --position=rope")
        if self.mla_rope_dim < 2 or self.mla_rope_dim % 2:
            raise UserError(f"mla_rope_dim={self.mla_rope_dim} must be a positive even number")
        if self.kv_heads != self.n_head:
            raise UserError(f"n_kv_head={self.n_kv_head} has no meaning with MLA (every head reads the shared "
                            f"latent): set --n_kv_head={self.n_head} or leave it unset")
        if self.attention != "xla":
            raise UserError("attention=pallas does not support MLA: use --attention=xla")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and loop settings (nanoGPT's names where they exist)."""

    batch_size: int = 12  # sequences per optimizer step (split into grad_accum micro-batches)
    grad_accum: int = 1
    max_iters: int = 2000
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int | None = None  # None: = max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 disables
    eval_interval: int = 250
    eval_iters: int = 200
    log_interval: int = 50
    ckpt_interval: int = 500  # steps between checkpoints (and one at the end)
    ckpt_keep: int = 3
    seed: int = 1337

    def validate(self) -> TrainConfig:
        for name in ("batch_size", "grad_accum", "max_iters", "eval_iters", "log_interval", "ckpt_keep"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.batch_size % self.grad_accum:
            raise UserError(
                f"batch_size={self.batch_size} is not divisible by grad_accum={self.grad_accum}: "
                "pick a grad_accum that divides the batch"
            )
        if self.learning_rate <= 0 or self.min_lr < 0:
            raise UserError("learning_rate must be > 0 and min_lr ≥ 0")
        if self.eval_interval < 1 or self.ckpt_interval < 1:
            raise UserError("eval_interval and ckpt_interval must be positive")
        return self


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"{name}={value!r} is not one of {', '.join(choices)}")


_GPT2 = dict(bias=True, dropout=0.0, vocab_size=50257, block_size=1024, scan_layers=True)
# nanoGPT's train_gpt2.py on 8 GPUs: 12 sequences per GPU × 8 GPUs per micro-batch, 5 micro-batches (~0.5M tokens);
# a micro-batch of 96 splits over any data×fsdp of up to 8 devices.
_GPT2_BATCH = dict(batch_size=480, grad_accum=5)
_CHAR_TRAIN = dict(learning_rate=1e-3, min_lr=1e-4, beta2=0.99, warmup_iters=100)

# name -> (model fields, train fields). vocab_size of the char presets is replaced by the tokenizer's.
PRESETS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # nanoGPT config/train_shakespeare_char.py
    "shakespeare_char": (
        dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2),
        dict(batch_size=64, max_iters=5000, eval_iters=200, **_CHAR_TRAIN),
    ),
    # nanoGPT README's CPU command for the same config
    "shakespeare_char_cpu": (
        dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0),
        dict(batch_size=12, max_iters=2000, eval_iters=200, **_CHAR_TRAIN),
    ),
    # A Llama-style block at the CPU scale: RoPE, RMSNorm, SwiGLU, GQA (2 KV heads), untied embeddings.
    "llama_small": (
        dict(
            n_layer=4, n_head=4, n_kv_head=2, n_embd=128, block_size=128, norm="rmsnorm", mlp="swiglu",
            position="rope", tie_embeddings=False,
        ),
        dict(batch_size=16, max_iters=2000, eval_iters=100, **_CHAR_TRAIN),
    ),
    # GPT-2 sizes with the learning rates of the GPT-3 paper's table for similar sizes
    "gpt2": (
        dict(n_layer=12, n_head=12, n_embd=768, **_GPT2),
        dict(batch_size=480, learning_rate=6e-4, min_lr=6e-5, warmup_iters=2000, max_iters=600000, beta2=0.95),
    ),
    "gpt2-medium": (
        dict(n_layer=24, n_head=16, n_embd=1024, **_GPT2),
        dict(learning_rate=3e-4, min_lr=3e-5, beta2=0.95, **_GPT2_BATCH),
    ),
    "gpt2-large": (
        dict(n_layer=36, n_head=20, n_embd=1280, **_GPT2),
        dict(learning_rate=2.5e-4, min_lr=2.5e-5, beta2=0.95, **_GPT2_BATCH),
    ),
    "gpt2-xl": (
        dict(n_layer=48, n_head=25, n_embd=1600, **_GPT2),
        dict(learning_rate=2e-4, min_lr=2e-5, beta2=0.95, **_GPT2_BATCH),
    ),
}


def from_preset(name: str, **overrides: Any) -> tuple[ModelConfig, TrainConfig]:
    """The preset's configs with `overrides` (field name -> value, model or train) applied and validated."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    model_fields, train_fields = dict(PRESETS[name][0]), dict(PRESETS[name][1])
    model_names = {f.name for f in dataclasses.fields(ModelConfig)}
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    for key, value in overrides.items():
        if key in model_names:
            model_fields[key] = value
        elif key in train_names:
            train_fields[key] = value
        else:
            raise UserError(f"unknown config field {key!r}: see llmjax/config.py for ModelConfig/TrainConfig fields")
    return ModelConfig(**model_fields).validate(), TrainConfig(**train_fields).validate()


def config_field_types() -> dict[str, type]:
    """Field name -> Python type for every overridable field, used to parse `--set key=value` flags."""
    types: dict[str, type] = {}
    for cls in (ModelConfig, TrainConfig):
        for f in dataclasses.fields(cls):
            # Every field whose default is None is an optional int.
            types[f.name] = int if f.default is None else type(f.default)
    return types
