"""LoRA stages chain: an adapter folder works wherever a model is asked for.

SFT with LoRA -> DPO from that adapter (continued; the reference is the SFT model), SFT adapter -> RM with LoRA
(SFT merged, a fresh LoRA, recorded in merged_adapters.json) -> PPO with the RM adapter as reward model.
Expected values come from peft / transformers directly in the test, never from alignkit's loaders.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from alignkit.errors import UserError
from tests.conftest import run_stage, write_jsonl

Q = ["What is 12 + 7?", "Name a colour of the sky.", "Say hello in French.", "Count to three."]
A = ["19", "Blue, on a clear day.", "Bonjour!", "One, two, three."]
BAD = ["21", "Green.", "Hola!", "One, three, two."]
SFT = [
    {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
    for q, a in zip(Q, A)
]
PAIRS = [
    {
        "prompt": [{"role": "user", "content": q}],
        "chosen": [{"role": "assistant", "content": a}],
        "rejected": [{"role": "assistant", "content": b}],
    }
    for q, a, b in zip(Q, A, BAD)
]
PROMPTS = [{"prompt": [{"role": "user", "content": q}]} for q in Q]
COMMON = {
    "per_device_train_batch_size": 4,
    "logging_steps": 1,
    "shuffle": False,
    "torch_dtype": "float32",
    "learning_rate": 1e-2,
}
IDS = torch.tensor([[5, 17, 42, 99, 7, 250, 3]])


def _records(out: str) -> list[dict]:
    return [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]


@pytest.fixture(scope="module")
def chain(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An SFT LoRA adapter (r=4) on the tiny model, and an RM LoRA adapter trained from that SFT adapter."""
    root = tmp_path_factory.mktemp("chain")
    lora = {"finetuning_type": "lora", "lora_r": 4, "max_steps": 2, **COMMON}
    sft = write_jsonl(root / "sft.jsonl", SFT)
    _, sft_out = run_stage(
        root / "sft", {"stage": "sft", "model_name_or_path": tiny_model, "dataset": sft, **lora}
    )
    pairs = write_jsonl(root / "pairs.jsonl", PAIRS)
    _, rm_out = run_stage(
        root / "rm", {"stage": "rm", "model_name_or_path": sft_out, "dataset": pairs, **lora}
    )
    return {"sft": sft_out, "rm": rm_out, "pairs": pairs, "prompts": write_jsonl(root / "p.jsonl", PROMPTS)}


