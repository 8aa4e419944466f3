"""`alignkit serve` through the official `openai` client against a real server process on 127.0.0.1: answers
equal the rollout engine's, streaming equals the whole answer, a LoRA adapter is its own model id, and every
kind of bad request gets its 4xx in OpenAI's error shape."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from alignkit.ship.serve.body import MAX_REQUEST_BYTES
from tests.ship.serve_helpers import KEY, ServerProcess, make_adapter, raw_request, running

pytestmark = pytest.mark.slow  # real server processes: not in the fast tier

openai = pytest.importorskip("openai", reason="the server tests use the openai client: pip install openai")

HI = [{"role": "user", "content": "hi there"}]


@pytest.fixture(scope="module")
def adapter(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_adapter(tiny_model, tmp_path_factory.mktemp("lora") / "adapter")


@pytest.fixture(scope="module")
def server(
    tiny_model: str, adapter: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("serve")
    args = [
        "--model",
        tiny_model,
        "--served-model-name",
        "tiny",
        "--adapter",
        f"lora={adapter}",
        "--api-key",
        KEY,
        "--max-input-tokens",
        "64",
        "--max-n",
        "4",
        "--log-db",
        str(folder / "log.db"),
    ]
    with running(args, folder / "server.log") as s:
        yield s


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def _reference(path: str, prompts: list, max_new_tokens: int, adapter: str | None = None) -> list[str]:
    """The rollout engine's greedy answers in this process: what the server must return."""
    from alignkit.generation.rollout import complete
    from alignkit.modeling.load import load_causal_lm

    model, tok = load_causal_lm(adapter or path)
    return complete(model, tok, prompts, max_new_tokens=max_new_tokens, temperature=0.0).texts


def test_models_lists_the_model_and_each_adapter(client: openai.OpenAI, adapter: str) -> None:
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"tiny", "lora"}
    assert models["lora"].model_dump()["root"] == adapter


def test_chat_answer_is_the_rollout_engines_and_streams_the_same(
    client: openai.OpenAI, tiny_model: str
) -> None:
    r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=12, temperature=0)
    expected = _reference(tiny_model, [HI], 12)[0]
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + 12
    assert r.id.startswith("chatcmpl-")

    stream = client.chat.completions.create(
        model="tiny",
        messages=HI,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(deltas) == expected and len(deltas) > 1  # token by token, not one block
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].choices == []


def test_completions_text_prompt_n_and_seed(client: openai.OpenAI, tiny_model: str) -> None:
    r = client.completions.create(model="tiny", prompt="The answer is", max_tokens=8, temperature=0)
    assert r.choices[0].text == _reference(tiny_model, ["The answer is"], 8)[0]
    a = client.completions.create(model="tiny", prompt="Once", max_tokens=10, n=3, temperature=1.0, seed=7)
    b = client.completions.create(model="tiny", prompt="Once", max_tokens=10, n=3, temperature=1.0, seed=7)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # the seed decides the answers
    assert len({c.text for c in a.choices}) > 1  # n samples, not one copied


def test_lora_model_id_answers_with_the_adapter(client: openai.OpenAI, tiny_model: str, adapter: str) -> None:
    with_adapter = client.chat.completions.create(model="lora", messages=HI, max_tokens=10, temperature=0)
    base = client.chat.completions.create(model="tiny", messages=HI, max_tokens=10, temperature=0)
    expected = _reference(tiny_model, [HI], 10, adapter=adapter)[0]
    assert with_adapter.choices[0].message.content == expected
    assert with_adapter.choices[0].message.content != base.choices[0].message.content
    assert with_adapter.model == "lora"


