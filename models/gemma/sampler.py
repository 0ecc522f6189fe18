"""Greedy and sampled generation with a KV cache.

The whole generation (prefill, then one token per step in a
``lax.while_loop``) is a single jitted function, so a step costs no Python
dispatch; prompts are left-padded to a multiple of ``pad_multiple`` so
prompts of similar length share one compilation.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lora_rite_optax import checks
from models import host_arrays
from models.gemma.model import Gemma, init_cache
from models.layers import check_positive_ints, check_token_ids


def sample_logits(logits: jax.Array, key: jax.Array, *, temperature: float,
                  top_k: int | None = None,
                  top_p: float | None = None) -> jax.Array:
  """Next tokens [B] from float logits [B, V].

  ``temperature == 0`` is greedy (argmax). Otherwise logits are divided by
  the temperature and restricted to the ``top_k`` most likely tokens and to
  the smallest set whose probability reaches ``top_p`` (nucleus).

  Raises:
    ValueError: see :func:`check_sampling`.
  """
  temperature, top_k, top_p = check_sampling(temperature, top_k, top_p,
                                             logits.shape[-1])
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  finite = jnp.isfinite(logits)
  logits = logits.astype(jnp.float32) / temperature
  # A temperature so small that the division overflows (1e-40) had put inf
  # in the logits, and categorical then returned token 0: such a row is
  # greedy, as the temperature's limit is.
  overflowed = jnp.any(finite & ~jnp.isfinite(logits), axis=-1)
  if top_k is not None and top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None and top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token while the mass before it is below top_p, and always the
    # top token: with none kept every logit would be -inf, and categorical
    # would return token 0 whatever the logits.
    before = jnp.cumsum(probs, axis=-1) - probs
    top = jax.lax.broadcasted_iota(jnp.int32, probs.shape, probs.ndim - 1) == 0
    keep = (before < top_p) | top
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf),
                     axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  sampled = jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
  return jnp.where(overflowed, greedy, sampled)


def check_sampling(temperature: float, top_k: int | None,
                   top_p: float | None, vocab: int
                   ) -> tuple[float, int | None, float | None]:
  """Refuses sampling settings that would silently sample something else.

  Returns:
    ``(temperature, top_k, top_p)`` as Python numbers (any integer scalar
    is a ``top_k``: NumPy's and JAX's too); greedy decoding
    (``temperature == 0``) ignores ``top_k`` and ``top_p``, so they are
    not checked then.

  Raises:
    ValueError: ``temperature`` < 0 (it would invert the distribution) or
      not a finite number,
      ``top_k`` not None / 0 (off) or an integer in 1..``vocab``, or
      ``top_p`` not None or in (0, 1].
  """
  value = checks.concrete(temperature)
  if (isinstance(temperature, (str, bool)) or value is None or
      not 0 <= value < math.inf):  # NaN and inf included
    # inf samples uniformly from the whole vocabulary; a string had been a
    # TypeError from the comparison.
    raise ValueError(f'temperature must be a finite number >= 0 (0 decodes '
                     f'greedily), got {temperature!r}.')
  temperature = float(temperature)
  if temperature == 0.0:
    return temperature, None, None
  if top_k is not None:
    try:
      k = -1 if isinstance(top_k, bool) else operator.index(top_k)
    except TypeError:  # 2.0, '2': not an integer
      k = -1
    if not 0 <= k <= vocab:
      raise ValueError(f'top_k must be None or 0 (off) or an integer in '
                       f'1..{vocab} (the vocabulary), got {top_k!r}.')
    top_k = k
  if top_p is not None:
    if isinstance(top_p, (str, bool)) or not 0 < top_p <= 1:
      raise ValueError(f'top_p must be in (0, 1] (None or 1 is off), got '
                       f'{top_p}.')
    top_p = float(top_p)
  return temperature, top_k, top_p


@dataclasses.dataclass
class SamplerOutput:
  tokens: list[list[int]]           # generated ids per prompt (eos excluded)
  text: list[str] | None            # decoded, when a tokenizer was given
  logits: np.ndarray | None = None  # [B, steps, V] when return_logits


def _generate(state, tokens, mask, key, *, graphdef, max_new_tokens,
              cache_size, temperature, top_k, top_p, stop_ids, pad_id,
              return_logits):
  model: Gemma = nnx.merge(graphdef, state)
  # Generation is inference: no dropout (a LoRA adapter's included),
  # whatever mode the caller's model is in (this merged copy is local).
  model.eval()
  b, p = tokens.shape
  cache = init_cache(model.config, b, cache_size, model.dtype)
  # Prompts are left-padded, so every row's last prompt token is at p - 1.
  logits, cache = model(tokens, attention_mask=mask, cache=cache,
                        logits_positions=jnp.array([p - 1]))
  logits = logits[:, -1]
  vocab = logits.shape[-1]
  out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
  out_logits = jnp.zeros((b, max_new_tokens if return_logits else 0, vocab),
                         jnp.float32)

  def pick(i, logits, key, done, out, out_logits):
    """Samples token i of every row not yet done and records it."""
    key, sub = jax.random.split(key)
    tok = sample_logits(logits, sub, temperature=temperature, top_k=top_k,
                        top_p=top_p)
    tok = jnp.where(done, pad_id, tok)
    out = out.at[:, i].set(tok)
    if return_logits:
      out_logits = out_logits.at[:, i].set(logits)
    if stop_ids:
      done = done | jnp.isin(tok, jnp.asarray(stop_ids, jnp.int32))
    return tok, key, done, out, out_logits

  # Token i is fed back only while another is wanted: the step after the
  # last token (the max_new_tokens-th, or the stop that ended every row)
  # had been run and its logits thrown away.
  def cond(carry):
    i, _, _, _, done, _, _ = carry
    return (i < max_new_tokens - 1) & ~jnp.all(done)

  def body(carry):
    i, cache, tok, key, done, out, out_logits = carry
    logits, cache = model(tok[:, None], cache=cache)
    tok, key, done, out, out_logits = pick(i + 1, logits[:, -1], key, done,
                                           out, out_logits)
    return i + 1, cache, tok, key, done, out, out_logits

  tok, key, done, out, out_logits = pick(
      0, logits, key, jnp.zeros((b,), bool), out, out_logits)
  carry = (jnp.zeros((), jnp.int32), cache, tok, key, done, out, out_logits)
  i, _, _, _, _, out, out_logits = jax.lax.while_loop(cond, body, carry)
  return i + 1, out, out_logits


def _stop_ids(tokenizer) -> tuple[int, ...]:
  """EOS, and <eos> and <end_of_turn> where the vocabulary has them (an
  instruction-tuned GGUF may name <end_of_turn> its EOS: <eos> still ends
  a reply)."""
  if tokenizer is None:
    return (1,)
  ids = [tokenizer.eos_id]
  sp = getattr(tokenizer, 'sp', None)
  if sp is not None:
    for piece in ('<eos>', '<end_of_turn>'):
      i = sp.piece_to_id(piece)
      if i != sp.unk_id() and sp.id_to_piece(i) == piece and i not in ids:
        ids.append(int(i))
  return tuple(ids)


class Sampler:
  """Generates continuations of prompts with a `Gemma` model.

  Args:
    model: the model. Each call uses its current weights and structure: a
      LoRA attached, merged (``merge_lora``) or removed after the sampler
      was built is seen (the module is split again when its structure has
      changed). It runs in eval mode (no dropout) whatever mode ``model``
      is in; ``model`` itself is left as it is.
    tokenizer: optional `models.gemma.tokenizer.Tokenizer` so prompts may be
      strings and outputs come back as text.
    pad_multiple: prompts are left-padded to a multiple of this length to
      limit recompilation.
  """

  def __init__(self, model: Gemma, tokenizer=None, *, pad_multiple: int = 16):
    self._model = model
    self.config = model.config
    self.tokenizer = tokenizer
    check_positive_ints('Sampler', pad_multiple=pad_multiple)
    self.pad_multiple = operator.index(pad_multiple)
    self.graphdef = None
    self._split()

  def set_model(self, model: Gemma) -> None:
    """Generates with ``model`` from now on: another instance of the same
    graph (a fresh merge of new weights) reuses the compiled generation."""
    self._model = model
    self._split()

  def _split(self) -> None:
    """Splits the model, compiling again only if its structure changed.

    The graphdef holds each adapter's ``merged`` flag: a sampler split
    before ``merge_lora`` would add the merged adapter a second time. The
    split walks the module once (tens of ms for a 270M model), small beside
    a generation.
    """
    graphdef, self.state = nnx.split(self._model)
    if graphdef == self.graphdef:
      return
    self.graphdef = graphdef
    self._fn = jax.jit(
        functools.partial(_generate, graphdef=self.graphdef),
        static_argnames=('max_new_tokens', 'cache_size', 'temperature',
                         'top_k', 'top_p', 'stop_ids', 'pad_id',
                         'return_logits'))

  def __call__(self, prompts: Sequence[str] | Sequence[Sequence[int]] | str,
               max_new_tokens: int, *, temperature: float = 0.0,
               top_k: int | None = None, top_p: float | None = None,
               seed: int = 0, stop_at_eos: bool = True,
               return_logits: bool = False,
               batch_sharding: jax.sharding.Sharding | None = None
               ) -> SamplerOutput:
    """Generates up to ``max_new_tokens`` tokens after each prompt.

    Args:
      prompts: strings (needs a tokenizer; bos is prepended) or lists of ids.
      max_new_tokens: number of tokens to generate.
      temperature: 0 for greedy decoding, else the sampling temperature.
      top_k, top_p: optional top-k (1..vocab; 0 is off) / nucleus
        ((0, 1]) restriction when sampling.
      seed: PRNG seed for sampling.
      stop_at_eos: stop a row at the tokenizer's eos (default id 1) and,
        where the vocabulary has it, at ``<end_of_turn>``, which ends the
        replies of Gemma's instruction-tuned models (their generation
        config stops at both).
      return_logits: also return the float32 logits each token was chosen
        from, [B, steps, V].
      batch_sharding: where the prompt rows go, e.g. split over a mesh's
        data axes (the number of prompts must divide over it; on several
        processes each passes the same prompts); default the default
        device.

    Raises:
      ValueError: max_new_tokens < 1 or past the model's context with the
        prompt, a sampling setting out of range (see
        :func:`check_sampling`), a seed that is not a 64-bit int, an empty
        prompt, or a token id outside the vocabulary.
    """
    if isinstance(prompts, str):
      prompts = [prompts]
    if not checks.is_integer(max_new_tokens):
      raise ValueError(f'max_new_tokens must be an int, got '
                       f'{max_new_tokens!r}.')
    max_new_tokens = operator.index(max_new_tokens)
    if max_new_tokens < 1:
      raise ValueError(f'max_new_tokens must be >= 1, got {max_new_tokens}.')
    # A flat list of ids ([2, 5, 6]) would have been read as three prompts.
    rows = prompts if isinstance(prompts, (list, tuple)) else (
        list(prompts) if np.ndim(prompts) == 2 else None)
    if rows is None or any(not isinstance(pr, str) and np.ndim(pr) != 1
                           for pr in rows):
      raise ValueError('Sampler prompts must be a string, a list of strings '
                       'or a list of id lists, one per prompt (one prompt\'s '
                       'ids: [[2, 5, 6]]), got '
                       f'{str(prompts) if rows is None else rows}'[:200] + '.')
    prompts = rows
    temperature, top_k, top_p = check_sampling(temperature, top_k, top_p,
                                               self.config.vocab_size)
    # A Python int first: a JAX int32 seed compared with -2**63 overflows.
    if not checks.is_integer(seed) or not (
        -2**63 <= operator.index(seed) < 2**63):
      # Else a TypeError or OverflowError from inside jax.random.key.
      raise ValueError(f'seed must be an int in [-2**63, 2**63), got '
                       f'{seed!r}.')
    seed = operator.index(seed)
    ids = []
    for pr in prompts:
      if isinstance(pr, str):
        if self.tokenizer is None:
          raise ValueError('Sampler got a text prompt but no tokenizer.')
        ids.append(self.tokenizer.encode(pr))
      else:
        row = np.asarray(pr)
        if row.size and not np.issubdtype(row.dtype, np.integer):
          # 3.9 had been read as id 3 and True as 1 (the model refuses both).
          raise ValueError(f'Sampler prompt ids must be integers, got '
                           f'{row.dtype} ids {checks.shown(pr)}.')
        ids.append([int(t) for t in row])
    if not ids or min(len(x) for x in ids) == 0:
      raise ValueError('Sampler prompts must be non-empty.')
    for x in ids:
      check_token_ids(x, self.config.vocab_size, 'Sampler prompt')
    longest = max(len(x) for x in ids)
    if longest + max_new_tokens > self.config.max_seq_len:
      # A cache that size had failed to allocate (or overflowed an int32)
      # after the model was compiled for it.
      raise ValueError(
          f'the prompt ({longest} tokens) and max_new_tokens '
          f'({max_new_tokens}) exceed the model\'s context of '
          f'{self.config.max_seq_len} tokens.')
    self._split()
    pad_id = self.tokenizer.pad_id if self.tokenizer is not None else 0
    stop_ids = _stop_ids(self.tokenizer) if stop_at_eos else ()
    p = -(-longest // self.pad_multiple) * self.pad_multiple
    tokens = np.full((len(ids), p), pad_id, np.int32)
    mask = np.zeros((len(ids), p), bool)
    for r, x in enumerate(ids):
      tokens[r, p - len(x):] = x
      mask[r, p - len(x):] = True
    if batch_sharding is None:
      put = jnp.asarray
    else:
      put = functools.partial(host_arrays.global_array,
                              sharding=batch_sharding)
    steps, out, logits = self._fn(
        self.state, put(tokens), put(mask),
        jax.random.key(seed), max_new_tokens=max_new_tokens,
        cache_size=p + max_new_tokens, temperature=float(temperature),
        top_k=top_k, top_p=top_p, stop_ids=stop_ids,
        pad_id=pad_id, return_logits=return_logits)
    steps = int(host_arrays.to_host(steps))
    out = host_arrays.to_host(out)[:, :steps]
    result = []
    for row in out:
      row = row.tolist()
      cut = [row.index(t) for t in stop_ids if t in row]
      if cut:
        row = row[:min(cut)]
      result.append(row)
    text = ([self.tokenizer.decode(r) for r in result]
            if self.tokenizer is not None else None)
    return SamplerOutput(tokens=result, text=text,
                         logits=(host_arrays.to_host(logits)[:, :steps]
                                 if return_logits else None))


def generate(model: Gemma, prompts, max_new_tokens: int, *, tokenizer=None,
             **kw) -> SamplerOutput:
  """One-off `Sampler(model, tokenizer)(prompts, max_new_tokens, **kw)`."""
  return Sampler(model, tokenizer)(prompts, max_new_tokens, **kw)
