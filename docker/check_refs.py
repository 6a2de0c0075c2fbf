"""Cross-checks docker/ against the code it deploys, without a Docker engine.

- every TAILOR_* variable in compose.yaml names a real setting of src/config.rs
  (top-level `TAILOR_<KEY>`, section `TAILOR_<SECTION>__<KEY>`);
- the cargo features the Dockerfile builds with exist in Cargo.toml;
- the dashboard is well formed (unique panel ids, a query in every target), uses the
  provisioned datasource, and every metric and label its queries name is one that
  src/telemetry records (histograms through _bucket, _sum or _count);
- the Grafana mounts in compose.yaml match the provisioning paths.

Usage: check_refs.py RENDERED_COMPOSE_JSON PROMQL_RULES_OUT
RENDERED_COMPOSE_JSON is `docker compose config --format json`; PROMQL_RULES_OUT gets
every dashboard query as a Prometheus recording rule, for `promtool check rules` to parse.
Needs Python 3.11+ and ruamel.yaml.
"""

import json
import re
import sys
import tomllib
from pathlib import Path

from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
errors: list[str] = []


def fail(message: str) -> None:
    errors.append(message)


def struct_fields(source: str, name: str) -> dict[str, str]:
    """`pub field: Type` pairs of `pub struct NAME { ... }` in Rust source."""
    match = re.search(r"pub struct " + name + r"\s*\{(.*?)\n\}", source, re.S)
    if not match:
        return {}
    return dict(re.findall(r"^\s*pub (\w+):\s*([\w:<>, ]+?),?\s*$", match.group(1), re.M))


def check_env(compose: dict) -> None:
    config = (ROOT / "src/config.rs").read_text()
    top = struct_fields(config, "Settings")
    if not top:
        fail("src/config.rs: no `pub struct Settings` found")
        return
    # The variable that holds the master key by default is not a setting.
    master_key = re.search(r'DEFAULT_MASTER_KEY_ENV: &str = "([A-Z_]+)"', config)
    for service_name, service in compose["services"].items():
        for var in service.get("environment") or {}:
            if not var.startswith("TAILOR_") or (master_key and var == master_key.group(1)):
                continue
            parts = var[len("TAILOR_"):].lower().split("__")
            if parts[0] not in top:
                fail(f"compose.yaml {service_name}: {var}: no setting '{parts[0]}' in src/config.rs")
                continue
            if len(parts) == 1:
                continue
            section = struct_fields(config, top[parts[0]].strip())
            if len(parts) != 2 or parts[1] not in section:
                fail(f"compose.yaml {service_name}: {var}: no key '{'.'.join(parts)}' in src/config.rs")


def check_features() -> None:
    declared = set(tomllib.loads((ROOT / "Cargo.toml").read_text()).get("features", {}))
    dockerfile = (DOCKER / "Dockerfile").read_text()
    match = re.search(r"^ARG FEATURES=(\S*)$", dockerfile, re.M)
    if not match:
        fail("Dockerfile: no `ARG FEATURES=...` default")
        return
    for feature in filter(None, match.group(1).split(",")):
        if feature not in declared:
            fail(f"Dockerfile builds with cargo feature '{feature}', which Cargo.toml does not declare")


def telemetry_metrics() -> tuple[dict[str, str], set[str]]:
    """Metric names by kind (counter or histogram), and every attribute key in src/."""
    source = (ROOT / "src/telemetry/mod.rs").read_text()
    metrics = {n: "counter" for n in re.findall(r'\bcounter\(\s*"(\w+)"', source)}
    metrics |= {n: "counter" for n in re.findall(r'u64_counter\(\s*"(\w+)"', source)}
    metrics |= {n: "histogram" for n in re.findall(r'ms_histogram\(\s*"(\w+)"', source)}
    metrics |= {n: "histogram" for n in re.findall(r'f64_histogram\(\s*"(\w+)"', source)}
    labels: set[str] = set()
    for path in (ROOT / "src").rglob("*.rs"):
        labels |= set(re.findall(r'KeyValue::new\(\s*"(\w+)"', path.read_text()))
    return metrics, labels


# Labels Prometheus adds to every scraped series (docker/prometheus.yml adds `role`),
# and `le` of histogram buckets.
TARGET_LABELS = {"job", "instance", "role", "le"}
PROMQL_WORDS = {
    "sum", "by", "without", "rate", "irate", "increase", "histogram_quantile", "avg", "max",
    "min", "count", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "clamp_min", "clamp_max", "label_values", "topk", "bottomk", "offset", "bool", "le",
}
GRAFANA_VARS = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
}


def expand(expr: str, variables: set[str]) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    for var in variables:
        expr = expr.replace("$" + var, ".*").replace("${" + var + "}", ".*")
    return expr


