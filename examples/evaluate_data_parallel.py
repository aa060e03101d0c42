"""Score a saved GRACE adapter data-parallel: every process scores a shard of the edits, the scores are gathered.

    accelerate launch --num_processes 2 examples/evaluate_data_parallel.py BASE ADAPTER EDITS [--output scores.json]
    torchrun --nproc_per_node 2 examples/evaluate_data_parallel.py BASE ADAPTER EDITS      # CPU processes (gloo)

(On a machine without GPUs, ``accelerate launch --cpu`` starts several processes only through mpirun
(``--mpirun_hostfile``); ``torchrun`` or ``accelerate launch --multi_gpu --num_processes 2`` start them directly.)

BASE is a transformers model folder (or "smollm2"), ADAPTER a folder written by ``save_pretrained`` after editing
(editing itself runs in one process), EDITS a zsRE, CounterFact or JSONL file. Each process loads the model onto
its own device. The unedited model is the same model with the adapter disabled (GRACE never changes the base
weights), so the locality reference and the unedited scores need no second model. The main process prints the
scores and writes them to ``--output``; they equal what one process computes for all records.
"""

import argparse
import dataclasses
import json

from peft import PeftModel

import grace_peft  # noqa: F401  (registers GRACE with peft: needed before PeftModel.from_pretrained)
from grace_peft.apps.base_models import load_model
from grace_peft.evaluation import Protocol, read_edits
from grace_peft.evaluation.distributed import evaluate_data_parallel, locality_reference_data_parallel, process_state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="base model folder (or 'smollm2')")
    parser.add_argument("adapter", help="GRACE adapter folder (save_pretrained)")
    parser.add_argument("edits", help="edits file: zsRE, CounterFact or JSONL")
    parser.add_argument("--protocol", choices=[protocol.value for protocol in Protocol], default="teacher_forced")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=None, help="score the first N records only")
    parser.add_argument("--output", help="write the scores as JSON (main process)")
    args = parser.parse_args()

    state = process_state()
    records = read_edits(args.edits, limit=args.limit)
    base, tokenizer = load_model(args.base)
    model = PeftModel.from_pretrained(base, args.adapter).to(state.device).eval()
    options = {"protocol": args.protocol, "batch_size": args.batch_size, "state": state}
    with model.disable_adapter():
        reference = locality_reference_data_parallel(model, tokenizer, records, **options)
        unedited = evaluate_data_parallel(model, tokenizer, records, reference, **options)
    edited = evaluate_data_parallel(model, tokenizer, records, reference, **options)

    if state.is_main_process:
        result = {"protocol": args.protocol, "num_records": len(records), "num_processes": state.num_processes,
                  "unedited": dataclasses.asdict(unedited), "edited": dataclasses.asdict(edited)}
        print(f"{len(records)} records scored by {state.num_processes} processes ({args.protocol})")
        for name, scores in (("unedited", unedited), ("edited", edited)):
            print(f"{name:9}", json.dumps(scores.summary()))
        if args.output:
            with open(args.output, "w", encoding="utf-8") as file:
                json.dump(result, file, indent=2)
    state.destroy_process_group()


if __name__ == "__main__":
    main()
