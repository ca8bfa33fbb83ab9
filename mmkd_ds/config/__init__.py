"""Run configuration: dataclasses (`schema`) and the YAML + override loader (`loader`)."""

from mmkd_ds.config.errors import ConfigError
from mmkd_ds.config.loader import config_to_dict, load_config, parse_overrides
from mmkd_ds.config.schema import (
    DataConfig,
    LossConfig,
    PrecomputeConfig,
    RunConfig,
    SourceConfig,
    StreamConfig,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
)

__all__ = [
    "ConfigError",
    "DataConfig",
    "LossConfig",
    "PrecomputeConfig",
    "RunConfig",
    "SourceConfig",
    "StreamConfig",
    "StudentConfig",
    "TeacherConfig",
    "TrainConfig",
    "config_to_dict",
    "load_config",
    "parse_overrides",
]
