"""init_from: a run that starts from a GPT-2's weights (HF name or save_pretrained folder), offline with a small
random GPT-2 saved locally. Reference: HF's own GPT2LMHeadModel and its weights."""
import pytest
import torch

from conftest import run_train

pytestmark = pytest.mark.usefixtures("shakespeare_bins")


@pytest.fixture(scope="module")
def small_gpt2(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=48, n_positions=64, vocab_size=50257))
    folder = tmp_path_factory.mktemp("gpt2_small_random")
    hf.save_pretrained(folder)
    return folder, hf


def test_a_run_starts_from_the_pretrained_weights(tmp_path, small_gpt2):
    folder, hf = small_gpt2
    # one step with warmup: its learning rate is 0 (the official warmup), so the saved weights are the initial ones
    result = run_train([f"init_from={folder}", "max_steps=1", "warmup_steps=1", "optim=adamw"], tmp_path / "run")
    assert "sets the architecture; ignoring model.n_embd=32" in result.stdout  # TINY's 32 vs the model's 48
    saved = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)
    assert saved["config"]["model"]["n_embd"] == 48 and saved["config"]["model"]["vocab_size"] == 50257
    hf_state = hf.state_dict()
    for name, tensor in saved["model"].items():
        if name == "lm_head.weight":
            name = "transformer.wte.weight"  # tied
        expected = hf_state[name]
        if name.endswith(("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")):
            expected = expected.t()  # HF's Conv1D stores (in, out)
        if name == "transformer.wpe.weight":
            expected = expected[:32]  # cropped to the run's block size
        torch.testing.assert_close(tensor, expected, rtol=0, atol=0, msg=name)
    # and it trains on from there, resuming like any run
    run_train([f"init_from={folder}", "max_steps=3", "warmup_steps=1", "optim=adamw"], tmp_path / "run")


def test_init_from_bad_input_is_one_line(tmp_path, small_gpt2):
    folder, _ = small_gpt2
    from transformers import BertConfig
    bert = tmp_path / "bert"
    BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64).save_pretrained(bert)
    cases = [([f"init_from={bert}"], "is a bert model: only GPT-2 models convert"),
             ([f"init_from={folder}", "model.block_size=128"], "model.block_size=128 exceeds the 64 positions"),
             ([f"init_from={tmp_path / 'nothing_here'}"], "no model found")]
    for args, message in cases:
        result = run_train(args + ["max_steps=2"], tmp_path / "run", check=False)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1
