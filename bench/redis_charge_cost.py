#!/usr/bin/env python3
"""Redis CPU per charge for lua/charge.lua, and for variants of it.

    pip install redis; python3 bench/redis_charge_cost.py [variants.lua ...]

Starts its own redis-server on a free port, seeds 64 accounts over the 16
shards, sends 30,000 charges with the gateway's arguments, and reads
redis-server's CPU time from /proc: once with one charge per call, once
with 14 per call (what group commit gives under `bench/proxy.sh`), calls
pipelined as the multiplexed connection does under load. Each extra file is
run the same way, so a change to the script can be measured before it is
made.
"""
import os, socket, subprocess, sys, time, uuid

import redis

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close(); return port

port = free_port()
server = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
                          stdout=subprocess.DEVNULL)
time.sleep(0.5)
r = redis.Redis(port=port)

def cpu():
    f = open(f"/proc/{server.pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

NU = 64
tag = lambda u: "{cg:%d}" % (u % 16)
now_ms = lambda: int(time.time() * 1000)

def seed():
    r.flushall()
    for u in range(NU):
        r.hset(f"{tag(u)}:acct:u{u}", mapping=dict(plan="bench", monthly=10**9, bonus=0, period="2026-11",
                                                   day="2026-11-27", used=0, blocked=0))
        r.sadd(f"{tag(u)}:keys:u{u}", "h")

def charge(u, i, deadline):
    """The five keys and eighteen arguments of one charge."""
    t = tag(u)
    keys = [f"{t}:acct:u{u}", f"{t}:keys:u{u}", f"{t}:req:u{u}:{i}", f"{t}:events", f"{t}:rl:u{u}:1"]
    args = ["h", "rag", "", 1, ",bench,", "2026-11-27", "2026-11", now_ms(), str(uuid.uuid4()), f"r{i}",
            "0", f"u{u}", "proxy", "charge", 30, "", 0, deadline]
    return keys, args

def run(name, body, per_call, n=30000):
    seed()
    sha = r.script_load(body)
    c0 = cpu()
    i = 0
    while i < n:
        pipe = r.pipeline(transaction=False)
        deadline = now_ms() + 10_000
        for _ in range(max(1, 50 // per_call)):
            # One call holds charges of one shard only, as the gateway sends them.
            shard = (i // per_call) % 16
            keys, args = [], []
            for j in range(per_call):
                k, a = charge(shard + 16 * ((i + j) % 4), i + j, deadline)
                keys += k
                args += a
            pipe.evalsha(sha, len(keys), *keys, ";bench:-1:1000000000:-1;", 86400, "0", *args)
            i += per_call
        result = pipe.execute()
    print(f"{name:34s} {per_call:3d}/call {(cpu() - c0) / i * 1e6:5.1f} us/charge   last {result[-1][0][:2]}")

for per_call in (1, 14):
    run("lua/charge.lua", open("lua/charge.lua").read(), per_call)
    for path in sys.argv[1:]:
        run(path, open(path).read(), per_call)
    run("(empty script, same arguments)", "return {{'ok'}}", per_call)
server.terminate()
