"""One config class per stage: its keys (with the TRL / LLaMA-Factory names users know), their defaults and
the checks of their values, and the one table of stages. A stage's runner (`alignkit.stages`) names its
config class here."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from alignkit.config.schema import BaseConfig, check_choice, one_or_more
from alignkit.errors import UserError, did_you_mean
from alignkit.losses.preference import DPO_LOSSES
from alignkit.losses.rl import GRPO_LOSS_TYPES, SAMPLER_CORRECTIONS
from alignkit.losses.unpaired import KTO_LOSSES

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
JUDGE_REWARDS = ("grade", "pairwise")  # alignkit.generation.judge_reward


@dataclass
class SFTConfig(BaseConfig):
    stage: str = "sft"
    learning_rate: float = 2e-5
    packing: bool = False  # several rows in one sequence, attention kept apart by position_ids
    completion_only_loss: bool = True  # loss only on completion/assistant tokens
    padding_free: bool = False  # each micro-batch as one row, position_ids restarting per original row


@dataclass
class PTConfig(SFTConfig):
    """LLaMA-Factory's `stage: pt`: plain language modelling on text (every token trained)."""

    stage: str = "pt"
    dataset_format: str = "text"
    completion_only_loss: bool = False


@dataclass
class RMConfig(BaseConfig):
    stage: str = "rm"
    learning_rate: float = 1e-5
    center_rewards_coefficient: float | None = None  # adds coef * mean((r_c + r_r)^2)
    padding_free: bool = False  # each micro-batch as one row, position_ids restarting per original row
    # the micro-batch's rows run in groups of similar length, each padded to its own longest row (at most 1/8
    # padding); false: one forward of the whole padded batch. The same scores either way
    length_groups: bool = True


@dataclass
class DPOConfig(BaseConfig):
    """The direct preference family: every loss in `alignkit.losses.preference.DPO_LOSSES`, combinable."""

    stage: str = "dpo"
    learning_rate: float = 1e-6
    beta: float = 0.1
    loss_type: list[str] = one_or_more("sigmoid")  # one loss or several, combined
    loss_weights: list[float] | None = None  # one per loss_type (MPO-style mixes); default all 1
    label_smoothing: float = 0.0  # cDPO with `sigmoid`; epsilon of robust / exo_pair / aot
    reference_free: bool = False  # reference log-probs taken as 0
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05
    simpo_gamma: float = 0.5  # SimPO target margin (in units of beta)
    cpo_alpha: float = 1.0  # weight of the NLL term in CPO / SimPO
    orpo_beta: float = 0.1  # lambda of ORPO's odds-ratio term
    ref_model_name_or_path: str | None = None  # default: the starting policy
    precompute_ref_log_probs: bool = False
    ref_cache_dir: str | None = None  # default: output_dir/ref_logps
    padding_free: bool = False  # each micro-batch as one row, position_ids restarting per original row
    prefix_sharing: bool = False  # the prompt runs once for both completions (one row, a 4-D mask)

    def check(self, source: str = "config") -> None:
        super().check(source)
        check_choice(source, "f_divergence_type", self.f_divergence_type, F_DIVERGENCES)
        if self.beta <= 0:
            raise UserError(f"{source}: `beta` must be > 0, got {self.beta}")
        for name in self.loss_type:  # a list: a single name is built as a list of one
            if name not in DPO_LOSSES:
                raise UserError(
                    f"{source}: `loss_type: {name}` does not exist{did_you_mean(name, DPO_LOSSES)}; "
                    f"valid loss types: {', '.join(DPO_LOSSES)}"
                )
            spec = DPO_LOSSES[name]
            if spec.needs_smoothing and not 0 < self.label_smoothing < 0.5:
                raise UserError(f"{source}: `loss_type: {name}` needs 0 < label_smoothing < 0.5")
            if self.f_divergence_type != "reverse_kl" and not spec.f_divergence:
                raise UserError(
                    f"{source}: `f_divergence_type: {self.f_divergence_type}` does not apply to `{name}`"
                )
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise UserError(
                f"{source}: `loss_weights` has {len(self.loss_weights)} values for {len(self.loss_type)} "
                "loss types"
            )
        if not 0.0 <= self.label_smoothing < 0.5:
            raise UserError(f"{source}: `label_smoothing` must be in [0, 0.5), got {self.label_smoothing}")


