#!/usr/bin/env python3
"""Does the suite notice when a promise breaks?  Each edit below removes one
of wanxfer's promises from a copy of the project in a temporary directory;
the tests named for it (or the whole suite, with --full) then run with
`pytest -x -q`.  An edit no test fails on is reported as MISSED: a promise
nothing guards.

Not a test itself (pytest does not collect it: no test_ prefix), and slow:
run it by hand, a few edits at a time on a shared machine.

    python3 tests/bench/mutate.py                  # every edit, its own tests
    python3 tests/bench/mutate.py --only lru-touch --only tunnel-flip
    python3 tests/bench/mutate.py --baseline       # the tests must pass unedited first
    python3 tests/bench/mutate.py --check          # only that every edit still applies

An edit whose old text is not found exactly once is an error before
anything runs, so the table is kept true as the code changes: fix the
edit, do not drop it.  Exit status: 0 when every edit was caught, 1 when
one was missed, 2 for a table that no longer applies or tests that fail
unedited.
"""

import argparse
import ast
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COPIED = ('wanxfer.py', 'README.md', 'LICENSE', 'tests')
EDIT_TIMEOUT = 1200             # s: a mutant that hangs the tests longer counts as caught, flagged


class Edit:
    """One broken promise: `changes` are (old text, new text) pairs applied
    to `path` (each old text must occur exactly once), `tests` the pytest
    arguments that should fail on it."""

    def __init__(self, name, promise, changes, tests, path='wanxfer.py'):
        self.name, self.promise, self.changes = name, promise, changes
        self.tests, self.path = tests, path


