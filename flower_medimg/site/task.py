"""One ClientApp message, run inside a child of the warm site runtime.

The steps are those of Flower's ``flwr-clientapp`` process
(``flwr.supernode.runtime.run_clientapp``), built from the same Flower functions:
load the installed FAB's ClientApp, call it, push the reply and the task's
context. Before loading, the modules of the app's own packages that the warm
parent imported are forgotten, so the code that runs is the FAB's.
"""

from __future__ import annotations

import sys
from logging import ERROR
from pathlib import Path
from typing import Any

__all__ = ["forget_app_modules", "pull_task_input", "push_error_reply", "run_message"]

#: Retry delays (s) while the SuperNode is still fetching the message's objects
#: from the SuperLink (Flower's defaults, 1 s doubling, cost 3 s per message).
_PULL_BACKOFF = (0.02, 0.25)


def forget_app_modules(app_dir: Path) -> list[str]:
    """Drop from ``sys.modules`` every module of a package the app ships.

    Parameters
    ----------
    app_dir : Path
        The installed FAB (its top-level packages and modules).

    Returns
    -------
    list of str
        The names of the forgotten modules.
    """
    tops = {p.name for p in app_dir.iterdir() if (p / "__init__.py").is_file()}
    tops |= {p.stem for p in app_dir.glob("*.py")}
    forgotten = [name for name in sys.modules if name.partition(".")[0] in tops]
    for name in forgotten:
        del sys.modules[name]
    return forgotten


def pull_task_input(client: Any) -> tuple[Any, Any, Any, Any]:
    """Pull a task's message, context, run and FAB from the SuperNode.

    The steps of Flower's ``run_clientapp.pull_task_input``, with a short retry
    delay: the SuperNode offers the task before it has fetched the message's
    objects, and Flower's default delay (1 s, then 2 s) would cost seconds per
    message.

    Parameters
    ----------
    client : RuntimeHttpClient
        A Runtime API client holding the task's token.

    Returns
    -------
    tuple
        ``(message, context, run, fab)``.
    """
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import (
        pull_and_inflate_object_from_tree,
    )
    from flwr.supercore.task_identity import TaskIdentity

    task_input = client.PullTaskInput(PullTaskInputRequest())
    context = context_from_proto(task_input.context)
    TaskIdentity.task_id = task_input.task_id
    TaskIdentity.run_id = context.run_id
    TaskIdentity.node_id = context.node_id
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("the SuperNode returned no message for the task")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(
            client.ConfirmMessageReceived, node, context.run_id
        ),
        return_type=Message,
        initial_backoff=_PULL_BACKOFF[0],
        backoff_cap=_PULL_BACKOFF[1],
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower does
    return (
        message,
        context,
        run_from_proto(task_input.run),
        fab_from_proto(task_input.fab),
    )


def push_error_reply(client: Any, message: Any, context: Any, reason: str) -> None:
    """Reply to ``message`` with an error and finish its task as failed.

    Parameters
    ----------
    client : RuntimeHttpClient
        A Runtime API client holding the task's token.
    message : Message
        The message to answer (its content may have been removed).
    context : Context
        The task's context, pushed back unchanged.
    reason : str
        What happened (sent to the server).
    """
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.common.logger import log
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    reply = Message(
        Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
        reply_to=message,
    )
    try:
        push_message(client, reply, context)
    except Exception as err:  # noqa: BLE001 - Flower's expiry replies instead
        log(ERROR, "Could not push the error reply: %s", err)
    push_task_output(client, context, SubStatus.FAILED, reason)


def run_message(
    client: Any, message: Any, context: Any, run: Any, fab: Any, parent_pid: int
) -> int:
    """Run the ClientApp of ``fab`` (installed) on ``message``; push its reply.

    Parameters
    ----------
    client : RuntimeHttpClient
        A Runtime API client holding the task's token.
    message, context, run, fab
        The task's input, as ``pull_task_input`` returned it.
    parent_pid : int
        The site runtime; the child ends if it goes.

    Returns
    -------
    int
        0 once a reply (the ClientApp's or an error reply) has been pushed, 1 if
        pushing failed.
    """
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.clientapp.client_app import LoadClientAppError
    from flwr.clientapp.utils import get_load_client_app_fn
    from flwr.common.config import get_project_dir
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.common.logger import log
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    start_parent_process_monitor(parent_pid)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    status, details = SubStatus.COMPLETED, ""
    try:
        forget_app_modules(get_project_dir(run.fab_id, run.fab_version, fab.hash_str))
        load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
        client_app = load(run.fab_id, run.fab_version, fab.hash_str)
        reply = client_app(message=message, context=context)
    except Exception as err:  # noqa: BLE001 - becomes the error reply, as in Flower
        log(ERROR, "ClientApp raised an exception", exc_info=err)
        code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        details = f"{type(err)}:<'{err}'>"
        if isinstance(err, LoadClientAppError):
            code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION
        status = SubStatus.FAILED
        reply = Message(Error(code=code, reason=details), reply_to=message)
    try:
        push_message(client, reply, context)
    except Exception as err:  # noqa: BLE001
        log(ERROR, "Failed to push the reply", exc_info=err)
        return 1
    finally:
        push_task_output(client, context, status, details)
        heartbeat.stop()
        client.close()
    return 0
