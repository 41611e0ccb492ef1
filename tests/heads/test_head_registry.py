"""The head registry: every registered head builds, trains and reads its hyper-parameters from
the config; `create_head` and the registry's errors."""
import pytest
import torch

from head_helpers import DIMS, batch, one_thread  # noqa: F401  (one_thread: autouse fixture)
from mmtag.errors import MmtagError
from mmtag.heads import HEADS, FeatureBatch, create_head


@pytest.mark.parametrize("name", sorted(HEADS))
def test_every_head_gives_logits_per_class(name):
    head = create_head(name, DIMS, 3, hidden=16)
    assert head(batch()).logits.shape == (5, 3)


def test_unknown_head_lists_the_registry():
    with pytest.raises(MmtagError, match="concat"):
        create_head("nope", DIMS, 3)


def separable_problem(n=64, classes=3, seed=0):
    """Labels are the signs of a latent code that both modalities (and every token) carry."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, classes, generator=g)
    y = (z > 0).float()
    tokens = z[:, None, :] @ torch.randn(classes, 12, generator=g) + 0.3 * torch.randn(n, 4, 12, generator=g)
    feats = FeatureBatch({"image": tokens.mean(1), "image_tokens": tokens,
                         "text": z @ torch.randn(classes, 8, generator=g) + 0.1 * torch.randn(n, 8, generator=g)})
    return feats, y


def train_loss(head, feats, y):
    out = head(feats)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    return bce(out.logits, y) + sum(bce(v, y) for v in out.branches.values())


@pytest.mark.parametrize("name", sorted(HEADS))
def test_every_head_trains(name):
    torch.manual_seed(0)
    feats, y = separable_problem()
    head = create_head(name, DIMS, 3, hidden=32)
    with torch.no_grad():
        before = float(train_loss(head.eval(), feats, y))
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2)
    head.train()
    for _ in range(30):
        loss = train_loss(head, feats, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(train_loss(head.eval(), feats, y))
    assert after < 0.35 * before, (before, after)


# ------------------------------------------------------------------ hyper-parameters from config
# Fingerprints of each head built with the defaults at seed 0 on DIMS with 3 classes, recorded from
# fusion.py as it was when the hyper-parameters were module constants (hidden 512, dropout 0.5,
# PROJ_DIM 256, IMAGE_INPUT_DROPOUT 0.5, GATE_HIDDEN 64, 4 attention heads): a hash of the
# state_dict's names and shapes, every Dropout's p in module order, and the sum of all initial
# values, so parameter layout, creation order (random-number consumption) and init all match; and
# a hash of every initial value, recorded (torch 2.13.0) while the sums still matched.
BEFORE_OPTIONS = {
    "concat": ("54524264b7b55b85", (0.5, 0.0, 0.5, 0.5), 7.436027, "5ccff25672748922"),
    "concat+mean": ("b33c5e3eaed0c65a", (0.5, 0.5, 0.5, 0.0, 0.5, 0.5), 49.892718, "0574ef01344266c5"),
    "gated": ("945e48e3ed3fc701", (0.5, 0.5, 0.5), 46.122939, "584c60da7fbd58af"),
    "image": ("0d51cb7368c9b2c9", (0.5,), 2.692219, "7ba50730f6a7f52e"),
    "mean": ("e7a22f9fdd5c2e2c", (0.5, 0.5), 30.45388, "fe36bee9bc12c7d2"),
    "text": ("b134c1b4e4e55249", (0.5,), -6.851137, "8c8558b12d71f5bf"),
    "union": ("e7a22f9fdd5c2e2c", (0.5, 0.5), 30.45388, "fe36bee9bc12c7d2"),
    "xattn": ("8cd50ed1654ba096", (0.5, 0.5, 0.0, 0.5, 0.5), 285.747773, "617a9c52e8b16155"),
    "xattn+mean": ("fc75deb04fb22622", (0.5, 0.5, 0.5, 0.5, 0.0, 0.5, 0.5), 345.690095, "a433269e85120b7f"),
}


def fingerprint(head):
    import hashlib

    state = head.state_dict()
    layout = "\n".join(f"{k} {tuple(v.shape)}" for k, v in state.items())
    drops = tuple(m.p for m in head.modules() if isinstance(m, torch.nn.Dropout))
    values = hashlib.sha256()  # every initial value, exactly (a sum can hide a changed init)
    for name, v in state.items():
        values.update(name.encode())
        values.update(v.detach().contiguous().numpy().tobytes())
    return (hashlib.sha256(layout.encode()).hexdigest()[:16], drops,
            sum(float(v.double().sum()) for v in state.values()), values.hexdigest()[:16])


@pytest.mark.parametrize("name", sorted(BEFORE_OPTIONS))
def test_default_hyper_parameters_build_the_heads_of_before(name):
    from mmtag.config import ModelConfig

    torch.manual_seed(0)
    layout, drops, total, values = fingerprint(create_head(name, DIMS, 3, ModelConfig()))
    want_layout, want_drops, want_total, want_values = BEFORE_OPTIONS[name]
    assert (layout, drops) == (want_layout, want_drops)
    assert total == pytest.approx(want_total, abs=1e-5)  # the sum recorded from fusion.py then
    assert values == want_values  # recorded when the sum still matched: the same init, exactly


def test_every_head_reads_its_hyper_parameters_from_declared_model_options():
    """One source of truth: what a head reads is a ModelConfig field with a declared range, so it
    is validated, written to config.yaml and read back by `Tagger.load`."""
    import dataclasses

    from mmtag.config import ModelConfig

    options = {f.name: f for f in dataclasses.fields(ModelConfig)}
    for name, cls in HEADS.items():
        for p in cls.params:
            assert p in options and options[p].metadata["check"] is not None, (name, p)


def test_hyper_parameters_come_from_the_config_then_the_overrides():
    from mmtag.config import ModelConfig

    model = ModelConfig(hidden=16, proj_dim=32, image_input_dropout=0.1, attention_heads=2, gate_hidden=8)
    xattn = create_head("xattn", DIMS, 3, model)
    assert xattn.query[1].out_features == 32 and xattn.attn.heads == 2
    assert xattn.image[1].p == 0.1 and xattn.net[1].in_features == 3 * 32
    assert xattn.attention_weights(batch()).shape == (5, 2, 4)
    assert create_head("xattn+mean", DIMS, 3, model).fused.attn.heads == 2
    gated = create_head("gated", DIMS, 3, model)
    assert gated.gate[1].out_features == 8 and gated.image[1].out_features == 16
    assert create_head("concat", DIMS, 3, model, proj_dim=24).aux_text.in_features == 24
    assert create_head("mean", DIMS, 3, model, proj_dim=24)(batch()).logits.shape == (5, 3)  # not read
    with pytest.raises(MmtagError, match="unknown head hyper-parameter.*'projdim'"):
        create_head("concat", DIMS, 3, projdim=24)
    with pytest.raises(MmtagError, match="divisible"):
        create_head("xattn", DIMS, 3, proj_dim=30, attention_heads=4)


def test_a_head_with_its_own_hyper_parameter_needs_no_change_to_create_head():
    """A head names the options it reads; `create_head` and its callers pass them unchanged."""
    from mmtag.config import ModelConfig
    from mmtag.heads import LateFusionHead, register_head

    @register_head("toy-gate")
    class ToyGate(LateFusionHead):
        params = LateFusionHead.params + ("gate_hidden",)

        def __init__(self, dims, num_classes, *, hidden, dropout, gate_hidden):
            super().__init__(dims, num_classes, hidden=hidden, dropout=dropout)
            self.gate = torch.nn.Linear(dims["image"], gate_hidden)

    @register_head("toy-unknown")
    class ToyUnknown(LateFusionHead):
        params = LateFusionHead.params + ("nope",)

    try:
        assert create_head("toy-gate", DIMS, 3, ModelConfig(gate_hidden=5)).gate.out_features == 5
        with pytest.raises(MmtagError, match="'nope', which is no model option"):
            create_head("toy-unknown", DIMS, 3)
    finally:
        HEADS.pop("toy-gate")
        HEADS.pop("toy-unknown")
