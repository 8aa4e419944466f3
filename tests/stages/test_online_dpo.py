"""Online DPO: the pair rule (best vs worst, TRL's tie rule), the loss on fixed completions against TRL 1.16's
`trl.experimental.online_dpo`, training through the loop, learning a verifiable reward, config errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from alignkit.errors import UserError
from alignkit.stages.online_dpo import best_and_worst
from tests.conftest import run_stage, write_jsonl
from tests.generation.test_online import PROMPTS


def test_best_and_worst_pick_the_first_maximum_and_the_last_minimum() -> None:
    total = torch.tensor([1.0, 3.0, 3.0, 0.0, 2.0, 2.0, 2.0, 2.0, 5.0, 4.0, 6.0, 4.0])
    chosen, rejected = best_and_worst(total, 4)
    assert chosen.tolist() == [1, 4, 10] and rejected.tolist() == [3, 7, 11]
    # two samples, as TRL: the first is chosen when its reward is >= the second's (a tie included)
    chosen, rejected = best_and_worst(torch.tensor([0.5, 0.5, 0.1, 0.9, 0.9, 0.1]), 2)
    assert chosen.tolist() == [0, 3, 4] and rejected.tolist() == [1, 2, 5]


def _keys(tiny_model: str, data: str, **kw: object) -> dict:
    return {
        "stage": "online_dpo",
        "model_name_or_path": tiny_model,
        "dataset": data,
        "reward_funcs": ["exact_match", "length"],
        "reward_weights": [1.0, 0.1],
        "length_target": 2,
        "per_device_train_batch_size": 2,
        "max_new_tokens": 4,
        "max_steps": 2,
        "logging_steps": 1,
        "learning_rate": 1e-3,
        "torch_dtype": "float32",
        **kw,
    }


@pytest.mark.parametrize("extra", [{}, {"loss_type": "ipo", "num_generations": 4}, {"loss_type": "simpo"}])
def test_online_dpo_trains_and_logs(extra: dict, tiny_model: str, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    record, out = run_stage(tmp_path, _keys(tiny_model, data, **extra))
    records = [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2]
    for key in ("loss", "rewards/chosen", "rewards/margins", "logps/chosen", "objective/scores_margin"):
        assert key in record, key
    assert all(r["objective/scores_margin"] >= 0 for r in records)  # the chosen never scores below
    assert 0 <= record["frac_tied_pairs"] <= 1
    if extra.get("loss_type") == "simpo":  # reference-free: no reference model, rewards from the policy alone
        assert record["rewards/chosen"] != 0


def test_online_dpo_learns_a_verifiable_reward(tiny_model: str, tmp_path: Path) -> None:
    """A reward for short completions (minus the characters): ranking the policy's own samples raises it."""
    mod = tmp_path / "stop_reward_dpo.py"
    mod.write_text("def short(prompts, completions, **kw):\n    return [-len(c) / 10 for c in completions]\n")
    sys.path.insert(0, str(tmp_path))
    try:
        data = write_jsonl(tmp_path / "p.jsonl", PROMPTS * 4)
        keys = _keys(
            tiny_model,
            data,
            reward_funcs=["stop_reward_dpo:short"],
            reward_weights=None,
            num_generations=4,
            per_device_train_batch_size=8,
            max_new_tokens=3,
            max_steps=12,
            learning_rate=3e-2,
            beta=0.1,
        )
        _, out = run_stage(tmp_path, keys)
    finally:
        sys.path.remove(str(tmp_path))
    records = [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]
    first = sum(r["objective/scores"] for r in records[:3]) / 3
    last = sum(r["objective/scores"] for r in records[-3:]) / 3
    assert last > first + 0.2, (first, last)


@pytest.mark.parametrize(
    "keys,message",
    [
        ({"num_generations": 1}, "`num_generations` must be >= 2 to make a pair"),
        ({"prefix_sharing": True}, "`prefix_sharing` does not apply to stage online_dpo"),
        ({"reward_funcs": None}, "give `reward_funcs`"),
        ({"loss_type": "sigmoidd"}, r"`loss_type: sigmoidd` does not exist \(did you mean `sigmoid`\?\)"),
    ],
)
def test_online_dpo_config_errors(keys: dict, message: str, tiny_model: str, tmp_path: Path) -> None:
    from alignkit.config import build_config

    with pytest.raises(UserError, match=message):
        build_config({**_keys(tiny_model, "d.jsonl"), "output_dir": str(tmp_path), **keys})


