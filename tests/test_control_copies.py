"""Small control frames also travel as datagrams (FLAG_MIRROR, KIND_CONTROL):
a `start` whose TCP segment was lost must not hold the file up for TCP's
retransmission, and each message is still read once, in order."""

import os
import selectors
import socket
import subprocess
import sys
import threading
import types

import pytest

import wanxfer
from helpers import get_command, json_summaries, make_file, patched_serve, run_get, sha256, wanxfer_env


def channel_pair():
    """Two ControlChannels joined by a socketpair: (server's, client's),
    the server's copies of its frames collected in a list."""
    keys = wanxfer.SessionKeys(b'k' * 32, b'c' * 32, b's' * 32, True)
    left, right = socket.socketpair()
    server_out, server_in, _, _ = keys.sealers('server')
    client_out, client_in, _, _ = keys.sealers('client')
    server = wanxfer.ControlChannel(left, server_out, server_in, peer='client')
    client = wanxfer.ControlChannel(right, client_out, client_in, peer='server')
    copies = []
    server.mirror = lambda index, frame: copies.append((index, frame))
    return server, client, copies


def test_each_message_is_read_once_in_order_from_whichever_way_it_came_first():
    server, client, copies = channel_pair()
    client.sock.settimeout(5)
    for n in range(3):
        server.send({'op': 'checksum', 'file': n, 'sha256': '%064x' % n})
    assert [index for index, _frame in copies] == [0, 1, 2]
    # The copy of the second came first: it waits for the first.
    assert not client.offer(*copies[1])
    assert client.offer(*copies[0])
    assert [m['file'] for m in client.messages()] == [0, 1]
    # The third comes by TCP only; the first two, there too, are passed over.
    assert client.recv()['file'] == 2
    # A copy of a frame read already is not read again, nor is anything else.
    assert not client.offer(*copies[0])
    assert list(client.messages()) == []


def test_a_forged_or_far_ahead_copy_is_dropped():
    server, client, copies = channel_pair()
    server.send({'op': 'fork'})
    index, frame = copies[0]
    forged = bytearray(frame)
    forged[-1] ^= 1
    assert not client.offer(index, bytes(forged))
    assert not client.offer(index + 1, frame)           # another frame's nonce: fails its tag
    assert not client.offer(index, frame[:-1])          # cut short
    for n in range(wanxfer.MIRRORED_AHEAD + 1):
        server.send({'op': 'fork'})
    far_index, far_frame = copies[-1]
    assert far_index == wanxfer.MIRRORED_AHEAD + 1
    client.offer(far_index, far_frame)
    client.offer(*copies[0])
    assert len(list(client.messages())) == 1            # the far one was not kept


def test_a_copy_offered_by_another_thread_wakes_a_waiting_recv(monkeypatch):
    """A server's listener thread passes on the copies that came before the
    session's own UDP socket was open: one offered while the session waits
    in recv() is read there, not after the socket's timeout."""
    server, client, copies = channel_pair()
    tcp, server.sock = server.sock, types.SimpleNamespace(sendall=lambda data: None)  # TCP loses it
    server.send({'op': 'fork'})
    waiting = threading.Event()

    class Announcing(selectors.DefaultSelector):
        def select(self, timeout=None):
            waiting.set()
            return super().select(timeout)

    monkeypatch.setattr(selectors, 'DefaultSelector', Announcing)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(('127.0.0.1', 0))
    client.datagrams = (udp, lambda: True)
    client.sock.settimeout(30)
    received = []
    reader = threading.Thread(target=lambda: received.append(client.recv()), daemon=True)
    reader.start()
    assert waiting.wait(10)
    assert client.offer(*copies[0])
    reader.join(10)
    for sock in (udp, tcp, client.sock):
        sock.close()
    assert received == [{'op': 'fork'}]


def test_a_large_frame_is_not_copied():
    server, _client, copies = channel_pair()
    server.send({'op': 'error', 'message': 'x' * wanxfer.MIRRORED_FRAME})
    server.send({'op': 'fork'})
    assert [index for index, _frame in copies] == [1]


# A control socket that holds back everything from a frame on, as if TCP
# had lost the segment that carried it.
HELD_SOCKET = """
class Held:
    def __init__(self, sock):
        self._sock, self.held, self.holding = sock, bytearray(), False
    def __getattr__(self, name):
        return getattr(self._sock, name)
    def sendall(self, data):
        if self.holding:
            self.held += data
            return None
        return self._sock.sendall(data)
    def send(self, data, *flags):
        if self.holding:
            self.held += data
            return len(data)
        return self._sock.send(data, *flags)
    def release(self):
        self.holding = False
        self._sock.sendall(bytes(self.held))
"""

