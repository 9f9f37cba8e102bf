"""Real servers for the tests: a throwaway PostgreSQL cluster, an S3-compatible server and Ray nodes on 127.0.0.1.

``with postgres_server(tmp_path) as pg:`` initialises a cluster (``initdb``), starts it on a free port of
127.0.0.1 only (its socket in its own folder), creates the database ``pg.database``, and at the end stops the
server and removes every file. The superuser ``pg.user`` has the password ``pg.password`` (scram-sha-256 for
every connection): tests give it through ``PGPASSWORD``, as a study does; ``pg.url`` holds none.

PostgreSQL refuses to run as root: as root (CI, these machines) initdb and the server run as ``nobody``, in a
folder under the system's temporary directory that ``nobody`` owns (pytest's own temporary folders are
private to root). scripts/setup_system.sh installs PostgreSQL (Debian's ``postgresql``).

``with s3_server(tmp_path) as s3:`` starts moto's standalone S3 server (``python -m moto.server``, a PyPI
package) on a free port of 127.0.0.1 with authentication on: it creates an IAM user with a fresh access key and
one bucket, ``s3.bucket``; ``s3.env`` is what a client needs in its environment (``AWS_ENDPOINT_URL`` and that
key), for a test to set with ``monkeypatch.setenv``. The server and all it holds are gone at the end.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

SERVER_USER = "nobody"  # who runs the server when the tests run as root


def postgres_bin(name: str) -> str | None:
    """A PostgreSQL server program (initdb, pg_ctl): on PATH, else Debian's newest /usr/lib/postgresql/N/bin."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(Path(p).parts[-3]))
    return found[-1] if found else shutil.which(name)


@dataclass
class Postgres:
    host: str
    port: int
    user: str
    password: str
    database: str
    dir: Path  # data, socket and log

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of the database, without the password."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.database}"

    def log(self) -> str:
        path = self.dir / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(argv: list[str], as_root: bool, **kwargs) -> subprocess.CompletedProcess:
    argv = ["runuser", "-u", SERVER_USER, "--", *argv] if as_root else argv
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=120, **kwargs)


@contextmanager
def postgres_server(tmp_path: Path, *, password: str = "s3cret-pw", database: str = "study",
                    user: str = "ssl") -> Iterator[Postgres]:
    """A PostgreSQL server of its own for the block (see the module's docstring). ``tmp_path`` gets a copy of
    the server's log at the end, for a failed test to show."""
    initdb, pg_ctl = postgres_bin("initdb"), postgres_bin("pg_ctl")
    if not initdb or not pg_ctl:
        raise RuntimeError("PostgreSQL's initdb/pg_ctl not found; scripts/setup_system.sh installs postgresql")
    as_root = os.geteuid() == 0
    base = Path(tempfile.mkdtemp(prefix="ssl-pg-"))  # short: the socket path must fit in 107 bytes
    pg = Postgres("127.0.0.1", _free_port(), user, password, database, base)
    started = False
    try:
        (base / "pwfile").write_text(password + "\n")
        if as_root:
            shutil.chown(base, SERVER_USER)
            shutil.chown(base / "pwfile", SERVER_USER)
        _run([initdb, "-D", str(base / "data"), "-U", user, "--auth=scram-sha-256", f"--pwfile={base / 'pwfile'}",
              "-E", "UTF8", "--locale=C", "--no-sync"], as_root)
        (base / "pwfile").unlink()
        options = (f"-h {pg.host} -p {pg.port} -k {base} -c fsync=off -c synchronous_commit=off "
                   f"-c full_page_writes=off -c max_connections=50")
        try:
            _run([pg_ctl, "-D", str(base / "data"), "-l", str(base / "server.log"), "-w", "-t", "60",
                  "-o", options, "start"], as_root)
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"PostgreSQL did not start: {e.stderr.strip()}\n{pg.log()}") from None
        started = True
        import psycopg2

        connection = psycopg2.connect(host=pg.host, port=pg.port, user=user, password=password, dbname="postgres")
        try:
            connection.autocommit = True  # CREATE DATABASE refuses to run in a transaction
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{database}"')
        finally:
            connection.close()
        yield pg
    finally:
        if started:
            subprocess.run((["runuser", "-u", SERVER_USER, "--"] if as_root else [])
                           + [pg_ctl, "-D", str(base / "data"), "-m", "immediate", "-w", "stop"],
                           capture_output=True, timeout=60)
        if (base / "server.log").exists():
            shutil.copy(base / "server.log", Path(tmp_path) / "postgres.log")
        shutil.rmtree(base, ignore_errors=True)


# ------------------------------------------------------------------------------------------------- Ray nodes


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


RUN_MARK = "SSL_STUDY_TEST_RUN"  # set by conftest.py before any Ray starts; every process the tests start inherits
# it (Ray's workers included), so a kill never reaches another checkout's Ray on the same machine


def pids_naming(text: str) -> list[int]:
    """PIDs (not this process) whose command line contains ``text``, of this test run only (its RUN_MARK)."""
    mark = f"{RUN_MARK}={os.environ[RUN_MARK]}".encode() if RUN_MARK in os.environ else b""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if (text in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                        and mark in (proc / "environ").read_bytes()):
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


