"""Cross-file checks that the schema validators cannot make; called by deploy/check.sh.

python deploy/check_rendered.py k8s RENDERED.yaml
    Rendered kustomize output: Service, PDB and HPA point at the Deployment's pods,
    the ServiceMonitor (a CRD, so kubernetes-validate has no schema for it) selects
    the Service and one of its named ports at /metrics, the probes hit /health and
    /ready, and terminationGracePeriodSeconds covers preStop + MTP_DRAIN_TIMEOUT_S.

python deploy/check_rendered.py dashboard-rules DASHBOARD.json DATASOURCES.yml
    Checks that every panel uses the provisioned datasource uid, then prints each
    panel query as a recording rule (Grafana variables replaced) so that
    `promtool check rules` parses the PromQL.
"""

import json
import sys
from typing import Any

import yaml

Doc = dict[str, Any]


FAILURES: list[str] = []


def fail(msg: str) -> None:
    """Report one failed check; the process exits non-zero at the end."""
    print(f"FAIL {msg}", file=sys.stderr)
    FAILURES.append(msg)


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def one(docs: list[Doc], kind: str) -> Doc:
    found = [d for d in docs if d.get("kind") == kind]
    if len(found) != 1:
        raise SystemExit(f"FAIL expected one {kind}, found {len(found)}")
    return found[0]


def check_pod(deploy: Doc) -> None:
    pod = deploy["spec"]["template"]["spec"]
    (ctr,) = pod["containers"]
    if ctr.get("livenessProbe", {}).get("httpGet", {}).get("path") != "/health":
        fail("livenessProbe must GET /health")
    if ctr.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/ready":
        fail("readinessProbe must GET /ready")
    env = {e["name"]: e.get("value") for e in ctr.get("env", [])}
    drain = float(env.get("MTP_DRAIN_TIMEOUT_S") or 30)
    pre_stop = ctr.get("lifecycle", {}).get("preStop", {})
    sleep = (
        float(pre_stop["exec"]["command"][-1]) if "exec" in pre_stop else pre_stop.get("sleep", {}).get("seconds", 0)
    )
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if grace < sleep + drain + 5:
        fail(f"terminationGracePeriodSeconds {grace} < preStop {sleep} + drain {drain} + 5s margin")
    if not pod.get("securityContext", {}).get("runAsNonRoot"):
        fail("pod securityContext.runAsNonRoot must be true")
    if not ctr.get("securityContext", {}).get("readOnlyRootFilesystem"):
        fail("container securityContext.readOnlyRootFilesystem must be true")
    if "/tmp" not in [m["mountPath"] for m in ctr.get("volumeMounts", [])]:
        fail("a read-only root filesystem needs a writable /tmp mount")


def check_k8s(path: str) -> None:
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    deploy, svc = one(docs, "Deployment"), one(docs, "Service")
    pdb, hpa, mon = one(docs, "PodDisruptionBudget"), one(docs, "HorizontalPodAutoscaler"), one(docs, "ServiceMonitor")
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    if not selects(deploy["spec"]["selector"]["matchLabels"], pod_labels):
        fail("Deployment selector does not match its pod template")
    if not selects(svc["spec"]["selector"], pod_labels):
        fail("Service selector does not match the Deployment's pods")
    if not selects(pdb["spec"]["selector"]["matchLabels"], pod_labels):
        fail("PodDisruptionBudget selector does not match the Deployment's pods")
    ref = hpa["spec"]["scaleTargetRef"]
    if (ref["kind"], ref["name"]) != ("Deployment", deploy["metadata"]["name"]):
        fail(f"HPA targets {ref['kind']}/{ref['name']}, not the Deployment")
    check_pod(deploy)
    if mon["apiVersion"] != "monitoring.coreos.com/v1":
        fail(f"ServiceMonitor apiVersion {mon['apiVersion']}")
    if not selects(mon["spec"]["selector"]["matchLabels"], svc["metadata"].get("labels", {})):
        fail("ServiceMonitor selector does not match the Service's labels")
    port_names = {p.get("name") for p in svc["spec"]["ports"]}
    for ep in mon["spec"]["endpoints"]:
        if ep.get("port") not in port_names:
            fail(f"ServiceMonitor endpoint port {ep.get('port')!r} is not a named Service port")
        if ep.get("path") != "/metrics":
            fail(f"ServiceMonitor endpoint path {ep.get('path')!r} is not /metrics")
    if not FAILURES:
        print(f"ok {path}: {len(docs)} resources consistent")


def dashboard_rules(dashboard_path: str, datasources_path: str) -> None:
    with open(dashboard_path) as f:
        dash = json.load(f)
    with open(datasources_path) as f:
        uids = {d["uid"] for d in yaml.safe_load(f)["datasources"]}
    rules = []
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        if panel.get("datasource", {}).get("uid") not in uids:
            fail(f"panel {panel['title']!r} uses datasource {panel.get('datasource')}, not one of {uids}")
        for t in panel["targets"]:
            expr = t["expr"].replace("$__rate_interval", "5m").replace("$route", ".*")
            rules.append({"record": f"dashboard:panel{panel['id']}_{t['refId']}", "expr": expr})
    if not rules:
        fail("dashboard has no queries")
    json.dump({"groups": [{"name": "dashboard-queries", "rules": rules}]}, sys.stdout, indent=1)


def main() -> int:
    cmd, *args = sys.argv[1:]
    if cmd == "k8s":
        check_k8s(*args)
    elif cmd == "dashboard-rules":
        dashboard_rules(*args)
    else:
        raise SystemExit(__doc__)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
