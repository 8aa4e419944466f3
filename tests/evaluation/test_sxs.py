"""The blind side-by-side page: what it hides, its tally, the data it turns into, and the page in Chromium."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from alignkit.cli import main
from alignkit.data.formats import load_examples
from alignkit.evaluation.sxs import tally, votes_to_data, write_page
from alignkit.stats import bootstrap_mean_ci, wilson_interval
from tests.conftest import write_jsonl

MODEL, BASELINE = "out/secret-dpo-model", "out/secret-sft-baseline"
HOSTILE = 'Say hi.</script><script>window.pwned = 1</script><!-- & "quotes"'
PROMPTS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": HOSTILE}],
    "Name a prime above 10.",
    [{"role": "user", "content": "What is 2 + 2?"}],
    "Translate 'cat' to French.",
    [{"role": "user", "content": "Capital of Peru?"}],
    "Spell 'seven'.",
]
OURS = ["Hi.", "11", "4", "chat", "Lima", "s-e-v-e-n"]
THEIRS = ["Hello there!", "9", "5", "chien", "Lima", "sevn"]


def _key(folder: Path) -> dict:
    return json.loads((folder / "sxs_key.json").read_text())


def _page(tmp_path: Path, seed: int = 0, folder: str = "sxs") -> tuple[str, dict]:
    html = write_page(str(tmp_path / folder), PROMPTS, OURS, THEIRS, MODEL, BASELINE, seed=seed)
    return html, _key(tmp_path / folder)


def _embedded(html: str) -> dict:
    body = re.search(r'<script id="sxs-data" type="application/json">(.*?)</script>', html, re.S)
    return json.loads(body.group(1))


def _save_votes(path: Path, page_id: str, votes: dict[str, str]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"page_id": page_id, "votes": votes, "saved_at": "2025-01-01T00:00:00Z"}))
    return str(path)


def _page_vote(key: dict, item: int, outcome: str) -> str:
    """The vote a reviewer casts on the page to give the model `outcome` (win, loss, tie, both_bad) on an item."""
    side = key["items"][item]["model_side"]
    return {"win": side, "loss": "B" if side == "A" else "A"}.get(outcome, outcome)


def turn(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def _cli_error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("alignkit: error:") and "Traceback" not in err
    return err


def test_page_hides_the_models_and_survives_a_script_in_a_prompt(tmp_path: Path) -> None:
    path, key = _page(tmp_path)
    html = Path(path).read_text()
    for secret in (MODEL, BASELINE, "secret", "dpo", "sft"):
        assert secret not in html
    data_tag = html.split('<script id="sxs-data"')[1].split("</script>")[0]
    assert "<" not in data_tag.split(">", 1)[1]  # nothing in the data can close the tag or open a comment
    data = _embedded(html)
    assert data["page_id"] == key["page_id"] and len(data["items"]) == 6
    assert data["items"][0]["prompt"][1]["content"] == HOSTILE  # escaped in the page, the same text in JS
    sides = [item["model_side"] for item in key["items"]]
    assert set(sides) == {"A", "B"}  # both orders occur, so the position does not reveal the model
    for shown, item in zip(data["items"], key["items"]):
        assert shown[item["model_side"]] == item["model_answer"]
        assert shown["B" if item["model_side"] == "A" else "A"] == item["baseline_answer"]
    _, same_seed = _page(tmp_path, seed=0, folder="again")
    assert [i["model_side"] for i in same_seed["items"]] == sides and same_seed["page_id"] != key["page_id"]
    _, other_seed = _page(tmp_path, seed=1, folder="other")
    assert [i["model_side"] for i in other_seed["items"]] != sides


def test_tally_unblinds_counts_and_interval(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _, key = _page(tmp_path)
    outcomes = ["win", "win", "loss", "tie", "both_bad"]  # item 5 left unvoted
    votes = {str(i): _page_vote(key, i, o) for i, o in enumerate(outcomes)}
    path = _save_votes(tmp_path / "sxs" / "votes.json", key["page_id"], votes)
    result = tally(path)  # the key is found beside the votes file
    assert (result["wins"], result["losses"], result["ties"], result["both_bad"]) == (2, 1, 1, 1)
    assert (result["n"], result["unvoted"], result["model"], result["baseline"]) == (5, 1, MODEL, BASELINE)
    assert result["win_rate"] == pytest.approx(3.0 / 5)  # (2 + 0.5 + 0.5) / 5
    assert result["ci95"] == pytest.approx(list(bootstrap_mean_ci([1, 1, 0, 0.5, 0.5])))
    decisive = {str(i): _page_vote(key, i, o) for i, o in enumerate(["win", "loss", "win"])}
    clean = tally(_save_votes(tmp_path / "sxs" / "clean.json", key["page_id"], decisive))
    assert clean["win_rate"] == pytest.approx(2 / 3) and clean["ci95"] == pytest.approx(
        list(wilson_interval(2, 3))
    )
    with pytest.raises(SystemExit) as exit_:
        main(["sxs", "tally", path, "--json"])
    assert exit_.value.code == 0 and json.loads(capsys.readouterr().out)["wins"] == 2
    with pytest.raises(SystemExit):
        main(["sxs", "tally", path])
    assert "win rate of out/secret-dpo-model: 0.600" in capsys.readouterr().out


def test_votes_from_another_page_or_without_key_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _, key = _page(tmp_path)
    key_path = str(tmp_path / "sxs" / "sxs_key.json")
    stray = _save_votes(tmp_path / "downloads" / "votes.json", "0123456789abcdef", {"0": "A"})
    err = _cli_error(["sxs", "tally", stray, "--key", key_path], capsys)
    assert "0123456789abcdef" in err and key["page_id"] in err and key_path in err and stray in err
    out = tmp_path / "data"
    err = _cli_error(["data", "from-votes", stray, "--key", key_path, "--output-dir", str(out)], capsys)
    assert "another page" in err and not (out / "dpo.jsonl").exists()
    assert "--key" in _cli_error(["sxs", "tally", stray], capsys)  # no sxs_key.json beside the download
    # a new page in the same folder keeps the old key, and the refusal names it
    old_votes = _save_votes(tmp_path / "downloads" / "old.json", key["page_id"], {"0": "A"})
    _page(tmp_path, seed=3)
    kept = str(tmp_path / "sxs" / f"sxs_key.{key['page_id']}.json")
    assert kept in _cli_error(["sxs", "tally", old_votes, "--key", key_path], capsys)
    assert tally(old_votes, kept)["n"] == 1
    bad = _save_votes(tmp_path / "downloads" / "bad.json", key["page_id"], {"0": "left"})
    assert "'left'" in _cli_error(["sxs", "tally", bad, "--key", kept], capsys)
    assert "--model" in _cli_error(["sxs", "--baseline", "b"], capsys)


def test_from_votes_writes_pairs_and_kto_rows_train_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _, key = _page(tmp_path)
    outcomes = ["win", "loss", "tie", "both_bad", "win"]  # item 4: identical answers ("Lima")
    votes = {str(i): _page_vote(key, i, o) for i, o in enumerate(outcomes)}
    path = _save_votes(tmp_path / "votes.json", key["page_id"], votes)
    out = tmp_path / "data"
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "data",
                "from-votes",
                path,
                "--key",
                str(tmp_path / "sxs" / "sxs_key.json"),
                "--output-dir",
                str(out),
            ]
        )
    assert exit_.value.code == 0
    summary = capsys.readouterr().out
    assert "wrote 2 DPO pairs" in summary and "ties: 1 (no rows" in summary and "identical" in summary
    pairs = load_examples(str(out / "dpo.jsonl"))
    assert [p.kind for p in pairs] == ["pair", "pair"]
    assert pairs[0].prompt == PROMPTS[0] and pairs[0].chosen == [{"role": "assistant", "content": "Hi."}]
    assert pairs[0].rejected == [{"role": "assistant", "content": "Hello there!"}]
    assert (pairs[1].prompt, pairs[1].chosen, pairs[1].rejected) == (PROMPTS[1], "9", "11")  # text stays text
    rows = load_examples(str(out / "kto.jsonl"))
    assert all(r.kind == "unpaired" for r in rows)
    got = [(r.prompt, r.completion, r.label) for r in rows]
    assert got == [
        (PROMPTS[0], turn("Hi."), True),
        (PROMPTS[0], turn("Hello there!"), False),
        (PROMPTS[1], "9", True),
        (PROMPTS[1], "11", False),
        (PROMPTS[3], "chat", False),  # both bad: two undesirable rows
        (PROMPTS[3], "chien", False),
    ]  # item 4's identical answers give no rows: one text both desirable and undesirable would contradict
    again = votes_to_data(path, str(tmp_path / "sxs" / "sxs_key.json"), str(tmp_path / "again"))
    assert (again["dpo"], again["kto"]) == (
        str(tmp_path / "again" / "dpo.jsonl"),
        str(tmp_path / "again" / "kto.jsonl"),
    )
    assert again["summary"].startswith(f"wrote 2 DPO pairs (the winner as chosen) to {again['dpo']}")


def test_empty_answers_are_left_out_of_the_data(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_page(str(tmp_path / "sxs"), ["Say yes."], [""], ["yes"], MODEL, BASELINE)
    key = _key(tmp_path / "sxs")
    path = _save_votes(tmp_path / "sxs" / "votes.json", key["page_id"], {"0": _page_vote(key, 0, "loss")})
    with pytest.raises(SystemExit):
        main(["data", "from-votes", path, "--output-dir", str(tmp_path / "data")])
    assert "1 empty answers left out" in capsys.readouterr().out
    assert (tmp_path / "data" / "dpo.jsonl").read_text() == ""  # train refuses an empty rejected answer
    rows = load_examples(str(tmp_path / "data" / "kto.jsonl"))
    assert [(r.completion, r.label) for r in rows] == [("yes", True)]


STORED_VOTES = """n => Object.keys(localStorage).some(k => {
  try { return Object.keys(JSON.parse(localStorage.getItem(k)).votes || {}).length === n; } catch (e) { return false; }
})"""


def test_page_in_chromium_votes_reload_save_and_tally(tmp_path: Path, chromium: str) -> None:
    from playwright.sync_api import expect, sync_playwright

    executable = chromium
    path, key = _page(tmp_path)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, headless=True)
        page = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(Path(path).as_uri())
        assert page.inner_text("#progress") == "0 / 6 voted"
        assert HOSTILE in page.inner_text("#prompt") and page.evaluate("window.pwned === undefined")
        page.click("[data-vote=A]")  # item 1: A, then on to item 2
        assert page.inner_text("#position") == "Item 2 of 6"
        page.keyboard.press("2")  # item 2: B
        page.keyboard.press("x")  # item 3: both bad
        page.click("[data-vote=tie]")  # item 4: tie
        # the browser's storage holds the 4 votes (read from another tab: past this page's own cache), then reload
        probe = page.context.new_page()
        probe.goto(Path(path).as_uri())
        probe.wait_for_function(STORED_VOTES, arg=4)
        expect(probe.locator("#progress")).to_have_text("4 / 6 voted")  # its load wrote nothing stale
        probe.close()
        page.reload()
        assert page.inner_text("#progress") == "4 / 6 voted" and page.inner_text("#position") == "Item 5 of 6"
        page.keyboard.press("k")  # back to item 4 and change its vote
        assert "your vote: Tie" in page.inner_text("#vote-state")
        page.keyboard.press("1")  # item 4: A; on to item 5, the next without a vote
        assert page.inner_text("#position") == "Item 5 of 6"
        page.keyboard.press("ArrowRight")
        page.keyboard.press("b")  # item 6: B; item 5 stays unvoted
        assert page.inner_text("#progress") == "5 / 6 voted" and page.locator(".chip[class*=v-]").count() == 5
        page.screenshot(path=str(tmp_path / "sxs.png"), full_page=True)
        if os.environ.get(
            "ALIGNKIT_SCREENSHOT_DIR"
        ):  # a copy to look at: ALIGNKIT_SCREENSHOT_DIR=/tmp pytest ...
            page.screenshot(
                path=os.path.join(os.environ["ALIGNKIT_SCREENSHOT_DIR"], "sxs.png"), full_page=True
            )
        with page.expect_download() as download:
            page.click("#save")
        assert download.value.suggested_filename == "votes.json"
        saved = tmp_path / "sxs" / "votes.json"
        download.value.save_as(saved)
        assert page.is_hidden("#unsaved")
        other = page.context.new_page()  # a second tab shows the votes the first casts (the storage event)
        other.goto(Path(path).as_uri())
        expect(other.locator("#progress")).to_have_text("5 / 6 voted")
        assert page.inner_text("#position") == "Item 5 of 6"
        page.keyboard.press("t")  # item 5: tie
        expect(other.locator("#progress")).to_have_text("6 / 6 voted")
        browser.close()
    assert not errors
    cast = {"0": "A", "1": "B", "2": "both_bad", "3": "A", "5": "B"}
    assert json.loads(saved.read_text())["votes"] == cast
    outcome = {
        i: ("win" if v == key["items"][int(i)]["model_side"] else "loss")
        for i, v in cast.items()
        if v in "AB"
    }
    wins = sum(o == "win" for o in outcome.values())
    result = tally(str(saved))
    assert (result["wins"], result["losses"], result["ties"], result["both_bad"]) == (wins, 4 - wins, 0, 1)
    assert result["win_rate"] == pytest.approx((wins + 0.5) / 5) and result["unvoted"] == 1


def test_sxs_command_on_tiny_models(tiny_model: str, tiny_ref: str, tmp_path: Path) -> None:
    from alignkit.generation.rollout import complete
    from alignkit.modeling.load import load_causal_lm

    questions = ["2+2?", "Name a colour.", "Hi!"]
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "x"}]}
        for q in questions
    ]
    data = write_jsonl(tmp_path / "prompts.jsonl", rows + [{"messages": rows[0]["messages"]}])
    out = tmp_path / "sxs"
    argv = ["sxs", "--model", tiny_model, "--baseline", tiny_ref, "--dataset", data, "--max-samples", "3"]
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--max-new-tokens", "4", "--output-dir", str(out)])
    assert exit_.value.code == 0
    key = _key(out)
    prompts = [[{"role": "user", "content": q}] for q in questions]  # the turns before the last answer
    assert [item["prompt"] for item in key["items"]] == prompts
    for path, field in ((tiny_model, "model_answer"), (tiny_ref, "baseline_answer")):
        model, tok = load_causal_lm(path)
        greedy = complete(model, tok, prompts, max_new_tokens=4, temperature=0.0).texts
        assert [item[field] for item in key["items"]] == greedy
    html = (out / "sxs.html").read_text()
    assert tiny_model not in html and tiny_ref not in html and "/model" not in html
    assert [i["A"] for i in _embedded(html)["items"]] == [
        i["model_answer"] if i["model_side"] == "A" else i["baseline_answer"] for i in key["items"]
    ]


def test_votes_file_that_is_not_utf8_names_the_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _page(tmp_path)
    votes = tmp_path / "sxs" / "votes.json"
    votes.write_bytes('{\n"page_id": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(SystemExit) as info:
        main(["sxs", "tally", str(votes)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "votes.json line 2" in err and "UTF-8" in err and "Traceback" not in err
