"""Delta transfers as an operator meets them: fetch a file, change it on the
server (or delete the local copy), fetch again, and check that the bytes are
right and that only what was missing crossed the network."""

import hashlib
import json
import os
import random
import sqlite3
import subprocess
import sys
import threading

import pytest

from helpers import (WANXFER, json_summaries, make_file, run_get, sha256, sql_like, wait_for, wanxfer,
                     wanxfer_env)

MiB = 1024 * 1024


def fetch(port, remote, out, *extra):
    """One `get --json`; returns its summary after checking it succeeded
    without falling back to a full refetch (which would hide a wrong fill)."""
    done = run_get(port, remote, '-o', out, '--json', *extra)
    assert done.returncode == 0, done.stderr
    assert 'mismatch' not in done.stderr and 'Traceback' not in done.stderr, done.stderr
    (summary,) = json_summaries(done)
    return summary


def edited(data, seed, edits=20):
    """`data` after scattered inserts, deletes and rewrites (shifting what follows)."""
    rng = random.Random(seed)
    out = bytearray(data)
    for _ in range(edits):
        at = rng.randrange(len(out) - 100)
        kind = rng.choice(('insert', 'delete', 'rewrite'))
        if kind == 'insert':
            out[at:at] = b'INSERT %d;' % rng.randrange(10 ** 6)
        elif kind == 'delete':
            del out[at:at + rng.randrange(1, 80)]
        else:
            out[at:at + 20] = b'UPDATE %012d;' % rng.randrange(10 ** 12)
    return bytes(out)


@pytest.mark.e2e
def test_update_of_an_older_copy_sends_only_the_changes(tmp_path, serve):
    src = tmp_path / 'src'
    src.mkdir()
    old = sql_like(6 * MiB, seed=1)
    (src / 'dump.sql').write_bytes(old)
    server = serve([src])
    out = tmp_path / 'dump.sql'
    first = fetch(server.port, 'dump.sql', out)
    # Nothing local yet: all of it came from the server (compressed or not,
    # as the sender's CPU allowed, so its wire bytes are no measure).
    assert first['delta'] == 'fixed' and first['local_bytes'] == 0
    assert first['file_bytes'] == len(old) and first['resumed_bytes'] == 0

    new = edited(old, seed=2, edits=10)
    (src / 'dump.sql').write_bytes(new)
    second = fetch(server.port, 'dump.sql', out)
    assert out.read_bytes() == new
    assert second['delta'] == 'fixed+cdc'        # the fixed spans missed: data had shifted
    assert second['local_bytes'] > 0.8 * len(new)
    assert second['wire_bytes'] < 0.2 * len(new)
    assert second['sent_bytes'] < 0.25 * len(new)
    assert second['saving_percent'] > 75


@pytest.mark.e2e
def test_appended_file_after_the_copy_was_deleted_comes_from_the_cache(tmp_path, serve):
    src = tmp_path / 'src'
    src.mkdir()
    archive = make_file(src / 'backup.tar', 8 * MiB, seed=3)
    server = serve([src])
    out = tmp_path / 'backup.tar'
    fetch(server.port, 'backup.tar', out)
    with open(archive, 'ab') as f:
        f.write(os.urandom(300_000))
    out.unlink()                                # the user deleted the copy; the cache kept it
    again = fetch(server.port, 'backup.tar', out)
    assert sha256(out) == sha256(archive)
    assert again['local_bytes'] >= 8 * MiB - 128 * 1024
    assert again['wire_bytes'] < 600_000


@pytest.mark.e2e
def test_a_new_name_for_data_seen_before_costs_at_most_the_lead(tmp_path, serve, link):
    # The same bytes under a name this machine never fetched: the server
    # sends the file's first blocks unasked (the lead, at most a 32nd of
    # it) while the client finds the rest among the data it already holds.
    src = tmp_path / 'src'
    src.mkdir()
    data = make_file(src / 'monday.bin', 8 * MiB)
    server = serve([src])
    path = link(server.port, delay_ms=20, mtu=1500)
    fetch(path.port, 'monday.bin', tmp_path / 'monday.bin')
    os.link(str(data), str(src / 'tuesday.bin'))
    again = fetch(path.port, 'tuesday.bin', tmp_path / 'tuesday.bin')
    assert sha256(tmp_path / 'tuesday.bin') == sha256(data)
    lead = 8 * MiB // wanxfer.LEAD_FRACTION
    assert again['local_bytes'] >= 8 * MiB - lead
    # Blocks plus their headers: those of the lead that reached the client
    # by the time it held the file (it counts what it received).
    assert 0 <= again['wire_bytes'] <= lead * 1.1


