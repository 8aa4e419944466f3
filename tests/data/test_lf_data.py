"""LLaMA-Factory's data read unchanged: dataset_info.json names, tool calls, content parts, media, kto_tag."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest

from alignkit.data.batches import build_sft_rows, encode_dpo_pair, encode_sft
from alignkit.data.formats import Example, describe_format, detect_format, load_examples
from alignkit.data.registry import locate
from alignkit.errors import UserError
from tests.conftest import write_jsonl

# ChatML that renders `tools` (a system block), assistant `tool_calls` and `tool` messages
TOOL_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n# Tools\\n' }}"
    "{%- for tool in tools %}{{- tool | tojson }}{{- '\\n' }}{%- endfor %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message.tool_calls %}{%- for call in message.tool_calls %}"
    "{{- '<tool_call>' + (call.function | tojson) + '</tool_call>' }}{%- endfor %}{%- endif %}"
    "{{- message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def lf(shared_data: Path) -> str:
    folder = shared_data / "llamafactory"
    if not (folder / "dataset_info.json").is_file():
        pytest.skip(f"{folder}/dataset_info.json not found")
    return str(folder)


@pytest.fixture(scope="module")
def tool_tokenizer() -> Any:
    from alignkit.modeling.tiny import build_tokenizer

    tok = build_tokenizer()
    tok.chat_template = TOOL_TEMPLATE
    return tok


def texts(ex: Example) -> list[str]:
    out = []
    for value in (ex.prompt, ex.completion, ex.chosen, ex.rejected):
        if isinstance(value, str):
            out.append(value)
        elif value:
            out += [m["content"] for m in value]
    return out


# ------------------------------------------------------------------------------------------ the registry
def test_names_resolve_through_dataset_info(lf: str) -> None:
    examples = load_examples("identity,alpaca_en_demo", dataset_dir=lf)
    rows = json.loads(Path(lf, "alpaca_en_demo.json").read_text())
    assert len(examples) == 91 + len(rows) == 91 + 999
    assert examples[0].where == f"{lf}/identity.json row 1"
    i = next(i for i, r in enumerate(rows) if r["input"])
    ex = examples[91 + i]
    assert ex.prompt == [{"role": "user", "content": f"{rows[i]['instruction']}\n{rows[i]['input']}"}]
    assert ex.completion == [{"role": "assistant", "content": rows[i]["output"]}]
    assert ex.where == f"{lf}/alpaca_en_demo.json row {i + 1}"
    assert describe_format("identity", dataset_dir=lf) == ("alpaca", 91)


def test_dpo_and_kto_by_name_equal_the_files_read_directly(lf: str) -> None:
    by_name = load_examples(["dpo_en_demo"], dataset_dir=lf)
    assert len(by_name) == 300 and {ex.kind for ex in by_name} == {"pair"}
    assert by_name == load_examples(f"{lf}/dpo_en_demo.json")
    assert by_name[0].chosen[0]["role"] == "assistant" and by_name[0].prompt[-1]["role"] == "user"

    kto = load_examples("kto_en_demo", dataset_dir=lf)
    assert len(kto) == 300 and {ex.kind for ex in kto} == {"unpaired"}
    assert sum(ex.label for ex in kto) == 150
    assert kto == load_examples(f"{lf}/kto_en_demo.json")  # messages + label: unpaired too
    assert describe_format("kto_en_demo", dataset_dir=lf) == ("sharegpt_kto", 300)


def test_pretraining_text_is_the_prompt_column(lf: str) -> None:
    want = [json.loads(line)["text"] for line in Path(lf, "c4_demo.jsonl").read_text().splitlines()]
    for got in (
        load_examples("c4_demo", dataset_dir=lf, stage="pt"),
        load_examples("c4_demo", "text", dataset_dir=lf),
    ):
        assert len(got) == 300 and [ex.completion for ex in got] == want
        assert {ex.prompt for ex in got} == {""} and {ex.kind for ex in got} == {"sft"}


def write_info(folder: Path, entries: dict) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset_info.json").write_text(json.dumps(entries))
    return str(folder)


def test_renamed_columns_custom_tags_and_a_folder(tmp_path: Path) -> None:
    dialog = [
        {"speaker": "customer", "text": "my order is late"},
        {"speaker": "agent", "text": "sorry, checking"},
        {"speaker": "customer", "text": "thanks"},
        {"speaker": "agent", "text": "it ships today"},
    ]
    write_jsonl(tmp_path / "support.jsonl", [{"dialog": dialog, "sys": "Be kind.", "ticket": 7}])
    write_jsonl(
        tmp_path / "qa" / "part.jsonl", [{"q": "2+2?", "ctx": "add", "a": "4", "past": [["hi", "hello"]]}]
    )
    info = {
        "support": {
            "file_name": "support.jsonl",
            "formatting": "sharegpt",
            "columns": {"messages": "dialog", "system": "sys"},
            "tags": {
                "role_tag": "speaker",
                "content_tag": "text",
                "user_tag": "customer",
                "assistant_tag": "agent",
            },
        },
        "qa": {
            "file_name": "qa",
            "columns": {"prompt": "q", "query": "ctx", "response": "a", "history": "past"},
        },
    }
    folder = write_info(tmp_path, info)
    (ex,) = load_examples("support", dataset_dir=folder)
    assert ex.prompt == [] and ex.extra == {"ticket": 7}
    assert [(m["role"], m["content"]) for m in ex.completion] == [
        ("system", "Be kind."),
        ("user", "my order is late"),
        ("assistant", "sorry, checking"),
        ("user", "thanks"),
        ("assistant", "it ships today"),
    ]
    (qa,) = load_examples("qa", dataset_dir=folder)  # a folder, through `datasets`
    # as LLaMA-Factory: the history's answers are trained on too, so they sit in the completion
    assert qa.where == f"{tmp_path / 'qa'} row 1"
    assert [(m["role"], m["content"]) for m in qa.completion] == [
        ("user", "hi"),
        ("assistant", "hello"),
        ("user", "2+2?\nadd"),
        ("assistant", "4"),
    ]
    write_info(
        tmp_path, {"support": {**info["support"], "tags": {"role_tag": "speaker", "content_tag": "text"}}}
    )
    with pytest.raises(
        UserError,
        match=r"support.jsonl line 1: turn 0 of `dialog` has speaker `customer`, which is none of the tags",
    ):
        load_examples("support", dataset_dir=folder)


def test_alpaca_ranking_and_kto_columns(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "p.jsonl", [{"instruction": "Q", "input": "", "good": "A", "bad": "B"}])
    write_jsonl(tmp_path / "k.jsonl", [{"instruction": "Q", "output": "A", "ok": False}])
    folder = write_info(
        tmp_path,
        {
            "pairs": {
                "file_name": "p.jsonl",
                "ranking": True,
                "columns": {"chosen": "good", "rejected": "bad"},
            },
            "kto": {"file_name": "k.jsonl", "columns": {"kto_tag": "ok"}},
        },
    )
    (pair,) = load_examples("pairs", dataset_dir=folder)
    assert pair.prompt == [{"role": "user", "content": "Q"}]
    assert (pair.chosen[0]["content"], pair.rejected[0]["content"]) == ("A", "B")
    (kto,) = load_examples("kto", dataset_dir=folder)
    assert (kto.kind, kto.label, kto.completion[0]["content"]) == ("unpaired", False, "A")


def test_unknown_names_and_entries_are_clear(lf: str, tmp_path: Path) -> None:
    with pytest.raises(
        UserError, match=r"dataset identiti does not exist.*dataset_info.json \(did you mean `identity`\?\)"
    ):
        load_examples("identiti", dataset_dir=lf)
    with pytest.raises(UserError, match=re.escape(f"{tmp_path}/dataset_info.json does not exist")):
        load_examples("identity", dataset_dir=str(tmp_path))
    entry = locate("alpaca_en", lf)  # hub only: read through `datasets` (not offline)
    assert entry is not None and entry.hub and entry.source == "llamafactory/alpaca_en"
    folder = write_info(
        tmp_path / "x",
        {
            "ms": {"ms_hub_url": "AI-ModelScope/x"},
            "typo": {"file_name": "a.json", "columns": {"respone": "a"}},
        },
    )
    with pytest.raises(UserError, match=r"`ms` is only on ModelScope \(`ms_hub_url`\)"):
        load_examples("ms", dataset_dir=folder)
    with pytest.raises(UserError, match=r"`typo` points at .*a.json \(`file_name`\), which does not exist"):
        load_examples("typo", dataset_dir=folder)
    Path(folder, "a.json").write_text("[]")
    with pytest.raises(UserError, match=r"unknown key `respone` \(did you mean `response`\?\)"):
        load_examples("typo", dataset_dir=folder)
    comma = write_jsonl(tmp_path / "a,b.jsonl", [{"text": "x"}])  # an existing path is never split
    assert [ex.completion for ex in load_examples(comma)] == ["x"]


# ---------------------------------------------------------------------------------------------- tools
def test_tool_calls_are_rendered_and_trained(lf: str, tool_tokenizer: Any) -> None:
    examples = load_examples("glaive_toolcall_en_demo", dataset_dir=lf)
    ex = next(e for e in examples if any(m.get("tool_calls") for m in e.completion))
    call = next(m for m in ex.completion if m.get("tool_calls"))["tool_calls"][0]
    assert call == {
        "type": "function",
        "function": {
            "name": "search_recipes",
            "arguments": {"ingredients": ["chicken", "bell peppers", "rice"]},
        },
    }
    assert ex.tools[0]["type"] == "function" and ex.tools[0]["function"]["name"] == "search_recipes"
    tool_msg = next(m for m in ex.completion if m["role"] == "tool")
    assert tool_msg["content"].startswith('{"recipes": [')

    row = encode_sft(ex, tool_tokenizer)
    rows, _ = build_sft_rows([ex], tool_tokenizer, max_length=4096)
    assert rows == [row]
    text = tool_tokenizer.decode(row["input_ids"])
    assert '"description": "Search for recipes based on ingredients"' in text  # the schema
    assert '<tool_call>{"name": "search_recipes", "arguments": {"ingredients": ["chicken"' in text
    assert tool_msg["content"] in text
    spans, ids, mask = [], row["input_ids"], row["completion_mask"]
    for i, m in enumerate(mask):
        if m and (i == 0 or not mask[i - 1]):
            spans.append([])
        if m:
            spans[-1].append(ids[i])
    trained = [tool_tokenizer.decode(s) for s in spans]
    answers = [m for m in ex.completion if m["role"] == "assistant"]
    assert len(trained) == len(answers) == 4
    assert trained[1] == (
        '<tool_call>{"name": "search_recipes", "arguments": {"ingredients": ["chicken", "bell peppers", '
        '"rice"]}}</tool_call><|im_end|>\n'
    )
    assert trained[2].startswith("I found two recipes for you.")
    assert not any('{"recipes": [' in t or "I have chicken" in t for t in trained)

    plain = [e for e in examples if not e.tools]
    assert len(plain) == 109 and len(examples) == 300
    pair = Example(
        prompt=ex.completion[:3], chosen=ex.completion[3:4], rejected=ex.completion[1:2], tools=ex.tools
    )
    assert "# Tools" in tool_tokenizer.decode(encode_dpo_pair(pair, tool_tokenizer)["prompt_ids"])


def test_bad_function_call_names_row_and_turn(tmp_path: Path) -> None:
    turns = [{"from": "human", "value": "hi"}, {"from": "function_call", "value": "call it please"}]
    path = write_jsonl(tmp_path / "t.jsonl", [{"conversations": turns, "tools": "[]"}])
    with pytest.raises(UserError, match=r"t.jsonl line 1: turn 1 of `conversations` must be JSON \{\"name\""):
        load_examples(path)
    path = write_jsonl(
        tmp_path / "u.jsonl", [{"conversations": turns[:1] + [{"from": "gpt", "value": "x"}], "tools": "{"}]
    )
    with pytest.raises(UserError, match=r"u.jsonl line 1: `tools` is not valid JSON"):
        load_examples(path)


# ---------------------------------------------------------------------------------- parts, media, kto_tag
def test_content_parts_are_joined(lf: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sft = load_examples(f"{lf}/v1_sft_demo.jsonl")
    assert len(sft) == 500 and all(
        isinstance(t, str) and "[{'type'" not in t for ex in sft for t in texts(ex)
    )
    assert [m["content"] for m in sft[0].completion][0] == "hi"
    pairs = load_examples(f"{lf}/v1_dpo_demo.jsonl")
    assert len(pairs) == 10 and {ex.kind for ex in pairs} == {"pair"}
    assert [m["role"] for m in pairs[0].prompt] == ["system", "user"]
    assert pairs[0].chosen[0]["content"].startswith("Abdulah Hasanagic is the proud owner")
    parts = [
        {"type": "text", "text": "Look: "},
        {"type": "image_url", "value": "a.png"},
        {"type": "text", "value": "what?"},
    ]
    row = {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": "a cat"}]}
    with caplog.at_level(logging.WARNING, logger="alignkit"):
        (ex,) = load_examples(write_jsonl(tmp_path / "p.jsonl", [row]))
    assert ex.completion[0]["content"] == "Look: what?"
    assert [r.getMessage() for r in caplog.records] == [
        "1 non-text content parts (1 image_url): dropped; alignkit trains text models"
    ]


def test_media_are_dropped_with_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [
        {
            "messages": [
                {"role": "user", "content": "<image><image>What differs?"},
                {"role": "assistant", "content": "The colour."},
            ],
            "images": ["a.jpg", "b.jpg"],
        },
        {
            "messages": [{"role": "user", "content": "<video>Who?"}, {"role": "assistant", "content": "Me."}],
            "videos": ["v.mp4"],
        },
        {
            "messages": [
                {"role": "user", "content": "No media: <image> stays"},
                {"role": "assistant", "content": "ok"},
            ],
            "images": [],
        },
    ]
    write_jsonl(tmp_path / "mllm.jsonl", rows)
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
    columns = {"messages": "messages", "images": "images", "videos": "videos"}
    folder = write_info(
        tmp_path,
        {"mllm": {"file_name": "mllm.jsonl", "formatting": "sharegpt", "columns": columns, "tags": tags}},
    )
    for source, where in (("mllm", folder), (str(tmp_path / "mllm.jsonl"), None)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="alignkit"):
            got = load_examples(source, dataset_dir=where)
        assert [ex.completion[0]["content"] for ex in got] == [
            "What differs?",
            "Who?",
            "No media: <image> stays",
        ]
        assert all(not set(ex.extra) & {"images", "videos"} for ex in got)
        assert [r.getMessage() for r in caplog.records] == [
            "1 rows had images (2 files), 1 rows had videos (1 files): dropped; alignkit trains text models; "
            "their <image>/<video>/<audio> placeholders were taken out of the text"
        ]


def test_messages_with_kto_tag_are_unpaired(tmp_path: Path) -> None:
    msgs = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    row = {"messages": msgs, "kto_tag": True}
    assert detect_format(row) == "unpaired"
    assert detect_format({"instruction": "Q", "output": "A", "kto_tag": False}) == "alpaca_kto"
    got = load_examples(write_jsonl(tmp_path / "k.jsonl", [row, {"messages": msgs, "kto_tag": False}]))
    assert [(ex.kind, ex.label) for ex in got] == [("unpaired", True), ("unpaired", False)]
    assert (got[0].prompt, got[0].completion) == (msgs[:1], msgs[1:])
