#!/usr/bin/env python3
"""wanxfer: move data between distant data centres fast, in one file.

Three jobs, one shared secret:

    serve / get   bulk file transfer: TCP control channel, paced UDP data
                  channel, lossless, authenticated, encrypted, verified, resumable
    tunnel        TCP port forwarding between two peers, compressed and
                  deduplicated against a persistent chunk cache
    stats         what was sent, how fast, how much was saved

The file reads top to bottom from what the rest depends on: errors; wire
formats and the protocol parameters both ends must agree on; plumbing that
several sections share (threads, sockets, the event loop); security; the
chunk store and codec; rate control; the bulk transfer (state machines,
sockets and files, server, client, worker processes); the link emulator
used by `demo` and the tests; the tunnel; reporting; and the command line.
Nothing runs at import time.

Standard library only; Python 3.8 to 3.13.  MIT licence (see LICENSE).
"""

import argparse
import base64
import collections
import errno
import functools
import hashlib
import heapq
import hmac
import itertools
import json
import mmap
import os
import queue
import random
import re
import secrets
import selectors
import shutil
import signal
import socket
import sqlite3
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import types
import warnings
import weakref
import zlib

try:
    import fcntl
except ImportError:                     # not a Unix: no sharing of extents
    fcntl = None

try:
    import lzma
except ImportError:                     # a Python built without liblzma: the tunnel says so
    lzma = None                         # at HELLO, and its peer sends it deflate only

__version__ = '0.1.0'

DEFAULT_PORT = 46224          # Tsunami UDP's port, so firewall rules carry over
SECRET_ENV = 'WANXFER_SECRET'


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------
# One root exception.  Only main() turns these into a line on stderr and an
# exit status; everything below raises and lets the caller decide.


class WanxferError(Exception):
    """Root of every error wanxfer reports to a user."""
    exit_status = 1


class UsageError(WanxferError):
    """Bad command-line input: exit status 2."""
    exit_status = 2


class ProtocolError(WanxferError):
    """The peer sent something that does not parse or breaks the protocol."""


class AuthError(ProtocolError):
    """The handshake failed: wrong secret, or settings that cannot agree."""


class PeerClosed(ProtocolError):
    """The peer hung up: the end of a session, not a breach of the protocol."""


class RemoteError(WanxferError):
    """The peer refused a request and said why."""


class TransferError(WanxferError):
    """A transfer could not complete (timeout, disk full, digest mismatch)."""


class DiskFull(TransferError):
    """The destination's disk (or quota) is full.  `written` bytes of the
    write that failed did reach the file before it filled up."""

    def __init__(self, message, written=0):
        super().__init__(message)
        self.written = written


class DigestMismatch(TransferError):
    """The file received does not hash to the server's digest (it is
    fetched again from scratch, once, before this reaches the user)."""

    def __init__(self, remote):
        super().__init__('%s: digest mismatch after a full transfer; the source may be changing '
                         'while it is read' % remote)
        self.remote = remote


class PathTooNarrow(WanxferError):
    """Data packets of the size tried do not cross the path (never shown
    to the user: the client fetches again with smaller ones)."""


class CacheError(WanxferError):
    """The chunk cache cannot be used: another program's file, a newer
    format, or a directory that cannot be written."""


class ShareEnded(WanxferError):
    """A receiving worker's coordinator ended its share of a file (never
    shown: the coordinator knows why)."""


class NoThread(WanxferError):
    """A helper thread could not be started (a process's thread limit,
    memory): what needed it fails with one line, not a traceback."""


# ---------------------------------------------------------------------------
# Wire formats
# ---------------------------------------------------------------------------
# Every byte layout wanxfer puts on the wire, in one place.  All integers are
# big-endian.  README.md describes the protocol around these layouts.
#
# Control channel (TCP): a plaintext handshake (HELLO, SERVER_HELLO,
# CLIENT_PROOF), then frames of FRAME_HEADER (body length) followed by a sealed
# body: UTF-8 JSON, encrypted (unless --no-encrypt) and tagged.
#
# Data channel (UDP): every datagram starts with PACKET_HEADER and ends with a
# TAG_SIZE keyed tag over everything before it.  The payload between them is
# encrypted unless --no-encrypt.

PROTOCOL_MAGIC = b'WXFR'
PROTOCOL_VERSION = 3
FLAG_ENCRYPT = 0x01
FLAG_AES_CTR = 0x02     # the keystream is AES-256-CTR (client: can; server: will)
FLAG_MIRROR = 0x04      # client: send me small control frames on the data channel too
FLAG_EARLY = 0x08       # client: an early handshake (EarlyHandshakes): EARLY_PROOF follows this HELLO

NONCE_SIZE = 32
SALT_SIZE = 16
PROOF_SIZE = 32
TAG_SIZE = 16

# Every version of the protocol opens both hellos with this prefix, so each
# side can name the other's version before reading a layout it may not know.
HELLO_PREFIX = struct.Struct('!4sBB')           # magic, version, flags
HELLO = struct.Struct('!4sBB32s')               # prefix, client nonce
SERVER_HELLO = struct.Struct('!4sBB32s16s32s')  # prefix, server nonce, salt of the secret, proof
CLIENT_PROOF = struct.Struct('!32s')            # proof
# The early handshake: the HELLO also goes as a KIND_HANDSHAKE datagram beside
# the TCP connect, padded to EARLY_HELLO_SIZE, and the SERVER_HELLO comes back
# as one (never larger than what asked for it).  The TCP HELLO that follows,
# with FLAG_EARLY, carries EARLY_PROOF: the server nonce that datagram gave
# (EARLY_NONCE: when the server made it, in ms of its clock, and a MAC) and
# the client's proof.  A server that refuses the proof hangs up and says
# nothing; a client hung up on before the server's first message connects
# again, once, the plain way (Client._refused_early).
EARLY_PROOF = struct.Struct('!32s32s')          # server nonce, proof
EARLY_NONCE = struct.Struct('!Q24s')            # made (ms), MAC
EARLY_HANDSHAKE_SECONDS = 10.0  # an early server nonce is good for this long, and taken once
MAX_EARLY_CLAIMS = 4096         # early handshakes a server remembers taking (within those seconds)
FRAME_HEADER = struct.Struct('!I')              # sealed body length
MAX_FRAME = 1 << 24

HANDSHAKE_TIMEOUT = 15.0

# Datagram kinds (first byte of PACKET_HEADER).
KIND_DATA = 1          # server -> client: one block of a file
KIND_HELLO = 2         # client -> server: opens the UDP flow (NAT, firewalls); its flags
                       # byte names the worker whose flow it opens (0: the session's own)
KIND_FEEDBACK = 3      # client -> server: acknowledgements and path delay
KIND_NAK = 4           # client -> server: blocks still missing, by range
KIND_PROBE = 5         # server -> client: padding, to learn the largest datagram the path carries
KIND_CONTROL = 6       # either way: a copy of a small control frame (MIRRORED_FRAME)
KIND_HANDSHAKE = 7     # either way, header otherwise zero: an early HELLO, its SERVER_HELLO

UDP_SETUP_TIMEOUT = 10.0
DATA_TIMEOUT = 30.0             # s without feedback before a transfer is abandoned

# Data packet flags.
DATA_FLAG_RETRANSMIT = 0x01
DATA_FLAG_ZLIB = 0x02           # the body is the block compressed by zlib (one stream per block)
DATA_FLAG_STEADY = 0x04         # the sender's rate control is past its startup: a striped flow's
                                # receiver may acknowledge every k intervals (stretched_feedback)

# Every datagram: kind, flags, session id, packet number (the nonce: each
# direction counts its own from 0 and never reuses one).
PACKET_HEADER = struct.Struct('!BBIQ')
# A data datagram's header extends it with the block number and the send
# time in microseconds modulo 2**32 (for the receiver's delay measurement).
DATA_HEADER = struct.Struct('!BBIQQI')
EARLY_HELLO_SIZE = PACKET_HEADER.size + SERVER_HELLO.size
PACKET_OVERHEAD = DATA_HEADER.size + TAG_SIZE
# A control frame's copy on the data channel (to a client that offered
# FLAG_MIRROR, and from a client from its first request on): PACKET_HEADER, its
# packet number the frame's index on the control channel, then the frame as
# sent there, sealed by the control key.  A frame TCP must send again waits
# a round trip or two, and holds back those after it; its copy does not.
MIRRORED_FRAME = 1200           # bytes of a frame copied, at most: fits a 1280-byte path
MIRRORED_AHEAD = 64             # frames a receiver holds beyond the next one it reads, at most
OFFER_POLL = 0.05               # s a wait for a control frame goes before it looks for copies offered

# Feedback body: file id, window start, largest packet number received,
# microseconds since that packet arrived, queueing delay (us), gap count;
# then that many FEEDBACK_GAP (offset from window start, length) pairs of
# packet numbers not received.  Everything in the window outside the gaps
# arrived.
FEEDBACK_FIELDS = struct.Struct('!IQQIIH')
FEEDBACK_GAP = struct.Struct('!II')
MAX_FEEDBACK_GAPS = 120

# NAK body: file id, range count; then that many NAK_RANGE [start, end)
# block ranges the receiver does not hold.
NAK_FIELDS = struct.Struct('!IH')
NAK_RANGE = struct.Struct('!QQ')
MAX_NAK_RANGES = 64

IP_UDP_OVERHEAD = types.MappingProxyType({socket.AF_INET: 28, socket.AF_INET6: 48})
MIN_MTU = 1280                  # IPv6's minimum: every path carries this
MAX_MTU = 65535                 # the largest IP packet
PROBE_MTUS = (MIN_MTU, 1500, 9000, MAX_MTU)   # and the route's own MTU


def ip_udp_overhead(family):
    """Bytes of IP and UDP header around a datagram (IPv6's, the larger,
    for a family not known)."""
    return IP_UDP_OVERHEAD.get(family, IP_UDP_OVERHEAD[socket.AF_INET6])


def block_size_for_mtu(mtu, family=socket.AF_INET):
    """Largest file block whose datagram fits in one packet of `mtu` bytes."""
    return min(mtu, MAX_MTU) - ip_udp_overhead(family) - PACKET_OVERHEAD


# --- Delta transfers: the server's signature of a file -----------------------
# Sent on the control channel as JSON {'op': 'signature', 'file', 'offset',
# 'spans'}, where 'spans' is base64 of zlib of SIGNATURE_SPAN records.
SIGNATURE_SPAN = struct.Struct('!I16s')         # span length, first 16 bytes of its SHA-256
SPAN_DIGEST_SIZE = 16
ZERO_SPAN = bytes(SPAN_DIGEST_SIZE)             # digest field of a span of zero bytes


# --- Between `serve` and its session processes (one machine, no network) ----
# Over a SOCK_SEQPACKET socketpair, one message per packet.  A session process,
# once its client has authenticated, sends SESSION_REGISTER with its session
# id; the listener answers SESSION_ACCEPTED or SESSION_REFUSED (the id is
# taken), then passes on every HELLO datagram that names that id:
# SESSION_HELLO, the datagram's source address as JSON, the datagram.  The
# session process checks the datagram's tag: keys never leave it.
SESSION_REGISTER = struct.Struct('!cI')         # b'R', session id
SESSION_HELLO = struct.Struct('!cH')            # b'H', length of the address JSON
SESSION_ACCEPTED = b'Y'
SESSION_REFUSED = b'N'
MAX_SESSION_MESSAGE = 4096


# --- Between a transfer's coordinator and its worker processes ---------------
# `get --workers N` and `serve --workers N` stripe one transfer over N
# processes per end.  The coordinator (the session's own process: worker 0)
# forks workers 1..N-1 and talks to each over a SOCK_SEQPACKET socketpair,
# one message per packet, each opening with a code byte.  Ranges follow a
# WORKER_RANGES as NAK_RANGE records, at most MAX_WORKER_RANGES of them.
#
# Sending end (serve): coordinator -> worker
#   WORKER_FLOW     b'U': the client worker's HELLO came from this address
#                   (JSON of it follows): open the worker's UDP flow there
#   WORKER_SEND     b'F': send a file's share (its path, UTF-8, follows)
#   WORKER_RANGES   b'N' blocks to send, b'W' blocks withdrawn (a delta's needs)
#   WORKER_RATE     b'R': pace at this rate (bytes/s); the path's best delivery;
#                   whether the rate control is past its startup
#   WORKER_END      b'E': the file is over (the receiver said done, or gave up)
#   WORKER_JOB      to worker 1, before its WORKER_SEND: b'G' read the file
#                   (its path follows) for its digest; to each worker of a
#                   delta, b'V' hash the units of its stripes for the
#                   signature (WORKER_SPREAD, the stripe cycle, one byte a
#                   stripe, and the path follow); b'K' (no path) the file is
#                   over: drop its jobs
# worker -> coordinator
#   b'u' (one byte)  the UDP flow is open
#   WORKER_ACK      b'A': one acknowledgement, as RateController.on_feedback takes it
#   WORKER_EVENT    b'I' the worker ran out of data, b'B' it has data again,
#                   b'S' its feedback went silent
#   WORKER_SENT     b'D': its share of the file is over, with what it cost
#   WORKER_UNITS    b'h': span digests of a delta's units from this one on
#                   (SPAN_DIGEST_SIZE bytes each follow, ZERO_SPAN for zeros)
#   WORKER_DIGEST   b'g' (worker 1): the whole file's SHA-256
#   WORKER_JOB      b'x': a job failed (the reason, UTF-8, follows)
# Receiving end (get): coordinator -> worker
#   WORKER_RECEIVE  b'F': receive a file's share (JSON [destination, timeout,
#                   the stripe cycle or null] follows)
#   WORKER_RANGES   b'H': blocks held from local data (a delta)
#   WORKER_DECIDED  b'C': a delta's blocks are decided up to here
#   WORKER_END      b'E': give the file up
#   WORKER_FRONTIER to worker 1: b'G' the file's first blocks are written up
#                   to here (the first starts its digest), b'Z' all are, on
#                   disk: answer with the digest
# worker -> coordinator
#   WORKER_RANGES   b'W': blocks now safely written to the shared partial file
#   WORKER_PROGRESS b'P' progress, b'C' its share is complete (every block
#                   written), b'X' it failed (the reason, UTF-8, follows)
#   WORKER_DIGEST   b'g' (worker 1): the whole file's SHA-256, once told b'Z'
MAX_WORKERS = 64                                # the worker index rides in a HELLO's flags byte
MAX_WORKER_RANGES = 256
MAX_WORKER_MESSAGE = 1 << 16    # bytes a worker message may have (MAX_WORKER_RANGES ranges, a path):
                                # a packet longer than the receive buffer would be cut short
WORKER_FLOW = struct.Struct('!cH')              # b'U', length of the address JSON
WORKER_SEND = struct.Struct('!cIQIBdQqH')       # b'F', file id, first packet number, block size,
                                                # compress, rtt (s), size, mtime (ns), workers
                                                # sharing the file
WORKER_RANGES = struct.Struct('!cIH')           # code, file id, range count
WORKER_RATE = struct.Struct('!cdd?')            # b'R', rate (bytes/s), peak delivery (bytes/s),
                                                # past the startup (RateController.steady)
WORKER_END = struct.Struct('!cI')               # b'E', file id
WORKER_ACK = struct.Struct('!cdddQQddd')        # b'A', now, queue delay, bytes delivered, packets
                                                # delivered, lost, rtt, send time (-1: unknown),
                                                # ack delay (all times in s, the one monotonic clock)
WORKER_EVENT = struct.Struct('!cd')             # b'I', b'B' or b'S', now
WORKER_SENT = struct.Struct('!cIQQQQQB')        # b'D', file id, next packet number, packets lost,
                                                # retransmitted, wire bytes, compressed, 1 if whole
WORKER_RECEIVE = struct.Struct('!cIQIQQHHQd')   # b'F', file id, first packet number, block size,
                                                # size, blocks per stripe, workers, index, decided, rtt
WORKER_DECIDED = struct.Struct('!cIQ')          # b'C', file id, blocks decided
WORKER_JOB = struct.Struct('!cIQq')             # code, file id, size, mtime (ns)
WORKER_SPREAD = struct.Struct('!IIH')           # block size, blocks per stripe, cycle length
WORKER_UNITS = struct.Struct('!cIQ')            # b'h', file id, first unit
UNITS_PER_MESSAGE = 32                          # units a worker reads and reports at once (2 MiB)
WORKER_DIGEST = struct.Struct('!cI32s')         # b'g', file id, SHA-256
WORKER_FRONTIER = struct.Struct('!cIQ')         # b'G' or b'Z', file id, blocks written from the start
WORKER_PROGRESS = struct.Struct('!cIQQQQQdQQQQ')    # code, file id, blocks held (its stripes),
                                                # bytes written, packets, duplicates, rejected,
                                                # first arrival (-1: none yet), and the rest
                                                # of its FlowCounts: packet numbers, resent,
                                                # compressed, datagram bytes


# --- Tunnel peer connection --------------------------------------------------
# After the same handshake (HELLO, SERVER_HELLO, CLIENT_PROOF), both peers send
# frames exactly like the control channel's: FRAME_HEADER, then a body sealed
# with the control Sealers, the frame counter as nonce.  A tunnel body is
# binary: TUNNEL_MESSAGE (type, stream id), then the payload of that type.
# Stream ids are chosen by the --peer side, counting up from 1; 0 is the
# connection itself.
TUNNEL_MAGIC = b'WXTN'
TUNNEL_VERSION = 3                              # 2: BLOB_DEFLATE replaced version 1's BLOB_ZLIB;
                                                # 3: BLOB_LZMA, HELLO says what a side decodes,
                                                # PIECE_RUN and MSG_RUN_REQUEST/MSG_RUN
TUNNEL_MESSAGE = struct.Struct('!BI')           # message type, stream id
TUNNEL_HELLO_PREFIX = struct.Struct('!4sB')     # magic, version: every version's HELLO starts so
TUNNEL_HELLO = struct.Struct('!4sBIB')          # prefix, receive window per stream (bytes),
                                                # blob encodings this side decodes (bit 1 << encoding)
TUNNEL_OPEN = struct.Struct('!H')               # target port; the target host (UTF-8) follows
TUNNEL_DATA = struct.Struct('!BHI')             # blob encoding, piece count, blob size decoded; the blob
TUNNEL_PIECE = struct.Struct('!BI')             # piece kind, length; PIECE_REF adds the digest
TUNNEL_RUN = struct.Struct('!H16s')             # after a PIECE_RUN's TUNNEL_PIECE: chunks, run check
TUNNEL_CHUNK = struct.Struct('!B')              # blob encoding (after the digest); the blob
TUNNEL_CREDIT = struct.Struct('!Q')             # bytes of this stream delivered so far
TUNNEL_PING = struct.Struct('!Q')               # sender's token, echoed in MSG_PONG
CHUNK_DIGEST_SIZE = 32                          # SHA-256
RUN_CHECK_SIZE = 16                             # of SHA-256 of the run's digests, concatenated
MAX_RUN = 4096                                  # chunks in one PIECE_RUN

# Message types.
MSG_HELLO = 1           # both ways, first frame: TUNNEL_HELLO
MSG_OPEN = 2            # peer -> listen: open a stream to TUNNEL_OPEN's target
MSG_DATA = 3            # both ways: TUNNEL_DATA, then the blob: piece table and literal bytes
MSG_CREDIT = 4          # both ways: TUNNEL_CREDIT, the receiver's flow-control window moves on
MSG_SHUT = 5            # both ways: no more data this way (half-close)
MSG_RESET = 6           # both ways: abort the stream; payload: reason (UTF-8)
MSG_CHUNK_REQUEST = 7   # receiver -> sender: digest of a reference it could not resolve
MSG_CHUNK = 8           # sender -> receiver: digest, blob encoding byte, blob (the chunk)
MSG_PING = 9            # both ways: TUNNEL_PING; the peer answers MSG_PONG with it
MSG_PONG = 10
MSG_RUN_REQUEST = 11    # receiver -> sender: the check of a run it could not resolve
MSG_RUN = 12            # sender -> receiver: the run's check, then the digests of its chunks

# Piece kinds inside MSG_DATA.  A stream is cut into chunks; the receiver
# assembles the chunk in progress from PARTs, and a CHUNK or REF ends it.
PIECE_CHUNK = 1         # literal bytes (from the blob) that end the current chunk
PIECE_PART = 2          # literal bytes (from the blob); the chunk goes on
PIECE_REF = 3           # the chunk with this digest and total length ends here:
                        # deliver what is not yet delivered of it from the cache
PIECE_RUN = 4           # TUNNEL_RUN: `count` whole chunks of `length` bytes in all, each the
                        # one that followed the one before it last time (ChunkLinks), from
                        # the last chunk this stream ended; the check names their digests

# A MSG_DATA blob, once decoded: the piece table (a TUNNEL_PIECE per piece,
# each PIECE_REF followed by its digest), then the literal bytes of the CHUNK
# and PART pieces, concatenated.  A MSG_CHUNK blob is the chunk.
# A direction's history is the decoded blobs of every DATA and CHUNK it
# carried, in frame order, raw ones too; each BLOB_DEFLATE is primed with
# the last HISTORY_SIZE bytes of it, so blobs compress about as well as one
# continuous stream yet each can be compressed on its own, in parallel.
# A BLOB_LZMA is not primed: it pays on larger blobs of structured data
# (WAL, binlogs, binaries), where LZMA's coder beats deflate's by far more
# than the history would give; a sender chooses per blob (BlobChoice).
BLOB_RAW = 0
BLOB_DEFLATE = 2        # one complete raw deflate stream (RFC 1951, ended by its final block),
                        # dictionary: the last HISTORY_SIZE bytes of the direction's history
                        # (1 was version 1's single zlib stream per direction)
BLOB_LZMA = 3           # one complete raw LZMA2 stream (xz's filter 0x21 with no container,
                        # ended by its end marker), dictionary of at most LZMA_DICT bytes
HISTORY_SIZE = 32 << 10                         # deflate's window
LZMA_DICT = 256 << 10                           # what a receiver allocates (xz preset 0's)
MIN_COMPRESS = 256
PING_INTERVAL = 10.0
PEER_DEAD_AFTER = 35.0              # s without a frame from the peer


# --- Control messages: what each end accepts ---------------------------------
# Everything from the other end is hostile until checked.  A control frame's
# body must be JSON that nests at most MAX_JSON_DEPTH deep (told before it is
# parsed: the parser recurses once per level), whose numbers are finite and
# short, and whose message, if its op is in CONTROL_MESSAGES, has the fields
# listed there with the types and ranges listed there.  Anything else is a
# ProtocolError naming the op and the field, and ends that session.  Fields
# not listed are ignored and ops not listed are left to the dispatcher (a
# newer peer may add either; a request a server does not know is answered
# with `error`).  Ranges are [start, end) pairs with start <= end.

MAX_FILE_SIZE = 1 << 53         # bytes (and blocks): every such count is an exact JSON number
MIN_BLOCK_SIZE = 512            # smaller blocks cost more per-block work than they carry
MAX_BLOCK_SIZE = block_size_for_mtu(MAX_MTU)
MAX_RATE_BYTES = 1e13           # bytes/s a `max_rate` may name: 80 Tbit/s
MAX_MTIME_NS = 1 << 62
MAX_NAME = 4096                 # characters in a path or name: Linux's PATH_MAX
MAX_TEXT = 1 << 16              # characters in an error message
MAX_ITEMS = 1 << 20             # entries in a list: files of a listing, ranges of a need
MAX_JSON_DEPTH = 16             # the deepest message is three levels
MAX_JSON_NUMBER = 32            # characters in a number (int() is quadratic in them)
MAX_OP = 64                     # characters in an op
SMALL_FILE = 256 << 10          # files this small go whole on the control channel, in batches:
                                # a round trip costs more than sending them
SMALL_BATCH_BYTES = 4 << 20     # and a batch (one `read` request) holds at most this much
SMALL_BATCH_FILES = 256
SMALL_BATCHES_AHEAD = 4         # `read` requests a client may have unanswered
SMALL_REQUEST_BYTES = 20 << 10  # and a request's JSON at most this: those ahead fit a receive buffer
SMALL_ITEM_BYTES = 55           # JSON of a `read` item besides its path (about)
LISTING_PAGE_BYTES = 1 << 20    # a listing goes in `listing` messages of at most about this much JSON
LISTING_ENTRY_BYTES = 100       # JSON of a file entry besides its path, at most
STRIPE_BYTES = 2 << 20          # a file striped over workers goes in runs of about this much each,
STRIPES_PER_WORKER = 4          # ... and only over as many workers as have this many runs each
STRIPE_CYCLE = 32               # stripes per worker in one round of a weighted deal (stripe_cycle)
STRIPE_SURELY = (2 * STRIPES_PER_WORKER - 1) * STRIPE_BYTES     # a larger file has stripes for 2
MAX_STRIPE_CYCLE = STRIPE_CYCLE * MAX_WORKERS  # and the longest round a client takes


def frozen_mapping(mapping):
    """A read-only view of `mapping`, nested mappings included: tables at
    module level are shared by every session in the process."""
    return types.MappingProxyType({key: frozen_mapping(value) if isinstance(value, dict) else value
                                   for key, value in mapping.items()})

def _expect_int(low, high):
    def check(value):
        if type(value) is not int or not low <= value <= high:
            return '', 'an integer from %d to %d' % (low, high)
    return check


def _expect_number(low, high):
    """A JSON number above `low` and at most `high`: int or float, finite."""
    def check(value):
        if type(value) not in (int, float) or not low < value <= high:
            return '', 'a number above %g and at most %g' % (low, high)
    return check


def _expect_bool(value):
    if type(value) is not bool:
        return '', 'true or false'


def _expect_text(limit, name=False):
    """A string of at most `limit` characters; a `name` (a path) also
    without NUL and one the file system can spell."""
    def check(value):
        if type(value) is not str or len(value) > limit:
            return '', 'a string of at most %d characters' % limit
        if name:
            if '\x00' in value:
                return '', 'a file name without NUL'
            try:
                os.fsencode(value)
            except UnicodeError:
                return '', 'a file name the file system can spell'
    return check


def _expect_choice(*choices):
    def check(value):
        if type(value) is not str or value not in choices:
            return '', 'one of %s' % ', '.join(choices)
    return check


def _expect_hex(length):
    def check(value):
        if type(value) is not str or len(value) != length or value.strip('0123456789abcdef'):
            return '', '%d lower-case hex digits' % length
    return check


def _expect_list(item, limit=MAX_ITEMS):
    def check(value):
        if type(value) is not list or len(value) > limit:
            return '', 'a list of at most %d items' % limit
        for i, element in enumerate(value):
            problem = item(element)
            if problem:
                return '[%d]%s' % (i, problem[0]), problem[1]
    return check


def _expect_ranges(value):
    if type(value) is not list or len(value) > MAX_ITEMS:
        return '', 'a list of at most %d [start, end) ranges' % MAX_ITEMS
    for i, pair in enumerate(value):
        if type(pair) is not list or len(pair) != 2 or \
                not all(type(n) is int and 0 <= n <= MAX_FILE_SIZE for n in pair) or pair[0] > pair[1]:
            return '[%d]' % i, 'a range [start, end) with 0 <= start <= end <= %d' % MAX_FILE_SIZE


def _expect_object(fields):
    """A JSON object with `fields` {name: check}; a name ending in '?' may be absent."""
    def check(value):
        if type(value) is not dict:
            return '', 'an object'
        for key, item in fields.items():
            name = key.rstrip('?')
            if name not in value:
                if key.endswith('?'):
                    continue
                return '.' + name, None
            problem = item(value[name])
            if problem:
                return '.' + name + problem[0], problem[1]
    return check


def _nullable(check):
    return lambda value: None if value is None else check(value)


_SIZE = _expect_int(0, MAX_FILE_SIZE)
_MTIME = _expect_int(-MAX_MTIME_NS, MAX_MTIME_NS)
_FILE_ID = _expect_int(0, 0xFFFFFFFF)           # sent back in FEEDBACK and NAK as a u32
_COUNT = _expect_int(0, 1 << 63)
_NAME = _expect_text(MAX_NAME, name=True)
_ENTRY = _expect_object({'path': _NAME, 'size': _SIZE, 'mtime_ns': _MTIME,
                         'mode': _expect_int(0, 0o7777)})
_OPEN_FIELDS = ('size', 'mtime_ns', 'mode', 'block_size', 'delta')

# sender -> op -> fields (as _expect_object's), and a rule across fields.
CONTROL_MESSAGES = frozen_mapping({
    'client': {
        'list': {'path?': _NAME},
        'fetch': {'path?': _NAME, 'size?': _SIZE, 'mtime_ns?': _MTIME,
                  'block_size': _expect_int(MIN_BLOCK_SIZE, MAX_BLOCK_SIZE),
                  'need?': _expect_ranges, 'max_rate?': _nullable(_expect_number(0, MAX_RATE_BYTES)),
                  'delta?': _expect_bool, 'delta_min?': _SIZE, 'lead?': _expect_bool,
                  'whole_lead?': _expect_bool, 'compress?': _expect_bool,
                  'early_digest?': _expect_bool},
        'read': {'files': _expect_list(_expect_object({'path': _NAME, 'size': _SIZE,
                                                        'mtime_ns': _MTIME})),
                 'compress?': _expect_bool},
        'need': {'file': _FILE_ID, 'ranges': _expect_ranges, 'held?': _expect_ranges},
        'refine': {'file': _FILE_ID, 'offset': _SIZE, 'end': _SIZE},
        'done': {'file': _FILE_ID},
        'abort': {},
        'workers': {'count': _expect_int(1, MAX_WORKERS), 'lazy?': _expect_bool,
                    'cycle?': _expect_bool, 'auto?': _expect_bool},
    },
    'server': {
        'ready': {'probes?': _expect_list(_expect_int(0, MAX_MTU), 16),
                  'server?': _expect_text(64)},
        'error': {'message?': _expect_text(MAX_TEXT)},
        'listing': {'kind': _expect_choice('file', 'dir'), 'name?': _NAME,
                    'files': _expect_list(_ENTRY), 'dirs': _expect_list(_NAME), 'more?': _expect_bool},
        'start': {'file': _FILE_ID, 'first_seq': _expect_int(0, 1 << 62), 'lead?': _SIZE,
                  'size?': _SIZE, 'mtime_ns?': _MTIME, 'mode?': _expect_int(0, 0o7777),
                  'block_size?': _expect_int(MIN_BLOCK_SIZE, MAX_BLOCK_SIZE), 'delta?': _expect_bool,
                  'stripe?': _expect_int(1, MAX_FILE_SIZE),
                  'workers?': _expect_list(_expect_int(0, 1 << 62), MAX_WORKERS - 1),
                  'cycle?': _expect_list(_expect_int(0, MAX_WORKERS - 1), MAX_STRIPE_CYCLE)},
        'workers': {'count': _expect_int(1, MAX_WORKERS), 'lazy?': _expect_bool},
        'fork': {},
        'digest': {'file': _FILE_ID, 'sha256': _expect_hex(64), 'packets_sent?': _COUNT,
                   'packets_lost?': _COUNT, 'packets_retransmitted?': _COUNT, 'wire_bytes?': _COUNT,
                   'signature_bytes?': _COUNT, 'packets_compressed?': _COUNT},
        'checksum': {'file': _FILE_ID, 'sha256': _expect_hex(64)},
        'signature': {'file': _FILE_ID, 'offset': _SIZE, 'spans': _expect_text(MAX_FRAME),
                      'refined?': _expect_bool},
        'content': {'path': _NAME, 'error?': _expect_text(MAX_TEXT),
                    'encoding?': _expect_choice('raw', 'zlib'), 'sha256?': _expect_hex(64),
                    'data?': _expect_text(MAX_FRAME)},
    },
})
CONTROL_RULES = frozen_mapping({
    ('server', 'listing'): (lambda m: m['kind'] == 'dir' or len(m['files']) == 1,
                            'files: a file\'s listing names exactly one'),
    ('server', 'start'): (lambda m: len({name in m for name in _OPEN_FIELDS}) == 1,
                          '%s: all or none (after an open fetch)' % ', '.join(_OPEN_FIELDS)),
    ('server', 'content'): (lambda m: 'error' in m or ('data' in m and 'sha256' in m),
                            'data and sha256, or error'),
})
_CONTROL_CHECKS = frozen_mapping({sender: {op: _expect_object(fields) for op, fields in ops.items()}
                                  for sender, ops in CONTROL_MESSAGES.items()})


def _describe(value):
    """A JSON value in a few words, however large it is."""
    if isinstance(value, list):
        return 'a list of %d' % len(value)
    if isinstance(value, dict):
        return 'an object'
    if isinstance(value, str):
        return repr(value[:40]) + ('...' if len(value) > 40 else '')
    return repr(value)[:40]


def validate_message(message, sender):
    """Check one decoded control message from `sender` ('client' or
    'server') against CONTROL_MESSAGES; ProtocolError if it breaks them."""
    op = message.get('op') if isinstance(message, dict) else None
    if type(op) is not str or not 0 < len(op) <= MAX_OP:
        raise ProtocolError('a control message from the %s without an op of at most %d characters'
                            % (sender, MAX_OP))
    check = _CONTROL_CHECKS[sender].get(op)
    if check is None:
        return message
    problem = check(message)
    if problem is not None:
        field, expected = problem[0].lstrip('.'), problem[1]
        if expected is None:
            raise ProtocolError('invalid %s from the %s: no %s' % (op, sender, field))
        value = message
        for step in re.findall(r'\w+|\[\d+\]', field):
            value = value[int(step[1:-1])] if step.startswith('[') else value.get(step)
        raise ProtocolError('invalid %s from the %s: %s must be %s, not %s'
                            % (op, sender, field, expected, _describe(value)))
    rule = CONTROL_RULES.get((sender, op))
    if rule is not None and not rule[0](message):
        raise ProtocolError('invalid %s from the %s: %s' % (op, sender, rule[1]))
    return message


_JSON_BRACKETS = bytes.maketrans(b'{}', b'[]')
_JSON_NOT_BRACKET = bytes(b for b in range(256) if b not in b'[]{}')


def json_nesting_within(body, limit):
    """Whether the JSON text `body` nests at most `limit` deep, told at C
    speed without parsing it: strings out (escapes first, then every other
    piece between quotes), brackets only and of one kind, then the
    innermost pairs removed, one level a pass."""
    if body.count(b'[') + body.count(b'{') <= limit:
        return True
    unescaped = bytes(body).replace(b'\\\\', b'').replace(b'\\"', b'')
    brackets = b''.join(unescaped.split(b'"')[::2]).translate(_JSON_BRACKETS, _JSON_NOT_BRACKET)
    if b'[' * (limit + 1) in brackets:
        return False
    for _level in range(limit):
        before = len(brackets)
        brackets = brackets.replace(b'[]', b'')
        if not brackets:
            return True
        if len(brackets) == before:
            return False                # unbalanced: not JSON at all
    return False


def _json_constant(name):
    raise ProtocolError('a control message with a non-finite number (%s)' % name)


def _json_int(text):
    if len(text) > MAX_JSON_NUMBER:
        raise ProtocolError('a control message with a %d-digit number' % len(text))
    return int(text)


def _json_float(text):
    value = float(text) if len(text) <= MAX_JSON_NUMBER else float('inf')
    if value in (float('inf'), float('-inf')):
        raise ProtocolError('a control message with a number out of range (%.40s)' % text)
    return value


def parse_control(body):
    """A control frame's body as a message: a JSON object with an op."""
    if not json_nesting_within(body, MAX_JSON_DEPTH):
        raise ProtocolError('a control message nested deeper than %d' % MAX_JSON_DEPTH)
    try:
        message = json.loads(body.decode('utf-8'), parse_constant=_json_constant,
                             parse_int=_json_int, parse_float=_json_float)
    except (ValueError, RecursionError):
        raise ProtocolError('control frame is not JSON')
    if not isinstance(message, dict) or not isinstance(message.get('op'), str):
        raise ProtocolError('a control message without an op')
    return message


def inflate(data, limit):
    """The zlib stream `data`, decompressed to at most `limit` bytes
    (never more in memory, whatever it claims), or ProtocolError."""
    if limit < 0:
        raise ProtocolError('compressed data of a negative size')
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, limit + 1)     # max_length 0 would mean no limit
    except zlib.error as e:
        raise ProtocolError('bad compressed data: %s' % e)
    if len(out) > limit or inflater.unconsumed_tail:
        raise ProtocolError('compressed data that decodes to more than %d bytes' % limit)
    if not inflater.eof:
        raise ProtocolError('truncated compressed data')
    return out


# ---------------------------------------------------------------------------
# Plumbing
# ---------------------------------------------------------------------------
# Threads, sockets and the event loop that several sections share (the bulk
# server and client, the tunnel, the link emulator), so none of them reaches
# into another's section for them; and the helper threads (digests,
# signatures) a session may start, counted so that no session starts more
# than its share.


def start_thread(target, name, args=()):
    """A daemon thread running target(*args), started; NoThread if it cannot be."""
    thread = threading.Thread(target=target, args=args, name=name, daemon=True)
    try:
        thread.start()
    except RuntimeError as e:
        raise NoThread('cannot start a %s thread: %s' % (name, e))
    return thread


def survive_thread_exits_without_descriptors():
    """Python 3.8 ends every thread with pthread_exit(), whose unwinding makes
    glibc load libgcc_s.so.1 the first time: if that first time comes while
    the process is out of descriptors (a flood of connections), the load
    fails and glibc aborts the whole process ("libgcc_s.so.1 must be
    installed for pthread_exit to work").  One thread ended at start-up,
    while descriptors are plentiful, leaves the library loaded for good.
    Python 3.9 and later end threads by returning, so need nothing."""
    if sys.version_info >= (3, 9):
        return
    try:
        start_thread(lambda: None, 'start-up').join()
    except NoThread:
        pass                            # nothing can end a thread that never starts


def exit_forked(status):
    """End a forked process at once, its output flushed: no atexit
    handlers, no cleanup of what it shares with its parent."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def recv_exactly(sock, n):
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ProtocolError('connection closed by peer')
        data += chunk
    return bytes(data)


SOL_UDP = 17
UDP_SEGMENT = 103               # Linux 4.18+, not in the socket module
UDP_GRO = 104                   # Linux 5.0+
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
SO_TIMESTAMPNS = 35             # Linux (asm-generic, x86, arm, powerpc, s390), not in the socket module
IP_MTU = 14
IP_MTU_DISCOVER = 10
IPV6_MTU_DISCOVER = 23
IP_PMTUDISC_DO = 2
CONNECT_TIMEOUT = 10.0          # s a TCP connect to a forwarded target may take
CONNECT_RACE = (0.2, 0.6, 1.4)  # s after a connect's first SYN at which another starts, while none answered


def _enlarge_buffers(sock, size):
    # Bursts of tens of thousands of packets a second overflow the default
    # 200 KB receive buffer before the relay thread is scheduled.  The kernel
    # caps the request at net.core.[rw]mem_max; a refusal is harmless.
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, size)
        except OSError:
            pass


def reset_socket(sock):
    """Close a TCP socket so the peer sees a reset, not an orderly end."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
    except OSError:
        pass
    sock.close()


def connect_racing(host, port, timeout, prepare=None, race=CONNECT_RACE, meanwhile=None):
    """A TCP connection to host:port, as socket.create_connection makes it
    (blocking, `timeout` set), but a lost SYN or SYN-ACK costs a fraction of
    a second instead of the kernel's one-second retry, which at a few
    percent of loss would be in every twentieth run: while no attempt has
    answered, another starts at each time in `race` (s from the first).
    The first to connect wins and the others are reset, so a server hears
    of them at once.  `prepare(sock)` runs before each connect (buffer
    sizes must be set before it); `meanwhile(family, address)` once the
    first SYN is on its way to `address` (work the connect's round trip can
    hide).  Raises
    socket.gaierror, OSError or socket.timeout."""
    infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    started = time.monotonic()
    deadline = started + timeout
    starts = collections.deque(started + after for after in race)
    attempts, tried, error = [], 0, None
    with selectors.DefaultSelector() as selector:
        try:
            while True:
                now = time.monotonic()
                if not attempts or (starts and now >= starts[0]):
                    if starts and now >= starts[0]:
                        starts.popleft()
                    elif attempts or tried >= len(infos):
                        raise error or OSError(errno.ECONNREFUSED, os.strerror(errno.ECONNREFUSED))
                    family, kind, proto, _name, address = infos[tried % len(infos)]
                    tried += 1
                    sock = socket.socket(family, kind, proto)
                    try:
                        if prepare is not None:
                            prepare(sock)
                        sock.setblocking(False)
                        code = sock.connect_ex(address)
                    except BaseException:
                        sock.close()
                        raise
                    if code in (0, errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK):
                        attempts.append(sock)
                        selector.register(sock, selectors.EVENT_WRITE)
                        if meanwhile is not None:
                            meanwhile(family, address)
                            meanwhile = None
                    else:
                        sock.close()
                        error = OSError(code, os.strerror(code))
                    continue
                if now >= deadline:
                    raise socket.timeout('timed out')
                wait = min(deadline, starts[0] if starts else deadline) - now
                for key, _events in selector.select(wait):
                    sock = key.fileobj
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if code == 0:
                        attempts.remove(sock)
                        sock.setblocking(True)
                        sock.settimeout(timeout)
                        return sock
                    selector.unregister(sock)
                    attempts.remove(sock)
                    sock.close()
                    error = OSError(code, os.strerror(code))
        finally:
            for sock in attempts:
                reset_socket(sock)


def listen_socket(host, port, tune=False):
    family = socket.AF_INET6 if ':' in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if tune:
            tune_peer_socket(sock)          # accepted sockets inherit it
        sock.bind((host, port))
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise UsageError('cannot listen on %s:%d: %s' % (host or '*', port, e.strerror))
    sock.setblocking(False)
    return sock


def describe_error(error):
    return getattr(error, 'strerror', None) or str(error)


class Waker:
    """Wakes a thread waiting in select() from any other thread: register
    `reader` for reading and call `wake()`; `drain()` empties it again."""

    def __init__(self):
        self.reader, self._writer = socket.socketpair()
        self.reader.setblocking(False)
        self._writer.setblocking(False)

    def wake(self):
        try:
            self._writer.send(b'x')
        except OSError:
            pass                    # full (a wake is already pending) or closed

    def drain(self):
        try:
            while self.reader.recv(4096):
                pass
        except OSError:
            pass

    def close(self):
        self.reader.close()
        self._writer.close()


class Timer:
    __slots__ = ('when', 'callback', 'cancelled')

    def __init__(self, when, callback):
        self.when, self.callback, self.cancelled = when, callback, False

    def cancel(self):
        self.cancelled = True


class EventLoop:
    """One selectors loop with timers and an inbox.

    `watch(sock, events, handler)` calls handler(mask) when the socket is
    ready (events 0 stops watching); `call_later(delay, fn)` returns a Timer
    to cancel; `post(fn)`, from any thread, runs fn on the loop soon;
    `run()` returns after `stop()` (which a signal handler may call)."""

    def __init__(self):
        self.selector = selectors.DefaultSelector()
        self.read_buffer = bytearray(LOCAL_READ_SIZE)
        self.peer_buffer = bytearray(PEER_READ_SIZE)
        self._timers = []
        self._sequence = itertools.count()
        self._inbox = collections.deque()
        self._waker = Waker()
        self.selector.register(self._waker.reader, selectors.EVENT_READ, self._drain_wake)
        self.stopping = False

    def watch(self, sock, events, handler):
        try:
            key = self.selector.get_key(sock)
        except (KeyError, ValueError):
            key = None
        if not events:
            if key is not None:
                self.selector.unregister(sock)
        elif key is None:
            self.selector.register(sock, events, handler)
        elif key.events != events or key.data != handler:
            self.selector.modify(sock, events, handler)

    def call_later(self, delay, callback):
        timer = Timer(time.monotonic() + delay, callback)
        heapq.heappush(self._timers, (timer.when, next(self._sequence), timer))
        return timer

    def post(self, callback):
        self._inbox.append(callback)
        self._waker.wake()

    def stop(self):
        self.stopping = True
        self._waker.wake()

    def _drain_wake(self, mask):
        self._waker.drain()

    def run(self):
        while not self.stopping:
            timeout = 1.0
            if self._timers:
                timeout = max(0.0, min(timeout, self._timers[0][0] - time.monotonic()))
            for key, mask in self.selector.select(timeout):
                key.data(mask)
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                timer = heapq.heappop(self._timers)[2]
                if not timer.cancelled:
                    timer.callback()
            while self._inbox:
                self._inbox.popleft()()

    def close(self):
        self.selector.close()
        self._waker.close()


class Acceptor:
    """Accepts on a listening socket for an EventLoop and passes each
    connection to on_accept(sock, address).

    When accept() fails for want of resources (EMFILE, ENFILE, ENOBUFS,
    ENOMEM) the listener stays readable, and trying again at once would spin
    a core.  Out of descriptors, it first asks make_room() to close a
    connection that has not authenticated and tries again; with nothing to
    close it accepts the waiting connection on a descriptor kept spare for
    this and closes it at once (that peer hears no rather than waiting in the
    backlog).  Then it stops watching the listener for ACCEPT_REST, doubling
    while failures go on, and logs the first failure of a run."""

    def __init__(self, loop, listener, on_accept, make_room=None, log=None):
        self.loop = loop
        self.listener = listener
        self._on_accept = on_accept
        self._make_room = make_room or (lambda: False)
        self._log = log or (lambda line: None)
        self._rest = 0.0
        self._timer = None
        self._spare = self._reserve()
        listener.setblocking(False)
        loop.watch(listener, selectors.EVENT_READ, self._ready)

    @staticmethod
    def _reserve():
        try:
            return os.open(os.devnull, os.O_RDONLY)
        except OSError:
            return None

    def _ready(self, mask):
        try:
            sock, address = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._failed(e)
            return
        self._rest = 0.0
        self._on_accept(sock, address)

    def _failed(self, error):
        if error.errno in (errno.ECONNABORTED, errno.ECONNRESET, errno.EPROTO, errno.EPERM):
            return                      # that connection died in the backlog; the next is fine
        out_of_descriptors = error.errno in (errno.EMFILE, errno.ENFILE)
        if out_of_descriptors and self._make_room():
            return                      # the listener is still readable: the loop tries again
        if out_of_descriptors and self._spare is not None:
            os.close(self._spare)
            try:
                self.listener.accept()[0].close()
            except OSError:
                pass
            self._spare = self._reserve()
        if not self._rest:
            self._log('accept failed: %s; trying again in up to %g s'
                      % (error.strerror or error, ACCEPT_REST[1]))
        self._rest = min(max(self._rest * 2, ACCEPT_REST[0]), ACCEPT_REST[1])
        self.loop.watch(self.listener, 0, None)
        self._timer = self.loop.call_later(self._rest, self._resume)

    def _resume(self):
        self._timer = None
        if self._spare is None:
            self._spare = self._reserve()
        self.loop.watch(self.listener, selectors.EVENT_READ, self._ready)

    def close(self):
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.loop.watch(self.listener, 0, None)
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None


class HelperSlots:
    """The digest and signature threads running for fetches: at most `limit`
    in all and `per_owner` started for one owner (a session), so clients
    asking for many files cannot make the server read them all at once."""

    def __init__(self, limit, per_owner):
        self._limit, self._per_owner = limit, per_owner
        self._running = 0
        self._owners = {}
        self._lock = threading.Lock()

    def take(self, owner):
        """A slot for one helper thread; returns the callable that gives it
        back (once, when the thread ends).  RemoteError if none is free."""
        with self._lock:
            if self._running >= self._limit or self._owners.get(owner, 0) >= self._per_owner:
                raise RemoteError('the server is reading too many files at once; try again later')
            self._running += 1
            self._owners[owner] = self._owners.get(owner, 0) + 1
        returned = []

        def give_back():
            with self._lock:
                if returned:
                    return
                returned.append(True)
                self._running -= 1
                self._owners[owner] -= 1
                if not self._owners[owner]:
                    del self._owners[owner]
        return give_back

    def running(self, owner=None):
        with self._lock:
            return self._running if owner is None else self._owners.get(owner, 0)


class HelperJob:
    """A file read on a thread of its own for the fetches that use it (a
    job is shared by concurrent fetches of one file).  Each fetch holds it
    (`users`) until it ends; when the last lets go before the job is done
    (the fetch was aborted), `stop` is set and the thread gives up at its
    next read.  `done` is set however the thread ends."""

    def __init__(self):
        self.users = 0
        self.error = None
        self.stop = threading.Event()
        self.done = threading.Event()

    def check_stop(self):
        if self.stop.is_set():
            raise OSError(errno.ECANCELED, 'no fetch wants it any more')

    def launch(self, slots, owner, target, name, args=()):
        give_back = slots.take(owner) if slots is not None else (lambda: None)

        def run():
            try:
                target(*args)
            except Exception as e:      # a bug or MemoryError: the fetch fails, not the wait
                if self.error is None:
                    self.error = OSError(errno.EIO, 'the %s thread failed: %s' % (name, e))
            finally:
                give_back()
                self.done.set()         # whatever happened: no session waits for ever
        try:
            start_thread(run, name)
        except NoThread:
            give_back()
            raise


class SharedJobs:
    """Helper jobs that several fetches may share (a file's digest or
    signature), each counted by its users.  Subclasses keep the jobs in a
    dict under `_lock`."""

    def release(self, job):
        """A fetch no longer wants `job`: the last to let go of an unfinished
        one stops it."""
        with self._lock:
            job.users -= 1
            if job.users <= 0 and not job.done.is_set():
                job.stop.set()


def file_identity(path):
    """What changes whenever the file's bytes may have: ctime too, which
    moves on every write and cannot be set back like mtime."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


# ---------------------------------------------------------------------------
# Security
# ---------------------------------------------------------------------------
# Authentication, key derivation and the cipher, all from hashlib and hmac.
#
# The secret is never used as it is: a server stretches it once, with scrypt
# and a salt it draws at start, into the key K it proves with, and sends the
# salt in its hello; the client stretches its own copy with that salt.  The
# server's proof goes to anyone who connects, so a recorded or provoked proof
# lets an attacker test guesses offline: scrypt makes each guess cost
# STRETCH_COST (about 50 ms and 16 MiB here), and the salt makes the work
# good for one server run only.  Weak secrets are still guessable: `serve`
# and `tunnel` refuse very short ones and warn about short ones.
#
# Handshake: each side sends a fresh 32-byte nonce; each proves it knows K
# with HMAC-SHA256(K, label | client nonce | server nonce | version | flags).
# The server proves first, so a client with the wrong secret learns it
# plainly; neither the secret nor K crosses the wire.  Session keys come from
# HKDF-SHA256 over K with both nonces as salt, one key pair per direction and
# channel.  No forward secrecy: whoever learns the secret later can derive
# the keys of a recorded session.
#
# A transfer striped over worker processes gives each worker i >= 1 data keys
# of its own: HKDF-SHA256 of the session's data key of each direction, no
# salt, info 'wanxfer v2 worker data <i>' (i in decimal ASCII).  Each worker
# counts its packet numbers from 0, under keys no other flow uses.
#
# Cipher (encrypt-then-MAC): a keystream XORed onto the payload, and a tag of
# keyed BLAKE2b-128 over header and ciphertext.  With --no-encrypt only the
# tag is applied.  The keystream is one of two, chosen at the handshake:
#
# - AES-256-CTR, when both ends have it (FLAG_AES_CTR): AES from the OpenSSL
#   library this Python's own hashlib is linked against, reached through
#   ctypes (nothing to install or compile).  It costs a few tenths of a
#   nanosecond a byte where the other costs about five: the difference is
#   most of a transfer's CPU.  The 16-byte counter block of stream (s, b) is
#   s (4 bytes) | b (8 bytes) | block counter (4 bytes, from 0); of a long
#   frame's own stream, 4 zero bytes | n (8 bytes) | block counter.
# - SHAKE-128(enc key | 'B' | s | b) and SHAKE-128(enc key | 'L' | n) for the
#   same streams, XORed through big integers: the fallback when either end
#   cannot load AES (or sets WANXFER_CIPHER=shake).
#
# The one rule that keeps the keystream from ever being used twice: each key
# seals each nonce (packet or frame number) at most once, and every stream is
# named by how it is sliced.  A nonce n at stride s takes bytes
# [(n % batch) * s, +s) of the stream for (s, b = n // batch); a payload
# longer than the stride takes a stream of its own, for (n).  Distinct nonces
# at one stride take disjoint bytes of one stream; different strides take
# different streams (s is never 0, so no batch stream is a long frame's); so
# changing the block size between files (or for the narrow-path refetch)
# cannot land a later packet on bytes an earlier one used.  A batch stream
# is at most KEYSTREAM_SPAN bytes, so its AES block counter never carries
# into b.

KEYSTREAM_BATCH = 64            # at most this many nonces share one SHAKE call
KEYSTREAM_SPAN = 1 << 16        # and at most this many keystream bytes
KEYSTREAM_STRIDE = 2048         # keystream bytes per nonce on the control channel
KEYSTREAM_BATCHED = b'B'        # SHAKE input: key | B | stride (4 bytes) | batch (8 bytes)
KEYSTREAM_LONG = b'L'           # SHAKE input: key | L | nonce (8 bytes)
CIPHER_ENV = 'WANXFER_CIPHER'   # 'shake': offer only the SHAKE keystream
SEAL_LABELS = ('ctrl-c2s', 'ctrl-s2c', 'data-s2c', 'data-c2s')

# scrypt's cost: 2**14 rounds of 8 x 128-byte blocks, 16 MiB of memory.  Part
# of the protocol version: both ends must stretch alike.
STRETCH_COST = types.MappingProxyType({'n': 1 << 14, 'r': 8, 'p': 1, 'maxmem': 64 << 20, 'dklen': 32})
STRETCH_LABEL = b'wanxfer v2 secret'
MIN_SECRET_BYTES = 8            # serve and tunnel refuse shorter secrets
GOOD_SECRET_BYTES = 16          # and warn about shorter ones


def hkdf_sha256(secret, salt, info, length):
    """RFC 5869 HKDF with SHA-256."""
    prk = hmac.new(salt, secret, hashlib.sha256).digest()
    out, block, counter = b'', b'', 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def handshake_proof(key, label, client_nonce, server_nonce, client_flags, server_flags):
    """Both hellos' flags are proved: a man in the middle who cleared the
    client's FLAG_AES_CTR would fail the proofs, not choose the cipher."""
    message = label + client_nonce + server_nonce + bytes([PROTOCOL_VERSION, client_flags, server_flags])
    return hmac.new(key, message, hashlib.sha256).digest()


def stretch_secret(secret, salt):
    """The key K a session proves and derives from: scrypt of the secret."""
    scrypt = getattr(hashlib, 'scrypt', None)
    if scrypt is None:      # Python built against an OpenSSL before 1.1
        raise WanxferError('this Python has no hashlib.scrypt (OpenSSL 1.1 or newer is needed)')
    return scrypt(secret, salt=STRETCH_LABEL + salt, **STRETCH_COST)


def secret_weakness(secret):
    """Why `secret` is too easy to guess offline, or None.  Returns
    (refuse, reason): refuse is true for secrets no salt can save."""
    if len(secret) < MIN_SECRET_BYTES:
        return True, 'the secret is %d bytes; at least %d are needed, %d or more random ones ' \
            'are advised' % (len(secret), MIN_SECRET_BYTES, GOOD_SECRET_BYTES)
    if len(secret) < GOOD_SECRET_BYTES or len(set(secret)) < 6:
        return False, 'the secret is short or repetitive: anyone who connects can test guesses ' \
            'of it offline; use %d or more random characters (e.g. python3 -c "import secrets; ' \
            'print(secrets.token_urlsafe(24))")' % GOOD_SECRET_BYTES
    return None


class SharedSecret:
    """The secret both ends know, and what it stretches to.

    A server (`serve`, `tunnel --listen`) draws one salt per process and
    stretches once, so no handshake costs it a stretch: an unauthenticated
    peer must not be able to make the server burn 50 ms per connection.  A
    client stretches with each salt it meets, once (a tunnel reconnecting to
    the same far side pays nothing more)."""

    def __init__(self, secret):
        self._secret = bytes(secret)
        self._keys = {}
        self._lock = threading.Lock()
        self._stretching = {}                   # salt: the lock its one stretch holds
        self._server_salt = None

    @classmethod
    def of(cls, secret):
        return secret if isinstance(secret, cls) else cls(secret)

    def key(self, salt):
        # One lock per salt: a handshake that meets a salt other than the
        # one stretched ahead (see prepare) does not wait for that stretch.
        with self._lock:
            key = self._keys.get(salt)
            if key is not None:
                return key
            stretching = self._stretching.setdefault(salt, threading.Lock())
        with stretching:
            with self._lock:
                key = self._keys.get(salt)
            if key is None:
                key = stretch_secret(self._secret, salt)
                with self._lock:
                    if len(self._keys) >= 16:   # a client meets one or two salts; bound it anyway
                        self._keys.clear()
                    self._keys[salt] = key
        with self._lock:
            self._stretching.pop(salt, None)
        return key

    def prepare(self, salt):
        """Stretch with `salt` on a thread of its own, so that a handshake
        that meets it finds K ready; the thread, to be joined before any
        fork.  A client calls it with the salt the server proved itself
        with last time, before it connects: the stretch (about 50 ms) then
        runs while the connect and the HELLO cross the path, instead of
        after the server's hello came."""
        return start_thread(self.key, 'stretch', (salt,))

    def server_salt(self):
        """This process's salt as a server (drawn once) and its key."""
        with self._lock:
            if self._server_salt is None:
                self._server_salt = secrets.token_bytes(SALT_SIZE)
            salt = self._server_salt
        return salt, self.key(salt)


class SaltMemory:
    """The salt each server last proved itself with, as a client saw it,
    in a small file beside the cache (`<cache>.salts`, JSON: origin -> salt
    in hex).  A salt is public (every SERVER_HELLO carries it) and only one
    that came with a valid server proof is kept; one that no longer holds
    (the server was restarted) costs a stretch that is not used, and is
    replaced.  Any trouble with the file is ignored: it only saves time."""

    LIMIT = 64                  # servers remembered; the oldest goes first

    def __init__(self, path):
        self.path = str(path)

    def _load(self):
        try:
            with open(self.path, encoding='utf-8') as f:
                table = json.load(f)
        except (OSError, ValueError):
            return {}
        return table if isinstance(table, dict) else {}

    def recall(self, origin):
        try:
            salt = bytes.fromhex(self._load().get(origin, ''))
        except (TypeError, ValueError):
            return None
        return salt if len(salt) == SALT_SIZE else None

    def remember(self, origin, salt):
        table = self._load()
        if table.get(origin) == salt.hex():
            return
        table.pop(origin, None)
        table[origin] = salt.hex()
        while len(table) > self.LIMIT:
            table.pop(next(iter(table)))
        temporary = '%s.%d.tmp' % (self.path, os.getpid())
        try:
            with open(temporary, 'w', encoding='utf-8') as f:
                json.dump(table, f)
            os.replace(temporary, self.path)
        except OSError:
            try:
                os.unlink(temporary)
            except OSError:
                pass


def xor_bytes(data, keystream):
    """data XOR keystream[:len(data)], at C speed via big integers."""
    n = len(data)
    return (int.from_bytes(data, 'little') ^
            int.from_bytes(keystream[:n], 'little')).to_bytes(n, 'little')


class CounterMode:
    """AES-256-CTR from the libcrypto already mapped into this process.

    `CounterMode.load()` returns the one instance, or None where there is
    none to be had: no /proc (not Linux), a Python whose hashlib carries its
    own OpenSSL, the WANXFER_CIPHER=shake setting, or a library that fails
    the known-answer test (NIST SP 800-38A, F.5.5).  The library is the very
    file hashlib loaded, so its ABI is the one this Python was built
    against; the few EVP calls used are the same in OpenSSL 1.1 and 3."""

    # SP 800-38A F.5.5, CTR-AES256.Encrypt: key, initial counter block,
    # two blocks of plaintext and their ciphertext.
    KNOWN_ANSWER = tuple(bytes.fromhex(h) for h in (
        '603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4',
        'f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff',
        '6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51',
        '601ec313775789a5b7a7f504bbf3d228f443e3ca4d62b59aca84e990cacaf5c5'))

    def __init__(self, ctypes, library):
        self._ctypes = ctypes
        c_void_p, c_int = ctypes.c_void_p, ctypes.c_int
        self._new = library.EVP_CIPHER_CTX_new
        self._new.restype, self._new.argtypes = c_void_p, []
        self._free = library.EVP_CIPHER_CTX_free
        self._free.restype, self._free.argtypes = None, [c_void_p]
        self._cipher = library.EVP_aes_256_ctr
        self._cipher.restype, self._cipher.argtypes = c_void_p, []
        self._init = library.EVP_EncryptInit_ex
        self._init.restype = c_int
        self._init.argtypes = [c_void_p, c_void_p, c_void_p, ctypes.c_char_p, ctypes.c_char_p]
        self._update = library.EVP_EncryptUpdate
        self._update.restype = c_int
        self._update.argtypes = [c_void_p, c_void_p, ctypes.POINTER(c_int), c_void_p, c_int]

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def load():
        if not CounterMode.expected():
            return None
        path = CounterMode.library_path()
        try:
            import ctypes
            mode = CounterMode(ctypes, ctypes.CDLL(path))
            key, counter, plain, cipher = CounterMode.KNOWN_ANSWER
            if mode.context(key).apply(plain, [(counter[:12], int.from_bytes(counter[12:], 'big') * 16,
                                                len(plain))]) != cipher:
                return None
        except (ImportError, OSError, AttributeError, WanxferError):
            return None
        return mode

    @staticmethod
    def expected():
        """Whether load() will give an instance, as far as can be told
        without loading it (its known-answer test nearly always passes)."""
        return os.environ.get(CIPHER_ENV, '').strip().lower() != 'shake' and \
            CounterMode.library_path() is not None

    @staticmethod
    def library_path():
        """The libcrypto hashlib mapped into this process, or None."""
        try:
            import _hashlib     # noqa: F401 (maps libcrypto, if this Python uses a shared one)
            with open('/proc/self/maps') as maps:
                for line in maps:
                    fields = line.split(None, 5)
                    if len(fields) == 6 and os.path.basename(fields[5].strip()).startswith('libcrypto.so'):
                        return fields[5].strip()
        except (ImportError, OSError):
            pass
        return None

    def context(self, key):
        return CounterModeContext(self, key)


class CounterModeContext:
    """One AES-256-CTR key, applied in place to pieces of keystream."""

    def __init__(self, mode, key):
        self._mode = mode
        ctypes = mode._ctypes
        self._ctx = mode._new()
        if not self._ctx:
            raise WanxferError('OpenSSL could not make a cipher context')
        weakref.finalize(self, mode._free, self._ctx)
        if mode._init(self._ctx, mode._cipher(), None, bytes(key[:32]), None) != 1:
            raise WanxferError('OpenSSL refused an AES key')
        self._scratch = ctypes.create_string_buffer(16)
        self._written = ctypes.c_int()
        self._lock = threading.Lock()   # one context: sealing from two threads must take turns

    def apply(self, data, pieces, in_place=False):
        """`data` XOR the keystream, as a new bytearray (or `data` itself,
        a bytearray, changed `in_place`).  `pieces` lists, in order, where
        each stretch of `data` finds its keystream: (the stream's 12-byte
        counter prefix, byte offset in the stream, length)."""
        out = data if in_place else bytearray(data)
        if not out:
            return out
        mode, ctx, written = self._mode, self._ctx, self._written
        ctypes = mode._ctypes
        holder = (ctypes.c_char * len(out)).from_buffer(out)
        try:
            address = ctypes.addressof(holder)
            with self._lock:
                for prefix, offset, length in pieces:
                    block, skip = divmod(offset, 16)
                    ok = mode._init(ctx, None, None, None, prefix + block.to_bytes(4, 'big')) == 1
                    if skip:
                        ok &= mode._update(ctx, self._scratch, written, self._scratch, skip) == 1
                    ok &= mode._update(ctx, address, written, address, length) == 1
                    if not ok:
                        raise WanxferError('OpenSSL failed to encrypt')
                    address += length
        finally:
            del holder      # lets `out` be resized again
        return out


class Sealer:
    """Seals and opens messages for one direction of one channel.

    `seal(nonce, header, payload)` returns ciphertext + tag, the tag covering
    header and ciphertext; `open` is its inverse and returns None for anything
    forged, corrupted or sealed under another key.  The header must contain
    the nonce (datagrams carry their packet number; control frames add their
    counter as associated data), so a replay or a reordering fails the tag.
    Nonces must never repeat under one Sealer: callers count up.

    Keystream comes per batch of nonces: one stream covers `batch`
    consecutive nonces of `stride` bytes each, so consecutive full-size
    packets have contiguous keystream and a run of them is encrypted in one
    go (`seal_run`, `open_run`).  Both ends must use the same stride: the
    data block size.  `counter_mode` (a CounterMode) makes the keystream
    AES-256-CTR; without it, SHAKE-128 (see the section's comment).
    """

    def __init__(self, key, encrypt, stride=KEYSTREAM_STRIDE, counter_mode=None):
        self.encrypt = encrypt
        self._enc_key = key[:32]
        self._aes = counter_mode.context(self._enc_key) if encrypt and counter_mode else None
        self.cipher = None if not encrypt else 'aes-256-ctr' if self._aes else 'shake-128'
        self._mac = hashlib.blake2b(key=key[32:64], digest_size=TAG_SIZE)
        self.set_stride(stride)

    def set_stride(self, stride):
        """Slice the keystream `stride` bytes per nonce from now on.  The
        stride is part of every batch's SHAKE input, so no stride can reach
        keystream another stride used (see the section's comment)."""
        if not 0 < stride < 1 << 32:
            raise ValueError('keystream stride %r' % stride)
        self.stride = stride
        self.batch = max(1, min(KEYSTREAM_BATCH, KEYSTREAM_SPAN // stride))
        self._batch_prefix = self._enc_key + KEYSTREAM_BATCHED + stride.to_bytes(4, 'big')
        self._batches = {}

    def _batch_stream(self, batch):
        stream = self._batches.get(batch)
        if stream is None:
            if len(self._batches) >= 8:     # in-order traffic needs one or two
                self._batches.clear()
            stream = memoryview(hashlib.shake_128(
                self._batch_prefix + batch.to_bytes(8, 'big')).digest(self.batch * self.stride))
            self._batches[batch] = stream
        return stream

    def _pieces(self, first_nonce, length, single):
        """Where the keystream for `length` bytes from `first_nonce` on lies:
        (batch, byte offset in its stream, length) in order; batch None is
        the nonce's own long stream.  `single`: one message of that length,
        else consecutive nonces of `stride` bytes (the last may be less)."""
        stride = self.stride
        if single and length > stride:      # long control frames: a stream of their own
            return [(None, 0, length)]
        pieces, nonce, done = [], first_nonce, 0
        while done < length:
            batch, index = divmod(nonce, self.batch)
            take = min((self.batch - index) * stride, length - done)
            pieces.append((batch, index * stride, take))
            nonce += self.batch - index
            done += take
        return pieces

    def _crypt(self, first_nonce, data, single, in_place=False):
        """`data` XOR its keystream (see _pieces); AES changes a bytearray
        `in_place` if asked to."""
        pieces = self._pieces(first_nonce, len(data), single)
        if self._aes is not None:
            stride = self.stride.to_bytes(4, 'big')
            return self._aes.apply(data, [
                (bytes(4) + first_nonce.to_bytes(8, 'big') if batch is None
                 else stride + batch.to_bytes(8, 'big'), offset, length)
                for batch, offset, length in pieces], in_place)
        if pieces[0][0] is None:
            return xor_bytes(data, hashlib.shake_128(
                self._enc_key + KEYSTREAM_LONG + first_nonce.to_bytes(8, 'big')).digest(len(data)))
        streams = [self._batch_stream(batch)[offset:offset + length] for batch, offset, length in pieces]
        return xor_bytes(data, streams[0] if len(streams) == 1 else b''.join(streams))

    def tag(self, header, body):
        mac = self._mac.copy()
        mac.update(header)
        mac.update(body)
        return mac.digest()

    def seal(self, nonce, header, payload):
        if self.encrypt and payload:
            payload = self._crypt(nonce, payload, single=True)
        return bytes(payload) + self.tag(header, payload)

    def seal_run(self, first_nonce, headers, payload):
        """Seal consecutive nonces' payloads in one go: `payload` holds them
        back to back, `stride` bytes each (the last may be shorter).  Returns
        the datagrams, header | ciphertext | tag."""
        stride = self.stride
        if self.encrypt:
            payload = self._crypt(first_nonce, payload, single=False)
        view = memoryview(payload)
        tag = self.tag
        packets = []
        for i, header in enumerate(headers):
            body = view[i * stride:(i + 1) * stride]
            packets.append(header + body + tag(header, body))
        return packets

    def mac_factory(self):
        """A function that returns a fresh keyed MAC, for a hot loop to make
        tag() itself: the tag is the MAC's digest over header | body, so
        where they lie back to back (a datagram in a receive buffer) one
        update over both does (a new key each time would cost more)."""
        return self._mac.copy

    def verify(self, header, sealed):
        """The ciphertext of `sealed` if its tag is right, else None."""
        if len(sealed) < TAG_SIZE:
            return None
        body = sealed[:-TAG_SIZE]
        if not hmac.compare_digest(self.tag(header, body), sealed[-TAG_SIZE:]):
            return None
        return body

    def open_run(self, first_nonce, ciphertext, in_place=False):
        """Decrypt the verified bodies of consecutive nonces, back to back
        (`stride` bytes each, the last possibly shorter), in one go.
        `in_place`: `ciphertext` is a bytearray the caller gives up, to be
        decrypted where it lies (and returned) rather than copied."""
        if not self.encrypt:
            return ciphertext if in_place else bytes(ciphertext)
        return self._crypt(first_nonce, ciphertext, single=False, in_place=in_place)

    def open_runs(self, runs, ciphertext):
        """open_run() of several runs back to back in `ciphertext`, a
        bytearray given up (decrypted in place where AES can): `runs` lists
        each one's (first nonce, bytes), in order.  One call, however many
        runs: a receiver's run is broken wherever a block was lost and
        wherever one sent again comes in."""
        if not self.encrypt:
            return ciphertext
        pieces = [piece for nonce, length in runs for piece in self._pieces(nonce, length, False)]
        if self._aes is not None:
            stride = self.stride.to_bytes(4, 'big')
            return self._aes.apply(ciphertext, [(stride + batch.to_bytes(8, 'big'), offset, length)
                                                for batch, offset, length in pieces], True)
        return xor_bytes(ciphertext, b''.join(
            [self._batch_stream(batch)[offset:offset + length] for batch, offset, length in pieces]))

    def open(self, nonce, header, sealed):
        """Return the plaintext of `sealed` (ciphertext + tag) or None."""
        body = self.verify(header, sealed)
        if body is None:
            return None
        if self.encrypt and body:
            return bytes(self._crypt(nonce, body, single=True))
        return bytes(body)


class SessionKeys:
    """The keys and id of one authenticated session, derived from the
    stretched secret K and both sides' nonces.  `sealers(role)` gives the
    four Sealers as seen from 'client' or 'server': (control out, control
    in, data out, data in).  `mirror`: the client offered FLAG_MIRROR.
    `salt`: the one the server proved itself with (a client remembers it)."""

    def __init__(self, key, client_nonce, server_nonce, encrypt, counter_mode=None, mirror=False,
                 salt=None):
        self.encrypt = encrypt
        self.salt = salt
        self.counter_mode = counter_mode
        self.mirror = mirror
        material = hkdf_sha256(key, client_nonce + server_nonce,
                               b'wanxfer v2 session keys', 4 + 64 * len(SEAL_LABELS))
        self.session_id = int.from_bytes(material[:4], 'big')
        self._keys = {label: material[4 + 64 * i:68 + 64 * i] for i, label in enumerate(SEAL_LABELS)}

    def sealers(self, role):
        mine, theirs = ('c2s', 's2c') if role == 'client' else ('s2c', 'c2s')
        return tuple(Sealer(self._keys['%s-%s' % (channel, direction)], self.encrypt,
                            counter_mode=self.counter_mode)
                     for channel, direction in (('ctrl', mine), ('ctrl', theirs),
                                                ('data', mine), ('data', theirs)))

    def worker_sealers(self, role, index):
        """The data channel's Sealers (out, in) of worker `index` of a
        striped transfer, as seen from `role`.  Worker 0 is the session's
        own flow, with its keys; each other worker has keys of its own,
        derived from the session's data keys and its index, so that its
        packet numbers (nonces, counted from 0 like every flow's) never
        meet another worker's under one key."""
        mine, theirs = ('c2s', 's2c') if role == 'client' else ('s2c', 'c2s')
        keys = []
        for direction in (mine, theirs):
            key = self._keys['data-%s' % direction]
            if index:
                key = hkdf_sha256(key, b'', b'wanxfer v2 worker data %d' % index, 64)
            keys.append(Sealer(key, self.encrypt, counter_mode=self.counter_mode))
        return tuple(keys)


def load_secret(secret_file=None, environ=None):
    """The shared secret from --secret-file or $WANXFER_SECRET, or None."""
    environ = os.environ if environ is None else environ
    if secret_file:
        try:
            with open(secret_file, 'rb') as f:
                secret = f.read().strip()
        except OSError as e:
            raise UsageError('cannot read secret file %s: %s' % (secret_file, e.strerror))
        if not secret:
            raise UsageError('secret file %s is empty' % secret_file)
        return secret
    value = environ.get(SECRET_ENV, '')
    return value.encode() if value else None


def seal_frame(sealer, counter, body):
    """One sealed frame for a stream socket: length | ciphertext | tag.  The
    frame's counter (its nonce) is bound in as associated data, so a
    replayed, dropped or reordered frame fails its tag."""
    header = FRAME_HEADER.pack(len(body) + TAG_SIZE)
    return header + sealer.seal(counter, header + counter.to_bytes(8, 'big'), body)


class FrameReader:
    """Sealed frames in, the inverse of seal_frame: `feed(data)`, then
    `frames()` yields each body, authenticated and decrypted, in order, or
    raises ProtocolError.  The buffer is trimmed once per call, not per frame."""

    def __init__(self, sealer):
        self._sealer = sealer
        self._buffer = bytearray()
        self._frames = 0

    def feed(self, data):
        self._buffer += data

    @property
    def count(self):
        """Frames read so far: the index of the next."""
        return self._frames

    def open_frame(self, index, frame):
        """The body of `frame`, one whole frame sent as the `index`th, or
        None if it is not that (a copy of it that came another way)."""
        if len(frame) < FRAME_HEADER.size + TAG_SIZE or \
                FRAME_HEADER.unpack_from(frame)[0] != len(frame) - FRAME_HEADER.size:
            return None
        header = bytes(frame[:FRAME_HEADER.size]) + index.to_bytes(8, 'big')
        return self._sealer.open(index, header, bytes(frame[FRAME_HEADER.size:]))

    def frames(self):
        buffer, start = self._buffer, 0
        try:
            while len(buffer) - start >= FRAME_HEADER.size:
                (length,) = FRAME_HEADER.unpack_from(buffer, start)
                if length > MAX_FRAME or length < TAG_SIZE:
                    raise ProtocolError('frame of %d bytes' % length)
                end = start + FRAME_HEADER.size + length
                if len(buffer) < end:
                    break
                header = bytes(buffer[start:start + FRAME_HEADER.size]) + self._frames.to_bytes(8, 'big')
                body = self._sealer.open(self._frames, header,
                                         bytes(buffer[start + FRAME_HEADER.size:end]))
                if body is None:
                    raise ProtocolError('frame failed authentication')
                self._frames += 1
                start = end
                yield body
        finally:
            del buffer[:start]


class ControlChannel:
    """Sealed JSON messages over a TCP socket, after the handshake.

    Blocking use: `send(message)` and `recv()`.  Inside an event loop: call
    `feed(bytes)` with what the socket gave and read `messages()`; a loop
    that must not block on a full socket (the sender's data phase) sends
    with `queue(message)` and calls `flush()` each wakeup.  With a `peer`
    ('client' or 'server'), every message it sends is checked by
    validate_message before it is yielded.

    Frames may also come as copies on the data channel (KIND_CONTROL):
    `mirror(index, frame)`, when set, is given each frame sent of at most
    MIRRORED_FRAME bytes; at the other end `offer(index, frame)` takes
    the copy, and messages() yields every frame once, in order, from
    whichever way it came first.  `datagrams`, when set, is (a UDP socket,
    a function that takes the copies waiting there): recv() watches it
    while it waits, until the function returns False (see
    DataChannel.take_control_datagrams).
    """

    def __init__(self, sock, sealer_out, sealer_in, peer=None):
        self.sock = sock
        self._out = sealer_out
        self._sent = 0
        self._backlog = bytearray()             # frames queue() sealed that the socket did not take
        self._reader = FrameReader(sealer_in)
        self._lock = threading.Lock()
        self._peer = peer
        self.mirror = None
        self.datagrams = None
        self._next = 0                          # index of the next frame messages() yields
        self._copies = {}                       # index: body of a frame that came as a copy

    def send(self, message):
        """Send `message`, after whatever queue() left waiting; blocks."""
        with self._lock:
            frame = self._seal(message)
            if self._backlog:
                frame = bytes(self._backlog) + frame
                del self._backlog[:]
            self.sock.sendall(frame)

    def queue(self, message):
        """Send `message` as far as the (non-blocking) socket takes it now;
        flush() sends the rest, in order, before anything sent later."""
        with self._lock:
            self._backlog += self._seal(message)
            self._push()

    def flush(self):
        with self._lock:
            self._push()

    @property
    def backlog(self):
        """Bytes queue() holds that the socket has not taken yet."""
        return len(self._backlog)

    def _seal(self, message):
        frame = seal_frame(self._out, self._sent, json.dumps(message, separators=(',', ':')).encode())
        if self.mirror is not None and len(frame) <= MIRRORED_FRAME:
            self.mirror(self._sent, frame)
        self._sent += 1
        return frame

    def _push(self):
        if not self._backlog:
            return
        # A socket with a timeout waits for room before any send, even one
        # that asks not to.
        timeout = self.sock.gettimeout()
        if timeout:
            self.sock.settimeout(0.0)
        try:
            while self._backlog:
                sent = self.sock.send(self._backlog, socket.MSG_DONTWAIT)
                del self._backlog[:sent]
        except (BlockingIOError, InterruptedError):
            pass
        finally:
            if timeout:
                self.sock.settimeout(timeout)

    def feed(self, data):
        self._reader.feed(data)

    @property
    def received(self):
        """Messages read from the peer so far, whichever way each came."""
        return self._next

    def offer(self, index, frame):
        """A copy of frame `index` came on the data channel: kept until its
        turn if it is authentic and not yet read, dropped otherwise.  True
        if messages() has more to yield now."""
        if self._next <= index < self._next + MIRRORED_AHEAD and index not in self._copies:
            body = self._reader.open_frame(index, frame)
            if body is not None:
                self._copies[index] = body
                if len(self._copies) > MIRRORED_AHEAD:
                    # One offered on another thread as its frame was read.
                    for stale in [i for i in self._copies if i < self._next]:
                        self._copies.pop(stale, None)
        return self.pending()

    def pending(self):
        """The next frame came as a copy: messages() yields it without
        anything more from the socket."""
        return self._next in self._copies

    def messages(self):
        """Decode every complete frame fed so far, or come as a copy, in
        order, each once."""
        frames = self._reader.frames()
        try:
            while True:
                body = self._copies.pop(self._next, None)
                if body is None:
                    body = next(frames, None)
                    if body is None:
                        return
                    if self._reader.count <= self._next:
                        continue                # its copy was read already
                    self._copies.pop(self._next, None)
                self._next += 1
                message = parse_control(body)
                if self._peer is not None:
                    validate_message(message, self._peer)
                yield message
        finally:
            frames.close()          # consumed frames leave the buffer even if we stop early

    def recv(self):
        """Block until one message arrives (or nothing came from the peer
        for the socket's timeout)."""
        datagrams = self.datagrams
        timeout = self.sock.gettimeout()
        quiet_since = time.monotonic()
        selector = None
        try:
            while True:
                for message in self.messages():
                    return message
                if datagrams is not None:
                    udp, take = datagrams
                    if selector is None:
                        selector = selectors.DefaultSelector()
                        selector.register(self.sock, selectors.EVENT_READ)
                        selector.register(udp, selectors.EVENT_READ)
                    # In slices: a copy may also be offered by another thread (a
                    # server's listener passes on those that came before the
                    # session's own socket was open), and no socket wakes us for it.
                    wait = OFFER_POLL
                    if timeout is not None:
                        wait = min(wait, quiet_since + timeout - time.monotonic())
                        if wait <= 0:
                            raise socket.timeout('timed out')
                    readable = [key.fileobj for key, _ in selector.select(wait)]
                    if udp in readable and not take():
                        datagrams = None        # data waits there: the data phase reads it
                    if self.sock not in readable:
                        continue
                data = self.sock.recv(65536)
                if not data:
                    raise PeerClosed('connection closed by peer')
                self.feed(data)
                quiet_since = time.monotonic()
        finally:
            if selector is not None:
                selector.close()


def offered_flags(encrypt, mirror=False):
    """(the flags a client offers, its CounterMode or None)."""
    counter_mode = CounterMode.load() if encrypt else None
    flags = (FLAG_ENCRYPT | (FLAG_AES_CTR if counter_mode else 0)) if encrypt else 0
    if mirror:
        flags |= FLAG_MIRROR
    return flags, counter_mode


def client_handshake(sock, secret, encrypt, mirror=False, early=None):
    """Authenticate to a server; return (SessionKeys, round-trip seconds).
    `secret` is a SharedSecret (or the secret's bytes).  `mirror`: offer
    FLAG_MIRROR (this client takes copies of control frames as datagrams).
    `early`: the EarlyHello sent beside the connect; its answer, if it came
    and checks out, saves the HELLO's round trip."""
    secret = SharedSecret.of(secret)
    flags, counter_mode = offered_flags(encrypt, mirror)
    if early is not None:
        finished = early.finish(sock, secret, flags, counter_mode)
        if finished is not None:
            return finished
    client_nonce = secrets.token_bytes(NONCE_SIZE)
    started = time.monotonic()
    sock.sendall(HELLO.pack(PROTOCOL_MAGIC, PROTOCOL_VERSION, flags, client_nonce))
    prefix = recv_exactly(sock, HELLO_PREFIX.size)
    rtt = time.monotonic() - started
    magic, version, server_flags = HELLO_PREFIX.unpack(prefix)
    if magic != PROTOCOL_MAGIC:
        raise ProtocolError('the peer is not a wanxfer server')
    if version != PROTOCOL_VERSION:
        raise AuthError('incompatible protocol version: server speaks %d, this client %d; run the '
                        'same wanxfer.py at both ends' % (version, PROTOCOL_VERSION))
    _, _, _, server_nonce, salt, proof = SERVER_HELLO.unpack(
        prefix + recv_exactly(sock, SERVER_HELLO.size - HELLO_PREFIX.size))
    if (server_flags ^ flags) & FLAG_ENCRYPT:
        raise AuthError('encryption mismatch: the server runs %s, this client %s; use the same '
                        'setting on both ends' % (describe_flags(server_flags), describe_flags(flags)))
    if server_flags & ~flags:
        raise ProtocolError('the server chose flags 0x%02x, beyond the 0x%02x offered' % (server_flags, flags))
    key = secret.key(salt)
    expected = handshake_proof(key, b'wanxfer server', client_nonce, server_nonce, flags, server_flags)
    if not hmac.compare_digest(proof, expected):
        raise AuthError('authentication failed: wrong secret (the server could not prove it knows it)')
    sock.sendall(CLIENT_PROOF.pack(
        handshake_proof(key, b'wanxfer client', client_nonce, server_nonce, flags, server_flags)))
    return SessionKeys(key, client_nonce, server_nonce, encrypt,
                       counter_mode if server_flags & FLAG_AES_CTR else None, salt=salt), rtt


def answered_flags(client_flags, encrypt):
    """(the flags a server answers `client_flags` with, its CounterMode or None)."""
    counter_mode = CounterMode.load() if encrypt and client_flags & FLAG_AES_CTR else None
    return (FLAG_ENCRYPT | (FLAG_AES_CTR if counter_mode else 0)) if encrypt else 0, counter_mode


def server_handshake(sock, secret, encrypt, early=None):
    """Authenticate a client; return (SessionKeys, round-trip seconds) or
    raise AuthError.  `secret` should be the server's one SharedSecret, so
    that it is stretched once per process, not per connection.  A HELLO
    with FLAG_EARLY must come with `early`, what EarlyHandshakes.claim()
    made of it on the listener; it is refused otherwise."""
    secret = SharedSecret.of(secret)
    prefix = recv_exactly(sock, HELLO_PREFIX.size)
    magic, version, client_flags = HELLO_PREFIX.unpack(prefix)
    if magic != PROTOCOL_MAGIC:
        raise ProtocolError('not a wanxfer client')
    if client_flags & FLAG_EARLY:
        recv_exactly(sock, HELLO.size + EARLY_PROOF.size - HELLO_PREFIX.size)     # claimed already
        if early is None:
            raise AuthError('an early handshake, which this listener does not take')
        return early
    flags, counter_mode = answered_flags(client_flags, encrypt)
    server_nonce = secrets.token_bytes(NONCE_SIZE)
    salt, key = secret.server_salt()
    if version != PROTOCOL_VERSION or (client_flags ^ flags) & FLAG_ENCRYPT:
        # Say who we are so the client can name the mismatch, then hang up.
        sock.sendall(SERVER_HELLO.pack(PROTOCOL_MAGIC, PROTOCOL_VERSION, flags,
                                       server_nonce, salt, bytes(PROOF_SIZE)))
        raise AuthError('client speaks version %d with %s' % (version, describe_flags(client_flags)))
    _, _, _, client_nonce = HELLO.unpack(prefix + recv_exactly(sock, HELLO.size - HELLO_PREFIX.size))
    sock.sendall(SERVER_HELLO.pack(
        PROTOCOL_MAGIC, PROTOCOL_VERSION, flags, server_nonce, salt,
        handshake_proof(key, b'wanxfer server', client_nonce, server_nonce, client_flags, flags)))
    started = time.monotonic()
    (proof,) = CLIENT_PROOF.unpack(recv_exactly(sock, CLIENT_PROOF.size))
    rtt = time.monotonic() - started
    expected = handshake_proof(key, b'wanxfer client', client_nonce, server_nonce, client_flags, flags)
    if not hmac.compare_digest(proof, expected):
        raise AuthError('client failed authentication (wrong secret)')
    return SessionKeys(key, client_nonce, server_nonce, encrypt, counter_mode,
                       mirror=bool(client_flags & FLAG_MIRROR)), rtt


def describe_flags(flags):
    return 'encryption on' if flags & FLAG_ENCRYPT else '--no-encrypt'


class EarlyHandshakes:
    """A server's side of the early handshake.  A client sends its HELLO as
    a datagram (KIND_HANDSHAKE) as its TCP connect starts, and the answer,
    the SERVER_HELLO, crosses the path beside the SYN-ACK: the client's
    proof and first request then go with the connect's completion, and the
    first data comes after two round trips instead of three.

    Anyone can send datagrams, so nothing is kept for one: the server nonce
    it answers with is a cookie, the time it was made and a MAC of that
    time and of the client's nonce and flags, under a key of this process's
    own (`answer`); not of the client's address, as a NAT may send its UDP
    and its TCP from different ones (the proof and the single claim are the
    guard).  The answer is never larger than the datagram that asked
    (EARLY_HELLO_SIZE), so the port amplifies nothing.  The proof that
    follows on TCP (`claim`, on the listener, before a session process
    forks) is taken once: a cookie this process did not make, older than
    EARLY_HANDSHAKE_SECONDS, or one whose client nonce was taken before, is
    refused; so no two sessions can have the same nonces, and so the same
    keys.  A refusal is a hang-up, nothing more (it tells the client
    nothing a plain HELLO would not), and costs the client a new connection
    the plain way (Client._refused_early); an answer that never comes costs
    it nothing: it goes the TCP way."""

    def __init__(self, secret, encrypt, clock=time.monotonic):
        self._secret = SharedSecret.of(secret)
        self._encrypt = encrypt
        self._clock = clock
        self._mac_key = secrets.token_bytes(32)
        self._taken = collections.OrderedDict()    # client nonce: when it may be forgotten
        self._lock = threading.Lock()

    def answer(self, datagram):
        """The SERVER_HELLO datagram that answers the early HELLO
        `datagram`, or None (it is not one, or TCP's handshake will say
        what is wrong with it)."""
        if len(datagram) != EARLY_HELLO_SIZE or datagram[0] != KIND_HANDSHAKE:
            return None
        magic, version, client_flags, client_nonce = HELLO.unpack_from(datagram, PACKET_HEADER.size)
        if magic != PROTOCOL_MAGIC or version != PROTOCOL_VERSION or not client_flags & FLAG_EARLY:
            return None
        flags, _counter_mode = answered_flags(client_flags, self._encrypt)
        if (client_flags ^ flags) & FLAG_ENCRYPT:
            return None
        server_nonce = self._cookie(int(self._clock() * 1000), client_nonce, client_flags)
        salt, key = self._secret.server_salt()
        proof = handshake_proof(key, b'wanxfer server', client_nonce, server_nonce, client_flags, flags)
        return PACKET_HEADER.pack(KIND_HANDSHAKE, 0, 0, 0) + SERVER_HELLO.pack(
            PROTOCOL_MAGIC, PROTOCOL_VERSION, flags, server_nonce, salt, proof)

    def claim(self, hello):
        """(SessionKeys, round-trip seconds) for the early HELLO and
        EARLY_PROOF (`hello`, as they came on TCP), or AuthError."""
        _, version, client_flags, client_nonce = HELLO.unpack_from(hello)
        server_nonce, proof = EARLY_PROOF.unpack_from(hello, HELLO.size)
        made, _mac = EARLY_NONCE.unpack(server_nonce)
        now = self._clock()
        age = now - made / 1000.0
        if version != PROTOCOL_VERSION or not 0 <= age <= EARLY_HANDSHAKE_SECONDS or not \
                hmac.compare_digest(server_nonce, self._cookie(made, client_nonce, client_flags)):
            raise AuthError('an early handshake with a server nonce this server did not give it, '
                            'or gave it too long ago')
        flags, counter_mode = answered_flags(client_flags, self._encrypt)
        salt, key = self._secret.server_salt()
        expected = handshake_proof(key, b'wanxfer client', client_nonce, server_nonce, client_flags, flags)
        if not hmac.compare_digest(proof, expected):
            raise AuthError('client failed authentication in an early handshake (wrong secret)')
        with self._lock:
            while self._taken and next(iter(self._taken.values())) <= now:
                self._taken.popitem(last=False)
            if client_nonce in self._taken:
                raise AuthError('an early handshake sent again')
            if len(self._taken) >= MAX_EARLY_CLAIMS:
                raise AuthError('too many early handshakes at once')
            # In order of expiry, as each is kept the longest a cookie lives.
            self._taken[client_nonce] = now + EARLY_HANDSHAKE_SECONDS
        return SessionKeys(key, client_nonce, server_nonce, self._encrypt, counter_mode,
                           mirror=bool(client_flags & FLAG_MIRROR)), age

    def _cookie(self, made, client_nonce, client_flags):
        mac = hmac.new(self._mac_key, b'wanxfer early' + struct.pack('!QB', made, client_flags) +
                       client_nonce, hashlib.sha256).digest()
        return EARLY_NONCE.pack(made, mac[:EARLY_NONCE.size - 8])


class EarlyHello:
    """A client's side of the early handshake (see EarlyHandshakes): its
    HELLO as a datagram to the address its first connect goes to, and the
    SERVER_HELLO that may come back.  It is optional all through: with no
    answer in time (UDP blocked, the datagram lost, an older server), or
    one that does not check out, the handshake goes the TCP way."""

    # How long past the connect the answer is waited for: it left the server
    # beside the SYN-ACK, so it is due now; a fraction of the connect's time
    # (its round trip) covers a little jitter, and is all a lost one costs.
    WAIT_SHARE, WAIT_LEAST, WAIT_MOST = 0.25, 0.005, 0.05

    def __init__(self, flags):
        self.flags = flags | FLAG_EARLY
        self.client_nonce = secrets.token_bytes(NONCE_SIZE)
        self._sock = None
        self._sent = None
        self.taken = False              # the handshake went this way

    def send(self, family, address):
        """Send the HELLO datagram to `address` (where the first connect goes)."""
        datagram = PACKET_HEADER.pack(KIND_HANDSHAKE, 0, 0, 0) + HELLO.pack(
            PROTOCOL_MAGIC, PROTOCOL_VERSION, self.flags, self.client_nonce)
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.connect(address)
            sock.send(datagram.ljust(EARLY_HELLO_SIZE, b'\0'))
        except OSError:
            sock.close()
            return
        self._sock, self._sent = sock, time.monotonic()

    def finish(self, sock, secret, flags, counter_mode):
        """The handshake on `sock` (connected) the early way: (SessionKeys,
        round-trip seconds) once the proof is sent, or None for the TCP way."""
        if self._sock is None or self.flags != flags | FLAG_EARLY:
            return None                 # not sent, or offering what this client cannot do
        connected = time.monotonic()
        answer = self._answer(sock.getpeername(), min(self.WAIT_MOST, max(
            self.WAIT_LEAST, (connected - self._sent) * self.WAIT_SHARE)))
        if answer is None:
            return None
        (magic, version, server_flags, server_nonce, salt, proof), rtt = answer
        if magic != PROTOCOL_MAGIC or version != PROTOCOL_VERSION or server_flags & ~flags or \
                (server_flags ^ flags) & FLAG_ENCRYPT:
            return None                 # TCP's handshake names what is wrong
        key = secret.key(salt)
        if not hmac.compare_digest(proof, handshake_proof(key, b'wanxfer server', self.client_nonce,
                                                          server_nonce, self.flags, server_flags)):
            return None                 # forged, or the secret differs: TCP's handshake tells
        # Taken from here on, even if this send fails: a server restarted
        # since it answered may have reset the connection already, and the
        # client then connects again the plain way (Client._refused_early).
        self.taken = True
        sock.sendall(HELLO.pack(PROTOCOL_MAGIC, PROTOCOL_VERSION, self.flags, self.client_nonce) +
                     EARLY_PROOF.pack(server_nonce, handshake_proof(
                         key, b'wanxfer client', self.client_nonce, server_nonce, self.flags, server_flags)))
        return SessionKeys(key, self.client_nonce, server_nonce, bool(flags & FLAG_ENCRYPT),
                           counter_mode if server_flags & FLAG_AES_CTR else None, salt=salt), rtt

    def _answer(self, peer, wait):
        """The SERVER_HELLO fields from `peer` and the round trip, or None."""
        if self._sock.getpeername()[:2] != peer[:2]:
            return None                 # the connect that won went elsewhere
        deadline = time.monotonic() + wait
        with selectors.DefaultSelector() as selector:
            selector.register(self._sock, selectors.EVENT_READ)
            while True:
                try:
                    datagram = self._sock.recv(EARLY_HELLO_SIZE + 1)
                except (BlockingIOError, InterruptedError):
                    left = deadline - time.monotonic()
                    if left <= 0 or not selector.select(left):
                        return None
                    continue
                except OSError:
                    return None         # an ICMP unreachable: no one answers UDP there
                if len(datagram) == EARLY_HELLO_SIZE and datagram[0] == KIND_HANDSHAKE:
                    return SERVER_HELLO.unpack_from(datagram, PACKET_HEADER.size), \
                        time.monotonic() - self._sent

    def close(self):
        if self._sock is not None:
            self._sock.close()
            self._sock = None


# ---------------------------------------------------------------------------
# Cache database
# ---------------------------------------------------------------------------
# What wanxfer remembers of the data it has moved.
#
# ChunkStore keeps chunks by digest in a SQLite file: WAL mode and a busy
# timeout so two processes can share it, commits batched every
# CACHE_COMMIT_INTERVAL (a kill -9 loses at most the last batch, never the
# file), least recently used chunks evicted past the size limit, and every
# chunk checked against its digest when read.  A file that is not a database
# or turns out corrupt is moved aside and a new cache started; a SQLite file
# of another program is refused.  The same file keeps the byte counters per
# kind ('tunnel-out', 'tunnel-in', later 'get') that `stats` reports.
# QueuedChunkStore is the same store for an event loop: its writes go to a
# thread of their own, so another process's hold on the file cannot stall it.

DEFAULT_CACHE_SIZE = 4 << 30
CACHE_APPLICATION_ID = 0x57584331       # 'WXC1' in the SQLite header: this is a wanxfer cache
CACHE_FORMAT = 2                        # PRAGMA user_version; 2: kept files carry their origin
CACHE_BUSY_TIMEOUT = 10.0               # s to wait for another process's write
CACHE_COMMIT_INTERVAL = 0.25            # s between batched commits
CACHE_COMMIT_BYTES = 32 << 20           # or sooner, after this much was written
CACHE_EVICT_TO = 0.9                    # evict down to this fraction of the limit
CACHE_TOUCH_GRANULARITY = 600           # s: how finely least-recent use is told apart
CACHE_QUEUED_BYTES = 64 << 20           # chunks waiting for the writer thread, at most
CACHE_QUEUED_MARKS = 1 << 16            # digests to mark used or drop, waiting likewise
CACHE_READ_TIMEOUT = 0.05               # s an event loop's lookup may wait for the file
CACHE_READ_RETRY = 1.0                  # s lookups miss after the file was busy
RUN_FRESH_SECONDS = 15.0                # a run whose process cannot be checked (run_alive)
                                        # is not running once not updated for longer
RUN_FORGET_SECONDS = 86400.0
STATS_KINDS = ('tunnel-out', 'tunnel-in', 'get')

CACHE_SCHEMA = (
    'CREATE TABLE IF NOT EXISTS chunks (id INTEGER PRIMARY KEY, digest BLOB NOT NULL UNIQUE, '
    'size INTEGER NOT NULL, used INTEGER NOT NULL, data BLOB NOT NULL)',
    'CREATE INDEX IF NOT EXISTS chunks_by_use ON chunks (used)',
    'CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)',
    'CREATE TABLE IF NOT EXISTS stats (kind TEXT PRIMARY KEY, connections INTEGER NOT NULL, '
    'original INTEGER NOT NULL, transferred INTEGER NOT NULL)',
    'CREATE TABLE IF NOT EXISTS runs (run TEXT NOT NULL, kind TEXT NOT NULL, pid INTEGER NOT NULL, '
    'role TEXT NOT NULL, started REAL NOT NULL, updated REAL NOT NULL, '
    'connections INTEGER NOT NULL, original INTEGER NOT NULL, transferred INTEGER NOT NULL, '
    'PRIMARY KEY (run, kind))',
    # The process that saves each run's figures (process_identity): a run
    # whose process has ended is not running, however fresh its figures.
    'CREATE TABLE IF NOT EXISTS run_owners (run TEXT PRIMARY KEY, process TEXT NOT NULL)',
    "INSERT OR IGNORE INTO counters VALUES ('stored_bytes', 0)",
    # Files `get` received, kept by hard link (owned) or where they lie, and
    # the spans of each by digest: what a delta transfer can be built from.
    # `origin` is the server they came from (server_origin()); NULL in rows
    # of format 1, whose origin is unknown, so they are never used.
    'CREATE TABLE IF NOT EXISTS kept_files (id INTEGER PRIMARY KEY, path TEXT NOT NULL, '
    'owned INTEGER NOT NULL, remote TEXT NOT NULL, size INTEGER NOT NULL, '
    'mtime_ns INTEGER NOT NULL, modes TEXT NOT NULL, kept REAL NOT NULL, origin TEXT)',
    'CREATE TABLE IF NOT EXISTS spans (digest BLOB NOT NULL, file INTEGER NOT NULL, '
    'offset INTEGER NOT NULL, length INTEGER NOT NULL)',
    'CREATE INDEX IF NOT EXISTS spans_by_digest ON spans (digest)',
    'CREATE INDEX IF NOT EXISTS spans_by_file ON spans (file)',
    # `serve`'s signatures of its files, by file identity.
    'CREATE TABLE IF NOT EXISTS signatures (file TEXT PRIMARY KEY, sha256 TEXT NOT NULL, '
    'pieces TEXT NOT NULL, used REAL NOT NULL)',
)

_CORRUPTION_WORDS = ('malformed', 'not a database', 'file is encrypted', 'corrupt')


def _is_corruption(error):
    text = str(error).lower()
    return any(word in text for word in _CORRUPTION_WORDS)


def is_our_cache_file(path):
    """Whether the file at `path` is recognisably a wanxfer cache, however
    damaged its pages: a SQLite header carrying our application id.  Only
    such a file may be moved aside; anything else (a mistyped --cache) is
    not ours to touch."""
    try:
        with open(path, 'rb') as f:
            header = f.read(100)
    except OSError:
        return False
    return header[:16] == b'SQLite format 3\x00' and \
        header[68:72] == struct.pack('>I', CACHE_APPLICATION_ID)


def _is_busy(error):
    text = str(error).lower()
    return 'locked' in text or 'busy' in text


def open_cache_db(path, create, timeout=CACHE_BUSY_TIMEOUT):
    """A sqlite3 connection to the wanxfer cache at `path`, its format
    checked; with `create`, a new or empty file becomes a cache.  Raises
    CacheError for a file that is not ours, sqlite3.DatabaseError for one
    that is not a database at all.  The connection may be handed to another
    thread (one at a time)."""
    if not create and not os.path.exists(path):
        raise CacheError('no cache at %s (no tunnel has used it yet)' % path)
    if create:
        directory = os.path.dirname(os.path.abspath(path))
        try:
            # Private: the cache holds what crossed the wire, and the
            # fingerprints of the secrets it came under.
            os.makedirs(directory, mode=0o700, exist_ok=True)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass
        except OSError as e:
            raise CacheError('cannot create cache %s: %s' % (path, e.strerror))
    try:
        db = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
    except sqlite3.OperationalError as e:
        raise CacheError('cannot open cache %s: %s' % (path, e))
    try:
        application = db.execute('PRAGMA application_id').fetchone()[0]
        tables = db.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]
        if application != CACHE_APPLICATION_ID and tables:
            raise CacheError('%s is not a wanxfer cache (it is some other SQLite database); '
                             'choose another --cache' % path)
        version = db.execute('PRAGMA user_version').fetchone()[0]
        if version > CACHE_FORMAT:
            raise CacheError('cache %s was made by a newer wanxfer (format %d)' % (path, version))
        if create:
            if not tables:
                db.execute('PRAGMA page_size=65536')    # chunks fill pages: half the CPU of 4 KiB
            db.execute('PRAGMA journal_mode=WAL')
            db.execute('PRAGMA synchronous=NORMAL')
            db.execute('BEGIN IMMEDIATE')
            for statement in CACHE_SCHEMA:
                db.execute(statement)
            _upgrade_cache(db)
            db.execute('PRAGMA application_id=%d' % CACHE_APPLICATION_ID)
            db.execute('PRAGMA user_version=%d' % CACHE_FORMAT)
            db.execute('COMMIT')
        elif application != CACHE_APPLICATION_ID:
            raise CacheError('no cache at %s (the file is empty)' % path)
    except BaseException:
        db.close()
        raise
    return db


def _upgrade_cache(db):
    """Bring a cache of an earlier format up to CACHE_FORMAT, inside the
    caller's transaction.  Format 1 kept files without their origin: they
    get none, which no server matches."""
    columns = [row[1] for row in db.execute('PRAGMA table_info(kept_files)')]
    if 'origin' not in columns:
        db.execute('ALTER TABLE kept_files ADD COLUMN origin TEXT')
    db.execute('CREATE INDEX IF NOT EXISTS kept_files_by_origin ON kept_files (origin, remote)')


class ChunkStore:
    """Chunks by digest in a SQLite file, safe to share between processes.

    For callers: `has(digest)` and `get(digest)` (verified against the
    digest: None when absent or damaged), `put(digest, data)`, `flush()`
    about every CACHE_COMMIT_INTERVAL (commits, records use for LRU,
    evicts), `save_run()` for the byte counters, `close()`; for delta
    transfers `keep_file()`, `find_spans()`, `forget_file()`; for a writer
    thread `write_batch()` (see QueuedChunkStore).  Faults found while
    running never raise: a damaged cache is moved aside (with its kept
    files) and replaced, a busy one costs a miss, so the cache can cost
    bandwidth, never correctness.  A file that is not recognisably a
    wanxfer cache is never moved nor written: opening it raises CacheError,
    and met while running it leaves the store without a cache.  `log`
    receives one line per problem."""

    def __init__(self, path, limit=DEFAULT_CACHE_SIZE, log=None):
        self.path = path
        self.limit = limit
        self.log = log or (lambda line: None)
        self.damaged_chunks = 0         # chunks whose content no longer matched their digest
        self.generation = 0             # +1 for each database opened: others' connections follow
        self._db = None
        self._identity = None
        self._in_transaction = False
        self._written = 0
        self._added = 0
        self._touched = set()
        self._saved = {}                # (run, kind) -> figures already added to the totals
        self._warned = set()
        try:
            self._db = open_cache_db(path, create=True)
        except sqlite3.DatabaseError as e:
            if isinstance(e, sqlite3.OperationalError) and not _is_corruption(e):
                raise CacheError('cannot use cache %s: %s' % (path, e))
            self._move_aside(e)
            self._db = open_cache_db(path, create=True)
        self._identity = self._file_identity()
        self.generation = 1

    # -- the chunks --------------------------------------------------------

    def has(self, digest):
        """Whether the chunk is here (and mark it used)."""
        row = self._safely(None, lambda: self._db.execute(
            'SELECT used FROM chunks WHERE digest = ?', (digest,)).fetchone())
        if row is None:
            return False
        self._touch(digest, row[0])
        return True

    def get(self, digest):
        """The chunk's bytes, checked against `digest`, or None."""
        row = self._safely(None, lambda: self._db.execute(
            'SELECT data, used FROM chunks WHERE digest = ?', (digest,)).fetchone())
        if row is None:
            return None
        data = row[0]
        if chunk_digest(data) != digest:
            self.damaged_chunks += 1
            self._warn('damaged', 'cache %s holds chunks that no longer match their digest; '
                       'they are dropped and fetched from the peer' % self.path)
            self._safely(None, self._delete, digest)
            return None
        self._touch(digest, row[1])
        return data

    def _touch(self, digest, used):
        # Use is recorded to the nearest CACHE_TOUCH_GRANULARITY: a chunk
        # used twice in a minute is written once, not on every use.
        if used < self._clock() - CACHE_TOUCH_GRANULARITY * 1000:
            self._touched.add(digest)

    def put(self, digest, data):
        if len(data) >= MIN_STORED_CHUNK:
            self._safely(None, self._put, digest, data)

    def _put(self, digest, data):
        self._begin()
        self._insert(digest, data, self._clock())
        if self._written >= CACHE_COMMIT_BYTES:
            self.flush()

    def _insert(self, digest, data, stamp):
        cursor = self._db.execute('INSERT OR IGNORE INTO chunks (digest, size, used, data) '
                                  'VALUES (?, ?, ?, ?)', (digest, len(data), stamp, data))
        if cursor.rowcount == 1:
            self._added += len(data)
        self._written += len(data)

    def write_batch(self, chunks, used=(), damaged=()):
        """In one transaction: store `chunks` [(digest, data)], mark the
        `used` digests used, drop the `damaged` ones.  Returns 'done',
        'busy' (another process held the write lock past the busy timeout;
        the same batch may simply be given again) or 'failed'."""
        busy = []

        def write():
            try:
                self._begin()
            except sqlite3.OperationalError as e:
                if not _is_busy(e):
                    raise
                busy.append(e)
                return False
            for digest in damaged:
                self._delete(digest)
            stamp = self._clock()
            for digest, data in chunks:
                if len(data) >= MIN_STORED_CHUNK:
                    self._insert(digest, data, stamp)
            self._touched.update(used)
            self._flush()
            return True
        if self._safely(False, write):
            return 'done'
        if busy:
            self._warn('busy', 'cache %s is busy (another process holds its write lock): what '
                       'is new waits in memory meanwhile' % self.path)
            return 'busy'
        return 'failed'

    def _delete(self, digest):
        self._begin()
        row = self._db.execute('SELECT size FROM chunks WHERE digest = ?', (digest,)).fetchone()
        if row:
            self._db.execute('DELETE FROM chunks WHERE digest = ?', (digest,))
            self._added -= row[0]

    def flush(self):
        """Commit what was written, record which chunks were used, and evict
        the least recently used past the limit.  Cheap when idle."""
        self._safely(None, self._flush)

    def _flush(self):
        if self._touched:
            self._begin()
            stamp = self._clock()
            self._db.executemany('UPDATE chunks SET used = ? WHERE digest = ?',
                                 [(stamp, digest) for digest in self._touched])
            self._touched.clear()
        if self._in_transaction:
            if self._added:
                self._db.execute("UPDATE counters SET value = value + ? WHERE name = 'stored_bytes'",
                                 (self._added,))
            self._db.execute('COMMIT')
            self._in_transaction = False
            added, self._added, self._written = self._added, 0, 0
            if added > 0 and self._counter('stored_bytes') > self.limit:
                self._evict()

    def _evict(self):
        self._begin()
        stored = self._counter('stored_bytes')
        target = int(self.limit * CACHE_EVICT_TO)
        while stored > target:
            rows = self._db.execute('SELECT id, size FROM chunks ORDER BY used LIMIT 256').fetchall()
            if not rows:
                stored = 0
                break
            self._db.executemany('DELETE FROM chunks WHERE id = ?', [(row[0],) for row in rows])
            stored -= sum(row[1] for row in rows)
        self._db.execute("UPDATE counters SET value = ? WHERE name = 'stored_bytes'", (max(0, stored),))
        self._db.execute('COMMIT')
        self._in_transaction = False

    def _counter(self, name):
        row = self._db.execute('SELECT value FROM counters WHERE name = ?', (name,)).fetchone()
        return row[0] if row else 0

    def _begin(self):
        if not self._in_transaction:
            self._db.execute('BEGIN IMMEDIATE')
            self._in_transaction = True

    @staticmethod
    def _clock():
        return int(time.time() * 1000)

    # -- files kept for delta transfers --------------------------------------
    # `get` keeps each file it received: a hard link under `kept_directory`
    # (so the bytes outlive the user's copy; evicting is unlink) and the
    # file's spans by digest.  Kept files have a budget of their own, as
    # large as the chunks'; a file larger than that is indexed where it lies.
    # Each is kept for the origin (server_origin()) it came from, and found
    # only for that origin: a signature is a server's guess at what the
    # client holds, and the client's answer tells which guesses were right.

    @property
    def kept_directory(self):
        return self.path + '.files'

    def _make_kept_directory(self):
        """The kept files' directory, private (a link to a file of a private
        directory must not be reachable by others through it) and real: a
        link there, planted beside a cache in a shared place, would have
        the files linked wherever it points."""
        try:
            os.mkdir(self.kept_directory, 0o700)
        except FileExistsError:
            pass
        info = os.lstat(self.kept_directory)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            raise OSError(errno.EPERM, 'not a directory of ours')
        if stat.S_IMODE(info.st_mode) & 0o077:
            os.chmod(self.kept_directory, 0o700)

    def kept_files_for(self, remote, origin):
        """[(id, path, size, mtime_ns, modes)] of files kept for `remote`
        of `origin`, newest first."""
        return self._safely([], lambda: self._db.execute(
            'SELECT id, path, size, mtime_ns, modes FROM kept_files WHERE origin = ? AND remote = ? '
            'ORDER BY kept DESC', (origin, remote)).fetchall())

    def keeps_from(self, origin):
        """Whether any file of `origin` is kept: if none is, a delta from
        it can find nothing here but zeros."""
        return self._safely(True, lambda: self._db.execute(
            'SELECT 1 FROM kept_files WHERE origin = ? LIMIT 1', (origin,)).fetchone() is not None)

    def keep_file(self, path, remote, mode, spans, link=True, *, origin):
        """Remember the file at `path` (received for `remote` from
        `origin`) with its `spans` [(offset, length, digest)] cut in `mode`;
        returns its id."""
        return self._safely(None, self._keep_file, path, remote, mode, spans, link, origin)

    def _keep_file(self, path, remote, mode, spans, link, origin):
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode):
            return None                 # a link's target is not ours to keep or index
        self._begin()
        for (stale,) in self._db.execute('SELECT id FROM kept_files WHERE path = ? AND owned = 0',
                                         (os.path.abspath(path),)).fetchall():
            self._forget_file(stale)
        row = self._db.execute('INSERT INTO kept_files (path, owned, remote, size, mtime_ns, modes, '
                               'kept, origin) VALUES (?, 0, ?, ?, ?, ?, ?, ?)',
                               (os.path.abspath(path), remote, info.st_size, info.st_mtime_ns, mode,
                                time.time(), origin))
        file_id = row.lastrowid
        if link and info.st_size <= self.limit:
            kept = os.path.join(self.kept_directory, '%d' % file_id)
            try:
                self._make_kept_directory()
                os.link(path, kept, follow_symlinks=False)
                self._db.execute('UPDATE kept_files SET path = ?, owned = 1 WHERE id = ?',
                                 (kept, file_id))
            except OSError as e:
                self._warn('link', 'cannot keep received files under %s (%s): a deleted file '
                           'will be fetched in full next time' % (self.kept_directory, e.strerror))
        self._add_spans(file_id, spans)
        self._evict_files(file_id)
        self._flush()
        return file_id

    def add_spans(self, file_id, mode, spans):
        """Index a kept file again, cut in another mode."""
        def add():
            self._begin()
            self._db.execute("UPDATE kept_files SET modes = modes || ',' || ? WHERE id = ?",
                             (mode, file_id))
            self._add_spans(file_id, spans)
            self._flush()
        self._safely(None, add)

    def _add_spans(self, file_id, spans):
        self._db.executemany('INSERT INTO spans VALUES (?, ?, ?, ?)',
                             ((digest, file_id, offset, length)
                              for offset, length, digest in spans if digest != ZERO_SPAN))

    def find_spans(self, digests, origin):
        """{digest: [(file id, path, size, mtime_ns, offset, length)]} for
        those known in files kept for `origin`."""
        def find():
            # The origin's files first, then the spans by digest alone: a
            # join costs five times as much per span (a piece has 512).
            files = {row[0]: row for row in self._db.execute(
                'SELECT id, path, size, mtime_ns FROM kept_files WHERE origin = ?', (origin,))}
            found = {}
            digests_list = list(digests) if files else []
            for i in range(0, len(digests_list), 500):
                batch = digests_list[i:i + 500]
                for digest, file_id, offset, length in self._db.execute(
                        'SELECT digest, file, offset, length FROM spans WHERE digest IN (%s)'
                        % ','.join('?' * len(batch)), batch):
                    kept = files.get(file_id)
                    if kept is not None:
                        found.setdefault(digest, []).append(kept + (offset, length))
            return found
        return self._safely({}, find)

    def forget_file(self, file_id):
        """Drop a kept file whose bytes no longer match what was recorded."""
        def forget():
            self._begin()
            self._forget_file(file_id)
            self._flush()
        self._safely(None, forget)

    def _forget_file(self, file_id):
        row = self._db.execute('SELECT path, owned FROM kept_files WHERE id = ?',
                               (file_id,)).fetchone()
        self._db.execute('DELETE FROM spans WHERE file = ?', (file_id,))
        self._db.execute('DELETE FROM kept_files WHERE id = ?', (file_id,))
        if row and row[1]:
            try:
                os.unlink(row[0])
            except OSError:
                pass

    def _evict_files(self, newest):
        """Oldest kept files go first once they pass the limit (never `newest`)."""
        rows = self._db.execute('SELECT id, size FROM kept_files WHERE owned = 1 '
                                'ORDER BY kept DESC, id DESC').fetchall()
        total = 0
        for file_id, size in rows:
            total += size
            if total > self.limit and file_id != newest:
                self._forget_file(file_id)

    # -- counters for `stats` -----------------------------------------------

    def save_run(self, run, role, started, figures):
        """Record one running tunnel's figures ({kind: (connections,
        original bytes, transferred bytes)}, counted since it started) and
        add what is new since the last call to the life-of-the-cache totals."""
        self._safely(None, self._save_run, run, role, started, figures)

    def _save_run(self, run, role, started, figures):
        self._begin()
        now = time.time()
        for kind, values in figures.items():
            before = self._saved.get((run, kind), (0, 0, 0))
            delta = [new - old for new, old in zip(values, before)]
            self._db.execute('INSERT OR IGNORE INTO stats VALUES (?, 0, 0, 0)', (kind,))
            self._db.execute('UPDATE stats SET connections = connections + ?, original = original + ?, '
                             'transferred = transferred + ? WHERE kind = ?', delta + [kind])
            self._db.execute('INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)',
                             (run, kind, os.getpid(), role, started, now) + tuple(values))
        identity = process_identity(os.getpid())
        if identity:
            self._db.execute('INSERT OR REPLACE INTO run_owners VALUES (?, ?)', (run, identity))
        self._db.execute('DELETE FROM runs WHERE updated < ?', (now - RUN_FORGET_SECONDS,))
        self._db.execute('DELETE FROM run_owners WHERE run NOT IN (SELECT run FROM runs)')
        self._flush()
        for kind, values in figures.items():
            self._saved[(run, kind)] = tuple(values)

    def end_run(self, run):
        self._safely(None, self._end_run, run)

    def _end_run(self, run):
        self._begin()
        self._db.execute('DELETE FROM runs WHERE run = ?', (run,))
        self._db.execute('DELETE FROM run_owners WHERE run = ?', (run,))
        self._flush()

    # -- faults ---------------------------------------------------------------

    def _safely(self, default, operation, *args):
        if self._db is None:
            return default
        try:
            return operation(*args)
        except sqlite3.DatabaseError as e:
            if _is_corruption(e):
                self._replace(e)
            else:
                self._warn(str(e), 'cache %s: %s (carrying on without it for now)' % (self.path, e))
                self._rollback()
            return default

    def _rollback(self):
        if self._in_transaction:
            try:
                self._db.execute('ROLLBACK')
            except sqlite3.DatabaseError:
                pass
            self._in_transaction = False
            self._added = self._written = 0

    def _replace(self, error):
        self._close_db()
        try:
            self._move_aside(error)
        except CacheError as e:
            self.log('warning: %s; running without a cache' % e)
            return
        self._reopen()

    def replace_damaged(self, error):
        """Another connection found the file corrupt (`error`): move it
        aside and start a new one, as if this one had found it."""
        if self._db is not None:
            self._replace(error)

    def _reopen(self):
        try:
            self._db = open_cache_db(self.path, create=True)
            self._identity = self._file_identity()
        except (WanxferError, sqlite3.DatabaseError) as e:
            self._db = None
            self.log('warning: cannot start a new cache at %s (%s); running without one'
                     % (self.path, e))
        self.generation += 1

    def _move_aside(self, error):
        if not is_our_cache_file(self.path):
            raise CacheError('%s is not a wanxfer cache (%s); it is left as it is: choose another '
                             '--cache' % (self.path, error))
        aside = '%s.corrupt-%s' % (self.path, time.strftime('%Y%m%d-%H%M%S'))
        # The kept files go too: the new cache knows none of them.
        for suffix in ('', '-wal', '-shm', '.files'):
            try:
                os.replace(self.path + suffix, aside + suffix)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise CacheError('cache %s is damaged (%s) and cannot be moved aside: %s'
                                 % (self.path, error, e.strerror))
        self.log('warning: cache %s was damaged (%s); moved it to %s and started a new one'
                 % (self.path, error, aside))

    def _file_identity(self):
        try:
            info = os.stat(self.path)
            return info.st_dev, info.st_ino
        except OSError:
            return None

    def check_file(self):
        """Start a new cache if the file was deleted or replaced under us
        (an operator's rm, another process's recovery)."""
        if self._db is not None and self._file_identity() != self._identity:
            self._warn('replaced', 'cache %s was removed or replaced; starting a new one' % self.path)
            self._warned.discard('replaced')
            self._close_db()
            self._saved.clear()
            self._reopen()

    def _warn(self, key, line):
        if key not in self._warned:
            self._warned.add(key)
            self.log('warning: ' + line)

    def _close_db(self):
        if self._db is not None:
            self._rollback()
            try:
                self._db.close()
            except sqlite3.DatabaseError:
                pass
            self._db = None
        self._touched.clear()

    def close(self):
        self.flush()
        self._close_db()


class QueuedChunkStore:
    """A ChunkStore as an event loop must use it: no call waits for another
    process's hold on the file (a `get` keeping a huge file holds the write
    lock for tens of seconds).

    Lookups (`has`, `get`) run on the caller's thread: first among the
    chunks not committed yet, then through a connection of their own that
    only reads, which in WAL mode does not wait for writers; should the
    file still be busy for CACHE_READ_TIMEOUT, that lookup and those of the
    next CACHE_READ_RETRY miss.  Everything that writes (`put`, marking
    chunks used, dropping damaged ones, `save_run`, `end_run`,
    `check_file`) is queued for one writer thread that owns the ChunkStore
    and commits about every CACHE_COMMIT_INTERVAL.  A batch the file was
    too busy for waits and goes again; chunks past CACHE_QUEUED_BYTES are
    not kept, so a stuck cache costs bandwidth, never memory.  `close()`
    writes what is queued, then closes the store."""

    def __init__(self, store):
        self.store = store              # the writer thread's from here on
        self.path = store.path
        self.log = store.log
        self.damaged_chunks = 0
        self.dropped_bytes = 0          # chunks not kept: the queue was full
        self._warned = set()
        self._reader = None
        self._reader_generation = None
        self._reader_resume = 0.0
        self._changed = threading.Condition()
        self._pending = {}              # digest -> chunk, queued or being written: lookups find it
        self._pending_bytes = 0
        self._used = set()
        self._damaged = set()
        self._runs = {}                 # run -> its latest (role, started, figures)
        self._ended = []
        self._check = False
        self._corrupt = None            # (generation, error) a lookup ran into
        self._closing = False
        self._idle = False
        self._last_write = time.monotonic()
        self._thread = start_thread(self._run, 'cache-writer')

    # -- lookups, on the caller's thread ------------------------------------

    def has(self, digest):
        """Whether the chunk is here (and mark it used)."""
        if digest in self._pending:
            return True
        row = self._lookup('SELECT used FROM chunks WHERE digest = ?', digest)
        if row is None:
            return False
        self._touch(digest, row[0])
        return True

    def get(self, digest):
        """The chunk's bytes, checked against `digest`, or None."""
        chunk = self._pending.get(digest)
        if chunk is not None:
            return chunk
        row = self._lookup('SELECT data, used FROM chunks WHERE digest = ?', digest)
        if row is None:
            return None
        if chunk_digest(row[0]) != digest:
            self.damaged_chunks += 1
            self._warn('damaged', 'cache %s holds chunks that no longer match their digest; '
                       'they are dropped and fetched from the peer' % self.path)
            self._mark(self._damaged, digest)
            return None
        self._touch(digest, row[1])
        return row[0]

    def _touch(self, digest, used):
        if used < ChunkStore._clock() - CACHE_TOUCH_GRANULARITY * 1000:
            self._mark(self._used, digest)

    def _lookup(self, query, digest):
        db = self._reading()
        if db is None:
            return None
        try:
            return db.execute(query, (digest,)).fetchone()
        except sqlite3.DatabaseError as e:
            self._reader_resume = time.monotonic() + CACHE_READ_RETRY
            if _is_corruption(e):
                self._close_reader()
                with self._changed:
                    self._corrupt = (self._reader_generation, e)
                    self._changed.notify()
            else:
                self._warn(str(e), 'cache %s: %s (carrying on without it for now)' % (self.path, e))
            return None

    def _reading(self):
        """The lookups' connection, (re)opened when the writer opened
        another file; None while the file is not to be asked."""
        generation = self.store.generation
        if generation != self._reader_generation:
            self._close_reader()
            self._reader_generation = generation
            self._reader_resume = 0.0
        if time.monotonic() < self._reader_resume:
            return None
        if self._reader is None:
            try:
                db = open_cache_db(self.path, create=False, timeout=CACHE_READ_TIMEOUT)
            except (WanxferError, sqlite3.DatabaseError):
                self._reader_resume = time.monotonic() + CACHE_READ_RETRY
                return None
            db.execute('PRAGMA query_only = ON')
            self._reader = db
        return self._reader

    def _close_reader(self):
        if self._reader is not None:
            try:
                self._reader.close()
            except sqlite3.DatabaseError:
                pass
            self._reader = None

    def _warn(self, key, line):
        if key not in self._warned:
            self._warned.add(key)
            self.log('warning: ' + line)

    # -- writes, queued -----------------------------------------------------

    def put(self, digest, data):
        if len(data) < MIN_STORED_CHUNK or digest in self._pending:
            return
        data = bytes(data)              # not a view that would keep a whole frame alive
        with self._changed:
            full = self._pending_bytes + len(data) > CACHE_QUEUED_BYTES
            if not full:
                self._pending[digest] = data
                self._pending_bytes += len(data)
                if self._idle or self._pending_bytes >= CACHE_COMMIT_BYTES:
                    self._changed.notify()
        if full:
            self.dropped_bytes += len(data)
            self._warn('behind', 'cache %s is not keeping up (busy or slow): chunks past %d MiB '
                       'waiting to be written are not kept' % (self.path, CACHE_QUEUED_BYTES >> 20))

    def _mark(self, marks, digest):
        with self._changed:
            if len(marks) < CACHE_QUEUED_MARKS:
                marks.add(digest)
                if self._idle:
                    self._changed.notify()

    def save_run(self, run, role, started, figures):
        with self._changed:
            self._runs[run] = (role, started, figures)
            self._changed.notify()

    def end_run(self, run):
        with self._changed:
            self._ended.append(run)
            self._changed.notify()

    def check_file(self):
        with self._changed:
            self._check = True
            self._changed.notify()

    def close(self):
        """Write what is queued (waiting for the file as long as a write
        would), then close the store."""
        self._close_reader()
        with self._changed:
            self._closing = True
            self._changed.notify()
        self._thread.join()

    # -- the writer thread --------------------------------------------------

    def _due(self):
        """Seconds until the next batch; None while there is nothing to write."""
        if not (self._pending or self._used or self._damaged or self._runs or self._ended
                or self._check or self._corrupt):
            return None
        if self._pending_bytes >= CACHE_COMMIT_BYTES:
            return 0.0
        return self._last_write + CACHE_COMMIT_INTERVAL - time.monotonic()

    def _run(self):
        closing = False
        while not closing:
            with self._changed:
                while not self._closing:
                    wait = self._due()
                    if wait is not None and wait <= 0:
                        break
                    self._idle = wait is None
                    self._changed.wait(wait)
                self._idle = False
                closing = self._closing
                chunks = list(self._pending.items())
                used, damaged = set(self._used), set(self._damaged)
                self._used.clear()
                self._damaged.clear()
                runs, self._runs = self._runs, {}
                ended, self._ended = self._ended, []
                check, self._check = self._check, False
                corrupt, self._corrupt = self._corrupt, None
            try:
                outcome = self._write(chunks, used, damaged, runs, ended, check, corrupt)
            except (WanxferError, OSError, sqlite3.Error) as e:
                self.store._warn(str(e), 'cache %s: %s (carrying on without it for now)'
                                 % (self.path, e))
                outcome = 'failed'
            self._last_write = time.monotonic()
            with self._changed:
                if outcome == 'busy' and not closing:
                    # The same again next time: inserts and marks repeat harmlessly.
                    for marks, kept in ((self._used, used), (self._damaged, damaged)):
                        marks.update(itertools.islice(kept, max(0, CACHE_QUEUED_MARKS - len(marks))))
                    runs.update(self._runs)
                    self._runs = runs
                    self._ended[:0] = ended
                    continue
                for digest, chunk in chunks:
                    if self._pending.get(digest) is chunk:
                        del self._pending[digest]
                        self._pending_bytes -= len(chunk)
        self.store.close()

    def _write(self, chunks, used, damaged, runs, ended, check, corrupt):
        store = self.store
        if corrupt is not None and corrupt[0] == store.generation:
            store.replace_damaged(corrupt[1])
        if check:
            store.check_file()
        outcome = 'done'
        if chunks or used or damaged:
            outcome = store.write_batch(chunks, used, damaged)
            if outcome == 'busy':
                return outcome              # the figures would wait for the same lock
        for run, (role, started, figures) in runs.items():
            store.save_run(run, role, started, figures)
        for run in ended:
            store.end_run(run)
        return outcome


def boot_id():
    """This boot of this machine, as Linux names it ('' elsewhere)."""
    try:
        with open('/proc/sys/kernel/random/boot_id') as f:
            return f.read().strip()
    except OSError:
        return ''


def process_identity(pid):
    """What tells process `pid` from a later one given the same pid: the
    boot and the process's start (clock ticks since boot), as Linux's /proc
    tells them; '' if it has ended (a zombie has) or this is not Linux."""
    boot = boot_id()
    try:
        with open('/proc/%d/stat' % pid, 'rb') as f:
            stat = f.read()
    except OSError:
        return ''
    fields = stat[stat.rindex(b')') + 2:].split()      # after the command, which may hold anything
    if not boot or fields[0] in (b'Z', b'X'):
        return ''
    return '%s %d' % (boot, int(fields[19]))


def run_alive(pid, identity, updated, now):
    """Whether the process that saved a run's figures is still running it:
    on the machine and boot it ran on, that `identity` is still `pid`'s;
    elsewhere (another machine sharing the file, or no /proc) whether its
    figures were saved in the last RUN_FRESH_SECONDS."""
    if identity and identity.split()[0] == boot_id():
        return process_identity(pid) == identity
    return updated >= now - RUN_FRESH_SECONDS


def figures_dict(connections, original, transferred):
    saved = original - transferred
    return {'connections': connections, 'original_bytes': original,
            'transferred_bytes': transferred, 'saved_bytes': saved,
            'saving_percent': round(100.0 * saved / original, 2) if original else 0.0}


def cache_report(path, now=None):
    """Everything `stats` shows, as one dict: the cache's size, the totals
    for its life and the figures of each tunnel running on it."""
    now = time.time() if now is None else now
    try:
        db = open_cache_db(path, create=False)
    except sqlite3.DatabaseError as e:
        raise CacheError('cannot read cache %s: %s' % (path, e))
    try:
        chunks, stored = db.execute('SELECT count(*), total(size) FROM chunks').fetchone()
        life = {kind: (0, 0, 0) for kind in STATS_KINDS}
        for kind, connections, original, transferred in db.execute(
                'SELECT kind, connections, original, transferred FROM stats'):
            life[kind] = (connections, original, transferred)
        owners = {}
        if db.execute("SELECT count(*) FROM sqlite_master WHERE name = 'run_owners'").fetchone()[0]:
            owners = dict(db.execute('SELECT run, process FROM run_owners'))   # none from older wanxfers
        runs = collections.OrderedDict()
        for run, kind, pid, role, started, updated, *figures in db.execute(
                'SELECT run, kind, pid, role, started, updated, connections, original, transferred '
                'FROM runs ORDER BY started, run, kind'):
            if run not in runs:
                alive = run_alive(pid, owners.get(run, ''), updated, now)
                runs[run] = {'pid': pid, 'role': role, 'started': started, 'updated': updated,
                             'figures': {}} if alive else None
            if runs[run] is not None:
                runs[run]['figures'][kind] = tuple(figures)
    except sqlite3.DatabaseError as e:
        raise CacheError('cannot read cache %s: %s' % (path, e))
    finally:
        db.close()

    def section(figures):
        out = {kind: figures_dict(*figures.get(kind, (0, 0, 0))) for kind in STATS_KINDS}
        # A connection carries both directions: the total counts it once.
        connections = max([figures.get(kind, (0, 0, 0))[0] for kind in STATS_KINDS] + [0])
        out['total'] = figures_dict(connections,
                                    sum(figures.get(kind, (0, 0, 0))[1] for kind in STATS_KINDS),
                                    sum(figures.get(kind, (0, 0, 0))[2] for kind in STATS_KINDS))
        return out

    running = []
    for run in filter(None, runs.values()):
        entry = {'pid': run['pid'], 'role': run['role'], 'started': run['started'],
                 'updated': run['updated'], 'uptime_seconds': round(run['updated'] - run['started'], 1)}
        entry.update(section(run['figures']))
        running.append(entry)
    report = {'cache': {'path': os.path.abspath(path), 'chunks': chunks, 'stored_bytes': int(stored)},
              'life': section(life), 'running': running}
    return report


# ---------------------------------------------------------------------------
# Chunking and signatures
# ---------------------------------------------------------------------------
# How wanxfer cuts data into chunks and names them: the tunnel's unit of
# dedup, and the spans of a delta transfer's signatures.
#
# Chunking is content-defined, so that an insert or delete early in a stream
# moves the chunks around it and no others.  Two rules, the second for data
# too regular for the first:
#
#   Patterns.  A cut falls where the 5 to 7 bytes before it, each reduced to
#   one of four symbols by the fixed table CUT_SYMBOLS, spell a fixed
#   pattern.  bytes.translate and bytes.find test every position at C speed
#   (the chunker cuts random data and SQL dumps at about 240 MB/s here; a
#   byte-at-a-time rolling hash in Python manages about ten).  Sizes are
#   steered as in TTTD and FastCDC: nothing is cut in a chunk's first 4 KiB,
#   a strict pattern applies up to 16 KiB, looser ones up to MAX_CHUNK.
#   Random data gets 14 KiB chunks on average this way, a SQL dump 23 KiB.
#
#   Window hash.  Fixed-size records and database pages can hold no
#   pattern at all: 5 to 7 bytes see only constant padding most of the
#   time.  A chunk that reaches MAX_CHUNK without a pattern is cut
#   instead by a hash of the 32 bytes before each position, which sees a
#   record's varying fields; the hash comes from Python's integers, whose
#   multiplication, shifts and additions run over a whole block of data at
#   C speed (`window_hashes`): multiplying by an 8-byte constant mixes each
#   byte into the 8 after it, two shifted additions widen that to 32.  Its
#   tiers, like the patterns', loosen towards MAX_CHUNK.
#   The cut is known only once MAX_CHUNK bytes are in, after bytes before it
#   may have gone out (see StreamEncoder).
#
# A run of one byte value (a disk of zeros) holds no cut either way.  A
# chunk that begins with MIN_CHUNK of one value ends where the value does
# (MAX_CHUNK chunks that are all alike, then the rest), so what follows a
# run starts a chunk of its own; a chunk that runs into one and has no other
# cut ends where the run starts (or ends), so the run's chunks do not
# depend on what came before it.  The tables and constants are derived from
# SHA-256 of labels, so every wanxfer cuts alike.
#
# Each chunk is named by its SHA-256 (`chunk_digest`).  `compressible`
# decides from a sample whether zlib is worth its time.

MIN_CHUNK = 4 << 10
MAX_CHUNK = 64 << 10
MIN_STORED_CHUNK = 256          # smaller chunks cost more to name than to send


def _pattern(text):
    return bytes(int(c) for c in text)


# (smallest cut, largest cut, pattern), offsets from the chunk's start.  The
# patterns use every symbol and do not overlap themselves, so skewed data
# (text) still matches, if less often than random data.
CUT_TIERS = (
    (MIN_CHUNK, 16 << 10, _pattern('0213301')),     # 1 position in 16 Ki
    (16 << 10, 32 << 10, _pattern('210301')),       # 1 in 4 Ki
    (32 << 10, MAX_CHUNK, _pattern('13020')),       # 1 in 1 Ki
)


def _cut_table():
    """byte -> symbol 0..3.  Within each class of bytes (digits, lower case,
    upper case, other printable, control, high) the members, ranked by
    SHA-256 under a fixed label, take the four symbols in turn: text then
    spreads over all four, so patterns match about as often in an SQL dump
    as in random data, and every wanxfer derives the same table."""
    classes = (range(0x30, 0x3a), range(0x61, 0x7b), range(0x41, 0x5b),
               [b for b in range(0x20, 0x7f) if not chr(b).isalnum()], range(0x20), range(0x7f, 0x100))
    table = bytearray(256)
    for members in classes:
        ranked = sorted(members, key=lambda b: hashlib.sha256(b'wanxfer cut v1' + bytes([b])).digest())
        for rank, value in enumerate(ranked):
            table[value] = rank % 4
    return bytes(table)


CUT_SYMBOLS = _cut_table()


# Where no pattern matched: (smallest cut, largest cut, pattern) over the top
# four bits of each position's window hash.  The patterns use distinct
# values, so a constant stretch never matches the first two.  Nothing is cut
# in the first 16 KiB: such data compresses tenfold or more, and a reference
# costs 37 bytes whatever the chunk's size (so chunks average about 30 KiB).
HASH_TIERS = (
    (16 << 10, 48 << 10, bytes([0xa0, 0x30, 0xd0])),   # 1 position in 4 Ki
    (48 << 10, 56 << 10, bytes([0x60, 0xe0])),          # 1 in 256
    (56 << 10, MAX_CHUNK, bytes([0x90])),               # 1 in 16
)
HASH_WINDOW = 32                # bytes each position's hash covers, the position's own last
HASH_GUARD = 8                  # bytes more before a block, for the carries of its first sums
HASH_BLOCK = 4 << 10            # positions hashed at a time, from a fixed point of the chunk:
                                # little more than needed, and the same wherever the feed ends
RUN_MIN = 1 << 10               # equal bytes that make a run
NONZERO = bytes([0]) + bytes([1]) * 255


def _ranked_bytes(label):
    """The byte values 0-255 ordered by SHA-256 under `label`."""
    return sorted(range(256), key=lambda b: hashlib.sha256(label + bytes([b])).digest())


def _hash_constants():
    table = bytes(_ranked_bytes(b'wanxfer hash v2 table'))
    multiplier = bytes(b | 1 for b in hashlib.sha256(b'wanxfer hash v2 multiplier').digest()[:8])
    mask = b'\xf0' * (HASH_BLOCK + 2 * HASH_WINDOW + HASH_GUARD)
    return table, int.from_bytes(multiplier, 'little'), int.from_bytes(mask, 'little')


HASH_TABLE, HASH_MULTIPLIER, HASH_MASK = _hash_constants()


def window_hashes(data, start, end):
    """The window hash of each position in [start, end) of `data`, top four
    bits of a byte each (needs HASH_WINDOW + HASH_GUARD bytes before start).

    The bytes, spread by HASH_TABLE, are one integer's base-256 digits.
    Times HASH_MULTIPLIER (eight odd bytes), digit j sums bytes j-7..j, each
    times its own odd factor, plus the carries from below; adding the
    product shifted by 8 bytes and then by 16 makes that j-31..j.  Carries
    from before the guard are cut off, so a position's hash depends on where
    its block starts only when a carry crosses eight digits of 0xff."""
    first = start - HASH_WINDOW - HASH_GUARD
    window = data[first:end]
    x = int.from_bytes(window.translate(HASH_TABLE), 'little') * HASH_MULTIPLIER
    x += x << 64
    x += x << 128
    return (x & HASH_MASK).to_bytes(len(window) + HASH_WINDOW + 8, 'little')[start - first:end - first]


def one_value(data, start, end):
    """Whether data[start:end] is one byte value repeated."""
    last = data[end - 1]
    if data[start] != last or data[(start + end) // 2] != last:
        return False                # as most data does, cheaply
    return data.startswith(data[end - 1:end] * (end - start), start)     # memset and memcmp


def chunk_digest(data):
    return hashlib.sha256(data).digest()


def compressible(data, sample=4096):
    """Whether zlib is likely to save at least a tenth of `data`, judged
    from two samples (its start and middle) at level 1."""
    if len(data) <= sample:
        probe = bytes(data)
    else:
        middle = len(data) // 2
        probe = bytes(data[:sample // 2]) + bytes(data[middle:middle + sample // 2])
    return len(zlib.compress(probe, 1)) < 0.9 * len(probe)


class Chunker:
    """Cuts one stream into content-defined chunks as its bytes arrive.

    `feed(data)` returns the chunks that `data` completed; `pending_size`
    and `pending_from(offset)` tell what came after the last cut;
    `finish()` returns that as the last chunk (b'' if none) and starts
    over.  Where the cuts fall depends on the bytes only, never on how
    they were split between calls."""

    def __init__(self):
        self._data = bytearray()
        self._symbols = bytearray()
        self._forget_searches()

    def _forget_searches(self):
        # Per tier of CUT_TIERS, the last search: (from, to, first match or
        # -1).  A chunk's tiers overlap the next one's, and the data that
        # needs the window hash needs these searches over 60 KiB per chunk.
        self._searched = [(0, 0, -1)] * len(CUT_TIERS)

    @property
    def pending_size(self):
        return len(self._data)

    def pending_from(self, offset):
        return bytes(self._data[offset:])

    def feed(self, data):
        self._data += data
        self._symbols += data.translate(CUT_SYMBOLS)
        chunks, start, end = [], 0, len(self._data)
        while True:
            cut = self._find_cut(start, end)
            if cut is None:
                break
            chunks.append(bytes(self._data[start:cut]))
            start = cut
        if start:
            del self._data[:start]
            del self._symbols[:start]
            self._shift_searches(start)
        return chunks

    def _shift_searches(self, by):
        shifted = []
        for low, high, found in self._searched:
            if 0 <= found < by:
                shifted.append((0, 0, -1))  # its match is gone, and past it nothing was searched
            else:
                shifted.append((max(low - by, 0), max(high - by, 0), found - by if found >= 0 else -1))
        self._searched = shifted

    def _find_cut(self, start, end):
        if end >= start + MIN_CHUNK and one_value(self._data, start, start + MIN_CHUNK):
            return self._run_end(start, end)
        for tier, (low, high, pattern) in enumerate(CUT_TIERS):
            low, high = start + low, start + high
            found = self._search(tier, pattern, low - len(pattern), min(high, end))
            if found >= 0:
                return found + len(pattern)
            if end < high:
                return None                 # the rest of this tier has not arrived
        return self._hash_cut(start)

    def _run_end(self, start, end):
        """The cut of a chunk that begins with MIN_CHUNK bytes of one value:
        where that value ends, so that what follows a run starts a chunk of
        its own (None while that is not known)."""
        data, limit = self._data, min(end, start + MAX_CHUNK)
        if data.startswith(data[start:start + 1] * (limit - start), start):
            return limit if limit == start + MAX_CHUNK else None
        others = bytearray(b'\x01') * 256
        others[data[start]] = 0
        return start + MIN_CHUNK + data[start + MIN_CHUNK:limit].translate(others).find(1)

    def _search(self, tier, pattern, low, high):
        """symbols.find(pattern, low, high), skipping what an earlier search
        of this tier's pattern covered."""
        searched_low, searched_high, found = self._searched[tier]
        if searched_low <= low:
            if found >= low:
                return found if found + len(pattern) <= high else -1
            if found < 0 and searched_high >= high:
                return -1
            if found < 0:
                found = self._symbols.find(pattern, max(low, searched_high - len(pattern) + 1), high)
                self._searched[tier] = (low, high, found)
                return found
        found = self._symbols.find(pattern, low, high)
        self._searched[tier] = (low, high, found)
        return found

    def _hash_cut(self, start):
        """The cut of a chunk whose MAX_CHUNK bytes, all here, hold no pattern."""
        data, limit = self._data, start + MAX_CHUNK
        hashes, base = bytearray(), start + HASH_TIERS[0][0] - 8   # hashes[i] is position base + i
        for low, high, pattern in HASH_TIERS:
            low, high, width = start + low, start + high, len(pattern)
            first = low - width
            while True:
                hashed = base + len(hashes)
                found = hashes.find(pattern, first - base, min(high, hashed) - base)
                if found >= 0:
                    return base + found + width
                if hashed >= high:
                    break
                first = max(first, hashed - width + 1)
                block_end = min(hashed + HASH_BLOCK, limit)
                if one_value(data, hashed - HASH_WINDOW - HASH_GUARD, block_end):
                    hashes += bytes(block_end - hashed)     # a run: no cut, and no need to hash it
                else:
                    hashes += window_hashes(data, hashed, block_end)
        return self._run_cut(start)

    def _run_cut(self, start):
        """Where a chunk with no cut by pattern or hash ends: at the start of
        its last run of RUN_MIN equal bytes, or else at that run's end, if
        that leaves MIN_CHUNK to MAX_CHUNK bytes; else at MAX_CHUNK."""
        data, end = self._data, start + MAX_CHUNK
        x = int.from_bytes(data[start:end], 'little')
        equal = (x ^ (x >> 8)).to_bytes(MAX_CHUNK, 'little')    # 0 where a byte equals the next
        found = equal.rfind(bytes(RUN_MIN - 1), 0, MAX_CHUNK - 1)
        if found < 0:
            return end
        run_start = start + equal.translate(NONZERO).rfind(1, 0, found) + 1
        run_end = start + found + RUN_MIN
        if run_start >= start + MIN_CHUNK:
            return run_start
        if start + MIN_CHUNK <= run_end < end:
            return run_end
        return end

    def finish(self):
        chunk = bytes(self._data)
        self._data.clear()
        self._symbols.clear()
        self._forget_searches()
        return chunk


# --- Signatures: what a file holds, span by span, for delta transfers ------

DELTA_MODES = ('fixed', 'cdc')
DELTA_UNIT = 64 << 10           # 'fixed' spans: digests at C speed catch appends and in-place edits
SIGNATURE_SEGMENT = 32 << 20    # a signature is sent, and answered, this many bytes at a time
SIGNATURE_READ = 1 << 20
HASH_THREADS = 4                # threads one file's spans are hashed (and copied) on, at most


def span_digest(data):
    return hashlib.sha256(data).digest()[:SPAN_DIGEST_SIZE]


ZERO_UNIT_DIGEST = span_digest(bytes(DELTA_UNIT))


def is_zero(data):
    return data == bytes(len(data))     # calloc'd, then one memcmp: tens of GB/s


def hash_threads():
    """Threads worth hashing one file with: the cores this process may
    run on, up to HASH_THREADS."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(HASH_THREADS, cores))


class Workers:
    """A few threads for the bulk work of delta transfers, hashing and
    copying file data: hashlib, reads and writes let go of the GIL on large
    buffers, so this work runs on as many cores as there are threads.

    `run(tasks)` runs zero-argument callables, the caller's thread taking
    its share, and returns their results in order (or raises the first
    task's error, once all have ended).  `submit(task)` queues one task
    and returns a Pending; with one background thread (`Workers(1)`) the
    tasks submitted run one at a time, in order.  Threads that cannot be
    started are done without: the work then runs on the caller's thread.
    close() ends the threads once the work queued is done."""

    def __init__(self, threads, name='hash'):
        self._tasks = queue.Queue()
        self._threads = []
        for _ in range(threads):
            try:
                self._threads.append(start_thread(self._serve, name))
            except NoThread:
                break

    @property
    def size(self):
        """Threads that work, the caller's not counted."""
        return len(self._threads)

    def _serve(self):
        while True:
            pending = self._tasks.get()
            if pending is None:
                return
            pending.run()

    def submit(self, task):
        pending = Pending(task)
        if self._threads:
            self._tasks.put(pending)
        else:
            pending.run()
        return pending

    def run(self, tasks):
        pendings = [Pending(task) for task in tasks]
        for pending in pendings[1:] if self._threads else ():
            self._tasks.put(pending)
        for pending in pendings:
            pending.run()               # the caller's share: what no thread took yet
        return [pending.wait() for pending in pendings]

    def close(self):
        for _ in self._threads:
            self._tasks.put(None)
        self._threads = []


class Pending:
    """One task of a Workers: run once, by whichever thread takes it
    first; wait() gives its result or raises its error."""

    def __init__(self, task):
        self._task = task
        self._claimed = False
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._result = self._error = None

    def run(self):
        with self._lock:
            if self._claimed:
                return
            self._claimed = True
        try:
            self._result = self._task()
        except BaseException as e:      # handed to wait(), on the thread that wants the result
            self._error = e
        finally:
            self._done.set()

    def done(self):
        return self._done.is_set()

    def wait(self):
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._result


def content_spans(f, offset, end):
    """Yield content-defined spans (length, digest) of bytes [offset, end)
    of the open file `f` (fewer if the file is shorter)."""
    f.seek(offset)
    chunker = Chunker()
    position = offset
    while True:
        data = f.read(min(SIGNATURE_READ, end - position)) if position < end else b''
        position += len(data)
        for chunk in chunker.feed(data) if data else [chunker.finish()]:
            if chunk:
                yield len(chunk), ZERO_SPAN if is_zero(chunk) else span_digest(chunk)
        if not data:
            return


def file_signature(path, mode, segment=SIGNATURE_SEGMENT, whole=None):
    """Yield the signature of the file at `path` as (offset, spans) pieces,
    each covering about `segment` bytes: spans are (length, digest) in file
    order, ZERO_SPAN for a span of zero bytes.  'fixed' cuts every
    DELTA_UNIT bytes (hashlib releases the GIL: this runs beside a transfer
    at little cost); 'cdc' cuts by content (Chunker), so spans survive
    inserts and deletes that shift the data after them.  In 'fixed' mode a
    hashlib object `whole` is fed the whole file on the way."""
    if mode not in DELTA_MODES:
        raise ValueError(mode)
    with os.fdopen(open_regular(path), 'rb') as f:
        if mode == 'cdc':
            start = end = 0
            spans = []
            for span in content_spans(f, 0, os.fstat(f.fileno()).st_size):
                spans.append(span)
                end += span[0]
                if end - start >= segment:
                    yield start, spans
                    start, spans = end, []
            if spans:
                yield start, spans
            return
        yield from fixed_spans(f, segment - segment % DELTA_UNIT, whole)


def fixed_spans(f, segment, whole):
    """file_signature's 'fixed' pieces of the open file `f`, each
    `segment` bytes (a multiple of DELTA_UNIT).  The units of a segment are
    hashed on hash_threads() threads, while the whole file's digest takes
    the segment before on a thread of its own: so pieces come at the speed
    of the span digests spread over the cores, and the whole digest, which
    cannot be spread, is not on their way.  Two buffers take turns."""
    threads = hash_threads()
    spans_workers = Workers(threads - 1)
    whole_worker = Workers(1 if whole is not None and threads > 1 else 0)
    buffers = [bytearray(segment) for _ in range(2 if whole_worker.size else 1)]
    hashing = [None] * len(buffers)     # each buffer's digest update, while it runs
    shares = spans_workers.size + 1
    try:
        offset = 0
        for turn in itertools.count():
            buffer = buffers[turn % len(buffers)]
            if hashing[turn % len(buffers)] is not None:
                hashing[turn % len(buffers)].wait()
            n = f.readinto(buffer)
            if not n:
                return
            view = memoryview(buffer)[:n]
            if whole is not None:
                hashing[turn % len(buffers)] = whole_worker.submit(functools.partial(whole.update, view))
            units = -(-n // DELTA_UNIT)
            bounds = [units * k // shares * DELTA_UNIT for k in range(shares)] + [n]
            parts = spans_workers.run([functools.partial(unit_spans, view, bounds[k], bounds[k + 1])
                                       for k in range(shares) if bounds[k] < bounds[k + 1]])
            yield offset, [span for part in parts for span in part]
            offset += n
    finally:
        for pending in hashing:
            if pending is not None:
                pending.wait()          # the buffer is ours until the digest is done with it
        spans_workers.close()
        whole_worker.close()


def unit_spans(view, start, end):
    """(length, digest) of each DELTA_UNIT of view[start:end], ZERO_SPAN
    for a unit of zeros: told by its digest, which costs nothing more."""
    spans = []
    for position in range(start, end, DELTA_UNIT):
        unit = view[position:min(end, position + DELTA_UNIT)]
        digest = span_digest(unit)
        if len(unit) == DELTA_UNIT:
            zero = digest == ZERO_UNIT_DIGEST
        else:
            zero = is_zero(bytes(unit))     # a copy compares at memcmp speed, a view does not
        spans.append((len(unit), ZERO_SPAN if zero else digest))
    return spans


# ---------------------------------------------------------------------------
# Delta transfers
# ---------------------------------------------------------------------------
# Sending only what the receiver lacks.  The sender computes a signature of
# the file (SignatureJob, remembered in the cache by SignatureStore and in
# memory by SignatureCache) and sends it piece by piece; the receiver builds
# what it can from bytes it already holds (LocalAssembler) and asks for finer
# spans where fixed ones missed (SpanRefiner answers).  Bytes kept from one
# server are offered only to that server (server_origin).
#
# Apart from a few round trips, a delta's time is local work at both ends,
# all of it hashing and copying: hashlib and file reads and writes let go
# of the GIL, so both ends spread it over threads (Workers), and the one
# thing that cannot be spread, each end's SHA-256 of the whole file, runs
# beside the rest on a thread of its own, fed bytes already in memory.

SIGNATURE_POLL = 0.01           # s between looks for new signature pieces
CONTROL_BACKLOG = 64 << 10      # bytes of signature pieces held beyond what the socket took
SIGNATURE_PIECE_BYTES = 64      # what a piece costs besides its spans (its JSON and frame, about),
                                # as the sender counts what it sent and the receiver what it got
REFINE_MIN = 1 << 20            # bytes a piece's fixed spans must miss before finer spans are asked for
DELTA_MIN_SIZE = 1 << 20        # smaller files are looked for locally only if an older copy exists
DELTA_MAX_MTU = 1500            # largest packet an update uses
MIN_LOCAL_SPAN = MIN_CHUNK      # shorter spans are fetched, never looked for: cheap to send, cheap to guess
COPY_ALIGN = 4096               # a filesystem block: extents are shared in whole ones
MIN_COPY = 16 << 10             # bytes worth sharing; less is read and written
FICLONERANGE = 0x4020940d       # Linux: _IOW(0x94, 13, struct file_clone_range)
FILE_CLONE_RANGE = struct.Struct('=qQQQ')   # source fd, source offset, length, destination offset


def server_origin(host, port, secret):
    """Where data `get` receives comes from, as the cache records it: the
    server's address as the user named it (case, a final dot and IPv6
    spellings normalised) and a fingerprint of the secret (a keyed hash,
    which does not give the secret away).  Data kept from one origin is
    never offered to another: only the server that sent it may ask for it."""
    name = host.strip().lower().rstrip('.')
    if name.startswith('[') and name.endswith(']'):
        name = name[1:-1]
    try:
        name = '[%s]' % socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, name))
    except (OSError, ValueError):
        pass                            # a name or an IPv4 address: as it is
    fingerprint = hmac.new(secret, b'wanxfer cache origin v1', hashlib.sha256).hexdigest()[:16]
    return '%s:%d#%s' % (name, port, fingerprint)


def clone_range(source_fd, source_offset, length, fd, offset):
    """Make bytes [offset, offset + length) of the file `fd` share the
    extents of the source's at `source_offset` (FICLONERANGE: XFS, btrfs
    and others share them; nothing is copied, nothing written).  OSError
    where the filesystem cannot, or the ranges are not whole filesystem
    blocks; never a copy instead (copy_file_range would copy, in the
    kernel, at more CPU than a read and a write)."""
    if fcntl is None or not sys.platform.startswith('linux'):
        raise OSError(errno.EOPNOTSUPP, 'no FICLONERANGE here')
    fcntl.ioctl(fd, FICLONERANGE, FILE_CLONE_RANGE.pack(source_fd, source_offset, length, offset))


def signature_spans(path, mode):
    """The whole signature of a local file as [(offset, length, digest)]."""
    spans = []
    for offset, piece in file_signature(path, mode):
        for length, digest in piece:
            spans.append((offset, length, digest))
            offset += length
    return spans


class SignatureStore:
    """`serve`'s signatures of its files in the cache database, by file
    identity, so that a restarted server does not read an unchanged file
    for its signature again.  Sessions run on threads of their own, so each
    call opens a short-lived connection; a cache that cannot be used costs
    a re-read, never an error."""

    LIMIT = 4096                        # signatures kept; the least recently used go

    def __init__(self, path, log=None):
        self.path = path
        self.log = log or (lambda line: None)
        self._warned = False

    def _run(self, work):
        try:
            db = open_cache_db(self.path, create=True)
        except (WanxferError, sqlite3.DatabaseError) as e:
            if not self._warned:
                self._warned = True
                self.log('warning: cannot keep signatures in %s: %s' % (self.path, e))
            return None
        try:
            return work(db)
        except sqlite3.DatabaseError:
            return None
        finally:
            db.close()

    def load(self, key):
        """(sha256, pieces) stored for `key`, or None."""
        def load(db):
            row = db.execute('SELECT sha256, pieces FROM signatures WHERE file = ?', (key,)).fetchone()
            if row is None:
                return None
            db.execute('UPDATE signatures SET used = ? WHERE file = ?', (time.time(), key))
            try:
                return str(row[0]), [(int(offset), str(spans)) for offset, spans in json.loads(row[1])]
            except (ValueError, TypeError):
                return None             # a damaged row: the file is read again
        return self._run(load)

    def save(self, key, sha256, pieces):
        def save(db):
            db.execute('BEGIN IMMEDIATE')
            db.execute('INSERT OR REPLACE INTO signatures VALUES (?, ?, ?, ?)',
                       (key, sha256, json.dumps(pieces), time.time()))
            db.execute('DELETE FROM signatures WHERE file NOT IN (SELECT file FROM signatures '
                       'ORDER BY used DESC LIMIT ?)', (self.LIMIT,))
            db.execute('COMMIT')
        self._run(save)


class SignatureJob(HelperJob):
    """One file's fixed signature being computed on a thread of its own: a
    session sends each piece (offset, encoded spans) as soon as it is in
    `pieces`; `done` is set at the end, with `error` if reading failed.
    The same read gives the whole file's SHA-256 (`sha256()`), so a delta
    transfer reads the file for hashing once, not twice.  With a `store`
    (SignatureStore) a signature found there is used as it is, and a new
    one is saved there under `key`."""

    def __init__(self, path, store=None, key=None, slots=None, owner=None):
        HelperJob.__init__(self)
        self.path = path
        self.pieces = []
        self._whole = hashlib.sha256()
        self._digest = None
        self.launch(slots, owner, self._run, 'signature', (store, key))

    def _run(self, store, key):
        stored = store.load(key) if store is not None else None
        if stored is not None:
            self._digest, self.pieces = stored
            return
        try:
            pieces = file_signature(self.path, 'fixed', whole=self._whole)
            try:
                for offset, spans in pieces:
                    self.pieces.append((offset, encode_spans(spans)))
                    self.check_stop()
            finally:
                pieces.close()          # its hashing threads end now, not when collected
        except OSError as e:
            self.error = e
        else:
            self._digest = self._whole.hexdigest()
            if store is not None:
                store.save(key, self._digest, self.pieces)

    def sha256(self):
        """The whole file's hex SHA-256, once the signature is complete."""
        self.done.wait()
        if self.error is not None:
            raise RemoteError('cannot read %s: %s' % (self.path, self.error.strerror))
        if self._digest is None:
            raise RemoteError('cannot read %s: the signature thread failed' % self.path)
        return self._digest


class SpanRefiner:
    """Content-defined spans of the byte ranges of one file where the
    client's fixed spans found nothing, cut on a thread of its own (pure
    Python, so only where the client asks) in the order asked; answers
    (offset, encoded spans) appear in `answers`."""

    def __init__(self, path, size):
        self.path, self.size = path, size
        self.answers = []
        self.error = None
        self._requests = queue.Queue()
        self._thread = None
        self._refined_to = 0

    def request(self, offset, end):
        if not 0 <= offset < end <= self.size:
            raise ProtocolError('refine range outside the file')
        # A client asks within one signature piece, pieces in order: so
        # each byte is cut once a fetch, not once a (tiny) request.
        if offset < self._refined_to or end - offset > SIGNATURE_SEGMENT:
            raise ProtocolError('refine range [%d, %d) overlaps one asked before or spans more '
                                'than a signature piece' % (offset, end))
        self._refined_to = end
        if self._thread is None:
            self._thread = start_thread(self._run, 'refine')
        self._requests.put((offset, end))

    def busy(self):
        return self._requests.unfinished_tasks > 0

    def close(self):
        if self._thread is not None:
            self._requests.put(None)

    def _run(self):
        try:
            with os.fdopen(open_regular(self.path), 'rb') as f:
                while True:
                    item = self._requests.get()
                    if item is None:
                        return
                    offset, end = item
                    self.answers.append((offset, encode_spans(list(content_spans(f, offset, end)))))
                    self._requests.task_done()
        except OSError as e:
            self.error = e
        except Exception as e:          # whatever it was, the session must hear of it, not wait
            self.error = OSError(errno.EIO, 'the refine thread failed: %s' % e)


class SignatureCache(SharedJobs):
    """Signatures of served files, remembered by file identity (in memory,
    and in a SignatureStore when the server has one): a file that has not
    changed is read for its signature once, however often it is fetched,
    and concurrent fetches share the work."""

    def __init__(self, store=None, limit=64, slots=None):
        self._store = self.store = store
        self._jobs = collections.OrderedDict()
        self._lock = threading.Lock()
        self._limit = limit
        self._slots = slots

    def start(self, path, owner=None):
        """The signature job of `path`, begun or joined; the caller calls
        release() with it when its fetch ends."""
        identity = file_identity(path)
        with self._lock:
            job = self._jobs.get(identity)
            if job is None or job.error is not None or job.stop.is_set() or \
                    (job.done.is_set() and job._digest is None):
                key = 'fixed:%d:%d:%d:%d:%d' % identity
                job = self._jobs[identity] = SignatureJob(path, self._store, key, self._slots, owner)
                while len(self._jobs) > self._limit:
                    self._jobs.popitem(last=False)
            self._jobs.move_to_end(identity)
            job.users += 1
            return job


def write_back(fd):
    """Write the file's dirty pages to disk now (no error: the fsync that
    proves the file reports those)."""
    try:
        getattr(os, 'fdatasync', os.fsync)(fd)
    except OSError:
        pass


class LocalAssembler:
    """Builds as much of a file as it can from bytes this machine already
    holds, while the server's signature of the file arrives piece by piece.

    The signature comes in fixed spans (DELTA_UNIT bytes each, cheap at both
    ends): each is looked up among the kept files (ChunkStore.find_spans),
    read, checked against its digest and written in place (or, where the
    filesystem can, given the kept file's extents and checked where they
    landed: _copy_span), a piece's spans on hash_threads() threads; spans
    of zeros are left as holes in a new file, so sparse files stay sparse.
    Once a piece is planned, before its spans are read, `on_planned` hears
    which blocks local data is to fill, so the rest can be asked for while
    the disk works; `on_filled` hears the bytes of each span filled.  Where a
    piece's fixed spans find little and an older copy of the file is at hand
    (`refine`), data has probably shifted: `on_piece()` then asks for the
    content-defined spans of that stretch and holds later pieces back until
    they arrive.  It reports the blocks now held and how far the file is
    decided; blocks decided but not held must come from the server.  A kept
    file whose bytes no longer match is forgotten at `close()`, after the
    data phase: a cache write can wait seconds for another process's lock,
    and datagrams do not wait.  Only files kept for `origin` (the server
    sending the signature) are used, and only spans of at least
    MIN_LOCAL_SPAN bytes are looked for."""

    def __init__(self, store, partial, refine=False, *, origin, lead=0):
        self._store, self._partial = store, partial
        self._origin = origin
        self._lead = lead                       # blocks the sender sends unasked
        self._block_size, self._nblocks = partial.block_size, partial.nblocks
        self._size = partial.identity['size']
        self._fresh = partial.resumed_blocks == 0       # unwritten bytes are zeros
        self._copy = self._fresh                    # see _copy_span
        self._refine = refine
        self._waiting = collections.deque()     # pieces behind a refinement
        self._refining = None                   # (offset, spans, start, end) of that piece
        self._sources = {}          # kept file id -> open fd, or None once it failed
        self._workers = None        # the threads spans are filled on, from the first piece
        self._flusher = None        # and the one that has the disk write them
        self._flushing = None       # its Pending, while it does
        self._forgotten = set()     # kept file ids to drop from the cache at close()
        self._run_start = 0         # the bytes from here to `offset` are in place
        self._reported = 0          # blocks before this were reported held or not
        self.offset = 0             # bytes the signature has covered so far
        self.decided = 0            # blocks decided so far
        self.spans = []             # (offset, length, digest), fixed: to keep the file by
        # Called with (block ranges local data is to fill, blocks decided)
        # once a piece is planned, before its spans are read: what no local
        # data fills can be asked for while they are.
        self.on_planned = None
        # Called with (position, bytes) for the bytes of each span filled, checked and written.
        self.on_filled = None
        self.local_bytes = self.zero_bytes = 0
        self.refined_bytes = 0

    def on_piece(self, offset, spans, refined=False):
        """Apply one signature piece: (held block ranges, blocks decided,
        (offset, end) to ask content-defined spans of, or None)."""
        held = []
        if refined:
            if self._refining is None or offset != self._refining[2]:
                raise ProtocolError('a refinement nobody asked for')
            piece_offset, fixed, start, end = self._refining
            self._refining = None
            if sum(length for length, _ in spans) != end - start:
                spans = [(end - start, None)]       # the file changed: fetch the stretch
            self.refined_bytes += end - start
            self._apply(piece_offset, self._splice(piece_offset, fixed, start, end, spans), held)
        else:
            self._waiting.append((offset, spans))
        while self._waiting and self._refining is None:
            offset, spans = self._waiting.popleft()
            if offset != self.offset or offset + sum(length for length, _ in spans) > self._size:
                raise ProtocolError('the signature does not fit the file')
            self.spans.extend(self._positioned(offset, spans))
            known = self._find(spans)
            stretch = self._refine and self._missed(offset, spans, known)
            if stretch:
                self._refining = (offset, spans) + stretch
                return held, self.decided, stretch
            self._apply(offset, spans, held, known)
        return held, self.decided, None

    @staticmethod
    def _positioned(offset, spans):
        for length, digest in spans:
            yield offset, length, digest
            offset += length

    @staticmethod
    def _missed(offset, spans, known):
        """(start, end) around the spans no copy holds, if worth refining."""
        missed = [(position, length) for position, length, digest in
                  LocalAssembler._positioned(offset, spans)
                  if digest != ZERO_SPAN and digest not in known]
        piece = sum(length for length, _ in spans)
        if sum(length for _, length in missed) < min(REFINE_MIN, piece // 4):
            return None                 # an append or a few changed pages: just fetch them
        return missed[0][0], missed[-1][0] + missed[-1][1]

    @staticmethod
    def _splice(offset, fixed, start, end, refined):
        """The piece's fixed spans outside [start, end), `refined` inside."""
        spans = []
        for position, length, digest in LocalAssembler._positioned(offset, fixed):
            if position == start:
                spans.extend(refined)
            if position + length <= start or position >= end:
                spans.append((length, digest))
        return spans

    def _find(self, spans):
        return self._store.find_spans({digest for length, digest in spans if length >= MIN_LOCAL_SPAN
                                       and digest not in (ZERO_SPAN, None)}, self._origin)

    def _apply(self, offset, spans, held, known=None):
        if known is None:
            known = self._find(spans)
        work, position = [], offset
        for length, digest in spans:
            candidates = [c for c in known.get(digest, ()) if c[-1] == length
                          and self._source(*c[:4]) is not None]
            work.append((position, length, digest, candidates))
            position += length
        end = position
        decided = self._nblocks if end >= self._size else end // self._block_size
        kinds = ['zero' if digest == ZERO_SPAN else 'local' if candidates else None
                 for _position, _length, digest, candidates in work]
        planned = self._held_ranges(work, kinds, end)[0]
        if self.on_planned is not None:
            self.on_planned(planned, decided)
        filled = self._fill_all(work, self._clone_bounds(work, planned))
        for file_id in {file_id for _, damaged in filled for file_id in damaged}:
            self._forget(file_id)
        for (_position, length, _digest, _candidates), (kind, _damaged) in zip(work, filled):
            if kind == 'zero':
                self.zero_bytes += length
            elif kind == 'local':
                self.local_bytes += length
        ranges, self._run_start, self._reported = self._held_ranges(
            work, [kind for kind, _damaged in filled], end)
        held.extend(ranges)
        self.offset = end
        self.decided = decided
        if self.local_bytes and end < self._size:
            self._write_back()

    def _write_back(self):
        """Have the disk start on what the pieces so far wrote, on a thread
        of its own, while later pieces are filled: the fsync before the
        file's digest then waits for the last piece's writes, not all."""
        if self._flusher is None:
            self._flusher = Workers(1, 'flush')
        if self._flushing is None or self._flushing.done():
            self._flushing = self._flusher.submit(functools.partial(write_back, self._partial.fd))

    def _held_ranges(self, work, kinds, end):
        """The blocks wholly inside runs of bytes in place, were the spans
        of `work` filled as `kinds` says (None: not filled): (block ranges,
        where the last run starts, blocks reported up to then)."""
        run_start, reported, ranges = self._run_start, self._reported, []
        for (position, length, _digest, _candidates), kind in zip(work, kinds):
            if kind is None:
                reported = self._report(run_start, reported, position, ranges)
                run_start = position + length
        return ranges, run_start, self._report(run_start, reported, end, ranges)

    def _report(self, run_start, reported, end, ranges):
        """Blocks wholly inside the run of bytes in place from `run_start`
        up to `end`, past those `reported`, go to `ranges`; returns how far
        blocks are reported now."""
        first = max(-(-run_start // self._block_size), reported)
        last = self._nblocks if end >= self._size else end // self._block_size
        if last > first:
            ranges.append((first, last))
        return max(reported, last)

    def _clone_bounds(self, work, planned):
        """Per span of `work`, (low, high): its bytes in the blocks local
        data is to fill (`planned`), which the sender is not asked for (see
        _copy_span)."""
        block = self._block_size
        ranges = [(first * block, min(self._size, last * block)) for first, last in planned]
        bounds, i = [], 0
        for position, length, _digest, _candidates in work:
            end = position + length
            while i < len(ranges) and ranges[i][1] <= position:
                i += 1
            if i < len(ranges) and ranges[i][0] < end:
                bounds.append((max(position, ranges[i][0]), min(end, ranges[i][1])))
            else:
                bounds.append((end, end))
        return bounds

    def _fill_all(self, work, clone_bounds):
        """_fill() each span of `work`, the spans shared in runs among the
        Workers' threads (reads, digests and writes all let go of the GIL)."""
        if not work:
            return []
        if self._workers is None:
            self._workers = Workers(hash_threads() - 1)
        items = list(zip(work, clone_bounds))
        shares = min(len(items), self._workers.size + 1)
        bounds = [len(items) * k // shares for k in range(shares + 1)]
        parts = self._workers.run([functools.partial(self._fill_run, items[bounds[k]:bounds[k + 1]])
                                   for k in range(shares)])
        return [result for part in parts for result in part]

    def _fill_run(self, items):
        return [self._fill(*item, clone) for item, clone in items]

    def _fill(self, position, length, digest, candidates, clone):
        """Fill one span from local data if possible (`clone`: the bytes
        of it that may be shared, see _copy_span): (how: 'zero', 'local'
        or None, ids of kept files found damaged)."""
        if digest == ZERO_SPAN:
            if not self._fresh:
                self._partial.write(position, bytes(length))
            return 'zero', ()
        damaged = []
        for file_id, _path, _size, _mtime_ns, offset, _length in candidates:
            fd = self._sources[file_id]
            if self._copy_span(fd, offset, position, length, digest, clone):
                return 'local', damaged
            damaged.append(file_id)
        return None, damaged

    def _read_span(self, fd, offset, position, length, digest):
        """Read the span from `fd` at `offset`, check it, write it in place:
        whether it was right."""
        try:
            data = os.pread(fd, length, offset)
        except OSError:
            data = b''
        if len(data) != length or span_digest(data) != digest:
            return False
        self._partial.write(position, data)
        self._filled(position, data)
        return True

    def _copy_span(self, fd, offset, position, length, digest, clone):
        """Fill the span by sharing the kept file's extents (clone_range:
        no data copied, none written), then check the bytes now in place:
        whether they were right.  Where the filesystem cannot share, this
        and later spans are read and written instead (_read_span).

        A clone lands before its check, so it goes only where no other
        writer can be: into a new partial file (nothing resumed), past the
        lead, and only into blocks that local data is to fill, `clone`
        (low, high) (a block the span shares with a neighbour the sender
        is asked for may be on its way).  Those blocks are not reported
        held, nor asked for, until the piece's checks are done, so bytes
        that fail them are later overwritten by the blocks then asked for.
        The rest of the span is read, checked with what landed and written
        as _read_span does."""
        end = position + length
        low, high = max(clone[0], self._lead * self._block_size), clone[1]
        # Extents are shared in whole filesystem blocks, at the same place in both files.
        low = -(-low // COPY_ALIGN) * COPY_ALIGN
        high = high if high >= self._size else high // COPY_ALIGN * COPY_ALIGN
        if not self._copy or (offset - position) % COPY_ALIGN or high - low < MIN_COPY:
            return self._read_span(fd, offset, position, length, digest)
        source = offset - position              # source offset of a position in the file
        try:
            clone_range(fd, source + low, high - low, self._partial.fd, low)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull('disk full writing %s; the partial data is kept: run the same '
                               'command again to resume' % self._partial.dest)
            self._copy = False                  # not here: read and write
            return self._read_span(fd, offset, position, length, digest)
        try:
            head = os.pread(fd, low - position, offset)
            tail = os.pread(fd, end - high, source + high)
            landed = os.pread(self._partial.fd, high - low, low)
        except OSError:
            return False
        check = hashlib.sha256(head)
        check.update(landed)
        check.update(tail)
        if len(head) + len(landed) + len(tail) != length or \
                check.digest()[:SPAN_DIGEST_SIZE] != digest:
            return False
        self._partial.write(position, head)
        self._partial.write(high, tail)
        for at, data in ((position, head), (low, landed), (high, tail)):
            self._filled(at, data)
        return True

    def _filled(self, position, data):
        if self.on_filled is not None:
            self.on_filled(position, data)

    def _source(self, file_id, path, size, mtime_ns):
        if file_id not in self._sources:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:
                fd = None
            else:
                info = os.fstat(fd)
                if (info.st_size, info.st_mtime_ns) != (size, mtime_ns):
                    os.close(fd)
                    fd = None
            self._sources[file_id] = fd
            if fd is None:
                self._forgotten.add(file_id)
        return self._sources[file_id]

    def _forget(self, file_id):
        fd = self._sources.get(file_id)
        if fd is not None:
            os.close(fd)
        self._sources[file_id] = None
        self._forgotten.add(file_id)

    def close(self):
        if self._flushing is not None:
            self._flushing.wait()       # before the file it syncs can be closed
            self._flushing = None
        for workers in (self._workers, self._flusher):
            if workers is not None:
                workers.close()
        self._workers = self._flusher = None
        for fd in self._sources.values():
            if fd is not None:
                os.close(fd)
        self._sources.clear()
        for file_id in self._forgotten:
            self._store.forget_file(file_id)
        self._forgotten.clear()


# ---------------------------------------------------------------------------
# Rate control
# ---------------------------------------------------------------------------
# How fast the sender may send, learned from the path.
#
# Delay first, loss second, as in FASP and LEDBAT: the receiver measures the
# one-way delay of every data packet against the smallest it has seen, and
# reports the queueing delay.  A growing queue means the bottleneck is full and
# the rate comes down; random loss with a short queue is only loss, and is
# repaired without slowing down.  The controller is a pure state machine: feed
# it feedback and the time, read `rate` (bytes per second).
#
# Everything it learns is a round trip old, and on a long path a round trip is
# a second: whatever rate it sets, it lives with for a second before it hears
# what became of it.  So it never sends much above what the path has shown it
# carries.  It tries more only for short stretches (a few feedback intervals,
# however long the round trip) and waits to hear how the packets of that
# stretch fared: how fast they arrived, how many were lost, how much queue
# they met.  A stretch that overshoots builds at most its own length of queue.
# Each acknowledgement carries the send time of the newest packet it covers,
# so the controller knows which stretch it speaks of, and it judges the path
# again only on news of packets sent after its last decision.


def stall(gap, interval):
    """The part of a gap between acknowledgements in which nothing
    arrived at all: a receiver acknowledges every `interval` if anything
    came, so a longer gap is the path (a busy host) stalled, not slow."""
    return max(0.0, gap - 2 * interval)


class DeliverySlot:
    """What became of the packets sent during one stretch at one rate, from
    the acknowledgements that cover nothing else: how fast they arrived, the
    share lost, and how much the queue grew while they crossed."""

    __slots__ = ('start', 'end', 'sent', 'queue_before', 'queue_peak', 'bytes', 'packets',
                 'lost', 'first', 'last', 'stalled', 'idle')

    def __init__(self, start, sent, queue_before):
        self.start, self.end = start, None
        self.sent = sent                        # bytes/s it was sent at
        self.queue_before = self.queue_peak = queue_before
        self.bytes = self.packets = self.lost = 0
        self.first = self.last = None           # (arrival, send time) where the span begins, ends
        self.stalled = 0.0                      # s of the arrival span in which nothing came
        self.idle = False                       # the sender ran short of data meanwhile

    def add(self, previous, now, sent_at, nbytes, delivered, lost, queue_delay, app_limited,
            interval):
        """One acknowledgement; `previous` is (arrival, send time) of the one before,
        `interval` how far apart acknowledgements come."""
        if previous is None or previous[1] < self.start:
            return
        if self.end is not None and sent_at > self.end:
            if previous[1] <= self.end:
                # The receiver's least queue while the slot's last packets came.
                self.queue_peak = max(self.queue_peak, queue_delay)
            return
        if self.first is None:
            self.first = previous
        self.stalled += stall(now - previous[0], interval)
        self.last = (now, sent_at)
        self.bytes += nbytes
        self.packets += delivered
        self.lost += lost
        self.queue_peak = max(self.queue_peak, queue_delay)
        self.idle = self.idle or app_limited

    def complete(self, sent_at):
        return self.end is not None and sent_at > self.end

    def delivery(self, settled=False):
        """Bytes/s, over the longer of the send and the arrival spans (a
        bunch of acknowledgements arriving together must not look fast), the
        stalls taken out of the arrival span; or None if too little was
        covered to say.

        `settled`: the queue hardly rose while they crossed, so at the
        receiver they arrived over no more than the send span and that
        rise.  An arrival span longer than that is the sender's clock, not
        the path: acknowledgements read late (a busy sender reads them in
        bunches, a worker's pass through the coordinator), or merged from
        several workers whose send times leapfrog.  On the link at 120 ms
        and 10% loss a startup slot read 0.85 of what it asked that way (its
        arrival span 24% longer than its send span, no queue rise) and
        ended the startup at 55 Mbit/s."""
        if self.first is None or self.last is None:
            return None
        sent = self.last[1] - self.first[1]
        arrival = self.last[0] - self.first[0] - self.stalled
        if settled:
            arrival = min(arrival, sent + max(0.0, self.queue_peak - self.queue_before))
        span = max(arrival, sent)
        return self.bytes / span if span > 0 else None

    def loss(self):
        total = self.packets + self.lost
        return self.lost / total if total else 0.0


class RateController:
    """Sending rate from delivery, queueing delay and loss, with a paced
    start, short probes, and a TCP-like share of a contested path.

    It keeps `level`, the rate at which the path delivers this flow's data
    (wire bytes that arrive, per second), and sends at level / (1 - random
    loss): what random loss takes never reached the bottleneck, so sending
    that much more still fills it and no more.  Random loss is learnt where
    no queue can overflow: in the startup while the queue is short, then in
    the return slots below.

    Startup: from INITIAL_RATE, each round trip sends one slot (a stretch
    of a few feedback intervals) at STARTUP_GAIN times the level (EARLY_GAIN
    while that is still a low rate) and the rest at the level.  When the
    news of the slot is in, the level becomes what it delivered if that was
    nearly all it asked for and the queue hardly rose (or most of it, and
    it lost no more than at random: a path queues or drops what it cannot
    carry), and the next slot follows at once; otherwise the slot found
    the bottleneck, whose rate is what it delivered, and startup ends.  The level grows as fast as by
    doubling the whole rate every round trip, but at most a slot's worth of
    queue is ever built beyond the bottleneck.  Where the first round trip
    is long, a rung (the slot the first one's news would open) goes right
    after the first slot, moved by on_tick() before any news comes, and is
    judged next: a round trip saved, a second at 1.2 s.

    Then a cycle: cruise at the level, adding the same small amount every
    round trip (so flows sharing a path converge, as TCP's do); every few
    round trips a probe slot at the 'probe' gain and right after it a return
    slot that takes back the queue the probe built if it found no room.  A
    probe that delivered more raises the level (one that delivered all it
    asked for starts the doubling again).  Whenever the news of packets sent
    since the last decision says the path is over-full (a standing queue,
    or on a queue too short to see, more loss than at random), the level
    becomes what the path passes (measured while the queue stood, when it
    has: a bottleneck with a queue passes exactly its rate; or from how fast
    the queue grew, or from what it dropped, after a sudden drop), and the
    queue built meanwhile drains at the 'drain' gain.

    A queue shorter than twice TARGET_DELAY never shows that much: it
    overflows first.  Where loss comes with the longest queues read and
    much less below them (a drop-tail queue loses only when full; random
    loss, in bursts or not, falls on any queue alike), that queue is the
    path's `queue_limit`: half of it is the target, a probe builds no more
    than that, cruise adds nothing while a queue stands, and one window of
    loss beyond the random loss says over-full.

    Yielding to every queue would leave nothing for wanxfer beside a TCP
    flow, which keeps the bottleneck's queue full whatever others do.  When
    a drain ends and the queue did not shrink, the queue is another flow's:
    the path is contested (twice in a row: once can be our own probe's
    queue still arriving).  Until the queue stays short again (most of
    the time for CONTEST_CLEAR seconds or a round trip, or on a short
    path SHORT_CLEAR_ROUNDS round trips: a TCP flow's backoff empties it
    for a moment, and on a short path hardly at all), the queue no longer
    steers the rate: a share does, as TCP's window does.  It starts at
    FAIR_SHARE of the most the path delivered (alone, with a short queue, within
    CAPACITY_MEMORY seconds, or ever: a contest found in the startup has
    measured little), grows a little every round trip, is cut by
    30% when more is lost than at random, and is sent per round trip (the
    queue slows it as it slows TCP); a contest soon after another goes on
    from the last share.  Two such flows settle near equal shares.  A flow
    of its own making never looks contested: its drains shrink it.

    What the sender sends while it has too little to send (`on_idle()`)
    measures its want of data, not the path: it never lowers the level, and
    a slot it touched proves nothing.  Feed it `on_feedback()` with each
    acknowledgement and `on_idle()` whenever the sender runs out of data;
    read `rate` (bytes/s).
    """

    MIN_RATE = 64 * 1024                    # bytes/s: never stop probing
    INITIAL_RATE = 2 * 1024 * 1024          # 16 Mbit/s before the path is known
    STARTUP_GAIN = 2.0                      # a startup slot's rate, of the level
    NEAR_GAIN = 1.5                         # ... after a slot carried with some of it missing
    EARLY_GAIN, EARLY_RATE = 4.0, 16e6      # ... up to this gain while the slot's rate is below this
    GAINS = types.MappingProxyType({'startup': 1.0, 'cruise': 1.0, 'probe': 1.25, 'return': 0.75,
                                    'drain': 0.85})
    SLOT_INTERVALS = 4                      # feedback intervals in a slot: enough to measure one
    MIN_SLOT = 0.02                         # s
    SLOT_PACKETS = 50                       # a slot holds at least this many (a startup slot of
                                            # fewer than MIN_LOSS_PACKETS / 3 is not judged)
    LONG_ROUND_TRIP = 0.1                   # s: the first slot is judged late rather than tried again
    RUNG_ROUND_TRIP = 0.25                  # s: the first round trip holds a second slot, a rung up
    PASSED = 0.85                           # of what a startup slot asked for: the path carried it,
    QUEUE_RISE = 0.04                       # ... if the queue grew less than this share of the slot
    QUIET_PASSED = 0.7                      # ... or this much, if it lost no more than at random too
    PROBE_PAID = 1.08                       # delivery this much above the level: room left
    NOISE = 0.02                            # a slot's delivery is measured this well
    PROBE_ROUNDS = 3                        # round trips between probes that found nothing
    TARGET_DELAY = 0.012                    # s of standing queue that means the path is full
    MIN_TARGET_DELAY = 0.002                # ... at least, on a path whose queue is short (its limit's half)
    BRIM = 0.5                              # of the deepest queue read: a queue this long is near its limit,
    BRIM_LOSS = 0.01                        # ... which overflows if it loses this much more there, and
    BRIM_PACKETS, BRIM_LOST = 1000, 20      # ... 3 times as much as below it, over this many packets
    BRIM_FADE = 0.998                       # ... fading per acknowledgement (5-10 s of them)
    EXCESS_LOSS = 0.03                      # loss above the random loss that means the same,
    LOSSY_WINDOWS = 3                       # ... in this many windows of LOSS_PACKETS in a row
    SHORT_EXCESS_LOSS = 0.01                # ... or this much in one, where the queue is known short
    MIN_LOSS_PACKETS = 100                  # packets a loss rate needs before it is believed,
    LOSS_PACKETS = 2000                     # ... or before a few percent more says more than chance
    HEAVY_LOSS = 0.20
    UNKNOWN_LOSS = 0.15                     # a first slot's own loss, taken as random
    MAX_COMPENSATION = 0.3                  # the most random loss sent extra for
    MIN_SAMPLE_SPAN = 0.005                 # s of feedback needed for a delivery rate
    CREEP = 0.05                            # of the level, per round trip in cruise at most
    FAIR_SHARE = 0.5
    SHARE_GROWTH = 0.005                    # of the fastest delivery, per round trip
    MIN_SHARE_GROWTH = 187500               # bytes/s per round trip: 1.5 Mbit/s
    CAPACITY_MEMORY = 10.0                  # s a capacity not seen again is believed
    CONTEST_CLEAR, CLEAR_ROUNDS = 0.5, 1    # s, round trips: a queue short for most of the longer
    SHORT_CLEAR_ROUNDS, MIN_CLEAR = 5, 0.1  # ... or of this many round trips if shorter (at least s)
    CLEARED = 0.8                           # ... (this share of it, averaged) ends a contest,
    LOSS_CLEAR = 2.0                        # ... or of this many s and round trips after a loss
    ALONE = 0.9                             # of the fastest delivery: a level above it has the path alone
    MIN_DRAIN = 0.08                        # s: on a short path a drain of one round trip takes back
                                            # 4-5 ms, no more than a busy host's stalls and the readings'
                                            # noise put back, and alone two such read as failed drains

    def __init__(self, max_rate=None, initial_rate=None):
        self.max_rate = max_rate
        self.rate = float(min(initial_rate or self.INITIAL_RATE, max_rate or float('inf')))
        self.level = self.rate                  # bytes/s the path is known to deliver
        self.phase = 'startup'
        self._ramped = False                    # the first startup has ended
        self._doubted = False                   # the startup slot being judged is one tried again
        self._near = False                      # ... the last one was carried, short of all it asked
        self._phase_ends = 0.0                  # when a timed phase (probe, return, drain) is over
        self._gain = 1.0                        # of the probe or return being sent
        self._crept = 0.0                       # when cruise last added to the level
        self._idle_at = float('-inf')           # when the sender last had nothing to send
        self._unseen_queue = False              # the path was last found full by its loss
        self._changed = float('-inf')           # news of packets sent before this is stale
        self._news = DeliverySlot(0.0, 0.0, 0.0)    # what became of packets sent since
        self._loss_news = [0, 0]                # ... packets delivered, lost in this window of them
        self._lossy_windows = 0                 # ... windows in a row with excess loss
        self._queued = collections.deque()      # (arrival, send time, bytes) while a queue stood
        self._recent_queue = collections.deque(maxlen=3)    # the queue in the last few acknowledgements
        self._slot = None                       # the slot being sent or waited for
        self._first_slot = None                 # on_start()'s, until judged: sent until the first news
        self._tentative = None                  # ... judged on what followed that news
        self._first_news = None                 # ... which came then
        self._rung = None                       # ... the slot sent right after it, judged next
        self._rung_base = 0.0                   # ... and the rate sent before and after the rung
        self._judging_rung = False              # the startup slot being judged is that rung
        self._return = None                     # the return slot after a probe
        self._next_probe = 0.0
        self._probe_wait = 1.0                  # of PROBE_ROUNDS round trips between probes
        self._quiet = (0.0, 0.0)                # send times of a probe and its return
        self._interval = 0.01                   # s between acknowledgements, smoothed
        self._packet_bytes = 1500.0             # bytes per packet delivered, smoothed
        self._last_ack = None                   # (time, send time) of the last acknowledgement
        self._samples = collections.deque()     # (time, bytes delivered, packets delivered, lost)
        self.peak_delivery = 0.0                # the fastest the path has delivered so far
        self.random_loss = None                 # loss that is not the bottleneck's
        self._clean = [0.0, 0.0]                # packets delivered, lost where no queue overflowed
        self._returns_counted = False
        self.contested = False                  # another flow holds the bottleneck's queue
        self._share = 0.0                       # the rate while contested
        self._share_step = self._share_cut = 0.0
        self._share_cut_since = False           # ... cut for loss since this contest began
        self._contest_ended = float('-inf')     # a contest soon after goes on from its share
        self._contest_began = float('-inf')
        self._no_doubling_until = float('-inf')  # ... and a probe finds room in steps until then
        self._capacity = collections.deque()    # (time, delivery with a short queue), falling
        self._drain_queue = None                # the queue when the last drain began
        self._drained = 0.0                     # s of queue that drain should have removed
        self._failed_drains = 0                 # drains in a row that left the queue as it was
        self._short, self._short_at = 0.0, None  # how much of late the queue was short, as of when
        self._rtt = self._least_rtt = float('inf')  # s: the round trip now, and the least seen
        self._deepest = 0.0                     # s: the longest queue read
        self._brim = [0.0, 0.0, 0.0, 0.0]       # packets delivered, lost near it; delivered, lost below
        self.queue_limit = None                 # s of queue the path holds, where it is found short

    @property
    def startup(self):
        return self.phase == 'startup'

    @property
    def steady(self):
        """Not in a startup: the rate's slots are no longer doubling, and
        acknowledgements of a striped file may come less often (see
        stretched_feedback)."""
        return self.phase != 'startup'

    @property
    def ramped(self):
        """The first startup has ended: peak_delivery is the path's, not the ramp's."""
        return self._ramped

    def set_cap(self, max_rate):
        self.max_rate = max_rate
        if max_rate:
            self.rate = min(self.rate, max_rate)

    # --- what the acknowledgements say -----------------------------------

    def _measure(self, now, delivered_bytes, delivered, lost, rtt):
        """(delivery rate in bytes/s or None, loss fraction) over about one round trip."""
        samples = self._samples
        samples.append((now, delivered_bytes, delivered, lost))
        horizon = max(rtt, 0.02)
        while len(samples) > 2 and now - samples[1][0] >= horizon:
            samples.popleft()
        span = now - samples[0][0]
        later = list(samples)[1:]
        got = sum(s[2] for s in later)
        missed = sum(s[3] for s in later)
        loss = missed / (got + missed) if got + missed else 0.0
        if span < self.MIN_SAMPLE_SPAN:
            return None, loss
        return sum(s[1] for s in later) / span, loss

    def _compensation(self):
        return min(self.random_loss or 0.0, self.MAX_COMPENSATION)

    def _learn_loss(self, delivered, lost, queue_delay, sent_at):
        """The random loss, from packets no queue can have overflowed:
        those that met a short queue outside any slot, until return slots
        (below the level) say it better."""
        if self._returns_counted or self.contested or queue_delay > self._target_delay() / 2 or \
                (self._slot is not None and sent_at >= self._slot.start):
            return
        self._count_clean(delivered, lost)

    def _learn_limit(self, queue_delay, delivered, lost):
        """Where the path's queue overflows, if it is short: a drop-tail
        queue loses packets only when it is full, so loss that comes with
        the longest queues read, and much less below them, is the queue's
        limit (random loss falls on any queue alike, bursts of it too).
        The deepest queue read fades as the counts do: one reading a busy
        host held up must not put the brim out of reach for good.  A queue
        that stands well beyond the limit later (through the last few
        acknowledgements, not one) says it was wrong, or the path changed:
        it is learnt again."""
        if self.queue_limit is not None and \
                min(self._recent_queue) > 1.5 * self.queue_limit + self.MIN_TARGET_DELAY:
            self.queue_limit = None
            self._brim = [0.0, 0.0, 0.0, 0.0]
        self._deepest = max(self._deepest * self.BRIM_FADE, queue_delay)
        counts = self._brim
        for i in range(4):
            counts[i] *= self.BRIM_FADE
        near = 0 if queue_delay >= self.BRIM * self._deepest > 0 else 2
        counts[near] += delivered
        counts[near + 1] += lost
        brim, below = counts[0] + counts[1], counts[2] + counts[3]
        if brim < self.BRIM_PACKETS or counts[1] < self.BRIM_LOST:
            return
        below_loss = counts[3] / below if below else 0.0
        if counts[1] / brim > 3 * below_loss + self.BRIM_LOSS:
            if self.queue_limit is None and not self._returns_counted and \
                    self._deepest < 2 * self.TARGET_DELAY:
                # Packets that met less than TARGET_DELAY / 2 of queue were
                # counted as met by no overflow, which a queue this short
                # belies: what was lost at its brim was no random loss
                # (with bursts of it too, at 120 ms the overflows of the
                # startup read as 5% random loss where it was 2%, and the
                # rate sent extra for it overflowed the queue again).
                self._clean = [0.0, 0.0]
                self.random_loss = None
                self._count_clean(counts[2], counts[3])
            self.queue_limit = self._deepest

    def _target_delay(self):
        """The standing queue that says the path is full: TARGET_DELAY, or
        on a path whose queue is shorter than twice that, half of it (a
        target it cannot reach left the rate above the path's, and the
        queue overflowing again and again: 2,586 drops in 86 MiB at 5 ms).
        (The contest's tests keep TARGET_DELAY: a busy host's stalls put
        back more than a drain takes.)"""
        if not self._short_queue():
            return self.TARGET_DELAY
        return max(self.MIN_TARGET_DELAY, self.queue_limit / 2)

    def _short_queue(self):
        return self.queue_limit is not None and self.queue_limit < 2 * self.TARGET_DELAY

    def _probe_gain(self, rtt):
        """The probe's gain: GAINS['probe'], or less where the path's queue
        is short, so that a probe finding no room builds no more than half
        of it (a probe of 1.25 for 40 ms at 120 ms builds 10 ms: at 5 ms
        each overflowed 150-260 packets)."""
        gain = self.GAINS['probe']
        if self._short_queue():
            gain = min(gain, 1.0 + max(self.NOISE, self.queue_limit / 2 / self._slot_length(rtt)))
        return gain

    def _count_clean(self, delivered, lost, fade=1.0):
        counts = self._clean
        counts[0] = counts[0] * fade + delivered
        counts[1] = counts[1] * fade + lost
        if counts[0] + counts[1] >= self.MIN_LOSS_PACKETS:
            self.random_loss = counts[1] / (counts[0] + counts[1])

    def _count_lossy(self, delivered, lost):
        """Windows of LOSS_PACKETS fresh packets in a row with more loss than
        at random: LOSSY_WINDOWS of them, and the loss is the bottleneck's
        (a queue too short to show, overflowing); one or two can be
        clusters of random bursts."""
        counts = self._loss_news
        counts[0] += delivered
        counts[1] += lost
        if counts[0] + counts[1] >= self.LOSS_PACKETS:
            lossy = self._excess_loss(counts[1] / (counts[0] + counts[1]))
            self._lossy_windows = self._lossy_windows + 1 if lossy else 0
            self._loss_news = [0, 0]

    def _excess_loss(self, loss):
        random_loss = self.random_loss or 0.0
        margin = self.SHORT_EXCESS_LOSS if self._short_queue() else self.EXCESS_LOSS
        return loss > random_loss + max(margin, random_loss)

    def _overflowing(self):
        """Loss has said the bottleneck is over-full: in LOSSY_WINDOWS
        windows in a row, or in one where the queue is known to be short
        (loss that comes with its longest queues: the queue's own, not a
        cluster of random bursts, and each window of it is a queue's worth
        or more of drops)."""
        return self._lossy_windows >= (1 if self._short_queue() else self.LOSSY_WINDOWS)

    def _slot_length(self, rtt):
        """Long enough to measure (several acknowledgements), short enough
        that an overshoot queues little; never longer than a round trip,
        unless the packets it would hold at the rate sent are too few to
        judge (large blocks at a low rate: loopback's 64 KiB blocks at
        INITIAL_RATE are 30 a second).  Counted in packets, what that
        overshoot can queue stays small."""
        length = max(self.MIN_SLOT, min(self.SLOT_INTERVALS * self._interval, max(rtt, self.MIN_SLOT)))
        return max(length, self.SLOT_PACKETS * self._packet_bytes / max(self.rate, self.MIN_RATE))

    # --- the state machine ----------------------------------------------

    def on_feedback(self, now, queue_delay, delivered_bytes, delivered, lost, rtt, app_limited=False,
                    sent_at=None, ack_delay=0.0):
        """One acknowledgement's worth of news.  `sent_at`: when the newest
        packet it covers was sent (else taken as a round trip ago);
        `ack_delay`: how long the receiver held it before acknowledging.
        `app_limited`: the sender ran out of data to send within the last
        round trip (between files, or waiting for the receiver's requests),
        so the delivery rate says how much there was to send, not what the
        path carries."""
        if sent_at is None:
            sent_at = now - rtt
        if rtt > 0:
            self._rtt, self._least_rtt = rtt, min(self._least_rtt, rtt)
        delivery, loss = self._measure(now, delivered_bytes, delivered, lost, rtt)
        if delivered > 0:
            self._packet_bytes += (delivered_bytes / delivered - self._packet_bytes) * 0.2
        self.peak_delivery = max(self.peak_delivery, delivery or 0.0)
        # Spans of arrival are measured by when the packets arrived, so a
        # receiver late to acknowledge does not make them look slow.
        arrived = now - max(0.0, min(ack_delay, rtt))
        previous = self._last_ack
        if previous is not None:
            sent_at = max(sent_at, previous[1])     # an old acknowledgement, overtaken
            arrived = max(arrived, previous[0])
        self._last_ack = (arrived, sent_at)
        if previous is not None and arrived > previous[0]:
            self._interval += (min(arrived - previous[0], 0.1) - self._interval) * 0.1
        if now - self._news.start > 4 * max(rtt, 0.05) and self._news.start >= self._changed:
            self._news = DeliverySlot(now, 0.0, 0.0)    # recent news, not all since
        self._note_queue(arrived, sent_at, delivered_bytes, queue_delay, rtt)
        for slot in (self._slot, self._return, self._news, self._rung):
            if slot is not None:
                slot.add(previous, arrived, sent_at, delivered_bytes, delivered, lost, queue_delay,
                         app_limited, self._interval)
        self._learn_limit(queue_delay, delivered, lost)
        self._learn_loss(delivered, lost, queue_delay, sent_at)
        capacity = self._watch_path(now, delivery, queue_delay, loss, rtt)
        round_trip = max(rtt, 0.01)
        if app_limited:
            self.on_idle(now)
            if delivery:
                self.level = max(self.level, delivery)
        # A probe's packets are judged by the probe, unless the queue they
        # meet is far more than a probe builds.
        probed = self._quiet[0] <= sent_at <= self._quiet[1]
        fresh = sent_at >= self._changed and not app_limited and \
            (not probed or queue_delay > 3 * self.TARGET_DELAY)
        if fresh:
            self._count_lossy(delivered, lost)
        news = self._news
        if fresh and self.phase != 'startup' and news.packets + news.lost >= self.MIN_LOSS_PACKETS \
                and news.loss() > self.HEAVY_LOSS + (self.random_loss or 0.0):
            # Heavy loss at the rate we send: the path itself got slower
            # (a policer), whatever holds its queue.
            self.contested = False
            self._capacity.clear()
            self._set_level(min(self.level, self._delivered(delivery)) * 0.9, now)
            self._drain(now, queue_delay, round_trip)
        elif self.contested:
            self._adjust_share(now, loss, round_trip)
        elif self.phase == 'startup':
            self._startup(now, sent_at, queue_delay, delivery, rtt)
        else:
            self._cycle(now, sent_at, queue_delay, delivery, loss, fresh, capacity, rtt)
        self._update_rate()

    def on_start(self, now, rtt):
        """The sender starts sending a file (`rtt` as the session knows it).
        Before any acknowledgement, the first startup slot goes at once, not
        a round trip later with the first one: on a short transfer that
        round trip at INITIAL_RATE is a good part of the whole.  At
        STARTUP_GAIN only: no news yet says the path carries even
        INITIAL_RATE, and nothing turns the rate down before the first
        acknowledgement, so this rate lasts a round trip; but the slot is
        judged on its first slot length, so the next one follows a slot and
        a round trip from now.  On a round trip of LONG_ROUND_TRIP or more,
        if the first acknowledgement covers all of that, it is judged on the
        two slot lengths after it instead; until then the sender's running
        dry starts it again.  (Again for the next file if none
        came: the last one's packets may all have been too large for the
        path.)"""
        if self.phase == 'startup' and self._last_ack is None:
            slot = self._slot = self._open_slot(now, self.STARTUP_GAIN, 0.0)
            self._update_rate()
            length = self._slot_length(rtt)
            slot.end = now + length
            # Waiting for its news is worth it where a round trip is longer
            # than two slots (checked again when the news comes: the
            # handshake's round trip is an overestimate, 0.19-0.33 s at
            # 0.12 s): at 120 ms it came 0.1 s after the first news, where
            # a slot tried again was judged 0.2 s after it.  On a short
            # path, a slot tried again at once is judged as soon.
            self._first_slot = slot if rtt >= self.LONG_ROUND_TRIP else None
            self._rung = None
            if rtt >= self.RUNG_ROUND_TRIP and self.rate < (self.max_rate or float('inf')):
                # A first round trip a quarter of a second or longer is
                # news of one slot only, and then one rung a round trip,
                # each a second at 1.2 s: the rung that the first slot's
                # news would open goes right after it (on_tick), and is
                # judged on the news that follows (on a 1.2 s path the
                # link was reached a round trip sooner).  It puts no more
                # beyond a slow path than that next slot would have.
                self._rung_base = slot.sent
                self._rung = self._open_slot(slot.end, slot.sent / self.level * self._startup_gain(slot.sent),
                                             0.0)
                self._rung.end = slot.end + length

    def on_tick(self, now):
        """The sender is about to send: the first round trip's rung (see
        on_start) goes when its time comes, for its slot length.  Before
        the first acknowledgement, nothing else moves the rate."""
        rung = self._rung
        if rung is None or self._last_ack is not None:
            return
        self.rate = rung.sent if rung.start <= now < rung.end else self._rung_base

    def on_idle(self, now):
        """The sender has nothing to send now (between files, or waiting for
        the receiver's requests).  What it sends meanwhile measures its want
        of data, not the path: a startup slot being sent starts again when
        sending does (a short file may never let one finish: it is sent at
        the slot's rate anyway), a probe is given up, and the delivery since
        the last decision cannot lower the level."""
        self._idle_at = now
        slot = self._slot
        if slot is not None and slot is self._first_slot and self._last_ack is None:
            if now > slot.start:                # (its rate lasts until the first news)
                slot.start, slot.end = now, now + (slot.end - slot.start)
                rung = self._rung
                if rung is not None:            # ... and the rung goes after it
                    rung.start, rung.end = slot.end, slot.end + (rung.end - rung.start)
                    self.rate = self._rung_base
        elif slot is not None and slot.end is None and now > slot.start:
            if self.phase == 'probe':
                slot.idle = True
                slot.end = now
                self._quiet = (self._quiet[0], now)
                self._enter('cruise', now)
            else:
                slot.start = now
        if now >= self._news.start:
            self._news.idle = True

    def on_busy(self, now):
        """The sender has data to send again (after on_idle()): nothing
        to one flow, whose rate is all its own."""

    def _note_queue(self, arrived, sent_at, nbytes, queue_delay, rtt):
        """Keep the last round trip of acknowledgements that came while a
        queue stood before the bottleneck, and the last few queues."""
        self._recent_queue.append(queue_delay)
        queued = self._queued
        if queue_delay < self._target_delay() / 4 or sent_at <= self._idle_at:
            queued.clear()                      # (the sender's pauses are not the path's)
            return
        queued.append((arrived, sent_at, nbytes))
        while len(queued) > 2 and arrived - queued[1][0] >= max(rtt, 4 * self._interval):
            queued.popleft()

    def _queued_delivery(self):
        """What the bottleneck passed while a queue stood before it, which
        is all it can pass: the median of the rates at which the
        acknowledgements came (by arrival alone: with a queue between, the
        sending's pace does not show; and a moment the path stalled, a busy
        host, spoils one or two of them, not the median); None if the queue
        has not stood long enough."""
        queued = list(self._queued)
        if len(queued) < 5 or queued[-1][0] - queued[0][0] < 3 * self._interval:
            return None
        rates = sorted(b[2] / (b[0] - a[0]) for a, b in zip(queued, queued[1:]) if b[0] > a[0])
        return rates[len(rates) // 2] if rates else None

    def _samples_packets(self):
        return sum(s[2] + s[3] for s in list(self._samples)[1:])

    def _delivered(self, delivery):
        """What the path delivers, as measured while a queue stood before
        the bottleneck (which then passes exactly its rate); the level if
        that is not known yet (the queue will still stand after the drain if
        the level is too high)."""
        return self._queued_delivery() or self.level

    def _startup(self, now, sent_at, queue_delay, delivery, rtt):
        slot = self._slot
        if slot is None and min(self._recent_queue) > self._target_delay() and sent_at >= self._changed:
            # Even the level fills the path (slower than INITIAL_RATE): a
            # queue through the last few acknowledgements, not one reading
            # (a busy receiver read late once, 12.1 ms, and the startup
            # ended at INITIAL_RATE on a 1 Gbit/s link).
            self.level = max(self.MIN_RATE, min(self.level, self._delivered(delivery)))
            self._end_startup(now)
            self._drain(now, queue_delay, max(rtt, 0.01))
        elif slot is None:
            self._slot = self._open_slot(now, self._startup_gain(), queue_delay)
        elif slot.end is None:
            if now - slot.start >= self._slot_length(rtt):
                slot.end = now
        elif slot.complete(sent_at):
            got = slot.delivery()
            few = not got or slot.packets + slot.lost < self.MIN_LOSS_PACKETS / 3
            later = 2 * self._slot_length(rtt)
            if slot is self._first_slot and slot is not self._tentative and not slot.idle and few \
                    and later <= rtt:
                # The first acknowledgement covered the whole first slot (a
                # receiver starting up acknowledges late).  Its rate lasted
                # until that news came, a round trip: what was sent a few
                # slots after it is the same slot, judged on the next news.
                rung, self._rung = self._rung, None
                if rung is not None and not rung.idle and sent_at <= (rung.start + rung.end) / 2:
                    # The rung, sent right after it, is what follows that
                    # news: it says more than the first slot's rate would
                    # (at 5% loss the first acknowledgement came late in
                    # two runs of three at 1.2 s, and the rung was lost).
                    # Not if that news covered most of it: too little is
                    # left to judge, and trying again from the level cost
                    # more than judging the first slot late.
                    self._slot, self._first_slot = rung, None
                    self._judging_rung = True
                    self._startup(now, sent_at, queue_delay, None, rtt)
                    return
                self._tentative = slot
                self._first_news = now
                slot.end = max(slot.end, min(now, sent_at + later))
                return
            if slot is self._tentative and not slot.idle and few and sent_at + later <= self._first_news:
                # The next news covered all that too, and more: a receiver
                # that held its acknowledgements (waiting for the file's
                # `start` on a lossy path: 1.4 s of sending in two of them
                # at 1.2 s) releases them in a lump.  What followed was still
                # sent at the slot's rate, before its first news came.
                slot.end = sent_at + later
                return
            tentative = slot is self._first_slot
            rung, self._rung = self._rung, None
            was_rung, self._judging_rung = self._judging_rung, False
            self._slot = self._first_slot = self._tentative = None
            if slot.idle or few:
                return                          # proves nothing: try again
            length = slot.end - slot.start
            rise = max(0.0, slot.queue_peak - slot.queue_before)
            target = self._target(slot)
            # A slot tried again (below) began over the queue the first
            # one left: only all it asked for says it was carried.
            quiet = rise < self.QUEUE_RISE * length and not self._doubted
            # (Below, what the first startup gives a slot read short with no
            # queue rise: one that a probe starts again, beside a flow that
            # may be growing into the path, keeps the stricter reading.)
            first = not self._ramped
            if quiet and first:
                if self.random_loss is None:
                    # The first slot holds all that was sent: no random loss
                    # is known yet.  Its own is, up to UNKNOWN_LOSS (a
                    # bottleneck without a queue loses more): else at 10%
                    # the slot read 0.80-0.90 of its rate, and half the
                    # time the level stayed where it began for one more
                    # slot, a fifth of a second at 120 ms.
                    target = slot.sent * (1.0 - min(slot.loss(), self.UNKNOWN_LOSS))
                if got < self.PASSED * target:
                    # No queue rise and yet too slow: the sender's clock, or
                    # a bottleneck without a queue (which loses the rest).
                    got = slot.delivery(settled=True)
            # Nearly all it asked for and no queue worth the name, or all
            # of it whatever the queue did (a stall of a busy host): carried.
            # (Not its loss: a cluster of random loss can fall in one slot,
            # and a queue that overflowed shows as less delivered.)
            carried = got >= self.PASSED * target and quiet or got >= (1.0 - self.NOISE) * target
            expected = self.UNKNOWN_LOSS if self.random_loss is None else self.random_loss
            if not carried and quiet and first and got >= self.QUIET_PASSED * target and \
                    slot.loss() <= expected + self.EXCESS_LOSS:
                # What a path cannot carry it queues or drops: with neither,
                # a slot read short was mismeasured (workers of uneven shares
                # merged: the small one's news comes in lumps, and one slot
                # in ten at 10% loss read 0.75-0.85 of its rate).  Not far
                # short: a sender that cannot send faster (its CPU) delivers
                # about the level, half what a slot asks.
                carried = True
            if carried:
                self._doubted = False
                # Carried with a few percent missing (and the queue's rise
                # read short, as the least delay of each acknowledgement's
                # interval): it may have met the bottleneck itself.  A slot
                # of twice that then builds a whole slot of queue, and over
                # the 50 ms queue (in the model at 600 ms and 5% loss 324
                # drops, at 1.2 s and 10% 361); half as much above it does not.
                # (Where the round trip is long: on shorter ones a stall of
                # the host reads the same, and the steps of 1.5 overflowed
                # the queue more, not less, at 1 Gbit/s and 120 ms.)
                self._near = got < (1.0 - self.NOISE) * target and rtt >= self.RUNG_ROUND_TRIP
                self.level = max(self.level, min(got, target))
                if self.max_rate and self.level >= self.PASSED * self.max_rate:
                    self._end_startup(now)      # held by the cap, not by the path
                    return
                if rung is not None and tentative and not rung.idle and rung.sent > self.level:
                    # The first round trip's rung is judged next, as a slot
                    # opened now would be a round trip from now.
                    self._slot = rung
                    self._judging_rung = True
                self._startup(now, sent_at, queue_delay, None, rtt)
                return
            if was_rung and quiet:
                # Read short with no queue rise, in a first round trip whose
                # news comes in lumps (three workers' merged, and their
                # batches few: one rung read 70 Mbit/s on a path of 200):
                # not enough to end the startup on.  The slot that would
                # have gone without it goes now.
                self._startup(now, sent_at, queue_delay, None, rtt)
                return
            if tentative:
                # Sent where sending starts again, while the sender may still
                # be short of data (a delta transfer's first requests trickle
                # in), which on_idle() does not see: it says what the path
                # carries, not what it does not.
                return
            if not self._doubted and got >= self.PASSED * target and \
                    slot.loss() <= expected + self.EXCESS_LOSS:
                # Nearly all of it came, lost no more than at random, yet the
                # queue rose: a bottleneck just below the slot's rate, or a
                # busy host's moment (a receiver that read 3-11 ms late, on
                # the link at 1 Gbit/s, 120 ms and 1% loss, ended startups
                # at 57-111 Mbit/s, and probes took 1-10 s to find the rest).
                # One more slot at the same rate tells them apart: a stall
                # passes, a bottleneck again delivers less than all of it,
                # and queues no more than this one did.
                self._doubted = True
                self._slot = self._open_slot(now, slot.sent * (1.0 - self._compensation()) / self.level,
                                             queue_delay)
                return
            # The slot found the bottleneck, which passed `got` while the
            # slot queued at it (the queue's rise says the same, from the
            # receiver's clock); since then the lower rate has been taking
            # the queue back.
            sent_after = self.level
            self.level = max(self.level, min(got, target * length / (length + rise)))
            built = max(rise, length * (target / got - 1.0))
            left = built - (now - slot.end) * max(0.0, 1.0 - sent_after / self.level)
            self._end_startup(now)
            if left > 0:
                self._drain_for(now, left, rtt)

    def _startup_gain(self, level=None):
        """Double, or quadruple while the rate is low: what a slot sends
        beyond the bottleneck is then only a few hundred packets."""
        if self._near:
            return self.NEAR_GAIN
        return max(self.STARTUP_GAIN, min(self.EARLY_GAIN, self.EARLY_RATE / (level or self.level)))

    def _end_startup(self, now):
        self.phase = 'cruise'
        self._rung = None
        self._near = False
        self._doubted = False
        self._ramped = True
        self._decided(now)
        self._next_probe = now

    def _open_slot(self, now, gain, queue_delay):
        """A slot at `gain` times the level, as fast as the cap allows; it
        records the rate it is sent at."""
        rate = self.level * gain / (1.0 - self._compensation())
        if self.max_rate:
            rate = min(rate, self.max_rate)
        return DeliverySlot(now, rate, queue_delay)

    def _target(self, slot):
        """What a slot would have delivered had the path carried it all:
        its rate less the random loss, as now known."""
        return slot.sent * (1.0 - self._compensation())

    def _cycle(self, now, sent_at, queue_delay, delivery, loss, fresh, capacity, rtt):
        round_trip = max(rtt, 0.01)
        self._judge_slots(now, sent_at, queue_delay, rtt)
        if self.phase == 'drain' and now >= self._phase_ends:
            self._enter('cruise', now)
            self._decided(now)
        if self.phase == 'probe' and now >= self._phase_ends and self._slot is not None:
            self._slot.end = now
            self._gain = 2.0 - self._gain       # takes back what the probe added
            self._return = self._open_slot(now, self._gain, queue_delay)
            self._enter('return', now, now + self._slot_length(rtt))
        elif self.phase == 'return' and now >= self._phase_ends and self._return is not None:
            self._return.end = now
            self._enter('cruise', now)
            self._quiet = (self._quiet[0], now)
            self._news = DeliverySlot(now, 0.0, 0.0)    # the probe's loss is its own
        if self.phase != 'cruise':
            return
        # Every flow gains the same few bytes/s each round trip in cruise
        # (less on short round trips and at low rates), and a full path
        # takes from each in proportion: flows that share it converge on
        # equal shares, as TCP's do.  Not where the queue is too short to
        # show: only loss says it is full, and late.  Nor while a queue
        # already stands: the path is full, and what a flow sends beyond it
        # only deepens the queue until the news of it comes, a round trip
        # late (from 200 to 209 Mbit/s at 120 ms, 18-22 ms of queue).
        if now - self._crept >= round_trip:
            if not self._unseen_queue and now - self._idle_at > round_trip and \
                    min(self._recent_queue) < self._target_delay() / 2:
                self.level += min(self.MIN_SHARE_GROWTH, self.CREEP * self.level) * min(1.0, round_trip / 0.1)
            self._crept = now
        if not fresh:
            return
        if self._drain_queue is not None:
            # The news of the drain's end: did the queue (through the last
            # few acknowledgements: not one that met a moment's burst)
            # shrink as our drain alone would shrink it?  Twice not, and it
            # is another flow's, however long it read (the receivers may
            # have learnt the path's delay under it: it then reads short).
            unrelieved = min(self._recent_queue) > max(self.TARGET_DELAY / 2,
                                                       self._drain_queue - self._drained / 2)
            self._failed_drains = self._failed_drains + 1 if unrelieved else 0
            self._drain_queue = None
            # Not while the level is still about the most the path ever
            # delivered: beside another flow it has been squeezed below
            # that, and a flow alone whose drains failed has a level a
            # little too high (a busy host stalling the path), which the
            # drains then bring down.
            if self._failed_drains >= 2 and self.level < self.ALONE * self.peak_delivery:
                self.contested = True
                self._contest_began = now
                self._share_cut_since = False
                if now - self._contest_ended > self.CAPACITY_MEMORY:
                    self._share = self.FAIR_SHARE * max(capacity, self.level, self.peak_delivery)
                self._share_step = now
                return
        # A queue that stood through the last few acknowledgements, not a
        # moment's delay (a busy host holds packets up as a queue would).
        standing = min(self._recent_queue)
        if standing > self.TARGET_DELAY and now < self._no_doubling_until and \
                self.level < self.ALONE * self.peak_delivery:
            # Soon after a contest a queue that stands is the other flow's
            # again: back to the share at once, as before the level's jump
            # to the path's capacity at the contest's end brought it back
            # (by overflowing the queue).  In cruise beside a flow that holds
            # a queue, the probes take from it and the drains half relieve.
            self.contested = True
            self._contest_began = now
            self._share_cut_since = False
            self._share_step = now
            return
        target = self._target_delay()
        if standing > target or self._overflowing():
            self._unseen_queue = standing <= target
            # Over-full: a bottleneck with a queue delivers exactly its rate.
            # What reached it was the rate less the loss measured, not the
            # loss assumed: with a queue too short to overflow, less loss
            # than assumed means the random loss is less, and was sent
            # extra for in vain.
            if queue_delay <= self.TARGET_DELAY * 4 and self.random_loss and loss < self.random_loss \
                    and self._samples_packets() >= self.LOSS_PACKETS:
                self.random_loss = (self.random_loss + loss) / 2
            # The news is of packets sent in cruise, at the level; the
            # random loss took its share before the queue.
            random_loss = self.random_loss or 0.0
            arrived = self.level / (1.0 - self._compensation()) * (1.0 - min(loss, random_loss))
            passing = float('inf')
            overflow = (loss - random_loss) / (1.0 - random_loss)
            if overflow > self.EXCESS_LOSS and self._samples_packets() >= self.LOSS_PACKETS:
                # What a full queue dropped was sent beyond what it passes.
                passing = arrived * (1.0 - overflow)
            self._set_level(min(self.level, self._delivered(delivery), passing), now)
            # The queue grew for a round trip more than the news shows.
            built = queue_delay + max(0.0, arrived / self.level - 1.0) * round_trip
            self._drain(now, queue_delay, round_trip, built)
        elif now >= self._next_probe and self._slot is None and self._return is None:
            self._gain = self._probe_gain(rtt)
            self._slot = self._open_slot(now, self._gain, queue_delay)
            self._enter('probe', now, now + self._slot_length(rtt))
            self._quiet = (now, float('inf'))

    def _judge_slots(self, now, sent_at, queue_delay, rtt):
        """A probe, and the return after it, once all their news is in."""
        slot = self._slot
        if slot is not None and slot.complete(sent_at) and (self._return is None or
                                                            self._return.end is not None):
            self._slot = None
            got = slot.delivery()
            round_trip = max(rtt, 0.01)
            # A probe that found nothing and overflowed a short queue was
            # all cost: wait longer for the next (up to 4 times, 2 s).
            overflowed = self._excess_loss(slot.loss())
            self._probe_wait = min(4.0, self._probe_wait * 2) if overflowed else 1.0
            self._next_probe = now + min(self.PROBE_ROUNDS * round_trip * self._probe_wait,
                                         max(self.PROBE_ROUNDS * round_trip, 2.0))
            if slot.idle or got is None:
                return
            before, target = self.level, self._target(slot)
            if got > before * (1.0 + self.NOISE):
                # Even a probe that overflowed a short queue says how much passed.
                self.level = min(got, target)
            # A smaller probe (a short queue's) shows less room, in proportion,
            # and not room enough to double into: that overflows the queue.
            full = self.GAINS['probe']
            asked = min(full, target / before) if before > 0 else full
            paid = 1.0 + (asked - 1.0) * (self.PROBE_PAID - 1.0) / (full - 1.0)
            if got >= paid * before and not overflowed:
                self._next_probe = now          # room left: look for more at once
                if got >= self.PASSED * target * 1.1 and now >= self._no_doubling_until and \
                        asked >= full - self.NOISE:
                    # Delivered all it asked for: the room may be large.
                    self.phase = 'startup'
        returned = self._return
        if returned is not None and returned.complete(sent_at):
            self._return = None
            if not returned.idle:
                # Below the level no queue overflows: what is lost here is
                # random.  The last twenty or so returns count most.
                self._returns_counted = True
                self._count_clean(returned.packets, returned.lost, fade=0.95)

    def _set_level(self, level, now):
        self.level = max(self.MIN_RATE, level)
        self._decided(now)

    def _decided(self, at):
        """The path is judged again on news of packets sent from `at` on."""
        self._changed = at
        self._news = DeliverySlot(at, 0.0, 0.0)
        self._loss_news = [0, 0]
        self._lossy_windows = 0

    def _drain(self, now, queue_delay, round_trip, built=None):
        self._drain_for(now, queue_delay if built is None else built, round_trip)
        self._drain_queue = queue_delay

    def _drain_for(self, now, built, rtt):
        """Send below the level long enough to take back `built` seconds of queue."""
        self._slot = self._return = None
        duration = min(max(rtt, self.MIN_DRAIN), built / (1.0 - self.GAINS['drain']))
        self._drained = duration * (1.0 - self.GAINS['drain'])
        self._enter('drain', now, now + duration)
        self._decided(now + duration)
        self._next_probe = now + duration + self.PROBE_ROUNDS * max(rtt, 0.01)

    def _enter(self, phase, now, ends=0.0):
        self.phase = phase
        self._ramped = True
        self._phase_ends = ends

    def _update_rate(self):
        if self.contested:
            # A share is a window, as TCP's is: sent per round trip, so the
            # queue it meets slows it as it slows the other flow (sent as a
            # rate regardless, it squeezes a window out through the delay
            # alone, and is never cut: the queue need not overflow).
            least, rtt = self._least_rtt, self._rtt
            rate = self._share * (least / rtt if 0 < least < rtt < float('inf') else 1.0)
        else:
            gain = self._gain if self.phase in ('probe', 'return') else self.GAINS[self.phase]
            if self.phase == 'startup' and self._slot is not None and self._slot.end is None:
                gain = self._slot.sent * (1.0 - self._compensation()) / self.level
            rate = self.level * gain / (1.0 - self._compensation())
        rate = max(self.MIN_RATE, rate)
        if self.max_rate:
            rate = min(rate, self.max_rate)
        self.rate = rate

    def _adjust_share(self, now, loss, round_trip):
        """While contested, the share grows a little every round trip and
        shrinks by 30% when more is lost than at random, as TCP's window
        does: two such flows settle on equal shares."""
        if now - self._share_step < round_trip:
            return
        if loss > 2 * (self.random_loss or 0.0) + 0.002:
            if now - self._share_cut >= 2 * round_trip:    # one cut per loss episode
                self._share *= 0.7
                self._share_cut = now
                self._share_cut_since = True
        else:
            self._share += max(self.SHARE_GROWTH * self.peak_delivery, self.MIN_SHARE_GROWTH)
        self._share_step = now

    def _watch_path(self, now, delivery, queue_delay, loss, rtt):
        """Keep the path's capacity (the most it delivered while its queue
        was short, over the last CAPACITY_MEMORY seconds, or since a contest
        began); a queue that stays short ends a contest."""
        short = queue_delay < self.TARGET_DELAY / 2
        # Not a moment's short queue: one acknowledgement can read low
        # beside a queue that stands (a few packets, one sampled), the
        # share's own cut as the contest begins empties the queue, and so
        # does every backoff of a TCP flow, until it grows back.  A queue
        # short through a few acknowledgements was our own, drained; one
        # short most of the time for several round trips (a busy host's
        # stalls still build short-lived queues), the other flow is gone.
        if max(self._recent_queue) < self.TARGET_DELAY / 2:
            self._failed_drains = 0
        # After a loss the other flow backed off too, and may leave the
        # queue empty for a second or more before it has grown back.
        # On a short path a TCP flow's backoff leaves its queue standing
        # (the queue is deep for its window), and a flow alone, its own
        # queue drained by the share's cut, must not wait half a second.
        window = max(min(self.CONTEST_CLEAR, self.SHORT_CLEAR_ROUNDS * rtt), self.CLEAR_ROUNDS * rtt,
                     self.MIN_CLEAR) if not self._share_cut_since else \
            self.LOSS_CLEAR * max(1.0, rtt)
        if self._short_at is not None:
            self._short += (short - self._short) * min(1.0, max(0.0, now - self._short_at) / window)
        self._short_at = now
        samples = self._capacity
        if short and delivery:
            while samples and samples[-1][1] <= delivery:
                samples.pop()
            samples.append((now, delivery))
        capacity = samples[0][1] if samples else 0.0
        if short and self._short >= self.CLEARED and self.contested:
            # The other flow is gone, or it is still there and grows too
            # slowly to fill what the share leaves (a CUBIC flow that
            # joined: its window from its first loss grows a few Mbit/s a
            # second at 120 ms).  Not back to the path's capacity at once:
            # that overflowed the queue, and CUBIC's window, cut again,
            # grew back to less.  From the share, probes find the room in
            # steps of a quarter, a few round trips for the whole path.
            # (If the queue it holds stands again, the contest comes back
            # at the share it ended with.)
            self.contested = False
            self._contest_ended = now
            self.level = max(self.MIN_RATE, delivery or 0.0, self._share * (1.0 - self._compensation()))
            if now - self._contest_began >= self.CONTEST_CLEAR:
                # Not doubling either, for a while, after a contest long
                # enough to have been another flow's (a flow alone's own
                # false contest ends within a few round trips): into the
                # queue of a flow still there, growing back, it overflows.
                self._no_doubling_until = now + self.CAPACITY_MEMORY
            self._enter('cruise', now)
            self._decided(now)
            self._next_probe = now
        while samples and not self.contested and now - samples[0][0] > self.CAPACITY_MEMORY:
            samples.popleft()
        return samples[0][1] if samples else 0.0

    def on_silence(self):
        """No feedback for a long time: assume the worst until it returns."""
        self.level = max(self.MIN_RATE, self.level / 2)
        self._slot = self._return = self._rung = None
        if self.phase in ('probe', 'return'):
            self._enter('cruise', 0.0)
        self.rate = max(self.MIN_RATE, self.rate / 2)


# ---------------------------------------------------------------------------
# Bulk transfer: the protocol state machines
# ---------------------------------------------------------------------------
# Which blocks to send and which arrived: no sockets, no files, no clocks of
# their own, so they can be driven by tests directly.
#
# The sender numbers every datagram with a fresh packet number (never reused,
# so it is also the cipher nonce) and remembers which block each one carried.
# The receiver acknowledges packet numbers as a window minus its gaps; a gap
# old enough is a loss and only that block is queued again.  At the tail, and
# whenever the data stops, the receiver also names the blocks it still lacks,
# so lost feedback can delay a transfer but never stall or corrupt it.


_ANY_HELD = re.compile(rb'[^\x00]')
_ANY_MISSING = re.compile(rb'[^\xff]')


def next_block(bitmap, nblocks, block, held):
    """First block >= `block` whose bit is set (held=True) or clear, else nblocks.
    Whole bytes of the other kind are skipped by a regex search, at C speed."""
    skip = _ANY_HELD if held else _ANY_MISSING
    while block < nblocks:
        if block & 7 == 0:
            match = skip.search(bitmap, block >> 3)
            if match is None:
                return nblocks
            block = match.start() * 8
        if bool(bitmap[block >> 3] & (1 << (block & 7))) == held:
            return min(block, nblocks)
        block += 1
    return nblocks


def bitmap_missing_ranges(bitmap, nblocks, limit=None, first=0):
    """[start, end) ranges of blocks from `first` on whose bit is clear, in order."""
    ranges = []
    block = first
    while limit is None or len(ranges) < limit:
        start = next_block(bitmap, nblocks, block, False)
        if start >= nblocks:
            break
        block = next_block(bitmap, nblocks, start, True)
        ranges.append((start, block))
    return ranges


def set_bits(bitmap, start, end):
    """Set the bits of blocks [start, end); return how many were clear.
    Whole bytes at once: a delta transfer marks a million blocks in one go."""
    newly = 0
    while start < end and (start & 7 or end - start < 8):
        byte, bit = start >> 3, 1 << (start & 7)
        if not bitmap[byte] & bit:
            bitmap[byte] |= bit
            newly += 1
        start += 1
    if start < end:
        first, last = start >> 3, end >> 3
        held = bin(int.from_bytes(bitmap[first:last], 'little')).count('1')
        bitmap[first:last] = b'\xff' * (last - first)
        newly += (last - first) * 8 - held
        newly += set_bits(bitmap, last * 8, end)
    return newly


def subtract_ranges(ranges, holes):
    """[start, end) ranges minus the union of `holes`; both sorted by start."""
    result = []
    holes = list(holes)
    h = 0
    for start, end in ranges:
        while h < len(holes) and holes[h][1] <= start:
            h += 1
        i = h
        while start < end and i < len(holes) and holes[i][0] < end:
            hole_start, hole_end = holes[i]
            if hole_start > start:
                result.append((start, hole_start))
            start = max(start, hole_end)
            i += 1
        if start < end:
            result.append((start, end))
    return result


class PacketLog:
    """What each recent packet number carried and when: a ring, so the
    memory stays fixed however long the session runs."""

    SIZE = 1 << 20

    def __init__(self):
        # Zeroed pages the kernel gives as the ring is first written (only
        # packet numbers sent are ever read): a session, or a sending
        # worker, that sends fewer packets than the ring holds neither
        # fills nor keeps its 24 MB, which took each process 20 ms to fill.
        self.blocks, self.times, self.sent_through = (      # sent_through: wire bytes of
            memoryview(mmap.mmap(-1, self.SIZE * 8)).cast(code) for code in 'qdd')  # the file to here


class SendWindow:
    """The sender's view of one file: blocks never sent, blocks to resend,
    and what the receiver's acknowledgements say was lost.

    Packet numbers come from the session (`next_seq`), never repeat, and are
    also the cipher's nonces.  `next_run()` says what to send; the caller
    sends it and calls `sent_run()`.
    """

    REORDER_PACKETS = 16        # a gap this far below the newest arrival is a loss
    MIN_REORDER_TIME = 0.002    # or one sent this much before the newest arrival
    NAK_BLOCKS = 1 << 16        # blocks one NAK is looked through for (the next names the rest)
    TAIL_MISS = 1e-3            # the chance that every copy of a block sent again at the tail is lost,
    MAX_TAIL_COPIES = 4         # ... with at most this many copies,
    TAIL_COPY_SHARE = 0.25      # ... and copies in all at most this share of the packets lost
    MIN_LOSS_PACKETS = 1000     # packets the loss rate needs before it says how many

    def __init__(self, need_ranges, first_seq, log):
        self._fresh = [list(r) for r in need_ranges if r[1] > r[0]]
        self._fresh.reverse()                   # pop from the end: cheap
        # Blocks past this were not asked for yet (a delta transfer asks as
        # it goes), so a NAK that names them raced the asking: ignore them.
        self._asked_end = max([r[1] for r in need_ranges] + [0])
        self._resend = []
        self._resend_set = set()
        self._copies = []                       # copies of tail resends still to send
        self._copies_made = 0
        self._copy_seqs = {}                    # block -> packet numbers of its copies not known lost
        self._log = log
        self.first_seq = self.next_seq = first_seq
        self.largest_acked = first_seq - 1
        # Every packet number up to here that an acknowledgement named
        # missing has been declared lost (a receiver names the same gaps in
        # several acknowledgements, and a hostile one names them all).
        self._gaps_decided = first_seq - 1
        self.delivered = self.lost = self.retransmitted = 0
        self._sent_bytes = 0.0

    def has_work(self):
        return bool(self._fresh or self._resend or self._copies)

    def add_need(self, ranges):
        """More blocks to send, after all those already named (a delta
        transfer names them as the receiver answers each signature piece).
        A receiver decides its blocks in file order and names each once, so
        only blocks past every one named before are new: a need naming
        earlier ones adds nothing, and however many needs come, no block is
        queued twice (the queue stays within the file)."""
        fresh = []
        asked = self._asked_end
        for start, end in ranges:
            start = max(start, asked)
            if end > start:
                fresh.append([start, end])
                asked = end
        self._fresh[0:0] = fresh[::-1]
        self._asked_end = asked

    def withdraw(self, ranges):
        """Blocks the receiver no longer wants (it found them after all):
        those not sent yet never will be."""
        holes = sorted(tuple(r) for r in ranges)
        kept = []
        for run in self._fresh:                 # in reverse order of sending; keep it
            kept.extend(list(piece) for piece in reversed(subtract_ranges([tuple(run)], holes)))
        self._fresh = kept

    def next_run(self, limit):
        """(first block, count, is_resend): up to `limit` blocks to send now.
        Fresh blocks come in runs of consecutive numbers (one read, one
        batch); resends one at a time."""
        if self._resend:
            block = self._resend.pop()
            self._resend_set.discard(block)
            if not self._fresh:
                # The tail: a block sent again now, if lost again, is known
                # lost only a round trip later, and so on, one round trip
                # per loss (at 10% loss the last of the last round trip's
                # resends came 4-6 round trips after it).  It goes out as
                # many times as the loss seen needs; its copies go after the
                # other resends, not in the same burst of loss.  (A delta
                # transfer's sender also runs out of fresh blocks while it
                # waits for the receiver's requests: what the copies may
                # cost in all is bounded by the loss.)
                copies = min(self.tail_copies(),
                             1 + max(0, int(self.lost * self.TAIL_COPY_SHARE) - self._copies_made))
                if copies > 1:
                    self._copies[0:0] = [block] * (copies - 1)
                    self._copy_seqs[block] = []
                    self._copies_made += copies - 1
            return block, 1, True
        if self._copies:
            return self._copies.pop(), 1, True
        if not self._fresh:
            return None
        run = self._fresh[-1]
        count = min(limit, run[1] - run[0])
        first = run[0]
        run[0] += count
        if run[0] >= run[1]:
            self._fresh.pop()
        return first, count, False

    def next_resends(self, limit):
        """Up to `limit` blocks to send again now, while fresh blocks are
        left: at 1% of random loss one block in a hundred, and each sent
        on its own cost a read, a seal and a system call.  At the tail
        (nothing fresh left) none: next_run() sends those one at a time,
        each with its copies."""
        resend = self._resend
        if not resend or not self._fresh:
            return []
        blocks = resend[-limit:]
        del resend[-limit:]
        blocks.reverse()                        # the order next_run() would take them in
        self._resend_set.difference_update(blocks)
        return blocks

    def sent_again(self, blocks, now, sizes):
        """`blocks`, sent again under the next packet numbers (as
        next_resends() gave them), `sizes` bytes each on the wire (or
        sizes[i], when they differ)."""
        log, mask = self._log, self._log.SIZE - 1
        logged, times, through = log.blocks, log.times, log.sent_through
        seq, total = self.next_seq, self._sent_bytes
        uniform = isinstance(sizes, int)
        for i, block in enumerate(blocks):
            slot = (seq + i) & mask
            logged[slot] = block
            times[slot] = now
            total += sizes if uniform else sizes[i]
            through[slot] = total
            if block in self._copy_seqs:
                self._copy_seqs[block].append(seq + i)
        self._sent_bytes = total
        self.next_seq = seq + len(blocks)
        self.retransmitted += len(blocks)

    def sent_run(self, first, count, now, resend, sizes=1):
        """Blocks first..first+count-1 went out under the next packet numbers,
        each `sizes` bytes on the wire (or sizes[i], when they differ)."""
        log, mask = self._log, self._log.SIZE - 1
        blocks, times, through = log.blocks, log.times, log.sent_through
        seq = self.next_seq
        total = self._sent_bytes
        uniform = isinstance(sizes, int)
        for i in range(count):
            slot = (seq + i) & mask
            blocks[slot] = first + i
            times[slot] = now
            total += sizes if uniform else sizes[i]
            through[slot] = total
        self._sent_bytes = total
        self.next_seq = seq + count
        if resend:
            self.retransmitted += count
            if count == 1 and first in self._copy_seqs:
                self._copy_seqs[first].append(seq)

    def in_flight(self):
        return self.next_seq - 1 - self.largest_acked

    def tail_copies(self):
        """How many times a block sent again at the tail goes out: enough
        that all of them are lost at the loss seen so far only TAIL_MISS
        of the time."""
        total = self.delivered + self.lost
        if total < self.MIN_LOSS_PACKETS or not self.lost:
            return 1
        loss = self.lost / total
        copies, miss = 1, loss
        while miss > self.TAIL_MISS and copies < self.MAX_TAIL_COPIES:
            copies, miss = copies + 1, miss * loss
        return copies

    def _queue_resend(self, block):
        if block >= 0 and block not in self._resend_set:
            self._resend_set.add(block)
            self._resend.append(block)

    def _sent_through(self, seq):
        if seq < self.first_seq:
            return 0.0
        return self._log.sent_through[seq & (self._log.SIZE - 1)]

    def on_ack(self, window_start, largest, gaps, now, rtt):
        """Apply one acknowledgement; return (packets newly delivered, newly
        lost, wire bytes newly delivered)."""
        if largest <= self.largest_acked or largest >= self.next_seq or window_start > largest + 1:
            return 0, 0, 0.0                    # old, reordered or nonsense feedback
        log = self._log
        oldest_tracked = self.next_seq - log.SIZE
        newest_sent_time = log.times[largest & (log.SIZE - 1)]
        time_threshold = max(self.MIN_REORDER_TIME, rtt / 8)
        previous = self.largest_acked
        newly_missing = lost = 0
        missing_bytes = 0.0
        for offset, length in gaps:
            start = window_start + offset
            end = min(start + length, largest + 1)
            low = max(start, previous + 1)
            if end > low:
                newly_missing += end - low
                missing_bytes += self._sent_through(end - 1) - self._sent_through(low - 1)
            for seq in range(max(start, self.first_seq, oldest_tracked, self._gaps_decided + 1), end):
                slot = seq & (log.SIZE - 1)
                block = log.blocks[slot]
                if block < 0:
                    continue                    # already declared lost
                if largest - seq >= self.REORDER_PACKETS or \
                        newest_sent_time - log.times[slot] > time_threshold:
                    log.blocks[slot] = -1
                    lost += 1
                    copies = self._copy_seqs.get(block)
                    if copies is not None and seq in copies:
                        copies.remove(seq)
                        if copies:
                            continue            # another copy arrived, or is on its way
                        del self._copy_seqs[block]
                    self._queue_resend(block)
        self._gaps_decided = max(self._gaps_decided, largest - self.REORDER_PACKETS)
        acked_from = max(previous, window_start - 1)
        delivered = max(0, largest - acked_from - newly_missing)
        delivered_bytes = max(0.0, self._sent_through(largest) - self._sent_through(acked_from)
                              - missing_bytes)
        self.largest_acked = largest
        self.delivered += delivered
        self.lost += lost
        return delivered, lost, delivered_bytes

    def on_nak(self, ranges, now, rtt):
        """The receiver lacks these blocks: resend those not already on their way."""
        horizon = now - (1.25 * rtt + 0.01)
        log = self._log
        recent = set()
        seq = self.next_seq - 1
        while seq >= max(self.first_seq, self.next_seq - log.SIZE):
            slot = seq & (log.SIZE - 1)
            if log.times[slot] < horizon:
                # Everything sent before the horizon has arrived or is named
                # in this NAK: none of it is in flight any more.
                self.largest_acked = max(self.largest_acked, seq)
                break
            recent.add(log.blocks[slot])
            seq -= 1
        queued = 0
        ranges = [(start, min(end, self._asked_end)) for start, end in ranges
                  if start < self._asked_end]
        # A NAK names ranges, not blocks: one naming a whole file must not
        # cost a loop over every block of it.  What is left unseen is
        # named again by the next NAK, half a round trip later.
        budget = self.NAK_BLOCKS
        # Blocks never sent yet are on their way anyway: only the rest can be lost.
        for start, end in subtract_ranges(ranges, sorted(map(tuple, self._fresh))):
            end = min(end, start + budget)
            budget -= end - start
            for block in range(start, end):
                if block not in recent and block not in self._resend_set:
                    self._queue_resend(block)
                    queued += 1
            if budget <= 0:
                break
        return queued


DELAY_SAMPLE_EVERY = 8     # a receiver samples the delay of one packet number in this many


class ReceiveWindow:
    """The receiver's view of one file: which blocks are held, which packet
    numbers arrived (for acknowledgements), and the path's queueing delay.

    `on_packet()` says whether a block is new (write it) or a duplicate;
    `feedback()` and `missing()` build what goes back to the sender.
    """

    REPORT_HISTORY = 8          # feedback rounds a gap keeps being reported

    def __init__(self, nblocks, first_seq, bitmap=None):
        self.nblocks = nblocks
        self.first_seq = first_seq
        self.bitmap = bitmap if bitmap is not None else bytearray((nblocks + 7) // 8)
        self.held = sum(bin(b).count('1') for b in self.bitmap) if bitmap is not None else 0
        self.decided = nblocks                  # blocks past this are not asked for yet
        self.largest = first_seq - 1
        self._window_start = first_seq
        self._gaps = []                         # [start, end) packet numbers not received
        self._reported = []                     # largest at each recent feedback
        self._delay_origin = None
        self._base_delay = None
        self._interval_delay = None
        self._largest_arrival = 0.0
        self.first_arrival = None               # when the first authentic datagram came
        self.packets = self.duplicates = self.stale = 0

    def complete(self):
        return self.held >= self.nblocks

    def on_packet(self, seq, block, sent_us, now):
        """Record a datagram that passed its tag; True if its block is new."""
        return bool(self.on_packets((seq,), (block,), (sent_us,), now))

    def on_packets(self, seqs, blocks, stamps, now):
        """Record datagrams that passed their tags, in order of arrival (a
        receive's worth, in one call: the per-datagram Python is what a GB
        costs); the indices of those whose block is new."""
        first_seq, nblocks, bitmap = self.first_seq, self.nblocks, self.bitmap
        largest, gaps = self.largest, self._gaps
        new = []
        stale = 0
        for i, seq in enumerate(seqs):
            block = blocks[i]
            if seq < first_seq or block >= nblocks:
                stale += 1
                continue
            if seq > largest:
                if seq > largest + 1:
                    gaps.append([largest + 1, seq])
                largest = seq
            else:
                self._fill_gap(seq)
            if not seq & 7 or self._interval_delay is None:
                # One in eight is plenty for a minimum filter, but every
                # acknowledgement needs one: none would report no queue at all.
                self._delay_sample(stamps[i], now)
            byte, bit = block >> 3, 1 << (block & 7)
            if not bitmap[byte] & bit:
                bitmap[byte] |= bit
                new.append(i)
        taken = len(seqs) - stale
        self.stale += stale
        if taken:
            if self.first_arrival is None:
                self.first_arrival = now
            if largest != self.largest:
                self.largest, self._largest_arrival = largest, now
            self.packets += taken
            self.duplicates += taken - len(new)
            self.held += len(new)
        return new

    def delay_sample(self, sent_us, arrived):
        """One more delay sample: an authentic datagram of this file stamped
        `sent_us` by the sender reached this host at `arrived` (as dated by
        the kernel, where on_packets() dates a receive's worth by when it
        was taken: no earlier than they came)."""
        self._delay_sample(sent_us, arrived)

    def _delay_sample(self, sent_us, now):
        # Delay relative to the first sample's, so the unknown offset between
        # the two clocks and the 32-bit wrap cancel out.
        raw = (int(now * 1e6) - sent_us) & 0xFFFFFFFF
        if self._delay_origin is None:
            self._delay_origin = raw
        one_way = ((raw - self._delay_origin + 0x80000000) & 0xFFFFFFFF) - 0x80000000
        if self._base_delay is None or one_way < self._base_delay:
            self._base_delay = one_way
        if self._interval_delay is None or one_way < self._interval_delay:
            self._interval_delay = one_way

    def _fill_gap(self, seq):
        gaps = self._gaps
        for i in range(len(gaps) - 1, -1, -1):
            start, end = gaps[i]
            if seq >= end:
                return
            if seq >= start:
                if end - start == 1:
                    del gaps[i]
                elif seq == start:
                    gaps[i][0] += 1
                elif seq == end - 1:
                    gaps[i][1] -= 1
                else:
                    gaps[i:i + 1] = [[start, seq], [seq + 1, end]]
                return

    def feedback(self, now):
        """(window start, largest, microseconds since it arrived, queueing
        delay in us, gaps as (offset, length)) for one acknowledgement."""
        self._reported.append(self.largest)
        if len(self._reported) > self.REPORT_HISTORY:
            self._window_start = self._reported.pop(0) + 1
        gaps = self._gaps
        while gaps and gaps[0][1] <= self._window_start:
            gaps.pop(0)
        if len(gaps) > MAX_FEEDBACK_GAPS:
            del gaps[:len(gaps) - MAX_FEEDBACK_GAPS]
            self._window_start = gaps[0][0]
        start = self._window_start
        if self.largest - start > 0xFFFFFFFF:
            # Offsets are u32: only a sender that skipped 2**32 packet
            # numbers gets here, and it is acknowledged from its newest on.
            start = self._window_start = self.largest
            gaps.clear()
        if gaps and gaps[0][0] < start:
            gaps[0][0] = start
        queue_us = 0
        if self._interval_delay is not None:
            queue_us = max(0, self._interval_delay - self._base_delay)
        self._interval_delay = None
        ack_delay = int(max(0.0, now - self._largest_arrival) * 1e6)
        return (start, self.largest, min(ack_delay, 0xFFFFFFFF), min(queue_us, 0xFFFFFFFF),
                [(s - start, e - s) for s, e in gaps])

    def loss_fraction(self):
        """Datagrams of this file that never arrived, as a fraction of those sent
        up to the newest that did (resends make up for them)."""
        sent = self.largest - self.first_seq + 1
        return max(0.0, 1.0 - (self.packets - self.duplicates) / sent) if sent > 0 else 0.0

    def missing(self, limit=MAX_NAK_RANGES):
        return bitmap_missing_ranges(self.bitmap, self.decided, limit)

    def mark_held(self, ranges):
        """Blocks that were filled from local data."""
        for start, end in ranges:
            self.held += set_bits(self.bitmap, start, end)


def seal_datagram(sealer, kind, session_id, seq, body=b'', flags=0):
    header = PACKET_HEADER.pack(kind, flags, session_id, seq)
    return header + sealer.seal(seq, header, body)


def send_frame_copy(sock, session_id, index, frame):
    """Control frame `index` as a KIND_CONTROL datagram on `sock` too
    (ControlChannel.mirror): lost like any datagram when the socket has no
    room, as TCP carries it anyway."""
    try:
        sock.send(PACKET_HEADER.pack(KIND_CONTROL, 0, session_id, index) + frame)
    except OSError:
        pass


def probe_length(sealer, session_id, buffer, offset, length):
    """The length of the datagram at buffer[offset:offset + length] if it
    is an authentic PROBE of this session, else 0."""
    header_end = offset + PACKET_HEADER.size
    if length < PACKET_HEADER.size + TAG_SIZE:
        return 0
    kind, _flags, sid, _seq = PACKET_HEADER.unpack_from(buffer, offset)
    view = memoryview(buffer)
    if kind != KIND_PROBE or sid != session_id or \
            sealer.verify(view[offset:header_end], view[header_end:offset + length]) is None:
        return 0
    return length


def encode_feedback(file_id, window_start, largest, ack_delay_us, queue_us, gaps):
    return FEEDBACK_FIELDS.pack(file_id, window_start, largest, ack_delay_us, queue_us,
                                len(gaps)) + b''.join(FEEDBACK_GAP.pack(*g) for g in gaps)


def decode_feedback(body):
    """(file id, window start, largest, ack delay us, queue us, gaps)."""
    if len(body) < FEEDBACK_FIELDS.size:
        raise ProtocolError('short feedback')
    file_id, start, largest, ack_delay, queue_us, count = FEEDBACK_FIELDS.unpack_from(body)
    if count > MAX_FEEDBACK_GAPS:
        raise ProtocolError('feedback with %d gaps' % count)
    if len(body) != FEEDBACK_FIELDS.size + count * FEEDBACK_GAP.size:
        raise ProtocolError('feedback length does not match its gap count')
    gaps = [FEEDBACK_GAP.unpack_from(body, FEEDBACK_FIELDS.size + i * FEEDBACK_GAP.size)
            for i in range(count)]
    # In order and apart, as the receiver keeps them: overlapping gaps
    # would make the sender walk the same packet numbers over and over.
    end = 0
    for offset, length in gaps:
        if offset < end:
            raise ProtocolError('feedback with gaps out of order')
        end = offset + length
    return file_id, start, largest, ack_delay, queue_us, gaps


def encode_nak(file_id, ranges):
    return NAK_FIELDS.pack(file_id, len(ranges)) + b''.join(NAK_RANGE.pack(*r) for r in ranges)


def encode_spans(spans):
    """Spans [(length, digest)] as the text of a signature message."""
    packed = b''.join(SIGNATURE_SPAN.pack(length, digest) for length, digest in spans)
    return base64.b64encode(zlib.compress(packed, 1)).decode('ascii')


def decode_spans(text, limit=None):
    """The spans of a signature message, at most `limit` of them (by
    default as many as a piece of SIGNATURE_SEGMENT bytes can hold)."""
    if limit is None:
        limit = SIGNATURE_SEGMENT // MIN_CHUNK + 1
    try:
        blob = base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        raise ProtocolError('malformed signature')
    try:
        packed = inflate(blob, limit * SIGNATURE_SPAN.size)
    except ProtocolError as e:
        raise ProtocolError('malformed signature: %s' % e)
    if len(packed) % SIGNATURE_SPAN.size:
        raise ProtocolError('malformed signature')
    return [SIGNATURE_SPAN.unpack_from(packed, i) for i in range(0, len(packed), SIGNATURE_SPAN.size)]


def decode_nak(body):
    """(file id, [(start, end) block ranges])."""
    if len(body) < NAK_FIELDS.size:
        raise ProtocolError('short NAK')
    file_id, count = NAK_FIELDS.unpack_from(body)
    if count > MAX_NAK_RANGES:
        raise ProtocolError('NAK with %d ranges' % count)
    if len(body) != NAK_FIELDS.size + count * NAK_RANGE.size:
        raise ProtocolError('NAK length does not match its range count')
    ranges = [NAK_RANGE.unpack_from(body, NAK_FIELDS.size + i * NAK_RANGE.size) for i in range(count)]
    if any(end < start for start, end in ranges):
        raise ProtocolError('NAK with a backwards range')
    return file_id, ranges


# ---------------------------------------------------------------------------
# Bulk transfer: sockets and files
# ---------------------------------------------------------------------------
# The bulk transfer's contact with the kernel: UDP sockets that batch
# (segmentation offload out, receive coalescing in), the served tree with its
# path checks, digests, and the receiver's partial files that make resume work.

MAX_GSO_SEGMENTS = 64
MAX_DATAGRAM_BATCH = 65000      # bytes one offloaded send may carry
SOCKET_BUFFER = 32 << 20
RECV_BUFFER = 1 << 16
GATHER_BUFFER = 2 * RECV_BUFFER     # a gathered batch, and room for one more receive
GRO_TRIAL = 4096                # receives in a row that coalesced nothing before GRO is dropped
ANCILLARY_SPACE = 64            # a receive's control data: a GRO segment size and an arrival stamp
ARRIVAL_STAMP = struct.Struct('@ll')    # struct timespec, as SO_TIMESTAMPNS hands it over
MAX_SOCKET_WAIT = 1.0           # s a datagram may have waited in the socket; a longer wait read from
                                # its stamp is a clock stepped meanwhile, and not believed
STAMPED_MACHINES = ('x86_64', 'amd64', 'i386', 'i686', 'aarch64', 'arm64', 'riscv64', 's390x',
                    'ppc64le', 'ppc64')     # where SO_TIMESTAMPNS is 35
MAX_RECEIVES_PER_WAKEUP = 512
WAKEUP_BYTES = 1 << 20             # received before the timers' turn: a few ms of work
GATHER_TARGET = RECV_BUFFER      # bytes a receiver's wakeup waits to find; less is a trickle, and
                                # the next pauses for what this takes to come at the arrival rate,
                                # never past the next feedback: at 100 Mbit/s through a link that
                                # hands over one datagram at a time, a fixed 1 ms pause woke the
                                # receiver 710 times a second for 2.4 batches of 4-5 datagrams
MAX_TRACKED_BLOCKS = 1 << 33    # blocks of one file a receiver tracks: a bitmap of 1 GiB


class DatagramSocket:
    """A UDP socket set up for bulk: the largest buffers the kernel allows,
    batched sends through UDP_SEGMENT and coalesced receives through
    UDP_GRO, each falling back to one datagram per call where unsupported.
    `warnings` lists what could not be had, naming the sysctl to raise."""

    def __init__(self, sock):
        self.sock = sock
        self.warnings = []
        for option, force, name in ((socket.SO_SNDBUF, SO_SNDBUFFORCE, 'wmem_max'),
                                    (socket.SO_RCVBUF, SO_RCVBUFFORCE, 'rmem_max')):
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
            got = sock.getsockopt(socket.SOL_SOCKET, option) // 2
            if got < SOCKET_BUFFER // 4:
                self.warnings.append('UDP socket buffer is %d KiB; raise net.core.%s to %d for '
                                     'fast long paths' % (got >> 10, name, SOCKET_BUFFER))
        self.gso = self._try_option(UDP_SEGMENT, 0)
        self.gro = self._try_option(UDP_GRO, 1)
        self.stamped = self._stamp_arrivals()
        self._uncoalesced = 0
        self.held = []                          # (datagram, segment size): what ended a gather
        self.drained = False                    # the last receive found nothing waiting
        self.waited = 0.0                       # s the last batch's first datagram waited here
        sock.setblocking(False)

    def _stamp_arrivals(self):
        """Have the kernel stamp each datagram's arrival (SO_TIMESTAMPNS),
        where its number is known to be the one meant."""
        if not sys.platform.startswith('linux') or os.uname().machine.lower() not in STAMPED_MACHINES:
            return False
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            return True
        except OSError:
            return False

    def _try_option(self, option, value):
        try:
            self.sock.setsockopt(SOL_UDP, option, value)
            return True
        except OSError:
            return False

    def send_packets(self, packets):
        """Send datagrams in order; runs of equal size go out in one call."""
        sock, i, n = self.sock, 0, len(packets)
        while i < n:
            size = len(packets[i])
            j = i + 1
            if self.gso:
                limit = min(n, i + MAX_GSO_SEGMENTS, i + MAX_DATAGRAM_BATCH // size)
                while j < limit and len(packets[j]) == size:
                    j += 1
                if j < limit and len(packets[j]) < size:
                    j += 1                      # a shorter last segment is allowed
            try:
                if j - i > 1:
                    sock.sendmsg(packets[i:j], [(SOL_UDP, UDP_SEGMENT, struct.pack('=H', size))])
                else:
                    sock.send(packets[i])
            except BlockingIOError:
                return i                        # the kernel queue is full: pace harder
            except OSError as e:
                if j - i > 1 and e.errno in (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT):
                    self.gso = False            # the device cannot offload after all
                    continue
                if e.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    return i                    # transient ICMP errors: feedback decides
                raise
            i = j
        return n

    def recv_batch(self, buffer, gather=0):
        """Receive into `buffer`; return (bytes, segment size) or (0, 0) when
        nothing is waiting.  A coalesced receive holds several datagrams of
        `segment size` bytes each, the last possibly shorter.

        With `gather` (a full data datagram's size) and a buffer of
        GATHER_BUFFER bytes, a receive of such datagrams is followed by more
        receives into the buffer after it while each brings datagrams of
        that size, and the whole is returned as if the kernel had coalesced
        it: across a tun device or a NIC without GRO every receive holds one
        datagram, and the receiver's Python per receive, not per batch, was
        then its largest cost.  Nothing is checked here (the caller checks
        each datagram's tag) and nothing is truncated: every receive has
        RECV_BUFFER bytes of room.  A datagram of another size ends the
        batch: a shorter one as its last, a longer one (or a coalesced
        receive of another size) is held back for the next call.

        `waited` is then how long the batch's first datagram (the one that
        waited longest) had been in the socket, from the kernel's stamp of
        its arrival (0 where there is none, as for one held back): the
        receiver measures the path's delay by it.  Across a busy host the
        receiver takes a batch up to tens of ms after it came, and a delay
        measured only from the taking was read by the sender as the path's
        queue, with drains to empty a queue that was not there."""
        self.waited = 0.0
        if self.held:
            data, segment = self.held.pop(0)
            buffer[:len(data)] = data
            return len(data), segment
        nbytes, segment = self._receive(buffer, self.stamped)
        if not gather or segment != gather or nbytes % gather:
            return nbytes, segment
        view, receive, room = memoryview(buffer), self._receive, len(buffer) - RECV_BUFFER
        while nbytes <= room:
            more, segment = receive(view[nbytes:])
            if not more:
                break
            if segment != gather and (segment != more or more > gather):
                self.held.append((bytes(view[nbytes:nbytes + more]), segment))
                break
            nbytes += more
            if more % gather:
                break                           # a shorter datagram ends a batch
        return nbytes, gather

    def _receive(self, buffer, stamp=False):
        """One receive: (bytes, segment size), (0, 0) when nothing waits.
        With `stamp`, `waited` is set from the datagram's arrival stamp."""
        self.drained = False
        try:
            if self.gro or stamp:
                nbytes, ancillary, _flags, _addr = self.sock.recvmsg_into([buffer], ANCILLARY_SPACE)
                segment = 0
                for level, kind, data in ancillary:
                    if level == SOL_UDP and kind == UDP_GRO:
                        segment = int.from_bytes(data[:4], sys.byteorder) or nbytes
                    elif level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and stamp:
                        self.waited = self._waited(data)
                if not self.gro:
                    return nbytes, nbytes
                if segment:
                    self._uncoalesced = 0
                    return nbytes, segment
                self._uncoalesced += 1
                if self._uncoalesced >= GRO_TRIAL:
                    # Nothing on this path is coalesced (a device without
                    # GRO): plain receives cost a microsecond less each.
                    self.gro = not self._try_option(UDP_GRO, 0)
                return nbytes, nbytes
            nbytes = self.sock.recv_into(buffer)
            return nbytes, nbytes
        except BlockingIOError:
            self.drained = True
            return 0, 0
        except InterruptedError:
            return 0, 0
        except ConnectionRefusedError:
            return 0, 0                         # ICMP from an earlier send; not fatal

    @staticmethod
    def _waited(stamp):
        """Seconds since the arrival `stamp` (a struct timespec of the
        wall clock), or 0 if it is malformed or not believable."""
        if len(stamp) < ARRIVAL_STAMP.size:
            return 0.0
        seconds, nanoseconds = ARRIVAL_STAMP.unpack_from(stamp)
        waited = time.time() - (seconds + nanoseconds * 1e-9)
        return waited if 0.0 <= waited < MAX_SOCKET_WAIT else 0.0

    def path_mtu(self):
        """The MTU of the route to the connected peer (an upper bound)."""
        try:
            return self.sock.getsockopt(socket.IPPROTO_IP, IP_MTU)
        except OSError:
            return 1500

    def send_unfragmented(self, packets):
        """Send datagrams with fragmentation forbidden, so a datagram larger
        than the path carries is lost (or refused here) instead of split."""
        level, option, value = ((socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
                                if self.sock.family == socket.AF_INET else
                                (socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IP_PMTUDISC_DO))
        previous = self.sock.getsockopt(level, option)
        self.sock.setsockopt(level, option, value)
        try:
            for packet in packets:
                try:
                    self.sock.send(packet)
                except OSError:
                    pass                        # too big for the route, or a full queue
        finally:
            self.sock.setsockopt(level, option, previous)

    def close(self):
        self.sock.close()


def normalize_remote(remote):
    """A client's REMOTE as a clean relative path, or RemoteError."""
    if '\x00' in remote:
        raise RemoteError('invalid path %r' % remote)
    if remote.startswith('/') or remote.startswith('~'):
        raise RemoteError('%s: absolute paths are not served; name it relative to the served root' % remote)
    parts = [p for p in remote.replace('\\', '/').split('/') if p not in ('', '.')]
    if '..' in parts:
        raise RemoteError('%s: ".." is not allowed' % remote)
    return '/'.join(parts)


def is_within(path, root):
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class ServedTree:
    """The files `serve` offers.  A file PATH is served under its base name;
    a directory PATH's contents under their paths relative to it.  Every
    request is resolved again and must stay inside a served root, symlinks
    included."""

    def __init__(self, paths):
        self.roots = []
        for path in paths:
            real = os.path.realpath(path)
            if not os.path.exists(real):
                raise UsageError('%s: no such file or directory' % path)
            if os.path.isdir(real):
                self.roots.append((None, real))
            elif os.path.isfile(real):
                self.roots.append((os.path.basename(os.path.abspath(path)), real))
            else:
                raise UsageError('%s: not a regular file or directory' % path)

    def resolve(self, remote):
        """(real path, is directory) for a REMOTE, or RemoteError."""
        clean = normalize_remote(remote)
        escaped = False
        for name, real in self.roots:
            if name is not None:
                if clean == name:
                    return real, False
                continue
            candidate = os.path.realpath(os.path.join(real, clean))
            if not is_within(candidate, real):
                escaped = escaped or os.path.lexists(os.path.join(real, clean))
                continue
            if os.path.isdir(candidate):
                return candidate, True
            if os.path.isfile(candidate):
                return candidate, False
        if escaped:
            raise RemoteError('%s: refers outside the served directory' % remote)
        raise RemoteError('%s: no such file or directory on the server' % remote)

    def root_of(self, path):
        for name, real in self.roots:
            if (name is not None and path == real) or (name is None and is_within(path, real)):
                return real
        return None

    def listing_pages(self, remote, page_bytes):
        """What a REMOTE expands to, files with identity and directories, in
        pages: {kind, name, files, dirs, more}, each holding about
        `page_bytes` of JSON at most and `more` true on all but the last.
        A tree is walked as its pages are taken, so no frame, and no page
        in memory, grows with the tree."""
        clean = normalize_remote(remote)
        real, is_dir = self.resolve(remote)
        if not is_dir:
            yield {'kind': 'file', 'name': clean.rsplit('/', 1)[-1] or os.path.basename(real),
                   'files': [file_entry(real, '')], 'dirs': [], 'more': False}
            return
        name = clean.rsplit('/', 1)[-1]
        page, size = {'kind': 'dir', 'name': name, 'files': [], 'dirs': []}, 0
        for key, item, cost in self._walk(real):
            if size + cost > page_bytes and (page['files'] or page['dirs']):
                page['more'] = True
                yield page
                page, size = {'kind': 'dir', 'name': name, 'files': [], 'dirs': []}, 0
            page[key].append(item)
            size += cost
        page['more'] = False
        yield page

    def _walk(self, real):
        """('dirs', path, JSON bytes) and ('files', entry, JSON bytes at
        most) of the directory `real`, in order."""
        root = self.root_of(real)
        for top, subdirs, names in os.walk(real):
            subdirs.sort()
            rel_top = os.path.relpath(top, real)
            rel_top = '' if rel_top == '.' else rel_top.replace(os.sep, '/') + '/'
            for d in subdirs:
                if not os.path.islink(os.path.join(top, d)):
                    yield 'dirs', rel_top + d, len(json.dumps(rel_top + d)) + 1
            for name in sorted(names):
                path = os.path.join(top, name)
                target = os.path.realpath(path)
                if is_within(target, root) and os.path.isfile(target):
                    try:
                        entry = file_entry(path, rel_top + name)
                    except OSError:
                        continue                # gone since its directory was read
                    yield 'files', entry, len(json.dumps(entry['path'])) + LISTING_ENTRY_BYTES


def file_entry(path, rel):
    st = os.stat(path)
    return {'path': rel, 'size': st.st_size, 'mtime_ns': st.st_mtime_ns,
            'mode': stat.S_IMODE(st.st_mode)}


def open_regular(path):
    """A read-only descriptor of the regular file at `path`.  Opened without
    blocking and checked after: a path swapped for a FIFO or a device after
    it was looked at must not hang whoever opens it (a FIFO's open waits for
    a writer, a read for data).  OSError for anything else."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, 'not a regular file')
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def data_regions(fd, end, start=0):
    """[start, end) regions of the file that may hold data, from `start`
    on; the rest are holes (SEEK_DATA/SEEK_HOLE), which read as zeros
    without being read.  All of it where the filesystem cannot tell."""
    regions, position = [], start
    try:
        while position < end:
            try:
                first = os.lseek(fd, position, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:      # only a hole from here on
                    break
                raise
            if first >= end:
                break
            last = min(end, os.lseek(fd, first, os.SEEK_HOLE))
            regions.append((first, last))
            position = last
    except (OSError, AttributeError):
        return [(start, end)]
    return regions


def hash_range(digest, fd, start, end, chunk=1 << 20, stop=None):
    """Feed bytes [start, end) of the open file `fd` to `digest`; holes are
    fed as the zeros they are without reading them (the kernel can be slow
    to make up zero pages).  `stop`, if given, is called before each read
    (it raises to end the work early)."""
    zeros = memoryview(bytes(chunk))
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    position = start
    for first, last in data_regions(fd, end, start) + [(end, end)]:
        while position < first:
            n = min(chunk, first - position)
            digest.update(zeros[:n])
            position += n
        while position < last:
            if stop is not None:
                stop()
            n = os.preadv(fd, [view[:min(chunk, last - position)]], position)
            if not n:
                raise OSError(errno.EIO, 'file shrank while being read')
            digest.update(view[:n])
            position += n


def file_sha256(path):
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        hash_range(digest, fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    return digest.hexdigest()


class FrontierDigest:
    """SHA-256 of a file being written out of order, kept up to date on a
    thread of its own over the longest prefix already written (`written()`
    gives the bitmap of blocks safely written), so that when the last
    block lands only the rest is left to read.  Written blocks are final:
    every write puts there the bytes the file ends with.  Bytes written
    and still in hand (a delta's local spans, checked) may be `offer()`ed:
    the digest then takes them from memory instead of reading them back."""

    POLL = 0.05
    OFFERED_LIMIT = 64 << 20            # bytes offered and kept, at most

    def __init__(self, path, size, block_size, written):
        self._path, self._size, self._block_size = path, size, block_size
        self._nblocks = (size + block_size - 1) // block_size
        self._written = written
        self._digest = hashlib.sha256()
        self._hashed = 0                # bytes hashed so far, a prefix
        self._offered = {}              # position -> the bytes the file holds from there
        self._offered_bytes = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = start_thread(self._run, 'digest')

    def offer(self, position, data):
        """`data` is what the file holds from `position` on, final."""
        if not data:
            return
        with self._lock:
            if position < self._hashed or self._offered_bytes + len(data) > self.OFFERED_LIMIT:
                return                  # read back instead
            self._offered[position] = data
            self._offered_bytes += len(data)
            waited_for = position == self._hashed
        if waited_for:                  # else the thread, busy, gets there by itself
            self._wake.set()

    def _run(self):
        try:
            fd = os.open(self._path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return                      # finish() reads it all
        try:
            while not self._stop.is_set():
                self._wake.wait(self.POLL)
                self._wake.clear()
                block = next_block(self._written(), self._nblocks,
                                   self._hashed // self._block_size, False)
                self._advance(fd, min(self._size, block * self._block_size))
        except OSError:
            self._digest, self._hashed = hashlib.sha256(), 0
        finally:
            os.close(fd)

    def _advance(self, fd, frontier):
        """Hash what was offered from where the digest is, then what the
        file holds up to `frontier` (up to the next offer)."""
        while True:
            with self._lock:
                data = self._offered.pop(self._hashed, None)
                if data is None:
                    for position in [p for p in self._offered if p < self._hashed]:
                        self._offered_bytes -= len(self._offered.pop(position))
                    later = min(self._offered, default=frontier)
                else:
                    self._offered_bytes -= len(data)
            if data is not None:
                self._digest.update(data)
                self._hashed += len(data)
            elif self._hashed < frontier:
                end = min(frontier, later)
                hash_range(self._digest, fd, self._hashed, end)
                self._hashed = end
            else:
                return

    def stop(self):
        self._stop.set()
        self._wake.set()
        self._thread.join()

    def finish(self):
        """The hex digest of the whole file, once every block is written."""
        self.stop()
        fd = os.open(self._path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            self._advance(fd, self._size)
        finally:
            os.close(fd)
        return self._digest.hexdigest()


class DigestJob(HelperJob):
    """One file's whole SHA-256, computed on a thread of its own."""

    def __init__(self, path):
        HelperJob.__init__(self)
        self.path = path
        self._digest = None

    def run(self):
        try:
            digest = hashlib.sha256()
            fd = open_regular(self.path)
            try:
                hash_range(digest, fd, 0, os.fstat(fd).st_size, stop=self.check_stop)
            finally:
                os.close(fd)
            self._digest = digest.hexdigest()
        except OSError as e:
            self.error = e

    def failed(self):
        return self._digest is None

    def sha256(self):
        self.done.wait()
        if self._digest is None:
            error = self.error.strerror if self.error is not None else 'the digest thread failed'
            raise RemoteError('cannot read %s: %s' % (self.path, error))
        return self._digest


class DigestCache(SharedJobs):
    """Whole-file SHA-256 digests, computed on a thread of their own while
    the data flows and remembered by file identity, so a resumed or repeated
    transfer of an unchanged file does not read it twice."""

    def __init__(self, limit=4096, slots=None):
        self._results = {}
        self._lock = threading.Lock()
        self._limit = limit
        self._slots = slots

    def start(self, path, owner=None):
        """Begin (or join) the digest of `path` (a DigestJob: its sha256()
        waits for it); the caller calls release() with it when done."""
        key = file_identity(path)
        with self._lock:
            job = self._results.get(key)
            if job is None or job.stop.is_set() or (job.done.is_set() and job.failed()):
                if len(self._results) >= self._limit:
                    self._results.clear()
                job = DigestJob(path)
                job.launch(self._slots, owner, job.run, 'digest')
                self._results[key] = job
            job.users += 1
            return job


class PartialFile:
    """A file being received.  Data goes to a hidden temporary name beside the
    destination and a small state file records which blocks are safely
    written, so a killed transfer resumes where it stopped and a half-written
    file never takes the final name.  The state is only trusted when the
    source's identity (size, mtime) and block size still match.

    The state file is made at its full size before any data is written and
    is then only overwritten in place, alternating between two slots that
    each carry a sequence number and a CRC: a disk that fills up with data
    still has room to record what was written (so the next run resumes it,
    on filesystems that overwrite in place), and a write torn by a crash
    spoils only the slot being written.

    Neither file is ever opened through a symbolic link, and an existing one
    is only resumed if it is a regular file of ours with no other link.
    Anything else found at those names (a link planted in a shared
    directory, say) is removed and the file made anew with O_EXCL, as rsync
    replaces what is in its way instead of writing through it.  The verified
    file is renamed over the destination, which likewise replaces a link
    there rather than writing where it points, and takes the source's
    permission bits without setuid, setgid and sticky (as cp and tar do
    without -p): a file served with mode 4755 must not become a setuid
    program owned by whoever runs `get`."""

    STATE_MAGIC = b'WXS2'
    STATE_SLOT = struct.Struct('>4sQII')    # magic, sequence, body length, CRC-32 of the body

    def __init__(self, dest, remote, size, mtime_ns, block_size):
        self.dest = dest
        self.data_path, self.state_path = self.paths_for(dest)
        self.identity = {'remote': remote, 'size': size, 'mtime_ns': mtime_ns,
                         'block_size': block_size}
        self.nblocks = (size + block_size - 1) // block_size
        if self.nblocks > MAX_TRACKED_BLOCKS:
            raise TransferError('%s: %d bytes in blocks of %d are more blocks than a receiver '
                                'tracks (%d)' % (remote, size, block_size, MAX_TRACKED_BLOCKS))
        self.block_size = block_size
        self.fd = self.state_fd = None
        self.resumed_blocks = 0
        self._sequence = 0
        self._identity = json.dumps(self.identity, sort_keys=True, separators=(',', ':')).encode()
        # A slot holds the bitmap uncompressed if need be: its size never changes.
        self._slot = self.STATE_SLOT.size + 5 + len(self._identity) + (self.nblocks + 7) // 8

    def open(self, resume=True):
        """Open (or resume) the temporary file; return the held-block bitmap.
        Without `resume` (a file that comes whole) no state is kept."""
        bitmap = self._resume() if resume else None
        if bitmap is None:
            bitmap = bytearray((self.nblocks + 7) // 8)
            try:
                self._start(bitmap, resume)
            except OSError as e:
                self.discard()
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise DiskFull('disk full: no room to start writing %s' % self.dest)
                raise TransferError('cannot write %s: %s' % (self.dest, e.strerror))
            except BaseException:
                self.discard()
                raise
        self.resumed_blocks = sum(bin(b).count('1') for b in bitmap)
        return bitmap

    def _resume(self):
        """The bitmap an earlier run recorded for this same source, both
        files then open; None if there is nothing trustworthy to resume."""
        self.state_fd = self._open_ours(self.state_path)
        found = self._read_state(self.state_fd) if self.state_fd is not None else None
        if found is not None and found[1] == self.identity \
                and len(found[2]) == (self.nblocks + 7) // 8 \
                and os.fstat(self.state_fd).st_size == 2 * self._slot:
            self.fd = self._open_ours(self.data_path)
            if self.fd is not None:
                try:
                    os.ftruncate(self.fd, self.identity['size'])
                except OSError:
                    pass
                else:
                    self._sequence = found[0]
                    return bytearray(found[2])
        self.close()
        return None

    def _start(self, bitmap, keep_state):
        """Both files anew, the state first and at its full size, while there is room."""
        if keep_state:
            self.state_fd = self._create(self.state_path)
            record = self._record(0, bitmap)
            self._pwrite_all(self.state_fd, record, 0)
            zeros = bytes(min(1 << 20, 2 * self._slot))
            for offset in range(len(record), 2 * self._slot, len(zeros)):
                self._pwrite_all(self.state_fd, zeros[:2 * self._slot - offset], offset)
        else:
            self._remove(self.state_path)
        self.fd = self._create(self.data_path)
        os.ftruncate(self.fd, self.identity['size'])

    @staticmethod
    def _open_ours(path):
        """An fd on `path` if it is a regular file of ours with one link (not
        following a symbolic link, not waiting on a FIFO); else None."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError:
            return None
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid() and info.st_nlink == 1:
            return fd
        os.close(fd)
        return None

    def _create(self, path):
        """A new, empty file of ours at `path`, whatever was there removed.
        Should something take the name again between the unlink and the
        exclusive create, give up rather than write into it."""
        for _attempt in range(3):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            try:
                return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            except FileExistsError:
                continue
        raise TransferError('cannot write %s: something keeps taking the name %s'
                            % (self.dest, path))

    @staticmethod
    def _pwrite_all(fd, data, offset):
        view, done = memoryview(data), 0
        while done < len(view):
            n = os.pwrite(fd, view[done:], offset + done)
            if not n:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            done += n
        return done

    def _record(self, sequence, bitmap):
        bitmap = bytes(bitmap)
        packed = zlib.compress(bitmap)
        flag = 1
        if len(packed) >= len(bitmap):
            packed, flag = bitmap, 0
        body = struct.pack('>I', len(self._identity)) + self._identity + bytes([flag]) + packed
        return self.STATE_SLOT.pack(self.STATE_MAGIC, sequence, len(body), zlib.crc32(body)) + body

    @classmethod
    def _read_state(cls, fd):
        """(sequence, identity dict, bitmap) of the newest intact slot, or None."""
        try:
            size = os.fstat(fd).st_size
            if size > 2 * (1 << 30):
                return None
            raw = os.pread(fd, size, 0)
        except OSError:
            return None
        slot, best = len(raw) // 2, None
        for start in (0, slot):
            try:
                magic, sequence, length, crc = cls.STATE_SLOT.unpack_from(raw, start)
            except struct.error:
                return None
            body = raw[start + cls.STATE_SLOT.size:start + cls.STATE_SLOT.size + length]
            if magic != cls.STATE_MAGIC or len(body) != length or length > slot \
                    or zlib.crc32(body) != crc or (best is not None and sequence <= best[0]):
                continue
            try:
                (name_length,) = struct.unpack_from('>I', body)
                identity = json.loads(body[4:4 + name_length].decode())
                flag, packed = body[4 + name_length:5 + name_length], body[5 + name_length:]
                if flag == b'\x01':
                    bitmap = zlib.decompressobj().decompress(packed, slot)
                elif flag == b'\x00':
                    bitmap = packed
                else:
                    continue
            except (struct.error, ValueError, zlib.error):
                continue
            best = (sequence, identity, bitmap)
        return best

    @classmethod
    def recorded(cls, state_path):
        """(identity dict, bitmap) a state file records, or None."""
        fd = cls._open_ours(state_path)
        if fd is None:
            return None
        try:
            found = cls._read_state(fd)
        finally:
            os.close(fd)
        return None if found is None else found[1:]

    @staticmethod
    def paths_for(dest):
        """(temporary data file, state file) beside `dest`."""
        directory, name = os.path.split(os.path.abspath(dest))
        return (os.path.join(directory, '.%s.wxpart' % name),
                os.path.join(directory, '.%s.wxstate' % name))

    @classmethod
    def left_at(cls, dest):
        """Whether an earlier run left a partial copy of `dest`."""
        return any(os.path.lexists(path) for path in cls.paths_for(dest))

    def save_state(self, bitmap):
        """Record `bitmap` as the blocks safely written, over the older slot."""
        if self.state_fd is None:
            return
        self._sequence += 1
        try:
            self._pwrite_all(self.state_fd, self._record(self._sequence, bitmap),
                             (self._sequence % 2) * self._slot)
        except OSError as e:
            raise TransferError('cannot record the progress of %s: %s' % (self.dest, e.strerror))

    def write(self, offset, data):
        view, done = memoryview(data), 0
        try:
            while done < len(view):
                n = os.pwrite(self.fd, view[done:], offset + done)
                if not n:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                done += n
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull('disk full writing %s; the partial data is kept: run the same '
                               'command again to resume' % self.dest, done)
            raise TransferError('cannot write %s: %s' % (self.dest, e.strerror))

    def digest(self, frontier=None):
        """The SHA-256 of what was written, on disk (fsync) first; a
        FrontierDigest may have hashed most of it already."""
        os.fsync(self.fd)
        if frontier is not None:
            return frontier.finish()
        digest = hashlib.sha256()
        hash_range(digest, self.fd, 0, self.identity['size'])
        return digest.hexdigest()

    def finish(self, mode, mtime_ns):
        """Give the verified file its final name, mode and mtime."""
        try:
            os.fchmod(self.fd, mode & 0o777)
            os.utime(self.fd, ns=(mtime_ns, mtime_ns))
        except OSError as e:
            raise TransferError('cannot set the mode and mtime of %s: %s' % (self.dest, e.strerror))
        self.close()
        try:
            os.replace(self.data_path, self.dest)
        except OSError as e:
            raise TransferError('cannot rename to %s: %s' % (self.dest, e.strerror))
        self._remove(self.state_path)

    def discard(self):
        self.close()
        self._remove(self.data_path)
        self._remove(self.state_path)

    def withdraw(self):
        """Give up before this run wrote anything: what an earlier run left
        is kept for the next, but a copy holding nothing would only leave
        hidden files (and a directory it keeps) behind a refused get."""
        if self.resumed_blocks:
            self.close()
        else:
            self.discard()

    def close(self):
        for fd in (self.fd, self.state_fd):
            if fd is not None:
                os.close(fd)
        self.fd = self.state_fd = None

    @staticmethod
    def _remove(path):
        try:
            os.unlink(path)
        except OSError:
            pass                        # gone already, or not ours to remove (a directory)


class BlockWriter:
    """Coalesces blocks that arrive in order into large writes, done on a
    thread of its own so the receive loop never waits for the disk, and
    tracks which blocks are on disk: only those may be recorded as held.
    A write error is raised from the next call after it happened."""

    FLUSH_BYTES = 1 << 20
    QUEUED_WRITES = 64                  # at most this many MB waiting for the disk

    def __init__(self, partial, held_bitmap, track=False):
        self._partial = partial
        self._fresh = [] if track else None     # runs written since take_written(), if tracked
        self._block_size = partial.block_size
        self._start = self._next = -1
        self._buffer = bytearray()
        self._runs, self._waiting = [], 0       # runs ended, not yet handed over; their bytes
        self._bitmap = bytearray(held_bitmap)
        self._lock = threading.Lock()
        self._error = None
        self._queue = queue.Queue(self.QUEUED_WRITES)
        self._thread = start_thread(self._run, 'writer')
        self.written_bytes = 0
        self.on_written = None          # called (file position, bytes) with each run once written

    def put(self, block, data):
        """Blocks from `block` on, back to back in `data` (a bytearray is
        the writer's from then on: it may be written as it is)."""
        if block != self._next or self._waiting + len(self._buffer) >= self.FLUSH_BYTES:
            self._end_run()
            self._start = block
        if not self._buffer and type(data) is bytearray:
            self._buffer = data                 # saves a copy of every byte received
        else:
            self._buffer += data
        self._next = block + (len(data) + self._block_size - 1) // self._block_size

    def _end_run(self):
        """Put the current run with the others waiting; hand them over
        once they make FLUSH_BYTES.  Random loss ends a run every hundred
        blocks or so, and a block sent again is a run of its own: a
        hand-over each (a wakeup of the writer thread, fought for the GIL
        by the receive loop) cost more than their writes."""
        if self._buffer:
            self._runs.append((self._start, self._next, self._buffer))
            self._waiting += len(self._buffer)
            self._buffer = bytearray()
            self._next = -1
        if self._waiting >= self.FLUSH_BYTES:
            self.flush()

    def flush(self):
        """Hand the runs waiting, and the current one, to the writer thread."""
        if self._error is not None:
            raise self._error
        if self._buffer:
            self._runs.append((self._start, self._next, self._buffer))
            self._buffer = bytearray()
            self._next = -1
        if self._runs:
            self._queue.put(self._runs)
            self._runs, self._waiting = [], 0

    def _run(self):
        while True:
            runs = self._queue.get()
            try:
                if runs is None:
                    return
                for start, end, data in runs:
                    if self._error is not None:
                        break
                    self._write(start, end, data)
            finally:
                self._queue.task_done()

    def _write(self, start, end, data):
        try:
            self._partial.write(start * self._block_size, data)
            self._written(start, end, len(data))
            if self.on_written is not None:
                self.on_written(start * self._block_size, data)
        except DiskFull as e:
            # What reached the disk before it filled up is kept and resumed.
            self._written(start, start + e.written // self._block_size, e.written)
            self._error = e
        except WanxferError as e:
            self._error = e

    def _written(self, start, end, nbytes):
        with self._lock:
            set_bits(self._bitmap, start, end)
            self.written_bytes += nbytes
            fresh = self._fresh
            if fresh is not None and end > start:
                if fresh and fresh[-1][1] == start:
                    fresh[-1] = (fresh[-1][0], end)
                else:
                    fresh.append((start, end))

    def take_written(self):
        """The runs of blocks written since the last call (a writer made
        with `track`): a receiving worker tells its coordinator of them."""
        with self._lock:
            fresh, self._fresh = self._fresh, []
        return fresh

    def mark_written(self, ranges):
        """Blocks written by someone else (local data), now safely on disk."""
        with self._lock:
            for start, end in ranges:
                set_bits(self._bitmap, start, end)

    def written_bitmap(self):
        """A copy of the bitmap of blocks safely written."""
        with self._lock:
            return bytes(self._bitmap)

    def sync(self):
        """Wait until everything handed over is written."""
        self.flush()
        self._queue.join()
        if self._error is not None:
            raise self._error

    def close(self):
        self._queue.put(None)
        self._thread.join()


# ---------------------------------------------------------------------------
# Bulk transfer: server
# ---------------------------------------------------------------------------
# `serve`: a TCP listener and a UDP port of the same number.  Each client
# gets a ServerSession on a thread of its own and, once its first UDP datagram
# proves who it is, a UDP socket of its own connected back to the address that
# datagram came from (so NAT and stateful firewalls see replies to the
# client's own flow, and one client's traffic never queues behind another's).
#
# The parts:
#   CompressionPolicy    whether the next run of blocks goes compressed
#   OutgoingFile         one file sent: request, helper job, paced blocks, feedback and NAKs in
#   PendingHandshakes    accepted connections until they authenticate (PendingConnection each)
#   ServerSession        one client: control channel, keys, UDP flow; hands each fetch on
#   Server               the listener, the UDP port's HELLOs, a thread per session

COMMAND_TIMEOUT = 300.0         # s a client may idle between requests
HANDSHAKE_DEADLINE = 30.0       # s from accept to an authenticated peer, however slowly its bytes
                                # come: room for two lost segments' retransmissions at 1.2 s round
                                # trip (RTO 3.6 s, then 7.2), which 10 s was not
MAX_UNAUTHENTICATED = 64        # connections held before they authenticate (and at most a quarter
                                # of the process's descriptors: sessions need the rest) ...
MAX_UNAUTHENTICATED_PER_SOURCE = 8      # ... and from one address (IPv6: one /64)
ACCEPT_REST = (0.01, 1.0)       # s a listener rests after accept() fails for want of resources,
                                # doubling from the first figure to the second while it goes on
PACING_BURST = 0.002            # s of sending allowed in one go
SHARE_BATCH_BLOCKS = 16         # a striped share's batch when PACING_BURST of its rate is less (share_batch)
MIN_FEEDBACK_SILENCE = 0.5      # s without feedback before the rate is halved
LEAD_BYTES = 1 << 20            # a new file's first bytes sent before the client asks, at least:
LEAD_ROUNDS = 3                 # ... what goes in this many round trips (the first signature piece
                                # out and the first `need` back, and a lost segment of either, which
                                # TCP sends again after its tail loss probe's two round trips)
LEAD_WAIT = 0.2                 # ... and this (s: the first signature piece hashed and sent)
LEAD_GAIN = 2.0                 # ... at this times the rate then,
LEAD_FRACTION = 32              # ... and at most this fraction of the file
MAX_HELPERS = 128               # digest and signature threads a server runs at once
MAX_SESSION_HELPERS = 4         # ... and for one session (an aborted fetch's stops at its next read)


class CompressionPolicy:
    """Whether to send the next run of blocks compressed: only where the
    link, not the CPU, is the limit, and the data compresses (a sample at
    zlib level 1 saves a tenth).  The link is the limit when the path has
    never delivered more than MAX_RATE, well below what zlib and the
    receiver manage per core, and the sender waits for the pacer at least
    IDLE_ON of the time.  (Idle time alone misleads: compressing can make
    the receiver the bottleneck, the rate control then slows the sender,
    which looks idle, and compression stays on; a path that has shown it
    is faster is not held to that.)  A failed sample is not retried for
    SKIP_AFTER_MISS runs, so incompressible data costs next to nothing."""

    MAX_RATE = 150e6 / 8                # bytes/s on the wire
    IDLE_ON, IDLE_OFF = 0.3, 0.1        # hysteresis: compressing costs some of the idle time
    WINDOW = 0.2                        # s over which idle time is measured
    SKIP_AFTER_MISS = 32

    def __init__(self, allowed, rate):
        self.allowed = allowed
        self._rate = rate               # the RateController
        self.compressing = False
        self._idle = self._busy = 0.0
        self._skip = 0
        self.compressed = 0             # packets sent compressed

    def account(self, idle, busy):
        """Time the sender spent waiting (`idle`) and working since the last call."""
        self._idle += idle
        self._busy += busy
        total = self._idle + self._busy
        if total >= self.WINDOW:
            share = self._idle / total
            if share >= self.IDLE_ON:
                self.compressing = True
            elif share < self.IDLE_OFF:
                self.compressing = False
            self._idle = self._busy = 0.0

    def use_for(self, payload):
        if not (self.allowed and self.compressing and self._rate.rate < self.MAX_RATE
                and self._rate.peak_delivery < self.MAX_RATE):
            return False
        if self._skip:
            self._skip -= 1
            return False
        if compressible(payload):
            return True
        self._skip = self.SKIP_AFTER_MISS
        return False


def lead_bytes(rate, rtt):
    """How much of a new file goes before the client can ask for the rest:
    what the sender sends until the client's first `need` can come (a round
    trip and the first signature piece), with room for the startup's faster
    slots; LEAD_BYTES at least.  A shorter lead leaves the sender idle at
    the start of a long path (1 MB lasts half a second at the starting
    rate, the need comes 1.4 s after the start at 1.2 s round trip), and
    a slot sent while idle proves nothing, so the ramp loses a round trip
    more.  On a lossy path the piece or the need often loses a segment
    (the piece is about nine): TCP sends it again only after its tail loss
    probe, two round trips later, so the lead covers those too (at 10%
    loss the sender had run dry in 2 runs of 5 at 120 ms, 0.2-0.3 s each,
    and for a second at 1.2 s)."""
    return max(LEAD_BYTES, int(LEAD_GAIN * rate * (LEAD_ROUNDS * rtt + LEAD_WAIT)))


def lead_ranges(fd, size, block_size, lead_size=LEAD_BYTES, whole=False):
    """(lead, block ranges to send): how many of a new file's first blocks
    go before the client has looked for them locally (`lead_size` bytes,
    from lead_bytes(), and at most a LEAD_FRACTION of the file, so data
    found locally after all costs little; with `whole`, the client can find
    nothing but zeros, and only `lead_size` bounds it), less the blocks
    inside spans of zeros, which the signature will give away for free."""
    nblocks = (size + block_size - 1) // block_size
    lead = min(nblocks, max(1, min(lead_size, size if whole else size // LEAD_FRACTION) // block_size))
    head = os.pread(fd, min(size, -(-lead * block_size // DELTA_UNIT) * DELTA_UNIT), 0)
    zero_units = [is_zero(head[i:i + DELTA_UNIT]) for i in range(0, len(head), DELTA_UNIT)]
    ranges = []
    for block in range(lead):
        units = zero_units[block * block_size // DELTA_UNIT:
                           ((block + 1) * block_size - 1) // DELTA_UNIT + 1]
        if all(units):
            continue
        if ranges and ranges[-1][1] == block:
            ranges[-1][1] = block + 1
        else:
            ranges.append([block, block + 1])
    return lead, ranges


def share_batch(rate, block_size, largest, rtt=0.0, flows=1):
    """Blocks a striped share reads and sends at once: PACING_BURST of its
    rate, or where that is under SHARE_BATCH_BLOCKS, up to that many but
    no more than half a feedback interval of its rate at this round trip
    (`rtt`), or where each of the file's `flows` is acknowledged every k
    intervals (stretched_feedback), up to twice as many within a whole
    interval; at least one, at most `largest`.  A flow
    alone sends up to 64 KB a batch whatever its rate, but a share's
    acknowledgements are merged with the others' (SharedRate), and a
    share with a small part of the rate (the coordinator's, 0.13 of it)
    sending 45 blocks once in 20 ms had news of them in every other
    acknowledgement interval: the merged send time lurched by 20 ms at a
    time, the slots measured on it said the path delivered 15% more than
    it does, and the level crept past the path's rate until the queue
    overflowed (a model test; on the real link at 120 ms, 223 queue drops
    in one run and 963 in two, where one flow dropped none).  Half an
    interval still puts news of every share in every acknowledgement,
    and at a long path's slow rate it is fewer batches, each a wakeup, a
    read, a sealing and a send: 2 ms batches of 8 blocks at 92 Mbit/s
    across 300 ms cost the two sending workers twice one's CPU per GB.
    With 16 blocks two shares still sent 12,926 batches across S4 where
    one flow sent 4,945: the most of N=2's extra CPU at the sending end.
    Each flow's news there comes once in k intervals and reaches the rate
    control an interval at a time (SharedRate), evenly spread over the
    send time it covers, which a batch of an interval no more than fills."""
    burst = int(rate * PACING_BURST / block_size)
    if burst < SHARE_BATCH_BLOCKS:
        span, most = feedback_interval(rtt) / 2, SHARE_BATCH_BLOCKS
        if stretched_feedback(rtt, flows):
            span, most = 2 * span, 2 * most
        burst = max(burst, min(most, int(rate * span / block_size)))
    return max(1, min(largest, burst))


def seal_compressed_run(sealer, sid, seq, first, count, block_size, payload, flags, stamp,
                        blocks=None):
    """Datagrams for a run of blocks (`first` on, or those listed in
    `blocks`), each compressed on its own when that saves at least a
    tenth; returns (datagrams, how many compressed)."""
    if blocks is None:
        blocks = range(first, first + count)
    packets, compressed = [], 0
    view = memoryview(payload)
    for i in range(count):
        block = view[i * block_size:(i + 1) * block_size]
        packed = zlib.compress(block, 1)
        body, block_flags = block, flags
        if len(packed) < 0.9 * len(block):
            body, block_flags = packed, flags | DATA_FLAG_ZLIB
            compressed += 1
        header = DATA_HEADER.pack(KIND_DATA, block_flags, sid, seq + i, blocks[i], stamp)
        packets.append(header + sealer.seal(seq + i, header, body))
    return packets, compressed


class OutgoingFile:
    """One file on its way out, from the request that asks for it to the
    digest that closes it: what socketserver calls the request handler,
    with the session as the connection.  It borrows the session's channels
    (control channel, DatagramSocket, the sealers of both directions, the
    session id, the RateController, the PacketLog) and assumes nothing
    about which end it runs at.

    In order: open() (RemoteError if the file cannot be sent as asked),
    start_helper(), start(), run(), finish() if run() returned True, and
    close() in any case.  The flow's next packet number (`next_seq`) and
    round-trip estimate (`rtt`) are the session's to take back after.

    run() waits on both channels and calls one step per job: signature
    pieces out, pacing and sending, control messages in, datagrams in
    (feedback, NAKs), the feedback-silence timer.  A test drives the steps
    itself, with stand-ins for the channels and the `clock`."""

    def __init__(self, control, udp, sealer, opener, session_id, rate, log, first_seq, rtt,
                 clock=time.monotonic):
        self._control = control
        self._udp = udp
        self._sealer = sealer                   # data out
        self._opener = opener                   # feedback and NAKs in
        self._session_id = session_id
        self._rate = rate
        self._log = log
        self._first_seq = first_seq
        self.rtt = rtt
        self._clock = clock
        # The file, from open() on.
        self.size = self.mtime_ns = self.mode = 0
        self.block_size = self.nblocks = 0
        self.delta = False
        self.lead = 0                           # blocks sent before the receiver asks
        self.file_id = 0
        self._path = None
        self._fd = None
        self._is_open = False                   # asked for without size and mtime
        self._need = []
        self.compression = None
        self._jobs = self._job = None           # its digest, or a delta's signature
        self._refiner = None
        self.window = None
        # What the digest message reports.
        self.wire_bytes = self.signature_bytes = 0
        # The receiver asked for the whole file's SHA-256 as soon as it is
        # known (a `checksum`), so that it need not wait for the digest.
        self.early_digest = self.checksum_sent = False
        # The data phase, from one wakeup to the next.
        self.outcome = None                     # True: the receiver holds it all; False: gave up
        self.failure = None                     # why the sender gave up, when it did
        self._signature_sent = self._refined_sent = 0
        self._budget = 0.0
        self._dry = False                       # the rate was told it has nothing to send
        self._last_tick = self._busy_from = self._last_feedback = 0.0
        self._per_packet = 0
        self._max_batch = 1
        self._buffer = bytearray(RECV_BUFFER)
        # Striped over worker processes (stripe()): this end sends part 0.
        self.team = None                        # the SendingTeam
        self.workers = 1                        # how many share this file
        self.stripe_blocks = 0
        self.stripe_cycle = None                # how stripes are dealt (None: round robin)
        self._parts = None                      # each worker's first need
        self.shared_rate = None                 # the SharedRate the workers send by
        self.striped = False                    # a share of a striped file (this end's, or a worker's)

    # -- before the data phase ----------------------------------------------

    def open(self, path, remote, request, largest_block, max_rate=None):
        """Open `path` for `request` (a fetch validate_message has seen) and
        decide how to send it; RemoteError (named by `remote`) if it cannot
        be sent as asked.  An *open* request leaves out size and mtime: it
        takes the file as it is now and the block size is fitted to
        `largest_block`.  `max_rate` is this end's own cap."""
        self._path = path
        self._is_open = 'size' not in request
        try:
            self._fd = open_regular(path)
        except OSError as e:
            raise RemoteError('%s: %s' % (remote, e.strerror))
        st = os.fstat(self._fd)
        if not self._is_open and (st.st_size != request.get('size') or
                                  st.st_mtime_ns != request.get('mtime_ns')):
            raise RemoteError('%s: changed on the server during the transfer' % remote)
        self.size, self.mtime_ns, self.mode = st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode)
        block_size = int(request.get('block_size', 0))
        if self._is_open:
            block_size = min(block_size, largest_block)
        if not MIN_BLOCK_SIZE <= block_size <= largest_block:
            raise RemoteError('block size %d does not fit this path' % block_size)
        self.block_size = block_size
        self._sealer.set_stride(block_size)
        caps = [r for r in (max_rate, request.get('max_rate')) if r]
        self._rate.set_cap(float(min(caps)) if caps else None)
        self.nblocks = (self.size + block_size - 1) // block_size
        self.delta = bool(request.get('delta')) and self.size >= int(request.get('delta_min', 0))
        if self._is_open:
            self._need = [] if self.delta else [(0, self.nblocks)]
        else:
            self._need = self._need_ranges(request.get('need', []))
        # A file new to the receiver is mostly sent: its first blocks go at
        # once, while the receiver looks for the rest among its own data.
        if self.delta and request.get('lead'):
            self.lead, self._need = lead_ranges(self._fd, self.size, block_size,
                                                lead_bytes(self._rate.rate, self.rtt),
                                                whole=bool(request.get('whole_lead')))
        self.compression = CompressionPolicy(bool(request.get('compress')), self._rate)
        self.early_digest = bool(request.get('early_digest'))

    def stripe(self, team, count):
        """Share the file with workers 1..count-1 of `team`: blocks in
        stripes of about STRIPE_BYTES, this end sending the first; the one
        rate budget divided as the stripes are.  A client that takes a
        weighted deal (`cycle`) gives this end fewer stripes, as it alone
        also runs the control channel, the rate control and the digest."""
        self.team, self.workers = team, count
        self.stripe_blocks = max(1, STRIPE_BYTES // self.block_size)
        if team.cycles:
            # A delta's need comes later (a new file's: nearly all of it).
            needed = self.nblocks if self.delta else sum(end - start for start, end in self._need)
            self.stripe_cycle = stripe_cycle(count, worker_extras(self.nblocks, needed, self.delta,
                                                                  self.block_size))
        cycle = self.stripe_cycle or list(range(count))
        self._parts = split_stripes(self._need, self.stripe_blocks, count, cycle)
        self._need = self._parts[0]
        self.striped = True
        self.shared_rate = SharedRate(self._rate, count, team.rate_changed,
                                      cycle_shares(cycle, count))
        self._rate = self.shared_rate.share(0)
        self.compression._rate = self._rate

    def start_helper(self, digests, signatures, owner=None):
        """Begin (or join) the thread that reads the file for its digest
        (from `digests`, a DigestCache), or for a delta transfer its
        signature (from `signatures`, a SignatureCache), which gives the
        digest too.  `owner` is the key the helper slots count it under
        (the session's); RemoteError if no slot is free."""
        if self.team is not None:
            # Striped: worker 1 reads the file, so that no process's own
            # work outgrows its share (its stripes are fewer by as much).
            self._job = self._jobs = self.team.relayed_job(self)
        else:
            jobs = signatures if self.delta else digests
            self._job = jobs.start(self._path, owner)
            self._jobs = jobs
        if self.delta:
            self._refiner = SpanRefiner(self._path, self.size)

    def start(self, file_id):
        """Announce the file under `file_id` (a flow numbers its files from
        1) and set the clocks of the data phase going."""
        start = {'op': 'start', 'file': file_id, 'first_seq': self._first_seq, 'lead': self.lead}
        if self._is_open:
            start.update(size=self.size, mtime_ns=self.mtime_ns, mode=self.mode,
                         block_size=self.block_size, delta=self.delta)
        if self.team is not None:
            start.update(stripe=self.stripe_blocks,
                         workers=[self.team.next_seq(i) for i in range(1, self.workers)])
            if self.stripe_cycle is not None:
                start['cycle'] = self.stripe_cycle
        self.begin(file_id)
        self._control.send(start)
        if self.team is not None:
            self.team.send_file(self, self._parts)

    def begin(self, file_id):
        """The data phase's window and clocks (start() without the
        announcement: a worker's coordinator made it)."""
        self.file_id = file_id
        self.window = SendWindow(self._need, self._first_seq, self._log)
        udp = self._udp
        self._per_packet = PACKET_OVERHEAD + ip_udp_overhead(udp.sock.family)
        # One read and one offloaded send per batch: about 64 KB either way.
        self._max_batch = max(1, min(MAX_GSO_SEGMENTS if udp.gso else 8,
                                     MAX_DATAGRAM_BATCH // self.block_size))
        now = self._clock()
        self._last_feedback = self._last_tick = self._busy_from = now
        if file_id > 1:
            self._rate.on_idle(now)             # idle since the last file
            self._dry = True
        self._rate.on_start(now, self.rtt)

    @property
    def next_seq(self):
        """The first packet number not used by this file."""
        return self._first_seq if self.window is None else self.window.next_seq

    def _need_ranges(self, ranges):
        """Block ranges the receiver asked for (validate_message saw their
        types), each inside this file."""
        for start, end in ranges:
            if end > self.nblocks:
                raise ProtocolError('blocks [%d, %d) asked for of a file of %d'
                                    % (start, end, self.nblocks))
        return [(start, end) for start, end in ranges]

    # -- the data phase: a loop and its steps -------------------------------

    def run(self):
        """The paced data phase.  True when the receiver reports every block
        held, False if it gave up or vanished (`failure` says why, when it
        went silent).  With a signature, its pieces go out as they are
        computed, the receiver asks for finer spans where it found nothing,
        and answers each piece with the blocks it still needs."""
        sock = self._control.sock
        timeout = sock.gettimeout()
        selector = selectors.DefaultSelector()
        selector.register(self._udp.sock, selectors.EVENT_READ, self.read_datagrams)
        selector.register(sock, selectors.EVENT_READ, self.read_control)
        if self.team is not None:
            self.team.watch(selector, self)
        sock.setblocking(False)
        try:
            self.apply_control()                # what came in with the request, or after it
            while self.outcome is None:
                self.send_signature()
                self.send_checksum()
                wait = min(self.pace_and_send(), self.signature_poll(), self.checksum_poll())
                for key, _events in self.wait(selector, wait):
                    if self.outcome is None:
                        key.data()
                if self.outcome is None:
                    self.check_silence()
            return self.outcome
        finally:
            selector.close()
            if self._refiner is not None:
                self._refiner.close()
            # The session's timeout again, not setblocking(True): that is no
            # timeout at all, and a wait for the next request would never end.
            sock.settimeout(timeout)

    def send_signature(self):
        """Step: the signature pieces, and the refinements asked for, that
        were computed since the last wakeup go out."""
        if self._refiner is None:
            return
        signature, refiner = self._job, self._refiner
        self._control.flush()
        if self._signature_sent < len(signature.pieces) or signature.error is not None:
            self._signature_sent = self._send_pieces(signature, self._signature_sent, False)
        if self._refined_sent < len(refiner.answers) or refiner.error is not None:
            self._refined_sent = self._send_pieces(refiner, self._refined_sent, True)

    def _send_pieces(self, source, sent, refined):
        """Send the signature pieces (or refinements) `source` made since
        the last call; returns how many have been sent in all."""
        if source.error is not None:
            raise RemoteError('cannot read the file for its signature: %s' % source.error.strerror)
        # Pieces go as the control socket takes them, never blocking: at
        # the start of a long path TCP passes a few of them a round trip,
        # and a blocking send there held the data and its acknowledgements
        # for a second and more.  The backlog stays small: the pieces wait
        # in `source`, the receiver reads them in order.
        control = self._control
        for offset, spans in (source.answers if refined else source.pieces)[sent:]:
            if control.backlog >= CONTROL_BACKLOG:
                break
            message = {'op': 'signature', 'file': self.file_id, 'offset': offset, 'spans': spans}
            if refined:
                message['refined'] = True
            control.queue(message)
            self.signature_bytes += len(spans) + SIGNATURE_PIECE_BYTES
            sent += 1
        return sent

    def send_checksum(self):
        """Step: the whole file's SHA-256 goes to a receiver that asked for
        it early as soon as the helper has it (usually long before the last
        block: it reads the file while the data flows), queued like the
        signature pieces so the data never waits for the control socket.
        The receiver then finishes the file without waiting for `digest`.
        A helper that failed sends nothing: finish() says why."""
        if not self.early_digest:
            return
        control = self._control
        if self.checksum_sent:
            if control.backlog and self._refiner is None:
                control.flush()                 # send_signature() flushes a delta's
            return
        if not self._job.done.is_set():
            return
        self.checksum_sent = True
        try:
            sha256 = self._job.sha256()
        except RemoteError:
            return
        control.queue({'op': 'checksum', 'file': self.file_id, 'sha256': sha256})

    def checksum_poll(self):
        """Seconds until the checksum needs looking at again: SIGNATURE_POLL
        while the helper works on it or it waits to be sent."""
        if self.early_digest and (not self.checksum_sent or self._control.backlog):
            return SIGNATURE_POLL
        return float('inf')

    def signature_poll(self):
        """Seconds until the signature needs looking at again: SIGNATURE_POLL
        while pieces or refinements are being computed or wait to be sent."""
        if self._refiner is None:
            return float('inf')
        if not self._job.done.is_set() or self._refiner.busy() or self._control.backlog \
                or self._signature_sent < len(self._job.pieces) \
                or self._refined_sent < len(self._refiner.answers):
            return SIGNATURE_POLL
        return float('inf')

    def pace_and_send(self):
        """Step: send what the pacer's budget and the flight cap allow now;
        returns the seconds until more may go.  The hot path: the names the
        loop uses are looked up once a wakeup, not once a run."""
        now = self._clock()
        rate, window, block_size = self._rate, self.window, self.block_size
        rate.on_tick(now)
        if self._dry and window.has_work():
            self._dry = False
            rate.on_busy(now)                   # a share lent while idle is taken back first
        budget = min(self._budget + rate.rate * (now - self._last_tick),
                     rate.rate * PACING_BURST + 65536)
        self._last_tick = now
        flight_cap = max(256, int(rate.rate * (2 * self.rtt + 0.2) / block_size))
        if budget > 0 and window.has_work() and window.in_flight() < flight_cap:
            sealer, udp, compression, fd = self._sealer, self._udp, self.compression, self._fd
            sid, per_packet, max_batch = self._session_id, self._per_packet, self._max_batch
            # Past the startup, the packets say so: then the receiver of a
            # striped file's flow may acknowledge it less often.
            steady = DATA_FLAG_STEADY if rate.steady else 0
            if self.striped:
                max_batch = share_batch(rate.rate, block_size, max_batch, self.rtt,
                                        self.workers if steady else 1)
            pack_header = DATA_HEADER.pack
            stamp = int(now * 1e6) & 0xFFFFFFFF
            while budget > 0 and window.has_work() and window.in_flight() < flight_cap:
                again = window.next_resends(max_batch)
                if again:
                    budget -= self._send_again(again, stamp, now, steady)
                    continue
                first, count, resend = window.next_run(max_batch)
                payload = os.pread(fd, count * block_size, first * block_size)
                flags = (DATA_FLAG_RETRANSMIT if resend else 0) | steady
                seq = window.next_seq
                if compression.use_for(payload):
                    packets, compressed = seal_compressed_run(
                        sealer, sid, seq, first, count, block_size, payload, flags, stamp)
                    compression.compressed += compressed
                    sizes = [len(p) + per_packet - PACKET_OVERHEAD for p in packets]
                    wire = sum(sizes)
                else:
                    headers = [pack_header(KIND_DATA, flags, sid, seq + i, first + i, stamp)
                               for i in range(count)]
                    packets = sealer.seal_run(seq, headers, payload)
                    wire = len(payload) + count * per_packet
                    sizes = block_size + per_packet     # the last block of a file may be less
                window.sent_run(first, count, now, resend, sizes)
                udp.send_packets(packets)
                self.wire_bytes += wire
                budget -= wire
        self._budget = budget
        if not window.has_work():
            rate.on_idle(now)
            self._dry = True
        if window.has_work() and window.in_flight() < flight_cap:
            return max(0.0, -budget / rate.rate)
        return 0.05

    def _send_again(self, blocks, stamp, now, steady=0):
        """Send `blocks` again as one batch: consecutive packet numbers, so
        one seal and one system call, though the blocks are scattered
        (`steady`: DATA_FLAG_STEADY or 0).  The wire bytes."""
        block_size, sid, fd, window = self.block_size, self._session_id, self._fd, self.window
        last = self.nblocks - 1
        if last in blocks and self.size - last * block_size < block_size:
            blocks.remove(last)
            blocks.append(last)                 # a short block only as the batch's last
        payload = b''.join([os.pread(fd, block_size, block * block_size) for block in blocks])
        seq, flags = window.next_seq, DATA_FLAG_RETRANSMIT | steady
        if self.compression.use_for(payload):
            packets, compressed = seal_compressed_run(
                self._sealer, sid, seq, blocks[0], len(blocks), block_size, payload, flags, stamp,
                blocks)
            self.compression.compressed += compressed
            sizes = [len(p) + self._per_packet - PACKET_OVERHEAD for p in packets]
            wire = sum(sizes)
        else:
            pack_header = DATA_HEADER.pack
            packets = self._sealer.seal_run(seq, [pack_header(KIND_DATA, flags, sid, seq + i, block,
                                                              stamp)
                                                  for i, block in enumerate(blocks)], payload)
            wire = len(payload) + len(blocks) * self._per_packet
            sizes = block_size + self._per_packet       # the last block of a file may be less
        window.sent_again(blocks, now, sizes)
        self._udp.send_packets(packets)
        self.wire_bytes += wire
        return wire

    def wait(self, selector, timeout):
        """Wait for either channel, at most `timeout` seconds; the time spent
        waiting tells the compression policy whether the link is the limit."""
        idle_from = self._clock()
        self.compression.account(0.0, idle_from - self._busy_from)
        events = selector.select(timeout)
        self._busy_from = self._clock()
        self.compression.account(self._busy_from - idle_from, 0.0)
        return events

    def read_control(self):
        """Step: the control messages that came in; a hang-up ends the file."""
        data = self._control.sock.recv(65536)
        if not data:
            self.outcome = False
            return
        self._control.feed(data)
        if self.apply_control():
            self._last_feedback = self._clock()    # the receiver is alive and answering

    def apply_control(self):
        """The control messages read but not yet applied: the request's
        read may have taken the next ones along.  False if one ended the
        data phase."""
        for message in self._control.messages():
            if self.on_control(message) is not None:
                return False
        return True

    def on_control(self, message):
        """Apply one control message: `outcome` (True when the receiver holds
        the whole file, False if it gave up), or None to go on."""
        op = message['op']
        if op == 'abort':
            self.outcome = False
        elif message.get('file') == self.file_id:     # not a late word about an earlier file
            if op == 'done':
                self.outcome = True
            elif op == 'need':
                held = self._need_ranges(message.get('held', []))
                ranges = self._need_ranges(message['ranges'])
                if self.team is not None:
                    held, ranges = self.team.forward_need(self, held, ranges)
                self.window.withdraw(held)
                self.window.add_need(ranges)
            elif op == 'refine' and self._refiner is not None:
                self._refiner.request(int(message['offset']), int(message['end']))
        return self.outcome

    def read_datagrams(self):
        """Step: the feedback and NAKs waiting, a bounded number of receives
        at a time: a flood must not stop the sending."""
        udp, buffer, clock = self._udp, self._buffer, self._clock
        for _ in range(MAX_RECEIVES_PER_WAKEUP):
            nbytes, segment = udp.recv_batch(buffer)
            if not nbytes:
                break
            now = clock()
            for offset in range(0, nbytes, segment):
                if self.on_datagram(buffer, offset, min(segment, nbytes - offset), now):
                    self._last_feedback = now
        if isinstance(self._control, ControlChannel) and self._control.pending() \
                and self.apply_control():
            self._last_feedback = clock()       # copies of its control frames came

    def on_datagram(self, buffer, offset, length, now):
        """Apply one feedback or NAK datagram; True if it was authentic.  A
        copy of a control frame goes to the control channel."""
        if length < PACKET_HEADER.size + TAG_SIZE:
            return False
        kind, _flags, sid, seq = PACKET_HEADER.unpack_from(buffer, offset)
        if sid != self._session_id:
            return False
        if kind == KIND_CONTROL:
            if isinstance(self._control, ControlChannel):      # not a worker's share
                self._control.offer(seq, bytes(buffer[offset + PACKET_HEADER.size:offset + length]))
            return False
        view = memoryview(buffer)
        body = self._opener.open(seq, view[offset:offset + PACKET_HEADER.size],
                                 view[offset + PACKET_HEADER.size:offset + length])
        if body is None:
            return False
        window = self.window
        try:
            if kind == KIND_FEEDBACK:
                fid, start, largest, ack_delay, queue_us, gaps = decode_feedback(body)
                if fid != self.file_id:
                    return True
                sent_at = None
                if window.first_seq <= largest < window.next_seq:
                    sent_at = self._log.times[largest & (PacketLog.SIZE - 1)]
                    sample = now - sent_at - ack_delay / 1e6
                    if sample > 0:
                        self.rtt = 0.875 * self.rtt + 0.125 * sample
                acked = window.largest_acked
                delivered, lost, delivered_bytes = window.on_ack(start, largest, gaps, now, self.rtt)
                # A striped share's receiver repeats its last acknowledgement
                # once complete: news of nothing, and of no queue, which the
                # shared controller would take for the least queue of all.
                if not (self.striped and largest <= acked):
                    self._rate.on_feedback(now, queue_us / 1e6, delivered_bytes, delivered, lost,
                                           self.rtt, False, sent_at, ack_delay / 1e6)
            elif kind == KIND_NAK:
                fid, ranges = decode_nak(body)
                if fid == self.file_id:
                    window.on_nak(ranges, now, self.rtt)
        except ProtocolError:
            return False
        return True

    def check_silence(self):
        """Step: the feedback-silence timers.  Data in flight and no word for
        a while halves the rate (RateController.on_silence); no word for
        DATA_TIMEOUT gives up.  With nothing in flight the receiver is busy
        finding its local data (or will say done): only its hanging up, or
        COMMAND_TIMEOUT, ends the wait."""
        silence = self._clock() - self._last_feedback
        window = self.window
        idle = not window.in_flight() and not window.has_work()
        if silence > (COMMAND_TIMEOUT if idle else DATA_TIMEOUT):
            self.failure = 'no feedback for %d s' % silence
            self.outcome = False
            return
        quiet = max(MIN_FEEDBACK_SILENCE, 4 * self.rtt)
        if silence > quiet and window.in_flight() > 0:
            self._rate.on_silence()
            self._last_feedback += quiet

    # -- after it -----------------------------------------------------------

    def finish(self):
        """The receiver holds every block: send the whole file's digest
        (waiting for the helper if need be) and what the sending cost."""
        window = self.window
        counts = [window.next_seq - window.first_seq, window.lost, window.retransmitted,
                  self.wire_bytes, self.compression.compressed]
        if self.team is not None:
            counts = [mine + theirs for mine, theirs in zip(counts, self.team.end_file(self))]
        self._control.send({
            'op': 'digest', 'file': self.file_id, 'sha256': self._job.sha256(),
            'packets_sent': counts[0], 'packets_lost': counts[1],
            'packets_retransmitted': counts[2], 'wire_bytes': counts[3],
            'signature_bytes': self.signature_bytes, 'packets_compressed': counts[4]})

    def close(self):
        """Let go of the helper job and the file (the refiner stops with run()),
        and of the workers' shares."""
        if self.team is not None and self.window is not None:
            try:
                self.team.end_file(self)
            except ProtocolError:
                pass                            # the team is broken: the session ends
        if self._job is not None:
            self._jobs.release(self._job)
            self._job = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def connection_source(address):
    """What the per-source cap counts by: the IPv4 address, or the /64 of an
    IPv6 one (a single host commonly holds a whole /64)."""
    host = address[0]
    if host.startswith('::ffff:') and '.' in host:
        return host[7:]
    if ':' not in host:
        return host
    try:
        return socket.inet_pton(socket.AF_INET6, host.split('%', 1)[0])[:8]
    except (OSError, ValueError):
        return host


def unauthenticated_limit():
    """MAX_UNAUTHENTICATED, or a quarter of the descriptors the process may
    open if that is less: connections that have not authenticated must not
    take the descriptors that sessions (UDP socket, files) need."""
    try:
        import resource                 # Unix only
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return MAX_UNAUTHENTICATED
    if soft < 0 or soft == resource.RLIM_INFINITY:
        return MAX_UNAUTHENTICATED
    return max(1, min(MAX_UNAUTHENTICATED, soft // 4))


class PendingConnection:
    """One accepted connection until its peer has authenticated.  The gate
    (PendingHandshakes) collects its HELLO without blocking; then a thread
    calls handshake(), for which this object stands in for the socket."""

    def __init__(self, gate, sock, address, deadline):
        self.sock = sock
        self.address = address
        self.name = '%s:%d' % address[:2]
        self.source = connection_source(address)
        self.deadline = deadline
        self.hello = bytearray()
        self.proving = False            # the HELLO is in: a handshake thread owns the socket
        self.dropped = None             # why the gate gave up on it
        self.early = None               # what EarlyHandshakes.claim() made of an early HELLO
        self._gate = gate

    def hello_size(self):
        """The bytes the HELLO takes: an early one brings its EARLY_PROOF."""
        if len(self.hello) >= HELLO_PREFIX.size and self.hello[HELLO_PREFIX.size - 1] & FLAG_EARLY:
            return HELLO.size + EARLY_PROOF.size
        return HELLO.size

    def handshake(self, secret, encrypt):
        """server_handshake() over this connection, on the calling thread,
        within what is left of its deadline.  Returns what that returns;
        raises what it raises, or a ProtocolError saying why the gate
        dropped the connection meanwhile.  Either way the gate has let go:
        the socket is the caller's to use or close."""
        try:
            result = server_handshake(self, secret, encrypt, self.early)
        except BaseException:
            dropped = self._gate.release(self)
            if dropped is not None:
                raise ProtocolError(dropped)
            raise
        dropped = self._gate.release(self)
        if dropped is not None:
            raise ProtocolError(dropped)
        return result

    # The socket as server_handshake() sees it: the HELLO the gate already
    # read comes first, and every wait is bounded by the one deadline, so a
    # peer cannot stretch the handshake by sending a byte at a time.

    def recv(self, size):
        if self.hello:
            data = bytes(self.hello[:size])
            del self.hello[:size]
            return data
        return self._bounded(self.sock.recv, size)

    def sendall(self, data):
        return self._bounded(self.sock.sendall, data)

    def _bounded(self, operation, argument):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise ProtocolError(self._gate.late)
        self.sock.settimeout(left)
        try:
            return operation(argument)
        except socket.timeout:
            raise ProtocolError(self._gate.late)

    def __getattr__(self, name):
        # Whatever else a revised handshake may ask of its socket.
        if name == 'sock':
            raise AttributeError(name)
        return getattr(self.sock, name)


class PendingHandshakes:
    """The gate between accept() and an authenticated session, for a
    listener served by an EventLoop (`serve`'s accept loop, `tunnel
    --listen`'s loop).  A thread per accepted connection, each with a
    timeout per recv, let peers that send a byte now and then hold threads
    and descriptors for ever and lock everyone else out; here:

    - Until its HELLO is complete a connection costs a non-blocking socket
      the loop watches and a few bytes, no thread.  admit() takes it from
      accept; once the HELLO is in (HELLO.size bytes, and EARLY_PROOF.size
      more for an early one), `start(pending)` (the owner's)
      must run pending.handshake() on a thread of its own, which calls the
      unchanged server_handshake(), or, if no thread can be had, call
      abandon().  So threads in the handshake are bounded by the caps below.
    - Each connection has `deadline` seconds (HANDSHAKE_DEADLINE) from
      accept to authenticated in all, however its bytes trickle in.
    - At most `limit` connections are pending, and at most `per_source`
      from one source address: a newcomer over either cap pushes out the
      oldest pending connection (of its own source, if that cap is the one
      reached), never itself, so a real client gets in even while an
      attacker keeps slots filled with slow connections.
    - make_room() closes the oldest one still sending its HELLO, for an
      accept() that found the process out of descriptors (see Acceptor).

    Every connection dropped is logged in one line, `label % (name, reason)`;
    one dropped during its handshake thread is logged by that thread's
    owner.  release() is called from handshake threads, the rest on the
    loop."""

    def __init__(self, loop, start, log, label, deadline=None, limit=None,
                 per_source=MAX_UNAUTHENTICATED_PER_SOURCE):
        self.loop = loop
        self.deadline = HANDSHAKE_DEADLINE if deadline is None else deadline
        self.limit = unauthenticated_limit() if limit is None else limit
        self.per_source = min(per_source, self.limit)
        self.late = 'no complete handshake within %g s' % self.deadline
        self._start = start
        self._log = log
        self._label = label
        self._pending = collections.OrderedDict()      # PendingConnection -> None, oldest first
        self._sources = collections.Counter()
        self._lock = threading.Lock()
        self._timer = None

    def __len__(self):
        with self._lock:
            return len(self._pending)

    def admit(self, sock, address):
        """Take a connection just accepted."""
        pending = PendingConnection(self, sock, address, time.monotonic() + self.deadline)
        sock.setblocking(False)
        with self._lock:
            if self._sources[pending.source] >= self.per_source:
                victim = next(p for p in self._pending if p.source == pending.source)
            elif len(self._pending) >= self.limit:
                victim = next(iter(self._pending))
            else:
                victim = None
            self._pending[pending] = None
            self._sources[pending.source] += 1
        if victim is not None:
            self._drop(victim, 'pushed out by newer connections that have not authenticated')
        self.loop.watch(sock, selectors.EVENT_READ, lambda mask: self._read(pending))
        if self._timer is None:
            self._timer = self.loop.call_later(self.deadline, self._expire)

    def make_room(self):
        """Close the oldest connection still sending its HELLO; False if
        there is none."""
        with self._lock:
            victim = next((p for p in self._pending if not p.proving), None)
        if victim is None:
            return False
        self._drop(victim, 'pushed out: the process is out of file descriptors')
        return True

    def release(self, pending):
        """The handshake thread is done with `pending`: None, or why the
        gate dropped it meanwhile."""
        with self._lock:
            if pending.dropped is None and pending in self._pending:
                self._forget(pending)
            return pending.dropped

    def abandon(self, pending, reason):
        """For start() when it cannot hand the connection to a thread."""
        with self._lock:
            if pending in self._pending:
                self._forget(pending)
            pending.dropped = reason
        pending.sock.close()
        self._log(self._label % (pending.name, reason))

    def close(self):
        """Hang up on every connection still pending (the listener is closing)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        with self._lock:
            everyone = list(self._pending)
        for pending in everyone:
            self._drop(pending, 'shutting down', log=False)

    def _forget(self, pending):
        del self._pending[pending]
        self._sources[pending.source] -= 1
        if not self._sources[pending.source]:
            del self._sources[pending.source]

    def _drop(self, pending, reason, log=True):
        with self._lock:
            if pending not in self._pending:
                return
            self._forget(pending)
            pending.dropped = reason
            if pending.proving:
                # Its thread may be blocked on the socket: wake it.  The
                # thread reports and closes (the lock keeps the descriptor
                # from being closed and reused under this shutdown).
                try:
                    pending.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
        self.loop.watch(pending.sock, 0, None)
        pending.sock.close()
        if log:
            self._log(self._label % (pending.name, reason))

    def _read(self, pending):
        try:
            data = pending.sock.recv(pending.hello_size() - len(pending.hello))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            # A peer gone before its first byte is not worth a line: a
            # racing connect that lost (connect_racing), a port probe.
            self._drop(pending, e.strerror or str(e), log=bool(pending.hello))
            return
        if not data:
            self._drop(pending, 'connection closed by peer', log=bool(pending.hello))
            return
        pending.hello += data
        if len(pending.hello) < pending.hello_size():
            return
        self.loop.watch(pending.sock, 0, None)
        with self._lock:
            pending.proving = True
        self._start(pending)

    def _expire(self):
        self._timer = None
        now = time.monotonic()
        with self._lock:
            # Admission order is deadline order.
            late = list(itertools.takewhile(lambda p: p.deadline <= now, self._pending))
        for pending in late:
            self._drop(pending, self.late)
        with self._lock:
            oldest = next(iter(self._pending), None)
        if oldest is not None:
            self._timer = self.loop.call_later(max(0.0, oldest.deadline - now), self._expire)


class ServerSession:
    """One client, from handshake to hang-up: the control channel, the
    session keys, the UDP flow (its socket, packet numbers, rate and round
    trip, which go on from one file to the next) and the helper threads
    counted against it.  Answers `list` and `read` itself; each `fetch` is
    handed to an OutgoingFile, which runs the paced data phase until the
    client says it holds every block, then sends the whole-file digest."""

    def __init__(self, server, sock, address, registry=None):
        self.server = server
        self.registry = server if registry is None else registry
        self.sock = sock
        self.address = address
        self.session_id = None
        self.control = None
        self.data_out = self.data_in = None     # the data channel's Sealers
        self.udp = None
        self.route_mtu = None                   # once the UDP flow is open
        self._udp_address = None
        self._udp_ready = threading.Event()
        # The UDP flow, across its files: packet numbers never repeat.
        self._log = PacketLog()
        self._next_seq = 0
        self._file_id = 0
        self.rate = RateController(server.max_rate)
        self.rtt = 0.1
        self.keys = None
        self.team = None                        # the SendingTeam, once the client asked for workers
        self._early_hellos = {}                 # worker index: (HELLO, address) before the team
        self._hello_lock = threading.Lock()
        # The last request was a file the client said it holds: a client
        # that had its checksum early may hang up now without reading the
        # digest (a reset, as data it never read was waiting), a normal end.
        self._after_done = False

    def hello_datagram(self, datagram, address):
        """A HELLO datagram naming this session arrived from `address` (on
        the listener's loop, or a session process's listener thread): the
        client's UDP flow starts there if its tag checks out.  One whose
        flags name a worker opens that worker's flow.  A copy of a control
        frame that came before the session's flow was open goes to its
        control channel."""
        if self.data_in is None or len(datagram) < PACKET_HEADER.size + TAG_SIZE:
            return
        if datagram[0] == KIND_CONTROL:
            self._take_copy(datagram)
            return
        if datagram[1]:
            with self._hello_lock:
                team = self.team
                if team is None:
                    # A client forks its workers with its first request: their
                    # HELLOs may come before its `workers`.  The last one of each
                    # (at most MAX_WORKERS) waits for the team; the tag is checked then.
                    if datagram[1] < MAX_WORKERS:
                        self._early_hellos[datagram[1]] = (datagram, address)
                    return
            team.hello(datagram[1], datagram, address)
            return
        view = memoryview(datagram)
        if hmac.compare_digest(self.data_in.tag(view[:PACKET_HEADER.size], b''),
                               bytes(view[PACKET_HEADER.size:])) and self._udp_address is None:
            self._udp_address = address
            self._udp_ready.set()

    def run(self, pending):
        """The session's thread, from the HELLO on: `pending` (see
        PendingHandshakes) has it."""
        try:
            keys, self.rtt = pending.handshake(self.server.secret, self.server.encrypt)
            self.sock.settimeout(HANDSHAKE_TIMEOUT)
            self.session_id = keys.session_id
            self.keys = keys
            ctrl_out, ctrl_in, self.data_out, self.data_in = keys.sealers('server')
            self.control = ControlChannel(self.sock, ctrl_out, ctrl_in, peer='client')
            if not self.registry.register(self):
                raise ProtocolError('session id collision')
            if not self._udp_ready.wait(UDP_SETUP_TIMEOUT):
                self.control.send({'op': 'error', 'message':
                                   'no UDP datagram from the client arrived within %d s; is UDP port %d '
                                   'open between the hosts?' % (UDP_SETUP_TIMEOUT, self.server.port)})
                return
            self._open_udp()
            if keys.mirror:
                self.control.mirror = functools.partial(send_frame_copy, self.udp.sock,
                                                        self.session_id)
            # Between requests nothing else is due on the flow.
            self.control.datagrams = (self.udp.sock, self._take_copies)
            self.control.send({'op': 'ready', 'probes': self._send_probes(), 'server': __version__})
            self.sock.settimeout(COMMAND_TIMEOUT)
            while True:
                try:
                    message = self.control.recv()
                except PeerClosed:
                    return
                except (ConnectionResetError, BrokenPipeError):
                    if self._after_done:
                        return
                    raise
                self._after_done = False
                handler = getattr(self, 'do_' + message['op'], None)
                if handler is None:
                    self.control.send({'op': 'error', 'message': 'unknown request %r' % message['op']})
                    continue
                try:
                    handler(message)
                except RemoteError as e:
                    self.control.send({'op': 'error', 'message': str(e)})
                except (ValueError, TypeError, KeyError):
                    raise ProtocolError('malformed %r request' % message['op'])
        except AuthError as e:
            self.server.log('%s: refused: %s' % (self.peer_name(), e))
        except (ProtocolError, NoThread) as e:
            self.server.log('%s: dropped: %s' % (self.peer_name(), e))
            self._tell_client(e)
        except (OSError, struct.error) as e:
            self.server.log('%s: dropped: %s' % (self.peer_name(), e))
        finally:
            self.close()

    def _take_copy(self, datagram):
        kind, _flags, session_id, index = PACKET_HEADER.unpack_from(datagram)
        if kind == KIND_CONTROL and session_id == self.session_id and self.control is not None:
            self.control.offer(index, datagram[PACKET_HEADER.size:])

    def _take_copies(self):
        """The datagrams waiting on the flow while the session waits for a
        request: copies of control frames taken, the rest (the last file's
        late feedback, HELLOs sent before `ready` came) dropped."""
        buffer = bytearray(RECV_BUFFER)
        while True:
            nbytes, segment = self.udp.recv_batch(buffer)
            if not nbytes:
                return True
            for offset in range(0, nbytes, segment):
                datagram = bytes(buffer[offset:min(nbytes, offset + segment)])
                if len(datagram) >= PACKET_HEADER.size:
                    self._take_copy(datagram)

    def _tell_client(self, error):
        """Say why the session ends, if the channel still carries it (the
        client then shows the line rather than a hang-up)."""
        if self.control is None or isinstance(error, PeerClosed):
            return
        try:
            self.sock.settimeout(1.0)
            self.control.send({'op': 'error', 'message': 'the server ends this session: %s' % error})
        except OSError:
            pass

    def peer_name(self):
        return '%s:%d' % self.address[:2]

    def _open_udp(self):
        local = self.sock.getsockname()[0]
        sock = socket.socket(self.sock.family, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((local, self.server.port))
        sock.connect(self._udp_address)
        self.udp = DatagramSocket(sock)
        self.route_mtu = min(MAX_MTU, self.udp.path_mtu())

    def _send_probes(self):
        """Two datagrams of each candidate MTU up to the route's; the client
        reports the largest that arrived and sizes its blocks by it.  The
        largest go first: a client that stops waiting at the first probe to
        arrive (on a loaded host, before the rest are sent) then has the
        largest this path carries, not the smallest."""
        sizes = sorted({m for m in PROBE_MTUS + (self.route_mtu,) if m <= self.route_mtu})
        overhead = ip_udp_overhead(self.sock.family) + PACKET_HEADER.size + TAG_SIZE
        probes = []
        for mtu in reversed(sizes):
            for _copy in range(2):
                probes.append(seal_datagram(self.data_out, KIND_PROBE, self.session_id,
                                            self._next_seq, bytes(mtu - overhead)))
                self._next_seq += 1
        self.udp.send_unfragmented(probes)
        return sizes

    def do_list(self, message):
        for page in self.server.tree.listing_pages(str(message.get('path', '')), LISTING_PAGE_BYTES):
            page['op'] = 'listing'
            self.control.send(page)

    def do_workers(self, message):
        """The client would stripe its transfers over `count` processes:
        grant as many as this server runs per session at most (and only
        where sessions are processes: a thread cannot fork), fork them, and
        say how many.  Asked once, before any file."""
        if self.team is not None or self._file_id:
            raise RemoteError('workers are asked for once, before any file')
        granted = max(1, min(int(message['count']), self.server.workers))
        if granted > 1 and not isinstance(self.registry, SessionListener):
            granted = 1
        lazy = bool(message.get('lazy'))
        if granted > 1:
            team = SendingTeam(self, granted, bool(message.get('cycle')), lazy,
                               bool(message.get('auto')))
            with self._hello_lock:
                self.team, early = team, self._early_hellos
                self._early_hellos = {}
            for index, (datagram, address) in sorted(early.items()):
                team.hello(index, datagram, address)
        answer = {'op': 'workers', 'count': granted}
        if lazy:
            answer['lazy'] = True
        self.control.send(answer)

    @staticmethod
    def _helpers_note(job):
        """Who read a striped file for its digest (and its signature), for the log."""
        if not isinstance(job, RelayedJob):
            return ''
        if getattr(job, 'hashed_by', 0):
            return '; digest read by worker 1, signature hashed by workers 0-%d' % (job.hashed_by - 1)
        return '; digest read by worker 1'

    def do_fetch(self, message):
        """Send one file, named with the size and mtime a listing gave, by
        an OutgoingFile.  An *open* fetch leaves them out (a client's first
        request, for a file new to it, saving the listing's round trip): it
        takes the file as it is now, the server fits the block size to its
        route, and the `start` says what was chosen; a directory is
        answered with its listing."""
        remote = str(message.get('path', ''))
        path, is_dir = self.server.tree.resolve(remote)
        if is_dir:
            if 'size' not in message:
                return self.do_list(message)
            raise RemoteError('%s: is a directory' % remote)
        outgoing = OutgoingFile(self.control, self.udp, self.data_out, self.data_in, self.session_id,
                                self.rate, self._log, self._next_seq, self.rtt)
        try:
            outgoing.open(path, remote, message, block_size_for_mtu(self.route_mtu, self.sock.family),
                          self.server.max_rate)
            if self.team is not None:
                count = self.team.workers_for(outgoing.nblocks, outgoing.block_size)
                if count > 1:
                    outgoing.stripe(self.team, count)
            # After the workers' fork (the first striped file's): not beside the digest's thread.
            outgoing.start_helper(self.server.digests, self.server.signatures, owner=self)
            self._file_id += 1
            outgoing.start(self._file_id)
            started = time.monotonic()
            if not outgoing.run():
                if outgoing.failure is not None:
                    self.server.log('%s: %s; transfer abandoned' % (self.peer_name(), outgoing.failure))
                if self.team is not None and self.team.broken:
                    raise ProtocolError(self.team.broken)
                return
            try:
                outgoing.finish()
            except (ConnectionResetError, BrokenPipeError):
                if not outgoing.checksum_sent:
                    raise
                # It had the checksum, holds the file, and went: the
                # digest was for nobody.  The file was sent all the same.
            self._after_done = True
            seconds = time.monotonic() - started
            self.server.log('%s: sent %s (%d bytes) in %.2f s, %.1f Mbit/s, %d packets retransmitted%s' % (
                self.peer_name(), remote, outgoing.size, seconds,
                outgoing.size * 8 / max(seconds, 1e-6) / 1e6, outgoing.window.retransmitted,
                self._helpers_note(outgoing._job)))
        finally:
            # Also after an error the session survives (a signature that
            # cannot be read): the numbers sent under are nonces, spent.
            self._next_seq, self.rtt = outgoing.next_seq, outgoing.rtt
            outgoing.close()

    def do_read(self, message):
        """Small files whole, on this channel: one `content` answer per file
        asked for, in order, so a tree of small files costs a round trip per
        batch instead of two per file."""
        compress = bool(message.get('compress'))
        sent = total = 0
        for item in message['files']:
            remote = str(item.get('path', ''))
            try:
                data = self._read_small(remote, item)
            except RemoteError as e:
                self.control.send({'op': 'content', 'path': remote, 'error': str(e)})
                continue
            encoding, blob = 'raw', data
            if compress and len(data) >= MIN_COMPRESS and compressible(data):
                packed = zlib.compress(data, 6)
                if len(packed) < len(data):
                    encoding, blob = 'zlib', packed
            self.control.send({'op': 'content', 'path': remote, 'encoding': encoding,
                               'sha256': hashlib.sha256(data).hexdigest(),
                               'data': base64.b64encode(blob).decode('ascii')})
            sent += 1
            total += len(data)
        self.server.log('%s: sent %d small files (%d bytes) on the control channel'
                        % (self.peer_name(), sent, total))

    def _read_small(self, remote, item):
        path, is_dir = self.server.tree.resolve(remote)
        if is_dir:
            raise RemoteError('%s: is a directory' % remote)
        try:
            with os.fdopen(open_regular(path), 'rb') as f:
                st = os.fstat(f.fileno())
                if st.st_size != item.get('size') or st.st_mtime_ns != item.get('mtime_ns'):
                    raise RemoteError('%s: changed on the server during the transfer' % remote)
                if st.st_size > SMALL_FILE:
                    raise RemoteError('%s: too large to be read whole' % remote)
                data = f.read(st.st_size + 1)
        except OSError as e:
            raise RemoteError('%s: %s' % (remote, e.strerror))
        if len(data) != st.st_size:
            raise RemoteError('%s: changed on the server during the transfer' % remote)
        return data

    def close(self):
        self.registry.unregister(self)
        if self.team is not None:
            self.team.close()
        if self.udp is not None:
            self.udp.close()
        try:
            self.sock.close()
        except OSError:
            pass


class SessionProcess:
    """A session forked into a process of its own, as the listener sees it:
    the process, its end of the socketpair, and the accepted connection
    until the client has authenticated (the gate counts it until then, and
    can still cut it short: a shutdown() of the socket reaches the process
    too).  Messages are in the wire formats section."""

    def __init__(self, server, pending, pid, channel):
        self.server = server
        self.pending = pending
        self.pid = pid
        self.channel = channel
        self.session_id = None

    def on_readable(self, mask):
        try:
            message = self.channel.recv(MAX_SESSION_MESSAGE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            message = b''
        if len(message) == SESSION_REGISTER.size and message[:1] == b'R' and self.session_id is None:
            self._register(SESSION_REGISTER.unpack(message)[1])
            return
        if message:
            os.kill(self.pid, signal.SIGKILL)   # not our session process's words: a bug, end it
        self.server.session_process_ended(self)

    def _register(self, session_id):
        accepted = self.server.route(session_id, self)
        if accepted:
            self.session_id = session_id
        self._release_connection()
        try:
            self.channel.send(SESSION_ACCEPTED if accepted else SESSION_REFUSED)
        except OSError:
            return
        if accepted:
            self.server.replay_hello(session_id, self)

    def _release_connection(self):
        """The client authenticated (or the process ended): the gate lets
        go of the connection, and this process of its copy of the socket."""
        if self.pending is not None:
            self.server.pending.release(self.pending)
            self.pending.sock.close()
            self.pending = None

    def hello_datagram(self, datagram, address):
        """Pass a HELLO on; one the process is too busy to take is dropped
        (the client sends another)."""
        address_text = json.dumps(list(address)).encode()
        try:
            self.channel.send(SESSION_HELLO.pack(b'H', len(address_text)) + address_text + datagram)
        except OSError:
            pass

    def close(self):
        """After the process ended: reap it and say so if it failed."""
        self._release_connection()
        self.server.loop.watch(self.channel, 0, None)
        self.channel.close()
        try:
            _pid, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            return
        if os.WIFSIGNALED(status):
            self.server.log('session process %d ended by signal %d' % (self.pid, os.WTERMSIG(status)))


class SessionListener:
    """The listener as a forked session process sees it (the session's
    `registry`): register() tells it the session id and waits for its word;
    then a thread takes the HELLO datagrams it passes on.  When the
    listener goes away, so does this process: a session never outlives
    its `serve`."""

    REGISTER_TIMEOUT = 10.0

    def __init__(self, channel):
        self.channel = channel

    def register(self, session):
        self.channel.settimeout(self.REGISTER_TIMEOUT)
        self.channel.send(SESSION_REGISTER.pack(b'R', session.session_id))
        if self.channel.recv(MAX_SESSION_MESSAGE) != SESSION_ACCEPTED:
            return False
        self.channel.settimeout(None)
        start_thread(self._pass_hellos, 'session-listener', (session,))
        return True

    def unregister(self, session):
        pass                            # the process ends with its session

    def _pass_hellos(self, session):
        while True:
            try:
                message = self.channel.recv(MAX_SESSION_MESSAGE)
            except OSError:
                message = b''
            if not message:
                os._exit(1)             # the listener is gone: so is this session
            if len(message) < SESSION_HELLO.size or message[:1] != b'H':
                continue
            length = SESSION_HELLO.unpack_from(message)[1]
            try:
                address = tuple(json.loads(message[SESSION_HELLO.size:SESSION_HELLO.size + length]))
            except ValueError:
                continue
            session.hello_datagram(message[SESSION_HELLO.size + length:], address)


def sessions_can_fork():
    """Whether sessions may run in processes of their own: on Linux (fork,
    SEQPACKET socketpairs) and from a process with no other thread, which
    a fork could catch holding a lock."""
    return sys.platform.startswith('linux') and hasattr(os, 'fork') and \
        threading.active_count() == 1


class Server:
    """`serve`: accepts clients on TCP, matches their first UDP datagram to
    their session, and runs each session in a process of its own (forked,
    on Linux: sessions use every core, and one that crashes takes no other
    down) or, where that cannot be, on a thread of its own.  A failing
    session is logged and the server keeps serving.

    The listener is one thread, running an EventLoop: it accepts, reads
    every connection's HELLO without blocking (the gate, PendingHandshakes,
    bounds how many have not authenticated and for how long), starts a
    session once a HELLO is in, and routes each HELLO datagram to its
    session by the session id it names."""

    def __init__(self, tree, secret, bind='', port=DEFAULT_PORT, encrypt=True,
                 max_rate=None, log=None, signature_store=None, processes=True, workers=1):
        self.tree = tree
        self.workers = workers                  # the most processes one session's transfers use
        self.secret = SharedSecret.of(secret)
        self.secret.server_salt()               # stretched now, not at the first client
        self.encrypt = encrypt
        self.early = EarlyHandshakes(self.secret, encrypt)
        if encrypt:
            # ctypes imported and libcrypto's AES tried once, here, and not
            # in each session (its process forked from this one) between a
            # client's HELLO and the hello that answers it: 3-7 ms a time.
            CounterMode.load()
        self.max_rate = max_rate
        self.log = log or (lambda line: None)
        self.processes = processes
        slots = HelperSlots(MAX_HELPERS, MAX_SESSION_HELPERS)
        self.digests = DigestCache(slots=slots)
        self.signatures = SignatureCache(signature_store, slots=slots)
        self._routes = {}                       # session id -> ServerSession or SessionProcess
        self._unrouted = collections.OrderedDict()  # (session id, kind, flags or index) ->
        #                                             (HELLO or copy, address, when)
        self._children = {}                     # pid -> SessionProcess
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        family = socket.AF_INET6 if ':' in bind else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.listener.bind((bind, port))
            self.port = self.listener.getsockname()[1]
            self.udp = socket.socket(family, socket.SOCK_DGRAM)
            self.udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            self.udp.bind((bind, self.port))
        except OSError as e:
            self.listener.close()
            raise UsageError('cannot listen on %s:%d: %s' % (bind or '*', port, e.strerror))
        self.udp.setblocking(False)
        self.listener.listen(64)
        self.address = self.listener.getsockname()
        self.loop = EventLoop()
        self.loop.watch(self.udp, selectors.EVENT_READ, self._on_udp)
        self.pending = PendingHandshakes(self.loop, self._start_session, self.log, '%s: dropped: %s')
        self.acceptor = Acceptor(self.loop, self.listener, self.pending.admit, self.pending.make_room,
                                 self.log)
        self._hello_buffer = bytearray(2048)
        self._loop_thread = None
        self._loop_done = threading.Event()
        self._loop_done.set()

    # -- the session registry: by id, for HELLO datagrams ---------------------------

    def route(self, session_id, session):
        with self._lock:
            if session_id in self._routes:
                return False
            self._routes[session_id] = session
            return True

    def register(self, session):
        if not self.route(session.session_id, session):
            return False
        self.replay_hello(session.session_id, session)
        return True

    def replay_hello(self, session_id, session):
        """The client sends its first HELLO datagram right after its proof,
        so it comes before the session is routed, nearly always: passed on
        now rather than waiting for the next, a tenth of a second later.
        So do the copies of its first requests, for when TCP lost them."""
        with self._lock:
            early = [self._unrouted.pop(key) for key in list(self._unrouted) if key[0] == session_id]
        for datagram, address, when in early:
            if time.monotonic() - when < EARLY_HELLO_SECONDS:
                session.hello_datagram(datagram, address)

    def unregister(self, session):
        with self._lock:
            if self._routes.get(session.session_id) is session:
                del self._routes[session.session_id]

    def _on_udp(self, mask):
        """Pass each HELLO datagram, and each copy of a control frame, to
        the session it names."""
        buffer = self._hello_buffer
        for _ in range(64):             # then let the loop see to the rest
            try:
                nbytes, address = self.udp.recvfrom_into(buffer)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if nbytes < PACKET_HEADER.size + TAG_SIZE:
                continue
            kind, flags, sid, seq = PACKET_HEADER.unpack_from(buffer)
            if kind == KIND_HANDSHAKE:
                answer = self.early.answer(bytes(buffer[:nbytes]))
                if answer is not None:
                    try:
                        self.udp.sendto(answer, address)
                    except OSError:
                        pass            # a full socket buffer: the client goes the TCP way
                continue
            if kind not in (KIND_HELLO, KIND_CONTROL):
                continue
            with self._lock:
                session = self._routes.get(sid)
                if session is None:
                    # Kept for its session, if it is one about to be (its
                    # tag is checked then); a few, briefly: anyone can send.
                    # HELLO: the session's own flow, or a worker's; a copy
                    # of a control frame: its index.
                    key = (sid, kind, flags if kind == KIND_HELLO else seq)
                    self._unrouted[key] = (bytes(buffer[:nbytes]), address, time.monotonic())
                    self._unrouted.move_to_end(key)
                    while len(self._unrouted) > MAX_EARLY_HELLOS:
                        self._unrouted.popitem(last=False)
            if session is not None:
                session.hello_datagram(bytes(buffer[:nbytes]), address)

    # -- running ---------------------------------------------------------------------

    def serve_forever(self):
        self._loop_thread = threading.get_ident()
        self._loop_done.clear()
        try:
            self.loop.run()
        finally:
            self._loop_done.set()

    def _start_session(self, pending):
        """Called on the loop once `pending`'s HELLO is in.  An early one
        is claimed here, in the listener, where every session's is."""
        try:
            if pending.hello_size() > HELLO.size:
                pending.early = self.early.claim(bytes(pending.hello))
            pending.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.processes and sessions_can_fork():
                self._fork_session(pending)
                return
            session = ServerSession(self, pending.sock, pending.address)
            threading.Thread(target=session.run, args=(pending,), name='session', daemon=True).start()
        except AuthError as e:
            self.pending.abandon(pending, 'refused: %s' % e)
        except OSError as e:
            self.pending.abandon(pending, e.strerror or str(e))
        except RuntimeError as e:
            # No thread to be had (a process limit, memory): this client is
            # dropped, the server goes on.
            self.pending.abandon(pending, 'cannot start a thread for it: %s' % e)

    def _fork_session(self, pending):
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()              # or the child writes the parent's buffered lines again
        try:
            pid = os.fork()
        except OSError:
            mine.close()
            theirs.close()
            raise
        if pid == 0:
            self._run_session_process(pending, theirs, mine)
        theirs.close()
        mine.setblocking(False)
        child = self._children[pid] = SessionProcess(self, pending, pid, mine)
        self.loop.watch(mine, selectors.EVENT_READ, child.on_readable)

    def _run_session_process(self, pending, channel, parents_end):
        """In the forked process: let go of everything the listener holds
        (a listener socket kept open here would keep the port bound after
        `serve` ends), run the session, exit.  Never returns."""
        status = 1
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the listener's to handle
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            parents_end.close()
            for key in list(self.loop.selector.get_map().values()):
                if key.fileobj is not pending.sock:
                    key.fileobj.close()
            self.loop.close()
            self.listener.close()
            self.udp.close()
            ServerSession(self, pending.sock, pending.address, SessionListener(channel)).run(pending)
            status = 0
        except Exception as e:          # a bug: one line in the log, and only this session ends
            self.log('%s: session process failed: %r' % (pending.name, e))
        except BaseException:
            pass
        finally:
            exit_forked(status)

    def session_process_ended(self, child):
        with self._lock:
            if child.session_id is not None and self._routes.get(child.session_id) is child:
                del self._routes[child.session_id]
        self._children.pop(child.pid, None)
        child.close()

    def session_processes(self):
        """The pids of the session processes running now."""
        return sorted(self._children)

    def shutdown(self):
        if self._stopping.is_set():
            return
        self._stopping.set()
        self.loop.stop()
        if self._loop_thread != threading.get_ident():
            self._loop_done.wait(5.0)       # the loop's sockets are closed once it has let go
        self.acceptor.close()
        self.pending.close()
        for child in list(self._children.values()):
            child.channel.close()           # its listener thread sees the end, and it exits
        for sock in (self.listener, self.udp):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        self.loop.close()


# ---------------------------------------------------------------------------
# Bulk transfer: client
# ---------------------------------------------------------------------------
# `get`: one authenticated session, the UDP flow opened from the client's
# side, then for each file a fetch that resumes from any partial file, receives
# until every block is held, and verifies the whole-file digest before the
# file takes its final name.  Progress and results go to an `events` object;
# this section never prints.
#
# Client holds the session (connection, keys, UDP flow, probes) and has one
# way in, get(): listings become Listing and ListingEntry records where they
# arrive, plan_downloads() makes them a DownloadPlan, and each Download is
# received by an IncomingFile (ask, answer, transfer), whose data phase a
# ReceivePhase runs.  An IncomingFile is handed a Conversation (control
# messages) and a DataChannel (datagrams), not the Client: the receiving
# role does not assume it runs in the client.

HELLO_INTERVAL = 0.1
EARLY_HELLO_SECONDS = 2.0       # a HELLO (or copy) for a session not routed yet is kept this long,
MAX_EARLY_HELLOS = 64           # ... and at most this many of them
PROGRESS_INTERVAL = 0.5
STATE_SAVE_INTERVAL = 2.0
FEEDBACK_INTERVAL = (0.005, 0.01)   # s between acknowledgements: an eighth of the round trip within
                                    # these bounds (the sender's rate control measures its short
                                    # probes by a few of them)
NARROW_PATH_WAIT = 0.5          # s without data before blocks too large for the path are suspected
PROBE_WAIT_MIN = 0.2            # s the first block-size choice waits for a probe at least,
PROBE_WAIT_MAX = 1.0            # and at most (4 round trips between the two)
MAX_LISTING_ENTRIES = 2_000_000     # files and directories one REMOTE may expand to: a
                                    # listing costs get about 500 bytes an entry (1 GB here)


def feedback_interval(rtt, flows=1):
    """Seconds between a receiver's acknowledgements at round trip `rtt`
    (its sender batches a share's sending by the one flow's: share_batch),
    on each of the `flows` of a striped file.  k flows cost k times one's
    acknowledgements at both ends, and the sending coordinator merged them
    all for the one rate: across S4 (300 ms) with two workers about 1.1 s
    of the sending end's CPU in a 256 MiB transfer.  So where k intervals
    are still within an eighth of the round trip (stretched_feedback), each
    flow is acknowledged every k intervals, and SharedRate passes the
    merged news on in pieces of an interval: the rate control hears as
    often as from one flow.  Not in a startup (the receiver is told by
    DATA_FLAG_STEADY): that is every interval."""
    interval = max(FEEDBACK_INTERVAL[0], min(FEEDBACK_INTERVAL[1], rtt / 8))
    if stretched_feedback(rtt, flows):
        interval *= flows
    return interval


def stretched_feedback(rtt, flows):
    """Whether each of the `flows` of a striped file is acknowledged every
    `flows` intervals (feedback_interval): where that is within an eighth of
    the round trip, which the rate control would hear at if acknowledging
    cost nothing (FEEDBACK_INTERVAL[1] bounds it for that cost).  Beyond
    that (120 ms and two flows: 15 ms) the model tests of the startup and
    of uneven shares at 120 ms overflowed the queue."""
    return flows > 1 and flows * max(FEEDBACK_INTERVAL[0], min(FEEDBACK_INTERVAL[1], rtt / 8)) <= rtt / 8


class TransferEvents:
    """What a Client reports.  The CLI subclasses it; the default is silent."""

    def warning(self, message):
        pass

    def file_started(self, remote, dest, size, resumed_bytes):
        pass

    def progress(self, snapshot):
        pass

    def file_finished(self, summary):
        pass


def transfer_summary(dest, remote, size, received, seconds, wire, sent, cipher, block_bytes,
                     sha256, **counts):
    """The summary of one fetched file, as `--json` prints it: every key is
    always there (scripts rely on them); `counts` fills in the packet and
    delta figures, which default to zero.  `cipher` is the data channel's
    (Sealer.cipher), None with --no-encrypt."""
    duration = max(seconds, 1e-6)
    summary = {
        'file': dest, 'remote': remote, 'file_bytes': size, 'received_bytes': received,
        'resumed_bytes': 0, 'duration_seconds': round(duration, 3), 'wire_bytes': wire,
        'packets_sent': 0, 'packets_received': 0, 'packets_duplicate': 0, 'packets_rejected': 0,
        'packets_lost': 0, 'packets_retransmitted': 0, 'packets_compressed': 0,
        'throughput_mbps': round(wire * 8 / duration / 1e6, 2),
        'goodput_mbps': round(received * 8 / duration / 1e6, 2),
        'file_rate_mbps': round(size * 8 / duration / 1e6, 2),
        'sha256': sha256, 'encrypted': cipher is not None, 'cipher': cipher or 'none',
        'verified': True, 'block_bytes': block_bytes,
        'delta': 'off', 'local_bytes': 0, 'zero_bytes': 0, 'signature_bytes': 0,
        'sent_bytes': sent, 'first_data_seconds': None, 'workers': 1, 'worker_packets': [],
        'digest_worker': 0,
        'saving_percent': round(100.0 * (size - sent) / size, 2) if size else 0.0,
    }
    unknown = set(counts) - set(summary)
    if unknown:
        raise TypeError('unknown summary keys %s' % sorted(unknown))
    summary.update(counts)
    return summary


class FlowCounts(collections.namedtuple('FlowCounts',
                                        'numbered received resent compressed datagram_bytes')):
    """What the receiving end of one flow (the session's, or a worker's)
    saw of one file's data: the packet numbers from the file's first on
    that flow up to the largest received (`numbered`), the authentic
    datagrams received, those of them flagged as resent and as compressed,
    and their bytes (UDP payload)."""

    __slots__ = ()


def receiver_counts(flows, overhead, full_datagram):
    """The sender's counts of one file (the `digest`'s) as its receiver
    tells them from the FlowCounts of each flow, for a file finished on the
    early checksum, whose digest it does not wait for.  A number never
    received below the largest was lost (or is late, or was sent again
    after the file was whole: those the sender counts, this end cannot);
    each datagram costs `overhead` bytes of IP and UDP header on the wire,
    as the sender counts it, and a lost one is taken as a full block's
    (`full_datagram` bytes)."""
    lost = sum(max(0, flow.numbered - flow.received) for flow in flows)
    received = sum(flow.received for flow in flows)
    return {'packets_sent': sum(flow.numbered for flow in flows), 'packets_lost': lost,
            'packets_retransmitted': sum(flow.resent for flow in flows),
            'packets_compressed': sum(flow.compressed for flow in flows),
            'wire_bytes': (sum(flow.datagram_bytes for flow in flows) + received * overhead
                           + lost * (full_datagram + overhead))}


# --- Records: what a listing says, what a get plans -------------------------

class ListingEntry(collections.namedtuple('ListingEntry', 'path size mtime_ns mode')):
    """One file of a listing: its path (below the listed directory), size,
    mtime and permission bits, as the server stated them.  Made once, where
    the listing arrives (its message already passed validate_message), and
    read as attributes from then on."""

    __slots__ = ()

    @classmethod
    def from_message(cls, entry):
        """From one checked entry of a `listing` (or an open fetch's `start`)."""
        return cls(entry['path'], entry['size'], entry['mtime_ns'], entry['mode'])


class Listing(collections.namedtuple('Listing', 'kind name files dirs')):
    """What one REMOTE expands to: its `kind` ('file' or 'dir'), its `name`
    (where it goes below the destination; '' for the served root), its
    `files` as ListingEntry records and the paths of its `dirs`, the pages
    it came in joined."""

    __slots__ = ()

    @classmethod
    def from_pages(cls, page, next_page):
        """The listing whose first `listing` message is `page`, with the
        pages after it from next_page().  A page of another listing, or
        more entries than one get takes, is a ProtocolError."""
        kind, name = page.get('kind'), page.get('name')
        files, dirs, entries = [], [], 0
        entry = ListingEntry.from_message
        while True:
            if not isinstance(page.get('files'), list) or not isinstance(page.get('dirs'), list):
                raise ProtocolError('a listing without its lists of files and directories')
            entries += max(1, len(page['files']) + len(page['dirs']))     # empty pages count too
            if entries > MAX_LISTING_ENTRIES:
                raise ProtocolError('%s holds more than %d files and directories, more than one '
                                    'get takes: fetch its subdirectories one at a time'
                                    % (printable(str(name)), MAX_LISTING_ENTRIES))
            if (page.get('kind'), page.get('name')) != (kind, name):
                raise ProtocolError('a page of another listing')
            files.extend([entry(item) for item in page['files']])
            dirs.extend(page['dirs'])
            if not page.get('more'):
                return cls(kind, name or '', files, dirs)
            page = next_page()


class Download(collections.namedtuple('Download', 'remote dest entry')):
    """One file a get fetches: its path on the server, the local path it
    goes to, and its ListingEntry."""

    __slots__ = ()


class DownloadPlan(collections.namedtuple('DownloadPlan', 'downloads dirs errors trees')):
    """What a get does once the REMOTEs are listed: fetch the `downloads`
    after making the local `dirs` (the destination first), report the
    RemoteError of each REMOTE refused in `errors`, and in `trees` keep
    (where a REMOTE goes, [local paths of its files]) for each REMOTE
    listed, which tidy_directories() needs."""

    __slots__ = ()


# --- One file coming in: request and answer, datagrams, data phase ----------

class Conversation:
    """One end's blocking use of a session's ControlChannel, request and
    answer: each wait and each send ends after `timeout` with a
    TransferError, an `error` answer is raised as RemoteError, and the
    signature pieces a file may still have on their way once its data
    phase is over (`expect_strays()`) are passed over where the next
    answer is read (`skip_strays()`), as is the sender's last word on a
    file this end no longer waits for (`pass_over()`), wherever it comes.
    `peer` names the other end in errors."""

    LATE_FILES = 4                              # files whose late words are remembered

    def __init__(self, channel, timeout, peer='server'):
        self.channel = channel
        self.timeout = timeout
        self.peer = peer
        self._stray_file = None                 # the file whose signature pieces may still come
        self._strays_left = 0                   # and how many of them are still plausible
        self.stray_bytes = 0                    # what the pieces passed over would count
        self._late = collections.OrderedDict()  # file id: ops of it that may still come, once each
        self.on_fork = None                     # called for a `fork`, where one may come

    def send(self, message):
        try:
            self.channel.send(message)
        except socket.timeout:
            raise TransferError('the %s took no request for %d s' % (self.peer, self.timeout))

    def recv(self):
        """The next message; a `fork` (the server's word to start workers,
        before the first `start` it stripes) is taken on the way, and a
        late word pass_over() named is dropped."""
        while True:
            try:
                message = self.channel.recv()
            except socket.timeout:
                raise TransferError('the %s did not answer for %d s' % (self.peer, self.timeout))
            op = message['op']
            if op == 'fork' and self.on_fork is not None:
                self.on_fork()
                continue
            late = self._late.get(message['file']) if op in ('checksum', 'digest') else None
            if late is None or op not in late:
                return message
            late.discard(op)
            if not late:
                del self._late[message['file']]

    def pass_over(self, file_id, *ops):
        """This end is done with file `file_id`: one message of each of
        `ops` (its `checksum`, its `digest`) may still come for it, and is
        dropped where it comes.  Only the last few files' are remembered:
        the sender says each before its next file's `start`."""
        self._late.setdefault(file_id, set()).update(ops)
        self._late.move_to_end(file_id)
        while len(self._late) > self.LATE_FILES:
            self._late.popitem(last=False)

    def check(self, message, op):
        """`message` if it is an `op`; RemoteError if it is an error."""
        if message['op'] == 'error':
            raise RemoteError(str(message.get('message', 'the %s refused' % self.peer)))
        if message['op'] != op:
            raise ProtocolError('expected %s from the %s, got %s' % (op, self.peer, message['op']))
        return message

    def expect(self, op):
        return self.check(self.recv(), op)

    def expect_strays(self, file_id, count):
        """Up to `count` signature pieces of file `file_id` may come late."""
        self._stray_file, self._strays_left = file_id, count

    def skip_strays(self, message):
        """`message`, or the first after it that is not a late signature
        piece: no more of them than expect_strays() allows, so a peer
        cannot keep this end reading them for ever."""
        while message['op'] == 'signature':
            if message.get('file') != self._stray_file or self._strays_left <= 0:
                raise ProtocolError('the %s sent a signature piece no fetch can use (file %s)'
                                    % (self.peer, printable(str(message.get('file')))))
            self._strays_left -= 1
            self.stray_bytes += len(message['spans']) + SIGNATURE_PIECE_BYTES
            message = self.recv()
        return message


class DataChannel:
    """A session's UDP flow as its receiving end uses it: sealed datagrams
    out (HELLO, FEEDBACK, NAK) numbered in one sequence, and the sealer and
    session id that tell the session's datagrams in.  `udp` is a connected
    DatagramSocket.  Copies of control frames that come on it go to
    `control` (a ControlChannel); the largest probe is noted."""

    def __init__(self, udp, sealer_out, sealer_in, session_id, hello_flags=0, control=None):
        self.udp = udp
        self.sealer_out, self.sealer_in = sealer_out, sealer_in
        self.session_id = session_id
        self.hello_flags = hello_flags          # a worker's flow: its index
        self.control = control
        self.largest_probe = 0                  # bytes of the largest authentic probe
        self._seq = 0
        self._buffer = None

    def take(self, datagram):
        """A datagram that is not data: a copy of a control frame is
        offered to `control`, a probe measured; anything else dropped.
        True if it was either."""
        if len(datagram) < PACKET_HEADER.size:
            return False
        kind, _flags, session_id, number = PACKET_HEADER.unpack_from(datagram)
        if kind == KIND_CONTROL and session_id == self.session_id and self.control is not None:
            self.control.offer(number, datagram[PACKET_HEADER.size:])
            return True
        if kind == KIND_PROBE:
            self.largest_probe = max(self.largest_probe, probe_length(
                self.sealer_in, self.session_id, datagram, 0, len(datagram)))
            return True
        return False

    def take_control_datagrams(self, everything=False):
        """Take the datagrams waiting, while they are copies of control
        frames or probes (or any, with `everything`: nothing else is due).
        False when another kind is next: it is left for the data phase."""
        if self._buffer is None:
            self._buffer = bytearray(RECV_BUFFER)
        buffer, sock = self._buffer, self.udp.sock
        while True:
            if not everything:
                if self.udp.held:
                    return False                # a datagram the data phase left over is next
                try:
                    head = sock.recv(1, socket.MSG_PEEK)
                except (BlockingIOError, InterruptedError):
                    return True
                except ConnectionRefusedError:
                    continue                    # ICMP from an earlier send; not fatal
                if head and head[0] not in (KIND_CONTROL, KIND_PROBE):
                    return False
            nbytes, segment = self.udp.recv_batch(buffer)
            if not nbytes:
                return True
            view = memoryview(buffer)
            for offset in range(0, nbytes, segment):
                self.take(view[offset:min(nbytes, offset + segment)])

    def send(self, kind, body=b''):
        packet = seal_datagram(self.sealer_out, kind, self.session_id, self._seq, body,
                               self.hello_flags if kind == KIND_HELLO else 0)
        self._seq += 1
        try:
            self.udp.sock.send(packet)
        except (BlockingIOError, ConnectionRefusedError):
            pass                                # lost like any datagram; timers resend


class IncomingFile:
    """One file being received, from the request for it to the digest that
    proves it.  `ask()` sends the fetch (resuming a partial copy, offering
    an older copy for a delta, asking for the sender's checksum early);
    `answer()` reads the sender's `start` (or `begin()` takes the `start`
    of an open fetch); `transfer()` runs the data phase, says `done`,
    compares its digest with the sender's (the early checksum, or the
    `digest` if that comes first), puts the file in place and returns its
    summary.  `withdraw()` gives up a file asked for and
    never answered; `write_whole()` takes a small file's `content` instead.

    It is handed what it uses (a Conversation, a DataChannel, the events,
    a clock, and for a delta the ChunkStore and the sender's origin), not
    the session, so it does not care which end of one it runs at."""

    def __init__(self, remote, dest, entry, conversation, data, events, rtt, store=None,
                 origin=None, clock=time.monotonic, team=None):
        self.remote, self.dest, self.entry = remote, dest, entry
        self.team = team                        # receiving workers a striped file shares
        self.conversation, self.data, self.events = conversation, data, events
        self.rtt = rtt
        self.store, self.origin = store, origin
        self.clock = clock
        self.block_size = 0
        self.delta = False                      # built from the sender's signature and local data
        self.kept = []                          # older copies of it kept in the store (its rows)
        self.partial = None                     # the PartialFile, once asked for
        self.bitmap = None                      # the blocks it held then
        self.asked_at = None                    # clock() when the fetch went
        self.start = None                       # the sender's `start`
        self.rejected = 0                       # datagrams of the data phase that failed checks
        self.largest_probe = 0                  # bytes of the largest probe that came with the data
        self.checksum = None                    # the sender's SHA-256 of the file, once it came early
        self.signature_bytes = 0                # what the signature pieces received count

    def ask(self, choose_block_size, max_rate):
        """Send the fetch: its partial copy opened, its blocks sized by
        choose_block_size(the largest MTU worth using)."""
        remote, dest, store = self.remote, self.dest, self.store
        size, mtime_ns = self.entry.size, self.entry.mtime_ns
        # An older copy of this file, at `dest` or kept from an earlier fetch
        # of `remote`, is worth content-defined spans where data shifted.
        kept = store.kept_files_for(remote, self.origin) if store is not None and size else []
        # Not through a link: what it points to is no copy of ours, and is replaced.
        if store is not None and size and os.path.isfile(dest) and not os.path.islink(dest):
            kept = self._keep_older_copy(kept)
        # A small new file is cheaper sent than looked for: a delta costs a round trip.
        delta = store is not None and size > 0 and bool(size >= DELTA_MIN_SIZE or kept)
        # An update is sent as the blocks around each change: smaller blocks waste less.
        self.block_size = choose_block_size(DELTA_MAX_MTU if kept else MAX_MTU)
        self.kept, self.delta = kept, delta
        self.partial = partial = PartialFile(dest, remote, size, mtime_ns, self.block_size)
        self.bitmap = bitmap = partial.open()
        try:
            need = [] if delta else bitmap_missing_ranges(bitmap, partial.nblocks)
            lead = delta and not kept and partial.resumed_blocks == 0
            fetch = {'op': 'fetch', 'path': remote, 'size': size, 'mtime_ns': mtime_ns,
                     'max_rate': max_rate, 'block_size': self.block_size, 'delta': delta,
                     'compress': store is not None, 'lead': lead, 'need': need,
                     'early_digest': True}
            if lead and not store.keeps_from(self.origin):
                fetch['whole_lead'] = True      # see Client._fetch_new
            self.conversation.send(fetch)
        except BaseException:
            partial.close()
            raise
        self.asked_at = self.clock()

    def answer(self):
        """Read the sender's `start` for what ask() sent."""
        conversation = self.conversation
        try:
            # Pieces of a file given up on just before may come first.
            self.start = conversation.check(conversation.skip_strays(conversation.recv()), 'start')
        except BaseException:
            self.partial.withdraw()
            raise

    def begin(self, start, asked_at):
        """Take the `start` that answered an open fetch (sent at `asked_at`,
        before the file was known): its partial copy opened in the blocks
        the sender chose."""
        self.start, self.asked_at = start, asked_at
        self.block_size, self.delta = start['block_size'], start['delta']
        self.partial = PartialFile(self.dest, self.remote, self.entry.size, self.entry.mtime_ns,
                                   self.block_size)
        self.bitmap = self.partial.open()

    def withdraw(self):
        self.partial.withdraw()

    def discard(self):
        self.partial.discard()

    def transfer(self, waited_since, then=None, unproven=False, proven=0):
        """The rest of a fetch once the sender said `start`: the data phase
        (and the delta's local assembly), `done` (and `then()`, which may
        ask for the next file), the digests compared (_last_word()), the
        file renamed into place; its summary.  The first data counts from `waited_since`.
        With `unproven` blocks, a path that carries none as large as a full
        one's (nor a probe that large: `proven` bytes came before) raises
        PathTooNarrow."""
        entry, partial, start, block_size = self.entry, self.partial, self.start, self.block_size
        size = entry.size
        self.data.sealer_in.set_stride(block_size)
        resumed = partial.resumed_blocks
        self.events.file_started(self.remote, self.dest, size, min(size, resumed * block_size))
        try:
            writer = BlockWriter(partial, self.bitmap)
        except NoThread:
            partial.close()
            raise
        try:
            team = self._team_for(start, block_size)
            frontier = (FrontierDigest(partial.data_path, size, block_size, writer.written_bitmap)
                        if team is None else
                        team.follow_digest(start['file'], partial.nblocks, writer.written_bitmap))
            writer.on_written = frontier.offer      # the digest need not read back what came
        except (NoThread, ProtocolError):
            writer.close()
            partial.close()
            raise
        assembler = None
        try:
            if team is None:
                window = ReceiveWindow(partial.nblocks, start['first_seq'], self.bitmap)
            else:
                window = ReceiveWindow(partial.nblocks, start['first_seq'], stripe_view(
                    self.bitmap, partial.nblocks, start['stripe'], len(start['workers']) + 1, 0,
                    start.get('cycle')))
            # Its signature, fixed and refined, has at most this many pieces.
            self.conversation.expect_strays(
                start['file'], 2 * (-(-size // SIGNATURE_SEGMENT) + 1) if self.delta else 0)
            if self.delta:
                window.decided = 0
                assembler = LocalAssembler(self.store, partial, refine=bool(self.kept),
                                           origin=self.origin, lead=start.get('lead', 0))
                assembler.on_filled = frontier.offer    # no reading back what it wrote
            if team is not None:
                team.start_file(self, window, writer, len(start['workers']) + 1, start['stripe'],
                                start['workers'], start.get('cycle'))
            flows = [FlowCounts(0, 0, 0, 0, 0)]
            if not window.complete() or team is not None:
                phase = ReceivePhase(self, window, writer, assembler, unproven, proven, team)
                try:
                    phase.run()
                finally:
                    self.rejected += phase.receiver.rejected
                    self.largest_probe = max(self.largest_probe, phase.receiver.largest_probe)
                    self.signature_bytes += phase.signature_bytes
                flows = [phase.receiver.flow_counts()]
            shares = team.totals() if team is not None else None
            if team is not None:
                team.end_file()
            writer.sync()
            partial.save_state(writer.written_bitmap())
            self.conversation.send({'op': 'done', 'file': start['file']})
            if then is not None:
                then()
            local = partial.digest(frontier)    # while the sender's answer is on its way
            report = self._last_word(start['file'])
        except BaseException:
            if self.checksum is None:           # given up: it may come all the same
                self.conversation.pass_over(start['file'], 'checksum')
            if team is not None:
                team.end_file()
            frontier.stop()
            try:
                writer.sync()
            except WanxferError:
                pass
            try:
                partial.save_state(writer.written_bitmap())
            except WanxferError:
                pass
            if assembler is not None:
                assembler.close()               # its write-back thread syncs the file
            partial.close()
            raise
        finally:
            writer.close()
            if assembler is not None:
                assembler.close()
        if not hmac.compare_digest(local, self.checksum if report is None
                                   else str(report.get('sha256'))):
            partial.discard()
            raise DigestMismatch(self.remote)
        partial.finish(entry.mode, entry.mtime_ns)
        if assembler is not None and assembler.offset == size:
            self.store.keep_file(self.dest, self.remote, 'fixed', assembler.spans, origin=self.origin)
        received = writer.written_bytes
        packets, duplicates, rejected, first_arrival = (window.packets, window.duplicates,
                                                         self.rejected, window.first_arrival)
        worker_packets = [packets]
        if shares is not None:
            received += shares['written_bytes']
            worker_packets += shares['packets']
            packets, duplicates = sum(worker_packets), duplicates + shares['duplicates']
            rejected += shares['rejected']
            arrivals = [t for t in (first_arrival, shares['first_arrival']) if t is not None]
            first_arrival = min(arrivals) if arrivals else None
            flows += shares['flows']
        if report is None:
            # Finished on the early checksum: the sender's counts as this
            # end saw them, the signature as it received it.
            counts = receiver_counts(flows, ip_udp_overhead(self.data.udp.sock.family),
                                     DATA_HEADER.size + block_size + TAG_SIZE)
            counts['signature_bytes'] = self.signature_bytes
        else:
            counts = {name: int(report.get(name, 0)) for name in (
                'packets_sent', 'packets_lost', 'packets_retransmitted', 'packets_compressed',
                'wire_bytes', 'signature_bytes')}
        wire = counts['wire_bytes']
        return transfer_summary(
            self.dest, self.remote, size, received, self.clock() - self.asked_at, wire,
            wire + counts['signature_bytes'], self.data.sealer_in.cipher, block_size,
            local, resumed_bytes=min(size, resumed * block_size),
            packets_received=packets, packets_duplicate=duplicates, packets_rejected=rejected,
            workers=len(worker_packets), worker_packets=worker_packets,
            digest_worker=0 if team is None else 1,
            delta=('off' if assembler is None else
                   'fixed+cdc' if assembler.refined_bytes else 'fixed'),
            local_bytes=assembler.local_bytes if assembler else 0,
            zero_bytes=assembler.zero_bytes if assembler else 0,
            first_data_seconds=(None if first_arrival is None
                                else round(first_arrival - waited_since, 3)), **counts)

    def _last_word(self, file_id):
        """The sender's word on the whole file, once this end holds it all
        and has said `done`: None if its `checksum` came (during the data
        phase or now), and then its `digest` is passed over when it comes;
        else the `digest` (an older sender's, or one whose helper was still
        reading when the `done` came), whichever comes first."""
        conversation = self.conversation
        strays = conversation.stray_bytes
        try:
            while self.checksum is None:
                # Pieces sent before our done crossed it may come first.
                message = conversation.skip_strays(conversation.recv())
                if message['op'] != 'checksum' or message['file'] != file_id:
                    return conversation.check(message, 'digest')
                self.checksum = message['sha256']
        finally:
            self.signature_bytes += conversation.stray_bytes - strays
        conversation.pass_over(file_id, 'digest')
        return None

    def _team_for(self, start, block_size):
        """The receiving workers a `start` stripes its file over, or None."""
        if not start.get('workers'):
            return None
        if self.team is None or len(start['workers']) >= self.team.count or 'stripe' not in start:
            raise ProtocolError('the server striped a file over more workers than this client runs')
        # Work per stripe is ours: a server naming tiny stripes must not
        # make a large file cost a loop per block.
        least = max(1, STRIPE_BYTES // 2 // block_size)
        if start['stripe'] < least:
            raise ProtocolError('the server striped %s in runs of %d blocks; at least %d were expected'
                                % (self.remote, start['stripe'], least))
        if 'cycle' in start and (not start['cycle'] or
                                 max(start['cycle']) > len(start['workers'])):
            raise ProtocolError('the server dealt the stripes of %s to workers it does not use'
                                % self.remote)
        return self.team

    def write_whole(self, message, seconds):
        """Take a small file sent whole in a `content` message (one that
        is not an error); its summary."""
        remote, dest, size, mtime_ns = self.remote, self.dest, self.entry.size, self.entry.mtime_ns
        try:
            blob = base64.b64decode(message['data'], validate=True)
            data = inflate(blob, size) if message.get('encoding') == 'zlib' else blob
        except (ValueError, ProtocolError) as e:
            raise ProtocolError('%s: undecodable content (%s)' % (remote, e))
        partial = PartialFile(dest, remote, size, mtime_ns, max(1, size))
        partial.open(resume=False)
        try:
            if data:
                partial.write(0, data)
            local = partial.digest()
        except BaseException:
            partial.discard()
            raise
        if len(data) != size or not hmac.compare_digest(local, str(message.get('sha256'))):
            partial.discard()
            raise TransferError('%s: the content the %s sent does not match its digest'
                                % (remote, self.conversation.peer))
        partial.finish(self.entry.mode, mtime_ns)
        self.events.file_started(remote, dest, size, 0)
        wire = FRAME_HEADER.size + TAG_SIZE + len(json.dumps(message, separators=(',', ':')))
        return transfer_summary(dest, remote, size, size, seconds, wire, wire,
                                self.data.sealer_in.cipher, 0, local)

    def _keep_older_copy(self, kept):
        """Index the file at `dest` (an older copy the store does not know)
        in fixed spans, at C speed, and keep it: the kept files for
        `remote` afterwards."""
        for row in kept:
            try:
                if os.path.samefile(row[1], self.dest):
                    return kept
            except OSError:
                pass
        try:
            # The user already has it, and asks this sender for what goes there.
            self.store.keep_file(self.dest, self.remote, 'fixed',
                                 signature_spans(self.dest, 'fixed'), origin=self.origin)
        except OSError:
            return kept                         # unreadable: it cannot help
        return self.store.kept_files_for(self.remote, self.origin)

    def index_older_copies(self, kept):
        """Content-defined spans of each older copy, so they can be found."""
        for file_id, path, size, mtime_ns, modes in kept:
            try:
                info = os.stat(path)
                unchanged = (info.st_size, info.st_mtime_ns) == (size, mtime_ns)
                if unchanged and 'cdc' not in modes.split(','):
                    self.store.add_spans(file_id, 'cdc', signature_spans(path, 'cdc'))
            except OSError:
                unchanged = False
            if not unchanged:
                self.store.forget_file(file_id)


class FileReceiver:
    """Turns one file's data datagrams into written blocks: checks each
    datagram's header and tag, records it in the ReceiveWindow, and keeps
    new blocks that arrive in order as one run, decrypted with one XOR and
    handed to the writer in one piece.  Of the authentic datagrams of its
    flow's file (those the window counts in `packets`) it counts the bytes
    and those flagged as resent or compressed: what the sender's counts
    are made of, as far as this end can see them (flow_counts()).

    Nearly every datagram of a transfer is a full block's, in order: those
    take a path of their own (receive()), where the per-datagram Python is
    the cost of a GB.  Anything else takes _receive_one()."""

    RUN_BYTES = 256 * 1024

    def __init__(self, session_id, sealer, window, writer, size, block_size):
        self._session_id, self._sealer = session_id, sealer
        self.window, self._writer = window, writer
        self._block_size = block_size
        self._full_datagram = DATA_HEADER.size + block_size + TAG_SIZE
        self._run_limit = -(-self.RUN_BYTES // block_size)     # full blocks in a run, at most
        self._last_block = window.nblocks - 1
        self._last_size = size - self._last_block * block_size
        # The run: bodies of new full blocks back to back, not yet decrypted.
        # Random loss breaks the order every hundred blocks or so (the hole,
        # then the block sent again), so a run is not one stretch: `_keys`
        # says where each stretch of consecutive packet numbers starts (its
        # keystream is contiguous), `_spans` where each stretch of
        # consecutive blocks does (one write each), as (number, index in the
        # run).  One decryption and one hand-over per run, however broken.
        self._run = bytearray()
        self._run_count = 0
        self._keys, self._spans = [], []
        self._seq_at = self._block_at = -1      # what would continue the run
        self.rejected = 0
        self.on_control = None                  # takes a copy of a control frame (DataChannel.take)
        self.largest_probe = 0                  # datagram bytes: probes may come with the data
        self.largest_data = 0                   # datagram bytes of the largest authentic data
        self.datagram_bytes = self.resent = self.compressed = 0
        self.steady = False                     # the newest authentic data was flagged DATA_FLAG_STEADY

    def receive(self, buffer, nbytes, segment, now, arrived=None):
        """Take one receive's worth of datagrams (several when coalesced).
        `arrived`: when the first of them reached this host (its kernel
        stamp), if known; it dates that one's delay sample exactly, where
        `now` dates the rest no earlier than they came.

        A full block's data datagram of this flow is taken if its tag,
        checked first, is right; those of one receive then go to the window
        in one call and the new blocks join the run.  Every other datagram
        (a probe, the short last block, a compressed block, a packet number
        from before this file, a forgery's odd size) goes to _receive_one()
        in its turn, the datagrams taken before it handed on first, so the
        order is the order of arrival."""
        view = memoryview(buffer)
        full = self._full_datagram
        whole = nbytes - nbytes % full if segment == full else 0
        if whole:
            unpack, compare = DATA_HEADER.unpack_from, hmac.compare_digest
            new_mac = self._sealer.mac_factory()
            session_id, first_seq, last_block = self._session_id, self.window.first_seq, self._last_block
            tag_at = full - TAG_SIZE
            seqs, blocks, stamps, offsets = [], [], [], []
            resent = 0
            first_stamp = None
            steady = None
            for offset in range(0, whole, full):
                kind, flags, sid, seq, block, stamp = unpack(buffer, offset)
                if kind != KIND_DATA or sid != session_id or flags & DATA_FLAG_ZLIB \
                        or seq < first_seq or block >= last_block:
                    if seqs:
                        self._take(view, seqs, blocks, stamps, offsets, resent, now)
                        seqs, blocks, stamps, offsets = [], [], [], []
                        resent = 0
                    self._receive_one(view, offset, full, now)
                    continue
                mac = new_mac()
                mac.update(view[offset:offset + tag_at])
                if not compare(mac.digest(), view[offset + tag_at:offset + full]):
                    self.rejected += 1
                    continue
                steady = flags
                if flags & DATA_FLAG_RETRANSMIT:
                    resent += 1
                if not offset:
                    first_stamp = stamp
                seqs.append(seq)
                blocks.append(block)
                stamps.append(stamp)
                offsets.append(offset)
            if seqs:
                self._take(view, seqs, blocks, stamps, offsets, resent, now)
            if first_stamp is not None and arrived is not None:
                self.window.delay_sample(first_stamp, arrived)
            if steady is not None:
                self.steady = bool(steady & DATA_FLAG_STEADY)
        for offset in range(whole, nbytes, segment):
            self._receive_one(view, offset, min(segment, nbytes - offset), now)

    def _take(self, view, seqs, blocks, stamps, offsets, resent, now):
        """Full blocks' datagrams of this file, authentic, in order of
        arrival (`offsets` in `view`): counted, recorded in the window, and
        the new blocks added to the run."""
        full = self._full_datagram
        self.datagram_bytes += len(seqs) * full
        self.resent += resent
        if full > self.largest_data:
            self.largest_data = full
        new = self.window.on_packets(seqs, blocks, stamps, now)
        if not new:
            return
        header_size, block_size, limit = DATA_HEADER.size, self._block_size, self._run_limit
        run, count, keys, spans = self._run, self._run_count, self._keys, self._spans
        seq_at, block_at = self._seq_at, self._block_at
        for i in new:
            block, seq = blocks[i], seqs[i]
            if block != block_at or seq != seq_at or count >= limit:
                if count >= limit:
                    self._run_count = count
                    self.flush()
                    run, count, keys, spans = self._run, 0, self._keys, self._spans
                if not count or seq != seq_at:
                    keys.append((seq, count))
                if not count or block != block_at:
                    spans.append((block, count))
            start = offsets[i] + header_size
            run += view[start:start + block_size]
            count += 1
            seq_at, block_at = seq + 1, block + 1
        self._run_count, self._seq_at, self._block_at = count, seq_at, block_at

    def _receive_one(self, view, offset, length, now):
        """One datagram, whatever it is."""
        header_size = DATA_HEADER.size
        if length < header_size + TAG_SIZE:
            self.rejected += 1
            return
        kind, flags, sid, seq, block, stamp = DATA_HEADER.unpack_from(view, offset)
        body = None
        if kind == KIND_PROBE:
            self.largest_probe = max(self.largest_probe, probe_length(
                self._sealer, self._session_id, view, offset, length))
            return
        if kind == KIND_CONTROL and self.on_control is not None:
            self.on_control(view[offset:offset + length])
            return
        if kind == KIND_DATA and sid == self._session_id:
            body = self._sealer.verify(view[offset:offset + header_size],
                                       view[offset + header_size:offset + length])
            if body is not None:
                self.largest_data = max(self.largest_data, length)
                self.steady = bool(flags & DATA_FLAG_STEADY)
        expected = self._block_size if block < self._last_block else self._last_size
        if body is not None and flags & DATA_FLAG_ZLIB:
            self._compressed(seq, block, stamp, body, expected, now, length, flags)
            return
        if body is None or len(body) != expected:
            self.rejected += 1
            return
        window = self.window
        if seq >= window.first_seq and block <= self._last_block:      # those the window counts
            self.datagram_bytes += length
            if flags & DATA_FLAG_RETRANSMIT:
                self.resent += 1
        if not window.on_packet(seq, block, stamp, now):
            return
        if self._run_count >= self._run_limit:
            self.flush()
        count = self._run_count
        if not count or seq != self._seq_at:
            self._keys.append((seq, count))
        if not count or block != self._block_at:
            self._spans.append((block, count))
        self._run += body
        self._run_count = count + 1
        self._seq_at, self._block_at = seq + 1, block + 1
        if len(body) < self._block_size:
            self.flush()            # a short block ends a run

    def _compressed(self, seq, block, stamp, body, expected, now, length, flags):
        """A block sent compressed: decrypted and inflated on its own."""
        inflater = zlib.decompressobj()
        try:
            data = inflater.decompress(self._sealer.open_run(seq, body), expected + 1)
        except zlib.error:
            data = b''
        if len(data) != expected or not inflater.eof:
            self.rejected += 1                  # authentic but malformed: the sender is broken
            return
        if seq >= self.window.first_seq and block <= self._last_block:
            self.datagram_bytes += length
            self.compressed += 1
            if flags & DATA_FLAG_RETRANSMIT:
                self.resent += 1
        if self.window.on_packet(seq, block, stamp, now):
            self.flush()
            self._writer.put(block, data)

    def flush(self):
        """Decrypt the run and hand its spans to the writer."""
        if not self._run_count:
            return
        run, keys, spans, count = self._run, self._keys, self._spans, self._run_count
        self._run, self._keys, self._spans, self._run_count = bytearray(), [], [], 0
        self._seq_at = self._block_at = -1
        block_size, put = self._block_size, self._writer.put
        if len(keys) == 1:
            data = self._sealer.open_run(keys[0][0], run, in_place=True)
        else:
            ends = [index * block_size for _seq, index in keys[1:]] + [len(run)]
            data = self._sealer.open_runs(
                [(seq, end - index * block_size) for (seq, index), end in zip(keys, ends)], run)
        if len(spans) == 1:
            put(spans[0][0], data)
            return
        view = memoryview(data)
        ends = [index * block_size for _block, index in spans[1:]] + [len(data)]
        for (block, index), end in zip(spans, ends):
            put(block, view[index * block_size:end])

    def flow_counts(self):
        """FlowCounts of its flow so far."""
        window = self.window
        return FlowCounts(max(0, window.largest - window.first_seq + 1), window.packets,
                          self.resent, self.compressed, self.datagram_bytes)


class ReceivePhase:
    """The data phase of one IncomingFile: datagrams in and blocks written,
    feedback and NAKs out; with an `assembler` (a delta), signature pieces
    in and local data written too.  `run()` is one small loop, as
    socketserver's serve_forever: wait for either channel or the next
    timer, take what came, then give each timer its turn (feedback, NAK,
    the path's proof, progress, state save), each step one job.  With
    `unproven` blocks, no datagram (data or probe) as large as a full
    block's for a few round trips raises PathTooNarrow.  `flows`: how many
    share the file, for a receiving worker's share (the coordinator's
    `team` says)."""

    def __init__(self, incoming, window, writer, assembler=None, unproven=False, proven=0, team=None,
                 flows=1):
        start, rtt = incoming.start, incoming.rtt
        self.incoming = incoming
        # Striped (a ReceivingTeam): the window holds this process's stripes
        # only, `known` what the file holds.
        self.team = team
        self.known = window.bitmap if team is None else incoming.bitmap
        self.foreign = 0 if team is None else foreign_blocks(
            window.nblocks, start['stripe'], len(start['workers']) + 1, 0, start.get('cycle'))
        self.window, self.writer, self.assembler = window, writer, assembler
        self.conversation, self.data = incoming.conversation, incoming.data
        self.channel = incoming.conversation.channel     # fed here: the loop waits on its socket
        self.events, self.clock = incoming.events, incoming.clock
        self.size, self.block_size = incoming.entry.size, incoming.block_size
        self.file_id = start['file']
        self.lead = start.get('lead', 0)        # blocks the sender sends a delta unasked
        self.asked_end = self.lead              # blocks named to the sender end here
        self.planned = []                       # blocks local data is to fill, not yet filled
        self.older_copies = incoming.kept if assembler is not None else None
        self.receiver = FileReceiver(self.data.session_id, self.data.sealer_in, window, writer,
                                     self.size, self.block_size)
        if self.data.control is not None:           # not a worker's flow
            self.receiver.on_control = self.data.take
        self.buffer = bytearray(GATHER_BUFFER)
        self.full_datagram = DATA_HEADER.size + self.block_size + TAG_SIZE
        self.proven = proven                    # bytes of the largest probe before this phase
        # A striped file's flow is acknowledged every k intervals on a long
        # path (stretched_feedback), but only while its sender says it is
        # past its startup (DATA_FLAG_STEADY): a startup slot is a few
        # intervals long, and news of k intervals merged at the sender
        # across its edges read slots low (0.72-0.91 of their rate, one
        # slot in four on the model at 600 ms and 5% loss).  On the link
        # there a slot read 0.86 of its rate: the next asked too little,
        # the startup took a round trip more and ended at 176 Mbit/s of 200.
        self.feedback_interval = feedback_interval(rtt)
        self.stretched_interval = feedback_interval(
            rtt, flows if team is None else len(start['workers']) + 1)
        self.idle_limit = max(0.02, rtt / 2)
        now = self.clock()
        self.narrow_check = now + max(NARROW_PATH_WAIT, 3 * rtt) if unproven else None
        self.last_data = self.next_nak = now
        self.next_feedback = now + self.feedback_interval
        self.next_progress = now + PROGRESS_INTERVAL
        self.next_save = now + STATE_SAVE_INTERVAL
        self._gathering_from = now              # since when the next wakeup's datagrams came
        self._arrival_rate = None               # bytes/s, smoothed over wakeups (a trickle's pause)
        self._trickle = False                   # the last wakeup found less than GATHER_TARGET
        self.packets_at_feedback = 0
        self.signature_bytes = 0                # what the pieces applied count, as the sender counts
        self.repeat_final = team is not None    # see _send_feedback
        self.next_final = now

    def run(self):
        clock, complete = self.clock, self.complete
        selector = selectors.DefaultSelector()
        selector.register(self.data.udp.sock, selectors.EVENT_READ, self._receive_udp)
        selector.register(self.channel.sock, selectors.EVENT_READ, self._receive_control)
        if self.team is not None:
            self.team.watch(selector, self)
        try:
            self._apply_control()               # what arrived with 'start'
            now = clock()
            while not complete():
                for key, _events in selector.select(max(0.0, self._wake_at() - now)):
                    key.data()
                now = clock()
                self._send_feedback(now)
                self._send_nak(now)
                self._check_path(now)
                self._report_progress(now)
                self._save_state(now)
            self._count_arrived()
        finally:
            self.receiver.flush()
            selector.close()

    def _count_arrived(self):
        """Take the datagrams of the file already waiting when it is whole
        (a delta's lead, say, overtaken by its local data): not needed, but
        sent and received, and the summary's sender figures are made of
        what this end saw.  At most a wakeup's worth."""
        recv_batch, receive, buffer = self.data.udp.recv_batch, self.receiver.receive, self.buffer
        for _receives in range(MAX_RECEIVES_PER_WAKEUP):
            nbytes, segment = recv_batch(buffer, self.full_datagram)
            if not nbytes:
                break
            receive(buffer, nbytes, segment, self.clock())

    def complete(self):
        """Every block held: this process's, and the workers' too."""
        return self.window.complete() and (self.team is None or self.team.complete())

    def _wake_at(self):
        return min(self.next_feedback, self.next_progress,
                   max(self.last_data + self.idle_limit, self.next_nak))

    def _receive_datagrams(self):
        """Up to MAX_RECEIVES_PER_WAKEUP receives (or WAKEUP_BYTES), then
        the timers' turn; in a trickle, after a pause."""
        udp, receive, window, full = self.data.udp, self.receiver.receive, self.window, self.full_datagram
        recv_batch, buffer, clock, last_data = udp.recv_batch, self.buffer, self.clock, self.last_data
        pause = self._trickle_pause(clock())
        if pause > 0:
            time.sleep(pause)
        taken = receives = 0
        # What a gather held back is taken now: the socket will not wake us for it.
        while receives < MAX_RECEIVES_PER_WAKEUP and taken < WAKEUP_BYTES or udp.held:
            nbytes, segment = recv_batch(buffer, full)
            if not nbytes:
                break
            now = clock()
            packets = window.packets
            receive(buffer, nbytes, segment, now, now - udp.waited)
            if window.packets != packets:
                last_data = now
            taken += nbytes
            receives += 1
            if udp.drained and not udp.held:
                # A gather that emptied the socket: what came meanwhile is
                # a batch of a few, which costs as much as a full one; it
                # waits for the next wakeup.
                break
        self.last_data = last_data
        self.receiver.flush()
        self._note_arrivals(taken, clock())

    def _trickle_pause(self, now):
        """Seconds to let datagrams gather in the socket buffer before they
        are taken, when the last wakeup found less than GATHER_TARGET: what
        that takes to arrive at the rate they have been coming, and never
        past the next feedback.  The pause comes before the receives, so
        the acknowledgement that follows reports all but what arrived in
        the receives' own time.  Each wakeup costs the same whatever it
        takes; its delay samples do not grow with it (the least of an
        interval's is kept, and the newest arrivals waited least)."""
        if not self._trickle:
            return 0.0
        return min(GATHER_TARGET / self._arrival_rate, self.next_feedback - now)

    def _note_arrivals(self, taken, now):
        """`taken` bytes came since the last wakeup's receives ended."""
        elapsed, self._gathering_from = now - self._gathering_from, now
        if elapsed > 0:
            sample, rate = taken / elapsed, self._arrival_rate
            self._arrival_rate = sample if rate is None else 0.75 * rate + 0.25 * sample
        self._trickle = taken < GATHER_TARGET and bool(self._arrival_rate)

    def _receive_udp(self):
        self._receive_datagrams()
        # Copies of control frames may have come (not to a worker's flow).
        if self.data.control is not None and self.channel.pending() and self._apply_control():
            self.last_data = self.clock()

    def _receive_control(self):
        data = self.channel.sock.recv(65536)
        if not data:
            raise TransferError('the %s closed the connection; partial data kept: run the same '
                                'command again to resume' % self.conversation.peer)
        self.channel.feed(data)
        if self._apply_control():
            self.last_data = self.clock()

    def _apply_control(self):
        """Apply the signature pieces received, keep the sender's early
        checksum (and refuse anything else); True if there were any pieces."""
        applied = False
        for message in self.channel.messages():
            if message['op'] == 'signature' and self.assembler is not None \
                    and message.get('file') == self.file_id:
                self._apply_signature(message)
                applied = True
            elif message['op'] == 'checksum' and message['file'] == self.file_id:
                self.incoming.checksum = message['sha256']     # compared once the file is whole
            else:
                self.conversation.check(message, 'nothing during the data phase')
        return applied

    def _apply_signature(self, message):
        """Fill what this piece of the signature lets us, and ask the sender
        for the rest of the blocks it decides."""
        window, lead = self.window, self.lead
        self.signature_bytes += len(message['spans']) + SIGNATURE_PIECE_BYTES
        self.assembler.on_planned = self._ask_early
        held, decided, refine = self.assembler.on_piece(message['offset'],
                                                        decode_spans(message['spans']),
                                                        bool(message.get('refined')))
        window.mark_held(held)
        self.writer.mark_written(held)
        window.decided = max(decided, window.decided)
        if self.team is not None:
            # Decided blocks reach the workers only with those local data
            # filled: a worker would NAK the rest, and the sender send them.
            for start, end in held:
                set_bits(self.known, start, end)
            self.team.forward_held(held)
            self.team.forward_decided(window.decided)
        # The sender sends the lead unasked: what of it was found here need
        # not come; what is missing is NAKed once decided.
        held_lead = [(start, min(end, lead)) for start, end in held if start < lead]
        # What local data was to fill and did not (a span that failed its
        # check) is asked for now; below blocks asked for before it is
        # NAKed, once the data pauses, as a lost block is (the sender takes
        # each block's first naming, in file order, and no later one).
        failed = subtract_ranges(self.planned, held)
        self.planned = []
        late = [(max(start, self.asked_end), end) for start, end in failed if end > self.asked_end]
        if late or held_lead:
            self._ask(late, held_lead)
        if refine:
            self.conversation.send({'op': 'refine', 'file': self.file_id, 'offset': refine[0],
                                    'end': refine[1]})
            if self.older_copies:               # once, while the sender cuts its copy
                self.incoming.index_older_copies(self.older_copies)
                self.older_copies = None

    def _ask_early(self, planned, decided):
        """Ask for the blocks of a piece that local data is not to fill
        (`planned` are those it is to) before its spans are read and
        checked: they come while the disk works."""
        window = self.window
        self.planned.extend(planned)
        if decided > window.decided:
            need = subtract_ranges(
                bitmap_missing_ranges(self.known, decided, first=max(window.decided, self.lead)),
                planned)
            window.decided = decided
            self._ask(need, [])

    def _ask(self, ranges, held):
        self.conversation.send({'op': 'need', 'file': self.file_id, 'ranges': ranges, 'held': held})
        if ranges:
            self.asked_end = max(self.asked_end, ranges[-1][1])

    def _send_feedback(self, now):
        if now >= self.next_feedback:
            window = self.window
            # A share of a striped file, complete, says so again every
            # idle_limit while the rest of the file comes: were its last
            # acknowledgement lost, its sender would see packets in flight
            # and silence, and halve the rate all the workers share.  (One
            # that got no packet, all of it found locally, has nothing to say.)
            repeat = self.repeat_final and window.packets and window.complete() and \
                now >= self.next_final
            if window.packets != self.packets_at_feedback or repeat:
                self.packets_at_feedback = window.packets
                self.data.send(KIND_FEEDBACK, encode_feedback(self.file_id, *window.feedback(now)))
                self.next_final = now + self.idle_limit
            self.next_feedback = now + (self.stretched_interval if self.receiver.steady
                                        else self.feedback_interval)

    def _send_nak(self, now):
        """Once the data pauses, what is missing; after `timeout` of it, give up."""
        if now - self.last_data >= self.idle_limit and now >= self.next_nak:
            missing = self.window.missing()
            if missing:
                self.data.send(KIND_NAK, encode_nak(self.file_id, missing))
            self.next_nak = now + self.idle_limit
            if now - self.last_data > self.conversation.timeout:
                raise TransferError('no data from the %s for %d s; partial data kept: run the same '
                                    'command again to resume'
                                    % (self.conversation.peer, self.conversation.timeout))

    def _check_path(self, now):
        # Only a datagram of a full block's size proves the path: the short
        # last block, or one that compressed well, fit through a path that
        # loses every other block.
        if self.narrow_check is not None:
            receiver = self.receiver
            if max(receiver.largest_data, receiver.largest_probe, self.proven) >= self.full_datagram:
                self.narrow_check = None
            elif now >= self.narrow_check:
                raise PathTooNarrow()

    def _report_progress(self, now):
        if now >= self.next_progress:
            self.next_progress = now + PROGRESS_INTERVAL
            window, size = self.window, self.size
            held, received = window.held - self.foreign, self.writer.written_bytes
            packets, duplicates = window.packets, window.duplicates
            if self.team is not None:
                shares = self.team.totals()
                held, received = held + shares['held'], received + shares['written_bytes']
                packets += sum(shares['packets'])
                duplicates += shares['duplicates']
            self.events.progress({
                'file_bytes': size, 'held_bytes': min(size, held * self.block_size),
                'received_bytes': received, 'elapsed': now - self.incoming.asked_at,
                'packets': packets, 'duplicates': duplicates,
                'loss': window.loss_fraction()})

    def _save_state(self, now):
        if now >= self.next_save:
            self.next_save = now + STATE_SAVE_INTERVAL
            self.writer.flush()
            self.incoming.partial.save_state(self.writer.written_bitmap())


# --- Planning a get: destinations, directories made and tidied --------------

def safe_relative(path):
    """A path the server sent us, checked so a hostile server cannot make us
    write outside the destination."""
    try:
        clean = normalize_remote(path)
    except RemoteError:
        clean = None
    if clean != path.strip('/') or clean in ('', '.'):
        raise ProtocolError('the server sent an unsafe path %r' % path)
    return clean


def new_file_destination(remotes, dest):
    """Where a single REMOTE lands if it is a file, provided nothing is
    there yet (no file, no partial copy): then it can be fetched before
    it is listed.  None otherwise."""
    if len(remotes) != 1:
        return None
    try:
        name = normalize_remote(remotes[0]).rsplit('/', 1)[-1]
    except RemoteError:
        return None
    if not name:
        return None
    target = dest if dest is not None and not os.path.isdir(dest) else os.path.join(dest or '.', name)
    if os.path.lexists(target) or PartialFile.left_at(target):
        return None
    return target


def plan_downloads(remotes, dest, results):
    """The DownloadPlan of getting the REMOTEs into `dest` (None: the
    current directory), from `results`: the Listing of each REMOTE, or the
    RemoteError the server answered for it."""
    listings, errors = [], []
    for remote, result in zip(remotes, results):
        if isinstance(result, RemoteError):
            errors.append(result)
        else:
            listings.append((normalize_remote(remote), result))
    downloads, dirs, trees = [], [], []
    single = len(remotes) == 1 and len(listings) == 1 and listings[0][1].kind == 'file'
    if single and dest is not None and not os.path.isdir(dest):
        remote, listing = listings[0]
        return DownloadPlan([Download(remote, dest, listing.files[0])], dirs, errors, [(dest, [dest])])
    base = dest if dest is not None else '.'
    if listings:                                # else nothing will go there: do not make it
        dirs.append(base)
    for remote, listing in listings:
        top = os.path.join(base, safe_relative(listing.name)) if listing.name else base
        if listing.kind == 'file':
            downloads.append(Download(remote, top, listing.files[0]))
            trees.append((top, [top]))
            continue
        first = len(downloads)
        dirs.append(top)
        dirs.extend(os.path.join(top, safe_relative(d)) for d in listing.dirs)
        for entry in listing.files:
            rel = safe_relative(entry.path)
            downloads.append(Download((remote + '/' if remote else '') + rel, os.path.join(top, rel),
                                      entry))
            if '/' in rel:                      # its directory, checked like the listed ones
                dirs.append(os.path.dirname(os.path.join(top, rel)))
        trees.append((top, [download.dest for download in downloads[first:]]))
    return DownloadPlan(downloads, dirs, errors, trees)


def make_directories(dirs, created):
    """Create `dirs` (the destination first, then directories below it),
    adding those that were not there before to `created`, parents first
    (also when one of them cannot be made).
    The destination is the user's and may be a link; below it, a symbolic
    link where a directory of the tree goes is refused, not followed: one
    planted in a shared destination would put the files wherever it points
    (moving a link of the user's aside is left to the user)."""
    if not dirs:
        return
    base, missing = dirs[0], []
    parent = os.path.normpath(base)
    while parent not in ('', '.', os.sep) and not os.path.lexists(parent):
        missing.insert(0, parent)
        parent = os.path.dirname(parent)
    try:
        os.makedirs(base, exist_ok=True)
    except OSError as e:
        created.extend(path for path in missing if os.path.isdir(path))
        raise TransferError('cannot create directory %s: %s' % (base, e.strerror))
    created.extend(missing)
    made = set()
    for directory in dirs[1:]:
        path = base
        for part in os.path.relpath(directory, base).split(os.sep):
            path = os.path.join(path, part)
            if part in ('', '.') or path in made:
                continue
            try:
                os.mkdir(path)
                created.append(os.path.normpath(path))
            except FileExistsError:
                pass
            except OSError as e:
                raise TransferError('cannot create directory %s: %s' % (path, e.strerror))
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                raise TransferError('%s is a symbolic link; get does not write through links: '
                                    'remove it or fetch into another directory' % path)
            if not stat.S_ISDIR(info.st_mode):
                raise TransferError('cannot create directory %s: a file is in the way' % path)
            made.add(path)


def tidy_directories(created, trees, arrived):
    """Remove the directories this run `created` (parents first) for
    REMOTEs that failed wholly (none of their files `arrived`), if empty:
    a refused or failed get leaves nothing behind.  An empty remote
    directory is content, not a failure: its directories stay, as do the
    ones leading to whatever did arrive, and any holding a partial file
    kept for the next run."""
    kept = [os.path.abspath(top) for top, dests in trees
            if not dests or any(dest in arrived for dest in dests)]
    for directory in reversed(created):
        where = os.path.abspath(directory)
        if any(is_within(where, top) or is_within(top, where) for top in kept):
            continue
        try:
            os.rmdir(directory)
        except OSError:
            pass                                # not empty, or not ours to remove after all


# --- The session ------------------------------------------------------------

class Client:
    """A session with one server: its connection, keys, UDP flow and the
    probes that size its blocks.  `get()` is the way in: REMOTEs into a
    destination, file by file.  `listing()` and `fetch()` of one file
    whose listing is known serve `demo` and tests.  `close()` at the end."""

    def __init__(self, host, port, secret, encrypt=True, timeout=DATA_TIMEOUT, events=None,
                 max_rate=None, store=None, workers=1, auto_workers=False, salts=None):
        self.host, self.port = host, port
        self.salts = salts                      # a SaltMemory: the stretch runs beside the connect
        self.workers = workers                  # processes to stripe large files over, at most
        self.auto_workers = auto_workers        # ... chosen for the user: the server may use fewer
        self.team = None                        # the ReceivingTeam, once forked
        self.keys = None
        self._workers_asked = False
        self._granted = 1                       # processes the server granted (forked when needed)
        self.max_rate = max_rate                # bytes/s, or None: the path decides
        self.store = store                      # a ChunkStore: delta transfers; None: plain
        self.origin = server_origin(host, port, secret)     # what of the store this server may use
        self.secret, self.encrypt = SharedSecret.of(secret), encrypt
        self.timeout = timeout
        self.events = events or TransferEvents()
        self.sock = self.udp = None
        self.session_id = None
        self.rtt = None                         # s, measured by the handshake
        self._early = False                     # the handshake was an early one (EarlyHello)
        self.control = None                     # the ControlChannel
        self.conversation = None                # and the Conversation on it
        self.data = None                        # the DataChannel on `udp`
        self._probes_awaited = False
        self._ready = False                     # the server has seen our HELLO
        self._connect_started = None            # the first file's wait counts from here

    def connect(self, early=True):
        """Connect and authenticate; `early`: try the early handshake."""
        self._connect_started = time.monotonic()
        # The secret is stretched with the salt this server proved itself
        # with last time while the connect and the HELLO cross the path: not
        # after its hello, where the stretch would delay the first request.
        remembered = self.salts.recall(self.origin) if self.salts is not None else None
        ahead = []
        # The HELLO goes as a datagram too, beside the SYN (EarlyHello), with
        # the flags this client will offer if the AES library loads, as it
        # nearly always does (if not, the handshake goes the TCP way).
        offered = FLAG_MIRROR
        if self.encrypt:
            offered |= FLAG_ENCRYPT | (FLAG_AES_CTR if CounterMode.expected() else 0)
        early = EarlyHello(offered) if early else None

        def meanwhile(family, address):
            if early is not None:
                early.send(family, address)
            try:
                if remembered is not None:
                    ahead.append(self.secret.prepare(remembered))
                if self.encrypt:
                    # Likewise the cipher's first load (ctypes imported, AES
                    # tried), which the HELLO waits for: 3-7 ms.
                    ahead.append(start_thread(CounterMode.load, 'cipher'))
            except NoThread:
                pass                            # then it is done in the handshake, as ever
        try:
            try:
                self.sock = connect_racing(self.host, self.port, HANDSHAKE_TIMEOUT, meanwhile=meanwhile)
            except socket.gaierror as e:
                raise TransferError('cannot resolve %s: %s' % (self.host, e.strerror))
            except OSError as e:
                raise TransferError('cannot connect to %s:%d: %s' % (self.host, self.port,
                                                                    e.strerror or e))
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # Asked now: a connection reset after an early proof no longer has one.
            peer = self.sock.getpeername()[:2]
            try:
                keys, self.rtt = client_handshake(self.sock, self.secret, self.encrypt, mirror=True,
                                                  early=early)
            except struct.error:
                raise ProtocolError('the server closed the connection during the handshake')
            except socket.timeout:
                raise TransferError('%s:%d did not answer the handshake' % (self.host, self.port))
        finally:
            self._early = early is not None and early.taken
            if early is not None:
                early.close()
            for thread in ahead:                # no thread may be running when workers fork
                thread.join()
        if self.salts is not None and keys.salt != remembered:
            self.salts.remember(self.origin, keys.salt)
        self.session_id = keys.session_id
        self.keys = keys
        ctrl_out, ctrl_in, data_out, data_in = keys.sealers('client')
        self.control = ControlChannel(self.sock, ctrl_out, ctrl_in, peer='server')
        self.conversation = Conversation(self.control, self.timeout)
        # Every wait on the server, a send to it too, ends after `timeout`.
        self.sock.settimeout(self.timeout)
        udp = socket.socket(self.sock.family, socket.SOCK_DGRAM)
        udp.connect(peer)
        self.udp = DatagramSocket(udp)
        self.data = DataChannel(self.udp, data_out, data_in, self.session_id, control=self.control)
        self.control.datagrams = (self.udp.sock, self.data.take_control_datagrams)
        # Small frames go as datagrams too, from the first request on (to
        # a session not set up yet, the server keeps them a little while).
        self.control.mirror = functools.partial(send_frame_copy, self.udp.sock, self.session_id)
        for warning in self.udp.warnings:
            self.events.warning(warning)
        self._probes_awaited = False
        self._ready = False
        self.data.send(KIND_HELLO)              # the server waits for it from now on
        # Before any request, so that the first (an open fetch) is striped too.
        self._workers_asked = False
        self._granted = 1
        if self.workers > 1:
            if sessions_can_fork():
                request = {'op': 'workers', 'count': self.workers, 'lazy': True, 'cycle': True}
                if self.auto_workers:
                    request['auto'] = True
                self.conversation.send(request)
                self._workers_asked = True
            else:
                self.events.warning('worker processes cannot be forked here (not Linux, or '
                                    'threads running); one process receives')

    def get(self, remotes, dest=None):
        """Get the REMOTEs into `dest`: a directory (made if need be), or
        for a single file its new name; None: the current directory.
        Connects first if need be.  Yields the RemoteError of each REMOTE
        the server refused, then the summary of each file as it arrives
        (or the RemoteError the server answered for it).  Directories it
        made for REMOTEs of which nothing arrived are removed again when
        it ends, however it ends.  A server that hangs up on an early
        handshake is asked again once, the plain way (_refused_early)."""
        yielded = False
        try:
            if self.sock is None:
                self.connect()
            for outcome in self._get(remotes, dest):
                yielded = True
                yield outcome
            return
        except (PeerClosed, ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
            # The connection lost: closed, or reset (as a server's end closed
            # with requests unread resets it).
            if yielded or not self._refused_early():
                raise
        self._connect_again()
        yield from self._get(remotes, dest)

    def _refused_early(self):
        """The session's handshake went the early way and the server hung
        up before its first message: a refused claim, nearly always (a
        server restarted since it answered: its cookie key is new; or one
        flooded with early handshakes).

        The server says nothing when it refuses one, and the client does
        not ask it to: any word it could send before hanging up would be
        as unauthenticated as the hang-up itself (the claim failed: no key
        is agreed), so an attacker on the path could forge either just as
        easily, and the hang-up is what every server, older ones too,
        already does.  A forged one (a reset injected on the path) costs
        the client the round trips of a new connection and no more: what
        follows is the plain handshake, authenticated as ever, once.  Nothing was answered, so nothing was done: the same
        requests go again on the new session.  A server that failed in
        another way before its first message (a session process that
        ended at once) is asked again too; the plain way then fails as it
        would have."""
        return self._early and (self.control is None or not self.control.received)

    def _connect_again(self):
        """A new session, the plain way, in place of one whose early
        handshake was refused: what the first connected (its workers, its
        sockets) is let go first; the first file's wait still counts from
        the first connect."""
        started = self._connect_started
        self.events.warning('%s:%d hung up on the early handshake (restarted since it answered?); '
                            'connecting again' % (self.host, self.port))
        self.close()
        self.connect(early=False)
        self._connect_started = started

    def _get(self, remotes, dest):
        created, trees, arrived = [], [], set()
        try:
            target = new_file_destination(remotes, dest)
            summary, listing = (self._fetch_new(normalize_remote(remotes[0]), target)
                                if target is not None else (None, None))
            if summary is not None:
                yield summary
                return
            plan = plan_downloads(remotes, dest, [listing] if listing is not None
                                  else self.listings(remotes))
            trees = plan.trees
            yield from plan.errors
            make_directories(plan.dirs, created)
            for download, outcome in self._outcomes(plan.downloads):
                if not isinstance(outcome, RemoteError):
                    arrived.add(download.dest)
                yield outcome
        finally:
            tidy_directories(created, trees, arrived)

    def _outcomes(self, downloads):
        """(download, summary or RemoteError) for each: small files in
        batches on the control channel, the rest (and small ones an older
        server would not batch) on the data channel."""
        small = [download for download in downloads if download.entry.size <= SMALL_FILE]
        by_channel = [download for download in downloads if download.entry.size > SMALL_FILE]
        self._ensure_ready()
        self._fork_for(by_channel)
        if len(small) == 1:
            by_channel.insert(0, small[0])
        elif small:
            for download, summary in self._fetch_small(small):
                if summary is None:
                    by_channel.append(download)
                else:
                    yield download, summary
        yield from self._fetch_files(by_channel)

    def _ensure_ready(self):
        if not self._ready:
            self._open_udp_flow()
            self._ready = True
            if self._workers_asked:
                self._start_workers()

    def _start_workers(self):
        """The server's answer to the workers asked for (the first, as it
        was the first request; an older server refuses it).  The workers it
        granted are forked when there is a file to stripe: before the first
        whose size says so, or when the server says `fork` (it answered
        `lazy`); at once for a server that forks its own at once."""
        answer = self.conversation.recv()
        if answer['op'] == 'error':
            return
        answer = self.conversation.check(answer, 'workers')
        self._granted = min(self.workers, answer['count'])
        if self._granted > 1:
            if answer.get('lazy'):
                self.conversation.on_fork = self._told_to_fork
            else:
                self._fork_workers()

    def _told_to_fork(self):
        self.conversation.on_fork = None        # once a session: another `fork` is refused
        self._fork_workers()

    def _fork_workers(self, count=None):
        """Fork the workers granted (or `count`), once, each opening its own flow."""
        count = count or self._granted
        if self.team is None and count > 1:
            try:
                self.team = ReceivingTeam(self, count)
            except OSError as e:
                raise TransferError('cannot start worker processes: %s' % describe_error(e))

    def _fork_with_open_fetch(self):
        """An open fetch names a file whose size is not known yet, and the
        first file of a session is most often the large one it is for: fork
        the workers asked for now, so that their flows open beside the
        request instead of a round trip after the server's `fork`.  A
        server that grants fewer names only those in its `start`s; the
        others send HELLOs for a while and wait for the session's end."""
        if self._workers_asked:
            self._fork_workers(self.workers)

    def _fork_for(self, downloads):
        """Fork the workers before any of `downloads` is fetched (and so
        beside no thread of a transfer), if one is sure to be striped:
        their flows open while the first files come."""
        if self.team is None and self._granted > 1 and any(
                download.entry.size > STRIPE_SURELY for download in downloads):
            self._fork_workers()

    def _open_udp_flow(self):
        """Send HELLO datagrams until the server says it has seen one."""
        deadline = time.monotonic() + UDP_SETUP_TIMEOUT + 5
        self.sock.settimeout(HELLO_INTERVAL)
        try:
            while time.monotonic() < deadline:
                self.data.send(KIND_HELLO)
                try:
                    message = self.control.recv()
                except socket.timeout:
                    continue
                return self.conversation.check(message, 'ready')
        finally:
            self.sock.settimeout(self.timeout)
        raise TransferError('the server never confirmed the UDP data channel')

    @property
    def _largest_probe(self):
        """Bytes of the largest authentic probe come so far."""
        return self.data.largest_probe

    def _collect_probes(self):
        """Note the largest authentic probe datagram waiting on the socket
        (and take the copies of control frames with them): no data is due."""
        self.data.take_control_datagrams(everything=True)

    def _largest_probe_mtu(self):
        """The largest packet the path proved it carries (MIN_MTU if unproven)."""
        return max(MIN_MTU, self._largest_probe + ip_udp_overhead(self.sock.family))

    def _await_probes(self):
        """Wait, once a session and briefly, for the first probe: the server
        sends them with `ready`, but on a loaded host or path they can come
        after the listing that follows it, and blocks chosen before any
        came would be the smallest (and would not match a partial copy's)."""
        if self._probes_awaited:
            return
        self._probes_awaited = True
        deadline = time.monotonic() + min(PROBE_WAIT_MAX, max(PROBE_WAIT_MIN, 4 * self.rtt))
        with selectors.DefaultSelector() as selector:
            selector.register(self.udp.sock, selectors.EVENT_READ)
            while not self._largest_probe:
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    return
                self._collect_probes()

    def _choose_block_size(self, largest_mtu=MAX_MTU):
        """Blocks as large as the path proved it carries (MIN_MTU if unproven)."""
        self._collect_probes()
        self._await_probes()
        return block_size_for_mtu(min(largest_mtu, self._largest_probe_mtu()), self.sock.family)

    def listings(self, remotes):
        """What each REMOTE expands to, asked all at once and while the UDP
        channel opens (one round trip in all): a Listing, or the
        RemoteError the server answered, for each."""
        for remote in remotes:
            self.conversation.send({'op': 'list', 'path': remote})
        self._ensure_ready()
        results = []
        for _remote in remotes:
            try:
                results.append(self._whole_listing(self.conversation.recv()))
            except RemoteError as e:
                results.append(e)
        return results

    def _whole_listing(self, page):
        """A Listing, from its first page (`page`) and the pages after it."""
        return Listing.from_pages(self.conversation.check(page, 'listing'),
                                  lambda: self.conversation.expect('listing'))

    def listing(self, remote):
        (result,) = self.listings([remote])
        if isinstance(result, RemoteError):
            raise result
        return result

    def fetch(self, remote, dest, entry, retries=1):
        """Fetch one file, whose ListingEntry is known, to `dest`; return
        its summary dict."""
        ((_download, result),) = self._fetch_files([Download(remote, dest, entry)], retries)
        if isinstance(result, RemoteError):
            raise result
        return result

    def _incoming(self, download):
        return IncomingFile(download.remote, download.dest, download.entry, self.conversation,
                            self.data, self.events, self.rtt, self.store, self.origin,
                            team=self.team)

    def _fetch_files(self, downloads, retries=1):
        """Fetch `downloads` in order; yield (download, summary, or the
        RemoteError the server answered).  Each file is asked for as soon
        as the one before it is whole, so a single round trip carries that
        one's digest and this one's start.  A file whose digest does not
        match is fetched again from scratch (`retries` times), after the
        one already asked for."""
        queue = collections.deque((download, retries) for download in downloads)
        ahead = []              # [(download and retries left, its IncomingFile asked for)], at most one

        def ask_next():
            if queue:
                download, left = queue.popleft()
                try:
                    ahead.append(((download, left), self._ask(download)))
                except TransferError as e:      # this file's trouble, not the one finishing
                    ahead.append(((download, left), e))
        try:
            while queue or ahead:
                if ahead:
                    (download, left), incoming = ahead.pop()
                else:
                    download, left = queue.popleft()
                    incoming = self._ask(download)
                if isinstance(incoming, TransferError):
                    raise incoming
                try:
                    incoming.answer()
                    yield download, self._transfer(incoming, then=ask_next)
                except RemoteError as e:
                    yield download, e
                except DigestMismatch:
                    if not left:
                        raise
                    self.events.warning('%s: digest mismatch; fetching it again from scratch'
                                        % download.remote)
                    queue.appendleft((download, left - 1))
        finally:
            for _download, incoming in ahead:   # asked for, never answered: the session failed
                if not isinstance(incoming, TransferError):
                    incoming.withdraw()

    def _ask(self, download):
        """An IncomingFile for `download`, its fetch sent."""
        self._ensure_ready()
        incoming = self._incoming(download)
        incoming.ask(self._choose_block_size, self.max_rate)
        return incoming

    def _transfer(self, incoming, then=None, unproven=False):
        """incoming.transfer(), the session's first file waited for since the
        connect, the probes that came with its data kept for the session."""
        waited_since, self._connect_started = self._connect_started or incoming.asked_at, None
        incoming.team = self.team               # forked since it was asked for, maybe
        try:
            return incoming.transfer(waited_since, then, unproven, self._largest_probe)
        finally:
            self.data.largest_probe = max(self.data.largest_probe, incoming.largest_probe)

    def _fetch_new(self, remote, dest):
        """Fetch REMOTE with the session's first request, before anything is
        known of it, saving the listing's round trip: for a file new here
        (nothing at `dest`, no partial copy, no older copy kept).  The block
        size is this host's route's, fitted by the server to its own, and
        proved by the probes or the data itself; a path that carries less
        gives up the attempt and fetches again with blocks that fit.
        Returns (summary, None) when the file came, (None, Listing) when
        REMOTE is a directory, (None, None) when the server would not: the
        caller then lists and fetches as usual."""
        if self.store is not None and self.store.kept_files_for(remote, self.origin):
            return None, None
        self._fork_with_open_fetch()
        family, connected, asked = self.sock.family, self._connect_started, time.monotonic()
        offered = block_size_for_mtu(self.udp.path_mtu(), family)
        self.conversation.send({'op': 'fetch', 'path': remote, 'max_rate': self.max_rate,
                                'block_size': offered,
                                'delta': self.store is not None, 'delta_min': DELTA_MIN_SIZE,
                                'lead': True, 'compress': self.store is not None,
                                # Nothing kept from this server: a delta can find only
                                # zeros here, and a lead of the whole file saves the
                                # round trip to the first `need` (a file up to 32 leads).
                                'whole_lead': self.store is not None and
                                not self.store.keeps_from(self.origin),
                                'early_digest': True})
        self._ensure_ready()
        try:
            answer = self.conversation.recv()
            if answer['op'] == 'listing':
                return None, self._whole_listing(answer)
            start = self.conversation.check(answer, 'start')
        except RemoteError:
            return None, None                   # a listing will say why (or an older server)
        if 'size' not in start:
            raise ProtocolError('the server started an open fetch without naming the file\'s size')
        entry = ListingEntry.from_message(dict(start, path=remote))
        block_size = start['block_size']
        # The server may only lower what was offered, and not to blocks so
        # small that the data costs a packet per few bytes.
        if not min(MIN_BLOCK_SIZE, offered) <= block_size <= offered:
            raise ProtocolError('the server chose %d-byte blocks (offered %d, at least %d)'
                                % (block_size, offered, MIN_BLOCK_SIZE))
        incoming = self._incoming(Download(remote, dest, entry))
        incoming.begin(start, asked)
        try:
            return self._transfer(incoming, unproven=True), None
        except DigestMismatch:
            self.events.warning('%s: digest mismatch; fetching it again from scratch' % remote)
            return self.fetch(remote, dest, entry, retries=0), None
        except PathTooNarrow:
            self.conversation.send({'op': 'abort'})
            incoming.discard()
            self._connect_started = connected
            self.events.warning('the path to %s carries only %d-byte packets; fetching %s again '
                                'with blocks that fit' % (self.host, self._largest_probe_mtu(),
                                                          remote))
            return self.fetch(remote, dest, entry), None

    def _fetch_small(self, downloads):
        """Fetch small files whole on the control channel, the next batches
        asked for while the answers to the first arrive, so the whole lot
        costs about one round trip.  Yields (download, summary or
        RemoteError) for each; a server that predates this request yields
        (download, None) for each, to be fetched one by one."""
        self._ensure_ready()
        batches, batch, batch_bytes, request_bytes = [], [], 0, 0
        for download in downloads:
            size = download.entry.size
            item = len(json.dumps(download.remote)) + SMALL_ITEM_BYTES
            if batch and (batch_bytes + size > SMALL_BATCH_BYTES or len(batch) >= SMALL_BATCH_FILES
                          or request_bytes + item > SMALL_REQUEST_BYTES):
                batches.append(batch)
                batch, batch_bytes, request_bytes = [], 0, 0
            batch.append(download)
            batch_bytes += size
            request_bytes += item
        if batch:
            batches.append(batch)
        # Only a few small requests ahead: were more sent before any answer
        # is read than the server's receive buffer holds, both ends could
        # block writing to each other (long paths made requests that large).
        asked = min(len(batches), SMALL_BATCHES_AHEAD)
        for request in batches[:asked]:
            self._ask_small(request)
        started = time.monotonic()
        for batch in batches:
            for download in batch:
                message = self.conversation.recv()
                if message['op'] == 'error' and download is batches[0][0]:
                    for _request in range(asked - 1):   # an older server: one error per request
                        self.conversation.recv()
                    for unanswered in itertools.chain.from_iterable(batches):
                        yield unanswered, None
                    return
                self.conversation.check(message, 'content')
                if message.get('path') != download.remote:
                    raise ProtocolError('the server answered for %r, not %r'
                                        % (message.get('path'), download.remote))
                if 'error' in message:
                    yield download, RemoteError(str(message['error']))
                else:
                    yield download, self._incoming(download).write_whole(
                        message, time.monotonic() - started)
                started = time.monotonic()
            if asked < len(batches):
                self._ask_small(batches[asked])
                asked += 1

    def _ask_small(self, batch):
        self.conversation.send({'op': 'read', 'compress': self.store is not None, 'files': [
            {'path': download.remote, 'size': download.entry.size,
             'mtime_ns': download.entry.mtime_ns} for download in batch]})

    def close(self):
        """Let go of the session; connect() may start another."""
        for channel in (self.udp, self.sock):
            if channel is not None:
                try:
                    channel.close()
                except OSError:
                    pass
        if self.team is not None:
            self.team.close()
            self.team = None
        self.sock = self.udp = self.control = self.conversation = self.data = None
        self.keys = self.session_id = None
        self._early = False


# ---------------------------------------------------------------------------
# Bulk transfer: worker processes
# ---------------------------------------------------------------------------
# One transfer striped over several processes per end (`--workers N`), so
# that sealing, opening and copying blocks take a core each.  The session's
# own process is worker 0 and the coordinator: it keeps the control channel,
# the one RateController and (receiving) the state file.  Worker 1 also
# reads a striped file whole for its digest, which from three workers on
# was more than the coordinator's share; a delta's signature is hashed by
# every sending worker, each the units of its own stripes, and put
# together by the coordinator (SpreadSignature).
# Workers 1..N-1 are forked from it at the first file large enough to
# stripe (none for a transfer of small files); each has a UDP flow of its
# own (socket, keys, packet numbers) and a socketpair to its coordinator
# (messages in the wire formats section).
#
# A file is cut into stripes of about STRIPE_BYTES; stripe j goes to worker
# cycle[j mod len(cycle)] (j mod k without one), where k, the workers the
# file uses, is at most N and leaves each at least STRIPES_PER_WORKER
# stripes (smaller files go to worker 0 alone; the `start` names k, the
# stripe and the cycle).  Each worker runs the one-worker
# machinery (SendWindow, ReceiveWindow, feedback, NAKs) over its stripes.
# Sending workers hand every acknowledgement to the coordinator's one
# RateController and pace at the share of its rate it sends back (their
# share of the stripes), so k workers take from a path what one flow would.
# The shares of workers 0 and 1 are smaller by the work only they do
# (worker_extras()), so that each process at an end does about as much
# (stripe_cycle(); a client from before weighted deals gets j mod k).
# Receiving workers write their blocks into the one partial file and tell
# the coordinator which are written; it records them in the state file and
# tells worker 1 how far the file is written from its start, which worker 1
# hashes as the coordinator would with one worker (FollowedDigest), so
# resume, delta and verification do not depend on how many workers there
# were.  A file not striped is hashed by the coordinator, as with one.
#
# Workers end with their coordinator: each waits on its socketpair, whose
# other end is in no other process, and exits when that closes.  A worker
# that dies ends the transfer with one line; the partial file stays.

PER_WORKER_RATE = 600e6 / 8     # bytes/s one worker seals and sends, about (automatic --workers)
# An automatic count stripes a file only while the path may need more than
# one worker: across S4 (100 Mbit/s) two workers cost both ends 1.2-1.3 x
# one's CPU per GB for the same rate.  Below this much of what one worker
# does (its peak delivery measured, or a cap), one has room to spare.
AUTO_STRIPE_RATE = 0.6 * PER_WORKER_RATE
MAX_AUTO_WORKERS = 8
WORKER_RATE_STEP = 0.02         # a change of the rate this large reaches the workers at once,
WORKER_RATE_INTERVAL = 0.02     # ... a smaller one at most this often (s)
WORKER_REPORT_INTERVAL = 0.05   # s between a receiving worker's reports of what it wrote, at least,
WORKER_REPORT_BYTES = 4 << 20   # ... once it wrote this much since its last; less, after
WORKER_REPORT_MOST = 0.5        # ... this many s (a slow share's reports are wakeups at both ends)
WORKER_EXIT_WAIT = 2.0          # s a worker has to exit once its socketpair closes, then SIGKILL
# What workers 0 and 1 do besides their stripes, at either end, as a
# fraction of the work of moving the whole file.  The coordinator (worker
# 0): the control channel, every worker's acknowledgements through the one
# rate control and (receiving) the state file.  Worker 1, the helper: the
# read of the whole file for its digest, so that no process's own work is
# more than its share from three workers on (a delta's signature is hashed
# by every sending worker for its own stripes: no one's extra).  Measured with
# bench_workers.py (256 MiB, 3 workers, AES keystream: each process's CPU
# beside its share of the packets, CPU = a x share + extra) on loopback's
# 65,465-byte blocks and on 1,430-byte ones (a 1500-byte MTU), with the
# machine's page-cache writes at their steady cost (README, Benchmarks);
# one deal serves both ends, so each is about the mean of the two ends'.
# The digest costs the same per byte whatever the blocks, the stripes more
# per byte the smaller their blocks (each datagram is sealed, sent,
# received and written on its own): the helper's extra, measured 0.34 and
# 0.40 at 65,465-byte blocks and 0.25 and 0.29 at 1,430, is its extra per
# byte of stripes over (1 + PACKET_COST_BYTES / block size).  The
# coordinator's measured 0.09-0.11 (delta) and 0.07 (plain) at both.
COORDINATOR_EXTRA = 0.10        # a delta transfer's (the signature's pieces are put together here)
COORDINATOR_EXTRA_PLAIN = 0.07  # a plain one's
HELPER_EXTRA = 0.34             # a delta's: the digest at both ends, beside stripes that are hashed too
HELPER_EXTRA_PLAIN = 0.40       # the digest at both ends
PACKET_COST_BYTES = 560         # a datagram's own cost besides its bytes, in bytes' worth of the rest
# A share of the stripes much under an even one sends seldom, and the one
# rate, which waits for every worker's news, suffered: with 1 stripe in 96
# (3 workers) the CPU per GB of both ends was 1.56 x one worker's, 1.13
# with none under 0.66 of an even share.  No worker gets less than this of one.
LEAST_STRIPE_SHARE = 0.35


def usable_cores():
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def automatic_workers(max_rate=None):
    """`--workers auto`: a process per usable core (at most
    MAX_AUTO_WORKERS), no more than a rate cap (bytes/s) needs, and one
    where processes cannot be forked."""
    if not sessions_can_fork():
        return 1
    count = min(usable_cores(), MAX_AUTO_WORKERS)
    if max_rate:
        count = min(count, int(-(-max_rate // PER_WORKER_RATE)))
    return max(1, count)


def one_worker_enough(controller):
    """What the session's rate control knows says one worker carries the
    path: a cap, or the fastest delivery since the startup found the
    bottleneck, under AUTO_STRIPE_RATE.  Before that the path is unknown
    (a file's stripes are dealt in its `start`, before its first data)."""
    if controller.max_rate and controller.max_rate < AUTO_STRIPE_RATE:
        return True
    return controller.ramped and controller.peak_delivery < AUTO_STRIPE_RATE


def stripe_workers(nblocks, stripe, available):
    """How many of `available` workers a file of `nblocks` shares."""
    return max(1, min(available, -(-nblocks // stripe) // STRIPES_PER_WORKER))


def worker_extras(nblocks, needed, delta, block_size):
    """[worker 0's, worker 1's] work besides their stripes (as
    COORDINATOR_EXTRA and HELPER_EXTRA) for a file of `nblocks` blocks of
    `block_size` bytes of which `needed` are to be sent: the helper's read
    covers the whole file however few are sent (a resume), and weighs more
    beside stripes of larger blocks, which cost less per byte."""
    if not needed:
        return [float(nblocks)] * 2
    helper = (HELPER_EXTRA if delta else HELPER_EXTRA_PLAIN) / (1 + PACKET_COST_BYTES / block_size)
    return [COORDINATOR_EXTRA if delta else COORDINATOR_EXTRA_PLAIN, helper * nblocks / needed]


def receive_before(channel, deadline):
    """One message from a worker's socketpair by `deadline` (time.monotonic()):
    None if none came by then, b'' if the other end is gone."""
    left = deadline - time.monotonic()
    if left <= 0:
        return None
    channel.settimeout(left)
    try:
        return channel.recv(MAX_WORKER_MESSAGE)
    except socket.timeout:
        return None
    except OSError:
        return b''
    finally:
        channel.settimeout(None)


def stripe_cycle(count, extra=0.0):
    """How stripes are dealt to `count` workers: a round of worker indexes,
    stripe j going to worker round[j mod len(round)].  `extra` is the work
    each worker does besides its stripes, as a fraction of the work of all
    of them: a list by worker index (missing ones do none), or a number,
    worker 0's.  A worker's stripes are fewer by its extra work, so that
    each process does about 1/count of its end's work (with extras x_i,
    worker i gets (1 + sum x) / count - x_i of the stripes), and at least
    LEAST_STRIPE_SHARE / count of them (a share that sends seldom holds
    the one rate back: its news is rare).  The round interleaves the
    workers as evenly as it can (a smooth weighted round robin), so that a
    file shorter than one round is shared nearly as well; it starts with
    worker 0's stripe, and each worker has one among the first few."""
    if count <= 1:
        return [0]
    extras = list(extra) if isinstance(extra, (list, tuple)) else [extra]
    extras = [max(0.0, float(x)) for x in (extras + [0.0] * count)[:count]]
    length = STRIPE_CYCLE * count
    # Those whose even share would be under LEAST_STRIPE_SHARE of a
    # worker's keep that much; the others even out what is left.
    least = max(1.0 / length, LEAST_STRIPE_SHARE / count)
    fixed = set()
    while True:
        free = [i for i in range(count) if i not in fixed]
        left = 1.0 - len(fixed) * least
        level = (left + sum(extras[i] for i in free)) / len(free)
        under = [i for i in free if level - extras[i] < least]
        if not under or len(under) == len(free):
            break
        fixed.update(under)
    share = [least if i in fixed else max(least, level - extras[i])
             for i in range(count)]
    scale = length / sum(share)
    exact = [s * scale for s in share]
    dealt = [max(1, int(e)) for e in exact]
    # The stripes rounding left over go to the largest remainders (ties:
    # the lowest index), or are taken back from the smallest.
    by_remainder = sorted(range(count), key=lambda i: (dealt[i] - exact[i], i))
    while sum(dealt) < length:
        dealt[by_remainder.pop(0)] += 1
    for i in sorted(range(count), key=lambda i: (exact[i] - dealt[i], -i)):
        if sum(dealt) <= length:
            break
        if dealt[i] > 1:
            dealt[i] -= 1
    credit = [0] * count
    cycle = []
    for _ in range(length):
        for i in range(count):
            credit[i] += dealt[i]
        best = max(range(count), key=lambda i: credit[i])
        credit[best] -= length
        cycle.append(best)
    # From the coordinator's first stripe, as round robin; and a file of
    # only STRIPES_PER_WORKER a worker still gives each a stripe: one that
    # has few comes early, in place of one of the most dealt's.
    first_of_0 = cycle.index(0)
    cycle = cycle[first_of_0:] + cycle[:first_of_0]
    early = STRIPES_PER_WORKER * count
    for i in range(count):
        if i not in cycle[:early]:
            most = max(range(count), key=lambda j: cycle[:early].count(j))
            late = cycle.index(i)
            spot = max(p for p in range(1, early) if cycle[p] == most)
            cycle[spot], cycle[late] = i, most
    return cycle


def cycle_shares(cycle, count):
    """Each of `count` workers' fraction of the stripes a round deals."""
    return [cycle.count(i) / len(cycle) for i in range(count)]


def split_stripes(ranges, stripe, count, cycle=None):
    """Block ranges cut at stripe boundaries: [ranges of worker i] for
    each of `count` workers, stripe j going to worker cycle[j mod
    len(cycle)] (round robin, j mod count, without a cycle)."""
    cycle = cycle or range(count)
    parts = [[] for _ in range(count)]
    for start, end in ranges:
        while start < end:
            stop = min(end, (start // stripe + 1) * stripe)
            part = parts[cycle[(start // stripe) % len(cycle)]]
            if part and part[-1][1] == start:
                part[-1] = (part[-1][0], stop)
            else:
                part.append((start, stop))
            start = stop
    return parts


def stripe_view(bitmap, nblocks, stripe, count, index, cycle=None):
    """A copy of a held-block bitmap as worker `index` sees it: every block
    of other workers' stripes held, so its ReceiveWindow asks for, and
    completes with, its own stripes only."""
    cycle = cycle or range(count)
    view = bytearray(bitmap)
    for first in range(0, nblocks, stripe):
        if cycle[(first // stripe) % len(cycle)] != index:
            set_bits(view, first, min(nblocks, first + stripe))
    return view


def foreign_blocks(nblocks, stripe, count, index, cycle=None):
    """Blocks of a file that are not in worker `index`'s stripes."""
    cycle = cycle or range(count)
    mine = 0
    for first in range(0, nblocks, stripe):
        if cycle[(first // stripe) % len(cycle)] == index:
            mine += min(stripe, nblocks - first)
    return nblocks - mine


def worker_ranges(code, file_id, ranges):
    """WORKER_RANGES messages naming `ranges`, MAX_WORKER_RANGES at most each."""
    ranges = list(ranges)
    return [WORKER_RANGES.pack(code, file_id, len(chunk)) + b''.join(NAK_RANGE.pack(*r) for r in chunk)
            for chunk in (ranges[i:i + MAX_WORKER_RANGES]
                          for i in range(0, len(ranges), MAX_WORKER_RANGES))]


def read_worker_ranges(message):
    """(code, file id, ranges) of a WORKER_RANGES message."""
    code, file_id, count = WORKER_RANGES.unpack_from(message)
    return code, file_id, [NAK_RANGE.unpack_from(message, WORKER_RANGES.size + i * NAK_RANGE.size)
                           for i in range(min(count, (len(message) - WORKER_RANGES.size)
                                              // NAK_RANGE.size))]


def fork_workers(count, main, inherited):
    """Fork workers 1..count-1, each running main(index, channel) and
    exiting (it never returns here); [(pid, channel)] of the coordinator's
    ends.  A worker keeps nothing of `inherited` (the control connection:
    its peer must see it close when the coordinator ends) nor any other
    worker's socketpair."""
    pairs = []
    try:
        for _ in range(count - 1):
            pairs.append(socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET))
    except OSError:
        for pair in pairs:
            for sock in pair:
                sock.close()
        raise
    for stream in (sys.stdout, sys.stderr):
        stream.flush()              # or a worker writes the coordinator's buffered lines again
    workers = []
    for index, (mine, theirs) in enumerate(pairs, 1):
        try:
            with warnings.catch_warnings():
                # Python 3.12 warns of fork() beside other threads.  The only
                # others here wait in a system call (a session's listener
                # thread in recv()), and a worker takes no lock they hold.
                warnings.simplefilter('ignore', DeprecationWarning)
                pid = os.fork()
        except OSError:
            for sock in itertools.chain.from_iterable(pairs[index - 1:]):
                sock.close()
            end_workers(workers)
            raise
        if pid == 0:
            _worker_process(index, theirs, pairs, inherited, main)
        theirs.close()
        workers.append((pid, mine))
    return workers


def _worker_process(index, channel, pairs, inherited, main):
    """In a forked worker: let go of what is the coordinator's, run, exit."""
    status = 1
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)    # Ctrl-C is the coordinator's to handle
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for mine, theirs in pairs:
            mine.close()
            if theirs is not channel:
                theirs.close()
        for thing in inherited:
            try:
                thing.close()
            except OSError:
                pass
        main(index, channel)
        status = 0
    except BaseException:
        pass
    finally:
        exit_forked(status)


def end_workers(workers):
    """Close the coordinator's ends of [(pid, channel)] (each worker exits
    when it reads the end) and reap them; kill one that lingers."""
    for _pid, channel in workers:
        channel.close()
    deadline = time.monotonic() + WORKER_EXIT_WAIT
    for pid, _channel in workers:
        while True:
            try:
                done, _status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                break
            if done:
                break
            if time.monotonic() > deadline:
                try:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass
                break
            time.sleep(0.005)       # a worker's exit is not signalled to us otherwise


def send_quietly(channel, message):
    """Send one message now, or drop it (a full socketpair): for rate
    updates, which the next one supersedes."""
    try:
        channel.send(message, socket.MSG_DONTWAIT)
    except OSError:
        pass


# --- The sending end: `serve` -------------------------------------------------

class SharedRate:
    """One RateController for the k workers of a striped file.  Each sends
    at its share of its rate (`shares`, as it has of the stripes: 1/k each
    by default; `share(i)` is worker i's view of it).  Their
    acknowledgements are gathered until each worker's has come (or
    MERGE_WAIT has passed) and reach the controller as one flow's would:
    what they delivered and lost of the packets sent up to the send time
    all of them have got news of, and the least queue any met.  Fed one by
    one, interleaved, they would not: each covers a k-th of the bytes of
    its span, and their send times leapfrog, so the controller's slots
    would measure nonsense (a model test shows it overshooting a path one
    flow fills cleanly).

    A worker's news of packets sent past that send time is held back, in
    proportion, for the next: else a share whose news comes in bunches (a
    small one sends a batch once in several acknowledgement intervals)
    makes each merged acknowledgement say the path delivered from 0.9 to
    1.5 times what it did, its slots pass, and the level creeps past the
    path's rate until the queue overflows (the model tests, and the real
    link at 120 ms, where one flow drops nothing).  A worker whose news
    stopped LIVE_WAIT ago (its share is done) holds back nobody.

    Where each flow is acknowledged every k intervals (stretched_feedback:
    once the controller is past its startup, DATA_FLAG_STEADY), what is
    merged spans k intervals of send time: it reaches the
    controller in pieces of an interval each, evenly, as one flow's news
    would (the controller's slots are a few of its intervals long: taken
    whole, its slots grew to 80 ms across 300 ms, and the model's queue
    overflowed on each probe).

    The least queue is what one flow's receiver would report: the least
    of all the delays sampled.  But a receiver samples one packet in
    DELAY_SAMPLE_EVERY, and an older one that sampled none in an interval
    reports no queue at all: that zero from an acknowledgement of a few
    packets is no news, and taken for the least it hid the queue every
    other acknowledgement.

    A worker that has nothing to send (its stripes are all sent, and not
    yet acknowledged, or it waits for a delta's requests) lends its share
    of the rate to those that have, until it has data again or IDLE_HOLD
    after it last said so: a whole stripe more for one worker than its
    share (a file is seldom a whole number of rounds of the deal) was
    sent at 0.13 of the rate for the last half second of a 5 s transfer.
    An idle worker keeps its own share for the few blocks it may be asked
    to send again before the coordinator hears it has data."""

    MERGE_WAIT = 2 * FEEDBACK_INTERVAL[1]   # s an acknowledgement waits for the other workers'
    LIVE_WAIT = 4 * MERGE_WAIT              # s after its last news a worker holds the others back
    IDLE_HOLD = 0.1                         # s a worker is taken to be idle after it said so (an
                                            # idle sender says so at least every 0.05 s)

    def __init__(self, controller, count, changed=lambda: None, shares=None):
        self.controller, self.count = controller, count
        self.shares = shares or [1.0 / count] * count   # of the rate, each worker's (its stripes')
        self._changed = changed                 # called when the rate may have moved
        self._pending = {}                      # worker -> [queue or None, rtt, app limited,
                                                #            send time, arrival] since the last merge
        self._since = None
        self._queue = 0.0                       # the queue last merged
        self._news = {}                         # worker -> [bytes, packets, lost, from, to, when,
                                                # arrival]: what it said of packets sent from `from`
                                                # to `to` not passed on yet, when it last said
                                                # anything, and when the packet sent at `to` arrived
        self._until = None                      # the send time the controller has news up to
        self._arrived = None                    # ... and when the packet sent then arrived
        self._idle = {}                         # worker -> when it last said it had nothing to send
        self._now = float('-inf')               # the latest time any worker spoke

    def share_of(self, index):
        """Worker `index`'s fraction of the rate now: its share, and the
        shares of the idle workers in proportion if it has data to send."""
        shares, idle = self.shares, self._idle
        if not idle or index in idle:
            return shares[index]
        busy = sum(share for i, share in enumerate(shares) if i not in idle)
        return shares[index] / busy if busy > 0 else shares[index]

    def _expire_idle(self, now):
        self._now = max(self._now, now)
        stale = [i for i, when in self._idle.items() if self._now - when > self.IDLE_HOLD]
        for i in stale:
            del self._idle[i]
        return bool(stale)

    def share(self, index):
        return RateShare(self, index)

    def add(self, index, now, queue_delay, delivered_bytes, delivered, lost, rtt, app_limited=False,
            sent_at=None, ack_delay=0.0):
        """Worker `index`'s acknowledgement, as RateController.on_feedback takes it."""
        if sent_at is None:
            sent_at = now - rtt
        arrived = now - ack_delay
        if self._expire_idle(now):
            self._changed()
        if not queue_delay and delivered < DELAY_SAMPLE_EVERY:
            queue_delay = None                  # perhaps nothing sampled: no news of the queue
        news = self._news.get(index)
        if news is None:
            # Its first news: of packets sent since the last the controller had.
            news = self._news[index] = [0.0, 0.0, 0.0, None, sent_at, now, arrived]
        news[0] += delivered_bytes
        news[1] += delivered
        news[2] += lost
        if sent_at >= news[4]:
            news[4], news[6] = sent_at, arrived
        news[5] = now
        pending = self._pending.get(index)
        if pending is None:
            self._pending[index] = [queue_delay, rtt, app_limited, sent_at, arrived]
        else:
            if pending[0] is None or (queue_delay is not None and queue_delay < pending[0]):
                pending[0] = queue_delay
            pending[1] = rtt
            pending[2] = pending[2] or app_limited
            pending[3] = max(pending[3], sent_at)
            pending[4] = max(pending[4], arrived)
        if self._since is None:
            self._since = now
        if len(self._pending) >= self.count or now - self._since >= self.MERGE_WAIT:
            self._merge(now)

    def _merge(self, now):
        """Pass on what all the live workers have news of; if that is
        nothing yet (one is late), wait for it."""
        until, arrived = min((news[4], news[6]) for news in self._news.values()
                             if now - news[5] <= self.LIVE_WAIT)
        if self._until is not None and until <= self._until:
            self._since = now
            return
        pending = list(self._pending.values())
        self._pending.clear()
        self._since = None
        queues = [news[0] for news in pending if news[0] is not None]
        if queues:
            self._queue = min(queues)
        told = [0.0, 0.0, 0.0]
        for news in self._news.values():
            start, end = news[3], news[4]
            if start is None:
                start = until if self._until is None else min(self._until, end)
            part = 1.0 if end <= until or end <= start else max(0.0, (until - start) / (end - start))
            for i in range(3):
                taken = news[i] * part
                told[i] += taken
                news[i] -= taken
            news[3] = max(start, min(until, end))
        # What is passed on ends at the send time of the worker that held
        # the others back: when its packet sent then arrived, not when the
        # news that came now did (one of a flow's acknowledgements lost, the
        # others' overtook it, and the spans of arrival then said the path
        # delivered from 0.3 to 2 times what it did).
        since, before = self._until, self._arrived
        self._until, self._arrived = until, arrived
        rtt, app_limited = max(news[1] for news in pending), any(news[2] for news in pending)
        pieces = 1
        if since is not None and self.controller.steady and stretched_feedback(rtt, self.count):
            pieces = max(1, min(2 * self.count, int(round((until - since) / FEEDBACK_INTERVAL[1]))))
            before = min(before, arrived)
        for piece in range(1, pieces + 1):
            f = piece / pieces
            self.controller.on_feedback(
                now, self._queue, told[0] / pieces, told[1] / pieces, told[2] / pieces, rtt,
                app_limited, until if piece == pieces else since + f * (until - since),
                max(0.0, now - (arrived if piece == pieces else before + f * (arrived - before))))
        self._changed()

    def idle(self, index, now):
        """Worker `index` has nothing to send now.  The transfer is short of
        data only when every worker is: the others send its share meanwhile,
        and the path sees the whole rate.  (Told of each worker's, the
        controller restarted its startup slot at every report of one worker
        waiting for its first requests, which at 120 ms held each slot back
        by up to 0.2 s, and gave up its probes.)"""
        lent = index not in self._idle
        self._idle[index] = now
        self._expire_idle(now)
        if len(self._idle) >= self.count:
            self.controller.on_idle(now)
        if lent and index in self._idle:
            self._changed()

    def busy(self, index, now):
        """Worker `index` has data to send again: its share is its own."""
        if self._idle.pop(index, None) is not None:
            self._expire_idle(now)
            self._changed()

    def silence(self):
        self.controller.on_silence()
        self._changed()

    def tick(self, now):
        rate = self.controller.rate
        self.controller.on_tick(now)
        if self.controller.rate != rate:
            self._changed()


class RateShare:
    """Worker `index`'s view of a SharedRate, as OutgoingFile (and a
    model test's sender) uses a RateController: its share of the rate;
    what it learns goes to the shared one."""

    def __init__(self, shared, index):
        self._shared, self._index = shared, index

    @property
    def rate(self):
        return self._shared.controller.rate * self._shared.share_of(self._index)

    @property
    def peak_delivery(self):
        return self._shared.controller.peak_delivery

    @property
    def steady(self):
        return self._shared.controller.steady

    def on_feedback(self, *args, **kwargs):
        self._shared.add(self._index, *args, **kwargs)

    def on_start(self, now, rtt):
        self._shared.controller.on_start(now, rtt)  # once: it only acts before any news

    def on_tick(self, now):
        self._shared.tick(now)

    def on_idle(self, now):
        self._shared.idle(self._index, now)

    def on_busy(self, now):
        self._shared.busy(self._index, now)

    def on_silence(self):
        self._shared.silence()

    def set_cap(self, max_rate):
        self._shared.controller.set_cap(max_rate)


class WorkerRate:
    """The coordinator's RateController as a sending worker sees it: the
    rate it last sent (this worker's share); every acknowledgement, running
    dry and silence are passed to it.  Dropped when the socketpair is full,
    as feedback is lost on a path."""

    IDLE_REPORT = 0.01                  # s between reports of having nothing to send

    def __init__(self, channel):
        self.rate = float(RateController.INITIAL_RATE)  # until the coordinator says
        self.peak_delivery = 0.0
        self.steady = False
        self._channel = channel
        self._idle_told = float('-inf')

    def update(self, message):
        _code, rate, peak, steady = WORKER_RATE.unpack(message)
        self.rate, self.peak_delivery, self.steady = max(rate, 1.0), peak, steady

    def on_feedback(self, now, queue_delay, delivered_bytes, delivered, lost, rtt, app_limited=False,
                    sent_at=None, ack_delay=0.0):
        send_quietly(self._channel, WORKER_ACK.pack(
            b'A', now, queue_delay, delivered_bytes, delivered, lost, rtt,
            -1.0 if sent_at is None else sent_at, ack_delay))

    def on_start(self, now, rtt):
        pass                            # the coordinator's own share starts the shared controller

    def on_tick(self, now):
        pass                            # ... and moves its rate on

    def on_idle(self, now):
        if now - self._idle_told >= self.IDLE_REPORT:
            self._idle_told = now
            send_quietly(self._channel, WORKER_EVENT.pack(b'I', now))

    def on_busy(self, now):
        # Lost with a full socketpair, the share comes back IDLE_HOLD after
        # the last 'I'.
        self._idle_told = float('-inf')
        send_quietly(self._channel, WORKER_EVENT.pack(b'B', now))

    def on_silence(self):
        send_quietly(self._channel, WORKER_EVENT.pack(b'S', time.monotonic()))

    def set_cap(self, max_rate):
        pass                            # the coordinator's controller holds the caps


class WorkerControl:
    """A sending worker's stand-in for the control channel: the
    coordinator's messages as the control messages OutgoingFile takes
    (`need` for WORKER_RANGES, `done` for WORKER_END); rate updates go to
    the WorkerRate."""

    def __init__(self, channel, rate):
        self.sock = channel
        self._rate = rate
        self._inbox = collections.deque()

    def feed(self, data):
        self._inbox.append(bytes(data))

    def messages(self):
        while self._inbox:
            message = self._inbox.popleft()
            code = message[:1]
            if code == b'R' and len(message) == WORKER_RATE.size:
                self._rate.update(message)
            elif code in (b'N', b'W') and len(message) >= WORKER_RANGES.size:
                code, file_id, ranges = read_worker_ranges(message)
                yield {'op': 'need', 'file': file_id, 'ranges': ranges if code == b'N' else [],
                       'held': ranges if code == b'W' else []}
            elif code == b'E' and len(message) == WORKER_END.size:
                yield {'op': 'done', 'file': WORKER_END.unpack(message)[1]}

    def send(self, message):
        pass                            # the coordinator speaks to the client


class WorkerOutgoingFile(OutgoingFile):
    """A sending worker's share of one file: OutgoingFile over the blocks
    the coordinator names, announced by the coordinator, ended by it."""

    def open_share(self, path, size, mtime_ns, block_size, compress, flows):
        """The file the coordinator opened, which must still be the same
        (shared by `flows` workers)."""
        self._path = path
        self.workers = flows
        try:
            self._fd = open_regular(path)
        except OSError as e:
            raise RemoteError('%s: %s' % (path, e.strerror))
        st = os.fstat(self._fd)
        if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
            raise RemoteError('%s: changed on the server during the transfer' % path)
        self.size, self.mtime_ns, self.mode = size, mtime_ns, stat.S_IMODE(st.st_mode)
        self.block_size = block_size
        self._sealer.set_stride(block_size)
        self.nblocks = (size + block_size - 1) // block_size
        self._need = []
        self.compression = CompressionPolicy(compress, self._rate)
        self.striped = True

    def read_control(self):
        """Step: the coordinator's messages.  Unlike a receiver's, they do
        not prove the receiver alive: rate updates come from any worker's
        feedback."""
        data = self._control.sock.recv(MAX_WORKER_MESSAGE)
        if not data:
            self.outcome = False
            return
        self._control.feed(data)
        self.apply_control()


class SendingWorker:
    """One sending worker as its coordinator sees it."""

    def __init__(self, index, pid, channel, opener):
        self.index, self.pid, self.channel = index, pid, channel
        self.opener = opener                    # checks its client worker's HELLO
        self.flow = False                       # its UDP flow is open
        self.given_up = False                   # its flow never opened
        self.next_seq = 0                       # its packet numbers: the next not used
        self.first_seq = 0
        self.file_id = None
        self.counts = None                      # what its share of the file cost, once over


class RelayedJob:
    """A striped file's digest as worker 1 reads it (relay_job()) and
    passes it on over its socketpair: the coordinator's stand-in for the
    DigestJob it runs for a file it sends alone (`pieces`, none, `error`,
    `done`, sha256(); release() as the jobs' cache).  What worker 1 sends
    reaches it through the team."""

    def __init__(self, team, outgoing):
        self.team, self.outgoing = team, outgoing
        self.file_id = None
        self.pieces = []
        self.error = None
        self.done = threading.Event()
        self._digest = None

    def start(self, workers):
        """Ask worker 1 of the file's `workers` for the digest."""
        outgoing = self.outgoing
        self.team.ask(workers[0], WORKER_JOB.pack(b'G', self.file_id, outgoing.size, outgoing.mtime_ns)
                      + os.fsencode(outgoing._path))

    def take(self, message):
        code = message[:1]
        if code == b'g' and len(message) == WORKER_DIGEST.size:
            self._digest = WORKER_DIGEST.unpack(message)[2].hex()
            self.done.set()
        elif code == b'x':
            self.error = OSError(errno.EIO, message[WORKER_END.size:].decode('utf-8', 'replace'))
            self.done.set()

    def settled(self):
        """The digest is known, or never will be."""
        return self.done.is_set()

    def sha256(self):
        self.team.wait_relayed(self)
        if self._digest is None:
            raise RemoteError('cannot read %s: %s' % (self.outgoing._path, self.error.strerror))
        return self._digest

    def stop(self):
        pass

    def release(self, job):
        self.team.drop_relayed(self)


class SpreadSignature(RelayedJob):
    """A striped delta's signature: each sending worker hashes the units
    of its own stripes (stripe_units(); this process its own on a thread),
    worker 1 reads the whole file's digest, and the pieces are put together
    here in file order, byte for byte as file_signature() cuts them.  So
    no process's hashing outgrows its share of the stripes.  A signature
    kept in the cache database (`store`, a SignatureStore) is used as it
    is, and a new one saved there."""

    def __init__(self, team, outgoing, store=None):
        RelayedJob.__init__(self, team, outgoing)
        self.hashed_by = 0                      # processes hashing its units
        self._store, self._key = store, None
        self._units = -(-outgoing.size // DELTA_UNIT)
        self._per_piece = SIGNATURE_SEGMENT // DELTA_UNIT
        self._filling = {}                      # piece -> [its digests, units filled]
        self._lock = threading.Lock()           # units come from this process's thread too
        self._stop = threading.Event()
        if store is not None:
            try:
                self._key = 'fixed:%d:%d:%d:%d:%d' % file_identity(outgoing._path)
            except OSError:
                return
            stored = store.load(self._key)
            if stored is not None:
                self._digest, self.pieces = stored
                self.done.set()

    def start(self, workers):
        """Ask the file's `workers` for their units and worker 1 for the
        digest; hash this process's units."""
        if self.done.is_set():
            return                              # kept in the cache database
        outgoing, file_id = self.outgoing, self.file_id
        RelayedJob.start(self, workers)
        cycle = outgoing.stripe_cycle or list(range(outgoing.workers))
        spread = WORKER_JOB.pack(b'V', file_id, outgoing.size, outgoing.mtime_ns) + \
            WORKER_SPREAD.pack(outgoing.block_size, outgoing.stripe_blocks, len(cycle)) + \
            bytes(cycle) + os.fsencode(outgoing._path)
        for worker in workers:
            self.team.ask(worker, spread)
        self.hashed_by = len(workers) + 1
        args = (outgoing._path, outgoing.size, outgoing.mtime_ns, outgoing.block_size,
                outgoing.stripe_blocks, cycle, 0, self.add_units, self._stop)

        def run():
            try:
                hash_stripe_units(*args)
            except (OSError, WanxferError) as e:
                self._fail(str(e) if isinstance(e, WanxferError) else describe_error(e))
            except Exception as e:      # a bug: the fetch fails, not the wait
                self._fail('the signature thread failed: %s' % e)
        try:
            start_thread(run, 'spans')
        except NoThread as e:
            self._fail(str(e))

    def _fail(self, reason):
        if self.error is None:
            self.error = OSError(errno.EIO, reason)
        self.done.set()

    def take(self, message):
        code = message[:1]
        if code == b'h' and len(message) >= WORKER_UNITS.size:
            self.add_units(WORKER_UNITS.unpack_from(message)[2], message[WORKER_UNITS.size:])
        elif code == b'g' and len(message) == WORKER_DIGEST.size:
            self._digest = WORKER_DIGEST.unpack(message)[2].hex()
            self._finish()
        elif code == b'x':
            self._fail(message[WORKER_END.size:].decode('utf-8', 'replace'))

    def add_units(self, first, digests):
        """The span digests of units `first`.. (SPAN_DIGEST_SIZE bytes each);
        the pieces they complete, in order, join `pieces`."""
        size, per_piece, units = SPAN_DIGEST_SIZE, self._per_piece, self._units
        count = len(digests) // size
        if first + count > units:
            self._fail('span digests beyond the file\'s end')
            return
        with self._lock:
            done = 0
            while done < count:
                piece, at = divmod(first + done, per_piece)
                part = min(count - done, per_piece - at)
                slot = self._filling.get(piece)
                if slot is None:
                    slot = self._filling[piece] = [
                        bytearray(min(per_piece, units - piece * per_piece) * size), 0]
                slot[0][at * size:(at + part) * size] = digests[done * size:(done + part) * size]
                slot[1] += part
                done += part
            while True:
                piece = len(self.pieces)
                slot = self._filling.get(piece)
                if slot is None or slot[1] * size < len(slot[0]):
                    break
                del self._filling[piece]
                offset, packed = piece * SIGNATURE_SEGMENT, slot[0]
                spans = [(min(DELTA_UNIT, self.outgoing.size - offset - i // size * DELTA_UNIT),
                          bytes(packed[i:i + size])) for i in range(0, len(packed), size)]
                self.pieces.append((offset, encode_spans(spans)))
        self._finish()

    def _finish(self):
        """Done once every piece and the digest are in: kept for the next fetch."""
        with self._lock:
            if self.done.is_set() or self._digest is None or \
                    len(self.pieces) < -(-self._units // self._per_piece):
                return
            self.done.set()
        if self._store is not None and self._key is not None:
            store, key, digest, pieces = self._store, self._key, self._digest, list(self.pieces)
            try:
                start_thread(lambda: store.save(key, digest, pieces), 'save')
            except NoThread:
                pass                            # the next fetch reads the file again

    def settled(self):
        return self._digest is not None or self.error is not None

    def stop(self):
        self._stop.set()


def stripe_units(size, block_size, stripe, cycle, index):
    """Yield the runs (first, end) of a delta's units (DELTA_UNIT bytes of
    the file each) that worker `index` hashes: those that begin in its
    stripes (stripe j being worker cycle[j mod len(cycle)]'s)."""
    units, span = -(-size // DELTA_UNIT), stripe * block_size
    run = None
    for j in itertools.count():
        first = -(-(j * span) // DELTA_UNIT)
        if first >= units:
            break
        if cycle[j % len(cycle)] != index:
            continue
        end = min(units, -(-((j + 1) * span) // DELTA_UNIT))
        if run is not None and run[1] == first:
            run[1] = end
            continue
        if run is not None and run[0] < run[1]:
            yield tuple(run)
        run = [first, end]
    if run is not None and run[0] < run[1]:
        yield tuple(run)


def hash_stripe_units(path, size, mtime_ns, block_size, stripe, cycle, index, emit, stop):
    """Read the units of worker `index`'s stripes of the file at `path`
    (stripe_units()) and hand their span digests to emit(first unit,
    digests), UNITS_PER_MESSAGE at most at a time, in file order, until
    `stop` is set.  RemoteError if the file changed."""
    fd = open_regular(path)
    try:
        st = os.fstat(fd)
        if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
            raise RemoteError('%s: changed on the server during the transfer' % path)
        buffer = bytearray(UNITS_PER_MESSAGE * DELTA_UNIT)
        view = memoryview(buffer)
        for first, end in stripe_units(size, block_size, stripe, cycle, index):
            while first < end:
                if stop.is_set():
                    return
                last = min(end, first + UNITS_PER_MESSAGE)
                length = min(size, last * DELTA_UNIT) - first * DELTA_UNIT
                if os.preadv(fd, [view[:length]], first * DELTA_UNIT) != length:
                    raise RemoteError('%s: changed on the server during the transfer' % path)
                emit(first, b''.join(digest for _length, digest in unit_spans(view, 0, length)))
                first = last
    finally:
        os.close(fd)


def relay_job(channel, message, digests):
    """In worker 1 (serve), on a thread of its own: the digest of the file
    a WORKER_JOB names, read as the coordinator would read it, passed on
    when done.  Returns the job, for b'K'."""
    _code, file_id, size, mtime_ns = WORKER_JOB.unpack_from(message)
    path = os.fsdecode(message[WORKER_JOB.size:])

    def fail(reason):
        channel.sendall(WORKER_END.pack(b'x', file_id) + reason.encode('utf-8', 'replace'))

    try:
        st = os.stat(path)
        if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
            raise RemoteError('%s: changed on the server during the transfer' % path)
        job = digests.start(path)
    except (OSError, WanxferError) as e:
        fail(str(e) if isinstance(e, WanxferError) else describe_error(e))
        return None

    def run():
        try:
            job.done.wait()
            digest = job.sha256()
            channel.sendall(WORKER_DIGEST.pack(b'g', file_id, bytes.fromhex(digest)))
        except RemoteError as e:
            fail(str(e))
        except OSError:
            pass                                # the coordinator is gone: so is this process, soon
        finally:
            digests.release(job)
    try:
        start_thread(run, 'relay')
    except NoThread as e:
        digests.release(job)
        fail(str(e))
        return None
    return job


def relay_units(channel, message, index):
    """In sending worker `index` (serve), on a thread of its own: the span
    digests of its stripes' units of the file a b'V' names, passed on as
    they come (hash_stripe_units()).  Returns what b'K' stops."""
    _code, file_id, size, mtime_ns = WORKER_JOB.unpack_from(message)
    block_size, stripe, length = WORKER_SPREAD.unpack_from(message, WORKER_JOB.size)
    at = WORKER_JOB.size + WORKER_SPREAD.size
    cycle, path = list(message[at:at + length]), os.fsdecode(message[at + length:])
    job = types.SimpleNamespace(stop=threading.Event())

    def fail(reason):
        try:
            channel.sendall(WORKER_END.pack(b'x', file_id) + reason.encode('utf-8', 'replace'))
        except OSError:
            pass

    def emit(first, digests):
        channel.sendall(WORKER_UNITS.pack(b'h', file_id, first) + digests)

    def run():
        try:
            hash_stripe_units(path, size, mtime_ns, block_size, stripe, cycle or [0], index, emit,
                              job.stop)
        except RemoteError as e:
            fail(str(e))
        except OSError as e:
            fail('%s: %s' % (path, describe_error(e)))
    try:
        start_thread(run, 'spans')
    except NoThread as e:
        fail(str(e))
    return job


class SendingTeam:
    """A session's sending workers, as the session process (the
    coordinator) sees them: `count` granted when the client asks, forked
    at the first file striped (none for a session of small files), each
    given its UDP flow where its client worker's HELLO came from (before
    or after the fork), and a share of each large file.  Their
    acknowledgements feed the session's RateController, whose rate they
    get back as their share.  `broken` says why the team cannot go on (a
    worker died).  `cycles`: the client takes a weighted deal of stripes;
    `lazy`: it forks its own workers when told (`fork`); `auto`: its count
    was chosen for it, so a file goes on one worker where the path's rate
    measured so far does not need more (one_worker_enough)."""

    def __init__(self, session, count, cycles=False, lazy=False, auto=False):
        self.session = session
        self.count = count                      # processes granted, this one included
        self.cycles, self.lazy, self.auto = cycles, lazy, auto
        self.broken = None
        self._controller = session.rate
        self._shared = None                     # the SharedRate of the file being sent
        self._told = (0.0, (), float('-inf'), False)    # the rate and shares last sent, when,
                                                        # and whether past the startup
        self._outgoing = None                   # the file being sent
        self._active = []                       # the workers sharing it
        local = session.sock.getsockname()[0]
        keys, session_id, port = session.keys, session.session_id, session.server.port
        family, log = session.sock.family, session.server.log
        name = session.peer_name()

        self._store = session.server.signatures.store

        def main(index, channel):
            run_sending_worker(index, channel, keys, session_id, (local, port), family,
                               lambda line: log('%s: worker %d: %s' % (name, index, line)))
        inherited = [session.sock, session.udp.sock]
        if isinstance(session.registry, SessionListener):
            inherited.append(session.registry.channel)
        self._fork_args = (count, main, inherited)
        self._openers = [keys.worker_sealers('server', index)[1] for index in range(1, count)]
        self._lock = threading.Lock()           # hello() runs on the listener thread
        self._addresses = {}                    # worker index -> where its client worker's HELLO
                                                # came from
        self.workers = []                       # SendingWorker, once forked
        self._relayed = None                    # the RelayedJob of the file being sent

    def pids(self):
        return [worker.pid for worker in self.workers]

    def hello(self, index, datagram, address):
        """A HELLO for worker `index` (on the listener thread): its flow opens
        where it came from, if its tag checks out (once forked)."""
        if not 1 <= index < self.count:
            return
        view = memoryview(datagram)
        if index in self._addresses or not hmac.compare_digest(
                self._openers[index - 1].tag(view[:PACKET_HEADER.size], b''),
                bytes(view[PACKET_HEADER.size:])):
            return
        with self._lock:
            if index in self._addresses:
                return
            self._addresses[index] = address
            if self.workers:
                self._open_flow(self.workers[index - 1], address)

    def _open_flow(self, worker, address):
        address_text = json.dumps(list(address)).encode()
        try:
            worker.channel.send(WORKER_FLOW.pack(b'U', len(address_text)) + address_text)
        except OSError:
            pass

    def _fork(self):
        """Fork the workers, at the first file striped; those whose client
        worker's HELLO came already are told where it came from.  False
        if they cannot be (the session then sends alone)."""
        session = self.session
        with self._lock:
            try:
                forked = fork_workers(*self._fork_args)
            except OSError as e:
                session.server.log('%s: cannot start workers: %s; one process sends'
                                   % (session.peer_name(), describe_error(e)))
                self.count = 1
                return False
            self.workers = [SendingWorker(index, pid, channel, self._openers[index - 1])
                            for index, (pid, channel) in enumerate(forked, 1)]
            for index, address in self._addresses.items():
                self._open_flow(self.workers[index - 1], address)
        session.server.log('%s: %d workers (pids %s)' % (
            session.peer_name(), self.count, ' '.join(str(pid) for pid in self.pids())))
        if self.lazy:
            session.control.send({'op': 'fork'})
        return True

    def workers_for(self, nblocks, block_size):
        """How many workers (this process included) send a file of
        `nblocks`: those it has stripes enough for, whose flows are open
        (waited for, the first time, up to UDP_SETUP_TIMEOUT).  The first
        file that has stripes enough forks them.  A file is decided whole,
        at its `start`: the workers do not join a file already going."""
        if self.broken:
            raise ProtocolError(self.broken)
        count = stripe_workers(nblocks, max(1, STRIPE_BYTES // block_size), self.count)
        if count > 1 and self.auto and one_worker_enough(self._controller):
            return 1
        if count > 1 and not self.workers and not self._fork():
            return 1
        if count > 1:
            count = 1 + self._flows(count - 1)
        return count

    def _flows(self, wanted):
        deadline = time.monotonic() + UDP_SETUP_TIMEOUT
        ready = 0
        for worker in self.workers[:wanted]:
            while not worker.flow and not worker.given_up:
                message = receive_before(worker.channel, deadline)
                if message is None:
                    worker.given_up = True
                    self.session.server.log('%s: no UDP flow for worker %d; it sends nothing'
                                            % (self.session.peer_name(), worker.index))
                    break
                if not message:
                    self._broke(worker)
                    raise ProtocolError(self.broken)
                worker.flow = worker.flow or message == b'u'
            if not worker.flow:
                break
            ready += 1
        return ready

    def next_seq(self, index):
        return self.workers[index - 1].next_seq

    def send_file(self, outgoing, parts):
        """Workers 1..k-1 start their shares (`parts`: each worker's need)
        of the file `outgoing` announced."""
        self._outgoing = outgoing
        self._shared = outgoing.shared_rate
        self._active = self.workers[:outgoing.workers - 1]
        file_id, path = outgoing.file_id, os.fsencode(outgoing._path)
        relayed = self._relayed
        if relayed is not None and relayed.outgoing is outgoing and self._active:
            relayed.file_id = file_id           # before its share: it reads while it sends
            relayed.start(self._active)
        for worker, part in zip(self._active, parts[1:]):
            worker.first_seq, worker.counts, worker.file_id = worker.next_seq, None, file_id
            self._send(worker, WORKER_SEND.pack(
                b'F', file_id, worker.next_seq, outgoing.block_size,
                1 if outgoing.compression.allowed else 0, outgoing.rtt, outgoing.size,
                outgoing.mtime_ns, outgoing.workers) + path)
            for message in worker_ranges(b'N', file_id, part):
                self._send(worker, message)
        self._told = (0.0, (), float('-inf'), False)
        self.rate_changed()

    def _send(self, worker, message):
        try:
            worker.channel.sendall(message)
        except OSError:
            self._broke(worker)

    ask = _send                                 # a helper job's request

    def forward_need(self, outgoing, held, ranges):
        """A `need`: each worker's part of it goes to that worker; returns
        the coordinator's (held, ranges)."""
        stripe, count, file_id = outgoing.stripe_blocks, outgoing.workers, outgoing.file_id
        held_parts = split_stripes(held, stripe, count, outgoing.stripe_cycle)
        range_parts = split_stripes(ranges, stripe, count, outgoing.stripe_cycle)
        for worker, withdrawn, wanted in zip(self._active, held_parts[1:], range_parts[1:]):
            for message in worker_ranges(b'W', file_id, withdrawn) + \
                    worker_ranges(b'N', file_id, wanted):
                self._send(worker, message)
        return held_parts[0], range_parts[0]

    def watch(self, selector, outgoing):
        for worker in self._active:
            selector.register(worker.channel, selectors.EVENT_READ,
                              functools.partial(self._read, worker))

    def _read(self, worker):
        try:
            message = worker.channel.recv(MAX_WORKER_MESSAGE, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            message = b''
        self._take(worker, message)

    def _take(self, worker, message):
        """One message from `worker`."""
        code, outgoing = message[:1], self._outgoing
        if not message:
            self._broke(worker)
            if outgoing is not None and outgoing.outcome is None:
                outgoing.outcome, outgoing.failure = False, self.broken
        elif code == b'A' and len(message) == WORKER_ACK.size:
            _code, now, queue_delay, nbytes, delivered, lost, rtt, sent_at, ack_delay = \
                WORKER_ACK.unpack(message)
            if outgoing is not None:
                outgoing.shared_rate.add(worker.index, now, queue_delay, nbytes, delivered, lost, rtt,
                                         False, None if sent_at < 0 else sent_at, ack_delay)
        elif code == b'I' and len(message) == WORKER_EVENT.size:
            if outgoing is not None:
                outgoing.shared_rate.idle(worker.index, WORKER_EVENT.unpack(message)[1])
            else:
                self._controller.on_idle(WORKER_EVENT.unpack(message)[1])
        elif code == b'B' and len(message) == WORKER_EVENT.size:
            if outgoing is not None:
                outgoing.shared_rate.busy(worker.index, WORKER_EVENT.unpack(message)[1])
        elif code == b'S' and len(message) == WORKER_EVENT.size:
            self._controller.on_silence()
            self.rate_changed()
        elif code in (b'h', b'g', b'x') and len(message) >= WORKER_END.size:
            # The digest is worker 1's; a delta's span digests (and their
            # failure) any worker's.
            relayed = self._relayed
            if relayed is not None and (worker.index == 1 or code != b'g') and \
                    relayed.file_id == WORKER_END.unpack_from(message)[1]:
                relayed.take(message)
        elif code == b'D' and len(message) == WORKER_SENT.size:
            _code, file_id, next_seq, lost, resent, wire, compressed, whole = WORKER_SENT.unpack(message)
            if file_id == worker.file_id and worker.counts is None:
                worker.next_seq = next_seq
                worker.counts = (next_seq - worker.first_seq, lost, resent, wire, compressed)
                if not whole and outgoing is not None and outgoing.outcome is None:
                    outgoing.outcome = False
                    outgoing.failure = 'worker %d could not send its share' % worker.index

    def rate_changed(self):
        """Pass the controller's rate on to the workers (their share of it)
        when it or the shares changed enough, or long enough ago."""
        if self._shared is None:
            return
        rate, steady = self._controller.rate, self._controller.steady
        shares = tuple(self._shared.share_of(worker.index) for worker in self._active)
        told, told_shares, when, told_steady = self._told
        now = time.monotonic()
        if shares == told_shares and steady == told_steady and \
                (rate == told or (abs(rate - told) <= WORKER_RATE_STEP * told
                                  and now - when < WORKER_RATE_INTERVAL)):
            return
        self._told = (rate, shares, now, steady)
        for worker, share in zip(self._active, shares):
            send_quietly(worker.channel, WORKER_RATE.pack(
                b'R', rate * share, self._controller.peak_delivery, steady))

    def end_file(self, outgoing):
        """The file is over: each worker ends its share and says what it
        cost; [packets sent, lost, retransmitted, wire bytes, compressed]
        of them all.  ProtocolError if a worker does not answer."""
        if self._outgoing is not outgoing:
            return [0] * 5
        self._outgoing = None
        active, self._active = self._active, []
        for worker in active:
            if worker.counts is None:
                self._send(worker, WORKER_END.pack(b'E', outgoing.file_id))
        deadline = time.monotonic() + DATA_TIMEOUT
        for worker in active:
            while worker.counts is None and not self.broken:
                message = receive_before(worker.channel, deadline)
                if message is None:
                    self.broken = 'worker %d did not end its share of a file' % worker.index
                    break
                self._take(worker, message)
        if self.broken:
            raise ProtocolError(self.broken)
        return [sum(worker.counts[i] for worker in active) for i in range(5)]

    def relayed_job(self, outgoing):
        """The helper job of a striped file, asked for with its share: its
        digest read by worker 1 (RelayedJob), or a delta's signature hashed
        by every worker of the file (SpreadSignature)."""
        if outgoing.delta:
            self._relayed = SpreadSignature(self, outgoing, self._store)
        else:
            self._relayed = RelayedJob(self, outgoing)
        return self._relayed

    def wait_relayed(self, relayed):
        """Take worker 1's messages until the digest of `relayed` is known
        (or the team breaks): the data phase may end before the read does."""
        worker = self.workers[0]
        while not relayed.settled() and not self.broken:
            message = receive_before(worker.channel, time.monotonic() + COMMAND_TIMEOUT)
            if message is not None:
                self._take(worker, message)
        if not relayed.settled():
            relayed.error = OSError(errno.EIO, self.broken)
            relayed.done.set()

    def drop_relayed(self, relayed):
        """The file is over before its helper job: the workers stop reading."""
        if self._relayed is relayed:
            self._relayed = None
            relayed.stop()
            if not relayed.done.is_set() and relayed.file_id is not None:
                for worker in self.workers[:relayed.outgoing.workers - 1]:
                    send_quietly(worker.channel, WORKER_JOB.pack(b'K', relayed.file_id, 0, 0))

    def _broke(self, worker):
        if self.broken is None:
            self.broken = 'worker process %d (pid %d) ended' % (worker.index, worker.pid)

    def close(self):
        end_workers([(worker.pid, worker.channel) for worker in self.workers])


def run_sending_worker(index, channel, keys, session_id, local, family, log):
    """A sending worker's life: its UDP flow once the coordinator names the
    client worker's address, then each share of a file it is given (and
    its helper jobs: relay_job(), relay_units()), until the coordinator's
    end closes."""
    sealer, opener = keys.worker_sealers('server', index)
    rate = WorkerRate(channel)
    control = WorkerControl(channel, rate)
    packet_log = PacketLog()
    udp, next_seq, rtt = None, 0, 0.1
    digests = DigestCache()
    jobs = {}                                   # file id -> its helper jobs (the last file's)
    while True:
        message = channel.recv(MAX_WORKER_MESSAGE)
        if not message:
            return
        code = message[:1]
        if code in (b'G', b'V') and len(message) > WORKER_JOB.size + (
                WORKER_SPREAD.size if code == b'V' else 0):
            file_id = WORKER_JOB.unpack_from(message)[1]
            if file_id not in jobs:
                jobs = {file_id: []}
            job = relay_job(channel, message, digests) if code == b'G' else \
                relay_units(channel, message, index)
            if job is not None:
                jobs[file_id].append(job)
        elif code == b'K' and len(message) == WORKER_JOB.size:
            for job in jobs.pop(WORKER_JOB.unpack(message)[1], ()):
                job.stop.set()
        elif code == b'U' and udp is None and len(message) > WORKER_FLOW.size:
            length = WORKER_FLOW.unpack_from(message)[1]
            address = tuple(json.loads(message[WORKER_FLOW.size:WORKER_FLOW.size + length]))
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(local)
            sock.connect(address)
            udp = DatagramSocket(sock)
            channel.sendall(b'u')
        elif code == b'R' and len(message) == WORKER_RATE.size:
            rate.update(message)
        elif code == b'F' and udp is not None and len(message) > WORKER_SEND.size:
            _code, file_id, first_seq, block_size, compress, share_rtt, size, mtime_ns, flows = \
                WORKER_SEND.unpack_from(message)
            if first_seq < next_seq:
                log('told to send from packet %d, below %d: packet numbers would repeat'
                    % (first_seq, next_seq))
                return
            outgoing = WorkerOutgoingFile(control, udp, sealer, opener, session_id, rate, packet_log,
                                          first_seq, share_rtt or rtt)
            whole = False
            try:
                outgoing.open_share(os.fsdecode(message[WORKER_SEND.size:]), size, mtime_ns,
                                    block_size, bool(compress), flows)
                outgoing.begin(file_id)
                whole = outgoing.run()
                if outgoing.failure is not None:
                    log('%s; its share abandoned' % outgoing.failure)
            except RemoteError as e:
                log(str(e))
            finally:
                outgoing.close()
            next_seq, rtt = outgoing.next_seq, outgoing.rtt
            window = outgoing.window
            compressed = outgoing.compression.compressed if outgoing.compression else 0
            channel.sendall(WORKER_SENT.pack(
                b'D', file_id, next_seq, window.lost if window else 0,
                window.retransmitted if window else 0, outgoing.wire_bytes, compressed,
                1 if whole else 0))


# --- The receiving end: `get` ---------------------------------------------------

class ReceivingWorker:
    """One receiving worker as its coordinator sees it, with what it last
    reported of the file it shares."""

    def __init__(self, index, pid, channel):
        self.index, self.pid, self.channel = index, pid, channel
        self.reset(None)

    def reset(self, file_id):
        self.file_id = file_id
        self.held = self.written_bytes = self.packets = self.duplicates = self.rejected = 0
        self.first_arrival = None
        self.flow = FlowCounts(0, 0, 0, 0, 0)
        self.complete = False


class ReceivingTeam:
    """A client's receiving workers, as the client (the coordinator) sees
    them: forked once the server granted them, each with its UDP flow
    (opened by its own HELLOs), and a share of each striped file: the
    coordinator records in its BlockWriter what they wrote, and sums what
    they report."""

    _followed = None                            # the FollowedDigest of the file being received

    def __init__(self, client, count):
        keys, session_id = client.keys, client.session_id
        address, family = client.udp.sock.getpeername(), client.udp.sock.family
        timeout = client.timeout

        def main(index, channel):
            run_receiving_worker(index, channel, keys, session_id, address, family, timeout)
        self.workers = [ReceivingWorker(index, pid, channel) for index, (pid, channel) in
                        enumerate(fork_workers(count, main, [client.sock, client.udp.sock]), 1)]
        self.count = count
        self._active = []
        self._file_id = None
        self._writer = None
        self._decided = 0

    def pids(self):
        return [worker.pid for worker in self.workers]

    def start_file(self, incoming, window, writer, count, stripe, first_seqs, cycle=None):
        """Workers 1..count-1 receive their stripes of `incoming`'s file
        (dealt by `cycle`, see stripe_cycle(); None: round robin)."""
        file_id = incoming.start['file']
        self._active = self.workers[:count - 1]
        self._file_id, self._writer, self._decided = file_id, writer, window.decided
        tail = json.dumps([incoming.dest, incoming.conversation.timeout, cycle]).encode()
        for worker, first_seq in zip(self._active, first_seqs):
            worker.reset(file_id)
            self._send(worker, WORKER_RECEIVE.pack(
                b'F', file_id, first_seq, incoming.block_size, incoming.entry.size, stripe, count,
                worker.index, window.decided, incoming.rtt) + tail)

    def _send(self, worker, message):
        try:
            worker.channel.sendall(message)
        except OSError:
            raise self._ended(worker)

    def _ended(self, worker):
        return TransferError('worker process %d (pid %d) ended during the transfer; partial data '
                             'kept: run the same command again to resume' % (worker.index, worker.pid))

    def forward_held(self, ranges):
        """Blocks local data filled: no worker waits for them."""
        for worker in self._active:
            for message in worker_ranges(b'H', self._file_id, ranges):
                self._send(worker, message)

    def forward_decided(self, decided):
        if decided > self._decided:
            self._decided = decided
            for worker in self._active:
                self._send(worker, WORKER_DECIDED.pack(b'C', self._file_id, decided))

    def complete(self):
        return all(worker.complete for worker in self._active)

    def watch(self, selector, phase):
        for worker in self._active:
            selector.register(worker.channel, selectors.EVENT_READ,
                              functools.partial(self._read, worker, phase))

    def _read(self, worker, phase):
        """One message from `worker`; a worker that received more is data
        arriving, as far as the phase's timers care."""
        try:
            message = worker.channel.recv(MAX_WORKER_MESSAGE, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            message = b''
        if not message:
            raise self._ended(worker)
        code = message[:1]
        if code == b'W' and len(message) >= WORKER_RANGES.size:
            _code, file_id, ranges = read_worker_ranges(message)
            if file_id == self._file_id:
                self._writer.mark_written(ranges)
        elif code in (b'P', b'C', b'X') and len(message) >= WORKER_PROGRESS.size:
            (_code, file_id, held, written, packets, duplicates, rejected, first, numbered,
             resent, compressed, datagram_bytes) = WORKER_PROGRESS.unpack_from(message)
            if file_id != self._file_id:
                return
            if code == b'X':
                raise TransferError(message[WORKER_PROGRESS.size:].decode('utf-8', 'replace'))
            if packets != worker.packets:
                phase.last_data = phase.clock()
            worker.held, worker.written_bytes, worker.packets = held, written, packets
            worker.duplicates, worker.rejected = duplicates, rejected
            worker.first_arrival = None if first < 0 else first
            worker.flow = FlowCounts(numbered, packets, resent, compressed, datagram_bytes)
            worker.complete = worker.complete or code == b'C'
        # Every worker reports often while its share runs: worker 1 then
        # hears how far the file is written (local data written here too).
        if self._followed is not None:
            self._followed.advance()

    def follow_digest(self, file_id, nblocks, written):
        """The whole file's digest, computed by worker 1 as the file is
        written (a FollowedDigest in place of this process's FrontierDigest),
        so that no process's own work outgrows its share."""
        self._followed = FollowedDigest(self, file_id, nblocks, written)
        return self._followed

    def tell_frontier(self, followed, code, blocks):
        if followed is self._followed:
            self._send(self.workers[0], WORKER_FRONTIER.pack(code, followed.file_id, blocks))

    def await_digest(self, followed):
        """Worker 1's answer to b'Z': the hex digest (TransferError if it
        could not read the file, or ended)."""
        worker = self.workers[0]
        while True:
            message = receive_before(worker.channel, time.monotonic() + COMMAND_TIMEOUT)
            if message is None:
                continue
            if not message:
                raise self._ended(worker)
            code = message[:1]
            if code == b'g' and len(message) == WORKER_DIGEST.size:
                _code, file_id, digest = WORKER_DIGEST.unpack(message)
                if file_id == followed.file_id:
                    return digest.hex()
            elif code == b'X' and len(message) >= WORKER_PROGRESS.size and \
                    WORKER_PROGRESS.unpack_from(message)[1] == followed.file_id:
                raise TransferError(message[WORKER_PROGRESS.size:].decode('utf-8', 'replace'))

    def totals(self):
        """What the workers sharing the file report, summed."""
        active = self._active
        arrivals = [w.first_arrival for w in active if w.first_arrival is not None]
        return {'held': sum(w.held for w in active),
                'written_bytes': sum(w.written_bytes for w in active),
                'packets': [w.packets for w in active],
                'duplicates': sum(w.duplicates for w in active),
                'rejected': sum(w.rejected for w in active),
                'flows': [w.flow for w in active],
                'first_arrival': min(arrivals) if arrivals else None}

    def end_file(self):
        """The file is over, whole or given up: its workers stop (those
        complete were still acknowledging)."""
        for worker in self._active:
            try:
                worker.channel.sendall(WORKER_END.pack(b'E', self._file_id))
            except OSError:
                pass
        self._active = []
        self._file_id = self._writer = None

    def close(self):
        end_workers([(worker.pid, worker.channel) for worker in self.workers])


class FollowedDigest:
    """A striped file's digest as worker 1 computes it (FollowingDigest),
    told by this process how far the file is written from its start:
    FrontierDigest's interface, for IncomingFile.  The prefix is sent as
    the workers report writes, at most every FOLLOW_INTERVAL; b'Z' at the
    end asks for the digest."""

    FOLLOW_INTERVAL = 0.05

    def __init__(self, team, file_id, nblocks, written):
        self._team, self.file_id, self._nblocks, self._written = team, file_id, nblocks, written
        self._told = 0
        self._next = 0.0
        self._stopped = False

    def offer(self, position, data):
        pass                            # worker 1 reads it back, from the page cache

    def advance(self):
        now = time.monotonic()
        if self._stopped or now < self._next:
            return
        self._next = now + self.FOLLOW_INTERVAL
        prefix = next_block(self._written(), self._nblocks, self._told, False)
        if prefix > self._told:
            self._told = prefix
            self._team.tell_frontier(self, b'G', prefix)

    def stop(self):
        self._stopped = True

    def finish(self):
        """The hex digest of the whole file, once every block is written."""
        self._stopped = True
        self._team.tell_frontier(self, b'Z', self._nblocks)
        return self._team.await_digest(self)


class FollowingDigest:
    """Worker 1's side of a FollowedDigest (get): a FrontierDigest of the
    file of its last share, over the prefix the coordinator says is written."""

    def __init__(self):
        self.file_id = None
        self._file = None               # (path, size, block size) of that share
        self._bitmap = bytearray()
        self._digest = None

    def share(self, file_id, path, size, block_size):
        if file_id != self.file_id:
            self.drop()
            self.file_id, self._file = file_id, (path, size, block_size)
            self._bitmap = bytearray(((size + block_size - 1) // block_size + 7) // 8)

    def drop(self):
        if self._digest is not None:
            self._digest.stop()
        self._digest = self.file_id = None

    def take(self, message, channel):
        """A WORKER_FRONTIER of the coordinator's."""
        code, file_id, blocks = WORKER_FRONTIER.unpack(message)
        if file_id != self.file_id:
            return
        path, size, block_size = self._file
        try:
            if self._digest is None:
                bitmap = self._bitmap
                self._digest = FrontierDigest(path, size, block_size, lambda: bytes(bitmap))
            set_bits(self._bitmap, 0, min(blocks, len(self._bitmap) * 8))
            if code == b'Z':
                digest, self._digest = self._digest.finish(), None
                self.file_id = None
                channel.sendall(WORKER_DIGEST.pack(b'g', file_id, bytes.fromhex(digest)))
        except (OSError, NoThread) as e:
            self.drop()
            text = 'cannot read back %s: %s' % (path, e.strerror if isinstance(e, OSError) else e)
            channel.sendall(WORKER_PROGRESS.pack(b'X', file_id, 0, 0, 0, 0, 0, -1.0, 0, 0, 0, 0)
                            + text.encode())


class WorkerInbox:
    """A receiving worker's stand-in for the control channel: the
    coordinator's messages, raw."""

    def __init__(self, channel):
        self.sock = channel
        self._inbox = collections.deque()

    def feed(self, data):
        self._inbox.append(bytes(data))

    def messages(self):
        while self._inbox:
            yield self._inbox.popleft()


class WorkerReceivePhase(ReceivePhase):
    """A receiving worker's share of one file: ReceivePhase over its own
    flow and stripes, told by the coordinator of blocks local data filled
    (and of a delta's decided blocks), reporting what it wrote instead of
    keeping the state file."""

    def __init__(self, incoming, window, writer, channel, foreign, following=None, flows=1):
        ReceivePhase.__init__(self, incoming, window, writer, flows=flows)
        self._channel = channel
        self._following = following             # worker 1's FollowingDigest
        self.foreign = foreign                  # blocks of other workers, held in its window
        # A report costs a wakeup of this worker, two messages, a wakeup
        # of the coordinator and (its frontier moved) one of worker 1.
        # Every WORKER_REPORT_INTERVAL they were 20 a second at any rate;
        # what waits for them (the state file, saved every
        # STATE_SAVE_INTERVAL; progress lines; worker 1's digest, whose
        # rest is read at the end) needs them only every few MB.
        self.reported_at, self.reported_bytes = self.clock(), 0
        self.next_progress = self.reported_at + WORKER_REPORT_MOST
        self.repeat_final = True
        self.reported = False

    def complete(self):
        """Its share whole, once: written, and said so.  The phase goes on
        (acknowledging, see _send_feedback) until the coordinator ends the
        file."""
        if not self.reported and self.window.complete():
            self.writer.sync()
            self.report(b'C')
            self.reported = True
        return False

    def _send_nak(self, now):
        if not self.reported:                   # complete: no data is to come
            ReceivePhase._send_nak(self, now)

    def _wake_at(self):
        # Complete, its NAK and report timers stop where they were, in the
        # past: waking for them would spin until the coordinator ends the
        # file.  Only the repeated acknowledgement is left to time.
        if self.reported:
            return self.next_feedback
        return ReceivePhase._wake_at(self)

    def _apply_control(self):
        window = self.window
        for message in self.channel.messages():
            code = message[:1]
            if code == b'H' and len(message) >= WORKER_RANGES.size:
                _code, file_id, ranges = read_worker_ranges(message)
                if file_id == self.file_id:
                    window.mark_held(ranges)
            elif code == b'C' and len(message) == WORKER_DECIDED.size:
                _code, file_id, decided = WORKER_DECIDED.unpack(message)
                if file_id == self.file_id:
                    window.decided = max(window.decided, min(decided, window.nblocks))
            elif code == b'E' and len(message) == WORKER_END.size:
                if WORKER_END.unpack(message)[1] == self.file_id:
                    raise ShareEnded()
            elif code in (b'G', b'Z') and len(message) == WORKER_FRONTIER.size \
                    and self._following is not None:
                self._following.take(message, self._channel)
        return False

    def _report_progress(self, now):
        """Report once WORKER_REPORT_BYTES more are written (no sooner than
        WORKER_REPORT_INTERVAL after the last), or WORKER_REPORT_MOST after
        the last however little: a fast share as often as ever, a slow one
        seldom.  Only the second needs a timer; the first is looked at on
        the wakeups data brings."""
        if self.reported:
            return
        written = self.writer.written_bytes
        if now >= self.next_progress or (now - self.reported_at >= WORKER_REPORT_INTERVAL and
                                         written - self.reported_bytes >= WORKER_REPORT_BYTES):
            self.reported_at, self.reported_bytes = now, written
            self.next_progress = now + WORKER_REPORT_MOST
            self.report(b'P')

    def _save_state(self, now):
        pass                                    # the coordinator's, from what is reported

    def report(self, code, text=''):
        """What was written since the last report, then how far it got."""
        for message in worker_ranges(b'W', self.file_id, self.writer.take_written()):
            self._channel.sendall(message)
        window, flow = self.window, self.receiver.flow_counts()
        self._channel.sendall(WORKER_PROGRESS.pack(
            code, self.file_id, window.held - self.foreign, self.writer.written_bytes,
            window.packets, window.duplicates, self.receiver.rejected,
            -1.0 if window.first_arrival is None else window.first_arrival, flow.numbered,
            flow.resent, flow.compressed, flow.datagram_bytes) + text.encode())


def run_receiving_worker(index, channel, keys, session_id, address, family, timeout):
    """A receiving worker's life: HELLOs on its own flow until its first
    share comes (the server announces none before every flow it uses is
    open), then each share it is given, until the coordinator's end closes."""
    sealer_out, sealer_in = keys.worker_sealers('client', index)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.connect(address)
    data = DataChannel(DatagramSocket(sock), sealer_out, sealer_in, session_id, hello_flags=index)
    deadline = time.monotonic() + UDP_SETUP_TIMEOUT + 5
    channel.settimeout(HELLO_INTERVAL)
    message = None
    while message is None:
        if time.monotonic() < deadline:
            data.send(KIND_HELLO)
        else:
            channel.settimeout(None)
        try:
            message = channel.recv(MAX_WORKER_MESSAGE)
        except socket.timeout:
            pass
    channel.settimeout(None)
    following = FollowingDigest() if index == 1 else None
    while message:
        code = message[:1]
        if code == b'F' and len(message) > WORKER_RECEIVE.size:
            receive_share(message, channel, data, following)
        elif code in (b'G', b'Z') and len(message) == WORKER_FRONTIER.size and following is not None:
            following.take(message, channel)
        message = channel.recv(MAX_WORKER_MESSAGE)


def receive_share(message, channel, data, following=None):
    """Receive one share of a file into the coordinator's partial file
    (worker 1 also digests the file: `following`)."""
    (_code, file_id, first_seq, block_size, size, stripe, count, index, decided,
     rtt) = WORKER_RECEIVE.unpack_from(message)
    dest, timeout, cycle = json.loads(message[WORKER_RECEIVE.size:].decode())
    phase = writer = partial = None
    try:
        partial = PartialFile(dest, '', size, 0, block_size)
        if following is not None:
            following.share(file_id, partial.data_path, size, block_size)
        partial.fd = PartialFile._open_ours(partial.data_path)
        recorded = PartialFile.recorded(partial.state_path)
        if partial.fd is None or recorded is None or len(recorded[1]) != (partial.nblocks + 7) // 8 \
                or recorded[0].get('block_size') != block_size:
            raise TransferError('%s: worker %d found no partial file to write into' % (dest, index))
        view = stripe_view(recorded[1], partial.nblocks, stripe, count, index, cycle)
        window = ReceiveWindow(partial.nblocks, first_seq, view)
        window.decided = min(decided, partial.nblocks)
        data.sealer_in.set_stride(block_size)
        writer = BlockWriter(partial, view, track=True)
        incoming = types.SimpleNamespace(
            start={'file': file_id, 'first_seq': first_seq, 'lead': 0}, rtt=rtt,
            conversation=types.SimpleNamespace(channel=WorkerInbox(channel), timeout=timeout,
                                               peer='server'),
            data=data, events=TransferEvents(), clock=time.monotonic, asked_at=time.monotonic(),
            entry=types.SimpleNamespace(size=size), block_size=block_size, kept=[])
        phase = WorkerReceivePhase(incoming, window, writer, channel,
                                   foreign_blocks(partial.nblocks, stripe, count, index, cycle),
                                   following, count)
        phase.run()                             # until the coordinator ends the file
    except ShareEnded:
        pass
    except (WanxferError, OSError) as e:
        if writer is not None:
            try:
                writer.sync()
            except WanxferError:
                pass
        text = str(e) if isinstance(e, WanxferError) else 'worker %d: %s' % (index, describe_error(e))
        if phase is not None:
            phase.report(b'X', text)
        else:
            channel.sendall(WORKER_PROGRESS.pack(b'X', file_id, 0, 0, 0, 0, 0, -1.0, 0, 0, 0, 0)
                            + text.encode())
    finally:
        if writer is not None:
            writer.close()
        if partial is not None:
            partial.close()


# ---------------------------------------------------------------------------
# Tunnel
# ---------------------------------------------------------------------------
# `tunnel`: TCP forwarding between two peers over one authenticated, encrypted
# peer connection, each direction deduplicated against the chunk store and
# compressed.  The --peer side ("near") listens like `ssh -L` and carries each
# connection to the --listen side ("far"), which opens it to an --allow'ed
# target.
#
# The parts, in the order data flows:
#   StreamEncoder   a stream's bytes -> pieces: references, runs of them, or literals (no sockets)
#   StreamDecoder   pieces -> verified bytes, or the digest or run to ask for (no sockets)
#   ChunkLinks      which chunk followed which last time, so a run of them costs one piece
#   DeflatePool     compresses literal blocks for every connection, on a few threads
#   PeerWriter      packs, seals and writes a connection's frames in order, on its own thread
#   FrameReader     a connection's sealed frames in
#   Stream          one forwarded connection: its socket, both directions, flow control
#   PeerConnection  one authenticated peer connection: messages, streams, keepalive
#   EventLoop       selectors, timers, and an inbox for helper threads' results
#   Tunnel          the process: store, stats, and one role, NearTunnel or FarTunnel
#
# Flow control is per stream and counted in original bytes: a sender keeps at
# most the receiver's window (TUNNEL_HELLO) unacknowledged, and the receiver
# acknowledges (MSG_CREDIT) as its socket takes the bytes, so a slow reader
# holds at most one window and the peer connection keeps moving for everyone
# else.  A sender also keeps the chunks it sent as references until they are
# acknowledged, so it can answer MSG_CHUNK_REQUEST.
#
# Threads: the event loop owns all socket reads, all stream state and the
# store's lookups; the store's writer thread makes every write to the cache
# file (QueuedChunkStore), so another process holding the file's write lock
# delays the cache, never the streams.  Each peer connection's writer thread
# owns that peer connection's outbound Sealer and socket writes, and hands
# its literal blocks to the process's DeflatePool (zlib releases the GIL, so
# blocks compress on several cores beside the loop).  Short-lived
# helper threads do what cannot be made non-blocking cheaply (name lookup,
# connect, handshake) and post their result to the loop.

STREAM_WINDOW = 32 << 20            # original bytes a stream may have unacknowledged: the
                                    # path's bytes in flight plus both ends' queues at 1 Gbit/s over
                                    # 120 ms, and what a stalled reader holds
CREDIT_STEP = 1 << 20               # the receiver acknowledges at least this often
LOCAL_READ_SIZE = 256 << 10
PEER_READ_SIZE = 1 << 20
FLUSH_AT_ONCE = 16 << 10            # a read this small that empties the socket goes out at once
FLUSH_GRACE = 0.0005                # s a larger burst may wait for its rest before its tail goes
WRITER_HIGH_WATER = 8 << 20         # queued bytes at which local reads pause
WRITER_LOW_WATER = 2 << 20
MERGE_LIMIT = 1 << 20               # bytes of literals in one merged DATA frame
PEER_BUFFER = 48 << 20              # socket buffers: 1 Gbit/s over 130 ms, with losses
                                    # held out of order for a round trip more
PEER_UNSENT_LIMIT = 4 << 20         # bytes the kernel may hold not yet sent
TCP_NOTSENT_LOWAT = getattr(socket, 'TCP_NOTSENT_LOWAT', 25)
ZLIB_LEVEL = 7                      # zlib's 6 trails GNU gzip -6 a little on SQL dumps; 7 passes it
COMPRESS_SAMPLE = 4 << 10           # blobs up to this size are tried outright, not sampled
LZMA_PRESET = 2
LZMA_MIN = 4 << 10                  # smaller blobs go deflated: unprimed LZMA loses on them
PROBE_GAP_MAX = 256                 # blobs between a stream's trials of the coder it is not using
LZMA_LARGE = 64 << 10               # BlobChoice chooses apart for blobs under and over this
SLOWER_BY = 1.25                    # LZMA's CPU time over deflate's it may take where the pool lags
TRIAL_DECAY = 0.75                  # weight of a trial against the one after it (BlobChoice)
RECONNECT_DELAYS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
PEER_STABLE = 10.0                  # s a peer connection must live before back-off starts over
PENDING_STREAM_WAIT = 10.0          # s an accepted connection waits for the peer connection
MAX_PENDING_STREAMS = 256
MAX_STREAMS = 1024                  # streams open at once on one peer connection: each holds a socket
                                    # and up to a STREAM_WINDOW of data each way while its reader lags
MAX_CONNECTING = 128                # targets the far side connects to at once (a thread each);
                                    # later OPENs wait their turn
STATS_INTERVAL = 2.0
SEND_BATCH = 64                     # buffers per sendmsg to a local socket
LINKS_KEPT = 1 << 16                # chunk successions a tunnel remembers (ChunkLinks): about
                                    # 1.5 GB of recent traffic, in about 11 MB


# --- Codec: stream bytes <-> pieces (no sockets) -----------------------------

class StreamEncoder:
    """One direction of one stream, sending end: bytes in, pieces out.

    `encode(data, flush, final)` returns (pieces, refs).  A piece is (kind,
    length, digest, literal).  A chunk this side's store holds is taken to
    be held by the peer too and becomes PIECE_REF; the rest go as literals
    and into the store.  With `flush`, the bytes after the last cut go out
    at once as PIECE_PART (an interactive peer must not wait for a chunk to
    fill); the chunk they open can still end as a reference.  `refs` lists
    (digest, chunk) for each reference, for MSG_CHUNK_REQUEST.

    The chunker may find a cut only later, among bytes already sent as
    PART (the window hash decides once MAX_CHUNK bytes are in).  The wire's
    chunk then ends where the sent bytes end, as an empty PIECE_CHUNK, and
    the chunks it overlaps go as literals, never stored: the peer holds
    other chunks for those bytes.

    With `links`, references to chunks that each followed the one before
    last time (ChunkLinks) go as one PIECE_RUN, ended with each encode
    call so that nothing waits for the run to end; `refs` then also lists
    (check, digests) of each run, for MSG_RUN_REQUEST."""

    def __init__(self, store, links=None):
        self.store = store
        self.links = links
        self.chunker = Chunker()
        self.sent_of_open = 0       # bytes of the open chunk already on the wire
        self.part_open = 0          # the last of those, PART of a wire chunk not yet ended
        self.last = None            # digest of the last wire chunk, if this side knows it
        self._run = []              # (digest, chunk) referred to by the run not yet sent

    def encode(self, data=b'', flush=False, final=False):
        pieces, refs = [], []
        if data:
            for chunk in self.chunker.feed(data):
                self._end_chunk(chunk, pieces, refs)
        if final:
            chunk = self.chunker.finish()
            if chunk:
                self._end_chunk(chunk, pieces, refs)
        elif flush and self.chunker.pending_size > self.sent_of_open:
            self._end_run(pieces, refs)
            part = self.chunker.pending_from(self.sent_of_open)
            pieces.append((PIECE_PART, len(part), None, part))
            self.sent_of_open += len(part)
            self.part_open += len(part)
        self._end_run(pieces, refs)
        return pieces, refs

    def _end_chunk(self, chunk, pieces, refs):
        sent, part = self.sent_of_open, self.part_open
        if sent > len(chunk):               # cut among bytes already sent
            self._end_run(pieces, refs)
            self.last = None                # (the wire chunk is not this one)
            if part and sent - part < len(chunk):
                pieces.append((PIECE_CHUNK, 0, None, b''))
                part = 0
            self.sent_of_open, self.part_open = sent - len(chunk), part
            return
        self.sent_of_open = self.part_open = 0
        if part < sent:                     # its start went in an earlier wire chunk
            self._end_run(pieces, refs)
            self.last = None
            if part or sent < len(chunk):
                pieces.append((PIECE_CHUNK, len(chunk) - sent, None, chunk[sent:]))
            return
        digest = chunk_digest(chunk)
        if len(chunk) >= MIN_STORED_CHUNK and self.store.has(digest):
            if not sent and self.last is not None and len(self._run) < MAX_RUN \
                    and self.links is not None and self.links.follows(self.last) == digest:
                self._run.append((digest, chunk))
            else:
                self._end_run(pieces, refs)
                pieces.append((PIECE_REF, len(chunk), digest, None))
                refs.append((digest, chunk))
        else:
            self._end_run(pieces, refs)
            literal = chunk[sent:] if sent else chunk
            pieces.append((PIECE_CHUNK, len(literal), None, literal))
            self.store.put(digest, chunk)
        if len(chunk) < MIN_STORED_CHUNK:
            self.last = None                # never referred to, so never in a run
            return
        if self.links is not None:
            self.links.note(self.last, digest)
        self.last = digest

    def _end_run(self, pieces, refs):
        if not self._run:
            return
        digests = tuple(digest for digest, _chunk in self._run)
        check = run_check(digests)
        pieces.append((PIECE_RUN, sum(len(chunk) for _digest, chunk in self._run), check, len(digests)))
        refs.extend(self._run)
        refs.append((check, digests))
        self._run = []


class StreamDecoder:
    """One direction of one stream, receiving end: pieces in, bytes out.

    `feed(pieces)` queues pieces and returns how many stream bytes they
    carry; `take()` returns (bytes to deliver, digest to request or None).
    A reference is delivered only from a chunk that matched its digest, its
    length and the bytes of it already delivered; one the store cannot
    give is asked of the sender, and nothing after it moves until
    `supply(digest, chunk)`.  Literal chunks are stored for next time.

    A run (PIECE_RUN) becomes the references it stands for: the chunks
    that followed each other from this stream's last chunk on, as `links`
    remember them, if their digests match the run's check; else its check
    is what `take` asks for, and `supply_run(check, digests)` the answer."""

    def __init__(self, store, links=None):
        self.store = store
        self.links = links
        self.queue = collections.deque()
        self.open_chunk = bytearray()       # PART bytes of the chunk in progress
        self._open_fed = 0                  # the same, counted as pieces arrive
        self.wanted = None
        self._supplied = None
        self._supplied_run = None
        self.last = None                    # digest of the last chunk this stream ended
        self._run_left = None               # [references, bytes] of the run being delivered

    @property
    def idle(self):
        return not self.queue

    def feed(self, pieces):
        carried = 0
        for kind, length, digest, literal in pieces:
            if kind == PIECE_REF:
                if length < self._open_fed or length > MAX_CHUNK:
                    raise ProtocolError('a reference of %d bytes after %d' % (length, self._open_fed))
                carried += length - self._open_fed
                self._open_fed = 0
            elif kind == PIECE_RUN:
                if self._open_fed:
                    raise ProtocolError('a run inside a chunk')
                carried += length
            else:
                carried += length
                if self._open_fed + length > MAX_CHUNK:
                    raise ProtocolError('a chunk longer than %d bytes' % MAX_CHUNK)
                self._open_fed = self._open_fed + length if kind == PIECE_PART else 0
        self.queue.extend(pieces)
        return carried

    def supply(self, digest, chunk):
        if digest != self.wanted:
            return                          # an answer to a request that was overtaken
        if chunk_digest(chunk) != digest:
            raise ProtocolError('the peer sent a chunk that does not match its digest')
        self._supplied = (digest, chunk)
        self.store.put(digest, chunk)

    def supply_run(self, check, digests):
        if check != self.wanted:
            return                          # an answer to a request that was overtaken
        if run_check(digests) != check:
            raise ProtocolError('the peer sent a run that does not match its check')
        self._supplied_run = (check, digests)

    def take(self):
        out = []
        while self.queue:
            kind, length, digest, literal = self.queue[0]
            if kind == PIECE_RUN:
                digests = self._run_digests(digest, literal)
                if digests is None:
                    if self.wanted == digest:
                        return out, None            # asked already
                    self.wanted = digest
                    return out, digest
                self.wanted = None
                self.queue.popleft()
                # Length None: a run's references are checked by its total.
                self.queue.extendleft((PIECE_REF, None, each, None) for each in reversed(digests))
                self._run_left = [len(digests), length]
                continue
            if kind == PIECE_REF:
                chunk = None
                if self._supplied is not None and self._supplied[0] == digest:
                    chunk = self._supplied[1]
                    self._supplied = None
                    if not self._fits(chunk, length):
                        raise ProtocolError('the peer\'s chunk does not fit its reference')
                else:
                    chunk = self.store.get(digest)
                    if chunk is not None and not self._fits(chunk, length):
                        chunk = None
                if chunk is None:
                    if self.wanted == digest:
                        return out, None            # asked already
                    self.wanted = digest
                    return out, digest
                self.wanted = None
                out.append(memoryview(chunk)[len(self.open_chunk):])
                self.open_chunk.clear()
                if length is None:
                    self._count_run(len(chunk))
                self._ended(digest)
            elif kind == PIECE_PART:
                self.open_chunk += literal
                out.append(literal)
            else:
                if self.open_chunk:
                    self.open_chunk += literal
                    chunk = bytes(self.open_chunk)
                    self.open_chunk.clear()
                else:
                    chunk = literal
                digest = chunk_digest(chunk)
                self.store.put(digest, chunk)
                out.append(literal)
                self._ended(digest)
            self.queue.popleft()
        return out, None

    def _fits(self, chunk, length):
        opened = len(self.open_chunk)
        return (length is None or len(chunk) == length) and (not opened or chunk[:opened] == self.open_chunk)

    def _ended(self, digest):
        if self.links is not None:
            self.links.note(self.last, digest)
        self.last = digest

    def _count_run(self, length):
        left = self._run_left
        left[0] -= 1
        left[1] -= length
        if left[1] < 0 or (not left[0] and left[1]):
            raise ProtocolError('a run\'s chunks do not add up to its length')
        if not left[0]:
            self._run_left = None

    def _run_digests(self, check, count):
        """The digests a run stands for, or None to ask the sender."""
        if self._supplied_run is not None and self._supplied_run[0] == check:
            digests = self._supplied_run[1]
            self._supplied_run = None
            if len(digests) != count:
                raise ProtocolError('the peer sent a run of %d chunks for one of %d' % (len(digests), count))
            return digests
        if self.links is None or self.last is None:
            return None
        digests = self.links.walk(self.last, count)
        if digests is None or run_check(digests) != check:
            return None
        return digests


def run_check(digests):
    """What a PIECE_RUN says of the chunks it stands for."""
    return hashlib.sha256(b''.join(digests)).digest()[:RUN_CHECK_SIZE]


class ChunkLinks:
    """Which chunk followed which when streams carried them whole, for the
    LINKS_KEPT most recent: what lets a PIECE_RUN stand for many
    references.  Each end learns from what it sends and what it receives,
    so the two mostly agree; where they do not, the run's check says so
    and the receiver asks for the digests, a round trip.  The two ends
    learn in different orders (each interleaves its streams and directions
    its own way), so a chunk seen followed by two different ones (a run of
    zeros, a page that recurs) is no one's successor in particular: it
    ends runs at both ends, for good.  In memory only: after a restart
    references go one by one until the links are learnt again.  The loop's
    thread only."""

    AMBIGUOUS = b''                         # followed by more than one chunk

    def __init__(self, limit=LINKS_KEPT):
        self._next = {}                     # in the order learnt, the oldest first
        self._limit = limit

    def follows(self, digest):
        """The chunk that follows `digest` whenever it was seen, or None."""
        following = self._next.get(digest)
        return following or None

    def note(self, digest, following):
        if digest is None:
            return
        links = self._next
        known = links.pop(digest, None)
        if known is None:
            if len(links) >= self._limit:
                del links[next(iter(links))]
        elif known != following:
            following = self.AMBIGUOUS
        links[digest] = following

    def walk(self, digest, count):
        """The `count` chunks that followed `digest`, one after the other;
        None where the chain breaks."""
        digests = []
        for _ in range(count):
            digest = self._next.get(digest)
            if not digest:
                return None
            digests.append(digest)
        return digests


def pack_pieces(pieces):
    """The decoded blob of a MSG_DATA: piece table, then literal bytes."""
    table, literals = [], []
    for kind, length, digest, literal in pieces:
        table.append(TUNNEL_PIECE.pack(kind, length))
        if kind == PIECE_REF:
            table.append(digest)
        elif kind == PIECE_RUN:
            table.append(TUNNEL_RUN.pack(literal, digest))
        else:
            literals.append(literal)
    return b''.join(table + literals)


def unpack_pieces(payload, count):
    """Parse a decoded MSG_DATA blob: [(kind, length, digest, literal)],
    the literals as views of `payload` (a run's: its check and chunk count in
    place of digest and literal); ProtocolError if it does not add up."""
    pieces, offset, literal_bytes = [], 0, 0
    for _ in range(count):
        if offset + TUNNEL_PIECE.size > len(payload):
            raise ProtocolError('truncated piece table')
        kind, length = TUNNEL_PIECE.unpack_from(payload, offset)
        offset += TUNNEL_PIECE.size
        digest, chunks = None, None
        if kind == PIECE_REF:
            digest = bytes(payload[offset:offset + CHUNK_DIGEST_SIZE])
            if len(digest) != CHUNK_DIGEST_SIZE:
                raise ProtocolError('truncated reference')
            offset += CHUNK_DIGEST_SIZE
        elif kind == PIECE_RUN:
            if offset + TUNNEL_RUN.size > len(payload):
                raise ProtocolError('truncated run')
            chunks, digest = TUNNEL_RUN.unpack_from(payload, offset)
            offset += TUNNEL_RUN.size
            if not 0 < chunks <= MAX_RUN or not chunks <= length <= chunks * MAX_CHUNK:
                raise ProtocolError('a run of %d chunks and %d bytes' % (chunks, length))
        elif kind in (PIECE_CHUNK, PIECE_PART):
            literal_bytes += length
        else:
            raise ProtocolError('unknown piece kind %d' % kind)
        pieces.append((kind, length, digest, chunks))
    if offset + literal_bytes != len(payload):
        raise ProtocolError('pieces of %d bytes in a blob of %d' % (literal_bytes, len(payload) - offset))
    view, filled = memoryview(payload), []
    for kind, length, digest, chunks in pieces:
        if kind in (PIECE_CHUNK, PIECE_PART):
            filled.append((kind, length, None, view[offset:offset + length]))
            offset += length
        else:
            filled.append((kind, length, digest, chunks))
    return filled


# --- Writer: the sending half of a peer connection, on its own thread --------

class DeflatePool:
    """Threads that compress blobs for every peer connection of a process.

    zlib and lzma release the GIL while they work on a buffer, so blobs
    compressed here use more than one core while the loop chunks and the
    writers seal.  `submit(blob, dictionary, done, choice, pressed)` runs
    `compress_blob` on a pool thread and then `done((encoding, packed),
    error)` there; done must not block.  With no threads, or for a blob too
    short to compress (an interactive stream's: no hop between threads),
    submit runs the work at once on the caller's thread."""

    def __init__(self, threads, level=ZLIB_LEVEL):
        self.level = level
        self.threads = threads
        self._jobs = queue.SimpleQueue()
        for _ in range(threads):
            start_thread(self._work, 'tunnel-deflate')

    def submit(self, blob, dictionary, done, choice=None, pressed=False):
        if not self.threads or len(blob) < MIN_COMPRESS:
            self._run(blob, dictionary, done, choice, pressed)
        else:
            self._jobs.put((blob, dictionary, done, choice, pressed))

    def close(self):
        for _ in range(self.threads):
            self._jobs.put(None)

    def _work(self):
        while True:
            job = self._jobs.get()
            if job is None:
                return
            self._run(*job)

    def _run(self, blob, dictionary, done, choice, pressed):
        try:
            result = compress_blob(blob, dictionary, self.level, choice, pressed)
        except Exception as e:          # (MemoryError): the writer reports it and the connection ends
            done(None, e)
            return
        done(result, None)


def default_pool_threads():
    """Compression threads for a tunnel: one per core, at most 4 (beyond
    that the loop's chunking and digests are the limit)."""
    return max(1, min(4, os.cpu_count() or 1))


def deflate_blob(blob, dictionary, level=ZLIB_LEVEL, judged=False):
    """(encoding, bytes on the wire) of a DATA or CHUNK blob: BLOB_DEFLATE,
    primed with `dictionary`, where a sample says it pays (or the caller
    `judged` so); else BLOB_RAW."""
    if not judged and (len(blob) < MIN_COMPRESS or not compressible(blob)):
        return BLOB_RAW, blob
    deflate = zlib.compressobj(level, zlib.DEFLATED, -15, 8, zlib.Z_DEFAULT_STRATEGY, dictionary)
    return BLOB_DEFLATE, deflate.compress(blob) + deflate.flush()


def lzma_filters(dict_size=LZMA_DICT, preset=None):
    options = {'id': lzma.FILTER_LZMA2, 'dict_size': dict_size}
    if preset is not None:
        options['preset'] = preset
    return [options]


def lzma_blob(blob):
    """A BLOB_LZMA's bytes on the wire: xz's preset 2 within LZMA_DICT,
    which on structured data is about as fast as deflate level 7 and far
    smaller (WAL: two thirds of deflate's size, binaries and binlogs 4-7%
    smaller), and on text loses to primed deflate (SQL dumps: 3% larger).
    Presets 0 and 1 are a little faster but no better than deflate on
    binlogs."""
    compressor = lzma.LZMACompressor(lzma.FORMAT_RAW, filters=lzma_filters(preset=LZMA_PRESET))
    return compressor.compress(blob) + compressor.flush()


def compress_blob(blob, dictionary, level=ZLIB_LEVEL, choice=None, pressed=False):
    """(encoding, bytes on the wire) of a DATA or CHUNK blob.  A small one
    is deflated outright (a sample of it, without the history, would
    misjudge it) and goes raw unless that saves; a larger one goes raw if a
    sample says it does not compress, else as `choice` (a BlobChoice, None
    for deflate only) says, `pressed` if compression is what holds the
    stream up: deflated, LZMA, or both tried and the smaller."""
    if len(blob) < MIN_COMPRESS:
        return BLOB_RAW, blob
    if len(blob) <= COMPRESS_SAMPLE:
        encoding, packed = deflate_blob(blob, dictionary, level, judged=True)
        return (encoding, packed) if len(packed) < len(blob) else (BLOB_RAW, blob)
    if not compressible(blob):
        return BLOB_RAW, blob
    plan = choice.plan(len(blob), pressed) if choice is not None and len(blob) >= LZMA_MIN else BLOB_DEFLATE
    if plan == BLOB_LZMA:
        return BLOB_LZMA, lzma_blob(blob)
    started = time.thread_time()
    encoding, packed = deflate_blob(blob, dictionary, level, judged=True)
    if plan is None:                        # a trial: both coders, and the smaller goes
        deflated = time.thread_time()
        other = lzma_blob(blob)
        choice.learn(len(blob), len(other), len(packed), time.thread_time() - deflated, deflated - started)
        if len(other) < len(packed):
            return BLOB_LZMA, other
    return encoding, packed


class BlobChoice:
    """Which coder one stream's larger blobs get, one way: deflate primed
    with the history, or LZMA.  Blobs under and over LZMA_LARGE choose
    apart: on a binlog primed deflate wins the smaller ones and LZMA the
    larger ones by 9%.  A blob gets its size's current choice, except now
    and then a trial: both coders, the smaller sent.  The choice is the
    coder with the smaller total over the last few trials (each weighs
    TRIAL_DECAY as much as the next), not the last one's winner, as single
    blobs go either way where the two are close.  A trial that leaves the
    choice as it was doubles the gap to the next one (up to PROBE_GAP_MAX
    blobs of that size); one that changes it brings trials soon again.  So
    a stream that changes character is followed within a few blobs, and
    one that does not pays for the other coder on under 1% of its blobs.
    Where compression holds the stream up (`pressed`), LZMA is used only
    if it took at most SLOWER_BY times deflate's CPU time in the trials:
    on WAL and database pages it is about as fast as deflate, on text 40%
    slower.  Called from the pool's threads, in any order."""

    def __init__(self):
        self._lock = threading.Lock()
        # Per size: [coder, gap, blobs until the next trial (the first is
        # one), then decayed totals: LZMA's and deflate's bytes, seconds].
        self._sizes = [[BLOB_DEFLATE, 1, 0, 0.0, 0.0, 0.0, 0.0], [BLOB_DEFLATE, 1, 0, 0.0, 0.0, 0.0, 0.0]]

    def plan(self, size, pressed=False):
        """The coder for a blob of `size` bytes, or None for a trial of both."""
        state = self._sizes[size >= LZMA_LARGE]
        with self._lock:
            if state[2] > 0:
                state[2] -= 1
                if pressed and state[0] == BLOB_LZMA and state[5] > SLOWER_BY * state[6]:
                    return BLOB_DEFLATE
                return state[0]
            state[2] = state[1]
            return None

    def learn(self, size, lzma_size, deflate_size, lzma_seconds=0.0, deflate_seconds=0.0):
        state = self._sizes[size >= LZMA_LARGE]
        with self._lock:
            state[3] = state[3] * TRIAL_DECAY + lzma_size
            state[4] = state[4] * TRIAL_DECAY + deflate_size
            state[5] = state[5] * TRIAL_DECAY + lzma_seconds
            state[6] = state[6] * TRIAL_DECAY + deflate_seconds
            winner = BLOB_LZMA if state[3] < state[4] else BLOB_DEFLATE
            if winner == state[0]:
                state[1] = min(2 * state[1], PROBE_GAP_MAX)
            else:
                state[0], state[1] = winner, 1
            state[2] = min(state[2], state[1])


def unlzma_blob(blob, limit):
    """The decoded bytes of a BLOB_LZMA from the peer: at most `limit` of
    them, one complete LZMA2 stream within LZMA_DICT, nothing after it."""
    if lzma is None:
        raise ProtocolError('the peer sent LZMA, which this side said it cannot decode')
    decompressor = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=lzma_filters())
    try:
        data = decompressor.decompress(blob, limit + 1)
    except lzma.LZMAError as e:
        raise ProtocolError('bad LZMA data: %s' % e)
    if len(data) > limit:
        raise ProtocolError('compressed data longer than %d bytes' % limit)
    if not decompressor.eof or decompressor.unused_data:
        raise ProtocolError('LZMA data %s its end' % ('short of' if not decompressor.eof else 'past'))
    return data


def decodable_encodings():
    """HELLO's bit mask of the blob encodings this side decodes."""
    return 1 << BLOB_RAW | 1 << BLOB_DEFLATE | (1 << BLOB_LZMA if lzma is not None else 0)


def inflate_blob(blob, dictionary, limit):
    """The decoded bytes of a BLOB_DEFLATE from the peer: at most `limit`
    of them, one complete deflate stream, nothing after it."""
    inflate = zlib.decompressobj(-15, zdict=dictionary)
    try:
        data = inflate.decompress(blob, limit + 1)
    except zlib.error as e:
        raise ProtocolError('bad compressed data: %s' % e)
    if len(data) > limit or inflate.unconsumed_tail:
        raise ProtocolError('compressed data longer than %d bytes' % limit)
    if not inflate.eof or inflate.unused_data:
        raise ProtocolError('compressed data %s its end' % ('short of' if not inflate.eof else 'past'))
    return data


def extend_history(history, blob):
    """A direction's history (the last HISTORY_SIZE bytes) after `blob`."""
    if len(blob) >= HISTORY_SIZE:
        return bytes(blob[-HISTORY_SIZE:])
    return (history + bytes(blob))[-HISTORY_SIZE:]


class Staged:
    """A frame on its way out of a PeerWriter: its backlog size, and either
    its body or the head to put before its blob once the pool is done."""

    __slots__ = ('size', 'head', 'result', 'error', 'ready')

    def __init__(self, size, head, body=None):
        self.size = size
        self.head = head                    # (prefix, struct of the encoding, its other fields)
        self.result = body                  # the body; for a blob, (encoding, packed blob)
        self.error = None
        self.ready = head is None


class PeerWriter:
    """The sending half of a peer connection, on its own thread.

    The loop queues messages with `send(body)`, `send_data(sid, pieces,
    choice)` and `send_chunk(sid, digest, chunk)`; this thread packs them,
    hands each literal blob to the DeflatePool (primed with the history
    before it; LZMA allowed once `lzma_ok`, the peer's HELLO, says so),
    and seals and writes the frames strictly in queue order as their blobs
    come back.  At most 2 x the pool's threads blobs are in the pool at
    once, so a fast stream keeps every thread busy and the memory bounded.
    It owns the outbound Sealer and every write to the socket.  The loop
    reads `should_pause()`, `wire_bytes` and `error`; `on_event(name)` is
    called from this thread ('drained', 'failed') and must only post to the
    loop."""

    def __init__(self, sock, sealer, on_event, pool):
        self.sock = sock
        self._sealer = sealer
        self._on_event = on_event
        self._pool = pool
        self._in_flight = max(1, 2 * pool.threads)
        self._history = b''
        self.lzma_ok = False                    # set by the loop at the peer's HELLO, before any DATA
        self._queue = collections.deque()
        self._staged = collections.deque()      # Staged, in send order
        self._lock = threading.Condition()
        self._frames = 0
        self._backlog = 0
        self._want_drained = False
        self._closing = False
        self.wire_bytes = 0
        self.error = None
        self._thread = None

    def start(self):
        self._thread = start_thread(self._run, 'peer-writer')

    def should_pause(self):
        """Whether local reads should pause for the backlog; if so, this
        writer reports 'drained' once it is down to WRITER_LOW_WATER."""
        with self._lock:
            if self._backlog >= WRITER_HIGH_WATER:
                self._want_drained = True
                return True
            return False

    def send(self, body):
        self._put(('frame', body), 0)

    def send_data(self, sid, pieces, choice=None):
        size = sum(length for kind, length, _d, _l in pieces if kind in (PIECE_CHUNK, PIECE_PART))
        self._put(('data', sid, pieces, choice), size)

    def send_chunk(self, sid, digest, chunk):
        self._put(('chunk', sid, digest, chunk), len(chunk))

    def _put(self, item, size):
        with self._lock:
            self._backlog += size
            self._queue.append((item, size))
            self._lock.notify()

    def close(self):
        """Stop after what is queued (or at once if the socket is dead) and
        wait for the thread."""
        with self._lock:
            self._closing = True
            self._queue.append(None)
            self._lock.notify()
        if self._thread is not None and self._thread.is_alive() \
                and self._thread is not threading.current_thread():
            self._thread.join()

    def _take(self):
        """The next item (the lock held); DATA for one stream queued back to
        back is merged into one frame (up to MERGE_LIMIT bytes), so a writer
        that falls behind sends fewer, larger frames: less framing, fewer
        flushes."""
        entry = self._queue.popleft()
        if entry is None or entry[0][0] != 'data':
            return entry
        (_, sid, pieces, choice), size = entry
        while self._queue and self._queue[0] is not None and self._queue[0][0][0] == 'data' \
                and self._queue[0][0][1] == sid and size + self._queue[0][1] <= MERGE_LIMIT \
                and len(pieces) + len(self._queue[0][0][2]) < 65536:
            (_, _, more, _), more_size = self._queue.popleft()
            pieces = pieces + more
            size += more_size
        return ('data', sid, pieces, choice), size

    def _next(self):
        """The next frame to write, once its blob is back from the pool;
        items are staged meanwhile, up to the pool's share.  None at the
        end."""
        with self._lock:
            while True:
                if self._staged and self._staged[0].ready:
                    return self._staged.popleft()
                if self._queue and self._queue[0] is None:
                    if not self._staged:
                        return None                 # the end, after everything staged
                elif self._queue and len(self._staged) < self._in_flight:
                    entry = self._take()
                    self._lock.release()
                    try:
                        staged = self._stage(*entry)
                    finally:
                        self._lock.acquire()
                    self._staged.append(staged)
                    continue
                self._lock.wait()

    def _stage(self, item, size):
        """A Staged for the item: its blob, in history order, off to the pool."""
        if item[0] == 'frame' or self.error is not None:    # (a dead socket's frames are dropped)
            return Staged(size, None, item[1] if item[0] == 'frame' else None)
        choice = None
        if item[0] == 'data':
            _, sid, pieces, choice = item
            blob = pack_pieces(pieces)
            head = (TUNNEL_MESSAGE.pack(MSG_DATA, sid), TUNNEL_DATA, (len(pieces), len(blob)))
        else:
            _, sid, digest, blob = item
            head = (TUNNEL_MESSAGE.pack(MSG_CHUNK, sid) + digest, TUNNEL_CHUNK, ())
        # Where the pool does not keep up, compression is what limits the
        # streams, and the coder's speed counts too (BlobChoice).
        pressed = sum(1 for waiting in self._staged if not waiting.ready) >= self._pool.threads > 0
        staged = Staged(size, head)
        dictionary = self._history
        self._history = extend_history(dictionary, blob)
        self._pool.submit(blob, dictionary, lambda result, error: self._done(staged, result, error),
                          choice if self.lzma_ok else None, pressed)
        return staged

    def _done(self, staged, result, error):
        with self._lock:
            staged.result, staged.error, staged.ready = result, error, True
            self._lock.notify()

    def _run(self):
        waiter = selectors.DefaultSelector()
        waiter.register(self.sock, selectors.EVENT_WRITE)
        try:
            while True:
                staged = self._next()
                if staged is None:
                    return
                if self.error is None:
                    try:
                        self._write(self._frame(staged), waiter)
                    except Exception as e:          # the connection is unusable either way; say why
                        self.error = e
                        self._on_event('failed')
                with self._lock:
                    self._backlog -= staged.size
                    drained = self._want_drained and self._backlog <= WRITER_LOW_WATER
                    if drained:
                        self._want_drained = False
                if drained:
                    self._on_event('drained')
        finally:
            waiter.close()

    def _frame(self, staged):
        if staged.error is not None:
            raise staged.error
        if staged.head is None:
            body = staged.result
        else:
            prefix, layout, fields = staged.head
            encoding, blob = staged.result
            body = b''.join((prefix, layout.pack(encoding, *fields), blob))
        frame = seal_frame(self._sealer, self._frames, body)
        self._frames += 1
        return frame

    def _write(self, frame, waiter):
        view = memoryview(frame)
        while view:
            try:
                sent = self.sock.send(view)
            except (BlockingIOError, InterruptedError):
                if self._closing and not self._queue:
                    waiter.select(0.05)
                else:
                    waiter.select(1.0)
                continue
            view = view[sent:]
            self.wire_bytes += sent


def tune_peer_socket(sock):
    """Nagle off, BBR when the kernel offers it, little unsent data in the
    kernel, and buffers for a long fat pipe.  Returns the largest buffer
    the peer connection can get, for `peer_buffer_warning`."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b'bbr')
    except (AttributeError, OSError):
        pass                                # the kernel's default it is
    try:
        # Frames wait in the writer, not in a kernel queue ahead of every
        # other stream's; and unsent bytes do not eat the streams' windows.
        sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, PEER_UNSENT_LIMIT)
    except OSError:
        pass
    ceiling = PEER_BUFFER
    for option, force, core, autotuned in (
            (socket.SO_SNDBUF, SO_SNDBUFFORCE, 'net/core/wmem_max', 'net/ipv4/tcp_wmem'),
            (socket.SO_RCVBUF, SO_RCVBUFFORCE, 'net/core/rmem_max', 'net/ipv4/tcp_rmem')):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, PEER_BUFFER)
            continue
        except OSError:
            pass
        # A fixed size turns the kernel's autotuning off, so it is asked for
        # only where the sysctl lets it reach further than autotuning would.
        if read_sysctl(core) >= PEER_BUFFER:
            sock.setsockopt(socket.SOL_SOCKET, option, PEER_BUFFER)
        else:
            ceiling = min(ceiling, read_sysctl(autotuned, field=2, default=PEER_BUFFER))
    return ceiling


def read_sysctl(name, field=0, default=0):
    """An integer from /proc/sys/`name` (the `field`th of several), or `default`."""
    try:
        with open('/proc/sys/' + name) as f:
            return int(f.read().split()[field])
    except (OSError, ValueError, IndexError):
        return default


def peer_buffer_warning():
    """A line for the log when the peer connection's buffers cannot grow to
    PEER_BUFFER (not root, sysctls at their defaults), or None."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        ceiling = tune_peer_socket(probe)
    finally:
        probe.close()
    if ceiling >= PEER_BUFFER:
        return None
    return ('warning: the peer connection\'s TCP buffers can grow to %d MiB only, too little to '
            'fill a long fast path; run as root, or raise net.ipv4.tcp_rmem and net.ipv4.tcp_wmem '
            '(their last field) to %d' % (ceiling >> 20, PEER_BUFFER))


# --- Streams: one forwarded connection each ----------------------------------

class Stream:
    """One forwarded connection on one peer connection: the local socket (the
    client's on the near side, the target's on the far side; None while the
    far side connects) and both directions, each with its own flow control.
    It ends when both directions were shut and everything it sent was
    acknowledged, or at the first reset."""

    def __init__(self, peer, sid, sock=None, name=''):
        self.peer = peer
        self.sid = sid
        self.sock = sock
        self.name = name
        self.closed = False
        # local socket -> peer
        self.encoder = StreamEncoder(peer.store, peer.links)
        self.choice = BlobChoice()
        self.read_total = 0
        self.credited = 0
        self.refs = collections.deque()     # (read_total when sent, digest, chunk) or, of a run,
                                            # (read_total, check, digests)
        self.read_done = False              # local EOF seen and MSG_SHUT queued
        self._reads = 0
        self._flush_timer = None
        # peer -> local socket
        self.decoder = StreamDecoder(peer.store, peer.links)
        self.outbuf = collections.deque()
        self.received = 0
        self.delivered = 0
        self.credit_sent = 0
        self.remote_shut = False
        self.write_done = False

    # -- local socket ---------------------------------------------------------

    def attach(self, sock):
        self.sock = sock
        self._write_out()
        self.update_interest()

    def on_event(self, mask):
        if mask & selectors.EVENT_WRITE:
            self._write_out()
        if mask & selectors.EVENT_READ and not self.closed:
            self._read_in()
        if not self.closed:
            self.update_interest()

    def update_interest(self):
        if self.sock is None or self.closed:
            return
        events = 0
        peer = self.peer
        if not self.read_done and self.read_total - self.credited < peer.send_window \
                and not peer.writer.should_pause():
            events |= selectors.EVENT_READ
        if self.outbuf:
            events |= selectors.EVENT_WRITE
        peer.loop.watch(self.sock, events, self.on_event)

    def _read_in(self):
        buffer = self.peer.loop.read_buffer
        # Never read past the window: the receiver holds at most that much.
        room = min(len(buffer), self.peer.send_window - (self.read_total - self.credited))
        if room <= 0:
            return
        try:
            n = self.sock.recv_into(buffer, room)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.reset('%s' % (e.strerror or e))
            return
        if n == 0:
            self._end_of_input()
            return
        data = bytes(memoryview(buffer)[:n])
        self.read_total += n
        self.peer.stats.add('tunnel-out', original=n)
        self._reads += 1
        drained = n < len(buffer)           # (or the window is full: send the tail too)
        flush = drained and n < FLUSH_AT_ONCE
        self._send(*self.encoder.encode(data, flush=flush))
        if drained and not flush:
            reads = self._reads
            self._flush_timer = self.peer.loop.call_later(FLUSH_GRACE, lambda: self._flush_tail(reads))

    def _flush_tail(self, reads):
        if not self.closed and not self.read_done and reads == self._reads:
            self._send(*self.encoder.encode(flush=True))

    def _end_of_input(self):
        self.read_done = True
        self._send(*self.encoder.encode(final=True))
        self.peer.send_message(MSG_SHUT, self.sid)
        self._maybe_finish()

    def _send(self, pieces, refs):
        for digest, chunk in refs:
            self.refs.append((self.read_total, digest, chunk))
        if pieces:
            self.peer.writer.send_data(self.sid, pieces, self.choice)

    def _write_out(self):
        if self.sock is None or self.closed:
            return
        while self.outbuf:
            batch = list(itertools.islice(self.outbuf, SEND_BATCH))
            try:
                sent = self.sock.sendmsg(batch)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self.reset('%s' % (e.strerror or e))
                return
            self.delivered += sent
            self.peer.stats.add('tunnel-in', original=sent)
            while sent:
                head = self.outbuf[0]
                if sent >= len(head):
                    sent -= len(head)
                    self.outbuf.popleft()
                else:
                    self.outbuf[0] = memoryview(head)[sent:]
                    sent = 0
            if len(batch) < SEND_BATCH and self.outbuf:
                break                           # the socket took less than offered: it is full
        finished = self.remote_shut and not self.outbuf and self.decoder.idle
        pending = self.delivered - self.credit_sent
        if pending and (finished or pending >= CREDIT_STEP
                        or (not self.outbuf and pending >= 64 << 10)):
            self.credit_sent = self.delivered
            self.peer.send_message(MSG_CREDIT, self.sid, TUNNEL_CREDIT.pack(self.delivered))
        if finished and not self.write_done:
            self.write_done = True
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self._maybe_finish()

    # -- messages from the peer ---------------------------------------------------

    def on_pieces(self, pieces):
        self.received += self.decoder.feed(pieces)
        if self.received - self.delivered > self.peer.receive_window + MAX_CHUNK:
            raise ProtocolError('stream %d overran its window' % self.sid)
        self._decode()

    def on_chunk(self, digest, chunk):
        self.decoder.supply(digest, chunk)
        self._decode()

    def _decode(self):
        out, wanted = self.decoder.take()
        self.outbuf.extend(piece for piece in out if len(piece))
        if wanted is not None and len(wanted) == RUN_CHECK_SIZE:
            self.peer.run_misses += 1
            self.peer.send_message(MSG_RUN_REQUEST, self.sid, wanted)
        elif wanted is not None:
            self.peer.cache_misses += 1
            self.peer.send_message(MSG_CHUNK_REQUEST, self.sid, wanted)
        self._write_out()
        if not self.closed:
            self.update_interest()

    def on_credit(self, value):
        if value < self.credited or value > self.read_total:
            raise ProtocolError('stream %d: credit %d outside 0..%d' % (self.sid, value, self.read_total))
        self.credited = value
        while self.refs and self.refs[0][0] <= value:
            self.refs.popleft()
        self.update_interest()
        self._maybe_finish()

    def on_shut(self):
        self.remote_shut = True
        self._write_out()

    def on_chunk_request(self, digest):
        for _offset, held, chunk in self.refs:
            if held == digest:
                self.peer.writer.send_chunk(self.sid, digest, chunk)
                return
        self.reset('the peer asked for a chunk this side no longer holds')

    def on_run_request(self, check):
        for _offset, held, digests in self.refs:
            if held == check:               # (a check is shorter than any digest)
                self.peer.send_message(MSG_RUN, self.sid, check + b''.join(digests))
                return
        self.reset('the peer asked for a run this side no longer holds')

    def on_run(self, check, digests):
        self.decoder.supply_run(check, digests)
        self._decode()

    # -- the end ---------------------------------------------------------------

    def _maybe_finish(self):
        if self.read_done and self.write_done and self.credited == self.read_total and not self.closed:
            self._close()
            if self.sock is not None:
                self.sock.close()

    def reset(self, reason, tell_peer=True, log=True):
        """Abort: the local socket gets a TCP reset and, unless the peer
        started it, the peer a MSG_RESET."""
        if self.closed:
            return
        if tell_peer:
            self.peer.send_message(MSG_RESET, self.sid, reason.encode('utf-8', 'replace')[:1000])
        if log:
            self.peer.log('stream %d%s reset: %s' % (self.sid, self.name and ' (%s)' % self.name, reason))
        self._close()
        if self.sock is not None:
            reset_socket(self.sock)

    def _close(self):
        self.closed = True
        if self._flush_timer is not None:
            self._flush_timer.cancel()
        if self.sock is not None:
            self.peer.loop.watch(self.sock, 0, None)
        self.peer.streams.pop(self.sid, None)
        self.refs.clear()
        self.outbuf.clear()


# --- Peer connection: messages, streams, keepalive ---------------------------

class PeerConnection:
    """One authenticated peer connection and the streams it carries.

    The loop calls `on_readable`; messages go to `_on_<type>` methods by type.
    Anything the peer gets wrong closes the peer connection (its streams are
    reset), never the process.  The Tunnel that made it is told `peer_ready`
    after the peer's MSG_HELLO and `peer_closed` at the end."""

    def __init__(self, tunnel, sock, keys, role, peer_name):
        self.tunnel = tunnel
        self.loop = tunnel.loop
        self.store = tunnel.store
        self.links = tunnel.links
        self.stats = tunnel.stats
        self.log = tunnel.log
        self.sock = sock
        self.peer_name = peer_name
        self.streams = {}
        self.ready = False
        self.closed = False
        self.cache_misses = 0
        self.run_misses = 0
        self.receive_window = STREAM_WINDOW
        self.send_window = 0
        self.last_heard = time.monotonic()
        self.opened_at = self.last_heard
        self._last_sid = 0
        self._wire_reported = 0
        out_sealer, in_sealer, _data_out, _data_in = keys.sealers(role)
        self._reader = FrameReader(in_sealer)
        self._history = b''                 # of the peer's direction (BLOB_DEFLATE)
        self._handlers = {
            MSG_HELLO: self._on_hello, MSG_OPEN: self._on_open, MSG_DATA: self._on_data,
            MSG_CREDIT: self._on_credit, MSG_SHUT: self._on_shut, MSG_RESET: self._on_reset,
            MSG_CHUNK_REQUEST: self._on_chunk_request, MSG_CHUNK: self._on_chunk,
            MSG_PING: self._on_ping, MSG_PONG: self._on_pong,
            MSG_RUN_REQUEST: self._on_run_request, MSG_RUN: self._on_run,
        }
        sock.setblocking(False)
        self.writer = PeerWriter(sock, out_sealer, self._on_writer_event, tunnel.pool)
        self.writer.start()
        self.send_message(MSG_HELLO, 0, TUNNEL_HELLO.pack(TUNNEL_MAGIC, TUNNEL_VERSION, self.receive_window,
                                                          decodable_encodings()))
        self.loop.watch(sock, selectors.EVENT_READ, self.on_readable)
        self._ping_timer = self.loop.call_later(PING_INTERVAL, self._keepalive)

    # -- out ----------------------------------------------------------------------

    def send_message(self, kind, sid, payload=b''):
        self.writer.send(TUNNEL_MESSAGE.pack(kind, sid) + payload)

    def open_stream(self, sock, host, port, name):
        """Carry a new local connection to host:port on the far side."""
        self._last_sid += 1
        stream = Stream(self, self._last_sid, sock, name)
        self.streams[stream.sid] = stream
        self.stats.add('tunnel-out', connections=1)
        self.stats.add('tunnel-in', connections=1)
        self.send_message(MSG_OPEN, stream.sid, TUNNEL_OPEN.pack(port) + host.encode('utf-8'))
        stream.update_interest()
        return stream

    def _on_writer_event(self, name):
        self.loop.post(lambda: self._writer_event(name))

    def _writer_event(self, name):
        if self.closed:
            return
        if name == 'failed':
            error = self.writer.error
            self.close('peer connection lost: %s' % (getattr(error, 'strerror', None) or error))
        else:
            for stream in list(self.streams.values()):
                stream.update_interest()

    def collect_stats(self):
        wire = self.writer.wire_bytes
        self.stats.add('tunnel-out', transferred=wire - self._wire_reported)
        self._wire_reported = wire

    # -- in -----------------------------------------------------------------------

    def on_readable(self, mask):
        buffer = self.loop.peer_buffer
        try:
            n = self.sock.recv_into(buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.close('peer connection lost: %s' % (e.strerror or e))
            return
        if n == 0:
            self.close('the peer closed the connection')
            return
        self.stats.add('tunnel-in', transferred=n)
        self.last_heard = time.monotonic()
        self._reader.feed(memoryview(buffer)[:n])
        try:
            for body in self._reader.frames():
                self._dispatch(body)
                if self.closed:
                    return
        except ProtocolError as e:
            self.close('protocol error: %s' % e)

    def _dispatch(self, body):
        if len(body) < TUNNEL_MESSAGE.size:
            raise ProtocolError('short message')
        kind, sid = TUNNEL_MESSAGE.unpack_from(body)
        handler = self._handlers.get(kind)
        if handler is None:
            raise ProtocolError('unknown message type %d' % kind)
        if not self.ready and kind != MSG_HELLO:
            raise ProtocolError('the peer did not start with HELLO')
        handler(sid, memoryview(body)[TUNNEL_MESSAGE.size:])

    def _stream(self, sid):
        return self.streams.get(sid)

    def _on_hello(self, sid, payload):
        if len(payload) < TUNNEL_HELLO_PREFIX.size:
            raise ProtocolError('the peer is not a wanxfer tunnel')
        magic, version = TUNNEL_HELLO_PREFIX.unpack_from(payload)
        if magic != TUNNEL_MAGIC:
            raise ProtocolError('the peer is not a wanxfer tunnel')
        if version != TUNNEL_VERSION:
            raise ProtocolError('the peer speaks tunnel protocol %d, this side %d: run the same wanxfer '
                                'at both ends' % (version, TUNNEL_VERSION))
        if len(payload) < TUNNEL_HELLO.size:
            raise ProtocolError('short HELLO')
        _, _, window, encodings = TUNNEL_HELLO.unpack_from(payload)
        if window < MAX_CHUNK:
            raise ProtocolError('the peer offers a window of %d bytes' % window)
        required = 1 << BLOB_RAW | 1 << BLOB_DEFLATE
        if encodings & required != required:
            raise ProtocolError('the peer decodes blob encodings %#x, not raw and deflate' % encodings)
        self.writer.lzma_ok = bool(encodings & 1 << BLOB_LZMA)
        self.send_window = window
        self.ready = True
        self.tunnel.peer_ready(self)

    def _on_open(self, sid, payload):
        if not self.tunnel.accepts_open or sid <= self._last_sid or len(payload) < TUNNEL_OPEN.size:
            raise ProtocolError('unexpected OPEN for stream %d' % sid)
        self._last_sid = sid
        (port,) = TUNNEL_OPEN.unpack_from(payload)
        if len(payload) - TUNNEL_OPEN.size > 255:           # DNS names are at most 253
            raise ProtocolError('a target host of %d bytes' % (len(payload) - TUNNEL_OPEN.size))
        try:
            host = bytes(payload[TUNNEL_OPEN.size:]).decode('utf-8')
        except UnicodeDecodeError:
            raise ProtocolError('target host is not UTF-8')
        if len(self.streams) >= MAX_STREAMS:
            self.log('peer %s opened more than %d streams at once: refused one'
                     % (self.peer_name, MAX_STREAMS))
            self.send_message(MSG_RESET, sid, ('the --listen side has %d streams open on this '
                                               'connection already' % MAX_STREAMS).encode('utf-8'))
            return
        self.stats.add('tunnel-out', connections=1)
        self.stats.add('tunnel-in', connections=1)
        self.tunnel.open_target(self, sid, host, port)

    def _on_data(self, sid, payload):
        if len(payload) < TUNNEL_DATA.size:
            raise ProtocolError('short DATA')
        encoding, count, size = TUNNEL_DATA.unpack_from(payload)
        if size > MAX_FRAME:
            raise ProtocolError('a blob of %d bytes' % size)
        # Decoded even for a stream that is gone, to keep the history in step.
        blob = self._unpack_blob(encoding, payload[TUNNEL_DATA.size:], size)
        pieces = unpack_pieces(blob, count)
        stream = self._stream(sid)
        if stream is not None:
            self._guarded(stream, stream.on_pieces, pieces)

    def _unpack_blob(self, encoding, blob, expected):
        data = self._decode_blob(encoding, blob, expected)
        if len(data) != expected:
            raise ProtocolError('blob of %d bytes where %d were announced' % (len(data), expected))
        return data

    def _decode_blob(self, encoding, blob, limit):
        """A DATA or CHUNK blob from the peer, decoded (at most `limit`
        bytes) and added to the history of the peer's direction."""
        if encoding == BLOB_RAW:
            if len(blob) > limit:
                raise ProtocolError('a blob longer than %d bytes' % limit)
            data = bytes(blob)
        elif encoding == BLOB_DEFLATE:
            data = inflate_blob(blob, self._history, limit)
        elif encoding == BLOB_LZMA:
            data = unlzma_blob(blob, limit)
        else:
            raise ProtocolError('unknown blob encoding %d' % encoding)
        self._history = extend_history(self._history, data)
        return data

    def _guarded(self, stream, method, *args):
        """Run a stream's handler; what the peer got wrong about one stream
        resets that stream only."""
        try:
            method(*args)
        except ProtocolError as e:
            stream.reset(str(e))

    def _on_credit(self, sid, payload):
        stream = self._stream(sid)
        if stream is not None and len(payload) == TUNNEL_CREDIT.size:
            self._guarded(stream, stream.on_credit, TUNNEL_CREDIT.unpack(payload)[0])

    def _on_shut(self, sid, payload):
        stream = self._stream(sid)
        if stream is not None:
            stream.on_shut()

    def _on_reset(self, sid, payload):
        stream = self._stream(sid)
        if stream is not None:
            reason = bytes(payload[:1000]).decode('utf-8', 'replace')
            stream.reset('by the peer: %s' % reason, tell_peer=False)

    def _on_chunk_request(self, sid, payload):
        stream = self._stream(sid)
        if stream is None:
            self.send_message(MSG_RESET, sid, b'the stream is gone')
        else:
            stream.on_chunk_request(bytes(payload))

    def _on_run_request(self, sid, payload):
        if len(payload) != RUN_CHECK_SIZE:
            raise ProtocolError('a run request of %d bytes' % len(payload))
        stream = self._stream(sid)
        if stream is None:
            self.send_message(MSG_RESET, sid, b'the stream is gone')
        else:
            stream.on_run_request(bytes(payload))

    def _on_run(self, sid, payload):
        size = len(payload) - RUN_CHECK_SIZE
        if not 0 < size <= MAX_RUN * CHUNK_DIGEST_SIZE or size % CHUNK_DIGEST_SIZE:
            raise ProtocolError('a RUN of %d bytes' % len(payload))
        digests = tuple(bytes(payload[i:i + CHUNK_DIGEST_SIZE])
                        for i in range(RUN_CHECK_SIZE, len(payload), CHUNK_DIGEST_SIZE))
        stream = self._stream(sid)
        if stream is not None:
            self._guarded(stream, stream.on_run, bytes(payload[:RUN_CHECK_SIZE]), digests)

    def _on_chunk(self, sid, payload):
        if len(payload) < CHUNK_DIGEST_SIZE + 1:
            raise ProtocolError('short CHUNK')
        digest = bytes(payload[:CHUNK_DIGEST_SIZE])
        chunk = self._unpack_chunk(payload[CHUNK_DIGEST_SIZE], payload[CHUNK_DIGEST_SIZE + 1:])
        stream = self._stream(sid)
        if stream is not None:
            self._guarded(stream, stream.on_chunk, digest, chunk)

    def _unpack_chunk(self, encoding, blob):
        return self._decode_blob(encoding, blob, MAX_CHUNK)

    def _on_ping(self, sid, payload):
        self.send_message(MSG_PONG, 0, bytes(payload[:TUNNEL_PING.size]))

    def _on_pong(self, sid, payload):
        pass                                # last_heard was updated on arrival

    def _keepalive(self):
        if self.closed:
            return
        if time.monotonic() - self.last_heard > PEER_DEAD_AFTER:
            self.close('no word from the peer for %d s' % PEER_DEAD_AFTER)
            return
        self.send_message(MSG_PING, 0, TUNNEL_PING.pack(int(time.time() * 1000)))
        self._ping_timer = self.loop.call_later(PING_INTERVAL, self._keepalive)

    # -- the end ------------------------------------------------------------------

    def close(self, reason):
        """Tear the peer connection down: every stream on it is reset."""
        if self.closed:
            return
        self.closed = True
        self._ping_timer.cancel()
        self.loop.watch(self.sock, 0, None)
        for stream in list(self.streams.values()):
            stream.reset('the peer connection went down', tell_peer=False, log=False)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.writer.close()
        self.sock.close()
        self.collect_stats()
        if self.run_misses:
            self.log('%d runs of references %s made did not follow this side\'s links and were '
                     'spelt out by it' % (self.run_misses, self.peer_name))
        if self.cache_misses:
            self.log('%d chunks %s referred to were missing from this side\'s cache and were '
                     'fetched from it' % (self.cache_misses, self.peer_name))
        self.tunnel.peer_closed(self, reason)


# --- Roles: the tunnel process, near (--peer) and far (--listen) -------------

class TunnelStats:
    """Connections and bytes per direction for this run.  'tunnel-out' is what
    local sockets gave this side (original) and what it put on the peer
    connections for them (transferred, every frame byte and the handshake);
    'tunnel-in' is what came off the peer connections and what local sockets
    took."""

    def __init__(self):
        self.figures = {kind: [0, 0, 0] for kind in STATS_KINDS}

    def add(self, kind, connections=0, original=0, transferred=0):
        figures = self.figures[kind]
        figures[0] += connections
        figures[1] += original
        figures[2] += transferred

    def snapshot(self):
        return {kind: tuple(values) for kind, values in self.figures.items()}


class Tunnel:
    """One `tunnel` process: the event loop, the store (a QueuedChunkStore: the
    loop never waits for the cache file), the stats and the peer connections.
    Subclasses supply the role: NearTunnel (--peer) and FarTunnel (--listen).
    `run()` serves until `stop()`; the figures go to the store every
    STATS_INTERVAL and at the end.

    Methods the peer connections call: peer_ready(peer), peer_closed(peer,
    reason), open_target(peer, sid, host, port) (far side only; see
    accepts_open)."""

    accepts_open = False
    role = ''

    def __init__(self, secret, store, encrypt=True, log=None, threads=None):
        self.secret = SharedSecret.of(secret)
        self.store = store
        self.encrypt = encrypt
        self.log = log or (lambda line: None)
        self.loop = EventLoop()
        self.pool = DeflatePool(default_pool_threads() if threads is None else threads)
        self.links = ChunkLinks()
        self.stats = TunnelStats()
        self.peers = set()
        self.run_id = secrets.token_hex(8)
        self.started = time.time()
        warning = peer_buffer_warning()
        if warning:
            self.log(warning)

    def run(self):
        self._save_stats_later()
        try:
            self.loop.run()
        finally:
            self.shutdown()

    def stop(self):
        self.loop.stop()

    def shutdown(self):
        for peer in list(self.peers):
            peer.close('the tunnel is stopping')
        self._close_listeners()
        self.save_stats()
        self.store.end_run(self.run_id)
        self.store.close()
        self.pool.close()
        self.loop.close()

    def _close_listeners(self):
        pass

    def _save_stats_later(self):
        self.save_stats()
        self.store.check_file()
        self.loop.call_later(STATS_INTERVAL, self._save_stats_later)

    def save_stats(self):
        for peer in self.peers:
            peer.collect_stats()
        self.store.save_run(self.run_id, self.role, self.started, self.stats.snapshot())

    def add_peer(self, sock, keys, peer_name):
        peer = PeerConnection(self, sock, keys, 'client' if self.role == 'peer' else 'server', peer_name)
        # The handshake's bytes count as peer connection bytes too.
        sent, received = (HELLO.size + CLIENT_PROOF.size, SERVER_HELLO.size) if self.role == 'peer' \
            else (SERVER_HELLO.size, HELLO.size + CLIENT_PROOF.size)
        self.stats.add('tunnel-out', transferred=sent)
        self.stats.add('tunnel-in', transferred=received)
        self.peers.add(peer)
        return peer

    def peer_ready(self, peer):
        pass

    def peer_closed(self, peer, reason):
        self.peers.discard(peer)

    def open_target(self, peer, sid, host, port):
        raise ProtocolError('this side does not open connections')

    def spawn(self, work, done):
        """Run work() on a helper thread; done(result, error) then runs on
        the loop.  For the blocking parts: name lookup, connect, handshake."""
        def body():
            try:
                result, error = work(), None
            except Exception as e:              # reported on the loop, not lost with the thread
                result, error = None, e
            self.loop.post(lambda: done(result, error))
        try:
            threading.Thread(target=body, name='tunnel-helper', daemon=True).start()
        except RuntimeError as e:
            # No thread to be had (a process limit, memory): this piece of
            # work fails, the tunnel goes on.
            failure = WanxferError('cannot start a thread: %s' % e)
            self.loop.post(lambda: done(None, failure))


class NearTunnel(Tunnel):
    """The --peer side: listens on each -L address like `ssh -L`, carries every
    accepted connection over the peer connection to its target, and keeps the
    peer connection up, reconnecting with back-off.  Connections accepted while
    the peer connection is down wait for it up to PENDING_STREAM_WAIT."""

    role = 'peer'

    def __init__(self, secret, store, peer, forwards, encrypt=True, log=None, threads=None):
        Tunnel.__init__(self, secret, store, encrypt, log, threads)
        self.peer_address = peer
        self.peer = None
        self.listeners = []             # (socket, target host, target port, Acceptor)
        self.addresses = []
        self._pending = collections.deque()     # (deadline, socket, host, port, name)
        self._attempt = 0
        self._dialing = False
        try:
            for bind, port, host, target_port in forwards:
                sock = listen_socket(bind, port)
                # Out of descriptors, accept() fails while the listener stays
                # readable: the Acceptor rests instead of spinning a core.
                acceptor = Acceptor(self.loop, sock, lambda conn, address, h=host, p=target_port:
                                    self._accept(conn, address, h, p), log=self.log)
                self.listeners.append((sock, host, target_port, acceptor))
                self.addresses.append((sock.getsockname()[:2], (host, target_port)))
        except BaseException:
            self._close_listeners()
            raise

    def run(self):
        self._dial()
        Tunnel.run(self)

    def _close_listeners(self):
        for sock, _host, _port, acceptor in self.listeners:
            acceptor.close()
            sock.close()
        self.listeners = []
        while self._pending:
            reset_socket(self._pending.popleft()[1])

    def _accept(self, sock, address, host, port):
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            sock.close()                # reset before we got to it
            return
        name = '%s:%d -> %s:%d' % (address[0], address[1], host, port)
        if self.peer is not None and self.peer.ready and len(self.peer.streams) >= MAX_STREAMS:
            self.log('%d connections carried already: refused %s' % (MAX_STREAMS, name))
            reset_socket(sock)
        elif self.peer is not None and self.peer.ready:
            self.peer.open_stream(sock, host, port, name)
        elif len(self._pending) >= MAX_PENDING_STREAMS:
            reset_socket(sock)
        else:
            self._pending.append((time.monotonic() + PENDING_STREAM_WAIT, sock, host, port, name))
            self.loop.call_later(PENDING_STREAM_WAIT, self._expire_pending)

    def _expire_pending(self):
        now = time.monotonic()
        while self._pending and self._pending[0][0] <= now:
            _deadline, sock, _host, _port, name = self._pending.popleft()
            self.log('no peer connection for %d s: dropped %s' % (PENDING_STREAM_WAIT, name))
            reset_socket(sock)

    def _dial(self):
        if self._dialing or self.loop.stopping:
            return
        self._dialing = True
        host, port = self.peer_address
        secret, encrypt = self.secret, self.encrypt

        def work():
            sock = connect_racing(host, port, CONNECT_TIMEOUT, prepare=tune_peer_socket)
            try:
                keys, _rtt = client_handshake(sock, secret, encrypt)
            except BaseException:
                sock.close()
                raise
            return sock, keys

        self.spawn(work, self._dialed)

    def _dialed(self, result, error):
        self._dialing = False
        if self.loop.stopping:
            if result:
                result[0].close()
            return
        if error is not None:
            self._retry('%s' % describe_error(error))
            return
        sock, keys = result
        try:
            self.peer = self.add_peer(sock, keys, '%s:%d' % self.peer_address)
        except NoThread as e:
            sock.close()
            self._retry(str(e))
            return
        self.log('peer connection up: %s:%d' % self.peer_address)

    def peer_ready(self, peer):
        while self._pending:
            _deadline, sock, host, port, name = self._pending.popleft()
            peer.open_stream(sock, host, port, name)

    def peer_closed(self, peer, reason):
        Tunnel.peer_closed(self, peer, reason)
        if peer is not self.peer:
            return
        self.peer = None
        if time.monotonic() - peer.opened_at >= PEER_STABLE:
            self._attempt = 0
        if not self.loop.stopping:
            self._retry(reason)

    def _retry(self, reason):
        delay = RECONNECT_DELAYS[min(self._attempt, len(RECONNECT_DELAYS) - 1)]
        self._attempt += 1
        self.log('peer connection to %s:%d down: %s; reconnecting in %g s'
                 % (self.peer_address + (reason, delay)))
        self.loop.call_later(delay, self._dial)


class FarTunnel(Tunnel):
    """The --listen side: accepts peers (each must pass the handshake, and
    one that fails is logged and dropped), and opens connections only to
    the targets named by --allow, spelled as the peer's -L spells them.
    Peers not yet authenticated wait in a PendingHandshakes gate on the
    loop; only the handshake itself runs on a helper thread."""

    role = 'listen'
    accepts_open = True

    def __init__(self, secret, store, bind, port, allow, encrypt=True, log=None, threads=None):
        Tunnel.__init__(self, secret, store, encrypt, log, threads)
        self.secret.server_salt()               # stretched now, not at the first peer
        self.allow = set((host.lower(), target_port) for host, target_port in allow)
        self.listener = listen_socket(bind, port, tune=True)
        self.address = self.listener.getsockname()[:2]
        self.pending = PendingHandshakes(self.loop, self._handshake, self.log, 'peer %s dropped: %s')
        self.acceptor = Acceptor(self.loop, self.listener, self.pending.admit, self.pending.make_room,
                                 self.log)
        self._connecting = 0
        self._to_connect = collections.deque()  # (stream, host, port) waiting for a helper thread

    def _close_listeners(self):
        self.acceptor.close()
        self.pending.close()
        self.listener.close()

    def _handshake(self, pending):
        secret, encrypt = self.secret, self.encrypt

        def work():
            try:
                pending.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                keys, _rtt = pending.handshake(secret, encrypt)
            except BaseException:
                pending.sock.close()
                raise
            return keys

        self.spawn(work, lambda keys, error: self._handshaken(pending, keys, error))

    def _handshaken(self, pending, keys, error):
        sock, name = pending.sock, pending.name
        if error is not None:
            self.pending.release(pending)       # if no thread could be had to run work()
            sock.close()
            reason = describe_error(error)
            if isinstance(error, ProtocolError) and 'closed' in reason:
                # The client checks our proof first and hangs up when it fails.
                reason = 'it hung up during the handshake (most likely a wrong secret)'
            self.log('peer %s refused: %s' % (name, reason))
            return
        if self.loop.stopping:
            sock.close()
            return
        try:
            self.add_peer(sock, keys, name)
        except NoThread as e:
            # Raised on the loop, it would have ended the tunnel.
            sock.close()
            self.log('peer %s dropped: %s' % (name, e))
            return
        self.log('peer connection up: %s' % name)

    def peer_closed(self, peer, reason):
        Tunnel.peer_closed(self, peer, reason)
        self.log('peer connection from %s down: %s' % (peer.peer_name, reason))

    def open_target(self, peer, sid, host, port):
        target = '%s:%d' % (host, port)
        if (host.lower(), port) not in self.allow:
            self.log('peer %s asked for %s, which --allow does not name: refused'
                     % (peer.peer_name, target))
            peer.send_message(MSG_RESET, sid, ('target %s is not allowed by the --listen side'
                                               % target).encode('utf-8'))
            return
        stream = Stream(peer, sid, None, target)
        peer.streams[sid] = stream
        # Whoever reaches the peer's -L port opens streams: a thread each,
        # held up to CONNECT_TIMEOUT by a silent target, needs a cap.
        self._to_connect.append((stream, host, port))
        self._connect_next()

    def _connect_next(self):
        while self._connecting < MAX_CONNECTING and self._to_connect:
            stream, host, port = self._to_connect.popleft()
            if not stream.closed:
                self._connecting += 1
                self._connect(stream, host, port)

    def _connect(self, stream, host, port):
        def work():
            sock = socket.create_connection((host, port), CONNECT_TIMEOUT)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock

        def done(sock, error):
            self._connecting -= 1
            if stream.closed:
                if sock is not None:
                    sock.close()
            elif error is not None:
                stream.reset('cannot connect to %s: %s' % (stream.name, describe_error(error)))
            else:
                stream.attach(sock)
            self._connect_next()

        self.spawn(work, done)


# ---------------------------------------------------------------------------
# Link emulator
# ---------------------------------------------------------------------------
# A long, lossy path between two processes on one machine, without root.
#
# `LinkEmulator` listens on one port for both TCP and UDP and relays to a
# target.  UDP datagrams go through a `PathShaper` per direction (loss in
# bursts, a rate-limited drop-tail queue, delay, jitter, reordering,
# duplication, corruption) and wait in a `DelayLine` until they are due; one
# thread serves it with `selectors`.  TCP is relayed byte for byte, only late:
# the kernel's TCP would hide any loss anyway.  Nothing here prints; everything
# that happens is counted in `LinkCounters`.
#
# So a byte-for-byte relay is no path to measure kernel TCP on: it never sees
# the loss or the queue.  With root, `PacketLink` makes two network namespaces
# joined by TUN devices, and `PacketRelay` carries their IP packets through
# the same `PathShaper`s and a `DelayLine`, so wanxfer and a plain TCP
# connection cross the same link model as packets (what `demo` compares).


class LinkConditions:
    """What the emulated path does to traffic in one direction (a value).

    Times in milliseconds, fractions 0..1, `rate_bps` in bits per second
    (0 = unlimited).  `burst` is the mean length of a run of lost packets
    (1 = independent losses); the long-run loss fraction stays `loss`.
    `queue_ms` bounds the bottleneck queue when `rate_bps` is set.
    `jitter_ms` moves each packet's delay by up to +-jitter_ms but never
    reorders; only `reorder` does, by holding the chosen packets back an
    extra 1 ms .. `reorder_ms`.  `mtu` is the largest IP packet the path
    carries (datagram + 28 bytes); larger ones are dropped, as a real link
    drops packets that may not be fragmented.  `seed` makes the path repeatable.
    """

    def __init__(self, delay_ms=60.0, loss=0.0, rate_bps=0, queue_ms=50.0, burst=1,
                 duplicate=0.0, reorder=0.0, corrupt=0.0, jitter_ms=0.0, seed=None, mtu=1500):
        for name, value in (('delay_ms', delay_ms), ('rate_bps', rate_bps),
                            ('jitter_ms', jitter_ms)):
            if not value >= 0:          # also rejects NaN
                raise ValueError('%s must be >= 0, not %r' % (name, value))
        if not queue_ms > 0:
            raise ValueError('queue_ms must be > 0, not %r' % (queue_ms,))
        if not burst >= 1:
            raise ValueError('burst must be >= 1, not %r' % (burst,))
        if not 576 <= mtu <= 65535:
            raise ValueError('mtu must be 576..65535, not %r' % (mtu,))
        for name, value in (('loss', loss), ('duplicate', duplicate),
                            ('reorder', reorder), ('corrupt', corrupt)):
            if not 0.0 <= value <= 1.0:
                raise ValueError('%s is a fraction 0..1, not %r' % (name, value))
        # A run of `burst` losses needs at least one delivered packet after it,
        # so the loss fraction can be at most burst / (burst + 1).
        if burst > 1 and 0 < loss < 1 and loss > burst / (burst + 1.0):
            raise ValueError('loss %g cannot come in bursts of %g (at most %.3f)'
                             % (loss, burst, burst / (burst + 1.0)))
        self.delay_ms = float(delay_ms)
        self.loss = float(loss)
        self.rate_bps = rate_bps
        self.queue_ms = float(queue_ms)
        self.burst = float(burst)
        self.duplicate = float(duplicate)
        self.reorder = float(reorder)
        self.corrupt = float(corrupt)
        self.jitter_ms = float(jitter_ms)
        self.seed = seed
        self.mtu = int(mtu)

    @property
    def reorder_ms(self):
        """Most extra delay a reordered packet gets: half the path delay, or 2 ms."""
        return max(2.0, self.delay_ms / 2.0)

    def __repr__(self):
        return ('LinkConditions(delay_ms=%g, loss=%g, rate_bps=%d, queue_ms=%g, burst=%g, '
                'duplicate=%g, reorder=%g, corrupt=%g, jitter_ms=%g, seed=%r, mtu=%d)'
                % (self.delay_ms, self.loss, self.rate_bps, self.queue_ms, self.burst,
                   self.duplicate, self.reorder, self.corrupt, self.jitter_ms, self.seed, self.mtu))


class LinkDirectionCounters:
    """What happened to traffic going one way.  The UDP fields are written by
    the UDP thread alone; `tcp_bytes` only under `LinkCounters.lock`."""

    FIELDS = ('packets_in', 'bytes_in',                 # UDP datagrams read from the sender
              'packets_forwarded', 'bytes_forwarded',   # UDP datagrams sent on, copies included
              'dropped_loss', 'dropped_queue', 'dropped_mtu',
              'duplicated', 'reordered', 'corrupted',
              'send_errors',                            # forwarding failed (buffer full, refused)
              'tcp_bytes')                              # TCP payload relayed
    __slots__ = FIELDS

    def __init__(self):
        for name in self.FIELDS:
            setattr(self, name, 0)

    def as_dict(self):
        return {name: getattr(self, name) for name in self.FIELDS}


class LinkCounters:
    """Everything the emulator did, per direction: `up` is client -> server,
    `down` server -> client.  Plain ints: read them at any time."""

    def __init__(self):
        self.up = LinkDirectionCounters()
        self.down = LinkDirectionCounters()
        self.udp_clients = 0        # live UDP client mappings
        self.tcp_connections = 0    # live relayed TCP connections
        self.tcp_accepted = 0       # TCP connections accepted since start
        self.lock = threading.Lock()   # for fields several threads write

    def as_dict(self):
        return {'up': self.up.as_dict(), 'down': self.down.as_dict(),
                'udp_clients': self.udp_clients,
                'tcp_connections': self.tcp_connections,
                'tcp_accepted': self.tcp_accepted}


class BurstLoss:
    """Decides packet by packet whether the path loses it.

    A two-state (Gilbert) chain: the lossy state is entered with probability
    loss / (burst * (1 - loss)) and left with probability 1 / burst, so runs
    of losses average `burst` packets and the long-run fraction is `loss`.
    With burst 1 both probabilities are `loss`: independent losses.
    """

    __slots__ = ('_rng', '_enter', '_stay', '_lossy')

    def __init__(self, loss, burst, rng):
        self._rng = rng
        self._lossy = False
        if loss >= 1.0:
            self._enter = self._stay = 1.0
        elif burst <= 1.0:
            self._enter = self._stay = loss
        else:
            self._stay = 1.0 - 1.0 / burst
            self._enter = loss / (burst * (1.0 - loss))

    def lost(self):
        self._lossy = self._rng.random() < (self._stay if self._lossy else self._enter)
        return self._lossy


class PathShaper:
    """Plans one direction's datagrams: owns its loss chain, its bottleneck
    queue, its random stream and its counters.  No sockets, no clock:
    `shape(now, data)` returns the (arrival_time, payload) copies to deliver,
    none if the packet is dropped.  `headers`: the bytes of IP and UDP
    header the data handed to shape() lacks (none for whole IP packets)."""

    def __init__(self, conditions, rng, counters, headers=28):
        c = conditions
        self._rng = rng
        self._counters = counters
        self._loss = BurstLoss(c.loss, c.burst, rng) if c.loss > 0 else None
        self._seconds_per_byte = 8.0 / c.rate_bps if c.rate_bps else 0.0
        self._queue_s = c.queue_ms / 1000.0
        self._delay_s = c.delay_ms / 1000.0
        self._jitter_s = c.jitter_ms / 1000.0
        self._reorder = c.reorder
        self._reorder_span_s = (0.001, c.reorder_ms / 1000.0)
        self._duplicate = c.duplicate
        self._corrupt = c.corrupt
        self._max_datagram = c.mtu - headers
        self._last_departure = 0.0    # when the bottleneck finishes its queue
        self._last_arrival = 0.0      # latest in-order arrival, to keep jitter from reordering

    def shape(self, now, data):
        counters = self._counters
        if len(data) > self._max_datagram:
            counters.dropped_mtu += 1
            return ()
        if self._loss is not None and self._loss.lost():
            counters.dropped_loss += 1
            return ()
        departure = now
        if self._seconds_per_byte:
            start = self._last_departure if self._last_departure > now else now
            departure = start + len(data) * self._seconds_per_byte
            # Drop-tail, but an idle bottleneck always takes a packet, however
            # long it is to serialise, or a slow link would carry nothing.
            if start > now and departure - now > self._queue_s:
                counters.dropped_queue += 1
                return ()
            self._last_departure = departure
        arrival = departure + self._delay_s
        rng = self._rng
        if self._jitter_s:
            arrival += rng.uniform(-self._jitter_s, self._jitter_s)
            if arrival < departure:
                arrival = departure
        if self._reorder and rng.random() < self._reorder:
            counters.reordered += 1
            arrival += rng.uniform(*self._reorder_span_s)
        else:
            if arrival < self._last_arrival:
                arrival = self._last_arrival
            self._last_arrival = arrival
        if self._corrupt and data and rng.random() < self._corrupt:
            counters.corrupted += 1
            data = bytearray(data)
            data[rng.randrange(len(data))] ^= rng.randrange(1, 256)
        if self._duplicate and rng.random() < self._duplicate:
            counters.duplicated += 1
            return ((arrival, data), (arrival, data))
        return ((arrival, data),)


def _direction_rng(seed, direction):
    """An independent, repeatable random stream for one direction."""
    if seed is None:
        return random.Random()
    return random.Random('%s/%s' % (seed, direction))


class DelayLine:
    """What an emulated link holds in flight, both relays' (datagrams, IP
    packets): each packet that comes in is shaped (PathShaper), and what
    the shaper lets through waits in a heap until it is due, then goes out
    by the `send` it came with.  `counters` (LinkDirectionCounters) count
    each packet in, and each out or failed.  `add()` and `send_due()` are
    the per-packet path: locals, no calls that can be avoided."""

    def __init__(self):
        self._heap = []             # (due, seq, send, data, counters)
        self._seq = 0               # tie-break so equal due times keep arrival order

    def next_due(self):
        """When the next packet is due, or None if none is in flight."""
        return self._heap[0][0] if self._heap else None

    def add(self, now, packet, shaper, send, counters):
        counters.packets_in += 1
        counters.bytes_in += len(packet)
        push, heap, seq = heapq.heappush, self._heap, self._seq
        for due, data in shaper.shape(now, packet):
            seq += 1
            push(heap, (due, seq, send, data, counters))
        self._seq = seq

    def send_due(self, now):
        heap, pop = self._heap, heapq.heappop
        while heap and heap[0][0] <= now:
            _, _, send, data, counters = pop(heap)
            try:
                send(data)
            except OSError:         # buffer full, refused, or the way out closed meanwhile
                counters.send_errors += 1
                continue
            counters.packets_forwarded += 1
            counters.bytes_forwarded += len(data)

    def clear(self):
        """Lose what is in flight."""
        self._heap = []


class _UdpMapping:
    """One UDP client: its address, the upstream socket the server sees it
    as, and how a datagram goes to it (`send_up`) or back to the client
    (`send_back`)."""

    __slots__ = ('client', 'sock', 'last_seen', 'send_up', 'send_back')

    def __init__(self, client, sock, now, listening):
        self.client = client
        self.sock = sock
        self.last_seen = now
        self.send_up = sock.send
        self.send_back = lambda data: listening.sendto(data, client)


class _UdpRelay:
    """Owns the listening UDP socket, one connected upstream socket per client
    address, the heap of datagrams in flight, and the thread that serves them.

    `poll()` is one turn of the loop; `run()` turns it until `stop()`.
    """

    BATCH = 256                 # datagrams read per readable event, so the heap is served too
    BUFFER_BYTES = 4 << 20
    UPSTREAM_BUFFER_BYTES = 1 << 20
    MAX_DATAGRAM = 65535

    def __init__(self, sock, target, target_family, up, down, counters, idle_timeout=60.0):
        self._sock = sock
        self._target = target
        self._family = target_family
        self._up = up
        self._down = down
        self._counters = counters
        self.idle_timeout = idle_timeout
        self._sweep_every = min(5.0, idle_timeout / 2.0)
        self._next_sweep = time.monotonic() + self._sweep_every
        self._mappings = {}
        self._line = DelayLine()
        self._stopping = False
        self._thread = None
        sock.setblocking(False)
        _enlarge_buffers(sock, self.BUFFER_BYTES)
        self._waker = Waker()
        self._sel = selectors.DefaultSelector()
        self._sel.register(sock, selectors.EVENT_READ, None)
        self._sel.register(self._waker.reader, selectors.EVENT_READ, self._waker)

    def start(self):
        self._thread = threading.Thread(target=self.run, name='linkemu-udp', daemon=True)
        self._thread.start()

    def run(self):
        while not self._stopping:
            self.poll()

    def stop(self):
        """Stop the thread, then close every socket.  Datagrams in flight are lost."""
        self._stopping = True
        self._waker.wake()
        if self._thread is not None:
            self._thread.join()
        for mapping in self._mappings.values():
            mapping.sock.close()
        self._mappings.clear()
        self._counters.udp_clients = 0
        self._line.clear()
        self._sel.close()
        self._sock.close()
        self._waker.close()

    def poll(self, timeout=None):
        """Wait for datagrams or the next due time (at most `timeout`), then
        read what arrived and send what is due."""
        now = time.monotonic()
        wait = self._next_sweep - now
        due = self._line.next_due()
        if due is not None and due - now < wait:
            wait = due - now
        if timeout is not None and timeout < wait:
            wait = timeout
        for key, _ in self._sel.select(wait if wait > 0 else 0):
            data = key.data
            if data is None:
                self._from_clients()
            elif data is not self._waker:
                self._from_server(data)
        now = time.monotonic()
        self._line.send_due(now)
        if now >= self._next_sweep:
            self.expire_idle(now)

    def expire_idle(self, now):
        """Forget clients that neither sent nor received for `idle_timeout`."""
        self._next_sweep = now + self._sweep_every
        limit = now - self.idle_timeout
        for client in [c for c, m in self._mappings.items() if m.last_seen < limit]:
            mapping = self._mappings.pop(client)
            self._sel.unregister(mapping.sock)
            mapping.sock.close()
        self._counters.udp_clients = len(self._mappings)

    def _open_mapping(self, client, now):
        try:
            upstream = socket.socket(self._family, socket.SOCK_DGRAM)
        except OSError:             # out of descriptors: drop, as a full NAT table would
            return None
        try:
            upstream.setblocking(False)
            _enlarge_buffers(upstream, self.UPSTREAM_BUFFER_BYTES)
            upstream.connect(self._target)
        except OSError:
            upstream.close()
            return None
        mapping = _UdpMapping(client, upstream, now, self._sock)
        self._sel.register(upstream, selectors.EVENT_READ, mapping)
        self._mappings[client] = mapping
        self._counters.udp_clients = len(self._mappings)
        return mapping

    def _from_clients(self):
        recvfrom, add, shaper = self._sock.recvfrom, self._line.add, self._up
        mappings, counters = self._mappings, self._counters.up
        now = time.monotonic()
        for _ in range(self.BATCH):
            try:
                data, client = recvfrom(self.MAX_DATAGRAM)
            except OSError:         # would block, or an ICMP error for an earlier send
                break
            mapping = mappings.get(client) or self._open_mapping(client, now)
            if mapping is None:
                counters.packets_in += 1
                counters.bytes_in += len(data)
                counters.send_errors += 1
                continue
            mapping.last_seen = now
            add(now, data, shaper, mapping.send_up, counters)

    def _from_server(self, mapping):
        recv, add, shaper, counters = mapping.sock.recv, self._line.add, self._down, self._counters.down
        now = time.monotonic()
        mapping.last_seen = now
        for _ in range(self.BATCH):
            try:
                data = recv(self.MAX_DATAGRAM)
            except OSError:         # would block, or the server's port is closed
                break
            add(now, data, shaper, mapping.send_back, counters)


class _TcpSplice:
    """Owns one relayed TCP connection: the client's socket, the socket to the
    target, and one pump thread per direction that delivers each chunk a
    fixed delay after reading it.  The last thread out closes both sockets,
    with a reset if either side reset or the emulator is closing."""

    CHUNK = 65536
    HELD_LIMIT = 4 << 20        # bytes in flight per direction before reading pauses

    def __init__(self, client, target, target_family, up_delay, down_delay, counters, on_done):
        self._client = client
        self._server = None
        self._target = target
        self._family = target_family
        self._up_delay = up_delay
        self._down_delay = down_delay
        self._counters = counters
        self._on_done = on_done
        self._aborted = False
        self._connected = threading.Event()
        self._lock = threading.Lock()
        self._running = 2
        self._waker = Waker()
        self._threads = (
            threading.Thread(target=self._run_up, name='linkemu-tcp-up', daemon=True),
            threading.Thread(target=self._run_down, name='linkemu-tcp-down', daemon=True))

    def start(self):
        """Start both pumps; False, the connection reset and forgotten, if a
        thread cannot be had (the emulator goes on)."""
        started = 0
        for thread in self._threads:
            try:
                thread.start()
            except RuntimeError:
                break
            started += 1
        else:
            return True
        self.abort()
        for _missing in range(len(self._threads) - started):
            self._finish()              # as the pump that never ran would have
        return False

    def abort(self):
        """Tear the connection down: both pumps stop and both peers see a reset."""
        self._aborted = True
        self._waker.wake()

    def join(self):
        for thread in self._threads:
            thread.join()

    def _run_up(self):
        try:
            self._server = self._connect()
        except OSError:
            self._server = None
        if self._server is None:
            self._aborted = True    # the client sees a reset, as from a refused connect
        self._connected.set()
        if self._server is not None:
            self._pump(self._client, self._server, self._up_delay, self._counters.up)
        self._finish()

    def _run_down(self):
        self._connected.wait()
        if self._server is not None:
            self._pump(self._server, self._client, self._down_delay, self._counters.down)
        self._finish()

    def _connect(self):
        server = socket.socket(self._family, socket.SOCK_STREAM)
        server.setblocking(False)
        err = server.connect_ex(self._target)
        if err in (errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK):
            # Wait for the connect or an abort, never blocking close().
            with selectors.DefaultSelector() as sel:
                sel.register(server, selectors.EVENT_WRITE)
                sel.register(self._waker.reader, selectors.EVENT_READ)
                ready = sel.select(CONNECT_TIMEOUT)
            if self._aborted or not any(key.fileobj is server for key, _ in ready):
                err = errno.ETIMEDOUT
            else:
                err = server.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            server.close()
            return None
        server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return server

    def _pump(self, src, dst, delay, counters):
        """Copy src to dst, each chunk `delay` seconds after it was read, then
        pass the end of stream on the same way."""
        pending = collections.deque()   # (due, memoryview); a None chunk is end of stream
        held = 0
        reading = writing = eof = False
        sel = selectors.DefaultSelector()
        try:
            sel.register(self._waker.reader, selectors.EVENT_READ)
            while not self._aborted:
                now = time.monotonic()
                blocked = False
                while pending and pending[0][0] <= now:
                    due, chunk = pending[0]
                    if chunk is None:
                        dst.shutdown(socket.SHUT_WR)
                        return
                    try:
                        sent = dst.send(chunk)
                    except BlockingIOError:
                        sent = 0
                    if sent:
                        held -= sent
                        with self._counters.lock:
                            counters.tcp_bytes += sent
                    if sent < len(chunk):
                        pending[0] = (due, chunk[sent:])
                        blocked = True
                        break
                    pending.popleft()
                # Stop reading while too much is held, so a fast sender feels
                # back-pressure instead of filling memory.
                want_read = not eof and held < self.HELD_LIMIT
                if want_read != reading:
                    if want_read:
                        sel.register(src, selectors.EVENT_READ)
                    else:
                        sel.unregister(src)
                    reading = want_read
                if blocked != writing:
                    if blocked:
                        sel.register(dst, selectors.EVENT_WRITE)
                    else:
                        sel.unregister(dst)
                    writing = blocked
                timeout = None
                if pending and not blocked:
                    timeout = max(0.0, pending[0][0] - now)
                for key, _ in sel.select(timeout):
                    if key.fileobj is not src:
                        continue
                    try:
                        data = src.recv(self.CHUNK)
                    except BlockingIOError:
                        continue
                    due = time.monotonic() + delay
                    if data:
                        pending.append((due, memoryview(data)))
                        held += len(data)
                    else:
                        eof = True
                        pending.append((due, None))
        except OSError:             # reset, broken pipe: take the whole connection down
            self.abort()
        finally:
            sel.close()

    def _finish(self):
        with self._lock:
            self._running -= 1
            if self._running:
                return
        for sock in (self._client, self._server):
            if sock is None:
                continue
            if self._aborted:
                reset_socket(sock)
            else:
                sock.close()
        self._waker.close()
        self._on_done(self)


class _TcpRelay:
    """Owns the listening TCP socket, its accept thread and the live splices:
    at most MAX_CONNECTIONS (two threads each), more are reset at once.  An
    accept() failing for want of resources rests the accept thread rather
    than spinning, as Acceptor does for serve."""

    MAX_CONNECTIONS = 256

    def __init__(self, sock, target, target_family, up_delay, down_delay, counters):
        self._sock = sock
        self._target = target
        self._family = target_family
        self._up_delay = up_delay
        self._down_delay = down_delay
        self._counters = counters
        self._splices = set()
        self._lock = threading.Lock()
        self._stopping = False
        self._thread = None
        self._rest = 0.0
        sock.setblocking(False)
        self._waker = Waker()

    def start(self):
        self._thread = threading.Thread(target=self._run, name='linkemu-tcp-accept',
                                        daemon=True)
        self._thread.start()

    def stop(self):
        """Stop accepting, reset every live connection, join every thread."""
        self._stopping = True
        self._waker.wake()
        if self._thread is not None:
            self._thread.join()
        self._sock.close()
        self._waker.close()
        with self._lock:
            splices = list(self._splices)
        for splice in splices:
            splice.abort()
        for splice in splices:
            splice.join()

    def _run(self):
        with selectors.DefaultSelector() as sel:
            sel.register(self._sock, selectors.EVENT_READ)
            sel.register(self._waker.reader, selectors.EVENT_READ)
            while not self._stopping:
                for key, _ in sel.select():
                    if key.fileobj is self._sock and not self._stopping:
                        self._accept()
                if self._rest and not self._stopping:
                    # The listener stays readable while accept() cannot
                    # succeed: wait (or for stop()) before trying again.
                    sel.unregister(self._sock)
                    sel.select(self._rest)
                    sel.register(self._sock, selectors.EVENT_READ)

    def _accept(self):
        try:
            client, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self._rest = min(max(self._rest * 2, ACCEPT_REST[0]), ACCEPT_REST[1])
            return                  # else the client gave up already: the next is fine
        self._rest = 0.0
        with self._lock:
            full = len(self._splices) >= self.MAX_CONNECTIONS
        if full:
            reset_socket(client)
            return
        try:
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            splice = _TcpSplice(client, self._target, self._family, self._up_delay,
                                self._down_delay, self._counters, self._forget)
        except OSError:             # out of descriptors for its waker: this one is refused
            reset_socket(client)
            return
        with self._lock:
            self._splices.add(splice)
        with self._counters.lock:
            self._counters.tcp_accepted += 1
            self._counters.tcp_connections += 1
        splice.start()

    def _forget(self, splice):
        with self._lock:
            self._splices.discard(splice)
        with self._counters.lock:
            self._counters.tcp_connections -= 1


class LinkEmulator:
    """Owns one emulated path: a TCP relay and a UDP relay on the same port
    number in front of (target_host, target_port).

    Methods for the caller: `start()` (returns self; then `port` is the bound
    port), `close()`, or use it as a context manager.  `counters` can be read
    at any time.  `conditions` shape client -> server traffic and
    `reverse_conditions` server -> client (by default the same).
    """

    BIND_ATTEMPTS = 20          # ephemeral TCP ports whose UDP twin may be taken
    udp_idle_timeout = 60.0     # seconds before a silent UDP client is forgotten

    def __init__(self, target_host, target_port, conditions, listen_host='127.0.0.1',
                 listen_port=0, reverse_conditions=None):
        self.target_host = target_host
        self.target_port = int(target_port)
        self.conditions = conditions
        self.reverse_conditions = (conditions if reverse_conditions is None
                                   else reverse_conditions)
        self.listen_host = listen_host
        self.port = int(listen_port)
        self.counters = LinkCounters()
        self._udp = None
        self._tcp = None
        self._started = False

    @property
    def address(self):
        return (self.listen_host, self.port)

    def start(self):
        if self._started:
            raise RuntimeError('LinkEmulator already started')
        self._started = True
        tcp_target = self._resolve(self.target_host, self.target_port, socket.SOCK_STREAM)
        udp_target = self._resolve(self.target_host, self.target_port, socket.SOCK_DGRAM)
        tcp_sock, udp_sock = self._bind_pair()
        up = PathShaper(self.conditions, _direction_rng(self.conditions.seed, 'up'),
                        self.counters.up)
        down = PathShaper(self.reverse_conditions,
                          _direction_rng(self.reverse_conditions.seed, 'down'),
                          self.counters.down)
        try:
            self._udp = _UdpRelay(udp_sock, udp_target[1], udp_target[0], up, down,
                                  self.counters, self.udp_idle_timeout)
            self._tcp = _TcpRelay(tcp_sock, tcp_target[1], tcp_target[0],
                                  self.conditions.delay_ms / 1000.0,
                                  self.reverse_conditions.delay_ms / 1000.0, self.counters)
        except BaseException:
            udp_sock.close()
            tcp_sock.close()
            if self._udp is not None:
                self._udp.stop()
                self._udp = None
            raise
        self._udp.start()
        self._tcp.start()
        return self

    def close(self):
        """Stop both relays and join their threads; every socket is closed."""
        udp, self._udp = self._udp, None
        tcp, self._tcp = self._tcp, None
        if tcp is not None:
            tcp.stop()
        if udp is not None:
            udp.stop()

    def __enter__(self):
        return self if self._started else self.start()

    def __exit__(self, *exc_info):
        self.close()

    @staticmethod
    def _resolve(host, port, socktype):
        """(family, sockaddr) for host:port, resolved once before any thread runs."""
        family, _, _, _, sockaddr = socket.getaddrinfo(host, port, 0, socktype)[0]
        return family, sockaddr

    def _bind_pair(self):
        """A listening TCP socket and a UDP socket bound to the same port."""
        family, sockaddr = self._resolve(self.listen_host or None, self.port,
                                         socket.SOCK_STREAM)
        attempts = self.BIND_ATTEMPTS if self.port == 0 else 1
        error = None
        for _ in range(attempts):
            tcp = socket.socket(family, socket.SOCK_STREAM)
            udp = None
            try:
                # So `demo` can be rerun at once on a fixed port despite TIME_WAIT.
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                tcp.bind(sockaddr)
                tcp.listen(64)
                port = tcp.getsockname()[1]
                udp = socket.socket(family, socket.SOCK_DGRAM)
                udp.bind((sockaddr[0], port) + tuple(sockaddr[2:]))
            except OSError as exc:
                tcp.close()
                if udp is not None:
                    udp.close()
                error = exc
                continue
            self.port = port
            return tcp, udp
        raise error


# --- Packet link: kernel TCP across the same model (root, Linux) -------------

PACKET_LINK_PREFIX = 'wxdemo-'          # namespace names: another tool owns wan-a and wan-b
PACKET_LINK_DEVICE = 'wan0'
PACKET_LINK_ADDRESSES = ('198.18.14.1', '198.18.14.2')  # side a (the server's), side b
CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454ca
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
# What `wan` gives TCP too: windows may grow past the bandwidth-delay product
# of a long fast path (the kernel's default maximum would cap the TCP side).
PACKET_LINK_TCP_BUFFERS = (('tcp_rmem', '4096 131072 67108864'),
                           ('tcp_wmem', '4096 65536 67108864'))


def packet_link_unavailable():
    """None if this process can make a PacketLink, else what it lacks."""
    if not sys.platform.startswith('linux'):
        return 'Linux'
    if os.geteuid() != 0:
        return 'root'
    if shutil.which('ip') is None:
        return 'ip(8)'
    if fcntl is None or not os.path.exists('/dev/net/tun'):
        return 'TUN devices (/dev/net/tun)'
    return None


def enter_netns(name):
    """Move the calling thread (only it) into the network namespace `name`."""
    fd = os.open(os.path.join('/var/run/netns', name), os.O_RDONLY)
    try:
        if hasattr(os, 'setns'):                # 3.12
            os.setns(fd, CLONE_NEWNET)
            return
        import ctypes                           # only here: most runs never need it
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            raise OSError(code, 'setns %s: %s' % (name, os.strerror(code)))
    finally:
        os.close(fd)


def run_in_netns(name, function, *args):
    """function(*args) on a thread of its own inside the namespace `name`
    (the caller's stays where it is): its result, or what it raised."""
    outcome = []

    def body():
        try:
            enter_netns(name)
            outcome.append((True, function(*args)))
        except BaseException as e:              # handed to the caller
            outcome.append((False, e))
    thread = threading.Thread(target=body, name='netns-' + name, daemon=True)
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def open_tun(device):
    """A non-blocking descriptor of the TUN `device` of the calling
    thread's namespace: one read or write is one IP packet."""
    fd = os.open('/dev/net/tun', os.O_RDWR | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack('16sH', device.encode(), IFF_TUN | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


def _tune_tcp_buffers():
    for name, value in PACKET_LINK_TCP_BUFFERS:
        with open('/proc/sys/net/ipv4/' + name, 'w') as f:
            f.write(value)


class PacketLink:
    """Two network namespaces, `names` (a, the server's side, and b), each
    with a TUN device and one address of `addresses`, routed to the other;
    nothing carries their packets until a PacketRelay reads both devices.
    `start()` makes them (returns self), `close()` removes them whatever
    happened, which also ends whatever still ran inside.  Root only (see
    packet_link_unavailable)."""

    def __init__(self, mtu=1500):
        tag = '%d-%s' % (os.getpid(), secrets.token_hex(3))
        self.names = (PACKET_LINK_PREFIX + tag + '-a', PACKET_LINK_PREFIX + tag + '-b')
        self.addresses = PACKET_LINK_ADDRESSES
        self.mtu = mtu
        self._made = []

    def start(self):
        try:
            for name, here, there in ((self.names[0],) + self.addresses,
                                      (self.names[1],) + self.addresses[::-1]):
                self._ip('netns', 'add', name)
                self._made.append(name)
                self._ip('-n', name, 'link', 'set', 'lo', 'up')
                self._ip('-n', name, 'tuntap', 'add', 'dev', PACKET_LINK_DEVICE, 'mode', 'tun')
                self._ip('-n', name, 'addr', 'add', here, 'peer', there, 'dev', PACKET_LINK_DEVICE)
                self._ip('-n', name, 'link', 'set', PACKET_LINK_DEVICE, 'up', 'mtu', str(self.mtu))
                run_in_netns(name, _tune_tcp_buffers)
        except BaseException:
            self.close()
            raise
        return self

    def close(self):
        while self._made:
            name = self._made.pop()
            subprocess.run(['ip', 'netns', 'del', name], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.close()

    @staticmethod
    def _ip(*argv):
        done = subprocess.run(('ip',) + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True)
        if done.returncode:
            raise TransferError('ip %s: %s' % (' '.join(argv),
                                               done.stderr.strip() or done.returncode))


class PacketRelay:
    """Carries IP packets between two descriptors (a PacketLink's TUN
    devices, or in tests anything where one read is one packet) through a
    PathShaper each way: a to b is `down` (server to client, as in
    LinkEmulator), b to a is `up`.  `poll()` is one turn of the loop,
    `run()` turns it until `stop()`; `counters` can be read at any time."""

    BATCH = 256                 # packets read per readable event, so the heap is served too
    MAX_PACKET = 65535

    def __init__(self, fd_a, fd_b, conditions, reverse_conditions=None):
        reverse = conditions if reverse_conditions is None else reverse_conditions
        self.counters = LinkCounters()
        self._fds = (fd_a, fd_b)
        # Whole IP packets: no header is missing from what shape() counts.
        down, up = self.counters.down, self.counters.up
        self._shapers = {
            fd_a: (PathShaper(conditions, _direction_rng(conditions.seed, 'down'), down,
                              headers=0), functools.partial(os.write, fd_b), down),
            fd_b: (PathShaper(reverse, _direction_rng(reverse.seed, 'up'), up, headers=0),
                   functools.partial(os.write, fd_a), up)}
        self._line = DelayLine()
        self._stopping = False
        self._waker = Waker()
        self._sel = selectors.DefaultSelector()
        for fd in self._fds:
            os.set_blocking(fd, False)
            self._sel.register(fd, selectors.EVENT_READ, fd)
        self._sel.register(self._waker.reader, selectors.EVENT_READ, None)

    def run(self):
        while not self._stopping:
            self.poll()

    def stop(self):
        """Ends run() (from another thread or a signal handler)."""
        self._stopping = True
        self._waker.wake()

    def close(self):
        self._sel.close()
        self._waker.close()

    def poll(self, timeout=None):
        """Wait for packets or the next due time (at most `timeout`), then
        read what arrived and write what is due."""
        now = time.monotonic()
        wait, due = timeout, self._line.next_due()
        if due is not None and (wait is None or due - now < wait):
            wait = due - now
        for key, _ in self._sel.select(None if wait is None else max(0.0, wait)):
            if key.data is None:
                self._waker.drain()
            else:
                self._read(key.data)
        self._line.send_due(time.monotonic())

    def _read(self, fd):
        shaper, send, counters = self._shapers[fd]
        read, add = os.read, self._line.add
        now = time.monotonic()
        for _ in range(self.BATCH):
            try:
                packet = read(fd, self.MAX_PACKET)
            except (BlockingIOError, InterruptedError):
                break
            if not packet:
                break
            add(now, packet, shaper, send, counters)


# ---------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------
# Everything a person reads: progress lines, the per-file summary in the
# words Tsunami's users know, and sizes and rates in human units.  One summary
# dict feeds both the human report and --json.


def printable(text):
    """`text` fit for a terminal: what does not print (control characters,
    a lone surrogate from an undecodable file name) escaped as Python
    escapes it, so an error line from a peer or a file's name cannot move
    the cursor, retitle the window or clear the screen."""
    text = str(text)
    if text.isprintable():
        return text
    return ''.join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def human_bytes(n):
    for unit in ('B', 'KB', 'MB', 'GB', 'TB'):
        if abs(n) < 1000 or unit == 'TB':
            return ('%d %s' if unit == 'B' else '%.2f %s') % (n, unit)
        n /= 1000.0


def human_rate(bits_per_second):
    for unit in ('bit/s', 'kbit/s', 'Mbit/s', 'Gbit/s'):
        if bits_per_second < 1000 or unit == 'Gbit/s':
            return '%.1f %s' % (bits_per_second, unit)
        bits_per_second /= 1000.0


def parse_quantity(text, units, suffixes, what, example):
    """A positive number with an optional unit letter and suffix, e.g. '1.5G'."""
    value = text.strip().lower()
    for suffix in suffixes:
        if value.endswith(suffix) and len(value) > len(suffix):
            value = value[:-len(suffix)]
            break
    unit = value[-1:] if value[-1:] in units else ''
    try:
        number = float(value[:len(value) - len(unit)])
    except ValueError:
        number = -1.0
    if not 0 < number < float('inf'):
        raise UsageError('invalid %s %r: use a positive number like %s' % (what, text, example))
    return number * units[unit]


def parse_rate(text):
    """'300M', '1.5G', '800k', '100000' -> bits per second (decimal units)."""
    return parse_quantity(text, {'': 1, 'k': 1e3, 'm': 1e6, 'g': 1e9, 't': 1e12},
                          ('bit/s', 'bps', 'b'), 'rate', '300M or 1.5G (bits per second)')


def parse_size(text):
    """'64M', '1G', '4096' -> bytes (binary units)."""
    return int(parse_quantity(text, {'': 1, 'k': 1 << 10, 'm': 1 << 20, 'g': 1 << 30, 't': 1 << 40},
                              ('ib', 'b'), 'size', '64M or 1G (bytes)'))


def summary_lines(summary):
    """The human form of a transfer summary, modelled on Tsunami's client."""
    seconds = summary['duration_seconds']
    lines = [
        ('Transfer duration', '%.2f seconds' % seconds),
        ('Total packet data', human_bytes(summary['wire_bytes'])),
        ('Goodput data', human_bytes(summary['received_bytes'])),
        ('File data', human_bytes(summary['file_bytes'])),
        ('Throughput', human_rate(summary['throughput_mbps'] * 1e6)),
        ('Goodput w/ restarts', human_rate(summary['goodput_mbps'] * 1e6)),
        ('Final file rate', human_rate(summary['file_rate_mbps'] * 1e6)),
        ('Packets lost / retransmitted', '%d / %d' % (summary['packets_lost'],
                                                      summary['packets_retransmitted'])),
        ('Transfer mode', 'lossless, verified (sha256)%s' % (
            ', encrypted (%s)' % summary['cipher'].upper() if summary['encrypted'] else ', not encrypted')),
    ]
    if summary.get('resumed_bytes'):
        lines.insert(3, ('Resumed from disk', human_bytes(summary['resumed_bytes'])))
    if summary.get('packets_compressed'):
        lines.insert(-1, ('Packets sent compressed', '%d of %d' % (summary['packets_compressed'],
                                                                   summary['packets_sent'])))
    if summary.get('delta', 'off') != 'off':
        found = summary['local_bytes'] + summary['zero_bytes']
        lines.insert(3, ('Found locally', '%s (%s of zeros), %s spans' % (
            human_bytes(found), human_bytes(summary['zero_bytes']), summary['delta'])))
        saved = summary['file_bytes'] - summary['sent_bytes']
        lines.append(('Delta', 'transferred %s, saving %.1f%% of bandwidth by sending %s %s' % (
            human_bytes(summary['sent_bytes']), summary['saving_percent'],
            human_bytes(abs(saved)), 'fewer' if saved >= 0 else 'more')))
    width = max(len(label) for label, _ in lines)
    return ['%s: %s' % (summary['file'], 'done')] + \
        ['  %s : %s' % (label.ljust(width), value) for label, value in lines]


class ConsoleEvents(TransferEvents):
    """Progress and summaries for a person (or --json for a script).  On a
    terminal the progress line is redrawn in place; otherwise a plain line
    every few seconds, so logs stay readable."""

    PLAIN_INTERVAL = 5.0

    def __init__(self, json_output=False, quiet=False, stream=None, out=None):
        self.json_output = json_output
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.out = out or sys.stdout
        self.tty = self.stream.isatty()
        self._name = ''
        self._last_plain = 0.0
        self._last = None
        self._drawn = False

    def warning(self, message):
        self._clear()
        self.stream.write('wanxfer: warning: %s\n' % printable(message))

    def file_started(self, remote, dest, size, resumed_bytes):
        self._name = printable(remote)
        self._last = None
        if resumed_bytes and not self.quiet:
            self._clear()
            self.stream.write('%s: resuming, %s of %s already on disk\n'
                              % (self._name, human_bytes(resumed_bytes), human_bytes(size)))

    def progress(self, snapshot):
        if self.quiet:
            return
        now = snapshot['elapsed']
        rate = 0.0
        if self._last is not None and now > self._last[0]:
            rate = (snapshot['received_bytes'] - self._last[1]) * 8 / (now - self._last[0])
        self._last = (now, snapshot['received_bytes'])
        size, held = snapshot['file_bytes'], snapshot['held_bytes']
        percent = 100.0 * held / size if size else 100.0
        eta = '--:--'
        if rate > 0:
            left = (size - held) * 8 / rate
            eta = '%d:%02d' % divmod(int(left), 60)
        line = '%s  %s / %s  %5.1f%%  %s  ETA %s  loss %.1f%%' % (
            self._name, human_bytes(held), human_bytes(size), percent, human_rate(rate), eta,
            100.0 * snapshot['loss'])
        if self.tty:
            self.stream.write('\r\x1b[K' + line)
            self._drawn = True
        elif now - self._last_plain >= self.PLAIN_INTERVAL:
            self._last_plain = now
            self.stream.write(line + '\n')
        self.stream.flush()

    def _clear(self):
        if self._drawn:
            self.stream.write('\r\x1b[K')
            self._drawn = False

    def file_finished(self, summary):
        self._clear()
        if self.json_output:
            self.out.write(json.dumps(summary, sort_keys=True) + '\n')
        elif not self.quiet:
            self.out.write('\n'.join(printable(line) for line in summary_lines(summary)) + '\n')
        self.out.flush()


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------
# argv in, exit status out.  Each command is a short function that builds
# the engine's objects from the arguments and hands them a ConsoleEvents; only
# main() turns a WanxferError into `wanxfer: error: ...` and a status.


def parse_host_port(text, default_port=DEFAULT_PORT):
    """'host', 'host:port', '[v6]:port' -> (host, port)."""
    host, port = text, default_port
    if text.startswith('['):
        host, closed, rest = text[1:].partition(']')
        if not closed or rest[:1] not in ('', ':'):
            raise UsageError('invalid address %r: use [IPv6] or [IPv6]:PORT' % text)
        if rest:
            port = rest[1:]
    elif text.count(':') == 1:
        host, port = text.split(':')
    try:
        port = int(port)
    except ValueError:
        raise UsageError('invalid port in %r' % text)
    if not host or not 0 <= port <= 65535:
        raise UsageError('invalid address %r: use HOST or HOST:PORT' % text)
    return host, port


def check_secret_strength(secret):
    """Refuse a secret too short to survive offline guessing; warn about a
    weak one (a listening end hands its proof to anyone who connects)."""
    weakness = secret_weakness(secret)
    if weakness is None:
        return
    refuse, reason = weakness
    if refuse:
        raise UsageError(reason)
    print('wanxfer: warning: %s' % reason, file=sys.stderr, flush=True)


def require_secret(args):
    secret = load_secret(args.secret_file)
    if secret is None:
        raise UsageError('no shared secret: set %s or pass --secret-file FILE (the one `serve` '
                         'printed or was given)' % SECRET_ENV)
    return secret


def command_get(args):
    secret = require_secret(args)
    host, port = parse_host_port(args.server)
    max_rate = parse_rate(args.rate) / 8 if args.rate else None
    events = ConsoleEvents(json_output=args.json, quiet=args.quiet)
    if args.output is not None and len(args.remote) > 1 and os.path.exists(args.output) \
            and not os.path.isdir(args.output):
        raise UsageError('%s is not a directory (several REMOTEs need one)' % args.output)
    store = open_get_cache(args, events)
    client = Client(host, port, secret, encrypt=not args.no_encrypt, timeout=args.timeout,
                    events=events, max_rate=max_rate, store=None if args.no_delta else store,
                    workers=automatic_workers(max_rate) if args.workers is None else args.workers,
                    auto_workers=args.workers is None,
                    salts=None if store is None else SaltMemory(store.path + '.salts'))
    run = secrets.token_hex(8)
    started = time.time()
    totals = [0, 0, 0]                          # files, file bytes, bytes sent for them
    failures = 0
    outcomes = client.get(args.remote, args.output)
    try:
        for outcome in outcomes:
            if isinstance(outcome, RemoteError):
                print('wanxfer: error: %s' % printable(outcome), file=sys.stderr)
                failures += 1
                continue
            events.file_finished(outcome)
            totals = [totals[0] + 1, totals[1] + outcome['file_bytes'],
                      totals[2] + outcome['sent_bytes']]
            if store is not None:
                store.save_run(run, 'get', started, {'get': tuple(totals)})
    finally:
        outcomes.close()                        # what a failed get made is tidied away
        client.close()
        if store is not None:
            store.end_run(run)
            store.close()
    return 1 if failures else 0


def open_get_cache(args, events):
    """The cache `get` builds delta transfers from and counts them in;
    None (with a warning) if it cannot be used: the transfer goes on."""
    path = args.cache or default_cache_path()
    try:
        return ChunkStore(path, parse_size(args.cache_size),
                          log=lambda line: print('wanxfer: ' + printable(line), file=sys.stderr))
    except (CacheError, sqlite3.DatabaseError, OSError) as e:
        events.warning('%s; fetching without delta' % e)
        return None


def server_logger(stream=None):
    stream = stream or sys.stderr
    lock = threading.Lock()

    def log(line):
        text = printable(line)          # client-chosen names must not rewrite the terminal
        with lock:
            stream.write('%s wanxfer: %s\n' % (time.strftime('%Y-%m-%d %H:%M:%S'), text))
            stream.flush()
    return log


def command_serve(args):
    tree = ServedTree(args.paths or ['.'])
    secret = load_secret(args.secret_file)
    generated = None
    if secret is None:
        generated = secrets.token_urlsafe(24)
    else:
        check_secret_strength(secret)
    max_rate = parse_rate(args.rate) / 8 if args.rate else None
    log = server_logger()
    workers = automatic_workers() if args.workers is None else args.workers
    if workers > 1 and not sessions_can_fork():
        log('worker processes cannot be forked here (not Linux); each session sends from one')
        workers = 1
    server = Server(tree, secret or generated.encode(), args.bind, args.port,
                    encrypt=not args.no_encrypt, max_rate=max_rate, log=log,
                    signature_store=SignatureStore(args.cache or default_cache_path(), log),
                    workers=workers)
    if generated is not None:
        host = args.bind or socket.gethostname()
        port = '' if server.port == DEFAULT_PORT else ':%d' % server.port
        print('wanxfer: no secret was given, so this server made one (shown only now):\n'
              '  %s=%s\n'
              'Fetch with:\n'
              '  %s=%s python3 wanxfer.py get %s%s REMOTE%s'
              % (SECRET_ENV, generated, SECRET_ENV, generated, host, port,
                 ' --no-encrypt' if args.no_encrypt else ''), flush=True)
    served = ', '.join(real + ('/' if name is None else '') for name, real in tree.roots)
    print('wanxfer: listening on %s:%d (TCP control and UDP data), serving %s'
          % (args.bind or '*', server.port, printable(served)), file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
    return 0


def link_conditions(args):
    """LinkConditions from the emulator options shared by `demo` and `emulate`."""
    # Checked here, in the units the user typed: LinkConditions speaks
    # one-way delays and fractions, and takes an endless delay.
    for option, value, high, meaning in (
            ('--rtt', args.rtt, float('inf'), 'milliseconds, 0 or more'),
            ('--loss', args.loss, 100, 'a percentage, 0 to 100'),
            ('--duplicate', args.duplicate, 100, 'a percentage, 0 to 100'),
            ('--reorder', args.reorder, 100, 'a percentage, 0 to 100'),
            ('--corrupt', args.corrupt, 100, 'a percentage, 0 to 100')):
        if not 0 <= value <= high or value == float('inf'):       # NaN fails the first
            raise UsageError('invalid %s %g: use %s' % (option, value, meaning))
    try:
        return LinkConditions(delay_ms=args.rtt / 2.0, loss=args.loss / 100.0,
                              rate_bps=parse_rate(args.link_rate) if args.link_rate else 0,
                              queue_ms=args.queue, burst=args.burst,
                              duplicate=args.duplicate / 100.0, reorder=args.reorder / 100.0,
                              corrupt=args.corrupt / 100.0, seed=args.seed, mtu=args.mtu)
    except ValueError as e:
        raise UsageError(str(e))


def describe_link(conditions):
    parts = ['%g ms round trip' % (2 * conditions.delay_ms), '%g%% loss' % (100 * conditions.loss)]
    if conditions.burst > 1:
        parts.append('in bursts of %g' % conditions.burst)
    if conditions.rate_bps:
        parts.append('%s bottleneck with a %g ms queue' % (human_rate(conditions.rate_bps),
                                                           conditions.queue_ms))
    for name in ('duplicate', 'reorder', 'corrupt'):
        if getattr(conditions, name):
            parts.append('%g%% %s' % (100 * getattr(conditions, name), name))
    return ', '.join(parts)


def write_random_file(path, size):
    with open(path, 'wb') as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 1 << 20))
            f.write(chunk)
            left -= len(chunk)


class ChildProcess:
    """This file run as another process (`serve`, `emulate`) for `demo`, so
    each end has a core and an interpreter of its own.  The port it
    listens on is read from its 'listening on' line; a child that listens
    on nothing says `ready` instead (then `port` is None).  `prefix` runs
    it through another command (`ip netns exec NAME`)."""

    def __init__(self, argv, env=None, prefix=(), ready='listening on '):
        command = list(prefix) + [sys.executable, os.path.abspath(__file__)] + argv
        self.name = argv[0]
        self._ready = ready
        self.proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        try:
            self.port = self._read_port()
        except BaseException:           # Ctrl-C meanwhile: no child outlives the demo
            self.stop()
            raise

    def _read_port(self):
        selector = selectors.DefaultSelector()
        selector.register(self.proc.stderr, selectors.EVENT_READ)
        deadline = time.monotonic() + 15
        try:
            while time.monotonic() < deadline and selector.select(deadline - time.monotonic()):
                line = self.proc.stderr.readline()
                if not line:
                    break
                if 'listening on ' in line:
                    address = line.split('listening on ', 1)[1].split()[0].rstrip(',')
                    return int(address.rsplit(':', 1)[1])
                if self._ready in line:
                    return None
        finally:
            selector.close()
        self.stop()
        raise TransferError('demo: a helper process did not start: %s' % self.name)

    def stop(self):
        """Interrupt it and return what it printed on stdout."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            out, _err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _err = self.proc.communicate()
        return out


def command_demo(args):
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        # Started in the background: its helpers would ignore SIGINT too,
        # and that is how it stops them (and has them print their counters).
        signal.signal(signal.SIGINT, signal.default_int_handler)
    size = int(parse_size(args.size))
    conditions = link_conditions(args)
    if conditions.loss >= 1:
        raise UsageError('demo --loss %g: nothing would arrive; use less than 100' % args.loss)
    lacking = None if args.no_tcp else packet_link_unavailable()
    if args.tcp_congestion and not lacking and not args.no_tcp:
        available = read_congestion_control('tcp_available_congestion_control').split()
        if args.tcp_congestion not in available:
            raise UsageError('demo --tcp-congestion %s: this kernel offers %s'
                             % (args.tcp_congestion, ', '.join(available) or 'none'))
    workdir = tempfile.mkdtemp(prefix='wanxfer-demo-')
    try:
        free = shutil.disk_usage(workdir).free
        if 2 * size > free:
            raise UsageError('demo --size %s needs %s free for the file and its copy; %s has %s'
                             % (args.size, human_bytes(2 * size), tempfile.gettempdir(),
                                human_bytes(free)))
        source = os.path.join(workdir, 'demo.bin')
        write_random_file(source, size)
        if args.no_tcp or lacking:
            demo_emulated(args, conditions, source, size, workdir)
            if lacking:
                print('demo: no plain TCP beside it: that needs %s (kernel TCP must cross the '
                      'emulated link as packets, between network namespaces joined by TUN '
                      'devices); run the demo with sudo for it, or pass --no-tcp to skip it'
                      % lacking, file=sys.stderr, flush=True)
        else:
            demo_side_by_side(args, conditions, source, size, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def demo_fetch(host, port, secret, args, events, dest, listed=False):
    """The demo's wanxfer transfer of demo.bin to `dest`, as `get` does it
    (an open fetch: no listing first), or `listed` (the listing's round
    trip brings the probes that size the blocks: through the built-in
    emulator, whose MTU is less than the loopback route's that an open
    fetch's blocks are cut for); its summary."""
    client = Client(host, port, secret.encode(), encrypt=not args.no_encrypt, events=events)
    try:
        if listed:
            client.connect()
            return client.fetch('demo.bin', dest, client.listing('demo.bin').files[0])
        outcomes = client.get(['demo.bin'], dest)
        try:
            for outcome in outcomes:
                if isinstance(outcome, RemoteError):
                    raise outcome
                summary = outcome
        finally:
            outcomes.close()
    finally:
        client.close()
    return summary


def demo_check_copy(dest, source, summary, events):
    if file_sha256(dest) != file_sha256(source):
        raise TransferError('demo: the received file differs from the source')
    summary['file'] = 'demo.bin'                # the copy lives in a directory removed below
    events.file_finished(summary)
    os.unlink(dest)                             # room for the next copy


def print_link_counters(counters, what):
    if counters:
        print('Link (server to client)%s: %d packets forwarded, %d lost on the path, %d dropped '
              'by the queue' % (what, counters['packets_forwarded'], counters['dropped_loss'],
                                counters['dropped_queue']))


def demo_emulated(args, conditions, source, size, workdir):
    """wanxfer alone, through the built-in emulator (no root needed)."""
    encrypt = [] if not args.no_encrypt else ['--no-encrypt']
    secret = secrets.token_hex(24)
    children = []
    try:
        server = ChildProcess(['serve', '--bind', '127.0.0.1', '--port', '0', source] + encrypt,
                              env=dict(os.environ, **{SECRET_ENV: secret}))
        children.append(server)
        link = ChildProcess(['emulate', '--to', '127.0.0.1:%d' % server.port] + link_argv(args))
        children.append(link)
        print('demo: a %s file served on loopback through the built-in link emulator: %s'
              % (human_bytes(size), describe_link(conditions)), file=sys.stderr, flush=True)
        events = ConsoleEvents(json_output=args.json, quiet=args.quiet)
        dest = os.path.join(workdir, 'received.bin')
        summary = demo_fetch('127.0.0.1', link.port, secret, args, events, dest, listed=True)
        demo_check_copy(dest, source, summary, events)
        counters = json.loads(children.pop().stop() or '{}').get('down', {})
        if counters and not args.json and not args.quiet:
            print('Link (server to client): %d packets forwarded, %d lost on the path, %d dropped '
                  'by the queue; the received copy is identical to the source'
                  % (counters['packets_forwarded'], counters['dropped_loss'],
                     counters['dropped_queue']))
    finally:
        for child in children:
            child.stop()


DEMO_TCP_TIME = (20.0, 3.0)     # s, and times wanxfer's: plain TCP may take no longer (a loss-
                                # based TCP on a lossy path could take hours); its rate so far counts


def demo_side_by_side(args, conditions, source, size, workdir):
    """wanxfer, then one plain TCP connection, each across the same
    emulated link as IP packets (a PacketLink and a fresh PacketRelay each:
    an empty queue for both); both rates, and the ratio.  Root only."""
    encrypt = [] if not args.no_encrypt else ['--no-encrypt']
    secret = secrets.token_hex(24)
    events = ConsoleEvents(json_output=args.json, quiet=args.quiet)
    children = []
    with PacketLink(conditions.mtu) as link:
        side_a, side_b = link.names
        server_address, _client_address = link.addresses
        in_a = ('ip', 'netns', 'exec', side_a)
        relay_argv = ['link-relay', '--a', side_a, '--b', side_b] + link_argv(args)
        try:
            print('demo: a %s file, fetched by wanxfer and then sent over one plain TCP connection, '
                  'each across the same emulated link as IP packets (two network namespaces joined '
                  'by TUN devices): %s' % (human_bytes(size), describe_link(conditions)),
                  file=sys.stderr, flush=True)
            relay = ChildProcess(relay_argv, ready='ready')
            children.append(relay)
            server = ChildProcess(['serve', '--bind', server_address, '--port', '0', source]
                                  + encrypt, env=dict(os.environ, **{SECRET_ENV: secret}),
                                  prefix=in_a)
            children.append(server)
            dest = os.path.join(workdir, 'received.bin')
            summary = run_in_netns(side_b, demo_fetch, server_address, server.port, secret, args,
                                   events, dest)
            children.remove(server)
            server.stop()
            children.remove(relay)
            wanxfer_link = json.loads(relay.stop() or '{}').get('down', {})
            demo_check_copy(dest, source, summary, events)

            congestion = args.tcp_congestion or run_in_netns(side_a, read_congestion_control)
            if not args.json and not args.quiet:
                print('demo: now plain TCP, one connection (%s congestion control), the same file '
                      'across the same link...' % (congestion if args.tcp_congestion else
                                                   'the kernel\'s ' + congestion), flush=True)
            relay = ChildProcess(relay_argv, ready='ready')
            children.append(relay)
            sender = ChildProcess(['tcp-send', '--bind', server_address, source] +
                                  (['--congestion', congestion] if args.tcp_congestion else []),
                                  prefix=in_a)
            children.append(sender)
            limit = max(DEMO_TCP_TIME[0], DEMO_TCP_TIME[1] * summary['duration_seconds'])
            tcp = run_in_netns(side_b, receive_plain_tcp, (server_address, sender.port), dest,
                               size, limit)
            children.remove(relay)
            tcp_link = json.loads(relay.stop() or '{}').get('down', {})
        finally:
            for child in children:
                child.stop()
    if tcp['received_bytes'] == size and tcp['sha256'] != file_sha256(source):
        raise TransferError('demo: the file sent over TCP arrived different')
    tcp.update(transfer='tcp', congestion_control=congestion, file_bytes=size,
               verified=tcp['received_bytes'] == size,
               wanxfer_to_tcp=round(summary['file_rate_mbps'] / tcp['file_rate_mbps'], 2)
               if tcp['file_rate_mbps'] else None)
    if args.json:
        print(json.dumps(tcp, sort_keys=True), flush=True)
        return
    if args.quiet:
        return
    print_link_counters(wanxfer_link, ' during wanxfer')
    print_link_counters(tcp_link, ' during TCP')
    print(demo_comparison(summary, tcp))


def read_congestion_control(name='tcp_congestion_control'):
    """The calling thread's namespace's default TCP congestion control
    (or another of the kernel's lists of them, by `name`)."""
    try:
        with open('/proc/sys/net/ipv4/' + name) as f:
            return f.read().strip() or 'unknown'
    except OSError:
        return 'unknown'


def receive_plain_tcp(address, dest, size, limit):
    """Read one plain TCP connection's bytes into `dest` for at most
    `limit` seconds from the connect: the figures of that transfer."""
    started = time.monotonic()
    deadline = started + limit
    digest = hashlib.sha256()
    received = 0
    sock = socket.create_connection(address, timeout=CONNECT_TIMEOUT)
    try:
        buffer = bytearray(1 << 20)
        view = memoryview(buffer)
        with open(dest, 'wb') as f:
            while received < size:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                sock.settimeout(left)
                try:
                    n = sock.recv_into(buffer)
                except socket.timeout:
                    break
                if not n:
                    break
                f.write(view[:n])
                digest.update(view[:n])
                received += n
        seconds = max(time.monotonic() - started, 1e-6)
    finally:
        sock.close()
    return {'received_bytes': received, 'duration_seconds': round(seconds, 3),
            'file_rate_mbps': round(received * 8 / seconds / 1e6, 2),
            'complete': received == size, 'sha256': digest.hexdigest()}


def demo_comparison(summary, tcp):
    """The side-by-side lines `demo` ends with."""
    note = '' if tcp['complete'] else ('; stopped there, %s of %s had arrived'
                                       % (human_bytes(tcp['received_bytes']),
                                          human_bytes(tcp['file_bytes'])))
    rows = [('wanxfer', '%s in %.2f s' % (human_rate(summary['file_rate_mbps'] * 1e6),
                                          summary['duration_seconds'])),
            ('plain TCP (%s, 1 connection)' % tcp['congestion_control'],
             '%s in %.2f s%s' % (human_rate(tcp['file_rate_mbps'] * 1e6), tcp['duration_seconds'],
                                 note))]
    if tcp['wanxfer_to_tcp']:
        rows.append(('wanxfer / TCP', '%.2f' % tcp['wanxfer_to_tcp']))
    width = max(len(label) for label, _ in rows)
    return '\n'.join(['Side by side, the same %s file across the same link (file bytes / seconds):'
                      % human_bytes(tcp['file_bytes'])] +
                     ['  %-*s : %s' % (width, label, value) for label, value in rows])


def link_argv(args):
    """The emulated-link options of `demo`, passed on to `emulate`."""
    argv = []
    for name in ('rtt', 'loss', 'link_rate', 'queue', 'burst', 'duplicate', 'reorder', 'corrupt',
                 'mtu', 'seed'):
        value = getattr(args, name)
        if value is not None:
            argv += ['--' + name.replace('_', '-'), str(value)]
    return argv


def command_emulate(args):
    host, port = parse_host_port(args.to)
    bind, _, listen_port = args.listen.rpartition(':')
    try:
        listen_port = int(listen_port)
    except ValueError:
        listen_port = -1
    if not 0 <= listen_port <= 65535:
        raise UsageError('invalid --listen %r: use [ADDR:]PORT' % args.listen)
    conditions = link_conditions(args)
    try:
        socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UsageError('cannot resolve %s: %s' % (host, e.strerror))
    try:
        link = LinkEmulator(host, port, conditions, listen_host=bind or '127.0.0.1',
                            listen_port=listen_port).start()
    except OSError as e:
        raise UsageError('cannot listen on %s: %s' % (args.listen, e.strerror or e))
    print('wanxfer: emulating %s; listening on %s:%d, forwarding to %s:%d'
          % (describe_link(conditions), bind or '127.0.0.1', link.port, host, port),
          file=sys.stderr, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        link.close()
        print(json.dumps(link.counters.as_dict(), sort_keys=True), flush=True)
    return 0


def command_link_relay(args):
    """`demo`'s packet link: the TUN devices of two PacketLink namespaces
    joined through a PacketRelay until interrupted; then its counters as
    JSON on stdout, as `emulate` prints them."""
    conditions = link_conditions(args)
    fds = []
    try:
        for name in (args.a, args.b):
            fds.append(run_in_netns(name, open_tun, PACKET_LINK_DEVICE))
        relay = PacketRelay(fds[0], fds[1], conditions)
        print('wanxfer: emulating %s between %s and %s; ready'
              % (describe_link(conditions), args.a, args.b), file=sys.stderr, flush=True)
        try:
            relay.run()
        except KeyboardInterrupt:
            pass
        finally:
            relay.close()
            print(json.dumps(relay.counters.as_dict(), sort_keys=True), flush=True)
    finally:
        for fd in fds:
            os.close(fd)
    return 0


def command_tcp_send(args):
    """`demo`'s plain TCP sender: the file over the first connection
    accepted on --bind, then close."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if args.congestion:             # the accepted connection inherits it
            listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, args.congestion.encode())
        listener.bind((args.bind, 0))
        listener.listen(1)
        print('wanxfer: listening on %s:%d (plain TCP)' % (args.bind, listener.getsockname()[1]),
              file=sys.stderr, flush=True)
        listener.settimeout(CONNECT_TIMEOUT)
        try:
            conn, _ = listener.accept()
        except socket.timeout:
            raise TransferError('no receiver connected')
        conn.settimeout(None)
        with conn, open(args.path, 'rb') as f:
            try:
                conn.sendfile(f)
            except (BrokenPipeError, ConnectionResetError):
                pass                            # the receiver stopped early (demo's time limit)
    except KeyboardInterrupt:
        pass
    finally:
        listener.close()
    return 0


def add_link_options(parser, rtt, loss, rate):
    group = parser.add_argument_group('emulated link')
    group.add_argument('--rtt', type=float, default=rtt, metavar='MS',
                       help='round-trip time in ms (default %g)' % rtt)
    group.add_argument('--loss', type=float, default=loss, metavar='PCT',
                       help=help_literal('random loss each way in %% (default %g)' % loss))
    group.add_argument('--link-rate', default=rate, metavar='RATE',
                       help='bottleneck rate in bits/s, e.g. 200M (default %s)' % (rate or 'unlimited'))
    group.add_argument('--queue', type=float, default=50.0, metavar='MS',
                       help='drop-tail queue at the bottleneck in ms (default 50)')
    group.add_argument('--burst', type=float, default=1.0, metavar='N',
                       help='mean length of a loss burst (default 1: independent losses)')
    group.add_argument('--duplicate', type=float, default=0.0, metavar='PCT')
    group.add_argument('--reorder', type=float, default=0.0, metavar='PCT')
    group.add_argument('--corrupt', type=float, default=0.0, metavar='PCT')
    group.add_argument('--mtu', type=int, default=1500, metavar='BYTES',
                       help='largest packet the link carries (default 1500)')
    group.add_argument('--seed', type=int, default=None, help='repeatable randomness')

DEFAULT_CACHE_SIZE_TEXT = '4G'


class CommandLineParser(argparse.ArgumentParser):
    """argparse, its usage errors raised for main() to report like every
    other error, in one line (argparse would print the usage and exit)."""

    def error(self, message):
        raise UsageError('%s (see: python3 wanxfer.py%s --help)'
                         % (message, self.prog[len('wanxfer'):]))


def port_number(text):
    """argparse type: a port to listen on, 0 for any free one."""
    port = int(text) if text.isdigit() else -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError('invalid port %r: use 0 to 65535' % text)
    return port


def worker_count(text):
    """--workers: 'auto' (None) or a count from 1 to MAX_WORKERS."""
    if text == 'auto':
        return None
    try:
        count = int(text)
    except ValueError:
        count = 0
    if not 1 <= count <= MAX_WORKERS:
        raise argparse.ArgumentTypeError('expected auto or a number of processes from 1 to %d, '
                                         'not %r' % (MAX_WORKERS, text))
    return count


def positive_seconds(text):
    """argparse type: a time-out, finite (a socket takes no other)."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float('inf'):
        raise argparse.ArgumentTypeError('invalid time %r: use a positive number of seconds' % text)
    return seconds


def help_literal(text):
    """`text` shown as it is in an argparse help string, which argparse
    formats with `%`: a path from the environment may hold a percent sign."""
    return text.replace('%', '%%')


def default_cache_path(environ=None):
    environ = os.environ if environ is None else environ
    base = environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(base, 'wanxfer', 'cache.db')


def parse_listen(text):
    """'[ADDR:]PORT' -> (addr, port); no address means every interface."""
    if text.isdigit():
        if int(text) > 65535:
            raise UsageError('invalid --listen %r: use [ADDR:]PORT' % text)
        return '', int(text)
    host, port = parse_host_port(text)
    return host.strip('[]'), port


def parse_target(text, option):
    """'HOST:PORT' with the port required."""
    if not re.match(r'^(\[[^\]]+\]|[^:\[\]]+):\d+$', text):
        raise UsageError('invalid %s %r: use HOST:PORT' % (option, text))
    return parse_host_port(text)


_FORWARD = re.compile(r'^(?:(\[[^\]]*\]|[^:\[\]]*):)?(\d+):(\[[^\]]+\]|[^:\[\]]+):(\d+)$')


def parse_forward(text):
    """'[BIND:]PORT:HOST:PORT' -> (bind, port, host, port), as in ssh -L;
    the bind address defaults to 127.0.0.1."""
    match = _FORWARD.match(text)
    if not match:
        raise UsageError('invalid -L %r: use [BIND:]PORT:HOST:PORT' % text)
    bind, port, host, target_port = match.groups()
    bind = (bind or '127.0.0.1').strip('[]')
    port, target_port = int(port), int(target_port)
    if port > 65535 or not 0 < target_port <= 65535:
        raise UsageError('invalid port in -L %r' % text)
    return bind, port, host.strip('[]'), target_port


def stats_lines(report):
    """The human form of a cache_report, modelled on cloudstats."""
    cache = report['cache']
    lines = ['Cache %s: %d chunks, %s' % (cache['path'], cache['chunks'],
                                          human_bytes(cache['stored_bytes']))]
    header = '  %-12s %11s %12s %12s %12s %7s' % ('direction', 'connections', 'original',
                                                   'transferred', 'saved', 'saving')

    def table(section):
        rows = [header]
        for kind in STATS_KINDS + ('total',):
            f = section[kind]
            rows.append('  %-12s %11d %12s %12s %12s %6.1f%%' % (
                kind, f['connections'], human_bytes(f['original_bytes']),
                human_bytes(f['transferred_bytes']), human_bytes(f['saved_bytes']),
                f['saving_percent']))
        return rows

    lines += ['', 'Life of the cache'] + table(report['life'])
    for run in report['running']:
        uptime = int(run['uptime_seconds'])
        lines += ['', 'Running tunnel (--%s, pid %d, up %d:%02d:%02d)' % (
            run['role'], run['pid'], uptime // 3600, uptime // 60 % 60, uptime % 60)] + table(run)
    if not report['running']:
        lines += ['', 'No tunnel is running on this cache.']
    return lines


def command_tunnel(args):
    if bool(args.listen) == bool(args.peer):
        raise UsageError('give --listen [ADDR:]PORT (the far side) or --peer HOST:PORT (the near side)')
    if args.listen and (not args.allow or args.forward):
        raise UsageError('--listen takes --allow HOST:PORT (at least one), not -L: it opens '
                         'connections only to the targets it is told to')
    if args.peer and (not args.forward or args.allow):
        raise UsageError('--peer takes -L [BIND:]PORT:HOST:PORT (at least one), not --allow')
    if args.threads is not None and not 0 <= args.threads <= 64:
        raise UsageError('--threads takes 0 (compress on the writer thread) to 64')
    secret = require_secret(args)
    check_secret_strength(secret)
    limit = parse_size(args.cache_size)
    allow = [parse_target(text, '--allow') for text in args.allow]
    forwards = [parse_forward(text) for text in args.forward]
    listen = parse_listen(args.listen) if args.listen else None
    peer = parse_target(args.peer, '--peer') if args.peer else None
    log = server_logger()
    store = QueuedChunkStore(ChunkStore(args.cache or default_cache_path(), limit, log=log))
    try:
        if listen:
            tunnel = FarTunnel(secret, store, listen[0], listen[1], allow,
                               encrypt=not args.no_encrypt, log=log, threads=args.threads)
            log('listening on %s:%d for peers; allowed targets: %s' % (
                tunnel.address + (', '.join('%s:%d' % target for target in allow),)))
        else:
            tunnel = NearTunnel(secret, store, peer, forwards, encrypt=not args.no_encrypt, log=log,
                                threads=args.threads)
            for (bind, port), (host, target_port) in tunnel.addresses:
                log('listening on %s:%d, forwarding to %s:%d via peer %s:%d'
                    % ((bind, port, host, target_port) + peer))
    except BaseException:
        store.close()
        raise
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, frame: tunnel.stop())
    tunnel.run()
    log('stopped')
    return 0


def command_stats(args):
    report = cache_report(args.cache or default_cache_path())
    if args.json:
        print(json.dumps(report, sort_keys=True, indent=2))
    else:
        print('\n'.join(printable(line) for line in stats_lines(report)))
    return 0


def add_cache_option(command, purpose):
    command.add_argument('--cache', metavar='DB',
                         help='%s (default %s)' % (purpose, help_literal(default_cache_path())))


def build_parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument('--secret-file', metavar='FILE',
                        help='read the shared secret from FILE (default: $%s)' % SECRET_ENV)
    common.add_argument('--no-encrypt', action='store_true',
                        help='authenticate only, do not encrypt (must match on both ends)')

    parser = CommandLineParser(
        prog='wanxfer', formatter_class=argparse.RawDescriptionHelpFormatter,
        description='Move data between distant data centres fast: bulk transfer over paced '
                    'UDP, a deduplicating TCP tunnel, and stats.',
        epilog='examples:\n'
               '  python3 wanxfer.py serve /srv/data              # on the host with the data\n'
               '  WANXFER_SECRET=... python3 wanxfer.py get db1.example.com backup.tar\n'
               '  python3 wanxfer.py demo                         # try it on this machine\n'
               '  python3 wanxfer.py tunnel --peer db1:7000 -L 6432:127.0.0.1:5432\n'
               '  python3 wanxfer.py stats                        # what the tunnel saved\n\n'
               'Run `python3 wanxfer.py COMMAND --help` for each command.')
    parser.add_argument('--version', action='version', version='wanxfer ' + __version__)
    commands = parser.add_subparsers(dest='command', metavar='COMMAND')

    serve = commands.add_parser(
        'serve', parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        help='offer files to `get` clients',
        description='Serve files to `get` clients: TCP control and UDP data on one port.',
        epilog='examples:\n'
               '  python3 wanxfer.py serve                      # the current directory\n'
               '  python3 wanxfer.py serve /srv/backups db.tar  # a directory and a file\n'
               '  WANXFER_SECRET=s3cret python3 wanxfer.py serve --port 9000 /data\n\n'
               'Without a secret, serve makes one and prints it with the get command to use.')
    serve.add_argument('paths', nargs='*', metavar='PATH',
                       help='file (served by its name) or directory (its contents); default .')
    serve.add_argument('--bind', default='', metavar='ADDR', help='listen address (default: all)')
    serve.add_argument('--port', type=port_number, default=DEFAULT_PORT, metavar='N',
                       help='TCP and UDP port (default %d; 0 picks a free one)' % DEFAULT_PORT)
    serve.add_argument('--rate', metavar='RATE', help='cap every transfer at RATE bits/s, e.g. 300M')
    serve.add_argument('--workers', type=worker_count, default=None, metavar='N',
                       help='stripe a transfer over at most N processes per session, as the client '
                            'asks (default: auto, one per usable core, at most %d)' % MAX_AUTO_WORKERS)
    add_cache_option(serve, 'where to remember the signatures of served files for delta transfers')
    serve.set_defaults(func=command_serve)

    get = commands.add_parser(
        'get', parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        help='fetch files from a server',
        description='Fetch files or directory trees from a wanxfer server.  Each file is '
                    'verified against the server\'s SHA-256 before it takes its final name; '
                    'an interrupted fetch resumes when the same command runs again.  Only what '
                    'this machine lacks crosses the network: data found in an older copy at the '
                    'destination or in files fetched before (kept in the cache, even after you '
                    'delete them) is copied locally, zeros are left as holes.  Small files '
                    '(up to 256 KiB) of a tree travel together, so they cost about one round '
                    'trip in all, not two each.',
        epilog='examples:\n'
               '  python3 wanxfer.py get db1:46224 backup.tar             # into .\n'
               '  python3 wanxfer.py get db1 backup.tar -o /data/b.tar    # to a file name\n'
               '  python3 wanxfer.py get db1 logs/2026 images -o /data/   # trees and files\n'
               '  python3 wanxfer.py get db1 big.img --rate 500M --json   # capped, for scripts\n'
               '  python3 wanxfer.py get db1 dump.sql -o /data/dump.sql   # again: sends the changes\n\n'
               'exit status: 0 all files verified, 1 a transfer failed, 2 usage error')
    get.add_argument('server', metavar='HOST[:PORT]')
    get.add_argument('remote', nargs='+', metavar='REMOTE',
                     help='path on the server, relative to what it serves')
    get.add_argument('-o', '--output', metavar='DEST',
                     help='file name (one file) or directory (default: current directory)')
    get.add_argument('--rate', metavar='RATE', help='cap the sending rate, e.g. 300M or 1.5G bits/s')
    get.add_argument('--workers', type=worker_count, default=None, metavar='N',
                     help='stripe large files over N processes at each end, each with its own UDP '
                          'flow, within one rate budget (default: auto, one per usable core, at most '
                          '%d, fewer for a --rate one core sends; the server may grant fewer)'
                          % MAX_AUTO_WORKERS)
    get.add_argument('--json', action='store_true', help='one JSON object per file on stdout')
    get.add_argument('-q', '--quiet', action='store_true', help='no progress or summary')
    get.add_argument('--timeout', type=positive_seconds, default=DATA_TIMEOUT, metavar='SECONDS',
                     help='give up after this long without data (default %d)' % DATA_TIMEOUT)
    get.add_argument('--no-delta', action='store_true',
                     help='send every byte: do not build files from older copies or the cache')
    add_cache_option(get, 'cache of received files for delta transfers, shared with the tunnel')
    get.add_argument('--cache-size', default=DEFAULT_CACHE_SIZE_TEXT, metavar='SIZE',
                     help='keep received files (hard links) up to SIZE in all (default %s)'
                          % DEFAULT_CACHE_SIZE_TEXT)
    get.set_defaults(func=command_get)

    demo = commands.add_parser(
        'demo', parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        help='a real transfer on this machine through an emulated long, lossy link',
        description='Serve a generated file on loopback, fetch it through the built-in link '
                    'emulator (UDP and TCP relays that add delay, loss and a bottleneck), verify '
                    'it, and print the summary a real transfer prints.  Needs no root.  As root '
                    '(Linux, ip(8) and TUN devices), the link carries IP packets between two '
                    'network namespaces instead, and after wanxfer one plain TCP connection '
                    'sends the same file across it: both rates side by side.',
        epilog='examples:\n'
               '  python3 wanxfer.py demo\n'
               '  sudo python3 wanxfer.py demo                  # and plain TCP beside it\n'
               '  python3 wanxfer.py demo --rtt 300 --loss 2 --size 1G --link-rate 500M')
    demo.add_argument('--size', default='256M', help='size of the generated file (default 256M)')
    demo.add_argument('--json', action='store_true',
                      help='print the summary as JSON (and plain TCP\'s as a second object)')
    demo.add_argument('-q', '--quiet', action='store_true', help='no progress or summary')
    demo.add_argument('--no-tcp', action='store_true',
                      help='skip plain TCP across the same link (which needs root)')
    demo.add_argument('--tcp-congestion', metavar='NAME',
                      help='plain TCP\'s congestion control, e.g. cubic (default: the kernel\'s)')
    add_link_options(demo, rtt=120.0, loss=1.0, rate='200M')
    demo.set_defaults(func=command_demo)

    # demo's helpers, run as processes of their own (no help: not for people).
    relay = commands.add_parser('link-relay')
    relay.add_argument('--a', required=True, metavar='NETNS', help='the server\'s side')
    relay.add_argument('--b', required=True, metavar='NETNS', help='the client\'s side')
    add_link_options(relay, rtt=120.0, loss=1.0, rate=None)
    relay.set_defaults(func=command_link_relay)
    tcp_send = commands.add_parser('tcp-send')
    tcp_send.add_argument('path', metavar='FILE')
    tcp_send.add_argument('--bind', default='127.0.0.1', metavar='ADDR')
    tcp_send.add_argument('--congestion', metavar='NAME')
    tcp_send.set_defaults(func=command_tcp_send)

    emulate = commands.add_parser(
        'emulate', formatter_class=argparse.RawDescriptionHelpFormatter,
        help='relay TCP and UDP to a server through an emulated link (no root)',
        description='Listen on one port for TCP and UDP and relay both to --to, adding delay, '
                    'loss and a bottleneck to the UDP datagrams and delay to TCP.  Prints the '
                    'link counters as JSON when stopped.',
        epilog='examples:\n'
               '  python3 wanxfer.py emulate --to 127.0.0.1:46224 --listen 46225 --rtt 120 --loss 1\n'
               '  python3 wanxfer.py get 127.0.0.1:46225 file.bin')
    emulate.add_argument('--to', required=True, metavar='HOST:PORT', help='the server to relay to')
    emulate.add_argument('--listen', default='0', metavar='[ADDR:]PORT',
                         help='where to listen (default: a free port on 127.0.0.1)')
    add_link_options(emulate, rtt=120.0, loss=1.0, rate=None)
    emulate.set_defaults(func=command_emulate)

    tunnel = commands.add_parser(
        'tunnel', parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        help='forward TCP between two peers, compressed and deduplicated',
        description='Forward TCP connections between two peers over one authenticated, encrypted '
                    'link.  Each direction is cut into content-defined chunks; a chunk either side '
                    'has seen before (in any connection, even before a restart) crosses as a '
                    'reference to the chunk cache, the rest compressed.',
        epilog='examples:\n'
               '  # far side (next to the database): accept peers on 7000, allow one target\n'
               '  python3 wanxfer.py tunnel --listen 7000 --allow 127.0.0.1:5432\n'
               '  # near side: local port 6432 reaches 127.0.0.1:5432 as seen from the far side\n'
               '  python3 wanxfer.py tunnel --peer db1.example.com:7000 -L 6432:127.0.0.1:5432\n\n'
               'Both sides need the same secret ($%s or --secret-file) and the same '
               '--no-encrypt setting.' % SECRET_ENV)
    tunnel.add_argument('--listen', metavar='[ADDR:]PORT',
                        help='far side: accept peers here (all interfaces unless ADDR)')
    tunnel.add_argument('--allow', action='append', default=[], metavar='HOST:PORT',
                        help='far side: a target peers may open (repeat for more); nothing else is')
    tunnel.add_argument('--peer', metavar='HOST:PORT', help='near side: the far side\'s --listen address')
    tunnel.add_argument('-L', dest='forward', action='append', default=[],
                        metavar='[BIND:]PORT:HOST:PORT',
                        help='near side: listen on BIND:PORT (default 127.0.0.1) and carry each '
                             'connection to HOST:PORT as the far side sees it (repeat for more)')
    add_cache_option(tunnel, 'chunk cache file')
    tunnel.add_argument('--cache-size', default=DEFAULT_CACHE_SIZE_TEXT, metavar='SIZE',
                        help='evict least recently used chunks past SIZE (default %s)'
                             % DEFAULT_CACHE_SIZE_TEXT)
    tunnel.add_argument('--threads', type=int, metavar='N',
                        help='compression threads (default: one per core, at most 4; 0: each '
                             'peer connection compresses on its writer thread)')
    tunnel.set_defaults(func=command_tunnel)

    stats = commands.add_parser(
        'stats', formatter_class=argparse.RawDescriptionHelpFormatter,
        help='what the tunnel and get carried and saved',
        description='Connections (files, for get), original and transferred bytes and the saving, '
                    'per direction of the tunnel, for get, and in total, for the life of the cache '
                    'and for each tunnel running on it (a running tunnel updates them every few '
                    'seconds).',
        epilog='examples:\n'
               '  python3 wanxfer.py stats\n'
               '  python3 wanxfer.py stats --cache /var/cache/wanxfer.db --json')
    add_cache_option(stats, 'chunk cache file')
    stats.add_argument('--json', action='store_true', help='one JSON object for scripts')
    stats.set_defaults(func=command_stats)
    return parser, commands


def main(argv=None):
    survive_thread_exits_without_descriptors()
    parser, _commands = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, 'func', None):
            parser.print_help()
            return 2
        return args.func(args)
    except WanxferError as e:
        print('wanxfer: error: %s' % printable(e), file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print('\nwanxfer: interrupted; partial data is kept, run the same command to resume',
              file=sys.stderr)
        return 130
    except OSError as e:
        print('wanxfer: error: %s' % printable(e.strerror or e), file=sys.stderr)
        return 1


if __name__ == '__main__':
    sys.exit(main())
