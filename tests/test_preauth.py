"""Connections that never authenticate must not lock anyone out of `serve`
or `tunnel --listen`: the whole handshake has one deadline, unauthenticated
connections are capped (the oldest goes, not the newcomer), accept() failures
do not spin, and a thread that cannot start costs one connection, not the
server."""

import errno
import os
import select
import socket
import subprocess
import sys
import threading
import time

import pytest

from helpers import (SECRET, WANXFER, InProcessFarTunnel, InProcessServer, echo_handler, make_file,
                     round_trip, run_get, sha256, wait_for, wanxfer)
from helpers import Server as TcpServer         # not to be taken for wanxfer.Server

pytestmark = pytest.mark.e2e          # every test here starts processes or sockets

# Attackers come from several loopback addresses, some from the legitimate
# client's own (127.0.0.1), so both the overall and the per-source cap bind.
SOURCES = ['127.0.0.%d' % n for n in range(1, 10)]


class Trickle:
    """`count` connections held open against 127.0.0.1:port: every other one
    sends a byte of something HELLO-like each `interval` (never the whole
    HELLO), the rest send nothing.  Those the server closes are counted and
    reopened, `reopen` per round, so the server's slots stay full."""

    def __init__(self, port, count, interval=0.2, reopen=5, sources=SOURCES):
        self.port = port
        self.count = count
        self.interval = interval
        self.reopen = reopen
        self.sources = sources
        self.opened = threading.Event()
        self.closed_by_server = 0
        self._stop = threading.Event()
        self._next = 0
        self._conns = []
        hello = wanxfer.PROTOCOL_MAGIC + bytes(wanxfer.HELLO.size)
        self._bytes = hello[:wanxfer.HELLO.size - 1]
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        if not self.opened.wait(60):
            pytest.fail('could not open %d connections' % self.count)
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join(10)
        for conn in self._conns:
            conn[0].close()

    def _connect(self):
        index = self._next
        self._next += 1
        sock = socket.socket()
        try:
            sock.bind((self.sources[index % len(self.sources)], 0))
            sock.settimeout(3.0)
            sock.connect(('127.0.0.1', self.port))
            sock.setblocking(False)
        except OSError:
            sock.close()
            return
        self._conns.append([sock, 0, index % 2 == 0])

    @staticmethod
    def _alive(sock):
        try:
            return sock.recv(1, socket.MSG_PEEK) != b''
        except BlockingIOError:
            return True
        except OSError:
            return False

    def _run(self):
        for _ in range(self.count):
            self._connect()
        self.opened.set()
        while not self._stop.wait(self.interval):       # the attacker's pace, not synchronisation
            live = []
            for conn in self._conns:
                sock, sent, talks = conn
                if talks and self._alive(sock) and sent < len(self._bytes):
                    try:
                        sock.send(self._bytes[sent:sent + 1])
                        conn[1] += 1
                    except OSError:
                        pass
                if self._alive(sock):
                    live.append(conn)
                else:
                    self.closed_by_server += 1
                    sock.close()
            self._conns = live
            for _ in range(min(self.reopen, self.count - len(live))):
                self._connect()


