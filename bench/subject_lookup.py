"""What the subject lookup costs per training step, as the number of listed subjects grows.

    python bench/subject_lookup.py [--subjects 20 1000 4800] [--batch 16] [--repeats 5]

For each count N, `configs/demo.yaml` with subject routing over the first N people of the 4,800-person synthetic
corpus (1,024 chapters of 8 slots: N / 1,024 people per chapter beyond 1,024), on one batch of packed documents
about those people: the time of the lookup alone (`SubjectIndex.chapters` on the batch's ids) and of a whole
training step (forward + backward, which includes the lookup), median of --repeats, side by side. The lookup
hashes each window of ids once per distinct subject length, so its cost grows with the number of lengths, not
with the number of subjects.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from memory_transformer import build_model, load_config
from memory_transformer.data import build_data


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subjects", type=int, nargs="+", default=[20, 1000, 4800])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"{'subjects':>9} {'lookup ms':>10} {'step ms':>9} {'lookup / step':>14}")
    for n in args.subjects:
        cfg = load_config("configs/demo.yaml", ["data.num_people=4800", f"data.people=[0,{n}]",
                                                "memory.num_tokens=8192", "memory.num_chapters=1024"])
        model = build_model(cfg).train()
        batch = build_data(cfg, model.tokenizer).train_examples(0)
        ids = batch["input_ids"][: args.batch]
        index = model.subjects.index

        def step():
            model.zero_grad(set_to_none=True)
            model(ids, labels=ids).loss.backward()

        lookup = median_ms(lambda: index.chapters(ids), args.repeats)
        full = median_ms(step, args.repeats)
        print(f"{n:>9,} {lookup:>10.2f} {full:>9.1f} {lookup / full:>14.4f}")


if __name__ == "__main__":
    main()
