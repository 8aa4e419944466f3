"""`alignkit export`: the merged folder loads in plain transformers with the unmerged model's logits, the
adapter is in the weights, shards / dtype / legacy .bin, LLaMA-Factory's merge YAML, the model card, the
bitsandbytes quantization and its agreement figures, and every user mistake as one message with exit 2."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from alignkit.cli import main

TARGETS = ["q_proj", "v_proj", "up_proj"]
EVAL_METRICS = {
    "accuracy": {"value": 0.75, "ci95": [0.6, 0.85], "n": 40},
    "length": {"value": 12.5, "ci95": [11.0, 14.0], "n": 40},
}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny Llama with the usual init (0.02): its greedy answers are stable enough to compare int8 with."""
    from alignkit.modeling.tiny import build_tiny

    return build_tiny(str(tmp_path_factory.mktemp("export_base") / "model"), hidden_size=64, layers=2, seed=0)


@pytest.fixture(scope="module")
def adapter(base: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A LoRA adapter that is not a no-op (B random), laid out as an alignkit run leaves it: weights,
    tokenizer and config.yaml in output_dir, plus an eval.json written beside them."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.config import build_config, save_config

    out = tmp_path_factory.mktemp("export_adapter") / "dpo-lora"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(base).save_pretrained(str(out))
    data = ["data/pairs.jsonl", "HuggingFaceH4/ultrafeedback_binarized"]
    keys = {"stage": "dpo", "model_name_or_path": base, "dataset": data, "finetuning_type": "lora"}
    save_config(build_config({**keys, "output_dir": str(out)}), str(out / "config.yaml"))
    report = {"model": str(out), "baseline": None, "dataset": "data/test.jsonl", "n_prompts": 40}
    report.update(metrics=EVAL_METRICS, baseline_metrics=None)
    (out / "eval.json").write_text(json.dumps(report))
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == base
    return str(out)


def _export(argv: list[str]) -> str:
    """Run `alignkit export ARGV` through the CLI; its stdout (it must exit 0)."""
    buffer = io.StringIO()
    with pytest.raises(SystemExit) as info, contextlib.redirect_stdout(buffer):
        main(["export", *argv])
    assert info.value.code == 0, buffer.getvalue()
    return buffer.getvalue()


def _fails(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["export", *argv])
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert err.startswith("alignkit: error:") and "Traceback" not in err
    return err


def _figure(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"no `{pattern}` in:\n{text}"
    return float(match.group(1))


@pytest.fixture(scope="module")
def fp32_export(adapter: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(folder, stdout) of a float32 export with the base read from the adapter (no --model)."""
    out = str(tmp_path_factory.mktemp("export_fp32") / "merged")
    return out, _export(["--adapter", adapter, "--output", out, "--dtype", "fp32"])


PLAIN_LOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
tok = AutoTokenizer.from_pretrained(sys.argv[1])
ids = tok.apply_chat_template([{"role": "user", "content": "Name a colour."}], add_generation_prompt=True,
                              return_dict=True)["input_ids"]
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0]
print(json.dumps({"ids": list(ids), "logits": logits.tolist(), "dtype": str(model.dtype),
                  "alignkit": any(m.startswith("alignkit") for m in sys.modules)}))
"""


@pytest.mark.slow
def test_merged_folder_loads_in_plain_transformers_with_the_adapters_logits(
    fp32_export: tuple[str, str], adapter: str, base: str
) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out, stdout = fp32_export
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_LOAD, out], capture_output=True, text=True, env=env, cwd="/", timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    plain = json.loads(proc.stdout.strip().splitlines()[-1])
    assert plain["alignkit"] is False and plain["dtype"] == "torch.float32"
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    with torch.no_grad():
        expected = peft_model(torch.tensor([plain["ids"]])).logits[0]
        with peft_model.disable_adapter():
            base_logits = peft_model(torch.tensor([plain["ids"]])).logits[0]
    got = torch.tensor(plain["logits"])
    assert (got - expected).abs().max().item() < 1e-5
    assert (base_logits - expected).abs().max().item() > 0.1  # the adapter is not a no-op
    merged, original = (
        load_file(os.path.join(out, "model.safetensors")),
        load_file(os.path.join(base, "model.safetensors")),
    )
    name = "model.layers.0.self_attn.{}.weight"
    assert not torch.equal(merged[name.format("q_proj")], original[name.format("q_proj")])  # adapted
    assert torch.equal(merged[name.format("k_proj")], original[name.format("k_proj")])  # not a LoRA target
    assert {"tokenizer.json", "generation_config.json", "README.md"} <= set(os.listdir(out))
    assert os.path.isfile(os.path.join(out, "chat_template.jinja"))
    reported = _figure(r"largest \|logit difference\|[^:]*: ([0-9.e+-]+)", stdout)
    assert 0 <= reported < 1e-4 and f"exported to {out}" in stdout


def test_model_card_front_matter_config_and_eval_table(fp32_export: tuple[str, str], base: str) -> None:
    out, _ = fp32_export
    card = Path(out, "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["base_model"] == base and meta["library_name"] == "transformers"
    assert {"alignkit", "dpo", "sigmoid", "lora"} <= set(meta["tags"])
    assert meta["datasets"] == ["HuggingFaceH4/ultrafeedback_binarized"]  # the local file is not a hub id
    assert "- stage: `dpo`, method `sigmoid`" in body
    assert "`data/pairs.jsonl`" in body and "beta: 0.1" in body  # data files and the resolved config
    assert "| accuracy | 0.750 | 0.600-0.850 | 40 |" in body
    assert "| length | 12.500 | 11.000-14.000 | 40 |" in body
    assert "LoRA: r 4, alpha 8, target modules q_proj, up_proj, v_proj" in body


def test_bf16_shards_on_disk(adapter: str, base: str, tmp_path: Path) -> None:
    from safetensors import safe_open

    out = tmp_path / "bf16"
    stdout = _export(
        ["--model", base, "--adapter", adapter, "--output", str(out), "--dtype", "bf16"]
        + ["--shard-size", "0.0001"]
    )
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) >= 3 and (out / "model.safetensors.index.json").is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    for shard in shards:
        with safe_open(str(out / shard), "pt") as fh:
            assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {"BF16"}
    diff = _figure(r"largest \|logit difference\|[^:]*: ([0-9.e+-]+)", stdout)
    tolerance = _figure(r"\(tolerance ([0-9.e+-]+)", stdout)
    assert 1e-4 < diff < tolerance  # bf16 rounding shows, within the bf16 tolerance


def test_llamafactory_merge_yaml(adapter: str, base: str, tmp_path: Path) -> None:
    config = {
        "model_name_or_path": base,
        "adapter_name_or_path": adapter,
        "template": "llama3",
        "finetuning_type": "lora",
        "trust_remote_code": False,
        "infer_dtype": "float32",
        "export_dir": str(tmp_path / "from_yaml"),
        "export_size": 0.0002,
        "export_device": "cpu",
        "export_legacy_format": True,
    }
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    _export([str(path), "--dtype", "bf16"])  # the flag wins over infer_dtype
    out = tmp_path / "from_yaml"
    bins = sorted(out.glob("pytorch_model-*.bin"))
    assert len(bins) >= 2 and (out / "pytorch_model.bin.index.json").is_file()  # export_size in GB
    assert not list(out.glob("*.safetensors"))  # export_legacy_format: true
    weights = torch.load(bins[0], weights_only=True)
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert "template (LLaMA-Factory name): `llama3`" in (out / "README.md").read_text()
    elsewhere = tmp_path / "flag_output"
    _export([str(path), "--output", str(elsewhere)])  # --output wins over export_dir
    assert (elsewhere / "config.json").is_file() and len(list(out.iterdir())) > 0


def test_a_full_model_without_adapter_is_resharded(base: str, tmp_path: Path) -> None:
    """LLaMA-Factory's full-model form (no adapter_name_or_path): re-saved, checked, nothing merged."""
    path = tmp_path / "full.yaml"
    out = tmp_path / "resaved"
    path.write_text(
        yaml.safe_dump({"model_name_or_path": base, "export_dir": str(out), "export_size": 0.0001})
    )
    stdout = _export([str(path)])
    assert len(list(out.glob("model-*.safetensors"))) >= 3
    assert _figure(r"largest \|logit difference\|[^:]*: ([0-9.e+-]+)", stdout) < 1e-5
    assert f"a re-save of `{base}`" in (out / "README.md").read_text()


def test_every_unknown_key_in_one_message(
    adapter: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = {
        "model_name_or_path": "x/y",
        "adapter_name_or_pth": adapter,
        "export_dri": str(tmp_path / "out"),
        "export_sise": 2,
        "lora_rank": 8,
        "export_hub_model_id": "me/model",
    }
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    err = _fails(capsys, [str(path)])
    assert "5 key(s)" in err
    assert "`adapter_name_or_pth` (did you mean `adapter_name_or_path`?)" in err
    assert "`export_dri` (did you mean `export_dir`?)" in err
    assert "`export_sise` (did you mean `export_size`?)" in err
    assert "unknown key `lora_rank`" in err and "`export_hub_model_id`: alignkit does not upload" in err
    assert not (tmp_path / "out").exists()


def test_quantize_int8_and_int4_agree_with_the_full_model(adapter: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    floors = {"int8": 0.75, "int4": 0.25}  # measured 0.875-1.0 (int8) and 0.5 (int4) exact-match rates
    for mode, floor in floors.items():
        out = tmp_path / mode
        stdout = _export(["--adapter", adapter, "--output", str(out), "--quantize", mode])
        exact = _figure(r"exactly on ([0-9.]+) of them", stdout)
        tokens = _figure(r"token agreement ([0-9.]+)", stdout)
        assert floor <= exact <= 1 and exact <= tokens <= 1
        config = json.loads((out / "config.json").read_text())["quantization_config"]
        assert config["load_in_8bit" if mode == "int8" else "load_in_4bit"] is True
        model = AutoModelForCausalLM.from_pretrained(str(out), device_map={"": "cpu"})
        layer = type(model.model.layers[0].self_attn.q_proj).__name__
        assert layer == ("Linear8bitLt" if mode == "int8" else "Linear4bit")
        card = (out / "README.md").read_text()
        assert "needs `bitsandbytes`" in card and f"exact match {exact:.3f}" in card
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export-full-")]  # the full copy is gone


def test_agreement_counts_positions_up_to_the_longer_answer() -> None:
    from alignkit.ship.export.card import agreement

    exact, tokens = agreement([[1, 2, 3], [4, 5], [7]], [[1, 2, 3], [4, 6, 9], [7]])
    assert exact == pytest.approx(2 / 3) and tokens == pytest.approx(5 / 7)


def _broken_adapter(adapter: str, tmp_path: Path) -> str:
    import shutil

    broken = tmp_path / "broken-adapter"
    shutil.copytree(adapter, broken)
    config = json.loads((broken / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone" / "base")
    (broken / "adapter_config.json").write_text(json.dumps(config))
    return str(broken)


def test_user_mistakes_exit_2_and_write_nothing(
    adapter: str, base: str, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    to = ["--output", str(out)]
    err = _fails(capsys, ["--adapter", str(tmp_path / "nope"), *to])
    assert "--adapter" in err and "does not exist" in err
    err = _fails(capsys, ["--adapter", _broken_adapter(adapter, tmp_path), *to])
    assert "gone/base" in err and "--model" in err and "base_model_name_or_path" in err
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    err = _fails(capsys, ["--adapter", adapter, "--output", str(taken)])
    assert "--output" in err and "not empty" in err
    assert os.listdir(taken) == ["keep.txt"] and (taken / "keep.txt").read_text() == "mine"
    err = _fails(capsys, ["--adapter", adapter, *to, "--device", "cuda"])
    assert "--device" in err and "no CUDA GPU" in err
    linear = torch.nn.functional.linear

    def no_half(x: torch.Tensor, w: torch.Tensor, *rest: object) -> torch.Tensor:
        if x.dtype == torch.float16:  # what a CPU without half kernels raises
            raise RuntimeError("\"addmm_impl_cpu_\" not implemented for 'Half'")
        return linear(x, w, *rest)

    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.functional, "linear", no_half)
        err = _fails(capsys, ["--adapter", adapter, *to, "--dtype", "fp16"])
    assert "--dtype" in err and "fp16 does not run on cpu" in err
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
        err = _fails(capsys, ["--adapter", adapter, *to, "--quantize", "int8"])
    assert "pip install 'alignkit[quantize]'" in err and "--quantize" in err
    assert not out.exists()


def test_an_unfaithful_merge_is_refused_and_left_for_inspection(
    adapter: str, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from peft.tuners.lora import LoraModel

    monkeypatch.setattr(LoraModel, "merge_and_unload", lambda self, **_: self.unload())  # drops the adapter
    out = tmp_path / "unfaithful"
    err = _fails(capsys, ["--adapter", adapter, "--output", str(out), "--dtype", "fp32"])
    assert "not faithful" in err and "the merge (float32)" in err and "left for inspection" in err
    assert (out / "config.json").is_file()
