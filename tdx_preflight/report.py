"""Report: check results, the verdict, exit codes and the schema-1 JSON."""

import time
from typing import Any, NamedTuple

from . import __version__
from .checks import CHECKS, Outcome
from .facts import HostFacts
from .host import Problem
from .policy import Policy

SCHEMA = 1
#: The checklist's rules version (DESIGN.md, "The checklist (rules version 2)").
RULES = 2
#: Evidence key of a check whose outcome rests on the configured
#: sys_disable_module_versions; its value is "config FILE".
VOUCHED_BY = "sys_disable_vouched_by"
EXIT_ALLOW, EXIT_FAIL, EXIT_USAGE, EXIT_UNKNOWN, EXIT_NO_DAEMON = 0, 1, 2, 3, 4


class CheckResult(NamedTuple):
    id: str
    title: str
    status: str
    blocking: bool
    summary: str
    evidence: dict[str, Any]
    remedy: str | None
    #: "fail" or "unknown" when this result blocks the verdict, else None.
    blocks: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "status": self.status,
            "blocking": self.blocking,
            "summary": self.summary,
            "evidence": self.evidence,
            "remedy": self.remedy,
        }


class Report:
    """The checklist's results for one phase, and the verdict."""

    def __init__(
        self,
        phase: str,
        facts: HostFacts,
        results: list[CheckResult],
        verdict: str,
        exit_code: int,
        summary: str,
        generated_at: str,
        duration_ms: float,
    ) -> None:
        self.phase = phase
        self.facts = facts
        self.results = results
        self.verdict = verdict
        self.exit_code = exit_code
        self.summary = summary
        self.generated_at = generated_at
        self.duration_ms = duration_ms
        #: Fields later layers add to the JSON (e.g. where the ledger came from).
        self.extra: dict[str, Any] = {}
        #: Lines the text rendering shows before the verdict.
        self.notes: list[str] = []

    def host_json(self) -> dict[str, Any]:
        f = self.facts
        cpu = None if isinstance(f.cpuinfo, Problem) else f.cpuinfo.first
        return {
            "root": f.root,
            "kernel_release": f.release if isinstance(f.release, str) else None,
            "cpu_model_name": cpu.model_name if cpu else None,
            "family": cpu.family if cpu else None,
            "model": cpu.model if cpu else None,
            "tdx_in_use": f.tdx_use.state,
            "tdx_module": f.module.to_json(),
            "view": f.view.to_json(),
            "rules": RULES,
        }

    def sys_disable_vouched(self) -> dict[str, Any] | None:
        """Which checks' outcomes rest on the operator's sys_disable_module_versions list.

        None when none does; else {"module_version", "config", "key", "checks": [ids]}.
        """
        rest = [r for r in self.results if VOUCHED_BY in r.evidence]
        if not rest:
            return None
        return {
            "module_version": rest[0].evidence.get("module_version"),
            "config": rest[0].evidence[VOUCHED_BY].removeprefix("config "),
            "key": "sys_disable_module_versions",
            "checks": [r.id for r in rest],
        }

    def to_json(self) -> dict[str, Any]:
        out = {
            "schema": SCHEMA,
            "tool": {"name": "tdx-preflight", "version": __version__},
            "phase": self.phase,
            "verdict": self.verdict,
            "exit_code": self.exit_code,
            "summary": self.summary,
            "host": self.host_json(),
            "checks": [r.to_json() for r in self.results],
            "guests": [g.to_json() for g in self.facts.guests],
            "sys_disable_vouched": self.sys_disable_vouched(),
            "generated_at": self.generated_at,
            "duration_ms": round(self.duration_ms, 1),
        }
        out.update(self.extra)
        return out


def rfc3339_now() -> str:
    """Now in UTC as RFC 3339 with milliseconds (time.strftime: datetime costs ms to import)."""
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def _blocks(check_id: str, status: str, blocking: bool, phase: str, policy: Policy) -> str | None:
    if status == "fail" and blocking:
        return "fail"
    if status == "unknown" and blocking:
        return "unknown"
    if status == "warn" and policy.warn_blocks(check_id, phase):
        return "fail"
    return None


def evaluate(facts: HostFacts, phase: str, policy: Policy, started: float | None = None) -> Report:
    """Run every check for `phase` and compute the verdict (DESIGN.md, "The checklist")."""
    results: list[CheckResult] = []
    settings = policy.settings
    for chk in CHECKS:
        out: Outcome = chk.evaluate(facts, phase, settings)
        blocking = out.status != "skip" and policy.is_blocking(chk.id, chk.blocking, phase)
        remedy = out.remedy if out.status not in ("pass", "skip") else None
        results.append(
            CheckResult(
                chk.id,
                chk.title,
                out.status,
                blocking,
                out.summary,
                out.evidence or {},
                remedy,
                _blocks(chk.id, out.status, blocking, phase, policy),
            )
        )
    blocked = blockers(results)
    if blocked:
        verdict, code = "block", EXIT_FAIL if blocked[0].blocks == "fail" else EXIT_UNKNOWN
    else:
        verdict, code = "allow", EXIT_ALLOW
    summary = _summary(phase, verdict, blocked, results)
    now = rfc3339_now()
    duration = (time.monotonic() - started) * 1000 if started is not None else 0.0
    return Report(phase, facts, results, verdict, code, summary, now, duration)


def blockers(results: list[CheckResult]) -> list[CheckResult]:
    """The results that block, fails before unknowns (each in check order): the first
    one sets the exit code (EXIT_FAIL or EXIT_UNKNOWN) and leads every one-line message."""
    return [r for r in results if r.blocks == "fail"] + [
        r for r in results if r.blocks == "unknown"
    ]


def also_blocking(blocked: list[CheckResult]) -> str:
    """` (also blocking: ID STATUS, ...)` naming the results of `blocked` (as blockers()
    orders them) after the first; "" when there are none. (A count alone, after a
    summary that ends in "and 59 more", would read as one more guest.)"""
    rest = ", ".join(f"{r.id} {r.status}" for r in blocked[1:])
    return f" (also blocking: {rest})" if rest else ""


def _summary(
    phase: str, verdict: str, blocked: list[CheckResult], results: list[CheckResult]
) -> str:
    if verdict == "block":
        first = blocked[0]
        return (
            f"kexec blocked ({phase}): {first.id} {first.status}: {first.summary}"
            f"{also_blocking(blocked)}"
        )
    warns = [r.id for r in results if r.status == "warn"]
    tail = f" with {len(warns)} warning{'s' if len(warns) != 1 else ''} ({', '.join(warns)})"
    return f"kexec allowed ({phase})" + (tail if warns else "")
