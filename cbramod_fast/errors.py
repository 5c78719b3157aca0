"""The package's errors: input a user can fix. The command line prints such an error as one line (exit 2)."""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input a user can fix (an argument, a setting, a file). A ``ValueError``, so library callers may
    catch either; ``cbramod-fast`` reports it as one line and exits with code 2."""


class ConfigError(UsageError):
    """An invalid setting. ``template`` holds a ``{name}`` slot: the message names the setting's field
    (``steps must be >= 1``); a command line fills in its flag instead (``--steps must be >= 1``)."""

    def __init__(self, setting: str, template: str):
        self.setting, self.template = setting, template
        super().__init__(template.format(name=setting))

    def named(self, name: str) -> str:
        """The message with the setting called ``name`` (e.g. its command-line flag)."""
        return self.template.format(name=name)


class RecordError(UsageError):
    """A recording that cannot be used (corrupt, truncated, unknown unit, none of the requested leads, ...);
    the message names the file."""
