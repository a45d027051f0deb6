"""What stands between `get`'s start and its first data byte: the round
trips are the TCP connect, the authentication and the request, and nothing
else may wait on top of them.  The stretch of the secret (scrypt, about
50 ms) runs beside the connect when the client remembers the server's salt."""

import json
import socket
import threading

import pytest

from helpers import SECRET, InProcessServer, make_file, run_get, wanxfer


# --- The salt remembered, the secret stretched ahead -------------------------

def test_a_stretch_for_one_salt_does_not_hold_up_another():
    # A client stretches ahead with the salt it remembers; if the server
    # has another now (it was restarted), the handshake's own stretch must
    # not wait for the one ahead to end.
    secret = wanxfer.SharedSecret(b'a secret of some length')
    release, began = threading.Event(), threading.Event()
    real = wanxfer.stretch_secret

    def stretch(value, salt):
        if salt == b'A' * 16:
            began.set()
            release.wait(30)
        return real(value, salt)
    original, wanxfer.stretch_secret = wanxfer.stretch_secret, stretch
    try:
        ahead = secret.prepare(b'A' * 16)
        assert began.wait(10)
        other = threading.Thread(target=secret.key, args=(b'B' * 16,))
        other.start()
        other.join(10)
        finished = not other.is_alive()
        release.set()
        ahead.join(10)
        other.join(10)
    finally:
        release.set()
        wanxfer.stretch_secret = original
    assert finished, 'the stretch for salt B waited for the one for salt A'
    assert secret.key(b'A' * 16) == real(b'a secret of some length', b'A' * 16)
    assert secret.key(b'B' * 16) == real(b'a secret of some length', b'B' * 16)


def test_the_salt_memory_ignores_a_damaged_file_and_keeps_a_bounded_table(tmp_path):
    memory = wanxfer.SaltMemory(tmp_path / 'cache.db.salts')
    assert memory.recall('h:1#x') is None                   # no file
    (tmp_path / 'cache.db.salts').write_text('{not json')
    assert memory.recall('h:1#x') is None
    memory.remember('h:1#x', b's' * 16)
    assert memory.recall('h:1#x') == b's' * 16
    (tmp_path / 'cache.db.salts').write_text(json.dumps({'h:1#x': 'abcd', 'h:2#x': 7}))
    assert memory.recall('h:1#x') is None and memory.recall('h:2#x') is None    # not a salt
    for i in range(wanxfer.SaltMemory.LIMIT + 5):
        memory.remember('h:%d#x' % i, bytes([i]) * 16)
    table = json.loads((tmp_path / 'cache.db.salts').read_text())
    assert len(table) == wanxfer.SaltMemory.LIMIT
    newest = wanxfer.SaltMemory.LIMIT + 4
    assert memory.recall('h:%d#x' % newest) == bytes([newest]) * 16


@pytest.mark.e2e
def test_a_client_stretches_the_remembered_salt_while_it_connects(tmp_path, serve, link, monkeypatch):
    data = make_file(tmp_path / 'f', 1000)
    server = serve([data])
    path = link(server.port, delay_ms=30, loss=0.0)
    stretches = []                              # (salt, on the main thread)
    real = wanxfer.stretch_secret

    def stretch(value, salt):
        stretches.append((salt, threading.current_thread() is threading.main_thread()))
        return real(value, salt)
    monkeypatch.setattr(wanxfer, 'stretch_secret', stretch)
    memory = wanxfer.SaltMemory(tmp_path / 'salts')

    def connect():
        # A new Client each time, as a new `get` is: nothing kept in memory.
        client = wanxfer.Client('127.0.0.1', path.port, SECRET.encode(), salts=memory)
        try:
            client.connect()
            # Joined before connect() returns: workers fork only from a
            # process without other threads.
            assert 'stretch' not in [thread.name for thread in threading.enumerate()]
            listing, = client.listings(['f'])
            assert not isinstance(listing, wanxfer.RemoteError), listing
            return client.keys.salt
        finally:
            client.close()

    salt = connect()
    assert stretches == [(salt, True)]          # a first meeting: after the server's hello
    assert memory.recall(client_origin(path.port)) == salt
    del stretches[:]
    assert connect() == salt
    assert stretches == [(salt, False)]         # stretched beside the connect, not after the hello

    # The server restarted since: the salt remembered is stretched for
    # nothing, the handshake stretches the new one, and it is remembered.
    memory.remember(client_origin(path.port), b'\x01' * 16)
    del stretches[:]
    assert connect() == salt
    assert sorted(stretches) == [(b'\x01' * 16, False), (salt, True)]
    assert memory.recall(client_origin(path.port)) == salt


def client_origin(port):
    return wanxfer.server_origin('127.0.0.1', port, SECRET.encode())