def _merged_causal_lm(base: str, adapters: list[str], out: Path | None = None) -> torch.nn.Module:
    """base + each adapter merged in order, by peft directly; saved (with the base's tokenizer) to `out`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    for adapter in adapters:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    if out is not None:
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return model.eval()


def test_dpo_continues_the_sft_adapter_against_the_sft_model(
    chain: dict[str, str], tiny_model: str, tmp_path: Path
) -> None:
    """DPO from the SFT adapter: the first step's log-probs are the SFT model's (base + adapter), the reference
    is the SFT model (zero rewards at step 1), the SFT adapter itself is trained and saved on the bare base."""
    from safetensors.torch import load_file

    keys = {"stage": "dpo", "dataset": chain["pairs"], "max_steps": 2, **COMMON}
    adapter_run, out = run_stage(
        tmp_path / "lora", {**keys, "model_name_or_path": chain["sft"], "finetuning_type": "lora"}
    )
    first = _records(out)[0]
    # the same data through the SFT model merged by peft and saved as a full model: log-probs match
    merged = tmp_path / "sft_merged"
    _merged_causal_lm(tiny_model, [chain["sft"]], merged)
    full = _records(
        run_stage(tmp_path / "full", {**keys, "model_name_or_path": str(merged), "max_steps": 1})[1]
    )
    for key in ("logps/chosen", "logps/rejected"):
        assert first[key] == pytest.approx(full[0][key], abs=1e-4), key
    assert abs(first["logps/chosen"] - first["logps/rejected"]) > 1e-3  # the check has teeth
    # policy == reference at step 0: the reference is the starting (SFT) policy, not the bare base
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-4)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    assert adapter_run["rewards/margins"] != pytest.approx(0.0, abs=1e-4)  # and the policy moved off it
    config = json.loads((Path(out) / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == tiny_model
    assert config["r"] == 4  # the SFT adapter's rank (the DPO config's lora_r is 8): it was continued
    assert not (Path(out) / "merged_adapters.json").exists()
    sft_w, dpo_w = (load_file(str(Path(p) / "adapter_model.safetensors")) for p in (chain["sft"], out))
    assert sft_w.keys() == dpo_w.keys()
    assert any(not torch.equal(sft_w[k], dpo_w[k]) for k in sft_w)


def test_ppo_with_a_lora_reward_model_trained_from_the_sft_adapter(
    chain: dict[str, str], tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The RM adapter was trained on base + SFT merged (merged_adapters.json says so); PPO scores with base +
    SFT + RM merged, and its first rollout's reference is the starting (SFT) policy."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignkit.generation.rewards import RewardModelScorer

    recorded = json.loads((Path(chain["rm"]) / "merged_adapters.json").read_text())
    assert recorded["merged_adapters"] == [str(Path(chain["sft"]).resolve())]
    assert json.loads((Path(chain["rm"]) / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    calls: list[tuple[list, list[str], torch.Tensor]] = []
    scorer_call = RewardModelScorer.__call__

    def record(
        self: RewardModelScorer, prompts: list, completions: list[str], *a: object, **k: object
    ) -> torch.Tensor:
        scores = scorer_call(self, prompts, completions, *a, **k)
        calls.append((prompts, completions, scores))
        return scores

    monkeypatch.setattr(RewardModelScorer, "__call__", record)
    keys = {"stage": "ppo", "dataset": chain["prompts"], "max_new_tokens": 4, "ppo_epochs": 1, **COMMON}
    _, out = run_stage(
        tmp_path,
        {
            **keys,
            "model_name_or_path": chain["sft"],
            "finetuning_type": "lora",
            "reward_model": chain["rm"],
            "max_steps": 2,
        },
    )
    first = _records(out)[0]
    assert first["kl"] == pytest.approx(0.0, abs=1e-4)  # rollout 1: policy == reference == the SFT model
    # the expected reward model: base + SFT merged (saved as a full model), then the RM adapter (its score head)
    merged = tmp_path / "sft_merged"
    _merged_causal_lm(tiny_model, [chain["sft"]], merged)
    rm = AutoModelForSequenceClassification.from_pretrained(merged, num_labels=1, dtype=torch.float32)
    rm = PeftModel.from_pretrained(rm, chain["rm"]).merge_and_unload().eval()
    tok = AutoTokenizer.from_pretrained(chain["rm"])
    prompts, completions, scores = calls[0]
    with torch.no_grad():
        for prompt, completion, got in zip(prompts, completions, scores):
            ids = tok.apply_chat_template(
                prompt + [{"role": "assistant", "content": completion}], return_dict=True
            )["input_ids"]
            expected = rm(input_ids=torch.tensor([ids])).logits[0, 0]
            assert got.item() == pytest.approx(expected.item(), abs=1e-4)
    assert scores.std() > 1e-3  # different completions, different scores: the head is the trained one
    # the critic starts from the same merged weights: its value at the last token is the reward model's score
    from alignkit.config import build_config
    from alignkit.stages.ppo import load_value_model

    cfg = build_config(
        {
            **keys,
            "model_name_or_path": chain["sft"],
            "finetuning_type": "lora",
            "reward_model": chain["rm"],
            "output_dir": str(tmp_path / "o"),
        }
    )
    critic = load_value_model(cfg, tok)
    with torch.no_grad():
        turns = PAIRS[0]["prompt"] + PAIRS[0]["chosen"]
        ids = torch.tensor([tok.apply_chat_template(turns, return_dict=True)["input_ids"]])
        value = critic(input_ids=ids).logits[0, -1, 0]
        assert value.item() == pytest.approx(rm(input_ids=ids).logits[0, 0].item(), abs=1e-4)
    assert first["reward/mean"] == pytest.approx(scores.mean().item(), abs=1e-4)


def _random_adapter(base: str, out: Path, r: int, seed: int) -> str:
    """A LoRA adapter with random (non-zero) B matrices, saved by peft."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        LoraConfig(r=r, task_type="CAUSAL_LM", target_modules="all-linear"),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    model.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def two_adapters(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("adapters")
    return [_random_adapter(tiny_model, root / "a1", 2, 1), _random_adapter(tiny_model, root / "a2", 3, 2)]


def _cfg(tiny_model: str, tmp_path: Path, **keys: object):  # noqa: ANN202
    from alignkit.config import build_config

    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    return build_config(
        {
            "stage": "dpo",
            "model_name_or_path": tiny_model,
            "dataset": data,
            "output_dir": str(tmp_path / "o"),
            "finetuning_type": "lora",
            "torch_dtype": "float32",
            **keys,
        }
    )


