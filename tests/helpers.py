"""What the tests share: the path of wanxfer.py and the one test secret,
one way of waiting, one set of data generators, one wrapper for the
wanxfer processes a test keeps running (`serve`, `tunnel`) beside `get`
run to completion, serve and tunnel --listen in this process, TCP targets
and a relay for the tunnel, and hostile peers built from wanxfer's own
handshake.  conftest.py holds the fixtures built on these; no test module
imports another.

Nothing here sleeps to synchronise: a process is waited on through the
lines it logs, anything else is polled with a deadline.  Failures raise
AssertionError, so pytest reports them as failed tests, and the
benchmarks under tests/bench/ can use these without pytest."""

import base64
import bisect
import collections
import contextlib
import fcntl
import hashlib
import inspect
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WANXFER = os.path.join(ROOT, 'wanxfer.py')
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import wanxfer  # noqa: E402

SECRET = 'test-secret-please-ignore'


def wanxfer_env(secret=SECRET):
    """This environment with WANXFER_SECRET set to `secret` (removed if None)."""
    env = dict(os.environ)
    env.pop('WANXFER_SECRET', None)
    if secret is not None:
        env['WANXFER_SECRET'] = secret
    return env


# ---------------------------------------------------------------------------
# Waiting
# ---------------------------------------------------------------------------

def wait_for(predicate, timeout=20.0, interval=0.02, what='condition'):
    """Poll `predicate` until it is true and return its value; AssertionError
    at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)   # polling with a deadline, not synchronisation by sleep
    raise AssertionError('timed out waiting for %s' % what)


class FakeClock:
    """A clock for code that takes one (`clock=`): time moves only when a
    test advances it, or when the code under test sleeps on it."""

    def __init__(self, now=0.0):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        assert seconds >= 0
        self.now += seconds

    sleep = advance


# ---------------------------------------------------------------------------
# Data generators
# ---------------------------------------------------------------------------
# Deterministic, so a failure can be run again with the same bytes.

def noise(n, seed=b'noise'):
    """`n` incompressible bytes, the same for the same seed."""
    return hashlib.shake_256(seed).digest(n)


def sql_like(n, seed=1):
    """`n` bytes of text like a SQL dump: compressible, and no two rows alike."""
    r = random.Random(seed)
    names = ['alice', 'bob', 'carol', 'dave', 'erin', 'frank', 'grace', 'heidi']
    rows, size = [], 0
    while size < n:
        row = "INSERT INTO `orders` VALUES (%d,'%s',%d.%02d,'2024-%02d-%02d');\n" % (
            r.randrange(10 ** 6), r.choice(names), r.randrange(1000), r.randrange(100),
            r.randrange(1, 13), r.randrange(1, 29))
        rows.append(row)
        size += len(row)
    return ''.join(rows).encode()[:n]


def fixed_records(n):
    """`n` bytes of issue 15's reproduction: 128-byte records, each a
    counter and then constant padding (zeros, spaces), as a table's rows."""
    count = n // 128 + 1
    return b''.join(struct.pack('<I', i) + bytes(4) + b' ' * 84 + bytes(36) for i in range(count))[:n]


