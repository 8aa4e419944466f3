"""The DPO family: TRL parity per loss type, formulas on hand-computed tensors, log-probs, the reference."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from alignkit.errors import UserError
from alignkit.losses.preference import DPO_LOSSES, PairLogps, dpo_sigmoid
from tests.conftest import first_step, write_jsonl

Q = ["What is 12 + 7?", "Name a colour of the sky.", "Say hello in French.", "Count to three."]
A = ["19", "Blue, on a clear day.", "Bonjour!", "One, two, three."]
BAD = ["21", "Green.", "Hola!", "One, three, two."]
CONV = [
    {
        "prompt": [{"role": "user", "content": q}],
        "chosen": [{"role": "assistant", "content": a}],
        "rejected": [{"role": "assistant", "content": b}],
    }
    for q, a, b in zip(Q, A, BAD)
]
STD = [{"prompt": q, "chosen": " " + a, "rejected": " " + b} for q, a, b in zip(Q, A, BAD)]
METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "entropy",
    "mean_token_accuracy",
)


def _ours(tmp_path: Path, model: str, rows: list[dict], **keys) -> dict:
    return first_step(tmp_path, "dpo", model, rows, **keys)


def _close(ours: float, theirs: float, name: str) -> None:
    assert ours == pytest.approx(theirs, rel=1e-4, abs=1e-6), f"{name}: alignkit {ours} vs TRL {theirs}"


TRL_DPO_TYPES = [n for n in DPO_LOSSES if n not in ("simpo", "cpo", "orpo")]  # DPOTrainer's own loss types
CASES = [(lt, "conversational", {}) for lt in TRL_DPO_TYPES] + [
    ("sigmoid", "standard", {}),
    ("ipo", "standard", {}),
    ("sigmoid_norm", "standard", {}),
    ("sigmoid", "conversational", {"f_divergence_type": "forward_kl"}),
    ("sigmoid", "conversational", {"f_divergence_type": "js_divergence"}),
    ("sigmoid", "conversational", {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3}),
    ("hinge", "conversational", {"beta": 0.5}),
]


@pytest.mark.parametrize("loss_type,form,extra", CASES, ids=[f"{c[0]}-{c[1]}-{len(c[2])}" for c in CASES])
def test_dpo_first_step_matches_trl(
    loss_type: str, form: str, extra: dict, tiny_model: str, tiny_ref: str, tmp_path: Path
) -> None:
    from tests.trl_oracle import trl_first_step

    rows = CONV if form == "conversational" else STD
    eps = (
        0.1
        if DPO_LOSSES[loss_type].needs_smoothing or loss_type in ("robust", "aot", "aot_unpaired")
        else 0.0
    )
    keys = {"beta": 0.1, "loss_type": [loss_type], "label_smoothing": eps, **extra}
    log, prepared = trl_first_step("dpo", tiny_model, rows, ref_dir=tiny_ref, **keys)
    ours = _ours(tmp_path, tiny_model, rows, ref_model_name_or_path=tiny_ref, **keys)
    _close(ours["loss"], log["loss"], "loss")
    _close(ours["grad_norm"], log["grad_norm"], "grad_norm")
    # `sft` alone needs no reference, so alignkit loads none and its rewards are beta * logps (TRL loads one anyway)
    names = [m for m in METRICS if not (loss_type == "sft" and m.startswith("rewards/"))]
    for name in names:
        _close(ours[name], log[name], name)
    assert abs(log["rewards/margins"]) > 1e-3  # a reference that differs, so the comparison has teeth

    from alignkit.data.batches import encode_dpo_pair
    from alignkit.data.formats import load_examples
    from alignkit.modeling.load import load_tokenizer

    tok = load_tokenizer(tiny_model)
    mine = [encode_dpo_pair(ex, tok) for ex in load_examples(write_jsonl(tmp_path / "x.jsonl", rows))]
    for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert [m[key] for m in mine] == [p[key] for p in prepared]


def test_loss_weights_mix_matches_trl(tiny_model: str, tiny_ref: str, tmp_path: Path) -> None:
    from tests.trl_oracle import trl_first_step

    keys = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}
    log, _ = trl_first_step("dpo", tiny_model, CONV, ref_dir=tiny_ref, **keys)
    ours = _ours(tmp_path, tiny_model, CONV, ref_model_name_or_path=tiny_ref, **keys)
    _close(ours["loss"], log["loss"], "loss")
    _close(ours["grad_norm"], log["grad_norm"], "grad_norm")


def test_default_reference_is_the_starting_policy(tiny_model: str, tmp_path: Path) -> None:
    """No reference named: the starting policy, so the first step has zero log-ratios and loss ln 2 (as TRL)."""
    ours = _ours(tmp_path, tiny_model, CONV)
    assert ours["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert ours["rewards/margins"] == pytest.approx(0.0, abs=1e-6)


def test_token_ids_match_trl_on_real_sharegpt_and_implicit_prompts(
    tiny_model: str, shared_data: Path
) -> None:
    from alignkit.data.batches import encode_dpo_pair
    from alignkit.data.formats import load_examples
    from alignkit.modeling.load import load_tokenizer
    from tests.stages.test_parity_trl import _sharegpt_to_trl
    from tests.trl_oracle import trl_first_step

    tok = load_tokenizer(tiny_model)
    path = shared_data / "llamafactory" / "dpo_en_demo.json"
    raw = json.loads(path.read_text())[:10]
    implicit = [
        {"chosen": "The sky is blue today.", "rejected": "The sky is green today."},
        {"chosen": "Two plus two is four.", "rejected": "Two plus two is five."},
    ]
    for ours_src, theirs_rows in ((str(path), [_sharegpt_to_trl(r) for r in raw]), (None, implicit)):
        if ours_src is None:
            import tempfile

            ours_src = write_jsonl(Path(tempfile.mkdtemp()) / "i.jsonl", implicit)
        mine = [encode_dpo_pair(ex, tok) for ex in load_examples(ours_src)[: len(theirs_rows)]]
        _, theirs = trl_first_step("dpo", tiny_model, theirs_rows, train=False, max_length=None)
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            assert [m[key] for m in mine] == [t[key] for t in theirs]


def _pair(**kw) -> PairLogps:
    base = dict(
        chosen=torch.tensor([-5.0, -7.0]),
        rejected=torch.tensor([-6.0, -6.5]),
        ref_chosen=torch.tensor([-5.5, -6.0]),
        ref_rejected=torch.tensor([-5.0, -7.0]),
        chosen_len=torch.tensor([2.0, 4.0]),
        rejected_len=torch.tensor([3.0, 2.0]),
        chosen_nll_tokens=torch.tensor([5.0, 7.0]),
        batch_chosen_tokens=torch.tensor(6.0),
    )
    return PairLogps(**{**base, **kw})


def test_cdpo_label_smoothing_formula_by_hand() -> None:
    """cDPO (Mitchell 2023): -(1-e) log s(beta h) - e log s(-beta h), h the log-ratio margin. TRL dropped it."""
    p, beta, eps = _pair(), 0.5, 0.2
    # h = (chosen - ref_chosen) - (rejected - ref_rejected) = [0.5 - (-1.0), -1.0 - 0.5] = [1.5, -1.5]
    h = torch.tensor([1.5, -1.5])
    expected = [
        -(1 - eps) * math.log(1 / (1 + math.exp(-beta * x))) - eps * math.log(1 / (1 + math.exp(beta * x)))
        for x in h.tolist()
    ]
    got = dpo_sigmoid(p, beta=beta, label_smoothing=eps)
    assert got.tolist() == pytest.approx(expected, rel=1e-6)
    # by hand: log(1 + e^-0.75) = 0.38686, log(1 + e^0.75) = 1.13686 -> 0.8 * a + 0.2 * b and the mirror
    assert got.tolist() == pytest.approx([0.53686, 0.98686], abs=1e-4)
    assert not torch.allclose(got, dpo_sigmoid(p, beta=beta))  # smoothing changes the loss


def test_ipo_and_sft_terms_by_hand() -> None:
    p = _pair()
    ipo = DPO_LOSSES["ipo"].fn(p, beta=0.5)
    # per-token log-ratios: chosen [0.5/2, -1/4], rejected [-1/3, 0.5/2]; target 1/(2*0.5) = 1
    expected = [(0.25 + 1 / 3 - 1) ** 2, (-0.25 - 0.25 - 1) ** 2]
    assert ipo.tolist() == pytest.approx(expected, rel=1e-6)
    sft = DPO_LOSSES["sft"].fn(p)
    assert sft.sum().item() / 2 == pytest.approx(12.0 / 6.0)  # token mean of the chosen NLL


def test_chunked_logprobs_equal_full_logits_values_and_grads(tiny_model: str) -> None:
    from transformers import AutoModelForCausalLM

    from alignkit.losses.tokens import per_row_sum
    from alignkit.modeling.logprobs import completion_token_stats

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = torch.randint(5, 500, (3, 11), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids)
    attn[2, 8:] = 0
    cmask = torch.zeros_like(ids)
    cmask[:, 4:] = 1
    cmask[2, 8:] = 0
    stats = completion_token_stats(model, ids, attn, cmask, chunk_size=4)  # several chunks
    ours = per_row_sum(stats.logps, stats.rows, 3)
    g_ours = torch.autograd.grad(ours.sum(), model.model.embed_tokens.weight)[0]

    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1) * cmask[:, 1:]
    ref = lp.sum(-1)
    g_ref = torch.autograd.grad(ref.sum(), model.model.embed_tokens.weight)[0]
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(
        g_ours, g_ref, atol=1e-5, rtol=1e-4
    )  # float32 rounding of a different summation order
    assert stats.logps.numel() == int(cmask[:, 1:].sum())


def test_per_row_sum_rounds_once() -> None:
    """1,000 float32 log-probs per row: the float64 sum rounded once (float32 accumulation drifted 2 ulps)."""
    from alignkit.losses.tokens import per_row_sum

    values = -6 * torch.rand(2000, generator=torch.Generator().manual_seed(0))  # (N,) float32
    got = per_row_sum(values, torch.arange(2).repeat_interleave(1000), 2)
    assert got.dtype == torch.float32
    assert got.tolist() == values.double().view(2, 1000).sum(-1).float().tolist()


def test_lora_reference_is_the_adapter_disabled_base(tiny_model: str, tmp_path: Path) -> None:
    from alignkit.config import build_config
    from alignkit.stages.preference import PreferenceStage
    from alignkit.training.loop import train

    data = write_jsonl(tmp_path / "d.jsonl", CONV)
    cfg = build_config(
        {
            "stage": "dpo",
            "model_name_or_path": tiny_model,
            "dataset": data,
            "max_steps": 2,
            "logging_steps": 1,
            "per_device_train_batch_size": 4,
            "finetuning_type": "lora",
            "learning_rate": 1e-2,
            "output_dir": str(tmp_path / "out"),
            "disable_tqdm": True,
        }
    )
    stage = PreferenceStage(cfg)
    train(cfg, stage)
    assert stage.reference.use_adapter_off and stage.reference.model is None  # no second copy of the weights
    records = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert records[0]["loss"] == pytest.approx(
        math.log(2), abs=1e-6
    )  # adapter starts at zero: policy == base
    assert records[1]["rewards/margins"] > 0  # and moves away from the base


def test_precomputed_reference_is_cached_reused_and_keyed(
    tiny_model: str, tiny_ref: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from alignkit.modeling.reference import Reference

    cache = tmp_path / "cache"
    common = {
        "ref_model_name_or_path": tiny_ref,
        "precompute_ref_log_probs": True,
        "ref_cache_dir": str(cache),
    }
    live = _ours(tmp_path / "live", tiny_model, CONV, ref_model_name_or_path=tiny_ref)
    first = _ours(tmp_path / "a", tiny_model, CONV, **common)
    assert first["loss"] == pytest.approx(live["loss"], rel=1e-6)
    files = sorted(os.listdir(cache))
    assert len(files) == 1

    def no_load(self):  # noqa: ANN001, ANN202
        raise AssertionError("the reference model was loaded although the cache matched")

    monkeypatch.setattr(Reference, "_load", no_load)
    second = _ours(tmp_path / "b", tiny_model, CONV, **common)
    assert second["loss"] == pytest.approx(first["loss"], rel=1e-7)
    assert sorted(os.listdir(cache)) == files
    monkeypatch.undo()
    # another reference model -> another key -> recomputed, never the old values
    third = _ours(tmp_path / "c", tiny_model, CONV, **{**common, "ref_model_name_or_path": tiny_model})
    assert len(os.listdir(cache)) == 2
    assert third["loss"] == pytest.approx(math.log(2), abs=1e-6)


def _rewrite_middle_tensor(weights: Path) -> str:
    """Negate, in place, a tensor whose bytes lie wholly between the file's first and last MiB; the file stays
    a valid safetensors file of the same size. Returns the tensor's name."""
    raw = weights.read_bytes()
    header_len, mib = int.from_bytes(raw[:8], "little"), 1 << 20
    for name, info in json.loads(raw[8 : 8 + header_len]).items():
        if name == "__metadata__" or info["dtype"] != "F32":
            continue
        start, end = (8 + header_len + off for off in info["data_offsets"])
        if start > mib and end < len(raw) - mib:  # (a safetensors file: 8-byte length, JSON header, data)
            values = torch.frombuffer(bytearray(raw[start:end]), dtype=torch.float32)
            with open(weights, "r+b") as fh:
                fh.seek(start)
                fh.write((-values).numpy().tobytes())
            return name
    raise AssertionError(f"no tensor sits in the middle of {weights}")


