"""Contrastive pretraining: the pairs, the loss over a global batch, retrieval metrics, and a
real Ray Train run whose exported backbone SG-MFT loads as it loads released weights."""

from __future__ import annotations

import os
import socket

import pyarrow.parquet as pq
import pytest
import torch
import torch.multiprocessing as mp

from sgmft.data.pairs import COLOURS, SHAPE_NAMES, pair, synthesize_pairs
from sgmft.data.schema import load_labels, split_files, split_rows, validate_dataset
from sgmft.data.synth import cue_words
from sgmft.data.labels import DEFAULT_LABELS
from sgmft.models.contrastive import ContrastiveOutput, contrastive_loss, retrieval_metrics
from sgmft.runs import RunConfigChanged


def test_pairs_name_what_is_pictured_and_where_and_nothing_of_the_location_task(tmp_path):
    report = synthesize_pairs(tmp_path / "a", n=60, seed=3, image_size=32)
    again = synthesize_pairs(tmp_path / "b", n=60, seed=3, image_size=32)
    assert report == again and report["splits"] == {"train": 48, "val": 6, "test": 6}
    validate_dataset(tmp_path / "a")
    assert load_labels(tmp_path / "a") == []
    for split in ("train", "val", "test"):
        first = [pq.read_table(f).to_pydict() for f in split_files(tmp_path / "a", split)]
        second = [pq.read_table(f).to_pydict() for f in split_files(tmp_path / "b", split)]
        assert first == second  # byte-identical images, same texts
    banned = cue_words(DEFAULT_LABELS)
    for index in range(200):
        row = pair(0, index, 32, two_object_share=0.5)
        objects = row["meta_objects"].split("|")
        for colour_shape in objects:
            colour, shape = colour_shape.split()
            assert colour in COLOURS and f"{colour}的{SHAPE_NAMES[shape]}" in row["text"]
        if len(objects) == 2:
            assert "左" in row["text"] and "右" in row["text"]
        assert not [w for w in banned if w in row["text"]], row["text"]
        assert row["label"] is None


def test_pairs_refuse_what_cannot_make_a_dataset(tmp_path):
    from sgmft.data.schema import DatasetError

    with pytest.raises(DatasetError, match="n=5"):
        synthesize_pairs(tmp_path / "x", n=5)
    with pytest.raises(DatasetError, match="two_object_share"):
        synthesize_pairs(tmp_path / "y", n=20, two_object_share=1.5)


def _output(text: torch.Tensor, image: torch.Tensor, scale: float = 10.0) -> ContrastiveOutput:
    return ContrastiveOutput(torch.nn.functional.normalize(text, dim=-1), torch.nn.functional.normalize(image, dim=-1),
                             torch.tensor(scale))


def test_the_loss_is_symmetric_infonce_and_recall_counts_the_partner():
    torch.manual_seed(0)
    x = torch.randn(8, 16)
    aligned = contrastive_loss(_output(x, x, scale=100.0))
    shuffled = contrastive_loss(_output(x, x.roll(1, dims=0), scale=100.0))
    assert float(aligned) < 0.05 < float(shuffled)
    t, i = torch.randn(5, 4), torch.randn(5, 4)
    logits = 10.0 * torch.nn.functional.normalize(t, dim=-1) @ torch.nn.functional.normalize(i, dim=-1).T
    expected = (torch.nn.functional.cross_entropy(logits, torch.arange(5)) + torch.nn.functional.cross_entropy(logits.T, torch.arange(5))) / 2
    assert float(contrastive_loss(_output(t, i))) == pytest.approx(float(expected), rel=1e-6)

    e = torch.eye(4)
    assert retrieval_metrics(e, e)["text_to_image_recall@1"] == 1.0
    swapped = retrieval_metrics(e, e[[1, 0, 2, 3]], ks=(1, 2))
    assert swapped["text_to_image_recall@1"] == 0.5 and swapped["image_to_text_recall@1"] == 0.5
    assert swapped["text_to_image_recall@2"] == 0.5  # the swapped pair's partner scores 0: ranked behind ties
    ties = retrieval_metrics(torch.ones(3, 2), torch.ones(3, 2))
    assert ties["text_to_image_recall@1"] == 0.0  # a tie is not a hit


