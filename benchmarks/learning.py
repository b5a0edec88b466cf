"""Does a training recipe learn? A ``jobs/configs`` recipe trained on a local Ray, as
``sgmft train`` runs it, with validation accuracy, gradient norm and learning rate per epoch
and the test accuracy, against chance.

    python -m benchmarks.learning                                   # jobs/configs/small.yaml
    python -m benchmarks.learning --config jobs/configs/demo.yaml   # any CPU recipe

Writes ``results/learning_<run name>.json``. Goal: the last epoch's validation accuracy at
least 3x chance (``learned``). The GPU recipe is checked the same way by ``gpu_train``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.common import Timer, local_ray, save
from sgmft.config import load_config

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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", type=Path, default=REPO / "jobs" / "configs" / "small.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    run(args.config.resolve(), args.overrides)
