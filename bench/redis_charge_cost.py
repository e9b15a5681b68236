#!/usr/bin/env python3
"""Redis CPU per charge for lua/charge.lua, and for variants of it.

    pip install redis; python3 bench/redis_charge_cost.py [variants.lua ...]
    INSTRUCTIONS=1 ...   the same under valgrind: instructions per charge


Starts its own redis-server on a free port, seeds 64 accounts over the 16
shards, sends 30,000 charges with the gateway's arguments, and reads
redis-server's CPU time from /proc: once with one charge per call, once
with 14 per call (what group commit gives under `bench/proxy.sh`), calls
pipelined as the multiplexed connection does under load. Each extra file is
run the same way, so a change to the script can be measured before it is
made.

CPU time read from /proc moves by 20 % from run to run on a shared box.
With INSTRUCTIONS=1 redis-server runs under callgrind, which counts the
instructions it executes: slow, but the same count every time, so a change
of a few percent shows. CHARGES and PER_CALL (say "14") set the run's size.
"""
import glob, os, socket, subprocess, sys, tempfile, time, uuid

import redis

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close(); return port

port = free_port()
INSTRUCTIONS = os.environ.get("INSTRUCTIONS") == "1"
OUT = tempfile.mkdtemp(prefix="cg-charge-cost.")
cmd = ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"]
if INSTRUCTIONS:
    cmd = ["valgrind", "--tool=callgrind", "--collect-atstart=yes", f"--callgrind-out-file={OUT}/cg.%p.out"] + cmd
server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
time.sleep(5 if INSTRUCTIONS else 0.5)
r = redis.Redis(port=port)

def instructions():
    """Instructions executed since the last call (callgrind's counters, zeroed each time)."""
    for f in glob.glob(f"{OUT}/cg.*"):
        os.remove(f)
    subprocess.run(["callgrind_control", "-d", str(server.pid)], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["callgrind_control", "-z", str(server.pid)], check=True, stdout=subprocess.DEVNULL)
    total = 0
    for f in glob.glob(f"{OUT}/cg.*"):
        for line in open(f):
            if line.startswith("summary:") or line.startswith("totals:"):
                total = max(total, int(line.split()[1]))
    return total

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
        r.sadd(f"{tag(u)}:keys:u{u}", "h")  # read by scripts before key details
        r.hset(f"{tag(u)}:apikeys:u{u}", "h", "|")

def charge(u, i, t):
    """The three keys and fifteen arguments of one charge."""
    tag_ = tag(u)
    keys = [f"{tag_}:acct:u{u}", f"{tag_}:apikeys:u{u}", f"{tag_}:acct:u{u}"]
    event = f'u{u}\tr{i}\tproxy\t{t}\t2026-11-27\t2026-11\t2026-11-27'
    args = ["h", "rag", "", 1, ",bench,", "2026-11-27", "2026-11", t, str(uuid.uuid4()), f"r{i}",
            "0", "charge", "", 0, event]
    return keys, args

def run(name, body, per_call, n=int(os.environ.get("CHARGES", 30000))):
    seed()
    sha = r.script_load(body)
    c0 = instructions() if INSTRUCTIONS else cpu()
    i = 0
    while i < n:
        pipe = r.pipeline(transaction=False)
        t = now_ms()
        for _ in range(max(1, 50 // per_call)):
            # One call holds charges of one shard only, as the gateway sends them.
            shard = (i // per_call) % 16
            keys, args = [f"{tag(shard)}:events"], []
            for j in range(per_call):
                k, a = charge(shard + 16 * ((i + j) % 4), i + j, t)
                keys += k
                args += a
            pipe.evalsha(sha, len(keys), *keys, ";bench:-1:1000000000:-1:0;", 86400, "0", t + 10_000, *args)
            i += per_call
        result = pipe.execute()
    if INSTRUCTIONS:
        print(f"{name:34s} {per_call:3d}/call {instructions() / i:9.0f} instructions/charge   last {result[-1][0][:2]}")
    else:
        print(f"{name:34s} {per_call:3d}/call {(cpu() - c0) / i * 1e6:5.1f} us/charge   last {result[-1][0][:2]}")

for per_call in [int(p) for p in os.environ.get("PER_CALL", "1,14").split(",")]:
    run("lua/charge.lua", open("lua/charge.lua").read(), per_call)
    for path in sys.argv[1:]:
        run(path, open(path).read(), per_call)
    run("(empty script, same arguments)", "return {{'ok'}}", per_call)
server.terminate()
