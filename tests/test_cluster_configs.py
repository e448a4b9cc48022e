"""The cluster configs in cluster/ are checked against the tools that will read them, without a cluster.

- Ray cluster launcher configs (cluster/aws.yaml, cluster/gcp.yaml): Ray's own cluster-config schema
  (``ray/autoscaler/ray-schema.json`` in the installed ray package), after Ray's own default filling.
- KubeRay manifests (cluster/kuberay/): the fields the ray.io/v1 CRDs require, in a table written from
  the KubeRay v1.7.0 CRDs (helm-chart/kuberay-operator/crds/), plus the operator's own checks we rely on.
- The RayService's serveConfigV2: Ray Serve's deploy schema, the app's own argument check
  (``serve.app.AppOptions``), and equality with serve/config.yaml apart from a stated list of fields.
- Every ``python jobs/<name>.py ...`` command line in the manifests and in cluster/README.md parses with
  that job's real ``build_parser()``; the numbers that must agree across files do (GPUs, batch, paths).
- The image recipe (cluster/Dockerfile + requirements.txt) pins every pyproject dependency and carries no
  project code.

Pure parsing and schema validation: no Ray is started.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import re
import shlex
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
LAUNCHER_CONFIGS = ("aws.yaml", "gcp.yaml")
SHARED_MOUNT = "/mnt/shared"
PAPER_GLOBAL_BATCH = 128

# ---------------------------------------------------------------------------------------------- helpers
GIB = 1024**3
_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|K|M|G|T|k)?$")
_UNITS = {None: 1, "Ki": 1024, "Mi": 1024**2, "Gi": GIB, "Ti": 1024**4, "k": 1e3, "K": 1e3, "M": 1e6,
          "G": 1e9, "T": 1e12}


def k8s_bytes(quantity: str | int) -> float:
    """A Kubernetes memory quantity ("450Gi", "64Gi", "1600Gi") in bytes."""
    match = _QUANTITY.match(str(quantity))
    if not match:
        raise ValueError(f"not a Kubernetes quantity: {quantity!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def docker_bytes(size: str) -> float:
    """A docker --shm-size value ("450g", "16g") in bytes."""
    match = re.fullmatch(r"(\d+)([bkmg])?", size.strip("'\""))
    if not match:
        raise ValueError(f"not a docker size: {size!r}")
    return int(match.group(1)) * {None: 1, "b": 1, "k": 1024, "m": 1024**2, "g": GIB}[match.group(2)]


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def kuberay_documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def ray_resources(kind: str) -> list[tuple[str, dict]]:
    return [(name, doc) for name, doc in kuberay_documents() if doc.get("kind") == kind]


def cluster_spec(doc: dict) -> dict:
    """The RayCluster spec inside any of the three Ray kinds."""
    return {"RayCluster": lambda d: d["spec"], "RayJob": lambda d: d["spec"]["rayClusterSpec"],
            "RayService": lambda d: d["spec"]["rayClusterConfig"]}[doc["kind"]](doc)


def pod_groups(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]


def shm_volume(pod_spec: dict) -> dict:
    mounts = {m["name"]: m["mountPath"] for c in pod_spec["containers"] for m in c.get("volumeMounts", [])}
    names = [name for name, path in mounts.items() if path == "/dev/shm"]
    assert len(names) == 1, "exactly one volume must be mounted at /dev/shm (the object store lives there)"
    return next(v for v in pod_spec["volumes"] if v["name"] == names[0])


# ----------------------------------------------------------------------------------- job command lines
_SHELL_OPERATORS = {"&&", "||", ";", "|", "&"}


def shell_tokens(text: str) -> list[str]:
    """Shell words of a command text; operators (&&, ;, |) come out as their own tokens."""
    lexer = shlex.shlex(text.replace("\\\n", " "), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return list(lexer)


def job_commands(text: str) -> list[tuple[str, list[str]]]:
    """Each ``python jobs/<name>.py args...`` in a shell text, as (script, args); a line ends a command."""
    return [command for line in text.replace("\\\n", " ").splitlines() for command in _line_commands(line)]


def _line_commands(line: str) -> list[tuple[str, list[str]]]:
    tokens = shell_tokens(line)
    commands = []
    for i, token in enumerate(tokens[:-1]):
        if token in ("python", "python3") and re.fullmatch(r"jobs/\w+\.py", tokens[i + 1]):
            args = []
            for arg in tokens[i + 2:]:
                if arg in _SHELL_OPERATORS or set(arg) <= set("&|;()<>"):
                    break
                args.append(arg)
            commands.append((tokens[i + 1], args))
    return commands


def parse_job(script: str, args: list[str]):
    """Parse ``args`` with the job's real parser, as ``python <script> args`` would."""
    path = REPO / script
    assert path.is_file(), f"{script} does not exist"
    module = importlib.import_module(f"jobs.{path.stem}")
    assert hasattr(module, "build_parser"), f"{script} has no build_parser(): its flags cannot be checked"
    try:
        return module.build_parser().parse_args(args)
    except SystemExit as err:  # argparse reports bad flags by exiting
        raise AssertionError(f"{script} rejects {' '.join(args)!r} (exit {err.code})") from None