EDITS = [
    Edit('server-proof', 'the server refuses a client with the wrong secret',
         [("        raise AuthError('client failed authentication (wrong secret)')",
           "        pass")],
         ['tests/test_bulk.py', '-k', 'wrong_secret or proof']),
    Edit('early-claimed-once', 'an early handshake is taken once (no two sessions with the same keys)',
         [("            self._taken[client_nonce] = now + EARLY_HANDSHAKE_SECONDS\n", "")],
         ['tests/test_early_handshake.py']),
    Edit('early-answer-size', 'the early handshake answers no datagram smaller than its answer',
         [("if len(datagram) != EARLY_HELLO_SIZE or datagram[0] != KIND_HANDSHAKE:",
           "if datagram[0] != KIND_HANDSHAKE:")],
         ['tests/test_early_handshake.py']),
    Edit('early-refused-retried', 'an early handshake refused is tried again the plain way, once',
         [("        self.connect(early=False)\n", "        self.connect()\n")],
         ['tests/test_early_handshake.py', '-k', 'refused or restarted']),
    Edit('client-datagram-checks', 'a forged datagram is rejected (session id and tag checked)',
         [("                if kind != KIND_DATA or sid != session_id or flags & DATA_FLAG_ZLIB \\\n",
           "                if kind != KIND_DATA or flags & DATA_FLAG_ZLIB \\\n"),
          ("                if not compare(mac.digest(), view[offset + tag_at:offset + full]):",
           "                if False:"),
          ("        if kind == KIND_DATA and sid == self._session_id:\n"
           "            body = self._sealer.verify(view[offset:offset + header_size],\n"
           "                                       view[offset + header_size:offset + length])",
           "        if kind == KIND_DATA:\n"
           "            body = bytes(view[offset + header_size:offset + length - TAG_SIZE])")],
         ['tests/test_bulk.py', 'tests/test_receiver.py', '-k', 'forged or flipped']),
    Edit('partial-identity', 'a changed source starts over (the partial file\'s identity is checked)',
         [('        if found is not None and found[1] == self.identity \\\n',
           '        if found is not None \\\n')],
         ['tests/test_bulk.py', '-k', 'source_changed']),
    Edit('resolve-inside-root', 'the server refuses paths outside its root',
         [('        clean = normalize_remote(remote)\n        escaped = False',
           '        clean = remote\n        escaped = False'),
          ('            if not is_within(candidate, real):\n                escaped',
           '            if False:\n                escaped')],
         ['tests/test_bulk.py', '-k', 'outside_the_root or refuses_paths']),
    Edit('tunnel-flip', 'the tunnel is byte-exact each way (decoder flips the first byte of each '
         'literal chunk)',
         [('                self.store.put(digest, chunk)\n'
           '                out.append(literal)',
           '                self.store.put(digest, chunk)\n'
           '                out.append(bytes(b ^ 1 for b in literal[:1]) + bytes(literal[1:]))')],
         ['tests/test_tunnel.py', '-k', 'intact or each_way']),
    Edit('lru-touch', 'LRU eviction (use of a chunk is recorded)',
         [('            self._touched.add(digest)', '            pass')],
         ['tests/test_chunkstore.py', '-k', 'evict']),
    Edit('cache-replaced', 'a cache replaced under a running tunnel is noticed',
         [('        if self._db is not None and self._file_identity() != self._identity:',
           '        if False:')],
         ['tests/test_chunkstore.py', 'tests/test_tunnel.py', '-k', 'replaced or cache_deleted']),
    Edit('sessions-inline', 'sessions run concurrently',
         [("            threading.Thread(target=session.run, args=(pending,), name='session', "
           "daemon=True).start()",
           '            session.run(pending)'),
          # A forked session is waited for as the thread's is run inline.
          ('            self._run_session_process(pending, theirs, mine)\n        theirs.close()\n',
           '            self._run_session_process(pending, theirs, mine)\n        theirs.close()\n'
           '        os.waitpid(pid, 0)\n')],
         ['tests/test_bulk.py', '-k', 'stalled']),
    Edit('resume-ignored', 'a partial file is resumed, plain or delta (the saved state is read)',
         [('        bitmap = self._resume() if resume else None',
           '        bitmap = None')],
         ['tests/test_bulk.py', 'tests/test_delta.py', '-k', 'resume']),
    Edit('final-digest', 'a finished file is verified against the server\'s digest',
         [("        if not hmac.compare_digest(local, self.checksum if report is None\n"
           "                                   else str(report.get('sha256'))):",
           '        if False:')],
         ['tests/test_bulk.py', '-k', 'digest_does_not_match']),
    Edit('small-file-digest', 'a small file sent whole is verified against its digest',
         [("        if len(data) != size or not hmac.compare_digest(local, str(message.get('sha256'))):",
           '        if len(data) != size:')],
         ['tests/test_bulk.py', '-k', 'small_file_whose_content']),
    Edit('nak-ignored', 'blocks the receiver NAKs are sent again',
         [('                if fid == self.file_id:\n                    window.on_nak(ranges, now, self.rtt)',
           '                if fid == self.file_id:\n                    pass')],
         ['tests/test_bulk.py', '-k', 'tail']),
    Edit('tunnel-store-verify', 'the tunnel never delivers a cached chunk that no longer matches '
         'its digest',
         [('        if chunk_digest(data) != digest:', '        if False:')],
         ['tests/test_chunkstore.py', '-k', 'verification']),
    Edit('tunnel-supplied-chunk', 'a chunk the peer supplies for a reference must match its digest',
         [('        if chunk_digest(chunk) != digest:', '        if False:')],
         ['tests/test_chunkstore.py', '-k', 'decoder_asks']),
    Edit('tunnel-reference-fits', 'a reference is delivered only where it fits what came before it',
         [('        return (length is None or len(chunk) == length) and (not opened or '
           'chunk[:opened] == self.open_chunk)',
           '        return True')],
         ['tests/test_chunkstore.py', '-k', 'reference']),
    Edit('tunnel-allow', 'the --listen side opens only targets --allow names',
         [('        if (host.lower(), port) not in self.allow:', '        if False:')],
         ['tests/test_tunnel.py', '-k', 'outside_allow']),
    Edit('tree-symlink', 'a symlink inside a served tree that points outside is not listed',
         [('                if is_within(target, root) and os.path.isfile(target):',
           '                if os.path.isfile(target):')],
         ['tests/test_bulk.py', '-k', 'symlink']),
    Edit('emulator-tcp-delay', 'the emulator holds TCP data back for the path\'s one-way delay',
         [('                    due = time.monotonic() + delay\n', '                    due = time.monotonic()\n')],
         ['tests/test_linkemu.py', '-k', 'tcp_relays']),
    Edit('delay-line-schedule', 'the emulator\'s relays (UDP, and demo\'s TUN link) send each packet '
         'when its plan says, not before',
         [('        heap, pop = self._heap, heapq.heappop\n        while heap and heap[0][0] <= now:',
           '        heap, pop = self._heap, heapq.heappop\n        while heap:')],
         ['tests/test_linkemu.py', '-k', 'udp_round_trip or rate_limit or packet_relay_paces or delay_line']),
    Edit('emulator-refused-reset', 'a target that refuses the connection is a reset to the client',
         [('            self._aborted = True    # the client sees a reset, as from a refused connect',
           '            pass')],
         ['tests/test_linkemu.py', '-k', 'refused']),
    Edit('stats-get-row', '`stats` shows the transfers `get` made',
         [("        for kind in STATS_KINDS + ('total',):", "        for kind in STATS_KINDS[:2] + ('total',):")],
         ['tests/test_delta.py', '-k', 'stats']),
    Edit('server-logs-drops', 'the server logs each client it drops',
         [("        except (ProtocolError, NoThread) as e:\n"
           "            self.server.log('%s: dropped: %s' % (self.peer_name(), e))",
           "        except (ProtocolError, NoThread) as e:\n            pass"),
          ("        except (OSError, struct.error) as e:\n"
           "            self.server.log('%s: dropped: %s' % (self.peer_name(), e))",
           "        except (OSError, struct.error) as e:\n            pass")],
         ['tests/test_bulk.py', '-k', 'wrong_secret_is_refused']),
    Edit('module-state', 'no mutable module globals',
         [("SEAL_LABELS = ('ctrl-c2s', 'ctrl-s2c', 'data-s2c', 'data-c2s')",
           "SEAL_LABELS = ['ctrl-c2s', 'ctrl-s2c', 'data-s2c', 'data-c2s']")],
         ['tests/test_chunkstore.py', '-k', 'mutable']),
    Edit('keystream-stride', 'no keystream byte is used twice when the block size changes '
         '(the stride is part of the SHAKE input)',
         [("        self._batch_prefix = self._enc_key + KEYSTREAM_BATCHED + stride.to_bytes(4, 'big')",
           '        self._batch_prefix = self._enc_key + KEYSTREAM_BATCHED')],
         ['tests/test_security.py', '-k', 'stride or mixed_block_sizes']),
    Edit('aes-stride', 'no AES keystream byte is used twice when the block size changes (the stride '
         'names the counter block)',
         [("                 else stride + batch.to_bytes(8, 'big'), offset, length)",
           "                 else bytes(4) + batch.to_bytes(8, 'big'), offset, length)")],
         ['tests/test_security.py', '-k', 'stride']),
    Edit('aes-slice', 'each packet takes the slice of AES keystream the protocol names',
         [('                    if skip:\n', '                    if False:\n')],
         ['tests/test_security.py', '-k', 'protocol_names']),
    Edit('flags-proved', 'a man in the middle cannot take AES off the table',
         [('bytes([PROTOCOL_VERSION, client_flags, server_flags])', 'bytes([PROTOCOL_VERSION, server_flags])')],
         ['tests/test_security.py', '-k', 'middle']),
    Edit('secret-stretched', 'the server proves with the stretched secret, never the secret itself',
         [("        handshake_proof(key, b'wanxfer server', client_nonce, server_nonce, client_flags, flags)))",
           "        handshake_proof(secret._secret, b'wanxfer server', client_nonce, server_nonce, "
           "client_flags, flags)))")],
         ['tests/test_security.py', '-k', 'stretched_secret']),
    Edit('stretch-once', 'a server stretches its secret once, not per connection',
         [('        with self._lock:\n            key = self._keys.get(salt)\n',
           '        with self._lock:\n            key = None\n'),
          ('            with self._lock:\n                key = self._keys.get(salt)\n',
           '            with self._lock:\n                key = None\n')],
         ['tests/test_security.py', '-k', 'once_not_per_connection']),
    Edit('gate-deadline-hello', 'a connection that trickles its HELLO is closed at the handshake '
         'deadline',
         [('        if self._timer is None:\n'
           '            self._timer = self.loop.call_later(self.deadline, self._expire)',
           '        if False:\n'
           '            self._timer = self.loop.call_later(self.deadline, self._expire)')],
         ['tests/test_preauth.py', '-k', 'handshake_deadline and hello']),
    Edit('gate-deadline-proof', 'the handshake after the HELLO ends at the same deadline (each '
         'recv has what is left of it, not a timeout of its own; a late one\'s thread is woken)',
         [('        left = self.deadline - time.monotonic()', '        left = self._gate.deadline'),
          ('                try:\n'
           '                    pending.sock.shutdown(socket.SHUT_RDWR)\n'
           '                except OSError:\n'
           '                    pass\n'
           '                return\n',
           '                return\n')],
         ['tests/test_preauth.py', '-k', 'handshake_deadline and proof']),
    Edit('gate-per-source', 'connections from one source push out only that source\'s own',
         [('            if self._sources[pending.source] >= self.per_source:', '            if False:')],
         ['tests/test_preauth.py', '-k', 'one_source']),
    Edit('setuid-masked', 'a received file never gets setuid, setgid or sticky bits',
         [('            os.fchmod(self.fd, mode & 0o777)', '            os.fchmod(self.fd, mode)')],
         ['tests/test_files_safety.py', '-k', 'setuid']),
    Edit('links-followed', 'get never writes through a link planted at a name it writes '
         '(the name is cleared, then created exclusively)',
         [('                os.unlink(path)\n'
           '            except FileNotFoundError:\n'
           '                pass\n'
           '            try:\n'
           '                return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)',
           '                pass\n'
           '            except FileNotFoundError:\n'
           '                pass\n'
           '            try:\n'
           '                return os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)')],
         ['tests/test_files_safety.py', '-k', 'planted']),
    Edit('resume-nofollow', 'a partial transfer is never resumed through a link (O_NOFOLLOW)',
         [('            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)',
           '            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY)')],
         ['tests/test_files_safety.py', '-k', 'planted or through_a_link']),
    Edit('resume-ours-only', 'a partial file that is not ours alone is not resumed',
         [('        if stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid() and info.st_nlink == 1:',
           '        if stat.S_ISREG(info.st_mode):')],
         ['tests/test_files_safety.py', '-k', 'not_ours']),
    Edit('delta-origin-spans', 'spans kept from one server are not offered to another',
         [("'SELECT id, path, size, mtime_ns FROM kept_files WHERE origin = ?', (origin,))}",
           "'SELECT id, path, size, mtime_ns FROM kept_files WHERE ? IS NOT NULL', (origin,))}")],
         ['tests/test_delta.py', '-k', 'never_offered or first_format']),
    Edit('delta-origin-remote', 'a kept file of one server is not used as the basis for another\'s',
         [('WHERE origin = ? AND remote = ? ', 'WHERE ? IS NOT NULL AND remote = ? ')],
         ['tests/test_delta.py', '-k', 'never_offered or first_format']),
    Edit('schema-checked', 'control messages are checked against the schema before use',
         [("    'server') against CONTROL_MESSAGES; ProtocolError if it breaks them.\"\"\"\n",
           "    'server') against CONTROL_MESSAGES; ProtocolError if it breaks them.\"\"\"\n"
           "    return message\n")],
         ['tests/test_hostile.py', '-k', 'validate_message or hostile_request']),
    Edit('inflate-bounded', 'an inflate never holds more than its limit in memory',
         [('        out = inflater.decompress(data, limit + 1)', '        out = inflater.decompress(data)')],
         ['tests/test_hostile.py', '-k', 'inflates or negative_size']),
    Edit('printable-escaped', 'text from the peer and file names are printed escaped',
         [('    if text.isprintable():\n        return text', '    if True:\n        return text')],
         ['tests/test_hostile.py', '-k', 'escape']),
    Edit('cache-not-ours', 'a --cache that is not a wanxfer cache is refused and left as it is, '
         'not moved aside',
         [('        if not is_our_cache_file(self.path):', '        if False:')],
         ['tests/test_chunkstore.py', 'tests/test_files_safety.py', '-k',
          'not_a_wanxfer_cache or some_other_file']),
    Edit('tunnel-cache-queued', 'the tunnel writes its cache off the event loop (another process '
         'holding the lock does not stall it)',
         [('    store = QueuedChunkStore(ChunkStore(args.cache or default_cache_path(), limit, log=log))',
           '    store = ChunkStore(args.cache or default_cache_path(), limit, log=log)')],
         ['tests/test_tunnel.py', '-k', 'cache_lock']),
    Edit('slow-share-reports', 'a slow receiving share reports what it wrote seldom (every few MB, '
         'not every 50 ms)',
         [('            self.next_progress = now + WORKER_REPORT_MOST\n',
           '            self.next_progress = now + WORKER_REPORT_INTERVAL\n')],
         ['tests/test_striping.py', '-k', 'reports_what_it_wrote']),
]


