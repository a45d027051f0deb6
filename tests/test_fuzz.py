"""Random and mutated input from a hostile peer, at each of wanxfer's three
ends: a real `serve` (before and after a real handshake, on TCP and on
UDP), a real `get` (against a fake server in this process), and a real
`tunnel --listen`.  No traceback anywhere, nothing crashes, and a
legitimate transfer still works afterwards.  Besides random mutations,
each field of each request (to `serve`) and of each answer (to `get`) is
left out, mistyped and made infinite in turn.

Each test prints its seed; WANXFER_FUZZ_SEED=N runs it again with N.  The
budgets are counted in messages and runs, not seconds."""

import os
import random
import socket
import threading
import lzma
import zlib

import pytest

from helpers import (CLOSE, SECRET, FakeServer, HostileClient, Server, b64, echo_handler, make_file,
                     round_trip, run_get, run_get_measured, sha, sha256, wanxfer, zlib_bomb)

pytestmark = pytest.mark.e2e          # every test here starts processes or sockets

DEFAULT_SEED = 20240611

HOSTILE_VALUES = [
    None, True, False, 0, -1, 1, 63, 64, 511, 1 << 31, 1 << 32, (1 << 53) + 1, 1 << 63, 1 << 64,
    -(1 << 63), 10 ** 30, 1e308, 0.5, -0.0, float('nan'), float('inf'), float('-inf'),
    '', 'x', '\x00', '../../../etc/passwd', '/etc/passwd', '\x1b]0;owned\x07\x1b[2J', '\ud800',
    'a' * 5000, [], [[]], [[0, 1]], [[1, 0]], [[0, 1 << 60]], [[-1, 5]], [[0.5, 2]], [0, 1],
    [[0, 1]] * 2000, {}, {'a': 1}, [{'path': 'small', 'size': 'x'}], [{}], [None],
]


def seeded(name):
    seed = int(os.environ.get('WANXFER_FUZZ_SEED', DEFAULT_SEED))
    print('%s: seed %d (WANXFER_FUZZ_SEED=%d to run it again)' % (name, seed, seed))
    return random.Random('%s:%d' % (name, seed))


def deep(rng):
    depth = rng.choice([20, 1000, 100000])
    return b'{"op":"list","path":' + b'[' * depth + b']' * depth + b'}'


def garbage_body(rng):
    """A frame body that is no message at all."""
    return rng.choice([
        lambda: bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 64))),
        lambda: b'{"op":"list","path":',
        lambda: b'\xff\xfe\xfd',
        lambda: b'[]', lambda: b'1', lambda: b'"op"', lambda: b'null', lambda: b'{}',
        lambda: b'{"op":5}', lambda: b'{"op":"' + b'x' * 100 + b'"}',
        lambda: b'{"op":"fetch","block_size":1e999}',
        lambda: b'{"op":"fetch","block_size":' + b'9' * 5000 + b'}',
        lambda: b'{"op":"read","files":[' + b'{"path":"small"},' * 3000 + b'{}]}',
        lambda: deep(rng),
    ])()


def mutate(rng, message):
    """`message` with one thing wrong, or a body that is no message."""
    message = dict(message)
    roll = rng.random()
    if roll < 0.1:
        return garbage_body(rng)
    if roll < 0.2:
        message['op'] = rng.choice(HOSTILE_VALUES + ['nothing', 'do_list', '__init__'])
        return message
    fields = [key for key in message if key != 'op']
    if fields and roll < 0.35:
        del message[rng.choice(fields)]
    elif fields and roll < 0.85:
        message[rng.choice(fields)] = rng.choice(HOSTILE_VALUES)
    else:
        message[rng.choice(['junk', 'path', 'size', 'file'])] = rng.choice(HOSTILE_VALUES)
    return message


def legit_requests(source):
    st = os.stat(str(source))
    fetch = {'op': 'fetch', 'path': 'small', 'size': st.st_size, 'mtime_ns': st.st_mtime_ns,
             'block_size': 1430, 'need': [[0, 1]], 'max_rate': 1e6, 'delta': False, 'compress': False}
    return [
        {'op': 'list', 'path': ''}, {'op': 'list', 'path': 'sub'},
        fetch, dict(fetch, delta=True, need=[], lead=True),
        {'op': 'fetch', 'path': 'small', 'block_size': 1430, 'max_rate': 1e6, 'delta': True,
         'delta_min': 0, 'lead': True, 'compress': True},
        {'op': 'read', 'compress': True, 'files': [{'path': 'small', 'size': st.st_size,
                                                    'mtime_ns': st.st_mtime_ns}]},
        {'op': 'need', 'file': 1, 'ranges': [[0, 1]], 'held': []},
        {'op': 'refine', 'file': 1, 'offset': 0, 'end': 100},
        {'op': 'done', 'file': 1}, {'op': 'abort'}, {'op': 'later', 'what': 1},
    ]


