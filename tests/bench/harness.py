"""What the benchmarks share: where wanxfer.py and the link emulator are,
the emulated link (up, down, its counters) behind a choice of backend,
child processes in the link's hosts (spawn, wait, stop, the CPU they
used), the machine's CPU accounting, medians and JSON output, and the
corpus files.  Sizes are parsed by wanxfer's own parser.

The link joins two network namespaces, host a (198.18.0.1) and host b
(198.18.0.2), and takes wanemu's options (--delay MS one way, --rate
MBIT, --queue MS, --loss PCT, --burst LEN, --seed N):
  wanemu  the `wan` script of ../shared/wanemu/ (userspace, for kernels
          without netem), found from the checkout upwards or at $WANEMU
  netem   tc netem and tbf on a veth pair, the README's recipe for a
          normal kernel
Both need root.  Benchmarks are run by hand: pytest never collects this
directory (tests/conftest.py ignores it)."""

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
WANXFER = os.path.join(ROOT, 'wanxfer.py')
# wanxfer, and the tests' helpers
sys.path[:0] = [path for path in (ROOT, os.path.dirname(HERE)) if path not in sys.path]

import wanxfer  # noqa: E402

HOST_A, HOST_B = '198.18.0.1', '198.18.0.2'
CLK_TCK = os.sysconf('SC_CLK_TCK')


class BenchError(Exception):
    """A run that cannot be measured; the benchmark records it and goes on."""


def log(message):
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------

def size_arg(text):
    """An argparse type: '256M', '1G', '4096' -> bytes, by wanxfer's parser."""
    try:
        return wanxfer.parse_size(text)
    except wanxfer.UsageError as e:
        raise argparse.ArgumentTypeError(str(e))


def find_wan():
    """The `wan` script: $WANEMU, else shared/wanemu/wan beside the checkout
    or beside a directory above it (a worktree sits deeper); None if none."""
    if os.environ.get('WANEMU'):
        return os.environ['WANEMU']
    directory = os.path.dirname(ROOT)
    while True:
        candidate = os.path.join(directory, 'shared', 'wanemu', 'wan')
        if os.access(candidate, os.X_OK):
            return candidate
        parent = os.path.dirname(directory)
        if parent == directory:
            return None
        directory = parent


def add_link_options(parser, default_link=None):
    """--backend and --wan, and --link (one string) unless default_link is None."""
    if default_link is not None:
        parser.add_argument('--link', default=default_link,
                            help='link options, as wanemu takes them (default: %(default)s)')
    parser.add_argument('--backend', choices=('wanemu', 'netem'),
                        help='link backend: wanemu (the wan script) or netem (tc on a veth pair); '
                             'default wanemu when its script is found, else netem')
    parser.add_argument('--wan', default=find_wan(),
                        help='path of the wan script (default: shared/wanemu/wan found from the '
                             'checkout upwards, or $WANEMU: %(default)s)')


def add_common_options(parser, default_link):
    """The link options, --wanxfer and --json: what every benchmark across
    the link takes."""
    add_link_options(parser, default_link)
    parser.add_argument('--wanxfer', default=WANXFER, help='path of wanxfer.py (default: this checkout\'s)')
    parser.add_argument('--json', metavar='FILE', help='write every run as JSON')


def require_root(name):
    if os.geteuid() != 0:
        raise SystemExit('%s needs root (network namespaces); run it with sudo' % name)


def make_link(args):
    """The link the options name (add_link_options), checked usable."""
    backend = args.backend or ('wanemu' if args.wan else 'netem')
    link = WanemuLink(args.wan) if backend == 'wanemu' else NetemLink()
    link.check()
    return link


# ---------------------------------------------------------------------------
# Links
# ---------------------------------------------------------------------------

def parse_link_options(text):
    """wanemu's options -> {'delay', 'rate', 'queue', 'loss', 'burst', 'seed',
    'mtu', 'udp-loss'} (ms, Mbit/s, ms, percent, packets, -, bytes, percent);
    BenchError for options per direction (--ab, --ba) or unknown."""
    values = {'delay': 0.0, 'rate': 0.0, 'queue': 50.0, 'loss': 0.0, 'burst': 0.0, 'seed': None,
              'mtu': 0.0, 'udp-loss': 0.0}
    tokens = shlex.split(text)
    if len(tokens) % 2:
        raise BenchError('link options come in pairs (--ab and --ba are for wanemu alone): %r' % text)
    for option, value in zip(tokens[::2], tokens[1::2]):
        name = option[2:] if option.startswith('--') else None
        if name not in values:
            raise BenchError('unknown link option %s' % option)
        try:
            values[name] = float(value)
        except ValueError:
            raise BenchError('link option %s %r is not a number' % (option, value))
    return values