def readme_commands() -> list[tuple[str, list[str]]]:
    blocks = re.findall(r"```bash\n(.*?)```", (CLUSTER / "README.md").read_text(), flags=re.S)
    return [command for block in blocks for command in job_commands(block)]


def rayjob_commands(doc: dict) -> list[tuple[str, list[str]]]:
    return job_commands(doc["spec"]["entrypoint"])


def all_commands() -> list[tuple[str, str, list[str]]]:
    found = [("cluster/README.md", script, args) for script, args in readme_commands()]
    for name, doc in ray_resources("RayJob"):
        found += [(f"cluster/kuberay/{name}", script, args) for script, args in rayjob_commands(doc)]
    return found


def gpus_of(spec: dict) -> int:
    """GPUs of a RayCluster spec at its fixed size (replicas of each worker group × GPUs per pod)."""
    total = 0
    for group in spec.get("workerGroupSpecs", []):
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        total += group["replicas"] * int(limits.get("nvidia.com/gpu", 0))
    return total


# ====================================================================================== launcher configs
RAY_SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.fixture(params=LAUNCHER_CONFIGS)
def launcher(request) -> tuple[str, dict]:
    return request.param, load_yaml(CLUSTER / request.param)


def test_launcher_config_passes_rays_schema(launcher):
    name, raw = launcher
    jsonschema.validate(raw, RAY_SCHEMA)  # as written
    prepared = prepare_config(copy.deepcopy(raw))  # as `ray up` fills it with the provider's defaults
    validate_config(prepared)
    # Ray's defaults would pip-install a nightly Ray on every node: the configs must override them.
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert prepared[key] == [], f"{name}: {key} must stay empty (the image has every dependency)"


def test_launcher_schema_check_rejects_a_broken_config(launcher):
    _, raw = launcher
    broken = copy.deepcopy(raw)
    del broken["available_node_types"]["gpu_h100"]["resources"]
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))
    misspelled = copy.deepcopy(raw)
    misspelled["docker"]["imag"] = misspelled["docker"].pop("image")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(misspelled, RAY_SCHEMA)


def test_launcher_nodes_auth_spot_and_shared_storage(launcher):
    name, cfg = launcher
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, f"{name}: the head is a CPU node"
    gpu_types = {k: v for k, v in types.items() if v["resources"].get("GPU")}
    assert set(gpu_types) == {"gpu_h100", "gpu_h100_spot"}
    assert all(t["resources"]["GPU"] == 8 for t in gpu_types.values()), "8×H100 worker nodes"
    assert sum(t["max_workers"] for t in gpu_types.values()) <= cfg["max_workers"]
    spot = json.dumps(gpu_types["gpu_h100_spot"]["node_config"])
    assert '"MarketType": "spot"' in spot or '"provisioningModel": "SPOT"' in spot, f"{name}: no spot option"
    assert "spot" not in json.dumps(gpu_types["gpu_h100"]["node_config"]).lower()

    assert f"ray{ray.__version__}" in cfg["docker"]["image"], "the image tag names the Ray version it holds"
    assert f"-v {SHARED_MOUNT}:{SHARED_MOUNT}" in cfg["docker"]["run_options"]
    assert any(SHARED_MOUNT in c and "mount" in c for c in cfg["initialization_commands"])

    for role, commands, run_options in (("head", cfg["head_start_ray_commands"], "head_run_options"),
                                        ("worker", cfg["worker_start_ray_commands"], "worker_run_options")):
        start = next(c for c in commands if "ray start" in c)
        assert "RAY_AUTH_MODE=token" in start, f"{name}: {role} starts without token authentication"
        token_path = re.search(r"RAY_AUTH_TOKEN_PATH=(\S+?);", start).group(1)
        assert token_path.startswith(tuple(cfg["file_mounts"])), "the token file must be one the config copies"
        store = int(re.search(r"--object-store-memory=(\d+)", start).group(1))
        shm = next(o for o in cfg["docker"][run_options] if o.startswith("--shm-size="))
        assert store < docker_bytes(shm.split("=", 1)[1]), f"{name}: {role} object store does not fit /dev/shm"


