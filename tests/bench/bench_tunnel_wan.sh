#!/bin/sh
# Incompressible data through `wanxfer.py tunnel` across an emulated WAN.
#
#   sh tests/bench/bench_tunnel_wan.sh [SIZE_MB] [wanemu options]
#   sh tests/bench/bench_tunnel_wan.sh 256 --delay 60 --rate 1000 --loss 1
#   RAW=bbr sh tests/bench/bench_tunnel_wan.sh 256 ...   # plain TCP (bbr or cubic), no tunnel
#
# Like ../shared/wanemu/wan, but with namespaces of its own (wxt-a, wxt-b), so
# it does not disturb a `wan up` link someone else is using.  The far tunnel
# and a sink run in wxt-a (198.18.0.1), the near tunnel and the sender in
# wxt-b.  Needs root, ip(8) and a C compiler.  Prints the goodput of original
# data and the bytes on the link.  wanemu.c is $WANEMU_SRC, else the one in
# shared/wanemu/ beside the checkout or beside a directory above it.
set -e
root=$(cd "$(dirname "$0")/../.." && pwd)
wanemu_src=${WANEMU_SRC:-}
dir=$(dirname "$root")
while [ -z "$wanemu_src" ]; do
    if [ -f "$dir/shared/wanemu/wanemu.c" ]; then wanemu_src=$dir/shared/wanemu/wanemu.c
    elif [ "$dir" = / ]; then echo "wanemu.c not found: set WANEMU_SRC" >&2; exit 2
    else dir=$(dirname "$dir"); fi
done
size_mb=${1:-256}; [ $# -gt 0 ] && shift
[ $# -gt 0 ] || set -- --delay 60 --rate 1000 --loss 1
state=$(mktemp -d /tmp/wxt-wan.XXXXXX)
cleanup() {
    [ -f "$state/emu.pid" ] && kill "$(cat "$state/emu.pid")" 2>/dev/null || true
    for p in far near sink; do [ -f "$state/$p.pid" ] && kill "$(cat "$state/$p.pid")" 2>/dev/null || true; done
    ip netns del wxt-a 2>/dev/null || true
    ip netns del wxt-b 2>/dev/null || true
    rm -rf "$state"
}
trap cleanup EXIT
cc -O2 -pthread -o "$state/wanemu" "$wanemu_src"
for h in a b; do
    ip netns add wxt-$h
    ip -n wxt-$h link set lo up
    ip -n wxt-$h tuntap add dev wan0 mode tun
done
ip -n wxt-a addr add 198.18.0.1 peer 198.18.0.2 dev wan0
ip -n wxt-b addr add 198.18.0.2 peer 198.18.0.1 dev wan0
for h in a b; do
    ip -n wxt-$h link set wan0 up mtu 1500
    ip netns exec wxt-$h sysctl -qw net.ipv4.tcp_rmem="4096 131072 67108864" \
        net.ipv4.tcp_wmem="4096 65536 67108864"
done
"$state/wanemu" wxt-a wan0 wxt-b wan0 "$@" 2>"$state/emu.log" &
echo $! >"$state/emu.pid"
export WANXFER_SECRET=wan-bench-secret
ip netns exec wxt-a python3 -c '
import socket, sys, time
s = socket.socket(); s.bind(("0.0.0.0", 9001)); s.listen(1)
c, _ = s.accept(); total = 0; buf = bytearray(1 << 22)
while True:
    n = c.recv_into(buf)
    if not n: break
    total += n
print("sink: %d bytes" % total, flush=True)
' >"$state/sink.log" 2>&1 &
echo $! >"$state/sink.pid"
ip netns exec wxt-a python3 "$root/wanxfer.py" tunnel --listen 198.18.0.1:7000 \
    --allow 127.0.0.1:9001 --cache "$state/far.db" 2>"$state/far.log" &
echo $! >"$state/far.pid"
ip netns exec wxt-b python3 "$root/wanxfer.py" tunnel --peer 198.18.0.1:7000 \
    -L 9000:127.0.0.1:9001 --cache "$state/near.db" 2>"$state/near.log" &
echo $! >"$state/near.pid"
i=0
until grep -q 'peer connection up' "$state/near.log" 2>/dev/null; do
    i=$((i + 1)); [ $i -lt 100 ] || { cat "$state/near.log" "$state/far.log"; exit 1; }
    sleep 0.1
done
head -c $((size_mb * 1048576)) /dev/urandom >"$state/data"
if [ -n "$RAW" ]; then target=198.18.0.1:9001; else target=127.0.0.1:9000; fi
ip netns exec wxt-b python3 -c '
import socket, sys, time
data = open(sys.argv[1], "rb")
host, port = sys.argv[2].split(":")
c = socket.socket()
if sys.argv[3]:
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, sys.argv[3].encode())
c.connect((host, int(port)))
t = time.monotonic(); c.sendfile(data); c.shutdown(socket.SHUT_WR)
c.recv(1)   # EOF once the far side has delivered everything and closed
el = time.monotonic() - t
n = data.tell()
print("sent %d bytes in %.1f s: %.0f Mbit/s of original data" % (n, el, n * 8 / el / 1e6))
' "$state/data" "$target" "$RAW"
kill "$(cat "$state/near.pid")"; wait "$(cat "$state/near.pid")" 2>/dev/null || true
cat "$state/sink.log"
python3 "$root/wanxfer.py" stats --cache "$state/near.db" | sed -n '3,6p'
echo "link: $*"
