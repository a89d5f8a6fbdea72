#!/usr/bin/env python3
"""The values table of the chart's README, generated from values.yaml.

Each value is documented by a comment block right above it whose first line
starts with `# --` (the helm-docs convention). A documented map or list is
one row; an undocumented map is descended into; an undocumented leaf is an
error, so no value goes undocumented.

    values-table.py CHART            print the table
    values-table.py CHART --check    fail if CHART/README.md's table differs
    values-table.py CHART --write    rewrite the table in CHART/README.md

The table sits between `<!-- values-table:start -->` and
`<!-- values-table:end -->` in the README.
"""
import json
import re
import sys
from pathlib import Path

import yaml

START, END = "<!-- values-table:start -->", "<!-- values-table:end -->"
KEY = re.compile(r"^(\s*)([A-Za-z0-9_.-]+):(\s|$)")


def comments(text):
    """path (tuple) -> description, from `# --` blocks above keys."""
    docs, stack, block = {}, [], []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            block.append(stripped.lstrip("#").strip())
            continue
        m = KEY.match(line)
        if m and not stripped.startswith("-"):
            indent = len(m.group(1))
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, m.group(2)))
            if block and block[0].startswith("--"):
                block[0] = block[0][2:].strip()
                docs[tuple(k for _, k in stack)] = " ".join(b for b in block if b)
        if stripped == "" or m or not stripped.startswith("-"):
            block = []
    return docs


def rows(values, docs, prefix=()):
    out, missing = [], []
    for key, value in values.items():
        path = prefix + (key,)
        if path in docs:
            out.append((".".join(path), value, docs[path]))
        elif isinstance(value, dict) and value:
            r, m = rows(value, docs, path)
            out += r
            missing += m
        else:
            missing.append(".".join(path))
    return out, missing


def kind(v):
    return {dict: "object", list: "list", bool: "bool", int: "int", float: "number",
            str: "string", type(None): "null"}[type(v)]


def table(chart):
    text = (chart / "values.yaml").read_text()
    r, missing = rows(yaml.safe_load(text), comments(text))
    if missing:
        sys.exit("values.yaml: undocumented value(s) (add a `# --` comment): " + ", ".join(missing))
    lines = ["| Key | Type | Default | Description |", "|---|---|---|---|"]
    for key, value, doc in r:
        default = json.dumps(value, separators=(",", ":"))
        if len(default) > 60:
            default = "see values.yaml"
        doc = doc.replace("|", "\\|")
        lines.append(f"| `{key}` | {kind(value)} | `{default}` | {doc} |")
    return "\n".join(lines) + "\n"


def main():
    chart = Path(sys.argv[1])
    mode = sys.argv[2] if len(sys.argv) > 2 else ""
    t = table(chart)
    if not mode:
        print(t, end="")
        return 0
    readme = chart / "README.md"
    old = readme.read_text()
    head, rest = old.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{t}{END}{tail}"
    if mode == "--write":
        readme.write_text(new)
        return 0
    if new != old:
        print(f"{readme}: the values table is out of date: run deploy/helm/values-table.py {chart} --write",
              file=sys.stderr)
        return 1
    print(f"{readme}: values table matches values.yaml ({len(t.splitlines()) - 2} values)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
