"""
HellaSwag in the training loop, scored as lm-eval-harness's `hellaswag` task scores it, so that the figure
logged during training equals what `lm_eval --model hf --tasks hellaswag` reports on the exported model.

    python train.py config=gpt2_small_sophiag eval.hellaswag=data/hellaswag/hellaswag_val.jsonl
    -> eval/hellaswag_acc, eval/hellaswag_acc_norm at every evaluation (metrics.jsonl, W&B)

The file is rowanz/hellaswag's hellaswag_val.jsonl (python data/hellaswag/prepare.py fetches it): one JSON
object per line with activity_label, ctx_a, ctx_b, endings (4 strings) and label (the correct ending's index).
What lm-eval does with an example, and so what this does:
  - context  = preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()), choices = preprocess(ending)
    (lm-eval's tasks/hellaswag/utils.py; capitalize() also lowercases the rest of ctx_b, as there);
  - each choice is scored as the continuation " " + choice of the context (the task's target delimiter):
    its tokens are those of the whole text after the context's tokens (lm-eval's _encode_pair), and the
    sequence keeps its last block_size + 1 tokens (lm-eval's left truncation to the model's length);
  - ll = the summed log-probability of the continuation's tokens, over GPT-2's 50,257 tokens (the exported
    model drops the rows that pad our embedding to 50,304, so the softmax here leaves them out too);
  - acc: argmax ll is the label; acc_norm: argmax ll / len(choice), the choice's length in characters (lm-eval's
    completion_len; its byte-normalized score is a separate metric, acc_bytes, that hellaswag does not report).
    Ties go to the first ending, as numpy's argmax.
A forward holds one or more examples, each as its endings' rows, padded on the right (a causal model's earlier
positions never see the padding), and at most as many tokens as a training micro-batch. The ranks each take a
contiguous slice of the examples and sum their counts.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

REQUIRED_KEYS = ("activity_label", "ctx_a", "ctx_b", "endings", "label")
DELIMITER = " "  # lm-eval's default target_delimiter, between the context and each choice


def preprocess(text):
    """lm-eval's hellaswag preprocess: WikiHow's bracketed artifacts out, " [title]" to a sentence break."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def query_and_choices(doc):
    """(context, choices) of one example, the strings lm-eval scores."""
    context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return preprocess(doc["activity_label"] + ": " + context), [preprocess(ending) for ending in doc["endings"]]


def encode_pair(encode, context, continuation):
    """(context ids, continuation ids) as lm-eval's _encode_pair splits them: trailing spaces of the context move to
    the continuation, the whole text is encoded once, and the continuation is what follows the context's tokens."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, context_ids = encode(context + continuation), encode(context)
    return context_ids, whole[len(context_ids):]


@dataclass
class Example:
    context: list[int]         # the context's token ids
    endings: list[list[int]]   # each choice's continuation token ids
    lengths: list[int]         # each choice's length in characters (acc_norm's divisor)
    label: int


def gpt2_encode(text):
    """GPT-2 BPE as the exported folder's Hugging Face tokenizer applies it: <|endoftext|> in a text is that token."""
    from data.common import get_gpt2_encoding
    return get_gpt2_encoding().encode(text, allowed_special="all")


def load_examples(path, limit=None, encode=gpt2_encode):
    """The first `limit` examples (None: all) of a HellaSwag .jsonl, tokenized. ValueError naming the line for a file
    that is not in HellaSwag's schema."""
    examples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if limit is not None and len(examples) >= limit:
                break
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path} line {number} is not JSON: give rowanz/hellaswag's hellaswag_val.jsonl "
                                 f"(python data/hellaswag/prepare.py)") from None
            missing = [key for key in REQUIRED_KEYS if not isinstance(doc, dict) or key not in doc]
            if missing:
                raise ValueError(f"{path} line {number} lacks {', '.join(missing)}: not HellaSwag's schema; give "
                                 f"rowanz/hellaswag's hellaswag_val.jsonl (python data/hellaswag/prepare.py)")
            endings = doc["endings"]
            if not isinstance(endings, list) or not endings or not all(isinstance(e, str) for e in endings) \
                    or not str(doc["label"]).isdigit() or int(doc["label"]) >= len(endings):
                raise ValueError(f"{path} line {number}: `endings` must be a list of strings and `label` the index of "
                                 f"the correct one (got label {doc['label']!r} for {len(endings)} endings)")
            context, choices = query_and_choices(doc)
            pairs = [encode_pair(encode, context, DELIMITER + choice) for choice in choices]
            examples.append(Example(context=pairs[0][0], endings=[ending for _, ending in pairs],
                                    lengths=[len(choice) for choice in choices], label=int(doc["label"])))
    if not examples:
        raise ValueError(f"{path} holds no examples: give rowanz/hellaswag's hellaswag_val.jsonl")
    return examples


def rows_of(example, block_size):
    """Each ending's row: (token ids, number of continuation tokens), the sequence context + ending cut on the left to
    its last block_size + 1 tokens (the inputs are all but the last)."""
    return [((example.context + ending)[-(block_size + 1):], len(ending)) for ending in example.endings]


def forward_batches(examples, block_size, max_tokens):
    """Consecutive examples grouped so that a forward's padded inputs (rows x longest row) hold at most max_tokens
    (at least one example per forward). Returns lists of examples."""
    batches, batch, rows, longest = [], [], 0, 0
    for example in examples:
        example_rows = rows_of(example, block_size)
        example_longest = max(len(ids) - 1 for ids, _ in example_rows)
        if batch and (rows + len(example_rows)) * max(longest, example_longest) > max_tokens:
            batches.append(batch)
            batch, rows, longest = [], 0, 0
        batch.append(example)
        rows, longest = rows + len(example_rows), max(longest, example_longest)
    if batch:
        batches.append(batch)
    return batches


