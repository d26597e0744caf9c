"""The Debian package, built for real from a copy of the tree and installed into a throwaway root.

dpkg-buildpackage builds the .deb (debian/: dh, pybuild's pyproject plugin,
dh_installsystemd) with Debian's own python3 and nothing from a venv; lintian
must report no error; dpkg-deb shows what it holds. Then a Debian 12 root
made by mmdebstrap (cached under .cache/, see BASE_PACKAGES) gets the .deb
with `dpkg -i`, runs it, and `apt-get purge` must leave the same file list,
the same kexec and no diversion. The root runs in its own mount and PID
namespace (unshare), so this machine is never changed: the build tools come
from README's test command (.ci/run), like every other dependency.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from debbuild import BUILD_ENV, REPO, BuildFailed, build_deb, build_tools_missing

from tdx_preflight.cli import cli

CACHE = REPO / ".cache" / "debian-root"
#: The throwaway root holds the package's dependencies and kexec-tools before the install,
#: so that the install and purge compared are the package's alone (and the diversion has a
#: kexec to divert).
BASE_PACKAGES = (
    "python3-click",
    "python3-yaml",
    "python3-psutil",
    "python3-jeepney",
    "python3-prometheus-client",
    "kexec-tools",
)
MIRRORS = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
DEB_DEPENDS = (
    "python3-click",
    "python3-jeepney",
    "python3-prometheus-client",
    "python3-psutil",
    "python3-yaml",
)

needs_build_tools = pytest.mark.skipif(
    bool(build_tools_missing()),
    reason="needs dpkg-buildpackage, dh-python, pybuild-plugin-pyproject and lintian "
    "(README's test command installs them)",
)


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]


def test_readme_test_command_is_what_ci_runs() -> None:
    """The build tools reach CI only through this command: README's and .ci/run's are one."""
    readme = (REPO / "README.md").read_text().splitlines()
    at = readme.index("# run the whole test suite (the same command CI runs: .ci/run)")
    ci = (REPO / ".ci/run").read_text().rstrip("\n").splitlines()[-1]
    assert readme[at + 1] == ci
    assert "mmdebstrap" in ci and "pybuild-plugin-pyproject" in ci and "lintian" in ci
    assert "qemu-system-x86" in ci  # the e2e guest (tests/e2e) runs in CI too
    # Build-Depends of the manual page (debian/control): help2man runs the built tool.
    assert "help2man" in ci and "python3-click" in ci
    assert ci.count("apt-get install -y -qq --no-upgrade --no-install-recommends ") == 1


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The .deb built by dpkg-buildpackage from a copy of the tree (tracked and new files)."""
    try:
        return build_deb(tmp_path_factory.mktemp("debbuild"))
    except BuildFailed as exc:
        pytest.fail(f"dpkg-buildpackage failed:\n{exc}")


#: lintian's tags about manual pages: missing (no-manual-page), in the wrong section, with a
#: bad NAME line, or with groff warnings.
MAN_PAGE_TAG = re.compile(r"^[EW]: [^:]+: \S*(manual|manpage|groff|whatis)", re.MULTILINE)


@needs_build_tools
def test_lintian_reports_no_error(deb: Path) -> None:
    (changes,) = deb.parent.glob("tdx-preflight_*.changes")
    out = _run(["lintian", "--tag-display-limit", "0", str(changes)], env=BUILD_ENV)
    # lintian exits 0 unless it found an error (or could not run at all).
    assert out.returncode == 0, out.stdout + out.stderr
    errors = [line for line in out.stdout.splitlines() if line.startswith("E:")]
    assert errors == [], out.stdout
    # Both commands have a manual page, and a clean one.
    assert "no-manual-page" not in out.stdout, out.stdout
    assert MAN_PAGE_TAG.findall(out.stdout) == [], out.stdout


