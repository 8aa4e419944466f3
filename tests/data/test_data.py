"""Formats, tokenisation and masks, packing, and the data report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignkit.data.batches import build_sft_rows, collate_sft, encode_sft, pack_rows
from alignkit.data.formats import detect_format, load_examples, read_rows
from alignkit.data.report import inspect_data
from alignkit.errors import UserError
from alignkit.losses.unpaired import kto_weights
from tests.conftest import write_jsonl


@pytest.mark.parametrize(
    "name,fmt,kind,rows",
    [
        ("alpaca_en_demo.json", "alpaca", "sft", 999),
        ("dpo_en_demo.json", "sharegpt_preference", "pair", 300),
        ("kto_en_demo.json", "unpaired", "unpaired", 300),
    ],
)
def test_real_llamafactory_files(shared_data: Path, name: str, fmt: str, kind: str, rows: int) -> None:
    path = str(shared_data / "llamafactory" / name)
    examples = load_examples(path)
    assert detect_format(read_rows(path)[0][0]) == fmt
    assert len(examples) == rows and {ex.kind for ex in examples} == {kind}
    ex = examples[0]
    assert isinstance(ex.prompt, list) and ex.prompt[-1]["role"] == "user"
    if kind == "pair":
        assert ex.chosen[0]["role"] == "assistant" and ex.chosen != ex.rejected
    if kind == "unpaired":
        assert sum(e.label for e in examples) == 150


def test_gsm8k_is_prompt_only_with_answer_passed_through(shared_data: Path) -> None:
    examples = load_examples(str(shared_data / "gsm8k" / "test.jsonl"))
    assert len(examples) == 1319 and examples[0].kind == "prompt"
    assert examples[0].prompt[0]["content"].startswith("Janet")
    assert examples[0].extra["answer"].strip().endswith("#### 18")


SYNTHETIC = {
    "messages": (
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        "sft",
    ),
    "sharegpt": (
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
        "sft",
    ),
    "alpaca": (
        {"instruction": "Add", "input": "2 3", "output": "5", "system": "Be brief", "history": [["q", "a"]]},
        "sft",
    ),
    "prompt_completion": ({"prompt": "2+3=", "completion": "5"}, "sft"),
    "text": ({"text": "plain text"}, "sft"),
    "preference": ({"prompt": "Q", "chosen": "good", "rejected": "bad"}, "pair"),
    "alpaca_preference": ({"instruction": "Q", "input": "", "chosen": "good", "rejected": "bad"}, "pair"),
    "unpaired": ({"prompt": "Q", "completion": "A", "label": False}, "unpaired"),
    "sharegpt_kto": (
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}], "kto_tag": True},
        "unpaired",
    ),
    "prompt_only": ({"prompt": [{"role": "user", "content": "Q"}], "answer": "42"}, "prompt"),
}


@pytest.mark.parametrize("fmt", list(SYNTHETIC))
def test_every_format_is_detected_and_converted(fmt: str, tmp_path: Path) -> None:
    row, kind = SYNTHETIC[fmt]
    assert detect_format(row) == fmt
    ex = load_examples(write_jsonl(tmp_path / "d.jsonl", [row]))[0]
    assert ex.kind == kind
    if fmt == "alpaca":
        assert [m["role"] for m in ex.prompt] == ["system", "user", "assistant", "user"]
        assert ex.prompt[-1]["content"] == "Add\n2 3"
    if fmt == "prompt_only":
        assert ex.extra == {"answer": "42"}


def test_implicit_prompt_pairs_are_split_like_trl() -> None:
    from alignkit.data.formats import to_example

    conv = to_example(
        {
            "chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
            "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "B"}],
        },
        "preference",
        "row 1",
    )
    assert conv.prompt == [{"role": "user", "content": "Q"}] and conv.chosen == [
        {"role": "assistant", "content": "A"}
    ]
    std = to_example({"chosen": "The sky is blue.", "rejected": "The sky is green."}, "preference", "row 1")
    assert (std.prompt, std.chosen, std.rejected) == ("The sky is", " blue.", " green.")


def test_csv_parquet_and_local_dataset_folder(tmp_path: Path) -> None:
    import datasets

    rows = [{"prompt": "Q1", "completion": "A1"}, {"prompt": "Q2", "completion": "A2"}]
    csv = tmp_path / "d.csv"
    csv.write_text("prompt,completion\nQ1,A1\nQ2,A2\n")
    parquet = tmp_path / "d.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    folder = tmp_path / "hubstyle"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", rows)
    for source in (str(csv), str(parquet), str(folder)):  # the folder goes through datasets.load_dataset
        got = load_examples(source)
        assert [(e.prompt, e.completion) for e in got] == [("Q1", "A1"), ("Q2", "A2")]


@pytest.mark.parametrize(
    "content,pattern",
    [
        (
            '{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n',
            r"d\.jsonl line 2: not valid JSON",
        ),
        (
            '{"prompt": "a"}\n{"completion": "b"}\n',
            r"line 2: missing field `prompt`.*found fields: completion",
        ),
        (
            '{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": "  "}\n',
            r"line 2: `completion` is empty",
        ),
        ('{"prompt": "a", "completion": "b", "label": "yes"}\n', r"line 1: `label` must be true or false"),
        ('{"messages": [{"role": "user"}]}\n', r"line 1: message 0 of `messages` needs `role` and `content`"),
        ('{"prompt": "p", "chosen": "c"}\n', r"line 1: has `chosen` but no `rejected`"),
    ],
)
def test_bad_rows_name_the_line_and_field(content: str, pattern: str, tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=pattern):
        load_examples(str(path))


def test_missing_field_for_declared_format(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c"}])
    with pytest.raises(UserError, match=r"line 2: missing field `completion`.*found fields: prompt"):
        load_examples(path)


def test_missing_file_is_clear() -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_examples("no/such/file.jsonl")


def test_multi_turn_sft_trains_every_assistant_turn_only(tiny_model: str, tmp_path: Path) -> None:
    """The loss mask covers each assistant message (as the template's {% generation %} spans do), nothing else."""
    from alignkit.modeling.load import load_tokenizer

    tok = load_tokenizer(tiny_model)
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "6"},
    ]
    ex = load_examples(write_jsonl(tmp_path / "d.jsonl", [{"messages": msgs}]))[0]
    row = encode_sft(ex, tok)
    ref = tok.apply_chat_template(msgs, return_dict=True, return_assistant_tokens_mask=True)
    assert row["input_ids"] == list(ref["input_ids"])
    trained = tok.decode([t for t, m in zip(row["input_ids"], row["completion_mask"]) if m])
    assert trained == "4<|im_end|>\n6<|im_end|>\n"
    # the template's own assistant spans are a subset (they stop before the newline after <|im_end|>)
    assert all(m for m, r in zip(row["completion_mask"], ref["assistant_masks"]) if r)


