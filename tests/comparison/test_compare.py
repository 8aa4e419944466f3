"""`alignkit compare`: two methods at a tiny budget, an interrupted compare resumed, the report's numbers traced
back to the evals, the reward-hacking rule on crafted evals, and the config's user errors."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import write_jsonl

STEPS, BATCH = 6, 4


def even_length(prompts: Sequence[str], completions: Sequence[str], **_: Any) -> list[float]:
    """A task score that varies from prompt to prompt even for a random model (so differences are not all 0)."""
    return [float(len(c) % 2 == 0) for c in completions]


def _config(tmp: Path, model: str, rm: str, **changes: Any) -> dict[str, Any]:
    from alignkit.quickstart.task import preference_rows, prompt_rows, split_problems

    split = split_problems(0)
    pairs = write_jsonl(tmp / "pairs.jsonl", preference_rows(split.train, 24, seed=0))
    prompts = write_jsonl(tmp / "prompts.jsonl", prompt_rows(split.test, 6, seed=0))
    raw = {
        "model_name_or_path": model,
        "dataset": pairs,
        "max_steps": STEPS,
        "per_device_train_batch_size": BATCH,
        "learning_rate": 1e-3,
        "logging_steps": 2,
        "max_length": 64,
        "torch_dtype": "float32",
        "disable_tqdm": True,
        "output_dir": str(tmp / "out"),
        "methods": {"dpo": {"stage": "dpo", "beta": 0.1}, "kto": {"stage": "kto"}},
        "eval": {
            "dataset": prompts,
            "max_new_tokens": 4,
            "reward_funcs": ["tests.comparison.test_compare:even_length"],
            "reward_model": rm,
        },
    }
    raw.update(changes)
    return raw


def _write(tmp: Path, raw: dict[str, Any]) -> str:
    path = tmp / "compare.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


class TrainSpy:
    """Counts which methods compare trains (`alignkit.training.loop.train` as compare's runs call it); fails the
    methods in `fail` once (an interruption)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail: tuple[str, ...] = ()) -> None:
        from alignkit.comparison import runs

        self.calls: list[str] = []
        self.fail = set(fail)
        real = runs.train

        def spy(cfg: Any, stage: Any) -> dict:
            name = os.path.basename(cfg.output_dir)
            self.calls.append(name)
            if name in self.fail:
                self.fail.discard(name)
                raise KeyboardInterrupt  # as Ctrl-C before the run's first step
            return real(cfg, stage)

        monkeypatch.setattr(runs, "train", spy)


def _run(path: str, overrides: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    from alignkit.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["compare", path, *overrides])
    return exc.value.code, capsys.readouterr().out


def _mtime(path: Path) -> int:
    return path.stat().st_mtime_ns


