#!/usr/bin/env python3
"""The "any path" grid: wanxfer beside TCP BBR on one link rate, across round
trips and random loss.

For every cell (RTT x loss, and the extra cells: bursty loss, a 5 ms queue)
a fresh emulated link is built (harness.py: wanemu or netem), `wanxfer.py
get` fetches a random file of --bdp-multiple times the cell's
bandwidth-delay product (at least --min-size) from `serve` in host a, and
`iperf3 -C bbr -n` moves as many bytes the same way across a fresh link with
the same options and seed; runs are as bench_wan.py makes them (fresh caches
at both ends, sha256 checked).  A cell that misses its goodput target, or BBR's
goodput, is run again up to --runs-on-miss times in all, and its medians
count (a wire miss alone is not: see below).

Targets (issue 14): goodput >= 0.85 of the link where loss <= 5%, >= 0.75
at 10%; wire/file <= 1 + loss + 0.03; not below BBR in the same cell.
Goodput is file bits / wall clock of the whole `get` (handshake, listing
and the last round trips included); the "transfer" figure divides by the
duration get itself reports for the file instead.  wire/file is what host
a put on the link (the emulator's counter) per file byte, packet headers
included (70 bytes per 1500-byte packet of wanxfer's: 1.049 at best).

    sudo python3 tests/bench/bench_grid.py --json grid.json --markdown grid.md
    sudo python3 tests/bench/bench_grid.py --rtts 120,1200 --losses 0,3 --no-extras
    sudo python3 tests/bench/bench_grid.py --cell "--delay 60 --rate 200 --queue 5"

Needs root, ip(8), cc (wanemu) or tc (netem), iperf3 with BBR in the kernel;
only 2 cores here: run nothing else meanwhile.
"""

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_wan  # noqa: E402
import harness  # noqa: E402
from harness import log, median  # noqa: E402

EXTRAS = (('burst', 120, 2.0, 50, 5), ('short-queue', 120, 0.0, 5, 0))   # name, RTT ms, loss %, queue ms, burst


