"""The model side of the Serve app, in-process: a batch whose JPEGs cross as their bytes
(``serve.jpeg_decode: model``) is answered as the same batch decoded by the ingress. On the
CPU here; on nvJPEG where a GPU is present (the ``cuda`` case, run by benchmarks/gpu_suite.sh).
"""

from __future__ import annotations

import hostile_images as hi
import numpy as np
import pytest
import torch

from serve_app.app import PostBatch, ServedModel
from sgmft.config import Config, model_config_for
from sgmft.data.labels import DEFAULT_LABELS
from sgmft.data.preprocess import image_pixels, tokenize
from sgmft.model_dir import save_model_dir
from sgmft.models.model import build_model

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = Config(model=model_config_for("tiny", num_labels=len(DEFAULT_LABELS)))
    return save_model_dir(tmp_path_factory.mktemp("model") / "m", build_model(cfg.model), cfg, DEFAULT_LABELS, {"version": "t1"})


@pytest.mark.parametrize("device", DEVICES)
def test_jpegs_decoded_by_the_model_are_answered_as_pixels_from_the_ingress(model_dir, device, monkeypatch):
    monkeypatch.setattr("sgmft.inference.default_device", lambda: torch.device(device))
    served = ServedModel(str(model_dir), max_batch_size=4, top_k=3, cuda_graphs=True)
    spec = served.runner.spec
    jpegs = [hi.encode(hi.photo(seed=i), "JPEG", quality=90) for i in range(5)]
    images = [*jpegs, hi.good_png(), b"\xff\xd8\xff\xe0 not a jpeg \xff\xd9"]
    ids = tokenize([f"第{i}条 在医院排队" for i in range(len(images))], spec.context_length)
    pixels = [image_pixels(image, spec) for image in images[:-1]]
    from_ingress = served.run([PostBatch.of(list(zip(ids[:-1], pixels)))])[0]
    # Two batches merged into one run, as a model replica merges what is queued: JPEGs as bytes,
    # the PNG as pixels, and an undecodable JPEG that gets the CPU path's error.
    crossing = [image if i < len(jpegs) or i == len(images) - 1 else pixels[i] for i, image in enumerate(images)]
    first, second = served.run([PostBatch.of(list(zip(ids[:3], crossing[:3]))), PostBatch.of(list(zip(ids[3:], crossing[3:])))])
    from_model = first + second
    assert from_model[-1] == {"error": {"code": "image_undecodable", "message": from_model[-1]["error"]["message"]}}
    for ingress, model in zip(from_ingress, from_model[:-1]):
        assert [x["label"] for x in model["top_k"]][0] == ingress["top_k"][0]["label"]
        np.testing.assert_allclose([x["probability"] for x in model["top_k"]],
                                   [x["probability"] for x in ingress["top_k"]], atol=0.02)
    assert max(r["batch_size"] for r in from_model[:-1]) == 4  # the merged run still forwards full batches
