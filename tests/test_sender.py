"""The sending role without sockets: an OutgoingFile driven one step at a
time, with stand-ins for its control channel, datagram socket, rate
controller and clock, to see what each request, acknowledgement, NAK and
silence makes it send."""

import hashlib
import socket
import time
import types

import pytest

from helpers import FakeClock, make_file, wanxfer

KEY_OUT, KEY_IN = bytes(range(64)), bytes(range(64, 128))
SESSION = 7
BLOCK = 1000
FIRST_SEQ = 100
WIRE = BLOCK + wanxfer.PACKET_OVERHEAD + wanxfer.ip_udp_overhead(socket.AF_INET)



class Control:
    """The control channel: what was sent."""

    backlog = 0

    def __init__(self):
        self.sent = []

    def send(self, message):
        self.sent.append(message)

    queue = send

    def flush(self):
        pass


class Datagrams:
    """The DatagramSocket: what was sent, as (block, flags) per datagram."""

    def __init__(self):
        self.sock = types.SimpleNamespace(family=socket.AF_INET)
        self.gso = False
        self.packets = []

    def send_packets(self, packets):
        self.packets.extend(packets)
        return len(packets)

    def take(self):
        sent = [wanxfer.DATA_HEADER.unpack_from(p) for p in self.packets]
        self.packets = []
        return [(block, flags) for _kind, flags, _sid, _seq, block, _stamp in sent]


class Rate:
    """The RateController: what it was told."""

    def __init__(self):
        self.rate = 2e6
        self.peak_delivery = 0.0
        self.steady = False                 # in its startup: packets not flagged DATA_FLAG_STEADY
        self.cap = None
        self.feedback = []
        self.idle = []
        self.busy = []
        self.started = []
        self.silences = 0
        self.ticks = []
        self.next_rate = None           # what the rate becomes when ticked

    def set_cap(self, cap):
        self.cap = cap

    def on_feedback(self, now, queue_delay, delivered_bytes, delivered, lost, rtt, app_limited=False,
                    sent_at=None, ack_delay=0.0):
        self.feedback.append({'delivered': delivered, 'lost': lost, 'rtt': rtt})

    def on_start(self, now, rtt):
        self.started.append(now)

    def on_tick(self, now):
        self.ticks.append((now, self.rate))
        self.rate = self.next_rate or self.rate

    def on_idle(self, now):
        self.idle.append(now)

    def on_busy(self, now):
        self.busy.append(now)

    def on_silence(self):
        self.silences += 1
        self.rate /= 2


@pytest.fixture
def sending(tmp_path):
    """sending(blocks, open_fetch=False, **request) -> the OutgoingFile
    (`file`) of a file (`path`) of `blocks` blocks, opened for a fetch of
    all of them (or an open fetch, without size and mtime) and started as
    file 1, with its stand-ins (`control`, `udp`, `rate`, `clock`)."""
    opened = []

    def open_file(blocks=20, open_fetch=False, rtt=0.1, control=None, **request):
        path = make_file(tmp_path / ('f%d' % len(opened)), blocks * BLOCK)
        st = path.stat()
        fetch = {'op': 'fetch', 'path': 'f', 'block_size': BLOCK}
        if not open_fetch:
            fetch.update(size=st.st_size, mtime_ns=st.st_mtime_ns, need=[[0, blocks]])
        fetch.update(request)
        ends = types.SimpleNamespace(control=control or Control(), udp=Datagrams(), rate=Rate(),
                                     clock=FakeClock(1000.0), path=path)
        ends.file = wanxfer.OutgoingFile(ends.control, ends.udp, wanxfer.Sealer(KEY_OUT, True),
                                         wanxfer.Sealer(KEY_IN, True), SESSION, ends.rate,
                                         wanxfer.PacketLog(), FIRST_SEQ, rtt, clock=ends.clock)
        opened.append(ends.file)
        ends.file.open(str(path), 'f', fetch, largest_block=1400)
        ends.file.start_helper(wanxfer.DigestCache(), wanxfer.SignatureCache())
        ends.file.start(1)
        return ends
    yield open_file
    for outgoing in opened:
        outgoing.close()


def from_receiver(kind, body, seq=0, key=KEY_IN, session=SESSION):
    return wanxfer.seal_datagram(wanxfer.Sealer(key, True), kind, session, seq, body)


def deliver(ends, datagram):
    return ends.file.on_datagram(bytearray(datagram), 0, len(datagram), ends.clock())


def send_all(ends):
    """What goes a second after the last send: the pacer's whole burst,
    more than these small files hold."""
    ends.clock.advance(1.0)
    return send_now(ends)


def send_now(ends):
    ends.file.pace_and_send()
    return ends.udp.take()


