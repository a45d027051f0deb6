#!/usr/bin/env python3
"""Each end of a delta transfer alone (issue 14, "delta at disk speed"):
the local work a `get` of a file rebuilt from its kept older copy costs,
without the network.  The server's part is the fixed signature of the new
file with its whole-file SHA-256 (file_signature); the client's is
LocalAssembler and FrontierDigest building the file from the kept copy
(lookups, reads, checks, writes or shared extents, the whole-file digest,
the fsync), the missing blocks written as the network would.

Figures are wall and CPU seconds of this process; with --profile DIR each
end is also profiled in every thread (cProfile, merged) into DIR.  The
corpus is the backup tar of bench_delta.py and its `tar rf` update, built
under --work (no root needed); --dest puts the kept copy and the rebuilt
file elsewhere, e.g. on an XFS or btrfs mount, which shares extents.

  python3 tests/bench/bench_delta_ends.py --runs 3
  git show 1a4031e:wanxfer.py > /tmp/old.py      # a wanxfer from before, to compare
  python3 tests/bench/bench_delta_ends.py --wanxfer /tmp/old.py --wanxfer wanxfer.py
"""

import argparse
import cProfile
import hashlib
import importlib.util
import json
import os
import pstats
import shutil
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

BLOCK = 1430                    # an update's blocks on an Ethernet path (DELTA_MAX_MTU)


def load(path, index):
    spec = importlib.util.spec_from_file_location('wanxfer_under_test_%d' % index, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ThreadProfiles:
    """cProfile in the calling thread and in every thread started meanwhile."""

    def __init__(self):
        self.profiles = []
        self._run = threading.Thread.run

    def __enter__(self):
        profiles, run = self.profiles, self._run

        def profiled(thread):
            profile = cProfile.Profile()
            profiles.append(profile)
            profile.runcall(run, thread)
        threading.Thread.run = profiled
        self.profiles.append(cProfile.Profile())
        self.profiles[-1].enable()
        return self

    def __exit__(self, *exc):
        self.profiles[0].disable()
        threading.Thread.run = self._run

    def dump(self, path):
        stats = pstats.Stats(self.profiles[0])
        for profile in self.profiles[1:]:
            stats.add(profile)
        stats.dump_stats(path)


def server_end(wx, new):
    whole = hashlib.sha256()
    pieces = [(offset, wx.encode_spans(spans)) for offset, spans in
              wx.file_signature(new, 'fixed', whole=whole)]
    return pieces, whole.hexdigest()


def client_end(wx, work, new, pieces):
    store = wx.ChunkStore(os.path.join(work, 'cache.db'))
    size = os.path.getsize(new)
    partial = wx.PartialFile(os.path.join(work, 'new'), 'backup.tar', size, 0, BLOCK)
    written = bytearray(partial.open())
    frontier = wx.FrontierDigest(partial.data_path, size, BLOCK, lambda: bytes(written))
    assembler = wx.LocalAssembler(store, partial, refine=True, origin='bench')
    if hasattr(assembler, 'on_filled'):
        assembler.on_filled = frontier.offer
    for offset, spans in pieces:
        for start, end in assembler.on_piece(offset, wx.decode_spans(spans))[0]:
            wx.set_bits(written, start, end)
    assembler.close()
    missing = wx.bitmap_missing_ranges(written, partial.nblocks)
    with open(new, 'rb') as f:
        for start, end in missing:
            f.seek(start * BLOCK)
            partial.write(start * BLOCK, f.read((end - start) * BLOCK))
            wx.set_bits(written, start, end)
    digest = partial.digest(frontier)
    partial.close()
    store.close()
    return digest, sum(end - start for start, end in missing)


def one_run(wx, args, old, new, tag):
    work = os.path.join(args.dest, 'ends')
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    kept = os.path.join(work, 'kept')
    shutil.copyfile(old, kept)
    store = wx.ChunkStore(os.path.join(work, 'cache.db'))
    store.keep_file(kept, 'backup.tar', 'fixed', wx.signature_spans(kept, 'fixed'), origin='bench')
    store.close()
    os.sync()
    record = {'wanxfer': tag, 'load': os.getloadavg()[0]}
    for end in ('server', 'client'):
        wall, cpu = time.perf_counter(), time.process_time()
        with ThreadProfiles() as profiles:
            if end == 'server':
                pieces, sha = server_end(wx, new)
            else:
                digest, fetched = client_end(wx, work, new, pieces)
        record[end] = {'wall_s': round(time.perf_counter() - wall, 3),
                       'cpu_s': round(time.process_time() - cpu, 3)}
        if args.profile:
            os.makedirs(args.profile, exist_ok=True)
            profiles.dump(os.path.join(args.profile, '%s-%s.prof' % (end, tag)))
    if digest != sha:
        raise SystemExit('%s: the rebuilt file differs' % tag)
    record['blocks_fetched'] = fetched
    shutil.rmtree(work, ignore_errors=True)
    return record


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--wanxfer', action='append', help='wanxfer.py to measure (repeat to compare)')
    parser.add_argument('--runs', type=int, default=3)
    parser.add_argument('--work', default='/var/tmp/wanxfer-delta-ends')
    parser.add_argument('--dest', help='where the kept copy and the rebuilt file go (default --work)')
    parser.add_argument('--profile', metavar='DIR', help='write each end\'s profile here')
    parser.add_argument('--json', metavar='FILE')
    args = parser.parse_args(argv)
    args.dest = args.dest or args.work
    os.makedirs(args.work, exist_ok=True)
    old, new = os.path.join(args.work, 'backup-1.tar'), os.path.join(args.work, 'backup-2.tar')
    if not (os.path.exists(old) and os.path.exists(new)):
        harness.log('building the backup tar')
        harness.make_tar(old, new)
    versions = [(path, load(path, i), os.path.basename(path) + ('' if i == 0 else '.%d' % i))
                for i, path in enumerate(args.wanxfer or [harness.WANXFER])]
    records = []
    for run in range(args.runs):
        for path, wx, tag in versions:
            record = dict(one_run(wx, args, old, new, tag), run=run)
            records.append(record)
            print(json.dumps(record), flush=True)
    if args.json:
        harness.write_json(args.json, records)
    return 0


if __name__ == '__main__':
    sys.exit(main())
