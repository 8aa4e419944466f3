"""LLaMA-Factory's `template:` names as Hugging Face chat templates (Jinja, `tokenizer.chat_template`).

`TEMPLATES[name]` renders a conversation to the text LLaMA-Factory's template of that name builds
(its prefix, system, user, assistant and observation slots, default system and tool formats), for
`qwen`, `qwen3`, `qwen3_nothink`, `llama3`, `llama2`, `deepseek3`, `mistral`, `gemma`, `chatml`, `default`
and `empty`. Each assistant message's trained part (content and end-of-turn token; Mistral's leading
space; Qwen3's empty think block) is wrapped in `{% generation %}`, so `return_assistant_tokens_mask`
works (LLaMA-Factory also trains on the newline some slots put after the end token, e.g. qwen's
`<|im_end|>\\n`; the mask leaves it out). End-of-turn strings are written as text (`<|im_end|>`,
`<|eot_id|>`, ...), so they tokenise to the tokenizer's special token where it has one; LLaMA-Factory's
`bos_token` / `eos_token` slots are the tokenizer's own tokens.

Where LLaMA-Factory has no rule, these templates choose:
- the assistant header (`<|im_start|>assistant\\n`, ...) that LLaMA-Factory appends to every user turn is
  written only before an assistant message or for `add_generation_prompt`, so a prompt ends where the
  user turn ends unless a reply is asked for;
- an assistant message with both `content` and `tool_calls` renders the content, then the calls;
- `arguments` given as a JSON string are written as given (LLaMA-Factory would quote the string).

Tools: every name takes transformers' `tools` (JSON-schema dicts), assistant `tool_calls` (OpenAI
shape) and `tool` messages, in LLaMA-Factory's tool format for that name: `qwen` for qwen, qwen3 and
qwen3_nothink (`# Tools ... <tools></tools>` in the system turn, `<tool_call>` calls, `<tool_response>`
results in a user turn); `llama3` for llama3 (its prompt carries today's date); `mistral` for mistral
(`[AVAILABLE_TOOLS]`, `[TOOL_CALLS]`, `[TOOL_RESULTS]`); and LLaMA-Factory's `default` format
("You have access to the following tools: ... Action: / Action Input:") for chatml, default, empty,
llama2, gemma and deepseek3. Consecutive `tool` messages are one observation turn, joined as
LLaMA-Factory's OpenAI-format reader joins them.

qwen3 follows LLaMA-Factory's reasoning template as its SFT sees it (`enable_thinking` true, history
kept): an assistant message with no `<think>` block gets an empty `<think>\\n\\n</think>\\n\\n` in front,
trained on; `reasoning_content` is written as a think block. With `enable_thinking=False` passed to
`apply_chat_template`, think blocks are removed and the empty block goes after the header, untrained.
(LLaMA-Factory's one-turn encoding for DPO/KTO prompts also drops earlier turns' thoughts; these
templates keep history as SFT renders it.) qwen3_nothink adds no think block.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

from alignkit.errors import UserError, did_you_mean

log = logging.getLogger("alignkit")


@dataclass(frozen=True)
class _Spec:
    """One LLaMA-Factory template as slot texts; `{bos}` / `{eos}` stand for the tokenizer's tokens."""

    system: tuple[str, str]
    user: tuple[str, str]
    header: str  # the assistant header LLaMA-Factory writes at the end of its user slot
    close: str  # end of the assistant slot, trained on (end-of-turn token)
    after: str = ""  # the rest of the assistant slot, not trained on
    observation: tuple[str, str] | None = None  # None: like the user slot
    prefix: str = ""
    open: str = ""  # start of the assistant slot (trained on)
    function_open: str | None = None  # start of an assistant slot with tool calls; None: `open`
    default_system: str = ""
    tools: str = "default"
    fold_system: bool = False  # LLaMA-Factory's Llama2Template: system text opens the first user message
    thinking: bool = False
    stop_words: list[str] = field(default_factory=list)


