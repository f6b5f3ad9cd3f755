r"""Trains or evaluates AE-GAN.

  python launch.py --config=configs/demo.py --workdir=runs/demo
  python launch.py --config=configs/brats.py --workdir=runs/brats \
      --config.data.raw_dir=/data/MICCAI_BraTS2020_TrainingData --config.train.num_steps=100
  python launch.py --config=configs/brats.py --workdir=runs/brats --mode=evaluate [--step=N]
  python launch.py --config=configs/brats.py --workdir=runs/brats --step=N   # resume from step N
"""
import sys

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', None, 'Path to a config file (configs/*.py).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs, samples and results.')
flags.DEFINE_enum('mode', 'train', ['train', 'evaluate'], 'Train (then evaluate), or only evaluate.')
flags.DEFINE_integer('step', None, 'The checkpoint step to evaluate, or to resume training from '
                     '(default: latest; later checkpoints are moved aside).')
flags.DEFINE_string('coordinator_address', None, 'Multi-host: host:port of process 0.')
flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
flags.DEFINE_integer('process_id', None, 'Multi-host: index of this process.')
flags.mark_flags_as_required(['config', 'workdir'])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO.
  from aegan_jax import cli  # After flag parsing: jax must not start before this point.
  return cli.run(FLAGS.config, FLAGS.workdir, mode=FLAGS.mode, step=FLAGS.step,
                      coordinator_address=FLAGS.coordinator_address,
                      num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)


def _config_path(argv) -> str:
  """The config file named on the command line (`--config=FILE[:ARG]` or `--config FILE`)."""
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg.split('=', 1)[1].split(':')[0]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1].split(':')[0]
  return '--config'


def parse_flags(argv):
  """absl flag parsing, with a bad config file or an unknown config field as one line
  instead of a traceback."""
  # ml_collections logs a warning before the error of a get_config() that returns None.
  logging.set_verbosity(logging.ERROR)
  try:
    remaining = FLAGS(argv)
  except SyntaxError as e:
    _exit(f'{e.filename}:{e.lineno}: syntax error ({e.msg})')
  except flags.Error as e:
    if 'Error whilst parsing config file' in str(e):  # get_config's ValueError/TypeError
      _exit(f'{_config_path(argv[1:])}: get_config() failed ({_last_line(e)})')
    if FLAGS['config'].value is None and any(a.startswith('--config') for a in argv[1:]):
      _exit(f'{_config_path(argv[1:])}: get_config() returned None, not a config (a missing '
            'return statement?)')
    _exit(e)
  except (AttributeError, KeyError) as e:
    field = next((a.split('=')[0] for a in argv[1:] if a.startswith('--config.') and
                  str(e).strip('"\'') in a.split('=')[0].split('.')), '--config.*')
    _exit(f'{field}: no such config field ({str(e).strip(chr(34))})')
  except Exception as e:  # pylint: disable=broad-except  # Any other error of the config file.
    _exit(f'{_config_path(argv[1:])}: get_config() failed ({type(e).__name__}: {_last_line(e)})')
  config = FLAGS['config'].value
  if config is not None and not isinstance(config, ml_collections.ConfigDict):
    # ml_collections defers a file that cannot be loaded until the config is used.
    cause = vars(config).get('_error', f'get_config() returned a {type(config).__name__}')
    _exit(f'{_config_path(argv[1:])}: cannot be loaded ({_last_line(cause)})')
  return remaining


def _last_line(error) -> str:
  return (str(error).strip().splitlines() or [''])[-1].strip()


def _exit(message: str):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


if __name__ == '__main__':
  sys.exit(app.run(main, flags_parser=parse_flags))
