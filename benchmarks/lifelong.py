"""Lifelong editing benchmark: T sequential edits on one model, final-state Rel / Gen / Loc, speed and memory.

    python benchmarks/lifelong.py                           # SmolLM2-135M, zsRE dev, default T and settings
    python benchmarks/lifelong.py --data counterfact --edits 300
    python benchmarks/lifelong.py --edits 599 --reference-edits 20
    python benchmarks/lifelong.py --sweep-layers 15,21,25,27,29 --sweep-eps 0.5,1,3 --edits 100

Writes ``result.json`` and ``curves.png`` (or ``sweep.json`` and ``sweep.md``) into ``--output``. Scores use the
teacher-forced protocol of spec §8 unless ``--protocol generation``; Loc is agreement with the unedited model.
``--reference-edits N`` also times the authors' procedure (a fixed 100 Adam steps at lr 1.0 through the full model)
on the first N edits, in the same process, and reports the speed ratio and both procedures' Rel.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import resource
import sys
import time
from pathlib import Path
from statistics import median, quantiles

import torch
from peft import get_peft_model

from grace_peft import GraceConfig, GraceEditor, apply_calibration, background_texts, calibrate
from grace_peft.apps.base_models import (
    SMOLLM2_EPS_INIT,
    SMOLLM2_KEY_LAYER,
    SMOLLM2_LAYER,
    SMOLLM2_OPTIMIZER,
    SMOLLM2_REWORDING_SETTINGS,
    load_model,
    mlp_output_projection,
)
from grace_peft.atomic import atomic_file
from grace_peft.evaluation import Protocol, read_edits, run_lifelong
from grace_peft.evaluation.metrics import gold_tokens, match_fraction, predicted_tokens
from grace_peft.inputs import collate, encode_edit, input_device, pad_token_id

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATASETS = {"zsre": DATA / "zsre_dev.json", "counterfact": DATA / "counterfact_dev.json"}
DEFAULT_EDITS = 200
REFERENCE = {"max_steps": 100, "optimizer": "adam", "learning_rate": 1.0, "early_stop": "never"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", default="smollm2", help="'smollm2' or a local causal LM folder (default smollm2)")
    parser.add_argument("--data", default="zsre", help="'zsre', 'counterfact' or an edits file (default zsre)")
    parser.add_argument("--edits", type=int, default=DEFAULT_EDITS, help=f"T, edits to apply (default {DEFAULT_EDITS};"
                        " 0 = all)")
    parser.add_argument("--layer", type=int, default=SMOLLM2_LAYER,
                        help=f"block whose MLP down projection is edited (default {SMOLLM2_LAYER})")
    parser.add_argument("--target-module", help="explicit module name (overrides --layer)")
    parser.add_argument("--eps-init", type=float,
                        help=f"initial radius (default: SmolLM2's measured one at block {SMOLLM2_LAYER}, "
                             f"{SMOLLM2_EPS_INIT}, or {SMOLLM2_REWORDING_SETTINGS['eps_init']} with --rewording; "
                             "else 1.0)")
    parser.add_argument("--replacement", default="replace_last", help="replacement mode (default replace_last)")
    parser.add_argument("--rewording", action="store_true",
                        help="SmolLM2's opt-in settings for edits that hold on rewordings: the prompt mean of block "
                             f"{SMOLLM2_KEY_LAYER}'s MLP input as the key, {SMOLLM2_REWORDING_SETTINGS}")
    parser.add_argument("--key", help="GraceConfig.key (default last_token)")
    parser.add_argument("--eps-split", help="GraceConfig.eps_split (default: as --key)")
    parser.add_argument("--key-layer", type=int,
                        help="make the key of this block's MLP down projection input (GraceConfig.key_module)")
    parser.add_argument("--value-contexts", type=int, default=0, help="GraceConfig.value_contexts (default 0)")
    parser.add_argument("--subject-gate", action="store_true",
                        help="GraceConfig.subject_gate: an entry fires only on prompts holding its edit's subject (the "
                             "records' 'subject' field)")
    parser.add_argument("--calibrate", type=float, metavar="P",
                        help="set eps_init (and the key center) by grace_peft.calibrate for false-hit rate P on the "
                             "model's own background text, instead of --eps-init")
    parser.add_argument("--no-center", action="store_true", help="with --calibrate: keep the key center at zero")
    parser.add_argument("--optimizer", choices=("adam", "line_search"), help="GraceConfig.optimizer (default: "
                        f"{SMOLLM2_OPTIMIZER} for SmolLM2 at block {SMOLLM2_LAYER}, else the config's, adam)")
    parser.add_argument("--learning-rate", type=float, help="GraceConfig.learning_rate (default: the config's)")
    parser.add_argument("--max-steps", type=int, default=100, help="cap on training steps per edit (default 100)")
    parser.add_argument("--protocol", default="teacher_forced", choices=[p.value for p in Protocol])
    parser.add_argument("--immediate", action="store_true",
                        help="also score each edit right after it is applied (the paper's ES)")
    parser.add_argument("--checkpoint-every", type=int, help="score edits so far every k edits (default T/10)")
    parser.add_argument("--reference-edits", type=int, default=0,
                        help="also time the reference procedure (100 Adam steps, full model) on the first N edits")
    parser.add_argument("--sweep-layers", help="comma-separated layers: run a layer x eps_init sweep instead")
    parser.add_argument("--sweep-eps", default="1.0", help="comma-separated eps_init values for the sweep")
    parser.add_argument("--sweep-replacements", help="comma-separated replacement modes for the sweep "
                        "(default: --replacement)")
    parser.add_argument("--batch-size", type=int, default=16, help="evaluation batch size (default 16)")
    parser.add_argument("--edit-batch-size", type=int, default=1,
                        help="edits trained at once (GraceEditor.edit_many batch_size; default 1)")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results"), help="output folder")
    parser.add_argument("--save-adapter", type=Path, metavar="DIR",
                        help="also save the final adapter (e.g. to score it again: grace-peft eval MODEL DIR EDITS)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.calibrate is not None and (args.sweep_layers or not 0 < args.calibrate < 1):
        parser.error("--calibrate takes a false-hit rate between 0 and 1 and sets the radius itself: not with a sweep")
    if args.rewording and (args.model != "smollm2" or (args.key, args.key_layer, args.eps_split) != (None,) * 3):
        parser.error("--rewording is SmolLM2's measured setting: use it with --model smollm2 and no key options")
    smollm2_at_default = args.model == "smollm2" and args.layer == SMOLLM2_LAYER and not args.target_module
    if args.eps_init is None:
        if smollm2_at_default and args.rewording:
            args.eps_init = SMOLLM2_REWORDING_SETTINGS["eps_init"]
        elif smollm2_at_default and (args.key, args.key_layer) == (None, None):
            args.eps_init = SMOLLM2_EPS_INIT
        else:
            args.eps_init = 1.0
    if args.optimizer is None and smollm2_at_default:
        args.optimizer = SMOLLM2_OPTIMIZER
    return args


def target_name(model, args: argparse.Namespace, layer: int) -> str:
    return args.target_module or mlp_output_projection(model, layer)


def edit_and_score(base, tokenizer, records, args, *, layer: int, eps_init: float, procedure: dict | None = None,
                   reuse_frozen_layers: bool = True, checkpoint_every: int | None = None, immediate: bool = False,
                   edit_batch_size: int | None = None):
    """One lifelong run on a fresh copy of the base model."""
    options = {"replacement": args.replacement, "max_steps": args.max_steps, "value_contexts": args.value_contexts,
               "subject_gate": args.subject_gate,
               **({"learning_rate": args.learning_rate} if args.learning_rate else {}),
               **({"optimizer": args.optimizer} if args.optimizer else {}),
               **key_options(base, args), **(procedure or {})}
    config = GraceConfig(target_modules=[target_name(base, args, layer)], eps_init=eps_init, **options)
    model = get_peft_model(copy.deepcopy(base), config)
    if args.calibrate:
        calibration = calibrate(model, tokenizer, args.background_texts, false_hit_rate=args.calibrate,
                                center=not args.no_center, progress=False)
        apply_calibration(model, calibration)
        args.calibrated_eps_init = calibration.eps_init
    editor = GraceEditor(model, tokenizer, progress=False, reuse_frozen_layers=reuse_frozen_layers)
    result = run_lifelong(editor, records, protocol=args.protocol, batch_size=args.batch_size,
                          checkpoint_every=checkpoint_every, immediate=immediate,
                          edit_batch_size=edit_batch_size or args.edit_batch_size,
                          progress=not args.no_progress)
    return result, editor


@torch.no_grad()
def paraphrase_breakdown(editor: GraceEditor, records, batch_size: int) -> dict[str, float]:
    """Where Gen is won or lost (teacher forced, final state), for edits on one wrapped module:

    * ``fired``: the share of rephrases whose key retrieves an entry labelled with the record's target;
    * ``gen_when_fired``: Gen over those rephrases;
    * ``gen_value_forced``: Gen when every rephrase gets the value its own edit prompt retrieves, whatever its key
      (the value's part alone: how well the trained values carry the edit into a reworded context).
    """
    (layer,) = editor.layers.values()
    codebook, key = layer.grace_codebook[editor.adapter_name], (layer, editor.adapter_name)
    pad = pad_token_id(editor.tokenizer)
    fired, accuracy, forced_accuracy = [], [], []
    kept = [record for record in records if record.rephrase]
    for start in range(0, len(kept), batch_size):
        chunk = kept[start:start + batch_size]
        encoded = {text: [encode_edit(editor.tokenizer, editor.task, getattr(r, text), r.target, chat=editor.chat)
                          for r in chunk] for text in ("prompt", "rephrase")}
        batches = {text: {name: tensor.to(input_device(editor.model)) for name, tensor in
                          collate([e.inputs for e in rows], editor.task, pad).items()}
                   for text, rows in encoded.items()}
        entries = {}
        for text, batch in batches.items():
            with layer.call_state.recording_queries() as recorded:
                logits = editor.model(**batch).logits
            entries[text] = codebook.lookup(recorded[key][0])
            if text == "rephrase":
                accuracy += match_fraction(predicted_tokens(logits, batch["labels"], shift=True),
                                           gold_tokens(batch["labels"])).tolist()
        for row, item in enumerate(encoded["rephrase"]):
            entry = int(entries["rephrase"][row])
            fired.append(entry >= 0 and torch.equal(codebook.label(entry).cpu(), item.label_ids))
        own = entries["prompt"]  # rows whose prompt retrieves nothing are dropped below, whatever they get here
        with layer.call_state.forcing_values({key: codebook.values[own.clamp_min(0)]}):
            logits = editor.model(**batches["rephrase"]).logits
        forced = match_fraction(predicted_tokens(logits, batches["rephrase"]["labels"], shift=True),
                                gold_tokens(batches["rephrase"]["labels"])).tolist()
        forced_accuracy += [score for score, hit in zip(forced, (own >= 0).tolist(), strict=True) if hit]
    when_fired = [score for score, hit in zip(accuracy, fired, strict=True) if hit]
    return {"rephrases": len(kept), "fired": sum(fired) / len(kept),
            "gen_when_fired": sum(when_fired) / len(when_fired) if when_fired else None,
            "gen_value_forced": sum(forced_accuracy) / len(forced_accuracy) if forced_accuracy else None}


def key_options(base, args: argparse.Namespace) -> dict:
    """GraceConfig's key fields: SmolLM2's rewording settings, or what the options name."""
    if args.rewording:
        return {"key_module": mlp_output_projection(base, SMOLLM2_KEY_LAYER),
                **{name: value for name, value in SMOLLM2_REWORDING_SETTINGS.items() if name != "eps_init"}}
    options = {name: getattr(args, name) for name in ("key", "eps_split") if getattr(args, name) is not None}
    if args.key_layer is not None:
        options["key_module"] = mlp_output_projection(base, args.key_layer)
    return options


def timing(result) -> dict[str, float]:
    seconds = [report.seconds for report in result.reports]
    p90 = quantiles(seconds, n=10)[-1] if len(seconds) > 1 else seconds[0]
    phases = {phase: median(report.phase_seconds.get(phase, 0.0) for report in result.reports)
              for phase in ("probe", "update", "train", "verify")}
    return {"median_s_per_edit": median(seconds), "p90_s_per_edit": p90, "total_edit_s": sum(seconds),
            "mean_steps": sum(r.steps for r in result.reports) / len(seconds),
            "median_steps": median(r.steps for r in result.reports), "median_phase_s": phases}


def summary(result) -> dict:
    reports = result.reports
    return {
        "edits": len(reports),
        "keys": result.num_keys,
        "keys_per_edit": result.num_keys / len(reports),
        "failed_edits": sum(not report.success for report in reports),
        "unedited": result.unedited.summary(),
        "final": result.final.summary(),
        "paper_view": result.paper_view(),
        **timing(result),
    }


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_atomically(path: Path, text: str) -> None:
    with atomic_file(path) as file:
        file.write(text)


def plot(result, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = result.checkpoints
    edits = [point["edits"] for point in points]
    figure, (scores, keys) = plt.subplots(1, 2, figsize=(11, 4.2))
    for metric, style in (("rel", "o-"), ("gen", "s-"), ("loc", "^-")):
        values = [point[metric] for point in points]
        if all(value is not None for value in values):
            scores.plot(edits, values, style, label=metric.capitalize())
    scores.set(xlabel="edits applied", ylabel="score on edits so far", ylim=(-0.02, 1.02),
               title=f"Rel / Gen / Loc ({result.protocol})")
    scores.grid(alpha=0.3)
    scores.legend()
    keys.plot(edits, [point["keys"] for point in points], "o-", label="codebook keys")
    keys.plot(edits, edits, "--", color="grey", label="one key per edit")
    keys.set(xlabel="edits applied", ylabel="keys", title="codebook size")
    keys.grid(alpha=0.3)
    keys.legend()
    figure.suptitle(title)
    figure.tight_layout()
    with atomic_file(path, "wb") as file:
        figure.savefig(file, format="png", dpi=120)
    plt.close(figure)


def run_single(base, tokenizer, records, args) -> dict:
    every = args.checkpoint_every or max(1, len(records) // 10)
    result, editor = edit_and_score(base, tokenizer, records, args, layer=args.layer, eps_init=args.eps_init,
                                    checkpoint_every=every, immediate=args.immediate)
    report = {"settings": settings(args, records), **summary(result), "checkpoints": result.checkpoints}
    if args.protocol == Protocol.TEACHER_FORCED.value and len(editor.layers) == 1:
        report["paraphrases"] = paraphrase_breakdown(editor, records, args.batch_size)
    if args.save_adapter:
        editor.model.save_pretrained(args.save_adapter)
    if args.reference_edits:
        report["speed_vs_reference"] = compare_with_reference(base, tokenizer, records[: args.reference_edits], args)
    report["peak_rss_mib"] = peak_rss_mib()
    report["edit_reports"] = [edit.to_dict() for edit in result.reports]
    args.output.mkdir(parents=True, exist_ok=True)
    write_atomically(args.output / "result.json", json.dumps(report, indent=1))
    plot(result, args.output / "curves.png", f"{args.model} · {len(records)} {args.data} edits · "
         f"{target_name(base, args, args.layer)} · eps_init {args.eps_init}")
    return report


def compare_with_reference(base, tokenizer, records, args) -> dict:
    """The same edits, same process: ours (early stop + frozen-layer replay) vs. 100 fixed Adam steps."""
    ours, _ = edit_and_score(base, tokenizer, records, args, layer=args.layer, eps_init=args.eps_init)
    reference, _ = edit_and_score(base, tokenizer, records, args, layer=args.layer, eps_init=args.eps_init,
                                  procedure=REFERENCE, reuse_frozen_layers=False, edit_batch_size=1)
    ours_time, reference_time = timing(ours), timing(reference)
    return {
        "edits": len(records),
        "ours": {"rel": ours.final.rel, **ours_time},
        "reference": {"rel": reference.final.rel, **reference_time, **REFERENCE},
        "speedup_median": reference_time["median_s_per_edit"] / ours_time["median_s_per_edit"],
        "speedup_total": reference_time["total_edit_s"] / ours_time["total_edit_s"],
    }


def run_sweep(base, tokenizer, records, args) -> list[dict]:
    layers = [int(value) for value in args.sweep_layers.split(",")]
    radii = [float(value) for value in args.sweep_eps.split(",")]
    modes = args.sweep_replacements.split(",") if args.sweep_replacements else [args.replacement]
    rows = []
    for layer, eps_init, mode in itertools.product(layers, radii, modes):
        started = time.perf_counter()
        result, editor = edit_and_score(base, tokenizer, records, args, layer=layer, eps_init=eps_init,
                                        procedure={"replacement": mode})
        rows.append({"layer": layer, "eps_init": eps_init, "replacement": mode, **summary(result),
                     "wall_s": time.perf_counter() - started})
        if args.protocol == Protocol.TEACHER_FORCED.value:
            rows[-1]["paraphrases"] = paraphrase_breakdown(editor, records, args.batch_size)
        print(sweep_line(rows[-1]), flush=True)
        # rewritten after every run: an interrupted sweep keeps the rows it finished
        write_atomically(args.output / "sweep.json", json.dumps({"settings": settings(args, records), "runs": rows},
                                                                 indent=1))
        write_atomically(args.output / "sweep.md", sweep_table(rows, args, len(records)))
    return rows


def sweep_line(row: dict) -> str:
    final = row["final"]
    return (f"layer {row['layer']:>3}  eps_init {row['eps_init']:<5g} {row['replacement']:<14} "
            f"Rel {final['rel']:.3f}  Gen {fmt(final['gen'])}  "
            f"Loc {fmt(final['loc'])}  keys/edit {row['keys_per_edit']:.2f}  failed {row['failed_edits']}  "
            f"median {row['median_s_per_edit']:.2f} s/edit")


def sweep_table(rows: list[dict], args, count: int) -> str:
    lines = [f"{count} sequential {args.data} edits on {args.model}, final state, {args.protocol} protocol, "
             f"max_steps {args.max_steps}.", "",
             "| layer | eps_init | replacement | Rel | Gen | Loc | keys/edit | failed | median s/edit |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        final = row["final"]
        lines.append(f"| {row['layer']} | {row['eps_init']:g} | {row['replacement']} | {final['rel']:.3f} | "
                     f"{fmt(final['gen'])} | "
                     f"{fmt(final['loc'])} | {row['keys_per_edit']:.2f} | {row['failed_edits']} | "
                     f"{row['median_s_per_edit']:.2f} |")
    return "\n".join(lines) + "\n"


def fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def settings(args, records) -> dict:
    return {"model": args.model, "data": args.data, "edits": len(records), "layer": args.layer,
            "target_module": args.target_module, "eps_init": args.eps_init, "replacement": args.replacement,
            "key": args.key, "key_layer": args.key_layer, "eps_split": args.eps_split,
            "value_contexts": args.value_contexts, "learning_rate": args.learning_rate, "optimizer": args.optimizer,
            "calibrate_false_hit_rate": args.calibrate,
            "calibrate_center": bool(args.calibrate) and not args.no_center,
            "calibrated_eps_init": getattr(args, "calibrated_eps_init", None),
            "rewording": args.rewording, "subject_gate": args.subject_gate,
            "max_steps": args.max_steps, "protocol": args.protocol, "edit_batch_size": args.edit_batch_size,
            "torch_threads": torch.get_num_threads()}


def print_report(report: dict) -> None:
    final, unedited = report["final"], report["unedited"]
    print(f"\n{report['edits']} sequential edits, final state ({report['settings']['protocol']}):")
    if report["settings"]["calibrated_eps_init"] is not None:
        print(f"  eps_init {report['settings']['calibrated_eps_init']:.4g}, calibrated for false-hit rate "
              f"{report['settings']['calibrate_false_hit_rate']:g}")
    print(f"  {'':10}{'unedited':>10}{'edited':>10}")
    for metric in ("rel", "gen", "loc", "upstream"):
        print(f"  {metric:10}{fmt(unedited[metric]):>10}{fmt(final[metric]):>10}")
    print(f"  keys {report['keys']} ({report['keys_per_edit']:.2f} per edit), failed edits {report['failed_edits']}, "
          f"median {report['median_s_per_edit']:.2f} s/edit, p90 {report['p90_s_per_edit']:.2f}, "
          f"mean steps {report['mean_steps']:.1f}, peak RSS {report['peak_rss_mib']:.0f} MiB")
    phases = report["median_phase_s"]
    print(f"  per edit (medians): {report['median_steps']:g} steps; " + ", ".join(
        f"{phase} {seconds * 1000:.0f} ms" for phase, seconds in phases.items()))
    paraphrases = report.get("paraphrases")
    if paraphrases:
        print(f"  rephrases that retrieve their edit {fmt(paraphrases['fired'])}; Gen when they do "
              f"{fmt(paraphrases['gen_when_fired'])}; Gen with the edit's own value forced "
              f"{fmt(paraphrases['gen_value_forced'])}")
    print("  paper view: " + ", ".join(f"{name} {fmt(value)}" for name, value in report["paper_view"].items()))
    speed = report.get("speed_vs_reference")
    if speed:
        print(f"  vs reference on {speed['edits']} edits: {speed['speedup_median']:.1f}x faster per edit (median), "
              f"{speed['speedup_total']:.1f}x in total; Rel ours {speed['ours']['rel']:.3f}, "
              f"reference {speed['reference']['rel']:.3f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path = DATASETS.get(args.data, Path(args.data))
    if not path.is_file():
        print(f"No edits file at {path}: pass --data PATH (the dev sets live in ../shared/data).", file=sys.stderr)
        return 2
    records = read_edits(path, limit=args.edits or None)
    base, tokenizer = load_model(args.model)
    if args.calibrate:
        args.background_texts = background_texts(base, tokenizer, progress=not args.no_progress)
    if args.sweep_layers:
        run_sweep(base, tokenizer, records, args)
        print(f"\nwrote {args.output / 'sweep.json'} and {args.output / 'sweep.md'}")
        return 0
    report = run_single(base, tokenizer, records, args)
    print_report(report)
    print(f"\nwrote {args.output / 'result.json'} and {args.output / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
