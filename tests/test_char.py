"""The character-level proxy: data/shakespeare_char/prepare.py, the vocabulary check, train.py's end-of-run sample,
scripts/sample.py and scripts/export_hf.py on a character-level run.

References: the package's text files read directly (the corpus, its characters, the held-out plays), and the
checkpoint's model sampled by hand and decoded with the vocabulary as meta.json lists it."""

import json
import re

import numpy as np
import pytest
import torch

from conftest import run_train, write_synthetic_tokens
from data.common import open_split, read_meta
from data.shakespeare import prepare as shakespeare_prepare
from data.shakespeare_char import prepare as char_prepare
from scripts import export_hf, sample


@pytest.fixture(scope="module")
def char_data(tmp_path_factory):
    return char_prepare.prepare(tmp_path_factory.mktemp("shakespeare_char"))


def decode(itos, ids):
    return "".join(itos[i] for i in np.asarray(ids).tolist())


def test_prepare_writes_the_corpus_as_characters_with_the_two_plays_held_out(char_data):
    files = shakespeare_prepare.package_text_files()
    texts = [f.read_text(encoding="utf-8") for f in files]
    meta = read_meta(char_data)
    assert meta["tokenizer"] == "char" and meta["dtype"] == "uint16"
    assert meta["itos"] == sorted(set("".join(texts)))  # every character of the corpus, once, sorted
    assert meta["vocab_size"] == len(meta["itos"]) and 80 <= meta["vocab_size"] <= 90
    assert meta["val_document_names"] == ["two_gentlemen_of_verona_gut.txt", "winters_tale_gut.txt"]
    assert decode(meta["itos"], open_split(char_data, "train")) == "".join(texts[:-2])
    assert decode(meta["itos"], open_split(char_data, "val")) == "".join(texts[-2:])
    assert meta["splits"]["val"]["tokens"] == sum(len(t) for t in texts[-2:])


def test_train_prepares_the_corpus_on_first_use(char_data, tmp_path, monkeypatch, capsys):
    from omegaconf import OmegaConf

    from data import stream
    monkeypatch.setattr(stream, "REPO_DIR", tmp_path)  # data.dir=null -> tmp_path/data/shakespeare_char
    cfg = OmegaConf.create({"data": {"name": "shakespeare_char", "dir": None}})
    train, val = stream.load_data(cfg, is_master=True, distributed=False)
    assert "preparing the shakespeare_char corpus" in capsys.readouterr().out
    assert read_meta(tmp_path / "data" / "shakespeare_char")["itos"] == read_meta(char_data)["itos"]
    assert np.array_equal(train, open_split(char_data, "train")) and np.array_equal(val, open_split(char_data, "val"))


def test_second_prepare_skips(char_data, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in char_data.iterdir()}
    char_prepare.prepare(char_data)
    assert "already prepared" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in char_data.iterdir()} == before


@pytest.mark.parametrize("data_vocab, model_vocab", [("char", 80), (50257, 50000)])
def test_vocab_size_below_the_datas_is_refused_in_one_line(char_data, tmp_path, data_vocab, model_vocab):
    if data_vocab == "char":
        data_dir, data_vocab = char_data, read_meta(char_data)["vocab_size"]
    else:  # BPE-sized data: its meta.json says 50257
        data_dir = write_synthetic_tokens(tmp_path / "bpe", vocab_size=data_vocab, train_tokens=5_000, val_tokens=2_000)
        meta = read_meta(data_dir)
        (data_dir / "meta.json").write_text(json.dumps({**meta, "vocab_size": data_vocab}))
    result = run_train([f"data.dir={data_dir}", f"model.vocab_size={model_vocab}", "max_steps=2"],
                       tmp_path / "run", check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"model.vocab_size={model_vocab} is smaller than the {data_vocab}" in result.stderr
    assert not (tmp_path / "run" / "ckpt.pt").exists()


@pytest.fixture(scope="module")
def char_run(char_data, tmp_path_factory):
    """A tiny character-level run through train.py: (run folder, its stdout)."""
    out_dir = tmp_path_factory.mktemp("char_run")
    result = run_train(["data=shakespeare_char", f"data.dir={char_data}", "model.vocab_size=128", "max_steps=4"],
                       out_dir)
    return out_dir, result.stdout


def reference_sample(run_dir, itos, prompt, max_new_tokens, seed, temperature=0.8, top_k=200):
    """The run's model sampled by hand: the prompt's ids from itos, generate(), decoded with itos."""
    model, _ = sample.load_run(run_dir)
    ids = torch.tensor([[itos.index(ch) for ch in prompt]])
    out = model.generate(ids, max_new_tokens, temperature, top_k, torch.Generator().manual_seed(seed),
                         vocab_size=len(itos))
    return decode(itos, out[0])


def test_char_run_ends_with_a_decoded_sample(char_run, char_data):
    run_dir, stdout = char_run
    match = re.search(r"a sample \(more: [^\n]*\):\n(.*)\n\n", stdout, re.S)
    assert match, stdout[-2000:]
    # train.py samples 64 characters after a newline with the run's seed (1337)
    expected = reference_sample(run_dir, read_meta(char_data)["itos"], "\n", 64, seed=1337)
    assert match.group(1) == expected[1:].strip()


def test_sample_script_decodes_characters(char_run, char_data, capsys):
    run_dir, _ = char_run
    sample.main([f"out_dir={run_dir}", "start=ROMEO:", "num_samples=1", "max_new_tokens=30", "seed=5"])
    out = capsys.readouterr().out
    expected = reference_sample(run_dir, read_meta(char_data)["itos"], "ROMEO:", 30, seed=5)
    assert out == expected + "\n---------------\n"


def test_sample_script_refuses_a_character_outside_the_vocabulary(char_run, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sample.main([f"out_dir={char_run[0]}", "start=naïve"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "'ï'" in err


def test_export_refuses_a_character_level_run(char_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_hf.main([str(char_run[0]), "--out", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert "GPT-2 tokenizer does not apply" in err
    assert not (tmp_path / "hf").exists()
