"""The security promises of the cipher and the handshake: no keystream byte
is ever used twice, the secret is stretched before it is proved with, and
weak secrets are refused or warned about by the ends that listen."""

import errno
import hashlib
import random
import socket
import threading

import pytest

from helpers import (SECRET, HostileClient, InProcessServer, json_summaries, make_file, patched_serve, run_get,
                     sha256, wanxfer)

WINDOW = 16         # a reuse of 2 * WINDOW keystream bytes or more is always found


def find_keystream_reuse(streams):
    """(i, j) for two keystream pieces that share 2 * WINDOW bytes at any
    offsets, or None.  Every WINDOW-th window of every piece is indexed,
    then every window of every piece is looked up: an overlap of 2 * WINDOW
    bytes holds one indexed window whole.  Random keystream repeats a
    16-byte window by chance with probability ~ n**2 / 2**128."""
    index = {}
    for i, stream in enumerate(streams):
        for offset in range(0, len(stream) - WINDOW + 1, WINDOW):
            index.setdefault(stream[offset:offset + WINDOW], (i, offset))
    for i, stream in enumerate(streams):
        for offset in range(len(stream) - WINDOW + 1):
            hit = index.get(stream[offset:offset + WINDOW])
            if hit is not None and hit != (i, offset):
                return hit[0], i
    return None


def test_the_reuse_detector_finds_a_shifted_overlap():
    rng = random.Random(3)
    base = rng.getrandbits(8 * 4000).to_bytes(4000, 'big')
    assert find_keystream_reuse([base[:2000], base[1000 + 7:3000]]) is not None
    assert find_keystream_reuse([base[:2000], base[2000:4000]]) is None


@pytest.fixture(params=['aes-256-ctr', 'shake-128'])
def cipher(request, monkeypatch):
    """Each keystream in turn: AES where this Python can load it, and the
    SHAKE fallback (as if it could not)."""
    if request.param == 'shake-128':
        monkeypatch.setattr(wanxfer.CounterMode, 'load', staticmethod(lambda: None))
    elif wanxfer.CounterMode.load() is None:
        pytest.skip('this Python cannot load AES from its libcrypto')
    return request.param


def recording_keystream(monkeypatch):
    """Every keystream the cipher seals with, as the bytes it used.  (With
    both ends in one process, opening uses the same keystream again: only
    what `seal` and `seal_run` apply is recorded.)"""
    used, sealing = [], threading.local()
    xor, apply = wanxfer.xor_bytes, wanxfer.CounterModeContext.apply

    def record(data, keystream):
        if getattr(sealing, 'on', False):
            used.append(bytes(keystream[:len(data)]))
        return xor(data, keystream)

    def record_aes(context, data, pieces, in_place=False):
        plain = bytes(data) if getattr(sealing, 'on', False) else None
        out = apply(context, data, pieces, in_place)
        if plain is not None:
            used.append(xor(plain, bytes(out)))             # plaintext ^ ciphertext: the keystream
        return out

    def sealing_with(method):
        def wrapper(*args):
            sealing.on = True
            try:
                return method(*args)
            finally:
                sealing.on = False
        return wrapper
    monkeypatch.setattr(wanxfer, 'xor_bytes', record)
    monkeypatch.setattr(wanxfer.CounterModeContext, 'apply', record_aes)
    for name in ('seal', 'seal_run'):
        monkeypatch.setattr(wanxfer.Sealer, name, sealing_with(getattr(wanxfer.Sealer, name)))
    return used


def test_sealer_never_reuses_keystream_across_stride_changes(monkeypatch, cipher):
    """The sender's stride follows the block size, which changes between
    files of one session; packet numbers go on counting."""
    used = recording_keystream(monkeypatch)
    sealer = wanxfer.Sealer(bytes(range(64)), True, counter_mode=wanxfer.CounterMode.load())
    assert sealer.cipher == cipher
    nonce, seals = 0, 0
    for stride in (65477, 1442, 8000, 1442, 65477, 2048, 1230):
        sealer.set_stride(stride)
        # Past a batch's end one by one, then in a run, whatever the batch
        # size at this stride (1 nonce at 64 KiB, 45 at 1442 bytes).
        for _ in range(sealer.batch + 3):
            sealer.seal(nonce, nonce.to_bytes(8, 'big'), bytes(stride))
            nonce += 1
        run = sealer.batch + 5
        headers = [n.to_bytes(8, 'big') for n in range(nonce, nonce + run)]
        sealer.seal_run(nonce, headers, bytes(stride * run - 3))
        nonce += run
        sealer.seal(nonce, b'', bytes(stride + 10))     # longer than the stride
        nonce += 1
        seals += sealer.batch + 5
    assert len(used) == seals
    assert find_keystream_reuse(used) is None


