"""The presets, composed by Hydra exactly as train.py composes them.

Fairness: the presets of one model size may differ in the optimizer block (and its min_lr) alone, so that
Sophia, AdamW and Lion share model, data order, batch, schedule, seed, loss scaling and evaluation. By
construction: a preset is a size (configs/size/) plus an optimizer block; and checked: the composed configs
of one size are diffed."""
from collections import defaultdict

import pytest
from omegaconf import OmegaConf

import config_schema
from conftest import REPO_DIR, compose_config, flatten

CONFIGS = REPO_DIR / "configs"

OPTIMIZERS = ["adamw", "lion", "sophiag", "sophiah", "muon"]
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
def test_muon_presets_reuse_the_adamw_hyperparameters(size):
    """Moonlight's recipe: match_rms_adamw gives Muon's update AdamW's RMS, so both parts take AdamW's lr,
    weight decay and schedule."""
    muon, adamw = compose_config(f"gpt2_{size}_muon")["optim"], compose_config(f"gpt2_{size}_adamw")
    assert (muon["lr"], muon["adam_lr"], muon["weight_decay"], muon["betas"], muon["eps"]) == \
        (adamw["optim"]["lr"], None, 0.1, adamw["optim"]["betas"], adamw["optim"]["eps"])
    assert compose_config(f"gpt2_{size}_muon")["min_lr"] == adamw["min_lr"]
    assert (muon["adjust_lr_fn"], muon["momentum"], muon["nesterov"], muon["ns_steps"], muon["ns_dtype"]) == \
        ("match_rms_adamw", 0.95, True, 5, "auto")


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


@pytest.mark.parametrize("other", ["sophiag", "muon"])
def test_shakespeare_presets_differ_only_in_the_optimizer(other):
    preset, adamw = flatten(compose_config(f"shakespeare_{other}")), flatten(compose_config("shakespeare_adamw"))
    differing = {k for k in set(preset) | set(adamw) if preset.get(k) != adamw.get(k)}
    assert differing and all(k.startswith("optim.") for k in differing), sorted(differing)
    # python train.py runs the Sophia preset
    assert flatten(compose_config("shakespeare_sophiag")) == flatten(compose_config())


CHAR_OPTIMIZERS = ["adamw", "lion", "sophiag", "muon"]


def test_char_presets_differ_only_in_the_optimizer_and_end_at_a_tenth_of_lr():
    configs = {opt: flatten(compose_config(f"shakespeare_char_{opt}")) for opt in CHAR_OPTIMIZERS}
    reference = configs["adamw"]
    for opt, flat in configs.items():
        differing = {k for k in set(flat) | set(reference) if flat.get(k) != reference.get(k)}
        assert all(k.startswith("optim.") or k == "min_lr" for k in differing), (opt, sorted(differing))
        assert flat["optim.name"] == opt and flat["min_lr"] == pytest.approx(flat["optim.lr"] / 10, rel=1e-12)
    # the min_lr follows a swept learning rate
    swept = flatten(compose_config("shakespeare_char_sophiag", ["optim.lr=1e-3"]))
    assert swept["min_lr"] == pytest.approx(1e-4, rel=1e-12)
    # nanoGPT's baby GPT, 12 sequences x 64 characters, 2,000 steps
    flat = reference
    assert (flat["model.n_layer"], flat["model.n_head"], flat["model.n_embd"], flat["model.block_size"]) == (4, 4, 128, 64)
    assert flat["model.vocab_size"] == 128 and flat["model.dropout"] == 0.0 and flat["data.name"] == "shakespeare_char"
    assert (flat["total_batch_size"], flat["max_steps"], flat["warmup_steps"], flat["eval_interval"]) == (12, 2000, 100, 200)
    # each evaluation covers at least 100k validation characters (the study's final loss)
    assert flat["eval_steps"] * flat["micro_batch_size"] * flat["model.block_size"] >= 100_000
    assert (configs["sophiag"]["optim.lr"], configs["sophiag"]["optim.rho"]) == (3e-4, 0.5)
    assert (configs["lion"]["optim.lr"], configs["lion"]["optim.weight_decay"]) == (3e-4, 1.0)
    assert configs["adamw"]["optim.lr"] == 2e-3
    muon, adamw = configs["muon"], configs["adamw"]  # Moonlight's recipe: AdamW's values for both parts
    assert [muon[f"optim.{k}"] for k in ("lr", "betas", "weight_decay", "eps")] == \
        [adamw[f"optim.{k}"] for k in ("lr", "betas", "weight_decay", "eps")]
    assert (muon["optim.adam_lr"], muon["optim.adjust_lr_fn"]) == (None, "match_rms_adamw")


# -----------------------------------------------------------------------------------------------------
# min_lr: a ratio of optim.lr where the run's recipe gives one, the official constant where it gives a number.

