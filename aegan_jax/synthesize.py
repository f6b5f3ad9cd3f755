r"""Synthesises missing MRI modalities with a trained (or imported) generator.

  python -m aegan_jax.synthesize --workdir DIR [--step N] --input CASE_OR_PARENT \
      --output OUT [--target MOD | --all-targets] [--naming case|brasyn] [--batch-size B]

Each case (any layout `data_prep.layouts.find_cases` knows) must miss exactly
one modality, found automatically, unless `--target` names it or
`--all-targets` synthesises every modality of complete cases from the other
ones.  Every axial slice is preprocessed as in training (the checkpoint's
stored config: normalisation, geometry, image size), synthesised in batches on
all devices, and put back on the input grid:

  * intensities: the missing modality has no scale of its own (its maximum or
    percentiles are unknown), so the tanh output y in [-1, 1] is written as
    (y + 1) / 2 * 1000 (`--intensity-scale`), arbitrary units in [0, 1000];
  * zero outside the brain mask (voxels non-zero in any input modality);
  * affine and header copied from an input modality, data type float32.

Output: `OUT/<case>/<name in the case's convention>` (`--naming case`) or the
flat BraSyn form `OUT/<case>-<t1n|t1c|t2w|t2f>.nii.gz` (`--naming brasyn`).
Files are written to a temporary name and renamed, so none is half written.
Problems print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import math
import os
import pathlib
import sys
import tempfile
import time

import nibabel as nib
import numpy as np

from aegan_jax import checkpoints
from aegan_jax import host_memory
from aegan_jax import inference
from aegan_jax import models
from data_prep import files
from data_prep import layouts
from data_prep import nifti
from data_prep import preprocess
from data_prep.errors import DataError

INTENSITY_SCALE = 1000.0


class SynthesisError(ValueError):
  """A bad input or request (one-line message)."""


# --------------------------------------------------------------------------
# Cases: what to synthesise, reading, pre- and postprocessing.


def choose_targets(case, modalities, *, target=None, all_targets=False,
                   any_set=False) -> list[str]:
  """The modalities to synthesise for `case`; raises SynthesisError if impossible.

  `any_set` (a generator for any set of inputs): every missing modality, from
  whichever are present.  Otherwise the official scenario: one missing modality.
  """
  missing = [m for m in modalities if m not in case.files]
  where = case.directory if case.layout != 'modality_first' else case.subject_id
  if any_set and len(missing) == len(modalities):
    raise SynthesisError(f'{where}: none of {list(modalities)} is present; at least one '
                         'input is needed')
  if any_set and target is not None and set(missing) | {target} == set(modalities):
    raise SynthesisError(f'{where}: with --target {target} no other modality is present; '
                         'at least one input is needed')
  if all_targets:
    if missing:
      raise SynthesisError(f'{where}: --all-targets needs complete cases, but {missing} '
                           'is missing')
    return list(modalities)
  if target is not None:
    if target not in modalities:
      raise SynthesisError(f'--target {target!r} is not one of {list(modalities)}')
    others = [m for m in missing if m != target]
    if others and not any_set:
      raise SynthesisError(f'{where}: missing {others} besides the target {target}; '
                           'every other modality is needed')
    return [target]
  if not missing:
    raise SynthesisError(f'{where}: nothing is missing (all of {list(modalities)} present); '
                         'pass --target MOD or --all-targets')
  if len(missing) > 1 and not any_set:
    raise SynthesisError(f'{where}: {len(missing)} modalities are missing ({missing}); '
                         'AE-GAN synthesises one from the others (a model trained with '
                         "--config.model.generator=any fills any number)")
  return missing


def preprocess_inputs(volumes, modalities, data_config) -> np.ndarray:
  """Input volumes {modality: [X, Y, Z]} -> [Z, S, S, M] normalised slices, all axial planes.

  Modalities without a volume (the targets) hold the background value; the
  generator never reads the target channel.  Modalities run in parallel threads
  (numpy releases the GIL in the resize).
  """
  shape = next(iter(volumes.values())).shape
  size, fill = data_config.image_size, preprocess.background_value(data_config.normalise)
  images = np.full((shape[2], size, size, len(modalities)), fill, np.float32)

  def one(modality):
    normed, _ = preprocess.normalise_volume(volumes[modality], data_config.normalise)
    images[..., modalities.index(modality)] = preprocess.volume_to_slices(
        normed, range(shape[2]), data_config.geometry, size, fill)

  with concurrent.futures.ThreadPoolExecutor(len(volumes)) as pool:
    list(pool.map(one, volumes))
  return images


def brain_mask(volumes, exclude=()) -> np.ndarray:
  """Voxels non-zero in any input volume (skull-stripped data has an exact-zero background)."""
  mask = None
  for modality, volume in volumes.items():
    if modality not in exclude:
      mask = volume != 0 if mask is None else np.logical_or(mask, volume != 0, out=mask)
  return mask


def postprocess(synthesised, brain, data_config, scale=INTENSITY_SCALE) -> np.ndarray:
  """[Z, S, S] tanh slices -> [X, Y, Z] volume in [0, scale], zero outside `brain`."""
  volume = preprocess.slices_to_volume(synthesised, brain.shape, range(brain.shape[2]),
                                       data_config.geometry, fill=-1.0).astype(np.float32)
  # In place: these volumes are large (36 MB at 240x240x155) and the host side dominates.
  volume += 1
  volume *= scale / 2
  np.clip(volume, 0, scale, out=volume)
  volume[~brain] = 0
  return volume


def output_path(case, target, out_dir, naming) -> pathlib.Path:
  out_dir = pathlib.Path(out_dir)
  if naming == 'brasyn':
    if target not in layouts.BRATS_MODALITIES:
      raise SynthesisError(f'--naming brasyn: no BraSyn name for modality {target!r}')
    # BraSyn names the BraTS 2023 way, flat: <case>-<t1n|t1c|t2w|t2f>.nii.gz.
    return out_dir / layouts.brats_file_name('brats2023', case.subject_id, target)
  name = case.filename_for(target)
  if not name.endswith(('.nii', '.nii.gz')):
    name += '.nii.gz'
  return out_dir / case.subject_id / name


def write_nifti(volume, reference, path) -> None:
  """Writes float32 `volume` with `reference`'s affine and header, atomically."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  header = reference.header.copy()
  header.set_data_dtype(np.float32)
  header.set_slope_inter(None, None)  # Input scaling (e.g. int16 slopes) does not apply.
  header['cal_min'], header['cal_max'] = 0, 0
  image = nib.Nifti1Image(volume.astype(np.float32), reference.affine, header)
  suffix = '.nii.gz' if path.name.endswith('.gz') else '.nii'
  fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.partial-', suffix=suffix, dir=path.parent)
  os.close(fd)
  try:
    nib.save(image, tmp)
    os.chmod(tmp, 0o666 & ~files.current_umask())  # mkstemp makes 0600; the usual mode
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def check_output_folder(input_path, out_dir) -> None:
  """Before the checkpoint is restored: --output is a folder outside the inputs that can
  be made and written (nothing is created yet)."""
  out_dir = pathlib.Path(out_dir)
  if out_dir.exists() and not out_dir.is_dir():
    raise SynthesisError(f'--output {out_dir} is a file; give a folder')
  if layouts.paths_overlap(input_path, out_dir):
    raise SynthesisError(f'--output {out_dir} overlaps --input {input_path}: choose a folder '
                         'outside the inputs (synthesis never writes among acquired scans)')
  try:
    files.check_writable(out_dir)
  except OSError as e:
    raise SynthesisError(f'--output {out_dir}: cannot write there ({e.strerror or e})') from None


