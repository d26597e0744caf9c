#!/usr/bin/env python3
"""How fast the daemon shows a new VM, and whether a burst of creates arrives whole.

Runs the real `tdx-preflight daemon` (tests/daemonproc.py; reconcile_interval 0,
so only uevents can make a VM appear) and real KVM VMs made by bench/vm_maker.py,
which prints time.time() right after each KVM_CREATE_VM returns.

Latency: ROUNDS times, one VM is created, then `{"op":"status"}` is polled on one
persistent control connection, back to back, until that VM (pid, vm_fd) shows
in `live`; the delay is from the create's return to the reply that first shows
it. The VM is then destroyed and the next round waits until the daemon shows
it gone, then sleeps a random 0..SETTLE_MAX seconds so that creates land at
every phase of the daemon's debounced refresh. Target: p99 < 50 ms.

Burst: one maker creates BURST VMs back to back and keeps them all; status is
polled until all are live. Reported: time from the last create's return to the
reply showing all of them (target <= 1 s), how many are still missing when the
polling stops (target: none), and the resyncs (lost-event recoveries) the
burst caused. The daemon runs with its default uevent receive buffer.

    python3 bench/daemon_events.py [--rounds 200] [--burst 500] [--settle-max 0.2]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from _daemonbench import DaemonProc, LineClient, VmMaker, die_without_kvm, live_keys, pct

STATUS = b'{"op":"status"}\n'


def poll_until(client: LineClient, pred, timeout: float) -> tuple[dict, float, int] | None:
    """Poll status back to back until pred(reply); (reply, time.time() of it, polls)."""
    import json

    deadline = time.monotonic() + timeout
    polls = 0
    while time.monotonic() < deadline:
        reply = json.loads(client.raw(STATUS))
        t = time.time()
        polls += 1
        if pred(reply):
            return reply, t, polls
    return None


def latency(d: DaemonProc, rounds: int, settle_max: float, timeout: float) -> dict:
    maker = VmMaker()
    client = LineClient(d.socket)
    lat: list[float] = []
    gone: list[float] = []
    polls: list[int] = []
    first_poll = 0
    missed = 0
    rng = random.Random(1)
    try:
        for _ in range(rounds):
            fd, t_created = maker.create()
            key = (maker.pid, fd)
            got = poll_until(client, lambda s, k=key: k in live_keys(s), timeout)
            if got is None:
                missed += 1
            else:
                lat.append(got[1] - t_created)
                polls.append(got[2])
                first_poll += got[2] == 1
            t_closed = maker.close(fd)
            got = poll_until(client, lambda s, k=key: k not in live_keys(s), timeout)
            if got is None:
                raise SystemExit(f"VM {key} still live {timeout} s after its destroy")
            gone.append(got[1] - t_closed)
            time.sleep(rng.uniform(0, settle_max))
    finally:
        client.close()
        maker.stop()
    return {
        "lat": lat,
        "gone": gone,
        "polls": polls,
        "first_poll": first_poll,
        "missed": missed,
    }


def burst(d: DaemonProc, n: int, timeout: float) -> dict:
    maker = VmMaker()
    client = LineClient(d.socket)
    try:
        before = client.request({"op": "status"})
        r = maker.burst(n)
        want = {(maker.pid, fd) for fd in r["fds"]}
        got = poll_until(client, lambda s: want <= live_keys(s), timeout)
        after = client.request({"op": "status"}) if got is None else got[0]
        t_end = time.time() if got is None else got[1]
        seen = live_keys(after)
        extra = {k for k in seen if k[0] == maker.pid} - want
        # How the VMs got there: by uevent, or by a reconcile after lost events.
        by = {}
        for kind in after["live"].values():
            for e in kind:
                if e["pid"] == maker.pid:
                    by[e["created_by"]] = by.get(e["created_by"], 0) + 1
        return {
            "create_s": r["t_last"] - r["t_first"],
            "all_visible": got is not None,
            "after_last": t_end - r["t_last"],
            "missing": len(want - seen),
            "extra": len(extra),
            "resyncs": after["resyncs"] - before["resyncs"],
            "reconciles": after["reconciles"] - before["reconciles"],
            "events": after["events"] - before["events"],
            "rcvbuf": after["uevent_rcvbuf"],
            "by": by,
        }
    finally:
        client.close()
        maker.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=200, help="latency rounds (default 200)")
    ap.add_argument("--burst", type=int, default=500, help="VMs in the burst (default 500)")
    ap.add_argument(
        "--settle-max",
        type=float,
        default=0.2,
        help="random pause 0..S seconds between latency rounds (default 0.2)",
    )
    ap.add_argument(
        "--timeout", type=float, default=10.0, help="give up waiting after S seconds (default 10)"
    )
    args = ap.parse_args()
    die_without_kvm()
    d = DaemonProc(reconcile_interval=0, client_timeout=30)
    try:
        lat = latency(d, args.rounds, args.settle_max, args.timeout)
        b = burst(d, args.burst, args.timeout)
        pid = d.proc.pid
    finally:
        d.cleanup()
    ms = [x * 1000 for x in lat["lat"]]
    gone = [x * 1000 for x in lat["gone"]]
    n = len(ms)
    print(f"daemon pid {pid}, uevent receive buffer {b['rcvbuf']} bytes (default config)")
    print()
    print(f"create -> shown in status, {n} rounds ({lat['missed']} never shown)")
    print(f"  {'':28} {'median':>9} {'p99':>9} {'max':>9}   target")
    if ms:
        ok = "met" if pct(ms, 99) < 50 and not lat["missed"] else "NOT met"
        print(
            f"  {'create -> live':28} {statistics.median(ms):6.2f} ms {pct(ms, 99):6.2f} ms "
            f"{max(ms):6.2f} ms   p99 < 50 ms: {ok}"
        )
    if gone:
        print(
            f"  {'destroy -> gone':28} {statistics.median(gone):6.2f} ms "
            f"{pct(gone, 99):6.2f} ms {max(gone):6.2f} ms   (no target)"
        )
    if lat["polls"]:
        print(
            f"  polls until shown: median {statistics.median(lat['polls']):g}, "
            f"max {max(lat['polls'])}; shown by the first poll in {lat['first_poll']}/{n}"
        )
    print()
    print(f"burst of {args.burst} VMs in one process (all kept alive)")
    print(f"  creates took                 {b['create_s'] * 1000:8.1f} ms")
    if b["all_visible"]:
        ok = "met" if b["after_last"] <= 1.0 else "NOT met"
        print(f"  last create -> all live      {b['after_last'] * 1000:8.1f} ms   <= 1 s: {ok}")
    else:
        print(f"  last create -> all live      never within {args.timeout:g} s   <= 1 s: NOT met")
    print(
        f"  missing at the end           {b['missing']:8d}      none: "
        f"{'met' if b['missing'] == 0 else 'NOT met'}"
    )
    print(f"  extra (not made by us)       {b['extra']:8d}")
    print(f"  resyncs during the burst     {b['resyncs']:8d}")
    print(f"  reconciles during the burst  {b['reconciles']:8d}")
    print(f"  events applied               {b['events']:8d}")
    print(f"  entries created by           {b['by']}")


if __name__ == "__main__":
    main()
