"""Initialisation schemes against theory, and the signal report on good and bad scalings."""

import math
import sys

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from lightning_landscape.init import initialize, load_pretrained, lsuv, signal_report

FAN = 1024


def _std_after(rule, activation=None, dtype=torch.float32):
    layers = [nn.Linear(FAN, FAN, dtype=dtype)] + ([activation] if activation is not None else [])
    model = nn.Sequential(*layers)
    initialize(model, {nn.Linear: rule}, generator=0)
    weight = model[0].weight.detach()
    if weight.is_complex():  # the variance shared evenly by the parts
        assert float(weight.real.std()) == pytest.approx(float(weight.imag.std()), rel=0.05)
    return float(weight.std())  # sqrt(E|w - mean|²) for a complex weight


_TRUNCATED = math.sqrt(
    1 - 2 * 2 * math.exp(-2) / math.sqrt(2 * math.pi) / math.erf(2 / math.sqrt(2))
)


@pytest.mark.parametrize(
    "rule, activation, expected",
    [
        ("kaiming_normal", nn.ReLU(), math.sqrt(2 / FAN)),
        ("kaiming_uniform", nn.ReLU(), math.sqrt(2 / FAN)),
        ("kaiming_normal", nn.Tanh(), 5 / 3 / math.sqrt(FAN)),
        ("xavier_normal", None, math.sqrt(2 / (2 * FAN))),
        ("xavier_uniform", nn.Tanh(), 5 / 3 * math.sqrt(2 / (2 * FAN))),
        ("orthogonal", None, 1 / math.sqrt(FAN)),
        ({"scheme": "normal", "std": 0.02}, None, 0.02),
        ({"scheme": "uniform", "bound": 0.1}, None, 0.1 / math.sqrt(3)),
        ({"scheme": "trunc_normal", "std": 0.05, "cutoff": 2.0}, None, 0.05 * _TRUNCATED),
        ({"scheme": "kaiming_normal", "nonlinearity": "linear"}, nn.ReLU(), 1 / math.sqrt(FAN)),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_scheme_std_matches_theory(rule, activation, expected, dtype):
    """A complex weight (a Fourier layer's) gets the rule's variance as E|w|²."""
    assert _std_after(rule, activation, dtype) == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_are_drawn_in_float32(dtype):
    """torch's CPU QR, behind orthogonal and LSUV, has no half-precision kernel."""
    model = nn.Sequential(nn.Linear(64, 64, dtype=dtype), nn.Tanh())
    initialize(model, {nn.Linear: "orthogonal"}, generator=0)
    weight = model[0].weight.detach()
    assert weight.dtype == dtype
    torch.testing.assert_close(weight.float() @ weight.float().T, torch.eye(64), atol=0.02, rtol=0)
    variances = lsuv(model, torch.randn(256, 64, dtype=dtype), tol=0.1)
    assert abs(variances["0"] - 1) < 0.1


def test_orthogonal_makes_a_complex_weight_unitary():
    model = nn.Sequential(nn.Linear(6, 4, dtype=torch.complex64))
    initialize(model, {nn.Linear: {"scheme": "orthogonal", "gain": 2.0}})
    weight = model[0].weight.detach()
    torch.testing.assert_close(weight @ weight.mH, 4 * torch.eye(4, dtype=weight.dtype))


def test_trunc_normal_bounds_are_in_stds_and_biases_are_zeroed():
    model = nn.Sequential(nn.Linear(256, 256))
    report = initialize(model, {nn.Linear: {"scheme": "trunc_normal", "std": 0.1, "cutoff": 1.5}})
    assert float(model[0].weight.detach().abs().max()) <= 0.15 + 1e-7
    assert float(model[0].bias.detach().abs().max()) == 0.0
    assert [(a.module, a.parameter, a.scheme) for a in report.applied] == [
        ("0", "weight", "trunc_normal"),
        ("0", "bias", "zeros"),
    ]


def test_seeded_and_rules_by_name():
    def build(seed):
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        initialize(model, {r"^2$": "zeros", nn.Linear: "kaiming_normal"}, generator=seed)
        return model

    a, b, c = build(1), build(1), build(2)
    assert torch.equal(a[0].weight, b[0].weight) and not torch.equal(a[0].weight, c[0].weight)
    assert float(a[2].weight.detach().abs().max()) == 0.0  # the name rule came first


def test_a_block_held_under_two_names_answers_to_either(recwarn):
    model = nn.Module()
    model.body = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    model.backbone = model.body  # the alias BackboneFinetuning looks for
    initialize(model, {r"^backbone\.2$": "zeros"})
    assert float(model.body[2].weight.detach().abs().max()) == 0.0
    assert float(model.body[0].weight.detach().abs().max()) > 0.0
    assert not [w for w in recwarn if "matched no module" in str(w.message)]


def test_warnings_for_unmatched_rules_and_symmetric_constants():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    with pytest.warns(UserWarning, match="matched no module"):
        initialize(model, {nn.Conv2d: "kaiming_normal", nn.Linear: "xavier_normal"})
    with pytest.warns(UserWarning, match="stays identical"):
        initialize(model, {r"^0$": "ones"})


@pytest.mark.parametrize(
    "rules, error, match",
    [
        ({nn.Linear: "he"}, ValueError, "unknown scheme"),
        ({nn.Linear: {"scheme": "normal"}}, ValueError, "explicit scale"),
        ({3: "zeros"}, TypeError, "module classes or name regexes"),
    ],
)
def test_bad_rules(rules, error, match):
    with pytest.raises(error, match=match):
        initialize(nn.Linear(2, 2), rules)


@pytest.mark.parametrize("scheme", ["kaiming_normal", {"scheme": "trunc_normal", "std": 0.02}])
def test_a_regex_over_a_block_passes_its_norm_layers_on_to_later_rules(recwarn, scheme):
    """Random schemes leave a norm layer's scale to the next rule: a fan-scaled one used to
    stop initialisation with torch's fan error, a normal draw to all but zero the scale."""
    model = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64), nn.ReLU(), nn.Linear(64, 4))
    report = initialize(model, {"": scheme, nn.LayerNorm: "zeros"}, generator=0)
    drawn = scheme if isinstance(scheme, str) else scheme["scheme"]
    assert [(a.module, a.parameter, a.scheme) for a in report.applied] == [
        ("0", "weight", drawn),
        ("0", "bias", "zeros"),
        ("1", "weight", "zeros"),
        ("1", "bias", "zeros"),
        ("3", "weight", drawn),
        ("3", "bias", "zeros"),
    ]
    assert not bool(model[1].weight.any())
    with pytest.warns(UserWarning, match="fills weights of two or more dimensions"):
        initialize(nn.Sequential(nn.BatchNorm1d(4)), {nn.BatchNorm1d: "xavier_normal"})