def drain(client, rounds=3):
    """Read what the server answers; False once it hung up."""
    for _ in range(rounds):
        try:
            if client.recv(0.02) is None:
                return True
        except EOFError:
            return False
    return True


def random_datagram(rng):
    return bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 1, 13, 29, 45, 100, 1500])))


def mutated_feedback(rng):
    """A FEEDBACK or NAK body, sealed by the real session keys, saying
    something no receiver says."""
    if rng.random() < 0.5:
        gaps = [(rng.choice([0, 1, 5, 0xFFFFFFFF]), rng.choice([0, 1, 0xFFFFFFFF]))
                for _ in range(rng.choice([0, 1, 3, 121, 500]))]
        body = wanxfer.FEEDBACK_FIELDS.pack(
            rng.choice([0, 1, 2, 0xFFFFFFFF]), rng.choice([0, 1, 1 << 40, (1 << 64) - 1]),
            rng.choice([0, 5, 100, (1 << 64) - 1]), rng.getrandbits(32), rng.getrandbits(32),
            len(gaps) if rng.random() < 0.8 else rng.getrandbits(16)) + \
            b''.join(wanxfer.FEEDBACK_GAP.pack(*gap) for gap in gaps)
        return wanxfer.KIND_FEEDBACK, body
    ranges = [tuple(sorted((rng.choice([0, 1, 100, 1 << 40, (1 << 64) - 1]),
                            rng.choice([0, 2, 5000, (1 << 64) - 1]))))
              for _ in range(rng.choice([0, 1, 64, 65, 300]))]
    body = wanxfer.NAK_FIELDS.pack(rng.choice([0, 1, 2]), len(ranges) if rng.random() < 0.8
                                   else rng.getrandbits(16)) + \
        b''.join(wanxfer.NAK_RANGE.pack(*r) for r in ranges)
    if rng.random() < 0.2:
        body = body[:rng.randrange(len(body) + 1)]
    return wanxfer.KIND_NAK, body


def client_opening():
    """What wanxfer's own client_handshake sends first, whatever the
    handshake's layout is (captured over a socket pair)."""
    ours, theirs = socket.socketpair()
    theirs.settimeout(5)

    def handshake():
        try:
            wanxfer.client_handshake(ours, b'secret', True)
        except Exception:       # it fails once the pair is closed: only its first bytes matter
            pass
    thread = threading.Thread(target=handshake)
    thread.start()
    try:
        opening = theirs.recv(4096)
    finally:
        theirs.close()
        thread.join(10)
        ours.close()
    return opening