def test_reference_cache_sees_a_change_in_the_middle_of_a_weight_file(
    tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache key covers every byte of the weights: a middle layer changed -> recomputed, new log-probs."""
    from alignkit.modeling.tiny import build_tiny

    monkeypatch.setenv("ALIGNKIT_CACHE_DIR", str(tmp_path / "user_cache"))
    ref = build_tiny(str(tmp_path / "ref"), hidden_size=128, layers=3, init_std=0.2)
    weights = Path(ref) / "model.safetensors"
    assert weights.stat().st_size > 3 << 20  # a middle that is neither the first nor the last MiB
    cache = tmp_path / "cache"
    common = {"ref_model_name_or_path": ref, "precompute_ref_log_probs": True, "ref_cache_dir": str(cache)}
    first = _ours(tmp_path / "a", tiny_model, CONV, **common)
    (old_file,) = os.listdir(cache)
    size, mtime = weights.stat().st_size, weights.stat().st_mtime_ns
    _rewrite_middle_tensor(weights)
    assert weights.stat().st_size == size and weights.stat().st_mtime_ns != mtime

    second = _ours(tmp_path / "b", tiny_model, CONV, **common)
    assert len(os.listdir(cache)) == 2, "the old reference log-probs were reused after the weights changed"
    (new_file,) = set(os.listdir(cache)) - {old_file}
    old, new = torch.load(cache / old_file), torch.load(cache / new_file)
    assert not torch.allclose(old["ref_chosen_logps"], new["ref_chosen_logps"])
    live = _ours(tmp_path / "live", tiny_model, CONV, ref_model_name_or_path=ref)  # the changed model, live
    assert second["loss"] == pytest.approx(live["loss"], rel=1e-6)
    assert second["loss"] != pytest.approx(first["loss"], rel=1e-3)


def test_weight_hash_is_remembered_by_path_size_and_mtime(
    tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 15 GB model is hashed once: an unchanged file is not read again; a touched one is."""
    import builtins

    from alignkit.modeling import reference

    user_cache = tmp_path / "user_cache"
    monkeypatch.setenv("ALIGNKIT_CACHE_DIR", str(user_cache))
    weights = os.path.join(tiny_model, "model.safetensors")
    reads: list[str] = []

    def counting_open(file, mode="r", *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if os.path.abspath(str(file)) == weights and "r" in mode:
            reads.append(mode)
        return builtins.open(file, mode, *args, **kwargs)

    monkeypatch.setattr(reference, "open", counting_open, raising=False)
    first = reference.cache_key(tiny_model, [], (), {})
    assert len(reads) == 1
    assert reference.cache_key(tiny_model, [], (), {}) == first
    assert len(reads) == 1, "an unchanged weight file was read again"
    assert os.listdir(user_cache)  # remembered under the env's folder, never the real home
    stat = os.stat(weights)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # same bytes, new mtime
    assert reference.cache_key(tiny_model, [], (), {}) == first
    assert len(reads) == 2  # rehashed (and the same content gives the same key)


def test_dpo_bad_inputs(tiny_model: str, tmp_path: Path) -> None:
    sft_rows = [{"prompt": "Q", "completion": "A"}]
    with pytest.raises(UserError, match=r"line 1: stage `dpo` trains on pair data.*need pairs"):
        _ours(tmp_path / "a", tiny_model, sft_rows)
    with pytest.raises(
        UserError,
        match=r"`loss_type: sigmod` does not exist \(did you mean `sigmoid`\?\); valid loss "
        r"types: sigmoid, hinge, ipo",
    ):
        _ours(tmp_path / "b", tiny_model, CONV, loss_type="sigmod")
    with pytest.raises(UserError, match="`beta` must be > 0"):
        _ours(tmp_path / "c", tiny_model, CONV, beta=-0.1)
    with pytest.raises(UserError, match="every pair has chosen identical to rejected"):
        _ours(tmp_path / "d", tiny_model, [{"prompt": "Q", "chosen": "A", "rejected": "A"}])
    with pytest.raises(UserError, match="exo_pair` needs 0 < label_smoothing"):
        _ours(tmp_path / "e", tiny_model, CONV, loss_type="exo_pair")


def test_identical_pairs_are_skipped_and_counted(tiny_model: str, caplog: pytest.LogCaptureFixture) -> None:
    from alignkit.data.batches import build_pair_rows
    from alignkit.data.formats import Example
    from alignkit.modeling.load import load_tokenizer

    tok = load_tokenizer(tiny_model)
    exs = [Example(prompt="Q", chosen=" a", rejected=" b"), Example(prompt="Q", chosen=" a", rejected=" a")]
    rows, _, identical = build_pair_rows(exs, tok, 64)
    assert len(rows) == 1 and identical == 1


class _Stub:
    """Just the attributes TRL's experimental CPO / ORPO loss methods read."""

    def __init__(self, **kw) -> None:
        self.__dict__.update(kw)
        self.accelerator = type("A", (), {"device": torch.device("cpu")})()


@pytest.mark.parametrize("loss_type", ["simpo", "cpo"])
def test_reference_free_losses_match_trl_cpo_trainer(loss_type: str) -> None:
    """Same log-prob tensors into TRL's CPOTrainer.cpo_loss and into ours: the same per-pair losses."""
    cpo_mod = pytest.importorskip("trl.experimental.cpo")
    p = _pair(ref_chosen=torch.zeros(2), ref_rejected=torch.zeros(2))
    beta, gamma, eps = 0.7, 0.4, 0.1
    if loss_type == "simpo":  # SimPO works on mean token log-probs
        stub = _Stub(alpha=0.0, beta=beta, loss_type="simpo", simpo_gamma=gamma, label_smoothing=eps)
        theirs = cpo_mod.CPOTrainer.cpo_loss(stub, p.chosen / p.chosen_len, p.rejected / p.rejected_len)[0]
        ours = DPO_LOSSES["simpo"].fn(p, beta=beta, simpo_gamma=gamma, label_smoothing=eps)
    else:  # CPO: sigmoid on summed log-probs, plus cpo_alpha x the chosen NLL (token mean)
        stub = _Stub(alpha=0.0, beta=beta, loss_type="sigmoid", simpo_gamma=gamma, label_smoothing=eps)
        theirs = cpo_mod.CPOTrainer.cpo_loss(stub, p.chosen, p.rejected)[0] + 0.5 * (12.0 / 6.0)
        ours = DPO_LOSSES["cpo"].fn(p, beta=beta, cpo_alpha=0.5, label_smoothing=eps)
    assert ours.mean().item() == pytest.approx(theirs.mean().item(), rel=1e-6)
    assert not DPO_LOSSES[loss_type].needs_reference


def test_orpo_matches_trl_odds_ratio_term() -> None:
    orpo_mod = pytest.importorskip("trl.experimental.orpo")
    # mean token log-probs near 0 and far from it, where log(1 - e^x) needs care
    p = _pair(
        chosen=torch.tensor([-0.02, -8.0]),
        rejected=torch.tensor([-0.9, -3.0]),
        chosen_len=torch.tensor([1.0, 2.0]),
        rejected_len=torch.tensor([1.0, 3.0]),
        ref_chosen=torch.zeros(2),
        ref_rejected=torch.zeros(2),
    )
    stub = _Stub(beta=0.25)
    losses, *_ = orpo_mod.ORPOTrainer.odds_ratio_loss(
        stub, p.chosen / p.chosen_len, p.rejected / p.rejected_len
    )
    ours = DPO_LOSSES["orpo"].fn(p, orpo_beta=0.25)
    nll = 12.0 / 6.0  # ORPO's SFT term on the chosen completion tokens
    assert ours.mean().item() == pytest.approx(nll - losses.mean().item(), rel=1e-6)
    # by hand for pair 0: odds(p) = p / (1 - p) with p = e^-0.02 and e^-0.9
    pc, pr = math.exp(-0.02), math.exp(-0.9)
    log_odds = math.log(pc / (1 - pc)) - math.log(pr / (1 - pr))
    assert ours[0].item() == pytest.approx(
        5.0 * 2 / 6 - 0.25 * math.log(1 / (1 + math.exp(-log_odds))), rel=1e-5
    )


@pytest.mark.parametrize("loss_type", ["simpo", "cpo", "orpo"])
def test_reference_free_stage_never_loads_a_reference(
    loss_type: str, tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from alignkit.modeling.reference import Reference

    def no_load(self):  # noqa: ANN001, ANN202
        raise AssertionError("a reference model was loaded for a reference-free loss")

    monkeypatch.setattr(Reference, "_load", no_load)
    monkeypatch.setattr(Reference, "__init__", no_load)
    record = _ours(tmp_path, tiny_model, CONV, loss_type=loss_type, learning_rate=1e-3)
    assert math.isfinite(record["loss"]) and record["logps/chosen"] < 0
    assert record["rewards/chosen"] == pytest.approx(0.1 * record["logps/chosen"], rel=1e-6)  # beta * logps
