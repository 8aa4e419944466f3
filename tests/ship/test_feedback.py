"""The feedback store behind `alignkit serve --log-db` and `alignkit data from-feedback`: round trips on SQLite
and PostgreSQL, rows that survive `kill -9`, and the exported KTO rows read, inspected and trained on."""

from __future__ import annotations

import glob
import json
import math
import os
import pwd
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from alignkit.errors import UserError
from alignkit.ship.serve.feedback import FeedbackStore, export_kto
from tests.conftest import REPO, run_stage

SYSTEM = {"role": "system", "content": "Answer briefly."}
# the user turn as OpenAI content parts: the export keeps their text
USER = {"role": "user", "content": [{"type": "text", "text": "What is 2 + 2?"}]}
CHAT_PARAMS = {"temperature": 0.7, "top_p": 0.9, "max_tokens": 16, "seed": 3}


def _round_trip(url: str, tmp_path: Path) -> None:
    """Log a chat and a text completion (n=2 each), vote on index 1 only, change a vote, export."""
    with FeedbackStore(url) as store:
        store.log_completion("chat-1", "dpo", [SYSTEM, USER], ["Four.", "Five."], 100, CHAT_PARAMS)
        store.log_completion("text-1", "sft", "2 + 2 =", [" 4", " 5"], 200, {"temperature": 0.0})
        assert store.add_feedback("chat-1", "up", index=1) is True
        assert store.add_feedback("chat-1", "down", comment="five is wrong", index=1) is True  # latest wins
        assert store.add_feedback("text-1", "up", comment="nice", index=1) is True
        assert store.add_feedback("nope", "up") is False
        assert store.add_feedback("chat-1", "up", index=2) is False  # only answers 0 and 1 exist
        with pytest.raises(ValueError, match="'up' or 'down'"):
            store.add_feedback("chat-1", "meh")
        with pytest.raises(ValueError, match="already stored"):
            store.log_completion("chat-1", "dpo", "again", ["x"], 300, {})
        query = "SELECT params FROM completions WHERE id = ?"
        params = store._run(lambda: store._execute(query, ("chat-1",)).fetchone()[0])
        votes = store._run(
            lambda: store._execute("SELECT idx, label, comment FROM feedback ORDER BY id").fetchall()
        )
    assert json.loads(params) == CHAT_PARAMS
    assert [tuple(v) for v in votes] == [(1, "up", None), (1, "down", "five is wrong"), (1, "up", "nice")]

    out = tmp_path / "kto.jsonl"
    counts = export_kto(url, str(out))
    assert counts == {"rows": 2, "up": 1, "down": 1, "no_feedback": 2, "empty": 0}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    user = {"role": "user", "content": "What is 2 + 2?"}
    assert rows == [
        {"prompt": [SYSTEM, user], "completion": [{"role": "assistant", "content": "Five."}], "label": False},
        {"prompt": "2 + 2 =", "completion": " 5", "label": True},
    ]
    only = tmp_path / "sft.jsonl"
    assert export_kto(url, str(only), model="sft") == {
        "rows": 1,
        "up": 1,
        "down": 0,
        "no_feedback": 1,
        "empty": 0,
    }
    assert [json.loads(line)["prompt"] for line in only.read_text().splitlines()] == ["2 + 2 ="]
    with pytest.raises(UserError, match=r"no answer of model `base` has feedback.*dpo, sft"):
        export_kto(url, str(tmp_path / "none.jsonl"), model="base")
    assert not (tmp_path / "none.jsonl").exists()


