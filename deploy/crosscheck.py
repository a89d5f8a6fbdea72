#!/usr/bin/env python3
"""Checks that the pieces of deploy/ fit together — what schema validation
cannot see — and extracts what the external checkers need.

    crosscheck.py chart RENDERED.yaml OUTDIR
        Rendered chart: Service and PDB selectors match the pods, target and
        probe ports exist, the config's listener and metrics ports are the
        container ports, the security context is the hardened one, the grace
        period outlasts the drain, the ServiceMonitor selects the metrics
        Service. Writes the ConfigMap's files to OUTDIR (relayguard.yaml
        with /etc/relayguard/ paths moved under OUTDIR, for `relayguard
        check`), a chart-made users file where the pod would see it, and
        OUTDIR/rules.yml (the PrometheusRule's groups, for promtool).

    crosscheck.py compose REPO
        deploy/compose.yaml: every bind-mounted file exists, the ports the
        sample configuration listens on are published and EXPOSEd by the
        Dockerfile, the stop grace period outlasts the drain.
"""
import base64
import re
import sys
from pathlib import Path

import yaml

errors = []


def check(cond, msg):
    if not cond:
        errors.append(msg)
    return cond


def seconds(text):
    m = re.fullmatch(r"(\d+)(ms|s|m|h)?", str(text).strip())
    if not m:
        raise ValueError(f"cannot read duration {text!r}")
    n, unit = int(m.group(1)), m.group(2) or "s"
    return n * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


def port_of(address):
    return int(str(address).rsplit(":", 1)[1])


