"""compose.yaml (GPU) and compose.cpu.yaml, without a Docker engine: each file is validated
and resolved by Compose itself (`docker compose config`, or Debian's `docker-compose config`),
then the CPU cluster runs from that resolved config as local processes (each service's own
command and environment; service names and ports mapped to loopback ones, named volumes to
folders, dependencies started in order and awaited on their own healthchecks) and answers a
job end to end with two workers. The GPU workers' device picker runs with stand-ins for torch
and ``hive``. The Dockerfile's COPY sources are checked against .dockerignore."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath

import httpx
import pytest
import yaml

from tests import processes
from tests.sse import events, follow

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
FILES = {"gpu": ROOT / "compose.yaml", "cpu": ROOT / "compose.cpu.yaml"}
API_KEY = "compose-test-key-0123456789"
#: The port each service listens on in its container, which the other services use.
SERVICE_PORTS = {"redis": 6379, "hive": 7833}


def compose_cli() -> list[str]:
    """Compose v2 (`docker compose`) where its plugin is installed, else Debian's docker-compose."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], check=False, capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise RuntimeError("no Compose to validate the files: apt-get install --no-install-recommends docker-compose")


def compose_config(path: Path, **env: str) -> subprocess.CompletedProcess:
    """`config` validates a file against the Compose schema and prints it resolved (variables
    interpolated, defaults filled in). Only PATH and HOME come from this environment."""
    base = {name: os.environ[name] for name in ("PATH", "HOME") if name in os.environ}
    command = [*compose_cli(), "--project-directory", str(ROOT), "-f", str(path), "config"]
    return subprocess.run(command, check=False, capture_output=True, text=True, env={**base, **env}, timeout=60, cwd=ROOT)


@pytest.fixture(scope="module")
def configs() -> dict[str, dict]:
    resolved = {}
    for variant, path in FILES.items():
        result = compose_config(path, HIVE_API_KEYS=API_KEY)
        assert result.returncode == 0, f"{path.name} is not a valid Compose file:\n{result.stderr}"
        resolved[variant] = yaml.safe_load(result.stdout)
    return resolved


def unescape(value: str) -> str:
    """`config` prints `$$` (a literal `$` in a Compose file) as it is; Compose hands the
    container a single `$`."""
    return value.replace("$$", "$")


def mounts(service: dict) -> dict[str, str]:
    """Container path → named volume (short syntax from docker-compose, long from v2)."""
    found = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume["source"], volume["target"]
        found[target] = source
    return found


def depends_on(service: dict) -> dict[str, str]:
    """Dependency → condition; the list form means service_started."""
    deps = service.get("depends_on", {})
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: spec["condition"] for name, spec in deps.items()}


