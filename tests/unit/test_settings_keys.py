"""The settings-key grammar (certqueue.settings_keys): one spelling of keys for every layer, and one
list of secret words for every place that masks or refuses a secret."""

from __future__ import annotations

import ast
import logging
from pathlib import Path
from typing import Any

import pytest

from certqueue import config, logsafe, runtime, settings_keys
from certqueue.config import load_settings, masked_dump, read_env
from certqueue.errors import ConfigError
from certqueue.settings_keys import (
    SECRET_MASK,
    SECRET_WORDS,
    canonical,
    canonical_key,
    deep_merge,
    dotted,
    env_var,
    flatten,
    is_secret_key,
    key_from_env,
    normalize,
    unflatten,
)

ROOT = Path(__file__).resolve().parents[2]

# --- nested, dotted and environment forms -------------------------------------------------------------

#: (nested, dotted leaves, environment variables): three spellings of the same settings
FORMS: list[tuple[dict[str, Any], dict[str, Any], dict[str, str]]] = [
    ({"acme": {"email": "a@example.test"}}, {"acme.email": "a@example.test"}, {"CERTQUEUE_ACME__EMAIL": "x"}),
    (
        {"automation": {"batch_size": 5, "auto_renew": False}},
        {"automation.batch_size": 5, "automation.auto_renew": False},
        {"CERTQUEUE_AUTOMATION__BATCH_SIZE": "5", "CERTQUEUE_AUTOMATION__AUTO_RENEW": "false"},
    ),
    (
        {"challenges": {"cloudflare": {"api_token": "t", "zone": {"id": "z"}}}},
        {"challenges.cloudflare.api_token": "t", "challenges.cloudflare.zone.id": "z"},
        {
            "CERTQUEUE_CHALLENGES__CLOUDFLARE__API_TOKEN": "t",
            "CERTQUEUE_CHALLENGES__CLOUDFLARE__ZONE__ID": "z",
        },
    ),
    # lists and empty mappings are values, not levels
    (
        {"acme": {"fallback_directory_urls": ["https://a", "https://b"], "authorities": {}}},
        {"acme.fallback_directory_urls": ["https://a", "https://b"], "acme.authorities": {}},
        {"CERTQUEUE_ACME__FALLBACK_DIRECTORY_URLS": "[]", "CERTQUEUE_ACME__AUTHORITIES": "{}"},
    ),
]


@pytest.mark.parametrize(("nested", "flat", "env"), FORMS)
def test_nested_dotted_and_env_forms_round_trip(
    nested: dict[str, Any], flat: dict[str, Any], env: dict[str, str]
) -> None:
    assert flatten(nested) == flat
    assert unflatten(flat) == nested
    assert unflatten(flatten(nested)) == nested
    assert dotted(nested) == flat == dotted(flat)
    # a mix of both spellings is the same settings
    first, *rest = flat.items()
    assert normalize({first[0]: first[1], **unflatten(dict(rest))}) == nested
    assert {key_from_env(var) for var in env} == set(flat)
    assert {env_var(key) for key in flat} == set(env)


@pytest.mark.parametrize(
    ("var", "key"),
    [
        ("CERTQUEUE_ACME__STAGING", "acme.staging"),
        ("CERTQUEUE_acme__staging", "acme.staging"),  # any case
        ("CERTQUEUE_LETS_ENCRYPT__STAGING", "acme.staging"),  # the guide's section name
        ("CERTQUEUE_CERTIFICATE_MANAGEMENT__ACME__EMAIL", "acme.email"),  # the guide's wrapper
        ("CERTQUEUE_CHALLENGES__RFC2136__TSIG_SECRET", "challenges.rfc2136.tsig_secret"),
    ],
)
def test_env_names(var: str, key: str) -> None:
    assert key_from_env(var) == key


@pytest.mark.parametrize("var", ["CERTQUEUE_ACME____STAGING", "CERTQUEUE_ACME__", "CERTQUEUE___ACME"])
def test_env_name_with_an_empty_level_is_refused(var: str) -> None:
    with pytest.raises(ConfigError, match="empty level"):
        key_from_env(var)


def test_reserved_and_foreign_variables_are_not_settings() -> None:
    for var in ["CERTQUEUE_SETTINGS_DIR", "CERTQUEUE_TEST_PG", "CERTQUEUE_BENCH_X", "HOME", "CERTQUEUEX"]:
        assert not settings_keys.is_settings_var(var), var
    assert settings_keys.is_settings_var("CERTQUEUE_ACME__EMAIL")


# --- aliases ------------------------------------------------------------------------------------------

