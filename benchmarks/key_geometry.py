"""Geometry of candidate GRACE key functions on SmolLM2-135M: which key puts a paraphrase near its edit's key and
other prompts far from every key?

    python benchmarks/key_geometry.py --data zsre                   # all 599 zsRE dev records
    python benchmarks/key_geometry.py --data counterfact --records 1000
    python benchmarks/key_geometry.py --data zsre --records 50 --layers 20,27 --output /tmp/kg

GRACE keys on the input of ``model.layers.27.mlp.down_proj`` at the last prompt token, compared by Euclidean
distance. This script embeds every prompt once (one forward pass, forward pre-hooks on the ``down_proj`` of each
layer in ``--layers``) and scores every candidate key = layer x token pooling x transform:

* pooling (per prompt, padding masked out): ``last`` token; ``mean`` over all prompt tokens; ``mean60``, the mean
  over the last 60% of the tokens; ``subject``, the mean over the tokens of the record's subject. The subject is
  an ORACLE: it is known for edit prompts and paraphrases only. Locality and background prompts have none, so
  they fall back to ``mean`` (mixed pooling: read the separation numbers of ``subject`` keys with care), and
  records whose subject is not found in the edit prompt or in the paraphrase are left out of ``subject`` rows.
* transform: ``raw`` (Euclidean distance); ``ccos`` (centred by the background mean, then cosine distance);
  ``cos`` (cosine distance, not centred); ``top2``/``top5``, MEMOIR-style sparse masks, the top 2% / 5% of the
  dimensions of the centred vector by magnitude, distance = 1 - overlap fraction of the two masks.

Prompts are the texts the project feeds the model for an edit (``EditRecord.prompt``, ``rephrase``,
``locality_prompt``, stripped, tokenized plainly: no chat template, no special tokens for SmolLM2), so the last
token is the GRACE query token. The BACKGROUND set (centring mean, false-hit threshold) is text the model itself
samples from generic seeds (fixed seed), never the data set's own locality prompts: one half gives the centring
mean, the other half the threshold tau = the largest distance at which at most 1% of background prompts lie
within tau of ANY edit key (hits are strict, d < tau).

Per candidate: medians of the distance edit -> own paraphrase, edit -> nearest other edit, edit -> own locality
prompt, edit -> nearest locality prompt; retrieval accuracy (a paraphrase's nearest edit key is its own); Gen at
tau (own paraphrase within tau of its edit key) and the locality false-hit rate at tau (locality prompt within
tau of any edit key); AUC of own-paraphrase distance against locality-to-nearest-edit distance; the cross
false-hit rate at tau (a paraphrase within tau of ANOTHER edit's key) and its AUC; and Gen, wrong-key hits and
locality false hits of a GRACE-like codebook (radius min(tau, half the distance to the nearest other key), a
prompt hits only its nearest key). Rows are ranked by Gen - Loc false hits at tau. Writes key_geometry.json,
key_geometry.md (the table) and key_geometry.png (distance distributions of the best keys and of the baseline)
to ``--output``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from grace_peft.apps.base_models import (
    default_layer,
    load_model,
    mlp_output_projection,
    mlp_output_projections,
)
from grace_peft.evaluation import read_edits

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATA_FILES = {"zsre": "zsre_dev.json", "counterfact": "counterfact_dev.json"}
DEFAULT_LAYERS = "3,6,9,12,15,18,20,22,24,26,27,28,29"
POOLINGS = ("last", "mean", "mean60", "subject")
TRANSFORMS = ("raw", "ccos", "cos", "top2", "top5")
TOPK_FRACTIONS = {"top2": 0.02, "top5": 0.05}
FALSE_HIT_RATE = 0.01  # background false hits allowed at the threshold tau

# Generic seeds for the model-sampled background set: questions and statements, like edit prompts, on no topic.
BACKGROUND_SEEDS = (
    "What is", "Who was", "Which of", "Where is", "How many", "When did", "The", "In 2010,", "My friend",
    "A recent study", "She said that", "One of the most",
)
BACKGROUND_TOKENS = (4, 24)  # each sample keeps a random number of new tokens in this range (then its first line)


# ---------------------------------------------------------------------------------------------------- pooling
# hidden: (B, T, D) down_proj inputs; mask: (B, T) attention mask (1 = token, padding on either side);
# span: (B, T) 1 on the subject's tokens. Each returns (B, D).

def pool_last(hidden: torch.Tensor, mask: torch.Tensor, span: torch.Tensor | None = None) -> torch.Tensor:
    """The last prompt token (GRACE's query token): the last position the attention mask keeps."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (mask * positions).argmax(1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def pool_masked_mean(hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean over the positions where ``keep`` is nonzero (at least one per row)."""
    keep = keep.to(hidden.dtype).unsqueeze(-1)
    return (hidden * keep).sum(1) / keep.sum(1).clamp_min(1.0)


def pool_mean(hidden: torch.Tensor, mask: torch.Tensor, span: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over all prompt tokens."""
    return pool_masked_mean(hidden, mask)


def pool_mean_tail(hidden: torch.Tensor, mask: torch.Tensor, span: torch.Tensor | None = None, *,
                   fraction: float = 0.6) -> torch.Tensor:
    """Mean over the last ``fraction`` of the prompt tokens (at least one token)."""
    lengths = mask.sum(1, keepdim=True)
    keep_count = torch.clamp(torch.ceil(lengths * fraction), min=1)
    rank = torch.cumsum(mask, 1) - 1  # 0-based index among real tokens
    keep = (mask > 0) & (rank >= lengths - keep_count)
    return pool_masked_mean(hidden, keep)


def pool_subject(hidden: torch.Tensor, mask: torch.Tensor, span: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the subject's tokens; rows without a span (all zeros, or no span at all) use all tokens."""
    if span is None:
        return pool_mean(hidden, mask)
    keep = torch.where(span.any(1, keepdim=True), span & (mask > 0), mask > 0)
    return pool_masked_mean(hidden, keep)


POOL_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "last": pool_last, "mean": pool_mean, "mean60": pool_mean_tail, "subject": pool_subject,
}


# ------------------------------------------------------------------------------------------------ transforms
# prepare(keys (N, D), background mean (D,)) -> features; distance(features_a, features_b) -> (Na, Nb).

def features(transform: str, keys: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """The features of ``keys`` that :func:`distances` compares, for one transform."""
    if transform == "raw":
        return keys
    if transform == "cos":
        return F.normalize(keys, dim=-1)
    if transform == "ccos":
        return F.normalize(keys - center, dim=-1)
    if transform in TOPK_FRACTIONS:
        return topk_mask(keys - center, TOPK_FRACTIONS[transform])
    raise ValueError(f"unknown transform {transform!r}")


def topk_mask(vectors: torch.Tensor, fraction: float) -> torch.Tensor:
    """MEMOIR-style sparse code: 1.0 on the top ``fraction`` of dimensions by magnitude, else 0.0."""
    k = max(1, round(vectors.shape[-1] * fraction))
    mask = torch.zeros_like(vectors)
    return mask.scatter_(-1, vectors.abs().topk(k, dim=-1).indices, 1.0)


def distances(transform: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise distances: Euclidean (raw), 1 - cosine (cos, ccos), 1 - mask overlap fraction (top-k)."""
    if transform == "raw":
        return torch.cdist(a, b)
    if transform in TOPK_FRACTIONS:
        return 1.0 - (a @ b.T) / a.sum(-1, keepdim=True)
    return (1.0 - a @ b.T).clamp_min(0.0)


# ------------------------------------------------------------------------------------------------------- data
@dataclass
class PromptSet:
    """The prompts of one role (edit, paraphrase, locality, background) and each one's subject (or None)."""

    texts: list[str]
    subjects: list[str | None]


def load_records(data: str, limit: int | None) -> tuple[dict[str, PromptSet], int]:
    """Edit prompts, paraphrases and locality prompts of the records that have all three; and the number dropped."""
    path = DATA_DIR / DATA_FILES[data]
    records = read_edits(path, data, limit=limit)
    raw = json.loads(path.read_text(encoding="utf-8"))
    kept = [r for r in records if r.rephrase and r.locality_prompt]
    subjects = [(raw[r.source_index].get("subject") or "").strip() or None for r in kept]
    sets = {
        "edit": PromptSet([r.prompt for r in kept], subjects),
        "para": PromptSet([r.rephrase for r in kept], subjects),
        "loc": PromptSet([r.locality_prompt for r in kept], [None] * len(kept)),
    }
    return sets, len(records) - len(kept)


@torch.no_grad()
def sample_background(model, tokenizer, count: int, seed: int) -> list[str]:
    """``count`` short texts the model samples from :data:`BACKGROUND_SEEDS` (seed fixed), first line only."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    per_seed = math.ceil(count / len(BACKGROUND_SEEDS))
    texts: list[str] = []
    for prompt in tqdm(BACKGROUND_SEEDS, desc="background", leave=False):
        inputs = tokenizer([prompt] * per_seed, return_tensors="pt")  # same prompt: no padding
        output = model.generate(**inputs, do_sample=True, top_p=0.95, temperature=1.0,
                                max_new_tokens=BACKGROUND_TOKENS[1], pad_token_id=tokenizer.eos_token_id)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        lengths = torch.randint(BACKGROUND_TOKENS[0], BACKGROUND_TOKENS[1] + 1, (per_seed,), generator=generator)
        for row, length in zip(new_tokens, lengths.tolist(), strict=True):
            text = prompt + tokenizer.decode(row[:length], skip_special_tokens=True)
            text = text.split("\n")[0].strip()
            texts.append(text if len(text) > len(prompt) else prompt)
    order = torch.randperm(len(texts), generator=generator).tolist()[:count]
    return [texts[i] for i in order]


def subject_span(offsets: list[tuple[int, int]], text: str, subject: str | None) -> list[bool] | None:
    """Per token, whether it overlaps the subject's characters in ``text`` (first occurrence, case-insensitive
    fallback); None when the subject is unknown or not found."""
    if not subject:
        return None
    start = text.find(subject)
    if start < 0:
        start = text.lower().find(subject.lower())
    if start < 0:
        return None
    end = start + len(subject)
    span = [token_end > start and token_start < end for token_start, token_end in offsets]
    return span if any(span) else None


# ---------------------------------------------------------------------------------------------------- forward
@torch.no_grad()
def embed(model, tokenizer, prompts: PromptSet, layers: list[int], batch_size: int,
          progress: tqdm) -> tuple[dict[tuple[int, str], torch.Tensor], torch.Tensor]:
    """Pooled down_proj inputs, {(layer, pooling): (N, D)}, and per prompt whether its subject span was found."""
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for layer in layers:
        module = model.get_submodule(mlp_output_projection(model, layer))
        handles.append(module.register_forward_pre_hook(
            lambda _module, args, layer=layer: captured.__setitem__(layer, args[0].float())))
    decoder = model.get_decoder()  # the blocks without the LM head: its logits are not needed
    pooled: dict[tuple[int, str], list[torch.Tensor]] = {key: [] for key in itertools.product(layers, POOLINGS)}
    found: list[bool] = []
    # batches of similar lengths waste little on padding; the rows are put back in order at the end
    lengths = [len(ids) for ids in tokenizer(prompts.texts)["input_ids"]]
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            texts = [prompts.texts[row] for row in rows]
            batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right",
                              return_offsets_mapping=True)
            offsets = batch.pop("offset_mapping").tolist()
            spans = [subject_span(o, t, prompts.subjects[row]) for o, t, row in zip(offsets, texts, rows, strict=True)]
            found.extend(span is not None for span in spans)
            width = batch["input_ids"].shape[1]
            span = torch.tensor([s if s is not None else [False] * width for s in spans], dtype=torch.bool)
            mask = batch["attention_mask"]
            decoder(input_ids=batch["input_ids"], attention_mask=mask)  # right padding: no position shift
            for layer in layers:
                for pooling in POOLINGS:
                    pooled[layer, pooling].append(POOL_FUNCTIONS[pooling](captured[layer], mask, span))
            progress.update(len(texts))
    finally:
        for handle in handles:
            handle.remove()
    restore = torch.argsort(torch.tensor(order))  # position in the sorted order of each original row
    return {key: torch.cat(value)[restore] for key, value in pooled.items()}, torch.tensor(found)[restore]


# ---------------------------------------------------------------------------------------------------- metrics
def auc_smaller(positives: torch.Tensor, negatives: torch.Tensor) -> float:
    """P(positive < negative) + P(tie) / 2: how well a distance threshold separates positives from negatives."""
    pos, neg = positives.unsqueeze(1), negatives.unsqueeze(0)
    return float((pos < neg).double().mean() + 0.5 * (pos == neg).double().mean())


def threshold_at(background_nearest: torch.Tensor, rate: float) -> float:
    """The largest tau with at most ``rate`` of background prompts at distance < tau from some edit key."""
    ordered = background_nearest.sort().values
    allowed = math.floor(rate * len(ordered))
    return float(ordered[allowed])


def score(transform: str, edit: torch.Tensor, para: torch.Tensor, loc: torch.Tensor, background: torch.Tensor,
          center: torch.Tensor) -> dict[str, float]:
    """All metrics of one candidate key (rows of each matrix aligned by record, background separate)."""
    e, p, lo, b = (features(transform, x, center) for x in (edit, para, loc, background))
    edit_para = distances(transform, e, p)  # [i, j]: edit i to paraphrase j
    edit_edit = distances(transform, e, e).fill_diagonal_(float("inf"))
    edit_loc = distances(transform, e, lo)
    own_para = edit_para.diagonal()
    # each paraphrase to the nearest key of ANOTHER edit (pooled like the edits, so also fair for subject keys)
    cross_para = edit_para.clone().fill_diagonal_(float("inf")).min(0).values
    loc_nearest = edit_loc.min(0).values  # each locality prompt to its nearest edit key
    background_nearest = distances(transform, b, e).min(1).values
    tau = threshold_at(background_nearest, FALSE_HIT_RATE)
    # GRACE-like codebook: one key per edit, radius tau shrunk to half the distance to the nearest other key (the
    # split rule, every edit having its own label); a prompt hits only its NEAREST key, and only within its radius
    other_edit = edit_edit.min(1).values
    radius = torch.clamp(other_edit / 2, max=tau)
    para_key, para_distance = edit_para.argmin(0), edit_para.min(0).values
    para_hit = para_distance < radius[para_key]
    own_key = para_key == torch.arange(len(p))
    loc_hit = loc_nearest < radius[edit_loc.argmin(0)]
    return {
        "para": float(own_para.median()),
        "other_edit": float(other_edit.median()),
        "own_loc": float(edit_loc.diagonal().median()),
        "nearest_loc": float(edit_loc.min(1).values.median()),
        "background_nearest": float(background_nearest.median()),
        "ratio": float(own_para.median() / other_edit.median()),
        "retrieval": float(own_key.float().mean()),
        "tau": tau,
        "gen": float((own_para < tau).float().mean()),
        "loc_false_hits": float((loc_nearest < tau).float().mean()),
        "background_false_hits": float((background_nearest < tau).float().mean()),
        "cross_false_hits": float((cross_para < tau).float().mean()),
        "auc": auc_smaller(own_para, loc_nearest),
        "auc_cross": auc_smaller(own_para, cross_para),
        "grace_gen": float((para_hit & own_key).float().mean()),
        "grace_wrong": float((para_hit & ~own_key).float().mean()),
        "grace_loc_false_hits": float(loc_hit.float().mean()),
        "_own_para": own_para.tolist(),
        "_other_edit": other_edit.tolist(),
        "_loc_nearest": loc_nearest.tolist(),
        "_background_nearest": background_nearest.tolist(),
    }


# ---------------------------------------------------------------------------------------------------- outputs
COLUMNS = (("layer", "layer", "{}"), ("pool", "pooling", "{}"), ("transform", "transform", "{}"), ("n", "n", "{}"),
           ("para", "para", "{:.3g}"), ("other edit", "other_edit", "{:.3g}"), ("own loc", "own_loc", "{:.3g}"),
           ("nearest loc", "nearest_loc", "{:.3g}"), ("para/other", "ratio", "{:.2f}"),
           ("retrieval", "retrieval", "{:.3f}"), ("tau", "tau", "{:.3g}"), ("Gen@tau", "gen", "{:.3f}"),
           ("Loc FH@tau", "loc_false_hits", "{:.3f}"), ("Gen-FH", "net", "{:+.3f}"), ("AUC", "auc", "{:.3f}"),
           ("X FH@tau", "cross_false_hits", "{:.3f}"), ("AUC X", "auc_cross", "{:.3f}"),
           ("Gen@r", "grace_gen", "{:.3f}"), ("wrong@r", "grace_wrong", "{:.3f}"),
           ("Loc FH@r", "grace_loc_false_hits", "{:.3f}"))


def table(rows: list[dict], ranks: dict[str, int], baseline: str) -> list[str]:
    """Markdown table lines of ``rows``, each with its overall rank."""
    lines = ["| rank | " + " | ".join(c[0] for c in COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 1)]
    for row in rows:
        cells = [fmt.format("subject*" if key == "pooling" and row[key] == "subject" else row[key])
                 for _, key, fmt in COLUMNS]
        marker = " **(baseline)**" if row["name"] == baseline else ""
        lines.append(f"| {ranks[row['name']]}{marker} | " + " | ".join(cells) + " |")
    return lines


def markdown(rows: list[dict], meta: dict) -> str:
    """The report: how to read it, the best keys that need no subject, then every candidate ranked."""
    baseline = meta["baseline"]
    ranks = {row["name"]: rank for rank, row in enumerate(rows, 1)}
    deployable = [r for r in rows if r["pooling"] != "subject"][:10]
    deployable += [r for r in rows if r["name"] == baseline and r not in deployable]
    lines = [
        f"# Key geometry: {meta['data']} ({meta['records']} records), "
        f"{'SmolLM2-135M-Instruct' if meta['model'] == 'smollm2' else Path(meta['model']).name} down_proj inputs", "",
        f"Background: {meta['background']['count']} model-sampled texts (seed {meta['background']['seed']}); "
        f"{meta['background']['center_count']} give the centring mean, {meta['background']['threshold_count']} "
        f"the threshold tau (at most {FALSE_HIT_RATE:.0%} background false hits, hits strict: d < tau). "
        "Distances: raw = Euclidean, cos/ccos = 1 - cosine (ccos centred), top2/top5 = 1 - overlap of top-k masks "
        "of the centred vector. Medians: para = edit to own paraphrase, other edit = edit to nearest other edit, "
        "own loc = edit to its locality prompt, nearest loc = edit to nearest locality prompt. retrieval = "
        "paraphrases whose nearest edit key is their own; Gen@tau = paraphrases within tau of their own key; "
        "Loc FH@tau = locality prompts within tau of any edit key; AUC = P(own paraphrase distance < locality "
        "prompt's distance to its nearest edit key). X FH@tau = paraphrases within tau of ANOTHER edit's key (a "
        "wrong edit would fire); AUC X = P(own paraphrase distance < that paraphrase's distance to the nearest "
        "other edit key). @r = a GRACE-like codebook: one key per edit with radius r = min(tau, half the "
        "distance to the nearest other edit key), a prompt hits only its nearest key and only inside its radius: "
        "Gen@r = paraphrases hitting their own key, wrong@r = paraphrases hitting another edit's key, Loc FH@r = "
        "locality prompts hitting any key. Rows ranked by Gen - Loc FH at tau, then AUC.", "",
        f"`subject*` = ORACLE subject span (known for edits and paraphrases only; locality and background prompts "
        f"fall back to mean pooling, so their Loc FH and AUC columns mix poolings; retrieval, X FH and AUC X do "
        f"not); "
        f"{meta['subject_skipped']} records without a subject span in edit or paraphrase are left out of those rows.",
        "", f"Baseline (current GRACE key): {baseline}, rank {ranks[baseline]} of {len(rows)}.", "",
        "## Best keys without the subject oracle", "", *table(deployable, ranks, baseline), "",
        "## All candidates", "", *table(rows, ranks, baseline),
    ]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], baseline: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [r for r in rows if r["pooling"] != "subject"][:4]  # best keys that need no subject
    chosen += [r for r in rows if r["pooling"] == "subject"][:1]  # best oracle-subject key
    chosen += [r for r in rows if r["name"] == baseline and r not in chosen]
    columns = min(3, len(chosen))
    lines = math.ceil(len(chosen) / columns)
    figure, axes = plt.subplots(lines, columns, figsize=(4.6 * columns, 3.4 * lines), squeeze=False)
    for axis in axes.flat[len(chosen):]:
        axis.set_visible(False)
    for axis, row in zip(axes.flat, chosen, strict=False):
        series = (("own paraphrase", "_own_para", "tab:green"), ("nearest other edit", "_other_edit", "tab:blue"),
                  ("locality -> nearest edit", "_loc_nearest", "tab:red"),
                  ("background -> nearest edit", "_background_nearest", "tab:gray"))
        values = [v for _, key, _ in series for v in row[key]]
        bins = torch.linspace(min(values), max(values), 41).tolist()
        for label, key, color in series:
            axis.hist(row[key], bins=bins, density=True, histtype="step", linewidth=1.4, label=label, color=color)
        axis.axvline(row["tau"], color="black", linestyle="--", linewidth=1, label="tau (1% background)")
        axis.set_title(f"{row['name']}\nGen {row['gen']:.2f}, Loc FH {row['loc_false_hits']:.2f}, "
                       f"AUC {row['auc']:.2f}", fontsize=9)
        axis.set_xlabel("distance")
    axes.flat[0].legend(fontsize=7)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ------------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--data", choices=sorted(DATA_FILES), default="zsre", help="data set (default zsre)")
    parser.add_argument("--records", type=int, help="first N records (default: 599 zsRE, 1000 CounterFact)")
    parser.add_argument("--layers", default=DEFAULT_LAYERS, help=f"blocks to key on (default {DEFAULT_LAYERS})")
    parser.add_argument("--model", default="smollm2", help="'smollm2' or a local Llama-like causal LM folder")
    parser.add_argument("--background", type=int, default=600,
                        help="model-sampled background texts; half centre, half set tau (default 600)")
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per forward pass (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the background sampling (default 0)")
    parser.add_argument("--output", type=Path, help="folder (default benchmarks/results/key-geometry-<data>)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (DATA_DIR / DATA_FILES[args.data]).is_file():
        print(f"No data file at {DATA_DIR / DATA_FILES[args.data]}.", file=sys.stderr)
        return 2
    limit = args.records if args.records is not None else (1000 if args.data == "counterfact" else None)
    output = args.output or Path(f"benchmarks/results/key-geometry-{args.data}")
    started = time.perf_counter()
    model, tokenizer = load_model(args.model)
    family, projections = mlp_output_projections(model)
    edited_layer = default_layer(family, len(projections))  # the paper's key at the default edited layer: baseline
    layers = sorted({int(value) for value in args.layers.split(",")} | {edited_layer})
    sets, dropped = load_records(args.data, limit)
    count = len(sets["edit"].texts)
    background_texts = sample_background(model, tokenizer, args.background, args.seed)
    half = len(background_texts) // 2
    sets["center"] = PromptSet(background_texts[:half], [None] * half)
    sets["background"] = PromptSet(background_texts[half:], [None] * (len(background_texts) - half))

    keys: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
    found: dict[str, torch.Tensor] = {}
    with tqdm(total=sum(len(s.texts) for s in sets.values()), desc=f"embedding ({args.data})", unit="prompt") as bar:
        for role, prompts in sets.items():
            keys[role], found[role] = embed(model, tokenizer, prompts, layers, args.batch_size, bar)
    embed_seconds = time.perf_counter() - started
    with_subject = found["edit"] & found["para"]

    rows = []
    candidates = list(itertools.product(layers, POOLINGS, TRANSFORMS))
    for layer, pooling, transform in tqdm(candidates, desc="scoring", unit="key"):
        key = (layer, pooling)
        select = with_subject if pooling == "subject" else torch.ones(count, dtype=torch.bool)
        center = keys["center"][key].mean(0)
        metrics = score(transform, keys["edit"][key][select], keys["para"][key][select], keys["loc"][key][select],
                        keys["background"][key], center)
        metrics["net"] = metrics["gen"] - metrics["loc_false_hits"]
        rows.append({"name": f"L{layer} {pooling} {transform}", "layer": layer, "pooling": pooling,
                     "transform": transform, "n": int(select.sum()), **metrics})
    rows.sort(key=lambda r: (-r["net"], -r["auc"]))
    baseline = f"L{edited_layer} last raw"

    meta = {
        "data": args.data, "records": count, "records_dropped_without_rephrase_or_locality": dropped,
        "subject_skipped": int((~with_subject).sum()),
        "subject_not_found": {"edit": int((~found["edit"]).sum()), "para": int((~found["para"]).sum())},
        "layers": layers, "model": args.model, "baseline": baseline, "false_hit_rate": FALSE_HIT_RATE,
        "background": {"count": len(background_texts), "seed": args.seed, "seeds": list(BACKGROUND_SEEDS),
                       "center_count": half, "threshold_count": len(background_texts) - half,
                       "texts": background_texts},
        "torch_threads": torch.get_num_threads(), "batch_size": args.batch_size,
        "embed_seconds": round(embed_seconds, 1), "total_seconds": round(time.perf_counter() - started, 1),
    }
    output.mkdir(parents=True, exist_ok=True)
    public = [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows]
    (output / "key_geometry.json").write_text(json.dumps({"meta": meta, "rows": public}, indent=1) + "\n")
    (output / "key_geometry.md").write_text(markdown(rows, meta))
    plot(rows, baseline, output / "key_geometry.png",
         f"{args.data}: distance distributions (best 4 keys without subject, best subject* key, baseline)")
    meta["total_seconds"] = round(time.perf_counter() - started, 1)
    (output / "key_geometry.json").write_text(json.dumps({"meta": meta, "rows": public}, indent=1) + "\n")
    print(f"{count} records, {len(rows)} candidates, {meta['total_seconds']:.0f} s; wrote {output}/key_geometry.*")
    for rank, row in enumerate(rows[:8], 1):
        print(f"{rank:>3}. {row['name']:<22} retrieval {row['retrieval']:.3f}  Gen@tau {row['gen']:.3f}  "
              f"Loc FH {row['loc_false_hits']:.3f}  AUC {row['auc']:.3f}")
    row = next(r for r in rows if r["name"] == baseline)
    print(f"baseline {baseline}: para {row['para']:.2f}, other edit {row['other_edit']:.2f}, retrieval "
          f"{row['retrieval']:.3f}, Gen@tau {row['gen']:.3f}, Loc FH {row['loc_false_hits']:.3f}, AUC {row['auc']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
