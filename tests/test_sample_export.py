"""scripts/sample.py and scripts/export_hf.py on a tiny checkpoint with the keys train.py writes.

References: our tokenizer (data.common.get_gpt2_encoding) for prompts and ids, HF's own classes
(GPT2LMHeadModel, AutoTokenizer, pipeline) loading the exported folder offline."""

import contextlib
import io
import os
import stat
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from data.common import GPT2_VOCAB_SIZE, get_gpt2_encoding
from model import GPT, GPTConfig
from scripts import export_hf, sample

REPO_DIR = Path(__file__).resolve().parents[1]
# tiny, with biases and the padded vocab train.py uses, so that the export has rows to drop
TINY = GPTConfig(block_size=16, vocab_size=50304, n_layer=2, n_head=2, n_embd=32, bias=True)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder whose ckpt.pt has train.py's keys, weights random and O(0.1-1) so that the logits are
    far from uniform and a misplaced bias or transpose would show."""
    model = GPT(TINY)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1.0 + 0.1 * noise if "ln_" in name and name.endswith("weight") else 0.1 * noise)
    run = tmp_path_factory.mktemp("run")
    torch.save({"format": 1, "model": model.state_dict(), "optimizer": {}, "step": 8,
                "data_state": {"train_seqs": 0, "hess_seqs": 0},
                "config": {"model": {**asdict(TINY), "name": "tiny"}, "optim": {"name": "sophiag"}},
                "run_name": "tiny", "wandb_run_id": None, "elapsed_s": 1.0, "torch_version": torch.__version__},
               run / "ckpt.pt")
    return run


def run_sample(capsys, *args):
    """scripts/sample.py in this process: (stdout, stderr)."""
    sample.main([str(a) for a in args])
    captured = capsys.readouterr()
    return captured.out, captured.err


# ---------------------------------------------------------------------------------------------- sample.py

def test_same_seed_same_text_other_seed_other_text(run_dir, capsys):
    common = [f"out_dir={run_dir}", "start=ROMEO:", "num_samples=2", "max_new_tokens=12"]
    first, _ = run_sample(capsys, *common, "seed=1")
    again, _ = run_sample(capsys, *common, "seed=1")
    other, _ = run_sample(capsys, *common, "seed=2")
    assert first == again
    assert first != other
    texts = first.split("---------------\n")[:-1]
    assert len(texts) == 2 and texts[0] != texts[1]  # the two samples of one run differ too
    assert all(text.startswith("ROMEO:") for text in texts)  # `start=ROMEO:` stays text, not YAML


def test_temperature_zero_is_greedy(run_dir, capsys):
    """temperature=0 takes the argmax: no randomness left, every seed gives our model's greedy text."""
    common = [f"out_dir={run_dir}", "start=ROMEO:", "num_samples=1", "max_new_tokens=6", "temperature=0"]
    first, _ = run_sample(capsys, *common, "seed=1")
    other, _ = run_sample(capsys, *common, "seed=2")
    model, _ = sample.load_run(run_dir)
    ids = get_gpt2_encoding().encode_ordinary("ROMEO:")
    with torch.no_grad():
        for _ in range(6):
            logits, _ = model(torch.tensor([ids]))  # (1, T, V)
            ids.append(int(logits[0, -1, :GPT2_VOCAB_SIZE].argmax()))
    assert first == other == get_gpt2_encoding().decode(ids) + "\n---------------\n"