_IM = ("<|im_start|>system\n", "<|im_end|>\n"), ("<|im_start|>user\n", "<|im_end|>\n")
_QWEN_OBS = ("<|im_start|>user\n<tool_response>\n", "\n</tool_response><|im_end|>\n")
_QWEN = dict(
    system=_IM[0], user=_IM[1], header="<|im_start|>assistant\n", close="<|im_end|>", after="\n",
    observation=_QWEN_OBS, tools="qwen", stop_words=["<|im_end|>"],
)  # fmt: skip

_SPECS: dict[str, _Spec] = {
    "qwen": _Spec(**_QWEN, default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
    "qwen3": _Spec(**_QWEN, thinking=True),
    "qwen3_nothink": _Spec(**_QWEN),
    "chatml": _Spec(
        system=_IM[0], user=_IM[1], header="<|im_start|>assistant\n", close="<|im_end|>", after="\n",
        observation=("<|im_start|>tool\n", "<|im_end|>\n"), stop_words=["<|im_end|>", "<|im_start|>"],
    ),
    "llama3": _Spec(
        prefix="{bos}",
        system=("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>"),
        user=("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
        header="<|start_header_id|>assistant<|end_header_id|>\n\n", close="<|eot_id|>",
        observation=("<|start_header_id|>ipython<|end_header_id|>\n\n", "<|eot_id|>"),
        tools="llama3", stop_words=["<|eot_id|>", "<|eom_id|>"],
    ),
    "llama2": _Spec(
        system=("<<SYS>>\n", "\n<</SYS>>\n\n"), user=("{bos}[INST] ", " [/INST]"), header="", close="{eos}",
        fold_system=True,
    ),
    "deepseek3": _Spec(prefix="{bos}", system=("", ""), user=("<｜User｜>", ""), header="<｜Assistant｜>", close="{eos}"),
    "mistral": _Spec(
        prefix="{bos}", system=("", "\n\n"), user=("[INST] ", "[/INST]"), header="", open=" ", close="{eos}",
        function_open="", observation=('[TOOL_RESULTS] {"content": ', "}[/TOOL_RESULTS]"), tools="mistral",
        fold_system=True,
    ),
    "gemma": _Spec(
        prefix="{bos}", system=("", "\n\n"), user=("<start_of_turn>user\n", "<end_of_turn>\n"),
        header="<start_of_turn>model\n", close="<end_of_turn>", after="\n",
        observation=("<start_of_turn>tool\n", "<end_of_turn>\n"), fold_system=True, stop_words=["<end_of_turn>"],
    ),
    "default": _Spec(
        system=("System: ", "{eos}\n"), user=("Human: ", "{eos}"), header="\nAssistant:", close="{eos}", after="\n"
    ),
    "empty": _Spec(system=("", ""), user=("", ""), header="", close=""),
}  # fmt: skip


def _q(text: str) -> str:
    """A Jinja string literal for `text`."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _expr(text: str) -> str:
    """A Jinja expression for slot text, with `{bos}` / `{eos}` as the tokenizer's tokens."""
    parts = [p for p in re.split(r"(\{bos\}|\{eos\})", text) if p]
    return " ~ ".join(p[1:-1] if p in ("{bos}", "{eos}") else _q(p) for p in parts) or "''"


# ------------------------------------------------------------------------------------- tool formats
_WRAPPED = "(tool if tool.type == 'function' else {'type': 'function', 'function': tool})"
_CALL_JSON = r"""
{%- macro call_json(call, key) %}
{%- set f = call.function if call.function is defined else call %}
{{- '{"name": ' ~ (f.name | tojson) ~ ', "' ~ key ~ '": ' ~ (f.arguments if f.arguments is string else (f.arguments | tojson)) ~ '}' }}
{%- endmacro %}
"""

_QWEN_TOOLS_HEAD = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_QWEN_TOOLS_TAIL = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}'
    "\n</tool_call>"
)
_LLAMA3_TOOLS_HEAD = (
    "You have access to the following functions. To call a function, please respond with JSON for a function "
    'call. Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
    "value}. Do not use variables.\n\n"
)
_DEFAULT_TOOLS_TAIL = (
    "Use the following format if using a tool:\n```\nAction: tool name (one of [@NAMES@])\n"
    "Action Input: the input to the tool, in a JSON format representing the kwargs "
    '(e.g. ```{"input": "hello world", "num_beams": 5}```)\n```\n'
)

