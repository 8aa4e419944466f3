"""alignkit as a library: one function per job, each taking the config the CLI builds and returning a typed
result. The command line (`alignkit.cli`) and the console are thin faces on these functions.

A config is given as a config object, a YAML path or a mapping, and keyword arguments override its keys (as
`key=value` does on the command line). Mistakes raise `alignkit.UserError` with the message the CLI prints;
nothing here calls `sys.exit` or prints.

    import alignkit

    run = alignkit.train("configs/sft_tiny.yaml", max_steps=20, output_dir="out/sft")
    report = alignkit.evaluate(model=run.output_dir, dataset="data/test.jsonl", max_samples=50)
    alignkit.export(adapter="out/dpo-lora", output="out/dpo-merged")
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from alignkit.comparison import run_compare
from alignkit.comparison.config import compare_config
from alignkit.config import BaseConfig, build_config, config_to_dict, read_yaml
from alignkit.config.coerce import flatten
from alignkit.data.files import rows_file
from alignkit.data.report import inspect_data
from alignkit.errors import UserError, did_you_mean
from alignkit.evaluation.config import build_eval_config
from alignkit.evaluation.run import run_eval
from alignkit.evaluation.sxs import sxs_page, votes_to_data
from alignkit.generation.best_of_n import SampleSettings, sample_best_of_n
from alignkit.generation.rewards import BUILTIN_REWARDS, RewardFn, reward_name
from alignkit.modeling.tiny import build_tiny
from alignkit.ship.chat import answer_once, chat_settings
from alignkit.ship.export.gguf_out import export_gguf
from alignkit.ship.export.merge import export_model
from alignkit.ship.export.settings import export_settings
from alignkit.ship.merging import merge_models
from alignkit.ship.serve.feedback import export_kto
from alignkit.stages import get_stage
from alignkit.training.checkpoint import list_checkpoints
from alignkit.training.events import Callback, StopSignal, TrainEvent
from alignkit.training.loop import train as run_loop
from alignkit.training.rounds import train_rounds

log = logging.getLogger("alignkit")


@dataclass(frozen=True)
class Source:
    """Keys with the name of where they came from (a file and its overrides, the command line), which error
    messages name; the command line hands its keys to the library this way."""

    keys: Mapping[str, Any]
    name: str


ConfigLike = BaseConfig | str | os.PathLike | Mapping[str, Any] | Source | None


def config_keys(
    config: Any, overrides: Mapping[str, Any], what: str = "config"
) -> tuple[dict[str, Any], str]:
    """(flat keys, where they came from) of a config object, a YAML path or a mapping, with `overrides` on
    top: the keys `build_config` (or eval's and compare's builders) take."""
    if config is None:
        raw: dict[str, Any] = {}
        source = "arguments"
    elif isinstance(config, Source):
        raw, source = flatten(dict(config.keys)), config.name
    elif dataclasses.is_dataclass(config) and not isinstance(config, type):
        raw, source = dataclasses.asdict(config), f"{type(config).__name__} object"
    elif isinstance(config, (str, os.PathLike)):
        raw, source = read_yaml(os.fspath(config)), os.fspath(config)
    elif isinstance(config, Mapping):
        raw, source = flatten(dict(config)), "mapping"
    else:
        raise UserError(
            f"{what}: give a config object, a YAML path or a mapping (got {type(config).__name__})"
        )
    raw.update(flatten(dict(overrides)))
    return raw, source


# ------------------------------------------------------------------------------------------------- train
@dataclass
class TrainResult:
    """What `train` did: where the model (or the stop's checkpoint) is, and the last logged metrics."""

    output_dir: str
    stage: str
    metrics: dict[str, Any]  # the last record written to metrics.jsonl (train_runtime etc. when finished)
    steps: int  # optimizer steps done, counting a resumed run's earlier ones
    total_steps: int
    stopped: bool = False  # stopped on request: resume with resume_from_checkpoint="auto"
    checkpoint: str | None = None  # the newest checkpoint-N folder, if any
    config: dict[str, Any] = field(default_factory=dict)  # the resolved config (config.yaml)

    @property
    def model_dir(self) -> str | None:
        """The trained model's folder (Hugging Face format), or None when the run stopped before the end."""
        return None if self.stopped else self.output_dir


def _dataset_key(value: Any, key: str) -> Any:
    """A path (or list of paths / names) as given; rows in memory as a JSONL file in the user cache."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, list) and all(isinstance(v, (str, os.PathLike)) for v in value):
        return [os.fspath(v) for v in value]
    if value is None or isinstance(value, str):
        return value
    return rows_file(value, key)


def _reward_keys(reward_funcs: Sequence[str | RewardFn]) -> tuple[list[str], dict[str, RewardFn]]:
    """The names the config records and the functions handed over as Python callables, by those names."""
    names: list[str] = []
    given: dict[str, RewardFn] = {}
    for fn in [reward_funcs] if isinstance(reward_funcs, str) else reward_funcs:
        if isinstance(fn, str):
            names.append(fn)
        elif callable(fn):
            name = reward_name(fn)
            if name in given or name in BUILTIN_REWARDS:
                what = "a built-in reward's" if name in BUILTIN_REWARDS else "another reward function's"
                raise UserError(
                    f"reward_funcs: `{name}` has {what} name; give each function its own name (a `def` at "
                    "module level is recorded as module:function in the run's config)"
                )
            names.append(name)
            given[name] = fn
        else:
            raise UserError(f"reward_funcs: {fn!r} is neither a name nor a function")
    return names, given


def train(
    config: ConfigLike = None,
    /,
    *,
    dataset: Any = None,
    eval_dataset: Any = None,
    reward_funcs: Sequence[str | RewardFn] | None = None,
    callbacks: Sequence[Callback] | None = None,
    stop: StopSignal | None = None,
    **keys: Any,
) -> TrainResult:
    """Train the stage the config names (`stage: sft`, `dpo`, `kto`, `grpo`, ...), as `alignkit train` does.

    `dataset` / `eval_dataset`: a path, a list of paths or names, a `datasets.Dataset` or a list of dicts in
    any format alignkit reads. `reward_funcs` (grpo, ppo): built-in names, `module:function`, or Python
    callables `(prompts, completions, **columns) -> list[float]`. `callbacks` receive `TrainEvent`s (start,
    step, log, eval, checkpoint, stopped, end); `stop` (a `threading.Event`) stops the run cleanly from
    another thread, keeping a checkpoint. Keyword arguments are config keys and win over `config`.
    """
    overrides = dict(keys)
    for key, value in (("dataset", dataset), ("eval_dataset", eval_dataset)):
        if value is not None:
            overrides[key] = _dataset_key(value, key)
    given: dict[str, RewardFn] = {}
    if reward_funcs is not None:
        overrides["reward_funcs"], given = _reward_keys(reward_funcs)
    raw, source = config_keys(config, overrides)
    cfg = build_config(raw, source)
    if getattr(cfg, "rounds", 0):  # iterative DPO: rounds of offline DPO on sampled pairs
        return _train_rounds(cfg, callbacks, stop)
    # `reward_funcs` is a key of the online stages only (checked with the config)
    runner = get_stage(cfg.stage)
    stage = runner(cfg, reward_funcs=given) if runner.online else runner(cfg)
    seen: dict[str, TrainEvent] = {}
    record = run_loop(cfg, stage, [_relay(seen, callbacks)], stop)
    checkpoints = list_checkpoints(cfg.output_dir)
    result = TrainResult(
        output_dir=cfg.output_dir,
        stage=cfg.stage,
        metrics=record,
        steps=seen["end"].step if "end" in seen else 0,
        total_steps=seen["start"].total_steps if "start" in seen else 0,
        stopped="stopped" in seen,
        checkpoint=checkpoints[-1] if checkpoints else None,
        config=config_to_dict(cfg, stage.resolved),
    )
    if "end" in seen and seen["end"].main:  # the loop's last event, with the result the caller gets
        end = seen["end"]
        for callback in callbacks or []:
            callback(TrainEvent("end", end.step, end.total_steps, {**end.data, "result": result}))
    return result


def _train_rounds(
    cfg: BaseConfig, callbacks: Sequence[Callback] | None, stop: StopSignal | None
) -> TrainResult:
    """`rounds: N`: each round's DPO through the loop (alignkit.training.rounds); the result is the last round's."""
    seen: dict[str, TrainEvent] = {}

    def one(round_cfg: BaseConfig) -> tuple[dict, bool]:
        seen.clear()
        record = run_loop(round_cfg, get_stage("dpo")(round_cfg), [_relay(seen, callbacks)], stop)
        return record, "stopped" not in seen

    out = train_rounds(cfg, one)
    return TrainResult(
        output_dir=out["model"],
        stage=cfg.stage,
        metrics={k: v for k, v in out.items() if k != "model"},
        steps=seen["end"].step if "end" in seen else 0,
        total_steps=seen["start"].total_steps if "start" in seen else 0,
        stopped="stopped_in_round" in out,
        checkpoint=None,
        config=config_to_dict(cfg),
    )


def _relay(seen: dict[str, TrainEvent], callbacks: Sequence[Callback] | None) -> Callback:
    """Remember the last event of each kind (every process: each builds its own result) and hand the main
    process's on, all but `end` (`train` sends `end` itself, with the result)."""

    def relay(event: TrainEvent) -> None:
        seen[event.kind] = event
        if event.kind != "end" and event.main:
            for callback in callbacks or []:
                callback(event)

    return relay


# ---------------------------------------------------------------------------------------------- evaluate
@dataclass
class EvalResult:
    """An eval's numbers: each metric's row ({value, n, ci95, ...}), the baseline's, what did not run and why."""

    output_dir: str
    metrics: dict[str, dict[str, Any]]
    baseline_metrics: dict[str, dict[str, Any]] | None
    skipped: dict[str, str]
    n_prompts: int
    table: str  # the report's table, as the CLI prints it
    report: dict[str, Any]  # eval.json's content


def evaluate(config: Any = None, /, **keys: Any) -> EvalResult:
    """`alignkit eval`: sample the model's (and the baseline's) answers and score them; eval.json, eval.md and
    samples.jsonl go to `output_dir`. `config`: an EvalConfig, a YAML path or a mapping of eval keys."""
    if "dataset" in keys:
        keys["dataset"] = _dataset_key(keys["dataset"], "dataset")
    raw, source = config_keys(config, keys, "evaluate")
    cfg = build_eval_config(raw, source)
    report = run_eval(cfg)
    return EvalResult(
        output_dir=cfg.output_dir,
        metrics=report["metrics"],
        baseline_metrics=report.get("baseline_metrics"),
        skipped=report.get("skipped", {}),
        n_prompts=report.get("n_prompts", 0),
        table=report.pop("table", ""),
        report=report,
    )


# ----------------------------------------------------------------------------------------------- compare
@dataclass
class CompareResult:
    output_dir: str
    report: dict[str, Any]  # report.json's content
    table: str
    reward_hacking: dict[str, list[str]]  # method -> the reasons it is flagged
    plots: list[str]


def compare(config: Any, /, **keys: Any) -> CompareResult:
    """`alignkit compare`: train every method of the config on the same data and budget, evaluate each the
    same way, report. Keyword arguments override the shared keys (`eval={...}` and `methods={...}` too)."""

    cfg = compare_config(config, keys)
    report = run_compare(cfg)
    return CompareResult(
        output_dir=cfg.output_dir,
        report=report,
        table=report.get("table", ""),
        reward_hacking=report["reward_hacking"]["flagged"],
        plots=list(report.get("plots", [])),
    )


# ------------------------------------------------------------------------------------------------ export
def export(config: str | os.PathLike | None = None, /, **settings: Any) -> Any:
    """`alignkit export`: merge a LoRA adapter into its base, write and check a Hugging Face folder (and a
    quantized copy), or with `format="gguf"` one GGUF file and an Ollama Modelfile. `config`: LLaMA-Factory's
    merge YAML; settings: model, adapter, output, dtype, quantize, shard_size_gb, device, format. Returns
    `ExportResult` (folder, weight files, the largest logit difference, ...), or `GGUFExport` for a GGUF."""

    chosen = export_settings(os.fspath(config) if config else None, **settings)
    return export_gguf(chosen) if chosen.format == "gguf" else export_model(chosen)


def merge(
    config: str | os.PathLike | Mapping[str, Any], /, *, output: str | None = None, seed: int = 0
) -> Any:
    """`alignkit merge`: several fine-tunes of one base (model folders, LoRA adapters, GGUF files) merged by
    mergekit (`merge_method`: linear, slerp, ties, dare_ties, dare_linear, task_arithmetic, ...) into `output`.
    `config`: mergekit's YAML (a path) or the same as a mapping. Returns `MergeResult`."""

    given = dict(config) if isinstance(config, Mapping) else os.fspath(config)
    return merge_models(given, output, seed)


# ------------------------------------------------------------------------------------------ chat and data
@dataclass
class ChatReply:
    text: str
    messages: list[dict[str, str]]  # the conversation, the reply last
    truncated: bool  # stopped at max_new_tokens


def chat(
    messages: str | Sequence[Mapping[str, str]],
    /,
    *,
    model: str | None = None,
    config: str | None = None,
    **settings: Any,
) -> ChatReply:
    """One turn of `alignkit chat`: the model's answer to `messages` (a user message, or the conversation so
    far as role/content dicts). `config`: LLaMA-Factory's inference YAML; settings: adapter, system,
    max_new_tokens, temperature (0: greedy), top_p."""

    chat_cfg = chat_settings(config, model=model, **settings)
    turns = (
        [{"role": "user", "content": messages}] if isinstance(messages, str) else [dict(m) for m in messages]
    )
    for i, turn in enumerate(turns):
        if not isinstance(turn.get("role"), str) or not isinstance(turn.get("content"), str):
            raise UserError(f"chat: message {i} needs a `role` and a `content`, both text (got {turn})")
    text, truncated = answer_once(chat_cfg, turns, config)
    return ChatReply(text, [*turns, {"role": "assistant", "content": text}], truncated)


def inspect(
    source: Any,
    /,
    *,
    model: str | None = None,
    max_length: int = 1024,
    split: str = "train",
    dataset_format: str = "auto",
    dataset_dir: str | None = None,
) -> dict[str, Any]:
    """`alignkit data inspect`: the format, lengths (in the model's tokens when `model` is given), rows
    `max_length` would truncate, duplicate prompts, the chosen-longer-than-rejected share, KTO's label balance
    and recommended weights. `source`: a path, a hub id, a `datasets.Dataset`, a list of dicts, or a name of
    LLaMA-Factory's `<dataset_dir>/dataset_info.json`."""

    source = _dataset_key(source, "source")
    if isinstance(source, list):  # the form a config's `dataset` takes: one data set at a time is reported
        if len(source) != 1:
            raise UserError(f"inspect: one data set at a time (got {len(source)}: {', '.join(source)})")
        source = source[0]
    return inspect_data(source, model, max_length, split, dataset_format, dataset_dir)


def from_feedback(db: str, output: str, /, *, model: str | None = None) -> dict[str, int]:
    """`alignkit data from-feedback`: the thumbs-up/down votes `serve --log-db` stored, as KTO rows in
    `output`; returns the counts (rows, up, down, no_feedback, empty)."""

    return export_kto(db, output, model)


def sample(model: str, dataset: str, output: str, /, **settings: Any) -> dict[str, Any]:
    """`alignkit data sample`: best-of-n / rejection sampling. `n` completions per prompt of `dataset` from
    `model`, scored by `reward_funcs` / `reward_model` / `judge_reward`, kept by `keep` (best | above | pairs) and `threshold`,
    written to `output` as SFT rows or DPO pairs; returns the report (rows written, prompts without an
    acceptable sample, mean score of all samples and of the kept ones). Settings: the fields of
    `alignkit.generation.best_of_n.SampleSettings`."""
    known = {f.name for f in dataclasses.fields(SampleSettings)} - {"model", "dataset", "output"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise UserError(f"sample: unknown setting `{unknown[0]}`{did_you_mean(unknown[0], known)}")
    return sample_best_of_n(SampleSettings(model, dataset, output, **settings))


def from_votes(votes: str, /, *, key: str | None = None, output_dir: str = ".") -> dict[str, str]:
    """`alignkit data from-votes`: a side-by-side review's votes as DPO pairs and KTO rows in `output_dir`;
    returns their paths and a summary ({"dpo", "kto", "summary"})."""

    return votes_to_data(votes, key, output_dir)


def sxs(
    model: str,
    baseline: str,
    dataset: Any,
    /,
    *,
    max_samples: int = 100,
    max_new_tokens: int = 256,
    output_dir: str = "sxs",
    seed: int | None = None,
) -> dict[str, Any]:
    """`alignkit sxs`: both models answer the prompts; a blind review page (sxs.html) and its key are written.
    Returns {"page", "key", "items"}; the page's votes come back through `from_votes` or `sxs tally`."""

    rows = _dataset_key(dataset, "dataset")
    return sxs_page(model, baseline, rows, max_samples, max_new_tokens, output_dir, seed)


def tiny(
    output_dir: str, /, *, vocab_size: int = 512, hidden_size: int = 64, layers: int = 2, seed: int = 0
) -> str:
    """`alignkit tiny`: a tiny random Llama-architecture model with a real tokenizer, for trying things
    offline; returns its folder."""

    return build_tiny(output_dir, vocab_size, hidden_size, layers, seed)


def serve(model: str, /, *, adapters: Mapping[str, str] | None = None, **settings: Any) -> Any:
    """`alignkit serve` on a background thread of this process: the OpenAI-compatible API for `model` (and LoRA
    `adapters` on it, by model id). Returns a handle with `url` (an OpenAI client's base_url), `ids` and
    `stop()`; it is also a context manager. Settings are the command's flags: host, port (0: any free port),
    served_model_name, api_key, max_batch_size, max_queue, max_input_tokens, max_n, max_request_bytes, log_db
    (thumbs-up/down feedback store), dtype, device, backend."""
    from alignkit.ship.serve.command import ServeSettings, start_server

    names = [f.name for f in dataclasses.fields(ServeSettings) if f.name not in ("model", "adapter")]
    for key in settings:
        if key in ("model", "adapter"):
            raise UserError(
                f"serve: `{key}` is set by the arguments: serve(model, adapters={{name: folder}})"
            )
        if key not in names:
            raise UserError(f"serve: unknown setting `{key}`{did_you_mean(key, names)}")
    pairs = [f"{name}={path}" for name, path in (adapters or {}).items()]
    return start_server(ServeSettings(model, adapter=pairs, **settings))
