"""Start `alignkit serve` as a real process on 127.0.0.1 (real uvicorn, real signals) for the server tests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.conftest import free_port

KEY = "test-key"


class ServerProcess:
    def __init__(self, args: list[str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = dict(os.environ, ALIGNKIT_API_KEY="")
        cmd = [sys.executable, "-m", "alignkit", "serve", "--port", str(self.port), *args]
        self.log = open(log_path, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.log_path.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        raise RuntimeError(f"server not up in {timeout} s: {self.log_path.read_text()}")

    def metric(self, name: str) -> float:
        """One series' value from /metrics (0 when absent)."""
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


@contextmanager
def running(args: list[str], log_path: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(args, log_path)
    try:
        yield server
    finally:
        server.stop()


def make_adapter(base: str, out: Path, seed: int = 1) -> str:
    """A LoRA adapter on `base` that is not a no-op (B is random, not zero), saved with its base's path."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(str(out))
    return str(out)


def make_endless(base: str, out: Path, context: int = 8192) -> str:
    """A copy of the model `base` that never ends an answer by itself: its EOS is a token added to the
    tokenizer past the model's vocabulary (the model cannot draw it), and its context is `context` tokens
    (RoPE positions need no weights). Every answer runs to its token limit, whatever the machine's speed."""
    from transformers import AutoTokenizer, GenerationConfig

    shutil.copytree(base, out)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    tokenizer.add_special_tokens({"eos_token": "<|never|>"})
    tokenizer.save_pretrained(str(out))
    config = json.loads((out / "config.json").read_text())
    assert tokenizer.eos_token_id >= config["vocab_size"]  # out of the model's reach
    config.update(eos_token_id=tokenizer.eos_token_id, max_position_embeddings=context)
    (out / "config.json").write_text(json.dumps(config))
    generation = GenerationConfig.from_pretrained(str(out))
    generation.eos_token_id = tokenizer.eos_token_id
    generation.save_pretrained(str(out))
    return str(out)


def raw_request(
    url: str, head: list[str], chunks: Iterable[bytes] = (), timeout: float = 30
) -> tuple[int, dict]:
    """Send a request as raw bytes (`head`: the request line and headers; then `chunks`, as they come) and
    read the answer without finishing the request: (status, JSON body). A server that waits for the rest of
    the body never answers: socket.timeout after `timeout` seconds."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall("".join(line + "\r\n" for line in head).encode() + b"\r\n")
        for chunk in chunks:
            sock.sendall(chunk)
        data = b""
        while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < _length(data):
            more = sock.recv(65536)
            if not more:
                raise ConnectionError(f"the server closed the connection after {data!r}")
            data += more
    header, _, body = data.partition(b"\r\n\r\n")
    return int(header.split()[1]), json.loads(body)


def _length(data: bytes) -> int:
    """The Content-Length of a response read so far (0 until its headers are complete)."""
    header, sep, _ = data.partition(b"\r\n\r\n")
    lengths = [
        line.split(b":")[1] for line in header.split(b"\r\n") if line.lower().startswith(b"content-length:")
    ]
    return int(lengths[0]) if sep and lengths else 0
