r"""Seconds to synthesise one missing modality of a whole volume (NIfTI in, NIfTI out).

  python benchmarks/synthesize.py [--shape 240,240,155] [--size 256] [--ngf 64] \
      [--num-blocks 6] [--batch-size 32] [--volumes 3] [--workdir DIR] [--json out.json]

Writes a phantom case (BraTS 2020 layout, FLAIR removed) to a temporary folder
and runs the synthesis path of `python -m aegan_jax.synthesize` on it: read,
normalise, slice every axial plane, generator on all devices, back onto the
original grid, write.  The generator is random-init (`--ngf`, `--num-blocks`,
`--size`) unless `--workdir` names a checkpoint.  The first volume includes
compilation and is reported apart; then the median over `--volumes`, and the
generator alone on every slice (slices per second; the CLI skips slices with
no brain in any input), and the throughput of a
run over several cases (the CLI prepares the next case meanwhile).  Runs on whatever JAX device exists.
"""
import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from aegan_jax import host_memory  # noqa: E402
from aegan_jax import inference  # noqa: E402
from aegan_jax import models  # noqa: E402
from aegan_jax import synthesize  # noqa: E402
from configs import brats  # noqa: E402
from data_prep import layouts  # noqa: E402
from data_prep import phantom  # noqa: E402


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--shape', default='240,240,155', help='phantom X,Y,Z')
  parser.add_argument('--size', type=int, default=256, help='model image size')
  parser.add_argument('--ngf', type=int, default=64)
  parser.add_argument('--num-blocks', type=int, default=6)
  parser.add_argument('--batch-size', type=int, default=32)
  parser.add_argument('--volumes', type=int, default=3, help='timed volumes after the first')
  parser.add_argument('--dtype', default='float32', help='compute dtype (float32 | bfloat16)')
  parser.add_argument('--workdir', type=pathlib.Path, help='use this checkpoint instead')
  parser.add_argument('--json', type=pathlib.Path, help='also write the figures here')
  args = parser.parse_args(argv)
  if args.volumes < 1:
    parser.error('--volumes must be at least 1')
  return args


def make_synthesizer(args):
  if args.workdir:
    return inference.Synthesizer.restore(args.workdir, batch_size=args.batch_size)
  config = brats.get_config()
  config.data.image_size = args.size
  config.model.ngf, config.model.num_blocks = args.ngf, args.num_blocks
  config.model.dtype = args.dtype
  generator, _ = models.build_networks(config.model, 4)
  variables = jax.jit(lambda: generator.init(
      {'params': jax.random.PRNGKey(0)}, np.zeros((1, args.size, args.size, 15)),
      train=False))()
  return inference.Synthesizer(generator, variables, config, batch_size=args.batch_size)


def main(argv=None):
  args = parse_args(argv)
  host_memory.keep_freed_memory()  # as the synthesis command does
  shape = tuple(int(s) for s in args.shape.split(','))
  synthesizer = make_synthesizer(args)
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    folder = phantom.write_subject(tmp / 'raw', 0, seed=0, shape=shape)
    (folder / f'{folder.name}_flair.nii.gz').unlink()
    jobs = synthesize.plan_jobs(layouts.find_cases(folder), synthesizer.config.data)
    seconds = []
    for _ in range(args.volumes + 1):
      start = time.perf_counter()
      synthesize.synthesize_case(synthesizer, jobs[0], tmp / 'out')
      seconds.append(time.perf_counter() - start)
    # Several cases as the CLI runs them: the next one is read and preprocessed meanwhile.
    start = time.perf_counter()
    for job, inputs in synthesize.prefetched(jobs * args.volumes, synthesizer.config.data):
      synthesize.synthesize_case(synthesizer, job, tmp / 'out', inputs=inputs)
    pipelined = (time.perf_counter() - start) / args.volumes
    inputs = synthesize.read_case_inputs(jobs[0], synthesizer.config.data)
    images = inputs.images
    brain_slices = int(synthesize.brain_mask(inputs.volumes).any(axis=(0, 1)).sum())
    generator_seconds = []
    for _ in range(max(args.volumes, 1)):
      start = time.perf_counter()
      synthesizer(images, 3)
      generator_seconds.append(time.perf_counter() - start)
  steady = statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]
  generator = statistics.median(generator_seconds)
  figures = {
      'device': str(jax.devices()[0].device_kind), 'num_devices': jax.device_count(),
      'shape': shape, 'image_size': synthesizer.config.data.image_size,
      'ngf': synthesizer.config.model.ngf, 'num_blocks': synthesizer.config.model.num_blocks,
      'dtype': synthesizer.config.model.dtype, 'batch_size': synthesizer.batch_size,
      'first_volume_s': seconds[0], 'seconds_per_volume': steady,
      'pipelined_seconds_per_volume': pipelined,
      'generator_s_per_volume': generator, 'generator_slices_per_s': shape[2] / generator,
      'brain_slices': brain_slices,
  }
  generator_share = generator * brain_slices / shape[2]  # Slices without brain are skipped.
  print(f'{figures["device"]} x{figures["num_devices"]}: {shape} volume, '
        f'{figures["image_size"]} px, ngf {figures["ngf"]}, {figures["num_blocks"]} blocks, '
        f'{figures["dtype"]}, batch {figures["batch_size"]}')
  print(f'first volume (with compilation): {seconds[0]:.2f} s')
  print(f'seconds per volume: {steady:.2f} (median of {len(seconds) - 1}; '
        f'generator alone {generator:.2f} s for all {shape[2]} slices = '
        f'{figures["generator_slices_per_s"]:.1f} slices/s; {brain_slices} slices hold brain, '
        f'the rest skip it; reading/preprocessing/writing ~{steady - generator_share:.2f} s)')
  print(f'seconds per volume over {args.volumes} cases with the next case prefetched: '
        f'{pipelined:.2f}')
  if args.json:
    args.json.write_text(json.dumps(figures, indent=1))
  return figures


if __name__ == '__main__':
  main()
