"""A fast GGUF reader: metadata, tensor infos and memory-mapped tensor data.

`gguf.GGUFReader` builds a numpy view per array element, which takes ~13 s
for Gemma 3's 262k-entry vocabulary on a small CPU; parsing the header with
`struct` takes a fraction of a second. Dequantization still uses
`gguf.quants.dequantize`, on the [rows, bytes] layout it expects.

Format (v2/v3): magic 'GGUF', version u32, tensor count u64, kv count u64,
the key/value pairs, the tensor infos (name, dims in ggml order, type,
offset), then the data section aligned to ``general.alignment`` (default 32).
"""

from __future__ import annotations

import dataclasses
import os
import struct

import numpy as np

# GGUF metadata value types.
_SCALARS = {0: '<B', 1: '<b', 2: '<H', 3: '<h', 4: '<I', 5: '<i', 6: '<f',
            7: '<?', 10: '<Q', 11: '<q', 12: '<d'}
_NP = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32,
       5: np.int32, 6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64,
       12: np.float64}
_STRING, _ARRAY = 8, 9


@dataclasses.dataclass
class GGUFTensor:
  name: str
  qtype: int             # gguf.GGMLQuantizationType value
  shape: tuple           # numpy order ([out, in] for matrices)
  data: np.ndarray       # memory-mapped; [rows..., bytes] for quantized types

  def dequantize(self) -> np.ndarray:
    """float32 array of ``shape``.

    Raises:
      ValueError: a type gguf-py cannot dequantize (F64, the integer types,
        Q8_1, Q8_K), naming the tensor; it had been a NotImplementedError
        traceback.
    """
    from gguf import GGMLQuantizationType  # pylint: disable=g-import-not-at-top
    from gguf.quants import dequantize  # pylint: disable=g-import-not-at-top
    qtype = GGMLQuantizationType(self.qtype)
    try:
      values = dequantize(self.data, qtype)
    except NotImplementedError:
      raise ValueError(f'GGUF tensor {self.name!r} has type {qtype.name}, '
                       'which cannot be dequantized here.') from None
    return np.asarray(values, np.float32).reshape(self.shape)


@dataclasses.dataclass
class GGUFFile:
  path: str
  metadata: dict         # key -> int/float/bool/str, or list / numpy array
  tensors: dict          # name -> GGUFTensor


class _Cursor:

  def __init__(self, buf, pos: int = 0):
    self.buf, self.pos = buf, pos

  def unpack(self, fmt: str):
    v = struct.unpack_from(fmt, self.buf, self.pos)[0]
    self.pos += struct.calcsize(fmt)
    return v

  def string(self) -> str:
    n = self.unpack('<Q')
    s = bytes(self.buf[self.pos:self.pos + n])
    if len(s) != n:
      raise ValueError('truncated string')
    self.pos += n
    return s.decode('utf-8', errors='replace')

  def value(self, vtype: int):
    if vtype in _SCALARS:
      return self.unpack(_SCALARS[vtype])
    if vtype == _STRING:
      return self.string()
    if vtype == _ARRAY:
      etype, n = self.unpack('<I'), self.unpack('<Q')
      if etype in _NP:  # numeric arrays are contiguous: one view
        dt = np.dtype(_NP[etype]).newbyteorder('<')
        arr = np.frombuffer(self.buf, dt, count=n, offset=self.pos)
        self.pos += n * dt.itemsize
        return arr
      return [self.value(etype) for _ in range(n)]
    raise ValueError(f'unknown metadata value type {vtype}')


def read_gguf(path: str) -> GGUFFile:
  """Parses a GGUF file; tensor data stays memory-mapped."""
  # pylint: disable-next=g-import-not-at-top
  from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: GGUF file not found.')
  if os.path.getsize(path) < 4:  # np.memmap refuses an empty file
    raise ValueError(f'{path}: not a readable GGUF file (it is '
                     f'{os.path.getsize(path)} bytes long).')
  buf = np.memmap(path, dtype=np.uint8, mode='r')
  try:
    if bytes(buf[:4]) != b'GGUF':
      raise ValueError(f'bad magic {bytes(buf[:4])!r}, expected GGUF')
    c = _Cursor(buf, 4)
    version = c.unpack('<I')
    if version not in (2, 3):
      raise ValueError(f'unsupported GGUF version {version}')
    n_tensors, n_kv = c.unpack('<Q'), c.unpack('<Q')
    metadata = {}
    for _ in range(n_kv):
      key = c.string()
      metadata[key] = c.value(c.unpack('<I'))
    infos = []
    for _ in range(n_tensors):
      name = c.string()
      dims = [c.unpack('<Q') for _ in range(c.unpack('<I'))]
      infos.append((name, dims, c.unpack('<I'), c.unpack('<Q')))
    align = metadata.get('general.alignment', 32)
    # llama.cpp requires a power of two; 0 would divide by zero below.
    if (isinstance(align, bool) or not isinstance(align, (int, np.integer))
        or align < 1 or align & (align - 1)):
      raise ValueError('general.alignment must be a power of two, got '
                       f'{" ".join(repr(align).split())[:80]}')
    align = int(align)
    start = -(-c.pos // align) * align
    tensors = {}
    for name, dims, qtype, offset in infos:
      shape = tuple(reversed(dims))  # ggml lists the contiguous axis first
      block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
      n = int(np.prod(dims, dtype=np.int64))
      nbytes = n * type_size // block
      begin = start + offset
      if begin + nbytes > buf.size:
        raise ValueError(f'tensor {name} extends past the end of the file')
      raw = buf[begin:begin + nbytes]
      if block == 1:  # plain element types
        dt = {0: np.float32, 1: np.float16}.get(qtype)
        data = (raw.view(dt).reshape(shape) if dt is not None
                else raw.reshape(shape[:-1] + (-1,)))
      else:
        data = raw.reshape(shape[:-1] + (shape[-1] // block * type_size,))
      tensors[name] = GGUFTensor(name, qtype, shape, data)
  except (ValueError, struct.error, KeyError, IndexError, TypeError,
          ZeroDivisionError, OverflowError) as e:
    raise ValueError(f'{path}: not a readable GGUF file ({e}).') from None
  return GGUFFile(path, metadata, tensors)
