"""How much a read of the host takes: the caps and the chunk size, in bytes."""

from __future__ import annotations

#: Default cap for a file that should be small (sysfs values, proc files).
SMALL = 64 * 1024
#: Cap for files that grow with the machine (cpuinfo of 2,048 CPUs is about 5.5 MB).
LARGE = 8 * 1024 * 1024
#: Read size for streamed files.
CHUNK = 1 << 20
