#!/usr/bin/env python3
"""Lint and render the Helm chart with Helm's own Go code, without a helm
binary: PyPI's helm-python-sdk binds libhelm_c (a C ABI over the Helm v4
SDK), so `lint` is `helm lint` and `template` is `helm template`'s engine.

    render.py lint     CHART [-f VALUES]...
    render.py template CHART [-f VALUES]... [--set-file KEY=PATH]... -o OUT.yaml

Values files are merged like `helm -f a -f b` (maps deep-merged, the later
file wins, lists replaced). `--set-file tls.certificate=cert.pem` sets a
value to a file's content, as `helm --set-file` does. The rendered
manifests go to OUT.yaml as one multi-document stream, in template order,
and NOTES.txt to OUT.yaml's directory as NOTES.txt.
"""
import argparse
import sys
from pathlib import Path

import yaml
import helm_python as helm

SEVERITY = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}


def merge(base, top):
    if isinstance(base, dict) and isinstance(top, dict):
        out = dict(base)
        for k, v in top.items():
            out[k] = merge(base.get(k), v) if k in base else v
        return out
    return top


def load_values(files, set_files):
    values = {}
    for f in files or []:
        values = merge(values, yaml.safe_load(Path(f).read_text()) or {})
    for item in set_files or []:
        key, _, path = item.partition("=")
        node = values
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = Path(path).read_text()
    return values


def lint(args):
    values = load_values(args.values, args.set_file)
    report = helm.lint(args.chart, values, strict=args.strict, kube_version=args.kube_version)
    worst = 0
    for m in report.get("messages", []):
        sev = m.get("severity", 0)
        worst = max(worst, sev)
        # The SDK's messages may come back without text: path and severity
        # still say where.
        print(f"[{SEVERITY.get(sev, sev)}] {m.get('path', '')}: {m.get('error') or '(no message)'}")
    for e in report.get("errors", []) or []:
        print(f"[ERROR] {e}")
        worst = 3
    linted = report.get("total_charts_linted", 0)
    print(f"{linted} chart(s) linted, worst severity {SEVERITY.get(worst, worst)}")
    limit = 2 if args.strict else 3
    return 1 if worst >= limit or linted < 1 else 0


def template(args):
    values = load_values(args.values, args.set_file)
    with helm.Chart.load(args.chart) as chart:
        manifests = chart.render(
            values, name=args.release, namespace=args.namespace, is_install=True
        )
    out = Path(args.output)
    docs = []
    notes = ""
    for path in sorted(manifests):
        text = manifests[path]
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        if not text.strip() or path.endswith(".tpl"):
            continue
        docs.append(f"# Source: {path}\n{text.strip()}\n")
    out.write_text("---\n".join(docs))
    (out.parent / "NOTES.txt").write_text(notes)
    print(f"{out}: {len(docs)} template(s) rendered")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("lint", "template"):
        p = sub.add_parser(name)
        p.add_argument("chart")
        p.add_argument("-f", "--values", action="append")
        p.add_argument("--set-file", action="append")
        if name == "lint":
            p.add_argument("--strict", action="store_true")
            p.add_argument("--kube-version", default=None)
        else:
            p.add_argument("-o", "--output", required=True)
            p.add_argument("--release", default="mail")
            p.add_argument("--namespace", default="mail")
    args = ap.parse_args()
    try:
        return lint(args) if args.cmd == "lint" else template(args)
    except helm.HelmError as e:  # a `fail` in a template, a YAML error, …
        print(f"helm {args.cmd}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
