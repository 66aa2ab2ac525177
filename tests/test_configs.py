"""The presets, composed by Hydra exactly as train.py composes them.

Fairness: the presets of one model size may differ in the optimizer block (and its min_lr) alone, so that
Sophia, AdamW and Lion share model, data order, batch, schedule, seed, loss scaling and evaluation."""
import pytest

from conftest import compose_config, flatten

OPTIMIZERS = ["adamw", "lion", "sophiag", "sophiah"]
SIZES = {"small": (12, 12, 768), "medium": (24, 16, 1024), "large": (36, 20, 1280)}

# the official repository's configs: lr, min_lr, weight decay, betas, rho
OFFICIAL = {
    ("small", "sophiag"): (6e-4, 1.5e-5, 0.2, [0.965, 0.99], 0.05),
    ("medium", "sophiag"): (7e-4, 1e-5, 0.2, [0.965, 0.99], 0.08),
    ("large", "sophiag"): (3e-4, 1e-5, 0.2, [0.965, 0.99], 0.05),
    ("small", "adamw"): (6e-4, 3e-5, 0.1, [0.9, 0.95], None),
    ("medium", "adamw"): (3e-4, 6e-5, 0.1, [0.9, 0.95], None),
    ("large", "adamw"): (2e-4, 1e-5, 0.1, [0.9, 0.95], None),
}
LION_LR = {"small": 1e-4, "medium": 1e-4, "large": 8e-5}
# gradient-accumulation steps of the official AdamW launches (GPUs x micro-batch x A = 480 sequences):
# small 10 x 8 x 6, medium 8 x 6 x 10, large 10 x 4 x 12
OFFICIAL_ACCUMULATION = {"small": 6, "medium": 10, "large": 12}


@pytest.mark.parametrize("size", SIZES)
def test_presets_of_one_size_differ_only_in_the_optimizer(size):
    configs = {opt: flatten(compose_config(f"gpt2_{size}_{opt}")) for opt in OPTIMIZERS}
    reference = configs["adamw"]
    for opt, flat in configs.items():
        differing = {k for k in set(flat) | set(reference) if flat.get(k) != reference.get(k)}
        assert all(k.startswith("optim.") or k == "min_lr" for k in differing), (opt, sorted(differing))
        n_layer, n_head, n_embd = SIZES[size]
        assert (flat["model.n_layer"], flat["model.n_head"], flat["model.n_embd"]) == (n_layer, n_head, n_embd)
        assert flat["model.scale_attn_by_inverse_layer_idx"] is True  # every size, as the official scripts now
        assert flat["model.vocab_size"] == 50304 and flat["model.bias"] is False and flat["model.dropout"] == 0
        assert flat["total_batch_size"] == 480 and flat["model.block_size"] == 1024
        assert flat["max_steps"] == 100_000 and flat["warmup_steps"] == 2000 and flat["grad_clip"] == 1.0
        assert flat["data.name"] == "openwebtext" and flat["optim.name"] == opt
        # the batch splits over 8 and over 10 GPUs
        assert all(480 % (flat["micro_batch_size"] * gpus) == 0 for gpus in (8, 10))


@pytest.mark.parametrize("size, opt", list(OFFICIAL))
def test_presets_carry_the_official_hyperparameters(size, opt):
    cfg = compose_config(f"gpt2_{size}_{opt}")
    lr, min_lr, wd, betas, rho = OFFICIAL[(size, opt)]
    assert (cfg["optim"]["lr"], cfg["min_lr"], cfg["optim"]["weight_decay"], cfg["optim"]["betas"]) == \
        (lr, min_lr, wd, betas)
    if rho is not None:
        assert cfg["optim"]["rho"] == rho and cfg["optim"]["hess_interval"] == 10


@pytest.mark.parametrize("size", SIZES)
def test_lion_presets_use_the_paper_learning_rate(size):
    cfg = compose_config(f"gpt2_{size}_lion")
    assert cfg["optim"]["lr"] == LION_LR[size] and cfg["optim"]["betas"] == [0.95, 0.98]


@pytest.mark.parametrize("size", SIZES)
def test_official_adamw_presets_differ_from_the_fair_one_in_clip_and_eps_only(size):
    fair, official = flatten(compose_config(f"gpt2_{size}_adamw")), flatten(compose_config(f"gpt2_{size}_adamw_official"))
    differing = {k for k in set(fair) | set(official) if fair.get(k) != official.get(k)}
    assert differing == {"grad_clip", "optim.eps"}
    A = OFFICIAL_ACCUMULATION[size]
    assert official["grad_clip"] == pytest.approx(1 / A, rel=1e-15) and fair["grad_clip"] == 1.0
    assert official["optim.eps"] == pytest.approx(1e-8 / A, rel=1e-15) and fair["optim.eps"] == 1e-8
    assert official["total_batch_size"] == 480


def train_tiny_adamw(loss_scale, max_norm, eps, A=4, steps=6):
    """A tiny GPT trained with torch's AdamW over A micro-batches per step; returns (weights, the gradient
    norms seen by clip_grad_norm_)."""
    import torch

    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64))
    data = torch.randint(0, 64, (steps, A, 2, 17), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=eps, weight_decay=0.1, foreach=False)
    norms = []
    for step in range(steps):
        for micro in range(A):
            x = data[step, micro]
            _, loss = model(x[:, :-1], x[:, 1:])
            (loss * loss_scale).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item())
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.state_dict(), norms


