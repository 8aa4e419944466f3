"""Multi-turn, tool-using rollouts: reading tool calls in every template's format, schemas from Python
functions, tool failures as observations, episodes on scripted model outputs (a call, a malformed call, a
raising tool, the turn limit), masks over tool results on a hand-built transcript, and a GRPO step on episodes
whose loss falls on the model's tokens only."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from alignkit.errors import UserError
from alignkit.generation.tools import (
    Episode,
    ToolCallError,
    ToolEnvironment,
    episode_tokens,
    parse_tool_calls,
    run_episodes,
    tool_schema,
)
from tests.conftest import write_jsonl


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first number
        b: the second number
    """
    return a + b


def boom(x: int) -> int:
    """Always fails.

    Args:
        x: anything
    """
    raise ValueError("no luck")


def slow(x: int) -> int:
    """Sleeps.

    Args:
        x: anything
    """
    time.sleep(1.0)
    return x


ADD = {"name": "add", "arguments": {"a": 12, "b": 7}}


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>\n{"name": "add", "arguments": {"a": 12, "b": 7}}\n</tool_call>',  # qwen / hermes
        '[TOOL_CALLS][{"name": "add", "arguments": {"a": 12, "b": 7}}]',  # mistral
        'Action: add\nAction Input: {"a": 12, "b": 7}',  # LLaMA-Factory's default
        '{"name": "add", "parameters": {"a": 12, "b": 7}}',  # llama 3
        'Let me add.\n<tool_call>{"name": "add", "arguments": "{\\"a\\": 12, \\"b\\": 7}"}</tool_call>',
    ],
)
def test_tool_calls_are_read_in_every_templates_format(text: str) -> None:
    assert parse_tool_calls(text) == [ADD]


def test_two_calls_no_call_and_malformed_calls() -> None:
    two = '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>\n<tool_call>{"name": "add", "arguments": {"a": 3, "b": 4}}</tool_call>'
    assert [c["arguments"] for c in parse_tool_calls(two)] == [{"a": 1, "b": 2}, {"a": 3, "b": 4}]
    assert parse_tool_calls("The answer is 19.") == []
    with pytest.raises(ToolCallError, match="not valid JSON"):
        parse_tool_calls('<tool_call>{"name": "add", "arguments": {"a": 1,</tool_call>')
    with pytest.raises(ToolCallError, match="needs a name"):
        parse_tool_calls('<tool_call>{"arguments": {}}</tool_call>')


def test_schema_from_signature_and_docstring() -> None:
    schema = tool_schema(add)["function"]
    assert schema["name"] == "add" and schema["description"] == "Add two integers."
    assert schema["parameters"]["properties"]["a"] == {"type": "integer", "description": "the first number"}
    assert schema["parameters"]["required"] == ["a", "b"]

    def undocumented(a, b):  # noqa: ANN001, ANN202
        return a

    with pytest.raises(UserError, match="tool `undocumented`: cannot make its JSON schema"):
        tool_schema(undocumented)


def _step(env: ToolEnvironment, text: str) -> tuple:
    return env.step([{"role": "user", "content": "q"}, {"role": "assistant", "content": text}])


def test_tool_failures_become_observations() -> None:
    env = ToolEnvironment({"add": add, "boom": boom, "slow": slow}, timeout=0.2)
    assert _step(env, '<tool_call>{"name": "add", "arguments": {"a": 12, "b": 7}}</tool_call>') == (
        [{"role": "tool", "name": "add", "content": "19"}],
        None,
        False,
    )
    obs, _, done = _step(env, '<tool_call>{"name": "boom", "arguments": {"x": 1}}</tool_call>')
    assert obs[0]["content"] == "error: tool `boom` raised ValueError: no luck" and not done
    t0 = time.perf_counter()
    obs, _, _ = _step(env, '<tool_call>{"name": "slow", "arguments": {"x": 1}}</tool_call>')
    assert (
        obs[0]["content"] == "error: tool `slow` did not answer within 0.2 s"
        and time.perf_counter() - t0 < 0.9
    )
    obs, _, _ = _step(env, '<tool_call>{"name": "mul", "arguments": {}}</tool_call>')
    assert obs[0]["content"].startswith("error: there is no tool `mul`; tools: add, boom, slow")
    obs, _, _ = _step(env, "<tool_call>{oops</tool_call>")
    assert obs[0]["content"].startswith("error: the tool call is not valid JSON")
    assert _step(env, "19") == ([], None, True)  # an answer ends the episode
    assert env.errors == 4


def _scripted(turns: list[list[str]], truncated_at: set[tuple[int, int]] = frozenset()):  # noqa: ANN202
    """A `sample` that answers episode j's turn t with turns[j][t] (the live episodes in order)."""
    state = {"turn": 0}

    def sample(contexts: list[list[int]]) -> SimpleNamespace:
        t = state["turn"]
        state["turn"] += 1
        live = [j for j, script in enumerate(turns) if len(script) > t]
        assert len(live) == len(contexts)
        return SimpleNamespace(
            texts=[turns[j][t] for j in live], truncated=[(j, t) in truncated_at for j in live]
        )

    return sample


CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 12, "b": 7}}\n</tool_call>'


def test_episodes_on_scripted_outputs(tiny_model: str) -> None:
    from alignkit.modeling.load import load_tokenizer

    tok = load_tokenizer(tiny_model)
    rows = [{"prompt": [{"role": "user", "content": "What is 12 + 7?"}]}] * 4
    scripts = [
        [CALL, "19"],  # a call, then the answer
        ['<tool_call>{"name": "add", "arguments": {"a": 1,</tool_call>', "20"],  # a malformed call
        [CALL, CALL, CALL],  # calls until the turn limit
        ["19"],  # answers at once
    ]
    episodes = run_episodes(
        _scripted(scripts),
        tok,
        rows,
        lambda: ToolEnvironment({"add": add}),
        max_turns=3,
        schemas=[tool_schema(add)],
    )
    first, malformed, looping, direct = episodes
    assert [m["role"] for m in first.messages] == ["user", "assistant", "tool", "assistant"]
    assert first.messages[2]["content"] == "19" and first.answer == "19" and first.turns == 2
    assert not first.truncated and first.extra["tool_errors"] == 0
    assert malformed.messages[2]["content"].startswith("error: the tool call is not valid JSON")
    assert malformed.extra["tool_errors"] == 1 and malformed.answer == "20"
    assert looping.turns == 3 and looping.truncated and looping.messages[-1]["role"] == "tool"
    assert direct.turns == 1 and len(direct.messages) == 2 and not direct.truncated


def test_the_mask_covers_the_models_tokens_only(tiny_model: str) -> None:
    """A hand-built transcript: the trained tokens decode to the two assistant turns with their end-of-turn
    tokens; the tool result and the headers around it are in the completion but not trained."""
    from alignkit.modeling.load import load_tokenizer

    tok = load_tokenizer(tiny_model)
    prompt = [{"role": "user", "content": "What is 12 + 7?"}]
    ep = Episode(
        prompt
        + [
            {"role": "assistant", "content": CALL},
            {"role": "tool", "content": "19"},
            {"role": "assistant", "content": "It is 19."},
        ],
        n_prompt=1,
    )
    prompt_ids, completion, mask = episode_tokens(ep, tok, None, max_length=512)
    assert tok.decode(prompt_ids) == "<|im_start|>user\nWhat is 12 + 7?<|im_end|>\n<|im_start|>assistant\n"
    trained = tok.decode([t for t, m in zip(completion, mask) if m])
    untrained = tok.decode([t for t, m in zip(completion, mask) if not m])
    # each turn keeps the newline this template writes after its end token, as conversational SFT trains it
    # (encode_sft's assistant spans)
    assert trained == CALL + "<|im_end|>\n" + "It is 19.<|im_end|>\n"
    assert untrained == "<|im_start|>tool\n19<|im_end|>\n<|im_start|>assistant\n"
    _, cut, cut_mask = episode_tokens(ep, tok, None, max_length=len(prompt_ids) + 5)
    assert len(cut) == len(cut_mask) == 5


