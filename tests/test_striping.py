"""Striping a file over worker processes, without processes or sockets:
how blocks are cut into stripes and shared out, what each worker's window
sees, per-worker keys, and what a receiving coordinator tells its workers
during a delta."""
import collections
import functools
import socket
import threading
import time
import types

import pytest

from helpers import FakeClock, wanxfer


def test_stripes_go_round_robin_and_cover_each_range_once():
    ranges = [(0, 10), (12, 30), (31, 32)]
    parts = wanxfer.split_stripes(ranges, 4, 3)
    assert parts[0] == [(0, 4), (12, 16), (24, 28)]
    assert parts[1] == [(4, 8), (16, 20), (28, 30), (31, 32)]
    assert parts[2] == [(8, 10), (20, 24)]
    blocks = sorted(b for part in parts for start, end in part for b in range(start, end))
    assert blocks == [b for start, end in ranges for b in range(start, end)]
    assert wanxfer.split_stripes(ranges, 4, 1) == [ranges]


def test_a_workers_view_holds_every_other_workers_block():
    nblocks, stripe, count = 23, 4, 3
    held = bytearray((nblocks + 7) // 8)
    wanxfer.set_bits(held, 5, 6)                        # held already (a resume)
    for index in range(count):
        view = wanxfer.stripe_view(held, nblocks, stripe, count, index)
        window = wanxfer.ReceiveWindow(nblocks, 0, view)
        mine = [b for b in range(nblocks) if (b // stripe) % count == index]
        missing = [b for start, end in window.missing() for b in range(start, end)]
        assert missing == [b for b in mine if b != 5]
        assert wanxfer.foreign_blocks(nblocks, stripe, count, index) == nblocks - len(mine)
    assert held == bytes([0x20, 0, 0])                  # the bitmap itself is untouched


def test_how_many_workers_a_file_gets():
    per = wanxfer.STRIPES_PER_WORKER
    assert wanxfer.stripe_workers(per * 10 - 1, 10, 8) == 1    # too few stripes to share
    assert wanxfer.stripe_workers(2 * per * 10, 10, 8) == 2
    assert wanxfer.stripe_workers(100 * per * 10, 10, 3) == 3  # no more than there are


def striped_share(tmp_path, count, need=None, cycles=True, stripes=384, delta=False):
    """An OutgoingFile of `stripes` stripes striped over `count` workers
    (no processes), asked for blocks `need` (all of them by default), or
    for a delta (its need to come)."""
    block = wanxfer.MAX_BLOCK_SIZE
    stripe = wanxfer.STRIPE_BYTES // block
    path = tmp_path / 'big.bin'
    with open(path, 'wb') as f:
        f.truncate(stripes * stripe * block)             # sparse: only its size is read
    st = path.stat()
    controller = types.SimpleNamespace(rate=1000.0, set_cap=lambda cap: None)
    outgoing = wanxfer.OutgoingFile(None, None, wanxfer.Sealer(bytes(64), True),
                                    wanxfer.Sealer(bytes(64), True), bytes(8), controller, None,
                                    0, 0.1)
    outgoing.open(str(path), 'big.bin', {'size': st.st_size, 'mtime_ns': st.st_mtime_ns,
                                         'block_size': block,
                                         'need': [] if delta else need or [[0, stripes * stripe]],
                                         'delta': delta},
                  wanxfer.MAX_BLOCK_SIZE)
    team = types.SimpleNamespace(cycles=cycles, rate_changed=lambda: None)
    outgoing.stripe(team, count)
    return outgoing, stripe


def test_the_coordinator_and_the_helper_send_fewer_stripes_by_the_work_only_they_do(tmp_path):
    """Besides their stripes the coordinator (worker 0) runs the control
    channel and the rate control, and worker 1 reads the whole file for its
    digest (a delta's signature): each gets fewer stripes by the fraction
    measured (worker_extras(): COORDINATOR_EXTRA*, HELPER_EXTRA*) so that
    each process's work is about equal."""
    for delta in (False, True):
        for count in (2, 3, 4):
            outgoing, stripe = striped_share(tmp_path, count, delta=delta)
            extras = wanxfer.worker_extras(outgoing.nblocks, outgoing.nblocks, delta, outgoing.block_size)
            blocks = [sum(end - start for start, end in part) for part in outgoing._parts]
            share = [wanxfer.cycle_shares(outgoing.stripe_cycle, count)[i] for i in range(count)]
            if not delta:
                assert sum(blocks) == outgoing.nblocks
                assert [b / outgoing.nblocks for b in blocks] == pytest.approx(share, abs=0.02)
            # Each process's stripes and its own work are about equal, but
            # for one whose own work is more than that: it keeps the least share.
            least = wanxfer.LEAST_STRIPE_SHARE / count
            work = [s + (extras[i] if i < 2 else 0.0) for i, s in enumerate(share)
                    if s > least + 1.0 / len(outgoing.stripe_cycle)]
            assert max(work) - min(work) <= 0.04, (count, delta, share)    # a round's granularity
            assert min(share) >= least - 1.0 / len(outgoing.stripe_cycle), (count, delta, share)
            assert max(share[:2]) < min(share[2:] or [1.0])
            # Each paces at its share of the one rate: all of them send for as long.
            rates = [outgoing.shared_rate.share(i).rate for i in range(count)]
            assert sum(rates) == pytest.approx(1000.0)
            for rate, part in zip(rates, share):
                assert rate == pytest.approx(1000.0 * part, rel=0.2)
            assert outgoing._need == outgoing._parts[0]
    # A resumed file still needs its whole digest: worker 1 gets fewer
    # stripes still, the coordinator as many.
    full = striped_share(tmp_path, 2)[0]
    resumed, stripe = striped_share(tmp_path, 2, need=[[0, 24 * stripe]])
    full_shares = wanxfer.cycle_shares(full.stripe_cycle, 2)
    resumed_shares = wanxfer.cycle_shares(resumed.stripe_cycle, 2)
    assert resumed_shares[1] < full_shares[1] * 0.75
    assert resumed_shares[0] >= full_shares[0]
    # A delta's need comes later, mostly all of a new file's (`lead`): dealt
    # as if all were to be sent.
    delta, _stripe = striped_share(tmp_path, 2, delta=True)
    assert delta.delta and delta._need == []
    assert delta.stripe_cycle == wanxfer.stripe_cycle(
        2, wanxfer.worker_extras(delta.nblocks, delta.nblocks, True, delta.block_size))


def test_the_helpers_digest_weighs_more_beside_stripes_of_large_blocks():
    """A digest costs the same per byte whatever the blocks, stripes more
    per byte the smaller their blocks (each datagram is sealed, sent,
    received and written on its own).  So worker 1, the helper, is dealt
    more stripes at a 1500-byte MTU's blocks than at loopback's, as
    measured: its extra 0.25 of the stripes' work there against 0.34 (a
    delta's; 0.29 against 0.40 plain); the coordinator's the same at both."""
    for delta, wan, loopback in ((True, 0.25, 0.34), (False, 0.29, 0.40)):
        small = wanxfer.worker_extras(1000, 1000, delta, 1430)
        large = wanxfer.worker_extras(1000, 1000, delta, 65465)
        assert small[1] == pytest.approx(wan, abs=0.01)
        assert large[1] == pytest.approx(loopback, abs=0.01)
        assert small[0] == large[0]
        for count in (2, 3):
            assert wanxfer.cycle_shares(wanxfer.stripe_cycle(count, small), count)[1] > \
                wanxfer.cycle_shares(wanxfer.stripe_cycle(count, large), count)[1]


def test_stripe_cycle_weighs_each_workers_own_work():
    """stripe_cycle() with the extra work of each worker (no sockets):
    worker i gets (1 + sum x) / count - x_i of the stripes, one a round at
    least, and one extra works as worker 0's alone did."""
    count = 4
    cycle = wanxfer.stripe_cycle(count, [0.1, 0.15])
    shares = wanxfer.cycle_shares(cycle, count)
    assert len(cycle) == wanxfer.STRIPE_CYCLE * count and cycle[0] == 0
    expected = [(1 + 0.25) / count - x for x in (0.1, 0.15, 0.0, 0.0)]
    assert shares == pytest.approx(expected, abs=1.0 / len(cycle))
    # Work besides the stripes, then stripes: equal for all.
    work = [s + x for s, x in zip(shares, (0.1, 0.15, 0.0, 0.0))]
    assert max(work) - min(work) <= 1.0 / wanxfer.STRIPE_CYCLE
    # A worker whose own work is more than a share keeps the least share
    # (one that sends seldom holds the one rate back); the others even out
    # the rest.
    cycle = wanxfer.stripe_cycle(3, [0.05, 2.0])
    assert cycle.count(1) == round(len(cycle) * wanxfer.LEAST_STRIPE_SHARE / 3)
    assert abs(cycle.count(0) + 0.05 * len(cycle) - cycle.count(2)) <= 1
    # A number is worker 0's extra, as before; none, round robin.
    assert wanxfer.stripe_cycle(3, 0.25) == wanxfer.stripe_cycle(3, [0.25, 0.0, 0.0])
    assert wanxfer.stripe_cycle(3, [0.0, 0.0]) == [0, 1, 2] * wanxfer.STRIPE_CYCLE
    # Any run of a few stripes is shared about as the whole round is.
    cycle = wanxfer.stripe_cycle(5, [0.2, 0.3, 0.1])
    shares = wanxfer.cycle_shares(cycle, 5)
    for start in range(len(cycle)):
        window = (cycle * 2)[start:start + 10]
        for i in range(5):
            assert abs(window.count(i) - shares[i] * 10) < 2


def test_a_client_without_weighted_deals_gets_stripes_round_robin(tmp_path):
    outgoing, stripe = striped_share(tmp_path, 3, cycles=False, stripes=48)
    assert outgoing.stripe_cycle is None
    assert [len(part) for part in outgoing._parts] == [16, 16, 16]
    assert outgoing._parts[1][0] == (stripe, 2 * stripe)
    assert [outgoing.shared_rate.share(i).rate for i in range(3)] == [pytest.approx(1000 / 3)] * 3


def test_a_weighted_deal_interleaves_the_workers_and_each_end_sees_it_alike():
    for count in (2, 3, 5, 8):
        cycle = wanxfer.stripe_cycle(count, wanxfer.worker_extras(1, 1, True, 1430))
        assert len(cycle) == wanxfer.STRIPE_CYCLE * count <= wanxfer.MAX_STRIPE_CYCLE
        # Stripe 0 is the coordinator's, and a file of the fewest stripes
        # for `count` gives each worker some (a share with nothing to send
        # never acknowledges, and the shared rate waits on it).
        assert cycle[0] == 0
        assert set(cycle[:wanxfer.STRIPES_PER_WORKER * count]) == set(range(count))
        assert all(cycle.count(i) > max(cycle.count(0), cycle.count(1)) for i in range(2, count))
        # Any run of a few stripes is shared about as the whole round is.
        shares = wanxfer.cycle_shares(cycle, count)
        for start in range(len(cycle)):
            window = (cycle * 2)[start:start + 2 * count]
            for i in range(count):
                assert abs(window.count(i) - shares[i] * 2 * count) < 2
    assert wanxfer.stripe_cycle(3, 0.0) == [0, 1, 2] * wanxfer.STRIPE_CYCLE
    # The sender's split of ranges and a receiving worker's view agree.
    nblocks, stripe, count = 200, 4, 3
    cycle = wanxfer.stripe_cycle(count, 0.25)
    parts = wanxfer.split_stripes([(0, nblocks)], stripe, count, cycle)
    held = bytearray((nblocks + 7) // 8)
    for index in range(count):
        window = wanxfer.ReceiveWindow(nblocks, 0, wanxfer.stripe_view(held, nblocks, stripe, count,
                                                                       index, cycle))
        assert window.missing() == parts[index]
        assert wanxfer.foreign_blocks(nblocks, stripe, count, index, cycle) == \
            nblocks - sum(end - start for start, end in parts[index])


def test_a_server_dealing_stripes_to_workers_it_does_not_use_is_refused():
    incoming = wanxfer.IncomingFile('big.bin', '/nonexistent/big.bin', None, None, None, None, 0.1)
    incoming.team = types.SimpleNamespace(count=3)
    start = {'workers': [0], 'stripe': wanxfer.STRIPE_BYTES // 1430, 'cycle': [0, 1, 2]}
    with pytest.raises(wanxfer.ProtocolError, match='workers it does not use'):
        incoming._team_for(start, 1430)
    start['cycle'] = []
    with pytest.raises(wanxfer.ProtocolError, match='workers it does not use'):
        incoming._team_for(start, 1430)
    start['cycle'] = [1, 0, 1]
    assert incoming._team_for(start, 1430) is incoming.team


def test_each_worker_has_keys_of_its_own_and_worker_0_the_sessions():
    keys = wanxfer.SessionKeys(bytes(32), bytes(32), bytes(range(32)), True)
    session = keys.sealers('server')
    header = bytes(14)
    tags = set()
    for index in range(4):
        out, _in = keys.worker_sealers('server', index)
        client_out, client_in = keys.worker_sealers('client', index)
        assert client_in.tag(header, b'x') == out.tag(header, b'x')    # the two ends agree
        tags.add(out.tag(header, b'x'))
    assert keys.worker_sealers('server', 0)[0].tag(header, b'x') == session[2].tag(header, b'x')
    assert len(tags) == 4


class Team:
    """A ReceivingTeam's stand-in: what the coordinator tells its workers."""

    def __init__(self):
        self.told = []

    def forward_held(self, ranges):
        self.told.append(('held', list(ranges)))

    def forward_decided(self, decided):
        self.told.append(('decided', decided))


def test_workers_hear_of_decided_blocks_only_with_those_local_data_filled():
    # A worker NAKs what is decided and not held: told the decided blocks
    # before the ones local data filled (zeros, say), it NAKs those, and
    # the sender sends a whole stripe of them (seen once, as 2 MB too many
    # on the wire of a sparse file).
    nblocks, stripe = 64, 8
    team = Team()
    bitmap = bytearray(nblocks // 8)
    window = wanxfer.ReceiveWindow(nblocks, 0, wanxfer.stripe_view(bitmap, nblocks, stripe, 2, 0))
    window.decided = 0
    incoming = types.SimpleNamespace(
        start={'file': 1, 'first_seq': 0, 'lead': 0, 'stripe': stripe, 'workers': [0]}, rtt=0.01,
        conversation=types.SimpleNamespace(channel=None, send=lambda message: None),
        data=types.SimpleNamespace(session_id=1, sealer_in=None, control=None), events=None, clock=lambda: 0.0,
        entry=types.SimpleNamespace(size=nblocks * 1024), block_size=1024, kept=[], bitmap=bitmap)
    writer = types.SimpleNamespace(mark_written=lambda ranges: None)

    class Assembler:
        on_planned = None

        def on_piece(self, offset, spans, refined):
            self.on_planned([], nblocks)                # decides every block, plans none
            return [(0, 32)], nblocks, None             # and finds the first half locally

    phase = wanxfer.ReceivePhase(incoming, window, writer, Assembler(), team=team)
    phase._ask = lambda ranges, held: None
    phase._apply_signature({'offset': 0, 'spans': wanxfer.encode_spans([]), 'file': 1})
    decided_at = [i for i, (what, _value) in enumerate(team.told) if what == 'decided']
    held_at = [i for i, (what, _value) in enumerate(team.told) if what == 'held']
    assert held_at and decided_at and held_at[0] < decided_at[0], team.told


def test_a_workers_longest_message_arrives_whole():
    # A report of MAX_WORKER_RANGES written runs is 4103 bytes: received
    # into a buffer of 4096 (the session messages' size) its last run was
    # cut off, never recorded as written.
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    marked = []
    team = wanxfer.ReceivingTeam.__new__(wanxfer.ReceivingTeam)
    team._file_id, team._writer = 3, types.SimpleNamespace(mark_written=marked.extend)
    worker = wanxfer.ReceivingWorker(1, 0, mine)
    runs = [(2 * i, 2 * i + 1) for i in range(wanxfer.MAX_WORKER_RANGES)]
    try:
        (message,) = wanxfer.worker_ranges(b'W', 3, runs)
        theirs.send(message)
        team._read(worker, None)
    finally:
        mine.close()
        theirs.close()
    assert marked == runs


def whole_worker_share():
    """A receiving worker's phase (worker 1, on loopback) whose 4-block
    share has all arrived: (phase, the socket its feedback goes to, its
    own, the coordinator's end of its socketpair, its end, the server's
    sealer that opens its feedback)."""
    keys = wanxfer.SessionKeys(bytes(32), bytes(32), bytes(32), True)
    out, opener = keys.worker_sealers('client', 1)
    server_in = keys.worker_sealers('server', 1)[1]
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(('127.0.0.1', 0))
    rx.settimeout(5.0)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.connect(rx.getsockname())
    coordinator, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    data = wanxfer.DataChannel(wanxfer.DatagramSocket(tx), out, opener, keys.session_id, hello_flags=1)
    window = wanxfer.ReceiveWindow(4, 0)
    for block in range(4):
        window.on_packet(block, block, 0, 0.0)
    writer = types.SimpleNamespace(sync=lambda: None, take_written=lambda: [], written_bytes=0,
                                   flush=lambda: None)
    incoming = types.SimpleNamespace(
        start={'file': 1, 'first_seq': 0, 'lead': 0}, rtt=0.01,
        conversation=types.SimpleNamespace(channel=wanxfer.WorkerInbox(worker_end), timeout=5,
                                           peer='server'),
        data=data, events=wanxfer.TransferEvents(), clock=time.monotonic, asked_at=time.monotonic(),
        entry=types.SimpleNamespace(size=4096), block_size=1024, kept=[])
    phase = wanxfer.WorkerReceivePhase(incoming, window, writer, worker_end, 0)
    return phase, rx, tx, coordinator, worker_end, server_in


def running(phase):
    """`phase` run on a thread; (the thread, a list that says how it ended)."""
    ended = []

    def run():
        try:
            phase.run()
            ended.append('returned')
        except wanxfer.ShareEnded:
            ended.append('ended')
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, ended


def end_share(coordinator, thread, ended):
    """The coordinator ends the file: the share's phase ends with ShareEnded."""
    coordinator.send(wanxfer.WORKER_END.pack(b'E', 1))
    thread.join(5.0)
    assert ended == ['ended']


def next_feedback(rx, opener):
    """The fields of the next authentic FEEDBACK datagram on `rx`."""
    while True:
        datagram = rx.recv(2048)
        kind, _flags, _sid, seq = wanxfer.PACKET_HEADER.unpack_from(datagram)
        body = opener.open(seq, datagram[:wanxfer.PACKET_HEADER.size],
                           datagram[wanxfer.PACKET_HEADER.size:])
        if kind == wanxfer.KIND_FEEDBACK and body is not None:
            return wanxfer.decode_feedback(body)


@pytest.mark.e2e
def test_a_complete_share_keeps_acknowledging_until_the_file_ends():
    # A worker whose share is whole, stopping at once, left its last
    # packets unacknowledged: its sender saw them in flight and silence,
    # and halved the rate every worker shares, every half second, until
    # the whole file was done.
    phase, rx, tx, coordinator, worker_end, server_in = whole_worker_share()
    thread, ended = running(phase)
    try:
        acknowledged = [next_feedback(rx, server_in)[2] for _ in range(2)]
        assert acknowledged == [3, 3]                   # the last packet, and again
        coordinator.settimeout(5.0)
        assert coordinator.recv(65536)[:1] == b'C'      # its share said complete
        end_share(coordinator, thread, ended)
    finally:
        for sock in (rx, tx, coordinator, worker_end):
            sock.close()


@pytest.mark.e2e
def test_a_complete_share_sleeps_between_its_acknowledgements():
    # A worker whose share was whole looped with no wait at all until the
    # file ended (its NAK and report timers, stopped, stayed in the past):
    # about 10,000 turns of its loop in a 256 MiB transfer on loopback,
    # CPU that two workers cost and one did not.
    phase, rx, tx, coordinator, worker_end, server_in = whole_worker_share()
    turns = []
    send_feedback = phase._send_feedback

    def counted(now):
        turns.append(now)                       # once a turn of the loop
        send_feedback(now)
    phase._send_feedback = counted
    thread, ended = running(phase)
    try:
        coordinator.settimeout(5.0)
        assert coordinator.recv(65536)[:1] == b'C'      # its share said complete
        for _ in range(6):                              # its final one, then 5 repeats
            next_feedback(rx, server_in)
        # Repeats come every idle_limit (20 ms), the loop's turns once a
        # feedback interval (5 ms): about 4 turns a repeat, far from a spin.
        assert len(turns) < 100, '%d turns of the loop for 5 repeated acknowledgements' % len(turns)
        end_share(coordinator, thread, ended)
    finally:
        for sock in (rx, tx, coordinator, worker_end):
            sock.close()


def test_a_fork_is_taken_once_a_session_on_the_way_to_a_start():
    """A client that forks its workers lazily is told by `fork` just before
    the first striped file's `start`; a second `fork` is refused."""
    messages = collections.deque([{'op': 'fork'}, {'op': 'start', 'file': 1}, {'op': 'fork'},
                                  {'op': 'start', 'file': 2}])
    conversation = wanxfer.Conversation(types.SimpleNamespace(recv=messages.popleft), 1.0)
    forks = []
    client = types.SimpleNamespace(conversation=conversation, _fork_workers=lambda: forks.append(1))
    conversation.on_fork = functools.partial(wanxfer.Client._told_to_fork, client)
    assert conversation.expect('start')['file'] == 1 and forks == [1]
    with pytest.raises(wanxfer.ProtocolError, match='got fork'):
        conversation.expect('start')
    assert forks == [1]


def test_a_server_naming_tiny_stripes_is_refused_in_one_line():
    # Each stripe costs the receiver a step of Python: stripes of one
    # block would make a large file cost a loop per block.
    incoming = wanxfer.IncomingFile('big.bin', '/nonexistent/big.bin', None, None, None, None, 0.1)
    incoming.team = types.SimpleNamespace(count=3)
    start = {'workers': [0, 0], 'stripe': 1}
    with pytest.raises(wanxfer.ProtocolError, match='runs of 1 blocks'):
        incoming._team_for(start, 1430)
    start['stripe'] = wanxfer.STRIPE_BYTES // 1430
    assert incoming._team_for(start, 1430) is incoming.team


def test_a_receiving_worker_that_cannot_read_the_file_back_says_so_in_one_message(tmp_path):
    # Worker 1 hashes a striped file as it is written; a file it cannot
    # read back (gone, unreadable) must reach the coordinator as the
    # worker's one-line failure, not end the worker with a traceback.
    coordinator, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with coordinator, worker:
        following = wanxfer.FollowingDigest()
        following.share(7, str(tmp_path / 'gone.wxpart'), 4096, 1024)
        following.take(wanxfer.WORKER_FRONTIER.pack(b'Z', 7, 4), worker)
        coordinator.settimeout(5)
        message = coordinator.recv(65536)
    code, file_id = wanxfer.WORKER_PROGRESS.unpack_from(message)[:2]
    assert (code, file_id) == (b'X', 7)
    assert 'cannot read back' in message[wanxfer.WORKER_PROGRESS.size:].decode()


def test_sending_workers_are_told_when_the_rate_control_leaves_its_startup():
    # Each worker flags its data DATA_FLAG_STEADY past the startup (its
    # receiver then acknowledges every k intervals on a long path): the
    # coordinator tells them so as soon as it is, the rate unchanged or not.
    controller = types.SimpleNamespace(rate=1e6, peak_delivery=0.0, steady=False)
    team = wanxfer.SendingTeam.__new__(wanxfer.SendingTeam)
    near, far = socket.socketpair()
    try:
        team._controller, team._told = controller, (0.0, (), float('-inf'), False)
        team._shared = wanxfer.SharedRate(controller, 2)
        team._active = [types.SimpleNamespace(index=1, channel=near)]
        rate = wanxfer.WorkerRate(far)
        far.settimeout(5.0)
        team.rate_changed()
        rate.update(far.recv(wanxfer.MAX_WORKER_MESSAGE))
        assert (rate.rate, rate.steady) == (0.5e6, False)
        controller.steady = True
        team.rate_changed()
        rate.update(far.recv(wanxfer.MAX_WORKER_MESSAGE))
        assert (rate.rate, rate.steady) == (0.5e6, True)
        team.rate_changed()                 # nothing new: nothing said
        far.setblocking(False)
        with pytest.raises(BlockingIOError):
            far.recv(wanxfer.MAX_WORKER_MESSAGE)
    finally:
        near.close()
        far.close()


# --- A receiving worker's reports ---------------------------------------------
# Each report is a wakeup of the worker, two messages, a wakeup of the
# coordinator and a frontier message that wakes worker 1.  Every 50 ms
# whatever the rate, a slow share (half of S4's 100 Mbit/s) paid for 20 a
# second what a few MB written between two would have told as well.

def reporting_share(clock):
    """A receiving worker's phase (no sockets) on `clock` whose reports
    are listed as (time, bytes written then)."""
    keys = wanxfer.SessionKeys(bytes(32), bytes(32), bytes(32), True)
    out, opener = keys.worker_sealers('client', 1)
    writer = types.SimpleNamespace(written_bytes=0)
    incoming = types.SimpleNamespace(
        start={'file': 1, 'first_seq': 0, 'lead': 0}, rtt=0.3,
        conversation=types.SimpleNamespace(channel=None, timeout=5, peer='server'),
        data=types.SimpleNamespace(session_id=keys.session_id, sealer_in=opener, control=None),
        events=wanxfer.TransferEvents(), clock=clock, asked_at=clock(),
        entry=types.SimpleNamespace(size=1 << 30), block_size=1024, kept=[])
    window = wanxfer.ReceiveWindow((1 << 30) // 1024, 0)
    phase = wanxfer.WorkerReceivePhase(incoming, window, writer, None, 0, flows=2)
    reports = []
    phase.report = lambda code, text='': reports.append((clock(), writer.written_bytes))
    return phase, writer, reports


@pytest.mark.parametrize('mbit', [46, 2000])
def test_a_slow_share_reports_what_it_wrote_seldom_and_a_fast_one_as_often_as_before(mbit):
    clock = FakeClock()
    phase, writer, reports = reporting_share(clock)
    seconds, wakeup = 3.0, 0.005
    while clock.now < seconds:
        # The writer hands over whole megabytes; the loop wakes every 5 ms.
        clock.advance(wakeup)
        writer.written_bytes = int(clock.now * mbit * 1e6 / 8) >> 20 << 20
        phase._report_progress(clock.now)
    times = [when for when, _written in reports]
    gaps = [b - a for a, b in zip([0.0] + times, times)]
    if mbit < 100:
        # 5.75 MB/s: 4 MiB is 0.73 s, so once every WORKER_REPORT_MOST.
        assert len(reports) <= seconds / wanxfer.WORKER_REPORT_MOST + 1, gaps
    else:
        # 4 MiB is written in 17 ms: every WORKER_REPORT_INTERVAL, as before.
        assert len(reports) >= 0.9 * seconds / (wanxfer.WORKER_REPORT_INTERVAL + wakeup), gaps
    # However slow, a report at least every WORKER_REPORT_MOST (and the
    # timer that brings it is the phase's next wakeup).
    assert max(gaps) <= wanxfer.WORKER_REPORT_MOST + wakeup + 1e-9, gaps
    assert min(gaps) >= wanxfer.WORKER_REPORT_INTERVAL - 1e-9, gaps
    assert phase._wake_at() <= times[-1] + wanxfer.WORKER_REPORT_MOST + 1e-9