@pytest.mark.parametrize("form", ["path", "sqlite_url"])
def test_round_trip_sqlite(form: str, tmp_path: Path) -> None:
    db = tmp_path / "feedback.db"
    _round_trip(str(db) if form == "path" else f"sqlite:///{db}", tmp_path)
    with sqlite3.connect(db) as conn:  # the file itself, read without alignkit
        params = conn.execute("SELECT params FROM completions WHERE id = 'chat-1'").fetchone()[0]
        assert json.loads(params) == CHAT_PARAMS  # stored as JSON text
        assert conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone() == ("1",)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_rows_survive_kill_9(tmp_path: Path) -> None:
    db = tmp_path / "feedback.db"
    script = (
        "import sys, time\n"
        "from alignkit.ship.serve.feedback import FeedbackStore\n"
        "s = FeedbackStore(sys.argv[1])\n"
        "s.log_completion('c1', 'm', [{'role': 'user', 'content': 'hi'}], ['hello', 'hey'], 5, {'n': 2})\n"
        "s.add_feedback('c1', 'down', 'rude', index=1)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(db)], stdout=subprocess.PIPE, text=True, env=env, cwd=tmp_path
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT idx, content FROM answers ORDER BY idx").fetchall() == [
            (0, "hello"),
            (1, "hey"),
        ]
        assert conn.execute("SELECT completion_id, idx, label, comment FROM feedback").fetchall() == [
            ("c1", 1, "down", "rude")
        ]
    counts = export_kto(str(db), str(tmp_path / "kto.jsonl"))
    assert counts == {"rows": 1, "up": 0, "down": 1, "no_feedback": 1, "empty": 0}


