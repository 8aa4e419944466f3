"""`alignkit merge` (mergekit): each method's result against its paper's formula on the tiny model's tensors —
linear (a weighted mean), SLERP (Shoemake's spherical interpolation), TIES (Yadav et al. 2023: sign election,
disjoint mean of the task vectors that agree), DARE (Yu et al. 2024: drop with probability 1 - density, rescale
the kept, by 1 / density in expectation) — LoRA adapters as inputs, the model card, and the errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignkit.errors import UserError

pytest.importorskip("mergekit", reason="alignkit merge runs mergekit (pip install 'alignkit[merge]')")
TENSOR = "model.layers.0.mlp.up_proj.weight"


def _weights(folder: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny base and two 'fine-tunes' of it (the base plus independent noise), saved as full folders."""
    from transformers import AutoModelForCausalLM

    from alignkit.modeling.tiny import build_tiny

    root = tmp_path_factory.mktemp("merge")
    base = build_tiny(str(root / "base"), hidden_size=64, layers=2, seed=0)
    out = {"base": base}
    for i, name in enumerate(("a", "b")):
        model = AutoModelForCausalLM.from_pretrained(base)
        torch.manual_seed(i + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        model.save_pretrained(root / name)
        out[name] = str(root / name)
    for name in ("a", "b"):  # tokenizer files beside the weights, as any fine-tune has them
        for f in Path(base).iterdir():
            if f.name.startswith(("tokenizer", "special", "chat_template")):
                (Path(out[name]) / f.name).write_bytes(f.read_bytes())
    return out


def _merge(tmp_path: Path, config: dict) -> dict[str, torch.Tensor]:
    from alignkit import api

    out = tmp_path / "merged"
    result = api.merge({**config, "dtype": "float32"}, output=str(out))
    assert result.output == str(out)
    return _weights(out)


def test_linear_is_the_weighted_mean(family: dict[str, str], tmp_path: Path) -> None:
    merged = _merge(
        tmp_path,
        {
            "merge_method": "linear",
            "models": [
                {"model": family["a"], "parameters": {"weight": 0.25}},
                {"model": family["b"], "parameters": {"weight": 0.75}},
            ],
        },
    )
    a, b = _weights(family["a"]), _weights(family["b"])
    for name in (TENSOR, "model.embed_tokens.weight"):
        assert torch.allclose(merged[name], 0.25 * a[name] + 0.75 * b[name], atol=1e-6)
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "**linear**" in card and f"| `{family['a']}` | weight=0.25 |" in card


def test_slerp_follows_the_great_circle(family: dict[str, str], tmp_path: Path) -> None:
    t = 0.3
    merged = _merge(
        tmp_path,
        {
            "merge_method": "slerp",
            "base_model": family["a"],
            "models": [{"model": family["a"]}, {"model": family["b"]}],
            "parameters": {"t": t},
        },
    )
    v0, v1 = _weights(family["a"])[TENSOR].double(), _weights(family["b"])[TENSOR].double()
    cos = (v0.flatten() / v0.norm()) @ (v1.flatten() / v1.norm())
    omega = torch.arccos(cos)
    expected = (torch.sin((1 - t) * omega) * v0 + torch.sin(t * omega) * v1) / torch.sin(omega)
    assert 0.05 < omega < 3.0  # not the near-parallel case mergekit interpolates linearly
    assert torch.allclose(merged[TENSOR].double(), expected, atol=1e-5)


def test_ties_elects_a_sign_and_averages_the_agreeing_task_vectors(
    family: dict[str, str], tmp_path: Path
) -> None:
    density = 0.5
    merged = _merge(
        tmp_path,
        {
            "merge_method": "ties",
            "base_model": family["base"],
            "models": [
                {"model": family["a"], "parameters": {"weight": 1.0, "density": density}},
                {"model": family["b"], "parameters": {"weight": 1.0, "density": density}},
            ],
        },
    )
    base = _weights(family["base"])[TENSOR]
    taus = []
    for name in ("a", "b"):
        tau = _weights(family[name])[TENSOR] - base
        k = int(density * tau.numel())  # trim: keep the top-k magnitudes of each task vector
        threshold = tau.abs().flatten().kthvalue(tau.numel() - k).values
        taus.append(torch.where(tau.abs() > threshold, tau, torch.zeros_like(tau)))
    stacked = torch.stack(taus)
    sign = torch.sign(stacked.sum(0))  # elect: the sign of the summed mass
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    mean = (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)  # disjoint mean
    assert torch.allclose(merged[TENSOR], base + mean, atol=1e-6)


def test_dare_drops_and_rescales(family: dict[str, str], tmp_path: Path) -> None:
    merged = _merge(
        tmp_path,
        {
            "merge_method": "dare_linear",
            "base_model": family["base"],
            "models": [{"model": family["a"], "parameters": {"weight": 1.0, "density": 0.5}}],
        },
    )
    base, tau = (
        _weights(family["base"])[TENSOR],
        _weights(family["a"])[TENSOR] - _weights(family["base"])[TENSOR],
    )
    delta = merged[TENSOR] - base
    kept = delta.abs() > 1e-8
    assert 0.45 < kept.float().mean().item() < 0.55  # half dropped
    # the kept rescaled: the paper's 1 / density in expectation; mergekit rescales each task vector to keep its
    # L1 norm, which is 1 / (the share kept, weighted by magnitude)
    scale = tau.abs().sum() / tau[kept].abs().sum()
    assert 1.9 < scale.item() < 2.1
    assert torch.allclose(delta[kept], tau[kept] * scale, atol=1e-6)


def test_lora_adapters_merge_as_their_merged_models(family: dict[str, str], tmp_path: Path) -> None:
    """Two LoRA adapters on the base, averaged: the result is the mean of the two merged models."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    merged_models = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(family["base"]),
            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        )
        model.save_pretrained(tmp_path / f"lora{seed}")
        merged_models.append(model.merge_and_unload().state_dict())
    out = _merge(
        tmp_path,
        {
            "merge_method": "linear",
            "models": [
                {"model": str(tmp_path / "lora1"), "parameters": {"weight": 0.5}},
                {"model": str(tmp_path / "lora2"), "parameters": {"weight": 0.5}},
            ],
        },
    )
    name = "model.layers.1.self_attn.q_proj.weight"
    expected = 0.5 * merged_models[0][name] + 0.5 * merged_models[1][name]
    assert torch.allclose(out[name], expected, atol=1e-5)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["architectures"] == [
        "LlamaForCausalLM"
    ]


def test_merge_config_errors(family: dict[str, str], tmp_path: Path) -> None:
    from alignkit import api

    with pytest.raises(UserError, match="no output folder"):
        api.merge({"merge_method": "linear", "models": [{"model": family["a"]}]})
    with pytest.raises(UserError, match=r"models\[1\].model: there is no model folder"):
        api.merge(
            {"merge_method": "linear", "models": [{"model": family["a"]}, {"model": "./nope"}]}, output="x"
        )
    with pytest.raises(UserError, match="`models` must list the models"):
        api.merge({"merge_method": "linear"}, output=str(tmp_path / "o"))
    with pytest.raises(UserError, match="merge_method"):
        api.merge(
            {"merge_method": "averagez", "models": [{"model": family["a"]}]}, output=str(tmp_path / "o")
        )
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_two_real_lora_adapters_merge_load_and_answer(smollm2: str, tmp_path: Path) -> None:
    """The real model (SmolLM2-135M-Instruct): two different LoRA adapters on it, averaged by `alignkit merge`.
    Each merged tensor is the mean of the two peft merges; the merged folder loads through alignkit with the
    base's tokenizer and chat template and still answers as the model does."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from alignkit.modeling.load import load_causal_lm

    name, expected = "model.layers.3.self_attn.q_proj.weight", []
    for seed in (1, 2):
        torch.manual_seed(seed)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32), lora)
        with torch.no_grad():  # a small update, as a short fine-tune makes
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.mul_(0.01)
        model.save_pretrained(tmp_path / f"lora{seed}")
        expected.append(model.merge_and_unload().state_dict()[name])
    assert not torch.allclose(expected[0], expected[1], atol=1e-4)  # the two fine-tunes differ
    models = [{"model": str(tmp_path / f"lora{s}"), "parameters": {"weight": 0.5}} for s in (1, 2)]
    merged = _merge(tmp_path, {"merge_method": "linear", "models": models})
    assert torch.allclose(merged[name], (expected[0] + expected[1]) / 2, atol=1e-5)
    model, tok = load_causal_lm(str(tmp_path / "merged"))
    question = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(question, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert tok.decode(ids["input_ids"][0]).endswith("<|im_start|>assistant\n")
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
