#!/usr/bin/env python3
"""Database replication through a `wanxfer.py tunnel` pair across an emulated WAN (issue 15).

Each database gets a link of its own (harness.py: wanemu or netem, S2 by
default), fresh tunnel caches at both ends, and throwaway servers in temporary
directories, run as an unprivileged user and listening on 127.0.0.1 of their
host's namespace.  Host a (198.18.0.1) holds the primary, a capture relay and
the far tunnel (`--listen 198.18.0.1:7000`); host b (198.18.0.2) the near tunnel
(`--peer`, `-L`) and the standby or replica, which reach the primary through
the near tunnel's local port, as the README's replication recipe has it:

  host b: client -> near tunnel -L -> link -> far tunnel -> relay -> primary :host a

PostgreSQL (--databases postgresql):
  basebackup-1  pg_basebackup -X stream of a `pgbench -i -s 20` database
  basebackup-2  the same again, unchanged database, same tunnels (-R, a slot);
                it becomes the standby
  wal-stream    the standby streams WAL under a 60 s pgbench load; then the
                standby's lag at the end of the load, and the pgbench tables
                compared on both (count and sum of hashtext of each row)
MariaDB (--databases mariadb):
  binlog        binlog replication (CHANGE MASTER TO ... MASTER_PORT=3307) of
                200,000 inserted rows, then updates and deletes; CHECKSUM TABLE
                on both sides

For each phase: the plaintext the primary sent (counted by the relay, which
also keeps it), what crossed the link for it (the near tunnel's own wire
figure, `stats --json`, and the IP bytes on each host's wan0), the tunnel's
saving, zlib -6 and `zstd -3` of the same plaintext stream (after the link is
down; comparison only), the near cache's chunks, and the time.

    sudo python3 tests/bench/bench_replication.py --json repl.json
    sudo python3 tests/bench/bench_replication.py --databases mariadb --rows 50000
    flock /work/scratch/wan.lock sudo python3 tests/bench/bench_replication.py   # a shared machine

Needs root, ip(8) and cc (wanemu) or tc (netem), and from the machine's
packages postgresql (initdb, postgres, pg_basebackup, pgbench, psql),
mariadb-server and mariadb-client, zstd.  A database whose programs or user
are missing is skipped, as is everything without root: a line
`skipped: ...` on stderr, exit status 0.  Exit status 1: a run failed (its
error is in the output and the JSON).  Run nothing else meanwhile.
"""

import argparse
import collections
import json
import os
import pwd
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import HOST_A, BenchError, log  # noqa: E402

LINK = '--delay 60 --rate 1000 --queue 50 --loss 1'
FAR_PORT = 7000
# (server port on host a and b, relay port on host a, near tunnel port on host b)
PG_PORT, PG_RELAY, PG_NEAR = 5432, 15432, 6432
MY_PORT, MY_RELAY, MY_NEAR = 3306, 13306, 3307
DATABASES = ('postgresql', 'mariadb')
SLOT = 'bench_standby'
REPL_PASSWORD = 'bench-repl'


# ---------------------------------------------------------------------------
# Capture relay
# ---------------------------------------------------------------------------
# Between the far tunnel and the primary, in host a: forwards each
# connection and appends what crosses it to NNN-up.bin (to the server) and
# NNN-down.bin (from it).  The files are unbuffered, so their sizes at a
# quiet moment are the bytes so far.

def relay_pump(source, dest, path):
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    with open(path, 'wb', buffering=0) as out:
        try:
            while True:
                n = source.recv_into(buffer)
                if not n:
                    break
                # Kept before it goes on: once the peer has a byte, so has the capture.
                out.write(view[:n])
                dest.sendall(view[:n])
            dest.shutdown(socket.SHUT_WR)
        except OSError:
            # One side reset: the other must see it too, not a clean end.
            for sock in (source, dest):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b'\1\0\0\0\0\0\0\0')
                    sock.close()
                except OSError:
                    pass


def relay_main(listen_port, target_port, directory):
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(('127.0.0.1', listen_port))
    server.listen(16)
    relay_serve(server, target_port, directory)


