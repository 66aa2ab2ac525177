"""
OpenWebText (the corpus of the Sophia paper and nanoGPT) as GPT-2 tokens.

    python data/openwebtext/prepare.py --num-proc 16   # -> data/openwebtext/{train.bin, val.bin, meta.json}

The split is nanoGPT's: train_test_split(test_size=0.0005, seed=2357, shuffle=True) of the 8,013,769 documents,
"test" renamed "val". Each document becomes its GPT-2 ids followed by <|endoftext|>; the ids go to uint16 memmaps
a batch of documents at a time, under temporary names renamed when complete, and meta.json is written last.

Where the text comes from. `load_dataset("openwebtext")` no longer works: datasets >= 4 refuses dataset scripts,
and the main branch of Skylion007/openwebtext shipped one (openwebtext.py) with tar archives. The default below
reads the data-only parquet upload of the full corpus that the dataset's owner made on the hub (93 shards, about
270 MB each, on a pull-request ref of Skylion007/openwebtext), pinned to its commit so that the rows, and therefore
the split, never change underneath us. It goes through datasets' own "parquet" loader, so no script is involved.
Other sources: `--dataset Skylion007/openwebtext` once its main branch is data-only; a local directory of .parquet
or .jsonl files with a `text` column; NOT the automatic refs/convert/parquet export, which for a corpus this
large may hold only its first few GB. Whether the default's row order equals the one nanoGPT's script produced
(and so whether the documents in val are exactly nanoGPT's) could not be checked without network access.

Expected result: nanoGPT reports 9,035,582,198 train tokens (train.bin ~17 GB) and 4,434,897 val tokens (val.bin
~8.5 MB) for this split and tokenizer; the script prints how its counts compare, and equal val counts are a good
sign that the split selected the same documents. Disk, estimated: ~25 GB of parquet downloads plus roughly 60 GB of
datasets cache (the text as arrow, ~40 GB, and the tokenized ids, ~18 GB), besides the .bin files.
"""

import argparse
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable for `data.common`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from data.common import SPLIT_SEED, SPLIT_VAL_FRACTION, print_split_counts, split_and_write, write_meta

DEFAULT_OUT_DIR = Path(__file__).resolve().parent
DEFAULT_REVISION = "963532436460638ab26b7633e23776e6c7e37d59"  # Skylion007/openwebtext: the full parquet upload
DEFAULT_DATASET = f"hf://datasets/Skylion007/openwebtext@{DEFAULT_REVISION}/data/train-*-of-00093.parquet"
DOWNLOAD_HINT = (f"Could not read {DEFAULT_DATASET}. Without hub access here, download it on a machine that has it:\n"
                 f"  hf download Skylion007/openwebtext --repo-type dataset --revision {DEFAULT_REVISION} "
                 f"--include 'data/*' --local-dir DIR\nthen copy DIR over and pass --dataset DIR/data")
OPENWEBTEXT_DOCUMENTS = 8_013_769  # the corpus as released
NANOGPT_TOKENS = {"train": 9_035_582_198, "val": 4_434_897}  # nanoGPT's counts for this split
VAL_FRACTION, SEED = SPLIT_VAL_FRACTION, SPLIT_SEED  # nanoGPT's split


def prepare(out_dir=None, dataset=DEFAULT_DATASET, num_proc=max(1, (os.cpu_count() or 2) // 2),
            val_fraction=VAL_FRACTION, seed=SEED):
    """Tokenize OpenWebText into out_dir (default: this folder); skip when already prepared. Returns out_dir."""
    out_dir = Path(out_dir) if out_dir is not None else DEFAULT_OUT_DIR
    t0 = time.time()
    done = split_and_write("openwebtext", out_dir, dataset, num_proc, val_fraction, seed, DEFAULT_DATASET,
                           DOWNLOAD_HINT, OPENWEBTEXT_DOCUMENTS)
    if done is None:
        return out_dir
    documents, counts, meta = done
    write_meta(out_dir, meta)
    print_split_counts(out_dir, counts, time.time() - t0)
    if val_fraction == VAL_FRACTION and seed == SEED and len(documents) == OPENWEBTEXT_DOCUMENTS:
        same = all(counts[split]["tokens"] == NANOGPT_TOKENS[split] for split in counts)
        print(f"nanoGPT's split has train {NANOGPT_TOKENS['train']:,} / val {NANOGPT_TOKENS['val']:,} tokens: "
              + ("identical" if same else "different (another row order or tokenizer version)"))
    return out_dir


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=DEFAULT_DATASET,
                        help="hub name, hf:// parquet glob, or a local .jsonl/.parquet/.txt file or directory")
    parser.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR))
    parser.add_argument("--num-proc", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="processes for loading and tokenizing")
    parser.add_argument("--val-fraction", type=float, default=VAL_FRACTION)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    prepare(args.out_dir, args.dataset, args.num_proc, args.val_fraction, args.seed)