def check_intensity_scale(scale: float) -> None:
  if not (math.isfinite(scale) and scale > 0):
    raise SynthesisError(f'--intensity-scale {scale}: must be a positive finite number')


def check_output_files(jobs, out_dir, naming, overwrite: bool) -> None:
  """Before any work: no output may be an input file, nor replace a file unless --overwrite."""
  inputs = {pathlib.Path(f).resolve() for job in jobs for f in job.case.files.values()}
  for job in jobs:
    for target in job.targets:
      path = output_path(job.case, target, out_dir, naming)
      if path.resolve() in inputs:
        raise SynthesisError(f'{path} is an input scan; it is never replaced')
      if path.exists() and not overwrite:
        raise SynthesisError(f'{path} exists; pass --overwrite to replace it')


@dataclasses.dataclass
class Job:
  case: object
  targets: list[str]
  inputs: list[str]   # modalities read (every present one with --all-targets)
  reference: object   # nibabel image whose header and affine are copied
  shape: tuple


def plan_jobs(cases, data_config, *, target=None, all_targets=False,
              any_set=False) -> list[Job]:
  """Checks every case (modalities, headers, size) before anything is synthesised."""
  modalities = tuple(data_config.modalities)
  jobs = []
  for case in cases:
    if tuple(case.modalities) != tuple(modalities):
      raise SynthesisError(f'{case.directory}: a {case.dataset} case, but the model was '
                           f'trained on {list(modalities)}')
    targets = choose_targets(case, modalities, target=target, all_targets=all_targets,
                             any_set=any_set)
    inputs = [m for m in modalities if m in case.files and (all_targets or m not in targets)]
    # Headers only: every case is checked before any voxel is read.
    reference, shape = nifti.read_headers([(m, case.files[m]) for m in inputs],
                                          SynthesisError)
    if data_config.geometry == 'pad' and max(shape[:2]) > data_config.image_size:
      raise SynthesisError(f'{case.files[inputs[0]]}: slices of {shape[0]}x{shape[1]} do not fit '
                           f'the model\'s {data_config.image_size} px (pad geometry)')
    jobs.append(Job(case, targets, inputs, reference, shape))
  return jobs


