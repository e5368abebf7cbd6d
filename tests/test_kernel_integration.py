"""The model with `attention="pallas"` / `matmul="fp8"` computes what the XLA / float path computes."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from llmjax import config, model, train


def _loss_and_grads(cfg: config.ModelConfig, params: model.Params, tokens_BT: jax.Array):
    batch = {"x": tokens_BT[:, :-1], "y": tokens_BT[:, 1:]}
    (loss, _), grads = jax.value_and_grad(train.lm_loss(cfg), has_aux=True)(params, batch, jax.random.key(0))
    return loss, grads


def _rel_l2(a: jax.Array, b: jax.Array) -> float:
    return float(jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel()))


@pytest.mark.parametrize("sliding_window", [None, 8])
def test_pallas_attention_matches_xla_in_a_llama_model(sliding_window):
    """Loss and every parameter gradient of a GQA/RoPE model agree between the flash kernel and XLA attention."""
    cfg_xla, _ = config.from_preset("llama_small", vocab_size=50, n_layer=2, block_size=24,
                                    sliding_window=sliding_window)
    cfg_pallas = dataclasses.replace(cfg_xla, attention="pallas")
    params = model.init(cfg_xla, jax.random.key(1))
    tokens_BT = jax.random.randint(jax.random.key(2), (2, 25), 0, 50)
    with jax.default_matmul_precision("highest"):
        loss_xla, grads_xla = _loss_and_grads(cfg_xla, params, tokens_BT)
        loss_pallas, grads_pallas = _loss_and_grads(cfg_pallas, params, tokens_BT)
    assert abs(float(loss_pallas) - float(loss_xla)) <= 1e-5 * abs(float(loss_xla))
    errors = jax.tree.map(_rel_l2, grads_pallas, grads_xla)
    assert max(jax.tree.leaves(errors)) < 1e-4, errors


def test_fp8_matmul_model_tracks_the_float_model():
    """FP8 linear layers change the loss and gradients only by quantisation noise (a few percent at most)."""
    cfg, _ = config.from_preset("shakespeare_char_cpu", vocab_size=50, n_layer=2)
    cfg_fp8 = dataclasses.replace(cfg, matmul="fp8")
    params = model.init(cfg, jax.random.key(1))
    tokens_BT = jax.random.randint(jax.random.key(2), (4, 65), 0, 50)
    loss, grads = _loss_and_grads(cfg, params, tokens_BT)
    loss_fp8, grads_fp8 = _loss_and_grads(cfg_fp8, params, tokens_BT)
    assert abs(float(loss_fp8) - float(loss)) < 0.01 * float(loss)
    assert float(loss_fp8) != float(loss)  # the FP8 path really ran
    w_err = _rel_l2(grads_fp8["blocks"]["w_in"], grads["blocks"]["w_in"])
    assert 1e-4 < w_err < 0.1, w_err
