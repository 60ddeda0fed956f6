"""Loss configs of the string registry that typed strategies replaced: `loss: talr` with
`loss_options: {...}`, and regularisers' `base: talr` with `base_options: {...}`.

`talr fit|validate|test` looks at the raw `model` section (its config files, then the command line,
later ones winning) before parsing, and stops an old form with one error that shows the new one.
An unknown name gets the list of strategies instead of the parser's "expected a dot import path".
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Sequence

import yaml

from talr import losses
from talr.losses import LossStrategy


def strategy_classes() -> list[type[LossStrategy]]:
    """The concrete strategies of talr.losses, in the order they are defined."""
    return [c for c in vars(losses).values()
            if isinstance(c, type) and issubclass(c, LossStrategy) and not inspect.isabstract(c) and c.__module__ == losses.__name__]


def _class_path(name: str) -> str:
    for cls in strategy_classes():
        if name in (cls.name, cls.__name__):
            return f"{cls.__module__}.{cls.__name__}"
    return name  # a class path, or unknown: the parser decides


def _is_old_name(name: Any) -> bool:
    return isinstance(name, str) and name in {cls.name for cls in strategy_classes()}


def new_form(loss: Any, options: dict[str, Any] | None = None, key: str = "model.loss",
             options_key: str = "model.loss_options") -> tuple[dict[str, Any], list[str]]:
    """`loss` (a registry name, a class name or path, or a {class_path, init_args} mapping) with the
    old `options` folded into init_args, as {class_path, init_args}; and the old-form keys found in it."""
    found = [f"{key}: {loss!r}"] if _is_old_name(loss) else []
    if isinstance(loss, dict):
        class_path, init_args = str(loss.get("class_path", "TALR")), dict(loss.get("init_args") or {})
        init_args.update({k: v for k, v in loss.items() if k not in ("class_path", "init_args")})
        found += [f"{key}.class_path: {class_path!r}"] if _is_old_name(class_path) else []
    else:
        class_path, init_args = "TALR" if loss is None else str(loss), {}
    if options is not None:
        found.append(options_key)
        init_args.update(options)
    base, base_options = init_args.pop("base", None), init_args.pop("base_options", None)
    if base is not None or base_options is not None:
        init_args["base"], base_found = new_form("CrossEntropy" if base is None else base, base_options,
                                                 f"{key}.base", f"{key}.base_options")
        found += base_found
    form: dict[str, Any] = {"class_path": _class_path(class_path)}
    if init_args:
        form["init_args"] = init_args
    return form, found


def _command_line(form: dict[str, Any], key: str = "--model.loss") -> list[str]:
    """The short command-line form: `--model.loss TALR --model.loss.w_min 0.01`."""
    words = [key, form["class_path"].rsplit(".", 1)[-1]]
    for name, value in (form.get("init_args") or {}).items():
        if isinstance(value, dict) and "class_path" in value:
            words += _command_line(value, f"{key}.{name}")
        else:
            words += [f"{key}.{name}", _flow(value)]
    return words


def _flow(value: Any) -> str:
    """One-line YAML."""
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1 << 20).strip().removesuffix("...").strip()


def loss_config_error(model: dict[str, Any]) -> str | None:
    """The error for an old-form or unknown loss in a raw `model` section, or None when it is fine."""
    options = model.get("loss_options") if "loss_options" in model else None
    if "loss_options" in model and not isinstance(options, dict):  # `loss_options: null` is old too
        options = {}
    form, found = new_form(model.get("loss"), options)
    if found:
        name = form["class_path"].rsplit(".", 1)[-1]
        return (f"{', '.join(found)} {'is' if len(found) == 1 else 'are'} the old form; write\n"
                f"  loss: {_flow(form)}\n"
                f"in the config's model section, or on the command line\n"
                f"  {' '.join(_command_line(form))}\n"
                f"(`talr fit --model.loss.help {name}` lists its options)")
    unknown = [path for path in _strategy_names(form) if "." not in path]
    if unknown:
        names = ", ".join(cls.__name__ for cls in strategy_classes())
        return f"model.loss: unknown loss {unknown[0]!r}; choose one of: {names} (talr.losses), or give a class path"
    return None


def _strategy_names(form: dict[str, Any]) -> list[str]:
    base = (form.get("init_args") or {}).get("base")
    return [form["class_path"], *(_strategy_names(base) if isinstance(base, dict) and "class_path" in base else [])]


def raw_model_section(args: Sequence[str]) -> dict[str, Any]:
    """`model` as the config files and the command line write it, later ones winning; of the
    command line only the loss keys are read, and nothing is typed or checked."""
    model: dict[str, Any] = {}
    i = 0
    while i < len(args):
        key, value = args[i].split("=", 1) if args[i].startswith("--") and "=" in args[i] else (args[i], None)
        wanted = key in ("--config", "-c", "--model") or key.startswith(("--model.loss.", "--model.loss_options")) or key == "--model.loss"
        if wanted and value is None and i + 1 < len(args):
            value, i = args[i + 1], i + 1
        i += 1
        if not wanted or value is None or key.endswith(".help"):
            continue
        if key in ("--config", "-c"):
            content = _load(value)
            section = content.get("model") if isinstance(content, dict) else None
            section = _load(section) if isinstance(section, str) else section  # `model: model.yaml`
            model.update(section if isinstance(section, dict) else {})
        elif key == "--model":
            section = _load(value)
            model.update(section if isinstance(section, dict) else {})
        else:
            name, *rest = key.removeprefix("--model.").split(".")
            value = yaml.safe_load(value)
            model[name] = _set_plain(model.get(name), rest, value) if name == "loss_options" else _set_option(model.get(name), rest, value)
    return model


def _load(value: str) -> Any:
    """A config file's content, or the inline YAML the value is."""
    path = Path(value)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else yaml.safe_load(value)
    except yaml.YAMLError:
        return None


def _set_plain(tree: Any, keys: list[str], value: Any) -> Any:
    """`tree` with the value at the nested keys (a plain mapping such as loss_options)."""
    if not keys:
        return value
    tree = dict(tree) if isinstance(tree, dict) else {}
    tree[keys[0]] = _set_plain(tree.get(keys[0]), keys[1:], value)
    return tree


def _set_option(loss: Any, keys: list[str], value: Any) -> Any:
    """`loss` (a strategy in config form) with an option set, as `--model.loss.base.w_min 0.1` does."""
    if keys[:1] == ["init_args"]:
        keys = keys[1:]
    if not keys:
        return value
    loss = {"class_path": loss} if isinstance(loss, str) else dict(loss) if isinstance(loss, dict) else {}
    if keys == ["class_path"]:
        loss["class_path"] = value
        return loss
    init_args = dict(loss.get("init_args") or {})
    setter = _set_plain if keys[0].endswith("_options") else _set_option
    init_args[keys[0]] = setter(init_args.get(keys[0]), keys[1:], value)
    loss["init_args"] = init_args
    return loss
