"""GGUF in: a `.gguf` file wherever a model is asked for, on the real model (SmolLM2-135M-Instruct's Q4_1 GGUF
from PyPI). The converted folder holds exactly what transformers' GGUF reader gives (same logits), keeps the chat
template and answers as the real model does; SFT LoRA from the file's path, then DPO from that adapter (ln 2 at
the start), and `serve` from the file through the openai client; bad paths are clear errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from alignkit.errors import UserError
from alignkit.modeling.gguf import gguf_file


@pytest.fixture
def gguf_cache(smollm2_cache: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The cache the session's `smollm2` conversion went to: a load from the GGUF path reuses it."""
    monkeypatch.setenv("ALIGNKIT_CACHE_DIR", smollm2_cache)
    return smollm2_cache


@pytest.mark.slow
def test_a_gguf_file_loads_as_transformers_reads_it_and_answers(
    smollm2_gguf: str, smollm2: str, gguf_cache: str
) -> None:
    from transformers import AutoModelForCausalLM

    from alignkit.modeling.load import load_causal_lm
    from alignkit.modeling.resolve import check_model_path, resolve_model, weights_path

    check_model_path(smollm2_gguf)  # a GGUF file is a model path
    assert resolve_model(smollm2_gguf).base == weights_path(smollm2_gguf) == smollm2
    model, tok = load_causal_lm(smollm2_gguf)
    directory, name = Path(smollm2_gguf).parent, Path(smollm2_gguf).name
    read = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        ours, theirs = model(**ids).logits, read(**ids).logits
    assert torch.equal(ours, theirs)  # the converted folder is the reader's model, bit for bit
    prompt = tok.decode(ids["input_ids"][0])
    assert prompt.endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.slow
def test_sft_lora_from_a_gguf_path(
    smollm2_gguf: str, gguf_cache: str, shared_data: Path, tmp_path: Path
) -> None:
    """`model_name_or_path: model.gguf` trains: a LoRA SFT on LLaMA-Factory's alpaca_en_demo starts at a real
    instruct model's loss (not ln |V| = 10.8 of a random one) and falls; the adapter names the converted base."""
    from alignkit import api

    result = api.train(
        {
            "stage": "sft",
            "model_name_or_path": smollm2_gguf,
            "dataset": str(shared_data / "llamafactory" / "alpaca_en_demo.json"),
            "finetuning_type": "lora",
            "max_samples": 8,
            "max_length": 128,
            "per_device_train_batch_size": 2,
            "max_steps": 4,
            "learning_rate": 2e-3,
            "logging_steps": 1,
            "output_dir": str(tmp_path / "out"),
            "disable_tqdm": True,
            "plot_loss": False,
        }
    )
    losses = [
        json.loads(line)["loss"] for line in open(tmp_path / "out" / "metrics.jsonl") if '"loss"' in line
    ]
    assert 0.5 < losses[0] < 4.0, losses
    assert sum(losses[-2:]) / 2 < losses[0], losses
    base = json.loads((tmp_path / "out" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base, "config.json").is_file() and result.output_dir == str(tmp_path / "out")
    # DPO from that adapter (policy and reference both the SFT model): the first loss is ln 2, margins 0
    api.train(
        {
            "stage": "dpo",
            "model_name_or_path": str(tmp_path / "out"),
            "dataset": str(shared_data / "llamafactory" / "dpo_en_demo.json"),
            "finetuning_type": "lora",
            "max_samples": 2,
            "max_length": 128,
            "per_device_train_batch_size": 2,
            "max_steps": 1,
            "logging_steps": 1,
            "output_dir": str(tmp_path / "dpo"),
            "disable_tqdm": True,
            "plot_loss": False,
        }
    )
    first = json.loads(open(tmp_path / "dpo" / "metrics.jsonl").readline())
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4) and abs(first["rewards/margins"]) < 1e-4


