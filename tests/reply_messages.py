"""Reply Messages as a SuperLink delivers them to a strategy (for unit tests)."""

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    Error,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)


def reply_metadata(src_node_id, dst_node_id=0, message_type="train"):
    """Metadata of a reply from ``src_node_id``."""
    return Metadata(
        run_id=1,
        message_id="",
        src_node_id=src_node_id,
        dst_node_id=dst_node_id,
        reply_to_message_id="",
        group_id="1",
        created_at=0.0,
        ttl=60.0,
        message_type=message_type,
    )


def train_reply(node_id, arrays, metrics):
    """A train reply holding ``arrays`` (numpy values) and ``metrics``."""
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
            "metrics": MetricRecord(metrics),
        }
    )
    return Message(content, metadata=reply_metadata(node_id))


def error_reply(node_id, reason="site failed"):
    """An error reply attributed to ``node_id``."""
    return Message(Error(code=0, reason=reason), metadata=reply_metadata(node_id))
