"""Static checks of the deployment files under infra/ (issue 8): nothing here builds an image or starts a
cluster; the files are parsed and cross-checked against the repository.

* Every YAML / compose / manifest file loads with ``yaml.safe_load_all``.
* KubeRay manifests (``ray.io/v1`` RayCluster, RayJob) are checked against the field list of the KubeRay
  CRD API reference (:data:`RAYCLUSTER_SPEC_FIELDS` and friends: unknown keys, types, replica bounds); no
  PyPI package publishes the KubeRay CRD schema. Their pod templates, ConfigMaps and Secrets are validated
  against the Kubernetes JSON schemas of ``kubernetes-validate`` when that package is installed (strict:
  unknown fields fail), else that one test skips.
* The Ray cluster launcher YAML is validated against ``ray-schema.json`` shipped in the ``ray`` package.
* Cross-checks: images named ``<registry>/drrfarm-<flavor>:<tag>`` have an ``infra/docker/Dockerfile.<flavor>``
  whose ``org.opencontainers.image.title`` label is ``drrfarm-<flavor>``; GPU worker groups request
  ``nvidia.com/gpu``; the RayJob entrypoint names a file in the repository and a spec in a mounted
  ConfigMap, which drrfarm's own spec loader accepts; every ``secretKeyRef`` / ``configMapKeyRef`` points
  at a key that the example Secret / ConfigMaps define; token auth and telemetry settings are the same on
  every Ray container; compose ports are published on 127.0.0.1 only.
* No secret literals: AWS key ids, and any secret-named key or variable whose value is not a placeholder
  (``REPLACE_ME``, the local-only ``drrfarm-local-dev-*`` keys, ``$VAR`` references, file paths).
* Dockerfiles: hadolint-style basics (pinned ``FROM`` tags, non-root final ``USER``, apt hygiene), the torch
  pin equal to the README's, no downloads at build time except the sample CT behind ``WITH_SAMPLE_CT``,
  and nothing they ``COPY`` excluded by ``.dockerignore``.
* docs/scaling.md names only infra files that exist and quotes the farm integration test's commands.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
DOCKER_DIR = INFRA / "docker"
KUBERAY_DIR = INFRA / "kuberay"
LAUNCHER_YAML = INFRA / "ray-cluster" / "aws-gpu.yaml"
COMPOSE_YAML = INFRA / "local" / "compose.yaml"
LOCAL_ENV = INFRA / "local" / "drrfarm.env"
SEAWEEDFS_S3_JSON = INFRA / "local" / "seaweedfs-s3.json"
DOCKERIGNORE = REPO / ".dockerignore"
SCALING_DOC = REPO / "docs" / "scaling.md"

YAML_FILES = sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))
DOCKERFILES = sorted(DOCKER_DIR.glob("Dockerfile.*"))

# --------------------------------------------------------------------------------------------------
# KubeRay CRD field list (ray.io/v1), from the KubeRay API reference. Unknown keys are typos: the operator
# would silently drop them.

RAYCLUSTER_SPEC_FIELDS = {
    "suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations", "enableInTreeAutoscaling",
    "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion", "workerGroupSpecs", "authOptions",
}
HEAD_GROUP_FIELDS = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
WORKER_GROUP_FIELDS = {
    "suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds", "rayStartParams",
    "template", "scaleStrategy", "numOfHosts",
}
AUTOSCALER_OPTIONS_FIELDS = {
    "resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds", "upscalingMode",
    "version", "env", "envFrom", "volumeMounts",
}
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML",
    "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
    "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "schedule",
}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
UPSCALING_MODES = {"Default", "Aggressive", "Conservative"}
SERVICE_TYPES = {"ClusterIP", "NodePort", "LoadBalancer"}

# what every Ray container must set to the same value (contract: quiet, offline, authenticated Ray)
RAY_ENV_LITERALS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "RAY_AUTH_MODE": "token",
}

# --------------------------------------------------------------------------------------------------
# secrets

AWS_KEY_ID_RE = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
SECRET_NAME_RE = re.compile(
    r"(?i)(password|passwd|secret_?access_?key|secret_?key|access_?key(_?id)?|auth_?token|api_?key|private_?key"
    r"|(^|_)token$)")
ASSIGNMENT_RE = re.compile(r"\b([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(\S+)")
PLACEHOLDER_RE = re.compile(
    r"^(REPLACE_ME[\w.-]*|<[^>]*>|drrfarm-local-dev-[a-z]+|\$\{?[A-Za-z_][A-Za-z0-9_]*\}?.*|\$\(.*)$")


def _is_placeholder(value: str) -> bool:
    """A value that cannot be a real credential: a REPLACE_ME / <...> placeholder, one of the local-only
    dev keys of infra/local, a shell variable reference or command substitution, or a file path."""
    v = value.strip().strip("\"'")
    return v == "" or bool(PLACEHOLDER_RE.match(v)) or v.startswith(("~/", "/"))


# --------------------------------------------------------------------------------------------------
# helpers


def load_docs(path: Path) -> list[Any]:
    with open(path, encoding="utf-8") as fh:
        return [d for d in yaml.safe_load_all(fh) if d is not None]


def kuberay_docs() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in sorted(KUBERAY_DIR.glob("*.yaml")) for d in load_docs(p)]


def docs_of_kind(kind: str) -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p, d in kuberay_docs() if d.get("kind") == kind]


def cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    """(where, RayClusterSpec) for every RayCluster and every RayJob's rayClusterSpec."""
    out = [(f"{p.name}:{d['metadata']['name']}", d["spec"]) for p, d in docs_of_kind("RayCluster")]
    out += [(f"{p.name}:{d['metadata']['name']}.rayClusterSpec", d["spec"]["rayClusterSpec"])
            for p, d in docs_of_kind("RayJob") if "rayClusterSpec" in d["spec"]]
    return out


