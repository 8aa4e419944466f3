"""The quickstart's verifiable task: two-digit addition, with a sloppy annotator's systematic errors.

Random label noise teaches little (the model learns the most common answer), so the SFT data's errors
are systematic, as real annotators' are: in `carry_error_rate` of the problems that need a carry, the
annotator forgets it. The SFT model learns the error; preference and RL methods, which see which
answers are right, can unlearn it. Preference pairs cover both sides (forgot-carry answers on carry
problems, spurious-carry answers on no-carry problems) so that no method learns "always carry".
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    a: int
    b: int

    @property
    def carry(self) -> bool:
        return self.a % 10 + self.b % 10 >= 10

    @property
    def answer(self) -> int:
        return self.a + self.b

    @property
    def question(self) -> str:
        return f"What is {self.a} + {self.b}?"

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.question}]

    def wrong(self) -> int:
        """The annotator's typical error: a forgotten carry, or a carry where there is none."""
        tens = self.a // 10 + self.b // 10
        ones = (self.a % 10 + self.b % 10) % 10
        return tens * 10 + ones if self.carry else (tens + 1) * 10 + ones


@dataclass(frozen=True)
class Split:
    """Training problems, a validation set that recipes are chosen on, and an untouched test set."""

    train: list[Problem]
    validation: list[Problem]
    test: list[Problem]


def split_problems(seed: int = 0, n_validation: int = 300, n_test: int = 300) -> Split:
    """Split the 8100 two-digit problems on *unordered* pairs: a + b and b + a are one problem to a model
    that has learned addition, so both orders go to the same side. The test and validation sets hold one
    order (chosen at random) of distinct pairs; the training pool holds every order of the other pairs."""
    rng = random.Random(seed)
    pairs = sorted({(min(a, b), max(a, b)) for a in range(10, 100) for b in range(10, 100)})
    rng.shuffle(pairs)

    def one_order(pair: tuple[int, int]) -> Problem:
        a, b = pair if rng.random() < 0.5 else pair[::-1]
        return Problem(a, b)

    test = [one_order(p) for p in pairs[:n_test]]
    validation = [one_order(p) for p in pairs[n_test : n_test + n_validation]]
    train = [Problem(a, b) for a, b in pairs[n_test + n_validation :]]
    train += [Problem(b, a) for a, b in pairs[n_test + n_validation :] if a != b]
    rng.shuffle(train)
    return Split(train, validation, test)


def sft_rows(problems: list[Problem], n: int, carry_error_rate: float, seed: int) -> list[dict]:
    """SFT rows in `messages` form; carry problems are answered wrongly at `carry_error_rate`."""
    rng = random.Random(seed)
    rows = []
    for p in rng.choices(problems, k=n):
        answer = p.wrong() if p.carry and rng.random() < carry_error_rate else p.answer
        rows.append({"messages": p.messages() + [{"role": "assistant", "content": str(answer)}]})
    return rows


def preference_rows(problems: list[Problem], n: int, seed: int) -> list[dict]:
    """Pairs in TRL's conversational form: correct answer chosen, the typical error rejected."""
    rng = random.Random(seed)
    return [
        {
            "prompt": p.messages(),
            "chosen": [{"role": "assistant", "content": str(p.answer)}],
            "rejected": [{"role": "assistant", "content": str(p.wrong())}],
        }
        for p in rng.choices(problems, k=n)
    ]


def unpaired_rows(problems: list[Problem], n: int, desirable_share: float, seed: int) -> list[dict]:
    """KTO rows: a correct answer (desirable) or the typical error (undesirable), at the given share."""
    rng = random.Random(seed)
    rows = []
    for p in rng.choices(problems, k=n):
        good = rng.random() < desirable_share
        answer = p.answer if good else p.wrong()
        rows.append(
            {
                "prompt": p.messages(),
                "completion": [{"role": "assistant", "content": str(answer)}],
                "label": good,
            }
        )
    return rows


def prompt_rows(problems: list[Problem], n: int, seed: int) -> list[dict]:
    """Prompt-only rows for RL, with the ground truth in an `answer` column for the reward function."""
    rng = random.Random(seed)
    return [{"prompt": p.messages(), "answer": str(p.answer)} for p in rng.choices(problems, k=n)]


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


ADD_TOOL = "alignkit.quickstart.task:add"  # the tool row's `tools` entry


def tool_call(p: Problem) -> str:
    """The annotator's call of `add`, in LLaMA-Factory's default tool format (the shortest alignkit reads)."""
    return f'Action: add\nAction Input: {{"a": {p.a}, "b": {p.b}}}'


def tool_sft_rows(
    problems: list[Problem], n: int, carry_error_rate: float, call_share: float, seed: int
) -> list[dict]:
    """SFT rows for the tool row: on `call_share` of the problems the annotator calls `add(a, b)` and copies its
    result; the rest are answered by hand, with the same forgotten carries as `sft_rows`."""
    rng = random.Random(seed)
    rows = []
    for p in rng.choices(problems, k=n):
        if rng.random() < call_share:
            turns = [
                {"role": "assistant", "content": tool_call(p)},
                {"role": "tool", "content": str(p.answer)},
                {"role": "assistant", "content": str(p.answer)},
            ]
        else:
            answer = p.wrong() if p.carry and rng.random() < carry_error_rate else p.answer
            turns = [{"role": "assistant", "content": str(answer)}]
        rows.append({"messages": p.messages() + turns})
    return rows


def parse_answer(text: str) -> int | None:
    m = re.search(r"-?\d+", text)
    return int(m.group()) if m else None
