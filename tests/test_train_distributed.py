"""Multi-host training on one machine: two processes with 4 fake CPU devices
each, joined by `jax.distributed.initialize` over loopback, give the same
losses as one process with 8 devices (same mesh, same global batches)."""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests import xla_flags

ROOT = Path(__file__).resolve().parents[1]

WORKER = r'''
import json, os, sys
os.environ['XLA_FLAGS'] += ' --xla_force_host_platform_device_count=' + sys.argv[1]
os.environ['JAX_PLATFORMS'] = 'cpu'
from train import configs, loop
port, num, pid, run_dir = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
changes = {
    'steps': 3, 'log_every': 1, 'batch_size': 8, 'checkpoint_every': 0,
    'run_dir': run_dir, 'progress': False, 'export_adapter': True,
    'model.name': 'gemma-tiny', 'lora.targets': ('q', 'v'),
    'optim.name': 'adam', 'data.seq_len': 64,
    # Every axis used: batch over data x fsdp, weights over fsdp and tensor.
    'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2,
}
# More changes as a JSON object.
changes.update(json.loads(sys.argv[6]) if len(sys.argv) > 6 else {})
if num > 1:
  changes.update({'distributed.coordinator_address': '127.0.0.1:' + port,
                  'distributed.num_processes': num,
                  'distributed.process_id': pid})
cfg = configs.replace(configs.get_config('tiny'), **changes)
summary = loop.run(cfg, log=lambda s: None)
import jax
if jax.process_index() == 0:
  print('LOSSES ' + json.dumps([h['loss'] for h in summary['history']]))
'''


def _free_port() -> int:
  """A port free now, below Linux's ephemeral range (32768 and up): the
  coordinator binds it seconds later, after importing jax, and a port the
  kernel had handed out (bind to 0) could meanwhile go to any outgoing
  connection; a coordinator whose port is taken leaves both processes
  waiting until the test's timeout."""
  for port in random.Random().sample(range(20000, 32000), 50):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
      try:
        s.bind(('127.0.0.1', port))
      except OSError:
        continue
      return port
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _losses(stdout: str):
  for line in stdout.splitlines():
    if line.startswith('LOSSES '):
      return json.loads(line[len('LOSSES '):])
  return None


