#!/usr/bin/env python3
"""Loopback benchmark: `serve` and `get` on 127.0.0.1, file to file, no link
emulator.  Reports goodput from the wall clock of the whole `get`, and the
CPU seconds per GB each end used.  Not part of the test suite; needs no root.

    python3 tests/bench/bench_loopback.py [--size 1G] [--runs 3] [--workers 1] [--json out.json]
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import wanxfer  # noqa: E402
from helpers import start_serve  # noqa: E402

SECRET = 'bench-loopback'


def one_run(source, size, workdir, encrypt, run, workers):
    extra = ([] if encrypt else ['--no-encrypt']) + ['--workers', workers]
    # Fresh caches each run: a file `get` saw before would come from its own disk.
    cache = os.path.join(workdir, 'cache-%s-%d.db' % ('enc' if encrypt else 'plain', run))
    server = start_serve([source], extra + ['--cache', cache + '.serve'], secret=SECRET)
    dest = os.path.join(workdir, 'received.bin')
    out, err = os.path.join(workdir, 'get.out'), os.path.join(workdir, 'get.err')
    try:
        server_cpu = harness.proc_cpu(server.proc.pid)
        got = harness.Procs().run_timed(
            None, [sys.executable, harness.WANXFER, 'get', '127.0.0.1:%d' % server.port,
                   os.path.basename(source), '-o', dest, '-q', '--json', '--cache', cache] + extra,
            out, err, 3600, dict(os.environ, WANXFER_SECRET=SECRET))
        server_cpu = harness.settled_cpu(server.proc.pid) - server_cpu
    finally:
        server.stop()
    if got['rc'] != 0:
        raise SystemExit('get failed%s' % harness.tail(err))
    with open(out) as f:
        summary = json.loads(f.read().splitlines()[-1])
    ok = wanxfer.file_sha256(dest) == wanxfer.file_sha256(source)
    os.unlink(dest)
    return {'goodput_mbps': size * 8 / got['wall'] / 1e6, 'wall_seconds': got['wall'],
            'server_cpu_s_per_gb': server_cpu / (size / 1e9),
            'client_cpu_s_per_gb': got['cpu'] / (size / 1e9),
            'block_bytes': summary.get('block_bytes'), 'verified': ok}


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--size', type=harness.size_arg, default='1G',
                        help='file size: 256M, 1G (default 1G)')
    parser.add_argument('--runs', type=int, default=3)
    parser.add_argument('--workers', default='auto',
                        help='--workers of both ends (default auto; the CPU target is per end at 1)')
    parser.add_argument('--json', metavar='FILE')
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix='wanxfer-loopback-')
    results = {}
    harness.warn_page_reporting()
    try:
        source = harness.random_file(os.path.join(workdir, 'source.bin'), args.size)
        for encrypt in (True, False):
            name = 'encrypted' if encrypt else '--no-encrypt'
            runs = []
            for i in range(args.runs):
                run = one_run(source, args.size, workdir, encrypt, i, args.workers)
                runs.append(run)
                print('[%s run %d] %.0f Mbit/s, CPU s/GB server %.2f client %.2f, block %s, verified %s'
                      % (name, i + 1, run['goodput_mbps'], run['server_cpu_s_per_gb'],
                         run['client_cpu_s_per_gb'], run['block_bytes'], run['verified']), flush=True)
            results[name] = runs
        print('\n| mode | runs | goodput Mbit/s (median) | CPU s/GB server | CPU s/GB client |')
        print('|---|---|---|---|---|')
        for name, runs in results.items():
            median = {key: harness.median(r[key] for r in runs)
                      for key in ('goodput_mbps', 'server_cpu_s_per_gb', 'client_cpu_s_per_gb')}
            print('| %s | %d | %.0f | %.2f | %.2f |' % (
                name, len(runs), median['goodput_mbps'], median['server_cpu_s_per_gb'],
                median['client_cpu_s_per_gb']))
        harness.write_json(args.json, results)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == '__main__':
    main()
