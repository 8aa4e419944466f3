"""LLaMA-Factory's template names as chat templates: the expected texts are written from the slots in
LLaMA-Factory's data/template.py and tool_utils.py (format_user / format_assistant / format_system /
format_observation / default_system / tool formats), not from alignkit's code."""

from __future__ import annotations

import copy
import json
import logging
from datetime import datetime

import pytest

from alignkit.errors import UserError
from alignkit.modeling.chat_templates import TEMPLATES, require_chat_template, set_chat_template

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]

_IM = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
_IM_PROMPT = _IM + "Hello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
_THINK = "<think>\n\n</think>\n\n"
_L3 = "<|start_header_id|>{}<|end_header_id|>\n\n"

# name -> (render of CONV[:-1] with the generation prompt, the last assistant slot, the assistant header)
EXPECTED = {
    "qwen": (_IM_PROMPT, "4<|im_end|>\n", "<|im_start|>assistant\n"),
    "qwen3_nothink": (_IM_PROMPT, "4<|im_end|>\n", "<|im_start|>assistant\n"),
    "chatml": (_IM_PROMPT, "4<|im_end|>\n", "<|im_start|>assistant\n"),
    "qwen3": (
        _IM + _THINK + "Hello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n",
        _THINK + "4<|im_end|>\n",
        "<|im_start|>assistant\n",
    ),
    "llama3": (
        "<s>" + _L3.format("system") + "Be brief.<|eot_id|>" + _L3.format("user") + "Hi<|eot_id|>"
        + _L3.format("assistant") + "Hello!<|eot_id|>" + _L3.format("user") + "2+2?<|eot_id|>"
        + _L3.format("assistant"),
        "4<|eot_id|>",
        _L3.format("assistant"),
    ),
    "llama2": ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]Hello!</s><s>[INST] 2+2? [/INST]", "4</s>", ""),
    "deepseek3": ("<s>Be brief.<｜User｜>Hi<｜Assistant｜>Hello!</s><｜User｜>2+2?<｜Assistant｜>", "4</s>", "<｜Assistant｜>"),
    "mistral": ("<s>[INST] Be brief.\n\nHi[/INST] Hello!</s>[INST] 2+2?[/INST]", " 4</s>", ""),
    "gemma": (
        "<s><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n",
        "4<end_of_turn>\n",
        "<start_of_turn>model\n",
    ),
    "default": (
        "System: Be brief.</s>\nHuman: Hi</s>\nAssistant:Hello!</s>\nHuman: 2+2?</s>\nAssistant:",
        "4</s>\n",
        "\nAssistant:",
    ),
    "empty": ("Be brief.HiHello!2+2?", "4", ""),
}  # fmt: skip

TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["c", "f"]},
            },
            "required": ["city"],
        },
    },
}
TOOL_JSON = (
    '{"type": "function", "function": {"name": "get_weather", "description": "Current weather", "parameters": '
    '{"type": "object", "properties": {"city": {"type": "string", "description": "City name"}, '
    '"unit": {"type": "string", "enum": ["c", "f"]}}, "required": ["city"]}}}'
)
TOOL_CONV = [
    {"role": "user", "content": "Weather in Zürich?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}
        ],
    },
    {"role": "tool", "content": '{"temp_c": 21}'},
    {"role": "assistant", "content": "It is 21 °C."},
]


@pytest.fixture(scope="module")
def tok():
    """The tiny tokenizer with a BOS, an EOS other than <|im_end|>, and Llama 3's turn tokens as special tokens."""
    from alignkit.modeling.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens(
        {
            "bos_token": "<s>",
            "eos_token": "</s>",
            "additional_special_tokens": ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
        }
    )
    return tokenizer


def render(tok, name: str, messages: list[dict], **kwargs) -> str:
    return tok.apply_chat_template(messages, chat_template=TEMPLATES[name], tokenize=False, **kwargs)


def assistant_runs(tok, name: str, messages: list[dict], **kwargs) -> list[str]:
    """The decoded runs of tokens that the assistant mask marks."""
    out = tok.apply_chat_template(
        messages,
        chat_template=TEMPLATES[name],
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        **kwargs,
    )
    runs: list[list[int]] = []
    previous = 0
    for token, marked in zip(out["input_ids"], out["assistant_masks"]):
        if marked and not previous:
            runs.append([])
        if marked:
            runs[-1].append(token)
        previous = marked
    return [tok.decode(run) for run in runs]


