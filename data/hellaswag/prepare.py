"""
HellaSwag's validation set, the file eval.hellaswag= scores at every evaluation (hellaswag.py).

    python data/hellaswag/prepare.py            # -> data/hellaswag/hellaswag_val.jsonl (10,042 examples)
    python train.py config=gpt2_small_sophiag eval.hellaswag=data/hellaswag/hellaswag_val.jsonl

It downloads rowanz/hellaswag's data/hellaswag_val.jsonl, the file lm-eval-harness's hellaswag task is built from,
checks that every line is a HellaSwag example, and writes it under a temporary name renamed when complete. Without
network here: download the same URL elsewhere and copy the file over (then pass it as --source, or straight to
eval.hellaswag=).
"""

import argparse
import os
import shutil
import sys
import urllib.parse
import urllib.request
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from data.common import can_reach
from hellaswag import load_examples

DEFAULT_SOURCE = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
DEFAULT_OUT = Path(__file__).resolve().parent / "hellaswag_val.jsonl"
VAL_EXAMPLES = 10_042


def prepare(source=DEFAULT_SOURCE, out=DEFAULT_OUT):
    """Fetch (a URL) or copy (a path) the file to `out`, checked. Returns the number of examples. RuntimeError: the
    URL could not be read (the message says how to bring the file instead); ValueError: not HellaSwag's schema."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if "://" in source:
        host = urllib.parse.urlparse(source).hostname
        try:
            if not can_reach(host):  # a firewalled machine would otherwise wait for the socket's timeout
                raise OSError(f"{host} unreachable")
            with urllib.request.urlopen(source, timeout=60) as response, open(tmp, "wb") as f:
                shutil.copyfileobj(response, f)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"could not download {source} ({e}); with no network here, download that URL on a "
                               f"machine that has it and copy it to {out} (or pass it with --source FILE)") from None
    else:
        shutil.copyfile(source, tmp)
    try:
        count = len(load_examples(tmp, encode=lambda text: []))  # the schema, line by line; no tokenizer needed
    except ValueError:
        tmp.unlink()
        raise
    os.replace(tmp, out)
    return count


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=DEFAULT_SOURCE, help="URL or local path of hellaswag_val.jsonl")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="where to write it")
    args = parser.parse_args()
    try:
        count = prepare(args.source, args.out)
    except (RuntimeError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    note = "" if count == VAL_EXAMPLES else f" (HellaSwag's validation set has {VAL_EXAMPLES:,}: another file?)"
    print(f"wrote {args.out}: {count:,} examples{note}; use it with eval.hellaswag={args.out}")
