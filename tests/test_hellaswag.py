"""HellaSwag in the training loop (hellaswag.py, eval.hellaswag) and lm-eval-harness through scripts/export_hf.py.

References: a by-hand computation with HF's GPT2LMHeadModel and tokenizer on the exported checkpoint (one ending
at a time, no batching, no padding, lm-eval's steps written out again here); one process against two torchrun
ranks; lm-eval-harness itself (its own hellaswag task YAML and preprocessing, over a local file), where installed
(pip install -r requirements-eval.txt; the test skips without it)."""

import contextlib
import io
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import hellaswag
from conftest import read_metrics, refusal_in_process, run_train, train_in_process
from data.common import GPT2_VOCAB_SIZE
from distributed import Env
from model import GPT, GPTConfig
from scripts import export_hf

# with -n 2, on one worker: the run and its export (module fixtures) are then made once
pytestmark = pytest.mark.xdist_group("hellaswag")

# Examples written for these tests in rowanz/hellaswag's schema (hellaswag_val.jsonl's keys), with what the
# preprocessing must handle: WikiHow's [header]/[title]/[step] brackets, an empty ctx_b, a ctx_b whose capitals
# capitalize() lowercases, double spaces, and contexts longer than the tests' model.block_size=32 (left truncation).
DOCS = [
    ("Removing ice from car", "A man scrapes the windshield of a red car with a plastic tool.", "he",
     ["brushes the snow off the roof and wipes the mirrors.", "eats a sandwich on the hood of the car.",
      "climbs into the trunk and closes the lid.", "throws the scraper into a lake."], 0),
    ("Playing violin", "A girl stands on a stage holding a violin under her chin.", "the girl",
     ["puts the bow down and starts to juggle oranges.", "draws the bow across the strings and plays a song.",
      "walks off the stage to buy a violin.", "hands the violin to a dog in the audience."], 1),
    ("Home and Garden", "[header] How to clean a window [title] Mix warm water with a little dish soap. [step] "
     "Fill a bucket about halfway and stir until the water looks cloudy.", "",
     ["[title] Wipe the glass with a sponge. [step] Work from the top down so drips fall on dirty glass.",
      "[title] Paint the window frame blue. [step] Let it dry for a week.",
      "[title] Throw the bucket out of the window. [substeps] Watch it fall.",
      "[title] Call a friend and talk about soap."], 0),
    ("Making a sandwich", "A chef lays two slices of bread on a wooden board.", "The Chef",
     ["spreads butter on each slice and adds cheese.", "sets the bread on fire with a torch.",
      "puts the board in the washing machine.", "reads a newspaper  while the bread sleeps."], 0),
    ("Running a marathon", "Hundreds of runners wait behind a starting line on a city street.", "a man in a hat",
     ["fires a pistol into the air and the runners set off.", "sings opera to the pigeons.",
      "paints the street with a small brush.", "tells everyone to go home and sleep."], 0),
    ("Personal Care and Style", "[header] How to trim your beard [title] Wash and dry your beard first. [step] "
     "Clean hair is easier to cut evenly and shows its true length.", "",
     ["[title] Shave your head completely.", "[title] Comb the beard in the direction it grows. [step] This lays "
      "the hairs flat so you can see which ones stick out.", "[title] Buy a new car.",
      "[title] Dye the beard green before you start."], 1),
    ("Surfing", "A surfer paddles out past the breaking waves on a long board.", "she",
     ["stands up as a wave lifts the board and rides it toward the beach.", "orders a pizza from the water.",
      "folds the board in half and puts it in her pocket.", "starts to knit a scarf."], 0),
    ("Washing dishes", "A woman fills the sink with hot soapy water and stacks plates beside it.", "she",
     ["scrubs each plate with a brush and rinses it under the tap.", "plants tomatoes in the sink.",
      "throws the plates at the wall one by one.", "sings to the plates until they are clean."], 0),
    ("Playing chess", "Two old men sit at a park table with a chess board between them.", "one of the men",
     ["moves a knight and taps the clock.", "eats the queen and laughs.", "flips the table into the pond.",
      "starts a fire with the pawns."], 0),
    ("Finance and Business", "[header] How to save money on groceries [title] Make a list before you go. "
     "[step] Check what is already in the fridge and the cupboards.", "",
     ["[title] Buy everything you see.", "[title] Never eat again.",
      "[title] Compare unit prices on the shelf labels. [step] The larger pack is not always cheaper per gram.",
      "[title] Give your wallet to a stranger."], 2),
    ("Walking the dog", "A boy clips a leash to the collar of a small brown dog.", "they",
     ["walk down the sidewalk and stop at every tree.", "fly over the house.", "swim across the kitchen.",
      "argue about politics."], 0),
    ("Baking cookies", "A man pulls a tray of cookies out of the oven with oven mitts.", "he",
     ["sets the tray on the counter to cool.", "puts the cookies in the freezer with his shoes.",
      "throws the tray out of the window.", "eats the oven mitts."], 0),
    ("Tying shoes", "A little girl sits on the steps and pulls on her sneakers.", "She",
     ["crosses the laces and pulls them into a bow.", "cuts the laces with scissors and cries.",
      "puts the sneakers on her hands.", "walks away barefoot."], 3),
]


