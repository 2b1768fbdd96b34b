"""The settings-key grammar, written once: how a settings key is spelled and combined.

Every place that reads, writes or shows settings keys goes through here: the layered loader
(``certqueue.config``), the runtime overrides (``certqueue.runtime``), ``config show``, the log
filter (``certqueue.logsafe``) and the guide API's ``update_config``.

* **Nested and dotted forms.** ``{"acme": {"email": ...}}`` and ``{"acme.email": ...}`` are the same
  key. ``flatten`` turns a nested mapping into dotted leaves (lists and empty mappings are values,
  not levels); ``unflatten`` turns dotted keys (mixed with nested mappings) back into a nested
  mapping. A key that is given both as a value and as a section (``acme.email: x`` and
  ``acme.email.y: z``) is a ``ConfigError``, whatever the order.
* **Environment form.** ``CERTQUEUE_<SECTION>__<KEY>[__<SUBKEY>]``: a double underscore between
  levels, any case (``env_var``, ``key_from_env``).
* **Aliases.** The guide's ``certificate_management:`` wrapper is dropped and its ``lets_encrypt``
  section is ``acme`` (``canonical``, ``canonical_key``). When both spell the same key, ``acme`` and
  the unwrapped top level win.
* **Secret words.** ``SECRET_WORDS`` decides which keys hold credentials, everywhere a secret is
  masked or refused: ``config show``, log records, runtime overrides (never stored) and errors.
* ``deep_merge``: one layer over another, nested mappings merged key by key.

Pure: imports nothing of certqueue but its errors.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from certqueue.errors import ConfigError

ENV_PREFIX = "CERTQUEUE_"
#: between levels of a key in an environment variable's name
ENV_SEPARATOR = "__"
#: prefixes of variables for tests, benchmarks and tools, never settings
ENV_RESERVED_PREFIXES = ("CERTQUEUE_REQUIRE_", "CERTQUEUE_TEST_", "CERTQUEUE_CHAOS_", "CERTQUEUE_BENCH_")
#: environment variables with the prefix that are not settings keys
ENV_RESERVED = frozenset(
    {
        "CERTQUEUE_BEAT_CHILD",
        "CERTQUEUE_WORKER_CHILD",
        "CERTQUEUE_SETTINGS_DIR",
        "CERTQUEUE_HOME",
        "CERTQUEUE_FAILPOINTS",
        "CERTQUEUE_REQUIRE_POSTGRES",
        "CERTQUEUE_RUNTIME_TTL_SECONDS",
    }
)

#: the guide's wrapper around every section (``certificate_management: {acme: ...}``)
WRAPPER = "certificate_management"
#: section names of the guide -> certqueue's (any RFC 8555 CA works, not only Let's Encrypt)
SECTION_ALIASES: Mapping[str, str] = {"lets_encrypt": "acme"}

#: a key whose last part contains one of these holds a credential: masked in ``config show`` and in
#: log records, never stored as a runtime override. One list for every place (issue 16).
SECRET_WORDS = (
    "secret",
    "password",
    "passphrase",
    "token",
    "hmac",
    "private_key",
    "access_key",
    "api_key",
    "credential",
)
#: what a masked secret shows
SECRET_MASK = "**********"  # noqa: S105  (the mask, not a password)


# --- nested and dotted --------------------------------------------------------------------------------


def deep_merge(low: Mapping[str, Any], high: Mapping[str, Any]) -> dict[str, Any]:
    """``high`` over ``low``: mappings present in both are merged key by key, anything else in
    ``high`` replaces what ``low`` had (a list replaces the whole list). Neither input is changed."""
    out: dict[str, Any] = dict(low)
    for k, v in high.items():
        below = out.get(k)
        if isinstance(v, Mapping) and isinstance(below, Mapping):
            out[k] = deep_merge(below, v)
        elif isinstance(v, Mapping):
            out[k] = deep_merge({}, v)  # a copy: the result shares no mapping with its inputs
        else:
            out[k] = v
    return out


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as ``{"section.key": value}``: its leaves, depth first. Lists and empty
    mappings are values, not levels. Keys must be non-empty strings (``ConfigError``)."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        if not isinstance(k, str) or not k:
            raise ConfigError("settings keys must be non-empty strings", key=prefix or None)
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def unflatten(data: Mapping[str, Any], *, split_values: bool = True) -> dict[str, Any]:
    """Dotted keys (``"acme.email"``), nested mappings or a mix of both, as one nested mapping.

    Keys inside nested mappings are split at dots too, unless ``split_values`` is false (a JSON
    object read from one environment variable keeps its keys). Two spellings of one section merge;
    a key given both as a value and as a section is a ``ConfigError`` naming it."""
    if not isinstance(data, Mapping):
        raise ConfigError("settings must be a mapping of keys to values")
    out: dict[str, Any] = {}
    for raw, value in data.items():
        if not isinstance(raw, str) or not raw:
            raise ConfigError("settings keys must be non-empty strings")
        parts = raw.split(".")
        if not all(parts):
            raise ConfigError("empty level in a settings key", key=raw)
        node = out
        for depth, part in enumerate(parts[:-1]):
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError("given both as a value and as a section", key=".".join(parts[: depth + 1]))
            node = nxt
        last = parts[-1]
        if isinstance(value, Mapping):
            inner = unflatten(value) if split_values and value else deep_merge({}, value)
            below = node.get(last)
            if below is not None and not isinstance(below, dict):
                raise ConfigError("given both as a value and as a section", key=raw)
            node[last] = _merge_strict(below or {}, inner, raw)
        elif isinstance(node.get(last), dict):
            raise ConfigError("given both as a value and as a section", key=raw)
        else:
            node[last] = value
    return out


def _merge_strict(low: dict[str, Any], high: dict[str, Any], prefix: str) -> dict[str, Any]:
    out = dict(low)
    for k, v in high.items():
        below = out.get(k)
        if k not in out:
            out[k] = v
        elif isinstance(v, dict) and isinstance(below, dict):
            out[k] = _merge_strict(below, v, f"{prefix}.{k}")
        elif isinstance(v, dict) or isinstance(below, dict):
            raise ConfigError("given both as a value and as a section", key=f"{prefix}.{k}")
        else:
            out[k] = v
    return out


# --- aliases ------------------------------------------------------------------------------------------


def canonical(data: Mapping[str, Any]) -> dict[str, Any]:
    """A nested mapping in certqueue's own names: the guide's ``certificate_management`` wrapper
    unwrapped and ``lets_encrypt`` merged into ``acme`` (the unwrapped top level and ``acme`` win)."""
    out = dict(data)
    if WRAPPER in out:
        out = deep_merge(_section(out.pop(WRAPPER), WRAPPER), out)
    for alias, name in SECTION_ALIASES.items():
        if alias in out:
            section = _section(out.pop(alias), alias)
            out[name] = deep_merge(section, _section(out.get(name), name))
    return out


def _section(value: Any, key: str) -> Mapping[str, Any]:
    """A section's mapping (none given: empty); anything else is a ``ConfigError`` naming it."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key} must be a mapping", key=key)
    return value


