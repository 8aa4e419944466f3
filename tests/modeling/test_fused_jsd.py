"""The chunked generalized JSD (`alignkit.modeling.fused_jsd`) against `generalized_jsd` on the full logits:
values, the tokens' log-probs and the gradients of the student's hidden states, weight and bias (float64, every
beta, several chunks, a teacher of a narrower vocabulary, a logit scale); and the distillation stage's first
steps at a vocabulary the fused path takes equal the plain path's."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from alignkit.losses.distill import generalized_jsd, generalized_jsd_grad
from alignkit.modeling.fused_jsd import chunked_jsd


class Head(nn.Module):
    def __init__(self, hidden: int, vocab: int, bias: bool, scale: float | None, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lm = nn.Linear(hidden, vocab, bias=bias, dtype=torch.float64)
        self.config = SimpleNamespace(logit_scale=scale)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        scale = self.config.logit_scale
        return self.lm(h) * (1.0 if scale is None else scale)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_chunked_jsd_equals_the_full_logits(beta: float) -> None:
    student, teacher = Head(8, 40, True, 0.5, seed=0), Head(6, 37, False, None, seed=1)
    torch.manual_seed(2)
    h = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    h_teacher = torch.randn(11, 6, dtype=torch.float64)
    labels = torch.randint(0, 37, (11,))
    g = torch.randn(11, dtype=torch.float64)  # the loss's weight per token

    full_s, full_t = student.logits(h)[:, :37], teacher.logits(h_teacher)
    want = generalized_jsd(full_s, full_t, beta)
    (want * g).sum().backward()
    expected = [t.grad.clone() for t in (h, student.lm.weight, student.lm.bias)]
    for t in (h, student.lm.weight, student.lm.bias):
        t.grad = None

    jsd, lp_s, lp_t = chunked_jsd(student, h, teacher, h_teacher, labels, beta, chunk_size=4)
    (jsd * g).sum().backward()
    assert torch.allclose(jsd, want, rtol=1e-12, atol=1e-14)
    assert torch.allclose(lp_s, torch.log_softmax(full_s, -1).gather(-1, labels[:, None])[:, 0].detach())
    assert torch.allclose(lp_t, torch.log_softmax(full_t, -1).gather(-1, labels[:, None])[:, 0])
    for got, exp in zip((h.grad, student.lm.weight.grad, student.lm.bias.grad), expected):
        assert torch.allclose(got, exp, rtol=1e-10, atol=1e-13)
    assert student.lm.weight.grad[37:].abs().max() == 0  # past the teacher's width: no gradient


def test_no_tokens_and_autocast() -> None:
    """No completion token gives empty outputs a loss can still sum; under bf16 autocast the backward
    recomputes the logits in bf16 as the forward made them, and lands near the float32 gradient."""
    student, teacher = Head(8, 40, False, None, seed=0), Head(8, 40, False, None, seed=1)
    student.float()
    teacher.float()
    h = torch.randn(0, 8, requires_grad=True)
    jsd, lp_s, _ = chunked_jsd(student, h, teacher, torch.randn(0, 8), torch.zeros(0, dtype=torch.long), 0.5)
    jsd.sum().backward()
    assert jsd.shape == lp_s.shape == (0,) and h.grad.shape == (0, 8)
    torch.manual_seed(4)
    h = torch.randn(9, 8, requires_grad=True)
    h_t, labels = torch.randn(9, 8), torch.randint(0, 40, (9,))
    chunked_jsd(student, h, teacher, h_t, labels, 0.5, chunk_size=4)[0].sum().backward()
    exact, h.grad = h.grad.clone(), None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        jsd = chunked_jsd(student, h, teacher, h_t, labels, 0.5, chunk_size=4)[0]
    jsd.sum().backward()
    assert h.grad.dtype == torch.float32 and torch.allclose(h.grad, exact, rtol=0.1, atol=0.02)


def test_the_closed_form_gradient_is_autograds() -> None:
    torch.manual_seed(3)
    for beta in (0.0, 0.5, 1.0):
        z = torch.randn(5, 30, dtype=torch.float64, requires_grad=True)
        zt = torch.randn(5, 30, dtype=torch.float64)
        generalized_jsd(z, zt, beta).sum().backward()
        assert torch.allclose(generalized_jsd_grad(z.detach(), zt, beta), z.grad, atol=1e-15)


def _padded_pair(tmp_path: Path, vocab: int) -> tuple[str, str]:
    """The tiny model with its vocabulary padded to `vocab` rows, and a teacher: its weights nudged."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.modeling.tiny import build_tiny

    base = build_tiny(str(tmp_path / "base"))
    model = AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(vocab, mean_resizing=False)
    gen = torch.Generator().manual_seed(1)
    for name, nudge in (("student", 0.0), ("teacher", 0.05)):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(nudge * torch.randn(p.shape, generator=gen))
        model.save_pretrained(tmp_path / name)
        AutoTokenizer.from_pretrained(base).save_pretrained(tmp_path / name)
    return str(tmp_path / "student"), str(tmp_path / "teacher")


def test_distill_steps_through_the_fused_path_equal_the_plain_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At a 16,384-entry vocabulary the stage runs the chunked JSD; forced onto the plain path (logits made
    whole) the same two steps give the same losses, metrics and weights."""
    from transformers import AutoModelForCausalLM

    import alignkit.modeling.logprobs as logprobs
    import alignkit.stages.distill as distill
    from tests.conftest import run_stage, write_jsonl
    from tests.stages.test_distill import SFT_ROWS

    student, teacher = _padded_pair(tmp_path, logprobs.FUSED_MIN_VOCAB)
    data = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS[:8])
    keys = {
        "stage": "distill", "model_name_or_path": student, "teacher_model_name_or_path": teacher,
        "dataset": data, "lmbda": 0.0, "beta": 0.3, "per_device_train_batch_size": 4, "max_steps": 2,
        "logging_steps": 1, "learning_rate": 1e-3, "torch_dtype": "float32", "max_new_tokens": 6,
    }  # fmt: skip
    runs, calls = {}, []
    fused_call = distill.chunked_jsd
    monkeypatch.setattr(distill, "chunked_jsd", lambda *a, **k: calls.append(1) or fused_call(*a, **k))
    for name, floor in (("fused", logprobs.FUSED_MIN_VOCAB), ("plain", 10**9)):
        monkeypatch.setattr(logprobs, "FUSED_MIN_VOCAB", floor)
        _, out = run_stage(tmp_path / name, keys)
        assert len(calls) == 2, (
            name
        )  # the two steps of the fused run took the chunked path; none of the plain
        records = [r for r in map(json.loads, open(Path(out) / "metrics.jsonl")) if "jsd" in r]
        runs[name] = (records, AutoModelForCausalLM.from_pretrained(out).state_dict())
    (fused, w_fused), (plain, w_plain) = runs["fused"], runs["plain"]
    assert len(fused) == 2
    for a, b in zip(fused, plain):
        for key in ("loss", "jsd", "logps/student", "logps/teacher", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    assert all(torch.allclose(w_fused[k], w_plain[k], atol=1e-6) for k in w_plain)
