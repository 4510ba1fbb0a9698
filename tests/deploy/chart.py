"""The Helm chart, rendered and validated offline: the helm binary (scripts/ensure-helm), `helm template`, and a
strict validator of custom resources against their CRDs' schemas (tests/deploy/crds, vendored by crds/vendor.py).

Strict as kubeconform's `-strict`: every object of a CRD schema that lists its properties and says nothing of the
others refuses unknown fields (`additionalProperties: false`), unless it keeps them by
`x-kubernetes-preserve-unknown-fields`; `x-kubernetes-int-or-string` accepts an integer or a string.
"""

from __future__ import annotations

import copy
import functools
import json
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "streamserve"
CRDS = Path(__file__).resolve().parent / "crds"
KUBERNETES_VERSION = "1.30.0"
RELEASE = "streamserve"
NAMESPACE = "streamserve"


@functools.cache
def helm() -> str:
    """The helm binary, built once into .tools/bin by scripts/ensure-helm (Go module proxy)."""
    result = subprocess.run(
        [str(REPO / "scripts" / "ensure-helm")], capture_output=True, text=True, timeout=1800, check=False
    )
    assert result.returncode == 0, f"helm could not be installed by scripts/ensure-helm:\n{result.stderr[-2000:]}"
    return result.stdout.strip().splitlines()[-1]


def run_helm(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """helm with these arguments, its exit status and output returned (not checked)."""
    return subprocess.run([helm(), *map(str, args)], capture_output=True, text=True, timeout=300, check=False)


def render(*args: str | Path) -> list[dict[str, Any]]:
    """The objects `helm template` renders from the chart with these extra arguments (-f FILE, --set K=V)."""
    result = run_helm("template", RELEASE, CHART, "--namespace", NAMESPACE, *args)
    assert result.returncode == 0, f"helm template {' '.join(map(str, args))}:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def _strict(schema: Any) -> Any:
    """The schema with unknown fields refused wherever it lists the known ones (kubeconform's -strict)."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: _strict(value) for key, value in schema.items()}
    if strict.pop("x-kubernetes-int-or-string", False):
        strict.pop("type", None)
        strict["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    keeps_unknown = strict.get("x-kubernetes-preserve-unknown-fields", False)
    if "properties" in schema and "additionalProperties" not in schema and not keeps_unknown:
        strict["additionalProperties"] = False
    return strict


_METADATA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


@functools.cache
def crd_validators() -> dict[str, jsonschema.Draft7Validator]:
    """apiVersion/kind -> a strict validator of the vendored CRD schema."""
    validators = {}
    for path in sorted(CRDS.glob("*.json")):
        crd = json.loads(path.read_text())
        schema = _strict(copy.deepcopy(crd["openAPIV3Schema"]))
        schema["properties"]["metadata"] = _METADATA
        schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
        validators[f"{crd['group']}/{crd['version']}/{crd['kind']}"] = jsonschema.Draft7Validator(schema)
    return validators


def validate(resource: dict[str, Any]) -> None:
    """Validate one rendered object strictly: Kubernetes' own kinds against the OpenAPI schemas of
    KUBERNETES_VERSION (kubernetes-validate), custom resources against their vendored CRD schema. Raises on any
    error, an unknown field included."""
    validator = crd_validators().get(f"{resource['apiVersion']}/{resource['kind']}")
    if validator is not None:
        validator.validate(resource)
    else:  # an unknown kind (a custom resource without a vendored CRD) fails here too
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
