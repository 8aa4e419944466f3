"""The store behind `alignkit serve --log-db`: completions, their answers and thumbs-up/down feedback, and
`alignkit data from-feedback`, which turns that feedback into KTO rows.

One small adapter covers both back ends: SQLite (the standard library, WAL mode) for a file path, psycopg 3
for a `postgresql://` URL. Every query is written once with `?` placeholders; the adapter rewrites them to
psycopg's `%s`. Every call commits before it returns, so rows survive a server killed with `kill -9`.

Tables (schema version in `meta`):
  completions(id, model, prompt_kind 'chat'|'text', prompt JSON, params JSON, created)
  answers(completion_id, idx, content)                  one row per choice
  feedback(id, completion_id, idx, label 'up'|'down', comment, created)   every vote; the latest one counts
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from alignkit.data.files import write_jsonl_atomic
from alignkit.errors import UserError

SCHEMA_VERSION = 1
LABELS = {"up": True, "down": False}
POSTGRES_HINT = "pip install 'alignkit[postgres]'"
T = TypeVar("T")


def _tables(id_column: str) -> list[str]:
    """The schema, portable between SQLite and PostgreSQL (only the auto-numbered id column differs)."""
    return [
        "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS completions (id TEXT PRIMARY KEY, model TEXT NOT NULL, "
        "prompt_kind TEXT NOT NULL, prompt TEXT NOT NULL, params TEXT NOT NULL, created BIGINT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS answers (completion_id TEXT NOT NULL REFERENCES completions (id), "
        "idx INTEGER NOT NULL, content TEXT NOT NULL, PRIMARY KEY (completion_id, idx))",
        f"CREATE TABLE IF NOT EXISTS feedback (id {id_column}, completion_id TEXT NOT NULL, "
        "idx INTEGER NOT NULL, label TEXT NOT NULL CHECK (label IN ('up', 'down')), comment TEXT, "
        "created DOUBLE PRECISION NOT NULL, "
        "FOREIGN KEY (completion_id, idx) REFERENCES answers (completion_id, idx))",
        "CREATE INDEX IF NOT EXISTS feedback_answer ON feedback (completion_id, idx, id)",
        "CREATE INDEX IF NOT EXISTS completions_model ON completions (model)",
    ]


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def is_postgres(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def sqlite_path(url: str) -> str:
    """`sqlite:///rel.db` / `sqlite:////abs.db` (SQLAlchemy's form) or a plain path."""
    return os.path.expanduser(url[len("sqlite:///") :] if url.startswith("sqlite:///") else url)


class _Backend:
    """What differs between the two databases: how to connect, placeholders, errors, the id column."""

    def __init__(self, url: str, create: bool) -> None:
        self.url = url
        self.postgres = is_postgres(url)
        if self.postgres:
            try:
                import psycopg
            except ImportError as exc:
                raise UserError(
                    f"{redact(url)}: a PostgreSQL database needs psycopg: {POSTGRES_HINT}"
                ) from exc
            self.error: type[Exception] = psycopg.Error
            self.integrity: type[Exception] = psycopg.IntegrityError
            self.id_column = "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"
        else:
            self.error, self.integrity = sqlite3.Error, sqlite3.IntegrityError
            self.id_column = "INTEGER PRIMARY KEY AUTOINCREMENT"
            self.path = sqlite_path(url)
            self._check_path(create)

    def sql(self, query: str) -> str:
        return query.replace("?", "%s") if self.postgres else query

    def _check_path(self, create: bool) -> None:
        path, url = self.path, self.url
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise UserError(
                f"{url}: the folder {folder} does not exist; create it (mkdir -p) or give another path"
            )
        if os.path.isdir(path):
            raise UserError(f"{url} is a folder; give a database file path such as {path}/feedback.db")
        if not create and not os.path.exists(path):
            raise UserError(
                f"{url}: no such database file; give the --log-db file that `alignkit serve` wrote"
            )

    def connect(self) -> Any:
        if self.postgres:
            import psycopg

            try:
                return psycopg.connect(self.url, connect_timeout=10)
            except psycopg.Error as exc:
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise UserError(
                    f"cannot connect to {redact(self.url)}: {reason}. Check that PostgreSQL runs there, that the "
                    "database exists (createdb NAME) and that the user may log in"
                ) from exc
        try:
            conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
            # WAL: readers (an export) never block the server; NORMAL sync keeps every committed row
            # through a killed process (a power cut may lose the last few)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.DatabaseError as exc:
            raise UserError(
                f"{self.url} is not a usable SQLite database ({exc}); give a new file path or the --log-db "
                "file that `alignkit serve` wrote"
            ) from exc
        return conn


class FeedbackStore:
    """Completions and their feedback in SQLite or PostgreSQL. Safe to share between threads (one lock)."""

    def __init__(self, url: str, *, create: bool = True) -> None:
        """`url`: a SQLite file path (or sqlite:///path) or a postgresql:// URL. With `create` the tables are
        made when missing; without it (export) the database must already hold them."""
        self.url = url
        self._backend = _Backend(url, create)
        self._lock = threading.Lock()
        self._conn = self._backend.connect()
        try:
            self._run(self._create_schema if create else self._check_schema)
        except BaseException:
            self._conn.close()
            raise

    # ------------------------------------------------------------------------------------------ plumbing
    def _execute(self, query: str, params: tuple = ()) -> Any:
        return self._conn.execute(self._backend.sql(query), params)

    def _rollback(self) -> None:
        with contextlib.suppress(Exception):  # a broken connection cannot roll back; nothing to undo then
            self._conn.rollback()

    def _run(self, work: Callable[[], T]) -> T:
        """`work` in one transaction, committed before returning. A PostgreSQL connection that was lost
        (server restarted) is opened again and the work retried once."""
        with self._lock:
            for attempt in (0, 1):
                if getattr(self._conn, "closed", False) and self._backend.postgres:
                    self._conn = self._backend.connect()
                try:
                    result = work()
                    self._conn.commit()
                    return result
                except BaseException as exc:
                    self._rollback()
                    lost = self._backend.postgres and getattr(self._conn, "closed", False)
                    if attempt or not lost or not isinstance(exc, self._backend.error):
                        raise
            raise AssertionError("unreachable")

    def _create_schema(self) -> None:
        for statement in _tables(self._backend.id_column):
            self._execute(statement)
        self._execute(
            "INSERT INTO meta (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
            ("schema_version", str(SCHEMA_VERSION)),
        )
        self._check_schema()

    def _check_schema(self) -> None:
        try:
            row = self._execute("SELECT value FROM meta WHERE name = ?", ("schema_version",)).fetchone()
        except self._backend.error as exc:
            raise UserError(
                f"{redact(self.url)} holds no alignkit feedback tables ({str(exc).strip().splitlines()[0]}); "
                "give the --log-db that `alignkit serve` wrote"
            ) from exc
        if row is None or int(row[0]) > SCHEMA_VERSION:
            found = "no schema version" if row is None else f"schema version {row[0]}"
            raise UserError(
                f"{redact(self.url)} has {found}; this alignkit reads version {SCHEMA_VERSION}: "
                "upgrade alignkit (pip install -U alignkit) or use another database"
            )

    # -------------------------------------------------------------------------------------- the interface
    def log_completion(
        self,
        completion_id: str,
        model: str,
        prompt: list[dict] | str,
        answers: list[str],
        created: int,
        params: dict,
        first_index: int = 0,
    ) -> None:
        """Store one completion: its prompt (chat messages or text), one answer per choice, the sampling
        settings. Committed before it returns. A request with several prompts is stored as one completion per
        prompt, `{id}:{p}`, its answers numbered from `first_index` as the response numbers its choices."""
        if isinstance(prompt, str):
            kind = "text"
        elif isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
            kind = "chat"
        else:
            raise TypeError(
                f"prompt must be a string or a list of message dicts, got {type(prompt).__name__}"
            )
        if not all(isinstance(a, str) for a in answers):
            raise TypeError("answers must be strings, one per choice")
        row = (completion_id, model, kind, json.dumps(prompt, ensure_ascii=False), int(created))
        settings = json.dumps(params, ensure_ascii=False, sort_keys=True, default=str)

        def work() -> None:
            self._execute(
                "INSERT INTO completions (id, model, prompt_kind, prompt, created, params) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (*row, settings),
            )
            for i, answer in enumerate(answers):
                self._execute(
                    "INSERT INTO answers (completion_id, idx, content) VALUES (?, ?, ?)",
                    (completion_id, first_index + i, answer),
                )

        try:
            self._run(work)
        except self._backend.integrity as exc:
            raise ValueError(f"completion id {completion_id!r} is already stored") from exc

    def add_feedback(
        self, completion_id: str, label: str, comment: str | None = None, index: int = 0
    ) -> bool:
        """Record one vote on answer `index` of a completion; False when that answer is unknown. Every vote is
        kept with its time; the export reads the latest. Committed before it returns."""
        if label not in LABELS:
            raise ValueError(f"label must be 'up' or 'down', got {label!r}")

        # the id of a request with several prompts names them all: its answer `index` lives in `{id}:{p}`
        escaped = completion_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")

        def work() -> bool:
            known = self._execute(
                "SELECT completion_id FROM answers WHERE (completion_id = ? OR completion_id LIKE ? ESCAPE '\\') "
                "AND idx = ?",
                (completion_id, escaped + ":%", index),
            ).fetchone()
            if known is None:
                return False
            self._execute(
                "INSERT INTO feedback (completion_id, idx, label, comment, created) VALUES (?, ?, ?, ?, ?)",
                (known[0], index, label, comment, time.time()),
            )
            return True

        return self._run(work)

    def kto_rows(self, model: str | None = None) -> tuple[list[dict], dict[str, int]]:
        """KTO rows of the answers whose latest vote is up (label true) or down (false), oldest first, and
        counts {rows, up, down, no_feedback, empty}. Empty answers are left out: training refuses them."""
        where, args = ("AND c.model = ?", (model,)) if model is not None else ("", ())

        def work() -> tuple[list[tuple], int]:
            voted = self._execute(
                "SELECT c.prompt, a.content, f.label FROM feedback f "
                "JOIN answers a ON a.completion_id = f.completion_id AND a.idx = f.idx "
                "JOIN completions c ON c.id = f.completion_id "
                "WHERE f.id = (SELECT MAX(g.id) FROM feedback g "
                f"WHERE g.completion_id = f.completion_id AND g.idx = f.idx) {where} "
                "ORDER BY c.created, c.id, a.idx",
                args,
            ).fetchall()
            silent = self._execute(
                "SELECT COUNT(*) FROM answers a JOIN completions c ON c.id = a.completion_id "
                "WHERE NOT EXISTS (SELECT 1 FROM feedback f "
                f"WHERE f.completion_id = a.completion_id AND f.idx = a.idx) {where}",
                args,
            ).fetchone()[0]
            return voted, int(silent)

        voted, silent = self._run(work)
        rows = []
        for prompt_json, answer, label in voted:
            if answer.strip():
                rows.append(kto_row(json.loads(prompt_json), answer, LABELS[label]))
        up = sum(r["label"] for r in rows)
        counts = {"rows": len(rows), "up": up, "down": len(rows) - up, "no_feedback": silent}
        return rows, {**counts, "empty": len(voted) - len(rows)}

    def entries(
        self,
        model: str | None = None,
        label: str | None = None,
        text: str | None = None,
        since: float | None = None,
        limit: int = 200,
    ) -> list[dict[str, Any]]:
        """The stored answers, newest first, each with its latest vote (None: no vote): for browsing. Filters:
        the model id, the vote (`up`, `down`, `none`), text in the prompt or the answer, created at or after
        `since` (Unix seconds)."""
        where, args = ["1 = 1"], []
        if model:
            where.append("c.model = ?")
            args.append(model)
        if text:
            where.append("(LOWER(c.prompt) LIKE ? OR LOWER(a.content) LIKE ?)")  # any case, both back ends
            args += [f"%{text.lower()}%", f"%{text.lower()}%"]
        if since is not None:
            where.append("c.created >= ?")
            args.append(int(since))
        latest = (
            "(SELECT f.label FROM feedback f WHERE f.completion_id = a.completion_id AND f.idx = a.idx "
            "ORDER BY f.id DESC LIMIT 1)"
        )
        if label in LABELS:
            where.append(f"{latest} = ?")
            args.append(label)
        elif label == "none":
            where.append(f"{latest} IS NULL")
        query = (
            f"SELECT c.id, a.idx, c.model, c.prompt, a.content, c.created, {latest} FROM answers a "
            f"JOIN completions c ON c.id = a.completion_id WHERE {' AND '.join(where)} "
            "ORDER BY c.created DESC, c.id DESC, a.idx LIMIT ?"
        )
        rows = self._run(lambda: self._execute(query, (*args, int(limit))).fetchall())
        keys = ("id", "index", "model", "prompt", "answer", "created", "label")
        return [dict(zip(keys, (*r[:3], json.loads(r[3]), *r[4:]))) for r in rows]

    def models_with_feedback(self) -> list[str]:
        query = "SELECT DISTINCT c.model FROM completions c JOIN feedback f ON f.completion_id = c.id"
        return sorted(r[0] for r in self._run(lambda: self._execute(query).fetchall()))

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> FeedbackStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------ export
def _message(m: dict) -> dict[str, str]:
    """One stored chat message as {role, content}; OpenAI content parts keep their text."""
    content = m.get("content")
    if isinstance(content, list):
        content = "".join(
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return {"role": str(m.get("role", "user")), "content": "" if content is None else str(content)}


def kto_row(prompt: list[dict] | str, answer: str, label: bool) -> dict[str, Any]:
    """The row alignkit's `unpaired` format reads: conversational for chat prompts, standard for text."""
    if isinstance(prompt, str):
        return {"prompt": prompt, "completion": answer, "label": label}
    messages = [_message(m) for m in prompt]
    return {"prompt": messages, "completion": [{"role": "assistant", "content": answer}], "label": label}


def export_kto(db: str, output: str, model: str | None = None) -> dict[str, int]:
    """Write the KTO rows of every answer with feedback in `db` (only `model`'s when given) to `output`;
    return the counts {rows, up, down, no_feedback, empty}. No rows: a UserError, nothing written."""
    with FeedbackStore(db, create=False) as store:
        rows, counts = store.kto_rows(model)
        models = store.models_with_feedback() if not rows else []
    if not rows:
        if counts["empty"]:
            why = f"the {counts['empty']} answers with feedback are all empty"
        elif model is not None and models:
            why = f"no answer of model `{model}` has feedback (models with feedback: {', '.join(models)})"
        else:
            why = f"no answer has feedback yet ({counts['no_feedback']} answers stored)"
        raise UserError(
            f"{redact(db)}: {why}; nothing written to {output}. Votes arrive through POST /v1/feedback "
            '{"id": ..., "label": "up"|"down"} on `alignkit serve --log-db`'
        )
    write_jsonl_atomic(output, rows)
    return counts
