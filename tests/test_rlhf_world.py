"""The synthetic preference world: its text follows the chain, r* is in the promised units and honours negation,
naturalness is the exact chain likelihood, the labeller's noise is Bradley–Terry, the lexicon stand-in works on a
real text, and the frontier comparison interpolates correctly."""

import math

import numpy as np
import pytest

from llmjax.errors import UserError
from llmjax.rl import pipeline, world

W = world.make_world(world.WorldConfig())
P = W.cfg.prompt_len


def test_text_follows_the_chain_and_ends_with_eos():
    rows = W.sample_text(np.random.default_rng(0), 4000)
    assert rows.shape == (4000, W.row_len) and (rows[:, -1] == world.EOS).all()
    assert (rows[:, :-1] >= world.FIRST_WORD).all()
    # Empirical transition frequencies from the most common word match the chain's probabilities.
    prev, nxt = rows[:, :-2].ravel(), rows[:, 1:-1].ravel()
    a = np.bincount(prev).argmax()
    freq = np.bincount(nxt[prev == a], minlength=W.vocab_size) / (prev == a).sum()
    np.testing.assert_allclose(freq, np.exp(W.logtrans_VV[a]), atol=0.03)
    # Sparse: each word has `successors` likely next words, the rest share the floor.
    assert (np.exp(W.logtrans_VV[a]) > 1.001 * W.cfg.floor / W.cfg.n_words).sum() == W.cfg.successors


def test_reward_units_and_naturalness_of_the_worlds_own_text():
    rows = W.sample_text(np.random.default_rng(1), 20000)
    lengths = np.full(len(rows), W.cfg.response_len + 1)
    r = world.true_reward(W, rows[:, :P], rows[:, P:], lengths)
    assert abs(r.mean()) < 0.05 and abs(r.std() - 1) < 0.05
    # Naturalness of chain text is minus the chain's entropy rate (weighted by how often each word occurs).
    probs = np.exp(W.logtrans_VV[world.FIRST_WORD:, world.FIRST_WORD:])
    visits = np.bincount(rows[:, P - 1: -2].ravel(), minlength=W.vocab_size)[world.FIRST_WORD:]
    entropy_rate = np.sum(visits / visits.sum() * -(probs * np.log(probs)).sum(1))
    np.testing.assert_allclose(world.naturalness(W, rows[:, :P], rows[:, P:], lengths).mean(), -entropy_rate,
                               atol=0.02)


def test_reward_signs_negation_and_padding():
    pos = int(np.flatnonzero(W.weight_V > 0)[0])
    neg = int(np.flatnonzero(W.weight_V < 0)[0])
    negator = int(np.flatnonzero(W.negator_V)[0])
    neutral = int(np.flatnonzero((W.weight_V == 0) & ~W.negator_V & (np.arange(W.vocab_size) >= 2))[0])
    prompt = np.full((4, P), neutral)
    tokens = np.array([[pos, pos, world.EOS, world.PAD],
                       [negator, pos, world.EOS, world.PAD],
                       [neg, world.EOS, pos, pos],  # words after EOS don't count
                       [neutral, neutral, neutral, neutral]])
    lengths = np.array([3, 3, 2, 4])
    raw = world.sentiment(W, prompt, tokens, lengths)
    np.testing.assert_allclose(raw, [2 * W.weight_V[pos], -W.weight_V[pos], W.weight_V[neg], 0.0])
    # A negator at the end of the prompt flips the first response word.
    prompt[0, -1] = negator
    np.testing.assert_allclose(world.sentiment(W, prompt[:1], tokens[:1], lengths[:1]), [0.0], atol=1e-12)
    np.testing.assert_array_equal(world.distinct_words(tokens, lengths), [1, 2, 1, 1])


def test_degenerate_text_is_unnatural():
    """Repeating one word breaks the sparse chain: far below the chain's own text in log-likelihood."""
    word = int(np.flatnonzero(W.weight_V > 0)[0])
    tokens = np.full((1, W.cfg.response_len), word)
    prompt = np.full((1, P), word)
    ll = world.naturalness(W, prompt, tokens, np.array([W.cfg.response_len]))[0]
    self_loop = W.logtrans_VV[word, word]
    np.testing.assert_allclose(ll, self_loop)
    assert ll < -3.0


def test_labeller_is_bradley_terry():
    rng = np.random.default_rng(0)
    n = 40000
    for diff in (0.0, 0.5, 2.0):
        prefer = world.label(W, np.full(n, diff), np.zeros(n), rng)
        expected = 1 / (1 + math.exp(-diff / W.cfg.label_temperature))
        assert abs(prefer.mean() - expected) < 0.01


def test_lexicon_world_on_a_small_text(tmp_path):
    text = ("the good king and the sweet queen were not happy . the villain did foul murder and the people "
            "feared death . ") * 40
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    w = world.make_world(world.WorldConfig(task="lexicon", data=f"text:{path}", vocab_size=16))
    assert w.words[:3] == ("<pad>", "<eos>", "<unk>") and w.vocab_size == 16
    rows = w.sample_text(np.random.default_rng(0), 500)
    r = world.true_reward(w, rows[:, :P], rows[:, P:], np.full(500, w.cfg.response_len + 1))
    assert abs(r.mean()) < 0.2 and 0.7 < r.std() < 1.3
    assert np.isfinite(world.naturalness(w, rows[:, :P], rows[:, P:], np.full(500, 17))).all()
    # The scorer's words seen often enough get tokens before more frequent neutral words ("the": 240 times).
    w = world.make_world(world.WorldConfig(task="lexicon", data=f"text:{path}", vocab_size=12, lexicon_min_count=40))
    scored = {"good", "sweet", "happy", "villain", "foul", "murder", "death", "not"}
    assert set(w.words[3:11]) == scored and w.words[11] == "the"
    with pytest.raises(UserError, match="words"):
        path.write_text("a b c")
        world.make_world(world.WorldConfig(task="lexicon", data=f"text:{path}"))


def test_frontier_gap_interpolates_over_the_common_range():
    dpo = [(0.5, 0.0), (2.0, 1.0), (8.0, 2.0)]
    ppo = [(1.0, 0.2), (4.0, 1.5), (12.0, 2.0)]
    gap = pipeline.frontier_gap(dpo, ppo, lo=1.0, hi=10.0)
    # On [1, 8]: DPO − PPO is smallest at KL = 4 (DPO 1 + 2/6 = 1.333 vs PPO 1.5).
    np.testing.assert_allclose([gap["gap"], gap["at_kl"], gap["kl_from"], gap["kl_to"]],
                               [1 + 2 / 6 - 1.5, 4.0, 1.0, 8.0], rtol=1e-9)
    # DPO stops at KL 8, so [8, 10] is not measured, and the result says so.
    assert gap["covers_range"] is False
    assert pipeline.frontier_gap(dpo + [(10.5, 2.5)], ppo)["covers_range"] is True
    assert pipeline.frontier_gap([(0.1, 0.0), (0.5, 1.0)], ppo)["gap"] is None


def test_true_reward_saturates_like_a_classifier():
    """All-positive text scores near the classifier's ceiling (1 − mean)/std, not unboundedly more."""
    best = int(np.argmax(W.weight_V))
    prompt = np.full((2, P), best)
    tokens = np.full((2, W.cfg.response_len), best)
    r = world.true_reward(W, prompt, tokens, np.array([W.cfg.response_len, W.cfg.response_len // 2]))
    ceiling = (1 - W.reward_mean) / W.reward_std
    assert 1.5 < ceiling < 4 and ceiling - 1e-2 < r[0] <= ceiling and 0 < r[0] - r[1] < 0.1
