"""Packaging: what each install holds, the Docker image's lock, and a prompt `docker stop`.

- pyproject.toml's extras keep torch out of the serving install, and no install the Makefile
  makes (`make demo`, `make install`/`test`, ORT=cpu or gpu) gets both onnxruntime wheels;
  every third-party import is declared where it is needed, and nothing declared goes unused.
- serving/requirements.lock pins exactly the versions serving/requirements.txt names, each
  with hashes, and the Dockerfile installs that lock and nothing else.
- SIGTERM to the app as PID 1 of a new PID namespace (what `docker stop` does to the image)
  stops it in about a second, with exit code 0.
- slow: `make demo` in a fresh venv, and the Docker-equivalent venv built from the lock,
  hold no torch and serve the shipped models.
"""

from __future__ import annotations

import ast
import contextlib
import fnmatch
import importlib.metadata
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.synthetic import CIFAR_CLASSES as CIFAR_CLASS_NAMES

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
REQUIREMENTS = ROOT / "serving" / "requirements.txt"
LOCK = ROOT / "serving" / "requirements.lock"
RUNTIMES = {"onnxruntime", "onnxruntime-gpu"}  # one module, two wheels: never both
# Never in the serving install (base + one runtime) or the Docker image.
TORCH_FAMILY = re.compile(r"torch.*|triton|nvidia-.*|cuda-.*|onnxscript|onnx")
LOCAL_PACKAGES = {"toolkit", "serving", "tests", "benchmarks"}
# Declared but reached without an import statement of its own.
INDIRECT = {
    "tensorboard": "toolkit/run/folder.py writes events through torch.utils.tensorboard",
    "ruff": "a command: make lint runs it",
    "onnxscript": "torch.onnx.export(dynamo=True) imports it (toolkit/export/onnx_graph.py)",
}
# Modules of extras `make test` does not install: (module -> its distribution), so the import
# is still checked against what pyproject.toml declares.
NOT_INSTALLED = {"airbench": "airbench"}  # the `bench` extra: benchmarks/speedrun.py's peer
STARTUP_TIMEOUT_S = 60
CIFAR_CLASSES = set(CIFAR_CLASS_NAMES)


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return normalize(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1))


def names(requirements: list[str]) -> set[str]:
    return {requirement_name(r) for r in requirements}


def extra(name: str) -> set[str]:
    return names(PYPROJECT["project"]["optional-dependencies"][name])


BASE = names(PYPROJECT["project"]["dependencies"])


def read_pins(path: Path) -> dict[str, str]:
    """name -> version of a requirements file's `name==version` lines."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and re.fullmatch(r"[0-9][0-9a-z.+]*", version), f"not pinned: {line}"
            pins[normalize(name)] = version
    return pins


def read_lock(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, sha256 hashes) of a hashed lock (pip-compile / uv format)."""
    lines = [line.split(" #", 1)[0] for line in path.read_text().splitlines()]
    lines = [line for line in lines if not line.strip().startswith("#")]
    entries = {}
    for logical in "\n".join(lines).replace("\\\n", " ").splitlines():
        if not logical.strip():
            continue
        requirement = logical.split("--hash", 1)[0].split(";", 1)[0].strip()
        name, sep, version = requirement.partition("==")
        assert sep, f"not pinned with ==: {logical.strip()}"
        hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})\b", logical)
        entries[normalize(name)] = (version.strip(), hashes)
    return entries


# --- (a) what each install holds ------------------------------------------------------------


def test_the_lock_pins_exactly_the_serving_requirements_with_hashes():
    pins = read_pins(REQUIREMENTS)
    lock = read_lock(LOCK)
    assert {name: lock.get(name, ("missing",))[0] for name in pins} == pins
    unhashed = [name for name, (_, hashes) in lock.items() if not hashes]
    assert not unhashed, f"entries without hashes: {unhashed}"
    assert "onnxruntime" in lock and "onnxruntime-gpu" not in lock
    assert not [name for name in lock if TORCH_FAMILY.fullmatch(name)]
    # Compiled for the image's Python (the Dockerfile's FROM line).
    header = LOCK.read_text()[:600]
    assert "--generate-hashes" in header and "--python-version 3.11" in header
    assert re.search(r"^FROM python:3\.11-", (ROOT / "Dockerfile").read_text(), re.M)


def test_serving_requirements_name_what_serving_imports():
    imported = {dist for dist, _ in third_party_imports(ROOT / "serving")}
    assert set(read_pins(REQUIREMENTS)) == {
        "onnxruntime" if dist in RUNTIMES else dist for dist in imported
    }


