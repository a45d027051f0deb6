"""The early handshake: a client's HELLO also goes as a datagram beside its
TCP connect, and the server's answer comes back beside the SYN-ACK, so the
proof and the first request go with the connect's completion (two round
trips to the first data byte, not three).  The server keeps nothing per
datagram, answers with no more bytes than it got, and takes each early
proof once; a client that gets no answer goes the TCP way, and one whose
early proof the server hangs up on connects again the plain way, once."""

import os
import re
import select
import socket
import subprocess
import sys

import pytest

import wanxfer
from helpers import (FakeClock, SECRET, get_command, json_summaries, make_file, patched_serve, sha256,
                     wait_for, wanxfer_env)

FLAGS = wanxfer.FLAG_ENCRYPT | wanxfer.FLAG_MIRROR | wanxfer.FLAG_EARLY


def early_hello(flags=FLAGS, nonce=b'n' * 32, size=wanxfer.EARLY_HELLO_SIZE):
    datagram = wanxfer.PACKET_HEADER.pack(wanxfer.KIND_HANDSHAKE, 0, 0, 0) + wanxfer.HELLO.pack(
        wanxfer.PROTOCOL_MAGIC, wanxfer.PROTOCOL_VERSION, flags, nonce)
    return datagram.ljust(size, b'\0')


def early_proof(answer, secret=SECRET, flags=FLAGS, nonce=b'n' * 32):
    """What a client sends on TCP after `answer`: its HELLO and EARLY_PROOF."""
    _, _, server_flags, server_nonce, salt, _ = wanxfer.SERVER_HELLO.unpack_from(
        answer, wanxfer.PACKET_HEADER.size)
    key = wanxfer.SharedSecret(secret.encode()).key(salt)
    proof = wanxfer.handshake_proof(key, b'wanxfer client', nonce, server_nonce, flags, server_flags)
    return wanxfer.HELLO.pack(wanxfer.PROTOCOL_MAGIC, wanxfer.PROTOCOL_VERSION, flags, nonce) + \
        wanxfer.EARLY_PROOF.pack(server_nonce, proof)


@pytest.fixture
def secret():
    """The server's SharedSecret, stretched once for the module's tests."""
    return wanxfer.SharedSecret(SECRET.encode())


def test_an_early_hello_is_answered_with_a_proof_and_no_more_bytes_than_it_brought(secret):
    early = wanxfer.EarlyHandshakes(secret, encrypt=True)
    datagram = early_hello()
    answer = early.answer(datagram)
    assert answer is not None and len(answer) <= len(datagram)
    kind = answer[0]
    magic, version, server_flags, server_nonce, salt, proof = wanxfer.SERVER_HELLO.unpack_from(
        answer, wanxfer.PACKET_HEADER.size)
    assert (kind, magic, version) == (wanxfer.KIND_HANDSHAKE, wanxfer.PROTOCOL_MAGIC, wanxfer.PROTOCOL_VERSION)
    assert proof == wanxfer.handshake_proof(secret.key(salt), b'wanxfer server', b'n' * 32, server_nonce,
                                            FLAGS, server_flags)


@pytest.mark.parametrize('datagram', [
    early_hello(size=wanxfer.EARLY_HELLO_SIZE - 1),                 # not padded: it would amplify
    early_hello(size=wanxfer.EARLY_HELLO_SIZE + 1),
    early_hello(flags=FLAGS & ~wanxfer.FLAG_EARLY),
    early_hello(flags=FLAGS & ~wanxfer.FLAG_ENCRYPT),               # TCP's hello names the mismatch
    early_hello().replace(wanxfer.PROTOCOL_MAGIC, b'XXXX'),
    bytes([wanxfer.KIND_HELLO]) + early_hello()[1:],
], ids=['short', 'long', 'not early', 'no encryption', 'magic', 'kind'])
def test_anything_else_is_not_answered(secret, datagram):
    assert wanxfer.EarlyHandshakes(secret, encrypt=True).answer(datagram) is None


