"""GGUF in: a `.gguf` file (what llama.cpp, Ollama and LM Studio users hold) wherever a model is asked for.

transformers reads GGUF files (with the `gguf` package) and dequantizes their weights; the model it returns is
marked quantized, which training, saving and adapters refuse. So a GGUF file is converted once into a plain
Hugging Face folder (config, weights, tokenizer with its chat template, generation config) in alignkit's cache,
keyed by the file (device and inode), its size and modification time, and that folder is what every loader reads: `train`,
`eval`, `serve`, `chat`, `export`, `compare` and the console take a GGUF the way they take a folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil

from alignkit.config.cache import user_cache_dir
from alignkit.errors import UserError

log = logging.getLogger("alignkit")

# above this many parameters the converted folder holds bfloat16 weights (float32 doubles a 7B model to 28 GB)
FLOAT32_MAX_PARAMS = 2_000_000_000


def gguf_file(path: str) -> str | None:
    """The GGUF file `path` names: the file itself, or the one `.gguf` in a folder that is not a Hugging Face
    model folder (no config.json); None for anything else."""
    if path.lower().endswith(".gguf"):
        if not os.path.isfile(path):
            raise UserError(f"there is no GGUF file {path}")
        return path
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, "config.json")):
        return None
    found = sorted(f for f in os.listdir(path) if f.lower().endswith(".gguf"))
    if len(found) > 1:
        raise UserError(
            f"{path} holds {len(found)} GGUF files ({', '.join(found)}); give the path of one of them"
        )
    return os.path.join(path, found[0]) if found else None


def local_model(path: str) -> str:
    """`path` itself, or for a GGUF file (or a folder holding one) the Hugging Face folder it was converted into,
    converting it the first time."""
    source = gguf_file(path) if path else None
    if source is None:
        return path
    stat = os.stat(source)
    # the file itself (device and inode: a move or a hard link is the same file), its size and modification time
    key = hashlib.sha256(
        f"{stat.st_dev}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}".encode()
    ).hexdigest()
    name = os.path.basename(source)[: -len(".gguf")]
    folder = os.path.join(user_cache_dir(), "gguf", f"{name}-{key[:16]}")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        with _lock(folder + ".lock"):  # processes of one run (or two runs) convert it once
            if not os.path.isfile(os.path.join(folder, "config.json")):
                convert_gguf(source, folder)
    return folder


@contextlib.contextmanager
def _lock(path: str):  # noqa: ANN202 - a context manager
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        yield
        return
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def convert_gguf(source: str, folder: str) -> None:
    """Read `source` through transformers' GGUF reader (dequantized) and save it as a plain model folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401 - transformers' GGUF reader needs it
    except ImportError as exc:
        raise UserError(f"{source}: reading a GGUF file needs the `gguf` package: pip install gguf") from exc
    directory, name = os.path.split(os.path.abspath(source))
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        read = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    except (
        ValueError,
        KeyError,
    ) as exc:  # transformers: "GGUF model with architecture X is not supported yet"
        reason = " ".join(str(exc).split())[:300]
        raise UserError(
            f"{source}: transformers cannot read this GGUF file ({reason}); convert the model to a Hugging Face "
            "folder another way, or use a GGUF of an architecture transformers reads (Llama, Mistral, Qwen2, "
            "Qwen3, Gemma, Phi-3, ...)"
        ) from exc
    config = read.config.to_dict()
    config.pop("quantization_config", None)  # a plain model: trainable, savable, adapters allowed
    n_params = sum(p.numel() for p in read.parameters())
    dtype = torch.float32 if n_params <= FLOAT32_MAX_PARAMS else torch.bfloat16
    plain = AutoModelForCausalLM.from_config(type(read.config).from_dict(config), dtype=dtype)
    plain.load_state_dict(read.state_dict(), strict=True)
    plain.generation_config = read.generation_config
    del read
    partial = folder + ".partial"  # renamed when whole: never a half-written folder
    shutil.rmtree(partial, ignore_errors=True)
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    os.replace(partial, folder)
    log.warning(
        "%s: read through transformers' GGUF reader, its weights dequantized to %s and saved once as a Hugging "
        "Face folder in %s (reused while the file is unchanged)",
        source,
        str(dtype).removeprefix("torch."),
        folder,
    )