def max_difference(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_official_adamw_equals_clip_and_eps_over_accumulation():
    """What the _adamw_official presets rest on: train_adam.py's recipe (each micro-batch's loss backpropagated
    without dividing by A, clip at max_norm, eps) equals the mean gradient clipped at max_norm/A with eps/A.
    The algebra holds for any max_norm; 4.0 here makes some steps clip and others not, and eps 1e-4 makes
    eps matter, so that a wrong mapping shows."""
    A, max_norm, eps = 4, 4.0, 1e-4
    official, norms = train_tiny_adamw(loss_scale=1.0, max_norm=max_norm, eps=eps, A=A)
    assert min(norms) < max_norm < max(norms)
    ours, _ = train_tiny_adamw(loss_scale=1 / A, max_norm=max_norm / A, eps=eps / A, A=A)
    assert max_difference(official, ours) < 1e-6
    # the check can fail: leaving out either scaling changes the weights
    assert max_difference(official, train_tiny_adamw(1 / A, max_norm / A, eps, A=A)[0]) > 1e-4
    assert max_difference(official, train_tiny_adamw(1 / A, max_norm, eps / A, A=A)[0]) > 1e-4


def test_xl_presets_differ_only_in_the_optimizer_and_are_sharded():
    """GPT-2 1.5B: AdamW and Sophia-G on one model, batch and schedule, with FSDP; Sophia-G with the official
    1.5B (Levanter) values that carry over: lr, betas, weight decay, min_lr 0.02 x lr, warmup 1% of the steps."""
    adamw, sophiag = flatten(compose_config("gpt2_xl_adamw")), flatten(compose_config("gpt2_xl_sophiag"))
    differing = {k for k in set(adamw) | set(sophiag) if adamw.get(k) != sophiag.get(k)}
    assert differing and all(k.startswith("optim.") or k == "min_lr" for k in differing), sorted(differing)
    for flat in (adamw, sophiag):
        assert (flat["model.n_layer"], flat["model.n_head"], flat["model.n_embd"]) == (48, 25, 1600)
        assert flat["model.scale_attn_by_inverse_layer_idx"] is True and flat["model.vocab_size"] == 50304
        assert flat["parallel"] == "fsdp" and flat["data.name"] == "openwebtext"
        assert flat["total_batch_size"] == 480 and flat["model.block_size"] == 1024
        assert flat["max_steps"] == 100_000 and flat["warmup_steps"] == 1000 and flat["grad_clip"] == 1.0
        assert all(480 % (flat["micro_batch_size"] * gpus) == 0 for gpus in (8, 10))
    assert (sophiag["optim.name"], sophiag["optim.lr"], sophiag["optim.betas"], sophiag["optim.weight_decay"]) == \
        ("sophiag", 2.5e-4, [0.965, 0.99], 0.15)
    assert sophiag["min_lr"] == pytest.approx(0.02 * 2.5e-4, rel=1e-12) and sophiag["optim.hess_interval"] == 10
    assert sophiag["optim.rho"] > 0 and adamw["optim.name"] == "adamw"


def test_shakespeare_presets_differ_only_in_the_optimizer():
    sophia, adamw = flatten(compose_config("shakespeare_sophiag")), flatten(compose_config("shakespeare_adamw"))
    differing = {k for k in set(sophia) | set(adamw) if sophia.get(k) != adamw.get(k)}
    assert differing and all(k.startswith("optim.") for k in differing), sorted(differing)
    # python train.py runs the Sophia preset
    assert flatten(compose_config("shakespeare_sophiag")) == flatten(compose_config())


def test_train_py_with_clip_and_eps_over_accumulation_equals_the_official_adamw_loop(tmp_path, token_data):
    """The same equivalence through train.py itself, as the _adamw_official presets run: train.py with
    grad_clip=max_norm/A and optim.eps=eps/A against train_adam.py's loop written out here (each micro-batch's
    loss backpropagated undivided, clip at max_norm, torch's AdamW with eps), on the same data and schedule."""
    import math

    import torch

    from conftest import train_in_process
    from data.common import open_split
    from data.stream import SequenceStream
    from model import GPT, GPTConfig
    A, steps, lr, min_lr, max_norm, eps = 2, 6, 1e-2, 1e-4, 1.45, 1e-4
    status, _ = train_in_process(["optim=adamw", f"max_steps={steps}", "warmup_steps=0", f"optim.lr={lr}",
                                  f"min_lr={min_lr}", f"grad_clip={max_norm / A}", f"optim.eps={eps / A}",
                                  f"data.dir={token_data}"], tmp_path)
    assert status == 0
    trained = torch.load(tmp_path / "ckpt.pt", weights_only=False)["model"]

    torch.manual_seed(1337)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32))
    opt = torch.optim.AdamW(model.configure_optimizer_groups(0.1), lr=lr, betas=(0.9, 0.95), eps=eps, foreach=False)
    stream = SequenceStream(open_split(token_data, "train"), 32, 1337)
    norms = []
    for step in range(steps):
        for group in opt.param_groups:  # no warmup: the cosine from lr to min_lr over the run
            group["lr"] = min_lr + 0.5 * (1 + math.cos(math.pi * step / steps)) * (lr - min_lr)
        for micro in range(A):  # total_batch_size=4: A micro-batches of 2 sequences
            x, y = stream.batch(4 * step + 2 * micro, 2, torch.device("cpu"))
            _, loss = model(x, y)
            loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item())
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert min(norms) < max_norm < max(norms)  # some steps clip, others do not
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(trained[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
