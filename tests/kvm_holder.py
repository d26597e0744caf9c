"""A process that holds real KVM VMs, for the live tests.

Run as `python kvm_holder.py [--count N] [--thread] [--hold-thread] [ARGS...]`:
it opens /dev/kvm, creates N VMs with KVM_CREATE_VM (from a second thread with
--thread, so the kernel's creator tid differs from the pid; --hold-thread keeps
that thread alive), prints one JSON line {"pid", "tid", "fds"} and waits. The
remaining ARGS only decorate the command line (e.g. `-object tdx-guest,id=tdx0
-name td-live`) so that the process looks like a VMM launch.

Commands on stdin, one per line, each answered with a JSON line:
  close          destroy every VM held                -> {"closed": N}
  close FD       close descriptor FD (a VM's, a vCPU's
                 or a statistics descriptor)           -> {"closed": 1}
  burst N K      create N VMs as fast as possible,
                 then destroy all but the last K       -> {"created": N, "kept": [fds]}
  vcpus FD N     create N vCPUs (KVM_CREATE_VCPU) on
                 the VM of descriptor FD              -> {"vcpus": [fds]}
  close-vcpus    close every vCPU descriptor held     -> {"closed": N}
  stats FD       KVM_GET_STATS_FD on the VM or vCPU of
                 descriptor FD (as QEMU 8.1+ does for
                 every vCPU): a descriptor that holds
                 the VM without naming it             -> {"stats": fd}
End of input exits.
"""

from __future__ import annotations

import fcntl
import json
import os
import resource
import sys
import threading

KVM_CREATE_VM = 0xAE01
KVM_CREATE_VCPU = 0xAE41  # _IO(KVMIO, 0x41), on a VM fd; the argument is the vCPU id
KVM_GET_STATS_FD = 0xAECE  # _IO(KVMIO, 0xce), on a VM or vCPU fd (Linux 5.14+)


def create(kvm: int, count: int, out: dict[str, object], hold: threading.Event | None) -> None:
    out["tid"] = threading.get_native_id()
    out["fds"] = [fcntl.ioctl(kvm, KVM_CREATE_VM, 0) for _ in range(count)]
    if hold is not None:
        hold.wait()


def main(argv: list[str]) -> int:
    count = 1
    use_thread = hold_thread = False
    while argv and argv[0] in ("--count", "--thread", "--hold-thread"):
        if argv[0] == "--count":
            count = int(argv[1])
            argv = argv[2:]
        else:
            use_thread = True
            hold_thread = hold_thread or argv[0] == "--hold-thread"
            argv = argv[1:]
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    result: dict[str, object] = {"pid": os.getpid()}
    release = threading.Event() if hold_thread else None
    if use_thread:
        t = threading.Thread(target=create, args=(kvm, count, result, release), daemon=True)
        t.start()
        while "fds" not in result:
            t.join(0.001)
    else:
        create(kvm, count, result, None)
    print(json.dumps(result), flush=True)
    fds = list(result["fds"])  # type: ignore[call-overload]
    vcpus: list[int] = []
    for line in sys.stdin:
        words = line.split()
        if words[:1] == ["vcpus"]:
            vm, n = int(words[1]), int(words[2])
            made = [fcntl.ioctl(vm, KVM_CREATE_VCPU, i) for i in range(n)]
            vcpus.extend(made)
            print(json.dumps({"vcpus": made}), flush=True)
        elif words[:1] == ["close-vcpus"]:
            for fd in vcpus:
                os.close(fd)
            print(json.dumps({"closed": len(vcpus)}), flush=True)
            vcpus = []
        elif words[:1] == ["stats"]:
            stats = fcntl.ioctl(int(words[1]), KVM_GET_STATS_FD, 0)
            print(json.dumps({"stats": stats}), flush=True)
        elif words[:1] == ["close"] and len(words) == 2:
            fd = int(words[1])
            for held in (fds, vcpus):
                if fd in held:
                    held.remove(fd)
            os.close(fd)
            print(json.dumps({"closed": 1}), flush=True)
        elif words[:1] == ["close"]:
            for fd in fds:
                os.close(fd)
            print(json.dumps({"closed": len(fds)}), flush=True)
            fds = []
            if release is not None:
                release.set()
        elif words[:1] == ["burst"]:
            n, keep = int(words[1]), int(words[2])
            made = [fcntl.ioctl(kvm, KVM_CREATE_VM, 0) for _ in range(n)]
            for fd in made[: n - keep]:
                os.close(fd)
            kept = made[n - keep :]
            fds.extend(kept)
            print(json.dumps({"created": n, "kept": kept}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
