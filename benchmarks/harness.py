"""What the benchmarks share: the model built in place, peak memory, one alignkit run through its public path."""

from __future__ import annotations

import json
import resource
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"

# Qwen2 shapes: `tiny` for dry runs; `cpu` keeps the real vocabulary (the output layer dominates, as in real models) on a small
# backbone; `qwen2.5-0.5b` is that model's real shape (for a GPU).
SHAPES = {
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 128},  # benchmarks/gpu.sh --dry-run
    "cpu": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
            "intermediate_size": 1376},
    "qwen2.5-0.5b": {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
                     "num_key_value_heads": 2, "intermediate_size": 4864},
}  # fmt: skip
VOCAB = 151_936  # Qwen2's
SHAPE_VOCAB = {"tiny": 1024}  # a dry run's checks need no real vocabulary


def build_qwen2(model_dir: str, shape: str = "cpu", vocab: int | None = None, seed: int = 0) -> None:
    """A randomly initialised Qwen2ForCausalLM of `shape` with `vocab` entries and alignkit's tiny BPE tokenizer
    (its 512 ids are the first rows of the vocabulary; the softmax still runs over all `vocab` of them)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from alignkit.modeling.tiny import build_tokenizer

    tok = build_tokenizer()
    config = Qwen2Config(
        vocab_size=vocab or SHAPE_VOCAB.get(shape, VOCAB),
        max_position_embeddings=4096,
        tie_word_embeddings=True,  # as Qwen2.5-0.5B
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        initializer_range=0.02,
        dtype="float32",
        **SHAPES[shape],
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)


def build_reward_model(causal_dir: str, out_dir: str, seed: int = 0) -> None:
    """The causal model's backbone with a seeded scalar head, saved once so both tools start from the same head."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(causal_dir)
    model = AutoModelForSequenceClassification.from_pretrained(causal_dir, num_labels=1)
    torch.nn.init.normal_(model.score.weight, std=0.02)
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


def peak_mb() -> float:
    """Peak CUDA memory allocated on a GPU, else this process's peak RSS."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_alignkit(keys: dict, steps: int, out: str) -> list[dict]:
    """One alignkit run through the public path (config -> stage -> loop), data in file order, `steps` steps,
    logged every step; returns the metrics records (metrics.jsonl)."""
    from alignkit.config import build_config
    from alignkit.stages import get_stage
    from alignkit.training.loop import train

    common = {
        "max_steps": steps,
        "logging_steps": 1,
        "output_dir": out,
        "disable_tqdm": True,
        "plot_loss": False,
        "shuffle": False,
        "overwrite_output_dir": True,
    }
    cfg = build_config({**common, **keys})
    train(cfg, get_stage(cfg.stage)(cfg))
    with open(Path(out) / "metrics.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def count_through(obj: Any, name: str, count: Callable[..., int]) -> list[int]:
    """Wrap the method `name` of `obj` (an instance) so that each call adds `count(*args)` to the one-element
    list returned: how the benchmark counts the tokens a TRL trainer feeds its policy."""
    total = [0]
    inner = getattr(obj, name)

    def counting(*args: Any, **kwargs: Any) -> Any:
        total[0] += count(*args, **kwargs)
        return inner(*args, **kwargs)

    setattr(obj, name, counting)
    return total


class PhaseTimer:
    """Seconds spent inside chosen methods, patched in place for one run: `generate` (transformers' own
    `GenerationMixin.generate`, which both tools call for the online stages' completions; the new tokens it
    returns are counted: those after the prompt that are not padding) and a rollout method (sampling, and
    for some tools rewards and scoring). The update's seconds are the loop's minus the rollout's."""

    def __init__(self, rollout_owner: type, rollout_name: str) -> None:
        from transformers.generation.utils import GenerationMixin

        self.seconds = {"generate": 0.0, "rollout": 0.0}
        self.generated = 0
        self._wrap(GenerationMixin, "generate", "generate")
        self._wrap(rollout_owner, rollout_name, "rollout")

    def _wrap(self, owner: type, name: str, key: str) -> None:
        import functools
        import time

        static = isinstance(owner.__dict__.get(name), staticmethod)
        inner = getattr(owner, name)

        @functools.wraps(inner)
        def timed(*args: object, **kwargs: object) -> object:
            start = time.perf_counter()
            try:
                out = inner(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - start
            if key == "generate":
                ids = kwargs["input_ids"] if "input_ids" in kwargs else args[1]
                self.generated += _new_tokens(args[0], ids, out)
            return out

        setattr(owner, name, staticmethod(timed) if static else timed)

    def split(self, loop_s: float) -> dict:
        """The phases of an online run: generation alone (and its tokens/s), the rest of the rollout, the update."""
        gen, rollout = self.seconds["generate"], self.seconds["rollout"]
        return {
            "generate_s": round(gen, 2),
            "generated_tokens": self.generated,
            "generate_tokens_per_s": round(self.generated / gen, 1) if gen else None,
            "rollout_s": round(rollout, 2),
            "update_s": round(loop_s - rollout, 2),
        }


def _new_tokens(model: object, input_ids: object, out: object) -> int:
    """Tokens `generate` added after the prompt, padding left out."""
    sequences = getattr(out, "sequences", out)
    pad = model.generation_config.pad_token_id  # type: ignore[attr-defined]
    new = sequences[:, input_ids.shape[1] :]  # type: ignore[index,union-attr]
    return int((new != pad).sum()) if pad is not None else int(new.numel())
