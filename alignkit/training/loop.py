"""The one training loop, shared by every stage.

Built on `accelerate`: the same code runs in one process and under `accelerate launch` / `torchrun`.
Each optimizer step runs the micro-batches the stage makes for it (`Stage.micro_batches`, following the
`Plan`: G = per_device_batch x processes x accumulation rows of the epoch's order per global batch), and the
loss is the sum of per-item losses over all of them divided by their total count. Hence batch
1 x accumulation 8 == batch 8 x accumulation 1, and 2 processes x batch 2 == 1 process x batch 4, and the
data position after a resume is the global step alone.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from typing import Any

import torch

from alignkit.config import BaseConfig, config_to_dict, save_config
from alignkit.errors import UserError
from alignkit.stages.base import MicroBatch, Plan, Stage, StepContext
from alignkit.training.checkpoint import (
    RunProgress,
    full_weights,
    load_checkpoint,
    refuse_to_overwrite,
    resolve_resume,
    save_checkpoint,
    undo_on_failure,
)
from alignkit.training.events import Callback, Reporter, StopSignal
from alignkit.training.hacking import OnlineEvaluation
from alignkit.training.launch import make_accelerator, micro_backward
from alignkit.training.micro_batch import sized_plan
from alignkit.training.optim import build_optimizer
from alignkit.training.tracking import MetricsWriter, add_metrics, plot_loss, reduce_metrics, window_means

log = logging.getLogger("alignkit")


class TrainingDiverged(UserError):
    """Loss became NaN or inf."""


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    except ImportError:  # pragma: no cover - Windows
        return float("nan")


def _plan(cfg: BaseConfig, stage: Stage, accelerator: Any) -> Plan:
    return Plan(
        world=accelerator.num_processes,
        rank=accelerator.process_index,
        bs=cfg.per_device_train_batch_size,
        accum=cfg.gradient_accumulation_steps,
        seed=cfg.seed,
        shuffle=cfg.shuffle,
        num_rows=len(stage.train_rows),
        updates_per_batch=stage.updates_per_batch,
        max_steps=cfg.max_steps,
        num_train_epochs=cfg.num_train_epochs,
    )


def train(
    cfg: BaseConfig,
    stage: Stage,
    callbacks: Sequence[Callback] | None = None,
    stop: StopSignal | None = None,
) -> dict[str, Any]:
    """Run the stage to the end (or until `stop` is set: see `alignkit.training.events`); return the last
    metrics record. `callbacks` receive the run's events in this process.

    A run that fails before its first optimizer step leaves `output_dir` as it was (`undo_on_failure`); one
    that fails later but before a checkpoint moves its files into `failed-<time>/`; either way the same
    command can simply be run again. One that fails after a checkpoint keeps it for a resume.
    """
    accelerator = make_accelerator(cfg)
    if cfg.fp16 and accelerator.device.type == "cpu":
        # accelerate's fp16 (autocast + loss scaler) is a GPU feature: on CPU it would train in float32
        raise UserError(
            "fp16 needs a GPU (on CPU it would train in float32 unannounced); on CPU use `bf16: true`"
        )
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    resume_path = resolve_resume(cfg.output_dir, cfg.resume_from_checkpoint)
    if not resume_path and not cfg.overwrite_output_dir:
        refuse_to_overwrite(cfg.output_dir)
    with undo_on_failure(cfg.output_dir, enabled=accelerator.is_main_process) as progress:
        stage.build()  # every input is checked here, before the loop writes to output_dir
        run = _Run(cfg, stage, accelerator, resume_path, callbacks, stop)
        try:
            record = run.loop(progress)
            if not run.stopped:
                _save_final(accelerator, run.model, stage, cfg)
            progress.finished = True
        except BaseException:
            run.close(failed=True)  # a tracker's run is marked failed and ended (MLflow's would stay active)
            raise
        run.close()
    if accelerator.is_main_process and cfg.plot_loss:
        plot_loss(cfg.output_dir)
    run.report("end", run.done, record=record, stopped=run.stopped)
    return record


class _Run:
    """One run's model, optimizer and running totals; `loop` trains to the end."""

    def __init__(
        self,
        cfg: BaseConfig,
        stage: Stage,
        accelerator: Any,
        resume_path: str | None,
        callbacks: Sequence[Callback] | None = None,
        stop: StopSignal | None = None,
    ) -> None:
        from transformers import get_scheduler

        self.cfg, self.stage, self.accelerator = cfg, stage, accelerator
        self.plan = p = _plan(cfg, stage, accelerator)
        optimizer = build_optimizer(stage.trainable_parameters(), cfg)
        self.model, self.optimizer = accelerator.prepare(stage.model, optimizer)
        # on the prepared optimizer: under ZeRO-3 DeepSpeed's own optimizer holds the parameter groups
        warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * p.total_steps)
        self.scheduler = get_scheduler(
            cfg.lr_scheduler_type, self.optimizer, num_warmup_steps=warmup, num_training_steps=p.total_steps
        )
        if cfg.auto_find_batch_size:
            self.plan = p = sized_plan(p, stage, self.model, self._probe_step, self._fewest)
        self.start_step = 0
        held_out = stage.online and stage.eval_rows and eval_every(cfg, p.steps_per_epoch)
        self.online_eval = OnlineEvaluation(stage, cfg, accelerator.is_main_process) if held_out else None
        self.hacking_stop = False
        if resume_path:
            state = load_checkpoint(
                accelerator, self.model, stage.load_weights, self.optimizer, self.scheduler, resume_path
            )
            self.start_step = state["global_step"]
            stage.load_state_dict(state.get("stage", {}))
            if self.online_eval:
                self.online_eval.load_state_dict(state.get("online_eval", {}))
            log.info("resumed from %s at step %d", resume_path, self.start_step)
        self.writer: MetricsWriter | None = None
        if accelerator.is_main_process:
            os.makedirs(cfg.output_dir, exist_ok=True)
            save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"), stage.resolved)
            resumed_at = self.start_step if resume_path else None
            self.writer = MetricsWriter(
                cfg.output_dir, cfg.report_to, cfg.run_name, config_to_dict(cfg, stage.resolved), resumed_at
            )
        log.info(
            "stage %s: %d rows, %d steps (%d per epoch), global batch %d",
            stage.name,
            len(stage.train_rows),
            p.total_steps,
            p.steps_per_epoch,
            p.global_batch,
        )
        self.ctx = StepContext(p, self.model, accelerator.device, accelerator.autocast)
        self.report = Reporter(callbacks, p.total_steps, accelerator.is_main_process)
        self.stop, self.stopped, self.done = stop, False, self.start_step
        self.resumed_at = self.start_step if resume_path else None
        self.window: list[dict[str, float]] = []
        self.num_tokens = self.tokens_since_start = 0
        self.t0 = time.perf_counter()

    def loop(self, progress: RunProgress) -> dict[str, Any]:
        from tqdm.auto import tqdm

        cfg, p, accelerator = self.cfg, self.plan, self.accelerator
        self.report(
            "start",
            self.start_step,
            stage=self.stage.name,
            rows=len(self.stage.train_rows),
            total_steps=p.total_steps,
            steps_per_epoch=p.steps_per_epoch,
            global_batch=p.global_batch,
            resumed_at=self.resumed_at,
        )
        bar = tqdm(
            total=p.total_steps,
            initial=self.start_step,
            disable=cfg.disable_tqdm or not accelerator.is_main_process,
            desc=f"{self.stage.name}",
            dynamic_ncols=True,
        )
        record: dict[str, Any] = {}
        if self.online_eval and self.online_eval.needs_baseline():  # the starting policy, before any step
            self.write({"step": self.start_step, **self.evaluate_online(self.start_step)})
        self.model.train()
        with contextlib.closing(bar):
            for step in range(self.start_step, p.total_steps):
                metrics = self.accumulate(step, self.stage.micro_batches(step, self.ctx))
                step_lr = self.update(metrics)
                progress.steps += 1
                self.done = step + 1
                elapsed = time.perf_counter() - self.t0
                bar.update(1)
                rate = self.tokens_since_start / max(elapsed, 1e-9)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{step_lr:.2e}", tok_s=f"{rate:.0f}")
                self.report("step", self.done, loss=metrics["loss"], learning_rate=step_lr, elapsed_s=elapsed)
                record = self.log(self.done, metrics, step_lr) or record
                if self.stop_requested(self.done):
                    self.stopped = True
                    path = self.maybe_save(self.done, force=True)
                    self.report("stopped", self.done, checkpoint=path)
                    log.info("stopped at step %d on request; checkpoint in %s", self.done, path)
                    break
                self.maybe_save(self.done)
        return record

    def stop_requested(self, done: int) -> bool:
        """Whether to stop after step `done`: asked for, at a point where a checkpoint can be written (a global
        batch done), before the last step (which ends the run anyway). A stop set in any process stops every
        process, so they stop together."""
        p = self.plan
        if done % p.updates_per_batch or done >= p.total_steps:
            return False
        asked = self.hacking_stop or bool(self.stop and self.stop.is_set())
        flag = torch.tensor(float(asked), device=self.accelerator.device)
        if p.world > 1:  # a stop set in any process (the caller's is the main one) stops them all
            flag = self.accelerator.reduce(flag, reduction="max")
        return bool(flag.item())

    def close(self, failed: bool = False) -> None:
        if self.writer:
            self.writer.close(failed=failed)

    def _fewest(self, rows: int) -> int:
        """The smallest of every process's `rows` (they must split their batches alike)."""
        return int(self.accelerator.gather(torch.tensor([rows], device=self.accelerator.device)).min())

    def _probe_step(self, rows: list[dict]) -> None:
        """Forward and backward on `rows` with no gradient left behind (`auto_find_batch_size`'s probe)."""
        batch = {key: v.to(self.accelerator.device) for key, v in self.stage.collate(rows).items()}
        with self.accelerator.autocast():
            loss = self.stage.step(self.model, batch).loss_sum
        self.accelerator.backward(loss)
        self.model.zero_grad(set_to_none=True)

    def accumulate(self, step: int, micro: list[MicroBatch]) -> dict[str, float]:
        """Forward and backward over the micro-batches; the summed loss is divided by the global item count
        (x world, since DDP averages over processes), so any split over processes and accumulation gives the
        same update. Returns the step's metrics, reduced over processes."""
        accelerator, stage, model, world = self.accelerator, self.stage, self.model, self.plan.world
        items = torch.tensor(
            float(sum(stage.count(m.batch) for m in micro if m.weight)), device=accelerator.device
        )
        total_items = accelerator.reduce(items, reduction="sum").item()
        if total_items == 0:
            raise UserError(
                f"step {step + 1}: the batch has no token to train on; check the data's completions"
            )
        acc: dict[str, list[torch.Tensor]] = {}
        tokens = 0
        for j, m in enumerate(micro):
            batch = {key: v.to(accelerator.device) for key, v in m.batch.items()}
            sync = j == len(micro) - 1
            ctx = accelerator.no_sync(model) if not sync and world > 1 else contextlib.nullcontext()
            with ctx, accelerator.autocast():
                out = stage.step(model, batch) if m.weight else stage.filler_step(model, batch)
                loss = out.loss_sum * (m.weight * world / total_items)
            micro_backward(accelerator, model, loss, last=sync)
            count = torch.tensor(float(stage.count(batch)))
            add_metrics(acc, {"loss": (out.loss_sum.detach().float(), count), **out.metrics}, bool(m.weight))
            tokens += stage.num_tokens(batch) if m.weight else 0
        metrics = stage.finalize_metrics(reduce_metrics(accelerator, acc))
        if not math.isfinite(metrics["loss"]):
            raise TrainingDiverged(
                f"step {step + 1}: the loss is {metrics['loss']}. Likely causes: a learning rate too high "
                f"(now {self.cfg.learning_rate}), fp16 overflow (try bf16 or fp32), or bad rows. The last "
                f"good checkpoint in {self.cfg.output_dir} is kept; lower the learning rate and resume."
            )
        tokens = int(accelerator.reduce(torch.tensor(tokens, device=accelerator.device), "sum").item())
        self.num_tokens += tokens
        self.tokens_since_start += tokens
        return metrics

    def update(self, metrics: dict[str, float]) -> float:
        """Clip, step, schedule; record the gradient norm in `metrics`; return the rate this update used."""
        grad_norm = self.accelerator.clip_grad_norm_(
            self.stage.trainable_parameters(), self.cfg.max_grad_norm or float("inf")
        )
        step_lr = self.scheduler.get_last_lr()[0]  # logged as TRL logs it
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics["grad_norm"] = float(grad_norm)
        self.window.append(metrics)
        return step_lr

    def log(self, done: int, metrics: dict[str, float], step_lr: float) -> dict[str, Any] | None:
        """Every `logging_steps` (and at the end) the window's means; evaluation every `eval_steps`."""
        cfg, p = self.cfg, self.plan
        logged: dict[str, Any] = {}
        if done % cfg.logging_steps == 0 or done == p.total_steps:
            means = window_means(self.window)
            self.window = []
            logged = {
                "loss": means.pop("loss"),
                **means,
                "learning_rate": step_lr,
                "num_tokens": self.num_tokens,
            }
            if done == p.total_steps:
                elapsed = time.perf_counter() - self.t0
                logged.update(
                    train_runtime=round(elapsed, 3),
                    train_tokens_per_second=round(self.tokens_since_start / max(elapsed, 1e-9), 2),
                    peak_memory_mb=round(_peak_memory_mb(self.accelerator.device), 1),
                )
        every = eval_every(cfg, p.steps_per_epoch)
        evaluating = every and self.stage.eval_rows
        if evaluating and (done % every == 0 or done == p.total_steps):
            # every process takes part
            online = self.online_eval is not None
            logged.update(
                self.evaluate_online(done)
                if online
                else evaluate(self.accelerator, self.stage, self.model, cfg)
            )
        if not logged:
            return None
        return self.write({"step": done, "epoch": round(done / p.steps_per_epoch, 4), **logged})

    def evaluate_online(self, done: int) -> dict[str, float]:
        """The held-out evaluation of an online stage (every process runs it whole): its means, the monitor's
        flags (reported; `hacking_action: stop` stops the run at the next rollout boundary), the best model."""
        means, flags, best = self.online_eval(done, self.model, self.accelerator.device)
        for flag in flags:
            self.report("hacking", done, **flag)
        self.hacking_stop = self.hacking_stop or bool(flags and self.cfg.hacking_action == "stop")
        if best:
            _save_final(self.accelerator, self.model, self.stage, self.cfg, folder="best")
        return means

    def write(self, record: dict[str, Any]) -> dict[str, Any]:
        """A metrics record to metrics.jsonl and the trackers, reported to the callbacks (with its eval part)."""
        done = record["step"]
        if self.writer:
            self.writer.write(record)
        self.report("log", done, **record)
        evaluated = {k: v for k, v in record.items() if k.startswith("eval_")}
        if evaluated:
            self.report("eval", done, **evaluated)
        return record

    def maybe_save(self, done: int, force: bool = False) -> str | None:
        """Write checkpoint-`done` every `save_steps` (or when `force`d), only where a global batch is done
        (online stages: a rollout boundary), so a resume starts a fresh one; return its path."""
        cfg, p = self.cfg, self.plan
        boundary = done % p.updates_per_batch == 0
        due = force or bool(cfg.save_steps and done % cfg.save_steps == 0)
        if due and boundary and done < p.total_steps:
            path = save_checkpoint(
                self.accelerator,
                self.model,
                self.stage.save,
                self.optimizer,
                self.scheduler,
                cfg.output_dir,
                done,
                {
                    "epoch": done / p.steps_per_epoch,
                    "stage": self.stage.state_dict(),
                    "online_eval": self.online_eval.state_dict() if self.online_eval else {},
                },
                cfg.save_total_limit,
            )
            self.report("checkpoint", done, path=path)
            return path
        return None