def canonical_key(key: str) -> str:
    """One dotted key in certqueue's own names (``certificate_management.lets_encrypt.email`` ->
    ``acme.email``)."""
    if key == WRAPPER:
        return ""
    key = key.removeprefix(WRAPPER + ".")
    first, dot, rest = key.partition(".")
    return SECTION_ALIASES.get(first, first) + dot + rest


def normalize(changes: Mapping[str, Any]) -> dict[str, Any]:
    """Nested, dotted or guide-shaped keys as one canonical nested mapping."""
    return canonical(unflatten(changes))


def dotted(changes: Mapping[str, Any]) -> dict[str, Any]:
    """Nested, dotted or guide-shaped keys as canonical dotted leaves (``{"acme.email": ...}``)."""
    return flatten(normalize(changes))


# --- the environment form -----------------------------------------------------------------------------


def env_var(key: str) -> str:
    """The environment variable that sets a dotted key (``acme.email`` -> ``CERTQUEUE_ACME__EMAIL``)."""
    return ENV_PREFIX + ENV_SEPARATOR.join(p.upper() for p in canonical_key(key).split("."))


def is_settings_var(var: str) -> bool:
    """Whether an environment variable is meant as a settings key (prefix, not reserved)."""
    return (
        var.startswith(ENV_PREFIX) and var not in ENV_RESERVED and not var.startswith(ENV_RESERVED_PREFIXES)
    )


def key_from_env(var: str) -> str:
    """The dotted key an environment variable sets (``CERTQUEUE_LETS_ENCRYPT__STAGING`` ->
    ``acme.staging``); ``ConfigError`` for a name with an empty level. Whether the section exists is
    the loader's check."""
    parts = [p.lower() for p in var[len(ENV_PREFIX) :].split(ENV_SEPARATOR)]
    if not all(parts):
        raise ConfigError("unknown setting: an empty level in the name")
    return canonical_key(".".join(parts))


# --- secrets ------------------------------------------------------------------------------------------


def is_secret_key(key: str) -> bool:
    """Whether the dotted key's last part names a credential (``SECRET_WORDS``)."""
    last = str(key).rsplit(".", 1)[-1].lower()
    return any(w in last for w in SECRET_WORDS)


def mask_secrets(value: Any) -> Any:
    """``value`` with the value of every secret-named key inside it (at any depth, lists included)
    replaced by ``SECRET_MASK``; empty values stay as they are (an unset secret shows as unset)."""
    if isinstance(value, Mapping):
        return {k: (SECRET_MASK if is_secret_key(k) and v else mask_secrets(v)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [mask_secrets(v) for v in value]
    return value


#: a key name (in free text) that contains a secret word: ``certqueue.logsafe`` redacts what follows
#: ``name=`` or ``"name":`` in a log record. A name is letters, digits, ``_`` and ``-`` (a header
#: such as ``X-Api-Key``: ``-`` stands for ``_`` in the words), matched only from its first
#: character with a lookahead: linear in the text's length (a scan that could start inside a name,
#: at every ``-`` of ``a-a-a-...``, is quadratic)
SECRET_NAME_PATTERN = (
    r"(?<![\w\-])(?=[\w\-]*?(?:"
    + "|".join(re.escape(w).replace("_", "[_-]") for w in SECRET_WORDS)
    + r"))[\w\-]+"
)