def test_an_early_proof_is_taken_once_and_gives_both_ends_the_same_keys(secret):
    early = wanxfer.EarlyHandshakes(secret, encrypt=True)
    answer = early.answer(early_hello())
    keys, _rtt = early.claim(early_proof(answer))
    _, _, server_flags, server_nonce, salt, _ = wanxfer.SERVER_HELLO.unpack_from(
        answer, wanxfer.PACKET_HEADER.size)
    theirs = wanxfer.SessionKeys(secret.key(salt), b'n' * 32, server_nonce, True)
    assert keys.session_id == theirs.session_id and keys.mirror
    with pytest.raises(wanxfer.AuthError, match='sent again'):
        early.claim(early_proof(answer))
    # Nor with a fresh cookie for the same client nonce: its keys could repeat.
    with pytest.raises(wanxfer.AuthError, match='sent again'):
        early.claim(early_proof(early.answer(early_hello())))


def test_an_early_proof_is_refused_for_a_forged_old_or_foreign_nonce_or_a_wrong_secret(secret):
    clock = FakeClock(1000.0)
    early = wanxfer.EarlyHandshakes(secret, encrypt=True, clock=clock)
    answer = early.answer(early_hello())
    forged = bytearray(early_proof(answer))
    forged[wanxfer.HELLO.size + 20] ^= 1                            # in the cookie's MAC
    with pytest.raises(wanxfer.AuthError, match='did not give'):
        early.claim(bytes(forged))
    restarted = wanxfer.EarlyHandshakes(secret, encrypt=True, clock=clock)
    with pytest.raises(wanxfer.AuthError, match='did not give'):
        restarted.claim(early_proof(answer))
    with pytest.raises(wanxfer.AuthError, match='wrong secret'):
        early.claim(early_proof(answer, secret='another secret'))
    clock.advance(wanxfer.EARLY_HANDSHAKE_SECONDS + 0.01)
    with pytest.raises(wanxfer.AuthError, match='too long ago'):
        early.claim(early_proof(answer))


def test_claims_are_bounded_and_forgotten_once_their_cookies_are_too_old(secret, monkeypatch):
    monkeypatch.setattr(wanxfer, 'MAX_EARLY_CLAIMS', 3)
    clock = FakeClock(1000.0)
    early = wanxfer.EarlyHandshakes(secret, encrypt=True, clock=clock)

    def claim(nonce):
        answer = early.answer(early_hello(nonce=nonce))
        return early.claim(early_proof(answer, nonce=nonce))
    for n in range(3):
        claim(bytes([n]) * 32)
    with pytest.raises(wanxfer.AuthError, match='too many'):
        claim(b'x' * 32)
    clock.advance(wanxfer.EARLY_HANDSHAKE_SECONDS)
    claim(b'y' * 32)


def test_a_listener_that_takes_no_early_handshakes_refuses_one(secret):
    """The tunnel's listener (server_handshake without a claim): an early
    HELLO is refused in one line, not read as a classic one."""
    early = wanxfer.EarlyHandshakes(secret, encrypt=True)
    ours, theirs = socket.socketpair()
    try:
        theirs.sendall(early_proof(early.answer(early_hello())))
        ours.settimeout(10)
        with pytest.raises(wanxfer.AuthError, match='does not take'):
            wanxfer.server_handshake(ours, secret, True)
    finally:
        ours.close()
        theirs.close()


