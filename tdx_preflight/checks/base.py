"""Check objects, their registry, and the result every check returns."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from ..facts import HostFacts

PHASES = ("load", "exec", "crash")
STATUSES = ("pass", "warn", "fail", "unknown", "skip")


class Outcome(NamedTuple):
    """What a check function returns."""

    status: str
    summary: str
    evidence: dict[str, Any] | None = None
    remedy: str | None = None

    def at_worst_warn(self, why: str) -> Outcome:
        """Cap fail/unknown at warn (an advisory phase or host); say why in the summary."""
        if self.status in ("fail", "unknown"):
            return Outcome("warn", f"{self.summary} ({why})", self.evidence, self.remedy)
        return self


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
        if self.tdx_only and not facts.tdx_use.evaluated:
            return Outcome(
                "skip",
                "TDX is not in use on this host",
                {"tdx_in_use": facts.tdx_use.sources},
            )
        if phase in self.skips:
            return Outcome("skip", self.skips[phase])
        if self.settings:
            return self.func(facts, phase, settings or Settings())
        return self.func(facts, phase)


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
    """A fix hint chosen from why a read failed."""
    if kind == "permission":
        return f"Run as root (reading {what} needs privileges)."
    if kind == "absent":
        return f"{what} is missing on this host."
    return f"Check {what}: it could not be read correctly."
