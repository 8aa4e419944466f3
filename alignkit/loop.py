"""The one training loop, shared by every stage.

Built on `accelerate`: the same code runs in one process and under `accelerate launch` / `torchrun`.
Batching is done here, not by a sampler, so that the update is a function of the *global* batch alone:
each optimizer step takes G = per_device_batch x processes x accumulation rows of the epoch's order,
and the loss is the sum of per-item losses over all of them divided by their total count. Hence batch
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
from collections.abc import Mapping
from typing import Any

import torch

from alignkit.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from alignkit.config import BaseConfig, config_to_dict, save_config
from alignkit.errors import UserError
from alignkit.stages.base import Metrics, Stage
from alignkit.tracking import MetricsWriter, plot_loss

log = logging.getLogger("alignkit")


class TrainingDiverged(UserError):
    """Loss became NaN or inf."""


def epoch_order(n: int, epoch: int, seed: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(n))
    gen = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(n, generator=gen).tolist()


def micro_batches(
    order: list[int], step_in_epoch: int, bs: int, world: int, accum: int, rank: int
) -> list[list[int]]:
    """Row indices of this process's micro-batches for one optimizer step.

    The global batch is order[k*G:(k+1)*G]; micro-batch j of process p is its slice j*world + p. A short
    last global batch is filled from the start of the order when several processes must stay in step.
    """
    size = bs * world * accum
    rows = order[step_in_epoch * size : (step_in_epoch + 1) * size]
    if world > 1 and len(rows) < size:
        rows = rows + order[: size - len(rows)]
    out = []
    for j in range(accum):
        chunk = rows[(j * world + rank) * bs : (j * world + rank + 1) * bs]
        if chunk:
            out.append(chunk)
    return out


def single_process_launch_hint(env: Mapping[str, str]) -> str | None:
    """What to run instead when `accelerate launch --cpu --num_processes N` started one process; else None.

    Without `--mpirun_hostfile`, accelerate's CPU launcher runs the script once, with ACCELERATE_USE_CPU=True
    and MASTER_ADDR / MASTER_PORT (set only when N > 1) but no world size: neither torchrun's WORLD_SIZE nor
    mpirun's PMI_SIZE / OMPI_COMM_WORLD_SIZE / MV2_COMM_WORLD_SIZE.
    """
    sizes = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
    if env.get("ACCELERATE_USE_CPU", "").lower() != "true" or "MASTER_PORT" not in env:
        return None
    if any(key in env for key in sizes):
        return None
    return (
        "`accelerate launch --cpu --num_processes N` started a single process (its CPU launcher starts N "
        "only through mpirun, with --mpirun_hostfile); for N processes run "
        "`torchrun --nproc_per_node N -m alignkit train CONFIG` or "
        "`accelerate launch --multi_gpu --num_processes N -m alignkit train CONFIG` (both work without a GPU)"
    )


def _accelerator(cfg: BaseConfig) -> Any:
    from accelerate import Accelerator

    hint = single_process_launch_hint(os.environ)
    if hint:
        log.warning(hint)

    precision = "bf16" if cfg.bf16 else "fp16" if cfg.fp16 else "no"
    from accelerate.state import AcceleratorState

    # Several runs in one Python process (the quickstart, notebooks, tests) may differ in precision; the
    # process group (PartialState) is kept.
    AcceleratorState._reset_state()
    # Without a GPU, processes started by torchrun / `accelerate launch --multi_gpu` join a gloo group
    # only when accelerate is told it runs on CPU.
    return Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())


def _optimizer(stage: Stage, cfg: BaseConfig) -> torch.optim.Optimizer:
    params = stage.trainable_parameters()
    if not params:
        raise UserError("no trainable parameters (check `finetuning_type` and `freeze_trainable_layers`)")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon
    )


def _add(acc: dict[str, list[torch.Tensor]], metrics: Metrics) -> None:
    for name, (total, count) in metrics.items():
        t = torch.as_tensor(total, dtype=torch.float64).detach().cpu()
        c = torch.as_tensor(count, dtype=torch.float64).detach().cpu()
        if name in acc:
            acc[name][0] += t
            acc[name][1] += c
        else:
            acc[name] = [t, c]


def _reduce(accelerator: Any, acc: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """Sum (metric sum, count) pairs over processes; return the means."""
    if not acc:
        return {}
    names = sorted(acc)
    flat = torch.stack([torch.stack(acc[n]) for n in names]).to(accelerator.device)  # (M, 2)
    flat = accelerator.reduce(flat, reduction="sum").cpu()
    return {
        n: (flat[i, 0] / flat[i, 1]).item() if flat[i, 1] > 0 else float("nan") for i, n in enumerate(names)
    }


def _window_means(window: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over the steps of a logging window where it was defined (a batch without
    undesirable rows has no `rewards/rejected`; such a step is left out of that mean, as TRL does)."""
    keys = dict.fromkeys(k for w in window for k in w)
    out = {}
    for key in keys:
        values = [w[key] for w in window if key in w and w[key] == w[key]]
        if values:
            out[key] = sum(values) / len(values)
    return out


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    except ImportError:  # pragma: no cover - Windows
        return float("nan")


