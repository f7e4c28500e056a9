"""Parsing `catalog_content` and the fixed unit table.

Real rows look like:

    Item Name: Annies Homegrown Macaroni and Cheese - 6 oz - case of 12
    Bullet Point 1: ...
    Product Description: ... (may span lines, may hold HTML)
    Value: 72.0
    Unit: Fl Oz

Any line may be missing, `Value: nan` / `Unit: None` occur, and units are spelled many ways.
Parsing never raises: what could not be read is left empty and counted by the caller.
"""
from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass

# Canonical unit -> (kind, factor to the kind's base unit: millilitres for volume, grams for mass).
# Fixed in code so train and test always map identically.
UNITS: dict[str, tuple[str, float]] = {
    "fl_oz": ("volume", 29.5735),
    "ml": ("volume", 1.0),
    "cl": ("volume", 10.0),
    "liter": ("volume", 1000.0),
    "gallon": ("volume", 3785.41),
    "quart": ("volume", 946.353),
    "pint": ("volume", 473.176),
    "cup": ("volume", 236.588),
    "cubic_foot": ("volume", 28316.8),
    "ounce": ("mass", 28.3495),
    "pound": ("mass", 453.592),
    "gram": ("mass", 1.0),
    "kilogram": ("mass", 1000.0),
    "milligram": ("mass", 0.001),
    "count": ("count", 1.0),
    "foot": ("length", 30.48),
    "inch": ("length", 2.54),
    "yard": ("length", 91.44),
    "meter": ("length", 100.0),
    "centimeter": ("length", 1.0),
    "millimeter": ("length", 0.1),
    "square_foot": ("area", 1.0),
}

# Spellings seen in catalog text (lower-cased, dots and extra spaces removed) -> canonical unit.
UNIT_ALIASES: dict[str, str] = {}
for _canonical, _spellings in {
    "fl_oz": ["fl oz", "floz", "fl ounce", "fl ounces", "fluid ounce", "fluid ounces", "fluid oz", "fz", "fl oz s", "fl"],
    "ml": ["ml", "milliliter", "milliliters", "millilitre", "millilitres", "mls"],
    "cl": ["cl", "centiliter", "centiliters"],
    "liter": ["l", "liter", "liters", "litre", "litres", "ltr", "lt"],
    "gallon": ["gallon", "gallons", "gal"],
    "quart": ["quart", "quarts", "qt"],
    "pint": ["pint", "pints", "pt"],
    "cup": ["cup", "cups"],
    "cubic_foot": ["cubic foot", "cubic feet", "cu ft"],
    "ounce": ["ounce", "ounces", "oz", "onzas", "0z", "ozs"],
    "pound": ["pound", "pounds", "lb", "lbs", "ib"],
    "gram": ["gram", "grams", "g", "gm", "gms", "gr", "grs", "gramm"],
    "kilogram": ["kilogram", "kilograms", "kg", "kgs", "kilo", "kilos"],
    "milligram": ["milligram", "milligrams", "mg"],
    "count": ["count", "counts", "ct", "cnt", "each", "ea", "piece", "pieces", "pc", "pcs", "unit", "units",
              "pack", "packs", "pk", "per package", "per box", "bag", "bags", "box", "boxes", "can", "cans",
              "bottle", "bottles", "jar", "jars", "pouch", "pouches", "packet", "packets", "tea bags", "k-cups",
              "capsule", "capsules", "tablet", "tablets", "sheet", "sheets", "roll", "rolls", "pair", "pairs",
              "dozen"],
    "foot": ["foot", "feet", "ft"],
    "inch": ["inch", "inches", "in"],
    "yard": ["yard", "yards", "yd"],
    "meter": ["meter", "meters", "metre", "metres", "m"],
    "centimeter": ["centimeter", "centimeters", "cm"],
    "millimeter": ["millimeter", "millimeters", "mm"],
    "square_foot": ["square foot", "square feet", "sq ft", "sqft"],
}.items():
    for _s in _spellings:
        UNIT_ALIASES[_s] = _canonical

_MISSING = {"", "none", "nan", "null", "n/a", "na", "-"}