def link_rate(text):
    """The --rate of link options in Mbit/s, or None."""
    try:
        return parse_link_options(text)['rate'] or None
    except BenchError:
        return None


class WanemuLink:
    """The `wan` script: two namespaces joined by the userspace emulator
    wanemu, whose counters `wan down` prints.  `wan` keeps one link per
    machine: a `wan up` or `wan down` by anyone else during a run kills our
    emulator, and the run's counters then say "disturbed"."""

    name = 'wanemu'
    COUNTERS = re.compile(
        r'^(?P<dir>a->b|b->a): in (?P<pkts_in>\d+) pkts (?P<mb_in>[\d.]+) MB, '
        r'out (?P<pkts_out>\d+) pkts (?P<mb_out>[\d.]+) MB, random-loss (?P<lost>\d+), '
        r'queue-drop (?P<qdrop>\d+), overflow (?P<overflow>\d+), too-big (?P<toobig>\d+)', re.M)

    def __init__(self, wan):
        self.wan = wan
        self.is_up = False
        self.emu = None             # pid of the wanemu we started

    def check(self):
        if not self.wan or not os.access(self.wan, os.X_OK):
            raise SystemExit('wan script not found (%s): give --wan or $WANEMU, or --backend netem'
                             % self.wan)
        if not shutil.which('cc') and not os.path.exists(os.path.join(self.state_dir(), 'wanemu')):
            raise SystemExit('need a C compiler `cc` to build wanemu')

    def command(self, host, argv):
        return [self.wan, host] + list(argv)

    def state_dir(self):
        return os.environ.get('WAN_STATE') or os.path.join(os.environ.get('TMPDIR') or '/tmp',
                                                            'wanemu-state')

    def up(self, options):
        self.is_up = True           # even a failed `up` may leave namespaces behind
        # A file, not a pipe: `wan up` leaves wanemu running in the
        # background, and it would hold a pipe open for ever.
        with tempfile.TemporaryFile() as f:
            done = subprocess.run([self.wan, 'up'] + shlex.split(options), stdin=subprocess.DEVNULL,
                                  stdout=f, stderr=subprocess.STDOUT)
            f.seek(0)
            text = f.read().decode(errors='replace')
        if done.returncode != 0:
            raise BenchError('wan up failed: %s' % text.strip())
        self.emu = self.emu_pid()

    def emu_pid(self):
        try:
            with open(os.path.join(self.state_dir(), 'pid')) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def emu_cpu(self):
        pid = self.emu_pid()
        return proc_cpu(pid) if pid and pid == self.emu else None

    def down(self):
        """Take the link down; its counters per direction ('ab', 'ba'), {}
        if none, with 'disturbed' set if our emulator was gone."""
        emu_cpu = self.emu_cpu()
        pid = self.emu_pid()
        # A `wan` without a pid file (a stand-in) cannot be checked.
        intact = self.emu is None or (pid == self.emu and os.path.exists('/proc/%d' % pid))
        self.emu = None
        done = subprocess.run([self.wan, 'down'], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              universal_newlines=True)
        self.is_up = False
        counters = self.parse_counters(done.stdout) if intact else {}
        if counters:
            counters['emu_cpu_s'] = emu_cpu
        if not intact:
            counters['disturbed'] = True
        return counters

    @classmethod
    def parse_counters(cls, text):
        """wanemu prints, per direction:
        'a->b: in P pkts X MB, out P pkts X MB, random-loss N, queue-drop N, overflow N, too-big N'
        with MB = 1e6 bytes of IP packets (headers included), 0.1 MB
        resolution.  'in' of a->b is what host a put on the link."""
        out = {}
        for m in cls.COUNTERS.finditer(text):
            out['ab' if m.group('dir') == 'a->b' else 'ba'] = {
                'pkts_in': int(m.group('pkts_in')), 'bytes_in': round(float(m.group('mb_in')) * 1e6),
                'pkts_out': int(m.group('pkts_out')), 'bytes_out': round(float(m.group('mb_out')) * 1e6),
                'random_loss': int(m.group('lost')), 'queue_drop': int(m.group('qdrop')),
                'overflow': int(m.group('overflow')), 'too_big': int(m.group('toobig')),
            }
        return out


