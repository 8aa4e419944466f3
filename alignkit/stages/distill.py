"""On-policy distillation: GKD (Agarwal et al. 2024, "On-policy distillation of language models"; TRL's
`trl.experimental.gkd.GKDTrainer`).

A reading guide, rollout -> teacher -> loss:
- rollout: with probability `lmbda` a global batch is the student's own samples (one per prompt, the one
  rollout engine), otherwise the data set's completions (supervised KD on fixed outputs); every process draws
  the same decision from the seeded generator, whose state is checkpointed;
- teacher: a frozen model with the same tokenizer (a clear error otherwise) runs over prompt + completion;
- loss: at every completion token, the generalized Jensen-Shannon divergence between the student's and the
  teacher's whole next-token distributions (`alignkit.losses.distill.generalized_jsd`, `beta`: 0 forward KL,
  1 reverse KL), averaged over the completion tokens of the global batch (TRL's `batchmean` with labels).

How it departs from TRL: no `seq_kd` (sequences sampled from the teacher); when the two models' output layers
differ in width (padded vocabularies of one tokenizer) both are cut to the narrower, whose ids are the
tokenizer's.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import nn

from alignkit.config import DistillConfig
from alignkit.data.batches import encode_unpaired
from alignkit.data.formats import Example, last_answer
from alignkit.errors import UserError
from alignkit.losses.distill import generalized_jsd
from alignkit.modeling.fused_jsd import chunked_jsd, fused_jsd_applies
from alignkit.modeling.load import load_policy, load_tokenizer
from alignkit.modeling.logprobs import completion_hidden, completion_logits
from alignkit.modeling.reference import Reference
from alignkit.stages.base import Examples, Metrics, StepOutput
from alignkit.stages.online import OnlineStage


class DistillStage(OnlineStage):
    name = "distill"
    config_class = DistillConfig
    kinds = ("prompt", "sft")
    rewarded = False  # it learns the teacher's distributions; held out, `eval_reward_funcs` score it

    def held_out_anchor(self) -> Reference:
        return self.teacher

    def load_model(self) -> nn.Module:
        return load_policy(self.cfg)

    def build(self) -> None:
        cfg = self.cfg
        if (cfg.eval_dataset or cfg.val_size) and cfg.held_out_metric == "reward":
            raise UserError(
                f"`{'eval_dataset' if cfg.eval_dataset else 'val_size'}`: stage distill has no training reward to "
                "evaluate by; give `eval_reward_funcs` (e.g. [exact_match]): the held-out score its best model is "
                "chosen by, beside the student's KL to the teacher (`eval_kl`)"
            )
        super().build()
        self.build_eval_funcs()
        self.teacher = Reference(
            cfg, self.model, cfg.teacher_model_name_or_path, "teacher_model_name_or_path"
        )
        self._check_tokenizer()
        if cfg.lmbda < 1 and any(r["completion_ids"] is None for r in self.train_rows):
            where = next(r["where"] for r in self.train_rows if r["completion_ids"] is None)
            raise UserError(
                f"{where}: this row has no completion, but `lmbda: {cfg.lmbda}` trains on the data set's "
                "completions on some steps; give every row a completion, or set `lmbda: 1` (the student's "
                "own samples only)"
            )
        self.engine = None
        if cfg.rollout_backend == "vllm":
            from alignkit.generation.rollout import VLLMEngine

            self.engine = VLLMEngine(cfg.model_name_or_path, self.tokenizer)
        self._rng = random.Random(cfg.seed)

    def _check_tokenizer(self) -> None:
        path = self.cfg.teacher_model_name_or_path
        try:
            theirs = load_tokenizer(path, self.cfg.trust_remote_code)
        except Exception:  # an adapter folder without a tokenizer: its base's
            theirs = load_tokenizer(self.teacher.spec.base, self.cfg.trust_remote_code)
        if theirs.get_vocab() != self.tokenizer.get_vocab():
            raise UserError(
                f"teacher_model_name_or_path: {path} has another tokenizer than the student "
                f"({len(theirs)} vs {len(self.tokenizer)} tokens, or the same size with other ids); token-level "
                "distillation compares the two models token by token and needs one tokenizer: pick a teacher "
                "of the student's family"
            )

    def load_examples(self, sources: Any) -> Examples:
        """A whole conversation is distilled on its last answer, sampled from the turns before it (TRL's GKD)."""
        return Examples(last_answer(ex) for ex in super().load_examples(sources))

    def prompt_row(self, ex: Example, prompt_ids: list[int]) -> dict:
        """The prompt, and the data set's completion (for the steps that distil on it) when the row has one."""
        completion = encode_unpaired(ex, self.tokenizer)["completion_ids"] if ex.completion else None
        return {**super().prompt_row(ex, prompt_ids), "completion_ids": completion}

    def state_dict(self) -> dict[str, Any]:
        return {"lmbda_rng": self.rng_state(self._rng)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "lmbda_rng" in state:
            self.set_rng_state(self._rng, state["lmbda_rng"])

    @torch.no_grad()
    def rollout(self, model: nn.Module, rows: list[dict], device: torch.device) -> list[dict]:
        on_policy = self._rng.random() < self.cfg.lmbda  # lmbda 1: always, 0: never
        if on_policy:
            samples = self.sample(model, rows, 1)
            pairs = zip(samples.prompt_ids, samples.completion_ids)
        else:
            pairs = ((r["prompt_ids"], r["completion_ids"]) for r in rows)
        max_completion = self.cfg.max_length
        buffer = [
            {"prompt_ids": p, "completion_ids": c[: max(max_completion - len(p), 0)], "on_policy": on_policy}
            for p, c in pairs
        ]
        return [s for s in buffer if s["completion_ids"]] or buffer[:1]

    def collate(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.sequence_batch(samples)
        batch["on_policy"] = torch.tensor([float(s["on_policy"]) for s in samples])
        return batch

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["completion_mask"][:, 1:].sum())

    def num_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum())

    def step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        labels = batch["input_ids"][:, 1:][batch["completion_mask"][:, 1:].bool()]  # (N,)
        with self.teacher.active(model, batch["input_ids"].device) as teacher:
            if fused_jsd_applies(model, teacher):  # neither model's (N, V) logits are made
                with torch.no_grad():
                    h_teacher = completion_hidden(teacher, *args)
                h = completion_hidden(model, *args)
                jsd, lp_s, lp_t = chunked_jsd(model, h, teacher, h_teacher, labels, self.cfg.beta)
                return StepOutput(loss_sum=jsd.sum(), metrics=self._metrics(batch, jsd, lp_s, lp_t))
            student = completion_logits(model, *args)  # (N, V)
            with torch.no_grad():
                teacher_logits = completion_logits(teacher, *args)  # (N, V')
        width = min(student.shape[-1], teacher_logits.shape[-1])
        student, teacher_logits = student[:, :width], teacher_logits[:, :width]
        jsd = generalized_jsd(student, teacher_logits, self.cfg.beta)  # (N,)
        with torch.no_grad():
            lp_s, lp_t = (
                torch.log_softmax(z, -1).gather(-1, labels[:, None])[:, 0] for z in (student, teacher_logits)
            )
        return StepOutput(loss_sum=jsd.sum(), metrics=self._metrics(batch, jsd, lp_s, lp_t))

    @staticmethod
    def _metrics(
        batch: dict[str, torch.Tensor], jsd: torch.Tensor, lp_student: torch.Tensor, lp_teacher: torch.Tensor
    ) -> Metrics:
        """The JSD and both models' log-probs of the completion's own tokens, per token; per row the rest."""
        with torch.no_grad():
            target = batch["completion_mask"][:, 1:].bool()
            n_tok, n = float(jsd.shape[0]), float(batch["input_ids"].shape[0])
            return {
                "jsd": (jsd.detach().sum(), n_tok),
                "logps/student": (lp_student.sum(), n_tok),
                "logps/teacher": (lp_teacher.sum(), n_tok),
                "on_policy": (batch["on_policy"].sum(), n),
                "completion_length": (target.sum().float(), n),
            }
