"""`rollout_backend: vllm` against a fake `vllm` module (vLLM itself needs a GPU and is not installed here).

The fake records what alignkit hands vLLM: the `LLM(...)` engine arguments, each `SamplingParams`, and the
(name, tensor) pairs given to the model's `load_weights`, so the tests check the interface, not vLLM.
"""

from __future__ import annotations

import copy
import sys
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from alignkit.errors import UserError
from tests.conftest import write_jsonl

PROMPTS = [
    {"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "answer": str(a + b)}
    for a, b in [(1, 2), (3, 4)]
]


class FakeSamplingParams:
    def __init__(self, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)


class FakeLLM:
    """vllm.LLM as alignkit uses it: generate, and collective_rpc to reach the worker's model."""

    created: list[FakeLLM] = []

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.params: list[FakeSamplingParams] = []
        self.loaded: list[list[tuple[str, torch.Tensor]]] = []
        FakeLLM.created.append(self)

    def collective_rpc(self, fn: Any) -> list[Any]:
        model = SimpleNamespace(load_weights=lambda weights: self.loaded.append(list(weights)))
        return [fn(SimpleNamespace(model_runner=SimpleNamespace(model=model)))]

    def generate(self, prompts: list[dict], params: FakeSamplingParams, use_tqdm: bool = False) -> list[Any]:
        """Per prompt, n completions: [5, 6, 2] stopped at EOS (id 2), then rows cut by length; the
        sampled token t at step s gets log-prob -(t + s) / 10, so each value says where it came from."""
        self.params.append(params)

        def completion(tokens: list[int], reason: str) -> SimpleNamespace:
            steps = [{t: SimpleNamespace(logprob=-(t + s) / 10)} for s, t in enumerate(tokens)]
            return SimpleNamespace(token_ids=tokens, finish_reason=reason, logprobs=steps)

        outs = [[completion([5, 6, 2], "stop")] + [completion([7, 8, 9], "length")] * (params.n - 1)]
        return [SimpleNamespace(outputs=outs[0]) for _ in prompts]


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    module = types.ModuleType("vllm")
    module.LLM = FakeLLM
    module.SamplingParams = FakeSamplingParams
    module.__version__ = "0.11.0"
    monkeypatch.setitem(sys.modules, "vllm", module)
    FakeLLM.created.clear()
    return module


def _stage(tiny_model: str, tmp_path: Path, **keys: Any) -> Any:
    from alignkit.config import build_config
    from alignkit.stages import get_stage

    cfg = build_config(
        {
            "stage": "grpo",
            "model_name_or_path": tiny_model,
            "dataset": write_jsonl(tmp_path / "p.jsonl", PROMPTS),
            "output_dir": str(tmp_path / "out"),
            "reward_funcs": ["exact_match"],
            "rollout_backend": "vllm",
            "num_generations": 2,
            "max_new_tokens": 3,
            "torch_dtype": "float32",
            **keys,
        }
    )
    stage = get_stage("grpo")(cfg)
    stage.build()
    return stage


def test_vllm_returns_the_sampling_distributions_log_probs(
    fake_vllm: types.ModuleType, tiny_model: str, tmp_path: Path
) -> None:
    """vLLM's default `raw_logprobs` are the model's before temperature / top-k / top-p: the engine must be made
    with `logprobs_mode="processed_logprobs"` so the first importance ratio compares like with like."""
    stage = _stage(tiny_model, tmp_path, temperature=0.7, top_k=5, top_p=0.9)
    (llm,) = FakeLLM.created
    assert llm.kwargs["logprobs_mode"] == "processed_logprobs"
    assert llm.kwargs["model"] == tiny_model
    samples = stage.sample(stage.model, stage.train_rows[:2], 2)
    (params,) = llm.params
    assert (params.n, params.temperature, params.top_k, params.top_p) == (2, 0.7, 5, 0.9)
    assert (params.max_tokens, params.logprobs) == (3, 0)  # the sampled token's own log-prob only
    assert samples.completion_ids == [[5, 6, 2], [7, 8, 9]] * 2
    assert samples.truncated == [False, True] * 2
    assert samples.logprobs == [pytest.approx([-0.5, -0.7, -0.4]), pytest.approx([-0.7, -0.9, -1.1])] * 2
    assert samples.prompt_ids[0] == samples.prompt_ids[1] != samples.prompt_ids[2]


def test_vllm_older_than_logprobs_mode_is_a_clear_error(
    fake_vllm: types.ModuleType, tiny_model: str, tmp_path: Path
) -> None:
    fake_vllm.__version__ = "0.10.1"
    with pytest.raises(UserError, match=r"vLLM 0\.10\.1 .*0\.10\.2"):
        _stage(tiny_model, tmp_path)


def _pushed(llm: FakeLLM) -> dict[str, torch.Tensor]:
    (pairs,) = llm.loaded
    names = [n for n, _ in pairs]
    assert len(names) == len(set(names))
    return dict(pairs)


def test_push_weights_sends_the_full_models_state_dict(
    fake_vllm: types.ModuleType, tiny_model: str, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    stage = _stage(tiny_model, tmp_path)
    stage.engine.push_weights(stage.model)
    pushed = _pushed(FakeLLM.created[0])
    base = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    assert sorted(pushed) == sorted(base)
    for name, value in stage.model.state_dict().items():
        assert torch.equal(pushed[name], value), name


def test_push_weights_under_lora_sends_merged_weights_under_the_base_names(
    fake_vllm: types.ModuleType, tiny_model: str, tmp_path: Path
) -> None:
    """peft names a weight `base_model.model.<name>` with `.base_layer` inside and adds lora_A / lora_B: vLLM's
    `load_weights` knows only the base model's names, and must get W + (alpha / r) B A, not W."""
    from transformers import AutoModelForCausalLM

    stage = _stage(tiny_model, tmp_path, finetuning_type="lora", lora_r=4, lora_alpha=8)
    model = stage.model
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # peft starts B at 0, where merged == base: give every adapter a non-zero B
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stage.sample(model, stage.train_rows[:1], 2)  # the rollout pushes the weights before sampling
    pushed = _pushed(FakeLLM.created[0])

    base = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    assert sorted(pushed) == sorted(base)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    a, b = q.lora_A["default"].weight, q.lora_B["default"].weight  # (r, in), (out, r)
    expected = q.base_layer.weight + (8 / 4) * b @ a
    assert not torch.allclose(expected, q.base_layer.weight)
    torch.testing.assert_close(pushed["model.layers.0.self_attn.q_proj.weight"], expected)
    # every weight equals peft's own merge; untargeted weights (embeddings, norms) pass through unchanged
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    for name in base:
        torch.testing.assert_close(pushed[name], merged[name], msg=name)
    # pushing merges into copies: the training model keeps its adapter and its base weights
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_lora_with_a_module_trained_in_full_pushes_its_trained_copy(tiny_model: str) -> None:
    """peft's `modules_to_save` trains a copy (`<name>.modules_to_save.default`) beside the frozen original
    (`<name>.original_module`): vLLM gets the trained copy under the plain name."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from alignkit.generation.rollout import vllm_weights

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    names = sorted(base.state_dict())
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["v_proj"], modules_to_save=["o_proj"]))
    trained = model.base_model.model.model.layers[0].self_attn.o_proj.modules_to_save["default"].weight
    with torch.no_grad():
        trained.add_(1.0)
    pushed = dict(vllm_weights(model))
    assert sorted(pushed) == names
    torch.testing.assert_close(pushed["model.layers.0.self_attn.o_proj.weight"], trained)


def test_sampler_correction_weights_by_hand() -> None:
    """Two completions (tokens 0-1, 2-4): trainer minus sampler log-ratios 0.5, -0.2 | 1.5, NaN, -3.0."""
    from alignkit.losses.rl import sampler_correction

    old = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0])
    sampler = torch.tensor([-0.5, 0.2, -1.5, float("nan"), 3.0])
    rows = torch.tensor([0, 0, 1, 1, 1])
    e = torch.exp

    def got(mode: str, hi: float | None = 3.0, lo: float | None = None) -> torch.Tensor:
        return sampler_correction(old, sampler, rows, 2, mode, hi, lo)

    r = e(torch.tensor([0.5, -0.2, 1.5, 0.0, -3.0]))  # the NaN token agrees: ratio 1
    torch.testing.assert_close(got("token_truncate"), torch.clamp(r, max=3.0))  # e^1.5 = 4.48 -> 3
    torch.testing.assert_close(got("token_truncate", 3.0, 0.1), torch.clamp(r, 0.1, 3.0))
    torch.testing.assert_close(got("token_mask", 3.0, 0.1), torch.where((r > 3.0) | (r < 0.1), 0.0, r))
    seq = e(torch.tensor([0.3, 0.3, -1.5, -1.5, -1.5]))  # per completion: the sum of its log-ratios
    torch.testing.assert_close(got("sequence_truncate"), seq)
    torch.testing.assert_close(got("sequence_mask", 3.0, 0.5), torch.where(seq < 0.5, 0.0, seq))


def test_grpo_loss_takes_the_sampler_weights_on_its_policy_term() -> None:
    from alignkit.losses.rl import GRPO_LOSSES, grpo_policy_loss

    logps = torch.tensor([-1.0, -2.0, -0.5])
    rows, adv = torch.tensor([0, 0, 1]), torch.tensor([1.0, -1.0])
    w = torch.tensor([2.0, 1.0, 0.5])
    spec = GRPO_LOSSES["dapo"]  # token-level ratio, summed over tokens
    plain, _, _ = grpo_policy_loss(logps, logps, adv, rows, spec, 0.2, 0.2, 4)
    weighted, _, _ = grpo_policy_loss(logps, logps, adv, rows, spec, 0.2, 0.2, 4, sampler_weights=w)
    # ratio 1: each token's loss is -advantage; weighted: -(2 * 1 + 1 * 1) - 0.5 * (-1)
    assert plain.item() == pytest.approx(-1.0 - 1.0 + 1.0) and weighted.item() == pytest.approx(-3.0 + 0.5)
    gspo = GRPO_LOSSES["gspo"]  # a completion-level ratio takes its completion's mean weight
    g_plain, _, _ = grpo_policy_loss(logps, logps, adv, rows, gspo, 0.2, 0.2, 4)
    g_weighted, _, _ = grpo_policy_loss(logps, logps, adv, rows, gspo, 0.2, 0.2, 4, sampler_weights=w)
    assert g_plain.item() == pytest.approx(-1.0 + 1.0) and g_weighted.item() == pytest.approx(-1.5 + 0.5)


def test_grpo_step_corrects_for_the_samplers_log_probs(
    fake_vllm: types.ModuleType, tiny_model: str, tmp_path: Path
) -> None:
    """The fake vLLM reports log-prob -(t + s) / 10 for token t at step s. The step weights each token by
    min(pi_trainer / pi_sampler, 3) (trainer log-probs from a plain forward at the sampling temperature) and
    logs KL(sampler || trainer) by k3 and the weights' mean and max; with the correction off, no weight."""
    from alignkit.losses.rl import grpo_policy_loss, sampler_correction

    stage = _stage(tiny_model, tmp_path, temperature=0.7)
    buffer = stage.rollout(stage.model, stage.train_rows[:2], torch.device("cpu"))
    assert [s["sampler_logps"] for s in buffer[:2]] == [
        pytest.approx([-0.5, -0.7, -0.4]),
        pytest.approx([-0.7, -0.9, -1.1]),
    ]
    batch = stage.collate(buffer)
    batch["advantages"] = torch.tensor([1.0, -1.0, 0.5, -0.5])  # every reward was 0: give the loss a signal
    old = batch["old_logps"]
    stats = stage.token_stats(stage.model, batch)
    torch.testing.assert_close(old, stats.logps.detach())  # the trainer's, at rollout time
    out = stage.step(stage.model, batch)
    log_r = old - batch["sampler_logps"]
    k3 = (torch.exp(log_r) - 1 - log_r).mean()
    weights = sampler_correction(old, batch["sampler_logps"], stats.rows, 4, "token_truncate", 3.0)
    assert out.metrics["sampler/kl"][0].item() / out.metrics["sampler/kl"][1] == pytest.approx(
        k3.item(), rel=1e-5
    )
    assert out.metrics["sampler/ratio_max"][0].item() == pytest.approx(weights.max().item())
    # the tiny model gives these tokens far less than the fake's log-probs: ratios below 1, none capped
    torch.testing.assert_close(weights, torch.exp(log_r))
    expected, _, _ = grpo_policy_loss(
        stats.logps, old, batch["advantages"], stats.rows, stage.spec, 0.2, 0.2, 3, sampler_weights=weights
    )
    assert out.loss_sum.item() == pytest.approx(expected.item(), rel=1e-6)
    unweighted, _, _ = grpo_policy_loss(
        stats.logps, old, batch["advantages"], stats.rows, stage.spec, 0.2, 0.2, 3
    )
    assert abs(unweighted.item() - expected.item()) > 1e-3
    plain = _stage(tiny_model, tmp_path / "off", temperature=0.7, vllm_importance_sampling_correction=False)
    off = plain.rollout(plain.model, plain.train_rows[:2], torch.device("cpu"))
    assert (
        "sampler_logps" not in off[0]
        and "sampler/kl" not in plain.step(plain.model, plain.collate(off)).metrics
    )
