"""Prefix sharing and padding-free batches for DPO and KTO: the same numbers as the plain layout.

The layouts change how tokens are laid out (one prompt for both completions, a 4-D mask, restarted positions,
every sequence in one row), never what is computed: log-probs, losses, metrics and gradients must equal the
plain (padded, one row per completion) layout's to float rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignkit.errors import UserError
from tests.conftest import run_stage, write_jsonl

Q = [
    "Please explain in one short sentence what the sum of 12 plus 7 is, and why.",
    "Name a colour of the sky.",
    "You are a helpful assistant. Say hello in French, then say it in Spanish, then count to two.",
    "Count to three.",
    "What is 301 + 45?",
]
A = [
    "The sum is 19 because 12 plus 7 equals 19.",
    "Blue.",
    "Bonjour! Hola! One, two.",
    "One, two, three.",
    "346",
]
BAD = [
    "21",
    "Green, or maybe red on some days.",
    "Hola!",
    "One, three, two, four, five.",
    "The answer is 999.",
]
PAIRS = [{"prompt": q, "chosen": " " + a, "rejected": " " + b} for q, a, b in zip(Q, A, BAD)]
UNPAIRED = [
    {"prompt": q, "completion": " " + c, "label": lab}
    for q, c, lab in zip(Q + Q[:3], A + BAD[:3], [True, False, True, True, False, False, True, False])
]
LAYOUTS = [(True, False), (False, True), (True, True)]  # (prefix_sharing, padding_free)
MAX_LENGTH = 48  # cuts some completions: the layouts must cut them as the plain one does


def test_layout_positions_mask_and_predictors() -> None:
    from alignkit.data.batches import collate_pairs
    from alignkit.data.shared_prefix import attention_mask_4d, collate_shared_pairs

    rows = [
        {"prompt_ids": [11, 12, 13], "chosen_ids": [21, 22], "rejected_ids": [31, 32, 33]},
        {"prompt_ids": [14], "chosen_ids": [23], "rejected_ids": [34]},
    ]
    b = collate_shared_pairs(rows, 0, 5, prefix_sharing=True, padding_free=False)
    assert b["input_ids"].tolist() == [[11, 12, 13, 21, 22, 31, 32], [14, 23, 34, 0, 0, 0, 0]]
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 3, 4]  # rejected restarts at len(prompt)
    # chosen 0: from 13 and 21; chosen 1; rejected 0: its first token from the prompt's last (index 2)
    assert b["predict_at"].tolist() == [2, 3, 7, 2, 5, 7]
    assert b["labels"].tolist() == [21, 22, 23, 31, 32, 34]
    assert b["label_rows"].tolist() == [0, 0, 1, 2, 2, 3]
    plain = collate_pairs(rows, 0, 5)
    assert int(b["num_tokens"]) == int(plain["attention_mask"].sum()) == 5 + 5 + 2 + 2
    mask = attention_mask_4d(b["segment_ids"], b["branch_ids"])[:, 0].int()
    assert mask[0, 5].tolist() == [1, 1, 1, 0, 0, 1, 0]  # rejected sees the prompt, not chosen
    assert mask[0, 4].tolist() == [1, 1, 1, 1, 1, 0, 0]  # chosen is plain causal
    assert mask[1, 2].tolist() == [1, 0, 1, 0, 0, 0, 0]
    assert mask[1, 4].tolist() == [0, 0, 0, 0, 1, 0, 0]  # padding sees only itself (no NaN row)

    packed = collate_shared_pairs(rows, 0, 5, prefix_sharing=True, padding_free=True)
    assert packed["input_ids"].tolist() == [[11, 12, 13, 21, 22, 31, 32, 14, 23, 34]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4, 0, 1, 1]]
    m = attention_mask_4d(packed["segment_ids"], packed["branch_ids"])[0, 0].int()
    assert m[9].tolist() == [0] * 7 + [1, 0, 1]  # block-diagonal: the second pair never sees the first


def _stage(tmp_path: Path, stage: str, rows: list[dict], dtype: str, **keys):  # noqa: ANN202
    from alignkit.config import build_config
    from alignkit.stages import get_stage

    keys = {
        "stage": stage,
        "dataset": write_jsonl(tmp_path / "d.jsonl", rows),
        "output_dir": str(tmp_path / "out"),
        "torch_dtype": dtype,
        "max_length": MAX_LENGTH,
        **keys,
    }
    cfg = build_config(keys)
    st = get_stage(cfg.stage)(cfg)
    st.build()
    return st


def _run(st, rows: list[dict], layout: tuple[bool, bool]) -> tuple[float, dict, list[torch.Tensor]]:  # noqa: ANN001
    st.cfg.prefix_sharing, st.cfg.padding_free = layout
    st.model.zero_grad()
    out = st.step(st.model, st.collate(rows))
    out.loss_sum.backward()
    metrics = {k: float(s) / float(n) for k, (s, n) in out.metrics.items() if float(n)}
    return out.loss_sum.item(), metrics, [p.grad.clone() for p in st.model.parameters()]


def _assert_same(st, rows: list[dict], tol: float) -> None:  # noqa: ANN001
    loss, metrics, grads = _run(st, rows, (False, False))
    for layout in LAYOUTS:
        loss2, metrics2, grads2 = _run(st, rows, layout)
        assert loss2 == pytest.approx(loss, abs=tol), layout
        assert metrics2.keys() == metrics.keys()
        for k, v in metrics.items():
            assert metrics2[k] == pytest.approx(v, abs=tol, rel=tol), (layout, k)
        for g, g2 in zip(grads, grads2):
            # Llama's RMSNorm runs in float32 even in a float64 model, and the shared prompt sums the two
            # completions' gradients before it rather than after: float32 rounding, relative to the scale
            torch.testing.assert_close(g2, g, rtol=1e-4, atol=1e-6 * float(g.abs().max()))
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("loss_type,dtype,tol", [("sigmoid", "float64", 1e-10), ("simpo", "float32", 1e-5)])
def test_dpo_step_equal_across_layouts(
    loss_type: str, dtype: str, tol: float, tiny_model: str, tiny_ref: str, tmp_path: Path
) -> None:
    from alignkit.stages.preference import sequence_logps

    keys = {"loss_type": [loss_type], "model_name_or_path": tiny_model, "ref_model_name_or_path": tiny_ref}
    st = _stage(tmp_path, "dpo", PAIRS, dtype, **keys)
    rows = st.train_rows
    assert any(len(r["prompt_ids"]) + len(r["rejected_ids"]) > MAX_LENGTH for r in rows)  # a cut completion
    _assert_same(st, rows, tol)
    if loss_type == "sigmoid":  # the reference pass takes the layout too
        with torch.no_grad(), st.reference.active(st.model, torch.device("cpu")) as ref:
            st.cfg.prefix_sharing, st.cfg.padding_free = False, False
            plain = sequence_logps(ref, st.collate(rows))
            st.cfg.prefix_sharing = True
            shared = sequence_logps(ref, st.collate(rows))
        for key in plain:
            torch.testing.assert_close(shared[key], plain[key], rtol=0, atol=tol)


def test_kto_step_equal_across_layouts(tiny_model: str, tiny_ref: str, tmp_path: Path) -> None:
    keys = {"loss_type": "kto", "model_name_or_path": tiny_model, "ref_model_name_or_path": tiny_ref}
    st = _stage(tmp_path, "kto", UNPAIRED, "float32", per_device_train_batch_size=4, **keys)
    rows = st.train_rows[:4]
    _, metrics, _ = _run(st, rows, (False, False))
    assert metrics["kl"] > 0  # z0 is not clamped to 0: the KL completions count
    _assert_same(st, rows, 1e-5)
    st.cfg.prefix_sharing, st.cfg.padding_free = True, False
    assert st.collate(rows)["input_ids"].shape[0] == 4  # one row per prompt, the KL completion in it

    st.cfg.loss_type = "apo_zero_unpaired"  # no z0: a shared layout leaves the KL completions out
    _assert_same(st, rows, 1e-5)
    st.cfg.prefix_sharing, st.cfg.padding_free = True, False
    batch = st.collate(rows)
    assert int(batch["logical_rows"]) == 4 and int(batch["label_rows"].max()) == 3


def _records(tmp_path: Path, stage: str, data: list[dict], **keys) -> list[dict]:
    base = {
        "stage": stage,
        "dataset": write_jsonl(tmp_path / "d.jsonl", data),
        "max_steps": 2,
        "logging_steps": 1,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "shuffle": False,
        "torch_dtype": "float32",
        "learning_rate": 1e-2,
        "max_length": MAX_LENGTH,
        **keys,
    }
    _, out = run_stage(tmp_path, base)
    return [json.loads(line) for line in open(Path(out) / "metrics.jsonl") if '"loss"' in line]


@pytest.mark.parametrize(
    "stage,data,layout",
    [
        ("dpo", PAIRS, {"prefix_sharing": True}),
        ("kto", UNPAIRED, {"prefix_sharing": True, "padding_free": True}),
    ],
)
def test_training_with_prefix_sharing_logs_the_plain_losses(
    stage: str, data: list[dict], layout: dict, tiny_model: str, tiny_ref: str, tmp_path: Path
) -> None:
    """The public path, 2 steps of 2 micro-batches, the reference precomputed in the layout of the run."""
    keys = {
        "model_name_or_path": tiny_model,
        "ref_model_name_or_path": tiny_ref,
        "precompute_ref_log_probs": True,
    }
    plain = _records(tmp_path / "plain", stage, data, **keys)
    shared = _records(tmp_path / "shared", stage, data, **layout, **keys)
    assert len(plain) == len(shared) == 2
    assert plain[1]["loss"] != pytest.approx(plain[0]["loss"], abs=1e-4)  # the second step moved
    # the first step to float32 rounding; the second comes after an AdamW update, which moves every weight by
    # about the learning rate whatever its gradient's size, so rounding in tiny gradients reaches the loss
    # (1.1e-5 on an AVX-512 Xeon)
    for p, s, tol in zip(plain, shared, (1e-5, 5e-5)):
        assert s["loss"] == pytest.approx(p["loss"], abs=tol)
        assert s["grad_norm"] == pytest.approx(p["grad_norm"], rel=1e-4)
        assert s["num_tokens"] == p["num_tokens"] > 0


def test_a_flash_attention_or_sliding_window_model_is_refused() -> None:
    from types import SimpleNamespace

    from alignkit.data.shared_prefix import check_layout_support

    model = torch.nn.Linear(1, 1)
    model.config = SimpleNamespace(_attn_implementation="flash_attention_2")
    check_layout_support(SimpleNamespace(prefix_sharing=False, padding_free=False), model)  # off: no check
    with pytest.raises(UserError, match="attn_implementation: sdpa"):
        check_layout_support(SimpleNamespace(prefix_sharing=True, padding_free=False), model)
    model.config = SimpleNamespace(_attn_implementation="sdpa", sliding_window=16)
    with pytest.raises(UserError, match="sliding window of 16"):
        check_layout_support(SimpleNamespace(prefix_sharing=False, padding_free=True, max_length=32), model)
    check_layout_support(SimpleNamespace(prefix_sharing=True, padding_free=True, max_length=16), model)
    model.config.use_sliding_window = False  # Qwen2's config carries a window it does not use
    check_layout_support(SimpleNamespace(prefix_sharing=True, padding_free=False, max_length=32), model)
