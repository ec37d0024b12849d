"""The sampling order of the training and validation streams: SampleOrder, a pure function.

Sampling. The training stream is a sequence of passes over all N stored samples. Pass e puts
the shards in a seeded permutation (seed, e), concatenates them and rotates the result by a
seeded offset o_e uniform in [0, N). Each of the R readers (rank x DataLoader worker) owns a
contiguous range of M = N // R positions of that pass; the N mod R positions past R * M are
not read in that pass, and because of the uniform rotation every sample is left out with the
same probability. So every sample is drawn equally often in expectation, whatever the shard,
rank and worker counts (exactly once per pass when R divides N), no two readers read the same
sample within a pass, and fewer shards than readers simply give ranges inside shards. (Readers
that owned whole shards instead cycled faster when they owned fewer of them.) Inside its range
a reader cuts its positions into blocks of ``shuffle_buffer`` consecutive ones (256 when not
shuffling) and emits each block in a seeded permutation of (seed, e, reader, block), from which
the flip bit of each position is drawn too. A sample thus mixes with the others of its block
and, pass to pass, lands in other blocks, ranges and readers.

Why it resumes exactly and cheaply: reader r's k-th sample (its "slot" k) is a pure function of
(seed, shard sample counts, R, r, shuffle_buffer, k): pass k // M, then the block and the place
in it, then the shard and the index in that shard. Resuming after c consumed batches gives each
worker its first slot (see ShardStream._reader), opens that block's shard at that index by
reading tar headers only (seeking past member data on local files; streams read and drop it)
and reads the blocks its first batch draws from: at most one shard of headers plus a block or
two of samples, whatever c is. Batches are groups of batch_size consecutive slots and may span
passes; a sample that cannot be read or decoded leaves its slot empty (a smaller batch), so it
never shifts the slots after it. A batch that comes out entirely empty is dropped: the one case
in which a resumed run no longer lines up with a straight one (the trainer counted one batch
fewer than the stream used).

Per-shard sample counts come from the manifest (``shards[i].count``); without one, each shard
is counted once by walking its tar headers. Validation (``infinite=False``) reads the stored
order, unrotated and unflipped, split into R contiguous ranges whose sizes differ by at most
one: every stored sample exactly once across all ranks and workers, none dropped.

SampleOrder below computes this order and does no I/O; ShardStream (diffusion_pl.data.stream)
reads the samples it names.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from diffusion_pl.utils.seeding import mix_seed

READ_BLOCK = 256  # slots read at a time when nothing is shuffled (a block is read before it is emitted)
ORDER_VERSION = 3  # saved in checkpoints: a resumed stream continues the saved one only if this matches


class SampleOrder:
    """Which stored sample fills slot k of reader r: a pure function of the seeds and counts.

    Stored sample (shard s, index i) has id ``starts[s] + i`` (its position in the stored order).
    See the module docstring for the design; this class has no I/O, so it is tested directly.
    """

    def __init__(self, counts: Sequence[int], readers: int, *, seed: int = 0, shuffle_buffer: int = 0,
                 infinite: bool = True, random_flip: bool = True):
        self.counts = np.asarray(list(counts), dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)])
        self.total, self.readers, self.seed, self.infinite = int(self.starts[-1]), readers, seed, infinite
        self.shuffle = infinite and shuffle_buffer > 1
        self.block = shuffle_buffer if self.shuffle else READ_BLOCK
        self.flip = infinite and random_flip
        self._layout: tuple[int, tuple] | None = None

    def reader_range(self, r: int) -> tuple[int, int]:
        """[lo, hi) positions of a pass read by reader r."""
        if self.infinite:  # equal ranges; the N mod R positions past R * M are left out this pass
            m = self.total // self.readers
            return r * m, (r + 1) * m
        base, extra = divmod(self.total, self.readers)  # finite: split the remainder, drop nothing
        lo = r * base + min(r, extra)
        return lo, lo + base + (r < extra)

    def length(self, r: int) -> int:
        lo, hi = self.reader_range(r)
        return hi - lo

    def layout(self, e: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(shard order, start of each in the concatenation (S + 1), rotation offset) of pass e."""
        if self._layout is None or self._layout[0] != e:
            if self.infinite:
                rng = np.random.default_rng(mix_seed(self.seed, 1, e))
                order = rng.permutation(len(self.counts))
                offset = int(rng.integers(self.total)) if self.total else 0
            else:
                order, offset = np.arange(len(self.counts)), 0
            self._layout = (e, (order, np.concatenate([[0], np.cumsum(self.counts[order])]), offset))
        return self._layout[1]

    def spans(self, e: int, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """Positions [lo, hi) of pass e as (shard, first index, count) runs, in reading order."""
        order, starts, offset = self.layout(e)
        n, c0 = hi - lo, (lo + offset) % self.total if self.total else 0
        pieces = [(c0, c0 + n)] if c0 + n <= self.total else [(c0, self.total), (0, c0 + n - self.total)]
        out = []
        for x, y in pieces:
            j = int(np.searchsorted(starts, x, side="right")) - 1
            while j < len(order) and starts[j] < y:
                first, end = max(x, starts[j]) - starts[j], min(y, starts[j + 1]) - starts[j]
                if end > first:
                    out.append((int(order[j]), int(first), int(end - first)))
                j += 1
        return out

    def block_plan(self, e: int, r: int, b: int, n: int) -> tuple[list[int], list[bool]]:
        """(emission order of the n positions of block b, flip bit of each position)."""
        if not self.shuffle and not self.flip:
            return list(range(n)), [False] * n
        rng = np.random.default_rng(mix_seed(self.seed, 2, e, r, b))
        perm = rng.permutation(n).tolist() if self.shuffle else list(range(n))
        flips = (rng.random(n) < 0.5).tolist() if self.flip else [False] * n
        return perm, flips

    def locate(self, r: int, k: int) -> tuple[int, int]:
        """(pass, slot within the pass) of reader r's slot k."""
        m = self.length(r)
        return divmod(k, m) if self.infinite else (0, k)

    def pass_ids(self, e: int, r: int) -> np.ndarray:
        """Stored ids of reader r's slots in pass e, in emission order (for tests and tools)."""
        order, starts, offset = self.layout(e)
        lo, hi = self.reader_range(r)
        c = (np.arange(lo, hi) + offset) % max(self.total, 1)
        j = np.searchsorted(starts, c, side="right") - 1
        ids = self.starts[order[j]] + (c - starts[j])
        out = []
        for b, a in enumerate(range(0, hi - lo, self.block)):
            perm, _ = self.block_plan(e, r, b, min(self.block, hi - lo - a))
            out.append(ids[a:a + len(perm)][perm])
        return np.concatenate(out) if out else ids
