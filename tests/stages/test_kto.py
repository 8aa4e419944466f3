"""KTO: TRL parity, the reference point z0, any batch size, the weights, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from alignkit.errors import UserError
from alignkit.losses.unpaired import KTO_LOSSES, kto_loss
from tests.conftest import first_step, run_stage, write_jsonl

Q = ["What is 12 + 7?", "Name a colour of the sky.", "Say hello in French.", "Count to three.", "Spell cat."]
A = ["19", "Blue, on a clear day.", "Bonjour!", "One, two, three.", "C, A, T."]
LABELS = [True, False, True, True, False]
CONV = [
    {
        "prompt": [{"role": "user", "content": q}],
        "completion": [{"role": "assistant", "content": a}],
        "label": lab,
    }
    for q, a, lab in zip(Q, A, LABELS)
]
STD = [{"prompt": q, "completion": " " + a, "label": lab} for q, a, lab in zip(Q, A, LABELS)]
METRICS = (
    "kl",
    "entropy",
    "logits/chosen",
    "logits/rejected",
    "rewards/chosen",
    "rewards/rejected",
    "logps/chosen",
    "logps/rejected",
    "rewards/margins",
)


def _ours(tmp_path: Path, model: str, rows: list[dict], **keys) -> dict:
    return first_step(tmp_path, "kto", model, rows, **keys)


@pytest.mark.parametrize(
    "form,batch,loss_type,extra",
    [
        ("conversational", 4, "kto", {}),
        ("standard", 4, "kto", {}),
        ("conversational", 3, "kto", {"desirable_weight": 1.5, "undesirable_weight": 0.7, "beta": 0.3}),
        ("standard", 4, "apo_zero_unpaired", {}),
    ],
)
def test_kto_first_step_matches_trl(
    form: str, batch: int, loss_type: str, extra: dict, tiny_model: str, tiny_ref: str, tmp_path: Path
) -> None:
    from tests.trl_oracle import trl_first_step

    rows = CONV if form == "conversational" else STD
    keys = {"loss_type": loss_type, "per_device_train_batch_size": batch, **extra}
    log, prepared = trl_first_step("kto", tiny_model, rows, ref_dir=tiny_ref, **keys)
    ours = _ours(tmp_path, tiny_model, rows, ref_model_name_or_path=tiny_ref, **keys)
    for name in ("loss", "grad_norm", *METRICS):
        if name in log:
            assert ours[name] == pytest.approx(log[name], rel=1e-4, abs=1e-6), name
    assert abs(log["rewards/chosen"]) > 1e-3
    from alignkit.data.batches import build_unpaired_rows
    from alignkit.data.formats import load_examples
    from alignkit.modeling.load import load_tokenizer

    mine, _ = build_unpaired_rows(
        load_examples(write_jsonl(tmp_path / "x.jsonl", rows)), load_tokenizer(tiny_model), 1024, None, batch
    )
    for key in ("prompt_ids", "completion_ids"):
        assert [m[key] for m in mine] == [p[key] for p in prepared]
    # the KL pairs agree wherever TRL's are mismatched (a last chunk of one row is matched in TRL, not here)
    full = len(rows) // batch * batch
    if loss_type == "kto":
        assert [m["kl_completion_ids"] for m in mine[:full]] == [
            p["KL_completion_ids"] for p in prepared[:full]
        ]


def test_kto_loss_and_z0_by_hand() -> None:
    """Desirable: w_D (1 - s(beta (r - z0))); undesirable: w_U (1 - s(beta (z0 - r)))."""
    r = torch.tensor([1.0, -2.0, 0.5])
    lab = torch.tensor([True, False, True])
    got = kto_loss(r, lab, torch.tensor(0.25), beta=0.5, desirable_weight=2.0, undesirable_weight=1.0)

    def s(x: float) -> float:
        return 1 / (1 + math.exp(-x))

    expected = [2 * (1 - s(0.5 * 0.75)), 1 - s(0.5 * 2.25), 2 * (1 - s(0.5 * 0.25))]
    assert got.tolist() == pytest.approx(expected, rel=1e-6)
    assert got.tolist() == pytest.approx([0.81470, 0.24509, 0.93758], abs=1e-4)
    apo = KTO_LOSSES["apo_zero_unpaired"].fn(r, lab, torch.tensor(9.0), beta=0.5)
    assert apo.tolist() == pytest.approx([1 - s(0.5), s(-1.0), 1 - s(0.25)], rel=1e-6)  # z0 plays no part


def test_kl_partners_are_always_mismatched() -> None:
    from alignkit.data.batches import assign_kl_partners

    rows = [{"completion_ids": [i]} for i in range(5)]
    assign_kl_partners(rows, 1)  # batch size 1: from the neighbouring row
    assert [r["kl_completion_ids"] for r in rows] == [[1], [0], [1], [2], [3]]
    assign_kl_partners(rows, 2)  # chunks [0,1] [2,3] [4]: swap inside, the lone last row looks back
    assert [r["kl_completion_ids"] for r in rows] == [[1], [0], [3], [2], [3]]


@pytest.mark.parametrize("batch", [1, 3])
def test_kto_runs_at_any_batch_size_without_nan(
    batch: int, tiny_model: str, tiny_ref: str, tmp_path: Path
) -> None:
    """Batch 1 (every batch single-label) and odd batches train with finite losses and a clamped z0."""
    rows = CONV * 2
    _ours(
        tmp_path,
        tiny_model,
        rows,
        ref_model_name_or_path=tiny_ref,
        per_device_train_batch_size=batch,
        max_steps=4,
        learning_rate=1e-3,
    )
    records = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert len(records) == 4
    for r in records:
        assert math.isfinite(r["loss"]) and r["kl"] >= 0.0
        assert "rewards/chosen" in r or "rewards/rejected" in r
        assert all(v == v for v in r.values() if isinstance(v, float))  # no NaN anywhere in the log
    if batch == 1:  # each step holds one label only: the other group's keys are absent, not NaN
        assert any("rewards/rejected" not in r for r in records)


# 8 rows in which rows 1 and 3 of each 4 share a completion: their KL partners (the previous row's completion
# inside chunks of the per-device batch, see assign_kl_partners) are then the same at batch 4 and at batch 2,
# so 1 process x batch 4 and 2 processes x batch 2 see the same KL sequences
Z0_ROWS = [
    dict(CONV[i % 5], completion=[{"role": "assistant", "content": a}], label=lab)
    for i, (a, lab) in enumerate(
        zip(
            ["19", "Blue.", "Bonjour!", "Blue.", "C, A, T.", "Four.", "An apple.", "Four."],
            [True, False, True, True, False, True, False, False],
        )
    )
]


def test_single_label_data_is_an_error_unless_allowed(tiny_model: str, tmp_path: Path) -> None:
    rows = [dict(r, label=True) for r in CONV]
    with pytest.raises(UserError, match=r"every training row is desirable.*allow_single_label"):
        _ours(tmp_path / "a", tiny_model, rows)
    record = _ours(tmp_path / "b", tiny_model, rows, allow_single_label=True)
    assert math.isfinite(record["loss"]) and "rewards/rejected" not in record


def test_auto_weights_follow_the_paper(
    tiny_model: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rows = [dict(CONV[i % 5], label=i % 5 == 0) for i in range(10)]  # 2 desirable : 8 undesirable
    caplog.set_level("INFO", logger="alignkit")
    _ours(tmp_path, tiny_model, rows, desirable_weight="auto", undesirable_weight="auto")
    assert "desirable_weight=4.0 undesirable_weight=1.0" in caplog.text
    with open(tmp_path / "out" / "config.yaml") as fh:
        assert "desirable_weight: 4.0" in fh.read()
    caplog.clear()
    _ours(tmp_path / "w", tiny_model, rows, desirable_weight=1.0)
    assert "outside the paper's recommended [1, 4/3]" in caplog.text


def test_paired_data_is_unpaired(tiny_model: str, tmp_path: Path) -> None:
    from alignkit.data.formats import load_examples
    from alignkit.stages.kto import unpair

    pairs = [{"prompt": "Q", "chosen": " good", "rejected": " bad"}]
    exs = unpair(load_examples(write_jsonl(tmp_path / "p.jsonl", pairs)))
    assert [(e.completion, e.label) for e in exs] == [(" good", True), (" bad", False)]
    record = _ours(tmp_path, tiny_model, pairs * 2)
    assert record["count/chosen"] == 2 and record["count/rejected"] == 2
    assert record["loss"] == pytest.approx(0.5, abs=1e-6)  # reference == starting policy: z0 = 0, r = 0


def test_kto_on_real_llamafactory_file(shared_data: Path, tiny_model: str, tmp_path: Path) -> None:
    path = str(shared_data / "llamafactory" / "kto_en_demo.json")
    record, _ = run_stage(
        tmp_path,
        {
            "stage": "kto",
            "model_name_or_path": tiny_model,
            "dataset": path,
            "max_steps": 1,
            "per_device_train_batch_size": 2,
            "max_length": 256,
            "torch_dtype": "float32",
        },
    )
    assert record["loss"] == pytest.approx(0.5, abs=1e-6) and record["kl"] == 0.0


def test_kto_precomputed_reference_equals_live(tiny_model: str, tiny_ref: str, tmp_path: Path) -> None:
    live = _ours(tmp_path / "a", tiny_model, CONV, ref_model_name_or_path=tiny_ref)
    cached = _ours(
        tmp_path / "b", tiny_model, CONV, ref_model_name_or_path=tiny_ref, precompute_ref_log_probs=True
    )
    for key in ("loss", "kl", "rewards/chosen", "rewards/rejected"):
        assert cached[key] == pytest.approx(live[key], rel=1e-5, abs=1e-7), key
    assert any(p.name.startswith("train-") for p in (tmp_path / "b" / "out" / "ref_logps").iterdir())
