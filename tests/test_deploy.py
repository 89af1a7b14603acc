"""The reference deployment in deploy/: checked statically, and its gateway config run once.

No Docker or Kubernetes here: the Kubernetes manifests are validated against the official
Kubernetes JSON schemas (shipped offline by the ``kubernetes-validate`` package, strict mode:
unknown fields are errors), compose.yaml against the Compose specification's JSON schema
(vendored in tests/data/deploy), the gateway configs with ``parse_config``, the systemd units
with ``systemd-analyze verify`` (and an INI parse), and every ModelFence command line with
the real command-line parser. Cross-checks tie them together: probe paths, ports, selectors,
the HPA's target and the detector worker counts. One test runs the Kubernetes config (the
gateway and a detector worker, with the manifests' own arguments) on real Redis and
PostgreSQL and asks the probe paths.
"""

from __future__ import annotations

import configparser
import copy
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import typer
import yaml

from modelfence.cli import app
from modelfence.config import ENV_OVERRIDES, Config, parse_config
from modelfence.errors import ConfigError
from modelfence.models.cache import CACHE_DIR_ENV
from modelfence.testing.processes import ServiceProcess, free_port, http_json, modelfence_command

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "compose"
SYSTEMD = DEPLOY / "systemd"
COMPOSE_SCHEMA = Path(__file__).parent / "data" / "deploy" / "compose-spec.json"

# The oldest Kubernetes the manifests promise (the StatefulSet pod-index label is 1.28+;
# 1.30 is the oldest release still maintained) and the newest the package ships.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
TEST_SECRETS = {
    "MODELFENCE_SECRET": "0123456789abcdef0123456789abcdef",
    "MODELFENCE_ADMIN_TOKEN": "fedcba9876543210fedcba9876543210",
    "POSTGRES_PASSWORD": "pgpass0123456789",
    "REDIS_PASSWORD": "redispass0123456789",
}


# -- loading -----------------------------------------------------------------------------


def documents(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def all_resources() -> list[dict[str, Any]]:
    return [d for p in MANIFESTS for d in documents(p)]


def resource(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in all_resources() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


def compose() -> dict[str, Any]:
    with (COMPOSE / "compose.yaml").open(encoding="utf-8") as f:
        return yaml.safe_load(f)  # resolves the << merge keys as Compose does


class MissingVariable(Exception):
    pass


_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\})"
)


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation (``${X}``, ``${X:-d}``, ``${X:?err}``, ``$$``)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(m: re.Match[str]) -> str:
        if m.group("escaped"):
            return "$"
        name, op, arg = m.group("name"), m.group("op"), m.group("arg")
        got = env.get(name)
        if op in (":?", "?") and (got is None or (op == ":?" and got == "")):
            raise MissingVariable(f"{name}: {arg}")
        if op in (":-", "-") and (got is None or (op == ":-" and got == "")):
            return arg
        return got or ""

    return _VARIABLE.sub(substitute, value)


def yaml_config(text: str) -> dict[str, Any]:
    data = yaml.safe_load(text)
    assert isinstance(data, dict)
    return data


def configmap_config() -> dict[str, Any]:
    return yaml_config(resource("ConfigMap", "modelfence-config")["data"]["modelfence.yaml"])


def compose_config() -> dict[str, Any]:
    return yaml_config((COMPOSE / "modelfence.yaml").read_text(encoding="utf-8"))


def filled_secret() -> dict[str, str]:
    """The Secret template with test values in place of its placeholders."""
    keys = resource("Secret", "modelfence")["stringData"]
    values = {
        "secret": TEST_SECRETS["MODELFENCE_SECRET"],
        "admin-token": TEST_SECRETS["MODELFENCE_ADMIN_TOKEN"],
        "postgres-password": TEST_SECRETS["POSTGRES_PASSWORD"],
        "redis-password": TEST_SECRETS["REDIS_PASSWORD"],
        "store-url": f"postgresql://modelfence:{TEST_SECRETS['POSTGRES_PASSWORD']}"
                     "@postgres:5432/modelfence",
        "limits-backend-url": f"redis://:{TEST_SECRETS['REDIS_PASSWORD']}@redis:6379/0",
    }
    assert set(values) == set(keys)
    return values


