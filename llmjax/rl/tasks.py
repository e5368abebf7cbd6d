"""Tasks with verifiable rewards: a tiny symbol tokenizer, integer addition and Countdown.

A reward is a pure function of (problem, response token ids): 1.0 when the response is a correct, well-formed
answer followed by EOS, else 0.0. Answers are checked by parsing, never by `eval` of generated text.

Train and held-out problems are disjoint by construction: `split` shuffles the pool of distinct problem keys with a
fixed seed (independent of the run's seed, so every run evaluates on the same problems) and cuts it once.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from llmjax.errors import UserError

# PAD and EOS are distinct: PAD fills slots after a finished response and is never a target.
SYMBOLS = ("<pad>", "<eos>", *"0123456789+-*=,>()")
PAD, EOS = 0, 1
_ID = {s: i for i, s in enumerate(SYMBOLS)}
VOCAB_SIZE = len(SYMBOLS)


def encode(text: str) -> list[int]:
    try:
        return [_ID[c] for c in text]
    except KeyError as e:
        raise UserError(f"character {e.args[0]!r} is not in the task vocabulary {''.join(SYMBOLS[2:])}") from None


def decode(ids: Sequence[int]) -> str:
    """Text of the ids, special tokens shown as <pad>/<eos>."""
    return "".join(SYMBOLS[int(i)] for i in ids)


def response_text(ids: Sequence[int]) -> str | None:
    """The text before the first EOS, or None if the response never ended (truncated) or contains PAD before EOS."""
    ids = [int(i) for i in ids]
    if EOS not in ids:
        return None
    body = ids[: ids.index(EOS)]
    if PAD in body:
        return None
    return decode(body)


@dataclass(frozen=True)
class Problem:
    """One prompt with what is needed to verify an answer; `key` identifies it for the train/held-out split."""

    prompt: str
    solution: str  # a reference answer (without EOS), the SFT target
    numbers: tuple[int, ...]
    target: int
    key: tuple


# --------------------------------------------------------------------------------------------------- addition


def addition_problems(max_operand: int = 99) -> list[Problem]:
    """Every `a+b=` with a, b in [0, max_operand]; the answer is the sum's decimal digits, most significant first.

    Operands are zero-padded to a fixed width ("07+45="), so each digit has a fixed position in every prompt: a
    small model with learned positions then learns the digit-wise algorithm in a few hundred steps, not thousands.
    """
    width = len(str(max_operand))
    return [
        Problem(f"{a:0{width}d}+{b:0{width}d}=", str(a + b), (a, b), a + b, (a, b))
        for a in range(max_operand + 1)
        for b in range(max_operand + 1)
    ]


def addition_reward(problem: Problem, ids: Sequence[int]) -> float:
    """1 for exactly the sum's digits then EOS ("046" for 46, a missing EOS or stray symbols score 0)."""
    return float(response_text(ids) == problem.solution)


# -------------------------------------------------------------------------------------------------- countdown

_PRECEDENCE = {"+": 1, "-": 1, "*": 2}


def _apply(op: str, x: int, y: int) -> int:
    return x + y if op == "+" else x - y if op == "-" else x * y


def _render(tree: int | tuple) -> tuple[str, int, int]:
    """(text with the fewest parentheses, value, precedence) of an expression tree (op, left, right) or a number."""
    if isinstance(tree, int):
        return str(tree), tree, 3
    op, left, right = tree
    lt, lv, lp = _render(left)
    rt, rv, rp = _render(right)
    if lp < _PRECEDENCE[op]:
        lt = f"({lt})"
    # a-(b+c), a-(b-c) and a*(b+c) need parentheses on the right; a+(b-c) and a*(b*c) do not.
    if rp < _PRECEDENCE[op] or (rp == _PRECEDENCE[op] and op == "-"):
        rt = f"({rt})"
    return f"{lt}{op}{rt}", _apply(op, lv, rv), _PRECEDENCE[op]


def _random_tree(numbers: list[int], rng: random.Random) -> int | tuple:
    if len(numbers) == 1:
        return numbers[0]
    cut = rng.randint(1, len(numbers) - 1)
    return (rng.choice("+-*"), _random_tree(numbers[:cut], rng), _random_tree(numbers[cut:], rng))


