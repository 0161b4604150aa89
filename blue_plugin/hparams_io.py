"""Hyperparameter YAML files: the configurations shipped with the package, finding a file by path
or name, and reading it into a mapping for :meth:`blue_plugin.hparams.BLUEHyperParams.from_hparams`.

Every problem raises :class:`~blue_plugin.errors.BLUEConfigError` naming the file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from .errors import BLUEConfigError

__all__ = ["CONFIG_DIR", "REQUIRED_YAML_KEYS", "find_yaml", "read_yaml_config", "shipped_configs"]

#: Where the YAML files that ship with the package live (``from_hparams("smollm2-135m")``).
CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "BLUE"

# Keys every hyperparameter *file* must set (EasyEdit YAMLs always carry them); a file without
# them is almost certainly not a BLUE / MEMIT-family config.
REQUIRED_YAML_KEYS = ("alg_name", "model_name", "layers")


def shipped_configs() -> list[str]:
    """Names of the YAML configurations that ship with the package."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def find_yaml(name_or_path: str | os.PathLike) -> Path:
    """The file a name or path means: the path (with ``.yaml`` appended if needed), else a shipped
    configuration of that name; an error lists what was tried and the shipped names."""
    given = Path(name_or_path).expanduser()
    tried = [given]
    if given.suffix not in (".yaml", ".yml"):
        tried.append(given.with_name(given.name + ".yaml"))
    if given.name == str(name_or_path) or given.parent == Path("."):
        stem = given.name[: -len(given.suffix)] if given.suffix in (".yaml", ".yml") else given.name
        tried.append(CONFIG_DIR / f"{stem}.yaml")
    for path in tried:
        if path.is_file():
            return path
    raise BLUEConfigError(
        f"hyperparameter file not found: {str(name_or_path)!r} (tried {', '.join(repr(str(p)) for p in tried)}); "
        f"pass a path to a YAML file or one of the shipped names {shipped_configs()}."
    )


def read_yaml_config(name_or_path: str | os.PathLike) -> tuple[Path, Any]:
    """``(path, content)`` of the YAML file a name or path means (:func:`find_yaml`).

    A relative ``mom2_dataset`` path that exists is made absolute (EasyEdit changes directory), and
    a mapping must set :data:`REQUIRED_YAML_KEYS`. Content that is not a mapping is returned as it
    is (``from_dict`` says what is wrong with it).
    """
    path = find_yaml(name_or_path)
    try:
        with open(path, encoding="utf-8") as fh:
            config = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        raise BLUEConfigError(f"{path}: not valid YAML: {exc}") from exc
    if config is None:
        raise BLUEConfigError(f"{path}: the file is empty.")
    corpus = config.get("mom2_dataset") if isinstance(config, dict) else None
    if isinstance(corpus, str) and not Path(corpus).expanduser().is_absolute() and Path(corpus).exists():
        # Pin a relative corpus path to the directory it was read from (EasyEdit changes directory).
        config["mom2_dataset"] = str(Path(corpus).resolve())
    if isinstance(config, dict):
        missing = [k for k in REQUIRED_YAML_KEYS if k not in config]
        if missing:
            raise BLUEConfigError(
                f"{path}: missing required key(s) {', '.join(map(repr, missing))}; a BLUE file sets at least "
                "alg_name: BLUE, model_name and layers (an EasyEdit MEMIT/AlphaEdit YAML converts by setting "
                "alg_name: BLUE and adding base_method and blue)."
            )
    return path, config
