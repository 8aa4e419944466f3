"""2 processes (DDP over gloo) give 1 process's numbers: SFT with a short last global batch and evaluation,
DPO's per-pair loss, the reward model's several forwards a step (length groups), KTO's fillers left out of z0,
and KTO's z0 averaged over the global batch.

The four runs share one `accelerate launch --multi_gpu --num_processes 2` (on a machine without GPUs it starts
the processes through torchrun: accelerate 1.x's `--cpu` launcher starts one process unless mpirun is given),
each config trained in turn by the same two processes, so the suite pays for one start-up, not four."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, run_stage, write_jsonl
from tests.stages.test_dpo import CONV as PAIRS
from tests.stages.test_kto import CONV as KTO_ROWS
from tests.stages.test_kto import Z0_ROWS
from tests.stages.test_padding_free import PAIRS as RM_PAIRS
from tests.training.test_loop import _metrics, _pref_keys, _rows, _sft

pytestmark = pytest.mark.slow  # a two-process run: not in the fast tier

ENTRY = """
import json, os, sys, threading
import alignkit
from alignkit.cli import main

for config in sys.argv[1:]:
    if config.endswith(".stop.yaml"):  # the library, stopped from the main process only, after step 2
        stop = threading.Event()
        def on_event(event):
            if event.kind == "step" and event.step == 2 and os.environ.get("RANK") == "0":
                stop.set()
        run = alignkit.train(config, stop=stop, callbacks=[on_event])
        out = os.path.join(os.path.dirname(config), "stopped-" + os.environ["RANK"] + ".json")
        with open(out, "w") as fh:
            json.dump({"stopped": run.stopped, "steps": run.steps, "checkpoint": run.checkpoint}, fh)
        continue
    try:
        main(["train", config])
    except SystemExit as exc:
        if exc.code:
            raise
"""


def _configs(root: Path, tiny_model: str, tiny_ref: str, tiny_rm: str) -> dict[str, dict]:
    """name -> the keys of one process's run (2 processes run them with per_device_train_batch_size 2)."""
    sft = _sft(
        tiny_model,
        write_jsonl(root / "d.jsonl", _rows(13)),
        num_train_epochs=1,
        shuffle=False,
        eval_dataset=write_jsonl(root / "e.jsonl", _rows(16)[14:15]),  # one eval row: a filler on process 2
        eval_steps=4,
        per_device_train_batch_size=4,
    )
    dpo = {**_pref_keys(tiny_model, tiny_ref, write_jsonl(root / "p.jsonl", (PAIRS * 4)[:15]))}
    dpo["per_device_train_batch_size"] = 4
    kto = {**_pref_keys(tiny_model, tiny_ref, write_jsonl(root / "k.jsonl", (KTO_ROWS * 2)[:9]))}
    kto.update(stage="kto", learning_rate=0.0, per_device_train_batch_size=2)
    z0 = {**_pref_keys(tiny_model, tiny_ref, write_jsonl(root / "z.jsonl", Z0_ROWS))}
    z0.update(stage="kto", max_steps=2, per_device_train_batch_size=4)
    del z0["num_train_epochs"]
    rm = {**_pref_keys(tiny_rm, tiny_ref, write_jsonl(root / "r.jsonl", RM_PAIRS * 2))}
    rm.update(stage="rm", per_device_train_batch_size=4)
    del rm["ref_model_name_or_path"]
    return {"sft": sft, "dpo": dpo, "rm": rm, "kto_filler": kto, "kto_z0": z0}


@pytest.fixture(scope="module")
def runs(
    tiny_model: str, tiny_ref: str, tiny_rm: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Each config's output folder under 2 processes (`<name>/two`) and under 1 (`<name>/one`)."""
    root = tmp_path_factory.mktemp("two_processes")
    configs = _configs(root, tiny_model, tiny_ref, tiny_rm)
    paths = []
    for name, keys in configs.items():
        two = {**keys, "output_dir": str(root / name / "two"), "disable_tqdm": True, "plot_loss": False}
        if name != "kto_filler":  # the others halve the per-process batch: the same global batch
            two["per_device_train_batch_size"] = keys["per_device_train_batch_size"] // 2
        path = root / f"{name}.yaml"
        path.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in two.items()))
        paths.append(str(path))
    stop = {**configs["sft"], "output_dir": str(root / "stop" / "two"), "max_steps": 6, "num_train_epochs": 1}
    stop.update(disable_tqdm=True, plot_loss=False, per_device_train_batch_size=2)
    (root / "stop").mkdir()
    (root / "stop" / "run.stop.yaml").write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in stop.items()))
    paths.append(str(root / "stop" / "run.stop.yaml"))
    (root / "entry.py").write_text(ENTRY)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no"]
    cmd += ["--dynamo_backend", "no", str(root / "entry.py"), *paths]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    for name, keys in configs.items():  # the one-process runs, while the two processes work
        run_stage(root / name / "one", keys)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    return {**{name: root / name for name in configs}, "stop": root / "stop"}


