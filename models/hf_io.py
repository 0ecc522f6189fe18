"""Reading and writing Hugging Face layout directories (config + safetensors).

Shared by the T5 loader and the PEFT adapter export: every file name that
comes from data (a shard index, an adapter name) goes through
:func:`safe_join`, so a crafted checkpoint cannot make us read or write
outside the directory we were given. No pickle: ``.bin`` checkpoints are
refused with a hint to convert them.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

SAFETENSORS = 'model.safetensors'
SAFETENSORS_INDEX = 'model.safetensors.index.json'
CONFIG = 'config.json'


def safe_join(directory: str | os.PathLike, name: str) -> Path:
  """``directory / name``, refusing names that leave ``directory``.

  Raises:
    ValueError: ``name`` is absolute, empty, or resolves outside directory.
  """
  if not isinstance(name, str) or not name or os.path.isabs(name) or '\\' in name:
    raise ValueError(f'{directory}: refusing file name {name!r} (must be a '
                     'non-empty relative path inside the directory).')
  root = Path(directory).resolve()
  path = (root / name).resolve()
  if path != root and root not in path.parents:
    raise ValueError(f'{directory}: refusing file name {name!r}, which '
                     'resolves outside the directory.')
  return path


def check_component(name: str, what: str) -> str:
  """Checks that ``name`` is one plain path component (no separators, no ..)."""
  if (not isinstance(name, str) or not name or name in ('.', '..')
      or '/' in name or '\\' in name or '\0' in name):
    raise ValueError(f'{what} {name!r} must be a single plain file-name '
                     'component (no "/", "\\" or "..").')
  return name


def read_json(path: str | os.PathLike, what: str = 'file') -> dict[str, Any]:
  """Loads a JSON object with one-line errors naming the file."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'{path}: {what} not found.')
  try:
    with open(path, encoding='utf-8') as f:
      data = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'{path}: not valid JSON ({e}).') from None
  if not isinstance(data, dict):
    raise ValueError(f'{path}: expected a JSON object, got '
                     f'{type(data).__name__}.')
  return data


def write_json(path: Path, data: Mapping[str, Any]) -> None:
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(data, f, indent=2, sort_keys=True)
    f.write('\n')


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
  try:
    with safe_open(str(path), framework='numpy') as f:
      return {k: f.get_tensor(k) for k in f.keys()}
  except FileNotFoundError:
    raise FileNotFoundError(f'{path}: safetensors file not found.') from None
  except Exception as e:  # safetensors raises its own SafetensorError.
    raise ValueError(f'{path}: not a readable safetensors file ({e}).') from None


def load_tensors(directory: str | os.PathLike,
                 filename: str = SAFETENSORS,
                 index: str | None = SAFETENSORS_INDEX) -> dict[str, np.ndarray]:
  """All tensors of a directory: ``filename``, or the shards named by ``index``.

  Raises:
    FileNotFoundError: neither the file nor its index exists.
    ValueError: an unreadable file or a malformed index.
  """
  directory = Path(directory)
  single = directory / filename
  if single.is_file():
    return _read_safetensors(single)
  if index is not None and (directory / index).is_file():
    index_path = directory / index
    weight_map = read_json(index_path, 'shard index').get('weight_map')
    if not isinstance(weight_map, dict) or not all(
        isinstance(v, str) for v in weight_map.values()):
      raise ValueError(f'{index_path}: "weight_map" must map tensor names to '
                       'shard file names.')
    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
      shard_tensors = _read_safetensors(safe_join(directory, shard))
      for name, value in shard_tensors.items():
        if weight_map.get(name) == shard:
          tensors[name] = value
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
      raise ValueError(f'{index_path}: tensor {missing[0]!r} is listed in '
                       f'{weight_map[missing[0]]!r} but not stored there.')
    return tensors
  bins = sorted(p.name for p in directory.glob('*.bin')) if directory.is_dir() else []
  hint = (f' ({bins[0]} is a pickle checkpoint, which we do not load; convert '
          'it to safetensors first)' if bins else '')
  raise FileNotFoundError(f'{directory}: no {filename}'
                          f'{" or " + index if index else ""}{hint}.')


def save_tensors(directory: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                 max_shard_bytes: int | None = None,
                 filename: str = SAFETENSORS,
                 index: str = SAFETENSORS_INDEX) -> list[Path]:
  """Writes ``tensors`` as one file or as shards plus an index (HF layout)."""
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  # Transformers refuses safetensors files without a known framework tag.
  metadata = {'format': 'pt'}
  tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
  total = sum(v.nbytes for v in tensors.values())
  if max_shard_bytes is None or total <= max_shard_bytes:
    path = safe_join(directory, filename)
    save_file(tensors, str(path), metadata=metadata)
    return [path]
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, value in tensors.items():
    if shards[-1] and size + value.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = value
    size += value.nbytes
  stem = filename.rsplit('.', 1)[0]
  weight_map, paths = {}, []
  for i, shard in enumerate(shards):
    shard_name = f'{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors'
    path = safe_join(directory, shard_name)
    save_file(shard, str(path), metadata=metadata)
    paths.append(path)
    weight_map.update({name: shard_name for name in shard})
  write_json(safe_join(directory, index),
             {'metadata': {'total_size': total}, 'weight_map': weight_map})
  return paths


def nbytes(shape, dtype) -> int:
  return math.prod(shape) * np.dtype(dtype).itemsize
