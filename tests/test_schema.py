"""The published JSON Schemas (tdx_preflight/schema/): they hold what the code prints, and
they refuse what it must never print. conftest.run_cli validates every JSON output of the
suite against them; these tests show that the validation has teeth."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli, schema_errors, schema_validator
from hostbuilder import VmProc, build, qemu_td_cmdline, tdx_host

from tdx_preflight import schema
from tdx_preflight.checks import ORDER, PHASES, STATUSES

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def td_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A real blocking report: a TD guest alive (exit 1)."""
    td = VmProc(pid=4242, cmdline=qemu_td_cmdline("td1"), misc_tdx=1)
    root = build(tmp_path_factory.mktemp("td"), tdx_host(processes=[td], misc_current={"tdx": 1}))
    run = run_cli("check", "--root", str(root), "--format", "json")
    assert run.code == 1
    return run.json()


def test_the_schemas_are_valid_draft_2020_12() -> None:
    for name in schema.NAMES:
        doc = schema.load(name)
        assert doc["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        schema_validator(name)  # check_schema raises on an invalid schema


def test_the_schema_names_what_the_code_has() -> None:
    defs = schema.load("report")["$defs"]
    assert defs["check_id"]["enum"] == list(ORDER)
    assert defs["phase"]["enum"] == list(PHASES)
    assert defs["check"]["properties"]["status"]["enum"] == list(STATUSES)
    assert defs["report"]["properties"]["checks"]["minItems"] == len(ORDER)


def test_a_real_report_conforms(td_report: dict[str, Any]) -> None:
    assert schema_errors("report", td_report) == []


@pytest.mark.parametrize(
    ("change", "where"),
    [
        # A status the checklist does not have, and an allow code under a block verdict.
        (lambda r: r["checks"][0].update(status="ok"), "checks/0/status"),
        (lambda r: r.update(exit_code=0), "exit_code"),
        (lambda r: r.update(exit_code=2), "exit_code"),
        (lambda r: r.update(verdict="allow"), "exit_code"),
        (lambda r: r.update(phase="reboot"), "phase"),
        (lambda r: r["host"].update(tdx_in_use=True), "host/tdx_in_use"),
        (lambda r: r["host"]["view"].update(misc_cgroup="v3"), "host/view/misc_cgroup"),
        (lambda r: r["checks"][0].update(id="platform.gpu"), "checks/0/id"),
        (lambda r: r["checks"][0].update(remedy="say something"), "checks/0/remedy"),
        (lambda r: r["checks"].pop(), "checks"),
        (lambda r: r["guests"][0].update(kind="tdx"), "guests/0/kind"),
        (lambda r: r.update(verdikt="allow"), "(top)"),
        (lambda r: r["host"].update(hostname="h1"), "host"),
        (lambda r: r.pop("generated_at"), "(top)"),
        (lambda r: r.update(generated_at="yesterday"), "generated_at"),
    ],
)
def test_a_wrong_report_fails_validation(
    td_report: dict[str, Any], change: Any, where: str
) -> None:
    wrong = copy.deepcopy(td_report)
    change(wrong)
    errors = schema_errors("report", wrong)
    assert errors and any(e.startswith(f"{where}:") for e in errors), errors


def test_a_wrong_status_and_guests_fail_validation() -> None:
    no_daemon = {"daemon": None, "exit_code": 4, "why": "no daemon answers"}
    assert schema_errors("status", no_daemon) == []
    assert schema_errors("status", {**no_daemon, "exit_code": 0})
    assert schema_errors("status", {"daemon_pid": 1, "verdict": "allow", "exit_code": 0})
    guests = {
        "schema": 1,
        "enumeration": {
            "method": "proc",
            "complete": True,
            "problem": None,
            "notes": [],
            "unseen": [],
        },
        "tdx_in_use": "yes",
        "root_misc_current_tdx": 0,
        "guests": [],
        "daemon": {"answered": False, "socket": "/run/x.sock", "why": "no daemon answered"},
    }
    assert schema_errors("guests", guests) == []
    assert schema_errors("guests", {**guests, "tdx_in_use": "maybe"})
    assert schema_errors("guests", {**guests, "enumeration": {"method": "ps"}})
    unseen_not_pids = {"method": "proc", "complete": False, "problem": "x", "notes": []}
    assert schema_errors("guests", {**guests, "enumeration": unseen_not_pids})  # no unseen
    unseen_not_pids["unseen"] = ["4242"]
    assert schema_errors("guests", {**guests, "enumeration": unseen_not_pids})


def test_the_schema_command_prints_the_shipped_files() -> None:
    for name in schema.NAMES:
        run = run_cli("schema", name)
        assert run.code == 0, run.stderr
        assert run.stdout == (REPO / "tdx_preflight/schema" / f"{name}.schema.json").read_text()
    assert run_cli("schema").stdout == schema.text("report")
    bad = run_cli("schema", "ledger")
    assert bad.code == 2 and "report" in bad.stderr
