"""The parts of the ``cn_clip`` package this project uses, without ``cn_clip.clip``'s ``__init__``.

That ``__init__`` imports ``cn_clip.clip.utils``, which imports torchvision, which imports
``torch._dynamo``: 2-4 s at the start of every process that tokenizes a post or builds a
model (a Ray Data worker, a Serve replica started by a scale-up, a batch-prediction actor),
for image transforms and downloads this project never uses. Here the package is registered
with that ``__init__`` deferred, its tokenizer and model modules are imported under it, and
its vocabulary and architecture JSONs are read from its directory. This module imports
neither torch nor cn_clip when it is imported.
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
_loading = threading.RLock()


@functools.lru_cache(maxsize=1)
def clip_dir() -> Path:
    """The installed ``cn_clip/clip`` directory (vocab.txt, model_configs/, the modules)."""
    spec = importlib.util.find_spec("cn_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the cn_clip package (Chinese-CLIP's vocabulary, configs and model code) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "clip"


def _package() -> types.ModuleType:
    """``cn_clip.clip``: the real package if it is imported, else registered with its ``__init__`` deferred."""
    with _loading:
        return sys.modules.get(PACKAGE) or _register_package_without_init()


@functools.lru_cache(maxsize=1)
def tokenizer() -> Any:
    """cn_clip's ``FullTokenizer`` over its own vocab.txt, loaded once per process (no torch)."""
    _package()
    module = importlib.import_module(f"{PACKAGE}.bert_tokenizer")
    return module.FullTokenizer(vocab_file=str(clip_dir() / "vocab.txt"))


def model_module() -> types.ModuleType:
    """``cn_clip.clip.model`` (its ``CLIP`` class), imported without running the package's ``__init__``.

    The model module asks its package for one name, ``_tokenizer``; a deferred package gets it here.
    """
    package = _package()
    with _loading:
        if "_tokenizer" not in vars(package):  # vars: a lookup of a missing name would run the __init__
            package._tokenizer = tokenizer()
        return importlib.import_module(f"{PACKAGE}.model")


def _register_package_without_init() -> types.ModuleType:
    """Register ``cn_clip.clip`` as imported, its ``__init__`` deferred until a name it defines is asked for.

    Its submodules (the tokenizer, the model) import as usual under it. It stays the one
    package module object, so ``cn_clip.clip.model.CLIP`` is the class a model was built
    from and a model pickles by reference (``torch.save(model)``). The first lookup of a
    name the package lacks (``cn_clip.clip.load_from_name``, say, in a user's own code) runs
    the real ``__init__`` in it, torchvision and all, and returns the name.
    """
    import cn_clip

    spec = importlib.util.find_spec(PACKAGE)
    package = importlib.util.module_from_spec(spec)

    def complete(name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):  # probes such as __wrapped__ or __all__
            raise AttributeError(f"module {PACKAGE!r} has no attribute {name!r}")
        with _loading:
            if "__getattr__" in vars(package):
                del package.__getattr__
                spec.loader.exec_module(package)
        return getattr(package, name)

    package.__getattr__ = complete
    sys.modules[PACKAGE] = package
    cn_clip.clip = package
    return package
