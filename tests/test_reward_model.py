"""Reward model: read at the last response token whatever the padding, Bradley–Terry loss and accuracy, values at
the right states, normalisation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import model
from llmjax.config import ModelConfig
from llmjax.rl import reward_model, rollout

CFG = ModelConfig(vocab_size=7, block_size=10, n_layer=1, n_head=2, n_embd=16).validate()
EOS, PAD = 1, 0


@functools.cache
def rm() -> model.Params:
    lm = model.init(CFG, jax.random.key(0)) | {"wte": 0.5 * jax.random.normal(jax.random.key(1), (7, 16))}
    return reward_model.init(lm, CFG, jax.random.key(2), head_std=1.0)


def unpadded_score(prompt: list[int], response: list[int]) -> float:
    """The head on the plain causal forward of prompt + response (no padding anywhere) at its last token."""
    h_BTD, _ = model.trunk(rm()["trunk"], jnp.asarray([prompt + response]), CFG)
    return float(h_BTD[0, -1] @ rm()["head"]["w_D"] + rm()["head"]["b"])


def test_reward_is_read_at_the_last_response_token_with_padding():
    prompt_BP, lens_B = rollout.pad_prompts([[2, 3, 4], [5]], 3, PAD)  # the second prompt is left-padded
    tokens_BN, lengths_B = rollout.pad_responses([[4, EOS], [2, 6, 3, 5]], 4, PAD)  # the second is truncated
    r_B = reward_model.scores(rm(), prompt_BP, lens_B, tokens_BN, lengths_B, CFG)
    np.testing.assert_allclose(r_B, [unpadded_score([2, 3, 4], [4, EOS]), unpadded_score([5], [2, 6, 3, 5])],
                               rtol=1e-4, atol=1e-5)
    # Whatever sits in the slots after EOS (PAD or junk) is not read.
    junk_BN = tokens_BN.copy()
    junk_BN[0, 2:] = [6, 3]
    np.testing.assert_allclose(reward_model.scores(rm(), prompt_BP, lens_B, junk_BN, lengths_B, CFG), r_B, atol=1e-6)
    # Reading one token earlier would give another number: the test can tell the positions apart.
    assert abs(unpadded_score([2, 3, 4], [4]) - float(r_B[0])) > 1e-3


@pytest.mark.slow  # ~10 CPU-seconds of compiles: the fast suite keeps the acceptance tests
def test_values_are_read_before_each_response_token():
    prompt_BP, lens_B = rollout.pad_prompts([[2, 3], [5]], 2, PAD)
    tokens_BN, _ = rollout.pad_responses([[4, 6, EOS], [EOS]], 3, PAD)
    v_BN = reward_model.values(rm(), prompt_BP, lens_B, tokens_BN, CFG)
    np.testing.assert_allclose(v_BN[0], [unpadded_score([2], [3]), unpadded_score([2, 3], [4]),
                                         unpadded_score([2, 3, 4], [6])], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(v_BN[1, 0], unpadded_score([], [5]), rtol=1e-4, atol=1e-5)


def pair_data() -> dict[str, np.ndarray]:
    prompt_BP, lens_B = rollout.pad_prompts([[2, 3], [4], [5, 6]], 2, PAD)
    chosen_BN, chosen_len_B = rollout.pad_responses([[4, EOS], [2, 3, EOS], [EOS]], 3, PAD)
    rejected_BN, rejected_len_B = rollout.pad_responses([[5, 5, EOS], [EOS], [3, 2, EOS]], 3, PAD)
    return {"prompt_BP": prompt_BP, "prompt_lens_B": lens_B, "chosen_BN": chosen_BN, "chosen_len_B": chosen_len_B,
            "rejected_BN": rejected_BN, "rejected_len_B": rejected_len_B}


@pytest.mark.slow  # ~10 CPU-seconds of compiles: the fast suite keeps the acceptance tests
def test_bradley_terry_loss_and_accuracy():
    data = pair_data()
    r_c = reward_model.scores(rm(), data["prompt_BP"], data["prompt_lens_B"], data["chosen_BN"], data["chosen_len_B"],
                              CFG)
    r_r = reward_model.scores(rm(), data["prompt_BP"], data["prompt_lens_B"], data["rejected_BN"],
                              data["rejected_len_B"], CFG)
    batch = {k: jnp.asarray(v) for k, v in data.items()} | {"weight_B": jnp.full(3, 1 / 3)}
    loss, _ = reward_model.bt_loss(CFG)(rm(), batch, jax.random.key(0))
    np.testing.assert_allclose(float(loss), float(np.mean(np.log1p(np.exp(np.asarray(r_r - r_c))))), rtol=1e-5)
    # Accuracy against the labels counts chosen scored higher; against the truth it skips ties.
    agree = np.asarray(r_c > r_r)
    truth = {"chosen_true_B": np.array([1.0, 0.0, 2.0]), "rejected_true_B": np.array([0.0, 1.0, 2.0])}
    acc = reward_model.pairwise_accuracy([rm()], data | truth, CFG)
    np.testing.assert_allclose(acc["acc_labels"], agree.mean())
    np.testing.assert_allclose(acc["acc_true"], np.mean([agree[0], not agree[1]]))
    # An ensemble is scored by its members' mean margin: a member and its negation cancel to no preference.
    negated = rm() | {"head": jax.tree.map(jnp.negative, rm()["head"])}
    assert reward_model.pairwise_accuracy([rm(), negated], data | truth, CFG)["acc_labels"] == 0.0


def test_normalizer():
    s = np.array([1.0, 3.0, 5.0, 7.0])
    norm = reward_model.normalizer(s)
    z = np.asarray(reward_model.normalized(jnp.asarray(s), norm))
    np.testing.assert_allclose([z.mean(), z.std()], [0.0, 1.0], atol=1e-5)
