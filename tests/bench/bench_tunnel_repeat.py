#!/usr/bin/env python3
"""Issue 15's reproduction through a tunnel pair on loopback: fixed-size
records (a counter and padding, as a table's rows) sent, sent again with 14
bytes inserted after 1 MiB, and sent a third time unchanged, one connection
each; the near side's wire bytes for each pass (its own `stats` figures).
The second and third passes cost references: one by one, 37 bytes a chunk,
or as runs.  No root.

  python3 tests/bench/bench_tunnel_repeat.py --size 64M
  git show 3955930:wanxfer.py > /tmp/old.py
  python3 tests/bench/bench_tunnel_repeat.py --size 64M --wanxfer /tmp/old.py
"""

import argparse
import hashlib
import os
import shutil
import socket
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import helpers  # noqa: E402


def send(port, payload):
    conn = socket.create_connection(('127.0.0.1', port), timeout=120)
    conn.sendall(payload)
    conn.shutdown(socket.SHUT_WR)
    answer = bytearray()
    while True:
        data = conn.recv(1 << 16)
        if not data:
            break
        answer += data
    conn.close()
    if answer.split()[0].decode() != hashlib.sha256(payload).hexdigest():
        raise SystemExit('the target got other bytes')


def wire_after(cache, sent):
    """The near side's tunnel-out wire bytes once its figures cover `sent`
    bytes and are saved again after that (every 2 s)."""
    deadline = time.monotonic() + 30
    first = None
    while time.monotonic() < deadline:
        for run in helpers.stats(cache)['running']:
            out = run['tunnel-out']
            if out['original_bytes'] == sent:
                if first is None:
                    first = run['updated']
                elif run['updated'] > first:
                    return out['transferred_bytes']
        time.sleep(0.2)                 # polling with a deadline
    raise SystemExit('no figures from the near side')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--size', type=harness.size_arg, default=64 << 20, help='bytes of records (default 64M)')
    parser.add_argument('--wanxfer', help='another wanxfer.py to run as both tunnels')
    args = parser.parse_args(argv)
    if args.wanxfer:
        helpers.WANXFER = os.path.abspath(args.wanxfer)
    data = helpers.fixed_records(args.size)
    edited = data[:1 << 20] + b'p' * 14 + data[1 << 20:]
    work = tempfile.mkdtemp(prefix='wanxfer-repeat-')
    target = helpers.Server(helpers.digest_handler)
    far = near = None
    try:
        far = helpers.start_far(os.path.join(work, 'far.db'), [target.port])
        near = helpers.start_near(os.path.join(work, 'near.db'), far.port, [target.port])
        wire, sent = [], 0
        for name, payload in (('first', data), ('14 bytes inserted', edited), ('again', edited)):
            send(near.port, payload)
            sent += len(payload)
            wire.append(wire_after(os.path.join(work, 'near.db'), sent) - sum(wire))
            print('%-18s %12d bytes on the wire for %d' % (name, wire[-1], len(payload)))
    finally:
        for process in (near, far):
            if process is not None:
                process.stop()
        target.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