def check_dashboard(compose: dict, rules_out: Path) -> None:
    metrics, code_labels = telemetry_metrics()
    if not metrics:
        fail("src/telemetry/mod.rs: no metric names found")
        return
    yaml = YAML(typ="safe")
    datasources = yaml.load(DOCKER / "grafana/provisioning/datasources/prometheus.yaml")
    uids = {d["uid"] for d in datasources["datasources"]}
    providers = yaml.load(DOCKER / "grafana/provisioning/dashboards/tailor.yaml")
    provider_paths = {p["options"]["path"] for p in providers["providers"]}

    mounts = {
        v["target"]: v.get("source", "")
        for v in compose["services"]["grafana"].get("volumes", [])
    }
    for path in provider_paths:
        source = mounts.get(path)
        if source is None or Path(source).resolve() != (DOCKER / "grafana/dashboards").resolve():
            fail(f"grafana: provider path {path} is not where compose.yaml mounts docker/grafana/dashboards")
    if Path(mounts.get("/etc/grafana/provisioning", "/")).resolve() != (DOCKER / "grafana/provisioning").resolve():
        fail("grafana: compose.yaml does not mount docker/grafana/provisioning at /etc/grafana/provisioning")

    dashboards = sorted((DOCKER / "grafana/dashboards").glob("*.json"))
    if not dashboards:
        fail("docker/grafana/dashboards: no dashboard")
    rules = []
    for path in dashboards:
        name = path.relative_to(ROOT)
        try:
            dashboard = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            fail(f"{name}: not JSON: {e}")
            continue
        variables = {v["name"] for v in dashboard.get("templating", {}).get("list", [])}
        queries = []
        for v in dashboard.get("templating", {}).get("list", []):
            if v.get("type") == "query":
                queries.append((f"variable {v['name']}", v["datasource"], v["definition"]))
        ids = []
        for panel in dashboard.get("panels", []):
            ids.append(panel.get("id"))
            if "gridPos" not in panel:
                fail(f"{name}: panel {panel.get('title')!r} has no gridPos")
            if panel.get("type") == "row":
                continue
            targets = panel.get("targets") or []
            if not targets:
                fail(f"{name}: panel {panel.get('title')!r} has no query")
            for t in targets:
                if not t.get("expr"):
                    fail(f"{name}: panel {panel.get('title')!r} target {t.get('refId')} has no expr")
                    continue
                queries.append((f"panel {panel['title']!r}", t.get("datasource") or panel.get("datasource"), t["expr"]))
        if len(ids) != len(set(ids)):
            fail(f"{name}: panel ids are not unique")
        for where, datasource, expr in queries:
            if not datasource or datasource.get("uid") not in uids:
                fail(f"{name}: {where}: datasource {datasource} is not a provisioned one ({sorted(uids)})")
            check_expr(f"{name}: {where}", expr, metrics, code_labels | TARGET_LABELS)
            if not expr.startswith("label_values("):
                rules.append(expand(expr, variables))
    with rules_out.open("w") as out:
        json.dump({"groups": [{"name": "dashboard", "rules": [
            {"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(rules)]}]}, out, indent=1)


def check_expr(where: str, expr: str, metrics: dict[str, str], labels: set[str]) -> None:
    # Label names: in `by (...)`, `without (...)` and in matchers `{name op "value"}`.
    used_labels = set()
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        used_labels |= {l.strip() for l in group.split(",") if l.strip()}
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        used_labels |= set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"", matchers))
    label_call = re.match(r"label_values\(\s*(\w+)\s*,\s*(\w+)\s*\)", expr)
    if label_call:
        used_labels.add(label_call.group(2))
    for label in sorted(used_labels - labels):
        fail(f"{where}: label '{label}' is never recorded by src/ nor added by Prometheus")

    # Metric names: identifiers that are not functions, keywords, labels or durations.
    stripped = re.sub(r'"[^"]*"', '""', expr)
    stripped = re.sub(r"\{[^}]*\}", "", stripped)
    stripped = re.sub(r"\[[^\]]*\]", "", stripped)
    stripped = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", "", stripped)
    for ident in re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", stripped):
        if ident in PROMQL_WORDS or ident in labels:
            continue
        if ident == "up":
            continue
        base = re.sub(r"_(bucket|sum|count)$", "", ident)
        kind = metrics.get(ident) or (metrics.get(base) if base != ident else None)
        if kind is None:
            fail(f"{where}: metric '{ident}' is not recorded by src/telemetry")
        elif ident != base and metrics.get(ident) is None and kind != "histogram":
            fail(f"{where}: '{ident}': {base} is a {kind}, not a histogram")
        elif ident == base and kind == "histogram":
            fail(f"{where}: '{ident}' is a histogram: query its _bucket, _sum or _count")


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    compose = json.loads(Path(sys.argv[1]).read_text())
    check_env(compose)
    check_features()
    check_dashboard(compose, Path(sys.argv[2]))
    for e in errors:
        print(f"  FAIL {e}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