@needs_build_tools
def test_package_holds_the_integrations_at_debian_paths(deb: Path, tmp_path: Path) -> None:
    listing = _run(["dpkg-deb", "-c", str(deb)])
    assert listing.returncode == 0, listing.stderr
    paths = {line.split()[5].removeprefix(".") for line in listing.stdout.splitlines()}
    for path in (
        "/usr/bin/tdx-preflight",
        "/usr/sbin/kexec-gated",
        "/lib/systemd/system/tdx-preflight.service",
        "/lib/systemd/system/kexec-load.service.d/tdx-preflight.conf",
        "/lib/systemd/system/kdump-tools.service.d/tdx-preflight.conf",
        "/lib/systemd/system/kdump.service.d/tdx-preflight.conf",
        "/etc/tdx-preflight/config.yaml",
        "/usr/share/tdx-preflight/prometheus/tdx-preflight-rules.yaml",
        "/usr/share/tdx-preflight/kured/kured-daemonset-patch.yaml",
        "/usr/share/tdx-preflight/kured/README.md",
        "/usr/lib/python3/dist-packages/tdx_preflight/daemon/uevents.py",
        "/usr/share/man/man1/tdx-preflight.1.gz",
        "/usr/share/man/man8/kexec-gated.8.gz",
    ):
        assert path in paths, f"{path} not in the package"
    # The wheel's copy of the integrations is for install-integrations (pip installs) only.
    assert not [p for p in paths if "/shipped/" in p]

    conffiles = _run(["dpkg-deb", "-I", str(deb), "conffiles"]).stdout.split()
    assert conffiles == ["/etc/tdx-preflight/config.yaml"]
    depends = _run(["dpkg-deb", "-f", str(deb), "Depends"]).stdout
    for name in DEB_DEPENDS:
        assert name in depends
    assert "pyroute2" not in depends

    root = tmp_path / "x"
    assert _run(["dpkg-deb", "-x", str(deb), str(root)]).returncode == 0
    unit = (root / "lib/systemd/system/tdx-preflight.service").read_text()
    assert "ExecStart=/usr/bin/tdx-preflight daemon" in unit
    assert "ExecReload=/usr/bin/tdx-preflight reload" in unit
    gated = [root / "usr/sbin/kexec-gated", *root.glob("lib/systemd/system/*.d/*.conf")]
    for path in gated:
        text = path.read_text()
        assert "/usr/local/bin/tdx-preflight" not in text, path
        assert "/usr/bin/tdx-preflight" in text, path
    # The tree keeps the pip path: one copy of each file, rewritten at build time only.
    assert (
        "ExecStart=/usr/local/bin/tdx-preflight daemon"
        in (REPO / "systemd/tdx-preflight.service").read_text()
    )

    # tdx-preflight(1) is the built tool's own help: every command, each with its usage line.
    page = gzip.decompress((root / "usr/share/man/man1/tdx-preflight.1.gz").read_bytes()).decode()
    assert page.startswith('.\\" DO NOT MODIFY THIS FILE!  It was generated by help2man')
    assert '.TH TDX-PREFLIGHT "1"' in page
    assert "tdx-preflight \\- decide whether an Intel TDX host may kexec now" in page
    assert cli.commands
    for name in cli.commands:
        roff = name.replace("-", "\\-")
        assert f".SS {roff}\n.nf\nUsage: tdx\\-preflight {roff}" in page, name
    # Whole command lines (click shortens a long first help line with "..."), and choice
    # arguments named the same whichever click built the page.
    commands = page.split("Commands:", 1)[1].split(".SH", 1)[0]
    assert "..." not in commands, commands
    assert "hook [OPTIONS] [PHASE] [\\-\\- KEXEC ARGS...]" in page
    assert "[[" not in page


def _roff_text(page: str) -> str:
    return page.replace("\\-", "-").replace("\\&", "")


def test_manual_page_sections_cover_every_exit_status_and_the_diversion() -> None:
    """debian/tdx-preflight.h2m, written by hand: the exit codes of every command that has
    its own (guests, status, reload besides check, hook and exec), and the files the package
    puts in kexec's place (kexec-gated(8) has the details)."""
    h2m = _roff_text((REPO / "debian/tdx-preflight.h2m").read_text())
    exit_status = h2m.split("[EXIT STATUS]", 1)[1].split("[FILES]", 1)[0]
    for command in ("check and hook:", "exec exits", "guests:", "status:", "reload:"):
        assert command in exit_status, command
    assert "4 when no daemon answers" in exit_status and "4 no daemon answers" in exit_status
    files = h2m.split("[FILES]", 1)[1].split("[SEE ALSO]", 1)[0]
    for path in ("/usr/sbin/kexec-gated", "/sbin/kexec.distrib", "/usr/sbin/kexec.distrib"):
        assert path in files, path
    assert "dpkg-divert --list" in files