def test_extras_keep_torch_out_of_serving_and_a_runtime_in_cpu_or_gpu_only():
    optional = PYPROJECT["project"]["optional-dependencies"]
    assert extra("cpu") == {"onnxruntime"} and extra("gpu") == {"onnxruntime-gpu"}
    for name in set(optional) - {"cpu", "gpu"}:
        assert not extra(name) & RUNTIMES, f"extra {name!r} names an onnxruntime wheel"
    assert not BASE & RUNTIMES
    serving = BASE | extra("cpu") | extra("gpu")
    assert not [name for name in serving if TORCH_FAMILY.fullmatch(name)]
    assert not serving & extra("train")
    assert {"torch", "torchvision", "onnx"} <= extra("train")


def make_installs(target: str, ort: str, tmp_path: Path) -> list[set[str]]:
    """The extras of each `.[...]` install `make TARGET ORT=...` runs (dry run, from scratch)."""
    done = subprocess.run(
        ["make", "-n", "-B", target, f"ORT={ort}", f"VENV={tmp_path / 'venv'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return [set(spec.split(",")) for spec in set(re.findall(r"\.\[([\w,-]+)\]", done.stdout))]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("ort", ["cpu", "gpu"])
@pytest.mark.parametrize("target", ["demo", "install", "test", "test-all", "artifacts"])
def test_make_installs_one_runtime_and_the_demo_no_torch(target, ort, tmp_path):
    installs = make_installs(target, ort, tmp_path)
    assert installs, f"make {target} installs nothing?"
    wheel = {"cpu": "onnxruntime", "gpu": "onnxruntime-gpu"}[ort]
    for extras in installs:
        packages = BASE.union(*(extra(name) for name in extras))
        assert packages & RUNTIMES == {wheel}, f"make {target} ORT={ort}: .[{','.join(extras)}]"
        if target == "demo":
            assert not [name for name in packages if TORCH_FAMILY.fullmatch(name)], extras
        else:
            assert {"train", "dev"} <= extras


def third_party_imports(folder: Path) -> Iterator[tuple[str, str]]:
    """(distribution, module) for every import of a non-stdlib, non-local module under folder,
    `pytest.importorskip("x")` included; a namespace module maps to all its distributions."""
    distributions = importlib.metadata.packages_distributions()
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module]
            elif (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", None) == "importorskip"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                modules = [node.args[0].value]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top in LOCAL_PACKAGES:
                    continue
                found = distributions.get(top)
                if not found and top in NOT_INSTALLED:
                    found = [NOT_INSTALLED[top]]
                assert found, f"{path.relative_to(ROOT)} imports {module}: not installed"
                for dist in found:
                    yield normalize(dist), module


@pytest.mark.parametrize(
    ("folder", "allowed"),
    [
        ("serving", BASE | RUNTIMES),
        ("toolkit", BASE | RUNTIMES | extra("train")),
        ("benchmarks", BASE | RUNTIMES | extra("train") | extra("dev") | extra("bench")),
        ("tests", BASE | RUNTIMES | extra("train") | extra("dev")),
    ],
)
def test_every_import_is_declared_where_it_is_needed(folder, allowed):
    by_module: dict[str, set[str]] = {}
    for dist, module in third_party_imports(ROOT / folder):
        by_module.setdefault(module, set()).add(dist)
    undeclared = {m: d for m, d in by_module.items() if not d & allowed}
    assert not undeclared, f"{folder}/ imports modules no dependency it may use declares"


def test_every_declared_dependency_is_imported():
    imported = {
        dist for folder in sorted(LOCAL_PACKAGES) for dist, _ in third_party_imports(ROOT / folder)
    }
    if imported & RUNTIMES:  # either wheel provides the `onnxruntime` module
        imported |= RUNTIMES
    declared = BASE | extra("train") | extra("dev") | extra("bench") | extra("cpu") | extra("gpu")
    unused = declared - imported - set(INDIRECT)
    assert not unused, f"declared but never imported: {sorted(unused)}"


def test_the_serving_path_imports_no_torch():
    """`toolkit serve` loads toolkit.cli and serving.app: no training module among them."""
    probe = (
        "import sys, toolkit.cli, serving.app; "
        "print(sorted({m.split('.')[0] for m in sys.modules}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    loaded = set(ast.literal_eval(done.stdout.strip().splitlines()[-1]))
    training = {"torch", "torchvision", "onnx", "onnxscript", "sklearn", "matplotlib"}
    assert not loaded & training


def test_the_install_ships_every_package():
    """Every folder of modules is a package that pyproject's discovery includes. A subpackage
    without an __init__.py (serving/page/, toolkit/cli/) imports from a checkout but is left
    out of a wheel (setuptools' find only descends into packages), and `toolkit serve` from an
    installed copy would not start."""
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    folders = {
        path.parent for package in ("toolkit", "serving") for path in (ROOT / package).rglob("*.py")
    }
    names = {".".join(folder.relative_to(ROOT).parts) for folder in folders}
    assert sorted(f for f in folders if not (f / "__init__.py").is_file()) == []
    assert sorted(n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in include)) == []


def test_the_version_is_written_once():
    assert "version" not in PYPROJECT["project"]
    assert "version" in PYPROJECT["project"]["dynamic"]
    attr = PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    module, _, name = attr.rpartition(".")
    source = ROOT / (module.replace(".", "/") + ".py")
    assignments = {
        target.id: node.value.value
        for node in ast.parse(source.read_text()).body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
        for target in node.targets
    }
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", assignments[name])
    others = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "toolkit").rglob("*.py")
        if path != source and re.search(r"^__version__\s*=\s*['\"]", path.read_text(), re.M)
    ]
    assert not others, f"a second copy of the version in {others}"


