"""alignkit as a library: `import alignkit` trains, evaluates and exports with typed results; runs report their
events and stop cleanly from another thread; data and reward functions in memory work; two runs in one
process give two processes' numbers."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

import alignkit
from tests.conftest import REPO, write_jsonl


def _rows(n: int = 16) -> list[dict]:
    return [
        {
            "prompt": [{"role": "user", "content": f"What is {i} + {i + 3}?"}],
            "completion": [{"role": "assistant", "content": str(2 * i + 3) + " is the answer" * (i % 3)}],
        }
        for i in range(n)
    ]


def _sft(tiny_model: str, out: Path, **keys) -> dict:
    return {
        "stage": "sft",
        "model_name_or_path": tiny_model,
        "output_dir": str(out),
        "learning_rate": 1e-3,
        "per_device_train_batch_size": 4,
        "logging_steps": 1,
        "torch_dtype": "float32",
        "disable_tqdm": True,
        "plot_loss": False,
        **keys,
    }


def _losses(out: str | Path) -> list[float]:
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [json.loads(line)["loss"] for line in fh if line.strip()]


def test_train_evaluate_export_in_one_script(tiny_model: str, tmp_path: Path) -> None:
    """The notebook path: rows in memory -> a LoRA run -> its eval against the base -> the merged export."""
    run = alignkit.train(
        _sft(tiny_model, tmp_path / "sft", finetuning_type="lora", lora_target="q_proj,v_proj", max_steps=4),
        dataset=_rows(),
    )
    assert isinstance(run, alignkit.TrainResult) and not run.stopped
    assert (run.steps, run.total_steps, run.stage) == (4, 4, "sft")
    assert (
        run.model_dir == str(tmp_path / "sft") and (tmp_path / "sft" / "adapter_model.safetensors").is_file()
    )
    assert run.metrics["loss"] == pytest.approx(_losses(tmp_path / "sft")[-1]) and run.metrics["step"] == 4
    assert run.config["dataset"].endswith(".jsonl") and os.path.isfile(run.config["dataset"])

    prompts = [
        {"messages": [{"role": "user", "content": f"What is {i} + 1?"}], "answer": str(i + 1)}
        for i in range(4)
    ]
    report = alignkit.evaluate(
        model=run.output_dir,
        baseline=tiny_model,
        dataset=prompts,
        max_new_tokens=4,
        output_dir=str(tmp_path / "eval"),
    )
    assert report.n_prompts == 4 and report.metrics["accuracy"]["n"] == 4
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["metrics"] == report.metrics and saved["baseline_metrics"] == report.baseline_metrics
    assert "| accuracy |" in report.table

    exported = alignkit.export(adapter=run.output_dir, output=str(tmp_path / "merged"))
    assert (
        exported.max_logit_diff <= exported.tolerance
        and (tmp_path / "merged" / "model.safetensors").is_file()
    )


def test_a_run_reports_its_events_and_stops_on_request_then_resumes_exactly(
    tiny_model: str, tmp_path: Path
) -> None:
    """A stop set from another thread (here: from the callback, after step 3) ends the run at the next step
    boundary with a checkpoint; `resume_from_checkpoint: auto` finishes it with the uninterrupted run's losses."""
    data = write_jsonl(tmp_path / "d.jsonl", _rows(24))
    keys = {"dataset": data, "max_steps": 8, "lr_scheduler_type": "cosine", "warmup_steps": 2}
    full = alignkit.train(_sft(tiny_model, tmp_path / "full", **keys))
    stop = threading.Event()
    events: list[alignkit.TrainEvent] = []

    def on_event(event: alignkit.TrainEvent) -> None:
        events.append(event)
        if event.kind == "step" and event.step == 3:
            threading.Thread(target=stop.set).start()  # as a console's stop button would, then waits
            threading.Event().wait(0.2)

    part = alignkit.train(_sft(tiny_model, tmp_path / "part", **keys), callbacks=[on_event], stop=stop)
    assert part.stopped and part.model_dir is None and part.steps == 3
    assert part.checkpoint == str(tmp_path / "part" / "checkpoint-3")
    assert not (tmp_path / "part" / "model.safetensors").exists()
    kinds = [e.kind for e in events]
    assert kinds == ["start", *["step", "log"] * 3, "checkpoint", "stopped", "end"]
    assert events[0].data["total_steps"] == 8 and events[0].total_steps == 8
    assert [e.data["loss"] for e in events if e.kind == "log"] == _losses(tmp_path / "part")
    assert events[-3].data["path"] == part.checkpoint and events[-2].data["checkpoint"] == part.checkpoint
    assert events[-1].data["result"] is part and events[-1].data["stopped"] is True

    done = alignkit.train(_sft(tiny_model, tmp_path / "part", **keys), resume_from_checkpoint="auto")
    assert not done.stopped and done.steps == 8 and (tmp_path / "part" / "model.safetensors").is_file()
    assert _losses(tmp_path / "part") == pytest.approx(_losses(full.output_dir), abs=1e-6)


