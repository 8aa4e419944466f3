"""Token log-probs of `alignkit serve`, in-process on the tiny model: they are the model's own log-softmax at
each generated position (a plain forward pass over prompt + answer says so to 1e-5), the top ones are the
most likely in order, the chat and completions forms and streaming carry the same numbers, and bad values
are 400s that name the field."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from alignkit.generation.rollout import encode_prompts, sample_hf
from alignkit.ship.serve.app import Server, build_app
from alignkit.ship.serve.batcher import Batcher, Job
from alignkit.ship.serve.continuous import ContinuousBatcher, Stepper
from alignkit.ship.serve.engine import HFGenerate, ModelPool
from alignkit.ship.serve.logprobs import StepLogprobs, _unicode_to_byte
from alignkit.ship.serve.metrics import Metrics

HI = [{"role": "user", "content": "hi there"}]
PROMPT = "The answer is"
BYTE = _unicode_to_byte()
TO_CHAR = {b: ch for ch, b in BYTE.items()}


@pytest.fixture(scope="module", params=["continuous", "pass"])
def served(tiny_model: str, request: pytest.FixtureRequest) -> Iterator[tuple[TestClient, ModelPool]]:
    """The server in process, batching continuously (the default) and pass by pass."""
    pool = ModelPool(tiny_model, {}, "tiny", device="cpu")
    if request.param == "continuous":
        batcher = ContinuousBatcher(Stepper(pool), 8, 8)
    else:
        batcher = Batcher(HFGenerate(pool), 8, 8, None, pool.context)
    with TestClient(build_app(Server(pool, batcher, Metrics()))) as client:
        yield client, pool


def _post(client: TestClient, path: str, **body: Any) -> dict:
    r = client.post(path, json={"model": "tiny", **body})
    assert r.status_code == 200, r.text
    return r.json()


def _model_logprobs(model: Any, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """(len(completion), vocab): the log-softmax of one plain forward pass at each answer position."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : len(prompt) - 1 + len(completion)]


def _greedy(pool: ModelPool, prompt: list[int], max_tokens: int) -> list[int]:
    return sample_hf(pool.model, pool.tokenizer, [prompt], 1, max_tokens, 0.0).completion_ids[0]


def _id(pool: ModelPool, raw: list[int]) -> int:
    """A token id from its `bytes` (the tiny tokenizer is byte-level BPE)."""
    return pool.tokenizer.convert_tokens_to_ids("".join(TO_CHAR[b] for b in raw))


def _name(pool: ModelPool, token: int) -> str:
    """A token's text alone; a part of a character (U+FFFD alone) by its bytes, as OpenAI names it."""
    text = pool.tokenizer.decode([token], skip_special_tokens=False)
    if "\ufffd" not in text:
        return text
    raw = [BYTE[ch] for ch in pool.tokenizer.convert_ids_to_tokens(token)]
    return "bytes:" + "".join(chr(b) if 32 <= b < 127 and b != 92 else f"\\x{b:02x}" for b in raw)


def _close(got: list[float], expected: torch.Tensor) -> bool:
    return torch.allclose(torch.tensor(got, dtype=torch.float32), expected, atol=1e-5, rtol=0)


def test_completion_logprobs_are_the_models_at_temperature_0(served: tuple[TestClient, ModelPool]) -> None:
    client, pool = served
    r = _post(client, "/v1/completions", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=5)
    choice, tok = r["choices"][0], pool.tokenizer
    lp = choice["logprobs"]
    prompt = encode_prompts(tok, [PROMPT])[0]
    completion = _greedy(pool, prompt, 8)[: len(lp["tokens"])]
    assert len(completion) == r["usage"]["completion_tokens"] == len(lp["token_logprobs"]) > 0
    assert lp["tokens"] == [_name(pool, t) for t in completion]
    assert any(t.startswith("bytes:\\x") for t in lp["tokens"])  # this answer splits a character
    model_lp = _model_logprobs(pool.model, prompt, completion)
    assert _close(lp["token_logprobs"], model_lp[torch.arange(len(completion)), completion])
    for token, top, step in zip(lp["tokens"], lp["top_logprobs"], model_lp):
        values, ids = step.topk(5)
        expected: dict[str, float] = {}
        for i, v in zip(ids.tolist(), values.tolist()):
            expected.setdefault(_name(pool, i), v)
        assert list(top) == list(expected) and _close(
            list(top.values()), torch.tensor(list(expected.values()))
        )
        assert next(iter(top)) == token  # greedy: the drawn token is the most likely one
    assert lp["text_offset"] == [len(tok.decode(completion[:t])) for t in range(len(completion))]


