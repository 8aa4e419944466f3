"""GGUF out for each family alignkit writes, on tiny random models built here: Qwen2 (q/k/v biases), Qwen3
(q/k norms), Mistral (grouped-query attention, permuted rope rows) with the tiny byte-level tokenizer; Llama 2
style (a sentencepiece-style BPE with byte fallback and a space prefix); Gemma 2 and Gemma 3 (norms stored as
1 + w, soft-capping, sliding windows, Gemma's tokenizer with no space prefix). Read back by transformers' GGUF
reader: the same logits and the same token ids. `tokenizer.ggml.pre` names the split rule. Where llama-cpp-python
is installed, llama.cpp itself loads each file: its logits, its tokens, its greedy answers."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

FAMILIES = ["qwen2", "qwen3", "mistral", "llama_spm", "gemma2", "gemma3"]
TEXT = "What is 12 + 7?  Café, naïve."


def sentencepiece_tokenizer(style: str) -> object:
    """A sentencepiece-style BPE (▁ for spaces, byte-fallback pieces <0x00>..<0xFF>) trained here on the tiny
    corpus, in transformers' LlamaTokenizer (space prefix) or GemmaTokenizer (none) with that family's chat
    template, as a Llama 2 / Mistral v0.1 or Gemma checkpoint ships it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GemmaTokenizer, LlamaTokenizer

    from alignkit.modeling.chat_templates import TEMPLATES
    from alignkit.modeling.tiny import _corpus

    gemma = style == "gemma"
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"] if gemma else []
    specials = specials or ["<unk>", "<s>", "</s>"]
    bpe = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    pieces = specials + [f"<0x{i:02X}>" for i in range(256)]
    bpe.train_from_iterator(
        _corpus(0), trainers.BpeTrainer(vocab_size=600, special_tokens=pieces, show_progress=False)
    )
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) for m in model["merges"]]
    if gemma:
        tok = GemmaTokenizer(vocab=model["vocab"], merges=merges, mask_token="<unk>")
        tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    else:
        tok = LlamaTokenizer(vocab=model["vocab"], merges=merges)
    tok.chat_template = TEMPLATES["gemma" if gemma else "llama2"]
    return tok