def database_pages(n, seed=1):
    """`n` bytes of 8 KiB pages like PostgreSQL's heap of pgbench_accounts:
    a header (LSN, checksum, bounds), line pointers, free space of zeros and
    128-byte tuples stored from the end; most pages full, some not."""
    r = random.Random(seed)
    pages, row, lsn = [], 1, 1 << 32
    for block in range(n // 8192 + 1):
        count = r.choice((61, 61, 61, r.randrange(1, 61)))
        page, pointers, upper = bytearray(8192), [], 8192
        for item in range(count):
            header = struct.pack('<IIIHHHHHB', 0x2d1, 0, 0, 0, block, item + 1, 4, 0x0902, 24) + bytes(1)
            values = struct.pack('<iii', row, 1 + row // 100000, r.choice((0, 0, 0, r.randrange(-5000, 5000))))
            body = header + values + b'\xab' + b' ' * 84
            upper -= 128
            page[upper:upper + len(body)] = body
            pointers.append(struct.pack('<I', upper | 1 << 15 | len(body) << 17))
            row += 1
        lsn += r.randrange(1, 1 << 16)
        lower = 24 + 4 * count
        page[:24] = struct.pack('<QHHHHHHI', lsn, r.getrandbits(16), 0, lower, upper, 8192, 0x2004, 0)
        page[24:lower] = b''.join(pointers)
        pages.append(bytes(page))
    return b''.join(pages)[:n]


def disk_image(n, seed=1):
    """`n` bytes like a disk image: 4 KiB-aligned extents of incompressible
    data and of zeros, 4 KiB to 256 KiB each."""
    r = random.Random(seed)
    extents, size = [], 0
    while size < n:
        length = r.randrange(1, 64) * 4096
        extents.append(noise(length, b'extent %d' % size) if r.random() < 0.5 else bytes(length))
        size += length
    return b''.join(extents)[:n]


def text_with_runs(n, seed=1):
    """`n` bytes of SQL-like text broken by runs of zeros or spaces, 100
    bytes to 100 KB long."""
    r = random.Random(seed)
    text, pieces, at = sql_like(n, seed), [], 0
    while at < len(text):
        length = r.randrange(2000, 60000)
        pieces += [text[at:at + length], r.choice((b' ', b'\0')) * r.randrange(100, 100000)]
        at += length
    return b''.join(pieces)[:n]


def make_file(path, size, seed=0):
    """A file of `size` incompressible bytes, the same for the same seed."""
    rng = random.Random(seed)
    with open(path, 'wb') as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(rng.getrandbits(8 * n).to_bytes(n, 'little') if n else b'')
            left -= n
    return path


def sha256(path):
    return wanxfer.file_sha256(str(path))


def partial_blocks(state_path):
    """How many blocks a .wxstate file records as written."""
    found = wanxfer.PartialFile.recorded(str(state_path))
    return 0 if found is None else sum(bin(b).count('1') for b in found[1])


# ---------------------------------------------------------------------------
# wanxfer processes
# ---------------------------------------------------------------------------

class Process:
    """A wanxfer.py child (or `program` given instead) whose stderr lines
    are collected by a thread as they come, so the pipe never fills and
    the log can be read, or waited on, at any time.  `stop()` sends
    `stop_signal` and waits; it may be called again."""

    def __init__(self, args, secret=SECRET, env=None, program=None, stop_signal=signal.SIGTERM):
        environment = wanxfer_env(secret)
        environment['PYTHONUNBUFFERED'] = '1'
        environment.update(env or {})
        self.args = list(program or (sys.executable, WANXFER)) + [str(a) for a in args]
        self.stop_signal = stop_signal
        self.lines = []
        self._ended = False
        self._changed = threading.Condition()
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, env=environment)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for raw in self.proc.stderr:
            with self._changed:
                self.lines.append(raw.decode('utf-8', 'replace').rstrip('\n'))
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def wait_for(self, pattern, timeout=10.0, count=1):
        """The count-th match of the regular expression `pattern` in stderr,
        waiting up to `timeout`; AssertionError (with the log) at the
        deadline or when the process has ended without it."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                matches = [m for m in map(regex.search, self.lines) if m]
                if len(matches) >= count:
                    return matches[count - 1]
                left = deadline - time.monotonic()
                if left <= 0 or self._ended:
                    raise AssertionError('no %r in stderr of %s:\n%s' % (
                        pattern, ' '.join(self.args), '\n'.join(self.lines)))
                self._changed.wait(left)

    def log(self):
        with self._changed:
            return '\n'.join(self.lines)

    def stop(self, sig=None, timeout=10.0):
        """Signal (if still running) and wait; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(self.stop_signal if sig is None else sig)
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            status = self.proc.wait()
        self._reader.join(10)
        self.proc.stderr.close()
        return status

    def rss_kib(self):
        with open('/proc/%d/status' % self.proc.pid) as f:
            for line in f:
                if line.startswith('VmRSS:'):
                    return int(line.split()[1])
        return 0


def starting(process, pattern, timeout=10.0, count=1):
    """process.wait_for() for a process just started, which is stopped if
    the line never comes: a failed start leaks nothing."""
    try:
        return process.wait_for(pattern, timeout, count)
    except BaseException:
        process.stop()
        raise


def run_wanxfer(args, secret=SECRET, timeout=30):
    """Run wanxfer.py to completion; the CompletedProcess (bytes)."""
    return subprocess.run([sys.executable, WANXFER] + [str(a) for a in args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env=wanxfer_env(secret), timeout=timeout)


# ---------------------------------------------------------------------------
# serve and get
# ---------------------------------------------------------------------------

def start_serve(paths, extra=(), secret=SECRET, port=0, program=None):
    """`serve PATHS` on 127.0.0.1 (a free port unless `port`), its port read
    from its 'listening on' line; stopped with SIGINT, as at a terminal."""
    server = Process(['serve', '--bind', '127.0.0.1', '--port', port] + list(extra) + list(paths),
                     secret, program=program, stop_signal=signal.SIGINT)
    server.port = int(starting(server, r'listening on \S+:(\d+)', 15).group(1))
    return server


def patched_serve(serve, paths, patch, extra=()):
    """`serve` (the fixture) from a wanxfer whose module was changed by the
    Python `patch` first (which sees `wanxfer` and `sys`): an older server,
    or one that logs what it is asked."""
    program = ('import sys\nsys.path.insert(0, %r)\nimport wanxfer\n%s\n'
               'sys.exit(wanxfer.main(sys.argv[1:]))' % (os.path.dirname(WANXFER), patch))
    return serve(paths, extra=extra, program=(sys.executable, '-c', program))


def get_command(port, *args):
    return [sys.executable, WANXFER, 'get', '127.0.0.1:%d' % port] + [str(a) for a in args]


def run_get(port, *args, secret=SECRET, timeout=90):
    """Run `get` to completion; the CompletedProcess (text)."""
    return subprocess.run(get_command(port, *args), env=wanxfer_env(secret), capture_output=True,
                          text=True, timeout=timeout)


@contextlib.contextmanager
def netns_lock():
    """Held while a test has network namespaces or TUN devices: one emulated
    link at a time on a machine others share.  The file to flock is
    $WANXFER_NETNS_LOCK, by default /work/scratch/wan.lock (where `wan`
    users take it on the machine this was written on), none if neither is
    set and that directory does not exist."""
    path = os.environ.get('WANXFER_NETNS_LOCK', '/work/scratch/wan.lock')
    if not os.path.isdir(os.path.dirname(path) or '.'):
        yield
        return
    with open(path, 'a') as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def json_summaries(completed):
    return [json.loads(line) for line in completed.stdout.splitlines() if line.startswith('{')]


# ---------------------------------------------------------------------------
# tunnel
# ---------------------------------------------------------------------------

def start_far(cache, allow, secret=SECRET, extra=()):
    """`tunnel --listen` on a free port of 127.0.0.1, allowing the target
    ports (or HOST:PORT strings) in `allow`."""
    args = ['tunnel', '--listen', '127.0.0.1:0', '--cache', cache]
    for target in allow:
        args += ['--allow', '127.0.0.1:%d' % target if isinstance(target, int) else target]
    far = Process(args + list(extra), secret=secret)
    far.port = int(starting(far, r'listening on 127\.0\.0\.1:(\d+) for peers').group(1))
    return far


def start_near(cache, peer_port, targets, secret=SECRET, extra=(), wait_connected=True):
    """`tunnel --peer 127.0.0.1:PEER_PORT` with a free local port forwarding
    to each target (`ports`, the first also as `port`); waits for the peer
    link unless told not to."""
    args = ['tunnel', '--peer', '127.0.0.1:%d' % peer_port, '--cache', cache]
    for target in targets:
        args += ['-L', '0:127.0.0.1:%d' % target if isinstance(target, int) else target]
    near = Process(args + list(extra), secret=secret)
    near.ports = [int(starting(near, r'listening on 127\.0\.0\.1:(\d+), forwarding', count=i + 1).group(1))
                  for i in range(len(targets))]
    near.port = near.ports[0]
    if wait_connected:
        starting(near, r'peer connection up')
    return near


class Tunnels:
    """The tunnel processes of one test (the `tunnel_pair` fixture).  Called
    with target ports, it starts a far side on tmp_path/far.db allowing them
    and a near side on tmp_path/near.db forwarding to them: (far, near).
    `far()` and `near()` start one side, as start_far and start_near do
    (again after a stop, or through a relay).  `stop_all()` stops every one
    started, the last first, also those of a start that failed halfway."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.started = []

    def __call__(self, targets, **options):
        far = self.far(self.tmp_path / 'far.db', targets)
        return far, self.near(self.tmp_path / 'near.db', far.port, targets, **options)

    def far(self, cache, allow, **options):
        return self._keep(start_far(cache, allow, **options))

    def near(self, cache, peer_port, targets, **options):
        return self._keep(start_near(cache, peer_port, targets, **options))

    def _keep(self, process):
        self.started.append(process)
        return process

    def stop_all(self):
        for process in reversed(self.started):
            process.stop()


def stats(cache):
    """`stats --json` of a cache file, parsed."""
    out = run_wanxfer(['stats', '--json', '--cache', cache])
    if out.returncode:
        raise AssertionError('stats failed: %s' % out.stderr.decode())
    return json.loads(out.stdout.decode())


# ---------------------------------------------------------------------------
# In-process servers
# ---------------------------------------------------------------------------
# serve and tunnel --listen on a thread of the test's own process, where a
# test can patch what they call (a thread that cannot start, a timeout).

class InProcessServer:
    """A wanxfer.Server on a thread of this process, its log kept in `lines`."""

    def __init__(self, paths):
        self.lines = []
        self.server = wanxfer.Server(wanxfer.ServedTree([str(p) for p in paths]), SECRET.encode(),
                                     '127.0.0.1', 0, log=self.lines.append)
        self.port = self.server.port
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def log(self):
        return '\n'.join(self.lines)

    def stop(self):
        self.server.shutdown()
        self.thread.join(10)


class InProcessFarTunnel:
    """A wanxfer.FarTunnel (`tunnel --listen`) on a thread of this process."""

    def __init__(self, tmp_path, allow):
        self.lines = []
        store = wanxfer.ChunkStore(str(tmp_path / 'far.db'), 64 << 20)
        self.tunnel = wanxfer.FarTunnel(SECRET.encode(), store, '127.0.0.1', 0,
                                        [('127.0.0.1', port) for port in allow],
                                        log=self.lines.append)
        self.port = self.tunnel.address[1]
        self.thread = threading.Thread(target=self.tunnel.run, daemon=True)
        self.thread.start()

    def log(self):
        return '\n'.join(self.lines)

    def stop(self):
        self.tunnel.stop()
        self.thread.join(10)


# ---------------------------------------------------------------------------
# TCP targets and a relay
# ---------------------------------------------------------------------------

class Server:
    """A threaded TCP server on 127.0.0.1:0 running handler(conn) per
    connection.  `accepted` counts connections."""

    def __init__(self, handler):
        self.handler = handler
        self.sock = socket.socket()
        self.sock.bind(('127.0.0.1', 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.errors = []
        self._threads = []
        self._closing = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn):
        try:
            self.handler(conn)
        except OSError as e:
            if not self._closing:
                self.errors.append(e)
        finally:
            conn.close()

    def close(self):
        self._closing = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._thread.join(5)


def echo_handler(conn):
    """Echo until EOF, then half-close."""
    while True:
        data = conn.recv(1 << 16)
        if not data:
            break
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


def digest_handler(conn):
    """Read to EOF, then answer with the SHA-256 and length of what came."""
    h, n = hashlib.sha256(), 0
    while True:
        data = conn.recv(1 << 16)
        if not data:
            break
        h.update(data)
        n += len(data)
    conn.sendall(('%s %d\n' % (h.hexdigest(), n)).encode())


def round_trip(port, payload, timeout=30.0):
    """Send payload through an echo target and return what came back (to EOF)."""
    conn = socket.create_connection(('127.0.0.1', port), timeout=timeout)
    received = bytearray()
    failure = []

    def send():
        try:
            conn.sendall(payload)
            conn.shutdown(socket.SHUT_WR)
        except OSError as e:
            failure.append(e)
    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        while True:
            data = conn.recv(1 << 20)
            if not data:
                break
            received += data
    finally:
        sender.join(timeout)
        conn.close()
    if failure:
        raise failure[0]
    return bytes(received)


class Relay:
    """A TCP relay between the near and far tunnel that counts the bytes
    each way and can cut every connection it carries (the WAN failing)."""

    def __init__(self, target_port):
        self.target_port = target_port
        self.sock = socket.socket()
        self.sock.bind(('127.0.0.1', 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.up = 0             # near -> far bytes
        self.down = 0           # far -> near bytes
        self.connections = 0
        self._lock = threading.Lock()
        self._live = []
        self._pumps = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                near, _ = self.sock.accept()
            except OSError:
                return
            try:
                far = socket.create_connection(('127.0.0.1', self.target_port))
            except OSError:
                near.close()                    # the far side is down: so is the path
                continue
            with self._lock:
                self.connections += 1
                self._live.append((near, far))
            for a, b, direction in ((near, far, 'up'), (far, near, 'down')):
                pump = threading.Thread(target=self._pump, args=(a, b, direction), daemon=True)
                self._pumps.append(pump)
                pump.start()

    def _pump(self, source, sink, direction):
        try:
            while True:
                data = source.recv(1 << 16)
                if not data:
                    break
                sink.sendall(data)
                with self._lock:
                    setattr(self, direction, getattr(self, direction) + len(data))
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            # One side was reset: reset the other too, as a router would pass the RST on.
            try:
                sink.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
                sink.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        """Reset every connection, as a failing WAN or a firewall would."""
        with self._lock:
            live, self._live = self._live, []
        for pair in live:
            for sock in pair:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
                sock.close()

    def join(self, timeout=10.0):
        deadline = time.monotonic() + timeout
        for pump in list(self._pumps):
            pump.join(max(0.0, deadline - time.monotonic()))

    def close(self):
        self.sock.close()
        self.cut()


# ---------------------------------------------------------------------------
# Path model
# ---------------------------------------------------------------------------
# A path in discrete time, for RateController without sockets or clocks, laid
# out as wanemu lays out the real one: random loss (each packet alone, or in
# bursts), then a drop-tail queue of `queue` seconds in front of a bottleneck
# of `capacity` bytes/s, then the one-way delay.  Each flow's sender paces at
# its controller's rate within the real sender's in-flight cap and feeds the
# controller as ServerSession does (wire bytes and packets delivered, packets
# lost, the smoothed round trip, the send time of the newest packet acked;
# half the rate after a long silence).  Its receiver acknowledges every
# feedback interval with the least queueing delay it saw there; the
# acknowledgement takes the one-way delay back and is lost as often as data
# (the next one carries its news: acknowledgements are cumulative).

class ModelFlow:
    """One sender and its receiver across a ModelPath.  With `files`, a
    list of (size in bytes, pause in seconds after it), the last repeated,
    it sends files one after another and idles between them, and tells its
    controller whenever it has nothing to send, as the real sender does
    (unless not `tell_idle`).  With `first_ack`, the receiver's first
    acknowledgement covers that many seconds of arrivals (one starting up,
    as a real receiver's worker does, acknowledges late); with
    `idle_first`, the sender has nothing to send for that long after it
    starts (a delta transfer's sender waits for the receiver's requests).
    With `batch`, the sender sends that many packets at a time (or as many
    as batch(rate) says), as the real one does (one read, one send of up
    to 64 KB), and with `sample_every`
    its receiver samples the delay of one packet in that many, as the real
    one does, and reports no queue for an interval in which it sampled
    none."""

    def __init__(self, path, controller, start, files=None, tell_idle=True, first_ack=0.0,
                 idle_first=0.0, batch=1, sample_every=1, learn_base=False):
        self.path = path
        # As a real receiver does (ReceiveWindow), sample the first packet
        # of every acknowledgement interval too, and report the queue
        # against the least delay it has sampled, not the path's true one:
        # a flow that starts beside a standing queue never sees it empty.
        self.learn_base = learn_base
        self._least_delay = None
        self.batch, self.sample_every = batch, sample_every
        self._arrived = 0.0                     # packets the receiver got, for its sampling
        self.first_ack = first_ack              # s of arrivals the receiver's first acknowledgement covers
        self.controller = controller
        self.start = start
        self.files, self.tell_idle = list(files or ()), tell_idle
        self._left = self.files[0][0] if self.files else None
        self._idle_until = self._limited_until = start + idle_first
        self._told_idle = False                 # ... and said so, not yet that it has data again
        try:        # older controllers were not told send times
            inspect.signature(controller.on_feedback).bind(*range(9))
            self._told_times = True
        except TypeError:
            self._told_times = False
        self.rtt = path.rtt + path.ack_lag      # the handshake's round trip to begin with
        self.feedback_interval = max(wanxfer.FEEDBACK_INTERVAL[0],
                                     min(wanxfer.FEEDBACK_INTERVAL[1], self.rtt / 8))
        # A share of a striped file is acknowledged as the real receiving
        # worker acknowledges its flow (by how many flows share the file):
        # every k intervals on a long path, once the packets it took last
        # were sent past the startup (wanxfer.DATA_FLAG_STEADY).
        self._stretched_interval = self.feedback_interval
        self._steady_from = []                  # (send time, steady) where the sender's changed
        shared = getattr(controller, '_shared', None)
        if isinstance(shared, wanxfer.SharedRate) and hasattr(wanxfer, 'stretched_feedback'):
            self._stretched_interval = wanxfer.feedback_interval(self.rtt, shared.count)
            if not hasattr(wanxfer, 'DATA_FLAG_STEADY'):    # (before it, from the first packet)
                self.feedback_interval = self._stretched_interval
        self._budget = 0.0
        self._last_tick = start
        self._in_flight = 0                     # bytes sent, not yet acknowledged
        self._last_feedback = start
        # Receiver: cumulative counts, and what arrived since the last feedback.
        self._got_bytes = self._got_packets = self._lost_packets = 0
        self._interval_delay = None             # the least queue sampled since the last feedback
        self._heard = False                     # ... and whether anything arrived since
        self._newest = None                     # (send time, arrival time) of the newest arrival
        self._first_arrival = None
        self._next_feedback = start + self.feedback_interval
        self._feedback = collections.deque()    # (arrives at the sender, acknowledgement)
        # Sender: what the last acknowledgement it read said.
        self._acked = (0, 0, 0, None)
        self.sent_bytes = self.dropped_packets = self.lost_packets = 0
        self.delivered = collections.Counter()  # bytes that reached the receiver, per 0.1 s
        self.rates = []                         # (time, controller's rate) every step
        if hasattr(controller, 'on_start'):     # as the real sender does with its first file
            controller.on_start(start, self.rtt)

    def send(self, now):
        """Pace out this step's packets: (packets that survive the random
        loss, packets it took)."""
        if hasattr(self.controller, 'on_tick'):
            self.controller.on_tick(now)
        rate = self.controller.rate
        self._budget = min(self._budget + rate * (now - self._last_tick),
                           rate * self.path.PACING_BURST + 65536)
        self._last_tick = now
        packet = self.path.packet
        cap = max(256 * packet, rate * (2 * self.rtt + 0.2))
        if now < self._idle_until:
            self._limited_until = now + self.rtt
            if self.tell_idle and hasattr(self.controller, 'on_idle'):
                self.controller.on_idle(now)
                self._told_idle = True
            self.rates.append((now, rate))
            return 0, 0
        if self._told_idle:
            # As the real sender does when it has data again: a share it
            # lent while idle is taken back at once.
            self._told_idle = False
            if hasattr(self.controller, 'on_busy'):
                self.controller.on_busy(now)
                rate = self.controller.rate
        count = 0
        batch = self.batch(rate) if callable(self.batch) else self.batch
        while self._budget > 0 and self._in_flight + (count + batch) * packet <= cap:
            self._budget -= batch * packet
            count += batch
        if self.files:
            count = min(count, -(-self._left // packet))
            self._left -= count * packet
            if self._left <= 0:                 # this file is sent: pause, then the next
                pause = self.files[0][1]
                if len(self.files) > 1:
                    self.files.pop(0)
                self._left = self.files[0][0]
                self._idle_until = now + pause
                self._limited_until = self._idle_until + self.rtt
        self._in_flight += count * packet
        self.sent_bytes += count * packet
        steady = bool(getattr(self.controller, 'steady', False))
        if count and (self._steady_from[-1][1] if self._steady_from else False) != steady:
            self._steady_from.append((now, steady))
        kept = sum(1 for _ in range(count) if not self.path.randomly_lost())
        self.lost_packets += count - kept
        self.rates.append((now, rate))
        return kept, count - kept

    def arrive(self, now, sent_at, nbytes, lost, queue_delay):
        """Bytes that crossed the bottleneck reach the receiver, and the
        gaps that packets lost before them left."""
        self._lost_packets += lost
        if not nbytes:
            return
        self._got_bytes += nbytes
        self._got_packets += nbytes / self.path.packet
        self.delivered[int(now * 10)] += nbytes
        before, self._arrived = self._arrived, self._arrived + nbytes / self.path.packet
        sampled = self.sample_every <= 1 or \
            int(self._arrived) // self.sample_every > int(before) // self.sample_every or \
            (self.learn_base and not self._heard)
        if sampled and self.learn_base:
            if self._least_delay is None or queue_delay < self._least_delay:
                self._least_delay = queue_delay
            queue_delay -= self._least_delay
        if sampled and (self._interval_delay is None or queue_delay < self._interval_delay):
            self._interval_delay = queue_delay
        self._heard = True
        if self._newest is None or sent_at >= self._newest[0]:
            self._newest = (sent_at, now)

    def receiver_tick(self, now):
        if now < self._next_feedback:
            return
        # A busy receiver is late to acknowledge (it says by how much).
        self._next_feedback = now + self._receiver_interval() + self.path.random.random() * self.path.jitter
        if not self._heard:
            return                                  # nothing arrived: nothing to say
        if self._first_arrival is None:
            self._first_arrival = now
        if now < self._first_arrival + self.first_ack:
            return                                  # a receiver still starting up: later, all at once
        sent_at, arrived = self._newest
        ack = (self._got_bytes, self._got_packets, self._lost_packets, sent_at,
               now - arrived, self._interval_delay or 0.0)
        self._interval_delay = None
        self._heard = False
        if not self.path.randomly_lost():
            # A busy sender reads it late too, never out of order.
            arrival = now + self.path.rtt / 2 + self.path.ack_lag + \
                self.path.random.random() * self.path.jitter / 5
            if self._feedback:
                arrival = max(arrival, self._feedback[-1][0])
            self._feedback.append((arrival, ack))

    def _receiver_interval(self):
        """The interval the receiver acknowledges at next: stretched if the
        newest packet it took said its sender was steady."""
        if self._newest is None or not self._steady_from:
            return self.feedback_interval
        i = bisect.bisect_right(self._steady_from, (self._newest[0], True)) - 1
        return self._stretched_interval if i >= 0 and self._steady_from[i][1] else self.feedback_interval

    def sender_tick(self, now):
        while self._feedback and self._feedback[0][0] <= now:
            _, (got, packets, lost, sent_at, ack_delay, queue_delay) = self._feedback.popleft()
            old_got, old_packets, old_lost, _ = self._acked
            self._acked = (got, packets, lost, sent_at)
            self._in_flight = max(0, self._in_flight - (got - old_got) - (lost - old_lost) * self.path.packet)
            sample = now - sent_at - ack_delay
            self.rtt = 0.875 * self.rtt + 0.125 * sample
            self._last_feedback = now
            # Controllers without on_idle were told by a flag, a round trip long.
            flagged = self.tell_idle and not hasattr(self.controller, 'on_idle') and \
                now < self._limited_until
            news = (now, queue_delay, got - old_got, packets - old_packets, lost - old_lost, self.rtt,
                    flagged)
            if self._told_times:
                self.controller.on_feedback(*news, sent_at, ack_delay)
            else:
                self.controller.on_feedback(*news)
        silence = max(0.5, 4 * self.rtt)
        if now - self._last_feedback > silence and self._in_flight > 0:
            self.controller.on_silence()
            self._last_feedback += silence

    def goodput(self, start, end):
        """Bytes/s that reached the receiver from `start` to `end` (multiples of 0.1 s)."""
        bins = range(int(round(start * 10)), int(round(end * 10)))
        return sum(self.delivered[b] for b in bins) / (end - start)

    def first_time_above(self, level, span=1.0):
        """The first time from which `span` seconds delivered at least `level` bytes/s."""
        bins = int(round(span * 10))
        last = max(self.delivered) if self.delivered else 0
        for b in range(int(self.start * 10), last - bins + 2):
            if sum(self.delivered[b + i] for i in range(bins)) >= level * span:
                return b / 10.0
        return None


def share_batches(shared, rtt, block_size=1500, largest=45):
    """How many packets a share of `shared` (a SharedRate) sends at a time,
    by its rate, as the real sender batches it (wanxfer.share_batch): as
    for flows acknowledged every interval until the rate control is past
    its startup (wanxfer.DATA_FLAG_STEADY)."""
    def batch(rate):
        steady = getattr(shared.controller, 'steady', True)
        return wanxfer.share_batch(rate, block_size, largest, rtt, shared.count if steady else 1)
    return batch


class AimdFlow:
    """TCP Reno's congestion control as a rate, to share a ModelPath with: a
    window that doubles every round trip until the first loss, then grows
    by a packet every round trip and halves at most once a round trip when
    packets are lost; it sends a window per smoothed round trip (its ACK
    clock), so a queue slows it as it slows TCP."""

    def __init__(self, packet=1500, window=10):
        self.packet = packet
        self.window = window * packet           # bytes
        self.rtt = None
        self.slow_start = True
        self._last_cut = float('-inf')
        self.rate = self.window / 0.1

    def on_feedback(self, now, queue_delay, delivered_bytes, delivered, lost, rtt, *more):
        self.rtt = rtt
        if lost and now - self._last_cut >= rtt:
            self.window = max(2 * self.packet, self.window / 2)
            self.slow_start = False
            self._last_cut = now
        elif not lost and self.slow_start:
            self.window += delivered_bytes
        elif not lost:
            self.window += self.packet * delivered_bytes / self.window
        self.rate = self.window / rtt

    def on_silence(self):
        self.window = max(2 * self.packet, self.window / 2)


class CubicFlow(AimdFlow):
    """TCP CUBIC (RFC 8312, as Linux runs it) as a rate: on loss the window
    falls to 0.7 of itself, then grows back along a cubic that flattens
    near the window of the last loss, so a drop-tail queue stays nearly
    full (the flow of bench_share.py)."""

    C, BETA = 0.4, 0.7

    def __init__(self, packet=1500, window=10):
        super().__init__(packet, window)
        self._epoch = self._w_max = self._k = 0.0

    def on_feedback(self, now, queue_delay, delivered_bytes, delivered, lost, rtt, *more):
        self.rtt = rtt
        packets = self.window / self.packet
        if lost and now - self._last_cut >= rtt:
            self._w_max = packets
            self.window = max(2 * self.packet, self.window * self.BETA)
            self._k = (self._w_max * (1 - self.BETA) / self.C) ** (1 / 3.0)
            self.slow_start = False
            self._last_cut = self._epoch = now
        elif not lost and self.slow_start:
            self.window += delivered_bytes
        elif not lost:
            t = now - self._epoch
            target = self.C * (t - self._k) ** 3 + self._w_max
            friendly = self._w_max * self.BETA + 3 * (1 - self.BETA) / (1 + self.BETA) * t / rtt
            target = max(target, friendly, packets)
            got = delivered_bytes / self.packet
            self.window += min(target - packets, got * (target - packets) / packets + got / (100 * packets)) \
                * self.packet
        self.rate = self.window / rtt


class ModelPath:
    """A bottleneck shared by ModelFlows; run(until) advances it in steps of
    `step` seconds.  Rates in bytes/s, times in seconds; `loss` a fraction,
    in bursts of `burst` packets on average (Gilbert-Elliott, as wanemu);
    the receiver acknowledges up to `jitter` seconds late, the sender reads
    acknowledgements up to a fifth of that late, and they take `ack_lag`
    seconds longer than the data to cross (`rtt` is the data's alone).
    `stalls` (every, length): the bottleneck stops for about `length`
    seconds at random, on average every `every` seconds, as a busy host
    running the emulator does."""

    PACING_BURST = 0.002

    def __init__(self, capacity, rtt, queue=0.05, loss=0.0, burst=1.0, seed=1, step=0.001,
                 packet=1500, jitter=0.0, ack_lag=0.0, stalls=(0.0, 0.0)):
        self.capacity, self.rtt, self.queue_limit, self.jitter = capacity, rtt, queue, jitter
        self.ack_lag = ack_lag
        self.stall_every, self.stall_length = stalls
        self._stalled_until = 0.0
        self.loss, self.burst, self.step, self.packet = loss, burst, step, packet
        self.random = random.Random(seed)
        self._bad = False
        self.flows = []
        self.now = 0.0
        self._queue = collections.deque()       # [flow, send time, bytes left, enqueued at, lost]
        self._queued = 0.0                      # bytes
        self._in_transit = collections.deque()  # (arrival, flow, send time, bytes, lost, queueing delay)
        self.dropped = collections.Counter()    # packets the full queue dropped, per 0.1 s
        self.queue_delay = collections.Counter()    # the longest queue, per 0.1 s

    def add_flow(self, controller, start=0.0, **options):
        flow = ModelFlow(self, controller, start, **options)
        self.flows.append(flow)
        return flow

    def inject(self, seconds):
        """Another flow's burst joins the queue now: `seconds` of the bottleneck's time."""
        self._queue.append([None, self.now, seconds * self.capacity, self.now, 0])
        self._queued += seconds * self.capacity

    def randomly_lost(self):
        if not self.loss:
            return False
        if self.burst > 1:
            back = 1.0 / self.burst
            self._bad = self.random.random() >= back if self._bad else \
                self.random.random() < self.loss * back / (1 - self.loss)
            return self._bad
        return self.random.random() < self.loss

    def run(self, until):
        step = self.step
        while self.now < until:
            self.now = now = round(self.now + step, 9)
            flows = [f for f in self.flows if f.start <= now]
            for flow in flows:
                flow.sender_tick(now)
            # Arrivals from different senders interleave at the queue.
            for flow in (flows if int(now / step) % 2 else flows[::-1]):
                kept, lost = flow.send(now)
                room = int((self.queue_limit * self.capacity - self._queued) // self.packet) + 1
                entered = max(0, min(kept, room))
                if kept > entered:
                    flow.dropped_packets += kept - entered
                    self.dropped[int(now * 10)] += kept - entered
                if kept or lost:
                    # The receiver sees the gaps when what follows them arrives.
                    self._queue.append([flow, now, entered * self.packet, now, lost + kept - entered])
                    self._queued += entered * self.packet
            key = int(now * 10)
            self.queue_delay[key] = max(self.queue_delay[key], self._queued / self.capacity)
            if self.stall_every and now >= self._stalled_until and \
                    self.random.random() < step / self.stall_every:
                self._stalled_until = now + self.stall_length * (0.5 + self.random.random())
            service = self.capacity * step if now >= self._stalled_until else 0.0
            while self._queue and (service > 0 or self._queue[0][2] <= 0):
                head = self._queue[0]
                served = min(service, head[2])
                head[2] -= served
                service -= served
                self._queued -= served
                self._in_transit.append((now + self.rtt / 2, head[0], head[1], served, head[4],
                                         now - head[3]))
                head[4] = 0
                if head[2] <= 0:
                    self._queue.popleft()
            while self._in_transit and self._in_transit[0][0] <= now:
                _, flow, sent_at, nbytes, lost, delay = self._in_transit.popleft()
                if flow is not None:
                    flow.arrive(now, sent_at, nbytes, lost, delay)
            for flow in flows:
                flow.receiver_tick(now)

    def drops(self, start, end):
        return sum(n for b, n in self.dropped.items() if start * 10 <= b < end * 10)

    def longest_queue(self, start, end):
        return max([d for b, d in self.queue_delay.items() if start * 10 <= b < end * 10] or [0.0])


# ---------------------------------------------------------------------------
# Hostile peers
# ---------------------------------------------------------------------------
# A client that completes the real handshake with `serve` and then sends
# whatever frames and datagrams a test likes, and a fake server that
# completes it with a real `get` and answers each request as a test likes.
# The handshakes go through wanxfer's client_handshake/server_handshake
# only, so these keep working whatever the handshake's bytes become.

CLOSE = object()        # in an answer: half-close the connection after what came before


def frame_body(message):
    """A frame body: bytes as they are, anything else as JSON (NaN and
    Infinity included, as a hostile peer would write them)."""
    if isinstance(message, (bytes, bytearray)):
        return bytes(message)
    return json.dumps(message).encode()


class HostileClient:
    """A session with a real `serve`: the handshake by wanxfer's own
    client_handshake, the UDP flow opened, then any frames and datagrams."""

    def __init__(self, port, secret=SECRET, ready=True, timeout=10.0):
        self.port = port
        self.sock = socket.create_connection(('127.0.0.1', port), timeout=timeout)
        keys, _rtt = wanxfer.client_handshake(self.sock, secret.encode(), True)
        self.session_id = keys.session_id
        self._out, ctrl_in, self.data_out, self.data_in = keys.sealers('client')
        self._reader = wanxfer.ControlChannel(self.sock, None, ctrl_in)     # reads anything
        self._frames = 0
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.connect(('127.0.0.1', port))
        self._seq = 0
        if ready:
            self.wait_ready()

    def send(self, *messages):
        """Send `messages` in one write: the server may read them all at once."""
        frames = []
        for message in messages:
            frames.append(wanxfer.seal_frame(self._out, self._frames, frame_body(message)))
            self._frames += 1
        self.sock.sendall(b''.join(frames))

    def datagram(self, kind, body=b'', seq=None):
        seq = self._seq if seq is None else seq
        self._seq = max(self._seq, seq) + 1
        try:
            self.udp.send(wanxfer.seal_datagram(self.data_out, kind, self.session_id, seq, body))
        except OSError:
            pass

    def wait_ready(self, timeout=10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.datagram(wanxfer.KIND_HELLO)
            message = self.recv(0.1)
            if message is not None:
                assert message['op'] == 'ready', message
                return message
        raise AssertionError('serve never said ready')

    def recv(self, timeout):
        """The next message, None if none came within `timeout`; raises
        EOFError when the server hung up."""
        self.sock.settimeout(timeout)
        try:
            return self._reader.recv()
        except socket.timeout:
            return None
        except wanxfer.ProtocolError:
            raise EOFError
        except OSError:
            raise EOFError

    def messages_until_closed(self, timeout=10.0):
        """Every message until the server hangs up; AssertionError if it
        does not within `timeout`."""
        deadline = time.monotonic() + timeout
        got = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError('the server kept the session open; it sent %r' % got[-3:])
            try:
                message = self.recv(min(left, 0.5))
            except EOFError:
                return got
            if message is not None:
                got.append(message)

    def close(self):
        for sock in (self.sock, self.udp):
            try:
                sock.close()
            except OSError:
                pass


class FakeServer:
    """A `serve` impostor on 127.0.0.1: each connection gets wanxfer's own
    server_handshake, a `ready`, then `answer(message)` for each request,
    a list of messages to send back (dicts, raw bodies, or CLOSE).  It
    reads until the client hangs up.  With ready=False the `ready` is left
    to answer(); with `idle_close`, a client that asks nothing for that
    many seconds is hung up on (half-closed).  A `workers` request is
    answered as a server from before it answers (`error`), and is not
    among the `requests`."""

    def __init__(self, answer, secret=SECRET, ready=True, idle_close=None):
        self.answer = answer
        self.ready = ready
        self.idle_close = idle_close
        self.secret = secret.encode()
        self.requests = []
        self.errors = []
        self.listener = socket.socket()
        self.listener.bind(('127.0.0.1', 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self._threads = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _address = self.listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn):
        conn.settimeout(20)
        frames = [0]
        try:
            keys, _rtt = wanxfer.server_handshake(conn, self.secret, True)
            out, ctrl_in, _data_out, _data_in = keys.sealers('server')
            reader = wanxfer.ControlChannel(conn, None, ctrl_in)

            def send(message):
                conn.sendall(wanxfer.seal_frame(out, frames[0], frame_body(message)))
                frames[0] += 1
            if self.ready:
                send({'op': 'ready', 'probes': [], 'server': 'fake'})
            said_ready, unknown = self.ready, []
            closed = False
            while True:
                conn.settimeout(20 if closed or self.idle_close is None else self.idle_close)
                try:
                    message = reader.recv()
                except socket.timeout:
                    conn.shutdown(socket.SHUT_WR)
                    closed = True
                    continue
                except wanxfer.ProtocolError:
                    return
                if message.get('op') == 'workers' and not closed:
                    # A `get` asks for workers first: answered as by a server from
                    # before them (after its `ready`), the test's script follows.
                    unknown.append({'op': 'error', 'message': "unknown request 'workers'"})
                    if said_ready:
                        send(unknown.pop())
                    continue
                self.requests.append(message)
                if closed:
                    continue
                for reply in self.answer(message):
                    if reply is CLOSE:
                        conn.shutdown(socket.SHUT_WR)
                        closed = True
                        break
                    send(reply)
                    if isinstance(reply, dict) and reply.get('op') == 'ready':
                        said_ready = True
                        while unknown:
                            send(unknown.pop())
        except (OSError, wanxfer.WanxferError) as e:
            self.errors.append(e)
        finally:
            conn.close()

    def close(self):
        self.listener.close()
        for thread in self._threads:
            thread.join(10)


# A small parent for the measured `get`: a child's peak RSS counts the
# memory of whatever forked it, until its exec, and a pytest process that
# has run other tests is large.  This parent is small; it reports the
# peak of its child on its own stdout's last line.
MEASURING_PARENT = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable] + sys.argv[1:])
_pid, status, usage = os.wait4(pid, 0)
code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
sys.stdout.write('\\npeak-rss-kib %d\\n' % usage.ru_maxrss)
sys.exit(code)
"""


def run_get_measured(port, args, cwd, timeout=60):
    """Run `get` against 127.0.0.1:port; (exit status, stdout, stderr,
    peak RSS in KiB of that process alone)."""
    command = [sys.executable, '-c', MEASURING_PARENT, WANXFER, 'get', '127.0.0.1:%d' % port]
    proc = subprocess.Popen(command + list(args), env=wanxfer_env(), cwd=str(cwd),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)         # the parent and the get it started
        proc.communicate()
        raise
    out, _, peak = out.decode('utf-8', 'replace').rpartition('\npeak-rss-kib ')
    return proc.returncode, out, err.decode('utf-8', 'replace'), int(peak)


def zlib_bomb(size, wbits=15):
    """A zlib stream of `size` zero bytes (about a thousandth as large);
    with wbits -15, a raw deflate stream (the tunnel's BLOB_DEFLATE)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, wbits)
    piece = bytes(1 << 20)
    parts = []
    left = size
    while left:
        n = min(left, len(piece))
        parts.append(packer.compress(piece[:n]))
        left -= n
    parts.append(packer.flush())
    return b''.join(parts)


def b64(data):
    return base64.b64encode(data).decode('ascii')


def sha(data):
    return hashlib.sha256(data).hexdigest()


def small_file_answers(files, mtime_ns=1700000000 * 10 ** 9, name='d'):
    """An answer() for a directory REMOTE of small files {path: bytes}:
    the open fetch gets its listing, each `read` its contents."""
    listing = {'op': 'listing', 'kind': 'dir', 'name': name, 'dirs': [],
               'files': [{'path': path, 'size': len(data), 'mtime_ns': mtime_ns, 'mode': 0o644}
                         for path, data in files.items()]}

    def answer(message):
        if message['op'] in ('fetch', 'list'):
            return [listing]
        if message['op'] == 'read':
            found = [(item['path'], files.get(item['path'].split('/', 1)[-1], b''))
                     for item in message['files']]
            return [{'op': 'content', 'path': path, 'encoding': 'raw', 'sha256': sha(data),
                     'data': b64(data)} for path, data in found]
        return [{'op': 'error', 'message': 'not here'}]
    return answer, listing
