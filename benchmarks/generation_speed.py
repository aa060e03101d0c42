"""Generation speed with GRACE: tokens per second of greedy decoding (KV cache on) as the codebook grows.

    python benchmarks/generation_speed.py                  # SmolLM2-135M, 0 / 100 / 1,000 / 10,000 keys
    python benchmarks/generation_speed.py --sizes 0,1000 --new-tokens 64 --repeats 5

Every setting is timed in the same process, round-robin over the settings so that drift of a shared machine hits
them alike, and reported as a ratio to the unwrapped base model. Large codebooks are filled with synthetic keys
drawn around real keys of the default settings (shifted so that no prompt of the run hits one): the cost of the
search does not depend on what the keys mean. Also times the nearest-key search alone, which runs once per
prefill and never per decoded token.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from statistics import median

import torch
from peft import get_peft_model

from grace_peft import GraceConfig
from grace_peft.apps.base_models import load_model, mlp_output_projection, smollm2_settings
from grace_peft.apps.demo import EDITS_FILE, UNRELATED_PROMPTS
from grace_peft.atomic import atomic_file
from grace_peft.evaluation import read_jsonl


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", default="smollm2", help="'smollm2' or a local causal LM folder")
    parser.add_argument("--target-module", help="module to wrap (default: the model's default edited layer)")
    parser.add_argument("--sizes", default="0,100,1000,10000", help="codebook sizes (default 0,100,1000,10000)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt (default 32)")
    parser.add_argument("--batch", type=int, default=16, help="prompts in the batched setting (default 16)")
    parser.add_argument("--single-prompts", type=int, default=4, help="prompts generated one at a time (default 4)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds; the median is reported (default 3)")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/generation_speed.json"))
    return parser.parse_args(argv)


def prompts(count: int) -> list[str]:
    texts = [record.prompt for record in read_jsonl(EDITS_FILE)] + list(UNRELATED_PROMPTS)
    return (texts * (count // len(texts) + 1))[:count]


def fill_codebook(codebook, size: int, queries: torch.Tensor, generator: torch.Generator) -> None:
    """Give ``codebook`` ``size`` synthetic entries around the real ``queries``, none of them within reach."""
    spread = queries.std(0, keepdim=True)
    centre = queries.mean(0, keepdim=True)
    keys = centre + spread * torch.randn(size, codebook.key_dim, generator=generator)
    keys += 3 * spread.norm() * torch.nn.functional.normalize(torch.randn(size, codebook.key_dim,
                                                                          generator=generator), dim=-1)
    codebook.load_state_dict({
        "keys": keys, "values": torch.randn(size, codebook.value_dim, generator=generator),
        "radii": torch.full((size,), 1e-3), "label_tokens": torch.zeros(size, dtype=torch.long),
        "label_lengths": torch.ones(size, dtype=torch.long), "edit_ids": torch.arange(size),
        "next_edit_id": torch.tensor(size),
    })


@torch.no_grad()
def generate_seconds(model, tokenizer, texts: list[str], new_tokens: int) -> float:
    inputs = tokenizer(texts, return_tensors="pt", padding=True)
    started = time.perf_counter()
    model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   pad_token_id=tokenizer.pad_token_id)
    return time.perf_counter() - started


def full_name(model, name: str) -> str:
    """The full module name that ``name`` (a full name or a name suffix, as in target_modules) refers to."""
    matches = [full for full, _ in model.named_modules() if full == name or full.endswith("." + name)]
    if len(matches) != 1:
        raise SystemExit(f"--target-module {name} matches {len(matches)} modules; give the full name.")
    return matches[0]


def query_sample(model, layer, tokenizer, texts: list[str]) -> torch.Tensor:
    """The keys ``layer``'s codebook is searched with for each prompt (an empty codebook: nothing replaced)."""
    captured = []
    with torch.no_grad():
        for text in texts:
            with layer.call_state.recording_queries() as recorded:
                model(**tokenizer(text, return_tensors="pt"))
            captured.append(recorded[(layer, "default")][0])
    return torch.cat(captured)


def search_seconds(codebook, queries: torch.Tensor, repeats: int = 20) -> float:
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        codebook.lookup(queries)
        timings.append(time.perf_counter() - started)
    return median(timings)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",")]
    base, tokenizer = load_model(args.model)
    tokenizer.padding_side = "left"
    if args.target_module:
        config = GraceConfig(target_modules=[full_name(base, args.target_module)])
    else:  # the default settings: SmolLM2's measured key, or the paper's key at the default layer
        config = GraceConfig(**smollm2_settings(base)) if args.model == "smollm2" else \
            GraceConfig(target_modules=[mlp_output_projection(base)])
    (target,) = config.target_modules
    batch_prompts, single_prompts = prompts(args.batch), prompts(args.single_prompts)
    unwrapped = copy.deepcopy(base)  # the baseline: no adapter, no hooks
    model = get_peft_model(base, config)
    layer = model.base_model.model.get_submodule(target)
    codebook = layer.grace_codebook["default"]
    queries = query_sample(model, layer, tokenizer, prompts(44))
    generator = torch.Generator().manual_seed(0)

    settings = ["base"] + [f"{size} keys" for size in sizes]
    timings: dict[str, dict[str, list[float]]] = {name: {"single": [], "batch": []} for name in settings}
    search: dict[str, dict[str, float]] = {}
    for round_ in range(args.repeats + 1):  # round 0 warms up and is not counted
        for name in settings:
            runner = unwrapped if name == "base" else model
            if name != "base":
                fill_codebook(codebook, int(name.split()[0]), queries, generator)
            single = sum(generate_seconds(runner, tokenizer, [text], args.new_tokens) for text in single_prompts)
            batch = generate_seconds(runner, tokenizer, batch_prompts, args.new_tokens)
            if round_:
                timings[name]["single"].append(single)
                timings[name]["batch"].append(batch)
            if name != "base" and round_ == 1:
                search[name] = {"batch_1_ms": 1e3 * search_seconds(codebook, queries[:1]),
                                f"batch_{args.batch}_ms": 1e3 * search_seconds(codebook, queries[:args.batch])}
        print(f"round {round_}/{args.repeats} done", file=sys.stderr, flush=True)

    report = {"model": args.model, "target_module": target, "key": config.key, "key_module": config.key_module,
              "new_tokens": args.new_tokens,
              "torch_threads": torch.get_num_threads(), "settings": {}}
    base_rates = {mode: len(texts) * args.new_tokens / median(timings["base"][mode])
                  for mode, texts in (("single", single_prompts), ("batch", batch_prompts))}
    print(f"{'setting':<12}{'tok/s (1 prompt)':>18}{'ratio':>8}{f'tok/s (batch {args.batch})':>20}{'ratio':>8}"
          f"{'search ms (1 / batch)':>24}")
    for name in settings:
        rates = {mode: len(texts) * args.new_tokens / median(timings[name][mode])
                 for mode, texts in (("single", single_prompts), ("batch", batch_prompts))}
        ratios = {mode: rates[mode] / base_rates[mode] for mode in rates}
        report["settings"][name] = {"tokens_per_s": rates, "ratio_to_base": ratios, "search": search.get(name)}
        searched = search.get(name)
        search_text = " / ".join(f"{value:.3f}" for value in searched.values()) if searched else "—"
        print(f"{name:<12}{rates['single']:>18.1f}{ratios['single']:>8.3f}{rates['batch']:>20.1f}"
              f"{ratios['batch']:>8.3f}{search_text:>24}")
    with atomic_file(args.output) as file:
        json.dump(report, file, indent=1)
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
