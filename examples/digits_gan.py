"""A DCGAN-style GAN (mlc.models.Generator / Discriminator) on scikit-learn's 8x8 digits: two
optimisers, two compiled training steps that share the models' weights, alternating; saves a grid
of generated digits as examples/digits_gan.png.

    pip install '.[train]' && python examples/digits_gan.py [--device cuda]
"""
import os
import argparse
import time

import numpy as np
from tqdm import tqdm

import mlc
import mlc.nn.functional as F
from mlc.train import digits

LATENT = 32
ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the compiled steps run (default cpu)")
mlc.default_backend(ap.parse_args().device)
mlc.manual_seed(0)
rng = np.random.default_rng(0)
images = digits("train")[0].reshape(-1, 1, 8, 8) * 2 - 1  # in [-1, 1], as the generator's tanh

G, D = mlc.models.Generator(LATENT, 32), mlc.models.Discriminator(32)
opt_g = mlc.optim.Adam(G.parameters(), lr=2e-3, betas=(0.5, 0.999))
opt_d = mlc.optim.Adam(D.parameters(), lr=2e-3, betas=(0.5, 0.999))


def d_loss(real, z):  # the discriminator learns real -> 1, generated -> 0 (only D's weights move)
    ones, zeros = mlc.ones((real.shape[0], 1)), mlc.zeros((z.shape[0], 1))
    return F.binary_cross_entropy_with_logits(D(real), ones) + F.binary_cross_entropy_with_logits(D(G(z)), zeros)


def g_loss(z):  # the generator learns to make D say 1 (only G's weights move)
    return F.binary_cross_entropy_with_logits(D(G(z)), mlc.ones((z.shape[0], 1)))


step_d = mlc.compile_train_step(None, d_loss, opt_d, dynamic_batch=False)
step_g = mlc.compile_train_step(None, g_loss, opt_g, dynamic_batch=False)

epochs, batch = 60, 64
start = time.time()
for epoch in range(epochs):
    order = rng.permutation(len(images))
    with tqdm(range(0, len(order) - batch + 1, batch), desc=f"epoch {epoch + 1}/{epochs}", leave=False, disable=None) as bar:
        for i in bar:
            real = images[order[i: i + batch]]
            noise = lambda: rng.standard_normal((batch, LATENT)).astype(np.float32)  # noqa: E731
            ld = step_d(real, noise())
            lg = step_g(noise())
            bar.set_postfix(d=f"{float(ld):.3f}", g=f"{float(lg):.3f}")
    if epoch % 10 == 9:
        print(f"epoch {epoch + 1:2d}  D loss {float(ld):.3f}  G loss {float(lg):.3f}")
    if not (np.isfinite(ld) and np.isfinite(lg)):
        raise SystemExit("training diverged")

G.eval()
samples = G(rng.standard_normal((64, LATENT)).astype(np.float32))
grid = (samples.reshape(8, 8, 8, 8).transpose(0, 2, 1, 3).reshape(64, 64) + 1) / 2
path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_gan.png")
import matplotlib  # noqa: E402
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
plt.imsave(path, np.clip(grid, 0, 1), cmap="gray")
print(f"D loss {float(ld):.3f}, G loss {float(lg):.3f} after {epochs} epochs in {time.time() - start:.1f} s; samples in {path}")
