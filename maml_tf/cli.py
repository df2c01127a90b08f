"""What the entry points do with an error that bad input or the environment causes: one
paragraph naming the problem and the fix, no traceback (``--verbosity=1`` shows it), and
a run stopped by a signal exits with 128 + its number."""

from __future__ import annotations

import contextlib
import sys
from typing import Sequence

from absl import flags as absl_flags

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
        raise SystemExit(e.exit_code) from None
    except tuple(k for k, _ in _KINDS) as e:
        if verbose:
            raise
        kind = next(name for k, name in _KINDS if isinstance(e, k))
        raise SystemExit(f"{kind}: {e} (--verbosity=1 shows the traceback)") from None


def argv(values: absl_flags.FlagValues, only: Sequence[str] | None = None) -> list[str]:
    """``sys.argv`` with every ``--flagfile`` expanded (paths relative to the flagfile that
    names them); an unreadable or circular flagfile exits with one line. ``--help`` (``-h``)
    prints the flags of ``values`` (the entry point's ``FLAGS``) by the config's sections and
    exits; only: the flags this entry point takes (None: all)."""
    from maml_tf import flags as maml_flags  # defines the flags: only for the entry points
    if any(a in ("--help", "-h", "-?", "--helpshort") for a in sys.argv[1:]):
        main = sys.modules.get("__main__")
        print(maml_flags.sectioned_help(values, getattr(main, "__doc__", "") or "", only))
        raise SystemExit(0)
    try:
        return maml_flags.expand_flagfiles(sys.argv)
    except ConfigError as e:
        raise SystemExit(f"Configuration error: {e}") from None
