"""The deployment files: docker-compose.yml, docker/, deploy/systemd/, deploy/k8s/, the Makefile's
``flower`` target. No container engine or cluster runs here, so each file is checked as far as this
machine allows:

* with the real tools where they are installed: ``docker compose config`` (or Debian's
  ``docker-compose``), ``systemd-analyze verify`` (in a throwaway root holding the units and stand-in
  executables), ``promtool check config``, the Kubernetes OpenAPI schemas of ``kubernetes-validate``
  (strict: unknown fields fail), and Debian's Pebble for the compose Pebble image's entry point;
* against the code itself: every command a file runs is parsed by the real click CLI
  (``certqueue.cli.main``), every ``CERTQUEUE_*`` variable and settings file goes through
  ``certqueue.config.load_settings``, every probe path is requested from the real API app and HTTP-01
  responder, Flower's app module is imported with the same settings;
* structurally: references between services, volumes, Secrets, ServiceAccounts and ports resolve;
  published ports bind loopback; no secret has a value or a default.

A missing tool skips only its own check, unless ``CERTQUEUE_REQUIRE_DEPLOY_TOOLS`` is set (CI): then it
fails.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from certqueue.config import Settings, load_settings, read_env

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
SYSTEMD = REPO / "deploy" / "systemd"
K8S = REPO / "deploy" / "k8s"
VENV_BIN = "/opt/certqueue/.venv/bin/"
IMAGE_UID = 10001

#: compose needs these from the environment (.env); dummy values for checking only
COMPOSE_REQUIRED = {
    "POSTGRES_PASSWORD": "pg-dummy",
    "REDIS_PASSWORD": "redis-dummy",
    "FLOWER_BASIC_AUTH": "ops:flower-dummy",
    "GRAFANA_ADMIN_PASSWORD": "grafana-dummy",
    "ACME_EMAIL": "ops@example.com",
    "ACME_DIRECTORY_URL": "https://pebble:14000/dir",
}
#: the .env examples compose is documented with
COMPOSE_ENV_EXAMPLES = (
    REPO / "settings" / "compose-pebble.env",
    REPO / "settings" / "compose-letsencrypt-staging.env",
)
#: names that hold secrets wherever they appear as environment variables
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|BASIC_AUTH|HMAC|ACCESS_KEY", re.IGNORECASE)


def require_tool(name: str, found: bool) -> None:
    if not found:
        if os.environ.get("CERTQUEUE_REQUIRE_DEPLOY_TOOLS"):
            pytest.fail(f"{name} is not installed (CERTQUEUE_REQUIRE_DEPLOY_TOOLS is set)")
        pytest.skip(f"{name} is not installed")


# --- the CLI, as the deployment files call it ----------------------------------------------------


@dataclass
class Invocation:
    path: list[str]  # command names below ``certqueue``
    params: dict[str, Any] = field(default_factory=dict)


def parse_cli(argv: list[str]) -> Invocation:
    """Parse ``certqueue <argv>`` with the real click CLI without running it; fail on anything that
    is not a real command, option or choice."""
    from certqueue.cli import main

    try:
        ctx = main.make_context("certqueue", list(argv))
        cmd: click.Command = main
        path: list[str] = []
        while isinstance(cmd, click.Group):
            rest = [*ctx._protected_args, *ctx.args]
            assert rest, f"certqueue {' '.join(argv)}: no subcommand"
            name, sub, rest = cmd.resolve_command(ctx, rest)
            assert sub is not None and name is not None, f"certqueue {' '.join(argv)}: unknown command"
            path.append(name)
            ctx = sub.make_context(name, rest, parent=ctx)
            cmd = sub
    except click.ClickException as exc:
        raise AssertionError(f"certqueue {' '.join(argv)}: {exc.format_message()}") from None
    return Invocation(path=path, params=dict(ctx.params))


def check_celery(argv: list[str]) -> str:
    """``celery -A certqueue.flower_app <sub> ...``: the app module exists and exposes ``app``;
    returns the celery subcommand."""
    assert argv[:1] == ["-A"], f"celery {argv}: the app must be given first with -A"
    assert argv[1] == "certqueue.flower_app", f"celery app must be certqueue.flower_app, not {argv[1]}"
    assert (REPO / "certqueue" / "flower_app.py").is_file()
    assert "app: Celery = lazy_app.get()" in (REPO / "certqueue" / "flower_app.py").read_text()
    sub = argv[2]
    assert sub in {"flower", "inspect"}, f"unexpected celery subcommand {sub}"
    return sub


def check_command_line(argv: list[str], regions: set[str]) -> list[Invocation]:
    """One process command line as a deployment file writes it: ``certqueue ...``, a venv path to
    it, ``celery -A certqueue.flower_app ...``, or ``sh -c "<certqueue ...> && exec certqueue ..."``.
    Returns the certqueue invocations found (checked against the CLI and ``regions``)."""
    prog = argv[0].removeprefix(VENV_BIN)
    if prog in {"sh", "/bin/sh"}:
        assert argv[1] == "-c", argv
        script = argv[2]
        out: list[Invocation] = []
        for segment in re.split(r"&&|\|\||;", script):
            words = [w for w in shlex.split(segment) if w not in {"{", "}"}]
            if not words or words[0] in {"test", "echo", "exit"}:  # guards, not processes
                continue
            if words[0] == "exec":
                words = words[1:]
            out += check_command_line(words, regions)
        assert out, f"no certqueue or celery command in {script!r}"
        return out
    if prog == "install":  # the key-copy init container
        return []
    if prog == "celery":
        check_celery(argv[1:])
        return [Invocation(path=["celery"])]
    assert prog == "certqueue", f"unexpected program {argv[0]!r}"
    inv = parse_cli(argv[1:])
    if inv.path == ["worker"]:
        assert inv.params["pool"] in {"acme", "dns", "propagate"}, inv.params
        if inv.params["pool"] == "propagate":
            assert inv.params["regions"], "a propagate worker needs --region"
            unknown = (
                set(inv.params["regions"])
                - regions
                - ({"all"} if inv.params["regions"] == ("all",) else set())
            )
            assert not unknown, f"--region {sorted(unknown)} is not a configured region {sorted(regions)}"
    return [inv]


def worker_node_name(inv: Invocation) -> str:
    """The Celery node name certqueue.workers.run_worker gives a worker (without ``@host``)."""
    regions = list(inv.params["regions"])
    return inv.params["pool"] + ("-" + "-".join(regions) if regions else "")


def check_settings_env(env: dict[str, str], settings_dir: Path) -> Settings:
    """Every CERTQUEUE_* variable is a real settings key with a valid value."""
    cq = {k: v for k, v in env.items() if k.startswith("CERTQUEUE_")}
    read_env(cq)  # unknown names raise ConfigError
    return load_settings(environ=cq, directory=settings_dir).settings


def test_parse_cli_rejects_what_the_cli_rejects() -> None:
    parse_cli(["worker", "--pool", "acme"])
    for bad in (
        ["wroker", "--pool", "acme"],
        ["worker", "--pool", "dsn"],
        ["worker", "--pool", "acme", "--regoin", "x"],
        ["db", "upgrayed"],
        ["db"],
    ):
        with pytest.raises(AssertionError):
            parse_cli(bad)
    with pytest.raises(AssertionError, match="not a configured region"):
        check_command_line(
            ["certqueue", "worker", "--pool", "propagate", "--region", "mars-1"], {"us-east-1"}
        )


# --- docker-compose.yml ----------------------------------------------------------------------------

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$\$")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable substitution (${VAR}, ${VAR:-default}, ${VAR:?error}, $$)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1), m.group(2), m.group(3)
        val = env.get(name)
        if op in (":?", "?") and not val:
            raise KeyError(f"{name}: {arg}")
        if op in (":-", "-") and not val:
            return arg
        return val or ""

    return _VAR.sub(sub, value)


def raw_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())  # anchors and << merge keys resolved
    assert isinstance(data, dict)
    return data


def compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    data = interpolate(raw_compose(), COMPOSE_REQUIRED if env is None else env)
    assert isinstance(data, dict)
    return data


def _env_dict(env: Any) -> dict[str, str]:
    if isinstance(env, list):
        return dict(e.split("=", 1) for e in env)
    return {k: str(v) for k, v in (env or {}).items()}


def _argv(value: Any) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def _service_argv(svc: dict[str, Any]) -> list[str] | None:
    """The full command line of a service of the certqueue image (None for other images)."""
    if svc.get("image") != "certqueue:local":
        return None
    entry = _argv(svc.get("entrypoint")) or ["certqueue"]
    cmd = svc.get("command")
    return entry + (_argv(cmd) if cmd is not None else ["--help"])


def compose_regions(svc: dict[str, Any]) -> set[str]:
    regions = json.loads(_env_dict(svc["environment"])["CERTQUEUE_MULTI_REGION__REGIONS"])
    return {r["name"] for r in regions}


def _compose_cli() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    exe = shutil.which("docker-compose")
    return [exe] if exe else None


def _run_compose_config(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    cli = _compose_cli()
    require_tool("docker compose (or Debian's docker-compose)", cli is not None)
    assert cli is not None
    empty = tmp_path / "empty.env"
    empty.write_text("")
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), **env}
    return subprocess.run(
        [
            *cli,
            "--env-file",
            str(empty),
            "--project-directory",
            str(REPO),
            "-f",
            str(COMPOSE),
            "config",
            "-q",
        ],
        env=clean,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_compose_config_is_valid(tmp_path: Path) -> None:
    res = _run_compose_config(COMPOSE_REQUIRED, tmp_path)
    assert res.returncode == 0, res.stderr + res.stdout


@pytest.mark.parametrize("missing", sorted(COMPOSE_REQUIRED))
def test_compose_refuses_to_run_without_each_secret(missing: str, tmp_path: Path) -> None:
    env = {k: v for k, v in COMPOSE_REQUIRED.items() if k != missing}
    with pytest.raises(KeyError, match=missing):
        compose(env)
    res = _run_compose_config(env, tmp_path)
    assert res.returncode != 0 and missing in (res.stderr + res.stdout), res.stderr


def test_compose_has_no_secret_values_or_defaults() -> None:
    text = COMPOSE.read_text()
    required = set(re.findall(r"\$\{([A-Z_]+):\?", text))
    assert set(COMPOSE_REQUIRED) <= required
    # every variable reference either is required or has a harmless default; no secret has a default
    for name, op in re.findall(r"\$\{([A-Za-z_]+)(:?[-?])?", text):
        if SECRET_NAME.search(name):
            assert op == ":?", f"${{{name}}} must be required (${{{name}:?...}}), never defaulted"
    for sname, svc in raw_compose()["services"].items():
        for key, value in _env_dict(svc.get("environment")).items():
            if SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", value), f"{sname}: {key} must come from .env"
            if "://" in value and "@" in value:  # credentials inside a URL
                userinfo = value.split("://", 1)[1].split("@", 1)[0]
                assert re.search(r"\$\{[A-Z_]+:\?", userinfo), f"{sname}: {key} has a literal password"


def test_compose_services_and_references() -> None:
    data = compose()
    services: dict[str, Any] = data["services"]
    expected = {
        "postgres", "redis", "pebble", "pebble-challtestsrv", "migrate", "api", "metrics", "http01",
        "worker-acme", "worker-dns", "worker-propagate", "beat", "flower", "prometheus", "alertmanager",
        "grafana",
    }  # fmt: skip
    assert expected <= set(services)
    named_volumes = set(data.get("volumes") or {})
    networks = set(data.get("networks") or {})
    for name, svc in services.items():
        assert svc.get("image") or svc.get("build"), f"{name}: no image or build"
        if "build" in svc:
            assert (REPO / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file(), name
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            condition = cond["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy: no healthcheck"
            elif condition == "service_completed_successfully":
                assert services[dep].get("restart") == "no", f"{dep} is one-shot: restart must be 'no'"
            else:
                assert condition == "service_started", condition
        for vol in svc.get("volumes") or []:
            source = vol.split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (REPO / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in named_volumes, f"{name}: volume {source} is not declared"
        nets = svc.get("networks") or []
        for net in nets if isinstance(nets, list) else nets.keys():
            assert net in networks, f"{name}: unknown network {net}"
        for port in svc.get("ports") or []:
            assert str(port).startswith("127.0.0.1:"), f"{name}: port {port} must bind loopback only"
    (redis_script,) = services["redis"]["command"]
    redis_cmd = shlex.split(redis_script.split("exec ", 1)[1])
    assert redis_cmd[redis_cmd.index("--maxmemory-policy") + 1] == "noeviction"
    # a password, from .env, through a config file (never on a command line)
    assert "requirepass" in redis_script and "$REDIS_PASSWORD" in redis_script
    assert "redis-dummy" not in redis_script
    assert "REDISCLI_AUTH" in " ".join(services["redis"]["healthcheck"]["test"])


def test_compose_commands_are_real_cli_commands_and_settings_are_real_keys() -> None:
    services: dict[str, Any] = compose()["services"]
    regions = compose_regions(services["api"])
    assert len(regions) >= 2
    pools: dict[str, str] = {}
    commands: set[str] = set()
    for name, svc in services.items():
        argv = _service_argv(svc)
        if argv is None:
            continue
        env = _env_dict(svc.get("environment"))
        settings = check_settings_env(env, REPO / "settings")
        assert settings.database.url.startswith("postgresql+psycopg://"), name
        assert settings.broker.url == "redis://:redis-dummy@redis:6379/0", name
        assert compose_regions(svc) == regions, f"{name}: every service must see the same regions"
        for inv in check_command_line(argv, regions):
            commands.add(" ".join(inv.path))
            if inv.path == ["worker"]:
                assert svc.get("init") is True, f"{name}: init: true, so SIGTERM reaches the worker"
                node = worker_node_name(inv)
                pools[node] = name
                ping = " ".join(svc["healthcheck"]["test"])
                assert f"-d {node}@$HOSTNAME" in ping, f"{name}: healthcheck must ping {node}@<hostname>"
                check_command_line(shlex.split(ping.removeprefix("CMD-SHELL ")), regions)
            if inv.path == ["serve"]:
                assert settings.api.host == "0.0.0.0"
                assert f"127.0.0.1:{settings.api.port}:{settings.api.port}" in svc["ports"]
            if inv.path == ["http01"]:
                net = svc["networks"]["certqueue"]["ipv4_address"]
                dns_cmd = _argv(services["pebble-challtestsrv"]["command"])
                assert dns_cmd[dns_cmd.index("-defaultIPv4") + 1] == net, "test DNS must answer http01's IP"
                peb = json.loads((REPO / "docker" / "pebble" / "pebble-config.json").read_text())["pebble"]
                assert settings.challenges.http_port == peb["httpPort"]
    assert {"serve", "metrics", "http01", "beat", "db upgrade", "keys generate", "celery"} <= commands
    # regions are defined once: one propagate service serves all of them (and scales with --scale)
    assert {"acme", "dns", "propagate-all"} == set(pools), pools
    for name in pools.values():
        assert "container_name" not in services[name] and "ports" not in services[name], name


def test_compose_flower_requires_auth_and_binds_loopback() -> None:
    raw = raw_compose()["services"]["flower"]
    assert _env_dict(raw["environment"])["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH:?")
    svc = compose()["services"]["flower"]
    argv = _service_argv(svc)
    assert argv is not None and check_command_line(argv, compose_regions(svc))
    assert not any(a.startswith("--basic-auth") for a in argv), "the password belongs in the environment"
    assert svc["ports"] == ["127.0.0.1:5555:5555"]
    assert "/healthcheck" in " ".join(svc["healthcheck"]["test"])


def test_compose_prometheus_config_scrapes_the_compose_services(tmp_path: Path) -> None:
    services = compose()["services"]
    prom = yaml.safe_load((REPO / "docker" / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    metrics_port = _env_dict(services["metrics"]["environment"])["CERTQUEUE_MONITORING__PROMETHEUS_PORT"]
    (certqueue_job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "certqueue"]
    assert certqueue_job["static_configs"] == [{"targets": [f"metrics:{metrics_port}"]}], "one scrape target"
    assert "flower:5555" in targets
    assert (
        metrics_port != "9091"
        and metrics_port != _env_dict(services["api"]["environment"])["CERTQUEUE_API__PORT"]
    )
    # alerts go somewhere: the compose Alertmanager, whose config amtool accepts
    (am,) = prom["alerting"]["alertmanagers"]
    assert am["static_configs"] == [{"targets": ["alertmanager:9093"]}]
    assert (
        "./docker/alertmanager/alertmanager.yml:/etc/alertmanager/alertmanager.yml:ro"
        in (services["alertmanager"]["volumes"])
    )
    for target in targets:
        assert target.split(":")[0] in services
    mounts = services["prometheus"]["volumes"]
    assert "./deploy/prometheus/alerting_rules.yml:/etc/prometheus/alerting_rules.yml:ro" in mounts
    assert "./deploy/prometheus/recording_rules.yml:/etc/prometheus/recording_rules.yml:ro" in mounts
    grafana_ds = yaml.safe_load((REPO / "docker" / "grafana" / "datasources.yml").read_text())
    deploy_ds = yaml.safe_load(
        (REPO / "deploy/grafana/provisioning/datasources/certqueue-prometheus.yml").read_text()
    )
    assert grafana_ds["datasources"][0]["uid"] == deploy_ds["datasources"][0]["uid"]
    assert grafana_ds["datasources"][0]["url"] == "http://prometheus:9090"
    promtool = shutil.which("promtool")
    require_tool("promtool", promtool is not None)
    shutil.copy(REPO / "docker" / "prometheus" / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copy(REPO / "deploy" / "prometheus" / "alerting_rules.yml", tmp_path / "alerting_rules.yml")
    shutil.copy(REPO / "deploy" / "prometheus" / "recording_rules.yml", tmp_path / "recording_rules.yml")
    res = subprocess.run(
        [str(promtool), "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def _env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


@pytest.mark.parametrize("example", COMPOSE_ENV_EXAMPLES, ids=lambda p: p.name)
def test_compose_env_examples_name_every_variable_and_nothing_certqueue_rejects(example: Path) -> None:
    """The examples set exactly the variables compose reads; none is a CERTQUEUE_* name (certqueue
    rejects unknown CERTQUEUE_ variables, so an exported .env would break every CLI call)."""
    env = _env_file(example)
    text = "\n".join(line for line in COMPOSE.read_text().splitlines() if not line.lstrip().startswith("#"))
    required = set(re.findall(r"\$\{([A-Z_]+):\?", text))
    optional = set(re.findall(r"\$\{([A-Z_]+):-", text))
    assert required <= set(env), f"{example.name} misses {sorted(required - set(env))}"
    assert set(env) <= required | optional | {"COMPOSE_PROFILES"}, sorted(set(env) - required - optional)
    assert not [k for k in env if k.startswith("CERTQUEUE_")]
    read_env({k: v or "x" for k, v in env.items()})  # what certqueue does with an exported .env: no error
    for key, value in env.items():
        if SECRET_NAME.search(key):
            assert value == "", f"{example.name}: {key} must be left empty"


def test_compose_trusts_pebble_only_in_the_pebble_profile() -> None:
    """A real CA is verified with the system trust store; Pebble's CA only with the pebble profile."""
    raw = raw_compose()["services"]
    assert raw["pebble"]["profiles"] == ["pebble"] and raw["pebble-challtestsrv"]["profiles"] == ["pebble"]
    for name, svc in raw.items():
        if name not in ("pebble", "pebble-challtestsrv"):
            assert "profiles" not in svc, f"{name} must run in every profile"
            assert not {"pebble", "pebble-challtestsrv"} & set(svc.get("depends_on") or {}), name
    pebble_env = _env_file(COMPOSE_ENV_EXAMPLES[0])
    staging_env = _env_file(COMPOSE_ENV_EXAMPLES[1])
    assert pebble_env["COMPOSE_PROFILES"] == "pebble" and pebble_env["ACME_CA_BUNDLE"] == "/pebble-tls/ca.pem"
    assert "COMPOSE_PROFILES" not in staging_env and "ACME_CA_BUNDLE" not in staging_env
    filled = {k: v or "x" for k, v in {**COMPOSE_REQUIRED, **staging_env}.items()}
    bundle = _env_dict(compose(filled)["services"]["api"]["environment"])["CERTQUEUE_ACME__CA_BUNDLE"]
    assert bundle == "/etc/ssl/certs/ca-certificates.crt", "a real CA: the image's system trust store"
    assert staging_env["ACME_DIRECTORY_URL"].startswith("https://acme-staging-v02.api.letsencrypt.org/")