def test_the_start_announces_the_file_and_the_digest_closes_it(sending):
    ends = sending(blocks=20, max_rate=1e6)
    (start,) = ends.control.sent
    assert start == {'op': 'start', 'file': 1, 'first_seq': FIRST_SEQ, 'lead': 0}
    assert ends.rate.cap == 1e6
    assert send_all(ends) == [(block, 0) for block in range(20)]
    assert ends.file.next_seq == FIRST_SEQ + 20
    ends.file.finish()
    digest = ends.control.sent[-1]
    assert digest['op'] == 'digest' and digest['file'] == 1
    assert digest['sha256'] == hashlib.sha256(ends.path.read_bytes()).hexdigest()
    assert digest['packets_sent'] == 20 and digest['wire_bytes'] == 20 * WIRE


def test_the_pacer_ticks_the_rate_before_it_reads_it(sending):
    # Before the first acknowledgement only a tick moves the rate (the
    # first round trip's rung): the batch paced now goes at the new one.
    ends = sending(blocks=2000)
    ends.clock.advance(0.0005)
    ends.rate.next_rate = 2e8
    sent = send_now(ends)
    assert ends.rate.ticks and ends.rate.ticks[-1][0] == ends.clock()
    # 0.5 ms at 2 MB/s is one block; at the rate the tick made, the burst.
    assert len(sent) > 10, len(sent)


def test_an_open_fetch_is_told_the_file_and_the_block_size_that_fits(sending):
    ends = sending(blocks=4, open_fetch=True, block_size=9000)
    (start,) = ends.control.sent
    st = ends.path.stat()
    assert start == {'op': 'start', 'file': 1, 'first_seq': FIRST_SEQ, 'lead': 0, 'size': 4 * BLOCK,
                     'mtime_ns': st.st_mtime_ns, 'mode': st.st_mode & 0o7777, 'block_size': 1400,
                     'delta': False}
    assert [block for block, _flags in send_all(ends)] == [0, 1, 2]


def test_a_new_files_lead_keeps_the_sender_busy_until_the_receiver_can_ask(sending):
    # At 1.2 s round trip the receiver's first `need` comes about 1.4 s
    # after the start; until then the lead is all the sender may send.
    ends = sending(blocks=100_000, rtt=1.2, delta=True, lead=True)
    sent = 0
    for _ in range(700):
        ends.clock.advance(0.002)
        sent += len(send_now(ends))
    assert sent * WIRE >= 0.9 * ends.rate.rate * 1.4, (sent, ends.control.sent[0])


def test_a_new_files_lead_outlasts_a_need_that_tcp_had_to_send_again(sending):
    # On a lossy path the first signature piece or the first `need` often
    # loses a segment, which TCP sends again only after its tail loss
    # probe, two round trips later: at 10% loss the `need` came 0.5-0.6 s
    # after the start at 120 ms (0.25 s without), and the sender, its lead
    # gone at 0.3 s, idled.  The lead lasts until then.
    rtt = 0.3
    ends = sending(blocks=100_000, rtt=rtt, delta=True, lead=True)
    start = ends.control.sent[0]
    assert start['lead'] * BLOCK >= ends.rate.rate * (3 * rtt + 0.2), start
    sent = [block for block, _flags in send_all(ends)]
    assert sent and max(sent) < start['lead']      # unasked, and no further


def test_a_signature_the_control_socket_cannot_take_yet_does_not_hold_the_data(sending):
    # TCP passes a few signature pieces a round trip at the start of a
    # long path: they wait their turn while blocks go.
    mine, peers = socket.socketpair()
    try:
        mine.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        peers.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        control = wanxfer.ControlChannel(mine, wanxfer.Sealer(KEY_OUT, True), None)
        ends = sending(blocks=100_000, control=control, delta=True, lead=True)   # 100 MB: 4 pieces
        ends.file._job.done.wait(30)
        mine.settimeout(5.0)                # the data phase's socket, were it to block
        started = time.monotonic()
        ends.file.send_signature()
        assert time.monotonic() - started < 1.0 and control.backlog > 0
        assert send_all(ends)               # blocks go meanwhile
        peers.settimeout(5.0)
        while ends.file._signature_sent < len(ends.file._job.pieces) or control.backlog:
            peers.recv(1 << 20)             # the window opens: the rest follows
            ends.file.send_signature()
    finally:
        mine.close()
        peers.close()


@pytest.mark.parametrize('request_', [{'size': 1}, {'block_size': 1500}, {'block_size': 100}],
                         ids=['changed', 'too-large-blocks', 'too-small-blocks'])
def test_a_fetch_that_cannot_be_served_as_asked_is_refused(sending, request_):
    with pytest.raises(wanxfer.RemoteError):
        sending(blocks=4, **request_)


