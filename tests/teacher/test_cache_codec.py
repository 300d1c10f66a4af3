"""The compact cache codec: exact id sets, rank order, the mass, the budget, the bytes API."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distill_dag.teacher.cache.codec import (CacheEncoding, LogitCacheError, decode_topk_bytes, default_slot_bits,
                                              ef_bits, encode_topk_bytes)


def _topk(n, T, V, k, seed=0, zipf=True):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n * T, V, generator=g, dtype=torch.float64) * 2
    if zipf:  # frequent (small) ids get a prior, as in a BPE vocabulary
        z += -1.1 * torch.log(torch.arange(V, dtype=torch.float64) + 10)
    lp = torch.log_softmax(z, -1)
    v, i = lp.topk(k, -1)
    return i.view(n, T, k).numpy(), v.view(n, T, k).float().numpy()


@pytest.mark.parametrize("V,k,zipf", [(96, 24, False), (4096, 50, True), (128256, 50, True), (128256, 128, False)])
def test_compact_round_trip_keeps_the_id_set_rank_order_and_mass(V, k, zipf):
    n, T = 3, 8
    idx, lp = _topk(n, T, V, k, zipf=zipf)
    enc = CacheEncoding(k, V, T, "compact")
    rec = enc.encode(idx, lp, np.zeros((n, T), np.int32), np.full(n, T))
    di, dl = enc.decode(rec)
    assert np.array_equal(np.sort(di, -1), np.sort(idx, -1))  # the exact top-k set
    assert np.all(np.diff(dl, axis=-1) <= 0)  # rank order
    m = lambda a: np.log(np.exp(a.astype(np.float64)).sum(-1))  # noqa: E731
    np.testing.assert_allclose(m(dl), m(lp), atol=1e-5)
    # the log-probs of the top entries are close (the coding error is where p is tiny); uniform ids at
    # vocab 128k (a random init) are the worst case: exact ids, exact mass, coarse log-probs
    if zipf or V < 1000:
        assert np.abs(dl[..., 0] - lp[..., 0]).mean() < (0.02 if zipf else 0.1)
    assert enc.record_dtype.itemsize == 12 + T * (4 + 2) + T * enc.slot_bits // 8


def test_compact_smaller_k_read_is_a_prefix_of_the_rank_order():
    idx, lp = _topk(2, 4, 1000, 40, seed=3)
    enc = CacheEncoding(40, 1000, 4, "compact")
    rec = enc.encode(idx, lp, np.zeros((2, 4), np.int32), np.full(2, 4))
    full_i, _ = enc.decode(rec)
    part_i, part_l = enc.decode(rec, 10)
    assert np.array_equal(part_i, full_i[..., :10]) and part_l.shape == (2, 4, 10)
    assert np.array_equal(part_i[..., 0], idx[..., 0])  # the top-1 survives any grid


def test_compact_budget_meets_the_vocab_128k_goals_and_holds_any_id_set():
    V = 128256
    assert CacheEncoding(50, V, 256, "compact").bytes_per_token <= 100
    assert CacheEncoding(128, V, 256, "compact").bytes_per_token <= 250
    for k in (50, 128, 512):  # the budget always holds Elias-Fano's worst case + 1 bit per entry
        assert default_slot_bits(k, V) >= ef_bits(k, V) + k
    # the worst case: ids spread uniformly (a random-init teacher), and the largest ids
    idx = np.stack([np.random.default_rng(0).choice(V, 128, replace=False), np.arange(V - 128, V)])[None]
    lp = np.log(np.full((1, 2, 128), 1 / 200, np.float32))
    enc = CacheEncoding(128, V, 2, "compact")
    di, _ = enc.decode(enc.encode(idx, lp, np.zeros((1, 2), np.int32), np.array([2])))
    assert np.array_equal(np.sort(di, -1), np.sort(idx, -1))
    with pytest.raises(LogitCacheError, match="worst case"):
        CacheEncoding(128, V, 2, "compact", slot_bits=8)


def test_encoding_json_round_trip_and_legacy_dtypes_unchanged():
    for d in ("compact", "q8", "fp16", "fp32"):
        e = CacheEncoding(64, 128256, 16, d)
        assert CacheEncoding.from_json(e.to_json()) == e
    assert "slot_bits" not in CacheEncoding(64, 2048, 16, "q8").to_json()


def test_bytes_api_round_trip_and_refusals():
    idx, lp = _topk(2, 5, 128256, 64, seed=7)
    buf = encode_topk_bytes(idx, lp, 128256)
    assert len(buf) < idx.size * 3  # well under q8's ~3.2 B/entry at this vocabulary
    di, dl = decode_topk_bytes(buf)
    assert di.shape == (2, 5, 64) and np.array_equal(np.sort(di, -1), np.sort(idx, -1))
    with pytest.raises(ValueError):
        decode_topk_bytes(buf[:-1])
    with pytest.raises(ValueError):
        decode_topk_bytes(b"XXXX" + buf[4:])
    with pytest.raises(LogitCacheError):
        encode_topk_bytes(idx + 128256, lp, 128256)


# ---- the vectorised encoder and decoder are the frozen reference, byte for byte -------------------
def _hard_cases():
    """(name, V, k, indices [n, T, k], logprobs [n, T, k] float32): the shapes a teacher can give."""
    rng = np.random.default_rng(11)
    out = []
    for V, k, zipf, scale in [(96, 24, False, 1.0), (4096, 50, True, 2.0), (128256, 50, True, 2.0),
                              (128256, 128, False, 2.0), (2048, 64, True, 2.0), (2048, 64, False, 0.01),
                              (1000, 40, True, 8.0)]:
        out.append((f"V{V}k{k}", V, k, *_topk(3, 7, V, k, seed=V + k, zipf=zipf)))
    idx, lp = _topk(2, 6, 512, 32, seed=5)
    lp_t = lp.copy()
    lp_t[:, :, 4:20] = lp_t[:, :, 4:5]  # ties: many equal log-probs
    out.append(("ties", 512, 32, idx, lp_t))
    lp_u = np.full_like(lp, np.log(1 / 512))  # all equal (a uniform teacher)
    out.append(("uniform", 512, 32, idx, lp_u))
    lp_i = lp.copy()
    lp_i[:, :, 10:] = -np.inf  # -inf tail (a masked vocabulary): clamped to _MAX_GAP below the top
    out.append(("-inf tail", 512, 32, idx, lp_i))
    lp_f = lp.copy()
    lp_f[:, :, 1:] = lp_f[:, :, :1] - 150.0  # beyond the clamp
    out.append(("far tail", 512, 32, idx, lp_f))
    V = 40  # k == V: every id, the id gaps all zero
    z = torch.log_softmax(torch.from_numpy(rng.normal(0, 3, (2 * 5, V))), -1)
    v, i = z.topk(V, -1)
    out.append(("k=V", V, V, i.view(2, 5, V).numpy(), v.view(2, 5, V).float().numpy()))
    lp_s = lp[..., ::-1].copy()  # unsorted (the encoder sorts)
    out.append(("unsorted", 512, 32, idx[..., ::-1].copy(), lp_s))
    out.append(("k=1", 512, 1, idx[..., :1].copy(), lp[..., :1].copy()))
    return out


@pytest.mark.parametrize("dtype", ["compact", "q8", "fp16", "fp32"])
def test_encoder_and_decoder_match_the_frozen_reference_byte_for_byte(dtype):
    import codec_v3_reference as ref

    for name, V, k, idx, lp in _hard_cases():
        if dtype == "compact" and k == 1:
            continue
        n, T = idx.shape[:2]
        tok = np.random.default_rng(0).integers(0, V, (n, T))
        valid = np.array([T, T // 2, 1][:n])  # masked rows: padding positions are coded all the same
        new, old = CacheEncoding(k, V, T, dtype), ref.CacheEncoding(k, V, T, dtype)
        with np.errstate(invalid="ignore"):
            r_old = old.encode(idx, lp, tok, valid)
            r_new, lp_new = new.encode(idx, lp, tok, valid, with_logprobs=True)
        assert r_new.tobytes() == r_old.tobytes(), name
        (i_n, l_n), (i_o, l_o) = new.decode(r_new), old.decode(r_old)
        assert np.array_equal(i_n, i_o) and np.array_equal(l_n, l_o, equal_nan=True), name
        assert np.array_equal(lp_new, l_n, equal_nan=True), name  # what encode says decode gives, bit for bit
        for kk in (1, k // 2 or 1):
            assert all(np.array_equal(a, b) for a, b in zip(new.decode(r_new, kk), old.decode(r_old, kk)))


def test_pack_ids_matches_the_reference_at_every_width():
    import codec_v3_reference as ref

    from distill_dag.teacher.cache.codec import pack_ids, unpack_ids

    rng = np.random.default_rng(0)
    for bits in range(1, 26):
        for k in (1, 2, 3, 7, 8, 13, 50, 64, 128, 129):
            ids = rng.integers(0, 2**bits, (4, k))
            ids[0] = 2**bits - 1
            got = pack_ids(ids, bits)
            assert np.array_equal(got, ref.pack_ids(ids, bits)), (bits, k)
            assert np.array_equal(unpack_ids(got, k, bits), ids)


def test_the_rate_control_tables_are_the_formula_element_for_element():
    from distill_dag.teacher.cache import codec

    table, offs = codec._recon_table()
    for lv, q in enumerate(codec._Q_LEVELS):
        c = np.arange(int(np.rint(q)) + 1)
        # the formula as the decoder evaluates it: int codes, a [P, 1] grid column
        want = codec._reconstruct(c.reshape(-1, 1)[:, [0, 0]].T.copy(), np.full((2, 1), q))[0]
        assert np.array_equal(table[offs[lv] + c], want), lv
    idx, lp = _topk(2, 9, 4096, 50, seed=2)
    import codec_v3_reference as ref

    l = np.sort(lp.reshape(-1, 50).astype(np.float64), -1)
    for got, want in zip(codec._level_table(l), ref._level_table(l)):
        assert np.array_equal(got, want)