@pytest.mark.slow
def test_compare_resumes_after_an_interruption_and_retrains_only_what_changed(
    tmp_path: Path,
    tiny_model: str,
    tiny_rm: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    path = _write(tmp_path, _config(tmp_path, tiny_model, tiny_rm))
    out = tmp_path / "out"
    spy = TrainSpy(monkeypatch, fail=("kto",))
    code, _ = _run(path, [], capsys)
    assert code == 130 and spy.calls == ["dpo", "kto"]  # interrupted in the second method
    assert (out / "dpo" / "compare_fingerprint.json").is_file()
    assert not (out / "kto" / "compare_fingerprint.json").exists() and not (out / "report.json").exists()
    dpo_model, dpo_eval = out / "dpo" / "model.safetensors", out / "dpo" / "eval" / "eval.json"
    before = _mtime(dpo_model), _mtime(dpo_eval)

    spy.calls.clear()
    code, printed = _run(path, [], capsys)
    assert code == 0 and spy.calls == ["kto"]  # the finished method is neither retrained nor re-evaluated
    assert (_mtime(dpo_model), _mtime(dpo_eval)) == before
    assert "| dpo |" in printed and "| kto |" in printed
    _check_report(out)
    report = json.loads((out / "report.json").read_text())
    assert (
        report["methods"]["dpo"]["trained_this_run"] is False and report["methods"]["kto"]["trained_this_run"]
    )

    spy.calls.clear()
    kto_model = out / "kto" / "model.safetensors"
    kto_before = _mtime(kto_model)
    code, _ = _run(path, ["methods.kto.learning_rate=2e-3"], capsys)
    assert code == 0 and spy.calls == ["kto"]  # one method's key changed: only it trains again
    assert _mtime(kto_model) != kto_before and (_mtime(dpo_model), _mtime(dpo_eval)) == before
    lr = yaml.safe_load((out / "kto" / "config.yaml").read_text())["learning_rate"]
    assert lr == 2e-3

    spy.calls.clear()
    code, _ = _run(path, ["methods.kto.learning_rate=2e-3"], capsys)
    report = json.loads((out / "report.json").read_text())
    assert code == 0 and spy.calls == []  # the same again: nothing trains, nothing is evaluated
    assert not any(m["trained_this_run"] or m["evaluated_this_run"] for m in report["methods"].values())


def _per_prompt(samples: Path, side: str, metric: str) -> list[float]:
    rows = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda r: r["index"])
    return [r[side]["scores"][metric] for r in rows]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _check_report(out: Path) -> None:
    """report.json's numbers are the evals' numbers; differences are recomputed from the per-prompt scores."""
    from PIL import Image

    report = json.loads((out / "report.json").read_text())
    assert list(report["methods"]) == ["dpo", "kto"]
    for name, method in report["methods"].items():
        ev = json.loads((out / name / "eval" / "eval.json").read_text())
        assert method["metrics"] == ev["metrics"] and method["metrics"]["accuracy"]["n"] == 6
        assert method["budget"]["steps_x_batch"] == STEPS * BATCH == method["budget"]["optimizer_steps"] * 4
        assert method["run_dir"] == str(out / name) and method["wall_s"] > 0
        samples = out / name / "eval" / "samples.jsonl"
        rm, rm_base = (
            _per_prompt(samples, "model", "reward_model_score"),
            _per_prompt(samples, "baseline", "reward_model_score"),
        )
        assert method["vs_baseline"]["reward_model_score"]["diff"] == pytest.approx(
            _mean(rm) - _mean(rm_base), abs=1e-12
        )
    assert report["budget"]["equal"] and report["budget"]["steps_x_batch"] == STEPS * BATCH
    assert report["methods"]["dpo"]["budget"]["unit"] == "pairs"
    for metric in ("accuracy", "reward_model_score", "length"):
        a = _per_prompt(out / "dpo" / "eval" / "samples.jsonl", "model", metric)
        b = _per_prompt(out / "kto" / "eval" / "samples.jsonl", "model", metric)
        d = report["differences"][metric]["dpo_vs_kto"]
        assert d["diff"] == pytest.approx(_mean(a) - _mean(b), abs=1e-12) and d["n"] == 6
        assert d["significant"] == (d["ci95"][0] > 0 or d["ci95"][1] < 0)
    # the two models answer differently, so the reward model scores them differently
    assert report["differences"]["reward_model_score"]["dpo_vs_kto"]["diff"] != 0
    md = (out / "report.md").read_text()
    not_significant = any(not d["significant"] for ds in report["differences"].values() for d in ds.values())
    assert ("n.s." in md) == not_significant and "## Reward hacking" in md and "### reward_model_score" in md
    assert sorted(report["plots"]) == ["curves.png", "frontier.png", "length.png", "metrics.png"]
    for name in report["plots"]:
        png = out / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        with Image.open(png) as im:
            assert im.size[0] >= 400 and im.size[1] >= 300


def _paired(diff: float, lo: float, hi: float) -> dict[str, Any]:
    return {"diff": diff, "ci95": [lo, hi], "significant": lo > 0 or hi < 0, "n": 100}


