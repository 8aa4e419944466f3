"""An LLM judge through any OpenAI-compatible endpoint: pairwise win rate and MT-Bench-style 1-10 grades.

Every verdict is cached in SQLite as soon as it arrives, keyed by the judge model and the exact request,
so an interrupted eval resumes without asking the judge twice. Requests run concurrently up to a limit
and are retried with exponential back-off on connection errors, timeouts, 429, 5xx and replies whose
verdict does not parse.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx

from alignkit.errors import UserError
from alignkit.evaluation.judge_prompts import grade_messages, pairwise_messages, parse_pairwise, parse_rating
from alignkit.stats import bootstrap_mean_ci

# the order-swapped request shows b as assistant A, so its labels map the other way round
_FIRST = {"A": "a", "B": "b", "C": "tie"}
_SWAPPED = {"A": "b", "B": "a", "C": "tie"}
_SCORE = {"a": 1.0, "tie": 0.5, "b": 0.0}
_RETRY_STATUS = {408, 409, 425, 429}


def api_key_from_env(env_name: str | None) -> str | None:
    """The judge's API key from the environment variable `env_name`; None when no variable is named."""
    if not env_name:
        return None
    key = os.environ.get(env_name)
    if not key:
        raise UserError(
            f"judge_api_key_env names the environment variable {env_name}, but it is not set: "
            f"export {env_name}=<your key>, or leave judge_api_key_env out for an endpoint without a key"
        )
    return key


