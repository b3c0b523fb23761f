"""The deployment files (Dockerfile, docker-compose.yml, k8s/) checked offline against the code
they deploy: there is no Docker engine and no Kubernetes API here.

The truth comes from the code: the CLI's parser, services.config, the metric and queue names.
The compose file is read through the real `docker-compose config` and the manifests through
`kubectl kustomize` (both fetched by tools/install-deploy-tools in `make test-tools`), then checked
against the Kubernetes schemas (kubernetes-validate) and KEDA's CRD schema (keda-crd-schemas.yaml).
The last test starts the services as the compose file describes them, on loopback.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from unittest.mock import MagicMock

import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml

from services.cli import build_parser
from services.config import DEFAULT_METRICS_PORTS, DEFAULT_PORTS, ENVIRONMENT, Settings
from services.processes import free_port
from services.stage_calls import IN_FLIGHT
from services.batches.namespace import queue_key

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent
K8S = ROOT / "k8s"
KUBERNETES_VERSION = "1.35"  # the kubectl that renders the manifests
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
STAGES = ("vision", "pruner", "generator")
SERVICES = (*STAGES, "gateway", "worker")
KUSTOMIZATIONS = sorted(p.parent.relative_to(ROOT).as_posix() for p in K8S.rglob("kustomization.yaml"))
# What KEDA's redis (lists) scaler reads; anything else in its metadata is a typo.
REDIS_SCALER_KEYS = {
    "address", "addressFromEnv", "host", "hostFromEnv", "port", "portFromEnv", "usernameFromEnv", "passwordFromEnv",
    "listName", "listLength", "activationListLength", "databaseIndex", "enableTLS", "unsafeSsl",
}


def tool(name: str) -> Path:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{path} is missing: `make test-tools` fetches it (tools/install-deploy-tools)")
    return path


def parse_cli(argv: list[str]):
    """The argparse namespace of a `dartserve ...` command line; fails the test if it is not one."""
    assert argv[0] == "dartserve", argv
    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"not a dartserve command: {argv}")


# --- Dockerfile and .dockerignore ------------------------------------------------------------


@functools.cache
def dockerfile() -> dict:
    """Stages of the Dockerfile: name -> {"from": base, "lines": [(instruction, argument)]}."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages, current = {}, None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, argument = line.partition(" ")
        if instruction.upper() == "FROM":
            words = argument.split()
            current = {"from": words[0], "lines": []}
            stages[words[2] if len(words) > 2 else str(len(stages))] = current
        elif current is not None:
            current["lines"].append((instruction.upper(), argument.strip()))
    return stages


def image_lines(instruction: str) -> list[str]:
    """The arguments of an instruction in the final image: its stage and the stages it is built on."""
    stages = dockerfile()
    name, found = list(stages)[-1], []
    while name in stages:
        found = [a for i, a in stages[name]["lines"] if i == instruction] + found
        name = stages[name]["from"]
    return found


def image_env() -> dict:
    env = {}
    for argument in image_lines("ENV"):
        env |= dict(word.split("=", 1) for word in shlex.split(argument))
    return env


def entrypoint() -> list[str]:
    return json.loads(image_lines("ENTRYPOINT")[-1])


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _pattern(pattern: str) -> re.Pattern:
    rx = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
    return re.compile(rx)


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    result = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        if any(_pattern(pattern.lstrip("!")).fullmatch(p) for p in prefixes):
            result = not negated
    return result


def build_context() -> dict[str, int]:
    """Files Docker sends as the build context from this work tree, with their sizes."""
    patterns = dockerignore_patterns()
    negations = [p[1:] for p in patterns if p.startswith("!")]
    files = {}
    for folder, dirs, names in os.walk(ROOT):
        relative = Path(folder).relative_to(ROOT).as_posix()
        relative = "" if relative == "." else relative + "/"
        # Skip whole ignored folders (.git, .venv) that no exception reaches into.
        dirs[:] = [d for d in dirs if not (ignored(relative + d, patterns) and not any(n.startswith(relative + d) for n in negations))]
        for name in names:
            if not ignored(relative + name, patterns):
                files[relative + name] = (Path(folder) / name).stat().st_size
    return files


def test_dockerfile_runs_dartserve_as_a_non_root_user_with_a_health_check():
    assert entrypoint() == ["dartserve"]
    command = entrypoint() + json.loads(image_lines("CMD")[-1])
    assert parse_cli(command).command == "serve"
    user = image_lines("USER")[-1].split(":")
    assert all(part.isdigit() and int(part) != 0 for part in user), "numeric, so that runAsNonRoot can check it"
    health = image_lines("HEALTHCHECK")[-1]
    probe = json.loads(health[health.index("CMD ") + 4:])
    assert parse_cli(probe).command == "probe" and probe[2] == command[1], "the check probes the default command's service"
    exposed = {int(p) for line in image_lines("EXPOSE") for p in line.split()}
    assert exposed == set(DEFAULT_PORTS.values()) | set(DEFAULT_METRICS_PORTS.values())
    env = image_env()
    assert {k for k in env if k.startswith("DARTSERVE_")} <= set(ENVIRONMENT)
    assert Settings.from_env({k: v for k, v in env.items() if k.startswith("DARTSERVE_")}).host == "0.0.0.0"
    volume = image_lines("VOLUME")[-1]
    assert (json.loads(volume) if volume.startswith("[") else volume.split()) == [env["HF_HOME"]], "the model cache is a volume"