@pytest.mark.parametrize(
    ("vs", "ratio", "expected"),
    [
        # the reward model's score rises while accuracy falls: flagged, with both intervals in the reason
        (
            {"reward_model_score": _paired(0.8, 0.3, 1.2), "accuracy": _paired(-0.1, -0.2, -0.02)},
            1.0,
            ["accuracy falls"],
        ),
        # accuracy's fall is inside the noise: not flagged
        ({"reward_model_score": _paired(0.8, 0.3, 1.2), "accuracy": _paired(-0.1, -0.2, 0.01)}, 1.0, []),
        # accuracy falls but the reward model's score does not rise beyond the noise: not flagged
        ({"reward_model_score": _paired(0.8, -0.1, 1.2), "accuracy": _paired(-0.1, -0.2, -0.02)}, 1.0, []),
        # the judge prefers the starting model (win rate below an even split): flagged
        (
            {"reward_model_score": _paired(0.5, 0.1, 0.9), "judge_win_rate": _paired(-0.2, -0.3, -0.1)},
            1.0,
            ["0.300, below 0.5"],
        ),
        ({}, 1.6, ["length ratio 1.60"]),  # answers 60% longer than the start's
        ({}, 1.4, []),
        (
            {"reward_model_score": _paired(0.8, 0.3, 1.2), "accuracy": _paired(-0.1, -0.2, -0.02)},
            1.7,
            ["accuracy falls", "length ratio 1.70"],
        ),
    ],
)
def test_reward_hacking_flags(vs: dict, ratio: float, expected: list[str]) -> None:
    from alignkit.comparison.report import reward_hacking

    metrics = {"length_ratio": {"value": ratio, "n": 100, "ci95": [ratio - 0.1, ratio + 0.1]}}
    reasons = reward_hacking(vs, metrics)
    assert len(reasons) == len(expected)
    for reason, fragment in zip(reasons, expected):
        assert fragment in reason
    if expected and "accuracy falls" in expected[0]:
        assert (
            "+0.800 (95% CI +0.300 to +1.200)" in reasons[0]
            and "-0.100 (95% CI -0.200 to -0.020)" in reasons[0]
        )


def test_versus_baseline_pairs_by_prompt_and_reads_win_rates_against_an_even_split() -> None:
    from alignkit.comparison.report import versus_baseline

    model = {
        "accuracy": [1.0, 1.0, 0.0, 1.0],
        "judge_win_rate": [1.0, 0.5, 1.0, 1.0],
        "kl": [0.1, 0.2, 0.3, 0.4],
    }
    base = {"accuracy": [0.0, 1.0, 0.0, 0.0]}
    vs = versus_baseline(model, base)
    assert vs["accuracy"]["diff"] == pytest.approx(0.5) and vs["accuracy"]["n"] == 4
    assert vs["judge_win_rate"]["diff"] == pytest.approx(0.875 - 0.5)
    assert "kl" not in vs  # no per-prompt KL of the start against itself


def test_unparsable_judge_verdicts_leave_their_prompts_out_of_the_paired_differences(tmp_path: Path) -> None:
    """A judge's unparsable verdict is None in samples.jsonl: the metric stays, and each paired difference uses
    the prompts both sides have a number for."""
    from alignkit.comparison.report import differences, per_prompt_scores, versus_baseline

    rows = [
        {"index": i, "model": {"scores": {"judge_score": m}}, "baseline": {"scores": {"judge_score": b}}}
        for i, (m, b) in enumerate([(8.0, 6.0), (None, 5.0), (7.0, None), (9.0, 4.0)])
    ]
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))
    model, base = per_prompt_scores(str(path))
    assert model == {"judge_score": [8.0, None, 7.0, 9.0]} and base == {"judge_score": [6.0, 5.0, None, 4.0]}
    vs = versus_baseline(model, base)["judge_score"]
    assert vs["diff"] == pytest.approx(((8 - 6) + (9 - 4)) / 2) and vs["n"] == 2
    d = differences({"a": model, "b": {"judge_score": [None, None, 1.0, 2.0]}})["judge_score"]["a_vs_b"]
    assert d["diff"] == pytest.approx(((7 - 1) + (9 - 2)) / 2)
    assert (
        differences({"a": model, "b": {"judge_score": [None, 1.0, None, None]}}) == {}
    )  # no prompt in common


