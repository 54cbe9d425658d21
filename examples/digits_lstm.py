"""Classify scikit-learn's 8x8 digits with an LSTM that reads each image as 8 rows of 8 pixels
(mlc.models.RecurrentClassifier: a bidirectional, two-layer LSTM, then a linear head).

    pip install '.[train]' && python examples/digits_lstm.py

Expect about 97% test accuracy in a minute or two on two cores.
"""
import time

import numpy as np
from tqdm import tqdm

import mlc
from mlc.train import digits

mlc.manual_seed(0)
x_train, y_train = digits("train")
x_test, y_test = digits("test")
rows = lambda x: x.reshape(-1, 8, 8)  # noqa: E731  (a sequence of 8 rows)

model = mlc.models.RecurrentClassifier(8, 64, 10, kind="lstm", num_layers=2, bidirectional=True)
optimizer = mlc.optim.Adam(model.parameters(), lr=5e-3)
epochs, batch = 25, 32
scheduler = mlc.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
step = mlc.compile_train_step(model, mlc.nn.functional.cross_entropy, optimizer)

start, rng = time.time(), np.random.default_rng(0)
for epoch in range(epochs):
    model.train()
    order = rng.permutation(len(x_train))
    with tqdm(range(0, len(order), batch), desc=f"epoch {epoch + 1}/{epochs}", leave=False, disable=None) as bar:
        for i in bar:
            idx = order[i: i + batch]
            loss = step(rows(x_train[idx]), y_train[idx])
            bar.set_postfix(loss=f"{float(loss):.3f}")
    scheduler.step()
    model.eval()
    accuracy = (model(rows(x_test)).argmax(1) == y_test).mean()
    print(f"epoch {epoch + 1:2d}  loss {float(loss):.4f}  test accuracy {accuracy:.2%}")
print(f"final test accuracy {accuracy:.2%} in {time.time() - start:.1f} s")