def documented_stream(cipher, key, name, length):
    """The first `length` bytes of a keystream as the README lays it out:
    `name` is stride (4 bytes) | batch (8), or 4 zero bytes | nonce (8) for
    a long frame's own stream."""
    if cipher == 'shake-128':
        label = b'L' + name[4:] if name[:4] == bytes(4) else b'B' + name
        return hashlib.shake_128(key[:32] + label).digest(length)
    return bytes(wanxfer.CounterMode.load().context(key[:32]).apply(bytes(length), [(name, 0, length)]))


def test_each_packet_takes_the_slice_of_keystream_the_protocol_names(cipher):
    """A compatible peer finds the keystream where the README says: nonce n
    at stride s is bytes [(n % batch) * s, +s) of stream (s, n // batch),
    however the slice falls across AES blocks; a frame longer than the
    stride has a stream of its own.  A run sealed in one go is the same as
    its packets sealed one by one."""
    key, stride = bytes(range(64)), 1442
    sealer = wanxfer.Sealer(key, True, stride=stride, counter_mode=wanxfer.CounterMode.load())
    assert sealer.cipher == cipher
    batch = sealer.batch
    for nonce in (0, 1, 5, batch - 1, batch, 3 * batch + 7):
        number, index = divmod(nonce, batch)
        stream = documented_stream(cipher, key, stride.to_bytes(4, 'big') + number.to_bytes(8, 'big'),
                                   (index + 1) * stride)
        assert sealer.seal(nonce, b'', bytes(stride))[:-wanxfer.TAG_SIZE] == stream[index * stride:], nonce
    long = sealer.seal(12345, b'', bytes(stride + 100))[:-wanxfer.TAG_SIZE]
    assert long == documented_stream(cipher, key, bytes(4) + (12345).to_bytes(8, 'big'), stride + 100)
    first, count = batch - 3, 7                         # across a batch boundary, the last one short
    payload = bytes(random.Random(1).getrandbits(8) for _ in range(count * stride - 9))
    headers = [n.to_bytes(8, 'big') for n in range(first, first + count)]
    one_by_one = [headers[i] + sealer.seal(first + i, headers[i], payload[i * stride:(i + 1) * stride])
                  for i in range(count)]
    assert sealer.seal_run(first, headers, payload) == one_by_one