def _gate_blocks(weight, gates):
    return weight.detach().chunk(gates)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_recurrent_layers_are_filled_gate_by_gate(bidirectional):
    """Each gate is a linear map of its own: orthogonal per gate, fans per gate."""
    lstm = nn.LSTM(8, 16, num_layers=2, proj_size=4, bidirectional=bidirectional)
    report = initialize(lstm, {nn.LSTM: {"scheme": "orthogonal", "gain": 2.0}}, generator=0)
    filled = {a.parameter for a in report.applied}
    assert filled == {name for name, _ in lstm.named_parameters()}
    for name, weight in lstm.named_parameters():
        if name.startswith("bias"):
            assert not bool(weight.any())
            continue
        for block in _gate_blocks(weight, 1 if name.startswith("weight_hr") else 4):
            small = min(block.shape)
            gram = block @ block.T if block.shape[0] == small else block.T @ block
            torch.testing.assert_close(gram, 4 * torch.eye(small), atol=1e-5, rtol=0)
    hidden, features = 512, 256
    gru = nn.GRU(features, hidden)
    initialize(gru, {nn.GRU: "xavier_normal"}, generator=0)
    for block in _gate_blocks(gru.weight_ih_l0, 3):  # stacked, the fan-out would be 3·hidden
        assert float(block.std()) == pytest.approx(math.sqrt(2 / (features + hidden)), rel=0.03)
    rnn = nn.RNN(features, hidden, nonlinearity="tanh")
    initialize(rnn, {nn.RNN: "xavier_normal"}, generator=0)  # the gain of its own tanh
    assert float(rnn.weight_hh_l0.std()) == pytest.approx(5 / 3 / math.sqrt(hidden), rel=0.03)