def test_a_client_answered_early_sends_its_proof_with_the_connect(secret):
    """EarlyHello beside a real loopback connect: the server's datagram
    answer lets the client send HELLO and proof at once; the listener's
    claim of those bytes gives it the client's keys."""
    listener = socket.socket()
    listener.bind(('127.0.0.1', 0))
    listener.listen(1)
    address = listener.getsockname()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(address)
    udp.settimeout(10)
    server = wanxfer.EarlyHandshakes(secret, encrypt=True)
    flags, counter_mode = wanxfer.offered_flags(True, mirror=True)
    client = wanxfer.EarlyHello(flags)
    client.WAIT_LEAST = 10.0                # a loaded host may be slow to answer; the wait is not under test
    tcp = socket.create_connection(address, timeout=10)
    accepted, _ = listener.accept()
    try:
        client.send(socket.AF_INET, address)
        datagram, source = udp.recvfrom(65536)
        udp.sendto(server.answer(datagram), source)
        keys, _rtt = client.finish(tcp, wanxfer.SharedSecret(SECRET.encode()), flags, counter_mode)
        assert client.taken
        accepted.settimeout(10)
        sent = wanxfer.recv_exactly(accepted, wanxfer.HELLO.size + wanxfer.EARLY_PROOF.size)
        server_keys, _ = server.claim(sent)
        assert server_keys.session_id == keys.session_id
        sealed = server_keys.sealers('server')[0].seal(0, b'h', b'ready')
        assert keys.sealers('client')[1].open(0, b'h', sealed) == b'ready'
    finally:
        client.close()
        for sock in (tcp, accepted, listener, udp):
            sock.close()


# A `get` whose EarlyHello waits long enough on any loaded host, and says
# whether its handshake went the early way.
EARLY_GET = """
wanxfer.EarlyHello.WAIT_LEAST = 10.0
finish = wanxfer.EarlyHello.finish
def told_finish(self, *args):
    done = finish(self, *args)
    sys.stderr.write('early handshake: %s\\n' % ('taken' if done else 'not taken'))
    return done
wanxfer.EarlyHello.finish = told_finish
"""