def apply(edit, text):
    """`text` with the edit's changes made; ValueError naming the first
    old text that is not there exactly once."""
    for old, new in edit.changes:
        count = text.count(old)
        if count != 1:
            raise ValueError('%s: old text found %d times in %s (want exactly 1):\n%s'
                             % (edit.name, count, edit.path, old))
        text = text.replace(old, new)
    return text


def check_table(edits):
    """Every edit applies and leaves valid Python; the problems, one line each."""
    problems, names = [], set()
    for edit in edits:
        if edit.name in names:
            problems.append('%s: two edits of that name' % edit.name)
        names.add(edit.name)
        with open(os.path.join(ROOT, edit.path)) as f:
            text = f.read()
        try:
            changed = apply(edit, text)
            ast.parse(changed)
        except (ValueError, SyntaxError) as e:
            problems.append(str(e))
    return problems


def copy_project(into):
    for name in COPIED:
        source = os.path.join(ROOT, name)
        if os.path.isdir(source):
            shutil.copytree(source, os.path.join(into, name),
                            ignore=shutil.ignore_patterns('__pycache__', '.pytest_cache'))
        elif os.path.exists(source):
            shutil.copy2(source, os.path.join(into, name))


def run_tests(project, tests, timeout):
    """(pytest's exit status or None on timeout, seconds, the failures it named)."""
    command = [sys.executable, '-m', 'pytest', '-x', '-q', '-p', 'no:cacheprovider'] + tests
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE='1')
    started = time.monotonic()
    try:
        done = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, time.monotonic() - started, []
    failed = re.findall(r'^(?:FAILED|ERROR) (\S+)', done.stdout, re.M)
    return done.returncode, time.monotonic() - started, failed


