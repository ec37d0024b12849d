"""The one seed mixer behind every derived random stream: training steps, validation noise, the data order.

A derived stream's seed is a pure function of a few integers (base seed, rank, step, epoch, ...), so
runs resume bit-exactly without storing generator states and no two streams share a seed.
"""

from __future__ import annotations

import numpy as np

__all__ = ["mix_seed"]


def mix_seed(*numbers: int) -> int:
    """A 63-bit seed that mixes integers well (numpy's SeedSequence); fits torch.manual_seed and numpy.

    Negative integers are taken modulo 2**64, so any Python int is accepted.
    """
    entropy = [int(n) % 2**64 for n in numbers]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> np.uint64(1))
