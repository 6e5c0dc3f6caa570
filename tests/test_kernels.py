"""Numeric kernels of flower_medimg.strategies: hand-computed and spec examples."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from scipy.spatial.distance import cdist

from flower_medimg.strategies import _wire as W  # noqa: N812
from flower_medimg.strategies import kernels as K  # noqa: N812
from flower_medimg.strategies.dos import copod_scores, softmin_weights
from flower_medimg.strategies.fedcostwavg import fedcostwavg_weights
from flower_medimg.strategies.fedfocus import fedfocus_weights
from flower_medimg.strategies.fednova import fednova_coefficients

ATOL = 1e-6


def _record(arrays):
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def _model(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": (scale * rng.standard_normal((32, 16, 3, 3))).astype(np.float32),
        "conv.bias": rng.standard_normal(32).astype(np.float32),
        "bn.running_mean": rng.standard_normal(32).astype(np.float32),
        "bn.num_batches_tracked": np.array(seed + 1, dtype=np.int64),
        "head.weight": rng.standard_normal((3, 100)).astype(np.float64),
    }


# --- reading and writing ArrayRecords ------------------------------------------------


def test_read_array_is_an_in_place_view_equal_to_numpy():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    array = Array(x)
    view = W.read_array(array)
    np.testing.assert_array_equal(view, x.ravel())
    assert not view.flags.writeable  # no copy: a view of the reply's bytes


def test_read_array_fortran_order_and_bad_payload():
    x = np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4))
    np.testing.assert_array_equal(W.read_array(Array(x)), x.ravel(order="C"))
    broken = Array(dtype="float32", shape=(2,), stype="numpy.ndarray", data=b"xx")
    with pytest.raises(ValueError, match="npy"):
        W.read_array(broken)
    truncated = Array(np.zeros(4, np.float32))
    truncated.data = truncated.data[:-4]
    with pytest.raises(ValueError, match="bytes"):
        W.read_array(truncated)


def test_layout_blocks_and_round_trip():
    arrays = _model(0)
    record = _record(arrays)
    layout = W.Layout.from_arrayrecord(record, small_tensor_size=1000)
    # conv.weight is large: its own block; the rest packed per dtype
    assert layout.blocks[0].keys == ("conv.weight",) and not layout.blocks[0].packed
    assert {b.dtype for b in layout.blocks} == {
        np.dtype(np.float32),
        np.dtype(np.int64),
        np.dtype(np.float64),
    }
    columns = W.read_blocks(record, layout)
    rebuilt = W.build_arrayrecord(layout, columns)
    assert list(rebuilt.keys()) == list(arrays)
    for key, value in arrays.items():
        got = rebuilt[key].numpy()
        assert got.dtype == value.dtype and got.shape == value.shape
        np.testing.assert_array_equal(got, value)
        assert rebuilt[key].data == Array(value).data  # byte-identical to np.save


def test_read_blocks_names_the_offending_key():
    layout = W.Layout.from_arrayrecord(_record(_model(0)))
    bad = _model(1)
    bad["conv.bias"] = bad["conv.bias"][:5]
    with pytest.raises(ValueError, match="conv.bias"):
        W.read_blocks(_record(bad), layout)
    extra = {**_model(1), "new": np.zeros(2)}
    with pytest.raises(ValueError, match="new"):
        W.read_blocks(_record(extra), layout)
    # metadata that lies about the payload
    lying = _record(_model(1))
    lying["conv.bias"].dtype = "float32"
    lying["conv.bias"].data = Array(np.zeros(32, np.float64)).data
    with pytest.raises(ValueError, match="conv.bias"):
        W.read_blocks(lying, layout)


# --- aggregation kernels ----------------------------------------------------------


def _columns(models, small=1000):
    layout = W.Layout.from_arrayrecord(_record(models[0]), small_tensor_size=small)
    return layout, [W.read_blocks(_record(m), layout) for m in models]


def _unpack(layout, values):
    record = W.build_arrayrecord(layout, values)
    return {k: record[k].numpy() for k in record}


def test_weighted_average_matches_numpy_and_restores_int_dtype():
    models = [_model(s) for s in range(4)]
    layout, cols = _columns(models)
    w = np.array([1.0, 2.0, 3.0, 4.0])
    got = _unpack(layout, K.weighted_average(cols, w))
    p = w / w.sum()
    for key in models[0]:
        expected = sum(
            pk * m[key].astype(np.float64) for pk, m in zip(p, models, strict=False)
        )
        if models[0][key].dtype.kind == "i":
            assert got[key].dtype == np.int64
            assert got[key] == np.rint(expected)  # 1*.1+2*.2+3*.3+4*.4 = 3
        else:
            np.testing.assert_allclose(got[key], expected, rtol=1e-5, atol=ATOL)


def test_weighted_sum_one_reply_is_identity_and_zero_weights_skip():
    models = [_model(0), _model(1)]
    layout, cols = _columns(models)
    got = _unpack(layout, K.weighted_sum(cols, [1.0, 0.0]))
    for key, value in models[0].items():
        np.testing.assert_array_equal(got[key], value)
    with pytest.raises(ValueError):
        K.weighted_average(cols, [0.0, 0.0])


@pytest.mark.parametrize("n", [1, 2, 5, 6])
def test_median_and_trimmed_mean_match_flower(n):
    models = [_model(s) for s in range(n)]
    layout, cols = _columns(models, small=200)
    median = _unpack(layout, K.coordinate_median(cols))
    trimmed = _unpack(layout, K.trimmed_mean(cols, 0.2))
    for key in models[0]:
        stack = np.stack([m[key] for m in models])
        if stack.dtype.kind == "i":
            assert median[key] == np.rint(np.median(stack, axis=0))
            continue
        np.testing.assert_allclose(median[key], np.median(stack, axis=0), atol=ATOL)
        np.testing.assert_allclose(trimmed[key], trim_mean(stack, 0.2), atol=ATOL)


def test_gram_norms_and_distances_match_cdist():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal(5000).astype(np.float32)
    xs = [ref + rng.standard_normal(5000).astype(np.float32) for _ in range(5)]
    cols = [[x] for x in xs]
    u = np.stack([x.astype(np.float64) - ref for x in xs])
    gram = K.gram_matrix(cols, [ref])
    np.testing.assert_allclose(gram, u @ u.T, rtol=1e-5)
    np.testing.assert_allclose(
        K.update_sq_norms(cols, [ref]), np.sum(u**2, axis=1), rtol=1e-5
    )
    for limit in (0, 1 << 30):  # Gram path, exact path
        euc, cos, sq = K.pairwise_distances(cols, [ref], exact_max_elements=limit)
        np.testing.assert_allclose(euc, cdist(u, u), atol=1e-3)
        np.testing.assert_allclose(cos, cdist(u, u, "cosine"), atol=1e-5)
        assert np.all(np.diag(euc) == 0) and np.all(np.diag(cos) == 0)


def test_non_finite_reply_has_non_finite_norm():
    x = np.ones(100, np.float32)
    y = x.copy()
    y[3] = np.nan
    z = x.copy()
    z[7] = np.inf
    norms = K.update_sq_norms([[x], [y], [z]])
    assert np.isfinite(norms[0]) and not np.isfinite(norms[1:]).any()


def test_zero_update_gets_cosine_distance_one():
    gram = np.array([[0.0, 0.0, 0.0], [0.0, 2.0, 1.0], [0.0, 1.0, 2.0]])
    cos = K.cosine_distances(gram)
    assert np.all(np.isfinite(cos))
    np.testing.assert_allclose(cos[0], [0.0, 1.0, 1.0])
    np.testing.assert_allclose(cos[1, 2], 0.5)


# --- COPOD and DOS (spec 1.3) -------------------------------------------------------

U = np.array([[1.0, 0.0, 0.5], [0.9, 0.1, 0.4], [1.1, -0.1, 0.6], [-3.0, 2.0, -2.0]])


def test_copod_worked_example():
    np.testing.assert_allclose(
        copod_scores(cdist(U, U, "cosine")),
        [2.164391, 2.772589, 2.569856, 5.545177],
        atol=ATOL,
    )
    np.testing.assert_allclose(
        copod_scores(cdist(U, U)),
        [2.164391, 2.569856, 2.772589, 5.545177],
        atol=ATOL,
    )


def test_dos_worked_example_through_pairwise_distances():
    cols = [[u] for u in U]
    euc, cos, _ = K.pairwise_distances(cols)
    a = copod_scores(cos) + copod_scores(euc)
    np.testing.assert_allclose(a, [4.328782, 5.342445, 5.342445, 11.090355], atol=ATOL)
    p = softmin_weights(a)
    np.testing.assert_allclose(p, [0.579062, 0.210134, 0.210134, 0.000670], atol=ATOL)
    (agg,) = K.weighted_sum(cols, p)
    np.testing.assert_allclose(agg, [0.997319, 0.001340, 0.498324], atol=ATOL)


def test_copod_degenerate_cases_give_equal_or_nan_scores():
    two = U[[0, 3]]
    for d in (cdist(two, two), cdist(two, two, "cosine")):
        s = copod_scores(d)
        assert s[0] == pytest.approx(s[1])
    same = np.zeros((4, 4))  # identical updates: constant columns
    assert np.all(np.isnan(copod_scores(same)))


# --- method weights -------------------------------------------------------------------


def test_fedcostwavg_worked_example():
    p = fedcostwavg_weights([10, 30, 60], [1.0, 0.8, 0.5], [0.5, 0.4, 0.4], 0.5)
    np.testing.assert_allclose(p, [0.240476, 0.340476, 0.419048], atol=ATOL)
    assert p.sum() == pytest.approx(1.0)
    theta = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    np.testing.assert_allclose(p @ theta, [0.659524, 0.759524], atol=ATOL)


def test_fedcostwavg_edge_cases():
    # alpha = 1 is FedAvg; a zero "after" loss is floored; unusable ratios -> n/N
    np.testing.assert_allclose(
        fedcostwavg_weights([1, 3], [1, 1], [1, 1], 1.0), [0.25, 0.75]
    )
    p = fedcostwavg_weights([1, 1], [1.0, 1.0], [0.0, 1.0], 0.5)
    assert np.all(np.isfinite(p)) and p[0] > p[1]
    np.testing.assert_allclose(
        fedcostwavg_weights([1, 3], [0.0, 0.0], [1, 1], 0.5), [0.25, 0.75]
    )
    np.testing.assert_allclose(fedcostwavg_weights([5], [2.0], [1.0]), [1.0])
    with pytest.raises(ValueError):
        fedcostwavg_weights([1], [1], [1], alpha=1.5)


def test_fedfocus_worked_example_rounds_1_and_5():
    n, loss = [50, 30, 20], [0.9, 0.3, 0.6]
    theta = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    p1 = fedfocus_weights(n, loss, 1)
    np.testing.assert_allclose(p1, [0.5, 0.233333, 0.266667], atol=ATOL)
    np.testing.assert_allclose(p1 @ theta, [0.766667, 0.5], atol=ATOL)
    p5 = fedfocus_weights(n, loss, 5)
    np.testing.assert_allclose(p5, [0.5, 0.272693, 0.227307], atol=ATOL)
    np.testing.assert_allclose(p5 @ theta, [0.727307, 0.5], atol=ATOL)


def test_fedmix_preset_worked_example_and_edge_cases():
    p = fedfocus_weights(
        [100, 100, 200], [0.5, 0.2, 0.1], 1, beta=1.5, lambda0=10, gamma=1,
        mode="additive",
    )  # fmt: skip
    np.testing.assert_allclose(p, [0.699928, 0.194047, 0.106025], atol=ATOL)
    # all losses zero -> s = q; one client -> 1; negative loss -> error
    np.testing.assert_allclose(fedfocus_weights([1, 3], [0, 0], 1), [0.25, 0.75])
    np.testing.assert_allclose(fedfocus_weights([7], [0.3], 2), [1.0])
    with pytest.raises(ValueError):
        fedfocus_weights([1, 1], [-0.1, 0.2], 1)
    low = fedfocus_weights([1, 1], [0.1, 0.9], 1, direction=-1)
    assert low[0] > low[1]


def test_fednova_worked_example():
    c, p, tau_eff = fednova_coefficients([1, 1], [1.0, 4.0], [1, 4])
    assert tau_eff == pytest.approx(2.5)
    d = np.array([[1.0, 0.0], [0.0, 4.0]])
    np.testing.assert_allclose(c @ d, [1.25, 1.25], atol=ATOL)  # FedAvg: [0.5, 2]
    np.testing.assert_allclose(p @ d, [0.5, 2.0])
    c1, _, _ = fednova_coefficients([3], [9.049], [4])
    np.testing.assert_allclose(c1, [1.0])  # one client: the update itself
    with pytest.raises(ValueError):
        fednova_coefficients([1], [0.0], [0])


def test_fallback_weights_policy():
    w, rule = K.fallback_weights([0.0, 0.0], [1, 3])
    assert rule == "num-examples"
    np.testing.assert_allclose(w, [0.25, 0.75])
    w, rule = K.fallback_weights([np.nan, 1.0], [0, 0])
    assert rule == "uniform"
    np.testing.assert_allclose(w, [0.5, 0.5])
    w, rule = K.fallback_weights([1.0, 3.0], [5, 5])
    assert rule == "method"
    np.testing.assert_allclose(w, [0.25, 0.75])


def test_read_blocks_accepts_memoryview_payloads():
    models = _model(0)
    record = _record(models)
    layout = W.Layout.from_arrayrecord(record, small_tensor_size=1000)
    viewed = _record(models)
    for key in models:
        viewed[key].data = memoryview(record[key].data)
    for got, want in zip(
        W.read_blocks(viewed, layout), W.read_blocks(record, layout), strict=True
    ):
        np.testing.assert_array_equal(got, want)
    # a memoryview payload that needs the full check (header of another shape)
    viewed["conv.bias"].data = memoryview(Array(np.zeros(5, np.float32)).data)
    with pytest.raises(ValueError, match="conv.bias"):
        W.read_blocks(viewed, layout)


def test_weighted_sum_of_a_tensor_larger_than_one_chunk():
    rng = np.random.default_rng(0)
    size = 2 * K._AXPY_CHUNK + 123  # three chunks, the last one short
    columns = [[rng.standard_normal(size).astype(np.float32)] for _ in range(3)]
    weights = np.array([0.2, 0.3, 0.5])
    (got,) = K.weighted_sum(columns, weights)
    expected = sum(
        w * c[0].astype(np.float64) for w, c in zip(weights, columns, strict=True)
    )
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_update_gram_by_hand():
    # updates from the reference: u1 = [1, 2 | 3], u2 = [0, 1 | -1], u3 = 0
    reference = {"a": np.array([1.0, 1.0], np.float32), "b": np.array([2.0])}
    models = [
        {"a": np.array([2.0, 3.0], np.float32), "b": np.array([5.0])},
        {"a": np.array([1.0, 2.0], np.float32), "b": np.array([1.0])},
        reference,
    ]
    layout, cols = _columns(models)
    ref = [r.ravel() for r in _columns([reference])[1][0]]
    gram = K.update_gram(cols, ref, layout.float_blocks)
    # |u1|^2 = 1 + 4 + 9, <u1, u2> = 0 + 2 - 3, |u2|^2 = 0 + 1 + 1
    np.testing.assert_array_equal(gram, [[14, -1, 0], [-1, 2, 0], [0, 0, 0]])
    assert gram.dtype == np.float64