@dataclass
class KTOConfig(BaseConfig):
    """Kahneman-Tversky Optimisation on unpaired good/bad labels (paired data is split automatically)."""

    stage: str = "kto"
    learning_rate: float = 1e-6
    beta: float = 0.1
    loss_type: str = "kto"  # kto | apo_zero_unpaired
    desirable_weight: float | str = 1.0  # lambda_D, or `auto` (from the label counts, KTO paper sec. 4.2)
    undesirable_weight: float | str = 1.0  # lambda_U, or `auto`
    allow_single_label: bool = False  # train although every row has the same label
    ref_model_name_or_path: str | None = None
    precompute_ref_log_probs: bool = False
    ref_cache_dir: str | None = None
    padding_free: bool = False  # each micro-batch as one row, position_ids restarting per original row
    prefix_sharing: bool = False  # the KL completion shares its prompt's pass (one row, a 4-D mask)

    @property
    def auto_weights(self) -> bool:
        """Whether a weight is `auto` (the stage derives it from the label counts)."""
        return "auto" in (self.desirable_weight, self.undesirable_weight)

    def resolved_weights(self, auto_desirable: float, auto_undesirable: float) -> tuple[float, float]:
        """(desirable_weight, undesirable_weight) as numbers: a set weight as set, an `auto` one the given
        value. The stage keeps the result on itself; the config keeps what the user wrote."""
        d, u = self.desirable_weight, self.undesirable_weight
        return (auto_desirable if d == "auto" else float(d), auto_undesirable if u == "auto" else float(u))

    def check(self, source: str = "config") -> None:
        super().check(source)
        if self.beta <= 0:
            raise UserError(f"{source}: `beta` must be > 0, got {self.beta}")
        if self.loss_type not in KTO_LOSSES:
            raise UserError(
                f"{source}: `loss_type: {self.loss_type}` does not exist for stage kto"
                f"{did_you_mean(self.loss_type, KTO_LOSSES)}; valid: {', '.join(KTO_LOSSES)}"
            )
        for key in ("desirable_weight", "undesirable_weight"):
            value = getattr(self, key)
            if isinstance(value, str) and value != "auto":
                raise UserError(f"{source}: `{key}` must be a number or `auto`, got {value!r}")
            if not isinstance(value, str) and value <= 0:
                raise UserError(f"{source}: `{key}` must be > 0, got {value}")


