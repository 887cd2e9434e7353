"""Reproduce examples/digits: a small ResNet-style CNN on scikit-learn's handwritten digits.

    pip install -e ".[torch]" scikit-learn && python examples/digits/train.py

Writes model.onnx (exported by PyTorch as is: BatchNormalization nodes kept, not folded),
data/calibration.npz (the training split) and data/validation.npz (the test split, with labels).
Deterministic for a given seed on CPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def load_split(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # 8x8 pixels valued 0..16 -> 16x16 (each pixel repeated 2x2), scaled to [0, 1]
    x = np.repeat(np.repeat(digits.images, 2, axis=1), 2, axis=2)[:, None].astype(np.float32) / 16.0
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    return x_tr, x_te, y_tr, y_te


def build():  # type: ignore[no-untyped-def]
    import torch
    from torch import nn

    def conv_bn(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)]

    class Residual(nn.Module):
        def __init__(self, c: int):
            super().__init__()
            self.body = nn.Sequential(*conv_bn(c, c), nn.ReLU(), *conv_bn(c, c))
            self.relu = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.relu(self.body(x) + x)

    class DigitsNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                *conv_bn(1, 16),
                nn.ReLU(),
                Residual(16),
                *conv_bn(16, 32, stride=2),
                nn.ReLU(),
                Residual(32),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
            )
            self.fc = nn.Linear(32, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.features(x))

    return DigitsNet()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=40)
    args = ap.parse_args()

    import torch

    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    x_tr, x_te, y_tr, y_te = load_split(args.seed)
    net = build()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    gen = torch.Generator().manual_seed(args.seed)
    for _ in range(args.epochs):
        net.train()
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            loss = torch.nn.functional.cross_entropy(net(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    net.eval()
    with torch.no_grad():
        acc = (net(torch.from_numpy(x_te)).argmax(1).numpy() == y_te).mean()
    print(f"FP32 test accuracy (PyTorch): {acc:.4f} on {len(y_te)} images")

    torch.onnx.export(
        net,
        torch.zeros(1, 1, 16, 16),
        str(HERE / "model.onnx"),
        input_names=["input"],
        output_names=["logits"],
        opset_version=17,
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        dynamo=False,
        training=torch.onnx.TrainingMode.PRESERVE,  # keep BatchNormalization as exported
    )
    (HERE / "data").mkdir(exist_ok=True)
    np.savez_compressed(HERE / "data" / "calibration.npz", input=x_tr)
    np.savez_compressed(HERE / "data" / "validation.npz", input=x_te, labels=y_te)


if __name__ == "__main__":
    main()
