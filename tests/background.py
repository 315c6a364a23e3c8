"""Worker subprocesses that start when the session does, on the core the tests leave idle.

A few checks run a subprocess of a minute or more (the multi-device workers, the
benchmark's own runs). The test process computes on one core; started at the
beginning of the session, one after another, those subprocesses use the other
meanwhile, and the fixture that reads a job's output waits for it (starting it at
once if its turn has not come). What each job runs, and what its tests check, is
the same as when a fixture ran it in the foreground.

Jobs are named in :data:`JOBS`, each with the test module that reads it;
``conftest.py`` queues the jobs of the modules a session selects.
"""

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class WorkerFailure(AssertionError):
    """A worker subprocess died, failed or ran out of time."""


def device_env(devices: int) -> dict[str, str]:
    """The environment of a worker on `devices` host (CPU) devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _tail(path: Path, limit: int = 4000) -> str:
    return Path(path).read_text(errors="replace")[-limit:]


class Workers:
    """`commands` started at once; all must exit 0 within `timeout` seconds.

    As soon as one exits non-zero the others are killed; past the timeout every
    one still running is killed. stdout and stderr go to ``worker_<i>.out`` and
    ``worker_<i>.err`` in `log_dir`.
    """

    def __init__(self, commands: list[list[str]], env: dict, timeout: float, log_dir: Path):
        self.commands, self.env, self.timeout, self.log_dir = commands, env, timeout, log_dir
        self.procs: list[subprocess.Popen] = []
        self.error: str | None = None

    def start(self) -> None:
        """Starts every command."""
        for i, command in enumerate(self.commands):
            out, err = self.stdout(i), self.stderr(i)
            with open(out, "wb") as fout, open(err, "wb") as ferr:
                self.procs.append(
                    subprocess.Popen(command, cwd=REPO, env=self.env, stdout=fout, stderr=ferr)
                )
        self.deadline = time.monotonic() + self.timeout

    def stdout(self, i: int) -> Path:
        """Where worker `i` writes its stdout."""
        return Path(self.log_dir) / f"worker_{i}.out"

    def stderr(self, i: int) -> Path:
        """Where worker `i` writes its stderr."""
        return Path(self.log_dir) / f"worker_{i}.err"

    def wait(self) -> None:
        """Returns when every worker exited 0; records the failure in ``error`` otherwise."""
        try:
            while True:
                codes = [p.poll() for p in self.procs]
                failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
                if failed:
                    self.error = "\n".join(
                        f"worker {i} ({' '.join(self.commands[i][2:])}) exited with "
                        f"{codes[i]}; its stderr:\n{_tail(self.stderr(i))}"
                        for i in failed
                    )
                    return
                if all(c == 0 for c in codes):
                    return
                if time.monotonic() > self.deadline:
                    running = [i for i, c in enumerate(codes) if c is None]
                    self.error = (
                        f"workers {running} still running after {self.timeout} s; stderr of "
                        f"worker {running[0]}:\n{_tail(self.stderr(running[0]))}"
                    )
                    return
                time.sleep(0.05)
        finally:
            self.kill()

    def kill(self) -> None:
        """Kills every worker still running, and reaps them all."""
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def run_workers(commands: list[list[str]], env: dict, timeout: float, log_dir: Path) -> None:
    """Runs `commands` at once, in the foreground; all must exit 0.

    Raises:
        WorkerFailure: naming the worker that failed, with its stderr, or the ones
            still running past `timeout`. No process outlives this call.
    """
    workers = Workers(commands, env, timeout, log_dir)
    try:
        workers.start()
        workers.wait()
    finally:
        workers.kill()
    if workers.error is not None:
        raise WorkerFailure(workers.error)


@dataclasses.dataclass
class Job:
    """A set of workers to run once a session; `make` gives them from the job's folder."""

    module: str
    make: Callable[[Path], tuple[list[list[str]], dict, float]]
    out: Path | None = None
    workers: Workers | None = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


def _partblock_devices() -> int:
    from tests import _partblock_worker

    return _partblock_worker.DEVICES


def _benchmark_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


# The jobs, by name: the test module that reads each, and how to start it in a folder.
# Timeouts are bounds against a hang, not speed targets: generous for a loaded 2-core
# machine (the part-block worker takes about 110 s of CPU time, most of it compiling).
JOBS: dict[str, Job] = {
    "sharding": Job(
        "tests.test_sharding",
        lambda out: ([_python("-m", "tests._sharding_worker", str(out))], device_env(8), 300),
    ),
    "partblocks": Job(
        "tests.test_sharding_partblocks",
        lambda out: (
            [_python("-m", "tests._partblock_worker", str(out))],
            device_env(_partblock_devices()),
            600,
        ),
    ),
    "benchmark-quick": Job(
        "tests.test_benchmark",
        lambda out: (
            [_python("-m", "adamax_jax.benchmark", "--quick", "--out", str(out))],
            _benchmark_env(),
            300,
        ),
    ),
    "benchmark-fresh": Job(
        "tests.test_benchmark",
        lambda out: (
            [
                _python(
                    "-m",
                    "adamax_jax.benchmark",
                    *("--quick", "--no-torch", "--trees", "leaves-2", "--storage", "int8"),
                    *("--compile-timeout", "300", "--compile-repeats", "2", "--steps", "3"),
                    *("--warmup", "1", "--out", str(out)),
                )
            ],
            _benchmark_env(),
            300,
        ),
    ),
}

_lock = threading.Lock()
_queue: list[str] = []


def _start(name: str) -> None:
    """Starts job `name` unless it has started (call with the lock held)."""
    job = JOBS[name]
    if job.workers is not None:
        return
    job.out = Path(tempfile.mkdtemp(prefix=f"adamax_jax_{name}_"))
    commands, env, timeout = job.make(job.out)
    job.workers = Workers(commands, env, timeout, job.out)
    try:
        job.workers.start()
    except OSError as e:
        job.workers.error = f"could not start {name}: {e}"
        job.done.set()
        return
    threading.Thread(target=_watch, args=(job,), daemon=True).start()


def _watch(job: Job) -> None:
    assert job.workers is not None
    job.workers.wait()
    job.done.set()


def _run_queue() -> None:
    for name in _queue:
        with _lock:
            _start(name)
        JOBS[name].done.wait()


def queue(modules: list[str]) -> None:
    """Starts, one after another in the background, the jobs read by `modules`.

    In the order the session runs `modules`, so that the first job needed is the first
    one started.
    """
    order = {module: i for i, module in reversed(list(enumerate(modules)))}
    with _lock:
        selected = [name for name, job in JOBS.items() if job.module in order]
        _queue.extend(sorted(selected, key=lambda name: order[JOBS[name].module]))
    if _queue:
        threading.Thread(target=_run_queue, daemon=True).start()


def result(name: str) -> Path:
    """The folder of job `name` once its workers have exited 0 (started now if not yet).

    Raises:
        WorkerFailure: A worker failed, or ran out of time.
    """
    job = JOBS[name]
    with _lock:
        _start(name)
    job.done.wait()
    assert job.workers is not None and job.out is not None
    if job.workers.error is not None:
        raise WorkerFailure(job.workers.error)
    return job.out


def stop() -> None:
    """Kills what still runs and removes every job's folder (at the end of the session)."""
    with _lock:
        _queue.clear()
        for job in JOBS.values():
            if job.workers is not None:
                job.workers.kill()
            if job.out is not None:
                shutil.rmtree(job.out, ignore_errors=True)
