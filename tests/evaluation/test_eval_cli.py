"""`alignkit eval` from the command line: config files, bad input, inputs checked before any answer is
generated, metrics asked for by name, the LLM judge through eval, the report's order."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import pytest

from alignkit.cli import main
from tests.conftest import write_jsonl
from tests.evaluation.test_eval import QUESTIONS, _eval, _samples


@contextlib.contextmanager
def judge_server(respond):  # noqa: ANN001, ANN201 - a test helper
    """The judge tests' stub OpenAI-compatible server on 127.0.0.1, answering with `respond(body, n)`."""
    import threading
    from http.server import ThreadingHTTPServer

    from tests.generation.test_judge import Handler, Stub

    state = Stub()
    state.respond = respond
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.stub = state  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def _fails(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_bad_input_is_a_clear_error(tmp_path: Path, tiny_model: str, capsys: pytest.CaptureFixture) -> None:
    data = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "hi"}])
    out = ["--output-dir", str(tmp_path / "e")]
    err = _fails(capsys, ["eval", "--model", str(tmp_path / "nope"), "--dataset", data, *out])
    assert f"no model folder {tmp_path / 'nope'}" in err
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/gone/base"}))
    err = _fails(capsys, ["eval", "--model", str(adapter), "--dataset", data, *out])
    assert "/gone/base" in err and "base_model_name_or_path" in err
    err = _fails(capsys, ["eval", "--model", tiny_model, "--dataset", data, "metrics=[accuracy]", *out])
    assert "`accuracy` was asked for" in err and "answer" in err
    err = _fails(capsys, ["eval", "--model", tiny_model, "--dataset", data, "max_new_token=4", *out])
    assert "unknown key `max_new_token`" in err and "max_new_tokens" in err
    err = _fails(capsys, ["eval", "--model", tiny_model, "--dataset", data, "num_samples=4", *out])
    assert "temperature" in err
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    err = _fails(capsys, ["eval", "--model", tiny_model, "--dataset", str(latin), *out])
    assert "latin.jsonl line 1" in err and "UTF-8" in err
    assert not (tmp_path / "e" / "eval.json").exists()


def test_eval_config_file_and_overrides(
    tmp_path: Path, tiny_model: str, capsys: pytest.CaptureFixture
) -> None:
    data = write_jsonl(tmp_path / "q.jsonl", QUESTIONS[:2])
    config = tmp_path / "eval.yaml"
    config.write_text(
        f"model: {tiny_model}\ndataset: {data}\nmax_new_tokens: 3\noutput_dir: {tmp_path / 'o'}\n"
    )
    with pytest.raises(SystemExit) as info:
        main(["eval", str(config), "max_new_tokens=2", "metrics=[length,accuracy]"])
    assert info.value.code == 0
    report = json.loads((tmp_path / "o" / "eval.json").read_text())
    assert report["config"]["max_new_tokens"] == 2 and report["metrics"]["length"]["value"] <= 2
    assert set(report["metrics"]) == {"length", "accuracy"}
    assert "| accuracy |" in capsys.readouterr().out


def test_judge_through_eval_cancels_position_bias_and_resumes(
    tmp_path: Path, tiny_model: str, tiny_ref: str, capsys: pytest.CaptureFixture
) -> None:
    """A judge that always prefers the first answer and grades 6: the win rate comes out a 0.5 tie after the
    order swap; a rerun asks the judge nothing (cache); a dead endpoint is exit 2 naming the URL."""
    from tests.generation.test_judge import chat

    def prefer_first(body, n):
        return chat("[[A]]" if "[[A]]" in body["messages"][0]["content"] else "Rating: [[6]]")

    data = write_jsonl(tmp_path / "q.jsonl", QUESTIONS[:3])
    with judge_server(prefer_first) as state:
        url = state.url
        keys = dict(model=tiny_model, baseline=tiny_ref, dataset=data, judge_base_url=url, judge_model="stub")
        report = _eval(tmp_path, **keys, metrics=["judge_win_rate", "judge_score"])
        sent = len(state.requests)
        again = _eval(tmp_path, **keys, metrics=["judge_win_rate", "judge_score"])
        assert len(state.requests) == sent  # every verdict came from output_dir/judge_cache.sqlite
    win = report["metrics"]["judge_win_rate"]
    assert win["value"] == 0.5 and win["ties"] == 3 and win["n"] == 3
    assert report["metrics"]["judge_score"]["value"] == 6.0
    assert report["baseline_metrics"]["judge_score"]["value"] == 6.0
    assert again["metrics"]["judge_win_rate"] == win
    argv = ["eval", "--model", tiny_model, "--dataset", data, f"judge_base_url={url}", "judge_model=stub"]
    err = _fails(
        capsys, [*argv, "judge_max_retries=1", "metrics=[judge_score]", "--output-dir", str(tmp_path / "x")]
    )
    assert url in err  # the server is shut down: unreachable, named


