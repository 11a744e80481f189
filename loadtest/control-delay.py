#!/usr/bin/env python3
"""/disconnect and /revoke on node A to the close a client of node B sees (issue 18).

Starts redis-server and two one-shard release nodes on loopback, then for 30 users each: a
client of B authenticates and subscribes, the backend calls node A, and the time until B's
client sees its close frame (4006, then 4007) is taken. The time includes this script's HTTP
call. Needs `pip install websockets` and a release build:

    cargo build --release --bin broadcaster && python3 loadtest/control-delay.py
"""
import asyncio, json, os, statistics, subprocess, time, urllib.request

import websockets

BIN = os.environ.get("BIN", "target/release/broadcaster")
SECRET, KEY = "x" * 32, "k1"
REDIS, NODE_A, NODE_B = 16399, 18301, 18302
env = dict(os.environ, BROADCASTER_AUTH_JWT_SECRET=SECRET, BROADCASTER_AUTH_API_KEYS=KEY,
           BROADCASTER_REDIS_URL=f"redis://127.0.0.1:{REDIS}")


def token(sub):
    out = subprocess.run([BIN, "token", "--sub", sub, "--channel", "*"], env=env,
                         capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def post(path, body):
    req = urllib.request.Request(f"http://127.0.0.1:{NODE_A}{path}", data=json.dumps(body).encode(),
                                 headers={"Authorization": "Bearer " + KEY})
    return urllib.request.urlopen(req).read()


async def one(user, path):
    ws = await websockets.connect(f"ws://127.0.0.1:{NODE_B}/ws")
    await ws.send(json.dumps({"id": 1, "method": "auth", "params": {"token": token(user)}}))
    await ws.recv()
    await ws.send(json.dumps({"id": 2, "method": "subscribe", "params": {"channel": "c"}}))
    await ws.recv()
    if path == "/disconnect":
        body = {"user": user}
    else:
        cutoff = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 2))
        body = {"user": user, "issuedBefore": cutoff}
    started = time.perf_counter()
    await asyncio.get_running_loop().run_in_executor(None, post, path, body)
    try:
        while True:
            await ws.recv()
    except websockets.ConnectionClosed as e:
        return (time.perf_counter() - started) * 1000, e.rcvd.code if e.rcvd else None


async def main():
    for n, path in enumerate(("/disconnect", "/revoke")):
        runs = [await one(f"u{n}-{i}", path) for i in range(30)]
        ms = sorted(t for t, _ in runs)
        codes = {c for _, c in runs}
        print(f"{path}: close codes {codes}, median {statistics.median(ms):.2f} ms, "
              f"p90 {ms[int(len(ms) * 0.9)]:.2f} ms, max {ms[-1]:.2f} ms")


redis = subprocess.Popen(["redis-server", "--port", str(REDIS), "--save", "", "--appendonly", "no"],
                         stdout=subprocess.DEVNULL)
time.sleep(0.5)
nodes = [subprocess.Popen([BIN, "serve", "--listen", f"127.0.0.1:{p}", "--shards", "1"], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
         for p in (NODE_A, NODE_B)]
time.sleep(1.5)
try:
    asyncio.run(main())
finally:
    for p in nodes + [redis]:
        p.kill()
