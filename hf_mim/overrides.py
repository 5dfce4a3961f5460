"""`--config_overrides` parsing shared by the training scripts and the converters (tooling zone)."""

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
