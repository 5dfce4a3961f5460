"""`--config_overrides` parsing shared by the training scripts and the converters (tooling zone).

Not `PretrainedConfig.update_from_string`: that one sets attributes on a built config (the config's
own field checks never run), cannot set `none`, refuses fields whose current value is None (e.g.
`teacher_name_or_path`) and turns `mask_ratio=0.5` on an int field into a bare int() error. Here the
values become keyword arguments of the config's constructor, which validates them by name."""

from __future__ import annotations


def parse_overrides(text: str | None) -> dict[str, object]:
    """'a=1,b=0.5,c=true' -> {'a': 1, 'b': 0.5, 'c': True} (the `--config_overrides` syntax)."""
    result: dict[str, object] = {}
    if not text:
        return result
    for item in text.split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise ValueError(f"config override {item!r} is not of the form name=value")
        name, raw = (part.strip() for part in item.split("=", 1))
        lowered = raw.lower()
        if lowered in ("true", "false"):
            value: object = lowered == "true"
        elif lowered in ("none", "null"):
            value = None
        else:
            try:
                value = int(raw)
            except ValueError:
                try:
                    value = float(raw)
                except ValueError:
                    value = raw
        result[name] = value
    return result