def countdown_problems(
    n: int = 8000, *, max_number: int = 9, max_target: int = 99, seed: int = 0
) -> list[Problem]:
    """Up to `n` distinct problems: 3 or 4 numbers in [1, max_number] and a target in [1, max_target].

    Each comes from a random expression using every number once, so it has at least that solution. Problems are
    distinct by (sorted numbers, target): the same numbers in another order are the same problem.
    """
    rng = random.Random(seed)  # scalar draws: much faster than numpy's Generator here
    seen: dict[tuple, Problem] = {}
    for _ in range(20 * n):
        if len(seen) >= n:
            break
        numbers = [rng.randint(1, max_number) for _ in range(rng.randint(3, 4))]
        text, value, _ = _render(_random_tree(numbers, rng))
        key = (tuple(sorted(numbers)), value)
        if 1 <= value <= max_target and key not in seen:
            prompt = ",".join(map(str, numbers)) + f">{value}="
            seen[key] = Problem(prompt, text, tuple(numbers), value, key)
    return list(seen.values())


class _ParseError(Exception):
    pass


def parse_expression(text: str) -> tuple[int, list[int]]:
    """(value, numbers used) of an expression over non-negative integers with + - × and parentheses.

    Recursive descent with the usual precedence; raises _ParseError on anything else (unary minus, empty
    operands, unbalanced parentheses, numbers with leading zeros).
    """
    pos = 0
    used: list[int] = []

    def peek() -> str:
        return text[pos] if pos < len(text) else ""

    def factor() -> int:
        nonlocal pos
        if peek() == "(":
            pos += 1
            value = expr()
            if peek() != ")":
                raise _ParseError("unbalanced parentheses")
            pos += 1
            return value
        start = pos
        while peek().isdigit():
            pos += 1
        digits = text[start:pos]
        if not digits or (len(digits) > 1 and digits[0] == "0"):
            raise _ParseError(f"expected a number at {start}")
        used.append(int(digits))
        return int(digits)

    def term() -> int:
        nonlocal pos
        value = factor()
        while peek() == "*":
            pos += 1
            value *= factor()
        return value

    def expr() -> int:
        nonlocal pos
        value = term()
        while peek() in ("+", "-"):
            op = peek()
            pos += 1
            value = _apply(op, value, term())
        return value

    value = expr()
    if pos != len(text):
        raise _ParseError(f"unexpected {text[pos]!r} at {pos}")
    return value, used


def countdown_reward(problem: Problem, ids: Sequence[int]) -> float:
    """1 if the response (then EOS) is an expression using each given number exactly once that equals the target."""
    text = response_text(ids)
    if text is None:
        return 0.0
    try:
        value, used = parse_expression(text)
    except _ParseError:
        return 0.0
    return float(value == problem.target and sorted(used) == sorted(problem.numbers))


# ------------------------------------------------------------------------------------------------- the tasks


@dataclass(frozen=True)
class Task:
    """A pool of problems, its reward, and the generation budget that fits any well-formed answer."""

    name: str
    problems: tuple[Problem, ...]
    max_new_tokens: int

    def reward(self, problem: Problem, ids: Sequence[int]) -> float:
        return addition_reward(problem, ids) if self.name == "addition" else countdown_reward(problem, ids)

    @property
    def prompt_len(self) -> int:
        return max(len(p.prompt) for p in self.problems)

    def split(self, n_heldout: int, seed: int = 0) -> tuple[list[Problem], list[Problem]]:
        """(train, held-out): a fixed shuffle of the pool cut once, so no held-out key is ever trained on."""
        if not 0 < n_heldout < len(self.problems):
            raise UserError(f"n_heldout={n_heldout} must be in [1, {len(self.problems) - 1}] for {self.name}")
        order = np.random.default_rng(seed).permutation(len(self.problems))
        shuffled = [self.problems[i] for i in order]
        return shuffled[n_heldout:], shuffled[:n_heldout]


@functools.cache
def make_task(name: str) -> Task:
    if name == "addition":
        # Answers have at most 3 digits + EOS. No spare slots: a longer answer is cut off and scores 0 anyway, and
        # every slot costs generation and training time (4 instead of 6 slots: −35% per GRPO iteration).
        return Task("addition", tuple(addition_problems()), max_new_tokens=4)
    if name == "countdown":
        problems = tuple(countdown_problems())
        longest = max(len(p.solution) for p in problems)
        return Task("countdown", problems, max_new_tokens=longest + 3)
    raise UserError(f"unknown task {name!r}: choose addition or countdown")


def reward_batch(task: Task, problems: Sequence[Problem], tokens_BN: np.ndarray) -> np.ndarray:
    """Rewards of a batch of responses, row i answering problems[i]."""
    return np.array([task.reward(p, row) for p, row in zip(problems, np.asarray(tokens_BN), strict=True)], np.float32)


def sft_pairs(problems: Sequence[Problem]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reference answer ids + EOS) for supervised fine-tuning."""
    return [(encode(p.prompt), encode(p.solution) + [EOS]) for p in problems]

