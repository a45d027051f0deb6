#!/usr/bin/env python3
"""Where a tunnel's bytes go on a stream of small writes (issue 15): a
captured stream replayed, read by read, through the tunnel's own encoder
(StreamEncoder, with Stream's flush rule: a read under FLUSH_AT_ONCE goes at
once, a larger one when no read follows within FLUSH_GRACE) and sending
half (PeerWriter's packing, compression and sealing, one frame per flush,
as when the writer keeps up), against zlib -6 and -7 of the same bytes.

Capture first (root, and PostgreSQL's or MariaDB's programs: a primary and
a standby or replica on loopback, a relay between them that keeps each read's
bytes, size and time; MariaDB gets bench_replication.py's load of 200,000
rows, updates and deletes):

  python3 tests/bench/bench_tunnel_writes.py --capture-postgresql /var/tmp/walcap --seconds 60
  python3 tests/bench/bench_tunnel_writes.py /var/tmp/walcap/down
  python3 tests/bench/bench_tunnel_writes.py --capture-mariadb /var/tmp/binlogcap
  git show 3955930:wanxfer.py > /tmp/old.py
  python3 tests/bench/bench_tunnel_writes.py /var/tmp/walcap/down --wanxfer /tmp/old.py

A capture is PREFIX.bin (the bytes) and PREFIX.trace (per read:
struct '<qI', monotonic ns and size); down is primary to standby.
"""

import argparse
import collections
import importlib.util
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

TRACE = struct.Struct('<qI')