def test_truncation_keeps_prompt_end_and_cuts_completion(tiny_model: str) -> None:
    from alignkit.data.formats import Example
    from alignkit.modeling.load import load_tokenizer

    tok = load_tokenizer(tiny_model)
    ex = Example(
        prompt="one two three four five six seven eight", completion=" alpha beta gamma delta epsilon zeta"
    )
    full = encode_sft(ex, tok)
    n_prompt = full["completion_mask"].index(1)
    rows, stats = build_sft_rows(
        [ex], tok, max_length=len(full["input_ids"]) - 3, max_prompt_length=n_prompt - 2
    )
    row = rows[0]
    assert row["input_ids"][: n_prompt - 2] == full["input_ids"][2:n_prompt]  # the prompt keeps its end
    assert (
        row["input_ids"][n_prompt - 2 :]
        == full["input_ids"][n_prompt : n_prompt + len(row["input_ids"]) - n_prompt + 2]
    )
    assert stats.truncated == 1 and stats.dropped == 0
    with pytest.raises(UserError, match="every row was truncated away"):
        build_sft_rows([ex], tok, max_length=1)


def test_packing_keeps_sequences_apart(tiny_model: str) -> None:
    """Loss of packed rows == loss of the same rows padded separately (no attention across rows)."""
    from transformers import AutoModelForCausalLM

    from alignkit.losses.tokens import token_nll
    from alignkit.modeling.load import load_tokenizer

    tok = load_tokenizer(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    rows = [
        {"input_ids": tok(t)["input_ids"], "completion_mask": [1] * len(tok(t)["input_ids"])}
        for t in ["first row text", "second, a longer row of text here", "third"]
    ]
    packed = pack_rows(rows, max_length=64)
    assert len(packed) == 1 and packed[0]["position_ids"].count(0) == 3

    def total(batch: dict) -> torch.Tensor:
        labels = batch.pop("labels")
        with torch.no_grad():
            return token_nll(model(**batch, use_cache=False).logits, labels).sum()

    separate = total(collate_sft(rows, tok.pad_token_id))
    together = total(collate_sft(packed, tok.pad_token_id))
    # a row's first token is never a target (separately: nothing precedes it; packed: masked out), and
    # every other token sees only its own row, so the two sums agree
    torch.testing.assert_close(together, separate, atol=1e-4, rtol=1e-5)


def test_kto_weight_recommendation() -> None:
    assert kto_weights(150, 150)[:2] == (1.0, 1.0)
    w_d, w_u, _ = kto_weights(100, 400)  # 1 desirable : 4 undesirable
    assert (w_d, w_u) == (4.0, 1.0) and 1.0 <= w_d * 100 / (w_u * 400) <= 4 / 3
    w_d, w_u, _ = kto_weights(400, 100)
    assert w_d == 1.0 and w_d * 400 / (w_u * 100) == pytest.approx(4 / 3)


def test_data_inspect_report(tiny_model: str, tmp_path: Path) -> None:
    rows = [
        {"prompt": "Q", "chosen": "a much longer good answer", "rejected": "bad"},
        {"prompt": "Q", "chosen": "ok", "rejected": "a long and rambling bad answer"},
        {"prompt": "R", "chosen": "same", "rejected": "same"},
    ]
    report = inspect_data(write_jsonl(tmp_path / "p.jsonl", rows), model=tiny_model, max_length=8)
    assert report["format"] == "preference" and report["rows"] == 3
    assert report["duplicate_prompts"] == 1
    assert report["chosen_longer_share"] == pytest.approx(1 / 3, abs=1e-3)
    assert report["identical_pairs"] == 1
    assert report["would_truncate"] >= 1
    assert report["length_unit"] == "tokens"
    kto = [{"prompt": "Q", "completion": "A", "label": i == 0} for i in range(5)]
    k = inspect_data(write_jsonl(tmp_path / "k.jsonl", kto))["kto"]
    assert (k["desirable"], k["undesirable"], k["desirable_weight"]) == (1, 4, 4.0)


def test_data_inspect_on_real_kto_file(shared_data: Path) -> None:
    report = inspect_data(str(shared_data / "llamafactory" / "kto_en_demo.json"))
    assert report["kto"]["desirable"] == 150 and report["kto"]["undesirable"] == 150
    assert json.dumps(report)  # serialisable for --json


def test_data_inspect_by_dataset_info_name(shared_data: Path, capsys: pytest.CaptureFixture) -> None:
    from alignkit.cli.main import main

    lf = shared_data / "llamafactory"
    by_name = inspect_data("kto_en_demo", dataset_dir=str(lf))
    assert by_name["rows"] == 300 and by_name["kto"]["desirable"] == by_name["kto"]["undesirable"] == 150
    with pytest.raises(SystemExit) as done:
        main(["data", "inspect", "alpaca_en_demo", "--dataset-dir", str(lf), "--json"])
    assert done.value.code == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 999
