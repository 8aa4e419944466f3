"""Online RL: advantage estimators and losses by hand, rewards (GSM8K's real answers), rollouts, GRPO / PPO runs."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from alignkit.errors import UserError
from alignkit.rewards import exact_match, math_accuracy
from alignkit.rl_losses import (
    clipped_surrogate,
    clipped_value_loss,
    dapo_overlong_penalty,
    gae,
    group_advantages,
    grpo_policy_loss,
    k3_kl,
    whiten,
)
from tests.conftest import first_step, run_stage, write_jsonl


# ----------------------------------------------------------------------------------- pure functions
def test_group_advantages_by_hand() -> None:
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # two groups of 4
    grpo = group_advantages(r, 4, "grpo")
    std = math.sqrt(((0.5**2) * 4) / 3)  # unbiased std of [1, 0, 0, 1]
    assert grpo[:4].tolist() == pytest.approx(
        [0.5 / (std + 1e-4), -0.5 / (std + 1e-4)] * 1 + [-0.5 / (std + 1e-4), 0.5 / (std + 1e-4)], rel=1e-5
    )
    assert grpo[4:].tolist() == [0.0] * 4  # a group with one reward teaches nothing
    assert group_advantages(r, 4, "dr_grpo")[:4].tolist() == [0.5, -0.5, -0.5, 0.5]
    # RLOO: r_i - mean of the other three
    assert group_advantages(r, 4, "rloo")[:4].tolist() == pytest.approx(
        [1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3]
    )


def test_clipped_surrogate_and_clip_higher() -> None:
    logp, old = torch.log(torch.tensor([1.5, 0.5, 1.1])), torch.zeros(3)  # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([1.0, -1.0, 1.0])
    loss, clipped = clipped_surrogate(logp, old, adv, 0.2, 0.2)
    assert loss.tolist() == pytest.approx([-1.2, 0.8, -1.1], rel=1e-6)  # min(r A, clip(r) A), negated
    assert clipped.tolist() == [True, True, False]
    loss_hi, clipped_hi = clipped_surrogate(logp, old, adv, 0.2, 0.6)  # DAPO clip-higher lets 1.5 through
    assert loss_hi[0].item() == pytest.approx(-1.5) and not clipped_hi[0]


def test_grpo_family_aggregations_by_hand() -> None:
    """Two completions of 2 and 3 tokens, token ratios [1.5, 0.9] and [1.0, 1.3, 0.7], advantages 1 and -2,
    clip range 0.2. Per-token clipped losses: [-1.2, -0.9] and [2.0, 2.6, 1.6] (the pessimistic term for A < 0)."""
    ratios = [1.5, 0.9, 1.0, 1.3, 0.7]
    logps = torch.log(torch.tensor(ratios))
    old = torch.zeros(5)
    rows = torch.tensor([0, 0, 1, 1, 1])
    adv = torch.tensor([1.0, -2.0])

    def loss(aggregation: str, **kw: object) -> tuple[float, list[bool]]:
        out, clipped, _ = grpo_policy_loss(logps, old, adv, rows, aggregation, 0.2, 0.2, 4, **kw)
        return out.item(), clipped.tolist()

    seq_mean, clipped = loss("seq_mean")  # GRPO: per-completion token mean, summed over completions
    assert seq_mean == pytest.approx((-1.2 - 0.9) / 2 + (2.0 + 2.6 + 1.6) / 3, rel=1e-6)
    assert clipped == [True, False, False, False, True]
    assert loss("max_len")[0] == pytest.approx((-2.1 + 6.2) / 4, rel=1e-6)  # Dr. GRPO: / max_new_tokens
    assert loss("token")[0] == pytest.approx(-2.1 + 6.2, rel=1e-6)  # DAPO: token sum (the loop divides)
    # GSPO: one ratio per completion, the geometric mean of its token ratios, clipped as a whole
    s0, s1 = math.sqrt(1.5 * 0.9), (1.0 * 1.3 * 0.7) ** (1 / 3)
    gspo, seq_clipped = loss("sequence")
    assert gspo == pytest.approx(-s0 * 1.0 + s1 * 2.0, rel=1e-6) and seq_clipped == [False, False]
    # RLOO: the whole completion's ratio, 1.35 (clipped to 1.2, A > 0) and 0.91; the KL is in the reward
    rloo, seq_clipped = loss("sequence_sum")
    assert rloo == pytest.approx(-1.2 * 1.0 + 0.91 * 2.0, rel=1e-6) and seq_clipped == [True, False]
    with pytest.raises(ValueError, match="KL penalty in the reward"):
        loss("sequence_sum", ref_logps=old, beta=0.1)
    # beta * k3 KL per token, added before aggregation; with ref = old, k3 = 1/r + log r - 1; by default
    # weighted by the (unclipped) ratio r (DeepSeek-V3.2's bias correction), else not
    k3 = [1 / r + math.log(r) - 1 for r in ratios]
    with_kl, _ = loss("token", ref_logps=old, beta=0.1)
    assert with_kl == pytest.approx(4.1 + 0.1 * sum(r * k for r, k in zip(ratios, k3)), rel=1e-6)
    plain_kl, _ = loss("token", ref_logps=old, beta=0.1, kl_bias_correction=False)
    assert plain_kl == pytest.approx(4.1 + 0.1 * sum(k3), rel=1e-6)
    # the gradient flows through the policy log-probs: d/dlogp of -r*A at an unclipped token is -r*A
    lp = logps.clone().requires_grad_(True)
    grpo_policy_loss(lp, old, adv, rows, "token", 0.2, 0.2, 4)[0].backward()
    assert lp.grad.tolist() == pytest.approx([0.0, -0.9, 2.0, 2.6, 0.0], abs=1e-6)


def test_clipped_value_loss_by_hand() -> None:
    values, old, ret = (
        torch.tensor([1.0, 0.5, 2.0]),
        torch.tensor([0.5, 0.5, 1.0]),
        torch.tensor([2.0, 0.0, 1.5]),
    )
    vf = clipped_value_loss(values, old, ret, 0.2)
    # clipped values 0.7, 0.5, 1.2; the larger of the two squared errors, halved
    assert vf.tolist() == pytest.approx([0.5 * 1.3**2, 0.5 * 0.5**2, 0.5 * 0.5**2], rel=1e-6)


def test_k3_kl_overlong_gae_whiten_by_hand() -> None:
    kl = k3_kl(torch.tensor([-1.0, -2.0]), torch.tensor([-1.0, -1.5]))
    assert kl.tolist() == pytest.approx([0.0, math.exp(0.5) - 0.5 - 1], rel=1e-6)
    pen = dapo_overlong_penalty(torch.tensor([10, 12, 14, 16]), max_new_tokens=16, buffer_len=4)
    assert pen.tolist() == pytest.approx([0.0, 0.0, -0.5, -1.0])
    # GAE with gamma=1, lam=1 gives returns-to-go minus the value; mask stops at each row's end
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 2.0, 0.0]])
    values = torch.tensor([[0.2, 0.4, 0.6], [0.1, 0.3, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert adv[0].tolist() == pytest.approx([1 - 0.2, 1 - 0.4, 1 - 0.6])
    assert adv[1].tolist() == pytest.approx([2.5 - 0.1, 2.0 - 0.3, 0.0])
    assert ret[1].tolist() == pytest.approx([2.5, 2.0, 0.0])
    adv2, _ = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    d2 = 1.0 - 0.6
    d1 = 0.0 + 0.9 * 0.6 - 0.4
    assert adv2[0, 1].item() == pytest.approx(d1 + 0.45 * d2)
    w = whiten(torch.tensor([1.0, 2.0, 3.0, 100.0]), torch.tensor([1.0, 1.0, 1.0, 0.0]))
    assert w[:3].mean().item() == pytest.approx(0.0, abs=1e-6) and w[3].item() == 0.0


# ------------------------------------------------------------------------------------------ rewards
def test_math_accuracy_on_real_gsm8k_answers(shared_data: Path) -> None:
    rows = [json.loads(line) for line in open(shared_data / "gsm8k" / "test.jsonl")][:40]
    finals = [r["answer"].split("####")[-1].strip().replace(",", "") for r in rows]
    right = [f"The answer is {f}." for f in finals]
    wrong = [f"The answer is {int(float(f)) + 1}." for f in finals]
    prompts = [r["question"] for r in rows]
    answers = [r["answer"] for r in rows]
    assert math_accuracy(prompts, right, answers) == [1.0] * 40
    assert math_accuracy(prompts, wrong, answers) == [0.0] * 40
    # equivalent forms agree
    assert math_accuracy(["q"] * 3, ["0.5", "\\frac{1}{2}", "1/2"], ["1/2"] * 3) == [1.0, 1.0, 1.0]


def test_exact_match() -> None:
    assert exact_match(
        ["q"] * 5, ["85", " 85.", "85.0", "1,234", "58"], ["85", "85", "85", "1234", "85"]
    ) == [1.0, 1.0, 1.0, 1.0, 0.0]


def test_user_reward_function_and_failures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from alignkit.rewards import build_reward_funcs, check_columns, score

    mod = tmp_path / "my_rewards.py"
    mod.write_text(
        "def brevity(prompts, completions, **kw):\n    return [-len(c) / 10 for c in completions]\n\n"
        "def needs_topic(prompts, completions, topic, **kw):\n    return [1.0 if topic[0] in c else 0.0 "
        "for c in completions]\n\n"
        "def broken(prompts, completions, **kw):\n    return [1 / (len(c) - 3) for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    funcs = build_reward_funcs(["my_rewards:brevity", "length"], "", 2)
    out = score(funcs, ["p", "p"], ["abcd", "a"], {}, ["row 1", "row 2"])
    assert out["my_rewards:brevity"].tolist() == pytest.approx([-0.4, -0.1])
    assert out["length"].tolist() == pytest.approx([-1.0, 0.0])
    with pytest.raises(UserError, match=r"reward function `my_rewards:needs_topic` needs the column `topic`"):
        check_columns(build_reward_funcs(["my_rewards:needs_topic"], "", 1), {"answer"}, "data.jsonl")
    with pytest.raises(
        UserError, match=r"`my_rewards:broken` raised ZeroDivisionError.*first failing row: row 2"
    ):
        score(
            build_reward_funcs(["my_rewards:broken"], "", 1),
            ["p", "p"],
            ["abcde", "abc"],
            {},
            ["row 1", "row 2"],
        )
    with pytest.raises(UserError, match=r"`exact_mtch` is not built in \(did you mean `exact_match`\?\)"):
        build_reward_funcs(["exact_mtch"], "", 1)


# ------------------------------------------------------------------------------------------ rollouts
def test_rollout_groups_truncation_and_eos(tiny_model: str) -> None:
    from transformers import AutoModelForCausalLM

    from alignkit.models import load_tokenizer
    from alignkit.rollout import sample_hf

    tok = load_tokenizer(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    from alignkit.data.batches import tokenize_chat

    prompts = [
        tokenize_chat(tok, [{"role": "user", "content": q}], add_generation_prompt=True)
        for q in ("hi", "2+2?")
    ]
    torch.manual_seed(0)
    s = sample_hf(model, tok, prompts, num_generations=3, max_new_tokens=4, temperature=1.0)
    assert len(s.completion_ids) == 6 and s.prompt_ids[0] == s.prompt_ids[2] != s.prompt_ids[3]
    for ids, trunc in zip(s.completion_ids, s.truncated):
        assert len(ids) <= 4
        assert trunc == (tok.eos_token_id not in ids)  # a random model rarely stops: truncation is flagged
    assert any(s.truncated)


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.7, 0), (0.7, 5)])
def test_rollout_returns_the_sampling_log_probs(tiny_model: str, temperature: float, top_k: int) -> None:
    """Each sampled token's log-prob under the distribution it was drawn from: the forward pass's log-softmax of
    logits / temperature, renormalised over the top-k when top_k is set."""
    from transformers import AutoModelForCausalLM

    from alignkit.data.batches import tokenize_chat
    from alignkit.models import load_tokenizer
    from alignkit.rollout import sample_hf, sequences

    tok = load_tokenizer(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.generation_config.repetition_penalty = 3.0  # a model's own sampling settings must not leak in
    prompts = [
        tokenize_chat(tok, [{"role": "user", "content": q}], add_generation_prompt=True)
        for q in ("hi", "2+2?")
    ]
    torch.manual_seed(0)
    s = sample_hf(model, tok, prompts, 3, max_new_tokens=5, temperature=temperature, top_k=top_k)
    assert [len(lp) for lp in s.logprobs] == [len(c) for c in s.completion_ids]
    batch = sequences(s.prompt_ids, s.completion_ids, tok.pad_token_id)
    with torch.no_grad():
        logits = (
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits / temperature
        )
    if top_k:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    logp = torch.log_softmax(logits, dim=-1)
    for i, (p, c) in enumerate(zip(s.prompt_ids, s.completion_ids)):
        expected = [logp[i, len(p) - 1 + t, tok_id].item() for t, tok_id in enumerate(c)]
        assert s.logprobs[i] == pytest.approx(expected, abs=1e-4)


def test_dapo_dynamic_sampling_replaces_groups_with_one_reward(
    tiny_model: str, tmp_path: Path, monkeypatch
) -> None:  # noqa: ANN001
    """A prompt whose completions all get the same reward teaches nothing: dynamic sampling drops its group and
    refills the batch with informative groups of other prompts."""
    from alignkit.config import build_config
    from alignkit.stages import get_stage

    (tmp_path / "flat_rewards.py").write_text(
        "def flat_for_12(prompts, completions, **kw):\n"
        "    return [1.0 if '12 + 7' in p else float(len(c)) for p, c in zip(prompts, completions)]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = build_config(
        {
            "stage": "grpo",
            "model_name_or_path": tiny_model,
            "dataset": write_jsonl(tmp_path / "p.jsonl", PROMPTS),
            "output_dir": str(tmp_path / "out"),
            "loss_type": "dapo",
            "reward_funcs": ["flat_rewards:flat_for_12"],
            "num_generations": 4,
            "max_new_tokens": 6,
            "temperature": 1.5,
            "torch_dtype": "float32",
        }
    )
    stage = get_stage("grpo")(cfg)
    stage.build()
    assert stage.dynamic_sampling  # on by default for dapo
    torch.manual_seed(0)
    rows = stage.train_rows[:3]  # the first is "What is 12 + 7?"
    buffer = stage.rollout(stage.model, rows, torch.device("cpu"))
    assert stage.frac_zero_std >= 1 / 3  # the 12 + 7 group, at least, was flat
    assert len(buffer) == 3 * 4
    twelve = rows[0]["prompt_ids"]
    assert all(s["prompt_ids"] != twelve for s in buffer)
    for g in range(3):
        group = buffer[g * 4 : (g + 1) * 4]
        assert len({s["reward"] for s in group}) > 1
    # frac_reward_zero_std reports the batch as sampled, before the refill (as TRL)
    batch = stage.collate(buffer)
    logged = stage.step(stage.model, batch).metrics["frac_reward_zero_std"]
    assert float(logged[0] / logged[1]) == pytest.approx(stage.frac_zero_std) and stage.frac_zero_std > 0


def test_vllm_backend_absent_is_a_clear_error(tiny_model: str, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    if "vllm" in sys.modules or __import__("importlib").util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q", "answer": "1"}] * 4)
    with pytest.raises(UserError, match="rollout_backend: vllm needs vLLM"):
        run_stage(
            tmp_path,
            {
                "stage": "grpo",
                "model_name_or_path": tiny_model,
                "dataset": data,
                "reward_funcs": ["exact_match"],
                "rollout_backend": "vllm",
                "max_steps": 1,
            },
        )


# ------------------------------------------------------------------------------------------ stages
PROMPTS = [
    {"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "answer": str(a + b)}
    for a, b in [(12, 7), (30, 41), (5, 5), (66, 21), (13, 13), (40, 2), (9, 90), (11, 22)]
]


@pytest.mark.parametrize(
    "loss_type,extra",
    [
        ("grpo", {}),
        ("dr_grpo", {}),
        ("dapo", {"epsilon_high": 0.28, "overlong_buffer_len": 2}),
        ("gspo", {"num_iterations": 2}),
        ("rloo", {"beta": 0.05}),
    ],
)
def test_grpo_family_trains_and_logs(loss_type: str, extra: dict, tiny_model: str, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    keys = {
        "stage": "grpo",
        "model_name_or_path": tiny_model,
        "dataset": data,
        "loss_type": loss_type,
        "reward_funcs": ["exact_match", "length"],
        "reward_weights": [1.0, 0.1],
        "length_target": 2,
        "num_generations": 4,
        "per_device_train_batch_size": 2,
        "max_new_tokens": 4,
        "max_steps": 2,
        "logging_steps": 1,
        "learning_rate": 1e-3,
        "torch_dtype": "float32",
        **extra,
    }
    record, out = run_stage(tmp_path, keys)
    records = [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]
    assert len(records) == 2
    for key in (
        "reward/mean",
        "reward/std",
        "rewards/exact_match/mean",
        "rewards/length/mean",
        "frac_reward_zero_std",
        "clip_ratio",
        "entropy",
        "completion_length",
        "truncated_fraction",
    ):
        assert key in record, key
    assert record["rewards/length/mean"] <= 0.0 and 0 < record["completion_length"] <= 4
    assert ("kl" in record) == ("beta" in extra)
    if loss_type == "dapo":
        assert "rewards/overlong/mean" in record
    if loss_type == "gspo":  # the second update of a rollout reuses it with importance ratios
        assert records[1]["step"] == 2


# each loss type's aggregation, written out here (not read from GRPO_RECIPES) so a wrong registry entry fails
AGGREGATIONS = {
    "grpo": "seq_mean",
    "dr_grpo": "max_len",
    "dapo": "token",
    "gspo": "sequence",
    "rloo": "sequence_sum",
}


@pytest.mark.parametrize("loss_type", list(AGGREGATIONS))
def test_grpo_family_loss_on_a_fixed_rollout_is_the_pure_functions(
    loss_type: str, tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fixed rollout (2 prompts x 2 completions of 1-4 tokens, advantages, sampling-time and reference
    log-probs): the loss the loop logs is `grpo_policy_loss` (checked by hand above) of this type's aggregation
    on the policy's log-probs, computed here by a plain forward pass at the sampling temperature, divided by the
    completions (tokens, for DAPO); and it is no other type's value."""
    from transformers import AutoModelForCausalLM

    from alignkit.data.batches import tokenize_chat
    from alignkit.models import load_tokenizer
    from alignkit.stages.grpo import GRPOStage

    tok, model = load_tokenizer(tiny_model), AutoModelForCausalLM.from_pretrained(tiny_model)
    prompts = [tokenize_chat(tok, r["prompt"], add_generation_prompt=True) for r in PROMPTS[:2]]
    prompt_ids = [prompts[0], prompts[0], prompts[1], prompts[1]]
    completions = [[11, 12], [13, 14, 15], [16], [17, 18, 19, 20]]
    logps = []  # (10,) the policy's log-prob of each completion token at temperature 0.7, row by row
    with torch.no_grad():
        for p, c in zip(prompt_ids, completions):
            logits = model(input_ids=torch.tensor([p + c])).logits[0] / 0.7
            logps += [torch.log_softmax(logits[len(p) - 1 + t], -1)[c_t] for t, c_t in enumerate(c)]
    logps = torch.stack(logps)
    rows = torch.tensor([i for i, c in enumerate(completions) for _ in c])
    old = logps - torch.log(torch.tensor([1.5, 0.9, 1.0, 1.3, 0.7, 1.1, 0.85, 1.25, 0.95, 1.05]))  # ratios
    ref = logps + torch.tensor([0.3, -0.2, 0.1, 0.0, -0.4, 0.25, 0.05, -0.1, 0.2, -0.3])
    adv = torch.tensor([1.0, -2.0, 0.5, -0.5])
    beta = 0.0 if loss_type == "rloo" else 0.1  # RLOO's KL goes into the reward, before the advantages
    buffer = [
        {
            "prompt_ids": p,
            "completion_ids": c,
            "advantage": float(adv[i]),
            "old_logps": old[rows == i].tolist(),
            **({"ref_logps": ref[rows == i].tolist()} if beta else {}),
            "reward": 0.0,
            "truncated": False,
            "zero_std": 0.0,
        }
        for i, (p, c) in enumerate(zip(prompt_ids, completions))
    ]
    monkeypatch.setattr(GRPOStage, "rollout", lambda self, model, rows, device: [dict(s) for s in buffer])
    record, _ = run_stage(
        tmp_path,
        {
            "stage": "grpo",
            "model_name_or_path": tiny_model,
            "dataset": write_jsonl(tmp_path / "p.jsonl", PROMPTS),
            "loss_type": loss_type,
            "reward_funcs": ["exact_match"],
            "num_generations": 2,
            "per_device_train_batch_size": 2,
            "max_new_tokens": 4,
            "temperature": 0.7,
            "beta": beta,
            "epsilon_high": 0.28,  # clip-higher, as DAPO (the 1.25 ratio is inside it, 1.3 outside)
            "max_steps": 1,
            "logging_steps": 1,
            "torch_dtype": "float32",
        },
    )

    def expected(aggregation: str) -> float:
        kl_ref = ref if beta and aggregation != "sequence_sum" else None
        loss, _, _ = grpo_policy_loss(logps, old, adv, rows, aggregation, 0.2, 0.28, 4, kl_ref, beta)
        return loss.item() / (10 if aggregation == "token" else 4)

    assert record["loss"] == pytest.approx(expected(AGGREGATIONS[loss_type]), rel=1e-5, abs=1e-6)
    for other in AGGREGATIONS.values():
        if other != AGGREGATIONS[loss_type]:
            assert abs(record["loss"] - expected(other)) > 1e-3, other
    if beta:
        assert record["kl"] == pytest.approx(k3_kl(logps, ref).mean().item(), rel=1e-5)