@pytest.mark.e2e
def test_deleted_cache_means_a_full_transfer_still_correct(tmp_path, serve, private_cache):
    data = make_file(tmp_path / 'f.bin', 4 * MiB, seed=4)
    server = serve([data])
    fetch(server.port, 'f.bin', tmp_path / 'a')
    (tmp_path / 'a').unlink()
    for suffix in ('', '-wal', '-shm'):
        if os.path.exists(str(private_cache) + suffix):
            os.unlink(str(private_cache) + suffix)
    again = fetch(server.port, 'f.bin', tmp_path / 'a')
    assert sha256(tmp_path / 'a') == sha256(data)
    assert again['local_bytes'] == 0 and again['wire_bytes'] >= 4 * MiB


@pytest.mark.e2e
def test_corrupt_cache_is_moved_aside_and_the_transfer_is_full_and_correct(tmp_path, serve,
                                                                          private_cache):
    data = make_file(tmp_path / 'f.bin', 4 * MiB, seed=5)
    server = serve([data])
    fetch(server.port, 'f.bin', tmp_path / 'a')
    (tmp_path / 'a').unlink()
    with open(private_cache, 'r+b') as f:      # scribble over the database's pages
        f.seek(100)
        f.write(os.urandom(64 * 1024))
    done = run_get(server.port, 'f.bin', '-o', tmp_path / 'a', '--json')
    assert done.returncode == 0, done.stderr
    assert 'Traceback' not in done.stderr
    assert sha256(tmp_path / 'a') == sha256(data)
    (summary,) = json_summaries(done)
    assert summary['local_bytes'] == 0
    assert 'damaged' in done.stderr or 'malformed' in done.stderr or 'not a database' in done.stderr
    # The damaged cache and the files it kept were moved aside together.
    directory = os.path.dirname(str(private_cache))
    (aside,) = [name for name in os.listdir(directory)
                if name.startswith('cache.db.corrupt-') and not name.endswith(('.files', '-wal', '-shm'))]
    assert os.path.getsize(os.path.join(directory, aside)) > 64 * 1024
    assert len(os.listdir(os.path.join(directory, aside + '.files'))) == 1
    assert os.path.isfile(str(private_cache))


@pytest.mark.e2e
def test_a_kept_file_whose_bytes_changed_is_never_used(tmp_path, serve):
    data = make_file(tmp_path / 'f.bin', 4 * MiB, seed=6)
    server = serve([data])
    out = tmp_path / 'a'
    fetch(server.port, 'f.bin', out)
    # The kept copy is a hard link: change its bytes in place behind the
    # cache's back, keeping size and mtime so only the digests can tell.
    before = os.stat(out)
    with open(out, 'r+b') as f:
        f.seek(2 * MiB)
        f.write(b'\xff' * 4096)
    os.utime(out, ns=(before.st_atime_ns, before.st_mtime_ns))
    other = tmp_path / 'b'
    again = fetch(server.port, 'f.bin', other)
    assert sha256(other) == sha256(data)
    assert again['local_bytes'] < 4 * MiB          # the damaged span was fetched
    assert again['wire_bytes'] > 0


@pytest.mark.e2e
def test_a_span_that_fails_its_check_after_later_blocks_were_asked_for_still_comes(tmp_path, serve):
    # The client asks for a piece's missing blocks (here: what was appended,
    # at the end) before it reads the piece's local spans; one of those then
    # fails its check, below blocks already asked for, and must still come.
    src = tmp_path / 'src'
    src.mkdir()
    data = make_file(src / 'f.bin', 4 * MiB, seed=7)
    server = serve([src])
    out = tmp_path / 'a'
    fetch(server.port, 'f.bin', out)
    before = os.stat(out)
    with open(out, 'r+b') as f:                 # the kept copy, damaged behind the cache's back
        f.seek(MiB)
        f.write(b'\xff' * 4096)
    os.utime(out, ns=(before.st_atime_ns, before.st_mtime_ns))
    with open(data, 'ab') as f:
        f.write(os.urandom(300_000))
    other = tmp_path / 'b'
    again = fetch(server.port, 'f.bin', other, '--timeout', '10')
    assert sha256(other) == sha256(data)
    assert again['local_bytes'] == 4 * MiB - wanxfer.DELTA_UNIT
    assert 300_000 + wanxfer.DELTA_UNIT <= again['received_bytes'] < 600_000


@pytest.mark.e2e
def test_all_zero_and_sparse_files_cost_nothing_and_stay_sparse(tmp_path, serve):
    src = tmp_path / 'src'
    src.mkdir()
    with open(src / 'zeros', 'wb') as f:
        f.write(bytes(16 * MiB))
    with open(src / 'sparse', 'wb') as f:      # a hole, 1 MiB of data, a hole
        f.truncate(32 * MiB)
        f.seek(10 * MiB)
        f.write(os.urandom(MiB))
    server = serve([src])
    zeros = fetch(server.port, 'zeros', tmp_path / 'zeros')
    sparse = fetch(server.port, 'sparse', tmp_path / 'sparse')
    assert (tmp_path / 'zeros').read_bytes() == bytes(16 * MiB)
    assert sha256(tmp_path / 'sparse') == sha256(src / 'sparse')
    assert zeros['wire_bytes'] == 0 and zeros['zero_bytes'] == 16 * MiB
    assert sparse['zero_bytes'] >= 30 * MiB and sparse['wire_bytes'] < 2 * MiB
    assert os.stat(tmp_path / 'zeros').st_blocks * 512 < MiB
    assert os.stat(tmp_path / 'sparse').st_blocks * 512 < 3 * MiB


