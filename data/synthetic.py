"""A demo catalog in exactly the competition format, with price rules planted in text and image.

    python -m data.synthetic out_dir=DIR n_train=N n_test=M seed=S
    python -m data.synthetic profile=tiny

Writes DIR/train.csv, DIR/test.csv, DIR/test_labels.csv (the hidden test prices) and DIR/images/
(small PNGs referenced by `image_link` as paths relative to DIR). Same seed, same bytes.

price = per-unit price of the product type x Value (pack size x item size, from the Value/Unit
lines) x brand tier (text) x colour x shape x packaging quality (image) x log-normal noise.
The image's background tint also shows the product type, as a photo would. Text alone leaves
the image factors unexplained and the image alone knows nothing of quantity or brand, so a
model that fuses both should beat either.
"""
from __future__ import annotations

import colorsys
import csv
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from core.config import parse_args
from core.errors import run_cli
from core.io import atomic_write_bytes, atomic_write_text
from core.runtime import progress
from data.config import SYNTHETIC_PROFILES, SyntheticConfig

# name, unit family, dollars per unit of the family, item sizes, how common (weights the draw so the
# unit mix resembles the real train set: mostly Ounce, then Count, then Fl Oz, a little Pound)
PRODUCT_TYPES = [
    ("Whole Bean Coffee", "ounce", 0.45, [8, 12, 16, 32], 3),
    ("Extra Virgin Olive Oil", "fl_oz", 0.40, [8.5, 16.9, 25.4, 33.8], 2),
    ("Moisturizing Shampoo", "fl_oz", 0.35, [8, 12, 16, 33.8], 2),
    ("Dry Dog Food", "pound", 1.30, [3, 6, 15], 0.3),
    ("AA Alkaline Batteries", "count", 0.55, [4, 8, 12, 24], 1),
    ("Vitamin D3 Softgels", "count", 0.07, [60, 120, 240], 1),
    ("Green Tea Bags", "count", 0.10, [20, 40, 100], 1.5),
    ("Marinara Pasta Sauce", "ounce", 0.18, [16, 24, 32], 3),
    ("Foaming Hand Soap", "fl_oz", 0.25, [7.5, 12, 32], 1.5),
    ("Whey Protein Powder", "ounce", 0.80, [16, 32, 80], 1),
    ("Soy Wax Scented Candle", "count", 8.00, [1, 2, 3], 1),
    ("Smoked Paprika Spice", "ounce", 1.20, [1.5, 2.5, 4], 3),
    ("Chocolate Chip Cookies", "ounce", 0.35, [7, 13, 18], 3),
    ("Gourmet Snack Gift Basket", "count", 30.0, [1, 2], 0.4),
    ("Stainless Steel Cookware Set", "count", 80.0, [1], 0.15),
]
PRICE_SCALE = 1.4  # puts the median near the real train set's $14
_TYPE_P = np.array([t[4] for t in PRODUCT_TYPES]) / sum(t[4] for t in PRODUCT_TYPES)
UNIT_SPELLINGS = {  # how real rows write each unit, most common first
    "ounce": (["Ounce", "ounce", "oz", "Oz", "OZ", "Ounces"], [0.78, 0.08, 0.06, 0.03, 0.03, 0.02]),
    "fl_oz": (["Fl Oz", "fl oz", "FL Oz", "Fl. Oz", "Fluid Ounce", "FZ"], [0.82, 0.06, 0.04, 0.03, 0.03, 0.02]),
    "count": (["Count", "count", "ct", "COUNT", "Each"], [0.85, 0.06, 0.04, 0.03, 0.02]),
    "pound": (["Pound", "pound", "lb"], [0.5, 0.3, 0.2]),
}
BRAND_TIERS = [  # (multiplier, brands, words the names carry)
    (0.6, ["ValuMart", "EveryDay Basics", "PennyWise"], ["Value Pack", "Economy"]),
    (1.0, ["HomeStyle", "NatureField", "DailyChoice"], ["Classic", "Original"]),
    (1.7, ["Golden Grove", "Pure Origin", "Artisan Reserve"], ["Premium", "Organic"]),
    (3.0, ["Maison Royale", "Imperial Select"], ["Luxury", "Limited Edition"]),
]
PACKS = ([1, 2, 3, 4, 6, 12], [0.6, 0.14, 0.1, 0.08, 0.05, 0.03])
COLOURS = [((200, 40, 40), 1.0), ((40, 80, 200), 1.15), ((40, 150, 60), 0.9), ((30, 30, 30), 1.4), ((235, 235, 235), 0.8)]
SHAPES = [("circle", 1.0), ("square", 1.2), ("triangle", 0.85)]
QUALITY = [(False, 1.0), (True, 1.6)]  # a gold frame marks premium packaging
FILLER = ["Great for everyday use.", "Makes a thoughtful gift.", "Satisfaction guaranteed.",
          "Store in a cool, dry place.", "Family owned since 1982.", "Packed fresh in the USA."]


