"""The judge's `logprobs` mode: the verdict is read from the probabilities of the judge's first token, so a
small local model that never writes `[[A]]` or `Rating: [[5]]` still judges.

The prompt ends by asking for one token (a letter, or a digit from 1 to 9); the request asks for that one
token at temperature 0 with the 20 likeliest tokens of its position (`top_logprobs: 20`, OpenAI's maximum).
A token counts for a label when its text, stripped and upper-cased, is the label: " A", "A" and "a" are all
A, and their probabilities add up.

Pairwise: p(A) / (p(A) + p(B)), the probability that the answer shown as A wins, normalised over the two
letters. Grade: the expected digit over the digits found, renormalised over them, mapped linearly from the
1-9 scale onto the 1-10 scale of verdict mode (1 -> 1, 9 -> 10). No A or B (no digit) among the 20: an
unparsable verdict (None), as a reply without `[[A]]` is in verdict mode. The raw JSON of the reply's
`choices[0].logprobs.content` is what the verdict cache keeps, and what these parsers read.
"""

from __future__ import annotations

import json
import math
from typing import Any

TOP_LOGPROBS = 20  # the most an OpenAI-compatible endpoint returns
TIE_BAND = 0.1  # |p(a) - p(b)| below this is a tie
LETTERS = ("A", "B")
DIGITS = tuple("123456789")
EXPECTED_LETTER = "have A or B among the 20 likeliest first tokens"
EXPECTED_DIGIT = "have a digit from 1 to 9 among the 20 likeliest first tokens"


class NoLogprobs(Exception):
    """A chat completion without log-probabilities (choices[0].logprobs null)."""


def reply_logprobs(body: Any) -> str | None:
    """The raw JSON of a chat completion's choices[0].logprobs.content (the cached reply); None when the body
    is not a chat completion; NoLogprobs when it is one that carries no log-probabilities."""
    try:
        choice = body["choices"][0]
        if not isinstance(choice["message"], dict):
            return None
    except (KeyError, IndexError, TypeError):
        return None
    logprobs = choice.get("logprobs")
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(content, list):
        raise NoLogprobs
    return json.dumps(content, ensure_ascii=False)


def first_token_probs(raw: str, labels: tuple[str, ...]) -> dict[str, float]:
    """Each label's probability among the top log-probs of the first generated position (the variants of a
    label summed); a label not among them is absent."""
    found: dict[str, float] = {}
    try:
        tops = json.loads(raw)[0].get("top_logprobs") or []
        for top in tops:
            label = str(top["token"]).strip().upper()
            if label in labels:
                found[label] = found.get(label, 0.0) + math.exp(float(top["logprob"]))
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return {}
    return found


def parse_letter(raw: str) -> float | None:
    """p(A) / (p(A) + p(B)) at the first token: the probability that the answer shown as A wins; None when
    neither letter is among the top ones."""
    probs = first_token_probs(raw, LETTERS)
    total = probs.get("A", 0.0) + probs.get("B", 0.0)
    return probs.get("A", 0.0) / total if total > 0 else None


def parse_digit(raw: str) -> float | None:
    """The expected 1-9 digit at the first token, renormalised over the digits found, on the 1-10 scale;
    None when no digit is among the top ones."""
    probs = first_token_probs(raw, DIGITS)
    total = sum(probs.values())
    if total <= 0:
        return None
    return on_ten_scale(sum(int(d) * p for d, p in probs.items()) / total)


def on_ten_scale(grade: float) -> float:
    """A 1-9 grade on the 1-10 scale, linearly: 1 -> 1, 5 -> 5.5, 9 -> 10."""
    return 1.0 + (grade - 1.0) * 9.0 / 8.0


def label(p_a: float) -> str:
    """'a', 'b' or 'tie' from the probability that a wins (over a and b): a tie when |p(a) - p(b)| < TIE_BAND."""
    if abs(p_a - (1.0 - p_a)) < TIE_BAND:
        return "tie"
    return "a" if p_a > 0.5 else "b"


def pairwise_item(p_first: float | None, p_swapped: float | None) -> dict:
    """One pair's verdict from p(A) of its two orders (the swapped order shows b as A): p(a wins), `p_a`, is
    the mean over the orders and decides the verdict; each order's own label shows the position bias. None
    (verdict and p_a) when either order has no A or B among the top tokens."""
    a_first = p_first
    a_swapped = None if p_swapped is None else 1.0 - p_swapped
    first = None if a_first is None else label(a_first)
    swapped = None if a_swapped is None else label(a_swapped)
    if a_first is None or a_swapped is None:
        return {"verdict": None, "first_order": first, "swapped_order": swapped, "p_a": None}
    p_a = (a_first + a_swapped) / 2
    return {"verdict": label(p_a), "first_order": first, "swapped_order": swapped, "p_a": p_a}