def chart(rendered, outdir):
    docs = [d for d in yaml.safe_load_all(Path(rendered).read_text()) if d]
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    (deploy,) = by_kind["Deployment"]
    pod = deploy["spec"]["template"]
    labels = pod["metadata"]["labels"]
    spec = pod["spec"]
    (c,) = spec["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    sel = deploy["spec"]["selector"]["matchLabels"]
    check(sel.items() <= labels.items(), "Deployment selector does not match its pod labels")

    def selects(selector, what):
        check(selector and selector.items() <= labels.items(), f"{what} selector {selector} does not select the pods")

    services = {s["metadata"]["name"]: s for s in by_kind.get("Service", [])}
    for name, s in services.items():
        selects(s["spec"]["selector"], f"Service {name}")
        for p in s["spec"]["ports"]:
            check(p["targetPort"] in ports, f"Service {name} port {p['name']} targets {p['targetPort']}, not a container port")
    for pdb in by_kind.get("PodDisruptionBudget", []):
        selects(pdb["spec"]["selector"]["matchLabels"], "PodDisruptionBudget")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        if probe in c:
            check(c[probe]["httpGet"]["port"] in ports, f"{probe} port is not a container port")
    check(c.get("readinessProbe", {}).get("httpGet", {}).get("path", "/readyz") == "/readyz", "readiness must probe /readyz")
    check(c.get("livenessProbe", {}).get("httpGet", {}).get("path", "/healthz") == "/healthz", "liveness must probe /healthz")

    sc = c["securityContext"]
    check(sc.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem must be true")
    check(sc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation must be false")
    check("ALL" in sc.get("capabilities", {}).get("drop", []), "capabilities must drop ALL")
    check(sc.get("runAsNonRoot") or spec.get("securityContext", {}).get("runAsNonRoot"), "runAsNonRoot must be true")
    check(any(m["mountPath"] == "/tmp" for m in c["volumeMounts"]), "a writable /tmp is needed with a read-only root")

    # The configuration the pod runs with.
    args = c["args"]
    config_path = args[args.index("--config") + 1]
    cm_names = {cm["metadata"]["name"]: cm for cm in by_kind["ConfigMap"]}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    config_vol = next(n for n, p in mounts.items() if config_path.startswith(p + "/"))
    cm = cm_names.get(volumes[config_vol]["configMap"]["name"])
    check(cm is not None, "the config volume's ConfigMap is not rendered")
    text = cm["data"][Path(config_path).name]
    config = yaml.safe_load(text)
    for l in config["listeners"]:
        check(port_of(l["address"]) == ports.get(l["name"]),
              f"listener {l['name']} binds {l['address']} but the container port {l['name']} is {ports.get(l['name'])}")
        if l.get("proxy_protocol"):
            check(l.get("trusted_proxies"), f"listener {l['name']}: proxy_protocol without trusted_proxies")
    check(port_of(config["metrics"]["address"]) == ports["metrics"], "metrics.address is not the metrics container port")
    drain = seconds(config.get("shutdown", {}).get("drain_timeout", "30s"))
    pre = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    check(spec["terminationGracePeriodSeconds"] > drain + pre,
          f"terminationGracePeriodSeconds {spec['terminationGracePeriodSeconds']} <= drain {drain} + preStop {pre}")
    # Every file the configuration names lives on a mounted volume.
    named = [config.get("tls", {}).get("certificate"), config.get("tls", {}).get("key"),
             config.get("auth", {}).get("users_file")]
    for f in filter(None, named):
        check(any(f.startswith(p + "/") for p in mounts.values()), f"{f} is on no mounted volume")

    for sm in by_kind.get("ServiceMonitor", []):
        msel = sm["spec"]["selector"]["matchLabels"]
        hits = [s for s in services.values() if msel.items() <= s["metadata"]["labels"].items()]
        check(len(hits) == 1, f"ServiceMonitor selects {len(hits)} Services, expected the metrics one")
        for s in hits:
            names = {p["name"] for p in s["spec"]["ports"]}
            for ep in sm["spec"]["endpoints"]:
                check(ep["port"] in names, f"ServiceMonitor endpoint port {ep['port']} is not a port of {s['metadata']['name']}")

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    # The ConfigMap's files (configuration, policy file, …) side by side, as
    # in the pod; /etc/relayguard/ paths moved under OUTDIR.
    for name, content in cm["data"].items():
        (out / name).write_text(content.replace("/etc/relayguard/", f"{out.resolve()}/"))
    # A chart-made users file, where the pod mounts it.
    users = config.get("auth", {}).get("users_file")
    for sec in by_kind.get("Secret", []):
        if users and "users.yaml" in sec.get("data", {}):
            dest = out / Path(users).relative_to("/etc/relayguard")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(base64.b64decode(sec["data"]["users.yaml"]))
    rules = by_kind.get("PrometheusRule", [])
    if rules:
        (out / "rules.yml").write_text(yaml.safe_dump({"groups": rules[0]["spec"]["groups"]}, sort_keys=False))
    kinds = ", ".join(f"{k} x{len(v)}" if len(v) > 1 else k for k, v in sorted(by_kind.items()))
    print(f"{rendered}: {kinds}")


def compose(repo):
    repo = Path(repo)
    base = repo / "deploy"
    c = yaml.safe_load((base / "compose.yaml").read_text())
    for name, svc in c["services"].items():
        for v in svc.get("volumes", []):
            src = v.split(":", 1)[0]
            if src.startswith((".", "/")):
                check((base / src).exists(), f"compose service {name} mounts {src}, which does not exist")
    rg = c["services"]["relayguard"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in rg["volumes"]}
    config = yaml.safe_load((base / mounts["/etc/relayguard/relayguard.yaml"]).read_text())
    published = {int(p.rsplit(":", 1)[1]) for p in rg["ports"]}
    dockerfile = (repo / "deploy/docker/Dockerfile").read_text()
    exposed = {int(p) for line in dockerfile.splitlines() if line.startswith("EXPOSE ") for p in line.split()[1:]}
    wanted = {port_of(l["address"]) for l in config["listeners"]}
    if "metrics" in config:
        wanted.add(port_of(config["metrics"]["address"]))
    for p in sorted(wanted):
        check(p in published, f"compose: relayguard listens on {p} but does not publish it")
        check(p in exposed, f"Dockerfile: port {p} of the compose config is not EXPOSEd")
        check(p >= 1024, f"port {p} needs CAP_NET_BIND_SERVICE, which the container does not have")
    drain = seconds(config.get("shutdown", {}).get("drain_timeout", "30s"))
    check(seconds(rg.get("stop_grace_period", "10s")) > drain, "compose: stop_grace_period must outlast shutdown.drain_timeout")
    check(rg.get("read_only") is True, "compose: relayguard should run with a read-only root")
    print(f"{base / 'compose.yaml'}: {len(c['services'])} services; relayguard ports {sorted(wanted)}")


def main():
    cmd = sys.argv[1]
    if cmd == "chart":
        chart(sys.argv[2], sys.argv[3])
    elif cmd == "compose":
        compose(sys.argv[2])
    else:
        sys.exit(__doc__)
    for e in errors:
        print(f"ERROR: {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