def _stop(proc: subprocess.Popen, marker: str) -> None:
    # `ray start --block` and the raylet outlive SIGTERM (seen here: still up after 12 s), hence the short grace.
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        deadline = time.time() + grace
        while time.time() < deadline and (proc.poll() is None or pids_naming(marker)):
            time.sleep(0.5)
    for pid in pids_naming(marker):  # anything that left the process group but belongs to this node
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@dataclass
class RayNode:
    address: str  # the dashboard's http://127.0.0.1:PORT (jobs, State API); the head's only
    gcs: str  # 127.0.0.1:PORT, what `ray start --address` joins
    token_file: Path
    node_manager_port: int  # on the raylet's command line: what tells this node's raylet from another's
    env: dict


def _ray_env(token_file: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")  # the job's `python` is this venv's
    return env


def _ray_start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--block",
                                 "--node-ip-address=127.0.0.1", "--disable-usage-stats", *args],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


@contextmanager
def ray_head(num_cpus: int = 2, resources: str = "{}") -> Iterator[RayNode]:
    """A Ray head on 127.0.0.1 with token authentication (its own token, not ~/.ray's) and a dashboard."""
    temp_dir = tempfile.mkdtemp(prefix="rayc-", dir="/tmp")  # short: Ray's unix sockets live under it
    token_file = Path(temp_dir) / "token"
    token_file.write_text(secrets.token_hex(16))
    gcs, dash, client, agent_http, agent_grpc, env_agent, metrics, node_mgr, obj_mgr = free_ports(9)
    env = _ray_env(token_file)
    proc = _ray_start(["--head", f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                       f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
                       f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
                       f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}",
                       f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
                       f"--num-cpus={num_cpus}", "--num-gpus=0", f"--resources={resources}",
                       f"--object-store-memory={256 * 2**20}", f"--temp-dir={temp_dir}"],
                      env, Path(temp_dir) / "ray-start.log")
    node = RayNode(f"http://127.0.0.1:{dash}", f"127.0.0.1:{gcs}", token_file, node_mgr, env)
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited {proc.returncode}:\n"
                                   f"{(Path(temp_dir) / 'ray-start.log').read_text()}")
            with contextlib.suppress(requests.RequestException):  # not up yet, or slow on a loaded machine
                if requests.get(f"{node.address}/api/version", timeout=10,
                                headers={"Authorization": f"Bearer {token_file.read_text()}"}).ok:
                    break
            if time.time() > deadline:
                raise RuntimeError("the Ray head's dashboard did not come up in 120 s")
            time.sleep(1)
        yield node
    finally:
        _stop(proc, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@contextmanager
def ray_worker_node(head: RayNode, num_cpus: int = 1, resources: str = "{}") -> Iterator[RayNode]:
    """A second Ray node on this machine joined to ``head``, with its own ports and resources."""
    node_mgr, obj_mgr, metrics, agent_http, agent_grpc, env_agent = free_ports(6)
    log = head.token_file.with_name(f"node-{node_mgr}.log")
    proc = _ray_start([f"--address={head.gcs}", f"--node-manager-port={node_mgr}",
                       f"--object-manager-port={obj_mgr}", f"--metrics-export-port={metrics}",
                       f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
                       f"--runtime-env-agent-port={env_agent}", f"--num-cpus={num_cpus}", "--num-gpus=0",
                       f"--resources={resources}", f"--object-store-memory={128 * 2**20}"], head.env, log)
    node = RayNode(head.address, head.gcs, head.token_file, node_mgr, head.env)
    try:
        deadline = time.time() + 120
        while len(alive_nodes(head)) < 2:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the second Ray node did not join:\n{log.read_text()}")
            time.sleep(1)
        yield node
    finally:
        _stop(proc, f"--node_manager_port={node_mgr}")


def alive_nodes(head: RayNode) -> list[dict]:
    """The cluster's alive nodes, from the head's State API."""
    with contextlib.suppress(requests.RequestException):
        answer = requests.get(f"{head.address}/api/v0/nodes?limit=100", timeout=10,
                              headers={"Authorization": f"Bearer {head.token_file.read_text()}"})
        if answer.ok:
            return [n for n in answer.json()["data"]["result"]["result"] if n["state"] == "ALIVE"]
    return []


# ------------------------------------------------------------------------------------------ an S3 server


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    log_path: Path

    @property
    def env(self) -> dict[str, str]:
        """What a client of this server needs in its environment (the study reads nothing else)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


SETUP_REQUESTS = 3  # IAM requests the server takes unauthenticated: create a user, its key and its policy


@contextmanager
def s3_server(tmp_path: Path, bucket: str = "ssl-study-test") -> Iterator[S3Server]:
    """moto's S3 server with authentication on, for the block (see the module's docstring)."""
    import boto3

    port = _free_port()
    log = Path(tmp_path) / "moto.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(SETUP_REQUESTS)  # then every request must be signed by a known key
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                requests.get(f"{endpoint}/moto-api/", timeout=2)
                break
            except requests.ConnectionError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"moto's S3 server did not start:\n{log.read_text()}") from None
                time.sleep(0.2)
        anonymous = {"endpoint_url": endpoint, "region_name": "us-east-1", "aws_access_key_id": "setup",
                     "aws_secret_access_key": "setup"}
        iam = boto3.client("iam", **anonymous)
        iam.create_user(UserName="ssl-study")
        key = iam.create_access_key(UserName="ssl-study")["AccessKey"]
        iam.put_user_policy(UserName="ssl-study", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        server = S3Server(endpoint, bucket, key["AccessKeyId"], key["SecretAccessKey"], log)
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=server.access_key,
                     aws_secret_access_key=server.secret_key).create_bucket(Bucket=bucket)
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
