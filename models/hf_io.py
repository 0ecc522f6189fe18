"""Reading and writing Hugging Face layout directories (config + safetensors).

Shared by the T5 loader and the PEFT adapter export: every file name that
comes from data (a shard index, an adapter name) goes through
:func:`safe_join`, so a crafted checkpoint cannot make us read or write
outside the directory we were given. No pickle: ``.bin`` checkpoints are
refused with a hint to convert them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Mapping

import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.numpy import save_file

from lora_rite_optax import checks

SAFETENSORS = 'model.safetensors'
SAFETENSORS_INDEX = 'model.safetensors.index.json'
CONFIG = 'config.json'


def safe_join(directory: str | os.PathLike, name: str, *,
              links_may_leave: bool = False, replaced: bool = False) -> Path:
  """``directory / name``, refusing names that leave ``directory``.

  Args:
    directory: the folder.
    name: a relative file name from data (a shard index, an adapter name).
    links_may_leave: only check the name itself, not where links in the
      folder lead. For reading a Hugging Face cache snapshot, whose files
      are links into the cache's ``blobs/``; writes keep the default, so
      that a link planted in the folder is not written through.
    replaced: the file will be replaced (see :func:`replacing_together`),
      never written through: it may itself be a link out of the folder (a
      cache snapshot's, replaced by the new file), but the folder it is in
      may not lead out.

  Raises:
    ValueError: ``name`` is absolute, empty, has a ``..`` component, or
      (unless ``links_may_leave``) resolves outside directory.
  """
  if (not isinstance(name, str) or not name or os.path.isabs(name)
      or '\\' in name or '\0' in name):
    raise ValueError(f'{directory}: refusing file name {name!r} (must be a '
                     'non-empty relative path inside the directory).')
  if '..' in Path(name).parts:
    raise ValueError(f'{directory}: refusing file name {name!r}: a .. '
                     'component could lead outside the directory.')
  if links_may_leave:
    return Path(directory) / name
  if replaced:
    path = Path(directory) / name
    safe_join(directory, str(Path(name).parent))  # its folder stays inside
    return path
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


def _temp_name(path: Path) -> Path:
  """A new temporary file's name next to ``path`` (see `unfinished_writes`)."""
  return path.with_name(f'.{path.name}.{os.getpid()}.'
                        f'{uuid.uuid4().hex[:8]}.tmp')


_TEMP_NAME = re.compile(r'\..+\.\d+\.[0-9a-f]{8}\.tmp')


def unfinished_writes(folder: str | os.PathLike) -> list[Path]:
  """The temporary files of `replacing_together` saves in ``folder`` that a
  killed process (kill -9, a host lost) left behind: a whole copy of what it
  was writing each, which nothing else removes. Only the folder's owner may
  remove them: another process may be writing them now."""
  try:
    names = sorted(os.listdir(folder))
  except (FileNotFoundError, NotADirectoryError):
    return []
  return [Path(folder) / n for n in names if _TEMP_NAME.fullmatch(n)
          and os.path.isfile(os.path.join(folder, n))]


@contextlib.contextmanager
def replacing_together() -> Iterator[Callable[[str | os.PathLike], Path]]:
  """Temporary files that replace their paths together, once all are written.

  ``temp(path)`` gives a new temporary file next to ``path``. When the block
  ends without an error, each replaces its path in the order they were
  asked for (so the file that tells a loader what to read, an index or
  config.json, can go last); a failure anywhere in the block leaves every
  path as it was, never some files of the new save among the old ones.
  The temporary files are removed either way. The renames also keep arrays
  memory-mapped from an old file valid (they hold its inode).
  """
  made: list[tuple[Path, Path, int]] = []

  def temp(path: str | os.PathLike) -> Path:
    path = Path(path)
    tmp = _temp_name(path)
    # Created as open() creates files (0666 less the umask), not mkstemp's
    # 0600; a file it replaces keeps its own permissions. The mode is set
    # again after writing: a writer that recreates the file (safetensors'
    # save_file) had left new weights at 0600.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    made.append((tmp, path, tmp.stat().st_mode))
    return tmp

  try:
    yield temp
    for tmp, path, created_mode in made:
      if path.exists():
        shutil.copymode(path, tmp)
      else:
        os.chmod(tmp, created_mode)
      os.replace(tmp, path)
  finally:
    for tmp, _, _ in made:
      tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
  """A temporary file next to ``path`` that replaces it on success.

  Write to the yielded path: a failure part-way leaves ``path`` as it was
  (never half-written) and removes the temporary file.
  """
  with replacing_together() as temp:
    yield temp(path)


def and_more(names: Collection[str]) -> str:
  """' (and N more)' after the first of ``names``, when there are more."""
  return f' (and {len(names) - 1} more)' if len(names) > 1 else ''


def floating_tensor(value: np.ndarray, name: str, where: str | os.PathLike,
                    what: str = 'weights') -> np.ndarray:
  """``value`` if it holds floating-point numbers, else a one-line error.

  Weights cast from integers would load as whatever the integers were, with
  no sign that the file is not the checkpoint it claims to be.
  """
  if not jnp.issubdtype(value.dtype, jnp.floating):
    raise ValueError(f'{where}: tensor {name!r} has dtype {value.dtype}; '
                     f'{what} are floating point.')
  return value


def _json_value(value: Any) -> Any:
  """json.dumps' fallback: NumPy / JAX scalars and paths as plain values."""
  if isinstance(value, os.PathLike):
    return os.fspath(value)
  if isinstance(value, np.generic) or getattr(value, 'shape', None) == ():
    return value.item()
  raise TypeError(f'{type(value).__name__!r} values are not JSON types')


def dumps_json(data: Mapping[str, Any], where: str | os.PathLike) -> str:
  """``data`` as JSON text, or a one-line ValueError naming ``where``.

  Serialising before opening any file is what keeps a value JSON cannot
  hold from leaving a truncated file behind.
  """
  try:
    return json.dumps(data, indent=2, sort_keys=True,
                      default=_json_value) + '\n'
  except (TypeError, ValueError) as e:
    raise ValueError(f'{where}: cannot write as JSON ({e}).') from None


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes ``text`` to ``path`` atomically (see :func:`replacing`).

  Raises:
    OSError: naming ``path`` (a full disk's bare errno had named no file).
  """
  try:
    with replacing(path) as tmp:
      tmp.write_text(text, encoding='utf-8')
  except OSError as e:
    raise OSError(f'{path}: cannot write ({e.strerror or e}); the file '
                  'there before, if any, is kept.') from None


def write_json(path: str | os.PathLike, data: Mapping[str, Any]) -> None:
  """Writes ``data`` as JSON, atomically; nothing is written if it fails."""
  write_text(path, dumps_json(data, path))


class Tensors(Mapping[str, np.ndarray]):
  """Tensors of one or more safetensors files, read on access.

  Reading lazily keeps the peak host memory of a large checkpoint at one
  tensor rather than the whole file.
  """

  def __init__(self, files: dict[str, Path]):
    self._files = files
    self._handles: dict[Path, Any] = {}

  def file(self, name: str) -> Path:
    """The file that stores ``name``."""
    return self._files[name]

  def _open(self, path: Path):
    if path not in self._handles:
      self._handles[path] = _open(path)
    return self._handles[path]

  def shape(self, name: str) -> tuple[int, ...]:
    """The shape of ``name``, from its file's header (no data is read)."""
    path = self._files[name]
    try:
      return tuple(self._open(path).get_slice(name).get_shape())
    except Exception as e:  # safetensors raises its own SafetensorError.
      raise ValueError(f'{path}: cannot read tensor {name!r} ({e}).') from None

  def __getitem__(self, name: str) -> np.ndarray:
    path = self._files[name]
    try:
      return self._open(path).get_tensor(name)
    except Exception as e:  # safetensors raises its own SafetensorError.
      raise ValueError(f'{path}: cannot read tensor {name!r} ({e}).') from None

  def __contains__(self, name) -> bool:
    # Mapping's own would read the tensor (self[name]) to answer.
    return name in self._files

  def __iter__(self):
    return iter(self._files)

  def __len__(self):
    return len(self._files)


def _open(path: Path):
  if not path.is_file():
    raise FileNotFoundError(f'{path}: safetensors file not found.')
  try:
    return safe_open(str(path), framework='numpy')
  except Exception as e:  # safetensors raises its own SafetensorError.
    raise ValueError(f'{path}: not a readable safetensors file ({e}).') from None


def open_tensors(directory: str | os.PathLike, filename: str = SAFETENSORS,
                 index: str | None = SAFETENSORS_INDEX) -> Tensors:
  """The tensors of ``filename``, or of the shards named by ``index``.

  Raises:
    FileNotFoundError: neither the file nor its index exists.
    ValueError: an unreadable file, a malformed index, a shard outside the
      directory, or an index naming a tensor its shard lacks.
  """
  shards, weight_map = weight_files(directory, filename, index)
  if weight_map is None:
    (single,) = shards.values()
    return Tensors({name: single for name in _open(single).keys()})
  files = {}
  for shard, path in shards.items():
    stored = set(_open(path).keys())
    for name, where in weight_map.items():
      if where == shard:
        if name not in stored:
          raise ValueError(f'{Path(directory) / index}: tensor {name!r} is '
                           f'listed in {shard!r} but not stored there.')
        files[name] = path
  return Tensors(files)


def weight_files(directory: str | os.PathLike, filename: str = SAFETENSORS,
                 index: str | None = SAFETENSORS_INDEX
                 ) -> tuple[dict[str, Path], dict[str, str] | None]:
  """The weights files of a checkpoint folder, as transformers picks them.

  ``({filename: path}, None)`` when the single file is there (it wins over
  an index, as in transformers), else ``({shard name: path}, weight_map)``
  from ``index``; a shard may not lead out of the folder, though a Hugging
  Face cache's links into its blobs/ may.

  Raises:
    FileNotFoundError: neither the file nor its index exists.
    ValueError: a malformed index or a shard outside the directory.
  """
  directory = Path(directory)
  single = directory / filename
  if single.is_file():
    return {filename: single}, None
  if index is not None and (directory / index).is_file():
    index_path = directory / index
    weight_map = read_json(index_path, 'shard index').get('weight_map')
    if not isinstance(weight_map, dict) or not all(
        isinstance(v, str) for v in weight_map.values()):
      raise ValueError(f'{index_path}: "weight_map" must map tensor names to '
                       'shard file names.')
    return {shard: safe_join(directory, shard, links_may_leave=True)
            for shard in sorted(set(weight_map.values()))}, weight_map
  raise missing_weights(directory, filename, index)


def missing_weights(directory: str | os.PathLike, filename: str = SAFETENSORS,
                    index: str | None = SAFETENSORS_INDEX
                    ) -> FileNotFoundError:
  """The error for a folder with neither ``filename`` nor ``index``, naming
  a pickle checkpoint (``*.bin``) there as the likely reason."""
  directory = Path(directory)
  bins = sorted(p.name for p in directory.glob('*.bin')) if directory.is_dir() else []
  hint = (f' ({bins[0]} is a pickle checkpoint, which we do not load; convert '
          'it to safetensors first)' if bins else '')
  return FileNotFoundError(f'{directory}: no {filename}'
                           f'{" or " + index if index else ""}{hint}.')


def load_tensors(directory: str | os.PathLike, filename: str = SAFETENSORS,
                 index: str | None = SAFETENSORS_INDEX) -> dict[str, np.ndarray]:
  """All tensors of :func:`open_tensors`, read into memory."""
  return dict(open_tensors(directory, filename, index))


def _save_file(tensors, tmp: Path, path, metadata) -> None:
  """safetensors' save_file; its own error (a full disk among others) as a
  one-line OSError naming the file, as the train CLI reports OSErrors."""
  try:
    save_file(tensors, str(tmp), metadata=metadata)
  except SafetensorError as e:
    cause = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise OSError(f'{path}: cannot write ({cause}).') from None


def _save_text(text: str, tmp: Path, path) -> None:
  """``tmp.write_text``, its failure a one-line OSError naming ``path``: a
  full disk's bare '[Errno 28] No space left on device' had named no
  file."""
  try:
    tmp.write_text(text, encoding='utf-8')
  except OSError as e:
    raise OSError(f'{path}: cannot write ({e.strerror or e}).') from None


def write_tensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                  metadata: Mapping[str, str] | None = None) -> None:
  """One safetensors file, atomically (see :func:`replacing`); a failure
  (a full disk) is a one-line OSError naming ``path``."""
  with replacing(path) as tmp:
    _save_file(dict(tensors), tmp, path, metadata)


def check_directory(directory: Any, who: str) -> Path:
  """``directory`` as a Path a save may write into, checked before anything
  is written: '' had saved into the current folder (and removed the stale
  weights there)."""
  if not isinstance(directory, (str, os.PathLike)) or not os.fspath(
      directory):
    raise ValueError(f'{who}: directory must be a non-empty path, got '
                     f'{directory!r}.')
  path = Path(directory)
  if path.exists() and not path.is_dir():
    raise ValueError(f'{who}: {path} is a file, not a folder.')
  return path


def check_shard_bytes(max_shard_bytes: Any, who: str) -> None:
  """None or a positive int: transformers' '5GB' had failed comparing with
  an int after the folder was made, and 0 wrote one shard per tensor."""
  if max_shard_bytes is not None and (
      not checks.is_integer(max_shard_bytes) or max_shard_bytes < 1):
    raise ValueError(f'{who}: max_shard_bytes must be None or a positive '
                     f'number of bytes, got {max_shard_bytes!r} (e.g. '
                     '5 * 2**30 for 5 GiB).')


def save_tensors(directory: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                 max_shard_bytes: int | None = None,
                 filename: str = SAFETENSORS,
                 index: str | None = None,
                 texts: Mapping[str, str] | None = None) -> list[Path]:
  """Writes ``tensors`` as one file or as shards plus an index (HF layout).

  ``texts`` (file name -> text, e.g. config.json) are written with them.
  All files are written first and then moved into place together (see
  :func:`replacing_together`), the texts and the index last: a save that
  fails part-way, a full disk say, leaves the folder's earlier save whole
  rather than new shards beside old ones and an old config. Afterwards the
  other layout's files (``filename``, ``index``, or ``{stem}-*-of-*``
  shards) left by an earlier save are removed, since a loader would read
  them instead of the new ones. ``index`` defaults to ``filename +
  '.index.json'``.
  """
  directory = check_directory(directory, 'save_tensors')
  check_shard_bytes(max_shard_bytes, 'save_tensors')
  directory.mkdir(parents=True, exist_ok=True)
  index = index or _index_name(filename)
  # Transformers refuses safetensors files without a known framework tag.
  metadata = {'format': 'pt'}
  tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
  total = sum(v.nbytes for v in tensors.values())
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, value in tensors.items():
    if (max_shard_bytes is not None and shards[-1] and
        size + value.nbytes > max_shard_bytes):
      shards.append({})
      size = 0
    shards[-1][name] = value
    size += value.nbytes
  stem = filename.rsplit('.', 1)[0]
  weight_map, paths, names = {}, [], []
  with replacing_together() as temp:
    for i, shard in enumerate(shards):
      shard_name = (filename if len(shards) == 1 else
                    f'{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors')
      path = safe_join(directory, shard_name, replaced=True)
      _save_file(shard, temp(path), path, metadata)
      paths.append(path)
      names.append(shard_name)  # not path.name: safe_join resolves links
      weight_map.update({name: shard_name for name in shard})
    if len(shards) > 1:
      index_path = safe_join(directory, index, replaced=True)
      _save_text(dumps_json({'metadata': {'total_size': total},
                             'weight_map': weight_map}, index_path),
                 temp(index_path), index_path)
      names.append(index)
    for name, text in (texts or {}).items():
      path = safe_join(directory, name, replaced=True)
      _save_text(text, temp(path), path)
  remove_stale_weights(directory, names, filename, index)
  return paths


def _index_name(filename: str) -> str:
  return f'{filename}.index.json'


def remove_stale_weights(directory: str | os.PathLike, keep: Collection[str],
                         filename: str = SAFETENSORS,
                         index: str | None = None) -> None:
  """Removes the weights files of an earlier save that are not in ``keep``.

  Candidates are ``filename``, its shard index (default ``filename +
  '.index.json'``) and shards named ``{stem}-NNNNN-of-NNNNN.safetensors``
  (the names transformers and :func:`save_tensors` write, so that no other
  file of the folder is touched): a loader prefers the single file to the
  index, so a stale one would load in place of the new weights.
  """
  directory = Path(directory)
  stem = filename.rsplit('.', 1)[0]
  shard = re.compile(re.escape(stem) + r'-\d{5}-of-\d{5}\.safetensors')
  stale = {filename, index or _index_name(filename)}
  stale.update(p.name for p in directory.iterdir() if shard.fullmatch(p.name))
  for name in sorted(stale - set(keep)):
    path = directory / name
    if path.is_file() or path.is_symlink():
      path.unlink()