def container_environ(c: dict[str, Any], secret: dict[str, str]) -> dict[str, str]:
    """The container's environment as Kubernetes builds it (secretKeyRef and plain values)."""
    env: dict[str, str] = {}
    for name, entry in env_of(c).items():
        if "value" in entry:
            env[name] = entry["value"]
        elif "secretKeyRef" in entry.get("valueFrom", {}):
            ref = entry["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "modelfence"
            env[name] = secret[ref["key"]]
    return env


def expand_k8s(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' ``$(VAR)`` expansion in command and args."""
    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env[m.group(1)], a) for a in args]


# -- the real command-line parser --------------------------------------------------------

# Typer vendors Click in recent releases; its usage errors derive from TyperException there.
CLI_ERROR: type[Exception] = getattr(typer, "TyperException", None) or __import__(
    "click").ClickException


def parse_cli(argv: list[str]) -> dict[str, Any]:
    """Parse ``modelfence ARGV`` with the real CLI (types and bounds included), without
    running it; the subcommand comes first, as every command line in deploy/ has it."""
    group = typer.main.get_command(app)
    root = typer.Context(group, info_name="modelfence")
    command = group.get_command(root, argv[0])  # type: ignore[attr-defined]
    if command is None:
        raise typer.BadParameter(f"no such command: {argv[0]}")
    with command.make_context(argv[0], list(argv[1:]), parent=root) as ctx:
        return {"command": argv[0], "config": root.obj, **ctx.params}


def test_the_parser_helper_refuses_what_the_cli_refuses() -> None:
    assert parse_cli(["detect", "--worker", "1", "--workers", "2"])["workers"] == 2
    for bad in (["detetc"], ["serve", "--prot", "1"], ["detect", "--workers", "0"],
                ["detect", "--worker", "x"]):
        with pytest.raises(CLI_ERROR):
            parse_cli(bad)


# -- Kubernetes ----------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kubernetes_manifests_match_the_official_schemas(path: Path, version: str) -> None:
    docs = documents(path)
    assert docs, f"{path.name} holds no resource"
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name}: {doc['kind']} {doc['metadata'].get('name')}: {exc}")


@pytest.mark.parametrize(
    ("breakage", "where"),
    [
        ("a misspelt field", lambda d: d["spec"]["template"]["spec"]["containers"][0].update(
            readinessProbes=d["spec"]["template"]["spec"]["containers"][0]["readinessProbe"])),
        ("a wrong type", lambda d: d["spec"].update(replicas="two")),
        ("a missing required field", lambda d: d["spec"].pop("selector")),
        ("a field at the wrong level", lambda d: d["spec"]["template"]["spec"].update(
            image="modelfence:0.1.0")),
    ],
    ids=["typo", "type", "required", "level"],
)
def test_the_schema_check_catches_a_broken_manifest(breakage: str, where: Any) -> None:
    deployment = copy.deepcopy(resource("Deployment", "modelfence-gateway"))
    where(deployment)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


