"""The run config: typed sections (:mod:`.schema`) and how YAML files and overrides become one (:mod:`.load`)."""

from .load import apply_overrides, build_config, load_config, located, parse_override, read_yaml
from .schema import (
    PRECISIONS,
    CheckpointSection,
    DataSection,
    DeepSpeedSection,
    HardwareSection,
    IA3Section,
    ModelSection,
    OutputSection,
    RunConfig,
    TrainSection,
)

__all__ = ["PRECISIONS", "CheckpointSection", "DataSection", "DeepSpeedSection", "HardwareSection", "IA3Section",
           "ModelSection", "OutputSection", "RunConfig", "TrainSection", "apply_overrides", "build_config",
           "load_config", "located", "parse_override", "read_yaml"]
