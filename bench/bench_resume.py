"""Resume cost of the training stream: time to the first batch after c consumed batches (not a test).

    python bench/bench_resume.py [--consumed 1000 10000] [--batch-size 128] [--count 10000] [--old OLD.py]

On the built-in shapes data set (generated once into a temporary cache, 500 samples a shard),
for each consumed count c it times, in this process and on the same shards:

- resume: ShardStream with start_batch = c (seek to the slot, read one shuffle block);
- naive skip: the same stream from slot 0, reading and dropping the c * batch_size consumed
  samples without decoding them: the cost model of the stream before the seekable order;
- with --old PATH (a datamodule.py of that earlier version, e.g. from `git show`), that
  implementation's own resume, for reference (its sample order differs).

It checks that resume and naive skip give the same batch, and prints one row per count with the
seconds and the tar members each touched.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
import time
from itertools import islice

import torch

ROW = "{:>10} | {:>10} | {:>16} | {:>14} | {:>16} | {:>10}"


def first_batch_resumed(urls, batch_size: int, consumed: int, shuffle: int, ShardStream) -> tuple[float, int, tuple]:
    """(seconds, tar members touched, batch) of a stream resumed at `consumed` batches."""
    stream = ShardStream(urls, batch_size, shuffle_buffer=shuffle)
    stream.start_batch = consumed
    t = time.perf_counter()
    batch = next(iter(stream))
    io = getattr(stream, "io", None)
    return time.perf_counter() - t, (io["read"] + io["passed"]) if io else -1, batch


def first_batch_naive(urls, batch_size: int, consumed: int, shuffle: int, ShardStream) -> tuple[float, int, tuple]:
    """(seconds, tar members touched, batch) when the consumed samples are read and dropped, undecoded."""
    stream = ShardStream(urls, batch_size, shuffle_buffer=shuffle)
    t = time.perf_counter()
    order = stream.order(1)
    slots = stream._slots(order, 0, 0)
    for _ in islice(slots, consumed * batch_size):  # read, shuffled, flip bit drawn, never decoded
        pass
    batch = stream._collate(list(islice(slots, batch_size)))
    return time.perf_counter() - t, stream.io["read"] + stream.io["passed"], batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--consumed", type=int, nargs="+", default=[1_000, 10_000])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--shuffle-buffer", type=int, default=1000)
    p.add_argument("--count", type=int, default=10_000, help="samples of builtin:shapes (32 px, 500 a shard)")
    p.add_argument("--old", help="path of an earlier datamodule.py whose ShardStream resume is also timed")
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["DIFFUSION_PL_CACHE"] = cache
        from diffusion_pl.data.builtin import ensure_shapes
        from diffusion_pl.data.shards import resolve_shards
        from diffusion_pl.data.stream import ShardStream

        t = time.perf_counter()
        urls = resolve_shards(str(ensure_shapes(32, args.count)))[0]
        print(f"builtin:shapes?size=32&count={args.count}: {len(urls)} shards in {time.perf_counter() - t:.1f} s; "
              f"batch {args.batch_size}, shuffle_buffer {args.shuffle_buffer}, {os.cpu_count()} cores, "
              f"load average {os.getloadavg()[0]:.1f}")
        old = None
        if args.old:
            spec = importlib.util.spec_from_file_location("old_datamodule", args.old)
            old = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(old)
        print(ROW.format("consumed", "resume s", "resume members", "naive skip s", "naive members", "old s"))
        for consumed in args.consumed:
            resumed = first_batch_resumed(urls, args.batch_size, consumed, args.shuffle_buffer, ShardStream)
            naive = first_batch_naive(urls, args.batch_size, consumed, args.shuffle_buffer, ShardStream)
            assert all(torch.equal(a, b) for a, b in zip(resumed[2], naive[2], strict=True)), "resume != naive"
            old_s = "-"
            if old is not None:
                old_s = f"{first_batch_resumed(urls, args.batch_size, consumed, args.shuffle_buffer, old.ShardStream)[0]:.3f}"
            print(ROW.format(f"{consumed:,}", f"{resumed[0]:.3f}", f"{resumed[1]:,}", f"{naive[0]:.3f}",
                             f"{naive[1]:,}", old_s))


if __name__ == "__main__":
    main()