def write_hellaswag(path, docs=DOCS):
    """A .jsonl in hellaswag_val.jsonl's schema (every key it has, label an int as there)."""
    with open(path, "w") as f:
        for i, (activity, ctx_a, ctx_b, endings, label) in enumerate(docs):
            f.write(json.dumps({"ind": i, "activity_label": activity, "ctx_a": ctx_a, "ctx_b": ctx_b,
                                "ctx": f"{ctx_a} {ctx_b}".strip(), "split": "val", "split_type": "indomain",
                                "label": label, "endings": endings, "source_id": f"test~{i}"}) + "\n")
    return path


# 4 steps, evaluating at 0 and 4; block_size 32 (conftest's TINY) is shorter than some contexts here
RUN_ARGS = ["optim=adamw", "max_steps=4", "eval_interval=4"]


@pytest.fixture(scope="module")
def hellaswag_file(tmp_path_factory):
    return write_hellaswag(tmp_path_factory.mktemp("hellaswag") / "hellaswag_val.jsonl")


@pytest.fixture(scope="module")
def trained(shakespeare_bins, hellaswag_file, tmp_path_factory):
    """A tiny run that scored HellaSwag at every evaluation, and its checkpoint exported as an HF folder."""
    out = tmp_path_factory.mktemp("run")
    status, printed = train_in_process(RUN_ARGS + [f"eval.hellaswag={hellaswag_file}"], out)
    assert status == 0, printed
    hf_dir = tmp_path_factory.mktemp("hf")
    with contextlib.redirect_stdout(io.StringIO()):
        export_hf.main([str(out), "--out", str(hf_dir)])
    return out, hf_dir, printed


def last_scores(out):
    evals = [r for r in read_metrics(out) if "eval/hellaswag_acc" in r]
    return evals[-1]["eval/hellaswag_acc"], evals[-1]["eval/hellaswag_acc_norm"]


def by_hand(hf_dir, docs=DOCS):
    """Each example's ending log-likelihoods with HF's GPT2LMHeadModel and tokenizer, one ending at a time, as
    lm-eval-harness's hellaswag task defines them (written out here from lm-eval's utils.py, task.py and
    _encode_pair / _loglikelihood_tokens). Returns (lls, acc, acc_norm)."""
    from transformers import AutoTokenizer, GPT2LMHeadModel
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    max_length = model.config.n_positions

    def clean(text):
        text = text.strip().replace(" [title]", ". ")
        return re.sub(r"\[.*?\]", "", text).replace("  ", " ")

    all_lls, correct, correct_norm = [], 0, 0
    for activity, ctx_a, ctx_b, endings, label in docs:
        context = clean(activity + ": " + ctx_a + " " + ctx_b.capitalize())
        choices = [clean(e) for e in endings]
        lls = []
        for choice in choices:
            context_ids = tokenizer(context)["input_ids"]
            whole = tokenizer(context + " " + choice)["input_ids"]
            continuation = whole[len(context_ids):]
            sequence = whole[-(max_length + 1):]
            with torch.no_grad():
                logits = model(torch.tensor([sequence[:-1]])).logits[0]  # (T, 50257)
            logprobs = torch.log_softmax(logits.double(), dim=-1)[-len(continuation):]
            lls.append(sum(logprobs[i, t].item() for i, t in enumerate(continuation)))
        lls = np.array(lls)
        all_lls.append(lls)
        correct += int(np.argmax(lls) == label)
        correct_norm += int(np.argmax(lls / np.array([len(c) for c in choices])) == label)
    return all_lls, correct / len(docs), correct_norm / len(docs)


