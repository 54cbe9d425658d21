"""Classify scikit-learn's 8x8 digits with a model from mlc.models, trained by one compiled step.

    pip install '.[train]' && python examples/digits.py --model cnn     # DigitsCNN: about 99%
    python examples/digits.py --model lstm    # a 2-layer bidirectional LSTM over the 8 rows: about 98%
    python examples/digits.py --model mlp

Each takes a minute or so on two cores (a few seconds of it compiling, once).
"""
import argparse
import time

import numpy as np
from tqdm import tqdm

import mlc
from mlc.train import digits

MODELS = {  # model, how it sees an image (a row of 64 pixels), epochs, learning rate
    "cnn": (lambda: mlc.models.DigitsCNN(), lambda x: x, 20, 3e-3),
    "lstm": (lambda: mlc.models.RecurrentClassifier(8, 64, 10, "lstm", num_layers=2, bidirectional=True),
             lambda x: x.reshape(-1, 8, 8), 25, 5e-3),  # a sequence of 8 rows
    "mlp": (lambda: mlc.models.MLP(64, (256, 128), 10), lambda x: x, 30, 3e-3),
}

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--model", choices=MODELS, default="cnn")
ap.add_argument("--batch-size", type=int, default=32)
ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the compiled steps run (default cpu)")
args = ap.parse_args()
mlc.default_backend(args.device)
make, view, epochs, lr = MODELS[args.model]

mlc.manual_seed(0)
x_train, y_train = digits("train")
x_test, y_test = digits("test")
model = make()
optimizer = mlc.optim.Adam(model.parameters(), lr=lr)
scheduler = mlc.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
step = mlc.compile_train_step(model, mlc.nn.functional.cross_entropy, optimizer)

start, rng = time.time(), np.random.default_rng(0)
for epoch in range(epochs):
    model.train()
    order = rng.permutation(len(x_train))
    with tqdm(range(0, len(order), args.batch_size), desc=f"epoch {epoch + 1}/{epochs}", leave=False, disable=None) as bar:
        for i in bar:
            idx = order[i: i + args.batch_size]
            loss = step(view(x_train[idx]), y_train[idx])
            bar.set_postfix(loss=f"{float(loss):.3f}")
    scheduler.step()
    model.eval()
    accuracy = (model(view(x_test)).argmax(1) == y_test).mean()
    print(f"epoch {epoch + 1:2d}  loss {float(loss):.4f}  test accuracy {accuracy:.2%}")
print(f"{args.model}: final test accuracy {accuracy:.2%} in {time.time() - start:.1f} s")