def test_dockerfile_has_a_cpu_and_a_cuda_variant_with_torch_pinned():
    stages = dockerfile()
    build = next(s for s in stages.values() if "${VARIANT}" in s["from"])
    for variant in ("cpu", "cuda"):
        stage = stages[build["from"].replace("${VARIANT}", variant)]
        args = {a.split("=", 1)[0]: a.split("=", 1)[1] for i, a in stage["lines"] if i == "ARG"}
        installs = " ".join(a for i, a in stage["lines"] if i == "RUN")
        assert "-c /src/constraints.txt" in installs and "torch==2.13.0" in installs and "--index-url ${TORCH_INDEX_URL}" in installs
        assert args["TORCH_INDEX_URL"].endswith("/cpu") == (variant == "cpu")
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text().split()


def test_build_context_is_the_package_without_model_weights():
    context = build_context()
    for stage in dockerfile().values():
        for instruction, argument in stage["lines"]:
            if instruction == "COPY" and not argument.startswith("--from"):
                for source in argument.split()[:-1]:
                    assert any(f == source or f.startswith(source + "/") for f in context), f"COPY {source}: not in the build context"
    assert all(f.split("/")[0] in ("dartserve", "services", "pyproject.toml", "README.md", "constraints.txt") for f in context), sorted(context)
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in context)
    weights = [f for f in context if f.endswith((".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt"))]
    assert weights == ["dartserve/demo/checkpoint/model.safetensors"], "only the bundled demo model goes into the image"
    assert sum(context.values()) < 20 * 2**20


def test_dockerignore_matcher_follows_docker_rules():
    patterns = ["*", "!dartserve", "**/__pycache__"]
    assert ignored(".venv/bin/python", patterns) and ignored("notes.txt", patterns)
    assert not ignored("dartserve/engine/core.py", patterns)
    assert ignored("dartserve/demo/__pycache__/x.pyc", patterns)


# --- docker-compose.yml ---------------------------------------------------------------------