def test_a_nak_schedules_exactly_the_blocks_it_names_that_are_not_on_their_way(sending):
    ends = sending(blocks=20)
    send_all(ends)
    # Named within a round trip of their sending: they may still arrive.
    ends.clock.advance(0.05)
    assert deliver(ends, from_receiver(wanxfer.KIND_NAK, wanxfer.encode_nak(1, [(3, 5)])))
    ends.clock.advance(0.001)
    assert send_now(ends) == []
    # Later they are lost: resent, flagged as such, and nothing else.
    ends.clock.advance(0.2)
    assert deliver(ends, from_receiver(wanxfer.KIND_NAK,
                                       wanxfer.encode_nak(1, [(3, 5), (10, 11)]), seq=1))
    assert sorted(send_now(ends)) == [(3, wanxfer.DATA_FLAG_RETRANSMIT), (4, wanxfer.DATA_FLAG_RETRANSMIT),
                              (10, wanxfer.DATA_FLAG_RETRANSMIT)]
    assert ends.file.window.retransmitted == 3


@pytest.mark.parametrize('datagram,authentic', [
    (from_receiver(wanxfer.KIND_NAK, wanxfer.encode_nak(2, [(0, 20)])), True),     # another file's
    (from_receiver(wanxfer.KIND_FEEDBACK,
                   wanxfer.encode_feedback(2, FIRST_SEQ, FIRST_SEQ + 19, 0, 0, [(0, 3)])), True),
    (from_receiver(wanxfer.KIND_NAK, wanxfer.encode_nak(1, [(0, 20)]), session=8), False),
    (from_receiver(wanxfer.KIND_NAK, wanxfer.encode_nak(1, [(0, 20)]), key=KEY_OUT), False),
    (from_receiver(wanxfer.KIND_NAK, wanxfer.encode_nak(1, [(0, 20)]))[:-1], False),
    (from_receiver(wanxfer.KIND_NAK, wanxfer.encode_nak(1, [(5, 2)])), False),     # malformed
    (from_receiver(wanxfer.KIND_FEEDBACK, b'short'), False),
], ids=['other-file', 'other-file-feedback', 'other-session', 'forged', 'cut', 'backwards',
        'short-feedback'])
def test_datagrams_not_about_this_file_schedule_nothing(sending, datagram, authentic):
    ends = sending(blocks=20)
    send_all(ends)
    ends.clock.advance(0.5)
    assert deliver(ends, datagram) is authentic
    assert send_now(ends) == [] and ends.rate.feedback == []


def test_feedback_measures_the_round_trip_and_a_gap_old_enough_is_resent(sending):
    ends = sending(blocks=20)
    send_all(ends)
    ends.clock.advance(0.05)
    # Every packet but the third arrived; the newest 10 ms before this was sent.
    feedback = wanxfer.encode_feedback(1, FIRST_SEQ, FIRST_SEQ + 19, 10000, 0, [(2, 1)])
    assert deliver(ends, from_receiver(wanxfer.KIND_FEEDBACK, feedback))
    assert ends.file.rtt == pytest.approx(0.875 * 0.1 + 0.125 * 0.04)
    # Sent all it had: the rate control is told so, as the delivery says
    # little of the path.
    assert ends.rate.idle
    assert ends.rate.feedback == [{'delivered': 19, 'lost': 1, 'rtt': ends.file.rtt}]
    assert ends.file.window.in_flight() == 0
    assert send_now(ends) == [(2, wanxfer.DATA_FLAG_RETRANSMIT)]