class VerdictCache:
    """The judge's raw replies in SQLite, one row per request, committed one by one from any thread."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        with self._lock, closing(sqlite3.connect(self.path)) as db, db:
            db.execute("CREATE TABLE IF NOT EXISTS verdicts (key TEXT PRIMARY KEY, reply TEXT NOT NULL)")

    @staticmethod
    def key(model: str, messages: list[dict]) -> str:
        blob = json.dumps([model, messages], ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def get_many(self, keys: list[str]) -> dict[str, str]:
        replies: dict[str, str] = {}
        with self._lock, closing(sqlite3.connect(self.path)) as db:
            for start in range(0, len(keys), 500):  # SQLite limits the number of bound parameters
                chunk = keys[start : start + 500]
                marks = ",".join("?" * len(chunk))
                rows = db.execute(f"SELECT key, reply FROM verdicts WHERE key IN ({marks})", chunk)
                replies.update(dict(rows.fetchall()))
        return replies

    def put(self, key: str, reply: str) -> None:
        # a connection per write: each verdict is on disk before the next arrives, whatever happens later
        with self._lock, closing(sqlite3.connect(self.path)) as db, db:
            db.execute("INSERT OR REPLACE INTO verdicts (key, reply) VALUES (?, ?)", (key, reply))


class Judge:
    """An OpenAI-compatible chat endpoint used as a judge, with a verdict cache at `cache_path`."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None,
        cache_path: str,
        max_concurrency: int = 8,
        max_retries: int = 4,
        timeout: float = 60.0,
        backoff: float = 1.0,
        api_key_env: str | None = None,
        max_tokens: int = 1024,
    ) -> None:
        if not str(base_url).startswith(("http://", "https://")):
            raise UserError(
                f"judge_base_url must be an http(s) URL such as http://127.0.0.1:8000/v1, got {base_url!r}"
            )
        if not model:
            raise UserError("judge_model is empty: name the model the judge endpoint serves")
        if max_concurrency < 1 or max_retries < 0:
            raise UserError(
                f"judge concurrency must be >= 1 and retries >= 0, got {max_concurrency} and {max_retries}"
            )
        base = str(base_url).rstrip("/")
        self.url = base if base.endswith("/chat/completions") else f"{base}/chat/completions"
        self.model = model
        self.api_key = api_key
        self.api_key_env = api_key_env
        self.cache = VerdictCache(cache_path)
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.timeout = timeout
        self.backoff = backoff
        self.max_tokens = max_tokens
        self.requests_sent = 0  # HTTP requests this Judge made, retries included
        self.cache_hits = 0  # verdicts read from the cache instead of asked
        self._count_lock = threading.Lock()

    def pairwise(self, conversations_a: list[list[dict]], conversations_b: list[list[dict]]) -> list[dict]:
        """Judge each a against its b twice, in both orders; a verdict that changes with the order is a tie.

        Each item: {"verdict", "first_order", "swapped_order"}, each "a", "b" or "tie". As in MT-Bench,
        two orders that disagree in any way (a win against a tie included) count as a tie.
        """
        if len(conversations_a) != len(conversations_b):
            raise ValueError(
                f"pairwise needs as many a as b conversations: {len(conversations_a)} != {len(conversations_b)}"
            )
        requests: list[list[dict]] = []
        for a, b in zip(conversations_a, conversations_b):
            requests += [pairwise_messages(a, b), pairwise_messages(b, a)]
        labels = self._judge_all(requests, parse_pairwise)
        results = []
        for i in range(len(conversations_a)):
            first, swapped = _FIRST[labels[2 * i]], _SWAPPED[labels[2 * i + 1]]
            verdict = first if first == swapped else "tie"
            results.append({"verdict": verdict, "first_order": first, "swapped_order": swapped})
        return results

    def grade(self, conversations: list[list[dict]]) -> list[float]:
        """MT-Bench-style 1-10 rating of each conversation's last assistant turn, read in its context."""
        return self._judge_all([grade_messages(c) for c in conversations], parse_rating)

    def _judge_all(self, requests: list[list[dict]], parse: Callable[[str], Any]) -> list[Any]:
        keys = [VerdictCache.key(self.model, m) for m in requests]
        cached = self.cache.get_many(list(dict.fromkeys(keys)))
        verdicts = {k: parse(reply) for k, reply in cached.items()}
        verdicts = {k: v for k, v in verdicts.items() if v is not None}
        todo = {k: m for k, m in zip(keys, requests) if k not in verdicts}  # identical requests asked once
        self.cache_hits += sum(1 for k in keys if k in verdicts)
        if todo:
            verdicts.update(self._ask_all(todo, parse))
        return [verdicts[k] for k in keys]

    def _ask_all(self, todo: dict[str, list[dict]], parse: Callable[[str], Any]) -> dict[str, Any]:
        limits = httpx.Limits(
            max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency
        )
        found: dict[str, Any] = {}
        stop = threading.Event()
        with (
            httpx.Client(timeout=self.timeout, limits=limits) as client,
            ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="judge") as pool,
        ):
            futures = {pool.submit(self._ask, client, m, parse, stop): k for k, m in todo.items()}
            try:
                for future in as_completed(futures):
                    verdict, reply = future.result()
                    self.cache.put(futures[future], reply)
                    found[futures[future]] = verdict
            except BaseException:
                # stop asking, let the requests in flight finish (without retries), and keep their verdicts
                stop.set()
                for future in futures:
                    future.cancel()
                pool.shutdown(wait=True)
                for future, key in futures.items():
                    if key not in found and not future.cancelled() and future.exception() is None:
                        self.cache.put(key, future.result()[1])
                raise
        return found

    def _ask(
        self, client: httpx.Client, messages: list[dict], parse: Callable[[str], Any], stop: threading.Event
    ) -> tuple[Any, str]:
        """One verdict: (parsed, raw reply), retried with back-off; a UserError once retries are spent."""
        failure = ""
        for attempt in range(self.max_retries + 1):
            if attempt and stop.wait(self.backoff * 2 ** (attempt - 1)):
                raise UserError(f"{failure} (not retried: another judge request failed)")
            with self._count_lock:
                self.requests_sent += 1
            try:
                response = client.post(self.url, json=self._body(messages), headers=self._headers())
            except httpx.TransportError as exc:  # refused, DNS, timeouts, dropped connections
                failure = f"could not reach the judge endpoint {self.url}: {type(exc).__name__}: {exc}"
                continue
            status = response.status_code
            if status in (401, 403):
                raise UserError(f"the judge endpoint {self.url} answered {status}: {self._key_hint()}")
            if status in _RETRY_STATUS or status >= 500:
                failure = f"the judge endpoint {self.url} answered {status}: {_sample(response.text)}"
                continue
            if status >= 400:
                raise UserError(
                    f"the judge endpoint {self.url} answered {status}: {_error_message(response)}"
                )
            reply = _reply_text(response)
            verdict = parse(reply) if reply is not None else None
            if verdict is not None:
                return verdict, reply
            expected = "[[A]], [[B]] or [[C]]" if parse is parse_pairwise else "Rating: [[1-10]]"
            failure = (
                f"the judge at {self.url} answered {status} with a verdict that does not parse "
                f"(expected {expected}); the reply begins: {_sample(response.text if reply is None else reply)}"
            )
        raise UserError(
            f"{failure} (after {self.max_retries + 1} attempts; verdicts already judged are cached)"
        )

    def _body(self, messages: list[dict]) -> dict:
        return {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": self.max_tokens}

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _key_hint(self) -> str:
        if self.api_key_env:
            return f"check the key in ${self.api_key_env}"
        return "no key was sent: name the environment variable that holds it with judge_api_key_env"


def _sample(text: str) -> str:
    return repr(text[:200])


def _reply_text(response: httpx.Response) -> str | None:
    """choices[0].message.content of an OpenAI chat completion; None when the body has another shape."""
    try:
        content = response.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


def _error_message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = None
    return str(message) if message else _sample(response.text)


def summarize_pairwise(verdicts: list[dict]) -> dict:
    """Win rate of a over b with a tie as half a win, its bootstrap 95% interval, and the counts.

    `inconsistent` counts the items whose two orders disagreed: the judge's position bias shows there.
    """

    scores = [_SCORE[v["verdict"]] for v in verdicts]
    wins = sum(1 for v in verdicts if v["verdict"] == "a")
    ties = sum(1 for v in verdicts if v["verdict"] == "tie")
    inconsistent = sum(1 for v in verdicts if v.get("first_order") != v.get("swapped_order"))
    summary = {"wins": wins, "ties": ties, "losses": len(scores) - wins - ties, "n": len(scores)}
    summary["inconsistent"] = inconsistent
    if not scores:
        return {**summary, "win_rate": None, "ci95": None}
    lo, hi = bootstrap_mean_ci(scores)
    return {**summary, "win_rate": sum(scores) / len(scores), "ci95": [lo, hi]}


def summarize_grades(scores: list[float]) -> dict:
    """Mean 1-10 grade with its bootstrap 95% interval."""

    if not scores:
        return {"mean": None, "n": 0, "ci95": None}
    lo, hi = bootstrap_mean_ci([float(s) for s in scores])
    return {"mean": sum(scores) / len(scores), "n": len(scores), "ci95": [lo, hi]}