def relay_serve(server, target_port, directory):
    """Relay each connection `server` accepts to 127.0.0.1:target_port, for ever."""
    number = 0
    while True:
        conn, _ = server.accept()
        number += 1
        try:
            upstream = socket.create_connection(('127.0.0.1', target_port), timeout=10)
            upstream.settimeout(None)
        except OSError:
            conn.close()
            continue
        for sock in (conn, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for source, dest, name in ((conn, upstream, 'up'), (upstream, conn, 'down')):
            threading.Thread(target=relay_pump, daemon=True,
                             args=(source, dest, os.path.join(directory, '%03d-%s.bin' % (number, name)))
                             ).start()


def capture_sizes(directory):
    """{file name: bytes so far} of a relay's captures."""
    return {name: os.path.getsize(os.path.join(directory, name)) for name in os.listdir(directory)}


def extract(directory, before, after, direction, dest):
    """Concatenate, in connection order, what each capture of `direction`
    gained between two capture_sizes(); its size."""
    total = 0
    with open(dest, 'wb') as out:
        for name in sorted(after):
            if not name.endswith('-%s.bin' % direction):
                continue
            start, end = before.get(name, 0), after[name]
            with open(os.path.join(directory, name), 'rb') as f:
                f.seek(start)
                left = end - start
                while left > 0:
                    data = f.read(min(left, 1 << 20))
                    if not data:
                        break
                    out.write(data)
                    left -= len(data)
                    total += len(data)
    return total


# ---------------------------------------------------------------------------
# Compression baselines
# ---------------------------------------------------------------------------

def zlib_size(path, level=6):
    compressor = zlib.compressobj(level)
    total = 0
    with open(path, 'rb') as f:
        while True:
            data = f.read(1 << 20)
            if not data:
                break
            total += len(compressor.compress(data))
    return total + len(compressor.flush())


def zstd_size(path, level=3):
    """Bytes of `zstd -LEVEL` of the file; None without the zstd command."""
    if not shutil.which('zstd'):
        return None
    total, _seconds, status = harness.piped_size(['zstd', '-%d' % level, '-q', '-c'], path)
    return None if status else total


def percent_saved(original, sent):
    return round(100.0 * (1 - sent / original), 2) if original and sent is not None else None


# ---------------------------------------------------------------------------
# The rig: link, tunnels, relay, measurements
# ---------------------------------------------------------------------------

def as_user(user, argv):
    """argv run as `user` (and its groups), by exec: the pid stays the program's."""
    return ['setpriv', '--reuid', user, '--regid', user, '--init-groups', '--'] + list(argv)


def own(path, user):
    shutil.chown(path, user, user)


class Rig:
    """One database's run: the link's hosts, the processes in them, the
    tunnel pair with its relay, and the marks between phases."""

    def __init__(self, args, link, work):
        self.args, self.link, self.work = args, link, work
        self.procs = harness.Procs(link)
        self.env = dict(os.environ, WANXFER_SECRET=secrets.token_hex(16), PYTHONUNBUFFERED='1')
        self.near = self.far = self.relay = None
        self.captures = os.path.join(work, 'captures')
        self.near_cache = os.path.join(work, 'near.db')
        self.far_cache = os.path.join(work, 'far.db')

    def run(self, host, argv, timeout=600, user=None, stdin=None):
        """Run to completion in a host (None: here); its stdout, or BenchError."""
        if user:
            argv = as_user(user, argv)
        command = self.link.command(host, argv) if host else list(argv)
        try:
            done = subprocess.run(command, stdin=stdin if stdin is not None else subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                                  timeout=timeout, cwd=self.work, env=self.env)
        except subprocess.TimeoutExpired:
            raise BenchError('%s: no end after %d s' % (os.path.basename(argv[0]), timeout))
        if done.returncode:
            raise BenchError('%s failed (rc %d): %s' % (' '.join(os.path.basename(a) for a in argv[:6]),
                                                        done.returncode, (done.stderr or done.stdout)[-800:]))
        return done.stdout

    def spawn(self, host, name, argv, port=None, user=None):
        """A long-running process in a host, its output in work/NAME.log;
        waits until it listens on PORT."""
        out = os.path.join(self.work, name + '.log')
        p = self.procs.spawn(host, as_user(user, argv) if user else argv, out, out, self.env)
        if port:
            self.procs.wait_listening(p, port, timeout=120, log_path=out)
        return p

    def start_tunnels(self, relay_port, target_port, near_port):
        """Relay and far tunnel in host a, near tunnel in host b, fresh caches."""
        os.makedirs(self.captures)
        self.relay = self.spawn('a', 'relay', [sys.executable, os.path.abspath(__file__), '--relay',
                                               str(relay_port), str(target_port), self.captures],
                                port=relay_port)
        self.far = self.spawn('a', 'far', [sys.executable, self.args.wanxfer, 'tunnel', '--listen',
                                           '%s:%d' % (HOST_A, FAR_PORT), '--allow',
                                           '127.0.0.1:%d' % relay_port, '--cache', self.far_cache],
                              port=FAR_PORT)
        self.near = self.spawn('b', 'near', [sys.executable, self.args.wanxfer, 'tunnel', '--peer',
                                             '%s:%d' % (HOST_A, FAR_PORT), '-L',
                                             '127.0.0.1:%d:127.0.0.1:%d' % (near_port, relay_port),
                                             '--cache', self.near_cache],
                               port=near_port)
        log_path = os.path.join(self.work, 'near.log')

        def link_up():
            with open(log_path, errors='replace') as f:
                return 'peer connection up' in f.read()
        self.wait_for(link_up, 30, 'peer connection from the near tunnel' + harness.tail(log_path))

    def wait_for(self, predicate, timeout, what, interval=0.05):
        """Poll `predicate` until true, with a deadline; the seconds it took."""
        started = time.monotonic()
        while not predicate():
            if time.monotonic() - started > timeout:
                raise BenchError('no %s after %.0f s' % (what, timeout))
            time.sleep(interval)        # polling with a deadline
        return time.monotonic() - started

    def stats(self, cache):
        return json.loads(self.run(None, [sys.executable, self.args.wanxfer, 'stats', '--json',
                                          '--cache', cache]))

    def link_bytes(self):
        """IP bytes each host has put on its wan0 so far: {'ab', 'ba'}."""
        out = {}
        for direction, host in (('ab', 'a'), ('ba', 'b')):
            shown = json.loads(self.run(None, ['ip', '-n', 'wan-' + host, '-s', '-j', 'link', 'show',
                                               'dev', 'wan0']))
            out[direction] = shown[0]['stats64']['tx']['bytes']
        return out

    def mark(self):
        """The counters at a quiet moment: the near tunnel's figures once it
        has saved them past now (every 2 s), then the link's and the relay's."""
        now = time.time()
        figures = {}

        def saved():
            report = self.stats(self.near_cache)
            for run in report['running']:
                if run['pid'] == self.near.pid and run['updated'] >= now:
                    figures.update(run, cache=report['cache'])
                    return True
            return False
        self.wait_for(saved, 30, 'figures from the near tunnel', interval=0.25)
        return {'tunnel': figures, 'link': self.link_bytes(), 'captures': capture_sizes(self.captures),
                'loadavg': os.getloadavg()[0]}

    def phase(self, name, before, after, seconds, **extra):
        """The record of a phase between two marks; its plaintext goes to
        work/NAME-{down,up}.bin for the compressors."""
        record = {'phase': name, 'seconds': round(seconds, 2)}
        tunnel_in = [m['tunnel']['tunnel-in'] for m in (before, after)]
        tunnel_out = [m['tunnel']['tunnel-out'] for m in (before, after)]
        for label, stream, (b, a) in (('down', 'in', tunnel_in), ('up', 'out', tunnel_out)):
            record['plain_%s_bytes' % label] = extract(self.captures, before['captures'], after['captures'],
                                                       label, os.path.join(self.work, '%s-%s.bin' % (name, label)))
            record['tunnel_%s_original_bytes' % label] = a['original_bytes'] - b['original_bytes']
            record['tunnel_%s_wire_bytes' % label] = a['transferred_bytes'] - b['transferred_bytes']
        record['link_ab_bytes'] = after['link']['ab'] - before['link']['ab']
        record['link_ba_bytes'] = after['link']['ba'] - before['link']['ba']
        record['tunnel_saving_percent'] = percent_saved(record['plain_down_bytes'],
                                                        record['tunnel_down_wire_bytes'])
        cache = after['tunnel']['cache']
        record['near_cache_chunks'] = cache['chunks']
        record['near_cache_bytes'] = cache['stored_bytes']
        record['loadavg'] = after['loadavg']
        record.update(extra)
        log('%-13s %s' % (name, json.dumps({k: record[k] for k in (
            'seconds', 'plain_down_bytes', 'tunnel_down_wire_bytes', 'link_ab_bytes',
            'tunnel_saving_percent')})))
        return record

    def compress(self, records):
        """zlib -6 and zstd -3 of each phase's plaintext, after the link is down."""
        for record in records:
            for label in ('down', 'up'):
                path = os.path.join(self.work, '%s-%s.bin' % (record['phase'], label))
                started = time.monotonic()
                record['zlib6_%s_bytes' % label] = zlib_size(path)
                record['zlib6_%s_seconds' % label] = round(time.monotonic() - started, 2)
                record['zstd3_%s_bytes' % label] = zstd_size(path)
                os.unlink(path)
            record['zlib6_saving_percent'] = percent_saved(record['plain_down_bytes'], record['zlib6_down_bytes'])
            record['zstd3_saving_percent'] = percent_saved(record['plain_down_bytes'], record['zstd3_down_bytes'])

    def stop_all(self, servers):
        """The database servers first (their own way: `servers` is a list of
        (process, signal)), then the near tunnel (it saves its figures), the
        far one and the relay."""
        for p, sig in servers:
            if p is not None and p.returncode is None:
                try:
                    os.kill(p.pid, sig)
                except ProcessLookupError:
                    pass
                if self.procs.reap(p, 60) is None:
                    self.procs.stop(p)
        for p in (self.near, self.far, self.relay):
            if p is not None:
                self.procs.stop(p)
        self.procs.kill_all()


# ---------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------

def find_pg_bin(given):
    """The directory holding PostgreSQL's server and client programs, newest
    version first; None if there is none."""
    wanted = ('initdb', 'postgres', 'pg_basebackup', 'pgbench', 'psql')
    candidates = [given] if given else []
    base = '/usr/lib/postgresql'
    if not given and os.path.isdir(base):
        versions = sorted((d for d in os.listdir(base) if d.split('.')[0].isdigit()),
                          key=lambda d: [int(x) for x in d.split('.') if x.isdigit()], reverse=True)
        candidates += [os.path.join(base, v, 'bin') for v in versions]
    if not given and shutil.which('initdb'):
        candidates.append(os.path.dirname(os.path.realpath(shutil.which('initdb'))))
    for directory in candidates:
        if all(os.access(os.path.join(directory, name), os.X_OK) for name in wanted):
            return directory
    return None


class Postgres:
    name = 'postgresql'

    def __init__(self, rig, bin_dir, user):
        self.rig, self.bin, self.user, self.a = rig, bin_dir, user, rig.args
        self.dir = os.path.join(rig.work, 'pg')
        self.primary = self.standby = None
        self.last_error = None

    def cmd(self, program, *argv):
        return [os.path.join(self.bin, program)] + list(argv)

    def sql(self, host, query, db='bench'):
        return self.rig.run(host, self.cmd('psql', '-X', '-A', '-t', '-q', '-v', 'ON_ERROR_STOP=1', '-h',
                                           '127.0.0.1', '-p', str(PG_PORT), '-U', 'postgres', '-d', db,
                                           '-c', query), timeout=300).strip()

    def server(self, host, data):
        # No Unix socket: clients come over TCP, and nothing of the machine's own is touched.
        return self.rig.spawn(host, 'postgres-' + host, self.cmd(
            'postgres', '-D', data, '-c', 'listen_addresses=127.0.0.1', '-c', 'port=%d' % PG_PORT,
            '-c', 'unix_socket_directories=', '-c', 'max_wal_senders=10'), port=PG_PORT, user=self.user)

    def prepare(self):
        os.makedirs(self.dir)
        own(self.dir, self.user)
        self.rig.run(None, self.cmd('initdb', '-D', os.path.join(self.dir, 'primary'), '-U', 'postgres',
                                    '--auth=trust', '-E', 'UTF8', '--no-sync'), user=self.user)

    def backup(self, name, *extra):
        started = time.monotonic()
        self.rig.run('b', self.cmd('pg_basebackup', '-h', '127.0.0.1', '-p', str(PG_NEAR), '-U', 'replicator',
                                   '-D', os.path.join(self.dir, name), '-X', 'stream', '-c', 'fast',
                                   *extra), timeout=3600, user=self.user)
        return time.monotonic() - started

    def answers(self, host):
        try:
            return self.sql(host, 'SELECT 1', db='postgres') == '1'
        except BenchError as e:
            self.last_error = str(e)
            return False

    def caught_up(self, lsn):
        # A standby refuses connections until it reaches a consistent state.
        try:
            return self.sql('b', "SELECT pg_last_wal_replay_lsn() >= '%s'::pg_lsn" % lsn) == 't'
        except BenchError as e:
            self.last_error = str(e)
            return False

    def table_sums(self, host):
        return self.sql(host, ' UNION ALL '.join(
            "SELECT '%s', count(*), coalesce(sum(hashtext(t::text)::bigint), 0) FROM %s t" % (table, table)
            for table in ('pgbench_accounts', 'pgbench_branches', 'pgbench_tellers', 'pgbench_history')))

    def run(self):
        rig, records = self.rig, []
        self.primary = self.server('a', os.path.join(self.dir, 'primary'))
        # It listens before it takes queries ("the database system is starting up").
        rig.wait_for(lambda: self.answers('a'), 120, 'answer from the primary')
        self.sql('a', 'CREATE DATABASE bench', db='postgres')
        self.sql('a', 'CREATE ROLE replicator WITH REPLICATION LOGIN')
        started = time.monotonic()
        rig.run('a', self.cmd('pgbench', '-i', '-q', '-s', str(self.a.scale), '-h', '127.0.0.1', '-p',
                              str(PG_PORT), '-U', 'postgres', 'bench'), timeout=1800)
        size = int(self.sql('a', "SELECT pg_database_size('bench')"))
        log('postgresql: pgbench -i -s %d: %.1f MB in %.1f s' % (self.a.scale, size / 1e6,
                                                                time.monotonic() - started))
        rig.start_tunnels(PG_RELAY, PG_PORT, PG_NEAR)
        marks = [rig.mark()]
        for name, extra in (('basebackup-1', ()), ('basebackup-2', ('-R', '-C', '-S', SLOT))):
            seconds = self.backup(name, *extra)
            marks.append(rig.mark())
            records.append(rig.phase(name, marks[-2], marks[-1], seconds, database_bytes=size))
        self.standby = self.server('b', os.path.join(self.dir, 'basebackup-2'))
        lsn = self.sql('a', 'SELECT pg_current_wal_lsn()')
        try:
            rig.wait_for(lambda: self.caught_up(lsn), 120, 'standby caught up with the backup')
        except BenchError as e:
            raise BenchError('%s (last: %s)%s' % (e, self.last_error, harness.tail(
                os.path.join(rig.work, 'postgres-b.log'))))
        before = rig.mark()
        start_lsn = self.sql('a', 'SELECT pg_current_wal_lsn()')
        started = time.monotonic()
        out = rig.run('a', self.cmd('pgbench', '-c', str(self.a.clients), '-j', '2', '-T',
                                    str(self.a.load_seconds), '-h', '127.0.0.1', '-p', str(PG_PORT),
                                    '-U', 'postgres', 'bench'), timeout=self.a.load_seconds + 600)
        ended = time.monotonic()
        end = self.sql('a', "SELECT pg_current_wal_lsn(), pg_wal_lsn_diff(pg_current_wal_lsn(), '%s'), "
                            "pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn), "
                            "extract(epoch FROM replay_lag) FROM pg_stat_replication" % start_lsn).split('|')
        if len(end) != 4:
            raise BenchError('no standby in pg_stat_replication at the end of the load')
        catch_up = rig.wait_for(lambda: self.caught_up(end[0]), 600, 'standby caught up after the load',
                                interval=0.02)
        lag_at_end = time.monotonic() - ended
        after = rig.mark()
        tps = re.search(r'tps = ([\d.]+)', out)
        sums = [self.table_sums(host) for host in ('a', 'b')]
        records.append(rig.phase(
            'wal-stream', before, after, lag_at_end + ended - started,
            load_seconds=round(ended - started, 2), tps=float(tps.group(1)) if tps else None,
            wal_bytes=int(float(end[1])), lag_bytes_at_end=int(float(end[2])) if end[2] else 0,
            replay_lag_at_end_s=float(end[3]) if end[3] else None,
            catch_up_s=round(lag_at_end, 3), catch_up_poll_s=round(catch_up, 3),
            data_equal=sums[0] == sums[1], table_sums=sums[0]))
        if sums[0] != sums[1]:
            raise BenchError('standby differs from the primary: %s / %s' % tuple(sums))
        return records

    def servers(self):
        # SIGINT: a fast shutdown, not waiting for the replication connections.
        return [(self.standby, signal.SIGINT), (self.primary, signal.SIGINT)]


# ---------------------------------------------------------------------------
# MariaDB
# ---------------------------------------------------------------------------

def find_mariadb():
    """(server, install_db, client) programs, or None."""
    found = []
    for names in (('mariadbd', 'mysqld'), ('mariadb-install-db', 'mysql_install_db'), ('mariadb', 'mysql')):
        path = None
        for name in names:
            path = shutil.which(name) or next((p for p in ('/usr/sbin/' + name, '/usr/bin/' + name)
                                               if os.access(p, os.X_OK)), None)
            if path:
                break
        if not path:
            return None
        found.append(path)
    return tuple(found)


def load_sql(path, rows, seed=15):
    """`rows` inserted rows in statements of 1000 (each its own transaction),
    then a third of them updated and a tenth deleted, in ranges of 10,000 ids."""
    r = random.Random(seed)
    with open(path, 'w') as out:
        for first in range(1, rows + 1, 1000):
            values = []
            for rowid in range(first, min(first + 1000, rows + 1)):
                f, l = r.choice(harness.FIRST), r.choice(harness.LAST)
                note = 'NULL' if r.random() < 0.5 else "'%s'" % ' '.join(
                    r.choice(harness.WORDS) for _ in range(r.randrange(3, 12)))
                values.append("(%d,'%s %s','%s.%s%d@example.com','%s','20%02d-%02d-%02d %02d:%02d:%02d',"
                              "%d.%02d,%s)" % (rowid, f, l, f.lower(), l.lower(), r.randrange(100),
                                               r.choice(harness.CITIES), r.randrange(10, 25),
                                               r.randrange(1, 13), r.randrange(1, 29), r.randrange(24),
                                               r.randrange(60), r.randrange(60), r.randrange(100000),
                                               r.randrange(100), note))
            out.write('INSERT INTO customers VALUES %s;\n' % ','.join(values))
        for first in range(1, rows + 1, 10000):
            out.write("UPDATE customers SET balance = balance + 1.25, city = '%s' WHERE id BETWEEN %d AND %d "
                      "AND id %% 3 = 0;\n" % (r.choice(harness.CITIES), first, first + 9999))
        for first in range(1, rows + 1, 10000):
            out.write('DELETE FROM customers WHERE id BETWEEN %d AND %d AND id %% 10 = 7;\n'
                      % (first, first + 9999))


class MariaDB:
    name = 'mariadb'
    TABLE = ('CREATE TABLE bench.customers (id INT NOT NULL PRIMARY KEY, name VARCHAR(80) NOT NULL, '
             'email VARCHAR(120) NOT NULL, city VARCHAR(40), created DATETIME NOT NULL, '
             'balance DECIMAL(12,2) NOT NULL, note TEXT) ENGINE=InnoDB')

    def __init__(self, rig, programs, user):
        self.rig, self.a, self.user = rig, rig.args, user
        self.server_bin, self.install_db, self.client = programs
        self.dir = os.path.join(rig.work, 'mariadb')
        self.primary = self.replica = None
        self.last_status = None

    def sql(self, host, query, stdin=None, timeout=300):
        return self.rig.run(host, [self.client, '--no-defaults', '-S', os.path.join(self.dir, host, 'sock'),
                                   '-u', 'root', '-N', '-B'] + (['-e', query] if query else ['bench']),
                            timeout=timeout, stdin=stdin).strip()

    def prepare(self):
        for host in ('a', 'b'):
            home = os.path.join(self.dir, host)
            os.makedirs(home)
            own(home, self.user)
            self.rig.run(None, [self.install_db, '--no-defaults', '--datadir=' + os.path.join(home, 'data'),
                                '--user=' + self.user, '--skip-test-db', '--auth-root-authentication-method=socket'],
                         timeout=300)
        load_sql(os.path.join(self.dir, 'load.sql'), self.a.rows)

    def server(self, host, server_id):
        home = os.path.join(self.dir, host)
        return self.rig.spawn(host, 'mariadbd-' + host, [
            self.server_bin, '--no-defaults', '--user=' + self.user, '--datadir=' + os.path.join(home, 'data'),
            '--socket=' + os.path.join(home, 'sock'), '--pid-file=' + os.path.join(home, 'pid'),
            '--port=%d' % MY_PORT, '--bind-address=127.0.0.1', '--skip-name-resolve',
            '--server-id=%d' % server_id, '--log-bin=binlog', '--binlog-format=' + self.a.binlog_format,
            '--relay-log=relay', '--skip-slave-start'], port=MY_PORT)

    def caught_up(self):
        primary = self.sql('a', 'SELECT @@gtid_binlog_pos')
        if self.sql('b', 'SELECT @@gtid_slave_pos') == primary:
            return True
        # The I/O thread retries its connection by itself; an SQL error is final.
        status = self.sql('b', 'SHOW SLAVE STATUS\\G')
        error = re.search(r'Last_SQL_Error: (\S.*)', status)
        if error:
            raise BenchError('replica: %s' % error.group(1))
        self.last_status = ' '.join(re.findall(r'(?:Slave_IO_Running|Last_IO_Error): .*', status))
        return False

    def checksum(self, host):
        return self.sql(host, 'CHECKSUM TABLE bench.customers; SELECT count(*) FROM bench.customers')

    def run(self):
        rig = self.rig
        self.primary = self.server('a', 1)
        self.replica = self.server('b', 2)
        self.sql('a', "SET sql_log_bin = 0; CREATE USER 'repl'@'%%' IDENTIFIED BY '%s'; "
                      "GRANT REPLICATION SLAVE ON *.* TO 'repl'@'%%'; SET sql_log_bin = 1; "
                      "CREATE DATABASE bench; %s" % (REPL_PASSWORD, self.TABLE))
        rig.start_tunnels(MY_RELAY, MY_PORT, MY_NEAR)
        self.sql('b', "CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT=%d, MASTER_USER='repl', "
                      "MASTER_PASSWORD='%s', MASTER_USE_GTID=slave_pos; START SLAVE" % (MY_NEAR, REPL_PASSWORD))
        try:
            rig.wait_for(self.caught_up, 120, 'replica caught up with the schema', interval=0.1)
        except BenchError as e:
            raise BenchError('%s (%s)' % (e, self.last_status))
        before = rig.mark()
        started = time.monotonic()
        with open(os.path.join(self.dir, 'load.sql')) as f:
            self.sql('a', None, stdin=f, timeout=3600)
        ended = time.monotonic()
        rig.wait_for(self.caught_up, 1800, 'replica caught up after the load', interval=0.02)
        lag = time.monotonic() - ended
        after = rig.mark()
        sums = [self.checksum(host) for host in ('a', 'b')]
        binlog = self.sql('a', 'SHOW BINARY LOGS')
        record = rig.phase('binlog', before, after, lag + ended - started, rows=self.a.rows,
                           load_seconds=round(ended - started, 2), catch_up_s=round(lag, 3),
                           binlog_bytes=sum(int(line.split()[1]) for line in binlog.splitlines()),
                           data_equal=sums[0] == sums[1], checksum=sums[0].replace('\t', ' ').split('\n'))
        if sums[0] != sums[1]:
            raise BenchError('replica differs from the primary: %s / %s' % tuple(sums))
        return [record]

    def servers(self):
        return [(self.replica, signal.SIGTERM), (self.primary, signal.SIGTERM)]


# ---------------------------------------------------------------------------
# Runs and report
# ---------------------------------------------------------------------------

def make_database(name, rig, args):
    """(the database's runner, None), or (None, why it is skipped)."""
    user = args.pg_user if name == 'postgresql' else args.mariadb_user
    try:
        pwd.getpwnam(user)
    except KeyError:
        return None, 'no user %s to run %s as' % (user, name)
    if name == 'postgresql':
        bin_dir = find_pg_bin(args.pg_bin)
        if not bin_dir:
            return None, ('PostgreSQL not found (initdb, postgres, pg_basebackup, pgbench, psql): '
                          'apt-get install postgresql')
        return Postgres(rig, bin_dir, user), None
    programs = find_mariadb()
    if not programs:
        return None, ('MariaDB not found (mariadbd, mariadb-install-db, mariadb): '
                      'apt-get install mariadb-server')
    return MariaDB(rig, programs, user), None


def run_database(name, args, link, work):
    """One database on a link of its own: its records, or one saying why not."""
    rig = Rig(args, link, os.path.join(work, name))
    for directory in (work, rig.work):
        os.makedirs(directory, exist_ok=True)
        os.chmod(directory, 0o755)  # the servers' users must reach their own directories below
    db, why = make_database(name, rig, args)
    if why:
        log('skipped: %s: %s' % (name, why))
        return [{'database': name, 'skipped': why}]
    started = time.monotonic()
    records = []
    try:
        db.prepare()
        link.up(args.link)
        records = db.run()
    except BenchError as e:
        records.append({'database': name, 'error': str(e)})
        log('%s: error: %s' % (name, e))
    finally:
        rig.stop_all(db.servers())
        counters = link.down() if link.is_up else {}
    rig.compress([r for r in records if 'phase' in r])
    for record in records:
        record['database'] = name
    records.append({'database': name, 'wan_down': counters, 'seconds': round(time.monotonic() - started, 1)})
    return records


def mb(n):
    return '' if n is None else '%.1f' % (n / 1e6)


def pct(p):
    return '' if p is None else '%.1f%%' % p


def print_table(phases):
    """Medians over the runs, one row per phase."""
    print('\n| database | phase | runs | time s | plaintext a→b MB | tunnel wire a→b MB | tunnel saving '
          '| zlib -6 | zstd -3 | IP a→b MB | near cache chunks (avg KB) |')
    print('|---|---|---|---|---|---|---|---|---|---|---|')
    for (database, phase), rows in phases.items():
        def med(key):
            return harness.median(r.get(key) for r in rows)
        chunks = med('near_cache_chunks')
        print('| %s | %s | %d | %.1f | %s | %s | %s | %s | %s | %s | %d (%.1f) |' % (
            database, phase, len(rows), med('seconds'), mb(med('plain_down_bytes')),
            mb(med('tunnel_down_wire_bytes')), pct(med('tunnel_saving_percent')),
            pct(med('zlib6_saving_percent')), pct(med('zstd3_saving_percent')), mb(med('link_ab_bytes')),
            chunks, med('near_cache_bytes') / chunks / 1e3 if chunks else 0))


def report(records):
    """A table of medians over the runs per phase, then each run's lines."""
    phases = collections.OrderedDict()
    for r in records:
        if 'phase' in r:
            phases.setdefault((r['database'], r['phase']), []).append(r)
    if phases:
        print_table(phases)
    print()
    second = []
    for r in records:
        first = [x for x in records if x.get('phase') == 'basebackup-1' and x['run'] == r['run']]
        if r.get('phase') == 'basebackup-2' and first:
            second.append(100.0 * r['tunnel_down_wire_bytes'] / first[0]['tunnel_down_wire_bytes'])
            print('run %d: second base backup / first, on the wire: %.1f%% (tunnel), %.1f%% (IP a→b)' % (
                r['run'], second[-1], 100.0 * r['link_ab_bytes'] / first[0]['link_ab_bytes']))
        if r.get('phase') == 'wal-stream':
            print('run %d: wal-stream: %.0f tps, %.1f MB of WAL in %.1f s; at the end %s bytes behind, '
                  'replay_lag %s s, replayed everything %.3f s after the load; tables equal: %s' % (
                      r['run'], r['tps'] or 0, r['wal_bytes'] / 1e6, r['load_seconds'], r['lag_bytes_at_end'],
                      r['replay_lag_at_end_s'], r['catch_up_s'], r['data_equal']))
        if r.get('phase') == 'binlog':
            print('run %d: binlog: %d rows, %.1f MB of binlog, load %.1f s, replica caught up %.3f s after it; '
                  'CHECKSUM TABLE equal: %s' % (r['run'], r['rows'], r['binlog_bytes'] / 1e6, r['load_seconds'],
                                                r['catch_up_s'], r['data_equal']))
        if 'wan_down' in r:
            print('run %d: %s: `wan down` counters %s; %.0f s in all' % (r['run'], r['database'], json.dumps(
                {d: {k: c.get(k) for k in ('bytes_in', 'pkts_in', 'random_loss', 'queue_drop')}
                 for d, c in r['wan_down'].items() if isinstance(c, dict)}), r['seconds']))
        if 'error' in r or 'skipped' in r:
            print('run %d: %s: %s' % (r['run'], r['database'], r.get('error') or 'skipped: ' + r['skipped']))
    if len(second) > 1:
        print('second base backup / first, on the wire (tunnel), median of %d runs: %.1f%%'
              % (len(second), harness.median(second)))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ['--relay']:
        relay_main(int(argv[1]), int(argv[2]), argv[3])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_common_options(parser, LINK)
    parser.add_argument('--runs', type=int, default=1, help='runs of each database, a fresh link, servers and '
                        'tunnel caches each; the table shows medians (default: %(default)s)')
    parser.add_argument('--databases', default=','.join(DATABASES),
                        help='which, in order (default: %(default)s)')
    parser.add_argument('--scale', type=int, default=20, help='pgbench -i scale (default: %(default)s)')
    parser.add_argument('--load-seconds', type=int, default=60, help='pgbench -T (default: %(default)s)')
    parser.add_argument('--clients', type=int, default=4, help='pgbench -c (default: %(default)s)')
    parser.add_argument('--rows', type=int, default=200000, help='MariaDB rows inserted (default: %(default)s)')
    parser.add_argument('--binlog-format', default='ROW', choices=('ROW', 'MIXED', 'STATEMENT'),
                        help='MariaDB binlog_format (default: %(default)s)')
    parser.add_argument('--pg-bin', help='PostgreSQL programs (default: newest /usr/lib/postgresql/*/bin)')
    parser.add_argument('--pg-user', default='postgres', help='user the PostgreSQL servers run as '
                                                              '(default: %(default)s)')
    parser.add_argument('--mariadb-user', default='mysql', help='user the MariaDB servers run as '
                                                                '(default: %(default)s)')
    parser.add_argument('--work', default='/var/tmp', help='a fresh directory for the run is made in it '
                                                           '(default: %(default)s)')
    parser.add_argument('--keep', action='store_true', help='keep the run\'s directory (data, captures, logs)')
    args = parser.parse_args(argv)
    names = [n for n in args.databases.split(',') if n]
    unknown = set(names) - set(DATABASES)
    if unknown:
        parser.error('unknown database %s (known: %s)' % (', '.join(sorted(unknown)), ', '.join(DATABASES)))
    if os.geteuid() != 0:
        log('skipped: bench_replication.py needs root (network namespaces); run it with sudo')
        return 0
    args.wanxfer = os.path.abspath(args.wanxfer)
    args.json = args.json and os.path.abspath(args.json)
    link = harness.make_link(args)
    work = tempfile.mkdtemp(prefix='wanxfer-repl-', dir=args.work)
    os.chmod(work, 0o755)
    log('working in %s' % work)
    records = []
    try:
        for run in range(args.runs):
            for name in names:
                for record in run_database(name, args, link, os.path.join(work, 'run-%d' % run)):
                    record['run'] = run
                    records.append(record)
    finally:
        if link.is_up:
            link.down()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report(records)
    harness.write_json(args.json, {'machine': harness.machine(), 'link': args.link, 'records': records})
    return 1 if any('error' in r for r in records) else 0


if __name__ == '__main__':
    sys.exit(main())
