"""An LLM judge through any OpenAI-compatible endpoint: pairwise win rate and MT-Bench-style 1-10 grades.

Every verdict is cached in SQLite as soon as it arrives, keyed by the judge model and the exact request,
so an interrupted eval resumes without asking the judge twice. Requests run concurrently up to a limit
and are retried with exponential back-off on connection errors, timeouts, 429, 5xx and bodies that are
not a chat completion. A chat completion whose verdict does not parse is a final, "unparsable" verdict
(None): the judge asks at temperature 0, so asking again would get the same reply. It is cached like any
other, left out of the summaries (which count it under `unparsable`), and stops the eval only when more
than `max_unparsable` of a call's verdicts are unparsable.

`mode="logprobs"` asks for a one-token answer and reads the verdict from its log-probabilities instead
(`alignkit.generation.judge_logprobs`), for small local judges that do not follow the `[[A]]` format.
"""

from __future__ import annotations

import hashlib
import json
import logging
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
from alignkit.generation import judge_logprobs as lp
from alignkit.generation.judge_prompts import grade_messages, pairwise_messages, parse_pairwise, parse_rating
from alignkit.stats import bootstrap_mean_ci

# the order-swapped request shows b as assistant A, so its labels map the other way round
_FIRST = {"A": "a", "B": "b", "C": "tie"}
_SWAPPED = {"A": "b", "B": "a", "C": "tie"}
_SCORE = {"a": 1.0, "tie": 0.5, "b": 0.0}
_RETRY_STATUS = {408, 409, 425, 429}
EXPECTED_PAIRWISE = "end with [[A]], [[B]] or [[C]]"
EXPECTED_RATING = "end with Rating: [[1-10]]"
MODES = ("verdict", "logprobs")

