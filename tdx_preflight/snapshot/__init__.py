"""Snapshots: exactly what the checks read, as a host-root tree packed in a .tar.gz.

`tdx-preflight snapshot OUT.tar.gz` runs `gather()` once on a `RecordingHost`, which
remembers every read the readers made and how it ended, then writes those results
as a host-root tree (DESIGN.md, "The host root") so that `check --root OUT.tar.gz`
reproduces the verdict and every check's status. What a file cannot hold is said
in the tree's SNAPSHOT.json, and the snapshot replays itself before packing so the
manifest also says whether (and where) the replay differs from the capture.

How each kind of read is reproduced:

- a file read: the exact bytes. A file over the reader's size cap: its first
  cap+1 bytes (still "larger than" the cap). A file that exists but could not be
  read (permission, I/O): a directory in its place, which `Host` reports as an
  I/O problem, so an unreadable fact stays unreadable and never turns into a pass.
  Every read that failed other than "absent" is also listed in the manifest's
  `unreadable`, and a replay's Host gives it the captured Problem (kind included)
  again: what the tree alone cannot hold (a listing of proc, a process whose
  descriptors could not be listed) stays unreadable too.
- a directory listing: the directory, with its listed names (empty files or
  directories as they were) unless they were read themselves; a listing that
  failed other than "absent": a symlink to itself (an I/O problem on replay).
- /proc: the entries of VM holders only (the processes and creating threads the
  enumeration found, and every process with a KVM descriptor); of their fd
  links only the KVM ones (`anon_inode:kvm-...` and guest_memfd's, as readers/kvm.py
  reads them). Command
  lines are redacted to what the classifier reads, and libvirt's live XML to the
  elements it reads, unless asked to keep them.
- MSRs: a sparse file with each value at offset = index (see plan.py's `_msr_plan` for what
  a file cannot hold); the kernel log as one record a line; kallsyms as the lines
  of the symbols that were found plus one neutral line.

`extract_snapshot` is the other direction: a .tar.gz given as `--root` is read
whole or refused (every header, the gzip trailer, member count and size bounded,
all before anything is written), then extracted into a temporary directory
removed at exit and on SIGTERM, SIGHUP and SIGINT. `captured_unreadable` reads a
tree's manifest for the Host that replays it.

One module per job: record.py (RecordingHost), redact.py (command lines and
libvirt XML), plan.py (the tree), pack.py (take_snapshot and the archive),
replay.py (an archive and its manifest read back).
"""

from .pack import SUFFIXES, SnapshotResult, open_output, take_snapshot
from .plan import Node, Plan, TreeInfo, plan_tree, unreadable_reads, vm_holders
from .record import RecordingHost
from .redact import REDACTED, minimal_libvirt_xml, redact_cmdline
from .replay import (
    MANIFEST,
    MAX_BYTES,
    MAX_MEMBERS,
    SnapshotError,
    UnsafeMember,
    captured_unreadable,
    extract_snapshot,
    remove_extractions,
)

__all__ = [
    "MANIFEST",
    "MAX_BYTES",
    "MAX_MEMBERS",
    "REDACTED",
    "SUFFIXES",
    "Node",
    "Plan",
    "RecordingHost",
    "SnapshotError",
    "SnapshotResult",
    "TreeInfo",
    "UnsafeMember",
    "captured_unreadable",
    "extract_snapshot",
    "minimal_libvirt_xml",
    "open_output",
    "plan_tree",
    "redact_cmdline",
    "remove_extractions",
    "take_snapshot",
    "unreadable_reads",
    "vm_holders",
]
