"""The server's life: a full queue answers 503, SIGTERM drains the requests in flight before exiting, stored
completions and feedback survive kill -9, and bad command lines (a port in use included) are one-line errors
with exit code 2."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.ship.serve_helpers import make_endless, running

pytestmark = pytest.mark.slow  # real server processes: not in the fast tier

openai = pytest.importorskip("openai", reason="the server tests use the openai client: pip install openai")

HI = [{"role": "user", "content": "hi there"}]


def _stream_lines(url: str, max_tokens: int, out: list[str], first: threading.Event) -> None:
    body = {"model": "m", "messages": HI, "max_tokens": max_tokens, "stream": True, "temperature": 1.0}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
        out.append(str(r.status_code))
        for line in r.iter_lines():
            if line:  # events are separated by blank lines
                out.append(line)
                first.set()


def test_full_queue_is_503_and_sigterm_drains_in_flight(tiny_model: str, tmp_path: Path) -> None:
    model = make_endless(tiny_model, tmp_path / "endless")  # the busy stream cannot end early: 400 tokens
    args = ["--model", model, "--served-model-name", "m", "--max-batch-size", "1", "--max-queue", "1"]
    with running(args, tmp_path / "server.log") as server:
        lines: list[str] = []
        started = threading.Event()
        busy = threading.Thread(target=_stream_lines, args=(server.url, 400, lines, started))
        busy.start()
        assert started.wait(60)  # the stream is being generated: the queue is empty again
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)
        waiting: list[str] = []
        waiter = threading.Thread(
            target=lambda: waiting.append(
                client.chat.completions.create(model="m", messages=HI, max_tokens=3).choices[0].finish_reason
            )
        )
        waiter.start()
        deadline = time.monotonic() + 30
        while server.metric("alignkit_queue_depth") < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(openai.APIStatusError) as full:
            client.chat.completions.create(model="m", messages=HI, max_tokens=3)
        assert full.value.status_code == 503 and "busy" in full.value.message

        server.proc.send_signal(signal.SIGTERM)  # mid-stream: both requests must still be answered
        busy.join(120)
        waiter.join(120)
        assert server.proc.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it drained on
        assert lines[0] == "200" and lines[-1] == "data: [DONE]"
        chunks = [json.loads(x[6:]) for x in lines[1:] if x.startswith("data: {")]
        finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert finishes[-1] in ("length", "stop")
        assert waiting == ["length"] or waiting == ["stop"]
        with pytest.raises(httpx.ConnectError):  # and it took no new connection after
            httpx.get(f"{server.url}/health", timeout=2)


def test_stored_rows_survive_kill_9(tiny_model: str, tmp_path: Path) -> None:
    from alignkit.ship.serve.feedback import export_kto

    db = tmp_path / "log.db"
    args = ["--model", tiny_model, "--served-model-name", "m", "--log-db", str(db)]
    with running(args, tmp_path / "server.log") as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60)
        answers = [client.chat.completions.create(model="m", messages=HI, max_tokens=5) for _ in range(3)]
        for r, label in zip(answers, ("up", "down", "up")):
            assert (
                httpx.post(f"{server.url}/v1/feedback", json={"id": r.id, "label": label}).status_code == 200
            )
        server.proc.send_signal(signal.SIGKILL)
        assert server.proc.wait(10) == -signal.SIGKILL
    counts = export_kto(str(db), str(tmp_path / "kto.jsonl"))
    assert (counts["up"], counts["down"], counts["rows"]) == (2, 1, 3)
    rows = [json.loads(x) for x in (tmp_path / "kto.jsonl").read_text().splitlines()]
    completions = sorted(r["completion"][-1]["content"] for r in rows)
    assert completions == sorted(r.choices[0].message.content for r in answers)


def _exit(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    from alignkit.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    return int(exc.value.code), capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--backend", "vllm"], "pip install 'alignkit[vllm]'"),
        (["--adapter", "x=/no/such/adapter"], "has no adapter_config.json"),
        (["--adapter", "=dir"], "write NAME=DIR"),
        (["--max-batch-size", "0"], "--max-batch-size 0"),
        (["--port", "70000"], "--port 70000: give a port from 1 to 65535"),
        (["--log-db", "/no/such/folder/log.db"], "/no/such/folder"),
    ],
)
def test_bad_command_lines_exit_2(
    tiny_model: str, extra: list[str], needle: str, capsys: pytest.CaptureFixture
) -> None:
    pytest.importorskip("fastapi")
    if extra[0] == "--backend":
        try:
            import vllm  # noqa: F401

            pytest.skip("vLLM is installed here: its absence cannot be tested")
        except ImportError:
            pass
    code, err = _exit(["serve", "--model", tiny_model, *extra], capsys)
    assert code == 2 and needle in err and "Traceback" not in err


def test_port_in_use_is_a_one_line_error_before_the_model_loads(tiny_model: str, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "model.safetensors").write_bytes(b"not weights")  # loading it would fail with another error
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cmd = [sys.executable, "-m", "alignkit", "serve", "--model", str(model), "--port", str(port)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("alignkit: error:")]
    assert errors == [
        f"alignkit: error: port {port} on 127.0.0.1 is in use (another server listens there); "
        "stop it or pick another port with --port"
    ]
    assert "Traceback" not in done.stderr and "serving" not in done.stderr


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_answers_are_not_held_back_by_nagles_algorithm(host: str) -> None:
    """The server's connections have TCP_NODELAY: uvicorn serves the socket `listen_socket` binds through
    asyncio, which turns Nagle's algorithm off only on connections of a socket whose protocol is TCP. A socket
    made without it (protocol 0) left Nagle on, and every answer (head, then body) waited ~40 ms for the
    client's delayed ACK: /health took 44 ms instead of 0.3."""
    import asyncio

    from alignkit.ship.serve.command import listen, listen_socket

    if host == "::1" and not socket.has_ipv6:
        pytest.skip("no IPv6 here")

    async def accepted_nodelay() -> int:
        try:
            sock = listen_socket(host, 0)
        except Exception as exc:  # a machine without an IPv6 loopback
            pytest.skip(f"cannot bind {host}: {exc}")
        listen(sock, host, 0)
        seen: asyncio.Future = asyncio.get_running_loop().create_future()

        class Protocol(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                raw = transport.get_extra_info("socket")
                seen.set_result(raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

        server = await asyncio.get_running_loop().create_server(Protocol, sock=sock)
        port = sock.getsockname()[1]
        _, writer = await asyncio.open_connection(host, port)
        try:
            return await asyncio.wait_for(seen, 10)
        finally:
            writer.close()
            server.close()

    assert asyncio.run(accepted_nodelay()) != 0