def train(cfg: BaseConfig, stage: Stage) -> dict[str, Any]:
    """Run the stage to the end; return the final metrics record."""
    accelerator = _accelerator(cfg)
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    resume_path = resolve_resume(cfg.output_dir, cfg.resume_from_checkpoint)
    if not resume_path and not cfg.overwrite_output_dir:
        _refuse_to_overwrite(cfg.output_dir)
    stage.build()  # every input is checked here, before anything is written to output_dir
    n_rows = len(stage.train_rows)
    world, rank, bs, accum = (
        accelerator.num_processes,
        accelerator.process_index,
        cfg.per_device_train_batch_size,
        cfg.gradient_accumulation_steps,
    )
    # online stages: each global batch of prompts is one rollout, followed by `upr` optimizer steps on it
    online = getattr(stage, "online", False)
    upr = stage.updates_per_rollout if online else 1
    batches_per_epoch = max(1, math.ceil(n_rows / (bs * world * accum)))
    steps_per_epoch = batches_per_epoch * upr
    total_steps = (
        cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.num_train_epochs * steps_per_epoch))
    )

    from transformers import get_scheduler

    model = stage.model
    optimizer = _optimizer(stage, cfg)
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)
    scheduler = get_scheduler(
        cfg.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps
    )
    model, optimizer = accelerator.prepare(model, optimizer)

    start_step = 0
    if resume_path:
        state = load_checkpoint(accelerator, model, stage.load_weights, optimizer, scheduler, resume_path)
        start_step = state["global_step"]
        stage.load_state_dict(state.get("stage", {}))
        log.info("resumed from %s at step %d", resume_path, start_step)
    if accelerator.is_main_process:
        os.makedirs(cfg.output_dir, exist_ok=True)
        save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
    writer = (
        MetricsWriter(
            cfg.output_dir,
            cfg.report_to,
            cfg.run_name,
            config_to_dict(cfg),
            start_step if resume_path else None,
        )
        if accelerator.is_main_process
        else None
    )
    log.info(
        "stage %s: %d rows, %d steps (%d per epoch), global batch %d",
        stage.name,
        n_rows,
        total_steps,
        steps_per_epoch,
        bs * world * accum,
    )

    from tqdm.auto import tqdm

    bar = tqdm(
        total=total_steps,
        initial=start_step,
        disable=cfg.disable_tqdm or not accelerator.is_main_process,
        desc=f"{stage.name}",
        dynamic_ncols=True,
    )
    window: list[dict[str, float]] = []
    num_tokens = 0
    t0 = time.perf_counter()
    tokens_since_start = 0
    record: dict[str, Any] = {}
    model.train()
    buffer: list[dict] | None = None
    for step in range(start_step, total_steps):
        rollout_index, update = divmod(step, upr)
        epoch, k = divmod(rollout_index, batches_per_epoch)
        order = epoch_order(n_rows, epoch, cfg.seed, cfg.shuffle)
        if online:
            if update == 0 or buffer is None:  # the rollout phase: sample, score, keep the buffer
                idx = [i for chunk in micro_batches(order, k, bs, world, accum, rank) for i in chunk]
                # under the steps' autocast: the log-probs a rollout stores are then the function the update
                # computes (PPO's first ratio is 1), and the prepared model's float32 outputs meet a bf16 head
                with accelerator.autocast():
                    buffer = stage.rollout(model, [stage.train_rows[i] for i in idx], accelerator.device)
            chunks = stage.update_batches(buffer, update)
            # an empty micro-batch (a small buffer on this process) runs a sample at weight 0, so that every
            # process makes the same number of backward passes
            weights = [1.0 if chunk else 0.0 for chunk in chunks]
            batches = [stage.collate(chunk or buffer[:1]) for chunk in chunks]
        else:
            batches = [
                stage.collate([stage.train_rows[i] for i in idx])
                for idx in micro_batches(order, k, bs, world, accum, rank)
            ]
            weights = [1.0] * len(batches)
        items = torch.tensor(
            float(sum(stage.count(b) for b, w in zip(batches, weights) if w)), device=accelerator.device
        )
        total_items = accelerator.reduce(items, reduction="sum").item()
        if total_items == 0:
            raise UserError(
                f"step {step + 1}: the batch has no token to train on; check the data's completions"
            )
        acc: dict[str, list[torch.Tensor]] = {}
        step_tokens = 0
        for j, batch in enumerate(batches):
            batch = {key: v.to(accelerator.device) for key, v in batch.items()}
            sync = j == len(batches) - 1
            ctx = accelerator.no_sync(model) if not sync and world > 1 else contextlib.nullcontext()
            with ctx, accelerator.autocast():
                out = stage.step(model, batch)
                loss = out.loss_sum * (weights[j] * world / total_items)  # DDP averages over processes
            accelerator.backward(loss)
            if not weights[j]:
                continue
            _add(
                acc,
                {
                    "loss": (out.loss_sum.detach().float(), torch.tensor(float(stage.count(batch)))),
                    **out.metrics,
                },
            )
            step_tokens += stage.num_tokens(batch)
        metrics = stage.finalize_metrics(_reduce(accelerator, acc))
        if not math.isfinite(metrics["loss"]):
            raise TrainingDiverged(
                f"step {step + 1}: the loss is {metrics['loss']}. Likely causes: a learning rate too high "
                f"(now {cfg.learning_rate}), fp16 overflow (try bf16 or fp32), or bad rows. The last good checkpoint "
                f"in {cfg.output_dir} is kept; lower the learning rate and resume."
            )
        grad_norm = accelerator.clip_grad_norm_(
            stage.trainable_parameters(), cfg.max_grad_norm or float("inf")
        )
        step_lr = scheduler.get_last_lr()[0]  # the rate this update used (logged as TRL logs it)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_tokens = int(
            accelerator.reduce(torch.tensor(step_tokens, device=accelerator.device), "sum").item()
        )
        num_tokens += step_tokens
        tokens_since_start += step_tokens
        metrics["grad_norm"] = float(grad_norm)
        window.append(metrics)
        elapsed = time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix(
            loss=f"{metrics['loss']:.4f}",
            lr=f"{step_lr:.2e}",
            tok_s=f"{tokens_since_start / max(elapsed, 1e-9):.0f}",
        )
        done = step + 1
        logged: dict[str, Any] = {}
        if done % cfg.logging_steps == 0 or done == total_steps:
            means = _window_means(window)
            logged = {
                "loss": means.pop("loss"),
                **means,
                "learning_rate": step_lr,
                "num_tokens": num_tokens,
            }
            window = []
            if done == total_steps:
                logged.update(
                    train_runtime=round(elapsed, 3),
                    train_tokens_per_second=round(tokens_since_start / max(elapsed, 1e-9), 2),
                    peak_memory_mb=round(_peak_memory_mb(accelerator.device), 1),
                )
        evaluating = (
            cfg.eval_steps and stage.eval_rows and not online
        )  # online stages: evaluate with rollouts
        if evaluating and (done % cfg.eval_steps == 0 or done == total_steps):
            logged.update(evaluate(accelerator, stage, model, cfg))  # every process takes part
        if logged:
            record = {"step": done, "epoch": round(done / steps_per_epoch, 4), **logged}
            if writer:
                writer.write(record)
        # online stages save at rollout boundaries only, so a resume starts with a fresh rollout
        if cfg.save_steps and done % cfg.save_steps == 0 and done % upr == 0 and done < total_steps:
            save_checkpoint(
                accelerator,
                model,
                stage.save,
                optimizer,
                scheduler,
                cfg.output_dir,
                done,
                {"epoch": done / steps_per_epoch, "stage": stage.state_dict()},
                cfg.save_total_limit,
            )
    bar.close()
    _save_final(accelerator, model, stage, cfg)
    if writer:
        writer.close()
        if cfg.plot_loss:
            plot_loss(cfg.output_dir)
    return record