def test_stop_string_ends_the_answer_before_it(client: openai.OpenAI) -> None:
    full = client.completions.create(model="tiny", prompt="abc", max_tokens=20, temperature=0).choices[0].text
    stop = full[6:8]
    assert stop.strip(), f"pick another slice of {full!r}"
    cut = client.completions.create(model="tiny", prompt="abc", max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model="tiny", prompt="abc", max_tokens=20, temperature=0, stop=[stop], stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == full[: full.index(stop)]


def test_nulls_tiny_temperature_and_model_retrieval(client: openai.OpenAI, server: ServerProcess) -> None:
    body = {"model": "tiny", "messages": HI, "max_tokens": 6, "temperature": None, "top_p": None, "n": None}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and len(r.json()["choices"]) == 1  # null means the default
    greedy = client.chat.completions.create(model="tiny", messages=HI, max_tokens=6, temperature=0)
    tiny_t = client.chat.completions.create(model="tiny", messages=HI, max_tokens=6, temperature=1e-300)
    assert tiny_t.choices[0].message.content == greedy.choices[0].message.content
    assert client.models.retrieve("lora").id == "lora"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    lower = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"bearer {KEY}"})
    assert lower.status_code == 200  # the scheme is case-insensitive
    httpx.get(f"{server.url}/v1/made-up-{KEY}", headers={"Authorization": f"Bearer {KEY}"})
    assert "made-up" not in httpx.get(f"{server.url}/metrics").text  # one `other` label, not one per path


def test_api_key_is_required_on_v1(server: ServerProcess) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.get(f"{server.url}/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="tiny", messages=HI, max_tokens=2)
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


@pytest.mark.parametrize(
    ("change", "status", "param"),
    [
        ({"model": "nope"}, 404, "model"),
        ({"temperature": -0.5}, 400, "temperature"),
        ({"top_p": 0}, 400, "top_p"),
        ({"n": 5}, 400, "n"),
        ({"max_tokens": 0}, 400, "max_tokens"),
        ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
        ({"messages": []}, 400, "messages"),
        ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"messages": [{"role": "user", "content": "word " * 100}]}, 413, "messages"),
        ({"seed": 10**30}, 400, "seed"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            400,
            "messages",
        ),
        ({"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
        ({"stop": 7}, 400, "stop"),
    ],
)
def test_bad_requests_get_their_4xx(server: ServerProcess, change: dict, status: int, param: str) -> None:
    body = {"model": "tiny", "messages": HI, "max_tokens": 2, **change}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"]


def test_malformed_json_and_missing_fields_are_400(server: ServerProcess) -> None:
    headers = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
    lone_surrogate = b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}'
    r = httpx.post(f"{server.url}/v1/chat/completions", content=lone_surrogate, headers=headers)
    assert r.status_code == 400 and "not valid Unicode" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": ""}, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    many = {
        "model": "tiny",
        "prompt": ["a"] * 20,
        "n": 4,
        "max_tokens": 1,
    }  # 80 answers > --max-batch-size 32
    r = httpx.post(f"{server.url}/v1/completions", json=many, headers=headers)
    assert r.status_code == 400 and "--max-batch-size" in r.json()["error"]["message"]
    r = httpx.post(
        f"{server.url}/v1/feedback", json={"id": "x", "label": "up", "index": 10**30}, headers=headers
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "index"
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b'{"model": "tiny",', headers=headers)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny"}, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(f"{server.url}/v1/nothing", json={}, headers=headers)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_oversized_bodies_are_413_before_they_are_read(server: ServerProcess) -> None:
    """Neither body is ever sent whole: a server that read a body before checking its size would wait for the
    rest and never answer (raw_request's socket times out)."""
    head = ["POST /v1/chat/completions HTTP/1.1", "Host: test", f"Authorization: Bearer {KEY}"]
    head.append("Content-Type: application/json")
    status, declared = raw_request(server.url, [*head, "Content-Length: 20000000"])  # and not one byte sent
    error = declared["error"]
    assert (status, error["code"], error["type"]) == (413, "request_too_large", "invalid_request_error")
    assert "20000000 bytes" in error["message"] and "--max-request-bytes" in error["message"]
    chunk = b"x" * 65536
    over = MAX_REQUEST_BYTES // len(chunk) + 2  # chunks: past the default limit, and no last chunk after them
    chunks = (b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(over))
    status, streamed = raw_request(server.url, [*head, "Transfer-Encoding: chunked"], chunks)
    assert (status, streamed["error"]["code"]) == (413, "request_too_large")
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_form_body_is_400_naming_its_content_type(server: ServerProcess) -> None:
    body = b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}'
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/feedback"):
        r = httpx.post(  # what `curl -d` sends
            f"{server.url}{path}",
            content=body,
            headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/x-www-form-urlencoded"},
        )
        assert r.status_code == 400, r.text
        assert r.json()["error"]["message"] == (
            "request body must be JSON (Content-Type: application/json); "
            "got application/x-www-form-urlencoded"
        )