def test_kustomization_applies_every_manifest_but_the_secret_template() -> None:
    kustomization = yaml_config((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    assert sorted(listed) == sorted(p.name for p in MANIFESTS if p.name != "secret.example.yaml")
    images = {i["name"] for i in kustomization["images"]}
    for workload in ("Deployment", "StatefulSet"):
        for doc in (d for d in all_resources() if d["kind"] == workload):
            image = container(doc)["image"].split(":")[0]
            assert image in images or "/" not in image and image in ("redis", "postgres")


def test_every_namespaced_resource_is_in_the_modelfence_namespace() -> None:
    for doc in all_resources():
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "modelfence", doc["metadata"]["name"]


def test_the_secret_template_holds_no_usable_value() -> None:
    secret = resource("Secret", "modelfence")["stringData"]
    assert set(secret.values()) == {"SET-ME"}
    # A gateway started with the placeholders refuses to, naming the keys.
    with pytest.raises(ConfigError) as caught:
        parse_config(configmap_config(), environ={
            "MODELFENCE_SECRET": secret["secret"], "MODELFENCE_ADMIN_TOKEN": secret["admin-token"],
            "MODELFENCE_STORE": secret["store-url"],
            "MODELFENCE_LIMITS_BACKEND": secret["limits-backend-url"],
        })
    lines = {line.split(":")[0].strip(): line for line in str(caught.value).splitlines()[1:]}
    assert {"secret", "admin_token", "store", "limits.backend"} <= set(lines)
    assert "SET-ME" not in lines["secret"] + lines["admin_token"]  # secrets are never echoed


def k8s_gateway_config() -> Config:
    env = container_environ(container(resource("Deployment", "modelfence-gateway")), filled_secret())
    assert set(env) <= set(ENV_OVERRIDES), "the gateway's env must be ModelFence's own overrides"
    return parse_config(configmap_config(), source="configmap.yaml", environ=env)


def test_the_configmap_config_loads() -> None:
    config = k8s_gateway_config()
    assert config.store.startswith("postgresql://modelfence:")
    assert config.limits.backend.startswith("redis://:")
    assert config.secret and config.admin_token
    assert config.server.host == "0.0.0.0"
    assert config.detection.feed == "redis"
    assert not config.confidential.enabled  # one broker per deployment: not on a scaled Deployment


def test_the_gateway_deployment_probes_and_ports() -> None:
    config = k8s_gateway_config()
    deployment = resource("Deployment", "modelfence-gateway")
    c = container(deployment)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": config.server.port}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert parse_cli(c["args"]) == {"command": "serve", "config": Path(
        "/etc/modelfence/modelfence.yaml"), "host": None, "port": None}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["config"] == "/etc/modelfence"
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == "modelfence-config"
    for part in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][part])
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(config.server.port)
    assert annotations["prometheus.io/path"] == "/metrics"
    service = resource("Service", "modelfence-gateway")
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_selectors_match_their_pods() -> None:
    pods = {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
        for d in all_resources() if d["kind"] in ("Deployment", "StatefulSet")
    }
    for doc in all_resources():
        if doc["kind"] in ("Deployment", "StatefulSet", "PodDisruptionBudget"):
            selector = doc["spec"]["selector"]["matchLabels"]
        elif doc["kind"] == "Service":
            selector = doc["spec"]["selector"]
        else:
            continue
        matched = [n for n, labels in pods.items() if selector.items() <= labels.items()]
        assert len(matched) == 1, f"{doc['kind']} {doc['metadata']['name']} selects {matched}"


def test_the_hpa_scales_the_gateway_on_cpu() -> None:
    hpa = resource("HorizontalPodAutoscaler", "modelfence-gateway")
    deployment = resource("Deployment", "modelfence-gateway")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": deployment["apiVersion"], "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    [metric] = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert "cpu" in container(deployment)["resources"]["requests"]  # utilisation needs it
    assert 1 <= hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"]
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    targets = [d["spec"]["scaleTargetRef"]["name"] for d in all_resources()
               if d["kind"] == "HorizontalPodAutoscaler"]
    assert targets == ["modelfence-gateway"], "detector workers must not autoscale"