def test_the_readme_fine_tuning_command_passes_the_checks():
    """A small fine-tuning lr on a BPE preset: its min_lr follows optim.lr down, as the character presets' does,
    instead of staying above it (which check_values refuses)."""
    cfg = config_schema.compose_config("shakespeare_adamw", ["init_from=gpt2", "model.block_size=256",
                                                            "optim.lr=3e-5", "max_steps=200"])
    config_schema.check_values(cfg, world_size=1)
    assert cfg.min_lr == pytest.approx(3e-6, rel=1e-12)


@pytest.mark.parametrize("preset", ["shakespeare_sophiag", "shakespeare_adamw", "shakespeare_muon"])
def test_bpe_presets_end_at_a_tenth_of_lr(preset):
    assert compose_config(preset)["min_lr"] == 1e-4  # exactly the value these presets had before the ratio
    for lr in (3e-5, 2e-3):
        assert compose_config(preset, [f"optim.lr={lr}"])["min_lr"] == pytest.approx(lr / 10, rel=1e-12)
    assert compose_config(preset, ["optim.lr=2e-3", "min_lr=5e-5"])["min_lr"] == 5e-5  # an explicit one wins


# the presets whose recipe states min_lr as a ratio of lr: the value at their own lr, and the ratio
RATIO_PRESETS = {"gpt2_small_lion": (5e-6, 0.05), "gpt2_medium_lion": (5e-6, 0.05), "gpt2_large_lion": (4e-6, 0.05),
                 "gpt2_xl_adamw": (1e-5, 0.05), "gpt2_xl_sophiag": (5e-6, 0.02)}


@pytest.mark.parametrize("preset", RATIO_PRESETS)
def test_ratio_presets_keep_their_min_lr_and_follow_a_changed_lr(preset):
    min_lr, ratio = RATIO_PRESETS[preset]
    assert compose_config(preset)["min_lr"] == min_lr  # exactly, as config.yaml writes it
    assert compose_config(preset, ["optim.lr=1e-5"])["min_lr"] == pytest.approx(ratio * 1e-5, rel=1e-12)


@pytest.mark.parametrize("size, opt", list(OFFICIAL))
def test_official_min_lr_is_a_constant_as_in_the_official_configs(size, opt):
    """The official configs give min_lr as a number, not a ratio: another lr leaves it where it was."""
    lr, min_lr, *_ = OFFICIAL[(size, opt)]
    assert compose_config(f"gpt2_{size}_{opt}", [f"optim.lr={2 * lr}"])["min_lr"] == min_lr


# -----------------------------------------------------------------------------------------------------
# Fair by construction: a preset names a size and an optimizer, and sets the optimizer block alone.

def preset_files():
    return {p.stem: OmegaConf.load(p) for p in sorted((CONFIGS / "config").glob("*.yaml"))}


def test_every_preset_is_a_size_plus_an_optimizer_block():
    sizes = {p.stem for p in (CONFIGS / "size").glob("*.yaml")}
    for name, preset in preset_files().items():
        if name.endswith("_adamw_official"):  # the official AdamW: its fair twin, clip and eps changed
            assert list(preset.defaults) == [name.removesuffix("_official"), "_self_"], name
            assert set(preset) - {"defaults"} == {"grad_clip", "optim"} and set(preset.optim) == {"eps"}, name
            continue
        size, optim = preset.defaults
        assert size["/size"] in sizes and optim["override /optim"] in name, (name, preset.defaults)
        assert name == f"{size['/size']}_{optim['override /optim']}", name
        assert set(preset) - {"defaults"} <= {"min_lr", "optim"}, (name, sorted(preset))


def test_presets_of_every_size_differ_only_in_the_optimizer_block():
    by_size = defaultdict(list)
    for name, preset in preset_files().items():
        if not name.endswith("_official"):
            by_size[preset.defaults[0]["/size"]].append(name)
    assert set(by_size) == {p.stem for p in (CONFIGS / "size").glob("*.yaml")}  # every size has presets
    for size, names in by_size.items():
        configs = {name: flatten(compose_config(name)) for name in names}
        reference = configs[names[0]]
        for name, flat in configs.items():
            differing = {k for k in set(flat) | set(reference) if flat.get(k) != reference.get(k)}
            assert all(k.startswith("optim.") or k == "min_lr" for k in differing), (name, sorted(differing))


def test_train_yaml_holds_the_embedded_runs_values():
    """`python train.py`'s configuration is train.yaml's values, its groups' and the Sophia preset's optimizer
    block: a size changes what differs from the embedded run, so size/shakespeare.yaml sets no training knob."""
    train_yaml = OmegaConf.to_container(OmegaConf.load(CONFIGS / "train.yaml"))
    knobs = flatten({k: v for k, v in train_yaml.items() if k not in ("defaults", "hydra")})
    # as written (min_lr's interpolation too): train.yaml's own value, not only the number it gives at lr 1e-3
    embedded = flatten(OmegaConf.to_container(config_schema.compose_config()))
    assert {k: embedded[k] for k in knobs if k != "wandb.group"} == {k: v for k, v in knobs.items() if k != "wandb.group"}
    shakespeare = OmegaConf.load(CONFIGS / "size" / "shakespeare.yaml")
    assert set(shakespeare) - {"defaults"} == {"wandb"}  # its W&B group name alone


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