# ===================================================================================== KubeRay manifests
# Required fields of the ray.io/v1 CRDs, KubeRay v1.7.0 (helm-chart/kuberay-operator/crds/ray.io_*.yaml),
# as paths inside a RayCluster spec; "[]" walks every list item. A requirement applies where its parent
# exists (as in OpenAPI: a required key of an absent optional object is not required).
KUBERAY_CRD_VERSION = "v1.7.0"
RAYCLUSTER_SPEC_REQUIRED = (
    "headGroupSpec",
    "headGroupSpec.template",
    "workerGroupSpecs[].groupName",
    "workerGroupSpecs[].minReplicas",
    "workerGroupSpecs[].maxReplicas",
    "workerGroupSpecs[].template",
)
# PodSpec fields required by the same CRDs (Kubernetes core types), for the fields these manifests use.
POD_SPEC_REQUIRED = (
    "containers",
    "containers[].name",
    "containers[].ports[].containerPort",
    "containers[].env[].name",
    "containers[].env[].valueFrom.secretKeyRef.key",
    "containers[].volumeMounts[].name",
    "containers[].volumeMounts[].mountPath",
    "volumes[].name",
    "volumes[].persistentVolumeClaim.claimName",
)
SPEC_ROOT = {"RayCluster": "spec", "RayJob": "spec.rayClusterSpec", "RayService": "spec.rayClusterConfig"}
TOP_REQUIRED = {"RayCluster": ("spec",), "RayJob": ("spec", "spec.entrypoint", "spec.rayClusterSpec"),
                "RayService": ("spec", "spec.rayClusterConfig")}  # RayJob: the operator's own check
NAME_LIMIT = {"RayCluster": 53, "RayJob": 47, "RayService": 47}  # utils.MaxRay*NameLength
AUTH_MODES = ("disabled", "token")


def required_paths(kind: str) -> list[str]:
    root = SPEC_ROOT[kind]
    paths = list(TOP_REQUIRED[kind]) + [f"{root}.{p}" for p in RAYCLUSTER_SPEC_REQUIRED]
    for group in ("headGroupSpec", "workerGroupSpecs[]"):
        paths += [f"{root}.{group}.template.spec.{p}" for p in POD_SPEC_REQUIRED]
    return paths


def missing_required(doc: dict, path: str) -> list[str]:
    """Where ``path`` is required but absent in ``doc`` (parents absent: not required)."""

    def walk(node, parts, where):
        head, *rest = parts
        many = head.endswith("[]")
        key = head[:-2] if many else head
        if not isinstance(node, dict):
            return []
        if key not in node:
            return [] if rest else [f"{where}.{key}".lstrip(".")]
        child = node[key]
        if not rest:
            return []
        items = child if many else [child]
        return [miss for i, item in enumerate(items or [])
                for miss in walk(item, rest, f"{where}.{key}" + (f"[{i}]" if many else ""))]

    return walk(doc, path.split("."), "")


