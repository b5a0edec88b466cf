"""The parts of the ``cn_clip`` package this project uses, without ``cn_clip.clip``'s ``__init__``.

That ``__init__`` imports ``cn_clip.clip.utils``, which imports torchvision, which imports
``torch._dynamo``: 2-4 s at the start of every process that tokenizes a post or builds a
model (a Ray Data worker, a Serve replica started by a scale-up, a batch-prediction actor),
for image transforms and downloads this project never uses. Its vocabulary, architecture
JSONs, tokenizer and model code are read from the package's files instead. The module
itself imports neither torch nor cn_clip.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import threading
import types
from pathlib import Path
from typing import Any

PACKAGE = "cn_clip.clip"
_loading = threading.Lock()


@functools.lru_cache(maxsize=1)
def clip_dir() -> Path:
    """The installed ``cn_clip/clip`` directory (vocab.txt, model_configs/, the modules)."""
    spec = importlib.util.find_spec("cn_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the cn_clip package (Chinese-CLIP's vocabulary, configs and model code) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "clip"


def _module_from_file(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=1)
def tokenizer() -> Any:
    """cn_clip's ``FullTokenizer`` over its own vocab.txt, loaded once per process (no torch)."""
    module = _module_from_file("_sgmft_cn_clip_bert_tokenizer", clip_dir() / "bert_tokenizer.py")
    return module.FullTokenizer(vocab_file=str(clip_dir() / "vocab.txt"))


@functools.lru_cache(maxsize=1)
def model_module() -> types.ModuleType:
    """``cn_clip.clip.model`` (its ``CLIP`` class), loaded without the package's ``__init__``.

    The model module asks its package for one name, ``_tokenizer``. While it loads, a
    stand-in package that holds just that name takes the package's place in
    ``sys.modules``; afterwards the stand-in and the modules loaded under it are taken out
    again, so a later ``import cn_clip.clip`` (by a user's own code) gets the real package.
    """
    with _loading:
        if PACKAGE in sys.modules:  # the real package is already here: nothing to save
            return importlib.import_module(f"{PACKAGE}.model")
        import cn_clip  # noqa: F401  (an empty __init__: the parent the stand-in needs)

        stand_in = types.ModuleType(PACKAGE)
        stand_in.__path__ = [str(clip_dir())]
        stand_in._tokenizer = tokenizer()
        before = set(sys.modules)
        sys.modules[PACKAGE] = stand_in
        try:
            return importlib.import_module(f"{PACKAGE}.model")
        finally:
            for name in set(sys.modules) - before:
                if name == PACKAGE or name.startswith(f"{PACKAGE}."):
                    del sys.modules[name]