def test_in_loop_scores_equal_hf_by_hand_on_the_export(trained, hellaswag_file):
    out, hf_dir, printed = trained
    assert f"HellaSwag: {len(DOCS)} examples" in printed
    evals = [r for r in read_metrics(out) if "eval/hellaswag_acc" in r]
    assert [r["step"] for r in evals] == [0, 4] and all("val/loss" in r for r in evals)  # logged beside val/loss
    lls, acc, acc_norm = by_hand(hf_dir)
    assert last_scores(out) == (acc, acc_norm)
    # each ending's log-likelihood, from our checkpoint through hellaswag.py (batched, padded, truncated)
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    config = {k: v for k, v in ckpt["config"]["model"].items() if k != "name"}
    model = GPT(GPTConfig(**config))
    model.load_state_dict(ckpt["model"])
    examples = hellaswag.load_examples(hellaswag_file)
    ours = hellaswag.loglikelihoods(model.eval(), examples, config["block_size"], GPT2_VOCAB_SIZE, 10_000,
                                    contextlib.nullcontext())
    np.testing.assert_allclose(np.stack(ours), np.stack(lls), rtol=0, atol=1e-4)
    # the test examples reach the truncation: some sequences are longer than the model's positions
    assert max(len(ex.context) + len(e) for ex in examples for e in ex.endings) > config["block_size"] + 1


def test_batching_and_padding_leave_the_scores_unchanged(hellaswag_file):
    """One example per forward against all in one padded forward; and a limit takes the first N examples."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=48, vocab_size=50304, n_layer=2, n_head=2, n_embd=32)).eval()
    examples = hellaswag.load_examples(hellaswag_file)
    assert len(hellaswag.forward_batches(examples, 48, 1)) == len(examples)
    assert len(hellaswag.forward_batches(examples, 48, 10 ** 6)) == 1
    one = hellaswag.loglikelihoods(model, examples, 48, GPT2_VOCAB_SIZE, 1, contextlib.nullcontext())
    packed = hellaswag.loglikelihoods(model, examples, 48, GPT2_VOCAB_SIZE, 10 ** 6, contextlib.nullcontext())
    np.testing.assert_allclose(np.stack(packed), np.stack(one), rtol=0, atol=1e-4)
    first = hellaswag.load_examples(hellaswag_file, limit=5)
    assert [ex.label for ex in first] == [ex.label for ex in examples[:5]]
    env = Env(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), dtype="float32")
    scores = hellaswag.evaluate(model, examples, env, 48, GPT2_VOCAB_SIZE, 200)
    acc, acc_norm = hellaswag.counts(examples, one)
    assert scores == {"eval/hellaswag_acc": acc / len(examples), "eval/hellaswag_acc_norm": acc_norm / len(examples)}


def test_preprocessing_is_lm_evals(hellaswag_file):
    """Our context and choices against lm-eval's own process_docs (skipped where lm-eval is not installed)."""
    pytest.importorskip("lm_eval")
    import datasets
    from lm_eval.tasks.hellaswag.utils import process_docs
    docs = datasets.load_dataset("json", data_files=str(hellaswag_file), split="train")
    for doc, theirs in zip(docs, process_docs(docs)):
        assert hellaswag.query_and_choices(doc) == (theirs["query"], theirs["choices"])


TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_give_the_scores_of_one_process(tmp_path, trained, hellaswag_file, parallel):
    """torchrun, 2 gloo ranks on CPU, each scoring its slice of the 13 examples (7 and 6): the same scores at every
    evaluation as the one-process run."""
    run_train(RUN_ARGS + [f"eval.hellaswag={hellaswag_file}", f"parallel={parallel}"], tmp_path / "two",
              launcher=TORCHRUN)
    one, two = read_metrics(trained[0]), read_metrics(tmp_path / "two")
    for key in ("eval/hellaswag_acc", "eval/hellaswag_acc_norm"):
        expected = {r["step"]: r[key] for r in one if key in r}
        assert {r["step"]: r[key] for r in two if key in r} == expected, key


