"""Nothing reaches for the internet: the whole flow (train on a folder, evaluate, export,
predict, package, serve the page and the inference API) runs with no network.

Two fences, each where it can be put up:
- a network namespace with loopback only (`unshare -rn`, then `ip link set lo up`): no
  packet can leave, whoever sends it;
- tests/offline/sitecustomize.py, first on PYTHONPATH: in every Python process it refuses, and
  writes down, each name lookup of and connection to a host other than this machine. A
  reach-out that a library survives quietly (an analytics ping, a version check that catches
  its own error) is therefore still seen, and fails the test with the stack that made it.
The flow runs behind both where the machine allows namespaces, behind the guard alone where
not; it skips only when neither can be arranged. The two tests after the flow prove that each
fence really stops a connection. What does reach out on request (the official datasets'
download, `--pretrained` from the Hugging Face hub) says so in its help and, offline, fails
at once with one line (the hub's case: tests/test_backbones.py).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.synthetic import write_image_folder

ROOT = Path(__file__).resolve().parents[1]
GUARD_DIR = ROOT / "tests" / "offline"
LOG_ENV = "TOOLKIT_OFFLINE_LOG"
CLASSES = ("circles", "stripes")
PER_CLASS = {"train": 12, "test": 4}
# Settings that would hide a reach-out the product makes by default: the flow gets none.
HIDING_ENV = ("GRADIO_", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
# A documentation address (TEST-NET-1, RFC 5737): routed nowhere, so only a fence answers fast.
FAR_ADDRESS = "192.0.2.1"


@functools.cache
def namespace_prefix() -> tuple[str, ...] | None:
    """The command prefix that runs a command in a new network namespace with only loopback
    up, or None where this machine does not allow one."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return None
    prefix = ("unshare", "-rn", "sh", "-c", 'ip link set lo up && exec "$@"', "offline")
    done = subprocess.run([*prefix, "true"], capture_output=True)
    return prefix if done.returncode == 0 else None


def offline(command: list[str]) -> list[str]:
    """`command` behind the namespace where there is one (the guard comes with the env)."""
    return [*(namespace_prefix() or []), *command]


