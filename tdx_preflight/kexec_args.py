"""kexec's arguments, read as kexec-tools reads them: which phases a call can perform.

One table (`LONG`, `SHORT`) mirrors kexec-tools' getopt_long table for x86
(kexec/kexec.h KEXEC_OPTIONS and KEXEC_OPT_STR "h?vdfixyluet:pscaS",
kexec/arch/i386/include/arch/options.h KEXEC_ARCH_OPTIONS and
KEXEC_ALL_OPTIONS), and `parse_kexec_args` walks an argument vector the way
GNU getopt_long does: options anywhere (the non-options are permuted to the
end), `--` ends the options, bundled short options count letter by letter, a
short option that takes a value takes the rest of its bundle or the next
argument, a long option may be abbreviated to an unambiguous prefix and takes
its value after `=` or as the next argument.

The phases are those of main()'s switch, where the last action wins
(`do_load`, `do_exec`, `do_shutdown`: no action at all loads and then runs
`shutdown -r now`, that is load then exec), joined with the phase of every
action option named (DESIGN.md, "The gate": `-l IMG -e` is checked as load
and exec although kexec-tools performs only the exec). An unload clears the
loads named before it, as it clears `do_load`. What this table cannot read
(an unknown or ambiguous option, a value missing at the end) counts as every
phase: kexec refuses such a vector, but another build of kexec may read it,
so the gate never checks fewer phases than some kexec could perform. GNU
getopt stops at the first non-option when POSIXLY_CORRECT is set: both
readings are taken.

This is the only parser of kexec's arguments: the hook, `exec` and the shell
wrapper (config/kexec-wrapper.sh calls the hook) all read them here.
"""

from typing import NamedTuple

from .checks import PHASES as ALL_PHASES  # the order the gate checks and reports them

# What an option does to main()'s state (kexec/kexec.c). None: a modifier (syscall choice,
# loader arguments, debug): it changes how, never whether, a kernel is loaded or executed.
LOAD, CRASH, EXEC, FORCE, UNLOAD, STATUS, STOP = (
    "load", "crash", "exec", "force", "unload", "status", "stop"
)  # fmt: skip
#: load-preserve-context and load-live-update load; load-jump-back-helper loads a helper.
LOAD_OTHER, JUMP_BACK = "load-other", "jump-back"


class KexecOption(NamedTuple):
    """One row of kexec-tools' option table."""

    takes_value: bool
    action: str | None
    #: getopt's `val`: names that share it are one option (--append, --command-line).
    val: str


def _opt(takes_value: bool, action: str | None = None, val: str = "") -> KexecOption:
    return KexecOption(takes_value, action, val)


_LONG: dict[str, KexecOption] = {
    "help": _opt(False, STOP),
    "version": _opt(False, STOP),
    "force": _opt(False, FORCE),
    "no-checks": _opt(False),
    "no-ifdown": _opt(False),
    "no-sync": _opt(False),
    "load": _opt(False, LOAD),
    "unload": _opt(False, UNLOAD),
    "exec": _opt(False, EXEC),
    "exec-live-update": _opt(False, EXEC),
    "load-preserve-context": _opt(False, LOAD_OTHER),
    "load-jump-back-helper": _opt(False, JUMP_BACK),
    "load-live-update": _opt(False, LOAD_OTHER),
    "entry": _opt(True),
    "type": _opt(True),
    "load-panic": _opt(False, CRASH),
    "mem-min": _opt(True),
    "mem-max": _opt(True),
    "reuseinitrd": _opt(False),
    "kexec-file-syscall": _opt(False),
    "kexec-syscall": _opt(False),
    "kexec-syscall-auto": _opt(False),
    "debug": _opt(False),
    "status": _opt(False, STATUS),
    "print-ckr-size": _opt(False, STOP),
    "hotplug": _opt(False),
    "reset-vga": _opt(False),
    "serial": _opt(True),
    "serial-baud": _opt(True),
    "console-vga": _opt(False),
    "console-serial": _opt(False),
    "elf32-core-headers": _opt(False),
    "elf64-core-headers": _opt(False),
    "pass-memmap-cmdline": _opt(False),
    "noefi": _opt(False),
    "reuse-video-type": _opt(False),
    "command-line": _opt(True, None, "append"),
    "append": _opt(True, None, "append"),
    "reuse-cmdline": _opt(False),
    "initrd": _opt(True, None, "ramdisk"),
    "ramdisk": _opt(True, None, "ramdisk"),
    "args-elf": _opt(False),
    "args-linux": _opt(False),
    "args-none": _opt(False),
    "module": _opt(True),
    "real-mode": _opt(False),
    "entry-32bit": _opt(False),
    "dtb": _opt(True),
}
#: Long options: kexec.h KEXEC_OPTIONS, then the x86 KEXEC_ARCH_OPTIONS and KEXEC_ALL_OPTIONS.
LONG: dict[str, KexecOption] = {n: o._replace(val=o.val or n) for n, o in _LONG.items()}

