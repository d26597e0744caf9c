"""target.kernel: can the kernel being loaded use TDX on this host?"""

from __future__ import annotations

from typing import Any

from ..facts import HostFacts
from ..host import Problem
from ..readers import kernel
from .base import Outcome, check


@check(
    "target.kernel",
    "Kernel being loaded",
    blocking=(),
    tdx_only=False,
    question="Which kernel does the load name, and does it have TDX host support?",
    why="A kexec into a kernel built without CONFIG_INTEL_TDX_HOST leaves a TDX host unable "
    "to run TD guests until it boots a TDX kernel again. Read from the image's bzImage "
    "header (kernel_version) and boot/config-RELEASE; only the hook knows the image.",
    reads=("the image named by the kexec arguments (bzImage header)", "/boot/config-RELEASE"),
    remedies={
        "warn": "Load a kernel built with CONFIG_INTEL_TDX_HOST=y if this host must run TD "
        "guests after the kexec.",
        "unknown": "Name a readable bzImage, and keep /boot/config-RELEASE for it.",
    },
)
def target_kernel(facts: HostFacts, phase: str) -> Outcome:
    t = facts.target
    if t is None:
        return Outcome("skip", "no kernel image named (only the hook sees kexec's arguments)")
    evidence: dict[str, Any] = {"image": t.image}
    if isinstance(t.release, Problem):
        evidence["image_error"] = t.release.to_json()
        return Outcome(
            "unknown",
            f"cannot read the kernel release from {t.image}: {t.release.detail}",
            evidence,
            "Check the image path; it must be an x86 bzImage.",
        )
    evidence["release"] = t.release
    tdx = facts.tdx_use.state == "yes"
    cfg = t.config
    if isinstance(cfg, kernel.KernelConfig):
        value = cfg.values.get("CONFIG_INTEL_TDX_HOST", "n")
        evidence["config"] = {"path": cfg.source, "CONFIG_INTEL_TDX_HOST": value}
        if value != "y":
            summary = f"{t.release} has no TDX host support (CONFIG_INTEL_TDX_HOST={value})"
            if tdx:
                return Outcome(
                    "warn",
                    summary + ": after the kexec this host cannot run TD guests",
                    evidence,
                    "Load a kernel built with CONFIG_INTEL_TDX_HOST=y if TD guests must run.",
                )
            return Outcome("pass", summary + " (TDX is not in use here)", evidence)
        return Outcome("pass", f"{t.release} has TDX host support", evidence)
    if isinstance(cfg, Problem):
        evidence["config_error"] = cfg.to_json()
    if not tdx:
        return Outcome("pass", f"loading {t.release} (TDX is not in use here)", evidence)
    why = cfg.detail if isinstance(cfg, Problem) else "not read"
    return Outcome(
        "unknown",
        f"loading {t.release}; its TDX host support is unknown (boot/config-{t.release}: {why})",
        evidence,
        f"Keep /boot/config-{t.release} so the new kernel's TDX support can be told.",
    )