def background_tint(type_index: int) -> tuple[int, int, int]:
    """A pastel per product type: a photo shows what the product is, so the image carries the type too."""
    hue = (type_index * 0.618034) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.35, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_image(size: int, colour, shape: str, framed: bool, tint, rng: np.random.Generator) -> bytes:
    bg = tuple(int(np.clip(c + rng.integers(-8, 9), 0, 255)) for c in tint)
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    m = size * (0.18 + 0.08 * rng.random())
    cx, cy = size / 2 + rng.uniform(-2, 2), size / 2 + rng.uniform(-2, 2)
    box = [cx - size / 2 + m, cy - size / 2 + m, cx + size / 2 - m, cy + size / 2 - m]
    if shape == "circle":
        d.ellipse(box, fill=colour)
    elif shape == "square":
        d.rectangle(box, fill=colour)
    else:
        d.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) / 2, box[1])], fill=colour)
    if framed:
        w = max(2, size // 12)
        d.rectangle([0, 0, size - 1, size - 1], outline=(212, 175, 55), width=w)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def make_row(rng: np.random.Generator) -> tuple[str, float, dict]:
    """(catalog_content, price, image spec) for one synthetic product."""
    type_index = int(rng.choice(len(PRODUCT_TYPES), p=_TYPE_P))
    name, family, unit_price, sizes, _ = PRODUCT_TYPES[type_index]
    tier_mult, brands, tier_words = BRAND_TIERS[rng.choice(len(BRAND_TIERS), p=[0.3, 0.4, 0.22, 0.08])]
    brand = brands[rng.integers(len(brands))]
    size = float(sizes[rng.integers(len(sizes))])
    pack = int(rng.choice(PACKS[0], p=PACKS[1])) if unit_price < 20 else 1
    colour, colour_mult = COLOURS[rng.integers(len(COLOURS))]
    shape, shape_mult = SHAPES[rng.integers(len(SHAPES))]
    framed, quality_mult = QUALITY[int(rng.random() < 0.25)]
    value = size * pack
    price = PRICE_SCALE * unit_price * value * tier_mult * colour_mult * shape_mult * quality_mult * float(np.exp(rng.normal(0, 0.12)))
    price = float(np.clip(price, 0.5, 3000.0))

    spellings, probs = UNIT_SPELLINGS[family]
    unit_text = str(rng.choice(spellings, p=probs))
    word = tier_words[rng.integers(len(tier_words))]
    size_text = f"{size:g} {unit_text}"
    title = f"{brand} {word} {name}, {size_text}" + (f" (Pack of {pack})" if pack > 1 else "")
    lines = [f"Item Name: {title}"]
    for i in range(int(rng.integers(0, 5))):
        lines.append(f"Bullet Point {i + 1}: {FILLER[rng.integers(len(FILLER))]} {brand} quality you can trust.")
    if rng.random() < 0.7:
        desc = f"Enjoy {brand} {name.lower()}. {FILLER[rng.integers(len(FILLER))]}"
        if rng.random() < 0.3:
            desc = f"<p><b>{brand}</b> &amp; you.</p><br>{desc}\n{FILLER[rng.integers(len(FILLER))]}"
        lines.append(f"Product Description: {desc}")
    r = rng.random()
    if r < 0.012:  # as in real data: Value: nan / Unit: None
        lines += ["Value: nan", "Unit: None"]
    elif r > 0.995:  # a row without the lines at all
        pass
    else:
        lines += [f"Value: {value:.1f}", f"Unit: {unit_text}"]
    return "\n".join(lines) + "\n", price, {"colour": colour, "shape": shape, "framed": framed,
                                             "tint": background_tint(type_index)}


def main(cfg: SyntheticConfig) -> Path:
    out_dir = Path(cfg.out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    n = cfg.n_train + cfg.n_test
    ids = rng.choice(np.arange(100_000, 999_999), size=n, replace=False)
    rows = []
    for i in progress(range(n), desc="synthetic", unit="row"):
        content, price, spec = make_row(rng)
        sid = int(ids[i])
        link = f"images/{sid}.png"
        fault = rng.random()
        image = draw_image(cfg.image_size, spec["colour"], spec["shape"], spec["framed"], spec["tint"], rng)
        if fault < cfg.missing_image_rate / 2:
            link = f"images/missing_{sid}.png"  # a broken link: the file never exists
        else:
            if fault < cfg.missing_image_rate:
                image = image[: len(image) // 3]  # a truncated, undecodable file
            atomic_write_bytes(out_dir / link, image)
        rows.append((sid, content, link, price))

    def write(name: str, part, with_price: bool, labels: bool = False):
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["sample_id", "price"] if labels else ["sample_id", "catalog_content", "image_link"] + (["price"] if with_price else []))
        for sid, content, link, price in part:
            if labels:
                w.writerow([sid, f"{price:.2f}"])
            else:
                w.writerow([sid, content, link] + ([f"{price:.2f}"] if with_price else []))
        atomic_write_text(out_dir / name, buf.getvalue())

    train, test = rows[: cfg.n_train], rows[cfg.n_train:]
    write("train.csv", train, with_price=True)
    write("test.csv", test, with_price=False)
    write("test_labels.csv", test, with_price=False, labels=True)
    prices = np.array([r[3] for r in train])
    print(f"wrote {cfg.n_train} train and {cfg.n_test} test rows to {out_dir} "
          f"(train price min {prices.min():.2f}, median {np.median(prices):.2f}, mean {prices.mean():.2f}, max {prices.max():.2f})")
    return out_dir


if __name__ == "__main__":
    run_cli(lambda: main(parse_args(SyntheticConfig, profiles=SYNTHETIC_PROFILES)))