@pytest.mark.parametrize("kdim", [None, 6])
def test_attention_projections_are_filled_one_by_one(kdim):
    attention = nn.MultiheadAttention(8, 2, kdim=kdim, vdim=kdim)
    report = initialize(attention, {nn.MultiheadAttention: "orthogonal"}, generator=0)
    if kdim is None:
        projections = attention.in_proj_weight.detach().chunk(3)
        assert not bool(attention.in_proj_bias.any())
    else:
        projections = [attention.q_proj_weight, attention.k_proj_weight, attention.v_proj_weight]
    for weight in projections:
        small = min(weight.shape)
        gram = weight @ weight.T if weight.shape[0] == small else weight.T @ weight
        torch.testing.assert_close(gram.detach(), torch.eye(small), atol=1e-5, rtol=0)
    assert "out_proj" not in {a.module for a in report.applied}  # an nn.Linear of its own


class _TiedLanguageModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(100, 32)
        self.head = nn.Linear(32, 100, bias=False)
        self.head.weight = self.embedding.weight


def test_tied_weights_are_filled_once_by_the_first_rule():
    """The head's rule drew over the embedding's, and the report claimed both."""
    model = _TiedLanguageModel()
    rules = {nn.Embedding: {"scheme": "normal", "std": 0.02}, nn.Linear: "xavier_uniform"}
    with pytest.warns(UserWarning, match="head.weight is embedding.weight \\(tied weights\\)"):
        report = initialize(model, rules, generator=0)
    assert [(a.module, a.scheme) for a in report.applied] == [("embedding", "normal")]
    assert float(model.embedding.weight.detach().std()) == pytest.approx(0.02, rel=0.1)


@pytest.mark.parametrize("kind", [nn.Embedding, nn.EmbeddingBag])
def test_an_embeddings_padding_row_stays_zero(kind):
    """It receives no gradient: a rule's draw there would stay in every padded position."""
    embedding = kind(10, 4, padding_idx=3)
    initialize(embedding, {kind: {"scheme": "normal", "std": 0.02}}, generator=0)
    assert not bool(embedding.weight[3].any()) and bool(embedding.weight[4].all())


@pytest.mark.parametrize(
    "normalise",
    [
        torch.nn.utils.parametrizations.weight_norm,
        torch.nn.utils.parametrizations.spectral_norm,
        torch.nn.utils.weight_norm,
        torch.nn.utils.spectral_norm,
    ],
    ids=["weight_norm", "spectral_norm", "weight_norm_hook", "spectral_norm_hook"],
)
@pytest.mark.filterwarnings("ignore:.*torch.nn.utils.weight_norm.*:FutureWarning")
def test_a_normalised_weight_takes_the_rule_as_a_plain_one_does(normalise):
    """A parametrized weight is computed at each access, and the older hooks recompute it
    before each forward pass: the rule's draw goes where the layer keeps its weight."""
    rule = {nn.Linear: {"scheme": "normal", "std": 0.5}}
    plain, normalised = nn.Linear(32, 32), normalise(nn.Linear(32, 32))
    initialize(plain, rule, generator=0)
    initialize(normalised, rule, generator=0)
    normalised(torch.randn(4, 32))  # a hook recomputes the weight here
    drawn = plain.weight.detach()
    if "spectral" in normalise.__module__ + normalise.__name__:  # the layer divides it by σ₁
        parametrized = hasattr(normalised, "parametrizations")
        raw = (
            normalised.parametrizations.weight.original if parametrized else normalised.weight_orig
        )
        torch.testing.assert_close(raw.detach(), drawn)
    else:
        torch.testing.assert_close(normalised.weight.detach(), drawn)


