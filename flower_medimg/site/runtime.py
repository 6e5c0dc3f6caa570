"""The warm site runtime: a hospital's ClientApp messages, run from a warm process.

Flower 1.42's SuperNode with ``--isolation process`` leaves the execution of
ClientApp messages to an outside process that asks its Runtime API for work
(``AcquireTask``), the role Flower's own SuperExec plays with one fresh
``flwr-clientapp`` process per message. :class:`SiteRuntime` plays that role
warm:

1. once, when it starts: import torch, MONAI, Opacus, Flower and the ClientApp,
   and train the default model for one step on random data, which pays the
   first-use costs (Adam's ``torch._dynamo`` import, the first convolution,
   backward and normalisation kernels) for every later message;
2. per message: acquire the task, pull its message, context and FAB from the
   SuperNode, check it (:mod:`~flower_medimg.site.admission`: the app's approval,
   the site's policy, the privacy ledger; a refusal is the message's error reply,
   and none of the app's code has run), install the FAB (once per FAB hash), then
   **fork**. The child
   forgets the modules of the app it is about to load (so the code that runs is
   the shipped app's, not the copy imported for the warm-up), loads the
   ClientApp, runs it and pushes the reply; the parent goes back to polling. A
   child's crash, memory growth or leaked state dies with it;
3. a child that dies without replying (a signal, ``os._exit``, the kernel's OOM
   killer) gets an error reply pushed by the parent at once, naming the task and
   the signal, instead of Flower's missed-heartbeat timeout (about a minute).

The torch thread pool is never started in the parent (``torch.set_num_threads(1)``
during the warm-up): an OpenMP pool inherited through ``fork`` deadlocks the
child's first parallel kernel. Each child sets its own thread count. CUDA cannot
be initialised before ``fork``; the warm-up therefore runs on the CPU and a child
opens its own GPU context (a per-message cost of about a second on a GPU site).

Every message leaves one JSON line in ``<state-dir>/site-runtime/messages.jsonl``
(task, run, child PID, fetch time, duration, exit status). The child's
environment holds the moment its message was in hand
(:data:`~flower_medimg.core.startup.MESSAGE_RECEIVED_AT`), from which the ClientApp
reports its start-up time (``startup-s``).

References
----------
Flower issue #3670 (a persistent ClientApp process): https://github.com/adap/flower/issues/3670
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

__all__ = [
    "MESSAGES_LOG",
    "RUNTIME_FOLDER",
    "RUNTIME_STATE",
    "SiteRuntime",
    "TaskRecord",
    "read_runtime_state",
    "warm_up",
]

#: Folder in the site's ``state-dir`` for the runtime's own records.
RUNTIME_FOLDER = "site-runtime"
#: One JSON line per message, in :data:`RUNTIME_FOLDER`.
MESSAGES_LOG = "messages.jsonl"
#: In :data:`RUNTIME_FOLDER`: the supervisor's and worker's PIDs, restarts.
RUNTIME_STATE = "runtime.json"


def read_runtime_state(state_dir: str | Path) -> dict:
    """Return ``runtime.json`` of a site's state folder (empty if there is none)."""
    path = Path(state_dir) / RUNTIME_FOLDER / RUNTIME_STATE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def warm_up() -> float:
    """Import the ClientApp's stack and train the default model for one step.

    Returns
    -------
    float
        Seconds it took.
    """
    started = time.perf_counter()
    import torch

    torch.set_num_threads(1)  # no OpenMP pool before fork (see the module docstring)

    import flwr.clientapp  # noqa: F401
    import monai  # noqa: F401
    import opacus  # noqa: F401

    import flower_medimg.client_apps  # noqa: F401
    from flower_medimg.client_apps.training import make_optimizer, train_local
    from flower_medimg.core.models import model_from_settings
    from flower_medimg.core.settings import resolve_settings
    from flower_medimg.core.tasks import get_task

    settings = resolve_settings(overrides={"data.image-size": 32})
    model = model_from_settings(settings)
    task = get_task(settings["task"])
    size = (32,) * settings["model.spatial-dims"]
    batch = {
        "image": torch.rand(2, 1, *size),
        "label": (torch.rand(2, 1, *size) > 0.5).float(),
    }
    optimizer = make_optimizer(
        model, settings["train.optimizer"], lr=1e-3, momentum=0.0
    )
    train_local(model, [batch], task.loss_fn(), optimizer, 1, torch.device("cpu"))
    return time.perf_counter() - started


