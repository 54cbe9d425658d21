"""The model zoo: ResNet-18 against a torch ResNet-18 (torchvision's layout, written out here), each
model's compiled training loop for a few steps on the CPU, and export to IR that the command line
trains."""
import subprocess
import sys

import numpy as np
import pytest

import mlc
import mlc.nn.functional as F

torch = pytest.importorskip("torch")
rng = np.random.default_rng(0)


# --- a torch ResNet-18 with torchvision's module names ------------------------------------------------

class TorchBasicBlock(torch.nn.Module):
    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        nn = torch.nn
        self.conv1, self.bn1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False), nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + identity)


class TorchResNet18(torch.nn.Module):
    def __init__(self, num_classes=1000, width=64):
        super().__init__()
        nn = torch.nn
        self.conv1, self.bn1 = nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width)
        self.relu, self.maxpool = nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        planes = width
        for i in range(4):
            out = width * 2 ** i
            setattr(self, f"layer{i + 1}", nn.Sequential(TorchBasicBlock(planes, out, 1 if i == 0 else 2), TorchBasicBlock(out, out)))
            planes = out
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(planes, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def randomise_batch_norms(model):
    """Running statistics other than 0 and 1, so evaluation mode is really tested."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    return model


def test_resnet18_on_a_224_image_matches_torch():
    torch.manual_seed(0)
    reference = randomise_batch_norms(TorchResNet18()).eval()
    model = mlc.models.resnet18()
    assert list(model.state_dict()) == list(reference.state_dict())
    model.load_state_dict(reference.state_dict())
    x = rng.standard_normal((1, 3, 224, 224)).astype(np.float32)
    want = reference(torch.tensor(x)).detach().numpy()
    np.testing.assert_allclose(model.eval()(x), want, rtol=1e-3, atol=1e-4)  # compiled for the CPU


@pytest.mark.slow  # (69 s; ResNet-18 inference vs torch, the DigitsCNN loop and the conv/batch-norm gradients run by default)
def test_narrow_resnet18_trains_like_torch_for_a_step():
    torch.manual_seed(0)
    reference = TorchResNet18(num_classes=10, width=8)
    model = mlc.models.resnet18(10, width=8)
    model.load_state_dict(reference.state_dict())
    opt, topt = mlc.optim.SGD(model.parameters(), lr=0.02), torch.optim.SGD(reference.parameters(), lr=0.02)
    step = mlc.compile_train_step(model, F.cross_entropy, opt)
    for _ in range(1):  # later steps drift apart: f32 against f64 drifts as much (batch norm over 4 images is chaotic)
        x, y = rng.standard_normal((4, 3, 32, 32)).astype(np.float32), rng.integers(0, 10, 4)
        topt.zero_grad()
        want = torch.nn.functional.cross_entropy(reference(torch.tensor(x)), torch.tensor(y))
        want.backward()
        topt.step()
        np.testing.assert_allclose(step(x, y), want.item(), rtol=1e-5)
    for key, value in reference.state_dict().items():
        np.testing.assert_allclose(model.state_dict()[key], value.numpy(), rtol=1e-3, atol=3e-5, err_msg=key)


# --- each model's training loop, a few compiled steps -----------------------------------------------------

def tokens(n, length, vocab):
    return rng.integers(0, vocab, (n, length))


CASES = {
    "MLP": (lambda: mlc.models.MLP(64, (32,), 10), lambda: (rng.random((16, 64), np.float32), rng.integers(0, 10, 16)), F.cross_entropy),
    "DigitsCNN": (lambda: mlc.models.DigitsCNN(), lambda: (rng.random((16, 64), np.float32), rng.integers(0, 10, 16)), F.cross_entropy),
    "LeNet": (lambda: mlc.models.LeNet(), lambda: (rng.random((4, 1, 28, 28), np.float32), rng.integers(0, 10, 4)), F.cross_entropy),
    "UNet": (lambda: mlc.models.UNet(base=4), lambda: (rng.random((4, 1, 8, 8), np.float32), rng.random((4, 1, 8, 8), np.float32)), F.mse_loss),
    "LSTM": (lambda: mlc.models.RecurrentClassifier(8, 16, 10, "lstm", 2, bidirectional=True),
             lambda: (rng.random((16, 8, 8), np.float32), rng.integers(0, 10, 16)), F.cross_entropy),
    "GRU": (lambda: mlc.models.RecurrentClassifier(8, 16, 10, "gru"), lambda: (rng.random((16, 8, 8), np.float32), rng.integers(0, 10, 16)),
            F.cross_entropy),
    "LSTMSeq2Seq": (lambda: mlc.models.LSTMSeq2Seq(12, 8, 16), lambda: (tokens(8, 6, 12), tokens(8, 6, 12), tokens(8, 6, 12)),
                    lambda logits, t: F.cross_entropy(logits.reshape(-1, 12), t.reshape(-1))),
    "TransformerClassifier": (lambda: mlc.models.TransformerClassifier(8, 10, 16, 2, 1, 32),
                              lambda: (rng.random((8, 8, 8), np.float32), rng.integers(0, 10, 8)), F.cross_entropy),
    "TransformerSeq2Seq": (lambda: mlc.models.TransformerSeq2Seq(12, 16, 2, 1, 1, 32),
                           lambda: (tokens(8, 6, 12), tokens(8, 6, 12), tokens(8, 6, 12)),
                           lambda logits, t: F.cross_entropy(logits.reshape(-1, 12), t.reshape(-1))),
}


# the larger of them (20-60 s each to compile and step) run with MLC_RUN_SLOW=1: the default suite has
# a CNN, both recurrent cells, a Transformer and the MLP
LARGER = {"LeNet", "UNet", "LSTMSeq2Seq", "TransformerSeq2Seq", "LSTM"}  # (the GRU loop and test_grad's LSTM gradients run by default)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in LARGER else n for n in CASES])
def test_training_loop_lowers_the_loss(name):
    """Ten Adam steps on one batch (compiled for the CPU) drive its loss down, and the trained model's
    inference agrees with the interpreter's."""
    make, batch, loss_fn = CASES[name]
    mlc.manual_seed(0)
    model = make()
    step = mlc.compile_train_step(model, loss_fn, mlc.optim.Adam(model.parameters(), lr=1e-2))
    data = batch()
    losses = [float(step(*data)) for _ in range(10)]
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0], losses
    model.eval()
    inputs = data[:-1]
    with_interp = mlc.jit(lambda *xs: model(*xs), backend="interp")(*inputs)
    np.testing.assert_allclose(model(*inputs), with_interp, rtol=1e-4, atol=1e-4)


