"""The exception types that mean "the user asked for something wrong" (shown as one line, exit code 2).

Only the project's own configuration and data errors belong here. A bare ValueError (a shape bug deep in
training) is a bug: it must surface as a traceback with a non-zero exit, not as one line. The model configs'
own checks raise ValueError; launch/config.py turns them into ConfigError where a run builds its model
config, and `seedlm convert` raises ConversionError.
"""

from seedlm.data_pipeline import DataError
from seedlm.eval.tasks import TaskError
from seedlm.launch.checkpoint import CheckpointError
from seedlm.launch.config import ConfigError
from seedlm.launch.convert import ConversionError
from seedlm.launch.expert_parallel import ExpertParallelError
from seedlm.launch.presets import PresetError

# TaskError: a train.eval_tasks entry that does not resolve (checked before compute)
USER_ERRORS = (ConfigError, DataError, PresetError, CheckpointError, ConversionError, ExpertParallelError, TaskError)