def netem_qdiscs(options):
    """The qdiscs that shape one direction as wanemu would with `options`:
    (netem arguments, tbf arguments or None without a rate).  netem's
    `limit` is in packets and must hold everything in flight for the delay;
    a bursty loss is the Gilbert-Elliott model wanemu uses."""
    o = parse_link_options(options)
    if o['mtu'] or o['udp-loss']:
        raise BenchError('--mtu and --udp-loss are for the wanemu backend alone')
    netem = ['netem', 'delay', '%gms' % o['delay']]
    if o['loss']:
        loss = o['loss'] / 100
        if o['burst'] > 1:
            p, r = loss / o['burst'] / (1 - loss), 1 / o['burst']
            netem += ['loss', 'gemodel', '%.4g%%' % (100 * p), '%g%%' % (100 * r), '100%', '0%']
        else:
            netem += ['loss', '%g%%' % o['loss']]
    limit = 1000
    if o['rate']:
        limit = max(limit, int(math.ceil(o['delay'] * o['rate'] / 6)))     # 2 x delay x rate / 12000 bits
    netem += ['limit', str(limit)]
    if not o['rate']:
        return netem, None
    # A burst of 1 ms at the rate, and never under ten full-size packets.
    tbf = ['tbf', 'rate', '%gmbit' % o['rate'], 'burst', str(max(int(o['rate'] * 125), 15000)),
           'latency', '%gms' % o['queue']]
    return netem, tbf


class NetemLink:
    """Namespaces wan-a and wan-b joined by a veth pair, each direction
    shaped on its sender's egress by netem (delay, loss) over a tbf (rate,
    drop-tail queue), offloads off so real 1500-byte packets are shaped.
    Takes wanemu's options; netem draws its own random numbers (--seed is
    ignored).  Its counters are the qdiscs' ('in' estimated from what was
    sent and dropped)."""

    name = 'netem'
    QDISC = re.compile(r'^qdisc (\w+) \S+ .*\n\s*Sent (\d+) bytes (\d+) pkt \(dropped (\d+)', re.M)

    def __init__(self):
        self.is_up = False

    def check(self):
        for tool in ('ip', 'tc'):
            if not shutil.which(tool):
                raise SystemExit('the netem backend needs %s (iproute2)' % tool)

    def command(self, host, argv):
        return ['ip', 'netns', 'exec', 'wan-' + host] + list(argv)

    def _run(self, *argv):
        done = subprocess.run(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              universal_newlines=True)
        if done.returncode:
            raise BenchError('%s: %s' % (' '.join(argv), done.stdout.strip()))
        return done.stdout

    def up(self, options):
        netem, tbf = netem_qdiscs(options)
        self._remove()
        self.is_up = True
        self._run('ip', 'netns', 'add', 'wan-a')
        self._run('ip', 'netns', 'add', 'wan-b')
        self._run('ip', 'link', 'add', 'wan0', 'netns', 'wan-a', 'type', 'veth', 'peer', 'name', 'wan0',
                  'netns', 'wan-b')
        for host, mine, peer in (('a', HOST_A, HOST_B), ('b', HOST_B, HOST_A)):
            self._run('ip', '-n', 'wan-' + host, 'addr', 'add', mine, 'peer', peer, 'dev', 'wan0')
            self._run('ip', '-n', 'wan-' + host, 'link', 'set', 'lo', 'up')
            self._run('ip', '-n', 'wan-' + host, 'link', 'set', 'wan0', 'up', 'mtu', '1500')
            # TCP buffers as `wan up` sets them, so TCP peers can fill a long, fast path.
            self._run(*self.command(host, ['sysctl', '-qw', 'net.ipv4.tcp_rmem=4096 131072 67108864',
                                           'net.ipv4.tcp_wmem=4096 65536 67108864']))
            try:
                self._run(*self.command(host, ['ethtool', '-K', 'wan0', 'tso', 'off', 'gso', 'off',
                                               'gro', 'off']))
            except (BenchError, OSError) as e:
                log('warning: offloads stay on, so the qdiscs shape large segments: %s' % e)
            self._run('tc', '-n', 'wan-' + host, 'qdisc', 'add', 'dev', 'wan0', 'root', 'handle', '1:',
                      *netem)
            if tbf:
                self._run('tc', '-n', 'wan-' + host, 'qdisc', 'add', 'dev', 'wan0', 'parent', '1:1',
                          'handle', '10:', *tbf)

    def emu_cpu(self):
        return None                 # the kernel's, not a process's

    def down(self):
        counters = {}
        for direction, host in (('ab', 'a'), ('ba', 'b')):
            try:
                text = self._run('tc', '-s', '-n', 'wan-' + host, 'qdisc', 'show', 'dev', 'wan0')
            except BenchError:
                continue
            counters[direction] = self.parse_counters(text)
        self._remove()
        self.is_up = False
        return counters

    @classmethod
    def parse_counters(cls, text):
        """One direction's counters from `tc -s qdisc show`, named as
        wanemu's: what left the root qdisc was sent; netem's drops are the
        random loss, tbf's the queue's."""
        found = {m.group(1): (int(m.group(2)), int(m.group(3)), int(m.group(4)))
                 for m in cls.QDISC.finditer(text)}
        sent_bytes, sent_pkts, lost = found.get('netem', (0, 0, 0))
        queue_drop = found.get('tbf', (0, 0, 0))[2]
        dropped = lost + queue_drop
        average = sent_bytes / sent_pkts if sent_pkts else 0
        return {'pkts_in': sent_pkts + dropped, 'bytes_in': round(sent_bytes + dropped * average),
                'pkts_out': sent_pkts, 'bytes_out': sent_bytes, 'random_loss': lost,
                'queue_drop': queue_drop, 'overflow': 0, 'too_big': 0}

    def _remove(self):
        for host in ('a', 'b'):
            subprocess.run(['ip', 'netns', 'del', 'wan-' + host], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)


# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------

def exit_code(status):
    """os.waitstatus_to_exitcode (3.9+) for any Python."""
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def proc_children(pid):
    try:
        with open('/proc/%d/task/%d/children' % (pid, pid)) as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def descendants(pid):
    out, todo = [], [pid]
    while todo:
        for child in proc_children(todo.pop()):
            if child not in out:
                out.append(child)
                todo.append(child)
    return out


def listening(pid, port, proto='tcp'):
    """Whether a socket in PID's network namespace listens (TCP) or is bound
    (UDP) on PORT, from /proc/PID/net: no probe that a server would see."""
    for family in ('', '6'):
        try:
            with open('/proc/%d/net/%s%s' % (pid, proto, family)) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    local, state = parts[1], parts[3]
                    if int(local.rsplit(':', 1)[1], 16) != port:
                        continue
                    if proto == 'udp' or state == '0A':      # TCP_LISTEN
                        return True
        except (OSError, StopIteration, IndexError, ValueError):
            continue
    return False


def tail(path, n=600):
    """': ...' and the last `n` characters of a log file, for an error message."""
    if not path:
        return ''
    try:
        with open(path, 'rb') as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - n))
            text = f.read().decode(errors='replace').strip()
    except OSError:
        return ''
    return (': ...' + text[-n:]) if text else ''


