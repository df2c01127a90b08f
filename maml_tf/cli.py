"""What the entry points do with an error that bad input or the environment causes: one
paragraph naming the problem and the fix, no traceback (``--verbosity=1`` shows it), and
a run stopped by a signal exits with 128 + its number."""

from __future__ import annotations

import contextlib
import sys

from maml_tf.config import ConfigError
from maml_tf.data.errors import DataError
from maml_tf.models.functional import InexactModelError
from maml_tf.harness import NonFiniteError, RunInterrupted

# Most specific first: the checkpointing errors are ConfigErrors.
_KINDS = ((InexactModelError, "Model error"), (ConfigError, "Configuration error"),
          (DataError, "Data error"), (NonFiniteError, "Stopped"), (OSError, "File system error"))


@contextlib.contextmanager
def user_errors(verbose: bool):
    """Turns the errors of ``_KINDS`` into ``SystemExit`` with one paragraph (re-raised as
    they are when ``verbose``) and ``RunInterrupted`` into its exit code."""
    try:
        yield
    except RunInterrupted as e:
        print(e, file=sys.stderr)
        raise SystemExit(e.exit_code)
    except tuple(k for k, _ in _KINDS) as e:
        if verbose:
            raise
        kind = next(name for k, name in _KINDS if isinstance(e, k))
        raise SystemExit(f"{kind}: {e} (--verbosity=1 shows the traceback)")


def argv() -> list[str]:
    """``sys.argv`` with every ``--flagfile`` expanded (paths relative to the flagfile that
    names them); an unreadable or circular flagfile exits with one line."""
    from maml_tf import flags as maml_flags  # defines the flags: only for the entry points
    try:
        return maml_flags.expand_flagfiles(sys.argv)
    except ConfigError as e:
        raise SystemExit(f"Configuration error: {e}")
