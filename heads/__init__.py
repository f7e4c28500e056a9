"""Classical heads trained out of fold on text, structure and any embedding cache: TF-IDF ridge,
nearest-neighbour prices, and a LightGBM stack; see heads/train.py."""