@pytest.mark.e2e
def test_no_delta_sends_every_byte(tmp_path, serve):
    data = make_file(tmp_path / 'f.bin', 4 * MiB, seed=7)
    server = serve([data])
    fetch(server.port, 'f.bin', tmp_path / 'a')
    plain = fetch(server.port, 'f.bin', tmp_path / 'a', '--no-delta')
    assert sha256(tmp_path / 'a') == sha256(data)
    assert plain['delta'] == 'off' and plain['local_bytes'] == 0
    assert plain['wire_bytes'] >= 4 * MiB


def held_from(state_path, offset):
    """Bytes a .wxstate file records as written from `offset` on."""
    found = wanxfer.PartialFile.recorded(str(state_path))
    if found is None:
        return 0
    identity, bitmap = found
    block = identity['block_size']
    first = (offset + block - 1) // block
    return block * sum(1 for b in range(first, 8 * len(bitmap)) if bitmap[b >> 3] >> (b & 7) & 1)


@pytest.mark.e2e
def test_resume_of_a_delta_transfer_after_kill(tmp_path, serve):
    src = tmp_path / 'src'
    src.mkdir()
    old = sql_like(6 * MiB, seed=8)
    (src / 'dump.sql').write_bytes(old)
    server = serve([src])
    out = tmp_path / 'dump.sql'
    fetch(server.port, 'dump.sql', out)
    tail = 3 * MiB
    new = edited(old, seed=9, edits=3) + os.urandom(tail)   # mostly new data at the end
    (src / 'dump.sql').write_bytes(new)
    state = tmp_path / '.dump.sql.wxstate'
    # Slowed by its own --rate (about 6 s for the new data), killed once a
    # good part of what only the wire can bring is safely written.
    first = subprocess.Popen([sys.executable, WANXFER, 'get', '127.0.0.1:%d' % server.port,
                              'dump.sql', '-o', str(out), '--rate', '4M'], env=wanxfer_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: held_from(state, len(new) - tail) >= tail // 6, what='new data in the partial state')
    assert first.poll() is None                 # killed mid-transfer, not after
    first.kill()
    first.wait()
    held = held_from(state, len(new) - tail)
    assert out.read_bytes() == old              # the older copy is untouched until the end
    done = fetch(server.port, 'dump.sql', out)
    assert out.read_bytes() == new
    assert done['resumed_bytes'] >= held
    # What was written before the kill does not cross again.
    assert done['wire_bytes'] <= (tail - held) * 1.1 + 64 * 1024     # headers: 5% of 1430-byte blocks


@pytest.mark.e2e
def test_stats_count_get_transfers(tmp_path, serve, private_cache):
    data = make_file(tmp_path / 'f.bin', 2 * MiB, seed=10)
    server = serve([data])
    first = fetch(server.port, 'f.bin', tmp_path / 'a')
    (tmp_path / 'a').unlink()
    second = fetch(server.port, 'f.bin', tmp_path / 'a')
    report = subprocess.run([sys.executable, WANXFER, 'stats', '--json'], env=wanxfer_env(),
                            capture_output=True, text=True, timeout=30)
    assert report.returncode == 0, report.stderr
    life = json.loads(report.stdout)['life']['get']
    assert life['connections'] == 2
    assert life['original_bytes'] == 4 * MiB
    assert life['transferred_bytes'] == first['sent_bytes'] + second['sent_bytes']
    human = subprocess.run([sys.executable, WANXFER, 'stats'], env=wanxfer_env(),
                           capture_output=True, text=True, timeout=30)
    assert human.returncode == 0, human.stderr
    rows = [line.split() for line in human.stdout.splitlines()]
    assert ['get', '2'] + wanxfer.human_bytes(4 * MiB).split() in [row[:4] for row in rows], human.stdout


def test_assembler_reports_only_blocks_wholly_in_place(tmp_path):
    """Block edges rarely meet span edges: a block half covered by local data
    must still come from the server."""
    store = wanxfer.ChunkStore(str(tmp_path / 'c.db'))
    basis = tmp_path / 'basis'
    payload = os.urandom(100_000)
    basis.write_bytes(payload)
    # spans: [0, 30000) known, [30000, 50000) unknown, [50000, 100000) zeros
    known = wanxfer.span_digest(payload[:30000])
    store.keep_file(str(basis), 'basis', 'fixed', [(0, 30000, known)], link=False, origin='here')
    partial = wanxfer.PartialFile(str(tmp_path / 'out'), 'r', 100_000, 0, 10_000)
    partial.open()
    assembler = wanxfer.LocalAssembler(store, partial, origin='here')
    held, decided, refine = assembler.on_piece(0, [(30000, known), (20000, b'\x01' * 16)])
    assert held == [(0, 3)] and decided == 5 and refine is None
    held, decided, refine = assembler.on_piece(50000, [(50000, wanxfer.ZERO_SPAN)])
    assert held == [(5, 10)] and decided == 10
    assert assembler.local_bytes == 30000 and assembler.zero_bytes == 50000
    with pytest.raises(wanxfer.ProtocolError):
        assembler.on_piece(0, [(1, known)])
    assembler.close()
    partial.close()
    with open(partial.data_path, 'rb') as f:
        assert f.read(30000) == payload[:30000]
    store.close()


def assemble_from_basis(tmp_path, basis_bytes, changed=None, block_size=1430, lead=0, sender=None):
    """Keep a file holding `basis_bytes` (for origin 'here'), optionally
    overwrite bytes of it in place afterwards (`changed`: (offset, bytes),
    size and mtime kept), then build a fresh file of the content of
    tmp_path/basis-signed from its fixed signature: (assembler, held
    ranges, the bytes built).  With `sender` (the signed bytes), the blocks
    asked for early arrive at once, as if the sender were that fast."""
    store = wanxfer.ChunkStore(str(tmp_path / 'c.db'))
    basis = tmp_path / 'basis'
    basis.write_bytes(basis_bytes)
    store.keep_file(str(basis), 'basis', 'fixed', wanxfer.signature_spans(str(basis), 'fixed'),
                    link=False, origin='here')
    if changed is not None:
        before = os.stat(basis)
        with open(basis, 'r+b') as f:
            f.seek(changed[0])
            f.write(changed[1])
        os.utime(basis, ns=(before.st_atime_ns, before.st_mtime_ns))
    size = len(basis_bytes)
    partial = wanxfer.PartialFile(str(tmp_path / 'out'), 'r', size, 0, block_size)
    partial.open()
    assembler = wanxfer.LocalAssembler(store, partial, origin='here', lead=lead)
    if sender is not None:
        decided = [0]

        def arrive(planned, now_decided):
            asked = wanxfer.subtract_ranges([(decided[0], now_decided)], planned)
            for start, end in asked:
                partial.write(start * block_size, sender[start * block_size:end * block_size])
            decided[0] = now_decided
        assembler.on_planned = arrive
    held = []
    for offset, spans in wanxfer.file_signature(str(tmp_path / 'basis-signed'), 'fixed'):
        held += assembler.on_piece(offset, spans)[0]
    assembler.close()
    partial.close()
    store.close()
    return assembler, held, open(partial.data_path, 'rb').read()


def clone_calls(monkeypatch, fail=None):
    """Record clone_range calls; each shares nothing but copies, as a
    filesystem that shares extents would appear to (or fails with errno
    `fail`, as one that cannot does)."""
    calls = []

    def clone(source_fd, source_offset, length, fd, offset):
        calls.append((source_offset, length, offset))
        if fail is not None:
            raise OSError(fail, os.strerror(fail))
        os.pwrite(fd, os.pread(source_fd, length, source_offset), offset)
    monkeypatch.setattr(wanxfer, 'clone_range', clone)
    return calls


@pytest.mark.parametrize('fail', [None, wanxfer.errno.EOPNOTSUPP, wanxfer.errno.EXDEV,
                                  wanxfer.errno.EINVAL])
def test_assembler_shares_extents_where_it_can_else_reads_and_writes(tmp_path, monkeypatch, fail):
    payload = os.urandom(1 * MiB + 12345)
    (tmp_path / 'basis-signed').write_bytes(payload)
    calls = clone_calls(monkeypatch, fail)
    assembler, held, built = assemble_from_basis(tmp_path, payload)
    assert built == payload
    assert held == [(0, -(-len(payload) // 1430))]
    assert assembler.local_bytes == len(payload)
    # Shared where it can be (the short last span is read and written);
    # after one refusal, read and written.
    assert len(payload) % wanxfer.DELTA_UNIT < wanxfer.MIN_COPY
    assert len(calls) == (1 if fail else len(payload) // wanxfer.DELTA_UNIT)
    assert all(start % wanxfer.COPY_ALIGN == 0 and length % wanxfer.COPY_ALIGN == 0
               for start, length, _offset in calls)


def test_extents_are_shared_for_real_where_the_filesystem_can(tmp_path):
    """On this machine's filesystem: shared (XFS, btrfs) or refused (ext4,
    tmpfs), and the file right either way."""
    payload = os.urandom(2 * MiB)
    (tmp_path / 'basis-signed').write_bytes(payload)
    assembler, _held, built = assemble_from_basis(tmp_path, payload)
    assert built == payload and assembler.local_bytes == len(payload)


@pytest.mark.parametrize('shared', [True, False])
@pytest.mark.parametrize('block_size', [1430, 4096, 65536])
def test_a_span_whose_kept_bytes_changed_is_not_used_shared_or_read(tmp_path, monkeypatch,
                                                                    block_size, shared):
    """The kept copy changed in place (size and mtime as recorded): its
    bytes may land in the new file before their check (shared extents),
    but the span is not used, and no block it touches is reported held."""
    if shared:
        clone_calls(monkeypatch)
    payload = os.urandom(1 * MiB)
    (tmp_path / 'basis-signed').write_bytes(payload)
    unit = wanxfer.DELTA_UNIT
    assembler, held, built = assemble_from_basis(tmp_path, payload, (5 * unit + 100, b'\xff' * 10),
                                                 block_size)
    assert assembler.local_bytes == len(payload) - unit
    touched = set(range(5 * unit // block_size, -(-6 * unit // block_size)))
    nblocks = -(-len(payload) // block_size)
    assert sum(end - start for start, end in held) == nblocks - len(touched)
    for start, end in held:
        assert not touched & set(range(start, end))
        assert built[start * block_size:end * block_size] == payload[start * block_size:end * block_size]


def test_a_clone_never_lands_on_a_block_the_sender_may_be_writing(tmp_path, monkeypatch):
    """A block shared by a span found locally and one that is not is asked
    for before the local span is read: the span's extents, should they
    fail its check, must not have landed on the block."""
    calls = clone_calls(monkeypatch)
    payload = os.urandom(256 * 1024)
    unit = wanxfer.DELTA_UNIT
    signed = os.urandom(unit) + payload[unit:]      # the first span is nowhere here
    (tmp_path / 'basis-signed').write_bytes(signed)
    block = 5000                                    # block 13 holds bytes of spans 0 and 1
    _assembler, held, built = assemble_from_basis(tmp_path, payload, (unit + 100, b'\xff' * 10),
                                                  block, sender=signed)
    shared = unit // block
    assert calls
    assert all(not start <= shared < end for start, end in held)
    assert built[shared * block:(shared + 1) * block] == signed[shared * block:(shared + 1) * block]


def test_assembler_shares_no_extent_into_the_lead(tmp_path, monkeypatch):
    """Blocks of the lead come from the sender unasked: extents checked
    after they landed must not go where those may already be."""
    payload = os.urandom(512 * 1024)
    (tmp_path / 'basis-signed').write_bytes(payload)
    calls = clone_calls(monkeypatch)
    lead = 200
    _assembler, _held, built = assemble_from_basis(tmp_path, payload, lead=lead)
    assert built == payload
    assert calls and min(offset for _source, _length, offset in calls) >= lead * 1430


def test_no_hashing_thread_outlives_its_signature(tmp_path, monkeypatch):
    """A signature hashes on threads of its own (Workers): they end with
    it, whether it completes or its fetch gives it up half way."""
    monkeypatch.setattr(wanxfer, 'hash_threads', lambda: 3)
    path = make_file(tmp_path / 'f', 3 * MiB)
    expected = wanxfer.signature_spans(str(path), 'fixed')
    gate = threading.Event()
    real = wanxfer.unit_spans

    def gated(*args):
        gate.wait(10)
        return real(*args)
    monkeypatch.setattr(wanxfer, 'unit_spans', gated)
    cache = wanxfer.SignatureCache()
    hashing = lambda: [t for t in threading.enumerate() if t.name == 'hash']     # noqa: E731
    given_up = cache.start(str(path), 'a')
    wait_for(lambda: len(hashing()) == 3, what='the hashing threads')     # 2 for units, 1 whole
    cache.release(given_up)                     # its fetch ends: stop
    gate.set()
    assert given_up.done.wait(10) and given_up.error is not None
    wait_for(lambda: not hashing(), what='the hashing threads to end')
    done = cache.start(str(path), 'b')
    assert done.sha256() == sha256(path)
    assert [span for _offset, encoded in done.pieces for span in wanxfer.decode_spans(encoded)] == \
        [(length, digest) for _offset, length, digest in expected]
    wait_for(lambda: not hashing(), what='the hashing threads to end')
    cache.release(done)


def test_the_file_digest_takes_offered_bytes_instead_of_reading_them_back(tmp_path):
    """A delta's local spans, checked and written, are offered to the
    running digest, which hashes them from memory (here they differ from
    the file, which shows it); the rest, and what is offered past its
    limit or behind it, is read from the file."""
    block, size = 4096, 300 * 4096 - 100
    on_disk = os.urandom(size)
    offered = bytearray(on_disk)
    offered[5000:75000] = os.urandom(70000)     # not what the file holds: only memory has it
    path = tmp_path / 'partial'
    path.write_bytes(on_disk)
    bitmap = bytearray(-(-size // block) // 8 + 1)
    frontier = wanxfer.FrontierDigest(str(path), size, block, lambda: bytes(bitmap))
    frontier.OFFERED_LIMIT = 200_000
    frontier.offer(75000, bytes(offered[75000:140000]))     # out of order, unaligned
    frontier.offer(5000, bytes(offered[5000:75000]))
    frontier.offer(0, bytes(offered[0:5000]))
    frontier.offer(600_000, bytes(300_000))                 # past the limit: dropped
    wanxfer.set_bits(bitmap, 0, 10)
    wait_for(lambda: frontier._hashed >= 140000, what='the digest to take the offers')
    wanxfer.set_bits(bitmap, 0, 300)
    assert frontier.finish() == hashlib.sha256(bytes(offered)).hexdigest()


def test_assembler_writes_nothing_to_the_cache_during_the_data_phase(tmp_path):
    """A kept file that changed is forgotten after the data phase: the
    forgetting is a cache write, and another process holding the cache's
    write lock (as a `get` keeping a huge file does) must not hold up the
    reading of datagrams for the busy timeout."""
    store = wanxfer.ChunkStore(str(tmp_path / 'c.db'))
    basis = tmp_path / 'basis'
    payload = os.urandom(100_000)
    basis.write_bytes(payload)
    known = wanxfer.span_digest(payload[:30000])
    store.keep_file(str(basis), 'basis', 'fixed', [(0, 30000, known)], link=False, origin='here')
    basis.write_bytes(payload + b'changed since')
    partial = wanxfer.PartialFile(str(tmp_path / 'out'), 'r', 100_000, 0, 10_000)
    partial.open()
    assembler = wanxfer.LocalAssembler(store, partial, origin='here')
    locker = sqlite3.connect(str(tmp_path / 'c.db'), isolation_level=None)
    locker.execute('BEGIN EXCLUSIVE')
    answers, done = [], threading.Event()

    def apply():
        answers.append(assembler.on_piece(0, [(30000, known), (70000, b'\x01' * 16)]))
        done.set()
    threading.Thread(target=apply, daemon=True).start()
    try:
        # Writing on the spot waits out the busy timeout (10 s), then fails.
        assert done.wait(8), 'the assembler waited for the cache lock'
    finally:
        locker.execute('ROLLBACK')
        locker.close()
    assert answers == [([], 10, None)]              # nothing held: the kept file changed
    assert store.kept_files_for('basis', 'here')            # not forgotten yet ...
    assembler.close()
    assert store.kept_files_for('basis', 'here') == []      # ... but at the end of the data phase
    partial.close()
    store.close()


def test_assembler_asks_for_finer_spans_where_fixed_ones_miss(tmp_path):
    """With an older copy at hand, a piece whose fixed spans mostly miss is
    held back until its content-defined spans arrive; later pieces wait."""
    store = wanxfer.ChunkStore(str(tmp_path / 'c.db'))
    size = 4 * MiB
    partial = wanxfer.PartialFile(str(tmp_path / 'out'), 'r', size, 0, 8192)
    partial.open()
    assembler = wanxfer.LocalAssembler(store, partial, refine=True, origin='here')
    unit = wanxfer.DELTA_UNIT
    first = [(unit, os.urandom(16)) for _ in range(2 * MiB // unit)]
    held, decided, refine = assembler.on_piece(0, first)
    assert refine == (0, 2 * MiB) and decided == 0 and held == []
    second = [(unit, wanxfer.ZERO_SPAN) for _ in range(2 * MiB // unit)]
    assert assembler.on_piece(2 * MiB, second) == ([], 0, None)   # waits its turn
    # The refinement: a zero stretch, then data nobody has.
    held, decided, refine = assembler.on_piece(0, [(MiB, wanxfer.ZERO_SPAN), (MiB, os.urandom(16))],
                                               refined=True)
    assert refine is None and decided == size // 8192
    assert held == [(0, MiB // 8192), (2 * MiB // 8192, size // 8192)]
    with pytest.raises(wanxfer.ProtocolError):
        assembler.on_piece(0, [(1, wanxfer.ZERO_SPAN)], refined=True)
    assembler.close()
    partial.close()
    store.close()


@pytest.mark.e2e
def test_text_is_sent_compressed_when_the_link_is_the_limit(tmp_path, serve, link):
    src = tmp_path / 'src'
    src.mkdir()
    text = sql_like(3 * MiB, seed=11)
    (src / 'dump.sql').write_bytes(text)
    make_file(src / 'random.bin', 2 * MiB, seed=12)
    server = serve([src])
    path = link(server.port, delay_ms=5, rate_bps=20e6)      # a thin link: the sender waits on it,
                                                            # even on a machine busy with other tests
    compressed = fetch(path.port, 'dump.sql', tmp_path / 'dump.sql')
    assert (tmp_path / 'dump.sql').read_bytes() == text
    assert compressed['packets_compressed'] > 0.5 * compressed['packets_sent']
    assert compressed['wire_bytes'] < 0.75 * len(text)
    incompressible = fetch(path.port, 'random.bin', tmp_path / 'random.bin')
    assert sha256(tmp_path / 'random.bin') == sha256(src / 'random.bin')
    assert incompressible['packets_compressed'] == 0
    plain = fetch(path.port, 'dump.sql', tmp_path / 'plain.sql', '--no-delta')
    assert (tmp_path / 'plain.sql').read_bytes() == text
    assert plain['packets_compressed'] == 0 and plain['wire_bytes'] >= len(text)


@pytest.mark.e2e
def test_a_restarted_server_reuses_the_signature_it_stored(tmp_path, serve, private_cache):
    data = make_file(tmp_path / 'f.bin', 4 * MiB, seed=13)
    server = serve([data])
    fetch(server.port, 'f.bin', tmp_path / 'a')
    server.stop()
    # Spoil the first span of the stored signature: a server that uses the
    # stored signature makes the client fetch that span; one that read the
    # file again would let it be found locally.
    db = wanxfer.open_cache_db(str(private_cache), create=False)
    (key, pieces), = db.execute('SELECT file, pieces FROM signatures').fetchall()
    pieces = json.loads(pieces)
    spans = wanxfer.decode_spans(pieces[0][1])
    spans[0] = (spans[0][0], os.urandom(16))
    pieces[0][1] = wanxfer.encode_spans(spans)
    db.execute('UPDATE signatures SET pieces = ? WHERE file = ?', (json.dumps(pieces), key))
    db.close()
    (tmp_path / 'a').unlink()
    server = serve([data], port=server.port)        # the same server to the client: same address
    again = fetch(server.port, 'f.bin', tmp_path / 'a')
    assert sha256(tmp_path / 'a') == sha256(data)
    assert wanxfer.DELTA_UNIT <= again['wire_bytes'] < 0.1 * 4 * MiB
    data.write_bytes(data.read_bytes()[::-1])       # new bytes, new identity: a new signature
    changed = fetch(server.port, 'f.bin', tmp_path / 'b')
    assert sha256(tmp_path / 'b') == sha256(data)
    assert changed['wire_bytes'] >= 4 * MiB


@pytest.mark.e2e
@pytest.mark.parametrize('damage', ['not json', '[1]', '[[0]]'])
def test_a_damaged_stored_signature_costs_a_reread_not_the_session(tmp_path, serve, private_cache,
                                                                   damage):
    data = make_file(tmp_path / 'f.bin', 2 * MiB, seed=16)
    server = serve([data])
    fetch(server.port, 'f.bin', tmp_path / 'a')
    server.stop()
    db = wanxfer.open_cache_db(str(private_cache), create=False)
    db.execute('UPDATE signatures SET pieces = ?', (damage,))
    db.close()
    server = serve([data], port=server.port)
    # Old code: the signature thread died on the row, and the session
    # waited for it until the client gave up.
    done = run_get(server.port, 'f.bin', '-o', tmp_path / 'b', '--timeout', '5')
    assert done.returncode == 0, done.stderr
    assert sha256(tmp_path / 'b') == sha256(data)
    assert 'Traceback' not in server.log()


@pytest.mark.e2e
def test_a_small_new_file_skips_the_signature_but_an_update_of_it_does_not(tmp_path, serve):
    src = tmp_path / 'src'
    src.mkdir()
    old = sql_like(200_000, seed=14)
    (src / 'small.sql').write_bytes(old)
    server = serve([src])
    first = fetch(server.port, 'small.sql', tmp_path / 'small.sql')
    assert first['delta'] == 'off' and first['signature_bytes'] == 0
    (src / 'small.sql').write_bytes(old[:1000] + b'-- one more line\n' + old[1000:])
    second = fetch(server.port, 'small.sql', tmp_path / 'small.sql')
    assert (tmp_path / 'small.sql').read_bytes() == (src / 'small.sql').read_bytes()
    assert second['delta'] != 'off' and second['local_bytes'] > 100_000


@pytest.mark.e2e
def test_an_older_copy_wanxfer_never_saw_is_used_like_rsyncs_basis(tmp_path, serve):
    src = tmp_path / 'src'
    src.mkdir()
    image = make_file(src / 'disk.img', 6 * MiB, seed=15)
    out = tmp_path / 'disk.img'
    out.write_bytes(image.read_bytes())             # put there by cp, rsync, a restore...
    with open(image, 'r+b') as f:                   # then changed in place on the server
        f.seek(3 * MiB)
        f.write(os.urandom(10_000))
    done = fetch(serve([src]).port, 'disk.img', out)
    assert sha256(out) == sha256(image)
    assert done['local_bytes'] >= 6 * MiB - 2 * wanxfer.DELTA_UNIT
    assert done['wire_bytes'] < 200_000


@pytest.mark.e2e
def test_data_fetched_from_one_server_is_never_offered_to_another(tmp_path, serve):
    # A server's signature is a guess at what the client holds, and the
    # client's `need` says which guesses were right: a file fetched from one
    # server must not answer another's guesses, even one with the secret.
    one, two = tmp_path / 'one', tmp_path / 'two'
    one.mkdir()
    two.mkdir()
    private = make_file(one / 'keys.bin', 2 * MiB, seed=21)
    first = serve([one])
    fetch(first.port, 'keys.bin', tmp_path / 'keys.bin')
    os.link(str(private), str(two / 'guess.bin'))           # every span guessed right
    other = fetch(serve([two]).port, 'guess.bin', tmp_path / 'guess.bin')
    assert sha256(tmp_path / 'guess.bin') == sha256(private)
    assert other['delta'] == 'fixed'
    assert other['local_bytes'] == 0 and other['wire_bytes'] >= 2 * MiB
    # The same address with another secret is another server too.
    first.stop()
    rekeyed = serve([two], port=first.port, secret='another-secret')
    done = run_get(rekeyed.port, 'guess.bin', '-o', tmp_path / 'rekeyed.bin', '--json',
                   secret='another-secret')
    assert done.returncode == 0, done.stderr
    (summary,) = json_summaries(done)
    assert summary['local_bytes'] == 0 and summary['wire_bytes'] >= 2 * MiB
    # The server the data came from still finds it here.
    rekeyed.stop()
    again = serve([one], port=first.port)
    os.link(str(private), str(one / 'copy.bin'))
    same = fetch(again.port, 'copy.bin', tmp_path / 'copy.bin')
    assert sha256(tmp_path / 'copy.bin') == sha256(private)
    assert same['local_bytes'] >= 2 * MiB - 2 * MiB // wanxfer.LEAD_FRACTION


def test_server_origin_names_the_address_and_the_secret_but_does_not_hold_it():
    origin = wanxfer.server_origin('Files.Example.COM.', 46224, b'the secret')
    assert origin.startswith('files.example.com:46224#') and b'secret' not in origin.encode()
    assert origin == wanxfer.server_origin('files.example.com', 46224, b'the secret')
    assert origin != wanxfer.server_origin('files.example.com', 46225, b'the secret')
    assert origin != wanxfer.server_origin('files.example.com', 46224, b'another secret')
    assert wanxfer.server_origin('[::1]', 1, b's') == wanxfer.server_origin('0:0::1', 1, b's')


def test_a_cache_of_the_first_format_is_upgraded_and_its_files_offered_to_nobody(tmp_path):
    path = str(tmp_path / 'c.db')
    basis = tmp_path / 'basis'
    payload = os.urandom(100_000)
    basis.write_bytes(payload)
    digest = wanxfer.span_digest(payload[:65536])
    db = wanxfer.sqlite3.connect(path, isolation_level=None)
    db.execute('PRAGMA application_id=%d' % wanxfer.CACHE_APPLICATION_ID)
    db.execute('PRAGMA user_version=1')
    db.execute('CREATE TABLE kept_files (id INTEGER PRIMARY KEY, path TEXT NOT NULL, '
               'owned INTEGER NOT NULL, remote TEXT NOT NULL, size INTEGER NOT NULL, '
               'mtime_ns INTEGER NOT NULL, modes TEXT NOT NULL, kept REAL NOT NULL)')
    db.execute('CREATE TABLE spans (digest BLOB NOT NULL, file INTEGER NOT NULL, '
               'offset INTEGER NOT NULL, length INTEGER NOT NULL)')
    info = basis.stat()
    db.execute("INSERT INTO kept_files VALUES (1, ?, 0, 'basis', ?, ?, 'fixed', 0)",
               (str(basis), info.st_size, info.st_mtime_ns))
    db.execute('INSERT INTO spans VALUES (?, 1, 0, 65536)', (digest,))
    db.close()
    store = wanxfer.ChunkStore(path)
    assert store.find_spans([digest], 'host:1#00') == {}
    assert store.kept_files_for('basis', 'host:1#00') == []
    store.keep_file(str(basis), 'basis', 'fixed', [(0, 65536, digest)], link=False, origin='host:1#00')
    assert [found[0][-2:] for found in store.find_spans([digest], 'host:1#00').values()] == [(0, 65536)]
    store.close()
    db = wanxfer.open_cache_db(path, create=False)
    assert db.execute('PRAGMA user_version').fetchone()[0] == wanxfer.CACHE_FORMAT
    db.close()


def test_spans_too_short_to_be_worth_sending_are_not_looked_for(tmp_path):
    # A file's last span can be a few bytes: cheap to guess, so never
    # answered from local data; the server sends it.
    store = wanxfer.ChunkStore(str(tmp_path / 'c.db'))
    basis = tmp_path / 'basis'
    payload = os.urandom(65536 + 100)
    basis.write_bytes(payload)
    spans = [(0, 65536, wanxfer.span_digest(payload[:65536])),
             (65536, 100, wanxfer.span_digest(payload[65536:]))]
    store.keep_file(str(basis), 'basis', 'fixed', spans, link=False, origin='here')
    partial = wanxfer.PartialFile(str(tmp_path / 'out'), 'r', len(payload), 0, 4)
    partial.open()
    assembler = wanxfer.LocalAssembler(store, partial, origin='here')
    held, decided, _refine = assembler.on_piece(0, [(length, digest) for _, length, digest in spans])
    assert held == [(0, 65536 // 4)] and decided == len(payload) // 4
    assert assembler.local_bytes == 65536
    assembler.close()
    partial.close()
    store.close()
