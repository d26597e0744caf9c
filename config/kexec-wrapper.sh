#!/bin/sh
# kexec-gated: runs kexec only when `tdx-preflight hook` allows it.
#
# WHAT IT DOES
#   Works out from kexec's own arguments which phase(s) the call needs, runs
#   `/usr/local/bin/tdx-preflight hook PHASE -- ARGS...` for each of them, and only when every
#   hook exits 0 execs the real kexec with the same arguments, untouched. Otherwise kexec is not
#   run and this script exits with the hook's code (1 block, 2 usage or configuration error,
#   3 unknown; 126/127 when tdx-preflight cannot be run at all). Arguments are only ever passed
#   on as "$@": never evaluated, never joined into a shell string.
#
#   Phases, as kexec-tools' getopt loop reads the options:
#     -e --exec -f --force --exec-live-update              exec
#     -l --load --load-preserve-context --load-live-update  load    (with a kernel argument)
#     --load-jump-back-helper                               load
#     -p --load-panic                                       crash   (with a kernel argument)
#     a kernel argument and none of the above               exec    (kexec's default action
#                                                           loads, then runs shutdown(8), whose
#                                                           scripts run `kexec -e`)
#   -s (kexec_file_load), -c, -a, -i, -d, -x, -y, -t and the --append=... family only modify the
#   action: `kexec -s -p KERNEL` is a crash load (kdump-tools runs exactly that). When the
#   arguments name several actions (`-l -e`, or an option value that looks like one), every
#   phase they name is checked. Bundled short options (-sp) and unambiguous abbreviations of
#   long ones (--exe) count as well; an abbreviation of several counts as all of them.
#   A call with no kernel argument and no -e/-f cannot load or execute anything (-u, -S, -h, -v,
#   --print-ckr-size, `-p -u`, or a -l/-p that kexec rejects for want of a kernel): kexec runs
#   without a check, so unloading never depends on the host's state.
#
#   Environment (for tests and unusual installs; the defaults are what hosts use):
#     KEXEC_GATED_PREFLIGHT  the tdx-preflight to run   (default /usr/local/bin/tdx-preflight)
#     KEXEC_GATED_KEXEC      the real kexec             (default /sbin/kexec.distrib when
#                                                        present, see below, else /sbin/kexec)
#     KEXEC_GATED_ACTIVE     set by this script for the real kexec: finding it set on entry
#                            means the "real" kexec led back here (a loop), exit 2
#   The hook's own output goes to stderr, so kexec's stdout stays kexec's.
#
# HOW TO ENABLE
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
#   upgrades of kexec-tools:
#       dpkg-divert --local --rename --divert /sbin/kexec.distrib --add /sbin/kexec
#       ln -s /usr/local/sbin/kexec-gated /sbin/kexec
#   and undo it with
#       rm /sbin/kexec && dpkg-divert --local --rename --remove /sbin/kexec
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
#   - Calls without a kernel argument and without -e/-f run unchecked (see above): they cannot
#     load or execute a kernel, and a kernel already loaded is checked again at `kexec -e`
#     only when that call goes through this script too.
#   - Arguments it cannot interpret only ever add checks, never remove one.

me=kexec-gated
preflight=${KEXEC_GATED_PREFLIGHT:-/usr/local/bin/tdx-preflight}
real=${KEXEC_GATED_KEXEC:-}
if [ -z "$real" ]; then
    if [ -x /sbin/kexec.distrib ]; then
        real=/sbin/kexec.distrib
    else
        real=/sbin/kexec
    fi
fi

if [ -n "${KEXEC_GATED_ACTIVE:-}" ]; then
    echo "$me: $real runs $me again (a loop); not running kexec" >&2
    exit 2
fi

want_exec=no
want_load=no
want_crash=no
jump_back=no
kernel_arg=no

# A long option: its exact name, else every action option it abbreviates (getopt_long takes an
# unambiguous prefix; an ambiguous one is an error there and an extra check here).
long_option() {
    name=${1#--}
    case $name in
        exec | force | exec-live-update)
            want_exec=yes
            return
            ;;
        load | load-preserve-context | load-live-update)
            want_load=yes
            return
            ;;
        load-jump-back-helper)
            jump_back=yes
            return
            ;;
        load-panic)
            want_crash=yes
            return
            ;;
        unload | status | help | version | print-ckr-size | kexec-file-syscall | kexec-syscall | \
            kexec-syscall-auto | reuseinitrd | no-ifdown | no-sync | no-checks | debug)
            return
            ;;
    esac
    for full in exec force exec-live-update; do
        abbreviates "$name" "$full" && want_exec=yes
    done
    for full in load load-preserve-context load-live-update; do
        abbreviates "$name" "$full" && want_load=yes
    done
    abbreviates "$name" load-jump-back-helper && jump_back=yes
    abbreviates "$name" load-panic && want_crash=yes
}

# abbreviates PREFIX WORD: does WORD start with PREFIX?
abbreviates() {
    case $2 in "$1"*) return 0 ;; esac
    return 1
}

# Short options, bundled or not. -t takes a value (-tVALUE); reading its letters as options can
# only add a check.
short_options() {
    rest=$1
    while [ -n "$rest" ]; do
        letter=${rest%"${rest#?}"}
        rest=${rest#?}
        case $letter in
            e | f) want_exec=yes ;;
            l) want_load=yes ;;
            p) want_crash=yes ;;
        esac
    done
}

options_ended=no
for arg in "$@"; do
    if [ "$options_ended" = yes ]; then
        kernel_arg=yes
        continue
    fi
    case $arg in
        --) options_ended=yes ;;
        --*) long_option "${arg%%=*}" ;;
        -?*) short_options "${arg#-}" ;;
        # The kernel, or the value of an option given as a separate argument (--initrd FILE):
        # either way it can only add a check.
        *) kernel_arg=yes ;;
    esac
done

# Without a kernel argument -l and -p have nothing to load (kexec refuses them, or they pick the
# image -u unloads); with one and no action option, kexec's default action ends in kexec -e.
check_load=$jump_back
check_crash=no
if [ "$kernel_arg" = yes ]; then
    [ "$want_load" = yes ] && check_load=yes
    check_crash=$want_crash
    if [ "$want_load" = no ] && [ "$want_crash" = no ]; then
        want_exec=yes
    fi
fi
phases=
[ "$check_load" = yes ] && phases="$phases load"
[ "$check_crash" = yes ] && phases="$phases crash"
[ "$want_exec" = yes ] && phases="$phases exec"

for phase in $phases; do
    "$preflight" hook "$phase" -- "$@" >&2
    code=$?
    if [ "$code" -ne 0 ]; then
        case $code in
            126 | 127) why="$preflight could not be run" ;;
            *) why="tdx-preflight refused the $phase phase" ;;
        esac
        echo "$me: $why (exit $code); $real not run" >&2
        exit "$code"
    fi
done

KEXEC_GATED_ACTIVE=1
export KEXEC_GATED_ACTIVE
exec "$real" "$@"