def test_kexec_gated_manual_page_matches_the_wrapper() -> None:
    """debian/kexec-gated.8 is written by hand: held to the script's variables and defaults."""
    script = (REPO / "config/kexec-wrapper.sh").read_text()
    page = _roff_text((REPO / "debian/kexec-gated.8").read_text())
    variables = set(re.findall(r"\bKEXEC_GATED_[A-Z]+\b", script))
    assert len(variables) == 6, variables
    assert set(re.findall(r"^\.B (KEXEC_GATED_[A-Z]+)$", page, re.MULTILINE)) == variables
    # The real kexec: the same candidates, in the script's order.
    (candidates,) = re.findall(r"^    for candidate in (.*); do$", script, re.MULTILINE)
    documented = page.split(".B KEXEC_GATED_KEXEC\n", 1)[1].split(".TP", 1)[0]
    assert re.findall(r"/\S*?kexec(?:\.distrib)?\b", documented) == candidates.split()
    # The packaged script runs the packaged tool (debian/rules rewrites the pip path).
    assert "preflight=${KEXEC_GATED_PREFLIGHT:-/usr/local/bin/tdx-preflight}" in script
    assert "(default\n.IR /usr/bin/tdx-preflight )" in page
    # Every exit code is documented: the hook's (1, 2, 3), a shell's when the tool cannot be
    # run (126, 127), the script's own 2 for a bad timeout and a loop, 3 for no answer in time.
    assert re.findall(r"^\s*exit (\S+)$", script, re.MULTILINE) == ["2", "2", '"$code"']
    assert "code=3" in script and "KEXEC_GATED_TIMEOUT" in page
    assert "126 | 127) why=" in script
    for item in (".B 1", ".B 2", ".B 3", '.BR 126 ", " 127'):
        assert f"\n{item}\n" in page, item