def eval_every(cfg: BaseConfig, steps_per_epoch: int) -> int | None:
    """Steps between evaluations: `eval_strategy` as in Hugging Face's Trainer (`steps` falls back to
    logging_steps when eval_steps is unset); without one, every `eval_steps` when that is set."""
    if cfg.eval_strategy == "no":
        return None
    if cfg.eval_strategy == "epoch":
        return steps_per_epoch
    if cfg.eval_strategy == "steps":
        return cfg.eval_steps or cfg.logging_steps
    return cfg.eval_steps


def evaluate(accelerator: Any, stage: Stage, model: torch.nn.Module, cfg: BaseConfig) -> dict[str, float]:
    """Average the stage's loss and metrics over the eval rows (sharded over processes).

    Every process runs as many micro-batches as the largest shard needs, the missing ones as fillers, since a
    stage may reduce over processes inside `step` (KTO's z0) and the metrics are reduced by every process.
    """
    rows = stage.eval_rows or []
    world, rank, bs = accelerator.num_processes, accelerator.process_index, cfg.per_device_eval_batch_size
    mine = list(range(rank, len(rows), world))
    acc: dict[str, list[torch.Tensor]] = {}
    model.eval()
    with torch.no_grad():
        for i in range(0, math.ceil(len(rows) / world), bs):
            idx = mine[i : i + bs]
            batch = stage.collate([rows[j] for j in idx or [0]])
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with accelerator.autocast():
                out = stage.step(model, batch) if idx else stage.filler_step(model, batch)
            count = torch.tensor(float(stage.count(batch)))
            add_metrics(acc, {"loss": (out.loss_sum.float(), count), **out.metrics}, bool(idx))
    model.train()
    return {
        f"eval_{k}": v for k, v in stage.finalize_metrics(reduce_metrics(accelerator, acc)).items() if v == v
    }


def _save_final(
    accelerator: Any, model: torch.nn.Module, stage: Stage, cfg: BaseConfig, folder: str = ""
) -> None:
    """Write the final model (or a copy in `output_dir/<folder>`, e.g. `best`) next to a temporary copy first,
    so a crash mid-save loses nothing."""
    accelerator.wait_for_everyone()
    with full_weights(accelerator, model) as unwrapped:  # a sharded model is gathered by every process
        if not accelerator.is_main_process:
            return
        target = os.path.join(cfg.output_dir, folder)
        os.makedirs(target, exist_ok=True)
        tmp = os.path.join(cfg.output_dir, ".tmp-final")
        shutil.rmtree(tmp, ignore_errors=True)
        stage.save(unwrapped, tmp, merged=cfg.save_merged)
        for name in os.listdir(tmp):
            dest = os.path.join(target, name)
            if os.path.isdir(dest):
                shutil.rmtree(dest)
            os.replace(os.path.join(tmp, name), dest)
        os.rmdir(tmp)
