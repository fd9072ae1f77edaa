"""The Dockerfile, checked without a Docker engine.

Static checks read its instructions: non-root, both entrypoints, installs from requirements/image.txt,
torch pinned as in pyproject.toml, and the lock satisfying pyproject's dependencies. The slow test runs
the builder stage's own instructions (ARG, ENV, WORKDIR, COPY, RUN) in a temporary root with a fresh
virtualenv, so the image's install commands are the ones tested, then runs `moeplace --help` and both
entrypoints' help from that virtualenv. pip's cache and the machine's pip configuration (find-links)
apply as on any install here.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO_ROOT / "Dockerfile"
LOCK = REPO_ROOT / "requirements" / "image.txt"
LOCK_PATH = "requirements/image.txt"
# What the emulation understands; anything else in the builder stage would go untested.
BUILDER_INSTRUCTIONS = {"ARG", "ENV", "WORKDIR", "COPY", "RUN"}


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, kind: str) -> list[str]:
        return [args for instruction, args in self.instructions if instruction == kind]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, with continuation lines joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif stages:
            stages[-1].instructions.append((instruction, args.strip()))
        elif instruction == "ARG":
            key, _, default = args.strip().partition("=")
            global_args[key] = default
    return global_args, stages


def expand(text: str, variables: dict[str, str]) -> str:
    """Docker's $VAR / ${VAR} substitution (unset variables expand to nothing)."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), ""), text)


def dockerfile() -> tuple[dict[str, str], Stage, Stage]:
    global_args, stages = parse_dockerfile(DOCKERFILE.read_text())
    builders = [stage for stage in stages if stage.name == "builder"]
    assert len(builders) == 1, "the Dockerfile needs exactly one stage named builder"
    return global_args, builders[0], stages[-1]


def arg_defaults(stage: Stage) -> dict[str, str]:
    return {key: default for key, _, default in (a.partition("=") for a in stage.args("ARG"))}


def env_values(stage: Stage) -> dict[str, str]:
    """The stage's ENV settings as written (unexpanded)."""
    pairs = (pair.partition("=") for args in stage.args("ENV") for pair in shlex.split(args))
    return {key: value for key, _, value in pairs}


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{LOCK_PATH}: {line!r} is not pinned with =="
            pins[canonicalize_name(name)] = version
    return pins


def pyproject_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["agent"]]


def test_builder_installs_the_lock_then_torch_then_the_package() -> None:
    _, builder, _ = dockerfile()
    assert {instruction for instruction, _ in builder.instructions} <= BUILDER_INSTRUCTIONS
    runs = builder.args("RUN")
    lock_installs = [
        i for i, run in enumerate(runs) if re.search(rf"pip install .*-r {re.escape(LOCK_PATH)}", run)
    ]
    torch_installs = [i for i, run in enumerate(runs) if "torch==" in run]
    package_installs = [i for i, run in enumerate(runs) if re.search(r"pip install --no-deps \.( |$)", run)]
    assert len(lock_installs) == len(torch_installs) == len(package_installs) == 1, runs
    assert lock_installs[0] < torch_installs[0] < package_installs[0]
    assert f"COPY {LOCK_PATH} {LOCK_PATH}" in [f"COPY {a}" for a in builder.args("COPY")]

    torch_run = runs[torch_installs[0]]
    for variable in ("TORCH_INDEX_URL", "TORCH_VERSION", "TORCH_VARIANT"):
        assert variable in torch_run and variable in arg_defaults(builder)
    assert "pip check" in runs[package_installs[0]]


def test_torch_version_matches_pyproject() -> None:
    _, builder, _ = dockerfile()
    torch = next(r for r in pyproject_requirements() if r.name == "torch")
    assert str(torch.specifier) == f"=={arg_defaults(builder)['TORCH_VERSION']}"


def test_lock_satisfies_pyproject_dependencies() -> None:
    pins = lock_pins()
    assert "torch" not in pins, "torch comes from TORCH_INDEX_URL, not the lock"
    for requirement in pyproject_requirements():
        if requirement.name == "torch" or (requirement.marker and not requirement.marker.evaluate()):
            continue
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is missing from {LOCK_PATH}: run requirements/lock-image.sh"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{LOCK_PATH} pins {name}=={pins[name]}, outside {requirement}: run requirements/lock-image.sh"
        )


