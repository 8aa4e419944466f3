"""The closed loop on one machine, offline: serve a model, collect thumbs-up/down, turn them into KTO data,
train, serve the new model.

    python examples/feedback_loop.py [--workdir feedback-loop] [--model DIR] [--questions 12]

Without --model a tiny random model is built in place, so the answers are noise and the "user" below is a
rule (thumbs-up for answers without a digit); with your own model and a person behind the votes, each step
is the same command the README's walkthrough shows.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

ALIGNKIT = [sys.executable, "-m", "alignkit"]


def start_server(model: str, port: int, log_db: Path, log: Path) -> subprocess.Popen:
    cmd = [*ALIGNKIT, "serve", "--model", model, "--served-model-name", "assistant", "--port", str(port)]
    proc = subprocess.Popen([*cmd, "--log-db", str(log_db)], stdout=log.open("w"), stderr=subprocess.STDOUT)
    for _ in range(600):
        if proc.poll() is not None:
            sys.exit(f"the server stopped: see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.terminate()
    sys.exit(f"the server did not start: see {log}")


def collect(port: int, questions: int) -> list[tuple[str, str, str]]:
    """Ask, and vote on each answer as a user would press thumbs-up or thumbs-down."""
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
    votes = []
    for i in range(questions):
        question = f"What is {i} plus {i + 3}?"
        r = client.chat.completions.create(
            model="assistant",
            messages=[{"role": "user", "content": question}],
            max_tokens=24,
            temperature=1.0,
        )
        answer = r.choices[0].message.content
        label = "down" if any(c.isdigit() for c in answer) else "up"
        httpx.post(
            f"http://127.0.0.1:{port}/v1/feedback", json={"id": r.id, "label": label}
        ).raise_for_status()
        votes.append((question, answer, label))
    return votes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="feedback-loop")
    p.add_argument("--model", help="a model folder (default: a tiny random model built in place)")
    p.add_argument("--questions", type=int, default=12)
    p.add_argument("--steps", type=int, default=4, help="KTO steps on the feedback")
    args = p.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model = args.model or str(work / "model")
    if not args.model:
        subprocess.run([*ALIGNKIT, "tiny", model], check=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    # 1. serve, and store every answer with its votes
    server = start_server(model, port, work / "feedback.db", work / "server.log")
    try:
        votes = collect(port, args.questions)
    finally:
        server.terminate()
        server.wait()
    print(f"{sum(v[2] == 'up' for v in votes)} up, {sum(v[2] == 'down' for v in votes)} down")

    # 2. the votes become KTO rows, 3. KTO trains on them from the served model
    kto = work / "kto.jsonl"
    subprocess.run(
        [*ALIGNKIT, "data", "from-feedback", str(work / "feedback.db"), "--output", str(kto)], check=True
    )
    train = [
        f"model_name_or_path={model}",
        f"dataset={kto}",
        f"output_dir={work / 'kto'}",
        f"max_steps={args.steps}",
    ]
    config = Path(__file__).resolve().parents[1] / "configs" / "kto_tiny.yaml"
    subprocess.run([*ALIGNKIT, "train", str(config), *train, "logging_steps=1"], check=True)

    # 4. the new model is served the same way, and the loop starts again
    server = start_server(str(work / "kto"), port, work / "feedback-round2.db", work / "server2.log")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        r = client.chat.completions.create(
            model="assistant", messages=[{"role": "user", "content": "What is 2 plus 5?"}], max_tokens=24
        )
        print(json.dumps({"round2_answer": r.choices[0].message.content, "id": r.id}))
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