def test_rows_in_memory_train_as_their_file_does(tiny_model: str, tmp_path: Path) -> None:
    from datasets import Dataset

    data = write_jsonl(tmp_path / "d.jsonl", _rows(8))
    first = {}
    for name, dataset in (("file", data), ("list", _rows(8)), ("dataset", Dataset.from_list(_rows(8)))):
        first[name] = alignkit.train(_sft(tiny_model, tmp_path / name, max_steps=2), dataset=dataset).metrics
    assert first["list"]["loss"] == first["file"]["loss"] == first["dataset"]["loss"]
    assert first["list"]["grad_norm"] == first["dataset"]["grad_norm"]
    with pytest.raises(
        alignkit.UserError, match=r"`dataset`: give a file path, a datasets.Dataset or a list"
    ):
        alignkit.train(_sft(tiny_model, tmp_path / "bad", max_steps=1), dataset=42)


CALLS: list[dict] = []


def quarter(prompts: list[str], completions: list[str], answer: list[str], **_: object) -> list[float]:
    """A reward handed over as a Python function: 0.25 for every completion (and a record of its inputs)."""
    CALLS.append({"n": len(completions), "answers": list(answer)})
    return [0.25] * len(completions)


def test_reward_functions_in_memory(tiny_model: str, tmp_path: Path) -> None:
    rows = [{"prompt": f"{i} + 1 =", "answer": str(i + 1)} for i in range(4)]
    CALLS.clear()
    run = alignkit.train(
        {
            "stage": "grpo",
            "model_name_or_path": tiny_model,
            "output_dir": str(tmp_path / "grpo"),
            "per_device_train_batch_size": 2,
            "num_generations": 2,
            "max_new_tokens": 3,
            "max_steps": 1,
            "logging_steps": 1,
            "disable_tqdm": True,
            "plot_loss": False,
        },
        dataset=rows,
        reward_funcs=[quarter, "exact_match"],
    )
    assert run.config["reward_funcs"] == ["tests.test_api:quarter", "exact_match"]
    assert run.metrics["rewards/tests.test_api:quarter/mean"] == pytest.approx(0.25)
    assert CALLS and CALLS[0]["n"] == 4 and set(CALLS[0]["answers"]) <= {"1", "2", "3", "4"}
    with pytest.raises(alignkit.UserError, match=r"unknown key `reward_funcs` for stage `sft`"):
        alignkit.train(
            _sft(tiny_model, tmp_path / "x", max_steps=1), dataset=_rows(4), reward_funcs=[quarter]
        )


def test_mistakes_are_exceptions_with_the_clis_message(tmp_path: Path) -> None:
    with pytest.raises(
        alignkit.UserError, match=r"unknown key `learning_rat` for stage `sft` .*learning_rate"
    ):
        alignkit.train({"stage": "sft", "model_name_or_path": "m", "dataset": "d.jsonl"}, learning_rat=1e-4)
    with pytest.raises(alignkit.UserError, match=r"config file .*nope.yaml does not exist"):
        alignkit.train(str(tmp_path / "nope.yaml"))
    with pytest.raises(alignkit.UserError, match=r"give a config object, a YAML path or a mapping"):
        alignkit.train(3)  # type: ignore[arg-type]


