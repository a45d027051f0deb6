#!/usr/bin/env python3
"""Benchmark of `wanxfer.py tunnel` against the targets of issue 4, on loopback.

Not collected by pytest (tests/conftest.py ignores tests/bench/).  Both tunnel
processes run on this machine; a producer thread sends a file through the
near side with sendfile(), a sink behind the far side counts the bytes.
Bytes on the wire are the near side's 'tunnel-out' transferred figure (every
frame and handshake byte the link carried; tests/test_tunnel.py checks it
against a relay's count).  Each pass starts both tunnels afresh, so every
second pass is also a restart.

    python3 tests/bench/bench_tunnel.py                       # everything, medians of 3
    python3 tests/bench/bench_tunnel.py --scenarios zeros,random --runs 1
    python3 tests/bench/bench_tunnel.py --sql-size 100M --zeros-size 256M --json out.json

Scenarios:
  zeros     N bytes of zeros (default 1 GiB)
  random    incompressible data (default 256 MiB)
  tar       a tar of /usr/share/doc, /usr/lib/python3*, /usr/bin; then, with
            both tunnels restarted, the same tar after `tar rf` appended a file
  sql       a generated mysqldump-style SQL dump (default 300 MB); then the
            same dump after 200 scattered small inserts, deletes and rewrites
  known     throughput of a stream the peer already has (the SQL dump again)
  latency   added round-trip time of small messages (64 bytes, echoed)
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import edit_sql, generate_sql, make_file, make_tar  # noqa: E402
from helpers import SECRET, start_far, start_near, stats  # noqa: E402


def baseline(path, command):
    """(compressed bytes, seconds) of `command` (a list) over the file."""
    started = time.monotonic()
    with open(path, 'rb') as f:
        out = subprocess.run(command, stdin=f, stdout=subprocess.PIPE, check=True)
    return len(out.stdout), time.monotonic() - started


def baseline_size(path, command):
    return harness.piped_size(command, path)[:2]


# -- one pass through the tunnel ------------------------------------------------------

class Sink:
    """The target behind the far side: counts what arrives, signals at `expect`."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(('127.0.0.1', 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.expect = 0
        self.done = threading.Event()
        self.finished_at = None
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        buffer = bytearray(4 << 20)
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            total = 0
            while True:
                try:
                    n = conn.recv_into(buffer)
                except OSError:
                    break                       # reset when the tunnels stop: all was counted
                if not n:
                    break
                total += n
                if total >= self.expect:
                    self.finished_at = time.monotonic()
                    self.done.set()
            conn.close()


def one_pass(workdir, path, near_cache, far_cache, extra=()):
    """Send `path` through fresh tunnel processes (given `extra` arguments);
    return (original, wire, seconds, near CPU seconds, far CPU seconds)."""
    sink = Sink()
    size = os.path.getsize(path)
    sink.expect = size
    far = start_far(far_cache, [sink.port], extra=extra)
    near = None
    try:
        near = start_near(near_cache, far.port, [sink.port], extra=extra)
        before = stats(near_cache)['life']['tunnel-out']
        cpu_before = harness.proc_cpu(near.proc.pid), harness.proc_cpu(far.proc.pid)
        conn = socket.create_connection(('127.0.0.1', near.port))
        started = time.monotonic()
        with open(path, 'rb') as f:
            conn.sendfile(f)
        conn.shutdown(socket.SHUT_WR)
        if not sink.done.wait(3600):
            raise RuntimeError('the sink never got everything')
        seconds = sink.finished_at - started
        cpu = harness.proc_cpu(near.proc.pid) - cpu_before[0], harness.proc_cpu(far.proc.pid) - cpu_before[1]
        conn.close()
    finally:
        if near is not None:
            near.stop()
        far.stop()
        sink.sock.close()
    after = stats(near_cache)['life']['tunnel-out']
    original = after['original_bytes'] - before['original_bytes']
    wire = after['transferred_bytes'] - before['transferred_bytes']
    if original != size:
        raise RuntimeError('the tunnel counted %d bytes of %d' % (original, size))
    return original, wire, seconds, cpu[0], cpu[1]