class Procs:
    """Children started in the link's hosts (host None: on this machine),
    each in a session of its own, for timing, accounting and cleanup."""

    def __init__(self, link=None):
        self.link = link
        self.live = {}

    def spawn(self, host, argv, out, err, env=None, cwd=None):
        fo = open(out, 'wb')
        fe = open(err, 'wb') if err != out else fo
        command = self.link.command(host, argv) if host else list(argv)
        try:
            p = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=fo, stderr=fe, env=env,
                                 cwd=cwd, start_new_session=True)
        finally:
            fo.close()
            if fe is not fo:
                fe.close()
        self.live[p.pid] = p
        return p

    def signal(self, p, sig):
        """Signal P's process group and every descendant of P (sshd's
        per-connection children start sessions of their own)."""
        if p.returncode is None and p.pid in self.live:
            for pid in descendants(p.pid):
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            try:
                os.killpg(p.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def reap(self, p, timeout=None):
        """Wait for P (up to `timeout`); (exit status, CPU seconds), or None
        at the deadline."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            flags = 0 if deadline is None else os.WNOHANG
            try:
                pid, status, usage = os.wait4(p.pid, flags)
            except ChildProcessError:
                self.live.pop(p.pid, None)
                return (p.returncode, None)
            if pid == p.pid:
                p.returncode = exit_code(status)
                self.live.pop(p.pid, None)
                return (p.returncode, usage.ru_utime + usage.ru_stime)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)        # polling wait4 with a deadline

    def stop(self, p, grace=5.0):
        """SIGTERM the process group, then SIGKILL; (exit status, CPU seconds)."""
        if p.pid not in self.live:
            return (p.returncode, None)
        kids = descendants(p.pid)
        self.signal(p, signal.SIGTERM)
        result = self.reap(p, grace)
        if result is None:
            self.signal(p, signal.SIGKILL)
            result = self.reap(p, grace) or (None, None)
        for pid in kids:            # leftovers, orphans now
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return result

    def run_timed(self, host, argv, out, err, timeout, env=None, cwd=None):
        """Run to completion: {rc, wall, cpu, timed_out}."""
        fired = threading.Event()
        started = time.monotonic()
        p = self.spawn(host, argv, out, err, env, cwd)

        def kill():
            fired.set()
            self.signal(p, signal.SIGKILL)

        timer = threading.Timer(timeout, kill)
        timer.daemon = True
        timer.start()
        try:
            rc, cpu = self.reap(p)
        finally:
            timer.cancel()
        return {'rc': rc, 'wall': time.monotonic() - started, 'cpu': cpu, 'timed_out': fired.is_set()}

    def wait_listening(self, p, port, proto='tcp', timeout=20.0, log_path=None):
        """Poll, with a deadline, until P listens on PORT; BenchError if it
        exits first or never does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if p.poll() is not None:
                self.live.pop(p.pid, None)
                raise BenchError('server exited (rc %s) before listening%s' % (p.returncode, tail(log_path)))
            if listening(p.pid, port, proto):
                return
            time.sleep(0.05)        # polling with a deadline
        raise BenchError('server not listening on %s/%d after %.0f s%s' % (proto, port, timeout,
                                                                          tail(log_path)))

    def kill_all(self):
        for p in list(self.live.values()):
            self.signal(p, signal.SIGKILL)
            self.reap(p, 2.0)


@contextlib.contextmanager
def link_with_serve(link, options, work, served, env, port, program=WANXFER):
    """A fresh link with `wanxfer serve SERVED` listening in host a: yields
    the Procs, every child of which (and any the caller adds) is stopped,
    and the link taken down, at the end."""
    procs = Procs(link)
    link.up(options)
    try:
        serve = procs.spawn('a', [sys.executable, program, 'serve', served, '--bind', HOST_A,
                                  '--port', str(port), '--cache', os.path.join(work, 's.db')],
                            os.path.join(work, 'serve.out'), os.path.join(work, 'serve.out'), env)
        procs.wait_listening(serve, port, log_path=os.path.join(work, 'serve.out'))
        yield procs
    finally:
        for p in list(procs.live.values()):
            procs.stop(p)
        link.down()


# ---------------------------------------------------------------------------
# CPU accounting
# ---------------------------------------------------------------------------

def proc_cpu(pid):
    """User and system CPU seconds of a live process and its reaped
    children, from /proc (None if it is gone)."""
    try:
        with open('/proc/%d/stat' % pid) as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(')') + 2:].split()
    return sum(int(x) for x in fields[11:15]) / CLK_TCK     # utime stime cutime cstime


def piped_size(command, path):
    """(bytes `command` writes with the file at `path` on its stdin, seconds,
    exit status): a comparison compressor's output, counted, not kept."""
    started = time.monotonic()
    with open(path, 'rb') as f:
        proc = subprocess.Popen(command, stdin=f, stdout=subprocess.PIPE)
        total = 0
        while True:
            data = proc.stdout.read(1 << 20)
            if not data:
                break
            total += len(data)
        status = proc.wait()
    return total, time.monotonic() - started, status