def _subprocess_run(cfg: dict, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "alignkit", "train", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow
def test_two_runs_in_one_process_give_what_two_processes_give(tiny_model: str, tmp_path: Path) -> None:
    """No state leaks from one run into the next: a bf16 LoRA run with another seed first, then a float32 DPO
    run; the DPO run's every logged number equals the same run's in a fresh process."""
    sft_rows = write_jsonl(tmp_path / "sft.jsonl", _rows(8))
    pairs = [{"prompt": f"{i} + 1 =", "chosen": f" {i + 1}", "rejected": f" {i + 2}"} for i in range(8)]
    pair_data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    first = _sft(tiny_model, tmp_path / "a", dataset=sft_rows, max_steps=2, seed=7, bf16=True)
    first.update(torch_dtype="auto", finetuning_type="lora")
    second = {
        **_sft(tiny_model, tmp_path / "b", dataset=pair_data, max_steps=3),
        "stage": "dpo",
        "learning_rate": 1e-4,
    }
    handlers = len(logging.getLogger("alignkit").handlers)
    alignkit.train(first)
    alignkit.train(second)
    assert len(logging.getLogger("alignkit").handlers) == handlers
    _subprocess_run({**second, "output_dir": str(tmp_path / "c")}, tmp_path / "c.yaml")
    in_process = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    fresh = [json.loads(x) for x in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    drop = ("train_runtime", "train_tokens_per_second", "peak_memory_mb")
    assert [sorted(r) for r in in_process] == [sorted(r) for r in fresh] and len(fresh) == 3
    for a, b in zip(in_process, fresh):
        assert {k: v for k, v in a.items() if k not in drop} == pytest.approx(
            {k: v for k, v in b.items() if k not in drop}, rel=1e-9, abs=1e-12
        )


@pytest.mark.slow
def test_the_example_script_trains_evaluates_and_exports(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "python_api.py"), "--workdir", str(tmp_path / "work")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "work" / "summary.json").read_text())
    assert summary["dpo"]["steps"] == summary["dpo"]["total_steps"] > 0
    assert summary["eval"]["n"] == 40 and 0 <= summary["eval"]["accuracy"] <= 1
    assert summary["eval"]["baseline_accuracy"] is not None
    assert summary["export"]["max_logit_diff"] < 1e-3
    assert (tmp_path / "work" / "merged" / "model.safetensors").is_file()


def test_serve_runs_in_this_process_until_stopped(tiny_model: str, tmp_path: Path) -> None:
    import httpx

    from alignkit.generation.rollout import complete
    from alignkit.modeling.load import load_causal_lm

    question = [{"role": "user", "content": "What is 2 + 2?"}]
    with alignkit.serve(
        tiny_model, port=0, served_model_name="tiny", log_db=str(tmp_path / "fb.db")
    ) as server:
        assert server.ids == ["tiny"] and server.url.startswith("http://127.0.0.1:")
        body = {"model": "tiny", "messages": question, "max_tokens": 6, "temperature": 0}
        answer = httpx.post(f"{server.url}/chat/completions", json=body, timeout=60).json()
        assert httpx.get(server.url.removesuffix("/v1") + "/health", timeout=10).status_code == 200
    model, tokenizer = load_causal_lm(tiny_model)
    expected = complete(model, tokenizer, [question], max_new_tokens=6, temperature=0).texts[0]
    assert answer["choices"][0]["message"]["content"] == expected  # the rollout engine's greedy answer
    with pytest.raises(httpx.ConnectError):  # stopped: nothing listens any more
        httpx.get(server.url + "/models", timeout=5)
    rows = alignkit.from_feedback  # the store is the one the server wrote: no vote yet, so nothing to export
    with pytest.raises(alignkit.UserError, match=r"no answer has feedback yet \(1 answers stored\)"):
        rows(str(tmp_path / "fb.db"), str(tmp_path / "kto.jsonl"))
    with pytest.raises(alignkit.UserError, match=r"serve: unknown setting `prot` \(did you mean `port`\?\)"):
        alignkit.serve(tiny_model, prot=0)


