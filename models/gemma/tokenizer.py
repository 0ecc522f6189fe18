"""Gemma tokenizer: SentencePiece, from a ``tokenizer.model`` or a GGUF file.

A GGUF file carries the SentencePiece vocabulary as metadata
(``tokenizer.ggml.tokens`` / ``scores`` / ``token_type``); we rebuild the
``ModelProto`` from it in memory (Gemma's is a byte-fallback BPE model with
no whitespace normalisation), so the same `sentencepiece` encoder runs either
way.
"""

from __future__ import annotations

import os
import re

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as spm_pb2


class Tokenizer:
  """Text <-> Gemma token ids.

  As Hugging Face's tokenizers do, `encode` reads the special pieces
  (``<bos>``, ``<eos>``, ``<pad>``, ``<unk>``) written in a text as their
  ids (SentencePiece alone spells them out in characters: a prompt from a
  chat template, which starts with ``<bos>``, had become ``< bos >``), and
  `decode` leaves the special tokens out (``skip_special_tokens``).

  Args:
    processor: a loaded `sentencepiece.SentencePieceProcessor`.
    add_bos: prepend ``bos_id`` in `encode` by default (Gemma expects it).
    special_ids: the ids `decode` leaves out (default: the processor's
      control and unknown pieces; a GGUF's own CONTROL tokens, such as
      ``<start_of_turn>`` and ``<mask>``, when read from one).
  """

  def __init__(self, processor: spm.SentencePieceProcessor, *,
               add_bos: bool = True, special_ids=None):
    self.sp = processor
    self.add_bos = add_bos
    size = processor.get_piece_size()
    # The few pieces SentencePiece never matches in text.
    named = {i for i in (processor.bos_id(), processor.eos_id(),
                         processor.pad_id(), processor.unk_id())
             if 0 <= i < size}
    self._literal = {processor.id_to_piece(i): i for i in named}
    self._literal_re = re.compile('|'.join(
        re.escape(p) for p in sorted(self._literal, key=len, reverse=True)))
    if special_ids is None:
      special_ids = named | {i for i in range(size)
                             if processor.is_control(i)}
    self.special_ids = frozenset(int(i) for i in special_ids)

  @property
  def bos_id(self) -> int:
    return self.sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self.sp.eos_id()

  @property
  def pad_id(self) -> int:
    return self.sp.pad_id()

  @property
  def vocab_size(self) -> int:
    return self.sp.get_piece_size()

  def encode(self, text: str, *, add_bos: bool | None = None,
             add_eos: bool = False) -> list[int]:
    """Ids of ``text``, its special pieces as their ids; one ``bos_id``
    first (with ``add_bos``) even when the text starts with ``<bos>``."""
    ids, start = [], 0
    if self._literal:
      for match in self._literal_re.finditer(text):
        if match.start() > start:
          ids += self.sp.encode(text[start:match.start()])
        ids.append(self._literal[match.group()])
        start = match.end()
    if start < len(text):
      ids += self.sp.encode(text[start:])
    if (self.add_bos if add_bos is None else add_bos) and (
        not ids or ids[0] != self.bos_id):
      ids = [self.bos_id] + ids
    if add_eos:
      ids = ids + [self.eos_id]
    return ids

  def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
    """Text of ``ids``, without `special_ids` (unless
    ``skip_special_tokens=False``; SentencePiece never writes its own
    bos, eos and pad) and without ids past the vocabulary: a
    model's embedding may have more rows than its tokenizer has pieces
    (padding), and sentencepiece raises on them, mid-generation."""
    size = self.sp.get_piece_size()
    try:
      arr = np.asarray(ids)
    except ValueError:  # ragged rows: numpy's "inhomogeneous shape"
      arr = None
    # One sequence of integer ids: a batch of rows had been joined into one
    # text, and strings or floats read as ids ('5' as 5, 1.7 as 1).
    if arr is None or arr.ndim > 1 or (
        arr.size and not np.issubdtype(arr.dtype, np.integer)):
      raise ValueError('Tokenizer.decode: ids must be one sequence of integer '
                       'token ids (decode a batch row by row); got '
                       f'{_described(ids, arr)}.')
    ids = [int(i) for i in arr.reshape(-1)]
    skip = self.special_ids if skip_special_tokens else ()
    return self.sp.decode([i for i in ids if 0 <= i < size and i not in skip])

  def id_to_piece(self, i: int) -> str:
    return self.sp.id_to_piece(int(i))

  def piece_to_id(self, piece: str) -> int:
    return self.sp.piece_to_id(piece)

  # -- constructors ----------------------------------------------------------

  @classmethod
  def from_model_file(cls, path: str, **kw) -> 'Tokenizer':
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{path}: SentencePiece model not found.')
    sp = spm.SentencePieceProcessor()
    try:
      sp.load(path)
    except (OSError, RuntimeError) as e:
      raise ValueError(f'{path}: not a SentencePiece model ({e}).') from None
    return cls(sp, **kw)

  @classmethod
  def from_gguf(cls, path: str, **kw) -> 'Tokenizer':
    from models.gemma.load import gguf_file  # pylint: disable=g-import-not-at-top
    meta = gguf_file(path).metadata
    kind = meta.get('tokenizer.ggml.model')
    if kind != 'llama':  # llama.cpp's name for SentencePiece vocabularies
      raise ValueError(f'{path}: GGUF tokenizer model is {kind!r}; expected a '
                       "SentencePiece ('llama') vocabulary.")
    proto = _proto_from_gguf(meta, path)
    sp = spm.SentencePieceProcessor()
    try:
      sp.load_from_serialized_proto(proto.SerializeToString())
    except RuntimeError as e:
      # Duplicate or empty pieces, or no 256 byte pieces: SentencePiece's
      # own check, a traceback before.
      raise ValueError(f'{path}: unusable GGUF vocabulary '
                       f'({str(e).strip().splitlines()[0]}).') from None
    add_bos = meta.get('tokenizer.ggml.add_bos_token', True)
    kw.setdefault('add_bos', bool(add_bos))
    # The GGUF's CONTROL tokens (the proto makes most USER_DEFINED, so that
    # text matches them) are what HF's skip_special_tokens leaves out.
    types = np.asarray(meta['tokenizer.ggml.token_type'], np.int64)
    control = spm_pb2.ModelProto.SentencePiece.Type.Value('CONTROL')
    kw.setdefault('special_ids', {int(i) for i in np.flatnonzero(
        types == control)} | {sp.unk_id()})
    return cls(sp, **kw)