def latency(workdir, count=2000):
    """Median round trip of a 64-byte message to an echo server, direct and
    through the tunnel; returns (direct, tunnelled) in microseconds."""
    server = socket.socket()
    server.bind(('127.0.0.1', 0))
    server.listen(4)

    def echo():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                while True:
                    data = conn.recv(4096)
                    if not data:
                        break
                    conn.sendall(data)
            except OSError:
                pass                            # reset when the tunnels stop
            conn.close()
    threading.Thread(target=echo, daemon=True).start()
    near_cache, far_cache = fresh_caches(workdir, 'latency')
    far = start_far(far_cache, [server.getsockname()[1]])
    near = start_near(near_cache, far.port, [server.getsockname()[1]])
    results = []
    for port in (server.getsockname()[1], near.port):
        conn = socket.create_connection(('127.0.0.1', port))
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        times = []
        for i in range(count):
            message = b'%064d' % i
            started = time.perf_counter()
            conn.sendall(message)
            got = b''
            while len(got) < len(message):
                got += conn.recv(4096)
            times.append(time.perf_counter() - started)
            assert got == message
        conn.close()
        results.append(harness.median(times) * 1e6)
    near.stop()
    far.stop()
    server.close()
    return results


def fresh_caches(workdir, name):
    caches = []
    for side in ('near', 'far'):
        cache = os.path.join(workdir, 'cache-%s-%s.db' % (name, side))
        for suffix in ('', '-wal', '-shm'):
            if os.path.exists(cache + suffix):
                os.remove(cache + suffix)
        caches.append(cache)
    return caches


