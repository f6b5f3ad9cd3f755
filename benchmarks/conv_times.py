r"""Where the CPU iteration's convolutions spend their time, one kind at a time.

  python benchmarks/conv_times.py --size 256 --batch 1 --ngf 64 [--top 20]

Compiles the training iteration, reads every convolution out of the optimised HLO
(forward, input-gradient and kernel-gradient forms as XLA rewrote them), times each
distinct one alone as a jitted `lax.conv_general_dilated`, and prints them by total time
with their GFLOP/s, next to the whole iteration's time.  Alone is not in place: XLA:CPU
runs independent operations of the iteration concurrently, so the sum can exceed what
removing a convolution would save; confirm a lead by timing the whole iteration.
"""
import argparse
import collections
import pathlib
import re
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import train_step  # noqa: E402  (benchmarks/train_step.py)

CONV = re.compile(r'^\s*(?:ROOT )?%[\w.\-]+ = \w+\[([\d,]*)\]\S* convolution\(%([\w.\-]+), '
                  r'%([\w.\-]+)\), window=\{([^}]*)\}, dim_labels=([^,\s]+)', re.M)
SHAPE = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = \w+\[([\d,]*)\]', re.M)
LABELS = str.maketrans('bf01io', 'NCHWIO')


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--size', type=int, default=256)
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--ngf', type=int, default=64)
  parser.add_argument('--top', type=int, default=20, help='rows to print')
  parser.add_argument('--reps', type=int, default=5)
  return parser.parse_args(argv)


def _dims(text):
  return tuple(int(v) for v in text.split(',') if v)


def _window(text):
  """HLO window attributes -> (strides, padding, lhs_dilation, rhs_dilation)."""
  fields = dict(item.split('=') for item in text.split())
  rank = len(fields['size'].split('x'))

  def ints(key):
    return tuple(int(v) for v in fields.get(key, 'x'.join(['1'] * rank)).split('x'))

  padding = [tuple(int(v) for v in pair.split('_'))
             for pair in fields.get('pad', 'x'.join(['0_0'] * rank)).split('x')]
  return ints('stride'), padding, ints('lhs_dilate'), ints('rhs_dilate')


def convolutions(hlo_text):
  """Counter of (lhs shape, rhs shape, output shape, window, dim_labels) -> occurrences."""
  shapes = dict(SHAPE.findall(hlo_text))
  found = collections.Counter()
  for out, lhs, rhs, window, labels in CONV.findall(hlo_text):
    found[(_dims(shapes[lhs]), _dims(shapes[rhs]), _dims(out), window, labels)] += 1
  return found


def time_alone(lhs_shape, rhs_shape, window, labels, reps):
  """Median milliseconds of this convolution alone, on random float32 operands."""
  lhs_spec, rest = labels.split('_')
  rhs_spec, out_spec = rest.split('->')
  numbers = tuple(spec.translate(LABELS) for spec in (lhs_spec, rhs_spec, out_spec))
  strides, padding, lhs_dilation, rhs_dilation = _window(window)
  conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
      x, w, strides, padding, lhs_dilation, rhs_dilation, dimension_numbers=numbers))
  keys = jax.random.split(jax.random.PRNGKey(0))
  x, w = (jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, (lhs_shape, rhs_shape)))
  return train_step.median_seconds(lambda: conv(x, w), reps) * 1e3


def _flops(lhs_shape, rhs_shape, out_shape, labels):
  """2 * output elements * kernel window * input features: every tap counted, the zeros
  of a dilated input too (so input-gradient forms of strided convolutions read high)."""
  rhs_spec = labels.split('_')[1].split('->')[0]
  window = np.prod([n for n, d in zip(rhs_shape, rhs_spec) if d in '01'])
  features_in = rhs_shape[rhs_spec.index('i')]
  return 2.0 * np.prod(out_shape) * window * features_in


def main(argv=None):
  args = parse_args(argv)
  trainer, state = train_step.init(args.size, args.ngf, 'float32')
  compiled, inputs, _, _ = train_step.compile_iteration(trainer, state, args.size, args.batch)
  _, times = train_step.time_iterations(compiled, state, inputs, 3)
  iteration_ms = statistics.median(times) * 1e3
  rows = []
  for (lhs, rhs, out, window, labels), count in convolutions(compiled.as_text()).items():
    ms = time_alone(lhs, rhs, window, labels, args.reps)
    rows.append((ms * count, count, ms, _flops(lhs, rhs, out, labels) / ms / 1e6, lhs, rhs,
                 out, window))
  rows.sort(reverse=True)
  total = sum(row[0] for row in rows)
  print(f'iteration {iteration_ms:.0f} ms; its {sum(r[1] for r in rows)} convolutions alone '
        f'{total:.0f} ms ({args.size} px, batch {args.batch}, ngf {args.ngf})')
  print(f"{'total ms':>9} {'n':>4} {'ms each':>8} {'GFLOP/s':>8}  lhs * rhs -> out  window")
  for total_ms, count, ms, gflops, lhs, rhs, out, window in rows[:args.top]:
    print(f'{total_ms:9.1f} {count:4d} {ms:8.2f} {gflops:8.0f}  {list(lhs)} * {list(rhs)} -> '
          f'{list(out)}  {window}')


if __name__ == '__main__':
  main()
