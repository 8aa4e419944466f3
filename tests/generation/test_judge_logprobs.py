"""The judge's logprobs mode: verdicts read from the first token's log-probabilities, against the stub server of
test_judge.py with crafted log-probs (numbers worked out by hand), and end to end against `alignkit serve` of the
tiny model, whose grades and win probabilities a plain forward pass reproduces."""

from __future__ import annotations

import json
import math
import sqlite3

import pytest
import torch

from alignkit.errors import UserError
from alignkit.evaluation.config import build_eval_config
from alignkit.evaluation.run import make_judge as make_eval_judge
from alignkit.generation.judge import Judge, VerdictCache, summarize_grades, summarize_pairwise
from alignkit.generation.judge_prompts import GRADE_ASK, PAIRWISE_ASK, grade_messages, pairwise_messages
from alignkit.stats import bootstrap_mean_ci
from tests.generation import test_judge
from tests.generation.test_judge import Stub, between, chat, make_judge, single

stub = test_judge.stub  # the stub OpenAI-compatible server fixture

# a reply's first-token top log-probs as (token, probability)
Tops = list[tuple[str, float]]


def with_logprobs(tops: Tops) -> tuple[int, dict]:
    """A chat completion of one token (the likeliest) carrying `tops` as its first position's top_logprobs."""

    def entry(token: str, p: float) -> dict:
        return {"token": token, "logprob": math.log(p), "bytes": list(token.encode())}

    content = [{**entry(*tops[0]), "top_logprobs": [entry(t, p) for t, p in tops]}]
    status, body = chat(tops[0][0])
    body["choices"][0]["logprobs"] = {"content": content}
    return status, body


def lp_judge(stub: Stub, tmp_path, **kw) -> Judge:
    return make_judge(stub, tmp_path, mode="logprobs", **kw)


GRADE_TOPS: dict[str, Tops] = {
    # 5: 0.2 + 0.1 (" 5" is 5 too), 1: 0.1; "10", "0" and words are not digits of the 1-9 scale
    # -> (5 * 0.3 + 1 * 0.1) / 0.4 = 4.0 on 1-9 -> 1 + 3 * 9 / 8 = 4.375 on 1-10
    "a0": [("Hello", 0.4), ("5", 0.2), ("1", 0.1), (" 5", 0.1), ("10", 0.05), ("0", 0.05)],
    "a1": [("9", 0.6), ("The", 0.3)],  # 9 alone -> 10.0
    "a2": [("I", 0.5), ("Aleph", 0.2)],  # no digit among them: unparsable
    "a3": [("3", 0.25), ("6", 0.25), ("x", 0.5)],  # 4.5 -> 1 + 3.5 * 9 / 8 = 4.9375
    "a4": [("1", 0.9)],  # 1 -> 1.0
}


def test_logprobs_grades_are_the_expected_digit_on_the_ten_scale(stub: Stub, tmp_path) -> None:
    stub.respond = lambda body, n: with_logprobs(
        GRADE_TOPS[between(body["messages"][-1]["content"], "Answer]\n", "\n[The End")]
    )
    conversations = [single(f"q{i}", f"a{i}") for i in range(5)]
    judge = lp_judge(stub, tmp_path)
    expected = [4.375, 10.0, None, 4.9375, 1.0]
    grades = judge.grade(conversations, max_unparsable=0.5)
    assert grades == pytest.approx(expected, abs=1e-12)
    # one token at temperature 0 with the 20 likeliest, asked once each; the prompt asks for a digit
    assert len(stub.requests) == 5 and judge.requests_sent == 5
    for body in stub.requests:
        assert (body["max_tokens"], body["temperature"], body["logprobs"], body["top_logprobs"]) == (
            1,
            0,
            True,
            20,
        )
        assert body["messages"][-1]["content"].endswith("\n\n" + GRADE_ASK)
        assert "[[" not in body["messages"][0]["content"]  # no verdict format to follow
    summary = summarize_grades(grades)
    assert summary["n"] == 4 and summary["unparsable"] == 1
    assert summary["mean"] == pytest.approx((4.375 + 10.0 + 4.9375 + 1.0) / 4)
    # the cache holds the raw JSON of the log-probs: a resumed run re-reads it without a request
    with sqlite3.connect(tmp_path / "judge_cache.sqlite") as db:
        cached = [json.loads(r) for (r,) in db.execute("SELECT reply FROM verdicts")]
    assert sorted(c[0]["top_logprobs"][0]["token"] for c in cached) == ["1", "3", "9", "Hello", "I"]
    again = lp_judge(stub, tmp_path)
    assert again.grade(conversations, max_unparsable=0.5) == grades
    assert again.requests_sent == 0 and again.cache_hits == 5 and len(stub.requests) == 5
    with pytest.raises(UserError, match="1 of 5 1-10 grades .* should have a digit from 1 to 9 among the 20"):
        again.grade(conversations, max_unparsable=0.0)
    # a verdict-mode judge on the same cache asks for itself: the two modes' replies never collide
    stub.respond = lambda body, n: chat("Rating: [[7]]")
    assert make_judge(stub, tmp_path).grade(conversations[:1]) == [7.0] and len(stub.requests) == 6
    messages = grade_messages(conversations[0])
    assert VerdictCache.key("m", messages) != VerdictCache.key("m", messages, "logprobs")


