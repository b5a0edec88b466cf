"""cn_clip's tokenizer (``FullTokenizer`` over its ``vocab.txt``), without torch.

Every process that preprocesses posts tokenizes: each Ray Data worker, each Serve ingress
replica. ``import cn_clip.clip`` runs the package's ``__init__``, which imports its model
(torch) and ``cn_clip.clip.utils`` (torchvision, and through it ``torch._dynamo``): 3.5 s
against 0.13 s for this module's way, per process (a fresh process tokenizing one text, two
runs each way on the project's 2-core machine). So this module loads the one file the
tokenizer is, ``cn_clip/clip/bert_tokenizer.py`` (standard library and ``six`` only), under
a name of its own, from the installed package's directory. The ``cn_clip`` package itself is
neither imported nor changed: ``import cn_clip.clip`` anywhere else still gets the whole
package. Tested with the cn-clip version ``pyproject.toml`` pins.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

MODULE_NAME = "sgmft.data._cn_clip_bert_tokenizer"


@functools.lru_cache(maxsize=1)
def clip_dir() -> Path:
    """The installed ``cn_clip/clip`` directory (vocab.txt, bert_tokenizer.py, model_configs/).

    ``find_spec`` imports the empty ``cn_clip`` package, not ``cn_clip.clip``'s ``__init__``.
    """
    spec = importlib.util.find_spec("cn_clip.clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the cn_clip package (Chinese-CLIP's vocabulary, configs and model code) is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


@functools.lru_cache(maxsize=1)
def tokenizer() -> Any:
    """cn_clip's ``FullTokenizer`` over its own vocab.txt, loaded once per process."""
    spec = importlib.util.spec_from_file_location(MODULE_NAME, clip_dir() / "bert_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FullTokenizer(vocab_file=str(clip_dir() / "vocab.txt"))
