"""The YAML configuration: load, validate, defaults.

A missing default file means defaults, and PyYAML is then never imported. An
invalid file raises ConfigError with the file, the line (where one exists) and
what is wrong; the CLI turns it into exit code 2. Invalid is: not a regular file
(a FIFO never hangs the command), over 1 MiB (refused, never cut), bad YAML, a
key given twice or a key that is not a scalar (at any depth), an unknown key, a
wrong type, a number out of range (.nan and .inf included), a control socket
path longer than a unix socket address holds, and a `blocking` phase in which
the check always skips. Nothing is ignored.
"""

import functools
import os
import re
import stat
from typing import Any, NamedTuple

from .checks import PHASES, REGISTRY, Settings
from .host import kind_name

DEFAULT_PATH = "/etc/tdx-preflight/config.yaml"
MSR_POLICIES = ("auto", "never")
#: A configuration file larger than this is refused, never cut.
MAX_SIZE = 1 << 20
#: sun_path holds 108 bytes with the terminating NUL.
MAX_SOCKET_PATH = 107
_MAP_TAG = "tag:yaml.org,2002:map"
_MODULE_VERSION = re.compile(r"\d+\.\d+\.\d+")


class ConfigError(Exception):
    """An invalid configuration file; str() is `FILE:LINE: what is wrong`."""

    def __init__(self, path: str, line: int | None, message: str) -> None:
        self.path, self.line, self.message = path, line, message
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {message}")


class Policy(NamedTuple):
    root: str | None = None
    load_msr_module: str = "auto"
    #: Checks whose warn counts as a fail in the verdict, in every phase.
    block_on_warn: frozenset[str] = frozenset()
    #: Extra phases in which a check blocks (its warn then blocks too). Never fewer.
    blocking: dict[str, frozenset[str]] | None = None
    # -- the daemon --------------------------------------------------------------
    #: Seconds between reconciles with the kernel's truth; 0 disables the timer.
    reconcile_interval: float = 60.0
    control_socket: str = "/run/tdx-preflight/control.sock"
    #: Group owning the control socket (mode 0660); None: root's group.
    socket_group: str | None = None
    state_file: str = "/run/tdx-preflight/state.json"
    #: A state file older than this (seconds) is stale for readers.
    state_max_age: float = 300.0
    #: A control client that sends no complete request within this is dropped.
    client_timeout: float = 10.0
    #: Uevent socket receive buffer (bytes), forced past rmem_max where allowed.
    uevent_rcvbuf: int = 8 * 1024 * 1024
    #: Hold a logind shutdown block inhibitor while TDs run.
    inhibit_shutdown: bool = False
    #: D-Bus address for the inhibitor; None: the system bus.
    inhibit_bus: str | None = None
    #: node_exporter textfile the daemon rewrites after every refresh; None: off.
    metrics_file: str | None = None
    #: TDX module versions (X.Y.ZZ, as tdx_host/version prints them) the operator vouches
    #: implement TDH.SYS.DISABLE; a check's pass that rests on it says so in the report.
    sys_disable_module_versions: tuple[str, ...] = ()
    #: ...and at least this often (seconds), so an idle healthy host never looks stale.
    metrics_interval: float = 60.0
    source: str | None = None

    @property
    def settings(self) -> Settings:
        """What the checks that take the configuration see."""
        return Settings(frozenset(self.sys_disable_module_versions), self.source or DEFAULT_PATH)

    def is_blocking(self, check_id: str, default: frozenset[str], phase: str) -> bool:
        return (
            phase in default
            or check_id in self.block_on_warn
            or phase in (self.blocking or {}).get(check_id, ())
        )

    def warn_blocks(self, check_id: str, phase: str) -> bool:
        return check_id in self.block_on_warn or phase in (self.blocking or {}).get(check_id, ())


def load(path: str | None) -> Policy:
    """Load `path`, or the default file when it exists, or the defaults."""
    if path is None:
        # A dangling link at the default path is a broken configuration, not an absent one.
        if not os.path.lexists(DEFAULT_PATH):
            return Policy()
        path = DEFAULT_PATH
    return parse(_read(path), path)


