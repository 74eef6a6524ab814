"""Write a synthetic prompts Parquet file of N rows, streaming (10M rows in bounded memory).

    python bench/make_prompts.py OUT.parquet --rows 1000000 [--row-group 50000]
"""

from __future__ import annotations

import argparse

import pyarrow as pa
import pyarrow.parquet as pq

TOPICS = ["the ocean", "Ray actors", "Parquet files", "rate limits", "a haiku", "Vietnamese pho",
          "GPU interconnects", "budget control", "the moon", "sourdough bread"]
TEMPLATES = ["Write one sentence about {t}.", "Explain {t} to a child in two sentences.",
             "List three facts about {t}.", "Give a short title for an essay on {t}."]


def batch(start: int, n: int) -> pa.RecordBatch:
    ids = [f"p{i:09d}" for i in range(start, start + n)]
    topics = [TOPICS[i % len(TOPICS)] for i in range(start, start + n)]
    prompts = [TEMPLATES[(i // len(TOPICS)) % len(TEMPLATES)].format(t=topics[k])
               for k, i in enumerate(range(start, start + n))]
    return pa.record_batch({"id": ids, "prompt": prompts, "topic": topics})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out")
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--row-group", type=int, default=50_000)
    args = ap.parse_args()
    first = batch(0, 1)
    with pq.ParquetWriter(args.out, first.schema) as w:
        for start in range(0, args.rows, args.row_group):
            w.write_batch(batch(start, min(args.row_group, args.rows - start)),
                          row_group_size=args.row_group)


if __name__ == "__main__":
    main()
