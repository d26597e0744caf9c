#!/bin/sh
# kexec-gated: runs kexec only when `tdx-preflight hook` allows it.
#
# WHAT IT DOES
#   Runs `/usr/local/bin/tdx-preflight hook -- ARGS...` with kexec's own arguments, and only when
#   the hook exits 0 execs the real kexec with the same arguments, untouched. Otherwise kexec is
#   not run and this script exits with the hook's code (1 block, 2 usage or configuration error,
#   3 unknown, also when the hook gives no answer within KEXEC_GATED_TIMEOUT; 126/127 when
#   tdx-preflight cannot be run at all). Arguments are only ever passed on as "$@": never
#   evaluated, never joined into a shell string.
#
#   This script does not read kexec's arguments itself: the hook reads them with the one parser
#   the gate has (tdx_preflight/kexec_args.py), as kexec-tools' getopt_long table reads them,
#   and checks every phase they can perform: -l load, -p crash load, -e exec, -f and no action
#   option at all load then exec, -s/-c only pick the syscall; `-l IMG -e` is checked as load
#   and exec. Arguments it cannot read (an unknown or ambiguous option) are checked as every
#   phase. A call that can neither load nor execute a kernel (-u, -p -u, -S, -h, -v,
#   --print-ckr-size) has nothing to check: the hook allows it.
#
#   Environment (for tests and unusual installs; the defaults are what hosts use):
#     KEXEC_GATED_PREFLIGHT  the tdx-preflight to run   (default /usr/local/bin/tdx-preflight)
#     KEXEC_GATED_KEXEC      the real kexec             (default: the first executable of
#                            /usr/sbin/kexec.distrib, /sbin/kexec.distrib (the diversion,
#                            see below), /usr/sbin/kexec, /sbin/kexec)
#     KEXEC_GATED_ACTIVE     set by this script for the real kexec: finding it set on entry
#                            means the "real" kexec led back here (a loop), exit 2
#     KEXEC_GATED_KMSG       the kernel log to write a refusal to       (default /dev/kmsg)
#     KEXEC_GATED_CONSOLE    the console to write a refusal to          (default /dev/console)
#     KEXEC_GATED_TIMEOUT    seconds the hook may take before the kexec is refused as
#                            unknown (exit 3; default 120): systemd-shutdown waits for its
#                            final kexec -e without a deadline of its own
#                            (these two only for tests: hosts keep the defaults)
#   The hook's own output goes to stderr, so kexec's stdout stays kexec's.
#
#   A refusal leaves its reason in three places: stderr (the hook's one line, then this
#   script's), the kernel log as `<3>kexec-gated: ...` (priority err: `dmesg`, the journal of
#   the next boot when it is persistent, a serial console), and the console when writable. The
#   last two matter at the final `kexec -e` of systemd-shutdown, where stderr is not in any
#   journal any more (journald has stopped) and the refusal otherwise left no trace.
#
# HOW TO ENABLE
#   Debian package: already done. Its postinst diverts kexec-tools' kexec to KEXEC.distrib and
#   links this script (/usr/sbin/kexec-gated) in its place, again whenever kexec-tools is
#   installed later (`dpkg-divert --list '*kexec*'` shows it; see kexec-gated(8)). Make no
#   diversion of your own there: it would clash with the package's. The steps below are for
#   pip installs.
#
#   install -m 0755 config/kexec-wrapper.sh /usr/local/sbin/kexec-gated
#   (`tdx-preflight install-integrations` does this), then call kexec-gated wherever you would
#   call kexec: `kexec-gated -l /boot/vmlinuz-V --initrd=/boot/initrd.img-V --reuse-cmdline`.
#
#   Debian's own callers cannot be pointed at it through /etc/default/kexec: that file is only
#   sourced for variables, and every caller runs kexec by absolute path: /etc/init.d/kexec-load
#   (`/sbin/kexec -l "$KERNEL_IMAGE" ...`), /etc/init.d/kexec (`/sbin/kexec -e`), kdump-tools'
#   kdump-config (KEXEC=/sbin/kexec, set after it sources /etc/default/kdump-tools), and systemd
#   itself (`systemctl kexec` loads with /sbin/kexec, systemd-shutdown jumps with
#   `/sbin/kexec -e`). Put the gate in that path with a local diversion, which survives
#   upgrades of kexec-tools. Divert the path the installed package ships, which dpkg knows by
#   that name only: /sbin/kexec in Debian 12's kexec-tools, /usr/sbin/kexec in newer Debian and
#   Ubuntu releases (on a merged-/usr host /sbin/kexec is the same file either way):
#       kexec=$(dpkg -L kexec-tools | grep -x '.*/s\?bin/kexec')
#       dpkg-divert --local --rename --divert "$kexec.distrib" --add "$kexec"
#       ln -s /usr/local/sbin/kexec-gated "$kexec"
#   and undo it with
#       rm "$kexec" && dpkg-divert --local --rename --remove "$kexec"
#   (`dpkg-divert --list '*kexec*'` shows what is in place.)
#   Every kexec on the host is then checked at the moment it runs. A refused `kexec -e` in
#   systemd-shutdown (systemctl kexec, or a reboot that systemd turned into a kexec because a
#   kernel was loaded) makes systemd-shutdown fall through to a normal reboot; a refused one in
#   /etc/init.d/kexec (sysvinit) lets the reboot script run. Both are cold reboots: the safe
#   alternative. Keep kexec-gated (and tdx-preflight) on the root or /usr file system: systemd-
#   shutdown has unmounted everything else when it runs /sbin/kexec -e.
#
# WHAT IT CANNOT CATCH
#   - Anything that does not run this file: a program calling kexec_load(2), kexec_file_load(2)
#     or reboot(LINUX_REBOOT_CMD_KEXEC) itself, another kexec binary (busybox, a static copy, a
#     container's), and systemd-shutdown when /sbin/kexec cannot be executed at all (a symlink
#     into an unmounted /usr/local): it then calls reboot(RB_KEXEC) directly, ungated.
#   - Changes after the check: a TD guest started between the hook's answer and the jump.
#   - Calls that can neither load nor execute a kernel run unchecked (see above); a kernel
#     already loaded is checked again at `kexec -e` only when that call goes through this
#     script too.
#   - Arguments the hook cannot read only ever add checks, never remove one.