# p(A) of each request by the answer it shows as A; the swapped order shows b as A
PAIR_TOPS: dict[str, Tops] = {
    # item 0: first p(A) = (0.4 + 0.2) / 0.8 = 0.75; swapped p(A) = ("a" counts as A) 0.3 / 0.8 = 0.375, so a
    # wins it with 0.625; p_a = (0.75 + 0.625) / 2 = 0.6875: a
    "a0": [("A", 0.4), (" A", 0.2), ("B", 0.2)],
    "b0": [("B", 0.5), ("A", 0.2), ("a", 0.1)],
    # item 1: first 0.3 / 0.5 = 0.6 (a); swapped 0.26 / 0.5 = 0.52, a's 0.48 (a tie: |0.48 - 0.52| < 0.1);
    # p_a = 0.54, |0.54 - 0.46| = 0.08 < 0.1: a tie
    "a1": [("A", 0.3), ("B", 0.2)],
    "b1": [("A", 0.26), ("B", 0.24)],
    # item 2: first 0.19 / 0.5 = 0.38 (b); swapped 0.5 (a tie); p_a = 0.44, |0.44 - 0.56| = 0.12: b
    "a2": [("B", 0.31), ("A", 0.19)],
    "b2": [("A", 0.25), ("B", 0.25)],
    # item 3: its swapped order has neither letter among the top ones: no verdict
    "a3": [("A", 0.7), ("B", 0.1)],
    "b3": [("The", 0.6), ("I", 0.2)],
    # item 4: one letter only is enough: first p(A) = 1, swapped p(A) = 0 ("b"); p_a = 1: a
    "a4": [("A", 0.05), ("Hi", 0.9)],
    "b4": [("b", 0.3), ("Hi", 0.6)],
}


def test_logprobs_pairwise_averages_both_orders_with_a_tie_band(stub: Stub, tmp_path) -> None:
    stub.respond = lambda body, n: with_logprobs(
        PAIR_TOPS[between(body["messages"][-1]["content"], "Assistant A's Answer]\n", "\n[The End")]
    )
    a = [single(f"q{i}", f"a{i}") for i in range(5)]
    b = [single(f"q{i}", f"b{i}") for i in range(5)]
    verdicts = lp_judge(stub, tmp_path).pairwise(a, b, max_unparsable=0.25)
    assert [(v["verdict"], v["first_order"], v["swapped_order"]) for v in verdicts] == [
        ("a", "a", "a"),
        ("tie", "a", "tie"),
        ("b", "b", "tie"),
        (None, "a", None),
        ("a", "a", "a"),
    ]
    assert [v["p_a"] for v in verdicts] == pytest.approx([0.6875, 0.54, 0.44, None, 1.0], abs=1e-12)
    assert len(stub.requests) == 10
    assert all(r["messages"][-1]["content"].endswith("\n\n" + PAIRWISE_ASK) for r in stub.requests)
    summary = summarize_pairwise(verdicts)
    assert (summary["wins"], summary["ties"], summary["losses"], summary["n"]) == (2, 1, 1, 4)
    assert (summary["inconsistent"], summary["unparsable"]) == (2, 1)
    assert summary["win_rate"] == 2.5 / 4 and summary["ci95"] == list(bootstrap_mean_ci([1.0, 0.5, 0.0, 1.0]))
    again = lp_judge(stub, tmp_path)
    assert again.pairwise(a, b, max_unparsable=0.25) == verdicts and again.requests_sent == 0
    with pytest.raises(UserError, match="1 of 5 pairwise verdicts .* should have A or B among the 20"):
        again.pairwise(a, b, max_unparsable=0.0)


