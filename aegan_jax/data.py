"""Grain input pipeline over slices prepared by ``python -m data_prep``.

Training examples (NHWC, float32) carry every modality of a slice plus one
sampled missing-modality scenario, exactly what `train.train_step` consumes
(it builds the generator input and the target on device,
``models.generator_batch``):

  images           [H, W, M]            all modalities
  available        bool [M]             the inputs of the scenario
  target_index     int32 scalar         the held-out modality
  example_id       int64 scalar         record position in its split (bookkeeping;
                                        the step does not read it)
  seg              uint8 [H, W]         labels (only with `with_seg`, for the segmenter)

Randomness (shuffle, scenario, augmentation) is a function of the seed and the
record index only, so runs replay exactly and iterator checkpoints restore.

Worker processes (``worker_count > 0``) are spawned by Grain: the launching
script needs an ``if __name__ == '__main__':`` guard, and Grain reads absl
flags, so they must be parsed in the parent (``app.run`` does it; otherwise
``make_loader`` marks them parsed, keeping the defaults).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
import json
import os

from absl import flags
import grain
import jax
import numpy as np

from data_prep import manifest as manifest_lib
from data_prep.errors import DataError


def load_manifest(prepared_dir) -> dict:
  return manifest_lib.load_manifest(prepared_dir)


def num_examples(prepared_dir, split: str = 'train') -> int:
  splits = load_manifest(prepared_dir)['splits']
  return splits[split]['slices'] if split in splits else 0


def _fix(prepared_dir) -> str:
  return f'prepare again (python -m data_prep ... --dst {prepared_dir} --overwrite)'


def data_source(prepared_dir, split: str = 'train'):
  """Random-access source of raw records (TFDS ArrayRecord, no TensorFlow); a damaged
  record raises DataError naming the split and record when it is read."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if num_examples(prepared_dir, split) == 0:
    raise ValueError(f'{prepared_dir}: split {split!r} holds no slices')
  check_shards(prepared_dir, split)
  folder = manifest_lib.tfds_dir(prepared_dir)
  for name in ('dataset_info.json', 'features.json'):
    try:
      json.loads((folder / name).read_text())
    except (OSError, ValueError) as e:
      raise DataError(f'{folder / name}: damaged or unreadable ({type(e).__name__}); '
                      f'{_fix(prepared_dir)}') from None
  try:
    source = tfds.builder_from_directory(str(folder)).as_data_source(split=split)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'{folder}: the TFDS metadata cannot be read ({type(e).__name__}); '
                    f'{_fix(prepared_dir)}') from None
  return CheckedSource(source, f'{folder}: record {{}} of the {split} split', _fix(prepared_dir))


class CheckedSource:
  """A record source whose read errors (a shard with flipped bytes fails its checksum)
  are one DataError naming the record, instead of a Riegeli traceback."""

  def __init__(self, source, where: str, fix: str):
    self._source, self._where, self._fix = source, where, fix

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    try:
      return self._source[index]
    except Exception as e:  # pylint: disable=broad-except
      detail = (str(e).strip().splitlines() or [''])[0][:120]
      raise DataError(f'{self._where.format(index)} is damaged ({type(e).__name__}: {detail}); '
                      f'{self._fix}') from None

  def __repr__(self):  # Grain stores it in iterator checkpoints and compares it on restore.
    return repr(self._source)


def check_shards(prepared_dir, split: str) -> None:
  """Every shard of `split` is there and whole; else one line naming it, with the fix.

  A truncated ArrayRecord file opens as empty, so the records are counted.
  """
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  folder = manifest_lib.tfds_dir(prepared_dir)
  fix = _fix(prepared_dir)
  shards = sorted(folder.glob(f'{manifest_lib.BUILDER_NAME}-{split}.array_record-*-of-*'))
  if not shards:
    raise DataError(f'{folder}: the {split} shards are missing; {fix}')
  expected_files = int(shards[0].name.rsplit('-of-', 1)[1])
  for index in range(expected_files):
    name = shards[0].name.rsplit('-', 3)[0] + f'-{index:05d}-of-{expected_files:05d}'
    if not (folder / name).is_file():
      raise DataError(f'{folder / name}: missing; {fix}')
  expected, total = num_examples(prepared_dir, split), 0
  for shard in shards:
    try:
      reader = array_record_module.ArrayRecordReader(str(shard))
      count = reader.num_records()
      reader.close()
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(f'{shard}: unreadable ({type(e).__name__}); {fix}') from None
    if count == 0:
      raise DataError(f'{shard}: damaged (no readable records); {fix}')
    total += count
  if total != expected:
    raise DataError(f'{folder}: the {split} shards hold {total} slices but {manifest_lib.MANIFEST} '
                    f'lists {expected}; {fix}')