ALIASES: list[tuple[dict[str, Any], dict[str, Any]]] = [
    ({"certificate_management": {"acme": {"staging": True}}}, {"acme.staging": True}),
    ({"lets_encrypt": {"staging": True}}, {"acme.staging": True}),
    ({"certificate_management": {"lets_encrypt": {"email": "e@x.test"}}}, {"acme.email": "e@x.test"}),
    ({"lets_encrypt.staging": True}, {"acme.staging": True}),
    ({"certificate_management.automation.batch_size": 3}, {"automation.batch_size": 3}),
    # both spellings: acme wins over lets_encrypt, the unwrapped top level over the wrapper
    (
        {"lets_encrypt": {"staging": True, "email": "le@x.test"}, "acme": {"staging": False}},
        {"acme.staging": False, "acme.email": "le@x.test"},
    ),
    (
        {"certificate_management": {"acme": {"staging": True, "email": "w@x"}}, "acme": {"staging": False}},
        {"acme.staging": False, "acme.email": "w@x"},
    ),
    ({"certificate_management": None, "acme": {"staging": True}}, {"acme.staging": True}),
]


@pytest.mark.parametrize(("given", "want"), ALIASES)
def test_aliases(given: dict[str, Any], want: dict[str, Any]) -> None:
    assert dotted(given) == want
    # the runtime layer and the file layers read the same aliases
    assert runtime.flatten(given) == want


@pytest.mark.parametrize(
    ("key", "want"),
    [
        ("lets_encrypt", "acme"),
        ("lets_encrypt.staging", "acme.staging"),
        ("certificate_management.lets_encrypt.email", "acme.email"),
        ("certificate_management", ""),
        ("acme.lets_encrypt", "acme.lets_encrypt"),  # only the section name is an alias
    ],
)
def test_canonical_key(key: str, want: str) -> None:
    assert canonical_key(key) == want


def test_aliases_of_a_settings_file_and_the_environment(tmp_path: Path) -> None:
    (tmp_path / "certqueue.yaml").write_text(
        "certificate_management:\n  lets_encrypt:\n    staging: true\n    email: f@example.test\n"
    )
    loaded = load_settings(directory=tmp_path, environ={"CERTQUEUE_LETS_ENCRYPT__EMAIL": "e@example.test"})
    assert loaded.settings.acme.staging is True
    assert loaded.settings.acme.email == "e@example.test"
    assert loaded.sources["acme.email"] == "env CERTQUEUE_LETS_ENCRYPT__EMAIL"


@pytest.mark.parametrize("bad", [{"certificate_management": [1]}, {"lets_encrypt": "yes"}])
def test_an_alias_that_is_not_a_mapping_is_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="must be a mapping"):
        canonical(bad)


# --- conflicts ----------------------------------------------------------------------------------------

CONFLICTS: list[tuple[dict[str, Any], str]] = [
    ({"acme.email": "x", "acme.email.y": "z"}, "acme.email"),
    ({"acme.email.y": "z", "acme.email": "x"}, "acme.email"),  # whatever the order
    ({"acme": {"email": "x"}, "acme.email.y": "z"}, "acme.email"),
    ({"acme.email.y": "z", "acme": {"email": "x"}}, "acme.email"),
    ({"acme": "x", "acme.email": "y"}, "acme"),
]


@pytest.mark.parametrize(("given", "key"), CONFLICTS)
def test_a_key_that_is_both_a_value_and_a_section_is_refused(given: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match="both as a value and as a section") as info:
        unflatten(given)
    assert info.value.key == key


def test_two_spellings_of_one_section_merge() -> None:
    assert unflatten({"acme": {"email": "x"}, "acme.staging": True}) == {
        "acme": {"email": "x", "staging": True}
    }
    assert unflatten({"acme.staging": True, "acme": {"email": "x"}}) == {
        "acme": {"email": "x", "staging": True}
    }


@pytest.mark.parametrize("bad", [{"": 1}, {"acme..email": 1}, {"acme.": 1}, {3: 1}])
def test_empty_or_non_text_keys_are_refused(bad: dict[Any, Any]) -> None:
    with pytest.raises(ConfigError):
        unflatten(bad)


def test_conflicting_environment_variables_name_both() -> None:
    env = {"CERTQUEUE_CHALLENGES__DNS_PROVIDER": "x", "CERTQUEUE_CHALLENGES__DNS_PROVIDER__Y": "z"}
    with pytest.raises(ConfigError, match="conflicting variables") as info:
        read_env(env)
    assert "CERTQUEUE_CHALLENGES__DNS_PROVIDER," in str(info.value)
    assert "CERTQUEUE_CHALLENGES__DNS_PROVIDER__Y" in str(info.value)