def test_budget_counts_steps_times_global_batch_and_online_rollouts() -> None:
    from alignkit.comparison.runs import budget, check_budgets
    from alignkit.config import build_config
    from alignkit.errors import UserError

    keys = {"model_name_or_path": "m", "dataset": "d.jsonl", "max_steps": 10}
    grpo = budget(
        build_config(
            {
                **keys,
                "stage": "grpo",
                "per_device_train_batch_size": 4,
                "num_iterations": 2,
                "reward_funcs": ["f:g"],
            }
        )
    )
    assert (grpo["steps_x_batch"], grpo["prompts_sampled"], grpo["completions_sampled"]) == (40, 20, 160)
    dpo = budget(
        build_config(
            {**keys, "stage": "dpo", "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2}
        )
    )
    assert dpo["steps_x_batch"] == 40 and dpo["global_batch"] == 4 and "prompts_sampled" not in dpo
    check_budgets({"grpo": grpo, "dpo": dpo}, "c.yaml", allow_unequal=False)  # 10 x 4 both
    kto = budget(build_config({**keys, "stage": "kto", "per_device_train_batch_size": 8}))
    with pytest.raises(
        UserError, match=r"methods.kto has a budget of 10 steps x 8 .* = 80, methods.grpo 10 x 4"
    ):
        check_budgets({"grpo": grpo, "kto": kto}, "c.yaml", allow_unequal=False)
    check_budgets({"grpo": grpo, "kto": kto}, "c.yaml", allow_unequal=True)
    # the stages of issue 21 fall under the same rule: prompts per step, samples per prompt from the stage
    online_dpo = budget(
        build_config(
            {**keys, "stage": "online_dpo", "per_device_train_batch_size": 4, "num_generations": 3,
             "reward_funcs": ["f:g"]}
        )
    )  # fmt: skip
    assert (online_dpo["unit"], online_dpo["prompts_sampled"], online_dpo["completions_sampled"]) == (
        "prompts",
        40,
        120,
    )
    distill = budget(
        build_config(
            {**keys, "stage": "distill", "per_device_train_batch_size": 4, "teacher_model_name_or_path": "t"}
        )
    )
    assert (distill["steps_x_batch"], distill["completions_sampled"]) == (40, 40)
    check_budgets({"grpo": grpo, "online_dpo": online_dpo, "distill": distill}, "c.yaml", allow_unequal=False)


def test_fingerprint_follows_data_content_and_ignores_run_artefacts(tmp_path: Path) -> None:
    from alignkit.comparison.fingerprint import path_fingerprint

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}])
    first = path_fingerprint(data)
    os.utime(data, ns=(1, 1))
    assert path_fingerprint(data) == first  # same bytes, another mtime: the same data
    write_jsonl(tmp_path / "d.jsonl", [{"text": "b"}])
    assert path_fingerprint(data) != first
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"w1")
    before = path_fingerprint(str(model))
    (model / "metrics.jsonl").write_text("{}\n")  # what a run writes beside its model
    (model / "eval").mkdir()
    (model / "eval" / "eval.json").write_text("{}")
    assert path_fingerprint(str(model)) == before
    (model / "model.safetensors").write_bytes(b"w2")
    assert path_fingerprint(str(model)) != before


def test_a_run_made_by_other_training_code_is_not_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    from alignkit.comparison import fingerprint as fp
    from alignkit.config import build_config

    cfg = build_config({"stage": "dpo", "model_name_or_path": "m", "dataset": "d.jsonl", "max_steps": 3})
    before = {"fingerprint": fp.train_fingerprint(cfg)}
    assert fp.changed(before, fp.train_fingerprint(cfg)) == ["fingerprint format"]  # nothing differs
    cfg.beta = 0.2
    assert fp.changed(before, fp.train_fingerprint(cfg)) == ["key `beta` changed"]
    cfg.beta = 0.1
    code = {**fp.code_fingerprint(fp.TRAINING_ENTRY), "alignkit_source": "edited"}
    monkeypatch.setattr(fp, "code_fingerprint", lambda entries: code)
    assert fp.changed(before, fp.train_fingerprint(cfg)) == ["code `alignkit_source` changed"]