def test_serve_survives_random_and_mutated_requests_and_datagrams(tmp_path, serve):
    rng = seeded('serve')
    root = tmp_path / 'root'
    (root / 'sub').mkdir(parents=True)
    source = make_file(root / 'small', 5000, seed=1)
    make_file(root / 'sub' / 'x', 100, seed=2)
    big = make_file(root / 'big', 3 << 20, seed=3)
    server = serve([root])
    requests = legit_requests(source)

    # Before authentication: bytes that are no handshake, and handshakes cut short.
    opening = client_opening()
    for _ in range(30):
        with socket.create_connection(('127.0.0.1', server.port), timeout=5) as sock:
            hello = bytearray(opening)
            if rng.random() < 0.5:
                for _flip in range(rng.randrange(1, 4)):
                    hello[rng.randrange(len(hello))] ^= 1 << rng.randrange(8)
                payload = bytes(hello[:rng.randrange(len(hello) + 1)])
            else:
                payload = random_datagram(rng)
            try:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        for _ in range(300):
            udp.sendto(random_datagram(rng), ('127.0.0.1', server.port))

    # After it: each field of each request left out and mistyped in turn,
    # then random mutations, a few per session, until the server ends each.
    sweep = [mutated for request in requests for mutated in field_mutations(request)]
    randomly = [mutate(rng, rng.choice(requests)) for _ in range(60)]
    client = None
    for message in sweep + randomly:
        if client is None:
            client = HostileClient(server.port)
        client.send(message)
        if not drain(client) or rng.random() < 0.1:
            client.close()
            client = None
    if client is not None:
        client.close()

    # In a data phase: authentic feedback and NAKs that say what no receiver says.
    client = HostileClient(server.port)
    st = os.stat(str(big))
    client.send({'op': 'fetch', 'path': 'big', 'size': st.st_size, 'mtime_ns': st.st_mtime_ns,
                 'block_size': 1430, 'need': [[0, st.st_size // 1430 + 1]], 'max_rate': 2e6})
    assert client.recv(10)['op'] == 'start'
    for _ in range(300):
        if rng.random() < 0.8:
            client.datagram(*mutated_feedback(rng))
        else:
            client.udp.send(random_datagram(rng))
    client.send({'op': 'abort'})
    client.close()

    assert server.proc.poll() is None
    assert 'Traceback' not in server.log(), server.log()
    result = run_get(server.port, 'big', '-o', tmp_path / 'copy')
    assert result.returncode == 0, result.stderr
    assert sha256(tmp_path / 'copy') == sha256(big)
    assert 'Traceback' not in server.log(), server.log()


# --- get, against a fake server -------------------------------------------------------------------

MTIME = 1700000000 * 10 ** 9


def conversations():
    """(REMOTEs, what a server says at once, what it says to `done`): each
    a real `get` completes as it stands."""
    alpha, beta = b'alpha' * 100, b'beta' * 50
    empty = [{'op': 'ready', 'probes': [], 'server': 'fake'},
             {'op': 'start', 'file': 1, 'first_seq': 0, 'lead': 0, 'size': 0, 'mtime_ns': MTIME,
              'mode': 0o644, 'block_size': 1430, 'delta': False}]
    empty_done = [{'op': 'digest', 'file': 1, 'sha256': sha(b''), 'packets_sent': 0,
                   'packets_lost': 0, 'packets_retransmitted': 0, 'wire_bytes': 0,
                   'signature_bytes': 0}]
    tree = [{'op': 'ready', 'probes': [1280, 1500], 'server': 'fake'},
            {'op': 'listing', 'kind': 'dir', 'name': 'd', 'dirs': ['s'],
             'files': [{'path': 'a', 'size': len(alpha), 'mtime_ns': MTIME, 'mode': 0o600},
                       {'path': 's/b', 'size': len(beta), 'mtime_ns': MTIME, 'mode': 0o644}]},
            {'op': 'content', 'path': 'd/a', 'encoding': 'zlib', 'sha256': sha(alpha),
             'data': b64(zlib.compress(alpha))},
            {'op': 'content', 'path': 'd/s/b', 'encoding': 'raw', 'sha256': sha(beta),
             'data': b64(beta)}]
    listed = [{'op': 'ready'},
              {'op': 'listing', 'kind': 'file', 'name': 'a', 'dirs': [],
               'files': [{'path': '', 'size': len(alpha), 'mtime_ns': MTIME, 'mode': 0o644}]},
              {'op': 'listing', 'kind': 'file', 'name': 'b', 'dirs': [],
               'files': [{'path': '', 'size': len(beta), 'mtime_ns': MTIME, 'mode': 0o644}]},
              {'op': 'content', 'path': 'a', 'encoding': 'raw', 'sha256': sha(alpha), 'data': b64(alpha)},
              {'op': 'content', 'path': 'b', 'encoding': 'raw', 'sha256': sha(beta), 'data': b64(beta)}]
    size = 2 << 20
    spans = wanxfer.encode_spans([(wanxfer.DELTA_UNIT, wanxfer.ZERO_SPAN)] * (size // wanxfer.DELTA_UNIT))
    delta = [{'op': 'ready'},
             {'op': 'start', 'file': 1, 'first_seq': 0, 'lead': 0, 'size': size, 'mtime_ns': MTIME,
              'mode': 0o644, 'block_size': 1430, 'delta': True},
             {'op': 'signature', 'file': 1, 'offset': 0, 'spans': spans}]
    delta_done = [{'op': 'digest', 'file': 1, 'sha256': sha(bytes(size)), 'wire_bytes': 0}]
    return [(['e'], empty, empty_done), (['d'], tree, []), (['a', 'b'], listed, []),
            (['z'], delta, delta_done)]


def mutate_answer(rng, message):
    if rng.random() < 0.15:
        roll = rng.random()
        if message.get('op') == 'signature' and roll < 0.5:
            return dict(message, spans=b64(zlib_bomb(rng.choice([1 << 20, 64 << 20]))))
        if message.get('op') == 'content' and roll < 0.5:
            return dict(message, encoding='zlib', data=b64(zlib_bomb(64 << 20)))
    return mutate(rng, message)


def scripted(first, on_done):
    """An answer() that says `first` at once and `on_done` to a `done`,
    then hangs up its side, so however a mutation derails the client, it
    hears the end soon."""
    said = []

    def answer(request):
        if not said:
            said.append(True)
            return list(first) + ([] if on_done else [CLOSE])
        if isinstance(request, dict) and request.get('op') == 'done':
            return list(on_done) + [CLOSE]
        return []
    return answer


def test_get_survives_a_server_answering_with_mutated_messages(tmp_path):
    rng = seeded('get')
    for number, (remotes, first, on_done) in enumerate(conversations()):
        status, _out, err, _rss = run_get_against(tmp_path, 'clean%d' % number, remotes, first, on_done)
        assert status == 0, (remotes, err)
    for number in range(12):
        remotes, first, on_done = rng.choice(conversations())
        script = first + on_done
        where = rng.randrange(len(script))
        if rng.random() < 0.2:
            script.insert(where, mutate_answer(rng, rng.choice(script)))
        else:
            script[where] = mutate_answer(rng, script[where])
        split = len(script) - len(on_done)
        status, out, err, rss = run_get_against(tmp_path, 'fuzz%d' % number, remotes,
                                                script[:split], script[split:])
        described = 'run %d, %r: %s' % (number, remotes, err)
        assert status in (0, 1), described
        assert all(line.startswith('wanxfer: ') for line in err.splitlines()), described
        assert '\x1b' not in out + err, described
        assert rss < 150 << 10, described


WRONG_TYPE = {str: 7, int: 'x', float: 'x', bool: 'yes', list: {}, dict: [], type(None): []}


def field_mutations(message):
    """`message` with each field (and each field of its first listed
    entry) left out, of the wrong type, infinite, and for a list, holding
    the wrong type, in turn."""
    for key, value in message.items():
        if key == 'op':
            continue
        yield {k: v for k, v in message.items() if k != key}
        yield dict(message, **{key: WRONG_TYPE[type(value)]})
        yield dict(message, **{key: float('inf')})
        if isinstance(value, list):
            yield dict(message, **{key: [7]})
        if isinstance(value, list) and value and isinstance(value[0], dict):
            for entry in field_mutations(value[0]):
                yield dict(message, **{key: [entry] + value[1:]})


def test_get_in_process_with_each_field_of_each_answer_missing_or_mistyped(tmp_path, monkeypatch,
                                                                         capsys):
    # Every field, not a random few: wanxfer's own main() in this process
    # (cheaper than a process each), so any exception but its one-line
    # errors fails the test with its traceback.  Both ends are in this
    # process and the answers are what is tested, not the secret's
    # stretching: a cheap scrypt spares two 50 ms stretches per run.
    monkeypatch.setenv(wanxfer.SECRET_ENV, SECRET)
    monkeypatch.setattr(wanxfer, 'STRETCH_COST', dict(wanxfer.STRETCH_COST, n=1 << 4))
    runs = 0
    for remotes, first, on_done in conversations():
        script = first + on_done
        for where, message in enumerate(script):
            for mutated in field_mutations(message):
                changed = script[:where] + [mutated] + script[where + 1:]
                split = len(first)
                fake = FakeServer(scripted(changed[:split], changed[split:]), ready=False,
                                  idle_close=0.5)
                name = 'sweep%d' % runs
                try:
                    status = wanxfer.main(['get', '127.0.0.1:%d' % fake.port] + remotes + [
                        '-o', str(tmp_path / name), '--timeout', '5', '-q',
                        '--cache', str(tmp_path / (name + '.db'))])
                finally:
                    fake.close()
                err = capsys.readouterr().err
                assert status in (0, 1), (mutated, err)
                assert all(line.startswith('wanxfer: ') for line in err.splitlines()), (mutated, err)
                runs += 1
    assert runs > 100


def run_get_against(tmp_path, name, remotes, first, on_done):
    fake = FakeServer(scripted(first, on_done), ready=False, idle_close=1.0)
    try:
        status, out, err, rss = run_get_measured(
            fake.port, list(remotes) + ['-o', str(tmp_path / name), '--timeout', '5',
                                        '--cache', str(tmp_path / (name + '.db'))], tmp_path)
    finally:
        fake.close()
    assert 'Traceback' not in err, err
    return status, out, err, rss


# --- tunnel --listen ------------------------------------------------------------------------------

class HostileLink:
    """A peer connection to a real `tunnel --listen` through wanxfer's own
    client_handshake, sending any frames.  A thread reads what comes back;
    `sync()` pings and waits for the pong (or the end of the link), so
    everything sent before has been dealt with."""

    def __init__(self, port):
        self.sock = socket.create_connection(('127.0.0.1', port), timeout=10)
        keys, _rtt = wanxfer.client_handshake(self.sock, SECRET.encode(), True)
        self._out, self._in = keys.sealers('client')[:2]
        self._frames = 0
        self._pongs = set()
        self._tokens = iter(range(1, 1 << 62))
        self._changed = threading.Condition()
        self.closed = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        reader = wanxfer.FrameReader(self._in)
        try:
            while True:
                data = self.sock.recv(1 << 16)
                if not data:
                    break
                reader.feed(data)
                for body in reader.frames():
                    kind, _sid = wanxfer.TUNNEL_MESSAGE.unpack_from(body)
                    if kind == wanxfer.MSG_PONG:
                        with self._changed:
                            self._pongs.add(bytes(body[wanxfer.TUNNEL_MESSAGE.size:]))
                            self._changed.notify_all()
        except (OSError, wanxfer.ProtocolError):
            pass
        with self._changed:
            self.closed = True
            self._changed.notify_all()

    def send(self, kind, sid, payload=b''):
        body = wanxfer.TUNNEL_MESSAGE.pack(kind, sid) + payload if kind is not None else payload
        try:
            self.sock.sendall(wanxfer.seal_frame(self._out, self._frames, body))
        except OSError:
            pass
        self._frames += 1

    def sync(self, timeout=10.0):
        token = wanxfer.TUNNEL_PING.pack(next(self._tokens))
        self.send(wanxfer.MSG_PING, 0, token)
        with self._changed:
            assert self._changed.wait_for(lambda: self.closed or token in self._pongs, timeout), \
                'the far side neither answered a ping nor closed the link'

    def close(self):
        self.sock.close()


def lzma_bomb(size, raw):
    """`size` zero bytes, LZMA2 as the tunnel sends it (`raw`) or in an xz container."""
    if raw:
        return lzma.compress(bytes(size), lzma.FORMAT_RAW, filters=wanxfer.lzma_filters(preset=0))
    return lzma.compress(bytes(size))


def tunnel_messages(rng, target_port, sid):
    """(type, stream id, payload): one message, right or wrong."""
    pieces = [(wanxfer.PIECE_CHUNK, 5, None, b'hello')]
    raw = wanxfer.pack_pieces(pieces)
    choices = [
        lambda: (wanxfer.MSG_OPEN, sid, wanxfer.TUNNEL_OPEN.pack(target_port) + b'127.0.0.1'),
        lambda: (wanxfer.MSG_OPEN, sid, wanxfer.TUNNEL_OPEN.pack(target_port) +
                 rng.choice([b'', b'\xff\xfe', b'\x1b]0;owned\x07', b'h' * 3000, b'\x00'])),
        lambda: (wanxfer.MSG_DATA, sid, wanxfer.TUNNEL_DATA.pack(wanxfer.BLOB_RAW, 1, len(raw)) + raw),
        lambda: (wanxfer.MSG_DATA, sid, wanxfer.TUNNEL_DATA.pack(
            rng.choice([0, 1, 3, 7]), rng.getrandbits(16), rng.getrandbits(32)) + random_datagram(rng)),
        lambda: (wanxfer.MSG_DATA, sid, wanxfer.TUNNEL_DATA.pack(wanxfer.BLOB_RAW, 1, 5 + 5) +
                 wanxfer.TUNNEL_PIECE.pack(rng.choice([1, 2, 3, 4, 9]), rng.choice([0, 5, 1 << 31])) +
                 b'hello'),
        lambda: (wanxfer.MSG_DATA, sid, wanxfer.TUNNEL_DATA.pack(wanxfer.BLOB_RAW, 2, 37 + 23) +
                 wanxfer.TUNNEL_PIECE.pack(wanxfer.PIECE_REF, 5000) + bytes(32) +
                 wanxfer.TUNNEL_PIECE.pack(wanxfer.PIECE_RUN, rng.choice([0, 1, 5000, 1 << 31])) +
                 wanxfer.TUNNEL_RUN.pack(rng.choice([0, 1, 2, 5000]), bytes(16))),
        lambda: (wanxfer.MSG_RUN_REQUEST, sid, bytes(rng.choice([0, 16, 32]))),
        lambda: (wanxfer.MSG_RUN, sid, bytes(rng.choice([0, 16, 48, 50, 16 + 32 * 5000]))),
        lambda: (wanxfer.MSG_DATA, sid, wanxfer.TUNNEL_DATA.pack(wanxfer.BLOB_RAW, 1, 37) +
                 wanxfer.TUNNEL_PIECE.pack(wanxfer.PIECE_REF, rng.choice([0, 10, 70000])) +
                 bytes(rng.getrandbits(8) for _ in range(32))),
        lambda: (wanxfer.MSG_DATA, sid, wanxfer.TUNNEL_DATA.pack(wanxfer.BLOB_DEFLATE, 1, 100) +
                 zlib_bomb(rng.choice([1000, 8 << 20]), rng.choice([15, -15]))),
        lambda: (wanxfer.MSG_DATA, sid, wanxfer.TUNNEL_DATA.pack(wanxfer.BLOB_LZMA, 1, 100) +
                 lzma_bomb(rng.choice([1000, 8 << 20]), rng.random() < 0.5)),
        lambda: (wanxfer.MSG_CHUNK, sid, bytes(32) + bytes([rng.choice([0, 1, 2, 5])]) +
                 rng.choice([zlib_bomb(4 << 20, -15), zlib_bomb(4 << 20), bytes(70000), b'x'])),
        lambda: (wanxfer.MSG_CREDIT, sid, wanxfer.TUNNEL_CREDIT.pack(rng.getrandbits(64))),
        lambda: (wanxfer.MSG_CREDIT, sid, b'\x01'),
        lambda: (wanxfer.MSG_SHUT, sid, b''),
        lambda: (wanxfer.MSG_RESET, sid, b'\x1b]0;owned\x07\x1b[2J' * rng.choice([1, 1000])),
        lambda: (wanxfer.MSG_CHUNK_REQUEST, sid, random_datagram(rng)),
        lambda: (wanxfer.MSG_PING, 0, bytes(rng.choice([0, 8, 1 << 20]))),
        lambda: (wanxfer.MSG_PONG, 0, b''),
        lambda: (wanxfer.MSG_HELLO, 0, random_datagram(rng)),
        lambda: (rng.choice([0, 11, 255]), sid, random_datagram(rng)),
        lambda: (None, 0, random_datagram(rng)),                 # shorter than a message header
    ]
    return rng.choice(choices)()


def test_tunnel_listen_survives_garbage_and_mutated_frames(tmp_path, tunnel_pair):
    rng = seeded('tunnel')
    echo = Server(echo_handler)
    far = tunnel_pair.far(tmp_path / 'far.db', [echo.port])
    try:
        for _ in range(20):
            with socket.create_connection(('127.0.0.1', far.port), timeout=5) as sock:
                try:
                    sock.sendall(random_datagram(rng))
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
        link, sid, links = None, 0, 0
        for _ in range(200):
            if link is None or link.closed:
                if link is not None:
                    link.close()
                link, sid = HostileLink(far.port), 0
                links += 1
                link.send(wanxfer.MSG_HELLO, 0, wanxfer.TUNNEL_HELLO.pack(
                    wanxfer.TUNNEL_MAGIC, wanxfer.TUNNEL_VERSION, wanxfer.STREAM_WINDOW,
                    wanxfer.decodable_encodings()))
            if rng.random() < 0.3:
                sid += 1
            link.send(*tunnel_messages(rng, echo.port, max(sid, 1)))
            link.sync()
        link.close()
        assert links > 10
        assert far.proc.poll() is None
        near = tunnel_pair.near(tmp_path / 'near.db', far.port, [echo.port])
        try:
            payload = bytes(rng.getrandbits(8) for _ in range(100000))
            assert round_trip(near.port, payload) == payload
        finally:
            near.stop()
        assert far.proc.poll() is None
    finally:
        far.stop()
        echo.close()
    assert 'Traceback' not in far.log(), far.log()
    assert '\x1b' not in far.log()