@dataclasses.dataclass
class CaseInputs:
  """A case's acquired volumes, read once for all of its targets."""
  volumes: dict       # modality -> [X, Y, Z] raw input volume
  images: np.ndarray  # [Z, S, S, M] generator-ready slices


def read_case_inputs(job: Job, data_config) -> CaseInputs:
  """Reads and preprocesses a case's inputs once, for all of its targets."""
  volumes = {m: nifti.read_voxels(job.case.files[m], job.shape, SynthesisError)
             for m in job.inputs}
  for modality, volume in volumes.items():
    if not volume.any():
      print(f'warning: {job.case.files[modality]}: every voxel is 0; the synthesis has '
            'nothing to learn from in this input', file=sys.stderr, flush=True)
  return CaseInputs(volumes, preprocess_inputs(volumes, list(data_config.modalities), data_config))


def synthesize_case(synthesizer, job: Job, out_dir, *, naming='case', scale=INTENSITY_SCALE,
                    inputs: CaseInputs | None = None) -> list[tuple[str, pathlib.Path]]:
  """Synthesises and writes every target of one case; returns (target, path) pairs."""
  data_config = synthesizer.config.data
  inputs = inputs or read_case_inputs(job, data_config)
  written = []
  for target in job.targets:
    # The generator ignores the target's channel, so one input array serves every target;
    # with --all-targets the brain mask leaves the target's own volume out.
    brain = brain_mask(inputs.volumes, exclude=(target,))
    available = [m in inputs.volumes and m != target for m in data_config.modalities]
    volume = postprocess(synthesize_brain_slices(synthesizer, inputs.images, target, brain,
                                                 available),
                         brain, data_config, scale)
    path = output_path(job.case, target, out_dir, naming)
    try:
      write_nifti(volume, job.reference, path)
    except OSError as e:  # A full disk, or a folder made read-only meanwhile.
      raise SynthesisError(f'{path}: cannot write ({e.strerror or e})') from None
    written.append((target, path))
  return written


def synthesize_brain_slices(synthesizer, images, target, brain, available=None) -> np.ndarray:
  """[Z, S, S] synthesis; axial slices with no brain voxel in any input skip the generator.

  `postprocess` sets every voxel outside the brain to 0, so those slices come out exactly
  as if the generator had run (and the other slices keep their official-mode masks).
  """
  has_brain = brain.any(axis=(0, 1))
  out = np.full(images.shape[:3], -1.0, np.float32)
  if has_brain.any():
    out[has_brain] = synthesizer(images[has_brain],
                                 list(synthesizer.config.data.modalities).index(target),
                                 positions=np.flatnonzero(has_brain), available=available)
  return out