# Inside the root: the file list and kexec before, the install and what it must do, a run of
# the tool, leftovers the agent would make, `apt-get purge`, the file list and kexec after.
SCENARIO = r"""
set -eu
# `set -e` stops neither at `! CMD` nor at any command of an && list but the last: a check
# with either says `|| fail` itself.
fail() { echo "scenario failed: $*" >&2; exit 91; }
snap() {
    find / -xdev \( -path /proc -o -path /sys -o -path /dev -o -path /tmp \) -prune -o -print |
        LC_ALL=C sort
}
state() {
    sha256sum /sbin/kexec; dpkg-divert --list | LC_ALL=C sort; cat /var/lib/dpkg/triggers/File
}
# Without kexec-tools: no /sbin/kexec at all.
state2() {
    ls -l /sbin/kexec /sbin/kexec.distrib 2>&1 || true
    dpkg-divert --list | LC_ALL=C sort; cat /var/lib/dpkg/triggers/File
}
snap >/tmp/before; state >/tmp/state.before

dpkg -i /tmp/tdx-preflight.deb
dpkg-divert --list /sbin/kexec | grep -q 'to /sbin/kexec.distrib by tdx-preflight$'
test "$(readlink /sbin/kexec)" = /usr/sbin/kexec-gated
test -L /etc/systemd/system/multi-user.target.wants/tdx-preflight.service
tdx-preflight --version
rc=0; tdx-preflight check --root / --metrics-file /tmp/check.prom || rc=$?
echo "check exit $rc"; case $rc in 0 | 1 | 3) ;; *) exit 90 ;; esac
grep -q '^tdx_preflight_kexec_allowed{' /tmp/check.prom
# kexec --version can neither load nor execute: the gate lets it reach the diverted kexec.
/sbin/kexec --version
python3 -c 'import asyncio
from tdx_preflight.daemon.uevents import UeventSource
s = UeventSource(1 << 20); asyncio.run(s.open()); print("uevent socket", s.effective_rcvbuf)'
# What the agent and an operator leave: a state file, a manifest, an edited conffile.
mkdir -p /run/tdx-preflight /var/lib/tdx-preflight
: >/run/tdx-preflight/state.json; : >/var/lib/tdx-preflight/integrations.json
echo 'block_on_warn: []' >>/etc/tdx-preflight/config.yaml

DEBIAN_FRONTEND=noninteractive apt-get purge -y -q tdx-preflight
snap >/tmp/after; state >/tmp/state.after

# kexec-tools installed after tdx-preflight: the file trigger makes the diversion then.
dpkg -r kexec-tools
dpkg -i /tmp/tdx-preflight.deb
! dpkg-divert --list | grep -q tdx-preflight || fail "diverted without kexec-tools"
DEBIAN_FRONTEND=noninteractive dpkg -i /tmp/kexec-tools.deb
dpkg-divert --list /sbin/kexec | grep -q 'to /sbin/kexec.distrib by tdx-preflight$'
test "$(readlink /sbin/kexec)" = /usr/sbin/kexec-gated
/sbin/kexec --version
dpkg -P tdx-preflight
{ test -f /sbin/kexec && ! test -L /sbin/kexec; } || fail "kexec-tools' kexec not back"
! dpkg-divert --list | grep -q tdx-preflight || fail "diversion left by the purge"
echo "trigger: diverted when kexec-tools came later"

# kexec-tools removed while the diversion stands: dpkg removes its kexec under the diverted
# name, and the same trigger takes our link and the diversion away (no dangling /sbin/kexec).
dpkg -P kexec-tools
snap >/tmp/before2; state2 >/tmp/state2.before
DEBIAN_FRONTEND=noninteractive dpkg -i /tmp/kexec-tools.deb
dpkg -i /tmp/tdx-preflight.deb
dpkg-divert --list /sbin/kexec | grep -q 'to /sbin/kexec.distrib by tdx-preflight$'
test "$(readlink /sbin/kexec)" = /usr/sbin/kexec-gated
dpkg -r kexec-tools
{ ! test -e /sbin/kexec && ! test -L /sbin/kexec; } || fail "/sbin/kexec left behind"
! test -e /sbin/kexec.distrib || fail "kexec-tools' kexec left behind"
! dpkg-divert --list | grep -q tdx-preflight || fail "diversion left without kexec-tools"
test "$(dpkg-query -W -f '${db:Status-Status}' tdx-preflight)" = installed
echo "trigger: undiverted when kexec-tools went"
# Back again: diverted again, by the same trigger.
DEBIAN_FRONTEND=noninteractive dpkg -i /tmp/kexec-tools.deb
dpkg-divert --list /sbin/kexec | grep -q 'to /sbin/kexec.distrib by tdx-preflight$'
test "$(readlink /sbin/kexec)" = /usr/sbin/kexec-gated
{ test -x /sbin/kexec.distrib && ! test -L /sbin/kexec.distrib; } || fail "no kexec diverted"
/sbin/kexec --version
echo "trigger: diverted again when kexec-tools came back"
# An operator's own (local) diversion of kexec: installing must not fail over it, nor replace
# what the operator put there; it warns that this kexec is not gated by the package.
dpkg -P tdx-preflight
{ test -f /sbin/kexec && ! test -L /sbin/kexec; } || fail "kexec-tools' kexec not back"
dpkg-divert --local --rename --divert /sbin/kexec.real --add /sbin/kexec
ln -s /bin/true /sbin/kexec
dpkg -i /tmp/tdx-preflight.deb 2>/tmp/clash.err || fail "install failed over a local diversion"
grep -q 'WARNING: /sbin/kexec is diverted by LOCAL' /tmp/clash.err || fail "no warning"
test "$(readlink /sbin/kexec)" = /bin/true || fail "the operator's kexec was replaced"
test "$(dpkg-divert --listpackage /sbin/kexec)" = LOCAL || fail "the local diversion is gone"
dpkg -P tdx-preflight
test "$(readlink /sbin/kexec)" = /bin/true || fail "the purge touched the operator's kexec"
rm /sbin/kexec && dpkg-divert --local --rename --remove /sbin/kexec
echo "clash: an operator's local diversion stands through install and purge"
# An operator's own file at /sbin/kexec under our diversion: kept, with a loud warning.
dpkg -i /tmp/tdx-preflight.deb
rm /sbin/kexec && printf '#!/bin/sh\nexit 0\n' >/sbin/kexec && chmod 755 /sbin/kexec
dpkg-reconfigure tdx-preflight 2>/tmp/own.err || fail "reconfigure failed"
grep -q "WARNING: /sbin/kexec is neither kexec-gated's link" /tmp/own.err || fail "no warning"
rm /sbin/kexec && ln -s /usr/sbin/kexec-gated /sbin/kexec
DEBIAN_FRONTEND=noninteractive apt-get purge -y -q tdx-preflight kexec-tools
snap >/tmp/after2; state2 >/tmp/state2.after
"""

#: Written by every dpkg and apt run, whatever the package (mmdebstrap empties apt's caches
#: and lists; apt-get recreates them).
CHURN = (
    "/var/cache/apt/",
    "/var/lib/apt/",
    "/var/cache/debconf/",
    "/var/lib/dpkg/",
    "/var/log/",
    "/var/cache/ldconfig/",
)
#: dpkg's own bookkeeping that must not keep anything of the package.
CHURN_EXCEPT = ("/var/lib/dpkg/info/tdx-preflight.",)


