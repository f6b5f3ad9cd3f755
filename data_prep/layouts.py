"""Finds subjects and their modality files in the supported raw layouts.

Discovery only looks at file names; it never opens a volume and never fails
because a modality is missing (``validate`` in ``prepare`` does that).

Supported layouts (``Case.layout``):
  brats2018 / brats2019  ``[HGG|LGG/]Brats18_X/Brats18_X_t1.nii.gz`` (BraTS19_)
  brats2020              ``BraTS20_Training_001/BraTS20_Training_001_t1.nii.gz``
  brats2021              ``BraTS2021_00000/BraTS2021_00000_t1.nii.gz``
  brats2023              ``BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1n.nii.gz``
                         (also MET, MEN, PED, SSA, ... prefixes; and BraSyn's
                         ``<case>/<case>-t1n.nii.gz`` with any case name)
  brats                  any other ``<dir>/<dir>_t1.nii.gz`` folder
  modality_first         official AE-GAN code: ``flair/ t1/ t1ce/ t2/``
                         folders, one file per subject in each
  isles2015              ISLES 2015 SISS ``<n>/VSD.Brain.XX.O.MR_T1.<id>/...``
  generic                ``<case>/<case>_<modality>.nii[.gz]`` with the modality
                         names given (``--dataset generic --modalities a,b,c``)
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import re

from data_prep.errors import DataError
from data_prep.errors import warn

BRATS = 'brats'
ISLES2015 = 'isles2015'
GENERIC = 'generic'
DATASETS = ('auto', BRATS, ISLES2015, GENERIC)

# Canonical modality names, in channel order (the configs' `data.modalities`).
BRATS_MODALITIES = ('t1', 't1ce', 't2', 'flair')
ISLES2015_MODALITIES = ('t1', 't2', 'flair', 'dwi')

# File-name token of each canonical modality, per naming generation: the only
# definition (phantom writes and synthesis names its outputs with these).
BRATS_TOKENS = {'t1': 't1', 't1ce': 't1ce', 't2': 't2', 'flair': 'flair',
                'seg': 'seg'}  # BraTS 2018 to 2021
BRATS2023_TOKENS = {'t1': 't1n', 't1ce': 't1c', 't2': 't2w', 'flair': 't2f',
                    'seg': 'seg'}  # BraTS 2023 on, and the BraSyn submissions
ISLES2015_TOKENS = {'t1': 'MR_T1', 't2': 'MR_T2', 'flair': 'MR_Flair',
                    'dwi': 'MR_DWI', 'seg': 'OT'}

# Subject-folder name -> layout, for folders whose files are '<dir><sep><tok>'.
_BRATS_FOLDERS = (
    ('brats2018', re.compile(r'^Brats18_'), '_', BRATS_TOKENS),
    ('brats2019', re.compile(r'^BraTS19_'), '_', BRATS_TOKENS),
    ('brats2020', re.compile(r'^BraTS20_'), '_', BRATS_TOKENS),
    ('brats2021', re.compile(r'^BraTS2021_'), '_', BRATS_TOKENS),
    ('brats2023', re.compile(r'^BraTS-[A-Za-z]+-\d+-\d+$'), '-',
     BRATS2023_TOKENS),
    # BraSyn's convention with any case name: <case>/<case>-t1n.nii.gz, ...
    ('brats2023', re.compile(r'.'), '-', BRATS2023_TOKENS),
    ('brats', re.compile(r'.'), '_', BRATS_TOKENS),
)
_LAYOUT_NAMING = {name: (sep, tokens) for name, _, sep, tokens in _BRATS_FOLDERS}

_NIFTI = re.compile(r'^(?P<stem>.+?)(?P<ext>\.nii(?:\.gz)?)$', re.IGNORECASE)
_ISLES_FILE = re.compile(
    r'^VSD\.Brain[^.]*\.XX\.O\.(?P<tok>' + '|'.join(ISLES2015_TOKENS.values()) +
    r')\.(?P<id>\d+)(?P<ext>\.nii(?:\.gz)?)$', re.IGNORECASE)


@dataclasses.dataclass
class Case:
  """One subject: where its files are and how its files are named."""
  subject_id: str
  layout: str
  dataset: str                      # 'brats', 'isles2015' or 'generic'
  modalities: tuple[str, ...]       # the dataset's modalities, in channel order
  directory: pathlib.Path           # subject folder (root for modality_first)
  files: dict[str, pathlib.Path]    # canonical modality -> file
  seg: pathlib.Path | None = None
  ext: str = '.nii.gz'

  def filename_for(self, modality: str) -> str:
    """File name of ``modality`` (or 'seg') in this case's own convention."""
    if self.layout == 'modality_first':
      names = {p.name for p in self.files.values()}
      if len(names) == 1:  # official layout: same name in every folder
        return names.pop()
      return f'{self.subject_id}_{modality}{self.ext}'
    if self.layout == ISLES2015:
      existing = self.files.get(modality) or (
          self.seg if modality == 'seg' else None)
      if existing is not None:
        return existing.name
      return f'VSD.Brain.XX.O.{ISLES2015_TOKENS[modality]}.{self.subject_id}{self.ext}'
    if self.layout == GENERIC:
      return f'{self.subject_id}_{modality}{self.ext}'
    return brats_file_name(self.layout, self.subject_id, modality, self.ext)

  def add(self, modality: str, path: pathlib.Path) -> None:
    """Records `path` as `modality` (or 'seg'); a second file for it is an error naming
    both (x_t1.nii beside x_t1.nii.gz, or x_T1 beside x_t1: which one is meant?)."""
    existing = self.seg if modality == 'seg' else self.files.get(modality)
    if existing is not None and existing != path:
      raise DataError(f'{existing} and {path}: two files for {modality} of subject '
                      f'{self.subject_id}; keep one')
    if modality == 'seg':
      self.seg = path
    else:
      self.files[modality] = path

  def path_for(self, modality: str) -> pathlib.Path:
    """Where ``modality`` is (or would be) in the source tree."""
    if modality == 'seg' and self.seg is not None:
      return self.seg
    if modality in self.files:
      return self.files[modality]
    if self.layout == 'modality_first':
      return self.directory / modality / self.filename_for(modality)
    return self.directory / self.filename_for(modality)


