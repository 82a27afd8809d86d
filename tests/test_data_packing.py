"""Packing and collators: bins never overflow, boundaries are masked, and neat packing really isolates examples
(the packed loss equals the token-weighted mean of the separate losses)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loraforge.data.collator import NeatPackingCollator, PaddingCollator
from loraforge.data.encoding import Encoded
from loraforge.data.packing import assign_bins, chunk_stream, pack
from test_data_fakes import sharegpt_rows


def _encoded(seqs: list[list[int]], labels: list[list[int]] | None = None) -> Encoded:
    labels = labels or [list(s) for s in seqs]
    lengths = np.array([len(s) for s in seqs], np.int64)
    return Encoded(ids=np.array([t for s in seqs for t in s], np.int32),
                   labels=np.array([t for s in labels for t in s], np.int32),
                   offsets=np.concatenate([[0], np.cumsum(lengths)]), full_lengths=lengths,
                   kept=np.arange(len(seqs)), errors=[], no_label=[])


def test_bins_hold_every_example_once_and_never_overflow():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, size=500)
    bins = assign_bins(lengths, 128)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(500))
    assert max(int(lengths[b].sum()) for b in bins) <= 128
    # best-fit decreasing is close to the lower bound on the number of sequences
    assert len(bins) <= int(np.ceil(lengths.sum() / 128) * 1.1) + 1


def test_pack_restarts_positions_and_masks_each_example_start():
    enc = _encoded([[1, 2, 3], [4, 5], [6, 7, 8, 9]])
    packed, pos = pack(enc, 6, neat=True)
    rows = [packed.ids[a:b].tolist() for a, b in zip(packed.offsets[:-1], packed.offsets[1:])]
    assert sorted(t for r in rows for t in r) == list(range(1, 10))
    assert all(len(r) <= 6 for r in rows)
    for a, b in zip(packed.offsets[:-1], packed.offsets[1:]):
        ids, labels, p = packed.ids[a:b].tolist(), packed.labels[a:b].tolist(), pos[a:b].tolist()
        starts = [i for i, x in enumerate(p) if x == 0]
        assert starts[0] == 0
        for s in starts:
            assert labels[s] == -100  # never trained across an example boundary
        assert [x for i, x in enumerate(labels) if i not in starts] == [x for i, x in enumerate(ids) if i not in starts]
    _, plain_pos = pack(enc, 6, neat=False)
    first = plain_pos[packed.offsets[0]:packed.offsets[1]].tolist()
    assert first == list(range(len(first)))  # plain packing: positions run on through the sequence


def test_chunk_stream_cuts_blocks():
    enc = _encoded([[1, 2, 3], [4, 5, 6, 7, 8]])
    out = chunk_stream(enc, 3)
    assert out.lengths.tolist() == [3, 3, 2]
    assert out.ids.tolist() == list(range(1, 9))


def test_padding_collator_pads_labels_and_mask():
    batch = PaddingCollator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                             {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_neat_collator_layouts():
    feats = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "position_ids": [0, 1, 0]},
             {"input_ids": [4], "labels": [-100], "position_ids": [0]}]
    flat = NeatPackingCollator(pad_token_id=0, flatten=True)(feats)
    assert "attention_mask" not in flat  # transformers only detects packing when there is no 2D mask
    assert flat["use_cache"] is False  # ... and no KV cache
    assert flat["input_ids"].tolist() == [[1, 2, 3, 4]] and flat["position_ids"].tolist() == [[0, 1, 0, 0]]
    padded = NeatPackingCollator(pad_token_id=0)(feats)
    assert padded["position_ids"].tolist() == [[0, 1, 0], [0, 0, 1]]
    assert padded["labels"].tolist() == [[-100, 2, 3], [-100, -100, -100]]


_MODELS: dict = {}


def _model_and_tokenizer(path, attn: str):
    """tiny-random-qwen3 (the built-in, fp32) with ``attn``; loaded once per attention kernel."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if attn not in _MODELS:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)
        _MODELS[attn] = (model.eval(), tok)
    return _MODELS[attn]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("flatten", [False, True])
