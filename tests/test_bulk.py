"""`serve` and `get` as an operator uses them: real processes on loopback,
most of them through the built-in link emulator, every result checked by
its bytes."""

import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest

from helpers import (SECRET, WANXFER, InProcessServer, get_command, json_summaries, make_file,
                     netns_lock, partial_blocks, patched_serve, run_get, sha256, wait_for, wanxfer,
                     wanxfer_env)

pytestmark = pytest.mark.e2e          # all but the listing-pages test start processes or sockets

BLOCK = wanxfer.block_size_for_mtu(1500)


def test_get_one_file_prints_summary_and_keeps_mtime_and_mode(tmp_path, serve):
    src = tmp_path / 'src'
    src.mkdir()
    data = make_file(src / 'data.bin', 3 * 1024 * 1024 + 17)
    os.chmod(data, 0o640)
    os.utime(data, ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    server = serve([src])
    dest = tmp_path / 'dest'
    dest.mkdir()
    done = run_get(server.port, 'data.bin', '-o', dest)
    assert done.returncode == 0, done.stderr
    assert sha256(dest / 'data.bin') == sha256(data)
    st = os.stat(dest / 'data.bin')
    assert st.st_mtime_ns == 1_600_000_000_123_456_789
    assert st.st_mode & 0o777 == 0o640
    assert 'Transfer mode' in done.stdout and 'lossless, verified' in done.stdout
    assert 'Traceback' not in done.stderr
    assert not [n for n in os.listdir(dest) if n.startswith('.')]   # no temporary files left
    server.stop()
    assert 'sent data.bin (%d bytes)' % data.stat().st_size in server.log()


@pytest.mark.parametrize('size', [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 7 * BLOCK, 100 * BLOCK + 3])
def test_sizes_at_block_edges_through_a_lossy_link(tmp_path, serve, link, size):
    src = tmp_path / 'src'
    src.mkdir()
    data = make_file(src / 'f', size, seed=size)
    server = serve([src])
    path = link(server.port, delay_ms=10, loss=0.05)
    done = run_get(path.port, 'f', '-o', tmp_path / 'out', '--json')
    assert done.returncode == 0, done.stderr
    assert sha256(tmp_path / 'out') == sha256(data)
    (summary,) = json_summaries(done)
    assert summary['file_bytes'] == size and summary['verified'] is True


@pytest.mark.parametrize('mtu', [1280, 1500, 9000, None])
def test_blocks_fill_the_largest_packet_the_path_carries(tmp_path, serve, link, mtu):
    data = make_file(tmp_path / 'f', 300_000)
    server = serve([data])
    port = link(server.port, delay_ms=5, mtu=mtu).port if mtu else server.port
    done = run_get(port, 'f', '-o', tmp_path / 'out', '--json')
    assert done.returncode == 0, done.stderr
    assert sha256(tmp_path / 'out') == sha256(data)
    # Without the emulator, loopback carries 64 KiB packets.
    assert json_summaries(done)[0]['block_bytes'] == wanxfer.block_size_for_mtu(mtu or 65535)
    # The first request tries this host's route (loopback: 64 KiB); a narrower
    # path makes the client fetch again, once, with blocks that fit.
    retried = 'fetching f again with blocks that fit' in done.stderr
    assert retried == (mtu is not None), done.stderr


def test_directory_tree_with_empty_files_empty_dirs_and_odd_names(tmp_path, serve):
    src = tmp_path / 'src'
    tree = src / 'tree'
    (tree / 'sub dir' / 'deeper').mkdir(parents=True)
    (tree / 'empty-dir').mkdir()
    make_file(tree / 'a.bin', 200_000, seed=1)
    (tree / 'empty').write_bytes(b'')
    make_file(tree / 'sub dir' / 'caf\u00e9 \u2603.txt', 5000, seed=2)
    make_file(tree / 'sub dir' / 'deeper' / "it's -n --rm", 1, seed=3)
    server = serve([src])
    dest = tmp_path / 'dest'
    done = run_get(server.port, 'tree', '-o', dest)
    assert done.returncode == 0, done.stderr
    copied = dest / 'tree'
    for path in [p for p in tree.rglob('*') if p.is_file()]:
        assert sha256(copied / path.relative_to(tree)) == sha256(path)
    assert (copied / 'empty-dir').is_dir()
    assert (copied / 'empty').stat().st_size == 0


def test_many_small_files_go_in_one_batch_and_a_large_one_by_udp(tmp_path, serve, link):
    src = tmp_path / 'src'
    tree = src / 'tree'
    (tree / 'etc').mkdir(parents=True)
    for i in range(40):
        make_file(tree / 'etc' / ('f%02d.conf' % i), 100 * i, seed=i)
        os.utime(tree / 'etc' / ('f%02d.conf' % i), ns=(1_500_000_000_000_000_000 + i,) * 2)
    os.chmod(tree / 'etc' / 'f07.conf', 0o600)
    text = tree / 'notes.txt'
    text.write_text(''.join('line %d of an ordinary text file\n' % i for i in range(5000)))
    big = make_file(tree / 'big.bin', wanxfer.SMALL_FILE + 1, seed=99)
    server = serve([src])
    path = link(server.port, delay_ms=10)
    done = run_get(path.port, 'tree', '-o', tmp_path / 'dest', '--json')
    assert done.returncode == 0, done.stderr
    copied = tmp_path / 'dest' / 'tree'
    for original in [p for p in tree.rglob('*') if p.is_file()]:
        twin = copied / original.relative_to(tree)
        assert sha256(twin) == sha256(original)
        assert twin.stat().st_mtime_ns == original.stat().st_mtime_ns
        assert twin.stat().st_mode & 0o777 == original.stat().st_mode & 0o777
    summaries = {s['remote']: s for s in json_summaries(done)}
    assert len(summaries) == 42 and all(s['verified'] for s in summaries.values())
    assert summaries['tree/notes.txt']['wire_bytes'] < text.stat().st_size / 2    # compressed
    assert summaries['tree/big.bin']['packets_sent'] > 0                          # by UDP
    assert not [n for n in os.listdir(copied / 'etc') if n.startswith('.')]
    server.stop()
    assert 'sent 41 small files (%d bytes) on the control channel' % (
        sum(100 * i for i in range(40)) + text.stat().st_size) in server.log()
    assert 'sent tree/big.bin' in server.log()


def test_a_tree_of_more_small_files_than_the_requests_ahead_cover(tmp_path, serve):
    per_batch, ahead = wanxfer.SMALL_BATCH_FILES, wanxfer.SMALL_BATCHES_AHEAD
    count = per_batch * (ahead + 1) + 7
    tree = tmp_path / 'src' / 'many'
    tree.mkdir(parents=True)
    for i in range(count):
        (tree / ('%05d' % i)).write_bytes(b'%d\n' % i * (i % 50))
    server = serve([tmp_path / 'src'])
    done = run_get(server.port, 'many', '-o', tmp_path / 'dest', '-q')
    assert done.returncode == 0, done.stderr
    for i in range(count):
        assert (tmp_path / 'dest' / 'many' / ('%05d' % i)).read_bytes() == b'%d\n' % i * (i % 50)
    server.stop()
    batches = [line for line in server.log().splitlines() if 'small files' in line]
    assert len(batches) == ahead + 2
    assert sum(int(line.split('sent ')[1].split()[0]) for line in batches) == count


LOG_LISTS = """
listing = wanxfer.ServerSession.do_list
def do_list(self, message):
    self.server.log('asked to list %r' % message['path'])
    listing(self, message)
wanxfer.ServerSession.do_list = do_list
"""


def test_small_files_from_a_server_without_batches_come_one_by_one(tmp_path, serve):
    # A server of an earlier version knows no `read` request: it answers
    # with an error, and the client fetches each file on its own instead.
    src = tmp_path / 'src'
    (src / 'tree').mkdir(parents=True)
    for i in range(5):
        make_file(src / 'tree' / ('f%d' % i), 1000 + i, seed=i)
    server = patched_serve(serve, [src], 'del wanxfer.ServerSession.do_read')
    done = run_get(server.port, 'tree', '-o', tmp_path / 'dest', '--json')
    assert done.returncode == 0, done.stderr
    for i in range(5):
        assert sha256(tmp_path / 'dest' / 'tree' / ('f%d' % i)) == sha256(src / 'tree' / ('f%d' % i))
    assert all(s['packets_sent'] > 0 for s in json_summaries(done))     # each by the data channel
    server.stop()
    assert 'small files' not in server.log() and server.log().count('sent tree/f') == 5


@pytest.mark.parametrize('size', [10_000, 3 * 1024 * 1024], ids=['small', 'delta'])
def test_a_new_file_is_asked_for_before_it_is_listed(tmp_path, serve, link, size):
    # One round trip after the handshake: the first request is the fetch.
    src = tmp_path / 'src'
    src.mkdir()
    data = make_file(src / 'new.bin', size)
    os.chmod(data, 0o640)
    server = patched_serve(serve, [src], LOG_LISTS)
    path = link(server.port, delay_ms=20)
    done = run_get(path.port, 'new.bin', '-o', tmp_path, '--json')
    assert done.returncode == 0, done.stderr
    got = tmp_path / 'new.bin'
    assert sha256(got) == sha256(data)
    assert got.stat().st_mtime_ns == data.stat().st_mtime_ns and got.stat().st_mode & 0o777 == 0o640
    (summary,) = json_summaries(done)
    assert summary['delta'] == ('fixed' if size >= wanxfer.DELTA_MIN_SIZE else 'off')
    # Counted from the connect, which the emulator does not delay: the
    # authentication and the request each cross the 40 ms round trip.
    assert summary['first_data_seconds'] >= 2 * 0.040
    server.stop()
    assert 'asked to list' not in server.log()


def test_first_request_falls_back_to_a_listing_for_directories_and_old_copies(tmp_path, serve):
    src = tmp_path / 'src'
    (src / 'dir').mkdir(parents=True)
    make_file(src / 'dir' / 'a', 5000)
    data = make_file(src / 'f', 300_000)
    server = patched_serve(serve, [src], LOG_LISTS)
    # A directory is answered with its listing: no second request for it.
    assert run_get(server.port, 'dir', '-o', tmp_path / 'out', '-q').returncode == 0
    assert (tmp_path / 'out' / 'dir' / 'a').read_bytes() == (src / 'dir' / 'a').read_bytes()
    # A file already at the destination may be an older copy: list first, as ever.
    (tmp_path / 'old').write_bytes(b'older')
    assert run_get(server.port, 'f', '-o', tmp_path / 'old', '-q').returncode == 0
    assert sha256(tmp_path / 'old') == sha256(data)
    server.stop()
    assert server.log().count('asked to list') == 2
    assert "asked to list 'dir'" in server.log() and "asked to list 'f'" in server.log()


def test_a_server_that_wants_a_listing_first_still_gets_the_file(tmp_path, serve):
    # An earlier server refuses a fetch without size and mtime, as changed.
    older = """
fetch = wanxfer.ServerSession.do_fetch
def do_fetch(self, message):
    if 'size' not in message:
        raise wanxfer.RemoteError('%s: changed on the server during the transfer' % message['path'])
    fetch(self, message)
wanxfer.ServerSession.do_fetch = do_fetch
""" + LOG_LISTS
    data = make_file(tmp_path / 'f', 100_000)
    server = patched_serve(serve, [data], older)
    done = run_get(server.port, 'f', '-o', tmp_path / 'out')
    assert done.returncode == 0, done.stderr
    assert sha256(tmp_path / 'out') == sha256(data) and 'error' not in done.stderr
    server.stop()
    assert "asked to list 'f'" in server.log()


FAST_START = """
# The whole first pass at once: the file's short last block reaches the
# client long before it would give up on blocks too large for the path.
wanxfer.RateController.INITIAL_RATE = 1 << 30
"""


def test_a_short_last_block_does_not_prove_a_path_too_narrow_for_the_blocks(tmp_path, serve, link):
    # The open fetch tries 64 KiB blocks; through 1500-byte packets only the
    # file's last block (1000 bytes) arrives.  That is no proof the path
    # carries the rest: the client must still fall back to blocks that fit,
    # not wait on the others until it times out.
    big = wanxfer.block_size_for_mtu(65535)
    data = make_file(tmp_path / 'f', 3 * big + 1000)
    server = patched_serve(serve, [data], FAST_START)
    path = link(server.port, delay_ms=5)
    done = run_get(path.port, 'f', '-o', tmp_path / 'out', '--json', '--timeout', '5')
    assert done.returncode == 0, done.stderr
    assert sha256(tmp_path / 'out') == sha256(data)
    assert 'fetching f again with blocks that fit' in done.stderr
    assert json_summaries(done)[0]['block_bytes'] == BLOCK


def test_a_server_that_picks_tiny_blocks_for_the_first_request_is_refused(tmp_path, serve):
    # The open fetch lets the server lower the block size; not below a sane
    # floor, where every few bytes would cost a packet.
    data = make_file(tmp_path / 'f', 20_000)
    server = patched_serve(serve, [data], 'wanxfer.block_size_for_mtu = lambda mtu, family=None: 100\n'
                                             'wanxfer.MIN_BLOCK_SIZE = 64')
    done = run_get(server.port, 'f', '-o', tmp_path / 'out')
    assert done.returncode == 1 and not (tmp_path / 'out').exists()
    (line,) = done.stderr.splitlines()
    assert line.startswith('wanxfer: error: invalid start from the server: block_size') and \
        line.endswith('not 100'), done.stderr


SMALL_FRAMES = """
wanxfer.MAX_FRAME = 512 << 10
wanxfer.LISTING_PAGE_BYTES = 64 << 10
"""


def patched_get(port, patch, *args, timeout=90):
    """`get` from a wanxfer whose module was changed by `patch` first."""
    program = ('import sys\nsys.path.insert(0, %r)\nimport wanxfer\n%s\n'
               'sys.exit(wanxfer.main(sys.argv[1:]))' % (os.path.dirname(WANXFER), patch))
    return subprocess.run([sys.executable, '-c', program, 'get', '127.0.0.1:%d' % port] +
                          [str(a) for a in args], env=wanxfer_env(), capture_output=True, text=True,
                          timeout=timeout)


def test_a_tree_whose_listing_outgrows_a_frame_comes_in_pages(tmp_path, serve):
    # Frames of at most 512 KiB at both ends (16 MiB really, which a million
    # files outgrow): these files' listing, about 900 KB, must come in pages,
    # and `get` must see the tree through.
    tree = tmp_path / 'src' / 'huge'
    (tree / 'files').mkdir(parents=True)
    names = ['%05d-' % i + 'n' * 200 for i in range(3000)]
    for name in names:
        os.close(os.open(str(tree / 'files' / name), os.O_CREAT | os.O_WRONLY, 0o644))
    dirs = ['%03d-' % i + 'd' * 200 for i in range(300)]
    for name in dirs:
        (tree / name).mkdir()
    server = patched_serve(serve, [tmp_path / 'src'], SMALL_FRAMES)
    done = patched_get(server.port, SMALL_FRAMES, 'huge', '-o', tmp_path / 'dest', '-q')
    assert done.returncode == 0, done.stderr
    copied = tmp_path / 'dest' / 'huge'
    assert sorted(os.listdir(copied / 'files')) == names
    assert sorted(os.listdir(copied)) == sorted(dirs + ['files'])


SMALL_BUFFERS = """
import socket
def shrink(sock):
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, 32 << 10)
session_init = wanxfer.ServerSession.__init__
def init(self, server, sock, *args):
    shrink(sock)
    session_init(self, server, sock, *args)
wanxfer.ServerSession.__init__ = init
create_connection = socket.create_connection
def connect(*args, **options):
    sock = create_connection(*args, **options)
    shrink(sock)
    return sock
socket.create_connection = connect
"""


def test_small_files_with_long_paths_do_not_block_both_ends_writing(tmp_path, serve):
    # The client asks for batches of small files ahead; with long paths
    # those requests outgrew the socket buffers while the server was busy
    # writing its answers to the first: each end then waited on the other.
    deep = tmp_path / 'src' / 'deep' / '/'.join('%d' % level + 'd' * 240 for level in range(4))
    deep.mkdir(parents=True)
    names = ['%04d-' % i + 'n' * 240 for i in range(1100)]
    for i, name in enumerate(names):
        (deep / name).write_bytes(b'%d' % i * 200)
    server = patched_serve(serve, [tmp_path / 'src'], SMALL_BUFFERS)
    done = patched_get(server.port, SMALL_BUFFERS, 'deep', '-o', tmp_path / 'dest', '-q', timeout=30)
    assert done.returncode == 0, done.stderr
    copied = tmp_path / 'dest' / deep.relative_to(tmp_path / 'src')
    assert sorted(os.listdir(copied)) == names
    assert all((copied / name).read_bytes() == b'%d' % i * 200 for i, name in enumerate(names))


def test_listing_pages_hold_at_most_a_page_of_json_and_add_up_to_the_tree(tmp_path):
    tree = tmp_path / 'tree'
    for d in range(5):
        (tree / ('dir %d' % d) / 'empty').mkdir(parents=True)
        for i in range(40):
            (tree / ('dir %d' % d) / ('caf\u00e9 "%02d"' % i)).write_bytes(b'x' * i)
    served = wanxfer.ServedTree([tree])
    pages = list(served.listing_pages('', 2000))
    assert len(pages) > 10 and [p['more'] for p in pages] == [True] * (len(pages) - 1) + [False]
    for page in pages:
        assert page['kind'] == 'dir' and page['files'] + page['dirs']
        assert len(json.dumps(page['files'] + page['dirs'], separators=(',', ':'))) <= 2000
    files = [entry for page in pages for entry in page['files']]
    assert sorted(entry['path'] for entry in files) == sorted(
        str(p.relative_to(tree)) for p in tree.rglob('*') if p.is_file())
    assert all(entry['size'] == int(entry['path'][-3:-1]) for entry in files)
    assert sorted(d for page in pages for d in page['dirs']) == sorted(
        str(p.relative_to(tree)) for p in tree.rglob('*') if p.is_dir())
    (single,) = served.listing_pages('dir 1/caf\u00e9 "07"', 10)
    assert single['kind'] == 'file' and single['files'][0]['size'] == 7 and not single['more']


LOG_CONTROL = """
send, messages = wanxfer.ControlChannel.send, wanxfer.ControlChannel.messages
def logged_send(self, message):
    sys.stderr.write('sent %s\\n' % message['op'])
    send(self, message)
def logged_messages(self):
    for message in messages(self):
        sys.stderr.write('got %s\\n' % message['op'])
        yield message
wanxfer.ControlChannel.send, wanxfer.ControlChannel.messages = logged_send, logged_messages
"""


def test_each_next_file_is_asked_for_with_the_done_of_the_one_before(tmp_path, serve, link):
    # One round trip per file, not two: the next fetch goes out before the
    # digest of the file just completed has come back.
    src = tmp_path / 'src' / 'tree'
    src.mkdir(parents=True)
    files = [make_file(src / ('f%d' % i), wanxfer.SMALL_FILE + 1000 * i, seed=i) for i in range(4)]
    server = serve([tmp_path / 'src'])
    path = link(server.port, delay_ms=10)
    program = ('import sys\nsys.path.insert(0, %r)\nimport wanxfer\n%s\n'
               'sys.exit(wanxfer.main(sys.argv[1:]))' % (os.path.dirname(WANXFER), LOG_CONTROL))
    done = subprocess.run([sys.executable, '-c', program, 'get', '127.0.0.1:%d' % path.port, 'tree',
                           '-o', str(tmp_path / 'dest'), '-q'],
                          env=wanxfer_env(SECRET), capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr
    for original in files:
        assert sha256(tmp_path / 'dest' / 'tree' / original.name) == sha256(original)
    ops = [line for line in done.stderr.splitlines() if line.startswith(('sent ', 'got '))]
    ends = [i for i, op in enumerate(ops) if op == 'sent done']
    assert len(ends) == 4
    for end in ends[:-1]:
        # The digest, not waited for, is read on the way to the next start.
        assert ops[end:end + 2] == ['sent done', 'sent fetch'], ops
        assert ops[end + 2:ops.index('got start', end)] in (
            ['got digest'], ['got checksum', 'got digest']), ops
    # The last file's end waits for nothing: its checksum came with the data.
    assert ops[ends[-1] + 1:] in ([], ['got checksum']), ops


WRONG_DIGESTS = """
send, queue = wanxfer.ControlChannel.send, wanxfer.ControlChannel.queue
fetch = wanxfer.ServerSession.do_fetch
sending, wrong, op = [], [], %r
def fetch_noting_the_file(self, message):
    sending[:] = [message['path']]
    fetch(self, message)
def spoiled(message):
    if message['op'] == op and sending == ['tree/f0'] and len(wrong) < %d:
        wrong.append(message['file'])
        message = dict(message, sha256='0' * 64)
    return message
wanxfer.ControlChannel.send = lambda self, message: send(self, spoiled(message))
wanxfer.ControlChannel.queue = lambda self, message: queue(self, spoiled(message))
wanxfer.ServerSession.do_fetch = fetch_noting_the_file
if op == 'digest':                  # a server that never sends the checksum early
    wanxfer.OutgoingFile.send_checksum = lambda self: None
"""


@pytest.mark.parametrize('op', ['checksum', 'digest'])
@pytest.mark.parametrize('wrong', [1, 2], ids=['once', 'twice'])
def test_a_file_whose_digest_does_not_match_is_fetched_once_more_then_refused(tmp_path, serve,
                                                                             wrong, op):
    # The first file's checksum (or, from a server that sends none, its
    # digest) comes back wrong while the second is already asked for: the
    # first is fetched again after it; a second mismatch is an error, and
    # no file with those bytes takes the final name.
    src = tmp_path / 'src' / 'tree'
    src.mkdir(parents=True)
    files = [make_file(src / ('f%d' % i), wanxfer.SMALL_FILE + 1, seed=i) for i in range(3)]
    server = patched_serve(serve, [tmp_path / 'src'], WRONG_DIGESTS % (op, wrong))
    done = run_get(server.port, 'tree', '-o', tmp_path / 'dest', '-q')
    dest = tmp_path / 'dest' / 'tree'
    assert done.stderr.count('f0: digest mismatch; fetching it again from scratch') == 1
    assert 'Traceback' not in done.stderr
    if wrong == 1:
        assert done.returncode == 0, done.stderr
        for original in files:
            assert sha256(dest / original.name) == sha256(original)
    else:
        assert done.returncode != 0
        assert 'tree/f0: digest mismatch after a full transfer' in done.stderr
        assert not (dest / 'f0').exists()
        assert not [n for n in os.listdir(dest) if n.startswith('.')]   # nor its partial copy
    assert 'Traceback' not in server.log()


# --- A file's end: the early checksum, the digest not waited for ------------

def test_a_get_ends_without_waiting_for_the_servers_digest(tmp_path, monkeypatch):
    # The server's digest is held until the test lets it go: the get must
    # finish (verified, renamed, summary out, exited) on the early checksum
    # alone; the server then sends the digest to nobody, logs the file as
    # sent and the session's end as no error.
    src = tmp_path / 'src'
    src.mkdir()
    data = make_file(src / 'f', 3 << 20, seed=5)
    held = wanxfer.threading.Event()
    finish = wanxfer.OutgoingFile.finish

    def held_finish(self):
        held.wait(60)
        finish(self)
    monkeypatch.setattr(wanxfer.OutgoingFile, 'finish', held_finish)
    server = InProcessServer([src])
    try:
        done = run_get(server.port, 'f', '-o', tmp_path / 'out', '--json', timeout=30)
        assert not held.is_set()
    finally:
        held.set()
    try:
        assert done.returncode == 0, done.stderr
        assert sha256(tmp_path / 'out') == sha256(data)
        (summary,) = json_summaries(done)
        assert summary['verified'] is True and summary['packets_sent'] >= summary['packets_received']
        assert not [n for n in os.listdir(tmp_path) if n.startswith('.')]
        wait_for(lambda: not server.server._routes, what='the session to end')
        assert 'sent f (%d bytes)' % (3 << 20) in server.log()
        assert 'dropped' not in server.log() and 'Traceback' not in server.log(), server.log()
    finally:
        server.stop()


@pytest.mark.parametrize('files', [1, 3])
def test_serve_takes_a_client_that_hangs_up_right_after_done_as_a_normal_end(tmp_path, files):
    # The get reads no digest of its last file: it closes with it unread
    # (a reset) or before it came.  Neither is an error in the server's log.
    src = tmp_path / 'src' / 'tree'
    src.mkdir(parents=True)
    for i in range(files):
        make_file(src / ('f%d' % i), (1 << 20) + i, seed=i)
    server = InProcessServer([tmp_path / 'src'])
    try:
        for run in range(3):
            done = run_get(server.port, 'tree', '-o', tmp_path / ('dest%d' % run), '-q',
                           timeout=60)
            assert done.returncode == 0, done.stderr
            wait_for(lambda: not server.server._routes, what='the session to end')
        assert server.log().count('sent tree/') == 3 * files, server.log()
        assert 'dropped' not in server.log() and 'Traceback' not in server.log(), server.log()
    finally:
        server.stop()


LOG_DIGESTS = """
import json
send = wanxfer.ControlChannel.send
def logged_send(self, message):
    if message['op'] == 'digest':
        sys.stderr.write('digest %s\\n' % json.dumps(message))
    send(self, message)
wanxfer.ControlChannel.send = logged_send
"""


@pytest.mark.parametrize('workers', [1, 2])
def test_the_summarys_sender_counts_from_the_receivers_view_match_the_servers(tmp_path, serve,
                                                                               workers):
    # Lossless loopback: what the receiver counted of each flow is what the
    # sender sent (its digest, logged by the server, not read by the get).
    src = tmp_path / 'src'
    src.mkdir()
    size = (24 << 20) + 5
    data = make_file(src / 'f', size, seed=9)
    server = patched_serve(serve, [src], LOG_DIGESTS, extra=['--workers', str(workers)])
    done = run_get(server.port, 'f', '-o', tmp_path / 'out', '--json', '--no-delta',
                   '--workers', str(workers))
    assert done.returncode == 0, done.stderr
    assert sha256(tmp_path / 'out') == sha256(data)
    (summary,) = json_summaries(done)
    assert summary['workers'] == workers
    report = json.loads(server.wait_for(r'digest (\{.*\})', timeout=20).group(1))
    assert summary['packets_received'] == summary['packets_sent'], summary
    # Nothing lost, nothing sent after the file was whole: the wire bytes
    # too are the sender's exactly, IP and UDP headers included.
    for name in ('packets_sent', 'packets_lost', 'packets_retransmitted', 'packets_compressed',
                 'wire_bytes'):
        assert summary[name] == report[name], (name, summary, report)
    assert summary['wire_bytes'] > size
    assert summary['signature_bytes'] == report['signature_bytes'] == 0


def test_a_delta_summarys_signature_bytes_are_what_the_server_sent(tmp_path, serve):
    # The client counts the signature pieces it received as the server
    # counts those it sent: a delta is whole only once every piece is in.
    src = tmp_path / 'src'
    src.mkdir()
    data = make_file(src / 'f', 6 << 20, seed=4)
    server = patched_serve(serve, [src], LOG_DIGESTS)
    for run in range(2):
        done = run_get(server.port, 'f', '-o', tmp_path / 'out', '--json')
        assert done.returncode == 0, done.stderr
        assert sha256(tmp_path / 'out') == sha256(data)
        (summary,) = json_summaries(done)
        report = json.loads(server.wait_for(r'digest (\{.*\})', timeout=20, count=run + 1).group(1))
        assert summary['delta'] != 'off'
        assert summary['signature_bytes'] == report['signature_bytes'] > 0, (summary, report)
        assert summary['sent_bytes'] == summary['wire_bytes'] + summary['signature_bytes']
        with open(data, 'ab') as f:
            f.write(os.urandom(100_000))        # the next run finds the rest locally


OLD_CLIENT = LOG_CONTROL + """
send_old = wanxfer.ControlChannel.send
def send_without_early_digest(self, message):
    message.pop('early_digest', None)
    send_old(self, message)
wanxfer.ControlChannel.send = send_without_early_digest
"""


@pytest.mark.parametrize('client', ['old', 'new'])
def test_only_a_fetch_that_asks_for_it_gets_the_checksum_early(tmp_path, serve, client):
    # A fetch without `early_digest` (an older client) is answered as
    # before: no checksum, the digest with the sender's counts.
    src = tmp_path / 'src' / 'tree'
    src.mkdir(parents=True)
    files = [make_file(src / ('f%d' % i), wanxfer.SMALL_FILE + 1000 * i, seed=i) for i in range(2)]
    server = serve([tmp_path / 'src'])
    patch = OLD_CLIENT if client == 'old' else LOG_CONTROL
    program = ('import sys\nsys.path.insert(0, %r)\nimport wanxfer\n%s\n'
               'sys.exit(wanxfer.main(sys.argv[1:]))' % (os.path.dirname(WANXFER), patch))
    done = subprocess.run([sys.executable, '-c', program, 'get', '127.0.0.1:%d' % server.port,
                           'tree', '-o', str(tmp_path / 'dest'), '--json'],
                          env=wanxfer_env(SECRET), capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr
    for original in files:
        assert sha256(tmp_path / 'dest' / 'tree' / original.name) == sha256(original)
    ops = [line for line in done.stderr.splitlines() if line.startswith(('sent ', 'got '))]
    if client == 'old':
        assert 'got checksum' not in ops and ops[-2:] == ['sent done', 'got digest'], ops
    else:
        assert ops.count('got checksum') == 2, ops
    assert all(s['packets_sent'] > 0 and s['wire_bytes'] > s['file_bytes']
               for s in json_summaries(done))


def test_a_server_that_sends_no_checksum_is_waited_for_as_before(tmp_path, serve):
    src = tmp_path / 'src'
    src.mkdir()
    data = make_file(src / 'f', 2 << 20, seed=3)
    server = patched_serve(serve, [src], LOG_DIGESTS +
                           'wanxfer.OutgoingFile.send_checksum = lambda self: None\n')
    done = run_get(server.port, 'f', '-o', tmp_path / 'out', '--json')
    assert done.returncode == 0, done.stderr
    assert sha256(tmp_path / 'out') == sha256(data)
    (summary,) = json_summaries(done)
    report = json.loads(server.wait_for(r'digest (\{.*\})', timeout=20).group(1))
    for name in ('packets_sent', 'packets_lost', 'packets_retransmitted', 'wire_bytes'):
        assert summary[name] == report[name]           # the digest's, exactly


SPOILED_CONTENT = """
send = wanxfer.ControlChannel.send
def send_spoiled(self, message):
    if message['op'] == 'content' and message.get('path') == 'tree/f1':
        data = bytearray(wanxfer.base64.b64decode(message['data']))
        data[len(data) // 2] ^= 1               # damaged, the digest still the original's
        message = dict(message, data=wanxfer.base64.b64encode(bytes(data)).decode())
    send(self, message)
wanxfer.ControlChannel.send = send_spoiled
"""


def test_a_small_file_whose_content_does_not_match_its_digest_is_refused(tmp_path, serve):
    src = tmp_path / 'src' / 'tree'
    src.mkdir(parents=True)
    files = [make_file(src / ('f%d' % i), 5000 + i, seed=i) for i in range(3)]
    server = patched_serve(serve, [tmp_path / 'src'], SPOILED_CONTENT)
    done = run_get(server.port, 'tree', '-o', tmp_path / 'dest', '--no-delta')
    dest = tmp_path / 'dest' / 'tree'
    assert done.returncode == 1
    assert 'tree/f1: the content the server sent does not match its digest' in done.stderr
    assert 'Traceback' not in done.stderr
    assert not (dest / 'f1').exists()
    assert not [n for n in os.listdir(dest) if n.startswith('.')]
    assert sha256(dest / 'f0') == sha256(files[0])


def test_served_file_by_base_name_and_to_a_file_name(tmp_path, serve):
    data = make_file(tmp_path / 'backup.tar', 100_000)
    server = serve([data])
    done = run_get(server.port, 'backup.tar', '-o', tmp_path / 'renamed.tar')
    assert done.returncode == 0, done.stderr
    assert sha256(tmp_path / 'renamed.tar') == sha256(data)


@pytest.mark.parametrize('conditions', [
    dict(loss=0.03),
    dict(loss=0.05, burst=8),
    dict(reorder=0.05, duplicate=0.05),
    dict(corrupt=0.03),
], ids=['loss', 'bursts', 'reorder-duplicate', 'corrupt'])
def test_survives_damage_on_the_path(tmp_path, serve, link, conditions):
    src = tmp_path / 'src'
    src.mkdir()
    data = make_file(src / 'f', 2 * 1024 * 1024)
    server = serve([src])
    path = link(server.port, delay_ms=20, rate_bps=200e6, **conditions)
    done = run_get(path.port, 'f', '-o', tmp_path / 'out', '--json')
    assert done.returncode == 0, done.stderr
    assert sha256(tmp_path / 'out') == sha256(data)
    (summary,) = json_summaries(done)
    counters = path.counters.as_dict()
    if conditions.get('corrupt'):
        # Corrupted datagrams reached the client and were refused, never written.
        assert counters['down']['corrupted'] > 0
        assert summary['packets_rejected'] > 0
    if conditions.get('loss'):
        assert summary['packets_retransmitted'] > 0
    if conditions.get('duplicate'):
        assert summary['packets_duplicate'] > 0


def udp_ports_of(pid):
    """The local UDP ports the process `pid` has open (Linux /proc)."""
    inodes = set()
    for fd in os.listdir('/proc/%d/fd' % pid):
        try:
            target = os.readlink('/proc/%d/fd/%s' % (pid, fd))
        except OSError:
            continue
        if target.startswith('socket:['):
            inodes.add(target[8:-1])
    ports = []
    with open('/proc/net/udp') as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                ports.append(int(fields[1].split(':')[1], 16))
    return ports


@pytest.mark.skipif(not os.path.exists('/proc/net/udp'), reason='needs Linux /proc')
def test_forged_datagrams_from_a_third_socket_are_dropped(tmp_path, serve):
    src = tmp_path / 'src'
    src.mkdir()
    data = make_file(src / 'f', 4 * 1024 * 1024)
    server = serve([src], extra=['--rate', '40M'])
    client = subprocess.Popen(get_command(server.port, 'f', '-o', tmp_path / 'out', '--json'),
                              env=wanxfer_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    ports = wait_for(lambda: udp_ports_of(client.pid), what='the client UDP socket')
    forger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # Well-formed headers with every plausible session id and block, bad tags;
    # and random junk, at the client and at the server's data port.
    forged = 0
    while client.poll() is None and forged < 3000:
        header = wanxfer.DATA_HEADER.pack(wanxfer.KIND_DATA, 0, forged, forged, forged % 100, 0)
        for target in ports + [server.port]:
            forger.sendto(header + os.urandom(BLOCK + wanxfer.TAG_SIZE), ('127.0.0.1', target))
        forged += 1
    forger.close()
    out, err = client.communicate(timeout=60)
    assert client.returncode == 0, err
    assert sha256(tmp_path / 'out') == sha256(data)


class ForgingShaper(wanxfer.PathShaper):
    """The emulator's planning of one direction, which also delivers, just
    ahead of each of the first data datagrams, a copy of it with one byte
    flipped: in the session id, the block number, the body or the tag.
    Each forgery is a real datagram but for that byte."""

    FLIPS = (3, 21, wanxfer.DATA_HEADER.size + 7, -1)
    FORGERIES = 12

    def __init__(self, *args):
        super().__init__(*args)
        self.forged = 0

    def shape(self, now, data):
        plans = super().shape(now, data)
        if not plans or data[0] != wanxfer.KIND_DATA or self.forged >= self.FORGERIES:
            return plans
        forged = bytearray(data)
        forged[self.FLIPS[self.forged % len(self.FLIPS)]] ^= 0x10
        self.forged += 1
        # Same arrival time, planned first: the forgery is read first.
        return ((plans[0][0], bytes(forged)),) + tuple(plans)


def test_a_real_datagram_with_one_byte_flipped_is_rejected_and_counted(tmp_path, serve, link,
                                                                       monkeypatch):
    data = make_file(tmp_path / 'f', 2 * 1024 * 1024)
    server = serve([data])
    shapers = []

    def shaper(*args):
        shapers.append(ForgingShaper(*args))
        return shapers[-1]
    with monkeypatch.context() as patched:
        patched.setattr(wanxfer, 'PathShaper', shaper)
        path = link(server.port, delay_ms=5)
    done = run_get(path.port, 'f', '-o', tmp_path / 'out', '--json')
    assert done.returncode == 0, done.stderr
    assert sha256(tmp_path / 'out') == sha256(data)
    forged = sum(s.forged for s in shapers)
    assert forged == ForgingShaper.FORGERIES
    # Each forgery came before its genuine twin: taken, it would have been
    # written (a digest mismatch and a second transfer) or made the twin
    # a duplicate, and not counted here.
    assert 'mismatch' not in done.stderr
    (summary,) = json_summaries(done)
    assert summary['packets_rejected'] == forged


class TailDropper(wanxfer.PathShaper):
    """The emulator's planning of one direction, which loses the first
    sending of the last `count` data blocks of a file of `size` bytes:
    after them nothing arrives that feedback could report a gap before."""

    def __init__(self, size, count, *args):
        super().__init__(*args)
        self.size, self.count = size, count
        self.block = self.dropped = 0

    def shape(self, now, data):
        plans = super().shape(now, data)
        if plans and data[0] == wanxfer.KIND_DATA and len(data) > wanxfer.PACKET_OVERHEAD:
            _kind, flags, _sid, _seq, block, _stamp = wanxfer.DATA_HEADER.unpack_from(data)
            self.block = max(self.block, len(data) - wanxfer.PACKET_OVERHEAD)   # the client chose it
            last = -(-self.size // self.block) - 1
            if block > last - self.count and not flags & wanxfer.DATA_FLAG_RETRANSMIT:
                self.dropped += 1
                return ()
        return plans


def test_a_lost_tail_is_sent_again_once_the_client_names_it(tmp_path, serve, link, monkeypatch):
    # Only the client's NAK can name blocks lost after the last that arrived.
    size = 300_000 + 77
    data = make_file(tmp_path / 'f', size)
    server = serve([data])
    shapers = []

    def shaper(*args):
        shapers.append(TailDropper(size, 10, *args))
        return shapers[-1]
    with monkeypatch.context() as patched:
        patched.setattr(wanxfer, 'PathShaper', shaper)
        path = link(server.port, delay_ms=5)
    # A short --timeout: without the resends it fails in seconds, not minutes.
    done = run_get(path.port, 'f', '-o', tmp_path / 'out', '--json', '--timeout', '5')
    assert done.returncode == 0, done.stderr
    assert sha256(tmp_path / 'out') == sha256(data)
    assert sum(s.dropped for s in shapers) == 10
    (summary,) = json_summaries(done)
    assert summary['packets_retransmitted'] >= 10


def test_resume_after_kill_sends_only_what_is_missing(tmp_path, serve, link):
    src = tmp_path / 'src'
    src.mkdir()
    size = 6 * 1024 * 1024
    data = make_file(src / 'big', size)
    server = serve([src], extra=['--rate', '16M'])
    path = link(server.port, delay_ms=10, loss=0.01)
    out = tmp_path / 'big'
    state = tmp_path / '.big.wxstate'
    first = subprocess.Popen(get_command(path.port, 'big', '-o', out), env=wanxfer_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: partial_blocks(state) > 1000, what='a saved partial state')
    first.kill()                                # kill -9: no chance to clean up
    first.wait()
    assert not out.exists()                     # a half file never takes the final name
    held = partial_blocks(state)
    done = run_get(path.port, 'big', '-o', out, '--json')
    assert done.returncode == 0, done.stderr
    assert sha256(out) == sha256(data)
    (summary,) = json_summaries(done)
    assert summary['resumed_bytes'] >= held * BLOCK - BLOCK
    assert summary['received_bytes'] <= size - summary['resumed_bytes']
    assert summary['wire_bytes'] < size * 0.9
    assert not state.exists()


def test_source_changed_between_runs_starts_over(tmp_path, serve):
    src = tmp_path / 'src'
    src.mkdir()
    data = make_file(src / 'f', 4 * 1024 * 1024, seed=1)
    server = serve([src], extra=['--rate', '8M'])
    out = tmp_path / 'f'
    first = subprocess.Popen(get_command(server.port, 'f', '-o', out), env=wanxfer_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: partial_blocks(tmp_path / '.f.wxstate') > 0, what='a saved partial state')
    assert first.poll() is None                 # killed with part of the file written
    first.kill()
    first.wait()
    make_file(data, 4 * 1024 * 1024, seed=2)   # same size, new content and mtime
    os.utime(data, ns=(2_000_000_000_000_000_000, 2_000_000_000_000_000_000))
    done = run_get(server.port, 'f', '-o', out, '--json')
    assert done.returncode == 0, done.stderr
    assert sha256(out) == sha256(data)
    # Started over at once: not resumed on the old bytes and then caught
    # by the digest (which would end right too, a whole transfer later).
    assert 'mismatch' not in done.stderr, done.stderr
    (summary,) = json_summaries(done)
    assert summary['resumed_bytes'] == 0 and summary['received_bytes'] == 4 * 1024 * 1024


def test_server_restart_mid_transfer_then_resume(tmp_path, serve):
    src = tmp_path / 'src'
    src.mkdir()
    data = make_file(src / 'f', 6 * 1024 * 1024)
    server = serve([src], extra=['--rate', '8M'])
    out = tmp_path / 'f'
    client = subprocess.Popen(get_command(server.port, 'f', '-o', out, '--timeout', '5'),
                              env=wanxfer_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    wait_for(lambda: partial_blocks(tmp_path / '.f.wxstate') > 0, what='a saved partial state')
    port = server.port
    server.stop(signal.SIGKILL)
    _, err = client.communicate(timeout=30)
    assert client.returncode == 1
    assert err.count('\n') == 1 and 'wanxfer: error:' in err and 'resume' in err
    assert not out.exists()
    restarted = serve([src], port=port)
    done = run_get(restarted.port, 'f', '-o', out, '--json')
    assert done.returncode == 0, done.stderr
    assert sha256(out) == sha256(data)
    assert json_summaries(done)[0]['resumed_bytes'] > 0


def test_wrong_secret_is_refused_and_nothing_written(tmp_path, serve):
    data = make_file(tmp_path / 'f', 1000)
    server = serve([data])
    dest = tmp_path / 'dest'
    dest.mkdir()
    done = run_get(server.port, 'f', '-o', dest, secret='not-the-secret')
    assert done.returncode == 1
    assert 'wrong secret' in done.stderr and 'Traceback' not in done.stderr
    assert os.listdir(dest) == []
    server.stop()
    # The client hangs up on the server's proof: the server sees a peer
    # that went away during authentication, and serves it nothing.
    assert re.search(r'wanxfer: 127\.0\.0\.1:\d+: (refused|dropped): ', server.log()), \
        server.log()
    assert 'sent ' not in server.log()


class ProofSpoiler:
    """A client socket whose second write, the client's proof (sent once
    the server's hello has been read), has its last byte flipped: a client
    that does not know the secret, as the server sees it, whatever the
    handshake's layout."""

    def __init__(self, sock):
        self.sock, self.writes = sock, 0

    def sendall(self, data):
        self.writes += 1
        if self.writes == 2:
            data = data[:-1] + bytes([data[-1] ^ 1])
        return self.sock.sendall(data)

    def __getattr__(self, name):
        return getattr(self.sock, name)


def test_server_refuses_a_client_proof_made_without_the_secret(tmp_path, serve):
    # Checked at the server itself: a real `get` with a wrong secret gives
    # up on the server's proof before sending its own.
    data = make_file(tmp_path / 'f', 1000)
    server = serve([data])
    sock = socket.create_connection(('127.0.0.1', server.port), timeout=20)
    try:
        wanxfer.client_handshake(ProofSpoiler(sock), SECRET.encode(), True)
        port = sock.getsockname()[1]
        try:
            answer = sock.recv(1)               # nothing: not a ready, not an error frame
        except ConnectionResetError:
            answer = b''
        assert answer == b''
    finally:
        sock.close()
    line = wait_for(lambda: [l for l in server.lines if '127.0.0.1:%d: ' % port in l],
                    what='the server to log the refused client')
    assert ': refused: ' in line[0] and 'Traceback' not in server.log()


def test_encryption_mismatch_is_a_clear_error(tmp_path, serve):
    data = make_file(tmp_path / 'f', 1000)
    server = serve([data], extra=['--no-encrypt'])
    done = run_get(server.port, 'f', '-o', tmp_path / 'out')
    assert done.returncode == 1
    assert 'encryption mismatch' in done.stderr
    plain = run_get(server.port, 'f', '-o', tmp_path / 'out', '--no-encrypt', '--json')
    assert plain.returncode == 0, plain.stderr
    assert sha256(tmp_path / 'out') == sha256(data)
    assert json_summaries(plain)[0]['encrypted'] is False


def test_no_secret_is_a_usage_error(tmp_path):
    done = run_get(1, 'f', secret=None)
    assert done.returncode == 2 and 'WANXFER_SECRET' in done.stderr


def test_serve_without_secret_prints_one_and_it_works(tmp_path):
    data = make_file(tmp_path / 'f', 5000)
    proc = subprocess.Popen([sys.executable, WANXFER, 'serve', '--bind', '127.0.0.1', '--port', '0',
                             str(data)], env=wanxfer_env(None), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        notice = [proc.stdout.readline() for _ in range(4)]
        secret_line = notice[1]
        assert secret_line.strip().startswith('WANXFER_SECRET=')
        printed = secret_line.strip().split('WANXFER_SECRET=')[1]
        assert 'get 127.0.0.1:' in notice[3] and printed in notice[3]     # the exact command
        assert len(printed) >= 24
        line = proc.stderr.readline()
        while 'listening on' not in line:
            assert line, 'serve exited early'
            line = proc.stderr.readline()
        port = int(line.split('listening on ')[1].split()[0].rsplit(':', 1)[1])
        done = run_get(port, 'f', '-o', tmp_path / 'out', secret=printed)
        assert done.returncode == 0, done.stderr
        assert sha256(tmp_path / 'out') == sha256(data)
    finally:
        proc.kill()
        proc.communicate()


@pytest.mark.parametrize('remote', ['../outside', '/etc/passwd', 'link-out', 'sub/../../outside',
                                    'missing'])
def test_paths_outside_the_root_or_missing_are_refused(tmp_path, serve, remote):
    root = tmp_path / 'root'
    (root / 'sub').mkdir(parents=True)
    (tmp_path / 'outside').write_text('secret data')
    os.symlink(tmp_path / 'outside', root / 'link-out')
    server = serve([root])
    dest = tmp_path / 'dest'
    dest.mkdir()
    done = run_get(server.port, remote, '-o', dest)
    assert done.returncode == 1
    assert done.stderr.startswith('wanxfer: error:') and 'Traceback' not in done.stderr
    assert os.listdir(dest) == []


def tree_of_every_kind(root):
    """A tree with files small and large, nested, and an empty directory."""
    (root / 'sub' / 'deeper').mkdir(parents=True)
    (root / 'empty-dir').mkdir()
    make_file(root / 'small', 1000, seed=1)
    make_file(root / 'sub' / 'deeper' / 'large', 600_000, seed=2)
    return root


def everything_under(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob('*'))


@pytest.mark.parametrize('remotes', [['../secret.txt'], ['missing'], ['missing', '/etc/passwd']],
                         ids=['outside', 'missing', 'several'])
@pytest.mark.parametrize('output', ['y.txt', 'new/deeper/', None])
def test_a_refused_get_creates_nothing(tmp_path, serve, remotes, output):
    root = tmp_path / 'root'
    root.mkdir()
    (tmp_path / 'secret.txt').write_text('secret data')
    server = serve([root])
    work = tmp_path / 'work'
    work.mkdir()
    argv = list(remotes) + (['-o', output] if output else [])
    done = subprocess.run(get_command(server.port, *argv), env=wanxfer_env(), cwd=str(work),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert len(lines) == len(remotes) and all(l.startswith('wanxfer: error: ') for l in lines)
    assert os.listdir(work) == []


REFUSE_EVERY_FILE = """
def refuse(self, message):
    raise wanxfer.RemoteError('refused by this server')
wanxfer.ServerSession.do_fetch = refuse
wanxfer.ServerSession.do_read = refuse
"""


@pytest.mark.parametrize('existing', [False, True], ids=['new-dest', 'existing-dest'])
def test_a_tree_whose_every_file_is_refused_leaves_no_empty_directories(tmp_path, serve,
                                                                        existing):
    root = tree_of_every_kind(tmp_path / 'root')
    server = patched_serve(serve, [root], REFUSE_EVERY_FILE)
    place = tmp_path / 'place'
    place.mkdir()
    if existing:
        (place / 'dest').mkdir()
    done = run_get(server.port, '', '-o', place / 'dest' / 'deeper')
    assert done.returncode == 1
    assert 'refused by this server' in done.stderr and 'Traceback' not in done.stderr
    assert everything_under(place) == (['dest'] if existing else [])


def test_a_tree_with_a_refused_remote_keeps_what_arrived(tmp_path, serve):
    src = tmp_path / 'src'
    tree_of_every_kind(src / 'tree')
    server = serve([src])
    dest = tmp_path / 'dest'
    done = run_get(server.port, 'tree', 'missing', '-o', dest)
    assert done.returncode == 1 and 'missing' in done.stderr
    assert everything_under(dest) == ['tree', 'tree/empty-dir', 'tree/small', 'tree/sub',
                                      'tree/sub/deeper', 'tree/sub/deeper/large']


@pytest.mark.parametrize('output', ['dest', None])
def test_an_empty_remote_directory_is_fetched_as_one(tmp_path, serve, output):
    src = tmp_path / 'src'
    (src / 'empty' / 'inner').mkdir(parents=True)
    server = serve([src])
    work = tmp_path / 'work'
    work.mkdir()
    done = subprocess.run(get_command(server.port, 'empty', *(['-o', output] if output else [])),
                          env=wanxfer_env(), cwd=str(work), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    top = work / output if output else work
    assert everything_under(top) == ['empty', 'empty/inner']


def test_the_server_itself_refuses_paths_outside_its_root(tmp_path, serve):
    # `get` refuses most of these before asking: here they are asked for
    # over the protocol, after a real handshake, as a client that skipped
    # its own checks would, in each request that names a path.
    root = tmp_path / 'root'
    (root / 'sub').mkdir(parents=True)
    outside = tmp_path / 'outside'
    outside.write_text('secret data')
    os.symlink(outside, root / 'link-out')
    os.symlink(tmp_path, root / 'sub' / 'up')
    server = serve([root])
    remotes = ['../outside', 'sub/../../outside', str(outside), 'link-out', 'sub/up/outside',
               '~/../outside', 'sub/..\\..\\outside']
    client = wanxfer.Client('127.0.0.1', server.port, SECRET.encode())
    client.connect()
    try:
        listings = client.listings(remotes)
        assert all(isinstance(r, wanxfer.RemoteError) for r in listings), listings
        client.sock.settimeout(20)
        st = outside.stat()
        for remote in remotes:
            client.control.send({'op': 'fetch', 'path': remote, 'block_size': 1200})
            answer = client.control.recv()
            assert answer['op'] == 'error', (remote, answer)
            client.control.send({'op': 'fetch', 'path': remote, 'block_size': 1200,
                                 'size': st.st_size, 'mtime_ns': st.st_mtime_ns, 'need': [[0, 1]]})
            answer = client.control.recv()
            assert answer['op'] == 'error', (remote, answer)
        client.control.send({'op': 'read', 'files': [
            {'path': remote, 'size': st.st_size, 'mtime_ns': st.st_mtime_ns} for remote in remotes]})
        for remote in remotes:
            answer = client.control.recv()
            assert answer['op'] == 'content' and answer['path'] == remote and 'error' in answer
            assert 'data' not in answer
    finally:
        client.close()
    server.stop()
    assert 'secret data' not in server.log() and 'Traceback' not in server.log()
    assert 'outside (' not in server.log()          # no "sent ... (N bytes)" for any of them


def test_symlink_inside_a_tree_pointing_outside_is_not_served(tmp_path, serve):
    root = tmp_path / 'root'
    (root / 'tree').mkdir(parents=True)
    (tmp_path / 'outside').write_text('secret data')
    (root / 'tree' / 'ok').write_text('fine')
    os.symlink(tmp_path / 'outside', root / 'tree' / 'escape')
    server = serve([root])
    done = run_get(server.port, 'tree', '-o', tmp_path / 'dest')
    assert done.returncode == 0, done.stderr
    assert (tmp_path / 'dest' / 'tree' / 'ok').read_text() == 'fine'
    assert not (tmp_path / 'dest' / 'tree' / 'escape').exists()


def test_unwritable_destination_is_refused(tmp_path, serve):
    data = make_file(tmp_path / 'f', 1000)
    server = serve([data])
    done = run_get(server.port, 'f', '-o', tmp_path / 'no' / 'such' / 'dir' / 'f')
    assert done.returncode == 1 and 'wanxfer: error:' in done.stderr
    assert 'Traceback' not in done.stderr


def test_concurrent_clients_each_get_their_file(tmp_path, serve, link):
    src = tmp_path / 'src'
    src.mkdir()
    files = [make_file(src / ('f%d' % i), 1024 * 1024 + i, seed=i) for i in range(4)]
    server = serve([src])
    # A bottleneck, as a real path has: without one, four senders at
    # loopback speed outrun the emulator's relay (a Python thread in this
    # process) on a loaded machine, and it drops nearly everything.
    path = link(server.port, delay_ms=15, loss=0.01, rate_bps=200e6)
    clients = [subprocess.Popen(get_command(path.port, f.name, '-o', tmp_path / ('out%d' % i)),
                                env=wanxfer_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
               for i, f in enumerate(files)]
    for client in clients:
        _out, err = client.communicate(timeout=60)
        assert client.returncode == 0, err
    for i, f in enumerate(files):
        assert sha256(tmp_path / ('out%d' % i)) == sha256(f)


@pytest.mark.parametrize('sessions', ['processes', 'threads'])
@pytest.mark.parametrize('stage', ['before-hello', 'after-handshake'])
def test_a_stalled_client_does_not_block_others(tmp_path, serve, stage, sessions):
    # One that says nothing at all is held by the gate that reads HELLOs;
    # one that authenticates, then sends nothing (no UDP hello, no request),
    # has a session waiting for it in a process or on a thread of its own
    # (a server in this process, which has threads, cannot fork).  Neither
    # holds up the thread that accepts and authenticates everyone else.
    data = make_file(tmp_path / 'f', 200_000)
    server = serve([data]) if sessions == 'processes' else InProcessServer([data])
    stalled = socket.create_connection(('127.0.0.1', server.port), timeout=20)
    try:
        if stage == 'after-handshake':
            wanxfer.client_handshake(stalled, SECRET.encode(), True)
        done = run_get(server.port, 'f', '-o', tmp_path / 'out')
        assert done.returncode == 0, done.stderr
        assert sha256(tmp_path / 'out') == sha256(data)
        # Served while the stalled one was still waited for, not after the
        # server gave up on it (which says so and hangs up).
        stalled.setblocking(False)
        with pytest.raises(BlockingIOError):
            stalled.recv(1)
        assert '127.0.0.1:%d:' % stalled.getsockname()[1] not in server.log()
    finally:
        stalled.close()
        if sessions == 'threads':
            server.stop()


def test_bad_rate_and_bad_address_are_usage_errors(tmp_path):
    for args in (['127.0.0.1:1', 'f', '--rate', 'fast'], ['127.0.0.1:notaport', 'f']):
        done = subprocess.run([sys.executable, WANXFER, 'get'] + args, env=wanxfer_env(),
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith('wanxfer: error:')


def test_help_has_examples():
    for command in ([], ['serve'], ['get']):
        done = subprocess.run([sys.executable, WANXFER] + command + ['--help'],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0 and 'examples:' in done.stdout


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists('/proc/filesystems'),
                    reason='needs root to mount a small tmpfs')
def test_full_disk_keeps_partial_data_and_resumes(tmp_path, serve):
    src = tmp_path / 'src'
    src.mkdir()
    data = make_file(src / 'f', 3 * 1024 * 1024)
    server = serve([src])
    small = tmp_path / 'small'
    small.mkdir()
    mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', str(small)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip('cannot mount tmpfs here: %s' % mounted.stderr.decode().strip())
    try:
        done = run_get(server.port, 'f', '-o', small)
        assert done.returncode == 1
        assert 'disk full' in done.stderr and 'Traceback' not in done.stderr
        assert not (small / 'f').exists()
        assert (small / '.f.wxpart').exists()
        # What reached the disk before it filled up is recorded, the last
        # partial run of blocks included (nearly all of the 1 MiB).
        identity, bitmap = wanxfer.PartialFile.recorded(str(small / '.f.wxstate'))
        held = sum(bin(b).count('1') for b in bitmap) * identity['block_size']
        assert held > 900 * 1024
        subprocess.run(['mount', '-o', 'remount,size=8m', str(small)], check=True)
        done = run_get(server.port, 'f', '-o', small, '--json')
        assert done.returncode == 0, done.stderr
        assert sha256(small / 'f') == sha256(data)
        (summary,) = json_summaries(done)
        assert summary['resumed_bytes'] == held
        assert summary['received_bytes'] <= summary['file_bytes'] - summary['resumed_bytes']
        assert not (small / '.f.wxstate').exists() and not (small / '.f.wxpart').exists()
    finally:
        subprocess.run(['umount', '-l', str(small)])


def test_demo_runs_a_verified_transfer_through_the_emulator():
    done = subprocess.run([sys.executable, WANXFER, 'demo', '--size', '2M', '--rtt', '20',
                           '--loss', '2', '--json', '--no-tcp'], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    (summary,) = json_summaries(done)
    assert summary['verified'] is True and summary['file_bytes'] == 2 * 1024 * 1024
    assert summary['packets_retransmitted'] > 0          # the emulated loss was repaired
    assert '20 ms round trip, 2% loss' in done.stderr


def test_demo_started_in_the_background_still_stops_its_helpers_with_sigint():
    # A shell starts background jobs with SIGINT ignored, and children
    # inherit that: the demo stops its helpers with SIGINT (the emulator
    # then prints its counters), so it must let them take it.
    done = subprocess.run([sys.executable, WANXFER, 'demo', '--size', '1M', '--rtt', '10',
                           '--loss', '0', '--no-tcp'], capture_output=True, text=True,
                          timeout=120, preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                                        signal.SIG_IGN))
    assert done.returncode == 0, done.stderr
    assert 'Link (server to client): ' in done.stdout, done.stdout


def test_demo_without_root_says_what_the_tcp_comparison_needs():
    # As if not root: wanxfer alone, and one line on what plain TCP beside it
    # needs (never a TCP figure through a relay that hides the path's loss).
    script = ('import sys; sys.path.insert(0, %r); import wanxfer; '
              'wanxfer.packet_link_unavailable = lambda: "root"; '
              'sys.exit(wanxfer.main(sys.argv[1:]))' % os.path.dirname(WANXFER))
    done = subprocess.run([sys.executable, '-c', script, 'demo', '--size', '1M', '--rtt', '10',
                           '--loss', '0'], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    needs = [line for line in done.stderr.splitlines() if 'TCP' in line]
    assert len(needs) == 1 and 'needs root' in needs[0] and '--no-tcp' in needs[0], done.stderr
    assert 'plain TCP' not in done.stdout and 'Final file rate' in done.stdout
    quiet = subprocess.run([sys.executable, '-c', script, 'demo', '--size', '1M', '--rtt', '10',
                            '--loss', '0', '--no-tcp'], capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 0 and 'TCP' not in quiet.stderr, quiet.stderr


def demo_namespaces():
    done = subprocess.run(['ip', 'netns', 'list'], capture_output=True, text=True, timeout=30)
    return {line.split()[0] for line in done.stdout.splitlines()
            if line.startswith(wanxfer.PACKET_LINK_PREFIX)}


@pytest.mark.skipif(wanxfer.packet_link_unavailable() is not None,
                    reason='plain TCP across the emulated link needs %s'
                           % wanxfer.packet_link_unavailable())
def test_demo_as_root_puts_plain_tcp_beside_wanxfer_across_the_same_link():
    before = demo_namespaces()
    with netns_lock():
        done = subprocess.run([sys.executable, WANXFER, 'demo', '--size', '8M', '--rtt', '40'],
                              capture_output=True, text=True, timeout=300)
        assert demo_namespaces() == before      # made and removed again
    assert done.returncode == 0, done.stderr
    assert 'needs root' not in done.stderr
    wanxfer_rate = re.search(r'^  wanxfer +: ([0-9.]+) Mbit/s in ', done.stdout, re.M)
    tcp_rate = re.search(r'^  plain TCP \((\w+), 1 connection\) +: ([0-9.]+) Mbit/s in ',
                         done.stdout, re.M)
    assert wanxfer_rate and tcp_rate, done.stdout
    assert float(wanxfer_rate.group(1)) > 0 and float(tcp_rate.group(2)) > 0
    assert re.search(r'^  wanxfer / TCP +: [0-9.]+$', done.stdout, re.M)
    # Each transfer crossed the link as packets: the TCP one was shaped too.
    assert re.search(r'^Link \(server to client\) during TCP: [1-9][0-9]* packets forwarded',
                     done.stdout, re.M), done.stdout


LATE_PROBES = """
import threading
send_probes = wanxfer.ServerSession._send_probes
def late_probes(self):
    # The probes leave after `ready` and its listing: a loaded host or path.
    sizes = sorted({m for m in wanxfer.PROBE_MTUS + (self.route_mtu,) if m <= self.route_mtu})
    threading.Timer(0.15, send_probes, args=(self,)).start()
    return sizes
wanxfer.ServerSession._send_probes = late_probes
"""


def test_blocks_are_chosen_by_probes_that_come_after_the_listing(tmp_path, serve):
    # A listed fetch (two REMOTEs) sizes its blocks by the probes; ones that
    # come late must still count, or the blocks are the smallest a path
    # carries, and a partial copy made with other blocks is not resumed.
    for name in 'ab':
        make_file(tmp_path / name, 300_000, seed=ord(name))
    server = patched_serve(serve, [tmp_path / 'a', tmp_path / 'b'], LATE_PROBES)
    out = tmp_path / 'out'
    out.mkdir()
    done = run_get(server.port, 'a', 'b', '-o', out, '--json')
    assert done.returncode == 0, done.stderr
    assert [s['block_bytes'] for s in json_summaries(done)] == [wanxfer.block_size_for_mtu(65535)] * 2


@pytest.mark.parametrize('sessions', ['processes', 'threads'])
def test_the_first_hello_datagram_opens_the_data_channel(tmp_path, monkeypatch, serve, sessions):
    # It leaves right after the proof, so it reaches the server before the
    # session is routed: kept for it, not dropped for the next HELLO, which
    # comes a tenth of a second later (here: not before the server gives up).
    data = make_file(tmp_path / 'f', 1000)
    server = serve([data]) if sessions == 'processes' else InProcessServer([data])
    monkeypatch.setattr(wanxfer, 'HELLO_INTERVAL', wanxfer.UDP_SETUP_TIMEOUT + 20)
    client = wanxfer.Client('127.0.0.1', server.port, SECRET.encode())
    try:
        client.connect()
        listing, = client.listings(['f'])
        assert not isinstance(listing, wanxfer.RemoteError), listing
    finally:
        client.close()
        if sessions == 'threads':
            server.stop()
