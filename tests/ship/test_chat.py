"""`alignkit chat`: the real command driven through stdin on the tiny model, its answers checked against
`rollout.complete` on the same messages; the conversation state, the YAML keys and the errors in process."""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from alignkit.cli import main
from alignkit.cli.main import build_parser
from alignkit.errors import UserError
from alignkit.ship.chat import (
    GIVEN,
    ChatSettings,
    Conversation,
    chat_settings,
    check_chat_template,
    load_chat_model,
    run_chat,
    run_terminal_chat,
    stream_answer,
)

HELLO = [{"role": "user", "content": "hello"}]


def _settings(args: argparse.Namespace) -> ChatSettings:
    """The settings `alignkit chat ARGS` resolves (flags over the YAML over the defaults)."""
    return chat_settings(args.config, **{key: getattr(args, key, None) for key in GIVEN})


def _chat(args: argparse.Namespace) -> int:
    return run_terminal_chat(args.config, **{key: getattr(args, key, None) for key in GIVEN})


def chat(*args: str, stdin: str) -> tuple[int, str, str]:
    """Run `alignkit chat ARGS` with `stdin` piped in; (exit code, stdout, stderr). Bytes are decoded by hand:
    text mode would turn a `\\r` the model drew into `\\n`."""
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    done = subprocess.run(
        [sys.executable, "-m", "alignkit", "chat", *args],
        input=stdin.encode(),
        capture_output=True,
        timeout=180,
        env=env,
    )
    return done.returncode, done.stdout.decode("utf-8"), done.stderr.decode("utf-8")


def answers(stdout: str) -> list[str]:
    """Each answer: what follows `Assistant: ` up to the newline and the next `User: ` prompt."""
    return [part.split("\nUser: ")[0] for part in stdout.split("Assistant: ")[1:]]


def greedy(model: Any, tokenizer: Any, messages: list[dict], max_new_tokens: int) -> str:
    from alignkit.generation.rollout import complete

    return complete(model, tokenizer, [messages], temperature=0.0, max_new_tokens=max_new_tokens).texts[0]


@pytest.fixture(scope="module")
def base(tiny_model: str) -> tuple[Any, Any]:
    from alignkit.modeling.load import load_causal_lm

    return load_causal_lm(tiny_model)


@pytest.fixture(scope="module")
def adapter(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A LoRA adapter with random (not zero) B matrices, so it changes the answers; its base is the tiny model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = LoraConfig(r=4, init_lora_weights=False, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), config)
    model.peft_config["default"].base_model_name_or_path = tiny_model
    out = str(tmp_path_factory.mktemp("chat_lora") / "adapter")
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def with_adapter(adapter: str) -> tuple[Any, Any]:
    from alignkit.modeling.load import load_causal_lm

    return load_causal_lm(adapter)  # the adapter folder as the model: its base read from adapter_config.json


@pytest.mark.slow
def test_chat_streams_greedy_answers_and_keeps_history_system_and_reset(tiny_model: str, base: tuple) -> None:
    stdin = "hello\n/system be brief\nhi again\n/reset\nhi\n/exit\n"
    code, out, err = chat("--model", tiny_model, "--temperature", "0", "--max-new-tokens", "8", stdin=stdin)
    assert code == 0, err
    first = greedy(*base, HELLO, 8)
    system = {"role": "system", "content": "be brief"}
    history = [
        system,
        *HELLO,
        {"role": "assistant", "content": first},
        {"role": "user", "content": "hi again"},
    ]
    second = greedy(*base, history, 8)
    third = greedy(*base, [system, {"role": "user", "content": "hi"}], 8)
    assert first and answers(out) == [first, second, third]
    # the checks above can tell: without the history (or with it kept after /reset) the answers differ
    assert second != greedy(*base, [system, {"role": "user", "content": "hi again"}], 8)
    assert third != greedy(
        *base, [*history, {"role": "assistant", "content": second}, {"role": "user", "content": "hi"}], 8
    )
    assert "(system prompt set)" in out and "(history cleared)" in out
    assert out.startswith(f"alignkit chat: {tiny_model} on cpu (greedy);")