#: Short options: KEXEC_OPT_STR "h?vdfixyluet:pscaS" (only -t takes a value).
SHORT: dict[str, KexecOption] = {
    "h": LONG["help"],
    "?": _opt(False, STOP, "?"),
    "v": LONG["version"],
    "d": LONG["debug"],
    "f": LONG["force"],
    "i": LONG["no-checks"],
    "x": LONG["no-ifdown"],
    "y": LONG["no-sync"],
    "l": LONG["load"],
    "u": LONG["unload"],
    "e": LONG["exec"],
    "t": LONG["type"],
    "p": LONG["load-panic"],
    "s": LONG["kexec-file-syscall"],
    "c": LONG["kexec-syscall"],
    "a": LONG["kexec-syscall-auto"],
    "S": LONG["status"],
}


class KexecArgs(NamedTuple):
    """What a kexec argument vector can do."""

    #: Every phase the arguments can perform, in ALL_PHASES order; () when none
    #: (an unload, --status, --help).
    phases: tuple[str, ...]
    #: The kernel image they name (kexec's first non-option argument), if any.
    image: str | None
    #: Why the vector counts as every phase, when the table could not read it.
    unreadable: str | None = None


#: The phase each action option names, counted whatever comes after it (DESIGN.md, "The gate").
_NAMED: dict[str | None, set[str]] = {
    LOAD: {"load"},
    LOAD_OTHER: {"load"},
    JUMP_BACK: {"load"},
    CRASH: {"crash"},
    EXEC: {"exec"},
    FORCE: {"load", "exec"},
}


class _Main:
    """main()'s action state in kexec/kexec.c, and the actions named on the way."""

    def __init__(self) -> None:
        self.load, self.exec, self.shutdown = True, False, True
        self.crash = self.jump_back = self.status = self.stopped = False
        self.named: set[str] = set()

    def apply(self, action: str | None) -> None:
        self.named |= _NAMED.get(action, set())
        if action == UNLOAD:
            self.named -= {"load", "crash"}
        if action is None or self.stopped:
            return
        if action == STOP:  # usage(), version(), print-ckr-size: kexec returns at once
            self.stopped = True
        elif action == STATUS:
            self.status = True
        elif action == UNLOAD:
            self.load = self.shutdown = False
        elif action == EXEC:
            self.load = self.shutdown = False
            self.exec = True
        elif action == FORCE:
            self.load = self.exec = True
            self.shutdown = False
        elif action == JUMP_BACK:
            self.load = self.exec = self.shutdown = False
            self.jump_back = True
        else:  # LOAD, LOAD_OTHER, CRASH
            self.load, self.exec, self.shutdown = True, False, False
            # -p sets KEXEC_FILE_ON_CRASH and nothing clears it: a later load stays a crash load.
            self.crash = self.crash or action == CRASH

    def phases(self) -> set[str]:
        done: set[str] = set()
        if not (self.stopped or self.status):
            if self.load:
                done.add("crash" if self.crash else "load")
            if self.exec or self.shutdown:
                done.add("exec")
            if self.jump_back:
                done.add("load")
        return done | self.named


