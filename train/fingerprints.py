"""What a checkpoint records of the base model it was trained on.

`model.path` may change between a run and its resume (a checkpoint folder
moved, or mounted elsewhere on another host), so a resume compares what
the files hold, not where they are: a LoRA adapter trained on one base and
continued on another of the same shapes (gemma-2b and gemma-2b-it, or a
re-downloaded fine-tune) would go on silently with a jump in the loss.

Reading every byte of a 7B checkpoint on each resume would take minutes, so
each weight file contributes its size and a few small reads spread through
it: two fine-tunes of one architecture have the same file sizes and
headers, but their weights differ nearly everywhere, so a sample of them
tells them apart; the same files give the same fingerprint wherever they
are.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

# Reads per file and bytes per read: 16 x 256 bytes samples any region of a
# weight file at least every 1/16 of its length.
_SAMPLES = 16
_SAMPLE_BYTES = 256
# The files that hold weights (tokenizer files have a fingerprint of their
# own; a README or a generation config does not change the model).
_WEIGHT_SUFFIXES = ('.safetensors', '.gguf')


def _weight_files(path: str) -> list[str]:
  found = []
  for root, dirs, files in os.walk(path):
    dirs.sort()
    found += [os.path.join(root, f) for f in sorted(files)
              if f.endswith(_WEIGHT_SUFFIXES) or f == 'config.json']
  return found


def _file_digest(path: str) -> str:
  size = os.path.getsize(path)
  digest = hashlib.sha256(str(size).encode())
  with open(path, 'rb') as f:
    if size <= _SAMPLES * _SAMPLE_BYTES:
      digest.update(f.read())
    else:
      for i in range(_SAMPLES):
        # From the start (the header: names, shapes, dtypes) to the end.
        f.seek(i * (size - _SAMPLE_BYTES) // (_SAMPLES - 1))
        digest.update(f.read(_SAMPLE_BYTES))
  return digest.hexdigest()[:16]


def base_model_fingerprint(path: str) -> dict[str, Any] | None:
  """{file name relative to ``path``: digest} of a Hugging Face folder's
  config.json and weight files, {'file': digest} of a single file (a
  GGUF), or None without a path (a random base, which the config's seed
  decides)."""
  if not path:
    return None
  if not os.path.isdir(path):  # One file (a GGUF), whatever its name.
    return {'file': _file_digest(path)}
  return {os.path.relpath(f, path): _file_digest(f)
          for f in _weight_files(path)}


def base_model_difference(saved: dict[str, Any] | None,
                          now: dict[str, Any] | None) -> str:
  """How two fingerprints differ, in words."""
  if saved is None or now is None:
    return ('a random base there, model files now' if saved is None else
            'model files there, a random base now')
  if set(saved) != set(now):
    return (f'files {", ".join(sorted(saved)) or "none"} there, '
            f'{", ".join(sorted(now)) or "none"} now')
  changed = sorted(name for name in saved if saved[name] != now[name])
  return f'{", ".join(changed)} differ'
