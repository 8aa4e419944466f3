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

from alignkit.errors import UserError
from alignkit.evaluation.judge import Judge, api_key_from_env, summarize_grades, summarize_pairwise
from alignkit.evaluation.judge_prompts import parse_pairwise, parse_rating
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
    assert summary["inconsistent"] == 5
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
        make_judge(stub, tmp_path, max_concurrency=1, max_retries=1).pairwise(a, b)
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


def test_unparseable_verdict_is_retried_then_named(stub: Stub, tmp_path) -> None:
    stub.respond = always("Both answers have merit; I cannot choose.")
    with pytest.raises(UserError) as err:
        make_judge(stub, tmp_path, max_retries=2).pairwise([single("q", "a")], [single("q", "b")])
    message = str(err.value)
    assert stub.url + "/chat/completions" in message and "answered 200" in message
    assert "Both answers have merit" in message and "[[A]]" in message
    # one request tried three times; its order-swapped twin, asked beside it, stops retrying once that fails
    assert 4 <= len(stub.requests) <= 6
    stub.respond = lambda body, n: (200, {"unexpected": True})  # not a chat completion at all
    with pytest.raises(UserError, match="unexpected"):
        make_judge(stub, tmp_path, max_retries=0).grade([single("q", "a")])


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
    assert summary["mean"] == 7.0 and summary["n"] == 3
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


def test_api_key_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert api_key_from_env(None) is None
    monkeypatch.setenv("ALIGNKIT_TEST_JUDGE_KEY", "sk-123")
    assert api_key_from_env("ALIGNKIT_TEST_JUDGE_KEY") == "sk-123"
    monkeypatch.delenv("ALIGNKIT_TEST_JUDGE_KEY")
    with pytest.raises(UserError, match="ALIGNKIT_TEST_JUDGE_KEY.*not set"):
        api_key_from_env("ALIGNKIT_TEST_JUDGE_KEY")


def test_bad_judge_settings_are_user_errors(tmp_path) -> None:
    with pytest.raises(UserError, match="judge_base_url must be an http"):
        Judge("127.0.0.1:8000/v1", "m", None, str(tmp_path / "c.sqlite"))
    with pytest.raises(UserError, match="judge_model is empty"):
        Judge("http://127.0.0.1:8000/v1", "", None, str(tmp_path / "c.sqlite"))