# The server's, from `start` on until the client next says something (its
# `done`).
HOLD_FROM_START = HELD_SOCKET + """
seal = wanxfer.ControlChannel._seal
def held_seal(self, message):
    frame = seal(self, message)
    if message['op'] == 'start':
        if not isinstance(self.sock, Held):
            self.sock = Held(self.sock)
        self.sock.holding = True
        sys.stderr.write('holding back start\\n')
    return frame
feed = wanxfer.ControlChannel.feed
def released_feed(self, data):
    if isinstance(self.sock, Held) and self.sock.holding:
        self.sock.release()
    feed(self, data)
wanxfer.ControlChannel._seal = held_seal
wanxfer.ControlChannel.feed = released_feed
"""


@pytest.mark.parametrize('workers', [1, 2])
def test_a_start_that_tcp_holds_back_comes_as_a_datagram(tmp_path, serve, workers):
    source = make_file(tmp_path / 'f.bin', (8 << 20) + 3, seed=31)
    server = patched_serve(serve, [source], HOLD_FROM_START, extra=['--workers', str(workers)])
    dest = tmp_path / 'out.bin'
    got = run_get(server.port, 'f.bin', '-o', dest, '--json', '--no-delta', '--timeout', '8',
                  '--workers', str(workers))
    assert got.returncode == 0, got.stderr
    assert sha256(dest) == sha256(source)
    (summary,) = json_summaries(got)
    assert summary['packets_rejected'] == 0, summary
    assert 'holding back start' in server.log()
    assert 'Traceback' not in server.log() + got.stderr


# The client's, from its first `need` on, for good: the server has only
# the copies of the client's `need` messages and of its `done`.
HOLD_FROM_NEED = HELD_SOCKET + """
seal = wanxfer.ControlChannel._seal
def held_seal(self, message):
    frame = seal(self, message)
    if message['op'] == 'need' and self.mirror is not None:
        if not isinstance(self.sock, Held):
            self.sock = Held(self.sock)
        self.sock.holding = True
        sys.stderr.write('holding back need\\n')
    return frame
wanxfer.ControlChannel._seal = held_seal
"""


def test_a_need_that_tcp_holds_back_comes_as_a_datagram(tmp_path, serve):
    """A delta (the default, a fresh cache) sends its first blocks unasked
    and then only those `need` names: with the client's TCP held from its
    first `need` on, the copies alone carry the transfer to its end."""
    source = make_file(tmp_path / 'f.bin', (16 << 20) + 7, seed=32)
    server = serve([source])
    dest = tmp_path / 'out.bin'
    program = 'import sys\nsys.path.insert(0, %r)\nimport wanxfer\n%s\nsys.exit(wanxfer.main(sys.argv[1:]))' \
        % (os.path.dirname(wanxfer.__file__), HOLD_FROM_NEED)
    got = subprocess.run([sys.executable, '-c', program] + get_command(
        server.port, 'f.bin', '-o', dest, '--json', '--timeout', '8', '--workers', '1',
        '--cache', tmp_path / 'cache.db')[2:], env=wanxfer_env(), capture_output=True, text=True,
        timeout=90)
    assert got.returncode == 0, got.stderr
    assert 'holding back need' in got.stderr
    assert sha256(dest) == sha256(source)
    (summary,) = json_summaries(got)
    assert summary['delta'] != 'off', summary
    assert 'Traceback' not in server.log() + got.stderr


# The client's, from its first request (the open fetch, sent right after
# the proof) on, for good: its copy comes before the server has set up
# the session, and is kept for it.
HOLD_FROM_FETCH = HOLD_FROM_NEED.replace("message['op'] == 'need'", "message['op'] == 'fetch'") \
    .replace('holding back need', 'holding back fetch')


@pytest.mark.parametrize('workers', [1, 2])
def test_a_first_request_that_tcp_holds_back_comes_as_a_datagram(tmp_path, serve, workers):
    source = make_file(tmp_path / 'f.bin', (8 << 20) + 9, seed=33)
    server = serve([source], extra=['--workers', str(workers)])
    dest = tmp_path / 'out.bin'
    program = 'import sys\nsys.path.insert(0, %r)\nimport wanxfer\n%s\nsys.exit(wanxfer.main(sys.argv[1:]))' \
        % (os.path.dirname(wanxfer.__file__), HOLD_FROM_FETCH)
    got = subprocess.run([sys.executable, '-c', program] + get_command(
        server.port, 'f.bin', '-o', dest, '--json', '--timeout', '8', '--workers', str(workers),
        '--cache', tmp_path / 'cache.db')[2:], env=wanxfer_env(), capture_output=True, text=True,
        timeout=90)
    assert got.returncode == 0, got.stderr
    assert 'holding back fetch' in got.stderr
    assert sha256(dest) == sha256(source)
    assert 'Traceback' not in server.log() + got.stderr
