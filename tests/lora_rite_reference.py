"""A float64 NumPy LoRA-RITE, written line by line from the algorithm in issue 2.

Deliberately naive (Householder QR, pinv, eigh, one pair at a time) so that it
checks the optimizer's batched, Gram-based implementation rather than sharing
its shortcuts.
"""

from __future__ import annotations

import numpy as np


def _sym(x):
  return 0.5 * (x + x.T)


def _rms(x):
  return np.sqrt(np.mean(x**2))


def a_matrix(a):
  """lora_a (..., r) -> X_A (N_A, r)."""
  return a.reshape(-1, a.shape[-1])


def b_matrix(b):
  """lora_b (r, ...) -> X_B = B^T (N_B, r)."""
  return b.reshape(b.shape[0], -1).T


def a_from_matrix(x, shape):
  return x.reshape(shape)


def b_from_matrix(x, shape):
  return x.T.reshape(shape)


class ReferenceLoraRite:
  """LoRA-RITE over a list of (lora_a, lora_b) pairs (NNX layout)."""

  def __init__(self, lr, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.0,
               clip_unmagnified_grad=1.0, update_skipping=1.0,
               update_capping=0.0, escape_mass=False, balance_factors=False):
    self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps
    self.wd = weight_decay
    self.clip = clip_unmagnified_grad
    self.skip = update_skipping
    self.cap = update_capping
    self.escape = escape_mass
    self.balance = balance_factors
    self.t = 0
    self.state = None

  def _init(self, pairs):
    self.state = []
    for a, b in pairs:
      per = []
      for x in (a_matrix(a), b_matrix(b)):
        n, r = x.shape
        per.append(dict(M=np.zeros((n, r)), U=np.zeros((n, r)),
                        V=np.zeros((r, r)), rho=0.0))
      self.state.append(per)

  def step(self, pairs, grads):
    """One step; returns the new list of (lora_a, lora_b)."""
    if self.state is None:
      self._init(pairs)
    t = self.t
    d = lambda beta: beta * (1 - beta**t) / (1 - beta**(t + 1))
    d1, d2 = d(self.b1), d(self.b2)
    # 1-3: QR, unmagnified gradients, skipping.
    work = []
    for (a, b), (ga, gb) in zip(pairs, grads):
      xs = [a_matrix(a), b_matrix(b)]
      gs = [a_matrix(ga), b_matrix(gb)]
      qrs = [np.linalg.qr(x) for x in xs]
      rinv = [np.linalg.pinv(r) for _, r in qrs]
      unmag = []
      for f in (0, 1):
        o = 1 - f
        grad = gs[f]
        if not np.all(np.isfinite(grad)):
          grad = np.zeros_like(grad)
        g = grad @ rinv[o]
        if self.skip > 0 and _rms(g) > self.skip:
          g = np.zeros_like(g)
        unmag.append(g)
      work.append((xs, [q for q, _ in qrs], rinv, unmag))
    # 4: global clip.
    if self.clip > 0:
      n = np.sqrt(sum(np.sum(g**2) for w in work for g in w[3]))
      if n > self.clip:
        for w in work:
          w[3][0] = w[3][0] * self.clip / n
          w[3][1] = w[3][1] * self.clip / n
    new_pairs = []
    for (a, b), (xs, us, rinv, unmag), st in zip(pairs, work, self.state):
      deltas = []
      for f in (0, 1):
        o = 1 - f
        s = st[f]
        g = unmag[f]
        n_f = xs[f].shape[0]
        p = us[o].T @ st[o]['U']                     # 6: P_F
        v_moved = _sym(p @ s['V'] @ p.T)
        if self.escape:                               # 7
          lam_old = np.linalg.eigvalsh(s['V'])
          lam_new = np.linalg.eigvalsh(v_moved)
          e = min(max(0.0, np.max(lam_old - lam_new)),
                  max(0.0, np.trace(s['V']) - np.trace(v_moved)))
          rho = d2 * (e + s['rho'])
        else:
          rho = 0.0
        v = _sym((1 - d2) * g.T @ g / n_f + d2 * v_moved)  # 8
        lam, q = np.linalg.eigh(v)                    # 9
        inv = 1.0 / (np.sqrt(np.maximum(lam, 0) + rho) + self.eps)
        step = g @ q @ np.diag(inv) @ q.T
        m = (1 - d1) * step + d1 * s['M'] @ p.T       # 10
        m_used = m
        if self.cap > 0:                              # 11
          m_used = m / max(1.0, _rms(m) / self.cap)
        deltas.append(-self.lr * (m_used @ rinv[o].T + self.wd * xs[f]))  # 12
        s['_new'] = dict(M=m, V=v, rho=rho)
      for f in (0, 1):
        st[f].update(st[f].pop('_new'))
      new_a = xs[0] + deltas[0]
      new_b = xs[1] + deltas[1]
      if self.balance:                                # 13
        # This project's balance_lora_factors (not the paper's): toward
        # equal norms, at most a factor of 2 per step; a zero factor stays.
        n_a = np.linalg.norm(new_a) + 1e-6
        n_b = np.linalg.norm(new_b) + 1e-6
        if n_a > 1e-6 and n_b > 1e-6:
          s = np.clip(np.sqrt(n_b / n_a), 0.5, 2.0)
          new_a, new_b = new_a * s, new_b / s
      new_pairs.append((a_from_matrix(new_a, a.shape),
                        b_from_matrix(new_b, b.shape)))
    # U_{t-1} for the next step is this step's basis.
    for (xs, us, _, _), st in zip(work, self.state):
      st[0]['U'], st[1]['U'] = us[0], us[1]
    self.t += 1
    return new_pairs
