"""The console's API where the browser test does not go: path escapes, the token, the queue, a restart,
uploads, forms that follow the config classes, and bad requests answered with 4xx."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from alignkit.config import stages as config_stages
from alignkit.console.app import ConsoleSettings, build_app, worst_first
from alignkit.console.command import start_console
from alignkit.console.forms import stage_form
from alignkit.console.workspace import Workspace
from alignkit.errors import UserError
from tests.conftest import write_jsonl

ROWS = [{"instruction": f"say {i}", "output": f"{i} {i} {i}"} for i in range(40)]


def _client(tmp_path: Path, *allow: str, **settings) -> TestClient:
    app = build_app(ConsoleSettings(workspace=str(tmp_path / "ws"), allow=list(allow), **settings))
    return TestClient(app, base_url="http://127.0.0.1")  # the Host a browser on this machine sends


def _train_keys(model: str, steps: int, **more) -> dict:
    return {
        "stage": "sft",
        "model_name_or_path": model,
        "dataset": "data/sft.jsonl",
        "max_steps": steps,
        "logging_steps": 1,
        "per_device_train_batch_size": 2,
        "max_length": 64,
        "save_steps": 1,
        **more,
    }


def _wait(client: TestClient, run_id: str, statuses: tuple[str, ...], timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = client.get(f"/api/runs/{run_id}").json()
        if view["status"] in statuses:
            return view
        time.sleep(0.05)
    raise AssertionError(f"run {run_id} is still {view['status']}")


# ------------------------------------------------------------------------------------------------ paths
def test_paths_outside_the_workspace_are_refused(tmp_path: Path, tiny_model: str) -> None:
    client = _client(tmp_path)
    ws = tmp_path / "ws"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jsonl").write_text('{"text": "secret"}\n')
    os.symlink(outside, ws / "link")  # a symlink inside that points out
    escapes = {
        "model_name_or_path": ["../outside", str(outside), "link", "data/../../outside"],
        "dataset": ["../outside/secret.jsonl", str(outside / "secret.jsonl"), "link/secret.jsonl"],
        "dataset_dir": ["../outside"],
        "deepspeed": ["/etc/passwd"],
    }
    for key, values in escapes.items():
        for value in values:
            keys = {"stage": "sft", "model_name_or_path": "m", "dataset": "d.jsonl", key: value}
            answer = client.post("/api/check", json={"keys": keys}).json()["error"]
            assert answer["key"] == key and "outside the workspace" in answer["message"], (key, value)
            started = client.post("/api/runs", json={"kind": "train", "config": keys})
            assert started.status_code == 403 and started.json()["key"] == key
    for route, body in (
        ("/api/model", {"path": str(outside)}),
        ("/api/data/preview", {"dataset": "link/secret.jsonl"}),
        ("/api/chat", {"model": "../outside", "messages": [{"role": "user", "content": "hi"}]}),
        ("/api/runs", {"kind": "export", "config": {"adapter": "/etc"}}),
        ("/api/runs", {"kind": "eval", "config": {"model": "m", "dataset": str(outside / "secret.jsonl")}}),
    ):
        answer = client.post(route, json=body)
        assert answer.status_code == 403, (route, answer.json())
    assert not list((ws / "runs").iterdir())  # nothing refused was queued


def test_a_dataset_info_entry_pointing_outside_is_refused(tmp_path: Path) -> None:
    client = _client(tmp_path)
    data = tmp_path / "ws" / "data"
    data.mkdir(parents=True)
    (data / "dataset_info.json").write_text(json.dumps({"evil": {"file_name": "../../secret.json"}}))
    keys = {"stage": "sft", "model_name_or_path": "m", "dataset": "evil"}
    answer = client.post("/api/check", json={"keys": keys}).json()["error"]
    assert answer["key"] == "dataset" and "outside the workspace" in answer["message"]


def test_a_dataset_info_entry_by_script_or_hub_key_pointing_outside_is_refused(tmp_path: Path) -> None:
    client = _client(tmp_path)
    data = tmp_path / "ws" / "data"
    data.mkdir(parents=True)
    secret = tmp_path / "secret.jsonl"
    secret.write_text('{"text": "secret"}\n')
    entries = {"by_script": {"script_url": str(secret)}, "by_hub": {"hf_hub_url": str(secret)}}
    (data / "dataset_info.json").write_text(json.dumps(entries))
    for name in entries:
        for route in ("/api/data/preview", "/api/data/inspect"):
            answer = client.post(route, json={"dataset": name})
            assert answer.status_code == 403 and "outside the workspace" in answer.json()["error"], (
                name,
                route,
            )


def test_a_name_shaped_like_a_hub_id_that_is_a_local_folder_is_a_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cwd" / "models" / "private").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "cwd")  # where the library would look for `models/private`
    ws = Workspace(tmp_path / "ws")
    # not a hub id (the library would read the folder here): a path, resolved in the workspace, not here
    assert ws.model_or_hub("models/private", "model") == str(ws.root / "models" / "private")


def test_hub_ids_and_allowed_folders_pass(tmp_path: Path, tiny_model: str) -> None:
    ws = Workspace(tmp_path / "ws", [Path(tiny_model).parent])
    assert ws.model_or_hub("Qwen/Qwen2.5-0.5B-Instruct", "model") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert ws.model_or_hub(tiny_model, "model") == os.path.realpath(tiny_model)
    (tmp_path / "ws" / "org" / "name").mkdir(
        parents=True
    )  # a local folder shaped like a hub id is the folder
    assert ws.model_or_hub("org/name", "model") == str((tmp_path / "ws" / "org" / "name").resolve())


# ------------------------------------------------------------------------------------------------ token
def test_a_console_bound_beyond_loopback_needs_a_token(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--token"):
        start_console(ConsoleSettings(workspace=str(tmp_path / "ws"), host="0.0.0.0", port=0))


def test_every_request_carries_the_token(tmp_path: Path) -> None:
    client = _client(tmp_path, token="s3cret")
    for path in ("/", "/static/console.js", "/api/info", "/api/runs"):
        assert client.get(path).status_code == 401, path
    assert client.get("/api/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/api/info", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    first = client.get("/?token=s3cret")  # the page's first load: the token becomes a cookie
    assert first.status_code == 200 and "alignkit_console_token" in first.headers["set-cookie"]
    assert client.get("/api/info").status_code == 200  # the cookie from now on


def test_other_sites_cannot_drive_a_local_console(tmp_path: Path) -> None:
    client = _client(tmp_path)
    keys = {"keys": {"stage": "sft", "model_name_or_path": "m", "dataset": "d.jsonl"}}
    forged = client.post("/api/check", json=keys, headers={"Origin": "https://evil.example"})
    assert (
        forged.status_code == 403 and "another site" in forged.json()["error"]
    )  # cross-site request forgery
    rebound = client.get("/api/info", headers={"Host": "evil.example:7860"})
    assert (
        rebound.status_code == 403 and "127.0.0.1 / localhost only" in rebound.json()["error"]
    )  # DNS rebinding
    own = client.post("/api/check", json=keys, headers={"Origin": "http://127.0.0.1"})
    assert own.status_code == 200  # the console's own page
    assert client.get("/api/info", headers={"Host": "localhost:7860"}).status_code == 200
    assert client.get("/api/info", headers={"Host": "[::1]:7860"}).status_code == 200
    on_127_0_0_2 = TestClient(build_app(ConsoleSettings(workspace=str(tmp_path / "ws2"), host="127.0.0.2")))
    assert on_127_0_0_2.get("/api/info", headers={"Host": "evil.example"}).status_code == 403  # loopback too


# ------------------------------------------------------------------------------- queue, stop, restart
@pytest.mark.slow  # trains, serves or samples
def test_one_run_at_a_time_stop_resume_and_a_restart(tmp_path: Path, tiny_model: str) -> None:
    write_jsonl(tmp_path / "ws" / "data" / "sft.jsonl", ROWS)
    client = _client(tmp_path, str(Path(tiny_model).parent))
    first = client.post("/api/runs", json={"kind": "train", "config": _train_keys(tiny_model, 400)}).json()
    second = client.post("/api/runs", json={"kind": "train", "config": _train_keys(tiny_model, 3)}).json()
    _wait(client, first["id"], ("running",))
    assert client.get(f"/api/runs/{second['id']}").json()["status"] == "queued"  # one at a time
    assert client.post(f"/api/runs/{second['id']}/stop").json()["status"] == "stopped"  # off the queue
    while client.get(f"/api/runs/{first['id']}").json()["n_records"] < 3:
        time.sleep(0.05)
    client.post(f"/api/runs/{first['id']}/stop")
    stopped = _wait(client, first["id"], ("stopped",))
    step = stopped["result"]["steps"]
    assert 0 < step < 400 and stopped["result"]["checkpoint"].endswith(f"checkpoint-{step}")
    assert client.get(f"/api/runs/{second['id']}").json()["started"] is None  # the cancelled run never ran
    # a console that died with this run running: the next one finds it interrupted, and it resumes
    ws = Workspace(tmp_path / "ws")
    run = ws.load(first["id"])
    run.status = "running"
    ws.save(run)
    client.app.state.console.close()
    again = _client(tmp_path, str(Path(tiny_model).parent))
    assert again.get("/api/info").json()["interrupted"] == [first["id"]]
    assert again.get(f"/api/runs/{first['id']}").json()["status"] == "interrupted"
    assert again.post(f"/api/runs/{first['id']}/resume").json()["status"] == "queued"
    done = _wait(again, first["id"], ("finished",))
    assert done["result"]["steps"] == 400 and done["n_records"] == 400  # the curve from step 1, once
    assert [r["step"] for r in done["records"]] == list(range(1, 401))
    assert "resumed from" in "\n".join(done["log"])
    refused = again.post(f"/api/runs/{first['id']}/resume")  # a finished run does not resume
    assert refused.status_code == 400 and "only stopped training resumes" in refused.json()["error"]


# ------------------------------------------------------------------------------------------------ forms
def test_a_key_added_to_a_stage_config_appears_in_its_form(monkeypatch: pytest.MonkeyPatch) -> None:
    @dataclass
    class WithNewKey(config_stages.SFTConfig):
        brand_new_key: float = 0.25  # a help text written once, beside the key

    monkeypatch.setitem(config_stages.CONFIG_CLASSES, "sft", WithNewKey)
    field = next(f for f in stage_form("sft") if f["name"] == "brand_new_key")
    assert field == {
        "name": "brand_new_key",
        "type": "float",
        "optional": False,
        "default": 0.25,
        "choices": [],
        "help": "a help text written once, beside the key",
        "group": "withnewkey",
    }


def test_forms_cover_every_key_with_registry_choices() -> None:
    for stage, cls in config_stages.CONFIG_CLASSES.items():
        names = {f["name"] for f in stage_form(stage)}
        console_keys = {
            "stage",
            "output_dir",
            "overwrite_output_dir",
            "resume_from_checkpoint",
            "disable_tqdm",
        }
        assert names == {f.name for f in dataclasses.fields(cls)} - console_keys, stage
    dpo = {f["name"]: f for f in stage_form("dpo")}
    assert "ipo" in dpo["loss_type"]["choices"] and dpo["loss_type"]["type"] == "list"
    assert dpo["ref_model_name_or_path"]["optional"] and dpo["max_samples"]["type"] == "int"
    assert dpo["lr_scheduler_type"]["choices"][:2] == ["linear", "cosine"]


def test_invalid_values_are_named_by_key(tmp_path: Path) -> None:
    client = _client(tmp_path)
    base = {"stage": "dpo", "model_name_or_path": "m", "dataset": "d.jsonl"}
    for key, value, said in (
        ("beta", -1, "must be > 0"),
        ("loss_type", "sigmod", "did you mean `sigmoid`"),
        ("max_length", 0, "must be > 0"),
    ):
        answer = client.post("/api/runs", json={"kind": "train", "config": {**base, key: value}})
        assert answer.status_code == 422 and answer.json()["key"] == key and said in answer.json()["error"]
    assert client.post("/api/check", json={"keys": {**base, "beta": 0.2}}).json() == {"error": None}


# --------------------------------------------------------------------------------------- bad requests
def test_bad_requests_get_4xx_and_the_console_keeps_serving(tmp_path: Path) -> None:
    client = _client(tmp_path, max_upload_mb=0.001)
    assert client.post("/api/check", content=b"{not json").status_code == 400
    assert client.post("/api/check", json=[1, 2]).status_code == 400
    assert client.get("/api/runs/../../etc").status_code in (400, 404)
    assert client.get("/api/runs/train-nope").status_code == 400
    assert client.get("/api/feedback", params={"days": "soon"}).status_code == 400
    assert client.get("/api/feedback", params={"label": "meh"}).status_code == 400
    assert client.post("/api/runs", json={"kind": "rm -rf", "config": {}}).status_code == 400
    assert client.post("/api/feedback", json={"id": "console-none", "label": "down"}).status_code == 404
    assert client.post("/api/chat", json={"model": "m", "messages": "hi"}).status_code == 400
    assert client.post("/api/runs/train-20260101-000000-abcd/stop").status_code == 400
    assert client.post("/api/runs", json={"kind": "train", "config": [1, 2]}).status_code == 400
    assert client.post("/api/runs", json={"kind": "train", "config": {"dataset": [1]}}).status_code == 400
    assert client.post("/api/data/preview", json={"dataset": "x.jsonl", "rows": "many"}).status_code == 400
    assert client.post("/api/serve", json={"model": "m", "port": "http"}).status_code == 400
    assert client.post("/api/serve", json={"model": "m", "port": 70000}).status_code == 400
    assert client.get("/api/feedback", params={"days": "inf"}).status_code == 400
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 0}
    assert "max_new_tokens" in client.post("/api/chat", json=chat).json()["error"]  # before any stream
    big = client.post("/api/upload?name=big.jsonl", content=b"x" * 2000)
    assert big.status_code == 413 and "--max-upload-mb" in big.json()["error"]
    for name in ("../evil.jsonl", "evil.sh", "a/b.jsonl"):
        assert client.post(f"/api/upload?name={name}", content=b"{}").status_code == 400, name
    ok = client.post("/api/upload?name=rows.jsonl", content=b'{"text": "hi"}\n')
    assert ok.json() == {"path": "data/rows.jsonl", "bytes": 15}
    assert client.get("/api/info").json()["data_files"] == ["rows.jsonl"]


def test_worst_samples_first_follow_the_metric_direction() -> None:
    rows = [{"model": {"scores": {"accuracy": a, "kl": k}}} for a, k in ((1.0, 0.1), (0.0, 0.9), (0.5, 0.5))]
    assert [r["model"]["scores"]["accuracy"] for r in worst_first(rows, "accuracy")] == [0.0, 0.5, 1.0]
    assert [r["model"]["scores"]["kl"] for r in worst_first(rows, "kl")] == [0.9, 0.5, 0.1]
    assert worst_first([{"model": {"scores": {}}}, *rows], "accuracy")[-1] == {"model": {"scores": {}}}
    lengths = [
        {"model": {"scores": {"length": m}}, "baseline": {"scores": {"length": b}}}
        for m, b in ((9, 10), (40, 10), (2, 10))
    ]
    assert [r["model"]["scores"]["length"] for r in worst_first(lengths, "length")] == [40, 2, 9]


@pytest.mark.slow  # trains, serves or samples
def test_serve_a_model_from_the_console_and_stop_it(tmp_path: Path, tiny_model: str) -> None:
    import httpx

    from tests.conftest import free_port

    client = _client(tmp_path, str(Path(tiny_model).parent))
    port = free_port()
    served = client.post("/api/serve", json={"model": tiny_model, "port": port}).json()
    assert served["url"] == f"http://127.0.0.1:{port}/v1" and served["port"] == port
    assert client.post("/api/serve", json={"model": tiny_model, "port": port}).status_code == 400  # taken
    assert [s["port"] for s in client.get("/api/serve").json()] == [port]
    answer = httpx.post(
        f"{served['url']}/chat/completions",
        json={"model": served["ids"][0], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
        timeout=60,
    ).json()
    stored = client.get("/api/feedback").json()  # the served answer is in the console's feedback store
    assert [e["id"] for e in stored] == [answer["id"]]
    assert client.post(f"/api/serve/{port}/stop").json() == {"ok": True}
    assert client.get("/api/serve").json() == []
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{served['url']}/models", timeout=5)
    assert client.post(f"/api/serve/{port}/stop").status_code == 404


@pytest.mark.slow  # trains, serves or samples
def test_compare_from_the_console(tmp_path: Path, tiny_model: str, shared_data: Path) -> None:
    lf = shared_data / "llamafactory"
    client = _client(tmp_path, str(Path(tiny_model).parent), str(shared_data))
    config = {
        "model_name_or_path": tiny_model,
        "dataset": "dpo_en_demo",
        "dataset_dir": str(lf),
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "max_length": 128,
        "methods": {"dpo": {"stage": "dpo"}, "kto": {"stage": "kto"}},
        "eval": {"dataset": str(lf / "alpaca_en_demo.json"), "max_samples": 3, "max_new_tokens": 4},
    }
    bad = client.post("/api/runs", json={"kind": "compare", "config": {**config, "methods": {"dpo": {}}}})
    assert bad.status_code == 422 and "at least 2 methods" in bad.json()["error"]
    escape = {
        **config,
        "methods": {"dpo": {"stage": "dpo", "dataset": "/etc/passwd"}, "kto": {"stage": "kto"}},
    }
    refused = client.post("/api/runs", json={"kind": "compare", "config": escape})
    assert refused.status_code == 403 and refused.json()["key"] == "dataset"
    run = client.post("/api/runs", json={"kind": "compare", "config": config}).json()
    done = _wait(client, run["id"], ("finished", "failed"), timeout=300)
    assert done["status"] == "finished", done["error"]
    result = done["result"]
    assert set(result["methods"]) == {"dpo", "kto"} and "| kl |" in result["table"]
    assert result["report_md"].startswith("# alignkit compare")
    assert isinstance(result["reward_hacking"], dict) and result["plots"]
    image = client.get(f"/api/runs/{run['id']}/plots/{result['plots'][0]}")
    assert image.status_code == 200 and image.content[:4] == b"\x89PNG"
    assert client.get(f"/api/runs/{run['id']}/plots/..%2Frun.json").status_code == 404


@pytest.mark.slow  # trains, serves or samples
def test_live_review_votes_are_checked_and_the_key_stays_on_the_server(
    tmp_path: Path, tiny_model: str, shared_data: Path
) -> None:
    client = _client(tmp_path, str(Path(tiny_model).parent), str(shared_data))
    config = {
        "model": tiny_model,
        "baseline": tiny_model,
        "dataset": str(shared_data / "llamafactory" / "alpaca_en_demo.json"),
    }
    assert (
        client.post("/api/runs", json={"kind": "sxs", "config": {"model": tiny_model}}).json()["key"]
        == "baseline"
    )
    run = client.post(
        "/api/runs", json={"kind": "sxs", "config": {**config, "max_samples": 2, "max_new_tokens": 3}}
    ).json()
    _wait(client, run["id"], ("finished",))
    page = client.get(f"/api/runs/{run['id']}/review").text
    assert (
        "window.ALIGNKIT_LIVE" in page and tiny_model not in page
    )  # the key (which side is which) stays here
    assert client.post(f"/api/runs/{run['id']}/tally").status_code == 400  # no votes yet
    key = json.loads((tmp_path / "ws" / "runs" / run["id"] / "sxs" / "sxs_key.json").read_text())
    votes_url = f"/api/runs/{run['id']}/votes"
    assert client.post(votes_url, json={"page_id": "other", "votes": {}}).status_code == 400
    assert client.post(votes_url, json={"page_id": key["page_id"], "votes": {"0": "C"}}).status_code == 400
    hostile = {"</script><script>alert(1)</script>": "A"}  # only the page's item ids are stored
    assert client.post(votes_url, json={"page_id": key["page_id"], "votes": hostile}).status_code == 400
    assert client.post(votes_url, json={"page_id": key["page_id"], "votes": {"0": "A"}}).json() == {
        "votes": 1,
        "all": {"0": "A"},
    }
    # a second tab that never saw item 0's vote sends item 1's: both are kept, and it gets them back
    other_tab = client.post(votes_url, json={"page_id": key["page_id"], "votes": {"1": "tie"}}).json()
    assert other_tab == {"votes": 2, "all": {"0": "A", "1": "tie"}}
    assert '"votes": {"0": "A", "1": "tie"}' in client.get(f"/api/runs/{run['id']}/review").text
    tallied = client.post(f"/api/runs/{run['id']}/tally").json()
    assert tallied["kto"] == f"data/review-{run['id']}/kto.jsonl" and tallied["prefill"]["stage"] == "dpo"
    assert client.get("/api/runs/train-20260101-000000-abcd/review").status_code == 400


def test_every_word_of_the_page_exists_in_english_and_chinese() -> None:
    import re

    static = Path(__file__).resolve().parents[2] / "alignkit" / "console" / "static"
    words = (static / "i18n.js").read_text(encoding="utf-8")
    en, zh = words.split("\n  zh: {")
    keys = {lang: set(re.findall(r"\b([a-z_]+): \"", text)) for lang, text in (("en", en), ("zh", zh))}
    assert keys["en"] == keys["zh"] and len(keys["en"]) > 90
    used = set(
        re.findall(r'data-i18n(?:-placeholder)?="([a-z_]+)"', (static / "index.html").read_text("utf-8"))
    )
    used |= set(re.findall(r'\bt\("([a-z_]+)"\)', (static / "console.js").read_text("utf-8")))
    assert used - keys["en"] == set()


def test_the_shared_keys_fall_in_their_sections() -> None:
    """A comment on a line of its own in BaseConfig starts a form section: the shared keys stay in the
    class's five (a stray comment once hid `max_steps` in a collapsed section of its own)."""
    shared = {f["group"] for f in stage_form("sft") if f["group"] != "sft"}
    assert shared == {"general", "model", "data", "optimisation", "logging and checkpoints"}
    groups = {f["name"]: f["group"] for f in stage_form("sft")}
    assert groups["max_steps"] == groups["optim"] == groups["auto_find_batch_size"] == "optimisation"
