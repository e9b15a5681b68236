#!/usr/bin/env bash
# Memory with many idle keep-alive clients: N connections each send one
# metered request, keep the connection open and stay silent; the
# gateway's RSS is read from /proc before and with them.
#   bench/idle.sh [connections=10000]
cd "$(dirname "$0")/.."
N=${1:-10000}
. bench/common.sh
ulimit -n "$(ulimit -Hn)"  # the gateway and this client each hold N sockets
export CREDITGATE_SERVER__MAX_IN_FLIGHT=$((N * 2))
start_gateway
rss() { awk '/^VmRSS/ {print $2 / 1024 " MB"}' "/proc/$GW_PID/status"; }
echo "== gateway RSS at rest: $(rss)"
python3 - "$N" "$GATEWAY" "$KEY" "$GW_PID" <<'PY'
import asyncio, sys, urllib.request
n, gateway, key, pid = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
host, port = gateway.split(":")
request = (f"GET /rag/q HTTP/1.1\r\nHost: {gateway}\r\nAuthorization: Bearer {key}\r\n\r\n").encode()

def rss():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024

async def one(sem, held):
    async with sem:
        r, w = await asyncio.open_connection(host, int(port))
        w.write(request)
        await w.drain()
        status = await r.readline()
        while (await r.readline()) not in (b"\r\n", b""):
            pass
        await r.readexactly(3)  # "ok\n"
    held.append(w)  # kept open, silent
    return status.startswith(b"HTTP/1.1 200")

async def main():
    held, sem = [], asyncio.Semaphore(200)
    results = await asyncio.gather(*(one(sem, held) for _ in range(n)), return_exceptions=True)
    ok = sum(1 for r in results if r is True)
    await asyncio.sleep(2)  # past the gateway's 1 s before it parks an idle connection
    print(f"== {len(held)} idle keep-alive connections open ({ok} got 200): gateway RSS {rss():.1f} MB")
    metrics = urllib.request.urlopen(f"http://{gateway}/metrics").read().decode()
    for line in metrics.splitlines():
        if line.startswith("creditgate_client_connections{"):
            print(f"   {line}")
    for w in held:
        w.close()

asyncio.run(main())
PY
