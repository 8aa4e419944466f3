"""Run configuration: load, build, check and save the typed config every face (library, CLI, console) uses.

`load` reads YAML and `key=value` overrides and builds a config; `schema` holds one dataclass per stage;
`checks` rejects impossible values at load time; `compat` reads LLaMA-Factory's and TRL's key names; `coerce`
turns YAML and command-line strings into typed values.
"""

from alignkit.config.load import (
    build_config,
    config_to_dict,
    load_config,
    load_yaml_mapping,
    read_yaml,
    save_config,
)
from alignkit.config.schema import (
    DATASET_FORMATS,
    FINETUNING_TYPES,
    REPORT_TO,
    SCHEDULERS,
    BaseConfig,
    build_dataclass,
)
from alignkit.config.stages import (
    CONFIG_CLASSES,
    STAGES,
    DistillConfig,
    DPOConfig,
    GRPOConfig,
    KTOConfig,
    OnlineConfig,
    OnlineDPOConfig,
    PPOConfig,
    PTConfig,
    RMConfig,
    SamplingConfig,
    SFTConfig,
    stage_keys,
)

__all__ = [
    "CONFIG_CLASSES",
    "DATASET_FORMATS",
    "FINETUNING_TYPES",
    "REPORT_TO",
    "SCHEDULERS",
    "STAGES",
    "BaseConfig",
    "DistillConfig",
    "DPOConfig",
    "GRPOConfig",
    "OnlineDPOConfig",
    "KTOConfig",
    "OnlineConfig",
    "PPOConfig",
    "PTConfig",
    "RMConfig",
    "SamplingConfig",
    "SFTConfig",
    "build_config",
    "build_dataclass",
    "config_to_dict",
    "load_config",
    "load_yaml_mapping",
    "read_yaml",
    "save_config",
    "stage_keys",
]
