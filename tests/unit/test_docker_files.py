"""docker/: the Dockerfile, compose.yml and the workers' sync.yaml, checked without an engine.

There is no Docker engine where these tests run, so nothing here builds an image or
starts a container. What is checked instead:

- compose.yml by the compose CLI (``docker compose config`` or ``docker-compose config``)
  and by the Compose specification's JSON schema (Debian's ``docker-compose`` package
  brings both);
- the cluster, proxy, database and emulator wiring by our own rules;
- rabbitmq.conf against the config schema of the local RabbitMQ, haproxy.cfg with
  ``haproxy -c``;
- sync.yaml with syncbus's own loader, in the environment compose gives the workers;
- the Dockerfile by parsing it, and its build step by building the wheel from exactly
  the files it copies, then importing every module of it in a fresh virtualenv;
- docker/healthcheck.py against a real worker health server.

The checks that need a tool (compose CLI, compose schema, RabbitMQ, haproxy) skip on a
developer machine without it, saying what to install, and fail in CI (``CI=true``):
``tests/run`` installs them there.

tests/integration/test_docker_config.py runs the emulators, setup and a worker with
these files against the local RabbitMQ and PostgreSQL.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import venv
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import sqlalchemy as sa
import typer
import yaml

from bus.cli.main import cli
from bus.config.load import load_config
from bus.worker.health import HealthServer
from bus.worker.metrics import Metrics
from schemas.config import BusinessCentralConnection, DataverseConnection, SqlConnection
from tests.support import skip_or_fail_in_ci
from tests.syncenv import ROOT

DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "compose.yml"
DOCKERFILE = DOCKER / "Dockerfile"
SYNC_YAML = DOCKER / "sync.yaml"
HEALTHCHECK = DOCKER / "healthcheck.py"
#: Compose-spec JSON schemas that packages install (Debian: docker-compose).
SCHEMA_CANDIDATES = (
    "/usr/lib/python3/dist-packages/compose/config/compose_spec.json",
    "/usr/local/lib/python3*/dist-packages/compose/config/compose_spec.json",
)
RABBITMQ_SCHEMAS = "/usr/lib/rabbitmq/lib/rabbitmq_server-*/plugins/*/priv/schema/*.schema"
#: Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?message}.
_COMPOSE_VAR = re.compile(r"\$\{(\w+)(?:(:?-)([^}]*)|(:?\?)([^}]*))?\}")


# ----------------------------------------------------------------------------- helpers


def compose() -> dict[str, Any]:
    """compose.yml as compose sees it: anchors and merge keys resolved."""
    return yaml.safe_load(COMPOSE_FILE.read_text())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def interpolate(value: str) -> str:
    """Compose's interpolation with no .env and an empty environment: the defaults."""
    def default(match: re.Match[str]) -> str:
        if match.group(2) is None:
            raise AssertionError(f"compose.yml: {match.group(0)} has no default; "
                                 "`up` without a docker/.env would fail or run with ''")
        return match.group(3)

    return _COMPOSE_VAR.sub(default, value)


def service_env(name: str) -> dict[str, str]:
    env = services()[name].get("environment") or {}
    assert isinstance(env, dict), f"{name}: write environment as a mapping"
    return {k: interpolate(str(v)) for k, v in env.items()}


def syncbus_services() -> dict[str, dict[str, Any]]:
    """Services that run the image of docker/Dockerfile."""
    return {name: svc for name, svc in services().items()
            if svc.get("build", {}).get("dockerfile") == "docker/Dockerfile"}


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for raw in joined.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def exec_form(args: str) -> list[str]:
    """A JSON exec form (``["syncbus", "run"]``) or a shell form split into words."""
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def copies() -> list[tuple[list[str], str, dict[str, str]]]:
    """(sources, destination, flags) of every COPY/ADD."""
    found = []
    for word, args in dockerfile():
        if word in ("COPY", "ADD"):
            parts = exec_form(args)
            flags = dict(p[2:].partition("=")[::2] for p in parts if p.startswith("--"))
            paths = [p for p in parts if not p.startswith("--")]
            found.append((paths[:-1], paths[-1], flags))
    return found