def test_each_reward_model_metric_runs_on_its_own(tmp_path: Path, tiny_model: str, tiny_rm: str) -> None:
    pairs = [
        {"prompt": "Say yes:", "chosen": " yes", "rejected": " no"},
        {"prompt": "Hi", "chosen": " hi", "rejected": " x"},
    ]
    data = write_jsonl(tmp_path / "p.jsonl", pairs)
    report = _eval(
        tmp_path,
        model=tiny_model,
        dataset=data,
        reward_model=tiny_rm,
        metrics=["reward_model_preference_accuracy"],
    )
    assert (
        set(report["metrics"]) == {"reward_model_preference_accuracy"}
        and report["metrics"]["reward_model_preference_accuracy"]["n"] == 2
    )
    report = _eval(
        tmp_path, model=tiny_model, dataset=data, reward_model=tiny_rm, metrics=["reward_model_score"]
    )
    assert set(report["metrics"]) == {"reward_model_score"}


def test_reference_equal_to_the_model_and_nothing_to_measure(
    tmp_path: Path, tiny_model: str, capsys: pytest.CaptureFixture
) -> None:
    data = write_jsonl(tmp_path / "q.jsonl", QUESTIONS[:2])
    report = _eval(tmp_path, model=tiny_model, dataset=data, ref_model_name_or_path=tiny_model, metrics=None)
    assert "the reference is the model itself" in report["skipped"]["kl"]
    err = _fails(
        capsys,
        [
            "eval",
            "--model",
            tiny_model,
            "--dataset",
            data,
            f"ref_model_name_or_path={tiny_model}",
            "metrics=[kl]",
            "--output-dir",
            str(tmp_path / "x"),
        ],
    )
    assert "the reference is the model itself" in err
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "one two three"}, {"text": "four five"}])
    report = _eval(tmp_path, model=tiny_model, dataset=text)  # text rows: perplexity, nothing to answer
    assert set(report["metrics"]) == {"perplexity"} and report["metrics"]["perplexity"]["n"] == 2
    err = _fails(
        capsys,
        [
            "eval",
            "--model",
            tiny_model,
            "--dataset",
            text,
            "metrics=[length]",
            "--output-dir",
            str(tmp_path / "y"),
        ],
    )
    assert "`length` was asked for" in err