@pytest.mark.e2e
def test_get_remembers_the_salt_beside_its_cache(tmp_path, serve, private_cache):
    data = make_file(tmp_path / 'f', 1000)
    server = serve([data])
    (tmp_path / 'dest').mkdir()
    for _ in range(2):
        done = run_get(server.port, 'f', '-o', tmp_path / 'dest')
        assert done.returncode == 0, done.stderr
        (tmp_path / 'dest' / 'f').unlink()
    table = json.loads(open(str(private_cache) + '.salts').read())
    assert list(table) == [wanxfer.server_origin('127.0.0.1', server.port, SECRET.encode())]
    assert len(bytes.fromhex(table[list(table)[0]])) == wanxfer.SALT_SIZE


# --- The cipher loaded before the HELLO, not between it and its answer ---------

@pytest.mark.e2e
def test_the_cipher_is_loaded_while_the_connect_travels_and_before_any_client(tmp_path, link,
                                                                             monkeypatch):
    # The first load of the AES keystream imports ctypes and tries
    # libcrypto (3-7 ms); the HELLO waits for it at the client, the
    # server's hello at the server.  The client loads it beside the connect
    # (whose round trip hides it), a server once when it starts.
    loads = []
    real = wanxfer.CounterMode.load
    monkeypatch.setattr(wanxfer.CounterMode, 'load',
                        staticmethod(lambda: loads.append(threading.current_thread().name) or real()))
    data = make_file(tmp_path / 'f', 1000)
    server = InProcessServer([data])
    try:
        assert loads == ['MainThread']          # while it starts, before any client came
        path = link(server.port, delay_ms=30, loss=0.0)
        client = wanxfer.Client('127.0.0.1', path.port, SECRET.encode())
        try:
            client.connect()
            assert 'cipher' not in [thread.name for thread in threading.enumerate()]
            listing, = client.listings(['f'])
            assert not isinstance(listing, wanxfer.RemoteError), listing
        finally:
            client.close()
    finally:
        server.stop()
    # Then the client's own: first beside the connect, then the handshake's
    # (imports done: no time), then the session's at the server, done too.
    assert loads[1] == 'cipher', loads


def test_connect_racing_has_work_done_once_the_first_syn_is_out():
    listener = socket.socket()
    listener.bind(('127.0.0.1', 0))
    listener.listen(4)
    address = listener.getsockname()
    calls = []
    try:
        sock = wanxfer.connect_racing('127.0.0.1', address[1], 5.0,
                                      meanwhile=lambda family, address: calls.append(address))
        sock.close()
    finally:
        listener.close()
    assert calls == [address]


# --- A delta from a server nothing is kept of: no round trip to the first need ---

@pytest.mark.e2e
@pytest.mark.parametrize('first', ['open fetch', 'listed'])
def test_a_file_from_a_server_nothing_is_kept_of_comes_whole_as_the_lead(tmp_path, monkeypatch, first):
    # A delta from a server none of whose files this cache keeps can find
    # nothing here but zeros: the lead, the blocks the server sends before
    # the first `need` can come, is then not cut to a 32nd of the file, and
    # a file of up to 32 leads does not wait a round trip for that need.
    # Once a file of the server is kept, the lead is a 32nd again.
    size = 4 << 20
    src = tmp_path / 'src'
    src.mkdir()
    make_file(src / 'a.bin', size, seed=1)
    make_file(src / 'b.bin', size, seed=2)
    make_file(src / 'other.bin', 1000, seed=3)
    starts = {}                                 # remote: (its `start`, block size)
    transfer = wanxfer.IncomingFile.transfer

    def spy(self, *args, **kwargs):
        starts[self.remote] = self.start, self.block_size
        return transfer(self, *args, **kwargs)
    monkeypatch.setattr(wanxfer.IncomingFile, 'transfer', spy)
    store = wanxfer.ChunkStore(str(tmp_path / 'c.db'))
    server = InProcessServer([src])
    (tmp_path / 'dest').mkdir()
    try:
        for remotes in ((['a.bin'] if first == 'open fetch' else ['a.bin', 'other.bin']), ['b.bin']):
            client = wanxfer.Client('127.0.0.1', server.port, SECRET.encode(), store=store)
            try:
                summaries = list(client.get(remotes, str(tmp_path / 'dest')))
            finally:
                client.close()
            assert all(isinstance(summary, dict) for summary in summaries), summaries
            assert [summary['delta'] for summary in summaries if summary['remote'] == remotes[0]] == ['fixed']
    finally:
        server.stop()
        store.close()
    # All of it, or what goes before the need can come (here, where the
    # round trip is nothing, a megabyte and a half) ...
    start, block_size = starts['a.bin']
    assert start['lead'] > size // wanxfer.LEAD_FRACTION // block_size
    # ... and then a 32nd.
    start, block_size = starts['b.bin']
    assert start['lead'] == max(1, size // wanxfer.LEAD_FRACTION // block_size)