def context_copies() -> list[str]:
    """Sources copied from the build context (not from another stage)."""
    return [src for sources, _, flags in copies() if "from" not in flags for src in sources]


def emulator_command(name: str) -> tuple[tuple[str, ...], dict[str, str]]:
    """(``emulate <system>``, {--flag: value}) of an emulator service's command."""
    command = services()[name]["command"]
    assert command[0] == "emulate", f"{name}: command {command}"
    flags: dict[str, str] = {}
    rest = command[2:]
    for i, word in enumerate(rest):
        if word.startswith("--"):
            nxt = rest[i + 1] if i + 1 < len(rest) else ""
            flags[word] = "" if nxt.startswith("--") or not nxt else nxt
    return tuple(command[:2]), flags


def emulators() -> dict[str, str]:
    """Emulator service → connection name in sync.yaml (matched by URL host)."""
    loaded = load_sync_yaml()
    out = {}
    for svc in syncbus_services():
        if services()[svc].get("command", [None])[0] != "emulate":
            continue
        for conn, cfg in loaded.connections.items():
            if hasattr(cfg, "url") and urlsplit(cfg.url).hostname == svc:
                out[svc] = conn
    return out


def load_sync_yaml() -> Any:
    return load_config(SYNC_YAML, environ=service_env("worker")).config


def hub_tables(tmp_path: Path) -> dict[str, set[str]]:
    """Tables and columns the postgres init scripts create in the hub (run on SQLite)."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'hub.db'}")
    with engine.begin() as conn:
        for script in sorted((DOCKER / "postgres").glob("*.sql")):
            for statement in script.read_text().split(";"):
                if re.search(r"^\s*CREATE\s+TABLE", statement, re.M | re.I):
                    conn.exec_driver_sql(statement)
    inspector = sa.inspect(engine)
    tables = {t: {c["name"] for c in inspector.get_columns(t)} for t in inspector.get_table_names()}
    engine.dispose()
    return tables


def created_databases() -> set[str]:
    """Databases that exist after the postgres service's first start."""
    names = {service_env("postgres")["POSTGRES_DB"]}
    for script in (DOCKER / "postgres").glob("*.sql"):
        names |= set(re.findall(r"CREATE\s+DATABASE\s+(\w+)", script.read_text(), re.I))
    return names


# ------------------------------------------------------------------- compose.yml: tools