def dataset_modalities(dataset: str) -> tuple[str, ...]:
  return {BRATS: BRATS_MODALITIES, ISLES2015: ISLES2015_MODALITIES}[dataset]


def brats_file_name(layout: str, subject_id: str, modality: str,
                    ext: str = '.nii.gz') -> str:
  """``<subject><sep><token><ext>``: a file name in a BraTS folder layout."""
  sep, tokens = _LAYOUT_NAMING[layout]
  return f'{subject_id}{sep}{tokens[modality]}{ext}'


def paths_overlap(a, b) -> bool:
  """True when folders `a` and `b` are the same, or one lies inside the other."""
  a, b = pathlib.Path(a).resolve(), pathlib.Path(b).resolve()
  return a == b or a in b.parents or b in a.parents


def _nifti_files(root: pathlib.Path):
  """NIfTI files below `root`, following symlinked folders (each real folder once)."""
  seen = set()
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    real = os.path.realpath(dirpath)
    if real in seen:  # A link loop, or two links to one folder.
      dirnames[:] = []
      continue
    seen.add(real)
    dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
    for name in sorted(filenames):
      if _NIFTI.match(name) and not name.startswith('.'):
        yield pathlib.Path(dirpath) / name


def _find_modality_first(root: pathlib.Path) -> list[Case]:
  """Official layout: one folder per modality directly under ``root``."""
  folders = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
  for dataset in (BRATS, ISLES2015):
    mods = dataset_modalities(dataset)
    if sum(m in folders for m in mods) < 2 or any(
        m not in mods and m not in ('seg', 'label', 'labels') and
        not m.startswith('.') for m in folders):
      continue
    by_subject: dict[str, Case] = {}
    for modality in mods + ('seg',):
      folder = folders.get(modality) or (
          folders.get('label') or folders.get('labels')
          if modality == 'seg' else None)
      if folder is None:
        continue
      for path in sorted(folder.iterdir()):
        match = _NIFTI.match(path.name)
        # Dotfiles (macOS '._*' resource forks) are skipped, as the other finders do.
        if not match or not path.is_file() or path.name.startswith('.'):
          continue
        subject = _strip_modality_token(match['stem'], modality)
        case = by_subject.setdefault(subject, Case(
            subject, 'modality_first', dataset, mods, root, {}, ext=match['ext']))
        case.add(modality, path)
    return sorted(by_subject.values(), key=lambda c: c.subject_id)
  return []


