"""
Sample text from a trained run's checkpoint (nanoGPT's sample.py, with key=value overrides).

    python scripts/sample.py                                    # out/shakespeare_sophiag, what `python train.py` writes
    python scripts/sample.py out_dir=out/shakespeare_sophiag start="ROMEO:" num_samples=5 max_new_tokens=100
    python scripts/sample.py out_dir=RUN start=FILE:prompt.txt temperature=0.9 top_k=null seed=7

`start` is taken verbatim (no YAML parsing, so `start=ROMEO:` stays text); `FILE:path` reads the prompt
from a file. The same seed gives the same text on the same device. train.py and other code can call
sample_text() / GPT.generate() directly.
"""

import pickle
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

REPO_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR))  # `python scripts/x.py` puts scripts/, not the repo root, on the path

from checkpoint import CONVERTER, checkpoint_path
from data.common import tokenizer_for
from data.stream import data_dir_of
from model import GPT, GPTConfig

DEFAULTS = {
    "out_dir": str(REPO_DIR / "out" / "shakespeare_sophiag"),
    "start": "\n",
    "num_samples": 3,
    "max_new_tokens": 200,
    "temperature": 0.8,
    "top_k": 200,
    "seed": 1337,
    "device": "auto",
}
# each key's line in --help
HELP = {
    "out_dir": "the run folder, holding ckpt.pt",
    "start": "the prompt, or FILE:path to read it from a file",
    "num_samples": "texts to sample",
    "max_new_tokens": "tokens sampled after the prompt, per text",
    "temperature": "< 1 sharper, > 1 more random; 0 = always the most likely token",
    "top_k": "sample among the k most likely tokens only; null = all",
    "seed": "the same seed gives the same text on the same device",
    "device": "auto (cuda when available) | cpu | cuda | cuda:N",
}
TEXT_KEYS = ("out_dir", "start", "device")


class SampleError(Exception):
    """Bad input: main() prints the message on one line and exits with status 2."""


# -----------------------------------------------------------------------------------------------------
# Generation (the end-of-run sample in train.py calls GPT.generate directly)

@torch.no_grad()
def encode_prompt(tokenizer, start, block_size):
    """The prompt's token ids, at most block_size of them (the last ones, with a note on stderr).
    An empty prompt becomes the tokenizer's start of a text (GPT-2: <|endoftext|>; characters: a newline)."""
    try:
        ids = tokenizer.encode(start) or tokenizer.start_ids
    except ValueError as e:  # a character the data's vocabulary lacks
        raise SampleError(f"start={start!r}: {e}") from None
    if len(ids) > block_size:
        print(f"note: the prompt has {len(ids)} tokens, more than the model's block_size={block_size}: "
              f"keeping its last {block_size}", file=sys.stderr)
        ids = ids[-block_size:]
    return ids


def sample_text(model, tokenizer, start="\n", num_samples=1, max_new_tokens=200, temperature=0.8, top_k=200,
                seed=1337, device=None):
    """num_samples texts, each the (cropped) prompt `start` followed by max_new_tokens sampled tokens.
    model: our GPT, not wrapped in DDP (eval mode while sampling, its mode restored after);
    tokenizer: the data's, data.common.tokenizer_for(data_dir) (GPT-2 BPE or characters).
    Deterministic for a seed on a given device; the global RNG state is not touched."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout
    generator = torch.Generator(device=device).manual_seed(seed)
    prompt = torch.tensor(encode_prompt(tokenizer, start, model.config.block_size), device=device)[None]  # (1, T)
    texts = []
    for _ in range(num_samples):  # one at a time: logits are (T, V) per sequence, large for GPT-2's vocab
        ids = model.generate(prompt, max_new_tokens, temperature, top_k, generator, vocab_size=tokenizer.vocab_size)
        texts.append(tokenizer.decode(ids[0].tolist()))
    model.train(was_training)
    return texts


def run_tokenizer(ckpt, model):
    """The tokenizer of the data the run trained on (its meta.json); GPT-2's for a checkpoint that names no data."""
    data = ckpt["config"].get("data")
    data_dir = data_dir_of(OmegaConf.create({"data": data})) if data else None
    tokenizer = tokenizer_for(data_dir)
    if tokenizer.vocab_size > model.config.vocab_size:  # e.g. a character-level run whose meta.json is gone
        fix = f"prepare its data again: python data/{data['name']}/prepare.py" if data else "train it with train.py"
        where = f"{data_dir} holds no meta.json naming another tokenizer" if data else "the checkpoint names no data"
        raise SampleError(f"the run's model has vocab_size={model.config.vocab_size}, fewer ids than the "
                          f"{tokenizer.name} tokenizer's {tokenizer.vocab_size}, and {where}: {fix}")
    return tokenizer


