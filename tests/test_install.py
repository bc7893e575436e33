"""Installing and running the workflow on someone else's machine: declared dependencies, the workflow profile
Snakemake applies by itself, the `--sdm conda` environment, and `make setup` without root."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def declared_distributions() -> set[str]:
    project = PYPROJECT["project"]
    specs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        specs += extra
    return {Requirement(spec).name.lower().replace("_", "-") for spec in specs}


def imported_top_level_modules(root: Path) -> set[str]:
    modules = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return modules


def test_every_imported_package_is_declared():
    stdlib = set(sys.stdlib_module_names)
    third_party = imported_top_level_modules(REPO / "src") - stdlib - {"speechllm"}
    module_to_dists = packages_distributions()
    declared = declared_distributions()
    undeclared = {}
    for module in sorted(third_party):
        dists = {d.lower().replace("_", "-") for d in module_to_dists.get(module, [module])}
        if not dists & declared:
            undeclared[module] = sorted(dists)
    assert not undeclared, f"imported by src/ but not declared in pyproject.toml: {undeclared}"


def test_dependencies_are_ranges_and_constraints_pin_them():
    """pyproject admits a cluster's compatible versions; requirements/constraints.txt pins what was tested."""
    pins = {}
    for line in (REPO / "requirements/constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.lower().replace("_", "-")] = version
    for spec in PYPROJECT["project"]["dependencies"]:
        req = Requirement(spec)
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not pinned in requirements/constraints.txt (run `make constraints`)"
        assert req.specifier.contains(pins[name]), (
            f"constraints pin {name}=={pins[name]} outside {req.specifier}"
        )
    torch = next(Requirement(s) for s in PYPROJECT["project"]["dependencies"] if s.startswith("torch>"))
    assert len(list(torch.specifier.filter(["2.11.0", "2.12.0", "2.13.1"]))) == 3


def snakemake_dry_run(workdir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "WANDB_MODE": "offline"}
    return subprocess.run(
        [str(BIN / "snakemake"), "-n", "-d", str(workdir), *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def test_plain_dry_run_applies_the_default_workflow_profile(tmp_path):
    res = snakemake_dry_run(tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert "workflow specific profile profiles/default" in out
    # printshellcmds from the profile: the dry run shows the `speechllm` command of each job
    assert "speechllm data demo --settings" in out


def test_conda_post_deploy_installs_this_repository(tmp_path):
    """The post-deploy script pip-installs the repository that the Snakefile names, wherever the env file was
    copied to (a stand-in `python` records the call)."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    record = tmp_path / "calls.txt"
    (fake_bin / "python").write_text(f'#!/bin/sh\necho "$@" >> {record}\n')
    (fake_bin / "python").chmod(0o755)
    copied = tmp_path / "elsewhere" / "env.post-deploy.sh"
    copied.parent.mkdir()
    shutil.copy(REPO / "envs/speechllm.post-deploy.sh", copied)
    env = {"PATH": f"{fake_bin}:/usr/bin:/bin", "SPEECHLLM_REPO": str(REPO)}
    subprocess.run(["bash", str(copied)], check=True, env=env, cwd=tmp_path)
    call = record.read_text()
    assert f"-e {REPO}[summarization]" in call and f"-c {REPO}/requirements/constraints.txt" in call
    res = subprocess.run(["bash", str(copied)], env={"PATH": env["PATH"]}, capture_output=True, text=True)
    assert res.returncode != 0 and "SPEECHLLM_REPO is not set" in res.stderr


def test_snakefile_exports_the_repository_for_the_conda_env():
    assert "os.environ.update(SPEECHLLM_REPO=workflow.basedir)" in (REPO / "Snakefile").read_text()
    env_file = yaml.safe_load((REPO / "envs/speechllm.yaml").read_text())
    assert not [dep for dep in env_file["dependencies"] if isinstance(dep, dict)], (
        "pip installs go post-deploy"
    )


@pytest.mark.slow
def test_conda_environment_builds(tmp_path):
    conda = shutil.which("conda")
    if conda is None:
        pytest.skip(
            "conda is not installed here (Snakemake's --sdm conda needs it); the post-deploy script is "
            "tested with a stand-in above"
        )
    probe = subprocess.run(
        [conda, "search", "-c", "conda-forge", "--override-channels", "espeak-ng"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if probe.returncode != 0:
        pytest.skip(f"conda-forge is not reachable from here: {probe.stderr.strip()[-200:]}")
    res = subprocess.run(
        [
            str(BIN / "snakemake"),
            "--sdm",
            "conda",
            "--conda-create-envs-only",
            "--conda-prefix",
            str(tmp_path / "envs"),
            "-d",
            str(tmp_path),
            "-c1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    (env_dir,) = [p for p in (tmp_path / "envs").iterdir() if p.is_dir() and (p / "bin/python").exists()]
    where = subprocess.run(
        [str(env_dir / "bin/python"), "-c", "import speechllm; print(speechllm.__file__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.startswith(str(REPO / "src"))


def as_unprivileged(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: cannot check the non-root path")
    return [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]


def test_setup_without_root_reports_missing_espeak():
    """Without root and without espeak-ng, set-up goes on and says what the demo needs; `make demo` stops."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    with tempfile.TemporaryDirectory() as scratch:  # pytest's tmp_path is private to root
        tree = Path(scratch)
        tree.chmod(0o777)
        shutil.copy(REPO / "Makefile", tree / "Makefile")
        check_setup_without_root(make, tree)


def check_setup_without_root(make: str, tree: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tree), "ESPEAK_NG": "espeak-ng-not-installed"}
    setup = subprocess.run(
        as_unprivileged([make, "-s", "-C", str(tree), "system-deps"]),
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert setup.returncode == 0, setup.stderr
    assert "espeak-ng is not installed" in setup.stdout and "apt-get install -y espeak-ng" in setup.stdout
    demo = subprocess.run(
        as_unprivileged([make, "-s", "-C", str(tree), "demo-deps"]),
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert demo.returncode != 0 and "make demo needs espeak-ng" in demo.stdout
    assert not (tree / ".config").exists(), "set-up wrote into the user's home"