def summarize(label, results):
    savings = [100.0 * (1 - r[1] / r[0]) for r in results]
    rates = [r[0] / r[2] / 1e6 for r in results]
    # CPU seconds per GB of original data, each tunnel process (all threads).
    near_cpu = [r[3] / r[0] * 1e9 for r in results]
    far_cpu = [r[4] / r[0] * 1e9 for r in results]
    row = {'scenario': label, 'bytes': results[0][0],
           'wire_bytes': int(harness.median(r[1] for r in results)),
           'saving_percent': round(harness.median(savings), 3),
           'throughput_MBps': round(harness.median(rates), 1),
           'near_cpu_s_per_GB': round(harness.median(near_cpu), 1),
           'far_cpu_s_per_GB': round(harness.median(far_cpu), 1),
           'runs': len(results), 'all_savings': [round(s, 3) for s in savings],
           'all_MBps': [round(r, 1) for r in rates]}
    print('%-26s %8.1f MB  wire %11d  saving %7.3f%%  %6.1f MB/s  cpu/GB near %5.1f s far %5.1f s'
          '  (runs: %s MB/s)' % (
              label, row['bytes'] / 1e6, row['wire_bytes'], row['saving_percent'], row['throughput_MBps'],
              row['near_cpu_s_per_GB'], row['far_cpu_s_per_GB'], ', '.join('%.1f' % r for r in rates)),
          flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--workdir', default='/var/tmp/wanxfer-tunnel-bench')
    parser.add_argument('--scenarios', default='zeros,random,tar,sql,known,latency')
    parser.add_argument('--runs', type=int, default=3)
    parser.add_argument('--zeros-size', type=harness.size_arg, default='1G')
    parser.add_argument('--random-size', type=harness.size_arg, default='256M')
    parser.add_argument('--sql-size', type=harness.size_arg, default='300M')
    parser.add_argument('--threads', type=int, metavar='N',
                        help='both tunnels\' --threads (default: theirs)')
    parser.add_argument('--json', metavar='FILE')
    args = parser.parse_args()
    extra = () if args.threads is None else ('--threads', args.threads)
    os.environ.setdefault('WANXFER_SECRET', SECRET)
    os.makedirs(args.workdir, exist_ok=True)
    scenarios = args.scenarios.split(',')
    rows, baselines = [], {}
    w = args.workdir

    def path(name):
        return os.path.join(w, name)

    def baseline_for(name, file_path):
        gz, gz_s = baseline_size(file_path, ['gzip', '-6', '-c'])
        entry = {'bytes': os.path.getsize(file_path),
                 'gzip6_saving_percent': round(100.0 * (1 - gz / os.path.getsize(file_path)), 3),
                 'gzip6_MBps': round(os.path.getsize(file_path) / gz_s / 1e6, 1)}
        if shutil.which('zstd'):
            zs, zs_s = baseline_size(file_path, ['zstd', '-3', '-c', '-q'])
            entry['zstd3_saving_percent'] = round(100.0 * (1 - zs / os.path.getsize(file_path)), 3)
            entry['zstd3_MBps'] = round(os.path.getsize(file_path) / zs_s / 1e6, 1)
        baselines[name] = entry
        print('baseline %-10s %s' % (name, json.dumps(entry)), flush=True)

    if 'zeros' in scenarios:
        make_file(path('zeros.bin'), args.zeros_size, 'zeros')
        rows.append(summarize('zeros', [one_pass(w, path('zeros.bin'), *fresh_caches(w, 'zeros'), extra)
                                        for _ in range(args.runs)]))
    if 'random' in scenarios:
        make_file(path('random.bin'), args.random_size, 'random')
        baseline_for('random', path('random.bin'))
        rows.append(summarize('random', [one_pass(w, path('random.bin'), *fresh_caches(w, 'random'), extra)
                                         for _ in range(args.runs)]))
    if 'tar' in scenarios:
        make_tar(path('backup.tar'), path('backup-appended.tar'))
        baseline_for('tar', path('backup.tar'))
        first, again = [], []
        for _ in range(args.runs):
            caches = fresh_caches(w, 'tar')
            first.append(one_pass(w, path('backup.tar'), *caches, extra))
            again.append(one_pass(w, path('backup-appended.tar'), *caches, extra))
        rows.append(summarize('tar first pass', first))
        rows.append(summarize('tar appended, restarted', again))
    if 'sql' in scenarios or 'known' in scenarios:
        if not os.path.exists(path('dump.sql')) or \
                abs(os.path.getsize(path('dump.sql')) - args.sql_size) > 1 << 20:
            generate_sql(path('dump.sql'), args.sql_size)
        edit_sql(path('dump.sql'), path('dump-edited.sql'))
        baseline_for('sql', path('dump.sql'))
        first, edited, known = [], [], []
        for _ in range(args.runs):
            caches = fresh_caches(w, 'sql')
            first.append(one_pass(w, path('dump.sql'), *caches, extra))
            if 'sql' in scenarios:
                edited.append(one_pass(w, path('dump-edited.sql'), *caches, extra))
            if 'known' in scenarios:
                known.append(one_pass(w, path('dump.sql'), *caches, extra))
        rows.append(summarize('sql first pass', first))
        if edited:
            rows.append(summarize('sql after 200 edits', edited))
        if known:
            rows.append(summarize('sql again (peer has it)', known))
    if 'latency' in scenarios:
        direct, tunnelled = latency(w)
        row = {'scenario': 'latency', 'direct_rtt_us': round(direct, 1),
               'tunnel_rtt_us': round(tunnelled, 1),
               'added_one_way_us': round((tunnelled - direct) / 2, 1)}
        rows.append(row)
        print('latency: 64-byte echo round trip %.0f us direct, %.0f us through the tunnel: '
              '%.0f us added each way' % (direct, tunnelled, (tunnelled - direct) / 2), flush=True)
    harness.write_json(args.json, {'results': rows, 'baselines': baselines,
                                   'python': sys.version.split()[0], 'cpus': os.cpu_count()})


if __name__ == '__main__':
    main()
