"""init_from: a run that starts from a GPT-2's weights (HF name or save_pretrained folder), offline with a small
random GPT-2 saved locally. Reference: HF's own GPT2LMHeadModel and its weights."""
import pytest
import torch

from conftest import read_metrics, refusal_in_process, train_in_process

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
    status, printed = train_in_process([f"init_from={folder}", "max_steps=1", "warmup_steps=1", "optim=adamw"],
                                       tmp_path / "run")
    assert status == 0 and "sets the architecture; ignoring model.n_embd=32" in printed  # TINY's 32 vs the model's 48
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


def test_a_resumed_run_continues_its_checkpoint_not_the_pretrained_weights(tmp_path, small_gpt2):
    """Stopped after 2 steps (the weights have moved from the pretrained ones), the same command resumes from the
    checkpoint, at step 2, without loading init_from's weights over it: the same losses and weights as a run that
    never stopped. model.dropout stays the run's own (0.1), not the pretrained model's."""
    folder, _ = small_gpt2
    args = [f"init_from={folder}", "warmup_steps=1", "lr_decay_steps=4", "optim=adamw", "model.dropout=0.1"]
    train_in_process(args + ["max_steps=4"], tmp_path / "whole")
    train_in_process(args + ["max_steps=2"], tmp_path / "split")
    status, printed = train_in_process(args + ["max_steps=4"], tmp_path / "split")
    assert status == 0 and f"resumed from {tmp_path / 'split' / 'ckpt.pt'} at step 2" in printed

    whole, split = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "split")
    assert [r["step"] for r in split if "train/loss" in r] == [1, 2, 3, 4]  # each step once: no restart at 0
    assert [r["train/loss"] for r in split if "train/loss" in r] == \
        pytest.approx([r["train/loss"] for r in whole if "train/loss" in r], rel=1e-6)
    a = torch.load(tmp_path / "whole" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=False)
    assert a["config"]["model"]["dropout"] == b["config"]["model"]["dropout"] == 0.1
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, rtol=1e-6, atol=1e-7, msg=name)


def test_init_from_bad_input_is_one_line(tmp_path, small_gpt2):
    folder, _ = small_gpt2
    from transformers import BertConfig
    bert = tmp_path / "bert"
    BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64).save_pretrained(bert)
    cases = [([f"init_from={bert}"], "is a bert model: only GPT-2 models convert"),
             ([f"init_from={folder}", "model.block_size=128"], "model.block_size=128 exceeds the 64 positions"),
             ([f"init_from={tmp_path / 'nothing_here'}"], "no model found")]
    for args, message in cases:
        status, stderr = refusal_in_process(args + ["max_steps=2"], tmp_path / "run")
        assert status == 2 and message in stderr, stderr
        assert stderr.count("\n") == 1
