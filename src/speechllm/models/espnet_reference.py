"""ESPnet's E-Branchformer encoder built to match a `SpeechAdaptor`, with its weights copied over by name.

ESPnet is the reference implementation of the adaptor (BLOOMZMMS ``encoder_conf``, see
``speechllm.models.adaptor``) and a test-only oracle here, not a dependency: `espnet_encoder` imports it when
called (`make test` installs it into ``.venv/oracle``, tests/oracle-requirements.txt). The parity tests
(tests/test_ebranchformer.py) and benchmarks/adaptor_vs_espnet.py use these helpers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from speechllm.models.adaptor import AdaptorConfig, LidCtcHead, SpeechAdaptor

ESPNET_ENCODER_MODULE = "espnet2.asr.encoder.e_branchformer_encoder"


def espnet_encoder(config: AdaptorConfig, conditioning: bool = False) -> nn.Module:
    """ESPnet ``EBranchformerEncoder`` with the adaptor's sizes and the paper's fixed choices (rel_pos
    "latest" + rel_selfattn, conv2d input layer, macaron FFN, identity gate, no linear after the conv).

    With `conditioning`, LID inter-CTC self-conditioning after block ``config.interctc_layer`` and a
    ``conditioning_layer`` (ESPnet's ASR model creates it outside the encoder); the forward then needs
    ``ctc=OverlayLidCtc(...)``. No layer drop (the reference's layer drop has no effect, see
    ``speechllm.models.adaptor``). Raises ImportError when espnet2 is not importable.
    """
    from importlib import import_module

    module = import_module(ESPNET_ENCODER_MODULE)
    reference = module.EBranchformerEncoder(
        input_size=config.input_dim,
        output_size=config.d_model,
        attention_heads=config.heads,
        attention_layer_type="rel_selfattn",
        pos_enc_layer_type="rel_pos",
        rel_pos_type="latest",
        cgmlp_linear_units=config.cgmlp_units,
        cgmlp_conv_kernel=config.cgmlp_kernel,
        use_linear_after_conv=False,
        gate_activation="identity",
        num_blocks=config.num_blocks,
        dropout_rate=config.dropout,
        positional_dropout_rate=config.pos_dropout,
        attention_dropout_rate=config.attn_dropout,
        input_layer="conv2d",
        use_ffn=True,
        macaron_ffn=True,
        linear_units=config.linear_units,
        merge_conv_kernel=config.merge_kernel,
        **(
            {"interctc_layer_idx": [config.interctc_layer], "interctc_use_conditioning": True}
            if conditioning
            else {}
        ),
    )
    if conditioning:
        reference.conditioning_layer = nn.Linear(config.num_lid_classes, config.d_model)
    return reference


def copy_encoder_weights(reference: nn.Module, ours: SpeechAdaptor) -> list[str]:
    """Load ESPnet's encoder weights into `ours` by name (ESPnet's ``embed.out.0`` is our ``embed.out``);
    returns our parameters ESPnet's encoder does not have (LID head and post-encoder, and the conditioning
    layer unless `reference` has one)."""
    state = {
        key.replace("embed.out.0.", "embed.out."): value for key, value in reference.state_dict().items()
    }
    missing, unexpected = ours.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"ESPnet parameters without a counterpart in the adaptor: {unexpected}")
    return missing


class OverlayLidCtc(nn.Module):
    """The BLOOMZMMS overlay's ``lid_ctc.softmax`` over a `LidCtcHead`, for ESPnet's conditioning loop
    (DigitalPhonetics/bloomzmms@77dc192:espnet-bloomzmms-files/espnet2/asr/ctc.py): softmax at 160 ms, then
    ``F.interpolate`` (nearest) back to the 80 ms input length."""

    def __init__(self, head: LidCtcHead) -> None:
        super().__init__()
        self.head = head

    def softmax(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T1, d) -> LID posteriors upsampled to (B, T1, C)."""
        lengths = torch.full((x.size(0),), x.size(1), device=x.device)
        probs = torch.softmax(self.head(x, lengths)[0], dim=-1)
        return F.interpolate(probs.transpose(1, 2), x.size(1)).transpose(1, 2)