def _long(arg: str) -> tuple[KexecOption | None, str | None, str]:
    """A `--name[=value]` argument: its option (None when unknown or ambiguous), value, name."""
    name, eq, value = arg[2:].partition("=")
    found = LONG.get(name)
    if found is None:
        matches = {LONG[n] for n in LONG if n.startswith(name)}
        # getopt_long takes a prefix of one option; names sharing one `val` are one option.
        found = next(iter(matches)) if len(matches) == 1 else None
    return found, (value if eq else None), name


def _read(args: list[str], permute: bool) -> tuple[set[str], str | None, str | None]:
    """One getopt_long reading: (phases, image, why unreadable)."""
    main = _Main()
    positional: list[str] = []
    unreadable: str | None = None
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            positional.extend(args[i:])
            break
        if arg == "-" or not arg.startswith("-"):
            positional.append(arg)
            if not permute:
                positional.extend(args[i:])
                break
            continue
        if arg.startswith("--"):
            opt, value, name = _long(arg)
            if opt is None:
                unreadable = unreadable or f"--{name} is unknown or ambiguous"
                continue
            if value is not None and not opt.takes_value:
                unreadable = unreadable or f"--{name} takes no value"
                continue
            if opt.takes_value and value is None:
                if i >= len(args):
                    unreadable = unreadable or f"--{name} needs a value"
                    continue
                i += 1
            main.apply(opt.action)
            continue
        letters = arg[1:]
        for n, letter in enumerate(letters):
            opt = SHORT.get(letter)
            if opt is None:
                unreadable = unreadable or f"-{letter} is not a kexec option"
                continue
            main.apply(opt.action)
            if opt.takes_value:
                if n + 1 == len(letters):  # the value is the next argument
                    if i >= len(args):
                        unreadable = unreadable or f"-{letter} needs a value"
                    i += 1
                break  # the rest of the bundle is the value
    phases = set(ALL_PHASES) if unreadable else main.phases()
    return phases, (positional[0] if positional else None), unreadable


def parse_kexec_args(args: list[str] | tuple[str, ...]) -> KexecArgs:
    """Every phase kexec's arguments (argv without "kexec") can perform, and the image.

    Both GNU getopt readings are taken (options permuted, and stopping at the
    first non-option as under POSIXLY_CORRECT); what the table cannot read
    counts as every phase.
    """
    args = list(args)
    phases, image, unreadable = _read(args, permute=True)
    strict, _, strict_unreadable = _read(args, permute=False)
    phases |= strict
    return KexecArgs(
        tuple(p for p in ALL_PHASES if p in phases), image, unreadable or strict_unreadable
    )


def gate_phases(explicit: str | None, kexec: KexecArgs | None) -> tuple[str, ...]:
    """The phases the gate checks: those kexec's arguments can perform, plus an explicit one."""
    wanted = set(kexec.phases) if kexec is not None else set()
    if explicit:
        wanted.add(explicit)
    return tuple(p for p in ALL_PHASES if p in wanted)


def command_phases(command: tuple[str, ...]) -> KexecArgs:
    """What a command run by `exec` can do: kexec's arguments read by the table,
    `systemctl [OPTIONS] kexec` loads (when no kernel is loaded) then executes, and
    any other command, which the gate cannot read (`sh -c ...`, `env kexec ...`, a
    script), counts as every phase."""
    import os

    name = os.path.basename(command[0]) if command else ""
    if name.startswith("kexec"):
        return parse_kexec_args(command[1:])
    verbs = [a for a in command[1:] if not a.startswith("-")]
    if name == "systemctl" and verbs[:1] == ["kexec"]:
        return KexecArgs(("load", "exec"), None)
    return KexecArgs(ALL_PHASES, None, f"{name or 'the command'} is not kexec: every phase")