_TOOL_MACROS = {
    "qwen": r"""
{%- macro tool_prompt(tools) %}
{{- @HEAD@ }}
{%- for tool in tools %}{{- '\n' ~ (@WRAPPED@ | tojson) }}{%- endfor %}
{{- @TAIL@ }}
{%- endmacro %}
{%- macro calls(tool_calls) %}
{%- for call in tool_calls %}{{- ('' if loop.first else '\n') ~ '<tool_call>\n' ~ call_json(call, 'arguments') ~ '\n</tool_call>' }}{%- endfor %}
{%- endmacro %}
""".replace("@HEAD@", _q(_QWEN_TOOLS_HEAD)).replace("@TAIL@", _q(_QWEN_TOOLS_TAIL)),
    "llama3": r"""
{%- macro tool_prompt(tools) %}
{{- 'Cutting Knowledge Date: December 2023\nToday Date: ' ~ strftime_now('%d %b %Y') ~ '\n\n' ~ @HEAD@ }}
{%- for tool in tools %}{{- (@WRAPPED@ | tojson(indent=4)) ~ '\n\n' }}{%- endfor %}
{%- endmacro %}
{%- macro calls(tool_calls) %}
{%- if tool_calls | length == 1 %}{{- call_json(tool_calls[0], 'parameters') }}
{%- else %}{{- '[' }}{%- for call in tool_calls %}{{- ('' if loop.first else ', ') ~ call_json(call, 'parameters') }}{%- endfor %}{{- ']' }}
{%- endif %}
{%- endmacro %}
""".replace("@HEAD@", _q(_LLAMA3_TOOLS_HEAD)),
    "mistral": r"""
{%- macro tool_prompt(tools) %}
{{- '[AVAILABLE_TOOLS] [' }}
{%- for tool in tools %}{{- ('' if loop.first else ', ') ~ (@WRAPPED@ | tojson) }}{%- endfor %}
{{- '][/AVAILABLE_TOOLS]' }}
{%- endmacro %}
{%- macro calls(tool_calls) %}
{{- '[TOOL_CALLS] [' }}
{%- for call in tool_calls %}{{- ('' if loop.first else ', ') ~ call_json(call, 'arguments') }}{%- endfor %}
{{- ']' }}
{%- endmacro %}
""",
    "default": r"""
{%- macro tool_prompt(tools) %}
{{- 'You have access to the following tools:\n' }}
{%- for tool in tools %}
{%- set t = tool.function if tool.type == 'function' else tool %}
{{- '> Tool Name: ' ~ t.name ~ '\nTool Description: ' ~ (t.description or '') ~ '\nTool Args:\n' }}
{%- set params = t.parameters or {} %}
{%- for name in (params.properties or {}) %}
{%- set p = params.properties[name] %}
{{- '  - ' ~ name ~ ' (' ~ (p.type or '') ~ (', required' if name in (params.required or []) else '') ~ '): ' ~ (p.description or '') }}
{%- if p.enum %}{{- ', should be one of [' ~ (p.enum | join(', ')) ~ ']' }}{%- endif %}
{%- if p.get('items') %}{{- ', where each item should be ' ~ (p.get('items').type or '') }}{%- endif %}
{{- '\n' }}
{%- endfor %}
{{- '\n' }}
{%- endfor %}
{%- set names = namespace(text='') %}
{%- for tool in tools %}
{%- set names.text = names.text ~ ('' if loop.first else ', ') ~ (tool.function.name if tool.type == 'function' else tool.name) %}
{%- endfor %}
{{- @TAIL_START@ ~ names.text ~ @TAIL_END@ }}
{%- endmacro %}
{%- macro calls(tool_calls) %}
{%- for call in tool_calls %}
{%- set f = call.function if call.function is defined else call %}
{{- ('' if loop.first else '\n') ~ 'Action: ' ~ f.name ~ '\nAction Input: ' ~ (f.arguments if f.arguments is string else (f.arguments | tojson)) }}
{%- endfor %}
{%- endmacro %}
""".replace("@TAIL_START@", _q(_DEFAULT_TOOLS_TAIL.split("@NAMES@")[0])).replace(
        "@TAIL_END@", _q(_DEFAULT_TOOLS_TAIL.split("@NAMES@")[1])
    ),
}