def settled_cpu(pid, timeout=10.0):
    """proc_cpu() of a `serve` once its session processes have ended and
    been reaped (their CPU is then in its own figures), waiting at most
    `timeout` seconds for that."""
    deadline = time.monotonic() + timeout
    while proc_children(pid) and time.monotonic() < deadline:
        time.sleep(0.01)        # polling /proc with a deadline, not synchronising
    return proc_cpu(pid)


def host_cpu():
    """(task CPU seconds, irq + softirq seconds) of the whole machine so far."""
    with open('/proc/stat') as f:
        user, nice, system, _idle, _iowait, irq, softirq, _steal = [int(x) for x in f.readline().split()[1:9]]
    return (user + nice + system) / CLK_TCK, (irq + softirq) / CLK_TCK


class Window:
    """CPU the machine spent during a transfer on anything but the two ends
    and the emulator: other sessions, tests, cron.  On a machine of two
    cores anything else running skews a benchmark."""

    def __init__(self, link, server_pid):
        self.link = link
        self.started = time.monotonic()
        self.busy0, self.irq0 = host_cpu()
        self.emu0 = link.emu_cpu() or 0.0
        self.server0 = proc_cpu(server_pid) or 0.0

    def close(self, server_cpu, client_cpu):
        wall = time.monotonic() - self.started
        busy, irq = host_cpu()
        emu = (self.link.emu_cpu() or self.emu0) - self.emu0
        ours = (server_cpu or self.server0) - self.server0 + (client_cpu or 0.0) + emu
        other = max(0.0, busy - self.busy0 - ours)
        return {'wall_s': wall, 'tasks_s': busy - self.busy0, 'irq_s': irq - self.irq0, 'emu_s': emu,
                'ours_s': ours, 'other_s': other, 'other_cores': other / wall if wall > 0 else None}


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------

