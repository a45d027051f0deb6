#!/usr/bin/env python3
"""Benchmark of `wanxfer.py tunnel` against the targets of issue 4, on loopback.

Not collected by pytest (the name does not start with test_).  Both tunnel
processes run on this machine; a producer thread sends a file through the
near side with sendfile(), a sink behind the far side counts the bytes.
Bytes on the wire are the near side's 'tunnel-out' transferred figure (every
frame and handshake byte the link carried; tests/test_tunnel.py checks it
against a relay's count).  Each pass starts both tunnels afresh, so every
second pass is also a restart.

    python3 tests/bench_tunnel.py                       # everything, medians of 3
    python3 tests/bench_tunnel.py --scenarios zeros,random --runs 1
    python3 tests/bench_tunnel.py --sql-size 100M --zeros-size 256M --json out.json

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
import hashlib
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tunnel_helpers import SECRET, start_far, start_near, stats  # noqa: E402


def parse_size(text):
    units = {'K': 1 << 10, 'M': 1 << 20, 'G': 1 << 30}
    text = text.strip().upper()
    if text[-1:] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


# -- corpus ------------------------------------------------------------------------

FIRST = ['James', 'Mary', 'Robert', 'Patricia', 'John', 'Jennifer', 'Michael', 'Linda', 'David',
         'Elizabeth', 'William', 'Barbara', 'Richard', 'Susan', 'Joseph', 'Jessica', 'Thomas',
         'Sarah', 'Chen', 'Wei', 'Yuki', 'Hiroshi', 'Olga', 'Ivan', 'Fatima', 'Ahmed', 'Priya',
         'Raj', 'Lucas', 'Sofia']
LAST = ['Smith', 'Johnson', 'Williams', 'Brown', 'Jones', 'Garcia', 'Miller', 'Davis', 'Rodriguez',
        'Martinez', 'Hernandez', 'Lopez', 'Gonzalez', 'Wilson', 'Anderson', 'Thomas', 'Taylor',
        'Moore', 'Jackson', 'Martin', 'Lee', 'Perez', 'Thompson', 'White', 'Harris', 'Sanchez',
        'Clark', 'Ramirez', 'Lewis', 'Robinson']
CITIES = ['London', 'Paris', 'Berlin', 'Madrid', 'Rome', 'Tokyo', 'Osaka', 'New York', 'Chicago',
          'Toronto', 'Sydney', 'Mumbai', 'Seoul', 'Lisbon', 'Dublin', 'Vienna', 'Prague', 'Warsaw',
          'Oslo', 'Zurich']
WORDS = ('the quick brown fox jumps over lazy dog order delivered pending refund invoice shipped '
         'customer account premium basic gift card express standard returned damaged').split()
STATUS = ['pending', 'paid', 'shipped', 'delivered', 'cancelled', 'refunded']


def generate_sql(path, size, seed=1):
    """A deterministic mysqldump-style dump: DDL, then extended INSERTs of
    customers and orders tables, about `size` bytes."""
    r = random.Random(seed)
    written, table, rowid = 0, 0, 1
    with open(path, 'w') as out:
        head = ('-- MySQL dump 10.13  Distrib 8.0.36, for Linux (x86_64)\n--\n-- Host: localhost'
                '    Database: shop\n-- ------------------------------------------------------\n'
                '/*!40101 SET NAMES utf8mb4 */;\n\n')
        out.write(head)
        written += len(head)
        while written < size:
            table += 1
            kind = 'customers' if table % 2 else 'orders'
            if kind == 'customers':
                columns = ('  `id` int NOT NULL AUTO_INCREMENT,\n  `name` varchar(80) NOT NULL,\n'
                           '  `email` varchar(120) NOT NULL,\n  `city` varchar(40) DEFAULT NULL,\n'
                           '  `created` datetime NOT NULL,\n'
                           "  `balance` decimal(12,2) NOT NULL DEFAULT '0.00',\n")
            else:
                columns = ('  `id` bigint NOT NULL,\n  `customer_id` int NOT NULL,\n'
                           '  `status` varchar(16) NOT NULL,\n  `total` decimal(12,2) NOT NULL,\n'
                           '  `placed` datetime NOT NULL,\n  `note` text,\n')
            ddl = ('DROP TABLE IF EXISTS `%s_%d`;\nCREATE TABLE `%s_%d` (\n%s  PRIMARY KEY (`id`)\n'
                   ') ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;\n\nLOCK TABLES `%s_%d` WRITE;\n'
                   % (kind, table, kind, table, columns, kind, table))
            out.write(ddl)
            written += len(ddl)
            for _ in range(r.randrange(50, 400)):
                rows = []
                for _ in range(r.randrange(20, 60)):
                    if kind == 'customers':
                        f, l = r.choice(FIRST), r.choice(LAST)
                        rows.append("(%d,'%s %s','%s.%s%d@%s.com','%s','20%02d-%02d-%02d %02d:%02d:%02d',"
                                    "%d.%02d)" % (
                                        rowid, f, l, f.lower(), l.lower(), r.randrange(100),
                                        r.choice(['example', 'mail', 'corp']), r.choice(CITIES),
                                        r.randrange(10, 25), r.randrange(1, 13), r.randrange(1, 29),
                                        r.randrange(24), r.randrange(60), r.randrange(60),
                                        r.randrange(100000), r.randrange(100)))
                    else:
                        note = 'NULL' if r.random() < 0.6 else "'%s'" % ' '.join(
                            r.choice(WORDS) for _ in range(r.randrange(3, 12)))
                        rows.append("(%d,%d,'%s',%d.%02d,'20%02d-%02d-%02d %02d:%02d:%02d',%s)" % (
                            rowid, r.randrange(1, 500000), r.choice(STATUS), r.randrange(5000),
                            r.randrange(100), r.randrange(10, 25), r.randrange(1, 13), r.randrange(1, 29),
                            r.randrange(24), r.randrange(60), r.randrange(60), note))
                    rowid += 1
                line = 'INSERT INTO `%s_%d` VALUES %s;\n' % (kind, table, ','.join(rows))
                out.write(line)
                written += len(line)
            out.write('UNLOCK TABLES;\n\n')
            written += 15


def edit_sql(source, dest, edits=200, seed=7):
    """200 scattered small edits: inserted rows, deleted stretches, rewritten values."""
    with open(source, 'rb') as f:
        data = bytearray(f.read())
    r = random.Random(seed)
    for k in range(edits):
        at = r.randrange(len(data))
        what = k % 3
        if what == 0:
            data[at:at] = b"(%d,42,'paid',17.50,'2024-05-01 10:00:00',NULL)," % (10 ** 9 + k)
        elif what == 1:
            del data[at:at + r.randrange(10, 120)]
        else:
            data[at:at + 8] = b'%08d' % r.randrange(10 ** 8)
    with open(dest, 'wb') as f:
        f.write(data)


def make_tar(path, appended):
    sources = ['/usr/share/doc'] + sorted(p for p in (os.path.join('/usr/lib', n) for n in
                                                       os.listdir('/usr/lib'))
                                          if os.path.basename(p).startswith('python3')) + ['/usr/bin']
    subprocess.run(['tar', 'cf', path, '--warning=none'] + sources, check=False,
                   stderr=subprocess.DEVNULL)
    shutil.copyfile(path, appended)
    extra = os.path.join(os.path.dirname(path), 'appended-file.txt')
    with open(extra, 'wb') as f:
        f.write(b'a file appended to the backup\n' * 2000)
    subprocess.run(['tar', 'rf', appended, extra], check=True, stderr=subprocess.DEVNULL)


def make_file(path, size, kind):
    with open(path, 'wb') as f:
        left, block = size, 1 << 20
        counter = 0
        while left > 0:
            n = min(block, left)
            if kind == 'zeros':
                f.write(bytes(n))
            else:
                f.write(hashlib.shake_256(b'bench %d' % counter).digest(n))
            counter += 1
            left -= n


def baseline(path, command):
    """(compressed bytes, seconds) of `command` (a list) over the file."""
    started = time.monotonic()
    with open(path, 'rb') as f:
        out = subprocess.run(command, stdin=f, stdout=subprocess.PIPE, check=True)
    return len(out.stdout), time.monotonic() - started


def baseline_size(path, command):
    started = time.monotonic()
    with open(path, 'rb') as f:
        proc = subprocess.Popen(command, stdin=f, stdout=subprocess.PIPE)
        total = 0
        while True:
            data = proc.stdout.read(1 << 20)
            if not data:
                break
            total += len(data)
        proc.wait()
    return total, time.monotonic() - started


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


def cpu_seconds(pid):
    """User + system CPU time of a process so far (Linux /proc)."""
    with open('/proc/%d/stat' % pid) as f:
        fields = f.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def one_pass(workdir, path, near_cache, far_cache):
    """Send `path` through fresh tunnel processes; return (original, wire,
    seconds, near CPU seconds, far CPU seconds)."""
    sink = Sink()
    size = os.path.getsize(path)
    sink.expect = size
    far = start_far(far_cache, [sink.port])
    near = start_near(near_cache, far.port, [sink.port])
    before = stats(near_cache)['life']['tunnel-out']
    cpu_before = cpu_seconds(near.proc.pid), cpu_seconds(far.proc.pid)
    conn = socket.create_connection(('127.0.0.1', near.port))
    started = time.monotonic()
    with open(path, 'rb') as f:
        conn.sendfile(f)
    conn.shutdown(socket.SHUT_WR)
    if not sink.done.wait(3600):
        raise RuntimeError('the sink never got everything')
    seconds = sink.finished_at - started
    cpu = cpu_seconds(near.proc.pid) - cpu_before[0], cpu_seconds(far.proc.pid) - cpu_before[1]
    conn.close()
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
        results.append(statistics.median(times) * 1e6)
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
           'wire_bytes': int(statistics.median(r[1] for r in results)),
           'saving_percent': round(statistics.median(savings), 3),
           'throughput_MBps': round(statistics.median(rates), 1),
           'near_cpu_s_per_GB': round(statistics.median(near_cpu), 1),
           'far_cpu_s_per_GB': round(statistics.median(far_cpu), 1),
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
    parser.add_argument('--zeros-size', default='1G')
    parser.add_argument('--random-size', default='256M')
    parser.add_argument('--sql-size', default='300M')
    parser.add_argument('--json', metavar='FILE')
    args = parser.parse_args()
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
        make_file(path('zeros.bin'), parse_size(args.zeros_size), 'zeros')
        rows.append(summarize('zeros', [one_pass(w, path('zeros.bin'), *fresh_caches(w, 'zeros'))
                                        for _ in range(args.runs)]))
    if 'random' in scenarios:
        make_file(path('random.bin'), parse_size(args.random_size), 'random')
        baseline_for('random', path('random.bin'))
        rows.append(summarize('random', [one_pass(w, path('random.bin'), *fresh_caches(w, 'random'))
                                         for _ in range(args.runs)]))
    if 'tar' in scenarios:
        make_tar(path('backup.tar'), path('backup-appended.tar'))
        baseline_for('tar', path('backup.tar'))
        first, again = [], []
        for _ in range(args.runs):
            caches = fresh_caches(w, 'tar')
            first.append(one_pass(w, path('backup.tar'), *caches))
            again.append(one_pass(w, path('backup-appended.tar'), *caches))
        rows.append(summarize('tar first pass', first))
        rows.append(summarize('tar appended, restarted', again))
    if 'sql' in scenarios or 'known' in scenarios:
        if not os.path.exists(path('dump.sql')) or \
                abs(os.path.getsize(path('dump.sql')) - parse_size(args.sql_size)) > 1 << 20:
            generate_sql(path('dump.sql'), parse_size(args.sql_size))
        edit_sql(path('dump.sql'), path('dump-edited.sql'))
        baseline_for('sql', path('dump.sql'))
        first, edited, known = [], [], []
        for _ in range(args.runs):
            caches = fresh_caches(w, 'sql')
            first.append(one_pass(w, path('dump.sql'), *caches))
            if 'sql' in scenarios:
                edited.append(one_pass(w, path('dump-edited.sql'), *caches))
            if 'known' in scenarios:
                known.append(one_pass(w, path('dump.sql'), *caches))
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
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'results': rows, 'baselines': baselines,
                       'python': sys.version.split()[0], 'cpus': os.cpu_count()}, f, indent=2)


if __name__ == '__main__':
    main()