@pytest.mark.slow
def test_serve_answers_from_a_gguf_file_through_the_openai_client(smollm2_gguf: str, gguf_cache: str) -> None:
    from openai import OpenAI

    import alignkit

    with alignkit.serve(smollm2_gguf, port=0, served_model_name="smol") as server:
        client = OpenAI(base_url=server.url, api_key="none")
        reply = client.chat.completions.create(
            model="smol",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=12,
            temperature=0,
        )
    assert "Paris" in reply.choices[0].message.content


def test_gguf_paths_that_are_not_one_file(tmp_path: Path) -> None:
    from alignkit.modeling.resolve import check_model_path

    with pytest.raises(UserError, match="there is no GGUF file"):
        check_model_path(str(tmp_path / "missing.gguf"))
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    assert gguf_file(str(tmp_path)) == str(tmp_path / "a.gguf")  # a folder holding one GGUF is that file
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(
        UserError, match=r"holds 2 GGUF files \(a.gguf, b.gguf\); give the path of one of them"
    ):
        check_model_path(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert gguf_file(str(tmp_path)) is None  # a Hugging Face folder stays one


@pytest.mark.slow
def test_the_real_chat_template_renders_as_llamafactorys_chatml(smollm2: str) -> None:
    """SmolLM2's own template (from its GGUF) and LLaMA-Factory's `chatml` (`template: chatml`) give the same text
    and the same ids for a multi-turn conversation with a system prompt, and both mask the same assistant tokens;
    `<|im_end|>` is the tokenizer's end-of-turn special token, not text split into pieces."""
    from transformers import AutoTokenizer

    from alignkit.modeling.chat_templates import set_chat_template

    own = AutoTokenizer.from_pretrained(smollm2)
    factory = AutoTokenizer.from_pretrained(smollm2)
    set_chat_template(factory, "chatml")
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "And 4 + 4?"},
        {"role": "assistant", "content": "8"},
    ]
    text = own.apply_chat_template(messages, tokenize=False)
    assert factory.apply_chat_template(messages, tokenize=False) == text
    assert text.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?")
    prompt = messages[:4]
    assert factory.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) == (
        own.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    )
    ids = own.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert factory.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"] == ids
    end = own.convert_tokens_to_ids("<|im_end|>")
    assert end == own.eos_token_id and ids.count(end) == 5  # one special token per turn
    mask = factory.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )["assistant_masks"]
    trained = own.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "5<|im_end|>8<|im_end|>"


@pytest.mark.slow
def test_the_console_reads_and_chats_with_a_gguf_file(
    smollm2_gguf: str, gguf_cache: str, tmp_path: Path
) -> None:
    """The console, given a `.gguf` file in its workspace: the model card reads the real architecture and size
    from the converted folder, and its chat answers through the file."""
    import os

    from fastapi.testclient import TestClient

    from alignkit.console.app import ConsoleSettings, build_app

    models = tmp_path / "ws" / "models"
    models.mkdir(parents=True)
    try:  # the file, in the workspace (a symbolic link out of it would be refused)
        os.link(smollm2_gguf, models / "smol.gguf")
    except OSError:
        import shutil

        shutil.copy(smollm2_gguf, models / "smol.gguf")
    client = TestClient(
        build_app(ConsoleSettings(workspace=str(tmp_path / "ws"))), base_url="http://127.0.0.1"
    )
    info = client.post("/api/model", json={"path": "models/smol.gguf"}).json()
    assert info["architecture"] == "LlamaForCausalLM" and info["chat_template"] is True
    assert 134e6 < info["parameters"] < 136e6 and info["layers"] == 30 and info["vocab_size"] == 49152
    question = [{"role": "user", "content": "What is the capital of France?"}]
    chat = {"model": "models/smol.gguf", "messages": question, "temperature": 0, "max_new_tokens": 12}
    lines = [json.loads(line) for line in client.post("/api/chat", json=chat).text.splitlines()]
    assert lines[-1].get("done") is True, lines[-1]
    assert (
        "Paris" in lines[-1]["text"] and "".join(line.get("delta", "") for line in lines) == lines[-1]["text"]
    )
