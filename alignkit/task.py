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


def split_problems(seed: int = 0, n_eval: int = 300) -> tuple[list[Problem], list[Problem]]:
    """All 8100 two-digit pairs, shuffled; the first `n_eval` are held out."""
    every = [Problem(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(seed).shuffle(every)
    return every[n_eval:], every[:n_eval]


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


def parse_answer(text: str) -> int | None:
    m = re.search(r"-?\d+", text)
    return int(m.group()) if m else None
