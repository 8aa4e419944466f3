"""The LLM judge against a stub OpenAI-compatible server on 127.0.0.1: order swap, cache, retries, errors."""

from __future__ import annotations

import json
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from alignkit.data.formats import Example
from alignkit.errors import UserError
from alignkit.evaluation.config import build_eval_config
from alignkit.evaluation.context import EvalContext, Side
from alignkit.evaluation.measures import judge_score, judge_win_rate
from alignkit.evaluation.report import render_table, sample_rows
from alignkit.evaluation.settings import EvalConfig
from alignkit.generation.judge import Judge, summarize_grades, summarize_pairwise
from alignkit.generation.judge_prompts import parse_pairwise, parse_rating
from alignkit.stats import bootstrap_mean_ci

# respond(request body, 1-based request number) -> (status, JSON payload), or None to drop the connection
Responder = Callable[[dict, int], "tuple[int, dict] | None"]


def chat(content: str) -> tuple[int, dict]:
    return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}


def always(content: str) -> Responder:
    return lambda body, n: chat(content)


class Stub:
    """What the stub server saw, and how it answers."""

    def __init__(self) -> None:
        self.respond: Responder = always("[[A]]")
        self.delay = 0.0
        self.requests: list[dict] = []
        self.auth: list[str | None] = []
        self.paths: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.url = ""

    def prompts(self) -> list[str]:
        return [r["messages"][-1]["content"] for r in self.requests]


class Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (the http.server name)
        stub: Stub = self.server.stub  # type: ignore[attr-defined]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with stub.lock:
            stub.requests.append(body)
            stub.auth.append(self.headers.get("Authorization"))
            stub.paths.append(self.path)
            number = len(stub.requests)
            stub.in_flight += 1
            stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
        try:
            time.sleep(stub.delay)
            answer = stub.respond(body, number)
        finally:
            with stub.lock:
                stub.in_flight -= 1
        if answer is None:  # a hard failure: the connection closes without a response
            return
        data = json.dumps(answer[1]).encode()
        self.send_response(answer[0])
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def stub() -> Iterator[Stub]:
    state = Stub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.stub = state  # type: ignore[attr-defined]
    state.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


def make_judge(stub: Stub, tmp_path, **kw) -> Judge:
    kw = {"api_key": None, "max_retries": 2, "backoff": 0.01, "timeout": 5.0, **kw}
    return Judge(
        stub.url, kw.pop("model", "judge-model"), cache_path=str(tmp_path / "judge_cache.sqlite"), **kw
    )


