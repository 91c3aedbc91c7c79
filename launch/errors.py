"""The exception types that mean "the user asked for something wrong" (shown as one line, exit code 2)."""

from seedlm.data_pipeline import DataError
from seedlm.launch.checkpoint import CheckpointError
from seedlm.launch.config import ConfigError
from seedlm.launch.convert import ConversionError
from seedlm.launch.presets import PresetError

# ValueError covers the model configs' own checks (e.g. heads not dividing), raised as ValueError
USER_ERRORS = (ConfigError, DataError, PresetError, CheckpointError, ConversionError, ValueError)