me=kexec-gated
preflight=${KEXEC_GATED_PREFLIGHT:-/usr/local/bin/tdx-preflight}
real=${KEXEC_GATED_KEXEC:-}
if [ -z "$real" ]; then
    # The diverted binary first (either path kexec-tools may ship), then the undiverted one
    # when this script is called as kexec-gated.
    real=/sbin/kexec
    for candidate in /usr/sbin/kexec.distrib /sbin/kexec.distrib /usr/sbin/kexec /sbin/kexec; do
        if [ -x "$candidate" ]; then
            real=$candidate
            break
        fi
    done
fi

if [ -n "${KEXEC_GATED_ACTIVE:-}" ]; then
    echo "$me: $real runs $me again (a loop); not running kexec" >&2
    exit 2
fi

# A hook that does not answer must not hold the host: systemd-shutdown waits for its kexec
# child without a deadline. No answer in time is a refusal ("unknown", exit 3).
limit=${KEXEC_GATED_TIMEOUT:-120}
case $limit in
    '' | *[!0-9]*)
        echo "$me: KEXEC_GATED_TIMEOUT=$limit is not a number of seconds; not running kexec" >&2
        exit 2
        ;;
esac
deadline=""
if command -v timeout >/dev/null 2>&1; then
    deadline="timeout --kill-after=5 $limit"
fi
# The hook's stdout goes to our stderr; its stderr (the reason) is kept to log it.
# shellcheck disable=SC2086 # $deadline is empty or three words, none with spaces
{ reason=$($deadline "$preflight" hook -- "$@" 2>&1 1>&3); } 3>&2
code=$?
if [ "$code" -ne 0 ]; then
    [ -n "$reason" ] && printf '%s\n' "$reason" >&2
    case $code in
        126 | 127) why="$preflight could not be run" ;;
        124 | 137)
            why="tdx-preflight gave no answer within ${limit}s"
            code=3
            ;;
        *) why="tdx-preflight refused this kexec" ;;
    esac
    line="$me: $why (exit $code); $real $* not run"
    last=$(printf '%s\n' "$reason" | tail -n 1)
    [ -n "$last" ] && line="$line: $last"
    echo "$me: $why (exit $code); $real not run" >&2
    # One record each: the kernel log (priority 3, err) and the console. Neither may fail
    # the refusal itself, so their errors are dropped.
    kmsg=${KEXEC_GATED_KMSG:-/dev/kmsg}
    console=${KEXEC_GATED_CONSOLE:-/dev/console}
    # Appended: a path that is a file (a test's, a mistaken setting) is never truncated.
    { printf '<3>%s\n' "$line" >>"$kmsg"; } 2>/dev/null
    if [ -w "$console" ]; then
        { printf '%s\n' "$line" >>"$console"; } 2>/dev/null
    fi
    exit "$code"
fi

KEXEC_GATED_ACTIVE=1
export KEXEC_GATED_ACTIVE
exec "$real" "$@"
