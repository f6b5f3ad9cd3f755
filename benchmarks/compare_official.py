r"""The official PyTorch code and aegan-jax, side by side on this machine, alternating.

  python benchmarks/compare_official.py --official ../shared/peer/official \
      --harness ../shared/peer/aegan_torch_bench.py [--configs 256:1:64,128:4:32,64:8:16]
      [--rounds 3] [--steps 5] [--threads 2] [--json out.json]

Each configuration (size:batch:ngf) compiles ours once, then alternates `--rounds` times:
the official training iteration (the harness in a subprocess, torch with --threads
threads) and ours (in this process), each timed over --steps iterations after warm-up.
Prints the median of the per-round medians and the ratio official / ours (above 1: ours
is faster).  torch is needed for the official code only; it is not a project requirement.
"""
import argparse
import json
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import train_step  # noqa: E402  (benchmarks/train_step.py)

from aegan_jax import host_memory  # noqa: E402  (on the path train_step puts it on)


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--official', type=pathlib.Path, required=True)
  parser.add_argument('--harness', type=pathlib.Path, required=True)
  parser.add_argument('--configs', default='256:1:64,128:4:32,64:8:16')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--threads', type=int, default=2)
  parser.add_argument('--json', type=pathlib.Path)
  return parser.parse_args(argv)


class HarnessError(RuntimeError):
  """The official harness failed; the message ends with its output."""


def run_harness(harness, official, *, size, batch, ngf, steps, warmup, extra=(), timeout=None):
  """One timing run of the official code (`--mode bench --no-flops`); returns its JSON."""
  with tempfile.TemporaryDirectory() as tmp:
    out = pathlib.Path(tmp) / 'official.json'
    command = [sys.executable, str(harness), '--official', str(official), '--mode', 'bench',
               '--size', str(size), '--batch', str(batch), '--ngf', str(ngf),
               '--steps', str(steps), '--warmup', str(warmup), '--no-flops', '--json', str(out),
               *extra]
    try:
      done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as error:
      raise HarnessError(f'timed out after {timeout} s: {error.stderr or ""}'[-2000:]) from None
    if done.returncode != 0 or not out.exists():
      raise HarnessError(f'rc {done.returncode}: {(done.stdout + done.stderr)[-2000:]}')
    return json.loads(out.read_text())


def official_seconds(args, size, batch, ngf):
  """Median seconds per official iteration, from one harness run."""
  try:
    result = run_harness(args.harness, args.official, size=size, batch=batch, ngf=ngf,
                         steps=args.steps, warmup=2, extra=('--threads', str(args.threads)))
  except HarnessError as error:
    sys.exit(f'error: the official harness failed: {error}')
  return result['median_s']


def compare(args, size, batch, ngf):
  trainer, state = train_step.init(size, ngf, 'float32')
  compiled, inputs, _, _ = train_step.compile_iteration(trainer, state, size, batch)
  official, ours = [], []
  for round_index in range(args.rounds):
    official.append(official_seconds(args, size, batch, ngf))
    state, times = train_step.time_iterations(compiled, state, inputs, args.steps)
    ours.append(statistics.median(times))
    print(f'  {size} px, batch {batch}, ngf {ngf}, round {round_index + 1}: official '
          f'{official[-1]:.3f} s, ours {ours[-1]:.3f} s', flush=True)
  return {'size': size, 'batch': batch, 'ngf': ngf, 'official_s': statistics.median(official),
          'ours_s': statistics.median(ours), 'official_rounds': official, 'ours_rounds': ours}


def main(argv=None):
  args = parse_args(argv)
  host_memory.keep_freed_memory()  # as launch.py does; the torch subprocess is untouched
  machine = f'{platform.processor() or platform.machine()}, {args.threads} torch threads'
  print(f'{time.strftime("%Y-%m-%d")}, {_cpu_name()}, {machine}')
  rows = []
  for spec in args.configs.split(','):
    size, batch, ngf = (int(v) for v in spec.split(':'))
    rows.append(compare(args, size, batch, ngf))
  print('| configuration | official | aegan-jax | ratio |\n|---|---:|---:|---:|')
  for r in rows:
    print(f"| {r['size']} px, batch {r['batch']}, ngf {r['ngf']} | {r['official_s']:.2f} s | "
          f"{r['ours_s']:.2f} s | {r['official_s'] / r['ours_s']:.2f}x |")
  if args.json:
    args.json.write_text(json.dumps({'cpu': _cpu_name(), 'rows': rows}, indent=1))


def _cpu_name():
  try:
    for line in pathlib.Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith('model name'):
        return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown CPU'


if __name__ == '__main__':
  main()
