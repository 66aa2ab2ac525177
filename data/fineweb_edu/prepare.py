"""
FineWeb-Edu (the corpus of build-nanogpt, llm.c and modded-nanogpt) as GPT-2 tokens, beside OpenWebText.

    python data/fineweb_edu/prepare.py --num-proc 16   # -> data/fineweb_edu/{train.bin, val.bin, meta.json}
    python train.py config=gpt2_small_sophiag data=fineweb_edu

The default source is the `sample-10BT` subset of HuggingFaceFW/fineweb-edu (its parquet files under
sample/10BT/), pinned to a commit so that the rows, and therefore the split, never change underneath us; read
through datasets' own "parquet" loader, no script. Any local .parquet / .jsonl file or directory with a `text`
column works too (--dataset PATH); FineWeb-Edu's other columns (id, dump, url, file_path, language,
language_score, token_count, score, int_score) are read and dropped.

Tokenized as OpenWebText is (data/openwebtext/prepare.py, through the same code in data/common.py): each document
its GPT-2 ids followed by <|endoftext|>, uint16 bins written under temporary names, meta.json last. The subset has
no validation split of its own, so it gets OpenWebText's: train_test_split(test_size=0.0005, seed=2357,
shuffle=True), the same documents in val on every machine for a given source.

Token counts. sample-10BT is, as its name says, a random sample of about 10B tokens; the dataset card counts
FineWeb-Edu's tokens with the GPT-2 tokenizer (1.3T for the whole set) and lists the subset's files as sample/10BT/*.
Its `token_count` column holds each document's GPT-2 count, and the script prints how the tokens it wrote (less one
<|endoftext|> per document) compare with that column's sum. Expected, not measured here: about 10B train tokens
plus one <|endoftext|> per document, and about 0.05% of that (~5M tokens) in val. The document count (9,672,101
rows in 14 parquet files, 000_00000.parquet to 013_00000.parquet, 28.5 GB) and the pinned commit come from a
third-party provenance record of the subset, not from the card; neither could be checked without hub access.
Disk, estimated: the parquet downloads, about twice that in datasets' cache (the text as arrow, then the
tokenized ids), and ~20 GB of bins.
"""

import argparse
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable for `data.common`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from data.common import EOT_TOKEN, SPLIT_SEED, SPLIT_VAL_FRACTION, print_split_counts, split_and_write, write_meta

DEFAULT_OUT_DIR = Path(__file__).resolve().parent
DEFAULT_REVISION = "87f09149ef4734204d70ed1d046ddc9ca3f2b8f9"  # HuggingFaceFW/fineweb-edu with sample/10BT/
DEFAULT_DATASET = f"hf://datasets/HuggingFaceFW/fineweb-edu@{DEFAULT_REVISION}/sample/10BT/*.parquet"
DOWNLOAD_HINT = (f"Could not read {DEFAULT_DATASET}. Without hub access here, download it on a machine that has it:\n"
                 f"  hf download HuggingFaceFW/fineweb-edu --repo-type dataset --revision {DEFAULT_REVISION} "
                 f"--include 'sample/10BT/*' --local-dir DIR\nthen copy DIR over and pass --dataset DIR/sample/10BT")
SAMPLE_10BT_DOCUMENTS = 9_672_101  # rows of sample/10BT at DEFAULT_REVISION (a third-party record; see above)


def prepare(out_dir=None, dataset=DEFAULT_DATASET, num_proc=max(1, (os.cpu_count() or 2) // 2),
            val_fraction=SPLIT_VAL_FRACTION, seed=SPLIT_SEED):
    """Tokenize FineWeb-Edu into out_dir (default: this folder); skip when already prepared. Returns out_dir."""
    out_dir = Path(out_dir) if out_dir is not None else DEFAULT_OUT_DIR
    t0 = time.time()
    done = split_and_write("fineweb_edu", out_dir, dataset, num_proc, val_fraction, seed, DEFAULT_DATASET,
                           DOWNLOAD_HINT, SAMPLE_10BT_DOCUMENTS)
    if done is None:
        return out_dir
    documents, counts, meta = done
    if "token_count" in documents.column_names:  # FineWeb's own GPT-2 count of each document
        listed = int(documents.with_format("arrow")["token_count"].to_numpy().sum())
        written = sum(c["tokens"] - c["documents"] for c in counts.values())  # less one <|endoftext|> per document
        meta["token_count_column_sum"] = listed
        print(f"the token_count column sums to {listed:,}; written without the <|endoftext|> ({EOT_TOKEN}) after "
              f"each document: {written:,} (" + ("identical" if listed == written else "different") + ")")
    write_meta(out_dir, meta)
    print_split_counts(out_dir, counts, time.time() - t0)
    return out_dir


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=DEFAULT_DATASET,
                        help="hub name, hf:// parquet glob, or a local .jsonl/.parquet file or directory")
    parser.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR))
    parser.add_argument("--num-proc", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="processes for loading and tokenizing")
    parser.add_argument("--val-fraction", type=float, default=SPLIT_VAL_FRACTION)
    parser.add_argument("--seed", type=int, default=SPLIT_SEED)
    args = parser.parse_args()
    prepare(args.out_dir, args.dataset, args.num_proc, args.val_fraction, args.seed)