# ------------------------------------------------------------------------------------------ skeleton
_HEAD = r"""
{%- set bos = bos_token if bos_token is defined and bos_token else '' %}
{%- set eos = eos_token if eos_token is defined and eos_token else '' %}
{%- macro text(c) %}
{%- if c is string %}{{- c }}
{%- elif c is iterable %}{%- for part in c %}{%- if part.type == 'text' %}{{- part.text }}{%- endif %}{%- endfor %}
{%- endif %}
{%- endmacro %}
"""

_THINKING = r"""
{%- if message.reasoning_content is string and message.reasoning_content %}
{%- set body = '<think>\n' ~ message.reasoning_content.strip('\n') ~ '\n</think>\n\n' ~ body %}
{%- endif %}
{%- if enable_thinking is defined and enable_thinking is false %}
{%- if '<think>\n' in body and '\n</think>\n\n' in body %}
{%- set body = body.split('<think>\n')[0] ~ body.split('\n</think>\n\n')[-1] %}
{%- endif %}
{%- set body = body.lstrip('\n') %}
{%- set think_out = '<think>\n\n</think>\n\n' %}
{%- elif '<think>' not in body and '</think>' not in body %}
{%- set think_in = '<think>\n\n</think>\n\n' %}
{%- endif %}
"""

_SYSTEM_TURN = r"""{%- if system_text %}{{- @SYS_BEFORE@ ~ system_text ~ @SYS_AFTER@ }}{%- endif %}"""
_SYSTEM_FOLD = (
    r"""{%- if loop.first and system_text %}{%- set content = @SYS_BEFORE@ ~ system_text ~ @SYS_AFTER@ ~ content %}"""
    r"""{%- endif %}"""
)
_GEN_THINK = r"""{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"""

_BODY = r"""
{%- set system_message = @DEFAULT_SYSTEM@ %}
{%- set loop_messages = messages %}
{%- if messages and messages[0].role == 'system' %}
{%- set system_message = text(messages[0].content) or system_message %}
{%- set loop_messages = messages[1:] %}
{%- endif %}
{%- set system_text = system_message ~ (tool_prompt(tools) if tools else '') %}
@PREFIX@
@SYSTEM_TURN@
{%- for message in loop_messages %}
{%- set content = text(message.content) %}
{%- set next_role = none if loop.last else loop_messages[loop.index0 + 1].role %}
{%- set prev_role = none if loop.first else loop_messages[loop.index0 - 1].role %}
{%- if message.role == 'user' %}
@SYSTEM_FOLD@
{{- @USER_BEFORE@ ~ content ~ @USER_AFTER@ }}
{%- elif message.role == 'tool' %}
{{- (@OBS_BEFORE@ if prev_role != 'tool' else '\n</tool_response>\n<tool_response>\n') ~ content }}
{%- if next_role != 'tool' %}{{- @OBS_AFTER@ }}{%- endif %}
{%- elif message.role == 'assistant' %}
{%- set body = content %}
{%- set think_in = '' %}
{%- set think_out = '' %}
@THINKING@
{%- set open = @OPEN@ %}
{%- if message.tool_calls %}
{%- set body = body ~ calls(message.tool_calls) %}
{%- set open = @FUNCTION_OPEN@ %}
{%- endif %}
{{- think_out }}
{%- generation %}{{- open ~ think_in ~ body ~ @CLOSE@ }}{%- endgeneration %}
{{- @AFTER@ }}
{%- else %}
{{- raise_exception('this chat template takes a system message first, then user, assistant and tool messages; got role ' ~ message.role ~ ' at message ' ~ loop.index) }}
{%- endif %}
{%- if message.role != 'assistant' and next_role == 'assistant' %}{{- @HEADER@ }}{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- @HEADER@ }}@GEN_THINK@{%- endif %}
"""