def run_edit(edit, tests, timeout, mutate=True):
    """Apply `edit` to a fresh copy (or not, for a baseline) and run `tests`:
    (outcome, seconds, detail)."""
    with tempfile.TemporaryDirectory(prefix='wanxfer-mutant-') as project:
        copy_project(project)
        if mutate:
            path = os.path.join(project, edit.path)
            with open(path) as f:
                text = f.read()
            with open(path, 'w') as f:
                f.write(apply(edit, text))
        status, seconds, failed = run_tests(project, tests, timeout)
    if status is None:
        return 'caught (timeout)', seconds, 'the tests ran past %d s' % timeout
    if status == 0:
        return 'MISSED' if mutate else 'passes', seconds, ''
    if status == 5:
        return 'error', seconds, 'no tests selected by %s' % ' '.join(tests)
    if status == 1:
        return 'caught' if mutate else 'FAILS', seconds, ', '.join(failed)
    return 'error', seconds, 'pytest exit status %d %s' % (status, ', '.join(failed))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--only', action='append', metavar='NAME', help='run this edit (repeatable)')
    parser.add_argument('--full', action='store_true', help='run the whole suite for each edit')
    parser.add_argument('--baseline', action='store_true',
                        help='first run each edit\'s tests on the unedited copy')
    parser.add_argument('--check', action='store_true', help='only check that the table applies')
    parser.add_argument('--list', action='store_true', help='list the edits and exit')
    parser.add_argument('--tests', metavar='ARGS',
                        help='pytest arguments to run instead of each edit\'s own, e.g. '
                             '"tests/test_bulk.py -k proof": does this one test catch the edit?')
    parser.add_argument('--timeout', type=float, default=EDIT_TIMEOUT)
    args = parser.parse_args(argv)
    edits = EDITS
    if args.only:
        unknown = set(args.only) - {e.name for e in EDITS}
        if unknown:
            parser.error('no edit named %s' % ', '.join(sorted(unknown)))
        edits = [e for e in EDITS if e.name in args.only]
    if args.list:
        for edit in edits:
            print('%-24s %s\n%24s   tests: %s' % (edit.name, edit.promise, '', ' '.join(edit.tests)))
        return 0
    problems = check_table(edits)
    if problems:
        for problem in problems:
            print('mutate: error: %s' % problem, file=sys.stderr)
        return 2
    if args.check:
        print('%d edits apply cleanly' % len(edits))
        return 0
    if args.baseline:
        for tests in sorted({tuple(e.tests) for e in edits}):
            outcome, seconds, detail = run_edit(None, list(tests), args.timeout, mutate=False)
            print('baseline %-8s %6.1fs  %s  %s' % (outcome, seconds, ' '.join(tests), detail),
                  flush=True)
            if outcome != 'passes':
                return 2
    rows = []
    for edit in edits:
        tests = ['tests'] if args.full else args.tests.split() if args.tests else edit.tests
        outcome, seconds, detail = run_edit(edit, tests, args.timeout)
        rows.append((edit, outcome, seconds, detail))
        print('%-24s %-16s %6.1fs  %s' % (edit.name, outcome, seconds, detail), flush=True)
    missed = [edit for edit, outcome, _, _ in rows if outcome == 'MISSED']
    errors = [edit for edit, outcome, _, _ in rows if outcome == 'error']
    print('\n%d edits: %d caught, %d missed, %d errors' % (
        len(rows), len(rows) - len(missed) - len(errors), len(missed), len(errors)))
    for edit in missed:
        print('  MISSED %s: %s (tests: %s)' % (edit.name, edit.promise, ' '.join(edit.tests)))
    for edit in errors:
        print('  ERROR  %s: %s' % (edit.name, edit.promise))
    return 2 if errors else 1 if missed else 0


if __name__ == '__main__':
    sys.exit(main())