@dataclass
class SamplingConfig(BaseConfig):
    """Keys of the stages that sample from the policy while they train (the rollout engine's settings)."""

    learning_rate: float = 1e-6
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_strings: list[str] | None = None
    rollout_backend: str = "hf"  # hf | vllm
    per_device_eval_batch_size: int = 64
    # with eval_dataset / val_size: held-out scorers beside the training rewards (e.g. exact_match under a
    # reward model), the held-out metric the best model is chosen by, and what a reward-hacking flag does
    eval_reward_funcs: list[str] | None = field(default=None, metadata={"one_or_more": True})
    metric_for_best_model: str | None = None  # default: the first eval_reward_funcs, else `reward`
    hacking_action: str = "warn"  # warn | stop

    @property
    def held_out_metric(self) -> str:
        """The held-out metric the monitor and the best model read (an `eval_` prefix, as HF's, is dropped)."""
        name = self.metric_for_best_model or (self.eval_reward_funcs or ["reward"])[0]
        return name.removeprefix("eval_")

    def check(self, source: str = "config") -> None:
        super().check(source)
        check_choice(source, "hacking_action", self.hacking_action, ("warn", "stop"))
        if self.rollout_backend not in ("hf", "vllm"):
            raise UserError(
                f"{source}: `rollout_backend: {self.rollout_backend}` is not valid"
                f"{did_you_mean(self.rollout_backend, ('hf', 'vllm'))}; choose hf or vllm"
            )
        if self.temperature <= 0:
            raise UserError(f"{source}: `temperature` must be > 0 for sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"{source}: `top_p` must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.max_new_tokens < 1:
            raise UserError(f"{source}: `top_k` must be >= 0 and `max_new_tokens` >= 1")
        if self.stop_strings is not None and not all(self.stop_strings):
            raise UserError(f"{source}: `stop_strings` must not contain an empty string")


@dataclass
class OnlineConfig(SamplingConfig):
    """Keys of the online stages that learn from rewards (GRPO, PPO, online DPO)."""

    reward_funcs: list[str] | None = field(  # math_accuracy, exact_match, format, length, or module:function
        default=None,
        metadata={"one_or_more": True},  # one name is a list of one
    )
    reward_weights: list[float] | None = None  # one per reward function (and a last one for reward_model)
    reward_model: str | None = (
        None  # a model trained by `stage: rm` (full or LoRA adapter), or any sequence-classification model
    )
    reward_model_type: str = "auto"  # auto | full | lora: auto reads the folder (adapter_config.json: lora)
    format_pattern: str = r"<think>.*</think>.*"
    length_target: int = 512  # `length` reward: penalty for characters past this
    missing_eos_penalty: float | None = None  # subtracted from the reward of truncated completions
    ref_model_name_or_path: str | None = None
    # the LLM judge as a reward (an OpenAI-compatible endpoint; alignkit serve of another model works)
    judge_reward: str | None = None  # grade (1-10 -> [0, 1]) | pairwise (win share within the group)
    judge_base_url: str | None = None
    judge_model: str | None = None
    judge_api_key_env: str | None = "OPENAI_API_KEY"
    judge_mode: str = "verdict"  # verdict | logprobs (a one-token answer's log-probs: any local model)
    judge_max_concurrency: int = 8
    # multi-turn, tool-using rollouts (grpo): tools as module:function, or an environment module:factory
    tools: list[str] | None = field(default=None, metadata={"one_or_more": True})
    environment: str | None = (
        None  # module:factory; factory() -> an object with reset(row) and step(messages)
    )
    max_turns: int = 1  # model turns per episode (with tools or an environment)
    tool_timeout: float = 10.0  # seconds a tool may run before its call becomes an error observation

    def check(self, source: str = "config") -> None:
        """What GRPO, PPO and online DPO share: rewards (the sampling keys are checked by SamplingConfig)."""
        super().check(source)
        check_choice(source, "reward_model_type", self.reward_model_type, ("auto", "full", "lora"))
        if self.judge_reward is not None:
            check_choice(source, "judge_reward", self.judge_reward, JUDGE_REWARDS)
            check_choice(source, "judge_mode", self.judge_mode, ("verdict", "logprobs"))
            if not (self.judge_base_url and self.judge_model):
                raise UserError(
                    f"{source}: `judge_reward: {self.judge_reward}` needs `judge_base_url` (an OpenAI-compatible "
                    "endpoint, e.g. http://127.0.0.1:8000/v1) and `judge_model`"
                )
        if not self.reward_funcs and not self.reward_model and not self.environment and not self.judge_reward:
            raise UserError(
                f"{source}: give `reward_funcs` (e.g. [math_accuracy]) and/or a `reward_model` "
                "(e.g. one trained with `stage: rm`), a `judge_reward`, or an `environment` that rewards"
            )
        if self.tools and self.environment:
            raise UserError(
                f"{source}: give `tools` or an `environment`, not both (tools are one environment)"
            )
        if self.max_turns < 1 or self.tool_timeout <= 0:
            raise UserError(f"{source}: `max_turns` must be >= 1 and `tool_timeout` > 0")
        n_rewards = (
            len(self.reward_funcs or []) + (1 if self.reward_model else 0) + (1 if self.environment else 0)
        )
        if self.reward_weights is not None and len(self.reward_weights) != n_rewards:
            raise UserError(
                f"{source}: `reward_weights` has {len(self.reward_weights)} values for {n_rewards} rewards "
                "(one per reward function, then one each for the reward model, the judge and the environment)"
            )


@dataclass
class DistillConfig(SamplingConfig):
    """On-policy distillation (GKD, Agarwal et al. 2024): the student samples, the teacher scores every token of
    the student's completions over the whole vocabulary, and the loss is the generalized Jensen-Shannon
    divergence between the two next-token distributions. TRL's `GKDConfig` names and defaults."""

    stage: str = "distill"
    learning_rate: float = 5e-7
    teacher_model_name_or_path: str | None = (
        None  # a local model or adapter folder (or a hub id) with the same tokenizer
    )
    beta: float = 0.5  # JSD mixture: 0 forward KL(teacher || student), 1 reverse KL(student || teacher)
    lmbda: float = 0.5  # share of steps on the student's own samples; the rest on the data set's completions
    temperature: float = 0.9
    max_new_tokens: int = 128

    def check(self, source: str = "config") -> None:
        super().check(source)
        if not self.teacher_model_name_or_path:
            raise UserError(
                f"{source}: stage distill needs `teacher_model_name_or_path` (the model to learn from)"
            )
        for key in ("beta", "lmbda"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise UserError(f"{source}: `{key}` must be in [0, 1], got {getattr(self, key)}")


@dataclass
class GRPOConfig(OnlineConfig):
    stage: str = "grpo"
    num_generations: int = 8
    loss_type: str = "grpo"  # grpo | dr_grpo | dapo | gspo | rloo
    beta: float = 0.0  # KL to the reference; 0 loads no reference model
    use_bias_correction_kl: bool = (
        True  # weight the k3 KL by the importance ratio (DeepSeek-V3.2; TRL's default)
    )
    epsilon: float = 0.2  # clip range (epsilon_low)
    epsilon_high: float | None = None  # DAPO clip-higher; default: epsilon
    num_iterations: int = 1  # updates per rollout (importance ratios against the sampling log-probs)
    dynamic_sampling: bool | None = (
        None  # DAPO: refill groups whose rewards are all equal; default on for dapo
    )
    max_refill_rounds: int = 3
    overlong_buffer_len: int | None = None  # DAPO soft overlong punishment over the last N tokens
    overlong_penalty_factor: float = 1.0
    # rollout_backend: vllm: weight each token by pi_trainer / pi_sampler of the sampled tokens (TIS / masked IS)
    vllm_importance_sampling_correction: bool = True
    vllm_importance_sampling_mode: str = "token_truncate"  # token_ / sequence_ + truncate / mask
    vllm_importance_sampling_clip_max: float | None = 3.0  # the cap C
    vllm_importance_sampling_clip_min: float | None = None

    def check(self, source: str = "config") -> None:
        super().check(source)
        if self.beta < 0:
            raise UserError(f"{source}: `beta` must be >= 0, got {self.beta}")
        if self.loss_type not in GRPO_LOSS_TYPES:
            raise UserError(
                f"{source}: `loss_type: {self.loss_type}` does not exist for stage grpo"
                f"{did_you_mean(self.loss_type, GRPO_LOSS_TYPES)}; valid: {', '.join(GRPO_LOSS_TYPES)}"
            )
        if self.num_generations < 2:
            raise UserError(
                f"{source}: `num_generations` must be >= 2 for group-relative advantages "
                f"(got {self.num_generations}); a group of one has no baseline"
            )
        if self.overlong_buffer_len is not None and not 0 < self.overlong_buffer_len <= self.max_new_tokens:
            raise UserError(f"{source}: `overlong_buffer_len` must be in (0, max_new_tokens]")
        if self.num_iterations < 1:
            raise UserError(f"{source}: `num_iterations` must be >= 1")
        if self.epsilon < 0 or (self.epsilon_high is not None and self.epsilon_high < 0):
            raise UserError(f"{source}: `epsilon` and `epsilon_high` must be >= 0")
        if self.max_refill_rounds < 0:
            raise UserError(f"{source}: `max_refill_rounds` must be >= 0, got {self.max_refill_rounds}")
        check_choice(
            source, "vllm_importance_sampling_mode", self.vllm_importance_sampling_mode, SAMPLER_CORRECTIONS
        )
        lo, hi = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
        if (lo is not None and lo < 0) or (hi is not None and hi <= 0) or (None not in (lo, hi) and lo >= hi):
            raise UserError(
                f"{source}: `vllm_importance_sampling_clip_min` ({lo}) must be >= 0 and below "
                f"`vllm_importance_sampling_clip_max` ({hi}), which must be > 0"
            )


@dataclass
class PPOConfig(OnlineConfig):
    """RLHF with PPO: actor, critic (value head), frozen reference, reward model and/or verifiable rewards."""

    stage: str = "ppo"
    value_model_name_or_path: str | None = None  # default: the reward model, else the policy
    init_kl_coef: float = 0.05
    target_kl: float | None = None  # adaptive KL controller target; None keeps init_kl_coef fixed
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    ppo_epochs: int = 4
    num_mini_batches: int = 1
    whiten_advantages: bool = True
    whiten_rewards: bool = False
    reward_clip: float | None = None

    def check(self, source: str = "config") -> None:
        super().check(source)
        if self.ppo_epochs < 1 or self.num_mini_batches < 1:
            raise UserError(f"{source}: `ppo_epochs` and `num_mini_batches` must be >= 1")
        if self.target_kl is not None and self.target_kl <= 0:
            raise UserError(f"{source}: `target_kl` must be > 0 (or left out for a fixed coefficient)")
        if self.kl_horizon < 1:
            raise UserError(f"{source}: `kl_horizon` must be >= 1, got {self.kl_horizon}")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise UserError(f"{source}: `gamma` and `lam` must be in [0, 1], got {self.gamma} and {self.lam}")
        for key in ("init_kl_coef", "cliprange", "cliprange_value", "vf_coef", "entropy_coef"):
            if getattr(self, key) < 0:
                raise UserError(f"{source}: `{key}` must be >= 0, got {getattr(self, key)}")
        if self.reward_clip is not None and self.reward_clip <= 0:
            raise UserError(f"{source}: `reward_clip` must be > 0, got {self.reward_clip}")
        if self.num_mini_batches > self.per_device_train_batch_size * self.gradient_accumulation_steps:
            raise UserError(
                f"{source}: `num_mini_batches` ({self.num_mini_batches}) is larger than the rollout batch "
                f"({self.per_device_train_batch_size} x {self.gradient_accumulation_steps} prompts per process)"
            )


@dataclass
class OnlineDPOConfig(OnlineConfig, DPOConfig):
    """Online DPO (Guo et al. 2024, "Direct language model alignment from online AI feedback"): each step
    samples `num_generations` completions per prompt from the current policy, ranks them with the rewards
    (reward functions, a reward model, the LLM judge) and takes any loss of the DPO family on the best and the
    worst. The keys are the online stages' (sampling, rewards) and DPO's (loss, beta, reference)."""

    stage: str = "online_dpo"
    learning_rate: float = 5e-7  # TRL's OnlineDPOConfig default
    num_generations: int = 2  # completions per prompt; the best and the worst make the pair
    rounds: int = (
        0  # 0: online (pairs sampled every step); N: iterative DPO, N rounds of sample -> label -> DPO
    )

    def check(self, source: str = "config") -> None:
        super().check(source)
        if self.num_generations < 2:
            raise UserError(
                f"{source}: `num_generations` must be >= 2 to make a pair, got {self.num_generations}"
            )
        if self.rounds < 0:
            raise UserError(f"{source}: `rounds` must be >= 0 (0: online DPO), got {self.rounds}")
        for key in ("judge_reward", "tools", "environment") if self.rounds else ():
            if getattr(self, key):
                raise UserError(f"{source}: `{key}` is not supported with `rounds` (iterative DPO) yet")
        if self.rounds and self.rollout_backend != "hf":
            raise UserError(
                f"{source}: iterative DPO (`rounds`) samples with rollout_backend: hf only, for now"
            )
        for key in ("precompute_ref_log_probs", "prefix_sharing", "padding_free"):
            if getattr(self, key):
                raise UserError(
                    f"{source}: `{key}` does not apply to stage online_dpo (its pairs are sampled each step); "
                    "remove it"
                )


# The one table of stages: `stage:` -> its config class. Every other list of stages derives from it.
CONFIG_CLASSES: dict[str, type[BaseConfig]] = {
    "sft": SFTConfig,
    "pt": PTConfig,
    "rm": RMConfig,
    "dpo": DPOConfig,
    "kto": KTOConfig,
    "ppo": PPOConfig,
    "grpo": GRPOConfig,
    "online_dpo": OnlineDPOConfig,
    "distill": DistillConfig,
}
STAGES = tuple(CONFIG_CLASSES)


def stage_keys(stage: str) -> list[str]:
    return [f.name for f in dataclasses.fields(CONFIG_CLASSES[stage])]