def _two_ranks(rank: int, port: int, text: torch.Tensor, image: torch.Tensor, out: dict) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        mine = slice(rank * 4, rank * 4 + 4)
        t, i = text[mine].clone().requires_grad_(), image[mine].clone().requires_grad_()
        loss = contrastive_loss(_output(t, i))
        loss.backward()
        out[rank] = (float(loss), t.grad.clone(), i.grad.clone())
    finally:
        dist.destroy_process_group()


def test_negatives_are_the_global_batch_and_gradients_reach_each_ranks_own_rows():
    """Two processes of 4 pairs each: each rank's loss is its rows' share of the loss over all 8
    (every other rank's embeddings are its negatives), and the gathered rows carry gradients back."""
    torch.manual_seed(1)
    text, image = torch.randn(8, 6), torch.randn(8, 6)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_two_ranks, args=(port, text, image, out), nprocs=2, join=True)

    t, i = text.clone().requires_grad_(), image.clone().requires_grad_()
    ref = _output(t, i)
    logits = ref.logit_scale * ref.text @ ref.image.T
    per_row = (torch.nn.functional.cross_entropy(logits, torch.arange(8), reduction="none")
               + torch.nn.functional.cross_entropy(logits.T, torch.arange(8), reduction="none")) / 2
    for rank in (0, 1):
        assert out[rank][0] == pytest.approx(float(per_row[rank * 4:rank * 4 + 4].mean().detach()), rel=1e-5)
    # The gather sends each row's gradient home from every rank's loss, so rank r's rows get
    # d(L_0 + L_1)/dx_r; DDP then averages over the 2 ranks: the gradient of the global mean.
    per_row.mean().backward()
    assert torch.allclose(torch.cat([out[0][1], out[1][1]]) / 2, t.grad, atol=1e-6)
    assert torch.allclose(torch.cat([out[0][2], out[1][2]]) / 2, i.grad, atol=1e-6)


def test_pretraining_on_ray_exports_a_backbone_that_sgmft_loads(ray_cluster, tmp_path):
    from sgmft.config import load_config
    from sgmft.models.model import build_model
    from sgmft.pretrain import pretrain

    # 320 training pairs / 2 workers / 16 = 10 steps an epoch: a worker dies in the middle of epoch 2
    cfg = load_config("jobs/configs/pretrain.yaml", [
        f"train.storage_path={tmp_path}", "pretrain.synth_n=400", "pretrain.synth_val_frac=0.1", "pretrain.synth_test_frac=0.1",
        "pretrain.synth_image_size=32", "train.epochs=2", "data.batch_size=16", "train.fail_once_at_step=15",
        "train.max_failures=1"])
    outcome = pretrain(cfg)
    assert (tmp_path / "pretrain-tiny" / ".fail_once_done").is_file()
    assert [h["epoch"] for h in outcome.history] == [1, 2]  # resumed from epoch 1's checkpoint, no epoch lost
    for h in outcome.history:
        assert 0.0 <= h["val_t2i_r@1"] <= 1.0 and h["val_recall@1"] == pytest.approx((h["val_t2i_r@1"] + h["val_i2t_r@1"]) / 2)
        assert h["grad_norm"] > 0
    assert outcome.backbone.name == "weights.pt" and (outcome.backbone.parent / "metrics.json").is_file()
    assert split_rows(tmp_path / "pretrain-tiny" / "pairs-n400-seed0-px32-two0.7-val0.1-test0.1", "val") == 40

    # the exported weights are what SG-MFT's backbone loads, through the released-weights path
    # (build_model is how train, tune, features cache and ablate build their models)
    cfg.model.backbone.checkpoint = str(outcome.backbone)
    model = build_model(cfg.model, load_pretrained=True)
    exported = torch.load(outcome.backbone, weights_only=True)["state_dict"]
    for name, value in model.backbone.clip.state_dict().items():
        assert torch.equal(value, exported[f"module.{name}"]), name

    # the same run name with other pairs is refused before anything runs, not resumed on them
    cfg.pretrain.synth_n = 800
    with pytest.raises(RunConfigChanged, match=r"pretrain\.synth_n 400 -> 800"):
        pretrain(cfg)
