"""Train a small U-Net (mlc.models.UNet: down, bottleneck, ConvTranspose2d up, skip concatenation) to
remove Gaussian noise (sigma 0.3) from scikit-learn's 8x8 digits; reports PSNR on the test images
before and after denoising.

    pip install '.[train]' && python examples/denoise_unet.py [--device cuda]
"""
import argparse
import time

import numpy as np
from tqdm import tqdm

import mlc
import mlc.nn.functional as F
from mlc.train import digits

SIGMA = 0.3
ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the compiled steps run (default cpu)")
mlc.default_backend(ap.parse_args().device)
mlc.manual_seed(0)
rng = np.random.default_rng(0)
clean_train = digits("train")[0].reshape(-1, 1, 8, 8)
clean_test = digits("test")[0].reshape(-1, 1, 8, 8)
noisy_test = (clean_test + SIGMA * rng.standard_normal(clean_test.shape)).astype(np.float32)


def psnr(x, reference):  # images in [0, 1]
    return 10 * np.log10(1.0 / np.mean((np.clip(x, 0, 1) - reference) ** 2))


model = mlc.models.UNet(in_channels=1, out_channels=1, base=16, depth=2)
optimizer = mlc.optim.Adam(model.parameters(), lr=2e-3)
epochs, batch = 30, 32
scheduler = mlc.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
step = mlc.compile_train_step(model, F.mse_loss, optimizer)  # predicts the clean image

start = time.time()
for epoch in range(epochs):
    model.train()
    order = rng.permutation(len(clean_train))
    with tqdm(range(0, len(order), batch), desc=f"epoch {epoch + 1}/{epochs}", leave=False, disable=None) as bar:
        for i in bar:
            clean = clean_train[order[i: i + batch]]
            noisy = (clean + SIGMA * rng.standard_normal(clean.shape)).astype(np.float32)  # fresh noise each time
            loss = step(noisy, clean)
            bar.set_postfix(loss=f"{float(loss):.4f}")
    scheduler.step()
    if epoch % 5 == 4 or epoch == epochs - 1:
        model.eval()
        print(f"epoch {epoch + 1:2d}  loss {float(loss):.4f}  test PSNR {psnr(model(noisy_test), clean_test):.2f} dB")
print(f"test PSNR: noisy {psnr(noisy_test, clean_test):.2f} dB -> denoised {psnr(model(noisy_test), clean_test):.2f} dB "
      f"in {time.time() - start:.1f} s")
