"""Error kinds the CLI maps to exit codes: BadInput → 2, anything else → 1."""


class BadInput(ValueError):
    """The user's input is wrong (missing file, malformed JSON, impossible option)."""
