"""Re-vendor the CRD schemas the chart's custom resources are validated against (tests/deploy/test_chart.py).

The CRDs come from the Go module proxy, as the modules that define them publish them:

    go mod download -json github.com/kedacore/keda/v2@v2.21.0                      # config/crd/bases/
    go mod download -json github.com/prometheus-operator/prometheus-operator@v0.85.0  # example/prometheus-operator-crd/
    python -m tests.deploy.crds.vendor

Each served version's ``openAPIV3Schema`` is written to ``<group>_<kind>_<version>.json`` beside this file.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
SOURCES = {
    "github.com/kedacore/keda/v2@v2.21.0": [
        "config/crd/bases/keda.sh_scaledobjects.yaml",
        "config/crd/bases/keda.sh_triggerauthentications.yaml",
    ],
    "github.com/prometheus-operator/prometheus-operator@v0.85.0": [
        "example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml",
        "example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml",
    ],
}


def main() -> None:
    """Download the modules (Go module proxy) and write the schemas."""
    for module, files in SOURCES.items():
        info = json.loads(
            subprocess.run(["go", "mod", "download", "-json", module], capture_output=True, check=True).stdout
        )
        for name in files:
            crd = yaml.safe_load((Path(info["Dir"]) / name).read_text())
            spec = crd["spec"]
            for version in spec["versions"]:
                if not version.get("served"):
                    continue
                kind = spec["names"]["kind"]
                doc = {
                    "source": f"{module} {name}",
                    "group": spec["group"],
                    "kind": kind,
                    "version": version["name"],
                    "openAPIV3Schema": version["schema"]["openAPIV3Schema"],
                }
                out = HERE / f"{spec['group']}_{kind.lower()}_{version['name']}.json"
                out.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
                print(out.name)


if __name__ == "__main__":
    main()