def seconds(duration: str) -> float:
    """Compose durations as `config` prints them: 2s, 1m30s, 500ms."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"unknown duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def image_env() -> dict[str, str]:
    """The Dockerfile's ENV: what every container starts with, under its service's environment."""
    env = {}
    for instruction in dockerfile_instructions():
        if instruction[0].upper() == "ENV":
            env.update(item.split("=", 1) for item in instruction[1:])
    return env


def dockerfile_instructions() -> list[list[str]]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = (line.strip() for line in text.splitlines())
    return [shlex.split(line) for line in lines if line and not line.startswith("#")]


class LocalCompose:
    """A resolved Compose config run as local processes. Compose's network becomes loopback:
    each service's host name and container port (SERVICE_PORTS) map to 127.0.0.1 and a free
    port, and a service listens there rather than on all interfaces. Each named volume is a
    folder shared by every service that mounts it; any other absolute path a service is given
    lives in a folder of its own (its container's filesystem)."""

    def __init__(self, config: dict, root: Path, log_dir: Path, env_overrides: dict[str, dict[str, str]]):
        self.services = config["services"]
        self.root = root
        self.log_dir = log_dir
        self.env_overrides = env_overrides
        self.ports = {name: processes.free_port() for name in SERVICE_PORTS}
        for volume in config.get("volumes", {}):
            self.volume(volume).mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, list[processes.Proc]] = {}
        self.replica_ports: dict[str, dict[int, int]] = {}
        self.executables = {
            "hive": [sys.executable, "-m", "hive"],
            "python": [sys.executable],
            "redis-server": [_required("redis-server")],
            "redis-cli": [_required("redis-cli")],
        }

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.ports[service]}"

    def volume(self, name: str) -> Path:
        return self.root / "volumes" / name

    def _address(self, text: str, service: str) -> str:
        for name, port in SERVICE_PORTS.items():
            text = text.replace(f"//{name}:{port}", f"//127.0.0.1:{self.ports[name]}")
        if service in SERVICE_PORTS:  # the service calling itself, e.g. its healthcheck
            own = SERVICE_PORTS[service]
            text = re.sub(rf"//(127\.0\.0\.1|localhost):{own}\b", f"//127.0.0.1:{self.ports[service]}", text)
        return text

    def _path(self, value: str, service: str) -> str:
        if not value.startswith("/"):
            return value
        for target, source in mounts(self.services[service]).items():
            if value == target or value.startswith(target.rstrip("/") + "/"):
                return str(self.volume(source)) + value[len(target.rstrip("/")) :]
        return str(self.root / "containers" / service) + value

    def environment(self, service: str) -> dict[str, str]:
        spec = self.services[service]
        declared = image_env() if "build" in spec else {}  # the image's ENV applies to our image only
        declared |= {name: "" if value is None else str(value) for name, value in spec.get("environment", {}).items()}
        env = {name: self._path(self._address(unescape(value), service), service) for name, value in declared.items()}
        return {**env, **self.env_overrides.get(service, {})}

    def command(self, service: str, args: list[str]) -> list[str]:
        """A command of ``service`` as it runs here: its program from this machine, listening
        on loopback and the service's local port, talking to the others' local ports."""
        args = [self._path(self._address(unescape(arg), service), service) for arg in args]
        program, rest = args[0], args[1:]
        if program == "redis-server":
            rest += ["--port", str(self.ports[service]), "--bind", "127.0.0.1"]
        elif program == "redis-cli":
            rest = ["-p", str(self.ports["redis"]), *rest]
        elif program == "hive" and rest[:1] == ["serve"]:
            for flag, value in (("--host", "127.0.0.1"), ("--port", str(self.ports[service]))):
                assert flag in rest, f"{service}: hive serve without {flag}"
                rest[rest.index(flag) + 1] = value
        return [*self.executables[program], *rest]

    def replica_environment(self, service: str, n: int) -> dict[str, str]:
        """Replica ``n``'s environment: the service's, with a port of its own where each
        container would listen on the same one (a worker's metrics port, unpublished)."""
        env = self.environment(service)
        if "HIVE_METRICS_PORT" in env:
            ports = self.replica_ports.setdefault(service, {})
            env["HIVE_METRICS_PORT"] = str(ports.setdefault(n, processes.free_port()))
        return env

    def healthy(self, service: str) -> bool:
        """Every replica's healthcheck passes, each run in that replica's environment."""
        check = self.services[service]["healthcheck"]
        kind, *args = check["test"]
        assert kind == "CMD", f"{service}: healthcheck {kind} is not run here"
        for n in range(1, len(self.procs.get(service, [None])) + 1):
            try:
                env = {**os.environ, **self.replica_environment(service, n)}
                result = subprocess.run(self.command(service, args), check=False, capture_output=True, env=env, timeout=seconds(check["timeout"]))
            except subprocess.TimeoutExpired:
                return False
            if result.returncode != 0:
                return False
        return True

    def up(self, scale: dict[str, int]) -> None:
        """`docker compose up --scale`: services in dependency order, each started once its
        dependencies are healthy (by their own healthchecks) or started."""
        for service in self._start_order():
            for dependency, condition in depends_on(self.services[service]).items():
                assert condition in ("service_healthy", "service_started"), condition
                if condition == "service_healthy":
                    procs = tuple(self.procs[dependency])
                    processes.wait_until(lambda d=dependency: self.healthy(d), processes.STARTUP_TIMEOUT_S, f"{dependency} healthy", procs)
            command = self.command(service, self.services[service]["command"])
            self.procs[service] = [
                processes.start(f"compose-{service}-{n}", command, self.log_dir, self.replica_environment(service, n))
                for n in range(1, scale.get(service, 1) + 1)
            ]

    def _start_order(self) -> list[str]:
        order: list[str] = []

        def visit(service: str) -> None:
            for dependency in depends_on(self.services[service]):
                visit(dependency)
            if service not in order:
                order.append(service)

        for service in sorted(self.services):
            visit(service)
        return order

    def down(self) -> None:
        for service in reversed(list(self.procs)):
            for proc in self.procs[service]:
                proc.stop()