def _strip_modality_token(stem: str, modality: str) -> str:
  tokens = {modality, BRATS_TOKENS.get(modality, modality),
            BRATS2023_TOKENS.get(modality, modality)}
  for token in tokens:
    for sep in ('_', '-', '.'):
      if stem.lower().endswith(sep + token.lower()):
        return stem[:-len(token) - 1]
  return stem


def _find_isles2015(root: pathlib.Path) -> list[Case]:
  tokens_to_modality = {v.lower(): k for k, v in ISLES2015_TOKENS.items()}
  by_subject: dict[pathlib.Path, Case] = {}
  for path in _nifti_files(root):
    match = _ISLES_FILE.match(path.name)
    if not match:
      continue
    # <subject>/VSD.Brain.XX.O.MR_T1.<id>/<file>, or the file directly inside.
    subject_dir = path.parent
    if subject_dir.name.startswith('VSD.'):
      subject_dir = subject_dir.parent
    case = by_subject.setdefault(subject_dir, Case(
        subject_dir.name, ISLES2015, ISLES2015, ISLES2015_MODALITIES, subject_dir, {},
        ext=match['ext']))
    case.add(tokens_to_modality[match['tok'].lower()], path)
  return list(by_subject.values())


def _find_brats(root: pathlib.Path) -> list[Case]:
  by_subject: dict[pathlib.Path, Case] = {}
  for path in _nifti_files(root):
    match = _NIFTI.match(path.name)
    folder = path.parent.name
    stem = match['stem']
    for layout, folder_pattern, sep, tokens in _BRATS_FOLDERS:
      if not folder_pattern.search(folder) or not stem.startswith(folder + sep):
        continue
      token = stem[len(folder) + 1:].lower()
      modality = {v: k for k, v in tokens.items()}.get(token)
      if modality is None:
        break
      case = by_subject.setdefault(path.parent, Case(
          folder, layout, BRATS, BRATS_MODALITIES, path.parent, {}, ext=match['ext']))
      case.add(modality, path)
      break
  return list(by_subject.values())


def check_case_id(case: Case) -> None:
  """A subject id names output files and folders: it must be a plain name (no path
  separator, not '.' or '..', no leading dot), or synthesis could write outside --output."""
  name = case.subject_id
  if (not name or name in ('.', '..') or name.startswith('.') or
      any(c in name for c in '/\\\0')):
    where = next(iter(case.files.values()), case.seg or case.directory)
    raise DataError(f'{where}: subject id {name!r} is not a plain name (it names output '
                    'files); rename the file')


def check_generic_modalities(modalities) -> tuple[str, ...]:
  """The modality names of a generic dataset: at least two, distinct, [A-Za-z0-9]+."""
  names = tuple(modalities or ())
  if len(names) < 2 or len(set(n.lower() for n in names)) < len(names) or any(
      not re.fullmatch(r'[A-Za-z0-9]+', n) or n.lower() == 'seg' for n in names):
    raise DataError(f'--modalities {",".join(names) or "(none)"}: a generic dataset needs at '
                    'least two distinct names of letters and digits (not "seg")')
  return names