def test_twenty_concurrent_clients_are_all_answered_in_shared_passes(
    client: openai.OpenAI, server: ServerProcess
) -> None:
    passes_before = server.metric("alignkit_batch_rows_count")
    rows_before = server.metric("alignkit_batch_rows_sum")
    answers: dict[int, str] = {}

    def ask(i: int) -> None:
        r = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": f"question {i}"}],
            max_tokens=16,
            temperature=0,
        )
        answers[i] = r.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(answers) == list(range(20))
    passes = server.metric("alignkit_batch_rows_count") - passes_before
    rows = server.metric("alignkit_batch_rows_sum") - rows_before
    assert rows == 20 and passes < 20  # requests that waited together were generated together
    solo = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "question 3"}], max_tokens=16, temperature=0
    )
    assert solo.choices[0].message.content == answers[3]  # batching does not change a greedy answer


def test_feedback_on_a_request_with_several_prompts(client: openai.OpenAI, server: ServerProcess) -> None:
    r = client.completions.create(model="tiny", prompt=["abc", "Once"], n=2, max_tokens=3, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    post = lambda body: httpx.post(  # noqa: E731
        f"{server.url}/v1/feedback", json=body, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert post({"id": r.id, "label": "up", "index": 3}).status_code == 200  # the response's own id and index
    assert post({"id": r.id, "label": "up", "index": 4}).status_code == 404
    assert post({"id": "%", "label": "up", "index": 0}).status_code == 404  # no wildcard matching


def test_feedback_is_stored_and_becomes_kto_rows(
    client: openai.OpenAI, server: ServerProcess, tmp_path: Path
) -> None:
    from alignkit.ship.serve.feedback import export_kto

    up = client.chat.completions.create(model="tiny", messages=HI, max_tokens=6, temperature=0)
    down = client.chat.completions.create(model="lora", messages=HI, max_tokens=6, temperature=0)
    post = lambda body: httpx.post(  # noqa: E731
        f"{server.url}/v1/feedback", json=body, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert post({"id": up.id, "label": "up"}).status_code == 200
    assert post({"id": down.id, "label": "down", "comment": "off topic"}).status_code == 200
    assert post({"id": "chatcmpl-unknown", "label": "up"}).status_code == 404
    assert post({"id": up.id, "label": "meh"}).status_code == 400
    assert post({"id": up.id, "label": "up", "index": 3}).status_code == 404
    db = Path(server.log_path).parent / "log.db"
    counts = export_kto(str(db), str(tmp_path / "kto.jsonl"))
    assert counts["down"] == 1 and counts["up"] >= 1  # other tests of this server vote too
    import json

    rows = [json.loads(x) for x in (tmp_path / "kto.jsonl").read_text().splitlines()]
    chat_rows = {(_text(r["completion"]), r["label"]) for r in rows if isinstance(r["prompt"], list)}
    assert (up.choices[0].message.content, True) in chat_rows
    assert (down.choices[0].message.content, False) in chat_rows
    assert all(_text(r["prompt"]) == HI[0]["content"] for r in rows if isinstance(r["prompt"], list))


def _text(x: str | list[dict]) -> str:
    return x if isinstance(x, str) else x[-1]["content"]
