r"""One GPU, one call: the official PyTorch code and aegan-jax side by side, and utilisation.

  python benchmarks/gpu_side_by_side.py --harness ../shared/peer/aegan_torch_bench.py \
      --official ../shared/peer/official --out results/ [--budget-s 420]

In this order, each part skipped once --budget-s is spent (the table says which):
the GPU and package versions; the official training iteration (harness, --device cuda) at
256 px, ngf 64, batch 1, 8 and 16; an 8192^3 bfloat16 matmul as the practical peak; ours in
float32 and bfloat16 compute at batch 1, 8, 16 and larger until memory runs out; a profiler
trace of our fastest bfloat16 configuration (top ops by GPU time); the input pipeline
(benchmarks/input_pipeline.py, 0, 4 and 8 Grain workers); `convolution.reflect_pad` against
`jnp.pad(mode='reflect')` alone, forward and backward, at the ResNet-block shape.  Writes results.json, table.md
and the trace under --out, after every part, so a cut-off run still leaves its figures.
"""
import argparse
import collections
import gzip
import json
import re
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import compare_official  # noqa: E402  (benchmarks/compare_official.py)
import train_step  # noqa: E402  (benchmarks/train_step.py)

SIZE, NGF = 256, 64
OFFICIAL_BATCHES = (1, 8, 16)
# (dtype, batch) in order of importance: the acceptance figures first.
OURS = (('float32', 1), ('bfloat16', 16), ('float32', 16), ('bfloat16', 64), ('bfloat16', 1),
        ('bfloat16', 8), ('float32', 8), ('float32', 64), ('bfloat16', 32), ('bfloat16', 128),
        ('float32', 32))


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--harness', type=pathlib.Path, help='aegan_torch_bench.py (with --official)')
  parser.add_argument('--official', type=pathlib.Path, help='the official code; none: ours only')
  parser.add_argument('--ours', default=','.join(f'{d}:{b}' for d, b in OURS),
                      help='dtype:batch pairs, most important first')
  parser.add_argument('--prepared', type=pathlib.Path,
                      help='a prepared dataset for the input-pipeline part (else a phantom)')
  parser.add_argument('--no-profile', dest='profile', action='store_false')
  parser.add_argument('--no-input-pipeline', dest='input_pipeline', action='store_false')
  parser.add_argument('--out', type=pathlib.Path, required=True)
  parser.add_argument('--budget-s', type=float, default=420)
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--size', type=int, default=SIZE, help='smaller only to try the script')
  parser.add_argument('--ngf', type=int, default=NGF, help='smaller only to try the script')
  parser.add_argument('--device', default='cuda', help='the harness device (cpu to try it)')
  return parser.parse_args(argv)


def _run(cmd, timeout):
  """Runs a command; returns (returncode or 'timeout', stdout + stderr)."""
  try:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    return done.returncode, done.stdout + done.stderr
  except subprocess.TimeoutExpired as error:
    return 'timeout', f'{error.stdout or ""}{error.stderr or ""}'
  except OSError as error:
    return 'missing', str(error)


def environment():
  import jax  # noqa: PLC0415  (after the official runs: jax takes most GPU memory)
  versions = {'python': sys.version.split()[0], 'jax': jax.__version__}
  for name in ('jaxlib', 'flax', 'optax', 'numpy', 'torch'):
    rc, text = _run([sys.executable, '-c', f'import {name}; print({name}.__version__)'], 60)
    versions[name] = text.strip().splitlines()[-1] if rc == 0 and text.strip() else None
  rc, text = _run(['nvidia-smi', '--query-gpu=name,driver_version,memory.total,clocks.max.sm',
                   '--format=csv,noheader'], 30)
  versions['nvidia_smi'] = text.strip() if rc == 0 else None
  versions['jax_device'] = str(jax.devices()[0].device_kind)
  return versions


def official(args, batch, steps):
  try:
    result = compare_official.run_harness(
        args.harness, args.official, size=args.size, batch=batch, ngf=args.ngf, steps=steps,
        warmup=5, extra=('--device', args.device), timeout=240)
  except compare_official.HarnessError as error:
    return {'batch': batch, 'error': str(error)}
  return {'batch': batch, 'raw': result, 'median_s': result['median_s'],
          'slices_per_s': result['slices_per_s'], 'device': result.get('device'),
          'torch': result.get('torch'), 'cudnn_benchmark': result.get('cudnn_benchmark'),
          'cudnn_allow_tf32': result.get('cudnn_allow_tf32')}