@pytest.mark.e2e
@pytest.mark.parametrize('case', ['updated-file', 'narrow-path'])
def test_a_session_with_mixed_block_sizes_never_reuses_keystream(tmp_path, monkeypatch, link, case, cipher):
    """Both ends in this process, every sealed payload recorded.  The block
    size (and so the stride) changes within one session: a new file in 64
    KiB blocks, then an updated one in the smaller blocks of a delta; or a
    first request in 64 KiB blocks that a narrow path makes fall back."""
    used = recording_keystream(monkeypatch)
    strides = set()
    set_stride = wanxfer.Sealer.set_stride
    monkeypatch.setattr(wanxfer.Sealer, 'set_stride',
                        lambda sealer, stride: strides.add(stride) or set_stride(sealer, stride))
    served, out = tmp_path / 'served', tmp_path / 'out'
    served.mkdir()
    out.mkdir()
    make_file(served / 'a', 1 << 20, seed=1)
    make_file(served / 'b', 1 << 20, seed=2)
    with open(out / 'b', 'wb') as older:                # b changed in its second half
        older.write((served / 'b').read_bytes()[:1 << 19] + bytes(1 << 19))
    server = wanxfer.Server(wanxfer.ServedTree([str(served / 'a'), str(served / 'b')]),
                            SECRET.encode(), '127.0.0.1', 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = link(server.port, mtu=1500).port if case == 'narrow-path' else server.port
        remotes = ['a', 'b'] if case == 'updated-file' else ['a']
        monkeypatch.setenv('WANXFER_SECRET', SECRET)
        status = wanxfer.main(['get', '127.0.0.1:%d' % port] + remotes + ['-o', str(out), '--quiet'])
    finally:
        server.shutdown()
        thread.join(10)
    assert status == 0
    for name in remotes:
        assert sha256(out / name) == sha256(served / name)
    assert {wanxfer.block_size_for_mtu(65535), wanxfer.block_size_for_mtu(1500)} <= strides, strides
    assert sum(map(len, used)) > 1 << 20
    assert find_keystream_reuse(used) is None


def data_datagram_seqs(sock, wait):
    """Packet numbers of the data datagrams waiting on the client's UDP
    `sock`, after waiting up to `wait` seconds for the first (probes are
    passed over)."""
    seqs = []
    sock.settimeout(wait)
    try:
        while True:
            datagram = sock.recv(1 << 16)
            kind, _flags, _sid, seq = wanxfer.PACKET_HEADER.unpack_from(datagram)
            if kind == wanxfer.KIND_DATA:
                seqs.append(seq)
                sock.settimeout(0)      # the first is in: only what is already waiting
    except OSError:                     # socket.timeout, BlockingIOError: nothing more
        return seqs


@pytest.mark.e2e
def test_a_fetch_that_fails_while_sending_leaves_its_packet_numbers_spent(tmp_path, monkeypatch, cipher):
    """A delta fetch whose signature cannot be read fails with an error
    while its blocks are on their way, and the session goes on: the next
    file's packet numbers (the cipher's nonces) must come after every one
    the failed file used.  (They started again from the failed file's
    first: the same keystream for other data.)"""
    used = recording_keystream(monkeypatch)
    fail = threading.Event()

    def unreadable(*args, **kwargs):
        fail.wait(10)
        raise OSError(errno.EIO, 'unreadable')
    monkeypatch.setattr(wanxfer, 'file_signature', unreadable)
    source = make_file(tmp_path / 'f', 1 << 20)
    st = source.stat()
    fetch = {'op': 'fetch', 'path': 'f', 'size': st.st_size, 'mtime_ns': st.st_mtime_ns,
             'block_size': 1430, 'need': [[0, 10]]}
    server = InProcessServer([source])
    client = HostileClient(server.port)
    try:
        client.send(dict(fetch, delta=True))
        first = client.recv(10)
        assert first['op'] == 'start'
        sent = data_datagram_seqs(client.udp, 10)
        assert sent, 'no block of the first file came'
        fail.set()
        replies = [client.recv(10)]
        while replies[-1]['op'] == 'signature':
            replies.append(client.recv(10))
        assert replies[-1]['op'] == 'error' and 'unreadable' in replies[-1]['message']
        # Loopback delivers within send(): what the server sent is waiting.
        sent += data_datagram_seqs(client.udp, 0)
        client.send(fetch)
        second = client.recv(10)
        assert second['op'] == 'start' and second['file'] == 2
        assert second['first_seq'] > max(sent), (first['first_seq'], sent, second['first_seq'])
        assert len(data_datagram_seqs(client.udp, 10)) > 0
    finally:
        client.close()
        server.stop()
    assert find_keystream_reuse(list(used)) is None


def aes_or_skip():
    if wanxfer.CounterMode.load() is None:
        pytest.skip('this Python cannot load AES from its libcrypto')


@pytest.mark.e2e
@pytest.mark.parametrize('shake_end', [None, 'server', 'client'])
def test_the_ends_agree_on_the_keystream_both_can_run(serve, tmp_path, monkeypatch, shake_end):
    """AES when both ends have it; SHAKE, and the same bytes, when either
    end has not (WANXFER_CIPHER=shake stands in for a Python without it).
    The summary names the cipher used."""
    aes_or_skip()
    source = make_file(tmp_path / 'f', 3 << 20)
    if shake_end == 'server':
        server = patched_serve(serve, [source], "wanxfer.os.environ['WANXFER_CIPHER'] = 'shake'")
    else:
        server = serve([source])
    if shake_end == 'client':
        monkeypatch.setenv('WANXFER_CIPHER', 'shake')
    done = run_get(server.port, 'f', '-o', tmp_path / 'out', '--json')
    assert done.returncode == 0, done.stderr
    assert json_summaries(done)[0]['cipher'] == ('aes-256-ctr' if shake_end is None else 'shake-128')
    assert sha256(tmp_path / 'out') == sha256(source)


def test_a_library_that_fails_the_known_answer_is_not_used(monkeypatch):
    aes_or_skip()
    key, counter, plain, cipher = wanxfer.CounterMode.KNOWN_ANSWER
    monkeypatch.setattr(wanxfer.CounterMode, 'KNOWN_ANSWER', (key, counter, plain, bytes(len(cipher))))
    wanxfer.CounterMode.load.cache_clear()
    try:
        assert wanxfer.CounterMode.load() is None
    finally:
        wanxfer.CounterMode.load.cache_clear()


def test_a_man_in_the_middle_cannot_take_aes_off_the_table():
    """Clearing FLAG_AES_CTR in the client's HELLO (to push both ends onto
    the other keystream) fails both proofs: the flags are proved."""
    aes_or_skip()
    secret = wanxfer.SharedSecret(b'correct horse battery staple')
    client, near = socket.socketpair()
    far, server = socket.socketpair()
    for sock in (client, near, far, server):
        sock.settimeout(10)
    outcome = {}

    def serve_one():
        try:
            outcome['server'] = wanxfer.server_handshake(server, secret, True)
        except wanxfer.WanxferError as error:
            outcome['server'] = error
        server.close()

    def relay(source, sink, first):
        try:
            data = bytearray(wanxfer.recv_exactly(source, first))
            if first == wanxfer.HELLO.size:
                data[5] &= ~wanxfer.FLAG_AES_CTR & 0xFF
            while data:
                sink.sendall(data)
                data = source.recv(4096)
        except OSError:
            pass
        try:
            sink.shutdown(socket.SHUT_WR)   # EOF now, even while the other relay reads from it
        except OSError:
            pass

    threads = [threading.Thread(target=serve_one),
               threading.Thread(target=relay, args=(near, far, wanxfer.HELLO.size)),
               threading.Thread(target=relay, args=(far, near, 1))]
    for thread in threads:
        thread.daemon = True
        thread.start()
    with pytest.raises(wanxfer.AuthError):
        wanxfer.client_handshake(client, secret, True)
    client.close()
    for thread in threads:
        thread.join(10)
    for sock in (near, far):
        sock.close()
    assert isinstance(outcome.get('server'), wanxfer.WanxferError), outcome


def test_the_server_proves_with_the_stretched_secret_and_a_salt_of_its_own():
    """What a listener hands to anyone who connects is an HMAC under scrypt
    of the secret with a salt drawn per server run, not under the secret."""
    secret = wanxfer.SharedSecret(b'correct horse battery staple')
    hellos = []
    for _ in range(2):
        a, b = socket.socketpair()
        a.sendall(wanxfer.HELLO.pack(wanxfer.PROTOCOL_MAGIC, wanxfer.PROTOCOL_VERSION,
                                     wanxfer.FLAG_ENCRYPT, bytes(32)))
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(wanxfer.ProtocolError):
            wanxfer.server_handshake(b, secret, True)
        hellos.append(wanxfer.SERVER_HELLO.unpack(wanxfer.recv_exactly(a, wanxfer.SERVER_HELLO.size)))
        a.close()
        b.close()
    (_, _, flags, nonce, salt, proof), second = hellos
    assert second[4] == salt                            # one salt per server
    assert wanxfer.SharedSecret(b'correct horse battery staple').server_salt()[0] != salt
    stretched = wanxfer.stretch_secret(b'correct horse battery staple', salt)
    client_flags = wanxfer.FLAG_ENCRYPT
    assert proof == wanxfer.handshake_proof(stretched, b'wanxfer server', bytes(32), nonce, client_flags, flags)
    assert proof != wanxfer.handshake_proof(b'correct horse battery staple', b'wanxfer server',
                                            bytes(32), nonce, client_flags, flags)


def test_a_server_stretches_its_secret_once_not_per_connection(monkeypatch):
    calls = []
    stretch = wanxfer.stretch_secret
    monkeypatch.setattr(wanxfer, 'stretch_secret', lambda *a: calls.append(a) or stretch(*a))
    server_secret = wanxfer.SharedSecret(b'correct horse battery staple')
    for _ in range(3):
        a, b = socket.socketpair()
        thread = threading.Thread(target=wanxfer.server_handshake, args=(b, server_secret, True))
        thread.start()
        wanxfer.client_handshake(a, b'correct horse battery staple', True)
        thread.join(10)
        a.close()
        b.close()
    assert len(calls) == 1 + 3          # the server once, each new client once


@pytest.mark.parametrize('secret,refused,warned', [
    (b'pw12', True, True), (b'pw123456', False, True), (b'aaaaaaaaaaaaaaaaaaaa', False, True),
    (b'Zq3-vT9_pLm2xW8kR4n', False, False)])
def test_weak_secrets_are_refused_or_warned_about(secret, refused, warned):
    weakness = wanxfer.secret_weakness(secret)
    assert (weakness is not None) == warned
    assert (weakness is not None and weakness[0]) == refused


@pytest.mark.e2e
def test_serve_refuses_a_very_short_secret_and_warns_about_a_short_one(tmp_path, serve):
    import subprocess
    import sys
    from helpers import WANXFER, wanxfer_env
    (tmp_path / 'f').write_bytes(b'x')
    done = subprocess.run([sys.executable, WANXFER, 'serve', '--bind', '127.0.0.1', '--port', '0',
                           str(tmp_path / 'f')], env=wanxfer_env('pw12'), capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2 and 'at least 8' in done.stderr and 'Traceback' not in done.stderr
    server = serve([tmp_path / 'f'], secret='pw123456')
    assert 'warning: the secret is short' in server.log()