def test_detector_workers_cover_every_index_once() -> None:
    statefulset = resource("StatefulSet", "modelfence-detect")
    c = container(statefulset)
    env = env_of(c)
    replicas = statefulset["spec"]["replicas"]
    assert env["MODELFENCE_DETECT_WORKER"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.labels['apps.kubernetes.io/pod-index']")
    assert env["MODELFENCE_DETECT_WORKERS"]["value"] == str(replicas)
    assert statefulset["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    secret = filled_secret()
    config = parse_config(configmap_config(), environ=container_environ(c, secret))
    assert config.detection.partitions >= replicas
    seen = set()
    for ordinal in range(replicas):  # the pod-index label of pod modelfence-detect-ORDINAL
        environ = {**container_environ(c, secret), "MODELFENCE_DETECT_WORKER": str(ordinal)}
        parsed = parse_cli(expand_k8s(c["args"], environ))
        assert parsed["command"] == "detect" and parsed["workers"] == replicas
        seen.add(parsed["worker"])
    assert seen == set(range(replicas))
    worker_env = {"MODELFENCE_DETECT_WORKER", "MODELFENCE_DETECT_WORKERS", CACHE_DIR_ENV}
    assert set(env) - worker_env <= set(ENV_OVERRIDES)
    assert "MODELFENCE_ADMIN_TOKEN" not in env and "MODELFENCE_SECRET" not in env


def test_detector_workers_have_room_to_build_the_int8_embedder() -> None:
    """minilm-int8 is built on first use: ~180 MB of scratch in /tmp and as much in the
    cache while it builds; a pod over an emptyDir's sizeLimit is evicted."""
    statefulset = resource("StatefulSet", "modelfence-detect")
    c = container(statefulset)
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in statefulset["spec"]["template"]["spec"]["volumes"]}
    cache_dir = env_of(c)[CACHE_DIR_ENV]["value"]

    def mebibytes(volume: str) -> int:
        limit: str = volumes[volume]["emptyDir"]["sizeLimit"]
        return int(limit.removesuffix("Gi")) * 1024 if limit.endswith("Gi") else int(
            limit.removesuffix("Mi"))

    assert mebibytes(mounts["/tmp"]) >= 256
    assert mebibytes(mounts[cache_dir]) >= 512


def test_every_secret_reference_names_a_key_of_the_template() -> None:
    keys = set(resource("Secret", "modelfence")["stringData"])
    for doc in all_resources():
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        for entry in env_of(container(doc)).values():
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if ref is not None:
                assert ref["name"] == "modelfence" and ref["key"] in keys
                assert ref.get("optional") is not True  # a missing key stops the pod


def scrape_jobs(prometheus: dict[str, Any]) -> dict[str, dict[str, Any]]:
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    assert sorted(jobs) == ["modelfence-detect", "modelfence-gateway"]
    return jobs


def test_the_prometheus_scrape_job_keeps_annotated_pods() -> None:
    data = yaml_config(resource("ConfigMap", "modelfence-prometheus")["data"]["prometheus.yml"])
    job = scrape_jobs(data)["modelfence-gateway"]
    assert job["kubernetes_sd_configs"][0]["role"] == "pod"
    keep = job["relabel_configs"][0]
    assert keep["action"] == "keep" and keep["regex"] == "true"
    assert keep["source_labels"] == ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"]
    annotations = resource("Deployment", "modelfence-gateway")["spec"]["template"]["metadata"][
        "annotations"]
    assert annotations["prometheus.io/scrape"] == "true"


def test_the_prometheus_scrape_job_reaches_the_detector_workers_metrics_port() -> None:
    data = yaml_config(resource("ConfigMap", "modelfence-prometheus")["data"]["prometheus.yml"])
    keep = scrape_jobs(data)["modelfence-detect"]["relabel_configs"][0]
    assert keep["action"] == "keep"
    assert keep["source_labels"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_name",
                                     "__meta_kubernetes_pod_container_port_name"]
    statefulset = resource("StatefulSet", "modelfence-detect")
    [port] = container(statefulset)["ports"]
    pod_name = statefulset["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
    assert keep["regex"] == f"{pod_name};{port['name']}"
    assert port["containerPort"] == parse_config(configmap_config()).detection.metrics_port
    # Not annotated: the gateway job would scrape the workers' other ports too.
    assert "annotations" not in statefulset["spec"]["template"]["metadata"]


# -- Compose ---------------------------------------------------------------------------------


def compose_schema_errors(data: dict[str, Any]) -> list[str]:
    schema = json.loads(COMPOSE_SCHEMA.read_text(encoding="utf-8"))
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(data)]


def test_compose_matches_the_compose_specification() -> None:
    assert compose_schema_errors(compose()) == []
    assert compose_schema_errors(interpolate(compose(), TEST_SECRETS)) == []


@pytest.mark.parametrize(
    "breakage",
    [
        lambda c: c["services"]["gateway"].update(healthchek=c["services"]["gateway"]["healthcheck"]),
        lambda c: c["services"]["gateway"]["depends_on"]["redis"].update(condition="service_ok"),
        lambda c: c["services"]["gateway"].update(ports="8080:8080"),
    ],
    ids=["typo", "enum", "type"],
)
def test_the_compose_check_catches_a_broken_file(breakage: Any) -> None:
    data = compose()
    breakage(data)
    assert compose_schema_errors(data)


def test_compose_needs_every_secret_and_hard_codes_none() -> None:
    text = (COMPOSE / "compose.yaml").read_text(encoding="utf-8")
    required = set(re.findall(r"\$\{([A-Z_]+):\?", text))
    assert required == set(TEST_SECRETS)
    example = (COMPOSE / "env.example").read_text(encoding="utf-8")
    assert set(re.findall(r"^([A-Z_]+)=$", example, re.MULTILINE)) == required  # all empty there
    for name in required:
        with pytest.raises(MissingVariable, match=name):
            interpolate(compose(), {k: v for k, v in TEST_SECRETS.items() if k != name})
    secretish = re.compile(r"SECRET|TOKEN|PASSWORD|STORE|BACKEND|AUTH")
    for service in compose()["services"].values():
        for key, value in service.get("environment", {}).items():
            if secretish.search(key):
                assert "${" in str(value), f"{key} is hard-coded"


def compose_services() -> dict[str, dict[str, Any]]:
    services = interpolate(compose(), TEST_SECRETS)["services"]
    return {n: s for n, s in services.items() if s.get("image", "").startswith("modelfence")}


def test_the_compose_config_loads_with_the_compose_environment() -> None:
    for name, service in compose_services().items():
        mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
        assert mounts["/etc/modelfence/modelfence.yaml"] == "./modelfence.yaml", name
        assert set(service["environment"]) <= set(ENV_OVERRIDES)
        config = parse_config(compose_config(), source=name, environ=service["environment"])
        assert config.store == (f"postgresql://modelfence:{TEST_SECRETS['POSTGRES_PASSWORD']}"
                                "@postgres:5432/modelfence")
        assert config.limits.backend == f"redis://:{TEST_SECRETS['REDIS_PASSWORD']}@redis:6379/0"
        assert config.detection.feed == "redis" and not config.confidential.enabled
        assert config.secret == TEST_SECRETS["MODELFENCE_SECRET"]


def test_compose_gateway_health_ports_and_dependencies() -> None:
    services = compose_services()
    gateway = services["gateway"]
    config = parse_config(compose_config(), environ=gateway["environment"])
    assert parse_cli(gateway["command"])["command"] == "serve"
    check = gateway["healthcheck"]["test"]
    assert f"http://127.0.0.1:{config.server.port}/healthz" in " ".join(check)
    assert gateway["deploy"]["replicas"] >= 2
    host_ports = re.fullmatch(r"127\.0\.0\.1:(\d+)-(\d+):(\d+)", gateway["ports"][0])
    assert host_ports, gateway["ports"]
    first, last, inside = map(int, host_ports.groups())
    assert inside == config.server.port
    assert last - first + 1 == gateway["deploy"]["replicas"]  # one host port per replica
    everything = interpolate(compose(), TEST_SECRETS)["services"]
    for name, service in services.items():
        assert service["depends_on"] == {"redis": {"condition": "service_healthy"},
                                         "postgres": {"condition": "service_healthy"}}, name
        assert service["read_only"] is True
    for name in ("redis", "postgres"):
        assert "healthcheck" in everything[name]
    prometheus = yaml_config((COMPOSE / "prometheus.yml").read_text(encoding="utf-8"))
    job = scrape_jobs(prometheus)["modelfence-gateway"]
    assert job["metrics_path"] == "/metrics"
    assert job["dns_sd_configs"][0] == {"names": ["gateway"], "type": "A",
                                        "port": config.server.port, "refresh_interval": "30s"}
    assert everything["prometheus"]["depends_on"]["gateway"]["condition"] == "service_healthy"


def test_compose_detector_workers_cover_every_index_once() -> None:
    workers = [parse_cli(s["command"]) for s in compose_services().values()
               if s["command"][0] == "detect"]
    assert len(workers) >= 2
    assert sorted(w["worker"] for w in workers) == list(range(len(workers)))
    assert {w["workers"] for w in workers} == {len(workers)}
    assert parse_config(compose_config()).detection.partitions >= len(workers)
    # Prometheus scrapes every worker, on its metrics port.
    port = parse_config(compose_config()).detection.metrics_port
    prometheus = yaml_config((COMPOSE / "prometheus.yml").read_text(encoding="utf-8"))
    [targets] = scrape_jobs(prometheus)["modelfence-detect"]["static_configs"]
    names = [name for name, s in compose_services().items() if s["command"][0] == "detect"]
    assert sorted(targets["targets"]) == sorted(f"{name}:{port}" for name in names)


def test_the_dockerfile_installs_the_package_and_runs_unprivileged() -> None:
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11-slim$", text, re.MULTILINE)
    assert 'pip install ".${EXTRAS}"' in text
    assert re.search(r"^USER 10001", text, re.MULTILINE)
    for source in re.findall(r"^COPY (.+) \S+$", text, re.MULTILINE):
        for path in source.split():
            assert (ROOT / path).exists(), path
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (.+)$", text, re.MULTILINE).group(1))
    command = json.loads(re.search(r"^CMD (.+)$", text, re.MULTILINE).group(1))
    assert entrypoint == ["modelfence"]
    assert parse_cli(command)["config"] == Path("/etc/modelfence/modelfence.yaml")
    # Kubernetes and Compose give only arguments: the image's entrypoint runs them.
    for doc in all_resources():
        if doc["kind"] in ("Deployment", "StatefulSet") and doc["metadata"]["name"].startswith(
                "modelfence"):
            assert "command" not in container(doc)
    ignore = [line for line in (DEPLOY / "Dockerfile.dockerignore").read_text(
        encoding="utf-8").splitlines() if line and not line.startswith("#")]
    assert ignore[0] == "*" and "!src/" in ignore


# -- systemd ---------------------------------------------------------------------------------

UNITS = sorted(SYSTEMD.glob("*.service"))


def unit(path: Path) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path, encoding="utf-8")
    return parser


