"""`alignkit eval`: each metric on tiny models against an independent computation, and its bad input."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

from alignkit.cli import main
from alignkit.config import build_dataclass
from alignkit.evaluate import metrics as M
from alignkit.evaluate.config import EvalConfig, validate
from alignkit.evaluate.run import run_eval
from tests.conftest import write_jsonl

QUESTIONS = [{"question": f"What is {i} + {i}?", "answer": f"#### {2 * i}"} for i in range(5)]


def _eval(tmp_path: Path, **keys) -> dict:
    keys = {"output_dir": str(tmp_path / "eval"), "max_new_tokens": 6, "batch_size": 8, **keys}
    cfg = build_dataclass(EvalConfig, keys, "test")
    validate(cfg, "test")
    return run_eval(cfg)


def _samples(tmp_path: Path) -> list[dict]:
    with open(tmp_path / "eval" / "samples.jsonl", encoding="utf-8") as fh:
        return sorted(map(json.loads, fh), key=lambda r: r["index"])


def _load(path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@contextlib.contextmanager
def judge_server(respond):  # noqa: ANN001, ANN201 - a test helper
    """The judge tests' stub OpenAI-compatible server on 127.0.0.1, answering with `respond(body, n)`."""
    import threading
    from http.server import ThreadingHTTPServer

    from tests.test_judge import Handler, Stub

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


# ------------------------------------------------------------------------------------------ pure metrics
def test_task_accuracy_pass_maj_and_consistency() -> None:
    scores = [[1, 0, 0], [0, 0, 0], [0, 1, 1]]
    texts = [["x = 4", "5", "5"], ["1", "2", "3"], ["7", "8", "the answer is 8"]]
    rows, per_prompt = M.task_accuracy(scores, texts)
    assert per_prompt == pytest.approx([1 / 3, 0, 2 / 3])
    assert rows["accuracy"]["value"] == pytest.approx(1 / 3)
    assert rows["pass@3"]["value"] == pytest.approx(2 / 3)  # prompts 0 and 2 have a right sample
    # majorities: "5" (wrong), a three-way tie -> the first sample "1" (wrong), "8" (right)
    assert rows["maj@3"]["value"] == pytest.approx(1 / 3)
    assert rows["consistency"]["value"] == pytest.approx((2 / 3 + 1 / 3 + 2 / 3) / 3)


def test_refusals_in_english_and_chinese_with_should_refuse() -> None:
    texts = [
        ["I'm sorry, but I can't help with that."],
        ["抱歉，我无法回答这个问题。"],
        ["Sure: 4."],
        ["As an AI, no."],
    ]
    rows, per_prompt = M.refusal_rates(texts, None, [True, True, False, False])
    assert per_prompt == [1.0, 1.0, 0.0, 1.0]
    assert rows["refusal_rate"]["value"] == 0.75
    assert rows["refusal_rate_should_refuse"]["value"] == 1.0 and rows["refusal_rate_should_refuse"]["n"] == 2
    assert rows["over_refusal_rate"]["value"] == 0.5
    custom, _ = M.refusal_rates([["Nope."], ["Fine."]], ["nope"], None)
    assert custom["refusal_rate"]["value"] == 0.5


def test_win_rate_counts_ties_as_half() -> None:
    row, per_item = M.win_rate([1.0, 2.0, 3.0, 0.0], [0.0, 2.0, 4.0, -1.0])
    assert per_item == [1.0, 0.5, 0.0, 1.0]
    assert (row["value"], row["wins"], row["ties"], row["losses"]) == (0.625, 2, 1, 1)


