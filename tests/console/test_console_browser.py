"""The console in headless Chromium, end to end on the tiny model and LLaMA-Factory's demo data: the path a
person takes, from picking a model to exporting the trained one. Screenshots of each page go to
ALIGNKIT_SCREENSHOT_DIR when it is set (to look at them), else to the test's folder."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from alignkit.console.app import ConsoleSettings
from alignkit.console.command import start_console

pytestmark = pytest.mark.slow


def _points(page) -> int:
    chart = page.query_selector(".chart[data-metric=loss]")
    return int(chart.get_attribute("data-points")) if chart else 0


def _started(page, before: str | None) -> str:
    """The id of the run the page opened after a start (the run detail shows a new one)."""
    page.wait_for_function(
        "(before) => { const d = document.querySelector('#run-detail'); return d && d.dataset.run && d.dataset.run !== before; }",
        arg=before,
    )
    return page.get_attribute("#run-detail", "data-run")


def _finished(page, run_id: str, timeout: float = 180_000) -> None:
    page.wait_for_selector(f"#run-detail[data-run='{run_id}'][data-status='finished']", timeout=timeout)


class Shots:
    def __init__(self, page, folder: Path) -> None:
        self.page, self.folder = page, Path(os.environ.get("ALIGNKIT_SCREENSHOT_DIR") or folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, name: str) -> None:
        self.page.screenshot(path=str(self.folder / f"console-{name}.png"))


def test_the_whole_path_in_the_browser(
    tmp_path: Path, tiny_model: str, shared_data: Path, chromium: str
) -> None:
    from playwright.sync_api import sync_playwright

    workspace = tmp_path / "ws"
    lf = shared_data / "llamafactory"
    settings = ConsoleSettings(
        workspace=str(workspace), port=0, allow=[str(shared_data), str(Path(tiny_model).parent)]
    )
    with start_console(settings) as console, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.context.set_default_timeout(
            90_000
        )  # the suite's other worker shares the cores: slow is not broken
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        shot = Shots(page, tmp_path / "shots")
        page.goto(console.url + "/")
        page.wait_for_selector("body[data-ready='1']")

        # the model: what it is, before anything runs
        page.fill("#g-model", tiny_model)
        page.dispatch_event("#g-model", "change")
        page.click("#model-show")
        page.wait_for_selector("#model-info tr")
        info = page.inner_text("#model-info")
        assert "LlamaForCausalLM" in info and "context\t2048" in info and "chat template\tyes" in info
        shot("1-model")

        # the data: LLaMA-Factory's alpaca_en_demo by its dataset_info.json name, previewed and reported
        page.click("[data-tab=data]")
        for sel, value in (("#d-dataset", "alpaca_en_demo"), ("#d-dir", str(lf)), ("#d-maxlen", "256")):
            page.fill(sel, value)
            page.dispatch_event(sel, "change")
        page.click("#d-preview")
        page.wait_for_selector("#d-format")
        assert page.inner_text("#d-format") == "alpaca"
        assert (
            "<|im_start|>user" in page.inner_text("#d-rows details pre")
            or page.locator("#d-rows details").count() > 0
        )
        page.click("#d-inspect")
        page.wait_for_selector("#d-report .d-report-table")
        report = page.inner_text("#d-report")
        assert "999" in report and "duplicate prompts\t14" in report
        shot("2-data")

        # train: an invalid value is shown at its key; a path outside the workspace is refused at its key
        page.click("[data-tab=train]")
        page.fill("#f-learning_rate", "-1")
        page.click("#t-check")
        page.wait_for_selector(".field.bad[data-key=learning_rate]")
        assert "must be >= 0" in page.inner_text(".field.bad[data-key=learning_rate] .msg")
        shot("3-train-invalid")
        page.fill("#f-learning_rate", "0.001")
        page.fill("#f-model_name_or_path", "../../etc")
        page.click("#t-check")
        page.wait_for_selector(".field.bad[data-key=model_name_or_path]")
        assert "outside the workspace" in page.inner_text(".field.bad .msg")
        page.fill("#f-model_name_or_path", tiny_model)

        # a LoRA SFT run from the form; the curve gains points while it runs; stop; resume; it finishes
        page.click("summary:text('logging and checkpoints')")
        for key, value in {
            "max_steps": "1000",
            "logging_steps": "1",
            "per_device_train_batch_size": "2",
            "max_length": "128",
        }.items():
            page.fill(f"#f-{key}", value)
        assert page.input_value("#f-finetuning_type") == "lora"
        started = time.monotonic()
        page.click("#t-start")
        sft = _started(page, None)
        page.wait_for_selector(".chart[data-metric=loss]")
        first_point = time.monotonic() - started
        page.wait_for_function(
            "() => +document.querySelector('.chart[data-metric=loss]').dataset.points >= 3"
        )
        seen = _points(page)
        page.wait_for_function(
            f"() => +document.querySelector('.chart[data-metric=loss]').dataset.points > {seen}"
        )
        assert page.get_attribute("#run-detail", "data-status") == "running"
        shot("4-train-running")
        page.click("#run-stop")
        page.wait_for_selector("#run-detail[data-status='stopped']", timeout=60_000)
        stopped_at = int(page.inner_text("#run-progress").split()[1].split("/")[0])
        assert 0 < stopped_at < 1000
        page.click("#run-resume")
        _finished(page, sft)
        assert page.inner_text("#run-progress").endswith("1000/1000")
        assert _points(page) == 1000  # the curve goes on from the checkpoint: one point per step
        assert "learning_rate: 0.001" in page.text_content("#run-resolved")  # the resolved config, every key
        page.click(".run-data summary")  # the run's data report, for its model and max_length
        page.wait_for_selector(".run-data .d-report-table")
        assert "rows longer than max_length (128)" in page.inner_text(".run-data")
        shot("5-train-finished")

        # chat with the result; thumbs-down; the vote is in Review; KTO data from it; the prefilled KTO run
        page.click("text=Chat with it")
        page.fill("#c-temp", "1")
        page.fill("#c-max", "12")
        page.fill("#c-input", "Tell me about crepes.")
        page.click("#c-send")
        page.wait_for_selector(".votes")
        page.click(".vote-down")
        page.wait_for_selector(".vote-down.on")
        page.check("#c-sbs")  # the same prompt to the run and its base, side by side
        page.fill(".pane:nth-child(2) .c-model", tiny_model)
        page.fill("#c-input", "And pancakes?")
        page.click("#c-send")
        page.wait_for_function("() => document.querySelectorAll('.pane:nth-child(2) .votes').length == 1")
        page.wait_for_function("() => document.querySelectorAll('.pane:nth-child(1) .votes').length == 2")
        shot("6-chat")
        page.click("[data-tab=review]")
        page.select_option("#r-label", "down")
        page.click("#r-filter")
        page.wait_for_function(
            "() => { const r = [...document.querySelectorAll('#r-table tr[data-id] td.label')];"
            " return r.length == 1 && r[0].textContent.includes('down'); }"
        )  # of the three answers, the one voted down
        page.click("#r-make")
        page.wait_for_selector("#train-on-this")
        shot("7-review")
        made = page.inner_text("#made-path")
        rows = [json.loads(line) for line in (workspace / made).read_text().splitlines()]
        assert len(rows) == 1 and rows[0]["label"] is False
        page.click("#train-on-this")
        page.wait_for_selector("#f-allow_single_label")
        assert page.input_value("#t-stage") == "kto"
        assert page.input_value("#f-model_name_or_path") == f"runs/{sft}/output"
        assert page.input_value("#f-dataset") == made and page.is_checked("#f-allow_single_label")
        page.click("summary:text('logging and checkpoints')")
        for key, value in {
            "max_steps": "2",
            "logging_steps": "1",
            "per_device_train_batch_size": "1",
            "max_length": "64",
        }.items():
            page.fill(f"#f-{key}", value)
        page.click("#t-start")
        kto = _started(page, sft)
        _finished(page, kto)
        page.wait_for_selector(".chart[data-metric=kl]")
        shot("8-kto-finished")

        # evaluate the SFT run against its base; read the table
        page.click(f"#runs-table tr[data-run='{sft}']")
        page.wait_for_selector(f"#run-detail[data-run='{sft}']")
        page.click("text=Evaluate it")
        assert page.input_value("#ef-model") == f"runs/{sft}/output"
        page.fill("#ef-dataset", str(lf / "alpaca_en_demo.json"))
        page.fill("#ef-max_samples", "4")
        page.fill("#ef-max_new_tokens", "8")
        page.click("#e-start")
        ev = _started(page, sft)
        _finished(page, ev)
        page.wait_for_selector("#eval-table")
        table = page.inner_text("#eval-table")
        assert "perplexity" in table and "length_ratio" in table and "95% CI" in table
        page.wait_for_selector("#samples .card")
        shot("9-eval")

        # export the SFT run: merged, checked against the adapter's logits
        page.click(f"#runs-table tr[data-run='{sft}']")
        page.wait_for_selector(f"#run-detail[data-run='{sft}']")
        page.click("text=Export it")
        page.click("#s-export")
        exp = _started(page, sft)
        _finished(page, exp)
        page.wait_for_selector("#export-table")
        assert "max_logit_diff" in page.inner_text("#export-table")
        assert (workspace / "runs" / exp / "model" / "model.safetensors").is_file()
        shot("10-export")

        # compare two methods from the base: the report as a page, with its plots and the reward-hacking check
        page.click("[data-tab=eval]")
        page.click("#k-template")
        template = page.input_value("#k-yaml")  # from the model and data in the bars
        assert (
            template.startswith(f"model_name_or_path: {page.input_value('#g-model')}\n")
            and "methods:" in template
        )
        compare_yaml = f"""model_name_or_path: {tiny_model}