def test_blocks_lost_while_fresh_ones_are_left_go_again_in_one_batch(sending):
    """At 1% of random loss one block in a hundred is sent again; each went
    on its own (a read, a seal, a system call), and across S2 the sender
    spent 0.9 CPU s/GB more than across S1.  Those known lost at once go
    in one batch under consecutive packet numbers, each sealed right."""
    ends = sending(blocks=2000)
    calls = []
    send = ends.udp.send_packets
    ends.udp.send_packets = lambda packets: calls.append(list(packets)) or send(packets)
    ends.clock.advance(0.05)
    count = len(send_now(ends))
    assert 40 < count < 2000
    ends.clock.advance(0.05)
    feedback = wanxfer.encode_feedback(1, FIRST_SEQ, FIRST_SEQ + count - 1, 0, 0,
                                       [(3, 1), (10, 2), (30, 1)])
    assert deliver(ends, from_receiver(wanxfer.KIND_FEEDBACK, feedback))
    del calls[:]
    ends.clock.advance(0.01)
    sent = send_now(ends)
    assert sorted(block for block, flags in sent if flags & wanxfer.DATA_FLAG_RETRANSMIT) == \
        [3, 10, 11, 30]
    assert len(calls[0]) == 4               # one batch, before any fresh block
    opener = wanxfer.Sealer(KEY_OUT, True)
    opener.set_stride(BLOCK)
    data = ends.path.read_bytes()
    size = wanxfer.DATA_HEADER.size
    seqs = []
    for packet in calls[0]:
        _kind, flags, _sid, seq, block, _stamp = wanxfer.DATA_HEADER.unpack_from(packet)
        assert flags == wanxfer.DATA_FLAG_RETRANSMIT
        assert opener.open(seq, packet[:size], packet[size:]) == data[block * BLOCK:(block + 1) * BLOCK]
        seqs.append(seq)
    assert seqs == list(range(FIRST_SEQ + count, FIRST_SEQ + count + 4))
    assert ends.file.window.retransmitted == 4
    # Lost again, each is known by its packet number and goes once more.
    ends.clock.advance(0.2)
    largest = ends.file.next_seq - 1
    feedback = wanxfer.encode_feedback(1, FIRST_SEQ + count, largest, 0, 0, [(1, 1)])
    assert deliver(ends, from_receiver(wanxfer.KIND_FEEDBACK, feedback, seq=1))
    again = [block for block, flags in send_now(ends) if flags & wanxfer.DATA_FLAG_RETRANSMIT]
    assert again == [wanxfer.DATA_HEADER.unpack_from(calls[0][1])[4]]


def test_data_says_when_the_rate_control_is_past_its_startup(sending):
    """A striped flow's receiver acknowledges every k intervals on a long
    path only while the data it takes says its sender is past the startup
    (DATA_FLAG_STEADY): in a startup each is acknowledged every interval,
    sent again or not."""
    ends = sending(blocks=2000)
    ends.clock.advance(0.05)
    first = send_now(ends)
    count = len(first)
    assert count > 40 and not any(flags for _block, flags in first)
    ends.rate.steady = True
    ends.clock.advance(0.05)
    feedback = wanxfer.encode_feedback(1, FIRST_SEQ, FIRST_SEQ + count - 1, 0, 0, [(3, 1)])
    assert deliver(ends, from_receiver(wanxfer.KIND_FEEDBACK, feedback))
    ends.clock.advance(0.01)
    sent = send_now(ends)
    assert sent and all(flags & wanxfer.DATA_FLAG_STEADY for _block, flags in sent), sent
    assert [block for block, flags in sent if flags & wanxfer.DATA_FLAG_RETRANSMIT] == [3]
    ends.rate.steady = False                # a startup again (a probe that found much more room)
    ends.clock.advance(0.01)
    sent = send_now(ends)
    assert sent and not any(flags & wanxfer.DATA_FLAG_STEADY for _block, flags in sent), sent


def test_need_done_and_abort_from_the_receiver(sending):
    ends = sending(blocks=20, need=[])
    assert send_all(ends) == []
    assert ends.file.on_control({'op': 'need', 'file': 1, 'ranges': [[4, 6]]}) is None
    assert ends.file.on_control({'op': 'need', 'file': 2, 'ranges': [[8, 9]]}) is None
    ends.clock.advance(0.1)
    assert send_now(ends) == [(4, 0), (5, 0)]
    with pytest.raises(wanxfer.ProtocolError):
        ends.file.on_control({'op': 'need', 'file': 1, 'ranges': [[19, 21]]})
    assert ends.file.on_control({'op': 'done', 'file': 2}) is None
    assert ends.file.on_control({'op': 'done', 'file': 1}) is True
    assert sending(blocks=2).file.on_control({'op': 'abort'}) is False


def test_silence_halves_the_rate_while_data_is_in_flight_and_ends_the_file_at_last(sending):
    ends = sending(blocks=20)
    send_all(ends)
    ends.clock.advance(0.2)                     # 1.2 s since the start, no word
    for _ in range(5):
        ends.file.check_silence()
    # Once each silent MIN_FEEDBACK_SILENCE (4 round trips are less), not each wakeup.
    assert ends.rate.silences == 2 and ends.file.outcome is None
    ends.clock.advance(wanxfer.DATA_TIMEOUT)
    ends.file.check_silence()
    assert ends.file.outcome is False and ends.file.failure.startswith('no feedback for 30 s')


def test_a_receiver_with_nothing_in_flight_may_be_silent_while_it_looks_for_its_data(sending):
    ends = sending(blocks=20, need=[])
    send_all(ends)
    ends.clock.advance(wanxfer.DATA_TIMEOUT + 1)
    ends.file.check_silence()
    assert ends.file.outcome is None and ends.rate.silences == 0
    ends.clock.advance(wanxfer.COMMAND_TIMEOUT)
    ends.file.check_silence()
    assert ends.file.outcome is False
