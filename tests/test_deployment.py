"""End to end on loopback: a real SuperLink and three real SuperNodes, TLS, node auth, SecAgg+.

The documented walk-through (docker/walkthrough.sh) deploys a federation and trains once, with
user-level DP whose noise the devices add under SecAgg+; two tests read that one run (what the
walk-through promises, and who added the noise). A second federation, started here with the exact
commands ``fedrec superlink`` / ``fedrec supernode`` run, checks the refusals a deployment relies on:
a SuperNode whose key was never registered, a SuperNode that does not trust the federation's CA,
and a round plan a node short. Everything listens on 127.0.0.1 only, and every process is stopped
by the test within a bounded time.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.processes import descendants, free_port, stop_tree

from client.deployment import supernode_command
from server.credentials import make_certificates, make_supernode_keys
from server.deployment import superlink_command, write_flwr_connection
from simulations.cli import flower_env

REPO = Path(__file__).resolve().parent.parent
NODES = 3
CONNECTION = "e2e"
RUN_CONFIG = (
    "num-server-rounds=2 secure-aggregation=true local-epochs=1 evaluate-every=2 "
    "synthetic-users=30 partitioning='group' users-per-client=10"  # 30 users / 10 = 3 kiosks
)
STARTUP_SECONDS = 90
RUN_SECONDS = 600


def _wait_for(log: Path, text: str, count: int, process: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if log.read_text(errors="replace").count(text) >= count:
            return
        if process.poll() is not None:
            break
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-3000:]
    pytest.fail(f"{text!r} x{count} not seen in {log.name} within {seconds:.0f}s:\n{tail}")


class Federation:
    """The processes and files of one loopback federation."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.certs = root / "certs"
        self.keys = root / "keys"
        self.home = root / "flwr-home"
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = flower_env() | {"FLWR_HOME": str(self.home)}
        self.processes: list[subprocess.Popen] = []
        self.superlink_log = root / "superlink.log"

    def start(self, command: list[str], log: Path) -> subprocess.Popen:
        with log.open("wb") as out:
            process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.root,
                start_new_session=True,
            )
        self.processes.append(process)
        return process

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["flwr", *args], env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout,
        )

    def supernode(self, index: int, partition: int, *, ca: bool = True, attempts: int | None = None):
        command = supernode_command(
            self.address, partition_id=partition, num_partitions=NODES,
            ca_cert=self.certs / "ca.crt" if ca else None,
            private_key=self.keys / f"supernode-{index}.key",
            clientappio_port=free_port(),
            max_retries=attempts, max_wait_seconds=30 if attempts is not None else None,
        )
        return command

    def stop(self) -> None:
        for process in reversed(self.processes):
            stop_tree(process)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    fed = Federation(tmp_path_factory.mktemp("deployment"))
    make_certificates(fed.certs)  # SANs: localhost, 127.0.0.1, ::1
    make_supernode_keys(fed.keys, NODES + 1)  # the last one is never registered
    write_flwr_connection(fed.home, CONNECTION, fed.address, fed.certs / "ca.crt")
    try:
        superlink = fed.start(superlink_command(fed.certs, port=fed.port), fed.superlink_log)
        _wait_for(fed.superlink_log, "Uvicorn running on https://", 1, superlink, STARTUP_SECONDS)
        for index in range(1, NODES + 1):
            registered = fed.flwr("supernode", "register", str(fed.keys / f"supernode-{index}.pub"), CONNECTION)
            assert registered.returncode == 0 and "registered successfully" in registered.stdout, (
                registered.stdout + registered.stderr
            )
        for index in range(1, NODES + 1):
            fed.start(fed.supernode(index, index - 1), fed.root / f"supernode-{index}.log")
        _wait_for(fed.superlink_log, "[Fleet.ActivateNode] Activated", NODES, superlink, STARTUP_SECONDS)
        yield fed
    finally:
        fed.stop()


def test_supernode_with_unregistered_key_is_refused(federation):
    log = federation.root / "unregistered.log"
    process = federation.start(federation.supernode(NODES + 1, 0, attempts=1), log)
    process.wait(timeout=STARTUP_SECONDS)
    output = log.read_text(errors="replace")
    assert process.returncode != 0, output
    assert "Failed to activate SuperNode" in output, output
    assert "No SuperNode found with the given public key" in federation.superlink_log.read_text()
    assert federation.superlink_log.read_text().count("[Fleet.ActivateNode] Activated") == NODES