# --- the Dockerfile -------------------------------------------------------------------------


def dockerfile_steps() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines = [line for line in (ROOT / "Dockerfile").read_text().splitlines()]
    joined = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
    steps = []
    for line in joined.replace("\\\n", " ").splitlines():
        if line.strip():
            kind, _, args = line.strip().partition(" ")
            steps.append((kind.upper(), args.strip()))
    return steps


def dockerfile_pip_arguments() -> list[str]:
    """The arguments after `pip` of the Dockerfile's one pip command."""
    runs = [args.split() for kind, args in dockerfile_steps() if kind == "RUN" and "pip" in args]
    assert len(runs) == 1, runs
    return runs[0][1:]


def test_the_dockerfile_installs_only_the_lock_and_stops_promptly():
    steps = dockerfile_steps()
    kinds = [kind for kind, _ in steps]
    assert steps[0][0] == "FROM" and re.fullmatch(r"python:3\.11-slim\S*", steps[0][1])
    pip = dockerfile_pip_arguments()
    assert pip[0] == "install" and {"--require-hashes", "--no-deps"} <= set(pip)
    assert pip[pip.index("-r") + 1] == "serving/requirements.lock"
    copied = [args.split()[0] for kind, args in steps if kind in ("COPY", "ADD")]
    assert copied == ["serving/requirements.lock", "serving/", "artifacts/"]  # no toolkit
    user = [args for kind, args in steps if kind == "USER"]
    assert user and user[-1] not in ("root", "0")
    assert kinds.index("USER") < kinds.index("CMD")
    assert ("EXPOSE", "7860") in steps and "HEALTHCHECK" in kinds
    # Healthy means ready: every model loaded (the inference API's probe, no password needed).
    health = dict(steps)["HEALTHCHECK"]
    assert "http://127.0.0.1:7860/v2/health/ready" in health
    # Exec form, no ENTRYPOINT: python is PID 1 and gets the stop signal, which it handles.
    assert "ENTRYPOINT" not in kinds
    command = json.loads(dict(steps)["CMD"])
    assert command[:3] == ["python", "-m", "serving.app"]
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert dict(steps).get("STOPSIGNAL", "SIGTERM") == "SIGTERM"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"toolkit", "tests", ".venv"} <= set(ignored)


# --- (b) SIGTERM to the app as PID 1 --------------------------------------------------------


