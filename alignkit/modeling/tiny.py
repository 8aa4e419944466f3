"""`alignkit tiny`: a small, randomly initialised Llama-architecture model with a real fast tokenizer.

Nothing is downloaded: the byte-level BPE tokenizer is trained here with the `tokenizers` library on a
built-in corpus (chat markup, arithmetic, common English), digits are split one per token (as Llama 3
and Qwen do), and the chat template is ChatML (as Qwen's) with `{% generation %}` markers around
assistant content so that `return_assistant_tokens_mask` works too. Tests, examples and the quickstart
use it.
"""

from __future__ import annotations

import os
import random

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, EOS, IM_START = "<|endoftext|>", "<|im_end|>", "<|im_start|>"

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_ENGLISH = """the of and to in is you that it he was for on are as with his they at be this have from or
one had by word but not what all were we when your can said there use an each which she do how their if
will up other about out many then them these so some her would make like him into time has look two more
write go see number no way could people my than first water been call who oil its now find long down day
did get come made may part answer question please explain give write list describe summarize translate
correct wrong good bad helpful harmless honest assistant user system instruction input output response
what is the sum of plus minus equals result carry digit number math problem solve step think because"""


def _corpus(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = _ENGLISH.split()
    lines = []
    for _ in range(3000):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        lines.append(f"{IM_START}user\nWhat is {a} + {b}?{EOS}\n{IM_START}assistant\n{a + b}{EOS}\n")
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(5, 20))).capitalize() + ".")
    return lines


def build_tokenizer(vocab_size: int = 512, seed: int = 0) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (every byte is representable, so any text tokenises)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    specials = [PAD, IM_START, EOS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=PAD, unk_token=None, model_max_length=2048
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny(
    output_dir: str,
    vocab_size: int = 512,
    hidden_size: int = 64,
    layers: int = 2,
    seed: int = 0,
    init_std: float = 0.02,
) -> str:
    """Write tokenizer + randomly initialised LlamaForCausalLM (safetensors) to `output_dir`."""
    tokenizer = build_tokenizer(vocab_size, seed)
    heads = max(1, hidden_size // 32)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=init_std,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    return output_dir
