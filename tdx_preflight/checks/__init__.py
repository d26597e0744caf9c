"""The checklist: one module per area, each check declared next to its function."""

from . import guests, kernel, platform, target, tdx  # noqa: F401  (registration)
from .base import PHASES, REGISTRY, STATUSES, Check, Outcome, Settings

ORDER = (
    "platform.cpu",
    "platform.tdx",
    "tdx.module",
    "tdx.module_update",
    "errata.tdx_pw_mce",
    "kernel.kexec",
    "kernel.cache_flush",
    "guests.td",
    "guests.teardown",
    "guests.vm",
    "kexec.image",
    "target.kernel",
    "postkexec.tdx",
)
CHECKS: tuple[Check, ...] = tuple(REGISTRY[i] for i in ORDER)

__all__ = ["CHECKS", "PHASES", "REGISTRY", "STATUSES", "Check", "Outcome", "Settings"]
