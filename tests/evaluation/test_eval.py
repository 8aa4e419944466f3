"""`alignkit eval`: each metric on tiny models against an independent computation, and its bad input."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from alignkit.config import build_dataclass
from alignkit.evaluation import metrics as M
from alignkit.evaluation.config import EvalConfig, validate
from alignkit.evaluation.run import run_eval
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


def test_kl_row_is_a_t_interval_over_prompts_clipped_at_zero() -> None:
    """KL is never negative: the t interval (n - 1 degrees of freedom, wider than a normal one at small n)
    that would reach below 0 stops at 0. Prompts are the units: k samples of one prompt are averaged first."""
    assert [round(M.t_quantile(df), 3) for df in (1, 2, 5, 30)] == [12.706, 4.303, 2.571, 2.042]
    row, per_prompt = M.kl_row([0.1, 0.3, 0.0, 0.2], [-0.5, 1.3, -0.2, 0.1])
    se = math.sqrt(sum((x - 0.15) ** 2 for x in (0.1, 0.3, 0.0, 0.2)) / 3 / 4)
    assert per_prompt == [0.1, 0.3, 0.0, 0.2] and row["value"] == pytest.approx(0.15)
    assert row["stderr"] == pytest.approx(se) and row["n"] == 4
    assert row["ci95"] == [0.0, pytest.approx(0.15 + 3.1824 * se, rel=1e-4)]  # normal: 0.15 - 1.96 se > 0
    assert row["k1"]["value"] == pytest.approx(0.175)
    row, per_prompt = M.kl_row(
        [0.1, 0.3, 0.0, 0.2], [0.0, 0.2, 0.0, 0.0], k=2, sampled=[-1.0] * 4, scored=[-1.2] * 4
    )
    assert per_prompt == pytest.approx([0.2, 0.1]) and (row["n"], row["samples"]) == (2, 4)
    assert row["k1"]["stderr"] == pytest.approx(
        math.sqrt(0.1**2 + 0.0) / 2
    )  # within prompts: prompt 2 has none
    assert row["sampling_gap"] == pytest.approx(0.2)


# ---------------------------------------------------------------------------------------- on tiny models
def test_eval_greedy_answers_and_accuracy_match_an_independent_run(tmp_path: Path, tiny_model: str) -> None:
    """The answers are the rollout engine's greedy ones; accuracy is math_accuracy over them, with n and CI."""
    from alignkit.generation.rewards import math_accuracy
    from alignkit.generation.rollout import complete

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
    """With one new token the sequence KL is sum_v p log(p/q) at the first position. The reported KL (the exact
    next-token KL summed along each sample) is then that number for every sample of a prompt; the k1 estimate
    (the sampled log-ratio, kept beside it) must lie within 4 of its standard errors of it."""
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
    from alignkit.generation.rollout import encode_prompts

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
    assert (kl["n"], kl["samples"]) == (2, 300)  # n counts prompts, the independent units
    assert kl["value"] == pytest.approx(sum(exact) / 2, rel=1e-6)
    assert kl["stderr"] == pytest.approx(abs(exact[0] - exact[1]) / 2, rel=1e-6)  # of the 2 per-prompt values
    assert 0 <= kl["ci95"][0] <= kl["value"] <= kl["ci95"][1]
    k1 = kl["k1"]
    assert k1["stderr"] > 0 and abs(k1["value"] - sum(exact) / 2) < 4 * k1["stderr"], (kl, exact)
    assert abs(kl["sampling_gap"]) < 1e-4  # float32: the sampler's log-probs are the scorer's
    assert sum(exact) / 2 > 1e-3  # the reference really differs


def test_kl_scores_the_answers_it_sampled_even_with_a_sampled_pad_token(tiny_model: str) -> None:
    """The tiny model's pad token (<|endoftext|>) is not its EOS and is sometimes sampled. Every KL answer must
    be scored as drawn: the log-prob the sampler recorded for it equals the scorer's (the rollout engine used to
    drop every pad token from answers without EOS; a dropped sampled token made the scored answer another one)."""
    from alignkit.data.formats import Example
    from alignkit.evaluation.answers import sample_for_kl
    from alignkit.evaluation.scoring import kl_per_sample

    model, tok = _load(tiny_model)
    assert tok.pad_token_id != tok.eos_token_id
    cfg = EvalConfig(num_samples=3000, max_new_tokens=6, batch_size=1000)
    torch.manual_seed(0)
    samples = sample_for_kl(model, tok, [Example(prompt=QUESTIONS[0]["question"])], cfg)
    kept = [c for c, cut in zip(samples.completion_ids, samples.truncated) if cut and tok.pad_token_id in c]
    assert len(kept) >= 2  # answers without EOS that drew the pad token keep it (the case is exercised)
    found = kl_per_sample(model, model, samples.prompt_ids, samples.completion_ids, tok.pad_token_id, 256)
    drawn = [sum(lp) for lp in samples.logprobs]
    assert max(abs(a - b) for a, b in zip(drawn, found.logp)) < 1e-3
    assert max(map(abs, found.exact)) < 1e-9 and max(map(abs, found.k1)) < 1e-9  # KL of a model to itself


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
    from alignkit.generation.rewards import RewardModelScorer

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
    from alignkit.generation.rollout import complete

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


def test_many_samples_are_drawn_in_batches_and_stay_grouped(tiny_model: str) -> None:
    from alignkit.generation.rollout import complete

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

    from tests.generation.test_vllm_backend import FakeLLM, FakeSamplingParams

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