def _tool_stage(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model: str, **keys: object):  # noqa: ANN202
    """Stage `name` with the `add` tool, its model's turns scripted: a call on odd sampling passes, then an
    answer on even ones ("19" and "20" alternating); the reward scores the final answer."""
    from alignkit.config import build_config
    from alignkit.generation.rollout import Samples
    from alignkit.stages import get_stage
    from alignkit.stages.online import OnlineStage

    (tmp_path / "quick_tools.py").write_text(
        "def add(a: int, b: int) -> int:\n"
        '    """Add.\n\n    Args:\n        a: first\n        b: second\n    """\n'
        "    return a + b\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "quick_tools", raising=False)
    calls = {"n": 0}

    def scripted(self, model, rows, g, temperature=None):  # noqa: ANN001, ANN202
        calls["n"] += 1
        texts = (
            [CALL] * len(rows)
            if calls["n"] % 2
            else ["19", "20"] * (len(rows) // 2) + ["19"] * (len(rows) % 2)
        )
        ids = [self.tokenizer(t + "<|im_end|>", add_special_tokens=False)["input_ids"] for t in texts]
        return Samples([r["prompt_ids"] for r in rows], ids, [False] * len(rows), texts)

    monkeypatch.setattr(OnlineStage, "_sample_once", scripted)
    data = write_jsonl(
        tmp_path / "p.jsonl",
        [{"prompt": [{"role": "user", "content": "What is 12 + 7?"}], "answer": "19"}] * 2,
    )
    cfg = build_config(
        {
            "stage": name,
            "model_name_or_path": tiny_model,
            "dataset": data,
            "output_dir": str(tmp_path / "out"),
            "reward_funcs": ["exact_match"],
            "tools": ["quick_tools:add"],
            "max_turns": 3,
            "max_new_tokens": 32,
            "torch_dtype": "float32",
            **keys,
        }
    )
    stage = get_stage(name)(cfg)
    stage.build()
    return stage


def _trained_text(stage, batch: dict) -> list[str]:  # noqa: ANN001
    return [
        stage.tokenizer.decode([t for t, m in zip(ids.tolist(), row.tolist()) if m])
        for ids, row in zip(batch["input_ids"], batch["completion_mask"])
    ]


def test_grpo_trains_on_episodes_with_the_observations_masked(
    tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GRPO with `tools`: the batch's completion mask leaves the tool result out, the stored log-probs are one
    per trained token, the right answer gets the positive advantage, and the step logs two turns per episode."""
    stage = _tool_stage(
        "grpo",
        tmp_path,
        monkeypatch,
        tiny_model,
        num_generations=2,
        per_device_train_batch_size=1,
        num_iterations=2,
    )
    buffer = stage.rollout(stage.model, stage.train_rows[:1], torch.device("cpu"))
    assert [s["turns"] for s in buffer] == [2, 2] and [s["advantage"] > 0 for s in buffer] == [True, False]
    batch = stage.collate(buffer)
    for s, trained in zip(buffer, _trained_text(stage, batch)):
        assert "<|im_start|>tool" not in trained and trained.startswith("<tool_call>")
        assert len(s["old_logps"]) == sum(s["completion_mask"])  # one per trained token
    out = stage.step(stage.model, batch)
    assert out.metrics["episode/turns"][0].item() == 4.0 and out.loss_sum.requires_grad


def test_ppo_runs_gae_over_the_models_own_tokens(
    tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PPO with `tools`: log-probs, values, advantages and returns are one per model token (the tool result is an
    observation, not an action); with no KL penalty, gamma = lambda = 1 and no whitening every model token's
    return is the episode's score and its advantage that score minus the token's value."""
    stage = _tool_stage(
        "ppo",
        tmp_path,
        monkeypatch,
        tiny_model,
        per_device_train_batch_size=2,
        init_kl_coef=0.0,
        gamma=1.0,
        lam=1.0,
        whiten_advantages=False,
        ppo_epochs=1,
    )
    buffer = stage.rollout(stage.model, stage.train_rows, torch.device("cpu"))
    assert [s["turns"] for s in buffer] == [2, 2] and [s["score"] for s in buffer] == [1.0, 0.0]
    for s in buffer:
        n = sum(s["completion_mask"])
        assert n < len(s["completion_ids"])  # the observation is in the completion, not among the actions
        assert len(s["old_logps"]) == len(s["values"]) == len(s["advantages"]) == len(s["returns"]) == n
        assert s["returns"] == pytest.approx([s["score"]] * n, abs=1e-6)
        assert s["advantages"] == pytest.approx([s["score"] - v for v in s["values"]], abs=1e-5)
    batch = stage.collate(buffer)
    assert all(
        "<|im_start|>tool" not in t and t.startswith("<tool_call>") for t in _trained_text(stage, batch)
    )
    out = stage.step(stage.model, batch)
    assert out.metrics["episode/turns"][0].item() == 4.0 and out.loss_sum.requires_grad
    assert out.metrics["response_length"][0].item() == sum(len(s["values"]) for s in buffer)


def test_grpo_groups_of_episodes_keep_their_masks_through_dynamic_sampling() -> None:
    """DAPO's refill selects and joins groups: episodes must stay episodes, or their observations get trained."""
    from alignkit.generation.tools import EpisodeSamples
    from alignkit.stages.grpo import Groups

    def piece(k: int) -> Groups:
        samples = EpisodeSamples(
            [[1]] * 2,
            [[k, 9], [k, 8]],
            [False] * 2,
            ["a", "b"],
            None,
            [[1, 0], [1, 1]],
            [None] * 2,
            [2, 1],
            [0, 0],
        )
        return Groups([{"p": k}], samples, torch.tensor([1.0, 0.0]), {})

    joined = Groups.concat([piece(5), piece(6)]).select([1], 2)
    assert isinstance(joined.samples, EpisodeSamples)
    assert joined.samples.completion_ids == [[6, 9], [6, 8]] and joined.samples.completion_masks == [
        [1, 0],
        [1, 1],
    ]
    assert joined.samples.turns == [2, 1]


def test_stages_without_multi_turn_rollouts_refuse_tools(
    tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(UserError, match="supported by stages grpo and ppo for now, not online_dpo"):
        _tool_stage("online_dpo", tmp_path, monkeypatch, tiny_model, per_device_train_batch_size=2)


def test_held_out_length_of_an_episode_is_its_last_answer(
    tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A policy that learns to call a tool writes longer episodes by design: the monitor's `length` is the
    answer the reward scores ("19": two digit tokens), not the call, the tool turn and the answer (seed 3 of the
    quickstart's tool row was flagged for 1.56x longer episodes before this)."""
    stage = _tool_stage(
        "grpo", tmp_path, monkeypatch, tiny_model, num_generations=2, per_device_train_batch_size=1
    )
    stage.eval_rows = stage.train_rows[:1]
    values = stage.held_out(stage.model, torch.device("cpu"))
    assert values["length"] == [2.0] and values["reward"] == [1.0]
