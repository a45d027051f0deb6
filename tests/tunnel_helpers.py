"""Helpers for the tunnel tests: real `wanxfer.py tunnel` processes, real TCP
servers and a counting relay, all on 127.0.0.1 with ports chosen by the
kernel.  Nothing here sleeps to synchronise: everything waits on a
condition with a deadline."""

import hashlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
WANXFER = os.path.join(os.path.dirname(HERE), 'wanxfer.py')
SECRET = 'tunnel-test-secret'


class Process:
    """A wanxfer subprocess whose stderr lines are collected as they come."""

    def __init__(self, args, secret=SECRET, env=None):
        environment = dict(os.environ, WANXFER_SECRET=secret, PYTHONUNBUFFERED='1')
        environment.update(env or {})
        self.args = args
        self.proc = subprocess.Popen([sys.executable, WANXFER] + args, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment)
        self.lines = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for raw in self.proc.stderr:
            with self._changed:
                self.lines.append(raw.decode('utf-8', 'replace').rstrip('\n'))
                self._changed.notify_all()
        with self._changed:
            self.lines.append(None)             # end of output
            self._changed.notify_all()

    def wait_for(self, pattern, timeout=10.0, count=1):
        """The count-th match of `pattern` in stderr, waiting up to `timeout`."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                matches = [m for m in (regex.search(line) for line in self.lines if line is not None) if m]
                if len(matches) >= count:
                    return matches[count - 1]
                left = deadline - time.monotonic()
                if left <= 0 or (self.lines and self.lines[-1] is None):
                    raise AssertionError('no %r in stderr of %s:\n%s' % (
                        pattern, ' '.join(self.args), self.text()))
                self._changed.wait(left)

    def text(self):
        with self._changed:
            return '\n'.join(line for line in self.lines if line is not None)

    def stop(self, timeout=10.0):
        """SIGTERM and wait: the tunnel saves its figures on the way out."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            status = self.proc.wait()
        self._reader.join(5)
        self.proc.stdout.close()
        self.proc.stderr.close()
        return status

    def rss_kib(self):
        with open('/proc/%d/status' % self.proc.pid) as f:
            for line in f:
                if line.startswith('VmRSS:'):
                    return int(line.split()[1])
        return 0


def start_far(cache, allow, secret=SECRET, extra=()):
    args = ['tunnel', '--listen', '127.0.0.1:0', '--cache', str(cache)]
    for target in allow:
        args += ['--allow', '127.0.0.1:%d' % target if isinstance(target, int) else target]
    far = Process(args + list(extra), secret=secret)
    far.port = int(far.wait_for(r'listening on 127\.0\.0\.1:(\d+) for peers').group(1))
    return far


def start_near(cache, peer_port, targets, secret=SECRET, extra=(), wait_link=True):
    args = ['tunnel', '--peer', '127.0.0.1:%d' % peer_port, '--cache', str(cache)]
    for target in targets:
        args += ['-L', '0:127.0.0.1:%d' % target if isinstance(target, int) else target]
    near = Process(args + list(extra), secret=secret)
    near.ports = [int(near.wait_for(r'listening on 127\.0\.0\.1:(\d+), forwarding', count=i + 1).group(1))
                  for i in range(len(targets))]
    near.port = near.ports[0]
    if wait_link:
        near.wait_for(r'peer link up')
    return near


def stats(cache):
    out = subprocess.run([sys.executable, WANXFER, 'stats', '--json', '--cache', str(cache)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    if out.returncode:
        raise AssertionError('stats failed: %s' % out.stderr.decode())
    return json.loads(out.stdout.decode())


def run_wanxfer(args, secret=SECRET, timeout=30):
    env = dict(os.environ, WANXFER_SECRET=secret) if secret else \
        {k: v for k, v in os.environ.items() if k != 'WANXFER_SECRET'}
    return subprocess.run([sys.executable, WANXFER] + args, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env=env, timeout=timeout)


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