def test_supernode_and_cli_without_the_ca_cannot_connect(federation):
    log = federation.root / "no-ca.log"
    # A registered key, so the only thing missing is trust in the federation's CA.
    process = federation.start(federation.supernode(1, 0, ca=False, attempts=1), log)
    process.wait(timeout=STARTUP_SECONDS)
    output = log.read_text(errors="replace")
    assert process.returncode != 0, output
    assert "CERTIFICATE_VERIFY_FAILED" in output, output

    # The flwr CLI: the same SuperLink answers with the CA and refuses without it.
    with_ca = federation.flwr("ls", CONNECTION, timeout=STARTUP_SECONDS)
    assert with_ca.returncode == 0, with_ca.stdout + with_ca.stderr
    write_flwr_connection(federation.home, "no-ca", federation.address, None)
    without_ca = federation.flwr("ls", "no-ca", timeout=STARTUP_SECONDS)
    assert without_ca.returncode != 0
    assert "Connection to the SuperLink is unavailable" in without_ca.stdout + without_ca.stderr


def test_flwr_connection_is_added_next_to_existing_ones(tmp_path):
    import tomllib

    ca = tmp_path / "ca.crt"
    ca.write_text("not read here")
    write_flwr_connection(tmp_path, "first", "10.0.0.1:8000", ca)
    path = write_flwr_connection(tmp_path, "second", "10.0.0.2:8000", None)
    links = tomllib.loads(path.read_text())["superlink"]
    assert links["default"] == "first"
    assert links["first"] == {"address": "10.0.0.1:8000", "root-certificates": str(ca.resolve())}
    assert links["second"] == {"address": "10.0.0.2:8000"}


def test_launch_commands_refuse_missing_files_and_bad_partitions(tmp_path, capsys):
    from simulations.cli import main

    with pytest.raises(FileNotFoundError, match="fedrec certs"):
        superlink_command(tmp_path)
    with pytest.raises(ValueError, match=r"partition-id must be in \[0, 3\); got 3"):
        supernode_command("127.0.0.1:8000", partition_id=3, num_partitions=3, ca_cert=None, private_key=None)
    assert main(["supernode", "--superlink", "h:1", "--ca", str(tmp_path / "ca.crt"),
                 "--partition-id", "0", "--num-partitions", "3", "--dry-run"]) == 2
    assert "ca.crt not found" in capsys.readouterr().err


def test_supernode_state_dir_goes_into_the_node_config_as_an_absolute_path(tmp_path):
    from flwr.common.config import parse_config_args

    command = supernode_command("127.0.0.1:8000", partition_id=1, num_partitions=3, ca_cert=None, private_key=None,
                                state_dir=tmp_path / "kiosk")
    node_config = parse_config_args([command[command.index("--node-config") + 1]])  # as flower-supernode parses it
    assert node_config == {"partition-id": 1, "num-partitions": 3, "state-dir": str((tmp_path / "kiosk").resolve())}
    with pytest.raises(ValueError, match="spaces or quotes"):
        supernode_command("h:1", partition_id=0, num_partitions=1, ca_cert=None, private_key=None,
                          state_dir=tmp_path / "a kiosk")


# --- the documented walk-through, and a fleet a node short ------------------------------------

WALKTHROUGH = REPO / "docker" / "walkthrough.sh"
WALKTHROUGH_SECONDS = 1500  # a bound, not an expectation: the script's own waits are bounded below it


