"""Edit speed against the minimal reference loop: seconds and steps per edit, and where an edit's time goes.

    python benchmarks/edit_speed.py                          # SmolLM2-135M, its default settings, 100 zsRE edits
    python benchmarks/edit_speed.py --edits 50 --reference-edits 10

The reference is the least an edit by the authors' procedure has to do: per step one forward and one backward
through the whole (frozen) model, the value replacing the edited module's output at the last prompt token, 100
Adam steps at lr 1.0, nothing else (no codebook, no probe, no verify, no early stop). grace_peft edits the same
records one after another with its defaults (a lifelong run). The two alternate edit by edit in one process, so
that both see the same machine load; the ratio is that of the medians over the edits both made. Also prints the
median steps and the per-phase breakdown (probe, codebook update, training, verify) of grace_peft's edits, and its
final Rel / Gen (teacher forced) beside the unedited model's.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from peft import get_peft_model
from tqdm.auto import tqdm

from grace_peft import GraceConfig, GraceEditor
from grace_peft.apps.base_models import load_model, mlp_output_projection, smollm2_settings
from grace_peft.atomic import atomic_file
from grace_peft.evaluation import Evaluator, read_edits
from grace_peft.inputs import Task, encode_edit, input_device
from grace_peft.query import IGNORE_INDEX

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "zsre_dev.json"
REFERENCE_STEPS, REFERENCE_LR = 100, 1.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", default="smollm2", help="'smollm2' or a local causal LM folder")
    parser.add_argument("--data", type=Path, default=DATA, help="edits file (default: the zsRE dev set)")
    parser.add_argument("--edits", type=int, default=100, help="edits grace_peft applies (default 100)")
    parser.add_argument("--reference-edits", type=int, default=20,
                        help="of those, how many the reference loop also makes (default 20)")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/edit_speed.json"))
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def grace_config(base, model_name: str) -> GraceConfig:
    """SmolLM2's measured settings, or the paper's key at the default layer of another model."""
    if model_name == "smollm2":
        return GraceConfig(**smollm2_settings(base))
    return GraceConfig(target_modules=[mlp_output_projection(base)])


def reference_edit(model: torch.nn.Module, tokenizer, target: str, prompt: str, answer: str) -> tuple[float, bool]:
    """The minimal reference loop for one edit; returns its seconds and whether the target is then predicted."""
    started = time.perf_counter()
    inputs = {name: tensor.to(input_device(model))
              for name, tensor in encode_edit(tokenizer, Task.CAUSAL_LM, prompt, answer).inputs.items()}
    position = int((inputs["labels"][0] == IGNORE_INDEX).sum()) - 1  # the last prompt token
    value: list[torch.Tensor] = []

    def replace(module, args, output):
        if not value:  # the first forward starts the value from the module's own output
            value.append(output[0, position].detach().clone().requires_grad_(True))
        output = output.clone()
        output[0, position] = value[0]
        return output

    handle = model.get_submodule(target).register_forward_hook(replace)
    try:
        optimizer = None
        for _ in range(REFERENCE_STEPS):
            loss = model(**inputs).loss
            optimizer = optimizer or torch.optim.Adam(value, lr=REFERENCE_LR)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            logits = model(**inputs).logits
        predicted = bool((logits[0, :-1].argmax(-1) == inputs["labels"][0, 1:])[inputs["labels"][0, 1:] >= 0].all())
    finally:
        handle.remove()
    return time.perf_counter() - started, predicted


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.data.is_file():
        print(f"No edits file at {args.data}: pass --data PATH.", file=sys.stderr)
        return 2
    records = read_edits(args.data, limit=args.edits)
    base, tokenizer = load_model(args.model)
    config = grace_config(base, args.model)
    (target,) = config.target_modules
    reference_model = copy.deepcopy(base).requires_grad_(False)
    model = get_peft_model(copy.deepcopy(base), config)
    editor = GraceEditor(model, tokenizer, progress=False)
    evaluator = Evaluator(model, tokenizer)
    unedited = evaluator.score(records)

    reports, reference = [], []
    for index, record in enumerate(tqdm(records, desc="edits", unit="edit", disable=args.no_progress)):
        started = time.perf_counter()
        reports.append(editor.edit(record.prompt, record.target))
        reports[-1].seconds = time.perf_counter() - started  # wall time, as for the reference
        if index < args.reference_edits:
            reference.append(reference_edit(reference_model, tokenizer, target, record.prompt, record.target))
    final = evaluator.score(records)

    both = len(reference)
    ours_both = statistics.median(report.seconds for report in reports[:both]) if both else None
    reference_median = statistics.median(seconds for seconds, _ in reference) if both else None
    phases = {phase: statistics.median(report.phase_seconds.get(phase, 0.0) for report in reports)
              for phase in ("probe", "update", "train", "verify")}
    result = {
        "model": args.model, "target_module": target, "config": config.to_dict(), "edits": len(reports),
        "torch_threads": torch.get_num_threads(),
        "ours": {"median_s_per_edit": statistics.median(report.seconds for report in reports),
                 "median_s_per_edit_on_reference_edits": ours_both,
                 "median_steps": statistics.median(report.steps for report in reports),
                 "mean_steps": statistics.fmean(report.steps for report in reports),
                 "max_steps_taken": max(report.steps for report in reports),
                 "failed": sum(not report.success for report in reports), "median_phase_s": phases,
                 "unedited": unedited.summary(), "final": final.summary()},
        "reference": {"edits": both, "steps": REFERENCE_STEPS, "learning_rate": REFERENCE_LR,
                      "median_s_per_edit": reference_median,
                      "predicted": sum(predicted for _, predicted in reference)},
        "speedup_median": reference_median / ours_both if both else None,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(args.output) as file:
        file.write(json.dumps(result, indent=1, default=str))

    ours = result["ours"]
    print(f"\n{len(reports)} sequential edits ({target}), {torch.get_num_threads()} threads:")
    print(f"  grace_peft: median {ours['median_s_per_edit']:.3f} s/edit, median {ours['median_steps']:g} steps "
          f"(mean {ours['mean_steps']:.1f}, max {ours['max_steps_taken']}), {ours['failed']} failed")
    print("  per edit (medians): " + ", ".join(f"{phase} {seconds * 1000:.0f} ms" for phase, seconds in phases.items()))
    print(f"  Rel {final.rel:.3f} (unedited {unedited.rel:.3f}), Gen {final.gen:.3f} (unedited {unedited.gen:.3f})"
          if final.gen is not None else f"  Rel {final.rel:.3f} (unedited {unedited.rel:.3f})")
    if both:
        print(f"  reference loop on the first {both} edits: median {reference_median:.3f} s/edit, "
              f"{result['reference']['predicted']}/{both} predicted; grace_peft on the same edits "
              f"{ours_both:.3f} s/edit: {result['speedup_median']:.1f}x faster")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
