"""Verifiable tasks: exact-match addition rewards, Countdown's parser-based check, and disjoint train/held-out sets."""

import numpy as np
import pytest

from llmjax.errors import UserError
from llmjax.rl import tasks
from llmjax.rl.tasks import EOS, PAD, encode


def ids(text: str, eos: bool = True) -> list[int]:
    return encode(text) + ([EOS] if eos else [])


def problem(task: tasks.Task, prompt: str) -> tasks.Problem:
    return next(p for p in task.problems if p.prompt == prompt)


def test_tokenizer_roundtrip_and_unknown_symbol():
    assert tasks.decode(encode("12+34=")) == "12+34="
    assert problem(tasks.make_task("addition"), "07+45=").solution == "52"  # fixed-width operands
    assert len(set(tasks.SYMBOLS)) == tasks.VOCAB_SIZE and PAD != EOS
    with pytest.raises(UserError, match="not in the task vocabulary"):
        encode("1/2")


def test_addition_pool_and_reward():
    task = tasks.make_task("addition")
    assert len(task.problems) == 100 * 100
    p = problem(task, "57+69=")
    assert p.solution == "126"
    assert task.reward(p, ids("126")) == 1.0
    assert task.reward(p, ids("126") + [PAD, PAD]) == 1.0  # padding after EOS is fine
    assert task.reward(p, ids("125")) == 0.0
    zero = problem(task, "00+00=")
    assert task.reward(zero, ids("0")) == 1.0


@pytest.mark.parametrize("response,expected", [
    (ids("126", eos=False), 0.0),         # truncated: never ended
    (ids("0126"), 0.0),                   # a leading zero is not the exact answer
    (ids("126+"), 0.0),                   # trailing junk before EOS
    (ids("12") + [PAD] + ids("6"), 0.0),  # PAD inside the answer
    (ids(""), 0.0),                       # empty answer
    ([EOS] + encode("126"), 0.0),         # the answer after EOS does not count
    (ids("126") + encode("9"), 1.0),      # tokens after EOS are ignored
])
def test_addition_malformed_answers(response, expected):
    task = tasks.make_task("addition")
    assert task.reward(problem(task, "57+69="), response) == expected


def test_parse_expression_precedence_and_numbers():
    assert tasks.parse_expression("2+3*4") == (14, [2, 3, 4])
    assert tasks.parse_expression("(2+3)*4") == (20, [2, 3, 4])
    assert tasks.parse_expression("9-3-2") == (4, [9, 3, 2])  # left-associative
    assert tasks.parse_expression("9-(3-2)") == (8, [9, 3, 2])
    assert tasks.parse_expression("12*3") == (36, [12, 3])
    for bad in ["", "2+", "+2", "-2+3", "(2+3", "2+3)", "2**3", "()", "2(3)", "03+4", "2+*3"]:
        with pytest.raises(tasks._ParseError):
            tasks.parse_expression(bad)


def test_countdown_problems_are_solved_by_their_reference_and_distinct():
    pool = tasks.countdown_problems(500, seed=1)
    assert len({p.key for p in pool}) == len(pool)
    for p in pool:
        assert 3 <= len(p.numbers) <= 4 and all(1 <= n <= 9 for n in p.numbers) and 1 <= p.target <= 99
        value, used = tasks.parse_expression(p.solution)
        assert value == p.target and sorted(used) == sorted(p.numbers)
        assert tasks.countdown_reward(p, ids(p.solution)) == 1.0


def test_countdown_reward_rules():
    p = tasks.Problem("3,5,7>22=", "3*5+7", (3, 5, 7), 22, ((3, 5, 7), 22))
    assert tasks.countdown_reward(p, ids("3*5+7")) == 1.0
    assert tasks.countdown_reward(p, ids("7+5*3")) == 1.0  # any order, any correct expression
    assert tasks.countdown_reward(p, ids("(7+5*3)")) == 1.0
    assert tasks.countdown_reward(p, ids("3*5+7", eos=False)) == 0.0  # no EOS
    assert tasks.countdown_reward(p, ids("3*5+7+0")) == 0.0  # 0 is not one of the numbers
    assert tasks.countdown_reward(p, ids("3*7+1")) == 0.0  # wrong numbers (and 1 not given)
    assert tasks.countdown_reward(p, ids("15+7")) == 0.0  # 15 is not given
    assert tasks.countdown_reward(p, ids("3*5+7*1")) == 0.0
    assert tasks.countdown_reward(p, ids("5*3+7-7+7")) == 0.0  # 7 used three times
    assert tasks.countdown_reward(p, ids("3+5+7")) == 0.0  # valid, but 15 ≠ 22
    assert tasks.countdown_reward(p, ids("3*5+")) == 0.0  # malformed
    assert tasks.countdown_reward(p, ids("3,5,7")) == 0.0  # symbols that are not operators


def test_countdown_reward_never_evaluates_text(monkeypatch):
    """The checker parses: python's eval is never reached, even for text that would be valid Python."""
    import builtins

    def no_eval(*args, **kwargs):
        raise AssertionError("eval called")

    monkeypatch.setattr(builtins, "eval", no_eval)
    p = tasks.Problem("3,5,7>22=", "3*5+7", (3, 5, 7), 22, ((3, 5, 7), 22))
    assert tasks.countdown_reward(p, ids("3*5+7")) == 1.0
    assert tasks.countdown_reward(p, ids("(3)*(5)+(7)")) == 1.0


@pytest.mark.parametrize("name,n_heldout", [("addition", 500), ("countdown", 300)])
def test_heldout_prompts_never_in_training(name, n_heldout):
    task = tasks.make_task(name)
    train, heldout = task.split(n_heldout)
    assert len(heldout) == n_heldout and len(train) + len(heldout) == len(task.problems)
    assert not {p.key for p in train} & {p.key for p in heldout}
    assert not {p.prompt for p in train} & {p.prompt for p in heldout}
    assert task.split(n_heldout)[1] == heldout  # the split is fixed, whatever the run's seed
    with pytest.raises(UserError):
        task.split(0)


@pytest.mark.parametrize("name", ["addition", "countdown"])
def test_every_reference_answer_fits_the_generation_budget(name):
    task = tasks.make_task(name)
    assert max(len(p.solution) for p in task.problems) + 1 <= task.max_new_tokens


def test_reward_batch_rows_follow_problems():
    task = tasks.make_task("addition")
    p1, p2 = problem(task, "01+01="), problem(task, "02+02=")
    rows = np.array([ids("2") + [PAD], ids("4") + [PAD], ids("2") + [PAD]])
    np.testing.assert_array_equal(tasks.reward_batch(task, [p1, p2, p2], rows), [1.0, 1.0, 0.0])
