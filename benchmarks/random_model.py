"""An untrained model of a real backbone's shape, exported to ONNX, for speed and overhead measurements only.

Its predictions mean nothing, but its cost per face is the trained model's: the same trunk, the same input.
``python benchmarks/random_model.py OUT.onnx [--backbone dlib-resnet]``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def random_onnx(dest: Path, backbone: str = "dlib-resnet", seed: int = 0) -> Path:
    import torch

    from agegender.backbones import backbone as spec_of
    from agegender.infer.export import export_onnx
    from agegender.model.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
    from agegender.model.config import ModelConfig
    from agegender.model.net import AgeGenderNet

    spec = spec_of(backbone)
    config = ModelConfig(backbone=backbone, widths=spec.widths, image_size=spec.preprocess.size, hidden=(256,), dropout=(0.0,))
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "random.safetensors"
        save_checkpoint(ckpt, AgeGenderNet(config).eval(), CheckpointMeta(config, spec.preprocess))
        net, meta = load_checkpoint(ckpt)
        export_onnx(net, meta, dest)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="the .onnx file to write")
    parser.add_argument("--backbone", default="dlib-resnet")
    a = parser.parse_args()
    print(random_onnx(Path(a.output), a.backbone))


if __name__ == "__main__":
    main()
