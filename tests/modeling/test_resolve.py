"""Where a model comes from: a name that is not a folder here says so; the hub is asked once, only for
`org/name`, and the error says both were tried; an adapter whose base is missing names its adapter_config.json."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from alignkit.cli import main
from tests.conftest import REPO, write_jsonl


def _eval(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(["eval", *args])
    return int(exc.value.code), capsys.readouterr().err


@pytest.fixture
def prompts(tmp_path: Path) -> str:
    return write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1 + 1 =", "answer": "2"}])


def test_a_missing_folder_says_so_offline(
    prompts: str, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, err = _eval(["--model", "out/dpo", "--dataset", prompts], capsys)
    assert code == 2 and "Traceback" not in err
    assert err.strip() == (
        f"alignkit: error: there is no model folder out/dpo here (looked in {tmp_path}), and HF_HUB_OFFLINE "
        "is set and the local hub cache has no out/dpo"
    )
    code, err = _eval(["--model", "./out/dpo", "--dataset", prompts], capsys)  # a path, never a hub id
    assert code == 2 and f"there is no model folder ./out/dpo (looked in {tmp_path})" in err


def test_an_adapter_whose_base_is_missing_names_its_config_and_key(
    tiny_model: str,
    prompts: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(target_modules=["q_proj"])
    )
    model.save_pretrained(tmp_path / "lora")
    config = tmp_path / "lora" / "adapter_config.json"
    config.write_text(
        json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": "models/tiny"})
    )
    monkeypatch.chdir(tmp_path)
    code, err = _eval(["--model", "lora", "--dataset", prompts], capsys)
    assert code == 2
    assert (
        f"adapter lora was trained on models/tiny (`base_model_name_or_path` in {os.path.join('lora', 'adapter_config.json')})"
        in err
    )
    assert "edit that key to where the base model is" in err
    shutil.copytree(tiny_model, tmp_path / "models" / "tiny")  # the base where the key says: loads
    code, err = _eval(["--model", "lora", "--dataset", prompts, "--output-dir", "ev"], capsys)
    assert code == 0, err


class _Hub(http.server.BaseHTTPRequestHandler):
    """A stand-in for huggingface.co that knows no model and counts the requests it gets."""

    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        self.requests.append(self.path)
        body = json.dumps({"error": "Repository not found"}).encode()
        self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET  # noqa: N815

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_hub() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    _Hub.requests = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _online(args: list[str], endpoint: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=endpoint, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "alignkit", "eval", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


def test_online_the_hub_is_asked_once_and_both_places_are_named(
    fake_hub: str, prompts: str, tmp_path: Path
) -> None:
    done = _online(["--model", "out/dpo", "--dataset", prompts], fake_hub, tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"alignkit: error: there is no model folder out/dpo here (looked in {tmp_path}), and the Hugging Face "
        "hub has no model out/dpo (or it is private: log in with `hf auth login`)"
    )
    assert _Hub.requests == ["/api/models/out/dpo"]  # once: no retries, no file-by-file probing


def test_online_an_unreachable_hub_is_one_line_not_a_minute_of_retries(prompts: str, tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nothing listens on: connection refused
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    done = _online(["--model", "out/dpo", "--dataset", prompts], closed, tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith(
        f"alignkit: error: there is no model folder out/dpo here (looked in {tmp_path}), and the Hugging Face "
        "hub could not be reached to look for out/dpo ("
    )
    assert not [line for line in lines if "Retrying" in line or "thrown while requesting" in line], lines
    assert len(lines) == len(set(lines)), lines  # no line printed twice
