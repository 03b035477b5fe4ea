"""Config files shipped with the package: an option may name one (``chest``) or give a path.

The top-level ``configs/`` folder is installed as the package ``fvlm.configs``, so a default such
as ``eval-ctrate``'s preprocessing config resolves wherever the command runs, not only from the
repository root.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["packaged_configs", "resolve_config"]


def _folder(group: str):  # noqa: ANN202 - an importlib.resources Traversable
    root = resources.files("fvlm.configs")
    return root.joinpath(group) if group else root


def packaged_configs(group: str = "") -> list[str]:
    """Names (without ``.yaml``) of the packaged configs in ``group`` (e.g. ``"preprocess"``)."""
    files = [p.name for p in _folder(group).iterdir() if p.is_file()]
    return sorted(name.removesuffix(".yaml") for name in files if name.endswith(".yaml"))


def resolve_config(name_or_path: str | Path, group: str = "") -> Path:
    """``name_or_path`` if it is a file, else the packaged ``<group>/<name>.yaml``.

    The name may be given bare (``chest``), with ``.yaml``, or as the repository-relative path
    (``configs/preprocess/chest.yaml``), so the repository's paths also work from any folder.

    Raises:
        FileNotFoundError: Neither a file nor a packaged config; the message lists the names.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.parent in (Path("."), Path("configs", group)):
        packaged = _folder(group).joinpath(path.name.removesuffix(".yaml") + ".yaml")
        if packaged.is_file():
            return Path(str(packaged))
    where = f"packaged {group} configs" if group else "packaged configs"
    raise FileNotFoundError(
        f"config {str(name_or_path)!r}: no such file, and not one of the {where} "
        f"({', '.join(packaged_configs(group))})"
    )