def matmul_peak(n=8192, reps=10):
  """bfloat16 n^3 matmul TFLOP/s on random data (median of reps after 3 warm-ups)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  a, b = (jax.random.normal(k, (n, n), jnp.bfloat16) for k in keys)
  product = jax.jit(jnp.matmul)
  return 2 * n**3 / train_step.median_seconds(lambda: product(a, b), reps, warmup=3) / 1e12


class Ours:
  """Our iteration per (dtype, batch); one fresh state per dtype, copied for each batch."""

  def __init__(self, size, ngf):
    self.size, self.ngf, self.states, self.kept = size, ngf, {}, {}

  def measure(self, dtype, batch, steps):
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    if dtype not in self.states:
      self.states[dtype] = train_step.init(self.size, self.ngf, dtype)
    trainer, state = self.states[dtype]
    state = jax.tree.map(jnp.copy, state)  # the step donates its state
    compiled, inputs, compile_s, flops = train_step.compile_iteration(
        trainer, state, self.size, batch)
    state, times = train_step.time_iterations(compiled, state, inputs, steps)
    self.kept[(dtype, batch)] = (compiled, state, inputs)
    median = statistics.median(times)
    return {'dtype': dtype, 'batch': batch, 'compile_s': compile_s, 'median_s': median,
            'min_s': min(times), 'max_s': max(times), 'slices_per_s': batch / median,
            'flops_per_iter': flops, 'tflops_per_s': flops / median / 1e12}


def _source_of(hlo_text):
  """HLO instruction name -> the JAX source op that made it, as 'module/op' (digits as N)."""
  sources = {}
  for match in re.finditer(r'^\s*(?:ROOT )?%([\w.\-]+) = .*?op_name="([^"]*)"', hlo_text, re.M):
    tail = '/'.join(match.group(2).split('/')[-2:])
    sources.setdefault(match.group(1), re.sub(r'\d+', 'N', tail))
  return sources


def top_ops(xplane, hlo_text='', count=10):
  """GPU time per kernel, per HLO op and per source op from a profiler XSpace file."""
  from jax.profiler import ProfileData  # noqa: PLC0415
  counters = collections.defaultdict(collections.Counter)
  sources, total = _source_of(hlo_text), 0.0
  planes = list(ProfileData.from_file(str(xplane)).planes)
  gpu = [plane for plane in planes if plane.name.startswith('/device:GPU')]
  for plane in gpu or planes:  # no GPU plane: the CPU's XLA ops (to try the script)
    for line in plane.lines:
      if gpu and not line.name.startswith('Stream'):
        continue  # the 'XLA Ops' and 'XLA Modules' lines repeat the kernels' time
      for event in line.events:
        stats = dict(event.stats)
        if 'hlo_op' not in stats and not gpu:
          continue
        op = str(stats.get('hlo_op', event.name))
        counters['by_kernel'][event.name] += event.duration_ns
        counters['by_hlo_op'][op] += event.duration_ns
        counters['by_source'][sources.get(op, '?')] += event.duration_ns
        total += event.duration_ns
  result = {'gpu_ms_total': total / 1e6}
  for key, counter in counters.items():
    result[key] = [(name, ns / 1e6, ns / total) for name, ns in counter.most_common(count)]
  return result


def profile(ours, key, out, steps=5):
  import jax  # noqa: PLC0415
  compiled, state, inputs = ours.kept[key]
  hlo_text = compiled.as_text()
  with gzip.open(out / 'hlo.txt.gz', 'wt') as hlo:
    hlo.write(hlo_text)
  trace_dir = pathlib.Path(tempfile.mkdtemp())
  with jax.profiler.trace(str(trace_dir)):
    for _ in range(steps):
      state, metrics = compiled(state, inputs)
    jax.block_until_ready(metrics)
  xplane = next(trace_dir.rglob('*.xplane.pb'))
  with open(xplane, 'rb') as source, gzip.open(out / 'trace.xplane.pb.gz', 'wb') as target:
    shutil.copyfileobj(source, target)
  result = top_ops(xplane, hlo_text)
  result.update(dtype=key[0], batch=key[1], steps=steps)
  return result


def reflect_pads(batch=64, size=64, channels=256, reps=20):
  """ms per forward+backward of a ResNet-block reflect pad: ours and jnp.pad's."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from aegan_jax.kernels import convolution  # noqa: PLC0415
  x = jax.random.normal(jax.random.PRNGKey(0), (batch, size, size, channels), jnp.bfloat16)
  forms = {'convolution.reflect_pad': lambda v: convolution.reflect_pad(v, 1),
           'jnp.pad_reflect': lambda v: jnp.pad(v, ((0, 0), (1, 1), (1, 1), (0, 0)), 'reflect')}
  result = {'shape': list(x.shape), 'dtype': 'bfloat16'}
  for name, pad in forms.items():
    def forward_backward(v, pad=pad):
      padded, backward = jax.vjp(pad, v)
      return backward(padded)[0]
    step = jax.jit(forward_backward)
    result[name + '_ms'] = train_step.median_seconds(lambda step=step: step(x), reps) * 1e3
  return result


def input_pipeline(out, prepared):
  script = pathlib.Path(__file__).resolve().parent / 'input_pipeline.py'
  source = ['--prepared', str(prepared)] if prepared else ['--subjects', '4']
  rc, text = _run([sys.executable, str(script), *source, '--workers', '0,4,8',
                   '--batch-size', '32', '--batches', '20'], 240)
  (out / 'input_pipeline.txt').write_text(text)
  return {'rc': rc, 'lines': [line for line in text.splitlines() if 'slices/s' in line]}