def test_grpo_learns_a_verifiable_reward(tiny_model: str, tmp_path: Path) -> None:
    """A reward for completions that stop at once: GRPO raises it within a few steps."""
    mod = tmp_path / "stop_reward.py"
    mod.write_text(
        "def short(prompts, completions, **kw):\n    return [1.0 if len(c) <= 1 else 0.0 for c in completions]\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        data = write_jsonl(tmp_path / "p.jsonl", PROMPTS * 4)
        keys = {
            "stage": "grpo",
            "model_name_or_path": tiny_model,
            "dataset": data,
            "reward_funcs": ["stop_reward:short"],
            "num_generations": 8,
            "per_device_train_batch_size": 4,
            "max_new_tokens": 3,
            "max_steps": 12,
            "logging_steps": 1,
            "learning_rate": 3e-3,
            "torch_dtype": "float32",
            "temperature": 1.0,
        }
        _, out = run_stage(tmp_path, keys)
    finally:
        sys.path.remove(str(tmp_path))
    records = [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]
    first = sum(r["reward/mean"] for r in records[:3]) / 3
    last = sum(r["reward/mean"] for r in records[-3:]) / 3
    assert last > first + 0.2, (first, last)


def test_grpo_bad_inputs(tiny_model: str, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q"}])
    base = {"stage": "grpo", "model_name_or_path": tiny_model, "dataset": data, "max_steps": 1}
    with pytest.raises(UserError, match="`num_generations` must be >= 2"):
        run_stage(tmp_path / "a", {**base, "reward_funcs": ["exact_match"], "num_generations": 1})
    with pytest.raises(UserError, match="reward function `exact_match` needs the column `answer`"):
        run_stage(tmp_path / "b", {**base, "reward_funcs": ["exact_match"]})
    with pytest.raises(UserError, match="give `reward_funcs`"):
        run_stage(tmp_path / "c", base)
    empty = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "Q"}, {"prompt": ""}])
    with pytest.raises(UserError, match=r"e.jsonl line 2: the prompt is empty"):
        run_stage(tmp_path / "d", {**base, "dataset": empty, "reward_funcs": ["length"]})