def test_every_name_has_an_expected_rendering() -> None:
    assert set(TEMPLATES) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_conversation_renders_as_llamafactory(tok, name: str) -> None:
    prompt, last, header = EXPECTED[name]
    assert render(tok, name, CONV) == prompt + last
    assert render(tok, name, CONV[:-1], add_generation_prompt=True) == prompt
    # without the generation prompt the text ends where the user turn ends
    assert render(tok, name, CONV[:-1]) + header == prompt


def test_qwen_default_system(tok) -> None:
    assert render(tok, "qwen", CONV[1:2], add_generation_prompt=True) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert (
        render(tok, "qwen3", CONV[1:2], add_generation_prompt=True)
        == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize(
    ("name", "runs"),
    [
        ("qwen", ["Hello!<|im_end|>", "4<|im_end|>"]),
        ("llama3", ["Hello!<|eot_id|>", "4<|eot_id|>"]),
        ("qwen3", [_THINK + "Hello!<|im_end|>", _THINK + "4<|im_end|>"]),
        ("mistral", [" Hello!</s>", " 4</s>"]),
    ],
)
def test_assistant_mask_is_content_and_end_token(tok, name: str, runs: list[str]) -> None:
    assert assistant_runs(tok, name, CONV) == runs
    end = {"qwen": "<|im_end|>", "qwen3": "<|im_end|>", "llama3": "<|eot_id|>", "mistral": "</s>"}[name]
    ids = tok.apply_chat_template(CONV, chat_template=TEMPLATES[name], tokenize=True, return_dict=True)[
        "input_ids"
    ]
    assert ids.count(tok.convert_tokens_to_ids(end)) == (2 if name == "mistral" else 5)


def test_qwen3_keeps_thoughts_and_drops_them_with_enable_thinking_false(tok) -> None:
    conv = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>\nhm\n</think>\n\nHello!"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    kept = (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\nhm\n</think>\n\nHello!<|im_end|>\n"
    )
    assert render(tok, "qwen3", conv[:2]) == kept
    assert render(tok, "qwen3", conv[:2], enable_thinking=False) == kept.replace("\nhm\n", "\n\n")
    off = render(tok, "qwen3", conv, enable_thinking=False)
    assert off == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n" + _THINK + "Hello!<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n" + _THINK + "4<|im_end|>\n"
    )
    assert assistant_runs(tok, "qwen3", conv, enable_thinking=False) == ["Hello!<|im_end|>", "4<|im_end|>"]
    assert render(tok, "qwen3", conv[:1], add_generation_prompt=True, enable_thinking=False).endswith(
        "<|im_start|>assistant\n" + _THINK
    )
    assert render(tok, "qwen3_nothink", conv[:2]) == kept
    with_reasoning = [conv[0], {"role": "assistant", "content": "Hello!", "reasoning_content": "hm"}]
    assert render(tok, "qwen3", with_reasoning) == kept


def test_qwen_tools(tok) -> None:
    assert json.loads(TOOL_JSON) == TOOL
    expected = (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        + TOOL_JSON
        + "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWeather in Zürich?<|im_end|>\n<|im_start|>assistant\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call><|im_end|>\n'
        '<|im_start|>user\n<tool_response>\n{"temp_c": 21}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\nIt is 21 °C.<|im_end|>\n"
    )
    assert render(tok, "qwen", TOOL_CONV, tools=[TOOL]) == expected
    assert render(tok, "qwen", TOOL_CONV, tools=[TOOL["function"]]) == expected  # a bare schema is wrapped
    assert assistant_runs(tok, "qwen", TOOL_CONV, tools=[TOOL]) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call><|im_end|>',
        "It is 21 °C.<|im_end|>",
    ]
    # qwen3: no default system, so the system turn is the tool block alone; empty thoughts before each reply
    qwen3 = render(tok, "qwen3", TOOL_CONV, tools=[TOOL])
    assert qwen3.startswith("<|im_start|>system\n\n\n# Tools\n\n")
    assert "<|im_start|>assistant\n" + _THINK + "<tool_call>\n" in qwen3
    # two results in a row are one observation turn
    two = TOOL_CONV[:3] + [{"role": "tool", "content": "22"}]
    assert render(tok, "qwen", two, tools=[TOOL]).endswith(
        '<|im_start|>user\n<tool_response>\n{"temp_c": 21}\n</tool_response>\n<tool_response>\n22\n'
        "</tool_response><|im_end|>\n"
    )