# ---------------------------------------------------------------------------------------- on tiny models
def test_eval_greedy_answers_and_accuracy_match_an_independent_run(tmp_path: Path, tiny_model: str) -> None:
    """The answers are the rollout engine's greedy ones; accuracy is math_accuracy over them, with n and CI."""
    from alignkit.rewards import math_accuracy
    from alignkit.rollout import complete

    data = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    report = _eval(tmp_path, model=tiny_model, dataset=data)
    model, tok = _load(tiny_model)
    prompts = [[{"role": "user", "content": q["question"]}] for q in QUESTIONS]
    samples = complete(model, tok, prompts, max_new_tokens=6)
    expected = samples.texts
    rows = _samples(tmp_path)
    assert [r["model"]["completions"][0] for r in rows] == expected
    right = math_accuracy([], expected, [q["answer"] for q in QUESTIONS])
    acc = report["metrics"]["accuracy"]
    assert acc["value"] == sum(right) / 5 and acc["n"] == 5
    assert acc["ci95"][0] <= acc["value"] <= acc["ci95"][1]
    lengths = [len(c) for c in samples.completion_ids]  # tokens sampled, EOS included
    assert report["metrics"]["length"]["value"] == pytest.approx(sum(lengths) / 5)
    assert "judge_score" in report["skipped"] and "reward_model_score" in report["skipped"]
    md = (tmp_path / "eval" / "eval.md").read_text()
    assert "| accuracy |" in md and "Not measured" in md


def test_kl_estimate_matches_the_exact_one_token_kl(tmp_path: Path, tiny_model: str, tiny_ref: str) -> None:
    """With one new token the sequence KL is sum_v p log(p/q) at the first position: the sampled estimate must
    lie within 4 standard errors of it (and the reported stderr must be the estimate's)."""
    data = write_jsonl(tmp_path / "q.jsonl", QUESTIONS[:2])
    report = _eval(
        tmp_path,
        model=tiny_model,
        dataset=data,
        ref_model_name_or_path=tiny_ref,
        max_new_tokens=1,
        num_samples=150,
        temperature=1.0,
        metrics=["kl"],
    )
    from alignkit.rollout import encode_prompts

    model, tok = _load(tiny_model)
    ref, _ = _load(tiny_ref)
    exact = []
    for ids in encode_prompts(tok, [[{"role": "user", "content": q["question"]}] for q in QUESTIONS[:2]]):
        x = torch.tensor([ids])
        with torch.no_grad():
            p = torch.log_softmax(model(x).logits[0, -1].double(), -1)
            q = torch.log_softmax(ref(x).logits[0, -1].double(), -1)
        exact.append((p.exp() * (p - q)).sum().item())
    kl = report["metrics"]["kl"]
    assert kl["n"] == 300 and kl["stderr"] > 0
    assert abs(kl["value"] - sum(exact) / 2) < 4 * kl["stderr"], (kl, exact)
    assert sum(exact) / 2 > 1e-3  # the reference really differs


def test_preference_accuracy_and_perplexity_equal_direct_forward_passes(
    tmp_path: Path, tiny_model: str, tiny_ref: str
) -> None:
    pairs = [
        {"prompt": f"Say {w}:", "chosen": f" {w} {w}", "rejected": f" {w} no"}
        for w in ("yes", "blue", "seven", "door")
    ]
    sft = [
        {"prompt": f"Count to {n}:", "completion": " " + " ".join(str(i) for i in range(1, n + 1))}
        for n in (2, 3, 4)
    ]
    report = _eval(
        tmp_path,
        model=tiny_model,
        dataset=write_jsonl(tmp_path / "p.jsonl", pairs),
        ref_model_name_or_path=tiny_ref,
        perplexity_dataset=write_jsonl(tmp_path / "s.jsonl", sft),
        metrics=["preference_accuracy", "perplexity"],
        beta=0.5,
    )
    model, tok = _load(tiny_model)
    ref, _ = _load(tiny_ref)

    eos = tok.eos_token

    def logp(m, prompt: str, completion: str) -> float:
        """log p(completion + EOS | prompt), tokenised as the trainers do (one string, EOS appended)."""
        p = tok(prompt).input_ids
        full = tok(prompt + completion + eos).input_ids
        assert full[: len(p)] == p
        with torch.no_grad():
            lp = torch.log_softmax(m(torch.tensor([full])).logits[0].double(), -1)
        return sum(lp[t - 1, full[t]].item() for t in range(len(p), len(full)))

    margins = [
        0.5
        * (
            (logp(model, r["prompt"], r["chosen"]) - logp(ref, r["prompt"], r["chosen"]))
            - (logp(model, r["prompt"], r["rejected"]) - logp(ref, r["prompt"], r["rejected"]))
        )
        for r in pairs
    ]
    pref = report["metrics"]["preference_accuracy"]
    assert pref["mean_margin"] == pytest.approx(sum(margins) / 4, rel=1e-4)
    assert pref["value"] == sum(m > 0 for m in margins) / 4 and pref["n"] == 4
    nll = -sum(logp(model, r["prompt"], r["completion"]) for r in sft)
    tokens = sum(
        len(tok(r["prompt"] + r["completion"] + eos).input_ids) - len(tok(r["prompt"]).input_ids) for r in sft
    )
    ppl = report["metrics"]["perplexity"]
    assert ppl["tokens"] == tokens and ppl["value"] == pytest.approx(math.exp(nll / tokens), rel=1e-4)
    assert set(report["skipped"]) >= {"accuracy", "kl", "judge_score"}