def pid_namespace_command() -> list[str] | None:
    """`unshare ...` that runs a command as PID 1 of a new PID namespace, or None here."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    for prefix in (
        [unshare, "--pid", "--fork", "--mount-proc"],
        [unshare, "--user", "--map-root-user", "--pid", "--fork", "--mount-proc"],
    ):
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            if subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0:
                return prefix
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str) -> bool:
    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
        return response.status == 200
    return False


def wait_until_up(url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = process.stdout.read() if process.stdout else ""
            raise AssertionError(f"exited with {process.returncode} before answering:\n{output}")
        if answers(url):
            return
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer within {timeout} s")


@contextlib.contextmanager
def as_pid1(
    prefix: list[str], command: list[str], **popen
) -> Iterator[tuple[subprocess.Popen, int]]:
    """Run command as PID 1 of a new PID namespace: (the unshare process, the command's PID
    as this namespace sees it, to signal the way `docker stop` does: from outside)."""
    process = subprocess.Popen(
        [*prefix, *command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen
    )
    pid = None
    try:
        deadline = time.monotonic() + 10
        while pid is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError, IndexError):
                pid = int(
                    Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()[0]
                )
            time.sleep(0.02)
        assert pid is not None, "unshare started no child"
        status = Path(f"/proc/{pid}/status").read_text()
        assert re.search(r"^NSpid:\s+\d+\s+1$", status, re.M), "not PID 1 of its namespace"
        yield process, pid
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            process.kill()
        process.communicate(timeout=10)


@pytest.fixture(scope="module")
def pid1_prefix() -> list[str]:
    prefix = pid_namespace_command()
    if prefix is None:
        pytest.skip("no PID namespaces here (unshare missing or not permitted)")
    return prefix


def test_pid1_ignores_an_unhandled_sigterm(pid1_prefix):
    """The harness is faithful: a PID-1 python with no handler sits out SIGTERM, as it would in
    a container (where `docker stop` then waits 10 s and sends SIGKILL)."""
    sleeper = [sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(60)"]
    with as_pid1(pid1_prefix, sleeper) as (process, pid):
        assert process.stdout.readline().strip() == "ready"
        os.kill(pid, signal.SIGTERM)
        with pytest.raises(subprocess.TimeoutExpired):
            process.wait(timeout=1)


def test_the_app_as_pid1_stops_promptly_on_sigterm(pid1_prefix):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRADIO_", "TOOLKIT_AUTH"))}
    app = [sys.executable, "-m", "serving.app", "--artifacts", "artifacts", "--port", str(port)]
    with as_pid1(pid1_prefix, app, cwd=ROOT, env=env) as (process, pid):
        wait_until_up(f"http://127.0.0.1:{port}/", process, STARTUP_TIMEOUT_S)
        started = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        code = process.wait(timeout=10)  # Docker's grace period
        elapsed = time.monotonic() - started
        output = process.stdout.read()
    assert code == 0, output[-2000:]
    assert elapsed < 5, f"took {elapsed:.1f} s to stop"
    assert "Traceback" not in output, output[-2000:]
    assert not answers(f"http://127.0.0.1:{port}/")


# --- (c) slow: the environments themselves --------------------------------------------------


def serve_check(python: Path, url: str, example: Path) -> None:
    """No torch in the environment, / answers, and one prediction through the public API."""
    probe = subprocess.run([str(python), "-c", "import torch"], capture_output=True, timeout=60)
    assert probe.returncode != 0, "torch must not be in the serving environment"
    installed = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.metadata as m; print([d.name for d in m.distributions()])",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    dists = {normalize(name) for name in ast.literal_eval(installed.stdout.strip())}
    assert dists & RUNTIMES == {"onnxruntime"}
    from gradio_client import Client, handle_file

    result = Client(url, verbose=False).predict(handle_file(str(example)), api_name="/predict")
    assert result["label"] in CIFAR_CLASSES | {"not sure"}
    assert result["confidences"][0]["label"] in CIFAR_CLASSES


def copy_checkout(dest: Path, parts: list[str]) -> Path:
    dest.mkdir(parents=True)
    for part in parts:
        source = ROOT / part
        if source.is_dir():
            shutil.copytree(source, dest / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, dest / part)
    return dest


def start_group(command: list, cwd: Path) -> subprocess.Popen:
    """`command` in a process group of its own (stopped by stop_group), output captured, with
    no Gradio or auth settings of this environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRADIO_", "TOOLKIT_AUTH"))}
    return subprocess.Popen(
        [str(c) for c in command],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def stop_group(process: subprocess.Popen) -> str:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        output, _ = process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
    return output


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_builds_a_torch_free_venv_and_serves(tmp_path):
    """`make demo` on a fresh checkout, its venv under tmp: no torch, the page answers."""
    checkout = copy_checkout(
        tmp_path / "checkout",
        ["Makefile", "pyproject.toml", "README.md", "toolkit", "serving", "artifacts"],
    )
    port = free_port()
    venv_dir = tmp_path / "venv"
    process = start_group(["make", "demo", f"VENV={venv_dir}", f"PORT={port}"], checkout)
    output = ""
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 900
        while not answers(url):
            assert process.poll() is None, f"make demo exited with {process.returncode}"
            assert time.monotonic() < deadline, "make demo did not answer within 900 s"
            time.sleep(0.5)
        serve_check(
            venv_dir / "bin" / "python",
            url,
            checkout / "artifacts" / "examples" / "cifar10" / "horse_0.png",
        )
    finally:
        output = stop_group(process)
        print(output[-3000:])  # shown by pytest only when the test fails


@pytest.mark.slow
def test_the_docker_equivalent_venv_from_the_lock_serves(tmp_path):
    """What the Dockerfile builds: a fresh venv, the Dockerfile's own pip arguments on the
    hashed lock, only serving/ and artifacts/ beside it (no torch, no toolkit)."""
    image = copy_checkout(tmp_path / "app", ["serving", "artifacts"])
    venv.create(tmp_path / "venv", with_pip=True)
    python = tmp_path / "venv" / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", *dockerfile_pip_arguments()],
        cwd=image,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    check = subprocess.run([str(python), "-m", "pip", "check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    port = free_port()
    command = [python, "-m", "serving.app", "--artifacts", "artifacts", "--port", port]
    process = start_group(command, image)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_until_up(url, process, STARTUP_TIMEOUT_S)
        serve_check(python, url, image / "artifacts" / "examples" / "cifar10" / "horse_0.png")
    finally:
        print(stop_group(process)[-3000:])
