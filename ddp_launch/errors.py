"""One small exception family. Failures are data until the top; the CLI maps these to exit codes."""

from __future__ import annotations


class DdpLaunchError(Exception):
    """Base of every error ddp-launch raises on purpose."""


class ConfigError(DdpLaunchError):
    """Bad input: nothing was started. The CLI prints it on one line and exits 2."""


class MasterUnavailable(DdpLaunchError):
    """A worker or node could not reach the master in time."""


class RegistrationRejected(DdpLaunchError):
    """The master refused a registration (world full, unknown slot, stale generation)."""
