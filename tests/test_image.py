"""The images (Dockerfile, infra/image/build.sh): one source of truth, pinned, non-root, referenced consistently by
k8s/; linted with hadolint; and built and run as Kubernetes runs them (read-only root, uid 10001) where buildah
and podman are installed (`bash infra/image/build.sh tools`)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = (REPO / "Dockerfile").read_text()
BUILD = REPO / "infra" / "image" / "build.sh"


def _stages() -> dict[str, str]:
    """Stage name -> its text."""
    parts = re.split(r"^FROM ", DOCKERFILE, flags=re.M)[1:]
    return {re.match(r"\S+ AS (\S+)", p).group(1): p for p in parts}


def test_two_targets_from_one_base_non_root_with_tini():
    stages = _stages()
    assert {"base", "build-cpu", "build-cuda", "runtime", "cpu", "cuda"} <= set(stages)
    assert list(stages)[-1] == "cpu", "the default target (the last stage) is the CPU image"
    runtime = stages["runtime"]
    assert "USER 10001:10001" in runtime and 'ENTRYPOINT ["/usr/bin/tini", "--"]' in runtime
    assert "useradd --system --uid 10001" in stages["base"]
    assert "COPY --from=build-cpu /opt/oel /opt/oel" in stages["cpu"]
    assert "COPY --from=build-cuda /opt/oel /opt/oel" in stages["cuda"]
    # nothing runs as root after the runtime stage switches user, and the build stages leave no compiler behind
    assert "apt-get" not in stages["cpu"] + stages["cuda"] + stages["runtime"]


def test_every_python_install_is_pinned_by_constraints():
    script = (REPO / "docker" / "install-python.sh").read_text()
    installs = [
        line
        for line in script.splitlines()
        if re.search(r"\bpip install\b|\$pip\b", line) and "pip=" not in line and not line.strip().startswith("#")
    ]
    for line in installs:
        assert "$pip" in line or "--no-deps" in line or 'pip install "pip==' in line, line
    assert 'pip="pip install --find-links /tmp/wheels -c /tmp/constraints.txt"' in script
    assert "pip check" in script
    # the CUDA variant swaps the CPU torch pin for PyPI's torch of the same version, nothing else
    pinned = re.search(r"^torch==(\S+)$", (REPO / "constraints.txt").read_text(), re.M).group(1)
    assert pinned.split("+")[0] == "2.13.0" and "s/^torch==.*/torch==2.13.0/" in script
    assert "RUN pip" not in DOCKERFILE, "installs go through docker/install-python.sh"


def test_no_secret_or_wheel_reaches_a_layer():
    assert "--mount=type=secret,id=pip_ca" in DOCKERFILE
    ignore = (REPO / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*") if "*" in ignore else 0] == "*"  # deny by default
    assert "/docker/wheels/*.whl" in (REPO / ".gitignore").read_text()
    cuda = _stages()["build-cuda"]
    assert "docker/wheels" not in cuda, "the CUDA build must not carry the CPU wheel"


def test_k8s_names_the_two_images_consistently():
    import yaml

    kust = yaml.safe_load((REPO / "k8s" / "base" / "kustomization.yaml").read_text())
    images = {i["name"]: i for i in kust["images"]}
    assert images["oel"]["newName"] == images["oel-cuda"]["newName"]
    assert images["oel-cuda"]["newTag"] == images["oel"]["newTag"] + "-cuda"
    used: dict[str, set[str]] = {}
    for path in (REPO / "k8s" / "base").glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            spec = ((doc or {}).get("spec") or {}).get("template", {}).get("spec", {})
            for c in spec.get("containers", []) + spec.get("initContainers", []):
                used.setdefault(c["image"], set()).add(f"{doc['metadata']['name']}/{c['name']}")
    assert used.get("oel-cuda") == {"oel-learner/learner"}, used
    assert "oel" in used and all(not i.startswith("registry.") for i in used)


@pytest.mark.tools
def test_hadolint_is_clean():
    hadolint = shutil.which("hadolint") or str(Path(__import__("sys").executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint is not installed: bash infra/image/build.sh tools", pytrace=False)
    out = subprocess.run([hadolint, "--no-color", "Dockerfile"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.tools
@pytest.mark.slow
def test_image_builds_and_runs_non_root_with_a_read_only_root(tmp_path):
    """The whole path: a Debian base from the archive (no registry here), the cpu target, then `oel --help`,
    the default model's conversion and a processor start inside it (build.sh smoke). ~3 min with a warm layer
    cache, ~6 min cold."""
    for tool in ("buildah", "podman"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: bash infra/image/build.sh tools", pytrace=False)
    for step in ("base", "cpu", "smoke"):
        out = subprocess.run(["bash", str(BUILD), step], cwd=REPO, capture_output=True, text=True, timeout=1800)
        assert out.returncode == 0, f"build.sh {step} failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    assert "smoke: ok" in out.stderr


def test_every_package_of_pyproject_goes_into_the_image():
    """A top-level package that `pip install .` would install must pass .dockerignore and be copied by both build
    stages (a new package dir needs a line in each)."""
    import fnmatch
    import tomllib

    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = sorted(d.name for d in REPO.iterdir() if (d / "__init__.py").is_file() and any(fnmatch.fnmatch(d.name, p) for p in include))
    assert {"oel", "producers", "processors", "learner"} <= set(packages)
    ignore = (REPO / ".dockerignore").read_text().split()
    stages = _stages()
    for pkg in packages:
        assert f"!{pkg}/" in ignore, f".dockerignore keeps {pkg}/ out of the build context"
        for stage in ("build-cpu", "build-cuda"):
            assert f"COPY {pkg} ./{pkg}" in stages[stage], f"{stage} does not copy {pkg}/"
