#!/usr/bin/env python3
"""Round trip of `{"op":"status"}` on the daemon's control socket, against a plain asyncio floor.

Starts the real `tdx-preflight daemon` (tests/daemonproc.py, with the default
reconcile_interval 60 and client_timeout 10), brings 50 real KVM VMs alive in one
holder (tests/conftest.py KvmHolder, count 50) and waits until the daemon shows
them all. Then N sequential status requests are timed on one persistent
connection, and N more opening a new connection per request.

The baseline is a plain asyncio JSON-lines server (this script with
--serve-echo, as its own process) on another Unix socket: it parses each
request line with json.loads and answers json.dumps of the daemon's own status
reply captured just before (so the same bytes, the same size), with no other
work. It is timed the same way, in blocks interleaved with the daemon's so
that drift hits both alike. Printed: median, p99 and max of each, and daemon /
baseline ratios. Target: daemon p99 < 5 ms.

    python3 bench/daemon_status.py [--requests 1000] [--vms 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _daemonbench import (
    DaemonProc,
    LineClient,
    die_without_kvm,
    live_keys,
    one_shot,
    pct,
    wait_until,
)
from conftest import KvmHolder

STATUS = b'{"op":"status"}\n'
BLOCK = 100  # requests per interleaved block


# -- the baseline server (runs as a child: python3 daemon_status.py --serve-echo) -------


def serve_echo(path: str, reply_file: str) -> None:
    reply = json.loads(Path(reply_file).read_text())

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                json.loads(line)
                writer.write(json.dumps(reply, separators=(",", ":"), default=str).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, OSError):
            return
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_unix_server(client, path, limit=64 * 1024 + 1)
        print("ready", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


class EchoServer:
    def __init__(self, path: str, reply_file: str) -> None:
        self.path = path
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve-echo", path, reply_file],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            self.stop()
            raise RuntimeError("the baseline server did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- measuring ----------------------------------------------------------------------------


def timed(fn: Callable[[], bytes], n: int, out: list[float], size: int) -> None:
    for _ in range(n):
        t0 = time.perf_counter()
        reply = fn()
        out.append(time.perf_counter() - t0)
        if len(reply.rstrip(b"\n")) < size // 2:  # an error reply, not a status
            raise SystemExit(f"unexpected reply: {reply[:300]!r}")


def measure(paths: dict[str, str], requests: int, size: int, warmup: int) -> dict:
    """{(server, variant): [seconds]}; blocks of BLOCK requests, servers interleaved."""
    times: dict[tuple[str, str], list[float]] = {}
    clients = {name: LineClient(p) for name, p in paths.items()}
    try:
        for name, path in paths.items():  # warm-up, not recorded
            timed(lambda c=clients[name]: c.raw(STATUS), warmup, [], size)
            timed(lambda p=path: one_shot(p, STATUS), warmup, [], size)
        for variant in ("persistent", "new connection"):
            done = 0
            while done < requests:
                k = min(BLOCK, requests - done)
                for name, path in paths.items():
                    if variant == "persistent":
                        fn = lambda c=clients[name]: c.raw(STATUS)  # noqa: E731
                    else:
                        fn = lambda p=path: one_shot(p, STATUS)  # noqa: E731
                    timed(fn, k, times.setdefault((name, variant), []), size)
                done += k
    finally:
        for c in clients.values():
            c.close()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000, help="per variant (default 1000)")
    ap.add_argument("--vms", type=int, default=50, help="live VMs (default 50)")
    ap.add_argument("--warmup", type=int, default=20, help="unrecorded requests (default 20)")
    ap.add_argument("--summary", help="also write the key figures as JSON to this file")
    ap.add_argument("--serve-echo", nargs=2, metavar=("SOCKET", "REPLY"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_echo:
        serve_echo(*args.serve_echo)
        return
    die_without_kvm()
    work = Path(tempfile.mkdtemp(prefix="tdxb-", dir="/tmp"))
    d = holder = echo = None
    try:
        d = DaemonProc(reconcile_interval=60, client_timeout=10)
        holder = KvmHolder(count=args.vms)
        want = {(holder.pid, fd) for fd in holder.fds}
        if not wait_until(lambda: want <= live_keys(d.status()), 15, 0.05):
            raise SystemExit(f"the daemon did not show the {args.vms} VMs within 15 s")
        time.sleep(1.0)  # let the debounced refresh and state write pass
        sample = d.request({"op": "status"})
        assert sample is not None and sample["ok"]
        size = len(json.dumps(sample, separators=(",", ":"), default=str)) + 1
        reply_file = work / "reply.json"
        reply_file.write_text(json.dumps(sample))
        echo = EchoServer(str(work / "echo.sock"), str(reply_file))
        paths = {"daemon": d.socket, "baseline": echo.path}
        # Both answer the same bytes:
        sizes = {n: len(one_shot(p, STATUS)) for n, p in paths.items()}
        times = measure(paths, args.requests, size, args.warmup)
        daemon_pid = d.proc.pid
        end = d.status()
        reconciles = end["reconciles"]
        foreign = end["events"] - sample["events"]
    finally:
        for thing in (echo, holder, d):
            if thing is not None:
                (thing.cleanup if isinstance(thing, DaemonProc) else thing.stop)()
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"daemon pid {daemon_pid}, {args.vms} live VMs, status reply "
        f"{sizes['daemon']} bytes (baseline {sizes['baseline']} bytes), "
        f"{args.requests} requests per row, reconciles so far {reconciles}"
    )
    print(f"uevents during the measurement (VMs of others on this host): {foreign}")
    print()
    print(f"  {'':32} {'median':>9} {'p99':>9} {'max':>9}")
    ms = {k: [x * 1000 for x in v] for k, v in times.items()}
    for variant in ("persistent", "new connection"):
        for name in ("daemon", "baseline"):
            v = ms[(name, variant)]
            label = f"{name}, {variant}"
            print(
                f"  {label:32} {statistics.median(v):6.3f} ms {pct(v, 99):6.3f} ms {max(v):6.3f} ms"
            )
        dv, bv = ms[("daemon", variant)], ms[("baseline", variant)]
        print(
            f"  {'  daemon / baseline':32} {statistics.median(dv) / statistics.median(bv):7.2f}x  "
            f"{pct(dv, 99) / pct(bv, 99):7.2f}x"
        )
    print()
    for variant in ("persistent", "new connection"):
        p99 = pct(ms[("daemon", variant)], 99)
        print(
            f"  target daemon p99 < 5 ms, {variant:15} {p99:6.3f} ms: "
            f"{'met' if p99 < 5 else 'NOT met'}"
        )
    if args.summary:
        summary = {
            "vms": args.vms,
            "status_median_ms": statistics.median(ms[("daemon", "persistent")]),
            "status_p99_ms": pct(ms[("daemon", "persistent")], 99),
            "status_new_conn_p99_ms": pct(ms[("daemon", "new connection")], 99),
            "baseline_p99_ms": pct(ms[("baseline", "persistent")], 99),
        }
        Path(args.summary).write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