def _refuse_to_overwrite(output_dir: str) -> None:
    """A new run never silently replaces the files of an earlier one."""
    if not os.path.isdir(output_dir):
        return
    marks = ("metrics.jsonl", "config.yaml", "model.safetensors", "adapter_model.safetensors")
    found = [n for n in os.listdir(output_dir) if n in marks or n.startswith("checkpoint-")]
    if found:
        raise UserError(
            f"output_dir {output_dir} already holds a run ({', '.join(sorted(found)[:3])}); set "
            "`overwrite_output_dir: true` to replace it, `resume_from_checkpoint: auto` to continue it, "
            "or choose another output_dir"
        )


def evaluate(accelerator: Any, stage: Stage, model: torch.nn.Module, cfg: BaseConfig) -> dict[str, float]:
    """Average the stage's loss and metrics over the eval rows (sharded over processes)."""
    rows = stage.eval_rows or []
    world, rank, bs = accelerator.num_processes, accelerator.process_index, cfg.per_device_eval_batch_size
    mine = list(range(rank, len(rows), world))
    acc: dict[str, list[torch.Tensor]] = {}
    model.eval()
    with torch.no_grad():
        for i in range(0, len(mine), bs):
            batch = stage.collate([rows[j] for j in mine[i : i + bs]])
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with accelerator.autocast():
                out = stage.step(model, batch)
            _add(
                acc, {"loss": (out.loss_sum.float(), torch.tensor(float(stage.count(batch)))), **out.metrics}
            )
    model.train()
    return {f"eval_{k}": v for k, v in stage.finalize_metrics(_reduce(accelerator, acc)).items() if v == v}


def _save_final(accelerator: Any, model: torch.nn.Module, stage: Stage, cfg: BaseConfig) -> None:
    """Write the final model next to a temporary copy first, so a crash mid-save loses nothing."""
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    tmp = os.path.join(cfg.output_dir, ".tmp-final")
    shutil.rmtree(tmp, ignore_errors=True)
    stage.save(accelerator.unwrap_model(model), tmp, merged=cfg.save_merged)
    for name in os.listdir(tmp):
        dest = os.path.join(cfg.output_dir, name)
        if os.path.isdir(dest):
            shutil.rmtree(dest)
        os.replace(os.path.join(tmp, name), dest)
    os.rmdir(tmp)