def test_sft_two_processes_equal_one(runs: dict[str, Path]) -> None:
    """2 processes x batch 2 == 1 process x batch 4 (per-step loss within 1e-5), every step of an epoch of 13
    rows, whose last global batch is one row: the second process runs a filler at weight 0 (and in the
    evaluation on one row)."""
    ours, single = _metrics(str(runs["sft"] / "two")), _metrics(str(runs["sft"] / "one" / "out"))
    assert len(ours) == len(single) == 4  # same global batch: 4 steps an epoch, the last one short
    assert [r["epoch"] for r in ours] == [r["epoch"] for r in single]
    assert [r["loss"] for r in ours] == pytest.approx([r["loss"] for r in single], abs=1e-5)
    assert [r["num_tokens"] for r in ours] == [r["num_tokens"] for r in single]
    assert [r["mean_token_accuracy"] for r in ours] == pytest.approx(
        [r["mean_token_accuracy"] for r in single], abs=1e-6
    )
    assert ours[-1]["eval_loss"] == pytest.approx(single[-1]["eval_loss"], abs=1e-5)


def test_dpo_two_processes_equal_one(runs: dict[str, Path]) -> None:
    """DPO's per-pair loss splits over processes exactly, also over a short last global batch (15 pairs: 3 in
    the last one, dealt 2 + 1)."""
    two, single = _metrics(str(runs["dpo"] / "two")), _metrics(str(runs["dpo"] / "one" / "out"))
    assert len(two) == len(single) == 4
    for name in (
        "loss",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
    ):  # logps: float32 sums of ~50
        assert [r[name] for r in two] == pytest.approx([r[name] for r in single], rel=1e-6, abs=1e-5), name
    assert [r["num_tokens"] for r in two] == [r["num_tokens"] for r in single]


def test_rm_two_processes_equal_one(runs: dict[str, Path]) -> None:
    """The reward model runs each process's rows as groups of similar length, a forward per group before one
    backward: DDP averages the same gradients (8 pairs: 2 steps of 4, dealt 2 + 2)."""
    two, single = _metrics(str(runs["rm"] / "two")), _metrics(str(runs["rm"] / "one" / "out"))
    assert len(two) == len(single) == 2 and single[0]["loss"] != pytest.approx(single[1]["loss"], abs=1e-4)
    for name in ("loss", "accuracy", "margin"):
        assert [r[name] for r in two] == pytest.approx([r[name] for r in single], abs=1e-5), name
    assert [r["grad_norm"] for r in two] == pytest.approx([r["grad_norm"] for r in single], rel=1e-5)


def test_kto_leaves_the_filler_out_of_z0(runs: dict[str, Path]) -> None:
    """With the weights held still (learning rate 0), the last step of 2 processes x batch 2 on 9 rows (one
    real row, one filler) equals the last step of one process x batch 2: the same row alone, z0 from it."""
    two, single = _metrics(str(runs["kto_filler"] / "two")), _metrics(str(runs["kto_filler"] / "one" / "out"))
    assert len(two) == 3 and len(single) == 5
    for name in ("loss", "kl", "rewards/chosen", "logps/chosen"):
        assert two[-1][name] == pytest.approx(single[-1][name], abs=1e-6), name
    assert (
        two[-1]["num_tokens"] - two[-2]["num_tokens"] == single[-1]["num_tokens"] - single[-2]["num_tokens"]
    )


def test_kto_averages_z0_as_one_process_over_the_global_batch(
    runs: dict[str, Path], tiny_model: str, tiny_ref: str, tiny_rm: str, tmp_path: Path
) -> None:
    """z0 (logged `kl`) and the loss of 2 processes x batch 2 equal 1 process x batch 4 on the same global
    batches, at a z0 well above the clamp at 0 (the nudged reference). A z0 from each process's own rows would
    not: 1 process x batch 2 x accumulation 2 computes exactly that (one z0 per micro-batch of 2), and its loss
    differs here (each half's rows are scored against their own half's z0), so the test tells the two apart."""
    two, one = _metrics(str(runs["kto_z0"] / "two")), _metrics(str(runs["kto_z0"] / "one" / "out"))
    keys = _configs(tmp_path, tiny_model, tiny_ref, tiny_rm)["kto_z0"]
    run_stage(
        tmp_path / "local", {**keys, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2}
    )
    local = _metrics(str(tmp_path / "local" / "out"))
    assert len(one) == len(two) == 2
    assert all(r["kl"] > 0.3 for r in one)  # not clamped: an error in z0 shows in the loss
    for name in ("kl", "loss", "rewards/chosen", "rewards/rejected"):
        assert [r[name] for r in two] == pytest.approx([r[name] for r in one], rel=1e-5, abs=1e-5), name
    assert abs(local[0]["loss"] - one[0]["loss"]) > 1e-3


def test_a_stop_set_in_the_main_process_stops_both_at_the_same_step(runs: dict[str, Path]) -> None:
    """`alignkit.train(..., stop=event)` under 2 processes: the main process's stop (after step 2) is every
    process's, both return `stopped` at step 2 with the same checkpoint, and nothing hangs."""
    results = [json.loads((runs["stop"] / f"stopped-{rank}.json").read_text()) for rank in (0, 1)]
    checkpoint = str(runs["stop"] / "two" / "checkpoint-2")
    assert results == [{"stopped": True, "steps": 2, "checkpoint": checkpoint}] * 2
    assert (runs["stop"] / "two" / "checkpoint-2").is_dir() and not (
        runs["stop"] / "two" / "model.safetensors"
    ).exists()
    assert [r["step"] for r in _metrics(str(runs["stop"] / "two"))] == [1, 2]
