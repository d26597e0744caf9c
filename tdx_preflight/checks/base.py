"""Check objects, their registry, and the result every check returns."""

from collections.abc import Callable
from typing import Any, NamedTuple

from .. import plural  # noqa: F401  (re-exported: the checks import it from here)
from ..facts import HostFacts

PHASES = ("load", "exec", "crash")
STATUSES = ("pass", "warn", "fail", "unknown", "skip")


class Outcome(NamedTuple):
    """What a check function returns."""

    status: str
    summary: str
    evidence: dict[str, Any] | None = None
    remedy: str | None = None
    #: Set by at_worst_warn: why this row is capped at warn here (kept when the
    #: TDX-use gate replaces the outcome, so the cap still applies).
    cap: str | None = None

    def at_worst_warn(self, why: str) -> "Outcome":
        """Cap fail/unknown at warn (an advisory phase or host); say why in the summary."""
        if self.status in ("fail", "unknown"):
            return Outcome("warn", f"{self.summary} ({why})", self.evidence, self.remedy, why)
        return self._replace(cap=why)


class Settings(NamedTuple):
    """What the configuration tells the checks that take it (policy.Policy.settings).

    `sys_disable_module_versions`: TDX module versions (X.Y.ZZ) the operator vouches
    implement TDH.SYS.DISABLE; `config_file`: where to add one (named in remedies).
    """

    sys_disable_module_versions: frozenset[str] = frozenset()
    config_file: str = "/etc/tdx-preflight/config.yaml"


CheckFn = Callable[..., Outcome]


class Check(NamedTuple):
    id: str
    title: str
    blocking: frozenset[str]
    tdx_only: bool
    question: str
    why: str
    reads: tuple[str, ...]
    remedies: dict[str, str]
    func: CheckFn
    #: Phases in which the check is always skip, with why; its function never sees them.
    skips: dict[str, str]
    #: The function takes the configuration's Settings as a third argument.
    settings: bool = False

    def evaluate(self, facts: HostFacts, phase: str, settings: Settings | None = None) -> Outcome:
        """The row's outcome; a TDX-only row is skip when TDX is not in use and
        unknown (naming the unreadable sources) when that cannot be told, unless
        the row does not apply in this phase at all (then skip)."""
        use = facts.tdx_use
        if self.tdx_only and use.state == "no":
            return Outcome("skip", "TDX is not in use on this host", {"tdx_in_use": use.sources})
        if phase in self.skips:
            return Outcome("skip", self.skips[phase])
        if not self.tdx_only or use.state == "yes":
            return self._run(facts, phase, settings)
        own = self._run(facts, phase, settings)
        if own.status == "skip":
            return own
        out = tdx_use_unknown(use.sources, use.unreadable)
        return out.at_worst_warn(own.cap) if own.cap else out

    def _run(self, facts: HostFacts, phase: str, settings: Settings | None) -> Outcome:
        if self.settings:
            return self.func(facts, phase, settings or Settings())
        return self.func(facts, phase)


def tdx_use_unknown(sources: dict[str, str], unreadable: tuple[str, ...]) -> Outcome:
    """A TDX-only row when whether TDX is in use cannot be told."""
    named = ", ".join(unreadable) or "a TDX source"
    if any("not the host's" in sources.get(n, "") for n in unreadable):
        remedy = "Run the check in the host's PID and cgroup namespaces (not in a container)."
    else:
        remedy = f"Make {named} readable (run as root), then run again."
    return Outcome(
        "unknown",
        f"cannot tell whether TDX is in use: could not read {named}",
        {"tdx_in_use": "unknown", "sources": sources},
        remedy,
    )


REGISTRY: dict[str, Check] = {}


def check(
    id: str,
    title: str,
    *,
    blocking: tuple[str, ...],
    tdx_only: bool,
    question: str,
    why: str,
    reads: tuple[str, ...],
    remedies: dict[str, str],
    skips: dict[str, str] | None = None,
    settings: bool = False,
) -> Callable[[CheckFn], CheckFn]:
    """Declare a check next to its function; registration order is report order.

    `skips` maps each phase in which the check never applies to the reason: the
    policy refuses a `blocking` entry for such a phase (it could never take effect).

    `settings=True`: the function is `func(facts, phase, settings)` (base.Settings).
    """

    def register(func: CheckFn) -> CheckFn:
        assert id not in REGISTRY, id
        assert not set(skips or ()) & set(blocking), id
        REGISTRY[id] = Check(
            id,
            title,
            frozenset(blocking),
            tdx_only,
            question,
            why,
            reads,
            remedies,
            func,
            dict(skips or {}),
            settings,
        )
        return func

    return register


def problem_remedy(kind: str, what: str) -> str:
    """A fix hint chosen from why a read failed: what to do, not the problem again."""
    if kind == "permission":
        return f"Run as root (reading {what} needs privileges)."
    if kind == "absent":
        return (
            "Run on the host itself with proc mounted on /proc and sysfs on /sys (a container "
            f"or chroot may lack {what}), then run again."
        )
    return (
        f"Look at {what} (the summary says what is wrong with it: an I/O error, or contents "
        "not in the kernel's format); fix the mount or the file, then run again."
    )