def _generic_case(folder: pathlib.Path, modalities) -> Case | None:
  """The case of files `<folder>_<modality>.nii[.gz]` (and `<folder>_seg`) in `folder`, or
  None when it holds none."""
  tokens = {m.lower(): m for m in modalities}
  case = Case(folder.name, GENERIC, GENERIC, tuple(modalities), folder, {})
  prefix = folder.name + '_'
  for path in sorted(folder.iterdir()):
    match = _NIFTI.match(path.name)
    if (not match or not path.is_file() or path.name.startswith('.') or
        not match['stem'].startswith(prefix)):
      continue
    token = match['stem'][len(prefix):].lower()
    if token == 'seg' or token in tokens:
      case.ext = match['ext']
      case.add('seg' if token == 'seg' else tokens[token], path)
  return case if case.files or case.seg else None


def _find_generic(root: pathlib.Path, modalities) -> list[Case]:
  """``<root>/<case>/<case>_<modality>.nii[.gz]`` (and an optional ``<case>_seg``), or
  `root` as one case folder; a case folder without such files is skipped with a warning."""
  folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith('.'))
  cases = [(folder, _generic_case(folder, modalities)) for folder in folders]
  root_case = _generic_case(root, modalities)
  if root_case is not None:
    inner = [folder for folder, case in cases if case is not None]
    if inner:  # A stray file must not hide every case folder.
      stray = next(iter(root_case.files.values()), root_case.seg)
      raise DataError(f'{stray}: a case file directly in {root}, which holds case folders '
                      f'({inner[0].name}, ...); move it into its case folder')
    return [root_case]
  found = [case for _, case in cases if case is not None]
  for folder, case in cases:
    if case is None and found:  # With none found at all, find_cases says so in its error.
      warn(f'{folder}: no {folder.name}_<{"|".join(modalities)}>.nii[.gz] file; skipped')
  return found


def _find_by_file_names(root: pathlib.Path, dataset: str) -> list[Case]:
  """BraTS or ISLES2015 subjects; with dataset 'auto', whichever one the folder holds."""
  found = {BRATS: _find_brats(root), ISLES2015: _find_isles2015(root)}
  if dataset != 'auto':
    return found[dataset]
  nonempty = [d for d, c in found.items() if c]
  if len(nonempty) > 1:
    raise DataError(f'{root}: holds both BraTS and ISLES2015 subjects; pass --dataset')
  return found[nonempty[0]] if nonempty else []


def find_cases(root, dataset: str = 'auto', modalities=None) -> list[Case]:
  """Lists the subjects under ``root``, sorted by subject id.

  Args:
    root: raw dataset folder (any depth above the subject folders; for
      'generic', the folder holding the case folders).
    dataset: 'auto', 'brats', 'isles2015' or 'generic'.
    modalities: the modality names of a 'generic' dataset (channel order).

  Raises:
    DataError: missing/empty folder, unknown layout, mixed datasets or
      duplicate subject ids.
  """
  root = pathlib.Path(root)
  if dataset not in DATASETS:
    raise DataError(f'unknown dataset {dataset!r}; expected one of {DATASETS}')
  if not root.is_dir():
    raise DataError(f'{root}: no such directory')
  if not any(root.iterdir()):
    raise DataError(f'{root}: folder is empty')
  if dataset == GENERIC:
    cases = _find_generic(root, check_generic_modalities(modalities))
  else:
    cases = _find_modality_first(root) or _find_by_file_names(root, dataset)
  if not cases:
    if dataset == GENERIC:
      what = (f'no <case>/<case>_<modality>.nii[.gz] files for modalities '
              f'{",".join(modalities)}')
    elif next(_nifti_files(root), None):
      what = 'no BraTS or ISLES2015 layout recognised among its NIfTI files'
    else:
      what = 'no NIfTI (.nii/.nii.gz) files found (names starting with "." are skipped)'
    raise DataError(f'{root}: {what}')
  if dataset != 'auto' and cases[0].dataset != dataset:
    raise DataError(f'{root}: layout {cases[0].layout} is not {dataset}')
  for case in cases:
    check_case_id(case)
  cases.sort(key=lambda c: c.subject_id)
  ids = [c.subject_id for c in cases]
  for a, b in zip(ids, ids[1:]):
    if a == b:
      raise DataError(f'{root}: subject id {a!r} appears twice')
  return cases