def build_family(family: str, folder: Path) -> tuple[torch.nn.Module, object]:
    """A tiny random model of `family` and its tokenizer, saved in `folder`; norm weights are perturbed so a
    wrong norm convention shows in the logits."""
    import transformers

    from alignkit.modeling.tiny import build_tokenizer

    if family.startswith("gemma"):
        tok = sentencepiece_tokenizer("gemma")
    else:
        tok = sentencepiece_tokenizer("llama") if family == "llama_spm" else build_tokenizer()
    sizes = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=16,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    tied = {"tie_word_embeddings": family.startswith("gemma") or family == "llama_spm"}
    gemma = {"query_pre_attn_scalar": 16, "sliding_window": 8}  # a window shorter than the probes
    config, model_class = {
        "qwen2": (lambda: transformers.Qwen2Config(**sizes, **tied), transformers.Qwen2ForCausalLM),
        "qwen3": (lambda: transformers.Qwen3Config(**sizes, **tied), transformers.Qwen3ForCausalLM),
        "mistral": (lambda: transformers.MistralConfig(**sizes, **tied), transformers.MistralForCausalLM),
        "llama_spm": (lambda: transformers.LlamaConfig(**sizes, **tied), transformers.LlamaForCausalLM),
        "gemma2": (lambda: transformers.Gemma2Config(**sizes, **tied, **gemma), transformers.Gemma2ForCausalLM),
        "gemma3": (lambda: transformers.Gemma3TextConfig(**sizes, **tied, **gemma), transformers.Gemma3ForCausalLM),
    }[family]  # fmt: skip
    config = config()
    config.bos_token_id, config.eos_token_id, config.pad_token_id = (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = model_class(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """Each family's folder and its f32 GGUF, written once for the module."""
    from alignkit.ship.export.gguf_write import write_gguf

    root, out = tmp_path_factory.mktemp("families"), {}
    for family in FAMILIES:
        build_family(family, root / family)
        arch = write_gguf(str(root / family), str(root / f"{family}.gguf"), "f32")
        out[family] = (root / family, arch)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_reads_back_with_its_logits_and_token_ids(family: str, written: dict) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.ship.export.gguf_check import read_back

    folder, arch = written[family]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    path = folder.parent / f"{family}.gguf"
    back = read_back(str(path), arch, model.config)
    back_tok = AutoTokenizer.from_pretrained(folder.parent, gguf_file=path.name)
    text = tok.apply_chat_template(
        [{"role": "user", "content": TEXT}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert back_tok(text, add_special_tokens=False)["input_ids"] == ids
    assert len(ids) > 8  # longer than Gemma's sliding window
    with torch.no_grad():
        ours, theirs = model(torch.tensor([ids])).logits, back(torch.tensor([ids])).logits
    assert (ours - theirs).abs().max().item() <= 1e-5 * max(1.0, ours.abs().max().item())
    assert arch == {"mistral": "llama", "llama_spm": "llama"}.get(family, family)


def test_the_tokenizer_kind_and_its_split_rule_are_named(
    written: dict, caplog: pytest.LogCaptureFixture
) -> None:
    """`tokenizer.ggml.model` is gpt2 for byte-level BPE and llama for sentencepiece-style; `tokenizer.ggml.pre`
    names the split rule: the tiny tokenizer's digits-then-GPT-2 is llama.cpp's `smollm`; GPT-2's own rule is
    `gpt-2`; Qwen2's split pattern is `qwen2`; a pattern nobody names is `default`, with a warning."""
    from gguf import GGUFReader

    from alignkit.ship.export.gguf_vocab import pre_tokenizer_name

    def field(family: str, key: str) -> object:
        reader = GGUFReader(str(written[family][0].parent / f"{family}.gguf"))
        return reader.fields[key].contents()

    assert (
        field("qwen2", "tokenizer.ggml.model") == "gpt2" and field("qwen2", "tokenizer.ggml.pre") == "smollm"
    )
    assert field("gemma3", "tokenizer.ggml.model") == "llama"
    assert field("gemma3", "tokenizer.ggml.add_space_prefix") is False
    assert field("llama_spm", "tokenizer.ggml.add_space_prefix") is True
    scores = field("llama_spm", "tokenizer.ggml.scores")
    assert max(scores) == 0.0 and min(scores) < -100  # minus each piece's merge rank
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    qwen = {"type": "Split", "pattern": {"Regex": GGUF_PRE_TOKENIZER_SPLITS["qwen2"]}, "behavior": "Isolated"}
    spec = {
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [qwen, {"type": "ByteLevel", "use_regex": False}],
        }
    }
    assert pre_tokenizer_name(spec) == "qwen2"
    qwen["pattern"] = {"Regex": "\\s+"}
    with caplog.at_level(logging.WARNING, logger="alignkit"):
        assert pre_tokenizer_name(spec) == "default"
    assert "not one llama.cpp knows by name" in caplog.text


def test_the_modelfile_speaks_gemmas_turns(written: dict) -> None:
    from alignkit.ship.export.gguf_vocab import write_modelfile

    folder = written["gemma2"][0]
    text = Path(write_modelfile(str(folder), str(folder.parent / "gemma2.gguf"))).read_text()
    assert text.startswith('FROM ./gemma2.gguf\nTEMPLATE """{{- range .Messages }}<start_of_turn>')
    assert "<start_of_turn>model\n" in text and 'PARAMETER stop "<end_of_turn>"' in text


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_loads_each_family(family: str, written: dict) -> None:
    """llama.cpp (llama-cpp-python) loads the f32 file: logits within 1e-3 of the logit scale of the Hugging Face
    model's on the same ids; prompts tokenized identically, except after a leading
    special token in a sentencepiece tokenizer with a space prefix (Llama 2's `<s>[INST]`), where llama.cpp
    puts '▁' before `[INST]`, as Meta's sentencepiece does, and transformers' LlamaTokenizer (legacy=False)
    does not."""
    pytest.importorskip(
        "llama_cpp", reason="llama.cpp's checks need llama-cpp-python (pip install llama-cpp-python)"
    )
    from alignkit.ship.export.gguf_check import GGUFExport, check_gguf

    folder, arch = written[family]
    result = GGUFExport(str(folder.parent / f"{family}.gguf"), "", "f32", arch, None)
    check_gguf(result, str(folder))
    figures = result.llama_cpp
    assert figures["max_logit_diff"] <= 1e-3 * figures["logit_scale"]
    assert figures["tokens"] == (0.0 if family == "llama_spm" else 1.0)
