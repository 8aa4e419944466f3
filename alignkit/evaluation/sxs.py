"""Blind side-by-side review: one self-contained HTML page for people, its key, its tally and its data.

The page shows each prompt with two answers labelled A and B; which model is on which side is drawn per item
from the seed and written only to `sxs_key.json`, never into the page, so a reviewer cannot tell the models
apart. The page saves `votes.json` ({page_id, votes: {item_id: "A"|"B"|"tie"|"both_bad"}, saved_at}); the key
un-blinds it (`tally`) and turns it into DPO pairs and KTO rows (`votes_to_data`).

Win rate: a win counts 1, a loss 0, a tie and "both bad" 0.5 each (neither answer was preferred); both-bad is
also reported on its own, since many of them say both models fail on those prompts.
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import logging
import os
import random
import secrets
from importlib import resources
from typing import Any

from alignkit.data.files import decode_utf8
from alignkit.data.formats import last_answer, load_examples
from alignkit.errors import UserError
from alignkit.generation.rollout import complete
from alignkit.modeling.load import load_causal_lm
from alignkit.stats import bootstrap_mean_ci, wilson_interval

log = logging.getLogger("alignkit")

VOTES = ("A", "B", "tie", "both_bad")
KEY_FORMAT = "alignkit-sxs-key"
PLACEHOLDER = "__SXS_DATA__"


# ------------------------------------------------------------------------------------------------ the page
def script_json(data: Any) -> str:
    """JSON safe inside a <script> element: with <, > and & as \\u escapes, no text in it ("</script>",
    "<!--") can end the element or change how the HTML parser reads it; JSON.parse gives the same strings."""
    text = json.dumps(data, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _keep_old_key(key_path: str) -> None:
    """A new page in the same folder must not destroy the key of a page reviewers may still be voting on."""
    if not os.path.isfile(key_path):
        return
    try:
        with open(key_path, encoding="utf-8") as fh:
            old_id = json.load(fh).get("page_id", "old")
    except (OSError, ValueError, AttributeError):
        old_id = "old"
    kept = os.path.join(os.path.dirname(key_path), f"sxs_key.{old_id}.json")
    os.replace(key_path, kept)
    log.info("kept the previous page's key as %s", kept)


def write_page(
    output_dir: str,
    prompts: list,
    answers_model: list[str],
    answers_baseline: list[str],
    model_name: str,
    baseline_name: str,
    seed: int = 0,
) -> str:
    """Write `sxs.html` (the blind page) and `sxs_key.json` (which side is the model, prompts, answers) into
    `output_dir`; return the page's path. The sides are drawn from `seed`; the page id is random, so two
    pages never share one even when made with the same seed."""
    if not (len(prompts) == len(answers_model) == len(answers_baseline)):
        raise ValueError(
            f"{len(prompts)} prompts, {len(answers_model)} model answers, {len(answers_baseline)} baseline answers"
        )
    if not prompts:
        raise ValueError("write_page needs at least one prompt")
    rng = random.Random(seed)
    page_id = secrets.token_hex(8)
    page_items, key_items = [], []
    for i, (prompt, ours, theirs) in enumerate(zip(prompts, answers_model, answers_baseline)):
        side = "A" if rng.random() < 0.5 else "B"
        a, b = (ours, theirs) if side == "A" else (theirs, ours)
        page_items.append({"id": str(i), "prompt": prompt, "A": a, "B": b})
        key_items.append(
            {
                "id": str(i),
                "model_side": side,
                "prompt": prompt,
                "model_answer": ours,
                "baseline_answer": theirs,
            }
        )
    template = (
        resources.files("alignkit.evaluation").joinpath("templates/sxs.html").read_text(encoding="utf-8")
    )
    html = template.replace(PLACEHOLDER, script_json({"page_id": page_id, "items": page_items}))
    os.makedirs(output_dir, exist_ok=True)
    key_path = os.path.join(output_dir, "sxs_key.json")
    _keep_old_key(key_path)
    key = {
        "format": KEY_FORMAT,
        "page_id": page_id,
        "model": model_name,
        "baseline": baseline_name,
        "seed": seed,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "items": key_items,
    }
    with open(key_path, "w", encoding="utf-8") as fh:
        json.dump(key, fh, ensure_ascii=False, indent=1)
    page_path = os.path.join(output_dir, "sxs.html")
    with open(page_path, "w", encoding="utf-8") as fh:
        fh.write(html)
    return page_path


# ------------------------------------------------------------------------------------------ votes and key
def _read_json(path: str, what: str) -> dict:

    try:
        with open(path, "rb") as fh:
            data = json.loads(decode_utf8(fh.read(), path))  # not UTF-8: the line and an iconv command
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{what} {path} is not a JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} should hold a JSON object")
    return data


def _load_votes(votes_path: str) -> dict:
    votes = _read_json(votes_path, "votes file")
    if not isinstance(votes.get("page_id"), str) or not isinstance(votes.get("votes"), dict):
        raise UserError(
            f"{votes_path} is not a votes file saved from an `alignkit sxs` page "
            "(it needs `page_id` and `votes`; use the page's Save votes.json button)"
        )
    return votes


def _load_key(votes_path: str, key_path: str | None, page_id: str) -> dict:
    """The key of the page the votes came from; refuses a key of another page, naming both ids and files."""
    if key_path is None:
        key_path = os.path.join(os.path.dirname(os.path.abspath(votes_path)), "sxs_key.json")
        if not os.path.isfile(key_path):
            raise UserError(
                f"no sxs_key.json beside {votes_path}; pass --key with the sxs_key.json that "
                "`alignkit sxs` wrote beside the page"
            )
    key = _read_json(key_path, "key file")
    if key.get("format") != KEY_FORMAT or not isinstance(key.get("items"), list):
        raise UserError(f"{key_path} is not an sxs_key.json written by `alignkit sxs`")
    if key.get("page_id") != page_id:
        kept = os.path.join(os.path.dirname(key_path), f"sxs_key.{page_id}.json")
        hint = f"; that page's key was kept as {kept}" if os.path.isfile(kept) else ""
        raise UserError(
            f"{votes_path} comes from another page: its page id is {page_id}, but {key_path} belongs to "
            f"page {key.get('page_id')}. Pass --key with the key written beside the page the reviewer used{hint}"
        )
    return key


def _checked_votes(votes: dict, key: dict, votes_path: str) -> dict[str, str]:
    ids = {item["id"] for item in key["items"]}
    for item_id, vote in votes["votes"].items():
        if item_id not in ids:
            raise UserError(f"{votes_path}: item {item_id!r} is not on the page (it has {len(ids)} items)")
        if vote not in VOTES:
            raise UserError(f"{votes_path}: item {item_id}: vote {vote!r} is not one of {', '.join(VOTES)}")
    if not votes["votes"]:
        raise UserError(f"{votes_path} holds no votes; vote on the page, then click Save votes.json")
    return votes["votes"]


def _outcome(vote: str, model_side: str) -> str:
    """A page vote seen from the model's side: win, loss, tie or both_bad."""
    if vote in ("tie", "both_bad"):
        return vote
    return "win" if vote == model_side else "loss"