def run_early_get(port, *args, timeout=90):
    program = 'import sys\nsys.path.insert(0, %r)\nimport wanxfer\n%s\nsys.exit(wanxfer.main(sys.argv[1:]))' \
        % (os.path.dirname(wanxfer.__file__), EARLY_GET)
    return subprocess.run([sys.executable, '-c', program] + get_command(port, *args)[2:],
                          env=wanxfer_env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.e2e
@pytest.mark.parametrize('workers', [1, 2])
def test_get_goes_the_early_way_to_a_serve_and_the_file_arrives_whole(tmp_path, serve, workers):
    source = make_file(tmp_path / 'f.bin', (3 << 20) + 5, seed=41)
    server = serve([source], extra=['--workers', str(workers)])
    dest = tmp_path / 'out.bin'
    got = run_early_get(server.port, 'f.bin', '-o', dest, '--workers', str(workers))
    assert got.returncode == 0, got.stderr + server.log()
    assert 'early handshake: taken' in got.stderr
    assert sha256(dest) == sha256(source)
    assert 'Traceback' not in server.log() + got.stderr


@pytest.mark.e2e
def test_a_server_that_does_not_answer_early_is_reached_the_tcp_way(tmp_path, serve):
    source = make_file(tmp_path / 'f.bin', 100000, seed=42)
    server = patched_serve(serve, [source], 'wanxfer.EarlyHandshakes.answer = lambda self, datagram: None')
    dest = tmp_path / 'out.bin'
    got = run_early_get(server.port, 'f.bin', '-o', dest)
    assert got.returncode == 0, got.stderr + server.log()
    assert 'early handshake: not taken' in got.stderr
    assert sha256(dest) == sha256(source)


@pytest.mark.e2e
def test_an_early_proof_sent_again_on_another_connection_is_refused(tmp_path, serve):
    """What a recording of a client's connection could replay: the session
    it opens once, never twice (its keys would be the same)."""
    server = serve([make_file(tmp_path / 'f.bin', 1000, seed=43)])
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.settimeout(10)
    udp.sendto(early_hello(flags=FLAGS | wanxfer.FLAG_AES_CTR), ('127.0.0.1', server.port))
    answer, _ = udp.recvfrom(65536)
    udp.close()
    sent = early_proof(answer, flags=FLAGS | wanxfer.FLAG_AES_CTR)
    connections = []
    for _ in range(2):
        connections.append(socket.create_connection(('127.0.0.1', server.port), timeout=10))
        connections[-1].sendall(sent)
    server.wait_for(r'refused: an early handshake sent again', timeout=20)
    for sock in connections:
        sock.close()
    assert server.log().count('refused') == 1
    assert 'Traceback' not in server.log()


# --- A refused early handshake: the client connects again, the plain way ----

# A server whose early answers no claim will match, as if it had restarted
# between each answer and the proof that follows (its cookie key is new).
FORGETFUL = """
import secrets
answer = wanxfer.EarlyHandshakes.answer
def answer_then_forget(self, datagram):
    answered = answer(self, datagram)
    self._mac_key = secrets.token_bytes(32)
    return answered
wanxfer.EarlyHandshakes.answer = answer_then_forget
"""
AGAIN = 'hung up on the early handshake'


@pytest.mark.e2e
@pytest.mark.parametrize('workers', [1, 2])
def test_a_get_whose_early_proof_is_refused_connects_again_the_plain_way_once(tmp_path, serve, workers):
    """With workers, the first session forked its team for the open fetch
    before any answer: let go, and forked again for the second (the file
    has stripes for both, and each worker's flow carries its share)."""
    size = workers * wanxfer.STRIPES_PER_WORKER * wanxfer.STRIPE_BYTES + 7
    source = make_file(tmp_path / 'f.bin', size, seed=44)
    server = patched_serve(serve, [source], FORGETFUL, extra=['--workers', str(workers)])
    dest = tmp_path / 'out.bin'
    got = run_early_get(server.port, 'f.bin', '-o', dest, '--workers', str(workers), '--json',
                        '--cache', tmp_path / 'cache.db')
    assert got.returncode == 0, got.stderr + server.log()
    assert sha256(dest) == sha256(source)
    (summary,) = json_summaries(got)
    assert summary['workers'] == workers and all(summary['worker_packets']), summary
    assert got.stderr.count('early handshake: taken') == 1
    assert got.stderr.count(AGAIN) == 1
    assert server.log().count('refused: an early handshake with a server nonce') == 1
    assert 'Traceback' not in server.log() + got.stderr


@pytest.mark.e2e
def test_a_directory_get_whose_early_proof_is_refused_lists_and_fetches_on_the_new_session(tmp_path, serve):
    """Its first requests (the listings) went with the refused proof: asked
    again; the directory holds each file once, whole."""
    tree = tmp_path / 'root' / 'd'
    tree.mkdir(parents=True)
    sources = [make_file(tree / 'big.bin', 600000, seed=45), make_file(tree / 'small.txt', 900, seed=46)]
    server = patched_serve(serve, [tmp_path / 'root'], FORGETFUL)
    got = run_early_get(server.port, 'd', '-o', tmp_path / 'out')
    assert got.returncode == 0, got.stderr + server.log()
    assert sorted(os.listdir(tmp_path / 'out' / 'd')) == ['big.bin', 'small.txt']
    for source in sources:
        assert sha256(tmp_path / 'out' / 'd' / source.name) == sha256(source)
    assert got.stderr.count(AGAIN) == 1


def await_reset(sock, timeout=10.0):
    """Until `sock`'s peer, closed, has reset it: a byte sent to a socket
    no process holds any more brings the reset back."""
    assert select.select([sock], [], [], timeout)[0], 'the old server never closed the connection'
    assert sock.recv(1, socket.MSG_PEEK) == b''
    sock.send(b'x')
    wait_for(lambda: sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR), timeout=timeout,
             what='the reset')