def test_threads_share_one_store(tmp_path: Path) -> None:
    store = FeedbackStore(str(tmp_path / "f.db"))

    def serve(t: int) -> None:
        for i in range(20):
            store.log_completion(f"{t}-{i}", "m", f"prompt {t} {i}", [f"a{i}"], i, {})
            assert store.add_feedback(f"{t}-{i}", "up" if i % 2 else "down")

    threads = [threading.Thread(target=serve, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    rows, counts = store.kto_rows()
    store.close()
    assert counts == {"rows": 80, "up": 40, "down": 40, "no_feedback": 0, "empty": 0}
    assert len({r["prompt"] for r in rows}) == 80


def _votes(db: str, labels: list[bool], model: str = "m") -> str:
    """A store with one chat completion per label and that vote on its answer, plus one unvoted and one empty
    answer (both left out of the export)."""
    with FeedbackStore(db) as store:
        for i, good in enumerate(labels):
            prompt = [{"role": "user", "content": f"What is {i} + {i}?"}]
            store.log_completion(f"c{i}", model, prompt, [str(2 * i) if good else "no idea"], i, {})
            store.add_feedback(f"c{i}", "up" if good else "down")
        store.log_completion("silent", model, "x", ["y"], 99, {})
        store.log_completion("blank", model, "x", ["  "], 99, {})
        store.add_feedback("blank", "up")
    return db


def test_export_is_read_as_unpaired_and_inspected(tmp_path: Path) -> None:
    from alignkit.data.formats import load_examples
    from alignkit.data.report import inspect_data

    db = _votes(str(tmp_path / "f.db"), [True, True, False, True])
    out = str(tmp_path / "kto.jsonl")
    assert export_kto(db, out) == {"rows": 4, "up": 3, "down": 1, "no_feedback": 1, "empty": 1}
    examples = load_examples(out)
    assert [ex.kind for ex in examples] == ["unpaired"] * 4
    assert [ex.label for ex in examples] == [True, True, False, True]
    assert examples[2].prompt == [{"role": "user", "content": "What is 2 + 2?"}]
    assert examples[2].completion == [{"role": "assistant", "content": "no idea"}]
    report = inspect_data(out)
    assert report["format"] == "unpaired" and report["rows"] == 4
    k = report["kto"]  # n_D/n_U = 3 > 4/3: undesirable_weight = 3 / (1 * 4/3) = 2.25
    assert (k["desirable"], k["undesirable"], k["desirable_weight"], k["undesirable_weight"]) == (
        3,
        1,
        1.0,
        2.25,
    )


def test_kto_trains_on_exported_rows(tiny_model: str, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    db = _votes(str(tmp_path / "f.db"), [True, False, True, False])
    out = str(tmp_path / "kto.jsonl")
    export_kto(db, out)
    _, model_dir = run_stage(
        tmp_path,
        {
            "stage": "kto",
            "model_name_or_path": tiny_model,
            "dataset": out,
            "max_steps": 2,
            "logging_steps": 1,
            "per_device_train_batch_size": 2,
            "learning_rate": 1e-3,
            "max_length": 128,
            "torch_dtype": "float32",
        },
    )
    records = [json.loads(line) for line in open(Path(model_dir) / "metrics.jsonl")]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    before = load_file(str(Path(tiny_model) / "model.safetensors"))
    after = load_file(str(Path(model_dir) / "model.safetensors"))
    moved = [k for k in after if k in before and not before[k].float().equal(after[k].float())]
    assert len(moved) > len(after) // 2


def _cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    from alignkit.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(args)
    out, err = capsys.readouterr()
    return int(exit_.value.code), out, err


def test_from_feedback_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    db = _votes(str(tmp_path / "f.db"), [True, True, False, True])
    out = tmp_path / "data" / "kto.jsonl"  # the folder is made
    code, stdout, _ = _cli(["data", "from-feedback", db, "--output", str(out)], capsys)
    assert code == 0
    assert stdout.count("\n") == 1
    assert stdout.startswith(
        f"wrote 4 KTO rows to {out} (3 up, 1 down; 1 answers without feedback and 1 empty"
    )
    assert "recommended desirable_weight 1.0, undesirable_weight 2.25" in stdout
    assert stdout.rstrip().endswith(f"alignkit data inspect {out}")
    assert len(out.read_text().splitlines()) == 4
    assert os.listdir(out.parent) == ["kto.jsonl"]  # no temp file left beside it

    code, stdout, stderr = _cli(
        ["data", "from-feedback", str(tmp_path / "missing.db"), "--output", "x"], capsys
    )
    assert code == 2 and stdout == "" and "Traceback" not in stderr
    assert stderr.count("\n") == 1 and "missing.db: no such database file" in stderr

    FeedbackStore(str(tmp_path / "empty.db")).close()
    out.write_text("old rows\n")  # a failed export leaves an existing output as it was
    code, _, stderr = _cli(
        ["data", "from-feedback", str(tmp_path / "empty.db"), "--output", str(out)], capsys
    )
    assert code == 2 and "no answer has feedback yet" in stderr and "Traceback" not in stderr
    assert out.read_text() == "old rows\n"
    code, _, _ = _cli(
        ["data", "from-feedback", str(tmp_path / "empty.db"), "--output", str(tmp_path / "n")], capsys
    )
    assert code == 2 and not (tmp_path / "n").exists()


def test_bad_databases_are_user_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    junk = tmp_path / "notes.txt"
    junk.write_text("not a database\n" * 100)
    with pytest.raises(UserError, match=r"notes.txt is not a usable SQLite database"):
        FeedbackStore(str(junk))
    with pytest.raises(UserError, match=r"the folder .*nope does not exist; create it"):
        FeedbackStore(str(tmp_path / "nope" / "f.db"))
    with pytest.raises(UserError, match=r"is a folder"):
        FeedbackStore(str(tmp_path))
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE t (a)")
    with pytest.raises(UserError, match=r"other.db holds no alignkit feedback tables"):
        export_kto(str(other), str(tmp_path / "o.jsonl"))
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UserError, match=r"cannot connect to postgresql://me:\*\*\*@127.0.0.1") as err:
        FeedbackStore(f"postgresql://me:secret@127.0.0.1:{port}/feedback")
    assert "secret" not in str(err.value)
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if the `postgres` extra were not installed
    with pytest.raises(UserError, match=r"pip install 'alignkit\[postgres\]'"):
        FeedbackStore("postgresql://localhost/feedback")


# ------------------------------------------------------------------------------------------- PostgreSQL
def _pg_binary(name: str) -> str | None:
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL cluster (trust auth, fsync off) on a free port; as root it runs as `postgres`."""
    initdb, postgres = _pg_binary("initdb"), _pg_binary("postgres")
    if not (initdb and postgres):
        pytest.skip("PostgreSQL binaries (initdb, postgres) not found on PATH or in /usr/lib/postgresql")
    pytest.importorskip("psycopg", reason="psycopg (the `postgres` extra) is not installed")
    import psycopg

    as_user: dict = {}
    base = tempfile.mkdtemp(prefix="alignkit-pg-")  # not under pytest's root-only tmp folder
    if os.geteuid() == 0:  # postgres refuses to run as root
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(base)
            pytest.skip("running as root and there is no `postgres` user to run the server as")
        os.chown(base, user.pw_uid, user.pw_gid)
        as_user = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    data = os.path.join(base, "data")
    subprocess.run(
        [initdb, "-D", data, "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"],
        check=True,
        capture_output=True,
        cwd=base,
        **as_user,
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [postgres, "-D", data, "-p", str(port), "-k", base, "-h", "127.0.0.1", "-c", "fsync=off"]
    server = subprocess.Popen(args, cwd=base, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **as_user)
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    try:
        for _ in range(100):
            try:
                psycopg.connect(url, connect_timeout=2).close()
                break
            except psycopg.OperationalError:
                time.sleep(0.1)
        else:
            pytest.fail("the throwaway PostgreSQL server did not start within 10 s")
        yield url
    finally:
        server.send_signal(signal.SIGINT)  # fast shutdown
        server.wait(20)
        shutil.rmtree(base, ignore_errors=True)


def test_round_trip_postgres(postgres_url: str, tmp_path: Path) -> None:
    import psycopg

    _round_trip(postgres_url, tmp_path)
    with FeedbackStore(postgres_url) as store:  # the tables are there already: opened again, not re-made
        store.log_completion("chat-2", "dpo", [USER], ["4"], 300, {})
        with psycopg.connect(postgres_url, autocommit=True) as admin:  # the server drops the store's session
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'"
            )
        assert store.add_feedback("chat-2", "up") is True  # reconnected and retried
    counts = export_kto(postgres_url, str(tmp_path / "again.jsonl"))
    assert counts == {"rows": 3, "up": 2, "down": 1, "no_feedback": 2, "empty": 0}


def test_entries_list_answers_with_their_latest_vote_and_filter(tmp_path: Path) -> None:
    with FeedbackStore(str(tmp_path / "fb.db")) as store:
        store.log_completion("a", "m1", [{"role": "user", "content": "crepes?"}], ["flour and eggs"], 100, {})
        store.log_completion("b", "m2", "plain text prompt", ["one", "two"], 200, {}, first_index=0)
        store.add_feedback("a", "up")
        store.add_feedback("a", "down")  # the latest vote counts
        store.add_feedback("b", "up", index=1)
        every = store.entries()
        assert [(e["id"], e["index"], e["label"]) for e in every] == [
            ("b", 0, None),
            ("b", 1, "up"),
            ("a", 0, "down"),
        ]
        assert every[-1]["prompt"] == [{"role": "user", "content": "crepes?"}] and every[-1]["model"] == "m1"
        assert [e["id"] for e in store.entries(label="down")] == ["a"]
        assert [(e["id"], e["index"]) for e in store.entries(label="none")] == [("b", 0)]
        assert [e["answer"] for e in store.entries(model="m2")] == ["one", "two"]
        assert [e["id"] for e in store.entries(text="CREPES")] == ["a"]  # in the prompt, any case
        assert [e["answer"] for e in store.entries(text="two")] == ["two"]  # in the answer
        assert [e["id"] for e in store.entries(since=150)] == ["b", "b"]
        assert len(store.entries(limit=1)) == 1