def test_online_dpo_step_on_fixed_completions_matches_trl(
    tiny_model: str, tiny_ref: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TRL 1.16's `OnlineDPOTrainer.training_step` and this stage's step on the same two prompts, the same two
    completions each (one pair tied: the first is chosen) and the same rewards, with a reference that differs
    from the policy: the loss and the logged log-probs and implicit rewards agree. (TRL's online `ipo` takes
    summed log-ratios, its offline DPOTrainer's and alignkit's registry entry token-averaged ones: not compared.)"""
    loss_type = "sigmoid"
    from alignkit.data.batches import tokenize_chat
    from alignkit.generation.rollout import Samples
    from alignkit.modeling.load import load_tokenizer
    from alignkit.stages.online_dpo import OnlineDPOStage
    from tests.trl_oracle_online import trl_online_dpo_loss

    tok = load_tokenizer(tiny_model)
    eos = tok.eos_token_id
    prompts = [tokenize_chat(tok, r["prompt"], add_generation_prompt=True) for r in PROMPTS[:2]]
    completions = [[11, 12, eos], [16, eos], [13, 14, 15, eos], [17, 18, 19, 20, eos]]  # TRL's layout: i, i+B
    rewards = [1.0, 0.0, 1.0, 2.0]  # prompt 0 ties (the first is chosen), prompt 1 prefers its second
    theirs = trl_online_dpo_loss(
        tiny_model, prompts, completions, rewards, beta=0.1, loss_type=loss_type, ref_dir=tiny_ref
    )

    ours = [completions[0], completions[2], completions[1], completions[3]]  # grouped per prompt
    scores = [rewards[0], rewards[2], rewards[1], rewards[3]]
    fixed = Samples([p for p in prompts for _ in range(2)], ours, [False] * 4, [""] * 4)
    monkeypatch.setattr(OnlineDPOStage, "sample", lambda self, model, rows, g: fixed)
    monkeypatch.setattr(
        OnlineDPOStage, "rewards", lambda self, rows, samples, g, device: (torch.tensor(scores), {})
    )
    data = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:2])
    keys = _keys(tiny_model, data, loss_type=loss_type, beta=0.1, ref_model_name_or_path=tiny_ref)
    record, _ = run_stage(tmp_path, {**keys, "max_steps": 1, "learning_rate": 1e-6})
    assert record["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
    # an implicit reward is beta x the difference of two float32 sums of about -20: the two sides' summation
    # orders leave about 1e-6 x beta there (2.8e-7 on an AVX-512 Xeon), nothing closer to 0 is meaningful
    for key in ("logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert record[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), key


def test_iterative_dpo_rounds_refresh_the_reference_and_resume_by_round(
    tiny_model: str, tmp_path: Path
) -> None:
    """`rounds: 2`: each round samples pairs from the last round's policy, trains DPO from it with it as the
    reference; a rerun skips the finished round and trains the one that did not finish, on its saved pairs."""
    import yaml

    from alignkit import api

    (tmp_path / "short_reward_rounds.py").write_text(
        "def short(prompts, completions, **kw):\n    return [-len(c) / 10 for c in completions]\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        data = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
        keys = _keys(
            tiny_model,
            data,
            reward_funcs=["short_reward_rounds:short"],
            reward_weights=None,
            rounds=2,
            num_generations=4,
            output_dir=str(tmp_path / "it"),
            disable_tqdm=True,
            plot_loss=False,
        )
        result = api.train(keys)
        root = tmp_path / "it"
        summary = json.loads((root / "rounds.json").read_text())
        assert [r["round"] for r in summary["rounds"]] == [1, 2] and summary["model"] == str(
            root / "round-2" / "model"
        )
        assert result.output_dir == str(root / "round-2" / "model")
        assert summary["rounds"][1]["policy"] == str(root / "round-1" / "model")
        round2 = yaml.safe_load((root / "round-2" / "model" / "config.yaml").read_text())
        assert round2["stage"] == "dpo" and round2["ref_model_name_or_path"] == str(
            root / "round-1" / "model"
        )
        assert round2["model_name_or_path"] == str(root / "round-1" / "model")
        for r in summary["rounds"]:
            pairs = [json.loads(line) for line in open(root / f"round-{r['round']}" / "pairs.jsonl")]
            assert len(pairs) == r["rows"] == 8 - r["prompts_without_acceptable_sample"] > 0
        # round 2 cut short: its marker and model gone, its pairs kept
        first_model = (root / "round-1" / "model" / "model.safetensors").stat().st_mtime_ns
        pairs2 = (root / "round-2" / "pairs.jsonl").read_text()
        (root / "round-2" / "round.json").unlink()
        (root / "rounds.json").unlink()
        api.train({**keys, "overwrite_output_dir": True})
        assert (root / "round-1" / "model" / "model.safetensors").stat().st_mtime_ns == first_model
        assert (root / "round-2" / "pairs.jsonl").read_text() == pairs2
        assert (root / "round-2" / "round.json").exists() and (root / "rounds.json").exists()
    finally:
        sys.path.remove(str(tmp_path))
