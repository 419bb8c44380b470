#!/usr/bin/env python3
"""Validates Kubernetes manifests against the OpenAPI schemas of a real
Kubernetes release (kubernetes-validate carries them), strictly: unknown
fields are errors. `List` items are validated one by one; kustomization
files, JSON 6902 patches and CRD kinds without a published schema are
skipped and named."""
import sys
import kubernetes_validate
import yaml

VERSION = "1.31.0"
SKIP_KINDS = {"Kustomization", "PodMonitor"}

failed = 0
checked = 0
for path in sys.argv[1:]:
    with open(path) as f:
        try:
            docs = [d for d in yaml.safe_load_all(f) if d is not None]
        except yaml.YAMLError as e:
            print(f"FAIL {path}: {e}")
            failed += 1
            continue
    if docs and isinstance(docs[0], list):
        print(f"skip {path}: a JSON 6902 patch")
        continue
    for doc in docs:
        items = doc.get("items", []) if doc.get("kind") == "List" else [doc]
        for item in items:
            kind = item.get("kind")
            name = item.get("metadata", {}).get("name")
            if kind in SKIP_KINDS:
                print(f"skip {path}: {kind}/{name} (no upstream schema)")
                continue
            try:
                kubernetes_validate.validate(item, VERSION, strict=True)
                checked += 1
                print(f"ok   {path}: {kind}/{name}")
            except Exception as e:  # the library raises several error types
                failed += 1
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                print(f"FAIL {path}: {kind}/{name}: {first}")
print(f"{checked} resources valid against Kubernetes {VERSION}, {failed} invalid")
sys.exit(1 if failed or not checked else 0)
