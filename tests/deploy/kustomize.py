"""The subset of `kubectl kustomize` our manifests use, so they can be built and validated offline.

Supported: resources (files, and directories holding a kustomization.yaml), namespace, labels (pairs),
configMapGenerator (files; name suffixed with a content hash, references in Deployments rewritten) and images.
Anything else in a kustomization.yaml is refused, so a new feature cannot slip past the checks.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import yaml

KNOWN_KEYS = {"apiVersion", "kind", "resources", "namespace", "labels", "configMapGenerator", "images"}


def build(directory: Path) -> list[dict[str, Any]]:
    """The resources `kubectl kustomize directory` would print."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(spec) - KNOWN_KEYS
    assert not unknown, f"{directory}/kustomization.yaml uses {sorted(unknown)}, which tests/deploy/kustomize.py lacks"
    resources: list[dict[str, Any]] = []
    for entry in spec.get("resources") or []:
        path = (directory / entry).resolve()
        if path.is_dir():
            resources.extend(build(path))
        else:
            resources.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    renamed: dict[str, str] = {}
    for generator in spec.get("configMapGenerator") or []:
        data = {Path(f).name: (directory / f).read_text() for f in generator["files"]}
        digest = hashlib.sha256(yaml.safe_dump(data, sort_keys=True).encode()).hexdigest()[:10]
        name = f"{generator['name']}-{digest}"
        renamed[generator["name"]] = name
        metadata: dict[str, Any] = {"name": name}
        if generator.get("options", {}).get("labels"):
            metadata["labels"] = dict(generator["options"]["labels"])
        resources.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data})
    for resource in resources:
        _rewrite_config_maps(resource, renamed)
        for label_set in spec.get("labels") or []:
            resource["metadata"].setdefault("labels", {}).update(label_set["pairs"])
        if spec.get("namespace"):
            resource["metadata"]["namespace"] = spec["namespace"]
        for image in spec.get("images") or []:
            for container in _containers(resource):
                if container["image"].split(":")[0] == image["name"]:
                    container["image"] = f"{image.get('newName', image['name'])}:{image.get('newTag', 'latest')}"
    return resources


def _containers(resource: dict[str, Any]) -> list[dict[str, Any]]:
    if resource["kind"] not in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
        return []
    return list(resource["spec"]["template"]["spec"]["containers"])


def _rewrite_config_maps(resource: dict[str, Any], renamed: dict[str, str]) -> None:
    if resource["kind"] not in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
        return
    for volume in resource["spec"]["template"]["spec"].get("volumes") or []:
        if "configMap" in volume and volume["configMap"]["name"] in renamed:
            volume["configMap"]["name"] = renamed[volume["configMap"]["name"]]