# -----------------------------------------------------------------------------------------------------
# Loading a run, shared with scripts/export_hf.py

def load_run(out_dir, device="cpu", usage="set out_dir= to a run folder that holds ckpt.pt"):
    """(our GPT with the checkpoint's weights, in eval mode, the checkpoint dict) from out_dir/ckpt.pt.
    usage: how to name a run folder on the caller's command line, for the error message."""
    out_dir = Path(out_dir)
    ckpt_path, sharded = checkpoint_path(out_dir, "ddp"), checkpoint_path(out_dir, "fsdp")
    if not ckpt_path.is_file() and sharded.is_dir():  # a parallel=fsdp run
        raise SampleError(f"{out_dir} holds a sharded checkpoint ({sharded.name}): convert it to {ckpt_path.name} "
                          f"first with python {CONVERTER} {out_dir}")
    if not ckpt_path.is_file():
        raise SampleError(f"{out_dir} holds no checkpoint (no {ckpt_path.name}): train one there first with "
                          f"`python train.py out_dir={out_dir}`, or {usage}")
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
        model_args = {k: v for k, v in ckpt["config"]["model"].items() if k != "name"}
        model = GPT(GPTConfig(**model_args))
        model.load_state_dict(ckpt["model"])
    # truncated or corrupt file, not a train.py checkpoint, or one from an incompatible model.py
    except (OSError, EOFError, RuntimeError, KeyError, TypeError, ValueError, pickle.UnpicklingError) as e:
        raise SampleError(f"cannot load {ckpt_path} as a train.py checkpoint ({type(e).__name__}: {e})") from None
    return model.to(device).eval(), ckpt


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise SampleError(f"device={name} but CUDA is not available: use device=auto or device=cpu")
    return torch.device(name)


def read_prompt(start):
    if not start.startswith("FILE:"):
        return start
    path = Path(start[len("FILE:"):]).expanduser()
    if not path.is_file():
        raise SampleError(f"start={start}: no such file {path}")
    return path.read_text(encoding="utf-8")


# -----------------------------------------------------------------------------------------------------
# Command line

def usage():
    """--help: the module's docstring, then every key with its default."""
    rows = [(key, repr(value) if key == "start" else str(value), HELP[key]) for key, value in DEFAULTS.items()]
    width = max(len(f"{key}={value}") for key, value, _ in rows)
    return "\n".join([__doc__.strip(), "", "Keys (default):"] +
                     [f"  {f'{key}={value}'.ljust(width)}  {text}" for key, value, text in rows])


def parse_args(argv):
    """key=value overrides on top of DEFAULTS: numbers through OmegaConf's parsing, the text keys verbatim."""
    for arg in argv:
        if "=" not in arg:
            raise SampleError(f"expected key=value, got {arg!r} (e.g. out_dir={arg})")
    raw = dict(arg.split("=", 1) for arg in argv)
    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        raise SampleError(f"unknown key(s) {', '.join(unknown)}; known: {', '.join(DEFAULTS)}")
    # YAML would turn `start=ROMEO:` into a mapping and `start=` into null: text keys stay text
    numbers = OmegaConf.from_cli([f"{k}={v}" for k, v in raw.items() if k not in TEXT_KEYS])
    args = {**DEFAULTS, **OmegaConf.to_container(numbers), **{k: v for k, v in raw.items() if k in TEXT_KEYS}}
    if not args["out_dir"]:
        raise SampleError("out_dir= is empty: pass the run folder that holds ckpt.pt, e.g. out_dir=out/shakespeare_sophiag")
    for key in ("num_samples", "max_new_tokens", "seed"):
        if not isinstance(args[key], int) or args[key] < 0:
            raise SampleError(f"{key}={args[key]} must be a whole number >= 0")
    if not isinstance(args["temperature"], (int, float)) or args["temperature"] < 0:
        raise SampleError(f"temperature={args['temperature']} must be a number >= 0 (0 = greedy)")
    if args["top_k"] is not None and (not isinstance(args["top_k"], int) or args["top_k"] < 1):
        raise SampleError(f"top_k={args['top_k']} must be a whole number >= 1, or null for no limit")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in argv):
        print(usage())
        return
    try:
        args = parse_args(argv)
        device = pick_device(args["device"])
        start = read_prompt(args["start"])
        model, ckpt = load_run(args["out_dir"], device)
        tokenizer = run_tokenizer(ckpt, model)
        texts = sample_text(model, tokenizer, start, args["num_samples"], args["max_new_tokens"],
                            args["temperature"], args["top_k"], args["seed"], device)
    except SampleError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for text in texts:
        print(text)
        print("---------------")


if __name__ == "__main__":
    main()