def test_default_mistral_and_llama3_tool_formats(tok) -> None:
    assert render(tok, "chatml", TOOL_CONV, tools=[TOOL]) == (
        "<|im_start|>system\nYou have access to the following tools:\n> Tool Name: get_weather\n"
        "Tool Description: Current weather\nTool Args:\n  - city (string, required): City name\n"
        "  - unit (string): , should be one of [c, f]\n\nUse the following format if using a tool:\n```\n"
        "Action: tool name (one of [get_weather])\nAction Input: the input to the tool, in a JSON format "
        'representing the kwargs (e.g. ```{"input": "hello world", "num_beams": 5}```)\n```\n<|im_end|>\n'
        "<|im_start|>user\nWeather in Zürich?<|im_end|>\n<|im_start|>assistant\n"
        'Action: get_weather\nAction Input: {"city": "Zürich"}<|im_end|>\n'
        '<|im_start|>tool\n{"temp_c": 21}<|im_end|>\n<|im_start|>assistant\nIt is 21 °C.<|im_end|>\n'
    )
    assert render(tok, "mistral", TOOL_CONV, tools=[TOOL]) == (
        "<s>[INST] [AVAILABLE_TOOLS] [" + TOOL_JSON + "][/AVAILABLE_TOOLS]\n\nWeather in Zürich?[/INST]"
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Zürich"}}]</s>'
        '[TOOL_RESULTS] {"content": {"temp_c": 21}}[/TOOL_RESULTS] It is 21 °C.</s>'
    )
    today = datetime.now().strftime("%d %b %Y")
    assert render(tok, "llama3", TOOL_CONV, tools=[TOOL]) == (
        "<s>" + _L3.format("system") + f"Cutting Knowledge Date: December 2023\nToday Date: {today}\n\n"
        "You have access to the following functions. To call a function, please respond with JSON for a "
        'function call. Respond in the format {"name": function name, "parameters": dictionary of argument '
        "name and its value}. Do not use variables.\n\n" + json.dumps(TOOL, indent=4) + "\n\n<|eot_id|>"
        + _L3.format("user") + "Weather in Zürich?<|eot_id|>" + _L3.format("assistant")
        + '{"name": "get_weather", "parameters": {"city": "Zürich"}}<|eot_id|>'
        + _L3.format("ipython") + '{"temp_c": 21}<|eot_id|>' + _L3.format("assistant") + "It is 21 °C.<|eot_id|>"
    )  # fmt: skip


def test_set_chat_template_overrides_once_and_changes_rendering(
    tok, caplog: pytest.LogCaptureFixture
) -> None:
    own = copy.deepcopy(tok)
    before = own.apply_chat_template(CONV, tokenize=False)
    assert before.startswith("<|im_start|>system\nBe brief.")  # the tiny model's own ChatML template
    assert set_chat_template(own, None) is None and own.apply_chat_template(CONV, tokenize=False) == before
    caplog.set_level(logging.INFO, logger="alignkit")
    assert set_chat_template(own, "llama3") == "llama3"
    assert own.apply_chat_template(CONV, tokenize=False) == EXPECTED["llama3"][0] + EXPECTED["llama3"][1]
    assert set_chat_template(own, "llama3") == "llama3"  # the same template again: nothing to say
    overrides = [r.getMessage() for r in caplog.records if "overrides" in r.getMessage()]
    assert overrides == ["`template: llama3` overrides the model's own chat template"]
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    caplog.clear()
    set_chat_template(bare, "qwen")
    assert bare.chat_template == TEMPLATES["qwen"] and not caplog.records


def test_unknown_template_name(tok) -> None:
    with pytest.raises(UserError) as err:
        set_chat_template(copy.deepcopy(tok), "qwen2", source="train.yaml")
    message = str(err.value)
    assert message.startswith(
        "train.yaml: `template: qwen2` is not a template alignkit knows (did you mean `qwen`?)"
    )
    assert "known: chatml, deepseek3, default, empty, gemma, llama2, llama3, mistral, qwen, qwen3" in message
    assert "leave `template` out" in message


def test_require_chat_template(tok) -> None:
    require_chat_template(tok, "tiny")  # has one: no error
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    with pytest.raises(UserError, match=r"base/model has no chat template; set `template:` to one of qwen, "):
        require_chat_template(bare, "base/model")