def test_run_chat_builds_the_messages_of_each_turn() -> None:
    """The conversation state through the loop with a recording model: history, /system, /reset, errors."""
    lines = iter(
        ["hello", "/system", "/system be brief", "  ", "hi again", "/bogus", "/reset", "hi", "stop me"]
    )
    seen: list[list[dict]] = []
    written: list[str] = []

    def read(prompt: str) -> str:
        written.append(prompt)
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    def reply(messages: list[dict]) -> str:
        seen.append(messages)
        if messages[-1]["content"] == "stop me":
            raise KeyboardInterrupt
        return f"answer {len(seen)}"

    conversation = Conversation()
    assert run_chat(conversation, reply, read, written.append) == 0  # EOF ends the chat cleanly
    system = {"role": "system", "content": "be brief"}
    assert seen == [
        [{"role": "user", "content": "hello"}],
        [
            system,
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "answer 1"},
            {"role": "user", "content": "hi again"},
        ],
        [system, {"role": "user", "content": "hi"}],
        [
            system,
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "answer 3"},
            {"role": "user", "content": "stop me"},
        ],
    ]
    text = "".join(written)
    assert "(/system needs the prompt's text" in text  # printed in the chat, which goes on
    assert "(unknown command /bogus;" in text
    assert "[stopped]" in text  # Ctrl-C during an answer: that answer is dropped, not kept in the history
    assert conversation.history[-1] == {"role": "assistant", "content": "answer 3"}
    assert conversation.messages("x")[0] == system


def test_stream_answer_writes_tokens_as_they_come(base: tuple) -> None:
    settings = ChatSettings(model="tiny", temperature=0.0, max_new_tokens=12)
    chunks: list[str] = []
    samples = stream_answer(*base, HELLO, settings, chunks.append)
    assert len(chunks) > 1  # piece by piece, not the whole answer at the end
    assert "".join(chunks) == samples.texts[0] == greedy(*base, HELLO, 12)


@pytest.mark.slow
def test_llama_factory_yaml_with_adapter_and_generating_keys(
    tiny_model: str, adapter: str, base: tuple, with_adapter: tuple, tmp_path: Path
) -> None:
    keys = {
        "model_name_or_path": tiny_model,
        "adapter_name_or_path": adapter,
        "template": "qwen",
        "infer_backend": "huggingface",
        "finetuning_type": "lora",
        "infer_dtype": "float32",
        "trust_remote_code": False,
        "do_sample": False,
        "max_new_tokens": 6,
        "default_system": "You are terse.",
    }
    config = tmp_path / "llama3_lora_sft.yaml"
    config.write_text(yaml.safe_dump(keys))
    code, out, err = chat(str(config), stdin="hello\n")  # no /exit: the end of input ends the chat
    assert code == 0, err
    messages = [{"role": "system", "content": "You are terse."}, *HELLO]
    expected = greedy(*with_adapter, messages, 6)
    assert answers(out) == [expected]
    assert expected != greedy(*base, messages, 6)  # the adapter was applied
    assert "template: qwen: the tokenizer's own chat template is used" in err