def crd_violations(doc: dict) -> list[str]:
    kind = doc.get("kind")
    errors = []
    if doc.get("apiVersion") != "ray.io/v1" or kind not in SPEC_ROOT:
        return [f"not a ray.io/v1 RayCluster/RayJob/RayService: {doc.get('apiVersion')} {kind}"]
    name = doc.get("metadata", {}).get("name", "")
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) or len(name) > NAME_LIMIT[kind]:
        errors.append(f"metadata.name {name!r} is not a DNS-1035 label of at most {NAME_LIMIT[kind]} chars")
    for path in required_paths(kind):
        errors += [f"missing required {miss}" for miss in missing_required(doc, path)]
    spec = cluster_spec(doc) if not errors else {}
    for group in pod_groups(spec) if spec else []:
        params = group.get("rayStartParams", {})
        errors += [f"rayStartParams.{k} must be a string" for k, v in params.items() if not isinstance(v, str)]
        if "resources" in group and {"num-cpus", "num-gpus", "memory"} & set(params):
            errors.append("resources set in both rayStartParams and resources")  # operator check
    if spec.get("authOptions", {}).get("mode", "disabled") not in AUTH_MODES:
        errors.append(f"authOptions.mode must be one of {AUTH_MODES}")
    for field in ("serveConfigV2", "runtimeEnvYAML", "entrypoint"):
        if field in doc.get("spec", {}) and not isinstance(doc["spec"][field], str):
            errors.append(f"spec.{field} must be a string")
    return errors


def test_kuberay_manifests_exist():
    kinds = sorted(doc["kind"] for _, doc in kuberay_documents())
    assert kinds == ["PersistentVolumeClaim", "RayCluster", "RayJob", "RayJob", "RayJob", "RayService"]


@pytest.mark.parametrize("name,doc", [d for d in kuberay_documents() if d[1]["kind"].startswith("Ray")],
                         ids=lambda v: v if isinstance(v, str) else v["metadata"]["name"])
def test_kuberay_manifest_has_crd_required_fields(name, doc):
    assert crd_violations(doc) == [], f"{name} (KubeRay {KUBERAY_CRD_VERSION} CRDs)"