def _required(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        raise RuntimeError(f"{program} is not installed (apt-get install redis-server)")
    return path


def test_both_files_resolve_to_redis_the_hive_and_workers(configs):
    for variant, config in configs.items():
        assert set(config["services"]) == {"redis", "hive", "worker"}, variant
        assert {"hf-cache", "hub-cache", "redis-data"} <= set(config["volumes"]), variant


@pytest.mark.parametrize("variant", FILES)
def test_the_hive_wants_api_keys(variant):
    """It listens beyond loopback, which needs keys: Compose refuses to start without them."""
    result = compose_config(FILES[variant])
    assert result.returncode != 0
    assert "set HIVE_API_KEYS" in result.stderr


@pytest.mark.parametrize("variant", FILES)
def test_workers_scale_and_share_the_hub_cache(configs, variant):
    services = configs[variant]["services"]
    worker, hive = services["worker"], services["hive"]
    # --scale worker=N: nothing that two replicas could not both have.
    assert "container_name" not in worker and "ports" not in worker
    assert depends_on(worker) == {"redis": "service_healthy", "hive": "service_healthy"}
    assert depends_on(hive) == {"redis": "service_healthy"}
    assert "healthcheck" in services["redis"] and "healthcheck" in hive and "healthcheck" in worker
    # One HF_HOME for every worker of the machine; downloads go through the hive's /hub,
    # whose cache is a volume of its own.
    assert mounts(worker)[worker["environment"]["HF_HOME"]] == "hf-cache"
    assert worker["environment"]["HF_ENDPOINT"] == f"http://hive:{SERVICE_PORTS['hive']}/hub"
    assert mounts(hive)[hive["environment"]["HIVE_HUB_CACHE"]] == "hub-cache"
    assert worker["environment"]["HIVE_REDIS_URL"] == hive["environment"]["HIVE_REDIS_URL"]


def test_gpu_workers_reserve_nvidia_gpus_and_cpu_workers_none(configs):
    gpu, cpu = configs["gpu"]["services"]["worker"], configs["cpu"]["services"]["worker"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert devices[0]["count"] in ("all", -1)  # v2 prints all as -1
    assert "deploy" not in cpu
    assert cpu["command"] == ["hive", "worker", "--device", "cpu"]
    assert configs["cpu"]["services"]["hive"]["build"]["args"]["TORCH_INDEX"].endswith("/whl/cpu")


def test_the_cpu_file_differs_only_in_its_image_and_the_workers_device(configs):
    """compose.cpu.yaml is a whole copy of compose.yaml (see its header): keep them in step."""

    def comparable(config: dict) -> dict:
        services = {name: dict(spec) for name, spec in config["services"].items()}
        for name in ("hive", "worker"):
            services[name].pop("image")
            services[name].pop("build")
        services["worker"].pop("command")
        services["worker"].pop("deploy", None)
        return {"services": services, "volumes": config["volumes"]}

    assert comparable(configs["cpu"]) == comparable(configs["gpu"])
    assert configs["gpu"]["services"]["hive"]["image"] != configs["cpu"]["services"]["hive"]["image"]


def test_gpu_replicas_take_one_gpu_each(configs, tmp_path):
    """compose.yaml's worker command on a machine with two GPUs: two replicas started at once
    take cuda:0 and cuda:1; a third finds none free and exits cleanly (so `restart: on-failure`
    leaves it down); once a replica is gone, its GPU is free again. Stand-ins: `python`
    answers the GPU count, `hive` prints its arguments and runs (holding the lock) until its
    stdin closes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text("#!/bin/sh\necho 2\n")
    (bin_dir / "hive").write_text('#!/bin/sh\necho "$@"\nexec cat >/dev/null\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    local = LocalCompose(configs["gpu"], tmp_path, tmp_path, {"worker": {"PATH": f"{bin_dir}:{os.environ['PATH']}"}})
    command = [unescape(arg) for arg in configs["gpu"]["services"]["worker"]["command"]]
    env = {**os.environ, **local.environment("worker")}
    replicas: list[subprocess.Popen] = []

    def replica() -> subprocess.Popen:
        pipe = subprocess.PIPE
        replicas.append(subprocess.Popen(command, env=env, stdin=pipe, stdout=pipe, stderr=pipe, text=True))
        return replicas[-1]

    try:
        first, second = replica(), replica()
        devices = {first.stdout.readline(): first, second.stdout.readline(): second}
        assert set(devices) == {"worker --device cuda:0\n", "worker --device cuda:1\n"}
        third = replica()
        _, err = third.communicate(timeout=30)
        assert third.returncode == 0 and "no free GPU (2 visible" in err
        holder = devices["worker --device cuda:0\n"]
        holder.stdin.close()
        holder.wait(30)
        assert replica().stdout.readline() == "worker --device cuda:0\n"
        assert (local.volume("hf-cache") / ".hive-gpus").is_dir()  # the locks live in the shared volume
    finally:
        for proc in replicas:
            proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                stream.close()


@pytest.mark.timeout(300)
def test_the_cpu_cluster_answers_a_job_with_two_workers(configs, hub, log_dir, tmp_path):
    """compose.cpu.yaml `up --scale worker=2`, as local processes: Redis, the hive (its /hub
    pulling from the test hub instead of huggingface.co, the one setting not from the file),
    two workers sharing the hf-cache volume and downloading through the hive. A job streams
    end to end, both workers are listed, and the healthchecks hold: all pass, and the hive's
    and the workers' fail once Redis is gone."""
    cluster = LocalCompose(configs["cpu"], tmp_path, log_dir, {"hive": {"HIVE_HUB_UPSTREAM": hub.url}})
    auth = {"Authorization": f"Bearer {API_KEY}"}
    try:
        cluster.up(scale={"worker": 2})
        hive = cluster.url("hive")
        workers = tuple(cluster.procs["worker"])
        processes.wait_until(lambda: processes.health(hive)["workers"] == 2, processes.STARTUP_TIMEOUT_S, "both workers", workers)
        assert cluster.healthy("redis") and cluster.healthy("hive") and cluster.healthy("worker")

        body = {"model": "acme/tiny", "prompt": "Hello", "max_tokens": 6, "temperature": 0}
        assert httpx.post(f"{hive}/v1/inference", json=body, timeout=10).status_code == 401
        response = httpx.post(f"{hive}/v1/inference", json=body, headers=auth, timeout=10)
        assert response.status_code == 202, response.text
        job = response.json()
        received = follow(hive, job["sse_url"], timeout=120)  # the sse_url carries its own token
        assert received[-1].done
        kinds = [r.event for r in events(received)]
        assert kinds[0] == "queued" and kinds[-1] == "end", kinds
        assert {"download", "loading", "ready", "started", "token"} <= set(kinds)
        final = [r.json() for r in received if r.event == "download"][-1]
        assert final["bytes_downloaded"] == final["bytes_total"] > 0
        state = httpx.get(f"{hive}/v1/inference/{job['job_id']}", headers=auth, timeout=10).json()
        assert state["state"] == "completed" and state["tokens_out"] == 6

        listed = httpx.get(f"{hive}/v1/workers", headers=auth, timeout=10).json()["workers"]
        assert len(listed) == 2 and len({w["id"] for w in listed}) == 2
        assert {w["device"] for w in listed} == {"cpu"}
        assert state["worker"] in {w["id"] for w in listed}
        # The model crossed once into the hive's hub-cache volume, and the workers' hf-cache
        # volume holds it for all of them.
        assert (cluster.volume("hub-cache") / "models--acme--tiny").is_dir()
        assert (cluster.volume("hf-cache") / "hub" / "models--acme--tiny").is_dir()

        for proc in cluster.procs["redis"]:
            proc.stop()
        processes.wait_until(lambda: not cluster.healthy("hive"), 30, "the hive unhealthy without Redis")
        assert not cluster.healthy("redis")
        # The workers' heartbeats fail: their liveness fails, and they wait for Redis.
        processes.wait_until(lambda: not cluster.healthy("worker"), 30, "the workers unhealthy without Redis")
        for proc in workers:
            proc.check_alive()
    finally:
        cluster.down()


def test_the_image_gets_every_file_it_copies():
    """Every COPY source gets through .dockerignore (an allowlist), every package pyproject.toml
    installs is copied, and the build context leaves out the virtualenv and .git."""
    lines = (line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines())
    patterns = [line for line in lines if line and not line.startswith("#")]
    copies = [instruction[1:-1] for instruction in dockerfile_instructions() if instruction[0].upper() == "COPY"]
    sources = [arg for args in copies for arg in args if not arg.startswith("--")]
    assert sources
    for source in sources:
        path = ROOT / source
        assert path.exists(), source
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        for file in files:
            assert not dockerignored(file.relative_to(ROOT).as_posix(), patterns), f"{file} is left out of the build context"
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {p.rstrip("*") for p in packages} <= set(sources)
    for left_out in (".venv/bin/python", ".git/HEAD", "tests/test_compose.py", "hive/__pycache__/app.cpython-311.pyc"):
        assert dockerignored(left_out, patterns), left_out


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides; `!` re-includes."""
    candidates = [path, *(p.as_posix() for p in PurePosixPath(path).parents if p.as_posix() != ".")]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        regex = _pattern_regex(pattern.removeprefix("!"))
        if any(regex.fullmatch(candidate) for candidate in candidates):
            ignored = not negated
    return ignored


def _pattern_regex(pattern: str) -> re.Pattern:
    parts = re.split(r"(\*\*/|\*\*|\*|\?)", pattern.strip("/"))
    wildcards = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
    return re.compile("".join(wildcards.get(part, re.escape(part)) for part in parts))


def _flags(command: list[str]) -> dict[str, str]:
    """``--name value`` pairs of a redis-server command line."""
    return {command[i][2:]: command[i + 1] for i in range(len(command) - 1) if command[i].startswith("--")}


@pytest.mark.parametrize("variant", FILES)
def test_the_plain_redis_keeps_what_it_accepted(configs, variant):
    """An append-only file on a volume, and no eviction: a restart or a full Redis never
    forgets an accepted job."""
    redis_service = configs[variant]["services"]["redis"]
    flags = _flags(redis_service["command"])
    assert flags["appendonly"] == "yes" and flags["maxmemory-policy"] == "noeviction"
    assert mounts(redis_service)[flags["dir"]] == "redis-data"


@pytest.mark.parametrize("variant", FILES)
def test_the_ha_override_runs_sentinel_with_replicas_and_points_hive_at_it(variant):
    from shared.redis_url import parse_sentinel_url

    result = subprocess.run(
        [*compose_cli(), "--project-directory", str(ROOT), "-f", str(FILES[variant]), "-f", str(ROOT / "compose.ha.yaml"), "config"],
        check=False, capture_output=True, text=True, env={"PATH": os.environ["PATH"], "HIVE_API_KEYS": API_KEY}, timeout=60, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    nodes = {name: _flags(spec["command"]) for name, spec in services.items() if name.startswith("redis")}
    assert set(nodes) == {"redis", "redis-replica-1", "redis-replica-2"}
    for name, flags in nodes.items():
        # Any node may be promoted: each refuses writes without an in-sync replica, keeps an
        # append-only file on a volume of its own, never evicts, and announces its name.
        assert flags["min-replicas-to-write"] == "1" and flags["min-replicas-max-lag"] == "10", name
        assert flags["repl-diskless-sync-delay"] == "0", name  # a resyncing replica is served at once
        assert flags["appendonly"] == "yes" and flags["maxmemory-policy"] == "noeviction", name
        assert flags["replica-announce-ip"] == name and mounts(services[name])[flags["dir"]] == f"{name}-data"
    assert "replicaof" not in nodes["redis"]
    assert all(services[f"redis-replica-{k}"]["command"][-2:] == ["redis", "6379"] for k in (1, 2))
    sentinels = sorted(name for name in services if name.startswith("sentinel-"))
    assert sentinels == ["sentinel-1", "sentinel-2", "sentinel-3"]
    script = services["sentinel-1"]["command"][0]
    assert "sentinel monitor hive redis 6379 2" in script and "--sentinel" in script
    for service in ("hive", "worker"):
        target = parse_sentinel_url(unescape(services[service]["environment"]["HIVE_REDIS_URL"]))
        assert target.master == "hive" and sorted(host for host, _ in target.sentinels) == sentinels
        assert {port for _, port in target.sentinels} == {26379}
        assert set(sentinels) <= set(depends_on(services[service]))