def test_a_json_object_in_one_variable_keeps_its_keys_and_merges_with_others() -> None:
    data, names = read_env(
        {
            "CERTQUEUE_CHALLENGES__RFC2136": '{"nameserver": "127.0.0.1", "tsig.name": "k"}',
            "CERTQUEUE_CHALLENGES__RFC2136__PORT": "5353",
        }
    )
    assert data == {"challenges": {"rfc2136": {"nameserver": "127.0.0.1", "tsig.name": "k", "port": "5353"}}}
    assert names["challenges.rfc2136"] == "env CERTQUEUE_CHALLENGES__RFC2136"


def test_deep_merge_changes_neither_input() -> None:
    low = {"a": {"b": 1, "c": [1]}, "d": 1}
    high = {"a": {"b": 2, "e": {"f": 1}}, "d": {"g": 2}}
    out = deep_merge(low, high)
    assert out == {"a": {"b": 2, "c": [1], "e": {"f": 1}}, "d": {"g": 2}}
    out["a"]["e"]["f"] = 99
    assert low == {"a": {"b": 1, "c": [1]}, "d": 1}
    assert high == {"a": {"b": 2, "e": {"f": 1}}, "d": {"g": 2}}


# --- secret words: one list, every place --------------------------------------------------------------


@pytest.mark.parametrize("word", SECRET_WORDS)
def test_every_secret_word_is_masked_in_config_show(tmp_path: Path, word: str) -> None:
    key = f"my_{word}_value"
    env = {f"CERTQUEUE_CHALLENGES__ACMEDNS__{key.upper()}": "s3cr3t-value"}
    loaded = load_settings(directory=tmp_path, environ=env)
    dump = masked_dump(loaded)
    assert dump[f"challenges.acmedns.{key}"]["value"] == SECRET_MASK
    # inside a value too (a region's own settings)
    regions = [{"name": "r1", "provider": "local", "path": str(tmp_path), key: "s3cr3t-value"}]
    loaded = load_settings(directory=tmp_path, environ={"CERTQUEUE_MULTI_REGION__REGIONS": _json(regions)})
    shown = masked_dump(loaded)["multi_region.regions"]["value"][0]
    assert shown[key] == SECRET_MASK and shown["name"] == "r1"


@pytest.mark.parametrize("word", SECRET_WORDS)
def test_every_secret_word_is_redacted_in_logs(word: str, caplog: pytest.LogCaptureFixture) -> None:
    for text in [f"{word}=s3cr3t-value", f'"x_{word}": "s3cr3t-value"', f"db_{word}: s3cr3t-value"]:
        assert "s3cr3t-value" not in logsafe.scrub(text), text
        assert "[REDACTED]" in logsafe.scrub(text)
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "settings %s", (f"{word}=s3cr3t-value",), None)
    logsafe.RedactingFilter().filter(record)
    assert "s3cr3t-value" not in record.getMessage()


@pytest.mark.parametrize("word", SECRET_WORDS)
def test_every_secret_word_is_refused_as_a_runtime_override(word: str) -> None:
    with pytest.raises(ConfigError, match="credentials are never stored in the database"):
        runtime.check_keys({f"challenges.acmedns.my_{word}": 1})


def test_words_that_are_not_secrets_are_shown() -> None:
    for key in ["acme.eab_kid", "acme.email", "challenges.http_port", "storage.key_check_seconds"]:
        assert not is_secret_key(key), key
    assert logsafe.scrub("eab_kid=kid-1 key_type=ec256") == "eab_kid=kid-1 key_type=ec256"


def test_the_grammar_is_written_once() -> None:
    """No module of certqueue but settings_keys defines its own merge, flatten, unflatten or secret
    words (issue 16: the copies had drifted apart). Allowed copies shrink to nothing."""
    allowed: set[tuple[str, str]] = set()
    grammar_names = {"deep_merge", "_deep_merge", "_merge", "flatten", "_flatten", "unflatten", "_unflatten",
                     "_undot", "_looks_secret", "_rename_aliases"}  # fmt: skip
    found: set[tuple[str, str]] = set()
    for path in sorted((ROOT / "certqueue").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel == "certqueue/settings_keys.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name in grammar_names:
                found.add((rel, node.name))
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name) and "SECRET_WORDS" in target.id:
                        found.add((rel, target.id))
    # runtime.flatten is the runtime face of settings_keys.dotted (one line), kept as a public name
    found.discard(("certqueue/runtime.py", "flatten"))
    assert found <= allowed, sorted(found - allowed)
    assert config.ENV_PREFIX is settings_keys.ENV_PREFIX


def _json(data: Any) -> str:
    import json

    return json.dumps(data)