def test_crd_check_finds_missing_fields():
    _, doc = ray_resources("RayCluster")[0]
    broken = copy.deepcopy(doc)
    del broken["spec"]["workerGroupSpecs"][0]["groupName"]
    del broken["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["name"]
    broken["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    assert sorted(crd_violations(broken)) == [
        "missing required spec.headGroupSpec.template.spec.containers[0].name",
        "missing required spec.workerGroupSpecs[0].groupName",
    ]
    restored = copy.deepcopy(doc)
    restored["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    assert crd_violations(restored) == ["rayStartParams.num-cpus must be a string"]


@pytest.mark.parametrize("name,doc", [d for d in kuberay_documents() if d[1]["kind"].startswith("Ray")],
                         ids=lambda v: v if isinstance(v, str) else v["metadata"]["name"])
def test_kuberay_cluster_auth_image_shm_and_storage(name, doc):
    spec = cluster_spec(doc)
    assert spec["rayVersion"] == ray.__version__
    assert spec.get("authOptions", {}).get("mode") == "token", f"{name}: token authentication is off"
    pvcs = [d["metadata"]["name"] for _, d in kuberay_documents() if d["kind"] == "PersistentVolumeClaim"]
    for group in pod_groups(spec):
        pod = group["template"]["spec"]
        container = pod["containers"][0]
        assert f"ray{ray.__version__}" in container["image"]
        volume = shm_volume(pod)
        assert volume["emptyDir"]["medium"] == "Memory"
        shm = k8s_bytes(volume["emptyDir"]["sizeLimit"])
        store = int(group["rayStartParams"]["object-store-memory"])
        assert store < shm <= k8s_bytes(container["resources"]["limits"]["memory"]), \
            f"{name}: object store {store / GIB:.0f} GiB must fit /dev/shm ({shm / GIB:.0f} GiB) within the pod's memory"
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
        assert claims and set(claims) <= set(pvcs), f"{name}: shared storage must be the PVC in shared-storage.yaml"
        assert any(m["mountPath"] == SHARED_MOUNT for m in container["volumeMounts"])
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        assert requests.get("nvidia.com/gpu") == limits.get("nvidia.com/gpu")
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in head, "the head is a CPU pod"
    assert all(int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) == 8
               for g in spec["workerGroupSpecs"]), "worker pods are whole 8×H100 nodes"


def test_shared_storage_is_read_write_many():
    pvc = next(d for _, d in kuberay_documents() if d["kind"] == "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["resources"]["requests"]["storage"]


def runtime_envs() -> list[tuple[str, dict]]:
    envs = [(name, yaml.safe_load(doc["spec"]["runtimeEnvYAML"])) for name, doc in ray_resources("RayJob")]
    for name, doc in ray_resources("RayService"):
        serve_config = yaml.safe_load(doc["spec"]["serveConfigV2"])
        envs += [(name, app.get("runtime_env", {})) for app in serve_config["applications"]]
    return envs


@pytest.mark.parametrize("name,env", runtime_envs(), ids=lambda v: v if isinstance(v, str) else "")
def test_runtime_env_carries_only_the_code(name, env):
    assert set(env) == {"working_dir"}, f"{name}: the image pins the dependencies; runtime_env carries code only"
    assert re.fullmatch(r"(s3|gs)://[^/]+/.+\.zip", env["working_dir"]), \
        f"{name}: a RayJob/RayService working_dir must be a zip in the bucket"


# ========================================================================================= entry points
def test_every_command_line_parses_with_the_jobs_parser():
    commands = all_commands()
    scripts = {script for _, script, _ in commands}
    assert {"jobs/preprocess.py", "jobs/train.py"} <= scripts
    for where, script, args in commands:
        parse_job(script, args)
    assert len([c for c in commands if c[0] == "cluster/README.md"]) >= 3


def test_command_check_rejects_a_wrong_flag():
    with pytest.raises(AssertionError, match="rejects"):
        parse_job("jobs/train.py", ["--stage", "backbone", "--model", "m", "--data", "d", "--out", "e",
                                    "--num-gpus", "8"])


@pytest.mark.parametrize("name,doc", ray_resources("RayJob"), ids=lambda v: v if isinstance(v, str) else "")
def test_rayjob_entrypoint_runs_in_the_cluster(name, doc):
    """Outside HTTPMode a submitter pod's shell runs the entrypoint: an "&&" there would run the second
    command in the submitter, not in the Ray job."""
    tokens = shell_tokens(doc["spec"]["entrypoint"])
    if doc["spec"].get("submissionMode", "K8sJobMode") != "HTTPMode":
        assert not _SHELL_OPERATORS & set(tokens), f"{name}: shell operators in a K8sJobMode entrypoint"
    assert tokens[0] in ("python", "python3") and len(rayjob_commands(doc)) >= 1


def test_preprocess_job_uses_every_gpu_and_stores_stage_two_latents():
    (name, doc), = [(n, d) for n, d in ray_resources("RayJob") if "preprocess.py" in d["spec"]["entrypoint"]]
    (script, args), = rayjob_commands(doc)
    parsed = parse_job(script, args)
    assert parsed.encoder_actors == gpus_of(doc["spec"]["rayClusterSpec"])
    assert set(parsed.latent_views.split(",")) == {"target", "background"}, "stage 2 needs the background view"
    assert parsed.encoders.startswith(SHARED_MOUNT) and parsed.preset == "sdxl"


def test_colorize_job_uses_every_gpu():
    (name, doc), = [(n, d) for n, d in ray_resources("RayJob") if "colorize_batch.py" in d["spec"]["entrypoint"]]
    (script, args), = rayjob_commands(doc)
    parsed = parse_job(script, args)
    assert parsed.workers == gpus_of(doc["spec"]["rayClusterSpec"]) and parsed.gpu, f"{name}: one actor per GPU"


def test_train_job_stages_chain_and_keep_the_papers_batch():
    (name, doc), = [(n, d) for n, d in ray_resources("RayJob") if "train.py" in d["spec"]["entrypoint"]]
    stages = {parsed.stage: parsed for parsed in (parse_job(s, a) for s, a in rayjob_commands(doc))}
    assert list(stages) == ["backbone", "plugin"]
    gpus = gpus_of(doc["spec"]["rayClusterSpec"])
    for parsed in stages.values():
        assert parsed.gpu and parsed.workers == gpus
        assert parsed.workers * parsed.batch_size == PAPER_GLOBAL_BATCH
        assert parsed.storage.startswith(SHARED_MOUNT), "Ray Train storage must be shared by all nodes"
        assert parsed.mlflow_uri.startswith("http"), "a tracking server, not a node-local sqlite file"
        assert parsed.workers * parsed.cpus_per_worker <= sum(
            g["replicas"] * float(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
            for g in doc["spec"]["rayClusterSpec"]["workerGroupSpecs"])
    assert stages["plugin"].model == stages["backbone"].out
    for parsed in stages.values():  # checkpoints by the clock, whatever the worker count
        assert parsed.checkpoint_every == 0 and parsed.checkpoint_minutes > 0
    for group in doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        # a spot reclaim's SIGTERM leaves the node draining long enough for a just-in-time checkpoint
        pod = group["template"]["spec"]
        env = {e["name"]: e["value"] for e in pod["containers"][0].get("env", [])}
        drain = float(env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"])
        assert drain >= 60 and pod["terminationGracePeriodSeconds"] > drain, group["groupName"]
    (service_name, service), = ray_resources("RayService")
    served = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]["model"]
    assert served == stages["plugin"].out, "the RayService serves the stage-2 export"


# ================================================================================================ serve
# Fields of the RayService's serveConfigV2 allowed to differ from serve/config.yaml, and why:
ALLOWED_SERVE_DIFFERENCES = {
    "applications[colorize].args.model",         # the model folder on the cluster's shared volume
    "applications[colorize].args.max_replicas",  # scaled to the worker group's GPUs
    "applications[colorize].runtime_env",        # the code zip (the image has no code)
    "http_options.host",                         # 0.0.0.0 for the Kubernetes Service; its token comes from a Secret
}


def flatten(value, prefix="") -> dict[str, object]:
    if isinstance(value, dict):
        if not value:
            return {prefix: {}}
        return {k: v for key, item in value.items() for k, v in flatten(item, f"{prefix}.{key}".lstrip(".")).items()}
    if isinstance(value, list) and value and all(isinstance(v, dict) and "name" in v for v in value):
        return {k: v for item in value for k, v in flatten(item, f"{prefix}[{item['name']}]").items()}
    return {prefix: value}


def serve_differences(project: dict, cluster: dict) -> set[str]:
    a, b = flatten(project), flatten(cluster)
    differing = {k for k in a.keys() | b.keys() if a.get(k, "<absent>") != b.get(k, "<absent>")}
    # report a whole runtime_env (or args) entry by its stated name
    return {next((allowed for allowed in ALLOWED_SERVE_DIFFERENCES if k == allowed or k.startswith(allowed + ".")), k)
            for k in differing}


@pytest.fixture()
def serve_configs(monkeypatch):
    for key in [k for k in os.environ if k.startswith("COLORIZE_")]:
        monkeypatch.delenv(key)  # AppOptions reads COLORIZE_* too: check the config alone
    (_, service), = ray_resources("RayService")
    return load_yaml(REPO / "serve" / "config.yaml"), yaml.safe_load(service["spec"]["serveConfigV2"]), service


def test_rayservice_serve_config_is_the_projects(serve_configs):
    project, cluster, _ = serve_configs
    ServeDeploySchema.model_validate(project)
    ServeDeploySchema.model_validate(cluster)
    differences = serve_differences(project, cluster)
    assert differences <= ALLOWED_SERVE_DIFFERENCES, f"not allowed to differ: {differences - ALLOWED_SERVE_DIFFERENCES}"
    assert "applications[colorize].args.model" in differences
    assert cluster["applications"][0]["args"]["model"].startswith(SHARED_MOUNT + "/")


def test_serve_comparison_catches_a_drift(serve_configs):
    project, cluster, _ = serve_configs
    drifted = copy.deepcopy(cluster)
    drifted["applications"][0]["args"]["dtype"] = "float16"
    assert serve_differences(project, drifted) - ALLOWED_SERVE_DIFFERENCES == {"applications[colorize].args.dtype"}


def test_rayservice_args_pass_the_apps_validation(serve_configs):
    from serve.app import AppOptions

    _, cluster, service = serve_configs
    app = cluster["applications"][0]
    assert app["import_path"] == "serve.app:build_app"
    module, _, attribute = app["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), attribute))
    options = AppOptions.from_args(app["args"])
    spec = service["spec"]["rayClusterConfig"]
    capacity = sum(g["maxReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
                   for g in spec["workerGroupSpecs"])
    assert options.max_replicas * options.num_gpus <= capacity, "max_replicas needs more GPUs than the groups have"
    assert spec.get("enableInTreeAutoscaling"), "Serve autoscaling needs Ray's autoscaler to add GPU nodes"
    with pytest.raises(ValueError):
        AppOptions.from_args({**app["args"], "dtype": "fp8"})
    with pytest.raises(ValueError):
        AppOptions.from_args({**app["args"], "reference_masker": "u2net"})
    with pytest.raises(ValueError):
        AppOptions.from_args({**app["args"], "compile": "all"})
    assert options.acceleration()["compile"] == "off"
    with pytest.raises(ValueError, match="channels_last parts must be among"):
        AppOptions.from_args({**app["args"], "channels_last": "unet,clip"}).acceleration()
    assert options.mask_models() == {"reference": None, "sketch": None}  # weight-free unless files are named
    missing = AppOptions.from_args({**app["args"], "sketch_masker_weights": "/nowhere/sketch-segment.safetensors"})
    with pytest.raises(ValueError, match="/nowhere/sketch-segment.safetensors do not exist"):
        missing.mask_models()
    env = {e["name"] for g in pod_groups(spec) for e in g["template"]["spec"]["containers"][0].get("env", [])}
    assert "COLORIZE_API_TOKEN" in env, "the API token comes from a Secret, never from the config"
    assert "api_token" not in app["args"]


# ================================================================================================ image
def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (CLUSTER / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def pinned_requirements() -> dict[str, Requirement]:
    pins = {}
    for line in (CLUSTER / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            assert str(requirement.specifier).startswith("==") and len(requirement.specifier) == 1, \
                f"not pinned: {line}"
            pins[canonicalize_name(requirement.name)] = requirement
    return pins


def pinned_version(requirement: Requirement) -> str:
    return next(iter(requirement.specifier)).version


def test_dockerfile_starts_from_ray_cuda_image_and_copies_no_code():
    instructions = dockerfile_instructions()
    base = next(arg for op, arg in instructions if op == "ARG" and arg.startswith("RAY_IMAGE="))
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert re.fullmatch(rf"RAY_IMAGE=rayproject/ray:{re.escape(ray.__version__)}-{python}-cu\d+", base)
    assert ("FROM", "${RAY_IMAGE}") in instructions
    copies = [arg for op, arg in instructions if op in ("COPY", "ADD")]
    assert copies == ["requirements.txt /tmp/colorize-xl/requirements.txt"], "the image must not hold the code"
    env = " ".join(arg for op, arg in instructions if op == "ENV")
    assert re.search(r"\bTORCH_CUDA_ARCH_LIST=9\.0(\s|$)", env), "DeepSpeed's op builder needs 9.0, not 9.0a"
    from serve.transport import PROXY_GRPC_ENV

    for name, value in PROXY_GRPC_ENV.items():  # every node's Ray (and so its Serve proxy) starts with it
        assert re.search(rf"\b{name}={value}(\s|$)", env), f"the image must set {name}={value}"
    run = " ".join(arg for op, arg in instructions if op == "RUN")
    assert "pip install -r /tmp/colorize-xl/requirements.txt" in run
    pins = pinned_requirements()
    for package in ("torch", "torchvision"):
        assert f"{package}=={pinned_version(pins[package])}" in run


def test_requirements_pin_every_project_dependency():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = pinned_requirements()
    for line in project:
        wanted = Requirement(line)
        name = canonicalize_name(wanted.name)
        assert name in pins, f"{wanted.name} of pyproject.toml is not pinned in cluster/requirements.txt"
        version = pinned_version(pins[name])
        assert wanted.specifier.contains(version, prereleases=True), f"{name}=={version} violates {wanted}"
        assert wanted.extras <= pins[name].extras, f"{name}: extras {wanted.extras} are not installed"
    assert pinned_version(pins["ray"]) == ray.__version__