log = logging.getLogger("alignkit")


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
    def key(model: str, messages: list[dict], mode: str = "verdict") -> str:
        # a logprobs-mode reply (its first token's log-probs) never answers a verdict-mode request
        parts = [model, messages] if mode == "verdict" else [model, messages, mode]
        blob = json.dumps(parts, ensure_ascii=False, sort_keys=True)
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
        mode: str = "verdict",
    ) -> None:
        if not str(base_url).startswith(("http://", "https://")):
            raise UserError(
                f"judge_base_url must be an http(s) URL such as http://127.0.0.1:8000/v1, got {base_url!r}"
            )
        if not model:
            raise UserError("judge_model is empty: name the model the judge endpoint serves")
        if mode not in MODES:
            raise UserError(f"judge_mode is verdict or logprobs, got {mode!r}")
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
        self.mode = mode
        self.requests_sent = 0  # HTTP requests this Judge made, retries included
        self.cache_hits = 0  # verdicts read from the cache instead of asked
        self._count_lock = threading.Lock()

    def pairwise(
        self,
        conversations_a: list[list[dict]],
        conversations_b: list[list[dict]],
        max_unparsable: float = 1.0,
    ) -> list[dict]:
        """Judge each a against its b twice, in both orders; a verdict that changes with the order is a tie.

        Each item: {"verdict", "first_order", "swapped_order"}, each "a", "b" or "tie". As in MT-Bench,
        two orders that disagree in any way (a win against a tie included) count as a tie. An order whose
        reply does not parse is None there, and the item's verdict is None when either order is. A UserError
        when more than `max_unparsable` (a share) of the items have no verdict.

        In logprobs mode the item also has "p_a", p(a wins) averaged over the two orders, and its verdict is
        that average's (`judge_logprobs.pairwise_item`): a tie when |p(a) - p(b)| < 0.1.
        """
        if len(conversations_a) != len(conversations_b):
            raise ValueError(
                f"pairwise needs as many a as b conversations: {len(conversations_a)} != {len(conversations_b)}"
            )
        requests: list[list[dict]] = []
        for a, b in zip(conversations_a, conversations_b):
            requests += [pairwise_messages(a, b, self.mode), pairwise_messages(b, a, self.mode)]
        logprobs = self.mode == "logprobs"
        answers = self._judge_all(requests, lp.parse_letter if logprobs else parse_pairwise)
        results, bad_replies = [], []
        for i in range(len(conversations_a)):
            (got_1, reply_1), (got_2, reply_2) = answers[2 * i], answers[2 * i + 1]
            item = lp.pairwise_item(got_1, got_2) if logprobs else _verdict_item(got_1, got_2)
            if item["verdict"] is None:
                bad_replies.append(reply_1 if item["first_order"] is None else reply_2)
            results.append(item)
        expected = lp.EXPECTED_LETTER if logprobs else EXPECTED_PAIRWISE
        self._check_unparsable(bad_replies, len(results), "pairwise verdicts", expected, max_unparsable)
        return results

    def grade(self, conversations: list[list[dict]], max_unparsable: float = 1.0) -> list[float | None]:
        """MT-Bench-style 1-10 rating of each conversation's last assistant turn, read in its context; None
        where the reply does not parse. A UserError when more than `max_unparsable` (a share) are None.
        In logprobs mode: the expected 1-9 digit of the judge's first token, mapped linearly onto 1-10."""
        logprobs = self.mode == "logprobs"
        requests = [grade_messages(c, self.mode) for c in conversations]
        answers = self._judge_all(requests, lp.parse_digit if logprobs else parse_rating)
        bad_replies = [reply for grade, reply in answers if grade is None]
        expected = lp.EXPECTED_DIGIT if logprobs else EXPECTED_RATING
        self._check_unparsable(bad_replies, len(answers), "1-10 grades", expected, max_unparsable)
        return [grade for grade, _ in answers]

    def _judge_all(self, requests: list[list[dict]], parse: Callable[[str], Any]) -> list[tuple[Any, str]]:
        """(parsed verdict or None, raw reply) for each request, from the cache or asked."""
        keys = [VerdictCache.key(self.model, m, self.mode) for m in requests]
        cached = self.cache.get_many(list(dict.fromkeys(keys)))
        answers = {k: (parse(reply), reply) for k, reply in cached.items()}  # an unparsable reply is final
        todo = {k: m for k, m in zip(keys, requests) if k not in answers}  # identical requests asked once
        self.cache_hits += sum(1 for k in keys if k in answers)
        if todo:
            answers.update(self._ask_all(todo, parse))
        return [answers[k] for k in keys]

    def _check_unparsable(
        self, bad_replies: list[str], total: int, what: str, expected: str, max_unparsable: float
    ) -> None:
        """Warns of the unparsable verdicts left out; a UserError when they are more than max_unparsable."""
        if not bad_replies:
            return
        counted = f"{len(bad_replies)} of {total} {what} from the judge {self.model!r} did not parse"
        if len(bad_replies) / total <= max_unparsable:  # the share, as judge_max_unparsable reads
            log.warning("%s (each reply should %s); they are left out of the summary", counted, expected)
            return
        raise UserError(
            f"{counted}, a share of {len(bad_replies) / total:.2f}, more than judge_max_unparsable="
            f"{max_unparsable:g}: each reply should "
            f"{expected}; the first unparsable reply begins {_sample(bad_replies[0])}. Use a stronger "
            "judge model (judge_model), or raise judge_max_unparsable (1: never stop) to summarize the "
            f"verdicts that parse; every verdict judged is cached in {self.cache.path}"
        )

    def _ask_all(
        self, todo: dict[str, list[dict]], parse: Callable[[str], Any]
    ) -> dict[str, tuple[Any, str]]:
        limits = httpx.Limits(
            max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency
        )
        found: dict[str, tuple[Any, str]] = {}
        stop = threading.Event()
        with (
            httpx.Client(timeout=self.timeout, limits=limits) as client,
            ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="judge") as pool,
        ):
            futures = {pool.submit(self._ask, client, m, parse, stop): k for k, m in todo.items()}
            try:
                for future in as_completed(futures):
                    found[futures[future]] = future.result()
                    self.cache.put(futures[future], found[futures[future]][1])
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
        """One verdict: (parsed or None when the reply does not parse, raw reply), retried with back-off
        on transport errors, 408/409/425/429, 5xx and bodies that are not a chat completion; a UserError
        once retries are spent."""
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
            reply = self._reply(response)
            if reply is not None:  # a chat completion: final, whether its verdict parses or not
                return parse(reply), reply
            failure = (
                f"the judge at {self.url} answered {status} with a body that is not a chat completion "
                f"(no choices[0].message{'' if self.mode == 'logprobs' else '.content'}); it begins: "
                f"{_sample(response.text)}"
            )
        raise UserError(
            f"{failure} (after {self.max_retries + 1} attempts; verdicts already judged are cached)"
        )

    def _body(self, messages: list[dict]) -> dict:
        if self.mode == "logprobs":  # one token, and the likeliest ones at its position
            return {
                "model": self.model,
                "messages": messages,
                "temperature": 0,
                "max_tokens": 1,
                "logprobs": True,
                "top_logprobs": lp.TOP_LOGPROBS,
            }
        return {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": self.max_tokens}

    def _reply(self, response: httpx.Response) -> str | None:
        """The reply to cache and parse: the message's text, or in logprobs mode the raw JSON of its
        log-probs; None when the body is not a chat completion (retried)."""
        if self.mode != "logprobs":
            return _reply_text(response)
        try:
            return lp.reply_logprobs(response.json())
        except ValueError:
            return None
        except lp.NoLogprobs:
            raise UserError(
                f"judge_mode: logprobs, but the judge endpoint {self.url} does not return log-probabilities "
                f"(choices[0].logprobs is null in its reply for {self.model!r}): use judge_mode: verdict, or "
                "an endpoint that does (alignkit serve, vLLM)"
            ) from None

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _key_hint(self) -> str:
        if self.api_key_env:
            return f"check the key in ${self.api_key_env}"
        return "no key was sent: name the environment variable that holds it with judge_api_key_env"


def _verdict_item(label_first: str | None, label_swapped: str | None) -> dict:
    """One pair's verdict from the labels of its two orders (verdict mode): a tie when they disagree."""
    first, swapped = _FIRST.get(label_first or ""), _SWAPPED.get(label_swapped or "")
    verdict = None if first is None or swapped is None else first if first == swapped else "tie"
    return {"verdict": verdict, "first_order": first, "swapped_order": swapped}


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
    """Win rate of a over b with a tie as half a win, its bootstrap 95% interval, and the counts, over the
    items with a verdict: `n` counts those, `unparsable` the items left out (verdict None).

    `inconsistent` counts the items whose two orders disagreed: the judge's position bias shows there.
    """

    parsed = [v for v in verdicts if v["verdict"] is not None]
    scores = [_SCORE[v["verdict"]] for v in parsed]
    wins = sum(1 for v in parsed if v["verdict"] == "a")
    ties = sum(1 for v in parsed if v["verdict"] == "tie")
    inconsistent = sum(1 for v in parsed if v.get("first_order") != v.get("swapped_order"))
    summary = {"wins": wins, "ties": ties, "losses": len(scores) - wins - ties, "n": len(scores)}
    summary.update(inconsistent=inconsistent, unparsable=len(verdicts) - len(parsed))
    if not scores:
        return {**summary, "win_rate": None, "ci95": None}
    lo, hi = bootstrap_mean_ci(scores)
    return {**summary, "win_rate": sum(scores) / len(scores), "ci95": [lo, hi]}


def summarize_grades(grades: list[float | None]) -> dict:
    """Mean 1-10 grade with its bootstrap 95% interval, over the grades that parsed: `n` counts those,
    `unparsable` the Nones left out."""

    scores = [float(g) for g in grades if g is not None]
    summary = {"n": len(scores), "unparsable": len(grades) - len(scores)}
    if not scores:
        return {"mean": None, **summary, "ci95": None}
    lo, hi = bootstrap_mean_ci(scores)
    return {"mean": sum(scores) / len(scores), **summary, "ci95": [lo, hi]}
