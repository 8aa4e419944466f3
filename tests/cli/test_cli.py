"""Config validation and the command line: every user mistake is one message and exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from alignkit.cli import main
from alignkit.config import load_config
from alignkit.errors import UserError
from tests.conftest import REPO, write_jsonl


def _cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(args)
    out, err = capsys.readouterr()
    return int(info.value.code), out, err


def _yaml(path: Path, **keys) -> str:
    path.write_text("".join(f"{k}: {v}\n" for k, v in keys.items()))
    return str(path)


def test_overrides_win_and_types_are_coerced(tmp_path: Path) -> None:
    cfg = load_config(
        _yaml(
            tmp_path / "c.yaml", stage="sft", model_name_or_path="m", dataset="d.jsonl", learning_rate="1e-4"
        ),
        ["learning_rate=3e-5", "lora.r=16", "per_device_train_batch_size=2", "shuffle=false"],
    )
    assert cfg.learning_rate == 3e-5 and cfg.lora_r == 16 and cfg.per_device_train_batch_size == 2
    assert cfg.shuffle is False


def test_yaml_sections_are_a_spelling_of_flat_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "stage: sft\nmodel_name_or_path: m\ndataset: d\nfinetuning_type: lora\nlora:\n  r: 4\n  alpha: 8\n"
    )
    cfg = load_config(str(path))
    assert (cfg.lora_r, cfg.lora_alpha) == (4, 8)


@pytest.mark.parametrize(
    "override,pattern",
    [
        (
            "learning_rat=1e-4",
            r"unknown key `learning_rat` for stage `sft` \(did you mean `learning_rate`\?\)",
        ),
        ("learning_rate=-1", r"`learning_rate` must be >= 0"),
        ("per_device_train_batch_size=two", r"`per_device_train_batch_size`: expected an integer"),
        ("finetuning_type=lroa", r"`finetuning_type: lroa` is not valid \(did you mean `lora`\?\)"),
        ("stage=dpoo", r"is not a stage"),
        ("packing=maybe", r"`packing`: expected true or false"),
    ],
)
def test_bad_config_values_name_the_key(override: str, pattern: str, tmp_path: Path) -> None:
    path = _yaml(tmp_path / "c.yaml", stage="sft", model_name_or_path="m", dataset="d.jsonl")
    with pytest.raises(UserError, match=pattern):
        load_config(path, [override])


def test_stage_keys_do_not_leak(tmp_path: Path) -> None:
    path = _yaml(tmp_path / "c.yaml", stage="rm", model_name_or_path="m", dataset="d.jsonl")
    with pytest.raises(UserError, match="unknown key `packing` for stage `rm`"):
        load_config(path, ["packing=true"])


def _setup(tmp_path: Path, tiny_model: str, rows: list[dict] | None = None, **keys) -> str:
    data = write_jsonl(tmp_path / "d.jsonl", rows or [{"prompt": "Q", "completion": "A"}] * 4)
    base = {
        "stage": "sft",
        "model_name_or_path": tiny_model,
        "dataset": data,
        "output_dir": str(tmp_path / "out"),
        "max_steps": 1,
        "disable_tqdm": "true",
        "plot_loss": "false",
    }
    return _yaml(tmp_path / "c.yaml", **{**base, **keys})


@pytest.mark.parametrize(
    "case,pattern",
    [
        ("missing_file", "dataset .*nope.jsonl does not exist"),
        ("bad_model", r"there is no model folder .*no_model; give a local model folder or a hub id"),
        ("hub_model_offline", r"no model folder nobody-here/no-such-model here .*HF_HUB_OFFLINE is set"),
        ("bad_json", r"d\.jsonl line 2: not valid JSON"),
        ("empty_completion", r"line 1: `completion` is empty"),
        ("bad_label", r"line 1: `label` must be true or false"),
        ("all_truncated", "every row was truncated away"),
        ("typo_key", r"did you mean `learning_rate`"),
        ("negative_lr", r"`learning_rate` must be >= 0"),
        ("wrong_kind", r"stage `rm` trains on pair data"),
    ],
)
def test_bad_input_exits_2_with_one_message(
    case: str, pattern: str, tiny_model: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = _setup(tmp_path, tiny_model)
    extra: list[str] = []
    if case == "missing_file":
        extra = [f"dataset={tmp_path / 'nope.jsonl'}"]
    elif case == "bad_model":
        extra = [f"model_name_or_path={tmp_path / 'no_model'}"]
    elif case == "hub_model_offline":  # the hub code path is real; offline, a missing id is a clear error
        extra = ["model_name_or_path=nobody-here/no-such-model"]
    elif case == "bad_json":
        (tmp_path / "d.jsonl").write_text('{"prompt": "Q", "completion": "A"}\n{"prompt": \n')
    elif case == "empty_completion":
        (tmp_path / "d.jsonl").write_text('{"prompt": "Q", "completion": ""}\n')
    elif case == "bad_label":
        (tmp_path / "d.jsonl").write_text('{"prompt": "Q", "completion": "A", "label": "maybe"}\n')
        extra = ["stage=rm"]
    elif case == "all_truncated":
        extra = ["max_length=1"]
    elif case == "typo_key":
        extra = ["learning_rat=1"]
    elif case == "negative_lr":
        extra = ["learning_rate=-0.1"]
    elif case == "wrong_kind":
        extra = ["stage=rm"]
    code, _, err = _cli(["train", cfg, *extra], capsys)
    assert code == 2
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("alignkit: error:")]) == 1
    import re

    assert re.search(pattern, err), err


def test_debug_flag_shows_the_traceback(tiny_model: str, tmp_path: Path) -> None:
    cfg = _setup(tmp_path, tiny_model)
    with pytest.raises(UserError, match="did you mean"):
        main(["--debug", "train", cfg, "learning_rat=1"])


def test_failed_run_keeps_what_output_dir_had(
    tiny_model: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A good run, then a run that fails on its data: the first run's files are untouched."""
    cfg = _setup(tmp_path, tiny_model)
    code, _, _ = _cli(["train", cfg], capsys)
    assert code == 0
    out = tmp_path / "out"
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    (tmp_path / "bad.jsonl").write_text('{"prompt": "Q", "completion": "A"}\n{broken\n')
    code, _, err = _cli(
        ["train", cfg, f"dataset={tmp_path / 'bad.jsonl'}", "overwrite_output_dir=true"], capsys
    )
    assert code == 2 and "line 2" in err
    code, _, err = _cli(["train", cfg], capsys)  # a second good run may not replace the first unasked
    assert code == 2 and "already holds a run" in err and "overwrite_output_dir" in err
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == before


