"""The error bigtrain raises for bad user input, before any heavy work starts."""


class ConfigError(ValueError):
    """A config value that cannot work; the message says what was seen and how to fix it."""
