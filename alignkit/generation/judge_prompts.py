"""Judge prompts in the spirit of MT-Bench (Zheng et al. 2023), and the parsers of their verdicts.

Pairwise: the judge compares two assistants and ends with [[A]], [[B]] or [[C]] (a tie).
Single answer: the judge rates one assistant from 1 to 10 and ends with "Rating: [[n]]".
In `logprobs` mode the same material ends with a request for a one-token answer instead (a letter, A or B,
or a digit from 1 to 9), and the judge's first token's log-probabilities are the verdict
(`alignkit.generation.judge_logprobs`).
A multi-turn conversation is shown whole and the judge rates the last assistant turn in its context,
as MT-Bench does for its second turn.
"""

from __future__ import annotations

import re

_PAIRWISE_TASK = (
    "You are an impartial judge. Compare the responses of two AI assistants, A and B, to the user and "
    "decide which one serves the user better. Weigh helpfulness, relevance, correctness, depth and "
    "clarity. Do not let the order in which the responses are shown, their length, or the assistants' "
    "names sway you."
)
PAIRWISE_SYSTEM = (
    f"{_PAIRWISE_TASK} Explain your comparison briefly, then give your verdict in exactly this format on "
    'the last line: "[[A]]" if assistant A is better, "[[B]]" if assistant B is better, "[[C]]" for a tie.'
)

PAIRWISE_MULTI_TURN_NOTE = (
    "The two conversations share the user's messages. Judge the assistants' answers to the LAST user "
    "message, reading the earlier turns as their context."
)

_GRADE_TASK = (
    "You are an impartial judge. Rate the quality of an AI assistant's response to the user. Weigh "
    "helpfulness, relevance, correctness, depth and clarity."
)
GRADE_SYSTEM = (
    f"{_GRADE_TASK} Explain your rating briefly, then rate the "
    'response from 1 to 10 in exactly this format on the last line: "Rating: [[5]]".'
)

# logprobs mode: no explanation, one token, and the same material to judge
PAIRWISE_ASK = "Answer with one letter: A if assistant A's answer is better, B if assistant B's."
GRADE_ASK = "Answer with one digit from 1 (worst) to 9 (best)."

GRADE_MULTI_TURN_NOTE = (
    "Rate the assistant's answer to the LAST user message, reading the earlier turns as its context."
)

# The judge may quote the format before its verdict, so the LAST bracketed verdict is the one that counts.
_PAIR_RE = re.compile(r"\[\[\s*([ABC])\s*\]\]")
_RATING_RE = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")


def _check(conversation: list[dict]) -> None:
    if not conversation or conversation[-1].get("role") != "assistant":
        raise ValueError("a conversation to judge must end with an assistant message")


def _is_single_turn(conversation: list[dict]) -> bool:
    return sum(1 for m in conversation if m.get("role") == "user") == 1 and len(conversation) <= 3


def _context(conversation: list[dict]) -> list[dict]:
    """The messages the two sides share: everything except the assistant turns."""
    return [m for m in conversation if m.get("role") != "assistant"]


def _transcript(conversation: list[dict], assistant_name: str) -> str:
    names = {"system": "System", "user": "User", "assistant": assistant_name}
    parts = [
        f"### {names.get(m.get('role', ''), m.get('role', ''))}:\n{m.get('content', '')}"
        for m in conversation
    ]
    return "\n\n".join(parts)


def _system_block(conversation: list[dict]) -> str:
    system = [str(m.get("content", "")) for m in conversation if m.get("role") == "system"]
    return f"[System Prompt]\n{system[0]}\n\n" if system else ""


def pairwise_messages(
    conversation_first: list[dict], conversation_second: list[dict], mode: str = "verdict"
) -> list[dict]:
    """The judge request that shows `conversation_first` as assistant A and the other as assistant B; in
    `logprobs` mode it ends by asking for one letter."""
    _check(conversation_first)
    _check(conversation_second)
    if _context(conversation_first) != _context(conversation_second):
        raise ValueError("the two conversations of a pair must share their user (and system) messages")
    if _is_single_turn(conversation_first) and _is_single_turn(conversation_second):
        question = next(m for m in conversation_first if m.get("role") == "user")["content"]
        body = (
            f"{_system_block(conversation_first)}[User Question]\n{question}\n\n"
            f"[The Start of Assistant A's Answer]\n{conversation_first[-1]['content']}\n"
            "[The End of Assistant A's Answer]\n\n"
            f"[The Start of Assistant B's Answer]\n{conversation_second[-1]['content']}\n"
            "[The End of Assistant B's Answer]"
        )
    else:
        body = (
            f"{PAIRWISE_MULTI_TURN_NOTE}\n\n"
            "<|The Start of Assistant A's Conversation with User|>\n\n"
            f"{_transcript(conversation_first, 'Assistant A')}\n\n"
            "<|The End of Assistant A's Conversation with User|>\n\n"
            "<|The Start of Assistant B's Conversation with User|>\n\n"
            f"{_transcript(conversation_second, 'Assistant B')}\n\n"
            "<|The End of Assistant B's Conversation with User|>"
        )
    if mode == "logprobs":
        return [
            {"role": "system", "content": _PAIRWISE_TASK},
            {"role": "user", "content": f"{body}\n\n{PAIRWISE_ASK}"},
        ]
    return [{"role": "system", "content": PAIRWISE_SYSTEM}, {"role": "user", "content": body}]


def grade_messages(conversation: list[dict], mode: str = "verdict") -> list[dict]:
    """The judge request that rates the last assistant turn of `conversation` from 1 to 10; in `logprobs`
    mode it ends by asking for one digit from 1 to 9."""
    _check(conversation)
    if _is_single_turn(conversation):
        question = next(m for m in conversation if m.get("role") == "user")["content"]
        body = (
            f"{_system_block(conversation)}[Question]\n{question}\n\n"
            f"[The Start of Assistant's Answer]\n{conversation[-1]['content']}\n"
            "[The End of Assistant's Answer]"
        )
    else:
        body = (
            f"{GRADE_MULTI_TURN_NOTE}\n\n<|The Start of Assistant's Conversation with User|>\n\n"
            f"{_transcript(conversation, 'Assistant')}\n\n<|The End of Assistant's Conversation with User|>"
        )
    if mode == "logprobs":
        return [
            {"role": "system", "content": _GRADE_TASK},
            {"role": "user", "content": f"{body}\n\n{GRADE_ASK}"},
        ]
    return [{"role": "system", "content": GRADE_SYSTEM}, {"role": "user", "content": body}]


def parse_pairwise(reply: str) -> str | None:
    """'A', 'B' or 'C' (tie) from the judge's reply; None when it gives no verdict in the format."""
    found = _PAIR_RE.findall(reply)
    return found[-1] if found else None


def parse_rating(reply: str) -> float | None:
    """The 1-10 rating from the judge's reply; None when there is none or it is out of range."""
    found = _RATING_RE.findall(reply)
    if not found:
        return None
    rating = float(found[-1])
    return rating if 1.0 <= rating <= 10.0 else None