class _Symmetric(nn.Module):
    """A parametrization without a right inverse (torch's tutorial example)."""

    def forward(self, x):
        return x.triu() + x.triu(1).T


def test_a_parametrization_without_a_right_inverse_is_left_as_it_was():
    model = nn.Sequential(nn.Linear(4, 4))
    torch.nn.utils.parametrize.register_parametrization(model[0], "weight", _Symmetric())
    before = model[0].weight.detach().clone()
    with pytest.warns(UserWarning, match="left 0.weight as it was: .* right_inverse"):
        report = initialize(model, {nn.Linear: "orthogonal"})
    assert torch.equal(model[0].weight.detach(), before)
    assert [a.parameter for a in report.applied] == ["bias"]


def _deep_tanh(rule, depth=10, width=256):
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(width, 10))
    initialize(model, {nn.Linear: rule}, generator=0)
    return model


def test_signal_report_flags_bad_scalings_and_passes_good_ones():
    inputs = torch.randn(128, 256, generator=torch.Generator().manual_seed(0))
    saturating = signal_report(_deep_tanh({"scheme": "normal", "std": 1.0}), inputs)
    assert all("saturating" in layer.flags for layer in saturating.layers[:-1])
    tiny = signal_report(_deep_tanh({"scheme": "normal", "std": 0.01}), inputs)
    assert any("vanishing activations" in layer.flags for layer in tiny.flagged)
    good = signal_report(_deep_tanh("xavier_normal"), inputs)
    assert good.flagged == [], str(good)
    relu = nn.Sequential(
        nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    initialize(relu, {nn.Linear: "kaiming_normal"})
    assert signal_report(relu, inputs).flagged == []


def test_signal_report_flags_a_constant_layer_and_leaves_no_trace():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.BatchNorm1d(16), nn.Linear(16, 4))
    with pytest.warns(UserWarning):
        initialize(model, {r"^0$": "zeros", nn.Linear: "kaiming_normal"})
    model[3].weight.grad = torch.ones_like(model[3].weight)
    inputs = torch.randn(32, 16)
    state = torch.get_rng_state()
    running = model[2].running_mean.clone()
    report = signal_report(model, inputs)
    (first,) = [layer for layer in report.layers if layer.name == "0"]
    assert "symmetric" in first.flags and "vanishing activations" in first.flags
    assert torch.equal(model[3].weight.grad, torch.ones_like(model[3].weight))
    assert torch.equal(torch.get_rng_state(), state) and torch.equal(model[2].running_mean, running)
    assert "landscape/signal/activation_std/0" in report.metrics()
    assert "symmetric" in str(report)


class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 16, batch_first=True)
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        hidden, _ = self.lstm(x)
        attended, _ = self.attention(hidden, hidden, hidden)
        return self.head(attended)


class _WithFeatures(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        features = self.body(x)
        return {"logits": self.head(features), "features": features}


def test_signal_report_sends_its_signal_back_from_the_first_output():
    report = signal_report(_WithFeatures(), torch.randn(32, 16))
    assert [layer.name for layer in report.layers] == ["body", "head"]
    assert all(layer.gradient_std > 0 for layer in report.layers)


def test_signal_report_covers_recurrent_and_attention_layers():
    """Their outputs are tuples, and attention holds its output projection as a child (which
    it applies without calling): they are measured on their first output, and a constant
    gate is caught."""
    model = _Recurrent()
    inputs = torch.randn(4, 5, 8)
    names = [layer.name for layer in signal_report(model, inputs).layers]
    assert names == ["lstm", "attention", "head"]
    initialize(model, {nn.LSTM: "ones", nn.MultiheadAttention: "zeros"})
    flagged = {layer.name: layer.flags for layer in signal_report(model, inputs).flagged}
    assert "symmetric" in flagged["lstm"] and "symmetric" in flagged["attention"]


def test_the_report_and_lsuv_compile_nothing_of_a_compiled_network():
    """Their passes, with hooks and in other grad modes, compiled graphs of their own,
    using up the user's recompile limit; they run it eagerly, and name its layers as the
    user does."""
    torch._dynamo.reset()
    network = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    compiled = torch.compile(network, backend="aot_eager")
    inputs = torch.randn(32, 16)
    compiled(inputs)  # the user's own graph
    graphs = counters["stats"]["unique_graphs"]
    names = [layer.name for layer in signal_report(compiled, inputs).layers]
    variances = lsuv(compiled, inputs)
    assert counters["stats"]["unique_graphs"] == graphs
    assert names == list(variances) == ["0", "2"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_report_and_lsuv_leave_the_gpu_s_random_stream_where_it_was():
    model = nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.5), nn.Linear(16, 4)).cuda()
    inputs = torch.randn(32, 16, device="cuda")
    state = torch.cuda.get_rng_state()
    signal_report(model, inputs)  # its dropout masks and backward signal drawn on the GPU
    lsuv(model, inputs)
    assert torch.equal(torch.cuda.get_rng_state(), state)


