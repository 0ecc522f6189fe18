"""The comparison in one table: every task's headline test, across budgets.

``python benchmarks/summary_table.py`` reads the ``summary_<budget>.json``
files that ``benchmarks/reproduce.py`` writes under ``docs/results/`` and
prints the Markdown table at the top of ``docs/results/README.md`` (and in
the main README): per task and measure, each optimizer's mean over seeds at
its chosen rate, and against LoRA-RITE the p of the paired difference (a
bootstrap over seeds and items together), how many seeds have the
difference's sign (``2/3``: two of three), and the p of a t-test over the
seeds' mean differences (``t-test p``).

Each row names the budget it comes from: GSM8K is scored on the math runs
retrained without its test questions (``small-decontam``), the rest on
``small``. GSM8K has two rows: the headline one counts only the items whose
target (an LLM-written chain of thought, scored by loss) ends on the gold
answer (``gsm8k_consistent``, 80 of the 150); the other counts all 150,
70 of them targets ending on a wrong number or none. Those counts come from
the summary (its ``target_consistency``), as reproduce.py measured them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

OPTIMIZERS = (('lora_rite', 'LoRA-RITE'), ('adam', 'Adam'),
              ('loraplus', 'LoRA+'), ('scaled_adam', 'ScaledAdam'),
              ('lamb', 'Lamb'), ('shampoo', 'Shampoo'))

# (budget, task, test set, row label); a label's {n} is the number of test
# items scored, its {kept}, {scored} and {disagree} the summary's count of
# items whose target ends on the gold answer.
ROWS = (
    ('small', 'arithmetic', 'arithmetic',
     'arithmetic ({n} generated problems)'),
    ('small', 'math', 'math_heldout', 'math, held-out records ({n})'),
    ('small-decontam', 'math', 'gsm8k_consistent',
     'GSM8K, targets ending on the gold answer ({kept} of {scored}), math '
     'retrained without GSM8K'),
    ('small-decontam', 'math', 'gsm8k',
     'GSM8K, all {scored} targets ({disagree} wrong or no final answer), '
     'same runs'),
    ('small', 'arc_challenge', 'arc_challenge', 'ARC-Challenge ({n})'),
    ('small', 'openbookqa', 'openbookqa', 'OpenBookQA ({n})'),
    ('small', 'boolq', 'boolq', 'BoolQ ({n}, no passages)'),
)


def _p(p: float) -> str:
  # 10,000 resamples: p = 1e-4 means none crossed zero. Near 0.05, four
  # digits (`p_text`): a bootstrap p of 0.0498 had printed as 0.05.
  return '<2e-4' if p <= 1e-4 else p_text(p)


class OlderSummary(ValueError):
  """A summary written before the seeds-and-items p (2026-12-07)."""


def p_text(p: float) -> str:
  """Two significant figures, four where that would read 0.05: 0.04998
  had printed as 0.05, failing the table's own 'below 0.05' rule.
  reproduce.py's tables use the same rule."""
  return f'{p:.4g}' if 0.0495 <= p < 0.0505 else f'{p:.2g}'


def _cell(row: dict, measure: str, versus: dict | None, seeds: int) -> str:
  value = row[measure]
  text = f'{100 * value:.1f}%' if measure == 'accuracy' else f'{value:.3f}'
  if versus is not None:
    name = 'acc' if measure == 'accuracy' else 'loss'
    if f'{name}_diff_p_seeds_t' not in versus:
      # Its p is the items-only one, which this table's p is not.
      raise OlderSummary()
    agree = versus[f'{name}_diff_seeds_agreeing']
    t = versus[f'{name}_diff_p_seeds_t']
    text += (f' (p {_p(versus[f"{name}_diff_p"])}'
             + ('' if agree is None else
                f', {agree}/{len(versus[f"{name}_diff_per_seed"])}')
             + ('' if math.isnan(t) else f'; t-test p {p_text(t)}') + ')')
  if len(row['seeds']) != seeds:
    text += f' [{len(row["seeds"])} seeds]'
  return text


