"""The wheel carries the Avro schemas: built, installed into a fresh virtualenv, run from outside the repository."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


def test_wheel_installed_in_a_fresh_venv_loads_its_schemas(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    # Built the way a release is (isolated build environment from pyproject's build-system).
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(REPO)],
        cwd=tmp_path,
        timeout=300,
    )
    (wheel,) = wheels.glob("streamserve-*.whl")

    fresh = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(fresh)
    python = fresh / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)], cwd=tmp_path)
    # The dependencies (onnxruntime, confluent-kafka, ...) come from this environment, appended after the fresh
    # venv's own site-packages as a plain path: the editable install of the repository living there is not
    # activated (its .pth is not processed), so streamserve itself can only come from the wheel.
    site_packages = Path(
        _run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path
        ).stdout.strip()
    )
    (site_packages / "zz_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    elsewhere = tmp_path / "elsewhere"  # no schemas/ directory anywhere near the working directory
    elsewhere.mkdir()
    probe = (
        "import streamserve, streamserve.schemas as s; "
        "from streamserve.control.announcements import ModelAnnouncement; "
        "print(streamserve.__file__); print(','.join(s.names())); s.bundled('model_announcement')"
    )
    out = _run([str(python), "-c", probe], cwd=elsewhere).stdout.splitlines()
    assert out[0].startswith(str(fresh)), f"streamserve imported from {out[0]}, not from the wheel in {fresh}"
    assert set(out[1].split(",")) >= {"card_transaction", "prediction", "model_announcement", "worker_status"}

    help_text = _run([str(fresh / "bin" / "streamserve"), "models", "publish", "--help"], cwd=elsewhere).stdout
    assert "--version" in help_text
