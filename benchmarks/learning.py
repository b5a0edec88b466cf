"""Does a training recipe learn? A ``jobs/configs`` recipe trained on a local Ray, as
``sgmft train`` runs it, with validation accuracy, gradient norm and learning rate per epoch
and the test accuracy, against chance.

    python -m benchmarks.learning                                   # jobs/configs/small.yaml
    python -m benchmarks.learning --config jobs/configs/demo.yaml   # any CPU recipe
    python -m benchmarks.learning --pretrain                        # jobs/configs/pretrain.yaml

Writes ``results/learning_<run name>.json``. Goal: the last epoch's validation accuracy at
least 3x chance (``learned``). The GPU recipe is checked the same way by ``gpu_train``.
With ``--pretrain``: contrastive pretraining's recall@1 both ways per epoch on the held-out
pairs (goal 0.5; chance 1/N), and of each held-out text's top-1 image, how often its
colours, its shapes and both are the text's (side by side), which says what was learnt.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

from benchmarks.common import Timer, local_ray, save
from sgmft.config import load_config
from sgmft.data.schema import split_rows

REPO = Path(__file__).resolve().parents[1]
LEARNED_OVER_CHANCE = 3.0


def run(config: Path, overrides: list[str]) -> dict:
    from sgmft.train import train

    with tempfile.TemporaryDirectory(prefix="sgmft-learning-") as tmp, local_ray(num_cpus=4):
        cfg = load_config(config, [f"train.storage_path={tmp}", *overrides])
        with Timer() as timer:
            outcome = train(cfg)
    chance = 1.0 / cfg.model.num_labels
    history = [{k: h.get(k) for k in ("epoch", "train_loss", "val_accuracy", "grad_norm", "lr", "collapsed", "samples_per_s")}
               for h in outcome.history]
    result = {
        "config": str(config.relative_to(REPO) if config.is_relative_to(REPO) else config), "overrides": overrides,
        "preset": cfg.model.backbone.preset, "policy": cfg.model.backbone.policy, "lr": cfg.train.lr,
        "posts": cfg.data.synth.n, "epochs": history, "test_accuracy": outcome.test["accuracy"], "chance": chance,
        "learned": history[-1]["val_accuracy"] >= LEARNED_OVER_CHANCE * chance, "wall_s": timer.seconds,
    }
    print(f"{result['config']} ({result['preset']}, {result['policy']} backbone, lr {cfg.train.lr:g}): val accuracy by epoch "
          + ", ".join(f"{h['val_accuracy']:.3f}" for h in history)
          + f"; test {result['test_accuracy']:.3f} (chance {chance:.3f}): {'learned' if result['learned'] else 'DID NOT LEARN'}")
    save(f"learning_{cfg.train.run_name}", result)
    return result


def attributes_matched(backbone: Path, cfg, pairs: Path) -> dict[str, float]:
    """Of each held-out text's top-1 image: the share with the text's object count, colours
    (by side), shapes (by side) and both."""
    import pyarrow.parquet as pq
    import torch

    from sgmft.data.preprocess import PreprocessSpec, preprocess_batch
    from sgmft.data.schema import split_files
    from sgmft.models.contrastive import ContrastiveCLIP

    backbone_cfg = dataclasses.replace(cfg.model.backbone, checkpoint=str(backbone))
    model = ContrastiveCLIP(backbone_cfg).eval()
    rows = pq.read_table(split_files(pairs, "val")).to_pydict()
    inputs = preprocess_batch(rows, PreprocessSpec.from_config(cfg))
    with torch.inference_mode():
        texts = model.embed_text(torch.from_numpy(inputs["input_ids"]))
        images = model.embed_image(torch.from_numpy(inputs["pixel_values"]))
    top = (texts @ images.T).argmax(dim=1).tolist()
    objects = [[tuple(o.split()) for o in row.split("|")] for row in rows["meta_objects"]]
    same = {"count": lambda a, b: len(a) == len(b), "colours": lambda a, b: [c for c, _ in a] == [c for c, _ in b],
            "shapes": lambda a, b: [s for _, s in a] == [s for _, s in b], "both": lambda a, b: a == b}
    return {name: sum(test(objects[q], objects[k]) for q, k in enumerate(top)) / len(top) for name, test in same.items()}


def run_pretrain(config: Path, overrides: list[str]) -> dict:
    from sgmft.pretrain import pairs_dir, pretrain

    with tempfile.TemporaryDirectory(prefix="sgmft-learning-") as tmp, local_ray(num_cpus=4):
        cfg = load_config(config, [f"train.storage_path={tmp}", *overrides])
        with Timer() as timer:
            outcome = pretrain(cfg)
        pairs = pairs_dir(cfg)
        matched = attributes_matched(outcome.backbone, cfg, pairs)
        n_train, n_val = split_rows(pairs, "train"), split_rows(pairs, "val")
    history = [{k: h[k] for k in ("epoch", "train_loss", "val_t2i_r@1", "val_i2t_r@1", "grad_norm", "lr")} for h in outcome.history]
    last = history[-1]
    result = {
        "config": str(config.relative_to(REPO) if config.is_relative_to(REPO) else config), "overrides": overrides,
        "preset": cfg.model.backbone.preset, "pairs": cfg.pretrain.pairs_path or f"synthetic, {cfg.pretrain.synth_n}",
        "train_pairs": n_train, "held_out": n_val, "chance_recall@1": 1 / n_val,
        "epochs": history, "best": {k: outcome.best[k] for k in ("epoch", "val_t2i_r@1", "val_i2t_r@1")},
        "retrieval_at_best": {k.removeprefix("val_retrieval/"): v for k, v in outcome.best.items()
                              if k.startswith("val_retrieval/")},
        "top1_matches": matched, "goal_recall@1": 0.5,
        "reached": min(last["val_t2i_r@1"], last["val_i2t_r@1"]) >= 0.5, "wall_s": timer.seconds,
    }
    print(f"{result['config']} ({result['preset']}, {cfg.train.epochs} epochs): recall@1 text->image "
          + ", ".join(f"{h['val_t2i_r@1']:.3f}" for h in history) + f" (chance {1 / n_val:.4f}); top-1 image has the "
          f"text's colours {matched['colours']:.0%}, shapes {matched['shapes']:.0%}, both {matched['both']:.0%}")
    save(f"learning_{cfg.train.run_name}", result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", type=Path, help="the recipe (default: small.yaml, or pretrain.yaml with --pretrain)")
    parser.add_argument("--pretrain", action="store_true", help="a contrastive pretraining recipe: recall, not accuracy")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    config = args.config or REPO / "jobs" / "configs" / ("pretrain.yaml" if args.pretrain else "small.yaml")
    (run_pretrain if args.pretrain else run)(config.resolve(), args.overrides)
