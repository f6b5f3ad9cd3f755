r"""Times one AE-GAN training iteration (both networks, both optimizers).

  python benchmarks/train_step.py --size 256 --batch 1 --ngf 64 --steps 5 [--json out.json]

Prints compile time, median seconds per iteration (min-max), slices/s, FLOPs per
iteration from XLA's cost analysis, GFLOP/s and peak RSS.  Against the official
code, time both on the same machine in one run: benchmarks/compare_official.py.
"""
import argparse
import functools
import json
import pathlib
import resource
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from aegan_jax import host_memory  # noqa: E402
from aegan_jax import modalities  # noqa: E402
from aegan_jax import train  # noqa: E402
from configs import brats  # noqa: E402

def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--size', type=int, default=256)
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--ngf', type=int, default=64)
  parser.add_argument('--steps', type=int, default=5, help='timed iterations after compiling')
  parser.add_argument('--dtype', default='float32', help='compute dtype (float32 | bfloat16)')
  parser.add_argument('--generator', default='official', help='official | any (any-set)')
  parser.add_argument('--norm', default='batch', help='batch (official) | instance')
  parser.add_argument('--json', type=pathlib.Path, help='also write the figures here')
  return parser.parse_args(argv)


def make_batch(size, batch):
  """Random slices; targets cycle over the modalities, with every other one as input."""
  rng = np.random.default_rng(0)
  images = np.tanh(rng.normal(size=(batch, size, size, 4))).astype(np.float32)
  targets = np.arange(batch) % 4
  return {'images': images, 'target_index': targets,
          'available': modalities.all_but_target(targets, 4)}


def init(size, ngf, dtype, generator='official', norm='batch'):
  """Returns (trainer, fresh state) for the official configuration at this size."""
  config = brats.get_config()
  config.model.ngf = ngf
  config.model.dtype = dtype
  config.model.generator = generator
  config.model.norm = norm
  trainer = train.make_trainer(config, 4)
  return trainer, train.init_state(trainer, jax.random.PRNGKey(0), size)


def compile_iteration(trainer, state, size, batch):
  """Returns (compiled step, batch on device, compile seconds, FLOPs per iteration)."""
  inputs = jax.device_put(make_batch(size, batch))
  step = jax.jit(functools.partial(train.train_step, trainer=trainer), donate_argnums=0)
  start = time.perf_counter()
  lowered = step.lower(state, inputs)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  return compiled, inputs, compile_s, _flops(step, state, inputs)


def _flops(step, state, inputs):
  """FLOPs of the program lowered for the CPU: the same HLO on every backend, whereas
  the GPU's analysis gives none (its convolutions are library calls)."""
  try:
    lowered = step.trace(state, inputs).lower(lowering_platforms=('cpu',))
    cost = lowered.cost_analysis()
  except Exception:  # noqa: BLE001  (a figure to print, not a result to trust blindly)
    return float('nan')
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', float('nan'))) if cost else float('nan')


def time_iterations(compiled, state, inputs, steps):
  """Runs one warm-up and `steps` timed iterations; returns (state, seconds per iteration)."""
  state, metrics = compiled(state, inputs)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, inputs)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return state, times


def median_seconds(call, reps, warmup=1):
  """Median wall time of `call()` (its result blocked on) over `reps`, after `warmup` calls."""
  for _ in range(warmup):
    jax.block_until_ready(call())
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def measure(size, batch, ngf, dtype, steps, generator='official', norm='batch'):
  """Compiles and times one configuration; returns the figures as a dict."""
  trainer, state = init(size, ngf, dtype, generator, norm)
  compiled, inputs, compile_s, flops = compile_iteration(trainer, state, size, batch)
  _, times = time_iterations(compiled, state, inputs, steps)
  median = statistics.median(times)
  return {
      'device': str(jax.devices()[0].device_kind), 'num_devices': jax.device_count(),
      'size': size, 'batch': batch, 'ngf': ngf, 'dtype': dtype, 'generator': generator,
      'norm': norm,
      'compile_s': compile_s, 'median_s_per_iter': median, 'min_s_per_iter': min(times),
      'max_s_per_iter': max(times), 'slices_per_s': batch / median,
      'flops_per_iter': flops, 'gflops_per_s': flops / median / 1e9,
      'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
  }


def main(argv=None):
  args = parse_args(argv)
  host_memory.keep_freed_memory()  # as launch.py does
  results = measure(args.size, args.batch, args.ngf, args.dtype, args.steps, args.generator,
                    args.norm)
  median, flops, compile_s = (results['median_s_per_iter'], results['flops_per_iter'],
                              results['compile_s'])
  print(f"device            {results['device']} x{results['num_devices']}")
  print(f"config            {args.size}x{args.size}, batch {args.batch}, ngf {args.ngf}, "
        f"{args.dtype}, {args.generator} generator, {args.norm} norm")
  print(f"compile           {compile_s:.1f} s")
  print(f"s/iteration       median {median:.3f} (min {results['min_s_per_iter']:.3f}, max {results['max_s_per_iter']:.3f}) "
        f"over {args.steps}")
  print(f"slices/s          {results['slices_per_s']:.2f}")
  print(f"FLOPs/iteration   {flops / 1e12:.3f} TFLOP (XLA cost analysis)")
  print(f"throughput        {results['gflops_per_s']:.1f} GFLOP/s")
  print(f"peak RSS          {results['peak_rss_mb']:.0f} MB")
  if args.json:
    args.json.write_text(json.dumps(results, indent=2))


if __name__ == '__main__':
  main()