class DecodeSlice(grain.transforms.Map):
  """Keeps the numeric fields, as float32 images (and the labels, `with_seg`)."""

  def __init__(self, with_seg: bool = False):
    self.with_seg = with_seg

  def map(self, element):
    decoded = {'images': np.asarray(element['images'], np.float32),
               'example_id': np.int64(element['example_id'])}
    if self.with_seg:
      decoded['seg'] = np.asarray(element['seg'], np.uint8)
    return decoded


class Augment(grain.transforms.RandomMap):
  """Same random flip / crop for all modalities of a slice, and its labels if present.

  Random crop is pad-then-crop: pad ``crop_padding`` pixels per side with the
  background value, then cut an ``H x W`` window at a random offset (a shift
  of up to ``crop_padding`` pixels; no resampling).
  """

  def __init__(self, flip: bool, random_crop: bool, crop_padding: int,
               background: float):
    self.flip, self.random_crop = flip, random_crop
    self.crop_padding, self.background = crop_padding, background

  def random_map(self, element, rng: np.random.Generator):
    # Labels (H, W) take the images' draws: one flip and one offset per slice.
    fields = {k: element[k] for k in ('images', 'seg') if k in element}
    if self.flip and rng.random() < 0.5:
      fields = {k: v[:, ::-1] for k, v in fields.items()}
    if self.random_crop and self.crop_padding > 0:
      pad = self.crop_padding
      top, left = rng.integers(0, 2 * pad + 1, size=2)
      for k, v in fields.items():
        padded = np.pad(v, ((pad, pad), (pad, pad)) + ((0, 0),) * (v.ndim - 2),
                        constant_values=self.background if k == 'images' else 0)
        fields[k] = padded[top:top + v.shape[0], left:left + v.shape[1]]
    return {**element, **{k: np.ascontiguousarray(v) for k, v in fields.items()}}


SCENARIOS = ('single', 'any', 'curriculum')
# The `config.data` fields that are `make_loader` keywords (the training job passes them on).
LOADER_FIELDS = ('targets', 'flip', 'random_crop', 'scenarios', 'curriculum_stage_examples',
                 'input_count_ratio', 'worker_count')


def scenario_pairs(targets, num_modalities: int,
                   fewest_inputs: int = 1) -> list[tuple[int, np.ndarray]]:
  """Every (target, availability [M] bool) pair: each target with each set of at least
  `fewest_inputs` of the other modalities."""
  pairs = []
  for target in targets:
    others = np.delete(np.arange(num_modalities), target)
    for code in range(1, 2 ** (num_modalities - 1)):
      available = np.zeros(num_modalities, bool)
      available[others] = (code >> np.arange(num_modalities - 1)) & 1
      if available.sum() >= fewest_inputs:
        pairs.append((int(target), available))
  return pairs


def scenario_probabilities(pairs, ratio: float) -> np.ndarray | None:
  """Per-pair probabilities: examples with k inputs get a share proportional to
  `ratio ** k`, split evenly over that count's pairs.  None (uniform over pairs) for
  ratio 0.  One number, so that a config serves any number of modalities."""
  if not ratio:
    return None
  inputs = np.array([available.sum() for _, available in pairs])
  share = float(ratio) ** inputs.astype(np.float64)
  per_pair = share / np.bincount(inputs)[inputs]
  return per_pair / per_pair.sum()


class SampleScenario(grain.transforms.RandomMap):
  """Draws a scenario per example over the (target, inputs) pairs with at least
  `fewest_inputs` inputs: M - 1 is the paper's scenario ('single'), 1 any set ('any');
  uniformly, or weighted by the number of inputs (`scenario_probabilities`)."""

  def __init__(self, targets: Sequence[int], num_modalities: int, fewest_inputs: int,
               input_count_ratio: float = 0.0):
    self.pairs = scenario_pairs(targets, num_modalities, fewest_inputs)
    self.probabilities = scenario_probabilities(self.pairs, input_count_ratio)

  def random_map(self, element, rng: np.random.Generator):
    if self.probabilities is None:
      index = rng.integers(len(self.pairs))
    else:
      index = rng.choice(len(self.pairs), p=self.probabilities)
    target, available = self.pairs[index]
    return {**element, 'target_index': np.int32(target), 'available': available}