def test_reward_model_score_and_win_rate(
    tmp_path: Path, tiny_model: str, tiny_ref: str, tiny_rm: str
) -> None:
    from alignkit.rewards import RewardModelScorer

    data = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    report = _eval(tmp_path, model=tiny_model, baseline=tiny_ref, dataset=data, reward_model=tiny_rm)
    rows = _samples(tmp_path)
    prompts = [[{"role": "user", "content": q["question"]}] for q in QUESTIONS]
    scorer = RewardModelScorer(tiny_rm)
    mine = scorer(prompts, [r["model"]["completions"][0] for r in rows], torch.device("cpu")).tolist()
    theirs = scorer(prompts, [r["baseline"]["completions"][0] for r in rows], torch.device("cpu")).tolist()
    assert report["metrics"]["reward_model_score"]["value"] == pytest.approx(sum(mine) / 5, rel=1e-5)
    assert report["baseline_metrics"]["reward_model_score"]["value"] == pytest.approx(
        sum(theirs) / 5, rel=1e-5
    )
    wins = sum(a > b for a, b in zip(mine, theirs)) + 0.5 * sum(a == b for a, b in zip(mine, theirs))
    assert report["metrics"]["reward_model_win_rate"]["value"] == pytest.approx(wins / 5)
    assert "kl" in report["metrics"]  # the baseline is the KL reference by default


def test_mt_bench_questions_are_asked_turn_by_turn(tmp_path: Path, tiny_model: str) -> None:
    from alignkit.rollout import complete

    questions = [
        {"question_id": 81, "category": "writing", "turns": ["Write a haiku.", "Now make it rhyme."]},
        {"question_id": 82, "category": "math", "turns": ["What is 2+2?"]},
    ]
    _eval(tmp_path, model=tiny_model, dataset=write_jsonl(tmp_path / "mt.jsonl", questions))
    rows = _samples(tmp_path)
    conv = rows[0]["model"]["conversation"]
    assert [m["role"] for m in conv] == ["user", "assistant", "user", "assistant"]
    assert conv[2]["content"] == "Now make it rhyme."
    model, tok = _load(tiny_model)
    assert conv[3]["content"] == complete(model, tok, [conv[:3]], max_new_tokens=6).texts[0]
    assert "conversation" not in rows[1]["model"]  # one turn: the completion says it all