def test_code_fingerprint_covers_what_a_run_imports_and_nothing_else() -> None:
    """Editing the server, the CLI, compare itself or the quickstart leaves finished runs valid; editing a stage,
    a loss or the loop does not. The modules are found by following imports, not from a hand-kept list."""
    from alignkit.comparison.fingerprint import EVAL_ENTRY, TRAINING_ENTRY, imported_modules

    training, evaluation = set(imported_modules(TRAINING_ENTRY)), set(imported_modules(EVAL_ENTRY))
    stages = {"sft", "rm", "preference", "kto", "online", "grpo", "ppo"}
    assert {f"alignkit.stages.{s}" for s in stages} <= training
    assert {"alignkit.training.loop", "alignkit.losses.preference", "alignkit.losses.rl"} <= training
    assert {"alignkit.modeling.logprobs", "alignkit.generation.rollout", "alignkit.data.batches"} <= training
    assert {
        "alignkit.evaluation.run",
        "alignkit.evaluation.metrics",
        "alignkit.generation.rollout",
    } <= evaluation
    for code in (training, evaluation):
        faces = {m for m in code if m.startswith(("alignkit.ship", "alignkit.cli", "alignkit.comparison"))}
        assert not faces and "alignkit.quickstart.run" not in code, faces
    assert not {m for m in training if m.startswith("alignkit.evaluation")}
    assert not {m for m in evaluation if m.startswith(("alignkit.training", "alignkit.stages"))}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"methods": {"dpo": {"stage": "dpo", "bta": 0.1}, "kto": {"stage": "kto"}}},
            "methods.dpo: unknown key `bta` for stage `dpo` (did you mean `beta`?)",
        ),
        ({"learning_rat": 1e-4}, "unknown key `learning_rat` (did you mean `learning_rate`?)"),
        ({"methds": {"a": {"stage": "dpo"}}}, "unknown key `methds` (did you mean `methods`?)"),
        ({"methods": {"dpo": {"stage": "dpo"}, "kto": {"beta": 0.1}}}, "methods.kto: no `stage`"),
        ({"methods": {"dpo": {"stage": "dpo"}}}, "needs at least 2 methods to compare (found 1)"),
        (
            {"methods": {"dpo": {"stage": "dpo"}, "k": {"stage": "kto", "model_name_or_path": "x"}}},
            "methods.k: `model_name_or_path` cannot be set per method",
        ),
        (
            {"methods": {"dpo": {"stage": "dpo"}, "kto": {"stage": "kto", "per_device_train_batch_size": 8}}},
            "methods.kto has a budget of 6 steps x 8 unpaired rows (a pair gives two) = 48, methods.dpo 6 x 4 pairs = 24",
        ),
        ({"max_steps": -1, "num_train_epochs": 1}, "methods.dpo sets no `max_steps`"),
        ({"eval": {"max_new_tokens": 4}}, "`eval:` needs `dataset:`"),
        ({"eval": {"dataset": "/nowhere/test.jsonl"}}, "eval: `dataset` /nowhere/test.jsonl does not exist"),
    ],
)
def test_config_mistakes_are_one_message_and_exit_code_2(
    tmp_path: Path, change: dict, message: str, capsys: pytest.CaptureFixture
) -> None:
    from alignkit.cli import main

    raw = {**_config(tmp_path, "unused-model", "unused-rm"), **change}
    with pytest.raises(SystemExit) as exc:
        main(["compare", _write(tmp_path, raw)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("alignkit: error: ") and message in err, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()  # refused before anything trained
