"""The agent: uevent watcher, VM ledger, reconcile, control socket, state file, systemd."""