@pytest.mark.parametrize(
    "stage,keys,message",
    [
        ("ppo", {"reward_weights": [1.0, 2.0, 3.0]}, r"`reward_weights` has 3 values for 1 rewards"),
        ("ppo", {"rollout_backend": "vlm"}, r"`rollout_backend: vlm` is not valid \(did you mean `vllm`\?\)"),
        ("grpo", {"temperature": 0.0}, r"`temperature` must be > 0"),
        ("grpo", {"top_p": 0.0}, r"`top_p` must be in \(0, 1\]"),
        ("grpo", {"max_new_tokens": 0}, r"`max_new_tokens` >= 1"),
        ("grpo", {"epsilon": -0.1}, r"`epsilon` and `epsilon_high` must be >= 0"),
        ("grpo", {"stop_strings": [""]}, r"`stop_strings` must not contain an empty string"),
        ("ppo", {"target_kl": 0.0}, r"`target_kl` must be > 0"),
        ("ppo", {"lam": 1.5}, r"`gamma` and `lam` must be in \[0, 1\]"),
        ("ppo", {"cliprange_value": -1.0}, r"`cliprange_value` must be >= 0"),
        ("ppo", {"num_mini_batches": 16}, r"`num_mini_batches` \(16\) is larger than the rollout batch"),
    ],
)
def test_online_config_errors(stage: str, keys: dict, message: str, tiny_model: str, tmp_path: Path) -> None:
    from alignkit.config import build_config

    base = {
        "stage": stage,
        "model_name_or_path": tiny_model,
        "dataset": "d.jsonl",
        "reward_funcs": ["exact_match"],
        "per_device_train_batch_size": 8,
    }
    with pytest.raises(UserError, match=message):
        build_config({**base, **keys})


