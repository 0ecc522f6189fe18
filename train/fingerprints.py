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


def _weight_files(path: str) -> dict[str, str]:
  """{name: path} of the weight files the loader reads from a Hugging Face
  folder (model.safetensors, or the shards its index names): not whatever
  else the folder holds (another GGUF, an original/ subfolder, a run_dir
  with its exported adapter), nor config.json, whose version stamps change
  with the transformers that wrote it."""
  from models import hf_io  # pylint: disable=g-import-not-at-top
  try:
    files, _ = hf_io.weight_files(path)
  except (FileNotFoundError, ValueError):
    return {}  # The loader has said what is wrong with the folder.
  return {name: str(file) for name, file in files.items()}


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


# What a random base (no model.path) records: its weights are the config's
# seed drawn the way `train.loop.random_base_rngs` draws them, so the way is
# what a resume compares. Change it with that function: a random base drawn
# another way is another base. Checkpoints from before 2026-12-06 record
# None: their bases came from the LoRA init's own stream.
RANDOM_BASE = {'random base': 'seed folded with its own stream tag'}


def base_model_fingerprint(path: str) -> dict[str, Any]:
  """{weight file name: digest} of a Hugging Face folder's weight files,
  {'file': digest} of a single file (a GGUF), or `RANDOM_BASE` without a
  path (a random base, which the config's seed decides)."""
  if not path:
    return dict(RANDOM_BASE)
  if not os.path.isdir(path):  # One file (a GGUF), whatever its name.
    return {'file': _file_digest(path)}
  return {name: _file_digest(file)
          for name, file in sorted(_weight_files(path).items())}


def is_random(fingerprint: dict[str, Any] | None) -> bool:
  """Whether a fingerprint is a random base's (None: one from before
  2026-12-06)."""
  return fingerprint is None or 'random base' in fingerprint


def base_model_difference(saved: dict[str, Any] | None,
                          now: dict[str, Any] | None) -> str:
  """How two fingerprints differ, in words."""
  if is_random(saved) != is_random(now):
    return ('a random base there, model files now' if is_random(saved) else
            'model files there, a random base now')
  if saved is None:
    # Runs of a few commits on 2026-12-06 drew it as now and still recorded
    # None: which way this one was drawn is not known.
    return ("a random base whose draw was not recorded there: until "
            "2026-12-06 it came from the LoRA init's own random stream")
  if is_random(saved):
    return 'a random base drawn another way there'
  if set(saved) != set(now):
    return (f'files {", ".join(sorted(saved)) or "none"} there, '
            f'{", ".join(sorted(now)) or "none"} now')
  changed = sorted(name for name in saved if saved[name] != now[name])
  return f'{", ".join(changed)} differ'
