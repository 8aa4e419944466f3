"""KL on a real model (SmolLM2-135M-Instruct) against the same model with a small LoRA: a user's report of
`alignkit eval --max-samples 6 max_new_tokens=32` giving KL -0.043 with the interval [-0.070, -0.015].

KL(model || reference) is never negative. The k1 estimate (the mean sampled log-ratio) is unbiased but
heavy-tailed: most answers have a negative log-ratio and a few a large positive one, so 6 of them with a normal
interval easily give an interval below 0. The eval now reports the exact next-token KL summed along each
sampled answer, with a t interval clipped at 0."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.conftest import write_jsonl
from tests.evaluation.test_eval import _eval

PROMPTS = [
    "Name three colours of the rainbow.",
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "Give me a tip for learning to cook.",
    "What is 12 times 7?",
    "Describe a cat in a few words.",
]


def _adapter(base: str, out: Path) -> str:
    """A rank-4 LoRA on the attention's q and v with random factors, scaled so the two models differ by
    about a few tenths of a nat per 32-token answer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.2)
    peft_model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return str(out)


def _mean_se(xs: list[float]) -> tuple[float, float]:
    mean = sum(xs) / len(xs)
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


@pytest.mark.slow
def test_kl_of_a_real_lora_adapter_is_never_negative(tmp_path: Path, smollm2: str) -> None:
    from alignkit.evaluation.scoring import kl_per_sample
    from alignkit.generation.rollout import complete
    from alignkit.modeling.load import load_causal_lm

    adapter = _adapter(smollm2, tmp_path / "adapter")
    data = write_jsonl(tmp_path / "q.jsonl", [{"prompt": [{"role": "user", "content": p}]} for p in PROMPTS])
    report = _eval(
        tmp_path,
        model=adapter,
        baseline=smollm2,
        dataset=data,
        max_samples=6,
        max_new_tokens=32,
        metrics=["kl"],
    )
    kl = report["metrics"]["kl"]
    assert kl["n"] == 6 and kl["value"] > 0.01  # the adapter really moves the model
    assert 0.0 <= kl["ci95"][0] <= kl["value"] <= kl["ci95"][1]
    assert abs(kl["sampling_gap"]) < 0.01  # float32: the sampler's log-probs are the scorer's

    # a larger sample, drawn and scored directly: every exact per-answer KL is >= 0, and k1 agrees with it in
    # expectation (E[k1 - exact] = 0 when answers come from the scored model)
    model, tok = load_causal_lm(adapter)
    ref, _ = load_causal_lm(smollm2)
    messages = [[{"role": "user", "content": p}] for p in PROMPTS]
    torch.manual_seed(0)
    samples = complete(model, tok, messages, num_samples=4, max_new_tokens=32, temperature=1.0)
    found = kl_per_sample(model, ref, samples.prompt_ids, samples.completion_ids, tok.pad_token_id)
    assert len(found.exact) == 24 and min(found.exact) >= 0.0
    gap, se = _mean_se([a - b for a, b in zip(found.k1, found.exact)])
    assert abs(gap) < 4 * se, (gap, se)
    assert _mean_se(found.exact)[1] < _mean_se(found.k1)[1] / 2  # far lower variance
    sampled = [sum(lp) for lp in samples.logprobs]  # what generate drew each token with
    assert max(abs(a - b) for a, b in zip(sampled, found.logp)) < 0.01

    # the exact sum recomputed by hand for one answer from both models' whole logits
    p, c = samples.prompt_ids[0], samples.completion_ids[0]
    x = torch.tensor([p + c])
    with torch.no_grad():
        lp = torch.log_softmax(model(x).logits[0, len(p) - 1 : -1].double(), -1)
        lq = torch.log_softmax(ref(x).logits[0, len(p) - 1 : -1].double(), -1)
    assert found.exact[0] == pytest.approx((lp.exp() * (lp - lq)).sum().item(), rel=1e-4, abs=1e-6)