def load(path):
    if not path:
        return harness.wanxfer
    spec = importlib.util.spec_from_file_location('wanxfer_under_test', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class MemoryStore:
    def __init__(self):
        self.chunks = {}

    def has(self, digest):
        return digest in self.chunks

    def get(self, digest):
        return self.chunks.get(digest)

    def put(self, digest, data):
        self.chunks[digest] = data


def reads_of(prefix):
    with open(prefix + '.trace', 'rb') as f:
        trace = f.read()
    return [TRACE.unpack_from(trace, i) for i in range(0, len(trace), TRACE.size)]


def flushes(w, reads, data):
    """The pieces of each DATA frame the tunnel would send, in order."""
    encoder = w.StreamEncoder(MemoryStore())
    grace = int(w.FLUSH_GRACE * 1e9)
    position = 0
    for i, (when, n) in enumerate(reads):
        chunk = data[position:position + n]
        position += n
        flush = n < w.FLUSH_AT_ONCE
        pieces, _refs = encoder.encode(chunk, flush=flush)
        if pieces:
            yield pieces
        if not flush and (i + 1 == len(reads) or reads[i + 1][0] - when > grace):
            pieces, _refs = encoder.encode(flush=True)
            if pieces:
                yield pieces
    pieces, _refs = encoder.encode(final=True)
    if pieces:
        yield pieces


def replay(w, reads, data):
    """Wire bytes of the replay and how they split."""
    pool = w.DeflatePool(0)
    a, b = socket.socketpair()
    sealer = w.Sealer(bytes(64), True)
    writer = w.PeerWriter(a, sealer, lambda name: None, pool)
    if hasattr(writer, 'lzma_ok'):
        writer.lzma_ok = w.lzma is not None
    choice = w.BlobChoice() if hasattr(w, 'BlobChoice') else None
    figures = collections.Counter()
    started = time.process_time()
    for pieces in flushes(w, reads, data):
        item = ('data', 1, pieces, choice) if choice is not None else ('data', 1, pieces)
        staged = writer._stage(item, 0)
        frame = writer._frame(staged)
        encoding = staged.result[0]
        figures['frames'] += 1
        figures['frames encoding %d' % encoding] += 1
        figures['wire'] += len(frame)
        figures['blob bytes encoding %d' % encoding] += len(staged.result[1])
        figures['pieces'] += len(pieces)
    figures['cpu seconds'] = round(time.process_time() - started, 2)
    a.close()
    b.close()
    pool.close()
    return figures


def zlib_size(data, level):
    packer = zlib.compressobj(level)
    return len(packer.compress(data)) + len(packer.flush())


# ---------------------------------------------------------------------------
# Capture: PostgreSQL WAL streaming on loopback
# ---------------------------------------------------------------------------

def pg_bin():
    base = '/usr/lib/postgresql'
    versions = sorted(os.listdir(base), key=lambda v: int(v.split('.')[0])) if os.path.isdir(base) else []
    return os.path.join(base, versions[-1], 'bin') if versions else None


class Recorder:
    """A relay for one connection (the standby's or replica's to the
    primary) that keeps what the primary sent, read by read, while
    `recording` is set: OUT/down.bin and down.trace, up.bin and up.trace."""

    def __init__(self, out, listen_port, primary_port):
        self.out, self.primary_port = out, primary_port
        self.recording = threading.Event()
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(('127.0.0.1', listen_port))
        self.listener.listen(1)
        threading.Thread(target=self._relay, daemon=True).start()

    def _relay(self):
        conn, _ = self.listener.accept()
        upstream = socket.create_connection(('127.0.0.1', self.primary_port))
        threading.Thread(target=self._pump, args=(upstream, conn, 'down'), daemon=True).start()
        threading.Thread(target=self._pump, args=(conn, upstream, 'up'), daemon=True).start()

    def _pump(self, source, dest, name):
        buffer = bytearray(1 << 20)
        view = memoryview(buffer)
        with open(os.path.join(self.out, name + '.bin'), 'wb') as data, \
                open(os.path.join(self.out, name + '.trace'), 'wb') as trace:
            try:
                while True:
                    n = source.recv_into(buffer)
                    if not n:
                        break
                    if self.recording.is_set():
                        data.write(view[:n])
                        trace.write(TRACE.pack(time.monotonic_ns(), n))
                    dest.sendall(view[:n])
            except OSError:
                pass


def wait(predicate, timeout):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except subprocess.CalledProcessError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit('capture: timed out')
        time.sleep(0.1)                 # polling with a deadline


def capture_mariadb(out, ports=(25706, 25707, 25708)):
    import bench_replication
    programs = bench_replication.find_mariadb()
    if os.geteuid() != 0 or programs is None:
        harness.log('skipped: a capture needs root and MariaDB')
        return 0
    server_bin, install_db, client = programs
    work = os.path.join(out, 'mariadb')
    shutil.rmtree(work, ignore_errors=True)
    hosts = {'a': ports[0], 'b': ports[1]}
    for host in hosts:
        os.makedirs(os.path.join(work, host))
        shutil.chown(os.path.join(work, host), 'mysql', 'mysql')
        subprocess.run([install_db, '--no-defaults', '--datadir=' + os.path.join(work, host, 'data'),
                        '--user=mysql', '--skip-test-db', '--auth-root-authentication-method=socket'],
                       check=True, capture_output=True)
    load = os.path.join(work, 'load.sql')
    bench_replication.load_sql(load, 200000)

    def sql(host, query, stdin=None):
        return subprocess.run([client, '--no-defaults', '-S', os.path.join(work, host, 'sock'), '-u', 'root', '-N',
                               '-B'] + (['-e', query] if query else ['bench']), check=True, capture_output=True,
                              text=True, stdin=stdin).stdout.strip()

    def caught_up():
        return sql('b', 'SELECT @@gtid_slave_pos') == sql('a', 'SELECT @@gtid_binlog_pos')

    servers = []
    try:
        for server_id, (host, port) in enumerate(sorted(hosts.items()), 1):
            home = os.path.join(work, host)
            servers.append(subprocess.Popen(
                [server_bin, '--no-defaults', '--user=mysql', '--datadir=' + os.path.join(home, 'data'),
                 '--socket=' + os.path.join(home, 'sock'), '--pid-file=' + os.path.join(home, 'pid'),
                 '--port=%d' % port, '--bind-address=127.0.0.1', '--skip-name-resolve', '--server-id=%d' % server_id,
                 '--log-bin=binlog', '--binlog-format=ROW', '--relay-log=relay', '--skip-slave-start'],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait(lambda: sql('a', 'SELECT 1') == '1' and sql('b', 'SELECT 1') == '1', 60)
        sql('a', "SET sql_log_bin = 0; CREATE USER 'repl'@'%%' IDENTIFIED BY 'capture'; GRANT REPLICATION SLAVE "
                 "ON *.* TO 'repl'@'%%'; SET sql_log_bin = 1; CREATE DATABASE bench; %s"
            % bench_replication.MariaDB.TABLE)
        recorder = Recorder(out, ports[2], hosts['a'])
        sql('b', "CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT=%d, MASTER_USER='repl', "
                 "MASTER_PASSWORD='capture', MASTER_USE_GTID=slave_pos; START SLAVE" % ports[2])
        wait(caught_up, 60)
        recorder.recording.set()
        with open(load) as f:
            sql('a', None, stdin=f)
        wait(caught_up, 600)
        recorder.recording.clear()
        harness.log('captured %d bytes down' % os.path.getsize(os.path.join(out, 'down.bin')))
    finally:
        for p in reversed(servers):
            p.terminate()
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def capture_postgresql(out, seconds, user='postgres', ports=(25532, 25533, 25534)):
    primary_port, relay_port, standby_port = ports
    bin_dir = pg_bin()
    if os.geteuid() != 0 or bin_dir is None:
        harness.log('skipped: a capture needs root and PostgreSQL')
        return 0
    work = os.path.join(out, 'pg')
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    shutil.chown(work, user, user)

    def as_user(argv):
        return ['setpriv', '--reuid', user, '--regid', user, '--init-groups', '--'] + argv

    def run(argv):
        return subprocess.run(as_user(argv), check=True, capture_output=True, text=True).stdout

    def sql(port, query, db='bench'):
        return run([os.path.join(bin_dir, 'psql'), '-X', '-A', '-t', '-q', '-h', '127.0.0.1', '-p', str(port),
                    '-U', 'postgres', '-d', db, '-c', query]).strip()

    def answers(port, query='SELECT 1', expected='1', db='postgres'):
        try:
            return sql(port, query, db) == expected
        except subprocess.CalledProcessError:
            return False

    def server(data, port):
        return subprocess.Popen(as_user([os.path.join(bin_dir, 'postgres'), '-D', data, '-c',
                                         'listen_addresses=127.0.0.1', '-c', 'port=%d' % port, '-c',
                                         'unix_socket_directories=', '-c', 'max_wal_senders=10']),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    servers = []
    try:
        run([os.path.join(bin_dir, 'initdb'), '-D', os.path.join(work, 'primary'), '-U', 'postgres',
             '--auth=trust', '-E', 'UTF8', '--no-sync'])
        servers.append(server(os.path.join(work, 'primary'), primary_port))
        wait(lambda: answers(primary_port), 60)
        sql(primary_port, 'CREATE DATABASE bench', 'postgres')
        sql(primary_port, 'CREATE ROLE replicator WITH REPLICATION LOGIN')
        run([os.path.join(bin_dir, 'pgbench'), '-i', '-q', '-s', '20', '-h', '127.0.0.1', '-p',
             str(primary_port), '-U', 'postgres', 'bench'])
        standby = os.path.join(work, 'standby')
        run([os.path.join(bin_dir, 'pg_basebackup'), '-h', '127.0.0.1', '-p', str(primary_port), '-U',
             'replicator', '-D', standby, '-X', 'stream', '-c', 'fast', '-R', '-C', '-S', 'capture'])
        with open(os.path.join(standby, 'postgresql.auto.conf'), 'a') as f:
            f.write("primary_conninfo = 'host=127.0.0.1 port=%d user=replicator'\n" % relay_port)
        recorder = Recorder(out, relay_port, primary_port)
        servers.append(server(standby, standby_port))
        wait(lambda: answers(standby_port), 120)
        recorder.recording.set()
        load = run([os.path.join(bin_dir, 'pgbench'), '-c', '4', '-j', '2', '-T', str(seconds), '-h',
                    '127.0.0.1', '-p', str(primary_port), '-U', 'postgres', 'bench'])
        lsn = sql(primary_port, 'SELECT pg_current_wal_lsn()')
        wait(lambda: answers(standby_port, "SELECT pg_last_wal_replay_lsn() >= '%s'::pg_lsn" % lsn, 't',
                             'bench'), 120)
        recorder.recording.clear()
        harness.log('captured %d bytes down; %s' % (os.path.getsize(os.path.join(out, 'down.bin')),
                                                    load.strip().splitlines()[-1]))
    finally:
        for p in reversed(servers):
            p.send_signal(signal.SIGINT)
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('prefix', nargs='?', help='a capture: PREFIX.bin and PREFIX.trace')
    parser.add_argument('--wanxfer', help='another wanxfer.py to replay through')
    parser.add_argument('--capture-postgresql', metavar='DIR', help='capture WAL streaming into DIR')
    parser.add_argument('--capture-mariadb', metavar='DIR', help='capture binlog replication into DIR')
    parser.add_argument('--seconds', type=int, default=60, help='pgbench -T of a capture (default: 60)')
    args = parser.parse_args(argv)
    if args.capture_postgresql:
        os.makedirs(args.capture_postgresql, exist_ok=True)
        return capture_postgresql(args.capture_postgresql, args.seconds)
    if args.capture_mariadb:
        os.makedirs(args.capture_mariadb, exist_ok=True)
        return capture_mariadb(args.capture_mariadb)
    if not args.prefix:
        parser.error('give a capture, or --capture-postgresql DIR or --capture-mariadb DIR')
    w = load(args.wanxfer)
    reads = reads_of(args.prefix)
    with open(args.prefix + '.bin', 'rb') as f:
        data = f.read()
    figures = replay(w, reads, data)
    sizes = sorted(n for _, n in reads)
    print('%d bytes in %d reads (median %d bytes), %d frames, %d pieces' % (
        len(data), len(reads), sizes[len(sizes) // 2], figures['frames'], figures['pieces']))
    for key in sorted(figures):
        if key.startswith(('frames encoding', 'blob bytes')):
            print('  %-28s %d' % (key, figures[key]))
    framing = figures['wire'] - sum(v for k, v in figures.items() if k.startswith('blob bytes'))
    print('  %-28s %d (%.2f%% of the wire)' % ('framing and headers', framing, 100.0 * framing / figures['wire']))
    print('tunnel: %d bytes, saving %.2f%% (%.2f CPU s)' % (
        figures['wire'], 100.0 * (1 - figures['wire'] / len(data)), figures['cpu seconds']))
    for level in (6, 7):
        size = zlib_size(data, level)
        print('zlib -%d: %d bytes, saving %.2f%%; tunnel / zlib = %.4f' % (
            level, size, 100.0 * (1 - size / len(data)), figures['wire'] / size))
    return 0


if __name__ == '__main__':
    sys.exit(main())
