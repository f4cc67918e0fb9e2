"""Packing: shifted documents packed by grain match a simple reference packer and never mix documents."""

from __future__ import annotations

import grain
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from metatrain.data.packing import BATCH_FIELDS, check_batch, empty_row, pack_examples, rows_to_batch, shift_document
from metatrain.roles import Role


def reference_pack(docs: list[tuple[np.ndarray, np.ndarray]], seq_len: int) -> dict[str, np.ndarray]:
    """Concatenate shifted documents, cut every `seq_len`, pad the last row: written plainly.

    Returns the batch fields plus `doc` (which document each position came from, -1 for padding).
    """
    inputs, targets, roles, doc_of, pos = [], [], [], [], []
    for d, (ids, r) in enumerate(docs):
        for t in range(len(ids) - 1):
            inputs.append(ids[t])
            targets.append(ids[t + 1])
            roles.append(r[t + 1])
            doc_of.append(d)
    n_rows = -(-len(inputs) // seq_len)
    pad = n_rows * seq_len - len(inputs)
    inputs += [0] * pad
    targets += [0] * pad
    roles += [0] * pad
    doc_of += [-1] * pad
    out = {k: np.asarray(v).reshape(n_rows, seq_len) for k, v in
           (("inputs", inputs), ("targets", targets), ("target_roles", roles), ("doc", doc_of))}
    segment_ids = np.zeros((n_rows, seq_len), np.int64)
    positions = np.zeros((n_rows, seq_len), np.int64)
    for row in range(n_rows):
        segment, start = 0, 0
        for t in range(seq_len):
            d = out["doc"][row, t]
            if d < 0:
                continue
            if t == 0 or out["doc"][row, t - 1] != d:
                segment, start = segment + 1, t
            segment_ids[row, t] = segment
            positions[row, t] = t - start
    out["segment_ids"] = segment_ids
    out["positions"] = positions
    return out


def grain_pack(docs: list[tuple[np.ndarray, np.ndarray]], seq_len: int) -> dict[str, np.ndarray]:
    examples = grain.MapDataset.source([shift_document(ids, r) for ids, r in docs]).to_iter_dataset()
    return rows_to_batch(list(pack_examples(examples, seq_len)))


@st.composite
def documents(draw):
    n = draw(st.integers(1, 12))
    docs = []
    for _ in range(n):
        length = draw(st.integers(2, 60))
        ids = np.asarray(draw(st.lists(st.integers(0, 4095), min_size=length, max_size=length)), np.int32)
        roles = np.asarray(draw(st.lists(st.integers(1, 4), min_size=length, max_size=length)), np.int8)
        docs.append((ids, roles))
    return docs


@given(docs=documents(), seq_len=st.sampled_from([2, 3, 7, 13, 31]))
def test_grain_packing_equals_reference_packer(docs, seq_len):
    got = grain_pack(docs, seq_len)
    want = reference_pack(docs, seq_len)
    check_batch(got, len(want["inputs"]), seq_len)
    for field in BATCH_FIELDS:
        np.testing.assert_array_equal(got[field], want[field], err_msg=field)


@given(docs=documents(), seq_len=st.sampled_from([3, 7, 13, 31]))
def test_packing_never_mixes_documents(docs, seq_len):
    got = grain_pack(docs, seq_len)
    doc = reference_pack(docs, seq_len)["doc"]
    seg, pos = got["segment_ids"], got["positions"]
    for row in range(seg.shape[0]):
        for s in np.unique(seg[row]):
            in_segment = seg[row] == s
            owners = np.unique(doc[row][in_segment])
            if s == 0:  # padding: one block at the end, no loss
                assert owners.tolist() == [-1]
                assert (got["target_roles"][row][in_segment] == Role.PAD).all()
                continue
            assert len(owners) == 1, "a segment holds tokens of two documents"
            # positions count up from 0 inside the segment, with no gaps
            np.testing.assert_array_equal(pos[row][in_segment], np.arange(in_segment.sum()))
    # every target is the next token of its own document: inside a segment, the
    # target at t is the input at t + 1.
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    np.testing.assert_array_equal(got["targets"][:, :-1][same], got["inputs"][:, 1:][same])


@given(docs=documents(), seq_len=st.sampled_from([5, 11]))
def test_role_counts_survive_packing(docs, seq_len):
    got = grain_pack(docs, seq_len)
    want = np.bincount(np.concatenate([r[1:] for _, r in docs]), minlength=5)
    np.testing.assert_array_equal(np.bincount(got["target_roles"].ravel(), minlength=5)[1:], want[1:])


def test_long_document_is_split_into_pieces_that_keep_their_targets():
    ids = np.arange(1, 24, dtype=np.int32)  # 23 tokens -> 22 examples -> rows of 7: 7, 7, 7, 1
    roles = np.full(23, Role.THINKING, np.int8)
    got = grain_pack([(ids, roles)], 7)
    np.testing.assert_array_equal(got["inputs"].ravel()[:22], ids[:-1])
    np.testing.assert_array_equal(got["targets"].ravel()[:22], ids[1:])
    np.testing.assert_array_equal(got["positions"][:, 0], [0, 0, 0, 0])  # each piece restarts at 0
    assert (got["segment_ids"][:3] == 1).all()
    assert got["segment_ids"][3].tolist() == [1, 0, 0, 0, 0, 0, 0]


def test_shift_document_refuses_single_token():
    with pytest.raises(ValueError, match=">= 2 tokens"):
        shift_document(np.array([1]), np.array([4]))


def test_empty_row_is_all_padding():
    batch = rows_to_batch([empty_row(13)] * 3)
    check_batch(batch, 3, 13)
    assert not batch["segment_ids"].any() and not batch["target_roles"].any()
