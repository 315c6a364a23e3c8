"""Long subprocess work that starts when the session does, on the core the tests leave idle.

A few checks wait a minute or more for subprocesses: the multi-device workers, the
benchmark's own runs, the documentation build, the package build and type check, the
multi-process resume. The test process computes on one core; started at the beginning of
the session, one after another, those subprocesses use the other meanwhile, and the
fixture that reads a job's result waits for it (starting it at once if its turn has not
come). The modules that read them run last (``conftest.py``), so that their jobs are
done by then. What each job runs, and what its tests check, is the same as when a
fixture ran it in the foreground.

Jobs are named in :data:`JOBS`, each with the test modules that read it;
``conftest.py`` queues the jobs of the modules a session selects.
"""

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
    """Work to run once a session, in a folder of its own.

    Either `make` gives worker commands (with their environment and timeout) from the
    folder, or `call` is run with the folder in a thread of this process: a function whose
    work is done by subprocesses, so that it leaves this process's core to the tests.
    """

    modules: tuple[str, ...]
    make: Callable[[Path], tuple[list[list[str]], dict, float]] | None = None
    call: Callable[[Path], Any] | None = None
    out: Path | None = None
    workers: Workers | None = None
    started: bool = False
    value: Any = None
    error: BaseException | None = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


def _partblock_devices() -> int:
    from tests import _partblock_worker

    return _partblock_worker.DEVICES


def _benchmark_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def _docs(out: Path) -> Any:
    from tests import docs_build

    return docs_build.build(out)


def _package(out: Path) -> Any:
    from tests import test_package

    return test_package.build_and_install(out)


def _pyright(out: Path) -> Any:
    del out
    from tests import test_package

    return test_package.pyright("adamax_jax")


def _resume(out: Path) -> Any:
    from tests import test_resume

    return test_resume.train_and_resume(out)


def _multiprocess_example(out: Path) -> tuple[list[list[str]], dict, float]:
    from tests import test_resume

    return test_resume.multiprocess_example(out)


# The jobs, by name: the test module that reads each, and how to start it in a folder.
# Timeouts are bounds against a hang, not speed targets: generous for a loaded 2-core
# machine (the part-block worker takes about 110 s of CPU time, most of it compiling).
JOBS: dict[str, Job] = {
    "sharding": Job(
        ("tests.test_sharding",),
        lambda out: ([_python("-m", "tests._sharding_worker", str(out))], device_env(8), 300),
    ),
    "partblocks": Job(
        ("tests.test_sharding_partblocks",),
        lambda out: (
            [_python("-m", "tests._partblock_worker", str(out))],
            device_env(_partblock_devices()),
            600,
        ),
    ),
    "benchmark-quick": Job(
        ("tests.test_benchmark",),
        lambda out: (
            [_python("-m", "adamax_jax.benchmark", "--quick", "--out", str(out))],
            _benchmark_env(),
            300,
        ),
    ),
    "benchmark-fresh": Job(
        ("tests.test_benchmark",),
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
    "docs": Job(("tests.test_docs", "tests.test_notebook"), call=_docs),
    "package": Job(("tests.test_package",), call=_package),
    "pyright": Job(("tests.test_package",), call=_pyright),
    "resume": Job(("tests.test_resume",), call=_resume),
    "multiprocess-example": Job(("tests.test_resume",), _multiprocess_example),
}

_lock = threading.Lock()
_queue: list[str] = []


def _start(name: str) -> None:
    """Starts job `name` unless it has started (call with the lock held)."""
    job = JOBS[name]
    if job.started:
        return
    job.started = True
    job.out = Path(tempfile.mkdtemp(prefix=f"adamax_jax_{name}_"))
    if job.call is not None:
        threading.Thread(target=_call, args=(job,), daemon=True).start()
        return
    assert job.make is not None
    commands, env, timeout = job.make(job.out)
    job.workers = Workers(commands, env, timeout, job.out)
    try:
        job.workers.start()
    except OSError as e:
        job.error = WorkerFailure(f"could not start {name}: {e}")
        job.done.set()
        return
    threading.Thread(target=_watch, args=(job,), daemon=True).start()


def _call(job: Job) -> None:
    assert job.call is not None and job.out is not None
    try:
        job.value = job.call(job.out)
    except BaseException as e:  # re-raised in the test that reads the job
        job.error = e
    finally:
        job.done.set()


def _watch(job: Job) -> None:
    assert job.workers is not None
    job.workers.wait()
    if job.workers.error is not None:
        job.error = WorkerFailure(job.workers.error)
    job.done.set()


def _run_queue() -> None:
    for name in _queue:
        with _lock:
            _start(name)
        JOBS[name].done.wait()


def modules() -> set[str]:
    """The test modules that read a job."""
    return {module for job in JOBS.values() for module in job.modules}


def queue(modules: list[str]) -> None:
    """Starts, one after another in the background, the jobs read by `modules`.

    In the order the session runs `modules`, so that the first job needed is the first
    one started.
    """
    order = {module: i for i, module in reversed(list(enumerate(modules)))}

    def first(name: str) -> int:
        return min(order[m] for m in JOBS[name].modules if m in order)

    with _lock:
        selected = [name for name, job in JOBS.items() if any(m in order for m in job.modules)]
        _queue.extend(sorted(selected, key=first))
    if _queue:
        threading.Thread(target=_run_queue, daemon=True).start()


def _wait(name: str) -> Job:
    job = JOBS[name]
    with _lock:
        _start(name)
    job.done.wait()
    if job.error is not None:
        raise job.error
    return job


def result(name: str) -> Path:
    """The folder of worker job `name` once its workers have exited 0 (started now if not yet).

    Raises:
        WorkerFailure: A worker failed, or ran out of time.
    """
    job = _wait(name)
    assert job.out is not None
    return job.out


def value(name: str) -> Any:
    """What the function of job `name` returned (started now if not yet).

    Raises:
        The exception the function raised.
    """
    return _wait(name).value


def _descendants() -> list[int]:
    """The processes this one started, and theirs (Linux's /proc; none elsewhere)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [os.getpid()]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def stop() -> None:
    """Kills what still runs and removes every job's folder (at the end of the session).

    A function job still running (the session ended early) has its subprocesses killed.
    """
    with _lock:
        _queue.clear()
        running = False
        for job in JOBS.values():
            if job.workers is not None:
                job.workers.kill()
            running |= job.call is not None and job.started and not job.done.is_set()
        if running:
            for pid in _descendants():
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        for job in JOBS.values():
            if job.out is not None:
                shutil.rmtree(job.out, ignore_errors=True)
