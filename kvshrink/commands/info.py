"""``kvshrink info``: the registered methods and their parameters."""
from __future__ import annotations

import json


def add_parser(sub):
    p = sub.add_parser("info", help="list methods and their parameters")
    p.add_argument("method", nargs="?", help="show one method only")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    return p


def run(args) -> int:
    from ..registry import describe, get_method_class, method_names

    names = [args.method] if args.method else method_names()
    infos = [describe(get_method_class(n)) for n in names]
    if args.json:
        print(json.dumps(infos, indent=2, default=str))
        return 0
    for info in infos:
        print(f"{info['name']}  [{info['kind']}]  {info['summary']}")
        if info["paper"]:
            print(f"    paper: {info['paper']}")
        for pname, p in info["params"].items():
            print(f"    {pname}={p['default']}  ({p['type']})  {p['help']}")
    print("\nspec grammar: name:key=value,key=value ; compose a policy with a quantizer: policy:...+quantizer:...")
    return 0
