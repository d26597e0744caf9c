#!/usr/bin/env python3
"""A child process that creates real KVM VMs on command and says when, for the benchmarks.

Unlike tests/kvm_holder.py it reports the wall-clock time (`time.time()`) read
right after each KVM_CREATE_VM returns, so that a benchmark can time how long
the daemon takes to show the VM. The kernel sends the VM's `create` uevent
inside that ioctl, before it returns.

Prints {"pid": PID} once started, then answers each stdin command with one
JSON line:

  create          one VM                  -> {"fd": FD, "t0": before, "t": after}
  burst N         N VMs back to back, all
                  kept alive              -> {"fds": [...], "t_first": T, "t_last": T}
  close FD...     destroy those VMs       -> {"closed": N, "t": after the last close}
  closeall        destroy every VM held   -> {"closed": N, "t": ...}

End of input exits (and so destroys every VM left).
"""

from __future__ import annotations

import fcntl
import json
import os
import resource
import sys
import time

KVM_CREATE_VM = 0xAE01


def main() -> int:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    held: set[int] = set()

    def say(obj: dict[str, object]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    say({"pid": os.getpid()})
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        cmd = words[0]
        if cmd == "create":
            t0 = time.time()
            fd = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
            t = time.time()
            held.add(fd)
            say({"fd": fd, "t0": t0, "t": t})
        elif cmd == "burst":
            n = int(words[1])
            t_first = time.time()
            fds = [fcntl.ioctl(kvm, KVM_CREATE_VM, 0) for _ in range(n)]
            t_last = time.time()
            held.update(fds)
            say({"fds": fds, "t_first": t_first, "t_last": t_last})
        elif cmd in ("close", "closeall"):
            fds = list(held) if cmd == "closeall" else [int(w) for w in words[1:]]
            for fd in fds:
                if fd in held:
                    os.close(fd)
                    held.discard(fd)
            say({"closed": len(fds), "t": time.time()})
        else:
            say({"error": f"unknown command {cmd!r}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
