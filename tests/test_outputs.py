"""RoundRecorder: per-site metrics are kept, the round's averages are weighted."""

from flwr.app import MetricRecord, RecordDict

from flower_medimg.lifecycle.outputs import RoundRecorder

KEYS = ("num-examples", "dice", "partition-id")


def test_evaluate_average_is_weighted_and_leaves_out_site_ids():
    recorder = RoundRecorder()
    replies = [
        RecordDict({"m": MetricRecord(dict(zip(KEYS, values, strict=True)))})
        for values in ((10, 0.5, 0), (30, 0.9, 1))
    ]
    averaged = recorder.evaluate(replies, "num-examples")
    assert dict(averaged) == {
        "dice": (10 * 0.5 + 30 * 0.9) / 40,
        "median-dice": (0.5 + 0.9) / 2,  # the robust one: no one site of 3+ sets it
    }
    recorder.end_round(1, arrays=None)
    sites = recorder.rounds[1]["clients-evaluate"]
    assert [s["partition-id"] for s in sites] == [0, 1]