def test_subprocess_exit_code_and_no_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "alignkit", "data", "inspect", str(tmp_path / "missing.jsonl")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_tiny_command_writes_a_loadable_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    code, out, _ = _cli(
        ["tiny", str(tmp_path / "t"), "--vocab-size", "300", "--hidden-size", "32", "--layers", "1"], capsys
    )
    assert code == 0 and "written" in out
    tok = AutoTokenizer.from_pretrained(tmp_path / "t")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "t")
    assert model.config.num_hidden_layers == 1 and model.config.hidden_size == 32
    assert len(tok) == 300 and tok.eos_token == "<|im_end|>"
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(tok("Any text, even ünïcode 123.")["input_ids"]) == "Any text, even ünïcode 123."


def test_data_inspect_command(tmp_path: Path, tiny_model: str, capsys: pytest.CaptureFixture) -> None:
    rows = [{"prompt": "Q", "completion": "A", "label": i < 1} for i in range(4)]
    code, out, _ = _cli(
        ["data", "inspect", write_jsonl(tmp_path / "k.jsonl", rows), "--model", tiny_model], capsys
    )
    assert code == 0
    assert "format `unpaired`, 4 rows" in out and "1 desirable, 3 undesirable" in out
    assert "desirable_weight 3.0" in out


def test_help_lists_every_command(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = _cli(["--help"], capsys)
    assert code == 0
    for cmd in ("train", "tiny", "data", "quickstart"):
        assert cmd in out
    code, out, _ = _cli(["train", "--help"], capsys)
    assert "examples:" in out and "key=value" in out


# --------------------------------------------------------------------------- launching several processes
def test_train_help_shows_a_launch_that_starts_two_processes(capsys: pytest.CaptureFixture) -> None:
    """`accelerate launch --cpu --num_processes 2` starts one process (without an MPI host file)."""
    code, out, _ = _cli(["train", "--help"], capsys)
    assert code == 0
    assert "torchrun --nproc_per_node 2 -m alignkit train" in out
    assert not [line for line in out.splitlines() if line.strip().startswith("accelerate launch --cpu")]


# What `accelerate launch --cpu --num_processes 2 script.py` put in the one process it started (accelerate
# 1.15, read from the process; no WORLD_SIZE, no RANK).
ACCELERATE_CPU_2 = {
    "ACCELERATE_USE_CPU": "True",
    "ACCELERATE_MIXED_PRECISION": "no",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29500",
    "OMP_NUM_THREADS": "1",
}


@pytest.mark.parametrize(
    "env,fires",
    [
        (ACCELERATE_CPU_2, True),
        ({"ACCELERATE_USE_CPU": "True", "OMP_NUM_THREADS": "1"}, False),  # --cpu, one process asked
        ({**ACCELERATE_CPU_2, "WORLD_SIZE": "2", "RANK": "0"}, False),  # torchrun
        ({**ACCELERATE_CPU_2, "PMI_SIZE": "2", "PMI_RANK": "0"}, False),  # --mpirun_hostfile (Intel MPI)
        ({**ACCELERATE_CPU_2, "OMPI_COMM_WORLD_SIZE": "2"}, False),  # --mpirun_hostfile (Open MPI)
        ({}, False),
    ],
)
def test_single_process_cpu_launch_is_detected(env: dict[str, str], fires: bool) -> None:
    from alignkit.training.launch import single_process_launch_hint

    hint = single_process_launch_hint(env)
    if fires:
        assert "single process" in hint
        assert "torchrun --nproc_per_node N -m alignkit train" in hint
        assert "accelerate launch --multi_gpu --num_processes N" in hint
    else:
        assert hint is None


def test_accelerator_warns_on_a_single_process_cpu_launch(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    from alignkit.training.launch import make_accelerator

    for key, value in ACCELERATE_CPU_2.items():
        monkeypatch.setenv(key, value)
    for key in ("WORLD_SIZE", "RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    cfg = load_config(_yaml(tmp_path / "c.yaml", stage="sft", model_name_or_path="m", dataset="d.jsonl"))
    with caplog.at_level("WARNING", logger="alignkit"):
        accelerator = make_accelerator(cfg)
    assert accelerator.num_processes == 1
    assert [r.getMessage() for r in caplog.records if "torchrun --nproc_per_node N" in r.getMessage()]


# ------------------------------------------------------------------------- files that are not UTF-8
def _latin1_source(tmp_path: Path, kind: str) -> tuple[str, str]:
    """A data source whose third line holds a Latin-1 byte (0xe9, 'é'); returns (source, file named)."""
    good, bad = b'{"prompt": "Q", "completion": "A"}', b'{"prompt": "caf\xe9?", "completion": "A"}'
    if kind == "jsonl":
        path, data = tmp_path / "latin1.jsonl", b"\n".join([good, good, bad, good]) + b"\n"
    elif kind == "json":
        path, data = tmp_path / "latin1.json", b"[\n" + b",\n".join([good, bad, good]) + b"\n]\n"
    elif kind == "csv":
        path, data = tmp_path / "latin1.csv", b"prompt,completion\nQ,A\ncaf\xe9?,A\nQ,A\n"
    else:  # a folder read through `datasets`
        (tmp_path / "folder").mkdir()
        write_jsonl(tmp_path / "folder" / "a.jsonl", [{"prompt": "Q", "completion": "A"}] * 3)
        path, data = tmp_path / "folder" / "b.jsonl", b"\n".join([good, good, bad]) + b"\n"
        path.write_bytes(data)
        return str(tmp_path / "folder"), str(path)
    path.write_bytes(data)
    return str(path), str(path)


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "folder"])
@pytest.mark.parametrize("command", ["inspect", "train"])
def test_non_utf8_data_names_the_file_and_line(
    kind: str, command: str, tiny_model: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    source, named = _latin1_source(tmp_path, kind)
    if command == "inspect":
        code, _, err = _cli(["data", "inspect", source], capsys)
    else:
        code, _, err = _cli(["train", _setup(tmp_path, tiny_model), f"dataset={source}"], capsys)
    assert code == 2, err
    assert "Traceback" not in err
    assert f"{named} line 3: not UTF-8" in err, err
    assert "iconv -f latin1 -t utf-8" in err


def test_non_utf8_csv_in_a_folder_is_one_line_in_a_subprocess(tmp_path: Path) -> None:
    """`datasets` logs its reader's failure before raising it; the user sees alignkit's line alone."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.csv").write_bytes(b"prompt,completion\nQ,A\ncaf\xe9?,A\n")
    proc = subprocess.run(
        [sys.executable, "-m", "alignkit", "data", "inspect", str(tmp_path / "folder")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"alignkit: error: {tmp_path / 'folder' / 'a.csv'} line 3: not UTF-8 (byte 0xe9 at column 4); "
        f"re-save the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 {tmp_path / 'folder' / 'a.csv'} > "
        f"{tmp_path / 'folder' / 'a.csv'}.utf8 && mv {tmp_path / 'folder' / 'a.csv'}.utf8 "
        f"{tmp_path / 'folder' / 'a.csv'}` if it is Latin-1"
    ]


@pytest.mark.parametrize("ext", ["jsonl", "json", "csv"])
def test_utf8_with_a_byte_order_mark_is_read(ext: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Excel's "CSV UTF-8" and Notepad start the file with a byte-order mark."""
    body = {
        "jsonl": b'{"prompt": "Q", "completion": "A"}\n',
        "json": b'[{"prompt": "Q", "completion": "A"}]',
        "csv": b"prompt,completion\nQ,A\n",
    }[ext]
    path = tmp_path / f"bom.{ext}"
    path.write_bytes(b"\xef\xbb\xbf" + body)
    code, out, err = _cli(["data", "inspect", str(path)], capsys)
    assert code == 0, err
    assert "format `prompt_completion`, 1 rows" in out


# ------------------------------------------------------------- a folder whose files have other columns
@pytest.mark.parametrize("ext", ["jsonl", "csv"])
@pytest.mark.parametrize("command", ["inspect", "train"])
def test_folder_with_different_columns_names_both_files(
    ext: str, command: str, tiny_model: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    if ext == "jsonl":
        write_jsonl(folder / "a.jsonl", [{"prompt": "Q", "completion": "A"}] * 2)
        write_jsonl(folder / "b.jsonl", [{"instruction": "Q", "output": "A"}] * 2)
    else:
        (folder / "a.csv").write_text("prompt,completion\nQ,A\n")
        (folder / "b.csv").write_text("instruction,output\nQ,A\n")
    if command == "inspect":
        code, _, err = _cli(["data", "inspect", str(folder)], capsys)
    else:
        code, _, err = _cli(["train", _setup(tmp_path, tiny_model), f"dataset={folder}"], capsys)
    assert code == 2, err
    assert "Traceback" not in err
    assert f"{folder / f'a.{ext}'} has columns completion, prompt" in err, err
    assert f"{folder / f'b.{ext}'} has columns instruction, output" in err, err


# ------------------------------------------------------------------- a model folder without a tokenizer
@pytest.mark.parametrize("keep", [(), ("tokenizer_config.json",)])
@pytest.mark.parametrize("command", ["inspect", "train"])
def test_model_folder_without_tokenizer_files(
    keep: tuple[str, ...], command: str, tiny_model: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import shutil

    model = tmp_path / "weights_only"
    model.mkdir()
    for name in ("config.json", "model.safetensors", *keep):
        shutil.copy(Path(tiny_model) / name, model / name)
    if command == "inspect":
        data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q", "completion": "A"}])
        code, _, err = _cli(["data", "inspect", data, "--model", str(model)], capsys)
    else:
        code, _, err = _cli(["train", _setup(tmp_path, tiny_model), f"model_name_or_path={model}"], capsys)
    assert code == 2, err
    assert "Traceback" not in err
    assert f"model folder {model}" in err and "tokenizer" in err, err
    assert "copy them from the base model" in err, err


def test_tokenizer_only_folder_is_enough_for_data_inspect(
    tiny_model: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`--model` only counts tokens: a folder with the tokenizer files and no weights or config.json does."""
    import shutil

    tok = tmp_path / "tok"
    tok.mkdir()
    for p in Path(tiny_model).iterdir():
        if p.name.startswith("tokenizer") or p.name == "chat_template.jinja":
            shutil.copy(p, tok / p.name)
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q", "completion": "A"}])
    code, out, err = _cli(["data", "inspect", data, "--model", str(tok)], capsys)
    assert code == 0, err
    assert "lengths in tokens" in out


def test_log_lines_keep_tracebacks_and_libraries_without_a_printing_handler(
    capsys: pytest.CaptureFixture,
) -> None:
    """The command line's log format: `[name] message`, a logged exception's traceback kept; a library whose
    logger has only a NullHandler (urllib3) still gets its warnings shown, one that prints itself is not
    repeated."""
    import io
    import logging

    from alignkit.cli.main import OwnHandlersFirst, Prefixed

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(Prefixed())
    handler.addFilter(OwnHandlersFirst())
    root = logging.getLogger()  # where the command line puts its handler
    root.addHandler(handler)
    quiet, own = logging.getLogger("alignkit_test_root.quiet"), logging.getLogger("alignkit_test_root.own")
    quiet.addHandler(logging.NullHandler())
    own.addHandler(logging.StreamHandler(io.StringIO()))
    try:
        quiet.warning("retrying")
        own.warning("printed by its own handler")
        try:
            raise ZeroDivisionError("boom")
        except ZeroDivisionError:
            logging.getLogger("alignkit_test_root.x").exception("generation failed")
    finally:
        root.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    lines = lines[next(i for i, line in enumerate(lines) if line.startswith("[alignkit_test_root]")) :]
    assert lines[0] == "[alignkit_test_root] retrying"
    assert lines[1] == "[alignkit_test_root] generation failed"
    assert lines[2] == "Traceback (most recent call last):" and lines[-1] == "ZeroDivisionError: boom"
    assert not [line for line in lines if "printed by its own handler" in line]