# -------------------------------------------------------------------------------------------------- tally
def tally(votes_path: str, key_path: str | None = None) -> dict:
    """Un-blind a votes file: counts from the model's side, the win rate (ties and both-bad count half) and its
    95% interval (Wilson when every vote is a win or a loss, else a bootstrap over the per-item scores)."""

    votes = _load_votes(votes_path)
    key = _load_key(votes_path, key_path, votes["page_id"])
    checked = _checked_votes(votes, key, votes_path)
    counts = {"win": 0, "loss": 0, "tie": 0, "both_bad": 0}
    scores = []
    for item in key["items"]:
        if item["id"] in checked:
            outcome = _outcome(checked[item["id"]], item["model_side"])
            counts[outcome] += 1
            scores.append({"win": 1.0, "loss": 0.0}.get(outcome, 0.5))
    n = len(scores)
    undecided = counts["tie"] + counts["both_bad"]
    lo, hi = wilson_interval(counts["win"], n) if undecided == 0 else bootstrap_mean_ci(scores)
    return {
        "page_id": votes["page_id"],
        "model": key["model"],
        "baseline": key["baseline"],
        "wins": counts["win"],
        "losses": counts["loss"],
        "ties": counts["tie"],
        "both_bad": counts["both_bad"],
        "n": n,
        "win_rate": sum(scores) / n,
        "ci95": [lo, hi],
        "interval": "wilson" if undecided == 0 else "bootstrap",
        "unvoted": len(key["items"]) - n,
    }


