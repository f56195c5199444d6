"""``pact methods``: the registered reduction methods, one line each, and the model families they run on.

pact methods                 # every (pruning, clustering) pair
pact methods --family qwen2_vl
pact methods --configs       # the bundled configs and the method each selects
"""

from __future__ import annotations

import argparse

from pact.models import ADAPTERS

FAMILIES: tuple[str, ...] = tuple(ADAPTERS)
"""Every supported model family (the keys of ``pact.models.ADAPTERS``)."""


def describe(pruning: str, clustering: str) -> str:
    """One-line description of a (pruning, clustering) pair, from the declared method surfaces."""
    from pact.methods.base import CLUSTERING, PAIR_DESCRIPTIONS, PRUNING, SPECS

    if (pruning, clustering) in PAIR_DESCRIPTIONS:
        return PAIR_DESCRIPTIONS[(pruning, clustering)]
    prune = SPECS[(PRUNING, pruning)].description if (PRUNING, pruning) in SPECS else pruning
    cluster = SPECS[(CLUSTERING, clustering)].description if (CLUSTERING, clustering) in SPECS else clustering
    if clustering == "none":
        return prune
    if pruning == "none":
        return cluster
    return f"{prune}, then {cluster}"


def families_of(factory: object) -> tuple[str, ...]:
    """Model families a method runs on (its ``families`` attribute; default: all)."""
    families = getattr(factory, "families", None)
    return FAMILIES if families is None else tuple(families)


def rows(family: str | None = None) -> list[tuple[str, str, str]]:
    """(pair, families, description) for every registered method, sorted by pair."""
    from pact.methods import REGISTRY

    out = []
    for (pruning, clustering), factory in sorted(REGISTRY.items()):
        fams = families_of(factory)
        if family is not None and family not in fams:
            continue
        label = "all" if set(fams) == set(FAMILIES) else ", ".join(fams)
        out.append((f"{pruning}+{clustering}", label, describe(pruning, clustering)))
    return out


def config_rows() -> list[tuple[str, str]]:
    """(config name, "pruning+clustering layer L") for every bundled config."""
    from pact.config import config_names, load_config

    out = []
    for name in config_names():
        cfg = load_config(name)
        what = "reduction off" if not cfg.reduction else f"{cfg.pruning}+{cfg.clustering} layer {cfg.layer}"
        out.append((name, what))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pact methods", description="List the token-reduction methods.")
    parser.add_argument("--family", choices=FAMILIES, help="only the methods that support this model family")
    parser.add_argument("--configs", action="store_true", help="list the bundled configs instead")
    args = parser.parse_args(argv)
    if args.configs:
        table = config_rows()
        width = max(len(n) for n, _ in table)
        for name, what in table:
            print(f"{name:<{width}}  {what}")
        return 0
    table = rows(args.family)
    w0 = max(len(r[0]) for r in table)
    w1 = max(len(r[1]) for r in table)
    print(f"{'pruning+clustering':<{w0}}  {'families':<{w1}}  description")
    for pair, fams, text in table:
        print(f"{pair:<{w0}}  {fams:<{w1}}  {text}")
    print("\nSelect one with the config keys `pruning` and `clustering` (see docs/CONFIGDOC.md).")
    return 0
