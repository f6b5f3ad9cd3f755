"""What `launch.py` runs once its flags are parsed; importable for tests.

`config.task` picks the job: 'synthesis' (AE-GAN, `job` and `evaluate`; the default) or
'segmenter' (the tumour segmenter of the downstream evaluation, `segmenter_job`).
"""
from __future__ import annotations

import sys

from aegan_jax import checkpoints
from aegan_jax import evaluate
from aegan_jax import host_memory
from aegan_jax import parallel
from aegan_jax import segmenter_job
from data_prep.errors import DataError
from aegan_jax import job

TASKS = ('synthesis', 'segmenter')


def run(config, workdir, *, mode='train', step=None, coordinator_address=None,
        num_processes=None, process_id=None) -> int:
  """Runs `mode` of `config.task`; user mistakes print one `error:` line and return 2."""
  host_memory.keep_freed_memory()
  parallel.maybe_initialize_distributed(coordinator_address, num_processes, process_id)
  jobs = {'synthesis': (job.train_and_evaluate, job.validate_config, evaluate.evaluate),
          'segmenter': (segmenter_job.train_and_evaluate, segmenter_job.validate_config,
                        segmenter_job.evaluate)}
  try:
    task = config.get('task', 'synthesis')
    if task not in jobs:
      raise job.ConfigError(f'config.task={task!r} must be one of {TASKS}')
    train_fn, validate, evaluate_fn = jobs[task]
    if mode == 'train':
      train_fn(config, workdir, step=step)
    else:
      validate(config)
      evaluate_fn(config, workdir, step=step)
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