def exec_start(path: Path, instance: str = "0") -> list[str]:
    parsed = unit(path)
    env = dict(e.split("=", 1) for e in parsed["Service"].get("Environment", "").split() if e)
    line = parsed["Service"]["ExecStart"].replace("%i", instance)
    line = re.sub(r"\$\{([A-Z_]+)\}", lambda m: env[m.group(1)], line)
    return shlex.split(line)


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_systemd_units_are_hardened(path: Path) -> None:
    service = unit(path)["Service"]
    required = {
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes",
        "DynamicUser": "yes", "StateDirectory": "modelfence", "Restart": "on-failure",
        "EnvironmentFile": "/etc/modelfence/modelfence.env", "ProtectHome": "yes",
    }
    assert {k: service.get(k) for k in required} == required
    assert service["CapabilityBoundingSet"] == ""
    assert unit(path)["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_command_lines_are_real_commands() -> None:
    gateway = exec_start(SYSTEMD / "modelfence.service")
    assert gateway[0] == "/opt/modelfence/bin/modelfence"
    assert parse_cli(gateway[1:]) == {"command": "serve", "config": Path(
        "/etc/modelfence/modelfence.yaml"), "host": None, "port": None}
    template = SYSTEMD / "modelfence-detect@.service"
    workers = int(dict(e.split("=", 1) for e in unit(template)["Service"]["Environment"].split())[
        "MODELFENCE_DETECT_WORKERS"])
    for index in range(workers):
        parsed = parse_cli(exec_start(template, str(index))[1:])
        assert (parsed["command"], parsed["worker"], parsed["workers"]) == ("detect", index, workers)
    assert parse_config(compose_config()).detection.partitions >= workers


@pytest.fixture
def units_for_verify(tmp_path: Path) -> Iterator[list[Path]]:
    """The units with ExecStart pointing at this installation's `modelfence` (verify checks
    that the binary exists), the template as its instance 0."""
    binary = Path(sys.executable).with_name("modelfence")
    assert binary.exists(), binary
    paths = []
    for path in UNITS:
        name = path.name.replace("@.", "@0.")
        text = path.read_text(encoding="utf-8").replace("/opt/modelfence/bin/modelfence", str(binary))
        paths.append(tmp_path / name)
        paths[-1].write_text(text, encoding="utf-8")
    yield paths


def systemd_verify(paths: list[Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "--man=no", "verify", *map(str, paths)],
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed;"
                    " the INI checks above still run")
def test_systemd_analyze_verifies_the_units(units_for_verify: list[Path]) -> None:
    result = systemd_verify(units_for_verify)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Unknown" not in output and "ignoring" not in output, output
    # and it does notice a misspelt directive
    broken = units_for_verify[0]
    broken.write_text(broken.read_text(encoding="utf-8").replace(
        "ProtectSystem=", "ProtectSytem="), encoding="utf-8")
    result = systemd_verify([broken])
    assert "Unknown key" in result.stdout + result.stderr


# -- the Kubernetes config, run -------------------------------------------------------------


@pytest.mark.redis
@pytest.mark.postgres
def test_the_configmap_config_serves_the_probe_paths_and_feeds_a_worker(
    tmp_path: Path, fake_upstream: ServiceProcess, postgres_url: str
) -> None:
    """The gateway Deployment's and detector StatefulSet's own arguments, config and
    environment on real Redis and PostgreSQL (hosts and upstream pointed at this machine)."""
    from redis import Redis

    from modelfence.detect.feeds import GROUP, STREAM_PREFIX, worker_partitions

    from .services import private_redis

    data = configmap_config()
    data["upstreams"][0]["url"] = fake_upstream.url
    metrics_port = free_port()  # the manifests' 9465 may be taken on this machine
    data["detection"].update(metrics_port=metrics_port, metrics_host="127.0.0.1")
    config_path = tmp_path / "modelfence.yaml"
    config_path.write_text(yaml.safe_dump(data), encoding="utf-8")
    secret = filled_secret()
    with private_redis() as (redis_url, _proc):
        secret.update({"store-url": postgres_url, "limits-backend-url": redis_url})
        deployment_container = container(resource("Deployment", "modelfence-gateway"))
        port = free_port()
        args = [a if a != "/etc/modelfence/modelfence.yaml" else str(config_path)
                for a in deployment_container["args"]]
        gateway = ServiceProcess(
            modelfence_command(*args, "--host", "127.0.0.1", "--port", str(port)),
            port=port, env=container_environ(deployment_container, secret),
            log_file=tmp_path / "gateway.log",
        )
        statefulset = resource("StatefulSet", "modelfence-detect")
        detect_container = container(statefulset)
        environ = {**container_environ(detect_container, secret), "MODELFENCE_DETECT_WORKER": "1"}
        worker_args = [a if a != "/etc/modelfence/modelfence.yaml" else str(config_path)
                       for a in expand_k8s(detect_container["args"], environ)]
        log = (tmp_path / "detect.log").open("wb")
        worker = subprocess.Popen([sys.executable, "-m", "modelfence", *worker_args],
                                  env={**gateway.env, **environ}, stdout=log,
                                  stderr=subprocess.STDOUT)
        redis = Redis.from_url(redis_url)
        try:
            with gateway:
                for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                    status, body = http_json("GET", gateway.url + deployment_container[probe][
                        "httpGet"]["path"])
                    assert status == 200, (probe, body)
                status, body = http_json("GET", gateway.url + "/readyz")
                assert body["status"] == "ready", body
                status, metrics = http_json("GET", gateway.url + "/metrics")
                assert status == 200 and "modelfence_requests_total" in metrics
                # Worker 1 of 2 has made its consumer group on exactly its partitions.
                partitions = worker_partitions(1, statefulset["spec"]["replicas"],
                                               data["detection"]["partitions"])
                deadline = time.monotonic() + 60
                ready: list[int] = []
                while time.monotonic() < deadline and worker.poll() is None:
                    ready = [p for p in partitions if redis.exists(f"{STREAM_PREFIX}{p}")
                             and any(g["name"].decode() == GROUP
                                     for g in redis.xinfo_groups(f"{STREAM_PREFIX}{p}"))]
                    if ready == partitions:
                        break
                    time.sleep(0.2)
                assert worker.poll() is None, (tmp_path / "detect.log").read_text()
                assert ready == partitions
                others = [p for p in range(data["detection"]["partitions"]) if p not in partitions]
                assert not any(redis.exists(f"{STREAM_PREFIX}{p}") for p in others)
                status, metrics = http_json("GET", f"http://127.0.0.1:{metrics_port}/metrics")
                assert status == 200 and "modelfence_detector_lag_seconds_count 0.0" in metrics
        finally:
            worker.terminate()
            try:
                worker.wait(timeout=15)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(timeout=15)
            log.close()
            redis.close()