def test_lora_adapter_folder_is_evaluated_on_its_base(tmp_path: Path, tiny_model: str) -> None:
    from peft import LoraConfig, get_peft_model

    model, tok = _load(tiny_model)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    tok.save_pretrained(adapter)
    merged = tmp_path / "merged"
    peft_model.merge_and_unload().save_pretrained(merged)
    tok.save_pretrained(merged)
    data = write_jsonl(tmp_path / "q.jsonl", QUESTIONS[:3])
    a = _eval(tmp_path / "a", model=str(adapter), dataset=data, metrics=["length"])
    b = _eval(tmp_path / "b", model=str(merged), dataset=data, metrics=["length"])
    base = _eval(tmp_path / "c", model=tiny_model, dataset=data, metrics=["length"])
    answers = [[r["model"]["completions"] for r in _samples(tmp_path / d)] for d in ("a", "b", "c")]
    assert answers[0] == answers[1] != answers[2]
    assert a["metrics"]["length"] == b["metrics"]["length"] and base["n_prompts"] == 3


# ------------------------------------------------------------------------------------------- bad input
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
    assert "nope does not exist" in err
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
    shutil.rmtree(tmp_path / "o")
    del sys.modules["alignkit.evaluate.run"]  # the command imports lazily: a fresh import works too


def test_judge_through_eval_cancels_position_bias_and_resumes(
    tmp_path: Path, tiny_model: str, tiny_ref: str, capsys: pytest.CaptureFixture
) -> None:
    """A judge that always prefers the first answer and grades 6: the win rate comes out a 0.5 tie after the
    order swap; a rerun asks the judge nothing (cache); a dead endpoint is exit 2 naming the URL."""
    from tests.test_judge import chat

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


def test_samples_are_written_worst_first() -> None:
    from alignkit.data.formats import Example
    from alignkit.evaluate.report import sample_rows
    from alignkit.evaluate.run import Side

    examples = [Example(prompt=f"q{i}", where=f"line {i}") for i in range(4)]
    side = Side("model", "m", texts=[["a"]] * 4, conversations=[[{}, {}]] * 4)
    side.per_prompt = {"accuracy": [1.0, 0.0, 1.0, 0.0], "reward_model_score": [0.5, 2.0, -1.0, -3.0]}
    rows = sample_rows(examples, [side])
    # wrong answers first, the lowest reward-model score first among equals
    assert [r["index"] for r in rows] == [3, 1, 2, 0]
    assert rows[0]["model"]["scores"] == {"accuracy": 0.0, "reward_model_score": -3.0}


# --------------------------------------------------------------------------------- review findings
def test_non_binary_scores_are_averaged_not_counted() -> None:
    """A score of 0.3 or -0.5 is not "right": with one sample per prompt the mean is reported (a NaN, an
    unscorable answer, counts as 0); Wilson only for 0/1 scores."""
    rows, _ = M.task_accuracy([[-0.5], [0.0], [0.3], [float("nan")]], [["a"], ["b"], ["c"], ["d"]])
    assert rows["accuracy"]["value"] == pytest.approx(-0.05)
    rows, _ = M.task_accuracy([[1.0], [0.0]], [["a"], ["b"]])
    assert rows["accuracy"] == M.rate_with_ci([True, False])
    pref, per_pair = M.preference_row([0.0, 1.0])
    assert pref["value"] == 0.75 == sum(per_pair) / 2  # a tie is half, in the row and per pair


def test_refusal_n_counts_prompts_not_samples() -> None:
    rows, _ = M.refusal_rates([["I'm sorry", "ok", "ok"], ["ok", "ok", "ok"]], None, None)
    assert rows["refusal_rate"]["n"] == 2 and rows["refusal_rate"]["value"] == pytest.approx(1 / 6)


