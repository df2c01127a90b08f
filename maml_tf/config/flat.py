"""The flat form of a config: ``flatten_config`` reads sectioned, flat or mixed dicts (every
config.json ever written), misspelt names get a suggestion, and ``resolved_rotations`` gives
the rotation policy a run actually used (``auto`` and the unused values of earlier files)."""

from __future__ import annotations

import difflib
from typing import Any

from maml_tf.config.sections import IMAGE_SOURCES, OWNER, SECTIONS, TFDS_PREFIX, ConfigError

_SECTION_NAMES = tuple(s.NAME for s in SECTIONS)


def resolved_rotations(flat: dict[str, Any]) -> dict[str, Any]:
    """``flat`` with ``train_rotations`` / ``eval_rotations`` as the run uses them: 'auto' is
    'augment' for Omniglot and 'none' otherwise; data sets that never rotate (mini-ImageNet's
    loader, sinusoid, RL) read 'none' whatever was written (their config.json of earlier
    versions held 'augment', unused)."""
    dataset = flat.get("dataset", "sinusoid")
    generic = dataset in IMAGE_SOURCES or str(dataset).startswith(TFDS_PREFIX)
    out = dict(flat)
    for key in ("train_rotations", "eval_rotations"):
        value = flat.get(key, "auto")
        if dataset == "omniglot":
            out[key] = "augment" if value == "auto" else value
        else:
            out[key] = value if generic and value != "auto" else "none"
    return out


def flatten_config(values: dict[str, Any]) -> dict[str, Any]:
    """The flat ``{flag: value}`` of a sectioned, flat or mixed config dict (flat keys win),
    not validated. A section that holds a key of another section is an error. Rotation
    values of data sets that never rotate are dropped."""
    flat: dict[str, Any] = {}
    for name in _SECTION_NAMES:
        part = values.get(name)
        if part is None:
            continue
        if not isinstance(part, dict):
            raise ConfigError(f"Config section {name!r} must be a mapping of flags, got "
                              f"{type(part).__name__}.")
        unknown = sorted(k for k in part if k not in OWNER)
        if unknown:
            raise ConfigError(f"Config section {name!r}: " + unknown_message(unknown))
        for key in part:
            if OWNER[key].NAME != name:
                raise ConfigError(f"Config section {name!r} holds {key!r}, a field of section "
                                  f"{OWNER[key].NAME!r}: move it there (or give it flat).")
        flat.update(part)
    flat.update({k: v for k, v in values.items() if k not in _SECTION_NAMES})
    dataset = str(flat.get("dataset", "sinusoid"))
    if dataset not in ("omniglot",) + IMAGE_SOURCES and not dataset.startswith(TFDS_PREFIX):
        # Earlier config.json files held 'augment' here for every data set; only Omniglot and
        # the generic image path rotate.
        for key in ("train_rotations", "eval_rotations"):
            flat.pop(key, None)
    return flat


def suggestion(name: str) -> str:
    close = difflib.get_close_matches(name, list(OWNER), n=1)
    return f": did you mean {close[0]!r}?" if close else ""


def unknown_message(unknown: list[str]) -> str:
    parts = [f"{k!r}{suggestion(k)}" for k in unknown]
    known = "" if all(suggestion(k) for k in unknown) else \
        f" The fields are the flags: {', '.join(sorted(OWNER))}."
    return f"Unknown config key{'s' if len(unknown) > 1 else ''} {'; '.join(parts)}{known}"
