"""Registry names a promotion can use, checked when the YAML is, before anything runs.

MLflow checks a registered model's name and an alias only when it is written, which for promote is
after every other step has run and, for the alias, after the version was created. These rules say
the same earlier, in the YAML's terms; they import nothing from MLflow so that checking a YAML stays
cheap.
"""

from __future__ import annotations

import posixpath
import re

# Earlier int8pipe releases held a registered model named ``<name>.int8pipe-lock`` while they promoted
# ``<name>`` and deleted one they judged stale: a model of that name is not safe while any of them runs.
RESERVED_SUFFIX = ".int8pipe-lock"

ALIAS_PATTERN = re.compile(r"[\w-]+")  # MLflow: letters, digits, underscores and dashes
VERSION_LIKE_ALIAS = re.compile(r"[vV]\d+")  # MLflow reads `v3` as version 3
MAX_ALIAS_LENGTH = 255


def registered_model_problem(name: str) -> str | None:
    """Why ``name`` cannot be a registered model int8pipe promotes to, or None when it can."""
    if not name.strip():
        return "the name is empty; MLflow refuses a registered model without one"
    for char in ("/", ":"):
        if char in name:
            return f"{name!r} holds {char!r}, which MLflow refuses in a registered model name ('/' and ':')"
    if "'" in name:
        return (
            f"{name!r} holds a single quote: int8pipe finds a model's versions with MLflow's search filter "
            "`name = '...'`, which cannot hold one"
        )
    if name == "." or name.startswith("..") or posixpath.normpath(name) != name:
        return f"MLflow refuses {name!r}: it stores names as paths, and this one resolves to another"
    if name.endswith(RESERVED_SUFFIX):
        return (
            f"names ending in {RESERVED_SUFFIX!r} are reserved: earlier int8pipe releases use such a registered "
            "model as a lock while they promote, and delete it"
        )
    return None


def alias_problem(alias: str) -> str | None:
    """Why MLflow would refuse ``alias`` as a registered model alias, or None."""
    if not ALIAS_PATTERN.fullmatch(alias):
        return f"{alias!r}: MLflow aliases may hold only letters, digits, underscores (_) and dashes (-)"
    if alias.lower() == "latest" or VERSION_LIKE_ALIAS.fullmatch(alias):
        return f"{alias!r} is reserved by MLflow ('latest' and v<number> name versions)"
    if len(alias) > MAX_ALIAS_LENGTH:
        return f"MLflow aliases are at most {MAX_ALIAS_LENGTH} characters; this one has {len(alias)}"
    return None