def test_gan_steps_alternate_on_shared_weights():
    mlc.manual_seed(0)
    G, D = mlc.models.Generator(8, 8), mlc.models.Discriminator(8)
    opt_g, opt_d = mlc.optim.Adam(G.parameters(), lr=2e-3, betas=(0.5, 0.999)), mlc.optim.Adam(D.parameters(), lr=2e-3, betas=(0.5, 0.999))

    def d_loss(real, z):
        return (F.binary_cross_entropy_with_logits(D(real), mlc.ones((real.shape[0], 1)))
                + F.binary_cross_entropy_with_logits(D(G(z)), mlc.zeros((z.shape[0], 1))))
    step_d = mlc.compile_train_step(None, d_loss, opt_d, dynamic_batch=False)
    step_g = mlc.compile_train_step(None, lambda z: F.binary_cross_entropy_with_logits(D(G(z)), mlc.ones((z.shape[0], 1))), opt_g,
                                    dynamic_batch=False)
    real = rng.random((8, 1, 8, 8), np.float32) * 2 - 1
    g_before, d_before = G.state_dict()["net.0.weight"].copy(), D.state_dict()["net.0.weight"].copy()
    for _ in range(3):
        z = rng.standard_normal((8, 8)).astype(np.float32)
        d_weights = D.state_dict()["net.0.weight"].copy()
        step_d(real, z)
        assert not np.array_equal(D.state_dict()["net.0.weight"], d_weights)
        g_weights, d_weights = G.state_dict()["net.0.weight"].copy(), D.state_dict()["net.0.weight"].copy()
        step_g(z)  # moves G only, and sees the D that step_d just trained
        assert not np.array_equal(G.state_dict()["net.0.weight"], g_weights)
        assert np.array_equal(D.state_dict()["net.0.weight"], d_weights)
    assert not np.array_equal(G.state_dict()["net.0.weight"], g_before) and not np.array_equal(D.state_dict()["net.0.weight"], d_before)


# --- export -----------------------------------------------------------------------------------------------

def test_export_writes_ir_the_command_line_compiles_and_trains(tmp_path):
    mlc.manual_seed(0)
    model = mlc.models.DigitsCNN()
    x, y = rng.random((5, 64), np.float32), np.arange(5)
    path = tmp_path / "cnn.ir"
    module = mlc.export(model, x, path=path, loss_fn=F.cross_entropy, target=y)
    assert list(module.functions) == ["forward", "loss"]
    assert "mlc.global @features.0.weight : tensor<16x1x3x3xf32> {init = dense<" in path.read_text()
    exe = mlc.compile(mlc.load(path))
    np.testing.assert_allclose(exe.forward(x[:3]), model.eval()(x[:3]), rtol=1e-5, atol=1e-6)  # any batch size
    trained = tmp_path / "trained.mlcz"
    run = subprocess.run([sys.executable, "-m", "mlc", "train", str(path), "--data", "digits", "--eval", "digits",
                          "--epochs", "2", "-o", str(trained), "--quiet"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert trained.exists()


def test_trace_of_a_module_names_globals_by_state_dict_keys():
    model = mlc.nn.Sequential(mlc.nn.Linear(3, 2), mlc.nn.ReLU())
    text = str(mlc.trace(model, np.zeros((1, 3), np.float32)))
    assert 'mlc.global @"0.weight" : tensor<2x3xf32>' in text and "func.func @forward(" in text
