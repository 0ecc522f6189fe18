"""GGUF files the tests write with the `gguf` package's own writer."""

import contextlib

import numpy as np


@contextlib.contextmanager
def gguf_writer(path, arch):
  """Yields a ``gguf.GGUFWriter``; on exit writes header, metadata, tensors."""
  import gguf  # pylint: disable=g-import-not-at-top
  w = gguf.GGUFWriter(str(path), arch)
  yield w
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def write_minimal_gguf(path, arch, alignment=None):
  """One layer's worth of metadata and a single 8 x 4 embedding."""
  with gguf_writer(path, arch) as w:
    if alignment is not None:
      w.add_custom_alignment(alignment)
    w.add_block_count(1)
    w.add_tensor('token_embd.weight', np.zeros((8, 4), np.float32))
