"""Architectures of the toy world's models: real diffusers/transformers classes, tiny configs."""
from __future__ import annotations

from .tokenizer import MAX_LENGTH

IMAGE_SIZE = 32
LATENT_SIZE = 16

VAE_CONFIG = dict(
    in_channels=3, out_channels=3,
    down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
    up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
    block_out_channels=[32, 64], layers_per_block=1, latent_channels=4, norm_num_groups=16,
    sample_size=IMAGE_SIZE,
)

UNET_CONFIG = dict(
    sample_size=LATENT_SIZE, in_channels=4, out_channels=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[32, 64], layers_per_block=1, cross_attention_dim=64,
    attention_head_dim=8, norm_num_groups=32,
)

#: v-prediction on a zero-terminal-SNR schedule: colours come out true (the SD 1.x schedule leaks the starting
#: noise's mean colour into a 16x16 latent; see TOY_PROBE.md).
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
    prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
    clip_sample=False,
)


def text_config(vocab_size: int, bos: int, eos: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
        projection_dim=64,
    )


def clip_config(vocab_size: int, bos: int, eos: int):
    from transformers import CLIPConfig, CLIPVisionConfig

    vision = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=4, hidden_size=96, intermediate_size=192,
                              num_hidden_layers=3, num_attention_heads=4, projection_dim=64)
    return CLIPConfig(text_config=text_config(vocab_size, bos, eos).to_dict(), vision_config=vision.to_dict(),
                      projection_dim=64)


def new_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG)


def new_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CONFIG)


# ------------------------------------------------------------------------------------------------ toy SDXL --
#: the toy SDXL: the SDXL UNet layout at toy widths (linear projections, deeper transformer in the attention
#: block, the pooled-text + time-id "text_time" embedding), conditioned on two text encoders of different widths
XL_TEXT_WIDTHS = (64, 96)
XL_POOLED_DIM = 64
XL_TIME_EMBED_DIM = 8
UNET_XL_CONFIG = dict(
    sample_size=LATENT_SIZE, in_channels=4, out_channels=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[32, 64], layers_per_block=1, transformer_layers_per_block=[1, 2],
    cross_attention_dim=sum(XL_TEXT_WIDTHS), attention_head_dim=[4, 8], use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=XL_TIME_EMBED_DIM,
    projection_class_embeddings_input_dim=XL_POOLED_DIM + 6 * XL_TIME_EMBED_DIM, norm_num_groups=32,
)


def text_config_2(vocab_size: int, bos: int, eos: int):
    """The toy SDXL's second text encoder (CLIPTextModelWithProjection, like OpenCLIP ViT-bigG in SDXL)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=XL_TEXT_WIDTHS[1], intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_LENGTH, bos_token_id=bos, eos_token_id=eos,
        pad_token_id=eos, projection_dim=XL_POOLED_DIM,
    )


def new_unet_xl():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_XL_CONFIG)


# ---------------------------------------------------------------------------------------------- toy audio --
#: the toy audio model: the toy's architecture on 64 x 64 mel-spectrogram pictures (the toy_8k_64mel preset). Its
#: VAE has one level more (x4 down), so its UNet works on the same 16 x 16 latents as the toy's; its text encoder
#: is 48 wide, so the model is told apart from the picture toy by its cross-attention width
AUDIO_IMAGE_SIZE = 64
AUDIO_TEXT_WIDTH = 48
AUDIO_VAE_CONFIG = dict(
    VAE_CONFIG, down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
    block_out_channels=[16, 32, 64], norm_num_groups=16, sample_size=AUDIO_IMAGE_SIZE,
)
AUDIO_UNET_CONFIG = dict(UNET_CONFIG, cross_attention_dim=AUDIO_TEXT_WIDTH)


def audio_text_config(vocab_size: int, bos: int, eos: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=AUDIO_TEXT_WIDTH, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_LENGTH, bos_token_id=bos, eos_token_id=eos,
        pad_token_id=eos, projection_dim=AUDIO_TEXT_WIDTH,
    )


def new_audio_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**AUDIO_VAE_CONFIG)


def new_audio_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**AUDIO_UNET_CONFIG)


# -------------------------------------------------------------------------------------------- toy Z-Image --
#: the toy Z-Image: Z-Image's architecture at toy size. A 16-channel VAE like the Flux VAE (no quant convs; a shift
#: and a scale), x2 down, so the transformer sees 16 x 16 latents as 8 x 8 = 64 patches of 2 x 2; the transformer
#: has Z-Image's blocks (noise and context refiners, single-stream layers, adaLN, 3-axis RoPE whose axes add up to
#: the head width), and the text encoder is a Qwen3 whose second-to-last hidden state is the context
ZIMAGE_TEXT_WIDTH = 64
ZIMAGE_VAE_CONFIG = dict(VAE_CONFIG, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
ZIMAGE_TRANSFORMER_CONFIG = dict(
    all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=96, n_layers=3, n_refiner_layers=1, n_heads=3,
    n_kv_heads=3, qk_norm=True, cap_feat_dim=ZIMAGE_TEXT_WIDTH, rope_theta=256.0, t_scale=1000.0,
    axes_dims=[8, 12, 12], axes_lens=[256, 64, 64],
)


def qwen3_config(vocab_size: int, pad: int):
    """The toy Z-Image's text encoder: a Qwen3 (grouped-query attention, q/k norms) three layers deep, so its
    second-to-last hidden state (Z-Image's context) has two layers under it."""
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=vocab_size, hidden_size=ZIMAGE_TEXT_WIDTH, intermediate_size=128,
                       num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       max_position_embeddings=2 * MAX_LENGTH, pad_token_id=pad, eos_token_id=pad,
                       bos_token_id=None, tie_word_embeddings=False)


def new_zimage_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**ZIMAGE_VAE_CONFIG)


def new_zimage_transformer():
    from diffusers import ZImageTransformer2DModel

    return ZImageTransformer2DModel(**ZIMAGE_TRANSFORMER_CONFIG)
