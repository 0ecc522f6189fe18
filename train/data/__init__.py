"""Data for fine-tuning: loaders, templates, tokenisation, grain pipelines.

Typical use::

  from train import data
  train = data.load_task("boolq", "train")          # list[Example]
  ds = data.make_train_dataset(train, tokenizer, seq_len=256, batch_size=8,
                               seed=0)
  it = iter(ds)
  batch = next(it)   # dict of numpy arrays, see `pipeline` for the format
  state = it.get_state()   # JSON-able; it.set_state(state) resumes exactly
"""

from train.data.example import Example
from train.data.example import prompt_key
from train.data.example import without_prompts_of
from train.data.numbers import canonical_number
from train.data.numbers import extract_final_number
from train.data.records import read_records
from train.data.tasks import cap_per_task
from train.data.tasks import default_data_dir
from train.data.tasks import examples_from_records
from train.data.tasks import get_task
from train.data.tasks import is_generated
from train.data.tasks import load_file
from train.data.tasks import load_hub_records
from train.data.tasks import load_task
from train.data.tasks import split_validation
from train.data.tasks import task_names
from train.data.tasks import TaskSpec
from train.data.tokenize import ByteTokenizer
from train.data.tokenize import encode_pair
from train.data.tokenize import encode_text
from train.data.tokenize import pad_features
from train.data.tokenize import prompt_tokens_cut
from train.data.tokenize import tokenize_example
from train.data.tokenize import Tokenizer
from train.data.pipeline import iterator_from_state
from train.data.pipeline import make_eval_dataset
from train.data.pipeline import make_train_dataset
from train.data.seq2seq import encoder_ids
from train.data.seq2seq import encoder_tokens_cut
from train.data.seq2seq import make_seq2seq_train_dataset
from train.data.seq2seq import seq2seq_features
from train.data.seq2seq import tokenize_seq2seq
