"""What `launch.py` runs once its flags are parsed; importable for tests."""
from __future__ import annotations

import sys

from aegan_jax import checkpoints
from aegan_jax import host_memory
from aegan_jax import parallel
from aegan_jax import job


def run(config, workdir, *, mode='train', step=None, coordinator_address=None,
        num_processes=None, process_id=None) -> int:
  """Runs `mode`; user mistakes print one `error:` line and return 2."""
  host_memory.keep_freed_memory()
  parallel.maybe_initialize_distributed(coordinator_address, num_processes, process_id)
  from aegan_jax import evaluate  # pylint: disable=g-import-not-at-top
  from data_prep.errors import DataError  # pylint: disable=g-import-not-at-top
  try:
    if mode == 'train':
      job.train_and_evaluate(config, workdir, step=step)
    else:
      job.validate_config(config)
      evaluate.evaluate(config, workdir, step=step)
  except (job.ConfigError, checkpoints.CheckpointError, evaluate.EvaluationError,
          DataError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except job.TrainingDiverged as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  except OSError as e:  # A full disk or a folder made read-only while writing samples, logs...
    print(f'error: {e.filename or workdir}: {e.strerror or e}; the checkpoints written before '
          'are intact: fix this and run the same command to resume', file=sys.stderr)
    return 2
  return 0