def prefetched(jobs, data_config):
  """(job, CaseInputs) pairs; the next case is read and preprocessed while this one runs."""
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    future = pool.submit(read_case_inputs, jobs[0], data_config) if jobs else None
    for i, job in enumerate(jobs):
      inputs = future.result()
      if i + 1 < len(jobs):
        future = pool.submit(read_case_inputs, jobs[i + 1], data_config)
      yield job, inputs


# --------------------------------------------------------------------------
# Command line.


def parse_args(argv):
  parser = argparse.ArgumentParser(prog='python -m aegan_jax.synthesize',
                                   description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', required=True, type=pathlib.Path,
                      help='training workdir (or one written by '
                      'python -m aegan_jax.official import)')
  parser.add_argument('--step', type=int, help='checkpoint step (default: the latest)')
  parser.add_argument('--input', required=True, type=pathlib.Path,
                      help='one case folder or a folder of cases')
  parser.add_argument('--output', required=True, type=pathlib.Path)
  parser.add_argument('--target', help='modality to synthesise (default: the missing one)')
  parser.add_argument('--all-targets', action='store_true',
                      help='synthesise every modality of complete cases from the others')
  parser.add_argument('--naming', choices=('case', 'brasyn'), default='case')
  parser.add_argument('--overwrite', action='store_true',
                      help='replace synthesized files that already exist in --output')
  parser.add_argument('--batch-size', type=int, default=inference.DEFAULT_BATCH_SIZE)
  parser.add_argument('--intensity-scale', type=float, default=INTENSITY_SCALE,
                      help='output intensity of a generator output of 1 (default 1000)')
  parser.add_argument('--official-test-mode', action='store_true',
                      help='run each slice as the official test.py does: BatchNorm '
                           'statistics of that slice alone, dropout active')
  args = parser.parse_args(argv)
  if args.target and args.all_targets:
    parser.error('--target and --all-targets exclude each other')
  return args


def run(args) -> list[pathlib.Path]:
  check_intensity_scale(args.intensity_scale)
  check_output_folder(args.input, args.output)
  step, config = checkpoints.read_checkpoint_config(args.workdir, args.step)
  cases = layouts.find_cases(args.input, config.data.get('dataset', 'auto'),
                             config.data.modalities)
  any_set = models.generator_class(config.model).any_set
  jobs = plan_jobs(cases, config.data, target=args.target, all_targets=args.all_targets,
                   any_set=any_set)
  check_output_files(jobs, args.output, args.naming, args.overwrite)
  synthesizer = inference.Synthesizer.restore(args.workdir, step=step, config=config,
                                              batch_size=args.batch_size,
                                              official_test_mode=args.official_test_mode)
  print(f'synthesize: {len(jobs)} case(s), checkpoint step {synthesizer.step}, '
        f'{synthesizer.mesh.devices.size} device(s)', flush=True)
  paths, seconds = [], []
  start = time.perf_counter()
  for i, (job, inputs) in enumerate(prefetched(jobs, config.data)):
    written = synthesize_case(synthesizer, job, args.output, naming=args.naming,
                              scale=args.intensity_scale, inputs=inputs)
    seconds.append((time.perf_counter() - start) / len(written))
    paths += [p for _, p in written]
    names = ', '.join(f'{t} -> {p}' for t, p in written)
    print(f'[{i + 1}/{len(jobs)}] {job.case.subject_id} {job.shape}: {names} '
          f'({seconds[-1]:.2f} s/volume)', flush=True)
    start = time.perf_counter()
  print(_summary(seconds), flush=True)
  return paths


def _summary(seconds) -> str:
  total = f'{len(seconds)} case(s), {sum(seconds):.1f} s, {np.mean(seconds):.2f} s/volume'
  if len(seconds) > 1:  # The first case includes compilation.
    total += f' ({np.mean(seconds[1:]):.2f} s/volume after the first)'
  return 'done: ' + total


def main(argv=None) -> int:
  args = parse_args(argv)
  host_memory.keep_freed_memory()
  try:
    run(args)
  except (SynthesisError, DataError, checkpoints.CheckpointError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