@pytest.mark.parametrize("kind", ["tanh_mlp", "complex_mlp", "cnn"])
def test_lsuv_brings_every_layer_to_unit_variance(kind):
    """A complex layer's variance is E|z - mean|²."""
    torch.manual_seed(0)
    if kind.endswith("mlp"):
        dtype = torch.complex64 if kind == "complex_mlp" else torch.float32
        layers = []
        for _ in range(10):
            layers += [nn.Linear(64, 64, dtype=dtype), nn.Tanh()]
        model, inputs = nn.Sequential(*layers), 3 * torch.randn(256, 64, dtype=dtype)
    else:
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(8 * 8 * 8, 10),
        )
        inputs = torch.randn(64, 3, 8, 8)
    variances = lsuv(model, inputs, tol=0.1)
    assert len(variances) == (10 if kind.endswith("mlp") else 3)
    assert all(abs(v - 1) < 0.1 for v in variances.values()), variances
    with pytest.raises(ValueError, match="`tol`"):
        lsuv(model, inputs, tol=0)


def test_lsuv_passes_over_a_layer_the_forward_pass_does_not_call():
    """``nn.MultiheadAttention`` applies its ``out_proj`` weight without calling it: no
    output to rescale by, where an IndexError used to stop the run."""
    torch.manual_seed(0)
    model = _Recurrent()
    with pytest.warns(UserWarning, match="attention.out_proj left orthogonal"):
        variances = lsuv(model, torch.randn(64, 5, 8), tol=0.05)
    assert list(variances) == ["head"] and abs(variances["head"] - 1) < 0.05
    weight = model.attention.out_proj.weight.detach()
    torch.testing.assert_close(weight @ weight.T, torch.eye(16), atol=1e-5, rtol=0)


