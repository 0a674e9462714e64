"""The one error type a user can fix (bad params, a bad input file, a missing model or package).

The CLI prints it without a traceback and exits 2; every stage raises it, naming the file, line and key at fault."""


class LlmftError(Exception):
    """An error the user can fix. Printed without a traceback."""


class AdapterCheckError(LlmftError):
    """evaluate's adapter checks failed: the tuned side would not be the adapter (evaluate/checks.py)."""