@functools.cache
def compose(*profiles: str) -> dict:
    """The compose model as Docker Compose resolves it, with no settings in the environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DARTSERVE_", "COMPOSE_"))}
    flags = [f for p in profiles for f in ("--profile", p)]
    result = subprocess.run(
        [tool("docker-compose"), "-f", ROOT / "docker-compose.yml", *flags, "config", "--format", "json"],
        env=env, capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def dartserve_services(config: dict) -> dict:
    return {name: s for name, s in config["services"].items() if s["image"].startswith("dartserve:")}


def command_of(service: dict) -> list[str]:
    """The command line a compose service runs (ours through the image's ENTRYPOINT)."""
    image_entrypoint = entrypoint() if service["image"].startswith("dartserve:") else []
    return (service.get("entrypoint") or image_entrypoint) + service["command"]


def settings_of(env: dict) -> Settings:
    """The settings of an environment, less the stage token: its file is on a volume a job fills."""
    return Settings.from_env({k: v for k, v in env.items() if k.startswith("DARTSERVE_") and k != "DARTSERVE_STAGE_TOKEN_FILE"})


def listening(name: str, service: dict) -> dict[str, int]:
    """Ports a compose service listens on, by what they are."""
    argv = command_of(service)
    if argv[0] == "redis-server":
        return {"redis": int(argv[argv.index("--port") + 1]) if "--port" in argv else 6379}
    if not service["image"].startswith("dartserve:"):  # a job, such as the one that makes the stage token
        return {}
    what = parse_cli(argv).command
    settings = settings_of(image_env() | service["environment"])
    if what in ("gateway", "serve"):
        return {"http": settings.port_for("gateway")}
    if what in STAGES:
        return {"grpc": settings.port_for(what), "metrics": settings.metrics_port_for(what)}
    return {}


def test_compose_runs_each_service_with_a_dartserve_command_and_its_own_health_check():
    for profiles in ((), ("gpu",)):
        services = dartserve_services(compose(*profiles))
        seen = set()
        for name, service in services.items():
            what = parse_cli(command_of(service)).command
            assert name.removesuffix("-gpu") == what
            seen.add(what)
            test = service["healthcheck"]["test"]
            assert test[0] == "CMD" and parse_cli(test[1:]).command == "probe" and test[3] == what
        assert seen == set(SERVICES)
    redis = compose()["services"]["redis"]
    assert redis["command"][0] == "redis-server" and "redis-cli" in redis["healthcheck"]["test"]
    assert redis["read_only"] is True and redis["tmpfs"] == ["/data"]  # its working directory, which it writes nothing to


def test_compose_environment_holds_only_settings_the_services_read():
    for profiles in ((), ("gpu",)):
        for service in dartserve_services(compose(*profiles)).values():
            env = service["environment"]
            assert {k for k in env if k.startswith("DARTSERVE_")} <= set(ENVIRONMENT)
            settings_of(image_env() | env)  # raises on a bad value
            # Every service loads the model, or its processor and configuration (gateway, worker).
            assert any(v["type"] == "volume" and v["target"] == env["HF_HOME"] for v in service["volumes"])


def test_compose_publishes_only_the_gateway_and_addresses_reach_the_right_ports():
    for profiles in ((), ("gpu",)):
        config = compose(*profiles)
        services = config["services"]
        published = {name: s["ports"] for name, s in services.items() if s.get("ports")}
        assert list(published) == ["gateway"]
        (port,) = published["gateway"]
        assert int(port["published"]) == 8000 and port["target"] == listening("gateway", services["gateway"])["http"]
        # host:port -> (service, what listens there), for every name a service answers to
        names = {}
        for name, service in services.items():
            aliases = [name] + [a for n in (service.get("networks") or {}).values() for a in (n or {}).get("aliases", [])]
            for alias in aliases:
                for what, number in listening(name, service).items():
                    names.setdefault((alias, number), set()).add((name, what))
        for name, service in dartserve_services(config).items():
            settings = settings_of(image_env() | service["environment"])
            for stage in STAGES:
                host, _, number = getattr(settings, f"{stage}_addr").rpartition(":")
                targets = names.get((host, int(number)), set())
                assert targets and all(parse_cli(command_of(services[t])).command == stage and what == "grpc" for t, what in targets), (name, stage)
            for url, redis in ((settings.redis_url, "redis"), (settings.batch_redis, "redis-batches")):
                address = httpx.URL(url)
                assert names.get((address.host, address.port)) == {(redis, "redis")}, (name, url)


def test_compose_starts_services_after_their_dependencies_are_healthy():
    for profiles in ((), ("gpu",)):
        services = compose(*profiles)["services"]
        for name, service in services.items():
            for dependency, rule in service.get("depends_on", {}).items():
                if dependency == "stage-token":  # a job: it runs once, to its end
                    assert rule["condition"] == "service_completed_successfully" and "healthcheck" not in services[dependency]
                    continue
                assert rule["condition"] == "service_healthy"
                if dependency in services:
                    assert "healthcheck" in services[dependency]
                else:  # a GPU twin, outside the active profiles
                    assert rule["required"] is False
        for name, service in dartserve_services({"services": services}).items():
            needs = {"redis", "stage-token"} if name.removesuffix("-gpu") in STAGES else {"redis", "redis-batches", "stage-token", *STAGES}
            stages_used = {d for d in service["depends_on"] if d in services}
            assert {d.removesuffix("-gpu") for d in stages_used} == needs


def redis_config(argv: list[str]) -> dict[str, str]:
    """A redis-server command line's settings (``--name value`` pairs)."""
    return {argv[i][2:]: argv[i + 1] for i in range(1, len(argv) - 1) if argv[i].startswith("--")}


def test_compose_stage_token_is_generated_and_batches_go_to_a_redis_that_keeps_them():
    for profiles in ((), ("gpu",)):
        services = compose(*profiles)["services"]
        job = services["stage-token"]
        (volume,) = job["volumes"]
        assert volume["type"] == "volume" and job["command"][:2] == ["sh", "-c"] and "/dev/urandom" in job["command"][2]
        for name, service in dartserve_services({"services": services}).items():
            settings = settings_of(image_env() | service["environment"])
            path = service["environment"]["DARTSERVE_STAGE_TOKEN_FILE"]
            # The token is read from the job's volume, mounted read-only, never set in the file.
            (mount,) = [v for v in service["volumes"] if v.get("source") == volume["source"]]
            assert path.startswith(mount["target"] + "/") and mount["read_only"] is True, name
            assert settings.batch_redis != settings.redis_url
        cache, batches = redis_config(services["redis"]["command"]), redis_config(services["redis-batches"]["command"])
        assert cache["maxmemory-policy"] == "volatile-ttl" and cache["appendonly"] == "no"
        assert batches["maxmemory-policy"] == "noeviction" and batches["appendonly"] == "yes" and batches["appendfsync"] == "everysec"
        (data,) = services["redis-batches"]["volumes"]  # the append-only file outlives the container
        assert data["type"] == "volume" and data["target"] == "/data"


def test_compose_gpu_profile_puts_pruner_and_generator_on_nvidia_gpus():
    cpu, gpu = compose()["services"], compose("gpu")["services"]
    added = set(gpu) - set(cpu)
    assert added == {"pruner-gpu", "generator-gpu"}
    for name in added:
        service = gpu[name]
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
        assert settings_of(service["environment"]).device == "cuda"
        assert service["image"] == f"dartserve:{VERSION}-cuda" and service["build"]["args"]["VARIANT"] == "cuda"
        # It takes over the CPU twin's name, which is scaled to zero with the profile.
        assert service["networks"]["default"]["aliases"] == [name.removesuffix("-gpu")]
    for name, service in dartserve_services({"services": cpu}).items():
        assert "deploy" not in service and settings_of(service["environment"]).device == "cpu"
        assert service["image"] == f"dartserve:{VERSION}" and service["build"]["args"]["VARIANT"] == "cpu"
        assert service["read_only"] is True and service["tmpfs"] == ["/tmp"]


# --- Kubernetes ------------------------------------------------------------------------------


@functools.cache
def rendered(directory: str) -> tuple[dict, ...]:
    result = subprocess.run([tool("kubectl"), "kustomize", ROOT / directory], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


@functools.cache
def keda_schemas() -> dict:
    return yaml.safe_load((ROOT / "tests" / "keda-crd-schemas.yaml").read_text())


def validate(doc: dict) -> None:
    if doc["apiVersion"].startswith("keda.sh/"):
        schemas = keda_schemas()
        jsonschema.validate(doc, {**schemas[doc["kind"]], "definitions": schemas["definitions"]})
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def kustomization_files() -> dict[str, set[Path]]:
    """Files the kustomizations name, by role: resources, patches, generator inputs, configurations."""
    roles = {"resources": set(), "patches": set(), "inputs": set(), "configurations": set()}
    for directory in KUSTOMIZATIONS:
        k = yaml.safe_load((ROOT / directory / "kustomization.yaml").read_text())
        for entry in k.get("resources", []):
            if (ROOT / directory / entry).is_file():
                roles["resources"].add((ROOT / directory / entry).resolve())
        roles["patches"] |= {(ROOT / directory / p["path"]).resolve() for p in k.get("patches", []) if "path" in p}
        roles["configurations"] |= {(ROOT / directory / c).resolve() for c in k.get("configurations", [])}
        for generator in k.get("configMapGenerator", []) + k.get("secretGenerator", []):
            for entry in generator.get("envs", []) + generator.get("files", []):
                roles["inputs"].add((ROOT / directory / entry.split("=")[-1]).resolve())
    return roles


def test_every_manifest_validates_against_the_kubernetes_schemas():
    roles = kustomization_files()
    accounted = set().union(*roles.values()) | {p.resolve() for p in K8S.rglob("kustomization.yaml")}
    accounted |= {(K8S / "monitoring" / "prometheus-adapter-values.yaml").resolve()}
    assert {p.resolve() for p in K8S.rglob("*") if p.is_file()} == accounted, "a file under k8s/ no kustomization uses"
    for path in sorted(roles["resources"]):
        for doc in yaml.safe_load_all(path.read_text()):
            validate(doc)


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_kustomize_build_validates(directory):
    docs = rendered(directory)
    for doc in docs:
        validate(doc)
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "dartserve", doc["metadata"]["name"]
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names))


