"""Offline checks of deploy/kubernetes/: every manifest against the Kubernetes OpenAPI schemas
(kubernetes-validate, strict: unknown fields fail), the ServiceMonitor (a CRD, so no schema
ships with kubernetes-validate) and the Kustomization by hand, and what must agree between
files: probes, ports, Secret keys, and a termination grace long enough for streams to drain.

    python .ci/check_kubernetes.py [DIR]     exit 1 and one line per problem when any
"""

import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import yaml

# The oldest Kubernetes the manifests promise to work on.
KUBERNETES_VERSION = "1.29.0"


def load(directory: Path):
    docs = []
    for path in sorted(directory.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


def check(directory: Path) -> list[str]:
    problems = []
    docs = load(directory)
    if not docs:
        return [f"{directory}: no manifests"]
    by_kind = {}
    for name, doc in docs:
        kind = doc.get("kind", "?")
        by_kind.setdefault(kind, []).append((name, doc))
        where = f"{name}: {kind}/{doc.get('metadata', {}).get('name', '?')}"
        if kind == "Kustomization":
            for resource in doc.get("resources", []):
                if not (directory / resource).is_file():
                    problems.append(f"{where}: resource {resource} does not exist")
        elif kind == "ServiceMonitor":
            if doc.get("apiVersion") != "monitoring.coreos.com/v1":
                problems.append(f"{where}: apiVersion must be monitoring.coreos.com/v1")
            spec = doc.get("spec") or {}
            if not (spec.get("selector") or {}).get("matchLabels"):
                problems.append(f"{where}: spec.selector.matchLabels is required")
            if not spec.get("endpoints"):
                problems.append(f"{where}: spec.endpoints is required")
        else:
            try:
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                problems.append(f"{where}: {path}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                problems.append(f"{where}: no schema: {e}")

    # The cross-checks below read fields the schemas guarantee.
    if problems:
        return problems

    def one(kind):
        found = by_kind.get(kind, [])
        if len(found) != 1:
            problems.append(f"expected one {kind}, found {len(found)}")
            return None
        return found[0][1]

    deployment = one("Deployment")
    configmap = one("ConfigMap")
    secret = one("Secret")
    services = [doc for _, doc in by_kind.get("Service", [])]
    if deployment is None or configmap is None or secret is None:
        return problems

    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"].get("labels", {})
    if spec.get("replicas", 1) < 2:
        problems.append("Deployment: replicas must be at least 2")
    container = pod["containers"][0]
    port_names = {p.get("name") for p in container.get("ports", [])}
    for probe, path in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")]:
        get = (container.get(probe) or {}).get("httpGet") or {}
        if get.get("path") != path:
            problems.append(f"Deployment: {probe} must GET {path}")
        if get.get("port") not in port_names:
            problems.append(f"Deployment: {probe} port {get.get('port')} is not a container port")
    for resource in ["requests", "limits"]:
        if not (container.get("resources") or {}).get(resource):
            problems.append(f"Deployment: resources.{resource} are required")

    # The configuration file the pods read, and its drain time.
    text = next(iter((configmap.get("data") or {}).values()), "")
    try:
        config = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        problems.append(f"ConfigMap: the configuration is not TOML: {e}")
        config = {}
    shutdown_grace = config.get("server", {}).get("shutdown_grace_secs", 30)
    pre_stop = ((container.get("lifecycle") or {}).get("preStop") or {})
    command = (pre_stop.get("exec") or {}).get("command") or []
    pre_stop_secs = (pre_stop.get("sleep") or {}).get("seconds", 0)
    if command[:1] == ["sleep"] and len(command) == 2:
        pre_stop_secs = int(command[1])
    if pre_stop_secs <= 0:
        problems.append("Deployment: a preStop sleep is required (endpoints update late)")
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if grace <= pre_stop_secs + shutdown_grace:
        problems.append(
            f"Deployment: terminationGracePeriodSeconds {grace} must exceed preStop "
            f"{pre_stop_secs} s + server.shutdown_grace_secs {shutdown_grace} s"
        )

    # Secrets the pods read exist in the example Secret.
    secret_keys = set((secret.get("stringData") or {}) | (secret.get("data") or {}))
    for env in container.get("env", []):
        ref = (env.get("valueFrom") or {}).get("secretKeyRef")
        if ref and (ref.get("name") != secret["metadata"]["name"] or ref.get("key") not in secret_keys):
            problems.append(f"Deployment: env {env['name']} reads {ref}, not in the Secret")

    # Services select the pods; one carries gRPC as appProtocol grpc.
    grpc = False
    for service in services:
        selector = service["spec"].get("selector", {})
        if not selector or any(labels.get(k) != v for k, v in selector.items()):
            problems.append(f"Service {service['metadata']['name']}: selector does not match the pods")
        for port in service["spec"].get("ports", []):
            if port.get("targetPort") not in port_names:
                problems.append(
                    f"Service {service['metadata']['name']}: targetPort {port.get('targetPort')} "
                    "is not a container port"
                )
            grpc |= port.get("appProtocol") == "grpc"
    if not grpc:
        problems.append("Service: no port with appProtocol: grpc")

    for _, monitor in by_kind.get("ServiceMonitor", []):
        match = (monitor.get("spec", {}).get("selector") or {}).get("matchLabels") or {}
        selected = [
            s for s in services
            if all(s["metadata"].get("labels", {}).get(k) == v for k, v in match.items())
        ]
        ports = {p.get("name") for s in selected for p in s["spec"].get("ports", [])}
        for endpoint in monitor.get("spec", {}).get("endpoints", []):
            if endpoint.get("port") not in ports:
                problems.append(
                    f"ServiceMonitor: endpoint port {endpoint.get('port')} is on no selected Service"
                )

    for _, pdb in by_kind.get("PodDisruptionBudget", []):
        match = pdb["spec"].get("selector", {}).get("matchLabels", {})
        if any(labels.get(k) != v for k, v in match.items()):
            problems.append("PodDisruptionBudget: selector does not match the pods")
    return problems


def main() -> int:
    directory = Path(sys.argv[1] if len(sys.argv) > 1 else "deploy/kubernetes")
    problems = check(directory)
    for p in problems:
        print(f"{directory}: {p}", file=sys.stderr)
    if problems:
        return 1
    print(f"{directory}: {len(load(directory))} manifests valid (Kubernetes {KUBERNETES_VERSION})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