class _Block(nn.Module):
    """A residual block: x + bn2(conv2(relu(bn1(conv1(x)))))."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)

    def forward(self, x):
        return x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


def test_zero_gamma_zeroes_the_last_norm_of_each_block_after_the_other_rules():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), _Block(), _Block())
    report = initialize(
        model, {nn.BatchNorm2d: "ones", _Block: "zero_gamma", nn.Conv2d: "kaiming_normal"}
    )
    for block in (model[1], model[2]):
        assert bool((block.bn2.weight == 0).all()) and bool((block.bn1.weight == 1).all())
    zeroed = [a.module for a in report.applied if a.scheme == "zero_gamma"]
    assert zeroed == ["1.bn2", "2.bn2"]
    x = torch.randn(2, 4, 5, 5)
    assert torch.equal(model[1].eval()(x), x)  # every residual branch starts as the identity


def _pretrained_pair():
    source = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    target = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.Linear(4, 2))
    return source, target


def test_load_pretrained_reports_and_reinitializes_what_does_not_fit(tmp_path):
    source, target = _pretrained_pair()
    path = tmp_path / "weights.pt"
    torch.save({f"backbone.{k}": v for k, v in source.state_dict().items()}, path)
    with torch.no_grad():
        for p in target.parameters():
            p.fill_(7.0)  # stale values: nothing may keep them
    report = load_pretrained(
        target, path, key_map={r"^backbone\.": ""}, rules={nn.Linear: "xavier_normal"}, generator=1
    )
    assert report.loaded == ["0.weight", "0.bias"]
    assert report.mismatched == [("2.weight", (3, 5), (4, 5)), ("2.bias", (3,), (4,))]
    assert report.missing == ["3.weight", "3.bias"] and report.unexpected == []
    assert report.reinitialized == ["2", "3"]
    assert torch.equal(target[0].weight, source[0].weight)
    for layer in (target[2], target[3]):
        assert not bool((layer.weight == 7).any()) and bool((layer.bias == 0).all())
    assert "mismatched" in str(report) and "(3, 5) -> (4, 5)" in str(report)


def test_load_pretrained_without_rules_resets_and_strict_raises():
    source, target = _pretrained_pair()
    state = dict(source.state_dict(), extra=torch.zeros(1))
    with torch.no_grad():
        target[3].weight.fill_(7.0)
    report = load_pretrained(target, state)
    assert report.unexpected == ["extra"] and not bool((target[3].weight == 7).any())
    with pytest.raises(ValueError, match="strict=True"):
        load_pretrained(target, state, strict=True)
    with pytest.raises(TypeError, match="`source`"):
        load_pretrained(target, [1, 2])
    ckpt = {"state_dict": target.state_dict(), "epoch": 3}
    assert load_pretrained(_pretrained_pair()[1], ckpt, strict=True).missing == []


class _Holder(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net


def test_load_pretrained_matches_the_names_wrappers_add(recwarn):
    """torch.compile adds ``_orig_mod.`` and DDP a leading ``module.``: weights saved from
    a compiled or wrapped model load into a plain one, and a plain one's into a model that
    compiles its network (no compilation happens until a call)."""
    source = _pretrained_pair()[0]
    plain = dict(source.state_dict())
    sources_and_targets = [
        (torch.compile(source).state_dict(), _pretrained_pair()[0]),
        ({f"module.{k}": v for k, v in plain.items()}, _pretrained_pair()[0]),
        ({f"net.{k}": v for k, v in plain.items()}, _Holder(torch.compile(_pretrained_pair()[0]))),
    ]
    for state, target in sources_and_targets:
        report = load_pretrained(target, state, strict=True)
        assert len(report.loaded) == 4 and not report.unexpected
        loaded = [v for k, v in target.state_dict().items() if k.endswith("weight")]
        assert torch.equal(loaded[0], source[0].weight)
    assert not [w for w in recwarn if "fits the model" in str(w.message)]
    with pytest.warns(UserWarning, match="none of the source's 4 tensors fits the model"):
        load_pretrained(_pretrained_pair()[0], {f"backbone.{k}": v for k, v in plain.items()})


def test_rules_find_a_compiled_networks_layers_by_their_own_names(recwarn):
    network = _pretrained_pair()[0]
    initialize(_Holder(torch.compile(network)), {r"^net\.0$": "zeros"})
    assert not bool(network[0].weight.any()) and bool(network[2].weight.any())
    assert not [w for w in recwarn if "matched no module" in str(w.message)]


def test_load_pretrained_reads_safetensors_files(tmp_path, monkeypatch):
    """The Hugging Face Hub's format; without the package, the error names the extra."""
    from safetensors.torch import save_file

    source, target = _pretrained_pair()
    path = tmp_path / "model.safetensors"
    save_file(source.state_dict(), path)
    report = load_pretrained(target, path)
    assert set(report.loaded) == {"0.weight", "0.bias"}  # the file keeps its keys sorted
    assert torch.equal(target[0].weight, source[0].weight)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # as if not installed
    with pytest.raises(ImportError, match="lightning-landscape\\[pretrained\\]"):
        load_pretrained(target, str(path))


def test_rules_name_module_classes_by_import_path():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="the rule 'Linear' matched no module"):
        report = initialize(model, {"torch.nn.Linear": "zeros", r"Linear": "ones"})
    assert bool((model[0].weight == 0).all()) and bool((model[2].weight == 0).all())
    assert {a.scheme for a in report.applied} == {"zeros"}