def proc_figures(pid):
    """(threads, open descriptors, CPU seconds) of a process, from /proc."""
    with open('/proc/%d/status' % pid) as f:
        threads = next(int(line.split()[1]) for line in f if line.startswith('Threads:'))
    with open('/proc/%d/stat' % pid) as f:
        fields = f.read().rsplit(')', 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')
    return threads, len(os.listdir('/proc/%d/fd' % pid)), cpu


class TricklingSocket:
    """A socket for wanxfer's own client_handshake() that sends the bytes of
    its `slow`-th sendall (0: HELLO, 1: CLIENT_PROOF) one at a time, one per
    `interval`, and raises ConnectionError once the server hangs up."""

    def __init__(self, sock, slow, interval=0.1):
        self.sock = sock
        self.slow = slow
        self.interval = interval
        self.calls = 0
        self.closed_after = None
        self.started = time.monotonic()

    def sendall(self, data):
        self.calls += 1
        if self.calls - 1 != self.slow:
            return self.sock.sendall(data)
        for i in range(len(data)):
            try:
                self.sock.send(data[i:i + 1])
            except OSError:
                break
            # Waits for the server to hang up, at most `interval`: nothing
            # else can arrive while our message is incomplete.
            readable, _, _ = select.select([self.sock], [], [], self.interval)
            if readable and not self._answered():
                break
        else:
            return
        self.closed_after = time.monotonic() - self.started
        raise ConnectionError('the server hung up %.2f s after connect' % self.closed_after)

    def _answered(self):
        try:
            return self.sock.recv(1, socket.MSG_PEEK) != b''
        except OSError:
            return False

    def recv(self, n):
        return self.sock.recv(n)

    def __getattr__(self, name):
        return getattr(self.sock, name)


def test_get_succeeds_while_200_trickling_connections_are_held(tmp_path, serve):
    data = make_file(tmp_path / 'f', 300_000)
    server = serve([data])
    with Trickle(server.port, 200) as attack:
        threads, fds, _cpu = proc_figures(server.proc.pid)
        done = run_get(server.port, 'f', '-o', tmp_path / 'out', timeout=30)
        assert done.returncode == 0, done.stderr
        assert sha256(tmp_path / 'out') == sha256(data)
        # Old code: a thread and a descriptor per connection, 200+ of each.
        assert threads < 20 and fds < 100, (threads, fds)
        wait_for(lambda: attack.closed_by_server >= 100, timeout=10,
                 what='serve to close the connections over its caps')
    assert 'pushed out by newer connections' in server.log()


def test_peer_link_comes_up_while_200_trickling_connections_are_held(tmp_path, tunnel_pair):
    echo = TcpServer(echo_handler)
    far = tunnel_pair.far(tmp_path / 'far.db', [echo.port])
    near = None
    try:
        with Trickle(far.port, 200):
            near = tunnel_pair.near(tmp_path / 'near.db', far.port, [echo.port], wait_connected=False)
            near.wait_for(r'peer connection up', timeout=10)      # old code: dropped, retrying for ever
            assert round_trip(near.port, b'through the tunnel\n' * 1000, timeout=10) == \
                b'through the tunnel\n' * 1000
    finally:
        if near is not None:
            near.stop()
        far.stop()
        echo.close()


@pytest.mark.parametrize('slow', [0, 1], ids=['hello', 'proof'])
@pytest.mark.parametrize('side', ['serve', 'tunnel'])
def test_a_trickling_connection_is_closed_at_the_handshake_deadline(tmp_path, monkeypatch, side, slow):
    monkeypatch.setattr(wanxfer, 'HANDSHAKE_DEADLINE', 0.5, raising=False)
    data = make_file(tmp_path / 'f', 1000)
    target = InProcessServer([data]) if side == 'serve' else InProcessFarTunnel(tmp_path, [9])
    secret = SECRET.encode()
    try:
        sock = socket.create_connection(('127.0.0.1', target.port), timeout=10)
        trickling = TricklingSocket(sock, slow)
        try:
            # A byte every 0.1 s: each recv's own timeout would never fire.
            with pytest.raises((ConnectionError, wanxfer.ProtocolError)):
                wanxfer.client_handshake(trickling, secret, True)
        finally:
            sock.close()
        assert trickling.closed_after is not None, 'the server hung up before the slow part'
        assert trickling.closed_after < 3.0
        wait_for(lambda: 'no complete handshake within 0.5 s' in target.log(), timeout=5,
                 what='the drop in the log')
    finally:
        target.stop()


class SplitHello:
    """A socket for wanxfer's own client_handshake() that sends the first
    `split` bytes of its HELLO, calls `meanwhile()`, then sends the rest."""

    def __init__(self, sock, split, meanwhile):
        self.sock = sock
        self.split = split
        self.meanwhile = meanwhile
        self.calls = 0

    def sendall(self, data):
        self.calls += 1
        if self.calls > 1:
            return self.sock.sendall(data)
        self.sock.sendall(data[:self.split])
        self.meanwhile()
        return self.sock.sendall(data[self.split:])

    def recv(self, n):
        return self.sock.recv(n)

    def __getattr__(self, name):
        return getattr(self.sock, name)


def test_connections_from_one_source_push_out_only_that_sources_own(tmp_path, monkeypatch):
    # One address opening connection after connection fills its own share
    # of the gate, not everyone's: a client at another address that is
    # still sending its HELLO stays, though it is the oldest pending.
    monkeypatch.setattr(wanxfer, 'MAX_UNAUTHENTICATED', 16)
    attempts = 40
    data = make_file(tmp_path / 'f', 1000)
    server = InProcessServer([data])
    attackers = []

    def pushed():
        return [line for line in server.lines if 'pushed out' in line]

    def attack():
        for _ in range(attempts):
            sock = socket.socket()
            attackers.append(sock)
            sock.bind(('127.0.0.2', 0))
            sock.connect(('127.0.0.1', server.port))
        # Pushed out by the per-source cap: attempts - 8.  By the overall
        # cap alone: attempts + 1 - 16, the client first.
        wait_for(lambda: len(pushed()) >= attempts + 1 - 16, timeout=10,
                 what='serve to push out connections over its caps')
    try:
        sock = socket.create_connection(('127.0.0.1', server.port), timeout=10)
        port = sock.getsockname()[1]
        try:
            wanxfer.client_handshake(SplitHello(sock, 10, attack), SECRET.encode(), True)
        except (OSError, wanxfer.WanxferError) as e:
            pytest.fail('the client was dropped (%s): %s'
                        % (e, [line for line in server.lines if '127.0.0.1:%d: ' % port in line]))
        finally:
            sock.close()
        assert all(line.startswith('127.0.0.2:') for line in pushed()), pushed()
        assert len(pushed()) <= attempts - wanxfer.MAX_UNAUTHENTICATED_PER_SOURCE
        assert not [line for line in server.lines if '127.0.0.1:%d: ' % port in line]
    finally:
        for sock in attackers:
            sock.close()
        server.stop()


def test_serve_out_of_descriptors_neither_spins_nor_locks_out(tmp_path, serve):
    data = make_file(tmp_path / 'f', 300_000)
    limited = ('sh', '-c', 'ulimit -n 64 && exec "$0" "$@"', sys.executable, WANXFER)
    server = serve([data], program=limited)
    with open('/proc/%d/limits' % server.proc.pid) as f:
        assert any(line.startswith('Max open files') and line.split()[3] == '64' for line in f)
    with Trickle(server.port, 70):
        # Old code: accept() fails with EMFILE and the loop retries at once,
        # a core's worth.  Watch the CPU time over a window.
        _threads, _fds, cpu_before = proc_figures(server.proc.pid)
        started = time.monotonic()
        wait_for(lambda: time.monotonic() - started >= 1.5, timeout=5, what='the window')
        _threads, _fds, cpu_after = proc_figures(server.proc.pid)
        busy = (cpu_after - cpu_before) / (time.monotonic() - started)
        assert busy < 0.2, 'serve used %.0f%% of a core' % (100 * busy)
        done = run_get(server.port, 'f', '-o', tmp_path / 'out', timeout=30)
        assert done.returncode == 0, done.stderr
        assert sha256(tmp_path / 'out') == sha256(data)
        assert server.proc.poll() is None



def test_near_tunnel_out_of_descriptors_neither_spins_nor_locks_out(tmp_path, tunnel_pair):
    import resource
    echo = TcpServer(echo_handler)
    far = tunnel_pair.far(tmp_path / 'far.db', [echo.port])
    near = tunnel_pair.near(tmp_path / 'near.db', far.port, [echo.port])
    flood = []
    try:
        # As `ulimit -n 64` would have, on the running process: its -L
        # listener is the one to run out.
        resource.prlimit(near.proc.pid, resource.RLIMIT_NOFILE, (64, 64))
        for _ in range(90):
            flood.append(socket.create_connection(('127.0.0.1', near.port), timeout=10))
        # Old code: accept() fails with EMFILE and the loop retries at once.
        _threads, _fds, cpu_before = proc_figures(near.proc.pid)
        started = time.monotonic()
        wait_for(lambda: time.monotonic() - started >= 1.5, timeout=5, what='the window')
        _threads, _fds, cpu_after = proc_figures(near.proc.pid)
        busy = (cpu_after - cpu_before) / (time.monotonic() - started)
        assert busy < 0.2, 'the near tunnel used %.0f%% of a core' % (100 * busy)
        assert near.log().count('accept failed') <= 2, near.log()[-2000:]
        for sock in flood:
            sock.close()
        flood = []

        def forwarded():
            try:
                return round_trip(near.port, b'after the flood\n', timeout=5) == b'after the flood\n'
            except OSError:
                return False
        try:
            wait_for(forwarded, timeout=20, what='a forwarded connection to work again')
        except AssertionError as e:
            raise AssertionError('%s; near: %s; far: %s' % (e, near.log()[-1500:], far.log()[-1500:]))
        assert near.proc.poll() is None
    finally:
        for sock in flood:
            sock.close()
        near.stop()
        far.stop()
        echo.close()


def test_a_thread_ending_out_of_descriptors_does_not_abort_wanxfer(tmp_path):
    # Python 3.8 ends a thread with pthread_exit(), and glibc loads
    # libgcc_s.so.1 for it the first time: out of descriptors, the load
    # failed and glibc aborted the near tunnel in the flood above.  Every
    # command starts through main(); after it, a thread ending at the limit
    # must leave the process alive.
    script = tmp_path / 'exhaust.py'
    script.write_text(
        'import os, resource, sys, threading\n'
        'sys.path.insert(0, %r)\n'
        'import wanxfer\n'
        'try:\n'
        '    wanxfer.main(["--version"])\n'
        'except SystemExit:\n'
        '    pass\n'
        'resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n'
        'held = []\n'
        'try:\n'
        '    while True:\n'
        '        held.append(os.open(os.devnull, os.O_RDONLY))\n'
        'except OSError:\n'
        '    pass\n'
        'thread = threading.Thread(target=lambda: None)\n'
        'thread.start()\n'
        'thread.join()\n'
        'print("alive with %%d descriptors taken" %% len(held))\n' % os.path.dirname(WANXFER))
    done = subprocess.run([sys.executable, str(script)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert 'alive with' in done.stdout, done.stdout


def refuse_one_thread(monkeypatch, name):
    """Thread.start raises, as at a process limit, for the first thread called `name`."""
    real_start = threading.Thread.start
    refused = []

    def start(thread):
        if thread.name == name and not refused:
            refused.append(thread)
            raise RuntimeError("can't start new thread")
        return real_start(thread)
    monkeypatch.setattr(threading.Thread, 'start', start)
    return refused


def test_a_session_thread_that_cannot_start_drops_that_client_not_serve(tmp_path, monkeypatch):
    # As root, RLIMIT_NPROC does not bind; Thread.start fails the same way under it.
    data = make_file(tmp_path / 'f', 300_000)
    server = InProcessServer([data])
    try:
        refused = refuse_one_thread(monkeypatch, 'session')
        with socket.create_connection(('127.0.0.1', server.port), timeout=10) as sock:
            with pytest.raises((wanxfer.WanxferError, OSError)):
                wanxfer.client_handshake(sock, SECRET.encode(), True)
        assert refused
        assert server.thread.is_alive(), 'serve_forever died'
        wait_for(lambda: 'cannot start a thread' in server.log(), timeout=5, what='the drop in the log')
        done = run_get(server.port, 'f', '-o', tmp_path / 'out', timeout=30)
        assert done.returncode == 0, done.stderr
        assert sha256(tmp_path / 'out') == sha256(data)
    finally:
        server.stop()



@pytest.mark.parametrize('helper', ['digest', 'signature', 'refine'])
def test_a_fetch_helper_thread_that_cannot_start_ends_that_session_not_serve(tmp_path, monkeypatch,
                                                                              helper):
    src = tmp_path / 'src'
    src.mkdir()
    out = tmp_path / 'out'
    if helper == 'digest':
        data = make_file(src / 'f', 300_000)           # under delta's minimum: a plain fetch
    else:
        data = make_file(src / 'f', 2 << 20)
    if helper == 'refine':
        # An older copy whose data the server's file has shifted: its fixed
        # spans all miss, and the client asks for finer ones.
        out.write_bytes(data.read_bytes())
        data.write_bytes(b'shifted' + out.read_bytes())
    died = []
    monkeypatch.setattr(threading, 'excepthook', died.append)
    server = InProcessServer([src])
    try:
        refused = refuse_one_thread(monkeypatch, helper)
        done = run_get(server.port, 'f', '-o', out, timeout=30)
        assert refused, 'no %s thread was started' % helper
        assert done.returncode != 0 and 'Traceback' not in done.stderr, done.stderr
        if helper == 'refine':
            # (An open fetch, the others' case, takes an error for "list
            # instead" and then meets the hang-up.)
            assert 'cannot start a refine thread' in done.stderr, done.stderr
        wait_for(lambda: 'cannot start' in server.log(), timeout=5, what='the drop in the log')
        (line,) = [line for line in server.lines if 'cannot start' in line]
        assert 'dropped' in line and '\n' not in line and 'Traceback' not in server.log()
        assert not died, [hook.exc_value for hook in died]
        done = run_get(server.port, 'f', '-o', out, timeout=30)
        assert done.returncode == 0, done.stderr
        assert sha256(out) == sha256(data)
        assert not died, [hook.exc_value for hook in died]
    finally:
        server.stop()

def test_a_tunnel_helper_thread_that_cannot_start_drops_that_peer_not_the_tunnel(tmp_path, monkeypatch,
                                                                                tunnel_pair):
    echo = TcpServer(echo_handler)
    far = InProcessFarTunnel(tmp_path, [echo.port])
    near = None
    try:
        refused = refuse_one_thread(monkeypatch, 'tunnel-helper')
        near = tunnel_pair.near(tmp_path / 'near.db', far.port, [echo.port], wait_connected=False)
        near.wait_for(r'peer connection up', timeout=15)     # its second try
        assert refused and far.thread.is_alive()
        assert 'cannot start a thread' in far.log()
        assert round_trip(near.port, b'hello\n', timeout=10) == b'hello\n'
    finally:
        if near is not None:
            near.stop()
        far.stop()
        echo.close()



def test_a_peer_writer_thread_that_cannot_start_drops_that_peer_not_the_tunnel(tmp_path, monkeypatch,
                                                                              tunnel_pair):
    echo = TcpServer(echo_handler)
    died = []
    monkeypatch.setattr(threading, 'excepthook', died.append)
    far = InProcessFarTunnel(tmp_path, [echo.port])
    near = None
    try:
        refused = refuse_one_thread(monkeypatch, 'peer-writer')
        near = tunnel_pair.near(tmp_path / 'near.db', far.port, [echo.port], wait_connected=False)
        # The near side may call its first, doomed connection up before the
        # far side drops it: wait for the refusal, then for a stream to pass.
        wait_for(lambda: refused, timeout=15, what='the far side to refuse the thread')
        assert round_trip(near.port, b'hello\n', timeout=20) == b'hello\n'
        assert far.thread.is_alive() and not died, [hook.exc_value for hook in died]
        (line,) = [line for line in far.lines if 'cannot start' in line]
        assert 'dropped' in line and 'peer-writer' in line
    finally:
        if near is not None:
            near.stop()
        far.stop()
        echo.close()


def test_far_tunnel_connects_to_targets_on_a_bounded_number_of_threads(tmp_path, monkeypatch, tunnel_pair):
    # Anyone who reaches the near side's -L port makes the far side connect:
    # with the target silent, each connection held a thread for up to
    # CONNECT_TIMEOUT, as many as there were connections.
    monkeypatch.setattr(wanxfer, 'MAX_CONNECTING', 8, raising=False)
    echo = TcpServer(echo_handler)
    far = InProcessFarTunnel(tmp_path, [echo.port])
    near = tunnel_pair.near(tmp_path / 'near.db', far.port, [echo.port])
    silent = threading.Event()
    real_connect = socket.create_connection

    def slow_connect(*args, **kwargs):
        if threading.current_thread().name == 'tunnel-helper':
            silent.wait(30)                     # the target says nothing until the test lets it
        return real_connect(*args, **kwargs)
    monkeypatch.setattr(socket, 'create_connection', slow_connect)
    clients = []
    try:
        for _ in range(30):
            clients.append(real_connect(('127.0.0.1', near.port), timeout=10))
        wait_for(lambda: sum(len(peer.streams) for peer in list(far.tunnel.peers)) == 30,
                 timeout=10, what='the 30 streams on the far side')
        seen = threading.Event()
        far.tunnel.loop.post(seen.set)          # the loop is past the last OPEN
        assert seen.wait(10)
        helpers = [t for t in threading.enumerate() if t.name == 'tunnel-helper']
        assert len(helpers) <= 8, '%d connect threads' % len(helpers)
        silent.set()
        for i, conn in enumerate(clients):
            conn.sendall(b'stream %d\n' % i)
        for i, conn in enumerate(clients):
            expected = b'stream %d\n' % i
            got = b''
            while len(got) < len(expected):
                data = conn.recv(100)
                assert data, 'stream %d closed' % i
                got += data
            assert got == expected
    finally:
        silent.set()
        for conn in clients:
            conn.close()
        near.stop()
        far.stop()
        echo.close()

class ExhaustedListener(socket.socket):
    """A listening socket whose accept() always fails as if out of descriptors."""

    def __init__(self):
        socket.socket.__init__(self)
        self.bind(('127.0.0.1', 0))
        self.listen(8)
        self.accepts = 0

    def accept(self):
        self.accepts += 1
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))


def test_accept_out_of_descriptors_rests_instead_of_spinning():
    loop = wanxfer.EventLoop()
    listener = ExhaustedListener()
    waiting = socket.create_connection(listener.getsockname())     # keeps the listener readable
    lines, rooms = [], []
    acceptor = wanxfer.Acceptor(loop, listener, lambda sock, address: None,
                                lambda: rooms.append(1) and False, lines.append)
    try:
        loop.call_later(0.6, loop.stop)
        loop.run()
        # 10 ms doubling: about 6 tries in 0.6 s (a busy loop makes thousands),
        # each asking for room, then turning the waiting peer away.
        assert 3 <= len(rooms) <= 10, len(rooms)
        assert listener.accepts <= 2 * len(rooms)
        assert len(lines) == 1 and 'Too many open files' in lines[0], lines
    finally:
        acceptor.close()
        loop.close()
        waiting.close()
        listener.close()


# ---------------------------------------------------------------------------
# A lost SYN
# ---------------------------------------------------------------------------
# The kernel sends a lost SYN again after a whole second; at a few percent
# of loss that second would be in every twentieth get.  `get` and the
# tunnel start another connect at CONNECT_RACE's times instead; the losers
# are reset, and `serve` does not log connections that left before a byte.

def listen_overflows():
    """TcpExt ListenOverflows: SYNs dropped for a full accept queue."""
    with open('/proc/net/netstat') as f:
        lines = f.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith('TcpExt:'):
            names, values = names.split(), values.split()
            return int(values[names.index('ListenOverflows')])
    raise LookupError('no TcpExt counters')


def connected_after(port, race):
    """Seconds connect_racing(race=race) takes to reach a listener whose
    accept queue is full when its first SYN comes (so that SYN is
    dropped, as on a lossy path) and has room from just after."""
    listener = socket.socket()
    listener.bind(('127.0.0.1', port))
    listener.listen(0)
    address = listener.getsockname()
    queued = []
    try:
        while True:                     # fill the accept queue
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(address)
            if not select.select([], [sock], [], 0.5)[1]:
                sock.close()            # its SYN was dropped: its own retry must not take the room
                break
            queued.append(sock)
        before = listen_overflows()
        outcome = {}

        def connect():
            started = time.monotonic()
            outcome['sock'] = wanxfer.connect_racing(address[0], address[1], 10, race=race)
            outcome['seconds'] = time.monotonic() - started

        thread = threading.Thread(target=connect)
        thread.start()
        wait_for(lambda: listen_overflows() > before, timeout=5, what='the first SYN to be dropped')
        listener.accept()[0].close()    # room for one
        thread.join(15)
        outcome['sock'].close()
        return outcome['seconds']
    finally:
        for sock in queued:
            sock.close()
        listener.close()


@pytest.mark.skipif(not os.path.exists('/proc/net/netstat'), reason='needs Linux TCP counters')
def test_a_lost_syn_costs_a_fraction_of_a_second_not_the_kernels_whole_second():
    assert connected_after(0, wanxfer.CONNECT_RACE) < 0.9
    # Without the race, the kernel's retry: so the setup did drop the SYN.
    assert connected_after(0, ()) >= 1.0


def test_connect_racing_reports_a_refusal_at_once():
    closed = socket.socket()
    closed.bind(('127.0.0.1', 0))
    port = closed.getsockname()[1]
    closed.close()
    started = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        wanxfer.connect_racing('127.0.0.1', port, 10)
    assert time.monotonic() - started < 0.5     # not after the whole race


@pytest.mark.skipif(not os.path.isdir('/proc/self/fd'), reason='counts descriptors in /proc')
def test_connect_racing_closes_its_socket_when_preparing_it_fails():
    # The tunnel's near side prepares each socket (buffers, BBR); out of
    # descriptors, that fails, and the socket must not stay open.
    listener = socket.socket()
    listener.bind(('127.0.0.1', 0))
    listener.listen(1)

    def prepare(sock):
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
    before = len(os.listdir('/proc/self/fd'))
    with pytest.raises(OSError) as raised:
        wanxfer.connect_racing('127.0.0.1', listener.getsockname()[1], 5, prepare=prepare)
    assert raised.value.errno == errno.EMFILE
    assert len(os.listdir('/proc/self/fd')) == before
    listener.close()


def test_serve_does_not_log_connections_that_leave_before_their_first_byte(tmp_path, serve):
    data = make_file(tmp_path / 'f', 100_000)
    server = serve([data])
    socket.create_connection(('127.0.0.1', server.port)).close()
    wanxfer.reset_socket(socket.create_connection(('127.0.0.1', server.port)))
    done = run_get(server.port, 'f', '-o', tmp_path / 'out', timeout=30)
    assert done.returncode == 0, done.stderr
    talker = socket.create_connection(('127.0.0.1', server.port))
    talker.sendall(wanxfer.PROTOCOL_MAGIC[:2])
    talker.close()
    wait_for(lambda: 'dropped' in server.log(), timeout=10, what='the talker dropped in the log')
    assert [line for line in server.log().splitlines() if 'dropped' in line] == [
        line for line in server.log().splitlines() if 'closed by peer' in line], server.log()
    assert server.log().count('dropped') == 1, server.log()