def test_validators_reject_mistakes():
    """The checks above would catch a misspelt field or a wrongly typed value."""
    docs = rendered("k8s/overlays/cpu")
    deployment = json.loads(json.dumps(next(d for d in docs if d["kind"] == "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerport"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    scaled = next(d for d in docs if d["kind"] == "ScaledObject")
    for broken in ({"minReplicas": 1}, {"triggers": [{"type": "redis", "metadata": {"databaseIndex": 0}}]}):
        with pytest.raises(jsonschema.ValidationError):
            validate({**scaled, "spec": {**scaled["spec"], **broken}})


def by_kind(docs, kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def containers(docs):
    """(workload, pod template, container) for every container of a Deployment or StatefulSet."""
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            for container in doc["spec"]["template"]["spec"]["containers"]:
                yield doc, doc["spec"]["template"], container


def container_env(docs, container) -> dict[str, str]:
    """The environment a container starts with: envFrom ConfigMaps, then env (Secrets decoded)."""
    maps, secrets = by_kind(docs, "ConfigMap"), by_kind(docs, "Secret")
    env = {}
    for source in container.get("envFrom", []):
        env |= maps[source["configMapRef"]["name"]]["data"]
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = base64.b64decode(secrets[ref["name"]]["data"][ref["key"]]).decode()
    return env


def mounted_file(docs, template, container, path: str) -> str:
    """The content of a file a container reads from a mounted Secret."""
    volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        if path.startswith(mount["mountPath"] + "/"):
            secret = by_kind(docs, "Secret")[volumes[mount["name"]]["secret"]["secretName"]]
            return base64.b64decode(secret["data"][path.removeprefix(mount["mountPath"] + "/")]).decode()
    pytest.fail(f"{path} is not on a mounted Secret")


def dartserve_containers(docs):
    for workload, template, container in containers(docs):
        if container["image"].startswith("dartserve"):
            yield workload, template, container


# Secret files a pod reads, and what an operator puts in place of the placeholder shipped in each.
OPERATOR_SECRETS = {"DARTSERVE_API_KEYS_FILE": "a-real-key-from-the-operator\n", "DARTSERVE_STAGE_TOKEN_FILE": "a-token-the-operator-generated\n"}


def settings_in_pod(docs, template, container, tmp_path) -> Settings:
    env = {k: v for k, v in container_env(docs, container).items() if k.startswith("DARTSERVE_")}
    assert set(env) <= set(ENVIRONMENT)
    files = {name: tmp_path / name for name in OPERATOR_SECRETS if name in env}
    shipped = {name: mounted_file(docs, template, container, env[name]) for name in files}
    env |= {name: str(path) for name, path in files.items()}
    for placeholder in files:  # each shipped placeholder stops a service, the others replaced or not
        for name, path in files.items():
            path.write_text(shipped[name] if name == placeholder else OPERATOR_SECRETS[name])
        with pytest.raises(ValueError, match="placeholder"):
            Settings.from_env(env)
    for name, path in files.items():
        path.write_text(OPERATOR_SECRETS[name])
    return Settings.from_env(env)


def gateway_routes() -> set[str]:
    from services.gateway.app import create_app

    return {route.path for route in create_app(MagicMock(batches=None)).routes}


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_k8s_commands_settings_ports_and_probes_match_the_services(directory, tmp_path):
    docs = rendered(directory)
    services = by_kind(docs, "Service")
    seen = set()
    for workload, template, container in dartserve_containers(docs):
        argv = container.get("command") or entrypoint()
        argv = argv + container.get("args", [])
        what = parse_cli(argv).command
        assert workload["metadata"]["name"] == what == container["name"]
        seen.add(what)
        settings = settings_in_pod(docs, template, container, tmp_path)
        assert settings.host == "0.0.0.0"
        # Every service loads the model, or its processor and configuration: HF_HOME is writable.
        assert container_env(docs, container)["HF_HOME"] in {m["mountPath"] for m in container["volumeMounts"]}
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        probes = [container[p] for p in ("startupProbe", "readinessProbe", "livenessProbe") if p in container]
        if what in STAGES:
            assert ports == {"grpc": settings.port_for(what), "metrics": settings.metrics_port_for(what)}
            assert template["metadata"]["annotations"]["prometheus.io/port"] == str(ports["metrics"])
            # Alive is the port open, so a stage busy past its limit is not restarted for it.
            assert [p.get("grpc", p.get("tcpSocket"))["port"] for p in probes] == [ports["grpc"]] * 3
            # On SIGTERM a stage drains, then lets its calls run to their deadline before it is killed.
            assert template["spec"]["terminationGracePeriodSeconds"] > settings.drain_s + settings.rpc_timeout_s
            assert "grpc" in container["readinessProbe"] and "tcpSocket" in container["livenessProbe"]
        elif what == "gateway":
            assert ports == {"http": settings.port_for("gateway")} and settings.api_keys
            assert template["metadata"]["annotations"]["prometheus.io/port"] == str(ports["http"])
            paths = {p["httpGet"]["path"] for p in probes}
            assert paths == {"/healthz", "/readyz"} and paths <= gateway_routes() and paths <= set(settings.open_paths)
            assert all(p["httpGet"]["port"] in ports for p in probes)
        else:
            assert not ports and {"readinessProbe", "livenessProbe"} <= set(container)
            for probe in probes:
                assert parse_cli(probe["exec"]["command"]).command == "probe" and probe["exec"]["command"][2] == what
        # Every address a container calls is a Service that routes to the service it expects.
        for stage in STAGES:
            host, _, number = getattr(settings, f"{stage}_addr").rpartition(":")
            assert service_target(docs, services[host], int(number)) == (stage, "grpc")
        # Stages authenticate their callers; the gateway and workers keep batches in their own Redis.
        assert settings.stage_token
        redis_urls = {"redis": settings.redis_url} | ({"redis-batches": settings.batch_redis_url} if what in ("gateway", "worker") else {})
        for name, url in redis_urls.items():
            redis = httpx.URL(url)
            if redis.host in services:
                assert service_target(docs, services[redis.host], redis.port) == (name, "redis")
            else:  # a managed Redis, outside the cluster
                assert "." in redis.host and name not in by_kind(docs, "StatefulSet")
    assert seen == set(SERVICES)


def selects(selector: dict, labels: dict) -> bool:
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for e in selector.get("matchExpressions", []):
        ok = {"In": lambda: labels.get(e["key"]) in e["values"], "NotIn": lambda: labels.get(e["key"]) not in e["values"],
              "Exists": lambda: e["key"] in labels, "DoesNotExist": lambda: e["key"] not in labels}[e["operator"]]()
        if not ok:
            return False
    return True


def pods(docs, selector: dict) -> list[tuple[dict, dict]]:
    return [(w, t) for w in docs if w["kind"] in ("Deployment", "StatefulSet") for t in [w["spec"]["template"]] if selects({"matchLabels": selector}, t["metadata"]["labels"])]


def service_target(docs, service: dict, port: int) -> tuple[str, str]:
    """(workload, container port name) that a Service's port leads to."""
    (entry,) = [p for p in service["spec"]["ports"] if p["port"] == port]
    ((workload, template),) = pods(docs, service["spec"]["selector"])
    (name,) = [p["name"] for c in template["spec"]["containers"] for p in c.get("ports", []) if entry["targetPort"] in (p["name"], p["containerPort"])]
    return workload["metadata"]["name"], name


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_k8s_images_labels_and_selectors_agree(directory):
    docs = rendered(directory)
    gpu = {"k8s/overlays/gpu", "k8s/examples/llava-1.5-7b"}
    tag = f"dartserve:{VERSION}-cuda" if directory in gpu else f"dartserve:{VERSION}"
    assert {c["image"] for _, _, c in dartserve_containers(docs)} == {tag}
    for doc in docs:
        if doc["kind"] not in ("Namespace", "ConfigMap", "Secret", "NetworkPolicy"):
            assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "dartserve", doc["metadata"]["name"]
    for workload in (d for d in docs if d["kind"] in ("Deployment", "StatefulSet")):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/component"] == workload["metadata"]["name"]
        assert selects(workload["spec"]["selector"], labels)
    for service in by_kind(docs, "Service").values():
        assert len(pods(docs, service["spec"]["selector"])) == 1, service["metadata"]["name"]
    for pdb in by_kind(docs, "PodDisruptionBudget").values():
        assert len([w for w in docs if w["kind"] in ("Deployment", "StatefulSet") and selects(pdb["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])]) == 1
    deployments = by_kind(docs, "Deployment")
    assert set(by_kind(docs, "PodDisruptionBudget")) == set(deployments)
    assert all("replicas" not in d["spec"] for d in deployments.values()), "replicas belong to the autoscalers"


WAITING = "dartserve:num_requests_waiting"  # the engine cores' queue, as vLLM names it
SCALED_ON = {"vision": IN_FLIGHT, "pruner": WAITING, "generator": WAITING}


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_autoscalers_read_metrics_the_services_export(directory):
    docs = rendered(directory)
    deployments = by_kind(docs, "Deployment")
    hpas = by_kind(docs, "HorizontalPodAutoscaler")
    scaled_objects = by_kind(docs, "ScaledObject")
    assert set(hpas) | set(scaled_objects) == {"gateway", *STAGES, "worker"} and not set(hpas) & set(scaled_objects)
    adapter = yaml.safe_load((K8S / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    served = {rule["name"]["as"]: rule for rule in adapter["rules"]["custom"]}  # what the adapter gives the HPAs
    for name, hpa in hpas.items():
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        (metric,) = hpa["spec"]["metrics"]
        container = deployments[name]["spec"]["template"]["spec"]["containers"][0]
        if name == "gateway":
            assert metric["resource"]["name"] == "cpu" and container["resources"]["requests"]["cpu"]
        else:
            rule = served[metric["pods"]["metric"]["name"]]
            assert metric["type"] == "Pods" and rule["seriesQuery"].startswith(SCALED_ON[name] + "{")
            assert deployments[name]["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    for name in set(scaled_objects) & set(STAGES):  # KEDA in place of an HPA: the same metric from Prometheus
        (trigger,) = scaled_objects[name]["spec"]["triggers"]
        assert trigger["type"] == "prometheus" and trigger["metadata"]["query"].count(SCALED_ON[name] + "{") == 1
        assert f'pod=~"{name}-.*"' in trigger["metadata"]["query"] and scaled_objects[name]["spec"]["scaleTargetRef"]["name"] == name
    # The workers scale on the Celery queue: a Redis list named after it, in the services' Redis DB.
    scaled = scaled_objects["worker"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == "worker" and "worker" in deployments
    (trigger,) = scaled["spec"]["triggers"]
    metadata = trigger["metadata"]
    assert trigger["type"] == "redis" and set(metadata) <= REDIS_SCALER_KEYS
    worker = deployments["worker"]["spec"]["template"]["spec"]["containers"][0]
    env = container_env(docs, worker)
    redis = httpx.URL(env["DARTSERVE_BATCH_REDIS_URL"])
    assert metadata["listName"] == queue_key(env["DARTSERVE_BATCH_NAMESPACE"]) and metadata["databaseIndex"] == redis.path.strip("/")
    namespace = deployments["worker"]["metadata"]["namespace"]
    in_cluster = redis.host in by_kind(docs, "Service")
    host = f"{redis.host}.{namespace}.svc.cluster.local" if in_cluster else redis.host  # KEDA resolves from its own namespace
    assert metadata["address"] == f"{host}:{redis.port}"
    assert (metadata.get("enableTLS") == "true") == (redis.scheme == "rediss")
    authentication = by_kind(docs, "TriggerAuthentication")[trigger["authenticationRef"]["name"]]
    secrets = by_kind(docs, "Secret")
    for ref in authentication["spec"]["secretTargetRef"]:
        assert ref["key"] in secrets[ref["name"]]["data"]


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_network_policy_lets_only_the_gateway_in_and_only_services_reach_redis(directory):
    docs = rendered(directory)
    policies = list(by_kind(docs, "NetworkPolicy").values())

    def allowed(source: tuple[str, dict], target: dict, port: dict) -> bool:
        namespace, labels = source
        applying = [p for p in policies if selects(p["spec"]["podSelector"], target) and "Ingress" in p["spec"]["policyTypes"]]
        for policy in applying:
            for rule in policy["spec"].get("ingress", []):
                port_ok = "ports" not in rule or any(p["port"] in (port["name"], port["containerPort"]) for p in rule["ports"])
                peers = rule.get("from")
                assert not any("ipBlock" in peer for peer in peers or [])
                peer_ok = peers is None or any(
                    selects(peer.get("namespaceSelector", {}), {"kubernetes.io/metadata.name": namespace})
                    and (namespace == "dartserve" or "namespaceSelector" in peer)
                    and selects(peer.get("podSelector", {}), labels)
                    for peer in peers
                )
                if port_ok and peer_ok:
                    return True
        return not applying

    component = {w["metadata"]["name"]: w["spec"]["template"]["metadata"]["labels"] for w in docs if w["kind"] in ("Deployment", "StatefulSet")}
    sources = {name: ("dartserve", labels) for name, labels in component.items()}
    sources |= {"stranger": ("dartserve", {"app": "other"}), "monitoring": ("monitoring", {}), "keda": ("keda", {}), "elsewhere": ("default", {})}
    expected = {
        "http": set(sources),
        "grpc": {"gateway", "worker"},
        "metrics": {"monitoring"},
        "redis": {"gateway", "worker", *STAGES},
        "redis-batches": {"gateway", "worker", "keda"},
    }
    for _, template, container in containers(docs):
        for port in container.get("ports", []):
            reach = {name for name, source in sources.items() if allowed(source, template["metadata"]["labels"], port)}
            assert reach == expected["redis-batches" if container["name"] == "redis-batches" else port["name"]], (container["name"], port["name"])
    assert not any(allowed(s, component["worker"], {"name": "any", "containerPort": 9999}) for s in sources.values())


def test_gpu_overlays_give_the_language_model_stages_a_gpu_each():
    for directory, on_gpu in (("k8s/overlays/cpu", set()), ("k8s/overlays/gpu", {"pruner", "generator"}), ("k8s/examples/llava-1.5-7b", set(STAGES))):
        docs = rendered(directory)
        for workload, _, container in dartserve_containers(docs):
            gpus = {k: v.get("nvidia.com/gpu") for k, v in container["resources"].items()}
            name = workload["metadata"]["name"]
            device = container_env(docs, container).get("DARTSERVE_DEVICE", "cpu")
            assert (gpus == {"requests": "1", "limits": "1"}) == (name in on_gpu) == (device == "cuda"), (directory, name)
        # Every service of a deployment loads the same model in the same dtype.
        models = {(e.get("DARTSERVE_MODEL"), e.get("DARTSERVE_DTYPE")) for e in (container_env(docs, c) for _, _, c in dartserve_containers(docs))}
        assert len(models) == 1


# --- the compose file, run on loopback --------------------------------------------------------


def topological_waves(services: dict) -> list[list[str]]:
    waves, started = [], set()
    while len(started) < len(services):
        wave = [n for n, s in services.items() if n not in started and set(s.get("depends_on", {})) & set(services) <= started]
        assert wave, "a dependency cycle"
        waves.append(wave)
        started |= set(wave)
    return waves


def test_compose_services_answer_through_the_gateway(tmp_path):
    """Starts redis and every dartserve service of docker-compose.yml with the commands, health
    checks and environment it gives them, in its dependency order. Service names map to loopback
    and every port to a free one; the model cache and home folders map to empty temporary ones."""
    from dartserve.demo.data import example

    config = compose()
    services = config["services"]
    ports = {}
    for name, service in services.items():
        for number in listening(name, service).values():
            while (port := free_port()) in ports.values():  # the OS may hand a freed port out again
                pass
            ports[(name, number)] = port

    def local(value: str) -> str:
        def swap(match):
            key = (match["host"], int(match["port"]))
            assert key in ports, f"{match[0]} is no compose service's port"
            return f"127.0.0.1:{ports[key]}"

        return re.sub(r"(?P<host>[a-z][\w-]*):(?P<port>\d+)", swap, value)

    processes, logs = {}, {}

    def volume_dirs(name: str) -> dict[str, Path]:
        """Where a service's named volumes are here: one folder per volume, shared by the services."""
        mounts = {v["target"]: tmp_path / "volumes" / v["source"] for v in services[name].get("volumes", []) if v["type"] == "volume"}
        for folder in mounts.values():
            folder.mkdir(parents=True, exist_ok=True)
        return mounts

    def on_volume(name: str, value: str) -> str:
        for target, folder in volume_dirs(name).items():
            value = value.replace(target + "/", f"{folder}/")
        return value

    def environment(name: str) -> dict:
        service = services[name]
        env = {k: v for k, v in os.environ.items() if not k.startswith("DARTSERVE_")}
        env |= {k: v for k, v in image_env().items() if k not in ("PATH", "VIRTUAL_ENV")}
        env |= {k: local(v) if k.endswith(("_ADDR", "_URL")) else on_volume(name, v) for k, v in (service.get("environment") or {}).items()}
        own = listening(name, service)
        if "grpc" in own or "http" in own:
            env["DARTSERVE_PORT"] = str(ports[(name, own.get("grpc") or own["http"])])
        if "metrics" in own:
            env["DARTSERVE_METRICS_PORT"] = str(ports[(name, own["metrics"])])
        env["DARTSERVE_HOST"] = "127.0.0.1"
        for folder in ("home", "cwd"):
            (tmp_path / name / folder).mkdir(parents=True, exist_ok=True)
        env |= {"HF_HOME": str(tmp_path / "models"), "HOME": str(tmp_path / name / "home"), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
        return env | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def start(name: str) -> None:
        argv = [on_volume(name, arg) for arg in command_of(services[name])]
        logs[name] = tmp_path / f"{name}.log"
        env = environment(name)
        if argv[0] == "redis-server":
            (port,) = listening(name, services[name]).values()
            argv = [*argv, "--port", str(ports[(name, port)]), "--bind", "127.0.0.1"]
            if "/data" in volume_dirs(name):  # the image's working directory, where Redis keeps its files
                argv += ["--dir", str(volume_dirs(name)["/data"])]
        with open(logs[name], "wb") as out:
            processes[name] = subprocess.Popen(argv, env=env, cwd=tmp_path / name / "cwd", stdout=out, stderr=subprocess.STDOUT)

    def healthy(name: str, timeout_s: float = 90) -> None:
        if "healthcheck" not in services[name]:  # a job: done when it has run to its end
            assert processes[name].wait(timeout=timeout_s) == 0, logs[name].read_text()
            return
        test = services[name]["healthcheck"]["test"][1:]
        own = listening(name, services[name])
        if test[0] == "redis-cli":
            test = [*test[:1], "-p", str(ports[(name, own["redis"])]), *test[1:]]
        deadline = time.monotonic() + timeout_s
        while True:
            if processes[name].poll() is not None:
                pytest.fail(f"{name} exited:\n{logs[name].read_text()}")
            # A cheap wait for the port first: each health check run costs a Python start-up.
            listening_now = not own or _open(ports[(name, next(iter(own.values())))])
            if listening_now and subprocess.run(test, env=environment(name), capture_output=True, check=False).returncode == 0:
                return
            if time.monotonic() > deadline:
                pytest.fail(f"{name} not healthy after {timeout_s} s:\n{logs[name].read_text()}")
            time.sleep(0.5 if listening_now else 0.2)

    waves = topological_waves({n: s for n, s in services.items() if n != "worker"}) + [["worker"]]
    try:
        # The worker comes last (compose orders it beside the gateway), so that a batch waits
        # in the queue KEDA watches before a worker takes it.
        for wave in waves[:-1]:
            for name in wave:
                start(name)
            for name in wave:
                healthy(name)
        url = f"http://127.0.0.1:{ports[('gateway', listening('gateway', services['gateway'])['http'])]}"
        assert httpx.get(f"{url}/readyz").json()["ready"] is True
        item = example("test", 3)
        image = base64.b64encode(_png(item.image)).decode()
        reply = httpx.post(f"{url}/v1/answer", json={"image": image, "question": item.question}, timeout=60)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["answer"] and body["model"] == "dartserve-demo"
        assert 0 < body["usage"]["kept_vision_tokens"] < body["usage"]["vision_tokens"], "the default pruning ran"
        assert "dartserve_in_flight_requests" in httpx.get(f"{url}/metrics").text
        for stage in STAGES:
            metrics = httpx.get(f"http://127.0.0.1:{ports[(stage, listening(stage, services[stage])['metrics'])]}/metrics").text
            assert SCALED_ON[stage] in metrics, "the autoscalers' metric"

        requests = [{"custom_id": f"q{i}", "image": image, "question": item.question} for i in range(3)]
        batch = httpx.post(f"{url}/v1/batches", json={"requests": requests}, timeout=30)
        assert batch.status_code == 202, batch.text
        scaled = by_kind(rendered("k8s/overlays/cpu"), "ScaledObject")["worker"]["spec"]["triggers"][0]["metadata"]
        import redis

        assert scaled["address"].startswith("redis-batches.")
        queue = redis.Redis(port=ports[("redis-batches", listening("redis-batches", services["redis-batches"])["redis"])], db=int(scaled["databaseIndex"]))
        _wait(lambda: queue.llen(scaled["listName"]) == len(requests), "the batch in the queue KEDA reads")
        start("worker")
        healthy("worker")
        status = f"{url}/v1/batches/{batch.json()['id']}"
        _wait(lambda: httpx.get(status).json()["status"] == "completed", "the batch")
        lines = httpx.get(f"{status}/results").text.splitlines()
        assert [json.loads(line)["response"]["body"]["answer"] for line in lines] == [body["answer"]] * 3
        assert list((tmp_path / "volumes" / "batches").iterdir()), "the batch Redis keeps its append-only file on its volume"
        # The stages answer the gateway and the worker, which hold the generated token, and no one else.
        import grpc

        from services.rpc.dartserve.v1 import vision_pb2, vision_pb2_grpc

        with grpc.insecure_channel(f"127.0.0.1:{ports[('vision', listening('vision', services['vision'])['grpc'])]}") as channel:
            with pytest.raises(grpc.RpcError) as refused:
                vision_pb2_grpc.VisionServiceStub(channel).Encode(vision_pb2.EncodeRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        for process in reversed(processes.values()):
            process.terminate()
        for process in processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
    # The containers' root file system is read-only: nothing may be written outside /tmp and /models.
    for name in services:
        for folder in ("home", "cwd"):
            assert not list((tmp_path / name / folder).iterdir()), f"{name} wrote into its {folder}"


def _open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait(check, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def _png(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