def median(values):
    """The median of the values that are not None; None if there are none."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def write_json(path, results):
    """Write `results` to `path` (if given) as indented JSON."""
    if path:
        with open(path, 'w') as f:
            json.dump(results, f, indent=1)


PAGE_REPORTING_ORDER = '/sys/module/page_reporting/parameters/page_reporting_order'
MAX_PAGE_ORDER = 10             # the largest free block's order: a reporting order above it reports none


def page_reporting(path=None):
    """Whether this machine, a VM, hands the memory its kernel frees back to
    its host (free page reporting): then what a receiving end writes into
    newly taken page-cache pages costs it up to 2 CPU s/GB more once the
    recently freed memory runs out, and its CPU figures grow over the runs
    of an invocation (README, Benchmarks).  None where it cannot tell."""
    try:
        with open(path or PAGE_REPORTING_ORDER) as f:
            return int(f.read()) <= MAX_PAGE_ORDER
    except (OSError, ValueError):
        return None


def warn_page_reporting():
    """One line on stderr when page_reporting() says so; what it said."""
    on = page_reporting()
    if on:
        log('note: this machine hands freed memory back to its host (free page reporting): the '
            'receiving end\'s CPU per GB may grow over the runs; README, Benchmarks, says how to '
            'turn it off')
    return on


def machine():
    """When, where and by what command a benchmark ran, for its JSON."""
    return {'time': time.strftime('%Y-%m-%dT%H:%M:%S%z'), 'uname': ' '.join(os.uname()),
            'cpus': os.cpu_count(), 'python': sys.version.split()[0], 'command': sys.argv,
            'page_reporting': page_reporting()}


# ---------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------
# Files a benchmark sends, each deterministic but the random ones.

def random_file(path, size):
    wanxfer.write_random_file(path, size)
    return path


def make_file(path, size, kind):
    """`size` bytes of zeros, or of incompressible but repeatable data."""
    with open(path, 'wb') as f:
        left, block = size, 1 << 20
        counter = 0
        while left > 0:
            n = min(block, left)
            if kind == 'zeros':
                f.write(bytes(n))
            else:
                f.write(hashlib.shake_256(b'bench %d' % counter).digest(n))
            counter += 1
            left -= n


FIRST = ['James', 'Mary', 'Robert', 'Patricia', 'John', 'Jennifer', 'Michael', 'Linda', 'David',
         'Elizabeth', 'William', 'Barbara', 'Richard', 'Susan', 'Joseph', 'Jessica', 'Thomas',
         'Sarah', 'Chen', 'Wei', 'Yuki', 'Hiroshi', 'Olga', 'Ivan', 'Fatima', 'Ahmed', 'Priya',
         'Raj', 'Lucas', 'Sofia']
LAST = ['Smith', 'Johnson', 'Williams', 'Brown', 'Jones', 'Garcia', 'Miller', 'Davis', 'Rodriguez',
        'Martinez', 'Hernandez', 'Lopez', 'Gonzalez', 'Wilson', 'Anderson', 'Thomas', 'Taylor',
        'Moore', 'Jackson', 'Martin', 'Lee', 'Perez', 'Thompson', 'White', 'Harris', 'Sanchez',
        'Clark', 'Ramirez', 'Lewis', 'Robinson']
CITIES = ['London', 'Paris', 'Berlin', 'Madrid', 'Rome', 'Tokyo', 'Osaka', 'New York', 'Chicago',
          'Toronto', 'Sydney', 'Mumbai', 'Seoul', 'Lisbon', 'Dublin', 'Vienna', 'Prague', 'Warsaw',
          'Oslo', 'Zurich']
WORDS = ('the quick brown fox jumps over lazy dog order delivered pending refund invoice shipped '
         'customer account premium basic gift card express standard returned damaged').split()
STATUS = ['pending', 'paid', 'shipped', 'delivered', 'cancelled', 'refunded']


def generate_sql(path, size, seed=1):
    """A deterministic mysqldump-style dump: DDL, then extended INSERTs of
    customers and orders tables, about `size` bytes."""
    r = random.Random(seed)
    written, table, rowid = 0, 0, 1
    with open(path, 'w') as out:
        head = ('-- MySQL dump 10.13  Distrib 8.0.36, for Linux (x86_64)\n--\n-- Host: localhost'
                '    Database: shop\n-- ------------------------------------------------------\n'
                '/*!40101 SET NAMES utf8mb4 */;\n\n')
        out.write(head)
        written += len(head)
        while written < size:
            table += 1
            kind = 'customers' if table % 2 else 'orders'
            if kind == 'customers':
                columns = ('  `id` int NOT NULL AUTO_INCREMENT,\n  `name` varchar(80) NOT NULL,\n'
                           '  `email` varchar(120) NOT NULL,\n  `city` varchar(40) DEFAULT NULL,\n'
                           '  `created` datetime NOT NULL,\n'
                           "  `balance` decimal(12,2) NOT NULL DEFAULT '0.00',\n")
            else:
                columns = ('  `id` bigint NOT NULL,\n  `customer_id` int NOT NULL,\n'
                           '  `status` varchar(16) NOT NULL,\n  `total` decimal(12,2) NOT NULL,\n'
                           '  `placed` datetime NOT NULL,\n  `note` text,\n')
            ddl = ('DROP TABLE IF EXISTS `%s_%d`;\nCREATE TABLE `%s_%d` (\n%s  PRIMARY KEY (`id`)\n'
                   ') ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;\n\nLOCK TABLES `%s_%d` WRITE;\n'
                   % (kind, table, kind, table, columns, kind, table))
            out.write(ddl)
            written += len(ddl)
            for _ in range(r.randrange(50, 400)):
                rows = []
                for _ in range(r.randrange(20, 60)):
                    if kind == 'customers':
                        f, l = r.choice(FIRST), r.choice(LAST)
                        rows.append("(%d,'%s %s','%s.%s%d@%s.com','%s','20%02d-%02d-%02d %02d:%02d:%02d',"
                                    "%d.%02d)" % (
                                        rowid, f, l, f.lower(), l.lower(), r.randrange(100),
                                        r.choice(['example', 'mail', 'corp']), r.choice(CITIES),
                                        r.randrange(10, 25), r.randrange(1, 13), r.randrange(1, 29),
                                        r.randrange(24), r.randrange(60), r.randrange(60),
                                        r.randrange(100000), r.randrange(100)))
                    else:
                        note = 'NULL' if r.random() < 0.6 else "'%s'" % ' '.join(
                            r.choice(WORDS) for _ in range(r.randrange(3, 12)))
                        rows.append("(%d,%d,'%s',%d.%02d,'20%02d-%02d-%02d %02d:%02d:%02d',%s)" % (
                            rowid, r.randrange(1, 500000), r.choice(STATUS), r.randrange(5000),
                            r.randrange(100), r.randrange(10, 25), r.randrange(1, 13), r.randrange(1, 29),
                            r.randrange(24), r.randrange(60), r.randrange(60), note))
                    rowid += 1
                line = 'INSERT INTO `%s_%d` VALUES %s;\n' % (kind, table, ','.join(rows))
                out.write(line)
                written += len(line)
            out.write('UNLOCK TABLES;\n\n')
            written += 15


def edit_sql(source, dest, edits=200, seed=7):
    """200 scattered small edits: inserted rows, deleted stretches, rewritten values."""
    with open(source, 'rb') as f:
        data = bytearray(f.read())
    r = random.Random(seed)
    for k in range(edits):
        at = r.randrange(len(data))
        what = k % 3
        if what == 0:
            data[at:at] = b"(%d,42,'paid',17.50,'2024-05-01 10:00:00',NULL)," % (10 ** 9 + k)
        elif what == 1:
            del data[at:at + r.randrange(10, 120)]
        else:
            data[at:at + 8] = b'%08d' % r.randrange(10 ** 8)
    with open(dest, 'wb') as f:
        f.write(data)


def make_tar(path, appended):
    """A tar of /usr/share/doc, /usr/lib/python3* and /usr/bin; `appended`
    is the same tar after `tar rf` of one more file."""
    sources = ['/usr/share/doc'] + sorted(p for p in (os.path.join('/usr/lib', n) for n in
                                                       os.listdir('/usr/lib'))
                                          if os.path.basename(p).startswith('python3')) + ['/usr/bin']
    subprocess.run(['tar', 'cf', path, '--warning=none'] + sources, check=False,
                   stderr=subprocess.DEVNULL)
    shutil.copyfile(path, appended)
    extra = os.path.join(os.path.dirname(path), 'appended-file.txt')
    with open(extra, 'wb') as f:
        f.write(b'a file appended to the backup\n' * 2000)
    subprocess.run(['tar', 'rf', appended, extra], check=True, stderr=subprocess.DEVNULL)


# ---------------------------------------------------------------------------
# Peers: sshd for rsync
# ---------------------------------------------------------------------------

SSH_PORT = 22


def setup_sshd(work):
    """Throwaway keys and an sshd_config in work/ssh for an sshd in host a
    that lets host b's rsync in as root; the directory."""
    d = os.path.join(work, 'ssh')
    os.makedirs(d, exist_ok=True)
    for name in ('host_key', 'client_key'):
        key = os.path.join(d, name)
        if not os.path.exists(key):
            subprocess.run(['ssh-keygen', '-q', '-t', 'ed25519', '-N', '', '-f', key, '-C', 'wanxfer-bench'],
                           check=True)
    shutil.copyfile(os.path.join(d, 'client_key.pub'), os.path.join(d, 'authorized_keys'))
    config = os.path.join(d, 'sshd_config')
    with open(config, 'w') as f:
        f.write('\n'.join([
            'ListenAddress %s' % HOST_A, 'Port %d' % SSH_PORT,
            'HostKey %s/host_key' % d, 'AuthorizedKeysFile %s/authorized_keys' % d,
            'PidFile %s/sshd.pid' % d, 'PermitRootLogin prohibit-password',
            'PasswordAuthentication no', 'KbdInteractiveAuthentication no',
            'UsePAM no', 'StrictModes no', 'X11Forwarding no', 'PrintMotd no',
            'UseDNS no', 'LogLevel INFO', '']))
    os.makedirs('/run/sshd', mode=0o755, exist_ok=True)     # sshd's privilege-separation directory
    checked = subprocess.run(['/usr/sbin/sshd', '-t', '-f', config], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, universal_newlines=True)
    if checked.returncode:
        raise BenchError('sshd -t: %s' % checked.stdout)
    return d


def ssh_command(ssh_dir, extra=''):
    """The `rsync -e` command that logs in to setup_sshd()'s sshd."""
    command = ('ssh -F /dev/null -i %s/client_key -o StrictHostKeyChecking=no '
               '-o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR' % ssh_dir)
    return command + (' ' + extra if extra else '')
