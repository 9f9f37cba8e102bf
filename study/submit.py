"""``ssl-study submit``: run a study on a remote Ray cluster as a Ray Job.

The study file is validated here first. The job's working directory is this checkout (code only: the
environment, data, results and caches are excluded) and the study file travels as the value of an
environment variable, written back to a file by the entrypoint, so a study file from anywhere works and the
job runs exactly the text that was validated. The job's driver then runs ``python -m study launch FILE
--address auto`` on the head node.

Token authentication: a Ray 2.60 cluster started by ``ray start --head`` on a machine with
``~/.ray/auth_token`` (or ``RAY_AUTH_MODE=token``) rejects job requests without ``Authorization: Bearer
TOKEN``. Ray's own client only sends it when ``RAY_AUTH_MODE=token`` is exported; ``submit`` instead reads
the token where Ray's token loader would (``RAY_AUTH_TOKEN``, then the file named by ``RAY_AUTH_TOKEN_PATH``,
then ``~/.ray/auth_token``) and passes the header itself, unless ``RAY_AUTH_MODE=disabled``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from data.store import is_remote, location
from study.spec import SpecError, StudySpec, load_spec

REPO_ROOT = Path(__file__).resolve().parent.parent
SPEC_ENV = "SSL_STUDY_SPEC_YAML"
# Uploaded working_dir: code only. Ray 2.60 always leaves out .git and .venv (and warns when they are listed)
# and honours .gitignore, which names most of these too; the list keeps a checkout without that file small.
EXCLUDES = ["venv", "datasets", "runs", "checkpoints", "build", "*.whl", "*.beton", "*.egg-info", "__pycache__",
            ".pytest_cache", ".ruff_cache", "bench/out", "bench/results", ".ssl-study"]


def auth_headers() -> dict[str, str]:
    """The bearer token from the places Ray's token loader reads, or nothing."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
        token = path.read_text().strip() if path.is_file() else ""
    return {"Authorization": f"Bearer {token}"} if token else {}


def check_for_cluster(spec: StudySpec) -> None:
    """Relative paths would land in the job's temporary copy of the working directory on the head node."""
    for key in ("storage", "data_dir"):
        value = getattr(spec, key)
        if not is_remote(value) and not location(value).is_absolute():
            raise SpecError(f"{spec.source}: {key}: {value!r} is not an absolute path; a Ray job runs in a "
                            f"temporary copy of the code, so give a path on storage every node mounts "
                            f"(e.g. /mnt/shared/{Path(value).name or key}) or s3://bucket/prefix")


def job_request(spec_path: str | Path, working_dir: str | Path = REPO_ROOT) -> tuple[str, dict]:
    """The entrypoint and runtime_env that run ``spec_path`` (read as it is now) with the code of ``working_dir``."""
    path = Path(spec_path)
    target = shlex.quote(f".ssl-study/{path.name}")
    entrypoint = (f'mkdir -p .ssl-study && printf "%s" "${SPEC_ENV}" > {target} && '
                  f"python -m study launch {target} --address auto")
    runtime_env = {"working_dir": str(working_dir), "excludes": EXCLUDES, "env_vars": {SPEC_ENV: path.read_text()}}
    return entrypoint, runtime_env


def check_address(address: str, timeout_s: float = 5.0) -> None:
    """Refuse an ``address`` that is not a dashboard URL (SpecError), or whose host does not answer on its port
    within ``timeout_s`` (ConnectionError), before anything is uploaded."""
    url = urlsplit(address)
    try:
        port = url.port or {"http": 80, "https": 443}.get(url.scheme)
    except ValueError:  # a port that is no number, or out of range
        port = None
    if url.scheme not in ("http", "https") or not url.hostname or port is None:
        raise SpecError(f"--address {address!r}: expected the Ray dashboard's URL, http://HOST:PORT "
                        f"(e.g. http://head:8265)")
    try:
        socket.create_connection((url.hostname, port), timeout=timeout_s).close()
    except OSError as e:
        raise ConnectionError(f"could not reach the Ray dashboard at {address} ({e.strerror or e}); is the "
                              f"cluster up, and its dashboard port open to this machine?") from None


def client(address: str):
    from ray.job_submission import JobSubmissionClient  # Ray only once the spec is known good

    return JobSubmissionClient(address, headers=auth_headers())


def follow(job_client, job_id: str, *, poll_s: float = 2.0, settle_s: float = 120.0, out=None) -> str:
    """Print the job's logs as they come and return its final status (the log stream ends with the job; its
    status must then settle within ``settle_s``: a head that went away gives an error, not an endless poll)."""
    from ray.job_submission import JobStatus

    out = out or sys.stdout

    async def tail() -> None:
        async for lines in job_client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    asyncio.run(tail())  # ends when the job does
    deadline = time.monotonic() + settle_s
    while (status := job_client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                                JobStatus.STOPPED}:
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id}: its logs ended, but its status stayed {status.value} for "
                               f"{settle_s:.0f} s (see `ray job status {job_id}`)")
        time.sleep(poll_s)
    return str(status.value)


def submit(spec_path: str | Path, address: str, *, wait: bool = True, job_id: str | None = None,
           working_dir: str | Path = REPO_ROOT, out=None) -> str:
    """Validate ``spec_path``, submit it to the Ray cluster at ``address`` (``http://HEAD:8265``) with the code
    of ``working_dir`` (this checkout) and return the job id; with ``wait``, stream the job's logs to ``out``
    (stdout) until it ends. Raises SpecError for a bad file or address, ConnectionError for a cluster that does
    not answer."""
    spec = load_spec(spec_path)
    check_for_cluster(spec)
    check_address(address)
    entrypoint, runtime_env = job_request(spec_path, working_dir)
    job_client = client(address)
    job_id = job_client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=job_id,
                                   metadata={"ssl_study": spec.name, "study_file": str(Path(spec_path).resolve())})
    if wait:
        follow(job_client, job_id, out=out)
    return job_id


def add_submit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="study file (YAML); storage and data_dir must be s3:// / gs:// URIs or "
                                     "absolute paths on storage every node of the cluster mounts")
    default = os.environ.get("RAY_API_SERVER_ADDRESS")
    parser.add_argument("--address", default=default, required=default is None,
                        help="the cluster's dashboard, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS)")
    parser.add_argument("--no-wait", action="store_true", help="submit and return; do not follow the logs")
    parser.add_argument("--job-id", default=None, help="submission id to use (default: Ray makes one)")


def submit_from_args(args: argparse.Namespace) -> int:
    """``ssl-study submit``: 0 when the job succeeded (or was submitted, with --no-wait), 1 otherwise."""
    try:
        job_id = submit(args.spec, args.address, wait=False, job_id=args.job_id)
        print(f"submitted {job_id} to {args.address}")
        if args.no_wait:
            print(f"follow it with: ray job logs --follow --address {args.address} {job_id}")
            return 0
        job_client = client(args.address)
        try:
            status = follow(job_client, job_id)
        except KeyboardInterrupt:
            print(f"\nstopped following; the job goes on. Stop it with: ray job stop --address {args.address} "
                  f"{job_id}", file=sys.stderr)
            return 130
        info = job_client.get_job_info(job_id)
    except (ConnectionError, RuntimeError, TimeoutError) as e:  # unreachable cluster, refused token, failed upload,
        # a job whose status never settled
        print(f"ssl-study: error: {e}", file=sys.stderr)
        return 1
    if status == "SUCCEEDED":
        print(f"job {job_id} SUCCEEDED")
        return 0
    print(f"ssl-study: job {job_id} {status}: {info.message}", file=sys.stderr)
    return 1