def normalise_unit(raw: str | None) -> tuple[str, str]:
    """(canonical unit, kind). Missing -> ("none", "none"); unrecognised -> (cleaned text, "unknown")."""
    if raw is None:
        return "none", "none"
    key = re.sub(r"[.\s_]+", " ", str(raw).strip().lower()).strip()
    key = key.replace("(", "").replace(")", "")
    if key in _MISSING:
        return "none", "none"
    canonical = UNIT_ALIASES.get(key) or UNIT_ALIASES.get(key.rstrip("s"))
    if canonical is None:
        return key, "unknown"
    return canonical, UNITS[canonical][0]


def structural_features(value: float | None, unit: str) -> tuple[float, float, float]:
    """(quantity_value, unit_volume in ml, unit_weight in g). Missing value -> 0; wrong kind -> 0."""
    if value is None or not math.isfinite(value):
        return 0.0, 0.0, 0.0
    kind, factor = UNITS.get(unit, ("unknown", 0.0))
    quantity = float(value)
    volume = quantity * factor if kind == "volume" else 0.0
    weight = quantity * factor if kind == "mass" else 0.0
    return quantity, volume, weight


@dataclass
class ParsedCatalog:
    item_name: str
    bullets: list[str]
    description: str
    value: float | None
    unit_raw: str | None


_KEY_RE = re.compile(r"^\s*(Item Name|Bullet Point(?:\s*\d+)?|Product Description|Value|Unit)\s*:\s?(.*)$", re.IGNORECASE)
_TAG_RE = re.compile(r"<[^>]+>")
_SPACE_RE = re.compile(r"[ \t\r\f\v]+")


def clean_text(text: str) -> str:
    """Strip HTML tags and entities, collapse runs of spaces; keep line breaks."""
    text = html.unescape(_TAG_RE.sub(" ", text))
    lines = [_SPACE_RE.sub(" ", line).strip() for line in text.split("\n")]
    return "\n".join(line for line in lines if line)


def parse_value(text: str | None) -> float | None:
    if text is None:
        return None
    text = text.strip().replace(",", "")
    if text.lower() in _MISSING:
        return None
    match = re.match(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?", text)
    if not match:
        return None
    value = float(match.group(0))
    return value if math.isfinite(value) else None


def parse_catalog(content: str) -> ParsedCatalog:
    """Split catalog text into fields. Lines without a known key continue the previous field."""
    fields: dict[str, list[str]] = {"item": [], "bullets": [], "description": [], "value": [], "unit": []}
    current = "description"
    for line in str(content or "").replace("\r\n", "\n").split("\n"):
        match = _KEY_RE.match(line)
        if match:
            key = match.group(1).lower()
            current = ("item" if key.startswith("item") else "bullets" if key.startswith("bullet")
                       else "description" if key.startswith("product") else key)
            if current == "bullets":
                fields["bullets"].append(match.group(2))
            else:
                fields[current].append(match.group(2))
        elif line.strip():
            if current == "bullets" and fields["bullets"]:
                fields["bullets"][-1] += "\n" + line
            elif current in ("value", "unit"):
                fields["description"].append(line)  # stray text after Value/Unit
            else:
                fields[current].append(line)
    return ParsedCatalog(
        item_name=clean_text(" ".join(fields["item"])).replace("\n", " "),
        bullets=[b for b in (clean_text(b) for b in fields["bullets"]) if b],
        description=clean_text("\n".join(fields["description"])),
        value=parse_value(fields["value"][0]) if fields["value"] else None,
        unit_raw=fields["unit"][0].strip() if fields["unit"] else None,
    )


def model_text(parsed: ParsedCatalog, unit: str) -> str:
    """The text encoders read: name, bullets, description, then the quantity line."""
    parts = [parsed.item_name, *parsed.bullets]
    if parsed.description:
        parts.append(parsed.description)
    value = "unknown" if parsed.value is None else f"{parsed.value:g}"
    parts.append(f"Quantity: {value} {unit.replace('_', ' ')}")
    return "\n".join(p for p in parts if p)
