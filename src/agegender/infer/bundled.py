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
    import torch
    from safetensors.torch import load_file

    from ..files import sha256_file
    from ..model.backbones import DLIB_RESNET
    from ..weights.dlib_dat import read_dlib_resnet
    from ..weights.locate import packaged_weights
    from ..weights.zoo import HEADS

    path = HEADS.verified()
    meta = read_meta(path)
    trunk_file = packaged_weights(DLIB_RESNET.weights)
    digest = sha256_file(trunk_file)
    if meta.weights_sha256 and digest != meta.weights_sha256:
        raise AgeGenderError(f"{trunk_file}: dlib's ResNet has sha256 {digest[:16]}..., but the bundled heads were "
                             f"trained on {meta.weights_sha256[:16]}...; reinstall face-recognition-models==0.3.0")
    net = AgeGenderNet(meta.config)
    net.load_trunk({k: torch.from_numpy(v) for k, v in read_dlib_resnet(trunk_file).items()})
    heads = load_file(str(path))
    missing, unexpected = net.load_state_dict(heads, strict=False)
    if unexpected or any(not k.startswith("trunk.") for k in missing):
        raise AgeGenderError(f"{path}: the bundled heads do not fit the network (missing "
                             f"{[k for k in missing if not k.startswith('trunk.')][:3]}, unexpected {unexpected[:3]})")
    return net.eval(), meta
