"""Run configuration: dataclasses (`schema`) and the YAML + override loader (`loader`)."""

from mmkd_ds.config.errors import ConfigError
from mmkd_ds.config.loader import config_to_dict, load_config, parse_overrides
from mmkd_ds.config.schema import (
    DataConfig,
    PrecomputeConfig,
    RunConfig,
    SourceConfig,
    StreamConfig,
    TeacherConfig,
)

__all__ = [
    "ConfigError",
    "DataConfig",
    "PrecomputeConfig",
    "RunConfig",
    "SourceConfig",
    "StreamConfig",
    "TeacherConfig",
    "config_to_dict",
    "load_config",
    "parse_overrides",
]
