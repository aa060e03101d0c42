"""Batched editing speed: the same sequential edits with edit_many(batch_size=k), k = 1, 4, 8, 16, same process.

    python benchmarks/batched_editing.py                    # SmolLM2-135M, 64 zsRE edits
    python benchmarks/batched_editing.py --edits 128 --sizes 1,8,32

Reports seconds per edit and the speed-up over k=1, and checks that every k gives k=1's codebook: the same
number of keys, labels and edit ids, and values equal up to float rounding.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from peft import get_peft_model

from grace_peft import GraceConfig, GraceEditor
from grace_peft.apps.base_models import SMOLLM2_EPS_INIT, load_model, mlp_output_projection, smollm2_settings
from grace_peft.atomic import atomic_file
from grace_peft.evaluation import Evaluator, read_edits

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "zsre_dev.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", default="smollm2", help="'smollm2' or a local causal LM folder")
    parser.add_argument("--data", type=Path, default=DATA, help="edits file (default: the zsRE dev set)")
    parser.add_argument("--edits", type=int, default=64, help="edits to apply (default 64)")
    parser.add_argument("--sizes", default="1,4,8,16", help="batch sizes; the first is the baseline (default 1,4,8,16)")
    parser.add_argument("--target-module", help="module to wrap (default: the model's default edited layer)")
    parser.add_argument("--eps-init", type=float, default=SMOLLM2_EPS_INIT, help="initial radius")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/batched_editing.json"))
    return parser.parse_args(argv)


def key_settings(base, args: argparse.Namespace) -> dict:
    """SmolLM2's measured training settings when SmolLM2 is edited at its default layer; else the config's."""
    if args.model != "smollm2" or args.target_module:
        return {}
    return {"optimizer": smollm2_settings(base)["optimizer"]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.data.is_file():
        print(f"No edits file at {args.data}: pass --data PATH.", file=sys.stderr)
        return 2
    records = read_edits(args.data, limit=args.edits)
    edits = [(record.prompt, record.target) for record in records]
    base, tokenizer = load_model(args.model)
    target = args.target_module or mlp_output_projection(base)
    rows, reference = [], None
    for size in [int(value) for value in args.sizes.split(",")]:
        model = get_peft_model(copy.deepcopy(base), GraceConfig(target_modules=[target], eps_init=args.eps_init,
                                                                **key_settings(base, args)))
        editor = GraceEditor(model, tokenizer, progress=False)
        started = time.perf_counter()
        reports = editor.edit_many(edits, batch_size=size)
        seconds = time.perf_counter() - started
        (layer,) = editor.layers.values()
        codebook = layer.grace_codebook[editor.adapter_name]
        rel = Evaluator(model, tokenizer).score(records).rel
        if reference is None:
            reference = codebook
        row = {
            "batch_size": size, "s_per_edit": seconds / len(edits), "rel": rel, "keys": len(codebook),
            "took": sum(report.success for report in reports),
            "same_entries_as_baseline": len(codebook) == len(reference)
            and torch.equal(codebook.edit_ids, reference.edit_ids)
            and torch.equal(codebook.label_tokens, reference.label_tokens),
            "max_value_difference": float((codebook.values - reference.values).abs().max())
            if len(codebook) == len(reference) else None,
        }
        row["speedup"] = rows[0]["s_per_edit"] / row["s_per_edit"] if rows else 1.0
        rows.append(row)
        print(f"batch {size:>3}: {row['s_per_edit']:.2f} s/edit, speed-up {row['speedup']:.2f}x, Rel {rel:.3f}, "
              f"keys {row['keys']}, took {row['took']}/{len(edits)}, same entries as k={rows[0]['batch_size']}: "
              f"{row['same_entries_as_baseline']}, max value difference {row['max_value_difference']}", flush=True)
    with atomic_file(args.output) as file:
        json.dump({"model": args.model, "target_module": target, "edits": len(edits),
                   "torch_threads": torch.get_num_threads(), "runs": rows}, file, indent=1)
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