def pod_templates() -> list[tuple[str, str, dict[str, Any]]]:
    """(where, role, pod template) with role "head", "worker" or "submitter"."""
    out = []
    for where, spec in cluster_specs():
        out.append((f"{where}.headGroupSpec", "head", spec["headGroupSpec"]["template"]))
        for g in spec.get("workerGroupSpecs", []):
            out.append((f"{where}.workerGroupSpecs[{g.get('groupName')}]", "worker", g["template"]))
    for p, d in docs_of_kind("RayJob"):
        if "submitterPodTemplate" in d["spec"]:
            out.append((f"{p.name}:{d['metadata']['name']}.submitterPodTemplate", "submitter",
                        d["spec"]["submitterPodTemplate"]))
    return out


def env_map(env: list[dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in env or []}


def walk(node: Any, path: str = "") -> Iterator[tuple[str, Any, Any]]:
    """Yield (path, key, value) for every mapping entry and (path, None, item) for scalar list items."""
    if isinstance(node, dict):
        for k, v in node.items():
            p = f"{path}.{k}" if path else str(k)
            yield p, k, v
            yield from walk(v, p)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            p = f"{path}[{i}]"
            if not isinstance(v, (dict, list)):
                yield p, None, v
            yield from walk(v, p)


def readme_torch_version() -> str:
    m = re.search(r"pip install torch==([0-9][\w.]*)", (REPO / "README.md").read_text(encoding="utf-8"))
    assert m, "README.md no longer shows `pip install torch==<version>`"
    return m.group(1)


def constraint_pin(name: str) -> str:
    text = (DOCKER_DIR / "constraints.txt").read_text(encoding="utf-8")
    m = re.search(rf"(?m)^{re.escape(name)}==(\S+)$", text)
    assert m, f"infra/docker/constraints.txt does not pin {name}"
    return m.group(1)


def parse_env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


# ---------------------------------------------------------------------------------------------- Dockerfiles


class Dockerfile:
    """Instructions of a Dockerfile: ``(stage, INSTRUCTION, arguments)`` with line continuations joined."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.instructions: list[tuple[int, str, str]] = []
        self.arg_defaults: dict[str, str] = {}
        stage = -1
        buf = ""
        for raw in path.read_text(encoding="utf-8").splitlines():
            line = raw.strip()
            if not buf and (not line or line.startswith("#")):
                continue
            if line.startswith("#"):
                continue  # comment inside a continued instruction
            if line.endswith("\\"):
                buf += line[:-1] + " "
                continue
            full = (buf + line).strip()
            buf = ""
            instr, _, args = full.partition(" ")
            instr = instr.upper()
            if instr == "FROM":
                stage += 1
            if instr == "ARG" and "=" in args:
                k, _, v = args.strip().partition("=")
                self.arg_defaults.setdefault(k, v.strip("\"'"))
            self.instructions.append((stage, instr, args.strip()))
        self.n_stages = stage + 1

    def expand(self, text: str) -> str:
        return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: self.arg_defaults.get(m.group(1), m.group(0)),
                      text)

    def of(self, instr: str, stage: int | None = None) -> list[str]:
        return [a for s, i, a in self.instructions if i == instr and (stage is None or s == stage)]

    @property
    def stage_names(self) -> set[str]:
        names = set()
        for args in self.of("FROM"):
            parts = args.split()
            if len(parts) >= 3 and parts[-2].upper() == "AS":
                names.add(parts[-1])
        return names

    def labels(self) -> dict[str, str]:
        out = {}
        for args in self.of("LABEL", self.n_stages - 1):
            for k, v in re.findall(r"([\w.-]+)=(\"[^\"]*\"|\S+)", args):
                out[k] = v.strip('"')
        return out


def dockerfile_for_image(image: str) -> Path | None:
    """The Dockerfile an image reference is built from, by the naming scheme ``.../drrfarm-<flavor>:<tag>``
    -> ``infra/docker/Dockerfile.<flavor>``; None for images that are not drrfarm's."""
    name = image.split("@")[0].rsplit("/", 1)[-1].split(":")[0]
    if not name.startswith("drrfarm-"):
        return None
    return DOCKER_DIR / f"Dockerfile.{name[len('drrfarm-'):]}"


def image_tag(image: str) -> str | None:
    last = image.split("@")[0].rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


def dockerignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore matching: anchored at the context root, ``*`` within a path segment, ``**``
    across segments; a match on a directory excludes everything below it."""
    pat = pattern.strip("/")
    out, i = "", 0
    while i < len(pat):
        if pat.startswith("**/", i):
            out, i = out + "(?:[^/]+/)*", i + 3
        elif pat.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pat[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pat[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pat[i]), i + 1
    return re.compile(out + "(?:/.*)?")


def dockerignored(rel: str, patterns: list[str] | None = None) -> bool:
    excluded = False
    for pat in patterns if patterns is not None else dockerignore_patterns():
        neg = pat.startswith("!")
        if _dockerignore_regex(pat[1:] if neg else pat).fullmatch(rel.strip("/")):
            excluded = not neg
    return excluded


# ================================================================================================== tests
# -------------------------------------------------------------------------------------------- all YAML


def test_infra_files_exist() -> None:
    for rel in ("docker/Dockerfile.gpu", "docker/Dockerfile.cpu", "docker/constraints.txt", "kuberay/raycluster.yaml",
                "kuberay/rayjob.yaml", "kuberay/configmap-spec.yaml", "kuberay/configmap-settings.yaml",
                "kuberay/secret.example.yaml", "ray-cluster/aws-gpu.yaml", "local/compose.yaml",
                "local/drrfarm.env", "local/seaweedfs-s3.json"):
        assert (INFRA / rel).is_file(), f"infra/{rel} is missing"
    assert DOCKERIGNORE.is_file() and SCALING_DOC.is_file()


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_yaml_loads(path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{path}: no YAML documents"
    for i, d in enumerate(docs):
        assert isinstance(d, dict), f"{path}: document {i} is a {type(d).__name__}, not a mapping"


def test_kuberay_documents_are_known_kinds() -> None:
    allowed = {("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob"), ("v1", "ConfigMap"), ("v1", "Secret")}
    for path, d in kuberay_docs():
        assert (d.get("apiVersion"), d.get("kind")) in allowed, f"{path.name}: {d.get('apiVersion')} {d.get('kind')}"
        assert d.get("metadata", {}).get("name"), f"{path.name}: {d['kind']} has no metadata.name"
    assert docs_of_kind("RayCluster") and docs_of_kind("RayJob")


# ------------------------------------------------------------------------------- KubeRay CRD field list


def _check_keys(obj: Any, allowed: set[str], where: str, problems: list[str]) -> None:
    if not isinstance(obj, dict):
        problems.append(f"{where}: expected a mapping")
        return
    problems += [f"{where}.{k}: not a field of the KubeRay CRD" for k in sorted(set(obj) - allowed)]


def _check_int(value: Any, where: str, problems: list[str], lo: int = 0) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        problems.append(f"{where}: expected an integer >= {lo}, got {value!r}")


def _check_ray_start_params(params: Any, where: str, problems: list[str]) -> None:
    if not isinstance(params, dict):
        problems.append(f"{where}: rayStartParams must be a mapping (may be empty)")
        return
    for k, v in params.items():
        if not isinstance(v, str):  # CRD type: map[string]string
            problems.append(f"{where}.rayStartParams.{k}: must be a string (quote it), got {v!r}")


def _check_pod_template(tmpl: Any, where: str, problems: list[str]) -> None:
    containers = (tmpl or {}).get("spec", {}).get("containers")
    if not containers:
        problems.append(f"{where}.template.spec.containers: missing")
        return
    for c in containers:
        if not c.get("name") or not c.get("image"):
            problems.append(f"{where}: every container needs a name and an image")


def validate_raycluster_spec(spec: dict[str, Any], where: str) -> list[str]:
    problems: list[str] = []
    _check_keys(spec, RAYCLUSTER_SPEC_FIELDS, where, problems)
    if not isinstance(spec.get("rayVersion"), str):
        problems.append(f"{where}.rayVersion: set it (a quoted string) so KubeRay picks matching commands")
    if not isinstance(spec.get("enableInTreeAutoscaling", False), bool):
        problems.append(f"{where}.enableInTreeAutoscaling: must be a boolean")
    if "autoscalerOptions" in spec:
        ao = spec["autoscalerOptions"]
        _check_keys(ao, AUTOSCALER_OPTIONS_FIELDS, f"{where}.autoscalerOptions", problems)
        if ao.get("upscalingMode", "Default") not in UPSCALING_MODES:
            problems.append(f"{where}.autoscalerOptions.upscalingMode: one of {sorted(UPSCALING_MODES)}")
        if "idleTimeoutSeconds" in ao:
            _check_int(ao["idleTimeoutSeconds"], f"{where}.autoscalerOptions.idleTimeoutSeconds", problems)
    head = spec.get("headGroupSpec")
    if head is None:
        problems.append(f"{where}.headGroupSpec: missing")
    else:
        _check_keys(head, HEAD_GROUP_FIELDS, f"{where}.headGroupSpec", problems)
        _check_ray_start_params(head.get("rayStartParams", {}), f"{where}.headGroupSpec", problems)
        if head.get("serviceType", "ClusterIP") not in SERVICE_TYPES:
            problems.append(f"{where}.headGroupSpec.serviceType: one of {sorted(SERVICE_TYPES)}")
        _check_pod_template(head.get("template"), f"{where}.headGroupSpec", problems)
    groups = spec.get("workerGroupSpecs", [])
    if not isinstance(groups, list):
        problems.append(f"{where}.workerGroupSpecs: must be a list")
        groups = []
    names = [g.get("groupName") for g in groups]
    if len(set(names)) != len(names):
        problems.append(f"{where}.workerGroupSpecs: duplicate groupName")
    for i, g in enumerate(groups):
        gw = f"{where}.workerGroupSpecs[{i}]"
        _check_keys(g, WORKER_GROUP_FIELDS, gw, problems)
        if not isinstance(g.get("groupName"), str) or not g.get("groupName"):
            problems.append(f"{gw}.groupName: required")
        for k in ("replicas", "minReplicas", "maxReplicas"):
            if k in g:
                _check_int(g[k], f"{gw}.{k}", problems)
        lo, n, hi = g.get("minReplicas", 0), g.get("replicas", 0), g.get("maxReplicas", 2**31 - 1)
        if all(isinstance(x, int) for x in (lo, n, hi)) and not lo <= n <= hi:
            problems.append(f"{gw}: needs minReplicas <= replicas <= maxReplicas, got {lo} <= {n} <= {hi}")
        _check_ray_start_params(g.get("rayStartParams", {}), gw, problems)
        _check_pod_template(g.get("template"), gw, problems)
    return problems


def validate_rayjob_spec(spec: dict[str, Any], where: str) -> list[str]:
    problems: list[str] = []
    _check_keys(spec, RAYJOB_SPEC_FIELDS, where, problems)
    if not isinstance(spec.get("entrypoint"), str) or not spec["entrypoint"].strip():
        problems.append(f"{where}.entrypoint: required")
    if ("rayClusterSpec" in spec) == ("clusterSelector" in spec):
        problems.append(f"{where}: give exactly one of rayClusterSpec or clusterSelector")
    if "rayClusterSpec" in spec:
        problems += validate_raycluster_spec(spec["rayClusterSpec"], f"{where}.rayClusterSpec")
    if "clusterSelector" in spec and not isinstance(spec["clusterSelector"], dict):
        problems.append(f"{where}.clusterSelector: must be a mapping of labels")
    for k in ("shutdownAfterJobFinishes", "suspend"):
        if k in spec and not isinstance(spec[k], bool):
            problems.append(f"{where}.{k}: must be a boolean")
    for k in ("ttlSecondsAfterFinished", "activeDeadlineSeconds", "backoffLimit"):
        if k in spec:
            _check_int(spec[k], f"{where}.{k}", problems)
    if spec.get("submissionMode", "K8sJobMode") not in SUBMISSION_MODES:
        problems.append(f"{where}.submissionMode: one of {sorted(SUBMISSION_MODES)}")
    if "submitterPodTemplate" in spec:
        _check_pod_template(spec["submitterPodTemplate"], f"{where}.submitterPodTemplate", problems)
    if spec.get("ttlSecondsAfterFinished") and not spec.get("shutdownAfterJobFinishes"):
        problems.append(f"{where}.ttlSecondsAfterFinished: only used with shutdownAfterJobFinishes: true")
    return problems


def test_rayclusters_match_crd_field_list() -> None:
    for path, d in docs_of_kind("RayCluster"):
        assert validate_raycluster_spec(d["spec"], f"{path.name}:spec") == []


def test_rayjobs_match_crd_field_list() -> None:
    for path, d in docs_of_kind("RayJob"):
        assert validate_rayjob_spec(d["spec"], f"{path.name}:spec") == []
        assert d["spec"].get("shutdownAfterJobFinishes") is True, "the RayJob should delete its cluster when done"


def test_field_list_validator_catches_mistakes() -> None:
    """The hand-written validator is only worth something if it rejects what the operator would drop."""
    _, good = docs_of_kind("RayCluster")[0]
    bad = yaml.safe_load(yaml.safe_dump(good["spec"]))
    bad["workerGroupSpec"] = bad.pop("workerGroupSpecs")  # typo: silently ignored by the operator
    bad["headGroupSpec"]["rayStartParams"]["num-gpus"] = 0  # not a string
    problems = validate_raycluster_spec(bad, "bad")
    assert any("workerGroupSpec:" in p for p in problems)
    assert any("num-gpus" in p for p in problems)
    bad = yaml.safe_load(yaml.safe_dump(good["spec"]))
    bad["workerGroupSpecs"][0].update(minReplicas=3, replicas=1)
    assert any("minReplicas <= replicas" in p for p in validate_raycluster_spec(bad, "bad"))
    assert validate_rayjob_spec({"entrypoint": "python x.py"}, "job")  # no cluster at all


def test_kubernetes_schemas_of_pod_templates_configmaps_secrets() -> None:
    """Strict Kubernetes JSON-schema validation of everything that is plain Kubernetes: the pod templates
    inside the Ray CRs (wrapped as core/v1 PodTemplate objects), ConfigMaps and Secrets."""
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate to run this check")
    version = "1.33"
    for _where, _role, tmpl in pod_templates():
        kv.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": tmpl},
                    version, strict=True)
    for _path, d in kuberay_docs():
        if d["kind"] in ("ConfigMap", "Secret"):
            kv.validate(d, version, strict=True)


# ----------------------------------------------------------------------------- KubeRay cross-checks


def test_gpu_worker_groups_request_one_gpu_per_pod() -> None:
    for where, spec in cluster_specs():
        gpu_groups = []
        for g in spec["workerGroupSpecs"]:
            for c in g["template"]["spec"]["containers"]:
                limits = c.get("resources", {}).get("limits", {})
                if "nvidia.com/gpu" in limits:
                    assert int(limits["nvidia.com/gpu"]) == 1, f"{where}/{g['groupName']}: one GPU per pod"
                    requests = c.get("resources", {}).get("requests", {})
                    assert int(requests.get("nvidia.com/gpu", 1)) == 1, f"{where}: GPU requests must equal limits"
                    assert dockerfile_for_image(c["image"]) == DOCKER_DIR / "Dockerfile.gpu", (
                        f"{where}/{g['groupName']}: a GPU pod needs the drrfarm-gpu image, not {c['image']}")
                    gpu_groups.append(g)
        assert gpu_groups, f"{where}: no worker group requests nvidia.com/gpu"
        assert any(g.get("maxReplicas", 0) >= 1 for g in gpu_groups), f"{where}: GPU group cannot scale above 0"
        head = spec["headGroupSpec"]
        assert head["rayStartParams"].get("num-gpus") == "0", f"{where}: the head should advertise no GPUs"


def test_ray_version_matches_the_images() -> None:
    pinned = constraint_pin("ray")
    for where, spec in cluster_specs():
        assert spec["rayVersion"] == pinned, f"{where}: rayVersion {spec['rayVersion']} != ray=={pinned} in images"


def test_every_ray_container_has_token_auth_and_no_telemetry() -> None:
    for where, role, tmpl in pod_templates():
        for c in tmpl["spec"]["containers"]:
            env = env_map(c.get("env"))
            for name, value in RAY_ENV_LITERALS.items():
                assert env.get(name, {}).get("value") == value, f"{where}/{c['name']}: needs {name}={value}"
            tok = env.get("RAY_AUTH_TOKEN", {})
            assert "secretKeyRef" in tok.get("valueFrom", {}), f"{where}/{c['name']}: RAY_AUTH_TOKEN from a Secret"
            if role in ("head", "worker"):
                for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                    if name in env:
                        assert "secretKeyRef" in env[name].get("valueFrom", {}), f"{where}: {name} from a Secret"
                uri = env.get("MLFLOW_TRACKING_URI", {})
                assert "configMapKeyRef" in uri.get("valueFrom", {}), f"{where}: MLFLOW_TRACKING_URI from a ConfigMap"
    for where, spec in cluster_specs():
        if spec.get("enableInTreeAutoscaling"):
            env = env_map(spec.get("autoscalerOptions", {}).get("env"))
            assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{where}: the autoscaler needs the token"
            assert "secretKeyRef" in env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}), where


def test_secret_and_configmap_references_resolve() -> None:
    secrets = {d["metadata"]["name"]: set(d.get("stringData", {})) | set(d.get("data", {}))
               for _, d in docs_of_kind("Secret")}
    configmaps = {d["metadata"]["name"]: set(d.get("data", {})) for _, d in docs_of_kind("ConfigMap")}
    for path, d in kuberay_docs():
        for where, key, value in walk(d):
            if key == "secretKeyRef":
                assert value["key"] in secrets.get(value["name"], set()), (
                    f"{path.name}:{where}: Secret {value['name']}/{value['key']} is not in secret.example.yaml")
            elif key == "configMapKeyRef":
                assert value["key"] in configmaps.get(value["name"], set()), (
                    f"{path.name}:{where}: ConfigMap {value['name']}/{value['key']} is not defined")
            elif key == "configMap" and isinstance(value, dict) and "name" in value:
                assert value["name"] in configmaps, f"{path.name}:{where}: ConfigMap {value['name']} is not defined"


def test_env_vars_named_like_secrets_come_from_secrets() -> None:
    for path, d in kuberay_docs():
        for where, key, value in walk(d):
            if key == "env" and isinstance(value, list):
                for e in value:
                    if SECRET_NAME_RE.search(e["name"]):
                        assert "value" not in e, f"{path.name}:{where}: {e['name']} is an inline literal"
                        assert "secretKeyRef" in e.get("valueFrom", {}), f"{path.name}:{where}: {e['name']}"


def _mounted_configmap(head_template: dict[str, Any], mount_dir: str) -> str | None:
    volumes = {v["name"]: v for v in head_template["spec"].get("volumes", [])}
    for c in head_template["spec"]["containers"]:
        for m in c.get("volumeMounts", []):
            if m["mountPath"].rstrip("/") == mount_dir.rstrip("/") and "configMap" in volumes.get(m["name"], {}):
                return volumes[m["name"]]["configMap"]["name"]
    return None


def test_rayjob_entrypoint_runs_a_repo_file_on_a_mounted_spec() -> None:
    configmaps = {d["metadata"]["name"]: d for _, d in docs_of_kind("ConfigMap")}
    workdirs = {Dockerfile(p).of("WORKDIR")[-1] for p in DOCKERFILES}
    for path, d in docs_of_kind("RayJob"):
        argv = shlex.split(d["spec"]["entrypoint"])
        assert argv[0] in ("python", "python3"), argv
        script = REPO / argv[1]
        assert script.is_file(), f"{path.name}: entrypoint names {argv[1]}, which is not in the repository"
        spec_path = Path(argv[2])
        assert spec_path.is_absolute(), f"{path.name}: the spec should come from the mounted ConfigMap"
        cluster = d["spec"]["rayClusterSpec"]
        head = cluster["headGroupSpec"]["template"]
        cm_name = _mounted_configmap(head, str(spec_path.parent))
        assert cm_name in configmaps, f"{path.name}: no ConfigMap is mounted at {spec_path.parent} in the head"
        assert spec_path.name in configmaps[cm_name]["data"], f"{cm_name} has no key {spec_path.name}"
        # the relative script path resolves against the head container's working directory, which is where
        # the images put jobs/
        workdir = head["spec"]["containers"][0].get("workingDir")
        assert workdir in workdirs, f"{path.name}: head workingDir {workdir} is not the images' WORKDIR {workdirs}"


def _spec_from_configmap(name: str, key: str) -> Any:
    pytest.importorskip("drrfarm.farm.spec", reason="drrfarm.farm.spec is not importable")
    from drrfarm.farm.spec import parse_spec

    cm = {d["metadata"]["name"]: d for _, d in docs_of_kind("ConfigMap")}[name]
    return parse_spec(yaml.safe_load(cm["data"][key]), source=f"ConfigMap {name}/{key}")


def test_spec_configmap_validates_with_drrfarms_loader() -> None:
    for path, d in docs_of_kind("RayJob"):
        spec_path = Path(shlex.split(d["spec"]["entrypoint"])[2])
        cluster = d["spec"]["rayClusterSpec"]
        cm_name = _mounted_configmap(cluster["headGroupSpec"]["template"], str(spec_path.parent))
        spec = _spec_from_configmap(cm_name, spec_path.name)
        try:
            from drrfarm.farm.plan import make_plan
        except ImportError:
            pass
        else:
            assert make_plan(spec).counts()["images"] > 0
        assert spec.output.url.startswith("s3://"), "a cluster sweep must write to shared storage"
        # consistency with the cluster it runs on
        gpus_max = sum(g["maxReplicas"] for g in cluster["workerGroupSpecs"]
                       for c in g["template"]["spec"]["containers"]
                       if "nvidia.com/gpu" in c.get("resources", {}).get("limits", {}))
        if spec.backend == "cuda":  # GPU workers scale from zero only when the driver asks for them
            assert spec.farm.max_actors or any(g.get("minReplicas", 0) >= 1 for g in cluster["workerGroupSpecs"]), (
                f"{path.name}: with no GPU worker up and no farm.max_actors nothing asks the autoscaler for GPUs")
        for n in (spec.farm.actors, spec.farm.max_actors):
            if n is not None and spec.backend != "cpu":
                assert n <= gpus_max, f"{path.name}: more render actors than GPUs the cluster can have"


def test_secret_example_holds_only_placeholders() -> None:
    import base64

    for path, d in docs_of_kind("Secret"):
        assert path.name.endswith(".example.yaml"), f"{path.name}: Secrets belong in *.example.yaml files only"
        values = dict(d.get("stringData", {}))
        values.update({k: base64.b64decode(v).decode() for k, v in d.get("data", {}).items()})
        assert values
        for k, v in values.items():
            assert str(v).startswith("REPLACE_ME"), f"{path.name}: {d['metadata']['name']}.{k} is not a placeholder"


# --------------------------------------------------------------------------------------- image references


def all_image_references() -> list[tuple[str, str]]:
    refs = [(where, c["image"]) for where, _, t in pod_templates() for c in t["spec"]["containers"]]
    launcher = load_docs(LAUNCHER_YAML)[0]
    docker = launcher.get("docker", {})
    refs += [(f"aws-gpu.yaml:docker.{k}", docker[k]) for k in ("image", "head_image", "worker_image") if k in docker]
    for name, nt in launcher.get("available_node_types", {}).items():
        if "worker_image" in nt.get("docker", {}):
            refs.append((f"aws-gpu.yaml:{name}", nt["docker"]["worker_image"]))
    compose = load_docs(COMPOSE_YAML)[0]
    refs += [(f"compose.yaml:{name}", s["image"]) for name, s in compose["services"].items() if "image" in s]
    return refs


def test_images_are_pinned_and_drrfarm_images_have_dockerfiles() -> None:
    refs = all_image_references()
    assert any(dockerfile_for_image(img) for _, img in refs)
    for where, image in refs:
        tag = image_tag(image)
        assert (tag and tag != "latest") or "@sha256:" in image, f"{where}: pin {image} to a version tag"
        dockerfile = dockerfile_for_image(image)
        if dockerfile is not None:
            assert dockerfile.is_file(), f"{where}: {image} has no {dockerfile.relative_to(REPO)}"
            title = Dockerfile(dockerfile).labels().get("org.opencontainers.image.title")
            assert title == image.split("@")[0].rsplit("/", 1)[-1].split(":")[0], (
                f"{dockerfile.name}: org.opencontainers.image.title {title!r} does not name {image}")


# ------------------------------------------------------------------------------------------ Dockerfiles


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_basics(path: Path) -> None:
    df = Dockerfile(path)
    assert df.n_stages >= 1
    for args in df.of("FROM"):
        image = df.expand(args.split()[0]) if not args.startswith("--") else df.expand(args.split()[1])
        if image in df.stage_names:
            continue
        tag = image_tag(image)
        assert tag and tag != "latest", f"{path.name}: FROM {image} is not pinned to a tag"
    final = df.n_stages - 1
    users = df.of("USER", final)
    assert users, f"{path.name}: the final stage never switches to a non-root USER"
    assert users[-1].split(":")[0] not in ("root", "0"), f"{path.name}: final USER is root"
    assert df.of("WORKDIR", final), f"{path.name}: set a WORKDIR"
    assert not [a for a in df.of("ADD") if re.search(r"https?://", a)], f"{path.name}: ADD <url> downloads"
    # KubeRay's default probes exec `bash -c "wget ... | grep success"` inside the Ray container
    assert any(re.search(r"apt-get install[^&]*\bwget\b", r) for r in df.of("RUN", final)), (
        f"{path.name}: install wget in the final stage (KubeRay's health probes use it)")
    for run in df.of("RUN"):
        if "apt-get install" in run:
            assert "--no-install-recommends" in run and "-y" in run, f"{path.name}: {run[:60]}"
            assert "rm -rf /var/lib/apt/lists" in run, f"{path.name}: clean the apt lists in the same RUN"
        assert not re.search(r"\b(curl|wget)\b[^&|;]*https?://|\bgit clone\b|\baws s3 (cp|sync)\b|\bgsutil\b"
                             r"|huggingface-cli download|\bhf download\b", run), (
            f"{path.name}: no downloads at build time: {run[:80]}")
        assert "apt-get upgrade" not in run and "sudo " not in run


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_torch_pin_and_install_order(path: Path) -> None:
    df = Dockerfile(path)
    assert df.arg_defaults.get("TORCH_VERSION") == readme_torch_version(), (
        f"{path.name}: TORCH_VERSION must equal the README's torch pin")
    assert constraint_pin("torch") == readme_torch_version()
    runs = df.of("RUN")
    torch_at = next(i for i, r in enumerate(runs) if "torch==${TORCH_VERSION}" in r)
    drrfarm_at = next(i for i, r in enumerate(runs) if re.search(r"pip install .*/src", r))
    assert torch_at < drrfarm_at, f"{path.name}: install the pinned torch before drrfarm"
    assert "--constraint" in runs[drrfarm_at], f"{path.name}: install drrfarm with infra/docker/constraints.txt"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_sample_ct_only_behind_build_arg(path: Path) -> None:
    df = Dockerfile(path)
    assert df.arg_defaults.get("WITH_SAMPLE_CT") == "0", f"{path.name}: ARG WITH_SAMPLE_CT=0 (off by default)"
    for run in df.of("RUN"):
        if "samples" in run or "chest_ct" in run:
            assert re.search(r'if \[ "\$\{?WITH_SAMPLE_CT\}?" = "1" \]', run), f"{path.name}: {run[:80]}"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_exist_and_are_not_dockerignored(path: Path) -> None:
    df = Dockerfile(path)
    patterns = dockerignore_patterns()
    copied = []
    for args in df.of("COPY"):
        parts = [p for p in args.split() if not p.startswith("--")]
        if re.search(r"--from=", args):
            continue
        for src in parts[:-1]:
            assert (REPO / src).exists(), f"{path.name}: COPY {src}: not in the repository"
            assert not dockerignored(src, patterns), f"{path.name}: COPY {src}, but .dockerignore excludes it"
            copied.append(src)
    assert "jobs" in copied, f"{path.name}: the images need jobs/ (RayJob entrypoint jobs/sweep.py)"
    workdir = df.of("WORKDIR")[-1]
    assert any(a.split()[-1].rstrip("/") == f"{workdir}/jobs" for a in df.of("COPY") if "jobs" in a.split()), (
        f"{path.name}: copy jobs/ into the WORKDIR so `python jobs/sweep.py` resolves")


def test_gpu_dockerfile_builds_pycuda_and_the_kernels() -> None:
    df = Dockerfile(DOCKER_DIR / "Dockerfile.gpu")
    froms = [df.expand(a.split()[0]) for a in df.of("FROM")]
    assert froms[0].startswith("nvidia/cuda:") and "-devel-" in froms[0], froms
    assert froms[-1].startswith("nvidia/cuda:") and "-runtime-" in froms[-1], froms
    cuda = {f.split(":")[1].split("-")[0] for f in froms}
    assert len(cuda) == 1, f"build and runtime stages use different CUDA versions: {cuda}"
    runs = " ".join(df.of("RUN"))
    assert "[cuda]" in runs, "install drrfarm with the cuda extra (pycuda)"
    assert "drrfarm.gpu.build --fatbin" in runs, "compile the kernels into the image"
    cpu = Dockerfile(DOCKER_DIR / "Dockerfile.cpu")
    assert "whl/cpu" in cpu.arg_defaults.get("TORCH_INDEX_URL", ""), "the CPU image must use the CPU torch build"


def test_dockerignore_keeps_local_state_out() -> None:
    patterns = dockerignore_patterns()
    for rel in (".git", ".venv", ".venv-ci/bin/python", "drrfarm-demo/manifest.json", "tests/test_infra.py",
                "drrfarm/__pycache__/x.pyc", ".pytest_cache", ".ruff_cache", "mlruns/0", "drrfarm.egg-info",
                "infra/local/drrfarm.env", "infra/kuberay/secret.example.yaml", "x/.env"):
        assert dockerignored(rel, patterns), f".dockerignore lets {rel} into the build context"
    for rel in ("pyproject.toml", "README.md", "drrfarm/volume.py", "drrfarm/render/kernels/drr.cu",
                "jobs/sweep.py", "infra/docker/constraints.txt"):
        assert not dockerignored(rel, patterns), f".dockerignore excludes {rel}, which the images need"


# ------------------------------------------------------------------------------------- Ray cluster launcher


def test_launcher_yaml_matches_rays_schema() -> None:
    ray = pytest.importorskip("ray", reason="ray is not installed")
    jsonschema = pytest.importorskip("jsonschema")
    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    if not schema_path.is_file():
        pytest.skip(f"{schema_path} not shipped with this ray")
    config = load_docs(LAUNCHER_YAML)[0]
    jsonschema.validate(config, json.loads(schema_path.read_text(encoding="utf-8")))


def test_launcher_gpu_workers_iam_and_auth() -> None:
    config = load_docs(LAUNCHER_YAML)[0]
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    gpu_types = [n for n, t in types.items() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types, "no GPU worker node type"
    for name in gpu_types:
        itype = types[name]["node_config"]["InstanceType"]
        assert re.match(r"^(g4dn|g5|g6|g6e|p3|p4d|p4de|p5|p5e)\.", itype), f"{name}: {itype} is not a GPU type"
        assert types[name]["max_workers"] >= types[name].get("min_workers", 0)
    assert any(types[n]["max_workers"] >= 1 for n in gpu_types)
    for name, t in types.items():
        # S3 access through the instance role: a profile on every node, never keys in the config
        assert t["node_config"].get("IamInstanceProfile", {}).get("Arn"), f"{name}: no IAM instance profile"
    text = LAUNCHER_YAML.read_text(encoding="utf-8")
    assert not re.search(r"(?i)aws_(access_key_id|secret_access_key)", text), "no AWS keys in the launcher config"
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    start = " ".join(config["head_start_ray_commands"])
    assert "--num-gpus=0" in start and "--head" in start
    run_options = " ".join(config["docker"].get("run_options", []))
    for name, value in RAY_ENV_LITERALS.items():
        assert f"{name}={value}" in run_options, f"docker.run_options: --env {name}={value}"
    assert config["setup_commands"] or config["worker_setup_commands"]
    # drrfarm images, the GPU one on workers
    assert dockerfile_for_image(config["docker"]["worker_image"]) == DOCKER_DIR / "Dockerfile.gpu"


# ------------------------------------------------------------------------------------- local compose stack


def _published_ports(service: dict[str, Any]) -> list[tuple[str | None, str, str]]:
    out = []
    for p in service.get("ports", []):
        if isinstance(p, dict):
            out.append((p.get("host_ip"), str(p.get("published")), str(p.get("target"))))
        else:
            parts = str(p).split(":")
            if len(parts) == 3:
                out.append((parts[0], parts[1], parts[2]))
            else:
                out.append((None, parts[0], parts[-1]))
    return out


def test_compose_ports_bound_to_localhost() -> None:
    compose = load_docs(COMPOSE_YAML)[0]
    published = 0
    for name, service in compose["services"].items():
        assert "network_mode" not in service or service["network_mode"] != "host", f"{name}: host networking"
        for host_ip, _, _ in _published_ports(service):
            assert host_ip == "127.0.0.1", f"{name}: publish ports on 127.0.0.1 only"
            published += 1
    assert published >= 2


def test_local_env_points_drrfarm_at_the_compose_stack() -> None:
    compose = load_docs(COMPOSE_YAML)[0]
    services = compose["services"]
    env = parse_env_file(LOCAL_ENV)
    ports = {name: {t: h for _, h, t in _published_ports(s)} for name, s in services.items()}
    store = next(n for n, s in services.items() if "seaweedfs" in s["image"] or "minio" in s["image"])
    mlflow = next(n for n, s in services.items() if "mlflow" in s["image"])
    s3_port = next(iter(ports[store].values()))
    assert env["AWS_ENDPOINT_URL"] == f"http://127.0.0.1:{s3_port}"
    mlflow_port = next(iter(ports[mlflow].values()))
    assert env["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{mlflow_port}"
    assert f"--port {mlflow_port}" in services[mlflow]["command"] or mlflow_port in ports[mlflow]
    for name, value in RAY_ENV_LITERALS.items():
        if name != "RAY_AUTH_MODE":
            assert env.get(name) == value, f"drrfarm.env: {name}={value}"
    # the dev keys are obvious placeholders and match the store's identity file
    assert env["AWS_ACCESS_KEY_ID"].startswith("drrfarm-local-dev-")
    assert env["AWS_SECRET_ACCESS_KEY"].startswith("drrfarm-local-dev-")
    identities = json.loads(SEAWEEDFS_S3_JSON.read_text(encoding="utf-8"))["identities"]
    creds = {(c["accessKey"], c["secretKey"]) for i in identities for c in i.get("credentials", [])}
    assert creds == {(env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"])}
    # a one-shot service creates the bucket once the store is healthy
    init = [s for s in services.values() if "mb s3://" in json.dumps(s.get("command", ""))]
    assert init, "no bucket-creation service"
    assert store in init[0].get("depends_on", {}), "the bucket-creation service must wait for the store"
    mlflow_cmd = services[mlflow]["command"]
    assert "sqlite:" in mlflow_cmd, "MLflow: SQLite backend store"
    assert "--artifacts-destination" in mlflow_cmd or "--default-artifact-root" in mlflow_cmd


# ------------------------------------------------------------------------------------------------ secrets


def _scanned_files() -> list[Path]:
    files = [p for p in INFRA.rglob("*") if p.is_file()] + [DOCKERIGNORE, SCALING_DOC]
    return sorted(p for p in files if p.exists())


def secret_literals_in_text(text: str) -> list[str]:
    """Findings in free text: AWS key ids and ``NAME=value`` / ``name: value`` assignments of secret-named
    keys whose value is not a placeholder."""
    found = [f"AWS key id {m.group(0)}" for m in AWS_KEY_ID_RE.finditer(text)]
    for m in ASSIGNMENT_RE.finditer(text):
        if SECRET_NAME_RE.search(m.group(1)) and not _is_placeholder(m.group(2)):
            found.append(f"{m.group(1)}={m.group(2)}")
    for m in re.finditer(r"(?im)^\s*[\"']?([A-Za-z_][\w-]*)[\"']?\s*:\s*[\"']?([^\s\"'#{\[]+)", text):
        if SECRET_NAME_RE.search(m.group(1)) and not _is_placeholder(m.group(2)):
            found.append(f"{m.group(1)}: {m.group(2)}")
    return found


def secret_literals_in_data(data: Any) -> list[str]:
    found = []
    for where, key, value in walk(data):
        if (isinstance(key, str) and SECRET_NAME_RE.search(key) and isinstance(value, (str, int))
                and not _is_placeholder(str(value))):
            found.append(f"{where}: {value}")
        if isinstance(value, str):
            found += [f"{where}: {f}" for f in secret_literals_in_text(value)]
    return found


@pytest.mark.parametrize("path", _scanned_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_secret_literals(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    found = secret_literals_in_text(text)
    if path.suffix in (".yaml", ".yml"):
        for d in load_docs(path):
            found += secret_literals_in_data(d)
    elif path.suffix == ".json":
        found += secret_literals_in_data(json.loads(text))
    assert not found, f"{path.relative_to(REPO)}: secret literals: {found}"


def test_secret_scanner_catches_literals() -> None:
    fake_id = "AKIA" + "Q" * 16
    assert secret_literals_in_text(f"AWS_ACCESS_KEY_ID={fake_id}")
    assert secret_literals_in_text("aws_secret_access_key: wJalrXUtnFEMIbPxRfiCYzEXAMPLEKEY")
    assert secret_literals_in_text("MLFLOW_TRACKING_PASSWORD=hunter2")
    assert secret_literals_in_data({"stringData": {"AWS_SECRET_ACCESS_KEY": "abc123"}})
    assert secret_literals_in_data({"env": [{"name": "X", "value": "--env RAY_AUTH_TOKEN=abcdef"}]})
    for ok in ("AWS_SECRET_ACCESS_KEY: REPLACE_ME", "AWS_ACCESS_KEY_ID=drrfarm-local-dev-key",
               'RAY_AUTH_TOKEN="$(openssl rand -hex 32)"', "AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY}",
               '"~/.ray/auth_token": "~/.ray/auth_token"', "- name: RAY_AUTH_TOKEN"):
        assert not secret_literals_in_text(ok), ok


# --------------------------------------------------------------------------------------------------- docs


def test_scaling_doc_names_existing_files() -> None:
    text = SCALING_DOC.read_text(encoding="utf-8")
    for m in re.finditer(r"\b((?:infra|jobs|benchmarks|docs|tests)/[\w./-]*\w)([./]?<)?", text):
        rel, placeholder = m.group(1), m.group(2)
        if placeholder or rel.endswith("/RESULTS.md"):
            continue  # a placeholder (Dockerfile.<flavor>); RESULTS.md is being written by the CUDA work
        assert (REPO / rel).exists(), f"docs/scaling.md mentions {rel}, which does not exist"
    for needle in ("benchmarks/RESULTS.md", "ray up infra/ray-cluster/aws-gpu.yaml", "kubectl apply -f infra/kuberay/",
                   "docker compose -f infra/local/compose.yaml", "docker build -f infra/docker/Dockerfile.gpu"):
        assert needle in text, f"docs/scaling.md should show {needle!r}"


def _farm_test_commands() -> list[str]:
    """``ray start ...`` / ``ray job submit ...`` command lines the farm's integration tests run, as they
    appear there: string constants or lists of string constants (non-constant parts become ``...``)."""
    cmds = []
    for path in sorted((REPO / "tests").glob("test_farm*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            words: list[str] | None = None
            if isinstance(node, (ast.List, ast.Tuple)) and node.elts:
                words = [e.value if isinstance(e, ast.Constant) and isinstance(e.value, str) else "..."
                         for e in node.elts]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                words = node.value.split()
            if words and len(words) > 2 and words[0] in ("ray", "...") and words[1:3] in (["start", "--head"],
                                                                                       ["job", "submit"]):
                cmds.append(" ".join(["ray", *words[1:]]))
    return cmds


def test_scaling_doc_quotes_the_farm_integration_test_commands() -> None:
    cmds = _farm_test_commands()
    if not cmds:
        pytest.skip("no `ray start --head` / `ray job submit` command found in tests/test_farm*.py yet")
    text = " ".join(SCALING_DOC.read_text(encoding="utf-8").replace("\\\n", " ").split())
    for cmd in cmds:
        fixed = [w for w in cmd.split() if w != "..."]
        # every literal word of the test's command, in order, on one line of the doc
        pattern = r"\s+(?:\S+\s+)*?".join(re.escape(w) for w in fixed)
        assert re.search(pattern, text), f"docs/scaling.md does not quote the test command: {cmd}"
