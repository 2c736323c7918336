"""Type check of a composed run config, so that ``task.steps=abc`` fails at once with
``task.steps must be an integer, got 'abc' (str)`` instead of a ``TypeError`` deep inside a run.

The expected type of every field is read off the config files themselves (``conf/``): a field's type is the
union of the types of its values in every file that sets it (every option of its group, the root config, the
``experiment=`` and ``sweep=`` presets). So a new key in a YAML file is typed without touching this module, the
toy and text-to-2D tasks and the per-method guidance configs keep their own fields, and composition (groups,
presets overriding groups, sweeps) is left to Hydra unchanged. Hydra's structured configs (dataclass schemas)
would reject a bad value at compose time, but they would have to repeat every option's keys in Python, make
every YAML file name its schema, and could not add a single key without changing the resolved config that a
run directory's ``config.yaml`` is compared against on resume.

Rules: an integer is accepted where a number (float) is expected; null only where some file has null, or where
:data:`DECLARED_TYPES` says so; list items are checked against the item types of the files' lists. Not
checked: interpolations (``${task.steps}``: the field they point to is checked itself), and keys no file sets
(``+task.new_key=...``). Fields that every file leaves null carry no type; :data:`DECLARED_TYPES` names theirs
(tests/test_faults.py fails when a new all-null field is not declared).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from msd.paths import REPO_ROOT

CONF_DIR = REPO_ROOT / "conf"
SKIPPED_GROUPS = ("hydra",)
"""Config groups that are Hydra's own settings (``hydra/launcher``), not the run's."""

KIND_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
              "list": "a list", "dict": "a mapping"}


@dataclass
class FieldType:
    """The values a field may take: ``kinds`` (``int``, ``float``, ``bool``, ``str``, ``list``, ``dict``),
    ``nullable``, and ``items``, the kinds of a list's items (empty: any)."""
    kinds: set[str] = field(default_factory=set)
    nullable: bool = False
    items: set[str] = field(default_factory=set)
    references: set[str] = field(default_factory=set)
    """Fields an interpolation ``${a.b}`` of this field points to (their kinds are added to this one's)."""

    def describe(self, kinds: set[str] | None = None, nullable: bool | None = None) -> str:
        kinds = self.kinds if kinds is None else kinds
        nullable = self.nullable if nullable is None else nullable
        words = [KIND_WORDS[kind] for kind in KIND_WORDS if kind in kinds and not (kind == "int" and "float" in kinds)]
        if nullable:
            words.append("null")
        return " or ".join(words)


DECLARED_TYPES = {
    "guidance_interval": FieldType({"list"}, nullable=True, items={"float"}),
    "guidance.kernel_interval": FieldType({"list"}, nullable=True, items={"float"}),
    "guidance.inversion_scale": FieldType({"float"}, nullable=True),
    "guidance.lora_alpha": FieldType({"float"}, nullable=True),
    "prior.path": FieldType({"str"}, nullable=True),
    "prior.dtype": FieldType({"str"}, nullable=True),
    "task.eval.inception_path": FieldType({"str"}, nullable=True),
    "task.eval.clip_path": FieldType({"str"}, nullable=True),
    "logger.entity": FieldType({"str"}, nullable=True),
    "logger.mode": FieldType({"str"}),
    "logger.sweep": FieldType({"str"}, nullable=True),
    "logger.experiment": FieldType({"str"}, nullable=True),
    "logger.group": FieldType({"str"}),
    "logger.job_type": FieldType({"str"}),
    "logger.tags": FieldType({"list"}, items={"str"}),
}
"""Types of the fields whose every default is null or an interpolation of a resolver (``${oc.env:...}``): the
files say nothing of their type."""

_REFERENCE = re.compile(r"^\$\{([A-Za-z_][\w.]*)\}$")


def _kind(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, (list, ListConfig)):
        return "list"
    if isinstance(value, (dict, DictConfig)):
        return "dict"
    return type(value).__name__


def _is_interpolation(value) -> bool:
    return isinstance(value, str) and "${" in value


def _package(path: Path, conf_dir: Path) -> str:
    """The dotted prefix a file's keys land under: its ``# @package`` header (``_global_`` -> "", ``_group_`` ->
    its group), else its group (``conf/task/toy2d.yaml`` -> "task", ``conf/config.yaml`` -> "")."""
    group = ".".join(path.parent.relative_to(conf_dir).parts)
    for line in path.read_text().splitlines():
        match = re.match(r"#\s*@package\s+(\S+)", line.strip())
        if match:
            parts = [group if part == "_group_" else part for part in match.group(1).split(".")]
            return ".".join(part for part in parts if part not in ("_global_", ""))
    return group


