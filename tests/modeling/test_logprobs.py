"""The output layer's fused chunked head (`alignkit.modeling.logprobs._FusedHead`) against plain autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from alignkit.modeling.logprobs import _FusedHead, head_stats


def _plain(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, y: torch.Tensor, factor: float) -> tuple:
    z = F.linear(h, w, b) * factor
    logp = torch.log_softmax(z, -1)
    return logp.gather(-1, y[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1), z


@pytest.mark.parametrize("factor", [1.0, 0.7])  # 0.7: a temperature / logit scale
@pytest.mark.parametrize("with_entropy", [False, True])  # PPO's entropy bonus differentiates the entropy
def test_fused_head_equals_autograd_in_float64(factor: float, with_entropy: bool) -> None:
    torch.manual_seed(0)
    n, hid, vocab = 300, 32, 1000
    w = (torch.randn(vocab, hid, dtype=torch.float64) * 0.1).requires_grad_()
    b = (torch.randn(vocab, dtype=torch.float64) * 0.1).requires_grad_()
    h = torch.randn(n, hid, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, vocab, (n,))
    g_logp, g_ent = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    grads = []
    for fused in (True, False):
        if fused:
            logp, ent, mean, top1 = _FusedHead.apply(h, w, b, y, factor, 128)  # 3 chunks, the last short
        else:
            logp, ent, z = _plain(h, w, b, y, factor)
        loss = (logp * g_logp).sum() + ((ent * g_ent).sum() if with_entropy else 0)
        loss.backward()
        grads.append([t.grad.clone() for t in (h, w, b)])
        for t in (h, w, b):
            t.grad = None
        if fused:
            values = (logp.detach(), ent.detach(), mean, top1)
    ref_logp, ref_ent, z = _plain(h, w, b, y, factor)
    torch.testing.assert_close(values[0], ref_logp.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(values[1], ref_ent.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(values[2], z.mean(-1).detach(), rtol=0, atol=1e-12)
    assert torch.equal(values[3], z.argmax(-1) == y)
    for fused_grad, plain_grad in zip(*grads):
        torch.testing.assert_close(fused_grad, plain_grad, rtol=0, atol=1e-12)


def test_head_stats_applies_a_lora_adapter_on_the_output_layer() -> None:
    """A LoRA-wrapped lm_head (lora_target including it) must count: its logits are the adapted ones."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    model = get_peft_model(
        LlamaForCausalLM(cfg), LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False)
    )
    h, y = torch.randn(10, 16), torch.randint(0, 64, (10,))
    stats = head_stats(model, h, y, torch.zeros(10, dtype=torch.long))
    adapted = torch.log_softmax(model.get_output_embeddings()(h), -1).gather(-1, y[:, None]).squeeze(-1)
    base = (
        torch.log_softmax(h @ model.get_output_embeddings().weight.t(), -1).gather(-1, y[:, None]).squeeze(-1)
    )
    torch.testing.assert_close(stats.logps, adapted)
    assert (stats.logps - base).abs().max() > 1e-3  # the adapter changes them: ignoring it would show


def test_head_stats_takes_the_fused_path_from_a_real_vocabulary_size() -> None:
    """At FUSED_MIN_VOCAB entries `head_stats` runs `_FusedHead` (same values as plain autograd); below it the
    plain checkpointed path, so the tiny models' float32 numbers stay as they were."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignkit.modeling.logprobs import FUSED_MIN_VOCAB, fused_head_applies

    torch.manual_seed(0)
    for vocab, fused in ((FUSED_MIN_VOCAB, True), (512, False)):
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
        model = LlamaForCausalLM(cfg).double()
        assert fused_head_applies(model) is fused
        h = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
        y = torch.randint(0, vocab, (40,))
        stats = head_stats(model, h, y, torch.zeros(40, dtype=torch.long))
        (grad,) = torch.autograd.grad(stats.logps.sum(), h)
        logp, _, _ = _plain(h, model.lm_head.weight, None, y, 1.0)
        (ref_grad,) = torch.autograd.grad(logp.sum(), h)
        torch.testing.assert_close(stats.logps, logp, rtol=0, atol=1e-12)
        torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-12)


def test_completion_logits_through_a_wrapper_read_the_wrapped_models_head(tiny_model: str) -> None:
    """A DDP-style wrapper (the model under `.module`, called through the wrapper) gives the same logits."""
    from torch import nn
    from transformers import AutoModelForCausalLM

    from alignkit.modeling.logprobs import completion_logits

    class Wrapper(nn.Module):
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

        def forward(self, **kwargs: object) -> object:
            return self.module(**kwargs)

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    mask, completion = torch.ones_like(ids), torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    with torch.no_grad():
        plain = completion_logits(model, ids, mask, completion)
        wrapped = completion_logits(Wrapper(model), ids, mask, completion)
    assert plain.shape == (5, model.config.vocab_size) and torch.equal(plain, wrapped)