def test_inputs_are_checked_before_any_answer_is_generated(
    tmp_path: Path, tiny_model: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import alignkit.evaluation.run as run

    monkeypatch.setattr(run, "load_causal_lm", lambda *a, **k: pytest.fail("a model was loaded"))
    data = write_jsonl(tmp_path / "q.jsonl", QUESTIONS[:2])
    base = ["eval", "--model", tiny_model, "--dataset", data, "--output-dir", str(tmp_path / "x")]
    err = _fails(capsys, [*base, "judge_base_url=localhost:8000/v1", "judge_model=m"])
    assert "localhost:8000/v1" in err
    monkeypatch.delenv("MY_JUDGE_KEY", raising=False)
    err = _fails(
        capsys,
        [*base, "judge_base_url=http://127.0.0.1:9/v1", "judge_model=m", "judge_api_key_env=MY_JUDGE_KEY"],
    )
    assert "MY_JUDGE_KEY" in err
    err = _fails(capsys, [*base, f"reward_model={tmp_path / 'no_rm'}"])
    assert "`reward_model`" in err and "no_rm" in err
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    err = _fails(capsys, [*base, "lm_eval_tasks=[mmlu]"])
    assert 'pip install "alignkit[eval]"' in err
    bad = tmp_path / "adapter"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    monkeypatch.undo()
    err = _fails(
        capsys, ["eval", "--model", str(bad), "--dataset", data, "--output-dir", str(tmp_path / "x")]
    )
    assert "adapter_config.json" in err


def test_mt_bench_every_turn_is_graded(tmp_path: Path, tiny_model: str) -> None:
    """MT-Bench grades each turn with the conversation before it; a prompt's score is the mean of its turns."""
    from tests.generation.test_judge import chat

    def by_turn(body, n):
        return chat(
            "Rating: [[2]]" if "Now make it rhyme." in json.dumps(body["messages"]) else "Rating: [[8]]"
        )

    questions = [
        {"question_id": 81, "category": "writing", "turns": ["Write a haiku.", "Now make it rhyme."]},
        {"question_id": 82, "category": "math", "turns": ["What is 2+2?"]},
    ]
    with judge_server(by_turn) as state:
        data = write_jsonl(tmp_path / "mt.jsonl", questions)
        keys = dict(judge_base_url=state.url, judge_model="stub", metrics=["judge_score"])
        report = _eval(tmp_path, model=tiny_model, dataset=data, **keys)
    assert len(state.requests) == 3  # two turns of question 81, one of question 82
    assert report["metrics"]["judge_score"]["value"] == pytest.approx((8 + 2 + 8) / 3)
    by_id = {r["index"]: r["model"]["scores"]["judge_score"] for r in _samples(tmp_path)}
    assert by_id == {0: 5.0, 1: 8.0}


def test_samples_are_written_worst_first() -> None:
    from alignkit.data.formats import Example
    from alignkit.evaluation.report import sample_rows
    from alignkit.evaluation.run import Side

    examples = [Example(prompt=f"q{i}", where=f"line {i}") for i in range(4)]
    side = Side("model", "m", texts=[["a"]] * 4, conversations=[[{}, {}]] * 4)
    side.per_prompt = {"accuracy": [1.0, 0.0, 1.0, 0.0], "reward_model_score": [0.5, 2.0, -1.0, -3.0]}
    rows = sample_rows(examples, [side])
    # wrong answers first, the lowest reward-model score first among equals
    assert [r["index"] for r in rows] == [3, 1, 2, 0]
    assert rows[0]["model"]["scores"] == {"accuracy": 0.0, "reward_model_score": -3.0}


def test_a_failed_eval_leaves_no_new_empty_folder(
    tmp_path: Path, tiny_model: str, capsys: pytest.CaptureFixture
) -> None:
    """A model that cannot be loaded fails after output_dir was made: the folders the eval made are removed
    again, a folder that was there before stays, and so does anything in it."""
    data = write_jsonl(tmp_path / "q.jsonl", QUESTIONS[:2])
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    argv = ["eval", "--model", str(bad), "--dataset", data, "metrics=[length]", "--output-dir"]
    err = _fails(capsys, [*argv, str(tmp_path / "runs" / "new" / "eval")])
    assert "adapter_config.json" in err
    assert not (tmp_path / "runs").exists()  # runs/new/eval all made by the eval: all gone
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's")
    _fails(capsys, [*argv, str(mine / "eval")])
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails(capsys, [*argv, str(empty)])
    assert empty.is_dir()  # there before the eval: kept, even empty


def test_output_folder_keeps_what_was_written() -> None:
    """Only empty folders the eval made are removed: a folder it wrote into (the judge's verdict cache) stays."""
    import tempfile

    from alignkit.evaluation.run import output_folder

    with tempfile.TemporaryDirectory() as root:
        out = Path(root) / "a" / "b"
        with pytest.raises(RuntimeError), output_folder(str(out)):
            (out / "judge_cache.sqlite").write_text("verdicts")
            raise RuntimeError("the judge endpoint went away")
        assert (out / "judge_cache.sqlite").read_text() == "verdicts"
        with pytest.raises(KeyboardInterrupt), output_folder(str(Path(root) / "c" / "d")):
            raise KeyboardInterrupt
        assert sorted(p.name for p in Path(root).iterdir()) == ["a"]


@pytest.mark.slow
def test_a_judged_eval_logs_each_event_once_and_no_http_call(tmp_path: Path, tiny_model: str) -> None:
    """`alignkit eval` with a judge, as a user runs it: httpx's INFO line per request ("HTTP Request: POST ...")
    is not printed, and no line is printed twice."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO
    from tests.generation.test_judge import chat

    data = write_jsonl(tmp_path / "q.jsonl", QUESTIONS[:2])
    with judge_server(lambda body, n: chat("Rating: [[7]]")) as state:
        argv = ["eval", "--model", tiny_model, "--dataset", data, f"judge_base_url={state.url}"]
        argv += [
            "judge_model=stub",
            "metrics=[judge_score]",
            "max_new_tokens=4",
            "--output-dir",
            str(tmp_path / "e"),
        ]
        done = subprocess.run(
            [sys.executable, "-m", "alignkit", *argv],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert len(state.requests) == 2  # the judge was asked (one grade per answer)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert not [line for line in lines if "HTTP Request" in line], lines
    assert len(lines) == len(set(lines)), lines
    assert any(line.startswith("[alignkit] model: evaluated in") for line in lines), lines
