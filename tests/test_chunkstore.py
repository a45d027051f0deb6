"""The chunk store and the tunnel's codec, without sockets: chunking, the
cache file, and the encoder/decoder state machines."""

import hashlib
import os
import re
import sqlite3
import struct
import sys
import types

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import wanxfer  # noqa: E402
from wanxfer import (MAX_CHUNK, MIN_CHUNK, PIECE_CHUNK, PIECE_PART, PIECE_REF, CacheError,  # noqa: E402
                     Chunker, ChunkStore, ProtocolError, StreamDecoder, StreamEncoder,
                     cache_report, chunk_digest)


def noise(n, seed=b'x'):
    return hashlib.shake_256(seed).digest(n)


def chunks_of(data, step=65536):
    chunker = Chunker()
    out = []
    for i in range(0, len(data), step):
        out += chunker.feed(data[i:i + step])
    return out + [chunker.finish()]


def test_chunks_reassemble_and_respect_the_size_bounds():
    data = noise(3 << 20) + bytes(300000) + noise(1 << 20, seed=b'y')
    chunks = chunks_of(data)
    assert b''.join(chunks) == data
    assert all(MIN_CHUNK <= len(c) <= MAX_CHUNK for c in chunks[:-2])
    assert 12 << 10 < len(data) // len(chunks) < 40 << 10
    # A run of zeros becomes identical maximum-size chunks.
    zero_chunks = [c for c in chunks if c == bytes(MAX_CHUNK)]
    assert len(zero_chunks) >= 3


def test_cuts_do_not_depend_on_how_the_bytes_arrive():
    data = noise(2 << 20, seed=b'arrive')
    assert chunks_of(data, 65536) == chunks_of(data, 1000) == chunks_of(data, len(data))


def test_an_early_insert_moves_only_nearby_chunks():
    data = noise(4 << 20, seed=b'insert')
    edited = data[:100000] + b'a few inserted bytes' + data[100000:]
    before = set(chunk_digest(c) for c in chunks_of(data))
    after = chunks_of(edited)
    new = sum(len(c) for c in after if chunk_digest(c) not in before)
    assert new < 3 * MAX_CHUNK


@pytest.fixture
def store(tmp_path):
    lines = []
    s = ChunkStore(str(tmp_path / 'cache.db'), limit=8 << 20, log=lines.append)
    s.lines = lines
    yield s
    s.close()


def test_store_put_get_has_and_verification(store, tmp_path):
    data = noise(20000)
    digest = chunk_digest(data)
    assert not store.has(digest) and store.get(digest) is None
    store.put(digest, data)
    assert store.has(digest) and store.get(digest) == data
    store.flush()
    # Another connection (another process) sees the committed chunk ...
    other = ChunkStore(str(tmp_path / 'cache.db'))
    assert other.get(digest) == data
    # ... and when the bytes on disk go bad, they are never returned.
    db = sqlite3.connect(str(tmp_path / 'cache.db'))
    db.execute('UPDATE chunks SET data = ? WHERE digest = ?', (b'x' + data[1:], digest))
    db.commit()
    db.close()
    assert other.get(digest) is None
    assert other.damaged_chunks == 1
    assert not other.has(digest)                # the damaged entry was dropped
    other.close()


def test_store_evicts_least_recently_used_past_the_limit(store):
    digests = []
    for i in range(300):                        # 300 x 60 KB = 18 MB into an 8 MiB cache
        data = noise(60000, seed=b'%d' % i)
        digests.append(chunk_digest(data))
        store.put(digests[-1], data)
        if i % 20 == 19:
            store.flush()
    store.flush()
    report = cache_report(store.path)
    assert report['cache']['stored_bytes'] <= 8 << 20
    assert store.has(digests[-1]) and not store.has(digests[0])


class ClockedStore(ChunkStore):
    """A store whose clock (milliseconds, as ChunkStore._clock) the test sets."""

    now = 1_700_000_000_000

    def _clock(self):
        return self.now


