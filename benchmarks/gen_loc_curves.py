"""Gen against Loc as the radius moves, one curve per key option, from radius sweeps of benchmarks/lifelong.py.

    python benchmarks/lifelong.py --edits 50 --key last_token --eps-split halve --sweep-layers 27 \\
        --sweep-eps 2,4,8,16,32 --output runs/last-token
    python benchmarks/lifelong.py --edits 50 --sweep-layers 27 --sweep-eps 0.6,0.75,0.85,0.95,1.05 \\
        --output runs/prompt-mean
    python benchmarks/gen_loc_curves.py "paper's key=runs/last-token" "block 3 prompt mean=runs/prompt-mean" \\
        --output benchmarks/results/gen-loc

Each argument is LABEL=FOLDER (a folder with sweep.json). Writes gen_loc.png (Gen on the y axis, Loc on the x
axis, each point labelled with its eps_init; the unedited model's Gen as a dashed line) and gen_loc.md (the
points as a table).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grace_peft.atomic import atomic_file


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("curves", nargs="+", metavar="LABEL=FOLDER", help="a sweep folder per key option")
    parser.add_argument("--output", type=Path, required=True, help="folder for gen_loc.png and gen_loc.md")
    return parser.parse_args(argv)


def read_curve(spec: str) -> tuple[str, dict, list[dict]]:
    label, _, folder = spec.partition("=")
    if not folder:
        raise SystemExit(f"expected LABEL=FOLDER, got {spec!r}")
    sweep = json.loads((Path(folder) / "sweep.json").read_text())
    runs = sorted(sweep["runs"], key=lambda run: run["eps_init"])
    return label, sweep["settings"], runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    curves = [read_curve(spec) for spec in args.curves]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.6))
    lines = ["| key | eps_init | Rel | Gen | Loc | rephrases that retrieve their edit | keys per edit |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for label, settings, runs in curves:
        loc = [run["final"]["loc"] for run in runs]
        gen = [run["final"]["gen"] for run in runs]
        axes.plot(loc, gen, "o-", label=f"{label} ({settings['edits']} edits)")
        for run, x, y in zip(runs, loc, gen, strict=True):
            axes.annotate(f"{run['eps_init']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
            fired = run.get("paraphrases", {}).get("fired")
            lines.append(f"| {label} | {run['eps_init']:g} | {run['final']['rel']:.3f} | {run['final']['gen']:.3f} | "
                         f"{run['final']['loc']:.3f} | {'—' if fired is None else f'{fired:.3f}'} | "
                         f"{run['keys_per_edit']:.2f} |")
    unedited = curves[0][2][0]["unedited"]["gen"]
    axes.axhline(unedited, linestyle="--", color="grey", label=f"unedited Gen {unedited:.3f}")
    axes.set(xlabel="Loc (unrelated prompts unchanged)", ylabel="Gen (rephrases answered)", ylim=(-0.02, 1.02),
             title="Gen against Loc as eps_init moves")
    axes.invert_xaxis()  # left to right: larger radii, more Gen, less Loc
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    args.output.mkdir(parents=True, exist_ok=True)
    with atomic_file(args.output / "gen_loc.png", "wb") as file:
        figure.savefig(file, format="png", dpi=120)
    with atomic_file(args.output / "gen_loc.md") as file:
        file.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {args.output / 'gen_loc.png'} and {args.output / 'gen_loc.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
