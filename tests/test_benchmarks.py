"""The benchmarks under tests/bench/ cannot run here (root, minutes), but
they must keep starting: each answers --help, and the harness's pieces
that need no root do what the README's recipes say."""

import glob
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'bench'))
import harness  # noqa: E402

BENCHMARKS = sorted(glob.glob(os.path.join(harness.HERE, 'bench_*.py')))


@pytest.mark.e2e
@pytest.mark.parametrize('script', BENCHMARKS, ids=os.path.basename)
def test_every_benchmark_answers_help(script):
    done = subprocess.run([sys.executable, script, '--help'], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith('usage: ') and not done.stderr


@pytest.mark.parametrize('options, netem, tbf', [
    ('--delay 60 --rate 1000 --queue 50', 'netem delay 60ms limit 10000',
     'tbf rate 1000mbit burst 125000 latency 50ms'),
    ('--delay 60 --rate 1000 --queue 50 --loss 1', 'netem delay 60ms loss 1% limit 10000',
     'tbf rate 1000mbit burst 125000 latency 50ms'),
    ('--delay 100 --rate 500 --queue 50 --loss 2 --burst 5',
     'netem delay 100ms loss gemodel 0.4082% 20% 100% 0% limit 8334',
     'tbf rate 500mbit burst 62500 latency 50ms'),
    ('--delay 150 --rate 100 --queue 100 --loss 0.5', 'netem delay 150ms loss 0.5% limit 2500',
     'tbf rate 100mbit burst 15000 latency 100ms'),
], ids=['S1', 'S2', 'S3', 'S4'])
def test_the_netem_backend_shapes_each_scenario_as_the_readme_recipe(options, netem, tbf):
    assert [' '.join(q) for q in harness.netem_qdiscs(options)] == [netem, tbf]


def test_the_netem_backend_refuses_what_only_wanemu_can_do():
    for options in ('--delay 60 --mtu 1400', '--udp-loss 100', '--ab --delay 60', '--jitter 5'):
        with pytest.raises(harness.BenchError):
            harness.netem_qdiscs(options)
    assert harness.netem_qdiscs('--delay 30 --seed 4') == (['netem', 'delay', '30ms', 'limit', '1000'], None)


def test_the_wan_script_is_found_beside_the_checkout_or_a_directory_above(tmp_path, monkeypatch):
    monkeypatch.delenv('WANEMU', raising=False)
    wan = tmp_path / 'work' / 'shared' / 'wanemu' / 'wan'
    wan.parent.mkdir(parents=True)
    wan.write_text('#!/bin/sh\n')
    wan.chmod(0o755)
    for checkout in (tmp_path / 'work' / 'main', tmp_path / 'work' / 'wt' / 'mine'):
        monkeypatch.setattr(harness, 'ROOT', str(checkout))
        assert harness.find_wan() == str(wan)
    monkeypatch.setattr(harness, 'ROOT', str(tmp_path / 'elsewhere' / 'checkout'))
    assert harness.find_wan() is None
    monkeypatch.setenv('WANEMU', '/opt/wan')
    assert harness.find_wan() == '/opt/wan'


def test_the_benchmarks_say_when_this_machine_hands_freed_memory_to_its_host(tmp_path, monkeypatch,
                                                                               capsys):
    """A VM's free page reporting makes the receiving end's CPU figures grow
    over the runs (README, Benchmarks): a bench says so in one line and in
    its JSON, from the kernel's reporting order (above the largest free
    block's order nothing is reported), and says nothing where it cannot tell."""
    order = tmp_path / 'page_reporting_order'
    for text, on in (('9\n', True), ('10\n', True), ('11\n', False), ('junk', None)):
        order.write_text(text)
        assert harness.page_reporting(str(order)) is on
    assert harness.page_reporting(str(tmp_path / 'absent')) is None
    for text, on in (('9\n', True), ('11\n', False)):
        order.write_text(text)
        monkeypatch.setattr(harness, 'PAGE_REPORTING_ORDER', str(order))
        assert harness.warn_page_reporting() is on and harness.machine()['page_reporting'] is on
        assert ('free page reporting' in capsys.readouterr().err) is on


def test_link_counters_are_read_alike_from_either_backend():
    wanemu = harness.WanemuLink.parse_counters(
        'a->b: in 800 pkts 1.2 MB, out 790 pkts 1.1 MB, random-loss 8, queue-drop 2, overflow 0, too-big 0\n'
        'b->a: in 400 pkts 0.1 MB, out 400 pkts 0.1 MB, random-loss 0, queue-drop 0, overflow 0, too-big 0\n')
    assert wanemu['ab'] == {'pkts_in': 800, 'bytes_in': 1200000, 'pkts_out': 790, 'bytes_out': 1100000,
                            'random_loss': 8, 'queue_drop': 2, 'overflow': 0, 'too_big': 0}
    netem = harness.NetemLink.parse_counters(
        'qdisc netem 1: root refcnt 2 limit 10000 delay 60ms loss 1%\n'
        ' Sent 1500000 bytes 1000 pkt (dropped 10, overlimits 0 requeues 0)\n'
        ' backlog 0b 0p requeues 0\n'
        'qdisc tbf 10: parent 1:1 rate 1Gbit burst 125000b lat 50ms\n'
        ' Sent 1500000 bytes 1000 pkt (dropped 5, overlimits 7 requeues 0)\n'
        ' backlog 0b 0p requeues 0\n')
    assert netem == {'pkts_in': 1015, 'bytes_in': 1522500, 'pkts_out': 1000, 'bytes_out': 1500000,
                     'random_loss': 10, 'queue_drop': 5, 'overflow': 0, 'too_big': 0}


def test_the_replication_relay_captures_each_direction_and_cuts_phases_from_it(tmp_path):
    import socket
    import threading
    import bench_replication
    echo = socket.socket()
    echo.bind(('127.0.0.1', 0))
    echo.listen(1)

    def serve():
        conn, _ = echo.accept()
        while True:
            data = conn.recv(65536)
            if not data:
                break
            conn.sendall(data.upper())
        conn.close()
    threading.Thread(target=serve, daemon=True).start()
    relay = socket.socket()
    relay.bind(('127.0.0.1', 0))
    relay.listen(1)
    captures = tmp_path / 'captures'
    captures.mkdir()
    threading.Thread(target=bench_replication.relay_serve, daemon=True,
                     args=(relay, echo.getsockname()[1], str(captures))).start()
    client = socket.create_connection(relay.getsockname())
    marks = [bench_replication.capture_sizes(str(captures))]
    for message in (b'first phase ' * 1000, b'second phase ' * 3000):
        client.sendall(message)
        got = b''
        while len(got) < len(message):
            got += client.recv(65536)
        assert got == message.upper()
        marks.append(bench_replication.capture_sizes(str(captures)))
    client.close()
    out = str(tmp_path / 'phase.bin')
    assert bench_replication.extract(str(captures), marks[1], marks[2], 'down', out) == 39000
    with open(out, 'rb') as f:
        assert f.read() == b'SECOND PHASE ' * 3000
    assert bench_replication.extract(str(captures), marks[0], marks[2], 'up', out) == 51000
    assert 0 < bench_replication.zlib_size(out) < 1000


# What the Tsunami UDP client (cheetahmobile/tsunami-udp) printed for a get of
# 64 MiB on loopback, abridged: its "Mbit" is 2^20 bits (File data 512 Mbit).
TSUNAMI_OUTPUT = '''\
rate = 500000000

Connected.

             last_interval                   transfer_total                   buffers      transfer_remaining  OS UDP
time          blk    data       rate rexmit     blk    data       rate rexmit queue  ring     blk   rt_len      err 
00:00:01.757 15000   0.00M  332.5Mbps   0.0%    54400    0.1G  241.9Mbps   0.0%     0     0   11136        0        0 --
Transfer complete. Flushing to disk and signaling server to stop...
!!!!
PC performance figure : 0 packets dropped (if high this indicates receiving PC overload)
Transfer duration     : 1.97 seconds
Total packet data     : 512.00 Mbit
Goodput data          : 512.00 Mbit
File data             : 512.00 Mbit
Throughput            : 259.68 Mbps
Goodput w/ restarts   : 259.68 Mbps
Final file rate       : 259.68 Mbps
Transfer mode         : lossless

Thank you for using Tsunami.
'''


def test_the_wan_bench_reads_tsunamis_own_rate_in_decimal_megabits_and_shows_it_beside_the_wall_clocks():
    import bench_wan
    own = bench_wan.tsunami_summary(TSUNAMI_OUTPUT)
    assert own['duration_s'] == 1.97 and own['file_rate_printed'] == 259.68
    assert own['file_rate_mbps'] == pytest.approx(512 * 2 ** 20 / 1.97 / 1e6, rel=1e-3)
    for broken in ('Warning: Server: File does not exist or cannot be transmitted\n',
                   TSUNAMI_OUTPUT.replace('Transfer mode         : lossless',
                                          'Transfer mode         : lossless mode - but lost count=3 > 0'),
                   TSUNAMI_OUTPUT.replace('259.68 Mbps\nTransfer', 'nan-ish Mbps\nTransfer')):
        with pytest.raises(harness.BenchError):
            bench_wan.tsunami_summary(broken)
    run = {'scenario': 'S1', 'tool': 'tsunami', 'link': '--rate 1000', 'status': 'ok',
           'delivered_bytes': 64 << 20, 'wall_s': 2.5, 'goodput_mbps_own': own['file_rate_mbps']}
    bench_wan.derive(run, 1000.0)
    assert run['goodput_mbps'] == pytest.approx((64 << 20) * 8 / 2.5 / 1e6)    # the wall clock's
    table = bench_wan.markdown(bench_wan.summarize([run]))
    assert '| own Mbit/s |' in table and '| 214.7 | 272.3 | 0.215 |' in table
    assert 'own' not in bench_wan.markdown(bench_wan.summarize([dict(run, tool='rsync-ssh',
                                                                     goodput_mbps_own=None)]))


def test_the_wan_bench_finds_tsunami_in_its_built_source_tree_or_in_one_folder(tmp_path):
    import bench_wan

    def program(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text('#!/bin/sh\n')
        path.chmod(0o755)
    tree, flat = tmp_path / 'tsunami-udp', tmp_path / 'bin'
    program(tree / 'client' / 'tsunami')
    assert bench_wan.find_tsunami(str(tree)) is None        # the server not built yet
    program(tree / 'server' / 'tsunamid')
    assert bench_wan.find_tsunami(str(tree)) == (str(tree / 'client' / 'tsunami'),
                                                 str(tree / 'server' / 'tsunamid'))
    program(flat / 'tsunami')
    program(flat / 'tsunamid')
    assert bench_wan.find_tsunami(str(flat)) == (str(flat / 'tsunami'), str(flat / 'tsunamid'))
    assert bench_wan.find_tsunami(None) is None


def test_the_grids_table_shows_each_grid_cell_not_an_extra_cell_of_the_same_round_trip_and_loss():
    import bench_grid
    args = bench_grid.build_parser().parse_args([])

    def row(cell, ratio):
        return {'cell': cell, 'link': '', 'size': 1 << 30, 'runs': 1, 'ok': 1, 'rtt': 0.12, 'loss': 0.0,
                'ratio': ratio, 'wire_per_file': 1.049, 'goodput_mbps': 200 * ratio,
                'transfer_mbps': None, 'other_load_cores': 0.0, 'bbr': None, 'missed': []}
    grid_line = [line for line in bench_grid.markdown(
        [row('120ms/0%', 0.93), row('short-queue 120ms/0%/q5', 0.71)], args).splitlines()
        if line.startswith('| 120 ms |')]
    assert grid_line == ['| 120 ms | 0.93 / 1.049 |']