def single(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def between(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0]


def prefer_longer(body: dict, n: int) -> tuple[int, dict]:
    prompt = body["messages"][-1]["content"]
    a = between(prompt, "[The Start of Assistant A's Answer]\n", "\n[The End of Assistant A's Answer]")
    b = between(prompt, "[The Start of Assistant B's Answer]\n", "\n[The End of Assistant B's Answer]")
    return chat(
        "Longer is better. " + ("[[A]]" if len(a) > len(b) else "[[B]]" if len(b) > len(a) else "[[C]]")
    )


def test_first_position_bias_cancels_to_a_tie(stub: Stub, tmp_path) -> None:
    judge = make_judge(stub, tmp_path, api_key="sk-test")
    a = [single(f"q{i}", f"model answer {i}") for i in range(5)]
    b = [single(f"q{i}", f"baseline {i}") for i in range(5)]
    verdicts = judge.pairwise(a, b)
    assert verdicts == [{"verdict": "tie", "first_order": "a", "swapped_order": "b"}] * 5
    summary = summarize_pairwise(verdicts)
    assert summary["win_rate"] == 0.5 and summary["ci95"] == [0.5, 0.5]
    assert (summary["wins"], summary["ties"], summary["losses"], summary["n"]) == (0, 5, 0, 5)
    assert summary["inconsistent"] == 5 and summary["unparsable"] == 0
    # each pair asked twice, once per order, at temperature 0, with the key, at /v1/chat/completions
    assert len(stub.requests) == 10 and judge.requests_sent == 10
    assert all(r["temperature"] == 0 and r["model"] == "judge-model" for r in stub.requests)
    assert set(stub.auth) == {"Bearer sk-test"} and set(stub.paths) == {"/v1/chat/completions"}
    shown_as_a = [between(p, "[The Start of Assistant A's Answer]\n", "\n[The End") for p in stub.prompts()]
    assert sorted(x for x in shown_as_a if x.endswith(" 0")) == ["baseline 0", "model answer 0"]


def test_longer_answer_preference_gives_wins_and_losses(stub: Stub, tmp_path) -> None:
    stub.respond = prefer_longer
    a = [
        single("q0", "a long answer"),
        single("q1", "another long one"),
        single("q2", "no"),
        single("q3", "same"),
    ]
    b = [single("q0", "short"), single("q1", "short"), single("q2", "a long reply"), single("q3", "emas")]
    verdicts = make_judge(stub, tmp_path).pairwise(a, b)
    assert [v["verdict"] for v in verdicts] == ["a", "a", "b", "tie"]
    assert [v["first_order"] == v["swapped_order"] for v in verdicts] == [True] * 4  # a consistent judge
    summary = summarize_pairwise(verdicts)
    assert (summary["wins"], summary["ties"], summary["losses"], summary["inconsistent"]) == (2, 1, 1, 0)
    assert summary["win_rate"] == pytest.approx(2.5 / 4)
    assert summary["ci95"] == list(bootstrap_mean_ci([1.0, 1.0, 0.0, 0.5]))


def test_cache_answers_a_second_judge_without_requests(stub: Stub, tmp_path) -> None:
    stub.respond = prefer_longer
    a = [single(f"q{i}", "x" * (i + 1)) for i in range(3)]
    b = [single(f"q{i}", "yy") for i in range(3)]
    first = make_judge(stub, tmp_path).pairwise(a, b)
    assert len(stub.requests) == 6
    again = make_judge(stub, tmp_path)
    assert (
        again.pairwise(a, b)
        == first
        == [{"verdict": v, "first_order": v, "swapped_order": v} for v in ("b", "tie", "a")]
    )
    assert len(stub.requests) == 6 and again.requests_sent == 0 and again.cache_hits == 6
    # another judge model is another judge: nothing of the first one's verdicts is reused
    make_judge(stub, tmp_path, model="other-judge").pairwise(a, b)
    assert len(stub.requests) == 12
    # a pair of identical answers is one request (both orders read the same), and a tie
    assert (
        make_judge(stub, tmp_path).pairwise([single("q", "same")], [single("q", "same")])[0]["verdict"]
        == "tie"
    )
    assert len(stub.requests) == 13


def test_interrupted_run_keeps_its_verdicts_and_resumes(stub: Stub, tmp_path) -> None:
    k = 3
    stub.respond = lambda body, n: chat("[[A]]") if n <= k else None  # then the server dies mid-request
    a = [single(f"q{i}", f"a{i}") for i in range(4)]
    b = [single(f"q{i}", f"b{i}") for i in range(4)]
    with pytest.raises(
        UserError, match=r"could not reach the judge endpoint http://127\.0\.0\.1:\d+/v1/chat"
    ) as err:
        # a back-off of 1 s: the next request's retry waits long enough for the failure to stop the run, even
        # on a loaded machine (at 0.01 s the worker once got through another request and a half first)
        make_judge(stub, tmp_path, max_concurrency=1, max_retries=1, backoff=1.0).pairwise(a, b)
    assert "cached" in str(err.value)
    # the k verdicts, the failed request and its one retry, and perhaps the next request, which the
    # single worker may start before the failure stops the run
    assert len(stub.requests) in (k + 2, k + 3)
    with sqlite3.connect(tmp_path / "judge_cache.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0] == k
    stub.respond = always("[[A]]")
    before = len(stub.requests)
    resumed = make_judge(stub, tmp_path)
    assert [v["verdict"] for v in resumed.pairwise(a, b)] == ["tie"] * 4
    assert len(stub.requests) - before == 2 * 4 - k and resumed.cache_hits == k


@pytest.mark.parametrize("status", [500, 503, 429])
def test_transient_errors_are_retried(stub: Stub, tmp_path, status: int) -> None:
    stub.respond = lambda body, n: (
        (status, {"error": {"message": "busy"}}) if n <= 2 else chat("Rating: [[8]]")
    )
    assert make_judge(stub, tmp_path, max_retries=4).grade([single("q", "a")]) == [8.0]
    assert len(stub.requests) == 3


def test_unauthorized_fails_at_once_naming_url_and_key(stub: Stub, tmp_path) -> None:
    stub.respond = lambda body, n: (401, {"error": {"message": "invalid api key"}})
    judge = make_judge(stub, tmp_path, api_key="wrong", api_key_env="JUDGE_KEY", max_retries=4)
    with pytest.raises(UserError) as err:
        judge.grade([single("q", "a")])
    assert stub.url + "/chat/completions" in str(err.value) and "401" in str(err.value)
    assert "$JUDGE_KEY" in str(err.value)
    assert len(stub.requests) == 1


def test_other_client_errors_fail_at_once_with_the_server_message(stub: Stub, tmp_path) -> None:
    stub.respond = lambda body, n: (404, {"error": {"message": "model 'judge-model' does not exist"}})
    with pytest.raises(UserError, match=r"answered 404: model 'judge-model' does not exist"):
        make_judge(stub, tmp_path, max_retries=4).grade([single("q", "a")])
    assert len(stub.requests) == 1


def test_unreachable_endpoint_is_retried_then_named(tmp_path) -> None:
    with socket.socket() as s:  # a port that was free a moment ago and that nobody listens on now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    judge = Judge(url, "m", None, str(tmp_path / "c.sqlite"), max_retries=2, backoff=0.01, timeout=2.0)
    with pytest.raises(UserError, match="could not reach the judge endpoint " + url.replace(".", r"\.")):
        judge.grade([single("q", "a")])
    assert judge.requests_sent == 3


def test_malformed_bodies_are_retried_then_named(stub: Stub, tmp_path) -> None:
    stub.respond = lambda body, n: (200, {"unexpected": True})  # not a chat completion at all
    with pytest.raises(UserError, match="not a chat completion.*unexpected") as err:
        make_judge(stub, tmp_path, max_retries=2).grade([single("q", "a")])
    assert "after 3 attempts" in str(err.value) and len(stub.requests) == 3
    with sqlite3.connect(tmp_path / "judge_cache.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0] == 0  # nothing cached: asked again
    stub.respond = lambda body, n: (200, {"unexpected": True}) if n <= 4 else chat("Rating: [[5]]")
    assert make_judge(stub, tmp_path, max_retries=2).grade([single("q", "a")]) == [5.0]
    assert len(stub.requests) == 5


ALEPH = 'The answer to this question is: "Aleph"'  # what SmolLM2-135M-Instruct answered as a judge


def by_answer(replies: dict[str, str]) -> Responder:
    """Answers a single-turn grade request with the reply for the answer it shows."""
    return lambda body, n: chat(replies[between(body["messages"][-1]["content"], "Answer]\n", "\n[The End")])


def test_unparsable_grades_are_final_cached_and_left_out(stub: Stub, tmp_path) -> None:
    replies = {"a0": "Rating: [[4]]", "a1": ALEPH, "a2": "Rating: [[6]]", "a3": ALEPH, "a4": "Rating: [[8]]"}
    stub.respond = by_answer(replies)
    conversations = [single(f"q{i}", f"a{i}") for i in range(5)]
    judge = make_judge(stub, tmp_path, max_retries=4, backoff=5.0)  # a retry would take seconds
    t0 = time.perf_counter()
    assert judge.grade(conversations, max_unparsable=0.5) == [4.0, None, 6.0, None, 8.0]
    assert time.perf_counter() - t0 < 4.0  # no back-off waited
    assert len(stub.requests) == 5 and judge.requests_sent == 5  # each asked exactly once
    with sqlite3.connect(tmp_path / "judge_cache.sqlite") as db:
        assert sorted(r for (r,) in db.execute("SELECT reply FROM verdicts")) == sorted(replies.values())
    summary = summarize_grades([4.0, None, 6.0, None, 8.0])
    assert summary == {"mean": 6.0, "n": 3, "unparsable": 2, "ci95": list(bootstrap_mean_ci([4.0, 6.0, 8.0]))}
    # a resumed eval reads the unparsable replies from the cache too: nothing is asked again
    again = make_judge(stub, tmp_path)
    assert again.grade(conversations, max_unparsable=0.5) == [4.0, None, 6.0, None, 8.0]
    assert len(stub.requests) == 5 and again.requests_sent == 0 and again.cache_hits == 5


def test_pairwise_item_with_an_unparsable_order_has_no_verdict(stub: Stub, tmp_path) -> None:
    # item 1's swapped order (its b shown as assistant A) gets no verdict; the other orders prefer longer
    stub.respond = lambda body, n: (
        (chat("I like both.") if "Assistant A's Answer]\nbb1\n" in body["messages"][-1]["content"] else None)
        or prefer_longer(body, n)
    )
    a = [single("q0", "long a0"), single("q1", "a1"), single("q2", "a2")]
    b = [single("q0", "b0"), single("q1", "bb1"), single("q2", "long b2")]
    verdicts = make_judge(stub, tmp_path).pairwise(a, b, max_unparsable=0.5)
    assert [tuple(v.values()) for v in verdicts] == [("a", "a", "a"), (None, "b", None), ("b", "b", "b")]
    assert len(stub.requests) == 6
    summary = summarize_pairwise(verdicts)
    assert [summary[k] for k in ("win_rate", "n", "unparsable", "inconsistent", "ties")] == [0.5, 2, 1, 0, 0]
    again = make_judge(stub, tmp_path)
    assert again.pairwise(a, b) == verdicts and len(stub.requests) == 6 and again.requests_sent == 0


def test_too_many_unparsable_verdicts_stop_with_the_first_reply(stub: Stub, tmp_path) -> None:
    stub.respond = by_answer({"a0": ALEPH, "a1": "Rating: [[7]]", "a2": ALEPH, "a3": ALEPH})
    conversations = [single(f"q{i}", f"a{i}") for i in range(4)]
    with pytest.raises(UserError) as err:
        make_judge(stub, tmp_path, max_retries=4).grade(conversations, max_unparsable=0.5)
    assert str(err.value) == (
        "3 of 4 1-10 grades from the judge 'judge-model' did not parse, a share of 0.75, more than "
        "judge_max_unparsable=0.5: each reply should end with Rating: [[1-10]]; the first unparsable "
        f"reply begins {ALEPH!r}. Use a stronger judge model (judge_model), or raise judge_max_unparsable "
        "(1: never stop) to summarize the verdicts that parse; every verdict judged is cached in "
        f"{tmp_path / 'judge_cache.sqlite'}"
    )
    assert len(stub.requests) == 4  # not retried
    with sqlite3.connect(tmp_path / "judge_cache.sqlite") as db:  # nothing lost: all four are cached
        assert db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0] == 4
    again = make_judge(stub, tmp_path)  # the same verdicts pass under a higher limit, from the cache
    assert again.grade(conversations, max_unparsable=0.75) == [None, 7.0, None, None]
    assert again.requests_sent == 0
    # 0: the first unparsable verdict stops; its reply is quoted up to 200 characters
    stub.respond = always("[[D]] " + "x" * 300)
    with pytest.raises(UserError, match="1 of 1 pairwise verdicts") as err:
        make_judge(stub, tmp_path).pairwise([single("q", "x")], [single("q", "x")], max_unparsable=0.0)
    message, quoted = str(err.value), repr("[[D]] " + "x" * 194)
    assert f"end with [[A]], [[B]] or [[C]]; the first unparsable reply begins {quoted}." in message


def test_summaries_leave_unparsable_verdicts_out() -> None:
    grades = summarize_grades([None, 7.0, None, 9.0, 2.0])
    assert grades == {"mean": 6.0, "n": 3, "unparsable": 2, "ci95": list(bootstrap_mean_ci([7.0, 9.0, 2.0]))}
    assert summarize_grades([None, None]) == {"mean": None, "n": 0, "unparsable": 2, "ci95": None}
    keys = ("verdict", "first_order", "swapped_order")
    pairs = [dict(zip(keys, v)) for v in [("a", "a", "a"), (None, "a", None), ("tie", "a", "b"), ("b",) * 3]]
    ci = list(bootstrap_mean_ci([1.0, 0.5, 0.0]))
    counts = dict(wins=1, ties=1, losses=1, n=3, inconsistent=1, unparsable=1)
    assert summarize_pairwise(pairs) == {**counts, "win_rate": 0.5, "ci95": ci}
    counts = dict(wins=0, ties=0, losses=0, n=0, inconsistent=0, unparsable=2)
    assert summarize_pairwise(pairs[1:2] * 2) == {**counts, "win_rate": None, "ci95": None}


def turns(question: str, *answers: str) -> list[dict]:
    """A conversation: `question`, then the answers with the same follow-up between them."""
    msgs = [{"role": "user", "content": question}]
    for i, answer in enumerate(answers):
        msgs += [{"role": "user", "content": "more?"}] * (i > 0) + [{"role": "assistant", "content": answer}]
    return msgs


def test_judge_metrics_leave_unparsable_verdicts_out(stub: Stub, tmp_path) -> None:
    def respond(body: dict, n: int) -> tuple[int, dict]:
        prompt = body["messages"][-1]["content"]
        if "[[A]]" in body["messages"][0]["content"]:  # pairwise: no verdict when q1 is asked
            return chat(ALEPH if "q1" in prompt else "[[C]]")
        last = prompt.split("Answer]\n")[1].split("\n[The End")[0] if "Answer]" in prompt else prompt
        last = last.split("### Assistant:\n")[-1].split("\n\n<|The End")[0]  # a multi-turn transcript's
        return chat({"good": "Rating: [[9]]", "fine": "Rating: [[6]]"}.get(last, ALEPH))

    stub.respond = respond
    mine = [turns("q0", "good", "bad", "fine"), turns("q1", "bad"), turns("q2", "good")]
    theirs = [turns("q0", "x", "y", "z"), turns("q1", "x"), turns("q2", "x")]
    model, base = Side("model", "m", conversations=mine), Side("baseline", "b", conversations=theirs)
    ctx = EvalContext(EvalConfig(judge_max_unparsable=0.5), None, [], sides=[model, base])
    ctx.judge = make_judge(stub, tmp_path)
    judge_score(ctx, model)  # turns 9, bad, 6 | bad | 9: 2 of 5 unparsable, not more than 0.5
    assert model.per_prompt["judge_score"] == [7.5, None, 9.0]
    ci = list(bootstrap_mean_ci([9.0, 6.0, 9.0]))
    assert model.metrics["judge_score"] == {"value": 8.0, "n": 3, "unparsable": 2, "ci95": ci}
    judge_win_rate(ctx, model)
    assert model.per_prompt["judge_win_rate"] == [0.5, None, 0.5]
    row = model.metrics["judge_win_rate"]
    assert (row["value"], row["n"], row["unparsable"], row["ties"]) == (0.5, 2, 1, 2)
    model.texts = [["x"]] * 3
    rows = sample_rows([Example(prompt=f"q{i}") for i in range(3)], [model])
    # worst first: the lowest judge score first, the prompt without one last
    assert [r["index"] for r in rows] == [0, 2, 1] and rows[2]["model"]["scores"]["judge_score"] is None
    ctx.cfg.judge_max_unparsable = 0.25
    with pytest.raises(UserError, match=r"2 of 5 1-10 grades .* judge_max_unparsable=0\.25"):
        judge_score(ctx, model)
    everything_bad = {"judge_score": {"value": None, **summarize_grades([None])}}
    assert "| judge_score |  |  | 0 |" in render_table(everything_bad, None)


def test_judge_max_unparsable_is_a_share() -> None:
    keys = {"model": "m", "dataset": "d.jsonl"}
    assert build_eval_config(keys, "cli").judge_max_unparsable == 0.5
    for share in (0, 1, "0.2"):
        cfg = build_eval_config({**keys, "judge_max_unparsable": share}, "cli")
        assert cfg.judge_max_unparsable == float(share)
    for share in (-0.1, 1.5, float("nan")):
        with pytest.raises(UserError, match="`judge_max_unparsable` is a share"):
            build_eval_config({**keys, "judge_max_unparsable": share}, "cli")


def test_concurrency_is_limited(stub: Stub, tmp_path) -> None:
    stub.delay = 0.3
    a = [single(f"q{i}", f"a{i}") for i in range(6)]
    b = [single(f"q{i}", f"b{i}") for i in range(6)]
    make_judge(stub, tmp_path, max_concurrency=4).pairwise(a, b)
    assert len(stub.requests) == 12 and stub.max_in_flight == 4


def test_grades_and_multi_turn_conversations(stub: Stub, tmp_path) -> None:
    stub.respond = lambda body, n: chat(
        "Good. Rating: [[9]]" if "capital" in body["messages"][-1]["content"] else "Weak. Rating: [[3]]"
    )
    multi = [
        {"role": "user", "content": "Name a French city."},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "Why did you pick that one?"},
        {"role": "assistant", "content": "It is the capital."},
    ]
    scores = make_judge(stub, tmp_path).grade([multi, single("q", "no idea"), single("q2", "the capital")])
    assert scores == [9.0, 3.0, 9.0]
    [prompt] = [p for p in stub.prompts() if "French" in p]
    for turn in ("Name a French city.", "Paris.", "Why did you pick that one?", "It is the capital.", "LAST"):
        assert turn in prompt
    summary = summarize_grades(scores)
    assert summary["mean"] == 7.0 and summary["n"] == 3 and summary["unparsable"] == 0
    assert summary["ci95"] == list(bootstrap_mean_ci([9.0, 3.0, 9.0]))
    assert 3.0 <= summary["ci95"][0] < 7.0 < summary["ci95"][1] <= 9.0
    # pairwise shows both sides' whole conversations, the shared user turns and each side's answers
    other = multi[:3] + [{"role": "assistant", "content": "It has the Eiffel Tower."}]
    stub.respond = always("[[B]]")
    make_judge(stub, tmp_path).pairwise([multi], [other])
    pair_prompt = stub.prompts()[-1]
    assert pair_prompt.count("Why did you pick that one?") == 2
    assert "It is the capital." in pair_prompt and "It has the Eiffel Tower." in pair_prompt
    with pytest.raises(ValueError, match="share their user"):
        make_judge(stub, tmp_path).pairwise([single("q", "a")], [single("another q", "b")])


def test_verdict_parsers() -> None:
    assert parse_pairwise('Format: "[[A]]" or "[[B]]". Final verdict: [[B]]') == "B"
    assert parse_pairwise("[[ C ]]") == "C" and parse_pairwise("A is better") is None
    assert parse_rating("Rating: [[7]]") == 7.0 and parse_rating("Rating: [[7.5]]") == 7.5
    assert parse_rating("Rating: [[11]]") is None and parse_rating("Rating: 7") is None


def test_bad_judge_settings_are_user_errors(tmp_path) -> None:
    with pytest.raises(UserError, match="judge_base_url must be an http"):
        Judge("127.0.0.1:8000/v1", "m", None, str(tmp_path / "c.sqlite"))
    with pytest.raises(UserError, match="judge_model is empty"):
        Judge("http://127.0.0.1:8000/v1", "", None, str(tmp_path / "c.sqlite"))