def test_store_evicts_the_least_recently_used_not_the_oldest(tmp_path):
    # Eviction takes chunks in batches: far more chunks than a batch, so
    # that which ones go is decided by their last use.
    size, limit = 4096, 2 << 20
    store = ClockedStore(str(tmp_path / 'cache.db'), limit=limit)
    old = []
    for i in range(400):
        data = noise(size, seed=b'old %d' % i)
        old.append(chunk_digest(data))
        store.put(old[-1], data)
    store.flush()
    store.now += 2 * wanxfer.CACHE_TOUCH_GRANULARITY * 1000
    assert store.get(old[0]) is not None        # used again, much later than the rest
    assert store.has(old[1])
    store.flush()
    new = []
    for i in range(300):                        # past the limit: eviction
        data = noise(size, seed=b'new %d' % i)
        new.append(chunk_digest(data))
        store.put(new[-1], data)
    store.flush()
    assert cache_report(store.path)['cache']['stored_bytes'] <= limit
    kept_old = [d for d in old[2:] if store.has(d)]
    assert len(kept_old) < len(old) - 2 - 200   # most of the unused old ones went
    assert store.has(old[0]) and store.has(old[1])
    assert all(store.has(d) for d in new)
    store.close()


def test_store_starts_a_new_file_when_its_file_is_replaced(tmp_path):
    path = str(tmp_path / 'cache.db')
    lines = []
    store = ChunkStore(path, log=lines.append)
    first = noise(5000, seed=b'first')
    store.put(chunk_digest(first), first)
    store.flush()
    for suffix in ('', '-wal', '-shm'):         # an operator's rm, under the running store
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    store.check_file()
    assert any('was removed or replaced; starting a new one' in line for line in lines), lines
    assert os.path.exists(path)
    second = noise(5000, seed=b'second')
    store.put(chunk_digest(second), second)
    store.flush()
    other = ChunkStore(path)                    # what is written goes to the new file
    assert other.get(chunk_digest(second)) == second and not other.has(chunk_digest(first))
    other.close()
    store.close()


def test_store_moves_a_damaged_file_aside(tmp_path):
    path = tmp_path / 'cache.db'
    path.write_bytes(b'garbage' * 1000)
    lines = []
    store = ChunkStore(str(path), log=lines.append)
    store.put(chunk_digest(b'z' * 1000), b'z' * 1000)
    store.close()
    assert any('was damaged' in line for line in lines)
    assert any(name.startswith('cache.db.corrupt-') for name in os.listdir(str(tmp_path)))


def test_store_refuses_another_programs_database(tmp_path):
    path = tmp_path / 'theirs.db'
    db = sqlite3.connect(str(path))
    db.execute('CREATE TABLE t (x)')
    db.commit()
    db.close()
    with pytest.raises(CacheError, match='not a wanxfer cache'):
        ChunkStore(str(path))


def test_stats_counters_add_up_across_runs(store):
    store.save_run('run1', 'peer', 1.0, {'tunnel-out': (1, 1000, 100), 'tunnel-in': (1, 50, 60)})
    store.save_run('run1', 'peer', 1.0, {'tunnel-out': (2, 3000, 200), 'tunnel-in': (2, 50, 70)})
    store.end_run('run1')
    store.save_run('run2', 'listen', 2.0, {'tunnel-out': (1, 500, 500), 'tunnel-in': (1, 0, 10)})
    life = cache_report(store.path)['life']
    assert life['tunnel-out'] == {'connections': 3, 'original_bytes': 3500, 'transferred_bytes': 700,
                                  'saved_bytes': 2800, 'saving_percent': 80.0}
    assert life['total']['original_bytes'] == 3550
    running = cache_report(store.path)['running']
    assert [r['role'] for r in running] == ['listen']


def literal_pieces(pieces):
    """Pieces as a receiver gets them (literals as bytes)."""
    return [(kind, length, digest, literal) for kind, length, digest, literal in pieces]


def test_encoder_sends_references_for_what_the_store_holds(store):
    data = noise(1 << 20, seed=b'enc')
    first, refs = StreamEncoder(store).encode(data, final=True)
    assert refs == [] and all(kind == PIECE_CHUNK for kind, _, _, _ in first)
    second, refs = StreamEncoder(store).encode(data, final=True)
    assert [kind for kind, _, _, _ in second] == [PIECE_REF] * len(second)
    assert b''.join(chunk for _, chunk in refs) == data