def test_a_callback_that_fails_at_the_start_ends_the_trackers_run(
    tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The `start` event comes after the tracker opened its run: a callback raising there must still end it
    (MLflow's would stay active and refuse the next run in the process), and leave output_dir as it was."""
    mlflow = pytest.importorskip("mlflow", reason="pip install mlflow-skinny (in the dev extra)")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")

    def refuse(event: alignkit.TrainEvent) -> None:
        if event.kind == "start":
            raise KeyError("a callback's own mistake")

    keys = _sft(tiny_model, tmp_path / "a", max_steps=1, report_to="mlflow")
    with pytest.raises(KeyError, match="a callback's own mistake"):
        alignkit.train(keys, dataset=_rows(4), callbacks=[refuse])
    assert mlflow.active_run() is None and not (tmp_path / "a").exists()
    again = alignkit.train(keys, dataset=_rows(4))
    assert again.steps == 1


def test_keys_that_name_train_arguments_are_config_keys_and_paths_work(
    tiny_model: str, tmp_path: Path
) -> None:
    """`reward_funcs: exact_match` given as one name (as `key=value` on the command line gives it) is one reward,
    not one per letter; a pathlib.Path is a path; two reward functions with one name are refused."""
    from alignkit.cli import main

    rows = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": f"{i} + 1 =", "answer": str(i + 1)} for i in range(4)]
    )
    cfg = tmp_path / "grpo.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "stage": "grpo",
                "model_name_or_path": tiny_model,
                "dataset": rows,
                "per_device_train_batch_size": 2,
                "num_generations": 2,
                "max_new_tokens": 2,
                "max_steps": 1,
                "disable_tqdm": True,
                "plot_loss": False,
            }
        )
    )
    with pytest.raises(SystemExit) as done:
        main(["train", str(cfg), "reward_funcs=exact_match", f"output_dir={tmp_path / 'cli'}"])
    assert done.value.code == 0
    assert yaml.safe_load((tmp_path / "cli" / "config.yaml").read_text())["reward_funcs"] == ["exact_match"]
    run = alignkit.train(
        str(cfg), reward_funcs="exact_match", dataset=Path(rows), output_dir=str(tmp_path / "py")
    )
    assert run.config["reward_funcs"] == ["exact_match"] and run.config["dataset"] == rows
    with pytest.raises(alignkit.UserError, match=r"`<lambda>` has another reward function's name"):
        alignkit.train(
            str(cfg), reward_funcs=[lambda p, c, **k: [0.0] * len(c), lambda p, c, **k: [1.0] * len(c)]
        )


def test_an_online_stage_stops_at_the_end_of_its_rollouts_updates(tiny_model: str, tmp_path: Path) -> None:
    """GRPO with 2 updates per rollout, asked to stop after step 1: it finishes the rollout's second update and
    stops at step 2 (a checkpoint is written only where a rollout is done, so a resume starts a fresh one)."""
    stop = threading.Event()
    rows = [{"prompt": f"{i} + 1 =", "answer": str(i + 1)} for i in range(8)]
    run = alignkit.train(
        {
            "stage": "grpo",
            "model_name_or_path": tiny_model,
            "output_dir": str(tmp_path / "grpo"),
            "per_device_train_batch_size": 2,
            "num_generations": 2,
            "num_iterations": 2,
            "max_new_tokens": 2,
            "max_steps": 6,
            "disable_tqdm": True,
            "plot_loss": False,
        },
        dataset=rows,
        reward_funcs=["exact_match"],
        stop=stop,
        callbacks=[lambda e: stop.set() if e.kind == "step" and e.step == 1 else None],
    )
    assert run.stopped and run.steps == 2 and run.checkpoint == str(tmp_path / "grpo" / "checkpoint-2")


def test_inspect_takes_a_config_s_list_of_one_and_refuses_several(shared_data: Path) -> None:
    lf = str(shared_data / "llamafactory")
    assert alignkit.inspect(["kto_en_demo"], dataset_dir=lf)["rows"] == 300
    with pytest.raises(alignkit.UserError, match="one data set at a time"):
        alignkit.inspect(["kto_en_demo", "alpaca_en_demo"], dataset_dir=lf)