def table(out_dir: str, rows=ROWS, seeds: int = 3) -> str:
  """The Markdown table of ``rows`` from ``out_dir``'s summary files.

  Raises:
    FileNotFoundError: a row's summary file is missing.
    KeyError: a summary lacks a row's task or test set.
  """
  summaries = {}
  lines = ['| task (test items) | measure | '
           + ' | '.join(name for _, name in OPTIMIZERS) + ' |',
           '|---|---|' + '---:|' * len(OPTIMIZERS)]
  for budget, task, test, label in rows:
    if budget not in summaries:
      path = os.path.join(out_dir, f'summary_{budget}.json')
      if not os.path.isfile(path):
        raise FileNotFoundError(f'{path}: no such summary (run '
                                f'benchmarks/reproduce.py for budget '
                                f'{budget!r} first).')
      try:
        with open(path, encoding='utf-8') as f:
          summaries[budget] = json.load(f)
      except (OSError, ValueError) as e:
        raise ValueError(f'{path} cannot be read ({str(e).splitlines()[0]})'
                         '; rerun benchmarks/reproduce.py --report_only for '
                         f'budget {budget!r}.') from None
      if not isinstance(summaries[budget], dict) or not isinstance(
          summaries[budget].get('tasks'), dict):
        raise ValueError(f'{path} is not a summary reproduce.py writes (no '
                         '"tasks").')
    tasks = summaries[budget]['tasks']
    damaged = lambda e: ValueError(
        f'summary_{budget}.json: the {task} {test} row is not one '
        f'reproduce.py writes ({type(e).__name__}: {e}); rerun it with '
        '--report_only.')
    try:
      found = task in tasks and test in tasks[task].get('tests', {})
    except (AttributeError, TypeError) as e:  # a task that is not an object
      raise damaged(e) from None
    if not found:
      raise KeyError(f'summary_{budget}.json has no test set {test!r} for '
                     f'task {task!r}.')
    by_opt = tasks[task]['tests'][test]
    if '{n}' in label:
      # The items scored, not a count written here (a budget's num_test
      # may change): one number, as reproduce.py checks every row has.
      try:
        counts = {r['n'] for r in by_opt.values()}
      except (AttributeError, KeyError, TypeError) as e:
        raise damaged(e) from None
      if len(counts) != 1:
        raise ValueError(
            f'summary_{budget}.json: the {task} {test} rows were scored on '
            f'{sorted(counts)} test items, not one number; rerun '
            'benchmarks/reproduce.py --report_only.')
      label = label.replace('{n}', str(counts.pop()))
    if '{' in label:
      counts = tasks[task].get('target_consistency', {}).get(
          test.removesuffix('_consistent'))
      if counts is None:
        raise KeyError(f'summary_{budget}.json has no target_consistency '
                       f'counts for {test!r} (rerun benchmarks/reproduce.py '
                       '--report_only for that budget).')
      label = label.format(kept=counts['kept'], scored=counts['scored'],
                           disagree=counts['scored'] - counts['kept'])
    try:
      measures = [m for m in ('accuracy', 'loss')
                  if any(m in r for r in by_opt.values())]
    except (AttributeError, TypeError) as e:  # a row that is not an object
      raise damaged(e) from None
    for measure in measures:
      try:
        cells = [_cell(by_opt[opt], measure, by_opt[opt].get('vs_lora_rite'),
                       seeds) if measure in by_opt.get(opt, {}) else '-'
                 for opt, _ in OPTIMIZERS]
      except OlderSummary:
        raise ValueError(
            f'summary_{budget}.json was written before its p-values '
            'counted the seeds (2026-12-07); rerun benchmarks/reproduce.py '
            f'--report_only for budget {budget!r}.') from None
      except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise damaged(e) from None
      name = ('loss/token' if measure == 'loss' else
              'exact match' if task in ('arithmetic', 'math') else 'accuracy')
      lines.append(f'| {label} | {name} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--out', default=os.path.join('docs', 'results'),
                 help='where reproduce.py wrote its summary_<budget>.json')
  args = p.parse_args(argv)
  try:
    sys.stdout.write(table(args.out))
  except (FileNotFoundError, KeyError, ValueError) as e:
    print(f'summary_table: {e.args[0]}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