@dataclass
class TaskRecord:
    """What the runtime knows of one message it runs.

    Attributes
    ----------
    task_id, run_id : int
        Flower's ids of the task and its run.
    pid : int
        The child running it.
    acquired : float
        Wall-clock time the task was acquired.
    fetch_s : float
        Seconds from acquiring the task to holding its message, context and FAB:
        mostly the SuperNode still fetching the message's objects from the
        SuperLink (Flower retries after 1 s, then 2 s).
    duration_s : float or None
        Seconds from acquiring the task to the child's exit.
    exit : str or None
        ``"ok"``, ``"exit <code>"`` or ``"signal <name>"``.
    max_rss_mib : float or None
        The child's peak resident memory (``getrusage``), pages shared with the
        warm parent included.
    admission_ms : float
        Milliseconds the site's checks took (approval, policy, ledger).
    """

    task_id: int
    run_id: int
    pid: int
    acquired: float
    fetch_s: float
    duration_s: float | None = None
    exit: str | None = None
    max_rss_mib: float | None = None
    admission_ms: float = 0.0


def _exit_description(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {signal.Signals(os.WTERMSIG(status)).name}"
    code = os.WEXITSTATUS(status)
    return "ok" if code == 0 else f"exit {code}"


class SiteRuntime:
    """Run the ClientApp messages of one SuperNode from a warm process.

    Parameters
    ----------
    runtime_api_address : str
        ``host:port`` of the SuperNode's Runtime API (``--isolation process``).
    state_dir : Path
        The site's state folder (records go to ``state_dir/site-runtime``).
    superexec_secret : bytes, optional
        The SuperNode's ``--superexec-auth-secret-file`` content: only a holder of
        the secret can acquire the site's tasks.
    poll_interval : float
        Seconds between ``AcquireTask`` calls while idle (a loopback call).
    threads : int, optional
        Torch threads of each message's process; all cores by default.
    policy : Path, optional
        The site's policy file.
    """

    def __init__(
        self,
        runtime_api_address: str,
        state_dir: Path,
        *,
        superexec_secret: bytes | None = None,
        poll_interval: float = 0.05,
        threads: int | None = None,
        policy: Path | None = None,
    ) -> None:
        from flower_medimg.site.admission import Admission

        self.address = runtime_api_address
        self.records_dir = Path(state_dir) / RUNTIME_FOLDER
        self.records_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.secret = superexec_secret
        self.poll_interval = poll_interval
        self.threads = threads or os.cpu_count() or 1
        self.running: dict[int, tuple[TaskRecord, Any, Any, Any]] = {}
        self.installed: set[str] = set()
        self.stopping = threading.Event()
        self.admission = Admission(Path(state_dir), policy)

    # ------------------------------------------------------------------ clients
    def _client(self, token: str | None = None) -> Any:
        from flwr.supercore.interceptors import (
            RuntimeTokenHttpInterceptor,
            RuntimeVersionHttpInterceptor,
            SuperExecAuthHttpInterceptor,
        )
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        if token is None:
            interceptors: list[Any] = [
                RuntimeVersionHttpInterceptor(component_name="SuperExec")
            ]
            if self.secret:
                interceptors.append(
                    SuperExecAuthHttpInterceptor(
                        master_secret=self.secret,
                        protected_methods=frozenset(
                            {"/flwr.proto.Runtime/AcquireTask"}
                        ),
                    )
                )
        else:
            interceptors = [
                RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                RuntimeTokenHttpInterceptor(token),
            ]
        return RuntimeHttpClient.from_server_address(
            server_address=self.address,
            insecure=True,
            root_certificates=None,
            interceptors=interceptors,
            retry_invoker=make_simple_http_retry_invoker(),
        )

    # --------------------------------------------------------------------- loop
    def serve(self) -> None:
        """Poll for tasks and run each in a forked child until :attr:`stopping`."""
        from flwr.common.logger import log
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        client = self._client()
        backoff = self.poll_interval
        log(INFO, "Site runtime polling %s for ClientApp tasks", self.address)
        try:
            while not self.stopping.is_set():
                self._reap()
                try:
                    res = client.AcquireTask(
                        AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
                    )
                except Exception as err:  # noqa: BLE001 - SuperNode down or restarting
                    log(WARNING, "Runtime API %s unreachable: %s", self.address, err)
                    self.stopping.wait(backoff)
                    backoff = min(2 * backoff, 2.0)
                    continue
                backoff = self.poll_interval
                if res.HasField("task") and res.token:
                    self._launch(res.token, res.task)
                else:
                    self.stopping.wait(self.poll_interval)
        finally:
            client.close()
            self._stop_children()

    def _launch(self, token: str, task: Any) -> None:
        """Pull the task's input, fork a child for it, remember it."""
        from flwr.app.message import remove_content_from_message
        from flwr.cli.install import install_from_fab
        from flwr.common.logger import log

        from flower_medimg.site.task import pull_task_input, push_error_reply

        acquired = time.time()
        client = self._client(token)
        try:
            message, context, run, fab = pull_task_input(client)
        except Exception as err:  # noqa: BLE001 - Flower expires the task
            log(ERROR, "Task %d: cannot pull its input: %s", task.task_id, err)
            client.close()
            return
        received = time.time()
        refusal = self._refusal(message, context, run, fab)
        record = TaskRecord(
            task_id=task.task_id,
            run_id=task.run_id,
            pid=os.getpid(),
            acquired=acquired,
            fetch_s=received - acquired,
            admission_ms=1000 * (time.time() - received),
        )
        if refusal is not None:
            log(WARNING, "Task %d (run %d): %s", task.task_id, task.run_id, refusal)
            push_error_reply(client, message, context, refusal)
            client.close()
            record.duration_s, record.exit = time.time() - acquired, "refused"
            self._write_record(record)
            return
        if fab.hash_str not in self.installed:  # files only: no app code runs here
            install_from_fab(fab.content, skip_prompt=True)
            self.installed.add(fab.hash_str)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child never returns
            code = 1
            try:
                code = self._run_in_child(token, message, context, run, fab, received)
            finally:
                os._exit(code)
        record.pid = pid
        stub = remove_content_from_message(message)
        self.running[pid] = (record, client, stub, context)
        log(
            INFO,
            "Task %d (run %d): %s message in child %d",
            task.task_id,
            task.run_id,
            message.metadata.message_type,
            pid,
        )

    def _refusal(self, message: Any, context: Any, run: Any, fab: Any) -> str | None:
        """Run the site's checks; return why the site refuses the message, or None."""
        from flower_medimg.site.admission import AdmissionError

        try:
            self.admission.check(message, context, run, fab)
        except AdmissionError as err:
            return f"refused by the site: {err}"
        except Exception as err:  # noqa: BLE001 - the site never runs unchecked
            return (
                f"refused by the site: its checks failed ({type(err).__name__}: {err})"
            )
        return None

    def _run_in_child(
        self,
        token: str,
        message: Any,
        context: Any,
        run: Any,
        fab: Any,
        received: float,
    ) -> int:
        """Run one message in the forked child; return its exit code."""
        from flower_medimg.core.startup import MESSAGE_RECEIVED_AT
        from flower_medimg.site.task import run_message

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        self.stopping = threading.Event()
        os.environ[MESSAGE_RECEIVED_AT] = repr(received)
        import torch

        torch.set_num_threads(self.threads)
        return run_message(
            self._client(token), message, context, run, fab, parent_pid=os.getppid()
        )

    # -------------------------------------------------------------- children
    def _reap(self) -> None:
        while self.running:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                self.running.clear()
                return
            if pid == 0:
                return
            entry = self.running.pop(pid, None)
            if entry is not None:
                entry[0].max_rss_mib = usage.ru_maxrss / 1024  # KiB on Linux
                self._finished(entry, status)

    def _finished(self, entry: tuple[TaskRecord, Any, Any, Any], status: int) -> None:
        from flwr.common.logger import log

        record, client, stub, context = entry
        record.duration_s = time.time() - record.acquired
        record.exit = _exit_description(status)
        if record.exit != "ok":
            log(
                ERROR,
                "Task %d (run %d): its process %d ended without a reply (%s); "
                "replying with an error, the site runtime goes on",
                record.task_id,
                record.run_id,
                record.pid,
                record.exit,
            )
            from flower_medimg.site.task import push_error_reply

            push_error_reply(
                client,
                stub,
                context,
                f"the ClientApp process of task {record.task_id} died ({record.exit})",
            )
        client.close()
        self._write_record(record)

    def _write_record(self, record: TaskRecord) -> None:
        with (self.records_dir / MESSAGES_LOG).open("a") as handle:
            handle.write(json.dumps(asdict(record)) + "\n")

    def _stop_children(self, grace: float = 5.0) -> None:
        for pid in list(self.running):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.running and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.05)
        for pid in list(self.running):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.running.clear()