class CurriculumScenario:
  """'curriculum' (MM-GAN's order): the first `stage_examples` examples of the stream
  have every other modality as input; each further stage also allows one input fewer,
  until any non-empty set.  Within a stage, uniform over the allowed (set, target) pairs.

  A Grain operation over records, because the stage depends on the example's position
  in the global stream (`metadata.index`), which map transforms do not see.  The draw
  is a function of (seed, position): resumes and any process count replay it.
  """

  def __init__(self, targets, num_modalities: int, seed: int, stage_examples: int):
    # The allowed pairs for each fewest number of inputs, M - 1 down to 1.
    self.stages = {k: scenario_pairs(targets, num_modalities, k)
                   for k in range(1, num_modalities)}
    self.num_modalities, self.seed, self.stage_examples = num_modalities, seed, stage_examples

  def __call__(self, records):
    for record in records:
      position = record.metadata.index
      fewest = max(1, self.num_modalities - 1 - position // self.stage_examples)
      allowed = self.stages[fewest]
      rng = np.random.default_rng([self.seed, position])
      target, available = allowed[rng.integers(len(allowed))]
      yield grain.Record(record.metadata, {**record.data, 'target_index': np.int32(target),
                                           'available': available})


def check_scenario_options(*, scenarios: str, curriculum_stage_examples: int,
                           input_count_ratio: float) -> None:
  """config.data's scenario fields; a bad value raises ValueError naming the field."""
  if scenarios not in SCENARIOS:
    raise ValueError(f'config.data.scenarios={scenarios!r} must be one of {SCENARIOS}')
  if curriculum_stage_examples <= 0:
    raise ValueError(f'config.data.curriculum_stage_examples={curriculum_stage_examples} '
                     'must be positive')
  ratio = input_count_ratio
  if not (isinstance(ratio, (int, float)) and np.isfinite(ratio) and ratio >= 0) or \
      (ratio and scenarios != 'any'):
    raise ValueError(f'config.data.input_count_ratio={ratio!r} must be 0 (uniform over '
                     "cells), or with data.scenarios='any' a positive finite number")


def _process(process_index, process_count):
  if process_index is None or process_count is None:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return process_index, process_count


def make_loader(prepared_dir, *, global_batch_size: int, seed: int,
                split: str = 'train', targets: Sequence[int] | None = None,
                flip: bool = False, random_crop: bool = False,
                crop_padding: int | None = None, scenarios: str = 'single',
                curriculum_stage_examples: int = 20000,
                input_count_ratio: float = 0.0, shuffle: bool = True,
                num_epochs: int | None = None, drop_remainder: bool = True,
                worker_count: int = 0, process_index: int | None = None,
                process_count: int | None = None, with_seg: bool = False) -> grain.DataLoader:
  """Batched loader for this process's shard of ``split`` (``with_seg``: with labels).

  Each process gets ``global_batch_size // process_count`` examples per batch
  from a disjoint shard of the records.  Grain's IndexSampler makes all
  shards equally long, so an epoch skips up to ``process_count - 1`` records;
  use ``iterate_split`` to visit every slice (evaluation).
  """
  manifest = load_manifest(prepared_dir)
  num_modalities = len(manifest['modalities'])
  check_scenario_options(scenarios=scenarios, curriculum_stage_examples=curriculum_stage_examples,
                         input_count_ratio=input_count_ratio)
  targets = tuple(targets or range(num_modalities))
  if any(not 0 <= t < num_modalities for t in targets):
    raise ValueError(f'targets {targets} must index {manifest["modalities"]}')
  process_index, process_count = _process(process_index, process_count)
  if global_batch_size % process_count:
    raise ValueError(f'global batch {global_batch_size} is not divisible by '
                     f'{process_count} processes')
  source = data_source(prepared_dir, split)
  sampler = grain.samplers.IndexSampler(
      num_records=len(source),
      shard_options=grain.sharding.ShardOptions(
          shard_index=process_index, shard_count=process_count,
          drop_remainder=drop_remainder),
      shuffle=shuffle, num_epochs=num_epochs, seed=seed)
  operations = [DecodeSlice(with_seg)]
  if flip or random_crop:
    padding = (manifest['image_size'] // 16 if crop_padding is None
               else crop_padding)
    operations.append(Augment(flip, random_crop, padding,
                              manifest['background_value']))
  operations += [CurriculumScenario(targets, num_modalities, seed, curriculum_stage_examples)
                 if scenarios == 'curriculum' else
                 SampleScenario(targets, num_modalities,
                                1 if scenarios == 'any' else num_modalities - 1,
                                input_count_ratio),
                 grain.transforms.Batch(global_batch_size // process_count,
                                        drop_remainder=drop_remainder)]
  if worker_count > 0:
    _ensure_absl_flags_parsed()
  return grain.DataLoader(data_source=source, sampler=sampler,
                          operations=operations, worker_count=worker_count)


def _ensure_absl_flags_parsed():
  """Grain's worker start-up reads absl flags; scripts without app.run never
  parse them.  Marking them parsed keeps the defaults."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_train_loader(prepared_dir, **options) -> grain.DataLoader:
  """Endless, globally shuffled training batches for this process: ``make_loader``
  with shuffling on, no epoch limit and whole batches.

  ``iter(loader)`` has ``get_state()`` / ``set_state()`` for checkpointing.
  """
  return make_loader(prepared_dir, shuffle=True, num_epochs=None, drop_remainder=True,
                     **options)


def iterate_split(prepared_dir, split: str = 'test', *,
                  process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict]:
  """Every slice of ``split`` in stored order (subject, then slice index).

  With ``process_count > 1`` each process gets a contiguous block; together
  the blocks cover every slice exactly once (unlike Grain's IndexSampler,
  which evens shards by dropping the remainder).

  Yields dicts: 'subject_id' (str), 'slice_index' (int), 'images'
  [H, W, M] float32 and, when the subject has one, 'seg' [H, W] uint8.
  """
  total = num_examples(prepared_dir, split)
  if total == 0:
    return
  source = data_source(prepared_dir, split)
  start = total * process_index // process_count
  stop = total * (process_index + 1) // process_count
  for i in range(start, stop):
    record = source[i]
    subject_id = record['subject_id']
    example = {
        'subject_id': (subject_id.decode() if isinstance(subject_id, bytes)
                       else str(subject_id)),
        'slice_index': int(record['slice_index']),
        'images': np.asarray(record['images'], np.float32),
    }
    if bool(record['has_seg']):
      example['seg'] = np.asarray(record['seg'], np.uint8)
    yield example


# The model's layout: a prepared dataset of other modalities or size cannot serve the config.
LAYOUT_FIELDS = ('modalities', 'image_size')
# The preparation's choices: a run on a prepared dataset takes them from its manifest.
CHOICE_FIELDS = ('normalise', 'geometry', 'slices', 'split_ratios', 'split_seed', 'dataset')


def adopt_preparation(data_config, manifest: dict, prepared, log=print) -> None:
  """Makes `data_config` say how `prepared` was made, so that config.json, the checkpoints
  and synthesis record what the run saw.

  The layout fields must match (one line naming the field and both values otherwise);
  each preparation choice that differs replaces the config's value, with a note naming
  the field and both values.
  """
  options = manifest.get('options', {})
  recorded = {'modalities': list(manifest['modalities']), 'image_size': manifest['image_size'],
              **{k: options.get(k) for k in CHOICE_FIELDS}}
  for field in LAYOUT_FIELDS + CHOICE_FIELDS:
    value, wanted = recorded[field], data_config.get(field)
    listed = list(wanted) if isinstance(wanted, (tuple, list)) else wanted
    if value is None or wanted is None or (field == 'dataset' and wanted == 'auto'):
      continue  # Not recorded (e.g. splits from --train-src/--test-src folders).
    if listed == value:
      continue
    if field in LAYOUT_FIELDS:
      raise DataError(f'config.data.{field}={wanted!r} but {prepared} was prepared with '
                      f'{field}={value!r}: set --config.data.{field} to match, or prepare again')
    adopted = tuple(value) if isinstance(wanted, (tuple, list)) else value
    log(f'note: {prepared} was prepared with data.{field}={adopted!r} (the config has '
        f'{wanted!r}); this run uses the prepared value')
    data_config[field] = adopted


def prepared_dir_for(config, workdir) -> str:
  """`config.data.prepared_dir`, or `<workdir>/prepared` when it is empty."""
  return config.data.prepared_dir or os.path.join(str(workdir), 'prepared')