def test_adapter_list_merges_all_but_the_last_which_is_continued(
    two_adapters: list[str], tiny_model: str, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    from alignkit.modeling.load import load_policy
    from alignkit.modeling.reference import Reference

    cfg = _cfg(tiny_model, tmp_path, adapter_name_or_path=",".join(two_adapters))  # a comma-separated string
    policy = load_policy(cfg)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    saved = load_file(str(Path(two_adapters[1]) / "adapter_model.safetensors"))
    assert len(trainable) == len(saved) > 0 and all(".lora_" in n for n in trainable)
    state = policy.state_dict()
    for key, value in saved.items():  # the second adapter's own weights (r=3), not a fresh LoRA
        assert torch.equal(state[key.replace(".weight", ".default.weight")], value)
    expected = _merged_causal_lm(tiny_model, two_adapters)
    with torch.no_grad():
        want = expected(input_ids=IDS).logits
        torch.testing.assert_close(policy(input_ids=IDS).logits, want, atol=1e-5, rtol=0)
        reference = Reference(cfg, policy)  # continued: adapter-off would drop a2, so a frozen copy
        assert not reference.use_adapter_off
        torch.testing.assert_close(reference._load()(input_ids=IDS).logits, want, atol=1e-5, rtol=0)
        # ref_model_name_or_path an adapter folder: its base with it merged, frozen
        named = Reference(_cfg(tiny_model, tmp_path, ref_model_name_or_path=two_adapters[1]), policy)
        ref_model = named._load()
        assert not named.use_adapter_off and not any(p.requires_grad for p in ref_model.parameters())
        only_a2 = _merged_causal_lm(tiny_model, two_adapters[1:])(input_ids=IDS).logits
        torch.testing.assert_close(ref_model(input_ids=IDS).logits, only_a2, atol=1e-5, rtol=0)


def test_merge_adapter_trains_a_fresh_lora_and_records_the_merged_ones(
    two_adapters: list[str], tiny_model: str, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    from alignkit.modeling.load import load_causal_lm, load_policy
    from alignkit.modeling.reference import Reference
    from alignkit.modeling.save import save_model

    cfg = _cfg(tiny_model, tmp_path, adapter_name_or_path=two_adapters, merge_adapter=True, lora_r=5)
    policy = load_policy(cfg)
    lora_b = [p for n, p in policy.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.shape[1] == 5 and not p.any() for p in lora_b)  # fresh: B starts at zero
    assert Reference(cfg, policy).use_adapter_off  # adapter-off is base + both merged: the starting policy
    with torch.no_grad():
        want = _merged_causal_lm(tiny_model, two_adapters)(input_ids=IDS).logits
        torch.testing.assert_close(policy(input_ids=IDS).logits, want, atol=1e-5, rtol=0)
    out = tmp_path / "saved"
    save_model(policy, AutoTokenizer.from_pretrained(tiny_model), str(out))
    record = json.loads((out / "merged_adapters.json").read_text())
    assert record["merged_adapters"] == [str(Path(a).resolve()) for a in two_adapters]
    loaded, _ = load_causal_lm(str(out))  # the saved adapter loads on base + both merged
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, want, atol=1e-5, rtol=0)


def test_reward_model_type_must_match_the_folder(chain: dict[str, str], tiny_rm: str, tmp_path: Path) -> None:
    from alignkit.generation.rewards import RewardModelScorer

    keys = {"stage": "ppo", "dataset": chain["prompts"], "model_name_or_path": chain["sft"], "max_steps": 1}
    with pytest.raises(UserError, match="reward_model_type: full` but reward_model .* is a LoRA adapter"):
        run_stage(tmp_path, {**keys, "reward_model": chain["rm"], "reward_model_type": "full"})
    with pytest.raises(UserError, match="reward_model_type: lora` but reward_model .* is not a LoRA adapter"):
        RewardModelScorer(tiny_rm, model_type="lora")
    with pytest.raises(UserError, match="reward_model_type: api` is not supported"):
        RewardModelScorer.spec(chain["rm"], "api")
    with pytest.raises(UserError, match="task_type CAUSAL_LM, not a reward model"):
        RewardModelScorer.spec(chain["sft"])


def test_an_adapter_whose_base_is_gone_names_adapter_config(
    chain: dict[str, str], tiny_model: str, tmp_path: Path
) -> None:
    from alignkit.modeling.load import TOKENIZER_FILES, load_policy, load_tokenizer

    moved = tmp_path / "adapter"
    shutil.copytree(chain["sft"], moved)
    for name in TOKENIZER_FILES + ("special_tokens_map.json", "chat_template.jinja"):
        (moved / name).unlink(missing_ok=True)
    # no tokenizer files beside the adapter: its base's tokenizer
    assert load_tokenizer(str(moved)).get_vocab() == load_tokenizer(tiny_model).get_vocab()
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone" / "base")
    (moved / "adapter_config.json").write_text(json.dumps(config))
    match = (
        r"trained on .*gone/base \(`base_model_name_or_path` in .*adapter_config.json\), which does not exist "
        "here; edit that key to where the base model is"
    )
    with pytest.raises(UserError, match=match):
        load_tokenizer(str(moved))
    with pytest.raises(UserError, match=match):
        load_policy(_cfg(str(moved), tmp_path))
    with pytest.raises(UserError, match=match):
        run_stage(
            tmp_path / "run", {"stage": "sft", "model_name_or_path": str(moved), "dataset": chain["pairs"]}
        )
