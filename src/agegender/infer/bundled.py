"""The bundled model as a PyTorch network, for the exports that need one (Keras, SavedModel, torch.export).

The package ships the bundled model's ONNX file and, beside it, the float32 weights of its heads. The trunk is
dlib's ResNet unchanged, so it comes from the `train` extra's copy of dlib's file, checked against the sha256 the
heads were trained on: the network rebuilt here is the one the ONNX file was made from, before quantisation.
"""

from __future__ import annotations

from ..errors import AgeGenderError
from ..model.checkpoint import CheckpointMeta, read_meta
from ..model.net import AgeGenderNet


def bundled_network() -> tuple[AgeGenderNet, CheckpointMeta]:
    """The bundled model's network in eval mode, and its metadata."""
    from safetensors.torch import load_file

    from ..backbones import backbone
    from ..weights.pretrained import load_pretrained
    from ..weights.zoo import HEADS

    path = HEADS.verified()
    meta = read_meta(path)
    trunk = load_pretrained(backbone(meta.config.backbone))
    if meta.weights_sha256 and trunk.sha256 != meta.weights_sha256:
        raise AgeGenderError(
            f"{trunk.path}: the backbone's weights have sha256 {trunk.sha256[:16]}..., but the "
            f"bundled heads were trained on {meta.weights_sha256[:16]}...; reinstall "
            f"face-recognition-models==0.3.0"
        )
    net = AgeGenderNet(meta.config)
    net.load_trunk(trunk.state)
    heads = load_file(str(path))
    missing, unexpected = net.load_state_dict(heads, strict=False)
    if unexpected or any(not k.startswith("trunk.") for k in missing):
        raise AgeGenderError(
            f"{path}: the bundled heads do not fit the network (missing "
            f"{[k for k in missing if not k.startswith('trunk.')][:3]}, unexpected {unexpected[:3]})"
        )
    return net.eval(), meta
