"""The message protocol between the ServerApp and the ClientApps: every key, once.

Both wings speak through Flower ``Message`` objects whose content is a
``RecordDict``. The names below are the whole vocabulary: record names, the keys of
the train/evaluate/query ConfigRecords the server sends, the per-reply metrics the
sites send back, the round metrics the server adds, and the ``node_config`` keys a
site sets on its SuperNode. Nothing else in the code spells these strings.

Optional metrics cost the site work (``train-loss-before``/``-after`` are two extra
forward passes over its training data); a strategy that reads them lists them in
the train config under :data:`CONFIG_REQUEST_METRICS`, and the site computes them
only then.
"""

from __future__ import annotations

__all__ = [
    "requested_metrics",
    "CONFIG_CODEC",
    "CONFIG_DOWNLINK",
    "CONFIG_FIX_AMP",
    "CONFIG_HE_WEIGHT_KEY",
    "CONFIG_FRACTION",
    "CONFIG_LOCAL_EPOCHS",
    "CONFIG_LR",
    "CONFIG_PROXIMAL_MU",
    "CONFIG_REQUEST_METRICS",
    "CONFIG_SERVER_ROUND",
    "ERROR_REFUSED",
    "ERROR_UNDECODABLE",
    "INFO_CODEC",
    "INFO_ENCODED_KEYS",
    "METRIC_COMPRESSED_BYTES",
    "METRIC_DP_EPSILON",
    "METRIC_EVAL_LOSS",
    "METRIC_EVAL_TIME",
    "METRIC_LOCAL_STEPS",
    "METRIC_NOVA_A",
    "METRIC_NUM_EXAMPLES",
    "METRIC_NUM_TRAIN",
    "METRIC_PARTITION_ID",
    "METRIC_PEAK_MEMORY",
    "METRIC_RANGES",
    "METRIC_SHARED_FRACTION",
    "METRIC_STARTUP_TIME",
    "METRIC_SVT_EPSILON",
    "METRIC_TRAIN_LOSS_AFTER",
    "METRIC_TRAIN_LOSS_BEFORE",
    "METRIC_TRAIN_TIME",
    "METRIC_UNIT_WEIGHT",
    "NODE_BUNDLE_ROOT",
    "NODE_DATALIST",
    "NODE_DATA_DIR",
    "NODE_DP_MAX_EPSILON",
    "NODE_HE_SECRET_CONTEXT",
    "NODE_MAX_UPDATE_NORM",
    "NODE_MAX_VOXELS",
    "NODE_NUM_PARTITIONS",
    "NODE_PARTITION_ID",
    "NODE_SHARE_STATISTICS",
    "NODE_SITE_NAME",
    "NODE_STATE_DIR",
    "OPTIONAL_TRAIN_METRICS",
    "QUERY_BINS",
    "QUERY_RANGE_MAX",
    "QUERY_RANGE_MIN",
    "QUERY_STATISTICS",
    "RECORD_ARRAYS",
    "RECORD_CODEC",
    "RECORD_CODEC_INFO",
    "RECORD_CONFIG",
    "RECORD_METRICS",
    "RECORD_STATISTICS",
    "ROUND_GATE_ACCEPTED",
    "ROUND_GATE_REJECTED",
    "ROUND_USER_DELTA",
    "ROUND_USER_EPSILON",
    "SITE_BOOKKEEPING_METRICS",
]

# ---- record names inside a Message's RecordDict ---------------------------------
RECORD_ARRAYS = "arrays"
RECORD_CONFIG = "config"
RECORD_METRICS = "metrics"
RECORD_STATISTICS = "statistics"

# ---- message types besides Flower's train and evaluate ---------------------------
#: ``message_type`` of the data-statistics query (the ClientApp's ``@app.query``).
QUERY_STATISTICS = "query"

#: Error code of a site that declines a request (statistics, a refused round).
ERROR_REFUSED = 403

# ---- keys of the ConfigRecord the server sends -----------------------------------
CONFIG_SERVER_ROUND = "server-round"  # Flower's strategies set it
CONFIG_LR = "lr"
CONFIG_LOCAL_EPOCHS = "local-epochs"
CONFIG_PROXIMAL_MU = "proximal-mu"  # Flower's FedProx sets it
#: HarmoFL: whether the shared amplitude is fixed (default: after round 1).
CONFIG_FIX_AMP = "fix-amp"
#: Optional reply metrics the strategy needs (a list of metric names).
CONFIG_REQUEST_METRICS = "request-metrics"
#: Keys of the statistics query.
QUERY_BINS = "bins"
QUERY_RANGE_MIN = "range-min"
QUERY_RANGE_MAX = "range-max"