def test_decoder_asks_for_what_it_cannot_resolve(tmp_path):
    sender = ChunkStore(str(tmp_path / 'sender.db'))
    receiver = ChunkStore(str(tmp_path / 'receiver.db'))
    data = noise(300000, seed=b'dec')
    StreamEncoder(sender).encode(data, final=True)           # the sender has seen it before
    pieces, refs = StreamEncoder(sender).encode(data, final=True)
    decoder = StreamDecoder(receiver)
    assert decoder.feed(literal_pieces(pieces)) == len(data)
    out = []
    held = dict(refs)
    while True:
        got, wanted = decoder.take()
        out += got
        if wanted is None:
            break
        decoder.supply(wanted, held[wanted])                  # MSG_CHUNK_REQUEST answered
    assert b''.join(bytes(o) for o in out) == data
    # Now the receiver holds the chunks: the same references resolve locally.
    decoder = StreamDecoder(receiver)
    decoder.feed(literal_pieces(pieces))
    got, wanted = decoder.take()
    assert wanted is None and b''.join(bytes(o) for o in got) == data
    # A chunk from the sender that does not match its digest is refused.
    decoder = StreamDecoder(receiver)
    decoder.wanted = refs[0][0]
    with pytest.raises(ProtocolError):
        decoder.supply(refs[0][0], b'not the chunk')
    sender.close()
    receiver.close()


def test_a_partial_chunk_sent_early_can_still_end_as_a_reference(store):
    data = noise(100000, seed=b'part')
    StreamEncoder(store).encode(data, final=True)           # every chunk is known
    encoder = StreamEncoder(store)
    early, _ = encoder.encode(data[:1000], flush=True)       # an interactive write: sent at once
    assert [kind for kind, _, _, _ in early] == [PIECE_PART]
    rest, refs = encoder.encode(data[1000:], final=True)
    assert rest[0][0] == PIECE_REF and rest[0][1] > 1000     # the chunk it opened, by reference
    decoder = StreamDecoder(store)
    decoder.feed(literal_pieces(early + rest))
    got, wanted = decoder.take()
    assert wanted is None and b''.join(bytes(o) for o in got) == data


def test_a_reference_is_delivered_only_where_it_fits_what_came_before(store):
    # A reference names a whole chunk: what this side holds under that
    # digest is delivered only if it has that length and begins with the
    # bytes of it already delivered; otherwise the sender is asked.
    data = noise(20000, seed=b'fits')
    digest = chunk_digest(data)
    store.put(digest, data)
    decoder = StreamDecoder(store)
    decoder.feed([(PIECE_REF, len(data) + 1, digest, None)])
    assert decoder.take() == ([], digest)
    decoder = StreamDecoder(store)
    decoder.feed([(PIECE_PART, 100, None, b'y' * 100), (PIECE_REF, len(data), digest, None)])
    got, wanted = decoder.take()
    assert b''.join(bytes(g) for g in got) == b'y' * 100 and wanted == digest
    decoder.supply(digest, data)                # the sender's own copy does not fit either
    with pytest.raises(ProtocolError):
        decoder.take()


IMMUTABLE = (int, float, complex, str, bytes, type(None), range, struct.Struct, type(re.compile('')))


def mutable_parts(name, value):
    """The names under `name` whose value could be changed in place."""
    if isinstance(value, IMMUTABLE):
        return []
    if isinstance(value, (tuple, frozenset)):
        return [part for i, item in enumerate(value) for part in mutable_parts('%s[%d]' % (name, i), item)]
    if isinstance(value, types.MappingProxyType):
        return [part for key, item in value.items() for part in mutable_parts('%s[%r]' % (name, key), item)]
    return ['%s (%s)' % (name, type(value).__name__)]


def test_module_has_no_mutable_state_at_import():
    # Module globals and class attributes are shared by every session,
    # tunnel and test in a process: constants only.
    found = []
    for name, value in vars(wanxfer).items():
        if name.startswith('__') or isinstance(value, (types.ModuleType, types.FunctionType,
                                                       types.BuiltinFunctionType)):
            continue
        if not isinstance(value, type):
            found += mutable_parts(name, value)
        elif value.__module__ == wanxfer.__name__:
            for attribute, item in vars(value).items():
                if attribute.startswith('__') or isinstance(item, (
                        types.FunctionType, staticmethod, classmethod, property,
                        types.MemberDescriptorType)):    # __slots__: per instance
                    continue
                found += mutable_parts('%s.%s' % (name, attribute), item)
    assert found == []
    assert isinstance(wanxfer.CUT_SYMBOLS, bytes) and len(set(wanxfer.CUT_SYMBOLS)) == 4