def render_tally(result: dict) -> str:
    """The tally as a short table."""
    n = result["n"]
    lo, hi = result["ci95"]
    rows = [
        (f"{result['model']} better", result["wins"]),
        (f"{result['baseline']} better", result["losses"]),
        ("tie", result["ties"]),
        ("both bad", result["both_bad"]),
    ]
    width = max(len(label) for label, _ in rows)
    lines = [f"side-by-side: {result['model']} (model) vs {result['baseline']} (baseline), {n} votes"]
    lines += [f"  {label:<{width}}  {count:>5}  {count / n:6.1%}" for label, count in rows]
    lines.append(
        f"  win rate of {result['model']}: {result['win_rate']:.3f}  95% CI [{lo:.3f}, {hi:.3f}] "
        f"({result['interval']}; n={n}; a tie or both bad counts half)"
    )
    if result["unvoted"]:
        lines.append(f"  {result['unvoted']} items not voted")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- from-votes
def _as_turn(prompt: Any, answer: str) -> Any:
    """An answer in the form of its prompt: one assistant message after a messages prompt, text after text."""
    return [{"role": "assistant", "content": answer}] if isinstance(prompt, list) else answer


def _data_rows(votes_path: str, key_path: str | None) -> tuple[list[dict], list[dict], dict[str, int]]:
    """DPO rows (winner chosen), KTO rows (winner desirable, loser undesirable; both bad: two undesirable) and
    counts. Ties give no rows, nor does a preference between identical answers; empty answers are left out
    (`train` refuses an empty completion)."""
    votes = _load_votes(votes_path)
    key = _load_key(votes_path, key_path, votes["page_id"])
    checked = _checked_votes(votes, key, votes_path)
    dpo, kto = [], []
    counts = {"ties": 0, "identical": 0, "empty": 0}
    for item in key["items"]:
        vote = checked.get(item["id"])
        if vote is None:
            continue
        if vote == "tie":
            counts["ties"] += 1
            continue
        prompt, ours, theirs = item["prompt"], item["model_answer"], item["baseline_answer"]
        if vote == "both_bad":
            judged = [(ours, False)] + ([(theirs, False)] if theirs != ours else [])
        elif (
            ours == theirs
        ):  # a preference between two equal texts teaches nothing and would contradict itself
            counts["identical"] += 1
            continue
        else:
            win, lose = (ours, theirs) if _outcome(vote, item["model_side"]) == "win" else (theirs, ours)
            judged = [(win, True), (lose, False)]
            if win.strip() and lose.strip():
                dpo.append(
                    {"prompt": prompt, "chosen": _as_turn(prompt, win), "rejected": _as_turn(prompt, lose)}
                )
        for answer, label in judged:
            if not answer.strip():
                counts["empty"] += 1
                continue
            kto.append({"prompt": prompt, "completion": _as_turn(prompt, answer), "label": label})
    return dpo, kto, counts