def guarded_env(log: Path) -> dict[str, str]:
    """This environment minus what would hide a reach-out, plus the guard, logging to `log`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(HIDING_ENV)}
    path = [str(GUARD_DIR), str(ROOT), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
    env[LOG_ENV] = str(log)
    return env


def attempts(log: Path) -> list[dict]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def describe(found: list[dict]) -> str:
    return "\n\n".join(
        f"{a['what']} {a['target']} from {' '.join(a['argv'])}:\n{''.join(a['stack'])}"
        for a in found
    )


# Tries the guard in a fresh process: what each attempt raised, and a loopback round trip.
PROBE = textwrap.dedent(
    f"""
    import json, socket, urllib.request

    def outcome(attempt):
        try:
            attempt()
            return "reached"
        except OSError as exc:
            return type(exc).__name__

    server = socket.create_server(("127.0.0.1", 0))
    socket.create_connection(server.getsockname(), timeout=5).close()
    print(json.dumps({{
        "connect": outcome(lambda: socket.create_connection(("{FAR_ADDRESS}", 80), timeout=5)),
        "lookup": outcome(lambda: socket.getaddrinfo("example.com", 443)),
        "urlopen": outcome(lambda: urllib.request.urlopen("http://example.com/", timeout=5)),
        "guarded": "sitecustomize" in socket.getaddrinfo.__module__,
    }}))
    """
)


def guard_works(log: Path) -> bool:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env=guarded_env(log), capture_output=True, text=True
    )
    return done.returncode == 0 and json.loads(done.stdout)["guarded"]


def test_the_whole_flow_reaches_for_nothing_beyond_this_machine(tmp_path):
    log = tmp_path / "reach-outs.jsonl"
    if not guard_works(tmp_path / "probe.jsonl") and namespace_prefix() is None:
        pytest.skip("neither a network namespace nor the in-process guard can be arranged")
    write_image_folder(tmp_path / "data", classes=CLASSES, per_class=PER_CLASS, size=16)
    command = [sys.executable, "-m", "tests.offline_flow", str(tmp_path)]
    done = subprocess.run(
        offline(command),
        cwd=ROOT,
        env=guarded_env(log),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr
    flow = json.loads((tmp_path / "flow.json").read_text())

    # Nobody tried, and the flow still did all of its work.
    found = attempts(log)
    assert found == [], "reached for the network:\n" + describe(found)
    for step in flow["steps"]:
        assert step["rc"] == 0, f"toolkit {step['command']} failed:\n{step['stderr']}"
    assert [s["command"] for s in flow["steps"]] == [
        "train",
        "evaluate",
        "export",
        "predict",
        "package",
    ]
    predicted = flow["steps"][3]["stdout"].splitlines()
    assert len(predicted) == len(CLASSES) * PER_CLASS["test"], predicted

    served = flow["served"]
    assert "error" not in served, served
    assert served["server"]["rc"] == 0, served["server"]["output"]
    assert served["page"] == {
        "status": 200,
        "title": "toolkit · image classifier",
        "analytics_enabled": False,  # the page's own JavaScript pings nobody either
        "stylesheets": [],
    }
    assert served["external_references"] == []  # the page loads nothing from other hosts
    assert "event: complete" in served["page_predict"], served["page_predict"]
    assert any(c in served["page_predict"] for c in CLASSES), served["page_predict"]
    assert served["metadata"]["name"] == "shapes-net"
    assert served["classify"]["status"] == 200
    assert {c["label"] for c in served["classify"]["answer"]["confidences"]} == set(CLASSES)


def test_the_guard_refuses_and_records_a_connection_beyond_this_machine(tmp_path):
    """The flow's empty record means something only if the guard sees and stops a real
    attempt: a connect to an address, a name lookup, an HTTP request; loopback still works."""
    log = tmp_path / "reach-outs.jsonl"
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env=guarded_env(log), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "connect": "OSError",
        "lookup": "gaierror",
        "urlopen": "URLError",
        "guarded": True,
    }
    found = attempts(log)
    assert [(a["what"], a["target"]) for a in found] == [
        ("connect", f"('{FAR_ADDRESS}', 80)"),
        ("getaddrinfo", "'example.com'"),
        ("getaddrinfo", "'example.com'"),
    ]
    assert "in create_connection" in "".join(found[0]["stack"])  # who tried, for the report


def test_the_namespace_has_loopback_and_no_route_out():
    """The other fence: inside it, loopback answers and an outside address is unreachable at
    once (no guard here: the kernel refuses)."""
    prefix = namespace_prefix()
    if prefix is None:
        pytest.skip("no network namespaces on this machine (the flow ran behind the guard)")
    code = textwrap.dedent(
        f"""
        import errno, socket
        server = socket.create_server(("127.0.0.1", 0))
        socket.create_connection(server.getsockname(), timeout=5).close()
        try:
            socket.create_connection(("{FAR_ADDRESS}", 80), timeout=5)
            print("reached")
        except OSError as exc:
            print(errno.errorcode.get(exc.errno, exc))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != LOG_ENV}
    done = subprocess.run(
        [*prefix, sys.executable, "-c", code], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ENETUNREACH"


# --- what reaches out on request --------------------------------------------------------------


def test_what_reaches_out_says_so_in_its_help():
    """train, reproduce and audit all take these options (their flags come from here)."""
    from toolkit.data.specs import DataOptions
    from toolkit.options import declared
    from toolkit.train.config import TrainConfig

    helps = {o.spelling: o.flag.help for o in declared(DataOptions) + declared(TrainConfig)}
    assert "downloaded from the internet when missing" in helps["--dataset"]
    assert "from the internet" in helps["--download"]
    assert "Hugging Face" in helps["--pretrained"] and "downloads" in helps["--pretrained"]


def test_the_official_download_fails_at_once_with_one_line_offline(tmp_path):
    """No data given, none cached: the download is refused within seconds, one line naming
    the way out, exit 2 (behind the namespace, or the guard alone)."""
    log = tmp_path / "reach-outs.jsonl"
    command = [sys.executable, "-m", "toolkit", "train", "net", "--epochs", "1"]
    command += ["--data-root", str(tmp_path / "empty")]
    env = {**guarded_env(log), "TOOLKIT_PROGRESS": "0"}
    start = time.monotonic()
    done = subprocess.run(offline(command), cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - start
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "could not download cifar10" in errors[0] and "--data-dir DIR" in errors[0]
    assert seconds < 60
    # What it tried is what the help promised: the dataset's own host, nothing else.
    assert {a["target"] for a in attempts(log)} <= {"'www.cs.toronto.edu'"}