def test_lm_eval_gives_the_in_loop_acc_and_acc_norm(trained, hellaswag_file, tmp_path):
    """lm-eval-harness's `hf` model on the exported folder, its own hellaswag task YAML (included, so its
    preprocessing is lm-eval's code) over the local file: the same acc and acc_norm as the run logged, and the
    same log-likelihoods per ending."""
    pytest.importorskip("lm_eval")
    import lm_eval
    from lm_eval.tasks import TaskManager
    out, hf_dir, _ = trained
    official = Path(lm_eval.__file__).parent / "tasks" / "hellaswag" / "hellaswag.yaml"
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "hellaswag_local.yaml").write_text(
        f"include: {official}\ntask: hellaswag_local\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {hellaswag_file}\ntraining_split: null\n"
        f"validation_split: validation\n")
    with contextlib.redirect_stdout(io.StringIO()):
        results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={hf_dir},dtype=float32",
                                          tasks=["hellaswag_local"], task_manager=TaskManager(
                                              include_path=str(tmp_path / "tasks")),
                                          device="cpu", batch_size=4, log_samples=True)
    scores = results["results"]["hellaswag_local"]
    assert (scores["acc,none"], scores["acc_norm,none"]) == last_scores(out)
    samples = sorted(results["samples"]["hellaswag_local"], key=lambda s: s["doc_id"])
    theirs = np.array([[resp[0] for resp in s["filtered_resps"]] for s in samples])  # (examples, endings)
    lls, _, _ = by_hand(hf_dir)
    np.testing.assert_allclose(theirs, np.stack(lls), rtol=0, atol=1e-4)


@pytest.mark.parametrize("make_file, args, message", [
    (None, ["eval.hellaswag=/nonexistent/hellaswag_val.jsonl"], "is not a file: fetch it with"),
    (lambda p: p.write_text("not json\n"), [], "line 1 is not JSON"),
    (lambda p: p.write_text('{"ctx_a": "x"}\n'), [], "lacks activity_label, ctx_b, endings, label"),
    (write_hellaswag, ["eval.hellaswag_limit=0"], "eval.hellaswag_limit=0: set it to 1 or more"),
    (write_hellaswag, ["data=shakespeare_char", "model=baby"], "needs GPT-2 BPE data"),
])
@pytest.mark.usefixtures("shakespeare_bins")
def test_bad_hellaswag_input_is_one_line_before_training(tmp_path, make_file, args, message):
    path = tmp_path / "hellaswag_val.jsonl"
    if make_file is not None:
        make_file(path)
        args = [f"eval.hellaswag={path}", *args]
    extra = []
    if "data=shakespeare_char" in args:  # a character-level data folder (its meta.json says so), made here
        from data.common import write_token_data
        chars = write_token_data(tmp_path / "chars", {s: np.arange(2000) % 64 for s in ("train", "val")},
                                 tokenizer="char", itos=["\n"] + [chr(32 + i) for i in range(63)], vocab_size=64)
        extra = [f"data.dir={chars}"]
    status, stderr = refusal_in_process(["max_steps=2", *args, *extra], tmp_path / "run")
    assert status == 2, stderr
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert message in stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_prepare_copies_a_local_file_and_says_how_to_bring_it_without_network(tmp_path, hellaswag_file):
    """data/hellaswag/prepare.py: a local copy is checked and written; a URL it cannot reach is one line saying how
    to bring the file, and leaves nothing behind; a file in another schema is refused."""
    import subprocess

    from conftest import REPO_DIR
    script = [sys.executable, str(REPO_DIR / "data" / "hellaswag" / "prepare.py")]
    out = tmp_path / "hellaswag_val.jsonl"
    done = subprocess.run([*script, "--source", str(hellaswag_file), "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0 and f"{len(DOCS)} examples" in done.stdout and "another file?" in done.stdout
    assert out.read_bytes() == hellaswag_file.read_bytes()

    failed = subprocess.run([*script, "--source", "https://127.0.0.1/hellaswag_val.jsonl", "--out",
                             str(tmp_path / "x.jsonl")], capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1 and failed.stderr.count("\n") == 1, failed.stderr
    assert "download that URL on a machine that has it and copy it to" in failed.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hellaswag_val.jsonl"]

    (tmp_path / "other.jsonl").write_text('{"text": "a document"}\n')
    refused = subprocess.run([*script, "--source", str(tmp_path / "other.jsonl"), "--out", str(tmp_path / "y.jsonl")],
                             capture_output=True, text=True)
    assert refused.returncode == 1 and "not HellaSwag's schema" in refused.stderr
    assert not (tmp_path / "y.jsonl").exists() and not (tmp_path / "y.jsonl.tmp").exists()