def test_neat_packed_loss_equals_token_weighted_mean_of_separate_losses(tiny_qwen3_path, attn, flatten):
    from loraforge.data.templates import get_template

    model, tok = _model_and_tokenizer(tiny_qwen3_path, attn)
    template = get_template("qwen3")
    from loraforge.data.encoding import EncodeOptions, encode_all
    from loraforge.data.formats import convert_row
    from loraforge.data.readers import RawRow
    from loraforge.data.registry import parse_entry

    attr = parse_entry("s", {"file_name": "x.json", "formatting": "sharegpt", "columns": {"system": "system"}})
    rows = sharegpt_rows(7)
    for i, r in enumerate(rows):  # vary lengths so packing mixes sizes
        r["conversations"][1]["value"] += " extra" * i
    convs = [convert_row(RawRow(r, "x.json", i), attr) for i, r in enumerate(rows)]
    enc = encode_all(convs, tok, template, EncodeOptions(cutoff_len=200, train_on_prompt=True))
    packed, pos = pack(enc, 200, neat=True)
    assert len(packed.lengths) < len(enc.lengths) and len(packed.lengths) >= 2

    with torch.no_grad():
        total, count = 0.0, 0
        for a, b in zip(enc.offsets[:-1], enc.offsets[1:]):
            ids = torch.tensor([enc.ids[a:b].tolist()])
            labels = torch.tensor([enc.labels[a:b].tolist()])
            n = int((labels[0, 1:] != -100).sum())
            total += model(input_ids=ids, labels=labels).loss.item() * n
            count += n
        feats = [{"input_ids": packed.ids[a:b].tolist(), "labels": packed.labels[a:b].tolist(),
                  "position_ids": pos[a:b].tolist()} for a, b in zip(packed.offsets[:-1], packed.offsets[1:])]
        batch = NeatPackingCollator(pad_token_id=tok.pad_token_id, flatten=flatten)(feats)
        packed_loss = model(**batch).loss.item()
        # the same batch with plain (cross-attending) packing must differ, or the test proves nothing
        plain = PaddingCollator(pad_token_id=tok.pad_token_id)(
            [{"input_ids": f["input_ids"], "labels": f["labels"]} for f in feats])
        plain_loss = model(**plain).loss.item()
    assert packed_loss == pytest.approx(total / count, abs=1e-5)
    assert abs(plain_loss - total / count) > 1e-4


def test_to_dataset_splits_huge_columns_into_arrow_chunks(monkeypatch):
    import loraforge.data.encoding as encoding

    monkeypatch.setattr(encoding, "MAX_CHUNK_VALUES", 4)
    enc = _encoded([[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]])
    ds = enc.to_dataset(position_ids=np.arange(10))
    assert ds["input_ids"][:] == [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    assert ds.data["labels"].num_chunks > 1 and ds["position_ids"][2] == [5, 6, 7, 8]


def test_build_collator_follows_the_config():
    from loraforge.config import load_config
    from loraforge.data.collator import build_collator
    from test_data_fakes import char_tokenizer

    tok = char_tokenizer()
    base = {"model_name_or_path": "unused", "dataset": "d"}
    plain = build_collator(load_config(base, purpose="data", build_training_args=False), tok)
    assert isinstance(plain, PaddingCollator) and plain.pad_token_id == tok.pad_token_id
    neat = build_collator(load_config({**base, "neat_packing": True}, purpose="data", build_training_args=False), tok)
    assert isinstance(neat, NeatPackingCollator) and not neat.flatten  # no flash-attention on this machine
    fa2 = build_collator(load_config({**base, "neat_packing": True, "flash_attn": "fa2"}, purpose="data",
                                     build_training_args=False), tok)
    assert fa2.flatten  # flash-attention only finds the boundaries in a single flattened row
