"""Extracts the openAPIV3Schema of the custom resources k8s/ uses from their upstream CRDs.

kubernetes-validate knows only built-in kinds, so tests/test_k8s.py validates the Strimzi and
Prometheus-operator resources against these schemas (vendored: the tests run offline).
Usage: python k8s/crd-schemas/extract.py CRD.yaml... (writes <kind>-<group>-<version>.json here).
Sources and licences: README.md beside this file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def main(paths: list[str]) -> int:
    for path in paths:
        for doc in yaml.safe_load_all(Path(path).read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = doc["spec"]["group"], doc["spec"]["names"]["kind"]
            for version in doc["spec"]["versions"]:
                if not version.get("served"):
                    continue
                out = HERE / f"{kind.lower()}-{group}-{version['name']}.json"
                out.write_text(json.dumps(version["schema"]["openAPIV3Schema"], separators=(",", ":"), sort_keys=True) + "\n")
                print(f"wrote {out.name} ({out.stat().st_size} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