def _compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True,
                                 timeout=30).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_compose_file_passes_the_compose_cli():
    tool = _compose_cli()
    if tool is None:
        skip_or_fail_in_ci("no compose CLI here (docker compose plugin or docker-compose): "
                           "apt-get install docker-compose gives one that needs no engine")
    # An empty environment: the defaults of compose.yml must be enough.
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    result = subprocess.run([*tool, "-f", str(COMPOSE_FILE), "config", "-q"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(tool)} config rejects compose.yml:\n" \
                                   f"{result.stdout}{result.stderr}"


def _compose_schema() -> dict[str, Any] | None:
    candidates = [os.environ.get("SYNCBUS_COMPOSE_SCHEMA", "")]
    for pattern in SCHEMA_CANDIDATES:
        candidates += [str(p) for p in Path("/").glob(pattern.lstrip("/"))]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return json.loads(Path(candidate).read_text())
    return None


def test_compose_file_matches_the_compose_specification_schema():
    schema = _compose_schema()
    if schema is None:
        skip_or_fail_in_ci("no Compose specification JSON schema on this machine: "
                           "apt-get install docker-compose (it ships one), or set "
                           "SYNCBUS_COMPOSE_SCHEMA=path/to/compose-spec.json")
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(compose()), key=str)
    assert not errors, "compose.yml breaks the Compose specification:\n" + "\n".join(
        f"  {'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in errors)


def test_compose_runs_without_an_env_file():
    # Every ${VAR} has a default: `up` works on a laptop with no docker/.env at all.
    interpolate(COMPOSE_FILE.read_text())
    with pytest.raises(AssertionError, match="no default"):
        interpolate("url: ${NO_DEFAULT}")


# ------------------------------------------------------------- compose.yml: the wiring


def rabbit_nodes() -> dict[str, dict[str, Any]]:
    return {n: s for n, s in services().items() if s.get("image", "").startswith("rabbitmq:")}


def test_rabbitmq_is_a_three_node_3x_cluster_sharing_one_cookie():
    nodes = rabbit_nodes()
    assert len(nodes) == 3, sorted(nodes)
    images = {s["image"] for s in nodes.values()}
    assert len(images) == 1 and images.pop().startswith("rabbitmq:3."), "one RabbitMQ 3.x image"
    cookies = {service_env(n).get("RABBITMQ_ERLANG_COOKIE") for n in nodes}
    assert len(cookies) == 1 and None not in cookies, f"one shared Erlang cookie, got {cookies}"
    conf = (DOCKER / "rabbitmq" / "rabbitmq.conf").read_text()
    listed = set(re.findall(r"^cluster_formation\.classic_config\.nodes\.\d+\s*=\s*(\S+)",
                            conf, re.M))
    assert re.search(r"^cluster_formation\.peer_discovery_backend\s*=\s*classic_config", conf,
                     re.M)
    assert listed == {f"rabbit@{s['hostname']}" for s in nodes.values()}, listed
    for name, svc in nodes.items():
        assert svc["hostname"] == name, "the node name rabbit@<hostname> must resolve"
        assert any(v.endswith("/etc/rabbitmq/conf.d/20-syncbus.conf:ro") for v in svc["volumes"])
        assert any(v.endswith(":/var/lib/rabbitmq") for v in svc["volumes"]), f"{name}: no data"


def test_the_first_node_is_the_seed_the_others_join_it():
    nodes = sorted(rabbit_nodes())
    seed, *joiners = nodes
    assert "depends_on" not in rabbit_nodes()[seed]
    for name in joiners:
        assert rabbit_nodes()[name]["depends_on"] == {seed: {"condition": "service_healthy"}}


def test_management_plugin_on_exactly_one_node():
    with_ui = []
    for name, svc in rabbit_nodes().items():
        mount = next(v for v in svc["volumes"] if v.endswith("/etc/rabbitmq/enabled_plugins:ro"))
        plugins = (DOCKER / mount.split(":")[0]).read_text()
        assert re.fullmatch(r"\[[a-z_,]+\]\.\n", plugins), f"{mount}: not an Erlang list"
        names = plugins.strip("[].\n").split(",")
        assert "rabbitmq_management_agent" in names or "rabbitmq_management" in names
        if "rabbitmq_management" in names:
            with_ui.append(name)
            assert any(p.endswith(":15672") for p in svc.get("ports", []))
    assert len(with_ui) == 1, with_ui


def test_rabbitmq_conf_uses_only_keys_rabbitmq_knows():
    schemas = list(Path("/").glob(RABBITMQ_SCHEMAS.lstrip("/")))
    if not schemas:
        skip_or_fail_in_ci("no local RabbitMQ installation to read the config schema from "
                           f"({RABBITMQ_SCHEMAS}): apt-get install rabbitmq-server")
    patterns = []
    for schema in schemas:
        for key in re.findall(r'\{mapping,\s*"([^"]+)"', schema.read_text()):
            patterns.append(re.compile(re.sub(r"\\\$\w+", r"[^.]+", re.escape(key)) + r"\Z"))
    conf = (DOCKER / "rabbitmq" / "rabbitmq.conf").read_text()
    keys = [line.split("=")[0].strip() for line in conf.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
    unknown = [k for k in keys if not any(p.match(k) for p in patterns)]
    assert keys and not unknown, f"rabbitmq.conf keys no RabbitMQ schema declares: {unknown}"


def test_haproxy_forwards_amqp_to_every_node():
    lb = services()["rabbitmq"]
    assert lb["image"].startswith("haproxy:")
    cfg_mount = next(v for v in lb["volumes"] if "haproxy.cfg" in v)
    cfg_path = DOCKER / cfg_mount.split(":")[0]
    cfg = cfg_path.read_text()
    servers = set(re.findall(r"^\s*server\s+\S+\s+([\w-]+):5672\b", cfg, re.M))
    assert servers == set(rabbit_nodes()), servers
    assert re.search(r"^\s*bind\s+:5672\s*$", cfg, re.M)
    assert any(p.endswith(":5672") for p in lb["ports"])


def test_haproxy_accepts_its_config():
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        skip_or_fail_in_ci("no haproxy here to check docker/haproxy/haproxy.cfg with "
                           "`haproxy -c`: apt-get install haproxy")
    cfg_mount = next(v for v in services()["rabbitmq"]["volumes"] if "haproxy.cfg" in v)
    # The nodes do not resolve here: haproxy warns about that, which is not an error.
    result = subprocess.run([haproxy, "-c", "-f", str(DOCKER / cfg_mount.split(":")[0])],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def _healthchecked(name: str) -> bool:
    svc = services()[name]
    if "healthcheck" in svc:
        return not svc["healthcheck"].get("disable", False)
    return name in syncbus_services() and any(w == "HEALTHCHECK" for w, _ in dockerfile())


def test_every_long_running_service_has_a_healthcheck():
    for name, svc in services().items():
        if svc.get("restart") == "no":
            continue  # a one-shot job
        assert _healthchecked(name), f"{name}: no healthcheck"


def test_dependencies_wait_for_health_or_completion():
    for name, svc in services().items():
        for dep, spec in (svc.get("depends_on") or {}).items():
            assert dep in services(), f"{name} depends on unknown {dep}"
            condition = spec["condition"]
            if services()[dep].get("restart") == "no":
                # A one-shot job exits: it is never "healthy", only completed.
                assert condition == "service_completed_successfully", (name, dep, condition)
            elif condition == "service_healthy":
                assert _healthchecked(dep), f"{name} waits for {dep} to be healthy: it has no check"
            else:
                assert condition == "service_completed_successfully", (name, dep, condition)
                assert services()[dep].get("restart") == "no", f"{dep} is not a one-shot job"


def test_workers_wait_for_everything_they_talk_to():
    deps = services()["worker"]["depends_on"]
    for needed in ("rabbitmq", *rabbit_nodes(), "postgres", *emulators(), "setup"):
        assert needed in deps, f"worker does not wait for {needed}"
    assert services()["worker"]["deploy"]["replicas"] == 2


def test_bind_mounts_exist_in_the_repository():
    for name, svc in services().items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in compose()["volumes"], f"{name}: undeclared volume {source}"


def test_postgres_probe_uses_tcp():
    # The first boot runs the init scripts on a socket-only server; over TCP,
    # pg_isready says ready only once the real server listens.
    test = services()["postgres"]["healthcheck"]["test"]
    assert "pg_isready" in test and test[test.index("-h") + 1] == "127.0.0.1"
    assert "./postgres:/docker-entrypoint-initdb.d:ro" in services()["postgres"]["volumes"]


# -------------------------------------------------------------------- sync.yaml


def test_sync_yaml_loads_in_the_workers_environment():
    # Given the environment compose gives the workers, the config is valid as is.
    config = load_sync_yaml()
    assert urlsplit(config.broker.url).hostname == "rabbitmq"
    assert config.metrics.port == 9464
    # Prometheus scrapes worker:9464 over the compose network: the host is explicit,
    # the default (127.0.0.1) would be reachable from inside the container only.
    assert config.metrics.host == "0.0.0.0" and "host: 0.0.0.0" in SYNC_YAML.read_text()
    # Every ${VAR} it uses comes from that environment, not from the host's.
    used = set(re.findall(r"\$\{(\w+)", SYNC_YAML.read_text()))
    assert used <= set(service_env("worker")), used - set(service_env("worker"))


def test_sync_yaml_points_at_compose_services_and_created_databases():
    config = load_sync_yaml()
    names = set(services())
    urls = [config.broker.url, config.state.url]
    urls += [c.url for c in config.connections.values()]
    urls += [c.index_url for c in config.connections.values()
             if isinstance(c, BusinessCentralConnection) and c.index_url]
    for url in urls:
        assert urlsplit(url.replace("+psycopg", "")).hostname in names, url
    pg_urls = [u for u in urls if u.startswith("postgresql")]
    assert pg_urls and all(urlsplit(u).path.strip("/") in created_databases() for u in pg_urls)
    user = service_env("postgres")["POSTGRES_USER"]
    password = service_env("postgres")["POSTGRES_PASSWORD"]
    for url in pg_urls:
        assert (urlsplit(url).username, urlsplit(url).password) == (user, password), url
    amqp = urlsplit(config.broker.url)
    node_env = service_env(next(iter(rabbit_nodes())))
    assert (amqp.username, amqp.password) == (node_env["RABBITMQ_DEFAULT_USER"],
                                              node_env["RABBITMQ_DEFAULT_PASS"])


def test_state_store_is_shared_postgresql():
    # Two workers: the state store and the Business Central key index must be shared.
    config = load_sync_yaml()
    assert config.state.url.startswith("postgresql+psycopg://")
    for conn in config.connections.values():
        if isinstance(conn, BusinessCentralConnection):
            assert (conn.index_url or "").startswith("postgresql+psycopg://")


def test_emulator_commands_are_real_syncbus_commands():
    tree = typer.main.get_command(cli)
    for svc in emulators():
        (group, system), flags = emulator_command(svc)
        command = tree.commands[group].commands[system]  # type: ignore[attr-defined]
        known = {opt for param in command.params for opt in param.opts}
        assert set(flags) <= known, f"{svc}: unknown flags {set(flags) - known}"


def test_emulators_serve_what_the_workers_connect_to():
    config = load_sync_yaml()
    for svc, conn_name in emulators().items():
        conn = config.connections[conn_name]
        assert isinstance(conn, DataverseConnection | BusinessCentralConnection)
        _, flags = emulator_command(svc)
        url = urlsplit(conn.url)
        # The certificate is made for --host: it must be the name the worker uses.
        assert flags["--host"] == url.hostname == services()[svc]["hostname"] == svc
        assert int(flags["--port"]) == url.port and "--https" in flags
        assert conn.authority_host == conn.url
        assert conn.ca_bundle == f"{flags['--cert-dir']}/ca.pem"
        assert conn.client_secret is not None
        assert conn.client_secret.get_secret_value() == "syncbus-emulator-secret"
        probe = services()[svc]["healthcheck"]["test"]
        assert probe[1] == "syncbus-healthcheck" and probe[2].startswith(conn.url + "/")
        assert probe[probe.index("--ca") + 1] == conn.ca_bundle
        # The workers see the certificates the emulators write.
        certs = "/".join(flags["--cert-dir"].split("/")[:-1])
        emu_mounts = {v.split(":")[0]: v.split(":")[1] for v in services()[svc]["volumes"]}
        worker_mounts = {v.split(":")[0]: v.split(":")[1] for v in services()["worker"]["volumes"]}
        shared = [v for v, target in emu_mounts.items() if target == certs]
        assert shared and worker_mounts.get(shared[0]) == certs


def test_hub_tables_have_every_mapped_column(tmp_path):
    tables = hub_tables(tmp_path)
    config = load_sync_yaml()
    hub = [n for n, c in config.connections.items() if isinstance(c, SqlConnection)]
    checked = 0
    for name, link in config.links.items():
        if link.target.connection in hub:
            specs = link.field_specs() or {}
            assert link.target.entity in tables, f"links.{name}: no table {link.target.entity}"
            missing = set(specs) - tables[link.target.entity]
            assert not missing, f"links.{name}: {link.target.entity} lacks {missing}"
            checked += 1
    assert checked == 3


# ------------------------------------------------------------------------ Dockerfile


def test_dockerfile_copies_sources_that_exist():
    sources = context_copies()
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"


def test_dockerfile_copies_every_package_the_project_installs():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = {Path(s).parts[0] for s in context_copies()}
    assert packages <= copied, f"packages not copied into the image: {packages - copied}"
    assert {"pyproject.toml", project["project"]["readme"]} <= copied


def test_dockerfile_entrypoint_is_the_console_script_and_runs_as_non_root():
    instructions = dockerfile()
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entry = exec_form(next(a for w, a in instructions if w == "ENTRYPOINT"))
    assert entry == ["syncbus"] and "syncbus" in scripts
    cmd = exec_form(next(a for w, a in instructions if w == "CMD"))
    assert cmd[:2] == ["run", "--config"]
    # The config path of the default command is where compose mounts sync.yaml.
    assert f"./sync.yaml:{cmd[2]}:ro" in services()["worker"]["volumes"]
    assert service_env("worker")["SYNCBUS_CONFIG"] == cmd[2]
    bases = [a.split()[0] for w, a in instructions if w == "FROM"]
    assert all(b.startswith("python:") and "-slim" in b for b in bases), bases
    user = [a for w, a in instructions if w == "USER"]
    assert user and user[-1] not in ("root", "0"), "the image must not run as root"


def test_dockerfile_healthcheck_runs_the_installed_probe():
    instructions = dockerfile()
    health = next(a for w, a in instructions if w == "HEALTHCHECK")
    probe = exec_form(health.split("CMD", 1)[1].strip())[0]
    assert any(dest == f"/usr/local/bin/{probe}" and srcs == ["docker/healthcheck.py"]
               for srcs, dest, _ in copies())
    assert os.access(HEALTHCHECK, os.X_OK), "docker/healthcheck.py must be executable"
    assert HEALTHCHECK.read_text().startswith("#!/usr/bin/env python3\n")


def _ignored(path: str, rules: list[str]) -> bool:
    """Docker's .dockerignore: the last matching rule wins; a rule matches parents too."""
    parts = Path(path).parts
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for rule in rules:
        negate, pattern = rule.startswith("!"), rule.lstrip("!")
        if any(fnmatch.fnmatchcase(c, pattern) for c in candidates):
            ignored = not negate
    return ignored


def test_build_context_keeps_what_the_dockerfile_copies():
    rules = [line.strip() for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    for source in context_copies():
        files = [source] if (ROOT / source).is_file() else [
            str(p.relative_to(ROOT)) for p in (ROOT / source).rglob("*.py")]
        for file in files:
            assert not _ignored(file, rules), f"{file} is copied but excluded from the context"
    for private in (".venv/bin/python", ".git/config", ".syncbus/state.db", "tests/conftest.py"):
        assert _ignored(private, rules), f"{private} would be sent to the builder"


def test_the_image_build_step_yields_a_complete_installable_wheel(tmp_path):
    # Given only the files the Dockerfile copies (its build context for that stage),
    src = tmp_path / "src"
    for source in context_copies():
        if source.startswith("docker/"):
            continue
        origin = ROOT / source
        if origin.is_dir():
            shutil.copytree(origin, src / source, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (src / source).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, src / source)
    # When the wheel is built as its `pip wheel` does,
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                            "-w", str(tmp_path / "wheels"), str(src)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    wheel = next((tmp_path / "wheels").glob("syncbus-*.whl"))
    # Then, installed in a fresh virtualenv (dependencies borrowed from ours),
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = [p for p in sys.path if p.endswith("site-packages")]
    Path(site, "deps.pth").write_text("\n".join(ours) + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                              "--target", site, str(wheel)], capture_output=True, text=True,
                             timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr
    # every module of every package imports from the wheel, schemas included,
    script = (
        "import importlib, pkgutil, sys\n"
        "from importlib.resources import files\n"
        f"for top in {sorted({Path(s).parts[0] for s in context_copies() if '/' not in s and (ROOT / s).is_dir()})!r}:\n"
        "    pkg = importlib.import_module(top)\n"
        f"    assert pkg.__file__.startswith({site!r}), pkg.__file__\n"
        "    for mod in pkgutil.walk_packages(pkg.__path__, top + '.'):\n"
        "        importlib.import_module(mod.name)\n"
        "assert list(files('schemas').glob('*.json')), 'no JSON schemas in the wheel'\n"
        "print('ok')\n"
    )
    run = subprocess.run([python, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr
    # and the console script of the ENTRYPOINT is declared in it.
    entry_points = subprocess.run([python, "-c", (
        "from importlib.metadata import entry_points;"
        "print([e.value for e in entry_points(group='console_scripts', name='syncbus')])")],
        cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert "bus.cli:main" in entry_points


# ------------------------------------------------------------------ healthcheck.py


def _probe(*args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if config is not None:
        env["SYNCBUS_CONFIG"] = str(config)
    return subprocess.run([sys.executable, str(HEALTHCHECK), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def _config_with_port(tmp_path: Path, port: int | None) -> Path:
    path = tmp_path / "sync.yaml"
    data: dict[str, Any] = {"connections": {"db": {"type": "sql", "url": "sqlite:///x.db"}}}
    if port is not None:
        data["metrics"] = {"port": port, "host": "0.0.0.0"}
    path.write_text(yaml.safe_dump(data))
    return path


def test_healthcheck_follows_the_workers_liveness(tmp_path):
    alive = {"ok": True}
    server = HealthServer(Metrics(), liveness=lambda: (alive["ok"], {"threads": "x"}),
                          readiness=lambda: (True, {}), host="127.0.0.1", port=0)
    try:
        config = _config_with_port(tmp_path, server.port)
        healthy = _probe(config=config)
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr
        assert f"127.0.0.1:{server.port}/healthz: 200" in healthy.stdout
        alive["ok"] = False
        sick = _probe(config=config)
        assert sick.returncode == 1 and "HTTP 503" in sick.stdout, sick.stdout
    finally:
        server.close()
    gone = _probe(config=config)
    assert gone.returncode == 1 and "refused" in gone.stdout.lower(), gone.stdout


def test_healthcheck_without_metrics_port_passes_and_bad_config_fails(tmp_path):
    no_port = _probe(config=_config_with_port(tmp_path, None))
    assert no_port.returncode == 0 and "no metrics.port" in no_port.stdout
    broken = tmp_path / "broken.yaml"
    broken.write_text("connections: {}\nmetrics: {port: nine}\n")
    bad = _probe(config=broken)
    assert bad.returncode == 1 and "broken.yaml" in bad.stdout, bad.stdout


def test_healthcheck_probes_a_url(tmp_path):
    server = HealthServer(Metrics(), liveness=lambda: (True, {}), readiness=lambda: (False, {}),
                          host="127.0.0.1", port=0)
    try:
        assert _probe(f"http://127.0.0.1:{server.port}/metrics").returncode == 0
        not_ready = _probe(f"http://127.0.0.1:{server.port}/readyz")
        assert not_ready.returncode == 1 and "503" in not_ready.stdout
    finally:
        server.close()