def batch_tensors(examples, block_size, device):
    """A forward's inputs and targets, (R, L) each, R the examples' endings, L the longest input: inputs padded on
    the right with 0, targets -100 (ignored) except where the position predicts a continuation token."""
    rows = [row for example in examples for row in rows_of(example, block_size)]
    length = max(len(ids) - 1 for ids, _ in rows)
    inputs = torch.zeros((len(rows), length), dtype=torch.long)
    targets = torch.full((len(rows), length), -100, dtype=torch.long)
    for r, (ids, continuation) in enumerate(rows):
        inputs[r, :len(ids) - 1] = torch.tensor(ids[:-1])
        # position t predicts token t + 1: the continuation's last `continuation` tokens sit at positions
        # len(ids) - continuation .. len(ids) - 1, predicted one position earlier
        targets[r, len(ids) - 1 - continuation:len(ids) - 1] = torch.tensor(ids[len(ids) - continuation:])
    return inputs.to(device), targets.to(device)


@torch.no_grad()
def loglikelihoods(model, examples, block_size, vocab_size, max_tokens, autocast):
    """Each example's summed log-likelihood of every ending: a list of (n_endings,) float64 arrays. model: our GPT
    (logits for every position), in eval mode; vocab_size: the tokenizer's, the softmax's width."""
    device = next(model.parameters()).device
    result = []
    for batch in forward_batches(examples, block_size, max_tokens):
        inputs, targets = batch_tensors(batch, block_size, device)  # (R, L) each
        with autocast:
            logits, _ = model(inputs)  # (R, L, padded vocab)
        logits = logits[..., :vocab_size].float()
        nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none")
        ll = -nll.view(targets.shape).sum(dim=1).double().cpu().numpy()  # (R,): ignored positions add 0
        for example in batch:
            result.append(ll[:len(example.endings)])
            ll = ll[len(example.endings):]
    return result


def counts(examples, lls):
    """(correct by acc, correct by acc_norm) over the examples, from their endings' log-likelihoods."""
    acc = sum(int(np.argmax(ll) == ex.label) for ex, ll in zip(examples, lls))
    acc_norm = sum(int(np.argmax(ll / np.array(ex.lengths, dtype=np.float64)) == ex.label)
                   for ex, ll in zip(examples, lls))
    return acc, acc_norm


@torch.no_grad()
def evaluate(model, examples, env, block_size, vocab_size, max_tokens):
    """{"eval/hellaswag_acc": ..., "eval/hellaswag_acc_norm": ...} over all the examples, each rank scoring its
    slice; every rank gets the same figures. model: the plain module (no DDP hooks), put in eval mode here."""
    start = len(examples) * env.rank // env.world_size
    mine = examples[start:len(examples) * (env.rank + 1) // env.world_size]
    was_training = model.training
    model.eval()
    if env.sharded:
        # FSDP all-gathers the weights in every forward, so every rank runs as many (agreed on before the first):
        # the extra ones score nothing
        forwards = len(forward_batches(mine, block_size, max_tokens))
        most = torch.tensor(forwards, device=env.device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
    lls = loglikelihoods(model, mine, block_size, vocab_size, max_tokens, env.autocast()) if mine else []
    if env.sharded:
        for _ in range(int(most) - forwards):
            with env.autocast():
                model(torch.zeros((1, 1), dtype=torch.long, device=env.device))
        model.reshard()  # the root keeps its gathered weights after a forward: free them
    total = torch.tensor([*counts(mine, lls), len(mine)], dtype=torch.float64, device=env.device)
    if env.distributed:
        dist.all_reduce(total)
    model.train(was_training)
    acc, acc_norm, n = total.tolist()
    return {"eval/hellaswag_acc": acc / n, "eval/hellaswag_acc_norm": acc_norm / n}


def examples_for_run(cfg):
    """The examples a run scores at each evaluation (None without eval.hellaswag), checked before any training:
    ConfigError (one line) for a missing or malformed file, character-level data, or an ending longer than
    model.block_size."""
    from config_schema import ConfigError
    from data.common import tokenizer_for
    from data.stream import data_dir_of
    if cfg.eval.hellaswag is None:
        return None
    path = Path(cfg.eval.hellaswag).absolute()
    if tokenizer_for(data_dir_of(cfg)).name != "gpt2":
        raise ConfigError(f"eval.hellaswag needs GPT-2 BPE data; data={cfg.data.name} is character-level: leave "
                          f"eval.hellaswag=null, or train on a GPT-2 corpus")
    try:
        examples = load_examples(path, cfg.eval.hellaswag_limit)
    except OSError as e:
        raise ConfigError(f"eval.hellaswag={cfg.eval.hellaswag}: cannot read it ({e.strerror}); fetch it with "
                          f"python data/hellaswag/prepare.py, or give the path of hellaswag_val.jsonl") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"eval.hellaswag: {e}") from None
    longest = max(len(ending) for example in examples for ending in example.endings)
    if longest > cfg.model.block_size:
        raise ConfigError(f"eval.hellaswag: an ending has {longest} tokens, more than model.block_size="
                          f"{cfg.model.block_size}: the model cannot score it; use a larger block_size")
    return examples