def table(results):
  """The README's side-by-side table, in Markdown."""
  rows = ['| code | compute | batch | s/iteration | slices/s | TFLOP/s | of bf16 peak |',
          '|---|---|---:|---:|---:|---:|---:|']
  for run in results.get('official', []):
    if 'error' not in run:
      rows.append(f"| official PyTorch | float32 (cuDNN TF32 {run['cudnn_allow_tf32']}) | "
                  f"{run['batch']} | {run['median_s']:.4f} | {run['slices_per_s']:.1f} | | |")
  peak = results.get('matmul_bf16_tflops')
  for run in results.get('ours', []):
    if 'error' not in run:
      mfu = f"{run['tflops_per_s'] / peak:.1%}" if peak else ''
      rows.append(f"| aegan-jax | {run['dtype']} | {run['batch']} | {run['median_s']:.4f} | "
                  f"{run['slices_per_s']:.1f} | {run['tflops_per_s']:.1f} | {mfu} |")
  official = [r['slices_per_s'] for r in results.get('official', []) if 'error' not in r]
  ours = {r['dtype']: r for r in results.get('ours', []) if 'error' not in r and r['batch'] == 1}
  best_bf16 = [r['slices_per_s'] for r in results.get('ours', [])
               if 'error' not in r and r['dtype'] == 'bfloat16']
  if official and best_bf16:
    rows.append(f"\nbest bfloat16 / best official: {max(best_bf16) / max(official):.2f}x")
  b1 = [r for r in results.get('official', []) if r.get('batch') == 1 and 'error' not in r]
  if b1 and 'float32' in ours:
    rows.append(f"batch 1 float32, ours / official: "
                f"{ours['float32']['slices_per_s'] / b1[0]['slices_per_s']:.2f}x")
  return '\n'.join(rows) + '\n'


def save(results, out):
  (out / 'results.json').write_text(json.dumps(results, indent=1))
  (out / 'table.md').write_text(table(results))


def run_ours(ours, plan, results, args, deadline):
  """Measures the (dtype, batch) pairs of plan while time is left; stops a dtype at its OOM."""
  failed = results.setdefault('failed_batch', {})
  for dtype, batch in plan:
    if time.monotonic() > deadline:
      results.setdefault('skipped', []).append(f'ours {dtype} b{batch}')
      continue
    if batch >= failed.get(dtype, float('inf')):
      continue
    try:
      run = ours.measure(dtype, batch, args.steps)
    except Exception as error:  # noqa: BLE001  (out of memory ends the dtype's sweep)
      run = {'dtype': dtype, 'batch': batch, 'error': str(error)[:500]}
      failed[dtype] = batch
    results.setdefault('ours', []).append(run)
    print('ours', json.dumps(run), flush=True)
    save(results, args.out)


def main(argv=None):
  args = parse_args(argv)
  args.out.mkdir(parents=True, exist_ok=True)
  start = time.monotonic()
  deadline = lambda reserve: start + args.budget_s - reserve  # noqa: E731
  results = {'size': args.size, 'ngf': args.ngf}
  for batch in OFFICIAL_BATCHES if args.official else ():
    results.setdefault('official', []).append(official(args, batch, args.steps))
    print('official', json.dumps(results['official'][-1])[:600], flush=True)
  results['versions'] = environment()
  results['matmul_bf16_tflops'] = matmul_peak()
  print('versions', results['versions'], 'matmul', results['matmul_bf16_tflops'], flush=True)
  save(results, args.out)
  plan = [(d, int(b)) for d, b in (pair.split(':') for pair in args.ours.split(','))]
  ours = Ours(args.size, args.ngf)
  run_ours(ours, plan[:4], results, args, deadline(150))
  measured = [r for r in results.get('ours', []) if 'error' not in r and r['dtype'] == 'bfloat16']
  if measured and args.profile:
    best = max(measured, key=lambda r: r['slices_per_s'])
    try:
      results['profile'] = profile(ours, (best['dtype'], best['batch']), args.out)
    except Exception as error:  # noqa: BLE001
      results['profile'] = {'error': str(error)[:500]}
    save(results, args.out)
  if args.input_pipeline:
    results['input_pipeline'] = input_pipeline(args.out, args.prepared)
    save(results, args.out)
  try:
    results['reflect_pad'] = reflect_pads()
  except Exception as error:  # noqa: BLE001
    results['reflect_pad'] = {'error': str(error)[:500]}
  print('reflect pad', results['reflect_pad'], flush=True)
  save(results, args.out)
  run_ours(ours, plan[4:], results, args, deadline(40))
  save(results, args.out)
  print(table(results))
  print(json.dumps(results.get('profile', {}), indent=1)[:3000])
  print('input pipeline:', *results.get('input_pipeline', {}).get('lines', []), sep='\n  ')


if __name__ == '__main__':
  main()