def test_file_prompt_from_the_command_line(run_dir, tmp_path):
    """The script as users run it, with the prompt read from a file (a colon and a newline included)."""
    prompt = "ROMEO:\nBut soft, what light"
    (tmp_path / "prompt.txt").write_text(prompt)
    result = subprocess.run([sys.executable, str(REPO_DIR / "scripts" / "sample.py"), f"out_dir={run_dir}",
                             f"start=FILE:{tmp_path / 'prompt.txt'}", "num_samples=1", "max_new_tokens=5"],
                            check=False, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    text = result.stdout.split("---------------\n")[0]
    assert text.startswith(prompt)
    new_ids = get_gpt2_encoding().encode(text[len(prompt):].rstrip("\n"))
    assert 1 <= len(new_ids) <= 10  # 5 tokens decoded and re-encoded: BPE may split or merge a few


def test_prompt_longer_than_block_size_is_cropped_with_a_note(run_dir, capsys):
    prompt = " ".join(f"word{i}" for i in range(40))
    prompt_ids = get_gpt2_encoding().encode_ordinary(prompt)
    assert len(prompt_ids) > TINY.block_size
    out, err = run_sample(capsys, f"out_dir={run_dir}", f"start={prompt}", "num_samples=1", "max_new_tokens=3")
    assert f"the prompt has {len(prompt_ids)} tokens" in err and f"keeping its last {TINY.block_size}" in err
    assert out.startswith(get_gpt2_encoding().decode(prompt_ids[-TINY.block_size:]))


def test_generate_never_picks_a_padding_row():
    """Rows 50257..50303 pad the embedding and are no tokens: a model that makes them by far the likeliest
    gets them sampled without vocab_size, and never with it."""
    class PaddingLover(GPT):
        def forward(self, idx):  # idx (B, T) -> logits (B, T, 50304)
            logits = torch.zeros(*idx.shape, self.config.vocab_size)
            logits[..., GPT2_VOCAB_SIZE:] = 50.0
            return logits, None

    model = PaddingLover(GPTConfig(block_size=4, n_layer=1, n_head=1, n_embd=8))
    idx = torch.zeros(3, 1, dtype=torch.long)  # (3, 1)
    unrestricted = model.generate(idx, 6, generator=torch.Generator().manual_seed(0))
    restricted = model.generate(idx, 6, generator=torch.Generator().manual_seed(0), vocab_size=GPT2_VOCAB_SIZE)
    assert restricted.shape == (3, 7)  # the context is cropped to block_size=4, the output is not
    assert (unrestricted[:, 1:] >= GPT2_VOCAB_SIZE).all() and (restricted < GPT2_VOCAB_SIZE).all()


@pytest.mark.parametrize("make_args, message", [
    (lambda run, tmp: [f"out_dir={tmp}"], lambda run, tmp: [f"{tmp} holds no checkpoint", "python train.py", "out_dir="]),
    (lambda run, tmp: [f"out_dir={run}", "tempreature=0.5"], lambda run, tmp: ["unknown key(s) tempreature"]),
    (lambda run, tmp: [f"out_dir={run}", f"start=FILE:{tmp}/missing.txt"], lambda run, tmp: ["no such file"]),
    (lambda run, tmp: [str(run)], lambda run, tmp: ["expected key=value", f"out_dir={run}"]),
])
def test_bad_input_is_one_line_and_exit_2(run_dir, tmp_path, capsys, make_args, message):
    with pytest.raises(SystemExit) as exit_info:
        run_sample(capsys, *make_args(run_dir, tmp_path))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    for part in message(run_dir, tmp_path):
        assert part in err


def test_help_prints_every_key_with_its_default(capsys):
    """--help (as typed, in a process of its own) and -h: the usage, every key parse_args accepts with the value it
    takes when not given; no run is needed."""
    result = subprocess.run([sys.executable, str(REPO_DIR / "scripts" / "sample.py"), "--help"], cwd=REPO_DIR,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout.startswith("Sample text from a trained run's checkpoint")
    defaults = sample.parse_args([])
    for key, value in defaults.items():
        shown = repr(value) if key == "start" else str(value)  # the prompt's newline, visible
        assert f"  {key}={shown} " in result.stdout, key
    out, err = run_sample(capsys, "-h")
    assert out.strip() == result.stdout.strip() and err == ""


# ---------------------------------------------------------------------------------------------- export_hf.py

@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    """(folder, what export_hf printed)."""
    out_dir = tmp_path_factory.mktemp("hf_model")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        export_hf.main([str(run_dir), "--out", str(out_dir)])
    return out_dir, printed.getvalue()


def test_exported_logits_equal_ours(run_dir, exported):
    from transformers import GPT2LMHeadModel
    out_dir, printed = exported
    assert f"dropped the {TINY.vocab_size - GPT2_VOCAB_SIZE} padding rows" in printed
    hf = GPT2LMHeadModel.from_pretrained(out_dir).eval()
    assert hf.config.vocab_size == GPT2_VOCAB_SIZE
    ours, _ = sample.load_run(run_dir)
    idx = torch.randint(0, GPT2_VOCAB_SIZE, (2, TINY.block_size), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = hf(idx).logits  # (2, T, 50257)
        logits, _ = ours(idx)  # (2, T, 50304)
    assert theirs.shape == (2, TINY.block_size, GPT2_VOCAB_SIZE)
    # fp32 round-off: matmul order and attention kernels differ, nothing more
    torch.testing.assert_close(theirs, logits[..., :GPT2_VOCAB_SIZE], rtol=0, atol=2e-5 * logits.abs().max().item())


def test_exported_tokenizer_matches_ours(exported):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(exported[0])
    text = "ROMEO:\nBut soft, what light through yonder window breaks? It's 2023 — café!"
    assert tokenizer(text)["input_ids"] == get_gpt2_encoding().encode_ordinary(text)
    assert tokenizer.eos_token_id == get_gpt2_encoding().eot_token


def test_exported_pipeline_generates_offline(exported):
    from transformers import pipeline
    generator = pipeline("text-generation", model=str(exported[0]), device="cpu")
    text = generator("ROMEO:", max_new_tokens=5)[0]["generated_text"]
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")


def test_export_without_checkpoint_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_hf.main([str(tmp_path), "--out", str(tmp_path / "hf")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and f"{tmp_path} holds no checkpoint" in err
    assert not (tmp_path / "hf").exists()


def test_exported_files_share_one_mode(exported):
    """Every exported file readable by others as the umask allows (safetensors alone wrote 0600 once)."""
    umask = os.umask(0)
    os.umask(umask)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in exported[0].iterdir() if path.is_file()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o666 & ~umask}, modes