def test_compose_every_certqueue_process_runs_under_an_init() -> None:
    for name, svc in compose()["services"].items():
        if svc.get("image") == "certqueue:local":
            assert svc.get("init") is True, (
                f"{name}: init: true (SIGTERM reaches the process, zombies reaped)"
            )


def test_alertmanager_config_is_valid(tmp_path: Path) -> None:
    amtool = shutil.which("amtool")
    require_tool("amtool (Debian prometheus-alertmanager)", amtool is not None)
    res = subprocess.run(
        [str(amtool), "check-config", str(REPO / "docker" / "alertmanager" / "alertmanager.yml")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    broken = tmp_path / "alertmanager.yml"
    broken.write_text((REPO / "docker" / "alertmanager" / "alertmanager.yml").read_text().replace(
        "receiver: certqueue\n  group_by", "receiver: nobody\n  group_by"))  # fmt: skip
    assert (
        subprocess.run([str(amtool), "check-config", str(broken)], capture_output=True, timeout=60).returncode
        != 0
    )


# --- docker/ ---------------------------------------------------------------------------------------


def _dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_builds_a_non_root_certqueue_image() -> None:
    ins = _dockerfile_instructions(DOCKERFILE)
    froms = [arg for op, arg in ins if op == "FROM"]
    assert all(f.split()[0] == "python:3.11-slim" for f in froms), froms
    final = max(i for i, (op, _) in enumerate(ins) if op == "FROM")
    runs = " ".join(arg for op, arg in ins if op == "RUN")
    # every dependency from the hash-pinned lock, then certqueue alone (issue 13)
    assert "pip install --require-hashes -r requirements/runtime.txt" in runs
    assert "pip install --no-deps ." in runs
    users = [arg for op, arg in ins[final:] if op == "USER"]
    assert users and users[-1].split(":")[0] == str(IMAGE_UID)
    assert f"--uid {IMAGE_UID}" in runs
    entry = [json.loads(arg) for op, arg in ins if op == "ENTRYPOINT"]
    assert entry == [["certqueue"]]
    ignore = (REPO / "docker" / "Dockerfile.dockerignore").read_text().split()
    for op, arg in ins:
        if op == "COPY" and not arg.startswith("--from"):
            for src in arg.split()[:-1]:
                assert (REPO / src).exists(), f"COPY {src}: no such path"
                assert f"!{src.rstrip('/')}" in [i.rstrip("/") for i in ignore], f"{src} is excluded"
    env: dict[str, str] = {}
    for op, arg in ins:
        if op == "ENV":
            for k, v in (pair.split("=", 1) for pair in shlex.split(arg)):
                env[k] = v
    assert env["CERTQUEUE_SETTINGS_DIR"] == "/etc/certqueue/settings"
    check_settings_env(env, REPO / "settings")
    assert env["PATH"].startswith(VENV_BIN.rstrip("/"))


def test_pebble_dockerfile_copies_only_what_exists() -> None:
    path = REPO / "docker" / "pebble" / "Dockerfile"
    ins = _dockerfile_instructions(path)
    assert [arg for op, arg in ins if op == "FROM"] == ["debian:bookworm-slim"]
    assert "apt-get install -y --no-install-recommends pebble" in " ".join(a for op, a in ins if op == "RUN")
    ignore = (REPO / "docker" / "pebble" / "Dockerfile.dockerignore").read_text().split()
    for op, arg in ins:
        if op == "COPY":
            src = arg.split()[0]
            assert (REPO / src).is_file(), src
            assert any(src.startswith(i.lstrip("!")) for i in ignore if i.startswith("!")), src
    assert [a for op, a in ins if op == "USER"] == ["nobody"]
    assert os.access(REPO / "docker" / "pebble" / "entrypoint.sh", os.X_OK)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_pebble_image_entrypoint_makes_tls_that_clients_verify(tmp_path: Path) -> None:
    """The compose Pebble's entry point, run here with Debian's pebble on loopback ports: it writes a
    CA and a server certificate, Pebble serves its directory with them, and a client trusting only
    ca.pem (as CERTQUEUE_ACME__CA_BUNDLE does in compose) verifies the connection."""
    import requests

    require_tool("pebble (Debian package)", shutil.which("pebble") is not None)
    conf = json.loads((REPO / "docker" / "pebble" / "pebble-config.json").read_text())
    assert conf["pebble"]["certificate"].startswith("/pebble-tls/")
    port, mport = _free_port(), _free_port()
    conf["pebble"].update(
        listenAddress=f"127.0.0.1:{port}",
        managementListenAddress=f"127.0.0.1:{mport}",
        certificate=str(tmp_path / "cert.pem"),
        privateKey=str(tmp_path / "key.pem"),
    )
    (tmp_path / "config.json").write_text(json.dumps(conf))
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PEBBLE_TLS_DIR": str(tmp_path),
        "PEBBLE_CONFIG": str(tmp_path / "config.json"),
        "PEBBLE_VA_NOSLEEP": "1",
    }
    log = open(tmp_path / "pebble.log", "wb")
    proc = subprocess.Popen(
        [str(REPO / "docker" / "pebble" / "entrypoint.sh")],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 20
        resp = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                resp = requests.get(
                    f"https://localhost:{port}/dir", verify=str(tmp_path / "ca.pem"), timeout=3
                )
                break
            except (requests.exceptions.ConnectionError, OSError):  # not listening / ca.pem not yet written
                time.sleep(0.1)
        assert resp is not None, (tmp_path / "pebble.log").read_text()
        assert "newOrder" in resp.json()
        assert (tmp_path / "key.pem").stat().st_mode & 0o077 == 0
        # what strict X.509 checks (Go, Python 3.13+) want of the chain
        from cryptography import x509

        leaf = x509.load_pem_x509_certificate((tmp_path / "cert.pem").read_bytes())
        ca = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
        aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        assert aki.key_identifier == ski.digest
        assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert "pebble" in sans.get_values_for_type(x509.DNSName)
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(f"https://localhost:{port}/dir", timeout=3)  # system trust: not trusted
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def test_flower_app_module_loads_the_configured_app(tmp_path: Path) -> None:
    code = (
        "from certqueue.flower_app import app; "
        "print(app.conf.broker_url); print('certqueue.issue' in app.tasks)"
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CERTQUEUE_")},
        "CERTQUEUE_SETTINGS_DIR": str(REPO / "settings"),
        "CERTQUEUE_BROKER__URL": "redis://127.0.0.1:6379/9",
    }
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["redis://127.0.0.1:6379/9", "True"]


def test_make_flower_refuses_without_basic_auth_and_binds_loopback() -> None:
    make = shutil.which("make")
    require_tool("make", make is not None)
    env = {k: v for k, v in os.environ.items() if k not in ("FLOWER_BASIC_AUTH", "MAKEFLAGS")}
    res = subprocess.run(
        [str(make), "-s", "-o", "install", "flower"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode != 0 and "FLOWER_BASIC_AUTH" in res.stdout + res.stderr
    dry = subprocess.run(
        [str(make), "-n", "-o", "install", "flower"],
        cwd=REPO,
        env={**env, "FLOWER_BASIC_AUTH": "u:p"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dry.returncode == 0, dry.stderr
    line = next(x for x in dry.stdout.splitlines() if "celery" in x)
    argv = shlex.split(line.replace("${FLOWER_PORT:-5555}", "5555"))
    assert argv[0].endswith("/celery") and check_celery(argv[1:]) == "flower"
    assert "--address=127.0.0.1" in argv
    assert "u:p" not in line, "the password must not be on the command line"


# --- systemd ---------------------------------------------------------------------------------------

UNITS = {
    "certqueue-api.service": ["serve"],
    "certqueue-metrics.service": ["metrics"],
    "certqueue-http01.service": ["http01"],
    "certqueue-worker-acme.service": ["worker"],
    "certqueue-worker-dns.service": ["worker"],
    "certqueue-worker-propagate@.service": ["worker"],
    "certqueue-beat.service": ["beat"],
    "certqueue-migrate.service": ["db", "upgrade"],
    "certqueue-flower.service": ["celery"],
}
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ReadWritePaths": "/var/lib/certqueue",
    "RestrictSUIDSGID": "yes",
    "User": "certqueue",
}


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """systemd's INI dialect: repeated keys allowed, order kept."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            assert line.endswith("]"), f"{path.name}: bad section line {raw!r}"
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None and "=" in line, f"{path.name}: {raw!r} outside a section or not key=value"
        key, value = line.split("=", 1)
        current.append((key.strip(), value.strip()))
    return sections


def _values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [v for k, v in section if k == key]


def test_systemd_units_run_real_commands_with_hardening() -> None:
    present = {p.name for p in SYSTEMD.iterdir()}
    assert set(UNITS) | {"certqueue.target"} <= present
    for name, expected in UNITS.items():
        unit = parse_unit(SYSTEMD / name)
        svc = unit["Service"]
        for key, want in HARDENING.items():
            assert want in _values(svc, key), f"{name}: {key}={want} missing"
        assert "certqueue.target" in _values(unit["Install"], "WantedBy"), name
        assert "certqueue.target" in _values(unit["Unit"], "PartOf"), name
        assert _values(svc, "Environment").count("CERTQUEUE_SETTINGS_DIR=/etc/certqueue/settings") == 1
        (exec_start,) = _values(svc, "ExecStart")
        argv = shlex.split(exec_start.replace("%i", "us-east-1"))
        assert argv[0].startswith(VENV_BIN), f"{name}: {argv[0]}"
        (inv,) = check_command_line(argv, {"us-east-1"})
        assert inv.path == expected, f"{name}: runs {inv.path}"
        if name == "certqueue-worker-propagate@.service":
            assert "--region %i" in exec_start
            assert "-/etc/certqueue/region-%i.env" in _values(svc, "EnvironmentFile")
        if name == "certqueue-flower.service":
            assert "--address=127.0.0.1" in argv
            assert any("FLOWER_BASIC_AUTH" in v for v in _values(svc, "ExecStartPre"))
        caps = _values(svc, "CapabilityBoundingSet")
        assert caps == (["CAP_NET_BIND_SERVICE"] if name == "certqueue-http01.service" else [""]), name
    target = parse_unit(SYSTEMD / "certqueue.target")
    wanted = " ".join(_values(target["Unit"], "Wants")).split()
    assert wanted and all(w in present for w in wanted)
    assert {n for n in UNITS if "@" not in n and "flower" not in n} <= set(wanted)


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify`` in a throwaway root: the units, systemd's own units, and stand-ins
    for the executables the units name. Any warning (unknown key, bad value, missing unit) fails."""
    sd = shutil.which("systemd-analyze")
    require_tool("systemd-analyze", sd is not None)
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    for unit in SYSTEMD.iterdir():
        shutil.copy(unit, root / "etc/systemd/system" / unit.name)
    system_units = next(
        p for p in (Path("/lib/systemd/system"), Path("/usr/lib/systemd/system")) if p.is_dir()
    )
    shutil.copytree(system_units, root / "lib/systemd/system", symlinks=True)
    for exe in ("certqueue", "celery"):
        stand_in = root / VENV_BIN.lstrip("/") / exe
        stand_in.parent.mkdir(parents=True, exist_ok=True)
        stand_in.write_text("#!/bin/sh\nexit 0\n")
        stand_in.chmod(0o755)
    (root / "bin").mkdir()
    shutil.copy("/bin/sh", root / "bin/sh")
    names = [n.replace("@.service", "@us-east-1.service") for n in UNITS] + ["certqueue.target"]
    res = subprocess.run(
        [str(sd), "verify", "--man=no", f"--root={root}", *names], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0 and not res.stderr.strip() and not res.stdout.strip(), res.stderr + res.stdout


# --- Kubernetes ------------------------------------------------------------------------------------

OVERLAYS = ("single-region", "multi-region")
#: kinds from operators installed beside certqueue (KEDA): no OpenAPI schema here, checked structurally
CRD_KINDS = {("keda.sh/v1alpha1", "ScaledObject"), ("keda.sh/v1alpha1", "TriggerAuthentication")}


def _kustomize_cli() -> list[str] | None:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    exe = shutil.which("kustomize")
    return [exe, "build"] if exe else None


_rendered: dict[str, list[dict[str, Any]]] = {}


def render(overlay: str) -> list[dict[str, Any]]:
    """The overlay as ``kubectl apply -k`` would send it: rendered by the real kustomize."""
    if overlay not in _rendered:
        cli = _kustomize_cli()
        require_tool("kubectl (or kustomize)", cli is not None)
        assert cli is not None
        res = subprocess.run(
            [*cli, str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=120
        )
        assert res.returncode == 0, res.stderr
        docs = [d for d in yaml.safe_load_all(res.stdout) if d]
        assert all(isinstance(d, dict) for d in docs)
        _rendered[overlay] = docs
    return _rendered[overlay]


def of_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in docs:
        if doc["kind"] in ("Deployment", "Job"):
            yield doc["metadata"]["name"], doc["spec"]["template"]["spec"]


def _argv_of(c: dict[str, Any]) -> list[str]:
    return list(c.get("command") or ["certqueue"]) + list(c.get("args", []))


def rendered_settings_dir(docs: list[dict[str, Any]], tmp_path: Path) -> Path:
    """The ConfigMap mounted as /etc/certqueue/settings, written out as that folder."""
    d = tmp_path / "k8s-settings"
    d.mkdir(exist_ok=True)
    for name, text in of_kind(docs, "ConfigMap")["certqueue-settings"]["data"].items():
        (d / name).write_text(text)
    return d


def test_kustomize_refuses_a_broken_overlay(tmp_path: Path) -> None:
    """render() can fail: an overlay naming a missing resource does not render."""
    cli = _kustomize_cli()
    require_tool("kubectl (or kustomize)", cli is not None)
    assert cli is not None
    (tmp_path / "kustomization.yaml").write_text(f"resources: [{K8S / 'base'}, ./missing.yaml]\n")
    res = subprocess.run([*cli, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_overlay_renders_and_matches_the_kubernetes_schemas(overlay: str) -> None:
    try:
        import kubernetes_validate
    except ImportError:
        require_tool("kubernetes-validate (PyPI)", False)
        raise
    version = kubernetes_validate.latest_version()
    docs = render(overlay)
    seen: set[tuple[str, str]] = set()
    for doc in docs:
        name = doc["metadata"]["name"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), name
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "certqueue", name
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "certqueue", name
        assert (doc["kind"], name) not in seen, f"duplicate {doc['kind']}/{name}"
        seen.add((doc["kind"], name))
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue  # test_k8s_keda_scales_each_pool_on_its_own_queue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{overlay}: {doc['kind']}/{name}: {exc}") from None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_applies_no_secret_and_documents_every_referenced_one(overlay: str) -> None:
    """``kubectl apply -k`` must never overwrite a Secret created out of band with empty values."""
    docs = render(overlay)
    assert not of_kind(docs, "Secret"), "Secrets are created out of band (docs/operations.md), never applied"
    refs: set[tuple[str, str]] = set()
    for _name, pod in pod_specs(docs):
        for v in pod.get("volumes", []):
            if "secret" in v:
                refs.add((v["secret"]["secretName"], "*"))
        for c in pod.get("initContainers", []) + pod["containers"]:
            for e in c.get("env", []):
                if "valueFrom" in e:
                    ref = e["valueFrom"]["secretKeyRef"]
                    refs.add((ref["name"], ref["key"]))
    for ta in of_kind(docs, "TriggerAuthentication").values():
        refs |= {(r["name"], r["key"]) for r in ta["spec"]["secretTargetRef"]}
    ops = (REPO / "docs" / "operations.md").read_text()
    for secret, key in sorted(refs):
        secret = re.sub(r"^certqueue-region-.+$", "certqueue-region-us-east-1", secret)  # one example
        assert f"create secret generic {secret}" in ops, (
            f"docs/operations.md does not say how to create {secret}"
        )
        if key != "*":
            assert f"--from-literal={key}=" in ops or f"--from-file={key}=" in ops, f"{secret}: key {key}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_containers_run_real_commands_with_real_settings(overlay: str, tmp_path: Path) -> None:
    docs = render(overlay)
    settings_dir = rendered_settings_dir(docs, tmp_path)
    s = check_settings_env({}, settings_dir)
    assert str(s.storage.encryption_key_path) == "/var/lib/certqueue/keys/master.key"
    assert s.api.host == "0.0.0.0" and s.challenges.http_host == "0.0.0.0"
    regions = {r.name for r in s.multi_region.regions}
    assert len(regions) == (1 if overlay == "single-region" else 2)
    accounts = of_kind(docs, "ServiceAccount")
    configmaps = of_kind(docs, "ConfigMap")
    commands: list[tuple[str, ...]] = []
    propagate: dict[str, str] = {}
    images: set[str] = set()
    for name, pod in pod_specs(docs):
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == IMAGE_UID
        assert pod["serviceAccountName"] in accounts, name
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for v in volumes.values():
            if "configMap" in v:
                assert v["configMap"]["name"] in configmaps
        for c in pod.get("initContainers", []) + pod["containers"]:
            images.add(c["image"])
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
            assert sc["readOnlyRootFilesystem"] is True
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, f"{name}/{c['name']}: no volume {m['name']}"
            argv = _argv_of(c)
            env: dict[str, str] = {}
            for e in c.get("env", []):
                if "value" in e:
                    assert not SECRET_NAME.search(e["name"]), f"{name}: {e['name']} has a literal value"
                    env[e["name"]] = e["value"]
                    continue
                env[e["name"]] = {
                    "CERTQUEUE_DATABASE__URL": "postgresql+psycopg://certqueue:x@postgres:5432/certqueue",
                    "CERTQUEUE_BROKER__URL": "redis://:x@redis:6379/0",
                }.get(e["name"], "placeholder")
            if c in pod.get("initContainers", []):
                assert argv[:2] == ["sh", "-c"] and "install -m 0600" in argv[2], argv
                assert argv[2].split()[-1] == str(s.storage.encryption_key_path)
                continue
            env.pop("CERTQUEUE_SETTINGS_DIR", None)
            settings = check_settings_env(env, settings_dir)
            assert settings.database.url.startswith("postgresql+psycopg://")
            invs = check_command_line(argv, regions)
            commands.append(tuple(invs[-1].path))
            if invs[-1].path == ["worker"] and invs[-1].params["pool"] == "propagate":
                (region,) = invs[-1].params["regions"]
                propagate[region] = name
                region_secrets = {
                    e["valueFrom"]["secretKeyRef"]["name"] for e in c["env"] if "valueFrom" in e
                } - {"certqueue"}
                assert region_secrets == {f"certqueue-region-{region}"}, f"{name} reads {region_secrets}"
                assert pod["serviceAccountName"] == f"certqueue-propagate-{region}"
    assert set(propagate) == regions, "one propagate Deployment per configured region"
    assert sorted(commands) == sorted(
        [
            ("serve",),
            ("http01",),
            ("worker",),
            ("worker",),
            ("beat",),
            ("celery",),
            ("db", "upgrade"),
            ("metrics",),
        ]
        + [("worker",)] * len(regions)
    )
    assert len(images) == 1, f"one image for every process, set once by the overlay: {images}"
    raw = [p for p in K8S.rglob("*.yaml") if "kustomization" not in p.name]
    for path in raw:
        for m in re.finditer(r"^\s*(?:- )?image:\s*(\S+)", path.read_text(), re.MULTILINE):
            assert m.group(1) == "certqueue", f"{path}: set the image in the overlay's images:, not here"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_every_process_has_liveness_and_readiness(overlay: str, tmp_path: Path) -> None:
    docs = render(overlay)
    for name, d in of_kind(docs, "Deployment").items():
        for c in d["spec"]["template"]["spec"]["containers"]:
            for kind in ("livenessProbe", "readinessProbe"):
                assert kind in c, f"{name}: no {kind}"
            argv = _argv_of(c)
            for kind in ("livenessProbe", "readinessProbe"):
                probe = c[kind]
                if "exec" not in probe:
                    continue
                cmd = probe["exec"]["command"]
                if argv[:2] == ["certqueue", "worker"]:
                    # the worker answers a ping under the node name run_worker gives it
                    (inv,) = check_command_line(argv, {"us-east-1", "eu-west-1"})
                    assert cmd[:2] == ["sh", "-c"], cmd
                    assert f"-d {worker_node_name(inv)}@$HOSTNAME" in cmd[2], (name, cmd)
                    check_command_line(shlex.split(cmd[2]), set())
                elif argv[:2] == ["certqueue", "beat"]:
                    # the RedBeat lock under the prefix certqueue.workers gives beat
                    workers_src = (REPO / "certqueue" / "workers.py").read_text()
                    prefix = re.search(r'redbeat_key_prefix = "([^"]+)"', workers_src)
                    assert prefix and f"'{prefix.group(1).rstrip(':')}*lock'" in cmd[-1], cmd
                    compile(cmd[-1], "<beat probe>", "exec")
                else:
                    raise AssertionError(f"{name}: unexpected exec probe {cmd}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_pdbs_cover_every_replicated_process(overlay: str) -> None:
    docs = render(overlay)
    pdbs = of_kind(docs, "PodDisruptionBudget")
    scaled = {so["spec"]["scaleTargetRef"]["name"] for so in of_kind(docs, "ScaledObject").values()}
    for name, d in of_kind(docs, "Deployment").items():
        labels = d["spec"]["template"]["metadata"]["labels"]
        covering = [
            p for p in pdbs.values() if p["spec"]["selector"]["matchLabels"].items() <= labels.items()
        ]
        if d["spec"]["replicas"] > 1 or name in scaled:
            assert len(covering) == 1, f"{name}: {len(covering)} PodDisruptionBudgets"
        else:
            assert not covering, f"{name} runs one replica by design: a PDB would only block drains"
    for p in pdbs.values():
        assert any(
            p["spec"]["selector"]["matchLabels"].items()
            <= d["spec"]["template"]["metadata"]["labels"].items()
            for d in of_kind(docs, "Deployment").values()
        ), p["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_keda_scales_each_pool_on_its_own_queue(overlay: str, tmp_path: Path) -> None:
    from certqueue.config import load_settings as _load
    from certqueue.workers import pool_spec

    docs = render(overlay)
    settings = _load(directory=rendered_settings_dir(docs, tmp_path), environ={}).settings
    from certqueue.config import set_settings

    set_settings(settings)
    try:
        deployments = of_kind(docs, "Deployment")
        auths = of_kind(docs, "TriggerAuthentication")
        pools: set[str] = set()
        for so in of_kind(docs, "ScaledObject").values():
            target = deployments[so["spec"]["scaleTargetRef"]["name"]]
            (inv,) = check_command_line(_argv_of(target["spec"]["template"]["spec"]["containers"][0]),
                                        {r.name for r in settings.multi_region.regions})  # fmt: skip
            assert inv.path == ["worker"]
            queues = pool_spec(inv.params["pool"], list(inv.params["regions"])).queues
            (trigger,) = so["spec"]["triggers"]
            assert trigger["type"] == "redis" and trigger["metadata"]["listName"] in queues, (queues, trigger)
            assert trigger["authenticationRef"]["name"] in auths
            assert 1 <= so["spec"]["minReplicaCount"] <= so["spec"]["maxReplicaCount"]
            pools.add(worker_node_name(inv))
        assert pools == {"acme", "dns"} | {f"propagate-{r.name}" for r in settings.multi_region.regions}
        (auth,) = auths.values()
        assert {r["parameter"] for r in auth["spec"]["secretTargetRef"]} == {"address", "password"}
    finally:
        set_settings(None)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_one_metrics_scrape_target_reachable_only_from_monitoring(overlay: str, tmp_path: Path) -> None:
    docs = render(overlay)
    s = check_settings_env({}, rendered_settings_dir(docs, tmp_path))
    deployments = of_kind(docs, "Deployment")
    exporters = [n for n, d in deployments.items()
                 if _argv_of(d["spec"]["template"]["spec"]["containers"][0])[1:2] == ["metrics"]]  # fmt: skip
    assert exporters == ["certqueue-metrics"]
    metrics_dep = deployments["certqueue-metrics"]
    assert metrics_dep["spec"]["replicas"] == 1 and metrics_dep["spec"]["strategy"] == {"type": "Recreate"}
    (port,) = metrics_dep["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert port["containerPort"] == s.monitoring.prometheus_port != s.api.port
    assert s.monitoring.prometheus_port != 9091, "9091 is the Pushgateway's port"
    scraped = [svc for svc in of_kind(docs, "Service").values()
               if svc["metadata"].get("annotations", {}).get("prometheus.io/scrape") == "true"]  # fmt: skip
    assert [svc["metadata"]["name"] for svc in scraped] == ["certqueue-metrics"]
    assert scraped[0]["metadata"]["annotations"]["prometheus.io/port"] == str(s.monitoring.prometheus_port)

    def component(np: dict[str, Any]) -> str | None:
        return np["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/component")

    policies = [np for np in of_kind(docs, "NetworkPolicy").values() if component(np) == "metrics"]
    (np,) = policies
    (rule,) = np["spec"]["ingress"]
    assert rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    assert rule["ports"] == [{"protocol": "TCP", "port": s.monitoring.prometheus_port}]
    # and no other policy opens the metrics port
    for other in of_kind(docs, "NetworkPolicy").values():
        if other is not np:
            for r in other["spec"].get("ingress", []):
                assert all(p["port"] != s.monitoring.prometheus_port for p in r.get("ports", [])), other


def test_k8s_beat_is_a_single_recreated_replica() -> None:
    beat = of_kind(render("multi-region"), "Deployment")["certqueue-beat"]
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"] == {"type": "Recreate"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_selectors_services_and_ports_resolve(overlay: str, tmp_path: Path) -> None:
    docs = render(overlay)
    s = check_settings_env({}, rendered_settings_dir(docs, tmp_path))
    deployments = of_kind(docs, "Deployment")
    for name, d in deployments.items():
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert d["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
    for name, svc in of_kind(docs, "Service").items():
        sel = svc["spec"]["selector"]
        matches = [
            d
            for d in deployments.values()
            if sel.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(matches) == 1, f"Service {name} selects {len(matches)} Deployments"
        ports = {p["name"]: p["containerPort"] for c in matches[0]["spec"]["template"]["spec"]["containers"]
                 for p in c.get("ports", [])}  # fmt: skip
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in ports or p["targetPort"] in ports.values(), f"{name}: {p}"
    api_ports = deployments["certqueue-api"]["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert api_ports[0]["containerPort"] == s.api.port
    h_ports = deployments["certqueue-http01"]["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert h_ports[0]["containerPort"] == s.challenges.http_port
    for np in of_kind(docs, "NetworkPolicy").values():
        sel = np["spec"]["podSelector"].get("matchLabels", {})
        if sel:
            assert any(sel.items() <= d["spec"]["template"]["metadata"]["labels"].items()
                       for d in deployments.values()), np["metadata"]["name"]  # fmt: skip


def _probes() -> list[tuple[str, str, str]]:
    """(deployment, process, path) of every httpGet probe."""
    out = []
    for name, d in of_kind(render("multi-region"), "Deployment").items():
        for c in d["spec"]["template"]["spec"]["containers"]:
            argv = _argv_of(c)
            process = "flower" if "flower_app" in " ".join(argv) else argv[1]
            for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
                if kind in c and "httpGet" in c[kind]:
                    out.append((name, process, c[kind]["httpGet"]["path"]))
    return out


def test_k8s_probes_point_at_real_endpoints(
    settings_factory: Callable[..., Settings], sqlite_url: str
) -> None:
    """Each probe path is requested from the real process: the API app (migrated SQLite), the
    HTTP-01 responder, Flower's URL table. A path that does not answer 200 fails."""
    from fastapi.testclient import TestClient

    from certqueue.api.app import create_app
    from certqueue.http01 import serve

    probes = _probes()
    assert {(d, p) for d, p, _ in probes} >= {("certqueue-api", "serve"), ("certqueue-http01", "http01")}
    api_paths = {path for d, proc, path in probes if proc == "serve"}
    assert api_paths == {"/health", "/health/certificates"}
    settings_factory(database_url=sqlite_url)
    with TestClient(create_app()) as client:
        for path in api_paths:
            assert client.get(path).status_code == 200, path
    srv = serve("127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        import requests

        for _, proc, path in probes:
            if proc == "http01":
                url = f"http://127.0.0.1:{srv.server_address[1]}{path}"
                assert requests.get(url, timeout=5).status_code == 200, path
    finally:
        srv.shutdown()
        srv.server_close()
    from flower.urls import handlers

    flower_paths = [h.regex if hasattr(h, "regex") else re.compile(h[0]) for h in handlers]
    flower_probes = [path for _, proc, path in probes if proc == "flower"]
    assert flower_probes
    for path in flower_probes:
        assert any(rx.fullmatch(path) or rx.pattern.rstrip("$") == path for rx in flower_paths), path
