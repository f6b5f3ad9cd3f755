"""Official AE-GAN (PyTorch) weights: import and a parity check.

    python -m aegan_jax.official check FIXTURE.npz
    python -m aegan_jax.official import --generator G.pth [--autoencoder AE.pth] \\
        --config configs/brats.py --workdir DIR

`check` runs our networks on an exported fixture's inputs (eval mode, and BatchNorm in
training mode for the `trainbn_*` keys) and compares every stored output,
feature summary, loss and gradient norm; it exits 1 above tolerance.  `import`
writes the weights as step 0 of an Orbax checkpoint (config.model set from the
weights), which `aegan_jax.evaluate` and `aegan_jax.synthesize` restore.

State dicts come as `.npz` files holding the official tensor names (optionally
prefixed `G/` or `AE/`, as in the shared fixture) or as PyTorch `.pth` files,
read with `torch.load(weights_only=True)` when torch >= 2.6 is installed (older torch is
refused: its weights_only loading can be bypassed, CVE-2025-32434).

The work lives in `aegan_jax.parity` (check) and `aegan_jax.weight_conversion` (import);
this module is the command line.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import zipfile

from aegan_jax import parity
from aegan_jax import weight_conversion


def _parser():
  parser = argparse.ArgumentParser(prog='python -m aegan_jax.official',
                                   description=__doc__.split('\n\n')[0])
  sub = parser.add_subparsers(dest='command', required=True)
  check_parser = sub.add_parser('check', help='compare our networks with an exported fixture')
  check_parser.add_argument('fixture', type=pathlib.Path)
  check_parser.add_argument('--tolerance', type=float, default=parity.TOLERANCE)
  check_parser.add_argument('--gradient-tolerance', type=float,
                            default=parity.GRADIENT_TOLERANCE,
                            help='bound for the gradnorm_* keys (see GRADIENT_TOLERANCE)')
  check_parser.add_argument('--verbose', action='store_true', help='one row per key')
  import_parser = sub.add_parser('import', help='write official weights as an Orbax checkpoint')
  import_parser.add_argument('--generator', required=True, type=pathlib.Path,
                             help='G state dict (.pth, or .npz with or without G/ prefixes)')
  import_parser.add_argument('--autoencoder', type=pathlib.Path,
                             help='AE state dict (.pth, or .npz with or without AE/ prefixes)')
  import_parser.add_argument('--config', required=True, type=pathlib.Path,
                             help='config file, e.g. configs/brats.py (model fields are set '
                                  'from the weights)')
  import_parser.add_argument('--workdir', required=True, type=pathlib.Path)
  import_parser.add_argument('--step', type=int, default=0)
  return parser


def _error(message) -> int:
  print(f'error: {message}', file=sys.stderr)
  return 2


def _import_command(args) -> int:
  try:
    config = weight_conversion.load_config_file(args.config)
    config = weight_conversion.import_weights(args.generator, config, args.workdir,
                                              args.autoencoder, args.step)
  except weight_conversion.WeightImportError as e:
    return _error(e)
  m = config.model
  print(f'imported {"generator and autoencoder" if args.autoencoder else "generator"} '
        f'(ngf {m.ngf}, {m.num_blocks} blocks, dropout {m.use_dropout}, norm {m.norm}, '
        f'{config.data.image_size} px, modalities {list(config.data.modalities)}) into '
        f'{pathlib.Path(args.workdir) / "checkpoints"} step {args.step}')
  return 0


def _check_command(args) -> int:
  try:
    rows = parity.check(args.fixture, args.tolerance, args.gradient_tolerance)
  except weight_conversion.WeightImportError as e:  # Before ValueError: it is one.
    return _error(e)
  except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:  # Unreadable or incomplete.
    return _error(f'{args.fixture}: {e}')
  return parity.report(rows, args.tolerance, args.gradient_tolerance, args.verbose)


def main(argv=None) -> int:
  """Exit code: 0 done, 1 a `check` key out of tolerance, 2 unusable input (one line on stderr)."""
  args = _parser().parse_args(argv)
  if args.command == 'import':
    return _import_command(args)
  return _check_command(args)


if __name__ == '__main__':
  sys.exit(main())