def _read(path: str) -> str:
    """The file's text: a regular file of at most MAX_SIZE bytes, read whole, never cut."""
    try:
        # O_NONBLOCK: a FIFO opens at once (and is refused below) instead of waiting.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(path, None, f"cannot read: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ConfigError(path, None, f"is {kind_name(mode)}, expected a regular file")
        chunks: list[bytes] = []
        total = 0
        while total <= MAX_SIZE:
            chunk = os.read(fd, MAX_SIZE + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as exc:
        raise ConfigError(path, None, f"cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)
    if total > MAX_SIZE:
        raise ConfigError(path, None, f"larger than {MAX_SIZE} bytes")
    data = b"".join(chunks)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(path, None, f"not UTF-8 at byte {exc.start}") from None


@functools.cache
def _strict_loader() -> type:
    """PyYAML's SafeLoader, except that a mapping key given twice or a key that is not
    a scalar is a ConfigError at its line, at every nesting level.

    Anchors and aliases are plain YAML and allowed. Merge keys (`<<`) are flattened
    first, so a key both merged and given (or merged twice) is a duplicate: the
    override YAML would allow is refused, never "the last one wins".
    """
    import yaml

    class StrictLoader(yaml.SafeLoader):
        config_path = "<config>"

        def checked_pairs(self, node: yaml.MappingNode) -> list[tuple[Any, Any]]:
            self.flatten_mapping(node)
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                line = _line(key_node)
                if not isinstance(key_node, yaml.ScalarNode):
                    raise ConfigError(
                        self.config_path, line, "a key must be a plain value, not a list or mapping"
                    )
                key = self.construct_object(key_node)
                if key in first:
                    raise ConfigError(
                        self.config_path,
                        line,
                        f"duplicate key {key_node.value!r} (first at line {first[key]})",
                    )
                first[key] = line
            return node.value

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            if isinstance(node, yaml.MappingNode):
                self.checked_pairs(node)
            return super().construct_mapping(node, deep)

    return StrictLoader


def parse(text: str, path: str = "<config>") -> Policy:
    """Validate YAML `text` (read from `path`, named in errors) into a Policy."""
    import yaml

    loader = _strict_loader()(text)
    loader.config_path = path
    try:
        node = loader.get_single_node()
        if node is None:
            return Policy(source=path)
        # The settings are read from the nodes: a tag on the document (!!set, an
        # unknown one) would otherwise be ignored, not constructed.
        if not isinstance(node, yaml.MappingNode) or node.tag != _MAP_TAG:
            raise ConfigError(path, _line(node), "expected a mapping of settings")
        values: dict[str, Any] = {}
        for key_node, value_node in loader.checked_pairs(node):
            key = key_node.value
            if key not in _SETTINGS:
                known = ", ".join(sorted(_SETTINGS))
                raise ConfigError(
                    path, _line(key_node), f"unknown setting {key!r} (known: {known})"
                )
            value = loader.construct_object(value_node, deep=True)
            values[key] = _SETTINGS[key](path, value_node, value)
    except RecursionError:
        # PyYAML composes and constructs recursively: deep nesting is no configuration.
        line = getattr(getattr(loader, "mark", None), "line", None)
        raise ConfigError(
            path, line + 1 if isinstance(line, int) else None, "invalid YAML: nested too deeply"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(
            path, mark.line + 1 if mark else None, f"invalid YAML: {problem}"
        ) from None
    finally:
        loader.dispose()
    return Policy(source=path, **values)


def _line(node: Any) -> int:
    return node.start_mark.line + 1


def _root(path: str, node: Any, value: Any) -> str:
    if not isinstance(value, str) or not value or "\0" in value:
        raise ConfigError(path, _line(node), "root: expected a directory path")
    return value


def _msr(path: str, node: Any, value: Any) -> str:
    if value not in MSR_POLICIES:
        raise ConfigError(
            path, _line(node), f"load_msr_module: expected auto or never, got {value!r}"
        )
    return value


def _check_ids(path: str, node: Any, value: Any, what: str) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(path, _line(node), f"{what}: expected a list of check ids")
    for i, v in enumerate(value):
        if v not in REGISTRY:
            line = _line(node.value[i]) if hasattr(node, "value") else _line(node)
            raise ConfigError(path, line, f"{what}: unknown check id {v!r}")
    return frozenset(value)


def _block_on_warn(path: str, node: Any, value: Any) -> frozenset[str]:
    return _check_ids(path, node, value, "block_on_warn")


def _blocking(path: str, node: Any, value: Any) -> dict[str, frozenset[str]]:
    if not isinstance(value, dict):
        raise ConfigError(path, _line(node), "blocking: expected a mapping of check id to phases")
    out: dict[str, frozenset[str]] = {}
    for key_node, value_node in node.value:
        check_id = key_node.value
        if check_id not in REGISTRY:
            raise ConfigError(path, _line(key_node), f"blocking: unknown check id {check_id!r}")
        phases = value[check_id]
        if isinstance(phases, str):
            phases = [phases]
        if not isinstance(phases, list) or not all(p in PHASES for p in phases):
            raise ConfigError(
                path,
                _line(value_node),
                f"blocking.{check_id}: expected a list of phases from {', '.join(PHASES)}",
            )
        skips = REGISTRY[check_id].skips
        for phase in phases:
            if phase in skips:
                raise ConfigError(
                    path,
                    _line(value_node),
                    f"blocking.{check_id}: the check always skips in {phase} "
                    f"({skips[phase]}), so blocking there can never take effect",
                )
        out[check_id] = frozenset(phases)
    return out


def _number(minimum: float, maximum: float, integer: bool = False) -> Any:
    def check(path: str, node: Any, value: Any) -> float:
        ok = isinstance(value, int) if integer else isinstance(value, (int, float))
        # .nan compares false with everything, .inf is above any maximum: both refused here.
        if isinstance(value, bool) or not ok or not minimum <= value <= maximum:
            kind = "an integer" if integer else "a number"
            raise ConfigError(
                path, _line(node), f"expected {kind} from {minimum} to {maximum}, got {value!r}"
            )
        return value

    return check


def _path(path: str, node: Any, value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise ConfigError(path, _line(node), f"expected an absolute path, got {value!r}")
    return value


def _socket_path(path: str, node: Any, value: Any) -> str:
    value = _path(path, node, value)
    size = len(os.fsencode(value))
    if size > MAX_SOCKET_PATH:
        raise ConfigError(
            path,
            _line(node),
            f"control_socket: {size} bytes, but a unix socket path holds at most {MAX_SOCKET_PATH}",
        )
    return value


def _optional_str(path: str, node: Any, value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not value or "\0" in value):
        raise ConfigError(path, _line(node), f"expected a name, got {value!r}")
    return value


def _bool(path: str, node: Any, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(path, _line(node), f"expected true or false, got {value!r}")
    return value


def _module_versions(path: str, node: Any, value: Any) -> tuple[str, ...]:
    """A list of X.Y.ZZ strings (YAML would read an unquoted 1.5 as a float: say so)."""
    if not isinstance(value, list):
        raise ConfigError(
            path, _line(node), 'sys_disable_module_versions: expected a list of "X.Y.ZZ" strings'
        )
    seen: set[str] = set()
    for i, v in enumerate(value):
        line = _line(node.value[i])
        if not isinstance(v, str) or not _MODULE_VERSION.fullmatch(v):
            raise ConfigError(
                path,
                line,
                f"sys_disable_module_versions: {v!r} is not a module version as "
                'tdx_host/version prints it (quote it: "1.5.08")',
            )
        if v in seen:
            raise ConfigError(path, line, f"sys_disable_module_versions: {v!r} listed twice")
        seen.add(v)
    return tuple(value)


_SETTINGS = {
    "root": _root,
    "load_msr_module": _msr,
    "block_on_warn": _block_on_warn,
    "blocking": _blocking,
    "reconcile_interval": _number(0, 86400),
    "control_socket": _socket_path,
    "socket_group": _optional_str,
    "state_file": _path,
    "state_max_age": _number(1, 86400),
    "client_timeout": _number(0.1, 3600),
    # SO_RCVBUF takes a C int.
    "uevent_rcvbuf": _number(4096, 2**31 - 1, integer=True),
    "inhibit_shutdown": _bool,
    "inhibit_bus": _optional_str,
    "metrics_file": _path,
    "sys_disable_module_versions": _module_versions,
    "metrics_interval": _number(1, 3600),
}
