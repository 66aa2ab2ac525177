"""
The training data as train.py reads it: a stream of non-overlapping sequences, reshuffled each epoch and addressed
by position. Position p of the stream is a pure function of (seed, p), so the sampler's whole state is one counter
per stream, and any world size sees the same batches.
"""

import importlib
import io
from contextlib import redirect_stderr
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from config_schema import ConfigError
from data.common import open_split, read_meta

REPO_DIR = Path(__file__).resolve().parents[1]


class SequenceStream:
    """Sequences of seq_len + 1 tokens (inputs and shifted targets) from one split."""

    def __init__(self, tokens, seq_len, seed):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        # one token of slack for the shifted targets and one sequence for the per-epoch shift
        self.num_seqs = (len(tokens) - 1) // seq_len - 1
        if self.num_seqs < 1:
            raise ConfigError(f"the split holds {len(tokens):,} tokens, fewer than two sequences of "
                              f"model.block_size={seq_len}: lower model.block_size or use a larger corpus")
        self._epoch, self._order, self._shift = None, None, 0

    def _starts(self, positions):
        starts = np.empty(len(positions), dtype=np.int64)
        for i, pos in enumerate(positions):
            epoch, index = divmod(int(pos), self.num_seqs)
            if epoch != self._epoch:  # a fresh order and sequence boundaries every epoch
                g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                self._order = torch.randperm(self.num_seqs, generator=g).numpy()
                self._shift = int(torch.randint(self.seq_len, (1,), generator=g))
                self._epoch = epoch
            starts[i] = self._shift + self._order[index] * self.seq_len
        return starts

    def batch(self, first, count, device):
        """Sequences first..first+count-1 of the stream: x, y of shape (count, seq_len), int64."""
        starts = self._starts(range(first, first + count))
        rows = np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts]).astype(np.int64)
        xy = torch.from_numpy(rows)
        if device.type == "cuda":
            xy = xy.pin_memory().to(device, non_blocking=True)
        return xy[:, :-1], xy[:, 1:]


def data_dir_of(cfg):
    """data.dir, a relative one against the working directory (as out_dir); null: <repo>/data/<data.name>."""
    return Path(cfg.data.dir).absolute() if cfg.data.dir else REPO_DIR / "data" / cfg.data.name


# the corpora that ship with the repo: small enough for train.py to prepare them on first use
EMBEDDED = ("shakespeare", "shakespeare_char")


def load_data(cfg, is_master, distributed):
    """The train and val tokens (memory-mapped). The embedded corpora prepare themselves on first use (rank 0,
    while the other ranks wait: every rank takes the same path, so the barrier always matches)."""
    data_dir = data_dir_of(cfg)
    if cfg.data.dir and not data_dir.is_dir():
        raise ConfigError(f"data.dir={cfg.data.dir} does not exist: fix the path, or prepare the data there "
                          f"with python data/{cfg.data.name}/prepare.py --out-dir {data_dir}")
    embedded = not cfg.data.dir and cfg.data.name in EMBEDDED
    if embedded and is_master and not (data_dir / "meta.json").exists():
        print(f"preparing the {cfg.data.name} corpus in {data_dir} (once, a few seconds)")
        prepare = importlib.import_module(f"data.{cfg.data.name}.prepare").prepare
        with redirect_stderr(io.StringIO()):  # its progress bars: noise for so small a job
            prepare(out_dir=data_dir)
    if embedded and distributed:
        dist.barrier()
    try:
        return open_split(data_dir, "train"), open_split(data_dir, "val")
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None
    except OSError as e:  # unreadable: permissions, a broken mount
        raise ConfigError(f"cannot read the data in {data_dir} ({e.strerror}: {e.filename}): fix its permissions, "
                          f"or set data.dir= to a readable copy") from None


@dataclass
class Streams:
    train: SequenceStream
    hessian: SequenceStream  # fresh training data for the Hessian estimate
    val: SequenceStream      # the same validation sequences for every run


def load_streams(cfg, env, plan):
    train_tokens, val_tokens = load_data(cfg, env.is_master, env.distributed)
    data_vocab_size = read_meta(data_dir_of(cfg)).get("vocab_size")  # None for data whose meta.json does not say
    if data_vocab_size is not None and cfg.model.vocab_size < data_vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the {data_vocab_size} token ids "
                          f"of the data in {data_dir_of(cfg)}: set model.vocab_size >= {data_vocab_size}")
    seq_len = cfg.model.block_size
    streams = Streams(train=SequenceStream(train_tokens, seq_len, cfg.seed),
                      hessian=SequenceStream(train_tokens, seq_len, cfg.seed + 1),
                      val=SequenceStream(val_tokens, seq_len, 0))
    if cfg.eval_steps * cfg.micro_batch_size > streams.val.num_seqs:
        raise ConfigError(f"eval_steps={cfg.eval_steps} x micro_batch_size={cfg.micro_batch_size} sequences exceed the "
                          f"{streams.val.num_seqs:,} validation sequences of model.block_size={seq_len} (each "
                          f"evaluation would reuse some): set eval_steps <= {streams.val.num_seqs // cfg.micro_batch_size}")
    if plan.hess_batch > streams.train.num_seqs:
        raise ConfigError(f"optim.hess_batch_size={plan.hess_batch} sequences exceed the {streams.train.num_seqs:,} "
                          f"training sequences: lower optim.hess_batch_size")
    return streams
