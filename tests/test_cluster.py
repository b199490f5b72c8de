"""cluster/ checked against Ray's schema and the jobs' parser; a two-node Ray cluster here.

The multi-node test starts a Ray head and a second Ray node with token authentication on, submits
the real jobs with ``ray job submit`` and checks that the two train workers ran on different
nodes. It stops every process it started (found by the test's own token in their environment).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import jsonschema
import pyarrow.parquet as pq
import pytest
import ray
import yaml

from lungseg.cli import _config, build_parser
from lungseg.core.errors import UserError
from lungseg.io import storage
from lungseg.io.storage import Store
from tests.conftest import SAMPLE_IDS, free_port, upload_sample

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
BIN = Path(sys.executable).parent
IMAGE = f"rayproject/ray:{ray.__version__}-py311-gpu"


def _parse_job(command: str):
    """``python jobs/<name>.py ARGS`` -> (name, the job's config as lungseg's own parser and
    config build it)."""
    argv = shlex.split(command)
    assert argv[0] == "python" and re.fullmatch(r"jobs/\w+\.py", argv[1]), command
    assert (REPO / argv[1]).is_file(), f"{argv[1]} does not exist"
    name = Path(argv[1]).stem
    try:
        return name, _config(build_parser().parse_args([name, *argv[2:]]))
    except SystemExit:
        pytest.fail(f"lungseg {name} rejects the options of: {command}")


# ---------------------------------------------------------------- configuration files


def test_launcher_config_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(config))  # what `ray up` checks, after filling in defaults

    assert config["provider"]["type"] == "aws"
    assert config["docker"]["image"] == IMAGE
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert config["file_mounts"]["/home/ray/lungseg"] == "."
    lock = "-c /home/ray/lungseg/.lock/requirements.txt"
    assert any(lock in c and '"/home/ray/lungseg[gpu]"' in c for c in config["setup_commands"])
    head = config["head_node_type"]
    workers = {k: v for k, v in config["available_node_types"].items() if k != head}
    assert workers and all(w["node_config"]["InstanceType"][0] in "gp" for w in workers.values())
    assert all(w["min_workers"] < w["max_workers"] for w in workers.values())  # autoscales


def _manifests() -> list[dict]:
    return [
        doc
        for path in sorted((CLUSTER / "kuberay").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def test_kuberay_cluster_has_an_autoscaling_gpu_group_with_token_auth():
    (cluster,) = [d for d in _manifests() if d["kind"] == "RayCluster"]
    spec = cluster["spec"]
    assert cluster["apiVersion"] == "ray.io/v1" and spec["rayVersion"] == ray.__version__
    assert spec["authOptions"] == {"mode": "token"}
    (gpu,) = spec["workerGroupSpecs"]
    assert gpu["minReplicas"] < gpu["maxReplicas"] and spec["enableInTreeAutoscaling"]
    (worker,) = _containers(gpu["template"])
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    assert toleration in gpu["template"]["spec"]["tolerations"]
    (head,) = _containers(spec["headGroupSpec"]["template"])
    assert head["image"] == worker["image"]


@pytest.mark.parametrize("job", ["train", "segment"])
def test_kuberay_jobs_run_the_real_job_commands(job):
    docs = _manifests()
    (cluster,) = [d for d in docs if d["kind"] == "RayCluster"]
    (rayjob,) = [d for d in docs if d["kind"] == "RayJob" and d["metadata"]["name"].endswith(job)]
    spec = rayjob["spec"]
    name, config = _parse_job(spec["entrypoint"])
    assert name == job and config.resources.use_gpu and storage.is_remote(config.output)
    assert spec["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    shared = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert runtime_env == {"working_dir": "/home/ray/lungseg", "env_vars": shared["env_vars"]}


def _readme_commands() -> list[str]:
    page = CLUSTER.parent / "docs" / "clusters.md"  # the docs' Clusters page
    text = re.sub(r"\\\n\s*", " ", page.read_text())
    return re.findall(r"python jobs/\w+\.py[^\n`]*", text)


def test_cluster_readme_commands_parse():
    commands = _readme_commands()
    assert {_parse_job(c)[0] for c in commands} >= {"train", "segment"}


def test_dockerfile_builds_on_the_ray_gpu_image():
    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(rf"^FROM {re.escape(IMAGE)}$", text, re.M)
    assert re.search(r"^WORKDIR /home/ray/lungseg$", text, re.M)  # the RayJobs' working_dir
    assert "COPY --chown=ray:users jobs ./jobs" in text
    assert 'pip install --no-cache-dir -c .lock/requirements.txt ".[gpu]"' in text


def test_a_local_run_folder_is_refused_on_a_multi_node_cluster():
    with pytest.raises(UserError, match=r"runs/x is a local path, but this Ray cluster has 2"):
        storage.check_shared("runs/x", nodes=2)
    storage.check_shared("runs/x", nodes=1)
    storage.check_shared("s3://runs/x", nodes=2)
    storage.check_shared("/mnt/nfs/runs/x", nodes=2, allow_local=True)


# ---------------------------------------------------------------- a two-node cluster


AUTH = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
# Settings of the calling shell that would point the nodes at another cluster or token.
FOREIGN = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", *AUTH)
NODE = "LUNGSEG_TEST_NODE"  # which `ray start` a process descends from


class TwoNodeCluster:
    """A Ray head and a second Ray node, 3 CPUs each, on loopback, with token auth on."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.token = secrets.token_hex(16)
        self.dashboard = f"http://127.0.0.1:{free_port()}"
        self.gcs = f"127.0.0.1:{free_port()}"
        env = {k: v for k, v in os.environ.items() if k not in FOREIGN}
        self.env = env | {
            "PATH": f"{BIN}{os.pathsep}{env['PATH']}",  # `python` in a job is this venv's
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        self.client_env = self.env | {"RAY_API_SERVER_ADDRESS": self.dashboard}
        self.started: list[subprocess.Popen] = []

    def start(self) -> None:
        self._start(
            "head",
            lambda: self._http_ok("/api/version"),
            "--head",
            f"--port={self.gcs.rsplit(':', 1)[1]}",
            f"--ray-client-server-port={free_port()}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard.rsplit(':', 1)[1]}",
        )
        self._start("worker", lambda: len(self.nodes()) == 2, f"--address={self.gcs}")

    def _start(self, name: str, ready: Callable[[], bool], *options: str) -> None:
        """``ray start --block`` one node and wait until ``ready()``.

        Ray gives up on a node whose raylet takes over 30 s to register, which a loaded 2-core
        machine can exceed: then its processes are stopped and it is started again (3 tries).
        """
        ports = ("node-manager", "object-manager", "metrics-export", "runtime-env-agent")
        ports += ("dashboard-agent-listen", "dashboard-agent-grpc")
        for attempt in range(3):
            tag = f"{name}{attempt}"
            command = [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1"]
            command += ["--num-cpus=3", "--num-gpus=0", f"--object-store-memory={300 * 2**20}"]
            command += [f"--temp-dir={self.root / tag}", "--disable-usage-stats"]
            command += [f"--{port}-port={free_port()}" for port in ports]
            log = self.root / f"{tag}.log"
            with log.open("wb") as out:
                process = subprocess.Popen(
                    [*command, *options],
                    env=self.env | {NODE: tag},
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            self.started.append(process)
            deadline = time.monotonic() + 120
            while process.poll() is None and time.monotonic() < deadline:
                if ready():
                    return
                time.sleep(1)
            tail = log.read_text(errors="replace")[-3000:]
            if process.poll() is None:
                raise TimeoutError(f"the {name} node is not up after 120 s:\n{tail}")
            self.stop(tag)
        raise RuntimeError(f"ray start failed 3 times for the {name} node:\n{tail}")

    def _http_ok(self, path: str) -> bool:
        request = urllib.request.Request(
            self.dashboard + path, headers={"Authorization": f"Bearer {self.token}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def ray(self, *args: str, env: dict | None = None, timeout: float = 60):
        """Run the ``ray`` CLI as a client of this cluster (with its token unless ``env``)."""
        return subprocess.run(
            [str(BIN / "ray"), *args],
            env=self.client_env if env is None else env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def state(self, kind: str, *filters: str) -> list[dict]:
        """``ray list <kind> --detail`` as a list of dicts."""
        options = [f"--filter={f}" for f in filters]
        done = self.ray("list", kind, "--detail", "--format=json", "--limit=1000", *options)
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-3000:])
        return json.loads(done.stdout)

    def nodes(self) -> list[dict]:
        """The alive nodes; none while the cluster cannot answer yet."""
        try:
            return self.state("nodes", "state=ALIVE")
        except (RuntimeError, ValueError, subprocess.TimeoutExpired):
            return []

    def submit(self, *entrypoint: str, timeout: float = 240):
        """``ray job submit --runtime-env cluster/runtime_env.yaml -- python jobs/...``."""
        return self.ray(
            "job",
            "submit",
            "--runtime-env=cluster/runtime_env.yaml",
            "--",
            "python",
            *entrypoint,
            timeout=timeout,
        )

    def processes(self, tag: str | None = None) -> list[int]:
        """Pids of this cluster's live processes (or of one node's start): those whose environment
        holds its token (and ``tag``), which everything under ``ray start`` inherits."""
        wanted = {f"RAY_AUTH_TOKEN={self.token}".encode()}
        if tag:
            wanted.add(f"{NODE}={tag}".encode())
        pids = []
        for environ in Path("/proc").glob("[0-9]*/environ"):
            with contextlib.suppress(OSError):  # gone meanwhile
                if wanted <= set(environ.read_bytes().split(b"\0")):
                    pids.append(int(environ.parent.name))
        return pids

    def stop(self, tag: str | None = None) -> list[int]:
        """SIGTERM those processes by pid, SIGKILL any left after 10 s; return survivors."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.processes(tag):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 10
            while self.processes(tag) and time.monotonic() < deadline:
                for process in self.started:
                    process.poll()  # reap the `ray start` processes, children of this one
                time.sleep(0.2)
        return self.processes(tag)


@pytest.fixture
def cluster(s3_endpoint):
    """A running two-node cluster; the nodes inherit the S3 endpoint's keys from the env."""
    root = Path(tempfile.mkdtemp(prefix="lsc", dir="/tmp"))  # short: unix socket paths
    nodes = TwoNodeCluster(root)
    try:
        nodes.start()
        yield nodes
    finally:
        survivors = nodes.stop()
        shutil.rmtree(root, ignore_errors=True)
        assert not survivors, f"processes left running: {survivors}"


SMALL = ["--size=64", "--base-filters=4", "--depth=2", "--batch-size=2"]
CPUS = ["--preprocess-actors=1", "--actor-cpus=0.5"]


@pytest.mark.cluster
@pytest.mark.timeout(400)
def test_jobs_on_a_two_node_cluster(cluster, s3, s3_endpoint):
    data = upload_sample(s3, "cluster-xrays", "montgomery", SAMPLE_IDS[:8])
    s3.create_bucket(Bucket="cluster-runs")
    endpoint = f"--s3-endpoint={s3_endpoint}"
    nodes = {node["node_id"]: node for node in cluster.nodes()}
    head = next(i for i, node in nodes.items() if node["is_head_node"])

    anonymous = {k: v for k, v in cluster.client_env.items() if k not in AUTH}
    anonymous["HOME"] = str(cluster.root)  # no ~/.ray/auth_token to fall back on
    refused = cluster.ray("job", "submit", "--", "echo", "hi", env=anonymous)
    assert refused.returncode != 0 and "Authentication required" in refused.stdout + refused.stderr

    train = ["jobs/train.py", f"--data={data}", "--workers=2", "--epochs=1", "--val-fraction=0.25"]
    # 2 CPUs per train worker on 3-CPU nodes: the two workers cannot share a node.
    train += ["--worker-cpus=2", *CPUS, *SMALL, endpoint]
    local = cluster.submit(*train, f"--output={cluster.root / 'run'}")
    assert local.returncode == 1
    assert "is a local path, but this Ray cluster has 2 nodes" in local.stdout

    done = cluster.submit(*train, "--output=s3://cluster-runs/unet/exp1")
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]
    assert "model: s3://cluster-runs/unet/exp1/model.keras" in done.stdout
    workers = cluster.state("actors", "class_name=RayTrainWorker")
    placed = [worker["node_id"] for worker in workers]
    where = [f"{i} ({'head' if i == head else 'second node'})" for i in placed]
    print("\ntrain workers ran on nodes " + ", ".join(where))
    assert len(placed) == 2 and set(placed) == set(nodes)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="cluster-runs")["Contents"]}
    for name in ("model.keras", "metrics.csv", "curves.png", "config.json"):
        assert f"unet/exp1/{name}" in keys

    done = cluster.submit(
        "jobs/segment.py",
        "--model=s3://cluster-runs/unet/exp1/model.keras",
        f"--input={data}/images",
        f"--masks={data}/masks",
        "--output=s3://cluster-runs/segment/exp1",
        *CPUS,
        "--batch-size=2",
        endpoint,
    )
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]
    # One epoch on six films: quality control may flag some masks, but none may fail.
    summary = re.search(r"segmented 8 images \((\d+) flagged, 0 failed\)", done.stdout)
    assert summary, done.stdout[-5000:]
    fs, path = Store(s3_endpoint).resolve("s3://cluster-runs/segment/exp1/segmentation.parquet")
    rows = pq.read_table(path, filesystem=fs).to_pylist()
    assert sorted(r["id"] for r in rows) == SAMPLE_IDS[:8]
    assert sum(r["status"] == "flagged" for r in rows) == int(summary.group(1))
    assert all(r["status"] in ("ok", "flagged") for r in rows)
    assert all(r["mask"] == f"masks/{r['id']}.png" for r in rows)  # under the bucket's root
