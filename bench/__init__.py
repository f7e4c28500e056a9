"""Benchmarks: each prints a table of what ran, on what device, and how fast or how well."""


def split_options(argv: list[str], defaults: dict) -> tuple[dict, list[str]]:
    """(the benchmark's own key=value options over `defaults`, every other token in order)."""
    opts, rest = dict(defaults), []
    for token in argv:
        key, _, value = token.partition("=")
        if key in opts:
            opts[key] = value
        else:
            rest.append(token)
    return opts, rest