# ---- per-reply metrics the sites send --------------------------------------------
#: Training (or validation) samples behind the reply: the aggregation weight.
METRIC_NUM_EXAMPLES = "num-examples"
#: A constant 1, for uniform averaging (``weighted_by_key="unit-weight"``).
METRIC_UNIT_WEIGHT = "unit-weight"
#: Loss of the received model on the site's training data, before training.
METRIC_TRAIN_LOSS_BEFORE = "train-loss-before"
#: Loss of the trained model on the same data.
METRIC_TRAIN_LOSS_AFTER = "train-loss-after"
#: Optimizer steps taken (FedNova's tau).
METRIC_LOCAL_STEPS = "local-steps"
#: FedNova's normalising scalar ``a`` of the site's local optimizer.
METRIC_NOVA_A = "nova-a"
METRIC_TRAIN_TIME = "train-time-s"
#: The site's cumulative DP-SGD epsilon.
METRIC_DP_EPSILON = "dp-epsilon"
METRIC_EVAL_LOSS = "eval-loss"
METRIC_EVAL_TIME = "eval-time-s"
#: Deployment only: seconds from the message reaching the site to the start of the
#: ClientApp's work (imports, app loading, data, model; see
#: :mod:`flower_medimg.core.startup`).
METRIC_STARTUP_TIME = "startup-s"
#: Deployment only: the peak resident memory (MiB) of the process that ran the
#: message (Flower's fresh process or the warm runtime's forked child alike).
METRIC_PEAK_MEMORY = "peak-rss-mib"
#: Simulation only: which synthetic site answered (recorded per site, never averaged).
METRIC_PARTITION_ID = "partition-id"
#: Statistics reply: the size of the site's training set, the most ``num-examples``
#: its train replies may claim afterwards.
METRIC_NUM_TRAIN = "num-train"
#: Sparse sharing: fraction of the update's coordinates that left the site.
METRIC_SHARED_FRACTION = "shared-fraction"
#: SVT: the site's cumulative selection epsilon.
METRIC_SVT_EPSILON = "svt-epsilon"

#: Train metrics a site computes only when the strategy asks for them.
OPTIONAL_TRAIN_METRICS = (METRIC_TRAIN_LOSS_BEFORE, METRIC_TRAIN_LOSS_AFTER)
#: Per-reply bookkeeping that is not a model-quality metric.
SITE_BOOKKEEPING_METRICS = (
    METRIC_NUM_EXAMPLES,
    METRIC_UNIT_WEIGHT,
    METRIC_TRAIN_TIME,
    METRIC_EVAL_TIME,
    METRIC_STARTUP_TIME,
    METRIC_PEAK_MEMORY,
    METRIC_PARTITION_ID,
)

#: Evaluation metrics with a known range; a reply outside it is rejected.
METRIC_RANGES: dict[str, tuple[float, float]] = {
    "dice": (0.0, 1.0),
    "accuracy": (0.0, 1.0),
    "auroc": (0.0, 1.0),
    "sensitivity": (0.0, 1.0),
    "specificity": (0.0, 1.0),
    "hd95": (0.0, float("inf")),
    METRIC_EVAL_LOSS: (0.0, float("inf")),
    METRIC_TRAIN_LOSS_BEFORE: (0.0, float("inf")),
    METRIC_TRAIN_LOSS_AFTER: (0.0, float("inf")),
}

# ---- round metrics the server adds -----------------------------------------------
ROUND_GATE_ACCEPTED = "gate-accepted"
ROUND_GATE_REJECTED = "gate-rejected"
#: Cumulative user-level epsilon of the released global models, and its delta.
ROUND_USER_EPSILON = "user-epsilon"
ROUND_USER_DELTA = "user-delta"

# ---- update compression (flower_medimg.core.compression) -------------------------
#: Train config keys the server sets: the codec it decodes, and top-k's fraction.
CONFIG_CODEC = "compression-codec"
CONFIG_FRACTION = "compression-fraction"
#: Train and evaluate config key: how the global model travels (``"fp16"``).
CONFIG_DOWNLINK = "compression-downlink"
#: ArrayRecord of the reply holding the side data (``<key>.scale``, ``<key>.indices``).
RECORD_CODEC = "codec"
#: ConfigRecord of the reply: the codec used and the keys sent encoded.
RECORD_CODEC_INFO = "codec-info"
INFO_CODEC = "codec"
INFO_ENCODED_KEYS = "encoded-keys"
#: Bytes of array data in the compressed reply (payload plus side data).
METRIC_COMPRESSED_BYTES = "compressed-bytes"
#: Error code of a reply the server cannot decode (HTTP's "unprocessable content").
ERROR_UNDECODABLE = 422

# ---- homomorphic encryption (flower_medimg.core.homomorphic) --------------------
#: Train config key: the metric each site multiplies its weights by before
#: encrypting (the server's ``weighted_by_key``).
CONFIG_HE_WEIGHT_KEY = "he-weight-key"

# ---- node_config keys a site sets on its SuperNode --------------------------------
NODE_DATA_DIR = "data-dir"
#: The site's installed copy of the MONAI bundle that ``task = "bundle"`` runs.
NODE_BUNDLE_ROOT = "bundle-root"
#: How the site's log lines name it (default: ``site-<partition>`` or the node id).
NODE_SITE_NAME = "site-name"
NODE_DATALIST = "datalist"
NODE_STATE_DIR = "state-dir"
NODE_DP_MAX_EPSILON = "dp-max-epsilon"
NODE_MAX_VOXELS = "max-voxels"  # the site's cap on voxels per image file
#: The site's own bound on the L2 norm of an update it sends.
NODE_MAX_UPDATE_NORM = "max-update-norm"
NODE_SHARE_STATISTICS = "share-statistics"
NODE_PARTITION_ID = "partition-id"  # set by Flower's simulation runtime
NODE_NUM_PARTITIONS = "num-partitions"
#: The site's CKKS context with the secret key (``flower-medimg he provision``).
NODE_HE_SECRET_CONTEXT = "he-secret-context"


def requested_metrics(config: object) -> frozenset[str]:
    """Return the optional metrics a train ConfigRecord asks for (never raises)."""
    try:
        value = config.get(CONFIG_REQUEST_METRICS, [])  # type: ignore[attr-defined]
    except AttributeError:
        return frozenset()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        return frozenset()
    return frozenset(v for v in value if isinstance(v, str))