def test_an_endpoint_without_logprobs_is_a_user_error_at_the_first_reply(stub: Stub, tmp_path) -> None:
    stub.respond = lambda body, n: chat("7")  # no `logprobs` key at all
    with pytest.raises(UserError) as err:
        lp_judge(stub, tmp_path, max_retries=4).grade([single("q", "a")])
    message = str(err.value)
    assert "does not return log-probabilities" in message and stub.url + "/chat/completions" in message
    assert "judge_mode: verdict" in message and "alignkit serve, vLLM" in message
    assert len(stub.requests) == 1  # not retried, and nothing more asked
    with sqlite3.connect(tmp_path / "judge_cache.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0] == 0
    stub.respond = lambda body, n: (200, {"choices": [{"message": {"content": "A"}, "logprobs": None}]})
    with pytest.raises(UserError, match="does not return log-probabilities"):
        lp_judge(stub, tmp_path).pairwise([single("q", "x")], [single("q", "y")])


def test_judge_mode_setting(tmp_path) -> None:
    keys = {"model": "m", "dataset": "d.jsonl", "judge_base_url": "http://127.0.0.1:1/v1", "judge_model": "j"}
    assert build_eval_config(keys, "cli").judge_mode == "verdict"
    cfg = build_eval_config({**keys, "judge_mode": "logprobs", "output_dir": str(tmp_path)}, "cli")
    assert make_eval_judge(cfg, cache=False).mode == "logprobs"
    with pytest.raises(UserError, match="`judge_mode` is verdict .* or logprobs .* got 'logprob'"):
        build_eval_config({**keys, "judge_mode": "logprob"}, "cli")
    with pytest.raises(UserError, match="judge_mode is verdict or logprobs"):
        Judge("http://127.0.0.1:1/v1", "j", None, ":memory:", mode="grade")


def nudged_judge(tiny_model: str, out: str, requests: list[list[dict]]) -> str:
    """The tiny model with the output rows of "1".."9", "A" and "B" (its lm_head untied from the embeddings)
    raised along the mean last hidden state of `requests`: a random model's 20 likeliest tokens of 512 seldom
    hold a digit or a letter; these hold all eleven, in proportions that still vary with the prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        hidden = torch.stack(
            [model.model(input_ids=template(tok, r)).last_hidden_state[0, -1] for r in requests]
        )
    direction = torch.nn.functional.normalize(hidden, dim=-1).mean(0)
    head = model.lm_head.weight.detach().clone()
    head[tok.convert_tokens_to_ids(list("123456789AB"))] += 8.0 * direction / (hidden @ direction).mean()
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(head)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def template(tok, messages: list[dict]) -> torch.Tensor:
    """The chat-templated prompt's ids, through the tokenizer's own template (not alignkit's encoding)."""
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return torch.tensor([tok(text, add_special_tokens=False).input_ids])


def top20_probs(model, tok, messages: list[dict], labels: str) -> dict[str, float]:
    """Each label's probability among the 20 likeliest next tokens of a plain forward pass (variants summed)."""
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=template(tok, messages)).logits[0, -1].double(), -1)
    values, ids = logprobs.topk(20)
    found: dict[str, float] = {}
    for token, lp in zip(ids.tolist(), values.tolist()):
        name = tok.decode([token]).strip().upper()
        if name in labels:
            found[name] = found.get(name, 0.0) + math.exp(lp)
    return found


def test_logprobs_judge_against_alignkit_serve_of_the_tiny_model(
    tiny_model: str, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.ship.serve.command import ServeSettings, start_server

    monkeypatch.delenv("ALIGNKIT_API_KEY", raising=False)
    graded = [
        single("What is 2 + 3?", "5"),
        single("What is 4 + 4?", "no idea"),
        single("Name a colour.", "Blue."),
    ]
    a = [single("Name a colour.", "Blue."), single("What is 1 + 1?", "2")]
    b = [
        single("Name a colour.", "I do not know."),
        single("What is 1 + 1?", "Two, since one plus one is two."),
    ]
    judge_path = nudged_judge(tiny_model, str(tmp_path / "judge"), [grade_messages(graded[0], "logprobs")])
    settings = ServeSettings(model=judge_path, served_model_name="tiny-judge", port=0, device="cpu")
    with start_server(settings) as server:
        judge = Judge(
            server.url, "tiny-judge", None, str(tmp_path / "cache.sqlite"), timeout=60.0, mode="logprobs"
        )
        grades = judge.grade(graded, max_unparsable=0.0)
        verdicts = judge.pairwise(a, b, max_unparsable=0.0)
    tok = AutoTokenizer.from_pretrained(judge_path)
    model = AutoModelForCausalLM.from_pretrained(judge_path).eval()
    for conversation, grade in zip(graded, grades):
        probs = top20_probs(model, tok, grade_messages(conversation, "logprobs"), "123456789")
        assert len(probs) == 9  # every digit among the 20: the renormalisation is over all nine
        expected = sum(int(d) * p for d, p in probs.items()) / sum(probs.values())
        assert grade == pytest.approx(1 + (expected - 1) * 9 / 8, abs=1e-4)
    assert len({round(g, 3) for g in grades}) == 3  # the grades follow the prompts
    for x, y, verdict in zip(a, b, verdicts):
        first, swapped = (
            top20_probs(model, tok, pairwise_messages(*p, "logprobs"), "AB") for p in ((x, y), (y, x))
        )
        p_a = (first["A"] / (first["A"] + first["B"]) + swapped["B"] / (swapped["A"] + swapped["B"])) / 2
        assert verdict["verdict"] is not None and verdict["p_a"] == pytest.approx(p_a, abs=1e-4)
        assert verdict["verdict"] == ("tie" if abs(2 * p_a - 1) < 0.1 else "a" if p_a > 0.5 else "b")