def _build(spec: _Spec) -> str:
    """The Jinja chat template for one spec."""
    observation = spec.observation or spec.user
    fills = {
        "@DEFAULT_SYSTEM@": _q(spec.default_system),
        "@PREFIX@": "{{- " + _expr(spec.prefix) + " }}" if spec.prefix else "",
        "@SYSTEM_TURN@": "" if spec.fold_system else _SYSTEM_TURN,
        "@SYSTEM_FOLD@": _SYSTEM_FOLD if spec.fold_system else "",
        "@SYS_BEFORE@": _expr(spec.system[0]),
        "@SYS_AFTER@": _expr(spec.system[1]),
        "@USER_BEFORE@": _expr(spec.user[0]),
        "@USER_AFTER@": _expr(spec.user[1]),
        "@OBS_BEFORE@": _expr(observation[0]),
        "@OBS_AFTER@": _expr(observation[1]),
        "@THINKING@": _THINKING.strip() if spec.thinking else "",
        "@OPEN@": _expr(spec.open),
        "@FUNCTION_OPEN@": _expr(spec.open if spec.function_open is None else spec.function_open),
        "@CLOSE@": _expr(spec.close),
        "@AFTER@": _expr(spec.after),
        "@HEADER@": _expr(spec.header),
        "@GEN_THINK@": _GEN_THINK if spec.thinking else "",
    }
    body = _BODY
    for key, value in fills.items():  # in order: the system pieces go into the lines placed before them
        body = body.replace(key, value)
    tools = _TOOL_MACROS[spec.tools].replace("@WRAPPED@", _WRAPPED)
    lines = (_HEAD + _CALL_JSON + tools + body).splitlines()
    return "\n".join(line for line in lines if line.strip())


TEMPLATES: dict[str, str] = {name: _build(spec) for name, spec in _SPECS.items()}
"""LLaMA-Factory's template name -> Jinja chat template (see the module docstring)."""

STOP_WORDS: dict[str, list[str]] = {name: list(spec.stop_words) for name, spec in _SPECS.items()}
"""LLaMA-Factory's stop words per name (its first one replaces the EOS token there); not applied here."""


def set_chat_template(tokenizer: Any, name: str | None, source: str = "config") -> str | None:
    """Give `tokenizer` LLaMA-Factory's template `name`; None leaves it as it is. Returns the name set.

    The tokenizer's EOS token is not changed (LLaMA-Factory replaces it with the template's first stop
    word for some names; see `STOP_WORDS`).
    """
    if name is None:
        return None
    if name not in TEMPLATES:
        raise UserError(
            f"{source}: `template: {name}` is not a template alignkit knows{did_you_mean(name, TEMPLATES)}; "
            f"known: {', '.join(sorted(TEMPLATES))}; or leave `template` out to use the tokenizer's own "
            "chat template"
        )
    own = getattr(tokenizer, "chat_template", None)
    if own and own != TEMPLATES[name]:
        log.info("`template: %s` overrides the model's own chat template", name)
    tokenizer.chat_template = TEMPLATES[name]
    return name


def require_chat_template(tokenizer: Any, model_path: str, source: str = "config") -> None:
    """Raise a UserError when `tokenizer` has no chat template to render conversations with."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"{source}: the tokenizer of {model_path} has no chat template; set `template:` to one of "
            f"{', '.join(TEMPLATES)} (LLaMA-Factory's names) or use an instruct model"
        )
