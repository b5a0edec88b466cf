"""Parameters and forward FLOPs of the SG-MFT head against its Chinese-CLIP backbone."""

from __future__ import annotations


from benchmarks.common import main, save
from sgmft.config import model_config_for
from sgmft.models.model import build_model
from sgmft.models.summary import format_costs, model_costs


def run(quick: bool = False) -> dict:
    presets = ["tiny", "small"] if quick else ["tiny", "small", "ViT-B-16"]
    result = {}
    for preset in presets:
        rows = model_costs(build_model(model_config_for(preset), load_pretrained=False))
        print(format_costs(rows, f"{preset}:"))
        backbone, head = rows
        result[preset] = {"backbone_params": backbone.params, "head_params": head.params, "backbone_flops": backbone.flops,
                          "head_flops": head.flops, "head_flops_share": head.flops / (head.flops + backbone.flops)}
    save("head_cost", result)
    return result


if __name__ == "__main__":
    main(run, __doc__)