def _two_processes(argv_of, timeout: int) -> list[tuple[int, str, str]]:
  """(returncode, stdout, stderr) of two processes ``python -c *argv_of(i)``
  run together; both are killed if either outlives ``timeout``."""
  procs = [subprocess.Popen(
      [sys.executable, '-c', *argv_of(i)], cwd=ROOT, env=xla_flags.script_env(),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  try:
    outs = [p.communicate(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


@pytest.mark.xdist_group('train_distributed')
def test_two_processes_match_one(tmp_path):
  port = str(_free_port())
  # With LoRA dropout, as every paper preset has: its keys had been refused
  # by the placement on the mesh across processes, before the first step.
  changes = json.dumps({'lora.dropout': 0.1})
  outs = _two_processes(lambda i: (WORKER, '4', port, '2', str(i),
                                   str(tmp_path / 'multi'), changes), 420)
  for code, _, err in outs:
    assert code == 0, err[-3000:]
  multi = _losses(outs[0][1])
  single_proc = subprocess.run(
      [sys.executable, '-c', WORKER, '8', '0', '1', '0',
       str(tmp_path / 'single'), changes], cwd=ROOT, env=xla_flags.script_env(),
      capture_output=True, text=True, timeout=420)
  assert single_proc.returncode == 0, single_proc.stderr[-3000:]
  single = _losses(single_proc.stdout)
  assert multi is not None and single is not None
  assert len(multi) == len(single) == 3
  assert multi == pytest.approx(single, rel=1e-5, abs=1e-6)
  # Process 0 wrote the metrics and the adapter; the checkpoint is shared.
  assert (tmp_path / 'multi' / 'metrics.csv').is_file()
  assert (tmp_path / 'multi' / 'adapter' / 'adapter_config.json').is_file()
  assert (tmp_path / 'multi' / 'checkpoints' / '3').is_dir()
  # Each process saved its own data position, and they are one position
  # (every process reads the same global batches): what lets a resume on
  # another number of processes read either.
  data = tmp_path / 'multi' / 'checkpoints' / '3' / 'data'
  assert ((data / 'process_0-of-2.json').read_text() ==
          (data / 'process_1-of-2.json').read_text())


@pytest.mark.xdist_group('train_distributed')
@pytest.mark.parametrize('init', ['lora_ga', 'pissa'])
def test_svd_inits_over_two_processes_save_and_export(tmp_path, init):
  """Its initial factors span both processes: process 0 alone had fetched
  them (to save them for a resume, and for the rank-2r export against the
  original base) and failed, the other waiting minutes on its barrier.
  PiSSA too: its new kernel of a random base (on one device) had been
  pinned there, and the base's placement across processes refused it."""
  port = str(_free_port())
  # Layers split over all four devices of each process and both processes
  # (data=2 had kept a whole copy on each).
  changes = json.dumps({'lora.init': init, 'lora.ga_batches': 1,
                        'mesh.data': 1, 'mesh.fsdp': 4, 'mesh.tensor': 2})
  outs = _two_processes(lambda i: (WORKER, '4', port, '2', str(i),
                                   str(tmp_path / 'ga'), changes), 420)
  for code, _, err in outs:
    assert code == 0, err[-3000:]
  assert (tmp_path / 'ga' / 'lora_initial_factors.safetensors').is_file()
  config = json.loads(
      (tmp_path / 'ga' / 'adapter' / 'adapter_config.json').read_text())
  assert config['r'] == 2 * 4  # [A, A0] [B; -B0]: the tiny preset's rank 4


@pytest.mark.xdist_group('train_distributed')
def test_a_run_dir_each_host_has_alone_is_refused_on_every_process(tmp_path):
  """A run_dir not shared (a relative one on each host's own disk) had
  trained to the first checkpoint, where one process failed and the other
  waited minutes on its barrier before aborting with stack traces."""
  port = str(_free_port())
  outs = _two_processes(lambda i: (WORKER, '4', port, '2', str(i),
                                   str(tmp_path / f'own_{i}')), 300)
  for i, (code, _, err) in enumerate(outs):
    assert code != 0, err[-2000:]
    assert (f'ConfigError: run_dir {tmp_path / f"own_{i}"} is not one folder '
            'every process sees') in err, err[-2000:]
    assert not (tmp_path / f'own_{i}' / 'checkpoints').exists()
    assert not list((tmp_path / f'own_{i}').glob('.shared-check-*'))


def _boolq_file(path, word: str = 'even',
                said: str = 'the correct answer is') -> str:
  path.write_text(json.dumps([
      {'instruction': f'Please answer the following question with true or '
                      f'false, question: is {i} {word}?\n\nAnswer format: '
                      'true/false', 'input': '',
       'output': f'{said} {str(i % 2 == 0).lower()}',
       'answer': str(i % 2 == 0).lower()} for i in range(24)]))
  return str(path)


@pytest.mark.xdist_group('train_distributed')
def test_a_file_missing_on_one_host_stops_every_process(tmp_path):
  """Each host reads its own copy of the data: the host missing it had
  raised alone, and the other waited in the model's placement (a
  collective) until a timeout ended it in a stack trace (gloo's 30 s here,
  the job's on a pod)."""
  port = str(_free_port())
  train = _boolq_file(tmp_path / 'train.json')
  changes = [json.dumps({'data.task': 'boolq', 'data.path': path})
             for path in (train, str(tmp_path / 'only_on_host_0.json'))]
  outs = _two_processes(lambda i: (WORKER, '4', port, '2', str(i),
                                   str(tmp_path / 'run'), changes[i]), 240)
  (code0, _, err0), (code1, _, err1) = outs
  assert code0 != 0 and code1 != 0, (err0[-2000:], err1[-2000:])
  assert 'only_on_host_0.json' in err1, err1[-2000:]
  assert ('AnotherProcessFailed: another process failed to read its data, '
          'tokenizer or model files (its log says why); this process stops '
          'with it.') in err0, err0[-2000:]
  assert not (tmp_path / 'run').exists()


@pytest.mark.xdist_group('train_distributed')
def test_a_weight_file_missing_on_one_host_is_refused_on_every_host(
    tmp_path):
  """The weights are read after the set-up every host agrees on: a host
  missing model.safetensors had raised alone in the model's load, the
  other waiting in its placement until a timeout."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from models import gemma  # pylint: disable=g-import-not-at-top
  model = gemma.Gemma(gemma.get_config('gemma-tiny').replace(vocab_size=512),
                      rngs=nnx.Rngs(0))
  for i in range(2):
    gemma.save_pretrained(model, str(tmp_path / f'model_{i}'))
  (tmp_path / 'model_1' / 'model.safetensors').unlink()
  port = str(_free_port())
  train = _boolq_file(tmp_path / 'train.json')
  changes = [json.dumps({'data.task': 'boolq', 'data.path': train,
                         'model.path': str(tmp_path / f'model_{i}'),
                         'model.tokenizer': 'byte'}) for i in range(2)]
  outs = _two_processes(lambda i: (WORKER, '4', port, '2', str(i),
                                   str(tmp_path / 'run'), changes[i]), 240)
  for code, _, err in outs:
    assert code != 0, err[-2000:]
    assert ('ConfigError: the processes hold different base model files'
            in err), err[-2000:]
  assert not (tmp_path / 'run').exists()


@pytest.mark.xdist_group('train_distributed')
def test_hosts_with_different_evaluation_files_are_refused(tmp_path):
  """Only the training examples had been compared across hosts: another
  evaluation file on one host scored other questions there, silently."""
  port = str(_free_port())
  train = _boolq_file(tmp_path / 'train.json')
  # Host 1's options (worded as its outputs) are too long for a scoring
  # row: refused there alone by the evaluator's check, had that run first.
  evals = [_boolq_file(tmp_path / 'eval_0.json', 'odd'),
           _boolq_file(tmp_path / 'eval_1.json', 'prime',
                       'having weighed the question with care, ' * 3
                       + 'the correct answer is')]
  changes = [json.dumps({'data.task': 'boolq', 'data.path': train,
                         'data.eval_path': path, 'eval.after': True})
             for path in evals]
  outs = _two_processes(lambda i: (WORKER, '4', port, '2', str(i),
                                   str(tmp_path / 'run'), changes[i]), 240)
  for code, _, err in outs:
    assert code != 0, err[-2000:]
    assert ('ConfigError: the processes hold different evaluation examples '
            '(22 training and 16 evaluation examples here)') in err, (
                err[-2000:])
  assert not (tmp_path / 'run').exists()


FAILING_WORKER = WORKER.replace('cfg = configs.replace(', '''
if pid == 0:  # process 0's metrics write fails at step 2 (a full disk)
  from train import metrics
  write = metrics.MetricsWriter.write
  def failing(self, step, row, **kwargs):
    if step >= 2 and self.enabled and 'loss' in row:
      raise OSError('metrics.csv: cannot write (No space left on device)')
    return write(self, step, row, **kwargs)
  metrics.MetricsWriter.write = failing
cfg = configs.replace(''', 1)


OPEN_FAILING_WORKER = WORKER.replace('cfg = configs.replace(', '''
if pid == 0:  # process 0 cannot rewrite its CSVs (a full disk on a resume)
  from train import metrics
  opened = metrics.MetricsWriter.__init__
  def failing(self, *args, **kwargs):
    opened(self, *args, **kwargs)
    if self.enabled:
      raise OSError('metrics.csv: cannot write (No space left on device)')
  metrics.MetricsWriter.__init__ = failing
cfg = configs.replace(''', 1)


@pytest.mark.xdist_group('train_distributed')
@pytest.mark.parametrize('worker, what', [
    (FAILING_WORKER, 'its metrics or evaluation rows'),
    (OPEN_FAILING_WORKER, 'metrics.csv or eval.csv')])
def test_a_write_that_fails_on_process_0_stops_every_process(tmp_path,
                                                             worker, what):
  """Process 0 alone writes the metrics: it had raised alone, and the
  other process waited in the next step's collective until the job's
  timeout, then died in stack traces."""
  port = str(_free_port())
  outs = _two_processes(lambda i: (worker, '4', port, '2', str(i),
                                   str(tmp_path / 'full')), 240)
  (code0, _, err0), (code1, _, err1) = outs
  assert code0 != 0 and code1 != 0, (err0[-2000:], err1[-2000:])
  assert 'metrics.csv: cannot write (No space left on device)' in err0, (
      err0[-2000:])
  assert (f'process 0 could not write {what} (its log says why); this '
          'process stops with it.') in err1, err1[-2000:]


EXPORT_FAILING_WORKER = WORKER.replace('cfg = configs.replace(', '''
if pid == 0:  # process 0's adapter write fails (a read-only folder)
  from models import lora
  def failing(*args, **kwargs):
    raise OSError('adapter: cannot write (Read-only file system)')
  lora.save_peft_adapter = failing
cfg = configs.replace(''', 1)


@pytest.mark.xdist_group('train_distributed')
def test_an_export_that_fails_on_process_0_leaves_the_others_free(tmp_path):
  """Process 0 alone writes the adapter, after every collective: a check
  across processes placed after it had left the other process waiting for
  process 0, which had raised."""
  port = str(_free_port())
  outs = _two_processes(lambda i: (EXPORT_FAILING_WORKER, '4', port, '2',
                                   str(i), str(tmp_path / 'ro')), 240)
  (code0, _, err0), (code1, _, err1) = outs
  assert code0 != 0 and ('adapter: cannot write (Read-only file system); '
                         'checkpoint 3 is saved') in err0, err0[-2000:]
  assert code1 == 0, err1[-2000:]


T5_WORKER = r'''
import sys
import jax
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize('127.0.0.1:' + sys.argv[1], num_processes=2,
                           process_id=int(sys.argv[2]))
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from models import t5
mesh = Mesh(np.array(jax.devices()), ('data',))
put = lambda x, spec: jax.make_array_from_callback(
    x.shape, NamedSharding(mesh, spec), lambda i: np.asarray(x)[i])
model = t5.T5(t5.get_config('tiny', num_layers=1, num_decoder_layers=1),
              rngs=nnx.Rngs(0))
nnx.update(model, jax.tree.map(lambda x: put(x, P()), nnx.state(model)))
enc = np.full((2, 6), 5, np.int32)
out = t5.greedy_generate(model, put(enc, P('data')), 2)
print('GENERATED', out.shape)
'''


@pytest.mark.xdist_group('train_distributed')
def test_t5_generation_over_two_processes():
  # The loop's T5 evaluation hands greedy_generate a batch spread over the
  # processes: its token-id check must not fetch the other process's rows
  # (which fails), nor refuse in one process while the other waits.
  port = str(_free_port())
  outs = _two_processes(lambda i: (T5_WORKER, port, str(i)), 300)
  for _, out, err in outs:
    assert 'GENERATED (2, 2)' in out, err[-3000:]


@pytest.mark.parametrize('chips, env, called', [
    (4, '', True),          # a TPU VM made with gcloud: no env var
    (0, 'w0,w1', True),     # GKE's TPU_WORKER_HOSTNAMES
    (0, '', False),         # CPU or GPU host without a coordinator
])
def test_auto_initializes_on_a_cloud_tpu_vm(monkeypatch, chips, env, called):
  """'auto' had looked for TPU_WORKER_HOSTNAMES only, which a TPU VM made
  with gcloud need not set: its pod slice then ran without the
  distributed runtime."""
  from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from train import configs, distributed  # pylint: disable=g-import-not-at-top
  calls = []
  monkeypatch.setattr(hardware_utils, 'num_available_tpu_chips_and_device_id',
                      lambda: (chips, None))
  monkeypatch.setattr(jax.distributed, 'initialize',
                      lambda **kw: calls.append(kw))
  monkeypatch.setattr(distributed, '_initialized', False)
  monkeypatch.setenv('TPU_WORKER_HOSTNAMES', env)
  assert distributed.maybe_initialize(configs.DistributedConfig()) == called
  assert calls == ([{}] if called else [])


def _no_tpu(monkeypatch):
  """Off a TPU, with no multi-process start made yet."""
  from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
  from train import distributed  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(hardware_utils, 'num_available_tpu_chips_and_device_id',
                      lambda: (0, None))
  monkeypatch.setattr(distributed, '_initialized', False)
  monkeypatch.setenv('TPU_WORKER_HOSTNAMES', '')


@pytest.mark.parametrize('changes, message', [
    ({'num_processes': 2}, 'distributed.num_processes given, but no '
     'multi-process start: give distributed.coordinator_address'),
    ({'process_id': 1, 'initialize': 'never'},
     'distributed.process_id given, but no multi-process start: '
     'distributed.initialize is never'),
])
def test_process_flags_without_a_start_are_refused(monkeypatch, changes,
                                                   message):
  """Off a TPU with no coordinator they had been ignored: each host trained
  alone, as if it were the only one."""
  from train import configs, distributed  # pylint: disable=g-import-not-at-top
  _no_tpu(monkeypatch)
  with pytest.raises(ValueError, match=message):
    distributed.maybe_initialize(configs.DistributedConfig(**changes))


def test_a_malformed_coordinator_or_a_failed_start_is_one_line(monkeypatch):
  """An address without a port had been an IndexError inside jax, and a
  start that fails (a port in use) 26 lines."""
  import jax  # pylint: disable=g-import-not-at-top
  from train import configs, distributed  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(distributed, '_initialized', False)
  for address in ('127.0.0.1', '127.0.0.1:notaport', ':1234', 'h:70000'):
    with pytest.raises(ValueError) as e:
      distributed.maybe_initialize(configs.DistributedConfig(
          coordinator_address=address, num_processes=1, process_id=0))
    assert str(e.value) == ('distributed.coordinator_address must read '
                            'host:port with a port in 1-65535, got '
                            f'{address!r}.')

  def refuse(**unused_kw):
    raise jax.errors.JaxRuntimeError('UNKNOWN: Failed to start RPC server\n'
                                     'more')

  monkeypatch.setattr(jax.distributed, 'initialize', refuse)
  with pytest.raises(ValueError) as e:
    distributed.maybe_initialize(configs.DistributedConfig(
        coordinator_address='[::1]:1234', num_processes=1, process_id=0))
  assert str(e.value) == ('distributed: jax.distributed.initialize failed '
                          '(UNKNOWN: Failed to start RPC server).')
  assert not distributed._initialized  # pylint: disable=protected-access


def test_mesh_shape_infers_one_axis_and_refuses_bad_sizes():
  import types  # pylint: disable=g-import-not-at-top
  from train import distributed  # pylint: disable=g-import-not-at-top
  mesh = lambda d, f, t: types.SimpleNamespace(data=d, fsdp=f, tensor=t)
  assert distributed.mesh_shape(mesh(-1, 2, 2), 8) == (2, 2, 2)
  assert distributed.mesh_shape(mesh(1, -1, 1), 8) == (1, 8, 1)
  for sizes, message in (((-1, 3, 1), 'does not divide the 8 devices'),
                         ((-1, 0, 1), 'must be positive, with at most one -1'),
                         ((-1, -1, 1), 'must be positive, with at most one -1'),
                         ((-2, -2, 2), 'must be positive, with at most one -1'),
                         ((-2, 1, -4), 'must be positive, with at most one -1'),
                         ((2, 2, 1), 'needs 4 devices, have 8')):
    with pytest.raises(ValueError, match=message):
      distributed.mesh_shape(mesh(*sizes), 8)


def test_maybe_initialize_arguments_and_bounds(monkeypatch):
  """process_id 0 is a given id (refused without a start, passed with one);
  ports 1 and 65535 are valid, 0 and 65536 not; an unknown `initialize` is
  refused; the runtime is started once per process."""
  import jax  # pylint: disable=g-import-not-at-top
  from train import configs, distributed  # pylint: disable=g-import-not-at-top
  _no_tpu(monkeypatch)
  cfg = configs.DistributedConfig
  with pytest.raises(ValueError, match='distributed.process_id given'):
    distributed.maybe_initialize(cfg(process_id=0))
  with pytest.raises(ValueError, match="must be 'auto', 'always' or 'never'"):
    distributed.maybe_initialize(cfg(initialize='sometimes'))
  for port in ('0', '65536'):
    with pytest.raises(ValueError, match='port in 1-65535'):
      distributed.maybe_initialize(cfg(coordinator_address='h:' + port))
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize',
                      lambda **kw: calls.append(kw))
  for port in ('1', '65535'):
    monkeypatch.setattr(distributed, '_initialized', False)
    assert distributed.maybe_initialize(cfg(
        coordinator_address='h:' + port, num_processes=2, process_id=0))
  assert distributed.maybe_initialize(cfg(coordinator_address='h:1'))
  assert calls == [{'coordinator_address': f'h:{p}', 'num_processes': 2,
                    'process_id': 0} for p in ('1', '65535')]


def test_parse_rules_refuses_a_rule_without_a_name_or_with_an_unknown_axis():
  from train import distributed  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="must read 'logical=mesh_axis'"):
    distributed.parse_rules(['=fsdp'])
  with pytest.raises(ValueError, match="unknown mesh axis 'fsdpp'"):
    distributed.parse_rules(['embed=fsdpp'])
  assert distributed.parse_rules([' embed = fsdp ', 'norm=']) == {
      'embed': 'fsdp', 'norm': None}


def test_logical_to_spec_shards_only_where_it_can():
  """Each mesh axis once per array, never on a dimension it does not divide
  or of size 1; trailing replicated dimensions are left out of the spec."""
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  from train import distributed  # pylint: disable=g-import-not-at-top
  mesh = types.SimpleNamespace(shape={'data': 1, 'fsdp': 4, 'tensor': 2})
  rules = {'embed': 'fsdp', 'heads': 'tensor', 'mlp': 'tensor',
           'kv_heads': 'tensor', 'norm': None, 'batch': 'data'}
  spec = lambda axes, shape: distributed.logical_to_spec(axes, shape, rules,
                                                         mesh)
  assert spec(('embed', 'mlp'), (8, 6)) == P('fsdp', 'tensor')
  assert spec(('heads', 'mlp'), (4, 6)) == P('tensor')  # tensor used once
  assert spec(('kv_heads', 'embed'), (1, 8)) == P(None, 'fsdp')  # 1 head
  assert spec(('embed', 'norm'), (8, 3)) == P('fsdp')  # no trailing None
  assert spec(('batch', 'embed'), (8, 8)) == P(None, 'fsdp')  # size-1 axis
  assert spec(('lora_rank', 'embed'), (8, 8)) == P(None, 'fsdp')  # no rule
  assert spec(None, (8,)) == P()


def test_batch_sharding_splits_the_rows_after_the_leading_axes():
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from jax.sharding import AbstractMesh  # pylint: disable=g-import-not-at-top
  from train import distributed  # pylint: disable=g-import-not-at-top
  mesh = AbstractMesh((2, 2, 1), ('data', 'fsdp', 'tensor'))
  rows = distributed.BATCH_AXES
  assert distributed.batch_sharding(mesh, 2).spec == P(rows, None)
  assert distributed.batch_sharding(mesh, 3, leading=1).spec == P(
      None, rows, None)
  assert distributed.batch_sharding(mesh, 1).spec == P(rows)