def _record(types: dict[str, FieldType], dotted: str, value) -> None:
    entry = types.setdefault(dotted, FieldType())
    if value is None:
        entry.nullable = True
    elif _is_interpolation(value):
        match = _REFERENCE.match(value)
        if match:
            entry.references.add(match.group(1))
    elif isinstance(value, dict):
        entry.kinds.add("dict")
        for key, child in value.items():
            _record(types, f"{dotted}.{key}", child)
    elif isinstance(value, list):
        entry.kinds.add("list")
        entry.items.update(_kind(item) for item in value if item is not None and not _is_interpolation(item))
    else:
        entry.kinds.add(_kind(value))


@lru_cache(maxsize=4)
def field_types(conf_dir: Path = CONF_DIR) -> dict[str, FieldType]:
    """Dotted field path -> its :class:`FieldType`, from every YAML file under ``conf_dir``."""
    types: dict[str, FieldType] = {}
    for path in sorted(Path(conf_dir).rglob("*.yaml")):
        if path.relative_to(conf_dir).parts[0] in SKIPPED_GROUPS:
            continue
        package = _package(path, Path(conf_dir))
        content = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        if not isinstance(content, dict):
            continue
        for key, value in content.items():
            if key == "defaults" or (key == "hydra" and package == ""):
                continue
            _record(types, f"{package}.{key}" if package else str(key), value)
    for dotted, declared in DECLARED_TYPES.items():
        entry = types.setdefault(dotted, FieldType())
        entry.kinds |= declared.kinds
        entry.items |= declared.items
        entry.nullable |= declared.nullable
    changed = True
    while changed:  # ${a.b}: the types of a.b (and of what a.b points to)
        changed = False
        for entry in types.values():
            for target in entry.references & types.keys():
                before = (len(entry.kinds), len(entry.items))
                entry.kinds |= types[target].kinds
                entry.items |= types[target].items
                changed |= before != (len(entry.kinds), len(entry.items))
    return types


def _accepts(kinds: set[str], value) -> bool:
    kind = _kind(value)
    return kind in kinds or (kind == "int" and "float" in kinds)


def _shown(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=False)
    return f"{value!r} ({_kind(value)})"


def _check(node: DictConfig, prefix: str, types: dict[str, FieldType], errors: list[str]) -> None:
    for key in list(node.keys()):
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if (not prefix and key == "hydra") or OmegaConf.is_missing(node, key) or OmegaConf.is_interpolation(node, key):
            continue
        value = node[key]
        expected = types.get(dotted)
        if expected is None or not (expected.kinds or expected.nullable):
            if isinstance(value, DictConfig):  # a group's node (``task``): its fields are typed
                _check(value, dotted, types, errors)
            continue  # a key no file sets: nothing to compare with
        if value is None:
            if not expected.nullable:
                errors.append(f"{dotted} must be {expected.describe()}, got null")
        elif expected.kinds and not _accepts(expected.kinds, value):
            errors.append(f"{dotted} must be {expected.describe()}, got {_shown(value)}")
        elif isinstance(value, ListConfig) and expected.items:
            for index in range(len(value)):
                if OmegaConf.is_interpolation(value, index):
                    continue
                item = value[index]
                if not _accepts(expected.items, item):
                    errors.append(f"{dotted}[{index}] must be {expected.describe(expected.items, False)}, "
                                  f"got {_shown(item)}")
        elif isinstance(value, DictConfig):
            _check(value, dotted, types, errors)


def config_type_errors(cfg: DictConfig, conf_dir: Path = CONF_DIR) -> list[str]:
    """One line per field of ``cfg`` whose value has a type no config file gives it."""
    errors: list[str] = []
    _check(cfg, "", field_types(Path(conf_dir)), errors)
    return errors


def check_config_types(cfg: DictConfig) -> None:
    """Raise ``ValueError`` naming every field of ``cfg`` of the wrong type and the type it must have."""
    errors = config_type_errors(cfg)
    if errors:
        raise ValueError("; ".join(errors) if len(errors) == 1 else
                         f"{len(errors)} config values of the wrong type: " + "; ".join(errors))