dataset: dpo_en_demo
dataset_dir: {lf}
max_steps: 2
per_device_train_batch_size: 2
max_length: 128
methods:
  dpo: {{stage: dpo}}
  kto: {{stage: kto}}
eval: {{dataset: {lf / "alpaca_en_demo.json"}, max_samples: 3, max_new_tokens: 4}}
"""
        page.fill("#k-yaml", compare_yaml)
        page.click("#k-start")
        cmp = _started(page, exp)
        _finished(page, cmp)
        page.wait_for_selector("#hacking")
        assert "| dpo" not in page.inner_text("#run-detail")  # tables are tables, not Markdown text
        assert page.locator("#run-detail .report table").count() >= 1
        page.wait_for_function(
            "() => [...document.querySelectorAll('img.plot')].some((i) => i.naturalWidth > 0)"
        )
        shot("11-compare")

        # the blind side-by-side review served live: votes stored by the console, the models hidden until tallied
        page.click("[data-tab=review]")
        page.fill("#x-model", f"runs/{sft}/output")
        page.fill("#x-baseline", tiny_model)
        page.fill("#x-dataset", str(lf / "alpaca_en_demo.json"))
        page.fill("#x-n", "3")
        page.click("#x-start")
        review = _started(page, cmp)
        _finished(page, review)
        with page.context.expect_page() as opened:
            page.click("#open-review")
        reviewer = opened.value
        reviewer.wait_for_selector("#progress")
        assert sft not in reviewer.content() and tiny_model not in reviewer.content()  # blind
        for key in ("1", "2", "3"):  # A, B, tie
            reviewer.keyboard.press(key)
        reviewer.wait_for_function(
            "() => document.querySelector('#progress').textContent.startsWith('3 / 3')"
        )
        reviewer.wait_for_timeout(300)
        stored = json.loads((workspace / "runs" / review / "sxs" / "votes.json").read_text())
        assert sorted(stored["votes"].values()) == ["A", "B", "tie"]
        reviewer.reload()  # the server's votes come back with the page
        assert reviewer.inner_text("#progress").startswith("3 / 3")
        shot_review = Shots(reviewer, tmp_path / "shots")
        shot_review("12-blind-review")
        reviewer.close()
        page.click("#tally-btn")
        page.wait_for_selector("#train-dpo")
        assert "1 DPO pair" in page.inner_text("#tally") or "pairs" in page.inner_text("#tally")
        page.click("#train-dpo")
        page.wait_for_function("() => document.querySelector('#t-stage').value === 'dpo'")
        assert page.input_value("#f-dataset") == f"data/review-{review}/dpo.jsonl"
        shot("13-dpo-from-review")

        # the page in Chinese
        page.select_option("#lang", "zh")
        assert page.inner_text("[data-tab=train]") == "训练"
        shot("14-zh")
        assert errors == []
        browser.close()
    print(f"first curve point {first_point:.2f} s after start")
