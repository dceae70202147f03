"""A run's configuration: the sections (`sections`), the layout rules (`layout`) and loading (`loading`).

The package imports nothing of mdpo but `mdpo.errors`, so every other module may depend on it.
"""

from mdpo.config.layout import (
    CONFIG_WORDING,
    FLAG_WORDING,
    PLANNER_WORDING,
    Layout,
    Wording,
    padded_vocab_size,
    stage_layers,
)
from mdpo.config.loading import (
    ARG_ALIASES,
    DescribeModel,
    coerce_field,
    config_to_dict,
    load_config,
    load_section,
    translate_args,
)
from mdpo.config.sections import (
    ATTENTIONS,
    DATA_FORMATS,
    LOSS_TYPES,
    MODEL_FAMILIES,
    RECOMPUTE,
    REFERENCE_MODES,
    CheckpointConfig,
    DataConfig,
    DPOConfig,
    LoggingConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    ScheduleConfig,
    TrainConfig,
    validate,
)

__all__ = [
    "ARG_ALIASES",
    "ATTENTIONS",
    "CONFIG_WORDING",
    "DATA_FORMATS",
    "FLAG_WORDING",
    "LOSS_TYPES",
    "MODEL_FAMILIES",
    "PLANNER_WORDING",
    "RECOMPUTE",
    "REFERENCE_MODES",
    "CheckpointConfig",
    "DPOConfig",
    "DataConfig",
    "DescribeModel",
    "Layout",
    "LoggingConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "ScheduleConfig",
    "TrainConfig",
    "Wording",
    "coerce_field",
    "config_to_dict",
    "load_config",
    "load_section",
    "padded_vocab_size",
    "stage_layers",
    "translate_args",
    "validate",
]