def _free_port_run(count: int) -> int:
    """The first of ``count`` consecutive free loopback ports."""
    for _ in range(50):
        first = free_port()
        if first + count < 65536 and all(_port_is_free(first + i) for i in range(count)):
            return first
    raise RuntimeError(f"no {count} consecutive free ports")


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention ``text`` (the walk-through's own files)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if text in command and state != "Z":
                found.append(command)
    return found


# User-level DP with the devices adding the noise under SecAgg+: Poisson sampling with q = 1 (every
# kiosk every round) and min-train-clients = 3, so each device adds N(0, (z C)**2 / 3) and the
# unmasked sum carries exactly z C. The walk-through's run is this one, so a deployment trains once.
DEVICE_NOISE = ("user-dp=true client-sampling='poisson' fraction-train=1.0 min-train-clients=3 "
                f"user-dp-noise-multiplier=1.0 user-dp-population={NODES}")


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory):
    """docker/walkthrough.sh, the script docs/deployment.md shows, run as it is (ports and paths moved).

    Returns its exit code, its output (which streams ``flwr run``), the processes it left and the run dir.
    """
    tmp_path = tmp_path_factory.mktemp("walkthrough")
    deploy, run_dir = tmp_path / "deploy", tmp_path / "deployed"
    env = flower_env() | {
        # The venv's python: flower_env puts its directory first on PATH.
        "FEDREC": "python -m simulations.cli", "DEPLOY": str(deploy), "RUN_DIR": str(run_dir),
        "PORT": str(free_port()), "NODE_PORT": str(_free_port_run(NODES)), "ROUNDS": "2",
        "RUN_CONFIG": f"local-epochs=1 evaluate-every=2 {DEVICE_NOISE}", "WAIT": "400", "RUN_TIMEOUT": "1000",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    log = tmp_path / "walkthrough.log"
    with log.open("wb") as out:
        script = subprocess.Popen(["bash", str(WALKTHROUGH)], stdout=out, stderr=subprocess.STDOUT, env=env,
                                  cwd=tmp_path, start_new_session=True)
        try:
            script.wait(timeout=WALKTHROUGH_SECONDS)
        except subprocess.TimeoutExpired:
            script.send_signal(signal.SIGTERM)  # the script's trap stops what it started
            script.wait(timeout=60)
    leftovers = _processes_mentioning(str(deploy))
    for pid in ([] if not leftovers else descendants(script.pid)):
        os.kill(pid, signal.SIGKILL)
    return script.returncode, log.read_text(errors="replace"), leftovers, run_dir


@pytest.mark.deployment
def test_walkthrough_script_deploys_trains_and_cleans_up(walkthrough):
    returncode, output, leftovers, run_dir = walkthrough
    assert leftovers == [], f"the walk-through left processes running: {leftovers}"
    assert returncode == 0, output[-6000:]
    assert "walkthrough: done" in output
    fits = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    fits = [row for row in fits if row["phase"] == "fit"]
    assert [row["round"] for row in fits] == [1, 2]
    assert all(row["clients_ok"] == NODES and row["clients_failed"] == 0 for row in fits), fits
    assert output.count("Secure aggregation completed") == 3, output[-4000:]  # 2 training rounds + the evaluation
    assert json.loads((run_dir / "config.json").read_text())["run_config"]["secure-aggregation"] is True
    transport = json.loads((run_dir / "privacy.json").read_text())["transport"]
    assert transport["nodes_required"] == NODES and transport["nodes_connected"] == NODES
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2
    final = summary["final_evaluation"]
    assert final["eval_clients"] == NODES and final["eval_failures"] == 0
    assert 0.0 <= final["test_sampled_hr@10"] <= 1.0
    assert (run_dir / "checkpoints" / "final.npz").is_file()


def test_user_dp_with_secagg_noise_shares_over_tls(walkthrough):
    """User-level DP + SecAgg+ in a deployment (TLS, node auth): the devices add the noise, the server none."""
    returncode, output, _, run_dir = walkthrough
    assert returncode == 0, output[-4000:]
    plan = json.loads((run_dir / "privacy.json").read_text())
    assert plan["user_level"]["noise_added_by"].startswith("devices")
    assert plan["user_level"]["min_survivors"] == 3 and plan["user_level"]["server_noise_std"] == 0.0
    assert plan["user_level"]["device_clipping_norm"] < plan["user_level"]["clipping_norm"]
    assert plan["secure_aggregation_parameters"]["max_weight"] == 1.0
    fits = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    fits = [row for row in fits if row["phase"] == "fit"]
    assert [row["round"] for row in fits] == [1, 2]
    for row in fits:
        assert row["clients_ok"] == NODES and row["user_noise_added_by"] == "devices", row
        assert row["server_noise_std"] == 0.0 and row["noise_multiplier_present"] == 1.0, row
    assert output.count("Secure aggregation completed") == 3, output[-4000:]  # 2 training rounds + the evaluation


def test_a_round_plan_a_node_short_is_refused_and_recorded(federation, tmp_path):
    """Four kiosks of data, three SuperNodes connected: the ServerApp refuses before round 1."""
    run_dir = tmp_path / "short"
    result = federation.flwr(
        "run", ".", CONNECTION, "--stream", "--run-config",
        "num-server-rounds=1 synthetic-users=40 partitioning='group' users-per-client=10 node-wait-seconds=5 "
        "secure-aggregation=true "
        f"run-dir='{run_dir}'",
        timeout=RUN_SECONDS,
    )
    output = result.stdout + result.stderr
    assert f"{NODES} SuperNode(s) connected" in output and f"the data yields {NODES + 1} clients" in output, output[-4000:]
    assert "refusing the round plan" in output, output[-4000:]
    transport = json.loads((run_dir / "privacy.json").read_text())["transport"]
    assert (transport["nodes_required"], transport["nodes_connected"], transport["nodes_missing"]) == (NODES + 1, NODES, 1)
    assert not (run_dir / "summary.json").exists()
    assert (run_dir / "metrics.jsonl").read_text() == ""  # no round ran


def test_the_docs_show_the_walkthrough_scripts_steps_verbatim():
    script = WALKTHROUGH.read_text()
    docs = (REPO / "docs" / "deployment.md").read_text()
    shown = docs.split("<!-- walkthrough-steps", 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0]
    assert shown == script[script.index("# 0. Credentials"):].rstrip("\n")
