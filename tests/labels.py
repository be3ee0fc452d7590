"""Checking a diagnosis report against a scenario label (the format of shared/scenarios/labels.json)."""

from __future__ import annotations


def label_problems(report: dict, label: dict) -> list[str]:
    """What the report gets wrong about the label; empty when it is right."""
    findings = report.get("findings", [])
    kinds = {f["kind"] for f in findings}
    problems = []
    if label.get("healthy"):
        loud = [
            f"{f['kind']} ({f['severity']})"
            for f in findings
            if f["severity"] in ("warning", "error")
        ]
        if loud:
            problems.append(f"healthy, yet reported: {', '.join(loud)}")
    for kind in label.get("must", []):
        if kind not in kinds:
            problems.append(f"missing required {kind}")
    for kind in label.get("must_not", []):
        if kind in kinds:
            problems.append(f"reported forbidden {kind}")
    for kind, names in label.get("where", {}).items():
        layers = {name for f in findings if f["kind"] == kind for name in f["layers"]}
        if kind in kinds and not layers & set(names):
            problems.append(f"{kind} names {sorted(layers)[:6]}, none of {names}")
    return problems
