"""A hostile peer for each end, built from wanxfer's own functions: a
client that completes the real handshake with `serve` and then sends
whatever frames and datagrams a test likes, and a fake server that
completes it with a real `get` and answers each request as a test likes.
The handshakes go through wanxfer's client_handshake/server_handshake only,
so these keep working whatever the handshake's bytes become."""

import base64
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib

from conftest import SECRET, WANXFER, wanxfer, wanxfer_env

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

    def send(self, message):
        self.sock.sendall(wanxfer.seal_frame(self._out, self._frames, frame_body(message)))
        self._frames += 1

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
    many seconds is hung up on (half-closed)."""

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
                self.requests.append(message)
                if closed:
                    continue
                for reply in self.answer(message):
                    if reply is CLOSE:
                        conn.shutdown(socket.SHUT_WR)
                        closed = True
                        break
                    send(reply)
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


def zlib_bomb(size):
    """A zlib stream of `size` zero bytes (about a thousandth as large)."""
    packer = zlib.compressobj(9)
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