def run_main(
    args: list[str], stdin: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> tuple:
    """The command in this process (cheaper than a subprocess): `cli.main` with stdin replaced; (code, out, err)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_adapter_flag_changes_the_answer(
    tiny_model: str,
    adapter: str,
    base: tuple,
    with_adapter: tuple,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    args = [
        "chat",
        "--model",
        tiny_model,
        "--adapter",
        adapter,
        "--temperature",
        "0",
        "--max-new-tokens",
        "8",
    ]
    code, out, err = run_main(args, "hello\n/exit\n", monkeypatch, capsys)
    assert code == 0, err
    assert answers(out) == [greedy(*with_adapter, HELLO, 8)] != [greedy(*base, HELLO, 8)]
    assert f"{tiny_model} + adapter {adapter} on cpu (greedy)" in out


def test_missing_model_is_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    code, out, err = run_main(["chat", "--model", str(tmp_path / "nope")], "hello\n", monkeypatch, capsys)
    assert code == 2
    assert err.splitlines() == [
        f"alignkit: error: there is no model folder {tmp_path / 'nope'}; give a local model folder or a hub id "
        "such as `Qwen/Qwen2.5-0.5B-Instruct`"
    ]
    assert "Traceback" not in err and "Assistant" not in out


def test_unknown_yaml_keys_are_all_named_at_once(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "chat.yaml"
    config.write_text("model_name_or_path: m\ntemprature: 0.5\ntop_q: 0.9\nrepetition_penalty: 1.1\nzzz: 1\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["chat", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"alignkit: error: {config}: unknown keys ")
    assert "`temprature` (did you mean `temperature`?)" in err
    assert "`top_q` (did you mean `top_p`?)" in err
    assert "`repetition_penalty` (a LLaMA-Factory key alignkit chat does not use" in err
    assert "`zzz`; alignkit chat reads: model_name_or_path," in err


def test_flags_win_over_the_yaml(tmp_path: Path) -> None:
    config = tmp_path / "chat.yaml"
    keys = {
        "model_name_or_path": "m",
        "default_system": "Y",
        "max_new_tokens": 6,
        "temperature": 0.9,
        "top_p": 0.5,
    }
    config.write_text(yaml.safe_dump({**keys, "top_k": 20}))
    from_yaml = _settings(build_parser().parse_args(["chat", str(config)]))
    assert (from_yaml.model, from_yaml.system, from_yaml.max_new_tokens) == ("m", "Y", 6)
    assert (from_yaml.temperature, from_yaml.top_p, from_yaml.top_k) == (0.9, 0.5, 20)
    flags = ["--model", "n", "--system", "X", "--max-new-tokens", "3", "--temperature", "0.2"]
    mixed = _settings(build_parser().parse_args(["chat", str(config), *flags]))
    assert (mixed.model, mixed.system, mixed.max_new_tokens, mixed.temperature) == ("n", "X", 3, 0.2)
    assert mixed.top_p == 0.5  # no --top-p: the YAML's
    config.write_text(yaml.safe_dump({**keys, "do_sample": False}))
    assert _settings(build_parser().parse_args(["chat", str(config)])).temperature == 0.0
    defaults = _settings(build_parser().parse_args(["chat", "--model", "m"]))
    assert (defaults.max_new_tokens, defaults.temperature, defaults.top_p, defaults.system) == (
        512,
        0.7,
        0.9,
        None,
    )


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"infer_backend": "sglang"}, "`infer_backend: sglang` is not supported by alignkit chat"),
        ({"infer_backend": "vlm"}, "(did you mean `vllm`?)"),
        ({"adapter_name_or_path": "a", "finetuning_type": "full"}, "`finetuning_type: full` has no adapter"),
        ({"infer_dtype": "fp8"}, "`infer_dtype: fp8`: choose one of auto"),
        ({"model_name_or_path": ""}, "no model to chat with: give --model DIR or `model_name_or_path:`"),
    ],
)
def test_bad_yaml_values(tmp_path: Path, keys: dict, message: str) -> None:
    config = tmp_path / "chat.yaml"
    config.write_text(yaml.safe_dump({"model_name_or_path": "m", **keys}))
    with pytest.raises(UserError) as error:
        _settings(build_parser().parse_args(["chat", str(config)]))
    assert message in str(error.value)


def test_vllm_backend_without_vllm_names_the_extra(tiny_model: str, tmp_path: Path) -> None:
    try:
        import vllm  # noqa: F401

        pytest.skip("vLLM is installed here")
    except ImportError:
        pass
    config = tmp_path / "chat.yaml"
    config.write_text(yaml.safe_dump({"model_name_or_path": tiny_model, "infer_backend": "vllm"}))
    with pytest.raises(UserError) as error:
        _chat(build_parser().parse_args(["chat", str(config)]))
    assert "pip install 'alignkit[vllm]'" in str(error.value)


def test_no_chat_template_names_the_template_key() -> None:
    class NoTemplate:
        chat_template = None

    settings = ChatSettings(model="models/base", template="llama3")
    with pytest.raises(UserError) as error:
        check_chat_template(NoTemplate(), settings, "chat.yaml")
    assert "--model models/base: its tokenizer has no chat template" in str(error.value)
    assert "`template: llama3` in chat.yaml" in str(error.value)


def test_adapter_folder_as_model_and_bad_adapters(tiny_model: str, adapter: str, with_adapter: tuple) -> None:
    model, tokenizer = load_chat_model(ChatSettings(model=adapter))
    assert greedy(model, tokenizer, HELLO, 8) == greedy(*with_adapter, HELLO, 8)
    with pytest.raises(UserError, match="no adapter_config.json"):
        load_chat_model(ChatSettings(model=tiny_model, adapter=tiny_model))
    with pytest.raises(UserError, match="is itself a LoRA adapter"):
        load_chat_model(ChatSettings(model=adapter, adapter=adapter))