def _described(ids, arr) -> str:
  if arr is None:
    return 'rows of different lengths'
  if arr.ndim > 1:
    return f'an array of shape {arr.shape}'
  return f'{type(ids).__name__} of {arr.dtype}'


def _proto_from_gguf(meta: dict, path: str) -> spm_pb2.ModelProto:
  """A SentencePiece BPE ModelProto with the GGUF vocabulary."""
  arrays = []
  for key in ('tokens', 'scores', 'token_type'):
    if f'tokenizer.ggml.{key}' not in meta:
      raise ValueError(f'{path}: missing GGUF metadata tokenizer.ggml.{key}.')
    arrays.append(meta[f'tokenizer.ggml.{key}'])
  tokens, scores, types = arrays
  n = len(tokens)
  if len(scores) != n or len(types) != n:
    raise ValueError(f'{path}: GGUF tokenizer arrays differ in length '
                     f'({n} tokens, {len(scores)} scores, {len(types)} types).')
  unk_id = int(meta.get('tokenizer.ggml.unknown_token_id', 3))
  bos_id = int(meta.get('tokenizer.ggml.bos_token_id', 2))
  eos_id = int(meta.get('tokenizer.ggml.eos_token_id', 1))
  pad_id = int(meta.get('tokenizer.ggml.padding_token_id', 0))
  add_space = bool(meta.get('tokenizer.ggml.add_space_prefix', False))
  for name, i in (('unknown', unk_id), ('bos', bos_id), ('eos', eos_id),
                  ('padding', pad_id)):
    if not 0 <= i < n:
      raise ValueError(f'{path}: GGUF tokenizer.ggml.{name}_token_id {i} is '
                       f'outside its vocabulary of {n} tokens.')

  proto = spm_pb2.ModelProto()
  piece_type = spm_pb2.ModelProto.SentencePiece.Type
  # llama.cpp token types use SentencePiece's numbering (1 normal, 2 unknown,
  # 3 control, 4 user defined, 5 unused, 6 byte).
  valid_types = {int(v) for v in piece_type.values()}
  scores = np.asarray(scores, np.float32).tolist()
  types = np.asarray(types, np.int64).tolist()
  for i, (piece, score, ttype) in enumerate(zip(tokens, scores, types)):
    p = proto.pieces.add()
    p.piece = piece
    p.score = float(score)
    ttype = int(ttype)
    if i == unk_id:  # SentencePiece needs exactly one UNKNOWN piece
      ttype = piece_type.Value('UNKNOWN')
    elif ttype == piece_type.Value('UNKNOWN') or ttype not in valid_types:
      ttype = piece_type.Value('NORMAL')
    elif (ttype == piece_type.Value('CONTROL') and
          i not in (bos_id, eos_id, pad_id)):
      # llama.cpp marks every special token of the HF tokenizer CONTROL, and
      # SentencePiece never matches a CONTROL piece in text: the chat markers
      # (<start_of_turn> 105, <end_of_turn> 106) would be spelt out in
      # characters. Gemma's own tokenizer.model, HF and llama.cpp all match
      # them as one token, as a USER_DEFINED piece is.
      ttype = piece_type.Value('USER_DEFINED')
    if ttype == piece_type.Value('USER_DEFINED'):
      # llama.cpp stores user-defined pieces with spaces where SentencePiece
      # has U+2581 (the runs-of-spaces tokens 138...): escaped input only
      # ever matches the latter.
      p.piece = piece.replace(' ', '\u2581')
    p.type = ttype
  ts = proto.trainer_spec
  ts.model_type = spm_pb2.TrainerSpec.ModelType.Value('BPE')
  ts.vocab_size = n
  ts.byte_fallback = True
  ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id = unk_id, bos_id, eos_id, pad_id
  # SentencePiece resolves the special ids through these piece strings.
  ts.unk_piece = proto.pieces[unk_id].piece
  ts.bos_piece = proto.pieces[bos_id].piece
  ts.eos_piece = proto.pieces[eos_id].piece
  ts.pad_piece = proto.pieces[pad_id].piece
  ns = proto.normalizer_spec
  ns.name = 'identity'
  ns.add_dummy_prefix = add_space
  ns.remove_extra_whitespaces = False
  ns.escape_whitespaces = True
  return proto


def load_tokenizer(path: str, **kw) -> Tokenizer:
  """A tokenizer from a ``tokenizer.model`` file, a directory holding one,
  or a ``.gguf`` file."""
  path = os.fspath(path)
  if os.path.isdir(path):
    model = os.path.join(path, 'tokenizer.model')
    if not os.path.isfile(model):
      raise FileNotFoundError(
          f'{path}: no tokenizer.model in this directory (pass the '
          'tokenizer.model, or a .gguf holding the vocabulary, itself).')
    return Tokenizer.from_model_file(model, **kw)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: tokenizer not found (expected a '
                            'tokenizer.model, a directory holding one, or a '
                            '.gguf file).')
  with open(path, 'rb') as f:
    magic = f.read(4)
  if magic == b'GGUF':
    return Tokenizer.from_gguf(path, **kw)
  if path.lower().endswith('.gguf'):
    # Not read as a SentencePiece model: that error would name the wrong
    # format.
    raise ValueError(f'{path}: not a GGUF file (no GGUF header; a truncated '
                     'download or another file renamed).')
  return Tokenizer.from_model_file(path, **kw)
