"""A process that holds real KVM VMs, for the live tests.

Run as `python kvm_holder.py [--count N] [--thread] [ARGS...]`: it opens
/dev/kvm, creates N VMs with KVM_CREATE_VM (from a second thread with
--thread, so the kernel's creator tid differs from the pid), prints one JSON
line {"pid", "tid", "fds"} and waits. The remaining ARGS only decorate the
command line (e.g. `-object tdx-guest,id=tdx0 -name td-live`) so that the
process looks like a VMM launch. A line "close" on stdin destroys the VMs
(prints {"closed": N}); end of input exits.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import threading

KVM_CREATE_VM = 0xAE01


def create(kvm: int, count: int, out: dict[str, object]) -> None:
    out["tid"] = threading.get_native_id()
    out["fds"] = [fcntl.ioctl(kvm, KVM_CREATE_VM, 0) for _ in range(count)]


def main(argv: list[str]) -> int:
    count = 1
    use_thread = False
    while argv and argv[0] in ("--count", "--thread"):
        if argv[0] == "--count":
            count = int(argv[1])
            argv = argv[2:]
        else:
            use_thread = True
            argv = argv[1:]
    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    result: dict[str, object] = {"pid": os.getpid()}
    if use_thread:
        t = threading.Thread(target=create, args=(kvm, count, result))
        t.start()
        t.join()
    else:
        create(kvm, count, result)
    print(json.dumps(result), flush=True)
    fds = list(result["fds"])  # type: ignore[call-overload]
    for line in sys.stdin:
        if line.strip() == "close":
            for fd in fds:
                os.close(fd)
            print(json.dumps({"closed": len(fds)}), flush=True)
            fds = []
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
