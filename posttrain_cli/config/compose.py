"""Compose a recipe with the shell's overrides (Hydra compose API).

Group selections (`model=tiny`, `deepspeed=zero3`) go to Hydra. Key overrides
(`stages.sft.lr=1e-4`) are applied after composition, so a key the recipe left
at its default can still be overridden; a key no schema knows is an error that
names it. Only hydra and omegaconf are imported here.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from posttrain_cli.config import schema
from posttrain_cli.config.tables import _suggest
from posttrain_cli.config.validate import check_run
from posttrain_cli.errors import UserError
from posttrain_cli.kinds import KINDS
from posttrain_cli.kinds.base import EVAL

PACKAGE_DIR = Path(__file__).resolve().parent.parent
CONF_DIR = (PACKAGE_DIR / "_conf").resolve()
RECIPES_DIR = (PACKAGE_DIR / "_recipes").resolve()
GROUPS = ("model", "deepspeed", "cluster", "logging")


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def find_recipe(value: str) -> Path:
    if value.endswith((".yaml", ".yml")) or "/" in value:
        path = Path(value).expanduser()
        if not path.is_file():
            raise UserError(f"recipe={value}: file not found")
        return path.resolve()
    path = RECIPES_DIR / f"{value}.yaml"
    if not path.is_file():
        close = difflib.get_close_matches(value, recipe_names(), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UserError(
            f"recipe={value}: no such recipe (known: {', '.join(recipe_names())}){hint}"
        )
    return path


def split_overrides(args: list[str]) -> tuple[str | None, list, list]:
    """-> (recipe, group overrides for Hydra, parsed key overrides)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    recipe, rest = None, []
    for arg in args:
        if arg.startswith("recipe="):
            recipe = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    try:
        parsed = OverridesParser.create().parse_overrides(rest)
    except OverrideParseException as e:
        raise UserError(f"cannot parse override: {str(e).splitlines()[0]}") from None
    groups, keys = [], []
    for ov in parsed:
        if ov.key_or_group in GROUPS and not ov.is_delete() and not ov.is_add():
            groups.append(ov.input_line)
        else:
            keys.append(ov)
    return recipe, groups, keys


def _spec_for(cfg, parts: list[str]):
    """The schema table that governs the key at `parts`, or None (free-form)."""
    head = parts[0]
    if len(parts) == 1:
        return schema.TOP
    if head in schema.SECTIONS:
        if len(parts) == 2:
            return schema.SECTIONS[head]
        return None  # model.tiny.*, deepspeed.config.*
    if head == "stages" and len(parts) >= 3:
        stage = cfg.get("stages", {}).get(parts[1])
        kind = stage.get("kind") if stage is not None else None
        record = KINDS.get(kind)
        if record is None:
            return None
        spec = record.schema
        if len(parts) == 3:
            return spec
        if parts[2] == "eval" and len(parts) == 4:
            return EVAL
        if parts[2] == "resources" and len(parts) == 4:
            return schema.RESOURCES
        if parts[2] in ("deepspeed", "rollout", "lora") and len(parts) == 4:
            return schema.SECTIONS[parts[2]]
    return None


def apply_overrides(cfg, overrides) -> None:
    from omegaconf import OmegaConf, open_dict

    for ov in overrides:
        key = ov.key_or_group
        parts = key.split(".")
        if ov.is_delete():
            parent = OmegaConf.select(cfg, ".".join(parts[:-1])) if len(parts) > 1 else cfg
            if parent is None or parts[-1] not in parent:
                raise UserError(f"~{key}: no such key to delete")
            with open_dict(parent):
                del parent[parts[-1]]
            continue
        value = ov.value()
        exists = OmegaConf.select(cfg, key, default="__missing__") != "__missing__"
        if not exists and not ov.is_add() and not ov.is_force_add():
            if parts[0] == "stages" and len(parts) >= 2 and parts[1] not in cfg.get("stages", {}):
                stages = list(cfg.get("stages", {}))
                raise UserError(
                    f"unknown stage '{parts[1]}' in override {ov.input_line!r} "
                    f"(stages: {', '.join(stages)}); add one with '+stages.{parts[1]}={{kind: ...}}'"
                )
            spec = _spec_for(cfg, parts)
            if spec is not None and parts[-1] not in spec:
                raise UserError(f"unknown key '{key}'{_suggest(parts[-1], spec)}")
        with open_dict(cfg):
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)