def test_each_row_of_a_padded_batch_gets_its_own_logprobs(served: tuple[TestClient, ModelPool]) -> None:
    client, pool = served
    prompts = [PROMPT, "Once upon a time there was", "7"]  # unequal lengths: left padding in one pass
    r = _post(client, "/v1/completions", prompt=prompts, max_tokens=6, temperature=0, logprobs=1)
    for text, choice in zip(prompts, r["choices"]):
        prompt = encode_prompts(pool.tokenizer, [text])[0]
        lp = choice["logprobs"]
        completion = _greedy(pool, prompt, 6)[: len(lp["tokens"])]
        assert lp["tokens"] == [_name(pool, t) for t in completion] and completion
        model_lp = _model_logprobs(pool.model, prompt, completion)
        assert _close(lp["token_logprobs"], model_lp[torch.arange(len(completion)), completion])


def test_chat_logprobs_are_the_models_and_match_the_completions_form(
    served: tuple[TestClient, ModelPool],
) -> None:
    client, pool = served
    r = _post(
        client,
        "/v1/chat/completions",
        messages=HI,
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = r["choices"][0]["logprobs"]["content"]
    prompt = encode_prompts(pool.tokenizer, [HI])[0]
    completion = [_id(pool, e["bytes"]) for e in content]
    assert completion == _greedy(pool, prompt, 8)[: len(completion)] and len(completion) == 8
    model_lp = _model_logprobs(pool.model, prompt, completion)
    assert _close([e["logprob"] for e in content], model_lp[torch.arange(8), completion])
    for e, step in zip(content, model_lp):
        values, ids = step.topk(3)
        assert [_id(pool, a["bytes"]) for a in e["top_logprobs"]] == ids.tolist()
        assert _close([a["logprob"] for a in e["top_logprobs"]], values)
        assert e["top_logprobs"][0]["token"] == e["token"]  # greedy: the drawn token is the most likely one
    answer = b"".join(bytes(e["bytes"]) for e in content).decode("utf-8", errors="replace")
    assert answer == r["choices"][0]["message"]["content"]  # the bytes spell the answer, split characters too
    # the same prompt as text to /v1/completions: the same tokens and numbers
    text = pool.tokenizer.apply_chat_template(HI, tokenize=False, add_generation_prompt=True)
    assert encode_prompts(pool.tokenizer, [text])[0] == prompt
    plain = _post(client, "/v1/completions", prompt=text, max_tokens=8, temperature=0, logprobs=3)
    lp = plain["choices"][0]["logprobs"]
    assert lp["tokens"] == [e["token"] for e in content]
    assert _close(lp["token_logprobs"], torch.tensor([e["logprob"] for e in content]))


def test_sampled_logprobs_are_the_models_not_the_tempered_ones(served: tuple[TestClient, ModelPool]) -> None:
    client, pool = served
    body = {"messages": HI, "max_tokens": 8, "temperature": 1.5, "top_p": 0.8, "seed": 3, "logprobs": True}
    content = _post(client, "/v1/chat/completions", **body)["choices"][0]["logprobs"]["content"]
    prompt = encode_prompts(pool.tokenizer, [HI])[0]
    completion = [_id(pool, e["bytes"]) for e in content]
    model_lp = _model_logprobs(pool.model, prompt, completion)
    got = [e["logprob"] for e in content]
    assert _close(got, model_lp[torch.arange(len(completion)), completion])
    tempered = torch.log_softmax(model_lp / 1.5, dim=-1)[torch.arange(len(completion)), completion]
    assert not _close(got, tempered)
    assert all(e["top_logprobs"] == [] for e in content)  # `logprobs: true` alone: no alternatives


def test_logprobs_0_gives_the_drawn_token_alone_and_none_asked_gives_null(
    served: tuple[TestClient, ModelPool],
) -> None:
    client, _ = served
    lp = _post(client, "/v1/completions", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=0)
    lp = lp["choices"][0]["logprobs"]
    assert lp["top_logprobs"] == [{t: v} for t, v in zip(lp["tokens"], lp["token_logprobs"])]
    plain = _post(client, "/v1/completions", prompt=PROMPT, max_tokens=4, temperature=0)
    chat = _post(client, "/v1/chat/completions", messages=HI, max_tokens=4, logprobs=False)
    assert plain["choices"][0]["logprobs"] is None and chat["choices"][0]["logprobs"] is None


def _events(client: TestClient, path: str, body: dict) -> list[dict]:
    import json

    with client.stream("POST", path, json={"model": "tiny", "stream": True, **body}) as r:
        assert r.status_code == 200
        lines = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_streamed_logprobs_add_up_to_the_whole_answers(served: tuple[TestClient, ModelPool]) -> None:
    client, _ = served
    body = {"messages": HI, "max_tokens": 10, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    whole = _post(client, "/v1/chat/completions", **body)["choices"][0]["logprobs"]["content"]
    chunks = [c["choices"][0] for c in _events(client, "/v1/chat/completions", body) if c["choices"]]
    assert [e for c in chunks if c["logprobs"] for e in c["logprobs"]["content"]] == whole
    assert sum(bool(c["logprobs"]) for c in chunks) > 1  # token by token, not one block

    body = {"prompt": PROMPT, "max_tokens": 10, "temperature": 0, "logprobs": 2, "stop": [" the"]}
    whole = _post(client, "/v1/completions", **body)["choices"][0]["logprobs"]
    chunks = [c["choices"][0]["logprobs"] for c in _events(client, "/v1/completions", body)]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for c in chunks if c for x in c[key]] == whole[key]


@pytest.mark.parametrize(
    ("path", "change", "param"),
    [
        ("/v1/completions", {"logprobs": 21}, "logprobs"),
        ("/v1/completions", {"logprobs": -1}, "logprobs"),
        ("/v1/completions", {"logprobs": "5"}, "logprobs"),
        ("/v1/completions", {"logprobs": True}, "logprobs"),
        ("/v1/completions", {"logprobs": 2, "echo": True}, "echo"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": False, "top_logprobs": 0}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": "yes"}, "logprobs"),
        ("/v1/chat/completions", {"logprobs": 5}, "logprobs"),
    ],
)
def test_bad_logprob_values_are_400_naming_the_field(
    served: tuple[TestClient, ModelPool], path: str, change: dict, param: str
) -> None:
    client, _ = served
    prompt = {"messages": HI} if "chat" in path else {"prompt": PROMPT}
    r = client.post(path, json={"model": "tiny", "max_tokens": 2, **prompt, **change})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and param in error["message"]
    assert _post(client, path, max_tokens=2, **prompt)["choices"]  # and the server keeps serving


def test_a_backend_without_logprobs_says_so() -> None:
    pool = SimpleNamespace(ids={"m": None}, paths={"m": "m"}, tokenizer=None, context=64)
    app = build_app(Server(pool, Batcher(lambda batch: None, 8, 8), Metrics()))
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"model": "m", "prompt": "x", "logprobs": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"


def test_only_a_pass_that_asks_reads_logprobs(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []
    monkeypatch.setattr(
        "alignkit.ship.serve.engine.sample_hf", lambda *a, **kw: seen.append(kw["logits_processors"])
    )

    @contextmanager
    def active(model_id: str) -> Iterator[None]:
        yield None

    generate = HFGenerate(SimpleNamespace(active=active, tokenizer=None, eos={0}))
    loop = asyncio.new_event_loop()
    try:
        job = lambda top: Job("m", [[1]], 1, 4, 0.0, 1.0, [], None, None, loop, top)  # noqa: E731
        generate([job(None), job(None)])
        generate([job(None), job(3), job(0)])
    finally:
        loop.close()
    assert seen[0] is None  # normal serving: no recorder, nothing computed
    assert isinstance(seen[1][0], StepLogprobs) and seen[1][0].k == 3
