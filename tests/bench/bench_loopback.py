#!/usr/bin/env python3
"""Loopback benchmark: `serve` and `get` on 127.0.0.1, file to file, no link
emulator.  Reports goodput from the wall clock of the whole `get`, and the
CPU seconds per GB each end used.  Not part of the test suite.

    python3 tests/bench_loopback.py [--size 1G] [--runs 3] [--json out.json]
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
WANXFER = os.path.join(os.path.dirname(HERE), 'wanxfer.py')
sys.path.insert(0, os.path.dirname(HERE))

import wanxfer  # noqa: E402  (for its file helpers)


def start_serve(source, extra, env):
    proc = subprocess.Popen([sys.executable, WANXFER, 'serve', '--bind', '127.0.0.1', '--port', '0',
                             source] + extra, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if 'listening on' in line:
            return proc, int(line.split('listening on ')[1].split()[0].rsplit(':', 1)[1])
        if not line:
            break
    proc.kill()
    raise SystemExit('serve did not start')


def cpu_seconds(pid):
    """User + system CPU of a live process, from /proc."""
    with open('/proc/%d/stat' % pid) as f:
        fields = f.read().rsplit(')', 1)[1].split()
    ticks = os.sysconf('SC_CLK_TCK')
    return (int(fields[11]) + int(fields[12])) / ticks


def one_run(source, size, workdir, encrypt, run):
    env = dict(os.environ, WANXFER_SECRET='bench-loopback')
    extra = [] if encrypt else ['--no-encrypt']
    # Fresh caches each run: a file `get` saw before would come from its own disk.
    cache = ['--cache', os.path.join(workdir, 'cache-%s-%d.db' % ('enc' if encrypt else 'plain', run))]
    server, port = start_serve(source, extra + cache[:1] + [cache[1] + '.serve'], env)
    dest = os.path.join(workdir, 'received.bin')
    try:
        server_cpu = cpu_seconds(server.pid)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        client = subprocess.Popen([sys.executable, WANXFER, 'get', '127.0.0.1:%d' % port,
                                   os.path.basename(source), '-o', dest, '-q', '--json'] + extra + cache,
                                  env=env, stdout=subprocess.PIPE, text=True)
        out, _ = client.communicate()
        wall = time.monotonic() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        client_cpu = (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime)
        server_cpu = cpu_seconds(server.pid) - server_cpu
    finally:
        server.terminate()
        server.wait()
    if client.returncode != 0:
        raise SystemExit('get failed')
    summary = json.loads(out.splitlines()[-1])
    ok = wanxfer.file_sha256(dest) == wanxfer.file_sha256(source)
    os.unlink(dest)
    return {'goodput_mbps': size * 8 / wall / 1e6, 'wall_seconds': wall,
            'server_cpu_s_per_gb': server_cpu / (size / 1e9),
            'client_cpu_s_per_gb': client_cpu / (size / 1e9),
            'block_bytes': summary.get('block_bytes'), 'verified': ok}


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--size', default='1G', help='file size: 256M, 1G (default 1G)')
    parser.add_argument('--runs', type=int, default=3)
    parser.add_argument('--json', metavar='FILE')
    args = parser.parse_args()
    units = {'K': 1 << 10, 'M': 1 << 20, 'G': 1 << 30}
    size = int(float(args.size[:-1]) * units[args.size[-1].upper()]) \
        if args.size[-1].upper() in units else int(args.size)
    workdir = tempfile.mkdtemp(prefix='wanxfer-loopback-')
    results = {}
    try:
        source = os.path.join(workdir, 'source.bin')
        wanxfer.write_random_file(source, size)
        for encrypt in (True, False):
            name = 'encrypted' if encrypt else '--no-encrypt'
            runs = []
            for i in range(args.runs):
                run = one_run(source, size, workdir, encrypt, i)
                runs.append(run)
                print('[%s run %d] %.0f Mbit/s, CPU s/GB server %.2f client %s, block %s, verified %s'
                      % (name, i + 1, run['goodput_mbps'], run['server_cpu_s_per_gb'],
                         '%.2f' % run['client_cpu_s_per_gb'],
                         run['block_bytes'], run['verified']), flush=True)
            results[name] = runs
        print('\n| mode | runs | goodput Mbit/s (median) | CPU s/GB server | CPU s/GB client |')
        print('|---|---|---|---|---|')
        for name, runs in results.items():
            median = {key: statistics.median(r[key] for r in runs)
                      for key in ('goodput_mbps', 'server_cpu_s_per_gb', 'client_cpu_s_per_gb')}
            print('| %s | %d | %.0f | %.2f | %.2f |' % (
                name, len(runs), median['goodput_mbps'], median['server_cpu_s_per_gb'],
                median['client_cpu_s_per_gb']))
        if args.json:
            with open(args.json, 'w') as f:
                json.dump(results, f, indent=1)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == '__main__':
    main()
