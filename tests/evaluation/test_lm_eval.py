"""General ability through lm-eval, for real and offline: a multiple-choice task defined here (a local YAML and
a local jsonl), scored by lm-eval on the tiny model and on a LoRA adapter, checked against a direct computation."""

from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path

import pytest

from alignkit.errors import UserError
from alignkit.stats import wilson_interval
from tests.conftest import write_jsonl

pytest.importorskip("lm_eval")

PROMPT = "Question: What is {a} + {b}?\nAnswer:"
PAIRS = [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4), (6, 1), (8, 3), (9, 9), (0, 5), (3, 3), (7, 1)]
ROWS = [{"a": a, "b": b, "choices": [str(a + b), str(a + b + 1), str(a * b), "zero"]} for a, b in PAIRS]
MIXED = [i % 4 for i in range(len(ROWS))]  # labels of the task whose accuracy is compared as a number

TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: What is {{{{a}}}} + {{{{b}}}}?\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
GROUP_YAML = """group: alignkit_tiny_group
task: [alignkit_tiny_mc, alignkit_tiny_mc_base]
aggregate_metric_list:
  - metric: acc
    aggregation: mean
    weight_by_size: true
"""


def choices_picked(model_dir: str, adapter: str | None = None) -> list[int]:
    """Per row, the choice with the highest summed log-likelihood of " " + choice after the prompt, straight
    from a transformers forward pass (the continuation is the full text's tokens after the prompt's)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    texts = [(PROMPT.format(**row), " " + choice) for row in ROWS for choice in row["choices"]]
    seqs = [tok(p + c, add_special_tokens=False)["input_ids"] for p, c in texts]
    starts = [len(tok(p, add_special_tokens=False)["input_ids"]) for p, _ in texts]
    width = max(map(len, seqs))
    # One forward for all 48 texts: padding on the right cannot change earlier positions of a causal model.
    batch = torch.tensor([ids + [tok.pad_token_id] * (width - len(ids)) for ids in seqs])
    with torch.no_grad():
        logp = model(batch).logits.log_softmax(-1)
    scores = [
        sum(logp[i, t - 1, ids[t]].item() for t in range(start, len(ids)))
        for i, (ids, start) in enumerate(zip(seqs, starts))
    ]
    per_row = [scores[i : i + 4] for i in range(0, len(scores), 4)]
    return [max(range(4), key=row.__getitem__) for row in per_row]


@pytest.fixture(scope="module")
def adapter(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A LoRA adapter with a large random B, so it changes which choice wins; no tokenizer in its folder, so
    the base's is used."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    config = LoraConfig(
        r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    out = tmp_path_factory.mktemp("lora") / "adapter"
    peft_model.save_pretrained(str(out))
    config_path = out / "adapter_config.json"
    keys = json.loads(config_path.read_text())
    keys["base_model_name_or_path"] = tiny_model
    config_path.write_text(json.dumps(keys))
    return str(out)


@pytest.fixture(scope="module")
def picks(tiny_model: str, adapter: str) -> dict[str, list[int]]:
    return {"base": choices_picked(tiny_model), "adapter": choices_picked(tiny_model, adapter)}


@pytest.fixture(scope="module")
def task_dir(picks: dict[str, list[int]], tmp_path_factory: pytest.TempPathFactory) -> str:
    """Three tasks on the same rows: fixed labels, labels = the base's own picks, labels = the adapter's picks
    (a model scores 1.0 on its own-picks task only if lm-eval agrees with it on every row), and a group."""
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    for name, labels in [("mc", MIXED), ("mc_base", picks["base"]), ("mc_adapter", picks["adapter"])]:
        data = write_jsonl(folder / f"{name}.jsonl", [{**r, "label": y} for r, y in zip(ROWS, labels)])
        (folder / f"{name}.yaml").write_text(TASK_YAML.format(name=f"alignkit_tiny_{name}", data=data))
    (folder / "group.yaml").write_text(GROUP_YAML)
    return str(folder)


def share(a: list[int], b: list[int]) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


def test_accuracy_equals_direct_computation(
    tiny_model: str, task_dir: str, picks: dict[str, list[int]]
) -> None:
    from alignkit.evaluation.general import run_lm_eval

    tasks = ["alignkit_tiny_group", "alignkit_tiny_mc_adapter"]
    rows = run_lm_eval(tiny_model, tasks, include_path=task_dir)
    assert set(rows) == {
        "alignkit_tiny_group",
        "alignkit_tiny_mc",
        "alignkit_tiny_mc_base",
        "alignkit_tiny_mc_adapter",
    }
    # labels = the direct computation's picks: 1.0 only if lm-eval picked the same choice on every row
    assert rows["alignkit_tiny_mc_base"]["value"] == 1.0
    assert rows["alignkit_tiny_mc_adapter"]["value"] == share(picks["base"], picks["adapter"])
    mc = rows["alignkit_tiny_mc"]
    correct = round(share(picks["base"], MIXED) * 12)
    assert mc["value"] == correct / 12 and mc["metric"] == "acc" and mc["n"] == 12
    assert mc["ci95"] == list(wilson_interval(correct, 12)) and mc["interval"] == "wilson"
    p = correct / 12
    assert math.isclose(mc["stderr"], math.sqrt(p * (1 - p) / 11))  # lm-eval's sample stderr, passed through
    group = rows["alignkit_tiny_group"]  # weight_by_size: the pooled rate over both tasks' 24 documents
    assert group["n"] == 24 and group["value"] == (correct + 12) / 24
    assert group["ci95"] == list(wilson_interval(correct + 12, 24))


def test_adapter_folder_is_applied(
    tiny_model: str, adapter: str, task_dir: str, picks: dict[str, list[int]]
) -> None:
    from alignkit.evaluation.general import run_lm_eval

    assert picks["adapter"] != picks["base"]  # the adapter changes answers, so skipping it would show
    tasks = ["alignkit_tiny_mc", "alignkit_tiny_mc_base", "alignkit_tiny_mc_adapter"]
    rows = run_lm_eval(adapter, tasks, include_path=task_dir, limit=10)
    assert rows["alignkit_tiny_mc_adapter"]["value"] == 1.0
    assert rows["alignkit_tiny_mc_base"]["value"] == share(picks["base"][:10], picks["adapter"][:10])
    assert rows["alignkit_tiny_mc"]["value"] == share(picks["adapter"][:10], MIXED[:10])
    assert rows["alignkit_tiny_mc"]["n"] == 10  # `limit` reaches lm-eval


def test_missing_lm_eval_names_the_extra(monkeypatch: pytest.MonkeyPatch, tiny_model: str) -> None:
    from alignkit.evaluation.general import run_lm_eval

    # `import lm_eval` now fails as it does where the extra is not installed
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(UserError) as err:
        run_lm_eval(tiny_model, ["mmlu"])
    assert str(err.value) == 'lm_eval_tasks needs EleutherAI\'s lm-eval harness: pip install "alignkit[eval]"'


def test_unknown_task_is_named_with_a_suggestion(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, task_dir: str
) -> None:
    import lm_eval.tasks

    from alignkit.evaluation.general import run_lm_eval

    # lm-eval's ~15k built-in task files take many seconds to index: here only the test's folder is indexed.
    tm = functools.partial(lm_eval.tasks.TaskManager, include_defaults=False)
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", tm)
    with pytest.raises(UserError) as err:
        run_lm_eval(
            str(tmp_path / "never_loaded"), ["alignkit_tiny_mc", "alignkit_tiny_mcq"], include_path=task_dir
        )
    message = str(err.value)
    assert "`alignkit_tiny_mcq` (did you mean `alignkit_tiny_mc`?)" in message
    # only the unknown name is listed, not the known one beside it
    assert "`alignkit_tiny_mc`;" not in message and "`alignkit_tiny_mc` (" not in message


def test_eval_command_reports_lm_eval_rows(
    tiny_model: str, task_dir: str, picks: dict, tmp_path: Path
) -> None:
    """`alignkit eval` with `lm_eval_tasks` and no dataset: the harness's rows land in eval.json, per model."""
    import json

    from alignkit.cli import main

    out = tmp_path / "eval"
    argv = ["eval", "--model", tiny_model, "--output-dir", str(out), "lm_eval_tasks=[alignkit_tiny_mc]"]
    with pytest.raises(SystemExit) as info:
        main([*argv, f"lm_eval_include_path={task_dir}"])
    assert info.value.code == 0
    report = json.loads((out / "eval.json").read_text())
    row = report["metrics"]["lm_eval:alignkit_tiny_mc"]
    assert row["value"] == round(share(picks["base"], MIXED) * 12) / 12 and row["n"] == 12
    assert "accuracy" in report["skipped"]  # no dataset: the generation metrics are named as not measured