def _base_root() -> Path:
    """mmdebstrap's bookworm root with BASE_PACKAGES, as a tarball cached by its recipe."""
    key = hashlib.sha256("\n".join((*BASE_PACKAGES, *MIRRORS)).encode()).hexdigest()[:16]
    tarball = CACHE / f"bookworm-{key}.tar"
    if tarball.exists():
        return tarball
    if not shutil.which("mmdebstrap", path=BUILD_ENV["PATH"]):
        pytest.fail("mmdebstrap is missing (README's test command installs it)")
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = tarball.with_suffix(f".{os.getpid()}.partial.tar")
    made = _run(
        [
            "nice",
            "-n",
            "10",
            "mmdebstrap",
            "--quiet",
            "--mode=root",
            "--variant=apt",
            "--include=" + ",".join(BASE_PACKAGES),
            "bookworm",
            str(partial),
            *MIRRORS,
        ],
        env=BUILD_ENV,
    )
    assert made.returncode == 0, made.stderr[-4000:]
    partial.rename(tarball)
    return tarball


@needs_build_tools
@pytest.mark.skipif(os.geteuid() != 0, reason="the throwaway root needs root (chroot, unshare)")
def test_install_then_purge_leaves_the_root_as_it_was(deb: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with tarfile.open(_base_root()) as tar:
        tar.extractall(root, filter="fully_trusted")
    shutil.copy(deb, root / "tmp/tdx-preflight.deb")
    # kexec-tools' own .deb, to install it again after tdx-preflight (from the same archive
    # the root came from; apt-get download writes only into its working directory).
    fetched = _run(["apt-get", "download", "-q", "kexec-tools"], cwd=tmp_path, env=BUILD_ENV)
    assert fetched.returncode == 0, fetched.stderr
    (kexec_tools,) = tmp_path.glob("kexec-tools_*.deb")
    shutil.copy(kexec_tools, root / "tmp/kexec-tools.deb")
    (root / "tmp/scenario.sh").write_text(SCENARIO)
    # Private mount and PID namespaces: the mounts go away with the process, on any exit.
    inner = (
        f'r="{root}"; mount --make-rprivate / && mount -t proc proc "$r/proc" && '
        f'mount --rbind /sys "$r/sys" && mount --rbind /dev "$r/dev" && '
        f'exec chroot "$r" /bin/sh -x /tmp/scenario.sh'
    )
    env = {**BUILD_ENV, "HOME": "/root"}
    run = _run(["unshare", "--mount", "--pid", "--fork", "sh", "-c", inner], env=env)
    log = run.stdout[-6000:] + run.stderr[-6000:]
    assert run.returncode == 0, log

    def ours(path: str) -> bool:
        return not path.startswith(CHURN) or path.startswith(CHURN_EXCEPT)

    for tag, what in (("", "install + purge"), ("2", "kexec-tools gone and back + purge")):
        before = (root / f"tmp/before{tag}").read_text().splitlines()
        after = (root / f"tmp/after{tag}").read_text().splitlines()
        added = sorted(set(after) - set(before))
        removed = sorted(set(before) - set(after))
        assert [p for p in added if ours(p)] == [], (what, log)
        assert [p for p in removed if ours(p)] == [], (what, log)
        print(f"{what}: {len(before)} paths before and after; dpkg/apt churn only: {added}")
        # The same kexec (or none), no diversion and no file trigger left.
        state_before = (root / f"tmp/state{tag}.before").read_text()
        assert (root / f"tmp/state{tag}.after").read_text() == state_before, what
        assert "tdx-preflight" not in state_before, what
    assert "No such file" in (root / "tmp/state2.after").read_text()
    assert "check exit" in run.stdout
    assert "trigger: diverted when kexec-tools came later" in run.stdout
    assert "trigger: undiverted when kexec-tools went" in run.stdout
    assert "trigger: diverted again when kexec-tools came back" in run.stdout


def test_readme_names_the_shared_files_the_package_installs() -> None:
    """README's table of what the package holds names each file debian/rules installs under
    /usr/share/tdx-preflight/ by its real name (kured's: every file of config/kured/)."""
    rules = (REPO / "debian/rules").read_text()
    readme = (REPO / "README.md").read_text()
    share = "/usr/share/tdx-preflight/"
    named = re.findall(r"\$\(SHARE\)/(\S+\.\w+)", rules)
    assert named, rules
    kured = [f"kured/{p.name}" for p in sorted((REPO / "config/kured").iterdir())]
    for path in [*named, *kured]:
        assert f"{share}{path}" in readme, path
    assert "PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b" in readme