def _reward_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A user's reward (module:function) that is right on about half of random answers: whether the first
    character's code point is even."""
    (tmp_path / "my_reward.py").write_text(
        "def even_start(prompts, completions, **_):\n"
        "    return [float(bool(c) and ord(c[0]) % 2 == 0) for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_reward:even_start"


def test_pass_maj_and_consistency_end_to_end(
    tmp_path: Path, tiny_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    reward = _reward_module(tmp_path, monkeypatch)
    data = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    report = _eval(
        tmp_path,
        model=tiny_model,
        dataset=data,
        reward_funcs=[reward],
        num_samples=3,
        temperature=1.0,
        metrics=["accuracy"],
        max_new_tokens=3,
    )
    rows = _samples(tmp_path)
    scores = [[float(bool(c) and ord(c[0]) % 2 == 0) for c in r["model"]["completions"]] for r in rows]
    assert all(len(s) == 3 for s in scores) and 0 < sum(map(sum, scores)) < 15  # not all right, not all wrong
    got = report["metrics"]
    assert got["accuracy"]["value"] == pytest.approx(sum(map(sum, scores)) / 15) and got["accuracy"]["n"] == 5
    assert got["pass@3"]["value"] == sum(max(s) for s in scores) / 5
    expected_rows, _ = M.task_accuracy(scores, [r["model"]["completions"] for r in rows])
    assert got["maj@3"] == expected_rows["maj@3"] and got["consistency"] == expected_rows["consistency"]
    assert [r["model"]["scores"]["accuracy"] for r in _samples(tmp_path)] == [sum(s) / 3 for s in scores]


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
    import alignkit.evaluate.run as run

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


def test_many_samples_are_drawn_in_batches_and_stay_grouped(tiny_model: str) -> None:
    from alignkit.rollout import complete

    model, tok = _load(tiny_model)
    prompts = [[{"role": "user", "content": q["question"]}] for q in QUESTIONS[:2]]
    one = complete(model, tok, prompts, max_new_tokens=4)
    many = complete(model, tok, prompts, num_samples=5, max_new_tokens=4, temperature=1.0, batch_size=2)
    assert len(many.texts) == 10  # 5 > batch 2: drawn in rounds of 2, 2, 1 per prompt
    assert many.prompt_ids == [one.prompt_ids[0]] * 5 + [one.prompt_ids[1]] * 5  # grouped by prompt
    assert len(set(many.texts)) > 2  # sampled, not one answer repeated


def test_vllm_backend_samples_the_answers(
    tmp_path: Path, tiny_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`rollout_backend: vllm` hands the prompts to vLLM once, with the eval's sampling settings."""
    import types

    from tests.test_vllm_backend import FakeLLM, FakeSamplingParams

    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams, module.__version__ = FakeLLM, FakeSamplingParams, "0.11.0"
    monkeypatch.setitem(sys.modules, "vllm", module)
    FakeLLM.created.clear()
    data = write_jsonl(tmp_path / "q.jsonl", QUESTIONS[:2])
    report = _eval(
        tmp_path, model=tiny_model, dataset=data, rollout_backend="vllm", metrics=["length"], max_new_tokens=3
    )
    (llm,) = FakeLLM.created
    (params,) = llm.params
    assert llm.kwargs["model"] == tiny_model and (params.n, params.temperature, params.max_tokens) == (
        1,
        0.0,
        3,
    )
    assert report["metrics"]["length"]["value"] == 3.0  # the fake's [5, 6, 2] for every prompt


def test_mt_bench_every_turn_is_graded(tmp_path: Path, tiny_model: str) -> None:
    """MT-Bench grades each turn with the conversation before it; a prompt's score is the mean of its turns."""
    from tests.test_judge import chat

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


def test_sampled_eval_is_repeatable(tmp_path: Path, tiny_model: str, tiny_ref: str) -> None:
    """Answers at temperature 1 and the KL samples come from `seed`: the same config gives the same numbers."""
    data = write_jsonl(tmp_path / "q.jsonl", QUESTIONS[:3])
    keys = dict(
        model=tiny_model, dataset=data, ref_model_name_or_path=tiny_ref, num_samples=2, temperature=1.0
    )
    first = _eval(tmp_path / "a", **keys, metrics=["length", "kl"])
    second = _eval(tmp_path / "b", **keys, metrics=["length", "kl"])
    assert first["metrics"] == second["metrics"]
    assert _samples(tmp_path / "a") == _samples(tmp_path / "b")
    other = _eval(tmp_path / "c", **keys, metrics=["length", "kl"], seed=1)
    assert other["metrics"]["kl"]["value"] != first["metrics"]["kl"]["value"]