def test_final_image_is_non_root_with_both_entrypoints() -> None:
    _, builder, final = dockerfile()
    assert final is not builder
    user = final.args("USER")
    assert len(user) == 1
    uid = user[0].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "USER must be a numeric non-root uid (runAsNonRoot checks it)"
    assert final.args("ENTRYPOINT") == ['["moeplace"]']
    assert final.args("CMD") == ['["operator"]']
    assert not [run for run in final.args("RUN") if "pip" in run], "the final stage installs nothing"
    venv = env_values(builder)["VIRTUAL_ENV"]
    assert env_values(final)["VIRTUAL_ENV"] == venv
    assert f"--from=builder {venv} {venv}" in final.args("COPY")


def test_image_leaves_out_the_dev_stack() -> None:
    _, builder, _ = dockerfile()
    sources = [source for args in builder.args("COPY") for source in shlex.split(args)[:-1]]
    assert not [source for source in sources if source.split("/")[0] == "dev"], sources
    where = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert "dev" not in where["where"], "moeplace_dev is its own distribution (dev/pyproject.toml)"


def host_index_url() -> str:
    """The index this machine's pip uses, for TORCH_INDEX_URL (the pytorch.org index is not reachable
    here; the machine's find-links hold the same CPU wheel)."""
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"]
    listing = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
    ).stdout
    match = re.search(r"^(?:global|install|:env:)\.index-url='([^']+)'", listing, re.MULTILINE)
    return match.group(1) if match else "https://pypi.org/simple"


def run_builder_stage(root: Path, build_args: dict[str, str]) -> dict[str, str]:
    """Runs the builder stage under ``root`` (container paths map to root/...); returns its ENV."""
    global_args, builder, _ = dockerfile()
    shim = root / "shim"
    shim.mkdir(parents=True)
    # The base image's `python` is Python 3.11; here it is the interpreter running the tests.
    (shim / "python").symlink_to(sys.executable)
    # A clean process environment, as in a container: nothing may leak the test's own packages in.
    leaks = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV"}
    env = {key: value for key, value in os.environ.items() if key not in leaks}
    env["PATH"] = f"{shim}:{env['PATH']}"
    workdir = root
    for instruction, args in builder.instructions:
        if instruction == "ARG":
            key, _, default = args.partition("=")
            env[key] = build_args.get(key, expand(default, env) or global_args.get(key, ""))
        elif instruction == "ENV":
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                value = expand(value, env)
                # A single container path is moved under root; PATH-like lists were built from it.
                env[key] = (
                    str(root / value.lstrip("/")) if value.startswith("/") and ":" not in value else value
                )
        elif instruction == "WORKDIR":
            workdir = root / args.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif instruction == "COPY":
            *sources, destination = shlex.split(args)
            target = root / destination.lstrip("/") if destination.startswith("/") else workdir / destination
            for source in sources:
                copy_into(REPO_ROOT / source, target, many=len(sources) > 1 or destination.endswith("/"))
        elif instruction == "RUN":
            result = subprocess.run(
                ["/bin/sh", "-c", args], cwd=workdir, env=env, capture_output=True, text=True
            )
            assert result.returncode == 0, f"RUN {args}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return env


def copy_into(source: Path, target: Path, many: bool) -> None:
    """COPY semantics: a directory's contents go to target; files go into a target directory when
    several are copied or the target ends in /, else to the target path."""
    if source.is_dir():
        shutil.copytree(
            source, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
        )
        return
    destination = target / source.name if many else target
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, destination)


@pytest.mark.slow
def test_image_install_commands_give_a_working_moeplace(tmp_path: Path) -> None:
    _, builder, _ = dockerfile()
    env = run_builder_stage(tmp_path, {"TORCH_INDEX_URL": host_index_url()})
    bin_dir = Path(env["VIRTUAL_ENV"]) / "bin"
    for argv in (["--help"], ["operator", "--help"], ["agent", "--help"]):
        result = subprocess.run(
            [str(bin_dir / "moeplace"), *argv], env=env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, f"moeplace {' '.join(argv)}:\n{result.stdout}\n{result.stderr}"
        assert "usage: moeplace" in result.stdout
        if argv == ["--help"]:
            commands = set(re.findall(r"^    (\w+)", result.stdout, re.MULTILINE))
            assert {"operator", "agent"} <= commands and not {"cluster", "demo"} & commands, commands
    probe = (
        "import importlib.util, torch, moe_agent, moe_operator, moe_placement; "
        "assert importlib.util.find_spec('moeplace_dev') is None, 'the dev stack is in the image'; "
        "print(torch.__version__)"
    )
    result = subprocess.run(
        [str(bin_dir / "python"), "-c", probe], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    defaults = arg_defaults(builder)
    assert result.stdout.strip() == f"{defaults['TORCH_VERSION']}+{defaults['TORCH_VARIANT']}"