@pytest.mark.e2e
@pytest.mark.parametrize('reset', [False, True], ids=['closed', 'reset before the proof'])
def test_a_server_restarted_between_its_early_answer_and_the_proof_is_reached_the_plain_way(
        tmp_path, serve, monkeypatch, reset):
    """A real restart: the answer came from one `serve`, the proof goes to
    a connection a second one on the same port never had; or cannot go at
    all, the connection reset already (the proof's send fails)."""
    source = make_file(tmp_path / 'f.bin', 300000, seed=47)
    servers = [serve([source])]
    finish, answer = wanxfer.EarlyHello.finish, wanxfer.EarlyHello._answer
    connections = []

    def finish_noting_the_connection(self, sock, *args):
        connections.append(sock)
        return finish(self, sock, *args)

    def answer_then_restart(self, peer, wait):
        answered = answer(self, peer, max(wait, 10.0))     # a loaded host may be slow to answer
        if answered is not None and len(servers) == 1:
            servers[0].stop()
            servers.append(serve([source], port=servers[0].port))
            if reset:
                await_reset(connections[0])
        return answered
    monkeypatch.setattr(wanxfer.EarlyHello, 'finish', finish_noting_the_connection)
    monkeypatch.setattr(wanxfer.EarlyHello, '_answer', answer_then_restart)
    warnings = []
    events = wanxfer.TransferEvents()
    events.warning = warnings.append
    client = wanxfer.Client('127.0.0.1', servers[0].port, SECRET.encode(), events=events)
    dest = tmp_path / 'out.bin'
    try:
        outcomes = list(client.get(['f.bin'], str(dest)))
    finally:
        client.close()
    assert len(servers) == 2 and len(connections) == 1
    assert [outcome['file_bytes'] for outcome in outcomes] == [300000]
    assert sha256(dest) == sha256(source)
    assert len(warnings) == 1 and AGAIN in warnings[0], warnings
    servers[1].wait_for(r'sent f\.bin', timeout=20)


@pytest.mark.e2e
def test_a_server_that_refuses_the_plain_handshake_too_fails_the_get_in_one_line(tmp_path, serve):
    source = make_file(tmp_path / 'f.bin', 1000, seed=48)
    server = patched_serve(serve, [source], FORGETFUL + """
def refuse(*args, **kwargs):
    raise wanxfer.AuthError('no handshake today')
wanxfer.server_handshake = refuse
""")
    got = run_early_get(server.port, 'f.bin', '-o', tmp_path / 'out.bin', timeout=30)
    assert got.returncode == 1, got.stderr + server.log()
    errors = [line for line in got.stderr.splitlines() if line.startswith('wanxfer: error:')]
    assert len(errors) == 1 and 'Traceback' not in got.stderr, got.stderr
    assert got.stderr.count(AGAIN) == 1
    server.wait_for('refused: no handshake today', timeout=20)
    assert len(re.findall(r'127\.0\.0\.1:\d+: (dropped: )?refused', server.log())) == 2, server.log()
    assert not (tmp_path / 'out.bin').exists()


@pytest.mark.e2e
def test_a_server_that_hangs_up_after_its_first_message_is_not_asked_again(tmp_path, serve):
    """Only a hang-up before the server's first message (the listing, here)
    is taken for a refused early handshake; any later stays an error."""
    tree = tmp_path / 'root' / 'd'
    tree.mkdir(parents=True)
    make_file(tree / 'f.bin', 300000, seed=49)
    server = patched_serve(serve, [tmp_path / 'root'], """
import os
resolve = wanxfer.ServedTree.resolve
def resolve_or_end(self, remote):
    if remote.endswith('f.bin'):
        os._exit(0)                     # the session process, after the listing
    return resolve(self, remote)
wanxfer.ServedTree.resolve = resolve_or_end
""")
    got = run_early_get(server.port, 'd', '-o', tmp_path / 'out', timeout=30)
    assert got.returncode == 1, got.stderr + server.log()
    assert 'early handshake: taken' in got.stderr
    assert AGAIN not in got.stderr
    errors = [line for line in got.stderr.splitlines() if line.startswith('wanxfer: error:')]
    assert len(errors) == 1 and 'Traceback' not in got.stderr, got.stderr