def number_list(text):
    try:
        return [float(x) for x in text.split(',') if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError('a comma-separated list of numbers: %r' % text)


def build_parser():
    ap = argparse.ArgumentParser(prog='bench_grid.py', description=__doc__.split('\n\n')[0],
                                 epilog='\n\n'.join(__doc__.split('\n\n')[1:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--rate', type=float, default=200.0, help='link rate, Mbit/s (default 200)')
    ap.add_argument('--rtts', type=number_list, default=[20, 120, 300, 600, 1200],
                    help='round trips, ms, comma-separated (default 20,120,300,600,1200)')
    ap.add_argument('--losses', type=number_list, default=[0, 1, 3, 5, 10],
                    help='random loss, %%, comma-separated (default 0,1,3,5,10)')
    ap.add_argument('--queue', type=float, default=50.0, help='bottleneck queue, ms (default 50)')
    ap.add_argument('--no-extras', action='store_true',
                    help='skip the extra cells: RTT 120 ms with 2%% loss in bursts of 5, and with a 5 ms queue')
    ap.add_argument('--cell', action='append', metavar='OPTS', default=[],
                    help='an extra cell given as wanemu options (repeatable)')
    ap.add_argument('--bdp-multiple', type=float, default=30.0,
                    help='file size in bandwidth-delay products of the cell (default 30)')
    ap.add_argument('--min-size', type=harness.size_arg, default=64 << 20,
                    help='smallest file (default 64M)')
    ap.add_argument('--max-size', type=harness.size_arg, default=4 << 30, help='largest file (default 4G)')
    ap.add_argument('--runs-on-miss', type=int, default=3,
                    help='runs in all of a cell that misses a target, medians counted (default 3)')
    ap.add_argument('--no-bbr', action='store_true', help='skip the iperf3 -C bbr row')
    ap.add_argument('--plain', action='store_true', help='run wanxfer with --no-encrypt')
    ap.add_argument('--serve-args', default='', help='extra arguments for wanxfer serve')
    ap.add_argument('--get-args', default='', help="extra arguments for wanxfer get, e.g. '--no-delta'")
    ap.add_argument('--json', metavar='FILE', help='write every run and the summary as JSON')
    ap.add_argument('--markdown', metavar='FILE', help='write the tables as markdown')
    ap.add_argument('--wanxfer', default=harness.WANXFER, help="path of wanxfer.py (default: this checkout's)")
    ap.add_argument('--python', default=sys.executable, help='interpreter for wanxfer.py')
    ap.add_argument('--port', type=int, default=bench_wan.WANXFER_PORT, help='wanxfer port (default 46224)')
    ap.add_argument('--timeout', type=float,
                    help='seconds per transfer (default max(300, 4x ideal time + 60))')
    ap.add_argument('--workdir', help='work directory (default: a new temp dir, removed at the end); '
                                      'source files of the right sizes there are reused')
    harness.add_link_options(ap)
    return ap


def cells(args):
    """[(name, wanemu options, loss fraction, rtt s)] in the order run."""
    out = []
    for rtt in args.rtts:
        for loss in args.losses:
            options = '--delay %g --rate %g --queue %g --loss %g' % (rtt / 2, args.rate, args.queue, loss)
            out.append(('%gms/%g%%' % (rtt, loss), options, loss / 100, rtt / 1000))
    if not args.no_extras:
        for name, rtt, loss, queue, burst in EXTRAS:
            options = '--delay %g --rate %g --queue %g --loss %g' % (rtt / 2, args.rate, queue, loss)
            if burst:
                options += ' --burst %g' % burst
            out.append(('%s %gms/%g%%/q%g' % (name, rtt, loss, queue), options, loss / 100, rtt / 1000))
    for i, options in enumerate(args.cell, 1):
        o = harness.parse_link_options(options)
        out.append(('cell%d' % i, options, o['loss'] / 100, 2 * o['delay'] / 1000))
    return out


def size_for(args, options, rtt):
    """The file for a cell: --bdp-multiple of its bandwidth-delay product,
    within --min-size and --max-size, in whole MiB."""
    rate_mbit = harness.link_rate(options) or args.rate
    bdp = rate_mbit * 1e6 / 8 * rtt
    size = max(args.min_size, min(args.max_size, int(args.bdp_multiple * bdp)))
    return -(-size // (1 << 20)) << 20


def targets(loss):
    return {'ratio': 0.85 if loss <= 0.05 + 1e-9 else 0.75, 'wire': 1 + loss + 0.03}


def judge(row, bbr):
    """The targets a cell's medians miss, as words."""
    missed = []
    t = targets(row['loss'])
    if row['ratio'] is None or row['ratio'] < t['ratio']:
        missed.append('goodput')
    if row['wire_per_file'] is None or row['wire_per_file'] > t['wire']:
        missed.append('wire')
    if bbr and bbr.get('goodput_mbps') and (row['goodput_mbps'] or 0) < bbr['goodput_mbps']:
        missed.append('below BBR')
    return missed


def summarize(records, tool):
    rs = [r for r in records if r['tool'] == tool and r['status'] in ('ok', 'timeout')]
    row = {key: median([r.get(key) for r in rs]) for key in (
        'goodput_mbps', 'ratio', 'wire_per_file', 'transfer_mbps', 'wall_s', 'other_load_cores',
        'cpu_sender_s_per_gb', 'cpu_receiver_s_per_gb')}
    row.update(runs=len([r for r in records if r['tool'] == tool]), ok=len(rs),
               errors=[r.get('error') for r in records if r['tool'] == tool and r['status'] == 'error'])
    return row


def run_cell(bench, args, name, options, loss, rtt, records):
    size = size_for(args, options, rtt)
    bench.a.size = size
    bench.make_source()
    tools = ['wanxfer-noenc' if args.plain else 'wanxfer'] + ([] if args.no_bbr else ['iperf3-bbr'])
    bench.a.iperf_bytes = size
    cell_records = []
    for run in range(1, args.runs_on_miss + 1):
        for tool in tools:
            if tool.startswith('iperf3') and run > 1:
                continue                    # BBR is the yardstick, not the subject
            rec = bench.one(name, options, run, tool)
            report = rec.get('tool_report') or {}
            if report.get('duration_seconds'):
                rec['transfer_mbps'] = size * 8 / report['duration_seconds'] / 1e6
            rec.update(size=size, loss=loss, rtt=rtt)
            cell_records.append(rec)
            records.append(rec)
            log('[%s run %d] %-14s %s' % (name, run, tool, describe(rec)))
        ours = summarize(cell_records, tools[0])
        ours['loss'] = loss
        bbr = summarize(cell_records, 'iperf3-bbr') if not args.no_bbr else None
        # A wire miss alone is not run again: packet headers put even a
        # loss-free run at 1.049 (above the 1.03 allowed at no loss), and
        # a rerun cannot change that.
        if not set(judge(ours, bbr)) - {'wire'}:
            break
    ours = summarize(cell_records, tools[0])
    ours.update(cell=name, link=options, loss=loss, rtt=rtt, size=size)
    bbr = summarize(cell_records, 'iperf3-bbr') if not args.no_bbr else None
    ours['bbr'] = bbr
    ours['missed'] = judge(ours, bbr)
    return ours


def describe(rec):
    if rec['status'] == 'error':
        return 'FAILED: %s' % rec['error']
    return '%s%.1f Mbit/s  ratio %s  wire/file %s  (%.1f s)%s' % (
        '>=' if rec['status'] == 'timeout' else '', rec['goodput_mbps'] or 0,
        bench_wan.fnum(rec['ratio'], '%.3f'), bench_wan.fnum(rec['wire_per_file'], '%.3f'),
        rec['wall_s'] or 0, ('  [other load %.2f cores]' % rec['other_load_cores'])
        if (rec['other_load_cores'] or 0) > 0.2 else '')


def markdown(rows, args):
    """One table of the grid (RTT by loss) and one row per cell."""
    f = bench_wan.fnum
    out = ['Link %g Mbit/s, queue %g ms; file %g x BDP (at least %s); goodput = file bits / wall clock '
           'of get, ratio to the link; wire = bytes on the link / file bytes.' % (
               args.rate, args.queue, args.bdp_multiple, bench_wan.fmt_size(args.min_size)), '']
    # The grid's own cells only: an extra cell (bursts, a short queue) has
    # a round trip and a loss too, and would take a grid cell's place.
    grid_rows = [r for r in rows if r['cell'].endswith('%')]
    grid = {(r['rtt'], r['loss']): r for r in grid_rows}
    losses = sorted({r['loss'] for r in grid_rows})
    rtts = sorted({r['rtt'] for r in grid_rows})
    if losses and rtts:
        out.append('| RTT \\ loss | ' + ' | '.join('%g%%' % (100 * x) for x in losses) + ' |')
        out.append('|---|' + '---|' * len(losses))
        for rtt in rtts:
            cells_text = []
            for loss in losses:
                r = grid.get((rtt, loss))
                if r is None:
                    cells_text.append('')
                    continue
                bbr = (r['bbr'] or {}).get('ratio')
                cells_text.append('%s / %s%s%s' % (f(r['ratio'], '%.2f'), f(r['wire_per_file'], '%.3f'),
                                                   ' (BBR %s)' % f(bbr, '%.2f') if r['bbr'] else '',
                                                   ' **miss: %s**' % ', '.join(r['missed'])
                                                   if r['missed'] else ''))
            out.append('| %g ms | %s |' % (rtt * 1000, ' | '.join(cells_text)))
        out.append('')
    out.append('| cell | link | file | runs | goodput Mbit/s | ratio | transfer Mbit/s | wire/file | '
               'BBR Mbit/s | other load | missed |')
    out.append('|---|---|---|---|---|---|---|---|---|---|---|')
    for r in rows:
        runs = '%d' % r['ok'] if r['ok'] == r['runs'] else '%d/%d ok' % (r['ok'], r['runs'])
        out.append('| %s | `%s` | %s | %s | %s | %s | %s | %s | %s | %s | %s |' % (
            r['cell'], r['link'], bench_wan.fmt_size(r['size']), runs, f(r['goodput_mbps'], '%.1f'),
            f(r['ratio'], '%.3f'), f(r['transfer_mbps'], '%.1f'), f(r['wire_per_file'], '%.3f'),
            f((r['bbr'] or {}).get('goodput_mbps'), '%.1f'), f(r['other_load_cores'], '%.2f'),
            ', '.join(r['missed']) or '-'))
    return '\n'.join(out)


def main(argv=None):
    args = build_parser().parse_args(argv)
    harness.require_root('bench_grid.py')
    link = harness.make_link(args)
    if not args.no_bbr and not shutil.which('iperf3'):
        sys.exit('missing iperf3 (apt-get install -y iperf3), or give --no-bbr')
    # What bench_wan.Bench reads from its options.
    for name, value in (('size', args.min_size), ('remote', None),
                        ('ready_timeout', 30.0), ('iperf_bytes', None), ('iperf_time', 20),
                        ('fixed_seed', False), ('keep_files', False)):
        setattr(args, name, value)
    own_work = not args.workdir
    work = args.workdir or tempfile.mkdtemp(prefix='wanxfer-grid-')
    os.makedirs(work, exist_ok=True)
    procs = harness.Procs(link)
    bench = bench_wan.Bench(args, procs, work)
    records, rows = [], []

    def on_term(signum, frame):
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_term)
    interrupted = False
    started = time.time()
    try:
        for name, options, loss, rtt in cells(args):
            rows.append(run_cell(bench, args, name, options, loss, rtt, records))
    except KeyboardInterrupt:
        interrupted = True
        log('interrupted: cleaning up')
    finally:
        procs.kill_all()
        if link.is_up:
            link.down()
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    text = markdown(rows, args)
    print(text)
    if args.markdown:
        with open(args.markdown, 'w') as f:
            f.write(text + '\n')
    meta = dict(harness.machine(), backend=link.name, rate_mbit=args.rate, queue_ms=args.queue,
                bdp_multiple=args.bdp_multiple, min_size=args.min_size, interrupted=interrupted,
                minutes=round((time.time() - started) / 60, 1))
    harness.write_json(args.json, {'meta': meta, 'cells': rows, 'runs': records})
    return 130 if interrupted else 0


if __name__ == '__main__':
    sys.exit(main())