def _write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def _export(votes_path: str, key_path: str | None, output_dir: str) -> tuple[str, str, str]:
    """Write dpo.jsonl and kto.jsonl; return their paths and a summary for people."""
    dpo, kto, counts = _data_rows(votes_path, key_path)
    os.makedirs(output_dir, exist_ok=True)
    dpo_path, kto_path = os.path.join(output_dir, "dpo.jsonl"), os.path.join(output_dir, "kto.jsonl")
    _write_jsonl(dpo_path, dpo)
    _write_jsonl(kto_path, kto)
    good = sum(row["label"] for row in kto)
    lines = [
        f"wrote {len(dpo)} DPO pairs (the winner as chosen) to {dpo_path}",
        f"wrote {len(kto)} KTO rows ({good} desirable, {len(kto) - good} undesirable) to {kto_path}",
        f"ties: {counts['ties']} (no rows: neither answer was preferred)",
    ]
    if counts["identical"]:
        lines.append(f"{counts['identical']} A/B votes between identical answers gave no rows")
    if counts["empty"]:
        lines.append(f"{counts['empty']} empty answers left out (training refuses an empty completion)")
    lines.append(f"train on them: alignkit train CONFIG.yaml stage=dpo dataset={dpo_path}")
    return dpo_path, kto_path, "\n".join(lines)


def votes_to_data(votes_path: str, key_path: str | None, output_dir: str) -> dict[str, str]:
    """Write `dpo.jsonl` ({prompt, chosen, rejected}) and `kto.jsonl` ({prompt, completion, label}) into
    `output_dir`, in the conversational form when the prompts were messages; return both paths and a summary
    for people ({"dpo", "kto", "summary"})."""
    dpo_path, kto_path, summary = _export(votes_path, key_path, output_dir)
    return {"dpo": dpo_path, "kto": kto_path, "summary": summary}


# -------------------------------------------------------------------------------------------------- sxs
def _prompt_of(example: Any) -> Any:
    """What to ask both models: the row's prompt, or for a whole conversation (messages, ShareGPT) every turn
    before the last assistant answer."""
    prompt = last_answer(example).prompt
    if prompt:
        return prompt
    raise UserError(
        f"{example.where}: no prompt to ask the models (the row has no prompt, question or turns)"
    )


def _answers(path: str, prompts: list, max_new_tokens: int) -> list[str]:
    """Greedy answers of one model; the model is freed before the next one loads."""
    import torch

    device = "cuda" if torch.cuda.is_available() else None
    model, tokenizer = load_causal_lm(path, device=device)
    texts = complete(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=0.0).texts
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return texts


def sxs_page(
    model: str,
    baseline: str,
    dataset: str,
    max_samples: int = 100,
    max_new_tokens: int = 256,
    output_dir: str = "sxs",
    seed: int | None = None,
) -> dict[str, Any]:
    """Answer the first `max_samples` prompts of `dataset` with both models and write the blind review page
    (sxs.html) and its key (sxs_key.json); return {"page", "key", "items"}. `seed` orders the sides (random
    when None; kept in the key)."""

    missing = [name for name, v in (("model", model), ("baseline", baseline), ("dataset", dataset)) if not v]
    if missing:
        raise UserError(
            f"alignkit sxs needs {', '.join('--' + m for m in missing)} "
            "(e.g. alignkit sxs --model out/dpo --baseline out/sft --dataset prompts.jsonl)"
        )
    if max_samples < 1 or max_new_tokens < 1:
        raise UserError("--max-samples and --max-new-tokens must be at least 1")
    prompts = [_prompt_of(ex) for ex in load_examples(dataset)[:max_samples]]
    answers_model = _answers(model, prompts, max_new_tokens)
    answers_baseline = _answers(baseline, prompts, max_new_tokens)
    seed = seed if seed is not None else random.SystemRandom().randrange(2**31)  # kept in the key
    page = write_page(output_dir, prompts, answers_model, answers_baseline, model, baseline, seed)
    return {"page": page, "key": os.path.join(output_dir, "sxs_key.json"), "items": len(prompts)}
