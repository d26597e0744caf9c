#!/bin/sh
# Prints a help2man include file with a COMMANDS section: every command that
# `TOOL --help` lists, with its own `TOOL COMMAND --help` verbatim, so that the
# manual page says what the built tool says. Fails (and the build with it) when
# the tool lists no command or a command's help is not its help.
#
# Usage: debian/command-help.sh TOOL
set -eu

tool=$1
# 74 columns: click then wraps at 72, which fits the manual's indented blocks on 80 columns.
COLUMNS=74
export COLUMNS

commands=$("$tool" --help | sed -n '/^Commands:$/,$ s/^  \([a-z][a-z-]*\) .*/\1/p')
if [ -z "$commands" ]; then
    echo "$0: $tool --help lists no commands" >&2
    exit 1
fi

echo '[COMMANDS]'
printf '%s\n' "Each command's own help, as \\fBtdx\\-preflight\\fR \\fICOMMAND\\fR \\fB\\-\\-help\\fR prints it."
for command in $commands; do
    # check, hook and exec exit 2 after their help (they exit 0 only on allow): the first
    # line, not the exit code, tells help from an error.
    help=$("$tool" "$command" --help) || true
    case $help in
        "Usage: tdx-preflight $command "* | "Usage: tdx-preflight $command") ;;
        *)
            echo "$0: $tool $command --help did not print its help" >&2
            exit 1
            ;;
    esac
    printf '.SS %s\n' "$(printf '%s' "$command" | sed 's/-/\\-/g')"
    echo '.nf'
    # roff: a backslash is \e, a hyphen \- (stays ASCII, as typed), a leading . or ' is text.
    printf '%s\n' "$help" | sed -e 's/\\/\\e/g' -e 's/-/\\-/g' -e "s/^\\([.']\\)/\\\\\\&\\1/"
    echo '.fi'
done