def compose(args: list[str], default_recipe: str | None = None, *, allow_missing: bool = False) -> tuple[dict, Path]:
    """Compose, scale, override, resolve and validate. -> (run config, recipe file).
    allow_missing: a required key left `???` shows as REQUIRED_MARK instead of stopping (plan)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    recipe, groups, keys = split_overrides(args)
    recipe = recipe or default_recipe
    if recipe is None:
        raise UserError("name a recipe: recipe=<name | path/to/recipe.yaml> (see `posttrain recipes`)")
    path = find_recipe(recipe)
    _check_yaml(path)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(path.parent), version_base=None):
            cfg = hydra_compose(
                path.stem, overrides=[f"hydra.searchpath=[file://{CONF_DIR}]", *groups]
            )
    except Exception as e:  # Hydra raises many types; all are the user's input here
        raise UserError(f"recipe {path.name}: {_first_line(e)}") from None
    finally:
        GlobalHydra.instance().clear()
    try:
        with open_dict(cfg):
            if "name" not in cfg:
                cfg.name = path.stem
            cfg.pop("hydra", None)
            cfg.pop("defaults", None)
            tiny_block = cfg.pop("tiny", None)
        if _scale(cfg, keys) == "tiny":
            from posttrain_cli.config.scale import to_tiny

            plain = OmegaConf.to_container(cfg, resolve=False)
            plain["tiny"] = OmegaConf.to_container(tiny_block, resolve=False) if tiny_block is not None else {}
            cfg = OmegaConf.create(to_tiny(plain, CONF_DIR))
        apply_overrides(cfg, keys)
        _fill_missing(cfg, path, allow_missing)
        plain = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise UserError(f"recipe {path.name}: {_first_line(e)}") from None
    return check_run(plain), path


# What `posttrain plan` shows for a required key the user has not set yet.
REQUIRED_MARK = "??? (required)"


def _scale(cfg, keys) -> str:
    """The run's scale: a `scale=...` override, else the recipe's `scale` key."""
    value = next((ov.value() for ov in keys if ov.key_or_group == "scale"), cfg.get("scale", "full"))
    if value not in schema.SCALES:
        raise UserError(f"scale={value}: choose one of {', '.join(schema.SCALES)}")
    return value


def _fill_missing(cfg, path: Path, allow_missing: bool) -> None:
    """A recipe's `???` (a data slot the user must fill: the paper's data is not public): an error
    naming every such key, or, for `plan`, a visible placeholder."""
    from omegaconf import OmegaConf, open_dict

    missing = sorted(OmegaConf.missing_keys(cfg))
    if not missing:
        return
    if not allow_missing:
        example = missing[0]
        if "[" in example:  # a slot inside a list (data: [{from: rs}, {path: ???}]): set the whole list
            example = example[:example.index("[")]
            value = "'" + _flow(OmegaConf.to_container(OmegaConf.select(cfg, example), resolve=False)) + "'"
        else:
            value = "'[{path: your/data.jsonl}]'" if example.endswith(".data") else "your/data.jsonl"
        raise UserError(
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required: recipe {path.stem} leaves "
            f"{'this' if len(missing) == 1 else 'these'} to you (the paper's data is not public). Set "
            f"{'it' if len(missing) == 1 else 'each'} on the command line, e.g. {example}={value}; the README's "
            f"recipe tour suggests public stand-ins, and scale=tiny runs the recipe on the tiny data."
        )
    for key in missing:
        parent_key, _, leaf = key.rpartition(".")
        placeholder = [{"path": REQUIRED_MARK}] if leaf == "data" else REQUIRED_MARK
        with open_dict(cfg):
            OmegaConf.update(cfg, key, placeholder, merge=False, force_add=True)


def _flow(value) -> str:
    """A value as a one-line YAML flow for a shell override, `???` shown as your/data.jsonl."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    return "your/data.jsonl" if value == "???" else str(value)


def _check_yaml(path: Path) -> None:
    """A recipe is UTF-8 YAML, a mapping, with no key given twice (YAML libraries keep one of the
    two silently or name only the first line)."""
    import yaml

    text = _utf8_text(path)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        _no_duplicate_keys(path, node, "")
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or _first_line(e)
        raise UserError(f"{path}:{where} malformed YAML: {problem}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe must be a YAML mapping (name, stages, ...)")


def _utf8_text(path: Path) -> str:
    """The recipe's text; one saved in another encoding (Windows editors save UTF-16) is refused by name."""
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UserError(f"{path}: saved as UTF-16; save the recipe as UTF-8")
    if b"\x00" in data:
        raise UserError(f"{path}: not UTF-8 text (it holds NUL bytes: UTF-16 without a byte order mark, or "
                        f"not a text file); save the recipe as UTF-8")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UserError(f"{path}: line {line}: not UTF-8 text (byte {data[e.start]:#04x}); save the recipe "
                        f"as UTF-8") from None


def _no_duplicate_keys(path: Path, node, at: str, seen: set | None = None) -> None:
    """Every mapping's keys are distinct: a second `sft:` under `stages` would replace the first."""
    import yaml

    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias: checked where its anchor is
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict = {}
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else None
            if name is not None and key.tag != "tag:yaml.org,2002:merge":
                full = f"{at}.{name}" if at else str(name)
                if name in first:
                    raise UserError(f"{path}: key '{full}' is given twice, on line {first[name] + 1} and line "
                                    f"{key.start_mark.line + 1}; keep one (or rename a stage)")
                first[name] = key.start_mark.line
                _no_duplicate_keys(path, value, full, seen)
            else:
                _no_duplicate_keys(path, value, at, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _no_duplicate_keys(path, item, f"{at}[{i}]", seen)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    # OmegaConf appends "full_key: ..., object_type=..." lines; keep the gist.
    return lines[0]
