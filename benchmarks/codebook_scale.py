"""A codebook at 10,000 and 100,000 keys: memory per key, the nearest-key search, and the cost of one more edit.

    python benchmarks/codebook_scale.py                         # SmolLM2's default widths, 10k and 100k keys
    python benchmarks/codebook_scale.py --sizes 1000,10000 --key-dim 576 --value-dim 576

No model is loaded: the codebook is plain tensors (``grace_peft.codebook``). Keys are drawn on the unit sphere
(as the default ``prompt_mean`` key makes them) in clusters of near-duplicates, queries near them. Per size it
reports the bytes the codebook holds per key against 4 x (d_in + d_out) (float32 key and value), the peak resident
memory of the process, the search time for 1 and 16 queries against the plain exact search over every key
(``torch.cdist`` without the matrix-product shortcut: the baseline, timed in the same process, alternating) and
the time of one ADD.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from statistics import median

import torch

from grace_peft.atomic import atomic_file
from grace_peft.codebook import Codebook


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--sizes", default="10000,100000", help="codebook sizes (default 10000,100000)")
    parser.add_argument("--key-dim", type=int, default=1536,
                        help="key width (default 1536: SmolLM2's MLP projection input, the default key)")
    parser.add_argument("--value-dim", type=int, default=576, help="value width (default 576: SmolLM2's hidden)")
    parser.add_argument("--repeats", type=int, default=20, help="timed searches per setting (default 20)")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/codebook_scale.json"))
    return parser.parse_args(argv)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def filled_codebook(size: int, key_dim: int, value_dim: int, generator: torch.Generator) -> Codebook:
    """``size`` entries: unit keys in clusters of four near-duplicates, one-token labels, radius 0.05."""
    centers = torch.nn.functional.normalize(torch.randn(size // 4 + 1, key_dim, generator=generator), dim=-1)
    keys = centers.repeat_interleave(4, 0)[:size]
    keys = torch.nn.functional.normalize(keys + 0.01 * torch.randn(size, key_dim, generator=generator), dim=-1)
    codebook = Codebook(key_dim, value_dim, eps_init=0.05)
    codebook.load_state_dict({
        "keys": keys, "values": torch.randn(size, value_dim, generator=generator),
        "radii": torch.full((size,), 0.05), "label_tokens": torch.arange(size) % 1000,
        "label_lengths": torch.ones(size, dtype=torch.long), "edit_ids": torch.arange(size),
        "next_edit_id": torch.tensor(size),
    })
    return codebook


def exact_search(codebook: Codebook, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline: the exact distance to every key."""
    distance, index = torch.cdist(queries, codebook.keys, compute_mode="donot_use_mm_for_euclid_dist").min(-1)
    return index, distance


def timed(function, repeats: int) -> float:
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        timings.append(time.perf_counter() - started)
    return median(timings)


def measure(size: int, args: argparse.Namespace) -> dict:
    generator = torch.Generator().manual_seed(size)
    before = peak_rss_mib()
    codebook = filled_codebook(size, args.key_dim, args.value_dim, generator)
    held = sum(tensor.numel() * tensor.element_size() for tensor in (*codebook.buffers(), *codebook.parameters()))
    picks = torch.randint(size, (16,), generator=generator)
    queries = torch.nn.functional.normalize(codebook.keys[picks] + 0.005 * torch.randn(16, args.key_dim,
                                                                                        generator=generator), dim=-1)
    row = {"size": size, "bytes_per_key": held / size,
           "float32_key_and_value_bytes": 4 * (args.key_dim + args.value_dim)}
    for count in (1, 16):
        batch = queries[:count]
        ours, exact = codebook.nearest(batch), exact_search(codebook, batch)
        assert torch.equal(ours[0], exact[0]) and torch.equal(ours[1], exact[1]), "the search is not exact"
        screened_s, exact_s = [], []
        for _ in range(args.repeats):  # alternate, so that machine drift hits both alike
            screened_s.append(timed(lambda batch=batch: codebook.nearest(batch), 1))
            exact_s.append(timed(lambda batch=batch: exact_search(codebook, batch), 1))
        row[f"search_{count}_ms"] = 1e3 * median(screened_s)
        row[f"exact_{count}_ms"] = 1e3 * median(exact_s)
    far = torch.nn.functional.normalize(torch.randn(args.key_dim, generator=generator), dim=-1)
    started = time.perf_counter()
    codebook.update(far, torch.tensor([7]), edit_id=size, init_value=torch.zeros(args.value_dim))
    row["add_ms"] = 1e3 * (time.perf_counter() - started)
    row["peak_rss_mib"] = peak_rss_mib()
    row["peak_rss_growth_mib"] = row["peak_rss_mib"] - before
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = [measure(int(size), args) for size in args.sizes.split(",")]
    print(f"key width {args.key_dim}, value width {args.value_dim}, {torch.get_num_threads()} threads; "
          f"4 x (d_in + d_out) = {4 * (args.key_dim + args.value_dim)} bytes")
    print(f"{'keys':>8}{'bytes/key':>11}{'search 1 / 16 q (ms)':>22}{'exact 1 / 16 q (ms)':>22}{'speed-up 16':>13}"
          f"{'one ADD (ms)':>14}{'peak RSS (MiB)':>16}")
    for row in rows:
        print(f"{row['size']:>8}{row['bytes_per_key']:>11.0f}"
              f"{row['search_1_ms']:>11.2f} /{row['search_16_ms']:>8.2f}"
              f"{row['exact_1_ms']:>13.2f} /{row['exact_16_ms']:>7.2f}"
              f"{row['exact_16_ms'] / row['search_16_ms']:>12.1f}x{row['add_ms']:>14.1f}{row['peak_rss_mib']:>16.0f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(args.output) as file:
        json.dump({"key_dim": args.key_dim, "value_dim": args.value_dim, "torch_threads": torch.get_num_threads(),
                   "rows": rows}, file, indent=1)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
