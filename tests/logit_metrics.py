"""How far apart two sets of next-token logits are (used by the parity tests)."""

from __future__ import annotations

import numpy as np


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def mean_kl(ref: np.ndarray, ours: np.ndarray) -> float:
    """Mean over positions of KL(reference || ours) of the next-token distributions."""
    lp, lq = log_softmax(ref.astype(np.float64)), log_softmax(ours.astype(np.float64))
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())
