#!/usr/bin/env python3
"""The chunker alone (issue 15): its speed on one core, the sizes of the
chunks it cuts, and how many chunks an insert or delete makes new, on
random data, a mysqldump-style SQL dump, and data without cut patterns:
fixed-size records (issue 15's reproduction), PostgreSQL-like 8 KiB heap
pages, a disk image of data and zero extents, text broken by runs.

Speed is CPU seconds of this process (other load on the machine aside),
the best of --runs, feeding 256 KiB at a time as the tunnel reads.  Edits
are seeded: inserts and deletes of 1 byte to 4 KiB at random places, each
counted against the chunks of the unedited data.  No root, no network.

  python3 tests/bench/bench_chunker.py --json chunker.json
  git show 03a5e2a:wanxfer.py > /tmp/old.py      # a wanxfer from before, to compare
  python3 tests/bench/bench_chunker.py --wanxfer /tmp/old.py
"""

import argparse
import bisect
import hashlib
import importlib.util
import os
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import helpers  # noqa: E402

FEED = 256 << 10            # LOCAL_READ_SIZE


def load(path):
    """wanxfer.py at `path` as a module (another version, to compare)."""
    if not path:
        return harness.wanxfer
    spec = importlib.util.spec_from_file_location('wanxfer_under_test', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sql_dump(size):
    with tempfile.TemporaryDirectory() as work:
        path = os.path.join(work, 'dump.sql')
        harness.generate_sql(path, size)
        with open(path, 'rb') as f:
            return f.read(size)


CORPORA = (
    ('random', lambda n: helpers.noise(n, seed=b'bench chunker')),
    ('SQL dump', sql_dump),
    ('fixed records', helpers.fixed_records),
    ('database pages', helpers.database_pages),
    ('disk image', helpers.disk_image),
    ('text with runs', helpers.text_with_runs),
)


def chunk(module, data):
    chunker, chunks = module.Chunker(), []
    for at in range(0, len(data), FEED):
        chunks += chunker.feed(data[at:at + FEED])
    last = chunker.finish()
    return chunks + ([last] if last else [])


def speed(module, data, runs):
    best = None
    for _ in range(runs):
        started = time.process_time()
        chunk(module, data)
        spent = time.process_time() - started
        best = spent if best is None else min(best, spent)
    return len(data) / best / 1e6


def edits(module, data, chunks, count, seed):
    """New chunks after each of `count` random edits: only the stretch from
    the cut before the edit to 2 MiB after it is cut again."""
    known = set(hashlib.sha256(c).digest() for c in chunks)
    cuts, at = [], 0
    for c in chunks:
        cuts.append(at)
        at += len(c)
    rng, counts = random.Random(seed), []
    for k in range(count):
        where = rng.randrange(len(data) // 8, len(data) - len(data) // 8)
        length = rng.choice((1, 14, rng.randrange(1, 4096)))
        start = cuts[bisect.bisect_right(cuts, where) - 1]
        end = min(len(data), where + (2 << 20))
        if k % 2:
            stretch = data[start:where] + helpers.noise(length, seed=b'%d' % k) + data[where:end]
        else:
            stretch = data[start:where] + data[where + length:end]
        again = chunk(module, stretch)[:-1]         # the last one is cut short by the stretch's end
        counts.append(sum(1 for c in again if hashlib.sha256(c).digest() not in known))
    return counts


def measure(module, name, data, args):
    chunks = chunk(module, data)
    sizes = [len(c) for c in chunks[:-1]]
    counts = edits(module, data, chunks, args.edits, name)
    result = {'corpus': name, 'bytes': len(data), 'mb_per_s': round(speed(module, data, args.runs), 1),
              'chunks': len(chunks), 'min': min(sizes), 'median': int(statistics.median(sizes)),
              'mean': int(statistics.mean(sizes)), 'max': max(sizes),
              'at_max_percent': round(100.0 * sizes.count(module.MAX_CHUNK) / len(sizes), 1),
              'new_chunks_per_edit_mean': round(statistics.mean(counts), 2),
              'new_chunks_per_edit_max': max(counts)}
    harness.log('%-15s %7.1f MB/s  %6d chunks  min %5d  median %5d  mean %5d  max %5d  at max %5.1f%%  '
                'new chunks per edit: mean %.2f, max %d' % (
                    name, result['mb_per_s'], result['chunks'], result['min'], result['median'],
                    result['mean'], result['max'], result['at_max_percent'],
                    result['new_chunks_per_edit_mean'], result['new_chunks_per_edit_max']))
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--size', type=harness.size_arg, default=32 << 20, help='bytes per corpus (default 32M)')
    parser.add_argument('--runs', type=int, default=3, help='timed runs per corpus; the best counts')
    parser.add_argument('--edits', type=int, default=40, help='random edits per corpus')
    parser.add_argument('--wanxfer', help='measure the Chunker of this wanxfer.py instead')
    parser.add_argument('--json', help='write the results here')
    args = parser.parse_args()
    module = load(args.wanxfer)
    results = [measure(module, name, make(args.size), args) for name, make in CORPORA]
    harness.write_json(args.json, {'machine': harness.machine(), 'results': results})


if __name__ == '__main__':
    main()