def test_gsm8k_prompts_flow_into_grpo(shared_data: Path, tiny_model: str, tmp_path: Path) -> None:
    """The real GSM8K file as prompt-only data: questions become prompts, `answer` reaches math_accuracy."""
    record, _ = run_stage(
        tmp_path,
        {
            "stage": "grpo",
            "model_name_or_path": tiny_model,
            "dataset": str(shared_data / "gsm8k" / "test.jsonl"),
            "max_length": 512,
            "reward_funcs": ["math_accuracy"],
            "num_generations": 2,
            "per_device_train_batch_size": 2,
            "max_new_tokens": 3,
            "max_steps": 1,
            "torch_dtype": "float32",
        },
    )
    assert record["rewards/math_accuracy/mean"] == 0.0  # a random tiny model does not solve GSM8K
    assert record["truncated_fraction"] > 0.5 and record["frac_reward_zero_std"] == 1.0


def test_ppo_trains_logs_saves_critic_and_resumes(tiny_model: str, tiny_rm: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    data = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    keys = {
        "stage": "ppo",
        "model_name_or_path": tiny_model,
        "dataset": data,
        "reward_model": tiny_rm,
        "per_device_train_batch_size": 4,
        "max_new_tokens": 4,
        "ppo_epochs": 2,
        "num_mini_batches": 2,
        "max_steps": 8,
        "save_steps": 4,
        "logging_steps": 1,
        "learning_rate": 1e-3,
        "target_kl": 0.1,
        "torch_dtype": "float32",
        "missing_eos_penalty": 1.0,
    }
    record, out = run_stage(tmp_path, keys)
    for key in (
        "reward/mean",
        "reward/std",
        "kl",
        "entropy",
        "policy/clipfrac",
        "policy/approxkl",
        "value/loss",
        "value/explained_variance",
        "response_length",
        "truncated_fraction",
        "kl_coef",
    ):
        assert key in record, key
    records = [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]
    assert records[-1]["kl_coef"] != records[0]["kl_coef"]  # the adaptive controller moved
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2
    critic = AutoModelForTokenClassification.from_pretrained(Path(out) / "value_model")
    assert critic.config.num_labels == 1
    assert (Path(out) / "checkpoint-4" / "value_model" / "model.safetensors").is_file()
    # resume from the step-4 checkpoint (a rollout boundary): runs to the end with the critic restored
    import shutil

    shutil.rmtree(Path(out) / "model.safetensors", ignore_errors=True)
    record2, _ = run_stage(tmp_path, {**keys, "resume_from_checkpoint": "auto"})
    again = [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]
    assert [r["step"] for r in again] == list(range(1, 9))
    assert math.isfinite(record2["loss"])
    # the resumed run is the run it continues: the adaptive KL coefficient (saved with the checkpoint), the
    # mini-batch shuffle and the sampling pick up where they stopped
    state = json.loads((Path(out) / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["stage"]["kl_coef"] != keys.get("init_kl_coef", 0.05)
    for before, after in zip(records[4:], again[4:]):
        assert after["kl_coef"] == pytest.approx(before["kl_coef"], rel=1e-9)
        assert after["loss"] == pytest.approx(before["loss"], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize(
    "stage,keys", [("grpo", {"val_size": 2}), ("ppo", {"eval_dataset": "EVAL", "eval_steps": 1})]
)
def test_online_stages_refuse_eval_rows(
    stage: str, keys: dict, tiny_model: str, tiny_rm: str, tmp_path: Path
) -> None:
    """Online stages do not evaluate on eval rows (yet): asking for them is an error before anything is
    written, not a silent skip."""
    data = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    keys = {k: data if v == "EVAL" else v for k, v in keys.items()}
    base = {"stage": stage, "model_name_or_path": tiny_model, "dataset": data, "reward_model": tiny_rm}
    key = next(iter(keys))
    with pytest.raises(
        UserError, match=rf"`{key}`: online stages \({stage}\) do not evaluate.*alignkit eval"
    ):
        run_stage(tmp_path, {**base, **keys, "max_steps": 1})
    assert not (tmp_path / "out").exists()


def test_ppo_needs_a_reward(tiny_model: str, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    with pytest.raises(UserError, match="give `reward_funcs`.*and/or a `reward_model`"):
        run_stage(tmp_path, {"stage": "ppo", "model_name_or_path": tiny_model, "dataset": data})


def test_reward_model_scores_with_its_own_tokenizer(tiny_model: str, tiny_rm: str, tmp_path: Path) -> None:
    """A reward model whose tokenizer differs from the policy's reads text re-tokenised with its own."""
    from alignkit.rewards import RewardModelScorer
    from alignkit.tiny import build_tokenizer

    other = tmp_path / "rm_other_tok"
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_rm)
    tok = build_tokenizer(vocab_size=300, seed=3)  # another vocabulary: ids differ from the policy's
    model.resize_token_embeddings(len(tok))
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(other)
    tok.save_pretrained(other)
    scorer = RewardModelScorer(str(other))
    prompt = [{"role": "user", "content": "What is 2 + 2?"}]
    got = scorer([prompt], ["4"], torch.device("cpu"))
    ids = tok.apply_chat_template(prompt + [{"role": "assistant", "content": "4"}], return_dict=True)[
        "input_ids"
    ]
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits[0, 0]
    assert got[0].item() == pytest.approx(expected.item(), rel=1e-5)
    # PPO with it: the critic, which reads the policy's ids, starts from the policy instead
    from transformers import AutoModelForTokenClassification

    data = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    keys = {
        "stage": "ppo",
        "model_name_or_path": tiny_model,
        "dataset": data,
        "reward_model": str(other),
        "per_device_train_batch_size": 4,
        "max_new_tokens": 3,
        "max_steps": 1,
        "torch_dtype": "float32",
    }
    _, out = run_stage(tmp_path / "ppo", keys)
    critic = AutoModelForTokenClassification.from_pretrained(Path(out) / "value_model")
    assert critic.config.vocab_size == load_tokenizer_vocab(tiny_model)
    with pytest.raises(UserError, match="value_model_name_or_path: .* has another tokenizer than the policy"):
        run_stage(tmp_path / "ppo2", {**keys, "value_model_name_or_path": str(other)})


def load_tokenizer_vocab(path: str) -> int:
    from alignkit.models import load_tokenizer

    return len(load_tokenizer(path))


def test_ppo_with_lora_trains_the_adapters_and_the_critic_head(
    tiny_model: str, tiny_rm: str, tmp_path: Path
) -> None:
    """LoRA on actor and critic (the scalar head trained in full, never adapted); the reference is the base with
    the adapter off."""
    data = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    record, out = run_stage(
        tmp_path,
        {
            "stage": "ppo",
            "model_name_or_path": tiny_model,
            "dataset": data,
            "reward_model": tiny_rm,
            "finetuning_type": "lora",
            "per_device_train_batch_size": 4,
            "max_new_tokens": 3,
            "ppo_epochs": 1,  # a fresh rollout every step: the third sees the adapter's updates
            "max_steps": 3,
            "logging_steps": 1,
            "learning_rate": 1e-2,
            "torch_dtype": "float32",
        },
    )
    assert math.isfinite(record["loss"]) and record["kl"] != 0.0  # the adapter moved the policy off the base
    assert (Path(out) / "adapter_config.json").is_file() or (
        Path(out) / "adapter_model.safetensors"
    ).is_file()


def test_ppo_whitening_keeps_the_logged_reward_raw_and_the_entropy_bonus_enters_the_loss(
    tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`whiten_rewards` changes what the policy is trained on, not what `reward/mean` reports; an entropy bonus
    moves the first step's loss by exactly -entropy_coef * entropy (same seed, same rollout)."""
    (tmp_path / "offset_rewards.py").write_text(
        "def five(prompts, completions, **kw):\n    return [5.0 + len(c) % 2 for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    keys = {
        "reward_funcs": ["offset_rewards:five"],
        "whiten_rewards": True,
        "max_new_tokens": 4,
        "ppo_epochs": 1,
        "num_mini_batches": 1,
    }
    base = first_step(tmp_path / "plain", "ppo", tiny_model, PROMPTS[:4], **keys)
    assert 5.0 <= base["reward/mean"] <= 6.0  # whitened, it would be 0
    bonus = first_step(tmp_path / "bonus", "ppo", tiny_model, PROMPTS[:4], entropy_coef=0.5, **keys)
    assert bonus["entropy"] == pytest.approx(base["entropy"], abs=1e-6) and base["entropy"] > 0.1
    assert bonus["loss"] == pytest.approx(base["loss"] - 0.5 * base["entropy"], abs=1e-5)


def test_rloo_penalises_the_sequence_kl_in_the_reward_before_the_baseline(
    tiny_model: str, tiny_ref: str, tmp_path: Path
) -> None:
    """RLOO (Ahmadian et al. 2024; TRL's RLOOTrainer): r_i - beta * sum_t (log pi - log ref), then the
    leave-one-out baseline; the loss gets no KL term."""
    from alignkit.config import build_config
    from alignkit.stages import get_stage

    data = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    cfg = build_config(
        {
            "stage": "grpo",
            "model_name_or_path": tiny_model,
            "ref_model_name_or_path": tiny_ref,
            "dataset": data,
            "output_dir": str(tmp_path / "out"),
            "loss_type": "rloo",
            "beta": 0.5,
            "reward_funcs": ["length"],
            "length_target": 2,
            "num_generations": 4,
            "max_new_tokens": 4,
            "torch_dtype": "float32",
        }
    )
    stage = get_stage("grpo")(cfg)
    stage.build()
    torch.manual_seed(0)
    buffer = stage.rollout(stage.model, stage.train_rows[:2], torch.device("cpu"))
    assert len(buffer) == 8 and all("ref_logps" not in s for s in buffer)
    assert all(
        s["kl"] == pytest.approx(sum(s["old_logps"]) - sum(_ref_logps(stage, s)), abs=1e-4) for s in buffer
    )
    assert any(abs(s["kl"]) > 0.1 for s in buffer)  # the reference differs from the policy
    for group in (buffer[:4], buffer[4:]):
        penalised = [s["reward"] - 0.5 * s["kl"] for s in group]
        for i, s in enumerate(group):
            others = [p for j, p in enumerate(penalised) if j != i]
            assert s["advantage"] == pytest.approx(penalised[i] - sum(others) / 3, abs=1e-4)
    batch = stage.collate(buffer)
    assert "ref_logps" not in batch and stage.count(batch) == 8
    assert stage.step(stage.model, batch).metrics["kl"][0].item() == pytest.approx(
        sum(s["kl"] for s in buffer), abs=1e-3
    )


def _ref_logps(stage, sample: dict) -> list[float]:  # noqa: ANN001
    """The reference's completion log-probs for one sample, computed afresh."""
    batch = stage.sequence_batch([sample])
    with torch.no_grad(), stage.reference.active(stage.model, torch.device("cpu")) as ref:
        return stage.token_stats(ref, batch).logps.tolist()


def test_empty_micro_batches_are_zero_weight_fillers(tiny_model: str, tiny_rm: str, tmp_path: Path) -> None:
    """PPO with 4 prompts, 2 mini-batches and 4 accumulation steps leaves 2 of the 4 micro-batches empty. They
    run at weight 0: the step equals the same rollout split into 2 micro-batches (loss, metrics, weights)."""
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    common = {
        "stage": "ppo",
        "model_name_or_path": tiny_model,
        "dataset": data,
        "reward_model": tiny_rm,
        "max_new_tokens": 4,
        "ppo_epochs": 1,
        "num_mini_batches": 2,
        "max_steps": 1,
        "logging_steps": 1,
        "learning_rate": 1e-3,
        "torch_dtype": "float32",
        "shuffle": False,
    }
    fillers, out_a = run_stage(
        tmp_path / "a", {**common, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 4}
    )
    plain, out_b = run_stage(
        tmp_path / "b", {**common, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2}
    )
    for key in ("loss", "reward/mean", "value/loss", "policy/clipfrac", "response_length"):
        assert fillers[key] == pytest.approx(plain[key], rel=1e-5, abs=1e-7), key
    a, b = (
        load_file(str(Path(out_a) / "model.safetensors")),
        load_file(str(Path(out_b) / "model.safetensors")),
    )
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_sampling_temperature_divides_the_soft_capped_logits() -> None:
    """Gemma-2 caps its logits (tanh(l / cap) * cap) before sampling divides them by the temperature."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from alignkit.logprobs import completion_token_stats

    torch.manual_seed(0)
    cfg = Gemma2Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        final_logit_softcapping=3.0,
        initializer_range=0.5,
    )
    model = Gemma2ForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (1, 10))
    mask, completion = torch.ones_like(ids), torch.zeros_like(ids)
    completion[:, 5:] = 1
    with torch.no_grad():
        got = completion_token_stats(model, ids, mask, completion, temperature=0.5).logps
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float() / 0.5, -1)
    assert got.tolist() == pytest.approx(
        logp[0, 4:9].gather(-1, ids[0, 5:10, None]).squeeze(-1).tolist(), abs=1e-5
    )


def test_online_stages_switch_dropout_off(tiny_model: str, tiny_rm: str, tmp_path: Path) -> None:
    """Rollout log-probs and the first update's must be the same function: no dropout (LoRA's included)."""
    from alignkit.config import build_config
    from alignkit.stages import get_stage

    cfg = build_config(
        {
            "stage": "ppo",
            "model_name_or_path": tiny_model,
            "dataset": write_jsonl(tmp_path / "p.jsonl", PROMPTS),
            "output_dir": str(tmp_path / "out"),
            "reward_model": tiny_rm,
            "finetuning_type": "lora",
            "lora_dropout": 0.1,
        }
    )
    stage = get_stage("ppo")(cfg)
    stage.build()
    dropouts = [m for m in stage.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.p == 0.0 for m in dropouts)


def test_completions_are_cut_where_sampling_stopped(tiny_model: str) -> None:
    from alignkit.models import load_tokenizer
    from alignkit.rollout import cut_completion

    tok = load_tokenizer(tiny_model)
    eos = tok.eos_token_id
    words = [
        i for i in range(len(tok)) if len(tok.decode([i]).strip()) >= 3 and tok.decode([i]).strip().isalpha()
    ]
    b = words[0]
    stop = tok.decode([b]).strip()[:2]  # a stop string inside token b: b overhangs it
    a = next(w for w in words if stop not in tok.decode([w]) and stop not in tok.decode([w, w]))
    assert cut_completion([a, b, eos, eos], tok, None) == ([a, b, eos], False)  # EOS kept, padding dropped
    assert cut_completion([a, b, a, b], tok, None) == ([a, b, a, b], True)  # ran out of tokens
    # cut after b, not truncated, and no pad/EOS appended
    assert cut_completion([a, b, eos, eos], tok, [stop]) == ([a, b], False)
    assert cut_completion([a, b, a, a], tok, [stop]) == ([a, b], False)
